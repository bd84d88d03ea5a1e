"""Per-CPU ring (rseq.Ring): producers reserve, copy and commit a record in
one load_cbne_memcpy_store against a consumer advancing its position.

The model of csrc/lib/ring.h, cut to what the argument needs: one lane per
CPU of CAP record slots, a record of two words (a value and its check word,
so a torn read shows), the lane's head as a record count (the commit word)
and the consumer's tail (written by the consumer only).  Producers drop a
record when the lane is full and count the drop in a word of their own.
The consumer reads lane by lane and advances tail after each record.

Property: every record a producer committed is delivered exactly once and
intact (or is still in the ring at the end), and nothing else is ever
delivered.  Broken twins: a producer that publishes head before it copies
the record (the consumer reads a slot not yet written), and one that checks
for room and copies outside any critical section (a producer preempted
between its check and its commit overwrites the record another producer on
the same CPU committed meanwhile).
"""

from __future__ import annotations

from .._machine import Machine
from .._program import Abort, Context, Load, Mark, Store, _enter, current_cpu, load_cbne_store
from ._base import Scenario, ThreadSpec

CAP = 2          # record slots per lane
WORDS = 2        # words per record: value, check
CHECK = 0x5A5A   # check word = value ^ CHECK
PUTS = 1         # records per producer (2 producers fill a lane of CAP 2 on one CPU)
MEMCPY = "load_cbne_memcpy_store"


def load_cbne_memcpy_store(ctx: Context, v: int, expect: int, dst: int, words: tuple,
                           newv: int, cpu: int):
    """``if (*v != expect) return 1; memcpy(dst, words); *v = newv;`` on
    ``cpu``: the copy is speculative, the store of newv the commit."""
    cs = ctx.cs(MEMCPY)
    try:
        if not (yield from _enter(ctx, cs, cpu)):
            return -1
        value = yield Load(v, size=8, ip=cs.ip(1))
        if value != expect:
            return 1
        i = 0
        while i < len(words):
            yield Store(dst + 8 * i, words[i], size=8, ip=cs.ip(2 + i))
            i += 1
        yield Store(v, newv, size=8, ip=cs.ip(2 + len(words)), commit=True)
    except Abort:
        return -1
    return 0


def ring_setup(m: Machine) -> dict:
    lanes = m.alloc("ring", 8 * m.ncpus * (2 + CAP * WORDS), align=64)
    stride = 8 * (2 + CAP * WORDS)
    for cpu in range(m.ncpus):
        base = lanes + cpu * stride
        m.name(base, f"head[cpu{cpu}]")
        m.name(base + 8, f"tail[cpu{cpu}]")
        for slot in range(CAP):
            m.name(base + 16 + 8 * WORDS * slot, f"lane{cpu}.slot{slot}.value")
            m.name(base + 24 + 8 * WORDS * slot, f"lane{cpu}.slot{slot}.check")
    drops = m.alloc("drops", 8 * 8, align=64)
    return {"lanes": lanes, "stride": stride, "drops": drops, "puts": PUTS}


def _lane(ctx: Context, cpu: int) -> tuple[int, int, int]:
    base = ctx.get("lanes") + cpu * ctx.get("stride")
    return base, base + 8, base + 16   # head, tail, slots


def _record(ctx: Context, n: int) -> tuple[int, int]:
    value = ctx.tid * 16 + n + 1
    return value, value ^ CHECK


def _count_drop(ctx: Context):
    word = ctx.get("drops") + 8 * ctx.tid
    dropped = yield Load(word, size=8)
    yield Store(word, dropped + 1, size=8)


def producer_rseq(ctx: Context):
    """The ring's producer: check for room against tail outside the
    sequence (tail only grows: a stale tail can only cause a drop), then
    copy and commit in one sequence that re-checks head."""
    n = 0
    while n < ctx.get("puts"):
        cpu = yield from current_cpu(ctx)
        head_addr, tail_addr, slots = _lane(ctx, cpu)
        head = yield Load(head_addr, size=8)
        tail = yield Load(tail_addr, size=8)
        if head - tail >= CAP:
            yield from _count_drop(ctx)
            n += 1
            continue
        words = _record(ctx, n)
        dst = slots + 8 * WORDS * (head % CAP)
        ret = yield from load_cbne_memcpy_store(ctx, head_addr, head, dst, words, head + 1, cpu)
        if ret == 0:
            yield Mark("put", words[0])
            n += 1


def producer_publish_first(ctx: Context):
    """Broken: commits head (a sequence of its own), then copies the record."""
    n = 0
    while n < ctx.get("puts"):
        cpu = yield from current_cpu(ctx)
        head_addr, tail_addr, slots = _lane(ctx, cpu)
        head = yield Load(head_addr, size=8)
        tail = yield Load(tail_addr, size=8)
        if head - tail >= CAP:
            yield from _count_drop(ctx)
            n += 1
            continue
        ret = yield from load_cbne_store(ctx, head_addr, head, head + 1, cpu)
        if ret == 0:
            words = _record(ctx, n)
            dst = slots + 8 * WORDS * (head % CAP)
            yield Store(dst, words[0], size=8)
            yield Store(dst + 8, words[1], size=8)
            yield Mark("put", words[0])
            n += 1


def producer_plain(ctx: Context):
    """Broken: the room check, the copy and the commit as plain code."""
    n = 0
    while n < ctx.get("puts"):
        cpu = yield from current_cpu(ctx)
        head_addr, tail_addr, slots = _lane(ctx, cpu)
        head = yield Load(head_addr, size=8)
        tail = yield Load(tail_addr, size=8)
        if head - tail >= CAP:
            yield from _count_drop(ctx)
            n += 1
            continue
        words = _record(ctx, n)
        dst = slots + 8 * WORDS * (head % CAP)
        yield Store(dst, words[0], size=8)
        yield Store(dst + 8, words[1], size=8)
        yield Store(head_addr, head + 1, size=8)
        yield Mark("put", words[0])
        n += 1


def consumer(ctx: Context):
    """One pass over every lane: read each committed record, then advance
    tail past it (the release that lets producers reuse the slot)."""
    cpu = 0
    while cpu < ctx.get("ncpus"):
        head_addr, tail_addr, slots = _lane(ctx, cpu)
        tail = yield Load(tail_addr, size=8)
        head = yield Load(head_addr, size=8)
        while tail != head:
            at = slots + 8 * WORDS * (tail % CAP)
            value = yield Load(at, size=8)
            check = yield Load(at + 8, size=8)
            yield Mark("got", (value, check))
            tail += 1
            yield Store(tail_addr, tail, size=8)
        cpu += 1


def _check_step(m: Machine, info) -> str | None:
    """Record puts and deliveries in the ghost state; a torn record fails at
    once."""
    if info is None:
        return None
    _t, step, _result = info
    if type(step) is not Mark:
        return None
    if step.label == "put":
        m.ghost["put"] = tuple(sorted(m.ghost.get("put", ()) + (step.arg,)))
    elif step.label == "got":
        value, check = step.arg
        if check != value ^ CHECK or value == 0:
            return (f"torn record delivered: value {value:#x} with check word {check:#x} "
                    f"(a whole record has {value ^ CHECK:#x})")
        got = m.ghost.get("got", ())
        if value in got:
            return f"record {value:#x} delivered twice"
        m.ghost["got"] = tuple(sorted(got + (value,)))
    return None


def _check_final(m: Machine) -> str | None:
    ctx = m.threads[0].ctx
    put = list(m.ghost.get("put", ()))
    got = list(m.ghost.get("got", ()))
    left: list[int] = []
    for cpu in range(m.ncpus):
        base = ctx.get("lanes") + cpu * ctx.get("stride")
        head, tail = m.read(base), m.read(base + 8)
        while tail < head:
            left.append(m.read(base + 16 + 8 * WORDS * (tail % CAP)))
            tail += 1
    if sorted(got + left) != sorted(put):
        return (f"records committed {[hex(v) for v in put]}, but delivered "
                f"{[hex(v) for v in got]} and {[hex(v) for v in left]} still in the ring")
    drops = sum(m.read(ctx.get("drops") + 8 * tid) for tid in (1, 2))
    if len(put) + drops != 2 * ctx.get("puts"):
        return f"{len(put)} puts + {drops} counted drops != {2 * ctx.get('puts')} attempts"
    return None


def _setup(m: Machine) -> dict:
    data = ring_setup(m)
    data["ncpus"] = m.ncpus
    return data


def _threads(producer):
    # The second producer waits for a CPU: it runs on CPU 0 when the first
    # is preempted there, or wherever a CPU is idle.
    return lambda data: [ThreadSpec(producer, 0), ThreadSpec(producer, None),
                         ThreadSpec(consumer, 1)]


_DOC = (f"Two producers (one on CPU 0, one waiting for a CPU) each put {PUTS} record(s) "
        f"into the lane of the CPU they run on (CAP {CAP} slots, a record = a value and "
        "its check word); a consumer on CPU 1 "
        "reads every lane once, advancing tail after each record. Property: every record "
        "delivered once and intact, every committed record delivered or still in the "
        "ring, puts + counted drops = attempts. ")

SCENARIOS = (
    Scenario(
        name="ring",
        title="per-CPU ring: reserve + copy + commit in one load_cbne_memcpy_store",
        doc=_DOC + "Holds: the copy lands past head where nobody reads, the commit "
        "publishes it whole, and a producer interrupted before its commit is aborted "
        "before the other producer of its CPU runs.",
        expect="holds",
        setup=_setup,
        threads=_threads(producer_rseq),
        check_step=_check_step,
        check_final=_check_final,
        extra_sections={MEMCPY: 2 + WORDS + 1},
        # 35k states; --migrations 1 explores far more (minutes).
        bounds={"preemptions": 2, "migrations": 0, "signals": 0},
        pair="ring-publish-first",
    ),
    Scenario(
        name="ring-publish-first",
        title="per-CPU ring publishing head before the copy (broken)",
        doc=_DOC + "Violated: the producer commits head first and copies after, so the "
        "consumer can read the slot before the record is in it (a torn record).",
        expect="violated",
        setup=_setup,
        threads=_threads(producer_publish_first),
        check_step=_check_step,
        check_final=_check_final,
        bounds={"preemptions": 2, "migrations": 0, "signals": 0},
        pair="ring",
    ),
    Scenario(
        name="ring-plain",
        title="per-CPU ring checking room and copying outside a sequence (broken)",
        doc=_DOC + "Violated: a producer preempted between its check of head and its "
        "commit writes over the slot the other producer of its CPU filled and "
        "committed meanwhile, and moves head back: a committed record is lost.",
        expect="violated",
        setup=_setup,
        threads=_threads(producer_plain),
        check_step=_check_step,
        check_final=_check_final,
        bounds={"preemptions": 2, "migrations": 0, "signals": 0},
        pair="ring",
    ),
)
