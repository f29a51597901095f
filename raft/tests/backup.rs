//! One shard's part of a full backup: a checkpoint described by its files'
//! checksums, its position and its rows' digest; verification at both
//! levels names any flipped, truncated or deleted file, and a record read
//! back from anywhere decodes or fails, never panics.

#![allow(clippy::unwrap_used, missing_docs)]

use std::path::Path;
use std::sync::Arc;

use openraft::entry::RaftEntry;
use openraft::testing::log_id;
use quiver_engine::{RowWrite, StoreOptions, Value};
use quiver_raft::backup::{self, BackupError, ShardBackup};
use quiver_raft::types::Entry;
use quiver_raft::{Command, NoObserver, Proposal, ReplicaId, StateMachine, TypeConfig};

fn options() -> StoreOptions {
    StoreOptions::scratch()
}

fn write(index: u64, rows: std::ops::Range<u64>) -> Entry {
    Entry::new_normal(
        log_id::<TypeConfig>(2, ReplicaId(1), index),
        Proposal {
            request_id: u128::from(index),
            leader_ts_us: 7_000 + index as i64,
            command: Command::Write {
                view_id: 3,
                rows: rows
                    .map(|i| RowWrite {
                        entity_key: format!("entity-{i}"),
                        event_ts_us: 100,
                        values: vec![(1, Value::Int64(i as i64))],
                    })
                    .collect(),
            },
        },
    )
}

/// A shard with 2,000 rows applied at indexes 1..=20.
async fn shard(dir: &Path) -> StateMachine {
    let sm = StateMachine::open(5, dir, options(), Arc::new(NoObserver)).unwrap();
    let entries: Vec<Entry> = (1..=20).map(|i| write(i, (i - 1) * 100..i * 100)).collect();
    let applier = sm.clone();
    tokio::task::spawn_blocking(move || applier.apply_entries(entries))
        .await
        .unwrap()
        .unwrap();
    sm
}

fn nothing(_: u64) {}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_records_its_position_rows_and_files_and_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let sm = shard(&dir.path().join("state")).await;
    let db = dir.path().join("backup").join("db");
    let mut hashed = 0;
    let record = backup::checkpoint_shard(&sm, &db, &mut |n| hashed += n).unwrap();
    assert_eq!(record.group, 5);
    assert_eq!(
        record.applied,
        Some(log_id::<TypeConfig>(2, ReplicaId(1), 20))
    );
    assert_eq!(record.leader_ts_us, 7_020);
    assert_eq!(record.position().log_id, record.applied);
    assert_eq!(record.rows, 2_000);
    assert_eq!(record.digest, sm.store().digest(0, None).unwrap().sum_hex());
    assert_eq!(hashed, record.bytes(), "every byte hashed once");
    assert!(record.files.iter().any(|f| f.name.ends_with(".sst")));
    backup::verify_files(&db, &record, &mut nothing).unwrap();
    backup::verify_data(&db, &record, &mut nothing).unwrap();

    // The record round-trips, and a different store's digest is refused.
    let decoded = ShardBackup::decode(&record.encode().unwrap()).unwrap();
    assert_eq!(decoded, record);
    let mut wrong = record.clone();
    wrong.digest = format!("{:032x}", 1);
    assert!(matches!(
        backup::verify_data(&db, &wrong, &mut nothing),
        Err(BackupError::Digest { group: 5, .. })
    ));
    let mut wrong = record.clone();
    wrong.applied = Some(log_id::<TypeConfig>(2, ReplicaId(1), 19));
    assert!(matches!(
        backup::verify_data(&db, &wrong, &mut nothing),
        Err(BackupError::Position { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_flipped_truncated_or_deleted_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let sm = shard(&dir.path().join("state")).await;
    let db = dir.path().join("backup").join("db");
    let record = backup::checkpoint_shard(&sm, &db, &mut nothing).unwrap();
    let pristine = dir.path().join("pristine");
    std::fs::create_dir_all(&pristine).unwrap();
    for file in &record.files {
        std::fs::copy(db.join(&file.name), pristine.join(&file.name)).unwrap();
    }
    let restore = |name: &str| {
        let _ = std::fs::remove_file(db.join(name));
        std::fs::copy(pristine.join(name), db.join(name)).unwrap();
    };
    for file in record.files.iter().filter(|f| f.bytes > 0) {
        let path = db.join(&file.name);
        // A flipped byte (the table files are hard links to the live
        // store's: written anew, not in place).
        let mut bytes = std::fs::read(&path).unwrap();
        let at = bytes.len() / 2;
        bytes[at] ^= 0x20;
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, &bytes).unwrap();
        match backup::verify_files(&db, &record, &mut nothing) {
            Err(BackupError::Checksum { file, .. }) => assert_eq!(file, path),
            other => panic!("{}: {other:?}", file.name),
        }
        assert!(backup::verify_data(&db, &record, &mut nothing).is_err());
        restore(&file.name);
        // Truncated.
        let bytes = std::fs::read(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 1]).unwrap();
        match backup::verify_files(&db, &record, &mut nothing) {
            Err(BackupError::Size { file, .. }) => assert_eq!(file, path),
            other => panic!("{}: {other:?}", file.name),
        }
        restore(&file.name);
        // Deleted.
        std::fs::remove_file(&path).unwrap();
        match backup::verify_files(&db, &record, &mut nothing) {
            Err(BackupError::Missing { file }) => assert_eq!(file, path),
            other => panic!("{}: {other:?}", file.name),
        }
        restore(&file.name);
    }
    backup::verify_data(&db, &record, &mut nothing).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_from_anywhere_decode_or_fail_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let sm = shard(&dir.path().join("state")).await;
    let record = backup::checkpoint_shard(&sm, &dir.path().join("db"), &mut nothing).unwrap();
    let bytes = record.encode().unwrap();
    // Every single-byte corruption and every truncation: a record or an
    // error, never a panic; a decoded one passes the same checks again.
    for at in 0..bytes.len() {
        for mask in [0x01, 0x20, 0xff] {
            let mut mutated = bytes.clone();
            mutated[at] ^= mask;
            if let Ok(decoded) = ShardBackup::decode(&mutated) {
                ShardBackup::decode(&decoded.encode().unwrap()).unwrap();
            }
        }
        let _ = ShardBackup::decode(&bytes[..at]);
    }
    for (what, edit) in [
        ("escaping name", r#""name": "../x""#),
        ("short sha", r#""sha256": "abc""#),
    ] {
        let text = String::from_utf8(bytes.clone()).unwrap();
        let field = edit.split(':').next().unwrap();
        let start = text.find(field).unwrap();
        let end = start + text[start..].find(',').unwrap();
        let edited = format!("{}{}{}", &text[..start], edit, &text[end..]);
        assert!(
            matches!(
                ShardBackup::decode(edited.as_bytes()),
                Err(BackupError::Record(_))
            ),
            "{what}"
        );
    }
    let mut wrong_version = record.clone();
    wrong_version.version = 99;
    assert!(ShardBackup::decode(&wrong_version.encode().unwrap()).is_err());
    assert!(ShardBackup::decode(&vec![b' '; 5 << 20]).is_err());
}

/// The change-stream form of a write entry.
fn change(index: u64, rows: std::ops::Range<u64>) -> quiver_raft::change_stream::ChangeEntry {
    let entry = write(index, rows);
    let openraft::EntryPayload::Normal(proposal) = entry.payload else {
        unreachable!()
    };
    quiver_raft::change_stream::ChangeEntry {
        log_id: entry.log_id,
        leader_ts_us: proposal.leader_ts_us,
        request_id: proposal.request_id,
        command: proposal.command,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shipped_entries_replay_onto_a_checkpoint_up_to_a_time_as_the_shard_applied_them() {
    let dir = tempfile::tempdir().unwrap();
    let sm = shard(&dir.path().join("state")).await;
    let replay_dir = dir.path().join("replay");
    backup::checkpoint_shard(&sm, &replay_dir.join(backup::REPLAY_DB_DIR), &mut nothing).unwrap();
    // The live shard goes on to index 40 (leader times 7,021..7,040).
    let more: Vec<Entry> = (21..=40)
        .map(|i| write(i, (i - 1) * 100..i * 100 + 50))
        .collect();
    let applier = sm.clone();
    tokio::task::spawn_blocking(move || applier.apply_entries(more))
        .await
        .unwrap()
        .unwrap();
    let shipped: Vec<_> = (15..=40)
        .map(|i| change(i, (i - 1) * 100..i * 100 + 50))
        .collect();

    let replayed = backup::open_for_replay(5, &replay_dir, false).unwrap();
    let progress = backup::replay(&replayed, shipped.clone(), 7_030).unwrap();
    assert_eq!(
        progress.applied, 10,
        "21..=30: what the checkpoint has is skipped"
    );
    assert!(progress.reached_time);
    assert_eq!(replayed.applied().unwrap().index, 30);
    assert_eq!(replayed.leader_time_us(), 7_030);

    // The same rows as a shard that applied exactly 1..=30.
    let reference =
        StateMachine::open(5, dir.path().join("ref"), options(), Arc::new(NoObserver)).unwrap();
    let entries: Vec<Entry> = (1..=30)
        .map(|i| {
            if i <= 20 {
                write(i, (i - 1) * 100..i * 100)
            } else {
                write(i, (i - 1) * 100..i * 100 + 50)
            }
        })
        .collect();
    reference.apply_entries(entries).unwrap();
    assert_eq!(
        replayed.store().digest(0, None).unwrap(),
        reference.store().digest(0, None).unwrap()
    );

    // The rest: not past the end of what was shipped.
    let progress = backup::replay(&replayed, shipped, i64::MAX).unwrap();
    assert_eq!((progress.applied, progress.reached_time), (10, false));
    assert_eq!(
        replayed.store().digest(0, None).unwrap(),
        sm.store().digest(0, None).unwrap()
    );

    // A split is replayed as a replica applies it: the child is built
    // beside the state, from it, and the parent keeps its half.
    // (Its membership, which the change stream does not carry, applied
    // directly: the child is built by a member.)
    let membership = openraft::Membership::new(
        vec![std::collections::BTreeSet::from([ReplicaId(1)])],
        std::collections::BTreeMap::from([(ReplicaId(1), openraft::BasicNode::new("127.0.0.1:1"))]),
    )
    .unwrap();
    replayed
        .apply_entries(vec![Entry::new_membership(
            log_id::<TypeConfig>(2, ReplicaId(1), 41),
            membership,
        )])
        .unwrap();
    let before = replayed.store().digest(0, None).unwrap();
    let split = quiver_raft::change_stream::ChangeEntry {
        log_id: log_id::<TypeConfig>(2, ReplicaId(1), 42),
        leader_ts_us: 7_042,
        request_id: 42,
        command: Command::Split {
            child: 9,
            at: 1 << 63,
            start: 0,
            end: None,
            version: 0,
        },
    };
    let progress = backup::replay(&replayed, vec![split], i64::MAX).unwrap();
    assert_eq!(progress.applied, 1);
    let [(child, child_dir)] = progress.children.as_slice() else {
        panic!("one child: {progress:?}");
    };
    assert_eq!(*child, 9);
    assert_eq!(*child_dir, backup::replay_child_dir(&replay_dir, 9));
    let child = backup::open_for_replay(9, &child_dir.join("state"), false).unwrap();
    assert_eq!(
        child.applied().map(|id| id.index),
        Some(42),
        "the child starts at the split"
    );
    assert_eq!(child.range().unwrap().start, 1 << 63);
    assert_eq!(replayed.range().unwrap().end, Some(1 << 63));
    let (low, high) = (
        replayed.store().digest(0, None).unwrap(),
        child.store().digest(0, None).unwrap(),
    );
    assert!(low.rows > 0 && high.rows > 0, "{low:?} {high:?}");
    assert_eq!(low.rows + high.rows, before.rows);
    assert_eq!(low.sum.wrapping_add(high.sum), before.sum);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_gets_its_id_from_its_bootstrap_entry() {
    use quiver_raft::cluster_map::{ClusterMap, MapCommand, NodeInfo, NodeState};

    let map = || {
        let nodes = [(
            1,
            NodeInfo {
                addr: "127.0.0.1:7001".into(),
                peer_addr: "127.0.0.1:17001".into(),
                state: NodeState::Serving,
            },
        )]
        .into_iter()
        .collect();
        let replicas = [(1, vec![1])].into_iter().collect();
        ClusterMap::bootstrap(nodes, &replicas, 1, 1)
    };
    let bootstrap = |leader_ts_us: i64| {
        Entry::new_normal(
            log_id::<TypeConfig>(1, ReplicaId(1), 1),
            Proposal {
                request_id: 1,
                leader_ts_us,
                command: Command::Map(MapCommand::Bootstrap(Box::new(map()))),
            },
        )
    };
    let dir = tempfile::tempdir().unwrap();
    let open = |name: &str| {
        StateMachine::open(0, dir.path().join(name), options(), Arc::new(NoObserver)).unwrap()
    };
    let (a, b, c) = (open("a"), open("b"), open("c"));
    assert_eq!(a.cluster_id().unwrap(), None, "not before the bootstrap");
    a.apply_entries(vec![bootstrap(1_000)]).unwrap();
    b.apply_entries(vec![bootstrap(1_000)]).unwrap();
    c.apply_entries(vec![bootstrap(2_000)]).unwrap();
    let id = a.cluster_id().unwrap().unwrap();
    assert_eq!(id.len(), 16);
    assert_eq!(b.cluster_id().unwrap(), Some(id.clone()), "replicas agree");
    assert_ne!(c.cluster_id().unwrap(), Some(id), "another cluster differs");
}
