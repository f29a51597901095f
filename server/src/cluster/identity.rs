//! Who this node is, as its data directory records it.
//!
//! - `NODE` (`{"node_id": N}`): written once the first start has created
//!   every replica it had to create. Its absence means a first start, the
//!   only time replicas are created without an operator asking for them.
//!   A data directory never changes node: a configuration naming another
//!   id is refused.
//! - `JOINED` (`{"node_id": N, "map": ...}`): written by `quiverd --join`
//!   before the first start: the id the cluster gave this node and the
//!   cluster map of that moment (this node's peers until its metadata
//!   replica has caught up).

use std::path::Path;

use quiver_engine::durable::write_atomic;
use quiver_raft::NodeId;
use quiver_raft::cluster_map::ClusterMap;
use serde::{Deserialize, Serialize};

use super::ClusterError;

const NODE_FILE: &str = "NODE";
const JOINED_FILE: &str = "JOINED";
/// Largest identity file read (a map of thousands of nodes and shards fits).
const IDENTITY_FILE_BYTES_MAX: u64 = 64 << 20;

#[derive(Debug, Serialize, Deserialize)]
struct NodeRecord {
    node_id: NodeId,
}

#[derive(Debug, Serialize, Deserialize)]
struct JoinedRecord {
    node_id: NodeId,
    map: ClusterMap,
}

/// This node's identity.
#[derive(Debug)]
pub struct Identity {
    /// Its id.
    pub node_id: NodeId,
    /// The map it joined with, if it joined a running cluster.
    pub joined: Option<ClusterMap>,
    /// Whether its first start has not completed yet.
    pub first_start: bool,
}

impl Identity {
    /// Reads the identity files of `data_dir`; `config_node_id` is the id
    /// the configuration gives (used by a static cluster's nodes).
    pub fn load(data_dir: &Path, config_node_id: NodeId) -> Result<Identity, ClusterError> {
        let node: Option<NodeRecord> = read_json(&data_dir.join(NODE_FILE))?;
        let joined: Option<JoinedRecord> = read_json(&data_dir.join(JOINED_FILE))?;
        if let Some(joined) = &joined {
            joined
                .map
                .check()
                .map_err(|e| ClusterError::Start(format!("{JOINED_FILE}: cluster map: {e}")))?;
        }
        let node_id = match (&node, &joined) {
            (_, Some(joined)) => joined.node_id,
            (Some(node), None) if node.node_id != config_node_id => {
                return Err(ClusterError::Start(format!(
                    "{} belongs to node {}, the configuration says node {config_node_id}",
                    data_dir.display(),
                    node.node_id
                )));
            }
            (Some(node), None) => node.node_id,
            (None, None) => config_node_id,
        };
        if let Some(node) = &node
            && node.node_id != node_id
        {
            return Err(ClusterError::Start(format!(
                "{} names node {} in {NODE_FILE} and node {node_id} in {JOINED_FILE}",
                data_dir.display(),
                node.node_id
            )));
        }
        if node_id == 0 || node_id > quiver_raft::NODE_ID_MAX {
            return Err(ClusterError::Start(format!(
                "node id {node_id} is not in 1..={}",
                quiver_raft::NODE_ID_MAX
            )));
        }
        Ok(Identity {
            node_id,
            joined: joined.map(|joined| joined.map),
            first_start: node.is_none(),
        })
    }
}

/// Records that the first start of `node_id` completed (once).
pub fn write_node(data_dir: &Path, node_id: NodeId) -> Result<(), ClusterError> {
    let path = data_dir.join(NODE_FILE);
    if path.exists() {
        return Ok(());
    }
    write_json(&path, &NodeRecord { node_id })
}

/// Records the outcome of a join, before the node's first start.
pub fn write_joined(
    data_dir: &Path,
    node_id: NodeId,
    map: &ClusterMap,
) -> Result<(), ClusterError> {
    std::fs::create_dir_all(data_dir)
        .map_err(|e| ClusterError::Start(format!("{}: {e}", data_dir.display())))?;
    write_json(
        &data_dir.join(JOINED_FILE),
        &JoinedRecord {
            node_id,
            map: map.clone(),
        },
    )
}

/// Whether `data_dir` has been used by a node (holds its identity or any
/// replica).
pub fn is_used(data_dir: &Path) -> bool {
    data_dir.join(NODE_FILE).exists()
        || data_dir.join(JOINED_FILE).exists()
        || data_dir.join(super::host::GROUPS_DIR).exists()
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Option<T>, ClusterError> {
    let failed = |e: String| ClusterError::Start(format!("{}: {e}", path.display()));
    match std::fs::metadata(path) {
        Ok(meta) if meta.len() > IDENTITY_FILE_BYTES_MAX => {
            return Err(failed(format!("{} bytes", meta.len())));
        }
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(failed(e.to_string())),
    }
    let bytes = std::fs::read(path).map_err(|e| failed(e.to_string()))?;
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| failed(e.to_string()))
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), ClusterError> {
    let bytes = serde_json::to_vec_pretty(value)
        .map_err(|e| ClusterError::Start(format!("encoding {}: {e}", path.display())))?;
    write_atomic(path, &bytes).map_err(|e| ClusterError::Start(format!("{}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_data_directory_keeps_its_node_and_a_first_start_is_recorded_once() {
        let dir = tempfile::tempdir().unwrap();
        let first = Identity::load(dir.path(), 2).unwrap();
        assert!(first.first_start && first.node_id == 2 && first.joined.is_none());
        write_node(dir.path(), 2).unwrap();
        let again = Identity::load(dir.path(), 2).unwrap();
        assert!(!again.first_start);
        assert!(
            Identity::load(dir.path(), 3).is_err(),
            "another node's directory"
        );
        std::fs::write(dir.path().join(NODE_FILE), b"{not json").unwrap();
        assert!(Identity::load(dir.path(), 2).is_err());
    }
}
