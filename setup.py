"""Build the C core.

Sources are chosen by folder, never by a list of exceptions, so a file's
folder decides which build it joins:

  csrc/lib/      pure C (no Python.h): registration, CPU discovery, the
                 per-CPU primitives and their architecture files
  csrc/py/       the CPython binding rseq._core
  csrc/testing/  the test build only (rseq._inject); its pure-C stress
                 workload (workload.c) is also tests/c/param_test's

Two extension modules:
  rseq._core    lib + py, release build: the delay-injection points of the
                critical sections compile to nothing.
  rseq._inject  the test build of the per-CPU code (RSEQ_INJECT=1): the
                counter and arena sources of csrc/py plus csrc/testing, with
                numbered delay loops inside every critical section.  It
                registers nothing itself: it uses rseq._core's C API.
"""
import glob

from setuptools import Extension, setup


def sources(folder):
    return sorted(glob.glob(f"csrc/{folder}/*.c"))


HEADERS = sorted(glob.glob("csrc/**/*.h", recursive=True)) + sorted(
    glob.glob("src/rseq/include/rseq/*.h"))
CFLAGS = ["-std=gnu11", "-O2", "-Wall", "-Wextra", "-Wno-missing-field-initializers",
          "-fno-strict-aliasing", "-fvisibility=hidden"]
INCLUDES = ["csrc/lib", "csrc/py", "src/rseq/include"]
# The per-CPU data structures of the binding, built again with injection.
PER_CPU_SOURCES = ["csrc/lib/cpus.c", "csrc/py/counter.c", "csrc/py/arena.c",
                   "csrc/py/pool.c", "csrc/py/ring.c"]


def extension(name, srcs, macros, includes=INCLUDES):
    return Extension(name, sources=srcs, depends=HEADERS, define_macros=macros,
                     include_dirs=includes, extra_compile_args=CFLAGS, libraries=["dl"])


setup(ext_modules=[
    extension("rseq._core", sources("lib") + sources("py"), []),
    extension("rseq._inject", PER_CPU_SOURCES + sources("testing"),
              [("RSEQ_INJECT", "1"), ("RSEQ_CAPI_CLIENT", "1")],
              INCLUDES + ["csrc/testing"]),
])
