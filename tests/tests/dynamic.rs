//! The cluster changes under load: replica moves, nodes joining, a node
//! drained and removed, each while a writer keeps an acknowledged-write
//! ledger that is then checked through every node at STRONG.

#![allow(clippy::unwrap_used, missing_docs)]

use std::time::Duration;

use quiver_tests::counter::{CONVERGE_WAIT, apply_counter_view, keys, retry};
use quiver_tests::dynamic::{
    Reader, Writer, balanced_within_one, check_ledger, cluster_map, leader_counts, replica_counts,
    replica_dirs, settled, voter_nodes, wait_map, wait_replica_gone,
};
use quiver_tests::scrape::{sample, scrape, value_of};
use quiver_tests::{Cluster, Node, TEST_CLUSTER_SECRET, quiverctl};

/// One cluster at a time (2 cores).
static ONE_CLUSTER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Keeps the directory of a failed test (data and node logs).
struct Kept(Option<tempfile::TempDir>);

impl Drop for Kept {
    fn drop(&mut self) {
        if std::thread::panicking()
            && let Some(dir) = self.0.take()
        {
            eprintln!(
                "cluster data and node logs kept in {}",
                dir.keep().display()
            );
        }
    }
}

impl Kept {
    fn new() -> Kept {
        Kept(Some(tempfile::tempdir().unwrap()))
    }

    fn path(&self) -> &std::path::Path {
        self.0.as_ref().unwrap().path()
    }
}

/// Starts `count` nodes with `env` under `dir`, waits for every leader and
/// applies the counter view; returns node 1's endpoint and a client of it.
async fn started(
    dir: &std::path::Path,
    count: usize,
    env: &[(&str, &str)],
) -> (Cluster, String, quiver_tests::Client) {
    let mut cluster = Cluster::start(dir, count, env).await.unwrap();
    cluster.wait_for_leaders(CONVERGE_WAIT).await.unwrap();
    let endpoint = cluster.node(1).endpoint();
    let client = cluster.node(1).client().await.unwrap();
    apply_counter_view(&client).await;
    (cluster, endpoint, client)
}

/// A replica moves away and back to the same node (under a new replica id)
/// while a writer keeps a ledger; then two moves of one shard asked at
/// once through two nodes: exactly one starts, the other is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_moves_away_and_back_to_the_same_node_under_writes() {
    let _turn = ONE_CLUSTER.lock().await;
    let dir = Kept::new();
    let (mut cluster, endpoint, _client) = started(
        dir.path(),
        4,
        &[
            ("QUIVER_CLUSTER__SHARD_COUNT", "2"),
            ("QUIVER_CLUSTER__SCHEDULE_REPLICAS", "false"),
        ],
    )
    .await;

    eprintln!("--- a writer keeps a ledger through node 2");
    let writer = Writer::start(cluster.node(2).client().await.unwrap(), keys(40, "mv"));
    let map = wait_map(&endpoint, "the map is stored", |map| {
        map.replicated.then_some(()).ok_or("not stored".into())
    })
    .await;
    let voters = voter_nodes(&map, 1);
    assert_eq!(voters.len(), 3, "{map:?}");
    let away = voters[0];
    let spare = (1..=4).find(|n| !voters.contains(n)).unwrap();
    let before = replica_dirs(cluster.node(away));
    assert!(before.contains(&"1".to_owned()), "{before:?}");

    eprintln!("--- shard 1 moves from node {away} to node {spare}");
    let out = quiverctl(
        &endpoint,
        &[
            "shard",
            "move",
            "1",
            "--from",
            &away.to_string(),
            "--to",
            &spare.to_string(),
            "--wait",
        ],
    )
    .unwrap();
    eprintln!("{out}");
    let map = wait_map(&endpoint, "the move is done and cleaned up", |map| {
        settled(map, 3, &[1, 2, 3, 4])
    })
    .await;
    let now = voter_nodes(&map, 1);
    assert!(now.contains(&spare) && !now.contains(&away), "{now:?}");
    wait_replica_gone(cluster.node(away), 1).await;

    eprintln!("--- and back to node {away}, under a new replica id");
    quiverctl(
        &endpoint,
        &[
            "shard",
            "move",
            "1",
            "--from",
            &spare.to_string(),
            "--to",
            &away.to_string(),
            "--wait",
        ],
    )
    .unwrap();
    let map = wait_map(&endpoint, "the move back is done", |map| {
        settled(map, 3, &[1, 2, 3, 4])
    })
    .await;
    let shard = map.shards.iter().find(|s| s.shard == 1).unwrap();
    let back = shard
        .replicas
        .iter()
        .find(|r| r.node_id == away)
        .expect("a replica on the node again");
    assert_ne!(back.replica_id >> 32, 0, "a new incarnation: {back:?}");
    assert!(shard.conf_ver >= 2, "{shard:?}");
    let dirs = replica_dirs(cluster.node(away));
    assert!(
        dirs.contains(&format!("1.{}", back.replica_id >> 32)),
        "{dirs:?}"
    );
    // Its status reports the new replica.
    let status = cluster.node(away).status().await.unwrap();
    let group = status.groups.iter().find(|g| g.group == 1).unwrap();
    assert_eq!(group.replica_id, back.replica_id);

    eprintln!("--- two moves of shard 2 asked at once, through two nodes: exactly one starts");
    let voters = voter_nodes(&map, 2);
    let spare = (1..=4).find(|n| !voters.contains(n)).unwrap();
    let asks: Vec<_> = [(1, voters[0]), (3, voters[1])]
        .into_iter()
        .map(|(through, from)| {
            let endpoint = cluster.node(through).endpoint();
            let (from, to) = (from.to_string(), spare.to_string());
            tokio::task::spawn_blocking(move || {
                let args = ["shard", "move", "2", "--from", &from, "--to", &to];
                quiverctl(&endpoint, &args).map_err(|e| format!("{e:#}"))
            })
        })
        .collect();
    let mut outcomes = Vec::new();
    for ask in asks {
        outcomes.push(ask.await.unwrap());
    }
    eprintln!("{outcomes:?}");
    assert_eq!(
        outcomes.iter().filter(|o| o.is_ok()).count(),
        1,
        "{outcomes:?}"
    );
    let refused = outcomes.iter().find_map(|o| o.as_ref().err()).unwrap();
    assert!(refused.contains("under way"), "{refused}");
    let map = wait_map(&endpoint, "the one move is done", |map| {
        settled(map, 3, &[1, 2, 3, 4])
    })
    .await;
    let now = voter_nodes(&map, 2);
    assert!(now.contains(&spare), "{now:?}");
    assert_eq!(
        voters.iter().filter(|v| !now.contains(v)).count(),
        1,
        "exactly one voter moved: {voters:?} -> {now:?}"
    );

    eprintln!("--- the writer's acknowledged writes are all there, through every node");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let ledger = writer.stop().await;
    eprintln!(
        "writer: {} acknowledged, {} failed, longest gap {:?}",
        ledger.acks, ledger.failures, ledger.longest_gap
    );
    assert!(ledger.acks > 10, "{ledger:?}");
    for id in 1..=4 {
        let client = cluster.node(id).client().await.unwrap();
        retry("the ledger reads back", CONVERGE_WAIT, || {
            let (client, ledger) = (client.clone(), ledger.clone());
            async move { check_ledger(&client, &ledger, &format!("node {id}")).await }
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_node_grows_to_four_then_the_first_is_drained_and_removed() {
    let _turn = ONE_CLUSTER.lock().await;
    let dir = Kept::new();
    let env = [("QUIVER_CLUSTER__SECRET", TEST_CLUSTER_SECRET)];
    eprintln!("--- node 1 starts alone (4 shards, replication factor 3)");
    let first = Node::start_with_env(&dir.path().join("node1"), &["--shard-count", "4"], &env)
        .await
        .unwrap();
    let endpoint = first.endpoint();
    let client = first.client().await.unwrap();
    apply_counter_view(&client).await;
    let preload = keys(200, "pre");
    retry("preload", CONVERGE_WAIT, || {
        let mut client = client.clone();
        let values: Vec<(String, i64)> = preload.iter().map(|k| (k.clone(), 7)).collect();
        async move { quiver_tests::counter::write_values(&mut client, &values).await }
    })
    .await;
    let writer = Writer::start(client.clone(), keys(40, "grow"));

    eprintln!("--- nodes 2 and 3 join through node 1");
    let mut nodes = vec![first];
    for id in 2..=3 {
        let node = Node::start_with_env(
            &dir.path().join(format!("node{id}")),
            &["--join", &endpoint],
            &env,
        )
        .await
        .unwrap();
        nodes.push(node);
    }
    wait_map(&endpoint, "every shard has 3 voters on nodes 1-3", |map| {
        settled(map, 3, &[1, 2, 3])
    })
    .await;

    // Three nodes, three voters per shard: a drain would have nowhere to
    // put them, and is refused rather than lowering redundancy.
    let refused = quiverctl(&endpoint, &["node", "drain", "2"]).unwrap_err();
    assert!(
        format!("{refused:#}").contains("nowhere to go"),
        "{refused:#}"
    );
    let map = cluster_map(&endpoint).await.unwrap();
    assert!(
        map.nodes.iter().all(|n| n.state == "serving"),
        "{:?}",
        map.nodes
    );

    eprintln!("--- node 4 joins: the replicas spread to it");
    nodes.push(
        Node::start_with_env(&dir.path().join("node4"), &["--join", &endpoint], &env)
            .await
            .unwrap(),
    );
    let map = wait_map(&endpoint, "balanced over 4 nodes", |map| {
        settled(map, 3, &[1, 2, 3, 4])?;
        let counts = replica_counts(map, &[1, 2, 3, 4]);
        if counts.iter().all(|&c| c == 3) {
            Ok(())
        } else {
            Err(format!("replicas per node {counts:?}"))
        }
    })
    .await;
    eprintln!("nodes: {:?}", map.nodes);

    eprintln!("--- node 1 is drained, then removed");
    let out = quiverctl(&endpoint, &["node", "drain", "1", "--wait"]).unwrap();
    eprintln!("{out}");
    let map = wait_map(&endpoint, "drained and balanced over nodes 2-4", |map| {
        settled(map, 3, &[2, 3, 4])
    })
    .await;
    assert_eq!(replica_counts(&map, &[2, 3, 4]), vec![4, 4, 4]);
    quiverctl(&endpoint, &["node", "remove", "1"]).unwrap();
    let endpoint2 = nodes[1].endpoint();
    wait_map(&endpoint2, "node 1 removed", |map| {
        let one = map.nodes.iter().find(|n| n.node_id == 1).unwrap();
        (one.state == "removed")
            .then_some(())
            .ok_or(format!("{one:?}"))
    })
    .await;

    eprintln!("--- the writer's acknowledged writes are all there, through nodes 2-4");
    let ledger = writer.stop().await;
    eprintln!(
        "writer: {} acknowledged, {} failed, longest gap {:?}",
        ledger.acks, ledger.failures, ledger.longest_gap
    );
    nodes[0].kill9().unwrap();
    for node in &nodes[1..] {
        let client = node.client().await.unwrap();
        retry("the ledger reads back", CONVERGE_WAIT, || {
            let (client, ledger) = (client.clone(), ledger.clone());
            async move { check_ledger(&client, &ledger, "a remaining node").await }
        })
        .await;
        let mut client = client.clone();
        let (values, _) = quiver_tests::counter::read_values(
            &mut client,
            &preload,
            quiver_proto::v1::Consistency::Strong,
        )
        .await
        .unwrap();
        assert!(values.iter().all(|v| *v == Some(7)), "{values:?}");
    }
}

/// The scale-out: three nodes grow to five under a writer and a
/// STRONG reader checked in real time, then one drains back out; every
/// acknowledged write reads back through every node and replicas end
/// within one of the mean, with the leader balancer on throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_grow_to_five_and_one_drains_under_writes_and_strong_reads() {
    let _turn = ONE_CLUSTER.lock().await;
    let dir = Kept::new();
    // One shard per node (`shard_count = 0`; the default is one shard), so
    // that scaling out has several shards to place and leaders to balance.
    let env = [
        ("QUIVER_CLUSTER__SHARD_COUNT", "0"),
        ("QUIVER_CLUSTER__BALANCE_LEADERS", "true"),
        ("QUIVER_CLUSTER__LOAD_REPORT_INTERVAL_MS", "500"),
        ("QUIVER_CLUSTER__SECRET", TEST_CLUSTER_SECRET),
    ];
    let (mut cluster, endpoint, client) = started(dir.path(), 3, &env).await;
    let keys = keys(40, "out");
    let writer = Writer::start(client.clone(), keys.clone());
    let reader = Reader::start(
        cluster.node(3).client().await.unwrap(),
        keys,
        writer.progress(),
    );

    let map = wait_map(&endpoint, "the map is stored", |map| {
        map.replicated.then_some(()).ok_or("not stored".into())
    })
    .await;
    assert_eq!(map.shards.len(), 3, "one shard per node");

    eprintln!("--- nodes 4 and 5 join through node 1");
    let mut joined = Vec::new();
    for id in 4..=5 {
        joined.push(
            Node::start_with_env(
                &dir.path().join(format!("node{id}")),
                &["--join", &endpoint],
                &env,
            )
            .await
            .unwrap(),
        );
    }
    let all = [1, 2, 3, 4, 5];
    let map = wait_map(&endpoint, "3 shards x 3 replicas over 5 nodes", |map| {
        settled(map, 3, &all)?;
        balanced_within_one(map, &all)
    })
    .await;
    eprintln!("replicas per node {:?}", replica_counts(&map, &all));

    eprintln!("--- node 3 (the reader's) drains back out");
    let out = quiverctl(&endpoint, &["node", "drain", "3", "--wait"]).unwrap();
    eprintln!("{out}");
    let rest = [1, 2, 4, 5];
    let map = wait_map(&endpoint, "drained and balanced over 4 nodes", |map| {
        settled(map, 3, &rest)?;
        balanced_within_one(map, &rest)
    })
    .await;
    eprintln!("replicas per node {:?}", replica_counts(&map, &rest));
    tokio::time::sleep(Duration::from_millis(500)).await;

    let ledger = writer.stop().await;
    let reads = reader.stop().await;
    eprintln!(
        "writer: {} acknowledged, {} failed, longest gap {:?}; reader: {} reads, {} failed, longest gap {:?}",
        ledger.acks,
        ledger.failures,
        ledger.longest_gap,
        reads.ok,
        reads.failures,
        reads.longest_gap
    );
    assert!(reads.violations.is_empty(), "{:?}", reads.violations);
    assert!(ledger.acks > 20 && reads.ok > 20, "{ledger:?} {reads:?}");

    eprintln!("--- every acknowledged write reads back through every node");
    let mut clients = Vec::new();
    for id in 1..=3 {
        clients.push((id, cluster.node(id).client().await.unwrap()));
    }
    for (i, node) in joined.iter().enumerate() {
        clients.push((i as u64 + 4, node.client().await.unwrap()));
    }
    for (id, client) in clients {
        retry("the ledger reads back", CONVERGE_WAIT, || {
            let (client, ledger) = (client.clone(), ledger.clone());
            async move { check_ledger(&client, &ledger, &format!("node {id}")).await }
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_splits_under_writes_and_each_half_serves_its_keys() {
    let _turn = ONE_CLUSTER.lock().await;
    let dir = Kept::new();
    let (mut cluster, endpoint, client) = started(
        dir.path(),
        3,
        &[
            ("QUIVER_CLUSTER__SHARD_COUNT", "2"),
            ("QUIVER_METRICS_LISTEN_ADDR", "127.0.0.1:0"),
        ],
    )
    .await;
    let preload = keys(400, "split");
    retry("preload", CONVERGE_WAIT, || {
        let mut client = client.clone();
        let values: Vec<(String, i64)> = preload.iter().map(|k| (k.clone(), 7)).collect();
        async move { quiver_tests::counter::write_values(&mut client, &values).await }
    })
    .await;
    wait_map(&endpoint, "the map is stored", |map| {
        map.replicated.then_some(()).ok_or("not stored".into())
    })
    .await;

    eprintln!("--- shard 1 splits while a writer writes through node 2");
    let writer = Writer::start(cluster.node(2).client().await.unwrap(), keys(60, "during"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let out = quiverctl(&endpoint, &["--json", "shard", "split", "1", "--wait"]).unwrap();
    eprintln!("{out}");
    let report: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let child = report["child"].as_u64().unwrap() as u32;
    let at = report["at"].as_u64().unwrap();
    assert_eq!(child, 3);
    assert_eq!(at, 1 << 62, "the middle of shard 1's half of the ring");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let ledger = writer.stop().await;
    eprintln!(
        "writer: {} acknowledged, {} failed, longest gap {:?}",
        ledger.acks, ledger.failures, ledger.longest_gap
    );
    assert!(ledger.acks > 5, "{ledger:?}");
    // Writes refused for keys the split moved went straight to the new
    // shard by the descriptors the refusal carried, not after waiting for
    // the map (node 2's map learned of the split after it applied).
    let metrics = cluster.node(2).metrics_addr().await.unwrap().to_string();
    let scraped = scrape(&metrics).await;
    let reroutes = |route: &str| {
        sample(
            &scraped,
            "quiver_wrong_shard_reroutes_total",
            &[("kind", "write"), ("route", route)],
        )
        .map_or(0.0, value_of)
    };
    eprintln!(
        "writes routed again: {} by descriptor, {} by the map",
        reroutes("descriptor"),
        reroutes("map")
    );
    assert!(reroutes("descriptor") >= 1.0 && reroutes("map") == 0.0);

    eprintln!("--- the map and every node know shard {child}");
    let map = wait_map(&endpoint, "three shards", |map| {
        if map.shards.len() == 3 && map.operators.is_empty() {
            Ok(())
        } else {
            Err(format!("{:?}", map.shards))
        }
    })
    .await;
    let parent = map.shards.iter().find(|s| s.shard == 1).unwrap();
    let new = map.shards.iter().find(|s| s.shard == child).unwrap();
    assert_eq!((parent.start, parent.end, parent.version), (0, at, 1));
    assert_eq!((new.start, new.version), (at, 1));
    assert_eq!(voter_nodes(&map, 1), voter_nodes(&map, child));
    for id in 1..=3 {
        let node = cluster.node(id);
        retry("the child is hosted and led", CONVERGE_WAIT, || {
            let node_status = node.status();
            async move {
                let status = node_status.await.map_err(|e| e.to_string())?;
                match status.groups.iter().find(|g| g.group == child) {
                    Some(g) if g.leader_id != 0 => Ok(()),
                    other => Err(format!("{other:?}")),
                }
            }
        })
        .await;
    }

    eprintln!(
        "--- every preloaded row and every acknowledged write reads back, through every node"
    );
    for id in 1..=3 {
        let mut client = cluster.node(id).client().await.unwrap();
        let (values, sources) = quiver_tests::counter::read_values(
            &mut client,
            &preload,
            quiver_proto::v1::Consistency::Strong,
        )
        .await
        .unwrap();
        assert!(values.iter().all(|v| *v == Some(7)), "{values:?}");
        let shards: std::collections::BTreeSet<u32> = sources.iter().map(|s| s.shard).collect();
        assert!(shards.contains(&child), "{sources:?}");
        retry("the ledger reads back", CONVERGE_WAIT, || {
            let (client, ledger) = (client.clone(), ledger.clone());
            async move { check_ledger(&client, &ledger, &format!("node {id}")).await }
        })
        .await;
    }

    eprintln!(
        "--- a split cancelled at once either stands or never happens, and every node agrees"
    );
    let out = quiverctl(&endpoint, &["--json", "shard", "split", "2"]).unwrap();
    let report: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let op = report["operator"]["id"].as_u64().unwrap().to_string();
    let cancelled = quiverctl(&endpoint, &["operator", "cancel", "2", &op]);
    eprintln!("cancel: {cancelled:?}");
    let map = wait_map(&endpoint, "the cancelled split ends", |map| {
        map.operators
            .is_empty()
            .then_some(())
            .ok_or(format!("{:?}", map.operators))
    })
    .await;
    let shards: Vec<u32> = map.shards.iter().map(|s| s.shard).collect();
    eprintln!("shards after the cancelled split: {shards:?}");
    assert!(shards.len() == 3 || shards.len() == 4, "{shards:?}");
    for id in 1..=3 {
        let node = cluster.node(id);
        let shards = shards.clone();
        retry(
            "every node hosts exactly the map's shards",
            CONVERGE_WAIT,
            || {
                let node_status = node.status();
                let shards = shards.clone();
                async move {
                    let status = node_status.await.map_err(|e| e.to_string())?;
                    let mut hosted: Vec<u32> = status
                        .groups
                        .iter()
                        .map(|g| g.group)
                        .filter(|&g| g != 0)
                        .collect();
                    hosted.sort_unstable();
                    if hosted == shards {
                        Ok(())
                    } else {
                        Err(format!("hosts {hosted:?}, the map lists {shards:?}"))
                    }
                }
            },
        )
        .await;
    }

    eprintln!(
        "--- on every replica, each half holds only its own rows, and the parent's rows \
         before the split = the parent's after + the child's (a logical checksum)"
    );
    // Every key written, preloaded or by the writer (each acknowledged
    // round wrote all its keys, so every key attempted is stored), that
    // hashes into shard 1's range before the split.
    assert_eq!(
        ledger
            .acked
            .keys()
            .collect::<std::collections::BTreeSet<_>>(),
        ledger.attempted.keys().collect(),
    );
    let before = preload
        .iter()
        .chain(ledger.attempted.keys())
        .filter(|key| quiver_client::entity_hash(key) < 1 << 63)
        .count() as u64;
    let endpoints: Vec<String> = (1..=3).map(|id| cluster.node(id).endpoint()).collect();
    let replicas = retry(
        "every replica of both halves at the same applied index",
        CONVERGE_WAIT,
        || {
            let endpoints = endpoints.clone();
            async move { replicas_at_one_index(&endpoints, &[1, child]) }
        },
    )
    .await;
    for shard in [1, child] {
        let of_shard: Vec<&serde_json::Value> =
            replicas.iter().filter(|r| r["shard"] == shard).collect();
        assert_eq!(of_shard.len(), 3, "{of_shard:?}");
        for replica in &of_shard {
            assert_eq!(replica["rows_outside"], 0, "{replica}");
            assert_eq!(replica["sum"], of_shard[0]["sum"], "{of_shard:?}");
            assert_eq!(replica["rows"], of_shard[0]["rows"], "{of_shard:?}");
        }
    }
    let rows = |shard: u32| {
        replicas.iter().find(|r| r["shard"] == shard).unwrap()["rows"]
            .as_u64()
            .unwrap()
    };
    eprintln!(
        "shard 1: {} rows, shard {child}: {} rows, {before} before the split",
        rows(1),
        rows(child)
    );
    assert_eq!(rows(1) + rows(child), before);
    assert!(rows(1) > 0 && rows(child) > 0);
}

/// Every replica of `shards` on the nodes at `endpoints` (`quiverctl
/// checksum --local-replicas`), once each shard's replicas report the
/// same applied index (their digests are then comparable).
fn replicas_at_one_index(
    endpoints: &[String],
    shards: &[u32],
) -> Result<Vec<serde_json::Value>, String> {
    let mut replicas = Vec::new();
    for endpoint in endpoints {
        let out = quiverctl(endpoint, &["--json", "checksum", "--local-replicas"])
            .map_err(|e| format!("{e:#}"))?;
        let answer: serde_json::Value =
            serde_json::from_str(out.trim()).map_err(|e| e.to_string())?;
        replicas.extend(
            answer["shards"]
                .as_array()
                .ok_or(format!("no shards in {answer}"))?
                .iter()
                .filter(|r| shards.iter().any(|&s| r["shard"] == s))
                .cloned(),
        );
    }
    for &shard in shards {
        let indexes: std::collections::BTreeSet<u64> = replicas
            .iter()
            .filter(|r| r["shard"] == shard)
            .filter_map(|r| r["applied_index"].as_u64())
            .collect();
        if indexes.len() != 1 {
            return Err(format!("shard {shard}'s replicas applied {indexes:?}"));
        }
    }
    Ok(replicas)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_that_outgrows_its_size_limit_splits_by_itself() {
    let _turn = ONE_CLUSTER.lock().await;
    let dir = Kept::new();
    let (mut cluster, endpoint, client) = started(
        dir.path(),
        3,
        &[
            ("QUIVER_CLUSTER__SHARD_COUNT", "1"),
            ("QUIVER_CLUSTER__SPLIT_SHARD_BYTES_MAX", "1048576"),
            ("QUIVER_CLUSTER__LOAD_REPORT_INTERVAL_MS", "500"),
        ],
    )
    .await;

    eprintln!("--- one shard, written past 1 MiB (the smallest limit allowed)");
    let all = keys(30_000, "grow");
    for batch in all.chunks(1000) {
        retry("a batch", CONVERGE_WAIT, || {
            let mut client = client.clone();
            let values: Vec<(String, i64)> = batch.iter().map(|k| (k.clone(), 5)).collect();
            async move { quiver_tests::counter::write_values(&mut client, &values).await }
        })
        .await;
    }

    eprintln!("--- the scheduler splits it until every shard is under the limit");
    let map = wait_map(&endpoint, "split by size", |map| {
        if map.shards.len() >= 2 && map.operators.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "{} shards, {} operators",
                map.shards.len(),
                map.operators.len()
            ))
        }
    })
    .await;
    // Splitting stops: a few more reports find every shard under it.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let settled = wait_map(&endpoint, "no more splits", |map| {
        map.operators
            .is_empty()
            .then_some(())
            .ok_or("operators under way".into())
    })
    .await;
    eprintln!(
        "{} shards after the first split, {} once settled",
        map.shards.len(),
        settled.shards.len()
    );
    assert!(settled.shards.len() <= 8, "{:?}", settled.shards);
    // And stays stopped: four more report intervals split nothing.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let later = wait_map(&endpoint, "the map", |_| Ok(())).await;
    assert_eq!(
        later.shards.len(),
        settled.shards.len(),
        "splits went on: {:?}",
        later.shards
    );

    eprintln!("--- every row reads back through every node");
    for id in 1..=3 {
        let mut client = cluster.node(id).client().await.unwrap();
        for batch in all.chunks(1000) {
            let (values, _) = quiver_tests::counter::read_values(
                &mut client,
                batch,
                quiver_proto::v1::Consistency::Strong,
            )
            .await
            .unwrap();
            assert!(values.iter().all(|v| *v == Some(5)), "{values:?}");
        }
    }
}

/// A node that was down comes back leading nothing (its shards elected
/// leaders elsewhere); the metadata leader hands leadership over, one shard
/// a round, until every node leads within one shard of the others, while a
/// writer keeps its ledger.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaders_spread_back_over_a_node_that_restarts() {
    let _turn = ONE_CLUSTER.lock().await;
    let dir = Kept::new();
    let (mut cluster, endpoint, client) = started(
        dir.path(),
        3,
        &[
            ("QUIVER_CLUSTER__SHARD_COUNT", "9"),
            ("QUIVER_CLUSTER__BALANCE_LEADERS", "true"),
            ("QUIVER_CLUSTER__LOAD_REPORT_INTERVAL_MS", "500"),
        ],
    )
    .await;
    let nodes = [1, 2, 3];
    let balanced = |what: &'static str| {
        let endpoint = endpoint.clone();
        retry(what, CONVERGE_WAIT, move || {
            let endpoint = endpoint.clone();
            async move {
                let counts = leader_counts(&endpoint, &nodes, false)?;
                let (min, max) = (
                    counts.values().min().copied().unwrap_or(0),
                    counts.values().max().copied().unwrap_or(0),
                );
                if counts.values().sum::<usize>() == 9 && max - min <= 1 {
                    Ok(counts)
                } else {
                    Err(format!("leaders per node {counts:?}"))
                }
            }
        })
    };
    eprintln!(
        "--- balanced from the start: {:?}",
        balanced("first balance").await
    );

    let writer = Writer::start(client.clone(), keys(60, "spread"));
    eprintln!("--- node 3 down: its shards elect leaders on 1 and 2");
    cluster.node(3).kill9().unwrap();
    retry("nodes 1 and 2 lead every shard", CONVERGE_WAIT, || {
        let endpoint = endpoint.clone();
        async move {
            let counts = leader_counts(&endpoint, &[1, 2], false)?;
            (counts.values().sum::<usize>() == 9)
                .then_some(())
                .ok_or(format!("{counts:?}"))
        }
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    eprintln!("--- node 3 back: it leads nothing until the balancer hands it shards");
    cluster.node(3).restart().await.unwrap();
    let after = balanced("leaders spread over node 3 again").await;
    assert!(after[&3] >= 2, "{after:?}");
    let ledger = writer.stop().await;
    for id in nodes {
        let client = cluster.node(id).client().await.unwrap();
        check_ledger(&client, &ledger, &format!("node {id}"))
            .await
            .unwrap();
    }
    eprintln!(
        "leaders per node {after:?}; {} writes acknowledged, {} failed, longest gap {:?}",
        ledger.acks, ledger.failures, ledger.longest_gap
    );
}

/// A static node restarted after another node joined reaches the newcomer at
/// once, with no map change since: its peers come from the map it stored,
/// not only from the description it was started with, which does not name
/// the newcomer. (Found by the nemesis: until the next map change, a
/// restarted node could neither replicate to nor forward to a joined node.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restarted_after_another_joined_reaches_it_without_a_map_change() {
    let _turn = ONE_CLUSTER.lock().await;
    let dir = Kept::new();
    let (mut cluster, endpoint, _) = started(
        dir.path(),
        3,
        &[
            ("QUIVER_CLUSTER__SHARD_COUNT", "1"),
            // Leaders stay where elections put them: no handover in the way.
            ("QUIVER_CLUSTER__BALANCE_LEADERS", "false"),
        ],
    )
    .await;
    eprintln!("--- node 4 joins; shard 1's replica on node 2 moves to it");
    let env = [
        ("QUIVER_CLUSTER__SECRET", TEST_CLUSTER_SECRET),
        ("QUIVER_CLUSTER__BALANCE_LEADERS", "false"),
    ];
    let fourth = Node::start_with_env(&dir.path().join("node4"), &["--join", &endpoint], &env)
        .await
        .unwrap();
    wait_map(&endpoint, "node 4 serving", |map| {
        map.nodes
            .iter()
            .any(|n| n.node_id == 4 && n.state == "serving")
            .then_some(())
            .ok_or_else(|| format!("{:?}", map.nodes))
    })
    .await;
    let out = quiverctl(
        &endpoint,
        &["shard", "move", "1", "--from", "2", "--to", "4", "--wait"],
    )
    .unwrap();
    eprintln!("{out}");
    let map = wait_map(&endpoint, "shard 1 on nodes 1, 3 and 4", |map| {
        settled(map, 3, &[1, 3, 4])
    })
    .await;
    let version = map.version;

    eprintln!("--- node 1 restarts, then node 3 stops: shard 1's quorum is nodes 1 and 4");
    cluster.node(1).kill9().unwrap();
    cluster.node(1).restart().await.unwrap();
    cluster.node(3).kill9().unwrap();
    let mut client = cluster.node(1).client().await.unwrap();
    retry(
        "a write through node 1, which needs node 4",
        Duration::from_secs(20),
        || {
            let mut client = client.clone();
            async move {
                quiver_tests::counter::write_values(&mut client, &[("after".to_owned(), 1)]).await
            }
        },
    )
    .await;
    let (values, _) = quiver_tests::counter::read_values(
        &mut client,
        &["after".to_owned()],
        quiver_proto::v1::Consistency::Strong,
    )
    .await
    .unwrap();
    assert_eq!(values, vec![Some(1)]);
    let now = cluster_map(&fourth.endpoint()).await.unwrap();
    assert_eq!(
        now.version, version,
        "the map changed meanwhile, so this says nothing about the restart"
    );
}

/// A node lost for good (killed, never restarted) under writes and STRONG
/// reads: once it has been silent for `replace_down_after_ms`, the
/// scheduler re-creates its replicas on the other nodes; it can then be
/// removed, and every acknowledged write reads back through every node left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_lost_for_good_has_its_replicas_recreated_elsewhere_then_is_removed() {
    let _turn = ONE_CLUSTER.lock().await;
    let dir = Kept::new();
    let env = [
        ("QUIVER_CLUSTER__SHARD_COUNT", "0"),
        ("QUIVER_CLUSTER__REPLACE_DOWN_AFTER_MS", "3000"),
        ("QUIVER_CLUSTER__SECRET", TEST_CLUSTER_SECRET),
    ];
    let (mut cluster, endpoint, client) = started(dir.path(), 4, &env).await;
    let all = [1, 2, 3, 4];
    wait_map(&endpoint, "4 shards x 3 replicas over 4 nodes", |map| {
        settled(map, 3, &all)
    })
    .await;
    let keys = keys(40, "lost");
    let writer = Writer::start(client.clone(), keys.clone());
    let reader = Reader::start(
        cluster.node(2).client().await.unwrap(),
        keys,
        writer.progress(),
    );
    tokio::time::sleep(Duration::from_millis(500)).await;

    eprintln!("--- node 4 is killed for good");
    let progress = writer.progress();
    cluster.node(4).kill9().unwrap();
    let killed = std::time::Instant::now();
    let acked_at_kill = progress.acked.load(std::sync::atomic::Ordering::Relaxed);
    let rest = [1, 2, 3];
    // Too early to replace it: a node down for less than the setting may
    // be restarting; its replicas stay where they are.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let map = cluster_map(&endpoint).await.unwrap();
    assert_eq!(replica_counts(&map, &[4]), [3], "replaced too early");
    let map = wait_map(&endpoint, "node 4's replicas re-created on 1-3", |map| {
        // Its old replicas stay tombstoned (nothing will confirm their
        // deletion) until it is removed.
        let mut others = map.clone();
        others.tombstones.retain(|t| t.node_id != 4);
        settled(&others, 3, &rest)
    })
    .await;
    eprintln!(
        "re-created {:?} after the kill; replicas per node {:?}",
        killed.elapsed(),
        replica_counts(&map, &rest)
    );
    let out = quiverctl(&endpoint, &["node", "remove", "4"]).unwrap();
    eprintln!("{out}");
    wait_map(&endpoint, "node 4 removed, its tombstones with it", |map| {
        let state = map
            .nodes
            .iter()
            .find(|n| n.node_id == 4)
            .map(|n| n.state.clone());
        if state.as_deref() != Some("removed") {
            return Err(format!("node 4 is {state:?}"));
        }
        settled(map, 3, &rest)
    })
    .await;
    // Writes go on once the replicas are re-created and the node removed.
    let acked_at_removal = progress.acked.load(std::sync::atomic::Ordering::Relaxed);
    retry("writes after the removal", CONVERGE_WAIT, || {
        let progress = progress.clone();
        async move {
            let acked = progress.acked.load(std::sync::atomic::Ordering::Relaxed);
            (acked > acked_at_removal + 5).then_some(()).ok_or(format!(
                "round {acked} acknowledged, {acked_at_removal} at the removal"
            ))
        }
    })
    .await;

    let ledger = writer.stop().await;
    let reads = reader.stop().await;
    eprintln!(
        "writer: {} acknowledged ({} rounds at the kill, {} at the removal), {} failed, longest \
         gap {:?}; reader: {} reads, {} failed",
        ledger.acks,
        acked_at_kill,
        acked_at_removal,
        ledger.failures,
        ledger.longest_gap,
        reads.ok,
        reads.failures
    );
    assert!(reads.violations.is_empty(), "{:?}", reads.violations);
    assert!(
        acked_at_removal > acked_at_kill,
        "writes went on while node 4 was dead"
    );
    assert!(ledger.acks > 20 && reads.ok > 20, "{ledger:?} {reads:?}");
    // One replica of three lost: each shard kept a quorum, so no write
    // waited for an election (2 cores: generous).
    assert!(
        ledger.longest_gap < Duration::from_secs(3),
        "longest gap {:?}",
        ledger.longest_gap
    );
    for id in rest {
        let client = cluster.node(id).client().await.unwrap();
        retry("the ledger reads back", CONVERGE_WAIT, || {
            let (client, ledger) = (client.clone(), ledger.clone());
            async move { check_ledger(&client, &ledger, &format!("node {id}")).await }
        })
        .await;
    }
}

/// `quiverctl` drives a drain by hand with the scheduler off: `node add`
/// reserves a node and `node remove` takes the reservation back; the dry
/// run lists every round (one operator each, at `operators_max = 1`) and
/// changes nothing; `--apply` carries them all out (with `operator list`
/// showing them under way) and leaves nothing more to plan.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebalance_plans_every_round_and_apply_carries_them_all_out() {
    let _turn = ONE_CLUSTER.lock().await;
    let dir = Kept::new();
    let env = [
        ("QUIVER_CLUSTER__SHARD_COUNT", "0"),
        ("QUIVER_CLUSTER__SCHEDULE_REPLICAS", "false"),
        ("QUIVER_CLUSTER__BALANCE_LEADERS", "false"),
        ("QUIVER_CLUSTER__OPERATORS_MAX", "1"),
        ("QUIVER_CLUSTER__SECRET", TEST_CLUSTER_SECRET),
    ];
    let (_cluster, endpoint, _client) = started(dir.path(), 4, &env).await;
    wait_map(&endpoint, "the map is stored", |map| {
        map.replicated.then_some(()).ok_or("not stored".into())
    })
    .await;

    eprintln!("--- node add reserves an id, node remove gives it back");
    let out = quiverctl(
        &endpoint,
        &[
            "--json",
            "node",
            "add",
            "--addr",
            "127.0.0.1:1",
            "--peer-addr",
            "127.0.0.1:2",
            "--secret",
            TEST_CLUSTER_SECRET,
        ],
    )
    .unwrap();
    let added: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let reserved = added["node_id"].as_u64().unwrap();
    assert_eq!(reserved, 5);
    let listed = quiverctl(&endpoint, &["--json", "node", "list"]).unwrap();
    let listed: serde_json::Value = serde_json::from_str(&listed).unwrap();
    let state_of = |listed: &serde_json::Value, id: u64| {
        listed["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["node_id"] == id)
            .map(|n| n["state"].as_str().unwrap().to_owned())
    };
    assert_eq!(state_of(&listed, reserved).as_deref(), Some("joining"));
    quiverctl(&endpoint, &["node", "remove", &reserved.to_string()]).unwrap();
    let listed = quiverctl(&endpoint, &["--json", "node", "list"]).unwrap();
    let listed: serde_json::Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(state_of(&listed, reserved).as_deref(), Some("removed"));

    eprintln!("--- node 1 drains with the scheduler off: nothing moves by itself");
    quiverctl(&endpoint, &["node", "drain", "1"]).unwrap();
    let before = cluster_map(&endpoint).await.unwrap();
    let on_one = replica_counts(&before, &[1])[0] as usize;
    assert!(on_one > 0);
    let out = quiverctl(&endpoint, &["--json", "rebalance", "--dry-run"]).unwrap();
    let plan: serde_json::Value = serde_json::from_str(&out).unwrap();
    eprintln!("{out}");
    assert_eq!(plan["applied"], false);
    let operators = plan["operators"].as_array().unwrap();
    // Each of node 1's replicas moves, one per round; balancing may add
    // moves after them.
    let from_one = operators.iter().filter(|op| op["from"] == 1).count();
    assert_eq!(from_one, on_one, "{operators:?}");
    let rounds: Vec<u64> = operators
        .iter()
        .map(|op| op["round"].as_u64().unwrap())
        .collect();
    assert_eq!(rounds, (1..=rounds.len() as u64).collect::<Vec<_>>());
    let text = quiverctl(&endpoint, &["rebalance"]).unwrap();
    assert!(text.contains("round") && text.contains("dry run"), "{text}");
    let after = cluster_map(&endpoint).await.unwrap();
    assert_eq!(
        (after.version, replica_counts(&after, &[1])[0] as usize),
        (before.version, on_one),
        "a dry run changes nothing"
    );

    eprintln!("--- rebalance --apply carries every round out");
    let applying = {
        let endpoint = endpoint.clone();
        std::thread::spawn(move || quiverctl(&endpoint, &["--json", "rebalance", "--apply"]))
    };
    let mut seen_running = false;
    while !applying.is_finished() {
        let listed = quiverctl(&endpoint, &["--json", "operator", "list"]).unwrap();
        let listed: serde_json::Value = serde_json::from_str(&listed).unwrap();
        if let Some(op) = listed.as_array().unwrap().first() {
            assert_eq!(op["kind"], "move", "{listed}");
            seen_running = true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let out = applying.join().unwrap().unwrap();
    eprintln!("{out}");
    assert!(seen_running, "operator list showed the moves under way");
    let applied: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(applied["applied"], true);
    let started = applied["operators"].as_array().unwrap();
    assert!(started.len() >= on_one, "{started:?}");
    assert!(
        started.iter().all(|op| op["result"]
            .as_str()
            .unwrap()
            .starts_with("started operator")),
        "{started:?}"
    );
    let map = cluster_map(&endpoint).await.unwrap();
    settled(&map, 3, &[2, 3, 4]).unwrap();
    let out = quiverctl(&endpoint, &["--json", "rebalance"]).unwrap();
    let plan: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(plan["operators"].as_array().unwrap().len(), 0, "{out}");
}

/// Bytes balance on real nodes: 8 shards over 4 nodes, 6 replicas each, so
/// every node lacks two shards. Rows go to the two one node lacks: it holds
/// none of them and every other node both, so the scheduler swaps one of
/// them onto it for a light replica (counts stay 6 each, no split).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shard_bytes_even_out_over_the_nodes_by_a_swap() {
    let _turn = ONE_CLUSTER.lock().await;
    let dir = Kept::new();
    let env = [
        ("QUIVER_CLUSTER__SHARD_COUNT", "8"),
        ("QUIVER_CLUSTER__BALANCE_SIZE_GAP_BYTES_MIN", "1"),
        ("QUIVER_CLUSTER__LOAD_REPORT_INTERVAL_MS", "500"),
        ("QUIVER_CLUSTER__SPLIT_SHARD_BYTES_MAX", "0"),
    ];
    let (_cluster, endpoint, client) = started(dir.path(), 4, &env).await;
    let all = [1, 2, 3, 4];
    let six_each = |map: &quiver_proto::admin::GetClusterMapResponse| {
        settled(map, 3, &all)?;
        let counts = replica_counts(map, &all);
        if counts.iter().all(|&c| c == 6) {
            Ok(())
        } else {
            Err(format!("replicas per node {counts:?}"))
        }
    };
    let map = wait_map(&endpoint, "8 shards x 3 replicas, 6 per node", six_each).await;
    let lacking = |map: &quiver_proto::admin::GetClusterMapResponse, node: u64| -> Vec<u32> {
        map.shards
            .iter()
            .filter(|s| !s.replicas.iter().any(|r| r.node_id == node))
            .map(|s| s.shard)
            .collect()
    };
    let light = 1;
    let heavy = lacking(&map, light);
    assert_eq!(heavy.len(), 2, "{:?}", map.shards);
    let ranges: Vec<(u64, u64)> = map
        .shards
        .iter()
        .filter(|s| heavy.contains(&s.shard))
        .map(|s| (s.start, if s.to_end { u64::MAX } else { s.end - 1 }))
        .collect();
    let keys: Vec<String> = (0..)
        .map(|i| format!("heavy-{i}"))
        .filter(|key| {
            let hash = quiver_client::entity_hash(key);
            ranges.iter().any(|&(from, to)| (from..=to).contains(&hash))
        })
        .take(6_000)
        .collect();
    eprintln!("--- node {light} lacks shards {heavy:?}: 6,000 rows go to them");
    for chunk in keys.chunks(500) {
        retry("write the heavy rows", CONVERGE_WAIT, || {
            let mut client = client.clone();
            let values: Vec<(String, i64)> = chunk.iter().map(|k| (k.clone(), 1)).collect();
            async move { quiver_tests::counter::write_values(&mut client, &values).await }
        })
        .await;
    }
    let map = wait_map(
        &endpoint,
        "a heavy shard swapped onto the light node",
        |map| {
            six_each(map)?;
            let still = lacking(map, light);
            if heavy.iter().all(|s| still.contains(s)) {
                Err(format!("node {light} still lacks {heavy:?}"))
            } else {
                Ok(())
            }
        },
    )
    .await;
    eprintln!(
        "node {light} lacks {:?} now; replicas per node {:?}",
        lacking(&map, light),
        replica_counts(&map, &all)
    );
}
