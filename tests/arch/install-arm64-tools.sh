#!/usr/bin/env bash
# install-arm64-tools.sh - the Debian packages the arm64 check needs
# (tests/arch/arm64.sh): the aarch64 cross compiler with its glibc,
# qemu-system-aarch64, and cpio for the initramfs.  The arm64 kernel itself
# is not installed: arm64.sh downloads it with `apt-get download` into its
# cache, which needs only the arm64 architecture to be known to dpkg.
#
# Idempotent and quick when everything is present (no apt call at all).
# Needs root (or sudo) only when something is missing; .ci/run calls it
# before the tests.  Exit 0 also when it cannot install (no root, no apt):
# it says so, and tests/integration/test_arm64.py then fails in CI (CI=true)
# and skips elsewhere.
set -euo pipefail

PACKAGES=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-system-arm cpio)

have_all() {
    command -v aarch64-linux-gnu-gcc >/dev/null &&
        command -v qemu-system-aarch64 >/dev/null &&
        command -v cpio >/dev/null &&
        [ -f /usr/aarch64-linux-gnu/lib/libc.so.6 ] &&
        dpkg --print-foreign-architectures | grep -qx arm64 &&
        kernel_reachable
}

# arm64.sh needs the kernel image: cached already, or known to apt (the
# package lists of the arm64 architecture are there).
kernel_reachable() {
    ls "${RSEQ_ARM64_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/rseq-arm64}"/vmlinuz-* \
        >/dev/null 2>&1 || apt-cache show linux-image-arm64:arm64 >/dev/null 2>&1
}

if have_all; then
    echo "arm64 tools: present"
    exit 0
fi

SUDO=
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
        SUDO="sudo -n"
    else
        echo "arm64 tools: missing, and not root: install ${PACKAGES[*]} and run" \
             "'dpkg --add-architecture arm64 && apt-get update'" >&2
        exit 0
    fi
fi
if ! command -v apt-get >/dev/null; then
    echo "arm64 tools: missing, and no apt-get here" >&2
    exit 0
fi

# The arm64 architecture: only for `apt-get download linux-image-*-arm64:arm64`
# (arm64.sh); nothing of arm64 is installed on the host.
if ! dpkg --print-foreign-architectures | grep -qx arm64; then
    $SUDO dpkg --add-architecture arm64
fi
echo "arm64 tools: installing ${PACKAGES[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    "${PACKAGES[@]}" >/dev/null
have_all && echo "arm64 tools: installed"
