"""The real Prometheus server and promtool, for the metrics tests.

Debian's ``prometheus`` package is fetched with ``apt-get download`` and
unpacked with ``dpkg-deb -x`` (no package scripts run, nothing is
installed system-wide) into ``tests/_build/prometheus``, once: later runs
reuse it.  Binaries already on PATH are used first.  ``python
tests/helpers/prometheus.py`` fetches them ahead of a run.
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile

TESTS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(TESTS_DIR, "_build", "prometheus")
APT = ["apt-get", "-o", "DPkg::Lock::Timeout=600"]


class Unavailable(RuntimeError):
    pass


def _cached() -> tuple[str, str] | None:
    found = []
    for name in ("prometheus", "promtool"):
        path = shutil.which(name)
        cached = os.path.join(CACHE, "usr", "bin", name)
        if os.access(cached, os.X_OK):
            path = cached
        if not path:
            return None
        found.append(path)
    return found[0], found[1]


def _download(into: str) -> str:
    """The .deb of Debian's prometheus package, downloaded into ``into``."""
    def attempt() -> subprocess.CompletedProcess:
        return subprocess.run([*APT, "download", "prometheus"], cwd=into, capture_output=True,
                              text=True, timeout=600)
    proc = attempt()
    if proc.returncode != 0 and os.geteuid() == 0:
        # No package lists yet (a fresh machine): fetch them once.
        subprocess.run([*APT, "update", "-qq"], capture_output=True, text=True, timeout=600)
        proc = attempt()
    debs = glob.glob(os.path.join(into, "prometheus_*.deb"))
    if proc.returncode != 0 or not debs:
        raise Unavailable(f"apt-get download prometheus failed: {proc.stderr.strip()[-500:]}")
    return debs[0]


def binaries() -> tuple[str, str]:
    """(prometheus, promtool), fetched and cached on first use."""
    found = _cached()
    if found:
        return found
    if not shutil.which("apt-get") or not shutil.which("dpkg-deb"):
        raise Unavailable("Prometheus is not on PATH and there is no apt-get/dpkg-deb to "
                          "fetch Debian's package")
    os.makedirs(os.path.dirname(CACHE), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(CACHE)) as tmp:
        os.chmod(tmp, 0o755)   # apt's _apt user writes the download here
        deb = _download(tmp)
        unpacked = os.path.join(tmp, "root")
        subprocess.run(["dpkg-deb", "-x", deb, unpacked], check=True, capture_output=True,
                       timeout=300)
        try:
            os.rename(unpacked, CACHE)
        except OSError:
            if not os.path.isdir(CACHE):   # another run won the race: use its copy
                raise
    found = _cached()
    if not found:
        raise Unavailable(f"the prometheus package did not contain both binaries in {CACHE}")
    return found


if __name__ == "__main__":
    print("\n".join(binaries()))
