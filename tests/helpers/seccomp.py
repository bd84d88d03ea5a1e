"""Deny rseq(2) to the calling process with a classic-BPF seccomp filter.

Used in a fresh subprocess, before ``import rseq``, to reproduce a container
whose policy forbids rseq: the filter answers ``SECCOMP_RET_ERRNO | errno``
for rseq (x86-64 syscall 334) and allows every other call.  The filter is
inherited by every thread created afterwards and cannot be removed.
"""
from __future__ import annotations

import ctypes
import errno as errno_module
import struct

PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ERRNO = 0x00050000
AUDIT_ARCH_X86_64 = 0xC000003E
SYS_RSEQ_X86_64 = 334

# struct seccomp_data: int nr; u32 arch; u64 instruction_pointer; u64 args[6]
_OFFSET_NR = 0
_OFFSET_ARCH = 4

# BPF opcodes (linux/bpf_common.h)
_BPF_LD_W_ABS = 0x00 | 0x00 | 0x20   # BPF_LD | BPF_W | BPF_ABS
_BPF_JEQ_K = 0x05 | 0x10 | 0x00      # BPF_JMP | BPF_JEQ | BPF_K
_BPF_RET_K = 0x06 | 0x00             # BPF_RET | BPF_K


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8),
                ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


def _program(errno: int) -> list[tuple[int, int, int, int]]:
    return [
        (_BPF_LD_W_ABS, 0, 0, _OFFSET_ARCH),
        (_BPF_JEQ_K, 1, 0, AUDIT_ARCH_X86_64),   # x86-64: go on; else allow
        (_BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW),
        (_BPF_LD_W_ABS, 0, 0, _OFFSET_NR),
        (_BPF_JEQ_K, 0, 1, SYS_RSEQ_X86_64),      # rseq: deny; else allow
        (_BPF_RET_K, 0, 0, SECCOMP_RET_ERRNO | (errno & 0xFFFF)),
        (_BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW),
    ]


def deny_rseq(errno: int = errno_module.ENOSYS) -> None:
    """Make every later rseq(2) call of this process fail with ``errno``."""
    if struct.calcsize("P") != 8 or ctypes.CDLL(None).__class__ is None:
        raise OSError(errno_module.ENOTSUP, "x86-64 only")
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong,
                           ctypes.c_ulong, ctypes.c_ulong]
    program = _program(errno)
    filters = (_SockFilter * len(program))(*(_SockFilter(*insn) for insn in program))
    fprog = _SockFprog(len(program), filters)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, "prctl(PR_SET_NO_NEW_PRIVS)")
    if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER,
                  ctypes.addressof(fprog), 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, "prctl(PR_SET_SECCOMP)")
