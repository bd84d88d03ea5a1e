"""rseq.Ring: put and consume, exact accounting in both policies, the consumer
lease and its hand-over, blocking waits, and validation of everything read
from the file before it is trusted."""
from __future__ import annotations

import multiprocessing
import os
import signal
import stat
import struct
import threading
import time

import pytest

import rseq
from helpers.subproc import OWN_REGISTRATION, run_json
from rseq import _ring
from rseq.testing.ring_stress import check_payload, make_payload

POSSIBLE = rseq.info().possible_cpus


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "ring")


@pytest.fixture
def ring(path):
    with rseq.Ring.create(path, size_per_cpu=4096, max_record=100) as r:
        yield r


def pinned(cpu: int = 0):
    """Run the test body on one CPU so every record goes to one lane."""
    class Pin:
        def __enter__(self):
            self.old = os.sched_getaffinity(0)
            os.sched_setaffinity(0, {cpu})

        def __exit__(self, *exc):
            os.sched_setaffinity(0, self.old)
    return Pin()


def record_size(n: int) -> int:
    return (rseq._core.RING_RECORD_HEADER + n + 7) // 8 * 8


# ---------------------------------------------------------------------------
# Basic use
# ---------------------------------------------------------------------------

def test_create_put_consume_unlink(path):
    with rseq.Ring.create(path, size_per_cpu=5000, max_record=64) as r:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert r.size_per_cpu == 8192 and r.max_record == 64 and r.policy == "drop"
        assert r.possible_cpus == POSSIBLE and r.timestamps
        assert r.put(b"one") is True
        assert r.put(bytearray(b"two")) and r.put(memoryview(b"xthreex")[1:6])
        assert r.put(b"") and r.put(b"m" * 64)
        assert r.consume(10) == [b"one", b"two", b"three", b"", b"m" * 64]
        assert r.consume(10) == []
        stats = r.stats()
        assert (stats.produced, stats.committed, stats.consumed, stats.in_ring) == (5, 5, 5, 0)
        assert stats.consumer == rseq._procid.identity()
        assert "drop" in repr(r)
    assert "closed" in repr(r)
    rseq.Ring.unlink(path)
    assert not os.path.exists(path)
    with pytest.raises(FileNotFoundError, match="no ring"):
        rseq.Ring.unlink(path)


def test_records_carry_lane_sequence_time_and_pid(ring):
    before = time.monotonic_ns()
    with pinned(0):
        for i in range(5):
            ring.put(bytes([i]))
    recs = ring.consume(10, records=True)
    assert [r.data for r in recs] == [bytes([i]) for i in range(5)]
    assert [r.seq for r in recs] == list(range(5))
    assert {r.cpu for r in recs} == {0}
    assert {r.pid for r in recs} == {os.getpid()}
    assert all(before <= r.time_ns <= time.monotonic_ns() for r in recs)
    assert isinstance(recs[0], rseq.RingRecord) and recs[0][0] == b"\x00"


def test_batches_are_merged_by_time_across_lanes(path):
    if POSSIBLE < 2 or len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two CPUs")
    with rseq.Ring.create(path, size_per_cpu=1 << 16) as r:
        for i in range(20):
            with pinned(i % 2):
                r.put(struct.pack("<I", i))
        recs = r.consume(100, records=True)
        assert [struct.unpack("<I", x.data)[0] for x in recs] == list(range(20))
        assert {x.cpu for x in recs} == {0, 1}
        times = [x.time_ns for x in recs]
        assert times == sorted(times)


def test_iteration_and_follow(ring):
    for i in range(3):
        ring.put(b"%d" % i)
    assert list(ring) == [b"0", b"1", b"2"]
    assert list(ring) == []
    ring.put(b"late")
    assert list(ring.follow(timeout=0.05)) == [b"late"]


def test_consume_max_takes_the_oldest_first(ring):
    with pinned(0):
        for i in range(10):
            ring.put(bytes([i]))
    assert ring.consume(3) == [b"\x00", b"\x01", b"\x02"]
    assert ring.consume(100) == [bytes([i]) for i in range(3, 10)]


# ---------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------

def test_record_over_the_maximum_is_refused_not_truncated(ring):
    assert ring.put(b"x" * 100)
    with pytest.raises(ValueError, match="101 bytes: this ring takes at most 100"):
        ring.put(b"x" * 101)
    assert ring.consume(10) == [b"x" * 100]
    assert ring.stats().produced == 1


@pytest.mark.parametrize("bad", ["text", 5, None, [1, 2], object()])
def test_put_takes_bytes_like_only(ring, bad):
    with pytest.raises(TypeError, match="bytes-like object"):
        ring.put(bad)


@pytest.mark.parametrize("kwargs, match", [
    (dict(size_per_cpu=100), "size_per_cpu"),
    (dict(size_per_cpu=1 << 31), "size_per_cpu"),
    (dict(size_per_cpu="big"), "size_per_cpu"),
    (dict(max_record=0), "max_record"),
    (dict(size_per_cpu=4096, max_record=2000), "max_record"),
    (dict(max_record=True), "max_record"),
    (dict(policy="block"), "policy"),
])
def test_create_arguments(path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        rseq.Ring.create(path, **kwargs)
    assert not os.path.exists(path)


def test_consume_arguments(ring):
    with pytest.raises(ValueError, match="max"):
        ring.consume(0)
    with pytest.raises(ValueError, match="timeout"):
        ring.consume(1, -1)
    with pytest.raises(TypeError):
        ring.consume(1, "soon")


def test_name_taken_and_closed(path, ring):
    with pytest.raises(FileExistsError, match="already exists"):
        rseq.Ring.create(path)
    ring.close()
    with pytest.raises(ValueError, match="closed"):
        ring.put(b"x")
    with pytest.raises(ValueError, match="closed"):
        ring.consume()
    ring.close()  # idempotent


def _write_ring(path, size=4096, max_record=100):
    with rseq.Ring.create(path, size_per_cpu=size, max_record=max_record):
        pass
    with open(path, "rb") as f:
        return f.read()


def test_zero_length_truncated_and_foreign_files(path, tmp_path):
    data = _write_ring(path)
    cases = {
        "empty": b"",
        "short": data[:10],
        "header-only": data[:4096],
        "truncated": data[:len(data) - 4096],
        "foreign": os.urandom(len(data)),
        "text": b"hello world\n" * 100,
    }
    for name, content in cases.items():
        p = tmp_path / name
        p.write_bytes(content)
        os.chmod(p, 0o600)
        with pytest.raises(rseq.ArenaFormatError):
            rseq.Ring.open(str(p))
    # An arena is not a ring, and a ring is not an arena.
    arena_path = str(tmp_path / "arena")
    rseq.Arena.create(arena_path, capacity=4).close()
    with pytest.raises(rseq.ArenaFormatError, match="not an rseq ring"):
        rseq.Ring.open(arena_path)
    with pytest.raises(rseq.ArenaFormatError):
        rseq.Arena.open(path)


def test_every_damaged_header_byte_is_rejected(path, tmp_path):
    data = bytearray(_write_ring(path))
    header_len = _ring._HEADER.size
    for i in range(header_len):
        damaged = bytearray(data)
        damaged[i] ^= 0x41
        p = tmp_path / "damaged"
        p.write_bytes(damaged)
        os.chmod(p, 0o600)
        with pytest.raises(rseq.ArenaFormatError):
            rseq.Ring.open(str(p))


def test_consistent_but_wrong_header_is_rejected(path, tmp_path):
    data = _write_ring(path)
    fields = list(_ring._HEADER._struct.unpack(data[:_ring._HEADER.size - 4]))[2:]
    for index, value in ((2, 3000), (3, 0), (3, 2000), (4, 7), (5, 2), (8, 4096),
                         (9, 1 << 40), (1, POSSIBLE + 1)):
        bad = list(fields)
        bad[index] = value
        header = _ring._HEADER.pack(*bad)
        p = tmp_path / "wrong"
        p.write_bytes(header + data[len(header):])
        os.chmod(p, 0o600)
        with pytest.raises(rseq.ArenaFormatError):
            rseq.Ring.open(str(p))


def test_c_layout_check_refuses_a_mapping_too_small(ring):
    import mmap
    small = mmap.mmap(-1, 8192)
    with pytest.raises(rseq.ArenaFormatError, match="does not fit"):
        rseq._core._RingMap(small, 4096, 8192, ring._layout.lane_stride, POSSIBLE, 4096,
                            100, False, True)
    with pytest.raises(rseq.ArenaFormatError, match="not a valid layout"):
        rseq._core._RingMap(small, 4096, 8192, 8192, POSSIBLE, 3000, 100, False, True)


def test_untrusted_files_are_refused(path, tmp_path):
    _write_ring(path)
    os.chmod(path, 0o666)
    with pytest.raises(PermissionError, match="writable by every user"):
        rseq.Ring.open(path)
    os.chmod(path, 0o600)
    link = str(tmp_path / "link")
    os.symlink(path, link)
    with pytest.raises(PermissionError, match="symbolic link"):
        rseq.Ring.open(link)
    fifo = str(tmp_path / "fifo")
    os.mkfifo(fifo, 0o600)
    with pytest.raises(PermissionError, match="FIFO"):
        rseq.Ring.open(fifo)


# ---------------------------------------------------------------------------
# Overload: exact drops and overwrites, bounded memory
# ---------------------------------------------------------------------------

def test_drop_policy_counts_every_drop_exactly(ring, path):
    size_before = os.stat(path).st_size
    per_record = record_size(64)
    fits = 4096 // per_record
    with pinned(0):
        results = [ring.put(make_payload(0, i)) for i in range(1000)]
    assert results.count(True) == fits and results[:fits] == [True] * fits
    stats = ring.stats()
    assert stats.per_cpu[0].dropped == 1000 - fits
    assert (stats.produced, stats.committed, stats.dropped, stats.in_ring) == \
        (1000, fits, 1000 - fits, fits)
    got = ring.consume(10000)
    assert [check_payload(d) for d in got] == [(0, i) for i in range(fits)]
    # Taken but not acknowledged: still in the ring, still holding its room.
    assert ring.stats().in_ring == fits
    with pinned(0):
        assert not ring.put(make_payload(0, 9999))
    ring.ack()
    stats = ring.stats()
    assert stats.produced == stats.consumed + stats.dropped + stats.in_ring
    assert (stats.consumed, stats.in_ring) == (fits, 0)
    with pinned(0):
        assert ring.put(b"x")
    assert os.stat(path).st_size == size_before


def test_lanes_wrap_many_times(path):
    with rseq.Ring.create(path, size_per_cpu=4096, max_record=200) as r, pinned(0):
        sent = 0
        received = []
        for round_ in range(300):
            for i in range(7):
                n = (round_ * 7 + i) % 150
                assert r.put(make_payload(round_, i, 8 + n))
                sent += 1
            received += r.consume(1000, records=True)
        assert len(received) == sent
        assert [x.seq for x in received] == list(range(sent))
        assert all(check_payload(x.data) for x in received)


def test_overwrite_policy_keeps_the_newest_and_counts_the_rest(path):
    with rseq.Ring.create(path, size_per_cpu=4096, max_record=100,
                          policy="overwrite") as r, pinned(0):
        for i in range(1000):
            assert r.put(make_payload(0, i))
        stats = r.stats()
        assert stats.committed == stats.produced == 1000 and stats.dropped == 0
        assert stats.overwritten + stats.in_ring == 1000
        kept = stats.in_ring
        assert 0 < kept <= 4096 // record_size(64)
        recs = r.consume(10000, records=True)
        assert [x.seq for x in recs] == list(range(1000 - kept, 1000))
        assert [check_payload(x.data) for x in recs] == [(0, i) for i in range(1000 - kept, 1000)]
        r.ack()
        stats = r.stats()
        assert (stats.consumed, stats.overwritten, stats.in_ring) == (kept, 1000 - kept, 0)
        # The consumer can tell exactly what it missed: the sequence gap.
        for i in range(1000, 1100):
            r.put(make_payload(0, i))
        recs = r.consume(10000, records=True)
        assert recs[0].seq - 1000 == r.stats().overwritten - (1000 - kept) - 0
        r.ack()
        stats = r.stats()
        assert stats.consumed + stats.overwritten == 1100 and stats.in_ring == 0


def test_overwrite_policy_without_overflow_loses_nothing(path):
    with rseq.Ring.create(path, size_per_cpu=8192, policy="overwrite") as r:
        for i in range(20):
            r.put(b"%d" % i)
        assert len(r.consume(100)) == 20
        r.ack()
        assert r.stats().overwritten == 0


# ---------------------------------------------------------------------------
# The consumer lease
# ---------------------------------------------------------------------------

def _consume_in_child(path, conn):
    try:
        with rseq.Ring.open(path) as r:
            got = r.consume(100)
        conn.send(("ok", got))
    except Exception as e:
        conn.send((type(e).__name__, str(e)))


def _child_result(path):
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe()
    p = ctx.Process(target=_consume_in_child, args=(path, child))
    p.start()
    result = parent.recv()
    p.join()
    return result


def test_second_consumer_gets_a_clear_error(ring, path):
    ring.put(b"a")
    assert ring.consume() == [b"a"]
    kind, message = _child_result(path)
    assert kind == "RingBusyError" and "already has a consumer: process" in message
    other = rseq.Ring.open(path)
    with pytest.raises(rseq.RingBusyError, match="another handle in this process"):
        other.consume()
    ring.put(b"b")
    ring.close()      # releases the lease, acknowledging what it took
    kind, got = _child_result(path)
    assert (kind, got) == ("ok", [b"b"])
    assert other.consume() == []
    other.close()


def _dying_consumer(path, ready):
    r = rseq.Ring.open(path)
    got = r.consume(3)          # taken, acknowledged by nothing
    r.ack()                     # ...acknowledges those three
    got += r.consume(4)         # taken, never acknowledged
    ready.send([bytes(x) for x in got])
    time.sleep(60)


def test_dead_consumer_is_replaced_and_its_successor_resumes(ring, path):
    with pinned(0):
        for i in range(20):
            ring.put(b"%02d" % i)
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe()
    p = ctx.Process(target=_dying_consumer, args=(path, child))
    p.start()
    assert parent.poll(30)
    assert parent.recv() == [b"%02d" % i for i in range(7)]
    with pytest.raises(rseq.RingBusyError):
        rseq.Ring.open(path).consume()
    os.kill(p.pid, signal.SIGKILL)
    p.join()
    successor = rseq.Ring.open(path)
    got = successor.consume(100)
    assert successor.replaced[0] == p.pid
    # The three acknowledged records are gone; the four taken and not
    # acknowledged come again, then the rest: nothing lost.
    assert got == [b"%02d" % i for i in range(3, 20)]
    successor.ack()
    stats = successor.stats()
    assert (stats.committed, stats.consumed, stats.in_ring) == (20, 20, 0)
    successor.close()


def test_forked_child_of_the_consumer_is_not_the_consumer(ring, path):
    ring.put(b"x")
    ring.consume()
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe()

    def body():
        try:
            ring.consume()
            child.send("consumed")
        except rseq.RingBusyError:
            child.send("busy")
    p = ctx.Process(target=body)
    p.start()
    assert parent.recv() == "busy"
    p.join()


def test_readonly_monitor(ring, path):
    ring.put(b"x")
    with rseq.Ring.open(path, readonly=True) as monitor:
        assert monitor.readonly
        assert monitor.stats().committed == 1
        with pytest.raises(PermissionError, match="read-only"):
            monitor.put(b"y")
        with pytest.raises(PermissionError, match="read-only"):
            monitor.consume()
    os.chmod(path, 0o400)
    with rseq.Ring.open(path, readonly=True) as monitor:
        assert monitor.stats().in_ring == 1


# ---------------------------------------------------------------------------
# Blocking waits
# ---------------------------------------------------------------------------

def _produce_later(path, delay):
    time.sleep(delay)
    rseq.Ring.open(path).put(b"wake")


def test_blocking_consume_wakes_on_a_commit_in_another_process(ring, path):
    ctx = multiprocessing.get_context("fork")
    p = ctx.Process(target=_produce_later, args=(path, 0.3))
    start = time.monotonic()
    p.start()
    got = ring.consume(10, timeout=20)
    elapsed = time.monotonic() - start
    p.join()
    assert got == [b"wake"]
    assert 0.25 < elapsed < 10
    assert ring._map.waiting() == 0


def test_blocking_consume_times_out_and_waits_forever_when_asked(ring, path):
    start = time.monotonic()
    assert ring.consume(10, timeout=0.2) == []
    assert 0.19 < time.monotonic() - start < 5
    threading.Timer(0.2, lambda: rseq.Ring.open(path).put(b"x")).start()
    assert ring.consume(10, timeout=None) == [b"x"]


def test_producers_pay_no_wakeup_when_nobody_waits(ring):
    assert ring._map.waiting() == 0
    ring.put(b"x")
    assert ring._map.waiting() == 0


def test_ctrl_c_interrupts_a_blocking_consume(ring):
    code = f"""
        import os, signal, threading, time, json, rseq
        r = rseq.Ring.open({ring.path!r})
        threading.Timer(0.3, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
        start = time.monotonic()
        try:
            r.consume(10, timeout=30)
            print(json.dumps("returned"))
        except KeyboardInterrupt:
            print(json.dumps(time.monotonic() - start))
    """
    ring.close()
    elapsed = run_json(code)
    assert isinstance(elapsed, float) and elapsed < 5


# ---------------------------------------------------------------------------
# Across processes and modes
# ---------------------------------------------------------------------------

def _producer(path, worker, n):
    r = rseq.Ring.open(path)
    for i in range(n):
        while not r.put(make_payload(worker, i)):
            time.sleep(0.001)


def test_accounting_across_processes(path):
    with rseq.Ring.create(path, size_per_cpu=1 << 15) as r:
        ctx = multiprocessing.get_context("fork")
        procs = [ctx.Process(target=_producer, args=(path, w, 3000)) for w in range(4)]
        for p in procs:
            p.start()
        seen = set()
        while any(p.is_alive() for p in procs) or r.stats().in_ring > r._map.pending():
            for data in r.consume(1000, 0.05):
                key = check_payload(data)
                assert key is not None and key not in seen
                seen.add(key)
        for p in procs:
            p.join()
        assert seen == {(w, i) for w in range(4) for i in range(3000)}
        r.ack()
        stats = r.stats()
        assert stats.committed == stats.consumed == 12000 and stats.in_ring == 0
        assert stats.produced == stats.consumed + stats.dropped


def test_threads_without_rseq_use_the_fallback_lane(path):
    """rseq denied by seccomp: puts go to the fallback lane (-1), where
    writers serialise on a robust owner word, never to a CPU lane."""
    rseq.Ring.create(path, size_per_cpu=1 << 16).close()
    result = run_json(f"""
        import errno, json, threading
        from helpers.seccomp import deny_rseq
        deny_rseq(errno.EPERM)
        import rseq
        r = rseq.Ring.open({path!r})
        def work():
            for i in range(300):
                assert r.put(b"%d" % i)
        threads = [threading.Thread(target=work) for _ in range(3)]
        for t in threads: t.start()
        for t in threads: t.join()
        print(json.dumps(rseq.info().fallback))
    """, env=OWN_REGISTRATION)
    assert "EPERM" in result
    with rseq.Ring.open(path) as r:
        recs = r.consume(10000, records=True)
        assert len(recs) == 900 and {x.cpu for x in recs} == {-1}
        assert [x.seq for x in recs] == list(range(900))
        stats = r.stats()
        assert stats.fallback.committed == 900


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

def test_cli_stats_and_tail(ring, path):
    from helpers.subproc import run_rseq_cli
    for i in range(3):
        ring.put(b"line %d" % i)
    proc = run_rseq_cli("ring", "stats", path)
    assert proc.returncode == 0, proc.stderr
    assert "produced          3" in proc.stdout and "consumer  none" in proc.stdout
    proc = run_rseq_cli("ring", "tail", path, "--timeout", "0.2")
    assert proc.returncode == 0 and proc.stdout.splitlines() == ["line 0", "line 1", "line 2"]
    proc = run_rseq_cli("ring", "stats", path, "--json")
    assert '"consumed": 3' in proc.stdout
    with pinned(0):
        ring.put(b"\xff\x00")
    proc = run_rseq_cli("ring", "tail", path, "--count", "1", "--records")
    assert proc.returncode == 0 and "cpu 0 seq " in proc.stdout and "b'\\xff\\x00'" in proc.stdout
    for argv in (("ring", "stats", path + "-missing"), ("ring", "tail", path, "--count", "0"),
                 ("ring",)):
        proc = run_rseq_cli(*argv)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, argv
    ring.consume()   # this process is the consumer now: tail gets a clear error
    proc = run_rseq_cli("ring", "tail", path, "--timeout", "0.1")
    assert proc.returncode == 2 and "already has a consumer" in proc.stderr
    assert proc.stderr.startswith("python -m rseq ring tail: error: ")


def test_lost_registration_moves_puts_to_the_fallback_lane(path):
    """A registration ended behind the package's back (cpu_id -1): puts do
    not spin, they go to the fallback lane, and info().fallback says why."""
    rseq.Ring.create(path, size_per_cpu=1 << 18).close()
    got = run_json(f"""
        import json, threading
        import rseq, rseq._inject
        r = rseq.Ring.open({path!r})
        out = {{}}
        def worker():
            assert r.put(b"before")
            i = rseq.info()
            out["unregister"] = rseq._inject.rseq_syscall(i.area_address, i.registered_size,
                                                           1, rseq._core.SIGNATURE)
            out["puts"] = sum(r.put(b"after %d" % n) for n in range(2000))
            out["fallback"] = rseq.info().fallback
        t = threading.Thread(target=worker); t.start(); t.join()
        print(json.dumps(out))
    """, timeout=60)
    assert got["unregister"] == 0 and got["puts"] == 2000
    assert got["fallback"] and "ended behind" in got["fallback"]
    with rseq.Ring.open(path) as r:
        recs = r.consume(10000, records=True)
        assert len(recs) == 2001
        assert recs[0].cpu >= 0 and {x.cpu for x in recs[1:]} == {-1}


def test_a_forgotten_consumer_releases_the_lease_and_acknowledges_nothing(ring, path):
    import gc
    ring.put(b"a")
    forgotten = rseq.Ring.open(path)
    assert forgotten.consume() == [b"a"]
    del forgotten
    gc.collect()
    successor = rseq.Ring.open(path)
    assert successor.consume() == [b"a"]   # taken, never acknowledged: again
    successor.close()
