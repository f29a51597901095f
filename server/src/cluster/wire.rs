//! The postcard-encoded payloads of the internal `Peer` service.

use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, TransferLeaderRequest, TransferLeaderResponse,
    VoteRequest, VoteResponse,
};
use quiver_raft::types::{LogId, Vote};
use quiver_raft::{GroupId, Manifest, NodeId, Proposal, Response, TypeConfig};
use serde::{Deserialize, Serialize};

use super::operator::{MembershipChange, ShardState};

/// How fresh a forwarded read must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReadLevel {
    /// The leader's applied state.
    Leader,
    /// Linearizable (read index on the leader).
    Strong,
    /// Any replica that heard from its leader within `within_ms` (and is
    /// within `cluster.replica_lag_entries_max` of its commit index).
    Replica {
        /// The contact window (ms); 0: the leader lease
        /// (`cluster.election_timeout_max_ms`).
        within_ms: u64,
    },
    /// Any replica's applied state as it is, however stale (a degraded
    /// Get's fallback when no replica answers at the level it asked for).
    Any,
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
    /// Node-to-node liveness, sent every `cluster.liveness_interval_ms`
    /// whatever the number of groups; carries what hibernation needs.
    Ping(Ping),
    /// Raft pre-vote: would the receiver vote for this candidate? (Asked
    /// before a candidate raises its term, so a node that merely lost touch
    /// cannot depose a leader the others still hear.)
    PreVote(VoteRequest<TypeConfig>),
    /// The leader hands leadership to the receiver.
    TransferLeader(TransferLeaderRequest<TypeConfig>),
    /// An operator's request to the group's leader: hand leadership to `to`
    /// (which starts the Raft [`PeerCall::TransferLeader`] exchange).
    HandOver {
        /// The voter that should lead.
        to: NodeId,
    },
    /// The group's membership as its leader sees it (for an operator).
    ShardState,
    /// An operator's membership change, made by the group's leader if the
    /// membership is still the one at `expect`.
    ChangeMembership {
        /// The change.
        change: MembershipChange,
        /// The log id of the membership it was decided on.
        expect: Option<LogId>,
    },
    /// Checkpoint this node's replica of the group and upload it into a
    /// backup (see `crate::backup`).
    BackupShard {
        /// The backup target.
        url: String,
        /// The backup's id.
        backup_id: String,
    },
    /// What a reader sees of the shard's rows, by content (the leader's
    /// replica, after a read barrier): see `Cluster::checksum_shard`.
    ChecksumShard,
    /// [`PeerCall::ReadIndex`] under the leader's lease (answered as a
    /// `LEADER` read is: no round trip while the lease holds).
    LeaseReadIndex,
}

/// What a node tells each peer every liveness interval (and answers a
/// ping with).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ping {
    /// The sender.
    pub from: NodeId,
    /// Groups the sender leads and has put to sleep.
    pub hibernating: Vec<Hibernating>,
    /// Groups the receiver leads, asleep, that the sender needs awake (it is
    /// behind and must be sent entries).
    pub wake: Vec<GroupId>,
    /// The loads of the shards the sender leads (for the scheduler).
    pub loads: Vec<super::load::ShardLoad>,
    /// The sender ships the logs of the groups it leads to a backup target
    /// (`backup.log_url`): a node that does not ship releases log holds
    /// only while no peer ships.
    pub ships_log: bool,
}

/// A group its leader has put to sleep: followers whose log ends at
/// `last_index` in `term` may sleep too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hibernating {
    /// The group.
    pub group: GroupId,
    /// The leader's term.
    pub term: u64,
    /// The leader's last log index (everything committed and applied).
    pub last_index: u64,
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
    /// The answer to a [`PeerCall::Ping`]: the receiver's own news (its
    /// sleeping groups), so news flows even when only one direction works.
    Pong(Ping),
    /// Pre-vote answer.
    PreVote(VoteResponse<TypeConfig>),
    /// Leader transfer answer.
    TransferLeader(TransferLeaderResponse<TypeConfig>),
    /// The answer to [`PeerCall::HandOver`]: who leads now.
    HandedOver {
        /// The leader now.
        leader: NodeId,
        /// Its term.
        term: u64,
        /// Whether leadership moved (false: the target already led).
        moved: bool,
        /// How long the handover took on the old leader.
        elapsed_ms: u64,
    },
    /// The leader refused the operation: a precondition does not hold, and
    /// asking another node would not help.
    Refused(String),
    /// The leader started the operation but it did not finish in time;
    /// asking again (perhaps of a new leader) would start it again.
    TimedOut(String),
    /// The answer to [`PeerCall::ShardState`].
    ShardState(Box<ShardState>),
    /// The answer to [`PeerCall::ChangeMembership`]: the change is
    /// committed.
    MembershipChanged {
        /// The membership entry's log id.
        log_id: LogId,
    },
    /// The shard no longer owns keys of the call (a split moved them):
    /// route again by the current cluster map.
    WrongShard(String),
    /// The answer to [`PeerCall::BackupShard`]: where under the backup the
    /// files went, and what they hold.
    BackedUp {
        /// The part's directory.
        dir: String,
        /// Its record.
        record: Box<quiver_raft::backup::ShardBackup>,
    },
    /// The answer to [`PeerCall::ChecksumShard`].
    Checksummed {
        /// The rows' digest.
        digest: quiver_engine::digest::ContentDigest,
        /// The hash range scanned (start, end; `None`: the end of the
        /// ring) as the shard's own state has it, `None` for a shard that
        /// never split (it holds what the map routes to it). The caller
        /// compares it with the map's: between a split's apply and the
        /// map's update they differ, and a sum over the map's shards would
        /// miss the new shard's rows.
        range: Option<HashRange>,
    },
    /// The shard no longer owns keys of the call (a split moved them), with
    /// its current descriptor and those of the shards split off it that
    /// the answering node hosts: the caller routes again by them at once.
    /// (Appended last: the encoding of the variants before it stays.)
    Moved(Box<Moved>),
}

/// A refusal for keys a split moved, with the descriptors to route by.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Moved {
    /// Why, for people.
    pub message: String,
    /// The refusing shard first, then its children.
    pub shards: Vec<super::placement::RouteHint>,
}

/// A hash range: its first hash and its end (`None`: the end of the ring).
pub type HashRange = (u64, Option<u64>);

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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use quiver_engine::{RowWrite, Value};
    use quiver_raft::Command;

    fn propose(key: &str, value: i64) -> PeerCall {
        PeerCall::Propose(Proposal {
            request_id: 99,
            leader_ts_us: 5,
            command: Command::Write {
                view_id: 2,
                rows: vec![RowWrite {
                    entity_key: key.to_owned(),
                    event_ts_us: 1,
                    values: vec![(1, Value::Int64(value))],
                }],
            },
        })
    }

    // Peer payloads come from the network: any bytes decode to a payload or
    // a typed error, never a panic or an allocation beyond the input.
    // `PROPTEST_CASES=1000000 cargo test --workspace --lib -- wire` for a
    // long run.
    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_the_peer_decoders(
            bytes in proptest::collection::vec(any::<u8>(), 0..512)
        ) {
            let _ = decode::<PeerCall>(&bytes);
            let _ = decode::<PeerResult>(&bytes);
            let _ = decode::<SnapshotHeader>(&bytes);
        }

        #[test]
        fn mutated_calls_never_panic_the_peer_decoders(
            key in ".{0,40}", value in any::<i64>(),
            keys in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..24), 0..6),
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..4),
            cut in any::<usize>(),
        ) {
            for call in [
                propose(&key, value),
                PeerCall::Read { keys: keys.clone(), level: ReadLevel::Strong },
                PeerCall::Read { keys: keys.clone(), level: ReadLevel::Any },
            ] {
                let mut bytes = encode(&call).unwrap();
                prop_assert!(decode::<PeerCall>(&bytes).is_ok());
                for &(at, mask) in &flips {
                    let at = at % bytes.len();
                    bytes[at] ^= mask;
                }
                let _ = decode::<PeerCall>(&bytes);
                let _ = decode::<PeerCall>(&bytes[..cut % (bytes.len() + 1)]);
            }
        }

        #[test]
        fn mutated_moved_answers_never_panic_the_decoder(
            message in ".{0,40}",
            ranges in proptest::collection::vec(
                (any::<u32>(), any::<u64>(), any::<Option<u64>>(), any::<u64>(),
                 proptest::collection::vec(any::<u64>(), 0..5), any::<Option<u64>>()),
                0..4,
            ),
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..4),
            cut in any::<usize>(),
        ) {
            let shards: Vec<super::super::placement::RouteHint> = ranges
                .into_iter()
                .map(|(shard, start, end, version, voters, leader)| {
                    super::super::placement::RouteHint { shard, start, end, version, voters, leader }
                })
                .collect();
            let answer = PeerResult::Moved(Box::new(Moved { message, shards: shards.clone() }));
            let mut bytes = encode(&answer).unwrap();
            match decode::<PeerResult>(&bytes) {
                Ok(PeerResult::Moved(moved)) => prop_assert_eq!(moved.shards, shards),
                other => prop_assert!(false, "{other:?}"),
            }
            for &(at, mask) in &flips {
                let at = at % bytes.len();
                bytes[at] ^= mask;
            }
            let _ = decode::<PeerResult>(&bytes);
            let _ = decode::<PeerResult>(&bytes[..cut % (bytes.len() + 1)]);
        }
    }
}
