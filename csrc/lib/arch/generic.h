/*
 * arch/generic.h - architectures without tested rseq assembly.
 * Include "arch.h", not this file.
 */
#ifndef RSEQ_ARCH_DISPATCH
#error "include arch.h, not arch/generic.h"
#endif
#ifndef RSEQ_PY_ARCH_GENERIC_H
#define RSEQ_PY_ARCH_GENERIC_H

#include "rseq/abi.h"

/* Used only to register an area so the kernel maintains cpu_id; no critical
 * section is ever run, so no abort handler carries it. The value is the one
 * glibc and librseq use on most architectures that lack their own. */
#ifndef RSEQ_SIG
#define RSEQ_SIG 0x53053053
#endif
#define RSEQ_ARCH_HAS_CS 0
#define RSEQ_ARCH_NAME "generic"

static inline void *rseq_arch_thread_pointer(void)
{
    return __builtin_thread_pointer();
}

/* 16-byte compare-and-swap through the compiler (may need -latomic; a
 * libatomic that takes a lock is not robust against a killed process:
 * port rseq_arch_cas128 to the architecture's native instruction). */
static inline int rseq_arch_cas128(__int128 *p, __int128 *expected, __int128 desired)
{
    return __atomic_compare_exchange_n(p, expected, desired, 0,
                                       __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
}

#endif
