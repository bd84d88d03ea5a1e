/*
 * A stand-in for librseq in tests, written to behave as librseq's own
 * src/rseq.c does (2025-2026: read to learn the behaviour, not copied; see
 * also docs/reference in rseq-facts.md).  Preloaded (LD_PRELOAD) so its static TLS is there from the
 * start, as the real library must be.
 *
 * What it reproduces, because rseq depends on each point:
 *   - the exports: rseq_offset, rseq_size, rseq_flags,
 *     rseq_register_current_thread(), rseq_unregister_current_thread();
 *   - when glibc owns registration (__rseq_size != 0): its offset, size and
 *     flags are copied and register/unregister do nothing (return 0);
 *   - otherwise, lazy ownership: rseq_offset points at a 1 KiB initial-exec
 *     TLS area from the constructor on, but rseq_size stays 0 until the
 *     first thread registers through it; it then becomes the kernel feature
 *     size (getauxval(AT_RSEQ_FEATURE_SIZE), 20 before Linux 6.3);
 *   - registration uses max(rseq_size, 32) bytes, and a registration that
 *     fails once rseq_size > 0 calls abort() ("incoherent success/failure
 *     within process"): so does registering a thread that is already
 *     registered, by anyone, itself included (EBUSY or EINVAL);
 *   - no reference count: unregister ends the thread's registration for
 *     every user.
 * Nothing is registered by the constructor.
 *
 * Test helpers (not in librseq): fake_area_address(), fake_cpu_id_raw().
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/auxv.h>
#include <sys/syscall.h>
#include <unistd.h>

#define FAKE_RSEQ_SIG 0x53053053
#define FAKE_ORIG_ALLOC_SIZE 32
#define FAKE_ORIG_FEATURE_SIZE 20
#define FAKE_FLAG_UNREGISTER 1

/* FAKE_LIBRSEQ_DLOPEN: a 32-byte area, small enough for the static TLS a
 * dlopen'ed library may take, to test a librseq that arrives after import
 * (the real one, with its 1 KiB area, cannot be dlopen'ed). */
#ifdef FAKE_LIBRSEQ_DLOPEN
#define FAKE_AREA_SIZE 32
#else
#define FAKE_AREA_SIZE 1024 /* like librseq: room for future fields */
#endif

struct fake_area {
    uint32_t cpu_id_start, cpu_id;
    uint64_t rseq_cs;
    uint32_t flags, node_id, mm_cid, slice_ctrl;
#if FAKE_AREA_SIZE > 32
    char room[FAKE_AREA_SIZE - 32];
#endif
} __attribute__((aligned(FAKE_AREA_SIZE)));

static __thread struct fake_area area __attribute__((tls_model("initial-exec"))) = {
    .cpu_id = (uint32_t)-1,
};

ptrdiff_t rseq_offset;
unsigned int rseq_size = -1U;
unsigned int rseq_flags;

static int ownership;

static long sys_rseq(void *rseq, uint32_t length, int flags)
{
#ifdef SYS_rseq
    return syscall(SYS_rseq, rseq, length, flags, FAKE_RSEQ_SIG);
#else
    return syscall(334, rseq, length, flags, FAKE_RSEQ_SIG);
#endif
}

static unsigned int alloc_size(void)
{
    unsigned int size = __atomic_load_n(&rseq_size, __ATOMIC_RELAXED);
    return size < FAKE_ORIG_ALLOC_SIZE ? FAKE_ORIG_ALLOC_SIZE : size;
}

static unsigned int kernel_feature_size(void)
{
    unsigned long size = getauxval(27); /* AT_RSEQ_FEATURE_SIZE */
    return size ? (unsigned int)size : FAKE_ORIG_FEATURE_SIZE;
}

int rseq_register_current_thread(void)
{
    if (!ownership)
        return 0;
    if (sys_rseq(&area, alloc_size(), 0) != 0) {
        if (__atomic_load_n(&rseq_size, __ATOMIC_RELAXED) > 0)
            abort(); /* librseq: incoherent success/failure within process */
        return -1;
    }
    unsigned int zero = 0;
    __atomic_compare_exchange_n(&rseq_size, &zero, kernel_feature_size(), 0,
                                __ATOMIC_RELAXED, __ATOMIC_RELAXED);
    return 0;
}

int rseq_unregister_current_thread(void)
{
    if (!ownership)
        return 0;
    return sys_rseq(&area, alloc_size(), FAKE_FLAG_UNREGISTER) == 0 ? 0 : -1;
}

uintptr_t fake_area_address(void)
{
    return (uintptr_t)&area;
}

int fake_cpu_id_raw(void)
{
    return (int)__atomic_load_n(&area.cpu_id, __ATOMIC_RELAXED);
}

__attribute__((constructor)) static void fake_init(void)
{
    const ptrdiff_t *g_offset = dlsym(RTLD_NEXT, "__rseq_offset");
    const unsigned int *g_size = dlsym(RTLD_NEXT, "__rseq_size");
    const unsigned int *g_flags = dlsym(RTLD_NEXT, "__rseq_flags");
    if (g_offset && g_size && g_flags && *g_size) {
        rseq_offset = *g_offset;
        rseq_size = *g_size;
        rseq_flags = *g_flags;
        ownership = 0;
        return;
    }
    ownership = 1;
    rseq_offset = (char *)&area - (char *)__builtin_thread_pointer();
    rseq_flags = 0;
    rseq_size = 0; /* until the first thread registers through us */
}
