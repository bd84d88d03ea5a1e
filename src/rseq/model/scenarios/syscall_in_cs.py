"""A system call inside a critical section: a programming error on Linux,
allowed by the FreeBSD proposal (seed 004)."""

from __future__ import annotations

from .._machine import Machine
from .._program import Abort, Context, Load, Store, Syscall, _enter, current_cpu
from ._base import LINUX, Scenario, ThreadSpec
from .counter import counter_final, counter_setup


def add_with_syscall(ctx: Context, v: int, cpu: int):
    """load_add_store with a system call between the load and the commit."""
    cs = ctx.cs("load_syscall_add_store")
    try:
        if not (yield from _enter(ctx, cs, cpu)):
            return -1
        value = yield Load(v, size=8, ip=cs.ip(1))
        yield Syscall("getpid", ip=cs.ip(2))
        yield Store(v, value + 1, size=8, ip=cs.ip(3), commit=True)
    except Abort:
        return -1
    return 0


def percpu_add_with_syscall(ctx: Context):
    counters = ctx.get("counters")
    done = 0
    while done < 1:
        cpu = yield from current_cpu(ctx)
        ret = yield from add_with_syscall(ctx, counters + 8 * cpu, cpu)
        if ret == 0:
            done += 1


def _syscall_setup(m: Machine) -> dict:
    data = counter_setup(m)
    data["adds"] = 1
    return data


SCENARIOS = (
    Scenario(
        name="syscall-in-cs",
        title="a system call inside a critical section",
        doc="Two threads add to a per-CPU counter with a critical section that makes a system "
        "call before its commit. Property: no thread is killed and the counter is exact. "
        "Linux: violated - a system call inside a critical section is a programming error, "
        "and kernels built with CONFIG_DEBUG_RSEQ kill the thread. FreeBSD (seed 004): holds - "
        "no signal, and a switch during the call aborts the section on return.",
        expect="violated",
        expect_by_variant={"freebsd-2021": "holds"},
        setup=_syscall_setup,
        threads=lambda data: [
            ThreadSpec(percpu_add_with_syscall, 0),
            ThreadSpec(percpu_add_with_syscall, None),
        ],
        check_final=counter_final,
        variants=LINUX + ("freebsd-2021",),
        ncpus=1,
        extra_sections={"load_syscall_add_store": 4},
    ),
)
