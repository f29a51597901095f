//! Quiver's replication layer: every shard (and the metadata group holding
//! the feature-view registry) is an openraft group whose log is the engine's
//! segmented log and whose state machine is the engine's RocksDB store.
//!
//! - [`types`]: the openraft type configuration and the replicated commands
//!   (each in a [`Proposal`] with a request id and the leader's clock);
//! - [`cluster_map`]: the cluster map (nodes, shards and their replicas,
//!   operators), state of the metadata group;
//! - [`log_store`]: `RaftLogStorage` on [`quiver_engine::seglog`];
//! - [`backup`]: one shard's part of a full backup (a checkpoint, its files'
//!   crc32c and sha256, its rows' logical digest) and its verification;
//! - [`change_stream`]: a shard's committed entries at a resumable
//!   position, and the log holds of its consumers (backups, replication);
//! - [`state_machine`]: `RaftStateMachine` on [`quiver_engine::StateStore`],
//!   snapshots as RocksDB checkpoints with a manifest of every file's size
//!   and crc32.
//!
//! Architecture invariant: this crate depends on the engine and openraft,
//! never on the server (gRPC front end, routing, cache) or the tools. The
//! transport is the server's business; this crate only defines what is
//! replicated and how it is stored.

// Tests may unwrap; production code may not (workspace lint).
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod backup;
pub mod change_stream;
pub mod cluster_map;
pub mod failpoint;
pub mod log_store;
pub mod state_machine;
pub mod types;

pub use log_store::LogStore;
pub use state_machine::{ApplyObserver, Manifest, NoObserver, SnapshotDir, StateMachine};
pub use types::{
    Command, GroupId, METADATA_GROUP, NODE_ID_MAX, NodeId, Proposal, ReplicaId, RequestId,
    Response, TypeConfig,
};

/// A Raft group handle of Quiver's configuration.
pub type Raft = openraft::Raft<TypeConfig, StateMachine>;
