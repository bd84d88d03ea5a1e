"""--threads (issue 13): the counters' thread count is a parameter of both
engines; and the explorer's state representation (one marshalled bytes
object per state) changes neither what it counts nor what it prints.
"""

from __future__ import annotations

import hashlib
import shutil

import pytest

from helpers.debian import ensure_tool
from rseq.model import SCENARIOS, explore, replay, spin
from rseq.model._finals import final_states
from rseq.model.cli import main as model_main


@pytest.mark.parametrize("threads", [1, 2, 4])
def test_threads_sets_the_python_engines_thread_count(threads):
    m = SCENARIOS["counter"].build("linux-6.3", threads=threads)
    assert [t.name for t in m.threads] == [f"T{i + 1}" for i in range(threads)]
    result = explore("counter", preemptions=0, threads=threads)
    assert result.holds and result.complete
    assert result.bounds["threads"] == threads


def test_more_threads_reach_more_states_and_the_lost_update():
    assert explore("counter", preemptions=0, threads=2).states < \
        explore("counter", preemptions=0, threads=4).states
    found = explore("counter-plain", preemptions=1, threads=4)
    assert not found.holds and "expected 8" in found.violation
    again = replay("counter-plain", found.schedule, threads=4)
    assert again.trace == found.trace


def test_a_scenario_without_scale_refuses_threads(capsys):
    with pytest.raises(ValueError, match="fixed number of threads"):
        explore("list-pop-rseq", threads=3)
    assert model_main(["check", "list-pop-rseq", "--threads", "3"]) == 2
    assert "fixed number of threads" in capsys.readouterr().err


def test_threads_on_the_command_line(capsys):
    assert model_main(["check", "counter", "--threads", "2", "--preemptions", "1"]) == 0
    assert "threads 2" in capsys.readouterr().out


# Figures the explorer printed before its state representation changed
# (commit 5eebff4): the same states, transitions and traces, to the byte.
PINNED = [
    ("counter", 1, 0, True, 5331, 8462),
    ("counter-plain", 2, 0, False, 15070, 30497),
    ("counter-plain", 2, 0, True, 8969, 15273),
    ("list-pop-cas", 2, 1, True, 11934, 20785),
]


@pytest.mark.parametrize("name,k,mig,reduce,states,transitions", PINNED)
def test_explorer_counts_are_unchanged(name, k, mig, reduce, states, transitions):
    r = explore(name, preemptions=k, migrations=mig, reduce=reduce)
    assert (r.states, r.transitions) == (states, transitions)


@pytest.mark.parametrize("name,digest", [
    ("counter-plain", "9c0be529b0ae4cca5d2b0d5bf8eb98e4ff21ddcd"),
    ("list-pop-cas", "2c3e99224073e1136e0d8e3a552413ef35ef2f44"),
])
def test_explorer_traces_are_unchanged(name, digest):
    trace = "\n".join(explore(name).trace)
    assert hashlib.sha1(trace.encode()).hexdigest() == digest, trace


@pytest.fixture(scope="module")
def spin_tool():
    ensure_tool("spin", "spin")
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler for pan")


def test_threads_sets_spins_thread_count(spin_tool):
    # one pan build (about 10 s); 4 threads at (3, 1) is benchmarks/model/engines.py's
    by_spin = spin.check("counter", preemptions=1, threads=2)
    assert by_spin.bounds["threads"] == 2
    assert by_spin.rounds == 1  # the automata learned thread by thread were complete
    assert by_spin.holds and by_spin.as_expected
    assert by_spin.finals == final_states("counter", preemptions=1, threads=2)
