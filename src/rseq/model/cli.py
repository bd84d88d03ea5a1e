"""``python -m rseq model``: list, check and conformance.

Exit status: 0 when the property holds (or the command succeeded), 1 when
it is violated (a trace is printed) or the model and the kernel disagree,
2 on bad usage (one line on stderr).
"""

from __future__ import annotations

import argparse
import json
import sys


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump, exit 2
        raise _UsageError(message)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m rseq model", description="The executable rseq ABI model.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    ls = sub.add_parser("list", help="variants and scenarios")
    ls.add_argument("--json", action="store_true")
    ck = sub.add_parser("check", help="explore a scenario's interleavings")
    ck.add_argument("scenario")
    ck.add_argument("--variant", "-V")
    ck.add_argument("--preemptions", "-k", type=int)
    ck.add_argument("--migrations", type=int)
    ck.add_argument("--signals", type=int)
    ck.add_argument("--seed", type=int, help="random mode: RUNS random executions from this seed")
    ck.add_argument("--runs", type=int, default=2000)
    ck.add_argument("--max-depth", type=int, default=400)
    ck.add_argument("--max-states", type=int, default=2_000_000)
    ck.add_argument("--schedule", help="replay one schedule: moves separated by commas")
    ck.add_argument("--json", action="store_true")
    cf = sub.add_parser("conformance", help="registration cases: this kernel against the linux-6.3 model")
    cf.add_argument("--json", action="store_true")
    cf.add_argument("--case", action="append", help="run only this case (repeatable)")
    return p


def _list(args) -> int:
    from . import SCENARIOS, VARIANTS

    if args.json:
        print(json.dumps({
            "variants": [v.describe() for v in VARIANTS.values()],
            "scenarios": [s.describe() for s in SCENARIOS.values()],
        }, indent=2))
        return 0
    print("variants:")
    for v in VARIANTS.values():
        print(f"  {v.name:18} {v.title}")
        print(f"  {'':18} source: {v.source}")
    print("\nscenarios (expected outcome under the default variant):")
    for s in SCENARIOS.values():
        expect = s.expect
        if s.expect_by_variant:
            expect += " (" + ", ".join(f"{k}: {v}" for k, v in s.expect_by_variant.items()) + ")"
        print(f"  {s.name:26} {expect:8} [{s.default_variant}] {s.title}")
    return 0


def _check(args) -> int:
    from . import SCENARIOS, VARIANTS, explore, replay

    if args.scenario not in SCENARIOS:
        raise _UsageError(f"unknown scenario {args.scenario!r} (see: python -m rseq model list)")
    scenario = SCENARIOS[args.scenario]
    if args.variant is not None:
        if args.variant not in VARIANTS:
            raise _UsageError(f"unknown variant {args.variant!r}; known: {', '.join(VARIANTS)}")
        if args.variant not in scenario.variants:
            raise _UsageError(
                f"scenario {scenario.name} runs under {', '.join(scenario.variants)}, not {args.variant}"
            )
    for name in ("preemptions", "migrations", "signals", "runs", "max_depth", "max_states"):
        value = getattr(args, name)
        if value is not None and value < 0:
            raise _UsageError(f"--{name.replace('_', '-')} must be >= 0")
    bounds = dict(preemptions=args.preemptions, migrations=args.migrations, signals=args.signals)
    if args.schedule is not None:
        try:
            result = replay(scenario, args.schedule, args.variant, **bounds)
        except ValueError as e:
            raise _UsageError(str(e)) from None
    else:
        result = explore(
            scenario, args.variant, seed=args.seed, runs=args.runs,
            max_depth=args.max_depth, max_states=args.max_states, **bounds,
        )
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(result.report() if result.mode != "replay" else _replay_report(result))
    return 0 if result.holds else 1


def _replay_report(result) -> str:
    lines = [f"replay of {len(result.schedule)} moves of {result.scenario} under {result.variant}:"]
    lines += ["  " + line for line in result.trace]
    lines.append("property " + ("holds on this schedule" if result.holds else f"VIOLATED: {result.violation}"))
    return "\n".join(lines)


def _conformance(args) -> int:
    from .conformance import CASES, conformance

    if args.case:
        unknown = [c for c in args.case if c not in {case.name for case in CASES}]
        if unknown:
            raise _UsageError(f"unknown case {unknown[0]!r}")
    report = conformance(only=args.case)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report.format())
    return 0 if report.agree else 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = _parser().parse_args(argv)
        return {"list": _list, "check": _check, "conformance": _conformance}[args.command](args)
    except _UsageError as e:
        print(f"python -m rseq model: error: {e}", file=sys.stderr)
        return 2
