"""A real gunicorn server (from PyPI) with rseq.metrics and nothing but
RSEQ_METRICS configured: 4 sync workers on this 2-CPU machine, preloaded
(metrics are created in the arbiter, workers are forked), ``max_requests``
low enough that workers are replaced many times, and a bounded request loop
that also SIGKILLs workers, idle and in the middle of a request.

What is checked:
- the scraped request counter equals the server-side count exactly.  The
  server-side count is defined so that a killed request cannot fool it: a
  handler counts a request only after its slow part, and the test kills a
  worker only while its request is inside that slow part (the handler
  reports its pid there), so a killed request is never counted and every
  answered request is;
- the live gauges of a killed worker (``liveall``, ``livesum``) are gone at
  the next scrape, with no hook in gunicorn's configuration;
- afterwards no file per worker exists: the temporary directory holds the
  one metrics file, /dev/shm gained nothing named after a worker, and live
  workers map no shared file but the metrics file.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request

import pytest

from helpers.subproc import child_env
from rseq import _procid

pytest.importorskip("gunicorn")
from prometheus_client.parser import text_string_to_metric_families

APP = '''
import os, time
from rseq.metrics import Counter, Gauge, generate_latest, CONTENT_TYPE_LATEST

REQUESTS = Counter("app_requests", "Requests counted by the server", ["path"])
INPROGRESS = Gauge("app_inprogress", "Requests in progress", multiprocess_mode="livesum")
UP = Gauge("app_worker_up", "Workers alive", multiprocess_mode="liveall")
INFLIGHT = os.environ["TEST_INFLIGHT"]


def app(environ, start_response):
    path = environ["PATH_INFO"]
    if path == "/metrics":
        body = generate_latest()
        start_response("200 OK", [("Content-Type", CONTENT_TYPE_LATEST)])
        return [body]
    UP.set(1)
    with INPROGRESS.track_inprogress():
        if path == "/slow":
            with open(INFLIGHT, "a") as f:
                f.write(f"{os.getpid()}\\n")
            time.sleep(1.0)          # killed here: before the count
        REQUESTS.labels(path).inc()
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [str(os.getpid()).encode()]
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, timeout: float = 10) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def scrape(base: str) -> dict:
    out = {}
    for family in text_string_to_metric_families(get(base + "/metrics")):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def shm_entries() -> set[str]:
    return set(os.listdir("/dev/shm"))


def test_gunicorn_workers_killed_and_replaced(tmp_path):
    (tmp_path / "app.py").write_text(textwrap.dedent(APP))
    metrics_file = tmp_path / "metrics"
    inflight = tmp_path / "inflight"
    inflight.write_text("")
    work_tmp = tmp_path / "tmp"
    work_tmp.mkdir()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    before_shm = shm_entries()
    env = child_env({"RSEQ_METRICS": str(metrics_file), "TEST_INFLIGHT": str(inflight),
                     "TMPDIR": str(work_tmp), "PYTHONPATH": str(tmp_path) + os.pathsep
                     + child_env()["PYTHONPATH"]})
    server = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "--workers", "4", "--bind", f"127.0.0.1:{port}",
         "--max-requests", "25", "--max-requests-jitter", "5", "--preload",
         "--graceful-timeout", "5", "--timeout", "30", "--log-level", "warning",
         "--worker-tmp-dir", str(work_tmp), "app:app"],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen_pids: set[int] = set()
    killed: dict[int, int | None] = {}     # pid -> its start time
    answered = {"/work": 0, "/slow": 0}
    killed_in_flight = 0
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                get(base + "/metrics", timeout=2)
                break
            except (urllib.error.URLError, ConnectionError):
                assert time.monotonic() < deadline, "gunicorn did not start"
                time.sleep(0.1)
        start = time.monotonic()
        for round_ in range(12):
            # A burst of fast requests: workers pass max_requests and are replaced.
            for _ in range(40):
                try:
                    seen_pids.add(int(get(base + "/work")))
                    answered["/work"] += 1
                except (urllib.error.URLError, ConnectionError):
                    pass   # the worker died under it: not counted (see above)
            # An idle worker killed with SIGKILL.
            victim = max(seen_pids - set(killed))
            started = _procid.start_time(victim)
            try:
                os.kill(victim, signal.SIGKILL)
                killed[victim] = started
            except ProcessLookupError:
                pass       # already replaced after max_requests
            # A worker killed in the middle of a request.
            inflight.write_text("")
            outcome: dict = {}

            def slow(outcome=outcome):
                try:
                    outcome["pid"] = int(get(base + "/slow"))
                except (urllib.error.URLError, ConnectionError, OSError) as e:
                    outcome["error"] = e
            t = threading.Thread(target=slow)
            t.start()
            pid = None
            while pid is None and t.is_alive():
                text = inflight.read_text().split()
                pid = int(text[0]) if text else None
                time.sleep(0.005)
            if pid is not None and round_ % 2 == 0:
                started = _procid.start_time(pid)
                os.kill(pid, signal.SIGKILL)
                killed[pid] = started
                killed_in_flight += 1
            t.join(timeout=30)
            if "pid" in outcome:
                answered["/slow"] += 1
            else:
                assert pid is not None and round_ % 2 == 0, outcome
            # The next scrape: the killed workers' live gauges are gone.
            values = scrape(base)
            up_pids = {int(dict(labels)["pid"]) for (name, labels) in values
                       if name == "app_worker_up"}
            # pid_max may be small (32768 here) and the machine busy: a killed
            # worker's pid may already belong to a new worker.  Identities
            # are (pid, start time), as in the metrics file.
            stale = {p for p in up_pids & set(killed)
                     if _procid.start_time(p) in (None, killed[p])}
            assert not stale, (up_pids, killed)
            assert values[("app_inprogress", ())] == 0, values
        elapsed = time.monotonic() - start
        values = scrape(base)
        assert values[("app_requests_total", (("path", "/work"),))] == answered["/work"]
        assert values.get(("app_requests_total", (("path", "/slow"),)), 0) == answered["/slow"]
        assert killed_in_flight == 6
        # Workers came and went: more than 4 pids answered (replaced by
        # max_requests and by the kills).
        assert len(seen_pids) >= 12, seen_pids
        # No file per worker anywhere: the temporary directory (TMPDIR and
        # gunicorn's worker tmp dir) holds nothing left behind ...
        assert sorted(os.listdir(work_tmp)) == []
        assert sorted(p.name for p in tmp_path.iterdir() if p.name != "__pycache__") == \
            ["app.py", "inflight", "metrics", "tmp"]
        # ... /dev/shm gained nothing named after a worker ...
        new = shm_entries() - before_shm
        assert not [n for n in new if any(str(p) in n for p in seen_pids)], new
        # ... and live workers map no writable shared file but the metrics
        # file (compared by inode: the arbiter mapped it before publishing
        # it under its name, so maps may show the temporary name).
        inode = os.stat(metrics_file).st_ino
        for pid in seen_pids - set(killed):
            try:
                with open(f"/proc/{pid}/maps") as f:
                    maps = f.read()
            except OSError:
                continue
            shared = {(fields[4], fields[5]) for fields in
                      (line.split(None, 5) for line in maps.splitlines())
                      if len(fields) == 6 and fields[1].startswith("rw") and fields[1][3] == "s"}
            assert {int(ino) for ino, _ in shared} <= {inode}, shared
        assert elapsed < 60
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    stderr = server.stderr.read()
    assert "Traceback" not in stderr, stderr
    assert not re.search(r"\[ERROR\](?! Worker \(pid:\d+\) was sent SIGKILL)", stderr), stderr
