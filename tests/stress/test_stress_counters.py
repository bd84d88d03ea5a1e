"""A short slice of the counter stress matrix (``python -m rseq stress`` runs
all of it): every injection point and action, threads and processes, with
migration, exact totals, and proof that critical sections really aborted."""
from __future__ import annotations

import itertools

import pytest

from helpers.subproc import OWN_REGISTRATION, run_json
from rseq import _inject
from rseq.testing import stress as _stress

CASES = [
    dict(structure=structure, point=point, action=action, workers=workers)
    for structure in ("counter", "arena")
    for point, action, workers in itertools.product(
        _inject.INJECTION_POINTS[structure], _stress.ACTIONS, ("threads", "processes"))
    if not (structure == "counter" and workers == "processes")
]


@pytest.fixture(scope="module")
def aborts_seen():
    seen = []
    yield seen
    # Over the whole slice, sequences must have been interrupted for real:
    # a harness that never aborts anything proves nothing.
    assert sum(seen) > 0


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_counter_case(case, aborts_seen):
    result = _stress.counter_case(index="cpu", nworkers=3, reps=1500, loops=20000, **case)
    assert result.skipped is None
    assert result.ok, result.line()
    aborts_seen.append(result.aborts)


def test_mm_cid_counter_cases():
    """The mm_cid index, in a child whose own registration covers mm_cid."""
    cases = run_json("""
        import json
        from rseq.testing import stress as _stress
        out = []
        for point in (2, 3, 4):
            for action in _stress.ACTIONS:
                r = _stress.counter_case(structure="counter", point=point, action=action,
                                         index="mm_cid", workers="threads", nworkers=4,
                                         reps=1500, loops=20000)
                out.append([r.name, r.ok, r.expected, r.got, r.aborts, r.skipped])
        print(json.dumps(out))
    """, env=OWN_REGISTRATION, timeout=120)
    assert len(cases) == 9
    for name, ok, expected, got, _aborts, skipped in cases:
        assert skipped is None, name
        assert ok and expected == got == 6000, name
    assert sum(c[4] for c in cases) > 0
