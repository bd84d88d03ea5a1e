"""librseq owns registration: rseq reads its area and never touches it.

A stand-in library (tests/integration/fake_librseq) is preloaded with glibc's
registration switched off, the situation in which librseq registers threads
itself and exports rseq_offset / rseq_size."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from helpers.subproc import OWN_REGISTRATION, run_json

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fake_librseq",
                      "fake_librseq.c")


@pytest.fixture(scope="module")
def fake_librseq(tmp_path_factory):
    compiler = shutil.which("gcc") or shutil.which("cc")
    if not compiler:
        pytest.skip("no C compiler")
    out = str(tmp_path_factory.mktemp("fake_librseq") / "libfake_librseq.so")
    subprocess.run([compiler, "-shared", "-fPIC", "-O2", SOURCE, "-o", out], check=True)
    return out


def test_librseq_owner(fake_librseq):
    result = run_json("""
        import ctypes, json, threading, warnings
        import rseq
        lib = ctypes.CDLL(None)
        lib.fake_area_address.restype = ctypes.c_size_t
        out = {}
        main = rseq.info()
        out["main"] = dict(owner=main.owner, process_owner=main.process_owner,
                           address_matches=main.area_address == lib.fake_area_address(),
                           fields=main.fields, cpu=rseq.cpu())
        # register() takes a reference on librseq's registration, never registers.
        out["count"] = rseq.register()
        out["released"] = rseq.unregister()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out["noop"] = rseq.unregister()
        out["warned"] = [str(w.message) for w in caught]
        # The area is still librseq's registration: librseq can unregister it.
        def other():
            before = rseq.info()
            out["thread_before"] = dict(owner=before.owner, fallback=before.fallback,
                                        cpu_ok=rseq.cpu() in range(rseq.info().possible_cpus))
            out["thread_register"] = lib.fake_register()
            after = rseq.info()
            out["thread_after"] = dict(
                owner=after.owner,
                address_matches=after.area_address == lib.fake_area_address())
        t = threading.Thread(target=other)
        t.start(); t.join()
        out["fake_unregister"] = lib.fake_unregister()
        print(json.dumps(out))
    """, env=dict(OWN_REGISTRATION, LD_PRELOAD=fake_librseq))
    assert result["main"]["owner"] == "librseq"
    assert result["main"]["process_owner"] == "librseq"
    assert result["main"]["address_matches"]
    assert result["main"]["fields"] == ["cpu_id_start", "cpu_id", "rseq_cs", "flags"]
    assert result["count"] == 1
    assert result["released"] is False
    assert result["noop"] is False
    assert any("owned by librseq" in w for w in result["warned"])
    # A thread librseq has not registered yet uses the fallback, and picks up
    # librseq's area as soon as librseq registers it.
    assert result["thread_before"]["owner"] is None
    assert "librseq has not registered" in result["thread_before"]["fallback"]
    assert result["thread_before"]["cpu_ok"]
    assert result["thread_register"] == 0
    assert result["thread_after"] == {"owner": "librseq", "address_matches": True}
    # rseq never unregistered librseq's area: librseq still can.
    assert result["fake_unregister"] == 0
