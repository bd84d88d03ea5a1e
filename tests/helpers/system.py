"""What the machine and the calling thread look like, read from /proc and /sys."""
from __future__ import annotations

import glob
import os
import re
import threading


def usable_cpus() -> list[int]:
    """The CPUs this process may run on."""
    return sorted(os.sched_getaffinity(0))


def node_of_cpu(cpu: int) -> int:
    """The NUMA node of ``cpu`` from sysfs, or 0 on a machine without nodes."""
    nodes = glob.glob(f"/sys/devices/system/cpu/cpu{cpu}/node*")
    if not nodes:
        return 0
    return int(re.fullmatch(r"node(\d+)", os.path.basename(nodes[0])).group(1))


def pin_current_thread(cpus: set[int]) -> None:
    """sched_setaffinity on the calling thread only (not the process)."""
    os.sched_setaffinity(threading.get_native_id(), cpus)


def signal_mask(tid: int) -> int:
    """The blocked-signal mask (SigBlk) of thread ``tid`` of this process."""
    with open(f"/proc/self/task/{tid}/status") as f:
        for line in f:
            if line.startswith("SigBlk:"):
                return int(line.split()[1], 16)
    raise AssertionError("no SigBlk line")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def malloc_in_use() -> int:
    """Bytes handed out by glibc malloc over all arenas (mallinfo2, glibc 2.33)."""
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
            "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = MallInfo2
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd


def in_thread(fn):
    """Run ``fn`` in a new thread (fresh per-thread rseq state) and return
    its result, or re-raise its exception in the caller's thread."""
    box = {}

    def target():
        try:
            box["result"] = fn()
        except BaseException as e:  # re-raised in the caller's thread
            box["error"] = e

    t = threading.Thread(target=target)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["result"]
