#!/usr/bin/env bash
# Runs one test many times while every CPU is kept busy, to catch what fails only under load.
#
#   scripts/stress-test.sh NAME N [CARGO TEST ARGS...]
#   scripts/stress-test.sh executors_with_a_short_preempt_timer_keep_running 200 -p shards --release --lib
#   TEST_ARGS=--include-ignored scripts/stress-test.sh an_executor_parked_at_its_first_instant 200 -p shards --release --lib
#
# Builds the test binaries once (`cargo test --no-run ARGS`), starts one busy loop per CPU (stopped
# on exit, whatever the exit), then runs NAME (a test-name filter, as `cargo test NAME` takes it)
# in every built binary N times. A run passes when every binary exits 0 within RUN_TIMEOUT_SECS
# (default 300) and at least one test ran; the output of a failed run is kept under
# target/stress/. Prints passes and failures, and exits 1 on any failure (2 if no test matched).
#
# Environment: HOGS (busy loops; default one per CPU), RUN_TIMEOUT_SECS, TEST_ARGS (flags for each
# test binary, e.g. TEST_ARGS=--include-ignored to run an #[ignore]d test).
set -euo pipefail

if [[ $# -lt 2 ]]; then
    echo "usage: $0 NAME N [CARGO TEST ARGS...]" >&2
    exit 2
fi
name=$1
runs=$2
shift 2
cd "$(dirname "$0")/.."

# Test harnesses only (profile "test": true), not the binaries built for the tests to run.
mapfile -t bins < <(cargo test --no-run --message-format=json "$@" |
    grep '"profile":{[^}]*"test":true}' | grep -o '"executable":"[^"]*"' | cut -d'"' -f4)
if [[ ${#bins[@]} -eq 0 ]]; then
    echo "no test binary built for: cargo test $*" >&2
    exit 2
fi

hogs=()
stop_hogs() {
    for pid in "${hogs[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
}
trap stop_hogs EXIT
trap 'exit 130' INT TERM
for _ in $(seq "${HOGS:-$(nproc)}"); do
    bash -c 'while :; do :; done' &
    hogs+=($!)
done

logs=target/stress
mkdir -p "$logs"
passes=0
fails=0
for i in $(seq "$runs"); do
    out=$(mktemp)
    ok=1
    ran=0
    for bin in "${bins[@]}"; do
        # shellcheck disable=SC2086 # TEST_ARGS is a list of harness flags, e.g. --include-ignored
        if ! timeout "${RUN_TIMEOUT_SECS:-300}" "$bin" "$name" ${TEST_ARGS:-} >>"$out" 2>&1; then
            ok=0
        fi
    done
    # "test result: ok. 1 passed; ..." per binary
    ran=$(grep -o 'test result: [a-zA-Z]*\. [0-9]* passed; [0-9]* failed' "$out" |
        awk '{ n += $4 + $6 } END { print n + 0 }')
    if [[ $ran -eq 0 && $ok -eq 1 ]]; then
        echo "no test matched '$name' in: ${bins[*]}" >&2
        rm -f "$out"
        exit 2
    fi
    if [[ $ok -eq 1 ]]; then
        passes=$((passes + 1))
        rm -f "$out"
    else
        fails=$((fails + 1))
        mv "$out" "$logs/$name-$i.log"
        echo "run $i failed; output in $logs/$name-$i.log:"
        tail -n 15 "$logs/$name-$i.log"
    fi
    if ((i % 20 == 0)); then
        echo "after $i runs: $passes passed, $fails failed"
    fi
done
echo "$name under load ($(nproc) CPUs, ${#hogs[@]} busy loops): $passes passed, $fails failed"
[[ $fails -eq 0 ]]
