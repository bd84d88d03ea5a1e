/*
 * param_test.c - stress validation of the per-CPU primitives of percpu.h.
 *
 * Runs one primitive from many threads (or forked processes sharing a
 * MAP_SHARED region) under delay injection, yields, sleeps, signal storms and
 * forced migrations, then checks exact expected results:
 *
 *   counter      load_add_store: sum of the slots == ops * inc (+ the adds
 *                that signal handlers made on top of the interrupted code)
 *   cbne         load_cbne_store used as a counter (expect read in C, so
 *                compare failures happen): sum == ops
 *   bov          load_add_bov_store on slots started near INTPTR_MAX: every
 *                slot moved by exactly its successful adds, never wrapped,
 *                and each overflow refusal happened on a slot that was full
 *   list         rseq_list_pop/push: every node is found exactly once at the
 *                end, and no node is ever popped while already popped
 *   store_store  load_cbne_store_store appending tags to a per-slot log:
 *                every tag committed exactly once, in a slot below the
 *                committed length (a loser's speculative store never lands
 *                on a committed entry)
 *   memcpy       load_cbne_memcpy_store appending 37-byte self-checking
 *                records: every committed record is a whole, untorn copy and
 *                every tag appears exactly once
 *
 * Build (test build):  gcc -O2 -pthread -I csrc/lib -I src/rseq/include \
 *                          -DRSEQ_INJECT=1 tests/c/param_test.c -o param_test -ldl
 * Exit: 0 OK, 1 FAIL (mismatch), 2 usage, 77 skipped (capability missing).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <getopt.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/auxv.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "percpu.h"

RSEQ_INJECT_DEFINE_GLOBALS

#ifndef SYS_rseq
#define SYS_rseq 334
#endif

#define MAX_WORKERS 256
#define EXIT_SKIP 77
#define CACHELINE 64

enum test_kind { T_COUNTER, T_CBNE, T_BOV, T_LIST, T_STORE_STORE, T_MEMCPY };
static const char *const test_names[] = {"counter", "cbne", "bov", "list", "store_store", "memcpy"};

/* ---------------------------------------------------------------------------
 * Options
 * ------------------------------------------------------------------------- */

static struct {
    enum test_kind test;
    int threads, procs;
    long reps;
    intptr_t inc;
    enum rseq_index_mode mode;
    int fallback;
    unsigned storm_us;    /* signal storm period, 0: off */
    unsigned migrate_us;  /* migration period, 0: off */
    int require_aborts;
    int broken;           /* -B: counter without any protection */
    int verbose;
    unsigned loops[RSEQ_INJECT_POINTS];
    int inject_mode;
    unsigned inject_every, sleep_us;
} opt = {.test = T_COUNTER, .threads = 4, .procs = 0, .reps = 10000, .inc = 1,
         .inject_every = 10, .sleep_us = 100};

/* ---------------------------------------------------------------------------
 * Shared state (MAP_SHARED so forked children see it)
 * ------------------------------------------------------------------------- */

struct slot {
    intptr_t value;
    intptr_t owner;        /* fallback owner word for store_store / memcpy */
    intptr_t successes;    /* bov bookkeeping (atomic, test only) */
    intptr_t refusals;
} __attribute__((aligned(CACHELINE)));

struct worker_stats {
    long ops, aborts, cmpfails, signals, handler_adds, empties, errors;
    pid_t pid, tid;
    int active;
} __attribute__((aligned(CACHELINE)));

struct node {
    struct rseq_list_node link; /* first: pop loads next at offset 0 */
    int id;
    int popped;                 /* 1 while some worker holds it */
};

#define RECORD_LEN 37           /* 4 words + 5 tail bytes: exercises both copy loops */
#define RECORD_STRIDE 40

struct shared {
    int ready, start, stop;
    long inject_aborts;         /* rseq_inject_aborts summed over processes */
    char failure[256];
    struct worker_stats stats[MAX_WORKERS];
};

static struct shared *sh;
static struct slot *slots;
static size_t nslots;
static struct rseq_list *lists;
static struct node *nodes;
static size_t nnodes;
static unsigned char *logs;     /* per slot: logcap entries of RECORD_STRIDE or 8 bytes */
static size_t logcap, log_entry;
static long total_workers;
static intptr_t bov_start;

/* ---------------------------------------------------------------------------
 * Registration: glibc's area if glibc registered, else our own 32 bytes
 * ------------------------------------------------------------------------- */

static ptrdiff_t glibc_offset;
static unsigned int glibc_size;
static int use_glibc;
static __thread struct rseq_abi own_area;
static __thread int own_registered;
static __thread struct rseq_abi *my_rs;
static __thread struct worker_stats *my_stats;
static __thread volatile int handler_may_work;

static const char *registration_name(void)
{
    return use_glibc ? "glibc" : "own";
}

static void discover_glibc(void)
{
    const ptrdiff_t *off = dlsym(RTLD_DEFAULT, "__rseq_offset");
    const unsigned int *size = dlsym(RTLD_DEFAULT, "__rseq_size");

    if (off && size && *size > 0) {
        use_glibc = 1;
        glibc_offset = *off;
        glibc_size = *size;
    }
}

/* mm_cid is usable if it lies within both the registered size and the
 * kernel's feature size (glibc's 32 means the 20-byte original layout). */
static int mm_cid_usable(void)
{
    unsigned long feature = getauxval(RSEQ_AT_FEATURE_SIZE);
    unsigned long active = use_glibc ? (glibc_size == RSEQ_ORIG_SIZE ? RSEQ_ORIG_FEATURE_SIZE
                                                                    : glibc_size)
                                     : RSEQ_ORIG_SIZE;
    unsigned long usable = active < feature ? active : feature;
    return usable >= RSEQ_END_MM_CID;
}

static struct rseq_abi *thread_register(void)
{
    if (use_glibc) {
        struct rseq_abi *rs = (struct rseq_abi *)((char *)rseq_arch_thread_pointer() + glibc_offset);
        return (int32_t)rs->cpu_id >= 0 ? rs : NULL;
    }
    /* Block signals across the syscall so no handler can run a sequence (or
     * register) against a half-registered area. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    long ret = syscall(SYS_rseq, &own_area, sizeof(own_area), 0, RSEQ_SIG);
    own_registered = ret == 0;
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    return own_registered ? &own_area : NULL;
}

/* Called with signals blocked: the area must not be used after this. */
static void thread_unregister(void)
{
    if (own_registered)
        syscall(SYS_rseq, &own_area, sizeof(own_area), RSEQ_FLAG_UNREGISTER, RSEQ_SIG);
    own_registered = 0;
}

/* ---------------------------------------------------------------------------
 * Helpers
 * ------------------------------------------------------------------------- */

static void fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void fail(const char *fmt, ...)
{
    va_list ap;
    char buf[256];
    va_start(ap, fmt);
    vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    /* keep the first failure only */
    if (__atomic_load_n(&sh->failure[0], __ATOMIC_RELAXED) == 0)
        snprintf(sh->failure, sizeof(sh->failure), "%s", buf);
}

static int current_index(void)
{
    int cpu = rseq_percpu_index(my_rs, opt.mode);
    if (cpu < 0 || (size_t)cpu >= nslots) {
        fail("index %d outside [0, %zu)", cpu, nslots);
        my_stats->errors++;
        return 0;
    }
    return cpu;
}

static void note_abort(void)
{
    my_stats->aborts++;
    RSEQ_INJECT_C(9);
}

static intptr_t record_word(intptr_t tag, int i)
{
    static const intptr_t salt[4] = {0, 0x5bd1e995, 0x27d4eb2f, 0x165667b1};
    return (tag * (2 * i + 1)) ^ salt[i];
}

static void make_record(unsigned char *rec, intptr_t tag)
{
    for (int i = 0; i < 4; i++) {
        intptr_t w = record_word(tag, i);
        memcpy(rec + 8 * i, &w, 8);
    }
    for (int i = 0; i < RECORD_LEN - 32; i++)
        rec[32 + i] = (unsigned char)(tag >> (8 * i)) ^ 0xa5;
}

/* Returns the record's tag, or 0 if the record is not a whole copy of one. */
static intptr_t check_record(const unsigned char *rec)
{
    intptr_t tag;
    unsigned char expect[RECORD_LEN];

    memcpy(&tag, rec, 8);
    make_record(expect, tag);
    return memcmp(expect, rec, RECORD_LEN) == 0 ? tag : 0;
}

/* ---------------------------------------------------------------------------
 * One operation of each test
 * ------------------------------------------------------------------------- */

static void add_once(intptr_t inc, int c_points)
{
    for (;;) {
        int cpu = current_index();
        if (c_points)
            RSEQ_INJECT_C(7);
        if (rseq_percpu_load_add_store(my_rs, opt.mode, &slots[cpu].value, inc, cpu) == 0)
            return;
        if (c_points)
            note_abort();
        else
            my_stats->aborts++;
    }
}

/* -B: the same add with no sequence and no atomic, to show that the check
 * does catch lost updates (expected to FAIL with several threads). */
static void add_unprotected(void)
{
    int cpu = current_index();
    volatile intptr_t *v = &slots[cpu].value;
    intptr_t x = *v;
    RSEQ_INJECT_C(8);
    for (volatile int i = 0; i < 50; i++)
        ;
    *v = x + opt.inc;
}

static void op_cbne(void)
{
    for (;;) {
        int cpu = current_index();
        RSEQ_INJECT_C(7);
        intptr_t expect = __atomic_load_n(&slots[cpu].value, __ATOMIC_RELAXED);
        RSEQ_INJECT_C(8);
        int ret = rseq_percpu_load_cbne_store(my_rs, opt.mode, &slots[cpu].value, expect,
                                              expect + 1, cpu);
        if (ret == 0)
            return;
        if (ret > 0)
            my_stats->cmpfails++;
        else
            note_abort();
    }
}

static void op_bov(void)
{
    for (;;) {
        int cpu = current_index();
        RSEQ_INJECT_C(7);
        int ret = rseq_percpu_load_add_bov_store(my_rs, opt.mode, &slots[cpu].value, opt.inc, cpu);
        if (ret == 0) {
            __atomic_fetch_add(&slots[cpu].successes, 1, __ATOMIC_RELAXED);
            return;
        }
        if (ret > 0) {
            /* refused: the slot must be too full for one more add */
            intptr_t now = __atomic_load_n(&slots[cpu].value, __ATOMIC_RELAXED);
            if (now <= INTPTR_MAX - opt.inc) {
                /* it may only have filled further since; it never shrinks */
                fail("bov refused on slot %d holding %ld", cpu, (long)now);
                my_stats->errors++;
            }
            __atomic_fetch_add(&slots[cpu].refusals, 1, __ATOMIC_RELAXED);
            my_stats->cmpfails++;
            return;
        }
        note_abort();
    }
}

static void op_log(intptr_t tag)
{
    unsigned char rec[RECORD_LEN];

    if (opt.test == T_MEMCPY)
        make_record(rec, tag);
    for (;;) {
        int cpu = current_index();
        RSEQ_INJECT_C(7);
        struct slot *s = &slots[cpu];
        intptr_t len = __atomic_load_n(&s->value, __ATOMIC_RELAXED);
        RSEQ_INJECT_C(8);
        if (len < 0 || (size_t)len >= logcap) {
            fail("log of slot %d full or corrupt: %ld", cpu, (long)len);
            my_stats->errors++;
            return;
        }
        unsigned char *entry = logs + ((size_t)cpu * logcap + (size_t)len) * log_entry;
        int ret;
        if (opt.test == T_MEMCPY)
            ret = rseq_percpu_load_cbne_memcpy_store(my_rs, opt.mode, &s->value, len, entry, rec,
                                                     RECORD_LEN, len + 1, &s->owner, cpu);
        else
            ret = rseq_percpu_load_cbne_store_store(my_rs, opt.mode, &s->value, len,
                                                    (intptr_t *)entry, tag, len + 1, &s->owner,
                                                    cpu);
        if (ret == 0)
            return;
        if (ret > 0)
            my_stats->cmpfails++;
        else
            note_abort();
    }
}

#define STASH 4

static void list_push_checked(struct node *n)
{
    __atomic_store_n(&n->popped, 0, __ATOMIC_RELEASE);
    if (rseq_list_push(my_rs, opt.mode, lists, nslots, &n->link) < 0) {
        fail("list push: index outside the lists");
        my_stats->errors++;
    }
}

static void op_list(long rep, struct node **stash, int *held)
{
    int index;
    struct rseq_list_node *got = rseq_list_pop(my_rs, opt.mode, lists, nslots, &index);

    if (index < 0) {
        fail("list pop: index outside the lists");
        my_stats->errors++;
        return;
    }
    if (got == NULL) {
        my_stats->empties++;
    } else {
        struct node *n = (struct node *)got;
        if (__atomic_exchange_n(&n->popped, 1, __ATOMIC_ACQ_REL) != 0) {
            fail("node %d popped twice (ABA)", n->id);
            my_stats->errors++;
        }
        stash[(*held)++] = n;
    }
    /* push back sometimes one, sometimes all: varies list depth */
    if (*held == STASH || (rep & 3) == 0) {
        while (*held > 0)
            list_push_checked(stash[--(*held)]);
    }
}

/* ---------------------------------------------------------------------------
 * Workers
 * ------------------------------------------------------------------------- */

static void on_signal(int sig)
{
    (void)sig;
    if (!my_stats)
        return;
    my_stats->signals++;
    /* A sequence inside the handler: the interrupted one (if any) was already
     * aborted by the kernel before this ran, so both stay exact. */
    if (opt.test == T_COUNTER && handler_may_work) {
        add_once(opt.inc, 0);
        my_stats->handler_adds++;
    }
}

static void *worker(void *arg)
{
    long id = (long)arg;
    struct worker_stats *st = &sh->stats[id];
    struct node *stash[STASH];
    int held = 0;

    my_stats = st;
    st->pid = getpid();
    st->tid = (pid_t)syscall(SYS_gettid);
    if (!opt.fallback) {
        my_rs = thread_register();
        if (!my_rs) {
            fail("thread %ld: rseq registration failed: %s", id, strerror(errno));
            st->errors++;
        }
    }
    handler_may_work = 1;
    __atomic_store_n(&st->active, 1, __ATOMIC_RELEASE);
    __atomic_fetch_add(&sh->ready, 1, __ATOMIC_ACQ_REL);
    while (!__atomic_load_n(&sh->start, __ATOMIC_ACQUIRE))
        sched_yield();

    if (opt.fallback || my_rs) {
        for (long r = 0; r < opt.reps; r++) {
            switch (opt.test) {
            case T_COUNTER:
                if (opt.broken)
                    add_unprotected();
                else
                    add_once(opt.inc, 1);
                break;
            case T_CBNE: op_cbne(); break;
            case T_BOV: op_bov(); break;
            case T_LIST: op_list(r, stash, &held); break;
            case T_STORE_STORE:
            case T_MEMCPY: op_log((intptr_t)(id * opt.reps + r + 1)); break;
            }
            st->ops++;
        }
        while (held > 0)
            list_push_checked(stash[--held]);
    }

    /* Leave: no more signals for us, then give the area back. */
    handler_may_work = 0;
    __atomic_store_n(&st->active, 0, __ATOMIC_RELEASE);
    sigset_t all;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, NULL);
    thread_unregister();
    return NULL;
}

static void run_threads(long first, int count)
{
    pthread_t th[MAX_WORKERS];
    for (int i = 0; i < count; i++)
        if (pthread_create(&th[i], NULL, worker, (void *)(first + i)) != 0) {
            perror("pthread_create");
            exit(2);
        }
    for (int i = 0; i < count; i++)
        pthread_join(th[i], NULL);
}

/* ---------------------------------------------------------------------------
 * Disturbers: signal storm and migration (run in the parent)
 * ------------------------------------------------------------------------- */

static void *storm(void *arg)
{
    (void)arg;
    while (!__atomic_load_n(&sh->stop, __ATOMIC_ACQUIRE)) {
        for (long i = 0; i < total_workers; i++) {
            struct worker_stats *st = &sh->stats[i];
            if (__atomic_load_n(&st->active, __ATOMIC_ACQUIRE))
                syscall(SYS_tgkill, st->pid, st->tid, SIGUSR1);
        }
        if (opt.storm_us > 1)
            usleep(opt.storm_us);
    }
    return NULL;
}

static void *migrate(void *arg)
{
    (void)arg;
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    unsigned int seed = 12345;
    cpu_set_t set;

    while (!__atomic_load_n(&sh->stop, __ATOMIC_ACQUIRE)) {
        for (long i = 0; i < total_workers; i++) {
            struct worker_stats *st = &sh->stats[i];
            if (!__atomic_load_n(&st->active, __ATOMIC_ACQUIRE))
                continue;
            CPU_ZERO(&set);
            CPU_SET(rand_r(&seed) % ncpu, &set);
            sched_setaffinity(st->tid, sizeof(set), &set); /* ESRCH if it just left */
        }
        usleep(opt.migrate_us);
    }
    return NULL;
}

/* ---------------------------------------------------------------------------
 * Setup and checks
 * ------------------------------------------------------------------------- */

static void *shared_alloc(size_t size)
{
    void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
        perror("mmap");
        exit(2);
    }
    return p;
}

static void setup_data(void)
{
    long ncpu = sysconf(_SC_NPROCESSORS_CONF);
    long total_ops = total_workers * opt.reps;

    /* cpu_id < CPUs configured; mm_cid < min(threads, CPUs); spare room */
    nslots = (size_t)(ncpu + total_workers + 1);
    slots = shared_alloc(nslots * sizeof(*slots));
    switch (opt.test) {
    case T_BOV: {
        /* Room for about a quarter of all adds per slot: with 2 CPUs, about
         * half of the adds are refused. */
        intptr_t room = (intptr_t)(total_ops / 4) * opt.inc;
        bov_start = INTPTR_MAX - room;
        for (size_t i = 0; i < nslots; i++)
            slots[i].value = bov_start;
        break;
    }
    case T_LIST: {
        lists = shared_alloc(nslots * sizeof(*lists));
        nnodes = 64 * nslots;
        nodes = shared_alloc(nnodes * sizeof(*nodes));
        for (size_t i = 0; i < nnodes; i++) {
            struct rseq_list *l = &lists[i % nslots];
            nodes[i].id = (int)i;
            nodes[i].link.next = l->head;
            l->head = &nodes[i].link;
        }
        break;
    }
    case T_STORE_STORE:
    case T_MEMCPY:
        logcap = (size_t)total_ops + 1;
        log_entry = opt.test == T_MEMCPY ? RECORD_STRIDE : sizeof(intptr_t);
        logs = shared_alloc(nslots * logcap * log_entry); /* touched lazily */
        break;
    default:
        break;
    }
}

static void check_results(long total_ops, long handler_adds)
{
    switch (opt.test) {
    case T_COUNTER:
    case T_CBNE: {
        intptr_t sum = 0;
        intptr_t inc = opt.test == T_COUNTER ? opt.inc : 1;
        for (size_t i = 0; i < nslots; i++)
            sum += slots[i].value;
        intptr_t expect = (intptr_t)(total_ops + handler_adds) * inc;
        printf("sum=%ld expected=%ld\n", (long)sum, (long)expect);
        if (sum != expect)
            fail("sum %ld != expected %ld", (long)sum, (long)expect);
        break;
    }
    case T_BOV: {
        long ok = 0, refused = 0;
        for (size_t i = 0; i < nslots; i++) {
            intptr_t v = slots[i].value;
            if (v < bov_start)
                fail("slot %zu wrapped: %ld", i, (long)v);
            if ((v - bov_start) != slots[i].successes * opt.inc)
                fail("slot %zu moved by %ld, %ld adds committed", i, (long)(v - bov_start),
                     (long)slots[i].successes);
            if (slots[i].refusals && v <= INTPTR_MAX - opt.inc)
                fail("slot %zu refused adds but has room", i);
            ok += slots[i].successes;
            refused += slots[i].refusals;
        }
        printf("committed=%ld refused=%ld total=%ld\n", ok, refused, total_ops);
        if (ok + refused != total_ops)
            fail("committed %ld + refused %ld != %ld", ok, refused, total_ops);
        break;
    }
    case T_LIST: {
        unsigned char *seen = calloc(nnodes, 1);
        size_t found = 0;
        for (size_t i = 0; i < nslots; i++) {
            for (struct rseq_list_node *n = lists[i].head; n; n = n->next) {
                struct node *nd = (struct node *)n;
                if (nd < nodes || nd >= nodes + nnodes) {
                    fail("list %zu holds a foreign pointer %p", i, (void *)n);
                    break;
                }
                if (seen[nd->id]++) {
                    fail("node %d found twice (list %zu)", nd->id, i);
                    break;
                }
                if (++found > nnodes)
                    break;
            }
        }
        printf("nodes found=%zu expected=%zu\n", found, nnodes);
        if (found != nnodes)
            fail("found %zu nodes, expected %zu", found, nnodes);
        free(seen);
        break;
    }
    case T_STORE_STORE:
    case T_MEMCPY: {
        unsigned char *seen = calloc((size_t)total_ops + 1, 1);
        long committed = 0;
        for (size_t i = 0; i < nslots; i++) {
            intptr_t len = slots[i].value;
            for (intptr_t j = 0; j < len; j++) {
                const unsigned char *e = logs + ((size_t)i * logcap + (size_t)j) * log_entry;
                intptr_t tag;
                if (opt.test == T_MEMCPY)
                    tag = check_record(e);
                else
                    memcpy(&tag, e, sizeof(tag));
                if (tag <= 0 || tag > total_ops) {
                    fail("slot %zu entry %ld is torn or foreign (tag %ld)", i, (long)j, (long)tag);
                    break;
                }
                if (seen[tag]++) {
                    fail("tag %ld committed twice", (long)tag);
                    break;
                }
                committed++;
            }
        }
        printf("entries=%ld expected=%ld\n", committed, total_ops);
        if (committed != total_ops)
            fail("%ld entries committed, expected %ld", committed, total_ops);
        free(seen);
        break;
    }
    }
}

static void usage(const char *argv0)
{
    fprintf(stderr,
            "usage: %s [-T counter|cbne|bov|list|store_store|memcpy] [-t threads] [-r reps]\n"
            "          [-P procs] [-M cpu|mm_cid] [-F] [-i inc] [-1..-9 loops]\n"
            "          [-y] [-s] [-k] [-e every] [-u sleep_us] [-S storm_us] [-m migrate_us]\n"
            "          [-A] [-B] [-v]\n"
            "  -T test      primitive to exercise (default counter)\n"
            "  -t threads   worker threads (per process with -P)\n"
            "  -r reps      operations per worker\n"
            "  -P procs     fork procs processes sharing the data (cpu_id mode only)\n"
            "  -M mode      index by cpu_id (default) or mm_cid (needs own registration)\n"
            "  -F           use the portable fallback (no rseq)\n"
            "  -N loops     delay loop count at injection point N (test build only)\n"
            "  -y/-s/-k     at C points, every -e-th time: yield / sleep -u us / raise SIGUSR1\n"
            "  -S us        signal storm: SIGUSR1 to every worker every us microseconds\n"
            "  -m us        migration: move every worker to a random CPU every us microseconds\n"
            "  -A           fail unless at least one sequence aborted\n"
            "  -B           counter only: unprotected plain add (must FAIL: checks the check)\n",
            argv0);
    exit(2);
}

static void parse(int argc, char **argv)
{
    int c;
    while ((c = getopt(argc, argv, "T:t:r:P:M:Fi:1:2:3:4:5:6:7:8:9:yske:u:S:m:ABvh")) != -1) {
        switch (c) {
        case 'T': {
            size_t i;
            for (i = 0; i < sizeof(test_names) / sizeof(test_names[0]); i++)
                if (strcmp(optarg, test_names[i]) == 0)
                    break;
            if (i == sizeof(test_names) / sizeof(test_names[0]))
                usage(argv[0]);
            opt.test = (enum test_kind)i;
            break;
        }
        case 't': opt.threads = atoi(optarg); break;
        case 'r': opt.reps = atol(optarg); break;
        case 'P': opt.procs = atoi(optarg); break;
        case 'M':
            if (strcmp(optarg, "cpu") == 0 || strcmp(optarg, "cpu_id") == 0)
                opt.mode = RSEQ_INDEX_CPU_ID;
            else if (strcmp(optarg, "mm_cid") == 0)
                opt.mode = RSEQ_INDEX_MM_CID;
            else
                usage(argv[0]);
            break;
        case 'F': opt.fallback = 1; break;
        case 'i': opt.inc = atol(optarg); break;
        case '1': case '2': case '3': case '4': case '5': case '6': case '7': case '8': case '9':
            opt.loops[c - '0'] = (unsigned)strtoul(optarg, NULL, 0);
            break;
        case 'y': opt.inject_mode |= RSEQ_INJECT_MODE_YIELD; break;
        case 's': opt.inject_mode |= RSEQ_INJECT_MODE_SLEEP; break;
        case 'k': opt.inject_mode |= RSEQ_INJECT_MODE_SIGNAL; break;
        case 'e': opt.inject_every = (unsigned)atoi(optarg); break;
        case 'u': opt.sleep_us = (unsigned)atoi(optarg); break;
        case 'S': opt.storm_us = (unsigned)atoi(optarg); break;
        case 'm': opt.migrate_us = (unsigned)atoi(optarg); break;
        case 'A': opt.require_aborts = 1; break;
        case 'B': opt.broken = 1; break;
        case 'v': opt.verbose = 1; break;
        default: usage(argv[0]);
        }
    }
    total_workers = (long)opt.threads * (opt.procs > 0 ? opt.procs : 1);
    if (opt.threads < 1 || opt.reps < 1 || opt.inc < 1 || total_workers > MAX_WORKERS)
        usage(argv[0]);
}

int main(int argc, char **argv)
{
    parse(argc, argv);
    discover_glibc();

#ifdef RSEQ_INJECT
    memcpy(rseq_inject_loops, opt.loops, sizeof(opt.loops));
    rseq_inject_mode = opt.inject_mode;
    rseq_inject_every = opt.inject_every;
    rseq_inject_sleep_us = opt.sleep_us;
    const char *build = "test";
#else
    for (int i = 0; i < RSEQ_INJECT_POINTS; i++)
        if (opt.loops[i]) {
            fprintf(stderr, "injection points need the test build (-DRSEQ_INJECT)\n");
            return 2;
        }
    if (opt.inject_mode) {
        fprintf(stderr, "-y/-s/-k need the test build (-DRSEQ_INJECT)\n");
        return 2;
    }
    const char *build = "release";
#endif

    if (opt.mode == RSEQ_INDEX_MM_CID && opt.procs > 0) {
        fprintf(stderr, "mm_cid is per process: -P needs -M cpu\n");
        return 2;
    }
    if (!opt.fallback) {
        if (!RSEQ_ARCH_HAS_CS) {
            printf("skipped: no rseq critical sections on %s\n", RSEQ_ARCH_NAME);
            return EXIT_SKIP;
        }
        if (opt.mode == RSEQ_INDEX_MM_CID && !mm_cid_usable()) {
            printf("skipped: mm_cid not usable with the %s registration (size %u, "
                   "kernel feature size %lu)\n",
                   registration_name(), use_glibc ? glibc_size : RSEQ_ORIG_SIZE,
                   getauxval(RSEQ_AT_FEATURE_SIZE));
            return EXIT_SKIP;
        }
        /* probe: can a thread of ours register at all? */
        if (!use_glibc) {
            long r = syscall(SYS_rseq, NULL, 0, 0, 0);
            if (r == -1 && errno == ENOSYS) {
                printf("skipped: rseq unavailable (ENOSYS)\n");
                return EXIT_SKIP;
            }
        }
    }

    sh = shared_alloc(sizeof(*sh));
    setup_data();

    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESTART;
    sigaction(SIGUSR1, &sa, NULL);

    printf("param_test: test=%s build=%s index=%s registration=%s threads=%d procs=%d reps=%ld "
           "inc=%ld fallback=%d storm_us=%u migrate_us=%u mode=%s%s%s every=%u loops=",
           test_names[opt.test], build, opt.mode == RSEQ_INDEX_MM_CID ? "mm_cid" : "cpu_id",
           opt.fallback ? "none" : registration_name(), opt.threads, opt.procs, opt.reps,
           (long)opt.inc, opt.fallback, opt.storm_us, opt.migrate_us,
           opt.inject_mode & RSEQ_INJECT_MODE_YIELD ? "y" : "",
           opt.inject_mode & RSEQ_INJECT_MODE_SLEEP ? "s" : "",
           opt.inject_mode & RSEQ_INJECT_MODE_SIGNAL ? "k" : "", opt.inject_every);
    for (int i = 1; i < RSEQ_INJECT_POINTS; i++)
        printf("%s%u", i > 1 ? "," : "", opt.loops[i]);
    printf("\n");
    fflush(stdout);

    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);

    pid_t children[MAX_WORKERS];
    int nprocs = opt.procs;
    if (nprocs > 0) {
        for (int p = 0; p < nprocs; p++) {
            children[p] = fork();
            if (children[p] < 0) {
                perror("fork");
                return 2;
            }
            if (children[p] == 0) {
                run_threads((long)p * opt.threads, opt.threads);
#ifdef RSEQ_INJECT
                __atomic_fetch_add(&sh->inject_aborts, (long)rseq_inject_aborts, __ATOMIC_RELAXED);
#endif
                _exit(0);
            }
        }
    }

    /* Wait for every worker to be registered and ready, then let them go
     * together with the disturbers. */
    pthread_t runners[MAX_WORKERS];
    if (nprocs == 0) {
        for (int i = 0; i < opt.threads; i++)
            pthread_create(&runners[i], NULL, worker, (void *)(long)i);
    }
    while (__atomic_load_n(&sh->ready, __ATOMIC_ACQUIRE) < total_workers)
        usleep(100);
    pthread_t storm_th, migrate_th;
    if (opt.storm_us)
        pthread_create(&storm_th, NULL, storm, NULL);
    if (opt.migrate_us)
        pthread_create(&migrate_th, NULL, migrate, NULL);
    __atomic_store_n(&sh->start, 1, __ATOMIC_RELEASE);

    int child_failed = 0;
    if (nprocs == 0) {
        for (int i = 0; i < opt.threads; i++)
            pthread_join(runners[i], NULL);
#ifdef RSEQ_INJECT
        sh->inject_aborts += (long)rseq_inject_aborts;
#endif
    } else {
        for (int p = 0; p < nprocs; p++) {
            int status;
            waitpid(children[p], &status, 0);
            if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
                fail("child %d ended with status 0x%x", (int)children[p], status);
                child_failed = 1;
            }
        }
    }
    __atomic_store_n(&sh->stop, 1, __ATOMIC_RELEASE);
    if (opt.storm_us)
        pthread_join(storm_th, NULL);
    if (opt.migrate_us)
        pthread_join(migrate_th, NULL);
    clock_gettime(CLOCK_MONOTONIC, &t1);

    struct worker_stats sum = {0};
    for (long i = 0; i < total_workers; i++) {
        struct worker_stats *st = &sh->stats[i];
        sum.ops += st->ops;
        sum.aborts += st->aborts;
        sum.cmpfails += st->cmpfails;
        sum.signals += st->signals;
        sum.handler_adds += st->handler_adds;
        sum.empties += st->empties;
        sum.errors += st->errors;
    }
    long aborts = sum.aborts + sh->inject_aborts;
    long expected_ops = total_workers * opt.reps;
    if (!child_failed && sum.ops != expected_ops)
        fail("%ld operations ran, expected %ld", sum.ops, expected_ops);
    check_results(expected_ops, sum.handler_adds);
    if (opt.require_aborts && aborts == 0)
        fail("no sequence aborted (expected some under this injection)");

    double secs = (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) * 1e-9;
    printf("ops=%ld aborts=%ld cmpfails=%ld signals=%ld handler_adds=%ld empties=%ld "
           "errors=%ld time=%.3fs\n",
           sum.ops, aborts, sum.cmpfails, sum.signals, sum.handler_adds, sum.empties,
           sum.errors, secs);
    if (sh->failure[0]) {
        printf("FAIL: %s\n", sh->failure);
        return 1;
    }
    printf("OK\n");
    return 0;
}
