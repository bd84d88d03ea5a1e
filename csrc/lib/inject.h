/*
 * inject.h - numbered delay-injection points for the per-CPU critical sections.
 *
 * Release build (RSEQ_INJECT undefined): every point expands to nothing, no
 * global is declared, and an object built from percpu.h carries no trace of
 * injection (tests/stress/test_primitives.py checks this with nm and objdump,
 * tests/integration/test_release_symbols.py on the installed rseq._core).
 *
 * Test build (compile with -DRSEQ_INJECT=1): each point becomes a delay loop
 * whose length is read, at run time, from a global array, so a harness can
 * widen any single window of a critical section and then hit it with
 * preemption, migration or a signal storm.  Exactly one translation unit of
 * the program (or extension module) must say RSEQ_INJECT_DEFINE_GLOBALS once
 * at file scope to define the globals below.
 *
 * Globals (hidden visibility: each shared object has its own set; the test
 * build extension module rseq._inject exposes them to Python):
 *
 *   unsigned int rseq_inject_loops[RSEQ_INJECT_POINTS]
 *       Spin count of each point; 0 (the default) means no delay.  Index is
 *       the point number; index 0 is unused.  Points 1-6 sit inside the
 *       assembly critical sections (they run with rseq_cs published, so any
 *       preemption, migration or signal there aborts the sequence):
 *         1  first instruction of the range, right after rseq_cs is published
 *         2  after the index (cpu_id / mm_cid) comparison
 *         3  after the load (and its compare) of the word to commit
 *         4  immediately before the committing store (after any speculative
 *            store, copy or second load)
 *         5  inside the copy loop of load_cbne_memcpy_store (once per
 *            8-byte chunk), so a long copy is a long window
 *         6  reserved for future architectures' own windows
 *       Points 7-9 are C points (RSEQ_INJECT_C), outside any sequence:
 *         7  between reading the index and entering the sequence
 *         8  after the C read of a list head, log length or expected value
 *            (the stress workload, csrc/testing/workload.c)
 *         9  after an aborted (-1) attempt, before the retry
 *   int rseq_inject_mode
 *       Bit mask of actions a C point takes every rseq_inject_every-th time a
 *       thread passes any C point: RSEQ_INJECT_MODE_YIELD (sched_yield),
 *       RSEQ_INJECT_MODE_SLEEP (usleep(rseq_inject_sleep_us)),
 *       RSEQ_INJECT_MODE_SIGNAL (raise(rseq_inject_signal): the handler must
 *       be installed by the harness).  0 (default): only the delay loop.
 *   unsigned int rseq_inject_every      period of the actions above (0: never)
 *   unsigned int rseq_inject_sleep_us   sleep length for RSEQ_INJECT_MODE_SLEEP
 *   int rseq_inject_signal              signal for RSEQ_INJECT_MODE_SIGNAL
 *                                       (0 means SIGUSR1)
 *   unsigned long rseq_inject_aborts    number of -1 results seen by the
 *                                       retry loops of the workload (relaxed
 *                                       atomic increments; read it, reset it)
 *
 * The asm delay loop itself is architecture code: the arch header defines
 * RSEQ_ARCH_INJECT_ASM(n) and RSEQ_ARCH_INJECT_CLOBBER (the scratch register
 * it uses), and this file only switches them on or off.
 */
#ifndef RSEQ_PY_INJECT_H
#define RSEQ_PY_INJECT_H

#define RSEQ_INJECT_POINTS 10

#define RSEQ_INJECT_MODE_YIELD 1
#define RSEQ_INJECT_MODE_SLEEP 2
#define RSEQ_INJECT_MODE_SIGNAL 4

#ifdef RSEQ_INJECT

#include <sched.h>
#include <signal.h>
#include <unistd.h>

#define RSEQ_INJECT_HIDDEN __attribute__((visibility("hidden")))

extern RSEQ_INJECT_HIDDEN unsigned int rseq_inject_loops[RSEQ_INJECT_POINTS];
extern RSEQ_INJECT_HIDDEN int rseq_inject_mode;
extern RSEQ_INJECT_HIDDEN unsigned int rseq_inject_every;
extern RSEQ_INJECT_HIDDEN unsigned int rseq_inject_sleep_us;
extern RSEQ_INJECT_HIDDEN int rseq_inject_signal;
extern RSEQ_INJECT_HIDDEN unsigned long rseq_inject_aborts;
extern RSEQ_INJECT_HIDDEN __thread unsigned int rseq_inject_tick;

#define RSEQ_INJECT_DEFINE_GLOBALS                                            \
    RSEQ_INJECT_HIDDEN unsigned int rseq_inject_loops[RSEQ_INJECT_POINTS];    \
    RSEQ_INJECT_HIDDEN int rseq_inject_mode;                                  \
    RSEQ_INJECT_HIDDEN unsigned int rseq_inject_every;                        \
    RSEQ_INJECT_HIDDEN unsigned int rseq_inject_sleep_us = 1000;              \
    RSEQ_INJECT_HIDDEN int rseq_inject_signal;                                \
    RSEQ_INJECT_HIDDEN unsigned long rseq_inject_aborts;                      \
    RSEQ_INJECT_HIDDEN __thread unsigned int rseq_inject_tick;

static inline void rseq_inject_c(int point)
{
    unsigned int loops = __atomic_load_n(&rseq_inject_loops[point], __ATOMIC_RELAXED);
    unsigned int every = __atomic_load_n(&rseq_inject_every, __ATOMIC_RELAXED);
    int mode = __atomic_load_n(&rseq_inject_mode, __ATOMIC_RELAXED);

    for (unsigned int i = 0; i < loops; i++)
        __asm__ __volatile__("" ::: "memory"); /* keep the loop: it is the delay */
    if (mode == 0 || every == 0 || ++rseq_inject_tick % every != 0)
        return;
    if (mode & RSEQ_INJECT_MODE_YIELD)
        sched_yield();
    if (mode & RSEQ_INJECT_MODE_SLEEP)
        usleep(rseq_inject_sleep_us);
    if (mode & RSEQ_INJECT_MODE_SIGNAL)
        raise(rseq_inject_signal ? rseq_inject_signal : SIGUSR1);
}

#define RSEQ_INJECT_ASM(n) RSEQ_ARCH_INJECT_ASM(n)
#define RSEQ_INJECT_CLOBBER RSEQ_ARCH_INJECT_CLOBBER
#define RSEQ_INJECT_C(n) rseq_inject_c(n)
#define RSEQ_INJECT_ABORTED() \
    __atomic_fetch_add(&rseq_inject_aborts, 1, __ATOMIC_RELAXED)

#else /* release build: nothing at all */

#define RSEQ_INJECT_DEFINE_GLOBALS
#define RSEQ_INJECT_ASM(n)
#define RSEQ_INJECT_CLOBBER
#define RSEQ_INJECT_C(n) ((void)0)
#define RSEQ_INJECT_ABORTED() ((void)0)

#endif /* RSEQ_INJECT */

#endif /* RSEQ_PY_INJECT_H */
