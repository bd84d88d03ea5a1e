/*
 * pool.h - a per-CPU block allocator in shared memory (rseq.Pool), pure C.
 *
 * A pool is one file of `block_count` blocks of `block_size` bytes (a
 * multiple of 64), used by any number of processes.  Blocks are named by
 * their index, which is what crosses processes.  Layout (offsets from the
 * start of the mapping, all validated by the caller before this code runs):
 *
 *   control_offset                  struct rseq_pool_control (one line)
 *   stacks_offset + c * stack_size  CPU c's stack: a head line (the word),
 *                                   then `cache` slots of block indexes
 *   owners_offset + 8 * i           block i's owner word
 *   bitmap_offset + 8 * (i / 64)    overflow hint bit of block i
 *   blocks_offset + i * block_size  block i
 *
 * ---------------------------------------------------------------------------
 * Where a block is, and who owns it
 *
 * A block is FREE when it sits in a CPU stack below that stack's count, or
 * when its owner word is RSEQ_POOL_FREE (0: the shared overflow).  Any other
 * block is OWNED by the process its owner word names: (pid, start time),
 * so a recycled pid never passes for a dead owner.  The owner word of a
 * block on a stack is stale (its last owner, or a popper whose sequence was
 * aborted); only membership counts there.
 *
 * CPU stacks (tcmalloc's per-CPU caches).  The head word packs the count
 * (low 24 bits) and a generation (high 40 bits) that every commit bumps.
 *
 *   pop:   read w = word, n = count(w), i = slots[n-1] (outside);
 *          load word; if (word != w) fail; store me to owners[i];
 *          store w' = (gen+1, n-1) to word (commit)
 *          = rseq_load_cbne_store_store(word, w, &owners[i], me, w')
 *   push:  read w = word, n = count(w) (outside);
 *          load word; if (word != w) fail; store i to slots[n];
 *          store w' = (gen+1, n+1) to word (commit)
 *          = rseq_load_cbne_store_store(word, w, &slots[n], i, w')
 *
 * Both are existing primitives of percpu.h, so every architecture that has
 * them (x86-64, arm64) runs the pool.  Reading i outside the sequence is safe
 * because of the generation: a word equal to w means no pop or push committed
 * on that stack since w was read, so slots[n-1] still holds i (pushes only
 * store at slots[count]).  (The generation wraps after 2^40 commits on one
 * CPU: a thread stopped between its read and its sequence for that long
 * while others hammer the same CPU could be fooled.  Hours of solid work.)
 *
 * THE OWNER IS RECORDED INSIDE THE ALLOCATING SEQUENCE.  The owner store is
 * the speculative store of the pop, before the commit, so for every instant
 * at which a process may die (kill -9 takes effect between instructions):
 *   - before the commit: the block is still in the stack, so FREE (the
 *     owner word may already name the popper: stale, harmless);
 *   - after the commit: the owner word names the popper, so OWNED by it,
 *     and reclaim() gives it back once the popper is dead.
 * There is no instant at which the block is neither.  The broken order
 * (commit the new count, then store the owner) has one: between the two
 * stores the block is out of the stack and its owner word names the
 * previous owner, alive or not; rseq.model's pool scenario finds that leak.
 *
 * The pop stores me | POPPING, and once committed drops the flag: an
 * aborted pop may leave its speculative store on a block that is still on
 * the stack, and the flag keeps a later (erroneous) free by the same process
 * from taking that for ownership.  Flags never change whose block it is.
 *
 * A free first marks the owner word (me | RSEQ_POOL_ON_STACK), then pushes.
 * Killed before the push commits, the block is OWNED by the dead process
 * (the mark does not change who), so reclaim() takes it back.  The mark is
 * what detects a double free: an owner word that is exactly "me" means the
 * block is ours; "me | ON_STACK" or FREE means it was already freed.
 *
 * Only sequences touch the stacks (the mixing rule of percpu_fallback.h): a
 * thread without rseq (or on an architecture without sequences) allocates
 * from and frees to the overflow only, with atomics.
 *
 * The overflow.  A block enters it with a store of FREE to its owner word
 * (the commit: from then on it is free), then gets its hint bit set; a
 * taker clears a hint bit, then moves the owner word FREE -> me with a
 * compare-and-swap (the commit: from then on it is owned).  A process
 * killed between the two steps leaves a free block without its hint bit:
 * invisible to takers, never lost, since reclaim() sets the bit of every
 * FREE block again (and an allocation that finds nothing runs reclaim()
 * before it reports exhaustion).  A stale bit costs a failed CAS.
 *
 * Refill and drain.  An allocation that finds its CPU's stack empty takes a
 * batch from the overflow (returning one block and pushing the rest); a free
 * that finds it full goes to the overflow.  A CPU that runs dry with an
 * empty overflow takes from other CPUs' stacks: the thread moves to that CPU
 * (sched_setaffinity), pops a batch there with the same sequences, and moves
 * back, so the pool never reports exhaustion while free blocks exist
 * anywhere (unless the thread may not run on that CPU: cpuset limits).
 *
 * reclaim().  For every owner word that names a process no longer alive
 * (decided first), scan the stacks (after that decision), then
 * compare-and-swap each dead-owned word that is not in a stack to FREE.
 * Why it never frees a free block twice: once D is dead nobody writes an
 * owner word naming D; pops write the popper, reclaim writes FREE.  So an
 * owner word still naming D at the CAS has not changed since D died, in
 * particular not during the scan, so the block was not popped during the
 * scan: had it been in a stack it would have stayed at its place below
 * the count, and the scan would have seen it.  Two reclaims race only on
 * the CAS: one wins.  Safe at any time, from any process.
 */
#ifndef RSEQ_PY_POOL_H
#define RSEQ_PY_POOL_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE 1 /* CPU_ALLOC; the includer must define it before any header */
#endif
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <unistd.h>

#include "percpu.h"

#define RSEQ_POOL_FREE 0ULL
#define RSEQ_POOL_ON_STACK (1ULL << 63) /* freed onto a stack by the owner named */
#define RSEQ_POOL_POPPING (1ULL << 62)  /* the pop's speculative store (see alloc) */
#define RSEQ_POOL_FLAGS (RSEQ_POOL_ON_STACK | RSEQ_POOL_POPPING)
#define RSEQ_POOL_PID_BITS 22
#define RSEQ_POOL_START_BITS 40 /* clock ticks: 348 years at 100 Hz */
#define RSEQ_POOL_PID_MASK ((1ULL << RSEQ_POOL_PID_BITS) - 1)
#define RSEQ_POOL_START_MASK ((1ULL << RSEQ_POOL_START_BITS) - 1)

#define RSEQ_POOL_COUNT_BITS 24
#define RSEQ_POOL_COUNT_MASK ((1ULL << RSEQ_POOL_COUNT_BITS) - 1)
#define RSEQ_POOL_MAX_CACHE (1U << 16)
#define RSEQ_POOL_MAX_BATCH 64
#define RSEQ_POOL_STACK_HEAD 64     /* the word has its own cache line */
#define RSEQ_POOL_BLOCK_ALIGN 64
/* Sequences that abort in a row before an operation gives up on its stack
 * and uses the overflow: percpu.h's bound of every retry loop.  (A lost
 * registration never gets that far: RSEQ_PERCPU_USE_CS refuses it.) */
#define RSEQ_POOL_MAX_ABORTS RSEQ_PERCPU_MAX_ABORTS

/* The fast path (pop, push, alloc, free) inlined into its callers: the
 * binding's alloc_index() and free() are one sequence each plus the call. */
#define RSEQ_POOL_HOT __attribute__((always_inline))

/* Results of the operations (negative: nothing was done). */
#define RSEQ_POOL_EMPTY (-1)        /* alloc: no free block anywhere */
#define RSEQ_POOL_E_RANGE (-2)      /* index out of range */
#define RSEQ_POOL_E_FREED (-3)      /* free: the block is already free */
#define RSEQ_POOL_E_NOT_OWNER (-4)  /* free/give: another process owns it */
#define RSEQ_POOL_E_DAMAGED (-5)    /* a stack holds a count or index out of range */
#define RSEQ_POOL_E_TARGET (-6)     /* give: no such live process */

struct rseq_pool_control {
    uint64_t cursor;                /* where takers start scanning the bitmap (hint) */
    uint64_t reserved[7];
};

/* One process's view of a mapped pool. */
struct rseq_pool {
    char *base;
    uint64_t block_size, block_count;
    uint32_t ncpu, cache, batch;
    struct rseq_pool_control *control;
    char *stacks;
    uint64_t stack_size;
    uint64_t *owners;
    uint64_t *bitmap;
    uint64_t bitmap_words;
    char *blocks;
};

/* ---------------------------------------------------------------------------
 * Identities: (pid, start time) in one word
 * ------------------------------------------------------------------------- */

static inline uint64_t rseq_pool_identity(uint32_t pid, unsigned long long start)
{
    return ((start & RSEQ_POOL_START_MASK) << RSEQ_POOL_PID_BITS) | (pid & RSEQ_POOL_PID_MASK);
}

static inline uint32_t rseq_pool_identity_pid(uint64_t owner)
{
    return (uint32_t)(owner & RSEQ_POOL_PID_MASK);
}

static inline unsigned long long rseq_pool_identity_start(uint64_t owner)
{
    return (owner & ~RSEQ_POOL_FLAGS) >> RSEQ_POOL_PID_BITS;
}

/* Field 22 of /proc/PID/stat (clock ticks since boot): 1 and *start set for
 * a live process, 0 for a zombie, -1 when /proc cannot tell. */
static inline int rseq_pool_start_time(uint32_t pid, unsigned long long *start)
{
    char path[64], buf[1024];
    snprintf(path, sizeof path, "/proc/%u/stat", pid);
    FILE *f = fopen(path, "re");
    if (!f)
        return -1;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = '\0';
    char *p = strrchr(buf, ')'); /* the command name may hold anything */
    if (!p || p[1] != ' ')
        return -1;
    p += 2;
    if (*p == 'Z' || *p == 'X')
        return 0;
    for (int field = 3; field < 22; field++) {
        p = strchr(p, ' ');
        if (!p)
            return -1;
        p++;
    }
    char *end;
    *start = strtoull(p, &end, 10);
    return end == p ? -1 : 1;
}

/* Is the process an owner word names alive?  When /proc cannot tell, a
 * process with that pid is taken to be it (never reclaimed wrongly). */
static inline int rseq_pool_owner_alive(uint64_t owner)
{
    uint32_t pid = rseq_pool_identity_pid(owner);
    unsigned long long start;
    if (pid == 0)
        return 0;
    int known = rseq_pool_start_time(pid, &start);
    if (known == 1)
        return (start & RSEQ_POOL_START_MASK) == rseq_pool_identity_start(owner);
    if (known == 0)
        return 0;
    return !(kill((pid_t)pid, 0) != 0 && errno == ESRCH);
}

/* This process's identity without a system call in the steady state:
 * computed once, recomputed in a child after fork() (pthread_atfork), so a
 * child never frees its parent's blocks as its own. */
static uint64_t rseq_pool_self_cached;
static pthread_once_t rseq_pool_self_once = PTHREAD_ONCE_INIT;

static void rseq_pool_forget_self(void)
{
    __atomic_store_n(&rseq_pool_self_cached, 0, __ATOMIC_RELAXED);
}

static void rseq_pool_self_init(void) { pthread_atfork(NULL, NULL, rseq_pool_forget_self); }

static inline uint64_t rseq_pool_self(void)
{
    uint64_t me = __atomic_load_n(&rseq_pool_self_cached, __ATOMIC_RELAXED);
    if (__builtin_expect(me != 0, 1))
        return me;
    pthread_once(&rseq_pool_self_once, rseq_pool_self_init);
    uint32_t pid = (uint32_t)getpid();
    unsigned long long start = 0;
    if (rseq_pool_start_time(pid, &start) != 1)
        start = 0; /* /proc not mounted: recorded as 0, never mistaken for alive */
    me = rseq_pool_identity(pid, start);
    __atomic_store_n(&rseq_pool_self_cached, me, __ATOMIC_RELAXED);
    return me;
}

/* ---------------------------------------------------------------------------
 * Addresses
 * ------------------------------------------------------------------------- */

static inline int64_t *rseq_pool_word(const struct rseq_pool *p, uint32_t cpu)
{
    return (int64_t *)(p->stacks + (uint64_t)cpu * p->stack_size);
}

static inline int64_t *rseq_pool_slots(const struct rseq_pool *p, uint32_t cpu)
{
    return (int64_t *)(p->stacks + (uint64_t)cpu * p->stack_size + RSEQ_POOL_STACK_HEAD);
}

static inline void *rseq_pool_block(const struct rseq_pool *p, uint64_t index)
{
    return p->blocks + index * p->block_size;
}

static inline uint64_t rseq_pool_count_of(uint64_t word) { return word & RSEQ_POOL_COUNT_MASK; }

static inline uint64_t rseq_pool_next_word(uint64_t word, uint64_t count)
{
    return (((word >> RSEQ_POOL_COUNT_BITS) + 1) << RSEQ_POOL_COUNT_BITS) | count;
}

/* ---------------------------------------------------------------------------
 * The CPU stacks (sequences only)
 * ------------------------------------------------------------------------- */

/* Pop from CPU cpu's stack, recording `me` as the owner inside the sequence
 * (flagged POPPING there: an aborted pop leaves that on a block still on the
 * stack, and free() must not take it for ownership; after the commit the
 * flag is dropped with a plain store: killed before it, the block is still
 * the dead process's to reclaim).
 * 0 and *index set; 1 empty; -1 aborted or changed (retry); E_DAMAGED. */
static inline RSEQ_POOL_HOT int rseq_pool_pop_on(struct rseq_pool *p, struct rseq_abi *rs,
                                                 uint32_t cpu, uint64_t me, uint64_t *index)
{
    int64_t *word = rseq_pool_word(p, cpu);
    uint64_t w = (uint64_t)__atomic_load_n(word, __ATOMIC_RELAXED);
    uint64_t n = rseq_pool_count_of(w);
    if (n == 0)
        return 1;
    if (n > p->cache)
        return RSEQ_POOL_E_DAMAGED;
    uint64_t i = (uint64_t)__atomic_load_n(&rseq_pool_slots(p, cpu)[n - 1], __ATOMIC_RELAXED);
    if (i >= p->block_count) {
        /* A stale read, or a damaged slot: decide by the word. */
        if ((uint64_t)__atomic_load_n(word, __ATOMIC_RELAXED) == w)
            return RSEQ_POOL_E_DAMAGED;
        return -1;
    }
    RSEQ_INJECT_C(8);
    int ret = rseq_percpu_load_cbne_store_store(rs, RSEQ_INDEX_CPU_ID, (intptr_t *)word,
                                                (intptr_t)w, (intptr_t *)&p->owners[i],
                                                (intptr_t)(me | RSEQ_POOL_POPPING),
                                                (intptr_t)rseq_pool_next_word(w, n - 1),
                                                NULL, (int)cpu);
    if (ret == 0) {
        /* Ours since the commit; now the plain "me" that free() accepts. */
        __atomic_store_n(&p->owners[i], me, __ATOMIC_RELAXED);
        *index = i;
        return 0;
    }
    if (ret < 0) {
        RSEQ_INJECT_ABORTED();
        RSEQ_INJECT_C(9);
    }
    return -1;
}

/* Push block i (owned by the caller, already marked) on CPU cpu's stack.
 * 0 pushed; 1 full; -1 aborted or changed (retry); E_DAMAGED. */
static inline RSEQ_POOL_HOT int rseq_pool_push_on(struct rseq_pool *p, struct rseq_abi *rs,
                                                  uint32_t cpu, uint64_t i)
{
    int64_t *word = rseq_pool_word(p, cpu);
    uint64_t w = (uint64_t)__atomic_load_n(word, __ATOMIC_RELAXED);
    uint64_t n = rseq_pool_count_of(w);
    if (n >= p->cache)
        return n == p->cache ? 1 : RSEQ_POOL_E_DAMAGED;
    RSEQ_INJECT_C(8);
    int ret = rseq_percpu_load_cbne_store_store(rs, RSEQ_INDEX_CPU_ID, (intptr_t *)word,
                                                (intptr_t)w,
                                                (intptr_t *)&rseq_pool_slots(p, cpu)[n],
                                                (intptr_t)i,
                                                (intptr_t)rseq_pool_next_word(w, n + 1),
                                                NULL, (int)cpu);
    if (ret == 0)
        return 0;
    if (ret < 0) {
        RSEQ_INJECT_ABORTED();
        RSEQ_INJECT_C(9);
    }
    return -1;
}

/* The CPU this thread runs on for the stacks, or -1 when it must not use
 * them (no area, no sequences on this architecture, a lost registration). */
static inline RSEQ_POOL_HOT int rseq_pool_cpu(const struct rseq_pool *p, struct rseq_abi *rs)
{
    if (!RSEQ_PERCPU_USE_CS(rs))
        return -1;
    int cpu = rseq_current_index(rs, RSEQ_INDEX_CPU_ID);
    if (cpu < 0 || (uint32_t)cpu >= p->ncpu)
        return -1;
    return cpu;
}

/* ---------------------------------------------------------------------------
 * The overflow (atomics)
 * ------------------------------------------------------------------------- */

static inline void rseq_pool_hint(struct rseq_pool *p, uint64_t i)
{
    __atomic_fetch_or(&p->bitmap[i / 64], 1ULL << (i % 64), __ATOMIC_RELEASE);
}

/* Give block i (owned by the caller) to the overflow. */
static inline void rseq_pool_release(struct rseq_pool *p, uint64_t i)
{
    __atomic_store_n(&p->owners[i], RSEQ_POOL_FREE, __ATOMIC_RELEASE); /* commit */
    RSEQ_INJECT_C(8);
    rseq_pool_hint(p, i);
}

/* Take a block from the overflow, owned by `me`; -1 if none is hinted. */
static inline int64_t rseq_pool_take(struct rseq_pool *p, uint64_t me)
{
    uint64_t words = p->bitmap_words;
    uint64_t start = __atomic_load_n(&p->control->cursor, __ATOMIC_RELAXED) % words;
    for (uint64_t k = 0; k < words; k++) {
        uint64_t w = (start + k) % words;
        uint64_t bits = __atomic_load_n(&p->bitmap[w], __ATOMIC_ACQUIRE);
        while (bits) {
            uint64_t bit = bits & -bits;
            uint64_t old = __atomic_fetch_and(&p->bitmap[w], ~bit, __ATOMIC_ACQ_REL);
            bits = old & ~bit;
            if (!(old & bit))
                continue;
            uint64_t i = w * 64 + (uint64_t)__builtin_ctzll(bit);
            if (i >= p->block_count)
                continue;
            uint64_t expect = RSEQ_POOL_FREE;
            RSEQ_INJECT_C(8);
            if (__atomic_compare_exchange_n(&p->owners[i], &expect, me, 0, __ATOMIC_ACQ_REL,
                                            __ATOMIC_RELAXED)) {
                if (w != start)
                    __atomic_store_n(&p->control->cursor, w, __ATOMIC_RELAXED);
                return (int64_t)i;
            }
        }
    }
    return -1;
}

/* ---------------------------------------------------------------------------
 * Refill, steal
 * ------------------------------------------------------------------------- */

/* Put a block the caller owns back: on this CPU's stack, else the overflow. */
static inline int rseq_pool_put_back(struct rseq_pool *p, struct rseq_abi *rs, uint64_t me,
                                     uint64_t i)
{
    __atomic_store_n(&p->owners[i], me | RSEQ_POOL_ON_STACK, __ATOMIC_RELAXED);
    for (unsigned int tries = 0; tries < RSEQ_POOL_MAX_ABORTS; tries++) {
        int cpu = rseq_pool_cpu(p, rs);
        if (cpu < 0)
            break;
        int ret = rseq_pool_push_on(p, rs, (uint32_t)cpu, i);
        if (ret == 0)
            return 0;
        if (ret == 1)
            break;
        if (ret == RSEQ_POOL_E_DAMAGED)
            return ret;
    }
    rseq_pool_release(p, i);
    return 0;
}

/* A CPU that ran dry with an empty overflow: move to each CPU that has
 * blocks cached, pop up to half of them there, come back.  Returns one
 * block (owned by me), the rest go on this thread's stack; -1 if none. */
static inline int64_t rseq_pool_steal(struct rseq_pool *p, struct rseq_abi *rs, uint64_t me)
{
    if (!RSEQ_PERCPU_USE_CS(rs))
        return -1;
    size_t setsize = CPU_ALLOC_SIZE(p->ncpu > 1024 ? p->ncpu : 1024);
    cpu_set_t *saved = CPU_ALLOC(p->ncpu > 1024 ? p->ncpu : 1024);
    cpu_set_t *one = CPU_ALLOC(p->ncpu > 1024 ? p->ncpu : 1024);
    uint64_t got[RSEQ_POOL_MAX_BATCH];
    uint32_t ngot = 0;
    int moved = 0;
    if (!saved || !one || sched_getaffinity(0, setsize, saved) != 0)
        goto out;
    for (uint32_t c = 0; c < p->ncpu && ngot == 0; c++) {
        uint64_t n = rseq_pool_count_of((uint64_t)__atomic_load_n(rseq_pool_word(p, c),
                                                                   __ATOMIC_RELAXED));
        if (n == 0)
            continue;
        CPU_ZERO_S(setsize, one);
        CPU_SET_S(c, setsize, one);
        if (sched_setaffinity(0, setsize, one) != 0)
            continue; /* not allowed there (cpuset) or offline */
        moved = 1;
        uint64_t want = (n + 1) / 2;
        if (want > RSEQ_POOL_MAX_BATCH)
            want = RSEQ_POOL_MAX_BATCH;
        for (unsigned int tries = 0; ngot < want && tries < RSEQ_POOL_MAX_ABORTS; tries++) {
            if (rseq_current_index(rs, RSEQ_INDEX_CPU_ID) != (int)c)
                continue; /* the move is not visible yet: the next sequence aborts */
            uint64_t i;
            int ret = rseq_pool_pop_on(p, rs, c, me, &i);
            if (ret == 0)
                got[ngot++] = i;
            else if (ret != -1)
                break;
        }
    }
out:
    if (moved)
        sched_setaffinity(0, setsize, saved);
    if (saved)
        CPU_FREE(saved);
    if (one)
        CPU_FREE(one);
    for (uint32_t k = 1; k < ngot; k++)
        rseq_pool_put_back(p, rs, me, got[k]);
    return ngot ? (int64_t)got[0] : -1;
}

/* The stack was empty: take a batch from the overflow (one for the caller,
 * the rest cached on this CPU), or steal from other CPUs. */
static inline int64_t rseq_pool_refill(struct rseq_pool *p, struct rseq_abi *rs, uint64_t me)
{
    int64_t first = rseq_pool_take(p, me);
    if (first < 0)
        return rseq_pool_steal(p, rs, me);
    if (rseq_pool_cpu(p, rs) >= 0) {
        for (uint32_t k = 1; k < p->batch; k++) {
            int64_t i = rseq_pool_take(p, me);
            if (i < 0)
                break;
            rseq_pool_put_back(p, rs, me, (uint64_t)i);
        }
    }
    return first;
}

/* ---------------------------------------------------------------------------
 * The operations
 * ------------------------------------------------------------------------- */

/* Allocate a block owned by `me`: its index; RSEQ_POOL_EMPTY when no block
 * was found (run reclaim() and try again before calling the pool
 * exhausted); E_DAMAGED. */
static inline RSEQ_POOL_HOT int64_t rseq_pool_alloc(struct rseq_pool *p, struct rseq_abi *rs,
                                                    uint64_t me)
{
    for (unsigned int tries = 0; tries < RSEQ_POOL_MAX_ABORTS; tries++) {
        int cpu = rseq_pool_cpu(p, rs);
        if (cpu < 0)
            break;
        RSEQ_INJECT_C(7);
        uint64_t i;
        int ret = rseq_pool_pop_on(p, rs, (uint32_t)cpu, me, &i);
        if (__builtin_expect(ret == 0, 1))
            return (int64_t)i;
        if (ret == 1)
            return rseq_pool_refill(p, rs, me);
        if (ret == RSEQ_POOL_E_DAMAGED)
            return ret;
    }
    /* No sequences for this thread: the overflow, then the stacks of CPUs
     * we can move to (if the thread has an area at all). */
    int64_t i = rseq_pool_take(p, me);
    return i >= 0 ? i : rseq_pool_steal(p, rs, me);
}

/* Free block i, which `me` must own.  0 done; E_RANGE, E_FREED, E_NOT_OWNER
 * (*owner_out then holds the owner word found), E_DAMAGED. */
static inline RSEQ_POOL_HOT int rseq_pool_free(struct rseq_pool *p, struct rseq_abi *rs,
                                               uint64_t me, uint64_t i, uint64_t *owner_out)
{
    if (i >= p->block_count)
        return RSEQ_POOL_E_RANGE;
    uint64_t owner = __atomic_load_n(&p->owners[i], __ATOMIC_RELAXED);
    if (__builtin_expect(owner != me, 0)) {
        *owner_out = owner;
        return owner == RSEQ_POOL_FREE || (owner & ~RSEQ_POOL_FLAGS) == me
                   ? RSEQ_POOL_E_FREED : RSEQ_POOL_E_NOT_OWNER;
    }
    /* Mark first (a plain store: nobody else writes the word of a block we
     * own), then push; killed in between, the block is still ours. */
    __atomic_store_n(&p->owners[i], me | RSEQ_POOL_ON_STACK, __ATOMIC_RELAXED);
    for (unsigned int tries = 0; tries < RSEQ_POOL_MAX_ABORTS; tries++) {
        int cpu = rseq_pool_cpu(p, rs);
        if (cpu < 0)
            break;
        RSEQ_INJECT_C(7);
        int ret = rseq_pool_push_on(p, rs, (uint32_t)cpu, i);
        if (__builtin_expect(ret == 0, 1))
            return 0;
        if (ret == 1)
            break; /* full: to the overflow */
        if (ret == RSEQ_POOL_E_DAMAGED)
            return ret;
    }
    rseq_pool_release(p, i);
    return 0;
}

/* Hand block i, owned by `me`, to the live process `target` (an identity):
 * from then on only it may free the block. */
static inline int rseq_pool_give(struct rseq_pool *p, uint64_t me, uint64_t i, uint64_t target,
                                 uint64_t *owner_out)
{
    if (i >= p->block_count)
        return RSEQ_POOL_E_RANGE;
    uint64_t expect = me;
    if (!__atomic_compare_exchange_n(&p->owners[i], &expect, target, 0, __ATOMIC_ACQ_REL,
                                     __ATOMIC_RELAXED)) {
        *owner_out = expect;
        return expect == RSEQ_POOL_FREE || (expect & ~RSEQ_POOL_FLAGS) == me
                   ? RSEQ_POOL_E_FREED : RSEQ_POOL_E_NOT_OWNER;
    }
    return 0;
}

/* ---------------------------------------------------------------------------
 * Looking at the whole pool: reclaim() and stats()
 * ------------------------------------------------------------------------- */

struct rseq_pool_census {
    uint64_t on_stacks;     /* free, cached on CPU stacks */
    uint64_t in_overflow;   /* free, in the overflow */
    uint64_t live_owned;    /* owned by live processes */
    uint64_t dead_owned;    /* owned by dead processes (before reclaim) */
    uint64_t reclaimed;     /* returned to the overflow by this call */
    uint64_t hints_repaired;
    uint64_t damaged;       /* stack entries out of range */
};

/* Distinct owner identities and whether each is alive: open addressing. */
struct rseq_pool_owner_table {
    uint64_t *keys;         /* 0: empty slot (FREE is never a key) */
    signed char *alive;
    uint64_t size;
};

static inline signed char *rseq_pool_owner_slot(struct rseq_pool_owner_table *t, uint64_t id)
{
    uint64_t h = (id * 0x9e3779b97f4a7c15ULL) & (t->size - 1);
    while (t->keys[h] != 0 && t->keys[h] != id)
        h = (h + 1) & (t->size - 1);
    if (t->keys[h] == 0) {
        t->keys[h] = id;
        t->alive[h] = -1;
    }
    return &t->alive[h];
}

/* Count everything; with `reclaim`, give the blocks of dead owners back.
 * 0, or -1 (ENOMEM). */
static inline int rseq_pool_census(struct rseq_pool *p, int reclaim,
                                   struct rseq_pool_census *out)
{
    memset(out, 0, sizeof *out);
    uint64_t n = p->block_count;
    struct rseq_pool_owner_table t = {NULL, NULL, 64};
    while (t.size < 2 * n && t.size < (1ULL << 22))
        t.size <<= 1;
    t.keys = calloc(t.size, sizeof *t.keys);
    t.alive = calloc(t.size, 1);
    uint64_t *on_stack = calloc((n + 63) / 64, sizeof *on_stack);
    int ret = -1;
    if (!t.keys || !t.alive || !on_stack)
        goto out;
    /* 1. Who is dead: decided before the stacks are scanned (see the top). */
    uint64_t distinct = 0;
    for (uint64_t i = 0; i < n; i++) {
        uint64_t o = __atomic_load_n(&p->owners[i], __ATOMIC_ACQUIRE) & ~RSEQ_POOL_FLAGS;
        if (o == RSEQ_POOL_FREE)
            continue;
        signed char *alive = rseq_pool_owner_slot(&t, o);
        if (*alive < 0) {
            *alive = (signed char)rseq_pool_owner_alive(o);
            if (++distinct * 2 >= t.size)
                break; /* table full: the rest is judged alive below (kept) */
        }
    }
    /* 2. What the stacks hold. */
    for (uint32_t c = 0; c < p->ncpu; c++) {
        uint64_t count = rseq_pool_count_of((uint64_t)__atomic_load_n(rseq_pool_word(p, c),
                                                                      __ATOMIC_ACQUIRE));
        if (count > p->cache) {
            out->damaged++;
            count = p->cache;
        }
        for (uint64_t k = 0; k < count; k++) {
            uint64_t i = (uint64_t)__atomic_load_n(&rseq_pool_slots(p, c)[k], __ATOMIC_RELAXED);
            if (i >= n) {
                out->damaged++;
                continue;
            }
            on_stack[i / 64] |= 1ULL << (i % 64);
            out->on_stacks++;
        }
    }
    /* 3. Every block not on a stack. */
    for (uint64_t i = 0; i < n; i++) {
        if (on_stack[i / 64] & (1ULL << (i % 64)))
            continue;
        uint64_t o = __atomic_load_n(&p->owners[i], __ATOMIC_ACQUIRE);
        if (o == RSEQ_POOL_FREE) {
            out->in_overflow++;
            if (reclaim && !(__atomic_load_n(&p->bitmap[i / 64], __ATOMIC_RELAXED)
                             & (1ULL << (i % 64)))) {
                rseq_pool_hint(p, i);
                out->hints_repaired++;
            }
            continue;
        }
        uint64_t id = o & ~RSEQ_POOL_FLAGS;
        uint64_t h = (id * 0x9e3779b97f4a7c15ULL) & (t.size - 1);
        int alive = 1;
        while (t.keys[h] != 0) {
            if (t.keys[h] == id) {
                alive = t.alive[h] != 0; /* -1 (not judged) counts as alive */
                break;
            }
            h = (h + 1) & (t.size - 1);
        }
        if (alive) {
            out->live_owned++;
            continue;
        }
        out->dead_owned++;
        if (reclaim && __atomic_compare_exchange_n(&p->owners[i], &o, RSEQ_POOL_FREE, 0,
                                                   __ATOMIC_ACQ_REL, __ATOMIC_RELAXED)) {
            rseq_pool_hint(p, i);
            out->reclaimed++;
        }
    }
    ret = 0;
out:
    free(t.keys);
    free(t.alive);
    free(on_stack);
    return ret;
}

#endif /* RSEQ_PY_POOL_H */
