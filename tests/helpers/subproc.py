"""Run Python snippets in a fresh interpreter, in a chosen rseq mode.

The test process itself runs in the machine's default mode (glibc owns the
registration).  Modes that must be chosen before the process starts (glibc's
registration switched off, a seccomp filter) run in a child started here.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from typing import Any

TESTS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: glibc does not register threads: rseq registers its own area.
OWN_REGISTRATION = {"GLIBC_TUNABLES": "glibc.pthread.rseq=0"}
GLIBC_REGISTRATION: dict[str, str] = {}

MODES = {"glibc": GLIBC_REGISTRATION, "own": OWN_REGISTRATION}


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    env["PYTHONPATH"] = os.pathsep.join(
        [TESTS_DIR] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.update(extra or {})
    return env


def run_python(code: str, *, env: dict[str, str] | None = None,
               args: tuple[str, ...] = (), timeout: float = 60,
               check: bool = True) -> subprocess.CompletedProcess:
    """Run ``code`` (dedented) in ``sys.executable`` with ``tests/`` on the path."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args],
                          env=child_env(env), capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"child exited with {proc.returncode}\n"
                             f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
    return proc


def run_json(code: str, **kwargs: Any) -> Any:
    """Run ``code`` and parse the last line it prints as JSON."""
    proc = run_python(code, **kwargs)
    lines = proc.stdout.strip().splitlines()
    assert lines, f"no output; stderr:\n{proc.stderr}"
    return json.loads(lines[-1])


def run_rseq_cli(*argv: str, env: dict[str, str] | None = None,
                 timeout: float = 60) -> subprocess.CompletedProcess:
    """``python -m rseq ARGV...``; never raises for the exit status."""
    return subprocess.run([sys.executable, "-m", "rseq", *argv], env=child_env(env),
                          capture_output=True, text=True, timeout=timeout)
