#!/usr/bin/env bash
# Reproduces every table of docs/benchmarks.md in one run:
#   PROFILE=release ENTITIES=100000 DURATION=5s REPEAT=3 ./scripts/bench.sh
# Sections (SECTIONS, default all five), each configuration REPEAT times on a
# fresh server, the same key stream (seeded per task) and histograms:
#   single   one quiverd: serve 100 x 10 with the hot cache warm (sized to
#            the data set), default-sized and off, zipf, open loop; ingest
#            batched and single-row; mixed 95/5
#   redis    Redis 7 in memory (scripts/peers.sh): Feast's hash layout read by
#            100 pipelined HMGETs, and packed blobs read by one MGET
#   cluster  3 quiverd on loopback, RF 3 (scripts/cluster.sh): single-row and
#            100-row writes, serve at LEADER; each with requests spread over
#            the nodes, then routed to the shard leaders (--routing leader)
#   etcd     a 3-member etcd cluster (scripts/peers.sh): single puts,
#            100-put transactions, Txn of 100 ranges (serve)
#   shards   RF 3 writes over 1, 3 and 16 Raft groups (SHARDS_ENTITIES=10000)
#   tls      the cluster section with TLS on every port (not in the default set)
# quiver-bench prints one JSON line per run to $OUT; scripts/bench-tables.py
# turns them into the markdown tables (medians, min-max, ratios).
set -euo pipefail
cd "$(dirname "$0")/.."
# Sourced: it exports LIBCLANG_PATH when bindgen needs it.
source ./scripts/ensure-deps.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/quiver-target}"
PROFILE="${PROFILE:-release}"
ENTITIES="${ENTITIES:-1000000}"
DURATION="${DURATION:-10s}"
REPEAT="${REPEAT:-3}"
OUT="${OUT:-bench-results.jsonl}"
SECTIONS="${SECTIONS:-single redis cluster etcd shards}" # which tables to reproduce
SHARDS_ENTITIES="${SHARDS_ENTITIES:-10000}"
cargo build --profile "$PROFILE" --bins --quiet
BIN="$CARGO_TARGET_DIR/$([ "$PROFILE" = dev ] && echo debug || echo "$PROFILE")"
WORK=$(mktemp -d)
export QUIVER_PEERS_DIR="$WORK/peers"
trap './scripts/peers.sh stop >/dev/null 2>&1 || true; pkill -f "$WORK" 2>/dev/null || true; rm -rf "$WORK"' EXIT

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
# A hot cache big enough for the whole data set (the "warm" serving runs).
WARM_CACHE="--cache-bytes-max ${WARM_CACHE_BYTES:-4294967296}"
if [[ " $SECTIONS " == *" single "* ]]; then
# Serving runs first read every entity once (--read-all-first): the hot cache
# starts warm when it can hold the data set (WARM_CACHE), and feature 0 of
# every entity is checked once. The default cache (128 MiB) holds about a quarter of 1M rows.
run serve-cache-on "$WARM_CACHE"            --workload serve --concurrency 16 --read-all-first
run serve-cache-default ""                  --workload serve --concurrency 16 --read-all-first
run serve-cache-off "--cache-bytes-max 0"   --workload serve --concurrency 16 --read-all-first
run serve-zipf-cache-on "$WARM_CACHE"       --workload serve --concurrency 16 --read-all-first --distribution zipf
run serve-open-loop "$WARM_CACHE"           --workload serve --rate 500 --read-all-first
run ingest-batch100-fsync ""                --workload ingest --rows-per-write 100 --concurrency 16
run ingest-single-fsync ""                  --workload ingest --rows-per-write 1 --concurrency 16
run ingest-single-nofsync "--sync-writes false" --workload ingest --rows-per-write 1 --concurrency 16
run mixed-95-5 ""                           --workload mixed --concurrency 16
fi
run_cluster() { # $1 = label, $2 = node flags, rest = quiver-bench flags
    local label=$1 flags=$2 dir; shift 2
    for i in $(seq "$REPEAT"); do
        dir="$WORK/$label-$i"
        QUIVER_NODE_FLAGS="$flags" QUIVER_PROFILE="$PROFILE" QUIVER_CLUSTER_DIR="$dir" \
            QUIVER_CLUSTER_PORT=7570 ./scripts/cluster.sh start 3 >/dev/null
        # With QUIVER_CLUSTER_TLS=1 the cluster made a CA; the load
        # generator connects with its client certificate.
        local tls_env=()
        if [[ "${QUIVER_CLUSTER_TLS:-0}" == 1 ]]; then
            tls_env=(QUIVER_CA="$dir/tls/ca.pem" QUIVER_CERT="$dir/tls/client.pem"
                QUIVER_KEY="$dir/tls/client-key.pem")
        fi
        # Connections spread over the three nodes, as etcd's client does.
        env "${tls_env[@]}" "$BIN/quiver-bench" --endpoint 127.0.0.1:7570,127.0.0.1:7571,127.0.0.1:7572 \
            --entities "$ENTITIES" --duration "$DURATION" \
            --server-pid "$(cat "$dir"/node*.pid | paste -sd,)" --label "$label" --json "$@" | tee -a "$OUT"
        QUIVER_CLUSTER_DIR="$dir" ./scripts/cluster.sh stop >/dev/null
    done
}
run_peer() { # $1 = redis|etcd, $2 = target, $3 = label, rest = quiver-bench flags
    local peer=$1 target=$2 label=$3; shift 3
    for i in $(seq "$REPEAT"); do
        ./scripts/peers.sh start "$peer" >/dev/null
        "$BIN/quiver-bench" --target "$target" --endpoint "$(./scripts/peers.sh endpoints "$peer")" \
            --entities "$ENTITIES" --duration "$DURATION" \
            --server-pid "$(./scripts/peers.sh pids "$peer")" --label "$label" --json "$@" | tee -a "$OUT"
        ./scripts/peers.sh stop "$peer"
    done
}
if [[ " $SECTIONS " == *" redis "* ]]; then
run_peer redis redis-hash redis-hash-serve      --workload serve --concurrency 16 --read-all-first
run_peer redis redis-blob redis-blob-serve      --workload serve --concurrency 16 --read-all-first
run_peer redis redis-hash redis-hash-zipf-serve --workload serve --concurrency 16 --read-all-first --distribution zipf
run_peer redis redis-hash redis-hash-open-loop  --workload serve --rate 500 --read-all-first
fi
if [[ " $SECTIONS " == *" tls "* ]]; then
# The cluster section's runs with TLS on every port (peers mutual).
QUIVER_CLUSTER_TLS=1 run_cluster rf3-tls-ingest-single "" --workload ingest --rows-per-write 1 --concurrency 16
QUIVER_CLUSTER_TLS=1 run_cluster rf3-tls-ingest-batch100 "" --workload ingest --rows-per-write 100 --concurrency 16
QUIVER_CLUSTER_TLS=1 run_cluster rf3-tls-serve-leader "$WARM_CACHE" --workload serve --concurrency 16 --read-all-first
fi
if [[ " $SECTIONS " == *" cluster "* ]]; then
run_cluster rf3-ingest-single ""              --workload ingest --rows-per-write 1 --concurrency 16
run_cluster rf3-ingest-batch100 ""            --workload ingest --rows-per-write 100 --concurrency 16
run_cluster rf3-serve-leader "$WARM_CACHE"    --workload serve --concurrency 16 --read-all-first
# The same, each request sent to its rows' shard leaders (GetRoutes).
run_cluster rf3-ingest-single-routed ""       --workload ingest --rows-per-write 1 --concurrency 16 --routing leader
run_cluster rf3-ingest-batch100-routed ""     --workload ingest --rows-per-write 100 --concurrency 16 --routing leader
run_cluster rf3-serve-leader-routed "$WARM_CACHE" --workload serve --concurrency 16 --read-all-first --routing leader
fi
if [[ " $SECTIONS " == *" etcd "* ]]; then
run_peer etcd etcd etcd-ingest-single   --workload ingest --rows-per-write 1 --concurrency 16
run_peer etcd etcd etcd-ingest-txn100   --workload ingest --rows-per-write 100 --concurrency 16
run_peer etcd etcd etcd-serve           --workload serve --concurrency 16 --read-all-first
fi
if [[ " $SECTIONS " == *" shards "* ]]; then
# The write path's cost is per Raft group (docs/benchmarks.md): the same
# RF 3 writes over 1, 3 and 16 groups, and 16 without fsync. A small data set
# keeps the preload short; it does not change a write's cost.
for shards in 1 3 16; do
    ENTITIES="$SHARDS_ENTITIES" run_cluster "rf3-shards$shards-single" "--shard-count $shards" \
        --workload ingest --rows-per-write 1 --concurrency 16
    ENTITIES="$SHARDS_ENTITIES" run_cluster "rf3-shards$shards-batch100" "--shard-count $shards" \
        --workload ingest --rows-per-write 100 --concurrency 16
done
ENTITIES="$SHARDS_ENTITIES" run_cluster rf3-shards16-nofsync-single "--shard-count 16 --sync-writes false" \
    --workload ingest --rows-per-write 1 --concurrency 16
ENTITIES="$SHARDS_ENTITIES" run_cluster rf3-shards16-nofsync-batch100 "--shard-count 16 --sync-writes false" \
    --workload ingest --rows-per-write 100 --concurrency 16
fi
python3 scripts/bench-tables.py "$OUT"
echo "results in $OUT"
