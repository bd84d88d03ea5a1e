"""Two libraries sharing one thread's registration, with and without seed
002's reference count after struct rseq."""

from __future__ import annotations

from .. import _abi
from .._machine import Machine
from .._program import (
    Choose,
    Context,
    Load,
    Mark,
    Store,
    current_cpu,
    load_add_store,
    rseq_register,
    rseq_unregister,
)
from ._base import LINUX, Scenario, ThreadSpec


def _libs_setup(m: Machine) -> dict:
    counter = m.alloc("counter", 8 * m.ncpus, align=64)
    for cpu in range(m.ncpus):
        m.name(counter + 8 * cpu, f"counter[cpu{cpu}]")
    return {"counters": counter}


def _lib_init(ctx: Context, lib: str, refcount: bool):
    yield Mark("init", lib)
    if refcount:
        rc_addr = ctx.area + _abi.ORIG_SIZE  # after struct rseq, as seed 002
        rc = yield Load(rc_addr)
        yield Store(rc_addr, rc + 1)
        if rc == 0:
            yield from rseq_register(ctx)
    else:
        # EBUSY means someone registered first: piggy-back on it
        yield from rseq_register(ctx)


def _lib_fini(ctx: Context, lib: str, refcount: bool):
    yield Mark("fini", lib)
    if refcount:
        rc_addr = ctx.area + _abi.ORIG_SIZE
        rc = yield Load(rc_addr)
        yield Store(rc_addr, rc - 1)
        if rc == 1:
            yield from rseq_unregister(ctx)
    else:
        yield from rseq_unregister(ctx)


def _lib_use(ctx: Context, lib: str):
    yield Mark("use", lib)
    counters = ctx.get("counters")
    cpu_id = yield Load(ctx.field("cpu_id"))
    if cpu_id >= 0x80000000:
        return  # cpu_id says unregistered: a library falls back to its slow path
    while True:
        cpu = yield from current_cpu(ctx)
        ret = yield from load_add_store(ctx, counters + 8 * cpu, 1, cpu)
        if ret == 0:
            return


def _two_libraries(refcount: bool):
    def program(ctx: Context):
        # Each library runs init, use, fini; the explorer picks the order in
        # which the two libraries' calls interleave on this one thread.
        a = 0
        b = 0
        while a < 3 or b < 3:
            if a < 3 and b < 3:
                pick = yield Choose(2, "libA or libB calls next")
            else:
                pick = 0 if a < 3 else 1
            phase = a if pick == 0 else b
            lib = "libA" if pick == 0 else "libB"
            if phase == 0:
                yield from _lib_init(ctx, lib, refcount)
            elif phase == 1:
                yield from _lib_use(ctx, lib)
            else:
                yield from _lib_fini(ctx, lib, refcount)
            if pick == 0:
                a += 1
            else:
                b += 1

    return program


def _libs_check(m: Machine, info) -> str | None:
    if info is None:
        return None
    t, step, result = info
    if type(step) is Mark:
        if step.label == "fini":
            m.ghost["fini"] = step.arg
        elif step.label == "use" and t.k["rseq"] is None:
            culprit = m.ghost.get("fini")
            by = f" after {culprit} unregistered it" if culprit and culprit != step.arg else ""
            return (
                f"{step.arg} uses rseq while {t.name}'s area is not registered{by} "
                "(use-after-unregister, seed 002)"
            )
    return None


def _scenario(refcount: bool) -> Scenario:
    if refcount:
        title = "two libraries sharing a thread's registration with a user-space reference count"
        verdict = (
            "Holds: a count after struct rseq (seed 002) makes the first init register "
            "and the last fini unregister."
        )
    else:
        title = "two libraries sharing a thread's registration without a reference count (broken)"
        verdict = "Violated: libB's fini unregisters the area libA still uses."
    return Scenario(
        name="two-libs-refcount" if refcount else "two-libs-no-refcount",
        title=title,
        doc=(
            "libA and libB each init (register), use (a per-CPU add) and fini (unregister) on "
            "one thread, in every interleaving of their calls. Property: rseq is only used "
            "while the thread is registered. " + verdict
        ),
        expect="holds" if refcount else "violated",
        setup=_libs_setup,
        threads=lambda data: [ThreadSpec(_two_libraries(refcount), 0)],
        check_step=_libs_check,
        variants=LINUX + ("freebsd-2021", "sched-state-2023"),
        preregister=False,
        ncpus=1,
        bounds={"preemptions": 1, "migrations": 0, "signals": 0},
        pair="two-libs-no-refcount" if refcount else "two-libs-refcount",
    )


SCENARIOS = (_scenario(refcount=False), _scenario(refcount=True))
