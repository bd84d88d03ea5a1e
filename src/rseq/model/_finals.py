"""Reachable final states, projected on the shared data: the cross-check of
the explorer's reduction (reduced against unreduced) and of the two engines
(Python against SPIN).

A final state is one where no move is left (every thread finished, or the
process killed).  Its projection keeps what the threads share: memory
outside the threads' own regions (``T<n>.`` areas and variables, which hold
kernel bookkeeping such as a lazily cleared ``rseq_cs``) and whether the
process was killed.  Two searches that agree on these sets agree on every
``check_final`` property.
"""

from __future__ import annotations

import re

_PRIVATE = re.compile(r"T\d+\.")


def shared_addresses(m) -> list[int]:
    """Addresses of the memory the threads share (sorted)."""
    private = [(r.start, r.end) for r in m.regions if _PRIVATE.match(r.name)]
    return sorted(a for a in m.memory if not any(s <= a < e for s, e in private))


def projection(m, addresses=None) -> tuple:
    """The final state as ``(killed, ((addr, value), ...))``."""
    addresses = shared_addresses(m) if addresses is None else addresses
    return (m.killed is not None, tuple((a, m.read(a)) for a in addresses if m.read(a) != 0))


def final_states(
    scenario,
    variant: str | None = None,
    *,
    preemptions: int | None = None,
    migrations: int | None = None,
    signals: int | None = None,
    reduce: bool = True,
    max_states: int = 2_000_000,
    threads: int | None = None,
) -> frozenset:
    """Every reachable final state's projection, by exhaustive search (with
    the explorer's reduction when ``reduce``)."""
    from ._explore import _bounds, _resolve

    scenario, variant = _resolve(scenario, variant)
    bounds = _bounds(scenario, preemptions, migrations, signals, threads)
    limits = (bounds["preemptions"], bounds["migrations"], bounds["signals"])
    use_signals = limits[2] > 0
    m = scenario.build(variant, threads)
    m.reduce = reduce
    seen = {m.key()}
    stack = [m.snapshot()]
    finals: set = set()
    while stack:
        snap = stack.pop()
        m.restore(snap)
        moves = m.choices(limits, use_signals)
        if not moves:
            finals.add(projection(m))
            continue
        reduced = m.reduced
        rounds = [moves]
        while rounds:
            batch = rounds.pop()
            added = 0
            for move in batch:
                m.restore(snap)
                m.apply(move)
                key = m.key()
                if key in seen:
                    continue
                seen.add(key)
                added += 1
                if len(seen) > max_states:
                    raise RuntimeError(f"{scenario.name}: more than {max_states} states")
                stack.append(m.snapshot())
            if reduced and not added:
                reduced = False  # the cycle proviso, as in explore()
                m.restore(snap)
                m.reduce = False
                full = m.choices(limits, use_signals)
                m.reduce = reduce
                rounds.append([mv for mv in full if mv not in batch])
    if m.reduction_unsound and reduce:
        return final_states(scenario, variant, preemptions=preemptions, migrations=migrations,
                            signals=signals, reduce=False, max_states=max_states,
                            threads=threads)
    return frozenset(finals)
