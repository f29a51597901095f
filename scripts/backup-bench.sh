#!/usr/bin/env bash
# Serving while full backups run: a 3-node cluster (one shard per node, as
# when the results in docs/benchmarks.md were taken; RF 3) holding the load generator's serving data set for ENTITIES
# entities; an open-loop serving load (RATE gets/s of 100 x 10) for
# DURATION while, from second 3, full backups to a local directory run one
# after another. Prints one table row per upload byte rate in RATES
# ("none": no backup, the baseline; otherwise backup.upload_bytes_per_second_max).
#   PROFILE=dev ENTITIES=200000 RATES="none 104857600 10485760" ./scripts/backup-bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source ./scripts/ensure-deps.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/quiver-target}"
PROFILE="${PROFILE:-dev}"
ENTITIES="${ENTITIES:-200000}"
RATES="${RATES:-none 104857600 10485760}"
RATE="${RATE:-200}"
DURATION="${DURATION:-20}"
cargo build --profile "$PROFILE" --bins --quiet
BIN="$CARGO_TARGET_DIR/$([ "$PROFILE" = dev ] && echo debug || echo "$PROFILE")"
PORT=7570
ENDPOINTS="127.0.0.1:$PORT,127.0.0.1:$((PORT + 1)),127.0.0.1:$((PORT + 2))"
export QUIVER_ENDPOINT="127.0.0.1:$PORT"

dir=""
trap '[ -n "$dir" ] && QUIVER_CLUSTER_DIR="$dir" ./scripts/cluster.sh stop >/dev/null 2>&1; [ -n "$dir" ] && rm -rf "$dir"' EXIT
echo "| upload rate | backups | one backup | req/s | p50 ms | p99 ms | p99.9 ms | max ms | errors |"
echo "|---|---|---|---|---|---|---|---|---|"
for rate in $RATES; do
    dir=$(mktemp -d)
    QUIVER_BACKUP__UPLOAD_BYTES_PER_SECOND_MAX="${rate/none/104857600}" \
    QUIVER_CLUSTER__SHARD_COUNT=0 QUIVER_CLUSTER__SPLIT_SHARD_BYTES_MAX=0 QUIVER_PROFILE="$PROFILE" QUIVER_CLUSTER_DIR="$dir" \
        QUIVER_CLUSTER_PORT=$PORT ./scripts/cluster.sh start 3 >/dev/null
    "$BIN/quiver-bench" --endpoint "$ENDPOINTS" --entities "$ENTITIES" --workload serve \
        --duration 1s --warmup 0s >/dev/null
    "$BIN/quiver-bench" --endpoint "$ENDPOINTS" --entities "$ENTITIES" --workload serve \
        --preload false --rate "$RATE" --duration "${DURATION}s" --warmup 0s --json \
        --label "serve during backups, upload rate $rate" >"$dir/serve.json" &
    bench=$!
    sleep 3
    count=0
    took=""
    if [ "$rate" != none ]; then
        while kill -0 "$bench" 2>/dev/null; do
            t0=$(date +%s.%N)
            "$BIN/quiverctl" backup create "file://$dir/backups" >/dev/null
            t1=$(date +%s.%N)
            took="$took $(python3 -c "print(f'{$t1 - $t0:.1f}')")"
            count=$((count + 1))
        done
    fi
    wait "$bench"
    python3 - "$dir/serve.json" "$rate" "$count" "$took" <<'PY'
import json, sys
run = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
rate, count, took = sys.argv[2], sys.argv[3], sys.argv[4].split()
label = "no backup" if rate == "none" else f"{int(rate) / 2**20:.0f} MiB/s"
span = f"{min(took, key=float)}-{max(took, key=float)} s" if took else "-"
print(f"| {label} | {count} | {span} | {run['requests_per_second']:.0f} | {run['p50_ms']:.2f} | "
      f"{run['p99_ms']:.1f} | {run['p999_ms']:.1f} | {run['max_ms']:.1f} | {run['errors']} |")
PY
    QUIVER_CLUSTER_DIR="$dir" ./scripts/cluster.sh stop >/dev/null
    rm -rf "$dir"
    dir=""
done
