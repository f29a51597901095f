#!/usr/bin/env bash
# Quiver's benchmark peers on loopback, for the side-by-side tables of
# docs/benchmarks.md. They are measured against, never used by Quiver.
#
#   scripts/peers.sh install        apt-get install redis-server, etcd-server,
#                                   etcd-client if missing
#   scripts/peers.sh start redis    Redis, in memory only (no RDB, no AOF)
#   scripts/peers.sh start etcd     a 3-member etcd cluster (fsync as shipped)
#   scripts/peers.sh stop [redis|etcd]   stop one or both, remove their data
#   scripts/peers.sh endpoints redis|etcd   client addresses, comma separated
#   scripts/peers.sh pids redis|etcd        server pids, comma separated
#
# QUIVER_PEERS_DIR (default /tmp/quiver-peers) holds data, logs and pids.
# QUIVER_PEERS_PORT (default 7580): Redis listens on it, etcd member i on
# port + i for clients and port + 10 + i for its peers.
set -euo pipefail
DIR="${QUIVER_PEERS_DIR:-/tmp/quiver-peers}"
PORT="${QUIVER_PEERS_PORT:-7580}"
ETCD_MEMBERS=3

install_peers() {
    local missing=()
    command -v redis-server >/dev/null || missing+=(redis-server)
    command -v etcd >/dev/null || missing+=(etcd-server)
    command -v etcdctl >/dev/null || missing+=(etcd-client)
    [ ${#missing[@]} -eq 0 ] && return 0
    echo "==> installing ${missing[*]}"
    local sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
}

endpoints() {
    case "$1" in
    redis) echo "127.0.0.1:$PORT" ;;
    etcd)
        local list="" i
        for i in $(seq "$ETCD_MEMBERS"); do list="$list${list:+,}127.0.0.1:$((PORT + i))"; done
        echo "$list"
        ;;
    *) echo "unknown peer: $1" >&2; exit 2 ;;
    esac
}

pids() {
    local list="" f
    for f in "$DIR/$1"*.pid; do
        [ -f "$f" ] && list="$list${list:+,}$(cat "$f")"
    done
    echo "$list"
}

stop_peer() { # $1 = redis|etcd
    local f pid
    for f in "$DIR/$1"*.pid; do
        [ -f "$f" ] || continue
        pid="$(cat "$f")"
        if kill -0 "$pid" 2>/dev/null; then
            kill -TERM "$pid"
            for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -KILL "$pid" 2>/dev/null || true
        fi
        rm -f "$f"
    done
    rm -rf "${DIR:?}/$1"-data*
}

start_redis() {
    stop_peer redis
    mkdir -p "$DIR/redis-data"
    # No persistence: the in-memory serving tier Feast deployments run.
    redis-server --bind 127.0.0.1 --port "$PORT" --save "" --appendonly no \
        --dir "$DIR/redis-data" --daemonize no >"$DIR/redis.log" 2>&1 &
    echo $! >"$DIR/redis.pid"
    for _ in $(seq 100); do
        [ "$(redis-cli -p "$PORT" ping 2>/dev/null)" = PONG ] && { echo "redis on 127.0.0.1:$PORT"; return 0; }
        sleep 0.1
    done
    echo "redis did not start; see $DIR/redis.log" >&2
    exit 1
}

start_etcd() {
    stop_peer etcd
    local cluster="" i
    for i in $(seq "$ETCD_MEMBERS"); do
        cluster="$cluster${cluster:+,}m$i=http://127.0.0.1:$((PORT + 10 + i))"
    done
    for i in $(seq "$ETCD_MEMBERS"); do
        mkdir -p "$DIR/etcd-data$i"
        etcd --name "m$i" --data-dir "$DIR/etcd-data$i" \
            --listen-client-urls "http://127.0.0.1:$((PORT + i))" \
            --advertise-client-urls "http://127.0.0.1:$((PORT + i))" \
            --listen-peer-urls "http://127.0.0.1:$((PORT + 10 + i))" \
            --initial-advertise-peer-urls "http://127.0.0.1:$((PORT + 10 + i))" \
            --initial-cluster "$cluster" --initial-cluster-token quiver-bench \
            --initial-cluster-state new >"$DIR/etcd$i.log" 2>&1 &
        echo $! >"$DIR/etcd$i.pid"
    done
    for _ in $(seq 200); do
        if ETCDCTL_API=3 etcdctl --endpoints "$(endpoints etcd)" endpoint health >/dev/null 2>&1; then
            echo "etcd members on $(endpoints etcd)"
            return 0
        fi
        sleep 0.1
    done
    echo "etcd did not become healthy; see $DIR/etcd*.log" >&2
    exit 1
}

mkdir -p "$DIR"
case "${1:-}" in
install) install_peers ;;
start)
    install_peers
    case "${2:-}" in
    redis) start_redis ;;
    etcd) start_etcd ;;
    *) echo "usage: $0 start redis|etcd" >&2; exit 2 ;;
    esac
    ;;
stop)
    if [ -n "${2:-}" ]; then stop_peer "$2"; else stop_peer redis; stop_peer etcd; fi
    ;;
endpoints) endpoints "${2:?redis or etcd}" ;;
pids) pids "${2:?redis or etcd}" ;;
*)
    echo "usage: $0 install | start redis|etcd | stop [redis|etcd] | endpoints redis|etcd | pids redis|etcd" >&2
    exit 2
    ;;
esac
