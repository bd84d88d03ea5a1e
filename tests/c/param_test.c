/*
 * param_test.c - stress validation of the per-CPU primitives of percpu.h, as
 * a command: the thin main of the stress workload that rseq._inject runs
 * for `python -m rseq stress` (csrc/testing/workload.c).  The operations,
 * the shared state and the exact checks are the workload's; this file adds
 * the options, threads and forked processes, registration (linked from
 * csrc/lib/registration.c, as in the package), a signal storm and forced
 * migrations.
 *
 *   counter      load_add_store: sum of the cells == ops * inc (+ the adds
 *                that signal handlers made on top of the interrupted code)
 *   cbne         load_cbne_store used as a counter (expect read in C, so
 *                compare failures happen): sum == ops
 *   bov          load_add_bov_store on cells started near INTPTR_MAX with
 *                room for about a quarter of the adds: every cell moved by
 *                exactly its committed adds, never wrapped, each refusal
 *                happened on a cell that was full, and committed + refused
 *                == ops
 *   list         pop then push, a few nodes held at a time: every node is
 *                found exactly once at the end, and no node is ever popped
 *                while already popped
 *   store_store  load_cbne_store_store appending tags to a per-cell log
 *   memcpy       load_cbne_memcpy_store appending 37-byte self-checking
 *                records: the log is kept whole, every committed entry is an
 *                untorn copy and every tag appears exactly once
 *
 * Build (test build), from the repository root:
 *   gcc -std=gnu11 -O2 -pthread -I csrc/lib -I csrc/testing -I src/rseq/include \
 *       -DRSEQ_INJECT=1 tests/c/param_test.c csrc/testing/workload.c \
 *       csrc/lib/registration.c csrc/lib/cpus.c -o param_test -ldl
 * Exit: 0 OK, 1 FAIL (mismatch), 2 usage, 77 skipped (capability missing).
 */
#define _GNU_SOURCE
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

#include "registration.h"
#include "thread_area.h"
#include "workload.h"

RSEQ_INJECT_DEFINE_GLOBALS

#define MAX_THREADS 256
#define EXIT_SKIP 77

enum test_kind { T_COUNTER, T_CBNE, T_BOV, T_LIST, T_STORE_STORE, T_MEMCPY };
static const char *const test_names[] = {"counter", "cbne", "bov", "list", "store_store", "memcpy"};
static const enum prim_kind test_primitive[] = {PRIM_ADD, PRIM_CBNE, PRIM_BOV, PRIM_LIST,
                                                PRIM_STORE_STORE, PRIM_MEMCPY};

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

struct worker_stats {
    long ops, aborts, cmpfails, signals, handler_adds, empties, errors;
    pid_t pid, tid;
    int active;
} __attribute__((aligned(CACHELINE)));

struct shared {
    int ready, start, stop;
    char failure[256];
    struct worker_stats stats[MAX_THREADS];
};

static struct shared *sh;
static char *state;               /* the workload's state (workload.h) */
static long total_workers;

static __thread struct worker_stats *my_stats;
static __thread struct worker handler_worker; /* the add a signal handler runs */
static __thread volatile int handler_may_work;

static const char *registration_name(void)
{
    const struct rseq_process *p = rseq_process_get();
    return p->owner == RSEQ_OWNER_SELF ? "own" : rseq_owner_name(p->owner);
}

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

static void *shared_alloc(size_t size)
{
    void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
        perror("mmap");
        exit(2);
    }
    return p;
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
        worker_add_once(&handler_worker);
        my_stats->handler_adds++;
    }
}

static void *worker_thread(void *arg)
{
    long id = (long)arg;
    struct worker_stats *st = &sh->stats[id];
    struct worker w;

    memset(&w, 0, sizeof(w));
    w.base = state;
    w.hdr = (struct prim_header *)state;
    w.lay = &w.hdr->layout;
    w.mode = opt.mode;
    w.id = (uint32_t)id;
    my_stats = st;
    st->pid = getpid();
    st->tid = (pid_t)syscall(SYS_gettid);
    if (!opt.fallback) {
        /* registration.c: glibc's (or librseq's) area, else our own. */
        struct rseq_thread *t = rseq_thread_get();
        w.rs = t && RSEQ_PERCPU_USE_CS(t->area) ? t->area : NULL;
        if (!w.rs) {
            fail("thread %ld: rseq registration failed: %s", id,
                 t ? rseq_fallback_reason(t) : strerror(ENOMEM));
            st->errors++;
        }
    }
    w.lane = w.rs ? LANE_RSEQ : LANE_FALLBACK;
    handler_worker = w;
    handler_worker.no_c_points = 1;
    handler_may_work = 1;
    __atomic_store_n(&st->active, 1, __ATOMIC_RELEASE);
    __atomic_fetch_add(&sh->ready, 1, __ATOMIC_ACQ_REL);
    while (!__atomic_load_n(&sh->start, __ATOMIC_ACQUIRE))
        sched_yield();

    if (opt.fallback || w.rs) {
        if (opt.broken) {
            for (long r = 0; r < opt.reps; r++)
                worker_add_unprotected(&w);
        } else {
            worker_run(&w, opt.reps);
        }
        st->ops = opt.reps;
    }

    /* Leave: no more signals for us; the area is given back by
     * registration.c when the thread exits. */
    handler_may_work = 0;
    __atomic_store_n(&st->active, 0, __ATOMIC_RELEASE);
    sigset_t all;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, NULL);
    st->aborts = w.aborts + handler_worker.aborts;
    st->cmpfails = w.cmpfails + handler_worker.cmpfails;
    st->empties = w.empties;
    return NULL;
}

static void run_threads(long first, int count)
{
    pthread_t th[MAX_THREADS];
    for (int i = 0; i < count; i++)
        if (pthread_create(&th[i], NULL, worker_thread, (void *)(first + i)) != 0) {
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

static void setup_state(void)
{
    struct workload_options o = WORKLOAD_DEFAULTS;
    struct prim_layout lay;
    long total_ops = total_workers * opt.reps;

    o.inc = opt.inc;
    if (opt.test == T_BOV) {
        /* Room for about a quarter of all adds per cell, no drain: with 2
         * CPUs, about half of the adds are refused. */
        o.bov_start = INTPTR_MAX - (intptr_t)(total_ops / 4) * opt.inc;
        o.bov_drain = 0;
    }
    if (opt.test == T_STORE_STORE || opt.test == T_MEMCPY) {
        /* The whole log is kept (touched lazily): every entry is checked. */
        o.log_ring = (uint64_t)total_ops + 1;
        o.keep_log = 1;
    }
    layout_compute(&lay, test_primitive[opt.test], (uint32_t)total_workers,
                   (uint32_t)rseq_possible_cpus(), &o);
    state = shared_alloc(lay.size);
    state_init(state, &lay, 1);
}

static void check_results(long total_ops, long handler_adds)
{
    int64_t expected;
    int64_t got = workload_check(state, &((struct prim_header *)state)->layout, opt.reps,
                                 &expected);
    int64_t violations = __atomic_load_n(&((struct prim_header *)state)->violations,
                                         __ATOMIC_RELAXED);

    if (opt.test == T_COUNTER)
        expected = (int64_t)(total_ops + handler_adds) * opt.inc;
    printf("%s=%lld expected=%lld violations=%lld\n",
           opt.test == T_COUNTER || opt.test == T_CBNE ? "sum"
           : opt.test == T_LIST ? "nodes found" : "operations",
           (long long)got, (long long)expected, (long long)violations);
    if (violations)
        fail("%lld violations seen while running (index out of range, node popped twice, "
             "torn or foreign entry, full log, bov refused with room)", (long long)violations);
    if (got != expected)
        fail("got %lld, expected %lld", (long long)got, (long long)expected);
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
    /* A tag carries the rep number in 32 bits (make_tag). */
    if (opt.threads < 1 || opt.reps < 1 || opt.reps > MAX_REPS || opt.inc < 1
        || total_workers > MAX_THREADS || (opt.procs > 0 && opt.threads > MAX_THREADS))
        usage(argv[0]);
}

int main(int argc, char **argv)
{
    parse(argc, argv);

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
        /* can a thread of ours register at all? */
        if (rseq_process_get()->kernel == 0) {
            printf("skipped: rseq unavailable (ENOSYS)\n");
            return EXIT_SKIP;
        }
        /* mm_cid is usable if it lies within both the registered size and
         * the kernel's feature size (registration.c's usable size). */
        struct rseq_thread *t = rseq_thread_get();
        if (opt.mode == RSEQ_INDEX_MM_CID
            && (!t || !t->area || t->usable_size < RSEQ_END_MM_CID)) {
            printf("skipped: mm_cid not usable with the %s registration (size %u, "
                   "kernel feature size %lu)\n",
                   registration_name(), t && t->area ? t->registered_size : 0,
                   getauxval(RSEQ_AT_FEATURE_SIZE));
            return EXIT_SKIP;
        }
    }

    sh = shared_alloc(sizeof(*sh));
    setup_state();

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

    pid_t children[MAX_THREADS];
    int nprocs = opt.procs;
    for (int p = 0; p < nprocs; p++) {
        children[p] = fork();
        if (children[p] < 0) {
            perror("fork");
            return 2;
        }
        if (children[p] == 0) {
            run_threads((long)p * opt.threads, opt.threads);
            _exit(0);
        }
    }

    /* Wait for every worker to be registered and ready, then let them go
     * together with the disturbers. */
    pthread_t runners[MAX_THREADS];
    if (nprocs == 0) {
        for (int i = 0; i < opt.threads; i++)
            pthread_create(&runners[i], NULL, worker_thread, (void *)(long)i);
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
    long expected_ops = total_workers * opt.reps;
    if (!child_failed && sum.ops != expected_ops)
        fail("%ld operations ran, expected %ld", sum.ops, expected_ops);
    check_results(expected_ops, sum.handler_adds);
    if (opt.require_aborts && sum.aborts == 0)
        fail("no sequence aborted (expected some under this injection)");

    double secs = (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) * 1e-9;
    printf("ops=%ld aborts=%ld cmpfails=%ld signals=%ld handler_adds=%ld empties=%ld "
           "errors=%ld time=%.3fs\n",
           sum.ops, sum.aborts, sum.cmpfails, sum.signals, sum.handler_adds, sum.empties,
           sum.errors, secs);
    if (sh->failure[0]) {
        printf("FAIL: %s\n", sh->failure);
        return 1;
    }
    printf("OK\n");
    return 0;
}
