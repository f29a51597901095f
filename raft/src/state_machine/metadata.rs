//! The metadata group's cluster-map commands, applied in its log (shard
//! groups refuse them).

use std::io;
use std::sync::Arc;

use super::{CLUSTER_ID_KEY, MAP_KEY, REQUEST_PREFIX, StateMachine, engine_io};
use crate::cluster_map::{MapCommand, MapError, MapOutcome};
use crate::types::{LogId, METADATA_GROUP, RejectKind, Response};

impl StateMachine {
    /// Applies a cluster-map command: the new map is written in the entry's
    /// batch and published; a refusal is recorded like any other.
    pub(super) fn apply_map(
        &self,
        log_id: LogId,
        command: MapCommand,
        leader_ts_us: i64,
        meta_puts: quiver_engine::store::MetaPuts<'_>,
    ) -> io::Result<Response> {
        let current = self.cluster_map();
        let bootstrap = current.is_none();
        let result = if self.shared.group != METADATA_GROUP {
            Err(MapError::Invalid(
                "cluster-map commands belong to the metadata group".into(),
            ))
        } else {
            match (current, command) {
                (None, MapCommand::Bootstrap(map)) => map.check().map(|()| {
                    let version = map.version;
                    (*map, MapOutcome::Changed { version })
                }),
                (None, _) => Err(MapError::NotFound(
                    "the cluster map is not bootstrapped yet".into(),
                )),
                (Some(map), command) => {
                    let mut next = (*map).clone();
                    next.apply(command, leader_ts_us)
                        .map(|outcome| (next, outcome))
                }
            }
        };
        match result {
            Ok((next, outcome)) => {
                let bytes = next.encode().map_err(io::Error::other)?;
                let response = Response::Map(outcome);
                // A retry of this request id is answered with this outcome
                // (the node id a join got, the operator a move started), not
                // with a bare "already applied".
                let recorded = postcard::to_stdvec(&response).map_err(io::Error::other)?;
                let mut puts: Vec<(&[u8], Option<&[u8]>)> = meta_puts
                    .iter()
                    .map(|&(key, value)| {
                        if key.starts_with(REQUEST_PREFIX) && value.is_some() {
                            (key, Some(recorded.as_slice()))
                        } else {
                            (key, value)
                        }
                    })
                    .collect();
                puts.push((MAP_KEY, Some(bytes.as_slice())));
                let id = cluster_id(log_id, leader_ts_us);
                if bootstrap {
                    puts.push((CLUSTER_ID_KEY, Some(id.as_bytes())));
                }
                self.store().put_meta(&puts).map_err(engine_io)?;
                self.shared.map.send_replace(Some(Arc::new(next)));
                Ok(response)
            }
            Err(error) => {
                let kind = match &error {
                    MapError::NotFound(_) => RejectKind::NotFound,
                    MapError::Conflict(_) => RejectKind::Conflict,
                    MapError::Invalid(_) => RejectKind::Invalid,
                };
                self.refuse(
                    Response::Rejected {
                        kind,
                        message: error.to_string(),
                    },
                    meta_puts,
                )
            }
        }
    }
}

/// A cluster's id from its bootstrap entry: the leader time (µs) makes two
/// clusters' ids differ, the log id makes it this entry's.
fn cluster_id(log_id: LogId, leader_ts_us: i64) -> String {
    use sha2::Digest;
    let mut hasher = sha2::Sha256::new();
    hasher.update(leader_ts_us.to_be_bytes());
    hasher.update(log_id.to_string().as_bytes());
    hasher.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
