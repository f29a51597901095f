//! Leader-aware routing for the Quiver target (`--routing leader`): each
//! write goes straight to the node leading its rows' shard, as a client
//! following `GetRoutes` does, instead of to any node (which forwards what
//! it does not lead). Rows of one request led by different nodes become one
//! request per leader, sent together.
//!
//! The routes are fetched once at start and again, in the background, when
//! a node says it forwarded rows (`rows_forwarded`), a Get part was served
//! by another node than its route named, or a call fails: a leader moved.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use quiver_client::RouteTable;
use quiver_proto::v1 as pb;
use quiver_proto::v1::feature_store_client::FeatureStoreClient;
use tonic::transport::{Channel, ClientTlsConfig};

/// Least time between two route refreshes (a leader change makes every
/// request in flight ask for one).
const REFRESH_INTERVAL_MIN: Duration = Duration::from_millis(100);

/// The routes and a few channels to every node, shared by the generator's
/// connections.
pub struct Routes {
    table: RwLock<Arc<RouteTable>>,
    /// Channels by node address; connection `slot` uses `slot % len`.
    channels: RwLock<HashMap<Arc<str>, Vec<Channel>>>,
    channels_per_node: usize,
    tls: Option<ClientTlsConfig>,
    response_bytes_max: usize,
    last_refresh: tokio::sync::Mutex<Instant>,
}

/// One connection's view of the shared routes.
#[derive(Clone)]
pub struct Routed {
    routes: Arc<Routes>,
    slot: usize,
}

impl Routes {
    /// Fetches the routes through `client` and opens channels to every node
    /// named: `connections` in all, spread over the nodes (as many as the
    /// spread mode opens).
    pub async fn connect(
        client: &mut FeatureStoreClient<Channel>,
        connections: usize,
        tls: Option<ClientTlsConfig>,
        response_bytes_max: usize,
    ) -> Result<Arc<Routes>> {
        let table = fetch(client).await?;
        let nodes = table.node_addrs().count().max(1);
        let routes = Arc::new(Routes {
            table: RwLock::new(Arc::new(table)),
            channels: RwLock::new(HashMap::new()),
            channels_per_node: connections.div_ceil(nodes).max(1),
            tls,
            response_bytes_max,
            last_refresh: tokio::sync::Mutex::new(Instant::now()),
        });
        let addrs: Vec<Arc<str>> = routes
            .current()
            .node_addrs()
            .map(|(_, addr)| Arc::from(addr))
            .collect();
        for addr in addrs {
            routes.channels_to(&addr).await?;
        }
        Ok(routes)
    }

    fn current(&self) -> Arc<RouteTable> {
        self.table
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The channels to `addr`, opened on first use (a node that joined).
    async fn channels_to(&self, addr: &Arc<str>) -> Result<Vec<Channel>> {
        if let Some(channels) = self
            .channels
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(addr)
        {
            return Ok(channels.clone());
        }
        let mut opened = Vec::with_capacity(self.channels_per_node);
        for _ in 0..self.channels_per_node {
            opened.push(crate::target::channel(addr, self.tls.as_ref()).await?);
        }
        let mut channels = self
            .channels
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Ok(channels.entry(addr.clone()).or_insert(opened).clone())
    }

    /// Fetches new routes through `client`, at most once per
    /// [`REFRESH_INTERVAL_MIN`] and by one caller at a time (the others go
    /// on with the routes they have).
    async fn refresh(&self, client: &mut FeatureStoreClient<Channel>) {
        let Ok(mut last) = self.last_refresh.try_lock() else {
            return;
        };
        if last.elapsed() < REFRESH_INTERVAL_MIN {
            return;
        }
        *last = Instant::now();
        // A failed fetch keeps the old routes: a stale route costs a hop.
        if let Ok(table) = fetch(client).await {
            *self
                .table
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(table);
        }
    }
}

async fn fetch(client: &mut FeatureStoreClient<Channel>) -> Result<RouteTable> {
    let answer = client
        .get_routes(pb::GetRoutesRequest {})
        .await
        .context("GetRoutes")?
        .into_inner();
    RouteTable::new(&answer).context("GetRoutes answered unusable routes")
}

impl Routed {
    /// Connection `slot`'s handle on the shared routes.
    pub fn new(routes: Arc<Routes>, slot: usize) -> Routed {
        Routed { routes, slot }
    }

    /// Fetches new routes through `client` in the background (the request
    /// that noticed does not wait for them).
    fn refresh_soon(&self, client: &FeatureStoreClient<Channel>) {
        let (routes, mut client) = (self.routes.clone(), client.clone());
        tokio::spawn(async move { routes.refresh(&mut client).await });
    }

    /// A client to the node at `addr` (`None`, or a node that cannot be
    /// reached: `fallback`, the connection's own node, which forwards; the
    /// routes are then fetched again).
    async fn client_for(
        &self,
        addr: Option<&Arc<str>>,
        fallback: &FeatureStoreClient<Channel>,
    ) -> FeatureStoreClient<Channel> {
        let Some(addr) = addr else {
            return fallback.clone();
        };
        match self.routes.channels_to(addr).await {
            Ok(channels) => {
                let channel = channels[self.slot % channels.len()].clone();
                FeatureStoreClient::new(channel)
                    .max_decoding_message_size(self.routes.response_bytes_max)
            }
            Err(_) => {
                self.refresh_soon(fallback);
                fallback.clone()
            }
        }
    }

    /// Writes `rows`: one request per leader, sent together. Refreshes the
    /// routes when a node forwarded rows or a call failed.
    pub async fn write(
        &self,
        fallback: &FeatureStoreClient<Channel>,
        rows: Vec<pb::WriteRow>,
    ) -> Result<()> {
        let table = self.routes.current();
        let parts = table.by_leader(rows, |row| row.entity_key.as_str());
        let mut calls = Vec::with_capacity(parts.len());
        for (leader, rows) in parts {
            let mut client = self.client_for(leader.as_ref(), fallback).await;
            calls.push(async move {
                let answer = client.write(crate::dataset::write_request(rows)).await;
                (client, answer)
            });
        }
        let mut first_error = None;
        for (client, answer) in futures::future::join_all(calls).await {
            match answer {
                Ok(response) if response.get_ref().rows_forwarded == 0 => {}
                // The node that forwarded has just learned the leader.
                Ok(_) => self.refresh_soon(&client),
                Err(status) => {
                    self.refresh_soon(fallback);
                    first_error.get_or_insert(status);
                }
            }
        }
        match first_error {
            Some(status) => Err(status.into()),
            None => Ok(()),
        }
    }

    /// Reads `request`'s entities: one request per leader, sent together;
    /// the entities come back in request order. Refreshes the routes when a
    /// part was served by another node than its route named, or failed.
    pub async fn get(
        &self,
        fallback: &FeatureStoreClient<Channel>,
        request: pb::GetRequest,
    ) -> Result<pb::GetResponse> {
        let table = self.routes.current();
        let pb::GetRequest {
            entity_keys,
            features,
            consistency,
            skip_cache,
            max_staleness_ms,
            degraded,
        } = request;
        let node_ids: HashMap<&str, u64> =
            table.node_addrs().map(|(id, addr)| (addr, id)).collect();
        let parts = table.by_leader(entity_keys.into_iter().enumerate(), |(_, key)| key.as_str());
        let mut calls = Vec::with_capacity(parts.len());
        for (leader, keyed) in parts {
            // The node that should serve this part, to tell a forward.
            let expected = leader
                .as_deref()
                .and_then(|addr| node_ids.get(addr).copied());
            let mut client = self.client_for(leader.as_ref(), fallback).await;
            let (positions, entity_keys): (Vec<usize>, Vec<String>) = keyed.into_iter().unzip();
            let part = pb::GetRequest {
                entity_keys,
                features: features.clone(),
                consistency,
                skip_cache,
                max_staleness_ms,
                degraded,
            };
            calls.push(async move { (positions, expected, client.get(part).await) });
        }
        let mut merged = pb::GetResponse::default();
        let mut entities: Vec<(usize, pb::EntityResult)> = Vec::new();
        let mut stale = false;
        for (positions, expected, answer) in futures::future::join_all(calls).await {
            let answer = match answer {
                Ok(answer) => answer.into_inner(),
                Err(status) => {
                    self.refresh_soon(fallback);
                    return Err(status.into());
                }
            };
            anyhow::ensure!(
                answer.entities.len() == positions.len(),
                "Get answered {} of {} entities",
                answer.entities.len(),
                positions.len()
            );
            stale |= expected.is_some_and(|node| answer.sources.iter().any(|s| s.node_id != node));
            merged.feature_names = answer.feature_names;
            merged.sources.extend(answer.sources);
            entities.extend(positions.into_iter().zip(answer.entities));
        }
        if stale {
            self.refresh_soon(fallback);
        }
        entities.sort_unstable_by_key(|(position, _)| *position);
        merged.entities = entities.into_iter().map(|(_, entity)| entity).collect();
        Ok(merged)
    }
}
