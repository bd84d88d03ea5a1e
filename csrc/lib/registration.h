/*
 * registration.h - process-wide rseq discovery and per-thread registration.
 *
 * Who owns a thread's registration is decided once per process, in order:
 *   1. glibc (>= 2.35) when `__rseq_size` is non-zero: its area is at the
 *      thread pointer + `__rseq_offset`;
 *   2. librseq when its exported `rseq_size` is non-zero: same, with
 *      `rseq_offset`;
 *   3. otherwise this package registers an area of its own per thread,
 *      lazily, and unregisters it before freeing it when the thread exits.
 * The symbols are looked up with dlsym at run time so that a build on an
 * older glibc still finds them on a newer one.
 *
 * Nothing here ever registers over, unregisters or writes the read-only
 * fields of an area it does not own.
 */
#ifndef RSEQ_PY_REGISTRATION_H
#define RSEQ_PY_REGISTRATION_H

#include <stdint.h>
#include <sys/types.h>

#include "arch.h"

enum rseq_owner {
    RSEQ_OWNER_NONE = 0,    /* nobody: the thread uses the fallback */
    RSEQ_OWNER_GLIBC = 1,
    RSEQ_OWNER_LIBRSEQ = 2,
    RSEQ_OWNER_SELF = 3,    /* this package registered the area */
};

/* Why a thread runs on the fallback path. */
enum rseq_fallback {
    RSEQ_FALLBACK_NONE = 0,
    RSEQ_FALLBACK_NO_KERNEL,        /* rseq(2) answered ENOSYS */
    RSEQ_FALLBACK_DENIED,           /* rseq(2) answered EPERM (seccomp) */
    RSEQ_FALLBACK_FOREIGN,          /* another registrant owns the thread */
    RSEQ_FALLBACK_OWNER_FAILED,     /* glibc/librseq did not register it */
    RSEQ_FALLBACK_NO_MEMORY,
    RSEQ_FALLBACK_ERROR,            /* any other errno, kept in fallback_errno */
    RSEQ_FALLBACK_UNREGISTERED,     /* unregister() released it; not re-registered */
    RSEQ_FALLBACK_LOST,             /* the registration ended behind our back */
};

/* Facts about the process, discovered once. */
struct rseq_process {
    int kernel;                 /* 1: rseq(2) exists; 0: ENOSYS; -1: denied (EPERM) */
    int probe_errno;            /* what rseq(NULL, 0, 0, 0) answered (EINVAL: present) */
    unsigned long feature_size; /* getauxval(AT_RSEQ_FEATURE_SIZE), 0 before 6.3 */
    unsigned long alignment;    /* getauxval(AT_RSEQ_ALIGN), 0 before 6.3 */
    enum rseq_owner owner;      /* glibc, librseq, or self */
    ptrdiff_t owner_offset;     /* thread pointer + this = area (glibc/librseq) */
    unsigned int owner_size;    /* as the owner reports it */
    unsigned int owner_flags;
    int glibc_symbols;          /* __rseq_offset & co. were found */
    unsigned int own_length;    /* length we register with, when owner is self */
    unsigned int own_alignment;
    int possible_cpus;
};

/* Per-thread state. Heap-allocated, reached through one initial-exec TLS
 * pointer (8 bytes of static TLS: a dlopen'ed module must not take more). */
struct rseq_thread {
    struct rseq_abi *area;      /* usable area, or NULL on the fallback */
    uint32_t usable_size;       /* min(registered length, feature size) */
    uint32_t registered_size;   /* length of the registration in force */
    uint32_t refcount;          /* explicit register() references */
    enum rseq_owner owner;
    enum rseq_fallback fallback;
    int fallback_errno;
    int own_registered;         /* our area is registered with the kernel now */
    void *own_area;             /* our allocation, kept while the thread lives */
    int lazy;                   /* a read registered our area: its own reference,
                                 * which only thread exit drops */
};

/* The fast-path pointer: the current thread's usable area or NULL. */
extern __thread struct rseq_abi *rseq_tls_area
    __attribute__((tls_model("initial-exec")));

const struct rseq_process *rseq_process_get(void);

/* The current thread's state, registering lazily. Never NULL unless
 * memory is exhausted (then errno is ENOMEM). */
struct rseq_thread *rseq_thread_get(void);

/* The calling thread's state without registering (NULL if none yet). */
struct rseq_thread *rseq_thread_peek(void);

/* The calling thread's usable area, or NULL on the fallback, after checking
 * that the kernel still maintains it: when cpu_id is no longer a CPU number
 * (someone called rseq(2) RSEQ_FLAG_UNREGISTER on it, or librseq's
 * rseq_unregister_current_thread()), the thread moves to the fallback
 * (RSEQ_FALLBACK_LOST) and NULL is returned.  Registers lazily. */
struct rseq_abi *rseq_thread_area_checked(void);

/* Explicit, reference-counted registration of the calling thread.
 * rseq_thread_register: 0, or -errno (-EOVERFLOW when the count is full;
 *   the errno of the failed registration otherwise).
 * rseq_thread_unregister: 1 released the kernel registration, 0 the
 *   registration stays (other references, or not ours); *not_owned is set
 *   when the call was a no-op on a registration that is not ours and held
 *   no reference; -EINVAL when ours and no register() is outstanding. */
int rseq_thread_register(void);
int rseq_thread_unregister(int *not_owned);

/* The slow path of the reads: fallback to the vDSO / system call. */
int rseq_fallback_cpu(void);
int rseq_fallback_node(void);

const char *rseq_owner_name(enum rseq_owner owner);
const char *rseq_fallback_reason(const struct rseq_thread *thread);

/* The current thread's CPU: rseq area, then sched_getcpu, then getcpu(2).
 * A negative cpu_id in a registered area means the registration was lost:
 * rseq_fallback_cpu() records that and answers from sched_getcpu(). */
static inline int rseq_current_cpu(void)
{
    struct rseq_abi *area = rseq_tls_area;
    if (__builtin_expect(area != NULL, 1)) {
        int cpu = (int)__atomic_load_n(&area->cpu_id, __ATOMIC_RELAXED);
        if (__builtin_expect(cpu >= 0, 1))
            return cpu;
    }
    return rseq_fallback_cpu();
}

#endif /* RSEQ_PY_REGISTRATION_H */
