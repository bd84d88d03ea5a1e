"""The C benchmark (benchmarks/c/bench_percpu.c) is a thin main over the
measurement `python -m rseq bench` reports (csrc/lib/percpu_bench.c), linked
with the package's registration: it builds warning-free and its totals are
exact."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = [ROOT / "benchmarks" / "c" / "bench_percpu.c", ROOT / "csrc" / "lib" / "percpu_bench.c",
           ROOT / "csrc" / "lib" / "registration.c", ROOT / "csrc" / "lib" / "cpus.c"]

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")


def test_c_benchmark_builds_and_counts_exactly(tmp_path):
    binary = tmp_path / "bench_percpu"
    build = subprocess.run(
        ["gcc", "-std=gnu11", "-O2", "-Wall", "-Wextra", "-Werror", "-pthread",
         "-I", str(ROOT / "csrc" / "lib"), "-I", str(ROOT / "src" / "rseq" / "include"),
         *map(str, SOURCES), "-o", str(binary), "-ldl"], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    run = subprocess.run([str(binary), "20000", "1"], capture_output=True, text=True, timeout=60)
    if run.returncode == 77:
        pytest.skip(run.stdout.strip())
    assert run.returncode == 0, run.stdout + run.stderr
    assert "rseq add (load_add_store)" in run.stdout
    assert run.stdout.rstrip().endswith("per-CPU totals OK"), run.stdout
