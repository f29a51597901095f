//! What the dynamic-cluster tests share: a writer that keeps an
//! acknowledged-write ledger while the cluster changes under it, a reader
//! that checks STRONG reads against the writer's progress as they happen,
//! the check of that ledger, and waits on the cluster map.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::{Duration, Instant};

use quiver_proto::admin as admin_pb;
use quiver_proto::v1 as pb;

use crate::Client;
use crate::counter::{read_values, write_values};

/// How long a test waits for the cluster map to reach a state.
pub const MAP_WAIT: Duration = Duration::from_secs(120);

/// What the writer did: per key, the highest value acknowledged and the
/// highest value attempted (an unacknowledged write may or may not have
/// been applied).
#[derive(Debug, Default, Clone)]
pub struct Ledger {
    /// Highest acknowledged value per key.
    pub acked: HashMap<String, i64>,
    /// Highest attempted value per key.
    pub attempted: HashMap<String, i64>,
    /// Writes acknowledged.
    pub acks: u64,
    /// Writes that failed (retryable or not).
    pub failures: u64,
    /// Longest time without an acknowledged write.
    pub longest_gap: Duration,
}

/// How far a [`Writer`] has got, as it goes: every round writes one value
/// to all its keys.
#[derive(Debug, Default)]
pub struct Progress {
    /// The value of the last round acknowledged.
    pub acked: AtomicI64,
    /// The value of the last round attempted (published before it is sent).
    pub attempted: AtomicI64,
}

/// A writer running in the background.
pub struct Writer {
    stop: Arc<AtomicBool>,
    progress: Arc<Progress>,
    handle: tokio::task::JoinHandle<Ledger>,
}

impl Writer {
    /// Writes `keys` in rounds, each round every key with the next value
    /// (one request per round), until stopped.
    pub fn start(client: Client, keys: Vec<String>) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let progress = Arc::new(Progress::default());
        let published = progress.clone();
        let handle = tokio::spawn(async move {
            let mut client = client;
            let mut ledger = Ledger::default();
            let mut last_ack = Instant::now();
            let mut value = 0i64;
            while !stopped.load(Ordering::SeqCst) {
                value += 1;
                let batch: Vec<(String, i64)> = keys.iter().map(|k| (k.clone(), value)).collect();
                for key in &keys {
                    ledger.attempted.insert(key.clone(), value);
                }
                published.attempted.store(value, Ordering::SeqCst);
                match tokio::time::timeout(
                    Duration::from_secs(20),
                    write_values(&mut client, &batch),
                )
                .await
                {
                    Ok(Ok(())) => {
                        for key in &keys {
                            ledger.acked.insert(key.clone(), value);
                        }
                        published.acked.store(value, Ordering::SeqCst);
                        ledger.acks += 1;
                        ledger.longest_gap = ledger.longest_gap.max(last_ack.elapsed());
                        last_ack = Instant::now();
                    }
                    _ => ledger.failures += 1,
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            ledger
        });
        Writer {
            stop,
            progress,
            handle,
        }
    }

    /// The writer's progress, for a [`Reader`] of the same keys.
    pub fn progress(&self) -> Arc<Progress> {
        self.progress.clone()
    }

    /// Stops the writer and returns its ledger.
    pub async fn stop(self) -> Ledger {
        self.stop.store(true, Ordering::SeqCst);
        self.handle.await.expect("the writer task")
    }
}

/// What a [`Reader`] saw.
#[derive(Debug, Default, Clone)]
pub struct Reads {
    /// Reads that answered.
    pub ok: u64,
    /// Reads that failed (a retryable error or a timeout).
    pub failures: u64,
    /// Longest time without an answered read.
    pub longest_gap: Duration,
    /// Values a STRONG read must not have returned: older than a write
    /// acknowledged before the read started, or newer than any attempted
    /// by the time it answered.
    pub violations: Vec<String>,
}

/// A STRONG reader running beside a [`Writer`]: a real-time check of
/// linearizability for each read (every write acknowledged before it
/// started is visible, and nothing not yet attempted is).
pub struct Reader {
    stop: Arc<AtomicBool>,
    handle: tokio::task::JoinHandle<Reads>,
}

impl Reader {
    /// Reads `keys` (the writer's) at STRONG through `client` until stopped.
    pub fn start(client: Client, keys: Vec<String>, progress: Arc<Progress>) -> Reader {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let handle = tokio::spawn(async move {
            let mut client = client;
            let mut reads = Reads::default();
            let mut last_ok = Instant::now();
            while !stopped.load(Ordering::SeqCst) {
                let floor = progress.acked.load(Ordering::SeqCst);
                let read = tokio::time::timeout(
                    Duration::from_secs(20),
                    read_values(&mut client, &keys, pb::Consistency::Strong),
                )
                .await;
                let ceiling = progress.attempted.load(Ordering::SeqCst);
                match read {
                    Ok(Ok((values, _))) => {
                        reads.ok += 1;
                        reads.longest_gap = reads.longest_gap.max(last_ok.elapsed());
                        last_ok = Instant::now();
                        for (key, value) in keys.iter().zip(values) {
                            let value = value.unwrap_or(0);
                            if (value < floor || value > ceiling) && reads.violations.len() < 20 {
                                reads
                                    .violations
                                    .push(format!("{key} = {value}, outside [{floor}, {ceiling}]"));
                            }
                        }
                    }
                    _ => reads.failures += 1,
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            reads
        });
        Reader { stop, handle }
    }

    /// Stops the reader and returns what it saw.
    pub async fn stop(self) -> Reads {
        self.stop.store(true, Ordering::SeqCst);
        self.handle.await.expect("the reader task")
    }
}

/// Reads every key of the ledger at STRONG through `client`: each holds a
/// value at least the highest acknowledged and at most the highest
/// attempted.
pub async fn check_ledger(client: &Client, ledger: &Ledger, through: &str) -> Result<(), String> {
    let keys: Vec<String> = ledger.attempted.keys().cloned().collect();
    let mut client = client.clone();
    let (values, _) = read_values(&mut client, &keys, pb::Consistency::Strong).await?;
    for (key, value) in keys.iter().zip(values) {
        let acked = ledger.acked.get(key).copied().unwrap_or(0);
        let attempted = ledger.attempted.get(key).copied().unwrap_or(0);
        let value = value.unwrap_or(0);
        if value < acked || value > attempted {
            return Err(format!(
                "through {through}: {key} = {value}, acknowledged up to {acked}, attempted up to {attempted}"
            ));
        }
    }
    Ok(())
}

/// How many groups each of `nodes` leads, as `quiverctl shard list` through
/// `endpoint` reports (the metadata group counted if `metadata`).
pub fn leader_counts(
    endpoint: &str,
    nodes: &[u64],
    metadata: bool,
) -> Result<BTreeMap<u64, usize>, String> {
    let out =
        crate::quiverctl(endpoint, &["--json", "shard", "list"]).map_err(|e| e.to_string())?;
    let listed: serde_json::Value = serde_json::from_str(&out).map_err(|e| e.to_string())?;
    let mut counts: BTreeMap<u64, usize> = nodes.iter().map(|&n| (n, 0)).collect();
    for shard in listed["shards"].as_array().ok_or("no shards listed")? {
        if !metadata && shard["shard"].as_u64() == Some(0) {
            continue;
        }
        if let Some(leader) = shard["leader_id"].as_u64() {
            *counts.entry(leader).or_default() += 1;
        }
    }
    Ok(counts)
}

/// The cluster map as the node at `endpoint` answers it.
pub async fn cluster_map(endpoint: &str) -> Result<admin_pb::GetClusterMapResponse, String> {
    let channel = crate::endpoint(endpoint)
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| e.to_string())?;
    admin_pb::admin_client::AdminClient::new(channel)
        .get_cluster_map(admin_pb::GetClusterMapRequest {})
        .await
        .map(tonic::Response::into_inner)
        .map_err(|e| e.to_string())
}

/// Waits until the map `endpoint` answers satisfies `done` (which says
/// what is missing otherwise); returns that map.
pub async fn wait_map(
    endpoint: &str,
    what: &str,
    mut done: impl FnMut(&admin_pb::GetClusterMapResponse) -> Result<(), String>,
) -> admin_pb::GetClusterMapResponse {
    let deadline = Instant::now() + MAP_WAIT;
    loop {
        let last = match cluster_map(endpoint).await {
            Ok(map) => match done(&map) {
                Ok(()) => return map,
                Err(missing) => missing,
            },
            Err(e) => e,
        };
        if Instant::now() > deadline {
            panic!("{what}: not reached after {MAP_WAIT:?}: {last}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The voters' nodes of `shard` in `map`.
pub fn voter_nodes(map: &admin_pb::GetClusterMapResponse, shard: u32) -> Vec<u64> {
    map.shards
        .iter()
        .find(|s| s.shard == shard)
        .map(|s| {
            s.replicas
                .iter()
                .filter(|r| r.role == "voter")
                .map(|r| r.node_id)
                .collect()
        })
        .unwrap_or_default()
}

/// Every shard has `voters` voters on the nodes in `on`, no learner, no
/// operator is under way, and no tombstone is left.
pub fn settled(
    map: &admin_pb::GetClusterMapResponse,
    voters: usize,
    on: &[u64],
) -> Result<(), String> {
    if !map.operators.is_empty() {
        return Err(format!("{} operators under way", map.operators.len()));
    }
    if !map.tombstones.is_empty() {
        return Err(format!("{} tombstones left", map.tombstones.len()));
    }
    for shard in &map.shards {
        let nodes: Vec<u64> = shard.replicas.iter().map(|r| r.node_id).collect();
        let all_voters = shard.replicas.iter().all(|r| r.role == "voter");
        if nodes.len() != voters || !all_voters || !nodes.iter().all(|n| on.contains(n)) {
            return Err(format!(
                "shard {} replicas {:?}",
                shard.shard, shard.replicas
            ));
        }
    }
    Ok(())
}

/// Replicas per node (of the nodes in `on`).
pub fn replica_counts(map: &admin_pb::GetClusterMapResponse, on: &[u64]) -> Vec<u32> {
    on.iter()
        .map(|id| {
            map.nodes
                .iter()
                .find(|n| n.node_id == *id)
                .map_or(0, |n| n.replicas)
        })
        .collect()
}

/// Replica counts of `on` are each within one of their mean.
pub fn balanced_within_one(
    map: &admin_pb::GetClusterMapResponse,
    on: &[u64],
) -> Result<(), String> {
    let counts = replica_counts(map, on);
    let total: u32 = counts.iter().sum();
    let n = u32::try_from(counts.len()).unwrap_or(u32::MAX);
    // |count - total / n| <= 1, in integers.
    if counts.iter().all(|&c| (c * n).abs_diff(total) <= n) {
        Ok(())
    } else {
        Err(format!("replicas per node {counts:?}"))
    }
}

/// The directories of a node's replicas (`groups/<shard>[.<incarnation>]`),
/// sorted; a name starting with a dot (the trash) is left out.
pub fn replica_dirs(node: &crate::Node) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(node.data_dir().join("groups"))
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| !n.starts_with('.'))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Waits until `node` has no directory of a replica of `shard` left.
pub async fn wait_replica_gone(node: &crate::Node, shard: u32) {
    let shard = shard.to_string();
    let dotted = format!("{shard}.");
    crate::counter::retry(
        &format!("the node deletes its replica of shard {shard}"),
        crate::counter::CONVERGE_WAIT,
        || {
            let dirs = replica_dirs(node);
            let found = dirs.iter().any(|d| *d == shard || d.starts_with(&dotted));
            async move {
                if found {
                    Err(format!("{dirs:?}"))
                } else {
                    Ok(())
                }
            }
        },
    )
    .await;
}
