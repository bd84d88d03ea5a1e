"""rseq.Arena against a hostile co-tenant, a full file system and damaged
files (issue 8): space reserved at creation, nothing published on failure,
names checked, files checked before they are opened, read-only opening,
damaged entries reported, claims that answer Ctrl-C, and the text of every
error the C side of the arena raises."""
from __future__ import annotations

import errno
import json
import mmap
import os
import re
import signal
import socket
import stat
import struct
import subprocess
import threading
import time

import pytest

import rseq
from helpers.subproc import run_json
from rseq import _arena, _procid

POSSIBLE = rseq.info().possible_cpus
NOBODY = 65534
ENTRY_KEY = rseq._core.ARENA_ENTRY_HEADER

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown, mknod, "
                                "mount, setuid)")


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "arena")


def _fnv1a64(data: bytes) -> int:
    h = 0xcbf29ce484222325
    for b in data:
        h = ((h ^ b) * 0x100000001b3) & 0xFFFFFFFFFFFFFFFF
    return h


def _start_tag(pid: int) -> int:
    return (_procid.start_time(pid) & ((1 << 24) - 1)) or 1


def _claim(path: str, key: str, pid: int, start: int, capacity: int) -> int:
    """Write a CLAIMED state for `key` by (pid, start tag), as a creator would."""
    h = _fnv1a64(key.encode())
    index = h % capacity
    state = (1 << 62) | ((h >> 48) << 46) | (start << 22) | pid
    layout = _arena.Layout.compute(POSSIBLE, capacity, _arena.DEFAULT_KEY_MAX)
    with open(path, "r+b") as f:
        f.seek(layout.table_offset + index * layout.entry_size)
        f.write(struct.pack("<Q", state))
    return index


def _entry_offset(layout: _arena.Layout, index: int) -> int:
    return layout.table_offset + index * layout.entry_size


def _flip(path: str, offset: int, bit: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ (1 << bit)]))


# ---------------------------------------------------------------------------
# Item 1: a full file system is ENOSPC at create time, never a SIGBUS
# ---------------------------------------------------------------------------

@pytest.fixture
def small_tmpfs(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0755", "tmpfs",
                           str(mount_point)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (no CAP_SYS_ADMIN in this container?): "
                    f"{done.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=True)


def test_full_filesystem_is_enospc_at_create(small_tmpfs):
    target = str(small_tmpfs / "big")
    with pytest.raises(OSError) as info:
        rseq.Arena.create(target, capacity=100000)   # ~14 MB on a 256 KiB tmpfs
    assert info.value.errno == errno.ENOSPC
    assert "no space to create arena" in str(info.value) and target in str(info.value)
    assert os.listdir(small_tmpfs) == []             # neither the name nor a temporary
    # What fits still works, every page of it really there.
    with rseq.Arena.create(str(small_tmpfs / "small"), capacity=8) as a:
        a.counter("x").add(5)
        assert a.values() == {"x": 5}


# ---------------------------------------------------------------------------
# Item 7: a failed create leaves nothing
# ---------------------------------------------------------------------------

def test_failure_building_the_map_leaves_nothing(tmp_path, monkeypatch):
    def broken(*args):
        raise MemoryError("simulated failure while building the arena map")
    monkeypatch.setattr(rseq.Arena, "_build_map", staticmethod(broken))
    with pytest.raises(MemoryError):
        rseq.Arena.create(str(tmp_path / "a"), capacity=16)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("limit", ["RLIMIT_AS", "RLIMIT_FSIZE"])
def test_create_under_a_resource_limit_leaves_nothing(tmp_path, limit):
    """Under RLIMIT_AS the mapping fails (ENOMEM), under RLIMIT_FSIZE the
    reservation (EFBIG): either way nothing is left, and the retry is free."""
    result = run_json(f"""
        import json, os, resource, signal
        import rseq
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        if {limit!r} == "RLIMIT_AS":
            with open("/proc/self/status") as f:
                vm = next(int(line.split()[1]) for line in f if line.startswith("VmSize"))
            cap = vm * 1024 + (48 << 20)
        else:
            cap = 1 << 20
        resource.setrlimit(resource.{limit}, (cap, resource.RLIM_INFINITY))
        try:
            rseq.Arena.create({str(tmp_path / "a")!r}, capacity=1 << 20)   # ~150 MB
            outcome = "created"
        except (OSError, MemoryError) as e:
            outcome = type(e).__name__ + ": " + str(e)
        print(json.dumps({{"outcome": outcome, "left": os.listdir({str(tmp_path)!r})}}))
    """)
    assert result["outcome"] != "created"
    assert result["left"] == []
    rseq.Arena.create(str(tmp_path / "a"), capacity=16).close()   # the name is free


# ---------------------------------------------------------------------------
# Item 13: names
# ---------------------------------------------------------------------------

def test_longest_names_work(tmp_path, request):
    longest = "n" * 255
    with rseq.Arena.create(str(tmp_path / longest), capacity=4) as a:
        a.counter("k").add()
    with rseq.Arena.open(str(tmp_path / longest)) as a:
        assert a.values() == {"k": 1}
    shm_name = f"{os.getpid()}-" + "s" * (255 - len(f"{os.getpid()}-"))
    request.addfinalizer(lambda: os.path.exists(f"/dev/shm/{shm_name}")
                         and os.unlink(f"/dev/shm/{shm_name}"))
    rseq.Arena.create(shm_name, capacity=4).close()
    rseq.Arena.unlink(shm_name)
    for name in ("n" * 256, str(tmp_path / ("n" * 256))):
        with pytest.raises(ValueError, match="at most 255"):
            rseq.Arena.create(name)
    assert sorted(os.listdir(tmp_path)) == [longest]


def test_file_exists_error_names_the_arena(path):
    rseq.Arena.create(path, capacity=4).close()
    with pytest.raises(FileExistsError) as info:
        rseq.Arena.create(path, capacity=4)
    assert str(info.value).startswith(f"[Errno 17] arena {path!r} already exists")
    assert ".tmp" not in str(info.value) and info.value.filename == path


def test_root_directory_is_not_a_name():
    before = set(os.listdir("/"))
    for name in ("/", "//", "/tmp/", "."):
        with pytest.raises(ValueError, match="names a directory"):
            rseq.Arena.create(name)
    assert set(os.listdir("/")) == before


# ---------------------------------------------------------------------------
# Item 4: name squatting: type, owner and mode are checked before opening
# ---------------------------------------------------------------------------

def _open_in_thread(target, **kwargs):
    """Arena.open in a thread: returns its exception, failing if it blocks."""
    out = []

    def run():
        try:
            rseq.Arena.open(target, **kwargs).close()
            out.append(None)
        except BaseException as e:   # handed to the test
            out.append(e)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(5)
    assert not t.is_alive(), f"Arena.open({target!r}, {kwargs}) blocked"
    return out[0]


@needs_root
def test_file_of_another_user_is_refused(path):
    rseq.Arena.create(path, capacity=4).close()
    os.chown(path, NOBODY, NOBODY)
    with pytest.raises(PermissionError, match=f"is owned by uid {NOBODY}, not by this "
                       r"process's uid 0 or root \(pass trust="):
        rseq.Arena.open(path)
    with pytest.raises(PermissionError, match=f"owned by uid {NOBODY}"):
        rseq.Arena.open(path, readonly=True)
    rseq.Arena.open(path, trust=NOBODY).close()
    name = __import__("pwd").getpwuid(NOBODY).pw_name
    rseq.Arena.open(path, trust=name, readonly=True).close()


def test_file_writable_by_others_is_refused(path):
    rseq.Arena.create(path, capacity=4).close()
    os.chmod(path, 0o666)
    with pytest.raises(PermissionError, match=r"is writable by every user \(mode 0o666\)"):
        rseq.Arena.open(path)
    os.chmod(path, 0o620)
    with pytest.raises(PermissionError, match=r"is writable by group \d+ \(mode 0o620; "
                       r"pass trust='group:NAME'"):
        rseq.Arena.open(path)
    group = __import__("grp").getgrgid(os.stat(path).st_gid).gr_name
    rseq.Arena.open(path, trust=f"group:{group}").close()
    os.chmod(path, 0o644)
    rseq.Arena.open(path).close()    # readable by others is fine


def test_symbolic_links_are_not_followed(tmp_path, path):
    rseq.Arena.create(path, capacity=4).close()
    for target in (path, "/dev/null"):
        link = tmp_path / "link"
        link.unlink(missing_ok=True)
        link.symlink_to(target)
        for readonly in (False, True):
            e = _open_in_thread(str(link), readonly=readonly)
            assert isinstance(e, PermissionError) and e.errno == errno.ELOOP
            assert "is a symbolic link" in str(e)


@pytest.mark.parametrize("kind", ["fifo", "directory", "socket", "device"])
def test_special_files_are_never_opened(tmp_path, kind):
    target = str(tmp_path / kind)
    if kind == "fifo":
        os.mkfifo(target, 0o600)
        expected = "a FIFO"
    elif kind == "directory":
        os.mkdir(target, 0o700)
        expected = "a directory"
    elif kind == "socket":
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(target)
        expected = "a socket"
    else:
        if os.geteuid() != 0:
            pytest.skip("mknod of a device needs root")
        os.mknod(target, 0o600 | stat.S_IFCHR, os.makedev(1, 3))   # /dev/null
        expected = "a device"
    for readonly in (False, True):
        e = _open_in_thread(target, readonly=readonly)
        assert isinstance(e, PermissionError), e
        assert f"arena {target!r} is {expected}, not a regular file" in str(e)


# ---------------------------------------------------------------------------
# Item 5: read-only opening
# ---------------------------------------------------------------------------

def _read_everything(a: rseq.Arena) -> dict:
    counter = a.counter("hits")
    return {"values": a.values(), "keys": a.keys(), "len": len(a), "in": "hits" in a,
            "absent": a.get("nothing") is None, "get": a.get("hits").value(),
            "value": counter.value(), "per_cpu": sum(counter.per_cpu()),
            "removed": counter.removed(), "fallback": counter.fallback_count(),
            "repr": repr(counter), "readonly": a.readonly}


def _write_attempts(a: rseq.Arena) -> list[str]:
    out = []
    for attempt in (lambda: a.counter("hits").add(), lambda: a.counter("hits").add(n=0),
                    lambda: a.counter("hits").reset(), lambda: a.counter("new"),
                    lambda: a._map.find(b"new", True)):
        try:
            attempt()
            out.append("no error")
        except rseq.ArenaError as e:
            out.append(str(e))
    return out


def _expect_read_only(seen: dict, errors: list[str], path: str) -> None:
    assert seen["values"] == {"hits": 7} and seen["keys"] == ["hits"] and seen["len"] == 1
    assert seen["in"] and seen["absent"] and seen["readonly"]
    assert seen["get"] == seen["value"] == 7 and seen["per_cpu"] == 10
    assert seen["removed"] == 3 and seen["fallback"] == 0
    assert seen["repr"] == "<rseq.ArenaCounter key='hits' value=7 read-only>"
    assert errors == [
        "add(): counter 'hits' is in an arena opened read-only",
        "add(): counter 'hits' is in an arena opened read-only",
        "reset(): counter 'hits' is in an arena opened read-only",
        f"arena {path!r} is open read-only: cannot create counter 'new'",
        "the arena is open read-only: no counter can be created in it",
    ]


def _populate(path: str) -> None:
    with rseq.Arena.create(path, capacity=8) as a:
        c = a.counter("hits")
        c.add(3)
        c.reset()
        c.add(7)


def test_read_only_reads_everything_and_writes_nothing(path):
    _populate(path)
    os.chmod(path, 0o400)     # even the owner has no write access now
    with rseq.Arena.open(path, readonly=True) as a:
        _expect_read_only(_read_everything(a), _write_attempts(a), path)
    with pytest.raises(PermissionError, match="for writing") if os.geteuid() else \
            _no_error():
        rseq.Arena.open(path).close()   # root ignores the mode; others need write access


class _no_error:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@needs_root
def test_read_only_by_another_user(request):
    """The creator (root here) makes the file 0644 to let a monitor read it;
    a process running as nobody reads every value and cannot write."""
    name = f"rseq-readonly-test-{os.getpid()}"
    path = f"/dev/shm/{name}"
    request.addfinalizer(lambda: os.path.exists(path) and os.unlink(path))
    _populate(name)
    os.chmod(path, 0o644)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            out: dict = {}
            try:
                rseq.Arena.open(name).close()
                out["rw"] = "opened for writing"
            except PermissionError as e:
                out["rw"] = str(e)
            try:
                with open(path, "r+b"):
                    out["raw"] = "opened for writing"
            except PermissionError:
                out["raw"] = "refused"
            with rseq.Arena.open(name, readonly=True) as a:
                out["seen"] = _read_everything(a)
                out["errors"] = _write_attempts(a)
            os.write(write_end, json.dumps(out).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    out = json.loads(data)
    assert out["rw"].startswith(f"[Errno 13] cannot open arena {path!r} for writing: "
                                f"Permission denied")
    assert out["raw"] == "refused"
    _expect_read_only(out["seen"], out["errors"], path)
    with rseq.Arena.open(name) as a:        # and nothing changed
        assert a.values() == {"hits": 7}


# ---------------------------------------------------------------------------
# Item 6: a damaged key table is reported the same way everywhere
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("where, bit, why", [
    ("hash", 40, r"its stored hash \d+ is not the hash \d+ of its key b'good'"),
    ("hash", 61, r"its stored hash \d+ is not the hash \d+ of its key b'good'"),
    ("tag", 62, "unknown tag"),
    ("tag", 63, "empty with bits set"),
    ("low", 3, "published with low bits set"),
    ("key", 0, r"its stored hash \d+ is not the hash \d+ of its key b'goo[^d]'"),
    ("key", 6, r"of its key b'g"),
    ("length", 1, r"(its stored hash|key length)"),
])
def test_damaged_entry_is_reported_everywhere(path, where, bit, why):
    with rseq.Arena.create(path, capacity=4) as a:
        a.counter("good").add(5)
        a.counter("other").add(1)
        layout = a._layout
        index = a._map.find(b"good")
    entry = _entry_offset(layout, index)
    offset, bit_in_byte = {"hash": (entry + bit // 8, bit % 8),
                           "tag": (entry + 7, bit - 56),
                           "low": (entry, bit),
                           "key": (entry + ENTRY_KEY + 3, bit),
                           "length": (entry + 8, bit)}[where]
    _flip(path, offset, bit_in_byte)
    message = rf"^arena entry {index} is corrupt \(.*{why}"
    with rseq.Arena.open(path) as a:
        for read in (a.keys, a.values, lambda: len(a), lambda: a.counter("good"),
                     lambda: a.get("good"), lambda: "good" in a):
            with pytest.raises(rseq.ArenaFormatError, match=message):
                read()
        assert a._entry_states()[index] == ("corrupt", 0)
    with rseq.Arena.open(path, readonly=True) as a, \
            pytest.raises(rseq.ArenaFormatError, match=message):
        a.values()


def test_flipped_hash_no_longer_splits_a_key(path):
    """The issue's reproduction: a flipped hash bit made keys() list the key
    twice and values() hide the real count.  Now nothing is created twice."""
    with rseq.Arena.create(path, capacity=64) as a:
        a.counter("requests").add(100)
        index = a._map.find(b"requests")
        layout = a._layout
    _flip(path, _entry_offset(layout, index) + 4, 2)
    with rseq.Arena.open(path) as a:
        with pytest.raises(rseq.ArenaFormatError, match=f"arena entry {index} is corrupt"):
            a.counter("requests").add()
        assert [s for s, _ in a._entry_states()].count("ready") == 0


# ---------------------------------------------------------------------------
# Item 11: membership never raises for what cannot be a key
# ---------------------------------------------------------------------------

def test_membership_of_non_keys_is_false(path):
    with rseq.Arena.create(path, capacity=4) as a:
        a.counter("k").add()
        for thing in ("", "x" * 100, "x" * 81, 5, None, b"k", "\udc80", ("k",), 1.5):
            assert (thing in a) is False
        assert "k" in a and "x" * 80 not in a


# ---------------------------------------------------------------------------
# Item 15: a stuck claim answers Ctrl-C, and get()/in never wait on it
# ---------------------------------------------------------------------------

@pytest.fixture
def stopped_process():
    pid = os.fork()
    if pid == 0:
        time.sleep(60)
        os._exit(0)
    os.kill(pid, signal.SIGSTOP)
    yield pid
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


def test_claim_identity_matches_procid(path):
    with rseq.Arena.create(path, capacity=4) as a:
        assert a._map.claim_identity() == (os.getpid(), _start_tag(os.getpid()))


def test_stuck_claim_lookups_do_not_wait(path, stopped_process):
    rseq.Arena.create(path, capacity=8).close()
    index = _claim(path, "busy", stopped_process, _start_tag(stopped_process), 8)
    with rseq.Arena.open(path) as a:
        assert a._map.entry_state(index) == ("claimed", stopped_process,
                                             _start_tag(stopped_process))
        start = time.monotonic()
        assert a.get("busy") is None and "busy" not in a and a.keys() == []
        assert time.monotonic() - start < 0.5
        with pytest.raises(rseq.ArenaError) as info:
            a._map.find(b"busy", True, 0.3)
        assert re.fullmatch(
            rf"waited 0\.3 s for arena entry {index}, where key 'busy' would be created: "
            rf"it stays claimed by live process {stopped_process} \(stopped\? it started "
            rf"at clock tick {_start_tag(stopped_process)} modulo 2\^24\)", str(info.value))


def test_stuck_claim_answers_ctrl_c(path, stopped_process):
    rseq.Arena.create(path, capacity=8).close()
    _claim(path, "busy", stopped_process, _start_tag(stopped_process), 8)
    result = run_json(f"""
        import json, os, signal, threading, time
        import rseq
        a = rseq.Arena.open({path!r})
        threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()
        start = time.monotonic()
        try:
            a.counter("busy")
            outcome = "returned"
        except KeyboardInterrupt:
            outcome = "KeyboardInterrupt"
        print(json.dumps({{"outcome": outcome, "after": time.monotonic() - start}}))
    """)
    assert result["outcome"] == "KeyboardInterrupt"
    assert result["after"] < 1.5, result     # not the 5 s claim timeout


def test_stuck_claim_runs_signal_handlers(path, stopped_process):
    class Interrupted(Exception):
        pass

    def handler(signum, frame):
        raise Interrupted
    rseq.Arena.create(path, capacity=8).close()
    _claim(path, "busy", stopped_process, _start_tag(stopped_process), 8)
    previous = signal.signal(signal.SIGALRM, handler)
    try:
        with rseq.Arena.open(path) as a:
            start = time.monotonic()
            signal.setitimer(signal.ITIMER_REAL, 0.2)
            with pytest.raises(Interrupted):
                a.counter("busy")
            assert time.monotonic() - start < 1.5
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_claim_of_a_recycled_pid_is_taken_over_at_once(path, stopped_process):
    """A live process with the claimant's pid but another start time is not
    the claimant: its claim is taken over without waiting for the timeout."""
    rseq.Arena.create(path, capacity=8).close()
    wrong = _start_tag(stopped_process) ^ 0x5a5a
    index = _claim(path, "busy", stopped_process, wrong, 8)
    with rseq.Arena.open(path) as a:
        start = time.monotonic()
        a.counter("busy").add(2)
        assert time.monotonic() - start < 0.5
        assert a._entry_states()[index] == ("ready", 0) and a.values() == {"busy": 2}


def test_claim_of_a_zombie_is_taken_over_at_once(path):
    rseq.Arena.create(path, capacity=8).close()
    zombie = os.fork()
    if zombie == 0:
        os._exit(0)
    try:
        deadline = time.monotonic() + 5
        while _procid.start_time(zombie) is not None and time.monotonic() < deadline:
            time.sleep(0.01)
        _claim(path, "busy", zombie, 1, 8)
        with rseq.Arena.open(path) as a:
            start = time.monotonic()
            a.counter("busy").add()
            assert time.monotonic() - start < 0.5
    finally:
        os.waitpid(zombie, 0)


# ---------------------------------------------------------------------------
# Item 12: the text of every error arena.c raises
# ---------------------------------------------------------------------------

def _layout_args(a: rseq.Arena) -> dict:
    lay = a._layout
    return dict(table_offset=lay.table_offset, entry_size=lay.entry_size, key_max=lay.key_max,
                capacity=lay.capacity, regions_offset=lay.regions_offset,
                region_size=lay.region_size, ncpu=lay.possible_cpus)


def _message(exc_type, call) -> str:
    with pytest.raises(exc_type) as info:
        call()
    text = str(info.value)
    assert "%" not in text, text
    return text


def test_every_layout_error_text(path):
    with rseq.Arena.create(path, capacity=16) as a:
        good = _layout_args(a)
        lay = a._layout
        size = lay.total_size

        def build(buffer=None, **bad):
            return lambda: rseq._core._ArenaMap(a._mmap if buffer is None else buffer,
                                                **(good | bad))
        fmt = rseq.ArenaFormatError
        assert _message(fmt, build(capacity=0)) == (
            "arena layout: capacity, CPU count and key size must be positive")
        assert _message(fmt, build(entry_size=32)) == (
            "arena layout: entry size 32 cannot hold a 80-byte key")
        assert _message(fmt, build(table_offset=7)) == (
            "arena layout: offsets must be 64-byte aligned")
        assert _message(fmt, build(regions_offset=lay.table_offset)) == (
            "arena layout: the key table overlaps the counters")
        assert _message(fmt, build(region_size=64)) == (
            "arena layout: a per-CPU region of 64 bytes cannot hold 16 counters")
        assert _message(fmt, build(region_size=1 << 62, ncpu=8)) == (
            f"arena layout: 8 CPU regions of {1 << 62} bytes from offset "
            f"{lay.regions_offset} pass the 64-bit range")
        assert _message(fmt, build(ncpu=lay.possible_cpus + 64)) == (
            f"arena layout: {lay.regions_offset + (lay.possible_cpus + 64) * lay.region_size}"
            f" bytes needed, the mapping has {size}")
        spare = mmap.mmap(-1, size + 4096)
        assert _message(fmt, build(memoryview(spare)[1:])) == (
            "arena mapping is not 64-byte aligned")
        m = rseq._core._ArenaMap(a._mmap, **good)
        assert _message(TypeError, lambda: m.find("text")) == (
            "key must be bytes (UTF-8 of the key)")
        assert _message(ValueError, lambda: m.find(b"")) == (
            "key of 0 bytes: keys take 1 to 80 bytes of UTF-8")
        assert _message(ValueError, lambda: m.find(b"k" * 81)) == (
            "key of 81 bytes: keys take 1 to 80 bytes of UTF-8")
        assert _message(IndexError, lambda: m.entry_state(16)) == (
            "entry 16 out of range (capacity 16)")
        assert _message(IndexError, lambda: m.counter(16, "x")) == (
            "counter 16 out of range (capacity 16)")
        assert _message(ValueError, lambda: m.counter(3, "x")) == (
            "arena entry 3 is not a published counter")
        with pytest.raises(BufferError):
            rseq._core._ArenaMap(b"read-only bytes", **good)
        read_only = mmap.mmap(-1, size, prot=mmap.PROT_READ)
        with pytest.raises(BufferError):
            rseq._core._ArenaMap(read_only, **good)
        rseq._core._ArenaMap(read_only, **good, readonly=True)   # read-only is fine


def test_every_entry_error_text(path):
    with rseq.Arena.create(path, capacity=2) as a:
        a.counter("a")
        a.counter("b")
        assert _message(rseq.ArenaFullError, lambda: a.counter("c")) == (
            "the arena is full: all 2 counters are in use")
        layout = a._layout
        index = a._map.find(b"a")
    entry = _entry_offset(layout, index)
    states = {
        (3 << 62): "unknown tag",
        1: "empty with bits set",
        (1 << 62): "claimed by pid 0",
        (2 << 62) | (_fnv1a64(b"a") >> 34 << 32) | 5: "published with low bits set",
    }
    for state, why in states.items():
        with open(path, "r+b") as f:
            f.seek(entry)
            f.write(struct.pack("<Q", state))
        with rseq.Arena.open(path) as a:
            text = _message(rseq.ArenaFormatError, a.keys)
            assert text == f"arena entry {index} is corrupt (state {state:#x}: {why})"
    with open(path, "r+b") as f:
        f.seek(entry)
        f.write(struct.pack("<QI", (2 << 62) | (_fnv1a64(b"a") >> 34 << 32), 10_000))
    with rseq.Arena.open(path) as a:
        assert _message(rseq.ArenaFormatError, a.keys) == (
            f"arena entry {index} is corrupt (key length 10000, at most 80)")
    ready = (2 << 62) | ((_fnv1a64(b"a") >> 34) ^ 1) << 32
    with open(path, "r+b") as f:
        f.seek(entry)
        f.write(struct.pack("<QI", ready, 1))
    with rseq.Arena.open(path) as a:
        assert _message(rseq.ArenaFormatError, a.keys) == (
            f"arena entry {index} is corrupt (state {ready:#x}: its stored hash "
            f"{(_fnv1a64(b'a') >> 34) ^ 1} is not the hash {_fnv1a64(b'a') >> 34} of its "
            f"key b'a')")

