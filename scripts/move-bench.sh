#!/usr/bin/env bash
# Moving a shard under serving load: 4 nodes, one shard (RF 3, on 3 of
# them) holding ENTITIES entities, its log already compacted into a
# snapshot, so the new replica is filled by a streamed snapshot. While an
# open-loop serving load runs (RATE gets/s of 100 x 10 at LEADER), one replica
# moves to the fourth node; the script prints the move's time and the serving
# latency of the whole run, for each snapshot byte rate in RATES (0:
# unlimited; "none": no move, the baseline).
#   PROFILE=release ENTITIES=2000000 RATES="0 104857600 20971520" ./scripts/move-bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source ./scripts/ensure-deps.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/quiver-target}"
PROFILE="${PROFILE:-release}"
ENTITIES="${ENTITIES:-2000000}"
RATES="${RATES:-0 104857600 20971520}"
RATE="${RATE:-200}"
DURATION="${DURATION:-40s}"
cargo build --profile "$PROFILE" --bins --quiet
BIN="$CARGO_TARGET_DIR/$([ "$PROFILE" = dev ] && echo debug || echo "$PROFILE")"
PORT=7570
ENDPOINTS="127.0.0.1:$PORT,127.0.0.1:$((PORT + 1)),127.0.0.1:$((PORT + 2)),127.0.0.1:$((PORT + 3))"
export QUIVER_ENDPOINT="127.0.0.1:$PORT"

dir=""
# A failed run must not leave its cluster on the ports the next one needs.
trap '[ -n "$dir" ] && QUIVER_CLUSTER_DIR="$dir" ./scripts/cluster.sh stop >/dev/null 2>&1; [ -n "$dir" ] && rm -rf "$dir"' EXIT
for rate in $RATES; do
    dir=$(mktemp -d)
    # A snapshot every 500 entries: after the load the log is compacted, as
    # on a cluster that has run for a while.
    QUIVER_CLUSTER__SNAPSHOT_SEND_BYTES_PER_SECOND_MAX="${rate/none/0}" \
    QUIVER_CLUSTER__SNAPSHOT_LOGS_SINCE=500 QUIVER_CLUSTER__LOGS_KEPT_AFTER_SNAPSHOT=100 \
    QUIVER_CLUSTER__SCHEDULE_REPLICAS=false QUIVER_CLUSTER__SPLIT_SHARD_BYTES_MAX=0 \
    QUIVER_NODE_FLAGS="--shard-count 1" QUIVER_PROFILE="$PROFILE" QUIVER_CLUSTER_DIR="$dir" \
        QUIVER_CLUSTER_PORT=$PORT ./scripts/cluster.sh start 4 >/dev/null
    "$BIN/quiver-bench" --endpoint "$ENDPOINTS" --entities "$ENTITIES" --workload serve \
        --duration 1s --warmup 0s >/dev/null
    # Where shard 1 is and is not.
    read -r from to < <("$BIN/quiverctl" --json shard map | python3 -c '
import json, sys
m = json.load(sys.stdin)
shard = next(s for s in m["shards"] if s["shard"] == 1)
on = {r["node_id"] for r in shard["replicas"]}
print(min(on), min({1, 2, 3, 4} - on))')
    "$BIN/quiver-bench" --endpoint "$ENDPOINTS" --entities "$ENTITIES" --workload serve \
        --preload false --rate "$RATE" --duration "$DURATION" --warmup 0s --json \
        --label "serve during a move, snapshot rate $rate" >"$dir/serve.json" &
    bench=$!
    sleep 5
    started=$(date +%s.%N)
    if [ "$rate" != none ]; then
        "$BIN/quiverctl" shard move 1 --from "$from" --to "$to" --wait >/dev/null
    fi
    ended=$(date +%s.%N)
    # What the new replica received (the source's directory also holds its
    # snapshots and its log).
    sized=$([ "$rate" = none ] && echo "$from" || echo "$to")
    # (A moved-in replica's directory carries its incarnation: groups/1.N.)
    bytes=$({ du -sb "$dir/node$sized"/groups/1 "$dir/node$sized"/groups/1.* 2>/dev/null || true; } \
        | sort -n | tail -1 | cut -f1)
    wait "$bench"
    python3 - "$dir/serve.json" "$rate" "$bytes" "$started" "$ended" <<'PY'
import json, sys
run = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
rate, size, t0, t1 = sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
label = {"none": "no move", "0": "unlimited"}.get(rate) or f"{int(rate) / 2**20:.0f} MiB/s"
took = "-" if rate == "none" else f"{t1 - t0:.1f} s"
print(f"| {label} | {size / 2**20:.0f} MiB | "
      f"{took} | {run['requests_per_second']:.0f} | {run['p50_ms']:.2f} | "
      f"{run['p99_ms']:.1f} | {run['p999_ms']:.1f} | {run['max_ms']:.1f} | {run['errors']} |")
PY
    QUIVER_CLUSTER_DIR="$dir" ./scripts/cluster.sh stop >/dev/null
    rm -rf "$dir"
    dir=""
done
