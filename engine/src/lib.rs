//! Quiver's storage engine on one machine: the data model (typed values,
//! feature views, rows), the versioned row encoding, the hash-ordered key
//! layout and the RocksDB state store with last-write-wins by event time and
//! ttl-driven compaction, and the segmented log that holds a replica's Raft
//! log.
//!
//! Architecture invariant: this crate knows nothing of Raft, gRPC, tokio or the
//! cluster. It must never depend on tonic, openraft, tokio or `quiver-proto`;
//! everything above it converts to and from its types.

// Tests may unwrap; production code may not (workspace lint).
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod clock;
pub mod codec;
pub mod digest;
pub mod durable;
pub mod error;
pub mod keys;
pub mod registry;
pub mod row;
pub mod seglog;
pub mod store;
mod ttl_filter;
pub mod value;
pub mod view;

pub use clock::{Clock, ManualClock, SkewedClock, SystemClock};
pub use error::{EngineError, ViewError};
pub use registry::{Catalog, Registry};
pub use row::{RowFreshness, StoredRow};
pub use store::{RowWrite, StateStore, StoreOptions, WriteOutcome};
pub use value::{Value, ValueType};
pub use view::{FeatureSpec, FeatureView, ViewSpec};
