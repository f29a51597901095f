//! Read levels on this node's replica: whether it may serve a read at
//! STRONG (read index), LEADER (lease) or REPLICA (bounded staleness) now,
//! and the waits those take (docs/replication.md says each level's
//! guarantee).

use std::time::Duration;

use openraft::async_runtime::WatchReceiver;
use openraft::{LinearizerOption, ReadPolicy, ServerState};
use quiver_raft::{GroupId, METADATA_GROUP, ReplicaId};

use super::wire::{PeerCall, PeerResult, ReadLevel};
use super::{Cluster, ClusterError, Group, ReadSource};

/// How much shorter than openraft's leader lease a read trusts it.
const LEASE_MARGIN_MS: u64 = 100;

impl Cluster {
    /// Whether this node may serve a read of `group` at `level` now (for
    /// STRONG, after confirming leadership and catching up to the read
    /// index). The error is the routing answer for the caller.
    pub async fn check_local_read(
        &self,
        group: GroupId,
        level: ReadLevel,
    ) -> Result<ReadSource, PeerResult> {
        let Some(hosted) = self.host.get(group) else {
            return Err(PeerResult::NoSuchGroup);
        };
        let hosted = &*hosted;
        // The fields a read needs, copied under the watch borrow (which must
        // not be held across an await).
        let (is_leader, current_leader, mut applied_index, committed, lease_valid) = {
            let metrics = hosted.raft.metrics();
            let m = metrics.borrow_watched();
            let is_leader = m.state == ServerState::Leader;
            (
                is_leader,
                m.current_leader.map(ReplicaId::node),
                m.last_applied.map_or(0, |id| id.index),
                m.cluster_committed.map_or(0, |id| id.index),
                is_leader && self.lease_valid(hosted, &m),
            )
        };
        if is_leader {
            self.activity(group).await;
        }
        let policy = match level {
            // Whatever this replica holds, leader or not: the caller marks it
            // STALE.
            ReadLevel::Any => None,
            ReadLevel::Strong => Some(LinearizerOption::from(ReadPolicy::ReadIndex)),
            ReadLevel::Leader if !is_leader => {
                return Err(PeerResult::NotLeader {
                    leader: current_leader,
                });
            }
            // A leader serves its own state only under a lease: a quorum
            // acknowledged it less than a lease ago (so no other leader can
            // have been elected since), and it has applied an entry of its
            // own term (so it holds every write acknowledged by a previous
            // leader). Otherwise it renews the lease first, with a heartbeat
            // round, which also finds out if it was deposed.
            ReadLevel::Leader | ReadLevel::Replica { .. } if is_leader => {
                (!lease_valid).then(|| LinearizerOption::new(Some(self.read_lease()), true))
            }
            ReadLevel::Replica { within_ms } => {
                let caught_up =
                    applied_index.saturating_add(self.config.replica_lag_entries_max) >= committed;
                let fresh = caught_up
                    && if within_ms == 0 {
                        // The default: a follower that knows its leader,
                        // heard from it within the lease.
                        current_leader.is_some_and(|leader| {
                            self.replica_fresh(
                                group,
                                Some(leader),
                                applied_index,
                                self.config.election_timeout_max_ms,
                            )
                        })
                    } else {
                        // The caller's budget: also while an election is
                        // under way (its leader gone), within the window.
                        self.replica_fresh(group, current_leader, applied_index, within_ms)
                    };
                if !fresh {
                    return Err(PeerResult::NotLeader {
                        leader: current_leader,
                    });
                }
                None
            }
            ReadLevel::Leader => None,
        };
        if let Some(policy) = policy {
            self.confirm_leadership(hosted, policy).await?;
            // It waited for apply: read the position again.
            applied_index = hosted
                .raft
                .metrics()
                .borrow_watched()
                .last_applied
                .map_or(0, |id| id.index);
        }
        Ok(ReadSource {
            group,
            node_id: self.node_id,
            leader: is_leader,
            applied_index,
        })
    }

    /// Whether a leader's lease lets it serve reads from its own state now
    /// (see `check_local_read`). A lone voter is its own quorum.
    /// A leader that started a handover has none: it told the voters they
    /// may elect another at once.
    pub(super) fn lease_valid(
        &self,
        hosted: &Group,
        m: &openraft::RaftMetrics<quiver_raft::TypeConfig>,
    ) -> bool {
        if hosted.handed_over_in(m.current_term) {
            return false;
        }
        if let Some((term, version)) = *hosted.splitting.lock()
            && term == m.current_term
            && hosted.state.range().map_or(0, |range| range.version) == version
        {
            return false;
        }
        let own_term_applied = m
            .last_applied
            .is_some_and(|id| id.leader_id.term == m.current_term);
        let membership = m.membership_config.membership();
        let alone = membership.voter_ids().eq([hosted.replica]);
        // A leader whose own replica left the voters (an operator removed
        // it) steps down on its own, outside any handover: no lease.
        let voting = membership.voter_ids().any(|v| v == hosted.replica);
        let lease = self.read_lease();
        own_term_applied
            && voting
            && (alone
                || m.last_quorum_acked.as_ref().is_some_and(|acked| {
                    <openraft::TokioInstant as openraft::Instant>::now() < **acked + lease
                }))
    }

    /// Confirms with a quorum that this replica leads `hosted` (a read index
    /// or a lease renewal, as `option` says) and waits until it has applied
    /// everything committed before; the error is the routing answer.
    pub(super) async fn confirm_leadership(
        &self,
        hosted: &Group,
        option: LinearizerOption,
    ) -> Result<(), PeerResult> {
        let started = std::time::Instant::now();
        match tokio::time::timeout(self.peer_timeout(), hosted.raft.ensure_linearizable(option))
            .await
        {
            Err(_) => {
                // No quorum answered: calls in flight may blame the shard.
                self.shard_breakers.attempt_failed(hosted.group, started);
                Err(PeerResult::Failed(
                    "confirming leadership timed out (no quorum?)".into(),
                ))
            }
            Ok(Err(e)) => Err(match e.forward_to_leader() {
                Some(forward) => PeerResult::NotLeader {
                    leader: forward.leader_id.map(ReplicaId::node),
                },
                None => PeerResult::Failed(e.to_string()),
            }),
            Ok(Ok(_)) => Ok(()),
        }
    }

    /// How old a quorum's acknowledgement may be for a leader to serve reads
    /// from its own state: openraft's lease (election_timeout_max), less a
    /// margin for the clocks of leader and followers running at slightly
    /// different rates.
    pub(super) fn read_lease(&self) -> Duration {
        Duration::from_millis(
            self.config
                .election_timeout_max_ms
                .saturating_sub(LEASE_MARGIN_MS),
        )
    }

    /// The leader side of a read index: confirms leadership and returns an
    /// applied index covering every entry committed before the call.
    pub async fn read_index_local(&self, group: GroupId) -> PeerResult {
        self.position_local(group, ReadLevel::Strong).await
    }

    /// [`Self::read_index_local`] under the leader's lease, as a `LEADER`
    /// read: while the lease holds, the leader's applied index (which
    /// covers every acknowledged entry: an entry is acknowledged once the
    /// leader applied it) with no round trip; else after a heartbeat round.
    pub async fn lease_read_index_local(&self, group: GroupId) -> PeerResult {
        self.position_local(group, ReadLevel::Leader).await
    }

    async fn position_local(&self, group: GroupId, level: ReadLevel) -> PeerResult {
        match self.check_local_read(group, level).await {
            // The state machine's own position, if further: it answers a
            // proposal as it applies it, before openraft's metrics (which
            // `check_local_read` reads) count the entry applied, so an entry
            // already acknowledged may be past the metrics' index.
            Ok(source) => PeerResult::ReadIndex {
                applied_index: self.host.get(group).map_or(source.applied_index, |hosted| {
                    hosted
                        .state
                        .applied()
                        .map_or(0, |id| id.index)
                        .max(source.applied_index)
                }),
            },
            Err(result) => result,
        }
    }

    /// Waits until this node's replica of `group` has applied `index`.
    pub async fn wait_applied(&self, group: GroupId, index: u64, timeout: Duration) -> bool {
        let Some(hosted) = self.host.get(group) else {
            return false;
        };
        hosted
            .raft
            .wait(Some(timeout))
            .applied_index_at_least(Some(index), "caught up")
            .await
            .is_ok()
    }

    /// Brings this node's metadata replica up to date with the leader's
    /// commit, at a read index (no clock assumption): what the cluster's own
    /// decisions (operators, replica deletion, expiry, restores) start from.
    pub async fn sync_metadata(&self) -> Result<(), ClusterError> {
        self.sync_metadata_at(false).await
    }

    /// [`Self::sync_metadata`] at the metadata leader's lease instead of a
    /// read index: what client requests resolve view names at. It holds
    /// every view change acknowledged before the call under the assumption
    /// `LEADER` reads make (bounded clock drift), and costs the leader no
    /// quorum round while its lease holds: with a read index, every write
    /// in the cluster made the metadata leader send a heartbeat round
    /// (1,800 a second at 2,600 writes/s, 3 nodes).
    pub async fn sync_metadata_leased(&self) -> Result<(), ClusterError> {
        self.sync_metadata_at(true).await
    }

    async fn sync_metadata_at(&self, leased: bool) -> Result<(), ClusterError> {
        let read_index = self
            .route(
                METADATA_GROUP,
                self.first_target(METADATA_GROUP),
                |target| async move {
                    let result = if target == self.node_id && leased {
                        self.lease_read_index_local(METADATA_GROUP).await
                    } else if target == self.node_id {
                        self.read_index_local(METADATA_GROUP).await
                    } else {
                        // The peer may itself wait a peer timeout for its read
                        // index: forward, which allows twice that.
                        let started = std::time::Instant::now();
                        let call = if leased {
                            PeerCall::LeaseReadIndex
                        } else {
                            PeerCall::ReadIndex
                        };
                        self.clients
                            .forward(target, METADATA_GROUP, &call)
                            .await
                            .map(|answer| self.peer_answered(METADATA_GROUP, answer, started))
                            .unwrap_or_else(|e| self.peer_failed(METADATA_GROUP, e, started))
                    };
                    match result {
                        PeerResult::ReadIndex { applied_index } => {
                            self.shard_breakers.attempt_succeeded(METADATA_GROUP);
                            Ok(applied_index)
                        }
                        other => Err(other),
                    }
                },
            )
            .await;
        let index = read_index?;
        if self
            .wait_applied(METADATA_GROUP, index, self.peer_timeout())
            .await
        {
            Ok(())
        } else {
            Err(ClusterError::Unavailable {
                group: METADATA_GROUP,
                attempts: 1,
                last: format!(
                    "this node's metadata replica did not reach the read index {index} in time"
                ),
            })
        }
    }
}
