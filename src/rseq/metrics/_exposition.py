"""Exposition: Prometheus text 0.0.4 and OpenMetrics 1.0, chosen by the
scraper's ``Accept`` header, served by a WSGI app, an ASGI app or a
threaded HTTP server.

Families are duck-typed like prometheus_client's ``Metric`` (``name``,
``documentation``, ``type``, ``unit``, ``samples`` of ``(name, labels,
value, timestamp, exemplar)``), so a family collected from a
prometheus_client collector renders exactly like ours.
"""
from __future__ import annotations

import gzip
import math
import threading
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, NamedTuple
from urllib.parse import parse_qs

CONTENT_TYPE_PLAIN = "text/plain; version=0.0.4; charset=utf-8"
CONTENT_TYPE_LATEST = CONTENT_TYPE_PLAIN
CONTENT_TYPE_OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"


class Exemplar(NamedTuple):
    labels: dict[str, str]
    value: float
    timestamp: float | None = None


class Sample(NamedTuple):
    name: str
    labels: dict[str, str]
    value: float
    timestamp: float | None = None
    exemplar: Exemplar | None = None
    native_histogram: None = None   # prometheus_client's field: never used here


class Metric:
    """A metric family as collected: prometheus_client's ``Metric`` shape."""

    def __init__(self, name: str, documentation: str, typ: str, unit: str = ""):
        self.name = name
        self.documentation = documentation
        self.type = typ
        self.unit = unit
        self.samples: list[Sample] = []

    def add_sample(self, name: str, labels: dict[str, str], value: float,
                   timestamp: float | None = None, exemplar: Exemplar | None = None) -> None:
        self.samples.append(Sample(name, labels, value, timestamp, exemplar))

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Metric) and self.name == other.name
                and self.documentation == other.documentation and self.type == other.type
                and self.unit == other.unit and self.samples == other.samples)

    def __repr__(self) -> str:
        return (f"Metric({self.name!r}, {self.documentation!r}, {self.type!r}, "
                f"{self.unit!r}, {self.samples!r})")


def format_float(value: float) -> str:
    """A float as Go (and so Prometheus) writes it: +Inf, -Inf, NaN, and an
    exponent from 1e+07 on for positive numbers, so bucket bounds are in the
    canonical form the OpenMetrics parser expects."""
    value = float(value)
    if -math.inf < value < 1e6:     # the common case: Python's repr is Go's
        return repr(value)
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    text = repr(value)
    dot = text.find(".")
    if value > 0 and dot > 6:
        mantissa = f"{text[0]}.{text[1:dot]}{text[dot + 1:]}".rstrip("0.")
        return f"{mantissa}e+{dot - 1:02d}"
    return text


def _escape_label(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def label_text(labels: dict[str, str]) -> str:
    """``{a="1",b="2"}`` (names sorted, values escaped), or "" for none."""
    return _labels(labels)


def exemplar_text(e: Any) -> str:
    """`` # {labels} value [timestamp]`` (OpenMetrics), or "" for None."""
    if e is None:
        return ""
    text = f" # {_labels(e.labels) or '{}'} {format_float(e.value)}"
    if e.timestamp is not None:
        text += f" {float(e.timestamp)!r}"
    return text


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape_label(v)}"'
                          for k, v in sorted(labels.items())) + "}"


def generate_text(families: Iterable[Any]) -> bytes:
    """Prometheus text format 0.0.4 (as prometheus_client writes it: the
    OpenMetrics-only ``_created`` samples become a gauge family each)."""
    out: list[str] = []
    for metric in families:
        name, kind = metric.name, metric.type
        if kind == "counter":
            name += "_total"
        elif kind == "info":
            name += "_info"
            kind = "gauge"
        elif kind == "stateset":
            kind = "gauge"
        elif kind == "gaugehistogram":
            kind = "histogram"
        elif kind in ("unknown", "untyped"):
            kind = "untyped"
        help_text = metric.documentation.replace("\\", r"\\").replace("\n", r"\n")
        out.append(f"# HELP {name} {help_text}\n# TYPE {name} {kind}\n")
        extra: dict[str, list[str]] = {}
        fast = getattr(metric, "_render", None)
        if fast is not None:
            lines, extra = fast(False)
            out.extend(lines)
        for s in ([] if fast is not None else metric.samples):
            line = f"{s.name}{_labels(s.labels)} {format_float(s.value)}"
            if s.timestamp is not None:
                line += f" {int(float(s.timestamp) * 1000)}"
            line += "\n"
            for suffix in ("_created", "_gsum", "_gcount"):
                if s.name == metric.name + suffix:
                    extra.setdefault(suffix, []).append(line)
                    break
            else:
                out.append(line)
        for suffix, lines in sorted(extra.items()):
            out.append(f"# HELP {metric.name}{suffix} {help_text}\n"
                       f"# TYPE {metric.name}{suffix} gauge\n")
            out.extend(lines)
    return "".join(out).encode("utf-8")


def generate_openmetrics(families: Iterable[Any]) -> bytes:
    """OpenMetrics 1.0 text: units, ``_created``, info and stateset types,
    exemplars on counters and histogram buckets, and the final ``# EOF``."""
    out: list[str] = []
    for metric in families:
        kind = "unknown" if metric.type == "untyped" else metric.type
        fast = getattr(metric, "_render", None)
        omit_sum = fast is None and kind == "histogram" and _negative_histogram(metric)
        help_text = (metric.documentation.replace("\\", r"\\").replace("\n", r"\n")
                     .replace('"', r"\""))
        out.append(f"# HELP {metric.name} {help_text}\n# TYPE {metric.name} {kind}\n")
        if metric.unit:
            out.append(f"# UNIT {metric.name} {metric.unit}\n")
        if fast is not None:
            out.extend(fast(True)[0])
        for s in ([] if fast is not None else metric.samples):
            if omit_sum and s.name in (metric.name + "_sum", metric.name + "_count"):
                continue
            line = f"{s.name}{_labels(s.labels)} {format_float(s.value)}"
            if s.timestamp is not None:
                line += f" {float(s.timestamp)!r}"
            if s.exemplar is not None and (
                    (kind in ("histogram", "gaugehistogram") and s.name.endswith("_bucket"))
                    or (kind == "counter" and s.name.endswith("_total"))):
                line += exemplar_text(s.exemplar)
            out.append(line + "\n")
    out.append("# EOF\n")
    return "".join(out).encode("utf-8")


def _negative_histogram(metric: Any) -> bool:
    """OpenMetrics 1.0 forbids ``_sum`` in a histogram with negative buckets
    and a negative ``_sum``, and ``_count`` without ``_sum``: such histograms
    are exposed with their buckets only (the ``+Inf`` bucket is the count;
    text 0.0.4 keeps both)."""
    for s in metric.samples:
        if s.name == metric.name + "_bucket" and float(s.labels.get("le", 0)) < 0:
            return True
        if s.name == metric.name + "_sum" and s.value < 0:
            return True
    return False


def choose_encoder(accept_header: str | None) -> tuple[Callable[[Iterable[Any]], bytes], str]:
    """OpenMetrics when the scraper accepts it (Prometheus asks for it
    first), else text 0.0.4."""
    for accepted in (accept_header or "").split(","):
        parts = [p.strip() for p in accepted.split(";")]
        if parts[0] != "application/openmetrics-text":
            continue
        versions = [p.split("=", 1)[1] for p in parts[1:] if p.startswith("version=")]
        if not versions or versions[0] in ("1.0.0", "0.0.1"):
            return generate_openmetrics, CONTENT_TYPE_OPENMETRICS
    return generate_text, CONTENT_TYPE_PLAIN


def _families(registry: Any, names: list[str] | None) -> Iterable[Any]:
    if not names:
        return registry.collect()
    wanted = set(names)
    return [m for m in registry.collect() if m.name in wanted
            or any(s.name in wanted for s in m.samples)]


def render(registry: Any, accept: str | None, query: str = "",
           accept_encoding: str | None = None) -> tuple[bytes, list[tuple[str, str]]]:
    """Body and headers of a scrape: format by Accept, ``name[]`` filters,
    gzip when accepted."""
    encoder, content_type = choose_encoder(accept)
    names = parse_qs(query).get("name[]")
    body = encoder(_families(registry, names))
    headers = [("Content-Type", content_type)]
    if accept_encoding and "gzip" in accept_encoding:
        body = gzip.compress(body)
        headers.append(("Content-Encoding", "gzip"))
    return body, headers


# ---------------------------------------------------------------------------
# Serving
# ---------------------------------------------------------------------------

def make_wsgi_app(registry: Any = None) -> Callable:
    """A WSGI application that serves the registry (default: REGISTRY)."""
    def app(environ, start_response):
        reg = registry if registry is not None else _default_registry()
        if environ.get("PATH_INFO") == "/favicon.ico":
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b""]
        body, headers = render(reg, environ.get("HTTP_ACCEPT"),
                               environ.get("QUERY_STRING", ""),
                               environ.get("HTTP_ACCEPT_ENCODING"))
        start_response("200 OK", headers)
        return [body]
    return app


def make_asgi_app(registry: Any = None) -> Callable:
    """An ASGI (HTTP) application that serves the registry."""
    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        reg = registry if registry is not None else _default_registry()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers", [])}
        query = scope.get("query_string", b"").decode("latin-1")
        body, out = render(reg, headers.get("accept"), query, headers.get("accept-encoding"))
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(k.lower().encode(), v.encode()) for k, v in out]})
        await send({"type": "http.response.body", "body": body})
    return app


class _Handler(BaseHTTPRequestHandler):
    registry: Any = None

    def do_GET(self):  # the http.server name
        path, _, query = self.path.partition("?")
        try:
            body, headers = render(self.registry, self.headers.get("Accept"), query,
                                   self.headers.get("Accept-Encoding"))
            status = 200
        except Exception as e:   # a collector failed: say so, keep serving
            body, headers, status = (f"error collecting metrics: {e}\n".encode(),
                                     [("Content-Type", "text/plain")], 500)
        self.send_response(status)
        for key, value in headers:
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):  # the http.server signature
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True


def start_http_server(port: int, addr: str = "0.0.0.0", registry: Any = None
                      ) -> tuple[ThreadingHTTPServer, threading.Thread]:
    """Serve the registry over HTTP from a daemon thread; returns (server,
    thread) as prometheus_client does.  ``server.shutdown()`` stops it."""
    handler = type("MetricsHandler", (_Handler,),
                   {"registry": registry if registry is not None else _default_registry()})
    server = _Server((addr, port), handler)
    thread = threading.Thread(target=server.serve_forever, name="rseq-metrics-http",
                              daemon=True)
    thread.start()
    return server, thread


start_wsgi_server = start_http_server


def _default_registry() -> Any:
    from ._metrics import REGISTRY
    return REGISTRY
