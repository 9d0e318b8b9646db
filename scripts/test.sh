#!/usr/bin/env bash
# Runs every test of shardlog: the README's test command, and what .ci/run runs.
#
# 1. Installs the system packages the tests need (once; as root via apt-get).
# 2. Checks that the generated protocol code matches the schema.
# 3. Checks formatting and lints.
# 4. Runs `cargo test --workspace`: unit, property, power-loss, integration
#    (real shardlogd binary over loopback TCP), crash (SIGKILL) and hostile-input tests.
# 5. Runs the Python client's pytest suite against the real shardlogd (installing pytest and the
#    flatbuffers runtime that matches the pinned flatc if they are missing).
#
# Long runs (thousands of seeds, 100 crash cycles, fuzzing, the full benchmark)
# live in scripts/{crash-loop,fuzz,bench}.sh and in #[ignore]d tests.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v python3 >/dev/null 2>&1 || need+=(python3)
python3 -m pip --version >/dev/null 2>&1 || need+=(python3-pip)
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

# The Python client: pytest, and the flatbuffers runtime of the same version as flatc (the
# generated code in clients/python/shardlog/wire/ is checked against it by gen-proto.sh above).
PY_FLATBUFFERS_VERSION=25.12.19
pip_install() {
  # Debian's own python3 refuses plain `pip install` (PEP 668); this machine's tests may use it.
  python3 -m pip install --quiet --disable-pip-version-check "$@" >&2 ||
    python3 -m pip install --quiet --disable-pip-version-check --break-system-packages "$@" >&2
}
if ! python3 -c 'import pytest' 2>/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && [ "$(command -v python3)" = /usr/bin/python3 ]; then
    echo "test: installing python3-pytest" >&2
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-pytest >&2
  else
    echo "test: installing pytest with pip" >&2
    pip_install pytest
  fi
fi
if ! python3 -c "import flatbuffers, sys; sys.exit(flatbuffers.__version__ != '${PY_FLATBUFFERS_VERSION}')" 2>/dev/null; then
  echo "test: installing flatbuffers ${PY_FLATBUFFERS_VERSION} with pip" >&2
  pip_install "flatbuffers==${PY_FLATBUFFERS_VERSION}"
fi
cargo build -p daemon --bin shardlogd --locked
(cd clients/python && python3 -m pytest -q -p no:cacheprovider)
