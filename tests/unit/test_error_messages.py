"""The text of every error the registration and counter C code raises
(issue 8, item 12): complete sentences, every placeholder formatted.

PyErr_Format knows neither %#llx nor %.1f: such a conversion used to reach
the user verbatim.  Each message is compared whole, and none may contain a
'%' conversion.  The messages of a lost registration are in
test_lost_registration.py, the librseq ones in integration/test_librseq.py.
"""
from __future__ import annotations

import errno
import re
import warnings

import pytest

import rseq._inject
from helpers.subproc import OWN_REGISTRATION, run_json
from helpers.system import in_thread

INT64_MAX = 2**63 - 1
PLACEHOLDER = re.compile(r"%[-#0 +.\d]*[a-zA-Z%]")


def message_of(call, *args, **kwargs) -> tuple[type, str]:
    with pytest.raises(Exception) as caught:
        call(*args, **kwargs)
    text = str(caught.value)
    assert not PLACEHOLDER.search(text), text
    return caught.type, text


def test_counter_messages():
    c = rseq.PerCpuCounter()
    assert message_of(c.add, 1, 2) == (TypeError, "add() takes one optional argument: n")
    assert message_of(c.add, m=1) == (TypeError, "add() takes one optional argument: n")
    assert message_of(c.add, 2**63) == (
        OverflowError, "add(): n must fit in a signed 64-bit integer")
    c.add(INT64_MAX)
    kind, text = message_of(lambda: [c.add(INT64_MAX) for _ in range(1000)])
    assert (kind, text) == (
        OverflowError, f"add({INT64_MAX}): the counter's value would pass the signed "
                       f"64-bit range; nothing was added")
    assert message_of(rseq.PerCpuCounter, index="x") == (
        ValueError, "PerCpuCounter(index='x'): index must be 'cpu' or 'mm_cid'")
    assert message_of(rseq.PerCpuCounter, "cpus") == (
        ValueError, "PerCpuCounter(index='cpus'): index must be 'cpu' or 'mm_cid'")


def test_mm_cid_messages_under_glibc(glibc_mode):
    facts = glibc_mode
    if "mm_cid" in facts.fields:
        pytest.skip("glibc's registration covers mm_cid here")
    assert message_of(rseq.mm_cid) == (
        rseq.Unsupported,
        f"mm_cid is not available: the glibc registration makes {facts.usable_size} bytes "
        f"usable and mm_cid needs 28 (kernel feature size {facts.feature_size}); "
        f"set GLIBC_TUNABLES=glibc.pthread.rseq=0 to let rseq register a full area")
    assert message_of(rseq.PerCpuCounter, index="mm_cid") == (
        rseq.Unsupported,
        "PerCpuCounter(index='mm_cid'): mm_cid is not usable in this process (see "
        "rseq.info().fields; under glibc's registration set "
        "GLIBC_TUNABLES=glibc.pthread.rseq=0)")


def test_registration_messages_under_glibc(glibc_mode):
    def body():
        out = {}
        rseq._inject._set_registration_count(2**32 - 1)
        out["overflow"] = message_of(rseq.register)
        rseq._inject._set_registration_count(0)
        out["count"] = message_of(rseq._inject._set_registration_count, 2**32)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rseq.unregister()
        out["warning"] = [(w.category, str(w.message)) for w in caught]
        return out
    got = in_thread(body)
    assert got["overflow"] == (
        OverflowError,
        "rseq.register(): the thread's reference count is at its limit (2**32 - 1)")
    assert got["count"] == (OverflowError, "count must fit in 32 bits")
    assert got["warning"] == [(
        rseq.NotOwnedWarning,
        "this thread's rseq registration is owned by glibc; rseq.unregister() "
        "left it in place")]


def test_registration_messages_own_registration():
    got = run_json("""
        import json, warnings
        import rseq._inject
        out = {}
        rseq.cpu()
        try:
            rseq.unregister()
        except rseq.RegistrationError as e:
            out["unbalanced"] = [e.errno, str(e)]
        rseq.register()
        rseq.unregister()
        try:
            rseq.mm_cid()
            out["mm_cid"] = "ok"
        except rseq.Unsupported as e:
            out["mm_cid"] = str(e)
        print(json.dumps(out))
    """, env=OWN_REGISTRATION)
    assert got["unbalanced"] == [
        errno.EINVAL, "[Errno 22] rseq.unregister() without a matching rseq.register()"]
    assert got["mm_cid"] == "ok"     # the lazy registration is still there


def test_no_registration_warning_text():
    """unregister() on a thread with no registration at all (seccomp denies
    rseq) names the reason instead of saying "is not registered"."""
    got = run_json("""
        import errno, json, warnings
        from helpers.seccomp import deny_rseq
        deny_rseq(errno.EPERM)
        import rseq._inject
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rseq.unregister()
        print(json.dumps([str(w.message) for w in caught]))
    """, env=OWN_REGISTRATION)
    assert len(got) == 1
    assert got == ["this thread has no rseq registration (EPERM: rseq is denied to this "
                   "process (seccomp filter)); rseq.unregister() had nothing to release"]
