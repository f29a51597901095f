//! Assembles and runs a node's two gRPC servers: on the client port the
//! feature store service, the standard health service and server
//! reflection; on the peer port the internal peer service (Raft traffic and
//! forwarded requests), behind the cluster secret. The client port does not
//! serve peer calls (`UNIMPLEMENTED`), so a client can never propose around
//! the schema checks, vote or install a snapshot. Graceful shutdown drains
//! clients first; peers are served until the Raft groups have stopped, so
//! the requests being drained can still reach their leaders.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use quiver_proto::admin::admin_server::AdminServer;
use quiver_proto::v1::feature_store_server::FeatureStoreServer;
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;

use quiver_proto::peer::peer_server::PeerServer;

use crate::admin::AdminService;
use crate::cluster::auth::{CheckPeerCalls, PeerIdentity};
use crate::cluster::network::PEER_MESSAGE_BYTES_MAX;
use crate::cluster::peer_service::PeerService;
use crate::config::Config;
use crate::node::Node;
use crate::service::FeatureStoreService;

/// Why a node stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// The store could not be opened or flushed.
    #[error("storage: {0}")]
    Engine(#[from] quiver_engine::EngineError),
    /// The gRPC transport failed.
    #[error("grpc transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// Socket setup failed.
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    /// Reflection could not be built from the descriptor set.
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The node's Raft groups could not start.
    #[error(transparent)]
    Cluster(#[from] crate::cluster::ClusterError),
    /// Metrics could not be set up.
    #[error(transparent)]
    Metrics(#[from] crate::metrics::MetricsError),
    /// The TLS files could not be used.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// The configuration is refused (checked again here for callers that
    /// build it without `Config::load`).
    #[error("configuration: {0}")]
    Config(String),
}

/// Opens the node and serves clients on `listener` and peers on
/// `peer_listener` until `shutdown` resolves, then stops accepting clients,
/// lets in-flight requests finish, stops the Raft groups and flushes the
/// stores, and stops serving peers last.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    peer_listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let listen_addr = listener.local_addr()?;
    let peer_addr = peer_listener.local_addr()?;
    if config.cluster.secret.is_empty() && !peer_addr.ip().is_loopback() {
        tracing::warn!(
            %peer_addr,
            "cluster.secret is empty: any host that reaches the peer port can act as a peer"
        );
    }
    // Bound before the node opens: a taken port fails the start before any
    // Raft group runs.
    let metrics_listener = match config.metrics_listen_addr {
        None => None,
        Some(addr) => Some(TcpListener::bind(addr).await.map_err(|e| {
            std::io::Error::new(e.kind(), format!("bind the metrics listener {addr}: {e}"))
        })?),
    };
    // The peer address this node is known by, where there are peers: its
    // certificate must name that host or they will refuse it.
    let own_peer_addr = if config.join.is_some() {
        Some(peer_addr.to_string())
    } else {
        config
            .cluster
            .nodes
            .iter()
            .find(|node| node.id == config.cluster.node_id)
            .and_then(|node| node.peer_addr())
    };
    let own_host = own_peer_addr
        .as_deref()
        .map(crate::tls::host_of)
        .filter(|host| {
            !host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_unspecified())
        });
    let tls = crate::tls::Tls::load(&config.tls, own_host)?;
    if tls.is_some() {
        tracing::info!(cert = %config.tls.cert_path.display(), "TLS on every port");
    }
    spawn_reload_on_hangup(tls.clone());
    let node = Arc::new(Node::open(&config, listen_addr, peer_addr, tls.clone()).await?);
    let (metrics_stop_tx, metrics_stop_rx) = tokio::sync::oneshot::channel::<()>();
    let metrics_server = match metrics_listener {
        None => None,
        Some(listener) => {
            let handle = crate::metrics::install()?;
            let bound = listener.local_addr()?;
            // Scripts read the bound address (port 0 picks one) as they do
            // the client and peer ones.
            println!("quiverd metrics on {bound}");
            tracing::info!(%bound, "serving /metrics");
            let mut collector = crate::metrics::Collector::default();
            collector.collect(&node);
            tokio::spawn(crate::metrics::collect_loop(
                Arc::downgrade(&node),
                handle.clone(),
                collector,
            ));
            let stop = async move {
                let _ = metrics_stop_rx.await;
            };
            Some(match &tls {
                Some(tls) => tokio::spawn(crate::metrics::serve(
                    crate::tls::AxumTlsListener::new(tls, listener, crate::tls::Port::Metrics)?,
                    handle,
                    stop,
                )),
                None => tokio::spawn(crate::metrics::serve(listener, handle, stop)),
            })
        }
    };
    tokio::spawn(crate::expiry::expiry_loop(
        Arc::downgrade(&node),
        crate::expiry::ExpiryTiming::new(
            config.ttl_expire_interval_seconds,
            config.ttl_grace_seconds,
        ),
    ));
    let idle_interval = std::time::Duration::from_millis(config.backup.log_idle_interval_ms);
    if config.backup.log_url.is_empty() {
        tokio::spawn(crate::backup::log::release_loop(
            Arc::downgrade(&node),
            idle_interval,
        ));
    } else {
        tokio::spawn(crate::backup::log::shipping_loop(
            Arc::downgrade(&node),
            config.backup.log_url.clone(),
            crate::backup::log::ShippingTiming {
                interval: std::time::Duration::from_millis(config.backup.log_interval_ms),
                idle_interval,
            },
        ));
    }
    if !config.backup.schedule_url.is_empty() {
        tokio::spawn(crate::backup::prune::schedule_loop(
            Arc::downgrade(&node),
            crate::backup::prune::Schedule {
                url: config.backup.schedule_url.clone(),
                every: std::time::Duration::from_secs(config.backup.full_interval_seconds),
                retention: std::time::Duration::from_secs(
                    config.backup.retention_hours.saturating_mul(3600),
                ),
            },
        ));
    }
    let (peer_closing_tx, peer_closing_rx) = tokio::sync::watch::channel(false);
    let mut check_peers =
        CheckPeerCalls::new(&config.cluster.secret, &config.cluster.previous_secret);
    if let Some(tls) = &tls {
        let cluster = Arc::downgrade(&node.cluster);
        check_peers = check_peers.with_identity(PeerIdentity::new(
            tls.clone(),
            Arc::new(move |id| cluster.upgrade()?.peer_addr_of(id)),
        ));
    }
    let peer = tonic::service::interceptor::InterceptedService::new(
        PeerServer::new(PeerService::new(node.cluster.clone(), peer_closing_rx))
            .max_decoding_message_size(PEER_MESSAGE_BYTES_MAX)
            .max_encoding_message_size(PEER_MESSAGE_BYTES_MAX),
        check_peers,
    );
    let (peer_stop_tx, peer_stop_rx) = tokio::sync::oneshot::channel::<()>();
    // Peer call streams live long: a peer that vanished without a word (a
    // black-holed link) is noticed by pings, and its streams' work dropped.
    let peer_router = server_builder(tls.is_some())
        .http2_keepalive_interval(Some(PEER_KEEPALIVE_INTERVAL))
        .add_service(peer);
    let peer_stopped = async {
        let _ = peer_stop_rx.await;
    };
    let peer_server = tokio::spawn(match &tls {
        Some(tls) => boxed(peer_router.serve_with_incoming_shutdown(
            tls.incoming(peer_listener, crate::tls::Port::Peer),
            peer_stopped,
        )),
        None => boxed(peer_router.serve_with_incoming_shutdown(
            TcpIncoming::from(peer_listener).with_nodelay(Some(true)),
            peer_stopped,
        )),
    });
    let request_bytes_max = usize::try_from(config.limits.request_bytes_max).unwrap_or(usize::MAX);
    // Responses are bounded where they are built (limits.get_response_bytes_max);
    // this is the backstop, with room for the framing around the values.
    let response_bytes_max = usize::try_from(config.limits.get_response_bytes_max)
        .unwrap_or(usize::MAX)
        .saturating_add(1 << 20);
    let feature_store = FeatureStoreServer::new(FeatureStoreService::new(node.clone()))
        .max_decoding_message_size(request_bytes_max)
        .max_encoding_message_size(response_bytes_max);

    let admin = AdminServer::new(AdminService::new(node.clone()))
        .max_decoding_message_size(request_bytes_max)
        .max_encoding_message_size(response_bytes_max);

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<FeatureStoreServer<FeatureStoreService>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(quiver_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;

    tracing::info!(%listen_addr, %peer_addr, data_dir = %config.data_dir.display(), "serving");
    // Fires when shutdown starts, to bound the drain: idle client connections
    // that never close must not keep a stopping node alive.
    let (draining_tx, draining_rx) = tokio::sync::oneshot::channel::<()>();
    let tokens =
        crate::client_auth::Tokens::new(&config.auth.tokens).map_err(ServeError::Config)?;
    if tokens.enabled() {
        tracing::info!(
            tokens = config.auth.tokens.len(),
            "client calls need a token"
        );
    }
    let server = server_builder(tls.is_some())
        .layer(crate::metrics::RequestMetricsLayer)
        // Inside the metrics layer: refused calls are counted with their code.
        .layer(crate::client_auth::ClientAuthLayer::new(tokens))
        .concurrency_limit_per_connection(
            usize::try_from(config.limits.connection_requests_max).unwrap_or(usize::MAX),
        )
        // Beyond it, refused at once (RESOURCE_EXHAUSTED) rather than
        // queued without a bound in front of the node's admission.
        .load_shed(true)
        .add_service(health_service)
        .add_service(reflection)
        .add_service(feature_store)
        .add_service(admin);
    let stopping = async {
        shutdown.await;
        tracing::info!("shutdown requested: draining in-flight requests");
        let _ = draining_tx.send(());
        health_reporter
            .set_not_serving::<FeatureStoreServer<FeatureStoreService>>()
            .await;
    };
    // Not spawned, so not Send (the caller's shutdown future need not be).
    let server: std::pin::Pin<Box<dyn Future<Output = Result<(), tonic::transport::Error>>>> =
        match &tls {
            Some(tls) => Box::pin(server.serve_with_incoming_shutdown(
                tls.incoming(listener, crate::tls::Port::Client),
                stopping,
            )),
            // Without TCP_NODELAY small responses wait on delayed ACKs (~40 ms).
            None => Box::pin(server.serve_with_incoming_shutdown(
                TcpIncoming::from(listener).with_nodelay(Some(true)),
                stopping,
            )),
        };
    let drain_deadline = async {
        if draining_rx.await.is_ok() {
            tokio::time::sleep(Duration::from_millis(config.shutdown_drain_ms)).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    // Whatever ended the client server (a drain, the deadline, or an
    // error), the groups are stopped and the stores flushed.
    let outcome = tokio::select! {
        result = server => result,
        () = drain_deadline => {
            tracing::warn!(drain_ms = config.shutdown_drain_ms, "drain deadline passed; closing remaining connections");
            Ok(())
        }
    };

    node.cluster.shutdown().await;
    let _ = peer_stop_tx.send(());
    let _ = peer_closing_tx.send(true);
    // A peer stream that never ends (a snapshot to a stuck receiver) must
    // not keep a stopping node alive.
    let mut peer_server = peer_server;
    match tokio::time::timeout(
        Duration::from_millis(config.shutdown_drain_ms),
        &mut peer_server,
    )
    .await
    {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => tracing::warn!(error = %e, "peer server"),
        Ok(Err(e)) => tracing::warn!(error = %e, "peer server task"),
        Err(_) => {
            tracing::warn!("peer connections still open after the drain deadline; closing them");
            peer_server.abort();
        }
    }
    let _ = metrics_stop_tx.send(());
    if let Some(mut metrics_server) = metrics_server {
        // Scrapes are short; one that hangs must not keep the node alive.
        if tokio::time::timeout(Duration::from_secs(1), &mut metrics_server)
            .await
            .is_err()
        {
            tracing::warn!("a /metrics connection still open at shutdown; closing it");
            metrics_server.abort();
        }
    }
    tracing::info!("raft groups stopped, stores flushed; stopped");
    outcome.map_err(ServeError::from)
}

/// How often the peer port pings each connection (unanswered for 20 s:
/// closed).
const PEER_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);

/// A gRPC server; over TLS its connections are closed (gracefully, then
/// by force after a grace) after an hour, so certificates are checked
/// again.
fn server_builder(tls: bool) -> tonic::transport::Server {
    let builder = tonic::transport::Server::builder();
    if tls {
        builder
            .max_connection_age(crate::tls::TLS_CONNECTION_AGE_MAX)
            .max_connection_age_grace(crate::tls::TLS_CONNECTION_AGE_GRACE)
    } else {
        builder
    }
}

/// A spawned server future of either listener kind, as one type.
fn boxed<'a>(
    server: impl Future<Output = Result<(), tonic::transport::Error>> + Send + 'a,
) -> std::pin::Pin<Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send + 'a>> {
    Box::pin(server)
}

/// Reads the TLS files again on every SIGHUP; a reload that fails keeps
/// the certificates in use. Without TLS a SIGHUP is logged and ignored
/// (it must not stop the node).
fn spawn_reload_on_hangup(tls: Option<Arc<crate::tls::Tls>>) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hangups = match signal(SignalKind::hangup()) {
            Ok(hangups) => hangups,
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGHUP: TLS files are read at start only");
                return;
            }
        };
        tokio::spawn(async move {
            while hangups.recv().await.is_some() {
                let Some(tls) = &tls else {
                    tracing::info!("SIGHUP: TLS is off, nothing to reload");
                    continue;
                };
                match tls.reload() {
                    Ok(()) => tracing::info!("SIGHUP: TLS certificates reloaded"),
                    Err(error) => {
                        tracing::error!(%error, "SIGHUP: TLS reload failed; the previous certificates stay in use");
                    }
                }
            }
        });
    }
    #[cfg(not(unix))]
    let _ = tls;
}
