"""The Python explorer's own cost: states/s and bytes per state.

    python benchmarks/model/explorer_cost.py [SCENARIO:PREEMPTIONS:MIGRATIONS ...]

Each case runs in a fresh subprocess; bytes/state is the growth of the
process's peak RSS (ru_maxrss) over the exploration divided by the states
stored (the explorer's visited set and search stack, the model machine and
whatever else the search keeps).  Defaults are the issue-13 bounds:
counter at 2 preemptions and 1 migration, list-pop-rseq at 3 and 1.
A case ``NAME:K:M:full`` turns the partial-order reduction off.  To compare
two versions, run this file with PYTHONPATH pointing at the other one.
"""
from __future__ import annotations

import json
import resource
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


def main(argv: list[str]) -> int:
    if argv and argv[0] == "--one":
        print(json.dumps(one(argv[1])))
        return 0
    for case in argv or DEFAULT:
        cmd = [sys.executable, __file__, "--one", case]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            print(case, "failed:", out.stderr[-500:])
            continue
        d = json.loads(out.stdout)
        print(f"{d['case']:22} {'holds' if d['holds'] else 'VIOLATED':8} {d['states']:>9,} states "
              f"{d['transitions']:>10,} transitions {d['elapsed']:>8.2f} s "
              f"{d['states_per_second']:>9,} states/s {d['bytes_per_state']:>6,} bytes/state "
              f"(peak RSS {d['peak_rss_mb']} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
