//! TLS on real nodes, with certificates `quiverctl tls` made: a cluster
//! serves clients, peers and Prometheus over TLS; a client without a
//! certificate, one that trusts another CA, one with a certificate from
//! another CA and a plaintext one are refused; a peer call whose
//! certificate is not a node certificate for the node it claims to be (a
//! certificate for another host, a client's, another CA's) is refused; a
//! node joins with its certificate, a client certificate cannot join one,
//! and a node whose certificate does not name its own address does not
//! start; SIGHUP reloads the certificates and a broken file keeps the old
//! ones.

#![allow(clippy::unwrap_used, missing_docs)]

use std::sync::Arc;
use std::time::Duration;

use quiver_proto::peer as peer_pb;
use quiver_proto::v1 as pb;
use quiver_tests::counter::{
    CONVERGE_WAIT, apply_counter_view, keys, read_values, retry, start, write_values,
};
use quiver_tests::tls::TestCa;
use quiver_tests::{Node, quiverctl};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

/// A connection to `addr` with `tls` (or plaintext), failing at the first
/// call if not before.
async fn call_status(
    addr: std::net::SocketAddr,
    tls: Option<ClientTlsConfig>,
) -> Result<(), String> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10));
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls).unwrap();
    }
    let channel: Channel = endpoint.connect().await.map_err(|e| format!("{e:?}"))?;
    quiver_proto::v1::feature_store_client::FeatureStoreClient::new(channel)
        .status(pb::StatusRequest {})
        .await
        .map(|_| ())
        .map_err(|e| format!("{e:?}"))
}

/// GET /metrics over TLS by hand: (status line, body).
async fn get_metrics(
    addr: std::net::SocketAddr,
    ca: &TestCa,
    identity: Option<&str>,
) -> Result<String, String> {
    let mut roots = rustls::RootCertStore::empty();
    for certificate in CertificateDer::pem_file_iter(ca.path("ca.pem")).unwrap() {
        roots.add(certificate.unwrap()).unwrap();
    }
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = match identity {
        Some(name) => builder
            .with_client_auth_cert(
                CertificateDer::pem_file_iter(ca.path(&format!("{name}.pem")))
                    .unwrap()
                    .map(Result::unwrap)
                    .collect(),
                PrivateKeyDer::from_pem_file(ca.path(&format!("{name}-key.pem"))).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut stream = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
        .await
        .map_err(|e| e.to_string())?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .map_err(|e| e.to_string())?;
    let mut response = String::new();
    // TLS 1.3: a refused client certificate shows as an error on the first
    // read, after the handshake "succeeded" on this side.
    stream
        .read_to_string(&mut response)
        .await
        .map_err(|e| e.to_string())?;
    Ok(response)
}

/// quiverctl at `addr` over TLS with `ca`'s client certificate.
fn ctl(ca: &TestCa, addr: std::net::SocketAddr, args: &[&str]) -> anyhow::Result<String> {
    let mut all = ca.quiverctl_flags();
    all.extend(args.iter().map(|arg| (*arg).to_owned()));
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    quiverctl(&addr.to_string(), &all)
}

fn pairs(env: &[(String, String)]) -> Vec<(&str, &str)> {
    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_cluster_takes_only_clients_and_peers_with_the_right_certificates() {
    let certs = tempfile::tempdir().unwrap();
    let ca = TestCa::new(&certs.path().join("ca")).unwrap();
    // A certificate from the cluster CA for a host that is no node's.
    ca.issue("elsewhere", &["10.9.9.9"]).unwrap();
    let other = TestCa::new(&certs.path().join("other")).unwrap();
    let mut env = ca.node_env(true);
    env.push(("QUIVER_CLUSTER__SHARD_COUNT".into(), "3".into()));
    env.push(("QUIVER_METRICS_LISTEN_ADDR".into(), "127.0.0.1:0".into()));
    let mut cluster = start(&pairs(&env)).await;

    eprintln!("--- writes through one node and reads through every node: peers talk over TLS");
    let client = cluster.node(1).client().await.unwrap();
    apply_counter_view(&client).await;
    let keys = keys(30, "tls");
    let values: Vec<(String, i64)> = keys.iter().map(|k| (k.clone(), 7)).collect();
    retry("write over TLS", CONVERGE_WAIT, || {
        let (mut client, values) = (client.clone(), values.clone());
        async move { write_values(&mut client, &values).await }
    })
    .await;
    for id in 1..=3 {
        let mut client = cluster.node(id).client().await.unwrap();
        let (read, _) = read_values(&mut client, &keys, pb::Consistency::Strong)
            .await
            .unwrap();
        assert!(read.iter().all(|v| *v == Some(7)), "node {id}: {read:?}");
    }

    eprintln!("--- clients the client port refuses");
    let addr = cluster.node(1).addr();
    call_status(addr, Some(ca.client_config(Some("client")).unwrap()))
        .await
        .expect("the CA's client certificate is taken");
    for (what, tls) in [
        (
            "no client certificate",
            Some(ca.client_config(None).unwrap()),
        ),
        (
            "a client certificate from another CA",
            Some(
                ca.client_config(None)
                    .unwrap()
                    .identity(other.identity("client").unwrap()),
            ),
        ),
        (
            "trusting another CA",
            Some(other.client_config(Some("client")).unwrap()),
        ),
        ("plaintext", None),
    ] {
        let refused = call_status(addr, tls).await;
        assert!(refused.is_err(), "{what}: let through");
        eprintln!("{what}: {}", refused.unwrap_err());
    }
    let ctl_ok = ctl(&ca, addr, &["status"]);
    assert!(ctl_ok.is_ok(), "{ctl_ok:?}");
    let ctl_refused = quiverctl(&addr.to_string(), &["status"]);
    assert!(ctl_refused.is_err(), "quiverctl without --ca");

    eprintln!("--- /metrics over TLS needs a client certificate too");
    let metrics = cluster.node(1).metrics_addr().await.unwrap();
    let scraped = get_metrics(metrics, &ca, Some("client")).await.unwrap();
    assert!(scraped.starts_with("HTTP/1.1 200"), "{scraped:.200}");
    assert!(
        scraped.contains("quiver_tls_handshake_failures_total"),
        "refusals are counted"
    );
    let expiry: f64 = scraped
        .lines()
        .find_map(|line| line.strip_prefix("quiver_tls_cert_expiry_timestamp_seconds "))
        .unwrap_or_else(|| panic!("no expiry gauge: {scraped:.2000}"))
        .trim()
        .parse()
        .unwrap();
    let now_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(expiry > now_s, "the node certificate is valid: {expiry}");
    assert!(get_metrics(metrics, &ca, None).await.is_err());

    eprintln!("--- the peer port");
    let peer_addr = cluster.node(1).peer_addr();
    let peer_call = |identity: Option<(&TestCa, &str)>, node_header: Option<&str>| {
        let tls = match identity {
            Some((issuer, name)) => ca
                .client_config(None)
                .unwrap()
                .identity(issuer.identity(name).unwrap()),
            None => ca.client_config(None).unwrap(),
        };
        let node_header = node_header.map(str::to_owned);
        async move {
            let channel = Endpoint::from_shared(format!("https://{peer_addr}"))
                .unwrap()
                .timeout(Duration::from_secs(10))
                .tls_config(tls)
                .unwrap()
                .connect()
                .await
                .map_err(|e| (Code::Unavailable, format!("{e:?}")))?;
            let batches = futures::stream::iter([peer_pb::PeerBatch::default()]);
            let mut request = tonic::Request::new(batches);
            request.metadata_mut().insert(
                "x-quiver-cluster-secret",
                quiver_tests::TEST_CLUSTER_SECRET.parse().unwrap(),
            );
            if let Some(node) = node_header {
                request
                    .metadata_mut()
                    .insert("x-quiver-node-id", node.parse().unwrap());
            }
            peer_pb::peer_client::PeerClient::new(channel)
                .call_stream(request)
                .await
                .map(|_| ())
                .map_err(|status| (status.code(), status.message().to_owned()))
        }
    };
    // The nodes' own certificate, claiming node 2 (whose address it names):
    // through (an empty batch).
    peer_call(Some((&ca, "node")), Some("2")).await.unwrap();
    let (code, why) = peer_call(Some((&ca, "elsewhere")), Some("2"))
        .await
        .unwrap_err();
    assert_eq!(code, Code::PermissionDenied, "{why}");
    assert!(why.contains("is not node 2's (127.0.0.1"), "{why}");
    // A client's certificate (cluster CA, client use only) is not a node's.
    let (code, why) = peer_call(Some((&ca, "client")), Some("2"))
        .await
        .unwrap_err();
    assert_eq!(code, Code::PermissionDenied, "{why}");
    let (code, why) = peer_call(Some((&ca, "node")), None).await.unwrap_err();
    assert_eq!(code, Code::Unauthenticated, "{why}");
    let (code, why) = peer_call(Some((&ca, "node")), Some("99"))
        .await
        .unwrap_err();
    assert_eq!(code, Code::PermissionDenied, "{why}");
    assert!(peer_call(Some((&other, "node")), Some("2")).await.is_err());
    assert!(peer_call(None, Some("2")).await.is_err());

    eprintln!("--- joining: with its certificate, and with one that does not name its address");
    let member = cluster.node(1).addr().to_string();
    let mut join_env = ca.node_env(true);
    join_env.push((
        "QUIVER_CLUSTER__SECRET".into(),
        quiver_tests::TEST_CLUSTER_SECRET.into(),
    ));
    let joined = Node::start_with_env(
        &certs.path().join("joined"),
        &["--join", &member],
        &pairs(&join_env),
    )
    .await
    .unwrap();
    let listed = ctl(&ca, joined.addr(), &["node", "list"]).unwrap();
    assert!(listed.contains(&joined.peer_addr().to_string()), "{listed}");
    // A client certificate (what `quiverctl node add` would show) cannot
    // join a node.
    let mut admin = quiver_proto::admin::admin_client::AdminClient::new(
        cluster.node(1).channel().await.unwrap(),
    );
    let refused = admin
        .join_cluster(quiver_proto::admin::JoinClusterRequest {
            addr: "127.0.0.1:1".into(),
            peer_addr: "127.0.0.1:2".into(),
            secret: quiver_tests::TEST_CLUSTER_SECRET.into(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    // A node whose certificate does not name its own peer address does
    // not start (its peers would refuse it).
    for (key, file) in [
        ("QUIVER_TLS__CERT_PATH", "elsewhere.pem"),
        ("QUIVER_TLS__KEY_PATH", "elsewhere-key.pem"),
    ] {
        let entry = join_env.iter_mut().find(|(k, _)| k == key).unwrap();
        entry.1 = ca.path(file).display().to_string();
    }
    let refused = Node::start_with_env(
        &certs.path().join("misnamed"),
        &["--join", &member],
        &pairs(&join_env),
    )
    .await
    .unwrap_err();
    let refused = format!("{refused:#}");
    assert!(
        refused.contains("its peers would refuse it") && refused.contains("127.0.0.1"),
        "{refused}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_certificates_and_a_broken_file_keeps_the_old_ones() {
    let certs = tempfile::tempdir().unwrap();
    let ca = TestCa::new(certs.path()).unwrap();
    let data = tempfile::tempdir().unwrap();
    let node = Node::start_with_env(&data.path().join("node"), &[], &pairs(&ca.node_env(false)))
        .await
        .unwrap();
    let addr = node.addr();
    let by_name = || {
        ca.client_config(None)
            .unwrap()
            .domain_name("reloaded.quiver.test")
    };
    let refused = call_status(addr, Some(by_name())).await;
    assert!(refused.is_err(), "the first certificate does not name it");

    eprintln!("--- a new certificate with another name, then SIGHUP");
    ca.issue("node", &["127.0.0.1", "reloaded.quiver.test"])
        .unwrap();
    node.hangup().unwrap();
    retry("the reloaded certificate is served", CONVERGE_WAIT, || {
        let tls = by_name();
        async move { call_status(addr, Some(tls)).await }
    })
    .await;

    eprintln!("--- a broken key file: the reload fails, the node serves on");
    std::fs::write(ca.path("node-key.pem"), b"not a key").unwrap();
    node.hangup().unwrap();
    retry("the failed reload is logged", CONVERGE_WAIT, || {
        let log = node.log();
        async move {
            if log.contains("TLS reload failed") {
                Ok(())
            } else {
                Err("not yet".to_owned())
            }
        }
    })
    .await;
    call_status(addr, Some(by_name())).await.unwrap();
}
