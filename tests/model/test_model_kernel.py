"""Kernel-side semantics of the variants, step by step."""

from __future__ import annotations

import pytest

from rseq.model import VARIANTS, Context, Machine, Syscall, _abi
from rseq.model._machine import Killed

SIG = _abi.SIGNATURE_X86
AREA = 0x7F0000001000


def machine(variant="linux-6.3", size=64):
    m = Machine(VARIANTS[variant] if isinstance(variant, str) else variant, ncpus=2)
    m.map("area", AREA, 4096, "rw")
    t = m.add_thread("T1", None, None)
    m.schedule_in(t, 0)
    return m, t


def rseq(m, t, area=AREA, length=32, flags=0, sig=SIG, *more):
    result = m.variant.sys_rseq(m, t, area, length, flags, sig, *more)
    m.return_to_user(t, from_syscall=True)
    return _abi.errno_name(result)


@pytest.mark.parametrize("variant", ["linux-4.18", "linux-6.3", "linux-7.0", "freebsd-2021"])
def test_error_order_common_to_linux(variant):
    m, t = machine(variant)
    assert rseq(m, t, flags=1) == "EINVAL"
    assert rseq(m, t) == "0"
    assert m.read(AREA + 4) == 0  # cpu_id written on return to user space
    assert rseq(m, t) == "EBUSY"
    assert rseq(m, t, sig=1) == "EPERM"
    assert rseq(m, t, AREA + 64) == "EINVAL"
    assert rseq(m, t, flags=1, sig=1) == "EPERM"
    assert rseq(m, t, flags=1) == "0"
    assert m.read(AREA + 4) == _abi.CPU_ID_UNINITIALIZED


def test_linux_418_only_accepts_32_bytes():
    m, t = machine("linux-4.18")
    assert rseq(m, t, length=64) == "EINVAL"
    m, t = machine("linux-6.3")
    assert rseq(m, t, length=64) == "0"
    assert m.read(AREA + 24) == 0  # mm_cid


def test_linux_70_modes_and_alignment():
    m, t = machine("linux-7.0")
    assert rseq(m, t, AREA + 32, 64) == "EINVAL"  # AT_RSEQ_ALIGN is 64
    assert rseq(m, t, AREA, 64) == "0"
    assert t.k["extra"][0] == "optimised"
    assert m.read(AREA + 16) & _abi.FLAGS_SLICE_EXT_AVAILABLE
    m2, t2 = machine("linux-7.0")
    assert rseq(m2, t2, AREA, 32, _abi.FLAG_SLICE_EXT_DEFAULT_ON) == "0"
    assert t2.k["extra"][0] == "legacy" and t2.k["slice"][0]


def test_linux_70_optimised_mode_kills_on_read_only_write():
    m, t = machine("linux-7.0")
    rseq(m, t, AREA, 64)
    m.memory[AREA + 4] = 7  # user space scribbles on cpu_id
    m.switch_out(t, 1)
    with pytest.raises(Killed):
        m.schedule_in(t, 1)
    assert "read-only" in m.killed


def test_linux_70_legacy_mode_rewrites_instead():
    m, t = machine("linux-7.0")
    rseq(m, t, AREA, 32)
    m.memory[AREA + 4] = 7
    m.switch_out(t, 1)
    m.schedule_in(t, 1)
    assert m.killed is None and m.read(AREA + 4) == 1


def test_slice_prctl_needs_registration():
    m, t = machine("linux-7.0")
    args = (_abi.PR_RSEQ_SLICE_EXTENSION, _abi.PR_RSEQ_SLICE_EXTENSION_SET, 1)
    assert m.variant.sys_prctl(m, t, *args) == -_abi.ENXIO
    rseq(m, t)
    assert m.variant.sys_prctl(m, t, *args) == 0


def test_size_flag_negotiation():
    v = VARIANTS["size-flag-2020"]
    m, t = machine(v)
    m.memory[AREA + 16] = _abi.SIZE_FLAG
    m.memory[AREA + 20] = 36  # user_size: a definition that knows node_id only
    assert rseq(m, t, length=40) == "0"
    assert m.read(AREA + 24) == 36  # kernel_size = min(40, 36)
    written = {w[2] for w in m.kernel_writes}
    assert "node_id" in written and "mm_cid" not in written


def test_sched_state_shared_area():
    m, t = machine("sched-state-2023")
    shared = AREA + 0x100
    assert rseq(m, t, AREA, 32, _abi.FLAG_SHARED, SIG) == "EINVAL"  # missing 5th argument
    assert rseq(m, t, AREA, 32, _abi.FLAG_SHARED, SIG, shared) == "0"
    assert m.read(shared) == _abi.SCHED_STATE_ON_CPU
    m.switch_out(t, 1)
    assert m.read(shared) == 0


def test_ktls_area_is_found_by_query():
    from rseq.model import explore

    assert explore("counter", "ktls-2020", preemptions=1).holds
    v = VARIANTS["ktls-2020"]
    m, t = machine(v)
    result, _ = v.syscall(m, t, Syscall("rseq_offset", ("cpu_id",)))
    assert result == v.offsets["cpu_id"] != 4


def test_fork_keeps_and_exec_drops():
    m, t = machine("linux-6.3")
    rseq(m, t)
    child = m.add_thread("T2", None, None)
    m.variant.fork(m, t, child)
    m.schedule_in(child, 1)
    assert rseq(m, child) == "EBUSY"
    m.variant.exec(m, child)
    assert rseq(m, child, flags=1) == "EINVAL"


def _program_thread(m, program, cpu=0):
    sections = m.define_sections(SIG)
    ctx = Context(1, AREA, tuple(m.variant.offsets.items()), tuple(sections.items()), SIG, 32,
                  (("counter", 0x600000),))
    m.map("counter", 0x600000, 64, "rw")
    t = m.add_thread("T1", program, ctx)
    m.variant.sys_rseq(m, t, AREA, 32, 0, SIG)
    t.start()
    m.schedule_in(t, cpu)
    return t


def test_preemption_inside_section_aborts_and_clears_rseq_cs():
    from rseq.model import load_add_store

    results = []

    def program(ctx):
        ret = yield from load_add_store(ctx, 0x600000, 1, 0)
        results.append(ret)

    m = Machine(VARIANTS["linux-6.3"], 2)
    m.map("area", AREA, 4096, "rw")
    _program_thread(m, program)
    m.apply(("step", 1))  # rseq_cs = &cs
    m.apply(("step", 1))  # cpu_id check, now at the load inside the section
    assert m.read(AREA + 8) != 0
    m.apply(("preempt", 0, None))
    assert results == [-1]
    assert m.read(AREA + 8) == 0
    assert m.read(0x600000) == 0


def test_bad_signature_kills():
    from rseq.model import load_add_store

    def program(ctx):
        yield from load_add_store(ctx, 0x600000, 1, 0)

    m = Machine(VARIANTS["linux-6.3"], 2)
    m.map("area", AREA, 4096, "rw")
    _program_thread(m, program)
    cs = m.sections["load_add_store"]
    m.rodata[cs.abort_ip - 4] = 0xDEADBEEF
    m.apply(("step", 1))
    m.apply(("step", 1))
    m.apply(("preempt", 0, None))
    assert m.killed and "signature" in m.killed


def test_membarrier_rseq_fence_aborts_other_threads():
    from rseq.model import load_add_store

    results = []

    def victim(ctx):
        ret = yield from load_add_store(ctx, 0x600000, 1, 0)
        results.append(ret)

    m = Machine(VARIANTS["linux-6.3"], 2)
    m.map("area", AREA, 4096, "rw")
    _program_thread(m, victim)
    m.apply(("step", 1))
    m.apply(("step", 1))
    caller = m.add_thread("T2", None, None)
    m.schedule_in(caller, 1)
    v = m.variant
    assert v.sys_membarrier(m, caller, _abi.MEMBARRIER_CMD_PRIVATE_EXPEDITED_RSEQ) == -_abi.EPERM
    assert v.sys_membarrier(m, caller, _abi.MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_RSEQ) == 0
    assert v.sys_membarrier(m, caller, _abi.MEMBARRIER_CMD_PRIVATE_EXPEDITED_RSEQ) == 0
    assert results == [-1]
    freebsd = VARIANTS["freebsd-2021"]
    assert (
        freebsd.sys_membarrier(m, caller, _abi.MEMBARRIER_CMD_PRIVATE_EXPEDITED_RSEQ)
        == -_abi.EINVAL
    )
