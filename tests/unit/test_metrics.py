"""rseq.metrics in one process: the prometheus_client API, validation,
exposition in both formats checked with prometheus_client's parsers, the
drop-in comparison, content negotiation and the HTTP, WSGI and ASGI apps.

Metrics in this process are process-local (no RSEQ_METRICS), so every test
uses its own names; shared files are tested in
tests/integration/test_metrics_shared.py.
"""
from __future__ import annotations

import asyncio
import gzip
import itertools
import math
import os
import textwrap
import urllib.request

import pytest

prometheus_client = pytest.importorskip("prometheus_client")
from prometheus_client.openmetrics import parser as om_parser  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from rseq import metrics  # noqa: E402

_names = itertools.count()


def unique(prefix: str = "m") -> str:
    return f"{prefix}_{os.getpid()}_{next(_names)}"


def om_families(registry) -> list:
    """Our OpenMetrics output through prometheus_client's strict parser."""
    text = metrics.generate_openmetrics(registry.collect()).decode()
    return list(om_parser.text_string_to_metric_families(text))


def text_families(registry) -> list:
    text = metrics.generate_latest(registry).decode()
    return list(text_string_to_metric_families(text))


# ---------------------------------------------------------------------------
# The API
# ---------------------------------------------------------------------------

def test_counter_int_and_float_increments():
    reg = metrics.CollectorRegistry()
    c = metrics.Counter(unique("c") + "_total", "help", registry=reg)
    c.inc()
    c.inc(2)
    c.inc(0.5)
    c.inc(amount=1)
    c.inc(True)
    c.inc(2**70)            # past int64: goes to the float sum
    name = c._name
    assert reg.get_sample_value(name + "_total") == 5.5 + 2**70
    assert reg.get_sample_value(name + "_created") > 1.6e9


def test_labels_positional_keyword_and_cache():
    reg = metrics.CollectorRegistry()
    c = metrics.Counter(unique("req"), "requests", ["method", "code"], registry=reg)
    a = c.labels("GET", "200")
    assert c.labels("GET", "200") is a
    assert c.labels(method="GET", code="200") is a
    assert c.labels("GET", 200) is a          # values go through str()
    for _ in range(3):
        c.labels("GET", "200").inc()
        c.labels("POST", "500").inc(2)
    assert reg.get_sample_value(c._name + "_total", {"method": "GET", "code": "200"}) == 3
    assert reg.get_sample_value(c._name + "_total", {"method": "POST", "code": "500"}) == 6
    c.remove("GET", "200")
    assert reg.get_sample_value(c._name + "_total", {"method": "GET", "code": "200"}) is None
    fresh = c.labels("GET", "200")
    assert fresh is not a
    fresh.inc()
    assert reg.get_sample_value(c._name + "_total", {"method": "GET", "code": "200"}) == 1
    c.clear()
    assert reg.get_sample_value(c._name + "_total", {"method": "POST", "code": "500"}) is None
    c.labels("POST", "500").inc()
    assert reg.get_sample_value(c._name + "_total", {"method": "POST", "code": "500"}) == 1


def test_gauge_operations_and_helpers():
    reg = metrics.CollectorRegistry()
    g = metrics.Gauge(unique("g"), "gauge", registry=reg)
    g.set(5)
    g.inc()
    g.inc(2.5)
    g.dec()
    g.dec(0.5)
    assert reg.get_sample_value(g._name) == 7.0
    with g.track_inprogress():
        assert reg.get_sample_value(g._name) == 8.0
    assert reg.get_sample_value(g._name) == 7.0

    @g.track_inprogress()
    def work():
        return reg.get_sample_value(g._name)
    assert work() == 8.0
    g.set_to_current_time()
    assert abs(reg.get_sample_value(g._name) - __import__("time").time()) < 5
    with g.time():
        pass
    assert 0 <= reg.get_sample_value(g._name) < 1
    g.set_function(lambda: 42)
    assert reg.get_sample_value(g._name) == 42
    g.set("3.5")            # anything float() takes, as prometheus_client
    g.set_function(None) if False else None


def test_histogram_buckets_time_and_exemplars():
    reg = metrics.CollectorRegistry()
    h = metrics.Histogram(unique("h_seconds"), "latency", ["path"], buckets=(0.1, 1, 10),
                          registry=reg)
    child = h.labels("/")
    for v in (0.05, 0.1, 0.5, 5, 50, 2):
        child.observe(v)
    child.observe(3, exemplar={"trace_id": "abc"})
    with child.time():
        pass

    @child.time()
    def f():
        return 1
    assert f() == 1
    name = h._name
    got = {s.labels["le"]: s.value for s in om_families(reg)[0].samples
           if s.name == name + "_bucket"}
    assert got == {"0.1": 4.0, "1.0": 5.0, "10.0": 8.0, "+Inf": 9.0}
    assert reg.get_sample_value(name + "_count", {"path": "/"}) == 9
    assert reg.get_sample_value(name + "_sum", {"path": "/"}) == pytest.approx(60.65, abs=0.1)
    exemplars = [s.exemplar for s in om_families(reg)[0].samples if s.exemplar]
    assert len(exemplars) == 1 and exemplars[0].labels == {"trace_id": "abc"}
    assert exemplars[0].value == 3


def test_summary_info_enum():
    reg = metrics.CollectorRegistry()
    s = metrics.Summary(unique("s_bytes"), "size", registry=reg)
    s.observe(3)
    s.observe(4.5)
    with s.time():
        pass
    assert reg.get_sample_value(s._name + "_count") == 3
    assert reg.get_sample_value(s._name + "_sum") == pytest.approx(7.5, abs=0.1)
    i = metrics.Info(unique("build"), "build", registry=reg)
    assert reg.get_sample_value(i._name + "_info") == 1.0      # empty, as prometheus_client
    i.info({"version": "1.2", "commit": "abc"})
    i.info({"version": "1.3"})
    assert reg.get_sample_value(i._name + "_info", {"version": "1.3"}) == 1.0
    assert reg.get_sample_value(i._name + "_info", {"version": "1.2", "commit": "abc"}) is None
    e = metrics.Enum(unique("state"), "state", ["worker"], states=["idle", "busy"],
                     registry=reg)
    e.labels("1").state("busy")
    assert reg.get_sample_value(e._name, {"worker": "1", e._name: "busy"}) == 1.0
    assert reg.get_sample_value(e._name, {"worker": "1", e._name: "idle"}) == 0.0
    with pytest.raises(ValueError):
        e.labels("1").state("gone")


def test_count_exceptions():
    reg = metrics.CollectorRegistry()
    c = metrics.Counter(unique("err"), "errors", registry=reg)
    with pytest.raises(KeyError), c.count_exceptions(KeyError):
        raise KeyError("x")
    with pytest.raises(ValueError), c.count_exceptions(KeyError):
        raise ValueError("not counted")

    @c.count_exceptions()
    def fails():
        raise RuntimeError

    with pytest.raises(RuntimeError):
        fails()
    assert reg.get_sample_value(c._name + "_total") == 2


def test_async_decorators():
    reg = metrics.CollectorRegistry()
    h = metrics.Histogram(unique("async"), "h", registry=reg)

    @h.time()
    async def work():
        await asyncio.sleep(0)
        return 5
    assert asyncio.run(work()) == 5
    assert reg.get_sample_value(h._name + "_count") == 1


def test_default_registry_and_duplicates():
    name = unique("dup")
    metrics.Counter(name, "first")
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        metrics.Counter(name, "again")
    assert metrics.REGISTRY.get_sample_value(name + "_total") == 0.0
    assert f"{name}_total 0.0" in metrics.generate_latest().decode()


# ---------------------------------------------------------------------------
# Bad input (prometheus_client's rules)
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["", "1abc", "a-b", "a b", "é"])
def test_invalid_metric_names(name):
    with pytest.raises(ValueError):
        metrics.Counter(name, "x", registry=None)


@pytest.mark.parametrize("label", ["__reserved", "a-b", "1x", "", "é"])
def test_invalid_label_names(label):
    with pytest.raises(ValueError):
        metrics.Counter(unique("lbl"), "x", [label], registry=None)


def test_reserved_labels_per_type():
    with pytest.raises(ValueError):
        metrics.Histogram(unique("h"), "x", ["le"], registry=None)
    with pytest.raises(ValueError):
        metrics.Summary(unique("s"), "x", ["quantile"], registry=None)
    name = unique("e")
    with pytest.raises(ValueError, match="Overlapping"):
        metrics.Enum(name, "x", [name], states=["a"], registry=None)
    with pytest.raises(ValueError, match="No states"):
        metrics.Enum(unique("e"), "x", registry=None)
    with pytest.raises(ValueError):
        metrics.Info(unique("i"), "x", unit="seconds", registry=None)


def test_wrong_label_use():
    c = metrics.Counter(unique("w"), "x", ["a", "b"], registry=None)
    with pytest.raises(ValueError, match="Incorrect label count"):
        c.labels("1")
    with pytest.raises(ValueError, match="Incorrect label count"):
        c.labels("1", "2", "3")
    with pytest.raises(ValueError, match="Incorrect label names"):
        c.labels(a="1", c="2")
    with pytest.raises(ValueError, match="both"):
        c.labels("1", b="2")
    with pytest.raises(ValueError, match="missing label values"):
        c.inc()
    with pytest.raises(ValueError, match="chain"):
        c.labels("1", "2").labels("3", "4")
    with pytest.raises(ValueError, match="Incorrect label count"):
        c.remove("1")
    plain = metrics.Counter(unique("w"), "x", registry=None)
    with pytest.raises(ValueError, match="No label names"):
        plain.labels("x")
    g = metrics.Gauge(unique("w"), "x", ["a"], registry=None)
    for call in (g.set, g.inc, g.dec):
        with pytest.raises(ValueError, match="missing label values"):
            call(1)
    h = metrics.Histogram(unique("w"), "x", ["a"], registry=None)
    with pytest.raises(ValueError, match="missing label values"):
        h.observe(1)


def test_bad_values():
    c = metrics.Counter(unique("v"), "x", registry=None)
    for amount in (-1, -0.5, -math.inf):
        with pytest.raises(ValueError, match="non-negative"):
            c.inc(amount)
    with pytest.raises(TypeError):
        c.inc("a lot")
    with pytest.raises(TypeError):
        c.inc(1, 2, 3)
    g = metrics.Gauge(unique("v"), "x", registry=None)
    with pytest.raises(TypeError):
        g.set(None)
    with pytest.raises(ValueError, match="exceeding"):
        c.inc(1, exemplar={"trace_id": "x" * 200})
    with pytest.raises(ValueError):
        c.inc(1, exemplar={"bad-name": "x"})
    with pytest.raises(ValueError, match="sorted"):
        metrics.Histogram(unique("v"), "x", buckets=(2, 1), registry=None)
    with pytest.raises(ValueError):
        metrics.Histogram(unique("v"), "x", buckets=(math.nan,), registry=None)
    with pytest.raises(ValueError, match="two buckets"):
        metrics.Histogram(unique("v"), "x", buckets=(math.inf,), registry=None)
    with pytest.raises(ValueError, match="multiprocess mode"):
        metrics.Gauge(unique("v"), "x", multiprocess_mode="average", registry=None)
    i = metrics.Info(unique("v"), "x", ["a"], registry=None)
    with pytest.raises(ValueError, match="Overlapping"):
        i.labels("1").info({"a": "2"})
    with pytest.raises(ValueError):
        i.labels("1").info({"k": 3})


def test_nan_and_infinities_render_where_allowed():
    reg = metrics.CollectorRegistry()
    g = metrics.Gauge(unique("nan"), "x", ["k"], registry=reg)
    g.labels("nan").set(math.nan)
    g.labels("inf").set(math.inf)
    g.labels("-inf").set(-math.inf)
    c = metrics.Counter(unique("inf"), "x", registry=reg)
    c.inc(math.inf)
    # NaN counters and sums are forbidden by OpenMetrics: refused at the API
    # (prometheus_client accepts them and writes output its parser rejects).
    with pytest.raises(ValueError, match="NaN"):
        c.inc(math.nan)
    with pytest.raises(ValueError, match="NaN"):
        c.inc(float("nan"))
    h = metrics.Histogram(unique("hnan"), "x", buckets=(1,), registry=reg)
    with pytest.raises(ValueError, match="NaN"):
        h.observe(math.nan)
    h.observe(math.inf)      # the +Inf bucket
    neg = metrics.Histogram(unique("neg"), "x", buckets=(1,), registry=reg)
    neg.observe(-5)          # a negative sum: OpenMetrics leaves _sum out
    families = {f.name: f for f in om_families(reg)}
    assert [s.name for s in families[neg._name].samples
            if s.name.endswith(("_sum", "_count"))] == []
    assert f"{neg._name}_sum -5.0" in metrics.generate_latest(reg).decode()
    values = {s.labels["k"]: s.value for s in families[g._name].samples}
    assert math.isnan(values["nan"]) and values["inf"] == math.inf
    assert values["-inf"] == -math.inf
    assert families[c._name].samples[0].value == math.inf
    hist = {(s.name, s.labels.get("le")): s.value for s in families[h._name].samples}
    assert hist[(h._name + "_count", None)] == 1 == hist[(h._name + "_bucket", "+Inf")]
    assert hist[(h._name + "_sum", None)] == math.inf
    text_families(reg)


def test_conflicting_redeclaration_in_storage():
    name = unique("conflict")
    metrics.Counter(name, "x", ["a"], registry=None)
    with pytest.raises(ValueError, match="already declared.*type 'counter'"):
        metrics.Gauge(name, "x", ["a"], registry=None)
    with pytest.raises(ValueError, match="labelnames"):
        metrics.Counter(name, "x", ["b"], registry=None)
    h = unique("conflict")
    metrics.Histogram(h, "x", buckets=(1, 2), registry=None)
    with pytest.raises(ValueError, match="buckets"):
        metrics.Histogram(h, "x", buckets=(1, 3), registry=None)
    # The same declaration again is fine (another module, a re-import).
    metrics.Histogram(h, "other help", buckets=(1, 2), registry=None)


def test_configure_after_first_metric_is_refused():
    metrics.Counter(unique("cfg"), "x", registry=None)
    with pytest.raises(RuntimeError, match="before the first metric"):
        metrics.configure("somewhere-else")
    with pytest.raises(TypeError):
        metrics.configure("x", bogus=3)


# ---------------------------------------------------------------------------
# Exposition and conformance
# ---------------------------------------------------------------------------

def populated_registry():
    reg = metrics.CollectorRegistry()
    c = metrics.Counter(unique("req"), "Requests.\nSecond line \\ with \"quotes\"",
                        ["method"], registry=reg)
    c.labels('GE"T\\\n').inc(3, exemplar={"trace_id": "t1"})
    g = metrics.Gauge(unique("temp"), "t", unit="celsius", registry=reg)
    g.set(-3.25e-9)
    h = metrics.Histogram(unique("lat"), "l", unit="seconds", buckets=(1e-3, 0.1, 2.5e7),
                          registry=reg)
    for v in (0, 0.05, 1e8, 3e7):
        h.observe(v)
    h.observe(0.07, exemplar={"trace_id": "t2"})
    metrics.Summary(unique("sz"), "s", registry=reg).observe(12)
    metrics.Info(unique("b"), "b", registry=reg).info({"v": "1"})
    metrics.Enum(unique("e"), "e", states=["a", "b"], registry=reg).state("b")
    return reg


def test_openmetrics_output_passes_the_strict_parser():
    reg = populated_registry()
    families = om_families(reg)
    types = [f.type for f in families]
    assert types == ["counter", "gauge", "histogram", "summary", "info", "stateset"]
    text = metrics.generate_openmetrics(reg.collect()).decode()
    assert text.endswith("# EOF\n")
    assert "# UNIT " in text and "_created" in text
    hist = families[2]
    buckets = [s for s in hist.samples if s.name.endswith("_bucket")]
    counts = [s.value for s in buckets]
    assert counts == sorted(counts), "buckets cumulative"
    assert buckets[-1].labels["le"] == "+Inf"
    count = next(s.value for s in hist.samples if s.name.endswith("_count"))
    assert buckets[-1].value == count == 5
    assert {b.labels["le"] for b in buckets} == {"0.001", "0.1", "2.5e+07", "+Inf"}


def test_text_output_passes_the_text_parser():
    families = text_families(populated_registry())
    by_type = {f.type for f in families}
    assert {"counter", "gauge", "histogram", "summary"} <= by_type
    counter = families[0]
    assert counter.documentation == 'Requests.\nSecond line \\ with "quotes"'
    assert counter.samples[0].labels == {"method": 'GE"T\\\n'}


def test_empty_and_untyped_families():
    reg = metrics.CollectorRegistry()
    metrics.Counter(unique("unused"), "never touched", ["a"], registry=reg)
    assert om_families(reg)[0].samples == []
    assert metrics.generate_openmetrics([]) == b"# EOF\n"


def test_choose_encoder():
    assert metrics.choose_encoder(None)[1] == metrics.CONTENT_TYPE_PLAIN
    prometheus_accept = ("application/openmetrics-text;version=1.0.0,application/"
                         "openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;"
                         "q=0.5,*/*;q=0.1")
    assert metrics.choose_encoder(prometheus_accept)[1] == metrics.CONTENT_TYPE_OPENMETRICS
    assert metrics.choose_encoder("text/plain")[1] == metrics.CONTENT_TYPE_PLAIN
    assert metrics.choose_encoder("application/openmetrics-text; version=9.9.9")[1] == \
        metrics.CONTENT_TYPE_PLAIN


# ---------------------------------------------------------------------------
# Drop-in: the same application on prometheus_client and on rseq.metrics
# ---------------------------------------------------------------------------

APP = textwrap.dedent("""
    from {module} import Counter, Enum, Gauge, Histogram, Info, CollectorRegistry

    registry = CollectorRegistry()
    requests = Counter("app_requests_total", "Requests handled", ["method", "code"],
                       registry=registry)
    errors = Counter("app_errors", "Errors", registry=registry)
    latency = Histogram("app_latency_seconds", "Request latency", ["method"],
                        registry=registry)
    inprogress = Gauge("app_inprogress", "Requests in progress", registry=registry)
    size = Gauge("app_queue_size", "Queue size", ["queue"], registry=registry)
    build = Info("app_build", "Build information", registry=registry)
    state = Enum("app_state", "Server state", states=["starting", "running", "stopping"],
                 registry=registry)

    build.info({{"version": "1.4.2", "commit": "0a1b2c"}})
    state.state("running")

    @inprogress.track_inprogress()
    def handle(method, code):
        with latency.labels(method).time():
            requests.labels(method=method, code=code).inc()
            if code == "500":
                errors.inc()

    for i in range(50):
        handle("GET" if i % 3 else "POST", "500" if i % 7 == 0 else "200")
    requests.labels("PUT", "201").inc(2.5)
    size.labels("high").set(7)
    size.labels("low").inc(3)
    size.labels("low").dec()
""")


def run_app(module: str):
    namespace: dict = {}
    exec(APP.format(module=module), namespace)
    return namespace["registry"]


def comparable(families) -> dict:
    out = {}
    for f in families:
        samples = {}
        for s in f.samples:
            if s.name.endswith("_created"):
                continue
            value = s.value
            if "latency" in s.name and (s.name.endswith("_sum") or (
                    s.name.endswith("_bucket") and s.labels["le"] != "+Inf")):
                value = None    # durations measured by .time(): machine load decides
            samples[(s.name, tuple(sorted(s.labels.items())))] = value
        out[f.name] = (f.type, f.documentation, samples)
    return out


def test_drop_in_matches_prometheus_client_single_process():
    theirs = run_app("prometheus_client")
    ours = run_app("rseq.metrics")
    from prometheus_client.openmetrics.exposition import generate_latest as om_latest
    their_om = om_latest(theirs).decode()
    our_om = metrics.generate_openmetrics(ours.collect()).decode()
    assert comparable(om_parser.text_string_to_metric_families(our_om)) == \
        comparable(om_parser.text_string_to_metric_families(their_om))
    their_text = prometheus_client.generate_latest(theirs).decode()
    our_text = metrics.generate_latest(ours).decode()
    assert comparable(text_string_to_metric_families(our_text)) == \
        comparable(text_string_to_metric_families(their_text))
    # Same lines in the same order, timestamps of _created aside.
    def lines(text):
        return [line.split(" ")[0] if "_created" in line or "latency_seconds" in line
                else line for line in text.splitlines()]
    assert lines(our_text) == lines(their_text)


# ---------------------------------------------------------------------------
# Serving
# ---------------------------------------------------------------------------

def test_http_server_negotiates_and_filters():
    reg = metrics.CollectorRegistry()
    c = metrics.Counter(unique("http"), "h", registry=reg)
    other = metrics.Counter(unique("http"), "h", registry=reg)
    c.inc(4)
    server, thread = metrics.start_http_server(0, "127.0.0.1", registry=reg)
    try:
        url = f"http://127.0.0.1:{server.server_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as r:
            assert r.headers["Content-Type"] == metrics.CONTENT_TYPE_PLAIN
            assert f"{c._name}_total 4.0" in r.read().decode()
        req = urllib.request.Request(url, headers={
            "Accept": "application/openmetrics-text; version=1.0.0",
            "Accept-Encoding": "gzip"})
        with urllib.request.urlopen(req, timeout=10) as r:
            assert r.headers["Content-Type"] == metrics.CONTENT_TYPE_OPENMETRICS
            body = gzip.decompress(r.read()).decode()
            assert body.endswith("# EOF\n")
            list(om_parser.text_string_to_metric_families(body))
        with urllib.request.urlopen(url + f"?name[]={c._name}_total", timeout=10) as r:
            body = r.read().decode()
            assert c._name in body and other._name not in body
    finally:
        server.shutdown()
        server.server_close()


def test_wsgi_and_asgi_apps():
    reg = metrics.CollectorRegistry()
    c = metrics.Counter(unique("apps"), "a", registry=reg)
    c.inc()
    started = {}

    def start_response(status, headers):
        started.update(status=status, headers=dict(headers))
    body = b"".join(metrics.make_wsgi_app(reg)(
        {"PATH_INFO": "/metrics", "HTTP_ACCEPT": "application/openmetrics-text"},
        start_response))
    assert started["status"] == "200 OK"
    assert started["headers"]["Content-Type"] == metrics.CONTENT_TYPE_OPENMETRICS
    assert body.endswith(b"# EOF\n")

    sent = []

    async def receive():
        return {"type": "http.request"}

    async def send(message):
        sent.append(message)
    scope = {"type": "http", "headers": [(b"accept", b"text/plain")], "query_string": b""}
    asyncio.run(metrics.make_asgi_app(reg)(scope, receive, send))
    assert sent[0]["status"] == 200
    assert (b"content-type", metrics.CONTENT_TYPE_PLAIN.encode()) in sent[0]["headers"]
    assert f"{c._name}_total 1.0".encode() in sent[1]["body"]


def test_prometheus_client_collector_adapter():
    """An application's prometheus_client registry (process and GC
    collectors included) served together with our metrics, both ways."""
    reg = metrics.CollectorRegistry()
    ours = metrics.Counter(unique("ours"), "ours", registry=reg)
    ours.inc(2)
    theirs = prometheus_client.Counter(unique("theirs"), "theirs")
    theirs.inc(5)
    reg.register(metrics.PrometheusClientCollector())
    text = metrics.generate_openmetrics(reg.collect()).decode()
    names = {f.name for f in om_parser.text_string_to_metric_families(text)}
    assert {ours._name, theirs._name, "process_cpu_seconds", "python_gc_objects_collected"} \
        <= names
    # And the other way: our registry inside prometheus_client's exposition.
    their_reg = prometheus_client.CollectorRegistry()
    their_reg.register(reg)
    text = prometheus_client.generate_latest(their_reg).decode()
    assert f"{ours._name}_total 2.0" in text


def test_bench_children_run():
    """The children of ``python -m rseq bench --section metrics`` (the full
    run is a separate command): one short round of each kind."""
    from rseq.metrics import _bench
    hot = _bench._run_child(_bench._HOT, "rseq shared", "0.001")
    assert set(hot["ns"]) == {_bench.FLOOR, *_bench.CASES}
    assert hot["scrape_1000_ms"] > 0
    history = _bench._run_child(_bench._HISTORY, "rseq shared", "0,3")
    assert [p["dead"] for p in history] == [0, 3]
    assert history[0]["bytes"] == history[1]["bytes"]
    theirs = _bench._run_child(_bench._HISTORY, "prometheus multiprocess", "0,3")
    assert theirs[1]["bytes"] > theirs[0]["bytes"]
