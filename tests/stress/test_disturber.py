"""The stress harness hits nothing but its own live workers (issue 8 item 16).

The disturber used to signal a worker process's pid after the parent had
reaped it, so a process that got the pid meanwhile (anyone's, on a machine
with pid_max 32768 that wraps in seconds) died of SIGUSR1; and a worker
thread could still receive a SIGUSR1 after join() returned, when the case
had put the default action (terminate) back: the load-dependent deaths of
the test process with status 138.  These tests make both windows wide.
"""
from __future__ import annotations

import os
import signal
import textwrap
import time

import pytest

from helpers.subproc import run_python
from rseq.testing import stress as _stress

NS_LAST_PID = "/proc/sys/kernel/ns_last_pid"


def _fork_with_pid(wanted: int, attempts: int = 200) -> int | None:
    """A child (SIGUSR1 at its default action, alive 0.5 s, exit 0) whose pid is
    `wanted`, made by writing ns_last_pid (root only); None if other processes
    on the machine kept taking the pid first."""
    for _ in range(attempts):
        try:
            with open(NS_LAST_PID, "w") as f:
                f.write(str(wanted - 1))
        except OSError as e:
            pytest.skip(f"cannot choose the next pid ({NS_LAST_PID}: {e.strerror})")
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGUSR1, signal.SIG_DFL)
            time.sleep(0.5)
            os._exit(0)
        if pid == wanted:
            return pid
        os.kill(pid, signal.SIGKILL)  # our unreaped child: its pid is still ours
        os.waitpid(pid, 0)
    return None


def test_disturber_never_signals_a_reaped_pid():
    """A process that takes the pid of a reaped worker while the storm goes
    on must not be hit."""
    old = signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # workers inherit it
    disturber = _stress.Disturber(storm=True, migrate=True)
    try:
        disturber.start()
        _stress._run_processes(1, lambda w: time.sleep(0.05), disturber)
        # The worker is reaped: its pid is in the disturber's target table.
        reaped = disturber._view[2 + 1]
        assert reaped > 0
        rounds = disturber.rounds()
        canary = _fork_with_pid(reaped)
        if canary is None:
            pytest.skip("other processes kept taking the pid first")
        _, status = os.waitpid(canary, 0)
        assert disturber.rounds() > rounds + 10, "the storm was not running meanwhile"
    finally:
        disturber.stop()
        signal.signal(signal.SIGUSR1, old)
    assert os.waitstatus_to_exitcode(status) == 0, (
        f"the process that reused pid {reaped} died of signal {-os.waitstatus_to_exitcode(status)}")


def test_worker_process_is_signalled_through_a_pidfd():
    """The disturber opens a pidfd for each live worker process."""
    if not hasattr(os, "pidfd_open"):
        pytest.skip("no os.pidfd_open")
    old = signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    disturber = _stress.Disturber(storm=True, migrate=False)
    try:
        disturber.start()
        # A worker that lives long enough for the disturber to see it.
        pid = os.fork()
        if pid == 0:
            time.sleep(0.3)
            os._exit(0)
        slot = disturber.add_process(pid)
        deadline = time.monotonic() + 10
        fds: set[str] = set()
        while time.monotonic() < deadline and not any(
                "anon_inode:[pidfd]" in target for target in fds):
            fds = {os.readlink(f"/proc/{disturber._pid}/fd/{fd}")
                   for fd in os.listdir(f"/proc/{disturber._pid}/fd")
                   if os.path.exists(f"/proc/{disturber._pid}/fd/{fd}")}
            time.sleep(0.01)
        assert "anon_inode:[pidfd]" in fds
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
        disturber.drop(slot)
        os.waitpid(pid, 0)
    finally:
        disturber.stop()
        signal.signal(signal.SIGUSR1, old)


def test_no_signal_reaches_a_thread_after_it_was_dropped():
    """A worker thread still alive after the case restored SIGUSR1's default
    action (join() returns before the kernel thread is gone; under load it
    can linger for long) receives nothing once dropped."""
    proc = run_python(textwrap.dedent("""
        import signal, threading, time
        from rseq.testing import stress as _stress
        signal.signal(signal.SIGUSR1, lambda *a: None)
        disturber = _stress.Disturber(storm=True, migrate=False)
        disturber.start()
        registered, release = threading.Event(), threading.Event()
        slot = []
        def worker():
            slot.append(disturber.add_thread(threading.get_native_id()))
            registered.set()
            release.wait()
            time.sleep(0.5)       # the lingering thread
        t = threading.Thread(target=worker)
        t.start()
        registered.wait()
        time.sleep(0.2)           # the storm hits it meanwhile
        disturber.drop(slot[0])
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)   # the case is over
        release.set()
        t.join()
        disturber.stop()
        print("survived")
    """), check=False, timeout=60)
    assert proc.returncode == 0 and proc.stdout == "survived\n", (proc.returncode, proc.stderr)


def test_drop_is_bounded_when_the_disturber_died():
    disturber = _stress.Disturber(storm=False, migrate=False)
    disturber.start()
    slot = disturber.add_process(os.getpid())
    os.kill(disturber._pid, signal.SIGKILL)
    started = time.monotonic()
    disturber.drop(slot)
    assert time.monotonic() - started < 5
    assert disturber._pid is None  # stopped and reaped


def test_thread_workers_are_dropped_before_they_return():
    disturber = _stress.Disturber(storm=True, migrate=False)
    old = signal.signal(signal.SIGUSR1, lambda *a: None)
    try:
        disturber.start()
        _stress._run_threads(3, lambda: time.sleep(0.01), disturber)
        states = [disturber._view[2 + 3 * i + 2] for i in range(disturber._view[0])]
    finally:
        disturber.stop()
        signal.signal(signal.SIGUSR1, old)
    assert states == [disturber._DROPPED] * 3
