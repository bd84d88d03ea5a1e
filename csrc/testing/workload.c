/*
 * workload.c - the stress workload of the per-CPU primitives (see
 * workload.h): the operations with their retry loops, the shared state's
 * initialisation and the exact checks.  Pure C: no Python.h.
 */
#define _GNU_SOURCE
#include "workload.h"

#include <stdlib.h>
#include <string.h>

const char *const prim_names[PRIM_COUNT] = {
    "cbne", "add", "bov", "list", "store_store", "memcpy",
};

#define MASK(p) (1u << (p))
#define COUNTER_MASK (MASK(1) | MASK(2) | MASK(3) | MASK(4) | MASK(7) | MASK(9))
#define LIST_OR_LOG_MASK (COUNTER_MASK | MASK(8))

const struct workload_points workload_points[] = {
    {"counter", COUNTER_MASK},
    {"arena", COUNTER_MASK},
    {"cbne", COUNTER_MASK | MASK(8)},
    {"add", COUNTER_MASK},
    {"bov", COUNTER_MASK},
    {"list", LIST_OR_LOG_MASK},
    {"store_store", LIST_OR_LOG_MASK},
    {"memcpy", LIST_OR_LOG_MASK | MASK(5)},
    {"pool", LIST_OR_LOG_MASK}, /* rseq.Pool (pool.h): its pop and push sequences, 8
                                   between reading a stack and its sequence */
};
const size_t workload_points_count = sizeof(workload_points) / sizeof(workload_points[0]);

static uint64_t round_up(uint64_t n, uint64_t to) { return (n + to - 1) / to * to; }

void layout_compute(struct prim_layout *lay, enum prim_kind kind, uint32_t nworkers,
                    uint32_t nslots, const struct workload_options *options)
{
    uint64_t cells;

    memset(lay, 0, sizeof(*lay));
    lay->kind = kind;
    lay->nworkers = nworkers;
    lay->nslots = nslots;
    lay->inc = options->inc;
    lay->bov_start = options->bov_start;
    lay->bov_drain = options->bov_drain;
    lay->log_ring = options->log_ring;
    lay->keep_log = options->keep_log != 0;
    lay->cells_offset = round_up(sizeof(struct prim_header), CACHELINE);
    switch (kind) {
    case PRIM_LIST:
        lay->cell_size = sizeof(struct list_cell);
        lay->aux_size = sizeof(struct list_node);
        lay->aux_count = (uint64_t)LANES * nslots * NODES_PER_LIST;
        break;
    case PRIM_STORE_STORE:
    case PRIM_MEMCPY:
        lay->cell_size = round_up(LOG_RING_OFFSET + lay->log_ring
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
uint64_t make_tag(uint32_t worker, uint64_t rep)
{
    return ((uint64_t)(worker + 1) << 32) | rep;
}

/* splitmix64's finaliser: a sum of these tells apart sets with the same
 * count and plain sum. */
uint64_t mix(uint64_t x)
{
    x += UINT64_C(0x9e3779b97f4a7c15);
    x = (x ^ (x >> 30)) * UINT64_C(0xbf58476d1ce4e5b9);
    x = (x ^ (x >> 27)) * UINT64_C(0x94d049bb133111eb);
    return x ^ (x >> 31);
}

void make_record(unsigned char *rec, uint64_t tag)
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
uint64_t entry_tag(enum prim_kind kind, const unsigned char *entry)
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

static inline unsigned char *log_entry(const struct prim_layout *lay, char *cell, intptr_t k)
{
    size_t entry_size = lay->kind == PRIM_MEMCPY ? RECORD_STRIDE : sizeof(intptr_t);
    return (unsigned char *)cell + LOG_RING_OFFSET
           + (size_t)((uint64_t)k % lay->log_ring) * entry_size;
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

/* A C injection point, unless w runs in a signal handler (where a raise()
 * of the point would recurse). */
#define INJECT_C(w, n) do { if (!(w)->no_c_points) RSEQ_INJECT_C(n); } while (0)

static inline void note_abort(struct worker *w)
{
    w->aborts++;
    RSEQ_INJECT_ABORTED();
    INJECT_C(w, 9);
}

static void op_add(struct worker *w)
{
    for (;;) {
        int index = worker_index(w);
        if (index < 0)
            return;
        INJECT_C(w, 7);
        struct value_cell *c = worker_cell(w, index);
        if (rseq_percpu_load_add_store(w->rs, w->mode, &c->value, w->lay->inc, index) == 0)
            return;
        note_abort(w);
    }
}

void worker_add_once(struct worker *w)
{
    op_add(w);
}

void worker_add_unprotected(struct worker *w)
{
    int index = worker_index(w);
    if (index < 0)
        return;
    volatile intptr_t *v = &((struct value_cell *)worker_cell(w, index))->value;
    intptr_t x = *v;
    INJECT_C(w, 8);
    for (volatile int i = 0; i < 50; i++)
        ;
    *v = x + w->lay->inc;
}

static void op_cbne(struct worker *w)
{
    for (;;) {
        int index = worker_index(w);
        if (index < 0)
            return;
        INJECT_C(w, 7);
        struct value_cell *c = worker_cell(w, index);
        intptr_t expect = __atomic_load_n(&c->value, __ATOMIC_RELAXED);
        INJECT_C(w, 8);
        int ret = rseq_percpu_load_cbne_store(w->rs, w->mode, &c->value, expect, expect + 1,
                                              index);
        if (ret == 0)
            return;
        if (ret < 0)
            note_abort(w);
        else
            w->cmpfails++; /* another writer of this index committed first; re-read */
    }
}

static void op_bov(struct worker *w)
{
    const intptr_t inc = w->lay->inc;
    intptr_t count = inc;

    for (;;) {
        int index = worker_index(w);
        if (index < 0)
            return;
        INJECT_C(w, 7);
        struct value_cell *c = worker_cell(w, index);
        int ret = rseq_percpu_load_add_bov_store(w->rs, w->mode, &c->value, count, index);
        if (ret < 0) {
            note_abort(w);
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
        /* Refused: the cell must be too full for one more add. */
        w->cmpfails++;
        __atomic_fetch_add(&c->bov_refusals, 1, __ATOMIC_RELAXED);
        if (w->lay->bov_drain == 0) {
            /* Without drains a cell never shrinks: it may only have filled
             * further since the refusal. */
            if (__atomic_load_n(&c->value, __ATOMIC_RELAXED) <= INTPTR_MAX - inc)
                note_violation(w->hdr);
            return;
        }
        /* Drain the cell we run on by then, so the cells keep crossing the
         * limit; the operation ends there. */
        count = -(intptr_t)w->lay->bov_drain;
    }
}

/* Per-index LIFO lists, built on the primitives:
 *   push: load head; store node->next = head; store head = node (commit)
 *         = load_cbne_store_store with the head read just before;
 *   pop:  load head; if (head == 0) fail; load next = head->next;
 *         store head = next (commit) = load_cbeq_store_load_store.
 * ABA-safe with rseq because the whole pop is one sequence on its own
 * index's list: no other pop or push on that list can run in between
 * without aborting it.  The fallback lane serialises pops on the cell's
 * pop_owner word (robust to a killed holder, see percpu_fallback.h).
 *
 * Push the node at offset node_off on the list of the current index. */
static int list_push(struct worker *w, intptr_t node_off)
{
    struct list_node *node = (struct list_node *)(w->base + node_off);

    for (;;) {
        int index = worker_index(w);
        if (index < 0)
            return -1;
        struct list_cell *l = worker_cell(w, index);
        INJECT_C(w, 7);
        intptr_t expect = __atomic_load_n(&l->head, __ATOMIC_RELAXED);
        INJECT_C(w, 8);
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
            note_abort(w);
        else
            w->cmpfails++;
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
        INJECT_C(w, 7);
        int ret = rseq_percpu_load_cbeq_store_load_store(w->rs, w->mode, &l->head, 0, next_at,
                                                         &loaded, &l->pop_owner, index);
        if (ret == 0)
            return loaded;
        if (ret > 0) {
            w->empties++;
            return 0;
        }
        note_abort(w);
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
        INJECT_C(w, 7);
        char *cell = worker_cell(w, index);
        struct log_cell *c = (struct log_cell *)cell;
        intptr_t len = __atomic_load_n(&c->len, __ATOMIC_ACQUIRE);
        INJECT_C(w, 8);
        if (len < 0 || (w->lay->keep_log && (uint64_t)len >= w->lay->log_ring)) {
            note_violation(w->hdr); /* corrupt, or a kept log is full */
            return;
        }
        /* Entry len - 1 is final once len is committed: nothing writes its
         * ring slot again before len reaches len - 1 + LOG_RING, and then the
         * compare below fails and this read is discarded. */
        uint64_t previous = len > 0 ? entry_tag(kind, log_entry(w->lay, cell, len - 1)) : 0;
        unsigned char *entry = log_entry(w->lay, cell, len);
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
            note_abort(w);
        else
            w->cmpfails++;
    }
}

void worker_run(struct worker *w, long reps)
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

void state_init(char *base, const struct prim_layout *lay, int zeroed)
{
    struct prim_header *hdr = (struct prim_header *)base;

    if (!zeroed)
        memset(base, 0, lay->size);
    hdr->version = PRIM_VERSION;
    hdr->header_size = sizeof(*hdr);
    hdr->layout = *lay;
    switch ((enum prim_kind)lay->kind) {
    case PRIM_BOV:
        for (int lane = 0; lane < LANES; lane++)
            for (uint32_t i = 0; i < lay->nslots; i++)
                ((struct value_cell *)cell_at(base, lay, lane, i))->value = lay->bov_start;
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
            __int128 expect = (__int128)lay->bov_start + (__int128)lay->inc * adds
                              - (__int128)lay->bov_drain * drains;
            /* A wrapped cell is negative; a lost or doubled add moves it;
             * without drains, a cell that refused adds must have no room
             * left.  A cell that fails counts against got even if it saw no
             * operation. */
            int room_left = lay->bov_drain == 0 && refusals > 0 && value <= INTPTR_MAX - lay->inc;
            if (value > 0 && (__int128)value == expect && !room_left)
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

/* A log that never wrapped (keep_log): every entry below each cell's
 * committed length is a whole record (memcpy) carrying a tag of some worker's
 * rep, each tag appears exactly once, and there are as many entries as
 * operations.  Returns the number of faults found. */
static int64_t check_kept_log(char *base, const struct prim_layout *lay, long long reps)
{
    enum prim_kind kind = (enum prim_kind)lay->kind;
    uint64_t total = (uint64_t)lay->nworkers * (uint64_t)reps;
    unsigned char *seen = calloc(total ? total : 1, 1);
    int64_t bad = 0;
    uint64_t committed = 0;

    if (!seen)
        return 1;
    for (int lane = 0; lane < LANES; lane++) {
        for (uint32_t i = 0; i < lay->nslots; i++) {
            char *cell = cell_at(base, lay, lane, i);
            intptr_t len = __atomic_load_n(&((struct log_cell *)cell)->len, __ATOMIC_RELAXED);
            if (len < 0 || (uint64_t)len > lay->log_ring) {
                bad++;
                continue;
            }
            for (intptr_t j = 0; j < len; j++) {
                uint64_t tag = entry_tag(kind, log_entry(lay, cell, j));
                uint64_t worker = tag >> 32, rep = tag & UINT32_MAX;
                if (worker == 0 || worker > lay->nworkers || rep >= (uint64_t)reps) {
                    bad++; /* torn or foreign: the rest of this cell still counts */
                    continue;
                }
                if (seen[(worker - 1) * (uint64_t)reps + rep]++)
                    bad++; /* committed twice */
                else
                    committed++;
            }
        }
    }
    free(seen);
    if (committed != total)
        bad += 1;
    return bad;
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
            uint64_t tag = entry_tag(kind, log_entry(lay, cell, len - 1));
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
    if (lay->keep_log)
        bad += check_kept_log(base, lay, reps);
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

int64_t workload_check(char *base, const struct prim_layout *lay, long long reps,
                       int64_t *expected)
{
    const struct prim_header *hdr = (const struct prim_header *)base;
    int64_t got = 0;

    *expected = (int64_t)lay->nworkers * reps;
    switch ((enum prim_kind)lay->kind) {
    case PRIM_CBNE:
    case PRIM_ADD: check_values(base, lay, &got); break;
    case PRIM_BOV: check_bov(base, lay, &got); break;
    case PRIM_LIST:
        *expected = (int64_t)lay->aux_count;
        check_list(base, lay, &got);
        break;
    default: check_log(base, lay, reps, &got); break;
    }
    return got - __atomic_load_n(&hdr->violations, __ATOMIC_RELAXED);
}
