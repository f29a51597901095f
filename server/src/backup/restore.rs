//! Restoring a full backup into a new, empty cluster of any size: the
//! backup's feature views are applied, then every shard's rows are written
//! through the ordinary replicated write path, routed by the new cluster's
//! own shards (so the cluster may have other shards and nodes than the one
//! backed up). Every shard of the backup is downloaded into a scratch
//! directory and verified (files, then data: its rows' digest) before a
//! single row of it is used: a damaged backup is never restored.
//!
//! What the restored cluster holds: the live rows of the backup with their
//! event times and values, feature by name (field ids are the new views');
//! deleted rows (tombstones) and rows already expired for good stay out.
//! Write times are the new cluster's: the rows are written anew.
//!
//! Point-in-time restore ([`RestoreTo::Time`], [`RestoreTo::Latest`]):
//! the newest backup whose every part is at or before the time, then each
//! group's shipped log ([`super::log`]) replayed onto its checkpoint in a
//! scratch directory with the shard's own apply code, up to the time; the
//! metadata group's too, so the views are those of that moment (a view
//! deleted by mistake after it comes back). Every group is replayed before
//! a single row is written: a time the shipped logs do not reach changes
//! nothing.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use quiver_engine::digest::LogicalDigest;
use quiver_engine::keys::{ViewId, split_storage_key};
use quiver_engine::row::FieldId;
use quiver_engine::{Catalog, RowWrite, StateStore};
use quiver_raft::backup::{self as shard_backup, ShardBackup};
use quiver_raft::{Command, GroupId, METADATA_GROUP, Response, StateMachine};

use super::{
    BackupError, BackupManifest, Backups, STAGING_DIR, Target, blocking, file_key, io_error, log,
    remove_scratch,
};
use crate::node::{Caller, Node};

/// How long a point-in-time restore waits for the source cluster's shipped
/// log to reach a time in the past (an idle group's time advances every
/// `backup.log_idle_interval_ms`, a minute by default).
const LOG_WAIT: std::time::Duration = std::time::Duration::from_secs(150);

/// Stored records read from a backup's store per page.
const RESTORE_PAGE_ROWS: usize = 1000;

/// What a restore did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RestoreReport {
    /// Feature views applied.
    pub views: u64,
    /// Shards of the backup read.
    pub shards: u64,
    /// Rows written into the new cluster.
    pub rows_restored: u64,
    /// Deleted rows left out.
    pub tombstones_skipped: u64,
    /// Rows already expired for good (below their view's floor) left out.
    pub expired_skipped: u64,
    /// Rows of views deleted before the backup left out.
    pub deleted_view_rows_skipped: u64,
    /// The backup restored.
    pub backup_id: String,
    /// The time restored to (`None`: the backup as taken).
    pub restored_to_us: Option<i64>,
    /// Shipped log entries replayed onto the backup.
    pub log_entries_replayed: u64,
    /// The content digest of the rows written (see
    /// `LogicalDigest::add_content`): what the restored cluster's
    /// `Checksum` must give.
    pub content: LogicalDigest,
}

/// A shard's state as a restore read it: a backup's checkpoint, replayed
/// or not, or a shard split off during a replay.
struct Replayed {
    /// Its scratch directory, removed after the restore (`None`: it is
    /// inside its parent's).
    scratch: Option<PathBuf>,
    /// The state.
    state: StateMachine,
    /// The rows its backup recorded (only when not replayed).
    expected_rows: Option<u64>,
}

/// Every group of `manifest`'s cluster a restore to a time may replay:
/// the backup's, and those split off since (with a shipped log).
async fn logged_groups(
    target: &Target,
    cluster_id: &str,
    manifest: &BackupManifest,
) -> Result<Vec<GroupId>, BackupError> {
    let mut groups: Vec<GroupId> = manifest.parts().map(|(_, r)| r.group).collect();
    groups.extend(log::shipped_groups(target, cluster_id).await?);
    groups.sort_unstable();
    groups.dedup();
    Ok(groups)
}

/// A backup view's new id and its fields' new ids, by old id.
struct ViewMap {
    id: ViewId,
    fields: HashMap<FieldId, FieldId>,
}

/// What a restore brings back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestoreTo {
    /// The backup as it was taken.
    Backup,
    /// The cluster as it was at this leader time (µs since the epoch):
    /// the newest backup at or before it, then the shipped log up to it.
    Time(i64),
    /// The latest time every group's shipped log reaches; the newest
    /// backup as taken if it is newer than that.
    Latest,
}

impl Backups {
    /// Restores into this node's cluster, which must hold no feature view
    /// (a new cluster: a restore never writes over a live one), backup `id`
    /// at `url` (empty: the newest that fits `to`, of cluster `cluster_id`
    /// if not empty), as `to` says.
    pub async fn restore(
        self: &Arc<Self>,
        node: &Node,
        url: &str,
        id: &str,
        cluster_id: &str,
        to: RestoreTo,
    ) -> Result<RestoreReport, BackupError> {
        let _one = self
            .coordinating
            .try_lock()
            .map_err(|_| BackupError::Busy)?;
        let target = self.target(url)?;
        let existing = node
            .fresh_catalog()
            .await
            .map_err(|e| BackupError::Invalid(e.to_string()))?
            .views();
        if !existing.is_empty() {
            return Err(BackupError::Refused(format!(
                "this cluster has {} feature views: a backup is restored only into a new, empty \
                 cluster",
                existing.len()
            )));
        }
        let (manifest, until_us) = self.choose(&target, url, id, cluster_id, to).await?;
        let id = manifest.backup_id.as_str();
        let replay = match until_us {
            None => None,
            Some(until_us) => {
                let cluster_id = manifest.cluster_id.clone().ok_or_else(|| {
                    BackupError::Refused(format!(
                        "backup {id} does not name its cluster (taken by an older build): it \
                         restores only as it was taken"
                    ))
                })?;
                // A time in the past that an idle group's shipped log has
                // not reached yet: its shipper will get there (if the
                // source cluster runs); a time to come is not waited for.
                if until_us <= super::now_us() {
                    let groups = logged_groups(&target, &cluster_id, &manifest).await?;
                    log::wait_restorable(&target, &cluster_id, &groups, until_us, LOG_WAIT).await?;
                }
                Some((cluster_id, until_us))
            }
        };
        // Every file against its checksums before anything is written: a
        // damaged backup changes nothing (each shard's rows are verified
        // again, by their digest, as they are read).
        // (The shipped log is checked by its replay, only as far as the
        // time: a gap after it does not stop a restore before it.)
        let checked = self.verify(url, id, false, false).await?;
        if !checked.problems.is_empty() {
            return Err(BackupError::Corrupt {
                what: format!("backup {id}"),
                reason: format!(
                    "not restored: {} problems: {}",
                    checked.problems.len(),
                    checked.problems.join("; ")
                ),
            });
        }
        tracing::info!(backup = id, url, ?until_us, "restore started");
        let mut report = RestoreReport {
            backup_id: id.to_owned(),
            restored_to_us: until_us,
            ..RestoreReport::default()
        };

        // The views as of the time: the metadata group's checkpoint, its
        // shipped log replayed onto it (every shard is replayed before a
        // row is written, so a time the logs do not reach writes nothing).
        let metadata = self
            .open_part(
                &target,
                id,
                &manifest.metadata.dir,
                &manifest.metadata.record,
                true,
            )
            .await?;
        let mut shards: Vec<Replayed> = Vec::with_capacity(manifest.shards.len());
        let replayed = async {
            for entry in &manifest.shards {
                let (scratch, state) = self
                    .open_part(&target, id, &entry.dir, &entry.record, false)
                    .await?;
                shards.push(Replayed {
                    scratch: Some(scratch),
                    state,
                    // Replayed: the rows are no longer the checkpoint's.
                    expected_rows: replay.is_none().then_some(entry.record.rows),
                });
            }
            let Some((cluster_id, until_us)) = &replay else {
                return Ok(());
            };
            report.log_entries_replayed +=
                log::replay_shipped(&target, cluster_id, &metadata.1, *until_us)
                    .await?
                    .entries;
            // Shards split off during a replay join the list and are
            // replayed from their start in turn (they may split too).
            let mut next = 0;
            while let Some(state) = shards.get(next).map(|s| s.state.clone()) {
                let done = log::replay_shipped(&target, cluster_id, &state, *until_us).await?;
                report.log_entries_replayed += done.entries;
                for (child, dir) in done.children {
                    let state_dir = dir.join("state");
                    let opened = state_dir.clone();
                    let state = blocking(&state_dir, move || {
                        Ok(shard_backup::open_for_replay(child, &opened, false)?)
                    })
                    .await?;
                    tracing::info!(
                        shard = state.group(),
                        child,
                        "a shard split in the replayed window: its child is replayed too"
                    );
                    shards.push(Replayed {
                        // Inside its parent's scratch directory.
                        scratch: None,
                        state,
                        expected_rows: None,
                    });
                }
                next += 1;
            }
            Ok::<(), BackupError>(())
        }
        .await;
        let written = match replayed {
            Ok(()) => {
                self.write_restored(node, &metadata.1, &shards, &mut report)
                    .await
            }
            Err(e) => Err(e),
        };
        drop(metadata.1);
        remove_scratch(metadata.0).await;
        // Every state closed before any directory goes (a child lives
        // inside its parent's).
        let scratches: Vec<PathBuf> = shards.into_iter().filter_map(|s| s.scratch).collect();
        for scratch in scratches {
            remove_scratch(scratch).await;
        }
        written?;
        tracing::info!(backup = id, ?report, "restore complete");
        Ok(report)
    }

    /// The backup to restore and the time to replay the shipped log to.
    async fn choose(
        &self,
        target: &Target,
        url: &str,
        id: &str,
        cluster_id: &str,
        to: RestoreTo,
    ) -> Result<(BackupManifest, Option<i64>), BackupError> {
        let mut candidates = if id.is_empty() {
            self.list(url).await?
        } else {
            vec![self.get(url, id).await?]
        };
        if !cluster_id.is_empty() {
            log::check_cluster_id(cluster_id)?;
            candidates.retain(|m| m.cluster_id.as_deref() == Some(cluster_id));
        }
        let Some(newest) = candidates.last() else {
            return Err(BackupError::NotFound(format!(
                "(none{} at {url})",
                if cluster_id.is_empty() {
                    String::new()
                } else {
                    format!(" of cluster {cluster_id}")
                }
            )));
        };
        // Backups of several clusters at one target (a restored cluster
        // backing up where its source did): which history is meant must
        // be said.
        if !matches!(to, RestoreTo::Backup) && id.is_empty() {
            let mut clusters: Vec<&str> = candidates
                .iter()
                .filter_map(|m| m.cluster_id.as_deref())
                .collect();
            clusters.sort_unstable();
            clusters.dedup();
            if clusters.len() > 1 {
                return Err(BackupError::Invalid(format!(
                    "{url} holds backups of clusters {}: name one (--cluster-id) or a backup",
                    clusters.join(", ")
                )));
            }
        }
        let until_us = match to {
            RestoreTo::Backup => return Ok((newest.clone(), None)),
            RestoreTo::Time(until_us) => until_us,
            RestoreTo::Latest => {
                let cluster_id = newest.cluster_id.clone().ok_or_else(|| {
                    BackupError::Refused(format!(
                        "backup {} does not name its cluster: no shipped log to restore from",
                        newest.backup_id
                    ))
                })?;
                let groups = logged_groups(target, &cluster_id, newest).await?;
                let shipped = log::status(target, &cluster_id, &groups).await?;
                shipped
                    .iter()
                    .map(|g| {
                        g.latest
                            .as_ref()
                            .map(log::LatestChunk::restorable_until_us)
                            .ok_or_else(|| {
                                BackupError::Refused(format!(
                                    "group {} of cluster {cluster_id} has no shipped log",
                                    g.group
                                ))
                            })
                    })
                    .try_fold(i64::MAX, |least, until| until.map(|u| least.min(u)))?
            }
        };
        // The newest backup whose every part is at or before the time (a
        // checkpoint past it holds writes that cannot be taken back).
        let fits = candidates
            .iter()
            .rev()
            .find(|m| m.parts().all(|(_, r)| r.leader_ts_us <= until_us));
        // The newest backup taken after the logs' reach (an idle group
        // ships once a minute) is itself the latest state there is.
        if to == RestoreTo::Latest && fits.is_none_or(|m| m.backup_id != newest.backup_id) {
            tracing::info!(
                backup = %newest.backup_id,
                log_reach = %log::time_text(until_us),
                "the newest backup is newer than the shipped logs reach: restored as taken"
            );
            return Ok((newest.clone(), None));
        }
        fits.map(|m| (m.clone(), Some(until_us))).ok_or_else(|| {
            BackupError::Refused(format!(
                "no backup{} at {url} was taken at or before {}",
                if id.is_empty() { "" } else { " of that id" },
                log::time_text(until_us)
            ))
        })
    }

    /// Downloads and verifies one part of backup `id`, then opens it for
    /// replay; returns its scratch directory (the caller removes it) and
    /// its state.
    async fn open_part(
        &self,
        target: &Target,
        id: &str,
        dir: &str,
        record: &ShardBackup,
        load_catalog: bool,
    ) -> Result<(PathBuf, StateMachine), BackupError> {
        let scratch = self.download_verified(target, id, dir, record).await?;
        let (opened, group) = (scratch.clone(), record.group);
        let state = blocking(&scratch, move || {
            Ok(shard_backup::open_for_replay(group, &opened, load_catalog)?)
        })
        .await;
        match state {
            Ok(state) => Ok((scratch, state)),
            Err(e) => {
                remove_scratch(scratch).await;
                Err(e)
            }
        }
    }

    /// Applies the views of `metadata`, then writes every shard's live rows
    /// into this cluster.
    async fn write_restored(
        &self,
        node: &Node,
        metadata: &StateMachine,
        shards: &[Replayed],
        report: &mut RestoreReport,
    ) -> Result<(), BackupError> {
        let catalog = metadata.store().registry().load_full();
        let mut maps: HashMap<ViewId, ViewMap> = HashMap::new();
        let applied_all = async {
            for view in catalog.views() {
                let (applied, _) = node
                    .cluster
                    .propose(METADATA_GROUP, Command::ApplyView { spec: view.spec() })
                    .await?;
                let Response::ViewApplied { view: new, .. } = applied else {
                    return Err(BackupError::Refused(format!(
                        "applying view {:?}: {applied:?}",
                        view.name
                    )));
                };
                let fields = view
                    .features
                    .iter()
                    .filter_map(|f| new.feature(&f.name).map(|n| (f.field_id, n.field_id)))
                    .collect();
                maps.insert(view.id, ViewMap { id: new.id, fields });
                report.views += 1;
            }
            Ok(())
        }
        .await;
        // As ApplyFeatureView does, whatever the outcome (views applied
        // before a failure, or one that committed after all, stay): a
        // client call after the restore returns sees them on every node.
        tokio::time::sleep(crate::node::VIEW_CHANGE_ACK_DELAY).await;
        applied_all?;
        for shard in shards {
            self.write_shard_rows(
                node,
                shard.state.store(),
                shard.state.group(),
                shard.expected_rows,
                &maps,
                &catalog,
                report,
            )
            .await?;
            report.shards += 1;
        }
        Ok(())
    }

    /// Downloads one shard of backup `id` into a scratch directory and
    /// verifies it (files and data). Returns the directory (the checkpoint
    /// is in its [`shard_backup::REPLAY_DB_DIR`]); the caller removes it.
    pub(super) async fn download_verified(
        &self,
        target: &Target,
        id: &str,
        dir: &str,
        record: &ShardBackup,
    ) -> Result<PathBuf, BackupError> {
        // Unique per call: two verifications of one backup never share it.
        let scratch = self
            .data_dir
            .join(STAGING_DIR)
            .join(format!("scratch-{id}-{dir}-{:08x}", rand::random::<u32>()));
        remove_scratch(scratch.clone()).await;
        let db = scratch.join(shard_backup::REPLAY_DB_DIR);
        std::fs::create_dir_all(&db).map_err(|e| io_error(&db, e))?;
        let result = async {
            for file in &record.files {
                target
                    .download(
                        &file_key(id, dir, &file.name),
                        &db.join(&file.name),
                        file.bytes,
                    )
                    .await?;
            }
            let (checked, record) = (db.clone(), record.clone());
            blocking(&db, move || {
                Ok(shard_backup::verify_data(&checked, &record, &mut |_| {})?)
            })
            .await
        }
        .await;
        match result {
            Ok(()) => Ok(scratch),
            Err(e) => {
                remove_scratch(scratch).await;
                Err(e)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn write_shard_rows(
        &self,
        node: &Node,
        store: Arc<StateStore>,
        group: GroupId,
        expected_rows: Option<u64>,
        maps: &HashMap<ViewId, ViewMap>,
        catalog: &Catalog,
        report: &mut RestoreReport,
    ) -> Result<(), BackupError> {
        let db = store.path().to_path_buf();
        let db = db.as_path();
        let mut after: Option<Vec<u8>> = None;
        let mut records_seen = 0u64;
        loop {
            let (page_store, from) = (store.clone(), after.clone());
            let page = blocking(db, move || {
                page_store
                    .records_after(from.as_deref(), RESTORE_PAGE_ROWS)
                    .map_err(|e| BackupError::Corrupt {
                        what: "a backup's rows".into(),
                        reason: e.to_string(),
                    })
            })
            .await?;
            let Some((last, _)) = page.last() else { break };
            after = Some(last.clone());
            records_seen += page.len() as u64;
            let mut by_view: HashMap<ViewId, Vec<RowWrite>> = HashMap::new();
            for (key, row) in page {
                let Some(row) = row else {
                    report.tombstones_skipped += 1;
                    continue;
                };
                if store.is_expired(&key, row.event_ts_us) {
                    report.expired_skipped += 1;
                    continue;
                }
                let Some((_, view_id, entity)) = split_storage_key(&key) else {
                    return Err(BackupError::Corrupt {
                        what: format!("shard {group}"),
                        reason: format!("a row key of {} bytes", key.len()),
                    });
                };
                let Some(map) = maps.get(&view_id) else {
                    // Rows of a view deleted before the backup (compaction
                    // had not dropped them yet): not restored. A view the
                    // backup's registry never knew means its metadata is
                    // older than its rows: refused, not skipped.
                    if catalog.is_dropped(view_id) {
                        report.deleted_view_rows_skipped += 1;
                        continue;
                    }
                    return Err(BackupError::Corrupt {
                        what: format!("shard {group}"),
                        reason: format!(
                            "rows of view id {view_id}, which the backup's registry does not \
                             know"
                        ),
                    });
                };
                let entity_key =
                    String::from_utf8(entity.to_vec()).map_err(|_| BackupError::Corrupt {
                        what: format!("shard {group}"),
                        reason: "an entity key that is not UTF-8".into(),
                    })?;
                let kept: Vec<_> = row
                    .values
                    .into_iter()
                    .filter(|(field, _)| map.fields.contains_key(field))
                    .collect();
                if let Some(view) = catalog.view_by_id(view_id) {
                    report
                        .content
                        .add_content(view, entity, row.event_ts_us, &kept);
                }
                let mut values: Vec<_> = kept
                    .into_iter()
                    .filter_map(|(field, value)| map.fields.get(&field).map(|&f| (f, value)))
                    .collect();
                // The new view may number its fields in another order.
                values.sort_unstable_by_key(|(field, _)| *field);
                by_view.entry(map.id).or_default().push(RowWrite {
                    entity_key,
                    event_ts_us: row.event_ts_us,
                    values,
                });
            }
            for (view_id, rows) in by_view {
                let count = rows.len() as u64;
                let proposals = node
                    .cluster
                    .placement()
                    .by_shard(rows, |row| row.entity_key.as_str())
                    .into_iter()
                    .map(|(shard, rows)| (shard, Command::Write { view_id, rows }));
                node.propose_all(proposals, None, Caller::Node, |applied| match applied {
                    Response::Written { .. } => Ok(()),
                    other => Err(other),
                })
                .await
                .map_err(|e| BackupError::Refused(format!("writing restored rows: {e}")))?;
                report.rows_restored += count;
            }
        }
        if let Some(expected) = expected_rows
            && records_seen != expected
        {
            return Err(BackupError::Corrupt {
                what: format!("shard {group}"),
                reason: format!("{records_seen} records read, the backup recorded {expected}"),
            });
        }
        Ok(())
    }
}
