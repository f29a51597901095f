//! The Raft type configuration and the commands a group replicates.

use std::fmt;

use quiver_engine::store::RowWrite;
use quiver_engine::view::{FeatureView, ViewSpec};
use serde::{Deserialize, Serialize};

/// A node of the cluster: one `quiverd` process and its data directory.
/// Ids are `1..=NODE_ID_MAX` and never reused: a node that leaves is
/// remembered as removed, a joining node gets the next unused id.
pub type NodeId = u64;

/// The largest node id: a [`ReplicaId`] keeps the node in its low 32 bits.
pub const NODE_ID_MAX: NodeId = u32::MAX as NodeId;

/// One replica of one Raft group: openraft's node id.
///
/// openraft forbids reusing an id inside a group: a replica that came back
/// empty under an id that once voted could replay a membership in which it
/// is part of a quorum, and nothing would notice. So a replica's id is its
/// node (low 32 bits) and an incarnation (high 32 bits) drawn from the
/// cluster map's never-decreasing counter whenever a replica is created on
/// a running cluster; a node that hosts a group again after giving it away
/// hosts it under a new id. The replicas a node creates at the first start
/// of a static cluster have incarnation 0, so their id is the node id (what
/// every id was before replica ids existed: the stored format is the same).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct ReplicaId(pub u64);

impl ReplicaId {
    /// The replica of `node` with `incarnation`.
    pub fn new(node: NodeId, incarnation: u32) -> ReplicaId {
        ReplicaId((u64::from(incarnation) << 32) | (node & NODE_ID_MAX))
    }

    /// The replica a node's first start creates (incarnation 0).
    pub fn first(node: NodeId) -> ReplicaId {
        ReplicaId::new(node, 0)
    }

    /// The node hosting this replica.
    pub fn node(self) -> NodeId {
        self.0 & NODE_ID_MAX
    }

    /// Which of the node's replicas of the group this is.
    pub fn incarnation(self) -> u32 {
        // The high half of a u64 fits a u32.
        (self.0 >> 32) as u32
    }
}

impl fmt::Display for ReplicaId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.incarnation() {
            0 => write!(f, "{}", self.node()),
            incarnation => write!(f, "{}.{incarnation}", self.node()),
        }
    }
}

/// openraft's storage conformance suite builds ids from numbers; Quiver's
/// own code builds them with [`ReplicaId::new`].
impl From<u64> for ReplicaId {
    fn from(id: u64) -> ReplicaId {
        ReplicaId(id)
    }
}

/// A Raft group: 0 is the metadata group (feature-view registry and cluster
/// map), shards are numbered from 1 (a static cluster starts with
/// `1..=shard_count`; splits allocate more from the cluster map).
pub type GroupId = u32;

/// The metadata group.
pub const METADATA_GROUP: GroupId = 0;

openraft::declare_raft_types!(
    /// Quiver's openraft configuration: commands in, responses out, members
    /// are replicas (a node hosts one replica of each of its groups); the
    /// `BasicNode` address is informational, peers are found through the
    /// cluster map by the replica's node.
    pub TypeConfig:
        D = Proposal,
        R = Response,
        NodeId = ReplicaId,
        Node = openraft::BasicNode,
);

/// A log id.
pub type LogId = openraft::type_config::alias::LogIdOf<TypeConfig>;
/// A vote.
pub type Vote = openraft::type_config::alias::VoteOf<TypeConfig>;
/// A log entry.
pub type Entry = openraft::type_config::alias::EntryOf<TypeConfig>;
/// Membership as last applied.
pub type StoredMembership = openraft::type_config::alias::StoredMembershipOf<TypeConfig>;
/// Snapshot metadata.
pub type SnapshotMeta = openraft::type_config::alias::SnapshotMetaOf<TypeConfig>;
/// A storage error as openraft reports it.
pub type StorageError = openraft::StorageError<TypeConfig>;

/// One replicated command. Every command is applied by every replica of its
/// group in log order and must be deterministic: it carries everything apply
/// needs (already-validated rows, the leader's clock), never reads the
/// replica's clock or registry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Command {
    /// Write rows of one view (last-write-wins by event time); the rows'
    /// write time is the proposal's leader timestamp.
    Write {
        /// The view.
        view_id: u32,
        /// Rows, checked against the view by the proposing node.
        rows: Vec<RowWrite>,
    },
    /// Delete the rows of entity keys.
    Delete {
        /// The view.
        view_id: u32,
        /// Entity keys.
        entity_keys: Vec<String>,
    },
    /// Drop cached rows on every replica (stored data is untouched). No keys:
    /// the whole view.
    Invalidate {
        /// The view.
        view_id: u32,
        /// Entity keys; empty means every key of the view.
        entity_keys: Vec<String>,
    },
    /// Create or evolve a feature view (metadata group only).
    ApplyView {
        /// The view as declared.
        spec: ViewSpec,
    },
    /// Delete a feature view (metadata group only).
    DeleteView {
        /// The view name.
        name: String,
    },
    /// Move views' expiry floors forward (data shards) to the entry's
    /// leader time minus each view's retention (ttl + grace): rows with an
    /// event time below a view's floor are expired on every replica at this
    /// log position, never served again, refused if written, and dropped by
    /// compaction. Apply reads no clock and no registry (the leader time is
    /// in the entry), so replicas cannot disagree on what is expired, and
    /// only the shard leader's clock counts, never the proposer's.
    Expire {
        /// `(view id, retention µs)`.
        retention: Vec<(u32, i64)>,
    },
    /// Change the cluster map (metadata group only).
    Map(crate::cluster_map::MapCommand),
    /// Split the shard at hash `at`: every replica creates a replica of
    /// shard `child` holding `[at, end)` from a checkpoint of its own, and
    /// keeps `[start, at)`. Applied only if the shard's range and version
    /// are still the ones given (the epoch the split was decided on).
    Split {
        /// The new shard.
        child: GroupId,
        /// Where the range is cut.
        at: u64,
        /// The shard's first hash, as the proposer knows it.
        start: u64,
        /// Its end, as the proposer knows it.
        end: Option<u64>,
        /// Its range version, as the proposer knows it.
        version: u64,
    },
    /// Applies nothing but its request id: an operator that gives up on a
    /// proposal fences its request id, so that a copy still in flight is
    /// answered `AlreadyApplied` instead of applied.
    Fence,
    /// A change-stream consumer (backup shipping, replication) confirms it
    /// has what the log holds up to `index`: every replica keeps the
    /// entries after it (within `log_hold_bytes_max`) for it. A hold only
    /// moves forward; the first one registers the consumer. See
    /// [`crate::change_stream`].
    HoldLog {
        /// The consumer's name (at most `LOG_CONSUMER_NAME_BYTES_MAX` bytes).
        consumer: String,
        /// The last index it has.
        index: u64,
    },
    /// A consumer is gone: its hold is dropped.
    ReleaseLog {
        /// The consumer's name.
        consumer: String,
    },
}

/// Identifies one proposal across the router's retries: the state machine
/// applies a request id once; a retry of an entry that already committed is
/// answered [`Response::AlreadyApplied`]. 0 means "no id".
pub type RequestId = u128;

/// What a Raft entry carries: a command, its request id and the leader's
/// clock.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Proposal {
    /// Unique per proposal (not per attempt).
    pub request_id: RequestId,
    /// The leader's wall clock when it appended the entry (µs): the write
    /// time of written rows, and the entry's time for point-in-time restore.
    pub leader_ts_us: i64,
    /// What to do.
    pub command: Command,
}

impl fmt::Display for Proposal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (request {:x})", self.command, self.request_id)
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Command::Write { view_id, rows, .. } => {
                write!(f, "write {} rows of view {view_id}", rows.len())
            }
            Command::Delete {
                view_id,
                entity_keys,
            } => write!(f, "delete {} keys of view {view_id}", entity_keys.len()),
            Command::Invalidate {
                view_id,
                entity_keys,
            } => write!(f, "invalidate {} keys of view {view_id}", entity_keys.len()),
            Command::ApplyView { spec } => write!(f, "apply view {}", spec.name),
            Command::DeleteView { name } => write!(f, "delete view {name}"),
            Command::Expire { retention } => {
                write!(f, "expire rows of {} views", retention.len())
            }
            Command::Map(command) => write!(f, "{command}"),
            Command::Split { child, at, .. } => write!(f, "split at {at:#x} into shard {child}"),
            Command::Fence => write!(f, "fence"),
            Command::HoldLog { consumer, index } => {
                write!(f, "hold the log after {index} for {consumer}")
            }
            Command::ReleaseLog { consumer } => write!(f, "release {consumer}'s log hold"),
        }
    }
}

/// Why a command was refused by the state machine (deterministically, on
/// every replica alike).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RejectKind {
    /// The input breaks a rule.
    Invalid,
    /// The input conflicts with stored state (incompatible view change).
    Conflict,
    /// The named thing does not exist.
    NotFound,
    /// A limit would be exceeded.
    LimitExceeded,
    /// The shard does not own the keys (or no longer has the range) the
    /// command was routed with: a split moved them. Retryable through the
    /// current cluster map; never recorded against the request id.
    WrongShard,
}

/// What applying a command did.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub enum Response {
    /// A blank or membership entry.
    #[default]
    Empty,
    /// Rows written.
    Written {
        /// Rows that became their entity's latest row.
        rows_applied: u64,
        /// Rows older than the stored row.
        rows_stale: u64,
    },
    /// Rows deleted.
    Deleted {
        /// Keys that held a row.
        rows_deleted: u64,
    },
    /// Cache entries dropped (counted on the replica that answered).
    Invalidated {
        /// Entries dropped from that node's hot cache.
        entries_dropped: u64,
    },
    /// A view applied.
    ViewApplied {
        /// The stored view.
        view: Box<FeatureView>,
        /// Whether it changed.
        changed: bool,
    },
    /// A view deleted.
    ViewDeleted,
    /// Expiry floors applied.
    Expired {
        /// Views whose floor moved forward.
        views_advanced: u64,
    },
    /// An earlier entry with the same request id was applied already (a
    /// router retry of a proposal whose answer was lost); nothing was done.
    AlreadyApplied,
    /// The command was refused.
    Rejected {
        /// Why, as a class.
        kind: RejectKind,
        /// Why, for people.
        message: String,
    },
    /// The cluster map changed (appended last: the encoding of the
    /// variants before it stays as it was).
    Map(crate::cluster_map::MapOutcome),
    /// The shard split.
    Split {
        /// The new shard.
        child: GroupId,
        /// The split entry's index (where the child's log starts).
        index: u64,
    },
    /// A fence was applied.
    Fenced,
    /// A log hold was set or released.
    LogHold {
        /// The consumer's hold after the entry (`None`: released).
        index: Option<u64>,
    },
}
