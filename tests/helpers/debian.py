"""Debian tools the tests need, installed by the tests themselves.

A test that needs a tool (``spin``, ...) calls :func:`ensure_tool`: when the
binary is missing and the test runs as root on a Debian-like system, the
package is installed with apt-get (waiting for the dpkg lock, since other
jobs may hold it); otherwise the test is skipped with the reason.  This is
the one place the test suite installs system packages.
"""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

APT = ["apt-get", "-o", "DPkg::Lock::Timeout=600", "-y", "-q"]


def install(package: str) -> str | None:
    """apt-get install ``package``; returns None or why it could not."""
    if shutil.which("apt-get") is None:
        return "no apt-get on this system"
    if os.geteuid() != 0:
        return "not root: cannot apt-get install"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = APT + ["install", "--no-install-recommends", package]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    if proc.returncode != 0:
        # the package lists may be missing in a fresh container
        subprocess.run(APT + ["update"], capture_output=True, text=True, env=env, timeout=900)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    if proc.returncode != 0:
        return f"apt-get install {package} failed: {proc.stderr.strip()[-300:]}"
    return None


def ensure_tool(binary: str, package: str) -> str:
    """The path of ``binary``, installing Debian ``package`` if needed; skips
    the calling test when neither works."""
    path = shutil.which(binary)
    if path is None:
        why = install(package)
        path = shutil.which(binary)
        if path is None:
            pytest.skip(f"{binary} is not available ({why or 'not on PATH after install'})")
    return path


if __name__ == "__main__":  # python tests/helpers/debian.py spin spin
    import sys

    why = install(sys.argv[2] if len(sys.argv) > 2 else sys.argv[1])
    print(why or "installed")
