"""The command line: ``python -m rseq [SUBCOMMAND] ...``.

One argparse tree.  With no subcommand it runs the main job: the info
report, then a few-second side-by-side speed check.

How a subcommand plugs in
-------------------------
A module that owns a subcommand defines::

    def add_subcommand(subparsers) -> None:
        parser = subparsers.add_parser("ring", help="one line for `-h`")
        parser.add_argument("--json", action="store_true")
        parser.set_defaults(run=_run)        # _run(args) -> exit status

and its dotted name is appended to ``SUBCOMMAND_MODULES`` below (the order
there is the order ``python -m rseq -h`` lists them).  ``subparsers``
creates :class:`Parser` instances, and so do nested ``add_subparsers()``
calls (argparse reuses the parent's class), so every level reports errors
the same way.  A subcommand with its own subcommands (``model``) calls
``parser.add_subparsers(required=True)`` and sets ``run`` on each leaf.

User errors: a bad flag or value is rejected by argparse (``type=`` may use
:func:`positive_int` and friends); anything the handler finds wrong raises
:class:`UsageError`.  Either way :func:`main` prints ONE line,
``PROG: error: MESSAGE``, on stderr and returns 2; never a usage block or a
traceback.  Ctrl-C prints one line and returns 130.

Modules import this one (for ``UsageError`` and the ``type=`` helpers) at
their top; this one imports them only when it builds the tree, so neither
order of import is circular.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence

from . import _core
from ._info import Info, info

PROG = "python -m rseq"

#: Modules whose ``add_subcommand(subparsers)`` adds a subcommand, in the
#: order ``-h`` lists them.
SUBCOMMAND_MODULES = (
    "rseq._cli",            # info
    "rseq._inspect",        # inspect
    "rseq._bench",          # bench
    "rseq.testing.stress",  # stress
    "rseq.model.cli",       # model list | check | conformance
    "rseq._ring",           # ring stats | tail
    "rseq.metrics._cli",    # metrics show | serve
    "rseq._pool",           # pool stats
)


class UsageError(Exception):
    """A user error: :func:`main` prints it as one line and returns 2."""

    def __init__(self, message: str, prog: str | None = None):
        super().__init__(" ".join(str(message).split()))  # one line, whatever it held
        self.prog = prog


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are a :class:`UsageError` (one line,
    exit status 2 through :func:`main`), not a usage block and SystemExit."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(message, self.prog)

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        # The innermost parser finishes first: its prog names the command a
        # handler's UsageError belongs to ("python -m rseq model check").
        if not hasattr(namespace, "command_prog"):
            namespace.command_prog = self.prog
        return namespace, extras

    def parse_args(self, args=None, namespace=None):
        namespace, extras = self.parse_known_args(args, namespace)
        if extras:  # named after the subcommand they were given to
            raise UsageError(f"unrecognized arguments: {' '.join(extras)}",
                             namespace.command_prog)
        return namespace


def _number(text: str, convert, minimum, what: str):
    try:
        value = convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid {convert.__name__} value: {text!r}") from None
    if value < minimum or value != value:  # value != value: NaN
        raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
    return value


def positive_int(text: str) -> int:
    """``type=`` for an integer >= 1."""
    return _number(text, int, 1, "a positive integer (>= 1)")


def non_negative_int(text: str) -> int:
    """``type=`` for an integer >= 0."""
    return _number(text, int, 0, "an integer >= 0")


def positive_float(text: str) -> float:
    """``type=`` for a number > 0 (seconds, say)."""
    value = _number(text, float, 0.0, "a number > 0")
    if value == 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


# ---------------------------------------------------------------------------
# info, and the default run
# ---------------------------------------------------------------------------

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
    per_cpu = (f"critical sections in {facts.arch} assembly" if facts.critical_sections
               else "atomic fallback")
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
        f"  per-CPU ops     {per_cpu}",
        f"  signature       {facts.signature:#010x}",
        f"  now             cpu {_core.cpu()}, node {_core.node()}, mm_cid {mm_cid}",
    ]
    return "\n".join(lines)


def _run_info(args) -> int:
    facts = info()
    if args.json:
        print(json.dumps(facts.as_dict(), indent=2))
    else:
        print(format_info(facts))
    return 0


def _run_default(args) -> int:
    # Imported here: rseq._bench imports this module (for UsageError).
    from . import _bench

    print(format_info(info()))
    print()
    print("speed check (a few seconds; `python -m rseq bench` for the full run)")
    print(_bench.format_section(_bench.bench_reads(quick=True)))
    return 0


def add_subcommand(subparsers) -> None:
    p = subparsers.add_parser("info", help="what rseq support this machine and thread have",
                              description="What rseq support this machine, process and "
                                          "thread have.")
    p.add_argument("--json", action="store_true", help="the keys of rseq.Info as JSON")
    p.set_defaults(run=_run_info)


# ---------------------------------------------------------------------------
# The tree
# ---------------------------------------------------------------------------

def build_parser() -> Parser:
    parser = Parser(prog=PROG, description="Linux restartable sequences for Python. "
                    "With no subcommand: the info report and a quick speed check.")
    parser.set_defaults(run=_run_default)
    subparsers = parser.add_subparsers(title="subcommands", metavar="SUBCOMMAND")
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).add_subcommand(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``python -m rseq ARGV``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    prog = PROG
    try:
        args = parser.parse_args(argv)
        prog = args.command_prog
        return args.run(args)
    except UsageError as e:
        print(f"{e.prog or prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
