/*
 * bench.c - C-level timing of the per-CPU add beside an atomic fetch-add,
 * for `python -m rseq bench` (so the C figures come from the same run as the
 * Python ones).  Each worker is a pthread pinned to CPU (worker % CPUs), the
 * GIL is released, and the totals are checked: a benchmark that loses
 * counts is a failed benchmark.
 */
#define PY_SSIZE_T_CLEAN
#define _GNU_SOURCE
#include <Python.h>

#include <pthread.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core.h"
#include "counter.h"

enum bench_kind { BENCH_RSEQ_ADD, BENCH_ATOMIC_ADD, BENCH_CPU_READ };

struct bench_shared {
    enum bench_kind kind;
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
    return ts.tv_sec * 1e9 + ts.tv_nsec;
}

static void *bench_thread(void *arg)
{
    struct bench_worker *w = arg;
    struct bench_shared *s = w->shared;
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(w->cpu, &set);
    pthread_setaffinity_np(pthread_self(), sizeof set, &set);
    struct rseq_abi *rs = counter_thread_area();
    w->ok = s->kind == BENCH_ATOMIC_ADD || rs != NULL;
    pthread_barrier_wait(&s->barrier);
    if (!w->ok)
        return NULL;
    long n = s->iterations;
    double t0 = now_ns();
    switch (s->kind) {
    case BENCH_RSEQ_ADD:
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
    case BENCH_ATOMIC_ADD:
        for (long i = 0; i < n; i++)
            __atomic_fetch_add(&s->atomic_counter, 1, __ATOMIC_RELAXED);
        break;
    case BENCH_CPU_READ: {
        int64_t sum = 0;
        for (long i = 0; i < n; i++)
            sum += *(volatile uint32_t *)&rs->cpu_id;
        __atomic_fetch_add(&s->sink, sum, __ATOMIC_RELAXED);
        break;
    }
    }
    w->ns = (now_ns() - t0) / (double)n;
    return NULL;
}

const char rseq_py_bench_c_doc[] =
"_bench_c($module, kind, threads, iterations, /)\n--\n\n"
"ns per operation per thread of `kind` ('rseq_add', 'atomic_add' or\n"
"'cpu_read') with `threads` pinned pthreads; checks the totals.";

PyObject *rseq_py_bench_c(PyObject *module, PyObject *args)
{
    (void)module;
    const char *kind_name;
    int nthreads;
    long iterations;
    if (!PyArg_ParseTuple(args, "sil:_bench_c", &kind_name, &nthreads, &iterations))
        return NULL;
    enum bench_kind kind;
    if (strcmp(kind_name, "rseq_add") == 0)
        kind = BENCH_RSEQ_ADD;
    else if (strcmp(kind_name, "atomic_add") == 0)
        kind = BENCH_ATOMIC_ADD;
    else if (strcmp(kind_name, "cpu_read") == 0)
        kind = BENCH_CPU_READ;
    else {
        PyErr_Format(PyExc_ValueError, "unknown benchmark %s", kind_name);
        return NULL;
    }
    if (nthreads < 1 || nthreads > 64 || iterations < 1) {
        PyErr_SetString(PyExc_ValueError, "1..64 threads and a positive iteration count");
        return NULL;
    }
    int ncpu = rseq_possible_cpus();
    struct bench_shared s = {.kind = kind, .iterations = iterations};
    struct bench_worker workers[64];
    pthread_t tids[64];
    int created = 0, failed = 0;
    if (posix_memalign((void **)&s.slots, 64, (size_t)ncpu * 64) != 0)
        return PyErr_NoMemory();
    memset(s.slots, 0, (size_t)ncpu * 64);
    pthread_barrier_init(&s.barrier, NULL, (unsigned)nthreads);
    Py_BEGIN_ALLOW_THREADS
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
    Py_END_ALLOW_THREADS
    pthread_barrier_destroy(&s.barrier);
    int64_t total = s.atomic_counter;
    for (int c = 0; c < ncpu; c++)
        total += s.slots[c * 8];
    free(s.slots);
    if (failed) {
        /* Threads blocked in the barrier would hang: fail loudly instead. */
        PyErr_SetString(PyExc_RuntimeError, "pthread_create failed");
        return NULL;
    }
    double sum = 0;
    for (int i = 0; i < nthreads; i++) {
        if (!workers[i].ok) {
            PyErr_SetString(PyExc_RuntimeError, "a benchmark thread has no rseq area");
            return NULL;
        }
        sum += workers[i].ns;
    }
    if (kind != BENCH_CPU_READ && total != (int64_t)nthreads * iterations) {
        PyErr_Format(PyExc_RuntimeError, "benchmark lost counts: %lld != %lld",
                     (long long)total, (long long)nthreads * iterations);
        return NULL;
    }
    return PyFloat_FromDouble(sum / nthreads);
}
