"""Shared fixtures of the test suite.

The test process runs in the machine's default rseq mode; modes chosen at
process start (glibc's registration off, seccomp) run in children started
with ``helpers.subproc``.  ``tests/`` is on ``sys.path`` (this file's
folder), so tests import ``helpers`` directly.
"""
from __future__ import annotations

import pytest

import rseq


@pytest.fixture
def glibc_mode() -> rseq.Info:
    """The test process's registration is glibc's (the default on glibc >= 2.35
    unless GLIBC_TUNABLES=glibc.pthread.rseq=0); skip where it is not."""
    facts = rseq.info()
    if facts.process_owner != "glibc" or facts.owner != "glibc":
        pytest.skip(f"glibc does not own this process's rseq registration "
                    f"(owner: {facts.process_owner})")
    return facts


@pytest.fixture
def kernel_rseq() -> rseq.Info:
    facts = rseq.info()
    if not facts.kernel:
        pytest.skip("no rseq(2) on this kernel")
    return facts
