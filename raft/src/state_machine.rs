//! openraft's state machine on the engine's RocksDB state store, with
//! snapshots as RocksDB checkpoints.
//!
//! Directory of one group replica's state:
//!
//! ```text
//! db-<generation>/        the live RocksDB (CURRENT_DB names it)
//! CURRENT_DB              which db-* is live, replaced atomically
//! snapshots/<id>/         the latest snapshot: db/ (checkpoint) + manifest.json
//! ```
//!
//! The last applied log id and membership are written into the store's
//! `meta` column family in the same RocksDB batch as the data each entry
//! changes, so after a crash the store's applied position is exactly the
//! data it holds. Installing a snapshot opens a new `db-<generation>` built
//! from the snapshot's files and swaps it in; the old one is deleted.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use futures::{FutureExt, Stream, TryStreamExt};
use openraft::EntryPayload;
use openraft::storage::{EntryResponder, RaftSnapshotBuilder, RaftStateMachine};
use openraft::type_config::alias::SnapshotOf;
use parking_lot::Mutex;
use quiver_engine::durable::{StagingDir, sync_dir, write_atomic};
use quiver_engine::error::EngineError;
use quiver_engine::keys::ViewId;
use quiver_engine::{StateStore, StoreOptions};
use serde::{Deserialize, Serialize};

mod split;

use split::SplitAt;
pub use split::child_seed;

use crate::cluster_map::{ClusterMap, MapCommand, MapError, MapOutcome};
use crate::types::{
    Command, Entry, GroupId, LogId, METADATA_GROUP, Proposal, RejectKind, Response, SnapshotMeta,
    StoredMembership, TypeConfig,
};

const APPLIED_KEY: &[u8] = b"raft/applied";
/// The cluster map (metadata group only), written in the batch of the entry
/// that changed it.
const MAP_KEY: &[u8] = b"cluster/map";
/// The shard's range ([`RangeDesc`]), written by its first split (a shard
/// that never split owns whatever the map routes to it).
const RANGE_KEY: &[u8] = b"shard/range";
/// The shard's leader time (µs, big-endian i64): the largest leader time of
/// any applied entry. Written in the batch of the entry that raised it, so
/// checkpoints and snapshots carry it with the applied position.
const LEADER_TIME_KEY: &[u8] = b"raft/leader_time";
/// Most committed entries applied in one trip to the blocking pool.
const APPLY_BATCH_ENTRIES_MAX: usize = 256;
/// `req/<request id>`: this request id was applied; the value is empty when
/// it was done, or the postcard-encoded refusal when the store refused it.
const REQUEST_PREFIX: &[u8] = b"req/";
/// `reqslot/<index % REQUEST_IDS_KEPT>`: the request id applied at that
/// index, evicted when the slot is reused. Deterministic on every replica,
/// bounded, and inside the store (so it survives restarts and snapshots).
const REQUEST_SLOT_PREFIX: &[u8] = b"reqslot/";
/// Request ids remembered per group: far more than any retry window.
const REQUEST_IDS_KEPT: u64 = 100_000;
const CURRENT_DB_FILE: &str = "CURRENT_DB";
const SNAPSHOTS_DIR: &str = "snapshots";
const MANIFEST_FILE: &str = "manifest.json";
const MANIFEST_VERSION: u32 = 1;

/// A shard's hash range as its own log decided it: set by the first split
/// that touched it, and carried by checkpoints and snapshots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeDesc {
    /// First hash.
    pub start: u64,
    /// First hash past it (`None`: the end of the ring).
    pub end: Option<u64>,
    /// Splits that changed it (the map's epoch version).
    pub version: u64,
    /// The shards split off it, with the index of the split entry.
    pub children: Vec<(GroupId, u64)>,
}

impl RangeDesc {
    /// Whether the range holds `hash`.
    pub fn contains(&self, hash: u64) -> bool {
        hash >= self.start && self.end.is_none_or(|end| hash < end)
    }
}

/// Where a split puts the new shard's replica on this node, and who opens
/// it. Implemented by the server's group host (it names replica
/// directories and hosts groups); every shard replica needs one before it
/// can apply a split.
pub trait SplitHandler: Send + Sync + 'static {
    /// The replica directory (holding `log/` and `state/`) of this node's
    /// replica of `child`.
    fn child_dir(&self, child: GroupId) -> PathBuf;
    /// The child's replica is complete on disk: host it.
    fn child_created(&self, child: GroupId);
}

/// What a replica tells the node when applied entries change rows, so the
/// node's hot cache stays coherent with every replica's state.
pub trait ApplyObserver: Send + Sync + 'static {
    /// These storage keys changed (written or deleted) or must be dropped
    /// from caches. Returns how many cached entries were dropped.
    fn keys_changed(&self, keys: &[Vec<u8>]) -> u64;
    /// Every cached row of the view must go. Returns how many were dropped.
    fn view_invalidated(&self, view_id: ViewId) -> u64;
    /// The whole store was replaced (snapshot installed): drop everything.
    fn store_replaced(&self);
    /// A replica was created or destroyed on this node: rows cached while
    /// another replica of its shard (or none) was here are not kept
    /// coherent by the new one, so drop everything.
    fn replica_changed(&self);
}

/// An observer that ignores everything (tests, tools).
#[derive(Debug, Default, Clone, Copy)]
pub struct NoObserver;

impl ApplyObserver for NoObserver {
    fn keys_changed(&self, _keys: &[Vec<u8>]) -> u64 {
        0
    }
    fn view_invalidated(&self, _view_id: ViewId) -> u64 {
        0
    }
    fn store_replaced(&self) {}
    fn replica_changed(&self) {}
}

/// One file of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotFile {
    /// Path relative to the snapshot's `db/` directory.
    pub name: String,
    /// Size.
    pub bytes: u64,
    /// crc32 of the content.
    pub crc32: u32,
}

/// The manifest of a snapshot: what it covers and the files it is made of.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Format version.
    pub version: u32,
    /// The group.
    pub group: GroupId,
    /// A unique id (term-index-time).
    pub snapshot_id: String,
    /// Last applied log id and membership in the snapshot.
    pub meta: SnapshotMeta,
    /// The checkpoint's files.
    pub files: Vec<SnapshotFile>,
}

impl Manifest {
    /// Decodes a manifest (from disk; bytes that may be anything) and checks
    /// its version and that every file name is one plain path component.
    pub fn decode(bytes: &[u8]) -> io::Result<Manifest> {
        let manifest: Manifest = serde_json::from_slice(bytes)
            .map_err(|e| invalid(format!("snapshot manifest: {e}")))?;
        if manifest.version != MANIFEST_VERSION {
            return Err(invalid(format!(
                "snapshot manifest version {} is not {MANIFEST_VERSION}",
                manifest.version
            )));
        }
        for file in &manifest.files {
            checked_name(&file.name)?;
        }
        Ok(manifest)
    }

    /// Total bytes of the snapshot's files.
    pub fn bytes(&self) -> u64 {
        self.files.iter().map(|f| f.bytes).sum()
    }
}

/// A snapshot on disk: a directory with `db/` and `manifest.json`.
#[derive(Debug, Clone)]
pub struct SnapshotDir {
    /// The directory.
    pub dir: PathBuf,
    /// Its manifest.
    pub manifest: Manifest,
    /// Shared by every copy of this handle (the state machine's current
    /// snapshot, a sender streaming it to a follower): once the snapshot is
    /// replaced by a newer one, its directory goes with the last copy, not
    /// while a transfer still reads it.
    lifetime: Arc<SnapshotLifetime>,
}

/// Removes a retired snapshot's directory when the last handle goes.
#[derive(Debug)]
struct SnapshotLifetime {
    dir: PathBuf,
    retired: std::sync::atomic::AtomicBool,
}

impl Drop for SnapshotLifetime {
    fn drop(&mut self) {
        if self.retired.load(std::sync::atomic::Ordering::SeqCst)
            && let Err(e) = std::fs::remove_dir_all(&self.dir)
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(dir = %self.dir.display(), error = %e, "cannot remove an old snapshot");
        }
    }
}

impl SnapshotDir {
    /// A handle on the snapshot in `dir`.
    pub fn new(dir: PathBuf, manifest: Manifest) -> Self {
        Self {
            lifetime: Arc::new(SnapshotLifetime {
                dir: dir.clone(),
                retired: std::sync::atomic::AtomicBool::new(false),
            }),
            dir,
            manifest,
        }
    }

    /// Marks the snapshot for removal once no handle on it is left.
    fn retire(&self) {
        self.lifetime
            .retired
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// The checkpoint directory.
    pub fn db_dir(&self) -> PathBuf {
        self.dir.join("db")
    }

    /// Loads a snapshot directory and checks every file against the
    /// manifest (size and crc32).
    pub fn load_verified(dir: &Path) -> io::Result<SnapshotDir> {
        let manifest = Manifest::decode(&std::fs::read(dir.join(MANIFEST_FILE))?)
            .map_err(|e| invalid(format!("{}: {e}", dir.display())))?;
        let snapshot = SnapshotDir::new(dir.to_path_buf(), manifest);
        for file in &snapshot.manifest.files {
            let path = snapshot.db_dir().join(checked_name(&file.name)?);
            if file_size_and_crc(&path)? != (file.bytes, file.crc32) {
                return Err(invalid(format!(
                    "snapshot file {} does not match its manifest",
                    path.display()
                )));
            }
        }
        Ok(snapshot)
    }
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

/// A file name from a manifest (maybe from the network): one plain path
/// component, so it cannot escape the snapshot directory.
pub fn checked_name(name: &str) -> io::Result<&str> {
    let plain = !name.is_empty()
        && name.len() <= 255
        && name != "."
        && name != ".."
        && !name.contains('/')
        && !name.contains('\0');
    if plain {
        Ok(name)
    } else {
        Err(invalid(format!("bad snapshot file name {name:?}")))
    }
}

fn engine_io(error: EngineError) -> io::Error {
    io::Error::other(error.to_string())
}

struct Shared {
    group: GroupId,
    dir: PathBuf,
    options: StoreOptions,
    store: ArcSwap<StateStore>,
    generation: Mutex<u64>,
    applied: Mutex<(Option<LogId>, StoredMembership)>,
    /// See [`StateMachine::leader_time_us`]. Only apply (one task) and an
    /// install (which excludes apply) change it.
    leader_time_us: std::sync::atomic::AtomicI64,
    snapshot: Mutex<Option<SnapshotDir>>,
    observer: Arc<dyn ApplyObserver>,
    /// The cluster map as of the last applied entry (metadata group; `None`
    /// before it is bootstrapped, and always in shard groups).
    map: tokio::sync::watch::Sender<Option<Arc<ClusterMap>>>,
    /// The shard's range, as of the last applied entry.
    range: Mutex<Option<RangeDesc>>,
    /// Who creates split children's replicas.
    split_handler: Mutex<Option<Arc<dyn SplitHandler>>>,
    /// Held shared while a snapshot is built from the live store, exclusive
    /// while an install swaps the store and deletes the old one.
    swap: parking_lot::RwLock<()>,
}

/// The state machine of one group replica. Cheap to clone; the node keeps a
/// clone to read the store.
#[derive(Clone)]
pub struct StateMachine {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for StateMachine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateMachine")
            .field("group", &self.shared.group)
            .field("dir", &self.shared.dir)
            .finish_non_exhaustive()
    }
}

impl StateMachine {
    /// Opens the state of `group` in `dir`.
    pub fn open(
        group: GroupId,
        dir: impl AsRef<Path>,
        options: StoreOptions,
        observer: Arc<dyn ApplyObserver>,
    ) -> io::Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        std::fs::create_dir_all(dir.join(SNAPSHOTS_DIR))?;
        let generation = match std::fs::read_to_string(dir.join(CURRENT_DB_FILE)) {
            Ok(text) => text
                .trim()
                .strip_prefix("db-")
                .and_then(|g| g.parse().ok())
                .ok_or_else(|| invalid(format!("{}: bad {CURRENT_DB_FILE}", dir.display())))?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                write_current(&dir, 0)?;
                0
            }
            Err(e) => return Err(e),
        };
        let store =
            StateStore::open(db_path(&dir, generation), options.clone()).map_err(engine_io)?;
        let applied = read_applied(&store)?;
        let leader_time_us = read_leader_time(&store)?;
        let map = read_map(&store)?;
        let range = read_range(&store)?;
        remove_stale_dirs(&dir, generation);
        let snapshot = latest_snapshot(&dir.join(SNAPSHOTS_DIR));
        Ok(Self {
            shared: Arc::new(Shared {
                group,
                dir,
                options,
                store: ArcSwap::from_pointee(store),
                generation: Mutex::new(generation),
                applied: Mutex::new(applied),
                leader_time_us: std::sync::atomic::AtomicI64::new(leader_time_us),
                snapshot: Mutex::new(snapshot),
                observer,
                map: tokio::sync::watch::Sender::new(map),
                range: Mutex::new(range),
                split_handler: Mutex::new(None),
                swap: parking_lot::RwLock::new(()),
            }),
        })
    }

    /// The live store (reads go here).
    pub fn store(&self) -> Arc<StateStore> {
        self.shared.store.load_full()
    }

    /// The last applied log id.
    pub fn applied(&self) -> Option<LogId> {
        self.shared.applied.lock().0
    }

    /// The shard's leader time: the largest leader clock reading stamped
    /// on any applied entry (µs; 0 before the first). It never goes back,
    /// also across leader changes to a node with a slower clock: an entry
    /// stamped below it is applied at it. It is a function of the log alone,
    /// the same on every replica, and it is the time each entry counts as
    /// written at (rows' write time, tombstones, ttl expiry floors, and the
    /// cut of a point-in-time restore).
    pub fn leader_time_us(&self) -> i64 {
        self.shared
            .leader_time_us
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The cluster map as of the last applied entry, and its changes
    /// (metadata group).
    pub fn watch_map(&self) -> tokio::sync::watch::Receiver<Option<Arc<ClusterMap>>> {
        self.shared.map.subscribe()
    }

    /// The cluster map as of the last applied entry.
    pub fn cluster_map(&self) -> Option<Arc<ClusterMap>> {
        self.shared.map.borrow().clone()
    }

    /// The shard's range as its log decided it (`None`: it never split, and
    /// owns what the map routes to it).
    pub fn range(&self) -> Option<RangeDesc> {
        self.shared.range.lock().clone()
    }

    /// Whether the shard owns the key `hash` as of the last applied entry.
    pub fn owns(&self, hash: u64) -> bool {
        self.shared
            .range
            .lock()
            .as_ref()
            .is_none_or(|range| range.contains(hash))
    }

    /// Sets who creates this replica's split children.
    pub fn set_split_handler(&self, handler: Arc<dyn SplitHandler>) {
        *self.shared.split_handler.lock() = Some(handler);
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// Flushes the live store (graceful shutdown).
    pub fn flush(&self) -> io::Result<()> {
        self.store().flush().map_err(engine_io)
    }

    /// Applies committed entries in log order, recording each one's log id
    /// and the membership in the same RocksDB batch as its data, and returns
    /// what each one answers (what `apply` hands openraft's responders).
    /// Blocks on RocksDB: call it off the async workers.
    pub fn apply_entries(&self, entries: Vec<Entry>) -> io::Result<Vec<Response>> {
        let mut responses = Vec::with_capacity(entries.len());
        for entry in entries {
            let log_id = entry.log_id;
            let mut membership = self.shared.applied.lock().1.clone();
            let command = match entry.payload {
                EntryPayload::Blank => None,
                EntryPayload::Normal(command) => Some(command),
                EntryPayload::Membership(m) => {
                    membership = StoredMembership::new(Some(log_id), m);
                    None
                }
            };
            let meta = encode_applied(&Some(log_id), &membership)?;
            let response = match command {
                Some(proposal) => self.apply_proposal(log_id, proposal, &meta)?,
                None => {
                    self.store()
                        .put_meta(&[(APPLIED_KEY, Some(meta.as_slice()))])
                        .map_err(engine_io)?;
                    Response::Empty
                }
            };
            *self.shared.applied.lock() = (Some(log_id), membership);
            responses.push(response);
        }
        Ok(responses)
    }

    fn apply_proposal(
        &self,
        log_id: LogId,
        proposal: Proposal,
        meta: &[u8],
    ) -> io::Result<Response> {
        let store = self.store();
        let Proposal {
            request_id,
            leader_ts_us: stamped_us,
            command,
        } = proposal;
        // The entry's time: its leader's clock, or the shard's leader time
        // if that clock is behind it (a new leader with a slower clock).
        let previous_us = self.leader_time_us();
        let leader_ts_us = stamped_us.max(previous_us);
        let time_bytes = leader_ts_us.to_be_bytes();
        let time_put =
            (leader_ts_us > previous_us).then_some((LEADER_TIME_KEY, Some(&time_bytes[..])));
        let request_key = [REQUEST_PREFIX, &request_id.to_be_bytes()[..]].concat();
        if request_id != 0
            && let Some(outcome) = store.get_meta(&request_key).map_err(engine_io)?
        {
            let mut ops = vec![(APPLIED_KEY, Some(meta))];
            ops.extend(time_put);
            store.put_meta(&ops).map_err(engine_io)?;
            self.set_leader_time(leader_ts_us);
            // A retry gets the first attempt's refusal again; a retry of
            // something that was done is told it was.
            return Ok(if outcome.is_empty() {
                Response::AlreadyApplied
            } else {
                postcard::from_bytes(&outcome)
                    .map_err(|e| invalid(format!("request {request_id:x}: stored outcome: {e}")))?
            });
        }
        // Keys a split gave away are refused, and the refusal is not kept
        // against the request id: the router retries it on the shard that
        // owns them now.
        if let Some(refusal) = self.wrong_shard(&command) {
            let mut ops = vec![(APPLIED_KEY, Some(meta))];
            ops.extend(time_put);
            store.put_meta(&ops).map_err(engine_io)?;
            self.set_leader_time(leader_ts_us);
            return Ok(refusal);
        }
        let slot_key = [
            REQUEST_SLOT_PREFIX,
            &(log_id.index % REQUEST_IDS_KEPT).to_be_bytes()[..],
        ]
        .concat();
        // Entries without an id (blank, internal) touch no dedup state.
        let evicted = if request_id == 0 {
            None
        } else {
            store
                .get_meta(&slot_key)
                .map_err(engine_io)?
                .map(|old| [REQUEST_PREFIX, old.as_slice()].concat())
        };
        let id_bytes = request_id.to_be_bytes();
        let mut ops: Vec<(&[u8], Option<&[u8]>)> = vec![(APPLIED_KEY, Some(meta))];
        ops.extend(time_put);
        if request_id != 0 {
            if let Some(evicted) = &evicted {
                ops.push((evicted.as_slice(), None));
            }
            ops.push((request_key.as_slice(), Some(&[][..])));
            ops.push((slot_key.as_slice(), Some(&id_bytes[..])));
        }
        let meta_puts = ops.as_slice();
        let response = match command {
            Command::Write { view_id, rows } => {
                let outcome = store
                    .write_rows_at(view_id, &rows, leader_ts_us, meta_puts)
                    .map_err(engine_io)?;
                self.shared.observer.keys_changed(&outcome.changed_keys);
                Response::Written {
                    rows_applied: outcome.rows_applied,
                    rows_stale: outcome.rows_stale,
                }
            }
            Command::Delete {
                view_id,
                entity_keys,
            } => {
                let deleted = store
                    .delete_rows_with(view_id, &entity_keys, leader_ts_us, meta_puts)
                    .map_err(engine_io)?;
                self.shared.observer.keys_changed(&deleted);
                Response::Deleted {
                    rows_deleted: deleted.len() as u64,
                }
            }
            Command::Invalidate {
                view_id,
                entity_keys,
            } => {
                store.put_meta(meta_puts).map_err(engine_io)?;
                let entries_dropped = if entity_keys.is_empty() {
                    self.shared.observer.view_invalidated(view_id)
                } else {
                    let keys: Vec<Vec<u8>> = entity_keys
                        .iter()
                        .map(|k| quiver_engine::keys::storage_key(view_id, k.as_bytes()))
                        .collect();
                    self.shared.observer.keys_changed(&keys)
                };
                Response::Invalidated { entries_dropped }
            }
            Command::ApplyView { spec } => match store.apply_view_with(spec, meta_puts) {
                Ok((view, changed)) => Response::ViewApplied {
                    view: Box::new((*view).clone()),
                    changed,
                },
                Err(error) => self.reject(error, meta_puts)?,
            },
            Command::Expire { retention } => {
                // The floor is the shard leader's clock (stamped on this
                // entry) minus the retention: the proposer's clock plays no
                // part. Cached rows need no invalidation: the read path
                // checks the floor on every cache hit.
                let floors: Vec<(u32, i64)> = retention
                    .iter()
                    .map(|&(view_id, retention_us)| {
                        (view_id, leader_ts_us.saturating_sub(retention_us.max(0)))
                    })
                    .collect();
                let moved = store
                    .advance_expiry(&floors, meta_puts)
                    .map_err(engine_io)?;
                Response::Expired {
                    views_advanced: moved.len() as u64,
                }
            }
            Command::Map(command) => self.apply_map(command, leader_ts_us, meta_puts)?,
            Command::Split {
                child,
                at,
                start,
                end,
                version,
            } => self.apply_split(
                log_id,
                SplitAt {
                    child,
                    at,
                    start,
                    end,
                    version,
                },
                leader_ts_us,
                meta_puts,
            )?,
            Command::DeleteView { name } => match store.delete_view_with(&name, meta_puts) {
                Ok(view) => {
                    self.shared.observer.view_invalidated(view.id);
                    Response::ViewDeleted
                }
                Err(error) => self.reject(error, meta_puts)?,
            },
        };
        // Written with the entry's batch (or refused with it): it holds now.
        self.set_leader_time(leader_ts_us);
        tracing::trace!(group = self.shared.group, %log_id, "applied");
        Ok(response)
    }

    fn set_leader_time(&self, leader_ts_us: i64) {
        self.shared
            .leader_time_us
            .fetch_max(leader_ts_us, std::sync::atomic::Ordering::SeqCst);
    }

    fn build(&self) -> io::Result<SnapshotDir> {
        let _no_swap = self.shared.swap.read();
        let store = self.store();
        let snapshots = self.shared.dir.join(SNAPSHOTS_DIR);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        // Removed if anything below fails; kept once renamed into place.
        let staging = StagingDir::create(snapshots.join(format!("building-{nanos}")))?;
        let applied_bytes = store
            .checkpoint_with_meta(&staging.path().join("db"), APPLIED_KEY)
            .map_err(engine_io)?;
        let (last_log_id, membership) = decode_applied(applied_bytes.as_deref())?;
        let snapshot_id = match last_log_id {
            Some(id) => format!("{}-{}-{nanos}", id.leader_id.term, id.index),
            None => format!("empty-{nanos}"),
        };
        let files = describe_files(&staging.path().join("db"))?;
        let manifest = Manifest {
            version: MANIFEST_VERSION,
            group: self.shared.group,
            snapshot_id: snapshot_id.clone(),
            meta: SnapshotMeta {
                last_log_id,
                last_membership: membership,
            },
            files,
        };
        write_manifest(staging.path(), &manifest)?;
        let final_dir = snapshots.join(&snapshot_id);
        std::fs::rename(staging.path(), &final_dir)?;
        staging.keep();
        sync_dir(&snapshots)?;
        let snapshot = SnapshotDir::new(final_dir, manifest);
        self.replace_current_snapshot(snapshot.clone());
        tracing::info!(group = self.shared.group, id = %snapshot_id, bytes = snapshot.manifest.bytes(), "snapshot built");
        Ok(snapshot)
    }

    /// Makes `snapshot` the current one and deletes the older ones.
    fn replace_current_snapshot(&self, snapshot: SnapshotDir) {
        let mut current = self.shared.snapshot.lock();
        let newer = current
            .as_ref()
            .is_none_or(|c| c.manifest.meta.last_log_id <= snapshot.manifest.meta.last_log_id);
        if !newer {
            snapshot.retire();
            return;
        }
        if let Some(old) = current.replace(snapshot)
            && current.as_ref().is_some_and(|c| c.dir != old.dir)
        {
            // Removed when the last transfer reading it is done.
            old.retire();
        }
    }

    fn install(&self, meta: &SnapshotMeta, snapshot: SnapshotDir) -> io::Result<()> {
        // Keep our own copy (hard links) as the current snapshot: it serves
        // the next lagging follower and survives the sender's cleanup.
        let snapshots = self.shared.dir.join(SNAPSHOTS_DIR);
        let own_dir = snapshots.join(&snapshot.manifest.snapshot_id);
        if own_dir != snapshot.dir {
            let _ = std::fs::remove_dir_all(&own_dir);
            let staging = StagingDir::create(
                snapshots.join(format!("installing-{}", snapshot.manifest.snapshot_id)),
            )?;
            let staged_db = staging.path().join("db");
            std::fs::create_dir_all(&staged_db)?;
            for file in &snapshot.manifest.files {
                let name = checked_name(&file.name)?;
                link_or_copy(&snapshot.db_dir().join(name), &staged_db.join(name))?;
            }
            write_manifest(staging.path(), &snapshot.manifest)?;
            std::fs::rename(staging.path(), &own_dir)?;
            staging.keep();
            sync_dir(&snapshots)?;
        }
        let own = SnapshotDir::new(
            own_dir,
            Manifest {
                meta: meta.clone(),
                ..snapshot.manifest.clone()
            },
        );

        // A new live db from the snapshot: table files are immutable, so
        // hard links do; the rest RocksDB rewrites in place, so copy.
        let next_generation = *self.shared.generation.lock() + 1;
        let next_db = db_path(&self.shared.dir, next_generation);
        let _ = std::fs::remove_dir_all(&next_db);
        std::fs::create_dir_all(&next_db)?;
        for file in &own.manifest.files {
            let name = checked_name(&file.name)?;
            let from = own.db_dir().join(name);
            let to = next_db.join(name);
            if name.ends_with(".sst") {
                link_or_copy(&from, &to)?;
            } else {
                std::fs::copy(&from, &to)?;
                // CURRENT_DB will point here and the log gets purged: every
                // byte must be on disk first.
                std::fs::File::open(&to)?.sync_all()?;
            }
        }
        sync_dir(&next_db)?;
        let store = StateStore::open(&next_db, self.shared.options.clone()).map_err(engine_io)?;
        let leader_time_us = read_leader_time(&store)?;
        let map = read_map(&store)?;
        let range = read_range(&store)?;
        // The checkpoint holds the applied position its data corresponds to;
        // record what openraft installed, in case they differ in form.
        let meta_bytes = encode_applied(&meta.last_log_id, &meta.last_membership)?;
        store
            .put_meta(&[(APPLIED_KEY, Some(meta_bytes.as_slice()))])
            .map_err(engine_io)?;
        let _exclusive = self.shared.swap.write();
        write_current(&self.shared.dir, next_generation)?;
        let old_generation = {
            let mut generation = self.shared.generation.lock();
            std::mem::replace(&mut *generation, next_generation)
        };
        self.shared.store.store(Arc::new(store));
        *self.shared.applied.lock() = (meta.last_log_id, meta.last_membership.clone());
        // The snapshot's, not the max with ours: an install replaces the
        // state, and the time is part of it.
        self.shared
            .leader_time_us
            .store(leader_time_us, std::sync::atomic::Ordering::SeqCst);
        self.shared.map.send_replace(map);
        *self.shared.range.lock() = range;
        self.shared.observer.store_replaced();
        self.replace_current_snapshot(own);
        // Readers may still hold the old store for a moment; RocksDB keeps
        // its open files readable after the unlink.
        let _ = std::fs::remove_dir_all(db_path(&self.shared.dir, old_generation));
        tracing::info!(
            group = self.shared.group,
            last_log_id = ?meta.last_log_id,
            "snapshot installed"
        );
        Ok(())
    }
}

impl StateMachine {
    /// Applies a cluster-map command: the new map is written in the entry's
    /// batch and published; a refusal is recorded like any other.
    fn apply_map(
        &self,
        command: MapCommand,
        leader_ts_us: i64,
        meta_puts: quiver_engine::store::MetaPuts<'_>,
    ) -> io::Result<Response> {
        let current = self.cluster_map();
        let result = if self.shared.group != METADATA_GROUP {
            Err(MapError::Invalid(
                "cluster-map commands belong to the metadata group".into(),
            ))
        } else {
            match (current, command) {
                (None, MapCommand::Bootstrap(map)) => map.check().map(|()| {
                    let version = map.version;
                    (*map, MapOutcome::Changed { version })
                }),
                (None, _) => Err(MapError::NotFound(
                    "the cluster map is not bootstrapped yet".into(),
                )),
                (Some(map), command) => {
                    let mut next = (*map).clone();
                    next.apply(command, leader_ts_us)
                        .map(|outcome| (next, outcome))
                }
            }
        };
        match result {
            Ok((next, outcome)) => {
                let bytes = next.encode().map_err(io::Error::other)?;
                let response = Response::Map(outcome);
                // A retry of this request id is answered with this outcome
                // (the node id a join got, the operator a move started), not
                // with a bare "already applied".
                let recorded = postcard::to_stdvec(&response).map_err(io::Error::other)?;
                let mut puts: Vec<(&[u8], Option<&[u8]>)> = meta_puts
                    .iter()
                    .map(|&(key, value)| {
                        if key.starts_with(REQUEST_PREFIX) && value.is_some() {
                            (key, Some(recorded.as_slice()))
                        } else {
                            (key, value)
                        }
                    })
                    .collect();
                puts.push((MAP_KEY, Some(bytes.as_slice())));
                self.store().put_meta(&puts).map_err(engine_io)?;
                self.shared.map.send_replace(Some(Arc::new(next)));
                Ok(response)
            }
            Err(error) => {
                let kind = match &error {
                    MapError::NotFound(_) => RejectKind::NotFound,
                    MapError::Conflict(_) => RejectKind::Conflict,
                    MapError::Invalid(_) => RejectKind::Invalid,
                };
                self.refuse(
                    Response::Rejected {
                        kind,
                        message: error.to_string(),
                    },
                    meta_puts,
                )
            }
        }
    }

    /// A command the store refused deterministically still counts as applied:
    /// its log position is recorded, and its request id with the refusal
    /// itself (so a retry is answered with the same refusal, not judged
    /// again, and never with "done"), and the refusal is the response.
    fn reject(
        &self,
        error: EngineError,
        meta_puts: quiver_engine::store::MetaPuts<'_>,
    ) -> io::Result<Response> {
        self.refuse(rejection(error)?, meta_puts)
    }

    /// Records `response` (a refusal) as the outcome of the entry's request
    /// id, with the entry's position.
    fn refuse(
        &self,
        response: Response,
        meta_puts: quiver_engine::store::MetaPuts<'_>,
    ) -> io::Result<Response> {
        let outcome = postcard::to_stdvec(&response).map_err(io::Error::other)?;
        let puts: Vec<(&[u8], Option<&[u8]>)> = meta_puts
            .iter()
            .map(|&(key, value)| {
                if key.starts_with(REQUEST_PREFIX) {
                    (key, Some(outcome.as_slice()))
                } else {
                    (key, value)
                }
            })
            .collect();
        self.store().put_meta(&puts).map_err(engine_io)?;
        Ok(response)
    }
}

fn rejection(error: EngineError) -> io::Result<Response> {
    let kind = match &error {
        EngineError::View(quiver_engine::ViewError::IncompatibleChange { .. }) => {
            RejectKind::Conflict
        }
        EngineError::View(_) => RejectKind::Invalid,
        EngineError::UnknownView(_) => RejectKind::NotFound,
        EngineError::RegistryFull(_) => RejectKind::LimitExceeded,
        // Storage failures are not a deterministic refusal: the replica
        // cannot go on applying.
        _ => return Err(engine_io(error)),
    };
    Ok(Response::Rejected {
        kind,
        message: error.to_string(),
    })
}

fn db_path(dir: &Path, generation: u64) -> PathBuf {
    dir.join(format!("db-{generation}"))
}

fn write_current(dir: &Path, generation: u64) -> io::Result<()> {
    write_atomic(
        &dir.join(CURRENT_DB_FILE),
        format!("db-{generation}\n").as_bytes(),
    )
}

/// Deletes db-* directories other than the live one and unfinished snapshot
/// work (a crash during install or build).
fn remove_stale_dirs(dir: &Path, generation: u64) {
    let live = format!("db-{generation}");
    let entries = std::fs::read_dir(dir).into_iter().flatten().flatten();
    for entry in entries {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("db-") && name != live {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    let snapshots = std::fs::read_dir(dir.join(SNAPSHOTS_DIR))
        .into_iter()
        .flatten()
        .flatten();
    for entry in snapshots {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("building-") || name.starts_with("installing-") {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    // Snapshots received from a leader but never installed.
    let _ = std::fs::remove_dir_all(dir.join("incoming"));
}

/// The newest complete snapshot in `dir` (complete = its manifest exists and
/// parses; the receiver of a sent snapshot checks every file against it).
fn latest_snapshot(dir: &Path) -> Option<SnapshotDir> {
    let mut best: Option<SnapshotDir> = None;
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let Ok(bytes) = std::fs::read(entry.path().join(MANIFEST_FILE)) else {
            continue;
        };
        let Ok(manifest) = Manifest::decode(&bytes) else {
            continue;
        };
        let candidate = SnapshotDir::new(entry.path(), manifest);
        if best
            .as_ref()
            .is_none_or(|b| b.manifest.meta.last_log_id < candidate.manifest.meta.last_log_id)
        {
            best = Some(candidate);
        }
    }
    best
}

/// Size and crc32 of a file, read in 1 MiB pieces: table files can be far
/// larger than what a snapshot should hold in memory.
fn file_size_and_crc(path: &Path) -> io::Result<(u64, u32)> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut hasher = crc32fast::Hasher::new();
    let mut buffer = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    loop {
        let n = file.read(&mut buffer)?;
        if n == 0 {
            return Ok((bytes, hasher.finalize()));
        }
        hasher.update(&buffer[..n]);
        bytes += n as u64;
    }
}

fn describe_files(db_dir: &Path) -> io::Result<Vec<SnapshotFile>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(db_dir)? {
        let entry = entry?;
        if !entry.file_type()?.is_file() {
            continue;
        }
        let name = entry.file_name().to_string_lossy().into_owned();
        let (bytes, crc32) = file_size_and_crc(&entry.path())?;
        files.push(SnapshotFile { name, bytes, crc32 });
    }
    files.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(files)
}

/// Writes `manifest.json` durably (it marks the snapshot complete).
pub fn write_manifest(dir: &Path, manifest: &Manifest) -> io::Result<()> {
    let bytes = serde_json::to_vec_pretty(manifest).map_err(io::Error::other)?;
    write_atomic(&dir.join(MANIFEST_FILE), &bytes)
}

fn link_or_copy(from: &Path, to: &Path) -> io::Result<()> {
    if std::fs::hard_link(from, to).is_err() {
        std::fs::copy(from, to)?;
        std::fs::File::open(to)?.sync_all()?;
    }
    Ok(())
}

fn encode_applied(log_id: &Option<LogId>, membership: &StoredMembership) -> io::Result<Vec<u8>> {
    postcard::to_stdvec(&(log_id, membership)).map_err(io::Error::other)
}

fn decode_applied(bytes: Option<&[u8]>) -> io::Result<(Option<LogId>, StoredMembership)> {
    match bytes {
        None => Ok((None, StoredMembership::default())),
        Some(bytes) => {
            postcard::from_bytes(bytes).map_err(|e| invalid(format!("applied state record: {e}")))
        }
    }
}

/// The stored leader time; a record of the wrong size is corruption.
fn read_leader_time(store: &StateStore) -> io::Result<i64> {
    match store.get_meta(LEADER_TIME_KEY).map_err(engine_io)? {
        None => Ok(0),
        Some(bytes) => <[u8; 8]>::try_from(bytes.as_slice())
            .map(i64::from_be_bytes)
            .map_err(|_| invalid(format!("leader time record of {} bytes", bytes.len()))),
    }
}

/// The stored shard range; an undecodable one is corruption.
fn read_range(store: &StateStore) -> io::Result<Option<RangeDesc>> {
    match store.get_meta(RANGE_KEY).map_err(engine_io)? {
        None => Ok(None),
        Some(bytes) => postcard::from_bytes(&bytes)
            .map(Some)
            .map_err(|e| invalid(format!("stored shard range: {e}"))),
    }
}

/// The stored cluster map, checked; an undecodable one is corruption.
fn read_map(store: &StateStore) -> io::Result<Option<Arc<ClusterMap>>> {
    match store.get_meta(MAP_KEY).map_err(engine_io)? {
        None => Ok(None),
        Some(bytes) => ClusterMap::decode(&bytes)
            .map(|map| Some(Arc::new(map)))
            .map_err(|e| invalid(format!("stored cluster map: {e}"))),
    }
}

fn read_applied(store: &StateStore) -> io::Result<(Option<LogId>, StoredMembership)> {
    let bytes = store.get_meta(APPLIED_KEY).map_err(engine_io)?;
    decode_applied(bytes.as_deref())
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    type SnapshotData = SnapshotDir;

    async fn build_snapshot(&mut self) -> Result<SnapshotOf<TypeConfig, SnapshotDir>, io::Error> {
        let this = self.clone();
        let snapshot = tokio::task::spawn_blocking(move || this.build())
            .await
            .map_err(io::Error::other)??;
        Ok(openraft::Snapshot {
            meta: snapshot.manifest.meta.clone(),
            snapshot,
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotData = SnapshotDir;
    type SnapshotBuilder = StateMachine;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), io::Error> {
        Ok(self.shared.applied.lock().clone())
    }

    async fn apply<S>(&mut self, mut entries: S) -> Result<(), io::Error>
    where
        S: Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>> + Unpin + Send,
    {
        while let Some(first) = entries.try_next().await? {
            // Entries already delivered go to the blocking pool together: one
            // thread handoff per batch, not per entry.
            let mut batch = vec![first];
            let mut failed = None;
            while batch.len() < APPLY_BATCH_ENTRIES_MAX {
                match entries.try_next().now_or_never() {
                    Some(Ok(Some(item))) => batch.push(item),
                    Some(Err(e)) => {
                        failed = Some(e);
                        break;
                    }
                    Some(Ok(None)) | None => break,
                }
            }
            let (batch, responders): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
            let this = self.clone();
            // RocksDB calls block; keep them off the async workers.
            let responses = tokio::task::spawn_blocking(move || this.apply_entries(batch))
                .await
                .map_err(io::Error::other)??;
            for (responder, response) in responders.into_iter().zip(responses) {
                if let Some(responder) = responder {
                    responder.send(response);
                }
            }
            if let Some(e) = failed {
                return Err(e);
            }
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: SnapshotDir,
    ) -> Result<(), io::Error> {
        let this = self.clone();
        let meta = meta.clone();
        tokio::task::spawn_blocking(move || this.install(&meta, snapshot))
            .await
            .map_err(io::Error::other)?
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<SnapshotOf<TypeConfig, SnapshotDir>>, io::Error> {
        Ok(self
            .shared
            .snapshot
            .lock()
            .clone()
            .map(|snapshot| openraft::Snapshot {
                meta: snapshot.manifest.meta.clone(),
                snapshot,
            }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn manifest_json() -> Vec<u8> {
        let manifest = Manifest {
            version: MANIFEST_VERSION,
            group: 3,
            snapshot_id: "1-20-17000".into(),
            meta: SnapshotMeta::default(),
            files: vec![
                SnapshotFile {
                    name: "000012.sst".into(),
                    bytes: 4096,
                    crc32: 7,
                },
                SnapshotFile {
                    name: "MANIFEST-000005".into(),
                    bytes: 300,
                    crc32: 9,
                },
            ],
        };
        serde_json::to_vec(&manifest).unwrap()
    }

    #[test]
    fn a_manifest_decodes_and_escaping_names_or_other_versions_are_refused() {
        let json = manifest_json();
        assert_eq!(Manifest::decode(&json).unwrap().files.len(), 2);
        let text = String::from_utf8(json).unwrap();
        for broken in [
            text.replace("000012.sst", "../../etc/passwd"),
            text.replace("000012.sst", ""),
            text.replace("\"version\":1", "\"version\":2"),
        ] {
            assert_ne!(broken, text);
            assert!(Manifest::decode(broken.as_bytes()).is_err(), "{broken}");
        }
    }

    proptest! {
        /// A manifest read from disk may be anything (torn, corrupt): a
        /// typed error or a manifest whose every file name is plain.
        #[test]
        fn arbitrary_bytes_never_panic_the_manifest_decoder(
            bytes in proptest::collection::vec(any::<u8>(), 0..600)
        ) {
            if let Ok(manifest) = Manifest::decode(&bytes) {
                prop_assert!(manifest.files.iter().all(|f| checked_name(&f.name).is_ok()));
            }
        }

        #[test]
        fn mutated_manifests_never_panic_the_decoder(
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..4),
            cut in any::<usize>(),
        ) {
            let mut bytes = manifest_json();
            for (at, value) in flips {
                let len = bytes.len();
                bytes[at % len] = value;
            }
            let keep = cut % (bytes.len() + 1);
            for candidate in [&bytes[..], &bytes[..keep]] {
                if let Ok(manifest) = Manifest::decode(candidate) {
                    prop_assert!(manifest.files.iter().all(|f| checked_name(&f.name).is_ok()));
                }
            }
        }
    }
}
