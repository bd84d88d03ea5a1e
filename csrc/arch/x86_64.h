/*
 * arch/x86_64.h - x86-64 definitions. Include "arch.h", not this file.
 * The critical sections themselves are in percpu_x86_64.h (same rule).
 */
#ifndef RSEQ_ARCH_DISPATCH
#error "include arch.h, not arch/x86_64.h"
#endif
#ifndef RSEQ_PY_ARCH_X86_64_H
#define RSEQ_PY_ARCH_X86_64_H

#include "rseq/abi.h"

/* The x86 signature (glibc, librseq and the kernel selftests agree on it).
 * It is placed in the instruction stream as the 4-byte immediate of a
 * never-executed ud1 instruction just before each abort handler. */
#define RSEQ_SIG 0x53053053
#define RSEQ_ARCH_HAS_CS 1
#define RSEQ_ARCH_NAME "x86_64"

static inline void *rseq_arch_thread_pointer(void)
{
    void *tp;
    /* %fs:0 holds the thread pointer itself (the TCB self-pointer). */
    __asm__ ("mov %%fs:0, %0" : "=r"(tp));
    return tp;
}

#endif
