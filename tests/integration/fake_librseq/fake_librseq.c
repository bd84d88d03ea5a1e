/*
 * A stand-in for librseq in tests: like librseq when glibc does not own
 * registration, it registers threads from an initial-exec TLS area and
 * exports rseq_offset / rseq_size / rseq_flags.  Preloaded (LD_PRELOAD) so
 * its static TLS is there from the start.  The main thread registers in the
 * constructor; other threads only when they call fake_register().
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/syscall.h>
#include <unistd.h>

struct fake_area {
    uint32_t cpu_id_start, cpu_id;
    uint64_t rseq_cs;
    uint32_t flags, node_id, mm_cid, pad;
} __attribute__((aligned(32)));

static __thread struct fake_area area __attribute__((tls_model("initial-exec"))) = {
    .cpu_id = (uint32_t)-1,
};

ptrdiff_t rseq_offset;
unsigned int rseq_size;
unsigned int rseq_flags;

int fake_register(void)
{
    return syscall(334, &area, 32, 0, 0x53053053) == 0 ? 0 : errno;
}

int fake_unregister(void)
{
    return syscall(334, &area, 32, 1, 0x53053053) == 0 ? 0 : errno;
}

uintptr_t fake_area_address(void)
{
    return (uintptr_t)&area;
}

__attribute__((constructor)) static void fake_init(void)
{
    rseq_offset = (char *)&area - (char *)__builtin_thread_pointer();
    if (fake_register() == 0)
        rseq_size = 32;
}
