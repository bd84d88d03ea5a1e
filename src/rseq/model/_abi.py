"""ABI numbers the model shares with the C core (csrc/abi.h).

The values are the Linux uapi ones (include/uapi/linux/rseq.h, 4.18 .. 7.0);
the numbers of designs that never landed (seed 000's size flag, seed 001's
shared area) are the model's own choice and say so.
"""

from __future__ import annotations

import errno as _errno

# struct rseq offsets (csrc/abi.h RSEQ_OFF_*).
OFF_CPU_ID_START = 0
OFF_CPU_ID = 4
OFF_RSEQ_CS = 8
OFF_FLAGS = 16
OFF_NODE_ID = 20
OFF_MM_CID = 24
OFF_SLICE_REQUEST = 28
OFF_SLICE_GRANTED = 29

ORIG_SIZE = 32
ORIG_ALIGN = 32

CPU_ID_UNINITIALIZED = 0xFFFFFFFF  # -1 as the u32 the kernel stores
CPU_ID_REGISTRATION_FAILED = 0xFFFFFFFE  # -2

FLAG_UNREGISTER = 1
FLAG_SLICE_EXT_DEFAULT_ON = 2  # 7.0

# struct rseq flags word as advertised by Linux 7.0.
FLAGS_SLICE_EXT_AVAILABLE = 1 << 4
FLAGS_SLICE_EXT_ENABLED = 1 << 5

# The deprecated RSEQ_CS_FLAG_NO_RESTART_ON_* bits: the kernel kills the
# process when they are set in rseq_cs.flags or rseq.flags.
CS_NO_RESTART_FLAGS = 0x7

# struct rseq_cs (32 bytes).
CS_OFF_VERSION = 0
CS_OFF_FLAGS = 4
CS_OFF_START_IP = 8
CS_OFF_POST_COMMIT_OFFSET = 16
CS_OFF_ABORT_IP = 24
CS_SIZE = 32

SIGNATURE_X86 = 0x53053053

AT_RSEQ_FEATURE_SIZE = 27
AT_RSEQ_ALIGN = 28

# x86-64 user address space limit (TASK_SIZE_MAX with 4-level paging).
TASK_SIZE = 0x7FFFFFFFF000

# membarrier(2) commands used by rseq fences.
MEMBARRIER_CMD_PRIVATE_EXPEDITED_RSEQ = 1 << 7
MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_RSEQ = 1 << 8
MEMBARRIER_CMD_FLAG_CPU = 1

# prctl for the 7.0 time-slice extension.
PR_RSEQ_SLICE_EXTENSION = 79
PR_RSEQ_SLICE_EXTENSION_GET = 1
PR_RSEQ_SLICE_EXTENSION_SET = 2
PR_RSEQ_SLICE_EXT_ENABLE = 1

# Seed 000 (2020): a bit in rseq.flags that says "user_size follows".  The
# thread proposed RSEQ_CS_FLAG_SIZE = 1 << 3.
SIZE_FLAG = 1 << 3
SF_OFF_USER_SIZE = 20
SF_OFF_KERNEL_SIZE = 24
SF_OFF_NODE_ID = 32
SF_OFF_MM_CID = 36
SF_KERNEL_SIZE = 40  # sizeof(struct rseq) of the model's size-flag kernel

# Seed 001 (2023): RSEQ_FLAG_SHARED makes rseq(2) take a fifth argument, the
# shared area; sched_state bit 0 says "on a CPU".  The value is the model's.
FLAG_SHARED = 1 << 2
SCHED_STATE_ON_CPU = 1

EINVAL = _errno.EINVAL
EBUSY = _errno.EBUSY
EPERM = _errno.EPERM
EFAULT = _errno.EFAULT
ENOSYS = _errno.ENOSYS
ENXIO = _errno.ENXIO
ENOTSUPP = 524  # kernel-internal, what the 7.0 prctl returns when disabled


def errno_name(result: int) -> str:
    """'0' for success, 'EINVAL' for -22, and so on."""
    if result >= 0:
        return str(result)
    return _errno.errorcode.get(-result, f"E{-result}") if -result != ENOTSUPP else "ENOTSUPP"
