/*
 * arch/percpu_x86_64.h - the per-CPU critical sections in x86-64 assembly.
 * Include "percpu.h", not this file.
 *
 * Every sequence has the same skeleton:
 *
 *   descriptor  a struct rseq_cs (32 bytes, 32-byte aligned) in section
 *               __rseq_cs, and its address in __rseq_cs_ptr_array (for
 *               debuggers and tools that want to list every sequence);
 *   publish     leaq descriptor -> %rax; movq %rax -> rs->rseq_cs.  The
 *               start label follows the movq with nothing in between: the
 *               kernel's saved IP after that store is start_ip, so there is
 *               no instant where rseq_cs is set but the range not entered
 *               (a preemption there would clear rseq_cs and leave the rest of
 *               the sequence unprotected);
 *   index       compare the index field (cpu_id or mm_cid) with the index
 *               the caller derived its addresses from; a mismatch means the
 *               thread moved since, so give up (-1) before touching memory;
 *   operation   loads, compares, speculative stores;
 *   commit      ONE store, the last instruction of the range
 *               (post_commit_offset ends right after it);
 *   abort       in section __rseq_failure: the signature as the 4-byte
 *               displacement of a never-executed ud1 (0f b9 3d <sig>), so
 *               the 4 bytes before abort_ip equal RSEQ_SIG as the kernel
 *               demands, then a jump back to a C label that returns -1.
 *
 * rs is passed in a register: the area may belong to glibc, librseq or this
 * package, so nothing here assumes %fs-relative addressing.  rseq_cs is left
 * set after the sequence: the kernel clears it lazily the next time it finds
 * the IP outside the range, which is cheaper than a store on every exit.
 * Nothing here ever writes cpu_id_start, cpu_id, node_id, mm_cid or flags.
 *
 * Labels use %= (unique per asm instance, even when the compiler duplicates
 * or inlines a statement), so any number of sequences can share a function.
 */
#ifndef RSEQ_PERCPU_DISPATCH
#error "include percpu.h, not arch/percpu_x86_64.h"
#endif
#ifndef RSEQ_PY_PERCPU_X86_64_H
#define RSEQ_PY_PERCPU_X86_64_H

#include <stddef.h>
#include <stdint.h>

/* ---------------------------------------------------------------------------
 * Delay injection (test build only; inject.h switches these on)
 * ------------------------------------------------------------------------- */

/* A count-down loop on %r11d reading rseq_inject_loops[n] (4-byte elements).
 * Flags are dead at every point where it is placed; labels 91/92 are local. */
#define RSEQ_ARCH_INJECT_ASM(n)                                             \
    "movl rseq_inject_loops+4*" #n "(%%rip), %%r11d\n\t"                     \
    "testl %%r11d, %%r11d\n\t"                                               \
    "jz 92f\n\t"                                                             \
    "91:\n\t"                                                                \
    "decl %%r11d\n\t"                                                        \
    "jnz 91b\n\t"                                                            \
    "92:\n\t"
#define RSEQ_ARCH_INJECT_CLOBBER , "r11"

/* ---------------------------------------------------------------------------
 * Sequence skeleton
 * ------------------------------------------------------------------------- */

#define RSEQ_X86_DESCRIPTOR                                                  \
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

/* Publish the descriptor and open the range.  Clobbers %rax. */
#define RSEQ_X86_PUBLISH_AND_START                                           \
    "leaq .Lrseq_cs_%=(%%rip), %%rax\n\t"                                    \
    "movq %%rax, " RSEQ_STR(RSEQ_OFF_RSEQ_CS) "(%[rs])\n\t"                  \
    ".Lrseq_start_%=:\n\t"                                                   \
    RSEQ_INJECT_ASM(1)                                                       \
    "cmpl %[cpu], %[index]\n\t"                                              \
    "jnz %l[aborted]\n\t"                                                    \
    RSEQ_INJECT_ASM(2)

/* Close the range right after the commit, and emit the abort handler.
 * 0x0f 0xb9 0x3d is ud1 with a rip-relative operand: its 4-byte
 * displacement is the signature, so it sits just before abort_ip. */
#define RSEQ_X86_END_AND_ABORT                                               \
    ".Lrseq_post_commit_%=:\n\t"                                             \
    ".pushsection __rseq_failure, \"ax\"\n\t"                                \
    ".byte 0x0f, 0xb9, 0x3d\n\t"                                             \
    ".long " RSEQ_STR(RSEQ_SIG) "\n\t"                                       \
    ".Lrseq_abort_%=:\n\t"                                                   \
    "jmp %l[aborted]\n\t"                                                    \
    ".popsection\n\t"

/* The index field as a memory operand, so the compiler folds the offset into
 * the addressing mode when mode is a constant (the usual case once inlined). */
static inline const uint32_t *rseq_x86_index_field(const struct rseq_abi *rs,
                                                   enum rseq_index_mode mode)
{
    return mode == RSEQ_INDEX_MM_CID ? &rs->mm_cid : &rs->cpu_id;
}

#define RSEQ_X86_COMMON_INPUTS                                               \
    [rs] "r"(rs), [cpu] "r"(cpu), [index] "m"(*rseq_x86_index_field(rs, mode))

#define RSEQ_X86_CLOBBERS "memory", "cc", "rax" RSEQ_INJECT_CLOBBER

/* ---------------------------------------------------------------------------
 * The primitives (documented in percpu.h, which declares the contract)
 * ------------------------------------------------------------------------- */

/* load v; if (*v != expect) fail; store newv to *v (commit) */
static inline int rseq_load_cbne_store(struct rseq_abi *rs, enum rseq_index_mode mode,
                                       intptr_t *v, intptr_t expect, intptr_t newv,
                                       int cpu)
{
    __asm__ goto(
        RSEQ_X86_DESCRIPTOR
        RSEQ_X86_PUBLISH_AND_START
        "cmpq %[expect], (%[v])\n\t"
        "jnz %l[cmpfail]\n\t"
        RSEQ_INJECT_ASM(3)
        RSEQ_INJECT_ASM(4)
        "movq %[newv], (%[v])\n\t" /* commit */
        RSEQ_X86_END_AND_ABORT
        :
        : RSEQ_X86_COMMON_INPUTS,
          [v] "r"(v), [expect] "r"(expect), [newv] "r"(newv)
        : RSEQ_X86_CLOBBERS
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
        RSEQ_X86_DESCRIPTOR
        RSEQ_X86_PUBLISH_AND_START
        "movq (%[v]), %%rax\n\t"
        RSEQ_INJECT_ASM(3)
        "addq %[count], %%rax\n\t"
        RSEQ_INJECT_ASM(4)
        "movq %%rax, (%[v])\n\t" /* commit */
        RSEQ_X86_END_AND_ABORT
        :
        : RSEQ_X86_COMMON_INPUTS, [v] "r"(v), [count] "er"(count)
        : RSEQ_X86_CLOBBERS
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
        RSEQ_X86_DESCRIPTOR
        RSEQ_X86_PUBLISH_AND_START
        "movq (%[v]), %%rax\n\t"
        RSEQ_INJECT_ASM(3)
        "addq %[count], %%rax\n\t"
        "jo %l[cmpfail]\n\t"
        RSEQ_INJECT_ASM(4)
        "movq %%rax, (%[v])\n\t" /* commit */
        RSEQ_X86_END_AND_ABORT
        :
        : RSEQ_X86_COMMON_INPUTS, [v] "r"(v), [count] "er"(count)
        : RSEQ_X86_CLOBBERS
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
        RSEQ_X86_DESCRIPTOR
        RSEQ_X86_PUBLISH_AND_START
        "movq (%[v]), %%rax\n\t"
        "cmpq %[expectnot], %%rax\n\t"
        "je %l[cmpfail]\n\t"
        RSEQ_INJECT_ASM(3)
        "movq %%rax, (%[loaded])\n\t"
        "movq (%%rax, %[next_offset], 1), %%rax\n\t"
        RSEQ_INJECT_ASM(4)
        "movq %%rax, (%[v])\n\t" /* commit */
        RSEQ_X86_END_AND_ABORT
        :
        : RSEQ_X86_COMMON_INPUTS, [v] "r"(v), [expectnot] "er"(expectnot),
          [next_offset] "r"(next_offset), [loaded] "r"(loaded)
        : RSEQ_X86_CLOBBERS
        : aborted, cmpfail);
    return 0;
aborted:
    return -1;
cmpfail:
    return 1;
}

/* load v; if (*v != expect) fail; store v2 to *p2; store newv to *v (commit) */
static inline int rseq_load_cbne_store_store(struct rseq_abi *rs, enum rseq_index_mode mode,
                                             intptr_t *v, intptr_t expect,
                                             intptr_t *p2, intptr_t v2,
                                             intptr_t newv, int cpu)
{
    __asm__ goto(
        RSEQ_X86_DESCRIPTOR
        RSEQ_X86_PUBLISH_AND_START
        "cmpq %[expect], (%[v])\n\t"
        "jnz %l[cmpfail]\n\t"
        RSEQ_INJECT_ASM(3)
        "movq %[v2], (%[p2])\n\t" /* speculative */
        RSEQ_INJECT_ASM(4)
        "movq %[newv], (%[v])\n\t" /* commit */
        RSEQ_X86_END_AND_ABORT
        :
        : RSEQ_X86_COMMON_INPUTS, [v] "r"(v), [expect] "r"(expect),
          [p2] "r"(p2), [v2] "er"(v2), [newv] "r"(newv)
        : RSEQ_X86_CLOBBERS
        : aborted, cmpfail);
    return 0;
aborted:
    return -1;
cmpfail:
    return 1;
}

/* load v; if (*v != expect) fail; memcpy(dst, src, len); store newv to *v (commit)
 * The copy moves 8 bytes at a time, then the tail byte by byte; an
 * interrupted copy is simply abandoned (the abort path), never resumed. */
static inline int rseq_load_cbne_memcpy_store(struct rseq_abi *rs, enum rseq_index_mode mode,
                                              intptr_t *v, intptr_t expect,
                                              void *dst, const void *src, size_t len,
                                              intptr_t newv, int cpu)
{
    __asm__ goto(
        RSEQ_X86_DESCRIPTOR
        RSEQ_X86_PUBLISH_AND_START
        "cmpq %[expect], (%[v])\n\t"
        "jnz %l[cmpfail]\n\t"
        RSEQ_INJECT_ASM(3)
        "xorl %%ecx, %%ecx\n\t"          /* rcx: bytes copied so far */
        "81:\n\t"                         /* 8-byte chunks */
        "leaq 8(%%rcx), %%rax\n\t"
        "cmpq %[len], %%rax\n\t"
        "ja 82f\n\t"
        "movq (%[src], %%rcx, 1), %%rax\n\t"
        "movq %%rax, (%[dst], %%rcx, 1)\n\t"
        "addq $8, %%rcx\n\t"
        RSEQ_INJECT_ASM(5)
        "jmp 81b\n\t"
        "82:\n\t"                         /* tail, fewer than 8 bytes */
        "cmpq %[len], %%rcx\n\t"
        "jae 83f\n\t"
        "movb (%[src], %%rcx, 1), %%al\n\t"
        "movb %%al, (%[dst], %%rcx, 1)\n\t"
        "incq %%rcx\n\t"
        "jmp 82b\n\t"
        "83:\n\t"
        RSEQ_INJECT_ASM(4)
        "movq %[newv], (%[v])\n\t" /* commit */
        RSEQ_X86_END_AND_ABORT
        :
        : RSEQ_X86_COMMON_INPUTS, [v] "r"(v), [expect] "r"(expect),
          [dst] "r"(dst), [src] "r"(src), [len] "r"(len), [newv] "r"(newv)
        : RSEQ_X86_CLOBBERS, "rcx"
        : aborted, cmpfail);
    return 0;
aborted:
    return -1;
cmpfail:
    return 1;
}

#endif /* RSEQ_PY_PERCPU_X86_64_H */
