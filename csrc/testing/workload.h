/*
 * workload.h - the stress workload of the per-CPU primitives of percpu.h, in
 * pure C: the one library behind the test build rseq._inject (its binding
 * is primitive_workers.c, for `python -m rseq stress`) and tests/c/param_test.c.
 *
 * A harness lays out a shared buffer (layout_compute(), state_init()),
 * starts workers (threads, or forked processes on the same MAP_SHARED
 * mapping) that each call worker_run(), widens one injection point and
 * disturbs them (yields, sleeps, signal storms, migration), then asks
 * workload_check() for (expected, got): equal when every operation was
 * exact.  The Python harness is src/rseq/testing/stress.py (primitive_case()),
 * through primitive_workers.c; param_test drives the same calls from C and
 * picks its own workload_options (an inc, bov without drains, a log kept
 * whole).  With the defaults (WORKLOAD_DEFAULTS):
 *
 *   cbne         load_cbne_store used as a counter, the expected value read
 *                in C (so compare failures happen):
 *                expected = ops, got = sum of the cells
 *   add          load_add_store, +1 per operation: same check
 *   bov          load_add_bov_store on cells that start near INTPTR_MAX:
 *                +1, and when that is refused (the cell is full) a drain of
 *                BOV_ROOM, so the cells keep crossing the overflow limit.
 *                Each cell must hold exactly start + its committed adds -
 *                BOV_ROOM * its drains and never wrap (without drains: and
 *                a cell that refused an add has no room for it); got =
 *                operations (adds + refusals) of the cells that pass, minus
 *                one per cell that fails
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
#ifndef RSEQ_PY_WORKLOAD_H
#define RSEQ_PY_WORKLOAD_H

#include <stddef.h>
#include <stdint.h>

#include "percpu.h"

/* ---------------------------------------------------------------------------
 * Layout of the shared state
 * ------------------------------------------------------------------------- */

#define PRIM_MAGIC UINT64_C(0x314d525051455352) /* "RSEQPRM1" in memory order */
#define PRIM_VERSION 2
#define CACHELINE 64
#define MAX_WORKERS 4096
#define LANES 2              /* 0: rseq sequences, 1: fallback */
#define LANE_RSEQ 0
#define LANE_FALLBACK 1
#define NODES_PER_LIST 32    /* nodes each list of each lane starts with */
#define STASH 4              /* nodes a list worker holds at most */
#define LOG_RING 32          /* default entries of each log cell's ring */
#define LOG_RING_OFFSET CACHELINE
#define RECORD_LEN 37        /* 4 words + 5 tail bytes: exercises both copy loops */
#define RECORD_STRIDE 40
#define BOV_ROOM 64          /* default: a refused add drains this much */
#define MAX_REPS ((long long)UINT32_MAX)  /* the rep number fills 32 bits of a tag */

enum prim_kind { PRIM_CBNE, PRIM_ADD, PRIM_BOV, PRIM_LIST, PRIM_STORE_STORE, PRIM_MEMCPY,
                 PRIM_COUNT };

extern const char *const prim_names[PRIM_COUNT];

struct prim_layout {
    uint32_t kind;
    uint32_t nworkers;
    uint32_t nslots;        /* cells per lane: the possible CPUs (cpu_id and mm_cid) */
    uint32_t keep_log;      /* store_store, memcpy: the ring never wraps; every entry is
                               checked at the end, and a full log is a violation */
    uint64_t cell_size;     /* a multiple of CACHELINE: no false sharing */
    uint64_t cells_offset;  /* cell (lane, i): cells_offset + (lane * nslots + i) * cell_size */
    uint64_t aux_offset;    /* list: the nodes; store_store, memcpy: one tally per worker */
    uint64_t aux_count;
    uint64_t aux_size;
    uint64_t size;          /* bytes of the whole state */
    int64_t inc;            /* add, bov: what each operation adds (> 0) */
    int64_t bov_start;      /* bov: the first value of every cell */
    int64_t bov_drain;      /* bov: a refused add drains this much instead, then the
                               operation ends; 0: no drain (a refusal ends it, and is
                               only allowed on a cell with no room for inc) */
    uint64_t log_ring;      /* store_store, memcpy: entries of each cell's ring */
};

/* The choices a harness makes; WORKLOAD_DEFAULTS are the Python stress
 * command's (rseq._inject), param_test sets its own from its options. */
struct workload_options {
    int64_t inc;
    int64_t bov_start;
    int64_t bov_drain;
    uint64_t log_ring;
    int keep_log;
};
#define WORKLOAD_DEFAULTS ((struct workload_options){                          \
    .inc = 1, .bov_start = INTPTR_MAX - BOV_ROOM / 2, .bov_drain = BOV_ROOM,   \
    .log_ring = LOG_RING, .keep_log = 0})

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


struct worker {
    char *base;
    struct prim_header *hdr;
    const struct prim_layout *lay;
    struct rseq_abi *rs;            /* NULL: the fallback primitives */
    enum rseq_index_mode mode;
    int lane;
    uint32_t id;
    int no_c_points;                /* skip the C injection points (a signal handler) */
    long aborts, cmpfails, empties; /* this worker's -1 and 1 results, empty pops */
};

/* Injection points (inject.h) each structure passes through, as a bit mask
 * of point numbers: the one table the Python stress matrix, its tests and
 * param_test's matrix read (rseq._inject.INJECTION_POINTS).  1-4 sit inside
 * every sequence, 5 inside the memcpy copy loop, 7 between reading the index
 * and the sequence, 8 after the C read of a list head, length or expected
 * value, 9 after an abort.  "counter" and "arena" are the counters of
 * counter.h (PerCpuCounter, ArenaCounter); the others are this workload's. */
struct workload_points {
    const char *name;
    unsigned int mask;
};
extern const struct workload_points workload_points[];
extern const size_t workload_points_count;

/* The state: size and layout for `kind`, initialisation, validation. */
void layout_compute(struct prim_layout *lay, enum prim_kind kind, uint32_t nworkers,
                    uint32_t nslots, const struct workload_options *options);
/* zeroed: the buffer is known to hold only zeros (a fresh anonymous mmap),
 * so a large kept log is left untouched until it is used. */
void state_init(char *base, const struct prim_layout *lay, int zeroed);

/* Worker w performs `reps` operations of its layout's primitive. */
void worker_run(struct worker *w, long reps);

/* One add (kind add) by w: what a signal handler of param_test runs on top
 * of the sequence it interrupted. */
void worker_add_once(struct worker *w);

/* The same add with no sequence and no atomic: lost updates the check must
 * catch (param_test -B proves the check can fail). */
void worker_add_unprotected(struct worker *w);

/* After every worker ran `reps` operations: returns got and sets *expected;
 * equal when the run was exact (see the cases above). */
int64_t workload_check(char *base, const struct prim_layout *lay, long long reps,
                       int64_t *expected);

/* Tags and self-checking records (store_store, memcpy). */
uint64_t make_tag(uint32_t worker, uint64_t rep);
uint64_t mix(uint64_t x);
void make_record(unsigned char *rec, uint64_t tag);
uint64_t entry_tag(enum prim_kind kind, const unsigned char *entry);

#endif /* RSEQ_PY_WORKLOAD_H */
