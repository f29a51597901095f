#!/usr/bin/env python3
"""Turns quiver-bench's JSON lines (scripts/bench.sh) into the markdown tables
of docs/benchmarks.md: per configuration the median of the repetitions with
min-max, and Quiver's ratio to the peer it is compared with.

    python3 scripts/bench-tables.py bench-results.jsonl
"""

import json
import statistics
import sys

# (label, what it is, label of the row it is compared with or None)
TABLES = [
    (
        "Serving tier: Quiver (one node) vs Redis 7 (in memory), 100 entities x 10 features per get, 16 in flight",
        [
            ("serve-cache-on", "Quiver, hot cache warm (sized to hold every row)", "redis-hash-serve"),
            ("serve-cache-default", "Quiver, default 128 MiB cache", "redis-hash-serve"),
            ("serve-cache-off", "Quiver, hot cache off (RocksDB)", "redis-hash-serve"),
            ("redis-hash-serve", "Redis, Feast-like layout: 100 pipelined HMGET", None),
            ("redis-blob-serve", "Redis, packed blobs: one MGET of 100", None),
            ("serve-zipf-cache-on", "Quiver, zipf 0.99, cache on", "redis-hash-zipf-serve"),
            ("redis-hash-zipf-serve", "Redis HMGET, zipf 0.99", None),
            ("serve-open-loop", "Quiver, open loop 500 req/s", "redis-hash-open-loop"),
            ("redis-hash-open-loop", "Redis HMGET, open loop 500 req/s", None),
        ],
    ),
    (
        "Durable replicated tier: Quiver RF 3 (3 nodes) vs etcd 3 members, 16 in flight",
        [
            ("rf3-ingest-single", "Quiver RF 3 (default: 1 shard), single-row writes", "etcd-ingest-single"),
            ("rf3-ingest-single-routed", "Quiver RF 3, single-row writes, routed to leaders", "etcd-ingest-single"),
            ("etcd-ingest-single", "etcd, single puts", None),
            ("rf3-ingest-batch100", "Quiver RF 3 (default: 1 shard), 100-row writes", "etcd-ingest-txn100"),
            ("rf3-ingest-batch100-routed", "Quiver RF 3, 100-row writes, routed to leaders", "etcd-ingest-txn100"),
            ("etcd-ingest-txn100", "etcd, Txn of 100 puts", None),
            ("rf3-serve-leader", "Quiver RF 3, serve 100 x 10 at LEADER", "etcd-serve"),
            ("rf3-serve-leader-routed", "Quiver RF 3, serve 100 x 10 at LEADER, routed to leaders", "etcd-serve"),
            ("etcd-serve", "etcd, Txn of 100 ranges (linearizable)", None),
        ],
    ),
    (
        "Write cost per Raft group: Quiver RF 3 (3 nodes), the same writes over 1, 3 or 16 shards, 16 in flight",
        [
            ("rf3-shards1-single", "1 shard (default), single-row writes", None),
            ("rf3-shards3-single", "3 shards (one per node), single-row writes", None),
            ("rf3-shards16-single", "16 shards, single-row writes", None),
            ("rf3-shards16-nofsync-single", "16 shards, fsync off, single-row writes", None),
            ("rf3-shards1-batch100", "1 shard (default), 100-row writes", None),
            ("rf3-shards3-batch100", "3 shards (one per node), 100-row writes", None),
            ("rf3-shards16-batch100", "16 shards, 100-row writes", None),
            ("rf3-shards16-nofsync-batch100", "16 shards, fsync off, 100-row writes", None),
        ],
    ),
    (
        "TLS on every port: Quiver RF 3 (3 nodes), TLS against plain TCP, 16 in flight",
        [
            ("rf3-ingest-single", "plain, single-row writes", None),
            ("rf3-tls-ingest-single", "TLS, single-row writes", "rf3-ingest-single"),
            ("rf3-ingest-batch100", "plain, 100-row writes", None),
            ("rf3-tls-ingest-batch100", "TLS, 100-row writes", "rf3-ingest-batch100"),
            ("rf3-serve-leader", "plain, serve 100 x 10 at LEADER", None),
            ("rf3-tls-serve-leader", "TLS, serve 100 x 10 at LEADER", "rf3-serve-leader"),
        ],
    ),
    (
        "Quiver, one node: writes and mixed load, 16 in flight",
        [
            ("ingest-batch100-fsync", "ingest, 100-row batches, fsync", None),
            ("ingest-single-fsync", "ingest, single rows, fsync", None),
            ("ingest-single-nofsync", "ingest, single rows, no fsync", None),
            ("mixed-95-5", "mixed 95% serve / 5% 100-row writes", None),
        ],
    ),
]


def load(path):
    runs = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line.startswith("{"):
                run = json.loads(line)
                runs.setdefault(run["label"], []).append(run)
    return runs


def work_per_second(run):
    """Entities/s for reads, rows/s for writes (mixed: both added)."""
    return run["entities_per_second"] + run["rows_per_second"]


def spread(values, fmt):
    med = statistics.median(values)
    if len(values) < 2:
        return fmt(med)
    return f"{fmt(med)} ({fmt(min(values))}-{fmt(max(values))})"


def count(x):
    return f"{x:,.0f}"


def ms(x):
    return f"{x:.2f}" if x < 10 else f"{x:.1f}"


def cpu(x):
    return "n/a" if x is None else f"{x:.1f}"


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    runs = load(sys.argv[1])
    for title, rows in TABLES:
        present = [r for r in rows if r[0] in runs]
        if not present:
            continue
        print(f"\n### {title}\n")
        print("| configuration | runs | req/s | entities or rows/s | vs peer | p50 ms | p99 ms | p99.9 ms | server CPU s | client CPU s |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for label, what, peer in present:
            rs = runs[label]
            work = [work_per_second(r) for r in rs]
            ratio = ""
            if peer in runs:
                ratio = f"{statistics.median(work) / statistics.median([work_per_second(r) for r in runs[peer]]):.2f}x"
            server = [r["server_cpu_seconds"] for r in rs if r.get("server_cpu_seconds") is not None]
            client = [r["client_cpu_seconds"] for r in rs if r.get("client_cpu_seconds") is not None]
            errors = sum(r["errors"] for r in rs)
            print(
                f"| {what}{' (' + str(errors) + ' errors)' if errors else ''} | {len(rs)} "
                f"| {spread([r['requests_per_second'] for r in rs], count)} "
                f"| {spread(work, count)} | {ratio} "
                f"| {ms(statistics.median([r['p50_ms'] for r in rs]))} "
                f"| {spread([r['p99_ms'] for r in rs], ms)} "
                f"| {ms(statistics.median([r['p999_ms'] for r in rs]))} "
                f"| {cpu(statistics.median(server) if server else None)} "
                f"| {cpu(statistics.median(client) if client else None)} |"
            )
    checked = sum(r["responses_checked"] for rs in runs.values() for r in rs)
    print(f"\n{sum(len(rs) for rs in runs.values())} runs; {checked} responses checked, "
          f"{sum(r['errors'] for rs in runs.values() for r in rs)} errors.")


if __name__ == "__main__":
    main()
