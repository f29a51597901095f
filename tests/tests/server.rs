//! quiverd end to end: a real process on an ephemeral loopback port, a real
//! gRPC client.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use quiver_proto::v1::{self as pb, FeatureStatus, ValueType};
use quiver_tests::scrape::{sample, scrape, value_of};
use quiver_tests::{
    Client, Node, apply_view as apply, double, feature, int64, now_us, quiverctl, row, string,
    write_rows as write,
};
use tonic::Code;

const HOUR_US: i64 = 3_600_000_000;

fn driver_view(ttl_seconds: u64) -> pb::FeatureView {
    pb::FeatureView {
        name: "driver".into(),
        entities: vec!["driver_id".into()],
        features: vec![
            feature("trips", ValueType::Int64, None),
            feature("rating", ValueType::Double, Some(double(4.5))),
            feature("city", ValueType::String, None),
        ],
        ttl_seconds,
        description: "test view".into(),
        version: 0,
    }
}

async fn get(client: &mut Client, keys: &[&str], features: &[&str]) -> pb::GetResponse {
    client
        .get(pb::GetRequest {
            entity_keys: keys.iter().map(|k| (*k).to_owned()).collect(),
            features: features.iter().map(|f| (*f).to_owned()).collect(),
            ..Default::default()
        })
        .await
        .expect("get succeeds")
        .into_inner()
}

fn trips_of(response: &pb::GetResponse, entity: usize) -> Option<i64> {
    match response.entities[entity].features[0].value.as_ref()?.kind {
        Some(pb::value::Kind::Int64Val(v)) => Some(v),
        _ => None,
    }
}

fn statuses(entity: &pb::EntityResult) -> Vec<FeatureStatus> {
    entity.features.iter().map(|f| f.status()).collect()
}

async fn start() -> (tempfile::TempDir, Node, Client) {
    let dir = tempfile::tempdir().expect("temp dir");
    let node = Node::start(&dir.path().join("node"), &[])
        .await
        .expect("node starts");
    let client = node.client().await.expect("client connects");
    (dir, node, client)
}

#[tokio::test]
async fn write_then_get_with_every_status() {
    let (_dir, _node, mut client) = start().await;
    let applied = apply(&mut client, driver_view(3600)).await.expect("apply");
    assert!(applied.changed);
    assert_eq!(applied.view.expect("view").version, 1);
    let again = apply(&mut client, driver_view(3600))
        .await
        .expect("re-apply");
    assert!(!again.changed, "applying the same view twice is a no-op");

    let now = now_us();
    tracing_phase("write: a full row, a row with a null, an expired row");
    let out = write(
        &mut client,
        "driver",
        vec![
            row(
                "d1",
                now - 1000,
                &[
                    ("trips", int64(7)),
                    ("rating", double(4.9)),
                    ("city", string("Lisbon")),
                ],
            ),
            row("d2", now - 1000, &[("trips", int64(3))]),
            row(
                "d3",
                now - 2 * HOUR_US,
                &[
                    ("trips", int64(1)),
                    ("rating", double(3.0)),
                    ("city", string("Oslo")),
                ],
            ),
        ],
    )
    .await
    .expect("write");
    assert_eq!((out.rows_applied, out.rows_stale), (3, 0));

    tracing_phase("get: d1 present, d2 nulls, d3 expired, d4 missing (default served), d1 twice");
    let response = get(&mut client, &["d1", "d2", "d3", "d4", "d1"], &["driver:*"]).await;
    assert_eq!(
        response.feature_names,
        ["driver:trips", "driver:rating", "driver:city"]
    );
    assert_eq!(response.entities.len(), 5);
    use FeatureStatus::*;
    assert_eq!(statuses(&response.entities[0]), [Present, Present, Present]);
    assert_eq!(trips_of(&response, 0), Some(7));
    assert_eq!(response.entities[0].features[0].event_ts_us, now - 1000);
    assert_eq!(
        statuses(&response.entities[1]),
        [Present, NullValue, NullValue]
    );
    assert_eq!(
        statuses(&response.entities[2]),
        [OutsideMaxAge, OutsideMaxAge, OutsideMaxAge]
    );
    assert!(response.entities[2].features[0].value.is_none());
    assert_eq!(
        statuses(&response.entities[3]),
        [NotFound, Defaulted, NotFound]
    );
    assert_eq!(response.entities[3].features[1].value, Some(double(4.5)));
    assert_eq!(response.entities[4], response.entities[0]);

    tracing_phase("single feature references, in the order asked");
    let response = get(&mut client, &["d1"], &["driver:city", "driver:trips"]).await;
    assert_eq!(response.feature_names, ["driver:city", "driver:trips"]);
    assert_eq!(
        response.entities[0].features[0].value,
        Some(string("Lisbon"))
    );

    tracing_phase("a view evolves: a new feature reads as not found on old rows");
    let mut evolved = driver_view(3600);
    evolved
        .features
        .push(feature("vehicle", ValueType::String, Some(string("sedan"))));
    assert_eq!(
        apply(&mut client, evolved)
            .await
            .expect("evolve")
            .view
            .expect("view")
            .version,
        2
    );
    let response = get(&mut client, &["d1"], &["driver:vehicle", "driver:trips"]).await;
    assert_eq!(statuses(&response.entities[0]), [Defaulted, Present]);
}

#[tokio::test]
async fn reads_after_acknowledged_writes_see_them_through_the_cache() {
    let (_dir, node, mut client) = start().await;
    apply(&mut client, driver_view(0)).await.expect("apply");
    let base = now_us() - HOUR_US;

    tracing_phase("read (fills the cache), write newer, read again");
    write(
        &mut client,
        "driver",
        vec![row("k", base, &[("trips", int64(1))])],
    )
    .await
    .expect("write 1");
    assert_eq!(
        trips_of(&get(&mut client, &["k"], &["driver:trips"]).await, 0),
        Some(1)
    );
    assert_eq!(
        trips_of(&get(&mut client, &["k"], &["driver:trips"]).await, 0),
        Some(1)
    );
    write(
        &mut client,
        "driver",
        vec![row("k", base + 1, &[("trips", int64(2))])],
    )
    .await
    .expect("write 2");
    assert_eq!(
        trips_of(&get(&mut client, &["k"], &["driver:trips"]).await, 0),
        Some(2)
    );

    tracing_phase("an older write is ignored, counted, and the cache keeps the newer row");
    let out = write(
        &mut client,
        "driver",
        vec![row("k", base - 5, &[("trips", int64(0))])],
    )
    .await
    .expect("stale write");
    assert_eq!((out.rows_applied, out.rows_stale), (0, 1));
    assert_eq!(
        trips_of(&get(&mut client, &["k"], &["driver:trips"]).await, 0),
        Some(2)
    );

    tracing_phase("a negative cache entry is dropped by the write that creates the row");
    let missing = get(&mut client, &["new"], &["driver:trips"]).await;
    assert_eq!(
        missing.entities[0].features[0].status(),
        FeatureStatus::NotFound
    );
    write(
        &mut client,
        "driver",
        vec![row("new", base, &[("trips", int64(5))])],
    )
    .await
    .expect("write new");
    assert_eq!(
        trips_of(&get(&mut client, &["new"], &["driver:trips"]).await, 0),
        Some(5)
    );

    tracing_phase("readers racing a writer never see a value older than the last acknowledged one");
    let readers: Vec<_> = (0..3)
        .map(|_| {
            let endpoint = node.endpoint();
            tokio::spawn(async move {
                let mut client =
                    quiver_proto::v1::feature_store_client::FeatureStoreClient::connect(endpoint)
                        .await
                        .expect("reader connects");
                for _ in 0..300 {
                    get(&mut client, &["hot"], &["driver:trips"]).await;
                }
            })
        })
        .collect();
    for i in 1..=200 {
        write(
            &mut client,
            "driver",
            vec![row("hot", base + i, &[("trips", int64(i))])],
        )
        .await
        .expect("write");
        let seen = trips_of(&get(&mut client, &["hot"], &["driver:trips"]).await, 0);
        assert_eq!(
            seen,
            Some(i),
            "read after acknowledged write {i} returned {seen:?}"
        );
    }
    for reader in readers {
        reader.await.expect("reader");
    }
    let status = client
        .status(pb::StatusRequest {})
        .await
        .expect("status")
        .into_inner();
    assert!(
        status.cache.expect("cache status").hits > 0,
        "the cache served some reads"
    );
}

#[tokio::test]
async fn invalidate_and_delete() {
    let (_dir, _node, mut client) = start().await;
    apply(&mut client, driver_view(0)).await.expect("apply");
    let ts = now_us();
    write(
        &mut client,
        "driver",
        vec![
            row("a", ts, &[("trips", int64(1))]),
            row("b", ts, &[("trips", int64(2))]),
        ],
    )
    .await
    .expect("write");
    get(&mut client, &["a", "b"], &["driver"]).await;

    let dropped = client
        .invalidate(pb::InvalidateRequest {
            view: "driver".into(),
            entity_keys: vec!["a".into()],
        })
        .await
        .expect("invalidate keys")
        .into_inner();
    assert_eq!(dropped.entries_dropped, 1);
    let dropped = client
        .invalidate(pb::InvalidateRequest {
            view: "driver".into(),
            entity_keys: vec![],
        })
        .await
        .expect("invalidate view")
        .into_inner();
    assert_eq!(dropped.entries_dropped, 1, "only b was still cached");
    assert_eq!(
        trips_of(&get(&mut client, &["a"], &["driver:trips"]).await, 0),
        Some(1),
        "invalidate keeps data"
    );

    let deleted = client
        .delete(pb::DeleteRequest {
            view: "driver".into(),
            entity_keys: vec!["a".into(), "zzz".into()],
        })
        .await
        .expect("delete")
        .into_inner();
    assert_eq!(deleted.rows_deleted, 1);
    let response = get(&mut client, &["a", "b"], &["driver:trips"]).await;
    assert_eq!(
        response.entities[0].features[0].status(),
        FeatureStatus::NotFound
    );
    assert_eq!(trips_of(&response, 1), Some(2));

    tracing_phase(
        "deleting the view makes its rows unreachable, also for a new view of the same name",
    );
    client
        .delete_feature_view(pb::DeleteFeatureViewRequest {
            name: "driver".into(),
        })
        .await
        .expect("delete view");
    let err = client
        .get(pb::GetRequest {
            entity_keys: vec!["b".into()],
            features: vec!["driver".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    apply(&mut client, driver_view(0)).await.expect("re-create");
    let response = get(&mut client, &["b"], &["driver:trips"]).await;
    assert_eq!(
        response.entities[0].features[0].status(),
        FeatureStatus::NotFound
    );
}

#[tokio::test]
async fn data_survives_graceful_restart() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut node = Node::start(&dir.path().join("node"), &["--shutdown-drain-ms", "500"])
        .await
        .expect("node starts");
    let mut client = node.client().await.expect("client connects");
    apply(&mut client, driver_view(0)).await.expect("apply");
    let ts = now_us();
    write(
        &mut client,
        "driver",
        vec![row("a", ts, &[("trips", int64(42))])],
    )
    .await
    .expect("write");
    // A client left connected must not stop the node from stopping: the drain
    // is bounded by shutdown_drain_ms.
    node.restart().await.expect("restart");
    assert!(
        node.log().contains("stores flushed"),
        "graceful shutdown flushes: {}",
        node.log()
    );
    let mut client = node.client().await.expect("reconnect");
    let views = client
        .list_feature_views(pb::ListFeatureViewsRequest {})
        .await
        .expect("list")
        .into_inner()
        .views;
    assert_eq!(views.len(), 1);
    assert_eq!(
        trips_of(&get(&mut client, &["a"], &["driver:trips"]).await, 0),
        Some(42)
    );
}

#[tokio::test]
async fn every_acknowledged_write_survives_kill_9() {
    let (_dir, mut node, mut client) = start().await;
    apply(&mut client, driver_view(0)).await.expect("apply");
    let base = now_us() - HOUR_US;

    tracing_phase("writers stream acknowledged writes; the node is killed mid-stream");
    let (ack_tx, mut ack_rx) = tokio::sync::mpsc::unbounded_channel::<(String, i64)>();
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let endpoint = node.endpoint();
            let acks = ack_tx.clone();
            tokio::spawn(async move {
                let Ok(mut client) =
                    quiver_proto::v1::feature_store_client::FeatureStoreClient::connect(endpoint)
                        .await
                else {
                    return;
                };
                for i in 0..100_000i64 {
                    let rows = (0..5)
                        .map(|k| row(&format!("w{w}-k{k}"), base + i, &[("trips", int64(i))]))
                        .collect();
                    match write(&mut client, "driver", rows).await {
                        Ok(_) => {
                            for k in 0..5 {
                                let _ = acks.send((format!("w{w}-k{k}"), i));
                            }
                        }
                        Err(_) => return,
                    }
                }
            })
        })
        .collect();
    drop(ack_tx);
    // Kill once a good number of writes are acknowledged, with more in flight.
    let mut ledger = std::collections::HashMap::new();
    while ledger.len() < 20 || ledger.values().copied().min().unwrap_or(0) < 50 {
        let (key, value) = tokio::time::timeout(Duration::from_secs(60), ack_rx.recv())
            .await
            .expect("writes keep being acknowledged")
            .expect("writers alive");
        ledger.insert(key, value);
    }
    node.kill9().expect("kill -9");
    for writer in writers {
        writer.await.expect("writer task");
    }
    while let Some((key, value)) = ack_rx.recv().await {
        let entry = ledger.entry(key).or_insert(value);
        *entry = (*entry).max(value);
    }

    tracing_phase("after restart every acknowledged write is there");
    node.restart().await.expect("restart after kill -9");
    let mut client = node.client().await.expect("reconnect");
    let keys: Vec<&str> = ledger.keys().map(String::as_str).collect();
    let response = get(&mut client, &keys, &["driver:trips"]).await;
    for (index, key) in keys.iter().enumerate() {
        let stored = trips_of(&response, index).expect("acknowledged row present");
        assert!(
            stored >= ledger[*key],
            "{key}: acknowledged {} but found {stored}",
            ledger[*key]
        );
    }
}

fn tracing_phase(phase: &str) {
    eprintln!("--- {phase}");
}

#[tokio::test]
async fn metrics_count_requests_by_method_and_code_and_follow_the_node() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(
        &dir.path().join("node"),
        &["--metrics-listen-addr", "127.0.0.1:0"],
    )
    .await
    .unwrap();
    let metrics_addr = node.metrics_addr().await.unwrap().to_string();
    let mut client = node.client().await.unwrap();
    apply(&mut client, driver_view(0)).await.unwrap();
    let ts = now_us();
    write(
        &mut client,
        "driver",
        vec![row("d1", ts, &[("trips", int64(3))])],
    )
    .await
    .unwrap();
    get(&mut client, &["d1"], &["driver:trips"]).await;
    let unknown = client
        .get(pb::GetRequest {
            entity_keys: vec!["d1".into()],
            features: vec!["no_such_view:x".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);

    let scraped = scrape(&metrics_addr).await;
    let requests = |method: &str, code: &str| {
        sample(
            &scraped,
            "quiver_requests_total",
            &[("method", method), ("code", code)],
        )
        .map_or(0.0, value_of)
    };
    assert_eq!(requests("Write", "Ok"), 1.0);
    assert_eq!(requests("Get", "Ok"), 1.0);
    assert_eq!(requests("Get", "NotFound"), 1.0);
    assert_eq!(requests("ApplyFeatureView", "Ok"), 1.0);
    let latency = scraped
        .samples
        .iter()
        .find(|s| {
            s.metric == "quiver_request_duration_seconds" && s.labels.get("method") == Some("Get")
        })
        .expect("a Get latency histogram");
    match &latency.value {
        prometheus_parse::Value::Histogram(buckets) => {
            let total = buckets.iter().map(|b| b.count).fold(0.0, f64::max);
            assert_eq!(total, 2.0, "both Gets counted: {buckets:?}");
        }
        other => panic!("not a histogram: {other:?}"),
    }
    // The state gauges follow within a collection interval (5 s): the row
    // applied, the cache miss of the first Get, one node leading every
    // group (the metadata group and 16 shards), and the view's newest
    // event time.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let scraped = scrape(&metrics_addr).await;
        let applied = sample(&scraped, "quiver_rows_applied_total", &[]).map_or(0.0, value_of);
        let misses = sample(&scraped, "quiver_cache_misses_total", &[]).map_or(0.0, value_of);
        let leaders: f64 = scraped
            .samples
            .iter()
            .filter(|s| s.metric == "quiver_group_is_leader")
            .map(value_of)
            .sum();
        let newest = sample(
            &scraped,
            "quiver_view_newest_event_time_seconds",
            &[("view", "driver")],
        )
        .map_or(0.0, value_of);
        if applied >= 1.0 && misses >= 1.0 && leaders == 17.0 {
            assert!((newest - ts as f64 / 1e6).abs() < 1e-3, "{newest} vs {ts}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "rows applied {applied}, cache misses {misses}, groups led {leaders} after 30 s"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// `quiverctl token new --json`: (token, its `[[auth.tokens]]` entry).
fn new_token(name: &str, scope: &str) -> (String, String) {
    let made: serde_json::Value = serde_json::from_str(
        &quiverctl(
            "127.0.0.1:1",
            &["--json", "token", "new", "--name", name, "--scope", scope],
        )
        .unwrap(),
    )
    .unwrap();
    let entry = format!(
        "[[auth.tokens]]\nname = \"{name}\"\nscope = \"{scope}\"\nsha256 = \"{}\"\n",
        made["sha256"].as_str().unwrap()
    );
    (made["token"].as_str().unwrap().to_owned(), entry)
}

/// A node with `auth.tokens`: a call without a token or with an unknown
/// one is `UNAUTHENTICATED`, one whose token's scope is too narrow is
/// `PERMISSION_DENIED`, health checks need none, and quiverctl's `--token`
/// gets through.
#[tokio::test]
async fn client_tokens_are_checked_by_scope() {
    let dir = tempfile::tempdir().unwrap();
    let (read, read_entry) = new_token("serving", "read");
    let (write, write_entry) = new_token("materialize", "write");
    let (admin, admin_entry) = new_token("ops", "admin");
    let config = dir.path().join("quiver.toml");
    std::fs::write(&config, format!("{read_entry}{write_entry}{admin_entry}")).unwrap();
    let data = dir.path().join("data");
    let node = Node::start(&data, &["--config", config.to_str().unwrap()])
        .await
        .unwrap();
    let endpoint = node.endpoint();

    eprintln!("--- no token, or an unknown one: UNAUTHENTICATED");
    let mut client = node.client().await.unwrap();
    let refused = client.status(pb::StatusRequest {}).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    let mut health = tonic_health::pb::health_client::HealthClient::new(
        tonic::transport::Channel::from_shared(format!("http://{}", node.addr()))
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );
    health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .expect("health checks need no token");
    let ctl = |token: &str, args: &[&str]| {
        let mut all = vec!["--token", token];
        all.extend_from_slice(args);
        quiverctl(&endpoint, &all)
    };
    let failure = |result: anyhow::Result<String>| format!("{:#}", result.unwrap_err());
    assert!(failure(ctl("not-a-token", &["status"])).contains("Unauthenticated"));

    eprintln!("--- each scope: what it may do, and the next scope's refusal");
    ctl(&read, &["status"]).unwrap();
    let views = dir.path().join("views.yaml");
    std::fs::write(
        &views,
        "views:\n  - name: counter\n    entities: [key]\n    features:\n      - { name: value, type: int64 }\n",
    )
    .unwrap();
    let views = views.to_str().unwrap();
    let denied = failure(ctl(&read, &["views", "apply", "-f", views]));
    assert!(
        denied.contains("PermissionDenied") && denied.contains("serving"),
        "{denied}"
    );
    ctl(&write, &["views", "apply", "-f", views]).unwrap();
    ctl(&write, &["views", "list"]).unwrap();
    let denied = failure(ctl(&write, &["node", "list"]));
    assert!(denied.contains("PermissionDenied"), "{denied}");
    ctl(&admin, &["node", "list"]).unwrap();
    ctl(&admin, &["views", "list"]).unwrap();
}

/// Every client call runs in a `request` span naming its method and
/// request id (the client's `x-request-id`, else one made up), which the
/// response carries back; the JSON log's lines inside it name both.
#[tokio::test]
async fn requests_are_traced_under_their_request_id() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start_with_env(
        dir.path(),
        &["--log-format", "json"],
        &[("QUIVER_LOG", "quiver_server=debug,info")],
    )
    .await
    .unwrap();
    let mut client = node.client().await.unwrap();
    let mut request = tonic::Request::new(pb::StatusRequest {});
    request
        .metadata_mut()
        .insert("x-request-id", "trace-me-42".parse().unwrap());
    let response = client.status(request).await.unwrap();
    assert_eq!(
        response.metadata().get("x-request-id").unwrap(),
        "trace-me-42"
    );
    let made_up = client.status(pb::StatusRequest {}).await.unwrap();
    let id = made_up
        .metadata()
        .get("x-request-id")
        .unwrap()
        .to_str()
        .unwrap();
    assert!(
        id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit()),
        "{id}"
    );
    // The line is written when the call ends; the log is read after.
    let traced =
        quiver_tests::counter::retry("the request's log line", Duration::from_secs(10), || {
            let log = node.log();
            async move {
                log.lines()
                    .find(|line| line.contains("trace-me-42") && line.contains("request done"))
                    .map(str::to_owned)
                    .ok_or_else(|| "not yet".to_owned())
            }
        })
        .await;
    let line: serde_json::Value = serde_json::from_str(&traced).unwrap();
    assert_eq!(line["span"]["name"], "request", "{line}");
    assert_eq!(line["span"]["method"], "Status", "{line}");
    assert_eq!(line["span"]["request_id"], "trace-me-42", "{line}");

    // A Get fans out per shard: each shard's read in its own span, inside
    // the request's.
    apply(&mut client, driver_view(0)).await.expect("apply");
    let mut request = tonic::Request::new(pb::GetRequest {
        entity_keys: (0..40).map(|i| format!("driver-{i}")).collect(),
        features: vec!["driver:*".into()],
        ..Default::default()
    });
    request
        .metadata_mut()
        .insert("x-request-id", "fan-out-7".parse().unwrap());
    client.get(request).await.unwrap();
    let shard_reads =
        quiver_tests::counter::retry("the shard reads' lines", Duration::from_secs(10), || {
            let log = node.log();
            async move {
                let lines: Vec<serde_json::Value> = log
                    .lines()
                    .filter(|line| line.contains("fan-out-7") && line.contains("shard read"))
                    .map(|line| serde_json::from_str(line).unwrap())
                    .collect();
                if lines.len() > 1 {
                    Ok(lines)
                } else {
                    Err(format!("{} lines", lines.len()))
                }
            }
        })
        .await;
    for line in &shard_reads {
        assert_eq!(line["span"]["name"], "shard_read", "{line}");
        assert_eq!(line["spans"][0]["request_id"], "fan-out-7", "{line}");
    }
}
