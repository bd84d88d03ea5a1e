"""Reference-counted registration: register()/unregister(), registered(),
two users interleaving (seed 002), overflow, unregister of a registration
rseq does not own, fork and spawn children."""
from __future__ import annotations

import errno
import threading
import warnings

import pytest

import rseq
from helpers.subproc import MODES, OWN_REGISTRATION, run_json
from helpers.system import in_thread, usable_cpus
from rseq import _inject

pytestmark = pytest.mark.usefixtures("kernel_rseq")


@pytest.fixture
def fresh_thread():
    """Run a function in a new thread (a fresh reference count) and return
    its result or re-raise its exception."""
    return in_thread


# ------------------------------------------------------------------------
# glibc mode, in this process
# ------------------------------------------------------------------------

def test_nested_register_unregister_counts(glibc_mode, fresh_thread):
    def body():
        counts = [rseq.registration_count()]
        counts += [rseq.register(), rseq.register(), rseq.register()]
        counts.append(rseq.registration_count())
        released = [rseq.unregister() for _ in range(3)]
        counts.append(rseq.registration_count())
        return counts, released, rseq.info().owner
    counts, released, owner = fresh_thread(body)
    assert counts == [0, 1, 2, 3, 3, 0]
    # glibc's registration is never released by rseq.
    assert released == [False, False, False]
    assert owner == "glibc"


def test_registered_context_manager(glibc_mode, fresh_thread):
    def body():
        seen = []
        with rseq.registered() as outer:
            seen.append(outer)
            with rseq.registered() as inner:
                seen.append(inner)
                seen.append(rseq.info().registration_count)
            seen.append(rseq.registration_count())
        seen.append(rseq.registration_count())
        try:
            with rseq.registered():
                raise KeyError("inside")
        except KeyError:
            seen.append(rseq.registration_count())
        return seen
    assert fresh_thread(body) == [1, 2, 2, 1, 0, 0]


def test_counts_are_per_thread(glibc_mode, fresh_thread):
    rseq.register()
    try:
        assert fresh_thread(rseq.registration_count) == 0
        assert fresh_thread(rseq.register) == 1
        assert rseq.registration_count() == 1
    finally:
        rseq.unregister()
    assert rseq.registration_count() == 0


def test_overflow_leaves_count_unchanged(glibc_mode, fresh_thread):
    def body():
        _inject._set_registration_count(2**32 - 2)
        last = rseq.register()
        try:
            rseq.register()
        except OverflowError as e:
            error = str(e)
        else:
            error = None
        after = rseq.registration_count()
        _inject._set_registration_count(0)
        return last, error, after
    last, error, after = fresh_thread(body)
    assert last == 2**32 - 1
    assert error is not None and "2**32 - 1" in error
    assert after == 2**32 - 1


def test_unregister_not_owned_warns_and_keeps_glibc_area(glibc_mode, fresh_thread):
    cpus = usable_cpus()

    def body():
        before = rseq.info()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            released = rseq.unregister()
        after = rseq.info()
        reads = dict.fromkeys(cpus)
        for cpu in cpus:
            import os
            os.sched_setaffinity(threading.get_native_id(), {cpu})
            reads[cpu] = {rseq.cpu() for _ in range(100)}
        return before, after, released, caught, reads
    before, after, released, caught, reads = fresh_thread(body)
    assert released is False
    assert [w.category for w in caught] == [rseq.NotOwnedWarning]
    assert "owned by glibc" in str(caught[0].message)
    assert issubclass(rseq.NotOwnedWarning, RuntimeWarning)
    assert after == before
    assert after.owner == "glibc" and after.fallback is None
    assert reads == {cpu: {cpu} for cpu in cpus}


def test_unregister_not_owned_can_be_an_error(glibc_mode, fresh_thread):
    def body():
        with warnings.catch_warnings():
            warnings.simplefilter("error", rseq.NotOwnedWarning)
            with pytest.raises(rseq.NotOwnedWarning):
                rseq.unregister()
        return rseq.registration_count(), rseq.info().owner
    assert fresh_thread(body) == (0, "glibc")


def test_two_users_interleaving_glibc(glibc_mode, fresh_thread):
    """Seed 002: libA registers, libB registers, libB unregisters, libA
    still uses rseq, libA unregisters; nobody warns."""
    def body():
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            a = rseq.register()
            b = rseq.register()
            b_done = rseq.unregister()
            still = rseq.info()
            a_done = rseq.unregister()
        return a, b, b_done, still.owner, still.registration_count, a_done
    assert fresh_thread(body) == (1, 2, False, "glibc", 1, False)


# ------------------------------------------------------------------------
# Our own registration, in a child with glibc's registration off
# ------------------------------------------------------------------------

def test_own_registration_reference_counts():
    got = run_json("""
        import json, os, threading, warnings
        import rseq
        from rseq import _inject
        from helpers.scenarios import pinned_cpu_reads
        warnings.simplefilter("error")
        out = {}
        lazy = rseq.info()                        # cpu()/info() register lazily
        out["lazy"] = [lazy.owner, lazy.registration_count, lazy.area_address]
        try:
            rseq.unregister()
        except rseq.RegistrationError as e:
            out["unbalanced"] = [e.errno, isinstance(e, OSError),
                                 isinstance(e, rseq.RseqError), str(e)]
        # Seed 002, two users: B's unregister must not end A's registration.
        a = rseq.register(); b = rseq.register()
        b_done = rseq.unregister()
        mid = rseq.info()
        out["users"] = [a, b, b_done, mid.owner, mid.area_address]
        # The lazy registration holds its own reference (issue 8, item 9):
        # the last explicit unregister() does not end it.
        out["a_done"] = rseq.unregister()
        kept = rseq.info()
        out["kept"] = [kept.owner, kept.area_address, kept.fallback]
        # A thread whose first call is register() owns no lazy reference:
        # its last unregister() ends the registration.
        def explicit():
            a = rseq.register(); b = rseq.register()
            b_done = rseq.unregister()
            mid = rseq.info()
            out["explicit_users"] = [a, b, b_done, mid.owner]
            area = mid.area_address
            out["explicit_done"] = rseq.unregister()
            gone = rseq.info()
            out["gone"] = [gone.owner, gone.area_address, gone.fallback, gone.usable_size]
            out["gone_reads"] = pinned_cpu_reads()
            try:
                rseq.mm_cid()
            except rseq.Unsupported as e:
                out["gone_mm_cid"] = str(e)
            # register() again: the same area is registered anew.
            out["again"] = rseq.register()
            back = rseq.info()
            out["back"] = [back.owner, back.area_address == area, back.fallback]
            out["back_reads"] = pinned_cpu_reads()
            with rseq.registered() as inner:
                out["inner"] = inner
            out["after_with"] = [rseq.registration_count(), rseq.info().owner]
            out["last"] = rseq.unregister()
            # overflow
            rseq.register()
            _inject._set_registration_count(2**32 - 1)
            try:
                rseq.register()
            except OverflowError:
                out["overflow"] = rseq.registration_count()
        t = threading.Thread(target=explicit); t.start(); t.join()
        print(json.dumps(out))
    """, env=OWN_REGISTRATION)
    cpus = {str(c): [c] for c in usable_cpus()}
    lazy_area = got["lazy"][2]
    assert got["lazy"][:2] == ["rseq", 0] and lazy_area
    assert got["unbalanced"][:3] == [errno.EINVAL, True, True]
    assert "without a matching rseq.register()" in got["unbalanced"][3]
    assert got["users"] == [1, 2, False, "rseq", lazy_area]
    assert got["a_done"] is False
    assert got["kept"] == ["rseq", lazy_area, None]
    assert got["explicit_users"] == [1, 2, False, "rseq"]
    assert got["explicit_done"] is True
    assert got["gone"] == [None, None, "unregistered by rseq.unregister()", 0]
    assert got["gone_reads"] == cpus
    assert "unregistered by rseq.unregister()" in got["gone_mm_cid"]
    assert got["again"] == 1
    assert got["back"] == ["rseq", True, None]
    assert got["back_reads"] == cpus
    assert got["inner"] == 2
    assert got["after_with"] == [1, "rseq"]
    assert got["last"] is True
    assert got["overflow"] == 2**32 - 1


def test_lazy_registration_survives_balanced_pairs():
    """Issue 8, item 9: `with rseq.registered(): pass` (or any balanced
    register()/unregister() pair) never ends a registration that a read
    made lazily, in the main thread or any other."""
    got = run_json("""
        import json, threading
        import rseq
        out = {}
        def body(name):
            rseq.cpu()                                 # lazy registration
            lazy = rseq.info()
            with rseq.registered():
                pass
            rseq.register()
            released = rseq.unregister()
            after = rseq.info()
            m = rseq.PerCpuCounter(index="mm_cid")     # needs a live area
            m.add(1)
            out[name] = [lazy.owner, released, after.owner,
                         after.area_address == lazy.area_address, after.fallback,
                         after.registration_count, m.fallback_count()]
        body("main")
        t = threading.Thread(target=body, args=("thread",)); t.start(); t.join()
        print(json.dumps(out))
    """, env=OWN_REGISTRATION)
    assert got == {name: ["rseq", False, "rseq", True, None, 0, 0]
                   for name in ("main", "thread")}


def test_own_registration_thread_exit_with_references_held():
    """A thread that exits holding references loses its registration with
    it; its successors register afresh with count 0."""
    got = run_json("""
        import json, threading
        import rseq
        seen = []
        def leave_registered():
            rseq.register(); rseq.register()
            seen.append([rseq.registration_count(), rseq.info().owner])
        def fresh():
            seen.append([rseq.registration_count(), rseq.info().owner])
        for target in (leave_registered, fresh, leave_registered, fresh):
            t = threading.Thread(target=target); t.start(); t.join()
        print(json.dumps(seen))
    """, env=OWN_REGISTRATION)
    assert got == [[2, "rseq"], [0, "rseq"], [2, "rseq"], [0, "rseq"]]


# ------------------------------------------------------------------------
# fork and spawn
# ------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["glibc", "own"])
def test_fork_child_keeps_registration(mode):
    got = run_json("""
        import json
        from helpers import scenarios
        print(json.dumps(scenarios.fork_and_inspect()))
    """, env=MODES[mode])
    owner = "glibc" if mode == "glibc" else "rseq"
    cpus = {str(c): [c] for c in usable_cpus()}
    parent, child = got["parent"], got["child"]
    assert got["count"] == 1 and parent["owner"] == owner
    # The child's registration is the parent's, at the same address.
    assert child["info"] == parent
    assert child["count"] == 1
    assert child["reads"] == cpus
    # inspect sees the child's area.
    assert got["inspect_status"] == 0, got["inspect_stderr"]
    threads = got["inspect"]["threads"]
    assert [(t["tid"], t["registered"], t["address"], t["size"], t["signature"])
            for t in threads] == [(child["pid"], True, parent["area_address"],
                                   32, 0x53053053)]
    after = got["child_after"]
    assert after["reads"] == cpus
    if mode == "own":
        # The child held the reference taken before fork: releasing it ends
        # the child's registration only.
        assert after["unregister"] is True
        assert after["info"]["owner"] is None
        assert after["info"]["fallback"] == "unregistered by rseq.unregister()"
    else:
        assert after["unregister"] is False
        assert after["info"]["owner"] == "glibc"
    assert after["info"]["registration_count"] == 0
    assert got["child_status"] == 0
    assert got["parent_after"] == parent


@pytest.mark.parametrize("mode", ["glibc", "own"])
def test_spawn_children(mode):
    got = run_json("""
        import json
        from helpers import scenarios
        if __name__ == "__main__":
            print(json.dumps(scenarios.spawn_children(2)))
    """, env=MODES[mode])
    owner = "glibc" if mode == "glibc" else "rseq"
    assert len({r["pid"] for r in got} - {got[0]["parent"]}) == 2
    for r in got:
        assert r["exitcode"] == 0
        assert r["info"]["owner"] == r["info"]["process_owner"] == owner
        assert r["info"]["fallback"] is None
        assert r["info"]["registration_count"] == 0
        assert r["reads"] == {str(c): [c] for c in usable_cpus()}
