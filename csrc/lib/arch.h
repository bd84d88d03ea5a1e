/*
 * arch.h - the one place that picks the architecture.
 *
 * Portable code includes this header and tests RSEQ_ARCH_HAS_CS, never
 * __x86_64__ itself.  An architecture header defines:
 *   RSEQ_SIG                the signature placed before every abort handler
 *   RSEQ_ARCH_HAS_CS        1 when critical sections are implemented in asm
 *   RSEQ_ARCH_PERCPU_HEADER the file of those sections (percpu.h includes it)
 *   RSEQ_ARCH_NAME          what rseq.info() reports as "arch"
 *   rseq_arch_thread_pointer()  the thread pointer (glibc's __rseq_offset base)
 *   rseq_arch_cas128()      a lock-free 16-byte compare-and-swap
 * Critical sections run on x86-64 and little-endian arm64 (tested under an
 * arm64 kernel by tests/arch/arm64.sh).  Architectures without tested
 * assembly, big-endian arm64 included, get arch/generic.h: registration and
 * the fast reads still work, and every per-CPU primitive takes the portable
 * atomic fallback.
 */
#ifndef RSEQ_PY_ARCH_H
#define RSEQ_PY_ARCH_H

#define RSEQ_ARCH_DISPATCH 1
#if defined(__x86_64__)
#include "arch/x86_64.h"
#elif defined(__aarch64__) && defined(__AARCH64EL__)
#include "arch/aarch64.h"
#else
#include "arch/generic.h"
#endif
#undef RSEQ_ARCH_DISPATCH

#endif /* RSEQ_PY_ARCH_H */
