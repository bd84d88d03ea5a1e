/*
 * percpu_fallback.h - the portable fallback of every per-CPU primitive.
 *
 * Used where rseq critical sections cannot run: no rseq in the kernel, a
 * seccomp filter that denies it, a thread nobody registered, or an
 * architecture whose assembly has not been tested yet (RSEQ_ARCH_HAS_CS 0).
 * Each function is the primitive of the same name without the rs, mode and
 * cpu arguments: it works on the address the caller derived from
 * sched_getcpu() (or any index), with __atomic builtins, so the result is
 * exact however threads and processes move between CPUs.  Results: 0
 * committed, 1 compare failed; never -1 (there is no sequence to abort).
 *
 * MIXING RULE.  The rseq sequences commit with plain stores, correct only
 * because no other writer can touch the same CPU's words during the
 * sequence.  A fallback writer (an atomic read-modify-write from whatever CPU
 * the thread moved to) breaks that assumption, so rseq users and fallback
 * users must never write the same words.  Give fallback writers their own
 * lane (the counter layer does: a separate array of slots), or choose one
 * mode per data structure for its whole life.
 *
 * Exclusion for the multi-word operations (list pop, store_store, memcpy).
 * A CAS alone is not enough for them: a list pop needs the next pointer of a
 * head that may have been popped and pushed back meanwhile (ABA), and a copy
 * from a loser may land after the winner has committed.  They serialise on an
 * owner word: 0 free, otherwise the pid of the process holding it.  A waiter
 * that spins long checks with kill(pid, 0) whether the owner still exists,
 * and takes the word over when it does not, so a process killed while
 * holding it (kill -9, OOM) never leaves the structure unusable.  Taking
 * over is safe because every owner commits with a single CAS: a dead owner
 * either committed or did not, and left nothing half-done in the committed
 * state.  (Caveat: if the dead owner's pid is reused by a live process before
 * anyone notices, waiters spin until that process exits.)  Pushes stay
 * lock-free: a push only adds a node on top, which cannot break a pop that
 * holds the owner word.
 */
#ifndef RSEQ_PY_PERCPU_FALLBACK_H
#define RSEQ_PY_PERCPU_FALLBACK_H

#include <errno.h>
#include <sched.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>

/* ---------------------------------------------------------------------------
 * Owner words (robust against the death of the holder)
 * ------------------------------------------------------------------------- */

#define RSEQ_FALLBACK_SPINS_BEFORE_YIELD 64
#define RSEQ_FALLBACK_YIELDS_BEFORE_CHECK 64

static inline void rseq_fallback_own(intptr_t *owner)
{
    intptr_t self = (intptr_t)getpid();
    unsigned int spins = 0;

    for (;;) {
        intptr_t current = 0;
        if (__atomic_compare_exchange_n(owner, &current, self, 0,
                                        __ATOMIC_ACQUIRE, __ATOMIC_RELAXED))
            return;
        spins++;
        if (spins < RSEQ_FALLBACK_SPINS_BEFORE_YIELD)
            continue;
        sched_yield();
        if (spins % RSEQ_FALLBACK_YIELDS_BEFORE_CHECK != 0 || current == self)
            continue;
        /* The owner word names a process: if it is gone, take over. */
        if (kill((pid_t)current, 0) == -1 && errno == ESRCH)
            __atomic_compare_exchange_n(owner, &current, 0, 0,
                                        __ATOMIC_RELAXED, __ATOMIC_RELAXED);
    }
}

static inline void rseq_fallback_disown(intptr_t *owner)
{
    __atomic_store_n(owner, 0, __ATOMIC_RELEASE);
}

/* Owner words for callers that pass none: a process-local table striped by
 * the address of the committed word.  Exact among the fallback users of one
 * process; fallback users in several processes sharing memory must pass an
 * owner word that lives in the shared memory.  One table per translation
 * unit (static): every TU that touches a given word must be the same one, or
 * pass an explicit owner word.  */
#define RSEQ_FALLBACK_STRIPES 64
static intptr_t rseq_fallback_stripes[RSEQ_FALLBACK_STRIPES][8] __attribute__((unused));

static inline intptr_t *rseq_fallback_owner_for(intptr_t *owner, const void *v)
{
    if (owner)
        return owner;
    return rseq_fallback_stripes[((uintptr_t)v >> 3) % RSEQ_FALLBACK_STRIPES];
}

/* ---------------------------------------------------------------------------
 * The primitives
 * ------------------------------------------------------------------------- */

/* load v; if (*v != expect) fail; store newv to *v (commit) */
static inline int rseq_fallback_load_cbne_store(intptr_t *v, intptr_t expect, intptr_t newv)
{
    return __atomic_compare_exchange_n(v, &expect, newv, 0, __ATOMIC_SEQ_CST,
                                       __ATOMIC_RELAXED) ? 0 : 1;
}

/* load v; add count; store (commit) */
static inline int rseq_fallback_load_add_store(intptr_t *v, intptr_t count)
{
    __atomic_fetch_add(v, count, __ATOMIC_RELAXED);
    return 0;
}

/* load v; add count; if (signed overflow) fail; store (commit) */
static inline int rseq_fallback_load_add_bov_store(intptr_t *v, intptr_t count)
{
    intptr_t old = __atomic_load_n(v, __ATOMIC_RELAXED);
    intptr_t sum;

    do {
        if (__builtin_add_overflow(old, count, &sum))
            return 1;
    } while (!__atomic_compare_exchange_n(v, &old, sum, 1, __ATOMIC_RELAXED,
                                          __ATOMIC_RELAXED));
    return 0;
}

/* load h = *v; if (h == expectnot) fail; store h to *loaded;
 * load n = *(h + next_offset); store n to *v (commit)
 * Poppers serialise on *owner (NULL: the process-local stripe); pushers that
 * use rseq_fallback_load_cbne_store on *v need not. */
static inline int rseq_fallback_load_cbeq_store_load_store(intptr_t *v, intptr_t expectnot,
                                                           ptrdiff_t next_offset,
                                                           intptr_t *loaded,
                                                           intptr_t *owner)
{
    intptr_t *own = rseq_fallback_owner_for(owner, v);
    intptr_t head, next;

    rseq_fallback_own(own);
    head = __atomic_load_n(v, __ATOMIC_ACQUIRE);
    do {
        if (head == expectnot) {
            rseq_fallback_disown(own);
            return 1;
        }
        /* Safe to dereference: only the owner removes nodes, so head is
         * still on the list (a failed CAS below means a push, not a pop). */
        next = __atomic_load_n((intptr_t *)(head + next_offset), __ATOMIC_RELAXED);
    } while (!__atomic_compare_exchange_n(v, &head, next, 0, __ATOMIC_ACQ_REL,
                                          __ATOMIC_ACQUIRE));
    *loaded = head;
    rseq_fallback_disown(own);
    return 0;
}

/* load v; if (*v != expect) fail; store v2 to *p2; store newv to *v (commit)
 * Writers serialise on *owner (NULL: the process-local stripe), so a loser's
 * speculative store never lands after a winner's commit. */
static inline int rseq_fallback_load_cbne_store_store(intptr_t *v, intptr_t expect,
                                                      intptr_t *p2, intptr_t v2,
                                                      intptr_t newv, intptr_t *owner)
{
    intptr_t *own = rseq_fallback_owner_for(owner, v);
    int ret = 1;

    rseq_fallback_own(own);
    if (__atomic_load_n(v, __ATOMIC_ACQUIRE) == expect) {
        __atomic_store_n(p2, v2, __ATOMIC_RELAXED);
        ret = rseq_fallback_load_cbne_store(v, expect, newv);
    }
    rseq_fallback_disown(own);
    return ret;
}

/* load v; if (*v != expect) fail; memcpy(dst, src, len); store newv to *v (commit)
 * Same exclusion as store_store. */
static inline int rseq_fallback_load_cbne_memcpy_store(intptr_t *v, intptr_t expect,
                                                       void *dst, const void *src,
                                                       size_t len, intptr_t newv,
                                                       intptr_t *owner)
{
    intptr_t *own = rseq_fallback_owner_for(owner, v);
    int ret = 1;

    rseq_fallback_own(own);
    if (__atomic_load_n(v, __ATOMIC_ACQUIRE) == expect) {
        memcpy(dst, src, len);
        ret = rseq_fallback_load_cbne_store(v, expect, newv);
    }
    rseq_fallback_disown(own);
    return ret;
}

#endif /* RSEQ_PY_PERCPU_FALLBACK_H */
