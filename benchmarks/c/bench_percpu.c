/*
 * bench_percpu.c - C-level cost of the per-CPU add beside an atomic fetch-add.
 *
 * Build and run (release build: no injection):
 *   gcc -O2 -pthread -I csrc/lib -I src/rseq/include benchmarks/c/bench_percpu.c \
 *       -o /tmp/bench_percpu -ldl && /tmp/bench_percpu [iterations] [runs]
 *
 * Rows (ns per operation, median of `runs` runs; the 2-thread rows are per
 * operation per thread, each thread pinned to its own CPU):
 *   cpu_id read            inline volatile load of cpu_id_start
 *   sched_getcpu           glibc's sched_getcpu() (vDSO / rseq area)
 *   rseq add               index read + rseq_load_add_store (+ retry loop)
 *   fallback add           sched_getcpu + atomic add on that CPU's slot
 *   atomic fetch-add       __atomic_fetch_add on one shared counter
 *   ... x2 threads         the same with 2 threads at once
 * Uses glibc's registration when glibc registered the thread, else registers
 * its own 32-byte area.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "percpu.h"

#ifndef SYS_rseq
#define SYS_rseq 334
#endif

struct slot {
    intptr_t value;
} __attribute__((aligned(128)));

#define MAX_SLOTS 1024
static struct slot slots[MAX_SLOTS];
static intptr_t shared_counter __attribute__((aligned(128)));
static long iterations = 50 * 1000 * 1000;
static int runs = 7;
static int ncpus;

static ptrdiff_t glibc_offset;
static int use_glibc;
static __thread struct rseq_abi own_area;

static struct rseq_abi *thread_rseq(void)
{
    if (use_glibc)
        return (struct rseq_abi *)((char *)rseq_arch_thread_pointer() + glibc_offset);
    if (syscall(SYS_rseq, &own_area, sizeof(own_area), 0, RSEQ_SIG) != 0 &&
        own_area.cpu_id == (uint32_t)RSEQ_CPU_ID_UNINITIALIZED)
        return NULL;
    return &own_area;
}

static double now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

static void pin(int cpu)
{
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    sched_setaffinity(0, sizeof(set), &set);
}

enum op { OP_CPU_READ, OP_SCHED_GETCPU, OP_RSEQ_ADD, OP_FALLBACK_ADD, OP_ATOMIC_ADD };
static const char *const op_names[] = {"cpu_id read (inline)", "sched_getcpu()",
                                       "rseq add (load_add_store)", "fallback add (atomic)",
                                       "atomic fetch-add"};

/* One timed loop: ns per operation. */
static double run_op(enum op op, struct rseq_abi *rs)
{
    long n = iterations;
    intptr_t sink = 0;
    double t0 = now_ns();

    switch (op) {
    case OP_CPU_READ:
        for (long i = 0; i < n; i++)
            sink += rseq_current_index(rs, RSEQ_INDEX_CPU_ID);
        break;
    case OP_SCHED_GETCPU:
        for (long i = 0; i < n; i++)
            sink += sched_getcpu();
        break;
    case OP_RSEQ_ADD:
        for (long i = 0; i < n; i++) {
            int cpu;
            do
                cpu = rseq_current_index(rs, RSEQ_INDEX_CPU_ID);
            while (rseq_load_add_store(rs, RSEQ_INDEX_CPU_ID, &slots[cpu].value, 1, cpu) < 0);
        }
        break;
    case OP_FALLBACK_ADD:
        for (long i = 0; i < n; i++) {
            int cpu = rseq_percpu_index(NULL, RSEQ_INDEX_CPU_ID);
            rseq_fallback_load_add_store(&slots[cpu].value, 1);
        }
        break;
    case OP_ATOMIC_ADD:
        for (long i = 0; i < n; i++)
            __atomic_fetch_add(&shared_counter, 1, __ATOMIC_RELAXED);
        break;
    }
    double t1 = now_ns();
    __asm__ __volatile__("" : : "r"(sink));
    return (t1 - t0) / (double)n;
}

/* 2 threads: each pinned to its own CPU, started together. */
struct pair_arg {
    enum op op;
    int cpu;
    double ns;
    pthread_barrier_t *barrier;
};

static void *pair_thread(void *p)
{
    struct pair_arg *a = p;
    pin(a->cpu);
    struct rseq_abi *rs = thread_rseq();
    pthread_barrier_wait(a->barrier);
    a->ns = run_op(a->op, rs);
    return NULL;
}

static double run_pair(enum op op)
{
    pthread_barrier_t barrier;
    pthread_t th[2];
    struct pair_arg args[2];

    pthread_barrier_init(&barrier, NULL, 2);
    for (int i = 0; i < 2; i++) {
        args[i] = (struct pair_arg){op, i % ncpus, 0, &barrier};
        pthread_create(&th[i], NULL, pair_thread, &args[i]);
    }
    for (int i = 0; i < 2; i++)
        pthread_join(th[i], NULL);
    pthread_barrier_destroy(&barrier);
    return (args[0].ns + args[1].ns) / 2;
}

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

int main(int argc, char **argv)
{
    if (argc > 1)
        iterations = atol(argv[1]);
    if (argc > 2)
        runs = atoi(argv[2]);
    if (runs < 1 || runs > 99 || iterations < 1)
        return 2;
    ncpus = (int)sysconf(_SC_NPROCESSORS_ONLN);

    const ptrdiff_t *off = dlsym(RTLD_DEFAULT, "__rseq_offset");
    const unsigned int *size = dlsym(RTLD_DEFAULT, "__rseq_size");
    use_glibc = off && size && *size > 0;
    if (use_glibc)
        glibc_offset = *off;
    if (!RSEQ_ARCH_HAS_CS) {
        printf("no rseq critical sections on %s\n", RSEQ_ARCH_NAME);
        return 77;
    }
    struct rseq_abi *rs = thread_rseq();
    if (!rs || (int32_t)rs->cpu_id < 0) {
        printf("rseq unavailable\n");
        return 77;
    }

    printf("bench_percpu: %ld iterations x %d runs (median), %d CPUs, registration=%s\n",
           iterations, runs, ncpus, use_glibc ? "glibc" : "own");
    printf("%-28s %10s %14s\n", "operation", "1 thread", "2 threads");

    enum op ops[] = {OP_CPU_READ, OP_SCHED_GETCPU, OP_RSEQ_ADD, OP_FALLBACK_ADD, OP_ATOMIC_ADD};
    for (size_t k = 0; k < sizeof(ops) / sizeof(ops[0]); k++) {
        double one[99], two[99];
        pin(0);
        for (int r = 0; r < runs; r++)
            one[r] = run_op(ops[k], rs);
        int pairs = ops[k] == OP_RSEQ_ADD || ops[k] == OP_ATOMIC_ADD || ops[k] == OP_FALLBACK_ADD;
        if (pairs)
            for (int r = 0; r < runs; r++)
                two[r] = run_pair(ops[k]);
        printf("%-28s %7.2f ns", op_names[ops[k]], median(one, runs));
        if (pairs)
            printf(" %11.2f ns", median(two, runs));
        printf("\n");
    }
    /* sanity: the per-CPU adds all landed */
    intptr_t sum = 0;
    for (int i = 0; i < MAX_SLOTS; i++)
        sum += slots[i].value;
    long expect = iterations * runs * 2L * 3; /* rseq + fallback, 1 + 2 threads */
    printf("per-CPU slots sum=%ld expected=%ld %s\n", (long)sum, expect,
           sum == expect ? "OK" : "MISMATCH");
    return sum == expect ? 0 : 1;
}
