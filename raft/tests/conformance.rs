//! openraft's storage conformance suite against Quiver's log store (segmented
//! log) and state machine (RocksDB + checkpoint snapshots).

#![allow(clippy::unwrap_used, missing_docs)]

use std::sync::Arc;

use openraft::testing::log::{StoreBuilder, Suite};
use quiver_engine::StoreOptions;
use quiver_engine::seglog::LogOptions;
use quiver_raft::types::StorageError;
use quiver_raft::{LogStore, NoObserver, StateMachine, TypeConfig};

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for Builder {
    async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError> {
        let dir = tempfile::tempdir().unwrap();
        let log = LogStore::open(
            dir.path().join("log"),
            LogOptions {
                segment_bytes_max: 4096,
                ..LogOptions::default()
            },
        )
        .unwrap();
        let options = StoreOptions::scratch();
        let sm =
            StateMachine::open(1, dir.path().join("sm"), options, Arc::new(NoObserver)).unwrap();
        Ok((dir, log, sm))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openraft_storage_suite() {
    Suite::test_all(Builder).await.unwrap();
}
