//! Row expiry by ttl, decided in the log: every `ttl_expire_interval_seconds`
//! each node proposes, to the shards it leads, an `Expire` entry carrying
//! each ttl view's retention (ttl + `ttl_grace_seconds`). Apply moves the
//! view's expiry floor to the entry's leader time minus the retention, so
//! replicas agree on what is expired at every log position: reads mask rows
//! below the floor, writes below it are stale, compaction drops them. No
//! replica judges expiry by its own clock or its own (maybe lagging)
//! registry, and the floor follows the clock of the shard's leader only.
//!
//! The ttl used is confirmed at a metadata read index first, so a ttl raised
//! (and acknowledged) before the round began is never cut by a floor from a
//! stale copy. A hibernating shard is left asleep until its floor lags by
//! `SLEEPING_ROUNDS` rounds: its replicas agree anyway (nothing is applied),
//! and an idle cluster stays idle. What raising a ttl does, and what a
//! leader's clock error does, is in docs/data-model.md.

use std::sync::Weak;
use std::time::Duration;

use quiver_engine::Catalog;
use quiver_engine::clock::MICROS_PER_SECOND;
use quiver_raft::{Command, GroupId, METADATA_GROUP};

use crate::cluster::Cluster;
use crate::node::Node;

/// A sleeping shard's floor is moved once it lags this many rounds.
pub const SLEEPING_ROUNDS: i64 = 12;

/// How expiry rounds run.
#[derive(Debug, Clone, Copy)]
pub struct ExpiryTiming {
    /// Between rounds.
    pub interval: Duration,
    /// How long past its ttl a row still reads `OUTSIDE_MAX_AGE`.
    pub grace_us: i64,
}

impl ExpiryTiming {
    /// From the config's seconds.
    pub fn new(interval_seconds: u64, grace_seconds: u64) -> Self {
        Self {
            interval: Duration::from_secs(interval_seconds),
            grace_us: i64::try_from(grace_seconds)
                .unwrap_or(i64::MAX)
                .saturating_mul(MICROS_PER_SECOND),
        }
    }

    fn interval_us(&self) -> i64 {
        i64::try_from(self.interval.as_micros()).unwrap_or(i64::MAX)
    }
}

/// Runs expiry rounds until the node goes away or stops.
pub async fn expiry_loop(node: Weak<Node>, timing: ExpiryTiming) {
    // Nothing is due at start.
    let mut rounds = crate::node::Rounds::new(node, timing.interval, true);
    while let Some(node) = rounds.next().await {
        expire_round(&node, timing).await;
    }
}

/// One round: proposes the retention of every ttl view to every shard this
/// node leads whose floors are due to move. Returns how many shards applied
/// an `Expire` entry.
pub async fn expire_round(node: &Node, timing: ExpiryTiming) -> usize {
    // Cheap check on the local registry first: most rounds of a store
    // without ttl views end here, with no read index and no proposal.
    if due(
        &node.cluster,
        &node.registry.load(),
        node.clock.now_us(),
        timing,
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
    let shards = due(&node.cluster, &catalog, node.clock.now_us(), timing);
    let proposals = shards.into_iter().map(|(group, retention)| async move {
        let result = node
            .cluster
            .propose(group, Command::Expire { retention })
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

/// For every data shard led here, the `(view, retention)` of the ttl views
/// whose floor would move by this node's clock: by anything if the shard is
/// awake, by `SLEEPING_ROUNDS` intervals if it sleeps.
fn due(
    cluster: &Cluster,
    catalog: &Catalog,
    now_us: i64,
    timing: ExpiryTiming,
) -> Vec<(GroupId, Vec<(u32, i64)>)> {
    let views: Vec<(u32, i64)> = catalog
        .views()
        .iter()
        .filter(|view| view.ttl_us() > 0)
        .map(|view| (view.id, view.ttl_us().saturating_add(timing.grace_us)))
        .collect();
    if views.is_empty() {
        return Vec::new();
    }
    let sleeping_lag_us = timing.interval_us().saturating_mul(SLEEPING_ROUNDS);
    cluster
        .groups()
        .into_iter()
        .filter(|(group, hosted)| *group != METADATA_GROUP && hosted.raft.is_leader())
        .filter_map(|(group, hosted)| {
            let store = hosted.state.store();
            let lag_us = if hosted.pulse.is_asleep() {
                sleeping_lag_us
            } else {
                0
            };
            let retention: Vec<(u32, i64)> = views
                .iter()
                .copied()
                .filter(|&(view_id, retention_us)| {
                    now_us.saturating_sub(retention_us)
                        > store.expiry_floor(view_id).saturating_add(lag_us)
                })
                .collect();
            (!retention.is_empty()).then_some((group, retention))
        })
        .collect()
}
