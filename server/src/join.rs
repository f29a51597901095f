//! Joining a running cluster at a node's first start (`quiverd --join`):
//! ask any member (its client port, `quiver.admin.v1.Admin/JoinCluster`)
//! for a node id, and record the answer in the data directory before the
//! node opens anything. The cluster then adds the node's metadata replica
//! as a learner; once it has caught up the node is serving and the
//! scheduler gives it replicas.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use quiver_proto::admin as pb;
use quiver_proto::admin::admin_client::AdminClient;
use quiver_raft::cluster_map::ClusterMap;

use crate::cluster::{ClusterError, identity};

/// Attempts at reaching the member before the start fails.
const JOIN_ATTEMPTS_MAX: u32 = 10;
/// Deadline of one attempt.
const JOIN_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest map accepted in the answer.
const JOIN_MAP_BYTES_MAX: usize = 64 << 20;

/// Joins the cluster `member` belongs to, unless `data_dir` was used
/// already; records the node id and map there.
pub async fn join_if_new(
    member: &str,
    data_dir: &Path,
    listen_addr: SocketAddr,
    peer_addr: SocketAddr,
    secret: &str,
    tls: Option<&std::sync::Arc<crate::tls::Tls>>,
) -> Result<(), ClusterError> {
    if identity::is_used(data_dir) {
        tracing::info!(dir = %data_dir.display(), "data directory in use: not joining again");
        return Ok(());
    }
    for (name, addr) in [
        ("listen_addr", listen_addr),
        ("peer_listen_addr", peer_addr),
    ] {
        if addr.ip().is_unspecified() {
            return Err(ClusterError::Start(format!(
                "{name} {addr} is not an address other nodes can reach: give a specific one to \
                 join a cluster"
            )));
        }
    }
    let request = pb::JoinClusterRequest {
        addr: listen_addr.to_string(),
        peer_addr: peer_addr.to_string(),
        secret: secret.to_owned(),
    };
    let mut last = String::new();
    for attempt in 0..JOIN_ATTEMPTS_MAX {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(250 << attempt.min(4))).await;
        }
        match ask(member, request.clone(), tls).await {
            Ok(answer) => {
                if answer.cluster_map.len() > JOIN_MAP_BYTES_MAX {
                    return Err(ClusterError::Start(format!(
                        "the cluster map from {member} is {} bytes",
                        answer.cluster_map.len()
                    )));
                }
                let map = ClusterMap::decode(&answer.cluster_map).map_err(|e| {
                    ClusterError::Start(format!("the cluster map from {member}: {e}"))
                })?;
                identity::write_joined(data_dir, answer.node_id, &map)?;
                tracing::info!(node_id = answer.node_id, member, "joined the cluster");
                return Ok(());
            }
            // NotFound: a static cluster that just started has not stored
            // its first map yet.
            Err(status)
                if matches!(
                    status.code(),
                    tonic::Code::NotFound
                        | tonic::Code::Unavailable
                        | tonic::Code::DeadlineExceeded
                        | tonic::Code::Cancelled
                        | tonic::Code::Unknown
                ) =>
            {
                last = status.to_string();
                tracing::warn!(member, attempt, error = %status, "join: member unavailable; retrying");
            }
            Err(status) => {
                return Err(ClusterError::Start(format!(
                    "joining through {member}: {}: {}",
                    status.code(),
                    status.message()
                )));
            }
        }
    }
    Err(ClusterError::Start(format!(
        "joining through {member}: no answer after {JOIN_ATTEMPTS_MAX} attempts: {last}"
    )))
}

async fn ask(
    member: &str,
    request: pb::JoinClusterRequest,
    tls: Option<&std::sync::Arc<crate::tls::Tls>>,
) -> Result<pb::JoinClusterResponse, tonic::Status> {
    // With TLS the connector does the handshake (as for peers: this node's
    // certificate, the member's checked against the cluster CA).
    let host_port = member.split_once("://").map_or(member, |(_, rest)| rest);
    let url = match tls {
        Some(_) => format!("http://{host_port}"),
        None if member.contains("://") => member.to_owned(),
        None => format!("http://{member}"),
    };
    let endpoint = tonic::transport::Endpoint::from_shared(url)
        .map_err(|e| tonic::Status::invalid_argument(format!("{member}: {e}")))?
        .connect_timeout(JOIN_ATTEMPT_TIMEOUT)
        .timeout(JOIN_ATTEMPT_TIMEOUT);
    let channel = match tls {
        Some(tls) => endpoint.connect_with_connector(tls.peer_connector()).await,
        None => endpoint.connect().await,
    }
    .map_err(|e| tonic::Status::unavailable(format!("connecting to {member}: {e}")))?;
    let mut client =
        AdminClient::new(channel).max_decoding_message_size(JOIN_MAP_BYTES_MAX + (1 << 10));
    client
        .join_cluster(request)
        .await
        .map(tonic::Response::into_inner)
}
