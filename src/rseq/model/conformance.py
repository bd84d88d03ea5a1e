"""Conformance: registration cases run against this machine's kernel and
against the linux-6.3 model, which must agree on every case.

Each case is a short list of operations (rseq(2) calls, memory set-up,
reads, a new thread, fork, exec).  On the kernel every case runs in a fresh
subprocess that ends with ``os._exit()`` right after it, because a thread
whose registered area goes away is killed on its next return to user space.
Cases that need a thread without glibc's registration run with
``GLIBC_TUNABLES=glibc.pthread.rseq=0``.  The outcome is the list of
results, ending with ``SIGSEGV`` when the process was killed.

The model predicts the same list with the linux-6.3 variant (feature size
28, alignment 32: this machine's auxv).  When an outcome depends on
something the model does not know (timing, for instance) it says
``undecided`` and why.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from . import _abi
from ._machine import Killed, Machine
from .variants import VARIANTS

SIG = _abi.SIGNATURE_X86
OTHER_SIG = 0x12345678
FREE = "free"  # glibc's registration switched off
GLIBC = "glibc"  # the thread glibc registered

# model addresses of the regions a case can name (page aligned like mmap)
_MODEL_BASE = {"A": 0x7F0000100000, "B": 0x7F0000200000, "R": 0x7F0000300000,
               "N": 0x7F0000400000, "U": 0x7F0000500000, "G": 0x7F0000600000,
               "glibc": 0x7F0000700000 + 2336}
_MAP_SIZE = 8192


@dataclass(frozen=True)
class Case:
    """``ops``: ("rseq", ref, length, flags, sig) | ("write64", ref, value) |
    ("read32", ref) | ("read64", ref) | ("protect", region, perm) |
    ("munmap", region) | ("thread", op) | ("fork",) | ("exec",).
    A ref is (region, offset) with region one of A, B (read-write), R
    (made read-only after set-up), N (PROT_NONE), U (unmapped), G (a page
    followed by a guard page; offsets count from the guard), glibc (the
    area glibc registered), null, or abs (an absolute address)."""

    name: str
    doc: str
    env: str
    ops: tuple

    def regions(self) -> set[str]:
        out = set()

        def walk(op):
            if op[0] == "thread":
                walk(op[1])
                return
            for arg in op[1:]:
                if isinstance(arg, tuple) and arg and isinstance(arg[0], str):
                    out.add(arg[0])
                elif isinstance(arg, str) and arg in _MODEL_BASE:
                    out.add(arg)

        for op in self.ops:
            walk(op)
        return out


def _reg(ref, length=32, flags=0, sig=SIG):
    return ("rseq", ref, length, flags, sig)


A = ("A", 0)
B = ("B", 0)
UNREG = _abi.FLAG_UNREGISTER

CASES: list[Case] = [
    Case("register-32", "a 32-byte, 32-aligned area", FREE, (_reg(A),)),
    Case("register-same-again", "the same registration twice: EBUSY", FREE, (_reg(A), _reg(A))),
    Case("register-same-other-signature", "same area, other signature: EPERM", FREE,
         (_reg(A), _reg(A, sig=OTHER_SIG))),
    Case("register-same-other-length", "same area, other length: EINVAL", FREE,
         (_reg(A), _reg(A, 64))),
    Case("register-other-area", "a second area for a registered thread: EINVAL", FREE,
         (_reg(A), _reg(B))),
    Case("unregister", "unregister resets cpu_id to -1 (uninitialised)", FREE,
         (_reg(A), _reg(A, flags=UNREG), ("read32", ("A", 4)))),
    Case("unregister-other-length", "unregister with another length: EINVAL", FREE,
         (_reg(A), _reg(A, 64, UNREG))),
    Case("unregister-other-signature", "unregister with another signature: EPERM", FREE,
         (_reg(A), _reg(A, flags=UNREG, sig=OTHER_SIG))),
    Case("unregister-other-area", "unregister another area: EINVAL", FREE,
         (_reg(A), _reg(B, flags=UNREG))),
    Case("unregister-unregistered", "unregister without a registration: EINVAL", FREE,
         (_reg(A, flags=UNREG),)),
    Case("unregister-extra-flag", "unregister with an unknown flag too: EINVAL", FREE,
         (_reg(A), _reg(A, flags=UNREG | 2))),
    Case("null-zero", "rseq(NULL, 0, 0, 0): EINVAL on a kernel with rseq", FREE,
         (_reg(("null", 0), 0, 0, 0),)),
    Case("null-32", "NULL with a valid length: EFAULT", FREE, (_reg(("null", 0)),)),
    Case("length-20", "shorter than 32: EINVAL", FREE, (_reg(A, 20),)),
    Case("length-31", "shorter than 32: EINVAL", FREE, (_reg(A, 31),)),
    Case("length-33", "an extended length (>= feature size, aligned)", FREE, (_reg(A, 33),)),
    Case("length-64", "an extended length", FREE, (_reg(A, 64),)),
    Case("length-4096", "a long extended length", FREE, (_reg(A, 4096),)),
    Case("unaligned-4", "32 bytes at +4: EINVAL", FREE, (_reg(("A", 4)),)),
    Case("aligned-16-length-64", "64 bytes at +16 (AT_RSEQ_ALIGN is 32): EINVAL", FREE,
         (_reg(("A", 16), 64),)),
    Case("aligned-32-length-64", "64 bytes at +32", FREE, (_reg(("A", 32), 64),)),
    Case("flag-unknown", "an unknown flag: EINVAL", FREE, (_reg(A, flags=4),)),
    Case("flag-slice-default-on", "RSEQ_FLAG_SLICE_EXT_DEFAULT_ON before Linux 7.0: EINVAL", FREE,
         (_reg(A, flags=2),)),
    Case("signature-zero", "any signature is accepted", FREE, (_reg(A, sig=0),)),
    Case("unmapped", "an unmapped area: EFAULT", FREE, (_reg(("U", 0)),)),
    Case("prot-none", "a PROT_NONE area: EFAULT (rseq_cs cannot be read)", FREE, (_reg(("N", 0)),)),
    Case("read-only", "a read-only area: accepted, then SIGSEGV writing cpu_id on return", FREE,
         (_reg(("R", 0)),)),
    Case("read-only-stale-rseq_cs",
         "a read-only area with a stale rseq_cs: EFAULT (cannot clear)", FREE,
         (("write64", ("R", 8), 0x1000), ("protect", "R", "r"), _reg(("R", 0)))),
    Case("stale-rseq_cs-cleared", "registration clears a stale rseq_cs", FREE,
         (("write64", ("A", 8), 0x1000), _reg(A), ("read64", ("A", 8)))),
    Case("kernel-address", "an address in the kernel half: EFAULT", FREE,
         (_reg(("abs", 0xFFFFFFFFFF600000)),)),
    Case("end-of-user-space", "an area ending past TASK_SIZE: EFAULT", FREE,
         (_reg(("abs", _abi.TASK_SIZE - 32), 64),)),
    Case("into-guard-page", "64 bytes whose second half is a guard page: accepted", FREE,
         (_reg(("G", -32), 64),)),
    Case("thread-same-area",
         "registration is per thread: another thread may register the same area", FREE,
         (_reg(A), ("thread", _reg(A)))),
    Case("thread-starts-unregistered", "a new thread has no registration", FREE,
         (_reg(A), ("thread", _reg(A, flags=UNREG)))),
    Case("fork-keeps", "fork: the child keeps the registration", FREE,
         (_reg(A), ("fork",), _reg(A))),
    Case("exec-drops", "exec: the new image has no registration", FREE,
         (_reg(A), ("exec",), _reg(A, flags=UNREG))),
    Case("unmap-after-register",
         "the area unmapped while registered: killed at the next event", FREE,
         (_reg(A), ("munmap", "A"))),
    Case("glibc-register-another", "glibc registered the thread: another area is EINVAL", GLIBC,
         (_reg(A),)),
    Case("glibc-register-same", "glibc's own area again: EBUSY", GLIBC, (_reg(("glibc", 0)),)),
    Case("glibc-same-other-signature", "glibc's area, other signature: EPERM", GLIBC,
         (_reg(("glibc", 0), sig=OTHER_SIG),)),
    Case("glibc-unregister-other-signature",
         "unregister glibc's area with another signature: EPERM", GLIBC,
         (_reg(("glibc", 0), flags=UNREG, sig=OTHER_SIG),)),
    Case("glibc-unregister-other-length",
         "unregister glibc's area with another length: EINVAL", GLIBC,
         (_reg(("glibc", 0), 64, UNREG),)),
]


# ====================================================================== the model


class Undecided(Exception):
    pass


def predict(case: Case, variant="linux-6.3") -> list[str]:
    """The outcome the model gives for ``case`` (a variant name or object);
    raises Undecided when the model cannot tell."""
    variant = VARIANTS[variant] if isinstance(variant, str) else variant
    m = Machine(variant, ncpus=2)
    regions = case.regions() | {"A"} | ({"glibc"} if case.env == GLIBC else set())
    for region in regions:
        base = _MODEL_BASE.get(region)
        if region in ("A", "B", "R"):
            m.map(region, base, _MAP_SIZE, "rw")
        elif region == "N":
            m.map(region, base, _MAP_SIZE, "")
        elif region == "G":
            m.map(region, base, 4096, "rw")  # the guard page after it is unmapped
        elif region == "glibc":
            m.map("glibc-tls", base - 2336, 4096, "rw")
    t = m.add_thread("T1", None, None)
    m.schedule_in(t, 0)
    if case.env == GLIBC:
        assert variant.sys_rseq(m, t, _MODEL_BASE["glibc"], 32, 0, SIG) == 0
        m.return_to_user(t)
    if "R" in case.regions() and not any(op[0] == "protect" for op in case.ops):
        m.protect(_MODEL_BASE["R"], "r")
    out: list[str] = []
    try:
        _model_ops(m, t, case.ops, out)
    except Killed:
        out.append("SIGSEGV")
    return out


def _addr(ref) -> int:
    region, offset = ref
    if region == "null":
        return offset
    if region == "abs":
        return offset
    if region == "G":
        return _MODEL_BASE["G"] + 4096 + offset
    return _MODEL_BASE[region] + offset


def _model_ops(m: Machine, t, ops, out: list[str]) -> None:
    variant = m.variant
    for i, op in enumerate(ops):
        kind = op[0]
        if kind == "rseq":
            _, ref, length, flags, sig = op
            result = variant.sys_rseq(m, t, _addr(ref), length, flags, sig)
            m.return_to_user(t, from_syscall=True)  # may kill
            out.append(_abi.errno_name(result))
        elif kind == "write64":
            m.memory[_addr(op[1])] = op[2]
        elif kind in ("read32", "read64"):
            addr = _addr(op[1])
            if not m.accessible(addr, 4, False):
                raise Killed("read fault")
            out.append(str(m.read(addr)))
        elif kind == "protect":
            m.protect(_MODEL_BASE[op[1]], op[2])
        elif kind == "munmap":
            raise Undecided(
                "the kernel writes the area again only after a preemption, migration or signal; "
                "whether one comes before the process exits is timing"
            )
        elif kind == "thread":
            other = m.add_thread(f"T{len(m.threads) + 1}", None, None)
            m.schedule_in(other, 1)
            _model_ops(m, other, (op[1],), out)
            other.k["status"] = "exit"  # the kernel forgets its registration
        elif kind == "fork":
            child = m.add_thread(f"T{len(m.threads) + 1}", None, None)
            variant.fork(m, t, child)
            m.switch_out(t, 1)
            m.schedule_in(child, 0)
            _model_ops(m, child, ops[i + 1:], out)
            return
        elif kind == "exec":
            variant.exec(m, t)
            for region in list(m.regions):
                m.unmap(region.start)
        else:
            raise Undecided(f"the model has no operation {kind!r}")


# ====================================================================== the kernel


def _raw_rseq_impl():
    """The raw rseq(2) wrapper: the test build's (rseq._inject, shipped for
    this), or ctypes when it is not importable.  Returns (function, name)."""
    try:
        from rseq import _inject

        return _inject.rseq_syscall, "rseq._inject.rseq_syscall"
    except (ImportError, AttributeError):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long

        def call(address: int, length: int, flags: int, signature: int) -> int:
            r = libc.syscall(_abi.SYSCALLS["rseq"], ctypes.c_void_p(address),
                             ctypes.c_uint32(length), ctypes.c_int(flags),
                             ctypes.c_uint32(signature))
            return -ctypes.get_errno() if r < 0 else r

        return call, f"ctypes syscall({_abi.SYSCALLS['rseq']})"


def _raw_rseq(address: int, length: int, flags: int, sig: int) -> int:
    return _raw_rseq_impl()[0](address, length, flags, sig)


_CHILD = "import sys; from rseq.model.conformance import _child; _child(sys.argv[1])"


def _child(payload: str) -> None:
    """Runs one case in this (fresh) process; prints one JSON line per result."""
    import ctypes
    import mmap
    import threading

    spec = json.loads(payload)
    call, _ = _raw_rseq_impl()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
    keep = []
    bases: dict[str, int] = {}

    def new_map(size: int) -> int:
        m = mmap.mmap(-1, size)
        keep.append(m)
        return ctypes.addressof(ctypes.c_char.from_buffer(m))

    for region in spec["regions"]:
        if region in ("A", "B", "R", "N"):
            bases[region] = new_map(_MAP_SIZE)
            if region == "N":
                libc.mprotect(bases[region], _MAP_SIZE, 0)
        elif region == "U":
            m = mmap.mmap(-1, _MAP_SIZE)
            addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
            bases[region] = addr
            libc.munmap(addr, _MAP_SIZE)  # the mmap object is leaked on purpose
            keep.append(m)
        elif region == "G":
            base = new_map(2 * 4096)
            libc.mprotect(base + 4096, 4096, 0)
            # a guard page is "unmapped" for the model: nothing may touch it
            bases[region] = base + 4096
        elif region == "glibc":
            fs = ctypes.c_ulong()
            # arch_prctl(ARCH_GET_FS): the thread pointer (x86-64, as the model)
            libc.syscall(_abi.SYSCALLS["arch_prctl"], 0x1003, ctypes.byref(fs))
            offset = ctypes.c_ssize_t.in_dll(libc, "__rseq_offset").value
            bases[region] = fs.value + offset
    if "R" in spec["regions"] and not any(op[0] == "protect" for op in spec["ops"]):
        libc.mprotect(bases["R"], _MAP_SIZE, 1)

    def addr(ref) -> int:
        region, offset = ref
        if region in ("null", "abs"):
            return offset
        return bases[region] + offset

    def emit(value) -> None:
        os.write(1, (json.dumps(value) + "\n").encode())

    def run(ops) -> None:
        for i, op in enumerate(ops):
            kind = op[0]
            if kind == "rseq":
                _, ref, length, flags, sig = op
                emit(_abi.errno_name(call(addr(ref), length, flags, sig)))
            elif kind == "write64":
                ctypes.c_uint64.from_address(addr(op[1])).value = op[2]
            elif kind == "read32":
                emit(str(ctypes.c_uint32.from_address(addr(op[1])).value))
            elif kind == "read64":
                emit(str(ctypes.c_uint64.from_address(addr(op[1])).value))
            elif kind == "protect":
                libc.mprotect(bases[op[1]], _MAP_SIZE, 1 if op[2] == "r" else 3)
            elif kind == "munmap":
                libc.munmap(bases[op[1]], _MAP_SIZE)
            elif kind == "thread":
                th = threading.Thread(target=run, args=((op[1],),))
                th.start()
                th.join()
            elif kind == "fork":
                pid = os.fork()
                if pid == 0:
                    run(ops[i + 1:])
                    os._exit(0)
                _, status = os.waitpid(pid, 0)
                if os.WIFSIGNALED(status):
                    emit(signal.Signals(os.WTERMSIG(status)).name)
                return
            elif kind == "exec":
                rest = [_absolute(o, addr) for o in ops[i + 1:]]
                payload = json.dumps({"regions": [], "ops": rest})
                os.execv(sys.executable, [sys.executable, "-c", _CHILD, payload])

    run(spec["ops"])
    os._exit(0)


def _absolute(op, addr):
    op = list(op)
    for j, arg in enumerate(op):
        if isinstance(arg, (list, tuple)) and len(arg) == 2 and isinstance(arg[0], str):
            op[j] = ["abs", addr(arg)]
    return op


def run_on_kernel(case: Case) -> list[str]:
    env = dict(os.environ)
    if case.env == FREE:
        env["GLIBC_TUNABLES"] = "glibc.pthread.rseq=0"
    else:
        env.pop("GLIBC_TUNABLES", None)
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = package_root + os.pathsep + env.get("PYTHONPATH", "")
    payload = json.dumps({"regions": sorted(case.regions() | {"A"}), "ops": case.ops})
    proc = subprocess.run([sys.executable, "-c", _CHILD, payload], env=env, capture_output=True,
                          text=True, timeout=60)
    out = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    if proc.returncode < 0:
        out.append(signal.Signals(-proc.returncode).name)
    elif proc.returncode != 0:
        out.append(f"error: exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}")
    return out


# ====================================================================== report


@dataclass
class Row:
    case: Case
    kernel: list[str]
    model: list[str] | None
    undecided: str | None = None

    @property
    def verdict(self) -> str:
        if self.undecided is not None:
            return "undecided"
        return "agree" if self.kernel == self.model else "DISAGREE"


@dataclass
class Report:
    rows: list[Row]
    wrapper: str
    variant: str
    kernel_release: str
    elapsed: float
    auxv: dict = field(default_factory=dict)

    @property
    def agree(self) -> bool:
        return all(r.verdict != "DISAGREE" for r in self.rows)

    def counts(self) -> dict[str, int]:
        out = {"agree": 0, "DISAGREE": 0, "undecided": 0}
        for r in self.rows:
            out[r.verdict] += 1
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "wrapper": self.wrapper,
            "variant": self.variant,
            "kernel": self.kernel_release,
            "auxv": self.auxv,
            "elapsed": round(self.elapsed, 3),
            "agree": self.agree,
            "counts": self.counts(),
            "cases": [
                {
                    "name": r.case.name,
                    "doc": r.case.doc,
                    "env": r.case.env,
                    "kernel": r.kernel,
                    "model": r.model,
                    "verdict": r.verdict,
                    "undecided": r.undecided,
                }
                for r in self.rows
            ],
        }

    def format(self) -> str:
        lines = [
            f"conformance: kernel {self.kernel_release} (via {self.wrapper}) "
            f"against the {self.variant} model "
            f"(AT_RSEQ_FEATURE_SIZE {self.auxv.get('feature_size')}, "
            f"AT_RSEQ_ALIGN {self.auxv.get('align')})",
            f"{'case':34} {'env':6} {'kernel':24} {'model':24} verdict",
        ]
        for r in self.rows:
            model = " ".join(r.model) if r.model is not None else "-"
            lines.append(f"{r.case.name:34} {r.case.env:6} {' '.join(r.kernel):24} "
                         f"{model:24} {r.verdict}")
            if r.undecided:
                lines.append(f"{'':34} model undecided: {r.undecided}")
        c = self.counts()
        lines.append(
            f"{len(self.rows)} cases: {c['agree']} agree, {c['DISAGREE']} disagree, "
            f"{c['undecided']} undecided "
            f"({self.elapsed:.1f} s)"
        )
        return "\n".join(lines)


def _auxv() -> dict[str, int]:
    import ctypes

    libc = ctypes.CDLL(None)
    libc.getauxval.restype = ctypes.c_ulong
    libc.getauxval.argtypes = (ctypes.c_ulong,)
    return {"feature_size": libc.getauxval(_abi.AT_RSEQ_FEATURE_SIZE),
            "align": libc.getauxval(_abi.AT_RSEQ_ALIGN)}


def conformance(only: list[str] | None = None, variant: str = "linux-6.3") -> Report:
    """Run the case table on this kernel and in the model; see Report."""
    started = time.perf_counter()
    auxv = _auxv()
    model_variant = VARIANTS[variant]
    if auxv["feature_size"] and variant == "linux-6.3":
        # the model takes this machine's feature size and alignment
        model_variant = type(model_variant)()
        model_variant.feature_size = auxv["feature_size"]
        model_variant.align = auxv["align"]
    rows = []
    for case in CASES:
        if only and case.name not in only:
            continue
        kernel = run_on_kernel(case)
        try:
            rows.append(Row(case, kernel, predict(case, model_variant)))
        except Undecided as why:
            rows.append(Row(case, kernel, None, str(why)))
    return Report(rows, _raw_rseq_impl()[1], variant, os.uname().release,
                  time.perf_counter() - started, auxv)
