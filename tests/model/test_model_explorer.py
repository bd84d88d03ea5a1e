"""The explorer: replay by seed and by schedule, bounds, JSON, speed."""

from __future__ import annotations

import json
import time

import pytest

from rseq.model import explore, random_walk, replay
from rseq.model._explore import parse_move


def test_seed_replays_identically():
    a = random_walk("list-pop-cas", seed=7, runs=3000)
    b = random_walk("list-pop-cas", seed=7, runs=3000)
    assert not a.holds
    assert (a.schedule, a.trace, a.runs, a.transitions) == (
        b.schedule,
        b.trace,
        b.runs,
        b.transitions,
    )


def test_explore_with_seed_is_random_mode():
    r = explore("counter", seed=3, runs=50)
    assert r.mode == "random" and r.seed == 3 and r.runs == 50 and r.holds


def test_printed_schedule_replays_to_the_same_violation():
    found = explore("counter-plain")
    again = replay("counter-plain", found.schedule)
    assert not again.holds
    assert again.violation == found.violation
    assert again.trace == found.trace


def test_schedule_string_form():
    found = explore("spin-mutex")
    again = replay("spin-mutex", ",".join(found.schedule))
    assert again.violation == found.violation


def test_impossible_schedule_is_rejected():
    with pytest.raises(ValueError):
        replay("counter", ["step T3"])  # T3 starts without a CPU


@pytest.mark.parametrize("text", ["step T1", "choose T1 1", "schedule cpu1 T3", "preempt cpu0",
                                  "preempt cpu0 T3", "migrate T1 cpu1", "signal T2"])
def test_move_names_round_trip(text):
    from rseq.model._explore import move_name

    assert move_name(None, parse_move(text)) == text


def test_more_preemptions_cover_more_states():
    small = explore("counter", preemptions=0)
    large = explore("counter", preemptions=1)
    assert 0 < small.states < large.states


def test_zero_preemptions_miss_the_lost_update():
    # a bound too small to see the bug: the explorer says so honestly
    assert explore("counter-plain", preemptions=0).holds


def test_counter_performance():
    started = time.perf_counter()
    r = explore("counter", preemptions=2)
    elapsed = time.perf_counter() - started
    assert r.holds and r.complete
    assert elapsed < 20, f"counter exploration took {elapsed:.1f} s"
    assert r.states_per_second > 1000


def test_result_json_round_trip():
    d = explore("counter-plain").to_dict()
    text = json.dumps(d)
    back = json.loads(text)
    assert back["holds"] is False and back["as_expected"] is True
    assert back["schedule"] and back["trace"]


@pytest.mark.parametrize(
    "name",
    [
        "counter",
        "counter-plain",
        "list-pop-rseq",
        "list-pop-cas",
        "adaptive-mutex",
        "spin-mutex",
        "time-slice",
        "two-libs-no-refcount",
    ],
)
def test_reduction_keeps_the_verdict(name):
    # the partial-order reduction and the pruning of invisible preemptions
    # must not change what the explorer concludes
    reduced = explore(name, preemptions=1, migrations=0)
    full = explore(name, preemptions=1, migrations=0, reduce=False)
    assert full.complete
    assert reduced.holds == full.holds
    assert reduced.states <= full.states
