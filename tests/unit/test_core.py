"""The fast reads (cpu, node, mm_cid) in each registration mode: glibc's
(the default here), our own (glibc's switched off) and rseq denied by
seccomp; pinned and migrating threads; many short-lived threads."""
from __future__ import annotations

import errno
import os
import threading

import pytest

import rseq
from helpers import scenarios  # noqa: F401  (the eval below names it)
from helpers.subproc import MODES, OWN_REGISTRATION, run_json, run_python
from helpers.system import node_of_cpu, signal_mask, usable_cpus

pytestmark = pytest.mark.usefixtures("kernel_rseq")


def run_scenario(mode: str, call: str):
    """``scenarios.<call>`` in this process (glibc mode) or in a child."""
    if mode == "glibc":
        if rseq.info().owner != "glibc":
            pytest.skip("the test process is not in glibc mode")
        return eval(f"scenarios.{call}")
    return run_json(f"""
        import json
        from helpers import scenarios
        print(json.dumps(scenarios.{call}))
    """, env=MODES[mode])


# ------------------------------------------------------------------------
# The default mode: glibc owns the registration
# ------------------------------------------------------------------------

def test_glibc_mode_uses_glibc_area(glibc_mode):
    facts = glibc_mode
    assert facts.kernel and facts.kernel_probe == "ok"
    assert facts.fallback is None and facts.fallback_errno is None
    # glibc 2.36 registers 32 bytes and reports 20 (the 2024 fix): the
    # usable part ends before node_id.
    assert facts.registered_size == 32
    assert facts.usable_size == min(20, facts.feature_size or 20)
    assert facts.fields == ("cpu_id_start", "cpu_id", "rseq_cs", "flags")
    assert facts.area_address and facts.area_address % 32 == 0
    assert facts.signature == 0x53053053
    assert facts.possible_cpus >= len(usable_cpus())


def test_mm_cid_unsupported_under_glibc(glibc_mode):
    with pytest.raises(rseq.Unsupported, match="GLIBC_TUNABLES=glibc.pthread.rseq=0"):
        rseq.mm_cid()
    assert issubclass(rseq.Unsupported, rseq.RseqError)


def test_each_thread_has_its_own_area(glibc_mode):
    addresses = {}

    alive = threading.Barrier(5)

    def record(name):
        addresses[name] = rseq.info().area_address
        alive.wait()    # all alive at once: no thread reuses another's TLS

    threads = [threading.Thread(target=record, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    alive.wait()
    for t in threads:
        t.join()
    addresses["main"] = rseq.info().area_address
    assert None not in addresses.values()
    assert len(set(addresses.values())) == 5


def test_node_matches_sysfs():
    for cpu in usable_cpus():
        box: dict[str, int] = {}

        def read(cpu=cpu, box=box):
            os.sched_setaffinity(threading.get_native_id(), {cpu})
            box["cpu"], box["node"] = rseq.cpu(), rseq.node()

        t = threading.Thread(target=read)
        t.start()
        t.join()
        assert box == {"cpu": cpu, "node": node_of_cpu(cpu)}


# ------------------------------------------------------------------------
# Pinned and migrating threads, in both modes
# ------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["glibc", "own"])
def test_pinned_threads_read_their_cpu(mode):
    results = run_scenario(mode, "pinned_reads(reads=3000)")
    expected_owner = "glibc" if mode == "glibc" else "rseq"
    assert results == {str(cpu): {"cpus": [cpu], "nodes": [node_of_cpu(cpu)],
                                  "owner": expected_owner}
                       for cpu in usable_cpus()}


@pytest.mark.parametrize("mode", ["glibc", "own"])
def test_moved_thread_reads_new_cpu(mode):
    if len(usable_cpus()) < 2:
        pytest.skip("needs two CPUs")
    steps = run_scenario(mode, "moved_thread()")
    assert [s["seen"] for s in steps] == [[s["pinned"]] for s in steps]
    assert len(steps) == len(usable_cpus()) + 1


@pytest.mark.parametrize("mode", ["glibc", "own"])
def test_reads_while_migrated(mode):
    if len(usable_cpus()) < 2:
        pytest.skip("needs two CPUs")
    result = run_scenario(mode, "reads_while_migrated(readers=4, moves=200)")
    assert result["out_of_range"] == []
    assert result["mismatches"] == 0, result["examples"]
    assert result["checked"] > 1000


# ------------------------------------------------------------------------
# Our own registration (glibc's switched off)
# ------------------------------------------------------------------------

def test_own_registration_info_and_mm_cid():
    got = run_json("""
        import json, os, threading
        import rseq
        facts = rseq.info()
        lone_cid = rseq.mm_cid()
        moved_cids = []
        for cpu in sorted(os.sched_getaffinity(0)):
            os.sched_setaffinity(0, {cpu})
            moved_cids.append(rseq.mm_cid())
        os.sched_setaffinity(0, set(range(os.cpu_count())))
        cids = {}
        barrier = threading.Barrier(len(os.sched_getaffinity(0)))

        def spin(cpu):
            os.sched_setaffinity(threading.get_native_id(), {cpu})
            barrier.wait()
            seen = set()
            for _ in range(20000):
                seen.add(rseq.mm_cid())
            cids[cpu] = sorted(seen)

        threads = [threading.Thread(target=spin, args=(c,))
                   for c in sorted(os.sched_getaffinity(0))]
        for t in threads: t.start()
        for t in threads: t.join()
        print(json.dumps({"info": facts.as_dict(), "lone_cid": lone_cid,
                          "moved_cids": moved_cids, "main_cid": rseq.mm_cid(),
                          "node": rseq.node(), "cpu": rseq.cpu(),
                          "thread_cids": {str(k): v for k, v in cids.items()}}))
    """, env=OWN_REGISTRATION)
    facts = got["info"]
    if facts["feature_size"] < 28:
        pytest.skip("kernel older than 6.3: no mm_cid")
    assert facts["owner"] == facts["process_owner"] == "rseq"
    assert facts["registered_size"] == max(32, facts["feature_size"])
    assert facts["usable_size"] == min(facts["registered_size"], facts["feature_size"])
    assert {"node_id", "mm_cid"} <= set(facts["fields"])
    assert facts["fallback"] is None
    assert got["node"] == node_of_cpu(got["cpu"])
    ncpus = len(usable_cpus())
    # A single-threaded process has concurrency id 0 (below its thread
    # count, 1) on every CPU; later ids stay below the CPU count (the
    # kernel compacts ids after threads exit lazily, so not below 1 yet).
    assert got["lone_cid"] == 0 and got["moved_cids"] == [0] * ncpus
    assert 0 <= got["main_cid"] < ncpus
    per_thread = list(got["thread_cids"].values())
    for cids in per_thread:
        assert cids and all(0 <= c < ncpus for c in cids)
    # Threads pinned to distinct CPUs and running at once never share an id.
    flat = [c for cids in per_thread for c in cids]
    assert len(flat) == len(set(flat)), got["thread_cids"]


# ------------------------------------------------------------------------
# rseq denied by seccomp
# ------------------------------------------------------------------------

SECCOMP_CHILD = """
    import errno, json, os, sys, threading
    from helpers import seccomp
    seccomp.deny_rseq(errno.{errno})
    import rseq
    CPUS = sorted(os.sched_getaffinity(0))

    def pinned_reads():
        seen = {{}}
        for cpu in CPUS:
            os.sched_setaffinity(threading.get_native_id(), {{cpu}})
            seen[str(cpu)] = sorted({{rseq.cpu() for _ in range(200)}})
        return seen

    out = {{"info": rseq.info().as_dict(), "reads": pinned_reads(),
            "node": rseq.node()}}
    try:
        out["register"] = rseq.register()
    except rseq.RegistrationError as e:
        out["register"] = [type(e).__name__, e.errno, isinstance(e, OSError), str(e)]
    try:
        out["mm_cid"] = rseq.mm_cid()
    except rseq.Unsupported as e:
        out["mm_cid"] = "Unsupported"
    if {threads}:
        box = {{}}
        def in_thread():
            box["info"] = rseq.info().as_dict()
            box["reads"] = pinned_reads()
        t = threading.Thread(target=in_thread)
        t.start(); t.join()
        out["thread"] = box
    print(json.dumps(out))
"""


@pytest.mark.parametrize("denied", ["ENOSYS", "EPERM"])
def test_seccomp_denied_own_mode_falls_back(denied):
    got = run_json(SECCOMP_CHILD.format(errno=denied, threads=True), env=OWN_REGISTRATION)
    expected_reads = {str(c): [c] for c in usable_cpus()}
    for where in (got, got["thread"]):
        facts = where["info"]
        assert facts["kernel"] is False
        assert facts["kernel_probe"] == denied
        assert facts["owner"] is None and facts["area_address"] is None
        assert facts["fields"] == [] and facts["usable_size"] == 0
        assert facts["fallback_errno"] == denied
        assert facts["fallback"].startswith(denied + ":")
        assert "seccomp" in facts["fallback"]
        assert facts["critical_sections"] is False
        assert where["reads"] == expected_reads
    assert got["node"] == node_of_cpu(0) or got["node"] in {node_of_cpu(c) for c in usable_cpus()}
    code = getattr(errno, denied)
    assert got["register"][:3] == ["RegistrationError", code, True]
    assert denied in got["register"][3]
    assert got["mm_cid"] == "Unsupported"


@pytest.mark.parametrize("denied", ["ENOSYS", "EPERM"])
def test_seccomp_after_glibc_registered_main_thread(denied):
    """glibc registered the main thread at startup, before the filter: that
    registration stays in force and rseq keeps using it."""
    got = run_json(SECCOMP_CHILD.format(errno=denied, threads=False))
    facts = got["info"]
    assert facts["owner"] == "glibc" and facts["fallback"] is None
    assert facts["area_address"]
    # The probe itself was denied and says so, but the kernel does have
    # rseq: it maintains glibc's area.
    assert facts["kernel_probe"] == denied
    assert facts["kernel"] is True
    assert got["reads"] == {str(c): [c] for c in usable_cpus()}
    assert got["register"] == 1     # a reference on glibc's registration


def test_seccomp_after_glibc_new_threads_are_glibcs_problem():
    """Documents glibc 2.35+: a thread created after rseq was denied cannot
    be registered by glibc, which aborts the process in pthread_create's
    thread start (rseq is not involved: it is not even imported)."""
    proc = run_python("""
        import errno, threading
        from helpers import seccomp
        seccomp.deny_rseq(errno.EPERM)
        t = threading.Thread(target=lambda: None)
        t.start(); t.join()
        print("thread ran")
    """, check=False)
    if proc.returncode == 0:
        pytest.skip("this glibc lets threads run without rseq")
    assert proc.returncode == -6 and "rseq registration failed" in proc.stderr


# ------------------------------------------------------------------------
# Many short-lived threads
# ------------------------------------------------------------------------

def test_thousands_of_short_lived_threads_do_not_leak():
    got = run_json("""
        import json, threading
        import rseq
        from helpers.system import malloc_in_use, rss_bytes

        errors = []
        def work(lazy):
            try:
                if lazy:
                    # A read registers lazily; that registration holds its own
                    # reference (issue 8, item 9) and ends at thread exit.
                    assert rseq.cpu() >= 0
                    assert rseq.register() == 1
                    assert rseq.info().owner == "rseq"
                    assert rseq.unregister() is False
                    assert rseq.info().fallback is None
                else:
                    assert rseq.register() == 1
                    assert rseq.cpu() >= 0
                    assert rseq.info().owner == "rseq"
                    assert rseq.unregister() is True
                    assert rseq.info().fallback == "unregistered by rseq.unregister()"
            except BaseException as e:
                errors.append(repr(e))

        def batch(count, width=16):
            for _ in range(count // width):
                threads = [threading.Thread(target=work, args=(k % 2 == 0,))
                           for k in range(width)]
                for t in threads: t.start()
                for t in threads: t.join()

        batch(800)                       # warm-up: arenas, caches, freelists
        rss0, heap0 = rss_bytes(), malloc_in_use()
        batch(6400)
        rss1, heap1 = rss_bytes(), malloc_in_use()
        print(json.dumps({"errors": errors[:3], "rss": rss1 - rss0,
                          "heap": heap1 - heap0}))
    """, env=OWN_REGISTRATION)
    assert got["errors"] == []
    # Leaking the per-thread state (~100 bytes with its area) would show as
    # ~600 KiB of heap over 6400 threads.
    assert got["heap"] < 64 * 1024, got
    assert got["rss"] < 1024 * 1024, got


# ------------------------------------------------------------------------
# Signal mask
# ------------------------------------------------------------------------

SIGNAL_MASK_CHILD = """
    import json, signal, threading
    import rseq
    from helpers.system import signal_mask
    out = {}
    def run():
        tid = threading.get_native_id()
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
        before = signal_mask(tid)
        counts = [rseq.register(), rseq.register()]
        middle = signal_mask(tid)
        released = [rseq.unregister(), rseq.unregister()]
        after = signal_mask(tid)
        again = rseq.register()
        out.update(before=before, middle=middle, after=after,
                   final=signal_mask(tid), counts=counts + [again],
                   released=released, owner=rseq.info().owner)
    t = threading.Thread(target=run)
    t.start(); t.join()
    print(json.dumps(out))
"""


@pytest.mark.parametrize("mode", ["glibc", "own"])
def test_signal_mask_unchanged_by_registration(mode):
    got = run_json(SIGNAL_MASK_CHILD, env=MODES[mode])
    usr1 = 1 << (10 - 1)
    assert got["before"] & usr1
    assert got["before"] == got["middle"] == got["after"] == got["final"]
    assert got["counts"] == [1, 2, 1]
    if mode == "own":
        assert got["released"] == [False, True] and got["owner"] == "rseq"
    else:
        assert got["released"] == [False, False] and got["owner"] == "glibc"


def test_signal_mask_helper_sees_this_thread():
    import signal
    tid = threading.get_native_id()
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2})
    try:
        assert signal_mask(tid) & (1 << (signal.SIGUSR2 - 1))
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
