//! `quiverctl rebalance`: the scheduler's whole plan, as its own planner
//! makes it on the node asked (replica moves, removals and splits round by
//! round, then the leader balancer's handovers), printed as tables; with
//! `--apply`, carried out round by round behind a progress bar.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use clap::Args;
use comfy_table::Table;
use quiver_proto::admin as pb;

use crate::client::{self, AdminClient, status_error};
use crate::cluster::{WAIT_POLL, cluster_map, progress};

/// Most rounds `--apply` starts: a plan that keeps coming back after this
/// many (the map changing under it) is left to the scheduler.
const APPLY_ROUNDS_MAX: u32 = 200;

/// `rebalance`.
#[derive(Debug, Args)]
pub struct RebalanceArgs {
    /// Carry the plan out (without it, only print it).
    #[arg(long, conflicts_with = "dry_run")]
    pub apply: bool,
    /// Only print the plan (the default).
    #[arg(long)]
    pub dry_run: bool,
    /// With `--apply`: give up waiting for the operators after this long.
    #[arg(long, default_value_t = 3600, value_parser = clap::value_parser!(u64).range(1..=604_800))]
    pub timeout_seconds: u64,
}

/// `rebalance`: prints the plan; with `--apply`, starts each round's
/// operators, waits for them (a progress bar over the plan's operators),
/// plans again until nothing is left, then makes the leader handovers the
/// balancer plans on the settled cluster.
pub async fn rebalance(endpoint: &str, args: &RebalanceArgs, json: bool) -> Result<()> {
    let mut admin = client::connect_admin(endpoint).await?;
    let plan = fetch(&mut admin, true).await?;
    if !args.apply {
        if json {
            println!(
                "{}",
                serde_json::to_string_pretty(&serde_json::json!({
                    "applied": false,
                    "operators": plan.planned.iter().map(|p| operator_json(p, None)).collect::<Vec<_>>(),
                    "handovers": plan.handovers.iter().map(|h| handover_json(h, None)).collect::<Vec<_>>(),
                }))?
            );
        } else {
            print_operators(&plan.planned, None);
            print_handovers(&plan.handovers, None);
            if !plan.planned.is_empty() || !plan.handovers.is_empty() {
                println!("dry run: `quiverctl rebalance --apply` carries this out");
            }
        }
        return Ok(());
    }
    let deadline = Instant::now() + Duration::from_secs(args.timeout_seconds);
    let started = apply_operators(&mut admin, plan.planned.len(), deadline, json).await?;
    // Planned again: moves change who leads what.
    let handovers = fetch(&mut admin, false).await?.handovers;
    let results = apply_handovers(&mut admin, &handovers, json).await;
    let operators: Vec<&pb::PlannedOperator> = started.iter().map(|(p, _)| p).collect();
    let operator_results: Vec<String> = started.iter().map(|(_, r)| r.clone()).collect();
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "applied": true,
                "operators": operators
                    .iter()
                    .zip(&operator_results)
                    .map(|(p, r)| operator_json(p, Some(r)))
                    .collect::<Vec<_>>(),
                "handovers": handovers
                    .iter()
                    .zip(&results)
                    .map(|(h, r)| handover_json(h, Some(r)))
                    .collect::<Vec<_>>(),
            }))?
        );
    } else {
        let rows: Vec<pb::PlannedOperator> = operators.into_iter().cloned().collect();
        print_operators(&rows, Some(&operator_results));
        print_handovers(&handovers, Some(&results));
    }
    let failed = results.iter().filter(|r| r.starts_with("failed")).count();
    if failed > 0 {
        bail!("{failed} of {} handovers failed", handovers.len());
    }
    Ok(())
}

async fn fetch(admin: &mut AdminClient, all_rounds: bool) -> Result<pb::PlanReplicasResponse> {
    // Operators started here are by hand: not held to the scheduler's rate.
    Ok(admin
        .plan_replicas(pb::PlanReplicasRequest {
            all_rounds,
            by_hand: true,
        })
        .await
        .map_err(|s| status_error("plan", s))?
        .into_inner())
}

/// Runs the scheduler's rounds to the end: waits until no operator runs,
/// starts what the planner wants now, and again until it wants nothing.
/// Returns the operators asked for, with what starting each answered.
async fn apply_operators(
    admin: &mut AdminClient,
    planned: usize,
    deadline: Instant,
    json: bool,
) -> Result<Vec<(pb::PlannedOperator, String)>> {
    let bar = progress(planned as u64, json);
    // Every operator seen running or started: done once it is gone.
    let mut seen: BTreeSet<u64> = BTreeSet::new();
    let mut asked = Vec::new();
    for round in 1..=APPLY_ROUNDS_MAX {
        loop {
            let map = cluster_map(admin).await?;
            seen.extend(map.operators.iter().map(|op| op.id));
            let done = seen.len() - map.operators.len();
            bar.set_length((planned.max(seen.len())) as u64);
            bar.set_position(done as u64);
            bar.set_message(
                map.operators
                    .iter()
                    .map(|op| format!("shard {} {} ({})", op.shard, op.kind, op.step))
                    .collect::<Vec<_>>()
                    .join(", "),
            );
            if map.operators.is_empty() {
                break;
            }
            if Instant::now() > deadline {
                bar.abandon();
                bail!(
                    "{} operators still under way when the time ran out",
                    map.operators.len()
                );
            }
            tokio::time::sleep(WAIT_POLL).await;
        }
        let now = fetch(admin, false).await?.planned;
        if now.is_empty() {
            bar.finish_and_clear();
            return Ok(asked);
        }
        let mut started_any = false;
        for mut p in now {
            p.round = round;
            let result = start(admin, &p).await;
            if let Ok(id) = &result {
                if *id != 0 {
                    seen.insert(*id);
                }
                started_any = true;
            }
            let text = match result {
                Ok(id) => format!("started operator {id}"),
                Err(status) => format!("not started: {} ({:?})", status.message(), status.code()),
            };
            asked.push((p, text));
        }
        // The scheduler may have started them first: only a round in which
        // nothing runs at all is stuck.
        if !started_any && cluster_map(admin).await?.operators.is_empty() {
            bar.abandon();
            let why: Vec<String> = asked
                .iter()
                .rev()
                .take_while(|(p, _)| p.round == round)
                .map(|(p, r)| format!("shard {}: {r}", p.shard))
                .collect();
            bail!(
                "no operator of round {round} could start: {}",
                why.join("; ")
            );
        }
    }
    bar.abandon();
    bail!("the plan still wants operators after {APPLY_ROUNDS_MAX} rounds")
}

/// Starts one planned operator; its id.
async fn start(admin: &mut AdminClient, p: &pb::PlannedOperator) -> Result<u64, tonic::Status> {
    let operator = if p.kind == "split" {
        admin
            .split_shard(pb::SplitShardRequest {
                shard: p.shard,
                at: None,
            })
            .await?
            .into_inner()
            .operator
    } else {
        admin
            .move_replica(pb::MoveReplicaRequest {
                shard: p.shard,
                from_node_id: p.from_node_id,
                to_node_id: p.to_node_id,
            })
            .await?
            .into_inner()
            .operator
    };
    Ok(operator.map_or(0, |op| op.id))
}

/// Makes the handovers one at a time; what each answered.
async fn apply_handovers(
    admin: &mut AdminClient,
    handovers: &[pb::PlannedHandover],
    json: bool,
) -> Vec<String> {
    let bar = progress(handovers.len() as u64, json);
    let mut results = Vec::with_capacity(handovers.len());
    for h in handovers {
        bar.set_message(format!("shard {} to node {}", h.shard, h.to_node_id));
        let outcome = admin
            .transfer_leader(pb::TransferLeaderRequest {
                shard: h.shard,
                to_node_id: h.to_node_id,
            })
            .await;
        results.push(match outcome {
            Ok(done) => format!("done in {} ms", done.into_inner().elapsed_ms),
            Err(status) => format!("failed: {} ({:?})", status.message(), status.code()),
        });
        bar.inc(1);
    }
    bar.finish_and_clear();
    results
}

fn node(id: u64) -> String {
    if id == 0 {
        "-".to_owned()
    } else {
        id.to_string()
    }
}

fn print_operators(planned: &[pb::PlannedOperator], results: Option<&[String]>) {
    if planned.is_empty() {
        println!("replicas are where they should be: no operator to start");
        return;
    }
    let mut table = Table::new();
    let mut header = vec!["round", "shard", "kind", "from node", "to node", "why"];
    if results.is_some() {
        header.push("result");
    }
    table.set_header(header);
    for (i, p) in planned.iter().enumerate() {
        let mut row = vec![
            p.round.to_string(),
            p.shard.to_string(),
            p.kind.clone(),
            node(p.from_node_id),
            node(p.to_node_id),
            p.reason.clone(),
        ];
        if let Some(result) = results.and_then(|r| r.get(i)) {
            row.push(result.clone());
        }
        table.add_row(row);
    }
    println!("operators, round by round (the scheduler starts round 1 by itself too):");
    println!("{table}");
}

fn print_handovers(handovers: &[pb::PlannedHandover], results: Option<&[String]>) {
    if handovers.is_empty() {
        println!("leaders are balanced: no handover to make");
        return;
    }
    let mut table = Table::new();
    let mut header = vec!["shard", "leader now", "to", "why"];
    if results.is_some() {
        header.push("result");
    }
    table.set_header(header);
    for (i, h) in handovers.iter().enumerate() {
        let mut row = vec![
            h.shard.to_string(),
            h.from_node_id.to_string(),
            h.to_node_id.to_string(),
            h.reason.clone(),
        ];
        if let Some(result) = results.and_then(|r| r.get(i)) {
            row.push(result.clone());
        }
        table.add_row(row);
    }
    println!("leader handovers:");
    println!("{table}");
}

fn operator_json(p: &pb::PlannedOperator, result: Option<&String>) -> serde_json::Value {
    serde_json::json!({
        "round": p.round, "shard": p.shard, "kind": p.kind, "from": p.from_node_id,
        "to": p.to_node_id, "why": p.reason, "result": result,
    })
}

fn handover_json(h: &pb::PlannedHandover, result: Option<&String>) -> serde_json::Value {
    serde_json::json!({
        "shard": h.shard, "from": h.from_node_id, "to": h.to_node_id, "why": h.reason,
        "result": result,
    })
}
