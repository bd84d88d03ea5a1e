"""An adaptive mutex on seed 001's sched_state against a spin-only mutex."""

from __future__ import annotations

from .. import _abi
from .._machine import Machine
from .._program import Cas, Context, Load, Mark, Store, Syscall
from ._base import Scenario, ThreadSpec

SHARED_STRIDE = 64


def _mutex_setup(m: Machine) -> dict:
    lock = m.alloc("lock", 8, align=64)
    counter = m.alloc("protected", 8)
    shared = m.alloc("rseq_shared", SHARED_STRIDE * 4, align=64)
    for tid in range(1, 4):
        m.name(shared + SHARED_STRIDE * tid, f"T{tid}.sched_state")
    return {"lock": lock, "protected": counter, "shared": shared, "rounds": 1}


def _mutex_register(ctx: Context):
    return _abi.FLAG_SHARED, (ctx.get("shared") + SHARED_STRIDE * ctx.tid,)


def _lock(ctx: Context, adaptive: bool):
    lock = ctx.get("lock")
    while True:
        owner = yield Cas(lock, 0, ctx.tid)
        if owner == 0:
            return
        if adaptive:
            # seed 001: read the owner's sched_state; spin only while it runs
            state = yield Load(ctx.get("shared") + SHARED_STRIDE * owner)
            if state & _abi.SCHED_STATE_ON_CPU:
                yield Mark("spin", owner)
            else:
                yield Syscall("sched_yield")
        else:
            yield Mark("spin", owner)


def _locker(adaptive: bool):
    def program(ctx: Context):
        rounds = 0
        while rounds < ctx.get("rounds"):
            yield from _lock(ctx, adaptive)
            yield Mark("enter")
            value = yield Load(ctx.get("protected"), size=8)
            yield Store(ctx.get("protected"), value + 1, size=8)
            yield Mark("leave")
            yield Store(ctx.get("lock"), 0, size=8)
            rounds += 1

    return program


def bystander(ctx: Context):
    """Another thread of the process that only needs a CPU for a while."""
    yield Syscall("getpid")
    yield Syscall("getpid")


def _mutex_check(m: Machine, info) -> str | None:
    if info is None:
        # a scheduler move: a waiter may spin again once the owner has run
        for key, owner in list(m.ghost.items()):
            if key[0] == "offcpu-spin" and m.thread(owner).k["cpu"] is not None:
                del m.ghost[key]
        return None
    t, step, result = info
    if type(step) is not Mark:
        return None
    if step.label == "enter":
        inside = m.ghost.get("inside")
        if inside is not None:
            return f"mutual exclusion broken: {t.name} entered while T{inside} is inside"
        m.ghost["inside"] = t.tid
    elif step.label == "leave":
        m.ghost.pop("inside", None)
    elif step.label == "spin":
        owner = m.thread(step.arg)
        key = ("offcpu-spin", t.tid)
        if owner.k["cpu"] is None:
            if m.ghost.get(key) == owner.tid:
                return f"{t.name} spins again while the lock owner {owner.name} is still off CPU"
            m.ghost[key] = owner.tid
        else:
            m.ghost.pop(key, None)
    return None


def _mutex_final(m: Machine) -> str | None:
    value = m.read(m.threads[0].ctx.get("protected"))
    if value != 2:
        return f"the protected counter is {value}, expected 2"
    return None


def _scenario(adaptive: bool) -> Scenario:
    if adaptive:
        title = "adaptive mutex on seed 001's sched_state"
        verdict = "Holds: the waiter reads the owner's sched_state and yields when it is off CPU."
    else:
        title = "spin-only mutex that ignores sched_state (broken)"
        verdict = "Violated: the waiter keeps spinning while the owner is preempted."
    return Scenario(
        name="adaptive-mutex" if adaptive else "spin-mutex",
        title=title,
        doc=(
            "T1 and T2 take a lock (compare-and-swap of the owner's tid) around an update; "
            "T3 competes for the CPUs. Properties: mutual exclusion, and a waiter does not "
            "spin twice while the owner stays off CPU. " + verdict
        ),
        expect="holds" if adaptive else "violated",
        setup=_mutex_setup,
        threads=lambda data: [
            ThreadSpec(_locker(adaptive), 0),
            ThreadSpec(_locker(adaptive), 1),
            ThreadSpec(bystander, None),
        ],
        check_step=_mutex_check,
        check_final=_mutex_final,
        variants=("sched-state-2023",),
        default_variant="sched-state-2023",
        register_flags=_mutex_register,
        bounds={"preemptions": 2, "migrations": 0, "signals": 0},
        pair="spin-mutex" if adaptive else "adaptive-mutex",
    )


SCENARIOS = (_scenario(adaptive=True), _scenario(adaptive=False))
