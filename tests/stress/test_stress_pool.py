"""rseq.Pool under stress (``python -m rseq stress`` runs the whole matrix):
threads and processes, more than CPUs, allocate and free under migrations,
signal storms and injected delays at every point of the pool's sequences,
each block tagged by its holder and checked before it is freed; at the end
every block is free exactly once.  And the kill test: 100 SIGKILLs of
allocating processes at random instants, after which reclaim() recovers
every block they held and the pool still serves all of its blocks."""
from __future__ import annotations

import itertools

import pytest

from rseq.testing import stress as _stress

CASES = [dict(point=point, action=action, workers=workers)
         for point, action, workers in itertools.product(
             _stress.POOL_POINTS, _stress.ACTIONS, ("threads", "processes"))]


@pytest.fixture(scope="module")
def aborts_seen():
    seen = []
    yield seen
    assert sum(seen) > 0   # sequences were really interrupted


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_pool_case(case, aborts_seen):
    result = _stress.pool_case(nworkers=3, reps=600, loops=20000, **case)
    assert result.skipped is None
    assert result.ok, result.line()
    aborts_seen.append(result.aborts)


def test_pool_kill_test():
    result = _stress.pool_kill_test(kills=100, workers=3)
    assert result.ok, result.line()
    assert result.kills >= 100
    assert result.reclaimed + result.reclaimed_while_running > 0, result.line()


def test_pool_in_the_matrix():
    kinds = [kind for kind, _ in _stress.matrix(True, ("cpu",))]
    assert "pool" in kinds
    assert "pool" not in [kind for kind, _ in _stress.matrix(True, ("mm_cid",))]
