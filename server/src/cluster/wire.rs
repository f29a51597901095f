//! The postcard-encoded payloads of the internal `Peer` service.

use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse, VoteRequest, VoteResponse};
use quiver_raft::types::{LogId, Vote};
use quiver_raft::{Manifest, NodeId, Proposal, Response, TypeConfig};
use serde::{Deserialize, Serialize};

/// How fresh a forwarded read must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReadLevel {
    /// The leader's applied state.
    Leader,
    /// Linearizable (read index on the leader).
    Strong,
    /// Any replica within the staleness bound.
    Replica,
}

/// One call to a peer, for one group.
#[derive(Debug, Serialize, Deserialize)]
pub enum PeerCall {
    /// Raft replication.
    AppendEntries(AppendEntriesRequest<TypeConfig>),
    /// Raft election.
    Vote(VoteRequest<TypeConfig>),
    /// A proposal for the group's leader to append.
    Propose(Proposal),
    /// Rows by storage key.
    Read {
        /// Storage keys.
        keys: Vec<Vec<u8>>,
        /// Freshness.
        level: ReadLevel,
    },
    /// The leader confirms its leadership and returns an applied index that
    /// covers everything committed before the call (a read index).
    ReadIndex,
}

/// Rows read by a peer.
#[derive(Debug, Serialize, Deserialize)]
pub struct ReadRows {
    /// Encoded rows (engine codec), in key order.
    pub rows: Vec<Option<Vec<u8>>>,
    /// The serving node.
    pub node_id: NodeId,
    /// Whether it led the group.
    pub leader: bool,
    /// Its applied index when it read.
    pub applied_index: u64,
}

/// A peer's answer.
#[derive(Debug, Serialize, Deserialize)]
pub enum PeerResult {
    /// Raft replication answer.
    AppendEntries(AppendEntriesResponse<TypeConfig>),
    /// Raft election answer.
    Vote(VoteResponse<TypeConfig>),
    /// The command was committed and applied.
    Proposed {
        /// What apply returned.
        response: Response,
        /// The entry's log id.
        log_id: LogId,
    },
    /// Rows.
    Read(ReadRows),
    /// A read index.
    ReadIndex {
        /// Applied index covering every earlier commit.
        applied_index: u64,
    },
    /// Snapshot installed.
    SnapshotInstalled {
        /// The receiver's vote.
        vote: Vote,
    },
    /// This node does not lead the group; try `leader`.
    NotLeader {
        /// The leader it knows of.
        leader: Option<NodeId>,
    },
    /// This node holds no replica of the group.
    NoSuchGroup,
    /// The call failed here.
    Failed(String),
}

/// The first chunk of a snapshot stream.
#[derive(Debug, Serialize, Deserialize)]
pub struct SnapshotHeader {
    /// The sender's vote.
    pub vote: Vote,
    /// What is coming.
    pub manifest: Manifest,
}

/// Encodes a payload.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, postcard::Error> {
    postcard::to_stdvec(value)
}

/// Decodes a payload from the network.
pub fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, postcard::Error> {
    postcard::from_bytes(bytes)
}
