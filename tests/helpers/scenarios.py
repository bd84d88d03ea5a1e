"""Thread scenarios that run the same way in the test process (glibc mode)
and in a child started in another mode; each returns JSON-ready results
that the test checks."""
from __future__ import annotations

import os
import random
import sys
import threading
import time

import rseq

from .system import pin_current_thread, usable_cpus


def pinned_reads(reads: int = 2000) -> dict:
    """One thread pinned to each usable CPU reads cpu() and node() ``reads``
    times: {cpu: {"cpus": [...seen], "nodes": [...seen], "owner": ...}}."""
    results: dict[str, dict] = {}

    def reader(cpu: int) -> None:
        pin_current_thread({cpu})
        seen_cpus, seen_nodes = set(), set()
        for _ in range(reads):
            seen_cpus.add(rseq.cpu())
        for _ in range(reads // 10):
            seen_nodes.add(rseq.node())
        results[str(cpu)] = {"cpus": sorted(seen_cpus), "nodes": sorted(seen_nodes),
                             "owner": rseq.info().owner}

    threads = [threading.Thread(target=reader, args=(c,)) for c in usable_cpus()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def moved_thread(reads: int = 500) -> list[dict]:
    """A thread pinned to one CPU is moved by another thread to each of the
    others in turn; after each move it reads cpu() ``reads`` times.  Returns
    [{"pinned": cpu, "seen": [...]}] in order."""
    cpus = usable_cpus()
    steps: list[dict] = []
    go, done = threading.Event(), threading.Event()
    tid: list[int] = []
    stop = False

    def mover_target() -> None:
        tid.append(threading.get_native_id())
        done.set()
        while True:
            go.wait()
            go.clear()
            if stop:
                return
            steps[-1]["seen"] = sorted({rseq.cpu() for _ in range(reads)})
            done.set()

    t = threading.Thread(target=mover_target)
    t.start()
    done.wait()
    for cpu in cpus + cpus[:1]:
        done.clear()
        os.sched_setaffinity(tid[0], {cpu})    # moved from outside
        steps.append({"pinned": cpu, "seen": None})
        go.set()
        done.wait()
    stop = True
    go.set()
    t.join()
    return steps


def reads_while_migrated(readers: int = 4, moves: int = 300) -> dict:
    """Readers call cpu() in a loop while a migrator re-pins them at random.

    The migrator publishes (generation, cpu) for a reader only after
    sched_setaffinity returned; a read taken between two looks at an
    unchanged generation must equal that CPU.  Returns counts of checked
    reads and of mismatches (with a few examples)."""
    cpus = usable_cpus()
    allowed = set(cpus)
    rng = random.Random(20240502)
    targets: dict[int, tuple[int, int]] = {}
    tids: list[int] = []
    ready = threading.Barrier(readers + 1)
    stop = threading.Event()
    checked = [0] * readers
    bad: list[tuple] = []
    out_of_range: list[int] = []

    def reader(index: int) -> None:
        tid = threading.get_native_id()
        targets[tid] = (0, -1)
        tids.append(tid)
        ready.wait()
        while not stop.is_set():
            gen, want = targets[tid]
            got = rseq.cpu()
            if got not in allowed:
                out_of_range.append(got)
            if want >= 0 and targets[tid][0] == gen:
                checked[index] += 1
                if got != want:
                    bad.append((tid, gen, want, got))

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(readers)]
    # The migrator must get the GIL back quickly from the spinning readers.
    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(0.0002)
    try:
        for t in threads:
            t.start()
        ready.wait()
        for generation in range(1, moves + 1):
            tid = rng.choice(tids)
            cpu = rng.choice(cpus)
            targets[tid] = (-generation, -1)   # changing: reads are not checked
            os.sched_setaffinity(tid, {cpu})
            targets[tid] = (generation, cpu)
            time.sleep(0.0005)
    finally:
        stop.set()
        for t in threads:
            t.join()
        sys.setswitchinterval(old_interval)
    return {"checked": sum(checked), "mismatches": len(bad), "examples": bad[:5],
            "out_of_range": out_of_range[:5]}


def pinned_cpu_reads() -> dict:
    """Pin the calling thread to each usable CPU in turn and read cpu():
    {cpu: [...seen]}.  Leaves the thread allowed on every usable CPU."""
    cpus = usable_cpus()
    seen = {}
    for cpu in cpus:
        pin_current_thread({cpu})
        seen[str(cpu)] = sorted({rseq.cpu() for _ in range(200)})
    pin_current_thread(set(cpus))
    return seen


def report() -> dict:
    """What a (child) process sees: its info and pinned reads."""
    return {"pid": os.getpid(), "info": rseq.info().as_dict(),
            "reads": pinned_cpu_reads()}


def fork_and_inspect() -> dict:
    """Take a reference, fork; the child reports, waits while the parent runs
    ``python -m rseq inspect CHILD --json``, then unregisters and reports
    again.  Returns the parent's view, the child's two reports and the
    inspect output."""
    import json
    import subprocess
    count = rseq.register()
    parent = rseq.info().as_dict()
    to_parent_r, to_parent_w = os.pipe()
    to_child_r, to_child_w = os.pipe()
    pid = os.fork()
    if pid == 0:    # the child: no pytest, no exceptions escaping
        status = 1
        try:
            os.close(to_parent_r)
            os.close(to_child_w)
            out = os.fdopen(to_parent_w, "w")
            first = report()
            first["count"] = rseq.registration_count()
            out.write(json.dumps(first) + "\n")
            out.flush()
            os.read(to_child_r, 1)
            second = {"unregister": rseq.unregister(), "info": rseq.info().as_dict(),
                      "reads": pinned_cpu_reads()}
            out.write(json.dumps(second) + "\n")
            out.flush()
            status = 0
        finally:
            os._exit(status)
    os.close(to_parent_w)
    os.close(to_child_r)
    lines = os.fdopen(to_parent_r)
    first = json.loads(lines.readline())
    inspected = subprocess.run([sys.executable, "-m", "rseq", "inspect", str(pid), "--json"],
                               capture_output=True, text=True, timeout=30)
    os.write(to_child_w, b"x")
    second = json.loads(lines.readline())
    _, status = os.waitpid(pid, 0)
    parent_after = rseq.info().as_dict()
    return {"count": count, "parent": parent, "parent_after": parent_after,
            "child": first, "child_after": second, "child_status": status,
            "inspect_status": inspected.returncode, "inspect_stderr": inspected.stderr,
            "inspect": json.loads(inspected.stdout) if inspected.returncode == 0 else None}


def spawn_children(count: int = 2) -> list[dict]:
    """multiprocessing "spawn" children, each returning report()."""
    import multiprocessing
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    children = [ctx.Process(target=_report_to, args=(queue,)) for _ in range(count)]
    for child in children:
        child.start()
    results = [queue.get(timeout=60) for _ in children]
    for child in children:
        child.join(timeout=60)
    return [dict(r, exitcode=c.exitcode, parent=os.getpid())
            for r, c in zip(sorted(results, key=lambda r: r["pid"]),
                            sorted(children, key=lambda c: c.pid))]


def _report_to(queue) -> None:
    queue.put(report())
