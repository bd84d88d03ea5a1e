"""Program automata learned thread by thread, for the Promela export.

A thread's program reacts to the rest of the machine only through the
results of its steps (a load's value, a compare-and-swap's old value, a
system call's return, a ``Choose`` index) and through the kernel's aborts
and signal handlers.  So its automaton (``ProgramTable``) can be grown
without running the interleavings: from every local state, take every
result the step could get.  What a load can return is bounded by what can
be in memory at its address: the value it starts with, the values any
thread stores there, and what the kernel writes (the CPU ids into
``cpu_id_start`` and ``cpu_id``, 0 into ``rseq_cs``).  The stores depend
on the loads in turn (a counter stores the value it loaded plus one), so
the value sets and the automata grow together to a fixpoint.

This over-approximates (a value may be possible at an address but never
when that thread loads it); the extra edges are harmless in the Promela
model, which only takes the ones its search reaches.  A value set is
capped (a counter's values would grow forever), and so is the automaton's
size; what the caps leave out, and anything else missing, the SPIN
completion loop still finds (``spin.check``: a reachable missing edge sets
``incomplete``), so the caps cost rounds, never soundness.
"""

from __future__ import annotations

from ._machine import Machine
from ._program import Cas, Choose, Load, Mark, Store, Syscall

#: results of the system calls the Promela export models (getcpu: the CPU)
SYSCALL_RESULTS = {"getpid": 0, "nop": 0, "write": 0}


def learn_programs(
    m: Machine, signals: bool, max_values: int = 16, max_states: int = 20_000
) -> bool:
    """Grow every thread's automaton over its own results, from the state
    ``m`` is in (a scenario's initial state).  True when the fixpoint was
    reached under the caps (no value set or automaton was cut short)."""
    domain: dict[int, set] = {}
    complete = True

    def values(addr: int) -> set:
        found = domain.get(addr)
        if found is None:
            found = domain[addr] = {m.read(addr)}
        return found

    offsets = m.variant.offsets
    for t in m.threads:
        if t.k["rseq"] is None:
            continue
        area = t.k["rseq"][0]
        for name in ("cpu_id_start", "cpu_id"):
            if name in offsets:
                values(area + offsets[name]).update(range(m.ncpus))
        if "rseq_cs" in offsets:
            values(area + offsets["rseq_cs"]).add(0)
    sections = [(c.start_ip, c.post_commit_ip) for c in m.sections.values()]

    def in_section(ip) -> bool:
        return ip is not None and any(start <= ip < end for start, end in sections)

    def add(addr: int, value) -> bool:
        nonlocal complete
        found = values(addr)
        if value in found:
            return False
        if len(found) >= max_values:
            complete = False
            return False
        found.add(value)
        return True

    def results(step) -> list:
        cls = type(step)
        if cls is Load or cls is Cas:
            return sorted(values(step.addr), key=repr)
        if cls is Store or cls is Mark:
            return [None]
        if cls is Choose:
            return list(range(step.n))
        if cls is Syscall:
            if step.name == "getcpu":
                return list(range(m.ncpus))
            if step.name in SYSCALL_RESULTS:
                return [SYSCALL_RESULTS[step.name]]
        return []

    starts = [(t.table, t.state) for t in m.threads if t.table is not None]
    handler = signals and any(t.handler is not None for t in m.threads)
    changed = True
    while changed:
        changed = False
        for table, start in starts:
            seen = set()
            stack = [start]
            while stack:
                state = stack.pop()
                if state in seen:
                    continue
                seen.add(state)
                step = table.steps[state]
                if step is None:
                    continue
                cls = type(step)
                if cls is Store:
                    changed |= add(step.addr, step.value)
                elif cls is Cas:
                    changed |= add(step.addr, step.new)
                events = [("s", r) for r in results(step)]
                if in_section(step.ip):
                    events.append(("t",))
                if handler and table.handler is not None:
                    events.append(("h",))
                for event in events:
                    if len(table.steps) >= max_states and event not in table.edges[state]:
                        complete = False
                        continue
                    try:
                        stack.append(table.edge(state, event))
                    except Exception:
                        # the program cannot take this result (an
                        # over-approximated value it was not written for)
                        continue
    return complete
