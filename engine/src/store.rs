//! The RocksDB state store of one replica: rows in the `data` column family,
//! the feature-view registry in `meta`.
//!
//! Writes apply last-write-wins by event time atomically: the read of the
//! stored event times and the write batch happen under one mutex, so two
//! concurrent writers can never let an older row overwrite a newer one (the
//! race Feast's read-then-write Redis store has). In a replicated shard the
//! state machine is the only writer, so the mutex is uncontended there.
//!
//! The read is skipped for a row at least as new as anything stored under
//! its view and key-hash bucket (`store/newest.rs`): such a row wins
//! whatever is there. The per-view bounds are kept in `meta` with the rows
//! that raise them, and trusted at open only if the store's last write was
//! one of ours (`META_LAST_WRITE_SEQ`); otherwise they are measured again.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;
pub use rocksdb::Cache as BlockCache;
use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamilyDescriptor, DB, DBCompressionType, IteratorMode, Options,
    WriteBatch, WriteOptions,
};

use crate::clock::Clock;
use crate::codec::{self, decode_stored, encode_row_parts, peek_event_ts};
use crate::digest::{ContentDigest, LogicalDigest, content_digest_db, digest_db, hash_range_keys};
use crate::error::{EngineError, Result};
use crate::keys::{ViewId, storage_key};
use crate::registry::{Catalog, Registry, VIEWS_MAX};
use crate::row::{FieldId, StoredRow};
use crate::ttl_filter::{FILTER_NAME, expiry_filter};
use crate::value::Value;
use crate::view::{FeatureView, ViewSpec};
use newest::NewestEvents;

const CF_DATA: &str = "data";
/// Memtable size of the `meta` column family.
const META_WRITE_BUFFER_BYTES: usize = 4 << 20;
const CF_META: &str = "meta";
const META_VIEW_PREFIX: &[u8] = b"view/";
const META_DROPPED_PREFIX: &[u8] = b"dropped/";
const META_NEXT_VIEW_ID: &[u8] = b"next_view_id";
/// `expired_before/<view id>` -> the view's expiry floor (i64, big-endian).
const META_FLOOR_PREFIX: &[u8] = b"expired_before/";
/// `newest_event/<view id>` -> no row or tombstone of the view in this
/// store has a later event time (i64, big-endian). A view without one has
/// no rows here.
const META_NEWEST_PREFIX: &[u8] = b"newest_event/";
/// The RocksDB sequence number the store's last write ended at (u64,
/// big-endian), put in every write batch. At open it must equal the
/// database's: otherwise something that does not keep the `newest_event/`
/// bounds wrote last (a build from before them, or one rolled back to), and
/// the bounds are measured again from the rows.
const META_LAST_WRITE_SEQ: &[u8] = b"last_write_seq";

/// Per view, the event time (µs) below which its rows are expired for good:
/// never served, refused when written, dropped by compaction. It only moves
/// forward, and only through [`StateStore::advance_expiry`], which a
/// replicated shard applies from its log, so every replica agrees on it at
/// every log position. Views without an entry have expired nothing.
pub type ExpiryFloors = HashMap<ViewId, i64>;

/// How a store is opened.
#[derive(Clone)]
pub struct StoreOptions {
    /// fsync the write-ahead log before a write is acknowledged. Off, an
    /// acknowledged write survives a process crash but not a power loss.
    pub sync_writes: bool,
    /// RocksDB block cache size.
    pub block_cache_bytes: usize,
    /// Memtable size per column family.
    pub write_buffer_bytes: usize,
    /// The time source of the unreplicated [`StateStore::write_rows`] and
    /// [`StateStore::delete_rows`] (a replica takes its leader's time from
    /// the log instead).
    pub clock: Arc<dyn Clock>,
    /// A block cache shared with other stores of the node (one per shard
    /// replica), so memory stays bounded however many shards a node holds.
    /// `None`: a private cache of `block_cache_bytes`.
    pub block_cache: Option<Cache>,
    /// The registry the store judges ttl and deleted views by. `None`: a
    /// fresh one. A shard replica shares the node's registry (kept by the
    /// metadata group) instead of keeping views itself.
    pub registry: Option<Registry>,
    /// Load the views stored in this store's `meta` column family into the
    /// registry at open (the store that owns the registry does this).
    pub load_catalog: bool,
}

impl std::fmt::Debug for StoreOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreOptions")
            .field("sync_writes", &self.sync_writes)
            .field("block_cache_bytes", &self.block_cache_bytes)
            .field("write_buffer_bytes", &self.write_buffer_bytes)
            .field("shared_block_cache", &self.block_cache.is_some())
            .field("load_catalog", &self.load_catalog)
            .finish_non_exhaustive()
    }
}

impl StoreOptions {
    /// Small caches and no fsync: a test's or a scratch store (a restore
    /// being verified), not a serving one.
    pub fn scratch() -> Self {
        Self {
            sync_writes: false,
            block_cache_bytes: 1 << 20,
            write_buffer_bytes: 1 << 20,
            ..Self::default()
        }
    }
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            sync_writes: true,
            block_cache_bytes: 256 << 20,
            write_buffer_bytes: 64 << 20,
            clock: Arc::new(crate::clock::SystemClock),
            block_cache: None,
            registry: None,
            load_catalog: true,
        }
    }
}

/// One row to write: already checked against its view's schema.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RowWrite {
    /// The entity key.
    pub entity_key: String,
    /// Event time (µs since epoch).
    pub event_ts_us: i64,
    /// Values by field id, sorted.
    pub values: Vec<(FieldId, Value)>,
}

/// What a batch write did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WriteOutcome {
    /// Rows that became their entity's latest row.
    pub rows_applied: u64,
    /// Rows ignored because a newer row (by event time) was stored.
    pub rows_stale: u64,
    /// Storage keys whose stored row changed (for cache coherence).
    pub changed_keys: Vec<Vec<u8>>,
}

/// One replica's content at one point ([`StateStore::replica_content`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplicaContent {
    /// The `meta` values asked for, as of the snapshot.
    pub meta: Vec<Option<Vec<u8>>>,
    /// The hash range: its first hash and the first past it.
    pub from_hash: u64,
    /// (`None`: the end of the ring.)
    pub to_hash: Option<u64>,
    /// The rows inside the range.
    pub inside: ContentDigest,
    /// The rows outside it.
    pub outside: ContentDigest,
}

/// Counters since the store was opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// RocksDB's estimate of stored rows.
    pub rows_estimate: u64,
    /// Rows applied by writes.
    pub rows_written: u64,
    /// Rows ignored as older than the stored row.
    pub rows_stale: u64,
    /// Stored rows that failed to decode when read.
    pub rows_corrupt: u64,
    /// Rows whose write read the stored row to compare event times (the
    /// others were at least as new as anything the store held).
    pub rows_compared: u64,
}

/// The state store of one replica.
pub struct StateStore {
    db: DB,
    path: PathBuf,
    write_options: WriteOptions,
    clock: Arc<dyn Clock>,
    registry: Registry,
    /// Shared with the compaction filter.
    floors: Arc<arc_swap::ArcSwap<ExpiryFloors>>,
    /// Serialises read-modify-write (LWW) and registry changes. A parking_lot
    /// mutex, not an async one: it is held only around synchronous RocksDB
    /// calls, and callers run on blocking threads.
    write_lock: Mutex<WriteState>,
    rows_written: AtomicU64,
    rows_stale: AtomicU64,
    rows_corrupt: AtomicU64,
    rows_compared: AtomicU64,
}

/// What the writers keep between batches, under the write lock.
struct WriteState {
    /// Bounds on the event times stored: a row at or past its bound wins
    /// against whatever is stored, so its write need not read the stored
    /// row. Materialization mostly writes rows newer than any before, and
    /// that read was a third of the servers' CPU under 100-row writes
    /// (docs/benchmarks.md). `None`: the store holds rows the bounds may not
    /// cover, and every write reads.
    newest_event: Option<NewestEvents>,
}

impl WriteState {
    fn keeps_bounds(&self) -> bool {
        self.newest_event.is_some()
    }
}

impl std::fmt::Debug for StateStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// Table options for point lookups: bloom filters (10 bits per key), and
/// index and filter blocks in the node's block `cache`, level 0's pinned.
fn point_lookup_tables(cache: &Cache) -> BlockBasedOptions {
    let mut table = BlockBasedOptions::default();
    table.set_block_cache(cache);
    table.set_bloom_filter(10.0, false);
    table.set_cache_index_and_filter_blocks(true);
    table.set_pin_l0_filter_and_index_blocks_in_cache(true);
    table
}

impl StateStore {
    /// Opens (creating if needed) the store in `path`.
    pub fn open(path: impl AsRef<Path>, options: StoreOptions) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        std::fs::create_dir_all(&path).map_err(|e| EngineError::DataDir {
            path: path.clone(),
            reason: format!("cannot create: {e}"),
        })?;

        let registry: Registry = options.registry.clone().unwrap_or_default();
        let cache = options
            .block_cache
            .clone()
            .unwrap_or_else(|| Cache::new_lru_cache(options.block_cache_bytes));

        let mut db_options = Options::default();
        db_options.create_if_missing(true);
        db_options.create_missing_column_families(true);
        db_options.set_max_background_jobs(2);
        db_options.set_keep_log_file_num(4);
        // A node hosts one store per group replica, most of them idle, and
        // RocksDB preallocates each WAL to 1.1 x the largest column family
        // write buffer and each MANIFEST to 4 MB: with the default and meta
        // families at the 64 MiB default an empty store reserved 76 MB, 58 GB for an
        // idle 3-node cluster at 256 shards. Now an empty store takes
        // 136 KB, and its WAL about 18 MB once written. (These
        // options are also the unused default family's.)
        db_options.set_manifest_preallocation_size(64 << 10);
        db_options.set_write_buffer_size(META_WRITE_BUFFER_BYTES);

        // Both families' reads are mostly point lookups, many for absent
        // keys: bloom filters keep those off the index and data blocks, and
        // the node's block cache holds what the hits read.
        let table = point_lookup_tables(&cache);
        let mut data_options = Options::default();
        data_options.set_block_based_table_factory(&table);
        data_options.set_compression_type(DBCompressionType::Lz4);
        data_options.set_write_buffer_size(options.write_buffer_bytes);
        let floors: Arc<arc_swap::ArcSwap<ExpiryFloors>> = Arc::default();
        data_options
            .set_compaction_filter(FILTER_NAME, expiry_filter(registry.clone(), floors.clone()));
        let mut meta_options = Options::default();
        // Small records (applied position, request ids, views): a small
        // memtable, which also keeps the WAL preallocation (sized from the
        // largest write buffer) at the data family's.
        meta_options.set_write_buffer_size(META_WRITE_BUFFER_BYTES);
        // Every applied entry with a request id looks up whether the id is
        // known (almost never) and which id its ring slot evicts (written
        // 100,000 entries before, in a table file by then).
        meta_options.set_block_based_table_factory(&table);
        // A filter for the memtable too, allocated with it, idle or not:
        // 2% of the 4 MiB buffer (84 KB per replica).
        meta_options.set_memtable_whole_key_filtering(true);
        meta_options.set_memtable_prefix_bloom_ratio(0.02);

        let db = DB::open_cf_descriptors(
            &db_options,
            &path,
            [
                ColumnFamilyDescriptor::new(CF_DATA, data_options),
                ColumnFamilyDescriptor::new(CF_META, meta_options),
            ],
        )?;
        let mut write_options = WriteOptions::default();
        write_options.set_sync(options.sync_writes);

        let store = StateStore {
            db,
            path,
            write_options,
            clock: options.clock,
            registry,
            floors,
            write_lock: Mutex::new(WriteState { newest_event: None }),
            rows_written: AtomicU64::new(0),
            rows_stale: AtomicU64::new(0),
            rows_corrupt: AtomicU64::new(0),
            rows_compared: AtomicU64::new(0),
        };
        if options.load_catalog {
            let catalog = store.load_catalog()?;
            store.registry.store(Arc::new(catalog));
        }
        store.floors.store(Arc::new(store.load_floors()?));
        {
            let mut state = store.write_lock.lock();
            state.newest_event = Some(store.load_newest_events()?);
        }
        Ok(store)
    }

    fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        self.db
            .cf_handle(name)
            .expect("column families are created at open")
    }

    fn load_catalog(&self) -> Result<Catalog> {
        let meta = self.cf(CF_META);
        let mut views = Vec::new();
        let mut dropped = HashSet::new();
        for item in self.db.iterator_cf(meta, IteratorMode::Start) {
            let (key, value) = item?;
            if let Some(name) = key.strip_prefix(META_VIEW_PREFIX) {
                match FeatureView::decode_stored(&value) {
                    Ok(view) => views.push(view),
                    // One record we cannot read must not keep the node (and
                    // with it every other view) from starting: the view is
                    // left out and reported. Its rows stay on disk (the
                    // compaction filter keeps rows of views it does not
                    // know), and new views never reuse its id.
                    Err(e) => tracing::error!(
                        view = %String::from_utf8_lossy(name),
                        error = %e,
                        "a stored feature view cannot be decoded; it is left out of the registry"
                    ),
                }
            } else if let Some(id) = key.strip_prefix(META_DROPPED_PREFIX) {
                dropped.insert(decode_view_id(id, "dropped view id")?);
            }
        }
        let next_view_id = match self.db.get_cf(meta, META_NEXT_VIEW_ID)? {
            Some(bytes) => decode_view_id(&bytes, "next view id")?,
            None => 1,
        };
        Ok(Catalog::new(views, dropped, next_view_id))
    }

    fn load_floors(&self) -> Result<ExpiryFloors> {
        self.load_view_times(META_FLOOR_PREFIX, "expiry floor")
    }

    /// The `newest_event/` bounds, measured again from the rows when a
    /// writer that does not keep them may have written since they were.
    fn load_newest_events(&self) -> Result<NewestEvents> {
        let recorded = self.db.get_cf(self.cf(CF_META), META_LAST_WRITE_SEQ)?;
        let current = self.db.latest_sequence_number();
        if recorded.as_deref() == Some(current.to_be_bytes().as_slice()) {
            let by_view = self.load_view_times(META_NEWEST_PREFIX, "newest event time")?;
            return Ok(NewestEvents::new(by_view));
        }
        let started = std::time::Instant::now();
        let by_view = self.scan_newest_events()?;
        let meta = self.cf(CF_META);
        let mut batch = WriteBatch::default();
        for (&view_id, event_ts_us) in &by_view {
            batch.put_cf(meta, newest_event_key(view_id), event_ts_us.to_be_bytes());
        }
        self.commit(batch, true)?;
        // A new store (empty) passes here too, unremarkably.
        if !by_view.is_empty() {
            tracing::info!(
                path = %self.path.display(),
                views = by_view.len(),
                elapsed_ms = started.elapsed().as_millis() as u64,
                "measured the newest event time of each view's rows"
            );
        }
        Ok(NewestEvents::new(by_view))
    }

    /// The newest event time of each view's rows and tombstones, read from
    /// every one of them. A record that cannot be read bounds nothing: any
    /// write replaces it (as it did when every write read first).
    fn scan_newest_events(&self) -> Result<HashMap<ViewId, i64>> {
        let mut by_view: HashMap<ViewId, i64> = HashMap::new();
        // One pass over everything: keep it out of the node's shared block
        // cache, which holds what serving reads.
        let mut read = rocksdb::ReadOptions::default();
        read.fill_cache(false);
        for item in self
            .db
            .iterator_cf_opt(self.cf(CF_DATA), read, IteratorMode::Start)
        {
            let (key, value) = item?;
            let Some((_, view_id, _)) = crate::keys::split_storage_key(&key) else {
                continue; // Not a row key: no write can reach it.
            };
            let Ok(event_ts_us) = peek_event_ts(&value) else {
                continue;
            };
            let newest = by_view.entry(view_id).or_insert(i64::MIN);
            *newest = (*newest).max(event_ts_us);
        }
        Ok(by_view)
    }

    /// Writes `batch`, recording the sequence number it ends at
    /// ([`META_LAST_WRITE_SEQ`]) if this store keeps the `newest_event/`
    /// bounds (`bounds_kept`), or removing it if not, so that the next open
    /// measures them. Callers hold the write lock, so nothing writes in
    /// between.
    ///
    /// This relies on every change to the data reaching RocksDB through here
    /// and taking sequence numbers: file ingestion, `seq_per_batch` or
    /// `two_write_queues` would break the check at open.
    fn commit(&self, mut batch: WriteBatch, bounds_kept: bool) -> Result<()> {
        let meta = self.cf(CF_META);
        if bounds_kept {
            // RocksDB gives each entry of a batch (a range delete too) its
            // own sequence number, and this put is one more entry.
            let end = self.db.latest_sequence_number() + batch.len() as u64 + 1;
            batch.put_cf(meta, META_LAST_WRITE_SEQ, end.to_be_bytes());
        } else {
            batch.delete_cf(meta, META_LAST_WRITE_SEQ);
        }
        self.db.write_opt(batch, &self.write_options)?;
        Ok(())
    }

    /// The `<prefix><view id>` -> i64 entries of the `meta` family.
    fn load_view_times(&self, prefix: &[u8], what: &str) -> Result<HashMap<ViewId, i64>> {
        let mut times = HashMap::new();
        let mode = IteratorMode::From(prefix, rocksdb::Direction::Forward);
        for item in self.db.iterator_cf(self.cf(CF_META), mode) {
            let (key, value) = item?;
            let Some(id) = key.strip_prefix(prefix) else {
                break;
            };
            let view_id = decode_view_id(id, &format!("{what} view id"))?;
            let time: [u8; 8] = value
                .as_ref()
                .try_into()
                .map_err(|_| EngineError::Corrupt {
                    what: format!("{what} of view {view_id}"),
                    reason: format!("{} bytes, expected 8", value.len()),
                })?;
            times.insert(view_id, i64::from_be_bytes(time));
        }
        Ok(times)
    }

    /// The expiry floor of a view: rows with an event time below it are
    /// gone. `i64::MIN` when the view has expired nothing.
    pub fn expiry_floor(&self, view_id: ViewId) -> i64 {
        self.floors
            .load()
            .get(&view_id)
            .copied()
            .unwrap_or(i64::MIN)
    }

    /// Moves views' expiry floors forward (a floor never moves back: an
    /// entry below the current floor changes nothing), with `meta_puts` in
    /// the same atomic batch. Returns the views whose floor moved, whose
    /// rows below it now read as absent on this replica.
    pub fn advance_expiry(
        &self,
        floors: &[(ViewId, i64)],
        meta_puts: MetaPuts<'_>,
    ) -> Result<Vec<ViewId>> {
        let state = self.write_lock.lock();
        let mut next = (*self.floors.load_full()).clone();
        let mut batch = WriteBatch::default();
        let meta = self.cf(CF_META);
        add_meta_puts(&mut batch, meta, meta_puts);
        let mut moved = Vec::new();
        for &(view_id, floor_us) in floors {
            let current = next.get(&view_id).copied().unwrap_or(i64::MIN);
            if floor_us <= current {
                continue;
            }
            next.insert(view_id, floor_us);
            let mut key = META_FLOOR_PREFIX.to_vec();
            key.extend_from_slice(&view_id.to_be_bytes());
            batch.put_cf(meta, key, floor_us.to_be_bytes());
            if !moved.contains(&view_id) {
                moved.push(view_id);
            }
        }
        if !batch.is_empty() {
            self.commit(batch, state.keeps_bounds())?;
        }
        self.floors.store(Arc::new(next));
        Ok(moved)
    }

    /// Whether a record at storage key `key` with event time `event_ts_us`
    /// lies below its view's expiry floor: reads treat it as absent, as
    /// compaction will (the node's hot cache asks this on every hit).
    pub fn is_expired(&self, key: &[u8], event_ts_us: i64) -> bool {
        Self::expired(&self.floors.load(), key, event_ts_us)
    }

    fn expired(floors: &ExpiryFloors, key: &[u8], event_ts_us: i64) -> bool {
        crate::keys::split_storage_key(key)
            .and_then(|(_, view_id, _)| floors.get(&view_id))
            .is_some_and(|&floor| event_ts_us < floor)
    }

    /// The live catalog of feature views.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The clock of the unreplicated write and delete calls.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// The data directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Creates or compatibly updates a feature view. Returns the stored view
    /// and whether it changed.
    pub fn apply_view(&self, spec: ViewSpec) -> Result<(Arc<FeatureView>, bool)> {
        self.apply_view_with(spec, &[])
    }

    /// [`Self::apply_view`], writing `meta_puts` into the `meta` column
    /// family in the same atomic batch (a replicated state machine records
    /// its applied log position this way) when the view is applied, changed
    /// or not. A refused view writes nothing: the caller records a refusal.
    pub fn apply_view_with(
        &self,
        spec: ViewSpec,
        meta_puts: MetaPuts<'_>,
    ) -> Result<(Arc<FeatureView>, bool)> {
        let state = self.write_lock.lock();
        let catalog = self.registry.load_full();
        let existing = catalog.view(&spec.name).cloned();
        if existing.is_none() && catalog.len() >= VIEWS_MAX {
            return Err(EngineError::RegistryFull(format!(
                "at most {VIEWS_MAX} feature views"
            )));
        }
        let (view, changed) = FeatureView::evolve(existing.as_deref(), spec, catalog.next_view_id)?;
        if !changed {
            self.put_meta_locked(&state, meta_puts)?;
            return Ok((existing.expect("unchanged implies existing"), false));
        }
        let mut batch = WriteBatch::default();
        let meta = self.cf(CF_META);
        add_meta_puts(&mut batch, meta, meta_puts);
        let record = serde_json::to_vec(&view).expect("feature views always serialise");
        batch.put_cf(meta, view_key(&view.name), record);
        let mut next = (*catalog).clone();
        if existing.is_none() {
            next.next_view_id = catalog
                .next_view_id
                .checked_add(1)
                .ok_or_else(|| EngineError::RegistryFull("view ids exhausted".into()))?;
            batch.put_cf(meta, META_NEXT_VIEW_ID, next.next_view_id.to_be_bytes());
        }
        self.commit(batch, state.keeps_bounds())?;
        let view = Arc::new(view);
        next.insert(view.clone());
        next.touch();
        self.registry.store(Arc::new(next));
        Ok((view, true))
    }

    /// Deletes a feature view. Its rows become unreachable at once (the view id
    /// is never reused) and are dropped by compaction.
    pub fn delete_view(&self, name: &str) -> Result<Arc<FeatureView>> {
        self.delete_view_with(name, &[])
    }

    /// [`Self::delete_view`] with `meta_puts` in the same batch. An unknown
    /// view writes nothing: the caller records a refusal.
    pub fn delete_view_with(
        &self,
        name: &str,
        meta_puts: MetaPuts<'_>,
    ) -> Result<Arc<FeatureView>> {
        let state = self.write_lock.lock();
        let mut next = (*self.registry.load_full()).clone();
        let Some(view) = next.remove(name) else {
            return Err(EngineError::UnknownView(name.to_owned()));
        };
        let meta = self.cf(CF_META);
        let mut batch = WriteBatch::default();
        add_meta_puts(&mut batch, meta, meta_puts);
        batch.delete_cf(meta, view_key(name));
        let mut dropped_key = META_DROPPED_PREFIX.to_vec();
        dropped_key.extend_from_slice(&view.id.to_be_bytes());
        batch.put_cf(meta, dropped_key, []);
        self.commit(batch, state.keeps_bounds())?;
        next.touch();
        self.registry.store(Arc::new(next));
        Ok(view)
    }

    /// Writes rows of view `view_id`, each only if its event time is at least
    /// the stored row's (equal: the later write wins). Atomic: all rows of the
    /// batch are applied in one RocksDB write batch or none is.
    pub fn write_rows(&self, view_id: ViewId, rows: &[RowWrite]) -> Result<WriteOutcome> {
        self.write_rows_at(view_id, rows, self.clock.now_us(), &[])
    }

    /// [`Self::write_rows`] with an explicit write time (a replicated entry
    /// carries its leader's clock, so every replica stores the same bytes) and
    /// `meta_puts` in the same atomic batch.
    pub fn write_rows_at(
        &self,
        view_id: ViewId,
        rows: &[RowWrite],
        written_ts_us: i64,
        meta_puts: MetaPuts<'_>,
    ) -> Result<WriteOutcome> {
        let keys: Vec<Vec<u8>> = rows
            .iter()
            .map(|row| storage_key(view_id, row.entity_key.as_bytes()))
            .collect();
        let data = self.cf(CF_DATA);
        let mut state = self.write_lock.lock();
        let floor_us = self.expiry_floor(view_id);
        let bound = state
            .newest_event
            .as_ref()
            .map(|newest| newest.bounds_of(view_id));
        // Only a row older than its bound can lose to the stored row; one
        // below the floor loses without a read.
        let compared: Vec<&[u8]> = keys
            .iter()
            .zip(rows)
            .filter(|(key, row)| {
                row.event_ts_us >= floor_us
                    && bound
                        .as_ref()
                        .is_none_or(|bound| row.event_ts_us < bound(key))
            })
            .map(|(key, _)| key.as_slice())
            .collect();
        drop(bound); // Ends its borrow of `state`, which the loop below updates.
        let stored = self.db.batched_multi_get_cf(data, &compared, false);
        // Latest event time per key, starting from disk and advanced by
        // earlier rows of this same batch.
        let mut latest: HashMap<&[u8], i64> = HashMap::with_capacity(keys.len());
        for (&key, result) in compared.iter().zip(stored) {
            if let Some(bytes) = result? {
                match peek_event_ts(&bytes) {
                    // Below the floor: expired, as good as absent (the
                    // incoming row is checked against the floor itself).
                    Ok(event_ts) if event_ts < floor_us => {}
                    Ok(event_ts) => {
                        latest.insert(key, event_ts);
                    }
                    Err(e) => {
                        // A row we cannot read is never served; a new write
                        // replaces it. Say so loudly.
                        self.rows_corrupt.fetch_add(1, Ordering::Relaxed);
                        tracing::error!(key = ?key, error = %e, "corrupt stored row overwritten by a write");
                    }
                }
            }
        }
        let mut batch = WriteBatch::default();
        let mut outcome = WriteOutcome::default();
        let mut buffer = Vec::with_capacity(256);
        let mut newest_applied_us = i64::MIN;
        for (row, key) in rows.iter().zip(&keys) {
            // A row already past the view's expiry floor is stale on every
            // replica alike, whether or not a newer row was compacted away.
            if row.event_ts_us < floor_us
                || latest
                    .get(key.as_slice())
                    .is_some_and(|&stored_ts| row.event_ts_us < stored_ts)
            {
                outcome.rows_stale += 1;
                continue;
            }
            latest.insert(key, row.event_ts_us);
            newest_applied_us = newest_applied_us.max(row.event_ts_us);
            if let Some(newest) = state.newest_event.as_mut() {
                newest.record(key, row.event_ts_us);
            }
            buffer.clear();
            encode_row_parts(row.event_ts_us, written_ts_us, &row.values, &mut buffer);
            batch.put_cf(data, key, &buffer);
            outcome.rows_applied += 1;
            outcome.changed_keys.push(key.clone());
        }
        let meta = self.cf(CF_META);
        add_meta_puts(&mut batch, meta, meta_puts);
        // The bound rises in the batch that stores the row that raised it.
        let raised_us = state
            .newest_event
            .as_ref()
            .filter(|newest| newest_applied_us > newest.view(view_id))
            .map(|_| newest_applied_us);
        if let Some(raised_us) = raised_us {
            batch.put_cf(meta, newest_event_key(view_id), raised_us.to_be_bytes());
        }
        if !batch.is_empty() {
            self.commit(batch, state.keeps_bounds())?;
        }
        if let (Some(raised_us), Some(newest)) = (raised_us, state.newest_event.as_mut()) {
            newest.raise_view(view_id, raised_us);
        }
        self.rows_compared
            .fetch_add(compared.len() as u64, Ordering::Relaxed);
        self.rows_written
            .fetch_add(outcome.rows_applied, Ordering::Relaxed);
        self.rows_stale
            .fetch_add(outcome.rows_stale, Ordering::Relaxed);
        Ok(outcome)
    }

    /// Reads the stored rows for storage keys, in order. Rows that fail to
    /// decode come back as [`EngineError::Corrupt`]: reported, never served.
    /// Rows below their view's expiry floor read as absent.
    pub fn get_rows<K: AsRef<[u8]>>(&self, keys: &[K]) -> Vec<Result<Option<StoredRow>>> {
        let data = self.cf(CF_DATA);
        let floors = self.floors.load();
        self.db
            .batched_multi_get_cf(data, keys, false)
            .into_iter()
            .zip(keys)
            .map(|(result, key)| {
                let Some(bytes) = result? else {
                    return Ok(None);
                };
                let row = decode_stored(&bytes).map_err(|e| {
                    self.rows_corrupt.fetch_add(1, Ordering::Relaxed);
                    EngineError::Corrupt {
                        what: format!("row at key {:02x?}", key.as_ref()),
                        reason: e.to_string(),
                    }
                })?;
                Ok(row.filter(|row| !Self::expired(&floors, key.as_ref(), row.event_ts_us)))
            })
            .collect()
    }

    /// Reads the encoded rows at storage keys, in order (for shipping to
    /// another node, which decodes them). Rows below their view's expiry
    /// floor read as absent, as in [`Self::get_rows`]; undecodable bytes go
    /// as they are, for the reader to report.
    pub fn get_raw<K: AsRef<[u8]>>(&self, keys: &[K]) -> Vec<Result<Option<Vec<u8>>>> {
        let floors = self.floors.load();
        self.db
            .batched_multi_get_cf(self.cf(CF_DATA), keys, false)
            .into_iter()
            .zip(keys)
            .map(|(result, key)| {
                Ok(result?.and_then(|bytes| {
                    let expired = peek_event_ts(&bytes)
                        .is_ok_and(|ts| Self::expired(&floors, key.as_ref(), ts));
                    (!expired).then(|| bytes.to_vec())
                }))
            })
            .collect()
    }

    /// Deletes the rows of `entity_keys` in view `view_id`. Returns the
    /// storage keys that held a row.
    pub fn delete_rows(&self, view_id: ViewId, entity_keys: &[String]) -> Result<Vec<Vec<u8>>> {
        self.delete_rows_with(view_id, entity_keys, self.clock.now_us(), &[])
    }

    /// [`Self::delete_rows`] at write time `deleted_ts_us` (a replicated
    /// entry carries its leader's clock, so every replica stores the same
    /// bytes), with `meta_puts` in the same atomic batch. A deleted row
    /// leaves a tombstone with the row's event time: a write arriving
    /// afterwards with an older event time is stale, as it was against the
    /// row (last write wins, deletes included), so a late out-of-order
    /// write cannot bring the entity back; a write at least as new does.
    /// No clock is involved, so a client's clock behind the leader's loses
    /// nothing. A key with no row gets no tombstone (a delete of keys that
    /// never existed costs no disk). Tombstones go the way of rows: with the
    /// view, or below its expiry floor (a write that old is refused by the
    /// floor itself); in a view without ttl they stay.
    pub fn delete_rows_with(
        &self,
        view_id: ViewId,
        entity_keys: &[String],
        deleted_ts_us: i64,
        meta_puts: MetaPuts<'_>,
    ) -> Result<Vec<Vec<u8>>> {
        let mut seen = HashSet::new();
        let keys: Vec<Vec<u8>> = entity_keys
            .iter()
            .map(|k| storage_key(view_id, k.as_bytes()))
            .filter(|key| seen.insert(key.clone()))
            .collect();
        let data = self.cf(CF_DATA);
        let state = self.write_lock.lock();
        let floor_us = self.expiry_floor(view_id);
        let mut batch = WriteBatch::default();
        let mut deleted = Vec::new();
        let mut tombstone = Vec::with_capacity(17);
        for (key, result) in keys
            .iter()
            .zip(self.db.batched_multi_get_cf(data, &keys, false))
        {
            let Some(bytes) = result? else {
                continue;
            };
            if bytes.first() == Some(&codec::TOMBSTONE_FORMAT_VERSION) {
                continue; // Deleted already.
            }
            match peek_event_ts(&bytes) {
                // Expired already: read as absent, nothing to delete (and
                // no tombstone needed: any write as old is refused).
                Ok(event_ts_us) if event_ts_us < floor_us => continue,
                Ok(event_ts_us) => {
                    tombstone.clear();
                    codec::encode_tombstone(event_ts_us, deleted_ts_us, &mut tombstone);
                    batch.put_cf(data, key, &tombstone);
                }
                // Unreadable: nothing to guard, remove it.
                Err(_) => batch.delete_cf(data, key),
            }
            deleted.push(key.clone());
        }
        add_meta_puts(&mut batch, self.cf(CF_META), meta_puts);
        if !batch.is_empty() {
            self.commit(batch, state.keeps_bounds())?;
        }
        Ok(deleted)
    }

    /// Writes `meta_puts` atomically (a replicated entry with no data still
    /// advances the applied log position).
    pub fn put_meta(&self, meta_puts: MetaPuts<'_>) -> Result<()> {
        let state = self.write_lock.lock();
        self.put_meta_locked(&state, meta_puts)
    }

    fn put_meta_locked(&self, state: &WriteState, meta_puts: MetaPuts<'_>) -> Result<()> {
        if meta_puts.is_empty() {
            return Ok(());
        }
        let mut batch = WriteBatch::default();
        add_meta_puts(&mut batch, self.cf(CF_META), meta_puts);
        self.commit(batch, state.keeps_bounds())?;
        Ok(())
    }

    /// Deletes every row whose key hash lies in `[from_hash, to_hash)`
    /// (`to_hash` `None`: up to the end of the ring), with `meta_puts`, in
    /// one batch: a shard split giving away half of its range. A range
    /// delete, so the cost does not grow with the rows; compaction reclaims
    /// the space later.
    pub fn delete_hash_range_with(
        &self,
        from_hash: u64,
        to_hash: Option<u64>,
        meta_puts: MetaPuts<'_>,
    ) -> Result<()> {
        let (from, to) = hash_range_keys(from_hash, to_hash);
        let state = self.write_lock.lock();
        let mut batch = WriteBatch::default();
        // An empty range deletes nothing (RocksDB refuses an inverted one).
        if from < to {
            batch.delete_range_cf(self.cf(CF_DATA), &from, &to);
        }
        add_meta_puts(&mut batch, self.cf(CF_META), meta_puts);
        self.commit(batch, state.keeps_bounds())?;
        Ok(())
    }

    /// Approximate bytes of the rows whose key hash lies in `[from_hash,
    /// to_hash)`: the table files' share of that range (RocksDB's estimate
    /// from their indexes) plus every memtable of the data family (recent
    /// writes, not yet in a file).
    pub fn approximate_bytes(&self, from_hash: u64, to_hash: Option<u64>) -> u64 {
        let (from, to) = hash_range_keys(from_hash, to_hash);
        if from >= to {
            return 0;
        }
        let cf = self.cf(CF_DATA);
        let files = self
            .db
            .get_approximate_sizes_cf(&cf, &[rocksdb::Range::new(&from, &to)])
            .first()
            .copied()
            .unwrap_or(0);
        let memtables = self
            .db
            .property_int_value_cf(cf, "rocksdb.cur-size-all-mem-tables")
            .ok()
            .flatten()
            .unwrap_or(0);
        files.saturating_add(memtables)
    }

    /// Up to `count` stored records of the data family in key order, after
    /// the key `after` (`None`: from the first): each storage key with its
    /// row, or `None` for a tombstone. A restore reads a backup's store
    /// this way, a page at a time.
    pub fn records_after(
        &self,
        after: Option<&[u8]>,
        count: usize,
    ) -> Result<Vec<(Vec<u8>, Option<StoredRow>)>> {
        let mode = match after {
            Some(key) => IteratorMode::From(key, rocksdb::Direction::Forward),
            None => IteratorMode::Start,
        };
        let mut records = Vec::new();
        for item in self.db.iterator_cf(self.cf(CF_DATA), mode) {
            if records.len() >= count {
                break;
            }
            let (key, value) = item?;
            if after.is_some_and(|after| *key == *after) {
                continue;
            }
            let row = decode_stored(&value).map_err(|e| EngineError::Corrupt {
                what: format!("stored row {key:02x?}"),
                reason: e.to_string(),
            })?;
            records.push((key.to_vec(), row));
        }
        Ok(records)
    }

    /// The logical digest of the rows whose key hash lies in `[from_hash,
    /// to_hash)` (see [`crate::digest`]), every block's checksum verified.
    pub fn digest(&self, from_hash: u64, to_hash: Option<u64>) -> Result<LogicalDigest> {
        digest_db(&self.db, from_hash, to_hash)
    }

    /// What a reader sees of the rows whose key hash lies in `[from_hash,
    /// to_hash)`, by content, with the live catalog's names (see
    /// [`LogicalDigest::add_content`]); every block's checksum verified.
    /// Rows written during the scan may or may not be counted.
    pub fn content_digest(&self, from_hash: u64, to_hash: Option<u64>) -> Result<ContentDigest> {
        let catalog = self.registry.load_full();
        let floors = self.floors.load();
        content_digest_db(
            &self.db,
            None,
            from_hash,
            to_hash,
            &catalog,
            &|key, event_ts| Self::expired(&floors, key, event_ts),
        )
    }

    /// One replica's content as of a single point: the values of
    /// `meta_keys` (its applied position, its range), the
    /// [`Self::content_digest`] of the hash range `range_of` picks from
    /// them, and that of every row outside it (rows a split should have
    /// trimmed away), all read from one snapshot, so replicas of a shard
    /// that report the same position must report the same digests.
    pub fn replica_content(
        &self,
        meta_keys: &[&[u8]],
        range_of: impl FnOnce(&[Option<Vec<u8>>]) -> Result<(u64, Option<u64>)>,
    ) -> Result<ReplicaContent> {
        // Under the write lock: the expiry floors and the catalog a batch
        // changes are published after its commit, so without it the
        // snapshot could hold a floor the scan does not apply yet.
        let (catalog, floors, snapshot) = {
            let _guard = self.write_lock.lock();
            (
                self.registry.load_full(),
                self.floors.load_full(),
                self.db.snapshot(),
            )
        };
        let expired = |key: &[u8], event_ts: i64| Self::expired(&floors, key, event_ts);
        let meta = meta_keys
            .iter()
            .map(|key| snapshot.get_cf(self.cf(CF_META), key))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let (from_hash, to_hash) = range_of(&meta)?;
        let digest =
            |from, to| content_digest_db(&self.db, Some(&snapshot), from, to, &catalog, &expired);
        let inside = digest(from_hash, to_hash)?;
        let mut outside = digest(0, Some(from_hash))?;
        if let Some(to_hash) = to_hash {
            outside.merge(digest(to_hash, None)?);
        }
        Ok(ReplicaContent {
            meta,
            from_hash,
            to_hash,
            inside,
            outside,
        })
    }

    /// Reads one key of the `meta` column family.
    pub fn get_meta(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.db.get_cf(self.cf(CF_META), key)?)
    }

    /// Creates a consistent point-in-time copy of the store in `path` (hard
    /// links to the immutable table files, so it is cheap; `path` must not
    /// exist) and returns the value of `meta_key` as of that copy.
    pub fn checkpoint_with_meta(&self, path: &Path, meta_key: &[u8]) -> Result<Option<Vec<u8>>> {
        // Under the write lock, so the copy sits between two applied batches
        // and the meta value read is the one inside the copy.
        //
        // Durability rests on this call too: the store never fsyncs its WAL
        // (the Raft log is the durable record), and the log is purged up to
        // a snapshot once the snapshot is taken. RocksDB's checkpoint first
        // flushes the memtables into table files (rust-rocksdb passes
        // log_size_for_flush = 0), so everything applied up to here is in
        // fsynced table files of the live store, not only in its WAL.
        // `a_checkpoint_leaves_nothing_applied_only_in_the_unsynced_wal`
        // fails if that ever changes.
        let _guard = self.write_lock.lock();
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| EngineError::DataDir {
                path: parent.to_path_buf(),
                reason: format!("cannot create: {e}"),
            })?;
        }
        rocksdb::checkpoint::Checkpoint::new(&self.db)?.create_checkpoint(path)?;
        Ok(self.db.get_cf(self.cf(CF_META), meta_key)?)
    }

    /// Counters and estimates.
    pub fn stats(&self) -> StoreStats {
        let rows_estimate = self
            .db
            .property_int_value_cf(self.cf(CF_DATA), "rocksdb.estimate-num-keys")
            .ok()
            .flatten()
            .unwrap_or(0);
        StoreStats {
            rows_estimate,
            rows_written: self.rows_written.load(Ordering::Relaxed),
            rows_stale: self.rows_stale.load(Ordering::Relaxed),
            rows_corrupt: self.rows_corrupt.load(Ordering::Relaxed),
            rows_compared: self.rows_compared.load(Ordering::Relaxed),
        }
    }

    /// Compacts all row data now (runs the expiry filter over every row).
    pub fn compact_data(&self) -> Result<()> {
        self.db.flush_cf(self.cf(CF_DATA))?;
        self.db
            .compact_range_cf(self.cf(CF_DATA), None::<&[u8]>, None::<&[u8]>);
        Ok(())
    }

    /// Flushes memtables and syncs the WAL: called on graceful shutdown so a
    /// restart replays nothing.
    pub fn flush(&self) -> Result<()> {
        self.db.flush_wal(true)?;
        self.db.flush_cf(self.cf(CF_DATA))?;
        self.db.flush_cf(self.cf(CF_META))?;
        Ok(())
    }

    /// Writes raw bytes at a storage key, bypassing every check: only for
    /// tests that simulate on-disk corruption.
    #[doc(hidden)]
    pub fn put_raw_for_test(&self, key: &[u8], value: &[u8]) -> Result<()> {
        let mut state = self.write_lock.lock();
        // The newest-event bounds do not cover these bytes: this store stops
        // keeping them, and its writes stop recording the sequence number,
        // so the next open measures them again.
        state.newest_event = None;
        self.db.delete_cf(self.cf(CF_META), META_LAST_WRITE_SEQ)?;
        self.db.put_cf(self.cf(CF_DATA), key, value)?;
        Ok(())
    }
}

/// Extra `meta` column family changes that ride in a data batch: a value
/// to put, or `None` to delete the key.
pub type MetaPuts<'a> = &'a [(&'a [u8], Option<&'a [u8]>)];

fn add_meta_puts(batch: &mut WriteBatch, meta: &rocksdb::ColumnFamily, meta_puts: MetaPuts<'_>) {
    for (key, value) in meta_puts {
        match value {
            Some(value) => batch.put_cf(meta, key, value),
            None => batch.delete_cf(meta, key),
        }
    }
}

fn newest_event_key(view_id: ViewId) -> Vec<u8> {
    let mut key = META_NEWEST_PREFIX.to_vec();
    key.extend_from_slice(&view_id.to_be_bytes());
    key
}

fn view_key(name: &str) -> Vec<u8> {
    let mut key = META_VIEW_PREFIX.to_vec();
    key.extend_from_slice(name.as_bytes());
    key
}

fn decode_view_id(bytes: &[u8], what: &str) -> Result<ViewId> {
    let array: [u8; 4] = bytes.try_into().map_err(|_| EngineError::Corrupt {
        what: what.to_owned(),
        reason: format!("{} bytes, expected 4", bytes.len()),
    })?;
    Ok(ViewId::from_be_bytes(array))
}

mod newest;
#[cfg(test)]
mod tests;
