//! The write path: check rows against limits and the view's schema, apply them
//! last-write-wins, drop the changed rows from the hot cache, then reply.

use quiver_engine::RowWrite;
use quiver_engine::clock::MICROS_PER_SECOND;
use quiver_proto::v1 as pb;

use crate::convert::value_from_pb;
use crate::error::ServiceError;
use crate::node::Node;

/// Applies one batch of rows of one view. Blocking: call from a blocking
/// thread. Atomic: either every row is applied (or ignored as stale) or none.
pub fn write(node: &Node, request: pb::WriteRequest) -> Result<pb::WriteResponse, ServiceError> {
    let limits = &node.limits;
    ServiceError::check_limit(
        "number of rows",
        request.rows.len(),
        "limits.write_rows_max",
        limits.write_rows_max,
    )?;
    let catalog = node.store.registry().load();
    let view = catalog
        .view(&request.view)
        .ok_or_else(|| {
            ServiceError::NotFound(format!("feature view {:?} does not exist", request.view))
        })?
        .clone();
    if request.rows.is_empty() {
        return Ok(pb::WriteResponse::default());
    }
    let now_us = node.store.clock().now_us();
    let future_us_max = i64::try_from(limits.event_ts_future_seconds_max)
        .unwrap_or(i64::MAX)
        .saturating_mul(MICROS_PER_SECOND);
    let mut rows = Vec::with_capacity(request.rows.len());
    for (index, row) in request.rows.into_iter().enumerate() {
        let context = |message: String| {
            ServiceError::invalid(format!(
                "row {index} (entity {:?}): {message}",
                row.entity_key
            ))
        };
        node.check_entity_key(&row.entity_key)
            .map_err(|e| context(e.to_string()))?;
        if row.event_ts_us <= 0 {
            return Err(context("event_ts_us is missing or not positive".into()));
        }
        if row.event_ts_us.saturating_sub(now_us) > future_us_max {
            return Err(context(format!(
                "event_ts_us {} is more than {}s in the future (limits.event_ts_future_seconds_max)",
                row.event_ts_us, limits.event_ts_future_seconds_max
            )));
        }
        let mut values = Vec::with_capacity(row.values.len());
        for (name, value) in row.values {
            let value = value_from_pb(value);
            if value.payload_bytes() as u64 > limits.value_bytes_max {
                return Err(context(format!(
                    "value of {name:?} is {} bytes, the limit (limits.value_bytes_max) is {}",
                    value.payload_bytes(),
                    limits.value_bytes_max
                )));
            }
            values.push((name, value));
        }
        let values = view.row_values(values)?;
        rows.push(RowWrite {
            entity_key: row.entity_key,
            event_ts_us: row.event_ts_us,
            values,
        });
    }
    let outcome = node.store.write_rows(view.id, &rows)?;
    node.cache.invalidate(&outcome.changed_keys);
    Ok(pb::WriteResponse {
        rows_applied: outcome.rows_applied,
        rows_stale: outcome.rows_stale,
    })
}
