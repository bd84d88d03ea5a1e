"""Coexistence with librseq (issue 8, items 2 and 8).

librseq owns registration when glibc does not (GLIBC_TUNABLES=
glibc.pthread.rseq=0), lazily: its ``rseq_size`` stays 0 until a thread
registers through ``rseq_register_current_thread()``, and that function
abort()s the process when a registration fails after another thread's
succeeded.  So rseq must register threads through librseq's function and
use librseq's area, never register an area of its own, never unregister
what librseq registered.

The stand-in (tests/integration/fake_librseq) reproduces that behaviour and
is preloaded (LD_PRELOAD), the only way the real library can be in a Python
process.  The same scenarios run against the real librseq when one is
installed (``RSEQ_TEST_LIBRSEQ=/path/to/librseq.so``, or found by the
loader); Debian 12 does not package it, so there they skip and say so.
"""
from __future__ import annotations

import ctypes.util
import os
import shutil
import subprocess
import textwrap

import pytest

from helpers.subproc import OWN_REGISTRATION, run_json, run_python

pytestmark = pytest.mark.usefixtures("kernel_rseq")

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fake_librseq",
                      "fake_librseq.c")
THREADS = 4
ADDS = 20000


@pytest.fixture(scope="module")
def fake_librseq(tmp_path_factory):
    compiler = shutil.which("gcc") or shutil.which("cc")
    if not compiler:
        pytest.skip("no C compiler")
    out = str(tmp_path_factory.mktemp("fake_librseq") / "libfake_librseq.so")
    subprocess.run([compiler, "-shared", "-fPIC", "-O2", SOURCE, "-o", out], check=True)
    return out


def _real_librseq_path() -> str | None:
    path = os.environ.get("RSEQ_TEST_LIBRSEQ")
    if path:
        return path
    name = ctypes.util.find_library("rseq")
    if not name:
        return None
    for folder in ("/usr/lib/x86_64-linux-gnu", "/usr/local/lib", "/usr/lib", "/lib"):
        candidate = os.path.join(folder, name)
        if os.path.exists(candidate):
            return candidate
    return None


@pytest.fixture(scope="module", params=["stand-in", "librseq"])
def librseq(request, fake_librseq):
    """(path to preload, whether it is the stand-in with its test helpers)."""
    if request.param == "stand-in":
        return fake_librseq, True
    path = _real_librseq_path()
    if not path:
        pytest.skip("the real librseq is not installed: Debian 12 does not package it "
                    "(apt-cache search librseq finds nothing); set "
                    "RSEQ_TEST_LIBRSEQ=/path/to/librseq.so to run these against it")
    return path, False


PRELUDE = """
    import ctypes, json, sys, threading
    import rseq._inject
    lib = ctypes.CDLL(None)
    STAND_IN = {stand_in}
    if STAND_IN:
        lib.fake_area_address.restype = ctypes.c_size_t
    size = ctypes.c_uint.in_dll(lib, "rseq_size")
    THREADS, ADDS = {threads}, {adds}
    def librseq_area_matches(info):
        return info.area_address == lib.fake_area_address() if STAND_IN else True
"""


def _run(code: str, librseq, **kwargs):
    path, stand_in = librseq
    prelude = PRELUDE.format(stand_in=stand_in, threads=THREADS, adds=ADDS)
    return run_json(textwrap.dedent(prelude) + textwrap.dedent(code),
                    env=dict(OWN_REGISTRATION, LD_PRELOAD=path), **kwargs)


def test_librseq_first(librseq):
    """Threads that librseq registered: rseq adopts librseq's area."""
    got = _run("""
        size_at_import = size.value           # lazy: nobody registered yet
        c = rseq.PerCpuCounter()
        seen = {}
        def worker(k):
            registered = lib.rseq_register_current_thread()
            i = rseq.info()
            seen[k] = [registered, i.owner, librseq_area_matches(i), i.fallback]
            for _ in range(ADDS):
                c.add(1)
        threads = [threading.Thread(target=worker, args=(k,)) for k in range(THREADS)]
        for t in threads: t.start()
        for t in threads: t.join()
        print(json.dumps(dict(size_at_import=size_at_import, size=size.value,
                              seen=sorted(seen.values()), value=c.value(),
                              fallback=c.fallback_count(),
                              process_owner=rseq.info().process_owner)))
    """, librseq)
    assert got["size_at_import"] == 0
    assert got["size"] > 0
    assert got["seen"] == [[0, "librseq", True, None]] * THREADS
    assert got["value"] == THREADS * ADDS
    assert got["fallback"] == 0
    assert got["process_owner"] == "librseq"


def test_rseq_first(librseq):
    """Threads rseq touches first are registered through librseq itself, so
    librseq's state stays coherent: its size turns non-zero, its area is the
    one in use, and threads that librseq registers afterwards succeed (no
    abort) and are adopted."""
    got = _run("""
        c = rseq.PerCpuCounter()
        c.add(1)                              # the main thread, rseq first
        main = rseq.info()
        out = dict(size_after_main=size.value, main=[main.owner, librseq_area_matches(main),
                                                      main.registration_count])
        seen = {}
        def rseq_first(k):
            for _ in range(ADDS):
                c.add(1)
            i = rseq.info()
            seen[k] = ["rseq first", i.owner, librseq_area_matches(i), i.fallback]
        def librseq_first(k):
            registered = lib.rseq_register_current_thread()
            for _ in range(ADDS):
                c.add(1)
            i = rseq.info()
            seen[k] = ["librseq first", registered, i.owner, librseq_area_matches(i)]
        threads = [threading.Thread(target=rseq_first if k % 2 else librseq_first,
                                    args=(k,)) for k in range(THREADS)]
        for t in threads: t.start()
        for t in threads: t.join()
        out.update(seen=sorted(seen.values()), value=c.value(), fallback=c.fallback_count())
        # rseq.unregister() never ends librseq's registration.
        rseq.register()
        out["released"] = rseq.unregister()
        out["after"] = rseq.info().owner
        print(json.dumps(out))
    """, librseq)
    assert got["size_after_main"] > 0
    assert got["main"] == ["librseq", True, 0]
    assert got["seen"] == sorted([["rseq first", "librseq", True, None]] * (THREADS // 2)
                                 + [["librseq first", 0, "librseq", True]] * (THREADS // 2))
    assert got["value"] == 1 + THREADS * ADDS
    assert got["fallback"] == 0
    assert got["released"] is False
    assert got["after"] == "librseq"


def test_librseq_unregister_moves_thread_to_fallback(librseq):
    """librseq's rseq_unregister_current_thread() ends the registration for
    every user: add() notices, moves the thread to the fallback and stays
    exact; librseq registering the thread again brings rseq back to its
    area."""
    got = _run("""
        c = rseq.PerCpuCounter()
        out = {}
        def worker():
            out["register"] = lib.rseq_register_current_thread()
            c.add(1)
            out["unregister"] = lib.rseq_unregister_current_thread()
            for _ in range(ADDS):
                c.add(1)
            lost = rseq.info()
            out["lost"] = [lost.owner, lost.fallback, c.fallback_count()]
            out["again"] = lib.rseq_register_current_thread()
            for _ in range(ADDS):
                c.add(1)
            back = rseq.info()
            out["back"] = [back.owner, librseq_area_matches(back), back.fallback,
                           c.fallback_count()]
        t = threading.Thread(target=worker); t.start(); t.join()
        out["value"] = c.value()
        print(json.dumps(out))
    """, librseq, timeout=60)
    assert got["register"] == 0 and got["unregister"] == 0 and got["again"] == 0
    owner, fallback, lane = got["lost"]
    assert owner is None and lane == ADDS
    assert fallback == ("librseq's registration of this thread was ended (cpu_id is -1: "
                        "rseq_unregister_current_thread() or rseq(2) RSEQ_FLAG_UNREGISTER)")
    assert got["back"] == ["librseq", True, None, ADDS]
    assert got["value"] == 1 + 2 * ADDS


def test_librseq_aborts_on_its_own_second_registration(librseq):
    """Why rseq must never register a thread before librseq is asked to:
    librseq abort()s on any failed registration once one succeeded, even
    its own second registration of a thread (no rseq involved here).  The
    stand-in reproduces it."""
    path, _ = librseq
    proc = run_python("""
        import ctypes, threading
        lib = ctypes.CDLL(None)
        assert lib.rseq_register_current_thread() == 0
        lib.rseq_register_current_thread()
    """, env=dict(OWN_REGISTRATION, LD_PRELOAD=path), check=False)
    assert proc.returncode == -6, proc.stderr   # SIGABRT


def test_glibc_owner_with_librseq(fake_librseq):
    """With glibc's registration on, librseq defers to glibc, and so does rseq."""
    got = run_json("""
        import ctypes, json
        import rseq._inject
        lib = ctypes.CDLL(None)
        c = rseq.PerCpuCounter()
        c.add(3)
        i = rseq.info()
        print(json.dumps([lib.rseq_register_current_thread(), i.owner, i.process_owner,
                          c.value()]))
    """, env={"LD_PRELOAD": fake_librseq})
    if got[1] != "glibc":
        pytest.skip("glibc does not own registration here")
    assert got == [0, "glibc", "glibc", 3]


def test_registration_probe_premise():
    """rseq asks librseq to register a thread only when a probe says it has
    no registration: registering an aligned address above user space answers
    EFAULT for an unregistered thread and EINVAL for a registered one (the
    kernel compares with the registration in force before it checks the
    address)."""
    import errno

    import rseq._inject
    got = run_json("""
        import json, threading
        import rseq._inject
        out = {}
        def fresh():
            out["unregistered"] = rseq._inject.rseq_syscall(2**64 - 32, 32, 0, rseq._core.SIGNATURE)
            rseq.cpu()                       # registers rseq's own area
            out["registered"] = rseq._inject.rseq_syscall(2**64 - 32, 32, 0, rseq._core.SIGNATURE)
        t = threading.Thread(target=fresh); t.start(); t.join()
        print(json.dumps(out))
    """, env=OWN_REGISTRATION)
    assert got == {"unregistered": -errno.EFAULT, "registered": -errno.EINVAL}
    assert rseq.info().owner != "glibc" or rseq._inject.rseq_syscall(
        2**64 - 32, 32, 0, rseq._core.SIGNATURE) == -errno.EINVAL


def test_librseq_arriving_after_import(tmp_path):
    """librseq's symbols are looked up again when a thread registers, not
    only at import: threads that start after it arrived are registered
    through it.  (The real librseq cannot be dlopen'ed, its 1 KiB TLS area
    is too large; a stand-in built with a 32-byte area can.  A thread rseq
    registered before librseq arrived keeps rseq's own area.)"""
    compiler = shutil.which("gcc") or shutil.which("cc")
    if not compiler:
        pytest.skip("no C compiler")
    small = str(tmp_path / "libfake_librseq_dlopen.so")
    subprocess.run([compiler, "-DFAKE_LIBRSEQ_DLOPEN", "-shared", "-fPIC", "-O2", SOURCE,
                    "-o", small], check=True)
    got = run_json(f"""
        import ctypes, json, threading
        import rseq._inject
        c = rseq.PerCpuCounter()
        c.add(1)
        out = dict(main=[rseq.info().owner, rseq.info().process_owner])
        lib = ctypes.CDLL({small!r}, mode=ctypes.RTLD_GLOBAL)
        lib.fake_area_address.restype = ctypes.c_size_t
        size = ctypes.c_uint.in_dll(lib, "rseq_size")
        out["size_before"] = size.value
        def worker(k):
            for _ in range({ADDS}):
                c.add(1)
            i = rseq.info()
            out[k] = [i.owner, i.process_owner, i.area_address == lib.fake_area_address()]
        threads = [threading.Thread(target=worker, args=(k,)) for k in range({THREADS})]
        for t in threads: t.start()
        for t in threads: t.join()
        out.update(size_after=size.value, value=c.value(), fallback=c.fallback_count(),
                   main_after=rseq.info().owner)
        print(json.dumps(out))
    """, env=OWN_REGISTRATION)
    assert got["main"] == ["rseq", "rseq"]
    assert got["size_before"] == 0 and got["size_after"] > 0
    for k in range(THREADS):
        assert got[str(k)] == ["librseq", "librseq", True]
    assert got["value"] == 1 + THREADS * ADDS and got["fallback"] == 0
    assert got["main_after"] == "rseq"
