//! The server side of the internal `Peer` service.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use openraft::raft::AppendEntriesResponse;
use quiver_engine::durable::StagingDir;
use quiver_proto::peer::peer_server::Peer;
use quiver_proto::peer::{PeerBatch, PeerReply, PeerStreamReply, SnapshotChunk};
use quiver_raft::state_machine::{checked_name, write_manifest};
use quiver_raft::{GroupId, SnapshotDir};
use tonic::{Request, Response, Status, Streaming};

use super::Cluster;
use super::network::PEER_BATCH_CALLS_MAX;
use super::wire::{self, PeerCall, PeerResult, ReadLevel, ReadRows, SnapshotHeader};

/// Numbers snapshot transfers received by this process.
static TRANSFERS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Most files a snapshot may list.
const SNAPSHOT_FILES_MAX: usize = 100_000;

/// Longest a vote for a split child this node does not host yet waits for
/// its replica of the parent to build it.
const SPLIT_CHILD_VOTE_WAIT_MS_MAX: u64 = 200;

/// Whether a vote request comes from a split child's first candidate: its
/// log ends at the seed the split gave it, in term 0, which no elected
/// leader writes.
fn split_child_candidate(rpc: &openraft::raft::VoteRequest<quiver_raft::TypeConfig>) -> bool {
    rpc.last_log_id
        .as_ref()
        .is_some_and(|id| id.committed_leader_id().term == 0)
}

/// Serves peers' Raft traffic and forwarded requests.
#[derive(Debug, Clone)]
pub struct PeerService {
    cluster: Arc<Cluster>,
    /// Turns true when the peer port closes: call streams stop taking
    /// calls, answer the ones running and end, so the server's graceful
    /// shutdown does not wait on streams that would otherwise never end.
    closing: tokio::sync::watch::Receiver<bool>,
}

impl PeerService {
    /// A service over this node's groups, closing when `closing` turns
    /// true.
    pub fn new(cluster: Arc<Cluster>, closing: tokio::sync::watch::Receiver<bool>) -> Self {
        Self { cluster, closing }
    }

    async fn handle(&self, group: GroupId, replica: u64, call: PeerCall) -> PeerResult {
        let cluster = &self.cluster;
        // A Raft call names the replica it is for: another replica of the
        // group hosted here (created under a new id after the named one was
        // removed) must not answer for it.
        if let PeerCall::Vote(rpc) | PeerCall::PreVote(rpc) = &call
            && split_child_candidate(rpc)
            && !cluster.host.contains(group)
        {
            // The leader applies a split before its followers, so its
            // child's first election can arrive before this node built its
            // replica of the child: refused, it would cost the child an
            // election timeout without a leader.
            cluster
                .host
                .wait_hosted(group, Duration::from_millis(SPLIT_CHILD_VOTE_WAIT_MS_MAX))
                .await;
        }
        let raft_call = matches!(
            call,
            PeerCall::AppendEntries(_)
                | PeerCall::Vote(_)
                | PeerCall::PreVote(_)
                | PeerCall::TransferLeader(_)
        );
        if raft_call
            && replica != 0
            && cluster
                .group(group)
                .is_some_and(|hosted| hosted.replica.0 != replica)
        {
            return PeerResult::NoSuchGroup;
        }
        match call {
            PeerCall::AppendEntries(rpc) => match cluster.group(group) {
                None => PeerResult::NoSuchGroup,
                Some(hosted) => match hosted.raft.append_entries(rpc).await {
                    Ok(response) => {
                        // Accepted from our leader (not refused with a higher
                        // vote, which a deposed leader gets): now that
                        // openraft has restarted its election timer, a
                        // sleeping replica may tick again.
                        if !matches!(response, AppendEntriesResponse::HigherVote(_)) {
                            cluster.leader_contact(group);
                        }
                        PeerResult::AppendEntries(response)
                    }
                    Err(e) => PeerResult::Failed(e.to_string()),
                },
            },
            PeerCall::Vote(rpc) => match cluster.group(group) {
                None => PeerResult::NoSuchGroup,
                Some(hosted) => {
                    if let Some(refusal) = cluster.vote_refusal(group, rpc.leadership_transfer) {
                        return PeerResult::Failed(refusal);
                    }
                    match hosted.raft.vote(rpc).await {
                        Ok(response) => PeerResult::Vote(response),
                        Err(e) => PeerResult::Failed(e.to_string()),
                    }
                }
            },
            PeerCall::PreVote(rpc) => match cluster.group(group) {
                None => PeerResult::NoSuchGroup,
                Some(hosted) => {
                    // A refusal is an error, which the candidate does not
                    // count as a grant (and which leaves its term alone).
                    if let Some(refusal) = cluster.vote_refusal(group, rpc.leadership_transfer) {
                        return PeerResult::Failed(refusal);
                    }
                    match hosted.raft.pre_vote(rpc).await {
                        Ok(response) => PeerResult::PreVote(response),
                        Err(e) => PeerResult::Failed(e.to_string()),
                    }
                }
            },
            PeerCall::TransferLeader(rpc) => match cluster.group(group) {
                None => PeerResult::NoSuchGroup,
                Some(hosted) => {
                    // The transfer's election must not wait for a sleeping timer.
                    cluster.leader_contact(group);
                    match hosted.raft.handle_transfer_leader(rpc).await {
                        Ok(response) => PeerResult::TransferLeader(response),
                        Err(e) => PeerResult::Failed(e.to_string()),
                    }
                }
            },
            PeerCall::Ping(ping) => PeerResult::Pong(cluster.on_ping(ping).await),
            PeerCall::Propose(command) => cluster.propose_local(group, command).await,
            PeerCall::HandOver { to } => cluster.hand_over_local(group, to).await,
            PeerCall::ReadIndex => cluster.read_index_local(group).await,
            PeerCall::LeaseReadIndex => cluster.lease_read_index_local(group).await,
            PeerCall::Read { keys, level } => self.read(group, keys, level).await,
            PeerCall::ShardState => cluster.shard_state_local(group).await,
            PeerCall::ChangeMembership { change, expect } => {
                cluster.change_membership_local(group, change, expect).await
            }
            PeerCall::BackupShard { url, backup_id } => {
                cluster.backup_shard_local(group, &url, &backup_id).await
            }
            PeerCall::ChecksumShard => cluster.checksum_shard_local(group).await,
        }
    }

    async fn read(&self, group: GroupId, keys: Vec<Vec<u8>>, level: ReadLevel) -> PeerResult {
        let source = match self.cluster.check_local_read(group, level).await {
            Ok(source) => source,
            Err(result) => return result,
        };
        let Some(hosted) = self.cluster.group(group) else {
            return PeerResult::NoSuchGroup;
        };
        let version = match super::router::owned_range_version(&hosted.state, group, &keys) {
            Ok(version) => version,
            Err(message) => return self.cluster.moved_answer(group, message).await,
        };
        let store = hosted.state.store();
        let rows = tokio::task::spawn_blocking(move || store.get_raw(&keys)).await;
        let rows = match rows {
            Ok(rows) => rows,
            Err(e) => return PeerResult::Failed(e.to_string()),
        };
        // A split during the read may have deleted rows it gave away.
        if hosted.state.range().map_or(0, |range| range.version) != version {
            let message = format!("shard {group} split during the read");
            return self.cluster.moved_answer(group, message).await;
        }
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            match row {
                Ok(row) => out.push(row),
                Err(e) => return PeerResult::Failed(e.to_string()),
            }
        }
        PeerResult::Read(ReadRows {
            rows: out,
            node_id: source.node_id,
            leader: source.leader,
            applied_index: source.applied_index,
        })
    }

    /// Receives a snapshot into a staging directory, checks every file
    /// against the manifest, and hands it to Raft to install.
    async fn receive_snapshot(
        &self,
        mut stream: Streaming<SnapshotChunk>,
    ) -> Result<PeerResult, Status> {
        let first = stream
            .next()
            .await
            .ok_or_else(|| Status::invalid_argument("empty snapshot stream"))??;
        let group = first.group;
        let Some(hosted) = self.cluster.group(group) else {
            return Ok(PeerResult::NoSuchGroup);
        };
        if first.replica != 0 && hosted.replica.0 != first.replica {
            return Ok(PeerResult::NoSuchGroup);
        }
        let header: SnapshotHeader = wire::decode(&first.header)
            .map_err(|e| Status::invalid_argument(format!("snapshot header: {e}")))?;
        let manifest = header.manifest;
        if manifest.group != group || manifest.files.len() > SNAPSHOT_FILES_MAX {
            return Err(Status::invalid_argument(
                "snapshot manifest does not match the group or lists too many files",
            ));
        }
        checked_name(&manifest.snapshot_id).map_err(|e| Status::invalid_argument(e.to_string()))?;
        for file in &manifest.files {
            checked_name(&file.name).map_err(|e| Status::invalid_argument(e.to_string()))?;
        }
        // Unique per transfer: a retried transfer of the same snapshot may
        // overlap with the one it replaces.
        let staging_path: PathBuf = hosted.state.dir().join("incoming").join(format!(
            "{}-{}",
            manifest.snapshot_id,
            TRANSFERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        // Removed when this function returns, however it returns (the state
        // machine keeps its own hard-linked copy of an installed snapshot).
        let staging = tokio::task::spawn_blocking(move || {
            let staging = StagingDir::create(staging_path)?;
            std::fs::create_dir_all(staging.path().join("db"))?;
            Ok::<_, std::io::Error>(staging)
        })
        .await
        .map_err(internal)?
        .map_err(internal)?;
        let result = self
            .receive_files(&mut stream, staging.path(), &manifest)
            .await;
        let outcome = match result {
            Ok(()) => {
                let verified = {
                    let staging = staging.path().to_path_buf();
                    let manifest = manifest.clone();
                    tokio::task::spawn_blocking(move || {
                        write_manifest(&staging, &manifest)?;
                        SnapshotDir::load_verified(&staging)
                    })
                    .await
                    .map_err(internal)?
                };
                match verified {
                    Ok(snapshot) => {
                        let meta = snapshot.manifest.meta.clone();
                        match hosted
                            .raft
                            .install_full_snapshot(
                                header.vote,
                                openraft::Snapshot { meta, snapshot },
                            )
                            .await
                        {
                            Ok(response) => Ok(PeerResult::SnapshotInstalled {
                                vote: response.vote,
                            }),
                            Err(e) => Ok(PeerResult::Failed(e.to_string())),
                        }
                    }
                    Err(e) => Err(Status::data_loss(format!("snapshot check failed: {e}"))),
                }
            }
            Err(status) => Err(status),
        };
        tokio::task::spawn_blocking(move || drop(staging))
            .await
            .map_err(internal)?;
        outcome
    }

    async fn receive_files(
        &self,
        stream: &mut Streaming<SnapshotChunk>,
        staging: &std::path::Path,
        manifest: &quiver_raft::Manifest,
    ) -> Result<(), Status> {
        use std::io::Write;
        let mut current: Option<(String, std::fs::File, u64)> = None;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            let expected = manifest
                .files
                .iter()
                .find(|f| f.name == chunk.file)
                .ok_or_else(|| {
                    Status::invalid_argument(format!("unexpected file {:?}", chunk.file))
                })?;
            let switch = current
                .as_ref()
                .is_none_or(|(name, _, _)| *name != chunk.file);
            if switch {
                if let Some((_, file, _)) = current.take() {
                    tokio::task::block_in_place(|| file.sync_all()).map_err(internal)?;
                }
                let name = checked_name(&chunk.file)
                    .map_err(|e| Status::invalid_argument(e.to_string()))?;
                let path = staging.join("db").join(name);
                let file = tokio::task::block_in_place(|| std::fs::File::create(path))
                    .map_err(internal)?;
                current = Some((chunk.file.clone(), file, 0));
            }
            let Some((_, file, written)) = current.as_mut() else {
                return Err(Status::internal("no open file"));
            };
            if chunk.offset != *written
                || written.saturating_add(chunk.data.len() as u64) > expected.bytes
            {
                return Err(Status::invalid_argument(format!(
                    "file {:?}: chunk at {} does not continue at {} within {} bytes",
                    chunk.file, chunk.offset, written, expected.bytes
                )));
            }
            tokio::task::block_in_place(|| file.write_all(&chunk.data)).map_err(internal)?;
            *written += chunk.data.len() as u64;
        }
        if let Some((_, file, _)) = current.take() {
            tokio::task::block_in_place(|| file.sync_all()).map_err(internal)?;
        }
        Ok(())
    }
}

fn internal(e: impl std::fmt::Display) -> Status {
    Status::internal(e.to_string())
}

/// Calls of one peer stream running at once; calls beyond it are refused
/// at once. (Not reading the stream instead would let it take the whole
/// HTTP/2 connection window, which the other data lanes share.)
const STREAM_CALLS_RUNNING_MAX: usize = 8192;
/// Replies waiting to be written to one peer stream.
const STREAM_REPLIES_QUEUED_MAX: usize = 1024;
/// The longest a call may ask its callee to work on it.
const CALL_TIMEOUT_MS_MAX: u32 = 10 * 60 * 1000;

impl PeerService {
    /// One call of a stream: decoded, checked, run, and its result encoded,
    /// given up once the caller's timeout has passed (it no longer waits);
    /// refused if `overloaded`.
    async fn run_call(
        self,
        number: u64,
        call: quiver_proto::peer::PeerRequest,
        authenticated: Option<super::auth::AuthenticatedPeer>,
        overloaded: bool,
    ) -> Result<PeerStreamReply, Status> {
        let decoded = if overloaded {
            Err(format!(
                "overloaded: {STREAM_CALLS_RUNNING_MAX} calls of this stream already running"
            ))
        } else {
            wire::decode::<PeerCall>(&call.payload)
                .map_err(|e| format!("undecodable peer call: {e}"))
        };
        let result = match decoded {
            // Under peer TLS a node pings as itself only.
            Ok(PeerCall::Ping(ping)) if authenticated.is_some_and(|peer| peer.0 != ping.from) => {
                PeerResult::Failed(format!(
                    "a ping from node {} on a connection of another node",
                    ping.from
                ))
            }
            Ok(decoded) => {
                let group = call.group;
                let run = async {
                    if call.request_id.is_empty() {
                        return self.handle(group, call.replica, decoded).await;
                    }
                    // Work for a client request: logged under its id.
                    let request_id: String = call.request_id.chars().take(64).collect();
                    let span = tracing::debug_span!("forwarded", %request_id);
                    tracing::Instrument::instrument(
                        async {
                            let result = self.handle(group, call.replica, decoded).await;
                            tracing::debug!(group, "forwarded call answered");
                            result
                        },
                        span,
                    )
                    .await
                };
                let timeout_ms = match call.timeout_ms {
                    0 => CALL_TIMEOUT_MS_MAX,
                    ms => ms.min(CALL_TIMEOUT_MS_MAX),
                };
                tokio::time::timeout(Duration::from_millis(u64::from(timeout_ms)), run)
                    .await
                    .unwrap_or_else(|_| {
                        PeerResult::Failed(format!("gave up after the caller's {timeout_ms} ms"))
                    })
            }
            Err(refusal) => PeerResult::Failed(refusal),
        };
        Ok(PeerStreamReply {
            call: number,
            payload: wire::encode(&result).map_err(internal)?,
        })
    }
}

#[tonic::async_trait]
impl Peer for PeerService {
    type CallStreamStream = tokio_stream::wrappers::ReceiverStream<Result<PeerStreamReply, Status>>;

    async fn call_stream(
        &self,
        request: Request<Streaming<PeerBatch>>,
    ) -> Result<Response<Self::CallStreamStream>, Status> {
        let authenticated = request
            .extensions()
            .get::<super::auth::AuthenticatedPeer>()
            .copied();
        let mut inbound = request.into_inner();
        let (replies, out) = tokio::sync::mpsc::channel(STREAM_REPLIES_QUEUED_MAX);
        let service = self.clone();
        let mut closing = self.closing.clone();
        // One task per stream runs its calls concurrently (no task per
        // call), and each reply goes out the moment its call is done.
        tokio::spawn(async move {
            let mut running = futures::stream::FuturesUnordered::new();
            let mut open = !*closing.borrow();
            loop {
                // Nothing more to read or answer: the stream ends.
                if !open && running.is_empty() {
                    return;
                }
                tokio::select! {
                    // Closing: no new calls; the stream ends once the
                    // running ones are answered, and the caller opens
                    // another (to a node that is up by then).
                    changed = closing.changed(), if open => {
                        // A dropped sender: the server is gone too.
                        let closed = changed.is_err() || *closing.borrow_and_update();
                        open = !closed;
                        continue;
                    }
                    // The caller went away: what runs is dropped.
                    () = replies.closed() => return,
                    batch = inbound.message(), if open => {
                        let batch = match batch {
                            Ok(Some(batch)) => batch,
                            // The caller closed its side, or went away: what
                            // runs still answers (if anyone listens).
                            Ok(None) | Err(_) => {
                                open = false;
                                continue;
                            }
                        };
                        if batch.calls.len() > PEER_BATCH_CALLS_MAX {
                            let refusal = Status::invalid_argument(format!(
                                "peer batch of {} calls, at most {PEER_BATCH_CALLS_MAX}",
                                batch.calls.len()
                            ));
                            let _ = replies.send(Err(refusal)).await;
                            return;
                        }
                        for (offset, call) in (0u64..).zip(batch.calls) {
                            let number = batch.first_call.wrapping_add(offset);
                            let overloaded = running.len() >= STREAM_CALLS_RUNNING_MAX;
                            running.push(service.clone().run_call(
                                number,
                                call,
                                authenticated,
                                overloaded,
                            ));
                        }
                    }
                    Some(reply) = running.next(), if !running.is_empty() => {
                        if replies.send(reply).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(
            out,
        )))
    }

    async fn install_snapshot(
        &self,
        request: Request<Streaming<SnapshotChunk>>,
    ) -> Result<Response<PeerReply>, Status> {
        let result = self.receive_snapshot(request.into_inner()).await?;
        Ok(Response::new(PeerReply {
            payload: wire::encode(&result).map_err(internal)?,
        }))
    }
}
