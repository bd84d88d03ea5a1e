"""Both engines on every exported scenario and variant: verdicts, final
states, states, time and SPIN's completion rounds side by side.

    python benchmarks/model/engines.py [--preemptions K] [--migrations M] [SCENARIO ...]

Without names: every scenario, under every variant it runs under that the
Promela export covers (the others are listed with the reason).  The bounds
default to each scenario's own.  Exit status 1 if the engines disagree on a
verdict or a final-state set, or a verdict is not the scenario's expected
one.  The default test run covers the default variants at the default bounds
(tests/model/test_model_spin.py); this is the long sweep.
"""
from __future__ import annotations

import argparse
import sys
import time


def main(argv: list[str]) -> int:
    from rseq.model import SCENARIOS, explore, spin
    from rseq.model._finals import final_states

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preemptions", type=int)
    ap.add_argument("--migrations", type=int)
    ap.add_argument("names", nargs="*")
    args = ap.parse_args(argv)
    bounds = {"preemptions": args.preemptions, "migrations": args.migrations}
    bad = 0
    for name in args.names or list(SCENARIOS):
        scenario = SCENARIOS[name]
        for variant in scenario.variants:
            why = spin.supported(scenario, variant)
            if why:
                print(f"{name:26} {variant:16} not exported: {why}", flush=True)
                continue
            started = time.perf_counter()
            try:
                by_spin = spin.check(name, variant, **bounds)
            except spin.Unsupported as e:
                print(f"{name:26} {variant:16} not exported: {e}", flush=True)
                continue
            spin_s = time.perf_counter() - started
            by_python = explore(name, variant, **bounds)
            same_finals = final_states(name, variant, **bounds) == by_spin.finals
            agree = (by_spin.verdict == by_python.verdict == scenario.expected(variant)
                     and same_finals)
            bad += not agree
            print(f"{name:26} {variant:16} {'ok ' if agree else 'BAD'} "
                  f"spin {by_spin.verdict} ({by_spin.states} states, {by_spin.rounds} rounds, "
                  f"{spin_s:.1f} s) python {by_python.verdict} ({by_python.states} states, "
                  f"{by_python.elapsed:.1f} s) expected {scenario.expected(variant)} "
                  f"finals {'equal' if same_finals else 'DIFFER'}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
