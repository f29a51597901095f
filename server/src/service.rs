//! The `quiver.v1.FeatureStore` gRPC service: thin handlers that check the
//! request and hand it to the read path, the write path, or the cluster
//! (registry changes, deletes and invalidations are replicated commands).

use std::time::Duration;

use quiver_proto::v1 as pb;
use quiver_proto::v1::feature_store_server::FeatureStore;
use quiver_raft::{Command, GroupId, METADATA_GROUP, Response as Applied};
use tonic::{Request, Response, Status, Streaming};

use crate::convert::{view_spec_from_pb, view_to_pb};
use crate::error::ServiceError;
use crate::node::{Caller, Node, NodeRef, VIEW_CHANGE_ACK_DELAY};
use crate::{read_path, write_path};

/// How long a registry change waits for this node's metadata replica to
/// apply it, so the next request through this node sees it.
const REGISTRY_APPLY_WAIT: Duration = Duration::from_secs(10);

/// The service, sharing one [`Node`].
#[derive(Debug, Clone)]
pub struct FeatureStoreService {
    node: NodeRef,
}

impl FeatureStoreService {
    /// A service over `node`.
    pub fn new(node: NodeRef) -> Self {
        Self { node }
    }
}

/// One command per shard touched by `keys`.
fn per_shard(
    node: &Node,
    keys: Vec<String>,
    command: impl Fn(Vec<String>) -> Command,
) -> Vec<(GroupId, Command)> {
    node.cluster
        .placement()
        .by_shard(keys, |key| key.as_str())
        .into_iter()
        .map(|(shard, keys)| (shard, command(keys)))
        .collect()
}

/// The caller's deadline from its `grpc-timeout` header (gRPC's format:
/// at most 8 digits and a unit, H M S m u n); none if absent or malformed
/// (tonic enforces it either way; this only lets a degraded Get plan).
fn grpc_timeout(metadata: &tonic::metadata::MetadataMap) -> Option<Duration> {
    let value = metadata.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    // `to_str` succeeded, so the value is visible ASCII and the split above
    // fell on a character boundary; the spec allows digits only (no sign).
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount.checked_mul(3600)?),
        "M" => Duration::from_secs(amount.checked_mul(60)?),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

#[tonic::async_trait]
impl FeatureStore for FeatureStoreService {
    async fn apply_feature_view(
        &self,
        request: Request<pb::ApplyFeatureViewRequest>,
    ) -> Result<Response<pb::ApplyFeatureViewResponse>, Status> {
        let view = request
            .into_inner()
            .view
            .ok_or_else(|| Status::invalid_argument("no view given"))?;
        let spec = view_spec_from_pb(view)?;
        let name = spec.name.clone();
        let node = &self.node;
        let proposed = node
            .cluster
            .propose(METADATA_GROUP, Command::ApplyView { spec })
            .await;
        // Every node's client calls may answer from a catalog catch-up up
        // to this old: after the wait, none is older than the commit. A
        // refusal waits too: it may rest on a change committed a moment ago.
        tokio::time::sleep(VIEW_CHANGE_ACK_DELAY).await;
        let (response, log_id) = proposed.map_err(ServiceError::from)?;
        // Committed: the view is applied whatever happens next. Writes and
        // STRONG reads through any node resolve names at the metadata
        // leader's position (under its lease, or at a read index), so they
        // see it even if this node's replica is slow; the wait only spares
        // this node's next LEADER read a catch-up.
        if !node
            .cluster
            .wait_applied(METADATA_GROUP, log_id.index, REGISTRY_APPLY_WAIT)
            .await
        {
            tracing::warn!(
                index = log_id.index,
                "the committed view change is not applied here yet"
            );
        }
        let (view, changed) = match response {
            Applied::ViewApplied { view, changed } => (*view, changed),
            // A retry of an apply that had committed: report the view as
            // it now stands.
            Applied::AlreadyApplied => (
                node.fresh_catalog()
                    .await?
                    .view(&name)
                    .map(|v| (**v).clone())
                    .ok_or_else(|| {
                        ServiceError::NotFound(format!("feature view {name:?} does not exist"))
                    })?,
                true,
            ),
            other => {
                return Err(
                    ServiceError::TaskFailed(format!("unexpected response {other:?}")).into(),
                );
            }
        };
        if changed {
            tracing::info!(view = %view.name, version = view.version, "feature view applied");
        }
        Ok(Response::new(pb::ApplyFeatureViewResponse {
            view: Some(view_to_pb(&view)),
            changed,
        }))
    }

    async fn list_feature_views(
        &self,
        _request: Request<pb::ListFeatureViewsRequest>,
    ) -> Result<Response<pb::ListFeatureViewsResponse>, Status> {
        // A view applied through another node a moment ago is listed.
        let views = self
            .node
            .fresh_catalog()
            .await?
            .views()
            .iter()
            .map(|v| view_to_pb(v))
            .collect();
        Ok(Response::new(pb::ListFeatureViewsResponse { views }))
    }

    async fn delete_feature_view(
        &self,
        request: Request<pb::DeleteFeatureViewRequest>,
    ) -> Result<Response<pb::DeleteFeatureViewResponse>, Status> {
        let name = request.into_inner().name;
        let node = &self.node;
        let proposed = node
            .cluster
            .propose(METADATA_GROUP, Command::DeleteView { name: name.clone() })
            .await;
        // As in apply_feature_view; a "no such view" may rest on a delete
        // committed a moment ago.
        tokio::time::sleep(VIEW_CHANGE_ACK_DELAY).await;
        let (_, log_id) = proposed.map_err(ServiceError::from)?;
        node.cluster
            .wait_applied(METADATA_GROUP, log_id.index, REGISTRY_APPLY_WAIT)
            .await;
        node.view_freshness.forget(&name);
        tracing::info!(view = %name, "feature view deleted");
        Ok(Response::new(pb::DeleteFeatureViewResponse {}))
    }

    async fn write(
        &self,
        request: Request<pb::WriteRequest>,
    ) -> Result<Response<pb::WriteResponse>, Status> {
        let response = write_path::write(&self.node, request.into_inner()).await?;
        Ok(Response::new(response))
    }

    async fn write_stream(
        &self,
        request: Request<Streaming<pb::WriteRequest>>,
    ) -> Result<Response<pb::WriteResponse>, Status> {
        let mut stream = request.into_inner();
        let mut total = pb::WriteResponse::default();
        let mut messages = 0u64;
        // Each message is one Write (checked as a whole, committed per shard),
        // applied in order. On a failure the messages before it stay applied;
        // the status says how many there were.
        while let Some(batch) = stream.message().await? {
            let applied = write_path::write(&self.node, batch)
                .await
                .map_err(Status::from);
            match applied {
                Ok(response) => {
                    total.rows_applied += response.rows_applied;
                    total.rows_stale += response.rows_stale;
                    total.rows_forwarded += response.rows_forwarded;
                    messages += 1;
                }
                Err(status) => {
                    return Err(Status::new(
                        status.code(),
                        format!(
                            "message {messages} of the stream failed after {messages} messages ({} rows) were applied: {}",
                            total.rows_applied,
                            status.message()
                        ),
                    ));
                }
            }
        }
        Ok(Response::new(total))
    }

    async fn get(
        &self,
        request: Request<pb::GetRequest>,
    ) -> Result<Response<pb::GetResponse>, Status> {
        // The deadline counts from the call's arrival, admission included.
        let deadline =
            grpc_timeout(request.metadata()).map(|timeout| (tokio::time::Instant::now(), timeout));
        let response = read_path::get(&self.node, request.into_inner(), deadline).await?;
        Ok(Response::new(response))
    }

    async fn invalidate(
        &self,
        request: Request<pb::InvalidateRequest>,
    ) -> Result<Response<pb::InvalidateResponse>, Status> {
        let request = request.into_inner();
        let node = &self.node;
        ServiceError::check_limit(
            "number of entity keys",
            request.entity_keys.len(),
            "limits.get_keys_max",
            node.limits.get_keys_max,
        )?;
        for key in &request.entity_keys {
            node.check_entity_key(key)?;
        }
        let view = node.view(&request.view).await?;
        // Replicated, so every replica's node drops the rows. A whole view
        // goes through the metadata group: every node holds a replica of it,
        // so each node walks its cache once (not once per shard it hosts).
        let proposals: Vec<(GroupId, Command)> = if request.entity_keys.is_empty() {
            vec![(
                METADATA_GROUP,
                Command::Invalidate {
                    view_id: view.id,
                    entity_keys: Vec::new(),
                },
            )]
        } else {
            per_shard(node, request.entity_keys, |entity_keys| {
                Command::Invalidate {
                    view_id: view.id,
                    entity_keys,
                }
            })
        };
        let mut entries_dropped = 0;
        node.propose_all(proposals, None, Caller::Client, |response| match response {
            Applied::Invalidated {
                entries_dropped: dropped,
            } => {
                entries_dropped += dropped;
                Ok(())
            }
            other => Err(other),
        })
        .await?;
        Ok(Response::new(pb::InvalidateResponse { entries_dropped }))
    }

    async fn delete(
        &self,
        request: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        let request = request.into_inner();
        let node = &self.node;
        if request.entity_keys.is_empty() {
            return Err(ServiceError::invalid(
                "no entity keys given (to drop every row of a view, delete the view)",
            )
            .into());
        }
        ServiceError::check_limit(
            "number of entity keys",
            request.entity_keys.len(),
            "limits.write_rows_max",
            node.limits.write_rows_max,
        )?;
        for key in &request.entity_keys {
            node.check_entity_key(key)?;
        }
        let view = node.view(&request.view).await?;
        let proposals = per_shard(node, request.entity_keys, |entity_keys| Command::Delete {
            view_id: view.id,
            entity_keys,
        });
        let mut rows_deleted = 0;
        node.propose_all(proposals, None, Caller::Client, |response| match response {
            Applied::Deleted { rows_deleted: n } => {
                rows_deleted += n;
                Ok(())
            }
            other => Err(other),
        })
        .await?;
        Ok(Response::new(pb::DeleteResponse { rows_deleted }))
    }

    async fn status(
        &self,
        _request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let node = &self.node;
        let cache = node.cache.stats();
        let (mut rows_estimate, mut rows_written, mut rows_stale) = (0, 0, 0);
        for (_, group) in node.cluster.groups() {
            let stats = group.state.store().stats();
            rows_estimate += stats.rows_estimate;
            rows_written += stats.rows_written;
            rows_stale += stats.rows_stale;
        }
        let placement = node.cluster.placement();
        Ok(Response::new(pb::StatusResponse {
            node_version: env!("CARGO_PKG_VERSION").to_owned(),
            listen_addr: node.listen_addr.to_string(),
            data_dir: node.data_dir.display().to_string(),
            uptime_seconds: node.started.elapsed().as_secs(),
            feature_views: u32::try_from(
                crate::node::settled(node.registry.load_full()).await.len(),
            )
            .unwrap_or(u32::MAX),
            rows_estimate,
            rows_written,
            rows_stale,
            node_id: node.cluster.node_id,
            nodes: placement
                .map
                .nodes
                .iter()
                .filter(|(_, info)| info.state != quiver_raft::cluster_map::NodeState::Removed)
                .map(|(id, info)| pb::NodeStatus {
                    node_id: *id,
                    addr: info.addr.clone(),
                })
                .collect(),
            groups: node.cluster.group_status(),
            shard_count: u32::try_from(placement.map.shards.len()).unwrap_or(u32::MAX),
            replication_factor: placement.map.replication_factor,
            cache: Some(pb::CacheStatus {
                entries: cache.entries,
                bytes_used: cache.bytes_used,
                bytes_max: cache.bytes_max,
                hits: cache.hits,
                misses: cache.misses,
            }),
        }))
    }

    async fn get_routes(
        &self,
        _request: Request<pb::GetRoutesRequest>,
    ) -> Result<Response<pb::GetRoutesResponse>, Status> {
        let cluster = &self.node.cluster;
        let placement = cluster.placement();
        let map = &placement.map;
        let nodes = map
            .nodes
            .iter()
            .filter(|&(&node_id, _)| placement.is_member(node_id))
            .map(|(&node_id, info)| pb::RouteNode {
                node_id,
                addr: info.addr.clone(),
                state: info.state.to_string(),
            })
            .collect();
        let shards = map
            .shards
            .iter()
            .map(|(&shard, desc)| pb::ShardRoute {
                shard,
                start: desc.start,
                end: desc.end.unwrap_or(0),
                to_end: desc.end.is_none(),
                leader_node_id: cluster.leader_of(shard).unwrap_or(0),
                voter_node_ids: desc.voters().map(quiver_raft::ReplicaId::node).collect(),
            })
            .collect();
        Ok(Response::new(pb::GetRoutesResponse {
            map_version: if placement.replicated { map.version } else { 0 },
            nodes,
            shards,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_and_bad_ones_are_ignored() {
        let with = |value: &str| {
            let mut metadata = tonic::metadata::MetadataMap::new();
            metadata.insert("grpc-timeout", value.parse().unwrap());
            grpc_timeout(&metadata)
        };
        assert_eq!(with("300m"), Some(Duration::from_millis(300)));
        assert_eq!(with("2S"), Some(Duration::from_secs(2)));
        assert_eq!(with("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(with("99999999n"), Some(Duration::from_nanos(99_999_999)));
        for bad in ["", "m", "300", "300x", "123456789m", "-1m", "+5m", "1.5S"] {
            assert_eq!(with(bad), None, "{bad:?}");
        }
        assert_eq!(grpc_timeout(&tonic::metadata::MetadataMap::new()), None);
    }
}
