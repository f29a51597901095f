//! Full backups of a running cluster (issue 12): every shard's checkpoint,
//! then the metadata group's (views and cluster map) after every shard's
//! cut, uploaded file by file to a backup target ([`target`]) and tied
//! together by a manifest written last and only once ([`manifest`]). A
//! backup is started on any node (`Admin.CreateBackup`); that node
//! coordinates, and each shard's checkpoint is taken and uploaded by a node
//! hosting it (its leader if it can be reached, for the freshest cut), which
//! the coordinator asks over the peer port (`PeerCall::BackupShard`).
//!
//! Verification at two levels: `files` (every object's size, crc32c and
//! sha256 against the manifest) and `data` (each shard downloaded into a
//! scratch directory, opened read-only, its rows' logical digest and
//! position compared). Continuous log backup is [`log`], restore (to a
//! backup or a point in time) [`restore`].
//!
//! Architecture invariant: the shard-level work (checkpoint, digest,
//! verification of one shard) is `quiver_raft::backup`'s; this module
//! moves files and coordinates nodes, and never reads a store itself.

pub mod log;
pub mod manifest;
pub mod prune;
pub mod restore;
pub mod target;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use quiver_raft::GroupId;
use quiver_raft::backup::{self as shard_backup, BackupFile, ShardBackup};

use crate::cluster::throttle::ByteRate;
use crate::cluster::{Cluster, ClusterError};
use crate::config::BackupConfig;
pub use manifest::{BackupManifest, MetadataEntry, ShardEntry};
pub use target::Target;

/// Where a node stages checkpoints and downloads, under its data directory.
const STAGING_DIR: &str = "backup-staging";

/// Why a backup operation failed.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// The target URL is refused.
    #[error("backup target {url}: {reason}")]
    Target {
        /// The URL (cut to 200 characters).
        url: String,
        /// Why.
        reason: String,
    },
    /// The target failed (I/O, permissions, network).
    #[error("backup target: {0}")]
    Store(#[from] object_store::Error),
    /// A shard's checkpoint could not be made or does not verify.
    #[error(transparent)]
    Shard(#[from] shard_backup::BackupError),
    /// No such backup (or it has no manifest: incomplete).
    #[error("no complete backup {0} at the target")]
    NotFound(String),
    /// Something read back from the target is not what was written.
    #[error("{what}: {reason}")]
    Corrupt {
        /// What.
        what: String,
        /// Why.
        reason: String,
    },
    /// Another backup is running on this node.
    #[error("a backup is already running on this node")]
    Busy,
    /// Reaching a shard failed.
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    /// Local file work failed.
    #[error("{what}: {source}")]
    Io {
        /// The file or directory.
        what: String,
        /// The error.
        source: std::io::Error,
    },
    /// A request argument is wrong.
    #[error("{0}")]
    Invalid(String),
    /// The operation does not fit the cluster's state (a restore into a
    /// cluster that holds data, a refused write).
    #[error("{0}")]
    Refused(String),
}

/// This node's backup work: its configuration, its staging directory, the
/// byte rate all its uploads share, and one coordinated backup at a time.
pub struct Backups {
    config: BackupConfig,
    data_dir: PathBuf,
    rate: Option<ByteRate>,
    coordinating: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Backups {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backups")
            .field("data_dir", &self.data_dir)
            .finish_non_exhaustive()
    }
}

/// What a verification found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// Objects read and checked.
    pub files_checked: u64,
    /// Their bytes.
    pub bytes_checked: u64,
    /// Shards whose data was restored into a scratch store and compared.
    pub shards_restored: u64,
    /// Shipped log chunks read and checked from the backup's positions on
    /// (and from the splits after them).
    pub log_chunks_checked: u64,
    /// The latest leader time a restore from this backup can reach with
    /// the shipped log: the least, over its groups, of the time up to
    /// which the unbroken chain from the backup holds every entry
    /// (`None`: no log was shipped).
    pub log_reaches_us: Option<i64>,
    /// Every problem, naming its shard and file (the first
    /// [`VERIFY_PROBLEMS_MAX`], then how many more): damage, in the
    /// backup's files or in a shipped chunk.
    pub problems: Vec<String>,
    /// Gaps in the shipped log after the backup (shipping was off or
    /// behind for longer than the log was kept): the backup is intact,
    /// but restores to a time after a gap need a later backup.
    pub log_gaps: Vec<String>,
}

/// Problems a verification lists one by one (a backup damaged everywhere
/// does not make an answer too big to send).
pub const VERIFY_PROBLEMS_MAX: usize = 1000;

impl VerifyReport {
    fn problem(&mut self, text: String) {
        if self.problems.len() < VERIFY_PROBLEMS_MAX {
            self.problems.push(text);
        } else if self.problems.len() == VERIFY_PROBLEMS_MAX {
            self.problems
                .push("... and more problems (not listed)".to_owned());
        }
    }
}

/// The key of a part's file in backup `id` (`dir`: the part's directory,
/// see [`ShardEntry::dir`]).
fn file_key(id: &str, dir: &str, name: &str) -> String {
    format!("backups/{id}/shards/{dir}/{name}")
}

/// The key of backup `id`'s manifest.
fn manifest_key(id: &str) -> String {
    format!("backups/{id}/MANIFEST.json")
}

impl Backups {
    /// This node's backups, staging under `data_dir`.
    pub fn new(config: BackupConfig, data_dir: &Path) -> Arc<Backups> {
        let rate = (config.upload_bytes_per_second_max > 0)
            .then(|| ByteRate::new(config.upload_bytes_per_second_max));
        Arc::new(Backups {
            config,
            data_dir: data_dir.to_path_buf(),
            rate,
            coordinating: tokio::sync::Mutex::new(()),
        })
    }

    /// How long one shard may take.
    pub fn shard_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.config.shard_timeout_ms)
    }

    /// Opens a target URL under this node's rules, to read: a `file://`
    /// directory must exist.
    pub fn target(&self, url: &str) -> Result<Target, BackupError> {
        Target::open(url, &self.config, &self.data_dir, false)
    }

    /// [`Self::target`] to write a backup into (a `file://` directory is
    /// created if missing).
    fn target_for_writing(&self, url: &str) -> Result<Target, BackupError> {
        Target::open(url, &self.config, &self.data_dir, true)
    }

    /// What `prune` keeps by default (`backup.retention_hours`).
    pub fn retention(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.config.retention_hours.saturating_mul(3600))
    }

    /// The target log shipping writes to (empty: none).
    pub fn log_url(&self) -> &str {
        &self.config.log_url
    }

    /// The shipped log at `url` of cluster `cluster_id` (empty: this
    /// cluster's, every group of its map; another cluster's: the groups of
    /// its newest backup at `url`). Returns the id and each group's state.
    pub async fn log_status(
        &self,
        cluster: &Cluster,
        url: &str,
        cluster_id: &str,
    ) -> Result<(String, Vec<log::GroupLogStatus>), BackupError> {
        let target = self.target(url)?;
        let own = cluster
            .group(quiver_raft::METADATA_GROUP)
            .and_then(|g| g.state.cluster_id().ok().flatten());
        let (id, groups) = if cluster_id.is_empty() || own.as_deref() == Some(cluster_id) {
            let id = own.ok_or_else(|| {
                BackupError::Refused("this node does not know its cluster's id yet".into())
            })?;
            let (map, _) = cluster.current_or_static_map().await?;
            let groups = std::iter::once(quiver_raft::METADATA_GROUP)
                .chain(map.shards.keys().copied())
                .collect::<Vec<_>>();
            (id, groups)
        } else {
            log::check_cluster_id(cluster_id)?;
            let newest = self
                .list(url)
                .await?
                .into_iter()
                .rfind(|m| m.cluster_id.as_deref() == Some(cluster_id))
                .ok_or_else(|| {
                    BackupError::NotFound(format!("(none of cluster {cluster_id} at {url})"))
                })?;
            let groups = newest.parts().map(|(_, r)| r.group).collect();
            (cluster_id.to_owned(), groups)
        };
        let status = log::status(&target, &id, &groups).await?;
        Ok((id, status))
    }

    /// Removes what earlier runs left staged (a crash mid-backup).
    pub fn clean_staging(&self) {
        let staging = self.data_dir.join(STAGING_DIR);
        if let Err(e) = std::fs::remove_dir_all(&staging)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(dir = %staging.display(), error = %e, "cannot clean backup staging");
        }
    }

    /// Backs up the whole cluster to `url`: every shard of the cluster map,
    /// then the metadata group, then the manifest. Returns the manifest.
    pub async fn create(
        self: &Arc<Self>,
        cluster: &Arc<Cluster>,
        url: &str,
    ) -> Result<BackupManifest, BackupError> {
        let _one = self
            .coordinating
            .try_lock()
            .map_err(|_| BackupError::Busy)?;
        let target = self.target_for_writing(url)?;
        let cluster_id = cluster_id_when_stored(cluster).await?;
        let started_at_us = now_us();
        let id = manifest::new_backup_id(started_at_us);
        let (map, _) = cluster.current_or_static_map().await?;
        tracing::info!(backup = %id, url, shards = map.shards.len(), "backup started");
        let mut shards = Vec::with_capacity(map.shards.len());
        for (&group, desc) in &map.shards {
            let (dir, record) = cluster
                .backup_shard(group, url, &id, self.shard_timeout())
                .await?;
            tracing::info!(backup = %id, shard = group, bytes = record.bytes(), rows = record.rows, "shard backed up");
            // Fault tests kill the coordinator midway here.
            quiver_raft::failpoint::failpoint("backup.shard_recorded");
            shards.push(ShardEntry {
                start: desc.start,
                end: desc.end,
                dir,
                record,
            });
        }
        // A shard that split meanwhile gave rows to a child this backup
        // does not hold: refused, not recorded as whole.
        let (after, _) = cluster.current_or_static_map().await?;
        let ranges =
            |m: &quiver_raft::cluster_map::ClusterMap| -> Vec<(GroupId, u64, Option<u64>)> {
                m.shards.iter().map(|(&g, d)| (g, d.start, d.end)).collect()
            };
        if ranges(&after) != ranges(&map) {
            return Err(BackupError::Refused(
                "the cluster's shards changed during the backup (a split): run it again".into(),
            ));
        }
        manifest::check_ring(&shards).map_err(BackupError::Refused)?;
        // The views and map at a metadata read index taken after every
        // shard's cut (this node's replica caught up to it first): at least
        // as new as any shard's rows.
        cluster.sync_metadata().await?;
        let (dir, record) = tokio::time::timeout(
            self.shard_timeout(),
            self.backup_local(cluster, 0, url, &id),
        )
        .await
        .map_err(|_| BackupError::Refused("the metadata group's backup timed out".into()))??;
        let metadata = MetadataEntry { dir, record };
        let manifest = BackupManifest {
            version: manifest::MANIFEST_VERSION,
            backup_id: id.clone(),
            started_at_us,
            finished_at_us: now_us(),
            map_version: map.version,
            cluster_id,
            shards,
            metadata,
        };
        target
            .put_new(&manifest_key(&id), manifest.encode()?)
            .await?;
        tracing::info!(backup = %id, bytes = manifest.bytes(), "backup complete");
        Ok(manifest)
    }

    /// Checkpoints this node's replica of `group` and uploads it into
    /// backup `id` at `url`, in a directory of its own; returns the
    /// directory and the record. Runs as a task of its own: a caller that
    /// gives up (a peer call's deadline) does not leave half a staging
    /// directory, and what it goes on uploading lands in its own directory,
    /// which no manifest names.
    pub async fn backup_local(
        self: &Arc<Self>,
        cluster: &Cluster,
        group: GroupId,
        url: &str,
        id: &str,
    ) -> Result<(String, ShardBackup), BackupError> {
        manifest::check_backup_id(id)?;
        let target = self.target_for_writing(url)?;
        let dir = manifest::new_part_dir(group, cluster.node_id);
        let state = cluster
            .group(group)
            .ok_or(ClusterError::NoSuchGroup(group))?
            .state
            .clone();
        let staging = self.data_dir.join(STAGING_DIR).join(format!("{id}-{dir}"));
        let (backups, id) = (self.clone(), id.to_owned());
        tokio::spawn(async move {
            let result = backups
                .checkpoint_and_upload(&state, &target, &staging, &id, &dir)
                .await
                .map(|record| (dir, record));
            remove_scratch(staging).await;
            result
        })
        .await
        .map_err(|e| BackupError::Io {
            what: "backup task".into(),
            source: std::io::Error::other(e),
        })?
    }

    async fn checkpoint_and_upload(
        &self,
        state: &quiver_raft::StateMachine,
        target: &Target,
        staging: &Path,
        id: &str,
        dir: &str,
    ) -> Result<ShardBackup, BackupError> {
        remove_scratch(staging.to_path_buf()).await;
        let db = staging.join("db");
        let group = state.group();
        let (checkpoint_state, checkpoint_db) = (state.clone(), db.clone());
        let names = blocking(&db, move || {
            checkpoint_state
                .checkpoint_store(&checkpoint_db)
                .map_err(|e| io_error(&checkpoint_db, e))?;
            Ok(shard_backup::checkpoint_file_names(&checkpoint_db)?)
        })
        .await?;
        let mut files = Vec::with_capacity(names.len());
        for name in names {
            let (bytes, crc32c, sha256) = target
                .put_file(
                    &file_key(id, dir, &name),
                    &db.join(&name),
                    self.rate.as_ref(),
                )
                .await?;
            files.push(BackupFile {
                name,
                bytes,
                crc32c,
                sha256,
            });
            // Fault tests kill a node midway through a backup here.
            quiver_raft::failpoint::failpoint("backup.file_uploaded");
        }
        let described = db.clone();
        blocking(&db, move || {
            Ok(shard_backup::describe_with_files(group, &described, files)?)
        })
        .await
    }

    /// The complete backups at `url`, oldest first.
    pub async fn list(&self, url: &str) -> Result<Vec<BackupManifest>, BackupError> {
        let target = self.target(url)?;
        let mut manifests = Vec::new();
        for id in target.list_dirs("backups").await? {
            if manifest::check_backup_id(&id).is_err() {
                continue;
            }
            // No manifest: incomplete, not listed.
            if let Some(bytes) = target
                .get(&manifest_key(&id), manifest::MANIFEST_BYTES_MAX)
                .await?
            {
                manifests.push(BackupManifest::decode(&bytes)?);
            }
        }
        manifests
            .sort_by(|a, b| (a.started_at_us, &a.backup_id).cmp(&(b.started_at_us, &b.backup_id)));
        Ok(manifests)
    }

    /// Backup `id`'s manifest.
    pub async fn get(&self, url: &str, id: &str) -> Result<BackupManifest, BackupError> {
        manifest::check_backup_id(id)?;
        let target = self.target(url)?;
        let bytes = target
            .get(&manifest_key(id), manifest::MANIFEST_BYTES_MAX)
            .await?
            .ok_or_else(|| BackupError::NotFound(id.to_owned()))?;
        let manifest = BackupManifest::decode(&bytes)?;
        if manifest.backup_id != id {
            return Err(BackupError::Corrupt {
                what: manifest_key(id),
                reason: format!("names backup {}", manifest.backup_id),
            });
        }
        Ok(manifest)
    }

    /// Verifies backup `id`: every file against its checksums, with
    /// `data` every shard restored into a scratch store and compared, and
    /// with `log` the shipped log from the backup on.
    pub async fn verify(
        &self,
        url: &str,
        id: &str,
        data: bool,
        log: bool,
    ) -> Result<VerifyReport, BackupError> {
        let manifest = self.get(url, id).await?;
        let target = self.target(url)?;
        let mut report = VerifyReport::default();
        for (dir, record) in manifest.parts() {
            let mut shard_ok = true;
            for file in &record.files {
                let key = file_key(id, dir, &file.name);
                match target.hash(&key).await? {
                    None => {
                        shard_ok = false;
                        report.problem(format!("shard {}: {key}: missing", record.group));
                    }
                    Some((bytes, crc32c, sha256)) => {
                        report.files_checked += 1;
                        report.bytes_checked += bytes;
                        let problem = if bytes != file.bytes {
                            Some(format!("{bytes} bytes, the manifest says {}", file.bytes))
                        } else if crc32c != file.crc32c {
                            Some("crc32c does not match the manifest".to_owned())
                        } else if sha256 != file.sha256 {
                            Some("sha256 does not match the manifest".to_owned())
                        } else {
                            None
                        };
                        if let Some(problem) = problem {
                            shard_ok = false;
                            report.problem(format!("shard {}: {key}: {problem}", record.group));
                        }
                    }
                }
            }
            if data && shard_ok {
                match self.verify_shard_data(&target, id, dir, record).await {
                    Ok(()) => report.shards_restored += 1,
                    Err(e) => report.problem(format!("shard {}: {e}", record.group)),
                }
            }
        }
        if let Some(cluster_id) = manifest.cluster_id.as_ref().filter(|_| log) {
            self.verify_log(&target, cluster_id, &manifest, &mut report)
                .await?;
        }
        Ok(report)
    }

    /// The shipped log a restore to a time would replay onto backup
    /// `manifest`: every chunk from each part's position on (and each
    /// later split's), read and checked (crc, name, chain). A damaged
    /// chunk is a problem; a gap is not damage, it ends the reach.
    async fn verify_log(
        &self,
        target: &Target,
        cluster_id: &str,
        manifest: &BackupManifest,
        report: &mut VerifyReport,
    ) -> Result<(), BackupError> {
        let parts: Vec<_> = manifest
            .parts()
            .map(|(_, r)| (r.group, r.position()))
            .collect();
        let walked = log::verify_shipped(target, cluster_id, &parts).await?;
        report.log_chunks_checked = walked.iter().map(|w| w.chunks).sum();
        if report.log_chunks_checked == 0 {
            return Ok(());
        }
        report.log_reaches_us = walked
            .iter()
            .map(|w| w.reached.leader_ts_us.saturating_sub(1))
            .min();
        for walk in walked {
            match walk.stopped {
                None => {}
                Some(BackupError::Refused(gap)) => report.log_gaps.push(gap),
                Some(e) => report.problem(format!("shipped log of group {}: {e}", walk.group)),
            }
        }
        Ok(())
    }

    /// Downloads one shard into a scratch directory and checks its data.
    async fn verify_shard_data(
        &self,
        target: &Target,
        id: &str,
        dir: &str,
        record: &ShardBackup,
    ) -> Result<(), BackupError> {
        let scratch = self.download_verified(target, id, dir, record).await?;
        remove_scratch(scratch).await;
        Ok(())
    }
}

/// How long a backup waits for a starting cluster to store its map (and
/// with it its id, which names its shipped log).
const CLUSTER_ID_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// The cluster's id, once the metadata group stored the cluster map (right
/// after a new cluster starts it has not yet: a backup taken then would
/// name no cluster, and no shipped log could be replayed onto it). `None`
/// for a cluster bootstrapped before ids existed.
async fn cluster_id_when_stored(cluster: &Cluster) -> Result<Option<String>, BackupError> {
    let deadline = tokio::time::Instant::now() + CLUSTER_ID_WAIT;
    loop {
        // No metadata leader yet (a starting cluster): asked again below.
        let synced = cluster.sync_metadata().await;
        if synced.is_ok()
            && let Some(metadata) = cluster.group(quiver_raft::METADATA_GROUP)
            && metadata.state.cluster_map().is_some()
        {
            return metadata
                .state
                .cluster_id()
                .map_err(|e| io_error(metadata.state.dir(), e));
        }
        if tokio::time::Instant::now() >= deadline {
            synced?;
            return Err(BackupError::Refused(
                "the cluster has not stored its map yet (it is starting): try again".into(),
            ));
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// Runs file work on a blocking thread; an I/O error (or the task dying)
/// is reported against `what`.
async fn blocking<T: Send + 'static>(
    what: &Path,
    f: impl FnOnce() -> Result<T, BackupError> + Send + 'static,
) -> Result<T, BackupError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| io_error(what, std::io::Error::other(e)))?
}

/// Removes a staging or scratch directory off the async workers (a
/// checkpoint can hold thousands of files); failures are only logged.
async fn remove_scratch(dir: PathBuf) {
    let removed = dir.clone();
    match tokio::task::spawn_blocking(move || std::fs::remove_dir_all(&removed)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => {}
        Ok(Err(e)) => {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot remove a backup scratch directory");
        }
        Err(e) => tracing::warn!(dir = %dir.display(), error = %e, "scratch removal task failed"),
    }
}

/// An I/O error about `what`.
fn io_error(what: &Path, source: std::io::Error) -> BackupError {
    BackupError::Io {
        what: what.display().to_string(),
        source,
    }
}

/// Microseconds since the Unix epoch, by this machine's wall clock.
fn now_us() -> i64 {
    quiver_engine::clock::Clock::now_us(&quiver_engine::SystemClock)
}
