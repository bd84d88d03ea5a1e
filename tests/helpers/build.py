"""Build tests/integration/capi_ext/capi_ext.c into a directory with gcc, the way any
extension using rseq's C API would compile (no setuptools needed)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sysconfig

import rseq

SOURCE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "integration", "capi_ext", "capi_ext.c")


def build_capi_ext(out_dir: str, source: str = SOURCE) -> str:
    """Compile the extension (``source``, by default capi_ext.c) into
    ``out_dir``; returns the module's path."""
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if not compiler:
        raise FileNotFoundError("no C compiler (gcc or cc) on PATH")
    name = os.path.splitext(os.path.basename(source))[0]
    target = os.path.join(out_dir, name + sysconfig.get_config_var("EXT_SUFFIX"))
    cmd = [compiler, "-shared", "-fPIC", "-O2", "-std=gnu11", "-Wall", "-Werror",
           "-I", sysconfig.get_paths()["include"], "-I", rseq.get_include(),
           source, "-o", target, "-pthread"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}\n{proc.stderr}")
    return target
