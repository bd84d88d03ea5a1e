/*
 * arch/x86_64.h - x86-64 definitions. Include "arch.h", not this file.
 * The critical sections themselves are in percpu_x86_64.h (same rule).
 */
#ifndef RSEQ_ARCH_DISPATCH
#error "include arch.h, not arch/x86_64.h"
#endif
#ifndef RSEQ_PY_ARCH_X86_64_H
#define RSEQ_PY_ARCH_X86_64_H

#include <stdint.h>

#include "rseq/abi.h"

/* The x86 signature (glibc, librseq and the kernel selftests agree on it).
 * It is placed in the instruction stream as the 4-byte immediate of a
 * never-executed ud1 instruction just before each abort handler. */
#define RSEQ_SIG 0x53053053
#define RSEQ_ARCH_HAS_CS 1
#define RSEQ_ARCH_PERCPU_HEADER "arch/percpu_x86_64.h"
#define RSEQ_ARCH_NAME "x86_64"

static inline void *rseq_arch_thread_pointer(void)
{
    void *tp;
    /* %fs:0 holds the thread pointer itself (the TCB self-pointer). */
    __asm__ ("mov %%fs:0, %0" : "=r"(tp));
    return tp;
}

/* 16-byte compare-and-swap (lock cmpxchg16b, present in every x86-64 CPU
 * since 2006).  Returns 1 and stores desired when *p == *expected; otherwise
 * returns 0 and loads *p into *expected.  Inline assembly rather than
 * __atomic: GCC sends 16-byte __atomic builtins to libatomic, which may take
 * a lock, and a lock in shared memory is what a killed process leaves held. */
static inline int rseq_arch_cas128(__int128 *p, __int128 *expected, __int128 desired)
{
    uint64_t lo = (uint64_t)*expected;
    uint64_t hi = (uint64_t)((unsigned __int128)*expected >> 64);
    unsigned char ok;
    __asm__ __volatile__("lock cmpxchg16b %[mem]\n\tsete %[ok]"
                         : [ok] "=q"(ok), [mem] "+m"(*p), "+a"(lo), "+d"(hi)
                         : "b"((uint64_t)desired),
                           "c"((uint64_t)((unsigned __int128)desired >> 64))
                         : "memory", "cc");
    *expected = (__int128)(((unsigned __int128)hi << 64) | lo);
    return ok;
}

#endif
