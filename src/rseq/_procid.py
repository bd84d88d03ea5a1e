"""Process identity that survives pid reuse: (pid, start time).

A pid alone names a process only while it lives: once reaped, the number
may be given to any new process.  Every shared structure that records an
owner (the arena's key claims, the pool's blocks, the ring's consumer
lease, the metrics' per-process entries) records the pid together with the
process's start time (field 22 of /proc/PID/stat, clock ticks since boot),
and a recorded owner is alive only if a process with that pid exists, is
not a zombie, and started at that time.

Limit: processes must share a pid namespace (and see the same /proc).
"""
from __future__ import annotations

import os

PF_EXITING = 0x00000004   # include/linux/sched.h
_self: tuple[int, int] | None = None


def start_time(pid: int) -> int | None:
    """The start time of process ``pid``, or None if there is no such live
    process (absent, or a zombie waiting to be reaped)."""
    if not isinstance(pid, int) or pid <= 0:
        return None
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name (field 2) is in parentheses and may contain anything,
    # spaces and parentheses included: split after the last ')'.
    rest = data[data.rfind(b")") + 2:].split()
    if len(rest) < 20 or rest[0] in (b"Z", b"X"):
        return None
    # A process that is exiting (PF_EXITING in the flags, field 9: set as
    # soon as a SIGKILL is acted on, before its files close and long before
    # it becomes a zombie) will never run user code again: not alive.  This
    # is what lets a scrape that follows a killed request's broken
    # connection already see its process as gone.
    if int(rest[6]) & PF_EXITING:
        return None
    return int(rest[19])


def alive(pid: int, started: int) -> bool:
    """True if the process recorded as (pid, started) still runs."""
    return started != 0 and start_time(pid) == started


def identity() -> tuple[int, int]:
    """(pid, start time) of this process; recomputed after fork()."""
    global _self
    if _self is None or _self[0] != os.getpid():
        pid = os.getpid()
        started = start_time(pid)
        if started is None:  # /proc not mounted: never mistaken for alive
            started = 0
        _self = (pid, started)
    return _self
