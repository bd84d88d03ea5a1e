"""The package builds, installs and works on every other CPython 3.11+ found
on the machine (the project supports 3.11, 3.12 and 3.13), each in a fresh
virtual environment through pip, as a user would install it."""
from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SMOKE = r"""
import json, os, sys, tempfile, threading
import rseq
facts = rseq.info()
counter = rseq.PerCpuCounter()
def work():
    for _ in range(10000):
        counter.add(1)
threads = [threading.Thread(target=work) for _ in range(4)]
for t in threads: t.start()
for t in threads: t.join()
with tempfile.TemporaryDirectory() as tmp:
    with rseq.Arena.create(os.path.join(tmp, "a"), capacity=4) as arena:
        arena.counter("k").add(7)
        arena_value = arena.counter("k").value()
print(json.dumps({"version": list(sys.version_info[:2]), "cpu": rseq.cpu(),
                  "owner": facts.owner, "counter": counter.value(),
                  "arena": arena_value, "possible": facts.possible_cpus}))
"""


def other_pythons() -> list[str]:
    """Interpreters of other 3.11+ minor versions: python3.X on PATH or under
    pyenv, one per version, never the one running the tests."""
    found: dict[tuple[int, int], str] = {}
    candidates = [shutil.which(f"python3.{minor}") for minor in range(11, 20)]
    root = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    candidates += sorted(glob.glob(os.path.join(root, "versions", "3.*", "bin", "python3.*[0-9]")))
    for path in filter(None, candidates):
        try:
            out = subprocess.run([path, "-c", "import sys; print(*sys.version_info[:2])"],
                                 capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            continue  # a pyenv shim for a version that is not installed
        if out.returncode != 0:
            continue
        version = tuple(int(x) for x in out.stdout.split())
        if version >= (3, 11) and version != sys.version_info[:2]:
            found.setdefault(version, path)
    return [found[v] for v in sorted(found)]


PYTHONS = other_pythons()


@pytest.mark.skipif(not PYTHONS, reason="no other CPython 3.11+ on this machine")
@pytest.mark.parametrize("python", PYTHONS, ids=os.path.basename)
def test_install_and_use(python, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([python, "-m", "venv", str(venv)], check=True, timeout=120)
    py = str(venv / "bin" / "python")
    install = subprocess.run([py, "-m", "pip", "install", "-q", REPO], capture_output=True,
                             text=True, timeout=600)
    assert install.returncode == 0, install.stdout + install.stderr
    run = subprocess.run([py, "-c", SMOKE], capture_output=True, text=True, timeout=120,
                         cwd=str(tmp_path))
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert tuple(result["version"]) != sys.version_info[:2]
    assert 0 <= result["cpu"] < result["possible"]
    assert result["counter"] == 40000
    assert result["arena"] == 7
