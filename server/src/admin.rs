//! The `quiver.admin.v1.Admin` gRPC service: operator calls, checked here
//! and carried out by the cluster on whichever node must do them (changes
//! of the cluster map go to the metadata group's leader like any proposal).

use quiver_engine::digest::{ContentDigest, LogicalDigest};
use quiver_proto::admin as pb;
use quiver_proto::admin::admin_server::Admin;
use quiver_raft::cluster_map::{
    ClusterMap, MapCommand, MapOutcome, NodeState, Operator, OperatorKind, OperatorRequest,
    ReplicaDesc, ReplicaRole,
};
use quiver_raft::{GroupId, NodeId, ReplicaId};
use tonic::{Request, Response, Status};

use crate::backup::log::LatestChunk;
use crate::backup::restore::RestoreTo;
use crate::cluster::ClusterError;
use crate::cluster::scheduler::Planned;
use crate::error::ServiceError;
use crate::node::NodeRef;

/// Longest node address accepted in a join.
const JOIN_ADDR_BYTES_MAX: usize = quiver_raft::cluster_map::NODE_ADDR_BYTES_MAX;

/// How long one shard's content checksum may take (a scan of every row:
/// about a second per million on this hardware, so generous).
const CHECKSUM_SHARD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

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

    /// `Checksum` with `local_replicas`: this node's replicas. The totals
    /// add up every replica listed (a node holds one replica per shard).
    async fn checksum_local_replicas(&self) -> Result<Response<pb::ChecksumResponse>, Status> {
        let (map_version, digests) = self
            .node
            .cluster
            .checksum_local_replicas()
            .await
            .map_err(ServiceError::from)?;
        let mut total = LogicalDigest::default();
        let shards = digests
            .into_iter()
            .map(|(shard, replica, digest)| {
                let content = &digest.content;
                total.merge(content.inside.live);
                pb::ShardChecksum {
                    replica: replica.0,
                    applied_index: digest.applied.map_or(0, |id| id.index),
                    start: content.from_hash,
                    end: content.to_hash.unwrap_or(0),
                    rows_outside: content.outside.rows_stored(),
                    ..shard_checksum(shard, &content.inside)
                }
            })
            .collect();
        Ok(checksum_response(total, shards, map_version))
    }

    fn map_version(outcome: &MapOutcome) -> u64 {
        match outcome {
            MapOutcome::Changed { version } => *version,
            MapOutcome::NodeAdded { .. } | MapOutcome::OperatorStarted(_) => 0,
        }
    }
}

fn role(replica: &ReplicaDesc) -> String {
    match replica.role {
        ReplicaRole::Voter => "voter",
        ReplicaRole::Learner => "learner",
    }
    .to_owned()
}

fn replica_info(replica: &ReplicaDesc) -> pb::ReplicaInfo {
    pb::ReplicaInfo {
        replica_id: replica.id.0,
        node_id: replica.id.node(),
        role: role(replica),
    }
}

/// An operator as the admin API shows it.
pub fn operator_info(op: &Operator) -> pb::OperatorInfo {
    let (kind, from, to, split_at, child_shard) = match op.kind {
        OperatorKind::Move { from, to } => ("move", from.map_or(0, |r| r.0), to.0, 0, 0),
        OperatorKind::Remove { replica } => ("remove", replica.0, 0, 0, 0),
        OperatorKind::Split { at, child } => ("split", 0, 0, at, child),
    };
    pb::OperatorInfo {
        id: op.id,
        shard: op.shard,
        kind: kind.to_owned(),
        from_replica_id: from,
        to_replica_id: to,
        step: op.step.to_string(),
        reason: op.reason.clone(),
        started_us: op.started_us,
        step_started_us: op.step_started_us,
        split_at,
        child_shard,
        cancelled: op.cancelled,
    }
}

fn planned_info(round: u32, planned: &Planned) -> pb::PlannedOperator {
    let (kind, from, to) = match planned.request {
        OperatorRequest::Move { from, to_node } => {
            ("move", from.map_or(0, ReplicaId::node), to_node)
        }
        OperatorRequest::Remove { replica } => ("remove", replica.node(), 0),
        OperatorRequest::Split { .. } => ("split", 0, 0),
    };
    pb::PlannedOperator {
        shard: planned.shard,
        kind: kind.to_owned(),
        from_node_id: from,
        to_node_id: to,
        reason: planned.reason.clone(),
        round,
    }
}

fn map_response(
    map: &ClusterMap,
    replicated: bool,
    up: impl Fn(NodeId) -> bool,
) -> pb::GetClusterMapResponse {
    pb::GetClusterMapResponse {
        version: map.version,
        replication_factor: map.replication_factor,
        nodes: map
            .nodes
            .iter()
            .map(|(&id, info)| pb::NodeInfo {
                node_id: id,
                addr: info.addr.clone(),
                peer_addr: info.peer_addr.clone(),
                state: info.state.to_string(),
                replicas: u32::try_from(map.replicas_on(id).count()).unwrap_or(u32::MAX),
                up: info.state != NodeState::Removed && up(id),
            })
            .collect(),
        shards: map
            .shards
            .iter()
            .map(|(&shard, desc)| pb::ShardInfo {
                shard,
                start: desc.start,
                end: desc.end.unwrap_or(0),
                to_end: desc.end.is_none(),
                conf_ver: desc.epoch.conf_ver,
                version: desc.epoch.version,
                replicas: desc.replicas.iter().map(replica_info).collect(),
            })
            .collect(),
        operators: map.operators.values().map(operator_info).collect(),
        replicated,
        tombstones: map
            .tombstones
            .iter()
            .map(|&(_, id)| pb::ReplicaInfo {
                replica_id: id.0,
                node_id: id.node(),
                role: "removed".into(),
            })
            .collect(),
    }
}

fn parse_state(state: &str) -> Result<NodeState, Status> {
    match state {
        "serving" => Ok(NodeState::Serving),
        "draining" => Ok(NodeState::Draining),
        "removed" => Ok(NodeState::Removed),
        other => Err(Status::invalid_argument(format!(
            "node state {other:?}: serving, draining or removed"
        ))),
    }
}

fn check_addr(name: &str, addr: &str) -> Result<(), Status> {
    let (host, port) = addr
        .rsplit_once(':')
        .ok_or_else(|| Status::invalid_argument(format!("{name} {addr:?} is not host:port")))?;
    if host.is_empty()
        || port.parse::<u16>().is_err()
        || addr.len() > JOIN_ADDR_BYTES_MAX
        || addr.chars().any(|c| c.is_control() || c.is_whitespace())
    {
        return Err(Status::invalid_argument(format!(
            "{name} {addr:?} is not host:port"
        )));
    }
    Ok(())
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn transfer_leader(
        &self,
        request: Request<pb::TransferLeaderRequest>,
    ) -> Result<Response<pb::TransferLeaderResponse>, Status> {
        let request = request.into_inner();
        let to: NodeId = request.to_node_id;
        let placement = self.node.cluster.placement();
        if !placement.is_member(to) {
            return Err(Status::invalid_argument(format!(
                "no node {to} in the cluster (nodes: {:?})",
                placement.peer_addrs().keys().collect::<Vec<_>>()
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

    async fn join_cluster(
        &self,
        request: Request<pb::JoinClusterRequest>,
    ) -> Result<Response<pb::JoinClusterResponse>, Status> {
        let certificates = request.peer_certs();
        let request = request.into_inner();
        if !self.node.cluster.accepts_secret(&request.secret) {
            return Err(ServiceError::Unauthenticated(
                "joining needs the cluster secret (cluster.secret)".into(),
            )
            .into());
        }
        check_addr("addr", &request.addr)?;
        check_addr("peer_addr", &request.peer_addr)?;
        // With TLS a node joins with its own certificate, as it will call
        // its peers: a node certificate from the cluster CA naming its peer
        // address. (So under TLS nodes join with `quiverd --join`, not
        // `quiverctl node add`.)
        if let Some(tls) = &self.node.tls {
            let host = crate::tls::host_of(&request.peer_addr);
            tls.verify_node(certificates.as_deref().map(Vec::as_slice), host)
                .map_err(|why| {
                    ServiceError::PermissionDenied(format!(
                        "joining over TLS needs the node's certificate for the host of its peer address: {why}"
                    ))
                })?;
        }
        let (node_id, map) = self
            .node
            .cluster
            .join_node(request.addr, request.peer_addr)
            .await
            .map_err(ServiceError::from)?;
        let cluster_map = map
            .encode()
            .map_err(|e| Status::internal(format!("encoding the cluster map: {e}")))?;
        tracing::info!(node_id, "a node joined");
        Ok(Response::new(pb::JoinClusterResponse {
            node_id,
            cluster_map,
        }))
    }

    async fn get_cluster_map(
        &self,
        _request: Request<pb::GetClusterMapRequest>,
    ) -> Result<Response<pb::GetClusterMapResponse>, Status> {
        let cluster = &self.node.cluster;
        // Before the metadata group stored a map, the node's own layout.
        let (map, replicated) = cluster
            .current_or_static_map()
            .await
            .map_err(ServiceError::from)?;
        Ok(Response::new(map_response(&map, replicated, |node| {
            cluster.node_up(node)
        })))
    }

    async fn set_node_state(
        &self,
        request: Request<pb::SetNodeStateRequest>,
    ) -> Result<Response<pb::SetNodeStateResponse>, Status> {
        let request = request.into_inner();
        let state = parse_state(&request.state)?;
        let outcome = self
            .node
            .cluster
            .change_map(MapCommand::SetNodeState {
                node: request.node_id,
                state,
                force: request.force,
            })
            .await
            .map_err(ServiceError::from)?;
        tracing::info!(node = request.node_id, %state, force = request.force, "node state set");
        Ok(Response::new(pb::SetNodeStateResponse {
            map_version: Self::map_version(&outcome),
        }))
    }

    async fn move_replica(
        &self,
        request: Request<pb::MoveReplicaRequest>,
    ) -> Result<Response<pb::MoveReplicaResponse>, Status> {
        let request = request.into_inner();
        let cluster = &self.node.cluster;
        let map = cluster.current_map().await.map_err(ServiceError::from)?;
        let shard: GroupId = request.shard;
        let desc = map
            .shards
            .get(&shard)
            .ok_or_else(|| ServiceError::from(ClusterError::NoSuchGroup(shard)))?;
        let from = match request.from_node_id {
            0 => None,
            node => Some(
                desc.replica_on(node)
                    .ok_or_else(|| {
                        Status::failed_precondition(format!(
                            "node {node} holds no replica of shard {shard}"
                        ))
                    })?
                    .id,
            ),
        };
        let request = match (from, request.to_node_id) {
            (None, 0) => {
                return Err(Status::invalid_argument(
                    "name the node to move from, the node to move to, or both",
                ));
            }
            (Some(replica), 0) => OperatorRequest::Remove { replica },
            (from, to_node) => OperatorRequest::Move { from, to_node },
        };
        let outcome = cluster
            .change_map(MapCommand::StartOperator {
                shard,
                request,
                reason: "by hand (quiverctl shard move)".into(),
            })
            .await
            .map_err(ServiceError::from)?;
        let MapOutcome::OperatorStarted(op) = outcome else {
            return Err(Status::internal(format!(
                "unexpected answer to an operator start: {outcome:?}"
            )));
        };
        tracing::info!(shard, op = op.id, kind = ?op.kind, "operator started by hand");
        Ok(Response::new(pb::MoveReplicaResponse {
            operator: Some(operator_info(&op)),
        }))
    }

    async fn split_shard(
        &self,
        request: Request<pb::SplitShardRequest>,
    ) -> Result<Response<pb::SplitShardResponse>, Status> {
        let request = request.into_inner();
        let outcome = self
            .node
            .cluster
            .change_map(MapCommand::StartOperator {
                shard: request.shard,
                request: OperatorRequest::Split { at: request.at },
                reason: "by hand (quiverctl shard split)".into(),
            })
            .await
            .map_err(ServiceError::from)?;
        let MapOutcome::OperatorStarted(op) = outcome else {
            return Err(Status::internal(format!(
                "unexpected answer to an operator start: {outcome:?}"
            )));
        };
        tracing::info!(shard = request.shard, op = op.id, kind = ?op.kind, "split started by hand");
        Ok(Response::new(pb::SplitShardResponse {
            operator: Some(operator_info(&op)),
        }))
    }

    async fn cancel_operator(
        &self,
        request: Request<pb::CancelOperatorRequest>,
    ) -> Result<Response<pb::CancelOperatorResponse>, Status> {
        let request = request.into_inner();
        let outcome = self
            .node
            .cluster
            .change_map(MapCommand::CancelOperator {
                shard: request.shard,
                id: request.operator_id,
            })
            .await
            .map_err(ServiceError::from)?;
        Ok(Response::new(pb::CancelOperatorResponse {
            map_version: Self::map_version(&outcome),
        }))
    }

    async fn plan_replicas(
        &self,
        request: Request<pb::PlanReplicasRequest>,
    ) -> Result<Response<pb::PlanReplicasResponse>, Status> {
        let request = request.into_inner();
        let plan = self
            .node
            .cluster
            .plan_replicas(request.all_rounds, request.by_hand)
            .await
            .map_err(ServiceError::from)?;
        Ok(Response::new(pb::PlanReplicasResponse {
            planned: plan
                .operators
                .iter()
                .map(|(round, planned)| planned_info(*round, planned))
                .collect(),
            handovers: plan
                .handovers
                .iter()
                .map(|h| pb::PlannedHandover {
                    shard: h.shard,
                    from_node_id: h.from,
                    to_node_id: h.to,
                    reason: h.reason.clone(),
                })
                .collect(),
        }))
    }

    async fn create_backup(
        &self,
        request: Request<pb::CreateBackupRequest>,
    ) -> Result<Response<pb::CreateBackupResponse>, Status> {
        let request = request.into_inner();
        // A task of its own: a client that disconnects does not stop a
        // backup halfway (it completes, and is listed).
        let (backups, cluster) = (self.node.backups.clone(), self.node.cluster.clone());
        let manifest = tokio::spawn(async move { backups.create(&cluster, &request.url).await })
            .await
            .map_err(|e| ServiceError::TaskFailed(e.to_string()))?
            .map_err(ServiceError::from)?;
        Ok(Response::new(pb::CreateBackupResponse {
            backup: Some(backup_summary(&manifest)),
        }))
    }

    async fn list_backups(
        &self,
        request: Request<pb::ListBackupsRequest>,
    ) -> Result<Response<pb::ListBackupsResponse>, Status> {
        let request = request.into_inner();
        let manifests = self
            .node
            .backups
            .list(&request.url)
            .await
            .map_err(ServiceError::from)?;
        Ok(Response::new(pb::ListBackupsResponse {
            backups: manifests.iter().map(backup_summary).collect(),
        }))
    }

    async fn get_backup(
        &self,
        request: Request<pb::GetBackupRequest>,
    ) -> Result<Response<pb::GetBackupResponse>, Status> {
        let request = request.into_inner();
        let manifest = self
            .node
            .backups
            .get(&request.url, &request.backup_id)
            .await
            .map_err(ServiceError::from)?;
        let json = manifest.encode().map_err(ServiceError::from)?;
        Ok(Response::new(pb::GetBackupResponse {
            backup: Some(backup_summary(&manifest)),
            manifest_json: String::from_utf8_lossy(&json).into_owned(),
        }))
    }

    async fn verify_backup(
        &self,
        request: Request<pb::VerifyBackupRequest>,
    ) -> Result<Response<pb::VerifyBackupResponse>, Status> {
        let request = request.into_inner();
        let report = self
            .node
            .backups
            .verify(&request.url, &request.backup_id, request.data, true)
            .await
            .map_err(ServiceError::from)?;
        Ok(Response::new(pb::VerifyBackupResponse {
            files_checked: report.files_checked,
            bytes_checked: report.bytes_checked,
            shards_restored: u32::try_from(report.shards_restored).unwrap_or(u32::MAX),
            problems: report.problems,
            log_chunks_checked: report.log_chunks_checked,
            log_reaches_us: report.log_reaches_us.unwrap_or(0),
            log_gaps: report.log_gaps,
        }))
    }

    async fn restore_backup(
        &self,
        request: Request<pb::RestoreBackupRequest>,
    ) -> Result<Response<pb::RestoreBackupResponse>, Status> {
        let request = request.into_inner();
        // A task of its own, like a backup: a client that disconnects does
        // not leave half a restore behind the reason it gave up.
        let to = if request.to_latest {
            RestoreTo::Latest
        } else if request.to_time_us > 0 {
            RestoreTo::Time(request.to_time_us)
        } else if request.to_time_us < 0 {
            return Err(ServiceError::InvalidArgument(format!(
                "to_time_us {} is before the epoch",
                request.to_time_us
            ))
            .into());
        } else {
            RestoreTo::Backup
        };
        let node = self.node.clone();
        let report = tokio::spawn(async move {
            node.backups
                .restore(
                    &node,
                    &request.url,
                    &request.backup_id,
                    &request.cluster_id,
                    to,
                )
                .await
        })
        .await
        .map_err(|e| ServiceError::TaskFailed(e.to_string()))?
        .map_err(ServiceError::from)?;
        Ok(Response::new(pb::RestoreBackupResponse {
            views: report.views,
            shards: u32::try_from(report.shards).unwrap_or(u32::MAX),
            rows_restored: report.rows_restored,
            tombstones_skipped: report.tombstones_skipped,
            expired_skipped: report.expired_skipped,
            deleted_view_rows_skipped: report.deleted_view_rows_skipped,
            backup_id: report.backup_id,
            restored_to_us: report.restored_to_us.unwrap_or(0),
            log_entries_replayed: report.log_entries_replayed,
            content_rows: report.content.rows,
            content_sum: report.content.sum_hex(),
        }))
    }

    async fn checksum(
        &self,
        request: Request<pb::ChecksumRequest>,
    ) -> Result<Response<pb::ChecksumResponse>, Status> {
        if request.into_inner().local_replicas {
            return self.checksum_local_replicas().await;
        }
        let (map_version, digests) = self
            .node
            .cluster
            .checksum_all(CHECKSUM_SHARD_TIMEOUT)
            .await
            .map_err(ServiceError::from)?;
        let mut total = LogicalDigest::default();
        let shards = digests
            .into_iter()
            .map(|(shard, digest)| {
                total.merge(digest.live);
                shard_checksum(shard, &digest)
            })
            .collect();
        Ok(checksum_response(total, shards, map_version))
    }

    async fn prune_backups(
        &self,
        request: Request<pb::PruneBackupsRequest>,
    ) -> Result<Response<pb::PruneBackupsResponse>, Status> {
        let request = request.into_inner();
        let retention = match request.retention_seconds {
            0 => self.node.backups.retention(),
            seconds => std::time::Duration::from_secs(seconds),
        };
        let node = self.node.clone();
        // A task of its own: a client that goes away does not stop a prune
        // between a manifest and its files.
        let report = tokio::spawn(async move {
            node.backups
                .prune(&request.url, retention, request.dry_run)
                .await
        })
        .await
        .map_err(|e| ServiceError::TaskFailed(e.to_string()))?
        .map_err(ServiceError::from)?;
        Ok(Response::new(pb::PruneBackupsResponse {
            kept: report.kept,
            deleted: report.deleted,
            incomplete_deleted: report.incomplete_deleted,
            chunks_deleted: report.chunks_deleted,
            retention_seconds: retention.as_secs(),
            retired_logs_deleted: report.retired_logs_deleted,
        }))
    }

    async fn backup_status(
        &self,
        request: Request<pb::BackupStatusRequest>,
    ) -> Result<Response<pb::BackupStatusResponse>, Status> {
        let request = request.into_inner();
        let (cluster_id, groups) = self
            .node
            .backups
            .log_status(&self.node.cluster, &request.url, &request.cluster_id)
            .await
            .map_err(ServiceError::from)?;
        let restorable_until_us = groups
            .iter()
            .map(|g| {
                g.latest
                    .as_ref()
                    .map_or(0, LatestChunk::restorable_until_us)
            })
            .min()
            .unwrap_or(0);
        Ok(Response::new(pb::BackupStatusResponse {
            cluster_id,
            groups: groups
                .into_iter()
                .map(|g| {
                    let latest = g.latest.as_ref();
                    pb::GroupLogStatus {
                        group: u64::from(g.group),
                        shipped: latest.is_some(),
                        index: latest.map_or(0, |l| l.next.index()),
                        restorable_until_us: latest.map_or(0, LatestChunk::restorable_until_us),
                        shipped_at_us: latest.map_or(0, |l| l.shipped_at_us),
                        gap_at_us: latest.and_then(|l| l.gap_at_us).unwrap_or(0),
                    }
                })
                .collect(),
            restorable_until_us,
            now_us: self.node.clock.now_us(),
            log_url: self.node.backups.log_url().to_owned(),
        }))
    }
}

/// A backup as the admin API lists it.
fn backup_summary(manifest: &crate::backup::BackupManifest) -> pb::BackupSummary {
    pb::BackupSummary {
        backup_id: manifest.backup_id.clone(),
        started_at_us: manifest.started_at_us,
        finished_at_us: manifest.finished_at_us,
        shards: u32::try_from(manifest.shards.len()).unwrap_or(u32::MAX),
        bytes: manifest.bytes(),
        rows: manifest.rows(),
        map_version: manifest.map_version,
        consistent_at_us: manifest
            .shards
            .iter()
            .map(|s| s.record.leader_ts_us)
            .min()
            .unwrap_or(0),
    }
}

/// A `Checksum` answer: the shards' digests added up in `total`.
fn checksum_response(
    total: LogicalDigest,
    shards: Vec<pb::ShardChecksum>,
    map_version: u64,
) -> Response<pb::ChecksumResponse> {
    Response::new(pb::ChecksumResponse {
        rows: total.rows,
        sum: total.sum_hex(),
        shards,
        map_version,
    })
}

/// A shard's checksum as the admin API reports it.
fn shard_checksum(shard: GroupId, digest: &ContentDigest) -> pb::ShardChecksum {
    pb::ShardChecksum {
        shard: u64::from(shard),
        rows: digest.live.rows,
        sum: digest.live.sum_hex(),
        tombstones: digest.tombstones,
        expired: digest.expired,
        dropped_view_rows: digest.dropped_view_rows,
        unknown_view_rows: digest.unknown_view_rows,
        ..Default::default()
    }
}
