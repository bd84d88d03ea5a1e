#!/bin/sh
# Run the tests beside one CPU-bound process per CPU, the way a busy CI
# machine runs them (issue 8 item 16: the stress tests must pass there too).
#
#   tests/load.sh [PYTEST ARGS...]        e.g.  tests/load.sh -q tests/stress
#
# PYTHON picks the interpreter (default: python3); LOAD_PROCESSES the number
# of busy processes (default: the CPUs this process may run on).  The busy
# processes are stopped, by their own pids, when pytest ends; the exit
# status is pytest's.
set -u
PYTHON=${PYTHON:-python3}
n=${LOAD_PROCESSES:-$(nproc)}
pids=""
i=0
while [ "$i" -lt "$n" ]; do
    "$PYTHON" -c 'while True: pass' &
    pids="$pids $!"
    i=$((i + 1))
done
stop_load() {
    # shellcheck disable=SC2086
    [ -n "$pids" ] && kill $pids 2>/dev/null && wait $pids 2>/dev/null
    pids=""
}
trap stop_load EXIT
trap 'stop_load; exit 130' INT TERM
echo "load.sh: $n CPU-bound process(es) beside pytest:$pids" >&2
"$PYTHON" -m pytest "$@"
status=$?
stop_load
exit $status
