//! Routing: every request for a group goes to the replica that must serve
//! it (the leader for proposals, LEADER and STRONG reads; this node's own
//! replica or the leader for REPLICA reads), here or over the `Peer`
//! service, with bounded retries across leader changes.

use std::sync::Arc;
use std::time::Duration;

use openraft::async_runtime::WatchReceiver;
use openraft::{LinearizerOption, ServerState};
use quiver_raft::types::LogId;
use quiver_raft::{Command, GroupId, NodeId, Proposal, ReplicaId, RequestId, Response};

use super::wire::{PeerCall, PeerResult, ReadLevel, ReadRows};
use super::{Cluster, ClusterError, ReadSource, ShardRead};

/// Longest a refusal for keys a split moved waits, on the node that led
/// the split, for the new shard to elect its leader (see
/// [`Cluster::moved_answer`]).
const SPLIT_CHILD_LEADER_WAIT_MS_MAX: u64 = 300;

/// Most children of a shard a refusal describes (the newest): a shard that
/// split many times has given most of them away long ago, and the map
/// knows those.
const ROUTE_HINT_CHILDREN_MAX: usize = 8;

impl Cluster {
    /// The nodes holding a voter of `group`: for a shard, as the cluster
    /// map says; for the metadata group, as this node's replica of it last
    /// learned.
    pub(super) fn voter_nodes(&self, group: GroupId) -> Vec<NodeId> {
        if group == quiver_raft::METADATA_GROUP {
            return self
                .host
                .get(group)
                .map(|hosted| {
                    hosted
                        .raft
                        .metrics()
                        .borrow_watched()
                        .membership_config
                        .membership()
                        .voter_ids()
                        .map(ReplicaId::node)
                        .collect()
                })
                .unwrap_or_default();
        }
        self.placement().shard_voters(group)
    }

    /// The leader this node's replica of `group` knows of. Reads the field
    /// under the watch borrow: cloning the whole metrics (with a leader's
    /// replication maps) on every request would be waste.
    pub(super) fn known_leader(&self, group: GroupId) -> Option<NodeId> {
        self.host
            .get(group)
            .and_then(|g| g.raft.metrics().borrow_watched().current_leader)
            .map(ReplicaId::node)
    }

    /// The leader of `group` as this node knows it: the one its own replica
    /// knows of, else the one its last request for the group reached (or
    /// was redirected to). `None`: unknown. Clients' routes (`GetRoutes`)
    /// show this. The replica's view comes first: a node that lost its
    /// leadership in an election still has itself as the hint until a
    /// request fails through it.
    pub fn leader_of(&self, group: GroupId) -> Option<NodeId> {
        self.known_leader(group)
            .or_else(|| self.leader_hints.lock().get(&group).copied())
    }

    /// Where to send the first attempt for a group's leader.
    pub(super) fn first_target(&self, group: GroupId) -> NodeId {
        if let Some(&hint) = self.leader_hints.lock().get(&group) {
            return hint;
        }
        if let Some(leader) = self.known_leader(group) {
            return leader;
        }
        let voters = self.voter_nodes(group);
        if voters.contains(&self.node_id) {
            self.node_id
        } else {
            voters.first().copied().unwrap_or(self.node_id)
        }
    }

    /// The next target after a failure without a usable leader hint: the
    /// leader this node's own replica now knows, if it is not the node that
    /// just failed nor one that did not answer (`dead`); else the next voter
    /// that has not failed in this request (all of them failed: start the
    /// rotation again).
    fn retry_target(
        &self,
        group: GroupId,
        current: NodeId,
        failed: &mut Vec<NodeId>,
        dead: &[NodeId],
    ) -> NodeId {
        if let Some(leader) = self.known_leader(group)
            && leader != current
            && !dead.contains(&leader)
        {
            return leader;
        }
        let voters = self.voter_nodes(group);
        if voters.iter().all(|voter| failed.contains(voter)) {
            failed.clear();
        }
        let start = voters
            .iter()
            .position(|&v| v == current)
            .map_or(0, |i| i + 1);
        let rotation: Vec<NodeId> = (0..voters.len())
            .map(|offset| voters[(start + offset) % voters.len()])
            .filter(|voter| !failed.contains(voter))
            .collect();
        // A node the liveness pings say is down (paused, cut off) would cost
        // a whole peer deadline: try the others first.
        let now = self.now_ms();
        let timeout = self.config.liveness_timeout_ms;
        rotation
            .iter()
            .copied()
            .find(|&voter| voter == self.node_id || self.liveness.is_up(voter, now, timeout))
            .or_else(|| rotation.first().copied())
            .or_else(|| voters.first().copied())
            .unwrap_or(self.node_id)
    }

    /// Waits before a retry: the backoff for `attempt`, cut short (or not
    /// begun) once this node's own replica of the group knows a leader that
    /// `usable` accepts (during a failover or a handover the retry then goes
    /// out the moment the election is won, not up to a backoff later).
    async fn pause_before_retry(
        &self,
        group: GroupId,
        attempt: u32,
        usable: impl Fn(NodeId) -> bool + Send + Sync,
    ) {
        let pause = Self::backoff(attempt);
        let Some(hosted) = self.host.get(group) else {
            tokio::time::sleep(pause).await;
            return;
        };
        // Times out (an error) when no such leader shows: either way, retry.
        let _ = hosted
            .raft
            .wait(Some(pause))
            .metrics(
                |m| m.current_leader.is_some_and(|l| usable(l.node())),
                "a usable leader",
            )
            .await;
    }

    /// A request id unique across this cluster's proposals: the node id in
    /// the high half, then a counter started at a random point at boot (a
    /// clock could restart at a fixed epoch before NTP and reissue ids still
    /// in the dedup ring; two random starts collide with odds of about
    /// ids-per-run / 2^64).
    fn next_request_id(&self) -> RequestId {
        let sequence = self
            .request_sequence
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        (u128::from(self.node_id) << 64) | u128::from(sequence)
    }

    /// The answer for keys a split moved away from `group`: the shard's
    /// descriptor and its children's as this node's replicas have applied
    /// them. On the node leading the parent, a newest child the map does
    /// not record yet (a split that just applied: the child campaigns
    /// here) is waited for until it is hosted and has a leader, for up to
    /// `SPLIT_CHILD_LEADER_WAIT_MS_MAX` in all: the caller's retry then
    /// goes straight to it.
    pub(super) async fn moved_answer(&self, group: GroupId, message: String) -> PeerResult {
        let Some(hosted) = self.host.get(group) else {
            return PeerResult::WrongShard(message);
        };
        let Some(range) = hosted.state.range() else {
            return PeerResult::WrongShard(message);
        };
        let leads = self.known_leader(group) == Some(self.node_id);
        // A child the map records is no news (it may have moved away from
        // this node, or lost its quorum, since): only a split that just
        // applied here is waited for.
        if leads
            && let Some(&(newest, _)) = range.children.last()
            && self.placement().shard(newest).is_none()
        {
            let deadline =
                tokio::time::Instant::now() + Duration::from_millis(SPLIT_CHILD_LEADER_WAIT_MS_MAX);
            let left = || deadline.saturating_duration_since(tokio::time::Instant::now());
            if let Some(child) = self.host.wait_hosted(newest, left()).await {
                // Times out (an error) when none shows: answered without.
                let _ = child
                    .raft
                    .wait(Some(left()))
                    .metrics(|m| m.current_leader.is_some(), "the split child's leader")
                    .await;
            }
        }
        let mut shards = vec![route_hint(group, &hosted, range.clone())];
        for &(child, _) in range.children.iter().rev().take(ROUTE_HINT_CHILDREN_MAX) {
            let Some(hosted_child) = self.host.get(child) else {
                continue;
            };
            if let Some(child_range) = hosted_child.state.range() {
                let mut hint = route_hint(child, &hosted_child, child_range);
                // Still electing: the node that led the split campaigns.
                if hint.leader.is_none() && leads {
                    hint.leader = Some(self.node_id);
                }
                shards.push(hint);
            }
        }
        PeerResult::Moved(Box::new(super::wire::Moved { message, shards }))
    }

    /// Routes by shard descriptors a refusal carried, where they are newer
    /// than the map's (until the map records the split), and to the leaders
    /// they name.
    pub(super) fn learn_routes(&self, hints: &[super::placement::RouteHint]) {
        for hint in hints {
            if let Some(leader) = hint.leader {
                self.remember_leader(hint.shard, leader);
            }
        }
        self.placement.rcu(|current| {
            current
                .learn(hints)
                .map_or_else(|| Arc::clone(current), Arc::new)
        });
    }

    pub(super) fn remember_leader(&self, group: GroupId, leader: NodeId) {
        self.leader_hints.lock().insert(group, leader);
    }

    fn forget_leader(&self, group: GroupId) {
        self.leader_hints.lock().remove(&group);
    }

    fn backoff(attempt: u32) -> Duration {
        Duration::from_millis((25u64 << attempt.min(5)).min(500))
    }

    pub(super) fn peer_timeout(&self) -> Duration {
        Duration::from_millis(self.config.peer_timeout_ms)
    }

    /// Proposes a command to a group's leader wherever it is, and returns
    /// once the entry is committed and applied on the leader.
    pub async fn propose(
        &self,
        group: GroupId,
        command: Command,
    ) -> Result<(Response, LogId), ClusterError> {
        self.propose_with_id(group, command, None).await
    }

    /// [`Self::propose`] with the client's idempotency key, if it gave one
    /// (the same key in every group: each group deduplicates on its own).
    pub async fn propose_with_id(
        &self,
        group: GroupId,
        command: Command,
        request_id: Option<RequestId>,
    ) -> Result<(Response, LogId), ClusterError> {
        // One id for every attempt: a retry of an entry that did commit is
        // answered AlreadyApplied instead of being applied twice.
        let proposal = Proposal {
            request_id: request_id.unwrap_or_else(|| self.next_request_id()),
            leader_ts_us: 0,
            command,
        };
        let (response, log_id) = self
            .route(group, self.first_target(group), |target| {
                let proposal = proposal.clone();
                async move {
                    let result = if target == self.node_id {
                        self.propose_local(group, proposal).await
                    } else {
                        let started = std::time::Instant::now();
                        self.clients
                            .forward(target, group, &PeerCall::Propose(proposal))
                            .await
                            .map(|answer| self.peer_answered(group, answer, started))
                            .unwrap_or_else(|e| self.peer_failed(group, e, started))
                    };
                    match result {
                        PeerResult::Proposed { response, log_id } => {
                            self.shard_breakers.attempt_succeeded(group);
                            self.remember_leader(group, target);
                            Ok((response, log_id))
                        }
                        other => Err(other),
                    }
                }
            })
            .await?;
        match response {
            Response::Rejected { kind, message } => Err(ClusterError::Rejected { kind, message }),
            response => Ok((response, log_id)),
        }
    }

    /// Tries `attempt` on a node at a time until it succeeds: a "not the
    /// leader, try N" answer moves to N at once, any other failure rotates
    /// over the group's voters after a backoff. At most
    /// `cluster.route_retries_max` attempts.
    pub(super) async fn route<T, F, Fut>(
        &self,
        group: GroupId,
        first: NodeId,
        mut attempt: F,
    ) -> Result<T, ClusterError>
    where
        F: FnMut(NodeId) -> Fut,
        Fut: std::future::Future<Output = Result<T, PeerResult>>,
    {
        let mut target = first;
        let mut last = String::from("no attempt made");
        let attempts = self.config.route_retries_max.max(1);
        // Nodes that failed in this request (the rotation skips them), and
        // of those the ones that did not answer as a live replica: a
        // redirect to one of those (from a replica that has not noticed its
        // leader died) is no hint. A replica that answered "no leader known"
        // is alive and may be the candidate about to win (during a leader
        // handover it is): a later redirect to it is followed, or every
        // write in flight would wait out the backoff after a handover.
        let mut failed: Vec<NodeId> = Vec::new();
        let mut dead: Vec<NodeId> = Vec::new();
        for n in 0..attempts {
            match attempt(target).await {
                Ok(value) => return Ok(value),
                // Asking another replica would get the same answer.
                Err(PeerResult::Moved(moved)) => {
                    self.learn_routes(&moved.shards);
                    return Err(ClusterError::Rejected {
                        kind: quiver_raft::types::RejectKind::WrongShard,
                        message: moved.message,
                    });
                }
                Err(PeerResult::WrongShard(message)) => {
                    return Err(ClusterError::Rejected {
                        kind: quiver_raft::types::RejectKind::WrongShard,
                        message,
                    });
                }
                Err(PeerResult::NotLeader {
                    leader: Some(leader),
                }) if leader != target && !dead.contains(&leader) => {
                    last = format!("node {target} is not the leader; node {leader} is");
                    self.remember_leader(group, leader);
                    // A redirect is cheap; still back off when it repeats,
                    // unless this node's replica also says `leader` leads.
                    if n > 2 {
                        self.pause_before_retry(group, n, |known| known == leader)
                            .await;
                    }
                    target = leader;
                }
                Err(other) => {
                    last = format!("node {target}: {}", describe(&other));
                    tracing::debug!(group, attempt = n, %last, "routing: attempt failed");
                    self.forget_leader(group);
                    if !failed.contains(&target) {
                        failed.push(target);
                    }
                    let alive = matches!(other, PeerResult::NotLeader { .. });
                    if !alive && !dead.contains(&target) {
                        dead.push(target);
                    }
                    let failed_now = target;
                    self.pause_before_retry(group, n, |known| {
                        known != failed_now && !dead.contains(&known)
                    })
                    .await;
                    target = self.retry_target(group, target, &mut failed, &dead);
                }
            }
        }
        Err(ClusterError::Unavailable {
            group,
            attempts,
            last,
        })
    }

    /// Proposes on this node's replica (which must lead the group).
    pub async fn propose_local(&self, group: GroupId, mut proposal: Proposal) -> PeerResult {
        let Some(hosted) = self.host.get(group) else {
            return PeerResult::NoSuchGroup;
        };
        let hosted = &*hosted;
        self.activity(group).await;
        // openraft refuses writes from a leader whose lease ran out (a group
        // that slept, or a leader just elected), as "not the leader, none
        // known": renew it with a heartbeat round first.
        let (is_leader, lease_valid) = {
            let metrics = hosted.raft.metrics();
            let m = metrics.borrow_watched();
            let is_leader = m.state == ServerState::Leader;
            (is_leader, is_leader && self.lease_valid(hosted, &m))
        };
        if is_leader
            && !lease_valid
            && let Err(refused) = self
                .confirm_leadership(hosted, LinearizerOption::new(Some(self.read_lease()), true))
                .await
        {
            return refused;
        }
        // Keys a split this replica applied moved away: refused before a
        // log round (apply checks again, for a split ordered before the
        // entry).
        if is_leader
            && let Some(Response::Rejected { message, .. }) =
                hosted.state.wrong_shard(&proposal.command)
        {
            return self.moved_answer(group, message).await;
        }
        // The leader's clock, stamped where the entry is created.
        proposal.leader_ts_us = self.clock.now_us();
        let splitting = matches!(proposal.command, Command::Split { .. });
        if splitting {
            let term = hosted.raft.metrics().borrow_watched().current_term;
            let version = hosted.state.range().map_or(0, |range| range.version);
            *hosted.splitting.lock() = Some((term, version));
        }
        let started = std::time::Instant::now();
        let written =
            tokio::time::timeout(self.peer_timeout(), hosted.raft.client_write(proposal)).await;
        if splitting && written.is_ok() {
            // Applied here, refused, or never appended (not the leader):
            // leases hold again. (A timeout keeps them off until the range
            // changes or the term ends: the entry may still apply.)
            *hosted.splitting.lock() = None;
        }
        match written {
            Err(_) => {
                self.shard_breakers.attempt_failed(group, started);
                PeerResult::Failed("commit timed out (no quorum?)".into())
            }
            Ok(Ok(written)) => match written.data {
                // A data command ordered after a split that moved some of
                // its keys (a split's own refusal is its operator's to
                // handle).
                Response::Rejected {
                    kind: quiver_raft::types::RejectKind::WrongShard,
                    message,
                } if !splitting => self.moved_answer(group, message).await,
                response => PeerResult::Proposed {
                    response,
                    log_id: written.log_id,
                },
            },
            Ok(Err(e)) => match e.forward_to_leader() {
                Some(forward) => PeerResult::NotLeader {
                    leader: forward.leader_id.map(ReplicaId::node),
                },
                None => PeerResult::Failed(e.to_string()),
            },
        }
    }

    /// Reads keys of one shard at the requested level.
    pub async fn read(
        &self,
        group: GroupId,
        keys: &[Vec<u8>],
        level: ReadLevel,
    ) -> Result<ShardRead, ClusterError> {
        let first = if matches!(level, ReadLevel::Replica { .. } | ReadLevel::Any)
            && self.host.contains(group)
        {
            self.node_id
        } else {
            self.first_target(group)
        };
        self.route(group, first, |target| async move {
            // What the leader answers says whether the shard is there (a
            // follower's answer to a REPLICA read does not).
            let leader_bound = matches!(level, ReadLevel::Leader | ReadLevel::Strong);
            if target == self.node_id {
                let source = self.check_local_read(group, level).await?;
                if leader_bound {
                    self.shard_breakers.attempt_succeeded(group);
                }
                let Some(hosted) = self.host.get(group) else {
                    return Err(PeerResult::NoSuchGroup);
                };
                let state = hosted.state.clone();
                let range_version = match owned_range_version(&state, group, keys) {
                    Ok(version) => version,
                    Err(message) => return Err(self.moved_answer(group, message).await),
                };
                return Ok(ShardRead::Local {
                    state,
                    source,
                    range_version,
                });
            }
            let call = PeerCall::Read {
                keys: keys.to_vec(),
                level,
            };
            let started = std::time::Instant::now();
            match self.clients.forward(target, group, &call).await {
                Ok(PeerResult::Read(read)) => {
                    if read.leader {
                        self.remember_leader(group, read.node_id);
                    }
                    if leader_bound {
                        self.shard_breakers.attempt_succeeded(group);
                    }
                    Ok(read.into_shard_read(group))
                }
                Ok(other) if leader_bound => Err(self.peer_answered(group, other, started)),
                Ok(other) => Err(other),
                Err(e) if leader_bound => Err(self.peer_failed(group, e, started)),
                Err(e) => Err(PeerResult::Failed(e.to_string())),
            }
        })
        .await
    }

    /// A peer's answer to a leader-bound call: a failure it reports (its
    /// replica found no quorum, or could not do the call) is a failed
    /// attempt on the shard, as one here would be.
    pub(super) fn peer_answered(
        &self,
        group: GroupId,
        answer: PeerResult,
        started: std::time::Instant,
    ) -> PeerResult {
        if matches!(answer, PeerResult::Failed(_)) {
            self.shard_breakers.attempt_failed(group, started);
        }
        answer
    }

    /// A leader-bound call to a peer failed: if the peer did not answer as
    /// a live node would, client calls to `group` in flight blame the shard
    /// when their callers give up (see `shard_breaker`).
    pub(super) fn peer_failed(
        &self,
        group: GroupId,
        error: super::network::PeerError,
        started: std::time::Instant,
    ) -> PeerResult {
        if error.peer_unresponsive() {
            self.shard_breakers.attempt_failed(group, started);
        }
        PeerResult::Failed(error.to_string())
    }

    /// Reads keys of a shard from whichever of its replicas on other nodes
    /// answers first, as that replica holds them ([`ReadLevel::Any`]). All
    /// are asked at once: this is a degraded read's fallback, run when the
    /// usual target is down or too slow, so waiting on one in turn would
    /// spend the caller's deadline on the same dead node.
    pub async fn read_any_replica(
        &self,
        group: GroupId,
        keys: &[Vec<u8>],
    ) -> Result<ShardRead, ClusterError> {
        let call = PeerCall::Read {
            keys: keys.to_vec(),
            level: ReadLevel::Any,
        };
        let targets: Vec<NodeId> = self
            .voter_nodes(group)
            .into_iter()
            .filter(|&node| node != self.node_id)
            .collect();
        let attempts = u32::try_from(targets.len()).unwrap_or(u32::MAX);
        let asks = targets.into_iter().map(|target| {
            let call = &call;
            Box::pin(async move {
                match self.clients.forward(target, group, call).await {
                    Ok(PeerResult::Read(read)) => Ok(read.into_shard_read(group)),
                    Ok(other) => Err(format!("node {target}: {}", describe(&other))),
                    Err(e) => Err(format!("node {target}: {e}")),
                }
            })
        });
        if attempts == 0 {
            return Err(ClusterError::Unavailable {
                group,
                attempts,
                last: "no replica on another node".into(),
            });
        }
        futures::future::select_ok(asks)
            .await
            .map(|(read, _)| read)
            .map_err(|last| ClusterError::Unavailable {
                group,
                attempts,
                last,
            })
    }
}

/// The shard's range version if it owns every key (storage keys: the hash
/// first); else why not (a split moved them: answer with
/// [`Cluster::moved_answer`]). A reader that finds the version changed
/// after reading must not trust what it read (a split may have deleted the
/// rows it gave away meanwhile).
pub fn owned_range_version(
    state: &quiver_raft::StateMachine,
    group: GroupId,
    keys: &[Vec<u8>],
) -> Result<u64, String> {
    let Some(range) = state.range() else {
        return Ok(0);
    };
    for key in keys {
        let Some((hash, _, _)) = quiver_engine::keys::split_storage_key(key) else {
            continue;
        };
        if !range.contains(hash) {
            return Err(format!(
                "shard {group} no longer owns key hash {hash:#018x} (split)"
            ));
        }
    }
    Ok(range.version)
}

/// A hosted replica's descriptor as it has applied it.
fn route_hint(
    group: GroupId,
    hosted: &super::host::Group,
    range: quiver_raft::state_machine::RangeDesc,
) -> super::placement::RouteHint {
    let metrics = hosted.raft.metrics();
    let m = metrics.borrow_watched();
    super::placement::RouteHint {
        shard: group,
        start: range.start,
        end: range.end,
        version: range.version,
        voters: m
            .membership_config
            .membership()
            .voter_ids()
            .map(ReplicaId::node)
            .collect(),
        leader: m.current_leader.map(ReplicaId::node),
    }
}

fn random_sequence_start() -> u64 {
    // Half the space: the counter never wraps into ids of an earlier start.
    rand::random::<u64>() >> 1
}

/// The first request id of this process's counter.
pub(super) fn request_sequence_start() -> std::sync::atomic::AtomicU64 {
    std::sync::atomic::AtomicU64::new(random_sequence_start())
}

fn describe(result: &PeerResult) -> String {
    match result {
        PeerResult::Failed(reason) => reason.clone(),
        PeerResult::NoSuchGroup => "holds no replica".into(),
        PeerResult::NotLeader { leader: None } => "not the leader, no leader known".into(),
        PeerResult::NotLeader { leader: Some(l) } => format!("not the leader (leader {l})"),
        other => format!("unexpected reply {other:?}"),
    }
}

impl ReadRows {
    /// A peer's answer for `group`, as the read path takes it.
    fn into_shard_read(self, group: GroupId) -> ShardRead {
        ShardRead::Remote {
            rows: self.rows,
            source: ReadSource {
                group,
                node_id: self.node_id,
                leader: self.leader,
                applied_index: self.applied_index,
            },
        }
    }
}
