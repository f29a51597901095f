//! The hot row cache: an in-process LRU bounded in bytes (quick_cache), whose
//! entries also expire after a configurable age.
//!
//! Coherence: a read after an acknowledged write never returns the older row.
//! Every replica drops a key when it applies a write (on the leader, before
//! the write is acknowledged; a follower's node drops it when its replica
//! catches up, which is what REPLICA reads' staleness bound covers). A
//! reader that misses takes quick_cache's placeholder for the key *before* it
//! reads storage, and fills the placeholder afterwards; a writer's removal
//! also removes the placeholder, so the fill of a read that raced with the
//! write fails instead of caching the old row. Readers never wait for another
//! reader's placeholder (zero timeout): they read storage without filling.
//!
//! Absent rows are cached too (as `None`), so repeated lookups of unknown
//! entities stay off RocksDB.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use quick_cache::sync::{Cache, DefaultLifecycle, GuardResult, PlaceholderGuard};
use quick_cache::{DefaultHashBuilder, Weighter};
use quiver_engine::keys::{ViewId, split_storage_key};
use quiver_engine::{Clock, StoredRow};

/// Bytes charged per entry on top of key and row, for the cache's own
/// bookkeeping.
const ENTRY_OVERHEAD_BYTES: u64 = 64;
/// A guess at the average entry size, to size the cache's tables.
const ENTRY_BYTES_ESTIMATE: u64 = 512;

/// A cached lookup result: the row, or `None` for "no such row".
#[derive(Debug, Clone)]
pub struct CachedRow {
    row: Option<Arc<StoredRow>>,
    cached_at_us: i64,
}

/// Weighs cache entries by their approximate bytes.
#[derive(Debug, Clone, Copy)]
pub struct RowWeighter;

impl Weighter<Vec<u8>, CachedRow> for RowWeighter {
    fn weight(&self, key: &Vec<u8>, value: &CachedRow) -> u64 {
        let row = value.row.as_ref().map_or(0, |r| r.size_bytes() as u64);
        key.len() as u64 + row + ENTRY_OVERHEAD_BYTES
    }
}

type RowCache = Cache<Vec<u8>, CachedRow, RowWeighter>;

/// A reservation to fill the cache after a miss.
pub type FillGuard<'a> = PlaceholderGuard<
    'a,
    Vec<u8>,
    CachedRow,
    RowWeighter,
    DefaultHashBuilder,
    DefaultLifecycle<Vec<u8>, CachedRow>,
>;

/// Result of a cache lookup.
pub enum Lookup<'a> {
    /// Cached: the row, or `None` if the row is known absent.
    Hit(Option<Arc<StoredRow>>),
    /// Not cached. Read storage, then [`HotCache::fill`] the guard if any.
    Miss(Option<FillGuard<'a>>),
}

/// Snapshot of the cache's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Entries held.
    pub entries: u64,
    /// Weight held (bytes, approximately).
    pub bytes_used: u64,
    /// Configured bound.
    pub bytes_max: u64,
    /// Lookups served from the cache.
    pub hits: u64,
    /// Lookups that went to storage.
    pub misses: u64,
}

/// The per-node hot cache. Disabled (every lookup misses, nothing is held)
/// when built with a zero byte bound.
pub struct HotCache {
    cache: Option<RowCache>,
    bytes_max: u64,
    entry_ttl_us: i64,
    clock: Arc<dyn Clock>,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl std::fmt::Debug for HotCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HotCache")
            .field("bytes_max", &self.bytes_max)
            .finish_non_exhaustive()
    }
}

/// A row cache of at most `bytes_max` bytes; none for 0.
fn row_cache(bytes_max: u64) -> Option<RowCache> {
    (bytes_max > 0).then(|| {
        let items =
            usize::try_from((bytes_max / ENTRY_BYTES_ESTIMATE).max(16)).unwrap_or(usize::MAX);
        Cache::with_weighter(items, bytes_max, RowWeighter)
    })
}

/// A duration in µs, saturating.
fn micros(duration: Duration) -> i64 {
    i64::try_from(duration.as_micros()).unwrap_or(i64::MAX)
}

impl HotCache {
    /// A cache of at most `bytes_max` bytes whose entries expire after
    /// `entry_ttl` (zero: never), judged by `clock`.
    pub fn new(bytes_max: u64, entry_ttl: Duration, clock: Arc<dyn Clock>) -> Self {
        Self {
            cache: row_cache(bytes_max),
            bytes_max,
            entry_ttl_us: micros(entry_ttl),
            clock,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    /// Whether the cache holds anything at all.
    pub fn is_enabled(&self) -> bool {
        self.cache.is_some()
    }

    /// A fresh cached answer for a storage key, without reserving a fill
    /// on a miss: `Some(row)` (the row, or `None` if known absent) counts as
    /// a hit; `None` counts nothing and the caller goes on to [`Self::lookup`].
    /// Never blocks, so the async read path can answer warm keys in place.
    pub fn peek(&self, key: &[u8]) -> Option<Option<Arc<StoredRow>>> {
        let entry = self.cache.as_ref()?.get(key)?;
        if self.expired(&entry) {
            return None;
        }
        self.hits.fetch_add(1, Ordering::Relaxed);
        Some(entry.row)
    }

    /// Looks up a storage key.
    pub fn lookup(&self, key: &[u8]) -> Lookup<'_> {
        let Some(cache) = &self.cache else {
            return Lookup::Miss(None);
        };
        // At most two rounds: an expired entry is dropped, then looked up again.
        for _ in 0..2 {
            match cache.get_value_or_guard(key, Some(Duration::ZERO)) {
                GuardResult::Value(entry) if !self.expired(&entry) => {
                    self.hits.fetch_add(1, Ordering::Relaxed);
                    return Lookup::Hit(entry.row);
                }
                GuardResult::Value(entry) => {
                    cache.remove_if(key, |current| current.cached_at_us == entry.cached_at_us);
                }
                GuardResult::Guard(guard) => {
                    self.misses.fetch_add(1, Ordering::Relaxed);
                    return Lookup::Miss(Some(guard));
                }
                GuardResult::Timeout => break,
            }
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        Lookup::Miss(None)
    }

    fn expired(&self, entry: &CachedRow) -> bool {
        self.entry_ttl_us > 0
            && self.clock.now_us().saturating_sub(entry.cached_at_us) > self.entry_ttl_us
    }

    /// Fills a miss with what storage returned. Does nothing if a write
    /// dropped the key since the miss.
    pub fn fill(&self, guard: FillGuard<'_>, row: Option<Arc<StoredRow>>) {
        let _ = guard.insert(CachedRow {
            row,
            cached_at_us: self.clock.now_us(),
        });
    }

    /// Drops cached rows: called when a replica applies a write or delete (on
    /// the leader, before it is acknowledged).
    pub fn invalidate<K: AsRef<[u8]>>(&self, keys: &[K]) -> u64 {
        let Some(cache) = &self.cache else { return 0 };
        keys.iter()
            .filter(|key| cache.remove(key.as_ref()).is_some())
            .count() as u64
    }

    /// Drops every cached row of a view. Walks the whole cache: meant for rare
    /// operator actions, not the write path.
    pub fn invalidate_view(&self, view_id: ViewId) -> u64 {
        let Some(cache) = &self.cache else { return 0 };
        let before = cache.len();
        cache.retain(|key, _| split_storage_key(key).is_none_or(|(_, id, _)| id != view_id));
        before.saturating_sub(cache.len()) as u64
    }

    /// Drops everything (a replica's store was replaced by a snapshot).
    pub fn clear(&self) {
        if let Some(cache) = &self.cache {
            cache.clear();
        }
    }

    /// Counters and occupancy.
    pub fn stats(&self) -> CacheStats {
        CacheStats {
            entries: self.cache.as_ref().map_or(0, |c| c.len() as u64),
            bytes_used: self.cache.as_ref().map_or(0, |c| c.weight()),
            bytes_max: self.bytes_max,
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
        }
    }
}

/// The last rows this node read from other nodes, for shards it holds no
/// replica of: a degraded Get's last resort when no replica of such a shard
/// answers in time (served as `STALE`, never as a fresh answer).
///
/// Not coherent, by design: writes to those shards are applied elsewhere,
/// so an entry may be older than what the shard holds. What bounds it: an
/// entry older than its age bound is never served; a write, delete or
/// invalidation proposed through this node forgets its keys; a leader's
/// answer replaces what is held, a lagging replica's only an older row
/// (see [`LastKnown::remember`]). Absent rows are not kept: the view's
/// default says more than "absent, as of some time ago".
pub struct LastKnown {
    cache: Option<RowCache>,
    age_max_us: i64,
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for LastKnown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LastKnown")
            .field("age_max_us", &self.age_max_us)
            .finish_non_exhaustive()
    }
}

impl LastKnown {
    /// At most `bytes_max` bytes (0: keeps nothing), each entry served for
    /// at most `age_max` after it was read (zero: no bound), judged by
    /// `clock`.
    pub fn new(bytes_max: u64, age_max: Duration, clock: Arc<dyn Clock>) -> Self {
        Self {
            cache: row_cache(bytes_max),
            age_max_us: micros(age_max),
            clock,
        }
    }

    /// Whether it is configured to keep nothing.
    pub fn is_off(&self) -> bool {
        self.cache.is_none()
    }

    /// Whether it holds nothing (then forgetting is free).
    pub fn is_empty(&self) -> bool {
        self.cache.as_ref().is_none_or(|cache| cache.is_empty())
    }

    /// Keeps what another node answered for a key. An absent row forgets
    /// the key: deleted (a replica answers a tombstone as absent) or
    /// expired since, or not yet on a lagging replica, where forgetting
    /// errs towards honouring deletes. `authoritative`: the shard's leader
    /// answered (LEADER or STRONG), so its row replaces what is held. Else
    /// (a replica as it is, maybe lagging) a row is kept only if no newer
    /// one is held within the age bound.
    pub fn remember(&self, key: &[u8], row: Option<&Arc<StoredRow>>, authoritative: bool) {
        let Some(cache) = &self.cache else { return };
        let Some(row) = row else {
            cache.remove(key);
            return;
        };
        let newer_held = !authoritative
            && cache
                .get(key)
                .filter(|held| !self.too_old(held))
                .and_then(|held| held.row)
                .is_some_and(|held| {
                    (held.event_ts_us, held.written_ts_us) > (row.event_ts_us, row.written_ts_us)
                });
        if !newer_held {
            cache.insert(
                key.to_vec(),
                CachedRow {
                    row: Some(row.clone()),
                    cached_at_us: self.clock.now_us(),
                },
            );
        }
    }

    /// The row last read for a key, if it is held and within its age bound.
    pub fn recall(&self, key: &[u8]) -> Option<Arc<StoredRow>> {
        let entry = self.cache.as_ref()?.get(key)?;
        if self.too_old(&entry) {
            return None;
        }
        entry.row
    }

    /// Read longer ago than the age bound.
    fn too_old(&self, entry: &CachedRow) -> bool {
        let age_us = self.clock.now_us().saturating_sub(entry.cached_at_us);
        self.age_max_us > 0 && age_us > self.age_max_us
    }

    /// Drops keys (a write, delete or invalidation through this node).
    pub fn forget<K: AsRef<[u8]>>(&self, keys: &[K]) {
        if let Some(cache) = &self.cache {
            for key in keys {
                cache.remove(key.as_ref());
            }
        }
    }

    /// Drops every row of a view.
    pub fn forget_view(&self, view_id: ViewId) {
        if let Some(cache) = &self.cache {
            cache.retain(|key, _| split_storage_key(key).is_none_or(|(_, id, _)| id != view_id));
        }
    }

    /// Entries and bytes held.
    pub fn usage(&self) -> (u64, u64) {
        self.cache
            .as_ref()
            .map_or((0, 0), |cache| (cache.len() as u64, cache.weight()))
    }
}

/// Every replica on this node keeps the cache coherent through its apply
/// path: an applied write, delete or invalidation drops the rows it touched.
impl quiver_raft::ApplyObserver for HotCache {
    fn keys_changed(&self, keys: &[Vec<u8>]) -> u64 {
        self.invalidate(keys)
    }

    fn view_invalidated(&self, view_id: ViewId) -> u64 {
        self.invalidate_view(view_id)
    }

    fn store_replaced(&self) {
        // A replica's store is replaced only by a snapshot install.
        metrics::counter!("quiver_snapshot_installs_total").increment(1);
        self.clear();
    }

    fn replica_changed(&self) {
        self.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use quiver_engine::keys::storage_key;
    use quiver_engine::{ManualClock, Value};

    fn row(ts: i64) -> Arc<StoredRow> {
        Arc::new(StoredRow {
            event_ts_us: ts,
            written_ts_us: ts,
            values: vec![(1, Value::Int64(ts))],
        })
    }

    fn cache(bytes_max: u64, ttl_ms: u64, clock: Arc<ManualClock>) -> HotCache {
        HotCache::new(bytes_max, Duration::from_millis(ttl_ms), clock)
    }

    fn hit(cache: &HotCache, key: &[u8]) -> Option<Option<i64>> {
        match cache.lookup(key) {
            Lookup::Hit(row) => Some(row.map(|r| r.event_ts_us)),
            Lookup::Miss(_) => None,
        }
    }

    fn load(cache: &HotCache, key: &[u8], value: Option<Arc<StoredRow>>) {
        match cache.lookup(key) {
            Lookup::Miss(Some(guard)) => cache.fill(guard, value),
            _ => panic!("expected a fillable miss"),
        }
    }

    #[test]
    fn fill_then_hit_including_absent_rows() {
        let c = cache(1 << 20, 0, Arc::new(ManualClock::new(0)));
        load(&c, b"a", Some(row(1)));
        load(&c, b"b", None);
        assert_eq!(hit(&c, b"a"), Some(Some(1)));
        assert_eq!(hit(&c, b"b"), Some(None));
        assert_eq!(c.stats().hits, 2);
        assert_eq!(c.stats().misses, 2);
    }

    #[test]
    fn a_write_during_a_miss_stops_the_stale_fill() {
        let c = cache(1 << 20, 0, Arc::new(ManualClock::new(0)));
        tracing::info!("reader misses and reads the old row from storage");
        let Lookup::Miss(Some(guard)) = c.lookup(b"k") else {
            panic!("miss expected")
        };
        let old = row(1);
        tracing::info!("a writer commits a newer row and drops the key");
        c.invalidate(&[b"k"]);
        tracing::info!("the reader's fill of the old row must not land");
        c.fill(guard, Some(old));
        assert_eq!(hit(&c, b"k"), None);
    }

    #[test]
    fn concurrent_readers_do_not_wait_for_each_other() {
        let c = cache(1 << 20, 0, Arc::new(ManualClock::new(0)));
        let Lookup::Miss(Some(_first)) = c.lookup(b"k") else {
            panic!("miss expected")
        };
        assert!(matches!(c.lookup(b"k"), Lookup::Miss(None)));
    }

    #[test]
    fn entries_expire_by_the_clock() {
        let clock = Arc::new(ManualClock::new(0));
        let c = cache(1 << 20, 1_000, clock.clone());
        load(&c, b"k", Some(row(1)));
        clock.advance_us(1_000_000);
        assert_eq!(hit(&c, b"k"), Some(Some(1)));
        clock.advance_us(1);
        assert_eq!(hit(&c, b"k"), None);
        assert_eq!(c.stats().entries, 0);
    }

    #[test]
    fn view_invalidation_drops_only_that_view() {
        let c = cache(1 << 20, 0, Arc::new(ManualClock::new(0)));
        for view in [1u32, 2] {
            for key in ["a", "b", "c"] {
                load(&c, &storage_key(view, key.as_bytes()), Some(row(1)));
            }
        }
        assert_eq!(c.invalidate_view(1), 3);
        assert_eq!(hit(&c, &storage_key(1, b"a")), None);
        assert_eq!(hit(&c, &storage_key(2, b"a")), Some(Some(1)));
    }

    #[test]
    fn peek_answers_fresh_entries_and_reserves_nothing() {
        let clock = Arc::new(ManualClock::new(0));
        let c = cache(1 << 20, 1_000, clock.clone());
        assert!(c.peek(b"k").is_none());
        tracing::info!("a miss by peek leaves the key fillable by lookup");
        load(&c, b"k", Some(row(7)));
        load(&c, b"absent", None);
        assert_eq!(
            c.peek(b"k").map(|r| r.map(|r| r.event_ts_us)),
            Some(Some(7))
        );
        assert_eq!(c.peek(b"absent").map(|r| r.is_none()), Some(true));
        assert_eq!(c.stats().hits, 2);
        tracing::info!("an expired entry is not answered by peek");
        clock.advance_us(1_000_001);
        assert!(c.peek(b"k").is_none());
        tracing::info!("a disabled cache never answers");
        assert!(
            cache(0, 0, Arc::new(ManualClock::new(0)))
                .peek(b"k")
                .is_none()
        );
    }

    #[test]
    fn disabled_cache_always_misses() {
        let c = cache(0, 0, Arc::new(ManualClock::new(0)));
        assert!(matches!(c.lookup(b"k"), Lookup::Miss(None)));
        assert_eq!(c.stats().entries, 0);
    }

    fn last_known(bytes_max: u64, age_ms: u64, clock: Arc<ManualClock>) -> LastKnown {
        LastKnown::new(bytes_max, Duration::from_millis(age_ms), clock)
    }

    fn stamped(event: i64, written: i64) -> Arc<StoredRow> {
        Arc::new(StoredRow {
            event_ts_us: event,
            written_ts_us: written,
            values: vec![(1, Value::Int64(event))],
        })
    }

    #[test]
    fn last_known_keeps_the_newer_row_and_serves_it_within_its_age() {
        let clock = Arc::new(ManualClock::new(0));
        let known = last_known(1 << 20, 1_000, clock.clone());
        assert!(known.is_empty());
        known.remember(b"k", Some(&stamped(5, 5)), false);
        tracing::info!("an older row read later (a lagging replica) does not replace it");
        known.remember(b"k", Some(&stamped(4, 9)), false);
        assert_eq!(known.recall(b"k").map(|r| r.event_ts_us), Some(5));
        tracing::info!("same event time: the later write wins");
        known.remember(b"k", Some(&stamped(5, 6)), false);
        assert_eq!(known.recall(b"k").map(|r| r.written_ts_us), Some(6));
        tracing::info!("the leader's answer replaces it, older or absent");
        known.remember(b"k", Some(&stamped(3, 3)), true);
        assert_eq!(known.recall(b"k").map(|r| r.event_ts_us), Some(3));
        known.remember(b"k", None, true);
        assert!(known.recall(b"k").is_none());
        known.remember(b"k", Some(&stamped(5, 5)), false);
        tracing::info!("past its age bound it is not served");
        clock.advance_us(1_000_000);
        assert!(known.recall(b"k").is_some());
        clock.advance_us(1);
        assert!(known.recall(b"k").is_none());
        tracing::info!("nor does it keep an older replica row out");
        known.remember(b"k", Some(&stamped(2, 2)), false);
        assert_eq!(known.recall(b"k").map(|r| r.event_ts_us), Some(2));
        tracing::info!("an absent row (a tombstone, or not there yet) forgets it");
        known.remember(b"k", None, false);
        assert!(known.recall(b"k").is_none());
    }

    #[test]
    fn last_known_forgets_keys_and_views_and_can_be_off() {
        let clock = Arc::new(ManualClock::new(0));
        let known = last_known(1 << 20, 0, clock.clone());
        for view in [1u32, 2] {
            for key in ["a", "b"] {
                known.remember(
                    &storage_key(view, key.as_bytes()),
                    Some(&stamped(1, 1)),
                    true,
                );
            }
        }
        assert_eq!(known.usage().0, 4);
        known.forget(&[storage_key(1, b"a")]);
        assert!(known.recall(&storage_key(1, b"a")).is_none());
        assert!(known.recall(&storage_key(1, b"b")).is_some());
        known.forget_view(2);
        assert!(known.recall(&storage_key(2, b"a")).is_none());
        assert_eq!(known.usage().0, 1);
        tracing::info!("no age bound: served however old");
        clock.advance_us(i64::MAX / 2);
        assert!(known.recall(&storage_key(1, b"b")).is_some());
        let off = last_known(0, 0, clock);
        off.remember(b"k", Some(&stamped(1, 1)), true);
        assert!(off.recall(b"k").is_none());
        assert!(off.is_empty());
    }

    proptest! {
        /// What it recalls is the newest row remembered since the key was
        /// last forgotten (room for every key: nothing is evicted).
        #[test]
        fn last_known_recalls_the_newest(ops in proptest::collection::vec((0u8..3, 0u8..20, 0i64..50), 1..300)) {
            let known = last_known(1 << 20, 0, Arc::new(ManualClock::new(0)));
            let mut model: std::collections::HashMap<u8, i64> = Default::default();
            for (op, key, ts) in ops {
                let k = [key];
                match op {
                    0 => {
                        known.remember(&k, Some(&stamped(ts, 1)), false);
                        let newest = model.get(&key).map_or(ts, |&held| held.max(ts));
                        model.insert(key, newest);
                    }
                    1 => {
                        known.forget(&[k]);
                        model.remove(&key);
                    }
                    _ => {
                        prop_assert_eq!(
                            known.recall(&k).map(|found| found.event_ts_us),
                            model.get(&key).copied()
                        );
                    }
                }
            }
        }

        /// Under any sequence of fills, invalidations and inserts the cache
        /// stays within its byte bound and never returns a row other than the
        /// last one filled since the last invalidation.
        #[test]
        fn bounded_and_never_stale(ops in proptest::collection::vec((0u8..3, 0u8..20, any::<i64>()), 1..300)) {
            let c = cache(8 * 1024, 0, Arc::new(ManualClock::new(0)));
            let mut model: std::collections::HashMap<u8, i64> = Default::default();
            for (op, key, ts) in ops {
                let k = [key];
                match op {
                    0 => {
                        if let Lookup::Miss(Some(guard)) = c.lookup(&k) {
                            c.fill(guard, Some(row(ts)));
                            model.insert(key, ts);
                        }
                    }
                    1 => {
                        c.invalidate(&[k]);
                        model.remove(&key);
                    }
                    _ => {
                        if let Some(found) = hit(&c, &k) {
                            prop_assert_eq!(found, model.get(&key).copied());
                        }
                    }
                }
                prop_assert!(c.stats().bytes_used <= 8 * 1024 + 1024);
            }
        }
    }
}
