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
