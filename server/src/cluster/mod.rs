//! The cluster as one node sees it: the Raft groups it hosts, the static map
//! of where every group lives, and routing of proposals and reads to the
//! replica that must serve them.
//!
//! Every node hosts the metadata group (voter or learner) and the shards the
//! placement gives it. A request arriving at any node is routed per shard:
//! proposals go to the shard leader (locally, or forwarded over the `Peer`
//! service), reads to the leader or a replica depending on consistency.
//! Leader changes and unreachable replicas are retried a bounded number of
//! times with backoff; the last error is reported as `UNAVAILABLE`.

pub mod auth;
pub mod hibernate;
pub mod network;
pub mod peer_service;
pub mod placement;
pub mod transfer;
pub mod wire;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use openraft::async_runtime::WatchReceiver;
use openraft::{BasicNode, LinearizerOption, ReadPolicy, ServerState, SnapshotPolicy};
use parking_lot::Mutex;
use quiver_engine::seglog::LogOptions;
use quiver_engine::{Clock, StoreOptions};
use quiver_proto::v1 as pb;
use quiver_raft::types::{LogId, RejectKind};
use quiver_raft::{
    ApplyObserver, Command, GroupId, LogStore, METADATA_GROUP, NodeId, Proposal, Raft, RequestId,
    Response, StateMachine,
};

use crate::config::ClusterConfig;
use network::{GroupNetwork, PeerClients};
use placement::Placement;
use wire::{PeerCall, PeerResult, ReadLevel, ReadRows};

/// How much shorter than openraft's leader lease a read trusts it.
const LEASE_MARGIN_MS: u64 = 100;

/// Errors of routing and replication.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// No replica could serve the request within the retry budget.
    #[error("shard {group}: unavailable after {attempts} attempts: {last}")]
    Unavailable {
        /// The group.
        group: GroupId,
        /// Attempts made.
        attempts: u32,
        /// The last failure.
        last: String,
    },
    /// The state machine refused the command (the same on every replica).
    #[error("{message}")]
    Rejected {
        /// Why, as a class.
        kind: RejectKind,
        /// Why, for people.
        message: String,
    },
    /// The node could not start its groups.
    #[error("cluster start: {0}")]
    Start(String),
    /// The cluster has no such group.
    #[error("no shard {0}")]
    NoSuchGroup(GroupId),
    /// An operation's precondition does not hold (retrying as is will not
    /// help).
    #[error("shard {group}: {message}")]
    Refused {
        /// The group.
        group: GroupId,
        /// Why.
        message: String,
    },
}

/// One group hosted here.
pub struct Group {
    /// Its Raft handle.
    pub raft: Raft,
    /// Its state machine (the live store).
    pub state: StateMachine,
    /// Its log.
    pub log: LogStore,
    /// Its activity and hibernation state.
    pub pulse: hibernate::Pulse,
    /// The last term in which this replica, as leader, started a handover
    /// (0: never): its lease for that term is void (see `transfer`).
    handed_over_term: std::sync::atomic::AtomicU64,
}

/// Who served a shard read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadSource {
    /// The shard.
    pub group: GroupId,
    /// The serving node.
    pub node_id: NodeId,
    /// Whether it led the shard.
    pub leader: bool,
    /// Its applied index.
    pub applied_index: u64,
}

/// How a shard read is served.
pub enum ShardRead {
    /// By this node's replica: read the store (and the hot cache).
    Local {
        /// The replica (its live store is loaded at read time, after the
        /// cache placeholders are taken, so a snapshot install in between
        /// cannot leave a stale row cached).
        state: StateMachine,
        /// Provenance.
        source: ReadSource,
    },
    /// By another node, which returned the encoded rows.
    Remote {
        /// Encoded rows in key order.
        rows: Vec<Option<Vec<u8>>>,
        /// Provenance.
        source: ReadSource,
    },
}

/// The groups this node hosts and the routes to every other group.
pub struct Cluster {
    /// This node.
    pub node_id: NodeId,
    /// Where every group lives.
    pub placement: Placement,
    clients: Arc<PeerClients>,
    groups: BTreeMap<GroupId, Group>,
    leader_hints: Mutex<HashMap<GroupId, NodeId>>,
    request_sequence: std::sync::atomic::AtomicU64,
    config: ClusterConfig,
    clock: Arc<dyn Clock>,
    /// What peers last said (liveness pings).
    liveness: hibernate::Liveness,
    /// When this node started: hibernation's time base.
    started: tokio::time::Instant,
    /// Set when shutdown begins: background loops stop.
    stopping: std::sync::atomic::AtomicBool,
    /// Notices when this process stood still (REPLICA reads' freshness).
    stall: hibernate::StallWatch,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("node_id", &self.node_id)
            .field("groups", &self.groups.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// What [`Cluster::start`] needs besides the configuration.
pub struct StartOptions<'a> {
    /// Root of this node's data.
    pub data_dir: &'a Path,
    /// This node's client-facing address (used for a one-node cluster).
    pub self_addr: String,
    /// This node's peer address (likewise).
    pub self_peer_addr: String,
    /// Options of every group's store; `registry` must be the node's.
    pub store: StoreOptions,
    /// Cache coherence.
    pub observer: Arc<dyn ApplyObserver>,
    /// The node's clock (leader timestamps).
    pub clock: Arc<dyn Clock>,
    /// fsync Raft log appends before they count as written.
    pub sync_log: bool,
}

impl Cluster {
    /// Opens every group this node hosts, starts their Raft instances and
    /// bootstraps groups this node is the designated initializer of.
    pub async fn start(
        config: &ClusterConfig,
        options: StartOptions<'_>,
    ) -> Result<Arc<Cluster>, ClusterError> {
        let placement = Placement::new(config, &options.self_addr, &options.self_peer_addr);
        let node_id = config.node_id;
        let clients = Arc::new(
            PeerClients::new(
                &placement.nodes,
                Duration::from_millis(config.peer_timeout_ms),
                Duration::from_millis(config.snapshot_timeout_ms),
                &config.secret,
            )
            .map_err(ClusterError::Start)?,
        );
        let raft_config = Arc::new(
            openraft::Config {
                cluster_name: "quiver".into(),
                heartbeat_interval: config.heartbeat_ms,
                election_timeout_min: config.election_timeout_min_ms,
                election_timeout_max: config.election_timeout_max_ms,
                install_snapshot_timeout: config.snapshot_timeout_ms,
                snapshot_policy: SnapshotPolicy::LogsSinceLast(config.snapshot_logs_since),
                max_in_snapshot_log_to_keep: config.logs_kept_after_snapshot,
                // A candidate first asks whether it would win: a node that
                // lost touch (a slow link, a paused process, a sleeping group
                // woken late) cannot raise the term over a live leader.
                enable_pre_vote: Some(true),
                // A restarted leader must win an election again: our state
                // machine is not fsynced (the log is the durable record) and
                // the commit index is not persisted, so a leader restoring
                // itself could serve from a state missing acknowledged writes.
                enable_leader_restore: Some(false),
                // Every group starts asleep; the liveness rounds start its
                // ticker when the pings say so (cluster/hibernate.rs).
                enable_tick: false,
                ..openraft::Config::default()
            }
            .validate()
            .map_err(|e| ClusterError::Start(e.to_string()))?,
        );
        let log_options = LogOptions {
            segment_bytes_max: config.log_segment_bytes_max,
            sync: options.sync_log,
            ..LogOptions::default()
        };
        let mut groups = BTreeMap::new();
        for group in placement.groups_of(node_id) {
            let dir = options.data_dir.join("groups").join(group.to_string());
            let log = LogStore::open(dir.join("log"), log_options)
                .map_err(|e| ClusterError::Start(format!("group {group} log: {e}")))?;
            let store_options = StoreOptions {
                load_catalog: group == METADATA_GROUP,
                ..options.store.clone()
            };
            let state = StateMachine::open(
                group,
                dir.join("state"),
                store_options,
                options.observer.clone(),
            )
            .map_err(|e| ClusterError::Start(format!("group {group} state: {e}")))?;
            let network = GroupNetwork {
                group,
                clients: clients.clone(),
            };
            let raft = Raft::new(
                node_id,
                raft_config.clone(),
                network,
                log.clone(),
                state.clone(),
            )
            .await
            .map_err(|e| ClusterError::Start(format!("group {group} raft: {e}")))?;
            groups.insert(
                group,
                Group {
                    raft,
                    state,
                    log,
                    pulse: hibernate::Pulse::asleep(),
                    handed_over_term: std::sync::atomic::AtomicU64::new(0),
                },
            );
        }
        let cluster = Arc::new(Cluster {
            node_id,
            placement,
            clients,
            groups,
            leader_hints: Mutex::new(HashMap::new()),
            request_sequence: std::sync::atomic::AtomicU64::new(random_sequence_start()),
            config: config.clone(),
            clock: options.clock,
            liveness: hibernate::Liveness::default(),
            started: tokio::time::Instant::now(),
            stopping: std::sync::atomic::AtomicBool::new(false),
            stall: hibernate::StallWatch::default(),
        });
        cluster.bootstrap().await?;
        tokio::spawn(reconcile_metadata_learners(Arc::downgrade(&cluster)));
        tokio::spawn(hibernate::stall_loop(Arc::downgrade(&cluster)));
        tokio::spawn(hibernate::liveness_loop(
            Arc::downgrade(&cluster),
            Duration::from_millis(config.liveness_interval_ms),
        ));
        Ok(cluster)
    }

    /// Initializes the groups whose first voter (in rendezvous order) is
    /// this node, if they have never been initialized (first start of the
    /// cluster). The initializer usually wins the first election, so this
    /// also spreads the first leaders over the nodes.
    async fn bootstrap(&self) -> Result<(), ClusterError> {
        for (&group, hosted) in &self.groups {
            let voters = self.placement.voters(group);
            if voters.first() != Some(&self.node_id) {
                continue;
            }
            let initialized = hosted
                .raft
                .is_initialized()
                .await
                .map_err(|e| ClusterError::Start(e.to_string()))?;
            if initialized {
                continue;
            }
            let members: BTreeMap<NodeId, BasicNode> = voters
                .iter()
                .map(|id| (*id, BasicNode::new(self.placement.nodes[id].clone())))
                .collect();
            if let Err(e) = hosted.raft.initialize(members).await {
                tracing::warn!(group, error = %e, "group initialization refused");
            }
        }
        Ok(())
    }

    /// The group hosted here, if any.
    pub fn group(&self, group: GroupId) -> Option<&Group> {
        self.groups.get(&group)
    }

    /// Every hosted group.
    pub fn groups(&self) -> impl Iterator<Item = (&GroupId, &Group)> {
        self.groups.iter()
    }

    /// The leader this node's replica of `group` knows of. Reads the field
    /// under the watch borrow: cloning the whole metrics (with a leader's
    /// replication maps) on every request would be waste.
    fn known_leader(&self, group: GroupId) -> Option<NodeId> {
        self.groups
            .get(&group)
            .and_then(|g| g.raft.metrics().borrow_watched().current_leader)
    }

    /// Where to send the first attempt for a group's leader.
    fn first_target(&self, group: GroupId) -> NodeId {
        if let Some(&hint) = self.leader_hints.lock().get(&group) {
            return hint;
        }
        if let Some(leader) = self.known_leader(group) {
            return leader;
        }
        let voters = self.placement.voters(group);
        if voters.contains(&self.node_id) {
            self.node_id
        } else {
            voters.first().copied().unwrap_or(self.node_id)
        }
    }

    /// The next target after a failure without a usable leader hint: the
    /// leader this node's own replica now knows, if it is not one that just
    /// failed; else the next voter that has not failed in this request (all
    /// of them failed: start the rotation again).
    fn retry_target(&self, group: GroupId, current: NodeId, failed: &mut Vec<NodeId>) -> NodeId {
        if let Some(leader) = self.known_leader(group)
            && !failed.contains(&leader)
        {
            return leader;
        }
        let voters = self.placement.voters(group);
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

    /// Waits before a retry: the backoff for `attempt`, cut short when this
    /// node's own replica of the group learns of a new leader (during a
    /// failover the retry then goes out the moment the election is won, not
    /// up to a backoff later).
    async fn pause_before_retry(&self, group: GroupId, attempt: u32) {
        let pause = Self::backoff(attempt);
        let Some(hosted) = self.groups.get(&group) else {
            tokio::time::sleep(pause).await;
            return;
        };
        let before = self.known_leader(group);
        // Times out (an error) when nothing changed: either way, retry.
        let _ = hosted
            .raft
            .wait(Some(pause))
            .metrics(
                |m| m.current_leader.is_some() && m.current_leader != before,
                "a new leader",
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

    fn remember_leader(&self, group: GroupId, leader: NodeId) {
        self.leader_hints.lock().insert(group, leader);
    }

    fn forget_leader(&self, group: GroupId) {
        self.leader_hints.lock().remove(&group);
    }

    fn backoff(attempt: u32) -> Duration {
        Duration::from_millis((25u64 << attempt.min(5)).min(500))
    }

    fn peer_timeout(&self) -> Duration {
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
                        self.clients
                            .forward(target, group, &PeerCall::Propose(proposal))
                            .await
                            .unwrap_or_else(|e| PeerResult::Failed(e.to_string()))
                    };
                    match result {
                        PeerResult::Proposed { response, log_id } => {
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
    async fn route<T, F, Fut>(
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
        // Nodes that failed in this request: a redirect to one of them (a
        // replica that has not noticed its leader died) is no hint.
        let mut failed: Vec<NodeId> = Vec::new();
        for n in 0..attempts {
            match attempt(target).await {
                Ok(value) => return Ok(value),
                Err(PeerResult::NotLeader {
                    leader: Some(leader),
                }) if leader != target && !failed.contains(&leader) => {
                    last = format!("node {target} is not the leader; node {leader} is");
                    self.remember_leader(group, leader);
                    target = leader;
                    // A redirect is cheap; still back off when it repeats.
                    if n > 2 {
                        self.pause_before_retry(group, n).await;
                    }
                }
                Err(other) => {
                    last = format!("node {target}: {}", describe(&other));
                    tracing::debug!(group, attempt = n, %last, "routing: attempt failed");
                    self.forget_leader(group);
                    if !failed.contains(&target) {
                        failed.push(target);
                    }
                    self.pause_before_retry(group, n).await;
                    target = self.retry_target(group, target, &mut failed);
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
        let Some(hosted) = self.groups.get(&group) else {
            return PeerResult::NoSuchGroup;
        };
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
        // The leader's clock, stamped where the entry is created.
        proposal.leader_ts_us = self.clock.now_us();
        match tokio::time::timeout(self.peer_timeout(), hosted.raft.client_write(proposal)).await {
            Err(_) => PeerResult::Failed("commit timed out (no quorum?)".into()),
            Ok(Ok(written)) => PeerResult::Proposed {
                response: written.data,
                log_id: written.log_id,
            },
            Ok(Err(e)) => match e.forward_to_leader() {
                Some(forward) => PeerResult::NotLeader {
                    leader: forward.leader_id,
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
        let first =
            if matches!(level, ReadLevel::Replica { .. }) && self.groups.contains_key(&group) {
                self.node_id
            } else {
                self.first_target(group)
            };
        self.route(group, first, |target| async move {
            if target == self.node_id {
                let source = self.check_local_read(group, level).await?;
                let state = self.groups[&group].state.clone();
                return Ok(ShardRead::Local { state, source });
            }
            let call = PeerCall::Read {
                keys: keys.to_vec(),
                level,
            };
            match self.clients.forward(target, group, &call).await {
                Ok(PeerResult::Read(ReadRows {
                    rows,
                    node_id,
                    leader,
                    applied_index,
                })) => {
                    if leader {
                        self.remember_leader(group, node_id);
                    }
                    Ok(ShardRead::Remote {
                        rows,
                        source: ReadSource {
                            group,
                            node_id,
                            leader,
                            applied_index,
                        },
                    })
                }
                Ok(other) => Err(other),
                Err(e) => Err(PeerResult::Failed(e.to_string())),
            }
        })
        .await
    }

    /// Whether this node may serve a read of `group` at `level` now (for
    /// STRONG, after confirming leadership and catching up to the read
    /// index). The error is the routing answer for the caller.
    pub async fn check_local_read(
        &self,
        group: GroupId,
        level: ReadLevel,
    ) -> Result<ReadSource, PeerResult> {
        let Some(hosted) = self.groups.get(&group) else {
            return Err(PeerResult::NoSuchGroup);
        };
        // The fields a read needs, copied under the watch borrow (which must
        // not be held across an await).
        let (is_leader, current_leader, mut applied_index, committed, lease_valid) = {
            let metrics = hosted.raft.metrics();
            let m = metrics.borrow_watched();
            let is_leader = m.state == ServerState::Leader;
            (
                is_leader,
                m.current_leader,
                m.last_applied.map_or(0, |id| id.index),
                m.cluster_committed.map_or(0, |id| id.index),
                is_leader && self.lease_valid(hosted, &m),
            )
        };
        if is_leader {
            self.activity(group).await;
        }
        let policy = match level {
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
    fn lease_valid(
        &self,
        hosted: &Group,
        m: &openraft::RaftMetrics<quiver_raft::TypeConfig>,
    ) -> bool {
        if hosted.handed_over_in(m.current_term) {
            return false;
        }
        let own_term_applied = m
            .last_applied
            .is_some_and(|id| id.leader_id.term == m.current_term);
        let alone = m
            .membership_config
            .membership()
            .voter_ids()
            .eq([self.node_id]);
        let lease = self.read_lease();
        own_term_applied
            && (alone
                || m.last_quorum_acked.as_ref().is_some_and(|acked| {
                    <openraft::TokioInstant as openraft::Instant>::now() < **acked + lease
                }))
    }

    /// Confirms with a quorum that this replica leads `hosted` (a read index
    /// or a lease renewal, as `option` says) and waits until it has applied
    /// everything committed before; the error is the routing answer.
    async fn confirm_leadership(
        &self,
        hosted: &Group,
        option: LinearizerOption,
    ) -> Result<(), PeerResult> {
        match tokio::time::timeout(self.peer_timeout(), hosted.raft.ensure_linearizable(option))
            .await
        {
            Err(_) => Err(PeerResult::Failed(
                "confirming leadership timed out (no quorum?)".into(),
            )),
            Ok(Err(e)) => Err(match e.forward_to_leader() {
                Some(forward) => PeerResult::NotLeader {
                    leader: forward.leader_id,
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
    fn read_lease(&self) -> Duration {
        Duration::from_millis(
            self.config
                .election_timeout_max_ms
                .saturating_sub(LEASE_MARGIN_MS),
        )
    }

    /// The leader side of a read index: confirms leadership and returns an
    /// applied index covering every entry committed before the call.
    pub async fn read_index_local(&self, group: GroupId) -> PeerResult {
        match self.check_local_read(group, ReadLevel::Strong).await {
            Ok(source) => PeerResult::ReadIndex {
                applied_index: source.applied_index,
            },
            Err(result) => result,
        }
    }

    /// Waits until this node's replica of `group` has applied `index`.
    pub async fn wait_applied(&self, group: GroupId, index: u64, timeout: Duration) -> bool {
        let Some(hosted) = self.groups.get(&group) else {
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
    /// commit (used when a request names a view this node does not know yet:
    /// it may have been applied through another node a moment ago).
    pub async fn sync_metadata(&self) -> Result<(), ClusterError> {
        let read_index = self
            .route(
                METADATA_GROUP,
                self.first_target(METADATA_GROUP),
                |target| async move {
                    let result = if target == self.node_id {
                        self.read_index_local(METADATA_GROUP).await
                    } else {
                        // The peer may itself wait a peer timeout for its read
                        // index: forward, which allows twice that.
                        self.clients
                            .forward(target, METADATA_GROUP, &PeerCall::ReadIndex)
                            .await
                            .unwrap_or_else(|e| PeerResult::Failed(e.to_string()))
                    };
                    match result {
                        PeerResult::ReadIndex { applied_index } => Ok(applied_index),
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

    /// Status of every hosted group.
    pub fn group_status(&self) -> Vec<pb::GroupStatus> {
        self.groups
            .iter()
            .map(|(&group, hosted)| {
                let m = hosted.raft.metrics().borrow_watched().clone();
                let membership = m.membership_config.membership();
                let last_log_index = m.last_log_index.unwrap_or(0);
                let lag = m
                    .replication
                    .as_ref()
                    .map(|replication| {
                        replication
                            .iter()
                            .filter(|(id, _)| **id != self.node_id)
                            .map(|(id, matched)| pb::ReplicaLag {
                                node_id: *id,
                                entries_behind: last_log_index
                                    .saturating_sub(matched.map_or(0, |l| l.index)),
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                pb::GroupStatus {
                    group,
                    role: format!("{:?}", m.state).to_lowercase(),
                    leader_id: m.current_leader.unwrap_or(0),
                    term: m.current_term,
                    applied_index: m.last_applied.map_or(0, |id| id.index),
                    last_log_index,
                    voters: membership.voter_ids().collect(),
                    learners: membership.learner_ids().collect(),
                    lag,
                    log_bytes: hosted.log.bytes(),
                    rows_estimate: hosted.state.store().stats().rows_estimate,
                    asleep: hosted.pulse.is_asleep(),
                }
            })
            .collect()
    }

    /// Calls waiting per peer and lane (see `PeerClients::queue_depths`).
    pub fn peer_queue_depths(&self) -> Vec<(NodeId, &'static str, usize)> {
        self.clients.queue_depths()
    }

    /// Whether shutdown has begun (background loops stop).
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Hands the groups this node leads to other voters, then stops every
    /// group's Raft and flushes its store.
    pub async fn shutdown(&self) {
        self.hand_over_all().await;
        self.stopping
            .store(true, std::sync::atomic::Ordering::SeqCst);
        for (group, hosted) in &self.groups {
            if let Err(e) = hosted.raft.shutdown().await {
                tracing::warn!(group, error = %e, "raft shutdown");
            }
            if let Err(e) = hosted.state.flush() {
                tracing::warn!(group, error = %e, "flush on shutdown");
            }
            hosted.log.close();
        }
    }
}

fn random_sequence_start() -> u64 {
    // Half the space: the counter never wraps into ids of an earlier start.
    rand::random::<u64>() >> 1
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

/// Adds configured metadata learners the leader has not added yet (nodes
/// beyond the metadata voters follow the registry as learners).
async fn reconcile_metadata_learners(cluster: std::sync::Weak<Cluster>) {
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let Some(cluster) = cluster.upgrade() else {
            return;
        };
        let Some(hosted) = cluster.groups.get(&METADATA_GROUP) else {
            return;
        };
        if cluster.placement.metadata_learners.is_empty() {
            return;
        }
        if !hosted.raft.is_leader() {
            continue;
        }
        let metrics = hosted.raft.metrics().borrow_watched().clone();
        let present: Vec<NodeId> = metrics
            .membership_config
            .membership()
            .learner_ids()
            .collect();
        for &learner in &cluster.placement.metadata_learners {
            if present.contains(&learner) {
                continue;
            }
            let node = BasicNode::new(cluster.placement.nodes[&learner].clone());
            // A membership change is a proposal: the group must be awake.
            cluster.activity(METADATA_GROUP).await;
            if let Err(e) = hosted.raft.add_learner(learner, node, false).await {
                tracing::debug!(learner, error = %e, "adding metadata learner");
            }
        }
    }
}
