//! A request id is applied once, also after a restart: a router retry of a
//! Delete that had committed must not delete a row written after it. A
//! command the store refuses still counts as applied. An `Expire` entry's
//! floor comes from its own leader time and nothing else.

#![allow(clippy::unwrap_used, missing_docs)]

use std::sync::Arc;

use openraft::entry::RaftEntry;
use openraft::storage::RaftStateMachine;
use openraft::testing::log_id;
use quiver_engine::keys::storage_key;
use quiver_engine::{RowWrite, StoreOptions, Value};
use quiver_raft::types::{Entry, RejectKind};
use quiver_raft::{Command, NoObserver, Proposal, ReplicaId, Response, StateMachine, TypeConfig};

fn options() -> StoreOptions {
    StoreOptions::scratch()
}

fn entry(index: u64, request_id: u128, command: Command) -> Entry {
    Entry::new_normal(
        log_id::<TypeConfig>(1, ReplicaId(1), index),
        Proposal {
            request_id,
            leader_ts_us: 1_000,
            command,
        },
    )
}

fn delete() -> Command {
    Command::Delete {
        view_id: 7,
        entity_keys: vec!["k".into()],
    }
}

fn write(value: i64) -> Command {
    Command::Write {
        view_id: 7,
        rows: vec![RowWrite {
            entity_key: "k".into(),
            event_ts_us: 500,
            values: vec![(1, Value::Int64(value))],
        }],
    }
}

async fn apply(sm: &mut StateMachine, entries: Vec<Entry>) {
    let stream = futures::stream::iter(entries.into_iter().map(|e| Ok((e, None))));
    sm.apply(stream).await.unwrap();
}

fn stored(sm: &StateMachine) -> Option<Value> {
    let row = sm
        .store()
        .get_rows(&[storage_key(7, b"k")])
        .remove(0)
        .unwrap()?;
    row.value(1).cloned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_request_id_is_applied_once_also_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut sm = StateMachine::open(1, dir.path(), options(), Arc::new(NoObserver)).unwrap();
    apply(
        &mut sm,
        vec![
            entry(1, 0xA, write(1)),
            entry(2, 0xB, delete()),
            entry(3, 0xC, write(2)),
            // The router's retry of request B, whose answer was lost.
            entry(4, 0xB, delete()),
        ],
    )
    .await;
    assert_eq!(
        stored(&sm),
        Some(Value::Int64(2)),
        "the retry deleted nothing"
    );
    assert_eq!(sm.applied().map(|id| id.index), Some(4));
    drop(sm);

    let mut sm = StateMachine::open(1, dir.path(), options(), Arc::new(NoObserver)).unwrap();
    apply(
        &mut sm,
        vec![entry(5, 0xB, delete()), entry(6, 0, write(3))],
    )
    .await;
    assert_eq!(
        stored(&sm),
        Some(Value::Int64(3)),
        "ids survive a restart; id 0 is never deduplicated"
    );
    assert_eq!(sm.applied().map(|id| id.index), Some(6));
}

/// A view named "v"; with no features the store refuses it.
fn view(features: usize) -> Command {
    Command::ApplyView {
        spec: quiver_engine::ViewSpec {
            name: "v".into(),
            entities: vec!["id".into()],
            features: (0..features)
                .map(|i| quiver_engine::view::FeatureSpec {
                    name: format!("f{i}"),
                    value_type: quiver_engine::ValueType::Int64,
                    default: None,
                })
                .collect(),
            ttl_seconds: 0,
            description: String::new(),
        },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_command_records_its_position_and_its_id() {
    let dir = tempfile::tempdir().unwrap();
    let mut sm = StateMachine::open(1, dir.path(), options(), Arc::new(NoObserver)).unwrap();
    apply(
        &mut sm,
        vec![
            entry(1, 0xE, view(0)),
            entry(
                2,
                0xF,
                Command::DeleteView {
                    name: "missing".into(),
                },
            ),
        ],
    )
    .await;
    drop(sm);
    let mut sm = StateMachine::open(1, dir.path(), options(), Arc::new(NoObserver)).unwrap();
    assert_eq!(
        sm.applied().map(|id| id.index),
        Some(2),
        "refusals moved the applied position on disk"
    );
    // A later entry with the refused request's id is a retry of it: it must
    // not be judged again, whatever it carries, and must get the same
    // refusal back (before, it was answered AlreadyApplied, which the
    // client took for success).
    let retried = {
        let sm = sm.clone();
        tokio::task::spawn_blocking(move || sm.apply_entries(vec![entry(3, 0xE, view(1))]))
            .await
            .unwrap()
            .unwrap()
    };
    assert!(
        matches!(
            retried.as_slice(),
            [Response::Rejected {
                kind: RejectKind::Invalid,
                ..
            }]
        ),
        "{retried:?}"
    );
    assert!(
        sm.store().registry().load().view("v").is_none(),
        "the refused request's id was recorded"
    );
    apply(&mut sm, vec![entry(4, 0x10, view(1))]).await;
    assert!(sm.store().registry().load().view("v").is_some());
}

fn expire_at(index: u64, leader_ts_us: i64, retention_us: i64) -> Entry {
    Entry::new_normal(
        log_id::<TypeConfig>(1, ReplicaId(1), index),
        Proposal {
            request_id: 0x100 + u128::from(index),
            leader_ts_us,
            command: Command::Expire {
                retention: vec![(7, retention_us)],
            },
        },
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expire_entry_moves_the_floor_by_its_own_leader_time_only() {
    let dir = tempfile::tempdir().unwrap();
    let mut sm = StateMachine::open(1, dir.path(), options(), Arc::new(NoObserver)).unwrap();
    // The row's event time is 500 (written at leader time 1_000); retention
    // 1_100.
    apply(
        &mut sm,
        vec![entry(1, 0xA, write(1)), expire_at(2, 1_550, 1_100)],
    )
    .await;
    assert_eq!(sm.store().expiry_floor(7), 450);
    assert_eq!(stored(&sm), Some(Value::Int64(1)), "500 is above the floor");
    // A leader whose clock is far ahead: the floor follows it (for good).
    apply(&mut sm, vec![expire_at(3, 10_000, 100)]).await;
    assert_eq!(sm.store().expiry_floor(7), 9_900);
    assert_eq!(stored(&sm), None);
    // A later leader with the right clock cannot move it back.
    apply(
        &mut sm,
        vec![expire_at(4, 2_000, 100), entry(5, 0xB, write(2))],
    )
    .await;
    assert_eq!(sm.store().expiry_floor(7), 9_900);
    assert_eq!(stored(&sm), None, "a write below the floor is stale");
    drop(sm);
    let sm = StateMachine::open(1, dir.path(), options(), Arc::new(NoObserver)).unwrap();
    assert_eq!(
        sm.store().expiry_floor(7),
        9_900,
        "the floor survives a restart"
    );
}

/// A write of `value` at event time `event_ts_us`, stamped `leader_ts_us`
/// by a leader of `term`.
fn write_stamped(index: u64, term: u64, leader_ts_us: i64, event_ts_us: i64, value: i64) -> Entry {
    Entry::new_normal(
        log_id::<TypeConfig>(term, ReplicaId(1), index),
        Proposal {
            request_id: 0x200 + u128::from(index),
            leader_ts_us,
            command: Command::Write {
                view_id: 7,
                rows: vec![RowWrite {
                    entity_key: "k".into(),
                    event_ts_us,
                    values: vec![(1, Value::Int64(value))],
                }],
            },
        },
    )
}

fn written_ts(sm: &StateMachine) -> Option<i64> {
    let row = sm
        .store()
        .get_rows(&[storage_key(7, b"k")])
        .remove(0)
        .unwrap()?;
    Some(row.written_ts_us)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_time_never_goes_back_across_leaders_restarts_and_snapshots() {
    use openraft::storage::RaftSnapshotBuilder;

    let dir = tempfile::tempdir().unwrap();
    let mut sm = StateMachine::open(1, dir.path(), options(), Arc::new(NoObserver)).unwrap();
    assert_eq!(sm.leader_time_us(), 0);
    apply(&mut sm, vec![write_stamped(1, 1, 5_000, 500, 1)]).await;
    assert_eq!(sm.leader_time_us(), 5_000);
    assert_eq!(written_ts(&sm), Some(5_000));

    // A new leader (term 2) whose clock is 3 ms behind: its entries count
    // at the shard's time, not its own. The expiry floor is 5_000 - 4_400
    // (its own clock would have put it at -1_400 and kept the row).
    let slow = Entry::new_normal(
        log_id::<TypeConfig>(2, ReplicaId(2), 2),
        Proposal {
            request_id: 0x302,
            leader_ts_us: 2_000,
            command: Command::Expire {
                retention: vec![(7, 4_400)],
            },
        },
    );
    apply(&mut sm, vec![slow]).await;
    assert_eq!(sm.leader_time_us(), 5_000, "never back");
    assert_eq!(sm.store().expiry_floor(7), 600);
    assert_eq!(stored(&sm), None, "event time 500 is below the floor");
    apply(&mut sm, vec![write_stamped(3, 2, 2_500, 700, 2)]).await;
    assert_eq!(stored(&sm), Some(Value::Int64(2)));
    assert_eq!(written_ts(&sm), Some(5_000), "written at the shard's time");
    // The clock catches up and passes it: the time follows again.
    apply(&mut sm, vec![write_stamped(4, 2, 6_000, 800, 3)]).await;
    assert_eq!(sm.leader_time_us(), 6_000);
    assert_eq!(written_ts(&sm), Some(6_000));

    drop(sm);
    let mut sm = StateMachine::open(1, dir.path(), options(), Arc::new(NoObserver)).unwrap();
    assert_eq!(sm.leader_time_us(), 6_000, "it survives a restart");

    let snapshot = sm
        .get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .unwrap();
    let other_dir = tempfile::tempdir().unwrap();
    let mut other =
        StateMachine::open(1, other_dir.path(), options(), Arc::new(NoObserver)).unwrap();
    other
        .install_snapshot(&snapshot.meta, snapshot.snapshot)
        .await
        .unwrap();
    assert_eq!(other.leader_time_us(), 6_000, "a snapshot carries it");
    apply(&mut other, vec![write_stamped(5, 3, 1_000, 900, 4)]).await;
    assert_eq!(written_ts(&other), Some(6_000));
}
