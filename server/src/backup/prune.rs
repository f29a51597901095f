//! Retention (issue 12): which backups and shipped log chunks a target
//! keeps, and scheduled full backups.
//!
//! - **What is kept.** Every complete backup started within the retention
//!   window, the newest one started before it (the base a restore to the
//!   window's first second needs), and always the newest backup. Every
//!   other backup is deleted manifest first (from then on it is not
//!   listed, so a prune cut short leaves only unlisted files, which the
//!   next prune removes). Incomplete backups (no manifest) older than the
//!   window and than `backup.shard_timeout_ms` go too.
//! - **Shipped log.** For each cluster with a kept backup, each group's
//!   chunks that end at or before that group's position in the oldest kept
//!   backup are deleted: no kept backup replays them. Groups no kept
//!   backup holds (a shard split off later) are left alone; so is the log
//!   of a cluster no kept backup names, until none of its groups has
//!   shipped within the window (a retired cluster): then it goes whole.
//! - **Schedules.** With `backup.schedule_url` set, the node leading the
//!   metadata group takes a full backup there whenever the newest is older
//!   than `backup.full_interval_seconds` (at once on a new cluster), then
//!   prunes to `backup.retention_hours`. A leader change at worst takes
//!   one extra backup.

use std::collections::{BTreeMap, HashMap};
use std::sync::Weak;
use std::time::Duration;

use quiver_raft::{GroupId, METADATA_GROUP};

use super::{BackupError, BackupManifest, Backups, log, manifest, manifest_key, now_us};
use crate::node::Node;

/// Most objects one backup (or one group's log) is listed with for
/// deletion.
const PRUNE_KEYS_MAX: usize = 10_000_000;

/// What a prune did (or, dry, would do).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PruneReport {
    /// Backups kept, oldest first.
    pub kept: Vec<String>,
    /// Complete backups deleted.
    pub deleted: Vec<String>,
    /// Incomplete backups (no manifest) whose files were deleted.
    pub incomplete_deleted: Vec<String>,
    /// Shipped log chunks deleted.
    pub chunks_deleted: u64,
    /// Clusters whose whole shipped log was deleted (retired: named by no
    /// kept backup, nothing shipped within the window).
    pub retired_logs_deleted: Vec<String>,
}

/// Which of `manifests` (oldest first) a window starting at `boundary_us`
/// keeps: those started in it, the newest one before it, and the newest.
fn kept(manifests: &[BackupManifest], boundary_us: i64) -> Vec<bool> {
    let before = manifests
        .iter()
        .rposition(|m| m.started_at_us < boundary_us);
    let newest = manifests.len().checked_sub(1);
    manifests
        .iter()
        .enumerate()
        .map(|(i, m)| m.started_at_us >= boundary_us || Some(i) == before || Some(i) == newest)
        .collect()
}

impl Backups {
    /// Deletes from `url` what a retention of `retention` does not keep
    /// (with `dry_run`, only reports it).
    pub async fn prune(
        &self,
        url: &str,
        retention: Duration,
        dry_run: bool,
    ) -> Result<PruneReport, BackupError> {
        let target = self.target(url)?;
        let manifests = self.list(url).await?;
        let now = now_us();
        let boundary_us =
            now.saturating_sub(i64::try_from(retention.as_micros()).unwrap_or(i64::MAX));
        let keep = kept(&manifests, boundary_us);
        let mut report = PruneReport::default();
        for (manifest, &keep) in manifests.iter().zip(&keep) {
            if keep {
                report.kept.push(manifest.backup_id.clone());
                continue;
            }
            report.deleted.push(manifest.backup_id.clone());
            if !dry_run {
                // The manifest first: from now on the backup is not listed.
                target.delete(&manifest_key(&manifest.backup_id)).await?;
                target
                    .delete_all(&format!("backups/{}", manifest.backup_id), PRUNE_KEYS_MAX)
                    .await?;
            }
        }
        // Incomplete backups, once no backup could still be writing them.
        let listed: Vec<&str> = manifests.iter().map(|m| m.backup_id.as_str()).collect();
        let in_flight_us = i64::try_from(self.shard_timeout().as_micros())
            .unwrap_or(i64::MAX)
            .saturating_add(3_600_000_000);
        for id in target.list_dirs("backups").await? {
            if listed.contains(&id.as_str()) || manifest::check_backup_id(&id).is_err() {
                continue;
            }
            let Some(started) = manifest::backup_id_time_us(&id) else {
                continue;
            };
            if started < boundary_us && started < now.saturating_sub(in_flight_us) {
                // A manifest written since the listing makes it complete.
                if target
                    .get(&manifest_key(&id), manifest::MANIFEST_BYTES_MAX)
                    .await?
                    .is_some()
                {
                    continue;
                }
                if !dry_run {
                    target
                        .delete_all(&format!("backups/{id}"), PRUNE_KEYS_MAX)
                        .await?;
                }
                report.incomplete_deleted.push(id);
            }
        }
        // Per cluster, each group's position in the oldest kept backup.
        let mut oldest: HashMap<&str, BTreeMap<GroupId, u64>> = HashMap::new();
        for (manifest, _) in manifests.iter().zip(&keep).filter(|(_, k)| **k) {
            if let Some(cluster_id) = manifest.cluster_id.as_deref() {
                oldest.entry(cluster_id).or_insert_with(|| {
                    manifest
                        .parts()
                        .map(|(_, r)| (r.group, r.position().index()))
                        .collect()
                });
            }
        }
        for cluster_id in target.list_dirs("log").await? {
            if oldest.contains_key(cluster_id.as_str())
                || log::check_cluster_id(&cluster_id).is_err()
            {
                continue;
            }
            if log::last_shipped_us(&target, &cluster_id).await? < boundary_us {
                if !dry_run {
                    target
                        .delete_all(&format!("log/{cluster_id}"), PRUNE_KEYS_MAX)
                        .await?;
                }
                report.retired_logs_deleted.push(cluster_id);
            }
        }
        for (cluster_id, positions) in oldest {
            for (&group, &index) in &positions {
                report.chunks_deleted +=
                    log::prune_chunks(&target, cluster_id, group, index, dry_run).await?;
            }
        }
        Ok(report)
    }
}

/// How scheduled full backups run.
#[derive(Debug, Clone)]
pub struct Schedule {
    /// Where.
    pub url: String,
    /// A backup is due once the newest is this old.
    pub every: Duration,
    /// What a prune after it keeps.
    pub retention: Duration,
}

/// Runs `schedule` on this node while it leads the metadata group, until
/// the node goes away or stops.
pub async fn schedule_loop(node: Weak<Node>, schedule: Schedule) {
    let check = (schedule.every / 4).clamp(Duration::from_secs(1), Duration::from_secs(60));
    let mut rounds = crate::node::Rounds::new(node, check, false);
    while let Some(node) = rounds.next().await {
        let leads = node
            .cluster
            .group(METADATA_GROUP)
            .is_some_and(|g| g.raft.is_leader());
        if leads && let Err(e) = scheduled_round(&node, &schedule).await {
            tracing::warn!(url = %schedule.url, error = %e, "scheduled backup failed; tried again next check");
        }
    }
}

async fn scheduled_round(node: &Node, schedule: &Schedule) -> Result<(), BackupError> {
    let newest = match node.backups.list(&schedule.url).await {
        Ok(manifests) => manifests.last().map(|m| m.started_at_us),
        // No target directory yet: nothing was backed up there.
        Err(BackupError::Target { .. }) => None,
        Err(e) => return Err(e),
    };
    let every_us = i64::try_from(schedule.every.as_micros()).unwrap_or(i64::MAX);
    if newest.is_some_and(|at| now_us().saturating_sub(at) < every_us) {
        return Ok(());
    }
    let manifest = node.backups.create(&node.cluster, &schedule.url).await?;
    tracing::info!(backup = %manifest.backup_id, url = %schedule.url, "scheduled backup complete");
    let pruned = node
        .backups
        .prune(&schedule.url, schedule.retention, false)
        .await?;
    if !pruned.deleted.is_empty() || pruned.chunks_deleted > 0 {
        tracing::info!(?pruned, "pruned to the retention");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(started_at_us: i64) -> BackupManifest {
        let mut m: BackupManifest = serde_json::from_value(serde_json::json!({
            "version": manifest::MANIFEST_VERSION,
            "backup_id": "x",
            "started_at_us": started_at_us,
            "finished_at_us": started_at_us,
            "map_version": 1,
            "shards": [],
            "metadata": {"dir": "d", "version": 1, "group": 0, "applied": null,
                "leader_ts_us": 0, "range": null, "rows": 0, "digest": "", "files": []},
        }))
        .unwrap();
        m.backup_id = format!("b{started_at_us}");
        m
    }

    #[test]
    fn the_window_keeps_its_backups_the_one_before_it_and_the_newest() {
        let all: Vec<_> = [10, 20, 30, 40, 50].into_iter().map(manifest).collect();
        assert_eq!(kept(&all, 35), [false, false, true, true, true]);
        assert_eq!(kept(&all, 5), [true; 5], "all in the window");
        assert_eq!(
            kept(&all, 100),
            [false, false, false, false, true],
            "the newest stays"
        );
        assert!(kept(&[], 10).is_empty());
    }
}
