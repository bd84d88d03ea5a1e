"""Every shipped scenario comes out as its documentation states."""

from __future__ import annotations

import pytest

from helpers.model_results import explored
from rseq.model import SCENARIOS, explore

# (scenario, variant) for every variant a scenario is stated for, except
# the counter, whose full matrix is in test_counter_under_every_variant.
CASES = [
    (name, variant)
    for name, s in SCENARIOS.items()
    for variant in (s.variants if name in ("syscall-in-cs",) else (s.default_variant,))
]


@pytest.mark.parametrize("name,variant", CASES)
def test_scenario_outcome(name, variant):
    scenario = SCENARIOS[name]
    result = explored(name, variant)
    assert result.complete, "the state limit cut the search"
    assert result.states > 0
    expected = scenario.expected(variant)
    if expected == "holds":
        assert result.holds, result.report()
        assert result.terminal_states > 0
        assert result.trace == []
    else:
        assert not result.holds
        assert result.violation
        assert result.trace and result.trace[-1].startswith("VIOLATION:")
        assert result.schedule
    assert result.as_expected


@pytest.mark.parametrize("variant", list(SCENARIOS["counter"].variants))
def test_counter_under_every_variant(variant):
    result = explore("counter", variant, preemptions=1, migrations=0)
    assert result.holds, result.report()


def test_counter_with_a_signal():
    # the handler adds with rseq too; a signal inside a section aborts it
    result = explore("counter", preemptions=0, migrations=0, signals=1)
    assert result.holds, result.report()


def test_counter_with_a_migration():
    result = explore("counter", preemptions=0, migrations=1)
    assert result.holds, result.report()


def test_signal_inside_a_section_aborts_it():
    from rseq.model import replay

    # T1: cpu_id_start, rseq_cs store, cpu_id check; then the signal lands
    # on the load inside load_add_store
    result = replay("counter", ["step T1", "step T1", "step T1", "signal T1"], signals=1)
    assert any("abort to" in line for line in result.trace), result.trace


def test_plain_counter_loses_an_update_with_one_preemption():
    result = explore("counter-plain", preemptions=1)
    assert not result.holds
    assert "lost update" in result.violation
    assert any("sched: preempt" in line for line in result.trace)


def test_list_pop_cas_trace_shows_the_aba():
    result = explore("list-pop-cas")
    assert "ABA" in result.violation
    text = "\n".join(result.trace)
    # T2 gives A back, and T1's compare-and-swap still succeeds
    assert "store nodeA.next" in text
    assert "cas   head[cpu0] &nodeA -> &nodeB   (ok)" in text


def test_list_pop_rseq_survives_the_aba_schedule():
    # the schedule that breaks the CAS design, run against the rseq design:
    # T1 is preempted inside its section, T2 runs on cpu0, T1 aborts and retries
    from rseq.model import replay

    result = explore("list-pop-rseq", preemptions=1, migrations=0)
    assert result.holds
    schedule = ["step T1"] * 4 + ["preempt cpu0 T2", "preempt cpu0 T1"]
    replayed = replay("list-pop-rseq", schedule)
    assert any(
        "T1 was inside load_cbeq_store_add_load_store" in line for line in replayed.trace
    ), replayed.trace


def test_two_libraries_violation_names_the_unregistering_library():
    result = explore("two-libs-no-refcount")
    assert (
        "after libB unregistered it" in result.violation
        or "after libA unregistered it" in result.violation
    )


def test_interposed_area_write_is_reported_with_its_field():
    result = explore("interposed-trusts-length")
    assert "node_id" in result.violation and "T1.neighbour" in result.violation


def test_syscall_in_cs_is_fatal_on_linux_only():
    assert "SIGSEGV" in explore("syscall-in-cs", "linux-6.3").violation
    assert explore("syscall-in-cs", "freebsd-2021").holds


def test_time_slice_grants_and_revocations_are_explored():
    from rseq.model import replay

    # T1 requests, is preempted (grant), runs its section, and is revoked by getpid()
    schedule = ["step T1", "step T1", "preempt cpu0 T2"] + ["step T1"] * 3
    result = replay("time-slice", schedule)
    text = "\n".join(result.trace)
    assert "slice extension granted" in text
    assert result.holds, text


def test_shortest_trace_is_not_longer_than_dfs_found():
    result = explore("spin-mutex")
    assert len(result.schedule) <= 10


def test_time_slice_yield_and_expiry_both_happen():
    from rseq.model import replay

    head = ["step T1", "step T1"]
    in_time = replay("time-slice", head + ["step T1", "preempt cpu0 T2"] + ["step T1"] * 5)
    assert any("rseq_slice_yield()); the deferred" in line for line in in_time.trace), in_time.trace
    expired = replay("time-slice", head + ["preempt cpu0 T2"] + ["step T1"] * 5)
    assert any("grant timer expired" in line for line in expired.trace), expired.trace
    assert in_time.holds and expired.holds


def test_ring_broken_twins_fail_for_their_own_reason():
    """The ring's twins are caught for the bug each one has: a torn read for
    publish-before-copy, a lost or torn committed record for the plain copy."""
    result = explore("ring-publish-first", "linux-6.3")
    assert "torn record delivered" in result.violation
    result = explore("ring-plain", "linux-6.3")
    assert any(word in result.violation for word in ("torn record", "committed", "twice"))
    assert any("preempt" in str(move) for move in result.schedule)


def test_pool_broken_twin_leaks_a_block_when_killed_after_the_commit():
    """rseq.Pool's pop must record the owner inside its sequence: the twin that
    commits first leaks the block when its process dies between the two."""
    result = explore("pool-owner-after-commit", preemptions=0)
    assert not result.holds
    assert "is lost" in result.violation
    text = "\n".join(result.trace)
    assert "(commit)" in text and "SIGKILL here? -> 1" in text
    # the last thing before the violation: the commit, then the kill
    commit = max(i for i, line in enumerate(result.trace) if "(commit)" in line)
    assert "SIGKILL here? -> 1" in result.trace[commit + 1]

