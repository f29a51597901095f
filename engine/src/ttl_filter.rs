//! The data column family's compaction filter: drops rows (and tombstones)
//! below their view's replicated expiry floor, and rows of deleted views.
//!
//! It never reads a clock or a ttl: what is expired is decided once, in the
//! replicated log (`StateStore::advance_expiry`), so every replica drops the
//! same rows whenever its compactions happen to run, and reads mask rows
//! below the floor, so whether a row was physically dropped yet is never
//! visible. It runs on RocksDB's background threads: lock-free reads only,
//! and it never panics.

use std::sync::Arc;

use rocksdb::compaction_filter::Decision;

use crate::codec::peek_event_ts;
use crate::keys::split_storage_key;
use crate::registry::Registry;
use crate::store::ExpiryFloors;

/// Name RocksDB logs for the filter.
pub(crate) const FILTER_NAME: &str = "quiver-expiry";

/// Builds the filter closure.
pub(crate) fn expiry_filter(
    registry: Registry,
    floors: Arc<arc_swap::ArcSwap<ExpiryFloors>>,
) -> impl FnMut(u32, &[u8], &[u8]) -> Decision + Send + 'static {
    move |_level, key, value| {
        // Never drop what we do not understand: a malformed key stays for
        // the operator to see.
        let Some((_, view_id, _)) = split_storage_key(key) else {
            return Decision::Keep;
        };
        // A deleted view's id is never reused and no read resolves to it,
        // so when each replica learns of the delete changes no answer.
        if registry.load().is_dropped(view_id) {
            return Decision::Remove;
        }
        let Some(&floor_us) = floors.load().get(&view_id) else {
            return Decision::Keep;
        };
        match peek_event_ts(value) {
            Ok(event_ts_us) if event_ts_us < floor_us => Decision::Remove,
            _ => Decision::Keep,
        }
    }
}
