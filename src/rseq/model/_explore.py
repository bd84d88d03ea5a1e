"""The interleaving explorer: exhaustive depth-first search bounded by the
number of preemptions, migrations and signals, with state hashing; a random
mode whose one seed replays exactly; and the replay of an explicit schedule
into a trace a kernel or library developer can read.

Every search is also bounded by resources: a number of states, seconds and
bytes of memory (the defaults below keep even ``--preemptions 100`` to about
a minute and a gigabyte).  A search a resource limit stopped, or that could
not explore anything, never claims the property holds: its ``verdict`` is
"partial" or "nothing checked" and its report says so.
"""

from __future__ import annotations

import os
import random
import resource
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from ._machine import Machine

DEFAULT_MAX_DEPTH = 400
DEFAULT_MAX_STATES = 2_000_000
DEFAULT_MAX_SECONDS = 60.0
#: Bytes the process may grow by during one search (resident memory).
DEFAULT_MAX_MEMORY = 1 << 30
#: States between two looks at the clock and the resident size.
_BUDGET_EVERY = 1024

VERDICTS = ("holds", "violated", "partial", "nothing checked")


def _resident_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        # Elsewhere: the peak (KiB on Linux and the BSDs), which only grows.
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _Budget:
    """The resource limits of one search: ``spent(states)`` names the first
    limit reached ("max_states", "max_seconds", "max_memory") or is None."""

    def __init__(self, max_states: int, max_seconds: float | None, max_memory: int | None):
        for name, value in (("max_states", max_states), ("max_seconds", max_seconds),
                            ("max_memory", max_memory)):
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        self.max_states = max_states
        self.deadline = None if max_seconds is None else time.monotonic() + max_seconds
        self.memory_ceiling = None if max_memory is None else _resident_bytes() + max_memory
        self.limits = {"max_states": max_states, "max_seconds": max_seconds,
                       "max_memory": max_memory}
        self._countdown = _BUDGET_EVERY

    def spent(self, states: int) -> str | None:
        if states >= self.max_states:
            return "max_states"
        self._countdown -= 1
        if self._countdown > 0:
            return None
        self._countdown = _BUDGET_EVERY
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return "max_seconds"
        if self.memory_ceiling is not None and _resident_bytes() >= self.memory_ceiling:
            return "max_memory"
        return None


@dataclass
class Result:
    """What one check found.  ``holds`` is whether the property held in every
    execution covered; ``schedule`` (with ``trace``) is the shortest
    violating schedule found, replayable with :func:`replay`."""

    scenario: str
    variant: str
    mode: str  # "exhaustive", "random" or "replay"
    holds: bool
    expected: str  # "holds" or "violated"
    violation: str | None = None
    trace: list[str] = field(default_factory=list)
    schedule: list[str] = field(default_factory=list)
    states: int = 0
    transitions: int = 0
    terminal_states: int = 0
    runs: int = 0
    depth_limited: int = 0
    complete: bool = True  # False when a resource limit stopped the search
    #: The limit that stopped it: "max_states", "max_seconds" or "max_memory".
    stopped_by: str | None = None
    elapsed: float = 0.0
    bounds: dict[str, int] = field(default_factory=dict)
    #: The resource limits in force (states, seconds, bytes; None: none).
    limits: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None
    #: Memory the search used: pan's total for SPIN, peak RSS growth for Python.
    memory_mb: float | None = None
    #: SPIN only: pan's own search time, and the rounds of model completion
    #: (``elapsed`` also counts the export, the automata and compiling pan).
    pan_seconds: float | None = None
    rounds: int | None = None

    @property
    def verdict(self) -> str:
        """"violated" (a trace is attached), "holds" (every execution within
        the bounds was covered), "partial" (none of those covered violates,
        but a resource limit stopped the search, or no execution ran to its
        end) or "nothing checked" (not one move was explored)."""
        if not self.holds:
            return "violated"
        if self.transitions == 0:
            return "nothing checked"
        if not self.complete or (self.terminal_states == 0 and self.mode != "replay"):
            return "partial"
        return "holds"

    @property
    def as_expected(self) -> bool:
        """The search reached the scenario's expected outcome (never true of
        a partial search or one that checked nothing)."""
        if self.verdict in ("partial", "nothing checked"):
            return False
        return (self.expected == "holds") == self.holds

    @property
    def states_per_second(self) -> float:
        return self.states / self.elapsed if self.elapsed > 0 else float("inf")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["verdict"] = self.verdict
        d["as_expected"] = self.as_expected
        d["states_per_second"] = round(self.states_per_second, 1) if self.elapsed > 0 else None
        d["elapsed"] = round(self.elapsed, 4)
        return d

    def _stop_reason(self) -> str:
        value = self.limits.get(self.stopped_by or "")
        if self.stopped_by == "max_seconds":
            return f"the time limit ({value:g} s, --max-seconds)"
        if self.stopped_by == "max_memory":
            return f"the memory limit ({value / 2**20:g} MiB, --max-memory)"
        if self.stopped_by == "max_states":
            return f"the state limit ({value} states, --max-states)"
        return "a limit"

    def report(self) -> str:
        b = ", ".join(f"{k} {v}" for k, v in self.bounds.items())
        lines = [f"scenario {self.scenario} under {self.variant} ({self.mode}; bounds: {b})"]
        if self.seed is not None:
            lines[0] += f" seed {self.seed}"
        verdict = self.verdict
        if verdict == "violated":
            lines.append(f"property VIOLATED: {self.violation}")
        elif verdict == "holds":
            lines.append("property HOLDS in every execution covered")
        elif verdict == "nothing checked":
            what = "0 runs" if self.mode == "random" and not self.runs else "no move"
            lines.append(f"NOTHING CHECKED: {what} explored (max depth "
                         f"{self.limits.get('max_depth')}); no conclusion")
        else:
            why = (f"{self._stop_reason()} stopped the search" if not self.complete
                   else "no execution ran to its end (raise --max-depth)")
            lines.append(f"PARTIAL: no violation in what was covered, but {why}; "
                         "no conclusion")
        if verdict in ("partial", "nothing checked"):
            lines.append(f"outcome unknown (expected: {self.expected})")
        else:
            expect = ("as expected" if self.as_expected
                      else f"NOT as expected (expected: {self.expected})")
            lines.append(f"outcome {expect}")
        cover = (f"covered {self.states} states, {self.transitions} transitions, "
                 f"{self.terminal_states} complete executions")
        if self.runs:
            cover += f", {self.runs} runs"
        if self.pan_seconds is None:
            cover += f" in {self.elapsed:.2f} s ({self.states_per_second:,.0f} states/s)"
        else:
            # the search alone, as the Python engine's figure; the rest apart
            pan = max(self.pan_seconds, 0.01)
            cover += f" in {self.pan_seconds:.2f} s of search ({self.states / pan:,.0f} states/s)"
        if self.memory_mb is not None:
            cover += f", {self.memory_mb:,.1f} MB"
        lines.append(cover)
        if self.pan_seconds is not None:
            lines.append(f"model: export, program automata and compiling pan "
                         f"{max(self.elapsed - self.pan_seconds, 0):.2f} s over {self.rounds} "
                         f"round{'s' if self.rounds != 1 else ''}; {self.elapsed:.2f} s in all"
                         + ("; states stored as 64-bit hashes (HC4)"
                            if self.limits.get("hash_compact") else ""))
        if self.depth_limited:
            lines.append(f"note: {self.depth_limited} executions stopped at the depth bound")
        if not self.complete and verdict == "violated":
            lines.append(f"note: {self._stop_reason()} stopped the search; coverage is partial")
        if not self.holds:
            lines.append("")
            lines.append(f"shortest trace found ({len(self.schedule)} moves):")
            lines.extend("  " + line for line in self.trace)
            lines.append("")
            lines.append("replay with: --schedule '" + ",".join(self.schedule) + "'")
        return "\n".join(lines)


# ------------------------------------------------------------------ moves


def move_name(m: Machine, move: tuple) -> str:
    kind = move[0]
    if kind == "step":
        return f"step T{move[1]}"
    if kind == "choose":
        return f"choose T{move[1]} {move[2]}"
    if kind == "schedule":
        return f"schedule cpu{move[1]} T{move[2]}"
    if kind == "preempt":
        return f"preempt cpu{move[1]}" + (f" T{move[2]}" if move[2] is not None else "")
    if kind == "migrate":
        return f"migrate T{move[1]} cpu{move[2]}"
    if kind == "signal":
        return f"signal T{move[1]}"
    raise ValueError(move)


def parse_move(text: str) -> tuple:
    words = text.split()
    if not words:
        raise ValueError("empty move")

    def tid(w: str) -> int:
        if not w.startswith("T"):
            raise ValueError(f"expected a thread like T1, got {w!r}")
        return int(w[1:])

    def cpu(w: str) -> int:
        if not w.startswith("cpu"):
            raise ValueError(f"expected a CPU like cpu0, got {w!r}")
        return int(w[3:])

    kind = words[0]
    try:
        if kind == "step" and len(words) == 2:
            return ("step", tid(words[1]))
        if kind == "choose" and len(words) == 3:
            return ("choose", tid(words[1]), int(words[2]))
        if kind == "schedule" and len(words) == 3:
            return ("schedule", cpu(words[1]), tid(words[2]))
        if kind == "preempt" and len(words) in (2, 3):
            return ("preempt", cpu(words[1]), tid(words[2]) if len(words) == 3 else None)
        if kind == "migrate" and len(words) == 3:
            return ("migrate", tid(words[1]), cpu(words[2]))
        if kind == "signal" and len(words) == 2:
            return ("signal", tid(words[1]))
    except ValueError as e:
        raise ValueError(f"bad move {text!r}: {e}") from None
    raise ValueError(f"bad move {text!r}")


# ------------------------------------------------------------------ checking


def _check(scenario, m: Machine, info) -> str | None:
    if m.killed is not None:
        return None if scenario.allows_kill else m.killed
    if scenario.check_step is not None:
        msg = scenario.check_step(m, info)
        if msg:
            return msg
    if m.finished and scenario.check_final is not None:
        return scenario.check_final(m)
    return None


def _bounds(scenario, preemptions, migrations, signals, threads=None) -> dict[str, int]:
    b = dict(scenario.bounds)
    if threads is not None:
        b["threads"] = threads  # Scenario.build refuses it where the scenario does not scale
    if preemptions is not None:
        b["preemptions"] = preemptions
    if migrations is not None:
        b["migrations"] = migrations
    if signals is not None:
        b["signals"] = signals
    return b


def _resolve(scenario, variant):
    from .scenarios import SCENARIOS

    if isinstance(scenario, str):
        if scenario not in SCENARIOS:
            raise KeyError(f"unknown scenario {scenario!r}")
        scenario = SCENARIOS[scenario]
    variant = variant or scenario.default_variant
    if variant not in scenario.variants:
        raise ValueError(
            f"scenario {scenario.name} does not run under {variant}; "
            f"it runs under {', '.join(scenario.variants)}"
        )
    return scenario, variant


# ------------------------------------------------------------------ search


def explore(
    scenario,
    variant: str | None = None,
    *,
    preemptions: int | None = None,
    migrations: int | None = None,
    signals: int | None = None,
    seed: int | None = None,
    runs: int = 2000,
    max_depth: int = DEFAULT_MAX_DEPTH,
    max_states: int = DEFAULT_MAX_STATES,
    max_seconds: float | None = DEFAULT_MAX_SECONDS,
    max_memory: int | None = DEFAULT_MAX_MEMORY,
    stop_at_first: bool = False,
    reduce: bool = True,
    threads: int | None = None,
) -> Result:
    """Check ``scenario`` under ``variant``.  Exhaustive depth-first search
    within the bounds; with ``seed``, ``runs`` random executions instead
    (see :func:`random_walk`).  ``reduce=False`` turns the partial-order
    reduction off (for cross-checking it).  ``threads`` sets the thread
    count of a scenario that scales (the counters).

    ``max_states``, ``max_seconds`` and ``max_memory`` (bytes of growth;
    None: no limit) stop a search that would not end in reasonable time or
    memory: the result is then ``complete=False``, verdict "partial"."""
    if seed is not None:
        return random_walk(
            scenario, variant, seed=seed, runs=runs, preemptions=preemptions,
            migrations=migrations, signals=signals, max_depth=max_depth,
            max_states=max_states, max_seconds=max_seconds, max_memory=max_memory,
            threads=threads,
        )
    if max_depth < 0:
        raise ValueError(f"max_depth must be >= 0, got {max_depth}")
    scenario, variant = _resolve(scenario, variant)
    budget = _Budget(max_states, max_seconds, max_memory)
    bounds = _bounds(scenario, preemptions, migrations, signals, threads)
    limits = (bounds["preemptions"], bounds["migrations"], bounds["signals"])
    use_signals = bounds["signals"] > 0
    started = time.perf_counter()

    m = scenario.build(variant, threads)
    m.reduce = reduce
    root_key = m.key()
    # visited states: key -> (parent key, move); keys are compact bytes and
    # moves are interned, so a state costs its key and one small tuple.  A
    # key is also the state's snapshot: the stack holds the same bytes.
    parent: dict[Any, tuple] = {root_key: None}
    interned: dict[tuple, tuple] = {}
    stack = [(root_key, 0)]
    transitions = terminal = depth_limited = 0
    best: tuple[list[tuple], str] | None = None
    stopped_by: str | None = None
    stop = False

    def path_to(key) -> list[tuple]:
        path = []
        while parent[key] is not None:
            key, move = parent[key]
            path.append(move)
        path.reverse()
        return path

    def expand(key, depth, moves) -> int:
        """Run every move from state ``key``; returns how many new states."""
        nonlocal transitions, best, stopped_by, stop
        added = 0
        first = True
        for move in moves:
            if not first:
                m.restore(key)
            first = False
            info = m.apply(move)
            transitions += 1
            msg = _check(scenario, m, info)
            if msg is not None:
                path = path_to(key) + [move]
                if best is None or len(path) < len(best[0]):
                    best = (path, msg)
                if stop_at_first:
                    stop = True
                    break
                continue
            child = m.key()
            if child in parent:
                continue
            parent[child] = (key, interned.setdefault(move, move))
            added += 1
            stopped_by = budget.spent(len(parent))
            if stopped_by is not None:
                stop = True
                break
            stack.append((child, depth + 1))
        return added

    while stack and not stop:
        key, depth = stack.pop()
        m.restore(key)
        moves = m.choices(limits, use_signals)
        if not moves:
            terminal += 1
            continue
        if depth >= max_depth:
            depth_limited += 1
            continue
        if best is not None and depth + 1 >= len(best[0]):
            continue  # cannot lead to a shorter trace
        reduced = m.reduced
        if expand(key, depth, moves) == 0 and reduced and not stop:
            # the cycle proviso: a reduced set that only closes onto
            # states already seen may postpone the other threads forever;
            # expand the state fully instead
            m.restore(key)
            m.reduce = False
            full = m.choices(limits, use_signals)
            m.reduce = reduce
            m.restore(key)
            expand(key, depth, [mv for mv in full if mv not in moves])
    stack.clear()

    if m.reduction_unsound and reduce:
        # a step the reduction does not cover (membarrier) ran: search again without it
        return explore(
            scenario, variant, preemptions=preemptions, migrations=migrations, signals=signals,
            max_depth=max_depth, max_states=max_states, max_seconds=max_seconds,
            max_memory=max_memory, stop_at_first=stop_at_first, reduce=False, threads=threads,
        )
    complete = stopped_by is None
    if best is not None and complete and len(parent) <= SHORTEST_SEARCH_STATES:
        shorter = _shortest(scenario, variant, limits, use_signals, len(best[0]) - 1, threads)
        if shorter is not None:
            best = shorter
    elapsed = time.perf_counter() - started
    result = Result(
        scenario=scenario.name,
        variant=variant,
        mode="exhaustive",
        holds=best is None,
        expected=scenario.expected(variant),
        states=len(parent),
        transitions=transitions,
        terminal_states=terminal,
        depth_limited=depth_limited,
        complete=complete,
        stopped_by=stopped_by,
        elapsed=elapsed,
        bounds=bounds,
        limits=dict(budget.limits, max_depth=max_depth),
    )
    if best is not None:
        _attach_trace(result, scenario, variant, best[0], bounds)
    return result


SHORTEST_SEARCH_STATES = 300_000


def _shortest(scenario, variant, limits, use_signals, max_moves, threads=None):
    """Breadth-first search for a violation in at most ``max_moves`` moves:
    the first one found is a shortest one (within the reduced graph)."""
    m = scenario.build(variant, threads)
    frontier = [(m.snapshot(), ())]
    seen = {m.key()}
    for _ in range(max_moves):
        next_frontier = []
        for snap, path in frontier:
            m.restore(snap)
            moves = m.choices(limits, use_signals)
            for i, move in enumerate(moves):
                if i:
                    m.restore(snap)
                info = m.apply(move)
                msg = _check(scenario, m, info)
                if msg is not None:
                    return list(path) + [move], msg
                key = m.key()
                if key not in seen:
                    seen.add(key)
                    next_frontier.append((m.snapshot(), path + (move,)))
        frontier = next_frontier
        if not frontier:
            break
    return None


def random_walk(
    scenario,
    variant: str | None = None,
    *,
    seed: int = 0,
    runs: int = 2000,
    preemptions: int | None = None,
    migrations: int | None = None,
    signals: int | None = None,
    max_depth: int = DEFAULT_MAX_DEPTH,
    max_states: int = DEFAULT_MAX_STATES,
    max_seconds: float | None = DEFAULT_MAX_SECONDS,
    max_memory: int | None = DEFAULT_MAX_MEMORY,
    threads: int | None = None,
) -> Result:
    """``runs`` random executions, every choice drawn from one
    ``random.Random(seed)``: the same seed replays the same executions.
    Stops at the first violation, or when ``max_states`` distinct states
    were seen, or at the time or memory limit (then ``complete=False``)."""
    if runs < 0 or max_depth < 0:
        raise ValueError(f"runs and max_depth must be >= 0, got {runs}, {max_depth}")
    scenario, variant = _resolve(scenario, variant)
    budget = _Budget(max_states, max_seconds, max_memory)
    bounds = _bounds(scenario, preemptions, migrations, signals, threads)
    limits = (bounds["preemptions"], bounds["migrations"], bounds["signals"])
    use_signals = bounds["signals"] > 0
    rng = random.Random(seed)
    started = time.perf_counter()
    seen: set = set()
    transitions = terminal = depth_limited = 0
    failing: tuple[list[tuple], str] | None = None
    stopped_by: str | None = None
    done = 0
    m = scenario.build(variant, threads)
    root = m.snapshot()
    for _ in range(runs):
        if stopped_by is not None:
            break
        done += 1
        m.restore(root)
        path: list[tuple] = []
        while True:
            moves = m.choices(limits, use_signals)
            if not moves:
                terminal += 1
                break
            if len(path) >= max_depth:
                depth_limited += 1
                break
            move = moves[rng.randrange(len(moves))]
            path.append(move)
            info = m.apply(move)
            transitions += 1
            msg = _check(scenario, m, info)
            seen.add(m.key())
            if msg is not None:
                failing = (path, msg)
                break
            stopped_by = budget.spent(len(seen))
            if stopped_by is not None:
                break
        if failing is not None:
            break
    elapsed = time.perf_counter() - started
    result = Result(
        scenario=scenario.name,
        variant=variant,
        mode="random",
        holds=failing is None,
        expected=scenario.expected(variant),
        states=len(seen),
        transitions=transitions,
        terminal_states=terminal,
        runs=done,
        depth_limited=depth_limited,
        complete=stopped_by is None,
        stopped_by=stopped_by,
        elapsed=elapsed,
        bounds=bounds,
        limits=dict(budget.limits, max_depth=max_depth, runs=runs),
        seed=seed,
    )
    if failing is not None:
        _attach_trace(result, scenario, variant, failing[0], bounds)
    return result


def _run_schedule(scenario, variant: str, moves: list[tuple], bounds: dict[str, int]):
    m = scenario.build(variant, bounds.get("threads"))
    m.reduce = False  # any schedule of the full machine may be replayed
    m.log = []
    lines: list[str] = []
    limits = (bounds["preemptions"], bounds["migrations"], bounds["signals"])
    msg = None
    for i, move in enumerate(moves):
        if move not in m.choices(limits, bounds["signals"] > 0):
            raise ValueError(f"move {i + 1} '{move_name(m, move)}' is not possible here")
        m.log = []
        info = m.apply(move)
        lines.extend(m.log)
        msg = _check(scenario, m, info)
        if msg is not None:
            lines.append(f"VIOLATION: {msg}")
            break
    return m, lines, msg


def _attach_trace(result: Result, scenario, variant, moves, bounds) -> None:
    m, lines, msg = _run_schedule(scenario, variant, moves, bounds)
    result.trace = lines
    result.schedule = [move_name(m, mv) for mv in moves]
    if msg is not None:
        result.violation = msg


def replay(
    scenario,
    schedule: list[str] | str,
    variant: str | None = None,
    *,
    preemptions: int | None = None,
    migrations: int | None = None,
    signals: int | None = None,
    threads: int | None = None,
) -> Result:
    """Run one explicit schedule (move names as printed in a trace) and
    return its trace; ``holds`` is False if the schedule violates."""
    scenario, variant = _resolve(scenario, variant)
    if isinstance(schedule, str):
        schedule = [s for s in (p.strip() for p in schedule.split(",")) if s]
    moves = [parse_move(s) for s in schedule]
    bounds = _bounds(scenario, preemptions, migrations, signals, threads)
    # an explicit schedule may use more than the default bounds
    bounds = {
        "preemptions": max(bounds["preemptions"], sum(mv[0] == "preempt" for mv in moves)),
        "migrations": max(bounds["migrations"], sum(mv[0] == "migrate" for mv in moves)),
        "signals": max(bounds["signals"], sum(mv[0] == "signal" for mv in moves)),
        **({"threads": threads} if threads is not None else {}),
    }
    started = time.perf_counter()
    m, lines, msg = _run_schedule(scenario, variant, moves, bounds)
    return Result(
        scenario=scenario.name,
        variant=variant,
        mode="replay",
        holds=msg is None,
        expected=scenario.expected(variant),
        violation=msg,
        trace=lines,
        schedule=[move_name(m, mv) for mv in moves],
        states=len(moves) + 1,
        transitions=len(moves),
        elapsed=time.perf_counter() - started,
        bounds=bounds,
    )
