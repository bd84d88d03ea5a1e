"""Per-CPU counter: load_add_store against a plain load, add, store."""

from __future__ import annotations

from .._machine import Machine
from .._program import Context, Load, Store, current_cpu, load_add_store
from ._base import Scenario, ThreadSpec


def counter_setup(m: Machine) -> dict:
    counters = m.alloc("counter", 8 * m.ncpus, align=64)
    for cpu in range(m.ncpus):
        m.name(counters + 8 * cpu, f"counter[cpu{cpu}]")
    return {"counters": counters, "adds": 2}


def percpu_add(ctx: Context):
    """rseq per-CPU add, retried on abort: the librseq idiom."""
    counters = ctx.get("counters")
    done = 0
    while done < ctx.get("adds"):
        cpu = yield from current_cpu(ctx)
        ret = yield from load_add_store(ctx, counters + 8 * cpu, 1, cpu)
        if ret == 0:
            done += 1


def percpu_add_plain(ctx: Context):
    """The same add without a critical section: load, add, store."""
    counters = ctx.get("counters")
    done = 0
    while done < ctx.get("adds"):
        cpu = yield from current_cpu(ctx)
        value = yield Load(counters + 8 * cpu, size=8)
        yield Store(counters + 8 * cpu, value + 1, size=8)
        done += 1


def counter_signal_handler(ctx: Context):
    """A handler that adds 1 to the per-CPU counter with rseq."""
    counters = ctx.get("counters")
    while True:
        cpu = yield from current_cpu(ctx)
        ret = yield from load_add_store(ctx, counters + 8 * cpu, 1, cpu)
        if ret == 0:
            return


def counter_final(m: Machine) -> str | None:
    counters = m.threads[0].ctx.get("counters")
    adds = m.threads[0].ctx.get("adds")
    values = [m.read(counters + 8 * cpu) for cpu in range(m.ncpus)]
    expected = adds * len(m.threads) + (m.used[2] if m.threads[0].handler else 0)
    if sum(values) != expected:
        return (
            f"lost update: the per-CPU counters {values} sum to {sum(values)}, "
            f"expected {expected}"
        )
    return None


def _three_on_two(program):
    return lambda data: _spread(program)(data, 3)


def _spread(program):
    """``n`` threads running ``program``: one on each CPU, the rest waiting
    to be scheduled (three on two CPUs by default; ``--threads N``)."""
    return lambda data, n: [ThreadSpec(program, i if i < 2 else None) for i in range(n)]


SCENARIOS = (
    Scenario(
        name="counter",
        title="per-CPU counter add with load_add_store",
        doc="Three threads on two CPUs each add 1 twice to counter[cpu] with the rseq "
        "primitive load_add_store, retrying on -1; a signal handler adds 1 too. Property: "
        "the counters sum to the number of adds. Holds: a preemption, migration or "
        "signal between the cpu_id check and the commit aborts the section.",
        expect="holds",
        setup=counter_setup,
        threads=_three_on_two(percpu_add),
        scale=_spread(percpu_add),
        check_final=counter_final,
        handler=counter_signal_handler,
        bounds={"preemptions": 2, "migrations": 0, "signals": 0},
        pair="counter-plain",
    ),
    Scenario(
        name="counter-plain",
        title="per-CPU counter add without rseq (broken)",
        doc="The same counter with a plain load, add, store on the CPU read from "
        "cpu_id_start. A preemption between the load and the store lets another thread on "
        "the same CPU update the counter, and one update is lost.",
        expect="violated",
        setup=counter_setup,
        threads=_three_on_two(percpu_add_plain),
        scale=_spread(percpu_add_plain),
        check_final=counter_final,
        bounds={"preemptions": 2, "migrations": 0, "signals": 0},
        pair="counter",
    ),
)
