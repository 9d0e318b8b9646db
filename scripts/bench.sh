#!/usr/bin/env bash
# One command for shardlog's benchmark report.
#
# Measures, in the same run and on the same filesystem:
#   - the device floor with fio (4 KiB O_DIRECT write+fdatasync latency, 1 MiB write+fdatasync bandwidth,
#     both on a preallocated, zero-filled file);
#   - Redis 7 RPUSH with `appendonly yes` and `appendfsync always` (durable) or `appendfsync no`;
#   - shardlogd under shardlog-bench over a matrix of connections, pipeline depth, record size, records per
#     frame and ack level, and both durability modes (linked, dsync) side by side;
#   - the CPU each process spends per record at every point: shardlogd and redis-server from /proc/PID/stat
#     (utime + stime) before and after the load, shardlog-bench and redis-benchmark from their own rusage
#     (wait4), since client and server share the machine's vCPUs;
#   - a cluster on this one machine: aggregate records/s and CPU per record for 1 daemon and for 3 daemons
#     (own data directories, loopback), shardlog-bench with --addr repeated; on a 2-vCPU machine this measures
#     the overhead of running more daemons, not scaling;
#   - restart: shardlogd's clean and crash restart times as the log grows to 100 GB worth of segments, and
#     its crash recovery rate next to fio's sequential read (scripts/restart-time.sh);
#   - filtered reads: reading a stream that holds 1% of a shard's records through the stream index and the
#     stream runs, against reading just those records (shards/examples/stream_read.rs);
# then writes docs/BENCHMARKS.md (tables with ratios against fio and Redis) and docs/benchmarks.svg.
#
# Usage: scripts/bench.sh [--quick | --cluster-only] [--work-dir DIR] [--no-install]
#   --quick       about 2 minutes: a trimmed matrix, 2 s per point (default: the full matrix, 5 s per point)
#   --cluster-only  only the cluster points (1 and 3 daemons, 2 s each), printed; docs/ is not rewritten
#   --work-dir    where data files, fio's file and raw results go (default: $CARGO_TARGET_DIR or target/, then
#                 bench-run/); it must be a real disk filesystem (ext4, xfs), not tmpfs
#   --no-install  do not apt-get install fio / redis if they are missing
#
# Every process started here is stopped on exit (trap). Only 127.0.0.1 ports are used.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
COMMAND="scripts/bench.sh $*"
# The tree as it is before this run writes docs/.
GIT_DESC="$(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo unknown)$(cd "$ROOT" && git diff --quiet 2>/dev/null || echo ' (with local changes)')"
MODE=full
INSTALL=1
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
WORK=$TARGET_DIR/bench-run
while (($#)); do
    case "$1" in
        --quick) MODE=quick ;;
        --cluster-only) MODE=cluster ;;
        --no-install) INSTALL=0 ;;
        --work-dir) WORK=$2; shift ;;
        -h|--help) sed -n '2,/^set -euo/{/^#/p}' "$0"; exit 0 ;;
        *) echo "bench.sh: unknown option $1 (try --help)" >&2; exit 2 ;;
    esac
    shift
done

if [[ $MODE == quick || $MODE == cluster ]]; then
    DURATION=2s; WARMUP=500ms; FIO_SECONDS=3; REDIS_SECONDS=2
else
    DURATION=5s; WARMUP=1s; FIO_SECONDS=8; REDIS_SECONDS=5
fi
# The load generator runs on one thread (one epoll loop), like redis-benchmark's single thread.
BENCH_THREADS=${BENCH_THREADS:-1}

log() { printf '[bench.sh %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# ------------------------------------------------------------------ cleanup
PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        # Give each a moment for a clean shutdown, then make sure.
        for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        kill -9 "$pid" 2>/dev/null || true
    done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

forget_pid() {
    local keep=() p
    for p in "${PIDS[@]}"; do [[ $p == "$1" ]] || keep+=("$p"); done
    PIDS=("${keep[@]}")
}

# ------------------------------------------------------------------ tools
if [[ $MODE == cluster ]]; then
    INSTALL=0 # only python3 and the release binaries are needed
    command -v python3 >/dev/null || die "python3 is missing"
elif ((INSTALL)); then
    need=()
    command -v fio >/dev/null || need+=(fio)
    command -v redis-server >/dev/null || need+=(redis-server)
    command -v redis-benchmark >/dev/null || need+=(redis-tools)
    command -v python3 >/dev/null || need+=(python3)
    if ((${#need[@]})); then
        log "installing ${need[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
    fi
fi
if [[ $MODE != cluster ]]; then
    for tool in fio redis-server redis-cli redis-benchmark python3; do
        command -v "$tool" >/dev/null || die "$tool is missing (run without --no-install, or install it)"
    done
fi

mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
FSTYPE=$(df -T "$WORK" | awk 'NR==2 {print $2}')
[[ $FSTYPE == tmpfs ]] && die "$WORK is on tmpfs: O_DIRECT and fdatasync mean nothing there; pass --work-dir on a disk"
RESULTS=$WORK/results
# --cluster-only keeps its results apart, so a full run's stay.
[[ $MODE == cluster ]] && RESULTS=$WORK/results-cluster
rm -rf "$RESULTS" "$WORK/data" "$WORK/redis"
mkdir -p "$RESULTS" "$WORK/redis"

# ------------------------------------------------------------------ build
log "building release binaries"
(cd "$ROOT" && cargo build --release -p daemon -p bench --bins -q)
SHARDLOGD=$TARGET_DIR/release/shardlogd
BENCH=$TARGET_DIR/release/shardlog-bench
[[ -x $SHARDLOGD && -x $BENCH ]] || die "release binaries not found under $TARGET_DIR/release"

# ------------------------------------------------------------------ fio: the device floor
if [[ $MODE != cluster ]]; then
    log "fio: device floor on a zero-filled preallocated file in $WORK"
    FIO_FILE=$WORK/fio.dat
    dd if=/dev/zero of="$FIO_FILE" bs=1M count=1024 oflag=direct conv=fsync status=none
    fio --name=write4k_fdatasync --filename="$FIO_FILE" --size=1G --rw=write --bs=4k --direct=1 --ioengine=sync \
        --fdatasync=1 --runtime="$FIO_SECONDS" --time_based --output-format=json >"$RESULTS/fio-4k.json"
    fio --name=write1m_fdatasync --filename="$FIO_FILE" --size=1G --rw=write --bs=1M --direct=1 --ioengine=sync \
        --fdatasync=1 --runtime="$FIO_SECONDS" --time_based --output-format=json >"$RESULTS/fio-1m.json"
    rm -f "$FIO_FILE"
fi

# ------------------------------------------------------------------ CPU accounting
# CPU seconds (user + system) a process has used so far, from /proc/PID/stat (fields 14 and 15, in clock
# ticks; the command name in field 2 may hold spaces, so count from the `)` that ends it).
CLK_TCK=$(getconf CLK_TCK)
proc_cpu_s() { # pid
    sed 's/^.*) //' "/proc/$1/stat" | awk -v hz="$CLK_TCK" '{printf "%.2f\n", ($12 + $13) / hz}'
}
# Runs a command with its stdout in one file and its stderr in another (`-`: the same file), and prints the
# CPU seconds (user + system) it used, from its own rusage (wait4, microsecond resolution): no other process
# is counted, the wrapper included.
CPU_OF=$WORK/cpu_of.py
cat >"$CPU_OF" <<'PY'
import os, sys
out, err, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
actions = [(os.POSIX_SPAWN_OPEN, 1, out, flags, 0o644)]
actions.append((os.POSIX_SPAWN_DUP2, 1, 2) if err == "-" else (os.POSIX_SPAWN_OPEN, 2, err, flags, 0o644))
pid = os.posix_spawnp(argv[0], argv, os.environ, file_actions=actions)
_, status, ru = os.wait4(pid, 0)
print("%.6f" % (ru.ru_utime + ru.ru_stime))
sys.exit(os.waitstatus_to_exitcode(status))
PY
cpu_of() { # stdout-file stderr-file|- command... -> CPU seconds on stdout; the command's exit status
    python3 "$CPU_OF" "$@"
}

# ------------------------------------------------------------------ redis
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

REDIS_PID=
REDIS_PORT=
start_redis() { # $1: appendfsync policy (always|no)
    stop_redis
    rm -rf "$WORK/redis" && mkdir -p "$WORK/redis"
    REDIS_PORT=$(free_port)
    redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --dir "$WORK/redis" --appendonly yes \
        --appendfsync "$1" --save '' --daemonize no --logfile "$WORK/redis-$1.log" &
    REDIS_PID=$!
    PIDS+=("$REDIS_PID")
    for _ in $(seq 100); do
        redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    die "redis-server did not start (see $WORK/redis-$1.log)"
}
stop_redis() {
    [[ -n $REDIS_PID ]] || return 0
    redis-cli -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || kill "$REDIS_PID" 2>/dev/null || true
    wait "$REDIS_PID" 2>/dev/null || true
    forget_pid "$REDIS_PID"
    REDIS_PID=
}

# redis-benchmark has no duration option: a short probe measures the rate, then the real run asks for
# about REDIS_SECONDS worth of requests.
redis_bench() { # c P S n -> CSV on stdout
    redis-benchmark -h 127.0.0.1 -p "$REDIS_PORT" -c "$1" -P "$2" -n "$4" -t rpush -d "$3" --csv 2>/dev/null
}
csv_rps() {
    awk -F'","' '/RPUSH/ {print int($2)}' | head -1
}

redis_point() { # policy c P S
    local policy=$1 c=$2 p=$3 s=$4
    local out="$RESULTS/redis-$policy-c$c-P$p-S$s.csv"
    local cpu="$RESULTS/redis-$policy-c$c-P$p-S$s.cpu"
    [[ -s $out ]] && return 0
    log "redis appendfsync=$policy c=$c P=$p S=$s"
    redis-cli -p "$REDIS_PORT" flushall >/dev/null
    local probe=$((c * p * 20)) rps n
    ((probe < 500)) && probe=500
    rps=$(redis_bench "$c" "$p" "$s" "$probe" | csv_rps)
    [[ -n $rps && $rps -gt 0 ]] || { log "redis-benchmark probe failed: $policy c=$c P=$p S=$s"; return 0; }
    n=$((rps * REDIS_SECONDS))
    ((n < probe)) && n=$probe
    redis-cli -p "$REDIS_PORT" flushall >/dev/null
    local before after client_cpu rc=0
    before=$(proc_cpu_s "$REDIS_PID")
    client_cpu=$(cpu_of "$out" /dev/null redis-benchmark -h 127.0.0.1 -p "$REDIS_PORT" -c "$c" -P "$p" -n "$n" -t rpush \
        -d "$s" --csv) || rc=$?
    after=$(proc_cpu_s "$REDIS_PID")
    ((rc == 0)) || log "redis-benchmark failed: $policy c=$c P=$p S=$s"
    printf 'records=%s\nserver_cpu_s=%s\nclient_cpu_s=%s\n' "$n" \
        "$(awk -v a="$after" -v b="$before" 'BEGIN {printf "%.2f", a - b}')" "$client_cpu" >"$cpu"
}

# ------------------------------------------------------------------ shardlogd
DAEMON_PID=
ADDR=
start_daemon() { # $1: durability (linked|dsync)
    stop_daemon
    rm -rf "$WORK/data"
    "$SHARDLOGD" --listen 127.0.0.1:0 --data-dir "$WORK/data" --durability "$1" --log warn \
        >"$WORK/daemon.out" 2>>"$WORK/daemon.log" &
    DAEMON_PID=$!
    PIDS+=("$DAEMON_PID")
    ADDR=
    for _ in $(seq 300); do
        ADDR=$(sed -n 's/^shardlogd listening on //p' "$WORK/daemon.out")
        [[ -n $ADDR ]] && return 0
        kill -0 "$DAEMON_PID" 2>/dev/null || die "shardlogd exited at startup (see $WORK/daemon.log)"
        sleep 0.1
    done
    die "shardlogd did not print its address within 30 s"
}
stop_daemon() {
    [[ -n $DAEMON_PID ]] || return 0
    kill "$DAEMON_PID" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$DAEMON_PID" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$DAEMON_PID" 2>/dev/null || true
    wait "$DAEMON_PID" 2>/dev/null || true
    forget_pid "$DAEMON_PID"
    DAEMON_PID=
}

# One measured point on a fresh daemon, so every point starts from empty, pre-zeroed segments.
shardlog_point() { # durability c P S B ack
    local dur=$1 c=$2 p=$3 s=$4 b=$5 ack=$6
    local id="shardlog-$dur-$ack-c$c-P$p-S$s-B$b"
    [[ -s $RESULTS/$id.json ]] && return 0
    local series="$ack S=$s B=$b"
    series+=" P=$p"
    [[ $dur != "$DEFAULT_DURABILITY" ]] && series+=" ($dur)"
    start_daemon "$dur"
    log "shardlog $dur ack=$ack c=$c P=$p S=$s B=$b"
    local rc=0 before after client_cpu
    before=$(proc_cpu_s "$DAEMON_PID")
    client_cpu=$(cpu_of "$RESULTS/$id.txt" - "$BENCH" --addr "$ADDR" --threads "$BENCH_THREADS" -c "$c" -P "$p" \
        -S "$s" -B "$b" --ack "$ack" --streams 1024 --duration "$DURATION" --warmup "$WARMUP" \
        --response-timeout 10s --label "$series" -q --json "$RESULTS/$id.json" --hgrm "$RESULTS/$id.hgrm") || rc=$?
    after=$(proc_cpu_s "$DAEMON_PID")
    ((rc == 0)) || log "shardlog-bench exited with $rc for $id (see $RESULTS/$id.txt)"
    # Records for these CPU figures: the report's `cpu.records` (warm-up and drain included, like the CPU).
    printf 'server_cpu_s=%s\nclient_cpu_s=%s\n' \
        "$(awk -v a="$after" -v b="$before" 'BEGIN {printf "%.2f", a - b}')" "$client_cpu" >"$RESULTS/$id.cpu"
    stop_daemon
}

# The daemon's default durability mode (the matrix runs with it), read from its --help.
DEFAULT_DURABILITY=$("$SHARDLOGD" --help | awk '/--durability/ {f = 1} f && /default: / {
    match($0, /default: [a-z]+/); print substr($0, RSTART + 9, RLENGTH - 9); exit }')
[[ $DEFAULT_DURABILITY == linked || $DEFAULT_DURABILITY == dsync ]] ||
    die "could not read the default of --durability from shardlogd --help (got '$DEFAULT_DURABILITY')"

# ------------------------------------------------------------------ a cluster on this machine
# The same load against 1 daemon and against a cluster of 3 (each with its own data directory, default
# shard count, unpinned so that three daemons do not pin their executors onto the same cores): shardlog-bench
# with --addr repeated reaches every daemon from each connection and sends each append to its stream's home.
# The daemons' CPU is the sum over all of them. Both vCPUs are shared by every daemon and the generator, so
# 3 daemons can only show the overhead of more processes, sockets and fdatasyncs, not scaling.
CLUSTER_POINT="64 16 1024 1 durable" # c P S B ack
start_cluster_daemon() { # index -> sets CLUSTER_PID, CLUSTER_ADDR
    local i=$1 out=$WORK/cluster/d$1.out
    mkdir -p "$WORK/cluster/d$i"
    "$SHARDLOGD" --listen 127.0.0.1:0 --data-dir "$WORK/cluster/d$i" --pin none --log warn \
        >"$out" 2>>"$WORK/cluster/d$i.log" &
    CLUSTER_PID=$!
    PIDS+=("$CLUSTER_PID")
    CLUSTER_ADDR=
    for _ in $(seq 300); do
        CLUSTER_ADDR=$(sed -n 's/^shardlogd listening on //p' "$out")
        [[ -n $CLUSTER_ADDR ]] && return 0
        kill -0 "$CLUSTER_PID" 2>/dev/null || die "shardlogd $i exited at startup (see $WORK/cluster/d$i.log)"
        sleep 0.1
    done
    die "shardlogd $i did not print its address within 30 s"
}
cluster_point() { # daemons
    local n=$1 id="cluster-d$1" i rc=0 before=0 after=0 client_cpu pid
    [[ -s $RESULTS/$id.json ]] && return 0
    local c p s b ack pids=() addrs=()
    read -r c p s b ack <<<"$CLUSTER_POINT"
    rm -rf "$WORK/cluster"
    for ((i = 0; i < n; i++)); do
        start_cluster_daemon "$i"
        pids+=("$CLUSTER_PID")
        addrs+=(--addr "$CLUSTER_ADDR")
    done
    log "cluster of $n daemon(s): ack=$ack c=$c P=$p S=$s B=$b"
    for pid in "${pids[@]}"; do before=$(awk -v a="$before" -v b="$(proc_cpu_s "$pid")" 'BEGIN {print a + b}'); done
    client_cpu=$(cpu_of "$RESULTS/$id.txt" - "$BENCH" "${addrs[@]}" --threads "$BENCH_THREADS" -c "$c" -P "$p" \
        -S "$s" -B "$b" --ack "$ack" --streams 1024 --duration "$DURATION" --warmup "$WARMUP" \
        --response-timeout 10s --label "$n daemon(s)" -q --json "$RESULTS/$id.json") || rc=$?
    for pid in "${pids[@]}"; do after=$(awk -v a="$after" -v b="$(proc_cpu_s "$pid")" 'BEGIN {print a + b}'); done
    ((rc == 0)) || log "shardlog-bench exited with $rc for $id (see $RESULTS/$id.txt)"
    printf 'daemons=%s\nserver_cpu_s=%s\nclient_cpu_s=%s\n' "$n" \
        "$(awk -v a="$after" -v b="$before" 'BEGIN {printf "%.2f", a - b}')" "$client_cpu" >"$RESULTS/$id.cpu"
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
        forget_pid "$pid"
    done
    rm -rf "$WORK/cluster"
}
# Writes the cluster table (Markdown) for the report, and prints it.
cluster_table() {
    python3 - "$RESULTS" "$(nproc)" "$CLUSTER_POINT" >"$RESULTS/cluster.md" <<'PY'
import json, os, sys
results, vcpus, point = sys.argv[1], sys.argv[2], sys.argv[3].split()
def load(path):
    try:
        return json.load(open(path))
    except (OSError, ValueError):
        return None
def kv(path):
    try:
        return dict(l.strip().split("=", 1) for l in open(path) if "=" in l)
    except OSError:
        return {}
def us(v):
    if v is None:
        return "-"
    return f"{v / 1000:.2f} ms" if v >= 1000 else (f"{v:.0f} us" if v >= 100 else f"{v:.1f} us")
c, p, s, b, ack = point
print(f"ack={ack}, c={c} connections (each reaching every daemon), P={p}, {s} B records, B={b}, 1024 streams. "
      f"CPU per record: the daemons' total and the generator's, over the records of the whole run.")
print()
print("| daemons | records/s (aggregate) | vs 1 daemon | p50 | p99 | daemons' CPU/rec | generator CPU/rec | errors |")
print("|---|---|---|---|---|---|---|---|")
base = None
for n in (1, 3):
    r, k = load(os.path.join(results, f"cluster-d{n}.json")), kv(os.path.join(results, f"cluster-d{n}.cpu"))
    if not r:
        print(f"| {n} | not measured | | | | | | |")
        continue
    rate = r.get("records_per_s") or 0.0
    base = rate if n == 1 else base
    records = ((r.get("cpu") or {}).get("records")) or 0
    per = lambda key: float(k[key]) * 1e6 / records if records and key in k else None
    lat = r.get("latency_us") or {}
    vs = f"{rate / base:.2f}x" if base else "-"
    print(f"| {n} | {rate:,.0f} | {vs} | {us(lat.get('p50'))} | {us(lat.get('p99'))} | {us(per('server_cpu_s'))} | "
          f"{us(per('client_cpu_s'))} | {r.get('errors_total', 0)} |")
print()
print(f"This machine has {vcpus} vCPUs, shared by every daemon and the generator: a cluster of 3 daemons here "
      "measures the overhead of more processes, sockets and fdatasyncs competing for the same cores and disk, "
      "not scaling. Scaling needs a host (or at least cores and a disk) per daemon.")
PY
    cat "$RESULTS/cluster.md"
}

if [[ $MODE == cluster ]]; then
    cluster_point 1
    cluster_point 3
    cluster_table
    log "done (--cluster-only): raw results in $RESULTS; docs/ not rewritten"
    exit 0
fi

# ------------------------------------------------------------------ the matrix
# Each entry: c P S B ack. Trimming (documented in BENCHMARKS.md):
#  - ack=none: P is the appends a connection queues before its writer sends them (nothing is awaited);
#  - B=64 at c=256: with P=16 that is 262,144 records of 1 KiB in flight, which only measures the daemon's
#    per-connection budget pushing back; kept at P=1 only;
#  - quick mode keeps the points the targets need plus the concurrency sweep of the 1 KiB durable series.
MATRIX=()
if [[ $MODE == quick ]]; then
    MATRIX=(
        "1 1 100 1 durable"
        "1 1 1024 1 durable"
        "16 1 1024 1 durable"
        "256 1 1024 1 durable"
        "1 16 1024 1 durable"
        "16 16 1024 1 durable"
        "256 16 1024 1 durable"
        "256 16 100 1 durable"
        "1 1 1024 64 durable"
        "16 16 1024 64 durable"
        "1 1 100 1 none"
        "256 1 100 1 none"
        "256 16 100 1 none"
    )
else
    for ack in durable none; do
        for c in 1 16 64 256; do
            for p in 1 16; do
                for s in 100 1024; do
                    for b in 1 64; do
                        [[ $b == 64 && $c == 256 && $p == 16 ]] && continue
                        MATRIX+=("$c $p $s $b $ack")
                    done
                done
            done
        done
    done
fi

log "shardlog matrix: ${#MATRIX[@]} points, $DURATION each after a $WARMUP warm-up (durability $DEFAULT_DURABILITY)"
for point in "${MATRIX[@]}"; do
    read -r c p s b ack <<<"$point"
    shardlog_point "$DEFAULT_DURABILITY" "$c" "$p" "$s" "$b" "$ack"
done

log "durability modes side by side"
for dur in linked dsync; do
    shardlog_point "$dur" 1 1 100 1 durable
    shardlog_point "$dur" 64 16 1024 1 durable
done

log "a cluster on this machine: 1 and 3 daemons"
cluster_point 1
cluster_point 3
cluster_table >/dev/null

log "redis: appendfsync always / no"
start_redis always
for point in "${MATRIX[@]}"; do
    read -r c p s b ack <<<"$point"
    [[ $ack == durable && $b == 1 ]] && redis_point always "$c" "$p" "$s"
done
# The side-by-side points land in the table too.
redis_point always 1 1 100
redis_point always 64 16 1024
start_redis no
for point in "${MATRIX[@]}"; do
    read -r c p s b ack <<<"$point"
    [[ $ack == none && $b == 1 ]] && redis_point no "$c" "$p" "$s"
done
stop_redis

# ------------------------------------------------------------------ report
# ------------------------------------------------- the engine without the network
# The shard's commit path alone (both durability modes, 1/16/256 appenders, rotator busy),
# against a bare O_DSYNC 4 KiB write loop measured in the same run.
log "cargo bench -p shards (engine, both durability modes)"
if ! SHARDS_BENCH_DIR="$WORK/engine" cargo bench -q -p shards --bench append >"$RESULTS/engine.txt" 2>"$RESULTS/engine.err"; then
    log "cargo bench -p shards failed (see $RESULTS/engine.err)"
fi
log "criterion: frame codec (proto) and commit serialisation (shards), CPU only"
CRITERION_ARGS=(-- --warm-up-time 1 --measurement-time 2)
: >"$RESULTS/criterion.txt"
for bench in "proto codec" "shards commit"; do
    read -r pkg name <<<"$bench"
    cargo bench -q -p "$pkg" --bench "$name" "${CRITERION_ARGS[@]}" >>"$RESULTS/criterion.txt" 2>>"$RESULTS/criterion.err" ||
        log "cargo bench -p $pkg --bench $name failed (see $RESULTS/criterion.err)"
done

# ------------------------------------------------- restart
# Clean and crash restart as the log grows (1,600 sparse 64 MiB segments = "100 GB worth"), page cache
# dropped before each start; its own script, so it can be run alone.
if [[ $MODE == quick ]]; then RESTART_SEGMENTS="1 1000 1600"; else RESTART_SEGMENTS="1 10 100 1000 1600"; fi
log "restart times: $RESTART_SEGMENTS segments (scripts/restart-time.sh)"
if ! "$ROOT/scripts/restart-time.sh" --no-install --segments "$RESTART_SEGMENTS" --work-dir "$WORK/restart" \
    --out "$RESULTS/restart" >/dev/null 2>"$RESULTS/restart.err"; then
    log "scripts/restart-time.sh failed (see $RESULTS/restart.err)"
fi

# ------------------------------------------------- filtered reads (stream index)
# A read filtered to a stream that holds 1% of a shard's records, against reading the same records from a
# shard that holds only them; O_DIRECT reads, so the page cache plays no part. Its own example binary.
if [[ $MODE == quick ]]; then STREAM_READ_MIB=128; else STREAM_READ_MIB=256; fi
log "filtered reads: a 1% stream of $STREAM_READ_MIB MiB vs its records alone (shards/examples/stream_read.rs)"
if ! (cd "$ROOT" && cargo build --release -q -p shards --example stream_read) ||
    ! "$TARGET_DIR/release/examples/stream_read" "$WORK/stream-read" --log-mib "$STREAM_READ_MIB" --rounds 3 \
        >"$RESULTS/stream_read.jsonl" 2>"$RESULTS/stream_read.err"; then
    log "stream_read failed (see $RESULTS/stream_read.err)"
fi
rm -rf "$WORK/stream-read"
# The device's floor for the interleaved shape, whose 1% stream lies in single records spread over the log:
# as many random 4 KiB O_DIRECT reads as the stream has records, from a file the size of the log, 4 in flight
# (as the filtered read), fastest of 3. No read that leaves the records where group commit put them can be
# faster.
RANDREAD_SHAPE=$(python3 -c '
import json, sys
for line in open(sys.argv[1]):
    row = json.loads(line) if line.strip() else {}
    if row.get("shape") == "interleaved":
        print(row["rare_records"], row["log_bytes"])
' "$RESULTS/stream_read.jsonl" 2>/dev/null || true)
if [[ -n $RANDREAD_SHAPE ]]; then
    read -r RANDREAD_IOS RANDREAD_BYTES <<<"$RANDREAD_SHAPE"
    RANDREAD_FILE=$WORK/randread.dat
    dd if=/dev/zero of="$RANDREAD_FILE" bs=1M count=$((RANDREAD_BYTES >> 20)) oflag=direct conv=fsync status=none
    for round in 1 2 3; do
        fio --name=randread4k --filename="$RANDREAD_FILE" --rw=randread --bs=4k --direct=1 --ioengine=io_uring \
            --iodepth=4 --number_ios="$RANDREAD_IOS" --output-format=json >"$RESULTS/fio-randread-$round.json" ||
            log "fio randread failed"
    done
    rm -f "$RANDREAD_FILE"
fi

log "writing docs/BENCHMARKS.md and docs/benchmarks.svg"
mkdir -p "$ROOT/docs"
"$BENCH" chart --title "shardlogd on $(nproc) vCPUs ($MODE run)" --out "$ROOT/docs/benchmarks.svg" \
    "$RESULTS"/shardlog-"$DEFAULT_DURABILITY"-*.json >/dev/null

{
    echo "kernel=$(uname -r)"
    echo "cpu=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)"
    echo "vcpus=$(nproc)"
    echo "mem=$(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo)"
    echo "fs=$FSTYPE on $(df "$WORK" | awk 'NR==2 {print $1}')"
    echo "rustc=$(rustc --version)"
    echo "fio=$(fio --version)"
    echo "redis=$(redis-server --version | sed 's/ sha=.*//')"
    echo "git=$GIT_DESC"
    echo "date=$(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "mode=$MODE"
    echo "duration=$DURATION"
    echo "warmup=$WARMUP"
    echo "durability_default=$DEFAULT_DURABILITY"
    echo "bench_threads=$BENCH_THREADS"
    echo "command=$COMMAND"
} >"$RESULTS/env.txt"

python3 - "$RESULTS" "$ROOT/docs/BENCHMARKS.md" <<'PY'
import csv, glob, json, os, re, sys

results, out_path = sys.argv[1], sys.argv[2]
env = dict(line.rstrip("\n").split("=", 1) for line in open(os.path.join(results, "env.txt")) if "=" in line)

def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None

# ---- fio
def fio_summary(path):
    data = load(path)
    if not data:
        return None
    job = data["jobs"][0]
    w = job["write"]
    pct = lambda d, k: (d or {}).get("percentile", {}).get(k)
    clat = w.get("clat_ns", {})
    sync = job.get("sync", {}).get("lat_ns", {})
    return {
        "iops": w.get("iops", 0.0),
        "bw_bytes": w.get("bw_bytes", 0),
        "write_p50_us": (pct(clat, "50.000000") or 0) / 1000,
        "write_p99_us": (pct(clat, "99.000000") or 0) / 1000,
        "sync_p50_us": (pct(sync, "50.000000") or 0) / 1000,
        "sync_p99_us": (pct(sync, "99.000000") or 0) / 1000,
    }

fio4k = fio_summary(os.path.join(results, "fio-4k.json"))
fio1m = fio_summary(os.path.join(results, "fio-1m.json"))
fio4k_p50 = fio4k and fio4k["write_p50_us"] + fio4k["sync_p50_us"]

# ---- redis
def redis(policy, c, p, s):
    path = os.path.join(results, f"redis-{policy}-c{c}-P{p}-S{s}.csv")
    try:
        rows = list(csv.DictReader(open(path)))
    except OSError:
        return None
    for row in rows:
        if row.get("test", "").upper().startswith("RPUSH"):
            return {
                "rps": float(row["rps"]),
                "p50_us": float(row.get("p50_latency_ms", "nan")) * 1000,
                "p99_us": float(row.get("p99_latency_ms", "nan")) * 1000,
            }
    return None

# ---- shardlog
runs = {}
for path in sorted(glob.glob(os.path.join(results, "shardlog-*.json"))):
    r = load(path)
    if r:
        runs[os.path.basename(path)[: -len(".json")]] = r

def run(dur, ack, c, p, s, b):
    return runs.get(f"shardlog-{dur}-{ack}-c{c}-P{p}-S{s}-B{b}")

def failed(r):
    return r is not None and (r.get("stopped_early") is not None or (r["config"]["ack"] == "none" and not r.get("drain")))

def rate(r):
    """Records/s; for ack=none the rate including the daemon's drain. None for a run that failed."""
    if r is None or failed(r):
        return None
    return r["drain"]["records_per_s"] if r.get("drain") else r["records_per_s"]

def lat(r, k):
    if r is None or failed(r):
        return None
    return r.get("latency_us", None) and r["latency_us"][k]

def fmt_n(v):
    if v is None:
        return "n/a"
    if v >= 1e6:
        return f"{v/1e6:.2f}M"
    if v >= 1e4:
        return f"{v/1e3:.0f}K"
    if v >= 1e3:
        return f"{v/1e3:.1f}K"
    return f"{v:.0f}"

def fmt_us(v):
    if v is None or v != v:
        return "n/a"
    if v >= 10000:
        return f"{v/1000:.1f} ms"
    if v >= 1000:
        return f"{v/1000:.2f} ms"
    return f"{v:.0f} us"

def ratio(a, b):
    if a is None or b is None or b == 0 or a != a or b != b:
        return "n/a"
    return f"{a/b:.2f}x"

# ---- CPU per record: server from /proc/PID/stat around the load, client from its own rusage
def kv_file(path):
    try:
        return dict(line.strip().split("=", 1) for line in open(path) if "=" in line)
    except (OSError, ValueError):
        return None

def per_record_us(cpu_s, records):
    try:
        cpu_s, records = float(cpu_s), float(records)
    except (TypeError, ValueError):
        return None
    return cpu_s * 1e6 / records if records > 0 else None

def shardlog_cpu(r, key):
    """(shardlogd, shardlog-bench) CPU us per record of a run; the records are the report's `cpu.records`
    (warm-up and drain included, as the CPU is)."""
    c = kv_file(os.path.join(results, key + ".cpu"))
    n = ((r or {}).get("cpu") or {}).get("records")
    if not c or not n:
        return (None, None)
    return (per_record_us(c.get("server_cpu_s"), n), per_record_us(c.get("client_cpu_s"), n))

def redis_cpu(policy, c, p, s):
    """(redis-server, redis-benchmark) CPU us per record (one RPUSH element each)."""
    k = kv_file(os.path.join(results, f"redis-{policy}-c{c}-P{p}-S{s}.cpu"))
    if not k:
        return (None, None)
    return (per_record_us(k.get("server_cpu_s"), k.get("records")), per_record_us(k.get("client_cpu_s"), k.get("records")))

def fmt_cpu(v):
    if v is None or v != v:
        return "n/a"
    return f"{v:.1f} us" if v < 100 else f"{v:.0f} us"

D = env.get("durability_default", "dsync")
lines = []
w = lines.append
w("# shardlog benchmarks")
w("")
w("Generated by `scripts/bench.sh`; do not edit by hand. Every baseline below was measured in the same run, on")
w("the same machine and filesystem, right next to the shardlog figures, and shardlog is reported as ratios")
w("against them.")
w("")
w("## Machine and versions")
w("")
for key, name in [("cpu", "CPU"), ("vcpus", "vCPUs"), ("mem", "memory"), ("kernel", "kernel"), ("fs", "filesystem"),
                  ("rustc", "rustc"), ("fio", "fio"), ("redis", "Redis"), ("git", "shardlog commit"), ("date", "run at")]:
    w(f"- {name}: {env.get(key, 'unknown')}")
w("")
w(f"Command: `{env.get('command', 'scripts/bench.sh')}` ({env.get('mode')} mode: {env.get('duration')} per point after a "
  f"{env.get('warmup')} warm-up; shardlogd with its defaults and `--durability {D}` unless stated; one fresh daemon and "
  f"data directory per point; shardlog-bench (one epoll loop) and redis-benchmark each on one client thread; client "
  f"and server share the {env.get('vcpus')} vCPUs).")
w("")

w("## Targets")
w("")
w("| target | shardlog | baseline | ratio | goal | met |")
w("|---|---|---|---|---|---|")
def target(name, value, base, goal_text, ok, fmt=fmt_us):
    met = "n/a" if ok is None else ("yes" if ok else "**no**")
    w(f"| {name} | {fmt(value)} | {fmt(base)} | {ratio(value, base)} | {goal_text} | {met} |")

r1 = run(D, "durable", 1, 1, 100, 1)
red1 = redis("always", 1, 1, 100)
v, bse = lat(r1, "p50"), red1 and red1["p50_us"]
target("c=1 durable 100 B p50 vs Redis AOF always p50", v, bse, "<= 1.0x", None if v is None or bse is None else v <= bse)
target("c=1 durable 100 B p50 vs fio 4 KiB write+fdatasync p50", v, fio4k_p50, "<= 2.0x",
       None if v is None or not fio4k_p50 else v <= 2.0 * fio4k_p50)
v, bse = shardlog_cpu(r1, f"shardlog-{D}-durable-c1-P1-S100-B1")[1], redis_cpu("always", 1, 1, 100)[1]
target("c=1 durable 100 B: shardlog-bench CPU per record vs redis-benchmark's", v, bse, "<= 1.0x",
       None if v is None or bse is None else v <= bse, fmt_cpu)
r2 = run(D, "durable", 256, 16, 1024, 1)
red2 = redis("always", 256, 16, 1024)
v, bse = rate(r2), red2 and red2["rps"]
target("1 KiB durable c=256 P=16 records/s vs Redis AOF always", v, bse, ">= 2x",
       None if v is None or bse is None else v >= 2 * bse, fmt_n)
v, bse = lat(r2, "p99"), red2 and red2["p99_us"]
target("1 KiB durable c=256 P=16 p99 vs Redis AOF always p99", v, bse, "<= 1.0x",
       None if v is None or bse is None else v <= bse)
v, bse = shardlog_cpu(r2, f"shardlog-{D}-durable-c256-P16-S1024-B1")[1], redis_cpu("always", 256, 16, 1024)[1]
target("1 KiB durable c=256 P=16: shardlog-bench CPU per record vs redis-benchmark's", v, bse, "<= 1.0x",
       None if v is None or bse is None else v <= bse, fmt_cpu)
v, bse = shardlog_cpu(r2, f"shardlog-{D}-durable-c256-P16-S1024-B1")[0], redis_cpu("always", 256, 16, 1024)[0]
target("1 KiB durable c=256 P=16: shardlogd CPU per record vs redis-server's", v, bse, "<= 0.5x",
       None if v is None or bse is None else v <= 0.5 * bse, fmt_cpu)
bw = max([r["mb_per_s"] * 1e6 for k, r in runs.items()
          if k.startswith(f"shardlog-{D}-durable-") and k.endswith("-S1024-B64") and not failed(r)], default=None)
fbw = fio1m and fio1m["bw_bytes"]
target("64 x 1 KiB per frame, durable: MB/s vs fio 1 MiB write+fdatasync (best point)", bw and bw / 1e6,
       fbw and fbw / 1e6, ">= 0.5x", None if bw is None or not fbw else bw >= 0.5 * fbw, lambda x: "n/a" if x is None else f"{x:.0f} MB/s")
restart_rows = []
try:
    restart_rows = list(csv.DictReader(open(os.path.join(results, "restart", "restart.tsv")), delimiter="\t"))
except OSError:
    pass
if restart_rows:
    big = max(restart_rows, key=lambda r: int(r["segments"]) * int(r["segment_bytes"]))
    v = int(big["clean_us"])
    target(f"clean restart to listening, {int(big['segments']) * int(big['segment_bytes']) / 1e9:.0f} GB worth of segments "
           f"({big['segments']})", v, None, "< 1 s", v < 1_000_000)
    worst = min(restart_rows, key=lambda r: int(r["crash_bytes_read"]) / max(int(r["crash_scan_us"]), 1))
    v = int(worst["crash_bytes_read"]) / max(int(worst["crash_scan_us"]), 1) / 1e3
    base = int(worst["fio_bps"]) / 1e9
    target("crash recovery of the active segment, GB/s (worst row) vs fio sequential read, same size, best read shape", v, base,
           ">= 1 GB/s", v >= 1.0, lambda x: "n/a" if x is None else f"{x:.2f} GB/s")
stream_reads = {}
try:
    for line in open(os.path.join(results, "stream_read.jsonl")):
        if line.strip():
            row = json.loads(line)
            stream_reads[row["shape"]] = row
except (OSError, ValueError):
    pass
for shape in ("batched", "interleaved"):
    sr = stream_reads.get(shape)
    if sr:
        target(f"read of a stream holding 1% of {sr['log_bytes'] / 2**20:.0f} MiB ({shape}) vs reading its records alone",
               sr["filtered_us"], sr["baseline_us"], "<= 2.0x", sr["filtered_us"] <= 2 * sr["baseline_us"])
randread_us = []
for round_ in (1, 2, 3):
    try:
        job = json.load(open(os.path.join(results, f"fio-randread-{round_}.json")))["jobs"][0]["read"]
        if job["iops"] > 0:
            randread_us.append(job["total_ios"] / job["iops"] * 1e6)
    except (OSError, ValueError, KeyError, IndexError):
        pass
randread_us = min(randread_us) if randread_us else None
none_runs = [(k, r) for k, r in runs.items()
             if k.startswith(f"shardlog-{D}-none-") and k.endswith("-S100-B1") and not failed(r)]
if none_runs:
    k, rn = max(none_runs, key=lambda kv: (kv[1]["config"]["connections"], kv[1]["config"]["pipeline"]))
    c, p = rn["config"]["connections"], rn["config"]["pipeline"]
    redn = redis("no", c, p, 100)
    v, bse = rate(rn), redn and redn["rps"]
    target(f"ack=none 100 B c={c} P={p} (drain-inclusive) vs Redis appendfsync no", v, bse, ">= 2x",
           None if v is None or bse is None else v >= 2 * bse, fmt_n)
w("")

w("## Device floor (fio, O_DIRECT, zero-filled preallocated file)")
w("")
if fio4k:
    w(f"- 4 KiB write + fdatasync: {fio4k['iops']:.0f} commits/s; write p50 {fmt_us(fio4k['write_p50_us'])}, "
      f"fdatasync p50 {fmt_us(fio4k['sync_p50_us'])}, sum of p50s {fmt_us(fio4k_p50)}; write p99 "
      f"{fmt_us(fio4k['write_p99_us'])}, fdatasync p99 {fmt_us(fio4k['sync_p99_us'])}")
if fio1m:
    w(f"- 1 MiB write + fdatasync: {fio1m['bw_bytes']/1e6:.0f} MB/s ({fio1m['iops']:.0f} commits/s)")
w("")
if fio4k and fio4k["iops"] < 5000:
    w(f"**The disk was busy during this run.** An otherwise idle machine of this kind does 7-8K 4 KiB commits/s with a")
    w(f"p50 near 130 us; this run got {fio4k['iops']:.0f}/s with a p99 of {fmt_us(fio4k['write_p99_us'] + fio4k['sync_p99_us'])}. Other")
    w("work shared the device (and the two vCPUs), so absolute figures below are pessimistic and noisy; the ratios")
    w("still compare systems measured under the same conditions, minutes apart.")
    w("")

w(f"## shardlog vs Redis (durability `{D}`)")
w("")
w("Records/s for ack=none is the drain-inclusive rate: the generator's sends, up to the moment one durable append")
w("per shard and connection came back. Redis durable = `appendonly yes, appendfsync always`; Redis for ack=none =")
w("`appendfsync no`, RPUSH of one element per command at the same c, P and payload. For ack=none shardlog's P is")
w("the appends a connection queues before its writer sends them, where Redis's P is the commands per round trip.")
w("The c=1 rows also compare with the fio 4 KiB commit latency.")
w("")
w("CPU columns are microseconds of CPU (user + system) per record, for each process of the point: shardlogd and")
w("redis-server from `/proc/PID/stat` before and after the load, shardlog-bench and redis-benchmark from their")
w("own rusage (`wait4`). Client and server share the vCPUs, so the client's cost is inside every rate here.")
w("shardlog's records include the warm-up and, for ack=none, the drain appends, as its CPU does.")
w("")
w("| ack | c | P | S | B | records/s | shardlogd CPU/rec | shardlog-bench CPU/rec | Redis CPU/rec | redis-benchmark CPU/rec | MB/s | p50 | p99 | p99.9 | errors | Redis rec/s | x Redis | Redis p50 | Redis p99 | p50 x Redis | p50 x fio |")
w("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
def key_of(k):
    r = runs[k]["config"]
    return (r["ack"] != "durable", r["record_bytes_min"], r["records_per_frame"], r["pipeline"], r["connections"])
failures = []
for k in sorted((k for k in runs if k.startswith(f"shardlog-{D}-")), key=key_of):
    r = runs[k]
    cfg = r["config"]
    c, p, s, b, ack = cfg["connections"], cfg["pipeline"], cfg["record_bytes_min"], cfg["records_per_frame"], cfg["ack"]
    red = None
    if b == 1:
        red = redis("always", c, p, s) if ack == "durable" else redis("no", c, p, s)
    rr = rate(r)
    red_rps = red and red["rps"]
    d_cpu, g_cpu = shardlog_cpu(r, k)
    r_cpu, rb_cpu = (None, None)
    if b == 1:
        r_cpu, rb_cpu = redis_cpu("always" if ack == "durable" else "no", c, p, s)
    cpu_cells = f"{fmt_cpu(d_cpu)} | {fmt_cpu(g_cpu)} | {fmt_cpu(r_cpu)} | {fmt_cpu(rb_cpu)}"
    # Compare records/s against Redis elements/s only for one record per request.
    if failed(r):
        why = r.get("stopped_early") or "the drain append was never acknowledged"
        w(f"| {ack} | {c} | {p} | {s} | {b} | failed: {why} | {cpu_cells} | | | | | "
          f"{r['errors_total']} | {fmt_n(red_rps)} | | | | | |")
        failures.append((k, why))
        continue
    w(f"| {ack} | {c} | {p} | {s} | {b} | {fmt_n(rr)} | {cpu_cells} | "
      f"{(r['drain']['mb_per_s'] if r.get('drain') else r['mb_per_s']):.1f} | {fmt_us(lat(r, 'p50'))} | "
      f"{fmt_us(lat(r, 'p99'))} | {fmt_us(lat(r, 'p999'))} | {r['errors_total']} | {fmt_n(red_rps)} | "
      f"{ratio(rr, red_rps)} | {fmt_us(red and red['p50_us'])} | {fmt_us(red and red['p99_us'])} | "
      f"{ratio(lat(r, 'p50'), red and red['p50_us'])} | "
      f"{ratio(lat(r, 'p50'), fio4k_p50) if (c, p, b) == (1, 1, 1) and ack != 'none' else ''} |")
w("")
if failures:
    w("Runs that did not complete (their figures are left out of every ratio):")
    w("")
    for k, why in failures:
        w(f"- `{k}`: {why}")
    w("")

w("## A cluster on this machine: 1 and 3 daemons")
w("")
cluster_md = os.path.join(results, "cluster.md")
if os.path.exists(cluster_md) and os.path.getsize(cluster_md) > 0:
    for line in open(cluster_md):
        w(line.rstrip("\n"))
else:
    w("(not measured in this run)")
w("")

w("## Durability modes side by side")
w("")
w("`linked`: write and fdatasync as a linked io_uring chain; `dsync`: one write with DSYNC semantics.")
w("The faster of the two is shardlogd's default (`--durability`); the engine table below compares them without")
w("the network. On these machines the kernel hands a linked fdatasync to an io-wq worker, while an O_DSYNC write's")
w("flush is issued by the block layer directly, so `dsync` is the default; `linked` stays fully supported.")
w("")
w("| point | mode | records/s | shardlogd CPU/rec | p50 | p99 | p99.9 |")
w("|---|---|---|---|---|---|---|")
for (c, p, s) in [(1, 1, 100), (64, 16, 1024)]:
    for dur in ("linked", "dsync"):
        r = run(dur, "durable", c, p, s, 1)
        d_cpu = shardlog_cpu(r, f"shardlog-{dur}-durable-c{c}-P{p}-S{s}-B1")[0]
        w(f"| c={c} P={p} S={s} | {dur} | {fmt_n(rate(r))} | {fmt_cpu(d_cpu)} | {fmt_us(lat(r, 'p50'))} | "
          f"{fmt_us(lat(r, 'p99'))} | {fmt_us(lat(r, 'p999'))} |")
w("")

engine = os.path.join(results, "engine.txt")
w("## The shard engine without the network")
w("")
w("`cargo bench -p shards --bench append`: 100-byte durable appends on one shard, 1 MiB segments so the background task is always")
w("preparing the next one; the baseline is a bare 4 KiB O_DSYNC write loop on a pre-zeroed file, measured in the same")
w("run. `x base` is appends/s against that baseline.")
w("")
if os.path.exists(engine) and os.path.getsize(engine) > 0:
    w("```text")
    for line in open(engine):
        if line.strip() and not line.startswith(("running", "test ", "Running")):
            w(line.rstrip())
    w("```")
    w("")
    rows = []
    for line in open(engine):
        m = re.match(r"^(shard \w+, c=\d+)\s+(\d+)\s+(\d+)\s+(\d+)", line)
        if m:
            rows.append((m.group(1), int(m.group(2)), int(m.group(3)), int(m.group(4))))
    if rows and fio4k and fio4k_p50:
        w(f"Against the device floor measured by fio in this run on the same file system (4 KiB O_DIRECT write + "
          f"fdatasync: {fio4k['iops']:.0f} commits/s, p50 {fmt_us(fio4k_p50)}): `x fio` is appends/s against "
          f"fio's commits/s, `p50 / fio` the append p50 against fio's write + fdatasync p50.")
        w("")
        w("| run | appends/s | x fio | p50 | p50 / fio | p99 |")
        w("|---|---|---|---|---|---|")
        for name, rate_, p50, p99 in rows:
            w(f"| {name} | {fmt_n(rate_)} | {rate_ / fio4k['iops']:.2f}x | {fmt_us(p50)} | "
              f"{p50 / fio4k_p50:.2f}x | {fmt_us(p99)} |")
else:
    w("(not measured in this run)")
w("")

crit = os.path.join(results, "criterion.txt")
w("## CPU micro-benchmarks (criterion)")
w("")
w("`cargo bench -p proto --bench codec` (encode an Append request; split 64 pipelined frames out of a read buffer and")
w("verify each; encode an Appended answer) and `cargo bench -p shards --bench commit` (serialise a batch into a")
w("commit body and seal it with its CRC32C; parse and check it as recovery does). Median time per iteration; the")
w("last column puts it against fio's 4 KiB write + fdatasync p50 from this run, the cost of the commit it rides on.")
w("")
unit_us = {"ns": 1e-3, "µs": 1.0, "us": 1.0, "ms": 1e3, "s": 1e6}
crows = []
if os.path.exists(crit):
    name = None
    for line in open(crit):
        first = line.split()[0] if line.strip() else ""
        if not line[:1].isspace() and re.match(r"^[a-z_]+(/[A-Za-z0-9_]+)?$", first):
            name = first
        t = re.search(r"time:\s+\[(\S+) (\S+) (\S+) (\S+) (\S+) (\S+)\]", line)
        if t and name and t.group(4) in unit_us:
            crows.append([name, float(t.group(3)) * unit_us[t.group(4)], ""])
            name = None
        th = re.search(r"thrpt:\s+\[(\S+) (\S+) (\S+) (\S+) (\S+) (\S+)\]", line)
        if th and crows:
            crows[-1][2] = f"{th.group(3)} {th.group(4)}"
if crows:
    w("| benchmark | time | throughput | x fio 4 KiB commit p50 |")
    w("|---|---|---|---|")
    for name, us, thr in crows:
        share = f"{us / fio4k_p50:.4f}x" if fio4k_p50 else "n/a"
        w(f"| {name} | {us:.2f} us | {thr} | {share} |")
else:
    w("(not measured in this run)")
w("")

restart_md = os.path.join(results, "restart", "restart.md")
if os.path.exists(restart_md) and os.path.getsize(restart_md) > 0:
    # The section as scripts/restart-time.sh wrote it, heading included.
    for line in open(restart_md):
        w(line.rstrip("\n"))
else:
    w("## Restart")
    w("")
    w("(not measured in this run)")
    w("")

w("## Filtered reads (stream index and stream runs)")
w("")
if stream_reads:
    w("`shards/examples/stream_read.rs`, through the engine on this filesystem: a shard of 1 KiB records in which one")
    w("stream holds 1% of the records, and a second shard holding only that stream's records, appended the same way;")
    w("both closed and opened again, so the indexes and runs come from their files, and the example waits until the")
    w("shard has made its stream runs (`stream_runs_pending` 0). Each round reads, from lsn 1 to the end in reads of")
    w("1 MiB: the stream through the filter, the second shard unfiltered (just those records' bytes, contiguous), and")
    w("the first shard unfiltered (what a filtered read cost before the index: every commit in between). Reads are")
    w("O_DIRECT, so the page cache plays no part. Fastest of the rounds; the first round (which loads the sealed")
    w("segments' index and runs tables from their files) is its own column.")
    w("")
    w("| shape | log | stream's records | filtered read | its records alone | ratio | first round | whole shard unfiltered | runs files (x log) | index memory after |")
    w("|---|---|---|---|---|---|---|---|---|---|")
    for shape in ("batched", "interleaved"):
        r = stream_reads.get(shape)
        if not r:
            continue
        runs = r.get("runs_file_bytes", 0)
        w(f"| {shape} | {r['log_bytes'] / 2**20:.0f} MiB, {r['segments']} segments | {r['rare_records']:,} "
          f"({r['rare_bytes'] / 2**20:.1f} MiB) | {fmt_us(r['filtered_us'])} | {fmt_us(r['baseline_us'])} | "
          f"{r['filtered_us'] / max(r['baseline_us'], 1):.2f}x | {fmt_us(r.get('first_filtered_us', 0))} | "
          f"{fmt_us(r['unfiltered_us'])} | {runs / 2**20:.1f} MiB ({runs / max(r['log_bytes'], 1):.3f}x) | "
          f"{r['index_bytes'] / 1024:.1f} KiB |")
    w("")
    w("- batched: every append is 64 records of one stream, one append in flight, so a commit holds one stream; the")
    w("  index takes the read to exactly the commits of the stream (several close ones per I/O, 4 I/Os in flight).")
    w("  No stream gets a run (each fills the commits it is in).")
    w("- interleaved: appends of one record, 64 in flight, so group commit mixes the streams and about half of the")
    w("  commits hold a record of the 1% stream: through the index alone, the read would be of half the log. Its")
    w("  records are read from the sealed segments' runs files and the active segment's tail instead (README,")
    w("  \"Stream runs\"); the runs files hold its records a second time. The 8 other streams, 12% each, would")
    w("  take 8 MiB each per segment: the tail's 4 MiB shed them first, as the index reads them best.")
    ri = stream_reads.get("interleaved")
    if ri and randread_us:
        w(f"  For scale, the device's floor for reading the stream where group commit put it: {ri['rare_records']:,} random")
        w(f"  4 KiB O_DIRECT reads (one per record) from a {ri['log_bytes'] / 2**20:.0f} MiB file, 4 in flight, took")
        w(f"  {fmt_us(randread_us)} with fio in this run, {randread_us / max(ri['baseline_us'], 1):.1f}x the read of the records alone.")
    w("- Index memory: the sealed segments' indexes and runs tables load on their first filtered read (a restart reads")
    w("  only the active segment's index), so the figure is after the reads; `stats` reports it per shard")
    w("  (`stream_index_bytes`; the tail's memory is `stream_tail_bytes`).")
else:
    w("(not measured in this run)")
w("")

w("## Chart")
w("")
w("![records/s and latency vs connections](benchmarks.svg)")
w("")
w("## How the matrix was trimmed")
w("")
w("- Full mode: c = 1, 16, 64, 256 x P = 1, 16 x S = 100, 1024 B x B = 1, 64 records per frame x ack = durable, none;")
w("  B=64 at c=256 runs only P=1 (P=16 would put 262,144 records of 1 KiB in flight and only measure the daemon")
w("  pushing back).")
w("- Quick mode (`--quick`): the points the targets need, the 1 KiB durable concurrency sweep, and ack=none at c=1")
w("  and c=256 (P=1 and P=16).")
w("- Redis runs only the B=1 points: RPUSH of one element per command is its equivalent of one record per frame.")
w("")
w("## Reading the numbers")
w("")
w("- The machine is a shared 2-vCPU VM: client, server and the disk's completion work compete for two cores, so")
w("  every figure is a range; compare ratios within one run, not figures across runs.")
w("- The disk is virtio with a write-back cache: fdatasync costs a round trip to the host, not a media write, so")
w("  the floor is the hypervisor's flush latency.")
w("- shardlog-bench is shard-aware by default: it connects to each shard's own port, so an append is read, committed")
w("  and answered on the shard's core with no cross-core hop (`--routed` goes through the front instead). At c=1")
w("  that leaves a loopback round trip, FlatBuffers on both sides and the commit; the daemon's CPU per record there")
w("  is mostly executor parks and wake-ups (each park of glommio 0.9 issues a `membarrier`), which `stats` counts")
w("  per executor. `--spin-us` trades a busy core for fewer parks; on this shared 2-vCPU VM it makes c=1 worse")
w("  (docs/OPERATIONS.md has the advice for dedicated cores).")
w("- ack=none: a fire-and-forget client is as fast as it batches. Appends wait (TCP back-pressure) while a shard's")
w("  queue is half full instead of being refused with `Busy`, so the drain-inclusive rate is what the disk took.")
w("- Where the daemon's CPU goes (`perf record -g` of shardlogd, 4 s each, on a quiet machine; read by hand, not")
w("  by this script). At 1 KiB c=256 P=16 (558K records/s then): 40 % in system calls (22 % `send`, which on")
w("  loopback also runs the client's receive path, 11 % `recv`, 3 % `io_uring_enter`), 6 % reschedule interrupts that")
w("  deliver io_uring completions, 7 % `ShardServer::append` (records into the commit buffer, mostly waiting on the")
w("  stores into it), 7 % the kernel's copy out of the socket, 5.5 % `memmove` (the one copy of each payload), 4 %")
w("  verification, 4 % CRC32C, 2 % handing answers to connections. The stream index is booked from the streams the")
w("  appends noted as they were queued (it used to read every record header of the commit back, out of cache: 12 %")
w("  of the daemon at B=64), and `Appended` answers are a template the FlatBuffers builder made, patched per answer.")
w("  At 64 x 1 KiB per frame, c=16 P=16 (1.04 GB/s then): 14 % the kernel's copy out of the socket, 13.5 % `memmove`")
w("  (an append on a shard's own port is committed straight from the receive buffer, with no frame copy), 9.5 %")
w("  CRC32C (taken per 16 KiB chunk while the payload is in cache), 5.5 % record encoding, 4.4 % reading the")
w("  records' fields, 3 % verification: the bytes themselves.")
w("- B=64 and new segment files: a shard that commits large batches is limited by the disk's bandwidth, and zero-")
w("  filling each new segment ahead of it made the disk write every byte twice (0.35x fio before). After a segment")
w("  whose commits averaged 256 KiB or more, the next file is preallocated instead (`--segment-prep auto`, the")
w("  default; README, \"On-disk format\"); small commits keep zero-filled files, whose syncs are cheapest.")
w("- Stream runs (README, \"Stream runs\"; on by default): every point here writes 1024 streams, so the committer")
w("  copies the records of the streams the index reads badly into the active segment's tail (up to 4 MiB per")
w("  shard) and each sealed segment gets a runs file of at most that much. Measured back to back with")
w("  `--stream-runs off` (2 s points, 3 pairs, 2026-12-02): the daemon's CPU per record was 3-6% higher at ack=none")
w("  100 B c=256 P=16 (0.59-0.68 against 0.61-0.71 us); at 1 KiB c=256 P=16, `perf` put `Tail::note_commit` at about")
w("  4% of the daemon; at 64 x 1 KiB c=16 P=16 this build and the previous session's ran at the same MB/s")
w("  (1020-1040). A log that is never read by stream can turn them off.")
w("- Against Redis at high concurrency the limit is the two vCPUs, not the disk: the generator, the daemon's")
w("  executors, loopback TCP and disk interrupts share them. Redis `appendfsync always` groups the commands of one")
w("  event-loop iteration into one fsync, the same group commit the shard does.")
w("- For B=64 the comparison with fio 1 MiB is per byte: a 64 KiB frame is committed with the other frames queued")
w("  at that moment, so at c=16 P=16 commits are full (1 MiB, `commit_bytes_max`) like fio's writes; at c=1 P=1 one")
w("  frame is a commit.")
w("- Raw results (JSON reports, .hgrm distributions, Redis CSVs, fio JSON) are in the run's `results/` directory.")
w("")
with open(out_path, "w") as f:
    f.write("\n".join(lines))
print(out_path)
PY

log "done: docs/BENCHMARKS.md, docs/benchmarks.svg; raw results in $RESULTS"
