//! TLS for a node's three listeners and its outgoing peer connections, by
//! rustls with the ring provider.
//!
//! One certificate per node (`tls.cert_path`, issued by the cluster CA)
//! serves the client, peer and metrics ports and is the node's client
//! certificate towards its peers. The peer port requires a client
//! certificate from the cluster CA, and the peer service then checks that it
//! is a node certificate for the address the cluster map gives the calling
//! node ([`Tls::verify_node`], used by `cluster::auth`). The client and
//! metrics ports require a client certificate when `tls.client_ca_path` is
//! set; without it the client port still takes one from the cluster CA
//! (a node joining through this one shows its own). The files are read again by [`Tls::reload`] (on SIGHUP): new
//! connections get the new certificates, open ones keep theirs, and a reload
//! that fails keeps the old ones.
//!
//! Handshakes run off the accept loop, each bounded in time, and only so
//! many at once, in all and per source address: a client that connects and
//! says nothing holds a slot for at most [`TLS_HANDSHAKE_TIMEOUT`], never
//! the listener, and one host cannot take every slot.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_stream::wrappers::ReceiverStream;

use crate::config::TlsConfig;

/// Largest certificate, key or CA file read.
pub const TLS_FILE_BYTES_MAX: u64 = 1 << 20;
/// Longest a client may take to finish its handshake.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most handshakes in progress per listener; connections beyond are closed
/// at once.
pub const TLS_HANDSHAKES_IN_FLIGHT_MAX: usize = 256;
/// Most handshakes in progress per listener from one IP address: one host
/// cannot take every slot and shut peers out.
pub const TLS_HANDSHAKES_PER_SOURCE_MAX: usize = 32;
/// Longest a TLS connection is kept (then closed gracefully): a
/// certificate that expired or whose CA was dropped stops being trusted
/// within this.
pub const TLS_CONNECTION_AGE_MAX: Duration = Duration::from_secs(3600);
/// How long a TLS connection past its age may take to close gracefully
/// before it is cut: longer than a peer call stream lives (peers replace
/// theirs every 10 minutes, and the old one ends once answered).
pub const TLS_CONNECTION_AGE_GRACE: Duration = Duration::from_secs(15 * 60);
/// Connections handed from the handshakes to the server, waiting.
const ACCEPTED_QUEUE_MAX: usize = 64;

/// Why the TLS files could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A file could not be read or holds nothing usable.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// rustls refused the certificates (a key that does not match its
    /// certificate, an unsupported key type, ...).
    #[error("tls: {0}")]
    Rustls(#[from] rustls::Error),
    /// A CA cannot verify client certificates.
    #[error("tls client verifier: {0}")]
    Verifier(String),
}

/// Which listener a connection came to: each has its own rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Port {
    /// gRPC clients; a client certificate if `tls.client_ca_path` is set.
    Client,
    /// Peers; a certificate from the cluster CA, always.
    Peer,
    /// Prometheus (HTTP/1.1); like the client port.
    Metrics,
}

impl Port {
    fn label(self) -> &'static str {
        match self {
            Port::Client => "client",
            Port::Peer => "peer",
            Port::Metrics => "metrics",
        }
    }
}

/// The rustls configurations built from one reading of the files.
#[derive(Debug)]
struct Configs {
    client: Arc<ServerConfig>,
    peer: Arc<ServerConfig>,
    metrics: Arc<ServerConfig>,
    outgoing: Arc<ClientConfig>,
    /// Checks a node's certificate as a server's: from the cluster CA,
    /// valid now, for server use, naming a given host.
    node_verifier: Arc<rustls::client::WebPkiServerVerifier>,
    /// When the first certificate of the node's chain expires (Unix s).
    expires_unix_s: i64,
}

/// A node's TLS state: the files it was configured with and the
/// configurations last built from them.
#[derive(Debug)]
pub struct Tls {
    files: TlsConfig,
    own_host: Option<String>,
    current: ArcSwap<Configs>,
}

impl Tls {
    /// Reads the files of `files`; `None` when TLS is off. With `own_host`
    /// (the host of the peer address this node is known by), refuses a
    /// certificate its peers would refuse: not from the cluster CA, not
    /// valid now, or not naming that host.
    pub fn load(files: &TlsConfig, own_host: Option<&str>) -> Result<Option<Arc<Tls>>, TlsError> {
        if !files.enabled() {
            return Ok(None);
        }
        let configs = build(files, own_host)?;
        Ok(Some(Arc::new(Tls {
            files: files.clone(),
            own_host: own_host.map(str::to_owned),
            current: ArcSwap::from_pointee(configs),
        })))
    }

    /// Reads the files again, with the checks of [`Tls::load`]. On an error
    /// the configurations in use stay.
    pub fn reload(&self) -> Result<(), TlsError> {
        let result = build(&self.files, self.own_host.as_deref())
            .map(|configs| self.current.store(Arc::new(configs)));
        let outcome = if result.is_ok() { "ok" } else { "error" };
        metrics::counter!("quiver_tls_reloads_total", "result" => outcome).increment(1);
        result
    }

    /// When the node's certificate in use, or another of its chain,
    /// expires first (Unix seconds): for the expiry metric, which alerts
    /// before peers and clients start refusing it.
    pub fn expires_unix_s(&self) -> i64 {
        self.current.load().expires_unix_s
    }

    /// The server configuration of `port` now.
    fn server(&self, port: Port) -> Arc<ServerConfig> {
        let current = self.current.load();
        match port {
            Port::Client => current.client.clone(),
            Port::Peer => current.peer.clone(),
            Port::Metrics => current.metrics.clone(),
        }
    }

    /// Connections of `listener` that completed a handshake under `port`'s
    /// rules. The accept loop stops when the stream is dropped.
    pub fn incoming(
        self: &Arc<Self>,
        listener: TcpListener,
        port: Port,
    ) -> ReceiverStream<io::Result<tokio_rustls::server::TlsStream<TcpStream>>> {
        let (accepted, stream) = mpsc::channel(ACCEPTED_QUEUE_MAX);
        tokio::spawn(accept_loop(self.clone(), listener, port, accepted));
        ReceiverStream::new(stream)
    }

    /// Whether `certificates` (a chain, leaf first) are a node's that
    /// lives at `host`: from the cluster CA, valid now, for server use (as
    /// every node certificate is, since it serves its ports; a
    /// client-only certificate is not a node's), and naming `host`. What a
    /// peer's connection must show for the node it says it is, and a node
    /// joining through this one for its peer address.
    pub fn verify_node(
        &self,
        certificates: Option<&[CertificateDer<'static>]>,
        host: &str,
    ) -> Result<(), String> {
        let Some(certificates) = certificates else {
            return Err("no certificate".into());
        };
        verify_node_with(&self.current.load().node_verifier, certificates, host)
    }

    /// A connector for tonic channels to peers: TCP, then a handshake that
    /// presents this node's certificate and checks the peer's against the
    /// cluster CA and the host it was dialled by.
    pub fn peer_connector(self: &Arc<Self>) -> PeerConnector {
        PeerConnector { tls: self.clone() }
    }
}

async fn accept_loop(
    tls: Arc<Tls>,
    listener: TcpListener,
    port: Port,
    accepted: mpsc::Sender<io::Result<tokio_rustls::server::TlsStream<TcpStream>>>,
) {
    let handshakes = Arc::new(Semaphore::new(TLS_HANDSHAKES_IN_FLIGHT_MAX));
    let per_source = Arc::new(parking_lot::Mutex::new(HashMap::<IpAddr, usize>::new()));
    loop {
        let connection = tokio::select! {
            () = accepted.closed() => return,
            connection = listener.accept() => connection,
        };
        let (tcp, from) = match connection {
            Ok(connection) => connection,
            Err(error) => {
                // Out of descriptors and the like: pause rather than spin.
                tracing::warn!(port = port.label(), %error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = handshakes.clone().try_acquire_owned() else {
            handshake_failed(port, "too_many");
            continue;
        };
        let Some(source) = SourceSlot::take(&per_source, from.ip()) else {
            handshake_failed(port, "too_many_from_source");
            continue;
        };
        // Small responses must not wait on delayed ACKs.
        let _ = tcp.set_nodelay(true);
        let acceptor = TlsAcceptor::from(tls.server(port));
        let accepted = accepted.clone();
        tokio::spawn(async move {
            match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => {
                    let _ = accepted.send(Ok(stream)).await;
                }
                Ok(Err(error)) => {
                    tracing::debug!(port = port.label(), %from, %error, "TLS handshake refused");
                    handshake_failed(port, "refused");
                }
                Err(_) => handshake_failed(port, "timeout"),
            }
            drop((permit, source));
        });
    }
}

/// A handshake slot of one source address, given back when dropped.
struct SourceSlot {
    counts: Arc<parking_lot::Mutex<HashMap<IpAddr, usize>>>,
    ip: IpAddr,
}

impl SourceSlot {
    fn take(counts: &Arc<parking_lot::Mutex<HashMap<IpAddr, usize>>>, ip: IpAddr) -> Option<Self> {
        let mut all = counts.lock();
        let count = all.entry(ip).or_insert(0);
        if *count >= TLS_HANDSHAKES_PER_SOURCE_MAX {
            return None;
        }
        *count += 1;
        Some(SourceSlot {
            counts: counts.clone(),
            ip,
        })
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut all = self.counts.lock();
        if let Some(count) = all.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                all.remove(&self.ip);
            }
        }
    }
}

fn handshake_failed(port: Port, reason: &'static str) {
    metrics::counter!(
        "quiver_tls_handshake_failures_total",
        "port" => port.label(),
        "reason" => reason
    )
    .increment(1);
}

/// Connects to peers over TLS for tonic (see [`Tls::peer_connector`]).
#[derive(Debug, Clone)]
pub struct PeerConnector {
    tls: Arc<Tls>,
}

impl tower::Service<http::Uri> for PeerConnector {
    type Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let connector = TlsConnector::from(self.tls.current.load().outgoing.clone());
        Box::pin(async move {
            let invalid =
                |what: &str| io::Error::new(io::ErrorKind::InvalidInput, format!("{uri}: {what}"));
            let host = uri.host().ok_or_else(|| invalid("no host"))?;
            let port = uri.port_u16().ok_or_else(|| invalid("no port"))?;
            let host = host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned();
            let name = ServerName::try_from(host.clone())
                .map_err(|_| invalid("the host is not a DNS name or an IP address"))?;
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let stream = connector.connect(name, tcp).await?;
            Ok(TokioIo::new(stream))
        })
    }
}

/// A listener of TLS connections for axum (the metrics port).
pub struct AxumTlsListener {
    incoming: ReceiverStream<io::Result<tokio_rustls::server::TlsStream<TcpStream>>>,
    local: SocketAddr,
}

impl AxumTlsListener {
    /// Serves `listener` under `port`'s rules.
    pub fn new(tls: &Arc<Tls>, listener: TcpListener, port: Port) -> io::Result<Self> {
        let local = listener.local_addr()?;
        Ok(Self {
            incoming: tls.incoming(listener, port),
            local,
        })
    }
}

impl axum::serve::Listener for AxumTlsListener {
    type Io = tokio_rustls::server::TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, SocketAddr) {
        use tokio_stream::StreamExt;
        loop {
            match self.incoming.next().await {
                Some(Ok(stream)) => {
                    let from = stream
                        .get_ref()
                        .0
                        .peer_addr()
                        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
                    return (stream, from);
                }
                Some(Err(_)) => continue,
                // The accept loop only stops when this is dropped.
                None => std::future::pending().await,
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }
}

fn verify_node_with(
    verifier: &rustls::client::WebPkiServerVerifier,
    certificates: &[CertificateDer<'static>],
    host: &str,
) -> Result<(), String> {
    use rustls::client::danger::ServerCertVerifier;
    let Some((leaf, intermediates)) = certificates.split_first() else {
        return Err("no certificate".into());
    };
    let name = ServerName::try_from(host.trim_start_matches('[').trim_end_matches(']'))
        .map_err(|_| format!("{host} is not a DNS name or an IP address"))?;
    verifier
        .verify_server_cert(
            leaf,
            intermediates,
            &name,
            &[],
            rustls::pki_types::UnixTime::now(),
        )
        .map(|_| ())
        .map_err(|e| format!("not a node certificate for {host}: {e}"))
}

/// The host of `host:port` (an IPv6 host keeps no brackets).
pub fn host_of(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map_or(addr, |(host, _)| host);
    host.trim_start_matches('[').trim_end_matches(']')
}

/// ring, deliberately: rustls deprecates it for its lack of post-quantum
/// key exchange, but the provider that has one (aws-lc-rs) needs cmake and
/// more C to build on every machine that builds Quiver.
#[allow(deprecated)]
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn build(files: &TlsConfig, own_host: Option<&str>) -> Result<Configs, TlsError> {
    let chain = read_certificates(&files.cert_path)?;
    let expires_unix_s = chain_expiry(&chain).map_err(|reason| TlsError::File {
        path: files.cert_path.display().to_string(),
        reason,
    })?;
    let key = read_key(&files.key_path)?;
    let cluster_ca = read_roots(&files.ca_path, RootCertStore::empty())?;
    let versions = rustls::DEFAULT_VERSIONS;

    let h2 = || vec![b"h2".to_vec()];
    let server_with = |verifier: Option<Arc<dyn rustls::server::danger::ClientCertVerifier>>,
                       alpn: Vec<Vec<u8>>|
     -> Result<Arc<ServerConfig>, TlsError> {
        let builder =
            ServerConfig::builder_with_provider(provider()).with_protocol_versions(versions)?;
        let builder = match verifier {
            Some(verifier) => builder.with_client_cert_verifier(verifier),
            None => builder.with_no_client_auth(),
        };
        let mut config = builder.with_single_cert(chain.clone(), key.clone_key())?;
        config.alpn_protocols = alpn;
        Ok(Arc::new(config))
    };
    let verifier = |roots: RootCertStore, required: bool| {
        let builder = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider());
        let builder = if required {
            builder
        } else {
            builder.allow_unauthenticated()
        };
        builder
            .build()
            .map_err(|e| TlsError::Verifier(e.to_string()))
    };
    // Clients need a certificate only if a client CA is named. Nodes are
    // clients too when they join through a member, with a certificate from
    // the cluster CA, so the client port always takes those.
    let (client_verifier, metrics_verifier) = if files.client_ca_path.as_os_str().is_empty() {
        (verifier(cluster_ca.clone(), false)?, None)
    } else {
        let roots = read_roots(&files.client_ca_path, cluster_ca.clone())?;
        let required = verifier(roots, true)?;
        (required.clone(), Some(required))
    };
    let outgoing = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)?
        .with_root_certificates(cluster_ca.clone())
        .with_client_auth_cert(chain.clone(), key.clone_key())?;
    let mut outgoing = outgoing;
    outgoing.alpn_protocols = h2();
    let node_verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(cluster_ca.clone()),
        provider(),
    )
    .build()
    .map_err(|e| TlsError::Verifier(e.to_string()))?;
    if let Some(host) = own_host {
        verify_node_with(&node_verifier, &chain, host).map_err(|reason| TlsError::File {
            path: files.cert_path.display().to_string(),
            reason: format!("its peers would refuse it: {reason}"),
        })?;
    }
    let cluster_verifier = verifier(cluster_ca, true)?;
    Ok(Configs {
        client: server_with(Some(client_verifier), h2())?,
        peer: server_with(Some(cluster_verifier.clone()), h2())?,
        // The metrics listener speaks HTTP/1.1 only.
        metrics: server_with(metrics_verifier, vec![b"http/1.1".to_vec()])?,
        outgoing: Arc::new(outgoing),
        node_verifier,
        expires_unix_s,
    })
}

/// The earliest `notAfter` of a certificate chain, in Unix seconds.
fn chain_expiry(chain: &[CertificateDer<'_>]) -> Result<i64, String> {
    chain
        .iter()
        .map(|der| {
            x509_parser::parse_x509_certificate(der.as_ref())
                .map(|(_, cert)| cert.validity().not_after.timestamp())
                .map_err(|e| format!("a certificate that cannot be parsed: {e}"))
        })
        .try_fold(i64::MAX, |earliest, expiry| Ok(earliest.min(expiry?)))
}

/// The file at `path`, at most [`TLS_FILE_BYTES_MAX`].
fn read_bounded(path: &Path) -> Result<Vec<u8>, TlsError> {
    let failed = |reason: String| TlsError::File {
        path: path.display().to_string(),
        reason,
    };
    let file = std::fs::File::open(path).map_err(|e| failed(e.to_string()))?;
    let mut bytes = Vec::new();
    use std::io::Read;
    file.take(TLS_FILE_BYTES_MAX + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| failed(e.to_string()))?;
    if bytes.len() as u64 > TLS_FILE_BYTES_MAX {
        return Err(failed(format!("larger than {TLS_FILE_BYTES_MAX} bytes")));
    }
    Ok(bytes)
}

fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read_bounded(path)?;
    let certificates = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::File {
            path: path.display().to_string(),
            reason: format!("not PEM certificates: {e}"),
        })?;
    if certificates.is_empty() {
        return Err(TlsError::File {
            path: path.display().to_string(),
            reason: "no certificate in it".into(),
        });
    }
    Ok(certificates)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = read_bounded(path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| TlsError::File {
        path: path.display().to_string(),
        reason: format!("no PEM private key: {e}"),
    })
}

/// `roots` with the certificates of `path` added.
fn read_roots(path: &Path, mut roots: RootCertStore) -> Result<RootCertStore, TlsError> {
    for certificate in read_certificates(path)? {
        roots.add(certificate).map_err(|e| TlsError::File {
            path: path.display().to_string(),
            reason: format!("not a usable CA certificate: {e}"),
        })?;
    }
    Ok(roots)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_come_out_of_addresses() {
        assert_eq!(host_of("127.0.0.1:7470"), "127.0.0.1");
        assert_eq!(host_of("[::1]:7470"), "::1");
        assert_eq!(host_of("node-1.quiver:17470"), "node-1.quiver");
        assert_eq!(host_of("no-port"), "no-port");
    }

    /// A CA in `dir` (`NAME-ca.pem`) and certificates it issues.
    struct TestCa {
        certificate: rcgen::Certificate,
        key: rcgen::KeyPair,
    }

    impl TestCa {
        fn new(dir: &Path, name: &str) -> TestCa {
            let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, name);
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            let key = rcgen::KeyPair::generate().unwrap();
            let certificate = params.self_signed(&key).unwrap();
            std::fs::write(dir.join(format!("{name}-ca.pem")), certificate.pem()).unwrap();
            TestCa { certificate, key }
        }

        /// `NAME.pem` and `NAME-key.pem`: a node's (server and client use)
        /// for `hosts`, or a client's (client use only).
        fn issue(&self, dir: &Path, name: &str, hosts: &[&str], node: bool) {
            let mut params = rcgen::CertificateParams::new(
                hosts.iter().map(|h| (*h).to_owned()).collect::<Vec<_>>(),
            )
            .unwrap();
            params.extended_key_usages = if node {
                vec![
                    rcgen::ExtendedKeyUsagePurpose::ServerAuth,
                    rcgen::ExtendedKeyUsagePurpose::ClientAuth,
                ]
            } else {
                vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth]
            };
            // Before the CA's (rcgen's default, 4096): the chain's earliest.
            params.not_after = rcgen::date_time_ymd(2040, 1, 1);
            let key = rcgen::KeyPair::generate().unwrap();
            let certificate = params
                .signed_by(&key, &self.certificate, &self.key)
                .unwrap();
            std::fs::write(dir.join(format!("{name}.pem")), certificate.pem()).unwrap();
            std::fs::write(dir.join(format!("{name}-key.pem")), key.serialize_pem()).unwrap();
        }
    }

    fn files(dir: &Path, cert: &str, ca: &str) -> TlsConfig {
        TlsConfig {
            cert_path: dir.join(format!("{cert}.pem")),
            key_path: dir.join(format!("{cert}-key.pem")),
            ca_path: dir.join(format!("{ca}-ca.pem")),
            client_ca_path: Default::default(),
        }
    }

    fn chain(dir: &Path, name: &str) -> Vec<CertificateDer<'static>> {
        read_certificates(&dir.join(format!("{name}.pem"))).unwrap()
    }

    #[test]
    fn only_a_node_certificate_from_the_cluster_ca_for_the_host_passes() {
        let dir = tempfile::tempdir().unwrap();
        let dir = dir.path();
        let cluster = TestCa::new(dir, "cluster");
        let other = TestCa::new(dir, "other");
        cluster.issue(dir, "node", &["127.0.0.1", "node-1.quiver"], true);
        cluster.issue(dir, "client", &[], false);
        cluster.issue(dir, "named-client", &["127.0.0.1"], false);
        other.issue(dir, "stranger", &["127.0.0.1"], true);
        let tls = Tls::load(&files(dir, "node", "cluster"), Some("127.0.0.1"))
            .unwrap()
            .unwrap();
        let verify = |name: &str, host: &str| tls.verify_node(Some(&chain(dir, name)), host);
        verify("node", "127.0.0.1").unwrap();
        verify("node", "node-1.quiver").unwrap();
        verify("node", "[127.0.0.1]").unwrap();
        for (name, host, why) in [
            ("node", "10.0.0.1", "another host"),
            ("node", "node-2.quiver", "another name"),
            ("client", "127.0.0.1", "a client's, naming nothing"),
            (
                "named-client",
                "127.0.0.1",
                "a client's, for client use only",
            ),
            ("stranger", "127.0.0.1", "another CA's"),
        ] {
            assert!(
                verify(name, host).is_err(),
                "{name} for {host} passed: {why}"
            );
        }
        assert!(tls.verify_node(None, "127.0.0.1").is_err());
        assert!(tls.verify_node(Some(&[]), "127.0.0.1").is_err());
        let garbage = [CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x00])];
        assert!(tls.verify_node(Some(&garbage), "127.0.0.1").is_err());

        // A node's own certificate must name its own peer host.
        let error = Tls::load(&files(dir, "node", "cluster"), Some("10.0.0.1"))
            .unwrap_err()
            .to_string();
        assert!(error.contains("its peers would refuse it"), "{error}");
        let error = Tls::load(&files(dir, "stranger", "cluster"), Some("127.0.0.1"))
            .unwrap_err()
            .to_string();
        assert!(error.contains("its peers would refuse it"), "{error}");
        // Without peers (a node alone) any name does.
        Tls::load(&files(dir, "node", "cluster"), None)
            .unwrap()
            .unwrap();
    }

    #[test]
    fn a_failed_reload_keeps_the_certificates_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let dir = dir.path();
        let cluster = TestCa::new(dir, "cluster");
        cluster.issue(dir, "node", &["127.0.0.1"], true);
        let tls = Tls::load(&files(dir, "node", "cluster"), Some("127.0.0.1"))
            .unwrap()
            .unwrap();
        let before = Arc::as_ptr(&tls.server(Port::Peer));
        // The node certificate's notAfter, 2040-01-01T00:00:00Z.
        assert_eq!(tls.expires_unix_s(), 2_208_988_800);
        std::fs::write(dir.join("node-key.pem"), b"not a key").unwrap();
        assert!(tls.reload().is_err());
        assert_eq!(Arc::as_ptr(&tls.server(Port::Peer)), before);
        cluster.issue(dir, "node", &["127.0.0.1"], true);
        tls.reload().unwrap();
        assert_ne!(Arc::as_ptr(&tls.server(Port::Peer)), before);
    }

    #[test]
    fn bad_files_are_refused_with_their_path() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, b"").unwrap();
        let junk = dir.path().join("junk.pem");
        std::fs::write(
            &junk,
            b"-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let big = dir.path().join("big.pem");
        std::fs::write(&big, vec![b'a'; (TLS_FILE_BYTES_MAX + 1) as usize]).unwrap();
        for (path, says) in [
            (&empty, "no certificate"),
            (&junk, "not PEM"),
            (&big, "larger than"),
            (&dir.path().join("missing.pem"), "No such file"),
        ] {
            let files = TlsConfig {
                cert_path: path.clone(),
                key_path: path.clone(),
                ca_path: path.clone(),
                client_ca_path: Default::default(),
            };
            let error = Tls::load(&files, None).unwrap_err().to_string();
            assert!(error.contains(&path.display().to_string()), "{error}");
            assert!(error.contains(says), "{error}");
        }
    }
}
