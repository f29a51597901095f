//! The client side of the internal `Peer` service: one lazily connected
//! HTTP/2 channel per peer node, shared by every group (tonic multiplexes the
//! calls), plus openraft's network traits on top.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use openraft::errors::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory, RaftNetworkV2};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::type_config::alias::SnapshotOf;
use quiver_proto::peer::{PeerRequest, SnapshotChunk, peer_client::PeerClient};
use quiver_raft::state_machine::checked_name;
use quiver_raft::types::Vote;
use quiver_raft::{GroupId, NodeId, SnapshotDir, TypeConfig};
use tonic::transport::{Channel, Endpoint};

use super::wire::{self, PeerCall, PeerResult, SnapshotHeader};

/// Bytes of file data per snapshot chunk.
const SNAPSHOT_CHUNK_BYTES: usize = 1 << 20;
/// Largest peer message accepted (a batch of log entries can be large).
pub const PEER_MESSAGE_BYTES_MAX: usize = 256 << 20;

/// Why a peer call failed.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// The peer is not in the cluster description.
    #[error("node {0} is not in the cluster description")]
    UnknownNode(NodeId),
    /// Transport failure, deadline, or the peer refused.
    #[error("peer {node}: {status}")]
    Rpc {
        /// The peer.
        node: NodeId,
        /// What gRPC said.
        status: tonic::Status,
    },
    /// The peer answered with something undecodable.
    #[error("peer {node}: bad reply: {reason}")]
    BadReply {
        /// The peer.
        node: NodeId,
        /// Decode error.
        reason: String,
    },
}

/// Channels to every peer.
#[derive(Debug)]
pub struct PeerClients {
    clients: BTreeMap<NodeId, PeerClient<Channel>>,
    timeout: Duration,
    snapshot_timeout: Duration,
}

impl PeerClients {
    /// Lazily connecting channels to `nodes` (connections open on first use
    /// and reconnect by themselves).
    pub fn new(
        nodes: &BTreeMap<NodeId, String>,
        timeout: Duration,
        snapshot_timeout: Duration,
    ) -> Result<Self, String> {
        let mut clients = BTreeMap::new();
        for (&id, addr) in nodes {
            let endpoint = Endpoint::from_shared(format!("http://{addr}"))
                .map_err(|e| format!("node {id} address {addr:?}: {e}"))?
                .connect_timeout(timeout)
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(timeout);
            let client = PeerClient::new(endpoint.connect_lazy())
                .max_decoding_message_size(PEER_MESSAGE_BYTES_MAX)
                .max_encoding_message_size(PEER_MESSAGE_BYTES_MAX);
            clients.insert(id, client);
        }
        Ok(Self {
            clients,
            timeout,
            snapshot_timeout,
        })
    }

    fn client(&self, node: NodeId) -> Result<PeerClient<Channel>, PeerError> {
        self.clients
            .get(&node)
            .cloned()
            .ok_or(PeerError::UnknownNode(node))
    }

    /// One call with the default deadline.
    pub async fn call(
        &self,
        node: NodeId,
        group: GroupId,
        call: &PeerCall,
    ) -> Result<PeerResult, PeerError> {
        self.call_with_timeout(node, group, call, self.timeout)
            .await
    }

    /// A forwarded client request (propose, read): the peer spends up to the
    /// peer timeout waiting for a commit or a read index itself, so the
    /// caller allows twice that before giving up.
    pub async fn forward(
        &self,
        node: NodeId,
        group: GroupId,
        call: &PeerCall,
    ) -> Result<PeerResult, PeerError> {
        self.call_with_timeout(node, group, call, self.timeout * 2)
            .await
    }

    /// One call with a deadline.
    pub async fn call_with_timeout(
        &self,
        node: NodeId,
        group: GroupId,
        call: &PeerCall,
        timeout: Duration,
    ) -> Result<PeerResult, PeerError> {
        let mut client = self.client(node)?;
        let payload = wire::encode(call).map_err(|e| PeerError::Rpc {
            node,
            status: tonic::Status::internal(format!("encoding a peer call: {e}")),
        })?;
        let mut request = tonic::Request::new(PeerRequest { group, payload });
        request.set_timeout(timeout);
        let reply = tokio::time::timeout(timeout, client.call(request))
            .await
            .map_err(|_| PeerError::Rpc {
                node,
                status: tonic::Status::deadline_exceeded("peer call deadline"),
            })?
            .map_err(|status| PeerError::Rpc { node, status })?
            .into_inner();
        wire::decode(&reply.payload).map_err(|e| PeerError::BadReply {
            node,
            reason: e.to_string(),
        })
    }

    /// Streams a snapshot directory to `node`.
    async fn send_snapshot(
        &self,
        node: NodeId,
        group: GroupId,
        vote: Vote,
        snapshot: SnapshotDir,
    ) -> Result<PeerResult, PeerError> {
        let mut client = self.client(node)?;
        let (sender, receiver) = tokio::sync::mpsc::channel::<SnapshotChunk>(4);
        let header = wire::encode(&SnapshotHeader {
            vote,
            manifest: snapshot.manifest.clone(),
        })
        .map_err(|e| PeerError::Rpc {
            node,
            status: tonic::Status::internal(format!("encoding a snapshot header: {e}")),
        })?;
        // Files are read on a blocking thread and streamed chunk by chunk, so
        // memory stays at a few chunks whatever the snapshot size.
        let reader = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            use std::io::Read;
            let first = SnapshotChunk {
                group,
                header,
                ..SnapshotChunk::default()
            };
            if sender.blocking_send(first).is_err() {
                return Ok(());
            }
            for file in &snapshot.manifest.files {
                let name = checked_name(&file.name)?;
                let mut input = std::fs::File::open(snapshot.db_dir().join(name))?;
                let mut offset = 0u64;
                loop {
                    let mut data = vec![0u8; SNAPSHOT_CHUNK_BYTES];
                    let read = input.read(&mut data)?;
                    if read == 0 && offset > 0 {
                        break;
                    }
                    data.truncate(read);
                    let chunk = SnapshotChunk {
                        group,
                        header: Vec::new(),
                        file: file.name.clone(),
                        offset,
                        data,
                    };
                    if sender.blocking_send(chunk).is_err() {
                        return Ok(());
                    }
                    offset += read as u64;
                    if read == 0 {
                        break;
                    }
                }
            }
            Ok(())
        });
        let mut request =
            tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(receiver));
        request.set_timeout(self.snapshot_timeout);
        let reply = client
            .install_snapshot(request)
            .await
            .map_err(|status| PeerError::Rpc { node, status })?
            .into_inner();
        match reader.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                return Err(PeerError::Rpc {
                    node,
                    status: tonic::Status::internal(format!("reading snapshot: {e}")),
                });
            }
            Err(e) => {
                return Err(PeerError::Rpc {
                    node,
                    status: tonic::Status::internal(format!("snapshot reader: {e}")),
                });
            }
        }
        wire::decode(&reply.payload).map_err(|e| PeerError::BadReply {
            node,
            reason: e.to_string(),
        })
    }
}

/// openraft's network for one group.
#[derive(Debug, Clone)]
pub struct GroupNetwork {
    /// The group.
    pub group: GroupId,
    /// Shared channels.
    pub clients: Arc<PeerClients>,
}

impl RaftNetworkFactory<TypeConfig> for GroupNetwork {
    type Network = GroupPeer;

    async fn new_client(&mut self, target: NodeId, _node: &openraft::BasicNode) -> GroupPeer {
        GroupPeer {
            group: self.group,
            target,
            clients: self.clients.clone(),
        }
    }
}

/// openraft's connection to one peer of one group.
#[derive(Debug)]
pub struct GroupPeer {
    group: GroupId,
    target: NodeId,
    clients: Arc<PeerClients>,
}

fn to_rpc_error(error: PeerError) -> RPCError<TypeConfig> {
    match &error {
        PeerError::Rpc { status, .. }
            if matches!(
                status.code(),
                tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
            ) =>
        {
            RPCError::Unreachable(Unreachable::new(&error))
        }
        _ => RPCError::Network(NetworkError::new(&error)),
    }
}

fn unexpected(result: PeerResult) -> RPCError<TypeConfig> {
    let text = match result {
        PeerResult::Failed(reason) => reason,
        PeerResult::NoSuchGroup => "peer holds no replica of this group".to_owned(),
        other => format!("unexpected reply {other:?}"),
    };
    RPCError::Unreachable(Unreachable::from_string(text))
}

impl GroupPeer {
    async fn call(
        &self,
        call: &PeerCall,
        option: &RPCOption,
    ) -> Result<PeerResult, RPCError<TypeConfig>> {
        self.clients
            .call_with_timeout(self.target, self.group, call, option.soft_ttl())
            .await
            .map_err(to_rpc_error)
    }
}

impl RaftNetworkV2<TypeConfig> for GroupPeer {
    type SnapshotData = SnapshotDir;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        match self.call(&PeerCall::AppendEntries(rpc), &option).await? {
            PeerResult::AppendEntries(response) => Ok(response),
            other => Err(unexpected(other)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        match self.call(&PeerCall::Vote(rpc), &option).await? {
            PeerResult::Vote(response) => Ok(response),
            other => Err(unexpected(other)),
        }
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: SnapshotOf<TypeConfig, SnapshotDir>,
        cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let send = self
            .clients
            .send_snapshot(self.target, self.group, vote, snapshot.snapshot);
        tokio::pin!(cancel);
        let result = tokio::select! {
            closed = &mut cancel => return Err(StreamingError::Closed(closed)),
            result = send => result,
        };
        match result.map_err(to_rpc_error)? {
            PeerResult::SnapshotInstalled { vote } => Ok(SnapshotResponse { vote }),
            other => Err(unexpected(other).into()),
        }
    }
}
