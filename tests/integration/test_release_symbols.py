"""The installed release module rseq._core carries no injection code and no
test-only symbol: checked with nm on the very .so that `import rseq` loads."""
from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from rseq import _core, _inject

# Injection globals and hooks, the raw system call, the registration-count
# setter, the stress workload (its functions and the list push/pop test
# helpers) and the test build's module init.
FORBIDDEN = re.compile(
    r"rseq_inject|set_registration_count|set_refcount|rseq_syscall\b|py_rseq_syscall"
    r"|rseq_list_push|rseq_list_pop|list_push|list_pop|primitive_|worker_run|workload"
    r"|make_record|PyInit__inject")

pytestmark = pytest.mark.skipif(shutil.which("nm") is None, reason="needs nm (binutils)")


def _symbols(*flags: str, path: str) -> list[str]:
    out = subprocess.run(["nm", *flags, path], capture_output=True, text=True,
                         check=True).stdout
    return [line.split()[-1] for line in out.splitlines() if line.split()]


@pytest.mark.parametrize("flags", [("-D",), ()], ids=["dynamic", "all"])
def test_release_core_has_no_test_symbols(flags):
    path = _core.__file__
    symbols = _symbols(*flags, path=path)
    assert symbols, f"nm {' '.join(flags)} {path}: no symbols"
    assert [s for s in symbols if FORBIDDEN.search(s)] == []


def test_the_check_can_fail():
    # The test build does carry them: the pattern matches real symbols.
    symbols = _symbols(path=_inject.__file__)
    assert any(FORBIDDEN.search(s) for s in symbols)
    assert "PyInit__core" in _symbols("-D", path=_core.__file__)
