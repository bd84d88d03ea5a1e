/*
 * arch/aarch64.h - arm64 (little-endian) definitions. Include "arch.h", not
 * this file.  The critical sections themselves are in percpu_aarch64.h
 * (same rule).
 */
#ifndef RSEQ_ARCH_DISPATCH
#error "include arch.h, not arch/aarch64.h"
#endif
#ifndef RSEQ_PY_ARCH_AARCH64_H
#define RSEQ_PY_ARCH_AARCH64_H

#include <stdint.h>

#include "rseq/abi.h"

/* The arm64 signature (glibc's bits/rseq.h, librseq and the kernel
 * selftests agree on it): the encoding of BRK #0x45E0, placed in the
 * instruction stream just before each abort handler, where it never executes
 * (and would trap if it did).  The kernel compares the 4 bytes before
 * abort_ip, read as data, with the registered value; on big-endian arm64
 * code stays little-endian while data does not, so the data value differs
 * there: arch.h sends big-endian builds to the generic fallback instead. */
#define RSEQ_SIG 0xd428bc00
#define RSEQ_ARCH_HAS_CS 1
#define RSEQ_ARCH_PERCPU_HEADER "arch/percpu_aarch64.h"
#define RSEQ_ARCH_NAME "aarch64"

static inline void *rseq_arch_thread_pointer(void)
{
    void *tp;
    /* TPIDR_EL0 is the thread pointer glibc's __rseq_offset is relative to. */
    __asm__ ("mrs %0, tpidr_el0" : "=r"(tp));
    return tp;
}

/* 16-byte compare-and-swap.  Returns 1 and stores desired when *p ==
 * *expected; otherwise returns 0 and loads *p into *expected.
 * An exclusive pair (ldaxp/stlxp, every ARMv8.0 CPU) rather than __atomic:
 * GCC sends 16-byte __atomic builtins to libatomic, which may take a lock,
 * and a lock in shared memory is what a killed process leaves held.  On a
 * mismatch the loop still stores back the value it read: ldaxp alone is not
 * single-copy atomic, only a successful stlxp proves the pair was read
 * whole. */
static inline int rseq_arch_cas128(__int128 *p, __int128 *expected, __int128 desired)
{
    uint64_t exp_lo = (uint64_t)*expected;
    uint64_t exp_hi = (uint64_t)((unsigned __int128)*expected >> 64);
    uint64_t des_lo = (uint64_t)desired;
    uint64_t des_hi = (uint64_t)((unsigned __int128)desired >> 64);
    uint64_t old_lo, old_hi, new_lo, new_hi;
    uint32_t ok, failed;
    __asm__ __volatile__("1: ldaxp %[old_lo], %[old_hi], %[mem]\n\t"
                         "cmp %[old_lo], %[exp_lo]\n\t"
                         "ccmp %[old_hi], %[exp_hi], #0, eq\n\t"
                         "cset %w[ok], eq\n\t"
                         "csel %[new_lo], %[des_lo], %[old_lo], eq\n\t"
                         "csel %[new_hi], %[des_hi], %[old_hi], eq\n\t"
                         "stlxp %w[failed], %[new_lo], %[new_hi], %[mem]\n\t"
                         "cbnz %w[failed], 1b"
                         : [old_lo] "=&r"(old_lo), [old_hi] "=&r"(old_hi),
                           [new_lo] "=&r"(new_lo), [new_hi] "=&r"(new_hi),
                           [ok] "=&r"(ok), [failed] "=&r"(failed), [mem] "+Q"(*p)
                         : [exp_lo] "r"(exp_lo), [exp_hi] "r"(exp_hi),
                           [des_lo] "r"(des_lo), [des_hi] "r"(des_hi)
                         : "memory", "cc");
    *expected = (__int128)(((unsigned __int128)old_hi << 64) | old_lo);
    return (int)ok;
}

#endif
