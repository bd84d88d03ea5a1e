"""rseq.Arena: shared counters across processes, crash-safe key creation, and
validation of everything read from the file before it is trusted."""
from __future__ import annotations

import multiprocessing
import os
import signal
import stat
import struct
import time
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rseq
from helpers.subproc import OWN_REGISTRATION, run_json
from rseq import _arena, _procid

POSSIBLE = rseq.info().possible_cpus


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "arena")


@pytest.fixture
def arena(path):
    with rseq.Arena.create(path, capacity=16) as a:
        yield a


# ---------------------------------------------------------------------------
# Basic use
# ---------------------------------------------------------------------------

def test_create_open_counters(path):
    with rseq.Arena.create(path, capacity=16) as a:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        c = a.counter("requests")
        c.add(3)
        assert a.counter("requests").value() == 3
        assert a.keys() == ["requests"]
        assert a.values() == {"requests": 3}
        assert "requests" in a and "other" not in a and 5 not in a
        assert a.get("other") is None
        assert len(a) == 1
        assert c.key == "requests" and c.index == "cpu"
        assert a.capacity == 16 and a.possible_cpus == POSSIBLE
    with rseq.Arena.open(path) as b:
        assert b.counter("requests").value() == 3
        assert b.counter("é ünïcode ✓").value() == 0
        assert set(b.keys()) == {"requests", "é ünïcode ✓"}
    rseq.Arena.unlink(path)
    assert not os.path.exists(path)


def test_counter_methods_like_percpu(arena):
    c = arena.counter("k")
    c.add(7)
    assert c.reset() == 7
    c.add(2)
    assert c.value() == 2 and c.removed() == 7
    assert len(c.per_cpu()) == POSSIBLE
    with pytest.raises(OverflowError):
        c.add(2**63)


def test_create_refuses_existing(path, arena):
    with pytest.raises(FileExistsError):
        rseq.Arena.create(path)


def test_shm_name(request):
    name = f"rseq-test-{os.getpid()}"
    request.addfinalizer(lambda: os.path.exists(f"/dev/shm/{name}") and rseq.Arena.unlink(name))
    with rseq.Arena.create(name, capacity=4) as a:
        assert a.path == f"/dev/shm/{name}"
        a.counter("x").add()
    with rseq.Arena.open(name) as a:
        assert a.counter("x").value() == 1


@pytest.mark.parametrize("name, exc", [("", ValueError), ("..", ValueError),
                                       ("x" * 300, ValueError), (b"bytes", TypeError)])
def test_bad_names(name, exc):
    with pytest.raises(exc):
        rseq.Arena.create(name)


@pytest.mark.parametrize("kwargs", [{"capacity": 0}, {"capacity": -1}, {"capacity": 1.5},
                                    {"key_max": 0}, {"key_max": 5000}])
def test_bad_create_arguments(path, kwargs):
    with pytest.raises(ValueError):
        rseq.Arena.create(path, **kwargs)
    assert not os.path.exists(path)


def test_bad_keys(arena):
    with pytest.raises(TypeError):
        arena.counter(b"bytes")
    with pytest.raises(TypeError):
        arena.counter(None)
    with pytest.raises(ValueError, match="empty"):
        arena.counter("")
    with pytest.raises(ValueError, match="at most 80"):
        arena.counter("k" * 81)
    with pytest.raises(ValueError, match="not valid text"):
        arena.counter("\udc80")
    arena.counter("k" * 80).add()  # the limit itself is fine
    assert arena.keys() == ["k" * 80]


def test_full_arena(path):
    with rseq.Arena.create(path, capacity=3) as a:
        for k in "abc":
            a.counter(k).add()
        with pytest.raises(rseq.ArenaFullError):
            a.counter("d")
        assert a.counter("b").value() == 1  # existing keys still work
        assert isinstance(rseq.ArenaFullError(), rseq.ArenaError)


def test_closed_arena(path):
    a = rseq.Arena.create(path, capacity=4)
    c = a.counter("x")
    a.close()
    assert a.closed
    with pytest.raises(ValueError, match="closed"):
        a.counter("x")
    with pytest.raises(ValueError, match="closed"):
        a.keys()
    c.add(1)   # a counter keeps its mapping alive
    assert c.value() == 1


# ---------------------------------------------------------------------------
# Across processes
# ---------------------------------------------------------------------------

def _spawned_worker(path, reps, key="shared"):
    import rseq as r
    with r.Arena.open(path) as a:
        c = a.counter(key)
        for _ in range(reps):
            c.add(1)
        a.counter(f"pid-{os.getpid()}").add(1)


def test_spawned_processes_share_counters(path):
    with rseq.Arena.create(path, capacity=32) as a:
        ctx = multiprocessing.get_context("spawn")
        procs = [ctx.Process(target=_spawned_worker, args=(path, 50000)) for _ in range(4)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
            assert p.exitcode == 0
        assert a.counter("shared").value() == 200000
        assert len([k for k in a.keys() if k.startswith("pid-")]) == 4


def _creator(path, keys, barrier):
    import rseq as r
    a = r.Arena.open(path)
    barrier.wait()
    for k in keys:
        a.counter(k).add(1)


def test_concurrent_key_creation_gives_one_entry_per_key(path):
    keys = [f"key-{i}" for i in range(40)]
    with rseq.Arena.create(path, capacity=64) as a:
        ctx = multiprocessing.get_context("fork")
        barrier = ctx.Barrier(4)
        procs = [ctx.Process(target=_creator, args=(path, keys[::1 if i % 2 else -1], barrier))
                 for i in range(4)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
            assert p.exitcode == 0
        assert sorted(a.keys()) == sorted(keys)
        assert all(a.counter(k).value() == 4 for k in keys)


def test_mixed_rseq_and_denied_processes_stay_exact(path):
    """A process where rseq is denied writes the fallback lane, the others
    their CPU slots: the two never share a word, the total is exact."""
    with rseq.Arena.create(path, capacity=8) as a:
        counter = a.counter("mixed")
        code = f"""
            import errno, json
            from helpers.seccomp import deny_rseq
            deny_rseq(errno.EPERM)
            import rseq
            c = rseq.Arena.open({path!r}).counter("mixed")
            for _ in range(100000):
                c.add(1)
            print(json.dumps({{"fallback": rseq.info().fallback}}))
        """
        ctx = multiprocessing.get_context("fork")
        procs = [ctx.Process(target=_spawned_worker, args=(path, 100000, "mixed"))
                 for _ in range(2)]
        for p in procs:
            p.start()
        result = run_json(code, env=OWN_REGISTRATION)
        for p in procs:
            p.join()
        assert "EPERM" in result["fallback"]
        assert counter.value() == 300000
        assert counter.fallback_count() == 100000


# ---------------------------------------------------------------------------
# Key claims left by dead or live processes
# ---------------------------------------------------------------------------

def _fnv1a64(data: bytes) -> int:
    h = 0xcbf29ce484222325
    for b in data:
        h = ((h ^ b) * 0x100000001b3) & 0xFFFFFFFFFFFFFFFF
    return h


def _start_tag(pid: int) -> int:
    """The low 24 bits of a process's start time, as claims record it."""
    tag = _procid.start_time(pid) & ((1 << 24) - 1)
    return tag or 1


def _claim(path: str, key: str, pid: int, capacity: int, start: int | None = None) -> int:
    """Write a CLAIMED state for `key` by (`pid`, `start`) where a creator would
    have: tag 1 | top 16 of the 30 hash bits | start tag (24 bits) | pid (22)."""
    h = _fnv1a64(key.encode())
    index = h % capacity
    if start is None:
        start = _start_tag(pid) if _procid.start_time(pid) is not None else 0
    state = (1 << 62) | ((h >> 48) << 46) | (start << 22) | pid
    layout = _arena.Layout.compute(POSSIBLE, capacity, _arena.DEFAULT_KEY_MAX)
    with open(path, "r+b") as f:
        f.seek(layout.table_offset + index * layout.entry_size)
        f.write(struct.pack("<Q", state))
    return index


def _dead_pid() -> int:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


def test_claim_of_dead_creator_is_taken_over(path):
    rseq.Arena.create(path, capacity=8).close()
    index = _claim(path, "orphan", _dead_pid(), 8)
    with rseq.Arena.open(path) as a:
        assert a._entry_states()[index][0] == "claimed"
        c = a.counter("orphan")
        c.add(2)
        assert a._entry_states()[index] == ("ready", 0)
        assert a.keys() == ["orphan"] and c.value() == 2


def test_claim_of_live_creator_times_out_cleanly(path):
    rseq.Arena.create(path, capacity=8).close()
    sleeper = os.fork()
    if sleeper == 0:
        time.sleep(30)
        os._exit(0)
    try:
        _claim(path, "busy", sleeper, 8)
        with rseq.Arena.open(path) as a:
            start = time.monotonic()
            with pytest.raises(rseq.ArenaError, match="claimed by live process"):
                a._map.find(b"busy", True, 0.3)
            assert time.monotonic() - start < 5
            a.counter("other").add()   # the rest of the arena is usable
        os.kill(sleeper, signal.SIGKILL)
        os.waitpid(sleeper, 0)
        with rseq.Arena.open(path) as a:   # creator gone: the claim is taken over
            a.counter("busy").add()
            assert a.values() == {"busy": 1, "other": 1}
    finally:
        try:
            os.kill(sleeper, signal.SIGKILL)
            os.waitpid(sleeper, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


def test_kill_test_slice():
    """100 SIGKILLs at random instants (the stress harness's kill test)."""
    from rseq.testing.stress import kill_test
    result = kill_test(kills=100, workers=3, seed=7)
    assert result.kills >= 100
    assert not result.problems
    assert result.committed <= result.got <= result.committed + result.kills, result.line()


# ---------------------------------------------------------------------------
# Bad files
# ---------------------------------------------------------------------------

def _rewrite_header(path, **changes):
    with open(path, "r+b") as f:
        data = bytearray(f.read(_arena._HEADER.size))
        fields = list(_arena._HEADER.unpack(bytes(data)))
        names = ["magic", "version", "header_size", "possible_cpus", "capacity", "entry_size",
                 "key_max", "index_mode", "flags", "table_offset", "regions_offset",
                 "region_size", "total_size", "creator_pid", "checksum"]
        for k, v in changes.items():
            fields[names.index(k)] = v
        packed = _arena._HEADER.pack(*fields)
        body = packed[:_arena._CHECKSUMMED]
        if "checksum" not in changes:
            packed = body + struct.pack("<I", zlib.crc32(body))
        f.seek(0)
        f.write(packed)


def _expect_format_error(path, match):
    with pytest.raises(rseq.ArenaFormatError, match=match):
        rseq.Arena.open(path)


def test_not_an_arena(tmp_path):
    p = tmp_path / "junk"
    p.write_bytes(b"#!/bin/sh\necho hello\n" * 400)
    _expect_format_error(str(p), "not an rseq arena")
    p.write_bytes(b"")
    _expect_format_error(str(p), "not an rseq arena")
    p.write_bytes(b"\0" * 10000)
    _expect_format_error(str(p), "not an rseq arena")


def test_truncated(path):
    rseq.Arena.create(path, capacity=16).close()
    size = os.path.getsize(path)
    os.truncate(path, size - 1)
    _expect_format_error(path, "truncated")
    os.truncate(path, 100)
    _expect_format_error(path, "truncated")


def test_other_version(path):
    rseq.Arena.create(path, capacity=16).close()
    _rewrite_header(path, version=_arena.VERSION + 1)
    _expect_format_error(path, f"version {_arena.VERSION + 1}")


def test_other_possible_cpu_count(path):
    rseq.Arena.create(path, capacity=16).close()
    # A consistent header made for another machine (more CPUs, bigger file).
    other = _arena.Layout.compute(POSSIBLE + 2, 16, _arena.DEFAULT_KEY_MAX)
    os.truncate(path, other.total_size)
    _rewrite_header(path, possible_cpus=other.possible_cpus, total_size=other.total_size)
    _expect_format_error(path, f"made for {POSSIBLE + 2} possible CPUs")


def test_checksum_and_inconsistent_layout(path):
    rseq.Arena.create(path, capacity=16).close()
    _rewrite_header(path, checksum=12345)
    _expect_format_error(path, "checksum")
    good = _arena.Layout.compute(POSSIBLE, 16, 80)
    _rewrite_header(path, regions_offset=good.regions_offset + 4096)
    _expect_format_error(path, "inconsistent")
    _rewrite_header(path, regions_offset=good.regions_offset, entry_size=64)
    _expect_format_error(path, "inconsistent")
    _rewrite_header(path, entry_size=good.entry_size)
    rseq.Arena.open(path).close()   # repaired: valid again
    _rewrite_header(path, regions_offset=_arena.Layout.compute(POSSIBLE, 16, 80).regions_offset,
                    capacity=2**30)
    _expect_format_error(path, "out of range")


def test_corrupt_entries_are_reported(path):
    with rseq.Arena.create(path, capacity=4) as a:
        a.counter("good").add()
        layout = a._layout
    index = _fnv1a64(b"good") % 4
    entry = layout.table_offset + index * layout.entry_size
    with open(path, "r+b") as f:
        f.seek(entry + 8)
        f.write(struct.pack("<I", 10_000))   # key length past the entry
    with rseq.Arena.open(path) as a:
        with pytest.raises(rseq.ArenaFormatError, match="corrupt"):
            a.keys()
        with pytest.raises(rseq.ArenaFormatError, match="corrupt"):
            a.counter("good")
    with open(path, "r+b") as f:
        f.seek(entry)
        f.write(struct.pack("<Q", 3 << 62))  # an unknown state
    with rseq.Arena.open(path) as a, pytest.raises(rseq.ArenaFormatError, match="corrupt"):
        a.counter("good")


def test_layout_checked_again_in_c(path):
    """The C side trusts no offset the Python side passes without checking."""
    with rseq.Arena.create(path, capacity=16) as a:
        lay = a._layout
        good = dict(table_offset=lay.table_offset, entry_size=lay.entry_size,
                    key_max=lay.key_max, capacity=lay.capacity,
                    regions_offset=lay.regions_offset, region_size=lay.region_size,
                    ncpu=lay.possible_cpus)
        rseq._core._ArenaMap(a._mmap, **good)
        for bad in (dict(ncpu=lay.possible_cpus + 64), dict(capacity=10**6),
                    dict(region_size=lay.region_size * 1000), dict(entry_size=32),
                    dict(regions_offset=lay.table_offset), dict(table_offset=7),
                    dict(capacity=0)):
            with pytest.raises(rseq.ArenaFormatError):
                rseq._core._ArenaMap(a._mmap, **(good | bad))
        with pytest.raises(BufferError):
            rseq._core._ArenaMap(b"read-only bytes", **good)
        m = rseq._core._ArenaMap(a._mmap, **good)
        with pytest.raises(IndexError):
            m.counter(16, "x")
        with pytest.raises(ValueError, match="not a published"):
            m.counter(3, "x")


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=_arena._HEADER.size + 16), size=st.integers(0, 1 << 24))
def test_fuzz_random_headers(data, size):
    try:
        layout = _arena.parse_header(data, size, POSSIBLE)
    except rseq.ArenaFormatError:
        return
    # Anything accepted must be exactly the layout this version would make.
    assert layout == _arena.Layout.compute(layout.possible_cpus, layout.capacity,
                                           layout.key_max)
    assert layout.total_size <= size


_VALID = _arena.Layout.compute(POSSIBLE, 16, 80).pack(1234)


@settings(max_examples=600, deadline=None)
@given(flips=st.lists(st.tuples(st.integers(0, len(_VALID) - 1), st.integers(0, 255)),
                      min_size=1, max_size=6),
       fix_checksum=st.booleans(), size=st.integers(0, 1 << 20))
def test_fuzz_mutated_headers(flips, fix_checksum, size):
    data = bytearray(_VALID)
    for offset, value in flips:
        data[offset] = value
    if fix_checksum:
        body = bytes(data[:_arena._CHECKSUMMED])
        data[_arena._CHECKSUMMED:] = struct.pack("<I", zlib.crc32(body))
    try:
        layout = _arena.parse_header(bytes(data), size, POSSIBLE)
    except rseq.ArenaFormatError:
        return
    assert layout == _arena.Layout.compute(POSSIBLE, layout.capacity, layout.key_max)
    assert layout.total_size <= size


@settings(max_examples=60, deadline=None)
@given(data=st.binary(min_size=0, max_size=9000))
def test_fuzz_files_through_open(tmp_path_factory, data):
    p = tmp_path_factory.mktemp("fuzz") / "f"
    p.write_bytes(data)
    with pytest.raises(rseq.ArenaFormatError):
        rseq.Arena.open(str(p))
