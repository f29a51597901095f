//! `quiverctl node ...`, `shard move|map`, `operator ...`: the cluster map
//! and the operators that change it, through `quiver.admin.v1.Admin`.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use comfy_table::Table;
use indicatif::{ProgressBar, ProgressStyle};
use quiver_proto::admin as pb;

use crate::client::{self, status_error};

type Admin = client::AdminClient;

/// How often a `--wait` looks at the map again.
/// How long `node add` asks again while the cluster cannot take a node
/// yet (its map not stored, its metadata leader being elected).
const NODE_ADD_WAIT: Duration = Duration::from_secs(15);

/// How often waiting commands read the cluster map.
pub(crate) const WAIT_POLL: Duration = Duration::from_millis(500);

/// `node ...`.
#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// Every node in the cluster map: state, replicas, whether it is up.
    List,
    /// Reserve a node id for a new node (`quiverd --join` does the same at
    /// the node's first start; with the same addresses it gets this id).
    Add(AddArgs),
    /// Move every replica and leadership off a node (the scheduler does
    /// it, a few at a time).
    Drain(NodeArgs),
    /// Undo a drain: the node is given replicas again.
    Undrain(NodeArgs),
    /// Remove a node from the cluster for good (refused while it holds
    /// replicas, unless --force: a dead node's replicas are then re-created
    /// elsewhere).
    Remove(RemoveArgs),
}

/// `node add`.
#[derive(Debug, Args)]
pub struct AddArgs {
    /// The new node's client address, host:port.
    #[arg(long)]
    pub addr: String,
    /// Its peer address, host:port [default: the client port + 10000].
    #[arg(long)]
    pub peer_addr: Option<String>,
    /// The cluster secret (cluster.secret).
    #[arg(
        long,
        env = "QUIVER_CLUSTER__SECRET",
        default_value = "",
        hide_env_values = true
    )]
    pub secret: String,
}

/// A command on one node.
#[derive(Debug, Args)]
pub struct NodeArgs {
    /// The node id.
    pub node: u64,
    /// Wait until it is done (drain: the node holds no replica), with a
    /// progress bar.
    #[arg(long)]
    pub wait: bool,
    /// Longest wait, in seconds.
    #[arg(long, default_value_t = 600)]
    pub timeout_seconds: u64,
}

/// `node remove`.
#[derive(Debug, Args)]
pub struct RemoveArgs {
    /// The node id.
    pub node: u64,
    /// Also while the map places replicas on it (a dead node).
    #[arg(long)]
    pub force: bool,
}

/// `shard move`.
#[derive(Debug, Args)]
pub struct MoveArgs {
    /// The shard.
    pub shard: u32,
    /// The node whose replica leaves (omit to add a replica).
    #[arg(long)]
    pub from: Option<u64>,
    /// The node that gets a new replica (omit to remove one).
    #[arg(long)]
    pub to: Option<u64>,
    /// Wait until the move is done, with a progress bar.
    #[arg(long)]
    pub wait: bool,
    /// Longest wait, in seconds.
    #[arg(long, default_value_t = 600)]
    pub timeout_seconds: u64,
}

/// `shard split`.
#[derive(Debug, Args)]
pub struct SplitArgs {
    /// The shard.
    pub shard: u32,
    /// The first hash of the new shard, in hex (0x...) or decimal; default:
    /// the middle of the shard's range.
    #[arg(long, value_parser = parse_hash)]
    pub at: Option<u64>,
    /// Wait until the split is done.
    #[arg(long)]
    pub wait: bool,
    /// Longest wait, in seconds.
    #[arg(long, default_value_t = 600)]
    pub timeout_seconds: u64,
}

fn parse_hash(text: &str) -> Result<u64, String> {
    let parsed = match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(&hex.replace('_', ""), 16),
        None => text.replace('_', "").parse(),
    };
    parsed.map_err(|e| format!("{text:?} is not a 64-bit hash: {e}"))
}

/// `operator ...`.
#[derive(Debug, Subcommand)]
pub enum OperatorCommand {
    /// Operators under way (replica moves).
    List,
    /// Cancel an operator that has not started promoting its new replica.
    Cancel {
        /// The shard.
        shard: u32,
        /// The operator's id.
        id: u64,
    },
}

pub(crate) async fn cluster_map(admin: &mut Admin) -> Result<pb::GetClusterMapResponse> {
    Ok(admin
        .get_cluster_map(pb::GetClusterMapRequest {})
        .await
        .map_err(|s| status_error("read the cluster map", s))?
        .into_inner())
}

/// `node ...`.
pub async fn node(endpoint: &str, command: &NodeCommand, json: bool) -> Result<()> {
    let mut admin = client::connect_admin(endpoint).await?;
    match command {
        NodeCommand::List => node_list(&mut admin, json).await,
        NodeCommand::Add(args) => node_add(&mut admin, endpoint, args, json).await,
        NodeCommand::Drain(args) => {
            set_state(&mut admin, args.node, "draining", false, json).await?;
            if args.wait {
                wait_drained(&mut admin, args.node, args.timeout_seconds, json).await?;
            }
            Ok(())
        }
        NodeCommand::Undrain(args) => {
            set_state(&mut admin, args.node, "serving", false, json).await
        }
        NodeCommand::Remove(args) => {
            set_state(&mut admin, args.node, "removed", args.force, json).await
        }
    }
}

async fn node_list(admin: &mut Admin, json: bool) -> Result<()> {
    let map = cluster_map(admin).await?;
    if json {
        let nodes: Vec<serde_json::Value> = map
            .nodes
            .iter()
            .map(|n| {
                serde_json::json!({
                    "node_id": n.node_id, "addr": n.addr, "peer_addr": n.peer_addr,
                    "state": n.state, "replicas": n.replicas, "up": n.up,
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "map_version": map.version, "nodes": nodes,
            }))?
        );
        return Ok(());
    }
    let mut table = Table::new();
    table.set_header(["node", "addr", "peer addr", "state", "replicas", "up"]);
    for n in &map.nodes {
        table.add_row([
            n.node_id.to_string(),
            n.addr.clone(),
            n.peer_addr.clone(),
            n.state.clone(),
            n.replicas.to_string(),
            if n.up { "yes" } else { "no" }.to_owned(),
        ]);
    }
    println!("{table}");
    println!("cluster map version {}", map.version);
    Ok(())
}

async fn node_add(admin: &mut Admin, endpoint: &str, args: &AddArgs, json: bool) -> Result<()> {
    let peer_addr = match &args.peer_addr {
        Some(peer) => peer.clone(),
        None => {
            let (host, port) = args
                .addr
                .rsplit_once(':')
                .context("--addr is not host:port")?;
            let port: u16 = port.parse().context("--addr port")?;
            format!(
                "{host}:{}",
                port.checked_add(10_000)
                    .context("--addr port + 10000 is not a port: give --peer-addr")?
            )
        }
    };
    // A cluster that has just started may not have stored its map yet
    // (NotFound), or be electing its metadata leader (Unavailable): asked
    // again for a while, as `quiverd --join` does.
    let deadline = Instant::now() + NODE_ADD_WAIT;
    let answer = loop {
        let asked = admin
            .join_cluster(pb::JoinClusterRequest {
                addr: args.addr.clone(),
                peer_addr: peer_addr.clone(),
                secret: args.secret.clone(),
            })
            .await;
        match asked {
            Ok(answer) => break answer.into_inner(),
            Err(status)
                if matches!(
                    status.code(),
                    tonic::Code::NotFound | tonic::Code::Unavailable
                ) && Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(status) => return Err(status_error("add the node", status)),
        }
    };
    if json {
        println!(
            "{}",
            serde_json::json!({"node_id": answer.node_id, "addr": args.addr, "peer_addr": peer_addr})
        );
    } else {
        println!(
            "node {} reserved (joining); start it with:\n  quiverd --join {endpoint} --listen-addr {} --peer-listen-addr {peer_addr} --data-dir <empty dir>",
            answer.node_id, args.addr
        );
    }
    Ok(())
}

async fn set_state(
    admin: &mut Admin,
    node: u64,
    state: &str,
    force: bool,
    json: bool,
) -> Result<()> {
    let answer = admin
        .set_node_state(pb::SetNodeStateRequest {
            node_id: node,
            state: state.to_owned(),
            force,
        })
        .await
        .map_err(|s| status_error(&format!("set node {node} {state}"), s))?
        .into_inner();
    if json {
        println!(
            "{}",
            serde_json::json!({"node_id": node, "state": state, "map_version": answer.map_version})
        );
    } else {
        println!(
            "node {node}: {state} (cluster map version {})",
            answer.map_version
        );
    }
    Ok(())
}

pub(crate) fn progress(len: u64, json: bool) -> ProgressBar {
    let bar = if json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(len)
    };
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} {msg}")
            .expect("valid progress template"),
    );
    bar
}

/// Waits until `node` holds no replica.
async fn wait_drained(
    admin: &mut Admin,
    node: u64,
    timeout_seconds: u64,
    json: bool,
) -> Result<()> {
    let held = |map: &pb::GetClusterMapResponse| {
        map.nodes
            .iter()
            .find(|n| n.node_id == node)
            .map_or(0, |n| u64::from(n.replicas))
    };
    let start = held(&cluster_map(admin).await?);
    let bar = progress(start, json);
    let deadline = Instant::now() + Duration::from_secs(timeout_seconds);
    loop {
        let map = cluster_map(admin).await?;
        let left = held(&map);
        bar.set_position(start.saturating_sub(left));
        bar.set_message(format!("{} operators under way", map.operators.len()));
        if left == 0 {
            bar.finish_and_clear();
            if !json {
                println!(
                    "node {node} holds no replica: it can be removed (quiverctl node remove {node})"
                );
            }
            return Ok(());
        }
        if Instant::now() > deadline {
            bar.abandon();
            bail!("node {node} still holds {left} replicas after {timeout_seconds} s");
        }
        tokio::time::sleep(WAIT_POLL).await;
    }
}

fn operator_row(op: &pb::OperatorInfo) -> Vec<String> {
    if op.kind == "split" {
        return vec![
            op.id.to_string(),
            op.shard.to_string(),
            op.kind.clone(),
            "-".into(),
            format!("shard {} from {:#018x}", op.child_shard, op.split_at),
            if op.cancelled {
                "cancelled".into()
            } else {
                op.step.clone()
            },
            op.reason.clone(),
        ];
    }
    let replica = |id: u64| {
        if id == 0 {
            "-".to_owned()
        } else {
            replica_name(id)
        }
    };
    vec![
        op.id.to_string(),
        op.shard.to_string(),
        op.kind.clone(),
        replica(op.from_replica_id),
        replica(op.to_replica_id),
        op.step.clone(),
        op.reason.clone(),
    ]
}

/// A replica id as `node` or `node.incarnation`.
pub(crate) fn replica_name(id: u64) -> String {
    let node = id & u64::from(u32::MAX);
    match id >> 32 {
        0 => node.to_string(),
        incarnation => format!("{node}.{incarnation}"),
    }
}

fn operator_json(op: &pb::OperatorInfo) -> serde_json::Value {
    serde_json::json!({
        "id": op.id, "shard": op.shard, "kind": op.kind,
        "from_replica": op.from_replica_id, "to_replica": op.to_replica_id,
        "step": op.step, "reason": op.reason, "started_us": op.started_us,
    })
}

/// `operator ...`.
pub async fn operator(endpoint: &str, command: &OperatorCommand, json: bool) -> Result<()> {
    let mut admin = client::connect_admin(endpoint).await?;
    match command {
        OperatorCommand::List => {
            let map = cluster_map(&mut admin).await?;
            if json {
                let ops: Vec<serde_json::Value> = map.operators.iter().map(operator_json).collect();
                println!("{}", serde_json::to_string_pretty(&ops)?);
            } else if map.operators.is_empty() {
                println!("no operator under way");
            } else {
                let mut table = Table::new();
                table.set_header(["id", "shard", "kind", "from", "to", "step", "reason"]);
                for op in &map.operators {
                    table.add_row(operator_row(op));
                }
                println!("{table}");
            }
            Ok(())
        }
        OperatorCommand::Cancel { shard, id } => {
            admin
                .cancel_operator(pb::CancelOperatorRequest {
                    shard: *shard,
                    operator_id: *id,
                })
                .await
                .map_err(|s| status_error(&format!("cancel operator {id}"), s))?;
            if json {
                println!("{}", serde_json::json!({"cancelled": id, "shard": shard}));
            } else {
                println!(
                    "operator {id} on shard {shard} cancelled (a move's new replica is taken out; a split that applied already stands)"
                );
            }
            Ok(())
        }
    }
}

/// `shard move`.
pub async fn move_replica(endpoint: &str, args: &MoveArgs, json: bool) -> Result<()> {
    let mut admin = client::connect_admin(endpoint).await?;
    let op = admin
        .move_replica(pb::MoveReplicaRequest {
            shard: args.shard,
            from_node_id: args.from.unwrap_or(0),
            to_node_id: args.to.unwrap_or(0),
        })
        .await
        .map_err(|s| status_error(&format!("move a replica of shard {}", args.shard), s))?
        .into_inner()
        .operator
        .context("the node answered without the operator")?;
    if !json {
        println!(
            "operator {} on shard {}: {} {} -> {}",
            op.id,
            op.shard,
            op.kind,
            if op.from_replica_id == 0 {
                "-".into()
            } else {
                replica_name(op.from_replica_id)
            },
            if op.to_replica_id == 0 {
                "-".into()
            } else {
                replica_name(op.to_replica_id)
            },
        );
    }
    if args.wait {
        let bar = progress(3, json);
        let deadline = Instant::now() + Duration::from_secs(args.timeout_seconds);
        loop {
            let map = cluster_map(&mut admin).await?;
            match map.operators.iter().find(|o| o.id == op.id) {
                None => break,
                Some(running) => {
                    let position = match running.step.as_str() {
                        "add-learner" => 0,
                        "catch-up" => 1,
                        _ => 2,
                    };
                    bar.set_position(position);
                    bar.set_message(running.step.clone());
                }
            }
            if Instant::now() > deadline {
                bar.abandon();
                bail!(
                    "operator {} not done after {} s",
                    op.id,
                    args.timeout_seconds
                );
            }
            tokio::time::sleep(WAIT_POLL).await;
        }
        bar.finish_and_clear();
        let map = cluster_map(&mut admin).await?;
        let shard = map.shards.iter().find(|s| s.shard == args.shard);
        let replicas = shard
            .map(|s| {
                s.replicas
                    .iter()
                    .map(|r| format!("{} ({})", replica_name(r.replica_id), r.role))
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default();
        if json {
            println!(
                "{}",
                serde_json::json!({"operator": operator_json(&op), "done": true, "replicas": replicas})
            );
        } else {
            println!("done: shard {} replicas: {replicas}", args.shard);
        }
    } else if json {
        println!("{}", operator_json(&op));
    }
    Ok(())
}

/// `shard split`.
pub async fn split(endpoint: &str, args: &SplitArgs, json: bool) -> Result<()> {
    let mut admin = client::connect_admin(endpoint).await?;
    let op = admin
        .split_shard(pb::SplitShardRequest {
            shard: args.shard,
            at: args.at,
        })
        .await
        .map_err(|s| status_error(&format!("split shard {}", args.shard), s))?
        .into_inner()
        .operator
        .context("the node answered without the operator")?;
    if !json {
        println!(
            "operator {}: shard {} splits at {:#018x} into shard {}",
            op.id, op.shard, op.split_at, op.child_shard
        );
    }
    if args.wait {
        let deadline = Instant::now() + Duration::from_secs(args.timeout_seconds);
        while cluster_map(&mut admin)
            .await?
            .operators
            .iter()
            .any(|o| o.id == op.id)
        {
            if Instant::now() > deadline {
                bail!("split {} not done after {} s", op.id, args.timeout_seconds);
            }
            tokio::time::sleep(WAIT_POLL).await;
        }
        if !json {
            println!(
                "done: shard {} holds the hashes from {:#018x}",
                op.child_shard, op.split_at
            );
        }
    }
    if json {
        println!(
            "{}",
            serde_json::json!({
                "operator": operator_json(&op), "at": op.split_at, "child": op.child_shard,
                "done": args.wait,
            })
        );
    }
    Ok(())
}

/// `shard map`: the shards as the cluster map holds them.
pub async fn shard_map(endpoint: &str, json: bool) -> Result<()> {
    let mut admin = client::connect_admin(endpoint).await?;
    let map = cluster_map(&mut admin).await?;
    if json {
        let shards: Vec<serde_json::Value> = map
            .shards
            .iter()
            .map(|s| {
                serde_json::json!({
                    "shard": s.shard,
                    "start": format!("{:#018x}", s.start),
                    "end": if s.to_end { "end".to_owned() } else { format!("{:#018x}", s.end) },
                    "conf_ver": s.conf_ver, "version": s.version,
                    "replicas": s.replicas.iter().map(|r| serde_json::json!({
                        "replica": replica_name(r.replica_id), "node_id": r.node_id, "role": r.role,
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "map_version": map.version, "replicated": map.replicated, "shards": shards,
                "operators": map.operators.iter().map(operator_json).collect::<Vec<_>>(),
            }))?
        );
        return Ok(());
    }
    let mut table = Table::new();
    table.set_header([
        "shard",
        "hash range",
        "epoch",
        "replicas (node.incarnation)",
    ]);
    for s in &map.shards {
        let end = if s.to_end {
            "end".to_owned()
        } else {
            format!("{:016x}", s.end)
        };
        table.add_row([
            s.shard.to_string(),
            format!("{:016x}..{end}", s.start),
            format!("{}/{}", s.conf_ver, s.version),
            s.replicas
                .iter()
                .map(|r| {
                    let name = replica_name(r.replica_id);
                    if r.role == "voter" {
                        name
                    } else {
                        format!("{name} ({})", r.role)
                    }
                })
                .collect::<Vec<_>>()
                .join(", "),
        ]);
    }
    println!("{table}");
    println!(
        "cluster map version {}{}; {} operators under way",
        map.version,
        if map.replicated {
            ""
        } else {
            " (not stored yet: the node's configuration)"
        },
        map.operators.len()
    );
    Ok(())
}
