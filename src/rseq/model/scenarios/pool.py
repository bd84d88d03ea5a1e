"""The pool scenarios: rseq.Pool's per-CPU stack pop and push and its refill
from the overflow (csrc/lib/pool.h), with a process that may be killed at
any instant.

Memory: per CPU a stack word (generation << 8 | count) and CACHE slots of
block numbers; per block an owner word (0: free in the overflow; a thread id;
with MARK: freed onto a stack by that thread; with POPPING: the pop's
speculative store, dropped after the commit).  T1 is a process that may be
SIGKILLed at any instant, inside critical sections too (a `Choose` after
each of its stores: the explorer takes every branch).  At the end the
dead process's blocks are reclaimed as pool.h's reclaim() does (owner word
names it, not on a stack) and every block must be exactly once: on a stack,
in the overflow, reclaimed, or held by a live thread whose owner word it
carries.  At every instant no block is held by two threads, and no held
block is free.

The broken twin commits the pop before it records the owner: a kill between
the two leaves the block out of every stack with its previous owner's word,
so nobody frees it (or reclaim frees it under a live holder).
"""

from __future__ import annotations

from .._machine import Machine
from .._program import Abort, Cas, Choose, Context, Load, Store, _enter, current_cpu
from ._base import Scenario, ThreadSpec

CACHE = 2           # slots per CPU stack
BLOCKS = (1, 2, 3)  # block numbers (0 means none)
MARK = 0x100        # owner-word flag: freed onto a stack
POPPING = 0x200     # owner-word flag: the pop's speculative store
FREE = 0

OK, EMPTY, FULL, RETRY, KILLED = "ok", "empty", "full", "retry", "killed"


def _setup(m: Machine) -> dict:
    words = m.alloc("stack_word", 8 * m.ncpus, align=64)
    slots = m.alloc("stack_slots", 8 * CACHE * m.ncpus, align=64)
    owners = m.alloc("owner", 8 * (len(BLOCKS) + 1), align=64)
    for cpu in range(m.ncpus):
        m.name(words + 8 * cpu, f"word[cpu{cpu}]")
        for k in range(CACHE):
            m.name(slots + 8 * (cpu * CACHE + k), f"slot[cpu{cpu}][{k}]")
    for b in BLOCKS:
        m.name(owners + 8 * b, f"owner[{b}]")
    # cpu0 caches blocks 1 and 2 (last freed by T2: stale owner words);
    # block 3 is in the overflow.
    m.memory[words] = 2
    m.memory[slots] = 1
    m.memory[slots + 8] = 2
    m.memory[owners + 8 * 1] = 2 | MARK
    m.memory[owners + 8 * 2] = 2 | MARK
    m.memory[owners + 8 * 3] = FREE
    data = {"words": words, "slots": slots, "owners": owners}
    for tid in (1, 2):
        for k in range(2):
            data[f"held{tid}_{k}"] = m.alloc(f"T{tid}.held{k}", 8)
        data[f"done{tid}"] = m.alloc(f"T{tid}.done", 8)
    return data


def _word(ctx, cpu):
    return ctx.get("words") + 8 * cpu


def _slot(ctx, cpu, k):
    return ctx.get("slots") + 8 * (cpu * CACHE + k)


def _owner(ctx, b):
    return ctx.get("owners") + 8 * b


def _dies(ctx: Context, ip: int | None = None):
    """An instant at which T1's process may be SIGKILLed: True if it is.
    Placed after every store of T1 (and at its start): memory only changes
    at stores, so a kill anywhere between two stores leaves what a kill
    right after the first one leaves."""
    if ctx.tid != 1:
        return False
    killed = yield Choose(2, "SIGKILL here?", ip=ip)
    return killed == 1


def _pop(ctx: Context, cpu: int, broken: bool):
    """read w, n, b = slot[n-1]; [load word; if (word != w) fail; store me
    to owner[b]; store (gen+1, n-1) to word (commit)] - the owner inside
    the sequence.  Broken: commit first, store the owner after."""
    me = ctx.tid
    w = yield Load(_word(ctx, cpu), size=8)
    n = w & 0xFF
    if n == 0:
        return EMPTY, 0
    b = yield Load(_slot(ctx, cpu, n - 1), size=8)
    cs = ctx.cs("pool_pop")
    try:
        if not (yield from _enter(ctx, cs, cpu)):
            return RETRY, 0
        current = yield Load(_word(ctx, cpu), size=8, ip=cs.ip(1))
        if current != w:
            return RETRY, 0
        if not broken:
            yield Store(_owner(ctx, b), me | POPPING, size=8, ip=cs.ip(2))
            if (yield from _dies(ctx, cs.ip(3))):
                return KILLED, 0
        yield Store(_word(ctx, cpu), (((w >> 8) + 1) << 8) | (n - 1), size=8, ip=cs.ip(3),
                    commit=True)
    except Abort:
        return RETRY, 0
    if (yield from _dies(ctx)):
        return KILLED, 0
    # Broken: the owner is recorded only now.  Correct: the flag is dropped.
    yield Store(_owner(ctx, b), me, size=8)
    if (yield from _dies(ctx)):
        return KILLED, 0
    return OK, b


def _push(ctx: Context, cpu: int, b: int):
    """read w, n; [load word; if (word != w) fail; store b to slot[n];
    store (gen+1, n+1) to word (commit)]."""
    w = yield Load(_word(ctx, cpu), size=8)
    n = w & 0xFF
    if n >= CACHE:
        return FULL
    cs = ctx.cs("pool_push")
    try:
        if not (yield from _enter(ctx, cs, cpu)):
            return RETRY
        current = yield Load(_word(ctx, cpu), size=8, ip=cs.ip(1))
        if current != w:
            return RETRY
        yield Store(_slot(ctx, cpu, n), b, size=8, ip=cs.ip(2))
        if (yield from _dies(ctx, cs.ip(3))):
            return KILLED
        yield Store(_word(ctx, cpu), (((w >> 8) + 1) << 8) | (n + 1), size=8, ip=cs.ip(3),
                    commit=True)
    except Abort:
        return RETRY
    if (yield from _dies(ctx)):
        return KILLED
    return OK


def _take(ctx: Context):
    """The refill from the overflow: CAS an owner word FREE -> me."""
    b = 1
    while b <= len(BLOCKS):
        owner = yield Load(_owner(ctx, b), size=8)
        if owner == FREE:
            old = yield Cas(_owner(ctx, b), FREE, ctx.tid)
            if old == FREE:
                if (yield from _dies(ctx)):
                    return KILLED, 0
                return OK, b
        b += 1
    return EMPTY, 0


def _alloc(ctx: Context, broken: bool):
    while True:
        cpu = yield from current_cpu(ctx)
        status, b = yield from _pop(ctx, cpu, broken)
        if status == EMPTY:
            status, b = yield from _take(ctx)
        if status != RETRY:
            return status, b


def _free(ctx: Context, b: int):
    """Mark the owner word, then push; to the overflow if the stack is full."""
    yield Store(_owner(ctx, b), ctx.tid | MARK, size=8)
    if (yield from _dies(ctx)):
        return KILLED
    while True:
        cpu = yield from current_cpu(ctx)
        status = yield from _push(ctx, cpu, b)
        if status == FULL:
            yield Store(_owner(ctx, b), FREE, size=8)
            return OK
        if status != RETRY:
            return status


def _worker(broken: bool):
    """alloc a, (T1: alloc b,) free a; each held block recorded in T<n>.held."""

    def program(ctx: Context):
        held0 = ctx.get(f"held{ctx.tid}_0")
        held1 = ctx.get(f"held{ctx.tid}_1")
        status, a = yield from _alloc(ctx, broken)
        if status == KILLED:
            return
        if status == OK:
            yield Store(held0, a, size=8)
        if ctx.tid == 1:
            status, b = yield from _alloc(ctx, broken)
            if status == KILLED:
                return
            if status == OK:
                yield Store(held1, b, size=8)
        if a:
            yield Store(held0, 0, size=8)
            status = yield from _free(ctx, a)
            if status == KILLED:
                return
        yield Store(ctx.get(f"done{ctx.tid}"), 1, size=8)

    program.__name__ = "pool_worker_broken" if broken else "pool_worker"
    return program


def _held(m: Machine, ctx: Context) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for tid in (1, 2):
        for k in range(2):
            b = m.read(ctx.get(f"held{tid}_{k}"))
            if b:
                out.setdefault(b, []).append(tid)
    return out


def _on_stacks(m: Machine, ctx: Context) -> list[int]:
    out = []
    for cpu in range(m.ncpus):
        n = m.read(_word(ctx, cpu)) & 0xFF
        out.extend(m.read(_slot(ctx, cpu, k)) for k in range(min(n, CACHE)))
    return out


def _check_step(m: Machine, info) -> str | None:
    ctx = m.threads[0].ctx
    stacked = _on_stacks(m, ctx)
    for b, holders in _held(m, ctx).items():
        if len(holders) > 1:
            return f"block {b} is held by T{holders[0]} and T{holders[1]} at once"
        if b in stacked or m.read(_owner(ctx, b)) == FREE:
            return f"block {b} is held by T{holders[0]} and free at the same time"
    return None


def _check_final(m: Machine) -> str | None:
    ctx = m.threads[0].ctx
    dead = {tid for tid in (1, 2) if not m.read(ctx.get(f"done{tid}"))}
    stacked = _on_stacks(m, ctx)
    held = _held(m, ctx)
    for b in BLOCKS:
        owner = m.read(_owner(ctx, b))
        places = [f"cpu stack ({n} times)" for n in [stacked.count(b)] if n]
        if b not in stacked:
            if owner == FREE:
                places.append("the overflow")
            elif owner & 0xFF in dead:
                places.append(f"reclaimed from dead T{owner & 0xFF}")
        for tid in held.get(b, []):
            if tid in dead:
                continue
            if owner != tid:
                return (f"block {b} is held by live T{tid} but its owner word says "
                        f"{owner:#x}: reclaim() would free it under its holder")
            places.append(f"held by T{tid}")
        if not places:
            return (f"block {b} is lost: in no stack, not in the overflow, and its owner word "
                    f"{owner:#x} names no dead process to reclaim it from and no holder "
                    "(a kill between the pop's commit and the owner store)")
        if len(places) > 1 or stacked.count(b) > 1:
            return f"block {b} is in two places at once: {', '.join(places)}"
    return None


_SECTIONS = {"pool_pop": 4, "pool_push": 4}

SCENARIOS = (
    Scenario(
        name="pool",
        title="rseq.Pool per-CPU stack pop/push and overflow refill, killed at any instant",
        doc="T1 (a process that may be SIGKILLed at any instant, inside sequences too) "
        "allocates two blocks and frees one, T2 allocates one and frees it, from per-CPU stacks "
        "popped with load_cbne_store_store (the owner word is the speculative store before "
        "the commit) and refilled from the overflow by CAS on owner words. Property: no block "
        "is ever held twice or held while free, and after reclaiming the dead process's "
        "blocks every block is in exactly one place. Holds.",
        expect="holds",
        setup=_setup,
        threads=lambda data: [ThreadSpec(_worker(False), 0), ThreadSpec(_worker(False), 1)],
        check_step=_check_step,
        check_final=_check_final,
        bounds={"preemptions": 1, "migrations": 0, "signals": 0},
        extra_sections=_SECTIONS,
        pair="pool-owner-after-commit",
    ),
    Scenario(
        name="pool-owner-after-commit",
        title="rseq.Pool pop that commits before recording the owner (broken)",
        doc="The same pool with a pop that commits the new count and stores the owner word "
        "after the sequence. A kill between the two leaves the block in no stack with its "
        "previous owner's word: nobody ever frees it.",
        expect="violated",
        setup=_setup,
        threads=lambda data: [ThreadSpec(_worker(True), 0), ThreadSpec(_worker(True), 1)],
        check_step=_check_step,
        check_final=_check_final,
        bounds={"preemptions": 1, "migrations": 0, "signals": 0},
        extra_sections=_SECTIONS,
        pair="pool",
    ),
)
