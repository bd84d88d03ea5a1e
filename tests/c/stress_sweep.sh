#!/bin/sh
# stress_sweep.sh - the long stress matrix of the per-CPU primitives.
#
#   sh tests/c/stress_sweep.sh [reps]      (from the repository root)
#
# Builds param_test (test build) into tests/_build/ and sweeps every primitive
# x every injection point x {yield, sleep, raise, signal storm} x {cpu_id,
# mm_cid (glibc registration off)} with migration, then processes and the
# fallback. Stops at the first failure and prints the failing command.
# The quick version of this matrix is tests/stress/test_primitives.py.
set -eu
REPS=${1:-50000}
OUT=tests/_build
mkdir -p "$OUT"
gcc -std=gnu11 -O2 -Wall -Wextra -pthread -I csrc/lib -I csrc/testing -I src/rseq/include \
    -DRSEQ_INJECT=1 tests/c/param_test.c csrc/testing/workload.c csrc/lib/registration.c \
    csrc/lib/cpus.c -o "$OUT/param_test" -ldl
W=$(( $(nproc) * 4 ))
run() {
    if ! out=$("$@" 2>&1); then
        rc=$?
        [ $rc -eq 77 ] && return 0
        printf '%s\n' "$out"
        echo "FAILED ($rc): $*"
        exit 1
    fi
    printf '%s\n' "$out" | tail -2 | head -1
}
for t in counter cbne bov list store_store memcpy; do
    for p in 1 2 3 4 5 7 8 9; do
        for d in "-y -e 10" "-s -e 500 -u 100" "-k -e 50" "-S 5"; do
            for env in "" "GLIBC_TUNABLES=glibc.pthread.rseq=0"; do
                mode="-M cpu"
                [ -n "$env" ] && mode="-M mm_cid"
                run env $env "$OUT/param_test" -T $t -t $W -r "$REPS" -$p 3000 $d -m 500 $mode
            done
        done
    done
    run "$OUT/param_test" -T $t -P 4 -t 2 -r "$REPS" -4 3000 -S 10 -m 300
    run env GLIBC_TUNABLES=glibc.pthread.rseq=0 "$OUT/param_test" -T $t -P 4 -t 2 -r "$REPS" -3 3000 -S 10 -m 300
    run "$OUT/param_test" -F -T $t -t $W -r "$REPS" -7 300 -y -e 20 -S 10 -m 300
    run "$OUT/param_test" -F -T $t -P 4 -t 2 -r "$REPS" -7 300 -S 10 -m 300
done
echo "stress sweep: all OK"
