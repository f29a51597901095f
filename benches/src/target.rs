//! The systems `quiver-bench` drives, each over its own public protocol, with
//! the same data set (see `dataset`): Quiver (gRPC `FeatureStore`), Redis in
//! a Feast-like layout (one hash per entity, a batch read is pipelined HMGETs) or
//! as one packed blob per entity (MGET), and etcd (gRPC `KV`: Put, Txn).

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use prost::Message;
use quiver_proto::v1 as pb;
use quiver_proto::v1::feature_store_client::FeatureStoreClient;
use tonic::transport::Channel;

use crate::dataset;
use crate::routed::{Routed, Routes};

/// etcd's KV API, generated from the subset in proto/etcdserverpb/kv.proto.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod etcdserverpb {
    tonic::include_proto!("etcdserverpb");
}

use etcdserverpb::kv_client::KvClient;
use etcdserverpb::{PutRequest, RangeRequest, RequestOp, TxnRequest, request_op, response_op};

/// Largest gRPC response the generator accepts.
const RESPONSE_BYTES_MAX: usize = 256 << 20;
/// etcd refuses transactions of more operations than this (its
/// `--max-txn-ops` default), so its writes and reads are cut to it.
const ETCD_TXN_OPS_MAX: usize = 128;
/// Feast keeps a view's event time in the hash under `_ts:<view>`.
const REDIS_TS_FIELD: &str = "_ts:bench_stats";

/// Which system to drive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TargetKind {
    /// quiverd, one node or a cluster.
    Quiver,
    /// Redis, Feast-like layout: a hash per entity, one pipelined HMGET per entity of a batch.
    RedisHash,
    /// Redis, one packed blob per entity, one MGET per batch.
    RedisBlob,
    /// etcd v3: a Put per single-row write, a Txn of puts per batch, a Txn of
    /// ranges per batch read.
    Etcd,
}

impl TargetKind {
    /// The name the command line takes (`redis-hash`, ...).
    pub fn name(self) -> &'static str {
        match self {
            TargetKind::Quiver => "quiver",
            TargetKind::RedisHash => "redis-hash",
            TargetKind::RedisBlob => "redis-blob",
            TargetKind::Etcd => "etcd",
        }
    }
}

/// One connection to the target; clones share it.
#[derive(Clone)]
pub enum Conn {
    /// A Quiver gRPC channel.
    Quiver {
        /// The client.
        client: FeatureStoreClient<Channel>,
        /// Bypass the server's hot cache on reads.
        skip_cache: bool,
        /// Leader-aware routing (`None`: every request to `client`'s node).
        routed: Option<Routed>,
    },
    /// A multiplexed Redis connection (pipelines from all tasks share it).
    Redis {
        /// The connection.
        conn: redis::aio::MultiplexedConnection,
        /// Hash per entity (true) or packed blob per entity (false).
        hash: bool,
    },
    /// An etcd gRPC channel.
    Etcd(KvClient<Channel>),
}

/// TLS for Quiver connections when `QUIVER_CA` names the nodes' CA (and
/// `QUIVER_CERT` / `QUIVER_KEY` a client certificate), as for quiverctl.
fn tls_from_env() -> Result<Option<tonic::transport::ClientTlsConfig>> {
    let Some(ca) = std::env::var_os("QUIVER_CA") else {
        return Ok(None);
    };
    let read = |path: &std::ffi::OsStr| {
        std::fs::read(path).with_context(|| format!("read {}", path.to_string_lossy()))
    };
    let mut config = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(read(&ca)?));
    if let (Some(cert), Some(key)) = (
        std::env::var_os("QUIVER_CERT"),
        std::env::var_os("QUIVER_KEY"),
    ) {
        config = config.identity(tonic::transport::Identity::from_pem(
            read(&cert)?,
            read(&key)?,
        ));
    }
    Ok(Some(config))
}

pub(crate) async fn channel(
    endpoint: &str,
    tls: Option<&tonic::transport::ClientTlsConfig>,
) -> Result<Channel> {
    let host_port = endpoint
        .split_once("://")
        .map_or(endpoint, |(_, rest)| rest);
    let url = match tls {
        Some(_) => format!("https://{host_port}"),
        None if endpoint.contains("://") => endpoint.to_owned(),
        None => format!("http://{endpoint}"),
    };
    let mut builder = tonic::transport::Endpoint::from_shared(url)?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true);
    if let Some(tls) = tls {
        builder = builder.tls_config(tls.clone())?;
    }
    builder
        .connect()
        .await
        .with_context(|| format!("connect to {endpoint}"))
}

/// How Quiver requests find their node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Routing {
    /// Each connection's requests go to its node, which forwards rows it
    /// does not lead (connections spread over the endpoints, as etcd's
    /// client balancer does).
    Spread,
    /// Each request goes to the leaders of its rows' shards, by the routes
    /// a node gives (`GetRoutes`); see [`crate::routed`].
    Leader,
}

/// Opens `connections` connections, spread round robin over `endpoints`
/// (as a client balancing over a cluster's members would). With
/// [`Routing::Leader`], Quiver connections also share routes and channels
/// to every node.
pub async fn connect(
    kind: TargetKind,
    endpoints: &[String],
    connections: usize,
    skip_cache: bool,
    routing: Routing,
) -> Result<Vec<Conn>> {
    ensure!(!endpoints.is_empty(), "no endpoint given");
    let tls = match kind {
        TargetKind::Quiver => tls_from_env()?,
        _ => None,
    };
    let mut conns = Vec::with_capacity(connections);
    let mut routes: Option<Arc<Routes>> = None;
    for i in 0..connections.max(1) {
        let endpoint = &endpoints[i % endpoints.len()];
        conns.push(match kind {
            TargetKind::Quiver => {
                let mut client = FeatureStoreClient::new(channel(endpoint, tls.as_ref()).await?)
                    .max_decoding_message_size(RESPONSE_BYTES_MAX);
                let routed = match (routing, &routes) {
                    (Routing::Spread, _) => None,
                    (Routing::Leader, Some(routes)) => Some(Routed::new(routes.clone(), i)),
                    (Routing::Leader, None) => {
                        let shared = Routes::connect(
                            &mut client,
                            connections,
                            tls.clone(),
                            RESPONSE_BYTES_MAX,
                        )
                        .await?;
                        routes = Some(shared.clone());
                        Some(Routed::new(shared, i))
                    }
                };
                Conn::Quiver {
                    client,
                    skip_cache,
                    routed,
                }
            }
            TargetKind::RedisHash | TargetKind::RedisBlob => {
                let url = if endpoint.contains("://") {
                    endpoint.clone()
                } else {
                    format!("redis://{endpoint}/")
                };
                let client = redis::Client::open(url.as_str())?;
                Conn::Redis {
                    conn: client
                        .get_multiplexed_async_connection()
                        .await
                        .with_context(|| format!("connect to redis at {endpoint}"))?,
                    hash: kind == TargetKind::RedisHash,
                }
            }
            TargetKind::Etcd => Conn::Etcd(
                KvClient::new(channel(endpoint, None).await?)
                    .max_decoding_message_size(RESPONSE_BYTES_MAX),
            ),
        });
    }
    Ok(conns)
}

fn redis_key(id: u64) -> String {
    format!("bench:{}", dataset::entity_key(id))
}

fn etcd_key(id: u64) -> Vec<u8> {
    format!("bench/{}", dataset::entity_key(id)).into_bytes()
}

/// A batched answer must have one item per id asked for.
fn ensure_answered(what: &str, got: usize, asked: usize) -> Result<()> {
    ensure!(got == asked, "{what} answered {got} of {asked}");
    Ok(())
}

/// Decodes entity `id`'s packed blob and, when `check` is set, checks it.
fn check_packed(id: u64, blob: Option<&[u8]>, check: bool) -> Result<()> {
    let blob = blob.with_context(|| format!("entity {id} missing"))?;
    let (_, values) = dataset::unpack_row(blob).map_err(anyhow::Error::msg)?;
    if check {
        dataset::check_f0(id, values.first()).map_err(anyhow::Error::msg)?;
    }
    Ok(())
}

/// An etcd transaction with no compare: always takes the success branch.
fn etcd_txn(ops: impl Iterator<Item = request_op::Request>) -> TxnRequest {
    TxnRequest {
        success: ops
            .map(|request| RequestOp {
                request: Some(request),
            })
            .collect(),
        failure: Vec::new(),
    }
}

fn decode_value(bytes: Option<&[u8]>, id: u64, feature: &str) -> Result<pb::Value> {
    let bytes = bytes.with_context(|| format!("entity {id}: {feature} missing"))?;
    pb::Value::decode(bytes).with_context(|| format!("entity {id}: {feature} undecodable"))
}

impl Conn {
    /// Makes the target ready for the data set (Quiver: apply the view).
    pub async fn setup(&mut self) -> Result<()> {
        if let Conn::Quiver { client, .. } = self {
            client
                .apply_feature_view(pb::ApplyFeatureViewRequest {
                    view: Some(dataset::view()),
                })
                .await?;
        }
        Ok(())
    }

    /// Reads all 10 features of `ids` (one batch: one request or pipeline),
    /// decodes every value as a serving client must, and when `check` is set
    /// checks each entity's feature 0 against its id.
    pub async fn get(&mut self, ids: &[u64], check: bool) -> Result<()> {
        match self {
            Conn::Quiver {
                client,
                skip_cache,
                routed,
            } => {
                let request = pb::GetRequest {
                    entity_keys: ids.iter().map(|&id| dataset::entity_key(id)).collect(),
                    features: vec![dataset::VIEW.into()],
                    consistency: pb::Consistency::Leader as i32,
                    skip_cache: *skip_cache,
                    max_staleness_ms: 0,
                    degraded: false,
                };
                let response = match routed {
                    Some(routed) => routed.get(client, request).await?,
                    None => client.get(request).await?.into_inner(),
                };
                ensure_answered("Get", response.entities.len(), ids.len())?;
                if check {
                    for entity in &response.entities {
                        dataset::check_entity(entity).map_err(anyhow::Error::msg)?;
                    }
                }
            }
            Conn::Redis { conn, hash: true } => {
                let names = dataset::feature_names();
                let mut pipe = redis::pipe();
                for &id in ids {
                    pipe.cmd("HMGET")
                        .arg(redis_key(id))
                        .arg(&names)
                        .arg(REDIS_TS_FIELD);
                }
                let rows: Vec<Vec<Option<Vec<u8>>>> = pipe.query_async(conn).await?;
                ensure_answered("pipeline", rows.len(), ids.len())?;
                for (&id, row) in ids.iter().zip(&rows) {
                    ensure!(
                        row.len() == names.len() + 1,
                        "entity {id}: {} fields",
                        row.len()
                    );
                    let ts = row[names.len()].as_deref().context("event time missing")?;
                    ensure!(
                        ts.len() == 8,
                        "entity {id}: event time of {} bytes",
                        ts.len()
                    );
                    let values = names
                        .iter()
                        .zip(row)
                        .map(|(name, bytes)| decode_value(bytes.as_deref(), id, name))
                        .collect::<Result<Vec<_>>>()?;
                    if check {
                        dataset::check_f0(id, values.first()).map_err(anyhow::Error::msg)?;
                    }
                }
            }
            Conn::Redis { conn, hash: false } => {
                let keys: Vec<String> = ids.iter().map(|&id| redis_key(id)).collect();
                let blobs: Vec<Option<Vec<u8>>> =
                    redis::cmd("MGET").arg(&keys).query_async(conn).await?;
                ensure_answered("MGET", blobs.len(), ids.len())?;
                for (&id, blob) in ids.iter().zip(&blobs) {
                    check_packed(id, blob.as_deref(), check)?;
                }
            }
            Conn::Etcd(client) => {
                for chunk in ids.chunks(ETCD_TXN_OPS_MAX) {
                    let request = etcd_txn(chunk.iter().map(|&id| {
                        request_op::Request::RequestRange(RangeRequest {
                            key: etcd_key(id),
                            ..Default::default()
                        })
                    }));
                    let response = client.txn(request).await?.into_inner();
                    ensure_answered("txn", response.responses.len(), chunk.len())?;
                    for (&id, op) in chunk.iter().zip(&response.responses) {
                        let Some(response_op::Response::ResponseRange(range)) = &op.response else {
                            bail!("entity {id}: not a range response");
                        };
                        let value = range.kvs.first().map(|kv| kv.value.as_slice());
                        check_packed(id, value, check)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Writes the full rows of `ids` at write generation `generation`: one
    /// request (Quiver Write, a Redis pipeline or MSET, an etcd Put for one
    /// row or a Txn of puts for several).
    pub async fn write(&mut self, ids: &[u64], event_ts_us: i64, generation: u64) -> Result<()> {
        match self {
            Conn::Quiver { client, routed, .. } => {
                let rows = ids
                    .iter()
                    .map(|&id| dataset::row(id, event_ts_us, generation))
                    .collect();
                match routed {
                    Some(routed) => routed.write(client, rows).await?,
                    None => {
                        client.write(dataset::write_request(rows)).await?;
                    }
                }
            }
            Conn::Redis { conn, hash: true } => {
                let names = dataset::feature_names();
                let mut pipe = redis::pipe();
                for &id in ids {
                    pipe.cmd("HSET").arg(redis_key(id));
                    for (index, name) in names.iter().enumerate() {
                        pipe.arg(name)
                            .arg(dataset::encoded_value(id, index, generation));
                    }
                    pipe.arg(REDIS_TS_FIELD)
                        .arg(&event_ts_us.to_le_bytes()[..])
                        .ignore();
                }
                pipe.query_async::<()>(conn).await?;
            }
            Conn::Redis { conn, hash: false } => {
                let mut cmd = redis::cmd("MSET");
                for &id in ids {
                    cmd.arg(redis_key(id))
                        .arg(dataset::packed_row(id, event_ts_us, generation));
                }
                cmd.query_async::<()>(conn).await?;
            }
            Conn::Etcd(client) => {
                if let [id] = ids {
                    client
                        .put(PutRequest {
                            key: etcd_key(*id),
                            value: dataset::packed_row(*id, event_ts_us, generation),
                            ..Default::default()
                        })
                        .await?;
                    return Ok(());
                }
                for chunk in ids.chunks(ETCD_TXN_OPS_MAX) {
                    let request = etcd_txn(chunk.iter().map(|&id| {
                        request_op::Request::RequestPut(PutRequest {
                            key: etcd_key(id),
                            value: dataset::packed_row(id, event_ts_us, generation),
                            ..Default::default()
                        })
                    }));
                    let response = client.txn(request).await?.into_inner();
                    ensure!(response.succeeded, "etcd txn took the failure branch");
                }
            }
        }
        Ok(())
    }
}
