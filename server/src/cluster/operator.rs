//! Operators: changes of one shard's replicas or range, carried out by the
//! metadata group's leader one step at a time, as PD's operators are
//! (tikv/pd `pkg/schedule/operator`): a move adds the new replica as a
//! learner, waits until it has caught up (from the log or a snapshot), makes
//! it a voter in place of the old one in one joint membership change, and
//! lets the old one go; a removal takes a voter out; a split proposes the
//! split to the shard and records the new shard.
//!
//! The operator and its step live in the cluster map, so a new metadata
//! leader resumes what the last one started. Each step starts from the map
//! as of a metadata read index (so a leader that has not applied its
//! predecessor's last entries acts on nothing stale) and from the shard
//! leader's membership as it is now, asked anew each time from a confirmed
//! leader; every membership change is guarded by the membership log id it
//! was decided on (`change_membership_if` with `LastMembershipLogId`), so a
//! step that was done already, or a concurrent change, is noticed rather
//! than repeated. The map records `Promote` before the voters change: from
//! then on a move only goes forward (a joint membership is never rolled
//! back); before, a learner that does not catch up in time is taken out of
//! the membership and the operator dropped. An operator is finished (or
//! dropped) in the map only once the shard's membership says so in a
//! committed entry, and members the map does not know (a learner added by a
//! deposed metadata leader's late step) are removed first.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::async_runtime::WatchReceiver;
use openraft::{BasicNode, ChangeMembers, LinearizerOption, ReadPolicy, ServerState};
use parking_lot::Mutex;
use quiver_raft::cluster_map::{ClusterMap, MapCommand, Operator, OperatorKind, OperatorStep};
use quiver_raft::state_machine::RangeDesc;
use quiver_raft::types::{LogId, RejectKind};
use quiver_raft::{Command, GroupId, NodeId, ReplicaId, RequestId, Response};
use serde::{Deserialize, Serialize};

use quiver_raft::failpoint::failpoint;

use super::wire::{PeerCall, PeerResult};
use super::{Cluster, ClusterError};

/// A learner is caught up when its log is at most this many entries behind
/// the leader's (as for a leadership transfer).
const CATCH_UP_ENTRIES_MAX: u64 = super::transfer::TRANSFER_LAG_ENTRIES_MAX;
/// How long a step waits before it looks again.
const STEP_PAUSE: Duration = Duration::from_millis(200);
/// Handovers tried before a leaving leader's replica is removed without one
/// (it then steps down by itself).
const HANDOVER_ATTEMPTS_MAX: u32 = 3;

/// The operators this node is carrying out (one task per shard), and the
/// shards whose last operator was cancelled, which the scheduler leaves
/// alone for a while.
#[derive(Debug, Default)]
pub struct Running {
    shards: Mutex<BTreeSet<GroupId>>,
    backoff: Mutex<HashMap<GroupId, Instant>>,
    /// The nodes each move the scheduler started touched (its target, and
    /// its source if any), and when, for the last [`MOVES_WINDOW`].
    moves: Mutex<std::collections::VecDeque<(Instant, NodeId)>>,
}

/// The window `cluster.moves_per_node_per_minute_max` counts moves over.
pub const MOVES_WINDOW: Duration = Duration::from_secs(60);

impl Running {
    /// Records a move the scheduler started at `now`, into `to` and out of
    /// `from`.
    pub fn moved(&self, now: Instant, from: Option<NodeId>, to: NodeId) {
        let mut moves = self.moves.lock();
        moves.push_back((now, to));
        moves.extend(from.map(|node| (now, node)));
    }

    /// The nodes that took part in at least `max` of the moves recorded in
    /// the [`MOVES_WINDOW`] before `now` (none when `max` is 0: no limit).
    pub fn nodes_at_move_limit(&self, now: Instant, max: u32) -> BTreeSet<NodeId> {
        let mut moves = self.moves.lock();
        while moves
            .front()
            .is_some_and(|&(at, _)| now.saturating_duration_since(at) >= MOVES_WINDOW)
        {
            moves.pop_front();
        }
        if max == 0 {
            return BTreeSet::new();
        }
        let mut counts: HashMap<NodeId, u32> = HashMap::new();
        for &(_, node) in moves.iter() {
            *counts.entry(node).or_default() += 1;
        }
        counts
            .into_iter()
            .filter(|&(_, count)| count >= max)
            .map(|(node, _)| node)
            .collect()
    }

    /// Whether the scheduler should leave `shard` alone now.
    pub fn backing_off(&self, shard: GroupId) -> bool {
        let mut backoff = self.backoff.lock();
        match backoff.get(&shard) {
            Some(until) if *until > Instant::now() => true,
            Some(_) => {
                backoff.remove(&shard);
                false
            }
            None => false,
        }
    }

    fn back_off(&self, shard: GroupId, for_how_long: Duration) {
        self.backoff
            .lock()
            .insert(shard, Instant::now() + for_how_long);
    }
}

/// A shard's membership as its confirmed leader sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardState {
    /// The leader's replica.
    pub leader: ReplicaId,
    /// The leader's term.
    pub term: u64,
    /// The log id of the effective membership.
    pub membership_log_id: Option<LogId>,
    /// Whether the effective membership is committed.
    pub committed: bool,
    /// Its voter sets: one when uniform, two while joint.
    pub voter_sets: Vec<BTreeSet<ReplicaId>>,
    /// Every member (voters and learners).
    pub members: BTreeSet<ReplicaId>,
    /// The leader's last log index.
    pub last_log_index: u64,
    /// How far each member's log matches the leader's.
    pub matched: BTreeMap<ReplicaId, u64>,
    /// The shard's range as its log decided it (`None`: never split).
    pub range: Option<RangeDesc>,
}

impl ShardState {
    /// The voters of the last voter set (the target while joint).
    pub fn voters(&self) -> BTreeSet<ReplicaId> {
        self.voter_sets.last().cloned().unwrap_or_default()
    }

    /// Whether the membership is joint.
    pub fn is_joint(&self) -> bool {
        self.voter_sets.len() > 1
    }
}

/// A membership change a shard leader is asked to make.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MembershipChange {
    /// Add a learner.
    AddLearner {
        /// The replica.
        replica: ReplicaId,
        /// Its node's peer address (informational in openraft's
        /// membership; peers are found through the map).
        addr: String,
    },
    /// Make these the voters; voters not in the set leave the group.
    SetVoters(BTreeSet<ReplicaId>),
    /// Finish a joint membership (its last voter set becomes the only one).
    Flatten,
    /// Remove learners.
    RemoveLearners(BTreeSet<ReplicaId>),
}

/// What one look at an operator decided.
enum Progress {
    /// Done (or gone): stop.
    Finished,
    /// Look again after a pause.
    Wait,
}

/// What a step remembers between looks (on this metadata leader).
#[derive(Debug, Default)]
struct Memory {
    /// Handovers of a leaving leader tried (a handover that returns but
    /// does not move leadership counts too).
    handovers_tried: u32,
}

/// The request id of operator `id`'s split proposal: the same for every
/// attempt, so a retry of one that committed is answered `AlreadyApplied`.
/// Bit 127 set: never an id a node's router hands out (those carry the
/// node id, below 2^32, in the high 64 bits).
fn operator_request_id(id: u64) -> RequestId {
    (1u128 << 127) | u128::from(id)
}

impl Cluster {
    /// Starts a task for every operator in `map` that has none here.
    pub(super) fn run_operators(self: &Arc<Self>, map: &quiver_raft::cluster_map::ClusterMap) {
        for (&shard, op) in &map.operators {
            if !self.operators.shards.lock().insert(shard) {
                continue;
            }
            let cluster = Arc::downgrade(self);
            let id = op.id;
            tokio::spawn(async move {
                carry_out(cluster.clone(), shard, id).await;
                if let Some(cluster) = cluster.upgrade() {
                    cluster.operators.shards.lock().remove(&shard);
                }
            });
        }
    }

    /// Whether the scheduler should leave `shard` alone now (its last
    /// operator was cancelled lately).
    pub(super) fn operator_backing_off(&self, shard: GroupId) -> bool {
        self.operators.backing_off(shard)
    }

    /// The operator `id` on `shard` as the map holds it after a metadata
    /// read index, if it is still there and this node leads the metadata
    /// group.
    async fn current_operator(
        &self,
        shard: GroupId,
        id: u64,
    ) -> Option<(Operator, Arc<ClusterMap>)> {
        if !self.leads_metadata() {
            return None;
        }
        let map = self.current_map().await.ok()?;
        let op = map
            .operators
            .get(&shard)
            .filter(|op| op.id == id)
            .cloned()?;
        Some((op, map))
    }

    fn step_timed_out(&self, op: &Operator) -> bool {
        let waited_us = self.clock.now_us().saturating_sub(op.step_started_us);
        let limit_us = i64::try_from(self.config.operator_catch_up_timeout_ms)
            .unwrap_or(i64::MAX)
            .saturating_mul(1000);
        waited_us > limit_us
    }

    /// One look at an operator: does what its step needs next.
    async fn step(
        &self,
        op: &Operator,
        map: &ClusterMap,
        memory: &mut Memory,
    ) -> Result<Progress, ClusterError> {
        let shard = op.shard;
        if let OperatorKind::Split { at, child } = op.kind {
            return self.split(op, map, at, child).await;
        }
        // A new replica whose node is gone, leaving, or silent for
        // `replace_down_after_ms` will not catch up: the move is rolled
        // back now (and the scheduler plans another), rather than after the
        // catch-up timeout with the shard's other work held up meanwhile.
        // Judged from the map alone: the shard may have no leader to ask.
        if !op.cancelled
            && let (OperatorKind::Move { to, .. }, OperatorStep::AddLearner | OperatorStep::CatchUp) =
                (op.kind, op.step)
            && let Some(why) =
                super::scheduler::must_leave(map, &self.long_down_nodes(map), to.node())
        {
            return self
                .cancel(op, &format!("the new replica {to}: {why}"))
                .await;
        }
        let state = self.shard_state(shard).await?;
        if op.cancelled {
            return self.drop_cancelled(op, &state).await;
        }
        match (op.kind, op.step) {
            (OperatorKind::Move { to, .. }, OperatorStep::AddLearner) => {
                if state.members.contains(&to) {
                    self.advance(op, OperatorStep::CatchUp).await?;
                    return Ok(Progress::Wait);
                }
                if self.step_timed_out(op) {
                    return self
                        .cancel(op, "the new replica could not be added in time")
                        .await;
                }
                let addr = self
                    .placement()
                    .node(to.node())
                    .map(|info| info.peer_addr.clone())
                    .unwrap_or_default();
                self.change_membership(
                    shard,
                    MembershipChange::AddLearner { replica: to, addr },
                    state.membership_log_id,
                )
                .await?;
                failpoint("operator.added_learner");
                Ok(Progress::Wait)
            }
            (OperatorKind::Move { to, .. }, OperatorStep::CatchUp) => {
                let matched = state.matched.get(&to).copied().unwrap_or(0);
                let caught_up = state.voter_sets.iter().any(|set| set.contains(&to))
                    || (matched > 0 && matched + CATCH_UP_ENTRIES_MAX >= state.last_log_index);
                if caught_up {
                    self.advance(op, OperatorStep::Promote).await?;
                    failpoint("operator.promoting");
                    return Ok(Progress::Wait);
                }
                if self.step_timed_out(op) {
                    tracing::warn!(shard, op = op.id, replica = %to, matched, last = state.last_log_index, "the new replica did not catch up in time");
                    return self
                        .cancel(op, "the new replica did not catch up in time")
                        .await;
                }
                Ok(Progress::Wait)
            }
            (OperatorKind::Move { from, to }, OperatorStep::Promote) => {
                let mut target = state.voters();
                if let Some(from) = from {
                    target.remove(&from);
                }
                target.insert(to);
                self.promote(op, &state, target, memory).await
            }
            (OperatorKind::Remove { replica }, _) => {
                let mut target = state.voters();
                target.remove(&replica);
                self.promote(op, &state, target, memory).await
            }
            (OperatorKind::Split { .. }, _) => Ok(Progress::Finished),
        }
    }

    /// Cancels `op` in the map; the next look takes its learner out.
    async fn cancel(&self, op: &Operator, why: &str) -> Result<Progress, ClusterError> {
        tracing::warn!(shard = op.shard, op = op.id, why, "cancelling an operator");
        self.change_map(MapCommand::CancelOperator {
            shard: op.shard,
            id: op.id,
        })
        .await?;
        Ok(Progress::Wait)
    }

    /// A cancelled operator: its new replica out of the membership first,
    /// then (once that is committed) out of the map.
    async fn drop_cancelled(
        &self,
        op: &Operator,
        state: &ShardState,
    ) -> Result<Progress, ClusterError> {
        if let OperatorKind::Move { to, .. } = op.kind
            && state.members.contains(&to)
        {
            self.change_membership(
                op.shard,
                MembershipChange::RemoveLearners(BTreeSet::from([to])),
                state.membership_log_id,
            )
            .await?;
            return Ok(Progress::Wait);
        }
        if !state.committed {
            return Ok(Progress::Wait);
        }
        self.change_map(MapCommand::DropOperator {
            shard: op.shard,
            id: op.id,
        })
        .await?;
        // Leave the shard alone for a while: the same move would likely
        // fail the same way.
        self.operators.back_off(
            op.shard,
            Duration::from_millis(self.config.operator_catch_up_timeout_ms),
        );
        tracing::info!(shard = op.shard, op = op.id, "operator cancelled");
        Ok(Progress::Finished)
    }

    /// Brings the voters to `target` and every other member out of the
    /// group, then (once committed) finishes the operator in the map.
    async fn promote(
        &self,
        op: &Operator,
        state: &ShardState,
        target: BTreeSet<ReplicaId>,
        memory: &mut Memory,
    ) -> Result<Progress, ClusterError> {
        let shard = op.shard;
        if target.is_empty() {
            return Err(ClusterError::Refused {
                group: shard,
                message: "the operator would leave the shard without a voter".into(),
            });
        }
        if state.is_joint() {
            self.change_membership(shard, MembershipChange::Flatten, state.membership_log_id)
                .await?;
            return Ok(Progress::Wait);
        }
        if state.voters() != target {
            if !target.contains(&state.leader) && memory.handovers_tried < HANDOVER_ATTEMPTS_MAX {
                // Hand over first: a leader that removes itself steps down
                // on its own, outside the handover that voids its lease.
                // To a voter that stays, is up, and is furthest along.
                let candidate = state
                    .voters()
                    .intersection(&target)
                    .copied()
                    .filter(|r| self.node_up(r.node()))
                    .max_by_key(|r| state.matched.get(r).copied().unwrap_or(0));
                if let Some(to) = candidate {
                    tracing::info!(shard, to = %to, "handing over before the leader's replica leaves");
                    memory.handovers_tried += 1;
                    if let Err(e) = self.transfer_leader(shard, to.node()).await {
                        tracing::info!(shard, error = %e, "handover before a removal failed");
                    }
                    return Ok(Progress::Wait);
                }
            }
            self.change_membership(
                shard,
                MembershipChange::SetVoters(target),
                state.membership_log_id,
            )
            .await?;
            failpoint("operator.voters_changed");
            return Ok(Progress::Wait);
        }
        // Members that do not belong: the leaving replica if it stayed as a
        // learner, and learners the map does not know.
        let strays: BTreeSet<ReplicaId> = state.members.difference(&target).copied().collect();
        if !strays.is_empty() {
            self.change_membership(
                shard,
                MembershipChange::RemoveLearners(strays),
                state.membership_log_id,
            )
            .await?;
            return Ok(Progress::Wait);
        }
        if !state.committed {
            // A new leader could still revert an uncommitted membership.
            return Ok(Progress::Wait);
        }
        failpoint("operator.finishing");
        self.change_map(MapCommand::FinishOperator { shard, id: op.id })
            .await?;
        tracing::info!(shard, op = op.id, kind = ?op.kind, "operator finished");
        Ok(Progress::Finished)
    }

    /// A split: proposed to the shard with a request id fixed per operator
    /// (a retry of one that applied is answered `AlreadyApplied`), and
    /// recorded in the map (with the split's index) once the shard's range
    /// lists the child. A cancelled split is fenced first: a fence with the
    /// same request id, once applied, keeps any copy of the split still in
    /// flight from applying; then the range says whether it had applied
    /// (it is recorded: it stands) or not (the operator is dropped).
    async fn split(
        &self,
        op: &Operator,
        map: &ClusterMap,
        at: u64,
        child: GroupId,
    ) -> Result<Progress, ClusterError> {
        let shard = op.shard;
        let request_id = operator_request_id(op.id);
        if op.cancelled {
            match self
                .propose_with_id(shard, Command::Fence, Some(request_id))
                .await
            {
                Ok((Response::Fenced | Response::AlreadyApplied, _)) => {}
                Ok((other, _)) => {
                    return Err(ClusterError::Refused {
                        group: shard,
                        message: format!("unexpected answer to a fence: {other:?}"),
                    });
                }
                Err(e) => return Err(e),
            }
        }
        let state = self.shard_state(shard).await?;
        let applied = state
            .range
            .as_ref()
            .and_then(|range| range.children.iter().find(|&&(c, _)| c == child))
            .map(|&(_, index)| index);
        if let Some(index) = applied {
            return self.finish_split(op, at, child, index).await;
        }
        if op.cancelled {
            self.change_map(MapCommand::DropOperator { shard, id: op.id })
                .await?;
            tracing::info!(shard, op = op.id, "split cancelled before it applied");
            return Ok(Progress::Finished);
        }
        let desc = map
            .shards
            .get(&shard)
            .ok_or(ClusterError::NoSuchGroup(shard))?;
        // A split copies the parent's membership: only a settled one that
        // the map agrees with (no learner half added, no joint config).
        let listed: BTreeSet<ReplicaId> = desc.replicas.iter().map(|r| r.id).collect();
        if state.is_joint() || !state.committed || state.members != listed {
            tracing::info!(shard, "a split waits for the shard's membership to settle");
            return Ok(Progress::Wait);
        }
        let command = Command::Split {
            child,
            at,
            start: desc.start,
            end: desc.end,
            version: desc.epoch.version,
        };
        failpoint("operator.split_proposing");
        match self.propose_with_id(shard, command, Some(request_id)).await {
            Ok((Response::Split { index, .. }, _)) => {
                failpoint("operator.split_applied");
                // Applied on the shard's leader: the map learns of it at
                // once, so routers move on to the child without waiting.
                self.finish_split(op, at, child, index).await
            }
            // Applied by an earlier attempt: the next look finds its index.
            Ok((Response::AlreadyApplied, _)) => Ok(Progress::Wait),
            Ok((other, _)) => Err(ClusterError::Refused {
                group: shard,
                message: format!("unexpected answer to a split: {other:?}"),
            }),
            Err(ClusterError::Rejected {
                kind: RejectKind::WrongShard | RejectKind::Invalid,
                message,
            }) => {
                // The shard's range is not the one the map knows, or the cut
                // is outside it: this split cannot happen.
                tracing::error!(shard, %message, "a split was refused");
                self.change_map(MapCommand::CancelOperator { shard, id: op.id })
                    .await?;
                Ok(Progress::Wait)
            }
            // Passing (a membership change under way): tried again.
            Err(e) => Err(e),
        }
    }

    async fn finish_split(
        &self,
        op: &Operator,
        at: u64,
        child: GroupId,
        index: u64,
    ) -> Result<Progress, ClusterError> {
        self.change_map(MapCommand::FinishSplit {
            shard: op.shard,
            id: op.id,
            index,
        })
        .await?;
        tracing::info!(
            shard = op.shard,
            child,
            at = format_args!("{at:#018x}"),
            index,
            "split recorded in the map"
        );
        Ok(Progress::Finished)
    }

    async fn advance(&self, op: &Operator, step: OperatorStep) -> Result<(), ClusterError> {
        tracing::info!(shard = op.shard, op = op.id, %step, "operator step");
        self.change_map(MapCommand::AdvanceOperator {
            shard: op.shard,
            id: op.id,
            step,
        })
        .await
        .map(|_| ())
    }

    /// A shard's membership, from its confirmed leader.
    pub async fn shard_state(&self, shard: GroupId) -> Result<ShardState, ClusterError> {
        self.route(shard, self.first_target(shard), |target| async move {
            let result = if target == self.node_id {
                self.shard_state_local(shard).await
            } else {
                self.clients
                    .forward(target, shard, &PeerCall::ShardState)
                    .await
                    .unwrap_or_else(|e| PeerResult::Failed(e.to_string()))
            };
            match result {
                PeerResult::ShardState(state) => Ok(*state),
                other => Err(other),
            }
        })
        .await
    }

    /// Asks a shard's leader to change its membership, if its membership is
    /// still the one at `expect`.
    async fn change_membership(
        &self,
        shard: GroupId,
        change: MembershipChange,
        expect: Option<LogId>,
    ) -> Result<(), ClusterError> {
        tracing::info!(shard, ?change, "membership change");
        let outcome = self
            .route(shard, self.first_target(shard), |target| {
                let change = change.clone();
                async move {
                    let result = if target == self.node_id {
                        self.change_membership_local(shard, change, expect).await
                    } else {
                        self.clients
                            .forward(
                                target,
                                shard,
                                &PeerCall::ChangeMembership { change, expect },
                            )
                            .await
                            .unwrap_or_else(|e| PeerResult::Failed(e.to_string()))
                    };
                    match result {
                        PeerResult::MembershipChanged { .. } => Ok(Ok(())),
                        // The membership moved on: the next look decides
                        // again from the new one.
                        PeerResult::Refused(message) => Ok(Err(message)),
                        other => Err(other),
                    }
                }
            })
            .await?;
        outcome.map_err(|message| ClusterError::Refused {
            group: shard,
            message,
        })
    }

    /// The leader's side of [`Self::shard_state`]: confirmed by a read
    /// index, so a deposed leader does not answer with its stale view.
    pub async fn shard_state_local(&self, shard: GroupId) -> PeerResult {
        let Some(hosted) = self.host.get(shard) else {
            return PeerResult::NoSuchGroup;
        };
        self.activity(shard).await;
        if let Err(refused) = self
            .confirm_leadership(&hosted, LinearizerOption::from(ReadPolicy::ReadIndex))
            .await
        {
            return refused;
        }
        let metrics = hosted.raft.metrics();
        let m = metrics.borrow_watched();
        if m.state != ServerState::Leader {
            return PeerResult::NotLeader {
                leader: m.current_leader.map(ReplicaId::node),
            };
        }
        let membership = m.membership_config.membership();
        PeerResult::ShardState(Box::new(ShardState {
            leader: hosted.replica,
            term: m.current_term,
            membership_log_id: *m.membership_config.log_id(),
            committed: m.membership_config.log_id() == m.committed_membership_config.log_id(),
            voter_sets: membership.get_joint_config().clone(),
            members: membership.nodes().map(|(id, _)| *id).collect(),
            last_log_index: m.last_log_index.unwrap_or(0),
            matched: m
                .replication
                .as_ref()
                .map(|replication| {
                    replication
                        .iter()
                        .map(|(id, log)| (*id, log.as_ref().map_or(0, |l| l.index)))
                        .collect()
                })
                .unwrap_or_default(),
            range: hosted.state.range(),
        }))
    }

    /// The leader's side of [`Self::change_membership`].
    pub async fn change_membership_local(
        &self,
        shard: GroupId,
        change: MembershipChange,
        expect: Option<LogId>,
    ) -> PeerResult {
        let Some(hosted) = self.host.get(shard) else {
            return PeerResult::NoSuchGroup;
        };
        self.activity(shard).await;
        // Fault tests stop the shard leader right after the change.
        let point = match change {
            MembershipChange::AddLearner { .. } => "shard.learner_added",
            MembershipChange::SetVoters(_) => "shard.voters_changed",
            MembershipChange::Flatten | MembershipChange::RemoveLearners(_) => {
                "shard.membership_changed"
            }
        };
        let (changes, retain) = match change {
            MembershipChange::AddLearner { replica, addr } => (
                ChangeMembers::AddNodes(BTreeMap::from([(replica, BasicNode::new(addr))])),
                true,
            ),
            MembershipChange::SetVoters(voters) => (ChangeMembers::ReplaceAllVoters(voters), false),
            MembershipChange::Flatten => (ChangeMembers::AddVoterIds(BTreeSet::new()), false),
            MembershipChange::RemoveLearners(learners) => {
                (ChangeMembers::RemoveNodes(learners), false)
            }
        };
        let precondition = openraft::raft::Precondition::LastMembershipLogId {
            last_membership_log_id: expect,
        };
        let change = hosted
            .raft
            .change_membership_if(changes, retain, [precondition]);
        match tokio::time::timeout(self.peer_timeout(), change).await {
            Err(_) => PeerResult::Failed("membership change timed out (no quorum?)".into()),
            Ok(Ok(written)) => {
                failpoint(point);
                PeerResult::MembershipChanged {
                    log_id: written.log_id,
                }
            }
            Ok(Err(e)) => match e.forward_to_leader() {
                Some(forward) => PeerResult::NotLeader {
                    leader: forward.leader_id.map(ReplicaId::node),
                },
                None => match e {
                    openraft::errors::RaftError::APIError(api) => {
                        PeerResult::Refused(api.to_string())
                    }
                    fatal => PeerResult::Failed(fatal.to_string()),
                },
            },
        }
    }
}

/// Carries out operator `id` on `shard` until it is finished, cancelled,
/// or this node no longer leads the metadata group.
async fn carry_out(cluster: std::sync::Weak<Cluster>, shard: GroupId, id: u64) {
    let mut memory = Memory::default();
    loop {
        let progress = {
            let Some(cluster) = cluster.upgrade() else {
                return;
            };
            if cluster.is_stopping() {
                return;
            }
            let Some((op, map)) = cluster.current_operator(shard, id).await else {
                return;
            };
            cluster.step(&op, &map, &mut memory).await
        };
        match progress {
            Ok(Progress::Finished) => return,
            Ok(Progress::Wait) => {}
            Err(e) => tracing::info!(shard, op = id, error = %e, "operator step failed; retrying"),
        }
        tokio::time::sleep(STEP_PAUSE).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A node is at its limit once it took part in `max` moves within the
    /// window, as target or source, and free again once they age out; 0 is
    /// no limit.
    #[test]
    fn moves_count_per_node_over_a_minute() {
        let running = Running::default();
        let t0 = Instant::now();
        running.moved(t0, Some(1), 4);
        running.moved(t0 + Duration::from_secs(30), None, 4);
        running.moved(t0 + Duration::from_secs(40), Some(2), 3);
        let at = |secs, max| running.nodes_at_move_limit(t0 + Duration::from_secs(secs), max);
        assert_eq!(at(50, 2), BTreeSet::from([4]));
        assert_eq!(at(50, 1), BTreeSet::from([1, 2, 3, 4]));
        assert!(at(50, 0).is_empty(), "no limit");
        // The first move ages out: node 4 has one left, node 1 none.
        assert_eq!(at(61, 1), BTreeSet::from([2, 3, 4]));
        assert!(at(61, 2).is_empty());
        assert!(at(101, 1).is_empty());
    }
}
