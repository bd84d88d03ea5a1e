"""``python -m rseq bench --section metrics``: rseq.metrics beside
prometheus_client (single-process and multiprocess mode), in one run.

Every configuration must be chosen before its library is imported
(PROMETHEUS_MULTIPROC_DIR, RSEQ_METRICS), so each is measured in a child
interpreter; the children run round after round, alternating, so machine
noise hits every configuration alike, and the report gives medians.  Each
child also measures the call floor (``{}.get(1)``), so ratios compare
figures taken side by side.

Calls are timed as users write them (``c.inc()``: attribute lookup
included), with timeit's loop.
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap

CONFIGS = ("rseq shared", "rseq local", "prometheus single", "prometheus multiprocess")
CASES = ("Counter.inc()", "child.inc()", "labels().inc()", "Histogram.observe()",
         "Gauge.set()")
FLOOR = "{}.get(1) [floor]"

_SETUP = """
import json, os, sys, tempfile, time, timeit, statistics
config, where = sys.argv[1], sys.argv[2]
if config == "prometheus multiprocess":
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = where
elif config == "rseq shared":
    os.environ["RSEQ_METRICS"] = where
if config.startswith("prometheus"):
    import prometheus_client as m
    if config == "prometheus multiprocess":
        from prometheus_client import multiprocess
        def scrape():
            registry = m.CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return m.generate_latest(registry)
    else:
        def scrape():
            return m.generate_latest()
else:
    import rseq.metrics as m
    def scrape():
        return m.generate_latest()
"""

_HOT = _SETUP + """
seconds = float(sys.argv[3])
c = m.Counter("bench_plain", "c")
labelled = m.Counter("bench_labelled", "l", ["method", "code"])
child = labelled.labels("GET", "200")
h = m.Histogram("bench_seconds", "h")
g = m.Gauge("bench_gauge", "g")
cases = {
    "{}.get(1) [floor]": ("f(1)", {"f": {}.get}),
    "Counter.inc()": ("c.inc()", {"c": c}),
    "child.inc()": ("c.inc()", {"c": child}),
    "labels().inc()": ("c.labels('GET', '200').inc()", {"c": labelled}),
    "Histogram.observe()": ("h.observe(0.3)", {"h": h}),
    "Gauge.set()": ("g.set(1.0)", {"g": g}),
}
timers = {k: timeit.Timer(s, globals=gl) for k, (s, gl) in cases.items()}
numbers = {}
for k, t in timers.items():
    n = 1000
    elapsed = t.timeit(n)
    numbers[k] = max(100, int(n * seconds / max(elapsed, 1e-9)))
samples = {k: [] for k in cases}
for _ in range(3):
    for k, t in timers.items():
        samples[k].append(t.timeit(numbers[k]) / numbers[k] * 1e9)
ns = {k: min(v) for k, v in samples.items()}
# 1,000 series rendered: the scrape of a fresh registry of 1,000 counters.
many = m.Counter("bench_series", "s", ["id"])
for i in range(1000):
    many.labels(str(i)).inc()
times = []
for _ in range(5):
    t0 = time.perf_counter()
    scrape()
    times.append(time.perf_counter() - t0)
print(json.dumps({"ns": ns, "scrape_1000_ms": statistics.median(times) * 1e3}))
"""

_HISTORY = _SETUP + """
checkpoints = [int(x) for x in sys.argv[3].split(",")]
requests = m.Counter("hist_requests", "r", ["route"])
inprogress = m.Gauge("hist_inprogress", "g", ["route"], multiprocess_mode="livesum")
latency = m.Histogram("hist_latency_seconds", "h", ["route"])
size = m.Summary("hist_size_bytes", "s", ["route"])

def workload():
    for i in range(20):
        requests.labels(str(i)).inc()
    for i in range(10):
        inprogress.labels(str(i)).set(i)
    for i in range(5):
        latency.labels(str(i)).observe(0.1 * i)
        size.labels(str(i)).observe(100 * i)

def used_bytes():
    # (bytes on disk or in /dev/shm, bytes in use)
    if config == "prometheus multiprocess":
        total = sum(os.path.getsize(os.path.join(where, f)) for f in os.listdir(where))
        return total, total
    if config == "rseq shared":
        from rseq.metrics import _storage
        st = m.storage()
        u = st.usage()
        used = (u["catalog bytes"][0] + u["words"][0] * 8 * (st.layout.possible_cpus + 1)
                + u["cells"][0] * _storage.CELL_SIZE
                + u["processes"][0] * _storage.PROCESS_SIZE
                + u["exemplars"][0] * _storage.EXEMPLAR_SIZE)
        return os.path.getsize(where), used
    return 0, 0

def scrape_ms():
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        body = scrape()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3, len(body.splitlines())

workload()
out = []
dead = 0
for target in checkpoints:
    while dead < target:
        pid = os.fork()
        if pid == 0:
            try:
                workload()
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        dead += 1
    ms, lines = scrape_ms()
    size, used = used_bytes()
    out.append({"dead": dead, "scrape_ms": ms, "bytes": size, "used": used, "lines": lines})
print(json.dumps(out))
"""


def _run_child(script: str, config: str, *args: str, timeout: float = 600) -> dict | list:
    where = tempfile.mkdtemp(prefix="rseq-bench-metrics-")
    target = os.path.join(where, "metrics") if config == "rseq shared" else where
    try:
        proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script), config, target,
                               *args], capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"{config}: {proc.stderr.strip().splitlines()[-1:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(where, ignore_errors=True)


def _have_prometheus() -> bool:
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        return False
    return True


def bench_metrics(quick: bool = False) -> dict:
    configs = [c for c in CONFIGS if _have_prometheus() or not c.startswith("prometheus")]
    notes = []
    if len(configs) < len(CONFIGS):
        notes.append("prometheus_client not installed (pip install prometheus_client) to "
                     "compare")
    rounds = 3 if quick else 7
    seconds = 0.01 if quick else 0.03
    samples: dict[str, list[float]] = {}
    scrape_1000: dict[str, list[float]] = {}
    for _ in range(rounds):
        for config in configs:
            result = _run_child(_HOT, config, str(seconds))
            for case, value in result["ns"].items():
                label = FLOOR if case == FLOOR else f"{case} [{config}]"
                samples.setdefault(label, []).append(value)
            scrape_1000.setdefault(config, []).append(result["scrape_1000_ms"])
    ns = {label: statistics.median(v) for label, v in samples.items()}
    floor = ns[FLOOR]
    ratios = {label: value / floor for label, value in ns.items()}

    checkpoints = [0, 10, 100] if quick else [0, 10, 100, 1000]
    history: dict[str, list[dict]] = {}
    for config in configs:
        if config in ("rseq shared", "prometheus multiprocess"):
            history[config] = _run_child(_HISTORY, config, ",".join(map(str, checkpoints)))

    limits = {"Counter.inc()": 1.5, "child.inc()": 1.5, "labels().inc()": 5.0,
              "Histogram.observe()": 3.0, "Gauge.set()": 2.0}
    targets = {}
    for case, limit in limits.items():
        ours = ns[f"{case} [rseq shared]"]
        targets[f"{case} within {limit:g}x of {{}}.get(1)"] = {
            "value": ours / floor, "limit": limit, "ok": ours / floor <= limit}
        other = ns.get(f"{case} [prometheus multiprocess]")
        if other is not None:
            targets[f"{case} at least 20x faster than prometheus multiprocess"] = {
                "value": other / ours, "limit": 20.0, "ok": other / ours >= 20.0,
                "higher_is_better": True}
    scrape_ms = {config: statistics.median(v) for config, v in scrape_1000.items()}
    targets["1,000 series rendered in at most 10 ms"] = {
        "value": scrape_ms["rseq shared"], "limit": 10.0,
        "ok": scrape_ms["rseq shared"] <= 10.0, "unit": " ms"}
    ours_history = history["rseq shared"]
    fresh, last = ours_history[0], ours_history[-1]
    growth = last["scrape_ms"] / fresh["scrape_ms"]
    targets[f"scrape after {last['dead']} dead processes at most 1.2x fresh"] = {
        "value": growth, "limit": 1.2, "ok": growth <= 1.2}
    targets[f"shared memory unchanged after {last['dead']} dead processes"] = {
        "value": last["bytes"] / fresh["bytes"], "limit": 1.0,
        "ok": last["bytes"] == fresh["bytes"]}

    lines = ["  scrape of 1,000 series (median ms): " + ", ".join(
        f"{config} {ms:.2f}" for config, ms in scrape_ms.items())]
    lines.append("  scrape after N dead worker processes (each wrote 20 counters, 10 "
                 "livesum gauges, 5 histograms, 5 summaries): median ms; file or "
                 "directory size; bytes in use; lines of exposition")
    for config, points in history.items():
        lines.append(f"    {config}:")
        for p in points:
            lines.append(f"      {p['dead']:>5} dead: {p['scrape_ms']:9.2f} ms, "
                         f"{p['bytes'] / 1e6:7.2f} MB, {p['used'] / 1e3:8.1f} kB in use, "
                         f"{p['lines']} lines")
    notes.append("each configuration runs in its own child interpreter (its library must "
                 "be configured before import); rounds alternate between them")
    return {"title": "metrics: rseq.metrics vs prometheus_client", "unit": "ns/call",
            "rounds": rounds, "ns": ns, "ratio_to_floor": ratios, "floor": FLOOR,
            "targets": targets, "notes": notes, "extra_lines": lines,
            "scrape_1000_ms": scrape_ms, "history": history,
            "curve": {"title": "scrape time against dead worker processes",
                      "xlabel": "dead worker processes", "ylabel": "scrape (ms)",
                      "series": {config: [(p["dead"], p["scrape_ms"]) for p in points]
                                 for config, points in history.items()}}}
