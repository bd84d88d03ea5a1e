"""The command line: ``python -m rseq``, ``info [--json]``, ``bench --json``
and its error handling: one argparse tree, and every user error on every
subcommand is one line on stderr and exit status 2."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest

import rseq
from helpers.subproc import OWN_REGISTRATION, run_json, run_rseq_cli
from rseq import _cli

INFO_FIELDS = [f.name for f in dataclasses.fields(rseq.Info)]


def test_info_json_keys_are_the_info_fields(glibc_mode):
    proc = run_rseq_cli("info", "--json")
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert list(got) == INFO_FIELDS
    mine = rseq.info().as_dict()
    # Another process: only the thread's address differs.
    assert got.pop("area_address") > 0
    mine.pop("area_address")
    mine["fields"] = list(mine["fields"])
    assert got == mine


def test_info_json_own_registration():
    proc = run_rseq_cli("info", "--json", env=OWN_REGISTRATION)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert list(got) == INFO_FIELDS
    assert got["owner"] == got["process_owner"] == "rseq"
    assert "mm_cid" in got["fields"] or got["feature_size"] < 28


def test_info_text(glibc_mode):
    proc = run_rseq_cli("info")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "rseq: restartable sequences on this machine"
    labels = [line.split()[0] for line in lines[1:]]
    assert labels == ["kernel", "process", "this", "usable", "not", "fallback",
                      "possible", "time", "per-CPU", "signature", "now"]
    assert "registered by glibc: 32-byte area at 0x" in proc.stdout
    assert "usable fields   cpu_id_start cpu_id rseq_cs flags\n" in proc.stdout
    assert "mm_cid unsupported" in lines[-1]
    assert f"signature       {0x53053053:#010x}" in proc.stdout


def test_info_text_on_the_fallback_path():
    """The report must still print when rseq is denied (no area at all)."""
    proc_out = run_json("""
        import contextlib, errno, io, json
        from helpers import seccomp
        seccomp.deny_rseq(errno.EPERM)
        from rseq._cli import main
        text = io.StringIO()
        with contextlib.redirect_stdout(text):
            status = main(["info"])
        print(json.dumps([status, text.getvalue()]))
    """, env=OWN_REGISTRATION)
    status, text = proc_out
    assert status == 0
    assert "this thread     none (fallback path in use)" in text
    assert "fallback        EPERM: rseq is denied" in text
    assert "usable fields   -" in text
    assert "mm_cid unsupported" in text


def test_default_run_prints_report_and_speed_check():
    proc = run_rseq_cli()
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("rseq: restartable sequences on this machine\n")
    assert "\nspeed check" in proc.stdout
    assert "rseq.cpu()" in proc.stdout.split("speed check", 1)[1]
    assert "target: rseq.cpu() within" in proc.stdout
    assert proc.stderr == ""


def test_bench_json_structure():
    proc = run_rseq_cli("bench", "--json", "--quick", "--section", "reads")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert list(result) == ["reads"]
    reads = result["reads"]
    assert {"title", "unit", "rounds", "ns", "ratio_to_floor", "floor",
            "targets"} <= set(reads)
    assert reads["unit"] == "ns/call" and reads["rounds"] >= 1
    ns = reads["ns"]
    assert {"rseq.cpu()", reads["floor"]} <= set(ns)
    assert all(isinstance(v, float) and 0 < v < 1e7 for v in ns.values())
    assert set(reads["ratio_to_floor"]) == set(ns)
    assert math.isclose(reads["ratio_to_floor"][reads["floor"]], 1.0)
    for name, value in ns.items():
        assert math.isclose(reads["ratio_to_floor"][name], value / ns[reads["floor"]])
    for target in reads["targets"].values():
        assert set(target) == {"value", "limit", "ok"}
        assert isinstance(target["ok"], bool)


@pytest.mark.parametrize("argv, fragment", [
    (["bench", "--section", "nope"], "invalid choice: 'nope'"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["info", "--bogus"], "unrecognized arguments: --bogus"),
    (["inspect"], "the following arguments are required: pid"),
])
def test_usage_errors_are_one_line(argv, fragment):
    proc = run_rseq_cli(*argv)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and fragment in proc.stderr
    assert "Traceback" not in proc.stderr


SUBCOMMANDS = ["info", "inspect", "bench", "stress", "model", "ring", "metrics", "pool"]


def test_help_lists_every_subcommand():
    proc = run_rseq_cli("-h")
    assert proc.returncode == 0 and proc.stderr == ""
    listed = proc.stdout.split("subcommands:", 1)[1].split()
    for name in SUBCOMMANDS:
        assert name in listed, proc.stdout
    # One tree: every module in the registry added exactly its subcommand.
    parser = _cli.build_parser()
    choices = next(a for a in parser._actions if a.choices and "info" in a.choices).choices
    assert list(choices) == SUBCOMMANDS


# (argv, fragment): a bad flag and a bad value for each subcommand, at
# every level of nesting.
BAD_INPUT = [
    (["--bogus"], "python -m rseq: error: unrecognized arguments: --bogus"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["info", "--bogus"], "python -m rseq info: error: unrecognized arguments: --bogus"),
    (["info", "extra"], "unrecognized arguments: extra"),
    (["inspect", "1", "--bogus"], "python -m rseq inspect: error: unrecognized arguments"),
    (["inspect", "abc"], "invalid int value: 'abc'"),
    (["inspect"], "the following arguments are required: pid"),
    (["inspect", "1", "--timeout", "0"], "argument --timeout: must be a finite number > 0"),
    (["inspect", "1", "--timeout", "soon"], "argument --timeout: invalid float value"),
    (["bench", "--bogus"], "python -m rseq bench: error: unrecognized arguments: --bogus"),
    (["bench", "--section", "nope"], "invalid choice: 'nope'"),
    (["stress", "--bogus"], "python -m rseq stress: error: unrecognized arguments: --bogus"),
    (["stress", "--kills", "-1"], "argument --kills: must be a positive integer (>= 1), got -1"),
    (["stress", "--kills", "0"], "argument --kills: must be a positive integer (>= 1), got 0"),
    (["stress", "--kills", "many"], "argument --kills: invalid int value: 'many'"),
    (["stress", "--index", "node"], "argument --index: invalid choice: 'node'"),
    (["model"], "python -m rseq model: error: the following arguments are required"),
    (["model", "--bogus"], "python -m rseq model: error: "),
    (["model", "frobnicate"], "python -m rseq model: error: argument SUBCOMMAND: invalid choice"),
    (["model", "list", "--bogus"], "python -m rseq model list: error: unrecognized arguments"),
    (["model", "check", "counter", "--bogus"],
     "python -m rseq model check: error: unrecognized arguments: --bogus"),
    (["model", "check", "counter", "--runs", "-1"], "argument --runs: must be an integer >= 0"),
    (["model", "check", "counter", "--max-states", "0"], "argument --max-states: must be a "
                                                         "positive integer"),
    (["model", "check", "nope"], "python -m rseq model check: error: unknown scenario 'nope'"),
    (["model", "conformance", "--bogus"], "python -m rseq model conformance: error: unrecognized"),
    (["model", "conformance", "--case", "nope"], "unknown case 'nope'"),
    (["ring"], "python -m rseq ring: error: the following arguments are required: COMMAND"),
    (["ring", "stats"], "python -m rseq ring stats: error: the following arguments are "
                        "required: name"),
    (["ring", "stats", "x", "--bogus"], "python -m rseq ring stats: error: unrecognized"),
    (["ring", "stats", "rseq-test-no-such-ring"], "python -m rseq ring stats: error: [Errno 2] "
                                                  "no ring"),
    (["ring", "tail", "x", "--count", "0"], "argument --count: must be a positive integer"),
    (["ring", "tail", "x", "--timeout", "-1"], "argument --timeout: must be a"),
    (["metrics"], "python -m rseq metrics: error: the following arguments are required"),
    (["metrics", "frobnicate"], "python -m rseq metrics: error: argument {show,serve}: "
                                "invalid choice"),
    (["metrics", "show"], "python -m rseq metrics show: error: the following arguments are "
                          "required: name"),
    (["metrics", "show", "x", "--format", "xml"], "argument --format: invalid choice: 'xml'"),
    (["metrics", "show", "/nonexistent/metrics"], "python -m rseq metrics show: error: no "
                                                  "metrics file '/nonexistent/metrics'"),
    (["metrics", "serve", "x"], "the following arguments are required: --port"),
    (["metrics", "serve", "x", "--port", "70000"], "argument --port: must be a TCP port "
                                                    "(0 to 65535), got 70000"),
    (["metrics", "serve", "x", "--port", "-1"], "argument --port: must be a TCP port"),
    (["pool"], "python -m rseq pool: error: the following arguments are required: SUBCOMMAND"),
    (["pool", "frobnicate"], "python -m rseq pool: error: argument SUBCOMMAND: invalid choice"),
    (["pool", "stats"], "python -m rseq pool stats: error: the following arguments are required"),
    (["pool", "stats", "/nonexistent/pool", "--bogus"], "unrecognized arguments: --bogus"),
    (["pool", "stats", "/nonexistent/pool"], "python -m rseq pool stats: error: no pool"),
]


@pytest.mark.parametrize("argv, fragment", BAD_INPUT, ids=lambda v: " ".join(v)
                         if isinstance(v, list) else "")
def test_every_user_error_is_one_line_and_exit_2(argv, fragment, capsys):
    assert _cli.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert fragment in err
    assert "Traceback" not in err and "usage:" not in err


def test_every_subcommand_is_tested_with_bad_input():
    tested = {argv[0] for argv, _ in BAD_INPUT if argv and argv[0] in SUBCOMMANDS}
    assert tested == set(SUBCOMMANDS)
    nested = {argv[1] for argv, _ in BAD_INPUT if argv[:1] == ["model"] and len(argv) > 1}
    assert {"list", "check", "conformance"} <= nested


def test_help_of_a_nested_subcommand_exits_0():
    proc = run_rseq_cli("model", "check", "-h")
    assert proc.returncode == 0 and proc.stderr == ""
    assert proc.stdout.startswith("usage: python -m rseq model check")
    assert "--max-seconds" in proc.stdout and "--max-memory" in proc.stdout


def test_usage_error_from_a_handler_names_its_subcommand():
    proc = run_rseq_cli("stress", "--kills", "0")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == ("python -m rseq stress: error: argument --kills: must be a "
                           "positive integer (>= 1), got 0\n")


def test_ctrl_c_is_one_line_and_status_130(capsys, monkeypatch):
    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setattr(_cli, "_run_info", interrupted)
    assert _cli.main(["info"]) == 130
    assert capsys.readouterr().err == "python -m rseq info: interrupted\n"
