//! Full backups of a running cluster through `quiverctl backup`: created
//! to a local directory, listed, shown and verified at both levels; a
//! flipped, truncated or deleted file is named by verify; a node killed
//! midway leaves no manifest (the backup is never listed) and the next
//! backup succeeds.

#![allow(clippy::unwrap_used, missing_docs)]

use std::path::{Path, PathBuf};
use std::process::Command;

use quiver_tests::counter::{
    CONVERGE_WAIT, LEADER_WAIT, apply_counter_view, keys, retry, start, write_values,
};
use quiver_tests::{binary, quiverctl};

const THREE_SHARDS: [(&str, &str); 1] = [("QUIVER_CLUSTER__SHARD_COUNT", "3")];

/// `quiverctl --json` with its stdout parsed.
fn ctl_json(endpoint: &str, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    serde_json::from_str(&quiverctl(endpoint, &all).unwrap()).unwrap()
}

/// `quiverctl` that may fail: (success, stdout, stderr).
fn ctl(endpoint: &str, args: &[&str]) -> (bool, String, String) {
    let output = Command::new(binary("quiverctl").unwrap())
        .arg("--endpoint")
        .arg(endpoint)
        .args(args)
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// A new, empty one-node cluster (a restore's destination), its directory
/// and its endpoint.
async fn new_cluster() -> (quiver_tests::Cluster, tempfile::TempDir, String) {
    new_cluster_of(1).await
}

/// [`new_cluster`] of `nodes` nodes.
async fn new_cluster_of(nodes: usize) -> (quiver_tests::Cluster, tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = quiver_tests::Cluster::start(dir.path(), nodes, &[])
        .await
        .unwrap();
    cluster.wait_for_leaders(LEADER_WAIT).await.unwrap();
    let endpoint = cluster.node(1).endpoint();
    (cluster, dir, endpoint)
}

/// A 3-shard cluster's settings shipping its log to `url` in 200 ms
/// rounds (idle groups every second).
fn shipping_env(url: &str) -> Vec<(&'static str, &str)> {
    vec![
        ("QUIVER_CLUSTER__SHARD_COUNT", "3"),
        ("QUIVER_BACKUP__LOG_URL", url),
        ("QUIVER_BACKUP__LOG_INTERVAL_MS", "200"),
        ("QUIVER_BACKUP__LOG_IDLE_INTERVAL_MS", "1000"),
    ]
}

/// A 3-shard cluster shipping its log (see [`shipping_env`]) to a new
/// target, with the counter view: (cluster, target directory, its URL,
/// node 1's endpoint, a client of node 1).
async fn shipping_cluster() -> (
    quiver_tests::counter::Running,
    tempfile::TempDir,
    String,
    String,
    quiver_tests::Client,
) {
    let target_dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", target_dir.path().join("t").display());
    let mut cluster = start(&shipping_env(&url)).await;
    let endpoint = cluster.node(1).endpoint();
    let client = cluster.node(1).client().await.unwrap();
    apply_counter_view(&client).await;
    (cluster, target_dir, url, endpoint, client)
}

/// Asserts that every one of `keys` has a value, read STRONG.
async fn assert_all_present(client: &mut quiver_tests::Client, keys: &[String]) {
    let (values, _) =
        quiver_tests::counter::read_values(client, keys, quiver_proto::v1::Consistency::Strong)
            .await
            .unwrap();
    assert!(values.iter().all(Option::is_some), "{values:?}");
}

/// Writes `count` rows (value = index + 1) in batches.
async fn write_rows(client: &quiver_tests::Client, prefix: &str, count: usize) {
    let values: Vec<(String, i64)> = keys(count, prefix)
        .into_iter()
        .enumerate()
        .map(|(i, k)| (k, i as i64 + 1))
        .collect();
    for batch in values.chunks(50) {
        retry("write rows", LEADER_WAIT, || {
            let mut client = client.clone();
            async move { write_values(&mut client, batch).await }
        })
        .await;
    }
}

/// The uploaded files of one backup, largest first.
fn uploaded(target: &Path, id: &str) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let shards = target.join("backups").join(id).join("shards");
    for shard in std::fs::read_dir(shards).unwrap() {
        for file in std::fs::read_dir(shard.unwrap().path()).unwrap() {
            files.push(file.unwrap().path());
        }
    }
    files.sort_by_key(|f| std::cmp::Reverse(std::fs::metadata(f).unwrap().len()));
    files
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_is_listed_shown_verified_and_its_damage_named() {
    let mut cluster = start(&THREE_SHARDS).await;
    let endpoint = cluster.node(1).endpoint();
    let client = cluster.node(1).client().await.unwrap();
    apply_counter_view(&client).await;
    write_rows(&client, "backup", 200).await;
    let target_dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", target_dir.path().join("backups").display());

    eprintln!("--- a backup of the running cluster");
    let first = ctl_json(&endpoint, &["backup", "create", &url]);
    let id = first["backup_id"].as_str().unwrap().to_owned();
    assert_eq!(first["shards"], 3, "{first}");
    assert_eq!(first["rows"], 200, "{first}");
    let listed = ctl_json(&endpoint, &["backup", "list", &url]);
    assert_eq!(listed.as_array().unwrap().len(), 1);
    assert_eq!(listed[0]["backup_id"], id.as_str());
    assert!(listed[0]["consistent_at_us"].as_i64().unwrap() > 0);

    let manifest = ctl_json(&endpoint, &["backup", "show", &url, &id]);
    let shards = manifest["shards"].as_array().unwrap();
    assert_eq!(shards.len(), 3);
    let rows: u64 = shards
        .iter()
        .map(|s| s["record"]["rows"].as_u64().unwrap())
        .sum();
    assert_eq!(rows, 200);
    assert_eq!(manifest["metadata"]["group"], 0);
    for shard in shards {
        assert!(shard["record"]["applied"]["index"].as_u64().unwrap() > 0);
        assert!(
            shard["record"]["files"]
                .as_array()
                .unwrap()
                .iter()
                .all(|f| f["sha256"].as_str().unwrap().len() == 64)
        );
    }
    let table = quiverctl(&endpoint, &["backup", "show", &url, &id]).unwrap();
    assert!(table.contains("metadata"), "{table}");

    eprintln!("--- verified at both levels, through another node");
    let other = cluster.node(2).endpoint();
    let files = ctl_json(&other, &["backup", "verify", &url, &id]);
    assert_eq!(files["problems"].as_array().unwrap().len(), 0, "{files}");
    assert!(files["files_checked"].as_u64().unwrap() >= 4 * 3);
    let data = ctl_json(&other, &["backup", "verify", &url, &id, "--data"]);
    assert_eq!(data["shards_restored"], 4, "{data}");

    eprintln!("--- a second backup after more writes");
    write_rows(&client, "later", 50).await;
    let second = ctl_json(&endpoint, &["backup", "create", &url]);
    assert_eq!(second["rows"], 250, "{second}");
    let second_id = second["backup_id"].as_str().unwrap().to_owned();
    let listed = ctl_json(&endpoint, &["backup", "list", &url]);
    let ids: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["backup_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![id.as_str(), second_id.as_str()], "oldest first");

    eprintln!("--- damage is named by verify, file by file");
    let target = target_dir.path().join("backups");
    let victims = uploaded(&target, &id);
    let (flipped, truncated, deleted) = (&victims[0], &victims[1], &victims[2]);
    let mut bytes = std::fs::read(flipped).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x10;
    std::fs::write(flipped, &bytes).unwrap();
    let bytes = std::fs::read(truncated).unwrap();
    std::fs::write(truncated, &bytes[..bytes.len() - 1]).unwrap();
    std::fs::remove_file(deleted).unwrap();
    let (ok, stdout, stderr) = ctl(&endpoint, &["backup", "verify", &url, &id]);
    assert!(!ok, "a damaged backup fails verify: {stdout}");
    assert!(stderr.contains("damaged"), "{stderr}");
    for (file, what) in [
        (flipped, "does not match"),
        (truncated, "bytes, the manifest says"),
        (deleted, "missing"),
    ] {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            stdout
                .lines()
                .any(|l| l.starts_with("PROBLEM") && l.contains(&name) && l.contains(what)),
            "{name} ({what}) not named:\n{stdout}"
        );
    }
    // The other backup shares nothing with it.
    let fine = ctl_json(&endpoint, &["backup", "verify", &url, &second_id, "--data"]);
    assert_eq!(fine["problems"].as_array().unwrap().len(), 0, "{fine}");

    eprintln!("--- bad targets and ids are refused with a reason");
    let data_dir = cluster.node(1).data_dir().display().to_string();
    for (args, expected) in [
        (vec!["backup", "create", "relative/dir"], "scheme"),
        (vec!["backup", "create", "file://relative"], "absolute"),
        (
            vec!["backup", "create", &format!("file://{data_dir}/inside")],
            "data directory",
        ),
        (vec!["backup", "show", &url, "../etc"], "not a backup id"),
        (
            vec!["backup", "show", &url, "20990101T000000000Z-00000000"],
            "no complete backup",
        ),
    ] {
        let (ok, _, stderr) = ctl(&endpoint, &args);
        assert!(!ok && stderr.contains(expected), "{args:?}: {stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_killed_midway_leave_no_backup_and_the_next_one_succeeds() {
    // Armed once each: the node uploading a shard's first file dies (its
    // coordinator then asks another replica), and the coordinator dies
    // after recording its first shard. The backup cannot complete.
    let once = tempfile::tempdir().unwrap();
    let once_dir = once.path().display().to_string();
    let mut cluster = start(&[
        THREE_SHARDS[0],
        (
            "QUIVER_TEST_FAILPOINTS",
            "backup.file_uploaded,backup.shard_recorded",
        ),
        ("QUIVER_TEST_FAILPOINTS_ONCE_DIR", &once_dir),
    ])
    .await;
    let client = cluster.node(2).client().await.unwrap();
    apply_counter_view(&client).await;
    write_rows(&client, "kill", 120).await;
    let target_dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", target_dir.path().join("t").display());

    let (ok, _, stderr) = ctl(&cluster.node(1).endpoint(), &["backup", "create", &url]);
    assert!(!ok, "the backup cannot complete: its coordinator died");
    eprintln!(
        "backup failed as it should: {}",
        stderr.lines().next().unwrap_or("")
    );
    assert!(!cluster.node(1).is_running(), "the coordinator aborted");
    let dead: Vec<u64> = (1..=3)
        .filter(|&id| !cluster.node(id).is_running())
        .collect();
    eprintln!("nodes {dead:?} aborted midway");
    let alive = (1..=3).find(|id| !dead.contains(id)).unwrap();
    let alive_endpoint = cluster.node(alive).endpoint();
    let listed = ctl_json(&alive_endpoint, &["backup", "list", &url]);
    assert_eq!(listed, serde_json::json!([]), "no manifest, not listed");
    let partial = target_dir.path().join("t").join("backups");
    assert!(
        std::fs::read_dir(&partial).unwrap().count() >= 1,
        "files were uploaded before the crash"
    );

    eprintln!("--- the nodes restart (staging cleaned); the next backup succeeds");
    for &id in &dead {
        cluster.node(id).restart().await.unwrap();
        assert!(
            !cluster.node(id).data_dir().join("backup-staging").exists(),
            "node {id} cleaned its staging"
        );
    }
    cluster.wait_for_leaders(LEADER_WAIT).await.unwrap();
    let endpoint = cluster.node(1).endpoint();
    let backup = retry("a backup after the restart", CONVERGE_WAIT, || {
        let (endpoint, url) = (endpoint.clone(), url.clone());
        async move {
            let (ok, stdout, stderr) = ctl(&endpoint, &["--json", "backup", "create", &url]);
            if ok {
                Ok(serde_json::from_str::<serde_json::Value>(&stdout).unwrap())
            } else {
                Err(stderr)
            }
        }
    })
    .await;
    assert_eq!(backup["rows"], 120, "{backup}");
    let listed = ctl_json(&endpoint, &["backup", "list", &url]);
    assert_eq!(listed.as_array().unwrap().len(), 1);
    let id = backup["backup_id"].as_str().unwrap();
    let verified = ctl_json(&endpoint, &["backup", "verify", &url, id, "--data"]);
    assert_eq!(
        verified["problems"].as_array().unwrap().len(),
        0,
        "{verified}"
    );
    assert_eq!(verified["shards_restored"], 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_view_deleted_by_mistake_comes_back_from_a_backup_in_a_new_cluster() {
    use quiver_proto::v1 as pb;
    use quiver_tests::counter::read_values;

    let mut cluster = start(&THREE_SHARDS).await;
    let endpoint = cluster.node(1).endpoint();
    let mut client = cluster.node(1).client().await.unwrap();
    apply_counter_view(&client).await;
    write_rows(&client, "restore", 150).await;
    let all = keys(150, "restore");
    let deleted: Vec<String> = all[..10].to_vec();
    client
        .delete(pb::DeleteRequest {
            view: "counter".into(),
            entity_keys: deleted.clone(),
        })
        .await
        .unwrap();
    let target_dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", target_dir.path().join("t").display());
    let backup = ctl_json(&endpoint, &["backup", "create", &url]);
    let id = backup["backup_id"].as_str().unwrap().to_owned();

    eprintln!("--- the view is deleted by mistake");
    client
        .delete_feature_view(pb::DeleteFeatureViewRequest {
            name: "counter".into(),
        })
        .await
        .unwrap();

    eprintln!("--- restored into a new one-node cluster");
    let (mut restored, _new_dir, new_endpoint) = new_cluster().await;
    let report = ctl_json(&new_endpoint, &["restore", "--from", &url]);
    assert_eq!(report["backup_id"], id.as_str(), "the newest by default");
    assert_eq!(report["views"], 1, "{report}");
    assert_eq!(report["rows_restored"], 140, "{report}");
    assert_eq!(report["tombstones_skipped"], 10, "{report}");
    let mut new_client = restored.node(1).client().await.unwrap();
    let (values, _) = read_values(&mut new_client, &all, pb::Consistency::Strong)
        .await
        .unwrap();
    for (i, (key, value)) in all.iter().zip(&values).enumerate() {
        let expected = (i >= 10).then_some(i as i64 + 1);
        assert_eq!(*value, expected, "{key}");
    }

    eprintln!("--- the restored cluster holds what the backup does, by content");
    let checksum = ctl_json(&new_endpoint, &["checksum"]);
    assert_eq!(checksum["rows"], 140, "{checksum}");
    assert_eq!(
        checksum["sum"], report["content_sum"],
        "{checksum} {report}"
    );
    // A write changes it.
    write_values(&mut new_client, &[(all[20].clone(), 999)])
        .await
        .unwrap();
    let changed = ctl_json(&new_endpoint, &["checksum"]);
    assert_eq!(changed["rows"], 140);
    assert_ne!(changed["sum"], checksum["sum"]);

    eprintln!("--- a drill restores it into a scratch node and compares");
    let scratch = tempfile::tempdir().unwrap();
    let scratch_arg = scratch.path().to_str().unwrap();
    let drill = ctl_json(
        &endpoint,
        &["backup", "drill", &url, "--scratch-dir", scratch_arg],
    );
    assert_eq!(drill["passed"], true, "{drill}");
    assert_eq!(drill["backup_id"], id.as_str());
    assert_eq!(drill["found"]["rows"], 140, "{drill}");
    assert_eq!(drill["found"]["sum"], checksum["sum"], "{drill}");
    assert_eq!(
        std::fs::read_dir(scratch.path()).unwrap().count(),
        0,
        "a passed drill cleans up"
    );

    eprintln!("--- never over a cluster that holds views");
    let (ok, _, stderr) = ctl(&new_endpoint, &["restore", "--from", &url, "--backup", &id]);
    assert!(!ok && stderr.contains("new, empty"), "{stderr}");

    eprintln!("--- a damaged backup changes nothing");
    let victim = uploaded(&target_dir.path().join("t"), &id)[0].clone();
    let mut bytes = std::fs::read(&victim).unwrap();
    bytes[7] ^= 0x01;
    std::fs::write(&victim, &bytes).unwrap();
    let (_other, _other_dir, other_endpoint) = new_cluster().await;
    let (ok, stdout, _) = ctl(&other_endpoint, &["backup", "verify", &url, &id]);
    assert!(!ok, "verify names it: {stdout}");
    let (ok, _, stderr) = ctl(
        &other_endpoint,
        &["restore", "--from", &url, "--backup", &id],
    );
    assert!(!ok && stderr.contains("not restored"), "{stderr}");
    let views = quiverctl(&other_endpoint, &["--json", "views", "list"]).unwrap();
    assert!(!views.contains("counter"), "nothing applied: {views}");
    let (ok, _, stderr) = ctl(
        &endpoint,
        &["backup", "drill", &url, "--scratch-dir", scratch_arg],
    );
    assert!(
        !ok && stderr.contains("drill FAILED") && stderr.contains("not restored"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read_dir(scratch.path()).unwrap().count(),
        1,
        "a failed drill keeps its scratch directory and the node's log"
    );
}

/// Microseconds since the epoch, by this machine's clock (the nodes'
/// leader clocks: they run here).
fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64
}

/// A time as `--to-time` takes it.
fn rfc3339(us: i64) -> String {
    humantime::format_rfc3339_micros(
        std::time::UNIX_EPOCH + std::time::Duration::from_micros(us as u64),
    )
    .to_string()
}

/// Waits until `backup status` says the cluster is restorable to `us`.
async fn wait_restorable(endpoint: &str, url: &str, us: i64) -> serde_json::Value {
    retry("the shipped log reaches the time", CONVERGE_WAIT, || {
        // The target appears with the first chunk shipped.
        let (ok, stdout, stderr) = ctl(endpoint, &["--json", "backup", "status", url]);
        async move {
            if !ok {
                return Err(stderr);
            }
            let status: serde_json::Value = serde_json::from_str(&stdout).unwrap();
            if status["restorable_until_us"].as_i64().unwrap() >= us {
                Ok(status)
            } else {
                Err(format!("{status}"))
            }
        }
    })
    .await
}

/// One acknowledged write of the ledger: `key` = `value`, and `hot` =
/// `value` in the same request, sent at `sent_us` and acknowledged at
/// `acked_us`.
struct Acked {
    key: String,
    value: i64,
    sent_us: i64,
    acked_us: i64,
    /// How far behind the leaders' clocks were when it was sent: a leader
    /// time cut may take in writes sent this long after it.
    slack_us: i64,
}

/// Restores `url` to `to` (an RFC 3339 time or `latest`) into a new
/// one-node cluster and returns the report and a client of it.
async fn restore_into_new_cluster(
    url: &str,
    to: &str,
) -> (
    serde_json::Value,
    quiver_tests::Client,
    quiver_tests::Cluster,
    tempfile::TempDir,
) {
    let (mut cluster, dir, endpoint) = new_cluster().await;
    let report = ctl_json(&endpoint, &["restore", "--from", url, "--to-time", to]);
    let client = cluster.node(1).client().await.unwrap();
    (report, client, cluster, dir)
}

/// Checks a cluster restored to `until_us` against the ledger: every write
/// acknowledged by then is there, none sent after it is, and `hot` holds a
/// value between the last acknowledged and the last sent by then.
async fn check_restored_at(
    client: &mut quiver_tests::Client,
    before: &[String],
    ledger: &[Acked],
    until_us: i64,
) {
    use quiver_proto::v1 as pb;
    use quiver_tests::counter::read_values;

    let (values, _) = read_values(client, before, pb::Consistency::Strong)
        .await
        .unwrap();
    for (i, (key, value)) in before.iter().zip(&values).enumerate() {
        assert_eq!(
            *value,
            Some(i as i64 + 1),
            "{key}, written before the backup"
        );
    }
    let keys: Vec<String> = ledger.iter().map(|a| a.key.clone()).collect();
    let (values, _) = read_values(client, &keys, pb::Consistency::Strong)
        .await
        .unwrap();
    let mut present = 0;
    for (acked, value) in ledger.iter().zip(&values) {
        if acked.acked_us <= until_us {
            assert_eq!(
                *value,
                Some(acked.value),
                "{} acknowledged before the time",
                acked.key
            );
        } else if acked.sent_us > until_us + acked.slack_us {
            assert_eq!(*value, None, "{} sent after the time", acked.key);
        }
        present += usize::from(value.is_some());
    }
    let (hot, _) = read_values(client, &["hot".to_owned()], pb::Consistency::Strong)
        .await
        .unwrap();
    let low = ledger
        .iter()
        .filter(|a| a.acked_us <= until_us)
        .map(|a| a.value)
        .max();
    let high = ledger
        .iter()
        .filter(|a| a.sent_us <= until_us + a.slack_us)
        .map(|a| a.value)
        .max();
    assert!(
        hot[0] >= low && hot[0] <= high,
        "hot = {:?}, between {low:?} and {high:?}",
        hot[0]
    );
    eprintln!(
        "restored to {}: {present} of {} ledger writes, hot = {:?}",
        rfc3339(until_us),
        ledger.len(),
        hot[0]
    );
}

/// The test-only wall-clock skew file of a node (see `quiverd`'s
/// `QUIVER_TEST_CLOCK_SKEW_FILE`).
const CLOCK_SKEW_FILE: &str = "clock-skew-us";
/// How far node 2's clock runs behind while it leads.
const SLOW_CLOCK_US: i64 = -2_000_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_comes_back_as_it_was_at_any_time_from_a_backup_and_its_shipped_log() {
    use quiver_proto::v1 as pb;

    let target_dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", target_dir.path().join("t").display());
    let mut env = shipping_env(&url);
    env.push(("QUIVER_TEST_CLOCK_SKEW_FILE", CLOCK_SKEW_FILE));
    let mut cluster = start(&env).await;
    let endpoint = cluster.node(1).endpoint();
    let client = cluster.node(1).client().await.unwrap();
    apply_counter_view(&client).await;
    write_rows(&client, "before", 100).await;
    let before = keys(100, "before");
    wait_restorable(&endpoint, &url, now_us()).await;
    let backup = ctl_json(&endpoint, &["backup", "create", &url]);
    eprintln!("--- backup {} taken; writes go on", backup["backup_id"]);

    let mut ledger = Vec::new();
    let mut slack_us = 0;
    for (i, key) in keys(120, "after").into_iter().enumerate() {
        if i == 60 {
            eprintln!("--- every leader moves to node 2, whose clock is 2 s slow");
            let skew = cluster.node(2).data_dir().join(CLOCK_SKEW_FILE);
            std::fs::write(&skew, SLOW_CLOCK_US.to_string()).unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            slack_us = -SLOW_CLOCK_US;
            for group in 0..=3 {
                retry("transfer a leader", LEADER_WAIT, || {
                    let (ok, out, err) = ctl(
                        &endpoint,
                        &["shard", "transfer-leader", &group.to_string(), "--to", "2"],
                    );
                    async move { if ok { Ok(out) } else { Err(err) } }
                })
                .await;
            }
        }
        let value = i as i64 + 1;
        let sent_us = now_us();
        let batch = vec![(key.clone(), value), ("hot".to_owned(), value)];
        retry("write", LEADER_WAIT, || {
            let (mut client, batch) = (client.clone(), batch.clone());
            async move { write_values(&mut client, &batch).await }
        })
        .await;
        ledger.push(Acked {
            key,
            value,
            sent_us,
            acked_us: now_us(),
            slack_us,
        });
        if i % 40 == 39 {
            // Idle gaps in the stream.
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        }
    }
    let middle = ledger[30].acked_us;
    let after_the_move = ledger[90].acked_us;
    // Back in time before the mistake: a deletion stamped by a slow clock
    // counts as made earlier (docs/operations.md).
    std::fs::write(cluster.node(2).data_dir().join(CLOCK_SKEW_FILE), "0").unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;

    eprintln!("--- the view is deleted by mistake");
    let mistake_us = now_us();
    let mut client = client.clone();
    client
        .delete_feature_view(pb::DeleteFeatureViewRequest {
            name: "counter".into(),
        })
        .await
        .unwrap();
    let one_second_before = mistake_us - 1_000_000;
    let just_before = mistake_us - 1_000;
    let status = wait_restorable(&endpoint, &url, mistake_us + 1_000).await;
    assert_eq!(status["groups"].as_array().unwrap().len(), 4, "{status}");

    for until_us in [middle, after_the_move, one_second_before, just_before] {
        eprintln!("--- restored to {}", rfc3339(until_us));
        let (report, mut restored, _cluster, _dir) =
            restore_into_new_cluster(&url, &rfc3339(until_us)).await;
        assert_eq!(report["views"], 1, "{report}");
        assert_eq!(report["restored_to_us"], until_us, "{report}");
        assert!(
            report["log_entries_replayed"].as_u64().unwrap() > 0,
            "{report}"
        );
        check_restored_at(&mut restored, &before, &ledger, until_us).await;
    }

    eprintln!("--- the latest time holds the mistake: no view");
    let (report, _, mut restored, _dir) = restore_into_new_cluster(&url, "latest").await;
    assert_eq!(report["views"], 0, "{report}");
    assert!(
        report["restored_to_us"].as_i64().unwrap() >= mistake_us,
        "{report}"
    );

    eprintln!("--- the restored cluster backs up to the same target: say which cluster");
    let restored_endpoint = restored.node(1).endpoint();
    ctl_json(&restored_endpoint, &["backup", "create", &url]);
    let source = status["cluster_id"].as_str().unwrap();
    let (_again, _again_dir, again_endpoint) = new_cluster().await;
    let (ok, _, stderr) = ctl(
        &again_endpoint,
        &["restore", "--from", &url, "--to-time", "latest"],
    );
    assert!(!ok && stderr.contains("--cluster-id"), "{stderr}");
    let report = ctl_json(
        &again_endpoint,
        &[
            "restore",
            "--from",
            &url,
            "--to-time",
            &rfc3339(just_before),
            "--cluster-id",
            source,
        ],
    );
    assert_eq!(report["views"], 1, "{report}");

    eprintln!("--- a time the shipped log does not reach writes nothing");
    let (_other, _dir, other_endpoint) = new_cluster().await;
    let future = rfc3339(now_us() + 3_600_000_000);
    let (ok, _, stderr) = ctl(
        &other_endpoint,
        &[
            "restore",
            "--from",
            &url,
            "--to-time",
            &future,
            "--cluster-id",
            source,
        ],
    );
    assert!(!ok && stderr.contains("not restorable"), "{stderr}");
    let views = quiverctl(&other_endpoint, &["--json", "views", "list"]).unwrap();
    assert!(!views.contains("counter"), "nothing applied: {views}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shipping_resumes_where_it_stopped_when_a_stalled_target_returns() {
    let target_dir = tempfile::tempdir().unwrap();
    let target = target_dir.path().join("t");
    let url = format!("file://{}", target.display());
    let env = shipping_env(&url);
    let mut cluster = start(&env).await;
    let endpoint = cluster.node(1).endpoint();
    let client = cluster.node(1).client().await.unwrap();
    apply_counter_view(&client).await;
    write_rows(&client, "first", 50).await;
    wait_restorable(&endpoint, &url, now_us()).await;
    ctl_json(&endpoint, &["backup", "create", &url]);

    eprintln!("--- the target stalls (its directory replaced by a file)");
    let away = target_dir.path().join("away");
    std::fs::rename(&target, &away).unwrap();
    std::fs::write(&target, b"not a directory").unwrap();
    let stalled_at = now_us();
    write_rows(&client, "second", 80).await;
    let written_at = now_us();
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let (ok, _, _) = ctl(&endpoint, &["backup", "status", &url]);
    assert!(!ok, "no status from a stalled target");

    eprintln!("--- it returns: shipping resumes where it stopped");
    std::fs::remove_file(&target).unwrap();
    std::fs::rename(&away, &target).unwrap();
    let status = wait_restorable(&endpoint, &url, written_at).await;
    assert!(status["restorable_until_us"].as_i64().unwrap() > stalled_at);
    eprintln!("--- restored into a new 5-node cluster");
    let (mut five, _five_dir, five_endpoint) = new_cluster_of(5).await;
    let report = ctl_json(
        &five_endpoint,
        &["restore", "--from", &url, "--to-time", "latest"],
    );
    assert_eq!(report["rows_restored"], 130, "{report}");
    let mut restored = five.node(5).client().await.unwrap();
    let all: Vec<String> = keys(50, "first")
        .into_iter()
        .chain(keys(80, "second"))
        .collect();
    assert_all_present(&mut restored, &all).await;
    let checksum = ctl_json(&five_endpoint, &["checksum"]);
    assert_eq!(checksum["rows"], 130, "{checksum}");
    assert_eq!(
        checksum["sum"], report["content_sum"],
        "{checksum} {report}"
    );

    eprintln!("--- a drill replays the shipped log the same way");
    let drill = ctl_json(&endpoint, &["backup", "drill", &url, "--to-time", "latest"]);
    assert_eq!(drill["passed"], true, "{drill}");
    assert!(
        drill["log_entries_replayed"].as_u64().unwrap() > 0,
        "{drill}"
    );
    assert_eq!(drill["found"]["sum"], checksum["sum"], "{drill}");

    eprintln!("--- a damaged shipped log: verify names it, a restore refuses");
    let id = ctl_json(&endpoint, &["backup", "list", &url])[0]["backup_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let verified = ctl_json(&endpoint, &["backup", "verify", &url, &id]);
    assert!(
        verified["log_chunks_checked"].as_u64().unwrap() > 0,
        "{verified}"
    );
    assert!(
        verified["log_reaches_us"].as_i64().unwrap() > written_at,
        "{verified}"
    );
    let victim = chunk_after_backup(&endpoint, &url, &target, &id);
    let original = std::fs::read(&victim).unwrap();
    let name = victim.file_name().unwrap().to_str().unwrap().to_owned();
    let (_empty, _empty_dir, empty_endpoint) = new_cluster().await;
    let flipped = {
        let mut bytes = original.clone();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0x10;
        bytes
    };
    let reach = verified["log_reaches_us"].as_i64().unwrap();
    let damages: [(&str, Option<Vec<u8>>, &str); 3] = [
        ("flipped", Some(flipped), name.as_str()),
        (
            "truncated",
            Some(original[..original.len() / 2].to_vec()),
            name.as_str(),
        ),
        ("deleted", None, "gap"),
    ];
    for (damage, bytes, named) in damages {
        match bytes {
            Some(bytes) => std::fs::write(&victim, bytes).unwrap(),
            None => std::fs::remove_file(&victim).unwrap(),
        }
        let (ok, stdout, _) = ctl(&endpoint, &["backup", "verify", &url, &id]);
        if damage != "deleted" {
            assert!(!ok && stdout.contains(named), "{damage}: {stdout}");
        } else {
            // A gap is not damage: the backup is intact, restorable to a
            // time only up to the gap.
            assert!(ok && stdout.contains(named), "{damage}: {stdout}");
            let gapped = ctl_json(&endpoint, &["backup", "verify", &url, &id]);
            assert_eq!(gapped["log_gaps"].as_array().unwrap().len(), 1, "{gapped}");
            let reach_gapped = gapped["log_reaches_us"].as_i64().unwrap();
            assert!(reach_gapped < reach, "{gapped} (was {reach})");
        }
        let (ok, _, stderr) = ctl(
            &empty_endpoint,
            &["restore", "--from", &url, "--to-time", "latest"],
        );
        assert!(!ok && stderr.contains(named), "{damage}: {stderr}");
        std::fs::write(&victim, &original).unwrap();
    }
    let views = quiverctl(&empty_endpoint, &["--json", "views", "list"]).unwrap();
    assert!(!views.contains("counter"), "nothing restored: {views}");
    let verified = ctl_json(&endpoint, &["backup", "verify", &url, &id]);
    assert_eq!(
        verified["problems"].as_array().unwrap().len(),
        0,
        "{verified}"
    );
}

/// A shipped chunk of backup `id`'s first shard that a restore to the
/// latest time replays (after the backup's position) and that is not the
/// shard's last chunk (deleting it leaves a gap).
fn chunk_after_backup(endpoint: &str, url: &str, target: &Path, id: &str) -> PathBuf {
    let manifest = ctl_json(endpoint, &["backup", "show", url, id]);
    let record = &manifest["shards"][0]["record"];
    let group = record["group"].as_u64().unwrap();
    let applied = record["applied"]["index"].as_u64().unwrap();
    let cluster = manifest["cluster_id"].as_str().unwrap();
    let chunks = group_chunks(target, cluster, group);
    let after: Vec<_> = chunks
        .iter()
        .filter(|(from, _, _)| *from >= applied)
        .collect();
    assert!(after.len() >= 2, "chunks after index {applied}: {chunks:?}");
    after[0].2.clone()
}

/// Group `group`'s shipped chunk files at `target` with the indexes their
/// names give, `(from, next, path)`, by first index.
fn group_chunks(target: &Path, cluster: &str, group: u64) -> Vec<(u64, u64, PathBuf)> {
    let dir = target
        .join("log")
        .join(cluster)
        .join(format!("g{group:010}"));
    let mut chunks: Vec<(u64, u64, PathBuf)> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter_map(|path| {
            let name = path
                .file_name()?
                .to_str()?
                .strip_suffix(".chunk")?
                .to_owned();
            let (from, next) = name.split_once('-')?;
            Some((from.parse().ok()?, next.parse().ok()?, path))
        })
        .collect();
    chunks.sort();
    chunks
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_backups_come_on_time_and_prune_keeps_what_a_restore_needs() {
    let target_dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", target_dir.path().join("t").display());
    let mut env = shipping_env(&url);
    env.push(("QUIVER_BACKUP__SCHEDULE_URL", url.as_str()));
    env.push(("QUIVER_BACKUP__FULL_INTERVAL_SECONDS", "10"));
    let mut cluster = start(&env).await;
    let endpoint = cluster.node(1).endpoint();
    let client = cluster.node(1).client().await.unwrap();
    apply_counter_view(&client).await;
    let backups = |count: usize| {
        let (endpoint, url) = (endpoint.clone(), url.clone());
        retry("scheduled backups", CONVERGE_WAIT, move || {
            let (ok, stdout, stderr) = ctl(&endpoint, &["--json", "backup", "list", &url]);
            async move {
                if !ok {
                    return Err(stderr);
                }
                let listed: serde_json::Value = serde_json::from_str(&stdout).unwrap();
                let listed = listed.as_array().unwrap().clone();
                if listed.len() >= count {
                    Ok(listed)
                } else {
                    Err(stdout)
                }
            }
        })
    };
    write_rows(&client, "a", 50).await;
    let first = backups(1).await;
    eprintln!(
        "--- the first scheduled backup came at once: {}",
        first[0]["backup_id"]
    );
    write_rows(&client, "b", 50).await;
    let before_second = now_us();
    let second = backups(2).await;
    let gap_us =
        second[1]["started_at_us"].as_i64().unwrap() - second[0]["started_at_us"].as_i64().unwrap();
    assert!(
        gap_us >= 10_000_000,
        "one per full_interval_seconds: {gap_us} µs apart"
    );
    write_rows(&client, "c", 50).await;
    wait_restorable(&endpoint, &url, now_us()).await;

    eprintln!("--- prune to a 1 s window: only the newest backup and what it needs stay");
    // A retired cluster's log: named by no backup, shipped long ago.
    let retired = target_dir.path().join("t/log/0123456789abcdef/g0000000001");
    std::fs::create_dir_all(&retired).unwrap();
    std::fs::write(
        retired.join("LATEST"),
        r#"{"chunk":"x","next":{"log_id":null,"leader_ts_us":5},"shipped_at_us":5}"#,
    )
    .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let dry = ctl_json(
        &endpoint,
        &["backup", "prune", &url, "--retention", "1s", "--dry-run"],
    );
    let pruned = ctl_json(&endpoint, &["backup", "prune", &url, "--retention", "1s"]);
    // (The schedule may have taken a third backup meanwhile: then the
    // second is the newest before the window, and kept.)
    assert_eq!(
        dry["deleted"], pruned["deleted"],
        "a dry run says what a prune does"
    );
    let deleted = pruned["deleted"][0].as_str().unwrap();
    assert_eq!(deleted, first[0]["backup_id"].as_str().unwrap(), "{pruned}");
    assert!(pruned["kept"].as_array().unwrap().len() <= 2, "{pruned}");
    assert!(pruned["chunks_deleted"].as_u64().unwrap() > 0, "{pruned}");
    assert_eq!(
        pruned["retired_logs_deleted"][0], "0123456789abcdef",
        "{pruned}"
    );
    assert!(!retired.exists());
    let left = ctl_json(&endpoint, &["backup", "list", &url]);
    assert!(!left.to_string().contains(deleted), "{left}");
    assert!(
        !target_dir.path().join("t/backups").join(deleted).exists(),
        "its files are gone too"
    );

    eprintln!("--- the newest backup and the log left restore the latest time");
    let (report, mut restored, _cluster, _dir) = restore_into_new_cluster(&url, "latest").await;
    assert_eq!(report["rows_restored"], 150, "{report}");
    let all: Vec<String> = ["a", "b", "c"].iter().flat_map(|p| keys(50, p)).collect();
    assert_all_present(&mut restored, &all).await;

    eprintln!("--- a time before the kept backup is no longer restorable");
    let (_other, _other_dir, other_endpoint) = new_cluster().await;
    let (ok, _, stderr) = ctl(
        &other_endpoint,
        &[
            "restore",
            "--from",
            &url,
            "--to-time",
            &rfc3339(before_second),
        ],
    );
    assert!(!ok && stderr.contains("at or before"), "{stderr}");
}

/// Groups of a node's `status --json` holding the log for log shipping.
fn groups_held(endpoint: &str) -> Vec<u64> {
    let status = ctl_json(endpoint, &["status"]);
    status["groups"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|g| g["log_holds"].get("backup-log").is_some())
        .map(|g| g["group"].as_u64().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn turning_log_shipping_off_releases_the_log_holds() {
    let (mut cluster, _target_dir, url, endpoint, client) = shipping_cluster().await;
    write_rows(&client, "held", 30).await;
    wait_restorable(&endpoint, &url, now_us()).await;
    // Holds are replicated state: every replica of every group has one.
    for id in 1..=3 {
        let held = groups_held(&cluster.node(id).endpoint());
        assert_eq!(held.len(), 4, "node {id}: {held:?}");
    }

    eprintln!("--- node 1 restarts without backup.log_url and leads every group");
    let node = cluster.node(1);
    node.set_env("QUIVER_BACKUP__LOG_URL", None);
    node.restart().await.unwrap();
    let endpoint = cluster.node(1).endpoint();
    for group in 0..=3 {
        let group = group.to_string();
        retry("node 1 leads the group", CONVERGE_WAIT, || {
            let answer = quiverctl(
                &endpoint,
                &["shard", "transfer-leader", &group, "--to", "1"],
            );
            async move { answer.map(drop).map_err(|e| e.to_string()) }
        })
        .await;
    }
    // Past 10 idle intervals (1 s here): its peers still ship, so it keeps
    // the holds a shipper needs when it leads again.
    tokio::time::sleep(std::time::Duration::from_secs(13)).await;
    let led = ctl_json(&endpoint, &["status"])["groups"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|g| g["role"] == "leader")
        .count();
    assert!(led > 0, "node 1 leads a group");
    assert_eq!(groups_held(&endpoint).len(), 4, "kept while peers ship");

    eprintln!("--- nodes 2 and 3 restart without backup.log_url");
    for id in 2..=3 {
        let node = cluster.node(id);
        node.set_env("QUIVER_BACKUP__LOG_URL", None);
        node.restart().await.unwrap();
    }
    // Released after 10 idle intervals (1 s here) standing still.
    let endpoints: Vec<String> = (1..=3).map(|id| cluster.node(id).endpoint()).collect();
    retry("every log hold released", CONVERGE_WAIT, || {
        let held: Vec<Vec<u64>> = endpoints.iter().map(|e| groups_held(e)).collect();
        async move {
            if held.iter().all(Vec::is_empty) {
                Ok(())
            } else {
                Err(format!("still held: {held:?}"))
            }
        }
    })
    .await;
    let mut client = cluster.node(2).client().await.unwrap();
    assert_all_present(&mut client, &keys(30, "held")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_to_a_time_replays_a_split_made_after_the_backup() {
    let (_cluster, target_dir, url, endpoint, client) = shipping_cluster().await;
    write_rows(&client, "before", 60).await;
    wait_restorable(&endpoint, &url, now_us()).await;
    let backup = ctl_json(&endpoint, &["backup", "create", &url]);
    let id = backup["backup_id"].as_str().unwrap().to_owned();
    write_rows(&client, "after-backup", 60).await;
    let before_split = now_us();

    eprintln!("--- shard 1 splits, and writes go on into both halves");
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    quiverctl(&endpoint, &["shard", "split", "1", "--wait"]).unwrap();
    let after_split = now_us();
    write_rows(&client, "after-split", 60).await;
    let source = ctl_json(&endpoint, &["checksum"]);
    assert_eq!(source["shards"].as_array().unwrap().len(), 4, "{source}");
    wait_restorable(&endpoint, &url, now_us()).await;

    eprintln!("--- restored to the latest time: the split is replayed");
    let (mut latest, _latest_dir, latest_endpoint) = new_cluster().await;
    let report = ctl_json(
        &latest_endpoint,
        &["restore", "--from", &url, "--to-time", "latest"],
    );
    assert_eq!(report["rows_restored"], 180, "{report}");
    assert_eq!(
        report["shards"], 4,
        "the child's rows are read too: {report}"
    );
    let restored = ctl_json(&latest_endpoint, &["checksum"]);
    assert_eq!(restored["sum"], source["sum"], "{restored} {source}");
    let all: Vec<String> = ["before", "after-backup", "after-split"]
        .iter()
        .flat_map(|prefix| keys(60, prefix))
        .collect();
    let mut restored_client = latest.node(1).client().await.unwrap();
    assert_all_present(&mut restored_client, &all).await;

    eprintln!("--- restored to a time before the split: no child, nothing after");
    let (_early, _early_dir, early_endpoint) = new_cluster().await;
    let report = ctl_json(
        &early_endpoint,
        &[
            "restore",
            "--from",
            &url,
            "--to-time",
            &rfc3339(before_split),
        ],
    );
    assert_eq!(report["rows_restored"], 120, "{report}");
    assert_eq!(report["shards"], 3, "{report}");

    eprintln!("--- verify walks the new shard's log too: a gap in it is named");
    let verified = ctl_json(&endpoint, &["backup", "verify", &url, &id]);
    assert!(
        verified["log_reaches_us"].as_i64().unwrap() > after_split,
        "{verified}"
    );
    let child = source["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|shard| shard["shard"].as_u64().unwrap())
        .find(|shard| ![1, 2, 3].contains(shard))
        .unwrap();
    let cluster_id = ctl_json(&endpoint, &["backup", "show", &url, &id])["cluster_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let chunks = group_chunks(&target_dir.path().join("t"), &cluster_id, child);
    // Its first chunk with entries (an empty one may mark where it began).
    let first = chunks.iter().position(|(from, next, _)| next > from);
    assert!(
        first.is_some_and(|first| first + 1 < chunks.len()),
        "the new shard's chunks: {chunks:?}"
    );
    std::fs::remove_file(&chunks[first.unwrap()].2).unwrap();
    let gapped = ctl_json(&endpoint, &["backup", "verify", &url, &id]);
    let gaps = gapped["log_gaps"].as_array().unwrap();
    assert!(
        gaps.len() == 1
            && gaps[0]
                .as_str()
                .unwrap()
                .contains(&format!("group {child}")),
        "{gapped}"
    );
    assert!(
        gapped["log_reaches_us"].as_i64().unwrap() < after_split,
        "the restorable time ends at the gap: {gapped}"
    );
    assert_eq!(gapped["problems"].as_array().unwrap().len(), 0, "{gapped}");
}

/// A target away for longer than the log is held: the log is purged past
/// what was shipped, the shipper starts again after a gap, `backup status`
/// shows where the gap ends, a restore to a later time from the backup
/// before it refuses, `verify` names the gap without calling the backup
/// damaged, and a full backup after the gap restores to the latest time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gap_in_the_shipped_log_is_shown_and_a_later_backup_bridges_it() {
    let target_dir = tempfile::tempdir().unwrap();
    let target = target_dir.path().join("t");
    let url = format!("file://{}", target.display());
    let mut env = shipping_env(&url);
    // A log kept for the shipper only up to two 4 KiB segments, and
    // snapshots (after which the log is purged, keeping nothing else)
    // every 20 entries.
    env.push(("QUIVER_CLUSTER__LOG_SEGMENT_BYTES_MAX", "4096"));
    env.push(("QUIVER_CLUSTER__LOG_HOLD_BYTES_MAX", "8192"));
    env.push(("QUIVER_CLUSTER__SNAPSHOT_LOGS_SINCE", "20"));
    env.push(("QUIVER_CLUSTER__LOGS_KEPT_AFTER_SNAPSHOT", "0"));
    let mut cluster = start(&env).await;
    let endpoint = cluster.node(1).endpoint();
    let client = cluster.node(1).client().await.unwrap();
    apply_counter_view(&client).await;
    write_rows(&client, "first", 50).await;
    wait_restorable(&endpoint, &url, now_us()).await;
    let before = ctl_json(&endpoint, &["backup", "create", &url]);
    let before = before["backup_id"].as_str().unwrap().to_owned();
    let status = ctl_json(&endpoint, &["backup", "status", &url]);
    assert!(
        status["groups"]
            .as_array()
            .unwrap()
            .iter()
            .all(|g| g["gap_at_us"].is_null()),
        "no gap yet: {status}"
    );

    eprintln!("--- the target is away while far more than the hold is written");
    let away = target_dir.path().join("away");
    std::fs::rename(&target, &away).unwrap();
    std::fs::write(&target, b"not a directory").unwrap();
    for round in 0..30 {
        write_rows(&client, &format!("away-{round}"), 100).await;
    }
    std::fs::remove_file(&target).unwrap();
    std::fs::rename(&away, &target).unwrap();
    let returned = now_us();

    eprintln!("--- status shows the gap");
    let status = retry("a gap shown", CONVERGE_WAIT, || {
        let (ok, stdout, stderr) = ctl(&endpoint, &["--json", "backup", "status", &url]);
        async move {
            let status: serde_json::Value =
                serde_json::from_str(if ok { &stdout } else { "null" }).unwrap();
            let gapped = status["groups"]
                .as_array()
                .is_some_and(|groups| groups.iter().any(|g| g["gap_at_us"].is_i64()));
            if gapped && status["restorable_until_us"].as_i64().unwrap() >= returned {
                Ok(status)
            } else {
                Err(format!("{status} {stderr}"))
            }
        }
    })
    .await;
    let (ok, stdout, _) = ctl(&endpoint, &["backup", "status", &url]);
    assert!(ok && stdout.contains("has a gap"), "{stdout}");

    eprintln!("--- the backup before it: intact, restorable only up to the gap");
    let (ok, stdout, _) = ctl(&endpoint, &["backup", "verify", &url, &before]);
    assert!(ok && stdout.contains("GAP"), "{stdout}");
    let (_empty, _empty_dir, empty_endpoint) = new_cluster().await;
    let (ok, _, stderr) = ctl(
        &empty_endpoint,
        &[
            "restore",
            "--from",
            &url,
            "--backup",
            &before,
            "--to-time",
            "latest",
        ],
    );
    assert!(!ok && stderr.contains("gap"), "{stderr} ({status})");

    eprintln!("--- a full backup after the gap restores to the latest time");
    ctl_json(&endpoint, &["backup", "create", &url]);
    write_rows(&client, "last", 10).await;
    wait_restorable(&endpoint, &url, now_us()).await;
    let (report, _client, _restored, _dir) = restore_into_new_cluster(&url, "latest").await;
    assert_eq!(report["rows_restored"], 50 + 30 * 100 + 10, "{report}");
}
