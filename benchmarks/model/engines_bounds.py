"""The two engines side by side: the Python explorer and SPIN on the counter
and list scenarios at growing bounds.

    python benchmarks/model/engines_bounds.py [--quick] [--python-seconds S] [CASE ...]

A CASE is ``SCENARIO:PREEMPTIONS:MIGRATIONS[:THREADS]``.  Each line prints,
per engine, the verdict, states, states/s, bytes/state and time.  The Python
engine runs in a fresh subprocess (bytes/state: peak RSS growth over the
states stored) with a time limit (``--python-seconds``, default 300): past
it the line says PARTIAL, and larger bounds of the same scenario are left
to SPIN.  SPIN's states/s is over pan's own search time; its time column is
the whole run (export, program automata, compiling pan, the search), and
bytes/state is pan's memory over its states (states stored as 64-bit hashes
for the counter at 4 threads and 3 preemptions; 12 GB of memory).  Needs ``spin`` and a C
compiler (``apt-get install spin gcc``).  Not part of the test run: the
full sweep takes the better part of an hour.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time

SWEEP = [
    "counter:1:0", "counter:2:0", "counter:2:1", "counter:3:1",
    "counter:2:1:4", "counter:3:1:4",
    "counter-plain:2:0", "counter-plain:3:1", "counter-plain:3:1:4",
    "list-pop-rseq:2:1", "list-pop-rseq:3:1", "list-pop-rseq:4:2", "list-pop-rseq:8:4",
    "list-pop-cas:2:1", "list-pop-cas:4:2",
]
QUICK = ["counter:2:0", "counter-plain:2:0", "list-pop-rseq:2:1", "list-pop-cas:2:1",
         "counter:2:0:4"]


def _parse(case: str) -> tuple[str, int, int, int | None]:
    name, k, m, *rest = case.split(":")
    return name, int(k), int(m), (int(rest[0]) if rest else None)


def python_one(case: str, seconds: float) -> dict:
    import resource

    from rseq.model import explore

    name, k, m, threads = _parse(case)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    r = explore(name, preemptions=k, migrations=m, threads=threads, max_states=50_000_000,
                max_seconds=seconds, max_memory=None)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"verdict": r.verdict, "states": r.states, "seconds": r.elapsed,
            "rate": r.states / max(r.elapsed, 1e-9),
            "bytes": (peak - before) / max(r.states, 1)}


def spin_one(case: str) -> dict:
    from rseq.model import spin

    name, k, m, threads = _parse(case)
    started = time.perf_counter()
    # the largest counters store states as hashes: with collapse compression
    # the counter at 4 threads, 3 preemptions, 1 migration outgrows 8 GB
    big = (threads or 3) >= 4 and k >= 3
    r = spin.check(name, preemptions=k, migrations=m, threads=threads, memory_mb=12288,
                   hash_compact=big)
    return {"verdict": r.verdict, "states": r.states, "seconds": time.perf_counter() - started,
            "rate": r.states / max(r.pan_seconds or 0.0, 0.01),
            "bytes": (r.memory_mb or 0) * 2**20 / max(r.states, 1), "rounds": r.rounds}


def _cell(d: dict | None, why: str = "") -> str:
    if d is None:
        return f"{why:>58}"
    return (f"{d['verdict']:>8} {d['states']:>11,} {d['rate']:>10,.0f}/s "
            f"{d['bytes']:>6,.0f} B {d['seconds']:>8.1f} s")


def main(argv: list[str]) -> int:
    if argv and argv[0] == "--one":
        print(json.dumps(python_one(argv[1], float(argv[2]))))
        return 0
    seconds = 300.0
    cases: list[str] = []
    args = list(argv)
    while args:
        a = args.pop(0)
        if a == "--quick":
            cases += QUICK
        elif a == "--python-seconds":
            seconds = float(args.pop(0))
        else:
            cases.append(a)
    cases = cases or SWEEP
    head = "verdict, states, rate, bytes/state, time"
    print(f"{'case (scenario:K:M[:threads])':30} {'python: ' + head:>58} | {'spin: ' + head:>58}")
    gave_up: set[str] = set()
    for case in cases:
        name = case.split(":")[0]
        if name in gave_up:
            py, why = None, "python: left to SPIN"
        else:
            out = subprocess.run([sys.executable, __file__, "--one", case, str(seconds)],
                                 capture_output=True, text=True)
            if out.returncode:
                py, why = None, "python failed: " + out.stderr.strip()[-30:]
            else:
                py, why = json.loads(out.stdout), ""
                if py["verdict"] == "partial":
                    gave_up.add(name)
        try:
            sp, swhy = spin_one(case), ""
        except Exception as e:
            sp, swhy = None, f"spin: {type(e).__name__}: {e}"[:58]
        print(f"{case:30} {_cell(py, why)} | {_cell(sp, swhy)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
