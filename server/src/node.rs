//! One quiverd node's shared state: the store, the hot cache and the limits.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quiver_engine::{EngineError, StateStore, StoreOptions, SystemClock};

use crate::cache::HotCache;
use crate::config::{Config, Limits};
use crate::error::ServiceError;

/// Everything a request handler needs.
#[derive(Debug)]
pub struct Node {
    /// The node's state store.
    pub store: StateStore,
    /// The hot row cache in front of it.
    pub cache: HotCache,
    /// Per-request limits.
    pub limits: Limits,
    /// The address the gRPC server is bound to.
    pub listen_addr: SocketAddr,
    /// When the node started.
    pub started: Instant,
}

impl Node {
    /// Opens the node's store as configured.
    pub fn open(config: &Config, listen_addr: SocketAddr) -> Result<Node, EngineError> {
        let clock = Arc::new(SystemClock);
        let store = StateStore::open(
            &config.data_dir,
            StoreOptions {
                sync_writes: config.sync_writes,
                block_cache_bytes: usize::try_from(config.block_cache_bytes).unwrap_or(usize::MAX),
                ttl_grace_us: i64::try_from(config.ttl_grace_seconds)
                    .unwrap_or(i64::MAX / 1_000_000)
                    * 1_000_000,
                clock: clock.clone(),
                ..StoreOptions::default()
            },
        )?;
        let cache = HotCache::new(
            config.cache.bytes_max,
            Duration::from_millis(config.cache.entry_ttl_ms),
            clock,
        );
        Ok(Node {
            store,
            cache,
            limits: config.limits.clone(),
            listen_addr,
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
}

/// Shared handle to a node.
pub type NodeRef = Arc<Node>;
