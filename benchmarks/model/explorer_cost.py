"""The Python explorer's own cost: states/s and bytes per state.

    python benchmarks/model/explorer_cost.py [SCENARIO:PREEMPTIONS:MIGRATIONS ...]

Each case runs in a fresh subprocess; bytes/state is the growth of the
process's peak RSS (ru_maxrss) over the exploration divided by the states
stored (the explorer's visited set and search stack, the model machine and
whatever else the search keeps).  Defaults are the issue-13 bounds:
counter at 2 preemptions and 1 migration, list-pop-rseq at 3 and 1.
A case ``NAME:K:M:full`` turns the partial-order reduction off.

    python benchmarks/model/explorer_cost.py --compare BEFORE_PYTHON AFTER_PYTHON
        [--repeat N] [CASE ...]

runs two versions (a venv each) on every case, alternating, N times each
(default 3), and prints the medians side by side with the ratios.
"""
from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys

DEFAULT = ["list-pop-rseq:3:1", "counter:2:1"]


def one(case: str) -> dict:
    from rseq.model import explore

    name, k, m, *rest = case.split(":")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    r = explore(name, preemptions=int(k), migrations=int(m), max_states=50_000_000,
                reduce="full" not in rest)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "case": case, "holds": r.holds, "states": r.states, "transitions": r.transitions,
        "elapsed": round(r.elapsed, 2), "states_per_second": round(r.states / r.elapsed),
        "peak_rss_mb": round(peak / 2**20, 1),
        "bytes_per_state": round((peak - before) / max(r.states, 1)),
    }


def _run(python: str, case: str) -> dict | None:
    out = subprocess.run([python, __file__, "--one", case], capture_output=True, text=True)
    if out.returncode:
        print(case, "failed:", out.stderr[-500:])
        return None
    return json.loads(out.stdout)


def compare(before: str, after: str, cases: list[str], repeat: int) -> None:
    """Both versions on each case, alternating, ``repeat`` times each; the
    medians side by side.  ``before`` and ``after`` are Python interpreters
    (a venv each) with the two versions installed."""
    print(f"{'case':22} {'states':>19} {'states/s (median)':>26} {'bytes/state (median)':>24}")
    print(f"{'':22} {'before':>9} {'after':>9} {'before':>9} {'after':>9} {'x':>6} "
          f"{'before':>8} {'after':>7} {'x':>6}")
    for case in cases:
        runs: dict[str, list[dict]] = {"before": [], "after": []}
        for _ in range(repeat):
            for label, python in (("before", before), ("after", after)):
                d = _run(python, case)
                if d is not None:
                    runs[label].append(d)
        if not runs["before"] or not runs["after"]:
            continue
        b, a = runs["before"], runs["after"]
        rate_b = statistics.median(d["states_per_second"] for d in b)
        rate_a = statistics.median(d["states_per_second"] for d in a)
        mem_b = statistics.median(d["bytes_per_state"] for d in b)
        mem_a = statistics.median(d["bytes_per_state"] for d in a)
        print(f"{case:22} {b[0]['states']:>9,} {a[0]['states']:>9,} {rate_b:>9,.0f} "
              f"{rate_a:>9,.0f} {rate_a / rate_b:>5.1f}x {mem_b:>8,.0f} {mem_a:>7,.0f} "
              f"{mem_b / max(mem_a, 1):>5.1f}x", flush=True)


def main(argv: list[str]) -> int:
    if argv and argv[0] == "--one":
        print(json.dumps(one(argv[1])))
        return 0
    if argv and argv[0] == "--compare":
        before, after, repeat = argv[1], argv[2], 3
        rest = argv[3:]
        if rest and rest[0] == "--repeat":
            repeat, rest = int(rest[1]), rest[2:]
        compare(before, after, rest or DEFAULT, repeat)
        return 0
    for case in argv or DEFAULT:
        d = _run(sys.executable, case)
        if d is None:
            continue
        print(f"{d['case']:22} {'holds' if d['holds'] else 'VIOLATED':8} {d['states']:>9,} states "
              f"{d['transitions']:>10,} transitions {d['elapsed']:>8.2f} s "
              f"{d['states_per_second']:>9,} states/s {d['bytes_per_state']:>6,} bytes/state "
              f"(peak RSS {d['peak_rss_mb']} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
