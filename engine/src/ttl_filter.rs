//! The data column family's compaction filter: drops rows past their view's
//! ttl plus a grace period, and rows of deleted views. It runs on RocksDB's
//! background threads, so it reads the catalog lock-free and never panics.

use std::sync::Arc;

use rocksdb::compaction_filter::Decision;

use crate::clock::Clock;
use crate::codec::peek_event_ts;
use crate::keys::split_storage_key;
use crate::registry::Registry;

/// Name RocksDB logs for the filter.
pub(crate) const FILTER_NAME: &str = "quiver-ttl";

/// Builds the filter closure.
pub(crate) fn ttl_filter(
    registry: Registry,
    clock: Arc<dyn Clock>,
    grace_us: i64,
) -> impl FnMut(u32, &[u8], &[u8]) -> Decision + Send + 'static {
    move |_level, key, value| {
        // Never drop what we do not understand: a malformed key stays for
        // the operator to see.
        let Some((_, view_id, _)) = split_storage_key(key) else {
            return Decision::Keep;
        };
        let catalog = registry.load();
        if catalog.is_dropped(view_id) {
            return Decision::Remove;
        }
        let Some(view) = catalog.view_by_id(view_id) else {
            return Decision::Keep;
        };
        let ttl_us = view.ttl_us();
        if ttl_us == 0 {
            return Decision::Keep;
        }
        match peek_event_ts(value) {
            Ok(event_ts_us)
                if clock.now_us().saturating_sub(event_ts_us) > ttl_us.saturating_add(grace_us) =>
            {
                Decision::Remove
            }
            _ => Decision::Keep,
        }
    }
}
