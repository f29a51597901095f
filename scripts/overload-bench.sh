#!/usr/bin/env bash
# Serving past capacity: a 3-node cluster (one shard per node, as when the
# results in docs/benchmarks.md were taken; RF 3) holding
# the load generator's serving data set (ENTITIES entities). First the
# capacity: a closed loop of CONCURRENCY gets (100 x 10) in flight for
# DURATION seconds. Then open-loop loads at each factor of that rate in
# FACTORS for DURATION: the accepted requests' latency (from the intended
# send time) and the rate the nodes shed with RESOURCE_EXHAUSTED. Every
# mode in MODES is a fresh cluster: "bounded" runs the default admission
# limits, "limit-N" sets limits.read_inflight_requests_max to N,
# "unbounded" lifts it out of reach (what overload does without shedding),
# "target-N" sets limits.admission_queue_target_ms to N (CoDel's target;
# target-200, the whole admission wait, is admission without CoDel).
# PIN=1 runs the nodes on CPU 1 and the generator on CPU 0 (taskset), so
# that the generator's own work does not slow the nodes it measures: on a
# 2-core machine, the nearest to a generator on its own machine.
#   PROFILE=release FACTORS="1 2" MODES="bounded unbounded" ./scripts/overload-bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source ./scripts/ensure-deps.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/quiver-target}"
PROFILE="${PROFILE:-release}"
ENTITIES="${ENTITIES:-100000}"
CONCURRENCY="${CONCURRENCY:-32}"
DURATION="${DURATION:-15}"
FACTORS="${FACTORS:-1 2}"
MODES="${MODES:-bounded unbounded}"
PIN="${PIN:-0}"
node_cpu=() gen_cpu=()
if [ "$PIN" = 1 ]; then
    node_cpu=(taskset -c 1) gen_cpu=(taskset -c 0)
fi
cargo build --profile "$PROFILE" --bins --quiet
BIN="$CARGO_TARGET_DIR/$([ "$PROFILE" = dev ] && echo debug || echo "$PROFILE")"
PORT=7670
ENDPOINTS="127.0.0.1:$PORT,127.0.0.1:$((PORT + 1)),127.0.0.1:$((PORT + 2))"

dir=""
trap '[ -n "$dir" ] && QUIVER_CLUSTER_DIR="$dir" ./scripts/cluster.sh stop >/dev/null 2>&1; [ -n "$dir" ] && rm -rf "$dir"' EXIT
echo "| admission | load | offered req/s | accepted req/s | shed req/s | p50 ms | p99 ms | p99.9 ms | max ms | errors |"
echo "|---|---|---|---|---|---|---|---|---|---|"
for mode in $MODES; do
    dir=$(mktemp -d)
    case "$mode" in
        bounded) limit_env=() ;;
        unbounded) limit_env=(QUIVER_LIMITS__READ_INFLIGHT_REQUESTS_MAX=1000000) ;;
        limit-*) limit_env=("QUIVER_LIMITS__READ_INFLIGHT_REQUESTS_MAX=${mode#limit-}") ;;
        # CoDel's target; target-200 (the whole admission wait) turns it off.
        target-*) limit_env=("QUIVER_LIMITS__ADMISSION_QUEUE_TARGET_MS=${mode#target-}") ;;
        *) echo "unknown mode $mode" >&2; exit 2 ;;
    esac
    # The per-connection stream limit is lifted in every mode: the node's
    # admission is what is measured, not HTTP/2 queueing in the client.
    env "${limit_env[@]}" QUIVER_LIMITS__CONNECTION_REQUESTS_MAX=100000 \
    QUIVER_CLUSTER__SHARD_COUNT=0 QUIVER_CLUSTER__SPLIT_SHARD_BYTES_MAX=0 QUIVER_PROFILE="$PROFILE" QUIVER_CLUSTER_DIR="$dir" \
        QUIVER_CLUSTER_PORT=$PORT "${node_cpu[@]}" ./scripts/cluster.sh start 3 >/dev/null
    "${gen_cpu[@]}" "$BIN/quiver-bench" --endpoint "$ENDPOINTS" --entities "$ENTITIES" --workload serve \
        --duration 1s --warmup 0s >/dev/null
    "${gen_cpu[@]}" "$BIN/quiver-bench" --endpoint "$ENDPOINTS" --entities "$ENTITIES" --workload serve \
        --preload false --concurrency "$CONCURRENCY" --duration "${DURATION}s" --warmup 2s \
        --json --label capacity >"$dir/capacity.json"
    capacity=$(python3 -c "import json,sys; print(int(json.load(open(sys.argv[1]))['requests_per_second']))" "$dir/capacity.json")
    python3 - "$dir/capacity.json" "$mode" "closed loop, $CONCURRENCY in flight" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"| {sys.argv[2]} | {sys.argv[3]} | - | {r['requests_per_second']:.0f} | {r['shed_per_second']:.0f} | "
      f"{r['p50_ms']:.2f} | {r['p99_ms']:.1f} | {r['p999_ms']:.1f} | {r['max_ms']:.1f} | {r['errors']} |")
PY
    for factor in $FACTORS; do
        rate=$(python3 -c "print(int($capacity * $factor))")
        # The generator exits non-zero on errors other than shedding; the
        # row still shows them.
        "${gen_cpu[@]}" "$BIN/quiver-bench" --endpoint "$ENDPOINTS" --entities "$ENTITIES" --workload serve \
            --preload false --rate "$rate" --duration "${DURATION}s" --warmup 2s --json \
            --label "${factor}x" >"$dir/open-$factor.json" || true
        python3 - "$dir/open-$factor.json" "$mode" "${factor}x capacity, open loop" "$rate" <<'PY'
import json, sys
r = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
print(f"| {sys.argv[2]} | {sys.argv[3]} | {sys.argv[4]} | {r['requests_per_second']:.0f} | "
      f"{r['shed_per_second']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.1f} | {r['p999_ms']:.1f} | "
      f"{r['max_ms']:.1f} | {r['errors']} |")
PY
    done
    QUIVER_CLUSTER_DIR="$dir" ./scripts/cluster.sh stop >/dev/null 2>&1
    rm -rf "$dir"
    dir=""
done
