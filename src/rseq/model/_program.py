"""User-space programs for the model: the steps they yield and the per-CPU
primitives written with them.

A program is a generator function ``program(ctx)``.  It yields one step at a
time; the machine executes the step and sends back its result.  Between two
steps the explorer may preempt, migrate or signal the thread, so every
interleaving of steps is a possible execution.

Programs must keep their state in local variables of immutable values (ints,
tuples, strings): the explorer hashes the generator frames (code position
and locals) to recognise states it has already run, and rebuilds a thread by
replaying the results it received.

The per-CPU primitives are named after their pseudo-code like the C core's
(librseq's) and return 0 (committed), 1 (compare failed) or -1 (aborted).
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

from . import _abi

Program = Generator[Any, Any, Any]


class Abort(Exception):
    """Thrown into a program when the kernel moves it to a critical section's
    abort_ip (preemption, migration or signal inside the section)."""


# ---------------------------------------------------------------- steps


@dataclass(frozen=True, slots=True)
class Load:
    """Read ``size`` bytes at ``addr``; the result is the value."""

    addr: int
    size: int = 4
    ip: int | None = None


@dataclass(frozen=True, slots=True)
class Store:
    """Write ``value`` at ``addr``.  ``commit`` marks the last instruction of
    a critical section (for the trace only)."""

    addr: int
    value: int
    size: int = 4
    ip: int | None = None
    commit: bool = False


@dataclass(frozen=True, slots=True)
class Cas:
    """Atomic compare-and-swap; the result is the old value."""

    addr: int
    expected: int
    new: int
    size: int = 8
    ip: int | None = None


@dataclass(frozen=True, slots=True)
class Syscall:
    """A system call; the result is the return value (``-errno`` on error)."""

    name: str
    args: tuple = ()
    ip: int | None = None


@dataclass(frozen=True, slots=True)
class Choose:
    """A nondeterministic choice among ``n`` values, made by the explorer
    (free: not counted against any bound).  The result is the index."""

    n: int
    why: str = ""
    ip: int | None = None


@dataclass(frozen=True, slots=True)
class Mark:
    """A no-op that scenario checks observe (``'enter'``, ``'spin'``...)."""

    label: str
    arg: Any = None
    ip: int | None = None


# ---------------------------------------------------------------- context


@dataclass(frozen=True)
class CriticalSection:
    """Where a critical section lives: ``desc`` is the address of its
    struct rseq_cs; instructions at ``start_ip .. post_commit_ip - 1`` are
    inside; ``abort_ip`` is preceded by the signature."""

    name: str
    desc: int
    start_ip: int
    post_commit_ip: int
    abort_ip: int

    def ip(self, index: int) -> int:
        """The address of instruction ``index`` of the section (0 = start)."""
        ip = self.start_ip + index
        assert ip < self.post_commit_ip, "instruction outside the critical section"
        return ip


@dataclass(frozen=True)
class Context:
    """What a thread's program knows: its id, its rseq area (``area``, 0 when
    the variant keeps it private), the field offsets of the variant's
    layout, the critical sections laid out in the text, the signature, and
    the scenario's addresses in ``data``."""

    tid: int
    area: int
    offsets: tuple  # ((field, offset), ...)
    sections: tuple  # ((name, CriticalSection), ...)
    signature: int
    area_size: int
    data: tuple = ()  # ((name, value), ...)
    query_offsets: bool = False  # ktls-2020: offsets come from a query

    def __post_init__(self) -> None:
        object.__setattr__(self, "_offsets", dict(self.offsets))
        object.__setattr__(self, "_sections", dict(self.sections))
        object.__setattr__(self, "_data", dict(self.data))

    def field(self, name: str) -> int:
        return self.area + self._offsets[name]

    def cs(self, name: str) -> CriticalSection:
        return self._sections[name]

    def get(self, name: str) -> Any:
        return self._data[name]


def rseq_field(ctx: Context, name: str) -> Program:
    """Address of a field of this thread's area.  Under ktls-2020 the layout
    is private to the kernel and found through an accessor (seed 003), so
    this yields the query; elsewhere it is a fixed offset."""
    if ctx.query_offsets:
        offset = yield Syscall("rseq_offset", (name,))
        return ctx.area + offset
    return ctx.field(name)
    yield  # pragma: no cover - makes this a generator in both branches


def current_cpu(ctx: Context) -> Program:
    """``rseq_current_cpu_raw()``: one load of cpu_id_start."""
    addr = yield from rseq_field(ctx, "cpu_id_start")
    cpu = yield Load(addr)
    return cpu


def rseq_register(ctx: Context, flags: int = 0, length: int | None = None) -> Program:
    """rseq(area, length, flags, signature); returns 0 or -errno."""
    length = ctx.area_size if length is None else length
    result = yield Syscall("rseq", (ctx.area, length, flags, ctx.signature))
    return result


def rseq_unregister(ctx: Context, length: int | None = None) -> Program:
    length = ctx.area_size if length is None else length
    result = yield Syscall("rseq", (ctx.area, length, _abi.FLAG_UNREGISTER, ctx.signature))
    return result


# ---------------------------------------------------------------- primitives
#
# Each primitive is one critical section: [1] store &rseq_cs into the area
# (before start_ip), [2] check cpu_id against the caller's cpu, the loads,
# and the commit store as the last instruction.  A cpu mismatch branches to
# the abort handler, so it returns -1 like an abort.


def _enter(ctx: Context, cs: CriticalSection, cpu: int) -> Program:
    rseq_cs = yield from rseq_field(ctx, "rseq_cs")
    cpu_id = yield from rseq_field(ctx, "cpu_id")
    yield Store(rseq_cs, cs.desc, size=8, ip=cs.start_ip - 1)
    current = yield Load(cpu_id, ip=cs.ip(0))
    return current == cpu


def load_cbne_store(ctx: Context, v: int, expect: int, newv: int, cpu: int) -> Program:
    """``if (*v != expect) return 1; *v = newv;`` on ``cpu``."""
    cs = ctx.cs("load_cbne_store")
    try:
        if not (yield from _enter(ctx, cs, cpu)):
            return -1
        value = yield Load(v, size=8, ip=cs.ip(1))
        if value != expect:
            return 1
        yield Store(v, newv, size=8, ip=cs.ip(2), commit=True)
    except Abort:
        return -1
    return 0


def load_add_store(ctx: Context, v: int, count: int, cpu: int) -> Program:
    """``*v += count`` on ``cpu``."""
    cs = ctx.cs("load_add_store")
    try:
        if not (yield from _enter(ctx, cs, cpu)):
            return -1
        value = yield Load(v, size=8, ip=cs.ip(1))
        yield Store(v, value + count, size=8, ip=cs.ip(2), commit=True)
    except Abort:
        return -1
    return 0


def load_cbeq_store_add_load_store(
    ctx: Context, v: int, expectnot: int, voffp: int, load: int, cpu: int
) -> Program:
    """``if (*v == expectnot) return 1; *load = *v; *v = *(*v + voffp);``
    on ``cpu`` - the per-CPU list pop."""
    cs = ctx.cs("load_cbeq_store_add_load_store")
    try:
        if not (yield from _enter(ctx, cs, cpu)):
            return -1
        head = yield Load(v, size=8, ip=cs.ip(1))
        if head == expectnot:
            return 1
        yield Store(load, head, size=8, ip=cs.ip(2))
        newv = yield Load(head + voffp, size=8, ip=cs.ip(3))
        yield Store(v, newv, size=8, ip=cs.ip(4), commit=True)
    except Abort:
        return -1
    return 0


# name -> number of instructions in [start_ip, post_commit_ip)
PRIMITIVES = {
    "load_cbne_store": 3,
    "load_add_store": 3,
    "load_cbeq_store_add_load_store": 5,
}
