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
 * The usual retry loop, bounded, and leaving when the registration is lost
 * (see rseq_area_lost: a lost area makes cpu_id sequences abort forever):
 *
 *     int cpu, ret = -1;
 *     for (unsigned int n = 0; ret < 0 && n < RSEQ_PERCPU_MAX_ABORTS; n++) {
 *         if (rseq_area_lost(rs))
 *             break;
 *         cpu = rseq_current_index(rs, RSEQ_INDEX_CPU_ID);
 *         ret = rseq_load_add_store(rs, RSEQ_INDEX_CPU_ID, &slots[cpu].value, 1, cpu);
 *     }
 *     if (ret < 0) ... take the fallback (its own words, see the mixing rule)
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

/* Whether the kernel has stopped maintaining the area for the calling
 * thread: its registration was ended (rseq(2) RSEQ_FLAG_UNREGISTER by
 * anyone in the thread, librseq's rseq_unregister_current_thread()).  The
 * kernel then leaves cpu_id at -1 and cpu_id_start and mm_cid at 0: every
 * cpu_id sequence aborts forever, and an mm_cid sequence would commit on
 * index 0 with nothing to restart it.  Only the thread itself can end its
 * registration, so checking before each sequence is enough; the one gap is
 * a signal handler that unregisters between the check and the sequence
 * (then one mm_cid sequence runs unprotected).  */
static inline int rseq_area_lost(const struct rseq_abi *rs)
{
    return (int32_t)*(const volatile uint32_t *)&rs->cpu_id < 0;
}

/* The bound of every retry loop in this package: after this many aborts in
 * a row on a live registration (a storm of signals or preemptions, or an
 * area someone else scribbles on), the operation stops retrying and takes
 * its fallback or reports failure. */
#define RSEQ_PERCPU_MAX_ABORTS (1u << 20)

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
/* A lost registration takes the fallback too (see rseq_area_lost). */
#define RSEQ_PERCPU_USE_CS(rs) ((rs) != NULL && !rseq_area_lost(rs))
#else
#define RSEQ_PERCPU_USE_CS(rs) 0
#endif

/* ---------------------------------------------------------------------------
 * Dispatch: the sequence when this thread has an area and the architecture
 * has sequences, the fallback otherwise.  Same 0 / 1 / -1 contract; the
 * fallback never returns -1.  The index comes from rseq_percpu_index().
 * ------------------------------------------------------------------------- */

/* The index to derive addresses from: the rseq area's field when there is a
 * live area, sched_getcpu() otherwise (0 if even that fails: the fallback is
 * exact on any slot). */
static inline int rseq_percpu_index(const struct rseq_abi *rs, enum rseq_index_mode mode)
{
    int cpu;

    if (rs && !rseq_area_lost(rs))
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

#endif /* RSEQ_PY_PERCPU_H */
