//! The write path: check rows against limits and the view's schema, group
//! them by shard, propose one entry per shard to its leader (in parallel),
//! and reply once every shard has committed and applied its entry. Replicas
//! apply last-write-wins and drop the changed rows from their node's hot
//! cache as they apply.

use quiver_engine::RowWrite;
use quiver_engine::clock::MICROS_PER_SECOND;
use quiver_proto::v1 as pb;
use quiver_raft::{Command, GroupId, RequestId, Response};

use crate::convert::value_from_pb;
use crate::error::ServiceError;
use crate::node::{Caller, Node};

/// Applies one batch of rows of one view. The whole batch is checked before
/// anything is proposed, so a bad row stores nothing; each shard's part is
/// one atomic Raft entry.
pub async fn write(
    node: &Node,
    request: pb::WriteRequest,
) -> Result<pb::WriteResponse, ServiceError> {
    let limits = &node.limits;
    ServiceError::check_limit(
        "number of rows",
        request.rows.len(),
        "limits.write_rows_max",
        limits.write_rows_max,
    )?;
    let request_id = request_id_of(&request.request_id)?;
    let _admitted = node.admission.write(request.rows.len()).await?;
    let view = node.view(&request.view).await?;
    if request.rows.is_empty() {
        return Ok(pb::WriteResponse::default());
    }
    let now_us = node.clock.now_us();
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
    let newest_event_us = rows.iter().map(|row| row.event_ts_us).max();
    let by_shard = node
        .cluster
        .placement()
        .by_shard(rows, |row| row.entity_key.as_str());
    let rows_by_shard: Vec<(GroupId, u64)> = by_shard
        .iter()
        .map(|(&shard, rows)| (shard, rows.len() as u64))
        .collect();
    let proposals = by_shard.into_iter().map(|(shard, rows)| {
        let command = Command::Write {
            view_id: view.id,
            rows,
        };
        (shard, command)
    });
    // On error, shards that committed stay committed; the request as a whole
    // may be retried (writes are idempotent: last-write-wins by event time).
    let mut response = pb::WriteResponse::default();
    node.propose_all(
        proposals,
        request_id,
        Caller::Client,
        |applied| match applied {
            Response::Written {
                rows_applied,
                rows_stale,
            } => {
                response.rows_applied += rows_applied;
                response.rows_stale += rows_stale;
                Ok(())
            }
            other => Err(other),
        },
    )
    .await?;
    // Rows that went to a leader elsewhere: a client routing by GetRoutes
    // learns its routes are stale. Judged after the proposals, by the
    // leader this node now knows for each shard (its replica's view, else
    // where its last request for the shard went): a leader change in the
    // meantime can make it off by a shard's rows, which only costs the
    // client a refresh too many or too few.
    response.rows_forwarded = rows_by_shard
        .iter()
        .filter(|&&(shard, _)| node.cluster.leader_of(shard) != Some(node.cluster.node_id))
        .map(|&(_, rows)| rows)
        .sum();
    if let Some(newest) = newest_event_us {
        node.view_freshness.written(&view.name, newest);
    }
    Ok(response)
}

/// The client's idempotency key: none, or exactly 16 bytes (not all zero,
/// which means "no id" to the state machine).
fn request_id_of(bytes: &[u8]) -> Result<Option<RequestId>, ServiceError> {
    if bytes.is_empty() {
        return Ok(None);
    }
    let id: [u8; 16] = bytes.try_into().map_err(|_| {
        ServiceError::invalid(format!(
            "request_id is {} bytes; it must be empty or exactly 16",
            bytes.len()
        ))
    })?;
    match u128::from_be_bytes(id) {
        0 => Err(ServiceError::invalid("request_id must not be all zero")),
        id => Ok(Some(id)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_empty_or_sixteen_nonzero_bytes() {
        assert_eq!(request_id_of(&[]).ok(), Some(None));
        assert_eq!(
            request_id_of(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7]).ok(),
            Some(Some(7))
        );
        assert!(request_id_of(&[1; 15]).is_err());
        assert!(request_id_of(&[1; 17]).is_err());
        assert!(request_id_of(&[0; 16]).is_err());
    }
}
