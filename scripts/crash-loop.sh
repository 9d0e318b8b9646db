#!/usr/bin/env bash
# kill -9 loop: proves that shardlogd loses no acknowledged record when the process dies.
#
#   scripts/crash-loop.sh [CYCLES]        (default 100)
#
# Each cycle starts shardlogd on a data directory that persists across cycles, runs two
# `shardlog-bench --ack durable --verify-log` load generators against it (many streams; one sends
# frames of 1 record of 28..4096 bytes, the other frames of 64 records of 28..512 bytes), sends
# SIGKILL to the daemon at a random moment, restarts it and runs `shardlog-bench verify`: every
# acknowledged record must be present, byte-identical (crc32c and length), and in per-stream
# order. A restart that fails, or any verify problem, stops the loop with exit status 1 and keeps
# the data directory and logs for the reproduction.
#
# The cycles rotate through four ways to place the kill:
#   plain      2 shards, 8 MiB segments
#   rotation   3 shards, 64 KiB segments (SMALL_SEGMENT_BYTES overrides): the kill usually
#              lands during or near a rotation
#   retention  4 shards, small segments, retention of 32 segments per shard: a filler keeps
#              segments being deleted or recycled all the time; the generators are rate-limited
#              so a cycle's own acks are mostly still retained when it verifies, while the acks
#              of earlier cycles are deleted by retention over time (verify counts those as
#              retired, not lost, and checks everything the shards still hold)
#   recovery   2 shards, small segments; after the kill the restarting daemon is killed again
#              within 0-40 ms (during recovery), then restarted once more before verifying
# Each mode keeps one verify log across all its cycles, so every later cycle checks again every
# record acknowledged in every earlier one (that retention has not deleted).
#
# Environment: BIN_DIR (where shardlogd and shardlog-bench are; default: build them in release
# into target/), WORK_DIR (default: target/crash-loop, on the same disk as the target dir; must
# not be tmpfs), SEED (random moments; default from the clock), DURABILITY (linked|dsync),
# MODES (which of the modes below to cycle through; default all four).
set -euo pipefail
cd "$(dirname "$0")/.."

cycles=${1:-100}
seed=${SEED:-$(date +%s)}
durability=${DURABILITY:-dsync}
RANDOM=$seed

if [ -z "${BIN_DIR:-}" ]; then
  cargo build --release -q -p daemon -p bench
  BIN_DIR="${CARGO_TARGET_DIR:-target}/release"
fi
daemon_bin="$BIN_DIR/shardlogd"
bench_bin="$BIN_DIR/shardlog-bench"
work=${WORK_DIR:-${CARGO_TARGET_DIR:-target}/crash-loop}
rm -rf "$work"
mkdir -p "$work"
if [ "$(stat -f -c %T "$work")" = tmpfs ]; then
  echo "crash-loop: $work is on tmpfs, which has no O_DIRECT; set WORK_DIR to a directory on ext4 or xfs" >&2
  exit 1
fi
echo "crash-loop: $cycles cycles, seed $seed, durability $durability, work dir $work"

# Tiny segments: the daemon makes its commits smaller to fit them.
small_segment=${SMALL_SEGMENT_BYTES:-65536}

daemon_pid=
bench_pids=()
cleanup() {
  for p in "${bench_pids[@]}" $daemon_pid; do kill -9 "$p" 2>/dev/null || true; done
}
trap cleanup EXIT

# start_daemon MODE: starts shardlogd for MODE in the background; sets daemon_pid and addr.
start_daemon() {
  local mode=$1 dir="$work/$1"
  local args=(--listen 127.0.0.1:0 --data-dir "$dir/data" --pin none --durability "$durability")
  case $mode in
    plain) args+=(--shards 2 --segment-bytes $((8 << 20))) ;;
    rotation) args+=(--shards 3 --segment-bytes "$small_segment") ;;
    retention) args+=(--shards 4 --segment-bytes "$small_segment" --retention-bytes $((32 * small_segment))) ;;
    recovery) args+=(--shards 2 --segment-bytes "$small_segment") ;;
  esac
  : > "$dir/daemon.out"
  "$daemon_bin" "${args[@]}" > "$dir/daemon.out" 2>> "$dir/daemon.err" &
  daemon_pid=$!
}

# wait_listening MODE: waits for the listening line; sets addr. Fails if the daemon exits.
wait_listening() {
  local dir="$work/$1" i
  addr=
  for i in $(seq 1 300); do
    addr=$(sed -n 's/^shardlogd listening on \(.*\)$/\1/p' "$dir/daemon.out" | head -n 1)
    [ -n "$addr" ] && return 0
    if ! kill -0 "$daemon_pid" 2>/dev/null; then
      echo "crash-loop: shardlogd exited during startup (mode $1); stderr tail:" >&2
      tail -n 20 "$dir/daemon.err" >&2
      return 1
    fi
    sleep 0.1
  done
  echo "crash-loop: shardlogd did not print its address within 30 s (mode $1)" >&2
  return 1
}

# start_serving MODE: starts the daemon and waits until it listens. A daemon that hangs before
# printing its address (see docs/RELIABILITY.md, restart stalls) is killed and started again, up
# to 3 times, and counted in $stalls; one that exits fails at once.
start_serving() {
  local attempt
  for attempt in 1 2 3; do
    start_daemon "$1"
    wait_listening "$1" && return 0
    kill -0 "$daemon_pid" 2>/dev/null || return 1
    echo "crash-loop: cycle $cycle: daemon hung before listening (attempt $attempt)" >&2
    stalls=$((stalls + 1))
    kill_daemon
  done
  return 1
}

kill_daemon() {
  kill -9 "$daemon_pid" 2>/dev/null || true
  wait "$daemon_pid" 2>/dev/null || true
  daemon_pid=
}

# json_count KEY FILE: the number after "KEY": in a verify --json outcome.
json_count() { sed -n "s/.*\"$1\": *\([0-9]*\).*/\1/p" "$2" | head -n 1; }

# sleep_ms N
sleep_ms() { sleep "$(printf '%d.%03d' $(($1 / 1000)) $(($1 % 1000)))"; }

read -r -a modes <<< "${MODES:-plain rotation retention recovery}"
failures=0
acked_total=0
# Restarted daemons that never answered (see docs/RELIABILITY.md: restart stalls).
stalls=0
verify_attempts=${VERIFY_ATTEMPTS:-4}
for cycle in $(seq 1 "$cycles"); do
  mode=${modes[$(((cycle - 1) % ${#modes[@]}))]}
  dir="$work/$mode"
  mkdir -p "$dir"
  log="$dir/acks.log"

  if ! start_serving "$mode"; then failures=$((failures + 1)); break; fi

  filler_pid=
  if [ "$mode" = retention ]; then
    # Filler without a verify log keeps retention busy during the cycle; on the first retention
    # cycle it first runs unthrottled so that every shard is past its retention bytes.
    if [ ! -f "$dir/prefilled" ]; then
      "$bench_bin" --addr "$addr" -q --ack durable --duration 3s -c 4 -P 8 -K 64 \
        --stream-base 200000 -B 16 -S 1024 > "$dir/prefill.out" 2>&1 || true
      touch "$dir/prefilled"
    fi
    "$bench_bin" --addr "$addr" -q --ack durable --duration 60s --response-timeout 5s -c 1 \
      -K 64 --stream-base 200000 -B 16 -S 1024 --rate 20 > "$dir/filler.out" 2>&1 &
    filler_pid=$!
  fi

  limit=()
  [ "$mode" = retention ] && limit=(--rate 200)
  "$bench_bin" --addr "$addr" -q --ack durable --verify-log "$log" --duration 60s \
    --response-timeout 5s --seed $((seed + cycle)) -c 8 -P 4 -K 256 -B 1 -S 28..4096 "${limit[@]}" \
    > "$dir/bench1.out" 2>&1 &
  bench_pids=($!)
  [ -n "$filler_pid" ] && bench_pids+=("$filler_pid")
  [ "$mode" = retention ] && limit=(--rate 5)
  "$bench_bin" --addr "$addr" -q --ack durable --verify-log "$log" --duration 60s \
    --response-timeout 5s --seed $((seed + cycle + 1000000)) -c 2 -P 2 -K 64 --stream-base 100000 \
    -B 64 -S 28..512 "${limit[@]}" > "$dir/bench2.out" 2>&1 &
  bench_pids+=($!)

  kill_after=$((200 + RANDOM % 1800))
  sleep_ms "$kill_after"
  kill_daemon
  for p in "${bench_pids[@]}"; do wait "$p" 2>/dev/null || true; done
  bench_pids=()

  if [ "$mode" = recovery ]; then
    start_daemon "$mode"
    sleep_ms $((RANDOM % 40))
    kill_daemon
  fi

  if ! start_serving "$mode"; then
    echo "crash-loop: cycle $cycle ($mode): restart after kill -9 failed" >&2
    failures=$((failures + 1))
    break
  fi
  # A verify that could not talk to the daemon at all (a connect or Hello timeout on a busy
  # machine) is retried; one that read the shards and found problems is not.
  # A daemon that stays unresponsive after a restart (see docs/RELIABILITY.md) is counted as a
  # stall, killed and started again, up to 3 times; it does not hide lost records, since every
  # restart recovers the same directory.
  verified=0
  for attempt in $(seq 1 "$verify_attempts"); do
    if "$bench_bin" verify --verify-log "$log" --addr "$addr" --json "$dir/verify.json" \
      > "$dir/verify.out" 2>&1; then
      verified=1
      break
    fi
    grep -q '^verify: FAILED' "$dir/verify.out" && break
    echo "crash-loop: cycle $cycle: verify could not reach the restarted daemon (attempt $attempt): $(head -c 200 "$dir/verify.out")" >&2
    stalls=$((stalls + 1))
    if [ "$attempt" -lt "$verify_attempts" ]; then
      kill_daemon
      start_serving "$mode" || break
    fi
  done
  if [ "$verified" -ne 1 ]; then
    echo "crash-loop: cycle $cycle ($mode): VERIFY FAILED (killed after ${kill_after} ms)" >&2
    cat "$dir/verify.out" >&2
    failures=$((failures + 1))
    kill_daemon
    break
  fi
  kill_daemon
  acked=$(json_count acked "$dir/verify.json")
  found=$(json_count acked_found "$dir/verify.json")
  retired=$(json_count retired_by_retention "$dir/verify.json")
  echo "cycle $cycle $mode: killed after ${kill_after} ms; verify ok: ${found:-?}/${acked:-?} acked records found, ${retired:-?} retired by retention"
done

# Each mode's last verify covers every cycle of that mode.
found_total=0
retired_total=0
for m in plain rotation retention recovery; do
  [ -f "$work/$m/verify.json" ] || continue
  a=$(json_count acked "$work/$m/verify.json")
  f=$(json_count acked_found "$work/$m/verify.json")
  r=$(json_count retired_by_retention "$work/$m/verify.json")
  acked_total=$((acked_total + ${a:-0}))
  found_total=$((found_total + ${f:-0}))
  retired_total=$((retired_total + ${r:-0}))
  echo "crash-loop: $m: ${a:-0} acknowledged, ${f:-0} verified, ${r:-0} retired by retention"
done
if [ "$failures" -ne 0 ]; then
  echo "crash-loop: FAILED at cycle $cycle (seed $seed); data and logs kept in $work" >&2
  exit 1
fi
echo "crash-loop: $cycles cycles, 0 lost or corrupted records; of $acked_total acknowledged records $found_total verified at the end and $retired_total retired by retention; $stalls restarts stalled (daemon unresponsive, killed and restarted) (seed $seed)"
rm -rf "$work"
