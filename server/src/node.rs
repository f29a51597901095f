//! One quiverd node's shared state: its cluster (the Raft groups it hosts and
//! the routes to the others), the feature-view registry, the hot cache and
//! the limits.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quiver_engine::store::BlockCache;
use quiver_engine::{Catalog, Clock, FeatureView, Registry, StoreOptions, SystemClock};

use quiver_raft::{Command, GroupId, RequestId, Response as Applied};

use crate::admission::Admission;
use crate::cache::HotCache;
use crate::cluster::{Cluster, ClusterError, StartOptions};
use crate::config::{Config, Limits};
use crate::error::ServiceError;

/// Memtable size of each group's store: a node holds many groups, so each
/// gets a small one.
const GROUP_WRITE_BUFFER_BYTES: usize = 16 << 20;

/// Everything a request handler needs.
#[derive(Debug)]
pub struct Node {
    /// The groups hosted here and routing to the rest.
    pub cluster: Arc<Cluster>,
    /// The feature-view registry, kept by the metadata group.
    pub registry: Registry,
    /// The hot row cache, kept coherent by every local replica's apply.
    pub cache: Arc<HotCache>,
    /// The node's clock.
    pub clock: Arc<dyn Clock>,
    /// Per-request limits.
    pub limits: Limits,
    /// Bounds on the work in flight.
    pub admission: Admission,
    /// The address the gRPC server is bound to.
    pub listen_addr: SocketAddr,
    /// The data directory.
    pub data_dir: PathBuf,
    /// When the node started.
    pub started: Instant,
}

impl Node {
    /// Proposes one command per shard in parallel and hands each response to
    /// `add`, which returns it back as `Err` if it is not the kind expected.
    /// A retry answered `AlreadyApplied` (its first attempt committed but the
    /// answer was lost) counts as done and adds nothing. Waits for every
    /// shard, then fails with the first error: shards that committed stay
    /// committed.
    pub async fn propose_all(
        &self,
        proposals: impl IntoIterator<Item = (GroupId, Command)>,
        request_id: Option<RequestId>,
        mut add: impl FnMut(Applied) -> Result<(), Applied>,
    ) -> Result<(), ServiceError> {
        let futures = proposals
            .into_iter()
            .map(|(shard, command)| self.cluster.propose_with_id(shard, command, request_id));
        let mut first_error = None;
        for result in futures::future::join_all(futures).await {
            let outcome = match result {
                Ok((Applied::AlreadyApplied, _)) => Ok(()),
                Ok((response, _)) => add(response).map_err(|other| {
                    ServiceError::TaskFailed(format!("unexpected response {other:?}"))
                }),
                Err(e) => Err(e.into()),
            };
            if let Err(e) = outcome {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Opens the node's groups as configured and starts their Raft instances.
    pub async fn open(config: &Config, listen_addr: SocketAddr) -> Result<Node, ClusterError> {
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let registry = Registry::default();
        let cache = Arc::new(HotCache::new(
            config.cache.bytes_max,
            Duration::from_millis(config.cache.entry_ttl_ms),
            clock.clone(),
        ));
        let block_cache_bytes = usize::try_from(config.block_cache_bytes).unwrap_or(usize::MAX);
        let store = StoreOptions {
            // The Raft log is the durable record: an entry is fsynced there
            // before it is acknowledged, and a crashed store replays it.
            sync_writes: false,
            block_cache_bytes,
            write_buffer_bytes: GROUP_WRITE_BUFFER_BYTES,
            ttl_grace_us: i64::try_from(config.ttl_grace_seconds).unwrap_or(i64::MAX / 1_000_000)
                * 1_000_000,
            clock: clock.clone(),
            block_cache: Some(BlockCache::new_lru_cache(block_cache_bytes)),
            registry: Some(registry.clone()),
            load_catalog: false,
        };
        let cluster = Cluster::start(
            &config.cluster,
            StartOptions {
                data_dir: &config.data_dir,
                self_addr: listen_addr.to_string(),
                store,
                observer: cache.clone(),
                clock: clock.clone(),
                sync_log: config.sync_writes,
            },
        )
        .await?;
        Ok(Node {
            cluster,
            registry,
            cache,
            clock,
            limits: config.limits.clone(),
            admission: Admission::new(&config.limits),
            listen_addr,
            data_dir: config.data_dir.clone(),
            started: Instant::now(),
        })
    }

    /// Checks an entity key against the limits.
    pub fn check_entity_key(&self, key: &str) -> Result<(), ServiceError> {
        if key.is_empty() {
            return Err(ServiceError::invalid("entity key is empty"));
        }
        ServiceError::check_limit(
            "entity key length in bytes",
            key.len(),
            "limits.entity_key_bytes_max",
            self.limits.entity_key_bytes_max,
        )
    }

    /// The current catalog; if it lacks one of `names`, first catches this
    /// node's metadata replica up with the leader (the view may have been
    /// applied through another node a moment ago).
    pub async fn catalog_with(&self, names: &[&str]) -> Arc<Catalog> {
        let catalog = self.registry.load_full();
        if names.iter().all(|name| catalog.view(name).is_some()) {
            return catalog;
        }
        self.cluster.sync_metadata().await;
        self.registry.load_full()
    }

    /// The named view, after catching up with the metadata leader if needed.
    pub async fn view(&self, name: &str) -> Result<Arc<FeatureView>, ServiceError> {
        self.catalog_with(&[name])
            .await
            .view(name)
            .cloned()
            .ok_or_else(|| ServiceError::NotFound(format!("feature view {name:?} does not exist")))
    }
}

/// Shared handle to a node.
pub type NodeRef = Arc<Node>;
