#!/usr/bin/env bash
# A local Quiver cluster on loopback: N quiverd processes (default 3), each
# with its own data directory, all given the same static description
# (one shard unless QUIVER_NODE_FLAGS says --shard-count, replication
# factor 3 capped at N; shards split as they grow).
#
#   scripts/cluster.sh start [N]   build if needed, start N nodes, wait for leaders
#   scripts/cluster.sh stop        stop every node of the cluster (SIGTERM)
#   scripts/cluster.sh status      quiverctl status of node 1
#
# QUIVER_CLUSTER_DIR (default ./.cluster) holds data, logs and pids;
# QUIVER_CLUSTER_PORT (default 7470) is node 1's port, node i listens on
# port + i - 1; QUIVER_PROFILE (default dev) picks the build profile. Extra
# quiverd settings go through QUIVER_* variables, or as flags in
# QUIVER_NODE_FLAGS (e.g. "--shard-count 4"). QUIVER_CLUSTER_TLS=1 serves
# every port over TLS with a CA made in $QUIVER_CLUSTER_DIR/tls
# (scripts/tls-ca.sh); clients then need
#   QUIVER_CA=.../tls/ca.pem QUIVER_CERT=.../tls/client.pem QUIVER_KEY=.../tls/client-key.pem
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/quiver-target}"
CLUSTER_DIR="${QUIVER_CLUSTER_DIR:-$PWD/.cluster}"
BASE_PORT="${QUIVER_CLUSTER_PORT:-7470}"
PROFILE="${QUIVER_PROFILE:-dev}"
BIN="$CARGO_TARGET_DIR/$([ "$PROFILE" = dev ] && echo debug || echo "$PROFILE")"

stop_cluster() {
    local pid_file pid
    for pid_file in "$CLUSTER_DIR"/node*.pid; do
        [ -f "$pid_file" ] || continue
        pid="$(cat "$pid_file")"
        if kill -0 "$pid" 2>/dev/null; then
            kill -TERM "$pid"
            for _ in $(seq 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            echo "stopped $(basename "$pid_file" .pid) (pid $pid)"
        fi
        rm -f "$pid_file"
    done
}

# Nodes serve with the CA in $1 and take only clients with its
# certificates; this script's quiverctl calls present one.
use_tls() {
    export QUIVER_TLS__CERT_PATH="$1/node.pem" QUIVER_TLS__KEY_PATH="$1/node-key.pem"
    export QUIVER_TLS__CA_PATH="$1/ca.pem" QUIVER_TLS__CLIENT_CA_PATH="$1/ca.pem"
    export QUIVER_CA="$1/ca.pem" QUIVER_CERT="$1/client.pem" QUIVER_KEY="$1/client-key.pem"
}

start_cluster() {
    local count="${1:-3}" nodes="" id port
    # Sourced: it exports LIBCLANG_PATH when bindgen needs it.
    source ./scripts/ensure-deps.sh
    echo "==> building quiverd and quiverctl (the first build compiles RocksDB: many minutes on 2 cores)"
    cargo build --profile "$PROFILE" --bins --quiet
    stop_cluster
    mkdir -p "$CLUSTER_DIR"
    # Peers authenticate with a secret made for this cluster (each node's
    # peer port is its client port + 10000). Kept for nodes started later.
    if [ ! -s "$CLUSTER_DIR/secret" ]; then
        (umask 077 && od -An -N24 -tx1 /dev/urandom | tr -d ' \n' >"$CLUSTER_DIR/secret")
    fi
    QUIVER_CLUSTER__SECRET="$(cat "$CLUSTER_DIR/secret")"
    export QUIVER_CLUSTER__SECRET
    if [ "${QUIVER_CLUSTER_TLS:-0}" = 1 ]; then
        ./scripts/tls-ca.sh "$CLUSTER_DIR/tls"
        use_tls "$CLUSTER_DIR/tls"
    fi
    for id in $(seq "$count"); do
        nodes="$nodes${nodes:+,}$id=127.0.0.1:$((BASE_PORT + id - 1))"
    done
    for id in $(seq "$count"); do
        port=$((BASE_PORT + id - 1))
        rm -rf "$CLUSTER_DIR/node$id"
        # Prometheus metrics on the client port + 20000 (27470, 27471, ...).
        "$BIN/quiverd" --node-id "$id" --cluster-nodes "$nodes" \
            --listen-addr "127.0.0.1:$port" --data-dir "$CLUSTER_DIR/node$id" \
            --metrics-listen-addr "127.0.0.1:$((port + 20000))" \
            ${QUIVER_NODE_FLAGS:-} >"$CLUSTER_DIR/node$id.out" 2>"$CLUSTER_DIR/node$id.log" &
        echo $! >"$CLUSTER_DIR/node$id.pid"
    done
    echo "==> started $count nodes ($nodes); data and logs in $CLUSTER_DIR"
    for id in $(seq "$count"); do
        for _ in $(seq 300); do
            grep -q "listening on" "$CLUSTER_DIR/node$id.out" 2>/dev/null && break
            kill -0 "$(cat "$CLUSTER_DIR/node$id.pid")" 2>/dev/null || { cat "$CLUSTER_DIR/node$id.log"; exit 1; }
            sleep 0.1
        done
    done
    echo "==> waiting for every shard to elect a leader"
    # Up to 5 minutes: hundreds of groups elect slowly on 2 cores.
    for _ in $(seq 3000); do
        if "$BIN/quiverctl" --endpoint "127.0.0.1:$BASE_PORT" status --json 2>/dev/null \
            | grep -q '"leader_id": 0'; then
            sleep 0.1
        elif "$BIN/quiverctl" --endpoint "127.0.0.1:$BASE_PORT" status --json >/dev/null 2>&1; then
            return 0
        else
            sleep 0.1
        fi
    done
    echo "leaders not elected in time; see $CLUSTER_DIR/node*.log" >&2
    exit 1
}

case "${1:-}" in
    start) start_cluster "${2:-3}" ;;
    stop) stop_cluster ;;
    status)
        [ "${QUIVER_CLUSTER_TLS:-0}" = 1 ] && use_tls "$CLUSTER_DIR/tls"
        "$BIN/quiverctl" --endpoint "127.0.0.1:$BASE_PORT" status
        ;;
    *) echo "usage: $0 start [N] | stop | status" >&2; exit 2 ;;
esac
