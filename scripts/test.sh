#!/usr/bin/env bash
# Runs Quiver's whole gate: formatting, the test suite (unit, property and
# integration tests; integration tests start real quiverd processes on
# loopback), and clippy with warnings as errors. Extra arguments go to
# `cargo test` (e.g. a test name filter).
set -euo pipefail
cd "$(dirname "$0")/.."
# Sourced: it exports LIBCLANG_PATH when bindgen needs it.
source ./scripts/ensure-deps.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/quiver-target}"
echo "==> cargo fmt --check"
cargo fmt --all -- --check
# The integration tests run the binaries: build them first. Build, test and
# clippy share one RocksDB build (see [profile.dev.build-override]).
echo "==> building"
cargo build --workspace --bins
echo "==> testing"
cargo test --workspace --no-fail-fast "$@"
echo "==> cargo clippy -D warnings"
cargo clippy --workspace --all-targets -- -D warnings
