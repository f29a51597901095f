//! Leadership transfer: a group's leader hands leadership to a chosen voter,
//! which campaigns at once instead of after an election timeout. Used by the
//! admin `TransferLeader` call and by a node that shuts down.
//!
//! A leader that starts a transfer stops proposing (openraft answers
//! "forward to the target"), and the voters it tells drop their leader lease
//! so they may vote at once. Its own lease is therefore void from that
//! moment: [`Group::handed_over_term`] records the term, and LEADER and
//! REPLICA reads on this replica stop trusting the lease for that term
//! (`Cluster::lease_valid`), whether or not the transfer completes.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use openraft::ServerState;
use openraft::async_runtime::WatchReceiver;
use quiver_raft::{GroupId, NodeId, ReplicaId};

use super::wire::{PeerCall, PeerResult};
use super::{Cluster, ClusterError, Group};

/// How far (in entries) the target's replicated log may trail the leader's
/// last log for a transfer to start: the target must catch up before it can
/// win, and every write waits meanwhile. TiKV refuses beyond 128 too.
pub const TRANSFER_LAG_ENTRIES_MAX: u64 = 128;

/// How long a stopping node waits for its groups' handovers, all together.
pub const SHUTDOWN_HANDOVER_WAIT: Duration = Duration::from_secs(3);

/// What a completed handover reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandedOver {
    /// The leader now.
    pub leader: NodeId,
    /// Its term.
    pub term: u64,
    /// Whether leadership moved (false: the target already led).
    pub moved: bool,
    /// How long the handover took on the old leader.
    pub elapsed_ms: u64,
}

impl Group {
    /// Whether this replica started a handover in `term` (its lease for
    /// that term is void).
    pub(super) fn handed_over_in(&self, term: u64) -> bool {
        let marked = self.handed_over_term.load(Ordering::SeqCst);
        marked != 0 && marked >= term
    }
}

impl Cluster {
    /// Hands `group`'s leadership to voter `to`, asking whichever node leads
    /// the group now.
    pub async fn transfer_leader(
        &self,
        group: GroupId,
        to: NodeId,
    ) -> Result<HandedOver, ClusterError> {
        if group != quiver_raft::METADATA_GROUP && self.placement().shard(group).is_none() {
            return Err(ClusterError::NoSuchGroup(group));
        }
        let voters = self.voter_nodes(group);
        if !voters.contains(&to) {
            return Err(ClusterError::Refused {
                group,
                message: format!("node {to} is not a voter of shard {group} (voters: {voters:?})"),
            });
        }
        let outcome = self
            .route(group, self.first_target(group), |target| async move {
                let result = if target == self.node_id {
                    self.hand_over_local(group, to).await
                } else {
                    self.clients
                        .forward(target, group, &PeerCall::HandOver { to })
                        .await
                        .unwrap_or_else(|e| PeerResult::Failed(e.to_string()))
                };
                match result {
                    PeerResult::HandedOver {
                        leader,
                        term,
                        moved,
                        elapsed_ms,
                    } => Ok(Ok(HandedOver {
                        leader,
                        term,
                        moved,
                        elapsed_ms,
                    })),
                    // A refusal holds wherever it is asked, and a handover
                    // that started must not be started again elsewhere (it
                    // could move leadership twice): stop routing.
                    PeerResult::Refused(message) => {
                        Ok(Err(ClusterError::Refused { group, message }))
                    }
                    PeerResult::TimedOut(last) => Ok(Err(ClusterError::Unavailable {
                        group,
                        attempts: 1,
                        last,
                    })),
                    other => Err(other),
                }
            })
            .await?;
        let done = outcome?;
        self.remember_leader(group, done.leader);
        Ok(done)
    }

    /// The leader's side of [`Self::transfer_leader`]: checks that `to` can
    /// take over, starts the transfer and waits until this replica sees `to`
    /// lead (at most the longest election timeout: past it, the group elects
    /// a leader the usual way).
    pub async fn hand_over_local(&self, group: GroupId, to: NodeId) -> PeerResult {
        let Some(hosted) = self.host.get(group) else {
            return PeerResult::NoSuchGroup;
        };
        let hosted = &*hosted;
        self.activity(group).await;
        let (state, leader, term, last_index, matched, target) = {
            let metrics = hosted.raft.metrics();
            let m = metrics.borrow_watched();
            // The voter replica on node `to` (a group has one per node).
            let target = m
                .membership_config
                .membership()
                .voter_ids()
                .find(|v| v.node() == to);
            let matched = target.and_then(|target| {
                m.replication
                    .as_ref()
                    .and_then(|replication| replication.get(&target))
                    .map(|id| id.as_ref().map_or(0, |id| id.index))
            });
            (
                m.state,
                m.current_leader.map(ReplicaId::node),
                m.current_term,
                m.last_log_index.unwrap_or(0),
                matched,
                target,
            )
        };
        if state != ServerState::Leader {
            return PeerResult::NotLeader {
                leader: leader.filter(|&l| l != self.node_id),
            };
        }
        if to == self.node_id {
            return PeerResult::HandedOver {
                leader: to,
                term,
                moved: false,
                elapsed_ms: 0,
            };
        }
        let Some(target) = target else {
            return PeerResult::Refused(format!("node {to} is not a voter of shard {group}"));
        };
        if !self
            .liveness
            .is_up(to, self.now_ms(), self.config.liveness_timeout_ms)
        {
            return PeerResult::Refused(format!(
                "node {to} has not been heard from for {} ms",
                self.config.liveness_timeout_ms
            ));
        }
        let behind = last_index.saturating_sub(matched.unwrap_or(0));
        if matched.is_none() || behind > TRANSFER_LAG_ENTRIES_MAX {
            return PeerResult::Refused(format!(
                "node {to} is {behind} entries behind the leader of shard {group} (at most \
                 {TRANSFER_LAG_ENTRIES_MAX}); retry when it has caught up"
            ));
        }
        // Void the lease before the voters hear of the transfer: from then
        // on they may elect `to` at once. One handover per term: a second
        // one (an operator's call racing a shutdown) could split the vote.
        if hosted.handed_over_term.fetch_max(term, Ordering::SeqCst) >= term {
            return PeerResult::Refused(format!(
                "a handover of shard {group} is already under way in term {term}"
            ));
        }
        let started = Instant::now();
        if let Err(e) = hosted.raft.trigger().transfer_leader(target).await {
            crate::metrics::handover("failed");
            return PeerResult::Failed(e.to_string());
        }
        let wait = Duration::from_millis(self.config.election_timeout_max_ms);
        let seen = hosted
            .raft
            .wait(Some(wait))
            .metrics(
                |m| m.current_leader == Some(target) && m.current_term > term,
                "leadership handed over",
            )
            .await;
        match seen {
            Ok(m) => {
                crate::metrics::handover("moved");
                let elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
                tracing::info!(
                    group,
                    to,
                    term = m.current_term,
                    elapsed_ms,
                    "leadership handed over"
                );
                PeerResult::HandedOver {
                    leader: to,
                    term: m.current_term,
                    moved: true,
                    elapsed_ms,
                }
            }
            Err(e) => {
                crate::metrics::handover("timed_out");
                // This replica stays a leader that neither writes nor
                // heartbeats until a vote deposes it: ask the next voter
                // that can take over, so one campaigns now rather than
                // after an election timeout.
                let fallback = self.handover_target(hosted, &[to]);
                if let Some(next) = fallback
                    && let Err(e) = hosted.raft.trigger().transfer_leader(next).await
                {
                    tracing::warn!(group, %next, error = %e, "fallback handover");
                }
                PeerResult::TimedOut(format!(
                    "node {to} did not take over shard {group} within {} ms ({e}); {}",
                    wait.as_millis(),
                    match fallback {
                        Some(next) => format!("handed to node {} instead", next.node()),
                        None => "the shard elects a leader as after a leader failure".into(),
                    }
                ))
            }
        }
    }

    /// Before a node stops: hands every group it leads to the voter
    /// furthest along, so that the others need not wait out an election
    /// timeout. Best effort and bounded by [`SHUTDOWN_HANDOVER_WAIT`].
    pub(super) async fn hand_over_all(&self) {
        let mut handovers = Vec::new();
        // Spread over the voters, not all to the one furthest along.
        let mut given: std::collections::HashMap<NodeId, usize> = std::collections::HashMap::new();
        for (group, hosted) in self.host.all() {
            let Some(to) = self.handover_target_spread(&hosted, &given) else {
                continue;
            };
            let to = to.node();
            *given.entry(to).or_default() += 1;
            handovers.push(async move { (group, to, self.hand_over_local(group, to).await) });
        }
        if handovers.is_empty() {
            return;
        }
        let all = futures::future::join_all(handovers);
        match tokio::time::timeout(SHUTDOWN_HANDOVER_WAIT, all).await {
            Ok(results) => {
                for (group, to, result) in results {
                    if !matches!(result, PeerResult::HandedOver { .. }) {
                        tracing::warn!(group, to, ?result, "handover on shutdown failed");
                    }
                }
            }
            Err(_) => tracing::warn!(
                wait_ms = SHUTDOWN_HANDOVER_WAIT.as_millis(),
                "handovers on shutdown did not all finish in time"
            ),
        }
    }

    /// The voters this leader could hand `hosted` to now: up, not on a node
    /// in `except`, and at most [`TRANSFER_LAG_ENTRIES_MAX`] entries behind,
    /// with how far behind each is. Empty if this replica does not lead.
    fn handover_candidates(&self, hosted: &Group, except: &[NodeId]) -> Vec<(u64, ReplicaId)> {
        let metrics = hosted.raft.metrics();
        let m = metrics.borrow_watched();
        if m.state != ServerState::Leader {
            return Vec::new();
        }
        let Some(replication) = m.replication.as_ref() else {
            return Vec::new();
        };
        let last_index = m.last_log_index.unwrap_or(0);
        let now = self.now_ms();
        m.membership_config
            .membership()
            .voter_ids()
            .filter(|v| *v != hosted.replica && !except.contains(&v.node()))
            .filter(|v| {
                self.liveness
                    .is_up(v.node(), now, self.config.liveness_timeout_ms)
            })
            .filter_map(|v| {
                let matched = replication.get(&v)?.as_ref()?.index;
                let behind = last_index.saturating_sub(matched);
                (behind <= TRANSFER_LAG_ENTRIES_MAX).then_some((behind, v))
            })
            .collect()
    }

    /// The candidate furthest along (see [`Self::handover_candidates`]).
    fn handover_target(&self, hosted: &Group, except: &[NodeId]) -> Option<ReplicaId> {
        self.handover_candidates(hosted, except)
            .into_iter()
            .min()
            .map(|(_, v)| v)
    }

    /// The candidate given the fewest groups so far in `given`, then the
    /// one furthest along.
    fn handover_target_spread(
        &self,
        hosted: &Group,
        given: &std::collections::HashMap<NodeId, usize>,
    ) -> Option<ReplicaId> {
        self.handover_candidates(hosted, &[])
            .into_iter()
            .min_by_key(|&(behind, v)| (given.get(&v.node()).copied().unwrap_or(0), behind, v))
            .map(|(_, v)| v)
    }
}
