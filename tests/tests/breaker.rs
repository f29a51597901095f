//! Peer circuit breakers on real nodes: a node stopped with SIGSTOP (its
//! connections stay open, nothing answers) has its breaker opened on its
//! peers after a window of failed calls, a probe is let through after the
//! open time (and fails, opening it again), and once the node runs again
//! its answers close it. Writes through a live node go on throughout. (That
//! forwarded calls fail fast while it is open is tested on a stalled peer
//! server: `network::tests`.)

#![allow(clippy::unwrap_used, missing_docs)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use quiver_tests::counter::{CONVERGE_WAIT, apply_counter_view, keys, retry, start, write_values};
use quiver_tests::scrape::{sample, scrape, value_of};

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

    assert!(
        acknowledged.load(Ordering::SeqCst) > acknowledged_at_pause,
        "writes through node 1 go on while node 3 is stopped"
    );

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
