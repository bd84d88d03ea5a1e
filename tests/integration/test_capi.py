"""rseq's C API (the rseq._core._C_API capsule) used from a compiled test
extension, tests/integration/capi_ext/capi_ext.c, built here with gcc."""
from __future__ import annotations

import errno
import os
import sys
import threading

import pytest

import rseq._inject
from helpers.build import build_capi_ext
from helpers.subproc import OWN_REGISTRATION, run_json
from helpers.system import in_thread, usable_cpus

pytestmark = pytest.mark.usefixtures("kernel_rseq")


@pytest.fixture(scope="session")
def capi_dir(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("capi_ext")
    try:
        build_capi_ext(str(out))
    except FileNotFoundError as e:
        pytest.skip(str(e))
    return str(out)


@pytest.fixture(scope="session")
def ext(capi_dir):
    sys.path.insert(0, capi_dir)
    try:
        import capi_ext
    finally:
        sys.path.remove(capi_dir)
    capi_ext.import_api()
    return capi_ext


def test_capsule_header(ext):
    api = ext.import_api()
    assert api["signature"] == 0x53053053 == rseq._core.SIGNATURE
    assert api["version"] >= 1
    assert api["has_v1"] and api["size"] >= api["v1_end"]
    # The struct only grows: version 2 brought the per-CPU primitives.
    assert api["has_current_index"] == (api["version"] >= 2)


def test_area_and_size_match_info(ext, glibc_mode):
    def look():
        facts = rseq.info()
        return ext.thread_area(), ext.thread_area_size(), facts.area_address, facts.usable_size
    for area, size, address, usable in (look(), in_thread(look)):
        assert area == address and area is not None
        assert size == usable == 20


def test_current_cpu_under_pinning(ext):
    def reads():
        seen = {}
        for cpu in usable_cpus():
            os.sched_setaffinity(threading.get_native_id(), {cpu})
            seen[cpu] = {(ext.current_cpu(), ext.area_cpu_id(), rseq.cpu())
                         for _ in range(200)}
        return seen
    assert in_thread(reads) == {cpu: {(cpu, cpu, cpu)} for cpu in usable_cpus()}


def test_registration_count_is_shared(ext, glibc_mode):
    def body():
        steps = [ext.register_thread(), rseq.registration_count(),
                 rseq.register(), ext.register_thread(), rseq.registration_count(),
                 ext.unregister_thread(), rseq.unregister(), rseq.registration_count(),
                 ext.unregister_thread(), rseq.registration_count()]
        # Nothing held: the C API's unregister is a silent no-op on glibc's area.
        steps.append(ext.unregister_thread())
        steps.append(ext.thread_area() == rseq.info().area_address)
        return steps
    assert in_thread(body) == [0, 1, 2, 0, 3, 0, False, 1, 0, 0, 0, True]


CAPI_CHILD = """
    import errno, json, os, sys, threading
    sys.path.insert(0, {dir!r})
    {prelude}
    import rseq._inject, capi_ext
    api = capi_ext.import_api()
    out = {{}}
    facts = rseq.info()
    out["area"] = [capi_ext.thread_area(), facts.area_address,
                   capi_ext.thread_area_size(), facts.usable_size, facts.owner]
    seen = {{}}
    for cpu in sorted(os.sched_getaffinity(0)):
        os.sched_setaffinity(0, {{cpu}})
        seen[str(cpu)] = sorted({{capi_ext.current_cpu() for _ in range(100)}})
    out["cpus"] = seen
    {body}
    print(json.dumps(out))
"""


def test_c_api_after_the_registration_is_lost(capi_dir):
    """A registration ended behind the package's back (issue 8, item 2): a C
    extension's retry loop that keeps its stale area ends (the primitives
    take the fallback on a lost area), every add counts, and thread_area()
    answers NULL from then on."""
    got = run_json(CAPI_CHILD.format(dir=capi_dir, prelude="", body="""
    capi_ext.percpu_add(100)
    out["unregister"] = rseq._inject.rseq_syscall(facts.area_address, facts.registered_size,
                                                1, rseq._core.SIGNATURE)
    capi_ext.percpu_add(1000)               # used to spin forever
    out["after"] = [capi_ext.percpu_sum(), capi_ext.thread_area(),
                    capi_ext.thread_area_size(), rseq.info().owner]
    """), env=OWN_REGISTRATION, timeout=60)
    assert got["area"][4] == "rseq"
    assert got["unregister"] == 0
    assert got["after"] == [1100, None, 0, None]


def test_own_registration_through_the_c_api(capi_dir):
    got = run_json(CAPI_CHILD.format(dir=capi_dir, prelude="", body="""
    # In a fresh thread whose first call is register(): the main thread
    # registered lazily (rseq.info() above), and a lazy registration holds a
    # reference of its own that balanced pairs never drop (issue 8, item 9).
    def steps():
        first = [capi_ext.register_thread()]
        area = capi_ext.thread_area()
        out["steps"] = first + [rseq.register(),
                        capi_ext.unregister_thread(), rseq.registration_count(),
                        rseq.unregister(), capi_ext.thread_area(),
                        capi_ext.thread_area_size(), rseq.info().fallback,
                        capi_ext.unregister_thread(), capi_ext.register_thread(),
                        capi_ext.thread_area() == area,
                        rseq.registration_count()]
    t = threading.Thread(target=steps); t.start(); t.join()
    out["lazy_pair"] = [capi_ext.register_thread(), capi_ext.unregister_thread(),
                        capi_ext.thread_area() == facts.area_address, rseq.info().fallback]
    # Exit check: threads that registered (and some that still hold a
    # reference) exit; after rseq's destructor their areas are unregistered.
    def work(hold):
        capi_ext.register_thread()
        if not hold:
            capi_ext.unregister_thread()
            capi_ext.register_thread()
        capi_ext.watch_thread_exit(rseq.info().registered_size)
    for i in range(200):
        t = threading.Thread(target=work, args=(i % 2 == 0,)); t.start(); t.join()
    # join() returns before the OS thread has run its key destructors:
    # give the last one a moment.
    import time
    deadline = time.monotonic() + 5
    while capi_ext.exit_report()["checked"] < 200 and time.monotonic() < deadline:
        time.sleep(0.001)
    out["exits"] = capi_ext.exit_report()
    """), env=OWN_REGISTRATION)
    area, address, size, usable, owner = got["area"]
    assert area == address and area is not None and owner == "rseq"
    assert size == usable >= 28
    assert got["cpus"] == {str(c): [c] for c in usable_cpus()}
    assert got["steps"] == [0, 2, 0, 1, True, None, 0,
                            "unregistered by rseq.unregister()",
                            -errno.EINVAL, 0, True, 1]
    assert got["lazy_pair"] == [0, 0, True, None]
    assert got["exits"] == {"checked": 200, "still_registered": 0,
                            "other_errors": 0, "last_errno": 0}


def test_c_api_when_rseq_is_denied(capi_dir):
    got = run_json(CAPI_CHILD.format(
        dir=capi_dir,
        prelude="from helpers import seccomp; seccomp.deny_rseq(errno.EPERM)",
        body='out["register"] = capi_ext.register_thread()'), env=OWN_REGISTRATION)
    assert got["area"] == [None, None, 0, 0, None]
    assert got["cpus"] == {str(c): [c] for c in usable_cpus()}
    assert got["register"] == -errno.EPERM


# ---------------------------------------------------------------------------
# The per-CPU primitives through the C API (version 2)
# ---------------------------------------------------------------------------

def _threads(n, target, *args):
    ts = [threading.Thread(target=target, args=args) for _ in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()


def test_primitives_are_in_the_capsule(ext):
    header = ext.import_api()
    assert header["version"] >= 2


def test_load_add_store_from_threads_is_exact(ext):
    before = ext.percpu_sum()
    _threads(4, ext.percpu_add, 200_000)   # the GIL is released inside
    assert ext.percpu_sum() - before == 800_000


def test_list_push_pop_loses_and_duplicates_nothing(ext):
    ext.list_init(64)
    _threads(4, ext.list_churn, 100_000)
    assert ext.list_census() == (64, 64)


def test_bov_refuses_to_wrap_and_memcpy_commits(ext):
    first, second, value, version, copy = ext.bov_and_memcpy()
    assert (first, second) == (0, 1)           # INTPTR_MAX - 1 + 1 fits, + 1 more does not
    assert value == 2**63 - 1                  # the refused add changed nothing
    assert version >= 1 and copy == "committed copy!"


def test_primitives_on_the_fallback_path(capi_dir):
    """With rseq denied, thread_area() is NULL and every primitive takes its
    atomic fallback: still exact."""
    result = run_json(f"""
        import errno, json, sys, threading
        from helpers.seccomp import deny_rseq
        deny_rseq(errno.ENOSYS)
        sys.path.insert(0, {capi_dir!r})
        import rseq._inject, capi_ext
        capi_ext.import_api()
        ts = [threading.Thread(target=capi_ext.percpu_add, args=(50000,)) for _ in range(4)]
        for t in ts: t.start()
        for t in ts: t.join()
        capi_ext.list_init(32)
        ts = [threading.Thread(target=capi_ext.list_churn, args=(20000,)) for _ in range(4)]
        for t in ts: t.start()
        for t in ts: t.join()
        print(json.dumps({{"area": capi_ext.thread_area(), "sum": capi_ext.percpu_sum(),
                          "census": capi_ext.list_census(),
                          "bov": capi_ext.bov_and_memcpy()}}))
    """, env=OWN_REGISTRATION)
    assert result["area"] in (None, 0)
    assert result["sum"] == 200000
    assert result["census"] == [32, 32]
    assert result["bov"][:2] == [0, 1] and result["bov"][4] == "committed copy!"


# ---------------------------------------------------------------------------
# rseq.Pool through the C API (version 3)
# ---------------------------------------------------------------------------

def test_pool_alloc_and_free_by_index_from_c(ext, tmp_path):
    """Threads of a C extension allocate and free blocks without the GIL;
    the tags they write are never found overwritten, and the pool ends
    exact."""
    import threading

    import rseq
    from rseq.testing.stress import pool_exact
    ext.import_api()
    with rseq.Pool.create(str(tmp_path / "pool"), block_size=64, block_count=16,
                          cache=4) as pool:
        out = []
        threads = [threading.Thread(target=lambda: out.append(
            ext.pool_churn(pool._map, 20000, 3))) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [r[:3] for r in out] == [(0, 0, 0)] * 4
        assert out[0][3:] == (64, 16)
        assert pool_exact(pool) is None
        # result codes: freed, double free (-3), out of range (-2), no block
        assert ext.pool_errors(pool._map) == (0, -3, -2, False)
        with pytest.raises(TypeError, match="_PoolMap"):
            ext.pool_churn(object(), 1, 1)
    with rseq.Pool.create(str(tmp_path / "ro"), block_size=64, block_count=4) as pool, \
            rseq.Pool.open(pool.path, readonly=True) as ro, \
            pytest.raises(ValueError, match="read-only"):
        ext.pool_churn(ro._map, 1, 1)
