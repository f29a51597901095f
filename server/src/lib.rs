//! quiverd, Quiver's server: the gRPC front end (`quiver.v1.FeatureStore`,
//! health, reflection), the read path (key dedup, hot cache, storage, status
//! judgement), the write path (limits, schema, last-write-wins apply, cache
//! coherence), configuration, and error-to-status mapping.
//!
//! Architecture invariant: the server talks to storage only through
//! `quiver-engine`, and to clients only through `quiver-proto` types. It must
//! never depend on `quiver-tools` or on the tests crate.

// Tests may unwrap; production code may not (workspace lint).
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod cache;
pub mod config;
pub mod convert;
pub mod error;
pub mod node;
pub mod read_path;
pub mod serve;
pub mod service;
pub mod write_path;

pub use config::Config;
pub use serve::{ServeError, serve};
