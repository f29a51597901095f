//! A shard's change stream: committed entries read from the log at a
//! resumable position with times that never go back, positions checked
//! against the log, consumers' holds replicated through the state machine
//! and honoured by the log's purge within its size cap.

#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use openraft::entry::RaftEntry;
use openraft::storage::{IOFlushed, RaftLogStorage, RaftSnapshotBuilder, RaftStateMachine};
use openraft::testing::log_id;
use openraft::{BasicNode, Membership};
use quiver_engine::seglog::LogOptions;
use quiver_engine::{RowWrite, StoreOptions, Value};
use quiver_raft::change_stream::{
    self, ChangeLimits, ChangePosition, ChangeStream, ChangeStreamError, LOG_CONSUMERS_MAX,
};
use quiver_raft::log_store::PurgeHold;
use quiver_raft::types::{Entry, LogId, RejectKind};
use quiver_raft::{
    Command, LogStore, NoObserver, Proposal, ReplicaId, Response, StateMachine, TypeConfig,
};

fn id(term: u64, index: u64) -> LogId {
    log_id::<TypeConfig>(term, ReplicaId(1), index)
}

fn write(term: u64, index: u64, stamped_us: i64) -> Entry {
    Entry::new_normal(
        id(term, index),
        Proposal {
            request_id: u128::from(index) | 0x1000,
            leader_ts_us: stamped_us,
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

fn membership(index: u64) -> Entry {
    let membership = Membership::new(
        vec![BTreeSet::from([ReplicaId(1)])],
        BTreeMap::from([(ReplicaId(1), BasicNode::new("127.0.0.1:1"))]),
    )
    .unwrap();
    Entry::new_membership(id(1, index), membership)
}

/// Membership at 1; writes at 2..=50, term 1 up to 25 stamped 10_000 + i,
/// then a term-2 leader whose clock is 5 ms behind.
fn history() -> Vec<Entry> {
    let mut entries = vec![membership(1)];
    for index in 2..=50 {
        entries.push(if index <= 25 {
            write(1, index, 10_000 + index as i64)
        } else {
            write(2, index, 5_000 + index as i64 * 200)
        });
    }
    entries
}

fn options() -> LogOptions {
    LogOptions {
        segment_bytes_max: 4096,
        ..LogOptions::default()
    }
}

async fn log_with(dir: &std::path::Path, entries: Vec<Entry>) -> LogStore {
    let mut log = LogStore::open(dir, options()).unwrap();
    log.append(entries, IOFlushed::noop()).await.unwrap();
    log
}

fn read_all(
    log: &LogStore,
    applied: Option<LogId>,
    from: ChangePosition,
    limits: ChangeLimits,
) -> (Vec<change_stream::ChangeEntry>, ChangePosition) {
    let mut entries = Vec::new();
    let mut at = from;
    loop {
        let batch = change_stream::read(log, applied, &at, limits).unwrap();
        if batch.next == at {
            assert!(batch.entries.is_empty());
            return (entries, at);
        }
        entries.extend(batch.entries);
        at = batch.next;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_resume_anywhere_stop_at_applied_and_times_never_go_back() {
    let dir = tempfile::tempdir().unwrap();
    let log = log_with(dir.path(), history()).await;
    let applied = Some(id(2, 40));
    let (whole, end) = read_all(
        &log,
        applied,
        ChangePosition::default(),
        ChangeLimits::default(),
    );
    assert_eq!(end.log_id, applied, "up to what was applied, no further");
    let indexes: Vec<u64> = whole.iter().map(|e| e.log_id.index).collect();
    assert_eq!(indexes, (2..=40).collect::<Vec<_>>(), "membership skipped");
    // Each entry counts at its stamp or the time before it: term 2's slow
    // clock (5_000 + 200 i) stays at 10_025 until it passes it at i = 26.
    let mut time = 0;
    for entry in &whole {
        let stamped = if entry.log_id.index <= 25 {
            10_000 + entry.log_id.index as i64
        } else {
            5_000 + entry.log_id.index as i64 * 200
        };
        time = stamped.max(time);
        assert_eq!(entry.leader_ts_us, time, "{}", entry.log_id);
    }
    assert_eq!(end.leader_ts_us, time);

    // Any chunking gives the same stream; a position taken mid-way resumes
    // exactly after it.
    for (entries_max, bytes_max) in [(1, usize::MAX), (3, usize::MAX), (7, 1), (100, 300)] {
        let limits = ChangeLimits {
            entries_max,
            bytes_max,
        };
        let (chunked, chunked_end) = read_all(&log, applied, ChangePosition::default(), limits);
        assert_eq!(chunked, whole, "{limits:?}");
        assert_eq!(chunked_end, end);
    }
    let middle = ChangePosition {
        log_id: Some(whole[20].log_id),
        leader_ts_us: whole[20].leader_ts_us,
    };
    let (rest, _) = read_all(&log, applied, middle, ChangeLimits::default());
    assert_eq!(rest, whole[21..].to_vec());
    // At the end: nothing new, the same position.
    let batch = change_stream::read(&log, applied, &end, ChangeLimits::default()).unwrap();
    assert!(batch.entries.is_empty());
    assert_eq!(batch.next, end);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_position_from_another_history_or_past_applied_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let log = log_with(dir.path(), history()).await;
    let applied = Some(id(2, 40));
    let foreign = ChangePosition {
        log_id: Some(id(1, 30)),
        leader_ts_us: 0,
    };
    match change_stream::read(&log, applied, &foreign, ChangeLimits::default()) {
        Err(ChangeStreamError::Diverged { position, found }) => {
            assert_eq!(position, id(1, 30));
            assert_eq!(found, Some(id(2, 30)));
        }
        other => panic!("{other:?}"),
    }
    let ahead = ChangePosition {
        log_id: Some(id(2, 45)),
        leader_ts_us: 0,
    };
    assert!(matches!(
        change_stream::read(&log, applied, &ahead, ChangeLimits::default()),
        Err(ChangeStreamError::Ahead { .. })
    ));
    assert!(matches!(
        change_stream::read(&log, None, &ahead, ChangeLimits::default()),
        Err(ChangeStreamError::Ahead { .. })
    ));
}

/// A hold a test moves by hand.
struct Hold(AtomicU64);

impl PurgeHold for Hold {
    fn held_index(&self) -> Option<u64> {
        match self.0.load(Ordering::SeqCst) {
            u64::MAX => None,
            index => Some(index),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_keeps_entries_through_purges_and_restarts_within_its_cap() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = log_with(dir.path(), history()).await;
    let hold = Arc::new(Hold(AtomicU64::new(10)));
    log.set_purge_hold(hold.clone(), 1 << 30);
    let applied = Some(id(2, 50));

    log.purge(id(2, 30)).await.unwrap();
    assert_eq!(
        log.purged(),
        Some(id(1, 10)),
        "held at the consumer's index"
    );
    let at_hold = ChangePosition {
        log_id: Some(id(1, 10)),
        leader_ts_us: 10_010,
    };
    let (after_hold, _) = read_all(&log, applied, at_hold, ChangeLimits::default());
    assert_eq!(after_hold.first().unwrap().log_id, id(1, 11));
    let before_hold = ChangePosition {
        log_id: Some(id(1, 5)),
        leader_ts_us: 0,
    };
    match change_stream::read(&log, applied, &before_hold, ChangeLimits::default()) {
        Err(ChangeStreamError::Purged { after, purged }) => assert_eq!((after, purged), (5, 10)),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        change_stream::read(
            &log,
            applied,
            &ChangePosition::default(),
            ChangeLimits::default()
        ),
        Err(ChangeStreamError::Purged { .. })
    ));

    eprintln!("--- what openraft reads back after a restart: the held point");
    log.close();
    drop(log);
    let mut log = LogStore::open(dir.path(), options()).unwrap();
    log.set_purge_hold(hold.clone(), 1 << 30);
    let state = log.get_log_state().await.unwrap();
    assert_eq!(state.last_purged_log_id, Some(id(1, 10)));
    assert_eq!(state.last_log_id, Some(id(2, 50)));

    eprintln!("--- the consumer confirms more: the next purge goes to it");
    hold.0.store(20, Ordering::SeqCst);
    log.purge(id(2, 30)).await.unwrap();
    assert_eq!(log.purged(), Some(id(1, 20)));
    hold.0.store(35, Ordering::SeqCst);
    log.purge(id(2, 30)).await.unwrap();
    assert_eq!(log.purged(), Some(id(2, 30)), "held past the purge");

    eprintln!("--- a log past the cap purges what is held");
    hold.0.store(31, Ordering::SeqCst);
    log.set_purge_hold(hold.clone(), 512);
    assert!(log.bytes() > 512, "{}", log.bytes());
    log.purge(id(2, 45)).await.unwrap();
    assert_eq!(log.purged(), Some(id(2, 45)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_hold_past_a_snapshot_the_log_does_not_hold_or_for_a_consumer_already_behind() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = log_with(dir.path(), history()).await;
    let hold = Arc::new(Hold(AtomicU64::new(10)));
    log.set_purge_hold(hold.clone(), 1 << 30);
    // A snapshot installed from another history (term 3 at 30): nothing
    // in this log is known to be committed, so nothing is kept.
    log.purge(id(3, 30)).await.unwrap();
    assert_eq!(log.purged(), Some(id(3, 30)));
    // Beyond the log's end (a follower far behind): the same.
    let dir = tempfile::tempdir().unwrap();
    let mut log = log_with(dir.path(), history()).await;
    log.set_purge_hold(hold.clone(), 1 << 30);
    log.purge(id(2, 70)).await.unwrap();
    assert_eq!(log.purged(), Some(id(2, 70)));
    // A consumer behind the purge point already lost entries: its hold
    // keeps nothing.
    let dir = tempfile::tempdir().unwrap();
    let mut log = log_with(dir.path(), history()).await;
    log.purge(id(1, 15)).await.unwrap();
    log.set_purge_hold(hold.clone(), 1 << 30);
    log.purge(id(2, 40)).await.unwrap();
    assert_eq!(log.purged(), Some(id(2, 40)));
    // No consumer: openraft's purge as asked.
    hold.0.store(u64::MAX, Ordering::SeqCst);
    log.purge(id(2, 45)).await.unwrap();
    assert_eq!(log.purged(), Some(id(2, 45)));
}

fn state_options() -> StoreOptions {
    StoreOptions::scratch()
}

fn hold_entry(index: u64, consumer: &str, held: u64) -> Entry {
    Entry::new_normal(
        id(1, index),
        Proposal {
            request_id: u128::from(index) | 0x2000,
            leader_ts_us: 1_000,
            command: Command::HoldLog {
                consumer: consumer.to_owned(),
                index: held,
            },
        },
    )
}

async fn apply(sm: &StateMachine, entries: Vec<Entry>) -> Vec<Response> {
    let sm = sm.clone();
    tokio::task::spawn_blocking(move || sm.apply_entries(entries))
        .await
        .unwrap()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holds_are_replicated_state_only_move_forward_and_survive_restarts_and_snapshots() {
    let dir = tempfile::tempdir().unwrap();
    let sm = StateMachine::open(1, dir.path(), state_options(), Arc::new(NoObserver)).unwrap();
    assert_eq!(sm.held_index(), None);
    let responses = apply(
        &sm,
        vec![
            hold_entry(1, "backup", 0),
            hold_entry(2, "replica-eu", 1),
            hold_entry(3, "backup", 2),
            // Late or reordered: a hold never goes back.
            hold_entry(4, "backup", 1),
        ],
    )
    .await;
    assert_eq!(responses[0], Response::LogHold { index: Some(0) });
    assert_eq!(responses[3], Response::LogHold { index: Some(2) });
    assert_eq!(
        sm.log_holds(),
        BTreeMap::from([("backup".to_owned(), 2), ("replica-eu".to_owned(), 1)])
    );
    assert_eq!(sm.held_index(), Some(1), "the slowest consumer holds");

    eprintln!("--- bad names and one consumer too many are refused");
    let refused = apply(
        &sm,
        vec![
            hold_entry(5, "", 9),
            hold_entry(6, "a/b", 9),
            hold_entry(7, &"x".repeat(65), 9),
        ],
    )
    .await;
    for response in refused {
        assert!(
            matches!(
                response,
                Response::Rejected {
                    kind: RejectKind::Invalid,
                    ..
                }
            ),
            "{response:?}"
        );
    }
    let more: Vec<Entry> = (0..LOG_CONSUMERS_MAX as u64)
        .map(|i| hold_entry(10 + i, &format!("c{i}"), 5))
        .collect();
    let responses = apply(&sm, more).await;
    let refused = responses
        .iter()
        .filter(|r| {
            matches!(
                r,
                Response::Rejected {
                    kind: RejectKind::LimitExceeded,
                    ..
                }
            )
        })
        .count();
    assert_eq!(refused, 2, "16 consumers at most, 2 were there");
    assert_eq!(sm.log_holds().len(), LOG_CONSUMERS_MAX);

    eprintln!("--- a release drops one; the rest survive a restart");
    let release = Entry::new_normal(
        id(1, 40),
        Proposal {
            request_id: 0x3000,
            leader_ts_us: 1_000,
            command: Command::ReleaseLog {
                consumer: "replica-eu".to_owned(),
            },
        },
    );
    assert_eq!(
        apply(&sm, vec![release]).await,
        vec![Response::LogHold { index: None }]
    );
    assert_eq!(sm.held_index(), Some(2));
    let holds = sm.log_holds();
    drop(sm);
    let mut sm = StateMachine::open(1, dir.path(), state_options(), Arc::new(NoObserver)).unwrap();
    assert_eq!(sm.log_holds(), holds);

    eprintln!("--- a snapshot carries them to a replica that installs it");
    let snapshot = sm
        .get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .unwrap();
    let other_dir = tempfile::tempdir().unwrap();
    let mut other =
        StateMachine::open(1, other_dir.path(), state_options(), Arc::new(NoObserver)).unwrap();
    other
        .install_snapshot(&snapshot.meta, snapshot.snapshot)
        .await
        .unwrap();
    assert_eq!(other.log_holds(), holds);
    assert_eq!(other.held_index(), Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_streams_what_it_applied_from_its_own_position() {
    let dir = tempfile::tempdir().unwrap();
    let log = log_with(&dir.path().join("log"), history()).await;
    let sm = StateMachine::open(
        1,
        dir.path().join("state"),
        state_options(),
        Arc::new(NoObserver),
    )
    .unwrap();
    let stream = ChangeStream::new(log.clone(), sm.clone());
    // Nothing applied: nothing to read.
    let empty = stream
        .read(&ChangePosition::default(), ChangeLimits::default())
        .unwrap();
    assert!(empty.entries.is_empty());
    let first: Vec<Entry> = history().into_iter().take(20).collect();
    apply(&sm, first).await;
    let checkpoint = stream.position();
    assert_eq!(checkpoint.log_id, Some(id(1, 20)));
    assert_eq!(checkpoint.leader_ts_us, 10_020);
    let rest: Vec<Entry> = history().into_iter().skip(20).collect();
    apply(&sm, rest).await;
    let batch = stream.read(&checkpoint, ChangeLimits::default()).unwrap();
    assert_eq!(batch.entries.first().unwrap().log_id, id(1, 21));
    assert_eq!(batch.next.log_id, Some(id(2, 50)));
    assert_eq!(
        batch.next.leader_ts_us,
        sm.leader_time_us(),
        "the same time"
    );
}

mod positions {
    use super::*;
    use proptest::prelude::*;

    // Positions are stored by consumers (and in backup manifests): any
    // bytes decode to a position or an error, never a panic.
    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_the_position_decoder(
            bytes in proptest::collection::vec(any::<u8>(), 0..64)
        ) {
            let _ = postcard::from_bytes::<ChangePosition>(&bytes);
        }

        #[test]
        fn positions_round_trip(term in any::<u64>(), index in any::<u64>(), ts in any::<i64>()) {
            let position = ChangePosition { log_id: Some(id(term, index)), leader_ts_us: ts };
            let bytes = postcard::to_stdvec(&position).unwrap();
            prop_assert_eq!(postcard::from_bytes::<ChangePosition>(&bytes).unwrap(), position);
        }
    }
}
