"""The model's ABI layout is the C core's: rseq/abi.h is the one home of the
offsets, sizes, flags and numbers, and the model reads them through
rseq._core instead of restating them."""
from __future__ import annotations

import ctypes
import os
import re

from rseq import _core
from rseq.model import _abi

HEADER = os.path.join(os.path.dirname(_core.__file__), "include", "rseq", "abi.h")


def test_struct_rseq_layout_agrees():
    fields = {name: (offset, size) for name, offset, size in _core.ABI_FIELDS}
    assert list(fields) == ["cpu_id_start", "cpu_id", "rseq_cs", "flags", "node_id",
                            "mm_cid", "slice_ctrl"]
    assert _abi.OFF_CPU_ID_START == fields["cpu_id_start"][0] == 0
    assert _abi.OFF_CPU_ID == fields["cpu_id"][0] == 4
    assert _abi.OFF_RSEQ_CS == fields["rseq_cs"][0] == 8
    assert _abi.OFF_FLAGS == fields["flags"][0] == 16
    assert _abi.OFF_NODE_ID == fields["node_id"][0] == 20
    assert _abi.OFF_MM_CID == fields["mm_cid"][0] == 24
    assert _abi.OFF_SLICE_REQUEST == fields["slice_ctrl"][0] == 28
    assert _abi.OFF_SLICE_GRANTED == 29
    # The fields tile the original 32-byte area without gap or overlap.
    end = 0
    for offset, size in fields.values():
        assert offset == end
        end = offset + size
    assert end == _abi.ORIG_SIZE == _core.ABI["ORIG_SIZE"] == 32
    assert _abi.ORIG_ALIGN == _core.ABI["ORIG_ALIGN"] == 32


def test_struct_rseq_cs_layout_agrees():
    cs = {name: (offset, size) for name, offset, size in _core.ABI_CS_FIELDS}
    assert (_abi.CS_OFF_VERSION, _abi.CS_OFF_FLAGS, _abi.CS_OFF_START_IP,
            _abi.CS_OFF_POST_COMMIT_OFFSET, _abi.CS_OFF_ABORT_IP) == (0, 4, 8, 16, 24)
    assert [offset for offset, _ in cs.values()] == [0, 4, 8, 16, 24]
    assert sum(size for _, size in cs.values()) == _abi.CS_SIZE == 32


def test_numbers_agree():
    abi = _core.ABI
    assert _abi.FLAG_UNREGISTER == abi["FLAG_UNREGISTER"] == 1
    assert _abi.FLAG_SLICE_EXT_DEFAULT_ON == abi["FLAG_SLICE_EXT_DEFAULT_ON"] == 2
    assert _abi.FLAGS_SLICE_EXT_AVAILABLE == 1 << abi["FLAGS_SLICE_EXT_AVAILABLE_BIT"] == 16
    assert _abi.FLAGS_SLICE_EXT_ENABLED == 1 << abi["FLAGS_SLICE_EXT_ENABLED_BIT"] == 32
    assert _abi.CS_NO_RESTART_FLAGS == abi["CS_FLAGS_DEPRECATED"] == 7
    assert _abi.CPU_ID_UNINITIALIZED == abi["CPU_ID_UNINITIALIZED"] & 0xFFFFFFFF == 0xFFFFFFFF
    assert _abi.CPU_ID_REGISTRATION_FAILED == 0xFFFFFFFE
    assert (_abi.AT_RSEQ_FEATURE_SIZE, _abi.AT_RSEQ_ALIGN) == (27, 28)
    assert _abi.MEMBARRIER_CMD_PRIVATE_EXPEDITED_RSEQ == 1 << 7
    assert _abi.MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_RSEQ == 1 << 8
    assert _abi.PR_RSEQ_SLICE_EXTENSION == 79
    assert abi["SIGNATURE"] == _core.SIGNATURE
    if _core.ARCH == "x86_64":
        assert _abi.SIGNATURE_X86 == _core.SIGNATURE
        assert _core.SYSCALLS["rseq"] == 334 and _core.SYSCALLS["arch_prctl"] == 158
    assert _abi.SYSCALLS == _core.SYSCALLS


def test_header_is_the_one_source():
    # Every RSEQ_OFF_* of the shipped header is one of the exported fields.
    with open(HEADER) as header:
        text = header.read()
    offsets = {m.group(1).lower(): int(m.group(2))
               for m in re.finditer(r"#define RSEQ_OFF_(\w+) (\d+)", text)}
    for name, offset, _size in _core.ABI_FIELDS:
        assert offsets[name] == offset


def test_model_reads_fields_where_the_kernel_writes_them():
    # The machine's view of an area laid out by ctypes at the C offsets.
    class Area(ctypes.Structure):
        _fields_ = [(name, {4: ctypes.c_uint32, 8: ctypes.c_uint64}[size])
                    for name, _offset, size in _core.ABI_FIELDS]
    for name, offset, _size in _core.ABI_FIELDS:
        assert getattr(Area, name).offset == offset
    assert ctypes.sizeof(Area) == _abi.ORIG_SIZE
