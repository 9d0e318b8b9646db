#!/usr/bin/env bash
# Runs shardlog's fuzz targets (fuzz/, a cargo-fuzz crate outside the workspace), one at a time.
#
#   scripts/fuzz.sh                       every target, 10 minutes each
#   scripts/fuzz.sh -t 300 frame_decoder  one target, 5 minutes
#   scripts/fuzz.sh --cmin frame_decoder  minimise the grown corpus back into fuzz/corpus/<target>
#   scripts/fuzz.sh --replay              replay the committed corpora as plain tests (no libFuzzer)
#   scripts/fuzz.sh --keep-going ...      do not stop at the first crash (libFuzzer -fork=1
#                                         -ignore_crashes=1: still one worker process), to look for
#                                         other bugs while a known one is being fixed
#
# 1. Installs cargo-fuzz from crates.io if it is missing.
# 2. Regenerates the seed corpora (fuzz/examples/write_seeds.rs) from the real encoders.
# 3. Builds with AddressSanitizer. cargo-fuzz needs nightly `-Z` flags; on a stable toolchain
#    RUSTC_BOOTSTRAP=1 unlocks them (stable ships the sanitizer runtimes). If that build fails, it
#    falls back to `--sanitizer none` and says so: libFuzzer still finds panics, but not memory
#    errors in unsafe code.
# 4. Runs each target in a single process (`--jobs 1`: the machine's cores are shared), growing
#    fuzz/corpus-run/<target> (not committed) on top of the committed seeds in fuzz/corpus/<target>.
#    Crashes land in fuzz/artifacts/<target>/; reproduce one with
#    `RUSTC_BOOTSTRAP=1 cargo fuzz run -a <target> fuzz/artifacts/<target>/<file>` in fuzz/, shrink it
#    with `cargo fuzz tmin`, and keep the result in fuzz/regressions/<target>/ (replayed by
#    `--replay`, never fed to the fuzzer, so a run is not stopped by a known crash).
# 5. Prints one summary line per target (executions, seconds, corpus files and bytes, crashes), the
#    figures docs/RELIABILITY.md records. Logs go to $CARGO_TARGET_DIR/fuzz-logs/.
#
# Exit status: non-zero if any target crashed.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

seconds=600
cmin=0
replay=0
keep_going=0
targets=()
while [ $# -gt 0 ]; do
  case "$1" in
    -t | --time) seconds=$2; shift 2 ;;
    --cmin) cmin=1; shift ;;
    --replay) replay=1; shift ;;
    --keep-going) keep_going=1; shift ;;
    -h | --help) sed -n '2,/^set /{/^#/p}' "$0"; exit 0 ;;
    -*) echo "fuzz: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) targets+=("$1"); shift ;;
  esac
done

export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$root/fuzz/target}
logs=$CARGO_TARGET_DIR/fuzz-logs
mkdir -p "$logs"
cd "$root/fuzz"

if [ "$replay" = 1 ]; then
  exec cargo test --release
fi

if ! command -v cargo-fuzz >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz from crates.io" >&2
  cargo install --locked cargo-fuzz
fi

if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <(cargo fuzz list)
fi

echo "fuzz: writing seed corpora" >&2
cargo run --quiet --example write_seeds >&2

# cargo-fuzz passes -Zsanitizer and friends; a stable rustc accepts them only with this set.
export RUSTC_BOOTSTRAP=1
sanitizer=address
# Debug assertions on: an arithmetic overflow on hostile input is a finding too.
build=(--debug-assertions)
if ! cargo fuzz build "${build[@]}" --sanitizer "$sanitizer" >"$logs/build.log" 2>&1; then
  echo "fuzz: the AddressSanitizer build failed (see $logs/build.log); falling back to --sanitizer none" >&2
  sanitizer=none
  cargo fuzz build "${build[@]}" --sanitizer none >&2
fi

crashed=0
for target in "${targets[@]}"; do
  seeds=corpus/$target
  grown=corpus-run/$target
  mkdir -p "$seeds" "$grown" "artifacts/$target"

  if [ "$cmin" = 1 ]; then
    # Merge the grown corpus and the seeds into a fresh, minimal set that keeps the same coverage,
    # and make that the committed seed directory.
    fresh=$(mktemp -d "$CARGO_TARGET_DIR/cmin-$target.XXXXXX")
    cargo fuzz run "${build[@]}" --sanitizer "$sanitizer" "$target" "$fresh" "$seeds" "$grown" -- -merge=1 \
      >"$logs/$target-cmin.log" 2>&1
    rm -f "$seeds"/*
    cp "$fresh"/* "$seeds"/
    rm -rf "$fresh"
    # libFuzzer names a merged file by the SHA-1 of its bytes; drop those that duplicate a named seed,
    # which write_seeds puts back under its readable name.
    cargo run --quiet --example write_seeds >/dev/null
    for seed in "$seeds"/seed-*; do
      rm -f "$seeds/$(sha1sum "$seed" | cut -d' ' -f1)"
    done
    echo "fuzz: $target: minimised to $(ls "$seeds" | wc -l) files, $(du -sb "$seeds" | cut -f1) bytes"
    continue
  fi

  # Under `set -o pipefail` a grep that matches nothing fails the pipeline, hence `|| true` below.
  before=$(ls "artifacts/$target" | wc -l)
  log=$logs/$target-$(date -u +%Y%m%dT%H%M%SZ).log
  echo "fuzz: $target for ${seconds}s (sanitizer $sanitizer), log $log" >&2
  extra=()
  if [ "$target" = recovery ]; then
    # Each input runs on a fresh glommio executor, and glommio 0.9 never closes an executor's
    # eventfd: stop before the process runs out of file descriptors.
    extra+=(-runs=$(($(ulimit -n) - 200)))
  fi
  if [ "$keep_going" = 1 ]; then
    extra+=(-fork=1 -ignore_crashes=1)
  fi
  status=0
  cargo fuzz run "${build[@]}" --sanitizer "$sanitizer" --jobs 1 "$target" "$grown" "$seeds" -- \
    -max_total_time="$seconds" -print_final_stats=1 -timeout=20 "${extra[@]}" >"$log" 2>&1 || status=$?
  after=$(ls "artifacts/$target" | wc -l)

  # A plain run ends with "Done N runs in S second(s)" and final stats; a fork-mode run
  # (--keep-going) reports "#N: cov: ..." lines and "INFO: exiting: ... time: Ss".
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1 || true)
  [ -n "$execs" ] || execs=$(grep -o '^#[0-9]*: cov' "$log" | tr -dc '0-9\n' | tail -1 || true)
  took=$(grep -o 'Done [0-9]* runs in [0-9]* second' "$log" | awk '{print $5}' | tail -1 || true)
  [ -n "$took" ] || took=$(grep -o 'INFO: exiting: .* time: [0-9]*s' "$log" | grep -o '[0-9]*s$' | tr -d s | tail -1 || true)
  files=$(find "$grown" "$seeds" -type f | wc -l)
  bytes=$(cat "$grown"/* "$seeds"/* 2>/dev/null | wc -c)
  cov=$(grep -o 'cov: [0-9]* ft: [0-9]*' "$log" | tail -1 || true)
  echo "fuzz: $target: sanitizer=$sanitizer execs=${execs:-?} seconds=${took:-?} corpus_files=$files" \
    "corpus_bytes=$bytes ${cov:-} new_crashes=$((after - before)) exit=$status"
  if [ "$status" != 0 ] || [ "$after" != "$before" ]; then
    crashed=1
    echo "fuzz: $target CRASHED; artifacts in fuzz/artifacts/$target, log $log" >&2
    grep -m1 -A25 -E "panicked|ERROR: AddressSanitizer|ERROR: libFuzzer" "$log" >&2 || true
  fi
done
exit $crashed
