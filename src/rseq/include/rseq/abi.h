/*
 * rseq/abi.h - the Linux rseq ABI, defined once for C and for assembly.
 *
 * Every offset, flag and size the package relies on lives here and nowhere
 * else: the C code uses the struct, the inline assembly uses the RSEQ_OFF_*
 * numbers through RSEQ_STR(), and _Static_assert ties the two together.
 * Values come from include/uapi/linux/rseq.h (4.18 .. 7.0).
 */
#ifndef RSEQ_PY_ABI_H
#define RSEQ_PY_ABI_H

#define RSEQ_STR_1(x) #x
#define RSEQ_STR(x) RSEQ_STR_1(x)

/* struct rseq field offsets (all little-endian u32 unless noted). */
#define RSEQ_OFF_CPU_ID_START 0  /* 4.18, kernel-written, read-only */
#define RSEQ_OFF_CPU_ID 4        /* 4.18, kernel-written, read-only */
#define RSEQ_OFF_RSEQ_CS 8       /* 4.18, u64 pointer, user-written */
#define RSEQ_OFF_FLAGS 16        /* 4.18; user writes forbidden, 7.0 advertises */
#define RSEQ_OFF_NODE_ID 20      /* 6.3, kernel-written, read-only */
#define RSEQ_OFF_MM_CID 24       /* 6.3, kernel-written, read-only */
#define RSEQ_OFF_SLICE_CTRL 28   /* 7.0: u8 request, u8 granted, u16 reserved */
#define RSEQ_OFF_SLICE_REQUEST 28
#define RSEQ_OFF_SLICE_GRANTED 29

/* End offset of each field: a field is usable when its end is within
 * min(registered length, kernel feature size). */
#define RSEQ_END_CPU_ID_START 4
#define RSEQ_END_CPU_ID 8
#define RSEQ_END_RSEQ_CS 16
#define RSEQ_END_FLAGS 20
#define RSEQ_END_NODE_ID 24
#define RSEQ_END_MM_CID 28
#define RSEQ_END_SLICE_CTRL 32

/* The original registration: 32 bytes, 32-byte aligned (4.18). */
#define RSEQ_ORIG_SIZE 32
#define RSEQ_ORIG_ALIGN 32
/* The 20 bytes that the 4.18 ABI defines before padding; glibc reports 20
 * for a 32-byte registration after its 2024 fix. */
#define RSEQ_ORIG_FEATURE_SIZE 20

/* cpu_id sentinels. */
#define RSEQ_CPU_ID_UNINITIALIZED (-1)
#define RSEQ_CPU_ID_REGISTRATION_FAILED (-2)

/* rseq(2) flags. */
#define RSEQ_FLAG_UNREGISTER 1
#define RSEQ_FLAG_SLICE_EXT_DEFAULT_ON 2 /* 7.0 */

/* struct rseq flags word, as advertised by Linux 7.0. */
#define RSEQ_FLAGS_SLICE_EXT_AVAILABLE_BIT 4
#define RSEQ_FLAGS_SLICE_EXT_ENABLED_BIT 5

/* struct rseq_cs: 32 bytes, 32-byte aligned. */
#define RSEQ_CS_OFF_VERSION 0
#define RSEQ_CS_OFF_FLAGS 4
#define RSEQ_CS_OFF_START_IP 8
#define RSEQ_CS_OFF_POST_COMMIT_OFFSET 16
#define RSEQ_CS_OFF_ABORT_IP 24
#define RSEQ_CS_SIZE 32

/* The deprecated RSEQ_CS_FLAG_NO_RESTART_ON_{PREEMPT,SIGNAL,MIGRATE} bits:
 * since 6.0 a kernel that finds them in rseq_cs.flags or rseq.flags kills
 * the process. */
#define RSEQ_CS_FLAGS_DEPRECATED 0x7

/* The fields of struct rseq and of struct rseq_cs, in order, as
 * X(name, offset, size): the one list that the C tables and the constants
 * rseq._core exports to Python (ABI_FIELDS, ABI_CS_FIELDS) are built from. */
#define RSEQ_ABI_FIELDS(X)                             \
    X(cpu_id_start, RSEQ_OFF_CPU_ID_START, 4)          \
    X(cpu_id, RSEQ_OFF_CPU_ID, 4)                      \
    X(rseq_cs, RSEQ_OFF_RSEQ_CS, 8)                    \
    X(flags, RSEQ_OFF_FLAGS, 4)                        \
    X(node_id, RSEQ_OFF_NODE_ID, 4)                    \
    X(mm_cid, RSEQ_OFF_MM_CID, 4)                      \
    X(slice_ctrl, RSEQ_OFF_SLICE_CTRL, 4)
#define RSEQ_ABI_CS_FIELDS(X)                          \
    X(version, RSEQ_CS_OFF_VERSION, 4)                 \
    X(flags, RSEQ_CS_OFF_FLAGS, 4)                     \
    X(start_ip, RSEQ_CS_OFF_START_IP, 8)               \
    X(post_commit_offset, RSEQ_CS_OFF_POST_COMMIT_OFFSET, 8) \
    X(abort_ip, RSEQ_CS_OFF_ABORT_IP, 8)

/* auxv keys (6.3). */
#define RSEQ_AT_FEATURE_SIZE 27
#define RSEQ_AT_ALIGN 28

/* membarrier(2) commands that fence rseq critical sections (5.10). */
#define RSEQ_MEMBARRIER_CMD_PRIVATE_EXPEDITED_RSEQ (1 << 7)
#define RSEQ_MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_RSEQ (1 << 8)
#define RSEQ_MEMBARRIER_CMD_FLAG_CPU 1

/* PTRACE_GET_RSEQ_CONFIGURATION (5.13). */
#define RSEQ_PTRACE_GET_CONFIGURATION 0x420f

/* Time-slice extension prctl (7.0). */
#define RSEQ_PR_SLICE_EXTENSION 79
#define RSEQ_PR_SLICE_EXTENSION_GET 1
#define RSEQ_PR_SLICE_EXTENSION_SET 2
#define RSEQ_PR_SLICE_EXTENSION_ENABLE 1

/* System call numbers of the architecture being built, from the C library's
 * <sys/syscall.h> (plain #defines: usable from assembly too).  rseq(2) is
 * 4.18: headers older than that lack SYS_rseq, so the numbers of the
 * architectures with critical sections are supplied; elsewhere RSEQ_SYS_RSEQ
 * stays undefined and rseq(2) answers ENOSYS. */
#include <sys/syscall.h>
#if defined(SYS_rseq)
#define RSEQ_SYS_RSEQ SYS_rseq
#elif defined(__x86_64__)
#define RSEQ_SYS_RSEQ 334
#elif defined(__aarch64__)
#define RSEQ_SYS_RSEQ 293 /* the generic syscall table's number */
#endif

#ifndef __ASSEMBLER__
#include <stddef.h>
#include <stdint.h>

struct rseq_abi {
    uint32_t cpu_id_start;
    uint32_t cpu_id;
    uint64_t rseq_cs;
    uint32_t flags;
    uint32_t node_id;
    uint32_t mm_cid;
    uint8_t slice_request;
    uint8_t slice_granted;
    uint16_t slice_reserved;
} __attribute__((aligned(RSEQ_ORIG_ALIGN)));

struct rseq_abi_cs {
    uint32_t version;
    uint32_t flags;
    uint64_t start_ip;
    uint64_t post_commit_offset;
    uint64_t abort_ip;
} __attribute__((aligned(RSEQ_CS_SIZE)));

/* Layout of the PTRACE_GET_RSEQ_CONFIGURATION answer. */
struct rseq_ptrace_configuration {
    uint64_t rseq_abi_pointer;
    uint32_t rseq_abi_size;
    uint32_t signature;
    uint32_t flags;
    uint32_t pad;
};

_Static_assert(offsetof(struct rseq_abi, cpu_id_start) == RSEQ_OFF_CPU_ID_START, "abi");
_Static_assert(offsetof(struct rseq_abi, cpu_id) == RSEQ_OFF_CPU_ID, "abi");
_Static_assert(offsetof(struct rseq_abi, rseq_cs) == RSEQ_OFF_RSEQ_CS, "abi");
_Static_assert(offsetof(struct rseq_abi, flags) == RSEQ_OFF_FLAGS, "abi");
_Static_assert(offsetof(struct rseq_abi, node_id) == RSEQ_OFF_NODE_ID, "abi");
_Static_assert(offsetof(struct rseq_abi, mm_cid) == RSEQ_OFF_MM_CID, "abi");
_Static_assert(offsetof(struct rseq_abi, slice_request) == RSEQ_OFF_SLICE_REQUEST, "abi");
_Static_assert(offsetof(struct rseq_abi, slice_granted) == RSEQ_OFF_SLICE_GRANTED, "abi");
_Static_assert(sizeof(struct rseq_abi) == RSEQ_ORIG_SIZE, "abi");
_Static_assert(offsetof(struct rseq_abi_cs, start_ip) == RSEQ_CS_OFF_START_IP, "abi");
_Static_assert(offsetof(struct rseq_abi_cs, post_commit_offset) == RSEQ_CS_OFF_POST_COMMIT_OFFSET, "abi");
_Static_assert(offsetof(struct rseq_abi_cs, abort_ip) == RSEQ_CS_OFF_ABORT_IP, "abi");
_Static_assert(sizeof(struct rseq_abi_cs) == RSEQ_CS_SIZE, "abi");
_Static_assert(sizeof(struct rseq_ptrace_configuration) == 24, "abi");
#endif /* __ASSEMBLER__ */

#endif /* RSEQ_PY_ABI_H */
