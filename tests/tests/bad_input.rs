//! Every class of bad input gets a typed gRPC error, stores nothing, and
//! leaves the node serving.

#![allow(clippy::unwrap_used)]

use quiver_proto::v1::{self as pb, FeatureStatus, ValueType};
use quiver_tests::{
    Client, Node, apply_view as apply, feature, int64, now_us, row, string, write_rows as write,
};
use tonic::Code;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

const LIMITS: &str = r#"
[limits]
request_bytes_max = 4096
write_rows_max = 5
get_keys_max = 5
get_feature_refs_max = 3
get_values_max = 12
entity_key_bytes_max = 16
value_bytes_max = 64
event_ts_future_seconds_max = 60
"#;

/// One node in `dir` started with `config` (TOML) as its config file.
async fn start_with_config(dir: &std::path::Path, config: &str) -> Node {
    let path = dir.join("quiver.toml");
    std::fs::write(&path, config).expect("write config");
    Node::start(
        &dir.join("node"),
        &["--config", path.to_str().expect("utf-8 path")],
    )
    .await
    .expect("node starts")
}

fn view(name: &str, features: Vec<pb::FeatureSpec>) -> pb::FeatureView {
    pb::FeatureView {
        name: name.into(),
        features,
        ..Default::default()
    }
}

async fn get(
    client: &mut Client,
    keys: Vec<String>,
    features: Vec<String>,
) -> Result<pb::GetResponse, tonic::Status> {
    client
        .get(pb::GetRequest {
            entity_keys: keys,
            features,
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner())
}

#[track_caller]
fn expect_code<T: std::fmt::Debug>(result: Result<T, tonic::Status>, code: Code, needle: &str) {
    let status = result.expect_err("request must fail");
    assert_eq!(status.code(), code, "wrong code for {needle:?}: {status:?}");
    assert!(
        status.message().contains(needle),
        "message {:?} does not mention {needle:?}",
        status.message()
    );
}

/// Sends raw bytes as a request message, bypassing protobuf encoding.
#[derive(Debug, Clone, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }
    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        use prost::bytes::BufMut;
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        use prost::bytes::Buf;
        let mut out = vec![0; src.remaining()];
        src.copy_to_slice(&mut out);
        Ok(Some(out))
    }
}

#[tokio::test]
async fn bad_input_is_rejected_with_typed_errors_and_nothing_is_stored() {
    let dir = tempfile::tempdir().expect("temp dir");
    let node = start_with_config(dir.path(), LIMITS).await;
    let mut client = node.client().await.expect("connect");
    let ok_view = view(
        "v",
        vec![
            feature("n", ValueType::Int64, None),
            feature("s", ValueType::String, None),
            feature("x", ValueType::Int64, None),
        ],
    );
    apply(&mut client, ok_view.clone())
        .await
        .expect("apply a good view");
    let now = now_us();
    let good = || row("good", now, &[("n", int64(1))]);

    eprintln!("--- bad views");
    expect_code(
        apply(
            &mut client,
            view(
                "dup",
                vec![
                    feature("a", ValueType::Int64, None),
                    feature("a", ValueType::Bool, None),
                ],
            ),
        )
        .await,
        Code::InvalidArgument,
        "more than once",
    );
    expect_code(
        apply(
            &mut client,
            view("bad name!", vec![feature("a", ValueType::Int64, None)]),
        )
        .await,
        Code::InvalidArgument,
        "name",
    );
    expect_code(
        apply(&mut client, view("empty", vec![])).await,
        Code::InvalidArgument,
        "no features",
    );
    expect_code(
        apply(
            &mut client,
            view("untyped", vec![feature("a", ValueType::Unspecified, None)]),
        )
        .await,
        Code::InvalidArgument,
        "type",
    );
    expect_code(
        apply(
            &mut client,
            view("d", vec![feature("a", ValueType::Int64, Some(string("x")))]),
        )
        .await,
        Code::InvalidArgument,
        "default",
    );
    let mut changed = ok_view.clone();
    changed.features[0].r#type = ValueType::String as i32;
    expect_code(
        apply(&mut client, changed).await,
        Code::FailedPrecondition,
        "incompatible",
    );
    expect_code(
        client
            .apply_feature_view(pb::ApplyFeatureViewRequest { view: None })
            .await,
        Code::InvalidArgument,
        "no view",
    );

    eprintln!("--- bad writes: each batch also carries a good row, which must not be stored");
    let cases: Vec<(&str, Vec<pb::WriteRow>, Code, &str)> = vec![
        ("nope", vec![good()], Code::NotFound, "nope"),
        (
            "v",
            vec![good(), row("k", now, &[("zz", int64(1))])],
            Code::InvalidArgument,
            "zz",
        ),
        (
            "v",
            vec![good(), row("k", now, &[("n", string("text"))])],
            Code::InvalidArgument,
            "v:n",
        ),
        (
            "v",
            vec![good(), row("", now, &[("n", int64(1))])],
            Code::InvalidArgument,
            "empty",
        ),
        (
            "v",
            vec![good(), row("k".repeat(17).as_str(), now, &[])],
            Code::InvalidArgument,
            "entity_key_bytes_max",
        ),
        (
            "v",
            vec![good(), row("k", 0, &[])],
            Code::InvalidArgument,
            "missing",
        ),
        (
            "v",
            vec![good(), row("k", -5, &[])],
            Code::InvalidArgument,
            "not positive",
        ),
        (
            "v",
            vec![good(), row("k", now + 3_600_000_000, &[])],
            Code::InvalidArgument,
            "future",
        ),
        (
            "v",
            vec![good(), row("k", now, &[("s", string(&"x".repeat(65)))])],
            Code::InvalidArgument,
            "value_bytes_max",
        ),
        (
            "v",
            (0..6).map(|i| row(&format!("k{i}"), now, &[])).collect(),
            Code::InvalidArgument,
            "write_rows_max",
        ),
    ];
    for (view_name, rows, code, needle) in cases {
        expect_code(write(&mut client, view_name, rows).await, code, needle);
    }
    let response = get(&mut client, vec!["good".into()], vec!["v:n".into()])
        .await
        .expect("get");
    assert_eq!(
        response.entities[0].features[0].status(),
        FeatureStatus::NotFound,
        "nothing of a rejected batch is stored"
    );

    eprintln!("--- bad gets");
    let keys = |n: usize| (0..n).map(|i| format!("k{i}")).collect::<Vec<_>>();
    expect_code(
        get(&mut client, keys(1), vec!["nope:n".into()]).await,
        Code::NotFound,
        "nope",
    );
    expect_code(
        get(&mut client, keys(1), vec!["v:zz".into()]).await,
        Code::NotFound,
        "zz",
    );
    expect_code(
        get(&mut client, keys(6), vec!["v:n".into()]).await,
        Code::InvalidArgument,
        "get_keys_max",
    );
    expect_code(
        get(&mut client, keys(1), vec!["v:n".into(); 4]).await,
        Code::InvalidArgument,
        "get_feature_refs_max",
    );
    expect_code(
        get(&mut client, keys(5), vec!["v".into()]).await,
        Code::InvalidArgument,
        "get_values_max",
    );
    let stale_get = |consistency: pb::Consistency, max_staleness_ms: u64| pb::GetRequest {
        entity_keys: keys(1),
        features: vec!["v:n".into()],
        consistency: consistency as i32,
        max_staleness_ms,
        ..Default::default()
    };
    expect_code(
        client
            .get(stale_get(pb::Consistency::Replica, 300_001))
            .await,
        Code::InvalidArgument,
        "replica_staleness_ms_max",
    );
    expect_code(
        client.get(stale_get(pb::Consistency::Strong, 1_000)).await,
        Code::InvalidArgument,
        "STRONG",
    );
    client
        .get(stale_get(pb::Consistency::Leader, 300_000))
        .await
        .expect("a budget at the limit is fine");
    expect_code(
        get(&mut client, vec![], vec!["v".into()]).await,
        Code::InvalidArgument,
        "no entity keys",
    );
    expect_code(
        get(&mut client, keys(1), vec![]).await,
        Code::InvalidArgument,
        "no feature",
    );
    expect_code(
        get(&mut client, vec!["".into()], vec!["v".into()]).await,
        Code::InvalidArgument,
        "empty",
    );
    expect_code(
        client
            .delete(pb::DeleteRequest {
                view: "v".into(),
                entity_keys: vec![],
            })
            .await,
        Code::InvalidArgument,
        "no entity keys",
    );

    eprintln!("--- a request over request_bytes_max");
    let big = pb::WriteRequest {
        view: "v".into(),
        rows: vec![row("k", now, &[("s", string(&"x".repeat(5000)))])],
        request_id: Vec::new(),
    };
    let status = client
        .write(big)
        .await
        .expect_err("oversized request fails");
    assert!(
        matches!(status.code(), Code::OutOfRange | Code::ResourceExhausted),
        "{status:?}"
    );

    eprintln!("--- malformed protobuf");
    let channel = tonic::transport::Endpoint::from_shared(node.endpoint())
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let mut raw = tonic::client::Grpc::new(channel);
    for garbage in [
        vec![0xff, 0xff, 0xff],
        vec![0x0a, 0x50, 0x01],
        vec![0x12, 0x03, 0x0a, 0x01, 0xff],
    ] {
        raw.ready().await.expect("channel ready");
        let path =
            tonic::codegen::http::uri::PathAndQuery::from_static("/quiver.v1.FeatureStore/Write");
        let result = raw
            .unary(tonic::Request::new(garbage.clone()), path, RawCodec)
            .await;
        let status = result.expect_err("garbage is rejected");
        assert_eq!(
            status.code(),
            Code::InvalidArgument,
            "{garbage:02x?}: {status:?}"
        );
    }

    eprintln!("--- the node still serves");
    write(&mut client, "v", vec![good()])
        .await
        .expect("a good write after all that");
    let response = get(&mut client, vec!["good".into()], vec!["v:n".into()])
        .await
        .expect("get");
    assert_eq!(
        response.entities[0].features[0].status(),
        FeatureStatus::Present
    );
}

#[tokio::test]
async fn health_service_reports_serving() {
    let dir = tempfile::tempdir().expect("temp dir");
    let node = Node::start(&dir.path().join("node"), &[])
        .await
        .expect("node starts");
    let channel = tonic::transport::Endpoint::from_shared(node.endpoint())
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    for service in ["", "quiver.v1.FeatureStore"] {
        let response = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .expect("health check")
            .into_inner();
        assert_eq!(
            response.status(),
            tonic_health::pb::health_check_response::ServingStatus::Serving,
            "{service:?}"
        );
    }
}

#[tokio::test]
async fn a_get_response_over_its_byte_limit_is_refused_naming_the_limit() {
    let dir = tempfile::tempdir().expect("temp dir");
    let node = start_with_config(dir.path(), "[limits]\nget_response_bytes_max = 1000\n").await;
    let mut client = node.client().await.expect("connect");
    apply(
        &mut client,
        view("big", vec![feature("s", ValueType::String, None)]),
    )
    .await
    .expect("apply");
    let now = now_us();
    let keys: Vec<String> = (0..5).map(|i| format!("k{i}")).collect();
    let rows = keys
        .iter()
        .map(|k| row(k, now, &[("s", string(&"x".repeat(300)))]))
        .collect();
    write(&mut client, "big", rows).await.expect("write");

    eprintln!("--- two 300-byte values fit in 1000 bytes, five do not");
    let two = get(&mut client, keys[..2].to_vec(), vec!["big".into()])
        .await
        .expect("a small enough get");
    assert_eq!(two.entities.len(), 2);
    expect_code(
        get(&mut client, keys.clone(), vec!["big".into()]).await,
        Code::InvalidArgument,
        "limits.get_response_bytes_max",
    );
    eprintln!("--- and the node still serves");
    get(&mut client, keys[..1].to_vec(), vec!["big".into()])
        .await
        .expect("still serving");
}

/// The client port serves no peer calls, and the peer port serves only
/// calls carrying the cluster secret: a client cannot propose around the
/// schema checks, vote or install a snapshot.
#[tokio::test]
async fn peer_calls_need_the_peer_port_and_the_cluster_secret() {
    use quiver_proto::peer::PeerBatch;
    use quiver_proto::peer::peer_client::PeerClient;
    let dir = tempfile::tempdir().unwrap();
    let node = start_with_config(dir.path(), "[cluster]\nsecret = \"right-secret\"\n").await;
    let call = |addr: std::net::SocketAddr, secret: Option<&'static str>| async move {
        let mut client = PeerClient::connect(format!("http://{addr}")).await.unwrap();
        let batches = futures::stream::iter([PeerBatch::default()]);
        let mut request = tonic::Request::new(batches);
        if let Some(secret) = secret {
            request
                .metadata_mut()
                .insert("x-quiver-cluster-secret", secret.parse().unwrap());
        }
        client.call_stream(request).await.map(|_| ())
    };
    expect_code(
        call(node.addr(), Some("right-secret")).await,
        Code::Unimplemented,
        "",
    );
    for secret in [None, Some("wrong-secret"), Some("right-secre")] {
        expect_code(
            call(node.peer_addr(), secret).await,
            Code::Unauthenticated,
            "cluster secret",
        );
    }
    call(node.peer_addr(), Some("right-secret")).await.unwrap();

    eprintln!("--- a call stream: undecodable calls are answered, an oversized batch ends it");
    use quiver_proto::peer::PeerRequest;
    let mut client = PeerClient::connect(format!("http://{}", node.peer_addr()))
        .await
        .unwrap();
    let garbage = |n: u32| PeerRequest {
        group: n,
        payload: vec![0xff; 7],
        replica: 0,
        request_id: String::new(),
        timeout_ms: 1000,
    };
    let (batches, outgoing) = tokio::sync::mpsc::channel(2);
    batches
        .send(PeerBatch {
            calls: (0..3).map(garbage).collect(),
            first_call: 40,
        })
        .await
        .unwrap();
    let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(outgoing));
    request
        .metadata_mut()
        .insert("x-quiver-cluster-secret", "right-secret".parse().unwrap());
    let mut replies = client.call_stream(request).await.unwrap().into_inner();
    let mut answered = Vec::new();
    for _ in 0..3 {
        let reply = replies.message().await.unwrap().unwrap();
        assert!(!reply.payload.is_empty());
        answered.push(reply.call);
    }
    answered.sort_unstable();
    assert_eq!(
        answered,
        [40, 41, 42],
        "each call answered under its number"
    );
    batches
        .send(PeerBatch {
            calls: (0..513).map(garbage).collect(),
            first_call: 43,
        })
        .await
        .unwrap();
    let ended = replies.message().await.unwrap_err();
    assert_eq!(ended.code(), Code::InvalidArgument, "{ended:?}");

    eprintln!("--- a stream whose caller closes its side ends once it has answered");
    let (batches, outgoing) = tokio::sync::mpsc::channel(2);
    batches
        .send(PeerBatch {
            calls: vec![garbage(0)],
            first_call: 7,
        })
        .await
        .unwrap();
    drop(batches);
    let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(outgoing));
    request
        .metadata_mut()
        .insert("x-quiver-cluster-secret", "right-secret".parse().unwrap());
    let mut replies = client.call_stream(request).await.unwrap().into_inner();
    assert_eq!(replies.message().await.unwrap().unwrap().call, 7);
    let end = tokio::time::timeout(std::time::Duration::from_secs(10), replies.message()).await;
    assert!(matches!(end, Ok(Ok(None))), "{end:?}");
    assert!(ended.message().contains("at most 512"), "{ended:?}");
    // And the node still serves clients.
    let mut client = node.client().await.unwrap();
    client.status(pb::StatusRequest {}).await.unwrap();
}
