//! The `quiver.admin.v1.Admin` gRPC service: operator calls, checked here
//! and carried out by the cluster on whichever node must do them.

use quiver_proto::admin as pb;
use quiver_proto::admin::admin_server::Admin;
use quiver_raft::NodeId;
use tonic::{Request, Response, Status};

use crate::error::ServiceError;
use crate::node::NodeRef;

/// The service, sharing one node.
#[derive(Debug, Clone)]
pub struct AdminService {
    node: NodeRef,
}

impl AdminService {
    /// A service over `node`.
    pub fn new(node: NodeRef) -> Self {
        Self { node }
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn transfer_leader(
        &self,
        request: Request<pb::TransferLeaderRequest>,
    ) -> Result<Response<pb::TransferLeaderResponse>, Status> {
        let request = request.into_inner();
        let to: NodeId = request.to_node_id;
        if !self.node.cluster.placement.nodes.contains_key(&to) {
            return Err(Status::invalid_argument(format!(
                "no node {to} in the cluster (nodes: {:?})",
                self.node.cluster.placement.nodes.keys().collect::<Vec<_>>()
            )));
        }
        let done = self
            .node
            .cluster
            .transfer_leader(request.shard, to)
            .await
            .map_err(ServiceError::from)?;
        Ok(Response::new(pb::TransferLeaderResponse {
            leader_id: done.leader,
            term: done.term,
            moved: done.moved,
            elapsed_ms: done.elapsed_ms,
        }))
    }
}
