//! Quiver's benchmark support: key choice (uniform or zipfian), the data set
//! every target is loaded with, the targets themselves (Quiver, Redis, etcd,
//! each over its own protocol), latency histograms and CPU accounting. The
//! `quiver-bench` load generator (src/main.rs) drives every target with it; the
//! criterion micro-benchmarks live in benches/.
//!
//! Architecture invariant: the load generator talks to servers only over
//! their public protocols, so it measures what a client sees. It must never
//! link the server into the process it measures.

// Tests may unwrap; production code may not (workspace lint).
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod dataset;
pub mod keys;
pub mod report;
pub mod routed;
pub mod target;
