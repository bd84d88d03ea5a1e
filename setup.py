"""Build the C core: the extension module rseq._core from csrc/."""
import glob

from setuptools import Extension, setup

HEADERS = sorted(glob.glob("csrc/**/*.h", recursive=True)) + sorted(
    glob.glob("src/rseq/include/rseq/*.h"))
CFLAGS = ["-std=gnu11", "-O2", "-Wall", "-Wextra", "-Wno-missing-field-initializers",
          "-fno-strict-aliasing", "-fvisibility=hidden"]

setup(ext_modules=[
    Extension(
        "rseq._core",
        sources=sorted(glob.glob("csrc/*.c")),
        depends=HEADERS,
        include_dirs=["csrc", "src/rseq/include"],
        extra_compile_args=CFLAGS,
        libraries=["dl"],
    ),
])
