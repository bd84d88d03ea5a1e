"""A critical section under Linux 7.0's time-slice extension, against a kernel
that keeps the grant across a system call."""

from __future__ import annotations

from .. import _abi
from .._machine import Machine
from .._program import Context, Load, Mark, Store, Syscall
from ._base import Scenario, ThreadSpec
from .mutex import bystander


def _slice_setup(m: Machine) -> dict:
    counter = m.alloc("protected", 8)
    return {"protected": counter}


def slice_user(ctx: Context):
    """Two short sections under a slice-extension request; the second one
    makes a system call, which must revoke any grant."""
    yield Syscall(
        "prctl",
        (
            _abi.PR_RSEQ_SLICE_EXTENSION,
            _abi.PR_RSEQ_SLICE_EXTENSION_SET,
            _abi.PR_RSEQ_SLICE_EXT_ENABLE,
        ),
    )
    request = ctx.field("slice_request")
    granted = ctx.field("slice_granted")
    n = 0
    while n < 2:
        yield Store(request, 1, size=1)
        yield Mark("section", n)
        value = yield Load(ctx.get("protected"), size=8)
        if n == 1:
            yield Syscall("getpid")
        yield Store(ctx.get("protected"), value + 1, size=8)
        yield Store(request, 0, size=1)
        was_granted = yield Load(granted, size=1)
        if was_granted:
            yield Syscall("rseq_slice_yield")
        n += 1


def _slice_check(m: Machine, info) -> str | None:
    variant = m.variant
    for t in m.threads:
        if t.k["rseq"] is None:
            continue
        granted = m.read(t.k["rseq"][0] + 29)
        key = ("granted-steps", t.tid)
        if info is not None and info[0] is t and granted:
            m.ghost[key] = m.ghost.get(key, 0) + 1
            if m.ghost[key] > variant.slice_steps:
                return f"{t.name}'s grant outlived its bound of {variant.slice_steps} steps"
        elif not granted:
            m.ghost.pop(key, None)
    if info is not None:
        t, step, result = info
        if (
            type(step) is Syscall
            and step.name != "prctl"
            and t.k["rseq"] is not None
            and m.read(t.k["rseq"][0] + 29)
        ):
            return f"{t.name} still holds a grant after the system call {step.name}()"
    return None


def _scenario(revoke: bool) -> Scenario:
    if revoke:
        title = "a critical section under the 7.0 time-slice extension"
        verdict = "Holds under linux-7.0."
    else:
        title = (
            "the time-slice extension in a kernel that keeps grants across system calls (broken)"
        )
        verdict = "Violated: the grant survives getpid()."
    return Scenario(
        name="time-slice" if revoke else "time-slice-unrevoked",
        title=title,
        doc="T1 sets slice_ctrl.request around two short sections (the second makes a system "
        "call) and calls rseq_slice_yield() when it was granted; T2 waits for the only CPU. "
        "Properties: a grant is revoked by any system call, and never lasts longer than its "
        "bound. " + verdict,
        expect="holds" if revoke else "violated",
        variant_options={} if revoke else {"revoke_on_syscall": False},
        pair="time-slice-unrevoked" if revoke else "time-slice",
        setup=_slice_setup,
        threads=lambda data: [ThreadSpec(slice_user, 0), ThreadSpec(bystander, None)],
        check_step=_slice_check,
        variants=("linux-7.0",),
        default_variant="linux-7.0",
        area_size=64,
        ncpus=1,
        bounds={"preemptions": 3, "migrations": 0, "signals": 0},
    )


SCENARIOS = (_scenario(revoke=True), _scenario(revoke=False))
