/*
 * percpu.h - per-CPU primitives on restartable sequences: the only header to
 * include.
 *
 * Each primitive is one line of pseudo-code, named after it (load, cbne =
 * compare and branch (fail) if not equal, cbeq = ... if equal, bov = branch
 * (fail) on signed overflow, store, memcpy), and returns
 *     0   committed: the last store of the pseudo-code happened;
 *     1   a compare failed (or the add overflowed): nothing was committed;
 *    -1   aborted (preempted, migrated, signalled, or the thread is no longer
 *         on index `cpu`): nothing was committed; re-read the index and
 *         retry.
 * Stores before the commit are speculative: they may have happened even when
 * the result is 1 or -1, so they must only touch memory that is meaningless
 * until the commit (a node not yet published, a buffer slot past the
 * committed length).
 *
 *   rseq_load_cbne_store            load v; if (*v != expect) fail; store newv to *v
 *   rseq_load_add_store             load v; add count; store
 *   rseq_load_add_bov_store         load v; add count; if (signed overflow) fail; store
 *   rseq_load_cbeq_store_load_store load h = *v; if (h == expectnot) fail;
 *                                   store h to *loaded; load n = *(h + next_offset);
 *                                   store n to *v
 *   rseq_load_cbne_store_store      load v; if (*v != expect) fail; store v2 to *p2;
 *                                   store newv to *v
 *   rseq_load_cbne_memcpy_store     load v; if (*v != expect) fail;
 *                                   memcpy(dst, src, len); store newv to *v
 *
 * Arguments common to all: rs is the calling thread's registered rseq area
 * (glibc's, librseq's or ours), mode picks the index field the sequence
 * checks, cpu is the index the caller read with rseq_current_index() and
 * derived every address from.  The kernel aborts the sequence if the thread
 * is preempted, migrated or signalled inside it, so two sequences that
 * committed on the same index never overlapped: per-index data needs no
 * atomic instruction.
 *
 * Index modes:
 *   RSEQ_INDEX_CPU_ID  the CPU number: valid across processes (shared memory).
 *   RSEQ_INDEX_MM_CID  the per-process concurrency id (Linux 6.3): compact
 *                      (< min(threads, CPUs)), for process-private data only,
 *                      and only when the registered area covers mm_cid (not
 *                      under glibc 2.36's 20-byte registration).
 *
 * The usual retry loop:
 *
 *     int cpu, ret;
 *     do {
 *         cpu = rseq_current_index(rs, RSEQ_INDEX_CPU_ID);
 *         ret = rseq_load_add_store(rs, RSEQ_INDEX_CPU_ID, &slots[cpu].value, 1, cpu);
 *     } while (ret < 0);
 *
 * Where rseq is unusable (rs == NULL, or RSEQ_ARCH_HAS_CS == 0) use the
 * rseq_percpu_* helpers below, which fall back to percpu_fallback.h
 * (atomics on the slot of sched_getcpu()); read the mixing rule there.
 *
 * Delay injection: see inject.h (compiled out unless RSEQ_INJECT).
 */
#ifndef RSEQ_PY_PERCPU_H
#define RSEQ_PY_PERCPU_H

#include <sched.h>
#include <stddef.h>
#include <stdint.h>

#include "arch.h"
#include "inject.h"

#ifndef _GNU_SOURCE
/* glibc declares it only under _GNU_SOURCE, which must be set before the
 * first system header; declaring it here keeps includers free of that rule. */
extern int sched_getcpu(void);
#endif

enum rseq_index_mode { RSEQ_INDEX_CPU_ID = 0, RSEQ_INDEX_MM_CID = 1 };

/* The index this thread runs on, as the kernel last published it: cpu_id_start
 * (always a valid CPU number, even before the first sequence) or mm_cid.
 * A volatile load: the kernel rewrites it behind the compiler's back. */
static inline int rseq_current_index(const struct rseq_abi *rs, enum rseq_index_mode mode)
{
    if (mode == RSEQ_INDEX_MM_CID)
        return (int)*(const volatile uint32_t *)&rs->mm_cid;
    return (int)*(const volatile uint32_t *)&rs->cpu_id_start;
}

#include "percpu_fallback.h"

#if RSEQ_ARCH_HAS_CS
/* One arch file per architecture with tested critical sections (x86-64,
 * arm64); it #errors unless included from here.  arch.h names it. */
#define RSEQ_PERCPU_DISPATCH 1
#ifndef RSEQ_ARCH_PERCPU_HEADER
#error "the architecture header sets RSEQ_ARCH_HAS_CS without RSEQ_ARCH_PERCPU_HEADER"
#endif
#include RSEQ_ARCH_PERCPU_HEADER
#undef RSEQ_PERCPU_DISPATCH
#define RSEQ_PERCPU_USE_CS(rs) ((rs) != NULL)
#else
#define RSEQ_PERCPU_USE_CS(rs) 0
#endif

/* ---------------------------------------------------------------------------
 * Dispatch: the sequence when this thread has an area and the architecture
 * has sequences, the fallback otherwise.  Same 0 / 1 / -1 contract; the
 * fallback never returns -1.  The index comes from rseq_percpu_index().
 * ------------------------------------------------------------------------- */

/* The index to derive addresses from: the rseq area's field when there is an
 * area, sched_getcpu() otherwise (0 if even that fails: the fallback is exact
 * on any slot). */
static inline int rseq_percpu_index(const struct rseq_abi *rs, enum rseq_index_mode mode)
{
    int cpu;

    if (rs)
        return rseq_current_index(rs, mode);
    cpu = sched_getcpu();
    return cpu < 0 ? 0 : cpu;
}

#if RSEQ_ARCH_HAS_CS
#define RSEQ_PERCPU_DISPATCH_OP(cs_call, fallback_call) \
    (RSEQ_PERCPU_USE_CS(rs) ? (cs_call) : (fallback_call))
#else
#define RSEQ_PERCPU_DISPATCH_OP(cs_call, fallback_call) ((void)rs, (void)mode, (void)cpu, (fallback_call))
#endif

static inline int rseq_percpu_load_cbne_store(struct rseq_abi *rs, enum rseq_index_mode mode,
                                              intptr_t *v, intptr_t expect, intptr_t newv,
                                              int cpu)
{
    return RSEQ_PERCPU_DISPATCH_OP(rseq_load_cbne_store(rs, mode, v, expect, newv, cpu),
                                   rseq_fallback_load_cbne_store(v, expect, newv));
}

static inline int rseq_percpu_load_add_store(struct rseq_abi *rs, enum rseq_index_mode mode,
                                             intptr_t *v, intptr_t count, int cpu)
{
    return RSEQ_PERCPU_DISPATCH_OP(rseq_load_add_store(rs, mode, v, count, cpu),
                                   rseq_fallback_load_add_store(v, count));
}

static inline int rseq_percpu_load_add_bov_store(struct rseq_abi *rs, enum rseq_index_mode mode,
                                                 intptr_t *v, intptr_t count, int cpu)
{
    return RSEQ_PERCPU_DISPATCH_OP(rseq_load_add_bov_store(rs, mode, v, count, cpu),
                                   rseq_fallback_load_add_bov_store(v, count));
}

/* owner: see percpu_fallback.h (NULL: process-local stripe). */
static inline int rseq_percpu_load_cbeq_store_load_store(struct rseq_abi *rs,
                                                         enum rseq_index_mode mode,
                                                         intptr_t *v, intptr_t expectnot,
                                                         ptrdiff_t next_offset,
                                                         intptr_t *loaded, intptr_t *owner,
                                                         int cpu)
{
    return RSEQ_PERCPU_DISPATCH_OP(
        rseq_load_cbeq_store_load_store(rs, mode, v, expectnot, next_offset, loaded, cpu),
        rseq_fallback_load_cbeq_store_load_store(v, expectnot, next_offset, loaded, owner));
}

static inline int rseq_percpu_load_cbne_store_store(struct rseq_abi *rs,
                                                    enum rseq_index_mode mode,
                                                    intptr_t *v, intptr_t expect,
                                                    intptr_t *p2, intptr_t v2,
                                                    intptr_t newv, intptr_t *owner, int cpu)
{
    return RSEQ_PERCPU_DISPATCH_OP(
        rseq_load_cbne_store_store(rs, mode, v, expect, p2, v2, newv, cpu),
        rseq_fallback_load_cbne_store_store(v, expect, p2, v2, newv, owner));
}

static inline int rseq_percpu_load_cbne_memcpy_store(struct rseq_abi *rs,
                                                     enum rseq_index_mode mode,
                                                     intptr_t *v, intptr_t expect,
                                                     void *dst, const void *src,
                                                     size_t len, intptr_t newv,
                                                     intptr_t *owner, int cpu)
{
    return RSEQ_PERCPU_DISPATCH_OP(
        rseq_load_cbne_memcpy_store(rs, mode, v, expect, dst, src, len, newv, cpu),
        rseq_fallback_load_cbne_memcpy_store(v, expect, dst, src, len, newv, owner));
}

/* ---------------------------------------------------------------------------
 * Per-CPU lists (LIFO), built on the primitives
 *
 * One struct rseq_list per index, in an array of `count` lists that covers
 * every index the mode can produce (CPUs configured, see
 * sysconf(_SC_NPROCESSORS_CONF); mm_cid is below that too).  A list lives in
 * one mode for its life (see the mixing rule): every user passes rs, or every
 * user passes NULL.  Nodes must stay readable while any list may hold them
 * (type-stable memory: a pop may read a node's next pointer just as another
 * CPU takes it).
 *
 * Push:  load head; store node->next = head; store head = node (commit)
 *        = rseq_load_cbne_store_store with the head read just before.
 * Pop:   load head; if (head == NULL) fail; load next = head->next;
 *        store head = next (commit) = rseq_load_cbeq_store_load_store.
 *        ABA-safe with rseq because the whole pop is one sequence on its own
 *        CPU's list: no other pop or push on that list can run in between
 *        without aborting it.  The fallback serialises pops on
 *        fallback_pop_owner (robust to a killed holder, see
 *        percpu_fallback.h), which lives in the list so it works across
 *        processes sharing the lists.
 * ------------------------------------------------------------------------- */

struct rseq_list_node {
    struct rseq_list_node *next;
};

struct rseq_list {
    struct rseq_list_node *head;
    intptr_t fallback_pop_owner; /* fallback only: pid of the popping process or 0 */
} __attribute__((aligned(64)));  /* one cache line each: no false sharing */

/* Push node on the list of the index this thread runs on.  Returns that
 * index, or -1 if it is not below count (node untouched). */
static inline int rseq_list_push(struct rseq_abi *rs, enum rseq_index_mode mode,
                                 struct rseq_list *lists, size_t count,
                                 struct rseq_list_node *node)
{
    for (;;) {
        int cpu = rseq_percpu_index(rs, mode);
        intptr_t *head;
        intptr_t expect;
        int ret;

        if (cpu < 0 || (size_t)cpu >= count)
            return -1;
        head = (intptr_t *)&lists[cpu].head;
        RSEQ_INJECT_C(7);
        expect = __atomic_load_n(head, __ATOMIC_RELAXED);
        RSEQ_INJECT_C(8);
        if (RSEQ_PERCPU_USE_CS(rs)) {
            ret = rseq_percpu_load_cbne_store_store(rs, mode, head, expect,
                                                    (intptr_t *)&node->next, expect,
                                                    (intptr_t)node, NULL, cpu);
        } else {
            /* node is private until the commit: no owner word needed. */
            __atomic_store_n(&node->next, (struct rseq_list_node *)expect, __ATOMIC_RELAXED);
            ret = rseq_fallback_load_cbne_store(head, expect, (intptr_t)node);
        }
        if (ret == 0)
            return cpu;
        if (ret < 0) {
            RSEQ_INJECT_ABORTED();
            RSEQ_INJECT_C(9);
        }
    }
}

/* Pop the top node of the list of the index this thread runs on.  Returns it,
 * or NULL if that list is empty.  *index_out (if not NULL) receives the index
 * used, or -1 if it was not below count (then NULL is returned). */
static inline struct rseq_list_node *rseq_list_pop(struct rseq_abi *rs,
                                                   enum rseq_index_mode mode,
                                                   struct rseq_list *lists, size_t count,
                                                   int *index_out)
{
    for (;;) {
        int cpu = rseq_percpu_index(rs, mode);
        intptr_t loaded = 0;
        int ret;

        if (index_out)
            *index_out = cpu;
        if (cpu < 0 || (size_t)cpu >= count) {
            if (index_out)
                *index_out = -1;
            return NULL;
        }
        RSEQ_INJECT_C(7);
        ret = rseq_percpu_load_cbeq_store_load_store(
            rs, mode, (intptr_t *)&lists[cpu].head, (intptr_t)NULL,
            offsetof(struct rseq_list_node, next), &loaded,
            &lists[cpu].fallback_pop_owner, cpu);
        if (ret == 0)
            return (struct rseq_list_node *)loaded;
        if (ret > 0)
            return NULL;
        RSEQ_INJECT_ABORTED();
        RSEQ_INJECT_C(9);
    }
}

#endif /* RSEQ_PY_PERCPU_H */
