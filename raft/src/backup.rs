//! A shard's part of a full backup (issue 12): a checkpoint of one replica's
//! store, described by a [`ShardBackup`] record (every file with its size,
//! crc32c and sha256; the applied log id and leader time the checkpoint is
//! at, which is where log shipping resumes; the shard's range; and the
//! logical digest of its rows), and the two levels of verification:
//! [`verify_files`] (every byte against its checksums) and [`verify_data`]
//! (the checkpoint opened read-only, every block checksum verified by
//! RocksDB, its rows' digest and position compared with the record).
//!
//! Uploading to a backup target and the cluster-wide manifest live in the
//! server; this module only makes and checks one shard's files.

use std::io::Read;
use std::path::{Path, PathBuf};

use openraft::entry::RaftEntry as _;
use quiver_engine::digest::{CheckpointReader, LogicalDigest};
use serde::{Deserialize, Serialize};
use sha2::Digest as _;

use crate::change_stream::{ChangeEntry, ChangePosition};
use crate::state_machine::{
    APPLIED_KEY, LEADER_TIME_KEY, RANGE_KEY, RangeDesc, StateMachine, checked_name, decode_applied,
};
use crate::types::{Command, Entry, GroupId, LogId, Proposal};

/// The format of [`ShardBackup`] records this build writes and reads.
pub const SHARD_BACKUP_VERSION: u32 = 1;
/// Largest encoded [`ShardBackup`] record read.
pub const SHARD_BACKUP_BYTES_MAX: usize = 4 << 20;
/// Most files one shard's checkpoint may have.
pub const SHARD_BACKUP_FILES_MAX: usize = 100_000;
/// Bytes read at a time when hashing a file.
const HASH_BUFFER_BYTES: usize = 1 << 20;

/// One file of a shard's checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupFile {
    /// Its name in the checkpoint directory (one plain path component).
    pub name: String,
    /// Its size.
    pub bytes: u64,
    /// crc32c of its bytes.
    pub crc32c: u32,
    /// sha256 of its bytes, 64 hex digits.
    pub sha256: String,
}

/// What a full backup records of one shard.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardBackup {
    /// Format version ([`SHARD_BACKUP_VERSION`]).
    pub version: u32,
    /// The shard (or the metadata group).
    pub group: GroupId,
    /// The last entry applied in the checkpoint.
    pub applied: Option<LogId>,
    /// The shard's leader time there (µs).
    pub leader_ts_us: i64,
    /// The shard's range as its log decided it (`None`: it never split).
    pub range: Option<RangeDesc>,
    /// Rows in the checkpoint.
    pub rows: u64,
    /// The rows' logical digest ([`LogicalDigest::sum_hex`]).
    pub digest: String,
    /// The checkpoint's files.
    pub files: Vec<BackupFile>,
}

impl ShardBackup {
    /// Where the shard's change stream resumes after this checkpoint.
    pub fn position(&self) -> ChangePosition {
        ChangePosition {
            log_id: self.applied,
            leader_ts_us: self.leader_ts_us,
        }
    }

    /// Total bytes of its files.
    pub fn bytes(&self) -> u64 {
        self.files.iter().map(|f| f.bytes).sum()
    }

    /// Encodes the record (JSON, so operators can read it).
    pub fn encode(&self) -> Result<Vec<u8>, BackupError> {
        serde_json::to_vec_pretty(self).map_err(|e| BackupError::Record(e.to_string()))
    }

    /// Decodes a record read back from a backup (bytes that may be
    /// anything): size, version, file names and digests are checked.
    pub fn decode(bytes: &[u8]) -> Result<ShardBackup, BackupError> {
        if bytes.len() > SHARD_BACKUP_BYTES_MAX {
            return Err(BackupError::Record(format!(
                "{} bytes, more than {SHARD_BACKUP_BYTES_MAX}",
                bytes.len()
            )));
        }
        let record: ShardBackup =
            serde_json::from_slice(bytes).map_err(|e| BackupError::Record(e.to_string()))?;
        record.check()?;
        Ok(record)
    }

    /// Checks a record read back from anywhere: version, file count, file
    /// names and digests.
    pub fn check(&self) -> Result<(), BackupError> {
        let record = self;
        if record.version != SHARD_BACKUP_VERSION {
            return Err(BackupError::Record(format!(
                "version {} is not {SHARD_BACKUP_VERSION}",
                record.version
            )));
        }
        if record.files.len() > SHARD_BACKUP_FILES_MAX {
            return Err(BackupError::Record(format!(
                "{} files, more than {SHARD_BACKUP_FILES_MAX}",
                record.files.len()
            )));
        }
        if LogicalDigest::parse_sum(&record.digest).is_none() {
            return Err(BackupError::Record(format!(
                "digest {:?} is not 32 hex digits",
                record.digest
            )));
        }
        for file in &record.files {
            checked_name(&file.name).map_err(|e| BackupError::Record(e.to_string()))?;
            if file.sha256.len() != 64 || !file.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(BackupError::Record(format!(
                    "{}: sha256 {:?} is not 64 hex digits",
                    file.name, file.sha256
                )));
            }
        }
        Ok(())
    }
}

/// Why a shard backup cannot be made or does not verify. Every variant
/// about a file names it.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// A file the record lists is not there.
    #[error("{file}: missing")]
    Missing {
        /// The file.
        file: PathBuf,
    },
    /// A file's size is not the recorded one.
    #[error("{file}: {found} bytes, the backup recorded {expected}")]
    Size {
        /// The file.
        file: PathBuf,
        /// Recorded.
        expected: u64,
        /// On disk.
        found: u64,
    },
    /// A file's bytes do not match a recorded checksum.
    #[error("{file}: {which} does not match the backup's record")]
    Checksum {
        /// The file.
        file: PathBuf,
        /// `crc32c` or `sha256`.
        which: &'static str,
    },
    /// The rows are not the ones recorded.
    #[error(
        "shard {group}: the checkpoint holds {found_rows} rows with digest {found}, the backup \
         recorded {expected_rows} with {expected}"
    )]
    Digest {
        /// The shard.
        group: GroupId,
        /// Recorded digest.
        expected: String,
        /// Recorded rows.
        expected_rows: u64,
        /// Computed digest.
        found: String,
        /// Computed rows.
        found_rows: u64,
    },
    /// The checkpoint's applied position is not the recorded one.
    #[error("shard {group}: the checkpoint is at {found:?}, the backup recorded {expected:?}")]
    Position {
        /// The shard.
        group: GroupId,
        /// Recorded.
        expected: Option<LogId>,
        /// In the checkpoint.
        found: Option<LogId>,
    },
    /// The store could not be read (RocksDB found corruption, ...).
    #[error("{dir}: {reason}")]
    Store {
        /// The checkpoint directory.
        dir: PathBuf,
        /// What failed.
        reason: String,
    },
    /// A record could not be encoded or decoded.
    #[error("shard backup record: {0}")]
    Record(String),
    /// Shipped entries cannot be replayed onto the checkpoint.
    #[error("shard {group}: replaying its shipped log: {reason}")]
    Replay {
        /// The shard.
        group: GroupId,
        /// Why.
        reason: String,
    },
    /// Reading or writing a file failed.
    #[error("{file}: {source}")]
    Io {
        /// The file.
        file: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

fn io_error(file: &Path) -> impl FnOnce(std::io::Error) -> BackupError + '_ {
    move |source| BackupError::Io {
        file: file.to_path_buf(),
        source,
    }
}

/// A file's size, crc32c and sha256, computed as its bytes go by (read
/// from disk, or from a backup target).
#[derive(Debug, Clone, Default)]
pub struct FileHasher {
    bytes: u64,
    crc32c: u32,
    sha256: sha2::Sha256,
}

impl FileHasher {
    /// Adds the next bytes.
    pub fn update(&mut self, chunk: &[u8]) {
        self.bytes += chunk.len() as u64;
        self.crc32c = crc32c::crc32c_append(self.crc32c, chunk);
        self.sha256.update(chunk);
    }

    /// Size, crc32c and sha256 (64 hex digits) of everything added.
    pub fn finish(self) -> (u64, u32, String) {
        let sha256 = self
            .sha256
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        (self.bytes, self.crc32c, sha256)
    }
}

/// A file's size, crc32c and sha256 (read once). `on_bytes` hears every
/// chunk's size as it is read (a rate limit, a progress bar).
pub fn hash_file(
    path: &Path,
    on_bytes: &mut dyn FnMut(u64),
) -> Result<(u64, u32, String), BackupError> {
    let mut file = std::fs::File::open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            BackupError::Missing {
                file: path.to_path_buf(),
            }
        } else {
            io_error(path)(e)
        }
    })?;
    let mut buffer = vec![0u8; HASH_BUFFER_BYTES];
    let mut hasher = FileHasher::default();
    loop {
        let n = file.read(&mut buffer).map_err(io_error(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
        on_bytes(n as u64);
    }
    Ok(hasher.finish())
}

/// Takes a checkpoint of `state`'s store into `db_dir` (which must not
/// exist) and describes it. `on_bytes` hears the bytes hashed.
pub fn checkpoint_shard(
    state: &StateMachine,
    db_dir: &Path,
    on_bytes: &mut dyn FnMut(u64),
) -> Result<ShardBackup, BackupError> {
    state
        .checkpoint_store(db_dir)
        .map_err(|e| BackupError::Store {
            dir: db_dir.to_path_buf(),
            reason: e.to_string(),
        })?;
    describe_checkpoint(state.group(), db_dir, on_bytes)
}

/// Describes the checkpoint in `db_dir`: its files hashed first (opening
/// it read-only adds nothing to the directory, but the list is taken before
/// anything else touches it), then its position, range and rows.
pub fn describe_checkpoint(
    group: GroupId,
    db_dir: &Path,
    on_bytes: &mut dyn FnMut(u64),
) -> Result<ShardBackup, BackupError> {
    let mut files = Vec::new();
    for name in checkpoint_file_names(db_dir)? {
        let (bytes, crc32c, sha256) = hash_file(&db_dir.join(&name), on_bytes)?;
        files.push(BackupFile {
            name,
            bytes,
            crc32c,
            sha256,
        });
    }
    describe_with_files(group, db_dir, files)
}

/// The names of the files in a checkpoint directory, sorted.
pub fn checkpoint_file_names(db_dir: &Path) -> Result<Vec<String>, BackupError> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(db_dir).map_err(io_error(db_dir))? {
        let entry = entry.map_err(io_error(db_dir))?;
        if entry.file_type().map_err(io_error(db_dir))?.is_file() {
            names.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    names.sort();
    if names.len() > SHARD_BACKUP_FILES_MAX {
        return Err(BackupError::Record(format!(
            "{}: {} files, more than {SHARD_BACKUP_FILES_MAX}",
            db_dir.display(),
            names.len()
        )));
    }
    Ok(names)
}

/// The record of the checkpoint in `db_dir` whose files were hashed
/// already (as they were uploaded): its position, range and rows are read
/// from it.
pub fn describe_with_files(
    group: GroupId,
    db_dir: &Path,
    files: Vec<BackupFile>,
) -> Result<ShardBackup, BackupError> {
    let (applied, leader_ts_us, range, digest) = read_checkpoint(group, db_dir)?;
    Ok(ShardBackup {
        version: SHARD_BACKUP_VERSION,
        group,
        applied,
        leader_ts_us,
        range,
        rows: digest.rows,
        digest: digest.sum_hex(),
        files,
    })
}

type CheckpointState = (Option<LogId>, i64, Option<RangeDesc>, LogicalDigest);

/// A checkpoint's applied log id, leader time, range and rows' digest.
fn read_checkpoint(group: GroupId, db_dir: &Path) -> Result<CheckpointState, BackupError> {
    let store_error = |reason: String| BackupError::Store {
        dir: db_dir.to_path_buf(),
        reason,
    };
    let reader = CheckpointReader::open(db_dir).map_err(|e| store_error(e.to_string()))?;
    let meta = |key: &[u8]| reader.get_meta(key).map_err(|e| store_error(e.to_string()));
    let (applied, _) =
        decode_applied(meta(APPLIED_KEY)?.as_deref()).map_err(|e| store_error(e.to_string()))?;
    let leader_ts_us = match meta(LEADER_TIME_KEY)? {
        None => 0,
        Some(bytes) => <[u8; 8]>::try_from(bytes.as_slice())
            .map(i64::from_be_bytes)
            .map_err(|_| store_error(format!("leader time record of {} bytes", bytes.len())))?,
    };
    let range = match meta(RANGE_KEY)? {
        None => None,
        Some(bytes) => Some(
            postcard::from_bytes(&bytes)
                .map_err(|e| store_error(format!("shard {group}: stored range: {e}")))?,
        ),
    };
    let digest = reader
        .digest(0, None)
        .map_err(|e| store_error(e.to_string()))?;
    Ok((applied, leader_ts_us, range, digest))
}

/// Checks every file `record` lists in `db_dir`: there, of its size, and of
/// its crc32c and sha256. Stops at the first that is not.
pub fn verify_files(
    db_dir: &Path,
    record: &ShardBackup,
    on_bytes: &mut dyn FnMut(u64),
) -> Result<(), BackupError> {
    for file in &record.files {
        let name = checked_name(&file.name).map_err(|e| BackupError::Record(e.to_string()))?;
        let path = db_dir.join(name);
        let found = std::fs::metadata(&path)
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    BackupError::Missing { file: path.clone() }
                } else {
                    io_error(&path)(e)
                }
            })?
            .len();
        if found != file.bytes {
            return Err(BackupError::Size {
                file: path,
                expected: file.bytes,
                found,
            });
        }
        let (_, crc32c, sha256) = hash_file(&path, on_bytes)?;
        if crc32c != file.crc32c {
            return Err(BackupError::Checksum {
                file: path,
                which: "crc32c",
            });
        }
        if sha256 != file.sha256 {
            return Err(BackupError::Checksum {
                file: path,
                which: "sha256",
            });
        }
    }
    Ok(())
}

/// Opens the checkpoint in `db_dir` read-only (its files verified first:
/// RocksDB must not read a file the record does not vouch for) and checks
/// its position and its rows' digest against `record`.
pub fn verify_data(
    db_dir: &Path,
    record: &ShardBackup,
    on_bytes: &mut dyn FnMut(u64),
) -> Result<(), BackupError> {
    verify_files(db_dir, record, on_bytes)?;
    let (applied, _, _, digest) = read_checkpoint(record.group, db_dir)?;
    if applied != record.applied {
        return Err(BackupError::Position {
            group: record.group,
            expected: record.applied,
            found: applied,
        });
    }
    if digest.sum_hex() != record.digest || digest.rows != record.rows {
        return Err(BackupError::Digest {
            group: record.group,
            expected: record.digest.clone(),
            expected_rows: record.rows,
            found: digest.sum_hex(),
            found_rows: digest.rows,
        });
    }
    Ok(())
}

/// Where, under a scratch directory, a downloaded checkpoint goes so that
/// [`open_for_replay`] opens it as a replica's state (the state machine's
/// first store generation).
pub const REPLAY_DB_DIR: &str = "db-0";

/// Opens the checkpoint downloaded into `dir`/[`REPLAY_DB_DIR`] as the
/// state of a replica of `group`, to replay shipped entries onto it; with
/// `load_catalog` its registry is loaded (the metadata group's).
pub fn open_for_replay(
    group: GroupId,
    dir: &Path,
    load_catalog: bool,
) -> Result<StateMachine, BackupError> {
    let options = quiver_engine::StoreOptions {
        load_catalog,
        ..quiver_engine::StoreOptions::scratch()
    };
    StateMachine::open(
        group,
        dir,
        options,
        std::sync::Arc::new(crate::state_machine::NoObserver),
    )
    .map_err(|e| BackupError::Store {
        dir: dir.to_path_buf(),
        reason: e.to_string(),
    })
}

/// How far a replay got.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplayProgress {
    /// Entries applied.
    pub applied: u64,
    /// An entry later than the time was met: the replay is complete.
    pub reached_time: bool,
    /// Shards split off during the replay, each built in a scratch
    /// directory under the replayed state's (its state in `state/`): their
    /// own shipped logs go on from there.
    pub children: Vec<(GroupId, PathBuf)>,
}

/// The directory a replayed shard's split child is built in.
pub fn replay_child_dir(parent: &Path, child: GroupId) -> PathBuf {
    parent.join(format!("split-{child}"))
}

/// Builds a replayed shard's split children the way a replica builds its
/// own (the shard's apply code does it), in scratch directories.
struct ReplaySplits {
    dir: PathBuf,
    replica: crate::types::ReplicaId,
    created: parking_lot::Mutex<Vec<GroupId>>,
}

impl crate::state_machine::SplitHandler for ReplaySplits {
    fn prepare_child(&self, child: GroupId) -> std::io::Result<Option<PathBuf>> {
        Ok(Some(replay_child_dir(&self.dir, child)))
    }

    fn replica(&self) -> crate::types::ReplicaId {
        self.replica
    }

    fn child_created(&self, child: GroupId) {
        self.created.lock().push(child);
    }
}

/// Applies to `state`, in order, the shipped `entries` after its applied
/// position whose time is at most `until_us`, exactly as the shard applied
/// them (the same code: refusals, dedup and expiry floors come out the
/// same). Stops at the first entry past `until_us`. A split is applied as
/// a replica applies it: the child is built beside the state (see
/// [`ReplayProgress::children`]) and the parent trimmed.
pub fn replay(
    state: &StateMachine,
    entries: Vec<ChangeEntry>,
    until_us: i64,
) -> Result<ReplayProgress, BackupError> {
    let group = state.group();
    let from = state.applied().map_or(0, |id| id.index);
    let mut progress = ReplayProgress::default();
    let mut batch = Vec::new();
    let apply = |batch: Vec<Entry>| {
        state.apply_entries(batch).map_err(|e| BackupError::Replay {
            group,
            reason: e.to_string(),
        })
    };
    for entry in entries {
        if entry.log_id.index <= from {
            continue;
        }
        if entry.leader_ts_us > until_us {
            progress.reached_time = true;
            break;
        }
        let split = matches!(entry.command, Command::Split { .. });
        let entry = Entry::new_normal(
            entry.log_id,
            Proposal {
                request_id: entry.request_id,
                leader_ts_us: entry.leader_ts_us,
                command: entry.command,
            },
        );
        progress.applied += 1;
        if !split {
            batch.push(entry);
            continue;
        }
        // Everything before the split first: the child is cut from the
        // state as of it, by a member of the membership of that moment.
        apply(std::mem::take(&mut batch))?;
        let replica = state.applied_voter().ok_or_else(|| BackupError::Replay {
            group,
            reason: "a split with no voter in the applied membership".into(),
        })?;
        let splits = std::sync::Arc::new(ReplaySplits {
            dir: state.dir().to_path_buf(),
            replica,
            created: parking_lot::Mutex::new(Vec::new()),
        });
        state.set_split_handler(splits.clone());
        apply(vec![entry])?;
        let created = std::mem::take(&mut *splits.created.lock());
        progress.children.extend(
            created
                .into_iter()
                .map(|child| (child, replay_child_dir(state.dir(), child))),
        );
    }
    apply(batch)?;
    Ok(progress)
}
