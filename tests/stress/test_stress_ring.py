"""A slice of the ring stress matrix (``python -m rseq stress`` runs all of
it) and the ring kill test: producers under every injection point of their
critical section, migrated and signalled, with a consumer draining at the
same time; then 100 SIGKILLs of producers and consumers."""
from __future__ import annotations

import itertools

import pytest

from rseq.testing import ring_stress
from rseq.testing import stress as _stress

CASES = [dict(point=point, action=action, workers=workers)
         for point, action, workers in itertools.product(
             ring_stress.RING_POINTS, _stress.ACTIONS, ("threads", "processes"))]


@pytest.fixture(scope="module")
def aborts_seen():
    seen = []
    yield seen
    assert sum(seen) > 0  # sequences were interrupted for real


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_ring_case(case, aborts_seen):
    result = ring_stress.ring_case(nworkers=3, reps=1000, loops=20000, **case)
    assert result.ok, result.line()
    aborts_seen.append(result.aborts)


@pytest.mark.parametrize("point", (3, 5))
@pytest.mark.parametrize("workers", ("threads", "processes"))
def test_ring_overwrite_case(point, workers, aborts_seen):
    """A lane far too small for the load: records are overwritten while the
    consumer reads; it must never be handed a torn one."""
    result = ring_stress.ring_case(point=point, action="signal", workers=workers, nworkers=3,
                                   reps=1000, loops=20000, policy="overwrite",
                                   size_per_cpu=4096)
    assert result.ok, result.line()
    aborts_seen.append(result.aborts)


@pytest.mark.parametrize("point", (3, 4, 5))
@pytest.mark.parametrize("action", ("signal", "yield"))
def test_ring_mixed_threads_and_processes(point, action, aborts_seen):
    """Producer threads of this process and producer processes at once (more
    workers than CPUs): every record delivered once, intact, in lane order."""
    result = ring_stress.ring_case(point=point, action=action, workers="mixed", nworkers=4,
                                   reps=1000, loops=20000)
    assert result.ok, result.line()
    aborts_seen.append(result.aborts)


def test_ring_kill_test():
    result = ring_stress.ring_kill_test(kills=100)
    assert result.ok, result.line()
    assert result.producer_kills >= 80 and result.consumer_kills >= 20
    assert result.delivered >= result.committed > 0


def test_payload_checksum_catches_damage():
    data = bytearray(ring_stress.make_payload(3, 7))
    assert ring_stress.check_payload(bytes(data)) == (3, 7)
    for i in range(len(data)):
        damaged = bytearray(data)
        damaged[i] ^= 1
        assert ring_stress.check_payload(bytes(damaged)) is None
