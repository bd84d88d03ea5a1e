"""``python -m rseq stress``: the stress matrix and the kill test.

Every case runs workers (more than there are CPUs) that hammer one structure
from the test build ``rseq._inject`` while an injection point inside the
critical section is widened and the workers are disturbed, then checks the
exact expected total:

  structure   PerCpuCounter (threads) and ArenaCounter (threads, processes),
              each per-CPU primitive (rseq._inject.PRIMITIVES), and rseq.Pool
              (threads, processes: no block with two holders, every block
              free exactly once at the end)
  point       the numbered injection points of inject.h
  action      yield / sleep at the C points, or a signal storm
  index       cpu_id, and mm_cid where the registration covers it (the mm_cid
              half re-runs itself with GLIBC_TUNABLES=glibc.pthread.rseq=0)
  workers     threads or processes, with a mover thread migrating them

The kill test SIGKILLs arena workers at random instants and checks that the
arena still validates, no key is left claimed by a dead process in a way
that blocks, and the counter lies between what the workers had committed and
that plus one per kill.  The pool kill test SIGKILLs allocating processes and
checks that reclaim() gives back every block they held, each free once.
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import itertools
import json
import mmap
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable

import rseq

# The test build: importing it loads a second extension (the per-CPU code
# with delay loops), registers nothing and installs no handler, so there is
# no reason to defer it.
from .. import _inject
from .._cli import positive_int

ACTIONS = ("yield", "signal", "sleep")
# Injection points (inject.h) that each structure passes through, from the
# one table in C (csrc/testing/workload.c, rseq._inject.INJECTION_POINTS).
COUNTER_POINTS = _inject.INJECTION_POINTS["counter"]
PRIMITIVE_POINTS = {name: _inject.INJECTION_POINTS[name] for name in _inject.PRIMITIVES}
QUICK_POINTS = (3, 4, 7)


@dataclasses.dataclass
class CaseResult:
    name: str
    expected: int
    got: int
    aborts: int
    seconds: float
    skipped: str | None = None

    @property
    def ok(self) -> bool:
        return self.skipped is not None or self.expected == self.got

    def line(self) -> str:
        if self.skipped:
            return f"  skip  {self.name}: {self.skipped}"
        status = "ok  " if self.ok else "FAIL"
        return (f"  {status}  {self.name}: expected {self.expected}, got {self.got} "
                f"({self.aborts} aborts, {self.seconds:.2f}s)")


# ---------------------------------------------------------------------------
# Disturbances
# ---------------------------------------------------------------------------

def _ignore(signum, frame):
    pass


class _SharedCounts:
    """One int64 per worker process, in memory the parent shares with them."""

    def __init__(self, n: int):
        self._map = mmap.mmap(-1, 8 * n)
        self._view = memoryview(self._map).cast("q")

    def __setitem__(self, i: int, value: int):
        self._view[i] = value

    def total(self) -> int:
        return sum(self._view)


class Disturber:
    """A separate process that signals and migrates the workers until stopped.

    A process, not a thread: a Python thread needs the GIL to act, and worker
    threads hold it while they run, so it would rarely get to migrate or
    signal one in the middle of an operation.  It is forked before any worker
    exists, and learns its targets through shared memory:
    [count, rounds, (kind, id, state)...] with kind 1 a thread of this
    process, 2 a worker process.

    It must never hit anything but a live worker, neither another process
    on the machine nor this one after the case (where SIGUSR1 is back at its
    default action, which kills).  So every target is dropped before it can
    go away, with a handshake (:meth:`drop` returns once the disturber has
    finished every round that could still see the target):

    - a worker thread drops itself before it returns: ``join()`` returns
      before the kernel thread is gone, and a SIGUSR1 still pending on it
      once the case restored the default action killed the whole process
      (the load-dependent deaths of issue 8 item 16);
    - a worker process is dropped after it exited but before it is reaped
      (``waitid(WNOWAIT)`` first): until then its pid cannot be reused, so
      neither a signal nor a migration can land on a recycled pid.  Signals
      go through a pidfd as well (Linux 5.3), which cannot name another
      process at all; threads are signalled with tgkill and this process's
      tgid, which cannot name a thread of another process.
    """

    MAX_TARGETS = 256
    _THREAD, _PROCESS = 1, 2
    _ACTIVE, _DROPPED = 1, 2
    #: Seconds drop() waits for the disturber before stopping it outright.
    DROP_TIMEOUT = 10.0

    def __init__(self, storm: bool, migrate: bool):
        self.storm = storm
        self.migrate = migrate
        self._map = mmap.mmap(-1, 8 * (2 + 3 * self.MAX_TARGETS))
        self._view = memoryview(self._map).cast("q")
        self._lock = threading.RLock()
        self._pid: int | None = None

    def add_thread(self, tid: int) -> int:
        """Disturb thread ``tid`` of this process; returns its slot for drop()."""
        return self._add(self._THREAD, tid)

    def add_process(self, pid: int) -> int:
        """Disturb child process ``pid`` (not yet reaped); returns its slot."""
        return self._add(self._PROCESS, pid)

    def _add(self, kind: int, ident: int) -> int:
        with self._lock:
            n = self._view[0]
            if n >= self.MAX_TARGETS:
                return -1
            base = 2 + 3 * n
            self._view[base] = kind
            self._view[base + 1] = ident
            self._view[base + 2] = self._ACTIVE
            self._view[0] = n + 1  # published after the entry is complete
            return n

    def rounds(self) -> int:
        """Rounds the disturber has completed (each acts on every target once)."""
        return self._view[1]

    def drop(self, slot: int) -> None:
        """Stop disturbing ``slot``; returns once no signal or migration can
        still reach it (or once the disturber is stopped)."""
        if slot < 0:
            return
        self._view[2 + 3 * slot + 2] = self._DROPPED
        pid = self._pid
        if pid is None:
            return
        # The round under way may have read the target as active and the
        # store above may become visible after the load below (x86 TSO):
        # three more completed rounds began after the drop was visible.
        target = self.rounds() + 3
        deadline = time.monotonic() + self.DROP_TIMEOUT
        while self.rounds() < target:
            if self._pid != pid:
                return  # stopped meanwhile
            # Exited (not reaped: only stop() reaps, so its pid stays ours)?
            exited = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            if exited is not None or time.monotonic() > deadline:
                self.stop()  # stopped or dead: it can reach nothing now
                return
            time.sleep(0.0002)

    def start(self) -> None:
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:
            try:
                self._run(parent)
            finally:
                os._exit(0)
        self._pid = pid

    def stop(self) -> None:
        with self._lock:  # one caller reaps; nobody signals it after that
            pid, self._pid = self._pid, None
            if pid is not None:
                os.kill(pid, signal.SIGKILL)  # our unreaped child: cannot be recycled
                os.waitpid(pid, 0)

    def _run(self, parent: int) -> None:
        tgkill = getattr(ctypes.CDLL(None, use_errno=True), "tgkill", None)  # glibc >= 2.30
        cpus = sorted(os.sched_getaffinity(0))
        rng = random.Random(1)
        pidfds: dict[int, int | None] = {}  # slot -> pidfd of an active worker process
        view = self._view
        while os.getppid() == parent:  # reparented: the case's process is gone
            for slot in range(view[0]):
                kind, ident, state = view[2 + 3 * slot: 5 + 3 * slot]
                if state != self._ACTIVE:
                    fd = pidfds.pop(slot, None)
                    if fd is not None:
                        os.close(fd)
                    continue
                if self.storm:
                    if kind == self._THREAD:
                        if tgkill is not None:
                            tgkill(parent, ident, signal.SIGUSR1)
                        else:
                            os.kill(parent, signal.SIGUSR1)
                    else:
                        self._signal_process(slot, ident, pidfds)
                if self.migrate and len(cpus) > 1:
                    with contextlib.suppress(OSError):
                        os.sched_setaffinity(ident, {rng.choice(cpus)})
            view[1] += 1
            time.sleep(0.0002 if self.storm else 0.001)

    @staticmethod
    def _signal_process(slot: int, pid: int, pidfds: dict[int, int | None]) -> None:
        # Active means not reaped yet (the parent drops before it reaps), so
        # the pidfd opened here names the worker, never a recycled pid.
        try:
            if slot not in pidfds:
                try:
                    pidfds[slot] = os.pidfd_open(pid)
                except (AttributeError, OSError) as e:
                    if isinstance(e, ProcessLookupError):
                        raise
                    pidfds[slot] = None  # no pidfds (Linux < 5.3): the pid, still ours
            fd = pidfds[slot]
            if fd is None:
                os.kill(pid, signal.SIGUSR1)
            else:
                signal.pidfd_send_signal(fd, signal.SIGUSR1)
        except ProcessLookupError:
            pass  # exited, not reaped yet


def _fork_workers(nworkers: int, body: Callable[[int], None], disturber: Disturber,
                  first: int = 0) -> tuple[list, _SharedCounts]:
    """Fork `nworkers` children running body(first + k); see _reap_workers.

    Each child reports its abort count through shared memory before leaving
    without cleanup."""
    aborts = _SharedCounts(nworkers)
    workers = []
    for k in range(nworkers):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                body(first + k)
                aborts[k] = _inject.aborts()
                code = 0
            finally:
                os._exit(code)
        workers.append((pid, disturber.add_process(pid)))
    return workers, aborts


def _reap_workers(workers: list, aborts: _SharedCounts, disturber: Disturber) -> int:
    """Wait for forked workers; returns their aborts.  A child is dropped
    from the disturber after it exited and before it is reaped: its pid is
    never signalled once it may be reused."""
    failures = 0
    for pid, slot in workers:
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)  # exited, still not reaped
        disturber.drop(slot)
        _, status = os.waitpid(pid, 0)
        failures += os.waitstatus_to_exitcode(status) != 0
    if failures:
        raise RuntimeError(f"{failures} worker process(es) failed")
    return aborts.total()


def _run_processes(nworkers: int, body: Callable[[int], None], disturber: Disturber) -> int:
    """Fork `nworkers` children running body(worker); returns their aborts."""
    return _reap_workers(*_fork_workers(nworkers, body, disturber), disturber)


def _configure_injection(inject, point: int, loops: int, action: str):
    inject.reset()
    inject.set_loops(point, loops)
    if action == "yield":
        inject.set_mode(inject.MODE_YIELD, every=7)
    elif action == "sleep":
        inject.set_mode(inject.MODE_SLEEP, every=97, sleep_us=100)
    elif action == "signal":
        # The storm comes from the disturber; the C points raise too.
        inject.set_mode(inject.MODE_SIGNAL, every=13)


# ---------------------------------------------------------------------------
# Counter cases
# ---------------------------------------------------------------------------

def _run_threads(n: int, body: Callable[[], None], disturber: Disturber):
    ready = threading.Barrier(n + 1)

    def worker():
        slot = disturber.add_thread(threading.get_native_id())
        try:
            ready.wait()
            body()
        finally:
            # Dropped while this thread surely runs (see Disturber); the
            # sleep returns to user space once more, so that a signal sent
            # before the drop is delivered now, under the case's handler.
            disturber.drop(slot)
            time.sleep(0)

    threads = [threading.Thread(target=worker) for _ in range(n)]
    for t in threads:
        t.start()
    ready.wait()
    for t in threads:
        t.join()


def _skip_reason(index: str, workers: str) -> str | None:
    """Why an index mode cannot run with this kind of worker, or None."""
    if workers == "processes" and index == "mm_cid":
        return "mm_cid is per process: shared structures index by cpu_id"
    if index == "mm_cid" and "mm_cid" not in rseq.info().fields:
        return "mm_cid not usable under this registration"
    return None


def _run_case(name: str, *, point: int, action: str, loops: int, workers: str,
              nworkers: int, migrate: bool,
              setup: Callable[[contextlib.ExitStack], tuple]) -> CaseResult:
    """The skeleton every stress case shares.

    ``setup(stack)`` builds the structure (registering its cleanup on
    ``stack``) and returns ``(work, check)``: ``work(worker, in_child)`` runs
    one worker's operations, ``check()`` returns ``(expected, got)``.  The
    workers run as threads, forked processes, or both at once ("mixed":
    producers in several processes and several threads of this one), while
    the injection point is widened and a disturber signals and migrates
    them."""
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        old_handler = signal.signal(signal.SIGUSR1, _ignore)
        stack.callback(signal.signal, signal.SIGUSR1, old_handler)
        stack.callback(_inject.reset)
        disturber = Disturber(storm=action == "signal", migrate=migrate)
        stack.callback(disturber.stop)  # idempotent; also on the error path
        _configure_injection(_inject, point, loops, action)
        work, check = setup(stack)
        child_aborts = 0
        disturber.start()
        if workers == "threads":
            numbers = itertools.count()
            _run_threads(nworkers, lambda: work(next(numbers), False), disturber)
        elif workers == "mixed":
            # Processes (forked first, while this process has no worker
            # thread) and threads of this process produce at the same time.
            nprocesses = max(1, nworkers // 2)
            forked = _fork_workers(nprocesses, lambda w: work(w, True), disturber)
            numbers = itertools.count(nprocesses)
            try:
                _run_threads(nworkers - nprocesses, lambda: work(next(numbers), False),
                             disturber)
            finally:
                child_aborts = _reap_workers(*forked, disturber)
        else:
            child_aborts = _run_processes(nworkers, lambda w: work(w, True), disturber)
        disturber.stop()
        expected, got = check()
        return CaseResult(name, expected, got, _inject.aborts() + child_aborts,
                          time.perf_counter() - start)


def counter_case(*, structure: str, point: int, action: str, index: str, workers: str,
                 nworkers: int, reps: int, loops: int, migrate: bool = True) -> CaseResult:
    name = (f"{structure:<7} point={point} action={action:<6} index={index:<6} "
            f"workers={workers}")
    if workers == "processes" and structure != "arena":
        return CaseResult(name, 0, 0, 0, 0.0, "in-process counters are per process")
    skipped = _skip_reason(index, workers)
    if skipped:
        return CaseResult(name, 0, 0, 0, 0.0, skipped)

    def setup(stack):
        if structure == "counter":
            counter = _inject.PerCpuCounter(index=index)
            path = None
        else:
            path = os.path.join(stack.enter_context(
                tempfile.TemporaryDirectory(prefix="rseq-stress-")), "arena")
            arena = stack.enter_context(rseq.Arena.create(path, capacity=8))
            arena.counter("total")
            counter = _arena_counter(_inject, arena, "total")

        def work(worker, in_child):
            # A worker process opens the arena by name, as another process would.
            add = (_arena_counter(_inject, rseq.Arena.open(path), "total").add
                   if in_child else counter.add)
            for _i in range(reps):
                add(1)
        return work, lambda: (nworkers * reps, counter.value())

    return _run_case(name, point=point, action=action, loops=loops, workers=workers,
                     nworkers=nworkers, migrate=migrate, setup=setup)


def _arena_counter(inject, arena, key: str):
    """The counter of `arena` under `key`, through the test build's types."""
    return arena._counter_through(inject, key)


# ---------------------------------------------------------------------------
# Primitive cases (the C workers of rseq._inject)
# ---------------------------------------------------------------------------

def primitive_names() -> tuple[str, ...]:
    return tuple(_inject.PRIMITIVES)


def primitive_case(*, primitive: str, point: int, action: str, index: str, workers: str,
                   nworkers: int, reps: int, loops: int, migrate: bool = True) -> CaseResult:
    name = (f"{primitive:<7} point={point} action={action:<6} index={index:<6} "
            f"workers={workers}")
    skipped = _skip_reason(index, workers)
    if skipped:
        return CaseResult(name, 0, 0, 0, 0.0, skipped)

    def setup(stack):
        shared = mmap.mmap(-1, _inject.primitive_size(primitive, nworkers))
        stack.callback(shared.close)
        _inject.primitive_init(primitive, shared, nworkers)

        def work(worker, in_child):
            _inject.primitive_run(primitive, shared, worker, reps, index)
        return work, lambda: _inject.primitive_check(primitive, shared, nworkers, reps)

    return _run_case(name, point=point, action=action, loops=loops, workers=workers,
                     nworkers=nworkers, migrate=migrate, setup=setup)


# ---------------------------------------------------------------------------
# Pool cases (rseq.Pool through the test build)
# ---------------------------------------------------------------------------

# Points the pool passes through: 1-4 inside its pop and push sequences, 7
# before them, 8 between reading a stack and its sequence (and inside the
# overflow's two-step moves), 9 after an abort.
POOL_POINTS = _inject.INJECTION_POINTS["pool"]


def pool_exact(pool) -> str | None:
    """None if every block of ``pool`` is free exactly once (nobody owns
    any); otherwise what is wrong.  Stack entries counted twice would make
    the free count pass the block count, a lost block would leave it short."""
    census = pool._map.census(False)
    free = census["on_stacks"] + census["in_overflow"]
    if census["live_owned"] or census["dead_owned"] or census["damaged"] or \
            free != pool.block_count:
        return (f"{pool.block_count} blocks: {census['on_stacks']} on CPU stacks + "
                f"{census['in_overflow']} in the overflow, {census['live_owned']} owned by "
                f"live and {census['dead_owned']} by dead processes, "
                f"{census['damaged']} damaged stack entries")
    return None


def _pool_worker(pool_map, worker: int, reps: int, hold: int, seed: int) -> int:
    """Allocate and free ``reps`` blocks, holding up to ``hold`` at once; each
    block carries its holder's tag at both ends, checked before it is freed.
    Returns the number of blocks found with another holder's tag."""
    rng = random.Random(seed)
    held: list[tuple[int, memoryview, int]] = []
    clashes = 0
    for n in range(reps):
        index = pool_map.alloc_index()
        view = pool_map.view(index).cast("q")
        tag = (worker + 1) << 32 | n
        view[0] = tag
        view[-1] = tag
        held.append((index, view, tag))
        if len(held) >= hold or rng.random() < 0.5:
            index, view, tag = held.pop(rng.randrange(len(held)))
            clashes += view[0] != tag or view[-1] != tag
            pool_map.free(index)
    for index, view, tag in held:
        clashes += view[0] != tag or view[-1] != tag
        pool_map.free(index)
    return clashes


def pool_case(*, point: int, action: str, workers: str, nworkers: int, reps: int,
              loops: int, migrate: bool = True, blocks: int = 24, cache: int = 4,
              hold: int = 3) -> CaseResult:
    """Threads or processes allocate and free under the disturber with one
    injection point widened; expected: every cycle clean (no block with two
    holders) and, at the end, every block free exactly once."""
    import rseq

    from .. import _inject

    name = f"pool    point={point} action={action:<6} index=cpu    workers={workers}"

    def setup(stack):
        path = os.path.join(stack.enter_context(
            tempfile.TemporaryDirectory(prefix="rseq-stress-")), "pool")
        pool = stack.enter_context(rseq.Pool.create(path, block_size=64, block_count=blocks,
                                                    cache=cache))
        shared_map = pool._map_through(_inject)
        clashes = _SharedCounts(nworkers)

        def work(worker, in_child):
            pool_map = (rseq.Pool.open(path)._map_through(_inject) if in_child
                        else shared_map)
            clashes[worker] = _pool_worker(pool_map, worker, reps, hold, worker)

        def check():
            problem = pool_exact(pool)
            bad = clashes.total()
            # got = clean cycles; a clash or an inexact pool shows as a shortfall
            got = nworkers * reps - bad - (problem is not None)
            if problem:
                print(f"  pool not exact after {name}: {problem}", file=sys.stderr)
            return nworkers * reps, got
        return work, check

    return _run_case(name, point=point, action=action, loops=loops, workers=workers,
                     nworkers=nworkers, migrate=migrate, setup=setup)


# ---------------------------------------------------------------------------
# Kill test
# ---------------------------------------------------------------------------

@dataclasses.dataclass
class KillResult:
    kills: int
    committed: int
    got: int
    keys_checked: int
    claimed_by_dead: int
    seconds: float
    problems: list

    @property
    def ok(self) -> bool:
        return not self.problems and self.committed <= self.got <= self.committed + self.kills

    def line(self) -> str:
        status = "ok  " if self.ok else "FAIL"
        text = (f"  {status}  kill test: {self.kills} SIGKILLs, committed {self.committed}, "
                f"counter {self.got} (allowed {self.committed}..{self.committed + self.kills}), "
                f"{self.keys_checked} keys re-validated, {self.claimed_by_dead} claims "
                f"taken over, {self.seconds:.1f}s")
        return "\n".join([text] + [f"        problem: {p}" for p in self.problems])


def _kill_worker(path: str, done_path: str, slot: int, key_space: int, seed: int):
    rng = random.Random(seed)
    with open(done_path, "r+b") as f:
        done = mmap.mmap(f.fileno(), 0)
    view = memoryview(done).cast("q")
    arena = rseq.Arena.open(path)
    total = arena.counter("total")
    committed = 0
    while True:
        # Creating keys at random instants puts kills inside key creation too.
        if rng.random() < 0.01:
            arena.counter(f"key-{rng.randrange(key_space)}").add(1)
        total.add(1)
        committed += 1
        view[slot] = committed   # after the add returned: at most one ahead


def kill_test(kills: int = 100, workers: int = 3, seed: int = 0) -> KillResult:
    if kills < 1 or workers < 1:
        raise ValueError(f"kill_test needs kills >= 1 and workers >= 1, got {kills}, {workers}")
    rng = random.Random(seed)
    start = time.perf_counter()
    tmpdir = tempfile.mkdtemp(prefix="rseq-kill-")
    path = os.path.join(tmpdir, "arena")
    done_path = os.path.join(tmpdir, "done")
    slots = kills + workers + 1
    with open(done_path, "wb") as f:
        f.write(b"\0" * 8 * slots)
    problems = []
    key_space = 40
    arena = rseq.Arena.create(path, capacity=64)
    arena.counter("total")
    killed = 0
    next_slot = 0
    running: dict[int, int] = {}

    def spawn():
        nonlocal next_slot
        slot = next_slot
        next_slot += 1
        pid = os.fork()
        if pid == 0:
            try:
                _kill_worker(path, done_path, slot, key_space, seed * 1000 + slot)
            finally:
                os._exit(1)
        running[pid] = slot

    try:
        for _ in range(workers):
            spawn()
        while killed < kills:
            time.sleep(rng.uniform(0.0, 0.02))
            pid = rng.choice(list(running))
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            del running[pid]
            killed += 1
            spawn()
        for pid in list(running):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            killed += 1
        running.clear()
        with open(done_path, "rb") as f:
            done = memoryview(f.read()).cast("q")
        committed = sum(done)
        got = arena.counter("total").value()
        # The arena must still validate and every key must still be usable:
        # a claim left by a killed creator is taken over, never waited on.
        arena.close()
        reopened = rseq.Arena.open(path)
        claimed_before = sum(1 for state, _ in reopened._entry_states()
                             if state == "claimed")
        for k in range(key_space):
            reopened.counter(f"key-{k}")
        for i, (state, owner) in enumerate(reopened._entry_states()):
            if state == "claimed":
                problems.append(f"entry {i} still claimed by pid {owner}")
            if state == "corrupt":
                problems.append(f"entry {i} corrupt")
        keys = reopened.keys()
        if len(set(keys)) != len(keys):
            problems.append(f"duplicate keys: {sorted(keys)}")
        reopened.close()
        return KillResult(killed, committed, got, len(keys), claimed_before,
                          time.perf_counter() - start, problems)
    finally:
        for pid in running:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        for f in os.listdir(tmpdir):
            os.unlink(os.path.join(tmpdir, f))
        os.rmdir(tmpdir)


@dataclasses.dataclass
class PoolKillResult:
    kills: int
    reclaimed: int
    reclaimed_while_running: int
    blocks: int
    seconds: float
    problems: list

    @property
    def ok(self) -> bool:
        return not self.problems

    def line(self) -> str:
        status = "ok  " if self.ok else "FAIL"
        text = (f"  {status}  pool kill test: {self.kills} SIGKILLs of allocating processes, "
                f"reclaim() recovered {self.reclaimed} blocks at the end and "
                f"{self.reclaimed_while_running} while workers ran (from a process "
                f"reclaiming all the time, and the test's), "
                f"{self.blocks} blocks all free exactly once, {self.seconds:.1f}s")
        return "\n".join([text] + [f"        problem: {p}" for p in self.problems])


def _pool_kill_worker(path: str, seed: int, loops: int, control=None):
    """Allocate and free until killed; with ``control`` (the steady worker,
    never killed): until control[0] is set, then free everything, set
    control[1] and wait to be killed."""
    import rseq

    from .. import _inject
    rng = random.Random(seed)
    # Wide windows inside the sequences and between the overflow's steps,
    # so that kills land there too.
    for point in (3, 4, 8):
        _inject.set_loops(point, loops)
    pool_map = rseq.Pool.open(path)._map_through(_inject)
    held = []
    me = os.getpid()
    while True:
        if control is not None and control[0]:
            for index in held:
                pool_map.free(index)
            control[1] = 1
            while True:
                time.sleep(1)
        if len(held) < 4 and rng.random() < 0.6:
            try:
                index = pool_map.alloc_index()
            except rseq.PoolExhaustedError:
                index = None
            if index is not None:
                pool_map.view(index).cast("q")[0] = me
                held.append(index)
        elif held:
            index = held.pop(rng.randrange(len(held)))
            if pool_map.view(index).cast("q")[0] != me:
                os._exit(3)   # a block with two holders: reported by the exit status
            pool_map.free(index)


def pool_kill_test(kills: int = 100, workers: int = 3, seed: int = 0,
                   blocks: int = 32, cache: int = 4, loops: int = 50000) -> PoolKillResult:
    """SIGKILL allocating processes at random instants (inside sequences
    and between the overflow's steps too, widened by ``loops``), with
    another process running reclaim() all the time and a steady worker that
    is never killed; at the end reclaim() must give back every block the
    dead held, each free exactly once (none left owned by the live steady
    worker), and the pool must still serve all of its blocks.  With the pop
    that commits before it records the owner, about one run in two fails
    here (a block left with the steady worker's stale owner word); the
    model's pool-owner-after-commit finds it every time."""
    import rseq
    rng = random.Random(seed)
    start = time.perf_counter()
    tmpdir = tempfile.mkdtemp(prefix="rseq-kill-")
    path = os.path.join(tmpdir, "pool")
    problems: list[str] = []
    pool = rseq.Pool.create(path, block_size=64, block_count=blocks, cache=cache)
    running: set[int] = set()
    killed = 0
    during = 0

    def spawn(n):
        pid = os.fork()
        if pid == 0:
            try:
                _pool_kill_worker(path, seed * 100003 + n, loops)
            finally:
                os._exit(1)
        running.add(pid)

    def reap(pid):
        _, status = os.waitpid(pid, 0)
        if not (os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL):
            problems.append(f"worker {pid} ended by itself: status {status:#x} "
                            f"(3: it found a block with another holder)")

    # A steady worker that is never killed: the blocks it frees carry its
    # (live) identity, so a kill that left one of them out of every stack
    # with that stale owner word (a pop that committed before it recorded
    # the owner) would show as a block owned by a live process at the end.
    control = memoryview(mmap.mmap(-1, 24)).cast("q")  # stop, stopped, reclaimed
    steady = os.fork()
    if steady == 0:
        try:
            _pool_kill_worker(path, seed * 100003 + 99991, loops, control)
        finally:
            os._exit(1)
    # A process that runs reclaim() all the time, from outside, while the
    # workers allocate and die: reclaim() must never free a block that a
    # live worker holds (the workers' tags would show it).
    reclaimer = os.fork()
    if reclaimer == 0:
        try:
            other = rseq.Pool.open(path)
            while True:
                control[2] += other.reclaim()
                time.sleep(0.0005)
        finally:
            os._exit(1)

    try:
        for n in range(workers):
            spawn(n)
        while killed < kills:
            time.sleep(rng.uniform(0.0, 0.01))
            pid = rng.choice(sorted(running))
            os.kill(pid, signal.SIGKILL)
            reap(pid)
            running.discard(pid)
            killed += 1
            if killed % 10 == 0:
                during += pool.reclaim()
            spawn(workers + killed)
        for pid in list(running):
            os.kill(pid, signal.SIGKILL)
            reap(pid)
            killed += 1
        running.clear()
        os.kill(reclaimer, signal.SIGKILL)
        os.waitpid(reclaimer, 0)
        reclaimer = 0
        control[0] = 1              # the steady worker frees all it holds
        deadline = time.monotonic() + 30
        while not control[1] and time.monotonic() < deadline:
            time.sleep(0.001)
        if not control[1]:
            problems.append("the steady worker did not stop")
        reclaimed = pool.reclaim()
        problem = pool_exact(pool)  # the steady worker is still alive here
        if problem:
            problems.append(f"after reclaim(): {problem}")
        os.kill(steady, signal.SIGKILL)
        os.waitpid(steady, 0)
        steady = 0
        # Still usable: every block can be allocated (none twice), then freed.
        got = [pool.alloc_index() for _ in range(blocks)]
        if sorted(got) != list(range(blocks)):
            problems.append(f"allocating every block gave {sorted(got)}")
        for index in got:
            pool.free(index)
        problem = pool_exact(pool)
        if problem:
            problems.append(f"after a full round: {problem}")
        return PoolKillResult(killed, reclaimed, during + control[2], blocks,
                              time.perf_counter() - start, problems)
    finally:
        for pid in running | {p for p in (reclaimer, steady) if p}:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        pool.close()
        os.unlink(path)
        os.rmdir(tmpdir)


# ---------------------------------------------------------------------------
# The matrix
# ---------------------------------------------------------------------------

def matrix(quick: bool, index_modes: tuple[str, ...]):
    """(kind, parameters) of every case: counters, then primitives."""
    points = QUICK_POINTS if quick else COUNTER_POINTS
    for structure, point, action, index, workers in itertools.product(
            ("counter", "arena"), points, ACTIONS, index_modes, ("threads", "processes")):
        if structure == "counter" and workers == "processes":
            continue  # an in-process counter is not shared between processes
        yield "counter", dict(structure=structure, point=point, action=action, index=index,
                              workers=workers)
    for primitive in primitive_names():
        all_points = PRIMITIVE_POINTS.get(primitive, COUNTER_POINTS)
        # The quick slice keeps the points special to a primitive (5, 8).
        points = (tuple(p for p in all_points if p in QUICK_POINTS or p in (5, 8))
                  if quick else all_points)
        for point, action, index, workers in itertools.product(
                points, ACTIONS, index_modes, ("threads", "processes")):
            yield "primitive", dict(primitive=primitive, point=point, action=action,
                                    index=index, workers=workers)
    if "cpu" in index_modes:  # a shared pool indexes by cpu_id only
        points = tuple(p for p in POOL_POINTS if p in QUICK_POINTS or p == 8) if quick \
            else POOL_POINTS
        for point, action, workers in itertools.product(points, ACTIONS,
                                                        ("threads", "processes")):
            yield "pool", dict(point=point, action=action, workers=workers)


def run_matrix(quick: bool, index_modes: tuple[str, ...], out=print) -> list[CaseResult]:
    # A window of ~10 us inside each critical section: long enough that
    # preemption, migration and the signal storm land inside it often.
    reps = 1500 if quick else 20000
    nworkers = 3 if quick else 4
    loops = 20000
    results = []
    for kind, params in matrix(quick, index_modes):
        run = {"counter": counter_case, "primitive": primitive_case, "pool": pool_case}[kind]
        result = run(nworkers=nworkers, reps=reps, loops=loops, **params)
        results.append(result)
        out(result.line())
    return results


def _mm_cid_child(quick: bool, as_json: bool) -> list[dict]:
    """Run the mm_cid half in a child whose registration covers mm_cid."""
    env = dict(os.environ, GLIBC_TUNABLES="glibc.pthread.rseq=0")
    cmd = [sys.executable, "-m", "rseq", "stress", "--index", "mm_cid", "--no-kill", "--json"]
    if quick:
        cmd.append("--quick")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"mm_cid stress child failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(proc.stdout)["cases"]


def _run(args) -> int:
    out = (lambda line: None) if args.json else (lambda line: print(line, flush=True))
    facts = rseq.info()
    out(f"rseq stress: owner={facts.owner} critical_sections={facts.critical_sections} "
        f"cpus={os.cpu_count()} quick={args.quick}")
    cases: list[dict] = []
    ok = True
    local_modes = ("cpu",) if args.index in ("cpu", "both") else ()
    if args.index == "mm_cid":
        local_modes = ("mm_cid",)
    if local_modes:
        for r in run_matrix(args.quick, local_modes, out):
            cases.append(dataclasses.asdict(r) | {"ok": r.ok})
            ok &= r.ok
    if args.index == "both":
        if "mm_cid" in facts.fields:
            for r in run_matrix(args.quick, ("mm_cid",), out):
                cases.append(dataclasses.asdict(r) | {"ok": r.ok})
                ok &= r.ok
        else:
            out("  (mm_cid half: re-running under GLIBC_TUNABLES=glibc.pthread.rseq=0)")
            for c in _mm_cid_child(args.quick, args.json):
                cases.append(c)
                ok &= c["ok"]
                out(CaseResult(**{k: c[k] for k in ("name", "expected", "got", "aborts",
                                                     "seconds", "skipped")}).line())
    if local_modes and "cpu" in local_modes:
        # The ring (rseq.Ring) indexes by cpu_id only: shared memory.
        from .ring_stress import run_ring_matrix
        for r in run_ring_matrix(args.quick, out):
            cases.append(dataclasses.asdict(r) | {"ok": r.ok})
            ok &= r.ok
    kill = None
    if not args.no_kill:
        kill = kill_test(kills=args.kills)
        out(kill.line())
        ok &= kill.ok
        pool_kill = pool_kill_test(kills=args.kills)
        out(pool_kill.line())
        ok &= pool_kill.ok
        from .ring_stress import ring_kill_test
        ring_kill = ring_kill_test(kills=args.kills)
        out(ring_kill.line())
        ok &= ring_kill.ok
    ran = sum(1 for c in cases if not c["skipped"])
    failed = sum(1 for c in cases if not c["ok"])
    out(f"rseq stress: {ran} cases run, {len(cases) - ran} skipped, {failed} failed"
        + (f", kill test {'ok' if kill.ok else 'FAILED'}" if kill else ""))
    if args.json:
        print(json.dumps({"ok": ok, "cases": cases,
                          "kill": dataclasses.asdict(kill) | {"ok": kill.ok} if kill else None},
                         indent=1))
    return 0 if ok else 1


def add_subcommand(subparsers) -> None:
    p = subparsers.add_parser("stress", help="the per-CPU stress matrix and the kill test",
                              description="The per-CPU stress matrix and the kill test "
                                          "(qualifies a kernel and CPU).")
    p.add_argument("--quick", action="store_true",
                   help="a short slice of the matrix (what the default tests run)")
    p.add_argument("--index", choices=("cpu", "mm_cid", "both"), default="both")
    p.add_argument("--kills", type=positive_int, default=100, metavar="N",
                   help="SIGKILLs in the kill test (>= 1; --no-kill skips the test)")
    p.add_argument("--no-kill", action="store_true", help="skip the kill test")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=_run)
