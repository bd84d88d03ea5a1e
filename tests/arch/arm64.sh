#!/usr/bin/env bash
# arm64.sh - run the arm64 critical sections for real, under an arm64 kernel.
#
#   bash tests/arch/arm64.sh            (from anywhere; about a minute or two)
#
# User-mode qemu does not implement rseq(2), so this boots a real Debian arm64
# kernel (linux-image-*-arm64, fetched with `apt-get download` once and cached)
# under qemu-system-aarch64 -M virt -cpu max -smp 2, with a tiny initramfs:
#   /init                 tests/arch/arm64_init.c (+ csrc/lib): registration
#                         facts, counter.h with the 16-byte CAS, then /cases
#   /param_test           tests/c/param_test.c over csrc/testing/workload.c (the
#                         stress workload of rseq._inject), test build
#   /param_test_release   the same, release build
#   /lib/                 the arm64 glibc (ld.so, libc.so.6) from
#                         libc6-arm64-cross: the programs are linked dynamically
#                         like the Python extension, because registration finds
#                         glibc's area with dlsym, which a static binary lacks
#   /cases                the matrix below, one param_test run per line
# init prints a line per check and per case, then "arm64 result: PASS|FAIL",
# and powers the VM off.  Exit 0 on PASS, 1 on FAIL, 77 when the tools are
# missing (tests/arch/install-arm64-tools.sh installs them).
#
# Cache: $RSEQ_ARM64_CACHE, default ~/.cache/rseq-arm64 (only the kernel
# image, ~32 MB).  Build output and the console log: tests/_build/arm64/.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
CACHE=${RSEQ_ARM64_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/rseq-arm64}
OUT=$ROOT/tests/_build/arm64
SYSROOT=/usr/aarch64-linux-gnu
TIMEOUT=${RSEQ_ARM64_TIMEOUT:-600}
THREADS=6 # three per virtual CPU: preemption inside sequences is certain

missing=
for tool in aarch64-linux-gnu-gcc qemu-system-aarch64 cpio dpkg-deb; do
    command -v "$tool" >/dev/null || missing="$missing $tool"
done
[ -f "$SYSROOT/lib/libc.so.6" ] || missing="$missing libc6-arm64-cross"
if [ -n "$missing" ]; then
    echo "arm64: missing:$missing (run tests/arch/install-arm64-tools.sh)"
    exit 77
fi

# ---------------------------------------------------------------------------
# The kernel: the image of Debian's current linux-image-arm64, cached
# ---------------------------------------------------------------------------
kernel=$(ls "$CACHE"/vmlinuz-* 2>/dev/null | sort -V | tail -1 || true)
if [ -z "$kernel" ]; then
    mkdir -p "$CACHE"
    package=$(apt-cache depends linux-image-arm64:arm64 2>/dev/null |
              sed -n 's/^ *Depends: \(linux-image-[0-9.]*-[0-9]*-arm64\).*/\1/p' | head -1)
    if [ -z "$package" ]; then
        echo "arm64: apt knows no linux-image-arm64:arm64" \
             "(dpkg --add-architecture arm64 && apt-get update)"
        exit 77
    fi
    tmp=$(mktemp -d "$CACHE/download.XXXXXX")
    (cd "$tmp" && apt-get download -q "$package:arm64" >/dev/null 2>&1) || {
        echo "arm64: apt-get download $package:arm64 failed"; rm -rf "$tmp"; exit 1; }
    dpkg-deb --fsys-tarfile "$tmp"/*.deb | tar -x -C "$tmp" --wildcards './boot/vmlinuz-*'
    mv "$tmp"/boot/vmlinuz-* "$CACHE"/
    rm -rf "$tmp"
    kernel=$(ls "$CACHE"/vmlinuz-* | sort -V | tail -1)
fi

# ---------------------------------------------------------------------------
# The programs, cross-compiled
# ---------------------------------------------------------------------------
rm -rf "$OUT/root"
mkdir -p "$OUT/root/lib" "$OUT/root/proc" "$OUT/root/sys" "$OUT/root/dev"
CFLAGS=(-std=gnu11 -O2 -Wall -Wextra -Werror -Wno-missing-field-initializers -pthread
        -I "$ROOT/csrc/lib" -I "$ROOT/csrc/testing" -I "$ROOT/src/rseq/include")
CC=aarch64-linux-gnu-gcc
# param_test: a thin main over the stress workload that rseq._inject runs
# too, with the package's registration (the sources test_primitives.py builds).
PARAM_TEST=("$ROOT/tests/c/param_test.c" "$ROOT/csrc/testing/workload.c"
            "$ROOT/csrc/lib/registration.c" "$ROOT/csrc/lib/cpus.c")
$CC "${CFLAGS[@]}" -DRSEQ_INJECT=1 "${PARAM_TEST[@]}" -o "$OUT/root/param_test" -ldl
$CC "${CFLAGS[@]}" "${PARAM_TEST[@]}" -o "$OUT/root/param_test_release" -ldl
$CC "${CFLAGS[@]}" "$ROOT/tests/arch/arm64_init.c" "$ROOT/csrc/testing/workload.c" \
    "$ROOT/csrc/lib/registration.c" "$ROOT/csrc/lib/cpus.c" -o "$OUT/root/init" -ldl
cp "$SYSROOT/lib/ld-linux-aarch64.so.1" "$SYSROOT/lib/libc.so.6" "$OUT/root/lib/"

# ---------------------------------------------------------------------------
# The matrix (the arm64 counterpart of tests/stress/test_primitives.py)
# ---------------------------------------------------------------------------
# RSEQ_ARM64_CASES=file replaces it (same format: one param_test run a line).
OWN="GLIBC_TUNABLES=glibc.pthread.rseq=0" # our own 32-byte registration
points() { case $1 in memcpy) echo 1 2 3 4 5 ;; *) echo 1 2 3 4 ;; esac; }
cpoint() { case $1 in counter|cbne|bov) echo 7 ;; *) echo 8 ;; esac; }
if [ -n "${RSEQ_ARM64_CASES:-}" ]; then
    { echo "# partial"; cat "$RSEQ_ARM64_CASES"; } > "$OUT/root/cases"
else {
    for t in counter cbne bov list store_store memcpy; do
        # Every window inside the sequence, widened, under a signal storm:
        # aborts are required (-A).  Registration alternates glibc / own.
        for p in $(points $t); do
            env=""; [ $((p % 2)) -eq 0 ] && env=$OWN
            echo "$env /param_test -T $t -t $THREADS -r 2500 -$p 3000 -S 5 -A"
        done
        # A window before the sequence, with yields, then with sleeps.
        c=$(cpoint $t)
        echo "/param_test -T $t -t $THREADS -r 2500 -$c 300 -y -e 20"
        echo "$OWN /param_test -T $t -t $THREADS -r 1500 -$c 300 -s -e 300 -u 200"
        # Forced migration and signals together; processes sharing memory.
        echo "/param_test -T $t -t $THREADS -r 2500 -3 800 -4 800 -m 200 -S 50"
        echo "$OWN /param_test -T $t -P 2 -t 2 -r 2500 -4 800 -m 300 -S 50"
        # The fallback, and the release build (no injection) at full speed.
        echo "/param_test -F -T $t -t $THREADS -r 1500 -7 200 -y -e 50 -m 200 -S 50"
        echo "/param_test_release -T $t -t $THREADS -r 10000 -m 300 -S 100"
    done
    # mm_cid needs Linux 6.3 (no AT_RSEQ_FEATURE_SIZE on 6.1): a skip here.
    echo "$OWN /param_test -T counter -M mm_cid -t $THREADS -r 1000"
} > "$OUT/root/cases"
fi

(cd "$OUT/root" && find . | LC_ALL=C sort | cpio -o -H newc --quiet) > "$OUT/initrd.cpio"

# ---------------------------------------------------------------------------
# Boot
# ---------------------------------------------------------------------------
echo "arm64: booting $(basename "$kernel") under qemu-system-aarch64 -smp 2" \
     "($(grep -c . "$OUT/root/cases") cases)"
start=$(date +%s)
set +e
timeout "$TIMEOUT" qemu-system-aarch64 -M virt -cpu max -smp 2 -m 512 -nographic \
    -no-reboot -nic none -kernel "$kernel" -initrd "$OUT/initrd.cpio" \
    -append "console=ttyAMA0 rdinit=/init panic=-1 quiet" </dev/null \
    > "$OUT/console.log" 2>&1
status=$?
set -e
tr -d '\r' < "$OUT/console.log" | grep -v '^\[ *[0-9.]*\]' || true
echo "arm64: qemu exit $status after $(( $(date +%s) - start ))s (log: $OUT/console.log)"
if grep -q '^arm64 result: PASS' "$OUT/console.log"; then
    exit 0
fi
# No result line: init died (a SIGSEGV from a wrong signature kills it, and
# the kernel panics) or qemu timed out.  Show what the kernel said.
grep -q '^arm64 result:' "$OUT/console.log" ||
    grep -a -m 5 -i -e 'kernel panic' -e 'segfault' -e 'unhandled' "$OUT/console.log" || true
echo "arm64: FAIL"
exit 1
