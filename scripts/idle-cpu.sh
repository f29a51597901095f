#!/usr/bin/env bash
# Idle CPU of a local 3-node cluster (RF 3) by group count, with and without
# hibernation: the table in docs/benchmarks.md.
#
#   scripts/idle-cpu.sh                       release build, 16/64/256 shards, 60 s each
#   PROFILE=dev SHARDS="16" SECONDS_IDLE=30 scripts/idle-cpu.sh
#
# For each shard count (groups per node = shards + the metadata group) it
# starts the cluster, writes nothing, waits until every group on every node
# is asleep (or, with hibernation off, for 10 s after the leaders are
# elected), then reads each quiverd's user+system CPU time from
# /proc/<pid>/stat at the start and the end of the window. It prints one
# markdown row per run: % of one core per node, and their mean.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/quiver-target}"
PROFILE="${PROFILE:-release}"
SHARDS="${SHARDS:-16 64 256}"
SECONDS_IDLE="${SECONDS_IDLE:-60}"
MODES="${MODES:-on off}"
export QUIVER_PROFILE="$PROFILE"
export QUIVER_CLUSTER_DIR="${QUIVER_CLUSTER_DIR:-$PWD/.idle-cluster}"
export QUIVER_CLUSTER_PORT="${QUIVER_CLUSTER_PORT:-7570}"
BIN="$CARGO_TARGET_DIR/$([ "$PROFILE" = dev ] && echo debug || echo "$PROFILE")"
CTL="$BIN/quiverctl --endpoint 127.0.0.1:$QUIVER_CLUSTER_PORT"
TICKS="$(getconf CLK_TCK)"

cpu_ticks() { # utime + stime of a pid, in clock ticks
    awk '{print $14 + $15}' "/proc/$1/stat"
}

awake_groups() { # groups not asleep on any node, or -1 if a node does not answer
    local total=0 port n
    for i in 0 1 2; do
        port=$((QUIVER_CLUSTER_PORT + i))
        n=$("$BIN/quiverctl" --endpoint "127.0.0.1:$port" status --json 2>/dev/null \
            | grep -c '"asleep": false') || true
        "$BIN/quiverctl" --endpoint "127.0.0.1:$port" status --json >/dev/null 2>&1 || { echo -1; return; }
        total=$((total + n))
    done
    echo "$total"
}

trap './scripts/cluster.sh stop >/dev/null 2>&1 || true' EXIT
echo "| profile | hibernation | groups per node | node 1 | node 2 | node 3 | mean (% of one core over ${SECONDS_IDLE}s) |"
echo "|---|---|---|---|---|---|---|"
for shards in $SHARDS; do
    for mode in $MODES; do
        after=$([ "$mode" = on ] && echo 2000 || echo 0)
        QUIVER_CLUSTER__HIBERNATE_AFTER_MS="$after" QUIVER_NODE_FLAGS="--shard-count $shards" \
            ./scripts/cluster.sh start 3 >/dev/null
        if [ "$mode" = on ]; then
            for _ in $(seq 600); do
                [ "$(awake_groups)" = 0 ] && break
                sleep 0.5
            done
            if [ "$(awake_groups)" != 0 ]; then
                echo "groups still awake after 300 s at $shards shards" >&2
                exit 1
            fi
        else
            sleep 10
        fi
        pids=()
        for i in 1 2 3; do pids+=("$(cat "$QUIVER_CLUSTER_DIR/node$i.pid")"); done
        start=()
        for pid in "${pids[@]}"; do start+=("$(cpu_ticks "$pid")"); done
        sleep "$SECONDS_IDLE"
        row="| $PROFILE | $mode | $((shards + 1)) |"
        sum=0
        for i in 0 1 2; do
            used=$(( $(cpu_ticks "${pids[$i]}") - ${start[$i]} ))
            pct=$(awk -v u="$used" -v t="$TICKS" -v s="$SECONDS_IDLE" 'BEGIN { printf "%.1f", 100 * u / t / s }')
            sum=$(awk -v a="$sum" -v b="$pct" 'BEGIN { print a + b }')
            row="$row $pct% |"
        done
        row="$row $(awk -v s="$sum" 'BEGIN { printf "%.1f", s / 3 }')% |"
        echo "$row"
        ./scripts/cluster.sh stop >/dev/null
    done
done
