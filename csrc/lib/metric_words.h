/*
 * metric_words.h - the per-CPU words of rseq.metrics: integer counts and
 * floating-point sums, plus the per-process gauge cells and the exemplar
 * cells.  Pure C; the binding is csrc/py/metrics.c, the file layout is
 * described in src/rseq/metrics/_storage.py.
 *
 * A metric word w is one 8-byte slot per possible CPU (slot of CPU c at
 * regions + c * region_size + w * 8, so CPUs never write each other's lines)
 * and one fallback lane lanes[w], written only with atomic instructions by
 * threads that cannot run a sequence.  rseq commits with plain stores, so
 * sequence writers and lane writers never share a word (the mixing rule of
 * percpu_fallback.h).
 *
 *   integer word  int64 slots, added with load_add_bov_store (counter_add of
 *                 counter.h): value = sum(slots) + lane, exact.
 *   float word    the bits of a double per slot, added with
 *                 load_cbne_store: load the slot, add in C, and commit the
 *                 new bits only if the thread is still on that CPU and the
 *                 slot still holds what was loaded; the lane is a CAS loop
 *                 on the double's bits.  value = sum of the doubles.
 *
 * Both loops are bounded: a thread whose sequences keep aborting (its
 * registration was lost behind our back, or a pathological signal storm)
 * adds to the lane instead, which is always correct.
 */
#ifndef RSEQ_METRIC_WORDS_H
#define RSEQ_METRIC_WORDS_H

#include <stdint.h>
#include <string.h>
#include <time.h>

#include "counter.h"
#include "percpu.h"
#include "thread_area.h"

/* Attempts of a sequence before a thread uses the lane instead. */
#define METRIC_MAX_ATTEMPTS 1000

struct metric_words {
    char *regions;          /* slot of CPU c, word w: regions + c * region_size + w * 8 */
    uint64_t region_size;
    uint32_t nslots;        /* possible CPUs */
    int64_t *lanes;         /* fallback lane of word w: lanes[w] */
};

static inline int64_t *metric_slot(const struct metric_words *m, uint32_t cpu, uint64_t w)
{
    return (int64_t *)(m->regions + (uint64_t)cpu * m->region_size + w * 8);
}

static inline double metric_bits_to_double(int64_t bits)
{
    double d;
    memcpy(&d, &bits, sizeof d);
    return d;
}

static inline int64_t metric_double_to_bits(double d)
{
    int64_t bits;
    memcpy(&bits, &d, sizeof bits);
    return bits;
}

/* Add n to integer word w: 0 done, 1 a slot would overflow (nothing added). */
static inline int metric_add_int(const struct metric_words *m, uint64_t w, int64_t n)
{
    struct counter_slots c = {
        .regions = m->regions, .region_size = m->region_size, .nslots = m->nslots,
        .index = (uint32_t)w, .fallback = &m->lanes[w], .baseline = NULL,
        .mode = RSEQ_INDEX_CPU_ID,
    };
    return counter_add(&c, n);
}

/* The lane of a float word: a CAS loop on the double's bits. */
static inline void metric_lane_add_double(int64_t *lane, double x)
{
    int64_t old = __atomic_load_n(lane, __ATOMIC_RELAXED);
    for (;;) {
        int64_t next = metric_double_to_bits(metric_bits_to_double(old) + x);
        if (__atomic_compare_exchange_n(lane, &old, next, 1, __ATOMIC_RELAXED,
                                        __ATOMIC_RELAXED))
            return;
    }
}

/* Add x to float word w: load, add, compare-and-commit on this CPU's slot. */
static inline void metric_add_double(const struct metric_words *m, uint64_t w, double x)
{
#if RSEQ_ARCH_HAS_CS
    struct rseq_abi *rs = counter_thread_area();
    if (__builtin_expect(rs != NULL, 1)) {
        for (int attempt = 0; attempt < METRIC_MAX_ATTEMPTS; attempt++) {
            int cpu = rseq_current_index(rs, RSEQ_INDEX_CPU_ID);
            if (__builtin_expect((uint32_t)cpu >= m->nslots, 0))
                break;
            intptr_t *slot = (intptr_t *)metric_slot(m, (uint32_t)cpu, w);
            intptr_t old = *(volatile intptr_t *)slot;
            intptr_t next = (intptr_t)metric_double_to_bits(
                metric_bits_to_double((int64_t)old) + x);
            /* 1 (the slot changed: a thread preempted us on this CPU and
             * added) and -1 (aborted) both mean: read again. */
            if (__builtin_expect(rseq_load_cbne_store(rs, RSEQ_INDEX_CPU_ID, slot, old, next,
                                                      cpu) == 0, 1))
                return;
        }
    }
#endif
    metric_lane_add_double(&m->lanes[w], x);
}

static inline __int128 metric_read_int(const struct metric_words *m, uint64_t w)
{
    __int128 sum = __atomic_load_n(&m->lanes[w], __ATOMIC_RELAXED);
    for (uint32_t cpu = 0; cpu < m->nslots; cpu++)
        sum += __atomic_load_n(metric_slot(m, cpu, w), __ATOMIC_RELAXED);
    return sum;
}

static inline double metric_read_double(const struct metric_words *m, uint64_t w)
{
    double sum = metric_bits_to_double(__atomic_load_n(&m->lanes[w], __ATOMIC_RELAXED));
    for (uint32_t cpu = 0; cpu < m->nslots; cpu++)
        sum += metric_bits_to_double(__atomic_load_n(metric_slot(m, cpu, w), __ATOMIC_RELAXED));
    return sum;
}

/* ---------------------------------------------------------------------------
 * Gauge cells: one per (series, process), written only by that process's
 * threads (atomics: several threads may share it).  gen is the process
 * entry's generation when the cell was bound: a reader shows the cell only
 * while it matches, so a reused process entry never shows a dead process's
 * values.
 * ------------------------------------------------------------------------- */

struct metric_cell {
    int64_t value;          /* double bits */
    int64_t timestamp;      /* double bits: seconds since the epoch of the last write */
    uint64_t gen;
    uint64_t reserved;
};

static inline double metric_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static inline void metric_cell_set(struct metric_cell *c, double v, int timestamped)
{
    __atomic_store_n(&c->value, metric_double_to_bits(v), __ATOMIC_RELAXED);
    if (timestamped)
        __atomic_store_n(&c->timestamp, metric_double_to_bits(metric_now()), __ATOMIC_RELAXED);
}

static inline void metric_cell_add(struct metric_cell *c, double x, int timestamped)
{
    metric_lane_add_double(&c->value, x);
    if (timestamped)
        __atomic_store_n(&c->timestamp, metric_double_to_bits(metric_now()), __ATOMIC_RELAXED);
}

/* ---------------------------------------------------------------------------
 * Exemplar cells: a sequence word (odd while written), value, timestamp and
 * up to METRIC_EXEMPLAR_LABELS bytes of label text.  A writer that finds the
 * cell being written drops its exemplar (exemplars are samples: one lost is
 * harmless, and nobody ever waits); readers retry a few times, then report
 * none.  A writer killed inside the tiny write leaves the cell odd: that
 * series shows no exemplar from then on (documented), nothing else breaks.
 * ------------------------------------------------------------------------- */

#define METRIC_EXEMPLAR_SIZE 640
#define METRIC_EXEMPLAR_LABELS (METRIC_EXEMPLAR_SIZE - 32)

struct metric_exemplar {
    uint64_t seq;
    int64_t value;
    int64_t timestamp;
    uint32_t length;
    uint32_t reserved;
    char labels[METRIC_EXEMPLAR_LABELS];
};

/* 0 written, 1 dropped (another writer was at it). */
static inline int metric_exemplar_write(struct metric_exemplar *e, const char *labels,
                                        uint32_t length, double value, double timestamp)
{
    uint64_t seq = __atomic_load_n(&e->seq, __ATOMIC_RELAXED);
    if (seq & 1)
        return 1;
    if (!__atomic_compare_exchange_n(&e->seq, &seq, seq + 1, 0, __ATOMIC_ACQUIRE,
                                     __ATOMIC_RELAXED))
        return 1;
    __atomic_thread_fence(__ATOMIC_RELEASE);
    __atomic_store_n(&e->value, metric_double_to_bits(value), __ATOMIC_RELAXED);
    __atomic_store_n(&e->timestamp, metric_double_to_bits(timestamp), __ATOMIC_RELAXED);
    __atomic_store_n(&e->length, length, __ATOMIC_RELAXED);
    for (uint32_t i = 0; i < length; i++)
        __atomic_store_n(&e->labels[i], labels[i], __ATOMIC_RELAXED);
    __atomic_store_n(&e->seq, seq + 2, __ATOMIC_RELEASE);
    return 0;
}

/* 1 read (a consistent copy in out), 0 none (never written, or busy). */
static inline int metric_exemplar_read(const struct metric_exemplar *e,
                                       struct metric_exemplar *out)
{
    for (int attempt = 0; attempt < 16; attempt++) {
        uint64_t before = __atomic_load_n(&e->seq, __ATOMIC_ACQUIRE);
        if (before == 0)
            return 0;
        if (before & 1)
            continue;
        out->value = __atomic_load_n(&e->value, __ATOMIC_RELAXED);
        out->timestamp = __atomic_load_n(&e->timestamp, __ATOMIC_RELAXED);
        out->length = __atomic_load_n(&e->length, __ATOMIC_RELAXED);
        if (out->length > METRIC_EXEMPLAR_LABELS)
            out->length = METRIC_EXEMPLAR_LABELS;
        for (uint32_t i = 0; i < out->length; i++)
            out->labels[i] = __atomic_load_n(&e->labels[i], __ATOMIC_RELAXED);
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        if (__atomic_load_n(&e->seq, __ATOMIC_RELAXED) == before)
            return 1;
    }
    return 0;
}

#endif /* RSEQ_METRIC_WORDS_H */
