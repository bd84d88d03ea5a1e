/*
 * bench_percpu.c - C-level cost of the per-CPU add beside an atomic
 * fetch-add, as a command: the thin main of the measurement that `python -m
 * rseq bench` reports (csrc/lib/percpu_bench.c), linked with the package's
 * registration (glibc's area when glibc registered the thread, else an area
 * of its own, as in the package).
 *
 * Build and run (release build: no injection), from the repository root:
 *   gcc -std=gnu11 -O2 -pthread -I csrc/lib -I src/rseq/include \
 *       benchmarks/c/bench_percpu.c csrc/lib/percpu_bench.c \
 *       csrc/lib/registration.c csrc/lib/cpus.c -o /tmp/bench_percpu -ldl
 *   /tmp/bench_percpu [iterations] [runs]
 *
 * Rows: ns per operation, median of `runs` runs; the 2-thread rows are per
 * operation per thread, each thread pinned to its own CPU.  Exit: 0, 1 when
 * a run failed (lost counts), 2 usage, 77 no rseq here.
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>

#include "arch.h"
#include "percpu_bench.h"
#include "registration.h"

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double median(double *v, int n)
{
    qsort(v, (size_t)n, sizeof(*v), cmp_double);
    return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

/* The median of `runs` runs of kind with nthreads threads, or -1. */
static double measure(enum rseq_bench_kind kind, int nthreads, long iterations, int runs)
{
    double ns[99];
    const char *error = NULL;

    for (int r = 0; r < runs; r++) {
        if (rseq_bench_run(kind, nthreads, iterations, &ns[r], &error) < 0) {
            fprintf(stderr, "bench_percpu: %s, %d threads: %s\n", rseq_bench_name(kind),
                    nthreads, error);
            return -1;
        }
    }
    return median(ns, runs);
}

int main(int argc, char **argv)
{
    long iterations = argc > 1 ? atol(argv[1]) : 50 * 1000 * 1000;
    int runs = argc > 2 ? atoi(argv[2]) : 7;
    static const struct { enum rseq_bench_kind kind; const char *label; int pairs; } rows[] = {
        {RSEQ_BENCH_CPU_READ, "cpu_id read (inline)", 0},
        {RSEQ_BENCH_SCHED_GETCPU, "sched_getcpu()", 0},
        {RSEQ_BENCH_RSEQ_ADD, "rseq add (load_add_store)", 1},
        {RSEQ_BENCH_FALLBACK_ADD, "fallback add (atomic)", 1},
        {RSEQ_BENCH_ATOMIC_ADD, "atomic fetch-add", 1},
    };
    int failed = 0;

    if (runs < 1 || runs > 99 || iterations < 1)
        return 2;
    if (!RSEQ_ARCH_HAS_CS) {
        printf("no rseq critical sections on %s\n", RSEQ_ARCH_NAME);
        return 77;
    }
    struct rseq_thread *t = rseq_thread_get();
    if (!t || !t->area) {
        printf("rseq unavailable: %s\n", t ? rseq_fallback_reason(t) : "out of memory");
        return 77;
    }
    printf("bench_percpu: %ld iterations x %d runs (median), %d CPUs, registration=%s\n",
           iterations, runs, rseq_process_get()->possible_cpus, rseq_owner_name(t->owner));
    printf("%-28s %10s %14s\n", "operation", "1 thread", "2 threads");
    for (size_t k = 0; k < sizeof(rows) / sizeof(rows[0]); k++) {
        double one = measure(rows[k].kind, 1, iterations, runs);
        double two = rows[k].pairs ? measure(rows[k].kind, 2, iterations, runs) : 0;
        failed |= one < 0 || two < 0;
        printf("%-28s %7.2f ns", rows[k].label, one);
        if (rows[k].pairs)
            printf(" %11.2f ns", two);
        printf("\n");
    }
    /* Every run checked its totals (percpu_bench.c). */
    printf("per-CPU totals %s\n", failed ? "MISMATCH" : "OK");
    return failed;
}
