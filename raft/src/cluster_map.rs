//! The cluster map: which nodes form the cluster, which shards cut the hash
//! ring, where each shard's replicas live, and the operators (replica moves)
//! under way. It is state of the metadata group (group 0), changed only by
//! [`MapCommand`]s applied in its log, so every node that has applied the
//! same entries holds the same map.
//!
//! This module is pure: it validates and applies commands and encodes the
//! map; the state machine stores it, the server routes and hosts by it.
//!
//! Invariants ([`ClusterMap::check`], property-tested):
//! - the shards' ranges cover the 64-bit hash ring without gap or overlap;
//! - a shard has at most one replica per node, and at least one voter;
//! - no replica id is ever handed out twice: every id created on a running
//!   cluster takes a fresh incarnation from `next_incarnation`;
//! - at most one operator per shard, and its replicas are the shard's;
//! - node ids are never reused (`next_node_id` only grows, removed nodes
//!   stay in the map as `Removed`).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::types::{GroupId, NODE_ID_MAX, NodeId, ReplicaId};

/// The map's encoding version.
pub const MAP_FORMAT: u32 = 1;
/// Most shards a map may hold (a bound for decoding as much as for use).
pub const MAP_SHARDS_MAX: usize = 65_536;
/// Most nodes a map may hold (removed ones included).
pub const MAP_NODES_MAX: usize = 4_096;
/// Longest node address accepted.
pub const NODE_ADDR_BYTES_MAX: usize = 256;
/// Longest operator reason kept.
pub const OPERATOR_REASON_BYTES_MAX: usize = 256;

/// What a node is doing in the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum NodeState {
    /// Joined, following the metadata group, not yet given replicas.
    Joining,
    /// Holds and is given replicas.
    Serving,
    /// Its replicas and leaderships are being moved away; it gets no new
    /// ones.
    Draining,
    /// Gone for good; its id is never used again.
    Removed,
}

impl fmt::Display for NodeState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NodeState::Joining => "joining",
            NodeState::Serving => "serving",
            NodeState::Draining => "draining",
            NodeState::Removed => "removed",
        })
    }
}

/// One node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Client address (gRPC `FeatureStore` and `Admin`).
    pub addr: String,
    /// Peer address (Raft traffic, forwarded requests).
    pub peer_addr: String,
    /// Its state.
    pub state: NodeState,
}

/// A shard's epoch, as TiKV's region epoch: `conf_ver` counts membership
/// changes, `version` counts changes of the key range (splits).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ShardEpoch {
    /// Membership changes.
    pub conf_ver: u64,
    /// Range changes.
    pub version: u64,
}

/// Whether a replica votes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum ReplicaRole {
    /// Counts for quorum.
    Voter,
    /// Receives the log, does not vote (a replica being added).
    Learner,
}

/// One replica of a shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ReplicaDesc {
    /// Its id (its node is `id.node()`).
    pub id: ReplicaId,
    /// Voter or learner.
    pub role: ReplicaRole,
}

/// One shard: an arc of the hash ring and its replicas.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardDesc {
    /// First hash of the arc.
    pub start: u64,
    /// First hash past the arc; `None`: the arc runs to the end of the ring.
    pub end: Option<u64>,
    /// Its epoch.
    pub epoch: ShardEpoch,
    /// Its replicas, by id.
    pub replicas: Vec<ReplicaDesc>,
    /// The shard it was split from, and the index of the split entry in
    /// that shard's log (its replicas, on the parent's nodes, start there).
    pub split_from: Option<(GroupId, u64)>,
}

impl ShardDesc {
    /// Whether the shard's arc holds `hash`.
    pub fn contains(&self, hash: u64) -> bool {
        hash >= self.start && self.end.is_none_or(|end| hash < end)
    }

    /// The voters' ids.
    pub fn voters(&self) -> impl Iterator<Item = ReplicaId> + '_ {
        self.replicas
            .iter()
            .filter(|r| r.role == ReplicaRole::Voter)
            .map(|r| r.id)
    }

    /// The replica on `node`, if any.
    pub fn replica_on(&self, node: NodeId) -> Option<ReplicaDesc> {
        self.replicas.iter().copied().find(|r| r.id.node() == node)
    }

    /// Whether `id` is one of the shard's replicas.
    pub fn has(&self, id: ReplicaId) -> bool {
        self.replicas.iter().any(|r| r.id == id)
    }
}

/// What an operator does to one shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum OperatorKind {
    /// Add replica `to` (a new id) as a learner, let it catch up, make it a
    /// voter in place of `from` (if any) in one joint membership change,
    /// then remove `from`.
    Move {
        /// The replica that leaves; `None`: a replica is added.
        from: Option<ReplicaId>,
        /// The new replica.
        to: ReplicaId,
    },
    /// Remove a voter (more replicas than the replication factor, or one on
    /// a removed node that cannot be replaced).
    Remove {
        /// The replica that leaves.
        replica: ReplicaId,
    },
    /// Split the shard's range at `at`: `[at, end)` becomes shard `child`,
    /// with replicas on the same nodes (under the same replica ids).
    Split {
        /// Where the range is cut.
        at: u64,
        /// The new shard.
        child: GroupId,
    },
}

/// How far an operator got. Steps only go forward; from `Promote` on an
/// operator can no longer be cancelled (the membership may be joint).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum OperatorStep {
    /// The new replica is being added to the shard's membership as a
    /// learner.
    AddLearner,
    /// The learner is catching up (log or snapshot).
    CatchUp,
    /// The voter set is being changed (a joint membership and then the new
    /// uniform one).
    Promote,
}

impl fmt::Display for OperatorStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OperatorStep::AddLearner => "add-learner",
            OperatorStep::CatchUp => "catch-up",
            OperatorStep::Promote => "promote",
        })
    }
}

/// A change of one shard's replicas under way.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Operator {
    /// Unique in the cluster's life.
    pub id: u64,
    /// The shard.
    pub shard: GroupId,
    /// What it does.
    pub kind: OperatorKind,
    /// How far it got.
    pub step: OperatorStep,
    /// Why it was started (an operator's command, the scheduler's rule).
    pub reason: String,
    /// When it started (the metadata group's leader time, µs).
    pub started_us: i64,
    /// When it entered its current step.
    pub step_started_us: i64,
    /// Cancelled (before `Promote`): its new replica is being taken out of
    /// the shard's membership, then the operator is dropped.
    pub cancelled: bool,
}

/// What an operator is asked to do (replica ids are allocated when it
/// starts).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum OperatorRequest {
    /// Add a replica on `to_node`, removing `from` once it votes.
    Move {
        /// The replica that leaves, if any.
        from: Option<ReplicaId>,
        /// Where the new replica goes.
        to_node: NodeId,
    },
    /// Remove a voter.
    Remove {
        /// The replica.
        replica: ReplicaId,
    },
    /// Split the shard at hash `at` (`None`: the middle of its range).
    Split {
        /// Where to cut.
        at: Option<u64>,
    },
}

/// The cluster map (see the module doc).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterMap {
    /// Encoding version ([`MAP_FORMAT`]).
    pub format: u32,
    /// Bumped by every change.
    pub version: u64,
    /// Voters per shard the scheduler aims for (capped by serving nodes).
    pub replication_factor: u32,
    /// Voters of the metadata group the scheduler aims for.
    pub metadata_voters: u32,
    /// The next node id a joining node gets.
    pub next_node_id: NodeId,
    /// The next replica incarnation (never 0: incarnation 0 is a static
    /// cluster's first start).
    pub next_incarnation: u32,
    /// The next operator id.
    pub next_operator_id: u64,
    /// The next shard id a split hands out.
    pub next_shard_id: GroupId,
    /// Every node that ever was.
    pub nodes: BTreeMap<NodeId, NodeInfo>,
    /// Every shard.
    pub shards: BTreeMap<GroupId, ShardDesc>,
    /// Operators under way, by shard.
    pub operators: BTreeMap<GroupId, Operator>,
    /// Replicas removed from their shard whose node has not yet confirmed
    /// deleting them.
    pub tombstones: BTreeSet<(GroupId, ReplicaId)>,
}

/// A change of the map: the payload of a metadata-group entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MapCommand {
    /// The first map of the cluster (refused if there is one).
    Bootstrap(Box<ClusterMap>),
    /// A node joins: it gets the next node id, or, if a joining node
    /// already has these addresses, that node's id (a retried join).
    AddNode {
        /// Client address.
        addr: String,
        /// Peer address.
        peer_addr: String,
    },
    /// A node that joined now has other addresses (it restarted elsewhere).
    SetNodeAddr {
        /// The node.
        node: NodeId,
        /// Client address.
        addr: String,
        /// Peer address.
        peer_addr: String,
    },
    /// A node's state changes (see [`ClusterMap::set_node_state`] for the
    /// allowed transitions).
    SetNodeState {
        /// The node.
        node: NodeId,
        /// Its new state.
        state: NodeState,
        /// For `Removed`: also while the map still lists replicas on it
        /// (a dead node; the scheduler replaces them).
        force: bool,
    },
    /// Starts an operator on a shard.
    StartOperator {
        /// The shard.
        shard: GroupId,
        /// What to do.
        request: OperatorRequest,
        /// Why.
        reason: String,
    },
    /// Moves an operator to a later step.
    AdvanceOperator {
        /// The shard.
        shard: GroupId,
        /// The operator.
        id: u64,
        /// The step it enters.
        step: OperatorStep,
    },
    /// Ends an operator whose change the shard's membership now holds
    /// (committed): a move's new replica votes and the old one is gone, a
    /// removal's replica is gone, a split applied. The map derives the
    /// shard's replicas from the operator; replicas that left are
    /// tombstoned.
    FinishOperator {
        /// The shard.
        shard: GroupId,
        /// The operator.
        id: u64,
    },
    /// Ends a split operator: the shard applied the split at `index` (its
    /// range lists the child), so `[at, end)` is the child's now. Also
    /// after a cancel: a split that applied stands.
    FinishSplit {
        /// The shard that split.
        shard: GroupId,
        /// The operator.
        id: u64,
        /// The split entry's index in the shard's log.
        index: u64,
    },
    /// Cancels an operator before `Promote`: it no longer advances; its
    /// executor takes the new replica out of the shard's membership and
    /// then drops it.
    CancelOperator {
        /// The shard.
        shard: GroupId,
        /// The operator.
        id: u64,
    },
    /// Drops a cancelled operator whose new replica is out of the shard's
    /// membership: the replica is tombstoned.
    DropOperator {
        /// The shard.
        shard: GroupId,
        /// The operator.
        id: u64,
    },
    /// A node deleted a tombstoned replica.
    ReplicaDestroyed {
        /// The shard.
        shard: GroupId,
        /// The replica.
        replica: ReplicaId,
    },
}

impl fmt::Display for MapCommand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MapCommand::Bootstrap(map) => write!(
                f,
                "bootstrap the cluster map ({} nodes, {} shards)",
                map.nodes.len(),
                map.shards.len()
            ),
            MapCommand::AddNode { addr, .. } => write!(f, "add node at {addr}"),
            MapCommand::SetNodeAddr { node, addr, .. } => write!(f, "node {node} is at {addr}"),
            MapCommand::SetNodeState { node, state, .. } => write!(f, "node {node}: {state}"),
            MapCommand::StartOperator { shard, request, .. } => {
                write!(f, "start {request:?} on shard {shard}")
            }
            MapCommand::AdvanceOperator { shard, id, step } => {
                write!(f, "operator {id} on shard {shard}: {step}")
            }
            MapCommand::FinishOperator { shard, id } => {
                write!(f, "finish operator {id} on shard {shard}")
            }
            MapCommand::FinishSplit { shard, id, index } => {
                write!(f, "finish split {id} of shard {shard} (at index {index})")
            }
            MapCommand::CancelOperator { shard, id } => {
                write!(f, "cancel operator {id} on shard {shard}")
            }
            MapCommand::DropOperator { shard, id } => {
                write!(f, "drop operator {id} on shard {shard}")
            }
            MapCommand::ReplicaDestroyed { shard, replica } => {
                write!(f, "replica {replica} of shard {shard} destroyed")
            }
        }
    }
}

/// What an applied map command answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MapOutcome {
    /// The map changed (or a retried command found it done).
    Changed {
        /// The map's version now.
        version: u64,
    },
    /// A node was added (or a joining node's id returned again).
    NodeAdded {
        /// Its id.
        node: NodeId,
    },
    /// An operator started.
    OperatorStarted(Operator),
}

/// Why a map command was refused (deterministically, on every replica).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MapError {
    /// The named node, shard or operator does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The command conflicts with the map's state.
    #[error("{0}")]
    Conflict(String),
    /// The command is malformed.
    #[error("{0}")]
    Invalid(String),
}

fn conflict(message: impl Into<String>) -> MapError {
    MapError::Conflict(message.into())
}

fn invalid(message: impl Into<String>) -> MapError {
    MapError::Invalid(message.into())
}

/// The first hash of shard `s` (1-based) when the ring is cut into `count`
/// equal arcs: the arcs a static cluster starts with (shard `s` owns the
/// hashes `h` with `⌊h·count / 2⁶⁴⌋ = s-1`).
pub fn equal_arc_start(s: u32, count: u32) -> u64 {
    let numerator = u128::from(s.saturating_sub(1)) << 64;
    // < 2^64 since s - 1 < count.
    numerator.div_ceil(u128::from(count.max(1))) as u64
}

impl ClusterMap {
    /// A static cluster's first map: `nodes` serving, `shard_count` equal
    /// arcs, each shard's voters as `replicas` says (by node, incarnation 0).
    pub fn bootstrap(
        nodes: BTreeMap<NodeId, NodeInfo>,
        replicas: &BTreeMap<GroupId, Vec<NodeId>>,
        replication_factor: u32,
        metadata_voters: u32,
    ) -> ClusterMap {
        let count = u32::try_from(replicas.len()).unwrap_or(u32::MAX);
        let shards = replicas
            .iter()
            .map(|(&shard, on)| {
                let end = (shard < count).then(|| equal_arc_start(shard + 1, count));
                let mut replicas: Vec<ReplicaDesc> = on
                    .iter()
                    .map(|&node| ReplicaDesc {
                        id: ReplicaId::first(node),
                        role: ReplicaRole::Voter,
                    })
                    .collect();
                replicas.sort();
                (
                    shard,
                    ShardDesc {
                        start: equal_arc_start(shard, count),
                        end,
                        epoch: ShardEpoch::default(),
                        replicas,
                        split_from: None,
                    },
                )
            })
            .collect();
        let next_node_id = nodes.keys().max().map_or(1, |max| max + 1);
        let next_shard_id = replicas.keys().max().map_or(1, |max| max + 1);
        ClusterMap {
            format: MAP_FORMAT,
            version: 1,
            replication_factor,
            metadata_voters,
            next_node_id,
            next_incarnation: 1,
            next_operator_id: 1,
            next_shard_id,
            nodes,
            shards,
            operators: BTreeMap::new(),
            tombstones: BTreeSet::new(),
        }
    }

    /// The shard owning `hash` (a linear scan is avoided by the server's
    /// range index; this is the reference).
    pub fn shard_of_hash(&self, hash: u64) -> Option<GroupId> {
        self.shards
            .iter()
            .find(|(_, desc)| desc.contains(hash))
            .map(|(&id, _)| id)
    }

    /// The nodes that are neither joining nor removed nor draining.
    pub fn serving_nodes(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.nodes
            .iter()
            .filter(|(_, info)| info.state == NodeState::Serving)
            .map(|(&id, _)| id)
    }

    /// The replicas the map places on `node`, by shard.
    pub fn replicas_on(&self, node: NodeId) -> impl Iterator<Item = (GroupId, ReplicaDesc)> + '_ {
        self.shards
            .iter()
            .filter_map(move |(&shard, desc)| desc.replica_on(node).map(|r| (shard, r)))
    }

    /// Checks the invariants of the module doc.
    pub fn check(&self) -> Result<(), MapError> {
        if self.format != MAP_FORMAT {
            return Err(invalid(format!(
                "cluster map format {} is not {MAP_FORMAT}",
                self.format
            )));
        }
        if self.shards.is_empty() || self.shards.len() > MAP_SHARDS_MAX {
            return Err(invalid(format!("{} shards", self.shards.len())));
        }
        if self.nodes.len() > MAP_NODES_MAX {
            return Err(invalid(format!("{} nodes", self.nodes.len())));
        }
        if self.next_incarnation == 0 {
            return Err(invalid("next replica incarnation 0"));
        }
        for (&id, info) in &self.nodes {
            if id == 0 || id > NODE_ID_MAX || id >= self.next_node_id {
                return Err(invalid(format!(
                    "node id {id} (next {})",
                    self.next_node_id
                )));
            }
            check_addr(&info.addr)?;
            check_addr(&info.peer_addr)?;
        }
        let mut ordered: Vec<(&GroupId, &ShardDesc)> = self.shards.iter().collect();
        ordered.sort_by_key(|(_, desc)| desc.start);
        let mut expected_start = Some(0u64);
        for &(&shard, desc) in &ordered {
            if shard == crate::types::METADATA_GROUP || shard >= self.next_shard_id {
                return Err(invalid(format!(
                    "shard {shard} (next {})",
                    self.next_shard_id
                )));
            }
            if Some(desc.start) != expected_start {
                return Err(invalid(format!(
                    "shard {shard} starts at {:#x}, not where the previous one ends",
                    desc.start
                )));
            }
            if desc.end.is_some_and(|end| end <= desc.start) {
                return Err(invalid(format!("shard {shard} has an empty range")));
            }
            expected_start = desc.end;
            let mut nodes = BTreeSet::new();
            for replica in &desc.replicas {
                if !nodes.insert(replica.id.node()) {
                    return Err(invalid(format!(
                        "shard {shard} has two replicas on node {}",
                        replica.id.node()
                    )));
                }
                if !self.nodes.contains_key(&replica.id.node()) {
                    return Err(invalid(format!(
                        "shard {shard} has a replica on unknown node {}",
                        replica.id.node()
                    )));
                }
                if replica.id.incarnation() >= self.next_incarnation {
                    return Err(invalid(format!(
                        "replica {} of shard {shard} has an incarnation not yet handed out",
                        replica.id
                    )));
                }
            }
            if desc.voters().next().is_none() {
                return Err(invalid(format!("shard {shard} has no voter")));
            }
        }
        if expected_start.is_some() {
            return Err(invalid("the shards do not reach the end of the ring"));
        }
        for (&shard, op) in &self.operators {
            let desc = self
                .shards
                .get(&shard)
                .ok_or_else(|| invalid(format!("operator on unknown shard {shard}")))?;
            if op.shard != shard || op.id >= self.next_operator_id {
                return Err(invalid(format!("operator {} on shard {shard}", op.id)));
            }
            match op.kind {
                OperatorKind::Move { from, to } => {
                    if from.is_some_and(|from| !desc.has(from)) {
                        return Err(invalid(format!(
                            "operator {} moves a replica shard {shard} does not have",
                            op.id
                        )));
                    }
                    // Once promoted the new replica is in the map when the
                    // operator finishes; before, it is listed as a learner.
                    if op.step < OperatorStep::Promote && !desc.has(to) {
                        return Err(invalid(format!(
                            "operator {}'s new replica is not listed",
                            op.id
                        )));
                    }
                }
                OperatorKind::Remove { replica } => {
                    if !desc.has(replica) {
                        return Err(invalid(format!(
                            "operator {} removes a replica shard {shard} does not have",
                            op.id
                        )));
                    }
                }
                OperatorKind::Split { at, child } => {
                    if !desc.contains(at) || at == desc.start {
                        return Err(invalid(format!(
                            "operator {} cuts shard {shard} outside its range",
                            op.id
                        )));
                    }
                    if self.shards.contains_key(&child) || child >= self.next_shard_id {
                        return Err(invalid(format!(
                            "operator {} splits into shard {child}, which exists or was not handed out",
                            op.id
                        )));
                    }
                }
            }
        }
        Ok(())
    }

    /// Applies `command` at leader time `now_us`: the map changes only if
    /// the command is accepted.
    pub fn apply(&mut self, command: MapCommand, now_us: i64) -> Result<MapOutcome, MapError> {
        let mut next = self.clone();
        let outcome = next.apply_in_place(command, now_us)?;
        if let MapOutcome::Changed { .. } | MapOutcome::OperatorStarted(_) = outcome {
            next.version += 1;
        }
        // A bug here must refuse the command, not store a broken map.
        next.check()?;
        *self = next;
        Ok(match outcome {
            MapOutcome::Changed { .. } => MapOutcome::Changed {
                version: self.version,
            },
            other => other,
        })
    }

    fn apply_in_place(&mut self, command: MapCommand, now_us: i64) -> Result<MapOutcome, MapError> {
        match command {
            MapCommand::Bootstrap(_) => Err(conflict("the cluster map exists already")),
            MapCommand::AddNode { addr, peer_addr } => self.add_node(addr, peer_addr),
            MapCommand::SetNodeAddr {
                node,
                addr,
                peer_addr,
            } => {
                check_addr(&addr)?;
                check_addr(&peer_addr)?;
                self.check_addrs_free(Some(node), &addr, &peer_addr)?;
                let info = self
                    .nodes
                    .get_mut(&node)
                    .filter(|info| info.state != NodeState::Removed)
                    .ok_or_else(|| MapError::NotFound(format!("no node {node}")))?;
                info.addr = addr;
                info.peer_addr = peer_addr;
                Ok(MapOutcome::Changed { version: 0 })
            }
            MapCommand::SetNodeState { node, state, force } => {
                self.set_node_state(node, state, force)
            }
            MapCommand::StartOperator {
                shard,
                request,
                mut reason,
            } => {
                truncate_to_char_boundary(&mut reason, OPERATOR_REASON_BYTES_MAX);
                self.start_operator(shard, request, reason, now_us)
            }
            MapCommand::AdvanceOperator { shard, id, step } => {
                let op = self.operator_mut(shard, id)?;
                if op.cancelled {
                    return Err(conflict(format!("operator {id} was cancelled")));
                }
                if step <= op.step {
                    return Err(conflict(format!(
                        "operator {id} is at {} already, cannot go to {step}",
                        op.step
                    )));
                }
                op.step = step;
                op.step_started_us = now_us;
                Ok(MapOutcome::Changed { version: 0 })
            }
            MapCommand::FinishOperator { shard, id } => self.finish_operator(shard, id),
            MapCommand::FinishSplit { shard, id, index } => {
                let op = self.operator_mut(shard, id)?.clone();
                let OperatorKind::Split { at, child } = op.kind else {
                    return Err(conflict(format!("operator {id} is not a split")));
                };
                self.finish_split(shard, at, child, index)
            }
            MapCommand::CancelOperator { shard, id } => {
                let op = self.operator_mut(shard, id)?;
                let split = matches!(op.kind, OperatorKind::Split { .. });
                if op.step >= OperatorStep::Promote && !split {
                    return Err(conflict(format!(
                        "operator {id} on shard {shard} is promoting its replica; it can only \
                         finish"
                    )));
                }
                op.cancelled = true;
                op.step_started_us = now_us;
                Ok(MapOutcome::Changed { version: 0 })
            }
            MapCommand::DropOperator { shard, id } => {
                let op = self.operator_mut(shard, id)?;
                if !op.cancelled {
                    return Err(conflict(format!(
                        "operator {id} on shard {shard} was not cancelled"
                    )));
                }
                let kind = op.kind;
                self.operators.remove(&shard);
                if let OperatorKind::Move { to, .. } = kind
                    && let Some(desc) = self.shards.get_mut(&shard)
                {
                    desc.replicas.retain(|r| r.id != to);
                    self.tombstone(shard, to);
                }
                Ok(MapOutcome::Changed { version: 0 })
            }
            MapCommand::ReplicaDestroyed { shard, replica } => {
                self.tombstones.remove(&(shard, replica));
                Ok(MapOutcome::Changed { version: 0 })
            }
        }
    }

    /// Refuses addresses another member (not `except`) uses.
    fn check_addrs_free(
        &self,
        except: Option<NodeId>,
        addr: &str,
        peer_addr: &str,
    ) -> Result<(), MapError> {
        if addr == peer_addr {
            return Err(invalid(format!("client and peer address are both {addr}")));
        }
        for (&id, info) in &self.nodes {
            if info.state == NodeState::Removed || Some(id) == except {
                continue;
            }
            if [&info.addr, &info.peer_addr]
                .iter()
                .any(|used| *used == addr || *used == peer_addr)
            {
                return Err(conflict(format!(
                    "node {id} ({}) already uses address {addr} or {peer_addr}",
                    info.state
                )));
            }
        }
        Ok(())
    }

    fn add_node(&mut self, addr: String, peer_addr: String) -> Result<MapOutcome, MapError> {
        check_addr(&addr)?;
        check_addr(&peer_addr)?;
        if let Some((&id, _)) = self.nodes.iter().find(|(_, info)| {
            info.state == NodeState::Joining && info.addr == addr && info.peer_addr == peer_addr
        }) {
            return Ok(MapOutcome::NodeAdded { node: id });
        }
        self.check_addrs_free(None, &addr, &peer_addr)?;
        if self.nodes.len() >= MAP_NODES_MAX {
            return Err(conflict(format!(
                "the cluster has had {MAP_NODES_MAX} nodes"
            )));
        }
        let node = self.next_node_id;
        if node > NODE_ID_MAX {
            return Err(conflict("node ids are exhausted"));
        }
        self.next_node_id += 1;
        self.nodes.insert(
            node,
            NodeInfo {
                addr,
                peer_addr,
                state: NodeState::Joining,
            },
        );
        self.version += 1;
        Ok(MapOutcome::NodeAdded { node })
    }

    /// Allowed: joining → serving; serving ⇄ draining; any → removed (only
    /// when no shard lists a replica on the node, unless `force`).
    fn set_node_state(
        &mut self,
        node: NodeId,
        state: NodeState,
        force: bool,
    ) -> Result<MapOutcome, MapError> {
        let replicas = self.replicas_on(node).count();
        let no_node = || MapError::NotFound(format!("no node {node}"));
        let from = self.nodes.get(&node).ok_or_else(no_node)?.state;
        let allowed = match (from, state) {
            (a, b) if a == b => return Ok(MapOutcome::Changed { version: 0 }),
            (NodeState::Removed, _) => false,
            (_, NodeState::Removed) => true,
            (NodeState::Joining, NodeState::Serving) => true,
            (NodeState::Serving, NodeState::Draining) => true,
            (NodeState::Draining, NodeState::Serving) => true,
            _ => false,
        };
        if !allowed {
            return Err(conflict(format!(
                "node {node} cannot go from {from} to {state}"
            )));
        }
        if (from, state) == (NodeState::Serving, NodeState::Draining) {
            self.check_drain_keeps_redundancy(node)?;
        }
        if state == NodeState::Removed && replicas > 0 && !force {
            return Err(conflict(format!(
                "node {node} still holds {replicas} replicas: drain it first (or force the \
                 removal of a dead node)"
            )));
        }
        self.nodes.get_mut(&node).ok_or_else(no_node)?.state = state;
        if state == NodeState::Removed {
            // Nothing will confirm their deletion.
            self.tombstones
                .retain(|(_, replica)| replica.node() != node);
        }
        Ok(MapOutcome::Changed { version: 0 })
    }

    /// Voters per shard the scheduler keeps: the replication factor,
    /// capped by the nodes that hold replicas for good or until they can
    /// move (serving or draining, up or down).
    pub fn kept_voters(&self) -> usize {
        let holders = self
            .nodes
            .values()
            .filter(|info| matches!(info.state, NodeState::Serving | NodeState::Draining))
            .count();
        (self.replication_factor as usize).clamp(1, holders.max(1))
    }

    /// Refuses a drain that could only finish by lowering some shard's
    /// voter count: every replica on `node` needs a serving node that does
    /// not hold one of its shard. The scheduler never lowers redundancy to
    /// finish a drain (a node lost meanwhile would take the quorum of the
    /// shards left on two voters), so such a drain would never end.
    fn check_drain_keeps_redundancy(&self, node: NodeId) -> Result<(), MapError> {
        let serving_after = self.serving_nodes().filter(|&n| n != node).count();
        // A shard briefly above the replication factor (mid-operator) needs
        // only what the scheduler keeps.
        let kept = self.kept_voters();
        let widest = self
            .shards
            .iter()
            .filter(|(_, desc)| desc.replica_on(node).is_some())
            .map(|(&shard, desc)| (desc.voters().count().min(kept), shard))
            .max();
        match widest {
            Some((voters, shard)) if serving_after < voters => Err(conflict(format!(
                "draining node {node} would leave {serving_after} serving nodes for the \
                 {voters} voters of shard {shard}: its replicas would have nowhere to go, and \
                 a drain never lowers a shard's redundancy. Add a node first (quiverctl node \
                 add), or, if node {node} is dead, remove it with --force"
            ))),
            _ => Ok(()),
        }
    }

    fn start_operator(
        &mut self,
        shard: GroupId,
        request: OperatorRequest,
        reason: String,
        now_us: i64,
    ) -> Result<MapOutcome, MapError> {
        let desc = self
            .shards
            .get(&shard)
            .ok_or_else(|| MapError::NotFound(format!("no shard {shard}")))?;
        if let Some(op) = self.operators.get(&shard) {
            return Err(conflict(format!(
                "shard {shard} has operator {} under way ({:?}, {})",
                op.id, op.kind, op.step
            )));
        }
        let kind = match request {
            OperatorRequest::Move { from, to_node } => {
                let target = self
                    .nodes
                    .get(&to_node)
                    .ok_or_else(|| MapError::NotFound(format!("no node {to_node}")))?;
                if target.state != NodeState::Serving {
                    return Err(conflict(format!(
                        "node {to_node} is {}, not serving",
                        target.state
                    )));
                }
                if let Some(there) = desc.replica_on(to_node) {
                    return Err(conflict(format!(
                        "node {to_node} already holds replica {} of shard {shard}",
                        there.id
                    )));
                }
                if let Some(from) = from
                    && !desc.has(from)
                {
                    return Err(MapError::NotFound(format!(
                        "shard {shard} has no replica {from}"
                    )));
                }
                if self
                    .tombstones
                    .iter()
                    .any(|&(s, r)| s == shard && r.node() == to_node)
                {
                    return Err(conflict(format!(
                        "node {to_node} has not yet deleted its old replica of shard {shard}"
                    )));
                }
                let to = ReplicaId::new(to_node, self.next_incarnation);
                self.next_incarnation = self
                    .next_incarnation
                    .checked_add(1)
                    .ok_or_else(|| conflict("replica incarnations are exhausted"))?;
                let desc = self
                    .shards
                    .get_mut(&shard)
                    .ok_or_else(|| MapError::NotFound(format!("no shard {shard}")))?;
                desc.replicas.push(ReplicaDesc {
                    id: to,
                    role: ReplicaRole::Learner,
                });
                desc.replicas.sort();
                OperatorKind::Move { from, to }
            }
            OperatorRequest::Remove { replica } => {
                if !desc.has(replica) {
                    return Err(MapError::NotFound(format!(
                        "shard {shard} has no replica {replica}"
                    )));
                }
                if desc.voters().all(|v| v == replica) {
                    return Err(conflict(format!(
                        "replica {replica} is shard {shard}'s last voter"
                    )));
                }
                OperatorKind::Remove { replica }
            }
            OperatorRequest::Split { at } => {
                let end = desc.end.map_or(1u128 << 64, u128::from);
                let middle = ((u128::from(desc.start) + end) / 2) as u64;
                let at = at.unwrap_or(middle);
                if at <= desc.start || !desc.contains(at) {
                    return Err(invalid(format!(
                        "{at:#018x} is not inside shard {shard}'s range (a split needs a range of \
                         at least two hashes)"
                    )));
                }
                if desc.replicas.iter().any(|r| r.role == ReplicaRole::Learner) {
                    return Err(conflict(format!(
                        "shard {shard} has a learner; split it once its move is done"
                    )));
                }
                if self.shards.len() >= MAP_SHARDS_MAX {
                    return Err(conflict(format!("the cluster has {MAP_SHARDS_MAX} shards")));
                }
                let child = self.next_shard_id;
                self.next_shard_id = self
                    .next_shard_id
                    .checked_add(1)
                    .ok_or_else(|| conflict("shard ids are exhausted"))?;
                OperatorKind::Split { at, child }
            }
        };
        let op = Operator {
            id: self.next_operator_id,
            shard,
            kind,
            step: match kind {
                OperatorKind::Move { .. } => OperatorStep::AddLearner,
                OperatorKind::Remove { .. } | OperatorKind::Split { .. } => OperatorStep::Promote,
            },
            reason,
            started_us: now_us,
            step_started_us: now_us,
            cancelled: false,
        };
        self.next_operator_id += 1;
        self.operators.insert(shard, op.clone());
        Ok(MapOutcome::OperatorStarted(op))
    }

    fn finish_operator(&mut self, shard: GroupId, id: u64) -> Result<MapOutcome, MapError> {
        let op = self.operator_mut(shard, id)?.clone();
        if op.cancelled {
            return Err(conflict(format!("operator {id} was cancelled")));
        }
        let leaving = match op.kind {
            OperatorKind::Split { .. } => {
                return Err(conflict(format!(
                    "operator {id} is a split: it finishes with the split's index"
                )));
            }
            OperatorKind::Move { from, .. } => from,
            OperatorKind::Remove { replica } => Some(replica),
        };
        let desc = self
            .shards
            .get_mut(&shard)
            .ok_or_else(|| MapError::NotFound(format!("no shard {shard}")))?;
        desc.replicas.retain(|r| Some(r.id) != leaving);
        if let OperatorKind::Move { to, .. } = op.kind {
            for replica in &mut desc.replicas {
                if replica.id == to {
                    replica.role = ReplicaRole::Voter;
                }
            }
        }
        desc.epoch.conf_ver += 1;
        if let Some(leaving) = leaving {
            self.tombstone(shard, leaving);
        }
        self.operators.remove(&op.shard);
        Ok(MapOutcome::Changed { version: 0 })
    }

    /// Records that `replica` must be deleted by its node (unless that node
    /// is gone for good: nothing would ever confirm it).
    fn tombstone(&mut self, shard: GroupId, replica: ReplicaId) {
        let removed = self
            .nodes
            .get(&replica.node())
            .is_none_or(|info| info.state == NodeState::Removed);
        if !removed {
            self.tombstones.insert((shard, replica));
        }
    }

    /// The shard split at `at` (its replicas applied the split): `[at, end)`
    /// is shard `child` now, on the same replicas.
    fn finish_split(
        &mut self,
        shard: GroupId,
        at: u64,
        child: GroupId,
        index: u64,
    ) -> Result<MapOutcome, MapError> {
        let desc = self
            .shards
            .get_mut(&shard)
            .ok_or_else(|| MapError::NotFound(format!("no shard {shard}")))?;
        let child_desc = ShardDesc {
            start: at,
            end: desc.end,
            epoch: ShardEpoch {
                conf_ver: desc.epoch.conf_ver,
                version: desc.epoch.version + 1,
            },
            replicas: desc.replicas.clone(),
            split_from: Some((shard, index)),
        };
        desc.end = Some(at);
        desc.epoch.version += 1;
        self.shards.insert(child, child_desc);
        self.operators.remove(&shard);
        Ok(MapOutcome::Changed { version: 0 })
    }

    fn operator_mut(&mut self, shard: GroupId, id: u64) -> Result<&mut Operator, MapError> {
        match self.operators.get_mut(&shard) {
            Some(op) if op.id == id => Ok(op),
            Some(op) => Err(conflict(format!(
                "shard {shard}'s operator is {}, not {id}",
                op.id
            ))),
            None => Err(MapError::NotFound(format!(
                "shard {shard} has no operator {id}"
            ))),
        }
    }

    /// Encodes the map for storage.
    pub fn encode(&self) -> Result<Vec<u8>, postcard::Error> {
        postcard::to_stdvec(self)
    }

    /// Decodes a stored map (bytes that may be anything) and checks it.
    pub fn decode(bytes: &[u8]) -> Result<ClusterMap, MapError> {
        let map: ClusterMap =
            postcard::from_bytes(bytes).map_err(|e| invalid(format!("cluster map: {e}")))?;
        map.check()?;
        Ok(map)
    }
}

fn check_addr(addr: &str) -> Result<(), MapError> {
    if addr.is_empty() || addr.len() > NODE_ADDR_BYTES_MAX || addr.chars().any(char::is_control) {
        return Err(invalid(format!("bad node address {addr:?}")));
    }
    Ok(())
}

fn truncate_to_char_boundary(text: &mut String, bytes_max: usize) {
    if text.len() > bytes_max {
        let mut cut = bytes_max;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn nodes(count: u64) -> BTreeMap<NodeId, NodeInfo> {
        (1..=count)
            .map(|id| {
                (
                    id,
                    NodeInfo {
                        addr: format!("127.0.0.1:{}", 7000 + id),
                        peer_addr: format!("127.0.0.1:{}", 17000 + id),
                        state: NodeState::Serving,
                    },
                )
            })
            .collect()
    }

    fn map(node_count: u64, shards: u32) -> ClusterMap {
        let ids: Vec<NodeId> = (1..=node_count).collect();
        let replicas = (1..=shards)
            .map(|s| (s, ids.iter().copied().take(3).collect()))
            .collect();
        ClusterMap::bootstrap(nodes(node_count), &replicas, 3, 3)
    }

    #[test]
    fn equal_arcs_match_the_static_formula() {
        for count in [1u32, 2, 3, 7, 16, 4096] {
            let m = map(3, count);
            m.check().unwrap();
            for hash in [0u64, 1, u64::MAX / 3, u64::MAX / 2, u64::MAX - 1, u64::MAX]
                .into_iter()
                .chain((0..200u64).map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15)))
            {
                let expected = ((u128::from(hash) * u128::from(count)) >> 64) as u32 + 1;
                assert_eq!(m.shard_of_hash(hash), Some(expected), "{count} {hash:#x}");
            }
        }
    }

    #[test]
    fn a_move_allocates_a_fresh_id_and_tombstones_the_old_replica() {
        let mut m = map(4, 4);
        let op = match m
            .apply(
                MapCommand::StartOperator {
                    shard: 2,
                    request: OperatorRequest::Move {
                        from: Some(ReplicaId::first(1)),
                        to_node: 4,
                    },
                    reason: "test".into(),
                },
                10,
            )
            .unwrap()
        {
            MapOutcome::OperatorStarted(op) => op,
            other => panic!("{other:?}"),
        };
        let OperatorKind::Move { to, .. } = op.kind else {
            panic!("{op:?}")
        };
        assert_eq!(to.node(), 4);
        assert_eq!(to.incarnation(), 1);
        // A second operator on the shard is refused.
        assert!(matches!(
            m.apply(
                MapCommand::StartOperator {
                    shard: 2,
                    request: OperatorRequest::Remove {
                        replica: ReplicaId::first(2)
                    },
                    reason: String::new(),
                },
                11
            ),
            Err(MapError::Conflict(_))
        ));
        for step in [OperatorStep::CatchUp, OperatorStep::Promote] {
            m.apply(
                MapCommand::AdvanceOperator {
                    shard: 2,
                    id: op.id,
                    step,
                },
                12,
            )
            .unwrap();
        }
        assert!(
            m.apply(
                MapCommand::CancelOperator {
                    shard: 2,
                    id: op.id
                },
                13
            )
            .is_err(),
            "no cancel once promoting"
        );
        assert!(
            m.apply(
                MapCommand::DropOperator {
                    shard: 2,
                    id: op.id
                },
                13
            )
            .is_err(),
            "only a cancelled operator is dropped"
        );
        m.apply(
            MapCommand::FinishOperator {
                shard: 2,
                id: op.id,
            },
            14,
        )
        .unwrap();
        assert_eq!(
            m.shards[&2].voters().collect::<Vec<_>>(),
            vec![ReplicaId::first(2), ReplicaId::first(3), to]
        );
        assert!(m.tombstones.contains(&(2, ReplicaId::first(1))));
        assert!(m.operators.is_empty());
        assert_eq!(m.shards[&2].epoch.conf_ver, 1);
        // Moving back to node 1 waits for its old replica to be deleted,
        // then gets yet another id.
        let back = MapCommand::StartOperator {
            shard: 2,
            request: OperatorRequest::Move {
                from: Some(to),
                to_node: 1,
            },
            reason: String::new(),
        };
        assert!(m.apply(back.clone(), 15).is_err());
        m.apply(
            MapCommand::ReplicaDestroyed {
                shard: 2,
                replica: ReplicaId::first(1),
            },
            16,
        )
        .unwrap();
        match m.apply(back, 17).unwrap() {
            MapOutcome::OperatorStarted(Operator {
                kind: OperatorKind::Move { to: again, .. },
                ..
            }) => {
                assert_eq!(again.node(), 1);
                assert_ne!(again, ReplicaId::first(1));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_drain_that_would_lower_a_shard_s_redundancy_is_refused() {
        let drain = |node| MapCommand::SetNodeState {
            node,
            state: NodeState::Draining,
            force: false,
        };
        // Three nodes, three voters per shard: nowhere to go.
        let mut m = map(3, 2);
        let refused = m.apply(drain(2), 1).unwrap_err().to_string();
        assert!(refused.contains("nowhere to go"), "{refused}");
        assert_eq!(m.nodes[&2].state, NodeState::Serving);
        // A fourth node can take them; a second drain at once cannot.
        let mut m = map(4, 2);
        m.apply(drain(2), 1).unwrap();
        assert!(m.apply(drain(3), 2).is_err());
        // Back to serving, a node without replicas drains whatever the rest.
        m.apply(
            MapCommand::SetNodeState {
                node: 2,
                state: NodeState::Serving,
                force: false,
            },
            3,
        )
        .unwrap();
        m.apply(drain(4), 4).unwrap();
        // Shards run on fewer voters than nodes (two nodes, two voters):
        // the one serving node left could not take the other's replicas.
        let mut small = ClusterMap::bootstrap(nodes(2), &BTreeMap::from([(1, vec![1, 2])]), 3, 3);
        assert!(small.apply(drain(1), 1).is_err());
    }

    #[test]
    fn joins_are_idempotent_by_address_and_ids_are_never_reused() {
        let mut m = map(3, 2);
        let add = MapCommand::AddNode {
            addr: "10.0.0.9:7470".into(),
            peer_addr: "10.0.0.9:17470".into(),
        };
        let MapOutcome::NodeAdded { node } = m.apply(add.clone(), 1).unwrap() else {
            panic!()
        };
        assert_eq!(node, 4);
        assert_eq!(
            m.apply(add.clone(), 2).unwrap(),
            MapOutcome::NodeAdded { node: 4 }
        );
        m.apply(
            MapCommand::SetNodeState {
                node: 4,
                state: NodeState::Removed,
                force: false,
            },
            3,
        )
        .unwrap();
        assert_eq!(m.apply(add, 4).unwrap(), MapOutcome::NodeAdded { node: 5 });
        assert!(
            m.apply(
                MapCommand::AddNode {
                    addr: "127.0.0.1:7001".into(),
                    peer_addr: "x:1".into()
                },
                5
            )
            .is_err(),
            "a serving node's address"
        );
        assert!(
            m.apply(
                MapCommand::SetNodeState {
                    node: 1,
                    state: NodeState::Removed,
                    force: false
                },
                6
            )
            .is_err(),
            "node 1 holds replicas"
        );
    }

    #[test]
    fn a_split_cuts_the_range_and_the_child_inherits_the_replicas() {
        let mut m = map(3, 2);
        let MapOutcome::OperatorStarted(op) = m
            .apply(
                MapCommand::StartOperator {
                    shard: 2,
                    request: OperatorRequest::Split { at: None },
                    reason: String::new(),
                },
                1,
            )
            .unwrap()
        else {
            panic!()
        };
        let OperatorKind::Split { at, child } = op.kind else {
            panic!("{op:?}")
        };
        assert_eq!(child, 3);
        assert_eq!(at, (1u64 << 63) + (1 << 62), "the middle of shard 2's half");
        assert!(
            m.apply(
                MapCommand::FinishOperator {
                    shard: 2,
                    id: op.id
                },
                2
            )
            .is_err(),
            "a split finishes with its index"
        );
        m.apply(
            MapCommand::FinishSplit {
                shard: 2,
                id: op.id,
                index: 40,
            },
            2,
        )
        .unwrap();
        assert_eq!(m.shards[&3].split_from, Some((2, 40)));
        assert_eq!(m.shards[&2].end, Some(at));
        assert_eq!(m.shards[&3].start, at);
        assert_eq!(m.shards[&3].end, None);
        assert_eq!(m.shards[&3].replicas, m.shards[&2].replicas);
        assert_eq!(m.shards[&2].epoch.version, 1);
        assert_eq!(m.shard_of_hash(at), Some(3));
        assert_eq!(m.shard_of_hash(at - 1), Some(2));
        // A range of one hash cannot be cut.
        let at_start = MapCommand::StartOperator {
            shard: 3,
            request: OperatorRequest::Split { at: Some(at) },
            reason: String::new(),
        };
        assert!(m.apply(at_start, 3).is_err());
    }

    fn arb_command() -> impl Strategy<Value = MapCommand> {
        let node = 1u64..7;
        let shard = 1u32..8;
        prop_oneof![
            (0u8..6).prop_map(|n| MapCommand::AddNode {
                addr: format!("h{n}:1"),
                peer_addr: format!("h{n}:2"),
            }),
            (node.clone(), 0u8..6).prop_map(|(node, n)| MapCommand::SetNodeAddr {
                node,
                addr: format!("h{n}:1"),
                peer_addr: format!("h{n}:2"),
            }),
            (node.clone(), 0u8..4, any::<bool>()).prop_map(|(node, s, force)| {
                MapCommand::SetNodeState {
                    node,
                    state: [
                        NodeState::Joining,
                        NodeState::Serving,
                        NodeState::Draining,
                        NodeState::Removed,
                    ][usize::from(s)],
                    force,
                }
            }),
            (shard.clone(), node.clone(), 0u64..7, 0u32..3).prop_map(
                |(shard, to_node, from, inc)| MapCommand::StartOperator {
                    shard,
                    request: OperatorRequest::Move {
                        from: (from > 0).then(|| ReplicaId::new(from, inc)),
                        to_node,
                    },
                    reason: "p".into(),
                }
            ),
            (shard.clone(), proptest::option::of(any::<u64>())).prop_map(|(shard, at)| {
                MapCommand::StartOperator {
                    shard,
                    request: OperatorRequest::Split { at },
                    reason: String::new(),
                }
            }),
            (shard.clone(), node.clone(), 0u32..3).prop_map(|(shard, n, inc)| {
                MapCommand::StartOperator {
                    shard,
                    request: OperatorRequest::Remove {
                        replica: ReplicaId::new(n, inc),
                    },
                    reason: String::new(),
                }
            }),
            (shard.clone(), 0u64..6, 0u8..3).prop_map(|(shard, id, s)| {
                MapCommand::AdvanceOperator {
                    shard,
                    id,
                    step: [
                        OperatorStep::AddLearner,
                        OperatorStep::CatchUp,
                        OperatorStep::Promote,
                    ][usize::from(s)],
                }
            }),
            (shard.clone(), 0u64..6)
                .prop_map(|(shard, id)| MapCommand::FinishOperator { shard, id }),
            (shard.clone(), 0u64..6, 0u64..100)
                .prop_map(|(shard, id, index)| MapCommand::FinishSplit { shard, id, index }),
            (shard.clone(), 0u64..6)
                .prop_map(|(shard, id)| MapCommand::CancelOperator { shard, id }),
            (shard.clone(), 0u64..6).prop_map(|(shard, id)| MapCommand::DropOperator { shard, id }),
            (shard, node, 0u32..4).prop_map(|(shard, n, inc)| MapCommand::ReplicaDestroyed {
                shard,
                replica: ReplicaId::new(n, inc),
            }),
        ]
    }

    proptest! {
        /// Whatever commands arrive, the map keeps its invariants, refused
        /// commands change nothing, and no replica id is handed out twice.
        #[test]
        fn commands_keep_the_invariants(commands in proptest::collection::vec(arb_command(), 1..60)) {
            let mut m = map(4, 4);
            let mut handed_out: BTreeSet<ReplicaId> = m
                .shards
                .values()
                .flat_map(|d| d.replicas.iter().map(|r| r.id))
                .collect();
            for (at, command) in commands.into_iter().enumerate() {
                let before = m.clone();
                match m.apply(command, at as i64) {
                    Ok(MapOutcome::OperatorStarted(Operator { kind: OperatorKind::Move { to, .. }, .. })) => {
                        prop_assert!(handed_out.insert(to), "replica id {to} handed out twice");
                        prop_assert!(m.version > before.version);
                    }
                    Ok(_) => {}
                    Err(_) => prop_assert_eq!(&m, &before),
                }
                m.check().unwrap();
                prop_assert!(m.next_node_id >= before.next_node_id);
                prop_assert!(m.next_incarnation >= before.next_incarnation);
                prop_assert!(m.version >= before.version);
            }
        }

        /// A stored map is bytes from disk: anything decodes to a checked
        /// map or an error, never a panic.
        #[test]
        fn arbitrary_bytes_never_panic_the_map_decoder(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            if let Ok(decoded) = ClusterMap::decode(&bytes) {
                decoded.check().unwrap();
            }
        }

        #[test]
        fn mutated_maps_never_panic_the_decoder(
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..4),
            cut in any::<usize>(),
        ) {
            let mut bytes = map(3, 4).encode().unwrap();
            prop_assert_eq!(ClusterMap::decode(&bytes).unwrap(), map(3, 4));
            for (at, mask) in flips {
                let len = bytes.len();
                bytes[at % len] ^= mask;
            }
            let keep = cut % (bytes.len() + 1);
            for candidate in [&bytes[..], &bytes[..keep]] {
                if let Ok(decoded) = ClusterMap::decode(candidate) {
                    decoded.check().unwrap();
                }
            }
        }
    }
}
