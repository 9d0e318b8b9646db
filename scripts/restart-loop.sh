#!/usr/bin/env bash
# Restart loop: how long a restarted shardlogd takes to answer, under write load and kill -9.
#
#   scripts/restart-loop.sh [RESTARTS]        (default 50)
#
# Each round starts a 2-shard shardlogd on a data directory kept across rounds, times how long it
# takes until `shardlogd stats` gets an answer (recovery, ring setup, accept loop), loads it with
# 8 connections of durable 200-byte appends for 0.2-0.9 s, and kills it with SIGKILL during the
# load. A restart that takes longer than 2 s is counted as slow; one that gets no answer within
# 30 s stops the loop with exit status 1 and keeps the data directory and the daemon's log.
#
# Environment: BIN_DIR (where shardlogd and shardlog-bench are; default: build them in release
# into target/), WORK_DIR (default: target/restart-loop; must not be tmpfs), PORT (default 17555).
set -euo pipefail
cd "$(dirname "$0")/.."

rounds=${1:-50}
if [ -z "${BIN_DIR:-}" ]; then
  cargo build --release -q -p daemon -p bench
  BIN_DIR="${CARGO_TARGET_DIR:-target}/release"
fi
work=${WORK_DIR:-${CARGO_TARGET_DIR:-target}/restart-loop}
port=${PORT:-17555}
rm -rf "$work"
mkdir -p "$work"
if [ "$(stat -f -c %T "$work")" = tmpfs ]; then
  echo "restart-loop: $work is on tmpfs, which has no O_DIRECT; set WORK_DIR to a directory on ext4 or xfs" >&2
  exit 1
fi

daemon_pid=
bench_pid=
cleanup() {
  [ -n "$bench_pid" ] && kill -9 "$bench_pid" 2>/dev/null || true
  [ -n "$daemon_pid" ] && kill -9 "$daemon_pid" 2>/dev/null || true
}
trap cleanup EXIT

slow=0
times=()
for i in $(seq 1 "$rounds"); do
  t0=$(date +%s%N)
  "$BIN_DIR/shardlogd" --listen "127.0.0.1:$port" --data-dir "$work/data" --shards 2 --pin none \
    >"$work/daemon.out" 2>"$work/daemon.err" &
  daemon_pid=$!
  answered=0
  while [ $(( ($(date +%s%N) - t0) / 1000000 )) -lt 30000 ]; do
    if timeout 5 "$BIN_DIR/shardlogd" stats --addr "127.0.0.1:$port" >/dev/null 2>&1; then
      answered=1
      break
    fi
    sleep 0.01
  done
  ms=$(( ($(date +%s%N) - t0) / 1000000 ))
  if [ "$answered" = 0 ]; then
    echo "restart $i: no answer within 30 s; data and logs kept in $work" >&2
    exit 1
  fi
  [ "$ms" -gt 2000 ] && slow=$((slow + 1))
  times+=("$ms")
  "$BIN_DIR/shardlog-bench" --addr "127.0.0.1:$port" -c 8 -P 4 --record-bytes 200 --ack durable \
    --duration "0.$((RANDOM % 8 + 2))s" >/dev/null 2>&1 &
  bench_pid=$!
  sleep "0.$((RANDOM % 5 + 1))"
  kill -9 "$daemon_pid"
  wait "$daemon_pid" 2>/dev/null || true
  wait "$bench_pid" 2>/dev/null || true
  daemon_pid=
  bench_pid=
  echo "restart $i: answered after $ms ms"
done
sorted=$(printf '%s\n' "${times[@]}" | sort -n)
echo "restart-loop: $rounds restarts, $slow slower than 2 s; time to answer min $(echo "$sorted" | head -1) ms," \
  "median $(echo "$sorted" | sed -n "$(( (rounds + 1) / 2 ))p") ms, max $(echo "$sorted" | tail -1) ms"
rm -rf "$work"
