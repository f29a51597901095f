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
//! Point-in-time restore (replaying shipped log entries up to a time) is a
//! later step.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use quiver_engine::keys::{ViewId, split_storage_key};
use quiver_engine::row::FieldId;
use quiver_engine::{Catalog, RowWrite, StateStore, StoreOptions};
use quiver_raft::backup::{self as shard_backup, ShardBackup};
use quiver_raft::{Command, METADATA_GROUP, Response};

use super::{BackupError, Backups, STAGING_DIR, Target, blocking, file_key, io_error};
use crate::node::Node;

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
}

/// A backup view's new id and its fields' new ids, by old id.
struct ViewMap {
    id: ViewId,
    fields: HashMap<FieldId, FieldId>,
}

impl Backups {
    /// Restores backup `id` at `url` into this node's cluster, which must
    /// hold no feature view (a new cluster: a restore never writes over a
    /// live one).
    pub async fn restore(
        self: &Arc<Self>,
        node: &Node,
        url: &str,
        id: &str,
    ) -> Result<RestoreReport, BackupError> {
        let _one = self
            .coordinating
            .try_lock()
            .map_err(|_| BackupError::Busy)?;
        let manifest = self.get(url, id).await?;
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
        // Every file against its checksums before anything is written: a
        // damaged backup changes nothing (each shard's rows are verified
        // again, by their digest, as they are read).
        let checked = self.verify(url, id, false).await?;
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
        tracing::info!(backup = id, url, "restore started");
        let mut report = RestoreReport::default();

        let (catalog, scratch) = {
            let metadata = &manifest.metadata;
            let scratch = self
                .download_verified(&target, id, &metadata.dir, &metadata.record)
                .await?;
            let db = scratch.join("db");
            let catalog = blocking(&db.clone(), move || {
                let options = StoreOptions {
                    load_catalog: true,
                    ..StoreOptions::scratch()
                };
                let store = StateStore::open(&db, options).map_err(|e| BackupError::Corrupt {
                    what: db.display().to_string(),
                    reason: e.to_string(),
                })?;
                Ok(store.registry().load_full())
            })
            .await;
            (catalog, scratch)
        };
        let _ = std::fs::remove_dir_all(&scratch);
        let catalog = catalog?;
        let mut maps: HashMap<ViewId, ViewMap> = HashMap::new();
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

        for entry in &manifest.shards {
            let scratch = self
                .download_verified(&target, id, &entry.dir, &entry.record)
                .await?;
            let written = self
                .write_shard_rows(
                    node,
                    &scratch.join("db"),
                    &entry.record,
                    &maps,
                    &catalog,
                    &mut report,
                )
                .await;
            let _ = std::fs::remove_dir_all(&scratch);
            written?;
            report.shards += 1;
        }
        tracing::info!(backup = id, ?report, "restore complete");
        Ok(report)
    }

    /// Downloads one shard of backup `id` into a scratch directory and
    /// verifies it (files and data). Returns the directory (its `db/` is
    /// the checkpoint); the caller removes it.
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
        let _ = std::fs::remove_dir_all(&scratch);
        let db = scratch.join("db");
        std::fs::create_dir_all(&db).map_err(|e| io_error(&db, e))?;
        let result = async {
            for file in &record.files {
                target
                    .download(&file_key(id, dir, &file.name), &db.join(&file.name))
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
                let _ = std::fs::remove_dir_all(&scratch);
                Err(e)
            }
        }
    }

    async fn write_shard_rows(
        &self,
        node: &Node,
        db: &std::path::Path,
        record: &ShardBackup,
        maps: &HashMap<ViewId, ViewMap>,
        catalog: &Catalog,
        report: &mut RestoreReport,
    ) -> Result<(), BackupError> {
        let opened = db.to_path_buf();
        let store = blocking(db, move || {
            let options = StoreOptions {
                load_catalog: false,
                ..StoreOptions::scratch()
            };
            StateStore::open(&opened, options)
                .map(Arc::new)
                .map_err(|e| BackupError::Corrupt {
                    what: opened.display().to_string(),
                    reason: e.to_string(),
                })
        })
        .await?;
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
                        what: format!("shard {}", record.group),
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
                        what: format!("shard {}", record.group),
                        reason: format!(
                            "rows of view id {view_id}, which the backup's registry does not \
                             know"
                        ),
                    });
                };
                let entity_key =
                    String::from_utf8(entity.to_vec()).map_err(|_| BackupError::Corrupt {
                        what: format!("shard {}", record.group),
                        reason: "an entity key that is not UTF-8".into(),
                    })?;
                let values = row
                    .values
                    .into_iter()
                    .filter_map(|(field, value)| map.fields.get(&field).map(|&f| (f, value)))
                    .collect();
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
                node.propose_all(proposals, None, |applied| match applied {
                    Response::Written { .. } => Ok(()),
                    other => Err(other),
                })
                .await
                .map_err(|e| BackupError::Refused(format!("writing restored rows: {e}")))?;
                report.rows_restored += count;
            }
        }
        if records_seen != record.rows {
            return Err(BackupError::Corrupt {
                what: format!("shard {}", record.group),
                reason: format!(
                    "{records_seen} records read, the backup recorded {}",
                    record.rows
                ),
            });
        }
        Ok(())
    }
}
