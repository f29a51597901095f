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
use quiver_engine::durable::write_atomic;
use quiver_engine::error::EngineError;
use quiver_engine::keys::ViewId;
use quiver_engine::{StateStore, StoreOptions};
use serde::{Deserialize, Serialize};

mod apply;
mod metadata;
mod snapshot;
mod split;

use snapshot::latest_snapshot;
pub use snapshot::{Manifest, SnapshotDir, SnapshotFile, checked_name, write_manifest};
use split::SplitAt;
pub use split::child_seed;

use crate::cluster_map::ClusterMap;
use crate::types::{
    Command, Entry, GroupId, LogId, Proposal, RejectKind, ReplicaId, Response, SnapshotMeta,
    StoredMembership, TypeConfig,
};

pub(crate) const APPLIED_KEY: &[u8] = b"raft/applied";
/// The cluster map (metadata group only), written in the batch of the entry
/// that changed it.
const MAP_KEY: &[u8] = b"cluster/map";
/// The shard's range ([`RangeDesc`]), written by its first split (a shard
/// that never split owns whatever the map routes to it).
pub(crate) const RANGE_KEY: &[u8] = b"shard/range";
/// The shard's leader time (µs, big-endian i64): the largest leader time of
/// any applied entry. Written in the batch of the entry that raised it, so
/// checkpoints and snapshots carry it with the applied position.
pub(crate) const LEADER_TIME_KEY: &[u8] = b"raft/leader_time";
/// Change-stream consumers' log holds (postcard `BTreeMap<name, index>`),
/// written in the batch of the entry that changed them.
const LOG_HOLDS_KEY: &[u8] = b"raft/log_holds";
/// The cluster's id (metadata group only, 16 hex digits): drawn from the
/// bootstrap entry's log id and leader time when the map is bootstrapped,
/// so every replica agrees and two clusters (a restored one and its
/// source) differ. Names the cluster's shipped logs in a backup target.
pub(crate) const CLUSTER_ID_KEY: &[u8] = b"cluster/id";
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

/// Change-stream consumers and the last log index each confirmed.
pub type LogHolds = std::collections::BTreeMap<String, u64>;

/// One replica's content at one applied position
/// ([`StateMachine::replica_content`]).
#[derive(Debug, Clone)]
pub struct ReplicaDigest {
    /// The last entry applied in the content.
    pub applied: Option<LogId>,
    /// The range and the digests inside and outside it.
    pub content: quiver_engine::store::ReplicaContent,
}

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
    /// replica of `child`; `None` if this node hosted the child under this
    /// id (or a later one) before: a replay after it moved away must not
    /// build it again. A child built but never hosted (a crash in between)
    /// is built again by the replay.
    fn prepare_child(&self, child: GroupId) -> io::Result<Option<PathBuf>>;
    /// This node's replica of the splitting shard (and so of its child).
    fn replica(&self) -> ReplicaId;
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

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
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
    /// Change-stream consumers' confirmed indexes, as of the last applied
    /// entry.
    log_holds: Mutex<LogHolds>,
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
        let log_holds = read_log_holds(&store)?;
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
                log_holds: Mutex::new(log_holds),
                swap: parking_lot::RwLock::new(()),
            }),
        })
    }

    /// The cluster's id, as the metadata group's bootstrap decided it
    /// (`None` in shard groups and before the bootstrap).
    pub fn cluster_id(&self) -> io::Result<Option<String>> {
        match self.store().get_meta(CLUSTER_ID_KEY).map_err(engine_io)? {
            None => Ok(None),
            Some(bytes) => String::from_utf8(bytes)
                .map(Some)
                .map_err(|_| invalid("stored cluster id is not UTF-8".into())),
        }
    }

    /// The live store (reads go here).
    pub fn store(&self) -> Arc<StateStore> {
        self.shared.store.load_full()
    }

    /// The last applied log id and the leader time there, read together.
    pub fn applied_position(&self) -> (Option<LogId>, i64) {
        let applied = self.shared.applied.lock();
        (applied.0, self.leader_time_us())
    }

    /// A voter of the last applied membership (a replay picks the replica
    /// it acts as by it).
    pub(crate) fn applied_voter(&self) -> Option<crate::types::ReplicaId> {
        self.shared.applied.lock().1.membership().voter_ids().next()
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

    /// This replica's content at one point (a consistency check between
    /// replicas): its applied log id there, and the digests inside and
    /// outside its range, the range its log decided or, if it never split,
    /// `routed` (what the map routes to it). Blocks on a full scan.
    pub fn replica_content(&self, routed: (u64, Option<u64>)) -> io::Result<ReplicaDigest> {
        let mut applied = None;
        let content = self
            .store()
            .replica_content(&[APPLIED_KEY, RANGE_KEY], |meta| {
                let corrupt = |what: &str, reason: String| EngineError::Corrupt {
                    what: what.into(),
                    reason,
                };
                applied = decode_applied(meta[0].as_deref())
                    .map_err(|e| corrupt("applied state record", e.to_string()))?
                    .0;
                match &meta[1] {
                    None => Ok(routed),
                    Some(bytes) => postcard::from_bytes::<RangeDesc>(bytes)
                        .map(|range| (range.start, range.end))
                        .map_err(|e| corrupt("stored shard range", e.to_string())),
                }
            })
            .map_err(engine_io)?;
        Ok(ReplicaDigest { applied, content })
    }

    /// Whether the shard owns the key `hash` as of the last applied entry.
    pub fn owns(&self, hash: u64) -> bool {
        self.shared
            .range
            .lock()
            .as_ref()
            .is_none_or(|range| range.contains(hash))
    }

    /// Change-stream consumers and the last index each confirmed, as of
    /// the last applied entry (see [`crate::change_stream`]).
    pub fn log_holds(&self) -> LogHolds {
        self.shared.log_holds.lock().clone()
    }

    /// Sets who creates this replica's split children.
    pub fn set_split_handler(&self, handler: Arc<dyn SplitHandler>) {
        *self.shared.split_handler.lock() = Some(handler);
    }

    /// The group this replica belongs to.
    pub fn group(&self) -> GroupId {
        self.shared.group
    }

    /// Takes a consistent checkpoint of the live store into `db_dir` (which
    /// must not exist): between two applied batches, and never across a
    /// snapshot install swapping the store (a backup's copy).
    pub fn checkpoint_store(&self, db_dir: &Path) -> io::Result<()> {
        let _no_swap = self.shared.swap.read();
        self.store()
            .checkpoint_with_meta(db_dir, APPLIED_KEY)
            .map_err(engine_io)?;
        Ok(())
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// Flushes the live store (graceful shutdown).
    pub fn flush(&self) -> io::Result<()> {
        self.store().flush().map_err(engine_io)
    }
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

fn encode_applied(log_id: &Option<LogId>, membership: &StoredMembership) -> io::Result<Vec<u8>> {
    postcard::to_stdvec(&(log_id, membership)).map_err(io::Error::other)
}

pub(crate) fn decode_applied(
    bytes: Option<&[u8]>,
) -> io::Result<(Option<LogId>, StoredMembership)> {
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

/// The stored log holds; an undecodable record is corruption.
fn read_log_holds(store: &StateStore) -> io::Result<LogHolds> {
    match store.get_meta(LOG_HOLDS_KEY).map_err(engine_io)? {
        None => Ok(LogHolds::new()),
        Some(bytes) => {
            postcard::from_bytes(&bytes).map_err(|e| invalid(format!("stored log holds: {e}")))
        }
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

impl crate::log_store::PurgeHold for StateMachine {
    fn held_index(&self) -> Option<u64> {
        self.shared.log_holds.lock().values().copied().min()
    }
}
