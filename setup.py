"""Build the C core.

Two extension modules come from csrc/:
  rseq._core    the release build: registration, reads, counters, arena; the
                delay-injection points of the critical sections compile to
                nothing.
  rseq._inject  the test build of the per-CPU code (RSEQ_INJECT=1): the same
                counter and arena sources with numbered delay loops inside
                every critical section, for the stress harness.  It registers
                nothing itself: it uses rseq._core's C API.
"""
import glob

from setuptools import Extension, setup

HEADERS = sorted(glob.glob("csrc/**/*.h", recursive=True)) + sorted(
    glob.glob("src/rseq/include/rseq/*.h"))
CFLAGS = ["-std=gnu11", "-O2", "-Wall", "-Wextra", "-Wno-missing-field-initializers",
          "-fno-strict-aliasing", "-fvisibility=hidden"]
PER_CPU_SOURCES = ["csrc/counter.c", "csrc/arena.c", "csrc/cpus.c"]
# The test build's own files stay out of the release module.
CORE_SOURCES = sorted(set(glob.glob("csrc/*.c"))
                      - {"csrc/inject_module.c", "csrc/primitive_workers.c"})


def extension(name, sources, macros):
    return Extension(name, sources=sources, depends=HEADERS, define_macros=macros,
                     include_dirs=["csrc", "src/rseq/include"], extra_compile_args=CFLAGS,
                     libraries=["dl"])


setup(ext_modules=[
    extension("rseq._core", CORE_SOURCES, []),
    extension("rseq._inject", PER_CPU_SOURCES + ["csrc/inject_module.c",
                                                  "csrc/primitive_workers.c"],
              [("RSEQ_INJECT", "1"), ("RSEQ_CAPI_CLIENT", "1")]),
])
