"""``python -m rseq inspect PID``: the rseq registration of each thread of
another process, read with PTRACE_GET_RSEQ_CONFIGURATION (Linux 5.13).

A thread can only be read once it reaches a ptrace stop, and a thread in
uninterruptible sleep (state D: a vfork parent waiting for its child, a
process stuck on a dead NFS server) does not stop until it wakes.  So each
read runs on a helper thread and the caller waits at most ``timeout``
seconds: a thread that has not answered by then is reported as not
inspectable, and the caller (and Ctrl-C) is never held up.  The helper
stays behind, blocked in ``waitpid``, and finishes the read and detaches
the moment the thread wakes (or the kernel detaches it when this process
exits): the inspected thread is never left stopped.
"""
from __future__ import annotations

import dataclasses
import errno
import json
import os
import threading
import time

from . import _core
from ._cli import UsageError, positive_float

#: Seconds to wait for one thread to reach a ptrace stop.
DEFAULT_TIMEOUT = 1.0


class InspectError(Exception):
    """A one-line reason why a process could not be inspected."""


@dataclasses.dataclass(frozen=True)
class ThreadRegistration:
    tid: int
    name: str
    #: Address of the thread's struct rseq (0: not registered).
    address: int
    size: int
    signature: int
    flags: int
    #: None, or why this thread could not be read ("exited" meanwhile, or
    #: "not inspectable: ..." when it did not stop within the timeout).
    error: str | None = None

    @property
    def registered(self) -> bool:
        return self.error is None and self.address != 0

    def as_dict(self) -> dict:
        return dict(dataclasses.asdict(self), registered=self.registered)


def _thread_name(pid: int, tid: int) -> str:
    try:
        with open(f"/proc/{pid}/task/{tid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


def _task_state(pid: int, tid: int) -> str | None:
    """The one-letter state of a thread ("R", "S", "Z", ...), or None."""
    try:
        with open(f"/proc/{pid}/task/{tid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _read_exiting(pid: int, tid: int, attempts: int = 20) -> tuple[int, int, int, int]:
    """thread_configuration(tid), waiting out a thread that is exiting.

    ptrace answers EPERM for a thread already in exit (PF_EXITING) while
    /proc still lists it as running; it is gone within milliseconds, so a
    repeated EPERM on a thread that is still alive is a real refusal."""
    for attempt in range(attempts):
        try:
            return _core.thread_configuration(tid)
        except PermissionError:
            if attempt == attempts - 1 or tid == pid or _task_state(pid, tid) in (None, "Z", "X"):
                raise
            time.sleep(0.001)
    raise AssertionError("unreachable")


#: Helper threads still waiting for a thread to stop, by tid: a second
#: PTRACE_SEIZE of that tid would fail (EPERM: already traced, by us).
_waiting: dict[int, threading.Thread] = {}
_waiting_lock = threading.Lock()


def _read_with_timeout(pid: int, tid: int, timeout: float) -> tuple[int, int, int, int] | None:
    """_read_exiting(pid, tid) on a helper thread; None when it did not
    answer within ``timeout`` seconds.  The wait is a lock acquire, which
    Ctrl-C interrupts at once (KeyboardInterrupt)."""
    with _waiting_lock:
        earlier = _waiting.get(tid)
        if earlier is not None and earlier.is_alive():
            return None
    outcome: list = []

    def read() -> None:
        try:
            outcome.append(_read_exiting(pid, tid))
        except BaseException as e:  # handed to the caller, re-raised there
            outcome.append(e)
        finally:
            with _waiting_lock:
                if _waiting.get(tid) is threading.current_thread():
                    del _waiting[tid]

    helper = threading.Thread(target=read, name=f"rseq-inspect-{tid}", daemon=True)
    with _waiting_lock:
        _waiting[tid] = helper
    helper.start()
    helper.join(timeout)
    if not outcome:
        return None
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return outcome[0]


def _not_stopping(pid: int, tid: int, timeout: float) -> str:
    state = _task_state(pid, tid)
    why = ("in uninterruptible sleep (state D)" if state == "D" else
           f"state {state}" if state else "state unknown")
    return f"not inspectable: did not stop within {timeout:g} s ({why})"


def inspect_process(pid: int, timeout: float = DEFAULT_TIMEOUT) -> list[ThreadRegistration]:
    """Each thread of process ``pid`` with its registration, the main
    thread first.

    A thread that does not reach a ptrace stop within ``timeout`` seconds
    (uninterruptible sleep) is listed with ``error`` "not inspectable: ...".
    Raises InspectError for a process that does not exist, that we may not
    trace, or a kernel without the ptrace request.
    """
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0, got {timeout}")
    if pid <= 0:
        raise InspectError(f"not a process id: {pid}")
    if pid == os.getpid():
        raise InspectError("cannot inspect this process itself (a thread "
                           "cannot ptrace its own thread group); use rseq.info()")
    try:
        # The main thread first, then the others by tid (tids wrap around
        # pid_max, so a later thread can have a smaller tid than the main).
        tids = sorted((int(t) for t in os.listdir(f"/proc/{pid}/task")),
                      key=lambda tid: (tid != pid, tid))
    except FileNotFoundError:
        raise InspectError(f"no such process: {pid}") from None
    except PermissionError:
        raise InspectError(f"permission denied listing the threads of {pid}") from None
    threads: list[ThreadRegistration] = []
    for tid in tids:
        name = _thread_name(pid, tid)
        try:
            answer = _read_with_timeout(pid, tid, timeout)
        except OSError as e:
            if e.errno == errno.ESRCH and threads:
                # The thread exited between listing and reading.
                threads.append(ThreadRegistration(tid, name, 0, 0, 0, 0, "exited"))
                continue
            if e.errno == errno.ESRCH:
                if not os.path.exists(f"/proc/{pid}"):
                    raise InspectError(f"no such process: {pid}") from None
                threads.append(ThreadRegistration(tid, name, 0, 0, 0, 0, "exited"))
                continue
            if e.errno == errno.EIO:
                raise InspectError("this kernel lacks PTRACE_GET_RSEQ_CONFIGURATION "
                                   "(Linux 5.13 or later is needed)") from None
            if e.errno == errno.EPERM and _task_state(pid, tid) in (None, "Z", "X"):
                # ptrace refuses a thread that is exiting or has exited but
                # is not reaped yet (EPERM, not ESRCH): gone, not forbidden.
                threads.append(ThreadRegistration(tid, name, 0, 0, 0, 0, "exited"))
                continue
            if e.errno in (errno.EPERM, errno.EACCES):
                hint = ("; see /proc/sys/kernel/yama/ptrace_scope"
                        if os.path.exists("/proc/sys/kernel/yama/ptrace_scope") else "")
                raise InspectError(f"permission denied: cannot ptrace process {pid} "
                                   f"({e.strerror}{hint})") from None
            raise InspectError(str(e)) from None
        if answer is None:
            threads.append(ThreadRegistration(tid, name, 0, 0, 0, 0,
                                              _not_stopping(pid, tid, timeout)))
            continue
        threads.append(ThreadRegistration(tid, name, *answer))
    if threads and all(t.error for t in threads) and _task_state(pid, pid) in ("Z", "X"):
        raise InspectError(f"process {pid} has exited (a zombie its parent has not "
                           "reaped yet): no thread left to inspect")
    return threads


def format_table(pid: int, threads: list[ThreadRegistration]) -> str:
    lines = [f"process {pid}: {len(threads)} thread(s)",
             f"  {'tid':>8}  {'name':<16} {'area':>18}  {'size':>4}  {'signature':>10}  flags"]
    for t in threads:
        if t.error:
            lines.append(f"  {t.tid:>8}  {t.name:<16} {t.error}")
        elif not t.address:
            lines.append(f"  {t.tid:>8}  {t.name:<16} {'not registered':>18}")
        else:
            lines.append(f"  {t.tid:>8}  {t.name:<16} {t.address:#18x}  {t.size:>4}  "
                         f"{t.signature:#010x}  {t.flags:#x}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# python -m rseq inspect
# ---------------------------------------------------------------------------

def _run(args) -> int:
    try:
        threads = inspect_process(args.pid, timeout=args.timeout)
    except InspectError as e:
        raise UsageError(str(e)) from None
    if args.json:
        print(json.dumps({"pid": args.pid, "threads": [t.as_dict() for t in threads]},
                         indent=2))
    else:
        print(format_table(args.pid, threads))
    return 0


def add_subcommand(subparsers) -> None:
    p = subparsers.add_parser(
        "inspect", help="each thread's registration in another process",
        description="Each thread of process PID with its rseq registration, read with "
                    "PTRACE_GET_RSEQ_CONFIGURATION (Linux 5.13).")
    p.add_argument("pid", type=int)
    p.add_argument("--json", action="store_true")
    p.add_argument("--timeout", type=positive_float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                   help="how long to wait for each thread to stop; a thread in "
                        f"uninterruptible sleep is reported as not inspectable (default "
                        f"{DEFAULT_TIMEOUT:g})")
    p.set_defaults(run=_run)
