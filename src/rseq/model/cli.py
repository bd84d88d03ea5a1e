"""``python -m rseq model``: list, check and conformance.

The ``model`` subcommand of the one ``python -m rseq`` argparse tree (see
rseq._cli for how a subcommand plugs in); ``python -m rseq.model ARGS`` is
the same as ``python -m rseq model ARGS``.

Exit status: 0 when the property holds (or the command succeeded), 1 when
it is violated (a trace is printed) or the model and the kernel disagree,
2 on bad usage (one line on stderr), 3 when a check is inconclusive:
nothing was checked (``--max-depth 0``, ``--runs 0``) or a limit (states,
seconds, memory) stopped the search first; the report then says PARTIAL or
NOTHING CHECKED, never HOLDS.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

from .._cli import UsageError, non_negative_int, positive_float, positive_int
from .._cli import main as _cli_main
from . import SCENARIOS, VARIANTS, explore, replay
from ._explore import (
    DEFAULT_MAX_DEPTH,
    DEFAULT_MAX_MEMORY,
    DEFAULT_MAX_SECONDS,
    DEFAULT_MAX_STATES,
)
from .conformance import CASES, conformance

EXIT_INCONCLUSIVE = 3


def _list(args) -> int:
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
    if args.scenario not in SCENARIOS:
        raise UsageError(f"unknown scenario {args.scenario!r} (see: python -m rseq model list)")
    scenario = SCENARIOS[args.scenario]
    if args.variant is not None:
        if args.variant not in VARIANTS:
            raise UsageError(f"unknown variant {args.variant!r}; known: {', '.join(VARIANTS)}")
        if args.variant not in scenario.variants:
            raise UsageError(f"scenario {scenario.name} runs under "
                             f"{', '.join(scenario.variants)}, not {args.variant}")
    bounds = dict(preemptions=args.preemptions, migrations=args.migrations, signals=args.signals)
    if args.threads is not None:
        if scenario.scale is None:
            raise UsageError(f"scenario {scenario.name} has a fixed number of threads "
                             "(--threads applies to: " + ", ".join(
                                 n for n, s in SCENARIOS.items() if s.scale is not None) + ")")
        bounds["threads"] = args.threads
    if args.schedule is not None:
        try:
            result = replay(scenario, args.schedule, args.variant, **bounds)
        except ValueError as e:
            raise UsageError(str(e)) from None
    elif args.engine != "python":
        return _check_spin(args, scenario, bounds)
    else:
        result = _explore_measured(args, scenario, bounds)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(result.report() if result.mode != "replay" else _replay_report(result))
    if result.mode == "replay":
        return 0 if result.holds else 1
    return {"holds": 0, "violated": 1}.get(result.verdict, EXIT_INCONCLUSIVE)


def _explore_measured(args, scenario, bounds):
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = explore(
        scenario, args.variant, seed=args.seed, runs=args.runs,
        max_depth=args.max_depth, max_states=args.max_states,
        max_seconds=args.max_seconds, max_memory=args.max_memory * 2**20, **bounds,
    )
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    result.memory_mb = grown / 1024  # ru_maxrss is in KiB on Linux
    return result


def _check_spin(args, scenario, bounds) -> int:
    """--engine spin or both: SPIN's verdict (and the Python engine's)."""
    from . import spin

    if args.seed is not None:
        raise UsageError("--seed is the Python engine's random mode; not with --engine "
                         + args.engine)
    why = spin.supported(scenario, args.variant or scenario.default_variant)
    if why is not None:
        raise UsageError(f"no Promela export of {scenario.name}: {why}")
    try:
        spin.tools()
        result = spin.check(scenario, args.variant, memory_mb=args.pan_memory,
                            hash_compact=args.hash_compact, **bounds)
    except spin.SpinMissing as e:
        raise UsageError(str(e)) from None
    except spin.Unsupported as e:
        raise UsageError(f"no Promela export: {e}") from None
    except spin.PanOutOfMemory:
        # a resource limit stopped the search: inconclusive, as the
        # Python engine's --max-memory
        print(f"scenario {scenario.name}: NOTHING CHECKED: SPIN's pan reached its "
              f"{args.pan_memory} MiB limit before the search completed (raise --pan-memory, "
              "or use --hash-compact)")
        return EXIT_INCONCLUSIVE
    results = [result]
    if args.engine == "both":
        results.insert(0, _explore_measured(args, scenario, bounds))
    if args.json:
        print(json.dumps([r.to_dict() for r in results] if len(results) > 1
                         else result.to_dict(), indent=2))
    else:
        # SPIN's report gives pan's time and the rounds (Result.report)
        print("\n\n".join(r.report() for r in results))
    verdicts = {r.verdict for r in results}
    if len(results) > 1:
        if len(verdicts) > 1:
            print("\nENGINES DISAGREE: " + ", ".join(f"{r.mode} {r.verdict}" for r in results))
            return 1
        if not args.json:
            print(f"\nboth engines: {result.verdict.upper()}")
    return {"holds": 0, "violated": 1}.get(result.verdict, EXIT_INCONCLUSIVE)


def _replay_report(result) -> str:
    lines = [f"replay of {len(result.schedule)} moves of {result.scenario} "
             f"under {result.variant}:"]
    lines += ["  " + line for line in result.trace]
    lines.append("property " + ("holds on this schedule" if result.holds
                                else f"VIOLATED: {result.violation}"))
    return "\n".join(lines)


def _conformance(args) -> int:
    if args.case:
        unknown = [c for c in args.case if c not in {case.name for case in CASES}]
        if unknown:
            raise UsageError(f"unknown case {unknown[0]!r}")
    report = conformance(only=args.case)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report.format())
    return 0 if report.agree else 1


def add_subcommand(subparsers) -> None:
    model = subparsers.add_parser(
        "model", help="the executable rseq ABI model: list | check | conformance",
        description="The executable rseq ABI model (docs/model.md).")
    sub = model.add_subparsers(title="subcommands", metavar="SUBCOMMAND", required=True)
    ls = sub.add_parser("list", help="variants and scenarios")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(run=_list)

    ck = sub.add_parser("check", help="explore a scenario's interleavings",
                        description="Explore a scenario's interleavings. Exit status: 0 "
                                    "holds, 1 violated, 2 bad usage, 3 inconclusive (partial "
                                    "or nothing checked).")
    ck.add_argument("scenario")
    ck.add_argument("--variant", "-V")
    ck.add_argument("--preemptions", "-k", type=non_negative_int)
    ck.add_argument("--migrations", type=non_negative_int)
    ck.add_argument("--signals", type=non_negative_int)
    ck.add_argument("--threads", type=positive_int,
                    help="thread count, for the scenarios that scale (counter, counter-plain)")
    ck.add_argument("--seed", type=int, help="random mode: RUNS random executions from this seed")
    ck.add_argument("--runs", type=non_negative_int, default=2000)
    ck.add_argument("--max-depth", type=non_negative_int, default=DEFAULT_MAX_DEPTH)
    ck.add_argument("--max-states", type=positive_int, default=DEFAULT_MAX_STATES,
                    help="stop after this many distinct states (also with --seed)")
    ck.add_argument("--max-seconds", type=positive_float, default=DEFAULT_MAX_SECONDS,
                    help=f"stop after this long (default {DEFAULT_MAX_SECONDS:g})")
    ck.add_argument("--max-memory", type=positive_int, default=DEFAULT_MAX_MEMORY >> 20,
                    metavar="MIB", help="stop when the process has grown by this many MiB "
                                        f"(default {DEFAULT_MAX_MEMORY >> 20})")
    ck.add_argument("--schedule", help="replay one schedule: moves separated by commas")
    ck.add_argument("--engine", choices=("python", "spin", "both"), default="python",
                    help="python: the explorer; spin: the Promela export checked by SPIN "
                    "(a violation is replayed by the explorer); both: each, verdicts compared")
    ck.add_argument("--pan-memory", type=positive_int, default=8192, metavar="MIB",
                    help="SPIN: pan's memory limit (default 8192)")
    ck.add_argument("--hash-compact", action="store_true",
                    help="SPIN: store states as 64-bit hashes (HC4) instead of collapse "
                    "compression: a few times less memory, a tiny risk of a missed state")
    ck.add_argument("--json", action="store_true")
    ck.set_defaults(run=_check)

    cf = sub.add_parser("conformance",
                        help="registration cases: this kernel against the linux-6.3 model")
    cf.add_argument("--json", action="store_true")
    cf.add_argument("--case", action="append", help="run only this case (repeatable)")
    cf.set_defaults(run=_conformance)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m rseq.model ARGV``: the same as ``python -m rseq model ARGV``."""
    return _cli_main(["model", *(sys.argv[1:] if argv is None else argv)])
