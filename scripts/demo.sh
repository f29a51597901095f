#!/usr/bin/env bash
# Quiver's main job, locally: build, start a node, apply the sample feature
# views, load 100k drivers and 100k customers, and show features being served
# (a table of lookups and the latency of a 100-entity x 10-feature batch).
# The node keeps running afterwards; `./scripts/demo.sh stop` stops it.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/quiver-target}"
DEMO_DIR="${QUIVER_DEMO_DIR:-$PWD/.demo}"
PORT="${QUIVER_DEMO_PORT:-7470}"
PID_FILE="$DEMO_DIR/quiverd.pid"

stop_node() {
    if [ -f "$PID_FILE" ] && kill -0 "$(cat "$PID_FILE")" 2>/dev/null; then
        kill -TERM "$(cat "$PID_FILE")"
        for _ in $(seq 100); do kill -0 "$(cat "$PID_FILE")" 2>/dev/null || break; sleep 0.1; done
        echo "stopped quiverd (pid $(cat "$PID_FILE"))"
    fi
    rm -f "$PID_FILE"
}

if [ "${1:-}" = "stop" ]; then
    stop_node
    exit 0
fi

./scripts/ensure-deps.sh
echo "==> building quiverd and quiverctl (the first build compiles RocksDB: many minutes on 2 cores)"
cargo build --bins --quiet
BIN="$CARGO_TARGET_DIR/debug"

stop_node
rm -rf "$DEMO_DIR/node"
mkdir -p "$DEMO_DIR"
echo "==> starting quiverd on 127.0.0.1:$PORT (data in $DEMO_DIR/node, log in $DEMO_DIR/quiverd.log)"
"$BIN/quiverd" --listen-addr "127.0.0.1:$PORT" --data-dir "$DEMO_DIR/node" \
    >"$DEMO_DIR/quiverd.out" 2>"$DEMO_DIR/quiverd.log" &
echo $! >"$PID_FILE"
for _ in $(seq 300); do
    grep -q "listening on" "$DEMO_DIR/quiverd.out" 2>/dev/null && break
    kill -0 "$(cat "$PID_FILE")" 2>/dev/null || { cat "$DEMO_DIR/quiverd.log"; exit 1; }
    sleep 0.1
done
export QUIVER_ENDPOINT="127.0.0.1:$PORT"
CTL="$BIN/quiverctl"

echo "==> applying the sample feature views"
"$CTL" views apply -f sample/views.yaml
echo "==> generating and loading the sample data"
"$CTL" sample generate --out-dir "$DEMO_DIR/data"
"$CTL" put --view driver_hourly_stats -f "$DEMO_DIR/data/drivers.csv"
"$CTL" put --view customer_profile -f "$DEMO_DIR/data/customers.jsonl"

echo "==> a few drivers"
"$CTL" get --features driver_hourly_stats 1001 1002 1003 1004 1005 999
echo "==> a few customers"
"$CTL" get --features customer_profile 1 2 3 424242
KEYS=$(seq 1001 1100)
echo "==> a batch of 100 entities x 10 features (driver_hourly_stats + customer_profile), hot cache"
# shellcheck disable=SC2086
"$CTL" get --features driver_hourly_stats,customer_profile $KEYS --repeat 500
echo "==> the same batch bypassing the cache (RocksDB reads)"
# shellcheck disable=SC2086
"$CTL" get --features driver_hourly_stats,customer_profile $KEYS --repeat 500 --skip-cache
echo "==> node status"
"$CTL" status
echo
echo "quiverd is still running (pid $(cat "$PID_FILE")) at $QUIVER_ENDPOINT. Try:"
echo "  $CTL --endpoint $QUIVER_ENDPOINT get --features driver_hourly_stats:conv_rate 1001"
echo "Stop it with: make demo-stop"
