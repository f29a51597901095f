#!/usr/bin/env bash
# Quiver's main job, locally: build, start a 3-node cluster on loopback (3
# shards, each a Raft group replicated on all 3 nodes and led
# by a different node once the leader balancer has run), apply the sample
# feature views, load 100k drivers and 100k customers, and show features
# being served through any node: lookups, the latency of a 100-entity x
# 10-feature batch, the cluster status, and a read that survives a node
# being killed. Every shard's log is shipped to a local backup target
# ($QUIVER_DEMO_DIR/backups), so a full backup plus point-in-time restore
# can be tried on it. The cluster keeps running; `./scripts/demo.sh stop`
# stops it.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/quiver-target}"
export QUIVER_CLUSTER_DIR="${QUIVER_DEMO_DIR:-$PWD/.demo}"
export QUIVER_CLUSTER_PORT="${QUIVER_DEMO_PORT:-7470}"
PORT="$QUIVER_CLUSTER_PORT"
BIN="$CARGO_TARGET_DIR/debug"
BACKUPS="file://$QUIVER_CLUSTER_DIR/backups"
export QUIVER_BACKUP__LOG_URL="${QUIVER_BACKUP__LOG_URL:-$BACKUPS}"

if [ "${1:-}" = "stop" ]; then
    ./scripts/cluster.sh stop
    exit 0
fi

# Three shards (a new cluster's default is one, split as it grows), so the
# demo shows several Raft groups placed and led across the nodes.
QUIVER_NODE_FLAGS="${QUIVER_NODE_FLAGS:---shard-count 3}" ./scripts/cluster.sh start 3
DEMO_DIR="$QUIVER_CLUSTER_DIR"
export QUIVER_ENDPOINT="127.0.0.1:$PORT"
if [ "${QUIVER_CLUSTER_TLS:-0}" = 1 ]; then
    # The cluster serves TLS only (QUIVER_CLUSTER_TLS=1 ./scripts/demo.sh).
    # The node restarted below serves TLS too.
    TLS_DIR="$DEMO_DIR/tls"
    export QUIVER_CA="$TLS_DIR/ca.pem" QUIVER_CERT="$TLS_DIR/client.pem" QUIVER_KEY="$TLS_DIR/client-key.pem"
    export QUIVER_TLS__CERT_PATH="$TLS_DIR/node.pem" QUIVER_TLS__KEY_PATH="$TLS_DIR/node-key.pem"
    export QUIVER_TLS__CA_PATH="$QUIVER_CA" QUIVER_TLS__CLIENT_CA_PATH="$QUIVER_CA"
fi
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
echo "==> the same drivers read through node 3, from its own replicas (consistency REPLICA)"
"$CTL" --endpoint "127.0.0.1:$((PORT + 2))" get --features driver_hourly_stats:conv_rate,driver_hourly_stats:acc_rate 1001 1002 1003 --consistency replica
echo "==> cluster status (node 1's view: every group, its leader, applied index and lag)"
"$CTL" status
N3="127.0.0.1:$((PORT + 2))"
echo "==> failover: a client writes through node 3 every 50 ms while node 1 is killed with SIGKILL (shards it led elect new leaders)"
cat >"$DEMO_DIR/probe.yaml" <<'YAML'
views:
  - name: demo_probe
    entities: [probe_id]
    description: Rows the demo's failover probe writes.
    features:
      - { name: seen, type: bool }
YAML
"$CTL" views apply -f "$DEMO_DIR/probe.yaml" >/dev/null
"$CTL" --endpoint "$N3" probe --view demo_probe --duration 8s >"$DEMO_DIR/probe.out" 2>&1 &
PROBE=$!
sleep 2
kill -9 "$(cat "$DEMO_DIR/node1.pid")"
if ! wait "$PROBE"; then
    cat "$DEMO_DIR/probe.out"
    echo "writes through node 3 did not recover after node 1 was killed; see $DEMO_DIR/node*.log" >&2
    exit 1
fi
cat "$DEMO_DIR/probe.out"
echo "==> a STRONG read through node 3 (linearizable: served by the new leaders after a read index)"
"$CTL" --endpoint "$N3" get --features driver_hourly_stats:conv_rate 1001 1002 --consistency strong
"$CTL" --endpoint "$N3" status | grep -E "^\| (group|0 \(meta\)|1 |2 |3 ) " || true
printf 'entity_key,event_ts,conv_rate\n1001,%s,0.99\n' "$((($(date +%s) + 60) * 1000000))" >"$DEMO_DIR/one.csv"
"$CTL" --endpoint "$N3" put --view driver_hourly_stats -f "$DEMO_DIR/one.csv" >/dev/null
echo "==> restarting node 1 (conv_rate of driver 1001 was set to 0.99 while it was down): it catches up from its peers"
NODES="1=127.0.0.1:$PORT,2=127.0.0.1:$((PORT + 1)),3=$N3"
QUIVER_CLUSTER__SECRET="$(cat "$DEMO_DIR/secret")"
export QUIVER_CLUSTER__SECRET
"$BIN/quiverd" --node-id 1 --cluster-nodes "$NODES" --listen-addr "127.0.0.1:$PORT" \
    --metrics-listen-addr "127.0.0.1:$((PORT + 20000))" \
    --data-dir "$DEMO_DIR/node1" >"$DEMO_DIR/node1.out" 2>>"$DEMO_DIR/node1.log" &
echo $! >"$DEMO_DIR/node1.pid"
# Caught up: node 1's own replica (not the leader it falls back to while it
# is behind) serves the value written while it was down.
caught_up=""
for _ in $(seq 300); do
    if "$CTL" get --features driver_hourly_stats:conv_rate 1001 --consistency replica --json 2>/dev/null \
        | python3 -c 'import json, sys
r = json.load(sys.stdin)
ok = r["entities"][0]["features"]["driver_hourly_stats:conv_rate"]["value"] == 0.99 and all(s["node_id"] == 1 for s in r["sources"])
sys.exit(0 if ok else 1)' 2>/dev/null; then
        caught_up=yes
        break
    fi
    sleep 0.1
done
"$CTL" get --features driver_hourly_stats:conv_rate 1001 --consistency replica
if [ -z "$caught_up" ]; then
    echo "node 1 did not catch up within 30 s; see $DEMO_DIR/node1.log" >&2
    exit 1
fi
echo
echo "The cluster is still running: nodes at 127.0.0.1:$PORT-$((PORT + 2)), data and logs in $DEMO_DIR. Try:"
echo "  $CTL --endpoint 127.0.0.1:$((PORT + 1)) get --features driver_hourly_stats:conv_rate 1001 --consistency strong"
echo "  $CTL status"
echo "  $CTL shard list"
if [ "${QUIVER_CLUSTER_TLS:-0}" = 1 ]; then
    echo "  (TLS: export QUIVER_CA=$QUIVER_CA QUIVER_CERT=$QUIVER_CERT QUIVER_KEY=$QUIVER_KEY first)"
    echo "  curl -s --cacert $QUIVER_CA --cert $QUIVER_CERT --key $QUIVER_KEY https://127.0.0.1:$((PORT + 20000))/metrics | grep quiver_requests_total"
else
    echo "  curl -s 127.0.0.1:$((PORT + 20000))/metrics | grep quiver_requests_total"
fi
echo "  $CTL backup create $BACKUPS; $CTL backup status $BACKUPS   # then restore --to-time: docs/operations.md"
echo "Stop it with: make demo-stop"
