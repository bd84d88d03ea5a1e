"""Conformance against this machine's kernel, and the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from rseq.model import CASES, conformance
from rseq.model.cli import main


def _kernel_has_rseq() -> bool:
    from rseq.model.conformance import _raw_rseq

    return _raw_rseq(0, 0, 0, 0) != -38  # ENOSYS


pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="Linux only")


@pytest.fixture(scope="module")
def report():
    if not _kernel_has_rseq():
        pytest.skip("no rseq(2) on this kernel")
    return conformance()


def test_table_is_large_enough():
    assert len(CASES) >= 20
    assert len({c.name for c in CASES}) == len(CASES)


def test_model_agrees_with_the_kernel(report):
    disagree = [r for r in report.rows if r.verdict == "DISAGREE"]
    assert not disagree, report.format()
    assert report.agree


def test_undecided_is_the_exception_and_says_why(report):
    undecided = [r for r in report.rows if r.verdict == "undecided"]
    assert len(undecided) <= 2
    assert all(r.undecided for r in undecided)


def test_uses_the_package_wrapper(report):
    assert report.wrapper == "rseq._inject.rseq_syscall"


def test_cli_list(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("linux-4.18", "linux-6.3", "linux-7.0", "size-flag-2020", "sched-state-2023",
                 "ktls-2020", "freebsd-2021", "counter", "list-pop-cas"):
        assert name in out
    assert main(["list", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {v["name"] for v in data["variants"]} >= {"linux-6.3", "freebsd-2021"}


def test_cli_check_exit_codes(capsys):
    assert main(["check", "counter", "--preemptions", "1"]) == 0
    assert "HOLDS" in capsys.readouterr().out
    assert main(["check", "list-pop-cas"]) == 1
    out = capsys.readouterr().out
    assert "VIOLATED" in out and "replay with" in out
    assert main(["check", "syscall-in-cs", "--variant", "freebsd-2021"]) == 0
    capsys.readouterr()


def test_cli_check_json(capsys):
    assert main(["check", "counter-plain", "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["holds"] is False and data["states"] > 0 and data["schedule"]


def test_cli_random_and_schedule(capsys):
    assert main(["check", "list-pop-cas", "--seed", "1", "--runs", "3000", "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["mode"] == "random" and data["seed"] == 1
    assert main(["check", "list-pop-cas", "--schedule", ",".join(data["schedule"])]) == 1
    assert "VIOLATED" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [
    ["check", "no-such-scenario"],
    ["check", "counter", "--variant", "no-such-variant"],
    ["check", "time-slice", "--variant", "linux-6.3"],
    ["check", "counter", "--preemptions", "-1"],
    ["check", "counter", "--schedule", "fly T1"],
    ["frobnicate"],
    [],
    ["--bogus"],
    ["list", "--bogus"],
    ["list", "extra"],
    ["check", "counter", "--bogus"],
    ["check", "counter", "--runs", "-1"],
    ["check", "counter", "--runs", "many"],
    ["check", "counter", "--max-depth", "-3"],
    ["check", "counter", "--max-states", "0"],
    ["check", "counter", "--max-seconds", "0"],
    ["check", "counter", "--max-seconds", "-1"],
    ["check", "counter", "--max-seconds", "inf"],
    ["check", "counter", "--max-memory", "0"],
    ["check", "counter", "--seed", "x"],
    ["conformance", "--bogus"],
    ["conformance", "--case", "no-such-case"],
])
def test_cli_bad_usage_is_one_line_and_exit_2(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err


# ------------------------------------------------------------------------
# A check never says HOLDS unless it checked to the end (exit 3 otherwise)
# ------------------------------------------------------------------------

@pytest.mark.parametrize("argv", [
    ["check", "list-pop-cas", "--max-depth", "0"],
    ["check", "list-pop-cas", "--seed", "1", "--runs", "0"],
    ["check", "list-pop-cas", "--seed", "1", "--max-depth", "0"],
    ["check", "counter", "--max-depth", "0"],
])
def test_cli_nothing_checked_is_not_holds(argv, capsys):
    """list-pop-cas is expected to be violated: exploring nothing must not
    say it holds, nor that the outcome is as expected."""
    assert main(argv) == 3
    out = capsys.readouterr().out
    assert "NOTHING CHECKED" in out and "HOLDS" not in out
    assert "outcome unknown" in out and "as expected" not in out
    assert main([*argv, "--json"]) == 3
    data = json.loads(capsys.readouterr().out)
    assert data["verdict"] == "nothing checked" and data["as_expected"] is False
    assert data["transitions"] == 0


def test_cli_max_states_is_honoured_with_a_seed(capsys):
    argv = ["check", "counter", "--preemptions", "100", "--seed", "1", "--runs", "100000",
            "--max-states", "50", "--json"]
    assert main(argv) == 3
    data = json.loads(capsys.readouterr().out)
    assert data["mode"] == "random" and data["states"] == 50
    assert data["complete"] is False and data["stopped_by"] == "max_states"
    assert data["verdict"] == "partial" and data["runs"] < 100000
    assert main(argv[:-1]) == 3
    out = capsys.readouterr().out
    assert "PARTIAL" in out and "state limit (50 states" in out and "HOLDS" not in out


def test_cli_time_limit_makes_a_partial_result(capsys):
    import time
    started = time.monotonic()
    assert main(["check", "counter", "--preemptions", "100", "--max-seconds", "0.5"]) == 3
    assert time.monotonic() - started < 20
    out = capsys.readouterr().out
    assert "PARTIAL" in out and "time limit (0.5 s, --max-seconds)" in out
    assert "HOLDS" not in out and "outcome unknown (expected: holds)" in out


def test_cli_memory_limit_makes_a_partial_result(capsys):
    assert main(["check", "counter", "--preemptions", "100", "--max-memory", "8",
                 "--json"]) == 3
    data = json.loads(capsys.readouterr().out)
    assert data["stopped_by"] == "max_memory" and data["limits"]["max_memory"] == 8 << 20
    assert data["verdict"] == "partial" and data["holds"] is True


def test_default_limits_bound_time_and_memory():
    """The defaults stop --preemptions 100 (minutes and gigabytes unbounded)
    at about a minute and a gigabyte; measured in the report: 62 s."""
    from rseq.model import _explore, explore

    assert 0 < _explore.DEFAULT_MAX_SECONDS <= 120
    assert 0 < _explore.DEFAULT_MAX_MEMORY <= 2 << 30
    result = explore("counter", preemptions=100, max_seconds=0.3)
    assert result.verdict == "partial" and not result.complete and result.holds
    assert result.stopped_by == "max_seconds" and not result.as_expected


def test_a_limit_does_not_hide_a_violation(capsys):
    """A violation found before a limit stops the search is still reported
    (exit 1), with a note that coverage is partial."""
    assert main(["check", "counter-plain", "--max-states", "3000"]) == 1
    out = capsys.readouterr().out
    assert "VIOLATED" in out and "coverage is partial" in out


def test_cli_conformance_json(capsys, report):
    assert main(["conformance", "--json", "--case", "register-32", "--case", "read-only"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["agree"] and [c["name"] for c in data["cases"]] == ["register-32", "read-only"]


def test_python_dash_m_entry_points():
    env = dict(os.environ)
    for argv in (
        ["-m", "rseq.model", "check", "counter-plain"],
        ["-m", "rseq", "model", "check", "counter-plain"],
    ):
        proc = subprocess.run(
            [sys.executable, *argv], capture_output=True, text=True, env=env, timeout=120
        )
        assert proc.returncode == 1, proc.stderr
        assert "VIOLATED" in proc.stdout
