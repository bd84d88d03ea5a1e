"""rseq.metrics across processes, through a shared metrics file: exact
counts under the disturber and 100 ``kill -9``, gauges in all ten modes with
killed processes dropping out, reuse of dead processes' entries, concurrent
declaration, conflicting declarations, a damaged file, capacity
exhaustion, a stuck creation lock, and the read-only exporter command.

Each scenario runs in a fresh interpreter with RSEQ_METRICS set, as a
server's workers would (the test process itself keeps process-local
metrics).
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request

import pytest

from helpers.subproc import child_env

pytest.importorskip("prometheus_client")
from prometheus_client.openmetrics import parser as om_parser
from prometheus_client.parser import text_string_to_metric_families


def run(script: str, path, *, timeout: float = 120, check: bool = True,
        env: dict | None = None) -> subprocess.CompletedProcess:
    extra = {"RSEQ_METRICS": str(path), **(env or {})}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)],
                          env=child_env(extra), capture_output=True, text=True,
                          timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def result(script: str, path, **kwargs):
    return json.loads(run(script, path, **kwargs).stdout.strip().splitlines()[-1])


def show(path, fmt: str = "text") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rseq", "metrics", "show", str(path),
                           "--format", fmt], env=child_env(), capture_output=True,
                          text=True, timeout=60)


def samples(path, fmt: str = "openmetrics") -> dict:
    proc = show(path, fmt)
    assert proc.returncode == 0, proc.stderr
    parse = (om_parser.text_string_to_metric_families if fmt == "openmetrics"
             else text_string_to_metric_families)
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in parse(proc.stdout) for s in family.samples}


# ---------------------------------------------------------------------------
# Exactness
# ---------------------------------------------------------------------------

def test_counts_exact_across_processes_under_the_disturber(tmp_path):
    """4 worker processes on 2 CPUs, migrated and signalled by rseq.testing's
    disturber: counters (plain, labelled, float) and histogram counts exact."""
    path = tmp_path / "metrics"
    out = result("""
        import json, os, signal
        from rseq.metrics import Counter, Histogram, generate_latest, REGISTRY
        from rseq.testing.stress import Disturber
        signal.signal(signal.SIGUSR1, lambda *a: None)
        N, WORKERS = 100000, 4
        c = Counter("ops", "ops")
        labelled = Counter("req", "req", ["worker"])
        floats = Counter("bytes", "bytes")
        h = Histogram("lat", "lat", buckets=(0.5, 1.5))
        disturber = Disturber(storm=True, migrate=True)
        disturber.start()
        pids = []
        try:
            for w in range(WORKERS):
                pid = os.fork()
                if pid == 0:
                    child = labelled.labels(str(w % 2))
                    for i in range(N):
                        c.inc()
                        child.inc()
                        floats.inc(0.5)
                        h.observe(i % 3)
                    os._exit(0)
                pids.append(pid)
                disturber.add_process(pid)
            codes = [os.waitstatus_to_exitcode(os.waitpid(p, 0)[1]) for p in pids]
        finally:
            disturber.stop()
        get = REGISTRY.get_sample_value
        print(json.dumps({"codes": codes, "ops": get("ops_total"),
                          "w0": get("req_total", {"worker": "0"}),
                          "w1": get("req_total", {"worker": "1"}),
                          "bytes": get("bytes_total"), "count": get("lat_count"),
                          "inf": get("lat_bucket", {"le": "+Inf"}),
                          "b05": get("lat_bucket", {"le": "0.5"}),
                          "sum": get("lat_sum")}))
    """, path)
    n, workers = 100000, 4
    assert out["codes"] == [0] * workers
    assert out["ops"] == n * workers
    assert out["w0"] == out["w1"] == n * workers / 2
    assert out["bytes"] == n * workers * 0.5
    assert out["count"] == out["inf"] == n * workers
    assert out["b05"] == sum(1 for i in range(n) if i % 3 == 0) * workers
    assert out["sum"] == sum(i % 3 for i in range(n)) * workers


def test_hundred_kill9_keep_counts_exact_and_the_file_usable(tmp_path):
    """Workers increment a counter and a histogram and create labelled series
    at random instants; 100 of them are SIGKILLed at random: every count is
    what the workers committed, plus at most one per kill, and the file (its
    creation lock included) stays usable."""
    path = tmp_path / "metrics"
    out = result("""
        import json, mmap, os, random, signal, time
        from rseq.metrics import Counter, Histogram, REGISTRY
        KILLS, WORKERS = 100, 3
        done = mmap.mmap(-1, 8 * (KILLS + WORKERS + 1))
        view = memoryview(done).cast("q")
        total = Counter("work", "work")
        h = Histogram("obs", "obs", buckets=(1,))
        keyed = Counter("keyed", "keyed", ["k"])
        rng = random.Random(7)

        def worker(slot):
            local = random.Random(slot)
            committed = 0
            while True:
                if local.random() < 0.02:
                    keyed.labels(str(local.randrange(30))).inc()
                total.inc()
                h.observe(0.5)
                committed += 1
                view[slot] = committed

        running, slot = {}, 0
        def spawn():
            global slot
            pid = os.fork()
            if pid == 0:
                try:
                    worker(slot)
                finally:
                    os._exit(1)
            running[pid] = slot
            slot += 1

        for _ in range(WORKERS):
            spawn()
        start = time.monotonic()
        kills = 0
        while kills < KILLS:
            time.sleep(rng.uniform(0, 0.01))
            pid = rng.choice(list(running))
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            del running[pid]
            kills += 1
            spawn()
        for pid in list(running):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            kills += 1
        committed = sum(view)
        # A killed creator may have held the creation lock: new series must
        # still be created (the lock is taken over from the dead holder).
        t0 = time.monotonic()
        for k in range(40):
            keyed.labels("after-" + str(k)).inc()
        print(json.dumps({"kills": kills, "committed": committed,
                          "work": REGISTRY.get_sample_value("work_total"),
                          "count": REGISTRY.get_sample_value("obs_count"),
                          "create_seconds": time.monotonic() - t0,
                          "seconds": time.monotonic() - start,
                          "dropped": REGISTRY.get_sample_value(
                              "rseq_metrics_dropped_series_total")}))
    """, path, timeout=240)
    kills, committed = out["kills"], out["committed"]
    assert kills == 103
    assert committed <= out["work"] <= committed + kills
    assert committed <= out["count"] <= committed + kills
    assert out["create_seconds"] < 1.0
    assert out["dropped"] == 0
    # The exporter still validates and renders everything.
    values = samples(path)
    assert values[("work_total", ())] == out["work"]
    assert values[("keyed_total", (("k", "after-39"),))] == 1


# ---------------------------------------------------------------------------
# Gauges
# ---------------------------------------------------------------------------

GAUGE_SCRIPT = """
    import json, os, signal, time
    from rseq.metrics import Gauge
    modes = ["all", "liveall", "min", "livemin", "max", "livemax", "sum", "livesum",
             "mostrecent", "livemostrecent"]
    gauges = {m: Gauge("g_" + m, m, multiprocess_mode=m) for m in modes}
    for g in gauges.values():
        g.set(1)                      # the parent: 1
    pids = []
    r, w = os.pipe()
    for value in (5, 10, 3):          # 10 is killed later; 3 is written last, then exits
        pid = os.fork()
        if pid == 0:
            for g in gauges.values():
                g.set(value)
            os.write(w, b"x")
            if value == 3:
                os._exit(0)           # exits normally: dead too
            time.sleep(60)
            os._exit(0)
        os.read(r, 1)
        pids.append(pid)
        time.sleep(0.05)
    os.waitpid(pids[2], 0)
    print(json.dumps({"parent": os.getpid(), "children": pids}), flush=True)
    input()                           # the test scrapes here
    os.kill(pids[1], signal.SIGKILL)
    os.waitpid(pids[1], 0)
    print("killed", flush=True)
    input()
    os.kill(pids[0], signal.SIGKILL)
    os.waitpid(pids[0], 0)
"""


def test_gauge_modes_and_killed_processes(tmp_path):
    path = tmp_path / "metrics"
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(GAUGE_SCRIPT)],
                            env=child_env({"RSEQ_METRICS": str(path)}), text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        info = json.loads(proc.stdout.readline())
        parent = str(info["parent"])
        alive5, alive10, dead3 = (str(p) for p in info["children"])
        before = samples(path)
        assert before[("g_all", (("pid", parent),))] == 1
        assert before[("g_all", (("pid", alive5),))] == 5
        assert before[("g_all", (("pid", dead3),))] == 3          # dead, kept in "all"
        assert before[("g_all", (("pid", alive10),))] == 10
        assert ("g_liveall", (("pid", dead3),)) not in before
        assert before[("g_liveall", (("pid", alive10),))] == 10
        assert before[("g_min", ())] == 1 and before[("g_livemin", ())] == 1
        assert before[("g_max", ())] == 10 and before[("g_livemax", ())] == 10
        assert before[("g_sum", ())] == 19 and before[("g_livesum", ())] == 16
        assert before[("g_mostrecent", ())] == 3 and before[("g_livemostrecent", ())] == 10
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "killed"
        after = samples(path)        # the next scrape: no hook ran anywhere
        assert after[("g_all", (("pid", alive10),))] == 10       # "all" keeps the dead
        assert ("g_liveall", (("pid", alive10),)) not in after
        assert after[("g_livemax", ())] == 5
        assert after[("g_livesum", ())] == 6
        assert after[("g_livemostrecent", ())] == 5
        assert after[("g_max", ())] == 10 and after[("g_sum", ())] == 19
        assert after[("g_mostrecent", ())] == 3
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_dead_entries_are_reused_and_fork_gets_its_own_value(tmp_path):
    """100 short-lived processes set a gauge one after the other: the
    process entries and gauge cells used stay at two (parent and the current
    child), the file does not grow, and a child's gauge starts at zero
    instead of writing into its parent's value."""
    path = tmp_path / "metrics"
    out = result("""
        import json, os
        from rseq.metrics import Gauge, storage
        g = Gauge("churn", "c", ["k"], multiprocess_mode="liveall")
        g.labels("a").set(7)
        size = os.path.getsize(os.environ["RSEQ_METRICS"])
        firsts = []
        for i in range(100):
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:
                child = g.labels("a")
                os.write(w, str(child._get()).encode())
                child.inc(i)
                os._exit(0)
            os.close(w)
            firsts.append(float(os.read(r, 100)))
            os.close(r)
            os.waitpid(pid, 0)
        st = storage()
        print(json.dumps({"usage": st.usage(), "firsts": sorted(set(firsts)),
                          "size": os.path.getsize(os.environ["RSEQ_METRICS"]) - size,
                          "parent": g.labels("a")._get()}))
    """, path)
    assert out["usage"]["processes"][0] == 2
    assert out["usage"]["cells"][0] == 2
    assert out["firsts"] == [0.0]
    assert out["size"] == 0
    assert out["parent"] == 7


# ---------------------------------------------------------------------------
# Declarations
# ---------------------------------------------------------------------------

def test_concurrent_declaration_yields_one_family(tmp_path):
    path = tmp_path / "metrics"
    out = result("""
        import json, os, time
        from rseq.metrics import Counter, Histogram, Gauge, storage
        start = time.time() + 0.3
        pids = []
        for w in range(8):
            pid = os.fork()
            if pid == 0:
                time.sleep(max(0, start - time.time()))
                for n in range(5):
                    Counter(f"c{n}", "c", ["a"]).labels("x").inc()
                    Histogram(f"h{n}", "h", buckets=(1, 2)).observe(1)
                    Gauge(f"g{n}", "g", ["a"]).labels("x").set(1)
                os._exit(0)
            pids.append(pid)
        codes = [os.waitstatus_to_exitcode(os.waitpid(p, 0)[1]) for p in pids]
        st = storage()
        st.refresh()
        names = [f.name for f in st.families_by_id.values()]
        series = [(s.family.name, s.values) for s in st.series_by_id.values()]
        print(json.dumps({"codes": codes, "names": names, "series": len(series),
                          "distinct": len(set(series))}))
    """, path)
    assert out["codes"] == [0] * 8
    assert sorted(out["names"]) == sorted(f"{k}{n}" for k in "chg" for n in range(5))
    assert out["series"] == out["distinct"] == 15
    values = samples(path)
    assert values[("c0_total", (("a", "x"),))] == 8
    assert values[("h4_count", ())] == 8


def test_conflicting_declaration_in_another_process(tmp_path):
    path = tmp_path / "metrics"
    run("""
        from rseq.metrics import Counter, Histogram
        Counter("shared_name", "x", ["a"])
        Histogram("lat", "x", buckets=(1, 2))
    """, path)
    proc = run("""
        from rseq.metrics import Gauge
        Gauge("shared_name", "x", ["a"])
    """, path, check=False)
    assert proc.returncode != 0
    assert re.search(r"ValueError: metric 'shared_name' is already declared in metrics file "
                     r".* with type 'counter' \(not 'gauge'\)", proc.stderr), proc.stderr
    proc = run("""
        from rseq.metrics import Histogram
        Histogram("lat", "x", buckets=(1, 5))
    """, path, check=False)
    assert "buckets (1.0, 2.0, inf) (not (1.0, 5.0, inf))" in proc.stderr


# ---------------------------------------------------------------------------
# Damage, capacity, a stuck lock
# ---------------------------------------------------------------------------

def test_damaged_file_is_refused_with_a_clear_error(tmp_path):
    path = tmp_path / "metrics"
    run('from rseq.metrics import Counter; Counter("x", "x").inc()', path)
    data = bytearray(path.read_bytes())
    damaged = tmp_path / "damaged-header"
    flipped = bytearray(data)
    flipped[20] ^= 0x40
    damaged.write_bytes(bytes(flipped))
    damaged.chmod(0o600)
    proc = show(damaged)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "checksum mismatch" in proc.stderr
    # A damaged catalog record: its length points past the published end.
    catalog = 4096
    flipped = bytearray(data)
    flipped[catalog:catalog + 4] = (10**6).to_bytes(4, "little")
    damaged = tmp_path / "damaged-catalog"
    damaged.write_bytes(bytes(flipped))
    damaged.chmod(0o600)
    proc = show(damaged)
    assert proc.returncode == 2
    assert "catalog record at 0 is damaged (record length 1000000)" in proc.stderr
    # Not a metrics file at all.
    other = tmp_path / "other"
    other.write_bytes(b"hello" * 1000)
    other.chmod(0o600)
    proc = show(other)
    assert proc.returncode == 2 and "not an rseq metrics file" in proc.stderr
    # Writable by others: refused before anything is read.
    loose = tmp_path / "loose"
    loose.write_bytes(bytes(data))
    loose.chmod(0o666)
    proc = show(loose)
    assert proc.returncode == 2 and "writable by every user" in proc.stderr


def test_capacity_exhaustion_never_breaks_the_application(tmp_path):
    """A tiny file: series past its capacity still work in the process (kept
    in private memory), are not exported, and the loss is a metric."""
    path = tmp_path / "metrics"
    out = result("""
        import json
        import rseq.metrics as m
        m.configure(words=64, cells=4, exemplars=1, processes=2, catalog_size=4096)
        c = m.Counter("req", "r", ["id"])
        g = m.Gauge("g", "g", ["id"])
        h = m.Histogram("h", "h", ["id"], buckets=(1, 2))
        for i in range(3000):
            child = c.labels(str(i))
            child.inc(2)
            child.inc(1, exemplar={"t": str(i)})
            g.labels(str(i)).set(i)
            assert g.labels(str(i))._get() == i
            h.labels(str(i)).observe(1.5, exemplar={"t": "x"})
            assert child._get() == 3.0
        # Declarations past the catalog's room: the metrics work, unexported.
        more = [m.Counter(f"late_{i}", "x" * 200, ["a"]) for i in range(40)]
        for late in more:
            late.labels("1").inc()
            assert late.labels("1")._get() == 1
        e = m.Enum("late_enum", "x" * 500, states=["a", "b"])
        e.state("b")
        i = m.Info("late_info", "x" * 500)
        i.info({"v": "1"})
        text = m.generate_latest().decode()
        print(json.dumps({"dropped": m.REGISTRY.get_sample_value(
                              "rseq_metrics_dropped_series_total"),
                          "late": "late_39" in text,
                          "exported": sum(1 for mf in m.REGISTRY.collect() if mf.name == "req"
                                          for s in mf.samples if s.name == "req_total")}))
    """, path)
    assert out["dropped"] > 3000
    assert 1 <= out["exported"] < 100
    assert not out["late"]
    values = samples(path)
    assert values[("rseq_metrics_dropped_series_total", ())] == out["dropped"]


def test_creation_lock_held_by_a_stopped_process(tmp_path):
    """A process stopped while holding the creation lock delays creators by
    at most the lock timeout; the series is then dropped, never waited on."""
    path = tmp_path / "metrics"
    out = result("""
        import json, os, signal, time
        import rseq.metrics as m
        from rseq.metrics import _storage
        c = m.Counter("req", "r", ["id"])
        c.labels("before").inc()
        st = m.storage()
        pid = os.fork()
        if pid == 0:
            with st.locked():
                os.kill(os.getpid(), signal.SIGSTOP)
            os._exit(0)
        while st.map.load(_storage.LOCK) == 0:
            time.sleep(0.001)
        t0 = time.monotonic()
        child = c.labels("during")
        child.inc()
        waited = time.monotonic() - t0
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        after = c.labels("after")      # the dead holder's lock is taken over
        after.inc()
        print(json.dumps({"waited": waited, "dropped": st.dropped(),
                          "after": m.REGISTRY.get_sample_value("req_total", {"id": "after"})}))
    """, path)
    assert 1.5 < out["waited"] < 5
    assert out["dropped"] == 1
    assert out["after"] == 1


# ---------------------------------------------------------------------------
# The exporter
# ---------------------------------------------------------------------------

def test_exporter_serves_a_file_it_never_declared(tmp_path):
    path = tmp_path / "metrics"
    run("""
        from rseq.metrics import Counter, Gauge, Histogram, Info, Enum, Summary
        Counter("jobs", "Jobs done", ["queue"]).labels("q1").inc(5, exemplar={"id": "7"})
        Gauge("temp", "Temperature", unit="celsius", multiprocess_mode="max").set(21.5)
        Histogram("lat", "Latency", unit="seconds", buckets=(0.1, 1)).observe(0.3)
        Summary("size", "Size").observe(100)
        Info("build", "Build").info({"version": "3"})
        Enum("phase", "Phase", states=["a", "b"]).state("b")
    """, path)
    text = show(path, "openmetrics").stdout
    assert "# UNIT temp_celsius celsius" in text and '# {id="7"} 5.0' in text
    families = {f.name: f for f in om_parser.text_string_to_metric_families(text)}
    assert families["jobs"].samples[0].value == 5
    assert families["build"].type == "info" and families["phase"].type == "stateset"
    proc = subprocess.Popen([sys.executable, "-m", "rseq", "metrics", "serve", str(path),
                             "--port", "0", "--addr", "127.0.0.1", "--duration", "60"],
                            env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        line = proc.stdout.readline()
        url = re.search(r"(http://\S+)", line).group(1)
        req = urllib.request.Request(url, headers={"Accept": "application/openmetrics-text"})
        with urllib.request.urlopen(req, timeout=10) as r:
            body = r.read().decode()
        assert body.endswith("# EOF\n") and "temp_celsius 21.5" in body
        with urllib.request.urlopen(url, timeout=10) as r:
            assert "jobs_total{queue=\"q1\"} 5.0" in r.read().decode()
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_exporter_errors_are_one_line(tmp_path):
    proc = show(tmp_path / "missing")
    assert proc.returncode == 2
    assert proc.stderr == f"python -m rseq metrics show: error: no metrics file " \
                          f"'{tmp_path / 'missing'}'\n"
    link = tmp_path / "link"
    os.symlink("/etc/passwd", link)
    proc = show(link)
    assert proc.returncode == 2 and "symbolic link" in proc.stderr


def test_readonly_file_for_an_exporter_of_another_mode(tmp_path):
    """A read-only opening can render but never write."""
    path = tmp_path / "metrics"
    run('from rseq.metrics import Counter; Counter("ro", "x").inc()', path)
    out = result("""
        import json, os
        from rseq.metrics import Storage, StorageCollector
        st = Storage.open(os.environ["RSEQ_METRICS"], readonly=True)
        families = list(StorageCollector(st).collect())
        try:
            st.map.store(2048, 1)
            wrote = True
        except PermissionError:
            wrote = False
        print(json.dumps({"value": families[0].samples[0].value, "wrote": wrote}))
    """, path)
    assert out == {"value": 1.0, "wrote": False}
    time.sleep(0)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the exporter as nobody")
def test_exporter_as_another_user(request):
    """The application (root here) makes its metrics file 0644; the exporter
    command, run as nobody, renders it read-only."""
    name = f"rseq-metrics-test-{os.getpid()}"
    path = f"/dev/shm/{name}"
    request.addfinalizer(lambda: os.path.exists(path) and os.unlink(path))
    run('from rseq.metrics import Counter; Counter("other_user", "x").inc(7)', name)
    os.chmod(path, 0o644)

    # Everything imported first: nobody may not read this interpreter's
    # standard library (under /root here).
    import rseq.metrics._cli  # noqa: F401
    from rseq._cli import build_parser, main
    build_parser()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            sys.stdout = sys.stderr = os.fdopen(write_end, "w")
            code = main(["metrics", "show", name])
            sys.stdout.flush()
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end) as f:
        out = f.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, out
    assert "other_user_total 7.0" in out
