//! Cluster tests: real quiverd processes on loopback, three nodes, sixteen
//! shards at replication factor 3, killed and restarted under load.
//!
//! No sleep synchronises anything here: every wait polls a condition with a
//! generous, bounded deadline (CI has 2 cores).

#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Instant;

use quiver_proto::v1 as pb;
use quiver_tests::apply_view;
use quiver_tests::counter::{
    CONVERGE_WAIT, FOUR_SHARDS, LEADER_WAIT, apply_counter_view, connect, counter_view, keys,
    leader_of, read_values, retry, start, wait_for_values, write_and_locate, write_values,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_through_any_node_are_read_through_every_node() {
    let mut cluster = start(&[]).await;
    let c1 = cluster.node(1).client().await.unwrap();
    apply_counter_view(&c1).await;

    // Keys spread over every shard; written through node 2.
    let keys = keys(64, "k");
    let values: Vec<(String, i64)> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| (k.clone(), i as i64))
        .collect();
    let c2 = cluster.node(2).client().await.unwrap();
    retry("write through node 2", LEADER_WAIT, || {
        let mut c2 = c2.clone();
        let values = values.clone();
        async move { write_values(&mut c2, &values).await }
    })
    .await;

    for id in 1..=3 {
        let client = cluster.node(id).client().await.unwrap();
        for consistency in [pb::Consistency::Leader, pb::Consistency::Strong] {
            let (read, sources) = retry("read", LEADER_WAIT, || {
                let mut client = client.clone();
                let keys = keys.clone();
                async move { read_values(&mut client, &keys, consistency).await }
            })
            .await;
            let expected: Vec<Option<i64>> = (0..keys.len() as i64).map(Some).collect();
            assert_eq!(read, expected, "node {id} at {consistency:?}");
            assert!(
                sources.iter().all(|s| s.leader),
                "{consistency:?} served by leaders"
            );
        }
        // Replicas converge: every node's own replicas catch up.
        let expected: Vec<Option<i64>> = (0..keys.len() as i64).map(Some).collect();
        wait_for_values(
            "replica reads converge",
            &client,
            &keys,
            pb::Consistency::Replica,
            &expected,
        )
        .await;
    }
    // With RF 3 on 3 nodes every node holds every shard: REPLICA reads are
    // served locally.
    let mut c3 = cluster.node(3).client().await.unwrap();
    let (_, sources) = read_values(&mut c3, &keys, pb::Consistency::Replica)
        .await
        .unwrap();
    assert!(sources.iter().all(|s| s.node_id == 3), "{sources:?}");
    assert_eq!(sources.len(), 16, "64 keys touch all 16 shards");

    let status = cluster.node(1).status().await.unwrap();
    assert_eq!(status.nodes.len(), 3);
    assert_eq!(status.groups.len(), 17, "metadata group + 16 shards");
    assert_eq!(status.replication_factor, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_view_applied_while_a_node_is_down_reaches_it() {
    let mut cluster = start(&FOUR_SHARDS).await;
    cluster.node(3).kill9().unwrap();
    let mut c1 = cluster.node(1).client().await.unwrap();
    retry("apply view with a node down", LEADER_WAIT, || {
        let mut c1 = c1.clone();
        async move {
            apply_view(&mut c1, counter_view())
                .await
                .map_err(|e| e.to_string())
        }
    })
    .await;
    // Applied through node 1, used through node 2 at once.
    let c2 = cluster.node(2).client().await.unwrap();
    let keys = keys(20, "v");
    let values: Vec<(String, i64)> = keys.iter().map(|k| (k.clone(), 7)).collect();
    retry("write through node 2", LEADER_WAIT, || {
        let mut c2 = c2.clone();
        let values = values.clone();
        async move { write_values(&mut c2, &values).await }
    })
    .await;

    cluster.node(3).restart().await.unwrap();
    let mut c3 = cluster.node(3).client().await.unwrap();
    let listed = c3
        .list_feature_views(pb::ListFeatureViewsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(
        listed.views.iter().any(|v| v.name == "counter"),
        "node 3 knows the view"
    );
    wait_for_values(
        "node 3 serves the view's rows",
        &c3,
        &keys,
        pb::Consistency::Replica,
        &vec![Some(7); keys.len()],
    )
    .await;
    drop(
        c1.list_feature_views(pb::ListFeatureViewsRequest {})
            .await
            .unwrap(),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_leader_is_replaced_and_writes_resume() {
    let mut cluster = start(&FOUR_SHARDS).await;
    let mut c1 = cluster.node(1).client().await.unwrap();
    apply_counter_view(&c1).await;
    let key = "failover".to_owned();
    // Find the shard of the key by the read source.
    let (_, sources) = read_values(&mut c1, std::slice::from_ref(&key), pb::Consistency::Leader)
        .await
        .unwrap();
    let shard = sources[0].shard;
    let mut failovers = Vec::new();
    for round in 0..2 {
        let leader = leader_of(&mut cluster, shard).await;
        let survivor = if leader == 1 { 2 } else { 1 };
        let client = cluster.node(survivor).client().await.unwrap();
        cluster.node(leader).kill9().unwrap();
        let killed = Instant::now();
        retry("write after the leader died", LEADER_WAIT, || {
            let mut client = client.clone();
            let key = key.clone();
            async move { write_values(&mut client, &[(key, round)]).await }
        })
        .await;
        failovers.push(killed.elapsed());
        let new_leader = leader_of(&mut cluster, shard).await;
        assert_ne!(new_leader, leader, "a new leader was elected");
        let mut reader = client.clone();
        let (read, _) = read_values(
            &mut reader,
            std::slice::from_ref(&key),
            pb::Consistency::Strong,
        )
        .await
        .unwrap();
        assert_eq!(read, vec![Some(round)]);
        cluster.node(leader).restart().await.unwrap();
        cluster.wait_for_leaders(LEADER_WAIT).await.unwrap();
    }
    eprintln!("failover (kill -9 of the leader to first acknowledged write): {failovers:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_far_behind_is_repaired_by_snapshot() {
    // Tiny snapshot interval and no log kept behind it, so the log the
    // stopped node needs is gone when it returns.
    let env = [
        ("QUIVER_CLUSTER__SNAPSHOT_LOGS_SINCE", "20"),
        ("QUIVER_CLUSTER__LOGS_KEPT_AFTER_SNAPSHOT", "0"),
        ("QUIVER_CLUSTER__SHARD_COUNT", "2"),
    ];
    let mut cluster = start(&env).await;
    let mut c1 = cluster.node(1).client().await.unwrap();
    apply_counter_view(&c1).await;
    cluster.node(3).kill9().unwrap();
    let keys = keys(10, "s");
    for round in 0..60i64 {
        let values: Vec<(String, i64)> = keys.iter().map(|k| (k.clone(), round)).collect();
        retry("write while node 3 is down", LEADER_WAIT, || {
            let mut c1 = c1.clone();
            let values = values.clone();
            async move { write_values(&mut c1, &values).await }
        })
        .await;
    }
    cluster.node(3).restart().await.unwrap();
    let c3 = cluster.node(3).client().await.unwrap();
    retry("node 3 catches up", CONVERGE_WAIT, || {
        let keys = keys.clone();
        let mut c3 = c3.clone();
        async move {
            let (read, sources) = read_values(&mut c3, &keys, pb::Consistency::Replica).await?;
            let local = sources.iter().all(|s| s.node_id == 3);
            if local && read.iter().all(|v| *v == Some(59)) {
                Ok(())
            } else {
                Err(format!("{read:?} from {sources:?}"))
            }
        }
    })
    .await;
    let log = cluster.node(3).log();
    assert!(
        log.contains("snapshot installed"),
        "node 3 was repaired by a snapshot"
    );
    // And it keeps following with the log afterwards.
    write_values(&mut c1, &[(keys[0].clone(), 100)])
        .await
        .unwrap();
    wait_for_values(
        "node 3 follows after the snapshot",
        &c3,
        &keys[..1],
        pb::Consistency::Replica,
        &[Some(100)],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_write_survives_random_kills() {
    let mut cluster = start(&FOUR_SHARDS).await;
    let mut c1 = cluster.node(1).client().await.unwrap();
    apply_counter_view(&c1).await;

    let addrs: Vec<_> = cluster.nodes.iter().map(|n| n.addr()).collect();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (ack_tx, mut ack_rx) = tokio::sync::mpsc::unbounded_channel::<(String, i64)>();
    let writer = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut sequence = 0i64;
            while !stop.load(Ordering::Relaxed) {
                sequence += 1;
                let key = format!("c-{}", sequence % 40);
                let addr = addrs[(sequence as usize) % addrs.len()];
                let Ok(mut client) = connect(addr).await else {
                    continue;
                };
                // An error may still have committed (the ack was lost): the
                // ledger only holds acknowledged values.
                if write_values(&mut client, &[(key.clone(), sequence)])
                    .await
                    .is_ok()
                {
                    let _ = ack_tx.send((key, sequence));
                }
            }
        })
    };
    // Seeded, so a failure can be replayed.
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..10 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let victim = seed % 3 + 1;
        cluster.node(victim).kill9().unwrap();
        // Let the writer run against the two survivors for a moment.
        let acks_before = ack_rx.len();
        retry("writes continue with one node down", LEADER_WAIT, || {
            let progressed = ack_rx.len() > acks_before + 5;
            async move {
                if progressed {
                    Ok(())
                } else {
                    Err("no progress".to_owned())
                }
            }
        })
        .await;
        cluster.node(victim).restart().await.unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    let mut ledger: BTreeMap<String, i64> = BTreeMap::new();
    while let Ok((key, value)) = ack_rx.try_recv() {
        let entry = ledger.entry(key).or_insert(value);
        *entry = (*entry).max(value);
    }
    assert!(
        ledger.len() >= 20,
        "the writer made progress: {} keys",
        ledger.len()
    );
    let keys: Vec<String> = ledger.keys().cloned().collect();
    for id in 1..=3 {
        let client = cluster.node(id).client().await.unwrap();
        let (read, _) = retry("strong read after the chaos", LEADER_WAIT, || {
            let keys = keys.clone();
            let mut client = client.clone();
            async move { read_values(&mut client, &keys, pb::Consistency::Strong).await }
        })
        .await;
        for (key, value) in keys.iter().zip(read) {
            // Unacknowledged later writes may have landed too (>=).
            let stored = value.unwrap_or_else(|| panic!("{key} acknowledged but missing"));
            assert!(
                stored >= ledger[key],
                "{key}: acknowledged {} but node {id} read {stored}",
                ledger[key]
            );
        }
    }
    drop(c1.status(pb::StatusRequest {}).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strong_reads_never_go_back_in_time() {
    let mut cluster = start(&FOUR_SHARDS).await;
    let c1 = cluster.node(1).client().await.unwrap();
    apply_counter_view(&c1).await;
    let acked = Arc::new(AtomicI64::new(0));
    let key = "linear".to_owned();
    let writer = {
        let acked = acked.clone();
        let mut client = cluster.node(1).client().await.unwrap();
        let key = key.clone();
        tokio::spawn(async move {
            for value in 1..=150 {
                write_values(&mut client, &[(key.clone(), value)])
                    .await
                    .unwrap();
                acked.store(value, Ordering::SeqCst);
            }
        })
    };
    let mut checked = 0;
    for id in [2u64, 3, 2, 3] {
        let mut client = cluster.node(id).client().await.unwrap();
        for _ in 0..40 {
            let floor = acked.load(Ordering::SeqCst);
            let (read, _) = read_values(
                &mut client,
                std::slice::from_ref(&key),
                pb::Consistency::Strong,
            )
            .await
            .unwrap();
            let seen = read[0].unwrap_or(0);
            assert!(
                seen >= floor,
                "STRONG read through node {id} saw {seen} after {floor} was acknowledged"
            );
            checked += 1;
        }
    }
    writer.await.unwrap();
    assert!(checked >= 160);
}

/// Retries `f` while it fails with a code that only says "not now"
/// (an election after a node woke up); any other error is the answer.
async fn retry_unavailable<T, F, Fut>(what: &str, mut f: F) -> Result<T, tonic::Status>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let until = Instant::now() + LEADER_WAIT;
    loop {
        match f().await {
            Err(status)
                if matches!(
                    status.code(),
                    tonic::Code::Unavailable | tonic::Code::DeadlineExceeded
                ) && Instant::now() < until =>
            {
                eprintln!("{what}: {status}; retrying");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            outcome => return outcome,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_metadata_lags_resolves_views_as_they_now_are() {
    let mut cluster = start(&FOUR_SHARDS).await;
    let c1 = cluster.node(1).client().await.unwrap();
    apply_counter_view(&c1).await;
    let old_keys = keys(8, "old");
    let c3 = cluster.node(3).client().await.unwrap();
    let old_values: Vec<(String, i64)> = old_keys.iter().map(|k| (k.clone(), 5)).collect();
    retry("write through node 3", LEADER_WAIT, || {
        let (mut c3, values) = (c3.clone(), old_values.clone());
        async move { write_values(&mut c3, &values).await }
    })
    .await;

    eprintln!("--- node 3 is down while node 1 deletes the view and creates it again, wider");
    cluster.node(3).kill9().unwrap();
    retry_unavailable("delete the view", || {
        let mut c1 = c1.clone();
        async move {
            match c1
                .delete_feature_view(pb::DeleteFeatureViewRequest {
                    name: "counter".into(),
                })
                .await
            {
                // An earlier attempt that timed out had deleted it.
                Err(status) if status.code() == tonic::Code::NotFound => Ok(()),
                other => other.map(|_| ()),
            }
        }
    })
    .await
    .unwrap();
    let mut wider = counter_view();
    wider
        .features
        .push(quiver_tests::feature("extra", pb::ValueType::Int64, None));
    retry_unavailable("create it again", || {
        let (mut c1, wider) = (c1.clone(), wider.clone());
        async move { apply_view(&mut c1, wider).await }
    })
    .await
    .unwrap();
    let metadata_applied = |status: &pb::StatusResponse| {
        status
            .groups
            .iter()
            .find(|g| g.group == 0)
            .map_or(0, |g| g.applied_index)
    };
    let applied_on_1 = metadata_applied(&cluster.node(1).status().await.unwrap());
    // Long enough for the metadata group to fall asleep: nothing then
    // sends node 3 the entries it missed until a request wakes the group.
    tokio::time::sleep(std::time::Duration::from_secs(4)).await;
    cluster.node(3).restart().await.unwrap();

    eprintln!("--- at once, node 3 reads and writes the view as it now is");
    let mut c3 = cluster.node(3).client().await.unwrap();
    // Whether node 3 was still behind when the checks below began: said,
    // so a run in which it was not is visible in the output.
    let applied_on_3 =
        metadata_applied(&c3.status(pb::StatusRequest {}).await.unwrap().into_inner());
    eprintln!("metadata applied: node 1 at {applied_on_1}, node 3 at {applied_on_3} on waking");
    assert!(
        applied_on_3 < applied_on_1,
        "node 3's metadata replica lags (else this test shows nothing)"
    );
    let (old, _) = retry("a STRONG read through node 3", LEADER_WAIT, || {
        let (mut c3, keys) = (c3.clone(), old_keys.clone());
        async move { read_values(&mut c3, &keys, pb::Consistency::Strong).await }
    })
    .await;
    assert!(
        old.iter().all(Option::is_none),
        "rows of the deleted view are gone: {old:?}"
    );
    let new_keys = keys(8, "new");
    let ts = quiver_tests::now_us();
    let rows: Vec<pb::WriteRow> = new_keys
        .iter()
        .map(|k| {
            quiver_tests::row(
                k,
                ts,
                &[
                    ("value", quiver_tests::int64(9)),
                    ("extra", quiver_tests::int64(10)),
                ],
            )
        })
        .collect();
    retry_unavailable("write the new feature through node 3", || {
        let rows = rows.clone();
        let mut c3 = c3.clone();
        async move { quiver_tests::write_rows(&mut c3, "counter", rows).await }
    })
    .await
    .expect("node 3 knows the feature added through node 1");
    let (read, _) = retry("a STRONG read through node 1", LEADER_WAIT, || {
        let (mut c1, keys) = (c1.clone(), new_keys.clone());
        async move { read_values(&mut c1, &keys, pb::Consistency::Strong).await }
    })
    .await;
    assert!(
        read.iter().all(|v| *v == Some(9)),
        "the write acknowledged through node 3 is read through node 1: {read:?}"
    );
    drop(c3.status(pb::StatusRequest {}).await);
}

/// ttl expiry is decided in each shard's log, not by each replica's clock
/// and registry: after a ttl is lowered and rows expire for good, every node
/// and every level reads them as absent, raising the ttl again does not
/// bring them back, and a late write that old is stale everywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_expired_past_ttl_and_grace_stay_expired_on_every_replica() {
    let env = [
        FOUR_SHARDS[0],
        ("QUIVER_TTL_GRACE_SECONDS", "1"),
        ("QUIVER_TTL_EXPIRE_INTERVAL_SECONDS", "1"),
    ];
    let mut cluster = start(&env).await;
    let c1 = cluster.node(1).client().await.unwrap();
    let view = |ttl_seconds: u64| pb::FeatureView {
        ttl_seconds,
        ..counter_view()
    };
    let apply_ttl = |ttl_seconds: u64| {
        let c1 = c1.clone();
        retry("apply the view", LEADER_WAIT, move || {
            let mut c1 = c1.clone();
            async move {
                apply_view(&mut c1, view(ttl_seconds))
                    .await
                    .map_err(|e| e.to_string())
            }
        })
    };
    apply_ttl(3600).await;
    let now = quiver_tests::now_us();
    let old_ts = now - 600 * 1_000_000;
    let old_keys = keys(12, "old");
    let new_keys = keys(12, "new");
    let rows = |keys: &[String], ts: i64| -> Vec<pb::WriteRow> {
        keys.iter()
            .map(|k| quiver_tests::row(k, ts, &[("value", quiver_tests::int64(1))]))
            .collect()
    };
    let mut all = rows(&old_keys, old_ts);
    all.extend(rows(&new_keys, now));
    retry("write old and new rows", LEADER_WAIT, || {
        let (mut c1, all) = (c1.clone(), all.clone());
        async move {
            quiver_tests::write_rows(&mut c1, "counter", all)
                .await
                .map_err(|e| e.to_string())
        }
    })
    .await;
    let statuses = |client: &quiver_tests::Client, keys: Vec<String>, level: pb::Consistency| {
        let mut client = client.clone();
        async move {
            let response = client
                .get(pb::GetRequest {
                    entity_keys: keys,
                    features: vec!["counter:value".into()],
                    consistency: level as i32,
                    skip_cache: false,
                    max_staleness_ms: 0,
                    degraded: false,
                })
                .await
                .map_err(|e| e.to_string())?
                .into_inner();
            Ok::<Vec<pb::FeatureStatus>, String>(
                response
                    .entities
                    .iter()
                    .map(|e| e.features[0].status())
                    .collect(),
            )
        }
    };

    eprintln!("--- ttl lowered to 60 s: the 600 s old rows expire for good");
    apply_ttl(60).await;
    retry("old rows read as absent", CONVERGE_WAIT, || {
        let fut = statuses(&c1, old_keys.clone(), pb::Consistency::Strong);
        async move {
            let got = fut.await?;
            if got.iter().all(|s| *s == pb::FeatureStatus::NotFound) {
                Ok(())
            } else {
                Err(format!("{got:?}"))
            }
        }
    })
    .await;

    eprintln!("--- ttl raised again: the expired rows stay expired, through every node and level");
    apply_ttl(3600).await;
    eprintln!("--- a late write as old as the expired rows is stale everywhere");
    let late = retry("late write", LEADER_WAIT, || {
        let (mut c1, late) = (c1.clone(), rows(&old_keys, old_ts + 1));
        async move {
            quiver_tests::write_rows(&mut c1, "counter", late)
                .await
                .map_err(|e| e.to_string())
        }
    })
    .await;
    assert_eq!(late.rows_stale, old_keys.len() as u64, "{late:?}");
    for id in 1..=3 {
        let client = cluster.node(id).client().await.unwrap();
        for level in [
            pb::Consistency::Strong,
            pb::Consistency::Leader,
            pb::Consistency::Replica,
        ] {
            retry(
                "expired rows read absent, fresh rows present",
                CONVERGE_WAIT,
                || {
                    let old = statuses(&client, old_keys.clone(), level);
                    let new = statuses(&client, new_keys.clone(), level);
                    async move {
                        let (old, new) = (old.await?, new.await?);
                        let old_ok = old.iter().all(|s| *s == pb::FeatureStatus::NotFound);
                        let new_ok = new.iter().all(|s| *s == pb::FeatureStatus::Present);
                        if old_ok && new_ok {
                            Ok(())
                        } else {
                            Err(format!("node {id} {level:?}: old {old:?}, new {new:?}"))
                        }
                    }
                },
            )
            .await;
        }
    }
}

/// A partition through the peer-link proxies: node 1, cut off from both
/// peers (its connections black-holed, as behind a dead switch), loses
/// every group it led to the majority side, which takes writes; node 1
/// itself never serves a value older than those writes at LEADER or STRONG
/// (its lease runs out, it cannot get a read index), and after the heal it
/// catches up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_isolated_node_serves_nothing_stale_and_the_majority_goes_on() {
    use quiver_tests::counter::start_with_links;
    use quiver_tests::links::LinkState;
    let mut cluster = start_with_links(&FOUR_SHARDS).await;
    let links = cluster.links.clone().unwrap();
    let c1 = cluster.node(1).client().await.unwrap();
    apply_counter_view(&c1).await;
    let keys = keys(24, "p");
    let old: Vec<(String, i64)> = keys.iter().map(|k| (k.clone(), 1)).collect();
    retry("first write", LEADER_WAIT, || {
        let (mut c1, old) = (c1.clone(), old.clone());
        async move { write_values(&mut c1, &old).await }
    })
    .await;

    eprintln!("--- node 1 isolated: the majority elects leaders and takes writes");
    links.isolate(1, LinkState::Blackhole);
    let c2 = cluster.node(2).client().await.unwrap();
    let new: Vec<(String, i64)> = keys.iter().map(|k| (k.clone(), 2)).collect();
    retry(
        "write through node 2 while node 1 is cut off",
        LEADER_WAIT,
        || {
            let (mut c2, new) = (c2.clone(), new.clone());
            async move { write_values(&mut c2, &new).await }
        },
    )
    .await;
    let deadline = Instant::now() + std::time::Duration::from_secs(4);
    let mut refused = 0;
    while Instant::now() < deadline {
        for level in [pb::Consistency::Leader, pb::Consistency::Strong] {
            let mut c1 = c1.clone();
            let read = tokio::time::timeout(
                std::time::Duration::from_secs(3),
                read_values(&mut c1, &keys, level),
            )
            .await;
            match read {
                Ok(Ok((values, _))) => assert!(
                    values.iter().all(|v| *v == Some(2)),
                    "isolated node 1 served stale values at {level:?}: {values:?}"
                ),
                _ => refused += 1,
            }
        }
    }
    assert!(refused > 0, "node 1 cannot serve every read while isolated");

    eprintln!("--- healed: node 1 catches up");
    links.heal_all();
    wait_for_values(
        "node 1 reads the majority's writes",
        &c1,
        &keys,
        pb::Consistency::Replica,
        &vec![Some(2); keys.len()],
    )
    .await;
}

/// Election timeouts long enough that an election cannot pass for a
/// handover: anything that moves leadership faster was a handover.
const SLOW_ELECTIONS: [(&str, &str); 4] = [
    FOUR_SHARDS[0],
    ("QUIVER_CLUSTER__ELECTION_TIMEOUT_MIN_MS", "5000"),
    ("QUIVER_CLUSTER__ELECTION_TIMEOUT_MAX_MS", "6000"),
    // A group may sleep only after a lease without traffic.
    ("QUIVER_CLUSTER__HIBERNATE_AFTER_MS", "6000"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leadership_moves_on_request_and_on_shutdown_without_an_election_timeout() {
    let election_timeout_min = std::time::Duration::from_millis(5000);
    // "Far below an election timeout": a tenth of it. On loopback the
    // handover takes about 12 ms and the longest gap in acknowledged writes
    // about 20 ms; the margin is for a loaded test machine.
    let far_below = election_timeout_min / 10;
    let mut cluster = start(&SLOW_ELECTIONS).await;
    let c1 = cluster.node(1).client().await.unwrap();
    let key = "handover".to_owned();
    let (shard, leader) = write_and_locate(&mut cluster, &c1, &key, 0).await;
    let target = (1..=3).find(|&n| n != leader).unwrap();
    let third = (1..=3).find(|&n| n != leader && n != target).unwrap();

    // A writer through the node that leads nothing of interest to the
    // test, recording when each write was acknowledged.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let mut client = cluster.node(third).client().await.unwrap();
        let stop = stop.clone();
        let key = key.clone();
        tokio::spawn(async move {
            let mut acknowledged = Vec::new();
            let mut value = 0;
            while !stop.load(Ordering::Relaxed) {
                if write_values(&mut client, &[(key.clone(), value)])
                    .await
                    .is_ok()
                {
                    acknowledged.push((Instant::now(), value));
                    value += 1;
                }
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            acknowledged
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;

    // By request, through a node that does not lead the shard.
    let endpoint = cluster.node(third).endpoint();
    let shard_arg = shard.to_string();
    let to_arg = target.to_string();
    let transfer = || -> serde_json::Value {
        let args = [
            "--json",
            "shard",
            "transfer-leader",
            &shard_arg,
            "--to",
            &to_arg,
        ];
        let out = quiver_tests::quiverctl(&endpoint, &args).unwrap();
        serde_json::from_str(&out).unwrap()
    };
    let asked = Instant::now();
    let done = transfer();
    let took = asked.elapsed();
    let out = done.to_string();
    assert_eq!(done["leader_id"], target, "{out}");
    assert_eq!(done["moved"], true, "{out}");
    // On the leader (the whole call also starts a quiverctl process).
    let on_leader_ms = done["elapsed_ms"].as_u64().unwrap();
    assert!(
        u128::from(on_leader_ms) < far_below.as_millis(),
        "the handover took {on_leader_ms} ms on the leader: {out}"
    );
    assert!(took < election_timeout_min, "the call took {took:?}: {out}");
    assert_eq!(leader_of(&mut cluster, shard).await, target);
    // Asking again changes nothing.
    let again = transfer();
    assert_eq!(again["moved"], false, "{again}");
    // What cannot be done is refused with the reason.
    for (args, code) in [
        (
            vec!["shard", "transfer-leader", "99", "--to", "1"],
            "NotFound",
        ),
        (
            vec!["shard", "transfer-leader", &shard_arg, "--to", "9"],
            "InvalidArgument",
        ),
    ] {
        let err = quiver_tests::quiverctl(&endpoint, &args)
            .unwrap_err()
            .to_string();
        assert!(err.contains(code), "{args:?}: {err}");
    }

    // On shutdown: the new leader stops (SIGTERM) and hands its groups over
    // first, so the writer does not wait out an election.
    tokio::task::block_in_place(|| cluster.node(target).terminate()).unwrap();
    let after_stop = leader_of(&mut cluster, shard).await;
    assert_ne!(after_stop, target);
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let acknowledged = writer.await.unwrap();
    assert!(
        acknowledged.len() > 10,
        "the writer made progress: {}",
        acknowledged.len()
    );
    let gap = acknowledged
        .windows(2)
        .map(|w| w[1].0 - w[0].0)
        .max()
        .unwrap();
    assert!(
        gap < far_below,
        "writes stopped for {gap:?}: leadership moved by election, or the handover was slow"
    );
    eprintln!(
        "handover: {took:?} by request ({} ms on the leader); longest gap in acknowledged \
         writes over the request and a shutdown: {gap:?}",
        done["elapsed_ms"]
    );
    // Every acknowledged write holds: a STRONG read says the last one (or
    // the attempt after it, whose outcome the writer did not learn).
    let last = acknowledged.last().unwrap().1;
    let mut reader = cluster.node(leader).client().await.unwrap();
    let (read, _) = read_values(
        &mut reader,
        std::slice::from_ref(&key),
        pb::Consistency::Strong,
    )
    .await
    .unwrap();
    assert!(
        read == vec![Some(last)] || read == vec![Some(last + 1)],
        "read {read:?}, last acknowledged {last}"
    );

    // The restarted node leads nothing; `rebalance` plans handovers to it
    // (the dry run changes nothing) and `--apply` carries them out.
    cluster.node(target).restart().await.unwrap();
    cluster.wait_for_leaders(LEADER_WAIT).await.unwrap();
    // Shards only: the balancer leaves the metadata group's leader alone.
    let leader_counts =
        || quiver_tests::dynamic::leader_counts(&endpoint, &[1, 2, 3], false).unwrap();
    let before = leader_counts();
    let plan = quiver_tests::quiverctl(&endpoint, &["--json", "rebalance"]).unwrap();
    let plan: serde_json::Value = serde_json::from_str(&plan).unwrap();
    assert_eq!(plan["applied"], false);
    assert_eq!(leader_counts(), before, "a dry run moves nothing");
    // Right after its restart the node may not be heard from or caught up
    // yet: the handovers are refused until it is.
    retry("rebalance --apply", CONVERGE_WAIT, || {
        let endpoint = endpoint.clone();
        async move {
            quiver_tests::quiverctl(&endpoint, &["--json", "rebalance", "--apply"])
                .map_err(|e| e.to_string())
        }
    })
    .await;
    let after = leader_counts();
    let spread = after.values().max().unwrap() - after.values().min().unwrap();
    assert!(
        spread <= 1,
        "leaders per node {after:?} (before {before:?})"
    );
    eprintln!("leaders per node before rebalance {before:?}, after {after:?}");
}

/// A leader that starts a handover tells the voters they may elect the
/// target at once, so its own lease is void from then on. Here the old
/// leader cannot hear the new one (the others' links to it are cut; its own
/// links to them work, so its handover goes out): it must not serve a
/// `LEADER` read from its state, which misses the new leader's write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_that_hands_over_serves_no_read_from_its_lease() {
    use quiver_proto::admin as admin_pb;
    use quiver_tests::counter::start_with_links;
    use quiver_tests::links::LinkState;
    // Long leases: without the rule, the old leader's would cover the read.
    let mut cluster = start_with_links(&SLOW_ELECTIONS).await;
    let links = cluster.links.clone().unwrap();
    let c1 = cluster.node(1).client().await.unwrap();
    let key = "lease".to_owned();
    let (shard, old) = write_and_locate(&mut cluster, &c1, &key, 1).await;
    let target = (1..=3).find(|&n| n != old).unwrap();
    let mut old_client = cluster.node(old).client().await.unwrap();
    // The old leader serves the key from its lease: 1.
    let (read, _) = read_values(
        &mut old_client,
        std::slice::from_ref(&key),
        pb::Consistency::Leader,
    )
    .await
    .unwrap();
    assert_eq!(read, vec![Some(1)]);

    for other in (1..=3).filter(|&n| n != old) {
        links.set(other, old, LinkState::Refuse);
    }
    // Asked of the old leader itself: it starts the handover, then waits in
    // vain to hear the target lead.
    let endpoint = cluster.node(old).endpoint();
    let handover = tokio::spawn(async move {
        let mut admin = quiver_proto::admin::admin_client::AdminClient::connect(endpoint)
            .await
            .unwrap();
        admin
            .transfer_leader(admin_pb::TransferLeaderRequest {
                shard,
                to_node_id: target,
            })
            .await
    });
    let mut target_client = cluster.node(target).client().await.unwrap();
    retry("the target leads and takes a write", LEADER_WAIT, || {
        let (mut client, key) = (target_client.clone(), key.clone());
        async move { write_values(&mut client, &[(key, 2)]).await }
    })
    .await;
    let (read, sources) = read_values(
        &mut target_client,
        std::slice::from_ref(&key),
        pb::Consistency::Strong,
    )
    .await
    .unwrap();
    assert_eq!(read, vec![Some(2)]);
    assert_eq!(sources[0].node_id, target, "{sources:?}");
    // Through the old leader, well inside the lease it had: not 1.
    match read_values(
        &mut old_client,
        std::slice::from_ref(&key),
        pb::Consistency::Leader,
    )
    .await
    {
        Ok((read, sources)) => assert_eq!(
            read,
            vec![Some(2)],
            "a LEADER read after the handover began: {sources:?}"
        ),
        // Redirected and failed: allowed; stale: not.
        Err(e) => eprintln!("the old leader's read failed: {e}"),
    }
    links.heal_all();
    let _ = handover.await.unwrap();
}

/// A client's deadline (`grpc-timeout`) bounds the whole request, routing
/// retries included: a model server gets its answer (an error) when its
/// budget runs out, not when the node's retry budget does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_bounds_a_request_whose_shard_has_no_quorum() {
    let mut cluster = start(&FOUR_SHARDS).await;
    let c1 = cluster.node(1).client().await.unwrap();
    apply_counter_view(&c1).await;
    retry("first write", LEADER_WAIT, || {
        let mut c1 = c1.clone();
        async move { write_values(&mut c1, &[("dl".to_owned(), 1)]).await }
    })
    .await;
    cluster.node(2).kill9().unwrap();
    cluster.node(3).kill9().unwrap();
    let request = || pb::GetRequest {
        entity_keys: vec!["dl".into()],
        features: vec!["counter:value".into()],
        consistency: pb::Consistency::Strong as i32,
        skip_cache: true,
        max_staleness_ms: 0,
        degraded: false,
    };
    let mut client = c1.clone();
    // Without a deadline: the node tries until its routing budget is spent
    // (the view's name resolves at a metadata read index, which has no
    // quorum either), then answers UNAVAILABLE.
    let started = Instant::now();
    let answer = client.get(request()).await;
    let budget = started.elapsed();
    match answer {
        Err(status) => assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}"),
        Ok(answer) => assert_eq!(
            answer.into_inner().entities[0].features[0].status(),
            pb::FeatureStatus::Unavailable
        ),
    }
    // With one: answered when it passes.
    let deadline = std::time::Duration::from_millis(300);
    let mut bounded = tonic::Request::new(request());
    bounded.set_timeout(deadline);
    let started = Instant::now();
    let err = client.get(bounded).await.unwrap_err();
    let took = started.elapsed();
    assert!(
        matches!(
            err.code(),
            tonic::Code::Cancelled | tonic::Code::DeadlineExceeded
        ),
        "{err:?}"
    );
    assert!(
        took < budget / 2 && took >= deadline,
        "with a {deadline:?} deadline: {took:?}; without: {budget:?}"
    );
    eprintln!("no quorum: answered in {took:?} with a {deadline:?} deadline, {budget:?} without");
    cluster.node(2).restart().await.unwrap();
    cluster.node(3).restart().await.unwrap();
}

/// A caller's staleness budget (`max_staleness_ms`) lets a follower answer
/// while its shard has no leader, which the default bound (the 1 s lease)
/// refuses; a degraded Get answers from the follower's own rows, marked
/// STALE, within the caller's deadline: the answers a model server would
/// rather have than none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_staleness_budget_lets_a_follower_answer_while_its_leader_is_gone() {
    let mut cluster = start(&FOUR_SHARDS).await;
    let c1 = cluster.node(1).client().await.unwrap();
    let key = "budget".to_owned();
    let (_, leader) = write_and_locate(&mut cluster, &c1, &key, 7).await;
    let follower = (1..=3).find(|&n| n != leader).unwrap();
    let mut client = cluster.node(follower).client().await.unwrap();
    // The follower has the write applied before its leader goes.
    retry(
        "the follower serves the write itself",
        CONVERGE_WAIT,
        || {
            let (mut client, key) = (client.clone(), key.clone());
            async move {
                let (read, sources) =
                    read_values(&mut client, &[key], pb::Consistency::Replica).await?;
                if read == vec![Some(7)] && sources[0].node_id == follower {
                    Ok(())
                } else {
                    Err(format!("{read:?} from {sources:?}"))
                }
            }
        },
    )
    .await;
    let degraded_get = |deadline: std::time::Duration| {
        let mut request = tonic::Request::new(pb::GetRequest {
            entity_keys: vec![key.clone(), "never-written".into()],
            features: vec!["counter:value".into()],
            consistency: pb::Consistency::Leader as i32,
            skip_cache: true,
            max_staleness_ms: 0,
            degraded: true,
        });
        request.set_timeout(deadline);
        request
    };
    // Healthy, a degraded Get is an ordinary one.
    let healthy = client
        .get(degraded_get(std::time::Duration::from_secs(5)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        healthy.entities[0].features[0].status(),
        pb::FeatureStatus::Present
    );
    assert_eq!(
        healthy.entities[1].features[0].status(),
        pb::FeatureStatus::NotFound
    );
    assert!(healthy.sources.iter().all(|s| !s.stale), "{healthy:?}");

    for other in (1..=3).filter(|&n| n != follower) {
        cluster.node(other).kill9().unwrap();
    }
    let request = |max_staleness_ms: u64| {
        let mut request = tonic::Request::new(pb::GetRequest {
            entity_keys: vec![key.clone()],
            features: vec!["counter:value".into()],
            consistency: pb::Consistency::Leader as i32,
            skip_cache: true,
            max_staleness_ms,
            degraded: false,
        });
        request.set_timeout(std::time::Duration::from_secs(2));
        request
    };
    // Past the lease, nothing but the budget lets it answer (retried: on a
    // loaded machine a starved runtime counts as a stall, which blocks
    // local REPLICA reads for a lease).
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let answer = retry(
        "a read within the budget",
        std::time::Duration::from_secs(10),
        || {
            let mut client = client.clone();
            let request = request(60_000);
            async move {
                let answer = client
                    .get(request)
                    .await
                    .map_err(|e| e.to_string())?
                    .into_inner();
                if answer.entities[0].features[0].status() == pb::FeatureStatus::Present {
                    Ok(answer)
                } else {
                    Err(format!("{answer:?}"))
                }
            }
        },
    )
    .await;
    let feature = &answer.entities[0].features[0];
    assert_eq!(feature.status(), pb::FeatureStatus::Present, "{answer:?}");
    assert_eq!(
        feature.value.as_ref().and_then(|v| v.kind.clone()),
        Some(pb::value::Kind::Int64Val(7))
    );
    assert_eq!(answer.sources[0].node_id, follower);
    assert!(!answer.sources[0].leader);
    // Without one, or with one shorter than the time since the leader
    // went: no answer (UNAVAILABLE, or the deadline first).
    for budget_ms in [0, 1_000] {
        match client.get(request(budget_ms)).await {
            Err(status) => assert!(
                matches!(
                    status.code(),
                    tonic::Code::Cancelled | tonic::Code::Unavailable
                ),
                "{budget_ms} ms: {status:?}"
            ),
            Ok(answer) => assert_eq!(
                answer.into_inner().entities[0].features[0].status(),
                pb::FeatureStatus::Unavailable,
                "{budget_ms} ms"
            ),
        }
    }

    // Degraded, with no budget but a 1 s deadline: after 80% of it, the
    // follower's own rows marked STALE (a key it has no row for: STALE
    // without a value, not NOT_FOUND).
    let deadline = std::time::Duration::from_secs(1);
    let asked = Instant::now();
    let answer = client
        .get(degraded_get(deadline))
        .await
        .unwrap()
        .into_inner();
    let took = asked.elapsed();
    assert!(
        took >= deadline.mul_f64(0.75) && took < deadline,
        "answered after {took:?}"
    );
    assert!(answer.sources[0].stale, "{answer:?}");
    let stale = &answer.entities[0].features[0];
    assert_eq!(stale.status(), pb::FeatureStatus::Stale, "{answer:?}");
    assert_eq!(
        stale.value.as_ref().and_then(|v| v.kind.clone()),
        Some(pb::value::Kind::Int64Val(7))
    );
    assert!(stale.event_ts_us > 0);
    let absent = &answer.entities[1].features[0];
    assert_eq!(absent.status(), pb::FeatureStatus::Stale);
    assert!(absent.value.is_none());
    assert_eq!(answer.sources[0].node_id, follower);
    eprintln!("degraded read without quorum answered in {took:?} (deadline {deadline:?})");
    for other in (1..=3).filter(|&n| n != follower) {
        cluster.node(other).restart().await.unwrap();
    }
}

/// A model server's view of a shard dying replica by replica: degraded Gets
/// with a 300 ms deadline (the 100 ms leaves a debug build on a
/// loaded 2-core machine 20 ms between the 80% fallback budget and the
/// deadline) and a 2 s staleness budget, through one follower,
/// while the shard's leader is killed and then the other follower. Every
/// Get answers within its deadline: `PRESENT` while a leader or the budget
/// allows (the follower's own replica, not marked stale), then `STALE` from
/// the follower's replica once the budget has run out without a leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_short_deadlines_a_degraded_reader_gets_present_then_stale_as_replicas_die() {
    let mut cluster = start(&FOUR_SHARDS).await;
    let c1 = cluster.node(1).client().await.unwrap();
    let key = "dying".to_owned();
    let (_, leader) = write_and_locate(&mut cluster, &c1, &key, 7).await;
    let mut followers = (1..=3).filter(|&n| n != leader);
    let (reader, other) = (followers.next().unwrap(), followers.next().unwrap());
    let client = cluster.node(reader).client().await.unwrap();
    wait_for_values(
        "the reader's replica has the write",
        &client,
        std::slice::from_ref(&key),
        pb::Consistency::Replica,
        &[Some(7)],
    )
    .await;
    let deadline = std::time::Duration::from_millis(300);
    // Asks for `length`, a Get every 50 ms; every one must answer in time.
    let ask = |length: std::time::Duration| {
        let (client, key) = (client.clone(), key.clone());
        async move {
            let mut answers = Vec::new();
            let until = Instant::now() + length;
            while Instant::now() < until {
                let mut request = tonic::Request::new(pb::GetRequest {
                    entity_keys: vec![key.clone()],
                    features: vec!["counter:value".into()],
                    consistency: pb::Consistency::Leader as i32,
                    skip_cache: true,
                    max_staleness_ms: 2_000,
                    degraded: true,
                });
                request.set_timeout(deadline);
                let asked = Instant::now();
                let answer = client
                    .clone()
                    .get(request)
                    .await
                    .unwrap_or_else(|status| panic!("no answer within {deadline:?}: {status:?}"))
                    .into_inner();
                let feature = &answer.entities[0].features[0];
                assert_eq!(
                    feature.value.as_ref().and_then(|v| v.kind.clone()),
                    Some(pb::value::Kind::Int64Val(7)),
                    "{answer:?}"
                );
                answers.push((feature.status(), asked.elapsed()));
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            answers
        }
    };
    let present = |answers: &[(pb::FeatureStatus, std::time::Duration)], what: &str| {
        assert!(
            answers
                .iter()
                .all(|(status, _)| *status == pb::FeatureStatus::Present),
            "{what}: {answers:?}"
        );
    };
    present(&ask(std::time::Duration::from_millis(500)).await, "healthy");

    eprintln!("--- the leader, node {leader}, is killed");
    cluster.node(leader).kill9().unwrap();
    present(
        &ask(std::time::Duration::from_millis(1500)).await,
        "a follower within the budget",
    );

    eprintln!("--- the other follower, node {other}, is killed: no quorum");
    cluster.node(other).kill9().unwrap();
    let answers = ask(std::time::Duration::from_millis(4500)).await;
    // PRESENT while the budget lasts, then STALE, and never back.
    let first_stale = answers
        .iter()
        .position(|(status, _)| *status == pb::FeatureStatus::Stale)
        .unwrap_or_else(|| panic!("never STALE: {answers:?}"));
    present(&answers[..first_stale], "within the budget");
    assert!(
        answers[first_stale..]
            .iter()
            .all(|(status, _)| *status == pb::FeatureStatus::Stale),
        "STALE once the budget ran out: {answers:?}"
    );
    let slowest = answers.iter().map(|(_, took)| *took).max().unwrap();
    eprintln!(
        "{} PRESENT then {} STALE, slowest {slowest:?}",
        first_stale,
        answers.len() - first_stale
    );
    cluster.node(leader).restart().await.unwrap();
    cluster.node(other).restart().await.unwrap();
}

/// Degraded Gets through a node that holds no replica of some shards, as
/// those shards' replicas die: with one replica left, it answers as it is
/// (`STALE`, the source names it); with none, the rows the node last read
/// from the shard answer (`STALE`), and rows it never read (or wrote
/// since) get their defaults (`DEFAULTED`). A shard the node does hold
/// answers from its own replica throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_degraded_get_where_no_replica_is_local_falls_back_to_others_then_last_known_rows() {
    use quiver_tests::{double, feature, row, write_rows};
    // Two replicas per shard on three nodes: each node lacks some shards,
    // and the shards node 1 lacks are on nodes 2 and 3.
    let mut cluster = start(&[FOUR_SHARDS[0], ("QUIVER_CLUSTER__REPLICATION_FACTOR", "2")]).await;
    let lone = 1;
    let mut client = cluster.node(lone).client().await.unwrap();
    let view = pb::FeatureView {
        name: "dv".into(),
        entities: vec!["id".into()],
        features: vec![feature("score", pb::ValueType::Double, Some(double(0.5)))],
        ttl_seconds: 0,
        description: "degraded defaults".into(),
        version: 0,
    };
    apply_view(&mut client, view).await.unwrap();
    let hosted: Vec<u32> = cluster
        .node(lone)
        .client()
        .await
        .unwrap()
        .status(pb::StatusRequest {})
        .await
        .unwrap()
        .into_inner()
        .groups
        .iter()
        .map(|g| g.group)
        .collect();
    let writer = client.clone();
    let write = |key: String, score: f64| {
        let client = writer.clone();
        async move {
            retry("write", LEADER_WAIT, || {
                let (mut client, key) = (client.clone(), key.clone());
                async move {
                    write_rows(
                        &mut client,
                        "dv",
                        vec![row(
                            &key,
                            quiver_tests::now_us(),
                            &[("score", double(score))],
                        )],
                    )
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string())
                }
            })
            .await;
        }
    };
    // Keys until one lands on a shard node 1 holds and two on shards it
    // does not. Each is read once through node 1 (STRONG: from the leader),
    // which is what node 1 keeps as the shard's last-known rows.
    let (mut local, mut remote) = (None, Vec::new());
    for i in 0..400 {
        let key = format!("d{i}");
        write(key.clone(), 0.9).await;
        let answer = client
            .get(pb::GetRequest {
                entity_keys: vec![key.clone()],
                features: vec!["dv:score".into()],
                consistency: pb::Consistency::Strong as i32,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let shard = answer.sources[0].shard;
        if hosted.contains(&shard) {
            local.get_or_insert(key);
        } else if remote.len() < 2 {
            remote.push(key);
        }
        if local.is_some() && remote.len() == 2 {
            break;
        }
    }
    let local = local.unwrap();
    let [remote_read, remote_rewritten] = <[String; 2]>::try_from(remote).unwrap();
    // Written again through node 1: it forgets its last-known row.
    write(remote_rewritten.clone(), 0.7).await;
    // The local key's value is on node 1's replica before the others go.
    retry("node 1 holds the local key", CONVERGE_WAIT, || {
        let (mut client, local) = (client.clone(), local.clone());
        async move {
            let answer = client
                .get(pb::GetRequest {
                    entity_keys: vec![local],
                    features: vec!["dv:score".into()],
                    consistency: pb::Consistency::Replica as i32,
                    ..Default::default()
                })
                .await
                .map_err(|e| e.to_string())?
                .into_inner();
            (answer.sources[0].node_id == lone
                && answer.entities[0].features[0].status() == pb::FeatureStatus::Present)
                .then_some(())
                .ok_or_else(|| format!("{answer:?}"))
        }
    })
    .await;
    let degraded_get = |keys: Vec<String>| {
        let mut client = client.clone();
        async move {
            let mut request = tonic::Request::new(pb::GetRequest {
                entity_keys: keys,
                features: vec!["dv:score".into()],
                consistency: pb::Consistency::Leader as i32,
                degraded: true,
                ..Default::default()
            });
            request.set_timeout(std::time::Duration::from_secs(2));
            let asked = Instant::now();
            let answer = client.get(request).await.unwrap().into_inner();
            eprintln!("degraded Get answered in {:?}", asked.elapsed());
            answer
        }
    };
    let value = |answer: &pb::GetResponse, e: usize| {
        let feature = &answer.entities[e].features[0];
        (feature.status(), feature.value.clone().and_then(|v| v.kind))
    };
    let double_val = pb::value::Kind::DoubleVal;

    eprintln!("--- node 2 is killed: node 3 holds the only live replica of the remote shards");
    cluster.node(2).kill9().unwrap();
    // Past any leader lease of node 3 (it cannot renew one alone).
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let answer = degraded_get(vec![remote_read.clone()]).await;
    assert_eq!(
        value(&answer, 0),
        (pb::FeatureStatus::Stale, Some(double_val(0.9))),
        "{answer:?}"
    );
    assert!(
        answer.sources.iter().all(|s| s.node_id == 3 && s.stale),
        "answered by node 3's replica as it is: {answer:?}"
    );

    eprintln!("--- node 3 is killed: no replica of the remote shards is left");
    cluster.node(3).kill9().unwrap();
    let answer = degraded_get(vec![
        local.clone(),
        remote_read.clone(),
        remote_rewritten.clone(),
    ])
    .await;
    // Node 1 may still lead the local key's shard under its lease (no other
    // leader can be elected with the other replica down): PRESENT then,
    // STALE from its replica after.
    let (status, local_value) = value(&answer, 0);
    assert!(
        matches!(
            status,
            pb::FeatureStatus::Stale | pb::FeatureStatus::Present
        ),
        "{answer:?}"
    );
    assert_eq!(local_value, Some(double_val(0.9)));
    assert_eq!(
        value(&answer, 1),
        (pb::FeatureStatus::Stale, Some(double_val(0.9))),
        "the row node 1 last read: {answer:?}"
    );
    assert_eq!(
        value(&answer, 2),
        (pb::FeatureStatus::Defaulted, Some(double_val(0.5))),
        "forgotten when written through node 1: {answer:?}"
    );
    assert!(
        answer
            .sources
            .iter()
            .any(|s| s.node_id == lone && s.stale && s.applied_index == 0),
        "the last-known rows are named as node 1's, at no replica position: {answer:?}"
    );
    cluster.node(2).restart().await.unwrap();
    cluster.node(3).restart().await.unwrap();
}

/// Work a node forwards for a client request (a write to a shard another
/// node leads) is logged on the node that does it under the client's
/// `x-request-id`: a write through each node with its own id, and at least
/// one node logs another node's id (at most one node can lead every shard).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_work_is_logged_under_the_client_request_id() {
    let mut cluster = start(&[(
        "QUIVER_LOG",
        "info,quiver_server::cluster::peer_service=debug",
    )])
    .await;
    let client = cluster.node(1).client().await.unwrap();
    apply_counter_view(&client).await;
    let keys = keys(48, "traced");
    let now = quiver_tests::now_us();
    for id in 1..=3u64 {
        let client = cluster.node(id).client().await.unwrap();
        retry("a traced write", LEADER_WAIT, || {
            let mut client = client.clone();
            let rows: Vec<pb::WriteRow> = keys
                .iter()
                .map(|key| {
                    quiver_tests::row(key, now + id as i64, &[("value", quiver_tests::int64(1))])
                })
                .collect();
            async move {
                let mut request = tonic::Request::new(pb::WriteRequest {
                    view: "counter".into(),
                    rows,
                    request_id: Vec::new(),
                });
                request
                    .metadata_mut()
                    .insert("x-request-id", format!("traced-{id}").parse().unwrap());
                client
                    .write(request)
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }
        })
        .await;
    }
    // The logs reach their files a moment after the lines are written.
    let logs: Vec<_> = cluster
        .nodes
        .iter()
        .map(|node| node.log_path().to_path_buf())
        .collect();
    retry(
        "forwarded work logged under another node's request id",
        CONVERGE_WAIT,
        || {
            let logs = logs.clone();
            async move {
                let logged_elsewhere = (1..=3usize)
                    .flat_map(|through| (1..=3usize).map(move |on| (through, on)))
                    .filter(|(through, on)| through != on)
                    .any(|(through, on)| {
                        std::fs::read_to_string(&logs[on - 1])
                            .unwrap_or_default()
                            .lines()
                            .any(|line| {
                                // (Text logs color the span's fields apart.)
                                line.contains(&format!("traced-{through}"))
                                    && line.contains("forwarded call answered")
                            })
                    });
                if logged_elsewhere {
                    Ok(())
                } else {
                    Err("not yet".to_owned())
                }
            }
        },
    )
    .await;
}

/// A client that routes by `GetRoutes` reaches each shard's leader with no
/// forward; a node that forwards says so (`rows_forwarded`), and after a
/// handover the routes a node gives name the new leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_routed_by_get_routes_reach_leaders_and_learn_of_handovers() {
    let mut cluster = start(&FOUR_SHARDS).await;
    let c1 = cluster.node(1).client().await.unwrap();
    apply_counter_view(&c1).await;
    let keys = keys(32, "routed");
    let values: Vec<(String, i64)> = keys.iter().map(|k| (k.clone(), 1)).collect();
    retry("write through node 1", LEADER_WAIT, || {
        let (mut client, values) = (c1.clone(), values.clone());
        async move { write_values(&mut client, &values).await }
    })
    .await;
    let addrs: BTreeMap<u64, String> = (1..=3)
        .map(|id| (id, cluster.node(id).addr().to_string()))
        .collect();
    let mut leaders = BTreeMap::new();
    for shard in 1..=4 {
        leaders.insert(shard, leader_of(&mut cluster, shard).await);
    }

    // Every node's routes: the members at their client addresses, the four
    // shards covering the ring, each led by the node that leads it, from
    // the metadata group's map.
    let routes_of = |client: &pb::feature_store_client::FeatureStoreClient<_>| {
        let mut client = client.clone();
        async move {
            let answer = client
                .get_routes(pb::GetRoutesRequest {})
                .await
                .map_err(|e| e.to_string())?
                .into_inner();
            let table = quiver_client::RouteTable::new(&answer).map_err(|e| e.to_string())?;
            Ok::<_, String>((answer, table))
        }
    };
    for id in 1..=3 {
        let client = cluster.node(id).client().await.unwrap();
        let leaders = leaders.clone();
        let (answer, _) = retry("routes name every leader", LEADER_WAIT, || {
            let (routes, leaders) = (routes_of(&client), leaders.clone());
            async move {
                let (answer, table) = routes.await?;
                let named: BTreeMap<u32, u64> = answer
                    .shards
                    .iter()
                    .map(|s| (s.shard, s.leader_node_id))
                    .collect();
                if answer.map_version == 0 {
                    // The metadata group has not stored its first map yet.
                    Err(format!("node {id} routes by its configuration"))
                } else if named == leaders {
                    Ok((answer, table))
                } else {
                    Err(format!(
                        "node {id} routes {named:?}, leaders are {leaders:?}"
                    ))
                }
            }
        })
        .await;
        let nodes: BTreeMap<u64, String> = answer
            .nodes
            .iter()
            .map(|n| (n.node_id, n.addr.clone()))
            .collect();
        assert_eq!(nodes, addrs, "node {id}");
        assert!(answer.shards.iter().all(|s| s.voter_node_ids.len() == 3));
    }

    // Each row sent to its leader is not forwarded; sent elsewhere, it is.
    let (_, table) = routes_of(&c1).await.unwrap();
    let by_addr: BTreeMap<String, u64> = addrs.iter().map(|(&id, a)| (a.clone(), id)).collect();
    let mut clients = BTreeMap::new();
    for id in 1..=3 {
        clients.insert(id, cluster.node(id).client().await.unwrap());
    }
    let write_one = |id: u64, key: &str, value: i64| {
        let mut client = clients[&id].clone();
        let row = quiver_tests::row(
            key,
            quiver_tests::now_us() + value,
            &[("value", quiver_tests::int64(value))],
        );
        async move {
            client
                .write(pb::WriteRequest {
                    view: "counter".into(),
                    rows: vec![row],
                    request_id: Vec::new(),
                })
                .await
                .unwrap()
                .into_inner()
        }
    };
    for key in &keys {
        let leader = by_addr[table.leader_addr(key).expect("a leader for every key")];
        assert_eq!(leader, leaders[&table.shard_of(key).unwrap()]);
        assert_eq!(
            write_one(leader, key, 2).await.rows_forwarded,
            0,
            "{key} at its leader"
        );
        let other = (1..=3).find(|&n| n != leader).unwrap();
        let forwarded = write_one(other, key, 3).await;
        assert_eq!(
            (forwarded.rows_forwarded, forwarded.rows_applied),
            (1, 1),
            "{key} via {other}"
        );
    }

    // A handover asked through the third node: the old leader's routes
    // name the new leader before any request went through it (its replica
    // knows), a row sent to it is forwarded and says so, and one sent to
    // the new leader is not.
    let key = &keys[0];
    let shard = table.shard_of(key).unwrap();
    let old = leaders[&shard];
    let new = (1..=3).find(|&n| n != old).unwrap();
    let third = (1..=3).find(|&n| n != old && n != new).unwrap();
    let mut admin = cluster.node(third).admin().await.unwrap();
    admin
        .transfer_leader(quiver_proto::admin::TransferLeaderRequest {
            shard,
            to_node_id: new,
        })
        .await
        .unwrap();
    let old_client = clients[&old].clone();
    let by_addr_ref = &by_addr;
    retry(
        "the old leader's routes name the new one",
        LEADER_WAIT,
        || {
            let routes = routes_of(&old_client);
            async move {
                let (_, fresh) = routes.await?;
                let named = fresh.leader_addr(key).map(|addr| by_addr_ref[addr]);
                (named == Some(new))
                    .then_some(())
                    .ok_or(format!("node {old} routes {key} to {named:?}"))
            }
        },
    )
    .await;
    let after = retry("a write through the old leader", LEADER_WAIT, || {
        let write = write_one(old, key, 4);
        async move { Ok::<_, String>(write.await) }
    })
    .await;
    assert_eq!(after.rows_forwarded, 1);
    assert_eq!(write_one(new, key, 5).await.rows_forwarded, 0);
}

/// A view change acknowledged through one node is seen by the next call
/// through another, even one busy enough that its recent catalog catch-ups
/// answer calls without asking the metadata leader again
/// (`CLIENT_CATALOG_REUSE`): the change waits out that window before it is
/// acknowledged. (On loopback node 3's own replica usually applies the
/// change before the write arrives, so this passes without the wait too;
/// it fails when node 3 lags and the wait is missing.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_view_change_is_seen_at_once_through_a_node_busy_with_writes() {
    let mut cluster = start(&[]).await;
    let c1 = cluster.node(1).client().await.unwrap();
    apply_counter_view(&c1).await;
    let c3 = cluster.node(3).client().await.unwrap();
    retry("write through node 3", LEADER_WAIT, || {
        let mut c3 = c3.clone();
        async move { write_values(&mut c3, &[("busy".to_owned(), 0)]).await }
    })
    .await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let busy = {
        let (mut c3, stop) = (c3.clone(), stop.clone());
        tokio::spawn(async move {
            let mut written = 0u64;
            while !stop.load(Ordering::Relaxed) {
                if write_values(&mut c3, &[("busy".to_owned(), 1)])
                    .await
                    .is_ok()
                {
                    written += 1;
                }
            }
            written
        })
    };
    let mut view = counter_view();
    for round in 0..20 {
        let name = format!("extra{round}");
        view.features
            .push(quiver_tests::feature(&name, pb::ValueType::Int64, None));
        let mut c1 = c1.clone();
        apply_view(&mut c1, view.clone()).await.unwrap();
        let rows = vec![quiver_tests::row(
            "fresh",
            quiver_tests::now_us(),
            &[(name.as_str(), quiver_tests::int64(round))],
        )];
        let mut c3 = c3.clone();
        if let Err(status) = quiver_tests::write_rows(&mut c3, "counter", rows).await {
            panic!("round {round}: a write of the field just added, through node 3: {status}");
        }
    }
    stop.store(true, Ordering::Relaxed);
    let written = busy.await.unwrap();
    eprintln!("{written} background writes through node 3");
    assert!(written > 20, "node 3 was busy ({written} writes)");
}
