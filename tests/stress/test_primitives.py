"""The per-CPU primitives of csrc/percpu.h, validated through tests/c/param_test.c.

param_test is built twice per session into tests/_build/: a test build
(-DRSEQ_INJECT=1, delay loops at every injection point) and a release build.
Each case runs one primitive with more workers than CPUs under one kind of
disturbance and checks exact totals (param_test prints OK and exits 0;
77 means a capability is missing and the case is skipped).  The whole file
runs in well under a minute; the long sweep is `param_test` by hand.
"""
from __future__ import annotations

import os
import platform
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from rseq import _inject

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "tests" / "_build"
# The thin main, the workload it shares with rseq._inject, and the package's
# registration and CPU discovery (no copy of either in the test).
SOURCES = [ROOT / "tests" / "c" / "param_test.c", ROOT / "csrc" / "testing" / "workload.c",
           ROOT / "csrc" / "lib" / "registration.c", ROOT / "csrc" / "lib" / "cpus.c"]
CFLAGS = ["-std=gnu11", "-O2", "-Wall", "-Wextra", "-Werror", "-pthread",
          "-I", str(ROOT / "csrc" / "lib"), "-I", str(ROOT / "csrc" / "testing"),
          "-I", str(ROOT / "src" / "rseq" / "include")]

PRIMITIVES = ["counter", "cbne", "bov", "list", "store_store", "memcpy"]
# param_test's name of each primitive in the injection-point table.
TABLE_NAME = {"counter": "add"}
# Every window inside the sequence (the asm points of the table) and one C
# window before it: 7 (after the index read) for the counting primitives, 8
# (after the C read of the list head or log length) for the others.
C_WINDOW = {"counter": 7, "cbne": 7, "bov": 7, "list": 8, "store_store": 8, "memcpy": 8}


def _points(primitive: str) -> list[int]:
    passed = _inject.INJECTION_POINTS[TABLE_NAME.get(primitive, primitive)]
    assert C_WINDOW[primitive] in passed
    return [p for p in passed if p < 7] + [C_WINDOW[primitive]]


POINTS = {p: _points(p) for p in PRIMITIVES}
DISTURBANCES = {
    "yield": ["-y", "-e", "20"],
    "signal_storm": ["-S", "5"],
    "sleep": ["-s", "-e", "300", "-u", "200"],
}
NO_GLIBC_RSEQ = {"GLIBC_TUNABLES": "glibc.pthread.rseq=0"}
RSEQ_SIG = 0x53053053

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or shutil.which("gcc") is None,
    reason="needs Linux and gcc")


def _compile(output: Path, *extra: str) -> Path:
    BUILD.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["gcc", *CFLAGS, *extra, *map(str, SOURCES), "-o", str(output),
                           "-ldl"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return output


@pytest.fixture(scope="session")
def test_build() -> Path:
    return _compile(BUILD / "param_test", "-DRSEQ_INJECT=1")


@pytest.fixture(scope="session")
def release_build() -> Path:
    return _compile(BUILD / "param_test_release")


@pytest.fixture(scope="session")
def release_object() -> Path:
    # One relocatable object of every source: nothing linked in from libc.
    return _compile(BUILD / "param_test_release.o", "-r", "-nostdlib")


@pytest.fixture(scope="session")
def release_nopie() -> Path:
    # Absolute addresses in the descriptors, so they can be read from the file.
    return _compile(BUILD / "param_test_nopie", "-no-pie", "-fno-pie")


def run(binary: Path, *args: str, env: dict[str, str] | None = None,
        expect_ok: bool = True) -> subprocess.CompletedProcess[str]:
    full_env = dict(os.environ)
    full_env.pop("GLIBC_TUNABLES", None)
    full_env.update(env or {})
    proc = subprocess.run([str(binary), *args], capture_output=True, text=True,
                          env=full_env, timeout=120)
    if proc.returncode == 77:
        pytest.skip(proc.stdout.strip() or "skipped by param_test")
    if expect_ok:
        assert proc.returncode == 0 and proc.stdout.rstrip().endswith("OK"), (
            f"{binary.name} {' '.join(args)} -> {proc.returncode}\n{proc.stdout}{proc.stderr}")
    return proc


def stat(proc: subprocess.CompletedProcess[str], name: str) -> int:
    match = re.search(rf"\b{name}=(\d+)", proc.stdout)
    assert match, proc.stdout
    return int(match.group(1))


def workers() -> int:
    return max(6, 3 * (os.cpu_count() or 1))


# ---------------------------------------------------------------------------
# The matrix
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("disturbance", DISTURBANCES)
@pytest.mark.parametrize("primitive,point",
                         [(p, n) for p in PRIMITIVES for n in POINTS[p]])
def test_injected_delay(test_build, primitive, point, disturbance):
    in_sequence = point < 7
    extra = list(DISTURBANCES[disturbance])
    if in_sequence and disturbance == "signal_storm":
        extra.append("-A")  # a widened window under a storm must see aborts
    run(test_build, "-T", primitive, "-t", str(workers()), "-r", "20000",
        f"-{point}", "3000" if in_sequence else "300", *extra)


@pytest.mark.parametrize("primitive", PRIMITIVES)
def test_migration_and_signals(test_build, primitive):
    run(test_build, "-T", primitive, "-t", str(workers()), "-r", "20000",
        "-3", "800", "-4", "800", "-m", "200", "-S", "50")


@pytest.mark.parametrize("primitive", PRIMITIVES)
def test_mm_cid_index(test_build, primitive):
    run(test_build, "-T", primitive, "-M", "mm_cid", "-t", str(workers()), "-r", "20000",
        "-3", "800", "-m", "200", "-S", "50", "-k", "-e", "200", env=NO_GLIBC_RSEQ)


@pytest.mark.parametrize("registration", ["glibc", "own"])
@pytest.mark.parametrize("primitive", PRIMITIVES)
def test_processes(test_build, primitive, registration):
    env = NO_GLIBC_RSEQ if registration == "own" else None
    run(test_build, "-T", primitive, "-P", "3", "-t", "2", "-r", "20000",
        "-4", "800", "-m", "300", "-S", "50", env=env)


@pytest.mark.parametrize("shape", ["threads", "processes"])
@pytest.mark.parametrize("primitive", PRIMITIVES)
def test_fallback(test_build, primitive, shape):
    layout = ["-t", str(workers())] if shape == "threads" else ["-P", "3", "-t", "2"]
    run(test_build, "-F", "-T", primitive, *layout, "-r", "10000",
        "-7", "200", "-y", "-e", "50", "-m", "200", "-S", "50")


@pytest.mark.parametrize("primitive", PRIMITIVES)
def test_release_build_exact(release_build, primitive):
    run(release_build, "-T", primitive, "-t", str(workers()), "-r", "100000",
        "-m", "300", "-S", "100")


# ---------------------------------------------------------------------------
# The sequences really abort, and the check really checks
# ---------------------------------------------------------------------------

def test_sequences_abort_and_stay_exact(test_build):
    # A long window right before the commit plus a dense signal storm: the
    # kernel must abort sequences (a wrong signature would SIGSEGV instead),
    # and the counter must still be exact (including the handlers' adds).
    proc = run(test_build, "-T", "counter", "-t", "4", "-r", "3000", "-4", "20000",
               "-S", "5", "-A")
    assert stat(proc, "aborts") > 0
    assert stat(proc, "signals") > 0
    assert stat(proc, "handler_adds") == stat(proc, "signals")


def test_check_catches_lost_updates(test_build):
    proc = run(test_build, "-B", "-t", str(workers()), "-r", "200000", "-8", "100",
               expect_ok=False)
    assert proc.returncode == 1 and "FAIL" in proc.stdout, proc.stdout


def test_mm_cid_refused_under_glibc_registration(test_build):
    probe = run(test_build, "-T", "counter", "-r", "10")
    if "registration=glibc" not in probe.stdout:
        pytest.skip("glibc does not register rseq here")
    proc = subprocess.run([str(test_build), "-M", "mm_cid"], capture_output=True, text=True,
                          env={k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"})
    assert proc.returncode == 77 and "mm_cid not usable" in proc.stdout


# ---------------------------------------------------------------------------
# The release build carries no injection; the descriptors obey the ABI
# ---------------------------------------------------------------------------

def test_release_object_has_no_injection(release_object, test_build):
    symbols = subprocess.run(["nm", str(release_object)], capture_output=True, text=True,
                             check=True).stdout
    assert "rseq_inject" not in symbols
    disasm = subprocess.run(["objdump", "-dr", str(release_object)], capture_output=True,
                            text=True, check=True).stdout
    assert "rseq_inject" not in disasm
    # and the test build does have them (the check above can fail)
    assert "rseq_inject_loops" in subprocess.run(
        ["nm", str(test_build)], capture_output=True, text=True, check=True).stdout


def _sections(binary: Path) -> dict[str, tuple[int, int, int]]:
    """name -> (address, file offset, size) from readelf."""
    out = subprocess.run(["readelf", "-SW", str(binary)], capture_output=True, text=True,
                         check=True).stdout
    sections = {}
    for line in out.splitlines():
        m = re.match(r"\s*\[\s*\d+\]\s+(\S+)\s+\S+\s+([0-9a-f]+)\s+([0-9a-f]+)\s+([0-9a-f]+)",
                     line)
        if m:
            sections[m.group(1)] = (int(m.group(2), 16), int(m.group(3), 16),
                                    int(m.group(4), 16))
    return sections


@pytest.mark.skipif(platform.machine() != "x86_64", reason="x86-64 sequences")
def test_descriptors_obey_the_abi(release_nopie):
    data = release_nopie.read_bytes()
    sections = _sections(release_nopie)
    cs_addr, cs_off, cs_size = sections["__rseq_cs"]
    assert cs_addr % 32 == 0 and cs_size % 32 == 0 and cs_size > 0

    def read(addr: int, size: int) -> bytes:
        for start, off, length in sections.values():
            if start and start <= addr and addr + size <= start + length:
                return data[off + addr - start: off + addr - start + size]
        raise AssertionError(f"address {addr:#x} in no section")

    disasm = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(release_nopie)],
                            capture_output=True, text=True, check=True).stdout
    instructions = {int(m.group(1), 16): m.group(2).strip()
                    for m in re.finditer(r"^\s*([0-9a-f]+):\s+(.*)$", disasm, re.M)}
    ordered = sorted(instructions)
    descriptors = cs_size // 32
    assert descriptors >= 6  # one per primitive at least
    for i in range(descriptors):
        version, flags, start, length, abort = struct.unpack_from(
            "<IIQQQ", data, cs_off + 32 * i)
        assert version == 0 and flags == 0
        assert length > 0
        assert not start <= abort < start + length, "abort_ip inside the range"
        assert struct.unpack("<I", read(abort - 4, 4))[0] == RSEQ_SIG
        assert start in instructions and abort in instructions
        # The last instruction of the range is the single committing store.
        end = start + length
        last = max(a for a in ordered if a < end)
        nxt = min((a for a in ordered if a >= end), default=end)
        assert nxt == end, "range does not end on an instruction boundary"
        # A store through %r13 or %rbp is encoded with a zero displacement.
        store = r"mov[qb]?\s+%\w+,(?:0x0)?\(%\w+\)$"
        assert re.match(store, instructions[last]), instructions[last]
