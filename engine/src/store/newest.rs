//! Upper bounds on the event times a store holds, so that a write whose row
//! is at least as new as anything stored under its key skips reading the
//! stored row (last write wins by event time: such a row wins whatever is
//! there).

use std::collections::HashMap;

use crate::keys::ViewId;

/// Key-hash buckets of the since-open bounds: 32 KiB per store written to
/// since it opened. More buckets make two concurrent writers' rows less
/// likely to share one (each such collision costs the older row a read).
const RECENT_BUCKETS: usize = 4096;

/// Two kinds of bound, each an upper bound on a stored row's event time; a
/// row's bound is the lower of the two.
/// - Per view: the newest event time of any row of the view in the store,
///   persisted with the rows that raise it, so it covers rows written before
///   the store opened (and comes along in a checkpoint). Alone it is coarse:
///   16 writers stamping rows with their own clocks interleave, and half of
///   their rows came out older than some row of another writer.
/// - Per key-hash bucket, in memory: the newest event time written since
///   the store opened, any view, joined with the view's bound as of the open
///   (which covers every row older than the open).
#[derive(Debug)]
pub(super) struct NewestEvents {
    by_view: HashMap<ViewId, i64>,
    at_open: HashMap<ViewId, i64>,
    recent: Option<Box<[i64]>>,
}

impl NewestEvents {
    /// Bounds that cover every row of a store whose per-view bounds are
    /// `by_view` (a view without one has no rows there).
    pub(super) fn new(by_view: HashMap<ViewId, i64>) -> Self {
        Self {
            at_open: by_view.clone(),
            by_view,
            recent: None,
        }
    }

    /// The persisted bound of `view_id`: `i64::MIN` if it has no rows.
    pub(super) fn view(&self, view_id: ViewId) -> i64 {
        self.by_view.get(&view_id).copied().unwrap_or(i64::MIN)
    }

    /// The bound of each storage key of `view_id`: no row stored at the key
    /// has a later event time. The view's lookups are done once, not per
    /// row.
    pub(super) fn bounds_of(&self, view_id: ViewId) -> impl Fn(&[u8]) -> i64 + '_ {
        let view = self.view(view_id);
        let at_open = self.at_open.get(&view_id).copied().unwrap_or(i64::MIN);
        move |key| {
            let recent = self
                .recent
                .as_ref()
                .map_or(i64::MIN, |recent| recent[bucket(key)]);
            view.min(at_open.max(recent))
        }
    }

    /// Notes a row written at `key` with `event_ts_us`. Called before the
    /// write reaches the disk: a bound too high only costs a read.
    pub(super) fn record(&mut self, key: &[u8], event_ts_us: i64) {
        let recent = self
            .recent
            .get_or_insert_with(|| vec![i64::MIN; RECENT_BUCKETS].into_boxed_slice());
        let slot = &mut recent[bucket(key)];
        *slot = (*slot).max(event_ts_us);
    }

    /// Raises the persisted bound of `view_id`, once the batch that stores
    /// it (and the rows that raised it) is written.
    pub(super) fn raise_view(&mut self, view_id: ViewId, event_ts_us: i64) {
        let bound = self.by_view.entry(view_id).or_insert(i64::MIN);
        *bound = (*bound).max(event_ts_us);
    }
}

/// The bucket of a storage key: low bits of its entity hash (a shard holds
/// one arc of the ring, so the high bits barely vary within it).
pub(super) fn bucket(key: &[u8]) -> usize {
    let hash = key
        .get(..8)
        .and_then(|bytes| <[u8; 8]>::try_from(bytes).ok())
        .map_or(0, u64::from_be_bytes);
    (hash as usize) & (RECENT_BUCKETS - 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::storage_key;

    #[test]
    fn a_row_s_bound_is_the_lower_of_its_view_s_and_its_bucket_s() {
        let mut newest = NewestEvents::new(HashMap::from([(1, 100)]));
        let (a, b) = (storage_key(1, b"a"), storage_key(1, b"b"));
        assert_ne!(bucket(&a), bucket(&b));
        // Nothing written since open: the view's bound at the open.
        assert_eq!(newest.bounds_of(1)(&a), 100);
        assert_eq!(newest.bounds_of(2)(&a), i64::MIN);
        newest.record(&a, 500);
        newest.raise_view(1, 500);
        assert_eq!(newest.bounds_of(1)(&a), 500);
        // Another bucket still only has what the open covered.
        assert_eq!(newest.bounds_of(1)(&b), 100);
        // Buckets are shared across views; a view's own bound caps them.
        newest.record(&storage_key(2, b"a"), 900);
        newest.raise_view(2, 900);
        assert_eq!(newest.bounds_of(1)(&a), 500);
        assert_eq!(newest.bounds_of(2)(&storage_key(2, b"b")), i64::MIN);
        // A bound never goes down.
        newest.record(&a, 10);
        newest.raise_view(1, 10);
        assert_eq!(newest.bounds_of(1)(&a), 500);
    }
}
