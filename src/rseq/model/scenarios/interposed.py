"""An interposed 32-byte __rseq_abi registered with a 40-byte length: seed
000's size negotiation against a kernel that trusts rseq_len."""

from __future__ import annotations

from .. import _abi
from .._machine import TLS_BASE, Machine
from .._program import Context, Load, Syscall, current_cpu, rseq_register
from ._base import Scenario, ThreadSpec


def _interposed_setup(m: Machine) -> dict:
    # A preloaded library's __rseq_abi: the original 32 bytes, flags 0 (it
    # predates the size flag), and the next TLS variable right after it.
    area = TLS_BASE + 0x1000
    m.map("T1.__rseq_abi", area, _abi.ORIG_SIZE, "rw")
    m.map("T1.neighbour", area + _abi.ORIG_SIZE, 16, "rw")
    m.memory[area + _abi.ORIG_SIZE] = 0x5A5A5A5A
    m.memory[area + _abi.OFF_CPU_ID] = _abi.CPU_ID_UNINITIALIZED
    return {"area1": area, "neighbour": area + _abi.ORIG_SIZE}


def new_registrant(ctx: Context):
    """A registration owner built against the 40-byte struct rseq: it passes
    its own sizeof, unaware the symbol was interposed by a 32-byte one."""
    result = yield from rseq_register(ctx, length=_abi.SF_KERNEL_SIZE)
    if result != 0:
        return
    flags = yield Load(ctx.area + _abi.OFF_FLAGS)
    size = _abi.ORIG_SIZE
    if flags & _abi.SIZE_FLAG:
        size = yield Load(ctx.area + _abi.SF_OFF_KERNEL_SIZE)
    if size >= _abi.SF_OFF_NODE_ID + 4:
        yield Load(ctx.area + _abi.SF_OFF_NODE_ID)
    else:
        yield Syscall("getcpu")  # node_id not usable: the slow path
    yield from current_cpu(ctx)


def _interposed_check(m: Machine, info) -> str | None:
    neighbour = m.threads[0].ctx.get("neighbour")
    for addr, _size, fname, _tid in m.kernel_writes:
        if neighbour <= addr < neighbour + 16:
            offset = addr - neighbour + _abi.ORIG_SIZE
            return (
                f"the kernel wrote {fname} at __rseq_abi+{offset}, past the "
                f"{_abi.ORIG_SIZE}-byte area the interposing library defined, into T1.neighbour"
            )
    return None


def _scenario(negotiate: bool) -> Scenario:
    if negotiate:
        title = "an interposed smaller __rseq_abi with seed 000's size negotiation"
        verdict = (
            "Holds: the kernel takes the size from the definition (flag bit and user_size), "
            "and without the flag uses only the original 32 bytes."
        )
    else:
        title = "an interposed smaller __rseq_abi and a kernel that trusts rseq_len (broken)"
        verdict = "Violated: the kernel writes node_id at offset 32, into the next variable."
    return Scenario(
        name="interposed-size-flag" if negotiate else "interposed-trusts-length",
        title=title,
        doc=(
            "A preloaded library defines a 32-byte __rseq_abi; the registration owner was built "
            "with a 40-byte struct rseq and registers its own sizeof. Property: the kernel never "
            "writes outside the 32 bytes. " + verdict
        ),
        expect="holds" if negotiate else "violated",
        setup=_interposed_setup,
        threads=lambda data: [ThreadSpec(new_registrant, 0)],
        check_step=_interposed_check,
        variants=("size-flag-2020",),
        default_variant="size-flag-2020",
        variant_options={"negotiate": negotiate},
        preregister=False,
        ncpus=2,
        bounds={"preemptions": 1, "migrations": 1, "signals": 0},
        pair="interposed-trusts-length" if negotiate else "interposed-size-flag",
    )


SCENARIOS = (_scenario(negotiate=False), _scenario(negotiate=True))
