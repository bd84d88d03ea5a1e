"""The command line: ``python -m rseq [info|inspect|bench|stress|model] ...``.

With no arguments it runs the main job: the info report, then a few-second
side-by-side speed check.  Bad input gets a one-line error and exit status
2, never a traceback.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from . import _bench, _core
from ._info import Info, info


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, status 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def format_info(facts: Info) -> str:
    def area_line() -> str:
        if facts.owner is None:
            return "none (fallback path in use)"
        return (f"registered by {facts.owner}: {facts.registered_size}-byte area at "
                f"{facts.area_address:#x}, {facts.usable_size} bytes usable")

    all_fields = [name for name, _offset, _size in _core.ABI_FIELDS]
    missing = [f for f in all_fields if f not in facts.fields]
    try:
        mm_cid = str(_core.mm_cid())
    except _core.Unsupported:
        mm_cid = "unsupported"
    slice_state = ("advertised" + (", enabled" if facts.slice_extension_enabled else "")
                   if facts.slice_extension else "not advertised (needs Linux 7.0)")
    lines = [
        "rseq: restartable sequences on this machine",
        f"  kernel          {'rseq(2) present' if facts.kernel else 'no rseq(2)'} "
        f"(probe: {facts.kernel_probe}), feature size {facts.feature_size}, "
        f"alignment {facts.alignment}",
        f"  process owner   {facts.process_owner or 'nobody'}",
        f"  this thread     {area_line()}",
        f"  usable fields   {' '.join(facts.fields) or '-'}",
        f"  not usable      {' '.join(missing) or '-'}",
        f"  fallback        {facts.fallback or 'none'}",
        f"  possible CPUs   {facts.possible_cpus}",
        f"  time slices     {slice_state}; prctl GET: {facts.slice_extension_prctl}",
        f"  per-CPU ops     {'critical sections in ' + facts.arch + ' assembly' if facts.critical_sections else 'atomic fallback'}",
        f"  signature       {facts.signature:#010x}",
        f"  now             cpu {_core.cpu()}, node {_core.node()}, mm_cid {mm_cid}",
    ]
    return "\n".join(lines)


def _cmd_info(args) -> int:
    facts = info()
    if args.json:
        print(json.dumps(facts.as_dict(), indent=2))
    else:
        print(format_info(facts))
    return 0


def _cmd_inspect(args) -> int:
    from ._inspect import InspectError, format_table, inspect_process
    try:
        threads = inspect_process(args.pid)
    except InspectError as e:
        print(f"python -m rseq inspect: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"pid": args.pid, "threads": [t.as_dict() for t in threads]},
                         indent=2))
    else:
        print(format_table(args.pid, threads))
    return 0


def _cmd_bench(args) -> int:
    sections = args.section or list(_bench.SECTIONS)
    results = {}
    for name in sections:
        results[name] = _bench.SECTIONS[name](quick=args.quick)
        if not args.json:
            print(_bench.format_section(results[name]), flush=True)
            print()
    if args.plot:
        try:
            _bench.plot(results, args.plot)
        except ImportError as e:
            print(f"python -m rseq bench: --plot needs matplotlib ({e})", file=sys.stderr)
            return 2
        if not args.json:
            print(f"plot written to {args.plot}")
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


def _cmd_default(args) -> int:
    print(format_info(info()))
    print()
    print("speed check (a few seconds; `python -m rseq bench` for the full run)")
    print(_bench.format_section(_bench.bench_reads(quick=True)))
    return 0


def _cmd_model(argv: list[str]) -> int:
    from .model.cli import main as model_main
    return model_main(argv)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m rseq",
                     description="Linux restartable sequences for Python.")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    p = sub.add_parser("info", help="what rseq support this machine and thread have")
    p.add_argument("--json", action="store_true", help="the keys of rseq.Info as JSON")
    p.set_defaults(func=_cmd_info)
    p = sub.add_parser("inspect", help="each thread's registration in another process")
    p.add_argument("pid", type=int)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_inspect)
    p = sub.add_parser("bench", help="side-by-side speed measurements")
    p.add_argument("--section", action="append", choices=sorted(_bench.SECTIONS),
                   help="run only this section (repeatable)")
    p.add_argument("--quick", action="store_true", help="fewer rounds")
    p.add_argument("--json", action="store_true")
    p.add_argument("--plot", metavar="PNG", help="also write a plot (needs matplotlib)")
    p.set_defaults(func=_cmd_bench)
    sub.add_parser("model", help="the executable rseq ABI model (python -m rseq model -h)",
                   add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "model":
        return _cmd_model(argv[1:])
    if argv and argv[0] == "pool":
        from ._pool import cli_main as pool_main
        return pool_main(argv[1:])
    if argv and argv[0] == "stress":
        from .testing.stress import main as stress_main
        return stress_main(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command is None:
        return _cmd_default(args)
    return args.func(args)
