/*
 * percpu_bench.h - the C-level timing of the per-CPU add beside an atomic
 * fetch-add, in pure C: measured once here, reported by `python -m rseq
 * bench` (csrc/py/bench.c, a thin binding: the C figures come from the same
 * run as the Python ones) and by benchmarks/c/bench_percpu.c (a thin main).
 *
 * Each worker is a pthread pinned to CPU (worker % possible CPUs), and the
 * totals are checked: a benchmark that loses counts is a failed benchmark.
 */
#ifndef RSEQ_PY_PERCPU_BENCH_H
#define RSEQ_PY_PERCPU_BENCH_H

enum rseq_bench_kind {
    RSEQ_BENCH_RSEQ_ADD,      /* index read + rseq_load_add_store, retried */
    RSEQ_BENCH_ATOMIC_ADD,    /* __atomic_fetch_add on one shared word */
    RSEQ_BENCH_CPU_READ,      /* volatile load of the area's cpu_id */
    RSEQ_BENCH_SCHED_GETCPU,  /* glibc's sched_getcpu() (vDSO or rseq area) */
    RSEQ_BENCH_FALLBACK_ADD,  /* sched_getcpu + the atomic fallback add */
    RSEQ_BENCH_KINDS
};

#define RSEQ_BENCH_MAX_THREADS 64

/* "rseq_add", "atomic_add", "cpu_read", "sched_getcpu", "fallback_add". */
const char *rseq_bench_name(enum rseq_bench_kind kind);
/* The kind named `name`, or -1. */
int rseq_bench_kind(const char *name);

/* Runs `kind` with `nthreads` pinned threads of `iterations` operations each
 * and stores the mean ns per operation per thread in *ns.  Returns 0, or -1
 * with *error saying why (bad arguments, a thread without an rseq area,
 * pthread_create failing, lost counts). */
int rseq_bench_run(enum rseq_bench_kind kind, int nthreads, long iterations, double *ns,
                   const char **error);

#endif /* RSEQ_PY_PERCPU_BENCH_H */
