"""SPIN as a second engine (issue 13): the Promela export, generated from
the scenario definitions, gives the Python explorer's verdict and its
final states; a SPIN violation comes back as the explorer's trace.

SPIN is installed by the test itself (tests/helpers/debian.py) where it
can be; elsewhere these tests skip, and the missing-tool message is tested
without it.  The long sweep (every exportable scenario and variant at
larger bounds) is ``python benchmarks/model/engines.py``.
"""

from __future__ import annotations

import shutil

import pytest

from helpers.debian import ensure_tool
from rseq.model import SCENARIOS, explore, spin
from rseq.model._finals import final_states
from rseq.model.cli import main as model_main

# what the export covers today; the others raise Unsupported with the reason
EXPORTED = {"counter", "counter-plain", "list-pop-rseq", "list-pop-cas", "syscall-in-cs"}
# the default run's share: quick ones at the scenarios' default bounds
QUICK = ["counter-plain", "list-pop-cas", "syscall-in-cs"]
# the scenarios of the variants' own kernel rules (rseq.model._spin_variants):
# sched-state-2023, linux-7.0 with its options, size-flag-2020 with its options
VARIANT_RULES = ["adaptive-mutex", "spin-mutex", "time-slice", "time-slice-unrevoked",
                 "interposed-size-flag", "interposed-trusts-length"]


@pytest.fixture(scope="module")
def spin_tool():
    ensure_tool("spin", "spin")
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler for pan")


def test_export_coverage_is_what_the_docs_say():
    exported = {name for name, s in SCENARIOS.items()
                if spin.supported(s, s.default_variant) is None}
    assert exported >= EXPORTED  # new families may add to it
    for name, s in SCENARIOS.items():
        why = spin.supported(s, s.default_variant)
        assert (why is None) == (name in exported)
        if why is not None:
            assert len(why) > 10


@pytest.mark.parametrize("name", QUICK)
def test_both_engines_give_the_same_verdict_and_final_states(spin_tool, name):
    s = SCENARIOS[name]
    variants = [s.default_variant] + [v for v in s.expect_by_variant if v != s.default_variant]
    for variant in variants:
        by_spin = spin.check(name, variant)
        by_python = explore(name, variant)
        assert by_spin.holds == by_python.holds, (name, variant)
        assert by_spin.as_expected
        assert by_spin.finals == final_states(name, variant), (name, variant)
        if not by_spin.holds:
            # SPIN's trail, replayed by the explorer: the usual trace
            assert by_spin.trace and by_spin.trace[-1].startswith("VIOLATION")
            assert by_spin.schedule


@pytest.mark.parametrize("name", VARIANT_RULES)
def test_variant_rules_give_the_python_verdict(spin_tool, name):
    """The variants' kernel rules in Promela (sched_state writes, the slice
    extension and optimised IDs, seed 000's registration and negotiation)
    against the Python variants, at the scenario's default bounds, with its
    check_step property (a pair: one holds, the other is violated)."""
    by_spin = spin.check(name)
    by_python = explore(name)
    assert by_spin.holds == by_python.holds, name
    assert by_spin.as_expected and by_python.as_expected, name
    assert by_spin.finals == final_states(name), name
    if not by_spin.holds:
        # SPIN's trail (not a shortest one), replayed by the explorer
        assert by_spin.violation
        assert by_spin.trace and by_spin.trace[-1].startswith("VIOLATION")
        assert by_spin.schedule


def test_engine_both_on_the_command_line(spin_tool, capsys):
    assert model_main(["check", "counter-plain", "--engine", "both"]) == 1
    out = capsys.readouterr().out
    assert "(spin; bounds" in out and "(exhaustive; bounds" in out
    assert "both engines: VIOLATED" in out
    assert "replay with: --schedule" in out


def test_missing_spin_is_a_clear_message(monkeypatch, capsys):
    monkeypatch.setattr(spin.shutil, "which", lambda name: None)
    with pytest.raises(spin.SpinMissing, match="apt-get install spin"):
        spin.tools()
    assert model_main(["check", "counter", "--engine", "spin"]) == 2
    assert "SPIN is not installed" in capsys.readouterr().err


def test_missing_compiler_is_a_clear_message(monkeypatch):
    monkeypatch.setattr(spin.shutil, "which",
                        lambda name: "/usr/bin/spin" if name == "spin" else None)
    monkeypatch.delenv("CC", raising=False)
    with pytest.raises(spin.SpinMissing, match="C compiler"):
        spin.tools()


def test_unexported_scenario_says_why(capsys):
    # ktls-2020 (seed 003's kernel-placed area) has no Promela rules
    assert model_main(["check", "counter", "--variant", "ktls-2020", "--engine", "spin"]) == 2
    assert "no Promela export" in capsys.readouterr().err
