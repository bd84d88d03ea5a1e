/*
 * registration.c - process-wide rseq discovery and per-thread registration.
 * See registration.h for the ownership rules.
 */
#define _GNU_SOURCE
#include "registration.h"
#include "thread_area.h"

#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/auxv.h>
#include <sys/syscall.h>
#include <unistd.h>

__thread struct rseq_abi *rseq_tls_area __attribute__((tls_model("initial-exec")));
static __thread struct rseq_thread *rseq_tls_thread __attribute__((tls_model("initial-exec")));

static struct rseq_process process;
static pthread_once_t process_once = PTHREAD_ONCE_INIT;
static pthread_key_t thread_key;

/* librseq, when it is in the process.  It exports rseq_offset, rseq_size and
 * its register/unregister functions; when glibc does not own registration,
 * librseq owns it lazily: rseq_size stays 0 until a thread registers through
 * it, and rseq_register_current_thread() abort()s when a registration fails
 * after another thread's succeeded.  So rseq registers threads through
 * librseq's function (never with an area of its own, which would make a
 * later librseq registration of the thread fail), reads rseq_size each time
 * (it changes), and never unregisters what librseq registered. */
static const ptrdiff_t *librseq_offset;
static const unsigned int *librseq_size;
static int (*librseq_register)(void);

/* ------------------------------------------------------------------------
 * The system call
 * ------------------------------------------------------------------------ */

/* rseq(2) itself: 0 or -errno. */
static int sys_rseq(void *area, uint32_t length, int flags, uint32_t signature)
{
#ifdef RSEQ_SYS_RSEQ
    long ret = syscall(RSEQ_SYS_RSEQ, area, length, flags, signature);
    return ret == 0 ? 0 : -errno;
#else
    (void)area; (void)length; (void)flags; (void)signature;
    return -ENOSYS;
#endif
}

/* rseq(2) with every signal blocked: a handler that registers (or uses) rseq
 * must not run between our decision and the system call (tcmalloc does the
 * same). The previous mask is always restored. */
static int rseq_syscall_signals_blocked(void *area, uint32_t length, int flags)
{
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    int ret = sys_rseq(area, length, flags, RSEQ_SIG);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    return ret;
}

/* ------------------------------------------------------------------------
 * Process discovery
 * ------------------------------------------------------------------------ */

static void thread_destructor(void *arg);

/* Look librseq's symbols up: 1 when its registration function, offset and
 * size are all there.  librseq cannot be dlopen'ed (1 KiB of initial-exec
 * TLS), but this runs again when a thread registers, not only at import,
 * so that whatever the loader did meanwhile is seen. */
static int librseq_lookup(void)
{
    const ptrdiff_t *offset = dlsym(RTLD_DEFAULT, "rseq_offset");
    const unsigned int *size = dlsym(RTLD_DEFAULT, "rseq_size");
    void *reg = dlsym(RTLD_DEFAULT, "rseq_register_current_thread");
    if (!offset || !size || !reg)
        return 0;
    __atomic_store_n(&librseq_offset, offset, __ATOMIC_RELAXED);
    __atomic_store_n(&librseq_size, size, __ATOMIC_RELAXED);
    __atomic_store_n(&librseq_register, (int (*)(void))reg, __ATOMIC_RELEASE);
    return 1;
}

static void process_discover(void)
{
    process.feature_size = getauxval(RSEQ_AT_FEATURE_SIZE);
    process.alignment = getauxval(RSEQ_AT_ALIGN);
    process.possible_cpus = rseq_possible_cpus();

    /* rseq(NULL, 0, 0, 0): EINVAL when the kernel has rseq, ENOSYS when it
     * does not (or a seccomp filter says so), EPERM under a denying filter. */
    int probe = sys_rseq(NULL, 0, 0, 0);
    process.kernel = probe == -ENOSYS ? 0 : probe == -EPERM ? -1 : 1;
    process.probe_errno = -probe;

    const ptrdiff_t *g_offset = dlsym(RTLD_DEFAULT, "__rseq_offset");
    const unsigned int *g_size = dlsym(RTLD_DEFAULT, "__rseq_size");
    const unsigned int *g_flags = dlsym(RTLD_DEFAULT, "__rseq_flags");
    const ptrdiff_t *l_offset = dlsym(RTLD_DEFAULT, "rseq_offset");
    const unsigned int *l_size = dlsym(RTLD_DEFAULT, "rseq_size");
    const unsigned int *l_flags = dlsym(RTLD_DEFAULT, "rseq_flags");

    process.glibc_symbols = g_offset && g_size;
    if (g_offset && g_size && *g_size) {
        process.owner = RSEQ_OWNER_GLIBC;
        process.owner_offset = *g_offset;
        process.owner_size = *g_size;
        process.owner_flags = g_flags ? *g_flags : 0;
    } else if (librseq_lookup()) {
        /* librseq owns registration, even while its rseq_size is still 0
         * (no thread registered through it yet). */
        process.owner = RSEQ_OWNER_LIBRSEQ;
        process.owner_offset = *l_offset;
        process.owner_size = *l_size;
        process.owner_flags = l_flags ? *l_flags : 0;
    } else if (l_offset && l_size && *l_size) {
        process.owner = RSEQ_OWNER_LIBRSEQ;
        process.owner_offset = *l_offset;
        process.owner_size = *l_size;
        process.owner_flags = l_flags ? *l_flags : 0;
    } else {
        process.owner = RSEQ_OWNER_SELF;
    }
    /* A seccomp filter installed after glibc registered this thread denies
     * the probe, yet the kernel maintains glibc's area: rseq(2) exists. */
    if (process.kernel != 1 && process.owner != RSEQ_OWNER_SELF) {
        const struct rseq_abi *area = (const struct rseq_abi *)
            ((char *)rseq_arch_thread_pointer() + process.owner_offset);
        if ((int32_t)__atomic_load_n(&area->cpu_id, __ATOMIC_RELAXED) >= 0)
            process.kernel = 1;
    }

    /* Our own registration: max(32, feature size), aligned to
     * max(32, AT_RSEQ_ALIGN) (the rule glibc 2.41 adopted). */
    unsigned long length = process.feature_size > RSEQ_ORIG_SIZE
        ? process.feature_size : RSEQ_ORIG_SIZE;
    unsigned long align = process.alignment > RSEQ_ORIG_ALIGN
        ? process.alignment : RSEQ_ORIG_ALIGN;
    process.own_length = (unsigned int)length;
    process.own_alignment = (unsigned int)align;

    (void)pthread_key_create(&thread_key, thread_destructor);
}

const struct rseq_process *rseq_process_get(void)
{
    pthread_once(&process_once, process_discover);
    return &process;
}

/* ------------------------------------------------------------------------
 * Usable size
 * ------------------------------------------------------------------------ */

/* The feature size to clamp with: before 6.3 the auxv entry is 0 and only
 * the original 20 bytes of fields exist. */
static uint32_t kernel_feature_size(void)
{
    return process.feature_size ? (uint32_t)process.feature_size
                                : RSEQ_ORIG_FEATURE_SIZE;
}

/* glibc and librseq report their active size: 32 (early glibc) means the
 * original 20 bytes of fields, not the padding after them. */
static uint32_t owner_active_size(unsigned int reported)
{
    return reported == RSEQ_ORIG_SIZE ? RSEQ_ORIG_FEATURE_SIZE : reported;
}

static uint32_t min_u32(uint32_t a, uint32_t b) { return a < b ? a : b; }

/* ------------------------------------------------------------------------
 * Per-thread state
 * ------------------------------------------------------------------------ */

static void set_fallback(struct rseq_thread *t, enum rseq_fallback why, int err)
{
    t->area = NULL;
    t->usable_size = 0;
    t->fallback = why;
    t->fallback_errno = err;
    rseq_tls_area = NULL;
}

static void use_area(struct rseq_thread *t, struct rseq_abi *area,
                     uint32_t registered, uint32_t usable)
{
    t->area = area;
    t->registered_size = registered;
    t->usable_size = usable;
    t->fallback = RSEQ_FALLBACK_NONE;
    t->fallback_errno = 0;
    rseq_tls_area = area;
}

static enum rseq_fallback fallback_for_errno(int err);

/* An address no thread can register: 32-byte aligned, above user space. */
#define RSEQ_PROBE_ADDRESS ((void *)(uintptr_t)-(intptr_t)RSEQ_ORIG_ALIGN)

/* Register the calling thread through librseq's own function: 0 or an
 * errno.  Only when the thread has no registration at all: librseq's call
 * fails for a registered thread (EBUSY for its own area, EINVAL for
 * another), and a failure after any success makes librseq abort() the
 * process.  The probe registers an address the kernel cannot accept: it
 * compares with the registration in force first (EINVAL when there is one)
 * and checks the address after (EFAULT when there is none); any other
 * answer (EPERM, ENOSYS: rseq denied) means librseq's call would fail too.
 * Signals stay blocked from the probe to the registration, so a handler
 * cannot register the thread in between. */
static int librseq_register_thread(void)
{
    int (*reg)(void) = __atomic_load_n(&librseq_register, __ATOMIC_ACQUIRE);
    sigset_t all, old;
    int err;

    if (!reg)
        return ENOSYS;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    int probe = sys_rseq(RSEQ_PROBE_ADDRESS, RSEQ_ORIG_SIZE, 0, RSEQ_SIG);
    if (probe == -EFAULT) {
        errno = 0;
        err = reg() == 0 ? 0 : (errno ? errno : EINVAL);
    } else {
        err = probe == -EINVAL ? EBUSY : -probe;
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    return err;
}

/* Adopt the area of glibc or librseq for this thread if the kernel
 * maintains it; with may_register, a librseq-owned thread that nobody
 * registered is registered through librseq first. */
static void adopt_owner_area(struct rseq_thread *t, int may_register)
{
    ptrdiff_t offset = process.owner_offset;
    uint32_t reported = process.owner_size;
    const unsigned int *lsize = __atomic_load_n(&librseq_size, __ATOMIC_RELAXED);
    int via_librseq = process.owner == RSEQ_OWNER_LIBRSEQ && lsize;

    if (via_librseq)
        offset = *__atomic_load_n(&librseq_offset, __ATOMIC_RELAXED);
    struct rseq_abi *area = (struct rseq_abi *)
        ((char *)rseq_arch_thread_pointer() + offset);
    int32_t cpu = (int32_t)__atomic_load_n(&area->cpu_id, __ATOMIC_RELAXED);
    if (cpu < 0 && via_librseq && may_register) {
        int err = librseq_register_thread();
        if (err) {
            set_fallback(t, err == EBUSY ? RSEQ_FALLBACK_FOREIGN : fallback_for_errno(err),
                         err);
            return;
        }
        cpu = (int32_t)__atomic_load_n(&area->cpu_id, __ATOMIC_RELAXED);
    }
    if (cpu < 0) {
        /* -1: never registered (librseq registers lazily, per thread), or
         * unregistered since; -2: the owner's registration failed.  Either
         * way the kernel does not maintain the area for this thread. */
        if (t->fallback != RSEQ_FALLBACK_LOST && t->fallback != RSEQ_FALLBACK_FOREIGN)
            set_fallback(t, RSEQ_FALLBACK_OWNER_FAILED, 0);
        return;
    }
    uint32_t registered;
    if (via_librseq) {
        /* rseq_size is the kernel feature size once a thread registered
         * (0 for an instant before); librseq registers max(32, size). */
        reported = __atomic_load_n(lsize, __ATOMIC_RELAXED);
        if (reported == 0 || reported == UINT32_MAX)
            reported = kernel_feature_size();
        registered = reported > RSEQ_ORIG_SIZE ? reported : RSEQ_ORIG_SIZE;
    } else {
        registered = reported == RSEQ_ORIG_FEATURE_SIZE ? RSEQ_ORIG_SIZE : reported;
    }
    use_area(t, area, registered,
             min_u32(owner_active_size(reported), kernel_feature_size()));
}

static enum rseq_fallback fallback_for_errno(int err)
{
    switch (err) {
    case ENOSYS: return RSEQ_FALLBACK_NO_KERNEL;
    case EPERM: return RSEQ_FALLBACK_DENIED;
    case EBUSY: case EINVAL: return RSEQ_FALLBACK_FOREIGN;
    case ENOMEM: return RSEQ_FALLBACK_NO_MEMORY;
    default: return RSEQ_FALLBACK_ERROR;
    }
}

/* Register our own area for this thread: 0 or -errno. */
static int register_own_area(struct rseq_thread *t)
{
    if (!t->own_area) {
        size_t size = (process.own_length + process.own_alignment - 1)
                      & ~((size_t)process.own_alignment - 1);
        void *mem = NULL;
        if (posix_memalign(&mem, process.own_alignment, size) != 0)
            return -ENOMEM;
        memset(mem, 0, size);
        t->own_area = mem;
    }
    struct rseq_abi *area = t->own_area;
    /* cpu_id starts as "uninitialised" so a read before the kernel's first
     * update never looks like CPU 0.  This is the only time we write it:
     * the area is not registered yet, so it is still ours. */
    area->cpu_id = (uint32_t)RSEQ_CPU_ID_UNINITIALIZED;
    int ret = rseq_syscall_signals_blocked(area, process.own_length, 0);
    if (ret != 0)
        return ret;
    t->own_registered = 1;
    use_area(t, area, process.own_length,
             min_u32(process.own_length, kernel_feature_size()));
    return 0;
}

/* lazy: a read asks (the registration then holds its own reference, see
 * struct rseq_thread.lazy), not register(). */
static void ensure_registration(struct rseq_thread *t, int lazy)
{
    if (t->area)
        return;
    if (process.owner == RSEQ_OWNER_SELF && t->fallback == RSEQ_FALLBACK_NONE
        && librseq_lookup()) {
        /* librseq arrived after discovery: it owns registration from now. */
        process.owner = RSEQ_OWNER_LIBRSEQ;
    }
    switch (process.owner) {
    case RSEQ_OWNER_GLIBC:
    case RSEQ_OWNER_LIBRSEQ:
        t->owner = process.owner;
        /* Through librseq only the first time, or when register() asks: a
         * thread whose librseq registration was ended on purpose is not
         * registered again behind the application's back. */
        adopt_owner_area(t, !lazy || t->fallback == RSEQ_FALLBACK_NONE);
        return;
    default:
        break;
    }
    /* A registration that failed, or that unregister() released, is not
     * retried on every read: only an explicit register() tries again. */
    if (t->fallback != RSEQ_FALLBACK_NONE)
        return;
    int ret = register_own_area(t);
    if (ret != 0) {
        /* Someone else registered this thread (EBUSY/EINVAL), or rseq is
         * missing or denied: record why and use the fallback. */
        t->owner = RSEQ_OWNER_NONE;
        set_fallback(t, fallback_for_errno(-ret), -ret);
        return;
    }
    t->owner = RSEQ_OWNER_SELF;
    t->lazy = lazy;
}

static struct rseq_thread *thread_state_create(void)
{
    struct rseq_thread *t = calloc(1, sizeof *t);
    if (!t)
        return NULL;
    rseq_tls_thread = t;
    /* The key's destructor runs at thread exit in the exiting thread. The
     * main thread never runs it, which is fine: its area dies with the
     * process. */
    (void)pthread_setspecific(thread_key, t);
    return t;
}

struct rseq_thread *rseq_thread_peek(void)
{
    return rseq_tls_thread;
}

/* The calling thread's state, created if needed, without registering. */
static struct rseq_thread *thread_state(void)
{
    rseq_process_get();
    struct rseq_thread *t = rseq_tls_thread;
    if (!t) {
        t = thread_state_create();
        if (!t) {
            errno = ENOMEM;
            return NULL;
        }
    }
    return t;
}

struct rseq_thread *rseq_thread_get(void)
{
    struct rseq_thread *t = thread_state();
    if (!t)
        return NULL;
    /* OWNER_FAILED and LOST under glibc/librseq are looked at again: librseq
     * may have registered this thread (again) since. */
    if (!t->area && (t->fallback == RSEQ_FALLBACK_NONE
                     || t->fallback == RSEQ_FALLBACK_OWNER_FAILED
                     || (t->fallback == RSEQ_FALLBACK_LOST
                         && process.owner != RSEQ_OWNER_SELF)))
        ensure_registration(t, 1);
    return t;
}

/* The kernel no longer maintains the thread's area (cpu_id < 0): someone
 * ended the registration without us.  Only the thread itself can do that,
 * so the check is exact for the calling thread. */
static void mark_lost(struct rseq_thread *t)
{
    if (t->owner == RSEQ_OWNER_SELF) {
        /* Nothing left to release: the kernel let go of our area. */
        t->own_registered = 0;
        t->lazy = 0;
    }
    set_fallback(t, RSEQ_FALLBACK_LOST, 0);
}

struct rseq_abi *rseq_thread_area_checked(void)
{
    struct rseq_thread *t = rseq_thread_get();
    if (!t)
        return NULL;
    if (t->area && (int32_t)__atomic_load_n(&t->area->cpu_id, __ATOMIC_RELAXED) < 0)
        mark_lost(t);
    return t->area;
}

/* Release our kernel registration: the area stays allocated for reuse. */
static int release_own_area(struct rseq_thread *t)
{
    int ret = rseq_syscall_signals_blocked(t->own_area, process.own_length,
                                           RSEQ_FLAG_UNREGISTER);
    if (ret == 0) {
        t->own_registered = 0;
        set_fallback(t, RSEQ_FALLBACK_UNREGISTERED, 0);
    }
    return ret;
}

static void thread_destructor(void *arg)
{
    struct rseq_thread *t = arg;
    rseq_tls_area = NULL;
    rseq_tls_thread = NULL;
    if (t->own_registered && release_own_area(t) != 0) {
        /* The kernel still uses the area: leak it rather than let the
         * allocator hand registered memory to someone else. */
        free(t);
        return;
    }
    free(t->own_area);
    free(t);
}

/* ------------------------------------------------------------------------
 * Explicit registration, reference counted (seed 002)
 * ------------------------------------------------------------------------ */

int rseq_thread_register(void)
{
    struct rseq_thread *t = thread_state();
    if (!t)
        return -ENOMEM;
    if (t->refcount == UINT32_MAX)
        return -EOVERFLOW;
    if (t->area && (int32_t)__atomic_load_n(&t->area->cpu_id, __ATOMIC_RELAXED) < 0)
        mark_lost(t);
    if (!t->area) {
        /* An explicit request retries a registration that failed or was
         * lost (through librseq when librseq owns registration). */
        if (process.owner == RSEQ_OWNER_SELF)
            t->fallback = RSEQ_FALLBACK_NONE;
        ensure_registration(t, 0);
        if (!t->area) {
            if (t->fallback_errno)
                return -t->fallback_errno;
            return t->fallback == RSEQ_FALLBACK_LOST ? -EINVAL : -ENOSYS;
        }
    }
    t->refcount++;
    return 0;
}

int rseq_thread_unregister(int *not_owned)
{
    struct rseq_thread *t = rseq_thread_get();
    *not_owned = 0;
    if (!t)
        return -ENOMEM;
    /* A registration ended behind our back has nothing left to release. */
    if (t->area && (int32_t)__atomic_load_n(&t->area->cpu_id, __ATOMIC_RELAXED) < 0)
        mark_lost(t);
    if (t->owner != RSEQ_OWNER_SELF) {
        /* glibc, librseq or a foreign registrant owns it: never touch it.
         * Dropping a reference we hold is normal; a call with none held is
         * the no-op the caller is told about. */
        if (t->refcount)
            t->refcount--;
        else
            *not_owned = 1;
        return 0;
    }
    if (t->refcount == 0)
        return -EINVAL;
    /* A lazy registration holds a reference of its own: balanced
     * register()/unregister() pairs never end it. */
    if (--t->refcount || t->lazy || !t->own_registered)
        return 0;
    int ret = release_own_area(t);
    return ret == 0 ? 1 : ret;
}

/* ------------------------------------------------------------------------
 * Fallback reads
 * ------------------------------------------------------------------------ */

int rseq_fallback_cpu(void)
{
    struct rseq_thread *t = rseq_tls_thread;
    if (t && t->area) {
        /* The fast path found a registered area with cpu_id < 0. */
        if ((int32_t)__atomic_load_n(&t->area->cpu_id, __ATOMIC_RELAXED) < 0)
            mark_lost(t);
    } else if (!t || t->fallback == RSEQ_FALLBACK_NONE) {
        /* Not registered yet: register lazily, then read the area. */
        t = rseq_thread_get();
        if (t && t->area) {
            int cpu = (int)__atomic_load_n(&t->area->cpu_id, __ATOMIC_RELAXED);
            if (cpu >= 0)
                return cpu;
        }
    }
    int cpu = sched_getcpu(); /* glibc: rseq area or vDSO */
    if (cpu >= 0)
        return cpu;
    unsigned int c = 0;
    if (syscall(SYS_getcpu, &c, NULL, NULL) == 0)
        return (int)c;
    return -1;
}

int rseq_fallback_node(void)
{
    unsigned int cpu = 0, node = 0;
    if (getcpu(&cpu, &node) == 0) /* glibc >= 2.29: vDSO */
        return (int)node;
    if (syscall(SYS_getcpu, &cpu, &node, NULL) == 0)
        return (int)node;
    return -1;
}

/* ------------------------------------------------------------------------
 * Names
 * ------------------------------------------------------------------------ */

const char *rseq_owner_name(enum rseq_owner owner)
{
    switch (owner) {
    case RSEQ_OWNER_GLIBC: return "glibc";
    case RSEQ_OWNER_LIBRSEQ: return "librseq";
    case RSEQ_OWNER_SELF: return "rseq";
    default: return NULL;
    }
}

const char *rseq_fallback_reason(const struct rseq_thread *t)
{
    switch (t->fallback) {
    case RSEQ_FALLBACK_NONE: return NULL;
    case RSEQ_FALLBACK_NO_KERNEL:
        return "ENOSYS: the kernel has no rseq system call (or a seccomp filter answers ENOSYS)";
    case RSEQ_FALLBACK_DENIED:
        return "EPERM: rseq is denied to this process (seccomp filter)";
    case RSEQ_FALLBACK_FOREIGN:
        return "another library registered this thread and does not share its area";
    case RSEQ_FALLBACK_OWNER_FAILED:
        return process.owner == RSEQ_OWNER_GLIBC
            ? "glibc's registration failed for this thread"
            : "librseq has not registered this thread";
    case RSEQ_FALLBACK_NO_MEMORY: return "out of memory for the thread's area";
    case RSEQ_FALLBACK_UNREGISTERED: return "unregistered by rseq.unregister()";
    case RSEQ_FALLBACK_LOST:
        switch (t->owner) {
        case RSEQ_OWNER_GLIBC:
            return "glibc's registration of this thread was ended behind rseq's back "
                   "(cpu_id is -1: rseq(2) RSEQ_FLAG_UNREGISTER on glibc's area)";
        case RSEQ_OWNER_LIBRSEQ:
            return "librseq's registration of this thread was ended "
                   "(cpu_id is -1: rseq_unregister_current_thread() or rseq(2) "
                   "RSEQ_FLAG_UNREGISTER)";
        default:
            return "rseq's registration of this thread was ended behind its back "
                   "(cpu_id is -1: rseq(2) RSEQ_FLAG_UNREGISTER on rseq's area); "
                   "rseq.register() registers it again";
        }
    case RSEQ_FALLBACK_ERROR:
    default: return "rseq registration failed";
    }
}
