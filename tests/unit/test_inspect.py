"""``python -m rseq inspect PID``: each thread of a live child, JSON and
table output, and every error case (one line on stderr, exit status 2)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

import rseq
from helpers.subproc import MODES, child_env, run_rseq_cli
from rseq import _inspect

pytestmark = pytest.mark.usefixtures("kernel_rseq")

# A child with several threads: each reports (tid, area address) and waits
# until told to exit on stdin.
THREADED_CHILD = """
import json, sys, threading
import rseq
THREADS = 3
lock = threading.Lock()
areas = {}
started = threading.Barrier(THREADS + 1)
done = threading.Event()
def worker():
    with lock:
        areas[threading.get_native_id()] = rseq.info().area_address
    started.wait()
    done.wait()
threads = [threading.Thread(target=worker, name=f"worker{i}") for i in range(THREADS)]
for t in threads: t.start()
started.wait()
areas[threading.get_native_id()] = rseq.info().area_address
print(json.dumps({str(k): v for k, v in areas.items()}), flush=True)
sys.stdin.readline()
done.set()
for t in threads: t.join()
"""


class ThreadedChild:
    def __init__(self, mode: str):
        self.proc = subprocess.Popen([sys.executable, "-c", THREADED_CHILD],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=child_env(MODES[mode]))
        line = self.proc.stdout.readline()
        assert line, "the child died before reporting"
        self.areas = {int(tid): address for tid, address in json.loads(line).items()}
        self.pid = self.proc.pid

    def close(self) -> int:
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        return self.proc.wait(timeout=30)


@pytest.fixture(params=["glibc", "own"])
def threaded_child(request):
    child = ThreadedChild(request.param)
    try:
        yield child
    finally:
        if child.proc.poll() is None:
            assert child.close() == 0


def test_inspect_json_lists_every_thread(threaded_child):
    proc = run_rseq_cli("inspect", str(threaded_child.pid), "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["pid"] == threaded_child.pid
    threads = report["threads"]
    assert {t["tid"]: t["address"] for t in threads} == threaded_child.areas
    for t in threads:
        assert t["registered"] is True and t["error"] is None
        assert t["size"] == 32
        assert t["signature"] == 0x53053053
        assert t["flags"] == 0
    assert set(t) == {"tid", "name", "address", "size", "signature", "flags",
                      "error", "registered"}
    assert all(t["name"] and t["name"] != "?" for t in threads)
    # The child was not disturbed: it still runs and exits normally.
    assert threaded_child.close() == 0


def test_inspect_table(threaded_child):
    proc = run_rseq_cli("inspect", str(threaded_child.pid))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == f"process {threaded_child.pid}: 4 thread(s)"
    rows = {int(line.split()[0]): line.split() for line in lines[2:]}
    assert set(rows) == set(threaded_child.areas)
    for tid, row in rows.items():
        assert int(row[2], 16) == threaded_child.areas[tid]
        assert row[3:] == ["32", "0x53053053", "0x0"]


def test_inspect_library_matches_the_cli(threaded_child):
    threads = _inspect.inspect_process(threaded_child.pid)
    assert {t.tid: t.address for t in threads} == threaded_child.areas
    assert all(t.registered for t in threads)


def test_inspect_does_not_lose_signals():
    """Real-time signals sent while the child is inspected over and over all
    arrive (a ptrace detach must hand back a signal caught in its stop)."""
    child = subprocess.Popen([sys.executable, "-c", """
import os, signal, sys, time
r, w = os.pipe()
os.set_blocking(w, False); os.set_blocking(r, False)
signal.signal(signal.SIGRTMIN, lambda *a: None)
signal.set_wakeup_fd(w)            # one byte per delivered signal
print("ready", flush=True)
sys.stdin.readline()
time.sleep(0.05)
print(os.read(r, 65536).count(bytes([signal.SIGRTMIN])), flush=True)
"""], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=child_env())
    try:
        assert child.stdout.readline() == "ready\n"
        sent = 200
        for _ in range(sent):
            os.kill(child.pid, signal.SIGRTMIN)
            rseq._core.thread_configuration(child.pid)
        child.stdin.write("\n")
        child.stdin.flush()
        assert int(child.stdout.readline()) == sent
    finally:
        child.kill()
        child.wait()


# ------------------------------------------------------------------------
# Errors: one line on stderr, exit status 2, never a traceback
# ------------------------------------------------------------------------

def assert_one_line_error(proc, *fragments):
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.endswith("\n") and proc.stderr.count("\n") == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in proc.stderr


def unused_pid() -> int:
    with open("/proc/sys/kernel/pid_max") as f:
        return int(f.read()) + 1     # above pid_max: never a live process


def test_inspect_no_such_process():
    pid = unused_pid()
    assert_one_line_error(run_rseq_cli("inspect", str(pid)), f"no such process: {pid}")


def test_inspect_not_an_integer():
    assert_one_line_error(run_rseq_cli("inspect", "abc"), "invalid int value: 'abc'")


@pytest.mark.parametrize("pid", ["0", "-5"])
def test_inspect_not_a_pid(pid):
    assert_one_line_error(run_rseq_cli("inspect", "--", pid), f"not a process id: {pid}")


def test_inspect_itself():
    proc = subprocess.run([sys.executable, "-c",
                           "import os, sys; from rseq._cli import main; "
                           "sys.exit(main(['inspect', str(os.getpid())]))"],
                          capture_output=True, text=True, env=child_env())
    assert_one_line_error(proc, "cannot inspect this process itself")
    with pytest.raises(_inspect.InspectError, match="itself"):
        _inspect.inspect_process(os.getpid())


def test_inspect_zombie():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        # Wait for the exit without reaping: the child stays a zombie.
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)
        proc = run_rseq_cli("inspect", str(child.pid))
        assert_one_line_error(proc, f"process {child.pid} has exited", "zombie")
    finally:
        child.wait()
    # Reaped: now it does not exist at all.
    assert_one_line_error(run_rseq_cli("inspect", str(child.pid)), "no such process")


def test_inspect_permission_denied():
    try:
        rseq._core.thread_configuration(1)
    except PermissionError:
        pass
    except OSError as e:
        pytest.skip(f"pid 1 answers {e}")
    else:
        pytest.skip("pid 1 is traceable here")
    assert_one_line_error(run_rseq_cli("inspect", "1"),
                          "permission denied: cannot ptrace process 1", "EPERM")


def test_thread_configuration_errors_name_the_call():
    with pytest.raises(OSError) as caught:
        rseq._core.thread_configuration(unused_pid())
    assert caught.value.errno == 3      # ESRCH
    assert "ptrace(PTRACE_SEIZE)" in str(caught.value)
    with pytest.raises(ValueError):
        rseq._core.thread_configuration(0)


def test_inspect_exited_threads_are_skipped_or_marked():
    """Threads that exit while a process is inspected never make it fail."""
    child = subprocess.Popen([sys.executable, "-c", """
import sys, threading, time
def churn():
    while True:
        t = threading.Thread(target=time.sleep, args=(0.001,)); t.start(); t.join()
threading.Thread(target=churn, daemon=True).start()
print("ready", flush=True)
sys.stdin.readline()
"""], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=child_env())
    try:
        assert child.stdout.readline() == "ready\n"
        deadline = time.monotonic() + 1.0
        rounds = 0
        while time.monotonic() < deadline:
            threads = _inspect.inspect_process(child.pid)
            assert threads[0].tid == child.pid and threads[0].registered
            for t in threads:
                assert t.registered or t.error == "exited" or t.address == 0
            rounds += 1
        assert rounds > 5
    finally:
        child.kill()
        child.wait()


def test_kernel_without_the_ptrace_request(threaded_child, monkeypatch, capsys):
    """Before Linux 5.13 the kernel answers EIO to PTRACE_GET_RSEQ_CONFIGURATION.
    This kernel has the request, so its answer is simulated at the C boundary."""
    import errno

    from rseq import _cli

    def old_kernel(tid):
        raise OSError(errno.EIO, "ptrace(PTRACE_GET_RSEQ_CONFIGURATION) on thread "
                      f"{tid}: Input/output error (EIO)")

    monkeypatch.setattr(_inspect._core, "thread_configuration", old_kernel)
    assert _cli.main(["inspect", str(threaded_child.pid)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1
    assert "lacks PTRACE_GET_RSEQ_CONFIGURATION" in err and "5.13" in err


# ------------------------------------------------------------------------
# A thread in uninterruptible sleep: bounded wait, Ctrl-C answered at once
# ------------------------------------------------------------------------

# The main thread posix_spawn()s with a file action that opens a FIFO: glibc
# spawns with CLONE_VFORK, so the parent waits in uninterruptible sleep
# (state D) until the child has opened the FIFO and exec'd, that is until
# the test opens the FIFO's other end.  A second thread stays inspectable.
VFORK_PARENT = """
import os, sys, threading
fifo = sys.argv[1]
threading.Thread(target=threading.Event().wait, daemon=True).start()
print(threading.get_native_id(), flush=True)
pid = os.posix_spawn("/bin/true", ["true"], dict(os.environ),
                     file_actions=[(os.POSIX_SPAWN_OPEN, 3, fifo, os.O_RDONLY, 0)])
os.waitpid(pid, 0)
print("spawned", flush=True)
"""


class VforkParent:
    def __init__(self, tmp_path):
        self.fifo = str(tmp_path / "fifo")
        os.mkfifo(self.fifo)
        self.proc = subprocess.Popen([sys.executable, "-c", VFORK_PARENT, self.fifo],
                                     stdout=subprocess.PIPE, text=True, env=child_env())
        self.pid = self.proc.pid
        assert int(self.proc.stdout.readline()) == self.pid
        deadline = time.monotonic() + 10
        while _inspect._task_state(self.pid, self.pid) != "D":
            assert time.monotonic() < deadline, "the vfork parent never slept in state D"
            time.sleep(0.01)

    def release(self) -> None:
        """Let the spawned child open the FIFO and exec: the parent wakes."""
        fd = os.open(self.fifo, os.O_WRONLY)
        os.close(fd)

    def finish(self) -> int:
        self.release()
        out, _ = self.proc.communicate(timeout=30)
        assert out == "spawned\n"
        return self.proc.returncode


@pytest.fixture
def vfork_parent(tmp_path):
    parent = VforkParent(tmp_path)
    try:
        yield parent
    finally:
        if parent.proc.poll() is None:
            parent.proc.kill()
            parent.release()
            parent.proc.wait()


def test_inspect_does_not_block_on_a_thread_in_state_d(vfork_parent):
    started = time.monotonic()
    threads = _inspect.inspect_process(vfork_parent.pid, timeout=0.5)
    assert time.monotonic() - started < 5
    main, idle = threads
    assert main.tid == vfork_parent.pid and not main.registered
    assert main.error.startswith("not inspectable: did not stop within 0.5 s")
    assert "uninterruptible sleep (state D)" in main.error
    assert idle.registered and idle.error is None
    # Asked again while the first helper still waits: answered at once.
    started = time.monotonic()
    again = _inspect.inspect_process(vfork_parent.pid, timeout=5)
    assert time.monotonic() - started < 2.5
    assert again[0].error.startswith("not inspectable") and again[1].registered
    # The target was not left stopped: once it wakes the helper finishes
    # the read and detaches, and the process runs to its end.
    assert vfork_parent.finish() == 0
    deadline = time.monotonic() + 10
    while vfork_parent.pid in _inspect._waiting:
        assert time.monotonic() < deadline, "the helper thread never finished"
        time.sleep(0.01)


def test_inspect_cli_reports_a_thread_in_state_d(vfork_parent):
    proc = run_rseq_cli("inspect", str(vfork_parent.pid), "--timeout", "0.3", "--json")
    assert proc.returncode == 0, proc.stderr
    threads = json.loads(proc.stdout)["threads"]
    assert "uninterruptible sleep" in threads[0]["error"] and not threads[0]["registered"]
    assert threads[1]["registered"]
    assert vfork_parent.finish() == 0


def test_inspect_answers_ctrl_c_at_once(vfork_parent):
    cli = subprocess.Popen([sys.executable, "-m", "rseq", "inspect", str(vfork_parent.pid),
                            "--timeout", "60"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, env=child_env())
    try:
        # Wait until the command has seized the sleeping thread (TracerPid
        # names the tracing thread, a helper thread of the command).
        deadline = time.monotonic() + 20
        while True:
            with open(f"/proc/{vfork_parent.pid}/status") as f:
                tracer = int(next(line for line in f if line.startswith("TracerPid:")).split()[1])
            if tracer and os.path.exists(f"/proc/{cli.pid}/task/{tracer}"):
                break
            assert cli.poll() is None and time.monotonic() < deadline, cli.stderr.read()
            time.sleep(0.01)
        time.sleep(0.2)
        sent = time.monotonic()
        cli.send_signal(signal.SIGINT)
        out, err = cli.communicate(timeout=10)
        assert time.monotonic() - sent < 2
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()
    assert cli.returncode == 130
    assert out == "" and err == "python -m rseq inspect: interrupted\n"
    # The command's exit detached the thread: it wakes and runs on.
    assert vfork_parent.finish() == 0
