/*
 * primitive_workers.c - stress workers for each per-CPU primitive of
 * percpu.h, for `python -m rseq stress` (the test build rseq._inject).
 *
 * The harness (src/rseq/_stress.py, primitive_case()) lays out a shared
 * buffer with primitive_init(), starts workers (threads, or forked processes
 * on the same MAP_SHARED mapping) that each call primitive_run() with the GIL
 * released, widens one injection point and disturbs them (yields, sleeps,
 * signal storms, migration), then asks primitive_check() for (expected, got):
 * equal when every operation was exact.  The per-operation loops and checks
 * follow tests/c/param_test.c:
 *
 *   cbne         load_cbne_store used as a counter, the expected value read
 *                in C (so compare failures happen):
 *                expected = ops, got = sum of the cells
 *   add          load_add_store, +1 per operation: same check
 *   bov          load_add_bov_store on cells that start near INTPTR_MAX:
 *                +1, and when that is refused (the cell is full) a drain of
 *                BOV_ROOM, so the cells keep crossing the overflow limit.
 *                Each cell must hold exactly start + its committed adds -
 *                BOV_ROOM * its drains and never wrap; got = operations
 *                (adds + refusals) of the cells that pass, minus one per
 *                cell that fails
 *   list         pop (load_cbeq_store_load_store) then push
 *                (load_cbne_store_store), several nodes held at a time;
 *                popping a node that is already popped is a violation;
 *                expected = nodes, got = distinct nodes found on the lists
 *                at the end (duplicates and foreign offsets count against it)
 *   store_store  load_cbne_store_store appending a tag to a per-cell log
 *   memcpy       load_cbne_memcpy_store appending a 37-byte self-checking
 *                record (4 words + 5 tail bytes: both copy loops)
 *                The log is a ring of LOG_RING entries, so the state does
 *                not grow with reps: each operation that commits entry k
 *                first read entry k - 1, which is then final, and tallies its
 *                tag once it has committed; primitive_check() tallies the
 *                last entry of each cell.  So every committed entry is read
 *                exactly once: a lost, duplicated, torn or foreign entry
 *                breaks some worker's count, sum or hash of its tags.
 *                expected = ops, got = per worker, reps if its tally
 *                matches exactly, else at most reps - 1.
 * In every case got is lowered by one per violation a worker saw while
 * running (header.violations): an index outside the cells, a node popped
 * twice, a torn record.
 *
 * Lanes.  rseq commits with plain stores, so the words rseq writers commit to
 * must never be written by the atomic fallback at the same time (the mixing
 * rule of percpu_fallback.h).  The state therefore has two lanes of per-index
 * cells, like the counters' fallback lane: threads with an rseq area use the
 * sequences on lane 0; threads without one (seccomp, no kernel support, an
 * architecture without sequences) use the fallback primitives, with owner
 * words that live in the shared cells, on lane 1.  Any mix of the two stays
 * exact; the check covers both lanes.
 *
 * No pointers in the state: list heads and next fields hold the offset of a
 * node from the buffer (0: end of list), so the state is valid wherever a
 * process maps it.  The pop sequence loads *(h + next_offset); with h an
 * offset, passing next_offset = buffer + offsetof(next) makes that the
 * node's next field in the caller's mapping (the fallback pop computes the
 * same sum).
 */
#define PY_SSIZE_T_CLEAN
#define _GNU_SOURCE
#include <Python.h>

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "core.h"
#include "percpu.h"
#include "primitive_workers.h"
#include "thread_area.h"

/* ---------------------------------------------------------------------------
 * Layout of the shared state
 * ------------------------------------------------------------------------- */

#define PRIM_MAGIC UINT64_C(0x314d525051455352) /* "RSEQPRM1" in memory order */
#define PRIM_VERSION 1
#define CACHELINE 64
#define MAX_WORKERS 4096
#define LANES 2              /* 0: rseq sequences, 1: fallback */
#define LANE_RSEQ 0
#define LANE_FALLBACK 1
#define NODES_PER_LIST 32    /* nodes each list of each lane starts with */
#define STASH 4              /* nodes a list worker holds at most */
#define LOG_RING 32          /* entries of each log cell's ring */
#define LOG_RING_OFFSET CACHELINE
#define RECORD_LEN 37        /* 4 words + 5 tail bytes: exercises both copy loops */
#define RECORD_STRIDE 40
#define BOV_ROOM 64
#define BOV_START (INTPTR_MAX - BOV_ROOM / 2)
#define MAX_REPS ((long long)UINT32_MAX)  /* the rep number fills 32 bits of a tag */

enum prim_kind { PRIM_CBNE, PRIM_ADD, PRIM_BOV, PRIM_LIST, PRIM_STORE_STORE, PRIM_MEMCPY,
                 PRIM_COUNT };

static const char *const prim_names[PRIM_COUNT] = {
    "cbne", "add", "bov", "list", "store_store", "memcpy",
};

struct prim_layout {
    uint32_t kind;
    uint32_t nworkers;
    uint32_t nslots;        /* cells per lane: the possible CPUs (cpu_id and mm_cid) */
    uint32_t reserved;
    uint64_t cell_size;     /* a multiple of CACHELINE: no false sharing */
    uint64_t cells_offset;  /* cell (lane, i): cells_offset + (lane * nslots + i) * cell_size */
    uint64_t aux_offset;    /* list: the nodes; store_store, memcpy: one tally per worker */
    uint64_t aux_count;
    uint64_t aux_size;
    uint64_t size;          /* bytes of the whole state */
};

struct prim_header {
    uint64_t magic;         /* PRIM_MAGIC, written last by primitive_init */
    uint32_t version;
    uint32_t header_size;
    struct prim_layout layout;
    int64_t violations;     /* atomic: inconsistencies seen while running */
} __attribute__((aligned(CACHELINE)));

/* cbne, add, bov */
struct value_cell {
    intptr_t value;
    int64_t bov_adds;       /* bov bookkeeping, atomic (outside the sequences) */
    int64_t bov_drains;
    int64_t bov_refusals;
} __attribute__((aligned(CACHELINE)));

struct list_cell {
    intptr_t head;          /* offset of the top node; 0: empty */
    intptr_t pop_owner;     /* fallback lane: pid of the popping process, 0: free */
} __attribute__((aligned(CACHELINE)));

struct list_node {
    intptr_t next;          /* offset of the next node; 0: end */
    int32_t id;
    int32_t popped;         /* 1 while a worker holds it */
};

/* store_store, memcpy: this line, then the ring at LOG_RING_OFFSET */
struct log_cell {
    intptr_t len;           /* committed entries; entry k is ring slot k % LOG_RING */
    intptr_t owner;         /* fallback lane: owner word of the writers */
} __attribute__((aligned(CACHELINE)));

struct tally {
    int64_t count;          /* committed entries carrying this worker's tags */
    uint64_t sum;           /* of their rep numbers */
    uint64_t hash;          /* of mix(rep number) */
} __attribute__((aligned(CACHELINE)));

_Static_assert(sizeof(struct prim_header) <= 2 * CACHELINE, "header fits two lines");
_Static_assert(sizeof(struct list_node) == 16, "node layout");

static uint64_t round_up(uint64_t n, uint64_t to) { return (n + to - 1) / to * to; }

static void layout_compute(struct prim_layout *lay, enum prim_kind kind, uint32_t nworkers,
                           uint32_t nslots)
{
    uint64_t cells;

    memset(lay, 0, sizeof(*lay));
    lay->kind = kind;
    lay->nworkers = nworkers;
    lay->nslots = nslots;
    lay->cells_offset = round_up(sizeof(struct prim_header), CACHELINE);
    switch (kind) {
    case PRIM_LIST:
        lay->cell_size = sizeof(struct list_cell);
        lay->aux_size = sizeof(struct list_node);
        lay->aux_count = (uint64_t)LANES * nslots * NODES_PER_LIST;
        break;
    case PRIM_STORE_STORE:
    case PRIM_MEMCPY:
        lay->cell_size = round_up(LOG_RING_OFFSET + (uint64_t)LOG_RING
                                  * (kind == PRIM_MEMCPY ? RECORD_STRIDE : sizeof(intptr_t)),
                                  CACHELINE);
        lay->aux_size = sizeof(struct tally);
        lay->aux_count = nworkers;
        break;
    default:
        lay->cell_size = sizeof(struct value_cell);
        break;
    }
    cells = (uint64_t)LANES * nslots * lay->cell_size;
    lay->aux_offset = round_up(lay->cells_offset + cells, CACHELINE);
    lay->size = round_up(lay->aux_offset + lay->aux_count * lay->aux_size, CACHELINE);
}

static inline char *cell_at(char *base, const struct prim_layout *lay, int lane, uint32_t index)
{
    return base + lay->cells_offset + ((uint64_t)lane * lay->nslots + index) * lay->cell_size;
}

static inline int node_offset_valid(const struct prim_layout *lay, intptr_t off)
{
    uint64_t rel = (uint64_t)off - lay->aux_offset;
    return off > 0 && (uint64_t)off >= lay->aux_offset
           && rel < lay->aux_count * lay->aux_size && rel % lay->aux_size == 0;
}

static inline void note_violation(struct prim_header *hdr)
{
    __atomic_fetch_add(&hdr->violations, 1, __ATOMIC_RELAXED);
}

/* ---------------------------------------------------------------------------
 * Tags and records (store_store, memcpy)
 * ------------------------------------------------------------------------- */

/* (worker + 1) << 32 | rep: never 0, so a zeroed entry is never a tag. */
static inline uint64_t make_tag(uint32_t worker, uint64_t rep)
{
    return ((uint64_t)(worker + 1) << 32) | rep;
}

/* splitmix64's finaliser: a sum of these tells apart sets with the same
 * count and plain sum. */
static inline uint64_t mix(uint64_t x)
{
    x += UINT64_C(0x9e3779b97f4a7c15);
    x = (x ^ (x >> 30)) * UINT64_C(0xbf58476d1ce4e5b9);
    x = (x ^ (x >> 27)) * UINT64_C(0x94d049bb133111eb);
    return x ^ (x >> 31);
}

static void make_record(unsigned char *rec, uint64_t tag)
{
    static const uint64_t salt[4] = {0, 0x5bd1e995, 0x27d4eb2f, 0x165667b1};

    for (int i = 0; i < 4; i++) {
        uint64_t w = (tag * (uint64_t)(2 * i + 1)) ^ salt[i];
        memcpy(rec + 8 * i, &w, 8);
    }
    for (int i = 0; i < RECORD_LEN - 32; i++)
        rec[32 + i] = (unsigned char)(tag >> (8 * i)) ^ 0xa5;
}

/* The tag of a log entry; 0 if a memcpy record is not a whole copy of one. */
static uint64_t entry_tag(enum prim_kind kind, const unsigned char *entry)
{
    uint64_t tag;

    if (kind == PRIM_STORE_STORE)
        return __atomic_load_n((const uint64_t *)entry, __ATOMIC_RELAXED);
    unsigned char rec[RECORD_LEN], expect[RECORD_LEN];
    memcpy(rec, entry, RECORD_LEN);
    memcpy(&tag, rec, 8);
    make_record(expect, tag);
    return memcmp(expect, rec, RECORD_LEN) == 0 ? tag : 0;
}

static inline unsigned char *log_entry(char *cell, enum prim_kind kind, intptr_t k)
{
    size_t entry_size = kind == PRIM_MEMCPY ? RECORD_STRIDE : sizeof(intptr_t);
    return (unsigned char *)cell + LOG_RING_OFFSET + (size_t)(k % LOG_RING) * entry_size;
}

/* Add a committed entry's tag to its worker's tally (shared: atomics). */
static void tally_tag(struct prim_header *hdr, struct tally *tallies, uint64_t tag)
{
    uint64_t worker = tag >> 32, rep = tag & UINT32_MAX;

    if (worker == 0 || worker > hdr->layout.nworkers) {
        note_violation(hdr); /* torn (memcpy) or foreign */
        return;
    }
    struct tally *t = &tallies[worker - 1];
    __atomic_fetch_add(&t->count, 1, __ATOMIC_RELAXED);
    __atomic_fetch_add(&t->sum, rep, __ATOMIC_RELAXED);
    __atomic_fetch_add(&t->hash, mix(rep), __ATOMIC_RELAXED);
}

/* ---------------------------------------------------------------------------
 * One operation of each primitive, with the retry loop
 * ------------------------------------------------------------------------- */

struct worker {
    char *base;
    struct prim_header *hdr;
    const struct prim_layout *lay;
    struct rseq_abi *rs;            /* NULL: the fallback primitives */
    enum rseq_index_mode mode;
    int lane;
    uint32_t id;
};

static inline int worker_index(struct worker *w)
{
    int index = rseq_percpu_index(w->rs, w->mode);

    /* cpu_id and mm_cid are below the possible CPUs: only a broken kernel or
     * a bug gets here, and it must not send a store out of the buffer. */
    if ((uint32_t)index >= w->lay->nslots) {
        note_violation(w->hdr);
        return -1;
    }
    return index;
}

static inline void *worker_cell(struct worker *w, int index)
{
    return cell_at(w->base, w->lay, w->lane, (uint32_t)index);
}

static inline void note_abort(void)
{
    RSEQ_INJECT_ABORTED();
    RSEQ_INJECT_C(9);
}

static void op_add(struct worker *w)
{
    for (;;) {
        int index = worker_index(w);
        if (index < 0)
            return;
        RSEQ_INJECT_C(7);
        struct value_cell *c = worker_cell(w, index);
        if (rseq_percpu_load_add_store(w->rs, w->mode, &c->value, 1, index) == 0)
            return;
        note_abort();
    }
}

static void op_cbne(struct worker *w)
{
    for (;;) {
        int index = worker_index(w);
        if (index < 0)
            return;
        RSEQ_INJECT_C(7);
        struct value_cell *c = worker_cell(w, index);
        intptr_t expect = __atomic_load_n(&c->value, __ATOMIC_RELAXED);
        RSEQ_INJECT_C(8);
        int ret = rseq_percpu_load_cbne_store(w->rs, w->mode, &c->value, expect, expect + 1,
                                              index);
        if (ret == 0)
            return;
        if (ret < 0)
            note_abort();
        /* ret 1: another writer of this index committed first; re-read */
    }
}

static void op_bov(struct worker *w)
{
    intptr_t count = 1;

    for (;;) {
        int index = worker_index(w);
        if (index < 0)
            return;
        RSEQ_INJECT_C(7);
        struct value_cell *c = worker_cell(w, index);
        int ret = rseq_percpu_load_add_bov_store(w->rs, w->mode, &c->value, count, index);
        if (ret < 0) {
            note_abort();
            continue;
        }
        if (ret == 0) {
            __atomic_fetch_add(count > 0 ? &c->bov_adds : &c->bov_drains, 1, __ATOMIC_RELAXED);
            return;
        }
        if (count < 0) { /* a drain near INTPTR_MAX cannot overflow */
            note_violation(w->hdr);
            return;
        }
        /* Refused: the cell is full.  Drain the cell we run on by then, so
         * the cells keep crossing the limit; the operation ends there. */
        __atomic_fetch_add(&c->bov_refusals, 1, __ATOMIC_RELAXED);
        count = -BOV_ROOM;
    }
}

/* Push the node at offset node_off on the list of the current index. */
static int list_push(struct worker *w, intptr_t node_off)
{
    struct list_node *node = (struct list_node *)(w->base + node_off);

    for (;;) {
        int index = worker_index(w);
        if (index < 0)
            return -1;
        struct list_cell *l = worker_cell(w, index);
        RSEQ_INJECT_C(7);
        intptr_t expect = __atomic_load_n(&l->head, __ATOMIC_RELAXED);
        RSEQ_INJECT_C(8);
        int ret;
        if (RSEQ_PERCPU_USE_CS(w->rs)) {
            /* load head; if (head != expect) fail; node->next = head (the
             * node is ours until the commit); head = node (commit) */
            ret = rseq_percpu_load_cbne_store_store(w->rs, w->mode, &l->head, expect,
                                                    &node->next, expect, node_off, NULL,
                                                    index);
        } else {
            /* Pushes need no owner word (see percpu_fallback.h). */
            __atomic_store_n(&node->next, expect, __ATOMIC_RELAXED);
            ret = rseq_fallback_load_cbne_store(&l->head, expect, node_off);
        }
        if (ret == 0)
            return index;
        if (ret < 0)
            note_abort();
    }
}

/* Pop the top node of the list of the current index: its offset, 0 if the
 * list is empty, -1 if the index was out of range. */
static intptr_t list_pop(struct worker *w)
{
    const ptrdiff_t next_at = (ptrdiff_t)((intptr_t)w->base
                                          + (intptr_t)offsetof(struct list_node, next));

    for (;;) {
        int index = worker_index(w);
        if (index < 0)
            return -1;
        struct list_cell *l = worker_cell(w, index);
        intptr_t loaded = 0;
        RSEQ_INJECT_C(7);
        int ret = rseq_percpu_load_cbeq_store_load_store(w->rs, w->mode, &l->head, 0, next_at,
                                                         &loaded, &l->pop_owner, index);
        if (ret == 0)
            return loaded;
        if (ret > 0)
            return 0;
        note_abort();
    }
}

static void list_push_checked(struct worker *w, intptr_t node_off)
{
    struct list_node *node = (struct list_node *)(w->base + node_off);

    __atomic_store_n(&node->popped, 0, __ATOMIC_RELEASE);
    if (list_push(w, node_off) < 0)
        note_violation(w->hdr); /* the node is lost: the check will miss it too */
}

static void op_list(struct worker *w, long rep, intptr_t *stash, int *held)
{
    intptr_t off = list_pop(w);

    if (off > 0) {
        if (!node_offset_valid(w->lay, off)) {
            note_violation(w->hdr); /* not a node: leave it alone */
        } else {
            struct list_node *node = (struct list_node *)(w->base + off);
            if (__atomic_exchange_n(&node->popped, 1, __ATOMIC_ACQ_REL) != 0)
                note_violation(w->hdr); /* popped twice: the ABA the sequence prevents */
            stash[(*held)++] = off;
        }
    }
    /* Push back sometimes one node, sometimes all: varies the list depth. */
    if (*held == STASH || (rep & 3) == 0) {
        while (*held > 0)
            list_push_checked(w, stash[--(*held)]);
    }
}

static void op_log(struct worker *w, uint64_t tag)
{
    enum prim_kind kind = (enum prim_kind)w->lay->kind;
    struct tally *tallies = (struct tally *)(w->base + w->lay->aux_offset);
    unsigned char record[RECORD_LEN];

    if (kind == PRIM_MEMCPY)
        make_record(record, tag);
    for (;;) {
        int index = worker_index(w);
        if (index < 0)
            return;
        RSEQ_INJECT_C(7);
        char *cell = worker_cell(w, index);
        struct log_cell *c = (struct log_cell *)cell;
        intptr_t len = __atomic_load_n(&c->len, __ATOMIC_ACQUIRE);
        RSEQ_INJECT_C(8);
        if (len < 0) {
            note_violation(w->hdr);
            return;
        }
        /* Entry len - 1 is final once len is committed: nothing writes its
         * ring slot again before len reaches len - 1 + LOG_RING, and then the
         * compare below fails and this read is discarded. */
        uint64_t previous = len > 0 ? entry_tag(kind, log_entry(cell, kind, len - 1)) : 0;
        unsigned char *entry = log_entry(cell, kind, len);
        int ret;
        if (kind == PRIM_MEMCPY)
            ret = rseq_percpu_load_cbne_memcpy_store(w->rs, w->mode, &c->len, len, entry,
                                                     record, RECORD_LEN, len + 1, &c->owner,
                                                     index);
        else
            ret = rseq_percpu_load_cbne_store_store(w->rs, w->mode, &c->len, len,
                                                    (intptr_t *)entry, (intptr_t)tag, len + 1,
                                                    &c->owner, index);
        if (ret == 0) {
            if (len > 0)
                tally_tag(w->hdr, tallies, previous);
            return;
        }
        if (ret < 0)
            note_abort();
    }
}

static void worker_run(struct worker *w, long reps)
{
    intptr_t stash[STASH];
    int held = 0;

    for (long rep = 0; rep < reps; rep++) {
        switch ((enum prim_kind)w->lay->kind) {
        case PRIM_CBNE: op_cbne(w); break;
        case PRIM_ADD: op_add(w); break;
        case PRIM_BOV: op_bov(w); break;
        case PRIM_LIST: op_list(w, rep, stash, &held); break;
        case PRIM_STORE_STORE:
        case PRIM_MEMCPY: op_log(w, make_tag(w->id, (uint64_t)rep)); break;
        default: return;
        }
    }
    while (held > 0)
        list_push_checked(w, stash[--held]);
}

/* ---------------------------------------------------------------------------
 * Initialisation and checks
 * ------------------------------------------------------------------------- */

static void state_init(char *base, const struct prim_layout *lay)
{
    struct prim_header *hdr = (struct prim_header *)base;

    memset(base, 0, lay->size);
    hdr->version = PRIM_VERSION;
    hdr->header_size = sizeof(*hdr);
    hdr->layout = *lay;
    switch ((enum prim_kind)lay->kind) {
    case PRIM_BOV:
        for (int lane = 0; lane < LANES; lane++)
            for (uint32_t i = 0; i < lay->nslots; i++)
                ((struct value_cell *)cell_at(base, lay, lane, i))->value = BOV_START;
        break;
    case PRIM_LIST: {
        /* Nodes [lane * per_lane, (lane + 1) * per_lane) start on that lane,
         * spread over its lists. */
        uint64_t per_lane = lay->aux_count / LANES;
        for (uint64_t n = 0; n < lay->aux_count; n++) {
            intptr_t off = (intptr_t)(lay->aux_offset + n * lay->aux_size);
            struct list_node *node = (struct list_node *)(base + off);
            struct list_cell *l = (struct list_cell *)cell_at(
                base, lay, (int)(n / per_lane), (uint32_t)(n % lay->nslots));
            node->id = (int32_t)n;
            node->next = l->head;
            l->head = off;
        }
        break;
    }
    default:
        break;
    }
    /* Last: a reader that sees the magic sees the layout. */
    __atomic_store_n(&hdr->magic, PRIM_MAGIC, __ATOMIC_RELEASE);
}

static void check_values(char *base, const struct prim_layout *lay, int64_t *got)
{
    for (int lane = 0; lane < LANES; lane++)
        for (uint32_t i = 0; i < lay->nslots; i++)
            *got += __atomic_load_n(&((struct value_cell *)cell_at(base, lay, lane, i))->value,
                                    __ATOMIC_RELAXED);
}

static void check_bov(char *base, const struct prim_layout *lay, int64_t *got)
{
    for (int lane = 0; lane < LANES; lane++) {
        for (uint32_t i = 0; i < lay->nslots; i++) {
            struct value_cell *c = (struct value_cell *)cell_at(base, lay, lane, i);
            intptr_t value = __atomic_load_n(&c->value, __ATOMIC_RELAXED);
            int64_t adds = __atomic_load_n(&c->bov_adds, __ATOMIC_RELAXED);
            int64_t drains = __atomic_load_n(&c->bov_drains, __ATOMIC_RELAXED);
            int64_t refusals = __atomic_load_n(&c->bov_refusals, __ATOMIC_RELAXED);
            __int128 expect = (__int128)BOV_START + adds - (__int128)BOV_ROOM * drains;
            /* A wrapped cell is negative; a lost or doubled add moves it.
             * A cell that fails counts against got even if it saw no
             * operation. */
            if (value > 0 && (__int128)value == expect)
                *got += adds + refusals;
            else
                *got -= 1;
        }
    }
}

static void check_list(char *base, const struct prim_layout *lay, int64_t *got)
{
    unsigned char *seen = calloc(lay->aux_count ? lay->aux_count : 1, 1);
    int64_t found = 0, bad = 0;

    if (!seen) {
        *got = -1;
        return;
    }
    for (int lane = 0; lane < LANES; lane++) {
        for (uint32_t i = 0; i < lay->nslots; i++) {
            intptr_t off = ((struct list_cell *)cell_at(base, lay, lane, i))->head;
            while (off != 0) {
                if (!node_offset_valid(lay, off)) {
                    bad++; /* foreign offset: the rest of this list is unreachable */
                    break;
                }
                uint64_t n = ((uint64_t)off - lay->aux_offset) / lay->aux_size;
                struct list_node *node = (struct list_node *)(base + off);
                if (seen[n]++) {
                    bad++; /* duplicate (and maybe a cycle): stop here */
                    break;
                }
                if (node->popped || node->id != (int32_t)n)
                    bad++;
                found++;
                off = node->next;
            }
        }
    }
    free(seen);
    *got = found - bad;
}

static void check_log(char *base, const struct prim_layout *lay, long long reps, int64_t *got)
{
    enum prim_kind kind = (enum prim_kind)lay->kind;
    const struct tally *shared = (const struct tally *)(base + lay->aux_offset);
    struct tally *t = calloc(lay->nworkers, sizeof(*t));
    int64_t bad = 0;
    uint64_t want_sum = 0, want_hash = 0;

    if (!t) {
        *got = -1;
        return;
    }
    for (uint32_t w = 0; w < lay->nworkers; w++) {
        t[w].count = __atomic_load_n(&shared[w].count, __ATOMIC_RELAXED);
        t[w].sum = __atomic_load_n(&shared[w].sum, __ATOMIC_RELAXED);
        t[w].hash = __atomic_load_n(&shared[w].hash, __ATOMIC_RELAXED);
    }
    /* The last entry of each cell: no later operation read it. */
    for (int lane = 0; lane < LANES; lane++) {
        for (uint32_t i = 0; i < lay->nslots; i++) {
            char *cell = cell_at(base, lay, lane, i);
            intptr_t len = __atomic_load_n(&((struct log_cell *)cell)->len, __ATOMIC_RELAXED);
            if (len < 0) {
                bad++;
                continue;
            }
            if (len == 0)
                continue;
            uint64_t tag = entry_tag(kind, log_entry(cell, kind, len - 1));
            uint64_t worker = tag >> 32, rep = tag & UINT32_MAX;
            if (worker == 0 || worker > lay->nworkers) {
                bad++;
                continue;
            }
            t[worker - 1].count++;
            t[worker - 1].sum += rep;
            t[worker - 1].hash += mix(rep);
        }
    }
    for (long long rep = 0; rep < reps; rep++) {
        want_sum += (uint64_t)rep;
        want_hash += mix((uint64_t)rep);
    }
    /* A worker whose tags are not exactly its reps, once each, counts at
     * most reps - 1: got equals expected only if every worker is exact. */
    for (uint32_t w = 0; w < lay->nworkers; w++) {
        if (t[w].count == reps && t[w].sum == want_sum && t[w].hash == want_hash)
            *got += reps;
        else
            *got += t[w].count < reps - 1 ? t[w].count : reps - 1;
    }
    free(t);
    *got -= bad;
}

/* ---------------------------------------------------------------------------
 * Argument validation
 * ------------------------------------------------------------------------- */

static int kind_from_name(const char *name)
{
    for (int k = 0; k < PRIM_COUNT; k++)
        if (strcmp(name, prim_names[k]) == 0)
            return k;
    PyErr_Format(PyExc_ValueError, "unknown primitive '%s': one of cbne, add, bov, list, "
                 "store_store, memcpy", name);
    return -1;
}

static int check_nworkers(int nworkers)
{
    if (nworkers < 1 || nworkers > MAX_WORKERS) {
        PyErr_Format(PyExc_ValueError, "nworkers %d: must be 1..%d", nworkers, MAX_WORKERS);
        return -1;
    }
    return 0;
}

/* The state in `view`, validated: the header must be primitive_init's for
 * `kind` and this machine, and the buffer must hold the whole layout.
 * nworkers < 0: take the header's. */
static struct prim_header *state_open(Py_buffer *view, int kind, int nworkers)
{
    struct prim_header *hdr = view->buf;
    struct prim_layout want;

    if ((uintptr_t)view->buf % CACHELINE != 0) {
        PyErr_SetString(PyExc_ValueError, "buffer is not 64-byte aligned (use an mmap)");
        return NULL;
    }
    if ((size_t)view->len < sizeof(*hdr)
        || __atomic_load_n(&hdr->magic, __ATOMIC_ACQUIRE) != PRIM_MAGIC) {
        PyErr_SetString(PyExc_ValueError, "buffer not initialised by primitive_init()");
        return NULL;
    }
    if (hdr->version != PRIM_VERSION || hdr->header_size != sizeof(*hdr)) {
        PyErr_Format(PyExc_ValueError, "primitive state version %u (header %u bytes): "
                     "this build reads version %d", hdr->version, hdr->header_size,
                     PRIM_VERSION);
        return NULL;
    }
    if (hdr->layout.kind != (uint32_t)kind) {
        PyErr_Format(PyExc_ValueError, "buffer holds primitive %s, not %s",
                     hdr->layout.kind < PRIM_COUNT ? prim_names[hdr->layout.kind] : "?",
                     prim_names[kind]);
        return NULL;
    }
    if (nworkers >= 0 && hdr->layout.nworkers != (uint32_t)nworkers) {
        PyErr_Format(PyExc_ValueError, "buffer was initialised for %u workers, not %d",
                     hdr->layout.nworkers, nworkers);
        return NULL;
    }
    /* Recompute the layout from its inputs: no offset of the header is
     * trusted unless it is the one this build would have written. */
    if (hdr->layout.nworkers < 1 || hdr->layout.nworkers > MAX_WORKERS
        || hdr->layout.nslots < (uint32_t)rseq_possible_cpus()) {
        PyErr_Format(PyExc_ValueError, "primitive state for %u workers and %u CPUs: "
                     "this machine has %d possible CPUs", hdr->layout.nworkers,
                     hdr->layout.nslots, rseq_possible_cpus());
        return NULL;
    }
    layout_compute(&want, (enum prim_kind)kind, hdr->layout.nworkers, hdr->layout.nslots);
    if (memcmp(&want, &hdr->layout, sizeof(want)) != 0) {
        PyErr_SetString(PyExc_ValueError, "primitive state layout is corrupt");
        return NULL;
    }
    if ((uint64_t)view->len < want.size) {
        PyErr_Format(PyExc_ValueError, "buffer of %zd bytes: the state needs %llu",
                     view->len, (unsigned long long)want.size);
        return NULL;
    }
    return hdr;
}

/* ---------------------------------------------------------------------------
 * Python functions
 * ------------------------------------------------------------------------- */

const char rseq_py_primitive_size_doc[] =
    "primitive_size(name, nworkers, /)\n--\n\n"
    "Bytes of shared state primitive_init() needs for `name` and `nworkers`\n"
    "workers: per-index cells for every possible CPU in two lanes (rseq and\n"
    "fallback), plus nodes (list) or per-worker tallies (store_store, memcpy).";

PyObject *rseq_py_primitive_size(PyObject *module, PyObject *args)
{
    (void)module;
    const char *name;
    int nworkers, kind;
    struct prim_layout lay;

    if (!PyArg_ParseTuple(args, "si:primitive_size", &name, &nworkers))
        return NULL;
    if ((kind = kind_from_name(name)) < 0 || check_nworkers(nworkers) < 0)
        return NULL;
    layout_compute(&lay, (enum prim_kind)kind, (uint32_t)nworkers,
                   (uint32_t)rseq_possible_cpus());
    return PyLong_FromUnsignedLongLong(lay.size);
}

const char rseq_py_primitive_init_doc[] =
    "primitive_init(name, buffer, nworkers, /)\n--\n\n"
    "Lay out the state of `name` for `nworkers` workers in the writable,\n"
    "64-byte aligned `buffer` (an anonymous mmap: forked workers share it).\n"
    "Raises ValueError if the buffer is smaller than primitive_size().";

PyObject *rseq_py_primitive_init(PyObject *module, PyObject *args)
{
    (void)module;
    const char *name;
    Py_buffer view;
    int nworkers, kind;
    struct prim_layout lay;

    if (!PyArg_ParseTuple(args, "sw*i:primitive_init", &name, &view, &nworkers))
        return NULL;
    if ((kind = kind_from_name(name)) < 0 || check_nworkers(nworkers) < 0)
        goto fail;
    layout_compute(&lay, (enum prim_kind)kind, (uint32_t)nworkers,
                   (uint32_t)rseq_possible_cpus());
    if ((uintptr_t)view.buf % CACHELINE != 0) {
        PyErr_SetString(PyExc_ValueError, "buffer is not 64-byte aligned (use an mmap)");
        goto fail;
    }
    if ((uint64_t)view.len < lay.size) {
        PyErr_Format(PyExc_ValueError, "buffer of %zd bytes: %s for %d workers needs %llu",
                     view.len, name, nworkers, (unsigned long long)lay.size);
        goto fail;
    }
    state_init(view.buf, &lay);
    PyBuffer_Release(&view);
    Py_RETURN_NONE;
fail:
    PyBuffer_Release(&view);
    return NULL;
}

const char rseq_py_primitive_run_doc[] =
    "primitive_run(name, buffer, worker, reps, index, /)\n--\n\n"
    "Worker number `worker` performs `reps` operations of `name` on the state\n"
    "in `buffer`, indexed by `index` ('cpu' or 'mm_cid'), with the GIL\n"
    "released.  Each operation retries its sequence until it commits, counting\n"
    "aborts in aborts().  A thread without an rseq area uses the fallback\n"
    "primitives on their own lane.  Raises Unsupported for 'mm_cid' when the\n"
    "thread's area does not cover mm_cid.";

PyObject *rseq_py_primitive_run(PyObject *module, PyObject *args)
{
    rseq_module_state *st = PyModule_GetState(module);
    const char *name, *index;
    Py_buffer view;
    int worker, kind;
    long long reps;
    struct worker w;
    struct rseq_abi *area;

    if (!PyArg_ParseTuple(args, "sw*iLs:primitive_run", &name, &view, &worker, &reps, &index))
        return NULL;
    memset(&w, 0, sizeof(w));
    if ((kind = kind_from_name(name)) < 0)
        goto fail;
    if (strcmp(index, "cpu") == 0 || strcmp(index, "cpu_id") == 0) {
        w.mode = RSEQ_INDEX_CPU_ID;
    } else if (strcmp(index, "mm_cid") == 0) {
        w.mode = RSEQ_INDEX_MM_CID;
    } else {
        PyErr_Format(PyExc_ValueError, "index %s: 'cpu' or 'mm_cid'", index);
        goto fail;
    }
    if (reps < 0 || reps > MAX_REPS) {
        PyErr_Format(PyExc_ValueError, "reps %lld: must be 0..%lld", reps, MAX_REPS);
        goto fail;
    }
    if (!(w.hdr = state_open(&view, kind, -1)))
        goto fail;
    if (worker < 0 || (uint32_t)worker >= w.hdr->layout.nworkers) {
        PyErr_Format(PyExc_ValueError, "worker %d: the state has workers 0..%u", worker,
                     w.hdr->layout.nworkers - 1);
        goto fail;
    }
    /* With the GIL: the area may be registered lazily. */
    area = counter_thread_area();
    if (w.mode == RSEQ_INDEX_MM_CID
        && (!area || counter_thread_area_size() < RSEQ_END_MM_CID)) {
        PyErr_SetString(st->Unsupported,
                        "mm_cid is not covered by this thread's rseq area (no area, or a "
                        "registration shorter than 28 bytes, as glibc's)");
        goto fail;
    }
    w.base = view.buf;
    w.lay = &w.hdr->layout;
    w.id = (uint32_t)worker;
    w.rs = RSEQ_PERCPU_USE_CS(area) ? area : NULL;
    w.lane = w.rs ? LANE_RSEQ : LANE_FALLBACK;
    Py_BEGIN_ALLOW_THREADS
    worker_run(&w, (long)reps);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    Py_RETURN_NONE;
fail:
    PyBuffer_Release(&view);
    return NULL;
}

const char rseq_py_primitive_check_doc[] =
    "primitive_check(name, buffer, nworkers, reps, /)\n--\n\n"
    "(expected, got) after every worker ran `reps` operations: equal when the\n"
    "run was exact.  cbne, add: operations vs the sum of the cells; bov:\n"
    "operations vs those of cells whose value matches their adds and drains;\n"
    "list: nodes vs distinct nodes found on the lists; store_store, memcpy:\n"
    "operations vs those whose committed entry was found intact exactly once.\n"
    "got is lowered by one per violation the workers saw while running.";

PyObject *rseq_py_primitive_check(PyObject *module, PyObject *args)
{
    (void)module;
    const char *name;
    Py_buffer view;
    int nworkers, kind;
    long long reps;
    struct prim_header *hdr;
    int64_t expected, got = 0;

    if (!PyArg_ParseTuple(args, "sw*iL:primitive_check", &name, &view, &nworkers, &reps))
        return NULL;
    if ((kind = kind_from_name(name)) < 0 || check_nworkers(nworkers) < 0)
        goto fail;
    if (reps < 0 || reps > MAX_REPS) {
        PyErr_Format(PyExc_ValueError, "reps %lld: must be 0..%lld", reps, MAX_REPS);
        goto fail;
    }
    if (!(hdr = state_open(&view, kind, nworkers)))
        goto fail;
    expected = (int64_t)nworkers * reps;
    switch ((enum prim_kind)kind) {
    case PRIM_CBNE:
    case PRIM_ADD: check_values(view.buf, &hdr->layout, &got); break;
    case PRIM_BOV: check_bov(view.buf, &hdr->layout, &got); break;
    case PRIM_LIST:
        expected = (int64_t)hdr->layout.aux_count;
        check_list(view.buf, &hdr->layout, &got);
        break;
    default: check_log(view.buf, &hdr->layout, reps, &got); break;
    }
    got -= __atomic_load_n(&hdr->violations, __ATOMIC_RELAXED);
    PyBuffer_Release(&view);
    return Py_BuildValue("(LL)", (long long)expected, (long long)got);
fail:
    PyBuffer_Release(&view);
    return NULL;
}

int rseq_primitive_add_constants(PyObject *module)
{
    PyObject *names = PyTuple_New(PRIM_COUNT);

    if (!names)
        return -1;
    for (int k = 0; k < PRIM_COUNT; k++) {
        PyObject *s = PyUnicode_FromString(prim_names[k]);
        if (!s) {
            Py_DECREF(names);
            return -1;
        }
        PyTuple_SET_ITEM(names, k, s);
    }
    if (PyModule_AddObject(module, "PRIMITIVES", names) < 0) {
        Py_DECREF(names);
        return -1;
    }
    return 0;
}
