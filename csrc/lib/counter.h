/*
 * counter.h - the exact per-CPU counter, shared by the in-process
 * PerCpuCounter and the shared-memory arena counters.
 *
 * A counter is
 *   - one int64 slot per possible CPU (or concurrency id), each in its CPU's
 *     own region, so that CPUs never write the same cache line: a thread
 *     adds to its CPU's slot with the load_add_bov_store critical section;
 *   - one fallback lane: threads without a usable rseq area add to it with an
 *     atomic instruction.  rseq commits with plain stores, so the two kinds
 *     of writer must never share a word (the mixing rule of
 *     percpu_fallback.h): a process where rseq is denied by seccomp can
 *     share an arena with processes that have it and every count stays exact;
 *   - a 128-bit baseline: what reset() has removed so far.
 *
 *   value = sum(slots) + fallback - baseline
 *
 * reset() reads the baseline, sums the slots (each slot read once, with a
 * single load), and installs the sum as the new baseline with a 16-byte
 * compare-and-swap; it returns what it removed.  An add that lands on a slot
 * after that slot was read stays in the value; one that landed before is in
 * what reset() returned: no increment is lost or counted twice, and no lock
 * is taken, so a process killed at any instant leaves nothing held.
 *
 * reset() cannot empty the slots (each belongs to its CPU's sequences), so
 * a slot may stay near the end of the int64 range after reset() has moved
 * its content into the baseline.  An add that its slot (or the fallback
 * lane) cannot take without overflowing therefore goes to the baseline
 * instead: baseline -= n adds n to the value, with one 16-byte
 * compare-and-swap that reset() sees like its own, so it stays exact and
 * lock-free.  That path refuses (OverflowError) only an add that would take
 * the counter's value out of the signed 64-bit range: after reset() every
 * add whose result fits is accepted, on every CPU.
 *
 * Lost registration: when the thread's rseq registration ends behind the
 * package's back (cpu_id becomes -1), counter_add sees it before the next
 * sequence, moves the thread to the fallback (info().fallback says why) and
 * adds to the fallback lane, which stays exact beside the rseq writers.
 */
#ifndef RSEQ_PY_COUNTER_H
#define RSEQ_PY_COUNTER_H

#include <stdint.h>

#include "percpu.h"
#include "thread_area.h"

struct counter_slots {
    char *regions;          /* slot of index i: regions + i * region_size + index * 8 */
    size_t region_size;
    uint32_t nslots;        /* number of regions: possible CPUs */
    uint32_t index;         /* this counter's slot within each region */
    int64_t *fallback;      /* lane of the writers without rseq */
    __int128 *baseline;     /* 16-byte aligned */
    enum rseq_index_mode mode;
};

static inline int64_t *counter_slot(const struct counter_slots *c, uint32_t cpu)
{
    return (int64_t *)(c->regions + (size_t)cpu * c->region_size + (size_t)c->index * 8);
}

static inline __int128 counter_sum(const struct counter_slots *c);
static inline __int128 counter_baseline(const struct counter_slots *c);

/* Add n through the baseline (see the top of this file): 0 done, 1 the
 * value would leave the signed 64-bit range (nothing added).  The range
 * check reads a snapshot of the value; the add itself is exact.  Lock-free:
 * the compare-and-swap fails only when another reset() or spill succeeded. */
static inline int counter_spill(const struct counter_slots *c, int64_t n)
{
    __int128 old = counter_baseline(c);
    for (;;) {
        __int128 value = counter_sum(c) - old + n;
        if (value > INT64_MAX || value < INT64_MIN)
            return 1;
        if (rseq_arch_cas128(c->baseline, &old, old - n))
            return 0;
    }
}

/* Add n: 0 done, 1 the value would leave the signed 64-bit range (nothing
 * added). */
static inline int counter_add(const struct counter_slots *c, int64_t n)
{
#if RSEQ_ARCH_HAS_CS
    struct rseq_abi *rs = counter_thread_area();
    if (__builtin_expect(rs != NULL, 1)) {
        for (unsigned int aborts = 0; aborts < RSEQ_PERCPU_MAX_ABORTS; aborts++) {
            /* Before each sequence: a lost area aborts cpu_id sequences
             * forever and lets mm_cid ones commit on slot 0 unprotected. */
            if (__builtin_expect(rseq_area_lost(rs), 0)) {
                counter_thread_area_recheck();
                break;
            }
            int cpu = rseq_current_index(rs, c->mode);
            RSEQ_INJECT_C(7);
            /* cpu_id_start and mm_cid are below the possible-CPU count; the
             * check only keeps a broken kernel from sending us out of bounds. */
            if (__builtin_expect((uint32_t)cpu >= c->nslots, 0))
                break;
            int ret = rseq_load_add_bov_store(rs, c->mode, (intptr_t *)counter_slot(c, cpu),
                                              n, cpu);
            if (__builtin_expect(ret == 0, 1))
                return 0;
            if (ret > 0)
                return counter_spill(c, n);
            RSEQ_INJECT_ABORTED();
            RSEQ_INJECT_C(9);
        }
        /* Lost, or RSEQ_PERCPU_MAX_ABORTS aborts in a row: this add takes
         * the fallback lane (its own words: exact beside the sequences). */
    }
#endif
    /* The fallback lane: an atomic add that refuses to overflow. */
    if (rseq_fallback_load_add_bov_store((intptr_t *)c->fallback, n) == 0)
        return 0;
    return counter_spill(c, n);
}

static inline __int128 counter_sum(const struct counter_slots *c)
{
    __int128 sum = __atomic_load_n(c->fallback, __ATOMIC_RELAXED);
    for (uint32_t cpu = 0; cpu < c->nslots; cpu++)
        sum += __atomic_load_n(counter_slot(c, cpu), __ATOMIC_RELAXED);
    return sum;
}

static inline __int128 counter_baseline(const struct counter_slots *c)
{
    __int128 seen = 0;
    /* A CAS that installs the value it found is an atomic 16-byte load. */
    rseq_arch_cas128(c->baseline, &seen, 0);
    return seen;
}

static inline __int128 counter_value(const struct counter_slots *c)
{
    __int128 baseline = counter_baseline(c);
    return counter_sum(c) - baseline;
}

/* Remove everything counted so far; returns what was removed. */
static inline __int128 counter_reset(const struct counter_slots *c)
{
    __int128 old = counter_baseline(c);
    for (;;) {
        __int128 sum = counter_sum(c);
        if (rseq_arch_cas128(c->baseline, &old, sum))
            return sum - old;
        /* Another reset() installed its sum: `old` now holds it. */
    }
}

#endif /* RSEQ_PY_COUNTER_H */
