//! `quiverctl shard list|transfer-leader`.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use comfy_table::Table;
use quiver_proto::admin as admin_pb;
use quiver_proto::v1 as pb;

use crate::client::{self, Client, status_error};

/// How long `shard list` waits for each other node's status.
const NODE_STATUS_TIMEOUT: Duration = Duration::from_secs(3);

/// `shard transfer-leader`.
#[derive(Debug, Args)]
pub struct TransferArgs {
    /// The shard (0 = the metadata group).
    pub shard: u32,
    /// The voter that should lead it.
    #[arg(long)]
    pub to: u64,
}

/// `shard transfer-leader`: asks the node at `endpoint`, which forwards to
/// the shard's leader.
pub async fn transfer_leader(endpoint: &str, args: &TransferArgs, json: bool) -> Result<()> {
    let mut admin = client::connect_admin(endpoint).await?;
    let done = admin
        .transfer_leader(admin_pb::TransferLeaderRequest {
            shard: args.shard,
            to_node_id: args.to,
        })
        .await
        .map_err(|s| status_error(&format!("transfer shard {}'s leadership", args.shard), s))?
        .into_inner();
    if json {
        println!(
            "{}",
            serde_json::json!({
                "shard": args.shard,
                "leader_id": done.leader_id,
                "term": done.term,
                "moved": done.moved,
                "elapsed_ms": done.elapsed_ms,
            })
        );
    } else if done.moved {
        println!(
            "shard {}: node {} leads now (term {}), handed over in {} ms",
            args.shard, done.leader_id, done.term, done.elapsed_ms
        );
    } else {
        println!(
            "shard {}: node {} already leads it (term {})",
            args.shard, done.leader_id, done.term
        );
    }
    Ok(())
}

/// One shard as the nodes report it.
#[derive(Debug, Default)]
struct ShardView {
    /// The report of the replica that leads it, if one answered.
    leader: Option<pb::GroupStatus>,
    /// Every replica's report, by node.
    replicas: BTreeMap<u64, pb::GroupStatus>,
}

/// What every node that answered says of the shards it holds.
struct ClusterView {
    shards: BTreeMap<u32, ShardView>,
    /// Nodes that answered.
    up: Vec<u64>,
    /// Nodes that did not, and why.
    unreachable: Vec<(u64, String)>,
}

/// Asks the node behind `client`, then every other node it names.
async fn cluster_view(client: &mut Client) -> Result<ClusterView> {
    let first = client
        .status(pb::StatusRequest {})
        .await
        .map_err(|s| status_error("status", s))?
        .into_inner();
    let mut reports = vec![(first.node_id, Ok(first.groups.clone()))];
    for node in first.nodes.iter().filter(|n| n.node_id != first.node_id) {
        let report = tokio::time::timeout(NODE_STATUS_TIMEOUT, node_groups(&node.addr))
            .await
            .unwrap_or_else(|_| Err(anyhow::anyhow!("no answer in {NODE_STATUS_TIMEOUT:?}")));
        reports.push((node.node_id, report));
    }
    let mut view = ClusterView {
        shards: BTreeMap::new(),
        up: Vec::new(),
        unreachable: Vec::new(),
    };
    for (node_id, report) in reports {
        match report {
            Ok(groups) => {
                view.up.push(node_id);
                for group in groups {
                    let shard = view.shards.entry(group.group).or_default();
                    // Two may say they lead (one cut off, deposed without
                    // knowing it): the higher term is the leader.
                    if group.role == "leader"
                        && shard.leader.as_ref().is_none_or(|l| l.term < group.term)
                    {
                        shard.leader = Some(group.clone());
                    }
                    shard.replicas.insert(node_id, group);
                }
            }
            Err(e) => view.unreachable.push((node_id, format!("{e:#}"))),
        }
    }
    Ok(view)
}

/// `shard list`: every node's view of the shards it holds, merged.
pub async fn list(client: &mut Client, json: bool) -> Result<()> {
    let ClusterView {
        shards,
        unreachable,
        ..
    } = cluster_view(client).await?;
    if json {
        let rows: Vec<serde_json::Value> = shards
            .iter()
            .map(|(shard, view)| {
                serde_json::json!({
                    "shard": shard,
                    "leader_id": view.leader.as_ref().map(|l| l.leader_id),
                    "term": view.leader.as_ref().map(|l| l.term),
                    "voters": view.leader.as_ref().map(|l| l.voters.clone()),
                    "replicas": view.replicas.iter().map(|(node, g)| serde_json::json!({
                        "node_id": node,
                        "role": g.role,
                        "applied_index": g.applied_index,
                        "asleep": g.asleep,
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        let unreachable: Vec<serde_json::Value> = unreachable
            .iter()
            .map(|(node, error)| serde_json::json!({"node_id": node, "error": error}))
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({"shards": rows, "unreachable": unreachable})
            )?
        );
        return Ok(());
    }
    let mut table = Table::new();
    table.set_header([
        "shard",
        "leader",
        "term",
        "voters",
        "applied (node:index)",
        "rows",
    ]);
    for (shard, view) in &shards {
        let name = if *shard == 0 {
            "0 (meta)".to_owned()
        } else {
            shard.to_string()
        };
        let applied = view
            .replicas
            .iter()
            .map(|(node, g)| format!("{node}:{}", g.applied_index))
            .collect::<Vec<_>>()
            .join(" ");
        let (leader, term, voters, rows) = match &view.leader {
            Some(l) => (
                l.leader_id.to_string(),
                l.term.to_string(),
                l.voters
                    .iter()
                    .map(u64::to_string)
                    .collect::<Vec<_>>()
                    .join(","),
                l.rows_estimate.to_string(),
            ),
            None => ("none answered".into(), "-".into(), "-".into(), "-".into()),
        };
        table.add_row([name, leader, term, voters, applied, rows]);
    }
    println!("{table}");
    for (node, error) in unreachable {
        println!("node {node} did not answer: {error}");
    }
    Ok(())
}

async fn node_groups(addr: &str) -> Result<Vec<pb::GroupStatus>> {
    let mut client = client::connect(addr).await?;
    let status = client
        .status(pb::StatusRequest {})
        .await
        .with_context(|| format!("status of {addr}"))?
        .into_inner();
    Ok(status.groups)
}
