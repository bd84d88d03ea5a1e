"""The ring's producer in the C API (version 3): a compiled extension puts
records from its own threads, without the GIL."""
from __future__ import annotations

import errno
import os
import sys

import pytest

import rseq
from helpers.build import build_capi_ext

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ring_ext", "ring_ext.c")


@pytest.fixture(scope="module")
def ext(tmp_path_factory):
    out = tmp_path_factory.mktemp("ring_ext")
    try:
        build_capi_ext(str(out), SOURCE)
    except FileNotFoundError as e:
        pytest.skip(str(e))
    sys.path.insert(0, str(out))
    try:
        import ring_ext
    finally:
        sys.path.remove(str(out))
    return ring_ext


def test_c_producers_from_threads(ext, tmp_path):
    with rseq.Ring.create(str(tmp_path / "ring"), size_per_cpu=1 << 20) as ring:
        committed, dropped, errors = ext.put_from_threads(ring, 4, 5000)
        assert errors == 0 and committed + dropped == 20000
        got = ring.consume(1 << 20, records=True)
        assert len(got) == committed
        seen = {tuple(r.data.split()[1:]) for r in got}
        assert len(seen) == committed and all(r.data.startswith(b"c ") for r in got)
        assert {r.pid for r in got} == {os.getpid()}
        stats = ring.stats()
        assert (stats.committed, stats.dropped) == (committed, dropped)


def test_c_api_errors(ext, tmp_path):
    path = str(tmp_path / "ring")
    with rseq.Ring.create(path, size_per_cpu=4096) as ring:
        assert ext.put_oversized(ring) == -errno.EMSGSIZE
        with pytest.raises(TypeError, match="rseq.Ring"):
            ext.put_from_threads(object(), 1, 1)
        with rseq.Ring.open(path, readonly=True) as monitor, \
                pytest.raises(PermissionError, match="read-only"):
            ext.put_from_threads(monitor, 1, 1)
    with pytest.raises(TypeError, match="closed"):
        ext.put_from_threads(ring, 1, 1)
    assert rseq._core._C_API is not None
