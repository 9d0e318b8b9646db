#!/usr/bin/env bash
# Runs every test of shardlog: the README's test command, and what .ci/run runs.
#
# 1. Installs the system packages the tests need (once; as root via apt-get).
# 2. Checks that the generated protocol code matches the schema.
# 3. Checks formatting and lints.
# 4. Runs `cargo test --workspace`: unit, property, power-loss, integration
#    (real shardlogd binary over loopback TCP), crash (SIGKILL) and hostile-input tests.
#
# Long runs (thousands of seeds, 100 crash cycles, fuzzing, the full benchmark)
# live in scripts/{crash-loop,fuzz,bench}.sh and in #[ignore]d tests.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v mkfs.ext4 >/dev/null 2>&1 || need+=(e2fsprogs)
command -v losetup >/dev/null 2>&1 || need+=(mount)
command -v prlimit >/dev/null 2>&1 || need+=(util-linux)
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "test: installing ${need[*]}" >&2
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >&2
  else
    echo "test: missing ${need[*]}; the tests that need them will skip with a message" >&2
  fi
fi

scripts/gen-proto.sh --check
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
