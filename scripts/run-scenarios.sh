#!/usr/bin/env bash
# Run Molecule scenarios side by side (each is a lab of its own: its own containers and network),
# at most SMTPGW_MOLECULE_JOBS at a time (default 2), in the order given (the longest first). The
# name demo-check runs `make demo-check` (the demo in a lab of its own) as one of them. Each one's
# output goes to .lab/logs/<name>.log; a failed one's log is printed whole. Exit status: non-zero
# when any failed.
#   scripts/run-scenarios.sh gateway cluster demo-check
set -uo pipefail
cd "$(dirname "$0")/.."
jobs_max=${SMTPGW_MOLECULE_JOBS:-2}
logs=.lab/logs
mkdir -p "$logs"
[ "$#" -gt 0 ] || { echo "usage: $0 SCENARIO..." >&2; exit 2; }

declare -A pid_of=() start_of=()
# Interrupted: stop the scenarios still running (their containers go with the next run's destroy).
trap 'kill $(jobs -p) 2>/dev/null; exit 130' INT TERM
failed=()
passed=()
finish() {  # $1 scenario, $2 exit status
    local took=$(( $(date +%s) - start_of[$1] ))
    if [ "$2" -eq 0 ]; then
        echo "== scenario $1: passed in $((took / 60))m$((took % 60))s ($logs/$1.log)"
        passed+=("$1")
    else
        echo "== scenario $1: FAILED (rc $2) after $((took / 60))m$((took % 60))s; its log:"
        cat "$logs/$1.log"
        echo "== end of scenario $1's log"
        failed+=("$1")
    fi
}
wait_one() {  # wait for any running scenario, then report it
    local s rc
    while :; do
        for s in "${!pid_of[@]}"; do
            if ! kill -0 "${pid_of[$s]}" 2>/dev/null; then
                wait "${pid_of[$s]}"; rc=$?
                unset "pid_of[$s]"
                finish "$s" "$rc"
                return
            fi
        done
        sleep 2
    done
}
for s in "$@"; do
    while [ "${#pid_of[@]}" -ge "$jobs_max" ]; do wait_one; done
    echo "== scenario $s: started ($(date -u +%H:%M:%S))"
    start_of[$s]=$(date +%s)
    if [ "$s" = demo-check ]; then
        make --no-print-directory demo-check >"$logs/$s.log" 2>&1 &
    else
        molecule test -s "$s" >"$logs/$s.log" 2>&1 &
    fi
    pid_of[$s]=$!
done
while [ "${#pid_of[@]}" -gt 0 ]; do wait_one; done
if [ "${#failed[@]}" -gt 0 ]; then
    echo "== failed: ${failed[*]}"
    exit 1
fi
# Every one given must have run and passed: anything else (this script broken) is a failure too.
if [ "${#passed[@]}" -ne "$#" ]; then
    echo "== only ${#passed[@]} of $# passed (${passed[*]:-none}): the runner itself failed" >&2
    exit 1
fi
echo "== all $# passed: $*"
