"""``python -m rseq metrics show NAME`` and ``metrics serve NAME --port P``:
an exporter for servers whose workers should not serve metrics themselves.

It opens the metrics file read-only (it may run as another user: pass
``--trust USER`` or ``--trust group:NAME`` to accept a file owned by that
user or writable by that group) and renders every family in it, as declared
by whatever processes wrote it; it never imports the application.
"""
from __future__ import annotations

import argparse
import signal
import sys
import threading
import time

from .. import _core
from .._cli import UsageError


def _open(args):
    from ._metrics import CollectorRegistry, StorageCollector
    from ._storage import Storage
    trust = args.trust if args.trust else None
    st = Storage.open(args.name, readonly=True, trust=trust)
    registry = CollectorRegistry()
    registry.register(StorageCollector(st))
    return registry


def _cmd_show(args) -> int:
    from ._exposition import generate_openmetrics, generate_text
    registry = _open(args)
    render = generate_openmetrics if args.format == "openmetrics" else generate_text
    sys.stdout.write(render(registry.collect()).decode())
    return 0


def _cmd_serve(args) -> int:
    from ._exposition import start_http_server
    registry = _open(args)
    server, thread = start_http_server(args.port, args.addr, registry)
    print(f"serving {args.name} on http://{args.addr}:{server.server_port}/metrics",
          flush=True)
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        deadline = None if args.duration is None else time.monotonic() + args.duration
        while thread.is_alive() and not stop.is_set() and (
                deadline is None or time.monotonic() < deadline):
            stop.wait(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        server.shutdown()
        server.server_close()
    return 0


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port (0 to 65535), got {port}")
    return port


def run(args) -> int:
    """Run a parsed ``metrics`` command; a missing, untrusted or damaged file
    is a user error: one line, exit status 2 (rseq._cli.main)."""
    try:
        return args.metrics_func(args)
    except (OSError, ValueError, _core.ArenaError) as e:
        text = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise UsageError(text) from None


def add_subcommand(subparsers) -> argparse.ArgumentParser:
    """Add ``metrics`` (with ``show`` and ``serve``) to the rseq command line."""
    parser = subparsers.add_parser(
        "metrics", help="render or serve a shared metrics file (rseq.metrics)",
        description="Render or serve every process's metrics from a shared metrics file "
                    "(RSEQ_METRICS), read-only, without importing the application.")
    sub = parser.add_subparsers(dest="metrics_command", required=True,
                                metavar="{show,serve}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("name", help="the metrics file: a name in /dev/shm or a path")
    common.add_argument("--trust", action="append", metavar="WHO",
                        help="also accept a file owned by this user, or writable by "
                             "'group:NAME' (repeatable)")
    p = sub.add_parser("show", parents=[common], help="print the exposition once")
    p.add_argument("--format", choices=("text", "openmetrics"), default="text",
                   help="Prometheus text 0.0.4 (default) or OpenMetrics 1.0")
    p.set_defaults(metrics_func=_cmd_show)
    p = sub.add_parser("serve", parents=[common],
                       help="serve /metrics over HTTP (OpenMetrics or text by Accept)")
    p.add_argument("--port", type=_port, required=True, help="TCP port (0: any free port)")
    p.add_argument("--addr", default="0.0.0.0", help="address to listen on (default "
                   "0.0.0.0, as prometheus_client's start_http_server)")
    p.add_argument("--duration", type=float, default=None,
                   help="stop after this many seconds (default: until Ctrl-C)")
    p.set_defaults(metrics_func=_cmd_serve)
    parser.set_defaults(run=run)
    return parser
