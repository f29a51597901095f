#!/usr/bin/env bash
# Reproduces the Quiver tables of docs/benchmarks.md: serve (batch get of
# 100 entities x 10 features) with the hot cache on and off, and ingest
# (batched and single-row writes). Each configuration runs REPEAT times on a
# fresh node; quiver-bench prints one JSON line per run to $OUT.
#   PROFILE=release|dev  ENTITIES=1000000  DURATION=10s  REPEAT=3  ./scripts/bench.sh
# Then the same writes and reads against a 3-node RF 3 cluster on loopback
# (scripts/cluster.sh), labelled rf3-*.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/ensure-deps.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/quiver-target}"
PROFILE="${PROFILE:-release}"
ENTITIES="${ENTITIES:-1000000}"
DURATION="${DURATION:-10s}"
REPEAT="${REPEAT:-3}"
OUT="${OUT:-bench-results.jsonl}"
SECTIONS="${SECTIONS:-single cluster}" # which tables to reproduce
cargo build --profile "$PROFILE" --bins --quiet
BIN="$CARGO_TARGET_DIR/$([ "$PROFILE" = dev ] && echo debug || echo "$PROFILE")"
WORK=$(mktemp -d)
trap 'pkill -f "$WORK" 2>/dev/null || true; rm -rf "$WORK"' EXIT

start_node() { # $1 = name, rest = quiverd flags
    local name=$1; shift
    "$BIN/quiverd" --listen-addr 127.0.0.1:0 --data-dir "$WORK/$name" "$@" >"$WORK/$name.out" 2>"$WORK/$name.log" &
    NODE_PID=$!
    for _ in $(seq 300); do grep -q "listening on" "$WORK/$name.out" 2>/dev/null && break; sleep 0.1; done
    ENDPOINT=$(sed -n 's/quiverd listening on //p' "$WORK/$name.out")
}

run() { # $1 = label, $2 = node flags, rest = quiver-bench flags
    local label=$1 flags=$2; shift 2
    for i in $(seq "$REPEAT"); do
        # shellcheck disable=SC2086
        start_node "$label-$i" $flags
        "$BIN/quiver-bench" --endpoint "$ENDPOINT" --entities "$ENTITIES" --duration "$DURATION" \
            --server-pid "$NODE_PID" --label "$label" --json "$@" | tee -a "$OUT"
        kill -TERM "$NODE_PID"; wait "$NODE_PID" || true
    done
}

: >"$OUT"
if [[ " $SECTIONS " == *" single "* ]]; then
run serve-cache-on ""                       --workload serve --concurrency 16
run serve-cache-off "--cache-bytes-max 0"   --workload serve --concurrency 16
run serve-zipf-cache-on ""                  --workload serve --concurrency 16 --distribution zipf
run serve-open-loop ""                      --workload serve --rate 500
run ingest-batch100-fsync ""                --workload ingest --rows-per-write 100 --concurrency 16
run ingest-single-fsync ""                  --workload ingest --rows-per-write 1 --concurrency 16
run ingest-single-nofsync "--sync-writes false" --workload ingest --rows-per-write 1 --concurrency 16
run mixed-95-5 ""                           --workload mixed --concurrency 16
fi
run_cluster() { # $1 = label, rest = quiver-bench flags
    local label=$1; shift
    for i in $(seq "$REPEAT"); do
        QUIVER_PROFILE="$PROFILE" QUIVER_CLUSTER_DIR="$WORK/$label-$i" QUIVER_CLUSTER_PORT=7570 \
            ./scripts/cluster.sh start 3 >/dev/null
        "$BIN/quiver-bench" --endpoint 127.0.0.1:7570 --entities "$ENTITIES" --duration "$DURATION" \
            --label "$label" --json "$@" | tee -a "$OUT"
        QUIVER_CLUSTER_DIR="$WORK/$label-$i" ./scripts/cluster.sh stop >/dev/null
    done
}
if [[ " $SECTIONS " == *" cluster "* ]]; then
run_cluster rf3-ingest-single       --workload ingest --rows-per-write 1 --concurrency 16
run_cluster rf3-ingest-batch100     --workload ingest --rows-per-write 100 --concurrency 16
run_cluster rf3-serve-leader        --workload serve --concurrency 16
fi
echo "results in $OUT"
