//! Hibernation on real nodes: an idle cluster's groups sleep on every node
//! and stay asleep (no elections, no log growth); a request wakes what it
//! needs and is served at once; a sleeping group whose leader is killed or
//! paused still gets a new leader, and the old one, resumed, serves nothing
//! stale.

#![allow(clippy::unwrap_used, missing_docs)]

use std::time::{Duration, Instant};

use quiver_proto::v1 as pb;
use quiver_tests::counter::{
    LEADER_WAIT, Running, apply_counter_view, keys, read_values, retry, start, write_values,
};
use quiver_tests::{Client, Cluster};

/// Four shards, and groups that sleep after one idle second.
const SLEEPY: [(&str, &str); 2] = [
    ("QUIVER_CLUSTER__SHARD_COUNT", "4"),
    ("QUIVER_CLUSTER__HIBERNATE_AFTER_MS", "1000"),
];
/// How long a test waits for every group to fall asleep.
const SLEEP_WAIT: Duration = Duration::from_secs(60);

/// Every group on every running node: (node id, status).
async fn groups(cluster: &mut Cluster) -> Result<Vec<(u64, pb::GroupStatus)>, String> {
    let mut all = Vec::new();
    for (i, node) in cluster.nodes.iter_mut().enumerate() {
        if !node.is_running() {
            continue;
        }
        let status = node.status().await.map_err(|e| e.to_string())?;
        all.extend(status.groups.into_iter().map(|g| (i as u64 + 1, g)));
    }
    Ok(all)
}

async fn wait_all_asleep(cluster: &mut Cluster) -> Vec<(u64, pb::GroupStatus)> {
    let until = Instant::now() + SLEEP_WAIT;
    loop {
        let all = groups(cluster).await.unwrap();
        let awake: Vec<String> = all
            .iter()
            .filter(|(_, g)| !g.asleep)
            .map(|(node, g)| format!("node {node} group {} ({})", g.group, g.role))
            .collect();
        if awake.is_empty() {
            return all;
        }
        assert!(
            Instant::now() < until,
            "still awake after {SLEEP_WAIT:?}: {}",
            awake.join(", ")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// (node, group) -> (term, last log index, leader), to compare over time.
fn positions(all: &[(u64, pb::GroupStatus)]) -> Vec<(u64, u32, u64, u64, u64)> {
    let mut positions: Vec<_> = all
        .iter()
        .map(|(node, g)| (*node, g.group, g.term, g.last_log_index, g.leader_id))
        .collect();
    positions.sort_unstable();
    positions
}

/// Keys on every shard, written through node 2, read back STRONG.
async fn write_and_check(cluster: &mut Cluster, keys: &[String], value: i64) {
    let mut c2 = cluster.node(2).client().await.unwrap();
    let values: Vec<(String, i64)> = keys.iter().map(|k| (k.clone(), value)).collect();
    retry("write through node 2", LEADER_WAIT, || {
        let mut c2 = c2.clone();
        let values = values.clone();
        async move { write_values(&mut c2, &values).await }
    })
    .await;
    let (read, _) = read_values(&mut c2, keys, pb::Consistency::Strong)
        .await
        .unwrap();
    assert!(read.iter().all(|v| *v == Some(value)), "{read:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_cluster_sleeps_and_a_request_wakes_it() {
    let mut cluster = start(&SLEEPY).await;
    let c1 = cluster.node(1).client().await.unwrap();
    apply_counter_view(&c1).await;
    let keys = keys(32, "h");
    write_and_check(&mut cluster, &keys, 1).await;

    eprintln!("--- idle: every group on every node falls asleep");
    let asleep = wait_all_asleep(&mut cluster).await;
    assert_eq!(asleep.len(), 3 * 5, "3 nodes x (metadata + 4 shards)");

    eprintln!("--- asleep is quiet: no election, no entry, no wake-up for 3 s");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let later = groups(&mut cluster).await.unwrap();
    assert_eq!(positions(&later), positions(&asleep));
    assert!(later.iter().all(|(_, g)| g.asleep), "{later:?}");

    eprintln!("--- a write through node 3 wakes the shards it touches and is acknowledged at once");
    let mut c3 = cluster.node(3).client().await.unwrap();
    let values: Vec<(String, i64)> = keys.iter().map(|k| (k.clone(), 2)).collect();
    tokio::time::timeout(Duration::from_secs(10), write_values(&mut c3, &values))
        .await
        .expect("a write to sleeping groups answers within 10 s")
        .unwrap();
    let woken = groups(&mut cluster).await.unwrap();
    assert!(
        woken.iter().any(|(_, g)| g.group != 0 && !g.asleep),
        "the written shards woke: {woken:?}"
    );

    eprintln!("--- every level reads the write, through every node");
    for id in 1..=3 {
        let mut client = cluster.node(id).client().await.unwrap();
        for consistency in [pb::Consistency::Strong, pb::Consistency::Leader] {
            let (read, _) = read_values(&mut client, &keys, consistency).await.unwrap();
            assert!(
                read.iter().all(|v| *v == Some(2)),
                "node {id} {consistency:?}: {read:?}"
            );
        }
    }

    eprintln!("--- and the cluster falls asleep again");
    wait_all_asleep(&mut cluster).await;
    eprintln!("--- a read alone wakes a sleeping leader, which renews its lease and serves");
    let mut c1 = cluster.node(1).client().await.unwrap();
    let (read, sources) = read_values(&mut c1, &keys, pb::Consistency::Leader)
        .await
        .unwrap();
    assert!(read.iter().all(|v| *v == Some(2)), "{read:?}");
    assert!(sources.iter().all(|s| s.leader), "{sources:?}");
}

/// The node leading the most groups.
async fn busiest_leader(cluster: &mut Cluster) -> u64 {
    let all = groups(cluster).await.unwrap();
    (1..=3)
        .max_by_key(|&node| {
            all.iter()
                .filter(|(n, g)| *n == node && g.role == "leader")
                .count()
        })
        .unwrap()
}

/// A sleeping cluster holding `keys` at 1, the node leading the most of its
/// groups, and a client of another node.
async fn asleep_with_a_victim(prefix: &str) -> (Running, Vec<String>, u64, Client) {
    let mut cluster = start(&SLEEPY).await;
    let c1 = cluster.node(1).client().await.unwrap();
    apply_counter_view(&c1).await;
    let keys = keys(32, prefix);
    write_and_check(&mut cluster, &keys, 1).await;
    wait_all_asleep(&mut cluster).await;
    let victim = busiest_leader(&mut cluster).await;
    let survivor = if victim == 2 { 3 } else { 2 };
    let client = cluster.node(survivor).client().await.unwrap();
    (cluster, keys, victim, client)
}

/// Writes `value` to every key through `client`, retrying while the
/// cluster elects.
async fn write_all(what: &str, client: &Client, keys: &[String], value: i64) {
    let values: Vec<(String, i64)> = keys.iter().map(|k| (k.clone(), value)).collect();
    retry(what, LEADER_WAIT, || {
        let mut client = client.clone();
        let values = values.clone();
        async move { write_values(&mut client, &values).await }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sleeping_groups_killed_leader_is_replaced() {
    let (mut cluster, keys, victim, client) = asleep_with_a_victim("k").await;
    eprintln!("--- kill -9 node {victim}, which leads sleeping groups");
    cluster.node(victim).kill9().unwrap();
    let killed = Instant::now();
    write_all("write after the kill", &client, &keys, 2).await;
    eprintln!(
        "first write to every shard acknowledged {:?} after the kill",
        killed.elapsed()
    );
    let all = groups(&mut cluster).await.unwrap();
    for (node, g) in &all {
        assert_ne!(g.leader_id, victim, "node {node} group {}: {g:?}", g.group);
    }

    eprintln!("--- the survivors read every acknowledged write, STRONG");
    let mut client = client.clone();
    let (read, _) = read_values(&mut client, &keys, pb::Consistency::Strong)
        .await
        .unwrap();
    assert!(read.iter().all(|v| *v == Some(2)), "{read:?}");

    eprintln!("--- the killed node comes back, catches up, and everything sleeps again");
    cluster.node(victim).restart().await.unwrap();
    wait_all_asleep(&mut cluster).await;
    let mut back = cluster.node(victim).client().await.unwrap();
    let (read, _) = read_values(&mut back, &keys, pb::Consistency::Replica)
        .await
        .unwrap();
    assert!(read.iter().all(|v| *v == Some(2)), "{read:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_sleeping_leader_wakes_deposed_and_serves_nothing_stale() {
    let (mut cluster, keys, victim, client) = asleep_with_a_victim("p").await;
    eprintln!("--- SIGSTOP node {victim}; the others elect new leaders and take a write");
    cluster.node(victim).pause().unwrap();
    write_all("write while the leader is paused", &client, &keys, 2).await;

    eprintln!("--- SIGCONT: node {victim} still believes it leads; reads through it are not stale");
    cluster.node(victim).resume().unwrap();
    let mut through_victim = cluster.node(victim).client().await.unwrap();
    for consistency in [
        pb::Consistency::Leader,
        pb::Consistency::Strong,
        pb::Consistency::Replica,
    ] {
        let (read, sources) = retry("read through the resumed node", LEADER_WAIT, || {
            let mut client = through_victim.clone();
            let keys = keys.clone();
            async move { read_values(&mut client, &keys, consistency).await }
        })
        .await;
        if consistency == pb::Consistency::Replica {
            // A replica read may lag by its documented bound; the others
            // must not lag at all.
            continue;
        }
        assert!(
            read.iter().all(|v| *v == Some(2)),
            "{consistency:?} through node {victim}: {read:?} from {sources:?}"
        );
    }
    eprintln!("--- and a write through it succeeds (routed to the new leaders)");
    write_all("write through the resumed node", &through_victim, &keys, 3).await;
    let (read, _) = read_values(&mut through_victim, &keys, pb::Consistency::Strong)
        .await
        .unwrap();
    assert!(read.iter().all(|v| *v == Some(3)), "{read:?}");
}
