/*
 * ring.h - the per-CPU event ring in shared memory (rseq.Ring): many
 * producers (threads and processes), one consumer, nothing a killed process
 * can leave half-done.
 *
 * One lane per possible CPU plus one fallback lane.  A lane is a byte ring
 * of `size` bytes (a power of two) followed by `slack` bytes (one maximal
 * record), so that a record that starts near the end runs on into the slack
 * instead of wrapping: every record is contiguous, and one memcpy writes it.
 *
 * Positions are byte counts since creation, kept modulo 2^32 (the ring is at
 * most 2^30 bytes, so differences of live positions are exact).  The commit
 * word of a lane packs the number of records committed (mod 2^32) with the
 * position after the last one:
 *
 *     head = seq32 << 32 | pos32
 *
 * Producer (one sequence on the lane of the CPU it runs on):
 *
 *     h = head; t = tail                   (C, before the sequence)
 *     if h.pos + need - t > size: drop     (tail only grows: a stale t is
 *                                           conservative, never wrong)
 *     build the record in private memory (length, seq = h.seq, time, pid)
 *     rseq_load_cbne_memcpy_store(&head, h, data + h.pos % size, record,
 *                                 need, (h.seq + 1) << 32 | h.pos + need)
 *
 * The copy lands past the committed head, where nobody reads, and the
 * single committing store publishes it: a producer preempted, migrated,
 * signalled or killed at any instant has either committed a whole record
 * or left nothing visible.  Two producers on one CPU never overlap (the
 * kernel aborts the one that was interrupted), so the lane needs no lock
 * and no atomic instruction.
 *
 * Drops ("drop" policy, the default) are counted with a per-CPU add
 * (rseq_load_add_store) on the lane's `dropped` word.
 *
 * Overwrite ("overwrite" policy, a flight recorder): the producer never
 * looks at the consumer.  Instead each lane keeps `oldest`, the first record
 * no writer may touch (a 16-byte {seq, pos} advanced only by a 16-byte CAS,
 * only forward, only to record boundaries), with the invariant
 *
 *     oldest.pos >= head.pos + slack - size
 *
 * so that every write, committed or in flight (at most `slack` bytes past
 * head), lands physically below oldest.  Before a producer commits a record
 * of `need` bytes it walks oldest forward over whole records until
 * oldest.pos >= h.pos + need + slack - size; the walk reads records that the
 * invariant protects, and is checked against head before the CAS.  The
 * consumer copies a record, then re-reads oldest: if oldest passed the
 * record meanwhile, the copy may be torn and is thrown away, and the
 * records between the consumer and oldest are counted as overwritten (the
 * sequence numbers tell exactly how many).
 *
 * Threads without rseq (no kernel support, seccomp, an unregistered thread,
 * a lost registration (rseq_area_lost, checked before every attempt through
 * RSEQ_PERCPU_USE_CS), an index out of range, or RING_SPIN_LIMIT aborts in
 * a row) use the fallback lane, where writers serialise on a robust owner
 * word (percpu_fallback.h): rseq and fallback writers never share a lane,
 * which is the mixing rule of percpu_fallback.h.
 *
 * Consumer: one at a time (a lease in the file).  Its position per lane is
 * double-buffered (two slots and a version, so a consumer killed mid-update
 * leaves the previous complete state) and published to producers in
 * `tail` only after the version flips.  Records it has taken but not yet
 * acknowledged stay in the ring (tail does not move): a new consumer takes
 * them again.
 *
 * Wake-ups: a consumer about to sleep sets `waiting`, fences, re-checks the
 * lanes and sleeps on the futex word `wake_seq`.  A producer, after its
 * commit, fences and reads `waiting`: only when it is set does it pay an
 * atomic exchange and a FUTEX_WAKE.
 */
#ifndef RSEQ_PY_RING_H
#define RSEQ_PY_RING_H

#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "percpu.h"

/* ---------------------------------------------------------------------------
 * Layout (shared with src/rseq/_ring.py, which reads these through _core)
 * ------------------------------------------------------------------------- */

#define RING_RECORD_HEADER 24u  /* u32 length, u32 seq, u64 time ns, u32 pid, u32 cpu */
#define RING_ALIGN 8u
#define RING_LANE_CONTROL 512u  /* control block before each lane's data */
#define RING_CONTROL_LEASE 0u   /* {u64 pid, u64 start time}, 16-byte CAS */
#define RING_CONTROL_WAKE 128u  /* u32 wake_seq (futex word) */
#define RING_CONTROL_WAITING 192u /* u32 waiting */
#define RING_CONTROL_SIZE 256u
#define RING_MAX_SIZE (1u << 30)
#define RING_SPIN_LIMIT 1000    /* aborts in a row before a put takes the fallback lane */
#define RING_WALK_LIMIT (1u << 24)

struct ring_record {
    uint32_t length;
    uint32_t seq;
    uint64_t time_ns;
    uint32_t pid;
    uint32_t cpu;
};

struct ring_cursor {
    uint64_t pos;      /* position of the next record (low 32 bits used) */
    uint64_t passed;   /* records passed: consumed or overwritten */
    uint64_t consumed; /* records acknowledged by a consumer */
};

struct ring_lane {
    /* written by the producers of this CPU */
    uint64_t head;                          /* seq32 << 32 | pos32 */
    int64_t dropped;
    char pad0[112];
    /* overwrite policy: first protected record; 16-byte CAS only */
    __int128 oldest __attribute__((aligned(16))); /* low: seq64, high: pos */
    intptr_t fallback_owner;                /* fallback lane: owner word */
    char pad1[104];
    /* written by the consumer only */
    uint64_t tail;                          /* published position for producers */
    uint64_t version;                       /* slot[version & 1] is current */
    struct ring_cursor slot[2];
    char pad2[256 - 16 - 2 * sizeof(struct ring_cursor)];
};

_Static_assert(sizeof(struct ring_lane) == RING_LANE_CONTROL, "lane control is 512 bytes");
_Static_assert(offsetof(struct ring_lane, oldest) == 128, "oldest on its own line");
_Static_assert(offsetof(struct ring_lane, tail) == 256, "consumer lines");

struct ring {
    char *control;          /* lease, futex word, waiting flag */
    char *lanes;            /* lane i at lanes + i * lane_stride */
    uint64_t lane_stride;
    uint32_t ncpu;          /* lanes 0..ncpu-1 per CPU, lane ncpu the fallback */
    uint32_t size;          /* bytes of ring per lane, a power of two */
    uint32_t slack;         /* = max_total */
    uint32_t max_record;    /* payload bytes */
    int overwrite;
    int timestamps;
};

static inline uint32_t ring_record_size(uint32_t length)
{
    return (RING_RECORD_HEADER + length + RING_ALIGN - 1) & ~(RING_ALIGN - 1);
}

static inline struct ring_lane *ring_lane(const struct ring *r, uint32_t i)
{
    return (struct ring_lane *)(r->lanes + (uint64_t)i * r->lane_stride);
}

static inline char *ring_data(struct ring_lane *lane)
{
    return (char *)lane + RING_LANE_CONTROL;
}

static inline uint32_t *ring_wake_word(const struct ring *r)
{
    return (uint32_t *)(r->control + RING_CONTROL_WAKE);
}

static inline uint32_t *ring_waiting_word(const struct ring *r)
{
    return (uint32_t *)(r->control + RING_CONTROL_WAITING);
}

static inline uint32_t ring_head_pos(uint64_t h) { return (uint32_t)h; }
static inline uint32_t ring_head_seq(uint64_t h) { return (uint32_t)(h >> 32); }

/* a is after b (positions or sequence numbers modulo 2^32) */
static inline int ring_after(uint32_t a, uint32_t b) { return (int32_t)(a - b) > 0; }

/* The oldest-record word, read without writing (a read-only mapping may
 * read it): seq, pos, seq again until seq is stable.  Every update raises
 * seq, so a stable seq brackets a consistent pos. */
static inline void ring_read_oldest(struct ring_lane *lane, uint64_t *seq, uint32_t *pos)
{
    volatile uint64_t *w = (volatile uint64_t *)&lane->oldest;
    for (;;) {
        uint64_t s1 = __atomic_load_n((uint64_t *)&w[0], __ATOMIC_ACQUIRE);
        uint64_t p = __atomic_load_n((uint64_t *)&w[1], __ATOMIC_ACQUIRE);
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        uint64_t s2 = __atomic_load_n((uint64_t *)&w[0], __ATOMIC_RELAXED);
        if (s1 == s2) {
            *seq = s1;
            *pos = (uint32_t)p;
            return;
        }
    }
}

/* The consumer's published cursor (seqlock over the two slots). */
static inline struct ring_cursor ring_read_cursor(struct ring_lane *lane)
{
    struct ring_cursor c;
    for (;;) {
        uint64_t v1 = __atomic_load_n(&lane->version, __ATOMIC_ACQUIRE);
        struct ring_cursor *s = &lane->slot[v1 & 1];
        c.pos = __atomic_load_n(&s->pos, __ATOMIC_RELAXED);
        c.passed = __atomic_load_n(&s->passed, __ATOMIC_RELAXED);
        c.consumed = __atomic_load_n(&s->consumed, __ATOMIC_RELAXED);
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        if (__atomic_load_n(&lane->version, __ATOMIC_RELAXED) == v1)
            return c;
    }
}

/* The consumer publishes a new cursor: the free slot, then the version,
 * then the tail producers read.  Killed anywhere in between, the previous
 * cursor stays the current one; a tail that lags is only conservative. */
static inline void ring_write_cursor(struct ring_lane *lane, const struct ring_cursor *c)
{
    uint64_t v = __atomic_load_n(&lane->version, __ATOMIC_RELAXED);
    struct ring_cursor *s = &lane->slot[(v + 1) & 1];
    __atomic_store_n(&s->pos, c->pos, __ATOMIC_RELAXED);
    __atomic_store_n(&s->passed, c->passed, __ATOMIC_RELAXED);
    __atomic_store_n(&s->consumed, c->consumed, __ATOMIC_RELAXED);
    __atomic_store_n(&lane->version, v + 1, __ATOMIC_RELEASE);
    __atomic_store_n(&lane->tail, c->pos, __ATOMIC_RELEASE);
}

/* ---------------------------------------------------------------------------
 * Wake-ups
 * ------------------------------------------------------------------------- */

static inline long ring_futex(uint32_t *word, int op, uint32_t value,
                              const struct timespec *timeout)
{
    /* Not FUTEX_PRIVATE_FLAG: the word is in a file shared by processes. */
    return syscall(SYS_futex, word, op, value, timeout, NULL, 0);
}

static inline void ring_wake(const struct ring *r)
{
    uint32_t *waiting = ring_waiting_word(r);
    if (__atomic_exchange_n(waiting, 0, __ATOMIC_ACQ_REL)) {
        __atomic_fetch_add(ring_wake_word(r), 1, __ATOMIC_RELEASE);
        ring_futex(ring_wake_word(r), FUTEX_WAKE, INT_MAX, NULL);
    }
}

/* After a commit: Dekker with the consumer's "waiting = 1; fence; look".
 * Both sides fence between their store and their load, so either the
 * producer sees the flag or the consumer sees the record. */
static inline void ring_after_commit(const struct ring *r)
{
#ifndef RING_NOFENCE
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
#endif
    if (__builtin_expect(__atomic_load_n(ring_waiting_word(r), __ATOMIC_RELAXED) != 0, 0))
        ring_wake(r);
}

/* ---------------------------------------------------------------------------
 * Producer
 * ------------------------------------------------------------------------- */

enum { RING_PUT_COMMITTED = 1, RING_PUT_DROPPED = 0, RING_PUT_CORRUPT = -1 };

/* Overwrite policy: make oldest.pos >= limit (walking whole records of the
 * lane from the current oldest), unless head moved meanwhile.  0 done (or
 * nothing to do), 1 retry (head or oldest moved), -1 the lane is corrupt. */
static inline int ring_expire(const struct ring *r, struct ring_lane *lane, uint64_t h,
                              uint32_t limit)
{
    uint64_t seq;
    uint32_t pos;
    ring_read_oldest(lane, &seq, &pos);
    if (!ring_after(limit, pos))
        return 0;
    uint64_t wseq = seq;
    uint32_t wpos = pos;
    const char *data = ring_data(lane);
    uint32_t steps = 0;
    while (ring_after(limit, wpos)) {
        if (wpos == ring_head_pos(h) || ++steps > RING_WALK_LIMIT)
            return -1; /* size >= 2 * slack makes limit <= head: never reached */
        const struct ring_record *rec =
            (const struct ring_record *)(data + (wpos & (r->size - 1)));
        uint32_t length = __atomic_load_n(&rec->length, __ATOMIC_RELAXED);
        if (length > r->max_record)
            return __atomic_load_n(&lane->head, __ATOMIC_ACQUIRE) == h ? -1 : 1;
        wpos += ring_record_size(length);
        wseq++;
    }
    /* Everything read above was protected only while head == h. */
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    if (__atomic_load_n(&lane->head, __ATOMIC_RELAXED) != h)
        return 1;
    __int128 expect = (__int128)(((unsigned __int128)pos << 64) | seq);
    __int128 desired = (__int128)(((unsigned __int128)wpos << 64) | wseq);
    if (!rseq_arch_cas128(&lane->oldest, &expect, desired))
        return 1;
    /* The CAS before any store of the copy that it makes safe. */
    __atomic_thread_fence(__ATOMIC_RELEASE);
    return 0;
}

/* Put one record.  `record` is private memory of at least
 * ring_record_size(length) bytes whose payload (after the header) the
 * caller has filled; the header is filled here on every attempt.  `rs` is
 * the thread's area or NULL.  Returns RING_PUT_COMMITTED, RING_PUT_DROPPED
 * (drop policy, lane full) or RING_PUT_CORRUPT. */
static inline int ring_put_record(const struct ring *r, struct rseq_abi *rs, char *record,
                                  uint32_t length, uint32_t pid)
{
    struct ring_record *hdr = (struct ring_record *)record;
    uint32_t need = ring_record_size(length);
    unsigned int aborts = 0;

    hdr->length = length;
    hdr->pid = pid;
    if (r->timestamps) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        hdr->time_ns = (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
    } else {
        hdr->time_ns = 0;
    }
    for (;;) {
        int use_cs = RSEQ_PERCPU_USE_CS(rs) && aborts < RING_SPIN_LIMIT;
        int cpu = use_cs ? rseq_current_index(rs, RSEQ_INDEX_CPU_ID) : (int)r->ncpu;
        if ((uint32_t)cpu >= r->ncpu) {
            use_cs = 0;
            cpu = (int)r->ncpu;
        }
        struct ring_lane *lane = ring_lane(r, (uint32_t)cpu);
        RSEQ_INJECT_C(7);
        uint64_t h = __atomic_load_n(&lane->head, __ATOMIC_ACQUIRE);
        uint32_t pos = ring_head_pos(h);
        if (r->overwrite) {
            int ret = ring_expire(r, lane, h, pos + need + r->slack - r->size);
            if (ret < 0)
                return RING_PUT_CORRUPT;
            if (ret > 0)
                continue;
        } else {
            uint32_t tail = (uint32_t)__atomic_load_n(&lane->tail, __ATOMIC_ACQUIRE);
            if ((uint32_t)(pos - tail) + need > r->size) {
                int ret;
#if RSEQ_ARCH_HAS_CS
                if (use_cs)
                    ret = rseq_load_add_store(rs, RSEQ_INDEX_CPU_ID, (intptr_t *)&lane->dropped,
                                              1, cpu);
                else
#endif
                    ret = rseq_fallback_load_add_store((intptr_t *)&lane->dropped, 1);
                if (ret == 0)
                    return RING_PUT_DROPPED;
                aborts++;
                RSEQ_INJECT_ABORTED();
                RSEQ_INJECT_C(9);
                continue;
            }
        }
        hdr->seq = ring_head_seq(h);
        hdr->cpu = (uint32_t)cpu;
        RSEQ_INJECT_C(8);
        char *dst = ring_data(lane) + (pos & (r->size - 1));
        uint64_t newh = ((uint64_t)(ring_head_seq(h) + 1) << 32) | (uint32_t)(pos + need);
        int ret;
        if (use_cs) {
#if RSEQ_ARCH_HAS_CS
            ret = rseq_load_cbne_memcpy_store(rs, RSEQ_INDEX_CPU_ID, (intptr_t *)&lane->head,
                                              (intptr_t)h, dst, record, need,
                                              (intptr_t)newh, cpu);
#else
            ret = 1;
#endif
        } else {
            ret = rseq_fallback_load_cbne_memcpy_store((intptr_t *)&lane->head, (intptr_t)h,
                                                       dst, record, need, (intptr_t)newh,
                                                       &lane->fallback_owner);
        }
        if (__builtin_expect(ret == 0, 1)) {
            ring_after_commit(r);
            return RING_PUT_COMMITTED;
        }
        if (ret < 0) {
            aborts++;
            RSEQ_INJECT_ABORTED();
            RSEQ_INJECT_C(9);
        }
        /* ret 1: another producer committed first: look again */
    }
}

/* ---------------------------------------------------------------------------
 * Consumer helpers
 * ------------------------------------------------------------------------- */

/* The record at the consumer's position, if one is committed there:
 * 1 and *rec, *payload set; 0 the lane is empty; -1 corrupt (drop policy:
 * nothing can overwrite a record before the consumer passes it). */
static inline int ring_peek(const struct ring *r, struct ring_lane *lane, uint32_t pos,
                            uint32_t expect_seq, uint64_t head, struct ring_record *rec,
                            const char **payload)
{
    if (pos == ring_head_pos(head))
        return 0;
    const char *at = ring_data(lane) + (pos & (r->size - 1));
    memcpy(rec, at, sizeof *rec);
    if (rec->length > r->max_record || rec->seq != expect_seq
        || ring_after(pos + ring_record_size(rec->length), ring_head_pos(head)))
        return -1;
    *payload = at + RING_RECORD_HEADER;
    return 1;
}

#endif /* RSEQ_PY_RING_H */
