//! Row expiry by ttl, decided in the log: every `ttl_expire_interval_seconds`
//! each node proposes, to the shards it leads, an `Expire` entry moving each
//! ttl view's expiry floor to `now - ttl - ttl_grace`. Replicas apply it at
//! the same log position, so they agree on what is expired at every index;
//! reads mask rows below the floor, writes below it are stale, compaction
//! drops them. No replica ever judges expiry by its own clock or its own
//! (maybe lagging) registry.
//!
//! The ttl used is confirmed at a metadata read index first, so a ttl raised
//! (and acknowledged) before the round began is never cut by a floor from a
//! stale copy. What raising a ttl does is in docs/data-model.md.

use std::sync::Weak;
use std::time::Duration;

use quiver_engine::Catalog;
use quiver_engine::clock::MICROS_PER_SECOND;
use quiver_raft::{Command, GroupId, METADATA_GROUP};

use crate::cluster::Cluster;
use crate::node::Node;

/// Runs expiry rounds until the node goes away or stops.
pub async fn expiry_loop(node: Weak<Node>, interval: Duration, grace_seconds: u64) {
    let grace_us = i64::try_from(grace_seconds)
        .unwrap_or(i64::MAX)
        .saturating_mul(MICROS_PER_SECOND);
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick fires at once: skip it, nothing is due at start.
    ticker.tick().await;
    loop {
        ticker.tick().await;
        let Some(node) = node.upgrade() else {
            return;
        };
        if node.cluster.is_stopping() {
            return;
        }
        expire_round(&node, grace_us).await;
    }
}

/// One round: proposes the floors due on every shard this node leads.
/// Returns how many shards applied an `Expire` entry.
pub async fn expire_round(node: &Node, grace_us: i64) -> usize {
    // Cheap check on the local registry first: most rounds of a store
    // without ttl views end here, with no read index and no proposal.
    if due_floors(
        &node.cluster,
        &node.registry.load(),
        node.clock.now_us(),
        grace_us,
    )
    .is_empty()
    {
        return 0;
    }
    let catalog = match node.fresh_catalog().await {
        Ok(catalog) => catalog,
        Err(e) => {
            tracing::debug!(error = %e, "expiry round skipped: the registry cannot be confirmed current");
            return 0;
        }
    };
    let due = due_floors(&node.cluster, &catalog, node.clock.now_us(), grace_us);
    let proposals = due.into_iter().map(|(group, floors)| async move {
        let result = node
            .cluster
            .propose(group, Command::Expire { floors })
            .await;
        if let Err(e) = &result {
            // The next round proposes again (a floor only moves forward, so
            // a late duplicate is harmless).
            tracing::debug!(group, error = %e, "expiry proposal failed");
        }
        result.is_ok()
    });
    futures::future::join_all(proposals)
        .await
        .into_iter()
        .filter(|&applied| applied)
        .count()
}

/// For every data shard led here, the ttl views whose floor would move.
fn due_floors(
    cluster: &Cluster,
    catalog: &Catalog,
    now_us: i64,
    grace_us: i64,
) -> Vec<(GroupId, Vec<(u32, i64)>)> {
    let views: Vec<(u32, i64)> = catalog
        .views()
        .iter()
        .filter(|view| view.ttl_us() > 0)
        .map(|view| {
            let floor = now_us
                .saturating_sub(view.ttl_us())
                .saturating_sub(grace_us);
            (view.id, floor)
        })
        .collect();
    if views.is_empty() {
        return Vec::new();
    }
    cluster
        .groups()
        .filter(|(group, hosted)| **group != METADATA_GROUP && hosted.raft.is_leader())
        .filter_map(|(&group, hosted)| {
            let store = hosted.state.store();
            let floors: Vec<(u32, i64)> = views
                .iter()
                .copied()
                .filter(|&(view_id, floor)| floor > store.expiry_floor(view_id))
                .collect();
            (!floors.is_empty()).then_some((group, floors))
        })
        .collect()
}
