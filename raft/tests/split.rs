//! A shard split applied by a replica: the parent keeps `[start, at)`, the
//! child's replica is built from a checkpoint with `[at, end)`, seeded so
//! that openraft opens it and elects a leader, and writes routed to the
//! wrong half are refused without being recorded against their request id.

#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use openraft::entry::RaftEntry;
use openraft::errors::{RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory, RaftNetworkV2};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::testing::log_id;
use openraft::type_config::alias::SnapshotOf;
use openraft::{BasicNode, Membership};
use parking_lot::Mutex;
use quiver_engine::keys::{entity_hash, storage_key};
use quiver_engine::seglog::LogOptions;
use quiver_engine::{RowWrite, StoreOptions, Value};
use quiver_raft::state_machine::{SplitHandler, child_seed};
use quiver_raft::types::{Entry, RejectKind, Vote};
use quiver_raft::{
    Command, GroupId, LogStore, NoObserver, Proposal, Raft, ReplicaId, Response, SnapshotDir,
    StateMachine, TypeConfig,
};

const VIEW: u32 = 7;
const AT: u64 = 1 << 63;

fn options() -> StoreOptions {
    StoreOptions::scratch()
}

/// Children go in `root/<child>`; their creation is recorded.
struct Children {
    root: PathBuf,
    replica: ReplicaId,
    created: Mutex<Vec<GroupId>>,
}

impl Children {
    fn new(root: PathBuf, replica: ReplicaId) -> Arc<Children> {
        Arc::new(Children {
            root,
            replica,
            created: Mutex::new(Vec::new()),
        })
    }
}

impl SplitHandler for Children {
    fn prepare_child(&self, child: GroupId) -> std::io::Result<Option<PathBuf>> {
        Ok(Some(self.root.join(child.to_string())))
    }
    fn replica(&self) -> ReplicaId {
        self.replica
    }
    fn child_created(&self, child: GroupId) {
        self.created.lock().push(child);
    }
}

/// Group 1's state machine as replica `replica`, splitting into `dir/groups`.
fn parent(dir: &std::path::Path, replica: ReplicaId) -> (StateMachine, Arc<Children>) {
    let children = Children::new(dir.join("groups"), replica);
    let name = if replica.0 >> 32 == 0 {
        "1".to_string()
    } else {
        format!("1.{}", replica.0 >> 32)
    };
    let sm = StateMachine::open(
        1,
        dir.join("groups").join(name).join("state"),
        options(),
        Arc::new(NoObserver),
    )
    .unwrap();
    sm.set_split_handler(children.clone());
    (sm, children)
}

/// The keys below the split point and those at or above it (both non-empty).
fn halves(keys: &[String]) -> (Vec<String>, Vec<String>) {
    let (low, high): (Vec<String>, Vec<String>) = keys
        .iter()
        .cloned()
        .partition(|k| entity_hash(k.as_bytes()) < AT);
    assert!(!low.is_empty() && !high.is_empty());
    (low, high)
}

fn entry(index: u64, request_id: u128, command: Command) -> Entry {
    Entry::new_normal(
        log_id::<TypeConfig>(1, ReplicaId(1), index),
        Proposal {
            request_id,
            leader_ts_us: 1_000 + index as i64,
            command,
        },
    )
}

fn write(keys: &[String], value: i64) -> Command {
    Command::Write {
        view_id: VIEW,
        rows: keys
            .iter()
            .map(|key| RowWrite {
                entity_key: key.clone(),
                event_ts_us: 500,
                values: vec![(1, Value::Int64(value))],
            })
            .collect(),
    }
}

fn split(version: u64) -> Command {
    Command::Split {
        child: 9,
        at: AT,
        start: 0,
        end: None,
        version,
    }
}

async fn apply(sm: &mut StateMachine, entries: Vec<Entry>) -> Vec<Response> {
    let sm = sm.clone();
    tokio::task::spawn_blocking(move || sm.apply_entries(entries))
        .await
        .unwrap()
        .unwrap()
}

fn present(sm: &StateMachine, keys: &[String]) -> Vec<bool> {
    let storage: Vec<Vec<u8>> = keys
        .iter()
        .map(|k| storage_key(VIEW, k.as_bytes()))
        .collect();
    sm.store()
        .get_rows(&storage)
        .into_iter()
        .map(|row| row.unwrap().is_some())
        .collect()
}

fn membership_entry() -> Entry {
    let membership = Membership::new(
        vec![BTreeSet::from([ReplicaId(1)])],
        BTreeMap::from([(ReplicaId(1), BasicNode::new("127.0.0.1:1"))]),
    )
    .unwrap();
    Entry::new_membership(log_id::<TypeConfig>(1, ReplicaId(1), 1), membership)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_split_leaves_each_half_its_rows_and_refuses_the_other_half() {
    let dir = tempfile::tempdir().unwrap();
    let (mut sm, children) = parent(dir.path(), ReplicaId(1));
    let keys: Vec<String> = (0..200).map(|i| format!("key-{i}")).collect();
    let (low, high) = halves(&keys);

    eprintln!("--- write, then split at the middle of the ring");
    apply(
        &mut sm,
        vec![membership_entry(), entry(2, 0xA, write(&keys, 1))],
    )
    .await;
    let before = sm.store().digest(0, None).unwrap();
    assert_eq!(before.rows, keys.len() as u64);
    let responses = apply(&mut sm, vec![entry(3, 0xB, split(0))]).await;
    assert_eq!(responses[0], Response::Split { child: 9, index: 3 });
    assert_eq!(*children.created.lock(), vec![9]);
    assert!(present(&sm, &low).iter().all(|&p| p));
    assert!(
        present(&sm, &high).iter().all(|&p| !p),
        "the parent gave them away"
    );
    let range = sm.range().unwrap();
    assert_eq!((range.start, range.end, range.version), (0, Some(AT), 1));
    assert_eq!(range.children, vec![(9, 3)]);

    eprintln!("--- the child holds the other half, seeded at the split's index");
    let child_dir = dir.path().join("groups/9");
    let child =
        StateMachine::open(9, child_dir.join("state"), options(), Arc::new(NoObserver)).unwrap();
    assert_eq!(child.applied(), Some(child_seed(3)));
    assert!(present(&child, &high).iter().all(|&p| p));
    assert!(present(&child, &low).iter().all(|&p| !p));
    let child_range = child.range().unwrap();
    assert_eq!(
        (child_range.start, child_range.end, child_range.version),
        (AT, None, 1)
    );

    eprintln!("--- the parent's rows before = the parent's after + the child's");
    let mut after = sm.store().digest(0, Some(AT)).unwrap();
    after.merge(child.store().digest(AT, None).unwrap());
    assert_eq!(after, before);
    assert_eq!(sm.store().digest(AT, None).unwrap().rows, 0);
    assert_eq!(child.store().digest(0, Some(AT)).unwrap().rows, 0);
    // A replica's own check says the same, at the split's index, whatever
    // range the map would route (each side's log decided its range).
    for (replica, rows, range) in [
        (&sm, low.len(), (0, Some(AT))),
        (&child, high.len(), (AT, None)),
    ] {
        let digest = replica.replica_content((1, Some(2))).unwrap();
        assert_eq!(digest.applied.map(|id| id.index), Some(3));
        let content = &digest.content;
        assert_eq!((content.from_hash, content.to_hash), range);
        assert_eq!(content.inside.rows_stored(), rows as u64);
        assert_eq!(content.outside.rows_stored(), 0, "{content:?}");
    }
    drop(child);

    eprintln!("--- a write of the child's keys sent to the parent is refused, unrecorded");
    let responses = apply(
        &mut sm,
        vec![
            entry(4, 0xC, write(&high, 2)),
            // The same request id, rerouted to keys the parent owns (as the
            // router would after splitting the request): applied.
            entry(5, 0xC, write(&low, 2)),
            // A split decided on the old epoch is refused.
            entry(6, 0xD, split(0)),
        ],
    )
    .await;
    assert!(
        matches!(
            &responses[0],
            Response::Rejected {
                kind: RejectKind::WrongShard,
                ..
            }
        ),
        "{responses:?}"
    );
    assert!(
        matches!(responses[1], Response::Written { rows_applied, .. } if rows_applied == low.len() as u64),
        "{responses:?}"
    );
    assert!(
        matches!(
            &responses[2],
            Response::Rejected {
                kind: RejectKind::WrongShard,
                ..
            }
        ),
        "{responses:?}"
    );
    assert_eq!(sm.applied().map(|id| id.index), Some(6));
    assert_eq!(*children.created.lock(), vec![9], "no second child");
}

/// A network for a group of one voter: nobody to call.
#[derive(Clone)]
struct Alone;

impl RaftNetworkFactory<TypeConfig> for Alone {
    type Network = Alone;
    async fn new_client(&mut self, _target: ReplicaId, _node: &BasicNode) -> Alone {
        Alone
    }
}

fn unreachable() -> RPCError<TypeConfig> {
    RPCError::Unreachable(Unreachable::from_string("alone".to_owned()))
}

impl RaftNetworkV2<TypeConfig> for Alone {
    type SnapshotData = SnapshotDir;

    async fn append_entries(
        &mut self,
        _rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        Err(unreachable())
    }

    async fn vote(
        &mut self,
        _rpc: VoteRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        Err(unreachable())
    }

    async fn full_snapshot(
        &mut self,
        _vote: Vote,
        _snapshot: SnapshotOf<TypeConfig, SnapshotDir>,
        _cancel: impl std::future::Future<Output = ReplicationClosed> + Send + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        Err(unreachable().into())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openraft_opens_a_split_child_elects_and_appends_after_the_seed() {
    let dir = tempfile::tempdir().unwrap();
    let (mut sm, _children) = parent(dir.path(), ReplicaId(1));
    let keys: Vec<String> = (0..50).map(|i| format!("key-{i}")).collect();
    let high: Vec<String> = keys
        .iter()
        .filter(|k| entity_hash(k.as_bytes()) >= AT)
        .cloned()
        .collect();
    apply(
        &mut sm,
        vec![
            membership_entry(),
            entry(2, 0xA, write(&keys, 1)),
            entry(3, 0xB, split(0)),
        ],
    )
    .await;
    drop(sm);

    eprintln!("--- the child's replica opens as a replica at its seed");
    let child_dir = dir.path().join("groups/9");
    let log = LogStore::open(child_dir.join("log"), LogOptions::default()).unwrap();
    let child =
        StateMachine::open(9, child_dir.join("state"), options(), Arc::new(NoObserver)).unwrap();
    let config = Arc::new(
        openraft::Config {
            heartbeat_interval: 50,
            election_timeout_min: 150,
            election_timeout_max: 300,
            ..openraft::Config::default()
        }
        .validate()
        .unwrap(),
    );
    let raft = Raft::new(ReplicaId(1), config, Alone, log, child.clone())
        .await
        .unwrap();
    raft.wait(Some(Duration::from_secs(10)))
        .state(openraft::ServerState::Leader, "the child elects itself")
        .await
        .unwrap();

    eprintln!("--- it takes writes after the seed, in term 1 or later");
    let written = raft
        .client_write(Proposal {
            request_id: 0xE,
            leader_ts_us: 2_000,
            command: write(&high, 3),
        })
        .await
        .unwrap();
    assert!(written.log_id.index > 3, "{:?}", written.log_id);
    assert!(written.log_id.leader_id.term >= 1);
    assert!(
        matches!(written.data, Response::Written { rows_applied, .. } if rows_applied == high.len() as u64),
        "{:?}",
        written.data
    );
    // Its dedup ring came with the checkpoint: the parent's request A is
    // known, so a retry of it reaching the child does nothing.
    let retried = raft
        .client_write(Proposal {
            request_id: 0xA,
            leader_ts_us: 2_100,
            command: write(&high, 1),
        })
        .await
        .unwrap();
    assert_eq!(retried.data, Response::AlreadyApplied);
    raft.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_split_never_applies_and_a_passing_refusal_is_not_kept() {
    let dir = tempfile::tempdir().unwrap();
    let (mut sm, children) = parent(dir.path(), ReplicaId(1));
    let joint = Membership::new(
        vec![
            BTreeSet::from([ReplicaId(1)]),
            BTreeSet::from([ReplicaId(1), ReplicaId(2)]),
        ],
        BTreeMap::from([
            (ReplicaId(1), BasicNode::new("127.0.0.1:1")),
            (ReplicaId(2), BasicNode::new("127.0.0.1:2")),
        ]),
    )
    .unwrap();
    let responses = apply(
        &mut sm,
        vec![
            membership_entry(),
            Entry::new_membership(log_id::<TypeConfig>(1, ReplicaId(1), 2), joint),
            // Refused while joint, and not kept against request B...
            entry(3, 0xB, split(0)),
            // ... so once uniform, the same request splits.
            membership_entry_at(4),
            entry(5, 0xB, split(0)),
            // A fence of another operator's request, then that split: it
            // never applies.
            entry(6, 0xC, Command::Fence),
            entry(
                7,
                0xC,
                Command::Split {
                    child: 10,
                    at: AT >> 1,
                    start: 0,
                    end: Some(AT),
                    version: 1,
                },
            ),
        ],
    )
    .await;
    assert!(
        matches!(
            &responses[2],
            Response::Rejected {
                kind: RejectKind::Conflict,
                ..
            }
        ),
        "{responses:?}"
    );
    assert_eq!(responses[4], Response::Split { child: 9, index: 5 });
    assert_eq!(responses[5], Response::Fenced);
    assert_eq!(responses[6], Response::AlreadyApplied);
    assert_eq!(*children.created.lock(), vec![9]);
    assert_eq!(sm.range().unwrap().children, vec![(9, 5)]);
}

fn membership_entry_at(index: u64) -> Entry {
    let membership = Membership::new(
        vec![BTreeSet::from([ReplicaId(1)])],
        BTreeMap::from([(ReplicaId(1), BasicNode::new("127.0.0.1:1"))]),
    )
    .unwrap();
    Entry::new_membership(log_id::<TypeConfig>(1, ReplicaId(1), index), membership)
}

/// A replica added after the split (a later incarnation of this node's,
/// catching up from the log) replays it: the parent keeps its half, but no
/// child is built, since the child's members are the parent's at the split
/// and this node's replica of it is the one that split.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_added_after_a_split_replays_it_without_building_a_child() {
    let dir = tempfile::tempdir().unwrap();
    let (mut sm, children) = parent(dir.path(), ReplicaId::new(1, 1));
    let keys: Vec<String> = (0..100).map(|i| format!("key-{i}")).collect();
    let (low, high) = halves(&keys);
    let responses = apply(
        &mut sm,
        vec![
            membership_entry(),
            entry(2, 0xA, write(&keys, 1)),
            entry(3, 0xB, split(0)),
        ],
    )
    .await;
    assert_eq!(responses[2], Response::Split { child: 9, index: 3 });
    assert!(children.created.lock().is_empty(), "no child announced");
    let built: Vec<_> = std::fs::read_dir(dir.path().join("groups"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(built, vec!["1.1".to_string()], "no child directory");
    assert!(present(&sm, &low).iter().all(|&p| p));
    assert!(present(&sm, &high).iter().all(|&p| !p));
    assert_eq!(sm.range().unwrap().children, vec![(9, 3)]);
}

/// A split child's log is held for the parent's change-stream consumers
/// from its seed: they follow the parent's range, and a busy child must not
/// purge entries before their first read of its log (a gap in a shipped
/// log). The parent keeps its own holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_split_child_inherits_the_parents_log_consumers_from_its_seed() {
    use quiver_raft::log_store::PurgeHold;

    let dir = tempfile::tempdir().unwrap();
    let (mut sm, _children) = parent(dir.path(), ReplicaId(1));
    let keys: Vec<String> = (0..40).map(|i| format!("key-{i}")).collect();
    let hold = Command::HoldLog {
        consumer: "backup".into(),
        index: 2,
    };
    let responses = apply(
        &mut sm,
        vec![
            membership_entry(),
            entry(2, 0xA, write(&keys, 1)),
            entry(3, 0xB, hold),
            entry(4, 0xC, split(0)),
        ],
    )
    .await;
    assert_eq!(responses[3], Response::Split { child: 9, index: 4 });
    assert_eq!(sm.held_index(), Some(2), "the parent keeps its hold");
    let child = StateMachine::open(
        9,
        dir.path().join("groups/9/state"),
        options(),
        Arc::new(NoObserver),
    )
    .unwrap();
    let holds: Vec<(String, u64)> = child.log_holds().into_iter().collect();
    assert_eq!(holds, vec![("backup".to_string(), 4)], "held from the seed");
    assert_eq!(child.held_index(), Some(4));
}
