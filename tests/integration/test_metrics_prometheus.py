"""rseq.metrics against the real thing: ``promtool check metrics`` on our
text exposition, and a real Prometheus server (Debian's package, fetched
by tests/helpers/prometheus.py) scraping an application and the exporter
command, with the values it stored compared with what the application
wrote.  These run in the default test run: when Prometheus cannot be
fetched the tests fail, they do not skip."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import textwrap
import time
import urllib.parse
import urllib.request

import pytest

from helpers import prometheus
from helpers.subproc import child_env

APP = """
    import os, sys, time
    from rseq.metrics import (Counter, Enum, Gauge, Histogram, Info, Summary,
                              start_http_server)
    jobs = Counter("jobs", "Jobs done", ["queue"])
    jobs.labels("a").inc(5, exemplar={"trace_id": "abc123"})
    jobs.labels("b").inc(2.5)
    Gauge("temp", "Temperature", unit="celsius", multiprocess_mode="livemax").set(21.5)
    workers = Gauge("workers_busy", "Busy workers", multiprocess_mode="livesum")
    lat = Histogram("lat", "Latency", unit="seconds", buckets=(0.1, 1.0))
    for v in (0.05, 0.5, 0.7, 3):
        lat.observe(v)
    Summary("payload_bytes", "Payload size").observe(1000)
    Info("build", "Build").info({"version": "3.1"})
    Enum("phase", "Phase", states=["starting", "serving"]).state("serving")
    pids = []
    for i in range(3):           # workers that share the file
        pid = os.fork()
        if pid == 0:
            jobs.labels("a").inc()
            workers.inc()
            time.sleep(120)
            os._exit(0)
        pids.append(pid)
    time.sleep(0.3)
    server, thread = start_http_server(0, "127.0.0.1")
    print(server.server_port, flush=True)
    sys.stdin.readline()
    for pid in pids:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
"""

EXPECTED = {
    'jobs_total{queue="a"}': 8.0,
    'jobs_total{queue="b"}': 2.5,
    "temp_celsius": 21.5,
    "workers_busy": 3.0,
    'lat_seconds_bucket{le="0.1"}': 1.0,
    'lat_seconds_bucket{le="1.0"}': 3.0,
    'lat_seconds_bucket{le="+Inf"}': 4.0,
    "lat_seconds_count": 4.0,
    "lat_seconds_sum": 4.25,
    "payload_bytes_count": 1.0,
    "payload_bytes_sum": 1000.0,
    'build_info{version="3.1"}': 1.0,
    'phase{phase="serving"}': 1.0,
    'phase{phase="starting"}': 0.0,
}


@pytest.fixture(scope="module")
def binaries():
    try:
        return prometheus.binaries()
    except (prometheus.Unavailable, OSError, subprocess.SubprocessError) as e:
        pytest.fail(f"cannot get Prometheus for the metrics tests: {e}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def app(tmp_path):
    path = tmp_path / "metrics"
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(APP)],
                            env=child_env({"RSEQ_METRICS": str(path)}), text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        port = int(proc.stdout.readline())
        yield path, port
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_promtool_finds_no_problem(binaries, app):
    path, port = app
    _, promtool = binaries
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read()
    proc = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                          timeout=60)
    assert proc.returncode == 0, (proc.stdout + proc.stderr).decode()
    assert not (proc.stdout + proc.stderr).strip(), (proc.stdout + proc.stderr).decode()


def query(base: str, expr: str) -> list:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as r:
        answer = json.load(r)
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


def series_key(metric: dict) -> str:
    name = metric.pop("__name__")
    metric.pop("instance", None)
    metric.pop("job", None)
    if not metric:
        return name
    return name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(metric.items())) + "}"


def test_real_prometheus_scrapes_app_and_exporter(binaries, app, tmp_path):
    path, app_port = app
    server, _ = binaries
    exporter_port, web_port = free_port(), free_port()
    exporter = subprocess.Popen([sys.executable, "-m", "rseq", "metrics", "serve", str(path),
                                 "--port", str(exporter_port), "--addr", "127.0.0.1",
                                 "--duration", "120"], env=child_env(),
                                stdout=subprocess.PIPE, text=True)
    config = tmp_path / "prometheus.yml"
    config.write_text(textwrap.dedent(f"""
        global:
          scrape_interval: 1s
          scrape_timeout: 1s
        scrape_configs:
          - job_name: app
            static_configs:
              - targets: ["127.0.0.1:{app_port}"]
          - job_name: exporter
            static_configs:
              - targets: ["127.0.0.1:{exporter_port}"]
    """))
    base = f"http://127.0.0.1:{web_port}"
    prom = subprocess.Popen([server, f"--config.file={config}",
                             f"--storage.tsdb.path={tmp_path / 'data'}",
                             f"--web.listen-address=127.0.0.1:{web_port}",
                             "--enable-feature=exemplar-storage", "--log.level=warn"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        exporter.stdout.readline()
        deadline = time.monotonic() + 60
        up: dict = {}
        while time.monotonic() < deadline:
            try:
                up = {r["metric"]["job"]: r["value"][1] for r in query(base, "up")}
            except OSError:
                up = {}
            if up.get("app") == "1" and up.get("exporter") == "1":
                # Both scraped at least once; one more interval so every
                # family of both is in.
                time.sleep(1.5)
                break
            time.sleep(0.3)
        assert up == {"app": "1", "exporter": "1"}, f"targets not up: {up}"
        with urllib.request.urlopen(f"{base}/api/v1/targets", timeout=10) as r:
            targets = json.load(r)["data"]["activeTargets"]
        assert len(targets) == 2
        for target in targets:
            assert target["health"] == "up" and target["lastError"] == "", target
        for job in ("app", "exporter"):
            selector = f'{{job="{job}",__name__=~"jobs_total|temp_celsius|workers_busy|' \
                       f'lat_seconds_(bucket|count|sum)|payload_bytes_(count|sum)|' \
                       f'build_info|phase"}}'
            got = {series_key(r["metric"]): float(r["value"][1])
                   for r in query(base, selector)}
            assert got == EXPECTED, job
        # The exemplar reached Prometheus through OpenMetrics negotiation.
        url = (f"{base}/api/v1/query_exemplars?" + urllib.parse.urlencode(
            {"query": "jobs_total", "start": time.time() - 600, "end": time.time() + 60}))
        with urllib.request.urlopen(url, timeout=10) as r:
            exemplars = json.load(r)
        assert exemplars["status"] == "success"
        found = [(e["labels"], float(e["value"])) for series in exemplars["data"]
                 for e in series["exemplars"]]
        assert ({"trace_id": "abc123"}, 5.0) in found, exemplars
    finally:
        prom.terminate()
        exporter.terminate()
        for p in (prom, exporter):
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    errors = [line for line in prom.stderr.read().splitlines()
              if re.search(r"level=(error|fatal)", line)]
    assert not errors, errors
    assert os.path.exists(path)
