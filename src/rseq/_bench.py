"""Side-by-side benchmarks: ``python -m rseq bench``.

Every figure is measured in the same run as the figures it is compared
with, interleaved round by round so that machine noise hits all of them
alike; the report gives medians and ratios.  Figures are ns per call
including the timeit loop (the same loop for every entry, which is why the
call floor is measured, not assumed).
"""
from __future__ import annotations

import _thread
import ctypes
import importlib.util
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import timeit
from collections.abc import Callable

from . import _core
from ._cli import UsageError


def _timer(case) -> timeit.Timer:
    """A case is a callable timed as ``f()``, or ``(f, "f(1)")``: the callable
    is called directly (a bound method, a builtin), never through a wrapper
    that would add a Python frame to every figure."""
    fn, stmt = case if isinstance(case, tuple) else (case, "f()")
    if isinstance(fn, dict):  # (names, statement): several callables in one statement
        return timeit.Timer(stmt, globals=dict(fn))
    return timeit.Timer(stmt, globals={"f": fn})


def measure(cases: dict, *, rounds: int, seconds_per_sample: float = 0.02) -> dict[str, float]:
    """Median ns per call of each case over ``rounds`` interleaved rounds."""
    timers = {name: _timer(case) for name, case in cases.items()}
    numbers = {}
    for name, t in timers.items():
        # Calibrate so that one sample lasts about seconds_per_sample.
        n, elapsed = t.autorange()
        numbers[name] = max(1, int(n * seconds_per_sample / max(elapsed, 1e-9)))
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, t in timers.items():
            samples[name].append(t.timeit(numbers[name]) / numbers[name] * 1e9)
    return {name: statistics.median(v) for name, v in samples.items()}


def _ctypes_sched_getcpu() -> Callable[[], int]:
    libc = ctypes.CDLL(None, use_errno=True)
    fn = libc.sched_getcpu
    fn.restype = ctypes.c_int
    fn.argtypes = []
    return fn


def _psutil_cpu_num() -> Callable[[], int] | None:
    try:
        import psutil
    except ImportError:
        return None
    process = psutil.Process()
    if not hasattr(process, "cpu_num"):
        return None
    return process.cpu_num


def bench_reads(quick: bool = False) -> dict:
    """rseq.cpu() beside the call floor and what a user would otherwise use."""
    cases: dict[str, Callable[[], object]] = {
        "_thread.get_ident() [floor]": _thread.get_ident,
        "rseq.cpu()": _core.cpu,
        "rseq.node()": _core.node,
        "ctypes sched_getcpu()": _ctypes_sched_getcpu(),
    }
    psutil_fn = _psutil_cpu_num()
    if psutil_fn is not None:
        cases["psutil.Process().cpu_num()"] = psutil_fn
    rounds = 5 if quick else 15
    ns = measure(cases, rounds=rounds, seconds_per_sample=0.01 if quick else 0.03)
    floor = ns["_thread.get_ident() [floor]"]
    cpu = ns["rseq.cpu()"]
    ratios = {name: value / floor for name, value in ns.items()}
    targets = {
        "rseq.cpu() within 1.1x of _thread.get_ident()": {
            "value": cpu / floor, "limit": 1.1, "ok": cpu / floor <= 1.1},
    }
    if psutil_fn is not None:
        speedup = ns["psutil.Process().cpu_num()"] / cpu
        targets["rseq.cpu() at least 100x faster than psutil"] = {
            "value": speedup, "limit": 100.0, "ok": speedup >= 100.0}
    return {"title": "current CPU lookup", "unit": "ns/call", "rounds": rounds,
            "ns": ns, "ratio_to_floor": ratios, "floor": "_thread.get_ident() [floor]",
            "targets": targets,
            "notes": [] if psutil_fn else ["psutil not installed: pip install psutil to compare"]}


# ---------------------------------------------------------------------------
# Counters
# ---------------------------------------------------------------------------

_PROMETHEUS_PROBE = r"""
import json, os, sys, tempfile, timeit, statistics
os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="rseq-bench-prom-")
import prometheus_client
counter = prometheus_client.Counter("rseq_bench_total", "benchmark")
inc = counter.inc
timer = timeit.Timer("f(1)", globals={"f": inc})
n, elapsed = timer.autorange()
n = max(1, int(n * float(sys.argv[1]) / max(elapsed, 1e-9)))
print(json.dumps([timer.timeit(n) / n * 1e9 for _ in range(int(sys.argv[2]))]))
"""


def _prometheus_multiprocess_inc(rounds: int, seconds: float) -> float | None:
    """prometheus_client's multiprocess Counter.inc(), which must be set up
    before the package is imported: measured in a child of this run."""
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        return None
    proc = subprocess.run([sys.executable, "-c", _PROMETHEUS_PROBE, str(seconds), str(rounds)],
                          capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        return None
    return statistics.median(json.loads(proc.stdout))


def _throughput_worker(path: str, seconds: float, start, results, slot: int,
                       reference: bool):
    from ._arena import Arena
    arena = Arena.open(path)
    add = {}.get if reference else arena.counter("throughput").add
    start.wait()
    deadline = time.perf_counter() + seconds
    n = 0
    while time.perf_counter() < deadline:
        for _ in range(1000):
            add(1)
        n += 1000
    results[slot] = n


def _scaling_rounds(measure: Callable[..., tuple[float, bool]], name: str, unit: str,
                    rounds: int, seconds: float) -> dict:
    """Rates of 1 and 2 worker processes of ``measure`` (``measure(n,
    seconds, reference=...)`` -> (rate, exact)), alternating round by round;
    medians, their ratio, and whether every round's total was exact.  Beside
    it, the same for workers that share nothing at all ({}.get(1)): how far 2
    processes scale on this machine at best, measured in the same run."""
    samples: dict[tuple[str, int], list[float]] = {}
    exact = True
    for _ in range(rounds):
        for kind in (name, "reference"):
            for n in (1, 2):
                rate, ok = measure(n, seconds, reference=kind == "reference")
                samples.setdefault((kind, n), []).append(rate)
                exact &= ok
    med = {key: statistics.median(v) for key, v in samples.items()}
    return {f"1 process ({unit})": med[name, 1], f"2 processes ({unit})": med[name, 2],
            "ratio": med[name, 2] / med[name, 1],
            "reference ratio": med["reference", 2] / med["reference", 1],
            "exact": exact, "rounds": rounds}


def arena_throughput_rounds(rounds: int, seconds: float) -> dict:
    """Adds per second of 1 and 2 processes on one arena counter (see
    _scaling_rounds)."""
    return _scaling_rounds(arena_throughput, "arena", "adds/s", rounds, seconds)


def _run_workers(ctx, target, path: str, processes: int, seconds: float,
                 reference: bool) -> int:
    """Start `processes` workers `target(path, seconds, start, results, i,
    reference)`, release them together, wait for them: the sum of what each
    put in its results slot."""
    start = ctx.Event()
    results = ctx.Array("q", processes)
    procs = [ctx.Process(target=target, args=(path, seconds, start, results, i, reference))
             for i in range(processes)]
    for p in procs:
        p.start()
    time.sleep(0.2)
    start.set()
    for p in procs:
        p.join()
    return sum(results)


def arena_throughput(processes: int, seconds: float,
                     reference: bool = False) -> tuple[float, bool]:
    """(adds per second, exact) of `processes` workers on one arena counter
    (with `reference`, calls of {}.get(1) instead, which share nothing)."""
    from ._arena import Arena
    ctx = multiprocessing.get_context("fork")
    with tempfile.TemporaryDirectory(prefix="rseq-bench-") as tmp:
        path = os.path.join(tmp, "arena")
        with Arena.create(path, capacity=4) as arena:
            counter = arena.counter("throughput")
            total = _run_workers(ctx, _throughput_worker, path, processes, seconds, reference)
            return total / seconds, reference or counter.value() == total


def bench_counters(quick: bool = False) -> dict:
    """counter.add(1) beside the call floor and what a user would otherwise use."""
    from ._arena import Arena

    local = _core.PerCpuCounter()
    lock = threading.Lock()
    box = [0]

    def locked_int_add(n=1):
        with lock:
            box[0] += n

    value = multiprocessing.Value("q", 0)

    def mp_value_add(n=1):
        with value.get_lock():
            value.value += n

    cases: dict[str, Callable[[], object]] = {}
    floor_get = {}.get
    rounds = 5 if quick else 15
    seconds = 0.01 if quick else 0.03
    notes = []
    with (tempfile.TemporaryDirectory(prefix="rseq-bench-") as tmp,
          Arena.create(os.path.join(tmp, "arena"), capacity=4) as arena):
        shared = arena.counter("bench")
        # Each is called as a user would, with one argument where it takes
        # one; the lock-based ones are the smallest function a user would
        # write around them.
        cases = {
            "{}.get(1) [floor]": (floor_get, "f(1)"),
            "PerCpuCounter.add(1)": (local.add, "f(1)"),
            "ArenaCounter.add(1)": (shared.add, "f(1)"),
            "threading.Lock + int": (locked_int_add, "f(1)"),
            "multiprocessing.Value + lock": (mp_value_add, "f(1)"),
        }
        try:
            import atomics
            atomic = atomics.atomic(width=8, atype=atomics.INT)
            cases["atomics.INT.inc()"] = atomic.inc
        except ImportError:
            notes.append("atomics not installed (pip install atomics) to compare")
        ns = measure(cases, rounds=rounds, seconds_per_sample=seconds)
    prom = _prometheus_multiprocess_inc(rounds, seconds)
    if prom is None:
        notes.append("prometheus_client not installed (pip install prometheus_client) to compare")
    else:
        ns["prometheus multiprocess Counter.inc()"] = prom
        notes.append("prometheus_client measured in a child process (its multiprocess mode "
                     "must be configured before import)")
    floor = ns["{}.get(1) [floor]"]
    ratios = {name: v / floor for name, v in ns.items()}

    throughput = arena_throughput_rounds(3 if quick else 7, 0.3 if quick else 0.6)
    iterations = 2_000_000 if quick else 20_000_000
    c_level = {}
    for label, kind, threads in (("rseq add, 1 thread", "rseq_add", 1),
                                 ("atomic fetch-add, 1 thread", "atomic_add", 1),
                                 ("rseq add, 2 threads (per CPU)", "rseq_add", 2),
                                 ("atomic fetch-add, 2 threads (one word)", "atomic_add", 2),
                                 ("cpu_id read", "cpu_read", 1)):
        c_level[label] = statistics.median(
            _core._bench_c(kind, threads, iterations) for _ in range(3 if quick else 7))

    add = ns["PerCpuCounter.add(1)"]
    targets = {
        "PerCpuCounter.add(1) within 1.25x of {}.get(1)": {
            "value": add / floor, "limit": 1.25, "ok": add / floor <= 1.25},
        "ArenaCounter.add(1) within 1.25x of {}.get(1)": {
            "value": ns["ArenaCounter.add(1)"] / floor, "limit": 1.25,
            "ok": ns["ArenaCounter.add(1)"] / floor <= 1.25},
        "at least 20x faster than multiprocessing.Value": {
            "value": ns["multiprocessing.Value + lock"] / add, "limit": 20.0,
            "ok": ns["multiprocessing.Value + lock"] / add >= 20.0, "higher_is_better": True},
        "2 processes at least 1.9x the throughput of 1": {
            "value": throughput["ratio"], "limit": 1.9, "ok": throughput["ratio"] >= 1.9,
            "higher_is_better": True},
        "C-level add at or under 1.5 ns (2 threads)": {
            "value": c_level["rseq add, 2 threads (per CPU)"], "limit": 1.5,
            "ok": c_level["rseq add, 2 threads (per CPU)"] <= 1.5, "unit": "ns"},
    }
    return {"title": "counters: add(1)", "unit": "ns/call", "rounds": rounds, "ns": ns,
            "ratio_to_floor": ratios, "floor": "{}.get(1) [floor]",
            "throughput": throughput,
            "c_level_ns": c_level, "targets": targets, "notes": notes}


# ---------------------------------------------------------------------------
# Pool
# ---------------------------------------------------------------------------

_STRACE_LOOP = r"""
import os, sys
import rseq
pool = rseq.Pool.create(sys.argv[1], block_size=4096, block_count=64)
rseq.Pool.unlink(pool.path)
alloc, free = pool.alloc_index, pool.free
for _ in range(1000):   # warm up: caches filled, identity computed
    free(alloc())
for _ in range(int(sys.argv[2])):
    free(alloc())
"""


def pool_syscalls(pairs: int = 1_000_000) -> dict | None:
    """System calls of ``pairs`` alloc_index() + free() pairs in steady
    state: ``strace -c -f`` of the same script with 0 and with ``pairs``
    pairs; the difference is what the loop costs.  None without strace."""
    import shutil
    strace = shutil.which("strace")
    if strace is None:
        return None
    totals = {}
    with tempfile.TemporaryDirectory(prefix="rseq-bench-") as tmp:
        for n in (0, pairs):
            out = os.path.join(tmp, f"strace-{n}")
            proc = subprocess.run([strace, "-c", "-f", "-o", out, sys.executable, "-c",
                                   _STRACE_LOOP, os.path.join(tmp, f"pool-{n}"), str(n)],
                                  capture_output=True, text=True, timeout=300)
            if proc.returncode != 0:
                return None
            with open(out) as report:
                lines = [line.split() for line in report if line.strip().endswith("total")]
            if not lines:
                return None
            totals[n] = int(lines[-1][3 if len(lines[-1]) >= 5 else 2])
    return {"pairs": pairs, "syscalls without the loop": totals[0],
            "syscalls with the loop": totals[pairs],
            "syscalls per pair": (totals[pairs] - totals[0]) / pairs,
            "command": "strace -c -f python -c '<loop of alloc_index()+free()>'"}


def bench_pool(quick: bool = False) -> dict:
    """rseq.Pool alloc + free beside the call floor, bytearray, numpy and
    multiprocessing.shared_memory; C-level pairs beside malloc/free; and the
    system calls of the steady state."""
    from multiprocessing import shared_memory

    from ._pool import Pool

    rounds = 5 if quick else 15
    seconds = 0.01 if quick else 0.03
    notes = []
    with tempfile.TemporaryDirectory(prefix="rseq-bench-") as tmp, \
            Pool.create(os.path.join(tmp, "pool"), block_size=4096, block_count=256) as pool:
        def shm_create_close_unlink():
            shm = shared_memory.SharedMemory(create=True, size=4096)
            shm.close()
            shm.unlink()

        pair = {"a": pool.alloc_index, "f": pool.free}
        with_view = {"a": pool.alloc, "f": pool.free, "m": memoryview}
        cases: dict = {
            "{}.get(1) [floor]": ({}.get, "f(1)"),
            "pool.alloc_index() + pool.free(i)": (pair, "f(a())"),
            # The block's memoryview as the API hands it out (block.view and
            # `with` return one), and through memoryview(block), whose
            # argument parsing and managed buffer cost more in CPython than
            # the pool does: reported beside memoryview(bytearray(64)).
            "pool.alloc() + block.view + free": (with_view, "b = a(); v = b.view; f(b)"),
            "pool.alloc() + memoryview(block) + free": (with_view,
                                                        "b = a(); v = m(b); f(b)"),
            "with pool.alloc() as mv: (frees)": ({"a": pool.alloc},
                                                 "with a() as mv: pass"),
            "memoryview(bytearray(64)) [the view alone]": ({"m": memoryview,
                                                            "b": bytearray(64)}, "v = m(b)"),
            "bytearray(64)": ({"f": bytearray}, "f(64)"),
            "bytearray(4096)": ({"f": bytearray}, "f(4096)"),
            "SharedMemory(4096) + close + unlink": shm_create_close_unlink,
        }
        try:
            import numpy
            cases["pool.alloc() + numpy.frombuffer + free"] = (
                {"a": pool.alloc, "f": pool.free, "fb": numpy.frombuffer,
                 "d": numpy.float64}, "b = a(); x = fb(b, d); del x; f(b)")
            cases["numpy.empty(512) (4096 bytes)"] = ({"f": numpy.empty}, "f(512)")
        except ImportError:
            notes.append("numpy not installed (pip install numpy) to compare")
        ns = measure(cases, rounds=rounds, seconds_per_sample=seconds)
        iterations = 1_000_000 if quick else 10_000_000
        c_level = {
            "rseq.Pool alloc + free (by index)": statistics.median(
                pool._map._bench_pairs("pool", iterations) for _ in range(3 if quick else 7)),
            "malloc(4096) + free": statistics.median(
                pool._map._bench_pairs("malloc", iterations)
                for _ in range(3 if quick else 7)),
        }
    notes.append("librseq's mempool is not built here (it is process-private memory "
                 "anyway): the C reference is glibc malloc/free")
    syscalls = None if quick else pool_syscalls()
    if syscalls is None and not quick:
        notes.append("strace not found: the system-call count was not measured")
    floor = ns["{}.get(1) [floor]"]
    ratios = {name: v / floor for name, v in ns.items()}
    pair_ns = ns["pool.alloc_index() + pool.free(i)"]
    view_ns = ns["pool.alloc() + block.view + free"]
    shm_ns = ns["SharedMemory(4096) + close + unlink"]
    targets = {
        "alloc_index() + free() at most 2x {}.get(1)": {
            "value": pair_ns / floor, "limit": 2.0, "ok": pair_ns / floor <= 2.0},
        "alloc() + block.view + free at most bytearray(4096)": {
            "value": view_ns / ns["bytearray(4096)"], "limit": 1.0,
            "ok": view_ns <= ns["bytearray(4096)"]},
        "at least 100x faster than SharedMemory create + close + unlink": {
            "value": shm_ns / view_ns, "limit": 100.0, "ok": shm_ns / view_ns >= 100.0,
            "higher_is_better": True},
    }
    if syscalls is not None:
        targets["zero system calls per pair in the steady state"] = {
            "value": syscalls["syscalls per pair"], "limit": 0.0,
            "ok": syscalls["syscalls per pair"] < 1e-4, "unit": ""}
    return {"title": "pool: alloc + free of a 4096-byte block", "unit": "ns/call",
            "rounds": rounds, "ns": ns, "ratio_to_floor": ratios,
            "floor": "{}.get(1) [floor]", "c_level_ns": c_level, "syscalls": syscalls,
            "targets": targets, "notes": notes}


# ---------------------------------------------------------------------------
# Rings
# ---------------------------------------------------------------------------

def _mp_queue_round_trip(payload: bytes):
    queue = multiprocessing.get_context("fork").Queue()

    def put_get():
        queue.put(payload)
        return queue.get()
    return put_get, queue


def _zmq_round_trip(payload: bytes, tmp: str):
    try:
        import zmq
    except ImportError:
        return None
    context = zmq.Context.instance()
    pull = context.socket(zmq.PULL)
    push = context.socket(zmq.PUSH)
    address = f"ipc://{tmp}/zmq"
    pull.bind(address)
    push.connect(address)
    send, recv = push.send, pull.recv

    def send_recv():
        send(payload)
        return recv()

    def close():
        push.close(0)
        pull.close(0)
    return send_recv, close


def _posix_mq_round_trip(payload: bytes):
    try:
        import posix_ipc
    except ImportError:
        return None
    name = f"/rseq-bench-{os.getpid()}"
    queue = posix_ipc.MessageQueue(name, posix_ipc.O_CREX, max_messages=8,
                                   max_message_size=len(payload))
    send, receive = queue.send, queue.receive

    def send_receive():
        send(payload)
        return receive()

    def close():
        queue.close()
        queue.unlink()
    return send_receive, close


def ring_drain_ns(ring, payload: bytes, batch: int, records: int) -> float:
    """ns per record of consume(batch) draining `records` records."""
    put = ring.put
    consume = ring.consume
    for _ in range(records):
        put(payload)
    start = time.perf_counter()
    n = 0
    while True:
        got = consume(batch)
        if not got:
            break
        n += len(got)
    elapsed = time.perf_counter() - start
    return elapsed / max(n, 1) * 1e9


def _ring_throughput_worker(path: str, seconds: float, start, results, slot: int,
                            reference: bool):
    from ._ring import Ring
    ring = Ring.open(path)
    put = {}.get if reference else ring.put
    payload = b"x" * 64
    start.wait()
    deadline = time.perf_counter() + seconds
    n = 0
    while time.perf_counter() < deadline:
        for _ in range(1000):
            put(payload)
        n += 1000
    results[slot] = n


def ring_throughput(processes: int, seconds: float, reference: bool = False) -> tuple[float, bool]:
    """(puts per second, exact) of `processes` producer processes on one
    ring (overwrite policy: producers never wait for a consumer)."""
    from ._ring import Ring
    ctx = multiprocessing.get_context("fork")
    with tempfile.TemporaryDirectory(prefix="rseq-bench-") as tmp:
        path = os.path.join(tmp, "ring")
        with Ring.create(path, size_per_cpu=1 << 20, max_record=256,
                         policy="overwrite") as ring:
            total = _run_workers(ctx, _ring_throughput_worker, path, processes, seconds,
                                 reference)
            return total / seconds, reference or ring.stats().committed == total


def ring_throughput_rounds(rounds: int, seconds: float) -> dict:
    """Puts per second of 1 and 2 producer processes on one ring (see
    _scaling_rounds)."""
    return _scaling_rounds(ring_throughput, "ring", "puts/s", rounds, seconds)


def _log_loop(logger, n: int, spent, slot: int):
    # Process time: QueueHandler's pickling happens in the queue's feeder
    # thread, which must count too.
    start = time.process_time()
    for i in range(n):
        logger.info("request %d served in %.3f ms", i, 1.5)
    if hasattr(logger.handlers[0], "queue"):
        logger.handlers[0].queue.close()
        logger.handlers[0].queue.join_thread()
    spent[slot] = (time.process_time() - start) / n * 1e9


def _log_worker_ring(name: str, n: int, spent, slot: int):
    import logging

    from .logging import RingHandler
    logger = logging.getLogger("rseq.bench.ring")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(RingHandler(name))
    _log_loop(logger, n, spent, slot)


def _log_worker_queue(queue, n: int, spent, slot: int):
    import logging
    from logging.handlers import QueueHandler
    logger = logging.getLogger("rseq.bench.queue")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(QueueHandler(queue))
    _log_loop(logger, n, spent, slot)


def logging_throughput(kind: str, workers: int, n: int) -> tuple[float, int, int, float]:
    """(records per second written, records written, records dropped, ns of
    a worker's CPU time per log call) of `workers` processes logging `n`
    records each into one file handler: from the workers' start until the
    last record is written."""
    import logging
    from logging.handlers import QueueListener
    ctx = multiprocessing.get_context("fork")
    with tempfile.TemporaryDirectory(prefix="rseq-bench-log-") as tmp:
        handler = logging.FileHandler(os.path.join(tmp, "out.log"))
        handler.setFormatter(logging.Formatter("%(asctime)s %(process)d %(message)s"))
        written = [0]
        base_emit = handler.emit

        def emit(record):
            base_emit(record)
            written[0] += 1
        handler.emit = emit
        ring = None
        if kind == "ring":
            from ._ring import Ring
            from .logging import RingListener
            name = os.path.join(tmp, "ring")
            ring = Ring.create(name, size_per_cpu=1 << 23, max_record=2048)
            listener = RingListener(ring, handler)
            target, args = _log_worker_ring, name
        else:
            queue = ctx.Queue()
            listener = QueueListener(queue, handler)
            target, args = _log_worker_queue, queue
        listener.start()
        spent = ctx.Array("d", workers)
        procs = [ctx.Process(target=target, args=(args, n, spent, w)) for w in range(workers)]
        start = time.perf_counter()
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        dropped = ring.stats().dropped if ring is not None else 0
        deadline = time.monotonic() + 60
        while written[0] + dropped < workers * n and time.monotonic() < deadline:
            time.sleep(0.0005)
        elapsed = time.perf_counter() - start
        listener.stop()
        if ring is not None:
            ring.close()
        handler.close()
        return written[0] / elapsed, written[0], dropped, statistics.median(spent)


def bench_ring(quick: bool = False) -> dict:
    """rseq.Ring.put beside the call floor and the IPC a user would use."""
    from ._ring import Ring

    rounds = 5 if quick else 15
    seconds = 0.01 if quick else 0.03
    payload = b"x" * 64
    notes = []
    closers = []
    with tempfile.TemporaryDirectory(prefix="rseq-bench-") as tmp:
        # Large lanes, acknowledged between samples by a consumer: every
        # measured put commits (none is a cheaper drop).
        ring = Ring.create(os.path.join(tmp, "ring"), size_per_cpu=1 << 18, max_record=256)
        bare = Ring.create(os.path.join(tmp, "bare"), size_per_cpu=1 << 18, max_record=256,
                           timestamps=False)
        put_get, queue = _mp_queue_round_trip(payload)
        cases: dict = {
            "{}.get(1) [floor]": ({}.get, "f(1)"),
            "Ring.put(64 B)": (ring.put, "f(b'x' * 64)"),
            "Ring.put(64 B), timestamps=False": (bare.put, "f(b'x' * 64)"),
            "multiprocessing.Queue put + get": put_get,
        }
        zmq_case = _zmq_round_trip(payload, tmp)
        if zmq_case is None:
            notes.append("pyzmq not installed (pip install pyzmq, or the compare extra): "
                         "ZeroMQ row skipped")
        else:
            cases["ZeroMQ ipc:// send + recv"] = zmq_case[0]
            closers.append(zmq_case[1])
        mq_case = _posix_mq_round_trip(payload)
        if mq_case is None:
            notes.append("posix_ipc not installed (pip install posix_ipc, or the compare "
                         "extra): POSIX message queue row skipped")
        else:
            cases["POSIX mq send + receive"] = mq_case[0]
            closers.append(mq_case[1])
        # A sample is up to 2,000 calls, repeated with the lanes emptied (by
        # a consumer in this process, untimed) in between, so that every
        # measured put commits (none is a cheaper drop) into a lane that
        # stays in cache, as it does beside a consumer that keeps up.
        timers = {name: _timer(case) for name, case in cases.items()}
        numbers = {}
        repeats = {}
        for name, t in timers.items():
            elapsed = t.timeit(200) / 200
            total = max(1, int(seconds / max(elapsed, 1e-9)))
            numbers[name] = min(2000, total)
            repeats[name] = max(1, total // numbers[name])
            for r in (ring, bare):
                r.consume(1 << 30)
                r.ack()
        dropped_before = ring.stats().dropped + bare.stats().dropped
        samples: dict[str, list[float]] = {name: [] for name in cases}
        drain: list[float] = []
        for _ in range(rounds):
            for name, t in timers.items():
                spent = 0.0
                for _ in range(repeats[name]):
                    spent += t.timeit(numbers[name])
                    for r in (ring, bare):
                        r.consume(1 << 30)
                        r.ack()
                samples[name].append(spent / (numbers[name] * repeats[name]) * 1e9)
            drain.append(statistics.median(ring_drain_ns(ring, payload, 1024, 2000)
                                           for _ in range(5)))
            ring.ack()
        ns = {name: statistics.median(v) for name, v in samples.items()}
        ns["consume(1024): drain, per record"] = statistics.median(drain)
        dropped = ring.stats().dropped + bare.stats().dropped - dropped_before
        if dropped:
            notes.append(f"{dropped} puts were dropped during the run: figures are suspect")
        iterations = 1_000_000 if quick else 5_000_000
        c_level = {
            "Ring put, 64 bytes (C API path)": statistics.median(
                bare._map._bench_put(iterations, 64)[0] for _ in range(3 if quick else 7)),
            "Ring put, 64 bytes, timestamps": statistics.median(
                ring._map._bench_put(iterations, 64)[0] for _ in range(3 if quick else 7)),
            "atomic fetch-add, 1 thread": statistics.median(
                _core._bench_c("atomic_add", 1, iterations) for _ in range(3 if quick else 7)),
        }
        ring.close()
        bare.close()
        queue.close()
        for close in closers:
            close()
    floor = ns["{}.get(1) [floor]"]
    ratios = {name: v / floor for name, v in ns.items()}
    throughput = ring_throughput_rounds(3 if quick else 5, 0.3 if quick else 0.5)
    log_n = 2000 if quick else 20000
    logging_rates = {}
    for kind in ("ring", "queue"):
        rate, written, lost, call_ns = logging_throughput(kind, 2, log_n)
        logging_rates[kind] = {"records/s": rate, "written": written, "dropped": lost,
                               "worker ns per call": call_ns}
    put = ns["Ring.put(64 B)"]
    targets = {
        "Ring.put(64 B) within 3x of {}.get(1)": {
            "value": put / floor, "limit": 3.0, "ok": put / floor <= 3.0},
        "Ring.put(64 B), timestamps=False within 3x of {}.get(1)": {
            "value": ns["Ring.put(64 B), timestamps=False"] / floor, "limit": 3.0,
            "ok": ns["Ring.put(64 B), timestamps=False"] / floor <= 3.0},
        "at least 50x faster than multiprocessing.Queue put + get": {
            "value": ns["multiprocessing.Queue put + get"] / put, "limit": 50.0,
            "ok": ns["multiprocessing.Queue put + get"] / put >= 50.0,
            "higher_is_better": True},
        "drain at most 150 ns per record": {
            "value": ns["consume(1024): drain, per record"], "limit": 150.0, "unit": "ns",
            "ok": ns["consume(1024): drain, per record"] <= 150.0},
        "2 producer processes at least 1.8x the throughput of 1": {
            "value": throughput["ratio"], "limit": 1.8, "ok": throughput["ratio"] >= 1.8,
            "higher_is_better": True},
    }
    for label in ("ZeroMQ ipc:// send + recv", "POSIX mq send + receive"):
        if label in ns:
            targets[f"at least 5x faster than {label}"] = {
                "value": ns[label] / put, "limit": 5.0, "ok": ns[label] / put >= 5.0,
                "higher_is_better": True}
    return {"title": "ring: put(64 bytes)", "unit": "ns/call", "rounds": rounds, "ns": ns,
            "ratio_to_floor": ratios, "floor": "{}.get(1) [floor]",
            "ring_throughput": throughput, "logging": logging_rates,
            "c_level_ns": c_level, "targets": targets, "notes": notes}


def bench_metrics(quick: bool = False) -> dict:
    """rseq.metrics beside prometheus_client (rseq/metrics/_bench.py)."""
    from .metrics._bench import bench_metrics as run
    return run(quick)


SECTIONS: dict[str, Callable[..., dict]] = {"reads": bench_reads, "counters": bench_counters,
                                            "ring": bench_ring, "metrics": bench_metrics,
                                            "pool": bench_pool}


def plot(results: dict, path: str) -> None:
    """A bar chart per section (log scale), written to `path` (PNG)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = [r["curve"] for r in results.values() if "curve" in r]
    rows = len(results) + len(curves)
    fig, axes = plt.subplots(rows, 1, figsize=(9, 3.2 * rows), squeeze=False)
    for ax, curve in zip(axes[len(results):, 0], curves):
        for label, points in curve["series"].items():
            xs = [max(x, 1) for x, _ in points]
            ax.plot(xs, [y for _, y in points], marker="o", label=label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(curve["xlabel"] + " (0 plotted at 1)")
        ax.set_ylabel(curve["ylabel"])
        ax.set_title(curve["title"])
        ax.legend()
    for ax, (_name, result) in zip(axes[:, 0], results.items()):
        labels = list(result["ns"])
        values = [result["ns"][k] for k in labels]
        colors = ["#888888" if k == result["floor"] else
                  "#1f77b4" if k.startswith(("rseq", "PerCpu", "Arena")) or "[rseq" in k
                  else "#d62728" for k in labels]
        ax.barh(labels, values, color=colors)
        ax.set_xscale("log")
        ax.set_xlabel(f"{result['unit']} (log scale; grey: call floor, blue: rseq)")
        ax.set_title(result["title"])
        for y, v in enumerate(values):
            ax.text(v, y, f" {v:,.0f}" if v >= 100 else f" {v:.1f}", va="center", fontsize=8)
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_section(result: dict) -> str:
    lines = [f"{result['title']} (median of {result['rounds']} interleaved rounds, "
             f"{result['unit']}, ratio to the floor)"]
    width = max(len(n) for n in result["ns"]) + 2
    for name, value in result["ns"].items():
        lines.append(f"  {name:<{width}} {value:>10.1f}   {result['ratio_to_floor'][name]:>7.2f}x")
    if "throughput" in result:
        tp = result["throughput"]
        lines.append(f"  arena throughput (median of {tp['rounds']} alternating rounds): "
                     f"1 process {tp['1 process (adds/s)'] / 1e6:.1f} M adds/s, "
                     f"2 processes {tp['2 processes (adds/s)'] / 1e6:.1f} M adds/s "
                     f"({tp['ratio']:.2f}x; totals {'exact' if tp['exact'] else 'WRONG'}); "
                     f"workers sharing nothing scale {tp['reference ratio']:.2f}x here")
    if "ring_throughput" in result:
        tp = result["ring_throughput"]
        lines.append(f"  ring throughput (median of {tp['rounds']} alternating rounds): "
                     f"1 process {tp['1 process (puts/s)'] / 1e6:.2f} M puts/s, "
                     f"2 processes {tp['2 processes (puts/s)'] / 1e6:.2f} M puts/s "
                     f"({tp['ratio']:.2f}x; counts {'exact' if tp['exact'] else 'WRONG'}); "
                     f"workers sharing nothing scale {tp['reference ratio']:.2f}x here")
    if "logging" in result:
        lines.append("  logging, 2 processes -> one FileHandler (records/s written, end to end):")
        for kind, label in (("ring", "RingHandler -> RingListener"),
                            ("queue", "QueueHandler + multiprocessing.Queue -> QueueListener")):
            entry = result["logging"][kind]
            lines.append(f"    {label:<55} {entry['records/s']:>10,.0f}  "
                         f"({entry['written']} written, {entry['dropped']} dropped; "
                         f"{entry['worker ns per call'] / 1000:.1f} us of worker CPU "
                         f"per call)")
    if "c_level_ns" in result:
        lines.append("  C level, ns per operation per thread:")
        for label, v in result["c_level_ns"].items():
            lines.append(f"    {label:<40} {v:>6.2f}")
    if result.get("syscalls"):
        sc = result["syscalls"]
        lines.append(f"  system calls (strace -c -f): {sc['syscalls with the loop']} with "
                     f"{sc['pairs']:,} pairs, {sc['syscalls without the loop']} without: "
                     f"{sc['syscalls per pair']:.6f} per pair")
    lines.extend(result.get("extra_lines", []))
    for label, t in result["targets"].items():
        unit = t.get("unit", "x")
        lines.append(f"  target: {label}: {'PASS' if t['ok'] else 'MISS'} "
                     f"({t['value']:.2f}{unit}, limit {t['limit']:g}{unit})")
    for note in result.get("notes", []):
        lines.append(f"  note: {note}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# python -m rseq bench
# ---------------------------------------------------------------------------

def _run(args) -> int:
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        # Said before minutes of measuring, not after.
        raise UsageError("--plot needs matplotlib (pip install matplotlib)")
    sections = args.section or list(SECTIONS)
    results = {}
    for name in sections:
        results[name] = SECTIONS[name](quick=args.quick)
        if not args.json:
            print(format_section(results[name]), flush=True)
            print()
    if args.plot:
        try:
            plot(results, args.plot)
        except ImportError as e:
            raise UsageError(f"--plot needs matplotlib ({e})") from None
        if not args.json:
            print(f"plot written to {args.plot}")
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


def add_subcommand(subparsers) -> None:
    p = subparsers.add_parser("bench", help="side-by-side speed measurements",
                              description="Side-by-side speed measurements: medians and "
                                          "ratios, interleaved round by round.")
    p.add_argument("--section", action="append", choices=sorted(SECTIONS),
                   help="run only this section (repeatable)")
    p.add_argument("--quick", action="store_true", help="fewer rounds")
    p.add_argument("--json", action="store_true")
    p.add_argument("--plot", metavar="PNG", help="also write a plot (needs matplotlib)")
    p.set_defaults(run=_run)
