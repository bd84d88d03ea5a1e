"""Per-CPU list pop: an rseq critical section against a compare-and-swap that
suffers ABA."""

from __future__ import annotations

from .._machine import Machine
from .._program import (
    Cas,
    Context,
    Load,
    Store,
    current_cpu,
    load_cbeq_store_add_load_store,
    load_cbne_store,
)
from ._base import Scenario, ThreadSpec

NEXT = 0  # offset of the next pointer in a node


def _list_setup(m: Machine) -> dict:
    heads = m.alloc("head", 8 * m.ncpus, align=64)
    for cpu in range(m.ncpus):
        m.name(heads + 8 * cpu, f"head[cpu{cpu}]")
    nodes = []
    for name in "ABC":
        node = m.alloc(f"node{name}", 16)
        m.name(node + NEXT, f"node{name}.next")
        nodes.append(node)
    # list on cpu0: A -> B -> C
    m.memory[heads] = nodes[0]
    m.memory[nodes[0] + NEXT] = nodes[1]
    m.memory[nodes[1] + NEXT] = nodes[2]
    m.memory[nodes[2] + NEXT] = 0
    data = {"heads": heads, "nodes": tuple(nodes)}
    for tid in (1, 2):
        for slot in range(2):
            addr = m.alloc(f"T{tid}.owned{slot}", 8)
            data[f"owned{tid}_{slot}"] = addr
        data[f"scratch{tid}"] = m.alloc(f"T{tid}.popped", 8)
    return data


def rseq_pop(ctx: Context):
    """Pop from this CPU's list with load_cbeq_store_add_load_store."""
    heads = ctx.get("heads")
    scratch = ctx.get(f"scratch{ctx.tid}")
    while True:
        cpu = yield from current_cpu(ctx)
        ret = yield from load_cbeq_store_add_load_store(
            ctx, heads + 8 * cpu, 0, NEXT, scratch, cpu
        )
        if ret == 0:
            node = yield Load(scratch, size=8)
            return node
        if ret == 1:
            return 0


def rseq_push(ctx: Context, node: int):
    """Push onto this CPU's list: link, then load_cbne_store the head."""
    heads = ctx.get("heads")
    while True:
        cpu = yield from current_cpu(ctx)
        head = yield Load(heads + 8 * cpu, size=8)
        yield Store(node + NEXT, head, size=8)
        ret = yield from load_cbne_store(ctx, heads + 8 * cpu, head, node, cpu)
        if ret == 0:
            return


def cas_pop(ctx: Context):
    """Treiber-stack pop with compare-and-swap on this CPU's head."""
    heads = ctx.get("heads")
    while True:
        cpu = yield from current_cpu(ctx)
        head = yield Load(heads + 8 * cpu, size=8)
        if head == 0:
            return 0
        nxt = yield Load(head + NEXT, size=8)
        old = yield Cas(heads + 8 * cpu, head, nxt)
        if old == head:
            return head


def cas_push(ctx: Context, node: int):
    heads = ctx.get("heads")
    while True:
        cpu = yield from current_cpu(ctx)
        head = yield Load(heads + 8 * cpu, size=8)
        yield Store(node + NEXT, head, size=8)
        old = yield Cas(heads + 8 * cpu, head, node)
        if old == head:
            return


def _popper(pop):
    def program(ctx: Context):
        node = yield from pop(ctx)
        yield Store(ctx.get(f"owned{ctx.tid}_0"), node, size=8)

    program.__name__ = f"pop_one_{pop.__name__}"
    return program


def _aba_maker(pop, push):
    def program(ctx: Context):
        # pop A, pop B, give A back: head is A again, but A.next is now C
        first = yield from pop(ctx)
        yield Store(ctx.get(f"owned{ctx.tid}_0"), first, size=8)
        second = yield from pop(ctx)
        yield Store(ctx.get(f"owned{ctx.tid}_1"), second, size=8)
        if first:
            yield Store(ctx.get(f"owned{ctx.tid}_0"), 0, size=8)
            yield from push(ctx, first)

    program.__name__ = f"aba_{pop.__name__}"
    return program


def _list_final(m: Machine) -> str | None:
    ctx = m.threads[0].ctx
    nodes = ctx.get("nodes")
    names = {n: m.region_of(n).name for n in nodes}
    seen: dict[int, list[str]] = {n: [] for n in nodes}
    for cpu in range(m.ncpus):
        node = m.read(ctx.get("heads") + 8 * cpu)
        hops = 0
        while node and hops <= len(nodes):
            if node not in seen:
                return f"head[cpu{cpu}] list reaches {node:#x}, which is not a node"
            seen[node].append(f"list[cpu{cpu}]")
            node = m.read(node + NEXT)
            hops += 1
        if node:
            return f"the list of cpu{cpu} has a cycle"
    for tid in (1, 2):
        for slot in range(2):
            node = m.read(ctx.get(f"owned{tid}_{slot}"))
            if node:
                seen[node].append(f"T{tid}")
    for node, holders in seen.items():
        if len(holders) != 1:
            where = " and ".join(holders) if holders else "nowhere"
            return f"{names[node]} is held by {where}: the list is corrupt (ABA)"
    return None


def _list_threads(pop, push):
    return lambda data: [ThreadSpec(_popper(pop), 0), ThreadSpec(_aba_maker(pop, push), None)]


SCENARIOS = (
    Scenario(
        name="list-pop-rseq",
        title="per-CPU list pop with load_cbeq_store_add_load_store",
        doc="cpu0's list is A -> B -> C. T1 pops one node; T2 pops two and pushes the first "
        "back. Property: at the end every node is in exactly one list or held by exactly "
        "one thread. Holds: the head, the next pointer and the commit are one critical "
        "section, so T2 cannot run on that CPU in between without aborting T1.",
        expect="holds",
        setup=_list_setup,
        threads=_list_threads(rseq_pop, rseq_push),
        check_final=_list_final,
        pair="list-pop-cas",
    ),
    Scenario(
        name="list-pop-cas",
        title="per-CPU list pop with a plain compare-and-swap (broken: ABA)",
        doc="The same lists popped with load head, load head->next, CAS(head, head, next). "
        "If T1 is preempted after reading head A and next B, and T2 pops A, pops B and "
        "pushes A back, T1's CAS still succeeds and installs B, which T2 holds.",
        expect="violated",
        setup=_list_setup,
        threads=_list_threads(cas_pop, cas_push),
        check_final=_list_final,
        pair="list-pop-rseq",
    ),
)
