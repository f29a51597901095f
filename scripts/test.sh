#!/usr/bin/env bash
# Runs Quiver's whole test suite: unit, property and integration tests
# (integration tests start real quiverd processes on loopback).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/ensure-deps.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/quiver-target}"
# The integration tests run the binaries: build them first.
cargo build --workspace --bins
cargo test --workspace --no-fail-fast "$@"
