//! Operators: changes of one shard's replicas, carried out by the metadata
//! group's leader one step at a time, as PD's operators are (tikv/pd
//! `pkg/schedule/operator`): add the new replica as a learner, wait until it
//! has caught up (from the log or a snapshot), make it a voter in place of
//! the old one in one joint membership change, let the old one go.
//!
//! The operator and its step live in the cluster map, so a new metadata
//! leader resumes what the last one started. Every step is decided from
//! the shard leader's membership as it is now (asked anew each time) and
//! guarded by the membership log id it was decided on
//! (`change_membership_if` with `LastMembershipLogId`), so a step that was
//! done already, or a concurrent change, is noticed rather than repeated.
//! The map records `Promote` before the voters change: from then on the
//! operator only goes forward (a joint membership is never rolled back);
//! before, a learner that does not catch up in time is removed and the
//! operator cancelled.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use openraft::async_runtime::WatchReceiver;
use openraft::{BasicNode, ChangeMembers, ServerState};
use parking_lot::Mutex;
use quiver_raft::cluster_map::{
    ClusterMap, MapCommand, Operator, OperatorKind, OperatorStep, ReplicaDesc, ReplicaRole,
};
use quiver_raft::types::LogId;
use quiver_raft::{GroupId, METADATA_GROUP, ReplicaId};
use serde::{Deserialize, Serialize};

use super::wire::{PeerCall, PeerResult};
use super::{Cluster, ClusterError};

/// A learner is caught up when its log is at most this many entries behind
/// the leader's (as for a leadership transfer).
const CATCH_UP_ENTRIES_MAX: u64 = super::transfer::TRANSFER_LAG_ENTRIES_MAX;
/// How long a step waits before it looks again.
const STEP_PAUSE: Duration = Duration::from_millis(200);

/// The operators this node is carrying out, by shard (one task each).
#[derive(Debug, Default)]
pub struct Running {
    shards: Mutex<BTreeSet<GroupId>>,
}

/// A shard's membership as its leader sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardState {
    /// The leader's replica.
    pub leader: ReplicaId,
    /// The leader's term.
    pub term: u64,
    /// The log id of the effective membership.
    pub membership_log_id: Option<LogId>,
    /// Its voter sets: one when uniform, two while joint.
    pub voter_sets: Vec<BTreeSet<ReplicaId>>,
    /// Every member (voters and learners).
    pub members: BTreeSet<ReplicaId>,
    /// The leader's last log index.
    pub last_log_index: u64,
    /// How far each member's log matches the leader's.
    pub matched: BTreeMap<ReplicaId, u64>,
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

    /// The members that do not vote.
    pub fn learners(&self) -> BTreeSet<ReplicaId> {
        let voting: BTreeSet<ReplicaId> = self.voter_sets.iter().flatten().copied().collect();
        self.members.difference(&voting).copied().collect()
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

impl Cluster {
    /// Starts a task for every operator in `map` that has none here.
    pub(super) fn run_operators(self: &Arc<Self>, map: &ClusterMap) {
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

    /// The operator `id` on `shard` as the map holds it now, if it is still
    /// there and this node still leads the metadata group.
    fn current_operator(&self, shard: GroupId, id: u64) -> Option<Operator> {
        if !self.leads_metadata() {
            return None;
        }
        let map = self.host.get(METADATA_GROUP)?.state.cluster_map()?;
        map.operators.get(&shard).filter(|op| op.id == id).cloned()
    }

    /// One look at an operator: does what its step needs next.
    async fn step(&self, op: &Operator) -> Result<Progress, ClusterError> {
        let shard = op.shard;
        let state = self.shard_state(shard).await?;
        if op.cancelled {
            // Out of the membership first, then out of the map: a replica
            // the map forgot must not stay a member.
            if let OperatorKind::Move { to, .. } = op.kind
                && state.members.contains(&to)
            {
                self.change_membership(
                    shard,
                    MembershipChange::RemoveLearners(BTreeSet::from([to])),
                    state.membership_log_id,
                )
                .await?;
                return Ok(Progress::Wait);
            }
            self.change_map(MapCommand::DropOperator { shard, id: op.id })
                .await?;
            tracing::info!(shard, op = op.id, "operator cancelled");
            return Ok(Progress::Finished);
        }
        match (op.kind, op.step) {
            (OperatorKind::Move { to, .. }, OperatorStep::AddLearner) => {
                if state.members.contains(&to) {
                    self.advance(op, OperatorStep::CatchUp).await?;
                    return Ok(Progress::Wait);
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
                Ok(Progress::Wait)
            }
            (OperatorKind::Move { to, .. }, OperatorStep::CatchUp) => {
                let matched = state.matched.get(&to).copied().unwrap_or(0);
                let caught_up = state.voter_sets.iter().any(|set| set.contains(&to))
                    || (matched > 0 && matched + CATCH_UP_ENTRIES_MAX >= state.last_log_index);
                if caught_up {
                    self.advance(op, OperatorStep::Promote).await?;
                    return Ok(Progress::Wait);
                }
                let waited_us = self.clock.now_us().saturating_sub(op.step_started_us);
                let limit_us = i64::try_from(self.config.operator_catch_up_timeout_ms)
                    .unwrap_or(i64::MAX)
                    .saturating_mul(1000);
                if waited_us > limit_us {
                    tracing::warn!(shard, op = op.id, replica = %to, matched, last = state.last_log_index, "the new replica did not catch up in time; cancelling");
                    self.change_map(MapCommand::CancelOperator { shard, id: op.id })
                        .await?;
                }
                Ok(Progress::Wait)
            }
            (OperatorKind::Move { from, to }, OperatorStep::Promote) => {
                let mut target = state.voters();
                if let Some(from) = from {
                    target.remove(&from);
                }
                target.insert(to);
                let leaving: BTreeSet<ReplicaId> = from.into_iter().collect();
                self.promote(op, &state, target, &leaving).await
            }
            (OperatorKind::Remove { replica }, _) => {
                let mut target = state.voters();
                target.remove(&replica);
                self.promote(op, &state, target, &BTreeSet::from([replica]))
                    .await
            }
        }
    }

    /// Brings the voters to `target` and the `leaving` replicas out of the
    /// group, then finishes the operator in the map.
    async fn promote(
        &self,
        op: &Operator,
        state: &ShardState,
        target: BTreeSet<ReplicaId>,
        leaving: &BTreeSet<ReplicaId>,
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
            if leaving.contains(&state.leader) {
                // Hand over first: a leader that removes itself steps down
                // on its own, outside the handover that voids its lease.
                let to = target
                    .iter()
                    .find(|r| state.voters().contains(r))
                    .or_else(|| target.iter().next())
                    .copied()
                    .map_or(0, ReplicaId::node);
                tracing::info!(shard, to, "handing over before the leader's replica leaves");
                self.transfer_leader(shard, to).await?;
                return Ok(Progress::Wait);
            }
            self.change_membership(
                shard,
                MembershipChange::SetVoters(target),
                state.membership_log_id,
            )
            .await?;
            return Ok(Progress::Wait);
        }
        let stragglers: BTreeSet<ReplicaId> =
            state.members.intersection(leaving).copied().collect();
        if !stragglers.is_empty() {
            self.change_membership(
                shard,
                MembershipChange::RemoveLearners(stragglers),
                state.membership_log_id,
            )
            .await?;
            return Ok(Progress::Wait);
        }
        let replicas: Vec<ReplicaDesc> = state
            .members
            .iter()
            .map(|&id| ReplicaDesc {
                id,
                role: if target.contains(&id) {
                    ReplicaRole::Voter
                } else {
                    ReplicaRole::Learner
                },
            })
            .collect();
        self.change_map(MapCommand::FinishOperator {
            shard,
            id: op.id,
            replicas,
        })
        .await?;
        tracing::info!(shard, op = op.id, kind = ?op.kind, "operator finished");
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

    /// A shard's membership, from its leader.
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
                PeerResult::ShardState(state) => Ok(state),
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

    /// The leader's side of [`Self::shard_state`].
    pub async fn shard_state_local(&self, shard: GroupId) -> PeerResult {
        let Some(hosted) = self.host.get(shard) else {
            return PeerResult::NoSuchGroup;
        };
        self.activity(shard).await;
        let metrics = hosted.raft.metrics();
        let m = metrics.borrow_watched();
        if m.state != ServerState::Leader {
            return PeerResult::NotLeader {
                leader: m.current_leader.map(ReplicaId::node),
            };
        }
        let membership = m.membership_config.membership();
        PeerResult::ShardState(ShardState {
            leader: hosted.replica,
            term: m.current_term,
            membership_log_id: *m.membership_config.log_id(),
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
        })
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
            Ok(Ok(written)) => PeerResult::MembershipChanged {
                log_id: written.log_id,
            },
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
    loop {
        let progress = {
            let Some(cluster) = cluster.upgrade() else {
                return;
            };
            if cluster.is_stopping() {
                return;
            }
            let Some(op) = cluster.current_operator(shard, id) else {
                return;
            };
            cluster.step(&op).await
        };
        match progress {
            Ok(Progress::Finished) => return,
            Ok(Progress::Wait) => {}
            Err(e) => tracing::info!(shard, op = id, error = %e, "operator step failed; retrying"),
        }
        tokio::time::sleep(STEP_PAUSE).await;
    }
}
