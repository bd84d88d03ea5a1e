"""A registration ended behind the package's back (issue 8, item 2).

When someone calls rseq(2) RSEQ_FLAG_UNREGISTER on the thread's area
(glibc's, or rseq's own), or librseq's rseq_unregister_current_thread()
(tests/integration/test_librseq.py), the kernel stops maintaining the area:
cpu_id becomes -1, cpu_id_start and mm_cid 0.  Every cpu_id sequence then
aborts, and an mm_cid sequence would commit on slot 0 unprotected.  add()
used to spin forever holding the GIL; now it moves the thread to the
fallback, says so in info().fallback, and every count stays exact.

Each scenario runs in a child with a timeout: a hang fails the test instead
of the suite.
"""
from __future__ import annotations

import pytest

from helpers.subproc import OWN_REGISTRATION, run_json

pytestmark = pytest.mark.usefixtures("kernel_rseq")

ADDS = 10000

LOSE = f"""
import json, os, tempfile, threading
import rseq._inject
SIG = rseq._core.SIGNATURE
ADDS = {ADDS}
def end_registration_behind_our_back():
    i = rseq.info()
    return rseq._inject.rseq_syscall(i.area_address, i.registered_size, 1, SIG)
"""


def test_glibc_registration_ended():
    got = run_json(LOSE + """
c = rseq.PerCpuCounter()
folder = tempfile.mkdtemp()
arena = rseq.Arena.create(os.path.join(folder, "a"))
a = arena.counter("k")
out = {}
def worker():
    c.add(1); a.add(1)
    before = rseq.info()
    out["owner"] = before.owner
    out["unregister"] = end_registration_behind_our_back()
    out["info_fallback"] = rseq.info().fallback     # seen before any add
    for _ in range(ADDS):
        c.add(1); a.add(1)
    after = rseq.info()
    out["after"] = [after.owner, after.area_address, after.fallback]
    out["counts"] = [c.value(), c.fallback_count(), a.value(), a.fallback_count()]
    out["cpu_ok"] = rseq.cpu() in os.sched_getaffinity(0)
    try:
        rseq.register()
    except rseq.RegistrationError as e:
        out["register"] = [e.errno, str(e)]
    try:
        rseq.mm_cid()
    except rseq.Unsupported as e:
        out["mm_cid"] = str(e)
t = threading.Thread(target=worker); t.start(); t.join()
# Other threads keep their registration.
out["main"] = [rseq.info().owner, rseq.info().fallback]
print(json.dumps(out))
""", timeout=60)
    if got["owner"] != "glibc":
        pytest.skip("glibc does not own registration here")
    reason = ("glibc's registration of this thread was ended behind rseq's back "
              "(cpu_id is -1: rseq(2) RSEQ_FLAG_UNREGISTER on glibc's area)")
    assert got["unregister"] == 0
    assert got["info_fallback"] == reason
    assert got["after"] == [None, None, reason]
    assert got["counts"] == [1 + ADDS, ADDS, 1 + ADDS, ADDS]
    assert got["cpu_ok"]
    assert got["register"] == [22, f"[Errno 22] {reason}"]
    assert got["mm_cid"] == f"mm_cid is not available: this thread has no rseq area ({reason})"
    assert got["main"] == ["glibc", None]


def test_own_registration_ended():
    got = run_json(LOSE + """
from helpers.system import pin_current_thread
c = rseq.PerCpuCounter()
m = rseq.PerCpuCounter(index="mm_cid")
out = {}
def worker():
    c.add(1); m.add(1)
    out["owner"] = rseq.info().owner
    out["unregister"] = end_registration_behind_our_back()
    slots_before = m.per_cpu()
    for _ in range(ADDS):
        c.add(1); m.add(1)
    after = rseq.info()
    out["after"] = [after.owner, after.fallback]
    # mm_cid reads 0 after the loss: nothing may have gone to slot 0.
    out["mm_slots_unchanged"] = m.per_cpu() == slots_before
    out["counts"] = [c.value(), c.fallback_count(), m.value(), m.fallback_count()]
    try:
        rseq.mm_cid()
    except rseq.Unsupported as e:
        out["mm_cid"] = str(e)
    # register() registers rseq's area again; the counters go back to rseq.
    out["register"] = rseq.register()
    back = rseq.info()
    out["back"] = [back.owner, back.fallback, rseq.mm_cid() >= 0]
    c.add(1); m.add(1)
    out["back_counts"] = [c.value(), c.fallback_count(), m.value(), m.fallback_count()]
    out["released"] = rseq.unregister()
t = threading.Thread(target=worker); t.start(); t.join()
print(json.dumps(out))
""", env=OWN_REGISTRATION, timeout=60)
    reason = ("rseq's registration of this thread was ended behind its back "
              "(cpu_id is -1: rseq(2) RSEQ_FLAG_UNREGISTER on rseq's area); "
              "rseq.register() registers it again")
    assert got["owner"] == "rseq"
    assert got["unregister"] == 0
    assert got["after"] == [None, reason]
    assert got["mm_slots_unchanged"]
    assert got["counts"] == [1 + ADDS, ADDS, 1 + ADDS, ADDS]
    assert got["mm_cid"] == f"mm_cid is not available: this thread has no rseq area ({reason})"
    assert got["register"] == 1
    assert got["back"] == ["rseq", None, True]
    assert got["back_counts"] == [2 + ADDS, ADDS, 2 + ADDS, ADDS]
    assert got["released"] is True
