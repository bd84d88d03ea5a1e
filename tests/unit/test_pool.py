"""rseq.Pool: blocks shared between processes, ownership and its transfer,
reclaim of dead owners' blocks, exhaustion only when nothing is free
anywhere, and validation of everything read from the file."""
from __future__ import annotations

import mmap
import os
import signal
import stat
import struct
import subprocess
import sys
import threading
import time

import pytest

import rseq
from helpers.subproc import OWN_REGISTRATION, child_env, run_json
from rseq import _pool
from rseq.testing.stress import _pool_worker, pool_exact

CPUS = sorted(os.sched_getaffinity(0))


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "pool")


@pytest.fixture
def pool(path):
    with rseq.Pool.create(path, block_size=128, block_count=32, cache=4) as p:
        yield p


def pinned(cpu: int, fn, *args):
    """Run fn(*args) in a new thread pinned to ``cpu``; its result."""
    out: dict = {}

    def body():
        try:
            os.sched_setaffinity(0, {cpu})
            out["result"] = fn(*args)
            out["cpu_after"] = os.sched_getaffinity(0)
        except BaseException as e:  # re-raised in the caller
            out["error"] = e
    t = threading.Thread(target=body)
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    assert out["cpu_after"] == {cpu}, "the thread's affinity was not restored"
    return out["result"]


# ---------------------------------------------------------------------------
# Basic use
# ---------------------------------------------------------------------------

def test_alloc_write_view_free(path, pool):
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    block = pool.alloc()
    assert isinstance(block, rseq.PoolBlock)
    assert 0 <= block.index < 32
    mv = block.view
    assert len(mv) == 128 and not mv.readonly
    mv[:5] = b"hello"
    assert bytes(pool.view(block.index)[:5]) == b"hello"
    assert bytes(memoryview(block)[:5]) == b"hello"
    assert pool.owner(block.index) == (os.getpid(), rseq._procid.identity()[1])
    assert pool.stats().allocated == 1
    pool.free(block)
    assert pool.stats().allocated == 0
    assert pool_exact(pool) is None


def test_blocks_are_aligned_and_distinct(pool):
    import ctypes
    blocks = [pool.alloc() for _ in range(32)]
    assert sorted(b.index for b in blocks) == list(range(32))
    for b in blocks:
        address = ctypes.addressof(ctypes.c_char.from_buffer(b.view))
        assert address % 64 == 0
    for b in blocks:
        b.free()
    assert pool_exact(pool) is None


def test_with_frees_on_exit(pool):
    with pool.alloc() as mv:
        assert isinstance(mv, memoryview) and len(mv) == 128
        mv.cast("q")[0] = 7
        assert pool.stats().allocated == 1
    assert pool.stats().allocated == 0


def test_alloc_index_and_free_by_index(pool):
    indexes = [pool.alloc_index() for _ in range(10)]
    assert len(set(indexes)) == 10
    for i in indexes:
        pool.free(i)
    assert pool_exact(pool) is None


def test_memoryview_cast_and_numpy_without_copy(pool):
    block = pool.alloc()
    ints = block.view.cast("q")
    ints[3] = 12345
    assert struct.unpack_from("<q", pool.view(block.index), 24)[0] == 12345
    np = pytest.importorskip("numpy")
    array = np.frombuffer(block, dtype=np.float64)
    array[:] = 1.5
    assert np.frombuffer(pool.view(block.index), dtype=np.float64).sum() == 1.5 * 16
    del array
    block.free()


def test_other_process_sees_blocks_by_index(path, pool):
    block = pool.alloc()
    block.view[:4] = b"ping"
    out = run_json(f"""
        import json, rseq
        p = rseq.Pool.open({path!r})
        mv = p.view({block.index})
        seen = bytes(mv[:4])
        mv[:4] = b"pong"
        print(json.dumps(seen.decode()))
    """)
    assert out == "ping"
    assert bytes(block.view[:4]) == b"pong"
    block.free()


def test_stats_fields(pool):
    held = [pool.alloc_index() for _ in range(5)]
    s = pool.stats()
    assert s.block_count == 32 and s.block_size == 128
    assert len(s.free_per_cpu) == rseq.info().possible_cpus
    assert s.free == sum(s.free_per_cpu) + s.in_overflow == 27
    assert s.allocated == s.live_owned == 5 and s.dead_owned == 0
    assert s.owners == {os.getpid(): 5}
    for i in held:
        pool.free(i)


def test_threads_exact(pool):
    """More threads than CPUs allocate and free; each block checked."""
    results = []
    threads = [threading.Thread(target=lambda w=w: results.append(
        _pool_worker(pool._map, w, 3000, 3, w))) for w in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [0] * 6
    assert pool_exact(pool) is None


# ---------------------------------------------------------------------------
# Ownership
# ---------------------------------------------------------------------------

def test_double_free_raises(pool):
    i = pool.alloc_index()
    pool.free(i)
    with pytest.raises(rseq.PoolOwnershipError, match=f"block {i} is not allocated"):
        pool.free(i)
    block = pool.alloc()
    block.free()
    with pytest.raises(rseq.PoolOwnershipError, match="double free"):
        block.free()
    # A block never allocated is free in the overflow.
    fresh = max(set(range(32)) - {i, block.index})
    with pytest.raises(rseq.PoolOwnershipError, match="it is free"):
        pool.free(fresh)
    assert pool_exact(pool) is None


def test_free_by_non_owner_raises(path, pool):
    i = pool.alloc_index()
    out = run_json(f"""
        import json, rseq
        p = rseq.Pool.open({path!r})
        try:
            p.free({i})
            print(json.dumps("freed"))
        except rseq.PoolOwnershipError as e:
            print(json.dumps(str(e)))
    """)
    assert f"block {i} is not this process's: it is owned by process {os.getpid()}" in out
    pool.free(i)


def test_forked_child_does_not_own_parent_blocks(path, pool):
    i = pool.alloc_index()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            child = rseq.Pool.open(path)
            try:
                child.free(i)
            except rseq.PoolOwnershipError:
                j = child.alloc_index()
                child.free(j)
                code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    pool.free(i)
    assert pool_exact(pool) is None


def test_give_to_another_process(path, pool):
    """give() hands ownership: the receiver frees the block, the giver no
    longer may; if the receiver dies first, reclaim() returns it."""
    child = subprocess.Popen(
        [sys.executable, "-c", f"""
import sys, rseq
p = rseq.Pool.open({path!r})
print("ready", flush=True)
i = int(sys.stdin.readline())
assert bytes(p.view(i)[:4]) == b"gift"
p.free(i)
print("freed", flush=True)
sys.stdin.readline()
"""], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=child_env())
    try:
        assert child.stdout.readline().strip() == "ready"
        block = pool.alloc()
        block.view[:4] = b"gift"
        pool.give(block, child.pid)
        assert pool.owner(block.index)[0] == child.pid
        with pytest.raises(rseq.PoolOwnershipError, match="not this process's"):
            pool.free(block)
        child.stdin.write(f"{block.index}\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "freed"
        assert pool.stats().allocated == 0
        # Given to a process that then dies: reclaimed.
        j = pool.alloc_index()
        pool.give(j, child.pid)
        child.stdin.write("\n")
        child.stdin.flush()
        child.wait(timeout=30)
        assert pool.stats().dead_owned == 1
        assert pool.reclaim() == 1
        assert pool_exact(pool) is None
    finally:
        child.kill()
        child.wait()


def test_give_errors(pool):
    i = pool.alloc_index()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with pytest.raises(rseq.PoolError, match=f"no live process {dead.pid}"):
        pool.give(i, dead.pid)
    with pytest.raises(TypeError):
        pool.give(i, "1")
    pool.free(i)
    with pytest.raises(rseq.PoolOwnershipError):
        pool.give(i, os.getpid())
    with pytest.raises(IndexError):
        pool.give(32, os.getpid())


# ---------------------------------------------------------------------------
# Dead owners, exhaustion, CPUs
# ---------------------------------------------------------------------------

def test_dead_owner_blocks_reclaimed_by_exhausted_alloc(path, pool):
    """A process that dies holding every block: the next allocation finds
    nothing, runs reclaim() by itself, and succeeds."""
    pid = os.fork()
    if pid == 0:
        try:
            child = rseq.Pool.open(path)
            for _ in range(32):
                child.alloc_index()
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    s = pool.stats()
    assert s.dead_owned == 32 and s.live_owned == 0 and s.free == 0
    got = [pool.alloc_index() for _ in range(32)]
    assert sorted(got) == list(range(32))
    with pytest.raises(rseq.PoolExhaustedError, match="all 32 blocks are owned by live"):
        pool.alloc_index()
    for i in got:
        pool.free(i)
    assert pool_exact(pool) is None


def test_exhaustion_is_reported_and_recovers(pool):
    got = [pool.alloc_index() for _ in range(32)]
    with pytest.raises(rseq.PoolExhaustedError):
        pool.alloc()
    pool.free(got.pop())
    got.append(pool.alloc_index())
    for i in got:
        pool.free(i)


@pytest.mark.skipif(len(CPUS) < 2, reason="needs two CPUs")
def test_blocks_on_one_cpu_serve_a_thread_pinned_to_another(path):
    """Every free block sits on CPU a's stack; a thread pinned to CPU b
    still gets every one of them (it moves to a, takes, comes back)."""
    a, b = CPUS[0], CPUS[1]
    with rseq.Pool.create(path, block_size=64, block_count=16, cache=16) as pool:
        def fill():
            got = [pool.alloc_index() for _ in range(16)]
            for i in got:
                pool.free(i)
        pinned(a, fill)
        s = pool.stats()
        if not rseq.info().critical_sections:
            pytest.skip("no critical sections here: blocks never sit on CPU stacks")
        assert s.free_per_cpu[a] == 16 and s.in_overflow == 0
        got = pinned(b, lambda: [pool.alloc_index() for _ in range(16)])
        assert sorted(got) == list(range(16))
        with pytest.raises(rseq.PoolExhaustedError):
            pinned(b, pool.alloc_index)
        for i in got:
            pool.free(i)
        assert pool_exact(pool) is None


@pytest.mark.skipif(len(CPUS) < 2, reason="needs two CPUs")
def test_cross_cpu_free(path):
    a, b = CPUS[0], CPUS[1]
    with rseq.Pool.create(path, block_size=64, block_count=16, cache=8) as pool:
        got = pinned(a, lambda: [pool.alloc_index() for _ in range(6)])
        pinned(b, lambda: [pool.free(i) for i in got])
        s = pool.stats()
        if rseq.info().critical_sections:
            assert s.free_per_cpu[b] >= 6
        assert s.allocated == 0
        assert pool_exact(pool) is None


def test_hidden_free_blocks_are_found(path, pool):
    """Free blocks whose overflow hint was lost (a process killed between
    the two steps of a move) are found again before exhaustion is declared."""
    layout = pool._layout
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), 0) as raw:
        raw[layout.bitmap_offset:layout.bitmap_offset + 8] = bytes(8)
    got = [pool.alloc_index() for _ in range(32)]
    assert sorted(got) == list(range(32))
    for i in got:
        pool.free(i)
    assert pool_exact(pool) is None


def test_reclaim_is_safe_while_others_work(pool):
    stop = threading.Event()
    results = []

    def churn(w):
        results.append(_pool_worker(pool._map, w, 4000, 3, w))
    threads = [threading.Thread(target=churn, args=(w,)) for w in range(3)]
    for t in threads:
        t.start()
    reclaimed = 0
    while any(t.is_alive() for t in threads):
        reclaimed += pool.reclaim()
        time.sleep(0.001)
    stop.set()
    for t in threads:
        t.join()
    assert reclaimed == 0 and results == [0, 0, 0]
    assert pool_exact(pool) is None


def test_fallback_and_rseq_users_share_a_pool(path, pool):
    """A process where rseq is denied (overflow only, atomics) and one with
    rseq (CPU stacks) churn the same pool at once: still exact."""
    child = subprocess.Popen([sys.executable, "-c", f"""
import errno, threading, json
from helpers.seccomp import deny_rseq
deny_rseq(errno.ENOSYS)
import rseq
from rseq.testing.stress import _pool_worker
assert not rseq.info().critical_sections or rseq.info().fallback
p = rseq.Pool.open({path!r})
out = []
ts = [threading.Thread(target=lambda w=w: out.append(_pool_worker(p._map, 10 + w, 3000, 3, w)))
      for w in range(3)]
for t in ts: t.start()
for t in ts: t.join()
print(json.dumps(out))
"""], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=child_env(OWN_REGISTRATION))
    mine = [_pool_worker(pool._map, 0, 6000, 3, 0)]
    out, err = child.communicate(timeout=120)
    assert child.returncode == 0, err
    assert out.strip().splitlines()[-1] == "[0, 0, 0]" and mine == [0]
    assert pool_exact(pool) is None


# ---------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("size", [0, -64, 100, 63, 65])
def test_bad_block_size(path, size):
    with pytest.raises(ValueError, match="multiple of 64"):
        rseq.Pool.create(path, block_size=size, block_count=4)
    assert not os.path.exists(path)


def test_bad_arguments(path):
    with pytest.raises(ValueError, match="block_count"):
        rseq.Pool.create(path, block_size=64, block_count=0)
    with pytest.raises(ValueError, match="block_count"):
        rseq.Pool.create(path, block_size=64, block_count=2**32 + 1)
    with pytest.raises(TypeError):
        rseq.Pool.create(path, block_size=64.0, block_count=4)
    with pytest.raises(TypeError):
        rseq.Pool.create(path, block_size=True, block_count=4)
    with pytest.raises(ValueError, match="cache"):
        rseq.Pool.create(path, block_size=64, block_count=4, cache=5)
    with pytest.raises(ValueError, match="cache"):
        rseq.Pool.create(path, block_size=64, block_count=4, cache=0)
    with pytest.raises(ValueError, match="more than"):
        rseq.Pool.create(path, block_size=2**40, block_count=2**20)
    assert not os.path.exists(path)


def test_bad_indexes(pool):
    for bad in (-1, 32, 2**64, 2**100):
        with pytest.raises(IndexError, match="out of range"):
            pool.free(bad)
        with pytest.raises(IndexError, match="out of range"):
            pool.view(bad)
    for bad in ("1", 1.0, None):
        with pytest.raises(TypeError):
            pool.free(bad)
        with pytest.raises(TypeError):
            pool.view(bad)
    # alloc and alloc_index are METH_FASTCALL (the fast call path): they
    # still refuse arguments, and allocate nothing when they do.
    before = pool.stats().free
    for method in (pool.alloc, pool.alloc_index):
        with pytest.raises(TypeError, match="takes no arguments"):
            method(1)
        with pytest.raises(TypeError):
            method(n=1)
    assert pool.stats().free == before


def test_block_of_another_pool(tmp_path, pool):
    with rseq.Pool.create(str(tmp_path / "other"), block_size=128, block_count=32) as other:
        block = other.alloc()
        with pytest.raises(ValueError, match="another pool"):
            pool.free(block)
        block.free()


def test_closed_pool(pool):
    block = pool.alloc()
    pool.close()
    with pytest.raises(rseq.PoolError, match="closed"):
        pool.alloc()
    with pytest.raises(rseq.PoolError, match="closed"):
        pool.stats()
    block.view[:1] = b"x"   # the block keeps the memory mapped
    block.free()


def test_readonly_open(path, pool):
    i = pool.alloc_index()
    with rseq.Pool.open(path, readonly=True) as ro:
        assert ro.readonly
        assert ro.stats().allocated == 1
        assert ro.view(i).readonly
        for call in (ro.alloc, ro.alloc_index, ro.reclaim):
            with pytest.raises(rseq.PoolError, match="read-only"):
                call()
        with pytest.raises(rseq.PoolError, match="read-only"):
            ro.free(i)
    pool.free(i)


def test_existing_name_and_squatted_files(tmp_path, path, pool):
    with pytest.raises(FileExistsError, match="pool"):
        rseq.Pool.create(path, block_size=64, block_count=4)
    link = str(tmp_path / "link")
    os.symlink(path, link)
    with pytest.raises(PermissionError, match="symbolic link"):
        rseq.Pool.open(link)
    os.chmod(path, 0o666)
    with pytest.raises(PermissionError, match="writable by every user"):
        rseq.Pool.open(path)
    os.chmod(path, 0o600)
    fifo = str(tmp_path / "fifo")
    os.mkfifo(fifo, 0o600)
    with pytest.raises(PermissionError, match="FIFO"):
        rseq.Pool.open(fifo)
    with pytest.raises(FileNotFoundError, match="no pool"):
        rseq.Pool.open(str(tmp_path / "absent"))


def test_damaged_files(tmp_path, path, pool):
    pool.close()
    with open(path, "rb") as f:
        data = f.read()
    size = len(data)

    def reopen(content: bytes, name: str = "bad"):
        bad = str(tmp_path / name)
        with open(bad, "wb") as f:
            f.write(content)
        os.chmod(bad, 0o600)
        return rseq.Pool.open(bad)

    with pytest.raises(rseq.ArenaFormatError, match="empty"):
        reopen(b"")
    with pytest.raises(rseq.ArenaFormatError, match="not an rseq pool"):
        reopen(b"x" * size)
    with pytest.raises(rseq.ArenaFormatError, match="truncated pool"):
        reopen(data[:size - 4096])
    for offset in range(0, _pool.FORMAT.size):
        damaged = bytearray(data)
        damaged[offset] ^= 0x10
        with pytest.raises(rseq.ArenaFormatError):
            reopen(bytes(damaged))
    # An arena is not a pool.
    arena_path = str(tmp_path / "arena")
    rseq.Arena.create(arena_path, capacity=4).close()
    with pytest.raises(rseq.ArenaFormatError, match="bad magic"):
        rseq.Pool.open(arena_path)


def test_damaged_stack_is_reported(path, pool):
    layout = pool._layout
    if not rseq.info().critical_sections:
        pytest.skip("the CPU stacks are used by critical sections only")
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), 0) as raw:
        for cpu in range(layout.possible_cpus):   # a count past the cache
            struct.pack_into("<q", raw, layout.stacks_offset + cpu * layout.stack_size, 99)
        with pytest.raises(rseq.ArenaFormatError, match="corrupt"):
            pool.alloc_index()
        for cpu in range(layout.possible_cpus):   # a slot out of range
            base = layout.stacks_offset + cpu * layout.stack_size
            struct.pack_into("<q", raw, base, 1)
            struct.pack_into("<q", raw, base + _pool.STACK_HEAD, 10**6)
        with pytest.raises(rseq.ArenaFormatError, match="corrupt"):
            pool.alloc_index()
        assert pool._map.census(False)["damaged"] == layout.possible_cpus


def test_killed_holder_leaves_blocks_reclaimable(path, pool):
    """SIGKILL a process that holds blocks: they are dead-owned, not lost."""
    child = subprocess.Popen([sys.executable, "-c", f"""
import rseq, time
p = rseq.Pool.open({path!r})
held = [p.alloc_index() for _ in range(7)]
print("held", flush=True)
time.sleep(60)
"""], stdout=subprocess.PIPE, text=True, env=child_env())
    assert child.stdout.readline().strip() == "held"
    assert pool.stats().live_owned == 7
    child.send_signal(signal.SIGKILL)
    child.wait()
    s = pool.stats()
    assert s.dead_owned == 7 and s.live_owned == 0 and s.owners == {}
    assert pool.reclaim() == 7
    assert pool.reclaim() == 0
    assert pool_exact(pool) is None


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

def test_cli_pool_stats(path, pool):
    import json

    from helpers.subproc import run_rseq_cli
    held = [pool.alloc_index() for _ in range(3)]
    proc = run_rseq_cli("pool", "stats", path)
    assert proc.returncode == 0, proc.stderr
    assert "32 blocks of 128 bytes" in proc.stdout
    assert "3 by live processes" in proc.stdout and f"pid {os.getpid()}:3" in proc.stdout
    proc = run_rseq_cli("pool", "stats", path, "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["allocated"] == data["live_owned"] == 3 and data["free"] == 29
    assert data["owners"] == {str(os.getpid()): 3}
    for i in held:
        pool.free(i)
    proc = run_rseq_cli("pool", "stats", path + "-absent")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "no pool" in proc.stderr
    proc = run_rseq_cli("pool")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1


# ---------------------------------------------------------------------------
# Benchmark section and the steady state's system calls
# ---------------------------------------------------------------------------

def test_bench_pool_section_structure():
    from rseq import _bench
    result = _bench.bench_pool(quick=True)
    assert {"title", "unit", "rounds", "ns", "ratio_to_floor", "floor", "targets",
            "c_level_ns"} <= set(result)
    assert {"{}.get(1) [floor]", "pool.alloc_index() + pool.free(i)",
            "pool.alloc() + block.view + free", "pool.alloc() + memoryview(block) + free",
            "with pool.alloc() as mv: (frees)", "bytearray(64)", "bytearray(4096)",
            "SharedMemory(4096) + close + unlink"} <= set(result["ns"])
    assert all(0 < v < 1e7 for v in result["ns"].values())
    assert all(0 < v < 1e5 for v in result["c_level_ns"].values())
    assert "pool" in _bench.SECTIONS


def test_steady_state_makes_no_system_calls():
    """strace -c -f of 200,000 alloc_index() + free() pairs counts the same
    system calls as the same script without the loop."""
    import shutil

    from rseq import _bench
    if shutil.which("strace") is None:
        pytest.skip("strace is not installed (apt-get install strace)")
    result = _bench.pool_syscalls(200_000)
    if result is None:
        pytest.skip("strace could not trace here (ptrace denied?)")
    # A few calls of slack for the interpreter's own start-up noise.
    assert result["syscalls with the loop"] - result["syscalls without the loop"] < 20, result


@pytest.mark.usefixtures("kernel_rseq")
def test_lost_registration_moves_to_the_overflow(path, pool):
    """A registration ended behind the package's back: the pool's sequences
    would abort forever; the thread moves to the fallback (info().fallback
    says so) and uses the overflow, still exact beside rseq users."""
    got = run_json(f"""
        import json, threading
        import rseq, rseq._inject
        from rseq.testing.stress import _pool_worker, pool_exact
        pool = rseq.Pool.open({path!r})
        out = {{}}
        def lost():
            i = rseq.info()
            out["unregister"] = rseq._inject.rseq_syscall(i.area_address, i.registered_size,
                                                          1, rseq._core.SIGNATURE)
            out["clashes"] = _pool_worker(pool._map, 1, 5000, 3, 1)
            out["fallback"] = rseq.info().fallback
        def normal():
            out["normal"] = _pool_worker(pool._map, 2, 5000, 3, 2)
        ts = [threading.Thread(target=lost), threading.Thread(target=normal)]
        for t in ts: t.start()
        for t in ts: t.join(timeout=60)
        out["exact"] = pool_exact(pool)
        print(json.dumps(out))
    """, timeout=120)
    assert got["unregister"] == 0
    assert got["clashes"] == 0 and got["normal"] == 0
    assert got["fallback"], got
    assert got["exact"] is None


def test_aborted_pop_is_not_ownership(path, pool):
    """An aborted pop may leave its speculative owner store (me | POPPING) on
    a block still on a stack: a double free of that block by the same
    process must still raise, not push it twice."""
    if not rseq.info().critical_sections:
        pytest.skip("no critical sections here: blocks never sit on CPU stacks")
    i = pool.alloc_index()
    pool.free(i)
    layout = pool._layout
    pid, started = pool._map.identity()
    popping = (1 << 62) | (started << 22) | pid
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), 0) as raw:
        struct.pack_into("<Q", raw, layout.owners_offset + 8 * i, popping)
    with pytest.raises(rseq.PoolOwnershipError, match="being taken by"):
        pool.free(i)
    assert pool_exact(pool) is None


def test_pool_builds_with_arm64_sequences(tmp_path):
    """pool.h uses only percpu.h's primitives, so the arm64 port covers it:
    cross-compiled, its pop and push are real critical sections there."""
    import shutil
    gcc = shutil.which("aarch64-linux-gnu-gcc")
    objdump = shutil.which("aarch64-linux-gnu-objdump")
    if not gcc or not objdump:
        pytest.skip("no arm64 cross compiler (tests/arch/install-arm64-tools.sh installs it)")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    source = tmp_path / "pool_arm64.c"
    source.write_text("""
#define _GNU_SOURCE
#include "pool.h"
int64_t use(struct rseq_pool *p, struct rseq_abi *rs)
{
    uint64_t me = rseq_pool_self(), owner;
    int64_t i = rseq_pool_alloc(p, rs, me);
    if (i >= 0)
        rseq_pool_free(p, rs, me, (uint64_t)i, &owner);
    return i;
}
""")
    obj = tmp_path / "pool_arm64.o"
    subprocess.run([gcc, "-std=gnu11", "-O2", "-Wall", "-Wextra", "-Werror",
                    "-I", os.path.join(root, "csrc", "lib"),
                    "-I", os.path.join(root, "src", "rseq", "include"),
                    "-c", str(source), "-o", str(obj)], check=True, capture_output=True)
    headers = subprocess.run([objdump, "-h", str(obj)], check=True, capture_output=True,
                             text=True).stdout
    assert "__rseq_cs " in headers and "__rseq_failure" in headers
