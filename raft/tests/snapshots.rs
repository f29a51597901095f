//! A snapshot being sent to a follower stays on disk until the transfer is
//! done, even when a newer snapshot replaces it meanwhile (before, building
//! a snapshot deleted the previous directory under a lazy sender, and a
//! transfer under load could fail forever).

#![allow(clippy::unwrap_used, missing_docs)]

use std::sync::Arc;

use openraft::entry::RaftEntry;
use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};
use openraft::testing::log_id;
use quiver_engine::{RowWrite, StoreOptions, Value};
use quiver_raft::types::Entry;
use quiver_raft::{Command, NoObserver, Proposal, StateMachine, TypeConfig};

fn write(index: u64) -> Entry {
    Entry::new_normal(
        log_id::<TypeConfig>(1, quiver_raft::ReplicaId(1), index),
        Proposal {
            request_id: u128::from(index),
            leader_ts_us: 1_000,
            command: Command::Write {
                view_id: 7,
                rows: vec![RowWrite {
                    entity_key: format!("k{index}"),
                    event_ts_us: 500,
                    values: vec![(1, Value::Int64(index as i64))],
                }],
            },
        },
    )
}

async fn apply(sm: &mut StateMachine, index: u64) {
    let stream = futures::stream::iter([Ok((write(index), None))]);
    sm.apply(stream).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_in_transfer_outlives_its_replacement() {
    let dir = tempfile::tempdir().unwrap();
    let options = StoreOptions::scratch();
    let mut sm = StateMachine::open(1, dir.path(), options, Arc::new(NoObserver)).unwrap();
    apply(&mut sm, 1).await;
    let first = sm
        .get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .unwrap();
    let first_dir = first.snapshot.dir.clone();

    eprintln!("--- a sender holds the first snapshot; a second one replaces it");
    let in_transfer = first.snapshot.clone();
    drop(first);
    apply(&mut sm, 2).await;
    let second = sm
        .get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .unwrap();
    assert_ne!(second.snapshot.dir, first_dir);
    let current = sm.get_current_snapshot().await.unwrap().unwrap();
    assert_eq!(current.snapshot.dir, second.snapshot.dir);
    assert!(
        in_transfer.db_dir().is_dir(),
        "the snapshot being sent is still there"
    );
    for file in &in_transfer.manifest.files {
        assert!(
            in_transfer.db_dir().join(&file.name).is_file(),
            "{}",
            file.name
        );
    }

    eprintln!("--- the transfer ends: the replaced snapshot goes, the current one stays");
    drop(in_transfer);
    assert!(!first_dir.exists(), "the old snapshot was removed");
    assert!(second.snapshot.db_dir().is_dir());
}
