//! quiverd, Quiver's server: the gRPC front end (`quiver.v1.FeatureStore`,
//! `quiver.admin.v1.Admin`, health, reflection), the cluster (the Raft groups a node hosts, placement,
//! the internal peer service, routing of proposals and reads), the read path
//! (key dedup, per-shard fan-out, hot cache, status judgement), the write
//! path (limits, schema, one proposal per shard), configuration, Prometheus
//! metrics, and error-to-status mapping.
//!
//! Architecture invariant: the server reaches storage only through
//! `quiver-raft` and `quiver-engine`, and clients only through `quiver-proto`
//! types. It must never depend on `quiver-tools` or on the tests crate.

// Tests may unwrap; production code may not (workspace lint).
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod admin;
pub mod admission;
pub mod backup;
pub mod cache;
pub mod client_auth;
pub mod cluster;
pub mod config;
pub mod convert;
pub mod error;
pub mod expiry;
pub mod join;
pub mod metrics;
pub mod node;
pub mod read_path;
pub mod serve;
pub mod service;
pub mod tls;
pub mod write_path;

pub use config::Config;
pub use serve::{ServeError, serve};
