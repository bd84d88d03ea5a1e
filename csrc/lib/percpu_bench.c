/*
 * percpu_bench.c - the C-level timing of the per-CPU add (see
 * percpu_bench.h).  Pure C: no Python.h.
 */
#define _GNU_SOURCE
#include "percpu_bench.h"

#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "percpu.h"
#include "registration.h"
#include "thread_area.h"

static const char *const bench_names[RSEQ_BENCH_KINDS] = {
    "rseq_add", "atomic_add", "cpu_read", "sched_getcpu", "fallback_add",
};

const char *rseq_bench_name(enum rseq_bench_kind kind)
{
    return (unsigned)kind < RSEQ_BENCH_KINDS ? bench_names[kind] : NULL;
}

int rseq_bench_kind(const char *name)
{
    for (int k = 0; k < RSEQ_BENCH_KINDS; k++)
        if (strcmp(name, bench_names[k]) == 0)
            return k;
    return -1;
}

struct bench_shared {
    enum rseq_bench_kind kind;
    long iterations;
    int64_t *slots;          /* per-CPU, 64 bytes apart */
    int64_t atomic_counter;  /* one word every worker adds to */
    int64_t sink;
    pthread_barrier_t barrier;
};

struct bench_worker {
    struct bench_shared *shared;
    int cpu;
    double ns;
    int ok;
};

static double now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

static int needs_area(enum rseq_bench_kind kind)
{
    return kind == RSEQ_BENCH_RSEQ_ADD || kind == RSEQ_BENCH_CPU_READ;
}

static void *bench_thread(void *arg)
{
    struct bench_worker *w = arg;
    struct bench_shared *s = w->shared;
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(w->cpu, &set);
    pthread_setaffinity_np(pthread_self(), sizeof set, &set);
    struct rseq_thread *t = rseq_thread_get(); /* registers lazily */
    struct rseq_abi *rs = t ? t->area : NULL;
    w->ok = !needs_area(s->kind) || rs != NULL;
    pthread_barrier_wait(&s->barrier);
    if (!w->ok)
        return NULL;
    long n = s->iterations;
    int64_t sum = 0;
    double t0 = now_ns();
    switch (s->kind) {
    case RSEQ_BENCH_RSEQ_ADD:
#if RSEQ_ARCH_HAS_CS
        for (long i = 0; i < n && w->ok; i++) {
            int cpu, ret;
            unsigned int aborts = 0;
            do {
                /* Bounded: a lost registration would abort forever. */
                if (rseq_area_lost(rs) || aborts++ == RSEQ_PERCPU_MAX_ABORTS) {
                    w->ok = 0;
                    break;
                }
                cpu = rseq_current_index(rs, RSEQ_INDEX_CPU_ID);
                ret = rseq_load_add_store(rs, RSEQ_INDEX_CPU_ID,
                                          (intptr_t *)&s->slots[cpu * 8], 1, cpu);
            } while (__builtin_expect(ret != 0, 0));
        }
#else
        w->ok = 0; /* no critical sections on this architecture */
#endif
        break;
    case RSEQ_BENCH_ATOMIC_ADD:
        for (long i = 0; i < n; i++)
            __atomic_fetch_add(&s->atomic_counter, 1, __ATOMIC_RELAXED);
        break;
    case RSEQ_BENCH_CPU_READ:
        for (long i = 0; i < n; i++)
            sum += *(volatile uint32_t *)&rs->cpu_id;
        break;
    case RSEQ_BENCH_SCHED_GETCPU:
        for (long i = 0; i < n; i++)
            sum += sched_getcpu();
        break;
    case RSEQ_BENCH_FALLBACK_ADD:
        for (long i = 0; i < n; i++) {
            int cpu = rseq_percpu_index(NULL, RSEQ_INDEX_CPU_ID);
            rseq_fallback_load_add_store((intptr_t *)&s->slots[cpu * 8], 1);
        }
        break;
    default:
        break;
    }
    w->ns = (now_ns() - t0) / (double)n;
    __atomic_fetch_add(&s->sink, sum, __ATOMIC_RELAXED);
    return NULL;
}

int rseq_bench_run(enum rseq_bench_kind kind, int nthreads, long iterations, double *ns,
                   const char **error)
{
    if ((unsigned)kind >= RSEQ_BENCH_KINDS) {
        *error = "unknown benchmark";
        return -1;
    }
    if (nthreads < 1 || nthreads > RSEQ_BENCH_MAX_THREADS || iterations < 1) {
        *error = "1..64 threads and a positive iteration count";
        return -1;
    }
    int ncpu = rseq_possible_cpus();
    struct bench_shared s = {.kind = kind, .iterations = iterations};
    struct bench_worker workers[RSEQ_BENCH_MAX_THREADS];
    pthread_t tids[RSEQ_BENCH_MAX_THREADS];
    int created = 0, failed = 0;
    if (posix_memalign((void **)&s.slots, 64, (size_t)ncpu * 64) != 0) {
        *error = "out of memory";
        return -1;
    }
    memset(s.slots, 0, (size_t)ncpu * 64);
    pthread_barrier_init(&s.barrier, NULL, (unsigned)nthreads);
    for (int i = 0; i < nthreads; i++) {
        workers[i] = (struct bench_worker){.shared = &s, .cpu = i % ncpu};
        if (pthread_create(&tids[i], NULL, bench_thread, &workers[i]) != 0) {
            failed = 1;
            break;
        }
        created++;
    }
    for (int i = 0; i < created; i++)
        pthread_join(tids[i], NULL);
    pthread_barrier_destroy(&s.barrier);
    int64_t total = s.atomic_counter;
    for (int c = 0; c < ncpu; c++)
        total += s.slots[c * 8];
    free(s.slots);
    if (failed) {
        *error = "pthread_create failed";
        return -1;
    }
    double sum = 0;
    for (int i = 0; i < nthreads; i++) {
        if (!workers[i].ok) {
            *error = "a benchmark thread has no rseq area";
            return -1;
        }
        sum += workers[i].ns;
    }
    int counts = kind == RSEQ_BENCH_RSEQ_ADD || kind == RSEQ_BENCH_ATOMIC_ADD
                 || kind == RSEQ_BENCH_FALLBACK_ADD;
    if (counts && total != (int64_t)nthreads * iterations) {
        static __thread char message[80];
        snprintf(message, sizeof message, "benchmark lost counts: %lld != %lld",
                 (long long)total, (long long)nthreads * iterations);
        *error = message;
        return -1;
    }
    *ns = sum / nthreads;
    return 0;
}
