"""Stress cases and the kill test of ``rseq.Ring``, on the machinery of
``rseq.testing.stress`` (its case runner, disturber and injection set-up).

Exactness (``ring_case``): producer threads or processes (more than there
are CPUs) put checksummed records through the test build ``rseq._inject``
while one injection point of the producer's critical section is widened,
the disturber migrates and signals them, and a consumer thread drains the
ring at the same time (so lanes wrap and fill).  Checked: every record
delivered at most once and intact, per-lane sequence numbers consecutive,
and puts == delivered + dropped, with the ring's own accounting agreeing.

Kill test (``ring_kill_test``): producer processes and consumer processes
killed with SIGKILL at random instants.  Checked: no torn record is ever
delivered, nothing committed is lost (a consumer's unacknowledged last
batch may come twice: that is the contract), the accounting identity holds
and the ring is still usable.
"""
from __future__ import annotations

import dataclasses
import mmap
import os
import random
import signal
import struct
import tempfile
import threading
import time
import zlib

from . import stress as _stress

# Points of the producer: 1-4 inside the sequence, 5 inside its copy loop, 7
# between reading the CPU and the sequence, 8 after reading head and tail, 9
# after an abort.
RING_POINTS = (1, 2, 3, 4, 5, 7, 8, 9)
QUICK_RING_POINTS = (3, 5, 7)

# payload: worker u32, number u32, filler, crc32 of all that
_ITEM = struct.Struct("<II")


def make_payload(worker: int, number: int, length: int = 64) -> bytes:
    body = _ITEM.pack(worker, number)
    body += bytes((worker + number + i) & 0xFF for i in range(length - _ITEM.size - 4))
    return body + struct.pack("<I", zlib.crc32(body))


def check_payload(data: bytes) -> tuple[int, int] | None:
    """(worker, number) of an intact payload, None if it is torn."""
    if len(data) < _ITEM.size + 4:
        return None
    body, (crc,) = data[:-4], struct.unpack("<I", data[-4:])
    if zlib.crc32(body) != crc:
        return None
    return _ITEM.unpack_from(body)


def inject_map(inject, ring):
    """The test build's view of an open rseq.Ring (same file, same layout)."""
    layout = ring._layout
    from .._ring import CONTROL_OFFSET, LANES_OFFSET
    return inject._RingMap(ring._mmap, CONTROL_OFFSET, LANES_OFFSET, layout.lane_stride,
                           layout.possible_cpus, layout.size, layout.max_record,
                           layout.policy == "overwrite", layout.timestamps)


class _Checker:
    """The consumer side of a case: takes records, checks each one."""

    def __init__(self, ring, nlanes: int):
        self.ring = ring
        self.seen: set[tuple[int, int]] = set()
        self.problems: list[str] = []
        self.next_seq = [None] * nlanes
        self.lane_records = [0] * nlanes

    def take(self, timeout: float) -> int:
        batch = self.ring.consume(4096, timeout, records=True)
        for rec in batch:
            lane = rec.cpu if rec.cpu >= 0 else len(self.next_seq) - 1
            expect = self.next_seq[lane]
            if expect is not None and rec.seq != expect and self.ring.policy == "drop":
                self.problems.append(f"lane {lane}: sequence {rec.seq} after {expect - 1}")
            self.next_seq[lane] = rec.seq + 1
            self.lane_records[lane] += 1
            key = check_payload(rec.data)
            if key is None:
                self.problems.append(f"torn record on lane {lane}, sequence {rec.seq}")
            elif key in self.seen:
                self.problems.append(f"record {key} delivered twice")
            else:
                self.seen.add(key)
        return len(batch)


def ring_case(*, point: int, action: str, workers: str, nworkers: int, reps: int,
              loops: int, policy: str = "drop", size_per_cpu: int = 1 << 16,
              migrate: bool = True) -> _stress.CaseResult:
    import rseq

    from .. import _inject

    name = (f"ring    point={point} action={action:<6} index=cpu    workers={workers}"
            + ("" if policy == "drop" else f" policy={policy}"))

    def setup(stack):
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="rseq-ring-stress-"))
        path = os.path.join(tmp, "ring")
        ring = stack.enter_context(rseq.Ring.create(path, size_per_cpu=size_per_cpu,
                                                    max_record=256, policy=policy))
        producer = inject_map(_inject, ring)
        checker = _Checker(ring, ring.possible_cpus + 1)
        stop = threading.Event()

        def drain():
            while not stop.is_set():
                checker.take(0.01)
            while checker.take(0):
                pass

        consumer = threading.Thread(target=drain)
        consumer.start()
        stack.callback(consumer.join)
        stack.callback(stop.set)
        payloads = [None]

        def work(worker, in_child):
            put = inject_map(_inject, rseq.Ring.open(path)).put if in_child else producer.put
            for i in range(reps):
                put(make_payload(worker, i))

        def check():
            stop.set()
            consumer.join()
            stats = ring.stats()
            expected = nworkers * reps
            problems = checker.problems
            if stats.produced != expected:
                problems.append(f"ring counted {stats.produced} puts, {expected} were made")
            if stats.consumed + stats.in_ring + stats.overwritten != stats.committed:
                problems.append(f"accounting: {stats}")
            if policy == "drop" and len(checker.seen) != stats.committed:
                problems.append(f"{len(checker.seen)} distinct records delivered, "
                                f"{stats.committed} committed")
            if problems:
                raise AssertionError(f"{name}: " + "; ".join(problems[:5]))
            payloads[0] = len(checker.seen)
            return expected, len(checker.seen) + stats.dropped + stats.overwritten
        return work, check

    return _stress._run_case(name, point=point, action=action, loops=loops, workers=workers,
                             nworkers=nworkers, migrate=migrate, setup=setup)


# ---------------------------------------------------------------------------
# Kill test
# ---------------------------------------------------------------------------

@dataclasses.dataclass
class RingKillResult:
    producer_kills: int
    consumer_kills: int
    committed_low: int
    committed: int
    delivered: int
    duplicates: int
    dropped: int
    seconds: float
    problems: list

    @property
    def ok(self) -> bool:
        return not self.problems

    def line(self) -> str:
        status = "ok  " if self.ok else "FAIL"
        text = (f"  {status}  ring kill test: {self.producer_kills} producer and "
                f"{self.consumer_kills} consumer SIGKILLs, {self.committed} committed "
                f"(workers saw >= {self.committed_low}), {self.delivered} delivered "
                f"({self.duplicates} again after a consumer died), {self.dropped} dropped, "
                f"{self.seconds:.1f}s")
        return "\n".join([text] + [f"        problem: {p}" for p in self.problems[:10]])


def _producer(path: str, done_path: str, slot: int):
    import rseq
    with open(done_path, "r+b") as f:
        done = mmap.mmap(f.fileno(), 0)
    view = memoryview(done).cast("q")
    ring = rseq.Ring.open(path)
    put = ring.put
    i = 0
    while True:
        if put(make_payload(slot, i, 48 + (i % 5) * 8)):
            i += 1
            view[slot] = i   # after put returned: at most one ahead
        else:
            time.sleep(0.0005)


_LOG = struct.Struct("<II")
TORN = 0xFFFFFFFF


def _consumer(path: str, log_path: str):
    import rseq
    ring = rseq.Ring.open(path)
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND)
    while True:
        batch = ring.consume(256, 0.01)
        if not batch:
            continue
        out = bytearray()
        for data in batch:
            key = check_payload(data)
            out += _LOG.pack(*(key if key is not None else (TORN, TORN)))
        # Logged before the next consume() acknowledges the batch.
        os.write(fd, out)


def ring_kill_test(kills: int = 100, producers: int = 3, seed: int = 0,
                   consumer_every: int = 5) -> RingKillResult:
    """SIGKILL producers at random instants (and the consumer every
    ``consumer_every``-th kill), then check every guarantee."""
    import rseq
    rng = random.Random(seed)
    start = time.perf_counter()
    tmpdir = tempfile.mkdtemp(prefix="rseq-ring-kill-")
    path = os.path.join(tmpdir, "ring")
    done_path = os.path.join(tmpdir, "done")
    log_path = os.path.join(tmpdir, "log")
    slots = kills + producers + 1
    with open(done_path, "wb") as f:
        f.write(b"\0" * 8 * slots)
    open(log_path, "wb").close()
    problems: list[str] = []
    ring = rseq.Ring.create(path, size_per_cpu=1 << 14, max_record=128)
    running: dict[int, int] = {}
    consumer_pid = None
    next_slot = 0
    producer_kills = consumer_kills = 0

    def fork(target, *args):
        pid = os.fork()
        if pid == 0:
            try:
                target(*args)
            finally:
                os._exit(1)
        return pid

    def spawn_producer():
        nonlocal next_slot
        running[fork(_producer, path, done_path, next_slot)] = next_slot
        next_slot += 1

    def kill(pid):
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)

    try:
        consumer_pid = fork(_consumer, path, log_path)
        for _ in range(producers):
            spawn_producer()
        while producer_kills + consumer_kills < kills:
            time.sleep(rng.uniform(0.0, 0.02))
            if (producer_kills + consumer_kills) % consumer_every == consumer_every - 1:
                kill(consumer_pid)
                consumer_kills += 1
                consumer_pid = fork(_consumer, path, log_path)
            else:
                pid = rng.choice(list(running))
                kill(pid)
                del running[pid]
                producer_kills += 1
                spawn_producer()
        for pid in list(running):
            kill(pid)
            producer_kills += 1
        running.clear()
        # The last consumer dies too; this process takes over its lease.
        kill(consumer_pid)
        consumer_kills += 1
        consumer_pid = None
        delivered: list[tuple[int, int]] = []
        while True:
            batch = ring.consume(4096, 0)
            if not batch:
                break
            for data in batch:
                key = check_payload(data)
                delivered.append(key if key is not None else (TORN, TORN))
        ring.ack()
        with open(log_path, "rb") as f:
            log = f.read()
        log = log[:len(log) - len(log) % _LOG.size]
        delivered += [tuple(k) for k in _LOG.iter_unpack(log)]
        with open(done_path, "rb") as f:
            done = list(memoryview(f.read()).cast("q"))
        stats = ring.stats()
        torn = sum(1 for k in delivered if k == (TORN, TORN))
        if torn:
            problems.append(f"{torn} torn records delivered")
        distinct = set(delivered)
        duplicates = len(delivered) - len(distinct)
        missing = sum(1 for slot, n in enumerate(done) for i in range(n)
                      if (slot, i) not in distinct)
        if missing:
            problems.append(f"{missing} records committed by a producer never delivered")
        # Each dead consumer may have had one batch taken and not acknowledged.
        if duplicates > consumer_kills * 256:
            problems.append(f"{duplicates} duplicates for {consumer_kills} consumer deaths")
        committed_low = sum(done)
        if not committed_low <= stats.committed <= committed_low + producer_kills:
            problems.append(f"ring says {stats.committed} committed, producers saw "
                            f"{committed_low} with {producer_kills} killed")
        if len(distinct) != stats.committed:
            problems.append(f"{len(distinct)} distinct records delivered, ring says "
                            f"{stats.committed} committed")
        if stats.produced != stats.consumed + stats.dropped + stats.in_ring or stats.in_ring:
            problems.append(f"accounting identity broken: {stats}")
        # Still usable: a put and a consume.
        if not ring.put(make_payload(0, 0)) or len(ring.consume(10, 1.0)) != 1:
            problems.append("the ring is not usable after the kills")
        return RingKillResult(producer_kills, consumer_kills, committed_low, stats.committed,
                              len(delivered), duplicates, stats.dropped,
                              time.perf_counter() - start, problems)
    finally:
        for pid in list(running) + ([consumer_pid] if consumer_pid else []):
            kill(pid)
        ring.close()
        for name in os.listdir(tmpdir):
            os.unlink(os.path.join(tmpdir, name))
        os.rmdir(tmpdir)


def run_ring_matrix(quick: bool, out=print) -> list[_stress.CaseResult]:
    import itertools
    reps = 1500 if quick else 20000
    nworkers = 3 if quick else 4
    results = []
    points = QUICK_RING_POINTS if quick else RING_POINTS
    policies = ("drop",) if quick else ("drop", "overwrite")
    for policy, point, action, workers in itertools.product(
            policies, points, _stress.ACTIONS, ("threads", "processes")):
        result = ring_case(point=point, action=action, workers=workers, nworkers=nworkers,
                           reps=reps, loops=20000, policy=policy)
        results.append(result)
        out(result.line())
    return results
