#!/usr/bin/env bash
# A cluster that grows under load, on loopback (the README's "Growing a
# cluster"): one node starts alone (with the default of one shard), two
# nodes are added and join (the shard grows to 3 replicas), the sample
# drivers are loaded, the hot shard is split, a fourth node is added (the
# replicas spread), the first is drained and removed, and a shard is split
# again, all with quiverctl, while a client writes every 50 ms and another
# reads at STRONG every 200 ms (through node 2, which stays). Prints each
# command and its output, then what the two clients saw. The nodes keep
# running; `./scripts/grow.sh stop` stops them.
#
# QUIVER_GROW_DIR (default ./.grow) holds data, logs and pids;
# QUIVER_GROW_PORT (default 7570) is node 1's port, node i listens on
# port + i - 1 (peers on port + 10000).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/quiver-target}"
DIR="${QUIVER_GROW_DIR:-$PWD/.grow}"
PORT="${QUIVER_GROW_PORT:-7570}"
BIN="$CARGO_TARGET_DIR/debug"

stop_nodes() {
    local pid_file pid
    for pid_file in "$DIR"/node*.pid "$DIR"/client*.pid; do
        [ -f "$pid_file" ] || continue
        pid="$(cat "$pid_file")"
        if kill -0 "$pid" 2>/dev/null; then
            kill -TERM "$pid"
            for _ in $(seq 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        fi
        rm -f "$pid_file"
    done
}

if [ "${1:-}" = "stop" ]; then
    stop_nodes
    exit 0
fi

# Sourced: it exports LIBCLANG_PATH when bindgen needs it.
source ./scripts/ensure-deps.sh
echo "==> building quiverd and quiverctl (the first build compiles RocksDB: many minutes on 2 cores)"
cargo build --bins --quiet
stop_nodes
rm -rf "$DIR"
mkdir -p "$DIR"
(umask 077 && od -An -N24 -tx1 /dev/urandom | tr -d ' \n' >"$DIR/secret")
QUIVER_CLUSTER__SECRET="$(cat "$DIR/secret")"
export QUIVER_CLUSTER__SECRET
N1="127.0.0.1:$PORT"

# Starts node $1 with the flags that follow; waits until it listens.
start_node() {
    local id="$1"
    shift
    echo "\$ quiverd --listen-addr 127.0.0.1:$((PORT + id - 1)) --data-dir node$id $*"
    "$BIN/quiverd" --listen-addr "127.0.0.1:$((PORT + id - 1))" --data-dir "$DIR/node$id" "$@" \
        >"$DIR/node$id.out" 2>"$DIR/node$id.log" &
    echo $! >"$DIR/node$id.pid"
    for _ in $(seq 300); do
        grep -q "listening on" "$DIR/node$id.out" 2>/dev/null && return 0
        kill -0 "$(cat "$DIR/node$id.pid")" 2>/dev/null || { cat "$DIR/node$id.log"; exit 1; }
        sleep 0.1
    done
    echo "node $id did not start; see $DIR/node$id.log" >&2
    exit 1
}

# Runs quiverctl against node $ENDPOINT, showing the command.
ctl() {
    echo "\$ quiverctl $*"
    "$BIN/quiverctl" --endpoint "$ENDPOINT" "$@"
}

# Waits until every shard has $1 voters on nodes whose ids are in "$2"
# (space separated), no operator runs and no tombstone is left, and, if $3
# is given, every node in "$2" holds at least $3 replicas.
wait_settled() {
    local voters="$1" nodes="$2" each="${3:-}"
    for _ in $(seq 600); do
        if "$BIN/quiverctl" --endpoint "$ENDPOINT" --json shard map 2>/dev/null \
            | python3 -c '
import json, sys
m = json.load(sys.stdin)
voters, nodes, each = int(sys.argv[1]), {int(n) for n in sys.argv[2].split()}, sys.argv[3]
ok = not m["operators"] and all(
    len(s["replicas"]) == voters and all(r["role"] == "voter" and r["node_id"] in nodes for r in s["replicas"])
    for s in m["shards"])
if ok and each:
    count = {n: 0 for n in nodes}
    for s in m["shards"]:
        for r in s["replicas"]:
            count[r["node_id"]] += 1
    ok = all(c >= int(each) for c in count.values())
sys.exit(0 if ok else 1)
' "$voters" "$nodes" "$each"; then
            return 0
        fi
        sleep 0.5
    done
    echo "the cluster did not settle ($voters voters on nodes $nodes); see $DIR/node*.log" >&2
    exit 1
}

echo "==> node 1 starts alone: one shard (the default), a Raft group of one replica for now"
ENDPOINT="$N1"
start_node 1
ctl views apply -f sample/views.yaml

echo "==> nodes 2 and 3 are added and join through node 1: the scheduler gives the shard 3 replicas"
for id in 2 3; do
    ctl node add --addr "127.0.0.1:$((PORT + id - 1))"
    start_node "$id" --join "$N1"
done
wait_settled 3 "1 2 3"
ctl node list
ctl shard map

echo "==> the sample drivers are loaded"
"$BIN/quiverctl" --endpoint "$N1" sample generate --out-dir "$DIR/data" --drivers 20000 --customers 1 >/dev/null
ctl put --view driver_hourly_stats -f "$DIR/data/drivers.csv"

N2="127.0.0.1:$((PORT + 1))"
echo "==> from here to the end a client writes every 50 ms and another reads 100 drivers at STRONG every 200 ms, through node 2"
cat >"$DIR/probe.yaml" <<'YAML'
views:
  - name: grow_probe
    entities: [probe_id]
    description: Rows the growth walkthrough's client writes.
    features:
      - { name: seen, type: bool }
YAML
"$BIN/quiverctl" --endpoint "$N2" views apply -f "$DIR/probe.yaml" >/dev/null
"$BIN/quiverctl" --endpoint "$N2" probe --view grow_probe --duration 600s >"$DIR/probe.out" 2>&1 &
echo $! >"$DIR/client1.pid"
(
    reads=0 failed=0
    trap 'echo "STRONG reads of 100 drivers: $reads answered, $failed failed" >"$DIR/reads.out"; exit 0' TERM
    while true; do
        # shellcheck disable=SC2046
        if "$BIN/quiverctl" --endpoint "$N2" get --consistency strong \
            --features driver_hourly_stats:conv_rate $(seq 1001 1100) >/dev/null 2>>"$DIR/reads.err"; then
            reads=$((reads + 1))
        else
            failed=$((failed + 1))
        fi
        echo "STRONG reads of 100 drivers: $reads answered, $failed failed" >"$DIR/reads.out"
        sleep 0.2
    done
) &
echo $! >"$DIR/client2.pid"

echo "==> the shard is hot: split it in the middle of its range (shard 2 takes the upper half)"
ctl shard split 1 --wait
wait_settled 3 "1 2 3"

echo "==> node 4 is added and joins: the scheduler's plan, then replicas move to it"
ctl node add --addr "127.0.0.1:$((PORT + 3))"
start_node 4 --join "$N1"
# The plan the scheduler is carrying out (round 1 runs already).
for _ in $(seq 40); do
    "$BIN/quiverctl" --endpoint "$N1" --json node list 2>/dev/null \
        | python3 -c 'import json,sys; sys.exit(0 if any(n["node_id"] == 4 and n["state"] == "serving" and n["up"] for n in json.load(sys.stdin)["nodes"]) else 1)' \
        && break
    sleep 0.25
done
ctl rebalance
wait_settled 3 "1 2 3 4" 1
ctl node list

echo "==> node 1 is drained (its replicas and leaderships move away), then removed"
ENDPOINT="$N2"
ctl node drain 1 --wait
ctl node remove 1
wait_settled 3 "2 3 4"
ctl node list

echo "==> shard 2 is split again: shard 3 takes the upper half of its range"
ctl shard split 2 --wait
ctl shard map
ctl rebalance
ctl rebalance --apply
ctl get --features driver_hourly_stats:conv_rate,driver_hourly_stats:acc_rate 1001 1002 1003

echo "==> what the clients saw"
kill -TERM "$(cat "$DIR/client2.pid")" && rm -f "$DIR/client2.pid"
sleep 0.5
kill -INT "$(cat "$DIR/client1.pid")" 2>/dev/null || true
sleep 1
rm -f "$DIR/client1.pid"
cat "$DIR/reads.out"
tail -n 20 "$DIR/probe.out"
echo "==> done; the nodes keep running (node 1 no longer belongs to the cluster): ./scripts/grow.sh stop"
