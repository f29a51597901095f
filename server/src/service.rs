//! The `quiver.v1.FeatureStore` gRPC service: thin handlers that move each
//! request onto a blocking thread (RocksDB calls block) and hand it to the
//! read path, the write path or the registry.

use quiver_engine::keys::storage_key;
use quiver_proto::v1 as pb;
use quiver_proto::v1::feature_store_server::FeatureStore;
use tonic::{Request, Response, Status, Streaming};

use crate::convert::{view_spec_from_pb, view_to_pb};
use crate::error::ServiceError;
use crate::node::{Node, NodeRef};
use crate::{read_path, write_path};

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

    async fn blocking<T, F>(&self, work: F) -> Result<T, Status>
    where
        T: Send + 'static,
        F: FnOnce(&Node) -> Result<T, ServiceError> + Send + 'static,
    {
        let node = self.node.clone();
        let result = tokio::task::spawn_blocking(move || work(&node))
            .await
            .map_err(ServiceError::from)?;
        result.map_err(Status::from)
    }
}

fn view_of<'a>(
    catalog: &'a quiver_engine::Catalog,
    name: &str,
) -> Result<&'a std::sync::Arc<quiver_engine::FeatureView>, ServiceError> {
    catalog
        .view(name)
        .ok_or_else(|| ServiceError::NotFound(format!("feature view {name:?} does not exist")))
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
        let (view, changed) = self
            .blocking(move |node| Ok(node.store.apply_view(spec)?))
            .await?;
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
        let views = self
            .node
            .store
            .registry()
            .load()
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
        self.blocking(move |node| {
            let view = node.store.delete_view(&name)?;
            node.cache.invalidate_view(view.id);
            tracing::info!(view = %view.name, "feature view deleted");
            Ok(())
        })
        .await?;
        Ok(Response::new(pb::DeleteFeatureViewResponse {}))
    }

    async fn write(
        &self,
        request: Request<pb::WriteRequest>,
    ) -> Result<Response<pb::WriteResponse>, Status> {
        let request = request.into_inner();
        let response = self
            .blocking(move |node| write_path::write(node, request))
            .await?;
        Ok(Response::new(response))
    }

    async fn write_stream(
        &self,
        request: Request<Streaming<pb::WriteRequest>>,
    ) -> Result<Response<pb::WriteResponse>, Status> {
        let mut stream = request.into_inner();
        let mut total = pb::WriteResponse::default();
        let mut messages = 0u64;
        // Each message is one atomic batch, applied in order. On a failure the
        // batches before it stay applied; the status says how many there were.
        while let Some(batch) = stream.message().await? {
            let applied = self
                .blocking(move |node| write_path::write(node, batch))
                .await;
            match applied {
                Ok(response) => {
                    total.rows_applied += response.rows_applied;
                    total.rows_stale += response.rows_stale;
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
        let request = request.into_inner();
        let response = self
            .blocking(move |node| read_path::get(node, request))
            .await?;
        Ok(Response::new(response))
    }

    async fn invalidate(
        &self,
        request: Request<pb::InvalidateRequest>,
    ) -> Result<Response<pb::InvalidateResponse>, Status> {
        let request = request.into_inner();
        // Blocking thread: a view-wide invalidation walks the whole cache.
        let entries_dropped = self
            .blocking(move |node| {
                ServiceError::check_limit(
                    "number of entity keys",
                    request.entity_keys.len(),
                    "limits.get_keys_max",
                    node.limits.get_keys_max,
                )?;
                let catalog = node.store.registry().load();
                let view = view_of(&catalog, &request.view)?;
                if request.entity_keys.is_empty() {
                    return Ok(node.cache.invalidate_view(view.id));
                }
                for key in &request.entity_keys {
                    node.check_entity_key(key)?;
                }
                let keys: Vec<Vec<u8>> = request
                    .entity_keys
                    .iter()
                    .map(|k| storage_key(view.id, k.as_bytes()))
                    .collect();
                Ok(node.cache.invalidate(&keys))
            })
            .await?;
        Ok(Response::new(pb::InvalidateResponse { entries_dropped }))
    }

    async fn delete(
        &self,
        request: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        let request = request.into_inner();
        let rows_deleted = self
            .blocking(move |node| {
                if request.entity_keys.is_empty() {
                    return Err(ServiceError::invalid(
                        "no entity keys given (to drop every row of a view, delete the view)",
                    ));
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
                let catalog = node.store.registry().load();
                let view = view_of(&catalog, &request.view)?;
                let deleted = node.store.delete_rows(view.id, &request.entity_keys)?;
                node.cache.invalidate(&deleted);
                Ok(deleted.len() as u64)
            })
            .await?;
        Ok(Response::new(pb::DeleteResponse { rows_deleted }))
    }

    async fn status(
        &self,
        _request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let node = &self.node;
        let stats = node.store.stats();
        let cache = node.cache.stats();
        Ok(Response::new(pb::StatusResponse {
            node_version: env!("CARGO_PKG_VERSION").to_owned(),
            listen_addr: node.listen_addr.to_string(),
            data_dir: node.store.path().display().to_string(),
            uptime_seconds: node.started.elapsed().as_secs(),
            feature_views: u32::try_from(node.store.registry().load().len()).unwrap_or(u32::MAX),
            rows_estimate: stats.rows_estimate,
            rows_written: stats.rows_written,
            rows_stale: stats.rows_stale,
            cache: Some(pb::CacheStatus {
                entries: cache.entries,
                bytes_used: cache.bytes_used,
                bytes_max: cache.bytes_max,
                hits: cache.hits,
                misses: cache.misses,
            }),
        }))
    }
}
