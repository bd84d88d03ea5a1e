"""rseq.PerCpuCounter: exact counts, overflow, reset under concurrency, the
fallback lane, index modes."""
from __future__ import annotations

import os
import random
import threading

import pytest

import rseq
from helpers.subproc import OWN_REGISTRATION, run_json

INT64_MAX = 2**63 - 1
INT64_MIN = -2**63


def test_add_value_per_cpu():
    c = rseq.PerCpuCounter()
    assert c.value() == 0
    c.add()
    c.add(5)
    c.add(n=-2)
    assert c.value() == 4
    per_cpu = c.per_cpu()
    assert len(per_cpu) == rseq.info().possible_cpus
    assert sum(per_cpu) + c.fallback_count() - c.removed() == 4
    assert c.index == "cpu"
    assert "value=4" in repr(c)


def test_add_argument_errors():
    c = rseq.PerCpuCounter()
    with pytest.raises(TypeError):
        c.add(1.5)
    with pytest.raises(TypeError):
        c.add("1")
    with pytest.raises(TypeError):
        c.add(1, 2)
    with pytest.raises(TypeError):
        c.add(m=1)
    with pytest.raises(OverflowError):
        c.add(2**63)
    with pytest.raises(OverflowError):
        c.add(INT64_MIN - 1)
    assert c.value() == 0
    c.add(True)  # an int subclass, and __index__ objects, are ints
    assert c.value() == 1


def test_slot_never_wraps():
    c = rseq.PerCpuCounter()
    c.add(INT64_MAX)
    assert c.value() == INT64_MAX
    with pytest.raises(OverflowError, match="nothing was added"):
        # Whatever CPU we are on, this slot or another takes the add; adding
        # INT64_MAX twice more must overflow one slot at least once.
        for _ in range(rseq.info().possible_cpus + 1):
            c.add(INT64_MAX)
    # The value is the exact sum of what was accepted: a multiple of INT64_MAX.
    assert c.value() % INT64_MAX == 0 and c.value() >= INT64_MAX
    c.add(-1)
    assert c.value() % INT64_MAX == INT64_MAX - 1


def test_value_beyond_int64():
    """value() is a Python int: per-CPU slots may sum past 64 bits."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("needs two CPUs")
    c = rseq.PerCpuCounter()
    original = os.sched_getaffinity(0)

    def on(cpu):
        os.sched_setaffinity(0, {cpu})
        try:
            c.add(INT64_MAX)
        finally:
            os.sched_setaffinity(0, original)

    for cpu in cpus[:2]:
        t = threading.Thread(target=on, args=(cpu,))
        t.start()
        t.join()
    assert c.value() == 2 * INT64_MAX
    assert c.reset() == 2 * INT64_MAX
    assert c.value() == 0


def _counters_of_every_kind(tmp_path):
    arena = rseq.Arena.create(str(tmp_path / "saturated"))
    made = iter(range(10**6))
    return arena, [lambda: rseq.PerCpuCounter(),
                   lambda: arena.counter(f"k{next(made)}")]


@pytest.mark.parametrize("sign", [1, -1])
def test_reset_frees_a_saturated_slot_on_every_cpu(tmp_path, sign):
    """Issue 8, item 10: after add(INT64_MAX) (or INT64_MIN) then reset(), the
    counter accepts every add whose result fits, whichever CPU saturated its
    slot and whichever CPU adds next.  Refused: only adds that would take the
    value out of the signed 64-bit range."""
    from helpers.system import in_thread, pin_current_thread, usable_cpus
    cpus = usable_cpus()
    arena, kinds = _counters_of_every_kind(tmp_path)
    extreme = INT64_MAX if sign > 0 else INT64_MIN
    results = []
    try:
        for make in kinds:
            for saturated_on in cpus:
                for adder_on in cpus:
                    c = make()

                    def body(c=c, saturated_on=saturated_on, adder_on=adder_on):
                        pin_current_thread({saturated_on})
                        c.add(extreme)
                        assert c.reset() == extreme
                        pin_current_thread({adder_on})
                        c.add(sign)                        # used to raise
                        c.add(extreme - sign)              # the value is now extreme
                        assert c.value() == extreme
                        with pytest.raises(OverflowError, match="nothing was added"):
                            c.add(sign)                    # would not fit: refused
                        assert c.value() == extreme
                        c.add(-sign)
                        assert c.reset() == extreme - sign
                        c.add(sign * 7)
                        # The invariant holds with the adds placed in the baseline.
                        assert sum(c.per_cpu()) + c.fallback_count() - c.removed() == sign * 7
                        return c.value()

                    results.append(in_thread(body))
    finally:
        arena.close()
    assert results == [sign * 7] * (len(kinds) * len(cpus) ** 2)


def test_reset_returns_removed_and_counts_on():
    c = rseq.PerCpuCounter()
    c.add(10)
    assert c.reset() == 10
    assert c.value() == 0
    assert c.removed() == 10
    c.add(3)
    assert c.value() == 3
    assert c.reset() == 3
    assert c.reset() == 0


def test_threads_exact_with_migration():
    c = rseq.PerCpuCounter()
    threads, reps = 6, 20000
    cpus = sorted(os.sched_getaffinity(0))
    stop = threading.Event()
    natives: list[int] = []

    def worker():
        natives.append(threading.get_native_id())
        add = c.add
        for _ in range(reps):
            add(1)

    def mover():
        rng = random.Random(0)
        while not stop.is_set():
            for tid in list(natives):
                try:
                    os.sched_setaffinity(tid, {rng.choice(cpus)})
                except OSError:
                    pass

    m = threading.Thread(target=mover)
    m.start()
    ts = [threading.Thread(target=worker) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    stop.set()
    m.join()
    assert c.value() == threads * reps


def test_reset_loses_nothing_under_concurrent_adds():
    """Sum of everything reset() removed plus what is left equals every add."""
    c = rseq.PerCpuCounter()
    threads, reps = 4, 30000
    removed = []
    done = threading.Event()

    def adder():
        add = c.add
        for _ in range(reps):
            add(1)

    def resetter():
        while not done.is_set():
            removed.append(c.reset())

    r1 = threading.Thread(target=resetter)
    r2 = threading.Thread(target=resetter)
    r1.start()
    r2.start()
    ts = [threading.Thread(target=adder) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    done.set()
    r1.join()
    r2.join()
    assert all(r >= 0 for r in removed)
    assert sum(removed) + c.value() == threads * reps
    assert c.removed() == sum(removed)


def test_slots_are_reused_zeroed():
    counters = [rseq.PerCpuCounter() for _ in range(600)]   # more than one pool chunk
    for i, c in enumerate(counters):
        c.add(i + 1)
    assert [c.value() for c in counters] == list(range(1, 601))
    del counters
    fresh = [rseq.PerCpuCounter() for _ in range(600)]
    assert all(c.value() == 0 and c.removed() == 0 and c.fallback_count() == 0
               for c in fresh)


def test_index_argument():
    with pytest.raises(ValueError, match="'cpu' or 'mm_cid'"):
        rseq.PerCpuCounter(index="node")
    with pytest.raises(TypeError):
        rseq.PerCpuCounter(index=3)


def test_mm_cid_index_unsupported_under_glibc(glibc_mode):
    with pytest.raises(rseq.Unsupported, match="mm_cid"):
        rseq.PerCpuCounter(index="mm_cid")


def test_mm_cid_index_in_own_registration():
    result = run_json("""
        import json, threading, rseq
        c = rseq.PerCpuCounter(index="mm_cid")
        def work():
            for _ in range(20000):
                c.add(1)
        ts = [threading.Thread(target=work) for _ in range(5)]
        for t in ts: t.start()
        for t in ts: t.join()
        print(json.dumps({"value": c.value(), "index": c.index,
                          "fallback": c.fallback_count(), "fields": rseq.info().fields}))
    """, env=OWN_REGISTRATION)
    assert "mm_cid" in result["fields"]
    assert result["index"] == "mm_cid"
    assert result["value"] == 100000
    assert result["fallback"] == 0


@pytest.mark.parametrize("errno_name", ["ENOSYS", "EPERM"])
def test_fallback_lane_when_rseq_denied(errno_name):
    """With rseq denied, adds go to the atomic fallback lane, still exact."""
    result = run_json(f"""
        import errno, json, threading
        from helpers.seccomp import deny_rseq
        deny_rseq(errno.{errno_name})
        import rseq
        c = rseq.PerCpuCounter()
        def work():
            for _ in range(20000):
                c.add(1)
        ts = [threading.Thread(target=work) for _ in range(4)]
        for t in ts: t.start()
        for t in ts: t.join()
        print(json.dumps({{"value": c.value(), "fallback": c.fallback_count(),
                          "slots": c.per_cpu(), "why": rseq.info().fallback,
                          "sections": rseq.info().critical_sections}}))
    """, env=OWN_REGISTRATION)
    assert result["value"] == 80000
    assert result["fallback"] == 80000
    assert sum(result["slots"]) == 0
    assert errno_name in result["why"]
    assert result["sections"] is False
