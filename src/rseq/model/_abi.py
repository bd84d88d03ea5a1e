"""ABI numbers the model shares with the C core.

The Linux facts (struct rseq and struct rseq_cs layouts, flags, sizes, the
signature, auxv keys, membarrier and prctl numbers) are defined once, in
src/rseq/include/rseq/abi.h, and read here from what rseq._core exports
(ABI, ABI_FIELDS, ABI_CS_FIELDS): nothing below restates them.  The numbers
of designs that never landed (seed 000's size flag, seed 001's shared area)
are the model's own choice and say so.
"""

from __future__ import annotations

import errno as _errno

from rseq import _core

_NUMBERS = _core.ABI
FIELDS = {name: (offset, size) for name, offset, size in _core.ABI_FIELDS}
CS_FIELDS = {name: (offset, size) for name, offset, size in _core.ABI_CS_FIELDS}

# struct rseq offsets (RSEQ_OFF_*).
OFF_CPU_ID_START = FIELDS["cpu_id_start"][0]
OFF_CPU_ID = FIELDS["cpu_id"][0]
OFF_RSEQ_CS = FIELDS["rseq_cs"][0]
OFF_FLAGS = FIELDS["flags"][0]
OFF_NODE_ID = FIELDS["node_id"][0]
OFF_MM_CID = FIELDS["mm_cid"][0]
# slice_ctrl: u8 request, u8 granted, u16 reserved (7.0).
OFF_SLICE_REQUEST = FIELDS["slice_ctrl"][0]
OFF_SLICE_GRANTED = FIELDS["slice_ctrl"][0] + 1

ORIG_SIZE = _NUMBERS["ORIG_SIZE"]
ORIG_ALIGN = _NUMBERS["ORIG_ALIGN"]

# The sentinels as the u32 the kernel stores (-1, -2).
CPU_ID_UNINITIALIZED = _NUMBERS["CPU_ID_UNINITIALIZED"] & 0xFFFFFFFF
CPU_ID_REGISTRATION_FAILED = _NUMBERS["CPU_ID_REGISTRATION_FAILED"] & 0xFFFFFFFF

FLAG_UNREGISTER = _NUMBERS["FLAG_UNREGISTER"]
FLAG_SLICE_EXT_DEFAULT_ON = _NUMBERS["FLAG_SLICE_EXT_DEFAULT_ON"]  # 7.0

# struct rseq flags word as advertised by Linux 7.0.
FLAGS_SLICE_EXT_AVAILABLE = 1 << _NUMBERS["FLAGS_SLICE_EXT_AVAILABLE_BIT"]
FLAGS_SLICE_EXT_ENABLED = 1 << _NUMBERS["FLAGS_SLICE_EXT_ENABLED_BIT"]

# The deprecated RSEQ_CS_FLAG_NO_RESTART_ON_* bits: the kernel kills the
# process when they are set in rseq_cs.flags or rseq.flags.
CS_NO_RESTART_FLAGS = _NUMBERS["CS_FLAGS_DEPRECATED"]

# struct rseq_cs.
CS_OFF_VERSION = CS_FIELDS["version"][0]
CS_OFF_FLAGS = CS_FIELDS["flags"][0]
CS_OFF_START_IP = CS_FIELDS["start_ip"][0]
CS_OFF_POST_COMMIT_OFFSET = CS_FIELDS["post_commit_offset"][0]
CS_OFF_ABORT_IP = CS_FIELDS["abort_ip"][0]
CS_SIZE = _NUMBERS["CS_SIZE"]

# The model's kernel is x86-64 (see TASK_SIZE): it checks the x86 signature,
# which is rseq._core.ABI["SIGNATURE"] on an x86-64 build (a test checks).
SIGNATURE_X86 = 0x53053053

# System call numbers of this build's architecture (rseq, membarrier, getcpu,
# gettid, tgkill, arch_prctl where it exists).
SYSCALLS = dict(_core.SYSCALLS)

AT_RSEQ_FEATURE_SIZE = _NUMBERS["AT_RSEQ_FEATURE_SIZE"]
AT_RSEQ_ALIGN = _NUMBERS["AT_RSEQ_ALIGN"]

# x86-64 user address space limit (TASK_SIZE_MAX with 4-level paging).
TASK_SIZE = 0x7FFFFFFFF000

# membarrier(2) commands used by rseq fences.
MEMBARRIER_CMD_PRIVATE_EXPEDITED_RSEQ = _NUMBERS["MEMBARRIER_CMD_PRIVATE_EXPEDITED_RSEQ"]
MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_RSEQ = _NUMBERS[
    "MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_RSEQ"]
MEMBARRIER_CMD_FLAG_CPU = _NUMBERS["MEMBARRIER_CMD_FLAG_CPU"]

# prctl for the 7.0 time-slice extension.
PR_RSEQ_SLICE_EXTENSION = _NUMBERS["PR_RSEQ_SLICE_EXTENSION"]
PR_RSEQ_SLICE_EXTENSION_GET = _NUMBERS["PR_RSEQ_SLICE_EXTENSION_GET"]
PR_RSEQ_SLICE_EXTENSION_SET = _NUMBERS["PR_RSEQ_SLICE_EXTENSION_SET"]
PR_RSEQ_SLICE_EXT_ENABLE = _NUMBERS["PR_RSEQ_SLICE_EXTENSION_ENABLE"]

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
