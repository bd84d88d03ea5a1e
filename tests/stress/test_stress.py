"""A short slice of the primitive stress matrix (``python -m rseq stress`` runs
all of it): each per-CPU primitive's C workers in ``rseq._inject`` under every
action, threads and processes, with migration, exact results, and proof that
critical sections really aborted; the mm_cid index with rseq's own
registration; the fallback primitives where a seccomp filter denies rseq, and
the two lanes (rseq and fallback) writing one shared structure at once.

Counter cases live in test_stress_counters.py.
"""
from __future__ import annotations

import ctypes
import itertools
import json
import mmap

import pytest

import rseq
from helpers.subproc import OWN_REGISTRATION, run_json, run_rseq_cli
from rseq import _inject
from rseq.testing import stress as _stress

PRIMITIVES = ("cbne", "add", "bov", "list", "store_store", "memcpy")

# The quick slice of the points each primitive passes (the table of
# rseq._inject.INJECTION_POINTS): two windows inside the sequence (after the
# compare, before the commit) and one in C before it: every action lands in
# each.
def _slice_points(primitive: str) -> tuple[int, ...]:
    return tuple(p for p in _inject.INJECTION_POINTS[primitive] if p in _stress.QUICK_POINTS)


def _primitive_slice(primitive: str):
    for point, action, workers in itertools.product(
            _slice_points(primitive), _stress.ACTIONS, ("threads", "processes")):
        yield dict(primitive=primitive, point=point, action=action, workers=workers)


# ---------------------------------------------------------------------------
# The interface
# ---------------------------------------------------------------------------

def test_primitive_names():
    assert set(PRIMITIVES) <= set(_inject.PRIMITIVES)
    assert _stress.primitive_names() == _inject.PRIMITIVES


def _fresh_state(name: str, nworkers: int) -> mmap.mmap:
    state = mmap.mmap(-1, _inject.primitive_size(name, nworkers))
    _inject.primitive_init(name, state, nworkers)
    return state


def test_primitive_state_is_validated():
    size = _inject.primitive_size("add", 2)
    with pytest.raises(ValueError, match="needs"):
        _inject.primitive_init("add", mmap.mmap(-1, size - 64), 2)
    with pytest.raises(ValueError, match="unknown primitive"):
        _inject.primitive_size("nope", 2)
    with pytest.raises(ValueError, match="nworkers"):
        _inject.primitive_size("add", 0)
    with pytest.raises(ValueError, match="not initialised"):
        _inject.primitive_run("add", mmap.mmap(-1, size), 0, 1, "cpu")
    state = _fresh_state("store_store", 2)
    with pytest.raises(ValueError, match="holds primitive store_store"):
        _inject.primitive_run("add", state, 0, 1, "cpu")
    with pytest.raises(ValueError, match="worker 2"):
        _inject.primitive_run("store_store", state, 2, 1, "cpu")
    with pytest.raises(ValueError, match="index"):
        _inject.primitive_run("store_store", state, 0, 1, "node")
    with pytest.raises(ValueError, match="2 workers"):
        _inject.primitive_check("store_store", state, 3, 1)
    raw = bytearray(size + 64)
    misaligned = 8 if ctypes.addressof(ctypes.c_char.from_buffer(raw)) % 64 == 0 else 0
    with pytest.raises(ValueError, match="aligned"):
        _inject.primitive_init("add", memoryview(raw)[misaligned:misaligned + size], 2)
    with pytest.raises(TypeError):
        _inject.primitive_init("add", bytes(size), 2)


def test_primitive_mm_cid_needs_coverage():
    state = _fresh_state("add", 1)
    if "mm_cid" in rseq.info().fields:
        _inject.primitive_run("add", state, 0, 10, "mm_cid")
        assert _inject.primitive_check("add", state, 1, 10) == (10, 10)
    else:
        with pytest.raises(rseq.Unsupported, match="mm_cid"):
            _inject.primitive_run("add", state, 0, 10, "mm_cid")


@pytest.mark.parametrize("name", PRIMITIVES)
def test_primitive_check_catches_extra_work(name):
    """The check is not vacuous: a worker that runs twice (one more set of
    operations than the check is told about, and for the logs the same tags
    twice) makes expected and got differ."""
    state = _fresh_state(name, 2)
    for worker in (0, 1):
        _inject.primitive_run(name, state, worker, 200, "cpu")
    expected, got = _inject.primitive_check(name, state, 2, 200)
    assert expected == got
    if name == "list":
        # Pops and pushes conserve nodes: only corruption changes the count.
        return
    _inject.primitive_run(name, state, 0, 200, "cpu")
    expected, got = _inject.primitive_check(name, state, 2, 200)
    assert expected != got


# ---------------------------------------------------------------------------
# The slice of the matrix (cpu_id index)
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("primitive", PRIMITIVES)
def test_primitive_slice(primitive):
    results = [_stress.primitive_case(index="cpu", nworkers=3, reps=1500, loops=20000, **case)
               for case in _primitive_slice(primitive)]
    for result in results:
        assert result.skipped is None, result.line()
        assert result.ok, result.line()
    assert sum(r.aborts for r in results) > 0, "no critical section was ever interrupted"


# ---------------------------------------------------------------------------
# mm_cid, with rseq's own registration
# ---------------------------------------------------------------------------

def test_primitive_mm_cid_stress_cli():
    proc = run_rseq_cli("stress", "--quick", "--index", "mm_cid", "--no-kill", "--json",
                        env=OWN_REGISTRATION, timeout=120)
    assert proc.returncode in (0, 1), proc.stderr
    report = json.loads(proc.stdout)
    primitive_cases = [c for c in report["cases"] if c["name"].split()[0] in PRIMITIVES]
    ran = [c for c in primitive_cases if not c["skipped"]]
    if not ran and all("not usable" in (c["skipped"] or "") for c in primitive_cases):
        pytest.skip("mm_cid is not usable on this kernel")
    assert [c for c in report["cases"] if not c["ok"]] == []
    assert report["ok"] and proc.returncode == 0
    assert {c["name"].split()[0] for c in ran} == set(PRIMITIVES)
    assert all("index=mm_cid" in c["name"] and "workers=threads" in c["name"] for c in ran)
    # mm_cid is per process: the process cases are skipped, and say why.
    assert all("per process" in c["skipped"] for c in primitive_cases if c["skipped"])
    assert sum(c["aborts"] for c in ran) > 0


# ---------------------------------------------------------------------------
# No rseq: the fallback primitives, alone and beside the sequences
# ---------------------------------------------------------------------------

def test_primitive_fallback_when_seccomp_denies_rseq():
    got = run_json("""
        import errno, json, mmap
        from helpers import seccomp
        seccomp.deny_rseq(errno.EPERM)
        import rseq
        from rseq import _inject
        from rseq.testing import stress as _stress
        out = {"critical_sections": rseq.info().critical_sections, "cases": []}
        for primitive in _inject.PRIMITIVES:
            for action in ("yield", "signal"):
                for workers in ("threads", "processes"):
                    r = _stress.primitive_case(primitive=primitive, point=7, action=action,
                                               index="cpu", workers=workers, nworkers=3,
                                               reps=2000, loops=2000)
                    out["cases"].append([r.name, r.expected, r.got, r.aborts, r.skipped])
        state = mmap.mmap(-1, _inject.primitive_size("add", 1))
        _inject.primitive_init("add", state, 1)
        try:
            _inject.primitive_run("add", state, 0, 1, "mm_cid")
            out["mm_cid"] = "ran"
        except rseq.Unsupported:
            out["mm_cid"] = "Unsupported"
        print(json.dumps(out))
    """, env=OWN_REGISTRATION, timeout=120)
    assert got["critical_sections"] is False
    assert got["mm_cid"] == "Unsupported"
    assert len(got["cases"]) == len(PRIMITIVES) * 4
    for name, expected, total, aborts, skipped in got["cases"]:
        assert skipped is None, name
        assert expected == total, f"{name}: expected {expected}, got {total}"
        assert aborts == 0, name   # nothing to abort: no sequence ran


MIXED_LANES = """
    import errno, json, mmap, os, random, sys, threading, time
    import rseq
    from rseq import _inject
    NWORKERS, REPS = 4, 4000
    CPUS = sorted(os.sched_getaffinity(0))
    # A window between reading the index and the operation, where migration
    # sends a fallback writer to another CPU's cell: that is where sharing
    # a cell with the sequences would lose updates.
    _inject.set_loops(7, 20000)
    _inject.set_loops(4, 2000)

    def mover(tids, stop):
        rng = random.Random(len(tids))
        while not stop.is_set():
            for tid in list(tids):
                try:
                    os.sched_setaffinity(tid, {rng.choice(CPUS)})
                except OSError:
                    pass
            time.sleep(0.0005)

    out = {}
    for primitive in _inject.PRIMITIVES:
        state = mmap.mmap(-1, _inject.primitive_size(primitive, NWORKERS))
        _inject.primitive_init(primitive, state, NWORKERS)
        pids = []
        for denied, workers in ((False, (0, 1)), (True, (2, 3))):
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    if denied:
                        from helpers import seccomp
                        seccomp.deny_rseq(errno.EPERM)
                    lanes, tids, stop = [], [], threading.Event()
                    def work(w):
                        # A new thread: registered on first use unless denied.
                        lanes.append(rseq.info().critical_sections)
                        tids.append(threading.get_native_id())
                        _inject.primitive_run(primitive, state, w, REPS, "cpu")
                    threads = [threading.Thread(target=work, args=(w,)) for w in workers]
                    moving = threading.Thread(target=mover, args=(tids, stop))
                    moving.start()
                    for t in threads:
                        t.start()
                    for t in threads:
                        t.join()
                    stop.set()
                    moving.join()
                    code = 0 if lanes == [not denied] * len(workers) else 3
                finally:
                    os._exit(code)
            pids.append(pid)
        codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
        out[primitive] = [codes, list(_inject.primitive_check(primitive, state, NWORKERS, REPS))]
    print(json.dumps(out))
"""


def test_primitive_rseq_and_fallback_lanes_share_a_structure():
    """A process with rseq and a process where seccomp denies it work on the
    same shared state at the same time: each kind of writer has its own lane
    (the mixing rule), so the results stay exact."""
    got = run_json(MIXED_LANES, env=OWN_REGISTRATION, timeout=120)
    assert set(got) == set(_inject.PRIMITIVES)
    for primitive, (codes, _) in got.items():
        assert codes == [0, 0], f"{primitive}: children exited {codes} (3: wrong lane)"
    inexact = {p: (expected, total) for p, (_, (expected, total)) in got.items()
               if expected != total}
    assert inexact == {}, "(expected, got) of the inexact primitives"
