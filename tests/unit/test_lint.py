"""``ruff check`` over the whole checkout runs in the default test run, so
`.ci/run` (the README's test command) is also the lint gate.  The rule set
and the 100-column limit live in pyproject.toml."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

# The checkout this test file is in (the package under test may be installed
# elsewhere): tests/unit/test_lint.py -> the repository root.
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_ruff_is_installed():
    # Not a skip: the test extra installs ruff, and a lint gate that skips
    # itself when its tool is missing would pass in silence.
    assert importlib.util.find_spec("ruff") is not None, (
        "ruff is not installed: python3 -m pip install '.[test]'"
    )


def test_ruff_check_finds_nothing():
    assert os.path.isfile(os.path.join(REPO, "pyproject.toml")), REPO
    proc = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", REPO],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
