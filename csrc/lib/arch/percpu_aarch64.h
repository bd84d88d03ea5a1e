/*
 * arch/percpu_aarch64.h - the per-CPU critical sections in arm64 assembly.
 * Include "percpu.h", not this file.  Read side by side with
 * percpu_x86_64.h: same skeleton, same primitives, same injection points.
 *
 *   descriptor  a struct rseq_cs (32 bytes, 32-byte aligned) in section
 *               __rseq_cs, and its address in __rseq_cs_ptr_array;
 *   publish     adrp/add descriptor -> x16; str x16 -> rs->rseq_cs (one
 *               64-bit store).  The start label follows the str with nothing
 *               in between, as on x86-64: no instant where rseq_cs is set
 *               but the range not entered;
 *   index       ldr the index field (cpu_id or mm_cid) into w17 and compare
 *               with the index the caller derived its addresses from; a
 *               mismatch means the thread moved since: give up (-1) before
 *               touching memory;
 *   operation   loads, compares, speculative stores (arm64 has no
 *               memory-operand compare: every load goes through x16/x17);
 *   commit      ONE store, the last instruction of the range;
 *   abort       in section __rseq_failure: the signature as a .inst word
 *               (BRK #0x45E0, never executed), so the 4 bytes before
 *               abort_ip equal RSEQ_SIG as the kernel demands, then a branch
 *               back to a C label that returns -1.
 *
 * Memory order.  x86-64 is TSO: every store there is a release and every
 * load an acquire.  arm64 is weaker, so the commits that publish earlier
 * stores of the same sequence (store_store: a pushed node's next pointer;
 * memcpy: the copied bytes) are store-release (stlr): a reader on another
 * CPU that loads v with acquire sees what the commit published, as on
 * x86-64.  The other commits publish nothing but their own word and stay
 * plain stores.  The list pop's second load depends on the first through
 * its address, which arm64 orders without a barrier.
 *
 * Scratch registers: x16 and x17 (IP0/IP1, the intra-procedure-call
 * registers a linker veneer may also clobber: the only branches that may get
 * a veneer are the ones leaving the sequence, after which neither is live),
 * and x15 for the delay loop of the test build.  The flags are clobbered by
 * the compares.  rs is passed in a register (the area may be glibc's,
 * librseq's or ours); rseq_cs is left set after the sequence (the kernel
 * clears it lazily).  Nothing here ever writes cpu_id_start, cpu_id,
 * node_id, mm_cid or flags.  Labels use %= (unique per asm instance).
 */
#ifndef RSEQ_PERCPU_DISPATCH
#error "include percpu.h, not arch/percpu_aarch64.h"
#endif
#ifndef RSEQ_PY_PERCPU_AARCH64_H
#define RSEQ_PY_PERCPU_AARCH64_H

#include <stddef.h>
#include <stdint.h>

/* ---------------------------------------------------------------------------
 * Delay injection (test build only; inject.h switches these on)
 * ------------------------------------------------------------------------- */

/* A count-down loop on w15 reading rseq_inject_loops[n] (4-byte elements,
 * hidden visibility, so adrp + :lo12: reaches it in a shared object too).
 * cbz/cbnz leave the flags alone; labels 91/92 are local. */
#define RSEQ_ARCH_INJECT_ASM(n)                                             \
    "adrp x15, rseq_inject_loops\n\t"                                        \
    "ldr w15, [x15, #:lo12:rseq_inject_loops+4*" #n "]\n\t"                  \
    "cbz w15, 92f\n\t"                                                       \
    "91:\n\t"                                                                \
    "sub w15, w15, #1\n\t"                                                   \
    "cbnz w15, 91b\n\t"                                                      \
    "92:\n\t"
#define RSEQ_ARCH_INJECT_CLOBBER , "x15"

/* ---------------------------------------------------------------------------
 * Sequence skeleton
 * ------------------------------------------------------------------------- */

#define RSEQ_ARM64_DESCRIPTOR                                                \
    ".pushsection __rseq_cs, \"aw\"\n\t"                                     \
    ".balign 32\n\t"                                                         \
    ".Lrseq_cs_%=:\n\t"                                                      \
    ".long 0, 0\n\t" /* version, flags: both must be 0 */                    \
    ".quad .Lrseq_start_%=, .Lrseq_post_commit_%= - .Lrseq_start_%=, "       \
    ".Lrseq_abort_%=\n\t"                                                    \
    ".popsection\n\t"                                                        \
    ".pushsection __rseq_cs_ptr_array, \"aw\"\n\t"                           \
    ".quad .Lrseq_cs_%=\n\t"                                                 \
    ".popsection\n\t"

/* Publish the descriptor and open the range.  Clobbers x16, x17, flags. */
#define RSEQ_ARM64_PUBLISH_AND_START                                         \
    "adrp x16, .Lrseq_cs_%=\n\t"                                             \
    "add x16, x16, :lo12:.Lrseq_cs_%=\n\t"                                   \
    "str x16, [%[rs], #" RSEQ_STR(RSEQ_OFF_RSEQ_CS) "]\n\t"                  \
    ".Lrseq_start_%=:\n\t"                                                   \
    RSEQ_INJECT_ASM(1)                                                       \
    "ldr w17, %[index]\n\t"                                                  \
    "cmp w17, %w[cpu]\n\t"                                                   \
    "b.ne %l[aborted]\n\t"                                                   \
    RSEQ_INJECT_ASM(2)

/* Close the range right after the commit, and emit the abort handler.
 * .inst emits the signature in instruction byte order (little-endian),
 * which is also its data value on the little-endian builds arch.h admits. */
#define RSEQ_ARM64_END_AND_ABORT                                             \
    ".Lrseq_post_commit_%=:\n\t"                                             \
    ".pushsection __rseq_failure, \"ax\"\n\t"                                \
    ".inst " RSEQ_STR(RSEQ_SIG) "\n\t"                                       \
    ".Lrseq_abort_%=:\n\t"                                                   \
    "b %l[aborted]\n\t"                                                      \
    ".popsection\n\t"

/* The index field as a memory operand (the compiler folds the offset into
 * the ldr when mode is a constant, the usual case once inlined). */
static inline const uint32_t *rseq_arm64_index_field(const struct rseq_abi *rs,
                                                     enum rseq_index_mode mode)
{
    return mode == RSEQ_INDEX_MM_CID ? &rs->mm_cid : &rs->cpu_id;
}

#define RSEQ_ARM64_COMMON_INPUTS                                             \
    [rs] "r"(rs), [cpu] "r"(cpu), [index] "m"(*rseq_arm64_index_field(rs, mode))

#define RSEQ_ARM64_CLOBBERS "memory", "cc", "x16", "x17" RSEQ_INJECT_CLOBBER

/* ---------------------------------------------------------------------------
 * The primitives (documented in percpu.h, which declares the contract)
 * ------------------------------------------------------------------------- */

/* load v; if (*v != expect) fail; store newv to *v (commit) */
static inline int rseq_load_cbne_store(struct rseq_abi *rs, enum rseq_index_mode mode,
                                       intptr_t *v, intptr_t expect, intptr_t newv,
                                       int cpu)
{
    __asm__ goto(
        RSEQ_ARM64_DESCRIPTOR
        RSEQ_ARM64_PUBLISH_AND_START
        "ldr x16, [%[v]]\n\t"
        "cmp x16, %[expect]\n\t"
        "b.ne %l[cmpfail]\n\t"
        RSEQ_INJECT_ASM(3)
        RSEQ_INJECT_ASM(4)
        "str %[newv], [%[v]]\n\t" /* commit */
        RSEQ_ARM64_END_AND_ABORT
        :
        : RSEQ_ARM64_COMMON_INPUTS,
          [v] "r"(v), [expect] "r"(expect), [newv] "r"(newv)
        : RSEQ_ARM64_CLOBBERS
        : aborted, cmpfail);
    return 0;
aborted:
    return -1;
cmpfail:
    return 1;
}

/* load v; add count; store (commit) */
static inline int rseq_load_add_store(struct rseq_abi *rs, enum rseq_index_mode mode,
                                      intptr_t *v, intptr_t count, int cpu)
{
    __asm__ goto(
        RSEQ_ARM64_DESCRIPTOR
        RSEQ_ARM64_PUBLISH_AND_START
        "ldr x16, [%[v]]\n\t"
        RSEQ_INJECT_ASM(3)
        "add x16, x16, %[count]\n\t"
        RSEQ_INJECT_ASM(4)
        "str x16, [%[v]]\n\t" /* commit */
        RSEQ_ARM64_END_AND_ABORT
        :
        : RSEQ_ARM64_COMMON_INPUTS, [v] "r"(v), [count] "rI"(count)
        : RSEQ_ARM64_CLOBBERS
        : aborted);
    return 0;
aborted:
    return -1;
}

/* load v; add count; if (signed overflow) fail; store (commit) */
static inline int rseq_load_add_bov_store(struct rseq_abi *rs, enum rseq_index_mode mode,
                                          intptr_t *v, intptr_t count, int cpu)
{
    __asm__ goto(
        RSEQ_ARM64_DESCRIPTOR
        RSEQ_ARM64_PUBLISH_AND_START
        "ldr x16, [%[v]]\n\t"
        RSEQ_INJECT_ASM(3)
        "adds x16, x16, %[count]\n\t"
        "b.vs %l[cmpfail]\n\t"
        RSEQ_INJECT_ASM(4)
        "str x16, [%[v]]\n\t" /* commit */
        RSEQ_ARM64_END_AND_ABORT
        :
        : RSEQ_ARM64_COMMON_INPUTS, [v] "r"(v), [count] "rI"(count)
        : RSEQ_ARM64_CLOBBERS
        : aborted, cmpfail);
    return 0;
aborted:
    return -1;
cmpfail:
    return 1;
}

/* load h = *v; if (h == expectnot) fail; store h to *loaded;
 * load n = *(h + next_offset); store n to *v (commit) */
static inline int rseq_load_cbeq_store_load_store(struct rseq_abi *rs,
                                                  enum rseq_index_mode mode,
                                                  intptr_t *v, intptr_t expectnot,
                                                  ptrdiff_t next_offset,
                                                  intptr_t *loaded, int cpu)
{
    __asm__ goto(
        RSEQ_ARM64_DESCRIPTOR
        RSEQ_ARM64_PUBLISH_AND_START
        "ldr x16, [%[v]]\n\t"
        "cmp x16, %[expectnot]\n\t"
        "b.eq %l[cmpfail]\n\t"
        RSEQ_INJECT_ASM(3)
        "str x16, [%[loaded]]\n\t"
        "ldr x16, [x16, %[next_offset]]\n\t"
        RSEQ_INJECT_ASM(4)
        "str x16, [%[v]]\n\t" /* commit */
        RSEQ_ARM64_END_AND_ABORT
        :
        : RSEQ_ARM64_COMMON_INPUTS, [v] "r"(v), [expectnot] "r"(expectnot),
          [next_offset] "r"(next_offset), [loaded] "r"(loaded)
        : RSEQ_ARM64_CLOBBERS
        : aborted, cmpfail);
    return 0;
aborted:
    return -1;
cmpfail:
    return 1;
}

/* load v; if (*v != expect) fail; store v2 to *p2; store newv to *v (commit)
 * The commit is a store-release: it publishes the store to *p2. */
static inline int rseq_load_cbne_store_store(struct rseq_abi *rs, enum rseq_index_mode mode,
                                             intptr_t *v, intptr_t expect,
                                             intptr_t *p2, intptr_t v2,
                                             intptr_t newv, int cpu)
{
    __asm__ goto(
        RSEQ_ARM64_DESCRIPTOR
        RSEQ_ARM64_PUBLISH_AND_START
        "ldr x16, [%[v]]\n\t"
        "cmp x16, %[expect]\n\t"
        "b.ne %l[cmpfail]\n\t"
        RSEQ_INJECT_ASM(3)
        "str %[v2], [%[p2]]\n\t" /* speculative */
        RSEQ_INJECT_ASM(4)
        "stlr %[newv], [%[v]]\n\t" /* commit */
        RSEQ_ARM64_END_AND_ABORT
        :
        : RSEQ_ARM64_COMMON_INPUTS, [v] "r"(v), [expect] "r"(expect),
          [p2] "r"(p2), [v2] "r"(v2), [newv] "r"(newv)
        : RSEQ_ARM64_CLOBBERS
        : aborted, cmpfail);
    return 0;
aborted:
    return -1;
cmpfail:
    return 1;
}

/* load v; if (*v != expect) fail; memcpy(dst, src, len); store newv to *v (commit)
 * The copy moves 8 bytes at a time, then the tail byte by byte; an
 * interrupted copy is simply abandoned (the abort path), never resumed.
 * The commit is a store-release: it publishes the copied bytes. */
static inline int rseq_load_cbne_memcpy_store(struct rseq_abi *rs, enum rseq_index_mode mode,
                                              intptr_t *v, intptr_t expect,
                                              void *dst, const void *src, size_t len,
                                              intptr_t newv, int cpu)
{
    __asm__ goto(
        RSEQ_ARM64_DESCRIPTOR
        RSEQ_ARM64_PUBLISH_AND_START
        "ldr x16, [%[v]]\n\t"
        "cmp x16, %[expect]\n\t"
        "b.ne %l[cmpfail]\n\t"
        RSEQ_INJECT_ASM(3)
        "mov x17, #0\n\t"                 /* x17: bytes copied so far */
        "81:\n\t"                         /* 8-byte chunks */
        "add x16, x17, #8\n\t"
        "cmp x16, %[len]\n\t"
        "b.hi 82f\n\t"
        "ldr x16, [%[src], x17]\n\t"
        "str x16, [%[dst], x17]\n\t"
        "add x17, x17, #8\n\t"
        RSEQ_INJECT_ASM(5)
        "b 81b\n\t"
        "82:\n\t"                         /* tail, fewer than 8 bytes */
        "cmp x17, %[len]\n\t"
        "b.hs 83f\n\t"
        "ldrb w16, [%[src], x17]\n\t"
        "strb w16, [%[dst], x17]\n\t"
        "add x17, x17, #1\n\t"
        "b 82b\n\t"
        "83:\n\t"
        RSEQ_INJECT_ASM(4)
        "stlr %[newv], [%[v]]\n\t" /* commit */
        RSEQ_ARM64_END_AND_ABORT
        :
        : RSEQ_ARM64_COMMON_INPUTS, [v] "r"(v), [expect] "r"(expect),
          [dst] "r"(dst), [src] "r"(src), [len] "r"(len), [newv] "r"(newv)
        : RSEQ_ARM64_CLOBBERS
        : aborted, cmpfail);
    return 0;
aborted:
    return -1;
cmpfail:
    return 1;
}

#endif /* RSEQ_PY_PERCPU_AARCH64_H */
