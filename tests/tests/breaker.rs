//! Peer circuit breakers on real nodes: a node stopped with SIGSTOP (its
//! connections stay open, nothing answers) has its breaker opened on its
//! peers after a window of failed calls, a probe is let through after the
//! open time (and fails, opening it again), and once the node runs again
//! its answers close it. Writes through a live node go on throughout. (That
//! forwarded calls fail fast while it is open is tested on a stalled peer
//! server: `network::tests`.) And shard circuit breakers: a shard without
//! a quorum has its breaker opened by writes that time out, then fails
//! writes at once and sends degraded reads straight to their fallback.

#![allow(clippy::unwrap_used, missing_docs)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use quiver_proto::v1 as pb;
use quiver_tests::counter::{
    CONVERGE_WAIT, LEADER_WAIT, apply_counter_view, keys, read_values, retry, start, write_values,
};
use quiver_tests::scrape::{sample, scrape, value_of};
use quiver_tests::{int64, now_us, row};

/// Waits until node 1's `name{peer="3"}` satisfies `wanted`.
async fn wait_for(metrics: &str, what: &str, name: &str, wanted: impl Fn(f64) -> bool) {
    retry(what, CONVERGE_WAIT, || {
        let metrics = metrics.to_owned();
        let wanted = &wanted;
        async move {
            let value = peer_metric(&metrics, name, &[]).await;
            if wanted(value) {
                Ok(())
            } else {
                Err(format!("{name} {value}"))
            }
        }
    })
    .await;
}

/// A node's `name{peer="3"}` value (0 when the series is absent).
async fn peer_metric(metrics: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let scraped = scrape(metrics).await;
    let mut all = vec![("peer", "3")];
    all.extend_from_slice(labels);
    sample(&scraped, name, &all).map_or(0.0, value_of)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_peer_s_breaker_opens_is_probed_after_the_open_time_and_closes_when_it_is_back() {
    let mut cluster = start(&[
        ("QUIVER_CLUSTER__SHARD_COUNT", "3"),
        ("QUIVER_METRICS_LISTEN_ADDR", "127.0.0.1:0"),
        ("QUIVER_CLUSTER__PEER_TIMEOUT_MS", "1000"),
        ("QUIVER_CLUSTER__BREAKER_OPEN_MS", "1500"),
    ])
    .await;
    let metrics = cluster.node(1).metrics_addr().await.unwrap().to_string();
    let client = cluster.node(1).client().await.unwrap();
    apply_counter_view(&client).await;
    assert_eq!(
        peer_metric(&metrics, "quiver_peer_breaker_state", &[]).await,
        0.0,
        "closed while node 3 runs"
    );

    // Writes through node 1 all along: they keep every group's leader
    // sending node 3 appends and heartbeats.
    let acknowledged = Arc::new(AtomicUsize::new(0));
    let writer = {
        let (client, acknowledged) = (client.clone(), acknowledged.clone());
        tokio::spawn(async move {
            for round in 0.. {
                let mut client = client.clone();
                let values: Vec<(String, i64)> = keys(10, &format!("w{round}"))
                    .into_iter()
                    .map(|k| (k, round))
                    .collect();
                if write_values(&mut client, &values).await.is_ok() {
                    acknowledged.fetch_add(1, Ordering::SeqCst);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    eprintln!("--- node 3 stops: its breaker on node 1 opens");
    cluster.node(3).pause().unwrap();
    let acknowledged_at_pause = acknowledged.load(Ordering::SeqCst);
    wait_for(
        &metrics,
        "the breaker opens",
        "quiver_peer_breaker_state",
        |s| s == 2.0,
    )
    .await;
    eprintln!("--- after the open time a probe goes, fails, and opens it again");
    // (It may have opened before, while node 3 was starting.)
    let opened_before = peer_metric(&metrics, "quiver_peer_breaker_opened_total", &[]).await;
    wait_for(
        &metrics,
        "a failed probe reopens it",
        "quiver_peer_breaker_opened_total",
        |opened| opened > opened_before,
    )
    .await;

    // The shards node 3 led need an election first, which can take longer
    // than the probe when the breaker had opened already (node 3 started
    // last): waited for, within a bound.
    let waited = std::time::Instant::now();
    while acknowledged.load(Ordering::SeqCst) <= acknowledged_at_pause {
        assert!(
            waited.elapsed() < Duration::from_secs(15),
            "writes through node 1 go on while node 3 is stopped"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("writes went on {:?} after the probe", waited.elapsed());

    eprintln!("--- node 3 runs again: probes succeed and close it");
    cluster.node(3).resume().unwrap();
    wait_for(
        &metrics,
        "the breaker closes",
        "quiver_peer_breaker_state",
        |s| s == 0.0,
    )
    .await;
    writer.abort();
}

/// Node 1's value of `name{shard}` (0 when absent).
async fn shard_metric(metrics: &str, name: &str, shard: u32) -> f64 {
    let shard = shard.to_string();
    sample(&scrape(metrics).await, name, &[("shard", shard.as_str())]).map_or(0.0, value_of)
}

/// A write of `counter:value` with the caller's deadline.
fn timed_write(key: &str, value: i64, deadline: Duration) -> tonic::Request<pb::WriteRequest> {
    let mut request = tonic::Request::new(pb::WriteRequest {
        view: "counter".into(),
        rows: vec![row(key, now_us(), &[("value", int64(value))])],
        request_id: Vec::new(),
    });
    request.set_timeout(deadline);
    request
}

/// A LEADER Get of `key` with the caller's deadline, degraded or strict.
fn timed_get(key: &str, degraded: bool, deadline: Duration) -> tonic::Request<pb::GetRequest> {
    let mut request = tonic::Request::new(pb::GetRequest {
        entity_keys: vec![key.to_owned()],
        features: vec!["counter:value".into()],
        consistency: pb::Consistency::Leader as i32,
        skip_cache: true,
        max_staleness_ms: 0,
        degraded,
    });
    request.set_timeout(deadline);
    request
}

/// Repeats `call` (each with a 500 ms deadline, past the 200 ms slow-call
/// time) until one fails at once as refused by a breaker; returns how many
/// failed slowly before.
async fn until_refused<F, Fut>(what: &str, mut call: F) -> usize
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), tonic::Status>>,
{
    let mut slow = 0;
    loop {
        let asked = std::time::Instant::now();
        let status = call().await.expect_err("no quorum: no answer");
        let took = asked.elapsed();
        if status.message().contains("circuit breaker is open") {
            eprintln!("{what}: refused after {slow} slow failures, in {took:?}: {status:?}");
            assert!(
                took < Duration::from_millis(250),
                "{what}: failed fast: {took:?}"
            );
            assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
            assert!(
                status.metadata().get("grpc-retry-pushback-ms").is_some(),
                "{status:?}"
            );
            return slow;
        }
        slow += 1;
        assert!(slow <= 30, "{what}: the breaker never opened: {status:?}");
    }
}

/// A shard without a quorum: LEADER reads that time out open its breaker on
/// the node they go through, then fail at once, and a degraded Get answers
/// from that node's replica at once (not after 80% of its deadline);
/// writes, which resolve their view at a metadata read index, open the
/// metadata group's breaker (shard 0) and then fail at once too; once the
/// quorum is back, probes close both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_without_quorum_fails_fast_once_its_breaker_opens_and_closes_when_it_is_back() {
    let mut cluster = start(&[
        // One shard, on every node.
        ("QUIVER_CLUSTER__SHARD_COUNT", "1"),
        ("QUIVER_METRICS_LISTEN_ADDR", "127.0.0.1:0"),
        ("QUIVER_CLUSTER__SHARD_BREAKER_SLOW_CALL_MS", "200"),
        // Long enough for the steps below while it is open; an election
        // after the nodes come back half-opens it at once.
        ("QUIVER_CLUSTER__SHARD_BREAKER_OPEN_MS", "5000"),
    ])
    .await;
    let metrics = cluster.node(1).metrics_addr().await.unwrap().to_string();
    let client = cluster.node(1).client().await.unwrap();
    apply_counter_view(&client).await;
    let key = "breaker".to_owned();
    retry("a first write", LEADER_WAIT, || {
        let (mut client, key) = (client.clone(), key.clone());
        async move { write_values(&mut client, &[(key, 7)]).await }
    })
    .await;
    let shard = retry("node 1 has applied it", CONVERGE_WAIT, || {
        let (mut client, key) = (client.clone(), key.clone());
        async move {
            let (read, sources) =
                read_values(&mut client, &[key], pb::Consistency::Replica).await?;
            if read == vec![Some(7)] && sources[0].node_id == 1 {
                Ok(sources[0].shard)
            } else {
                Err(format!("{read:?} from {sources:?}"))
            }
        }
    })
    .await;
    let state = "quiver_shard_breaker_state";
    assert_eq!(shard_metric(&metrics, state, shard).await, 0.0);

    eprintln!("--- nodes 2 and 3 stop: shard {shard} and the metadata group have no quorum");
    cluster.node(2).pause().unwrap();
    cluster.node(3).pause().unwrap();
    let deadline = Duration::from_millis(500);
    // Strict LEADER reads: served while node 1's lease lasts, then cut off
    // by their deadline, until the breaker opens; then their rows are
    // UNAVAILABLE at once (the other shards' rows would still be served).
    let refused = "quiver_shard_breaker_refused_total";
    let mut slow = 0;
    for attempt in 0.. {
        assert!(attempt < 40, "the breaker never opened ({slow} slow reads)");
        let asked = std::time::Instant::now();
        let outcome = client.clone().get(timed_get(&key, false, deadline)).await;
        let took = asked.elapsed();
        match outcome {
            Err(_) => slow += 1,
            Ok(answer)
                if answer.get_ref().entities[0].features[0].status()
                    == pb::FeatureStatus::Unavailable
                    && took < Duration::from_millis(250)
                    && shard_metric(&metrics, refused, shard).await >= 1.0 =>
            {
                eprintln!("LEADER reads: refused after {slow} slow ones, in {took:?}");
                break;
            }
            Ok(_) => {}
        }
    }
    assert!(
        slow >= 5,
        "a window of 10 with more than half failed: {slow}"
    );
    assert_eq!(shard_metric(&metrics, state, shard).await, 2.0);

    // A degraded LEADER read does not wait: node 1's replica answers at
    // once, marked STALE.
    let asked = std::time::Instant::now();
    let answer = client
        .clone()
        .get(timed_get(&key, true, Duration::from_secs(2)))
        .await
        .unwrap()
        .into_inner();
    let took = asked.elapsed();
    let feature = &answer.entities[0].features[0];
    assert_eq!(feature.status(), pb::FeatureStatus::Stale, "{answer:?}");
    assert_eq!(
        feature.value.as_ref().and_then(|v| v.kind.clone()),
        Some(pb::value::Kind::Int64Val(7))
    );
    assert!(
        took < Duration::from_secs(1),
        "answered at once, not after 80% of its deadline: {took:?}"
    );

    // Writes wait on the metadata group first: its breaker opens.
    until_refused("writes", || {
        let mut client = client.clone();
        let request = timed_write(&key, 8, deadline);
        async move { client.write(request).await.map(drop) }
    })
    .await;
    assert_eq!(shard_metric(&metrics, state, 0).await, 2.0);

    eprintln!("--- nodes 2 and 3 run again: probes succeed and close both");
    cluster.node(2).resume().unwrap();
    cluster.node(3).resume().unwrap();
    retry("both breakers close", CONVERGE_WAIT, || {
        let (mut client, key, metrics) = (client.clone(), key.clone(), metrics.clone());
        async move {
            let wrote = client
                .write(timed_write(&key, 9, Duration::from_secs(2)))
                .await
                .map(drop);
            let read = client
                .get(timed_get(&key, false, Duration::from_secs(2)))
                .await
                .map(drop);
            let states = (
                shard_metric(&metrics, state, 0).await,
                shard_metric(&metrics, state, shard).await,
            );
            if states == (0.0, 0.0) && wrote.is_ok() && read.is_ok() {
                Ok(())
            } else {
                Err(format!("states {states:?}, write {wrote:?}, read {read:?}"))
            }
        }
    })
    .await;
    let opened = "quiver_shard_breaker_opened_total";
    assert!(shard_metric(&metrics, opened, shard).await >= 1.0);
    assert!(shard_metric(&metrics, opened, 0).await >= 1.0);
}

/// Readers whose deadlines are far under the slow-call time open a dead
/// shard's breaker by themselves: their calls are cut off early, but
/// attempts on the shard fail while they run (its dead leader refuses the
/// connection), which blames the shard, not the short deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_deadline_readers_open_the_breaker_of_a_shard_whose_nodes_died() {
    let mut cluster = start(&[
        ("QUIVER_CLUSTER__SHARD_COUNT", "1"),
        ("QUIVER_METRICS_LISTEN_ADDR", "127.0.0.1:0"),
    ])
    .await;
    let first = cluster.node(1).client().await.unwrap();
    apply_counter_view(&first).await;
    let key = "short".to_owned();
    retry("a first write", LEADER_WAIT, || {
        let (mut client, key) = (first.clone(), key.clone());
        async move { write_values(&mut client, &[(key, 7)]).await }
    })
    .await;
    let (shard, leader) = retry("the shard's leader", LEADER_WAIT, || {
        let (mut client, key) = (first.clone(), key.clone());
        async move {
            let (_, sources) = read_values(&mut client, &[key], pb::Consistency::Leader).await?;
            Ok::<_, String>((sources[0].shard, sources[0].node_id))
        }
    })
    .await;
    // A follower reads; the leader and the other follower die.
    let reader = (1..=3).find(|&n| n != leader).unwrap();
    let other = (1..=3).find(|&n| n != leader && n != reader).unwrap();
    let metrics = cluster
        .node(reader)
        .metrics_addr()
        .await
        .unwrap()
        .to_string();
    let client = cluster.node(reader).client().await.unwrap();
    eprintln!("--- nodes {leader} (leader) and {other} are killed; node {reader} reads");
    cluster.node(leader).kill9().unwrap();
    cluster.node(other).kill9().unwrap();
    // A tenth of the slow-call time (1 s by default).
    let deadline = Duration::from_millis(100);
    let mut cut_off = 0;
    for attempt in 0.. {
        assert!(
            attempt < 60,
            "the breaker never opened ({cut_off} reads cut off)"
        );
        let asked = std::time::Instant::now();
        let outcome = client.clone().get(timed_get(&key, false, deadline)).await;
        let took = asked.elapsed();
        match outcome {
            Err(status) => {
                assert!(
                    matches!(
                        status.code(),
                        tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
                    ),
                    "{status:?}"
                );
                cut_off += 1;
            }
            // Routing alone gives up only after many more retries than fit
            // in 100 ms: an UNAVAILABLE row within the deadline is the
            // breaker's refusal (the metrics below confirm it).
            Ok(answer)
                if answer.get_ref().entities[0].features[0].status()
                    == pb::FeatureStatus::Unavailable =>
            {
                eprintln!("refused after {cut_off} reads cut off, in {took:?}");
                break;
            }
            Ok(answer) => panic!("no leader can answer: {answer:?}"),
        }
    }
    assert_eq!(
        shard_metric(&metrics, "quiver_shard_breaker_state", shard).await,
        2.0
    );
    assert!(shard_metric(&metrics, "quiver_shard_breaker_refused_total", shard).await >= 1.0);
}
