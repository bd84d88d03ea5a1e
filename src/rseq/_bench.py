"""Side-by-side benchmarks: ``python -m rseq bench``.

Every figure is measured in the same run as the figures it is compared
with, interleaved round by round so that machine noise hits all of them
alike; the report gives medians and ratios.  Figures are ns per call
including the timeit loop (the same loop for every entry, which is why the
call floor is measured, not assumed).
"""
from __future__ import annotations

import _thread
import ctypes
import statistics
import timeit
from typing import Callable, Optional

from . import _core


def _timer(fn: Callable[[], object]) -> timeit.Timer:
    return timeit.Timer("f()", globals={"f": fn})


def measure(cases: dict[str, Callable[[], object]], *, rounds: int,
            seconds_per_sample: float = 0.02) -> dict[str, float]:
    """Median ns per call of each case over ``rounds`` interleaved rounds."""
    timers = {name: _timer(fn) for name, fn in cases.items()}
    numbers = {}
    for name, t in timers.items():
        # Calibrate so that one sample lasts about seconds_per_sample.
        n, elapsed = t.autorange()
        numbers[name] = max(1, int(n * seconds_per_sample / max(elapsed, 1e-9)))
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, t in timers.items():
            samples[name].append(t.timeit(numbers[name]) / numbers[name] * 1e9)
    return {name: statistics.median(v) for name, v in samples.items()}


def _ctypes_sched_getcpu() -> Callable[[], int]:
    libc = ctypes.CDLL(None, use_errno=True)
    fn = libc.sched_getcpu
    fn.restype = ctypes.c_int
    fn.argtypes = []
    return fn


def _psutil_cpu_num() -> Optional[Callable[[], int]]:
    try:
        import psutil
    except ImportError:
        return None
    process = psutil.Process()
    if not hasattr(process, "cpu_num"):
        return None
    return process.cpu_num


def bench_reads(quick: bool = False) -> dict:
    """rseq.cpu() beside the call floor and what a user would otherwise use."""
    cases: dict[str, Callable[[], object]] = {
        "_thread.get_ident() [floor]": _thread.get_ident,
        "rseq.cpu()": _core.cpu,
        "rseq.node()": _core.node,
        "ctypes sched_getcpu()": _ctypes_sched_getcpu(),
    }
    psutil_fn = _psutil_cpu_num()
    if psutil_fn is not None:
        cases["psutil.Process().cpu_num()"] = psutil_fn
    rounds = 5 if quick else 15
    ns = measure(cases, rounds=rounds, seconds_per_sample=0.01 if quick else 0.03)
    floor = ns["_thread.get_ident() [floor]"]
    cpu = ns["rseq.cpu()"]
    ratios = {name: value / floor for name, value in ns.items()}
    targets = {
        "rseq.cpu() within 1.1x of _thread.get_ident()": {
            "value": cpu / floor, "limit": 1.1, "ok": cpu / floor <= 1.1},
    }
    if psutil_fn is not None:
        speedup = ns["psutil.Process().cpu_num()"] / cpu
        targets["rseq.cpu() at least 100x faster than psutil"] = {
            "value": speedup, "limit": 100.0, "ok": speedup >= 100.0}
    return {"title": "current CPU lookup", "unit": "ns/call", "rounds": rounds,
            "ns": ns, "ratio_to_floor": ratios, "floor": "_thread.get_ident() [floor]",
            "targets": targets,
            "notes": [] if psutil_fn else ["psutil not installed: pip install psutil to compare"]}


SECTIONS: dict[str, Callable[..., dict]] = {"reads": bench_reads}


def format_section(result: dict) -> str:
    lines = [f"{result['title']} (median of {result['rounds']} interleaved rounds, "
             f"{result['unit']}, ratio to the floor)"]
    width = max(len(n) for n in result["ns"]) + 2
    for name, value in result["ns"].items():
        lines.append(f"  {name:<{width}} {value:>10.1f}   {result['ratio_to_floor'][name]:>7.2f}x")
    for label, t in result["targets"].items():
        lines.append(f"  target: {label}: {'PASS' if t['ok'] else 'MISS'} "
                     f"({t['value']:.2f}x, limit {t['limit']:g}x)")
    for note in result.get("notes", []):
        lines.append(f"  note: {note}")
    return "\n".join(lines)
