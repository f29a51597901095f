//! The client side of the internal `Peer` service: one lazily connected
//! HTTP/2 channel per peer node, shared by every group, plus openraft's
//! network traits on top.
//!
//! Calls to a peer are batched: each peer has a queue per lane, and a sender
//! task that takes everything queued into one batch whenever fewer than
//! `PEER_BATCHES_IN_FLIGHT_MAX` batches of that lane are outstanding, and
//! writes it on the lane's long-lived `CallStream` (a gRPC call per batch
//! cost more CPU in HTTP/2 headers and stream setup than the Raft messages
//! it carried). An idle
//! peer sees each call at once; under load the heartbeats, appends, votes,
//! proposals and reads of many groups share round trips (with 16 shards, one
//! write per shard would otherwise cost a round trip per follower per shard).

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use openraft::errors::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory, RaftNetworkV2};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest,
    TransferLeaderResponse, VoteRequest, VoteResponse,
};
use openraft::type_config::alias::SnapshotOf;
use quiver_proto::peer::{
    PeerBatch, PeerRequest, PeerStreamReply, SnapshotChunk, peer_client::PeerClient,
};
use quiver_raft::state_machine::checked_name;
use quiver_raft::types::Vote;
use quiver_raft::{GroupId, NodeId, ReplicaId, SnapshotDir, TypeConfig};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};

use super::auth::SignPeerCalls;
use super::breaker::{Admitted, Breaker, BreakerRules, BreakerState, Refused};
use super::wire::{self, PeerCall, PeerResult, SnapshotHeader};

/// Bytes of file data per snapshot chunk.
const SNAPSHOT_CHUNK_BYTES: usize = 1 << 20;
/// Largest peer message accepted (a batch of log entries can be large).
pub const PEER_MESSAGE_BYTES_MAX: usize = 256 << 20;
/// Most calls in one batch (the receiver refuses more).
pub const PEER_BATCH_CALLS_MAX: usize = 512;
/// A batch stops growing at this many payload bytes; a larger call travels
/// alone.
const PEER_BATCH_BYTES_MAX: usize = 4 << 20;
/// Batches of one data lane outstanding to one peer. More means less waiting
/// behind a slow batch; fewer means fuller batches under load.
const PEER_BATCHES_IN_FLIGHT_MAX: usize = 2;
/// Batches of the control lane outstanding to one peer: heartbeats, votes
/// and pings are small and must never wait for each other.
const PEER_CONTROL_BATCHES_IN_FLIGHT_MAX: usize = 4;
/// Calls waiting per peer and lane before new ones fail fast (a peer that
/// stopped answering must not grow memory without bound).
const PEER_QUEUE_CALLS_MAX: usize = 8192;
/// Longest a batch keeps its lane's slot while some of its calls are still
/// unanswered: far above a healthy batch's round trip, far below a call that
/// waits out a missing quorum.
const PEER_BATCH_SLOT_HOLD: Duration = Duration::from_millis(50);

/// Which queue a call waits in. Calls that take very different times, or
/// whose handling makes peer calls of its own, never share a batch: a batch
/// answers when its slowest call does, and a Raft append must not wait for
/// a proposal that itself waits for appends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lane {
    /// Heartbeats (appends without entries), votes and liveness pings, on a
    /// connection of their own: under load they must not queue behind data
    /// (in our queues, in HTTP/2 flow control or in TCP), or a busy cluster
    /// would miss heartbeats and start elections.
    Control = 0,
    /// Appends with entries: answered after a log fsync at most, never
    /// calls out.
    Append = 1,
    /// Forwarded proposals: answered after a commit and apply.
    Propose = 2,
    /// Forwarded reads and read indexes.
    Read = 3,
}

const LANES: usize = 4;

impl Lane {
    fn of(call: &PeerCall) -> Lane {
        match call {
            PeerCall::AppendEntries(rpc) if rpc.entries.is_empty() => Lane::Control,
            PeerCall::Vote(_)
            | PeerCall::PreVote(_)
            | PeerCall::Ping(_)
            | PeerCall::TransferLeader(_) => Lane::Control,
            PeerCall::AppendEntries(_) => Lane::Append,
            // A handover waits for an election, as a proposal waits for a
            // quorum: never in the lane heartbeats and votes use.
            PeerCall::Propose(_)
            | PeerCall::HandOver { .. }
            | PeerCall::ShardState
            | PeerCall::ChangeMembership { .. }
            | PeerCall::BackupShard { .. }
            // A whole shard's scan: not in the lane of point reads.
            | PeerCall::ChecksumShard => Lane::Propose,
            PeerCall::Read { .. } | PeerCall::ReadIndex | PeerCall::LeaseReadIndex => Lane::Read,
        }
    }

    fn batches_in_flight_max(self) -> usize {
        match self {
            Lane::Control => PEER_CONTROL_BATCHES_IN_FLIGHT_MAX,
            Lane::Append | Lane::Propose | Lane::Read => PEER_BATCHES_IN_FLIGHT_MAX,
        }
    }
}

/// Where a call's reply (the peer's payload or the batch's error) goes.
type ReplyTo = oneshot::Sender<Result<Vec<u8>, tonic::Status>>;

/// One call waiting for a batch.
struct Queued {
    group: GroupId,
    /// The receiving replica (0: whichever the peer hosts).
    replica: u64,
    payload: Vec<u8>,
    deadline: Instant,
    reply: ReplyTo,
    /// The client request this call works for (`metrics::current_request_id`).
    request_id: Option<Arc<str>>,
}

/// Takes calls off one peer lane's queue and sends them as batches on the
/// lane's stream, at most `in_flight_max` batches unanswered at a time (a
/// batch gives its slot back when every call is answered, or after
/// `PEER_BATCH_SLOT_HOLD`: a call still waiting then, a commit in a group
/// without quorum, must not keep the lane's other calls from going out).
/// A stream that failed is replaced by a new one at the next batch, and so
/// is one older than `CALL_STREAM_AGE_MAX` (the old one ends once it has
/// answered what it holds). Ends when the queue's senders are dropped.
async fn send_batches(
    client: PeerClient<PeerChannel>,
    mut queue: mpsc::Receiver<Queued>,
    in_flight_max: usize,
) {
    let permits = Arc::new(Semaphore::new(in_flight_max));
    let mut carried: Option<Queued> = None;
    let mut stream: Option<CallStream> = None;
    // When each batch's slot is given back at the latest, oldest first,
    // whatever stream it went on.
    let mut holds: std::collections::VecDeque<(Instant, Arc<parking_lot::Mutex<InFlight>>, u64)> =
        std::collections::VecDeque::new();
    loop {
        let permit = loop {
            let now = Instant::now();
            while let Some((at, in_flight, batch)) = holds.front() {
                if *at > now {
                    break;
                }
                in_flight.lock().release_slot(*batch);
                holds.pop_front();
            }
            let due = holds.front().map(|(at, _, _)| *at);
            tokio::select! {
                permit = permits.clone().acquire_owned() => match permit {
                    Ok(permit) => break permit,
                    Err(_) => return,
                },
                () = tokio::time::sleep_until(due.unwrap_or(now)), if due.is_some() => {}
            }
        };
        let first = match carried.take() {
            Some(call) => call,
            None => match queue.recv().await {
                Some(call) => call,
                None => return,
            },
        };
        let mut bytes = first.payload.len();
        let mut batch = vec![first];
        while batch.len() < PEER_BATCH_CALLS_MAX && bytes < PEER_BATCH_BYTES_MAX {
            let Ok(call) = queue.try_recv() else { break };
            if bytes + call.payload.len() > PEER_BATCH_BYTES_MAX {
                carried = Some(call);
                break;
            }
            bytes += call.payload.len();
            batch.push(call);
        }
        // Callers that gave up are not sent.
        batch.retain(|call| !call.reply.is_closed());
        if batch.is_empty() {
            continue;
        }
        let open = match stream.take() {
            Some(open)
                if !open.in_flight.lock().has_failed()
                    && open.opened.elapsed() < CALL_STREAM_AGE_MAX =>
            {
                open
            }
            _ => CallStream::open(client.clone()),
        };
        let Some(message) = open.in_flight.lock().register(batch, permit) else {
            // Failed since the check: its calls were failed with it.
            continue;
        };
        holds.push_back((
            Instant::now() + PEER_BATCH_SLOT_HOLD,
            open.in_flight.clone(),
            message.first_call,
        ));
        // Waits while the peer does not read (flow control); fails once the
        // stream is gone.
        match open.batches.send(message).await {
            Ok(()) => stream = Some(open),
            Err(mpsc::error::SendError(message)) => {
                let status = tonic::Status::unavailable("peer call stream closed");
                open.in_flight.lock().abandon(&message, &status);
            }
        }
    }
}

/// Batches of one lane on their way to a peer over one long-lived
/// `CallStream`, and the calls it has not answered yet.
struct CallStream {
    batches: mpsc::Sender<PeerBatch>,
    in_flight: Arc<parking_lot::Mutex<InFlight>>,
    opened: Instant,
}

/// A stream is replaced after this long, so that its connection can close
/// when the peer asks (TLS connections are closed after an hour, for their
/// certificates to be checked again): the old stream's sending side closes,
/// and the peer answers what it holds and ends it.
const CALL_STREAM_AGE_MAX: Duration = Duration::from_secs(10 * 60);

/// Batches waiting to be written on one stream: a few, so a peer that does
/// not read holds the sender back soon.
const STREAM_BATCHES_QUEUED_MAX: usize = 4;

impl CallStream {
    /// A stream that opens in the background: batches sent meanwhile wait
    /// in its queue, and fail with it if it cannot open.
    fn open(client: PeerClient<PeerChannel>) -> CallStream {
        let (batches, requests) = mpsc::channel(STREAM_BATCHES_QUEUED_MAX);
        let in_flight = Arc::new(parking_lot::Mutex::new(InFlight::default()));
        tokio::spawn(read_replies(client, requests, in_flight.clone()));
        CallStream {
            batches,
            in_flight,
            opened: Instant::now(),
        }
    }
}

/// What one stream has sent and not had answered.
#[derive(Default)]
struct InFlight {
    /// Each call's caller, and the batch it went in.
    calls: std::collections::HashMap<u64, (ReplyTo, u64)>,
    /// Each batch's unanswered calls and its lane slot (given back early,
    /// after `PEER_BATCH_SLOT_HOLD`, by the sender).
    batches: std::collections::HashMap<u64, (usize, Option<OwnedSemaphorePermit>)>,
    /// The next call's number.
    next_call: u64,
    /// Why the stream ended, once it has: nothing more is registered.
    failed: Option<tonic::Status>,
}

impl InFlight {
    fn has_failed(&self) -> bool {
        self.failed.is_some()
    }

    /// Numbers `batch`'s calls and keeps their callers; the message to
    /// send, or `None` (and every caller failed) if the stream has ended.
    fn register(&mut self, batch: Vec<Queued>, permit: OwnedSemaphorePermit) -> Option<PeerBatch> {
        if let Some(status) = &self.failed {
            for call in batch {
                let _ = call.reply.send(Err(status.clone()));
            }
            return None;
        }
        let now = Instant::now();
        let first_call = self.next_call;
        self.next_call += batch.len() as u64;
        self.batches.insert(first_call, (batch.len(), Some(permit)));
        let calls = (first_call..)
            .zip(batch)
            .map(|(number, call)| {
                // The callee gives up when the caller does.
                let timeout_ms = call.deadline.saturating_duration_since(now).as_millis();
                self.calls.insert(number, (call.reply, first_call));
                PeerRequest {
                    group: call.group,
                    replica: call.replica,
                    payload: call.payload,
                    request_id: call
                        .request_id
                        .as_deref()
                        .map(str::to_owned)
                        .unwrap_or_default(),
                    timeout_ms: u32::try_from(timeout_ms).unwrap_or(u32::MAX).max(1),
                }
            })
            .collect();
        Some(PeerBatch { calls, first_call })
    }

    /// Hands a reply to its caller; an error if the peer answered a call
    /// it was not asked (or twice), which ends the stream.
    fn answer(&mut self, reply: PeerStreamReply) -> Result<(), tonic::Status> {
        let Some((caller, batch)) = self.calls.remove(&reply.call) else {
            return Err(tonic::Status::internal(format!(
                "peer answered call {} that it was not asked, or twice",
                reply.call
            )));
        };
        let _ = caller.send(Ok(reply.payload));
        if let Some((waiting, _)) = self.batches.get_mut(&batch) {
            *waiting -= 1;
            if *waiting == 0 {
                self.batches.remove(&batch);
            }
        }
        Ok(())
    }

    /// Fails the calls of a batch that could not be sent.
    fn abandon(&mut self, batch: &PeerBatch, status: &tonic::Status) {
        for number in (batch.first_call..).take(batch.calls.len()) {
            if let Some((caller, _)) = self.calls.remove(&number) {
                let _ = caller.send(Err(status.clone()));
            }
        }
        self.batches.remove(&batch.first_call);
    }

    /// Gives back the slot of `batch` (held for `PEER_BATCH_SLOT_HOLD`)
    /// while some of its calls are still unanswered.
    fn release_slot(&mut self, batch: u64) {
        if let Some((_, permit)) = self.batches.get_mut(&batch) {
            *permit = None;
        }
    }

    /// Ends the stream: every caller waiting gets `status`.
    fn fail(&mut self, status: tonic::Status) {
        for (_, (caller, _)) in self.calls.drain() {
            let _ = caller.send(Err(status.clone()));
        }
        self.batches.clear();
        self.failed = Some(status);
    }
}

/// Opens the stream, then hands each reply to its caller until the stream
/// ends; then fails what is left.
async fn read_replies(
    mut client: PeerClient<PeerChannel>,
    requests: mpsc::Receiver<PeerBatch>,
    in_flight: Arc<parking_lot::Mutex<InFlight>>,
) {
    let opened = client
        .call_stream(tokio_stream::wrappers::ReceiverStream::new(requests))
        .await;
    let status = match opened {
        Err(status) => status,
        Ok(response) => {
            let mut replies = response.into_inner();
            loop {
                match replies.message().await {
                    Ok(Some(reply)) => {
                        if let Err(status) = in_flight.lock().answer(reply) {
                            break status;
                        }
                    }
                    Ok(None) => break tonic::Status::unavailable("peer ended the call stream"),
                    Err(status) => break status,
                }
            }
        }
    };
    in_flight.lock().fail(status);
}

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
    /// This node's queue of calls to the peer is full (it is not keeping
    /// up): refused at once, before any network.
    #[error("peer {node}: too many calls queued for it")]
    QueueFull {
        /// The peer.
        node: NodeId,
    },
    /// The peer's circuit breaker is open: it failed too many recent
    /// calls, and this one was not sent.
    #[error("peer {node}: not called, its circuit breaker is open (it failed most recent calls)")]
    BreakerOpen {
        /// The peer.
        node: NodeId,
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

impl PeerError {
    /// Whether the peer did not answer as a live node would: the transport
    /// failed, the call timed out, or its breaker is open. Not this node's
    /// own backlog, a node missing from its view, a cancelled batch or a
    /// refusal (those say nothing about the shard).
    pub fn peer_unresponsive(&self) -> bool {
        match self {
            PeerError::Rpc { status, .. } => matches!(
                status.code(),
                tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Unknown
            ),
            PeerError::BreakerOpen { .. } => true,
            PeerError::UnknownNode(_)
            | PeerError::QueueFull { .. }
            | PeerError::BadReply { .. } => false,
        }
    }
}

/// A channel to a peer whose every call carries the cluster secret.
pub type PeerChannel = tonic::service::interceptor::InterceptedService<Channel, SignPeerCalls>;

/// Counts a peer call that never got an answer: refused at a full queue,
/// or past its deadline.
fn dropped(node: NodeId, reason: &'static str) {
    metrics::counter!(
        "quiver_peer_calls_dropped_total",
        "peer" => node.to_string(),
        "reason" => reason
    )
    .increment(1);
}

/// The channels to one peer and its batching queue per lane. The sender
/// tasks stop when this is dropped (their queues close).
#[derive(Debug)]
struct PeerConn {
    addr: String,
    client: PeerClient<PeerChannel>,
    queues: [mpsc::Sender<Queued>; LANES],
    breaker: Breaker,
}

/// Channels to every peer, and a batching queue per peer and lane. The set
/// of peers follows the cluster map ([`PeerClients::set_nodes`]).
#[derive(Debug)]
pub struct PeerClients {
    conns: parking_lot::RwLock<BTreeMap<NodeId, Arc<PeerConn>>>,
    sign: SignPeerCalls,
    /// Peer TLS: connections present this node's certificate and check the
    /// peer's.
    tls: Option<Arc<crate::tls::Tls>>,
    timeout: Duration,
    snapshot_timeout: Duration,
    breaker_rules: BreakerRules,
    /// Shared by every snapshot this node sends.
    snapshot_rate: Arc<super::throttle::ByteRate>,
}

impl PeerClients {
    /// Lazily connecting channels to `nodes` (connections open on first use
    /// and reconnect by themselves), and their batch senders. Must be called
    /// within a Tokio runtime; the senders stop when this is dropped.
    pub fn new(
        nodes: &BTreeMap<NodeId, String>,
        timeout: Duration,
        snapshot_timeout: Duration,
        snapshot_bytes_per_second_max: u64,
        sign: SignPeerCalls,
        breaker_rules: BreakerRules,
        tls: Option<Arc<crate::tls::Tls>>,
    ) -> Result<Self, String> {
        let clients = Self {
            conns: parking_lot::RwLock::new(BTreeMap::new()),
            sign,
            tls,
            timeout,
            snapshot_timeout,
            breaker_rules,
            snapshot_rate: Arc::new(super::throttle::ByteRate::new(
                snapshot_bytes_per_second_max,
            )),
        };
        clients.set_nodes(nodes)?;
        Ok(clients)
    }

    /// Makes the peers exactly `nodes`: new ones get channels, ones whose
    /// address changed get new channels, ones no longer listed are dropped
    /// (their queued calls fail). An address that does not parse is
    /// refused, and nothing changes.
    pub fn set_nodes(&self, nodes: &BTreeMap<NodeId, String>) -> Result<(), String> {
        let current = self.conns.read().clone();
        let mut next = BTreeMap::new();
        for (&id, addr) in nodes {
            match current.get(&id) {
                Some(conn) if conn.addr == *addr => {
                    next.insert(id, conn.clone());
                }
                _ => {
                    next.insert(id, Arc::new(self.connect(id, addr)?));
                }
            }
        }
        *self.conns.write() = next;
        Ok(())
    }

    fn connect(&self, id: NodeId, addr: &str) -> Result<PeerConn, String> {
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| format!("node {id} address {addr:?}: {e}"))?
            .connect_timeout(self.timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(self.timeout);
        let connect = || {
            let channel = match &self.tls {
                Some(tls) => endpoint.connect_with_connector_lazy(tls.peer_connector()),
                None => endpoint.connect_lazy(),
            };
            PeerClient::with_interceptor(channel, self.sign.clone())
                .max_decoding_message_size(PEER_MESSAGE_BYTES_MAX)
                .max_encoding_message_size(PEER_MESSAGE_BYTES_MAX)
        };
        // Two connections: control traffic never shares one with data.
        let data = connect();
        let control = connect();
        let queues = std::array::from_fn(|index| {
            let lane = [Lane::Control, Lane::Append, Lane::Propose, Lane::Read][index];
            let client = if lane == Lane::Control {
                control.clone()
            } else {
                data.clone()
            };
            let (tx, rx) = mpsc::channel(PEER_QUEUE_CALLS_MAX);
            tokio::spawn(send_batches(client, rx, lane.batches_in_flight_max()));
            tx
        });
        Ok(PeerConn {
            addr: addr.to_owned(),
            client: data,
            queues,
            breaker: Breaker::new(self.breaker_rules, std::time::Instant::now()),
        })
    }

    fn conn(&self, node: NodeId) -> Result<Arc<PeerConn>, PeerError> {
        self.conns
            .read()
            .get(&node)
            .cloned()
            .ok_or(PeerError::UnknownNode(node))
    }

    /// The peers known now.
    pub fn nodes(&self) -> Vec<NodeId> {
        self.conns.read().keys().copied().collect()
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
        self.call_with_timeout(node, group, None, call, self.timeout * 2)
            .await
    }

    /// Each peer's breaker state now, for the metrics.
    pub fn breaker_states(&self) -> Vec<(NodeId, BreakerState)> {
        let now = std::time::Instant::now();
        self.conns
            .read()
            .iter()
            .map(|(&node, conn)| (node, conn.breaker.state(now)))
            .collect()
    }

    /// Calls waiting in each peer's lanes now, for the metrics.
    pub fn queue_depths(&self) -> Vec<(NodeId, &'static str, usize)> {
        let mut depths = Vec::new();
        for (&node, conn) in self.conns.read().iter() {
            for (lane, queue) in ["control", "append", "propose", "read"]
                .into_iter()
                .zip(&conn.queues)
            {
                depths.push((node, lane, queue.max_capacity() - queue.capacity()));
            }
        }
        depths
    }

    /// One call with a deadline: queued for the next batch to `node`, for
    /// its replica `replica` of `group` (`None`: whichever it hosts).
    pub async fn call_with_timeout(
        &self,
        node: NodeId,
        group: GroupId,
        replica: Option<ReplicaId>,
        call: &PeerCall,
        timeout: Duration,
    ) -> Result<PeerResult, PeerError> {
        let conn = self.conn(node)?;
        let lane = Lane::of(call);
        let admitted = conn.breaker.admit(std::time::Instant::now());
        // Only forwarded client work fails fast: Raft traffic (heartbeats,
        // votes, pings, appends) always goes, so elections, liveness and
        // replication never wait for a breaker to close (openraft backs off
        // from an unreachable follower by itself), and it probes the peer.
        if admitted.is_err() && matches!(lane, Lane::Propose | Lane::Read) {
            dropped(node, "breaker_open");
            return Err(PeerError::BreakerOpen { node });
        }
        let mut outcome = BreakerOutcome {
            conn: &conn,
            node,
            admitted: Some(admitted),
        };
        let result = tracing::Instrument::instrument(
            self.queue_and_wait(&conn, node, lane, group, replica, call, timeout),
            tracing::trace_span!("peer_call", peer = node, group, lane = ?lane),
        )
        .await;
        outcome.record(lane, &result);
        result
    }

    /// The body of [`Self::call_with_timeout`], past the breaker.
    #[allow(clippy::too_many_arguments)]
    async fn queue_and_wait(
        &self,
        conn: &PeerConn,
        node: NodeId,
        lane: Lane,
        group: GroupId,
        replica: Option<ReplicaId>,
        call: &PeerCall,
        timeout: Duration,
    ) -> Result<PeerResult, PeerError> {
        let queue = &conn.queues[lane as usize];
        let rpc_error = |status| PeerError::Rpc { node, status };
        let payload = wire::encode(call).map_err(|e| {
            rpc_error(tonic::Status::internal(format!(
                "encoding a peer call: {e}"
            )))
        })?;
        let (reply, answer) = oneshot::channel();
        queue
            .try_send(Queued {
                group,
                replica: replica.map_or(0, |r| r.0),
                payload,
                deadline: Instant::now() + timeout,
                reply,
                request_id: crate::metrics::current_request_id(),
            })
            .map_err(|e| {
                rpc_error(match e {
                    mpsc::error::TrySendError::Full(_) => {
                        dropped(node, "queue_full");
                        return PeerError::QueueFull { node };
                    }
                    mpsc::error::TrySendError::Closed(_) => {
                        tonic::Status::cancelled("peer sender stopped")
                    }
                })
            })?;
        let payload = tokio::time::timeout(timeout, answer)
            .await
            .map_err(|_| {
                dropped(node, "deadline");
                rpc_error(tonic::Status::deadline_exceeded("peer call deadline"))
            })?
            .map_err(|_| rpc_error(tonic::Status::cancelled("peer batch dropped")))?
            .map_err(rpc_error)?;
        wire::decode(&payload).map_err(|e| PeerError::BadReply {
            node,
            reason: e.to_string(),
        })
    }

    /// Streams a snapshot directory to `replica` of `group`.
    async fn send_snapshot(
        &self,
        replica: ReplicaId,
        group: GroupId,
        vote: Vote,
        snapshot: SnapshotDir,
    ) -> Result<PeerResult, PeerError> {
        let node = replica.node();
        let mut client = self.conn(node)?.client.clone();
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
        // memory stays at a few chunks whatever the snapshot size; the thread
        // waits out the node's snapshot byte rate before each chunk.
        let rate = self.snapshot_rate.clone();
        let reader = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            use std::io::Read;
            let first = SnapshotChunk {
                group,
                header,
                replica: replica.0,
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
                    rate.wait_blocking(read as u64);
                    let chunk = SnapshotChunk {
                        group,
                        header: Vec::new(),
                        file: file.name.clone(),
                        offset,
                        data,
                        replica: 0,
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

/// Reports one call's outcome to its peer's breaker, once: a call dropped
/// before it ends (its caller gave up) reports nothing, freeing a probe.
struct BreakerOutcome<'a> {
    conn: &'a PeerConn,
    node: NodeId,
    /// What the breaker said when the call was sent (`None` once
    /// reported); a refused call was sent anyway (Raft traffic).
    admitted: Option<Result<Admitted, Refused>>,
}

impl BreakerOutcome<'_> {
    /// Success is any answer; failure is a transport error, or a deadline
    /// passed by a call the peer answers at once (heartbeats, votes,
    /// pings) or after an fsync (appends): a proposal or read that waits
    /// for a quorum or a leader elsewhere says nothing about the peer.
    fn record(&mut self, lane: Lane, result: &Result<PeerResult, PeerError>) {
        let ok = match result {
            Ok(_) | Err(PeerError::BadReply { .. }) => Some(true),
            Err(PeerError::Rpc { status, .. }) => match status.code() {
                tonic::Code::Unavailable | tonic::Code::Unknown => Some(false),
                tonic::Code::DeadlineExceeded => {
                    matches!(lane, Lane::Control | Lane::Append).then_some(false)
                }
                _ => None,
            },
            // This node's own backlog says nothing about the peer.
            Err(
                PeerError::UnknownNode(_)
                | PeerError::BreakerOpen { .. }
                | PeerError::QueueFull { .. },
            ) => None,
        };
        let changed = match self.admitted.take() {
            Some(Ok(admitted)) => self
                .conn
                .breaker
                .record(admitted, ok, std::time::Instant::now()),
            // Sent past an open breaker: an answer means the peer is back.
            Some(Err(refused)) if ok == Some(true) => self.conn.breaker.heard(refused),
            _ => None,
        };
        if let Some(state) = changed {
            breaker_changed(self.node, state);
        }
    }
}

impl Drop for BreakerOutcome<'_> {
    fn drop(&mut self) {
        if let Some(Ok(admitted)) = self.admitted.take() {
            self.conn.breaker.abandon(admitted);
        }
    }
}

/// Logs and counts a peer breaker's change of state.
fn breaker_changed(node: NodeId, state: BreakerState) {
    metrics::gauge!("quiver_peer_breaker_state", "peer" => node.to_string()).set(state.gauge());
    match state {
        BreakerState::Open => {
            metrics::counter!("quiver_peer_breaker_opened_total", "peer" => node.to_string())
                .increment(1);
            tracing::warn!(
                peer = node,
                "peer circuit breaker open: calls to it fail fast"
            );
        }
        BreakerState::Closed => tracing::info!(peer = node, "peer circuit breaker closed"),
        BreakerState::HalfOpen => {}
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

    async fn new_client(&mut self, target: ReplicaId, _node: &openraft::BasicNode) -> GroupPeer {
        GroupPeer {
            group: self.group,
            target,
            clients: self.clients.clone(),
        }
    }
}

/// openraft's connection to one replica of one group (on the node the
/// replica id names; its address comes from the cluster map).
#[derive(Debug)]
pub struct GroupPeer {
    group: GroupId,
    target: ReplicaId,
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
        // Raft traffic is never failed by a breaker; kept for completeness.
        PeerError::BreakerOpen { .. } | PeerError::QueueFull { .. } => {
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
            .call_with_timeout(
                self.target.node(),
                self.group,
                Some(self.target),
                call,
                option.soft_ttl(),
            )
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

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        match self.call(&PeerCall::PreVote(rpc), &option).await? {
            PeerResult::PreVote(response) => Ok(response),
            other => Err(unexpected(other)),
        }
    }

    async fn transfer_leader(
        &mut self,
        rpc: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        match self.call(&PeerCall::TransferLeader(rpc), &option).await? {
            PeerResult::TransferLeader(response) => Ok(response),
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
        let outcome = if matches!(result, Ok(PeerResult::SnapshotInstalled { .. })) {
            "installed"
        } else {
            "failed"
        };
        metrics::counter!("quiver_snapshot_sends_total", "outcome" => outcome).increment(1);
        match result.map_err(to_rpc_error)? {
            PeerResult::SnapshotInstalled { vote } => Ok(SnapshotResponse { vote }),
            other => Err(unexpected(other).into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quiver_proto::peer::peer_server::{Peer, PeerServer};
    use tonic::transport::server::TcpIncoming;

    /// A peer that answers every call with its group as a read index, after
    /// a pause (6 s for the groups in `slow`; for as long as `stalled` is
    /// set, like a node stopped with SIGSTOP), and records the size of
    /// every batch it gets. With `cut_first_stream`, its first stream
    /// breaks after one reply (a peer that restarted).
    #[derive(Clone, Default)]
    struct EchoPeer {
        batches: Arc<parking_lot::Mutex<Vec<usize>>>,
        slow: Arc<Vec<u32>>,
        stalled: Arc<std::sync::atomic::AtomicBool>,
        cut_first_stream: bool,
        streams: Arc<std::sync::atomic::AtomicUsize>,
    }

    #[tonic::async_trait]
    impl Peer for EchoPeer {
        type CallStreamStream = std::pin::Pin<
            Box<dyn futures::Stream<Item = Result<PeerStreamReply, tonic::Status>> + Send>,
        >;

        async fn call_stream(
            &self,
            request: tonic::Request<tonic::Streaming<PeerBatch>>,
        ) -> Result<tonic::Response<Self::CallStreamStream>, tonic::Status> {
            use futures::StreamExt;
            let peer = self.clone();
            let replies = request
                .into_inner()
                .map(move |batch| {
                    let batch = batch.unwrap_or_default();
                    peer.batches.lock().push(batch.calls.len());
                    let peer = peer.clone();
                    futures::stream::iter((batch.first_call..).zip(batch.calls).map(
                        move |(number, call)| {
                            let pause = if peer.slow.contains(&call.group) {
                                Duration::from_secs(6)
                            } else {
                                Duration::from_millis(20)
                            };
                            let stalled = peer.stalled.clone();
                            async move {
                                tokio::time::sleep(pause).await;
                                while stalled.load(std::sync::atomic::Ordering::SeqCst) {
                                    tokio::time::sleep(Duration::from_millis(10)).await;
                                }
                                Ok(PeerStreamReply {
                                    call: number,
                                    payload: wire::encode(&PeerResult::ReadIndex {
                                        applied_index: u64::from(call.group),
                                    })
                                    .unwrap(),
                                })
                            }
                        },
                    ))
                })
                .flatten()
                .buffer_unordered(100_000);
            let opened = self
                .streams
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if self.cut_first_stream && opened == 0 {
                let cut = futures::stream::once(async {
                    Err(tonic::Status::unavailable("the peer went away"))
                });
                return Ok(tonic::Response::new(Box::pin(replies.take(1).chain(cut))));
            }
            Ok(tonic::Response::new(Box::pin(replies)))
        }

        async fn install_snapshot(
            &self,
            _request: tonic::Request<tonic::Streaming<SnapshotChunk>>,
        ) -> Result<tonic::Response<quiver_proto::peer::PeerReply>, tonic::Status> {
            Err(tonic::Status::unimplemented("not used here"))
        }
    }

    async fn serve(peer: EchoPeer) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(PeerServer::new(peer))
                .serve_with_incoming(TcpIncoming::from(listener)),
        );
        addr
    }

    /// Breakers that never open.
    const NO_BREAKER: BreakerRules = BreakerRules {
        window_calls: 0,
        error_rate_percent: 50,
        open: Duration::from_secs(1),
        close_successes: 5,
    };

    fn clients_with(addr: String, timeout: Duration, rules: BreakerRules) -> Arc<PeerClients> {
        Arc::new(
            PeerClients::new(
                &BTreeMap::from([(2, addr)]),
                timeout,
                timeout,
                0,
                SignPeerCalls::new("", 1).unwrap(),
                rules,
                None,
            )
            .unwrap(),
        )
    }

    fn clients(addr: String, timeout: Duration) -> Arc<PeerClients> {
        clients_with(addr, timeout, NO_BREAKER)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stalled_peer_s_breaker_fails_forwarded_calls_fast_and_closes_when_it_answers() {
        use std::sync::atomic::Ordering::SeqCst;
        let peer = EchoPeer::default();
        let addr = serve(peer.clone()).await;
        let rules = BreakerRules {
            window_calls: 10,
            error_rate_percent: 50,
            // Past the test: only an answer half-opens it here.
            open: Duration::from_secs(3600),
            close_successes: 5,
        };
        let clients = clients_with(addr, Duration::from_secs(10), rules);
        let ping = PeerCall::Ping(wire::Ping::default());
        let heartbeat = |timeout| clients.call_with_timeout(2, 0, None, &ping, timeout);
        assert!(heartbeat(Duration::from_secs(2)).await.is_ok());

        // Stalled: 10 heartbeats pass their deadline and open the breaker.
        peer.stalled.store(true, SeqCst);
        let missed =
            futures::future::join_all((0..10).map(|_| heartbeat(Duration::from_millis(200)))).await;
        assert!(missed.iter().all(Result::is_err), "{missed:?}");
        let started = Instant::now();
        let forwarded = clients.forward(2, 7, &PeerCall::ReadIndex).await;
        assert!(
            matches!(forwarded, Err(PeerError::BreakerOpen { node: 2 })),
            "{forwarded:?}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "failed fast, not after the 20 s forward deadline: {:?}",
            started.elapsed()
        );
        // Heartbeats still go (and still time out).
        assert!(matches!(
            heartbeat(Duration::from_millis(200)).await,
            Err(PeerError::Rpc { .. })
        ));

        // Back: a heartbeat's answer half-opens it, 5 successes close it.
        peer.stalled.store(false, SeqCst);
        assert!(heartbeat(Duration::from_secs(2)).await.is_ok());
        for group in 0..5u32 {
            assert!(
                clients
                    .forward(2, group, &PeerCall::ReadIndex)
                    .await
                    .is_ok(),
                "probe {group}"
            );
        }
        let conn = clients.conn(2).unwrap();
        assert_eq!(
            conn.breaker.state(std::time::Instant::now()),
            BreakerState::Closed
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_calls_share_batches_and_each_gets_its_own_reply() {
        let peer = EchoPeer::default();
        let clients = clients(serve(peer.clone()).await, Duration::from_secs(10));
        let calls: Vec<_> = (0..300u32)
            .map(|group| {
                let clients = clients.clone();
                tokio::spawn(async move { clients.forward(2, group, &PeerCall::ReadIndex).await })
            })
            .collect();
        for (group, call) in calls.into_iter().enumerate() {
            match call.await.unwrap().unwrap() {
                PeerResult::ReadIndex { applied_index } => {
                    assert_eq!(
                        applied_index, group as u64,
                        "a reply reached the wrong caller"
                    )
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        let batches = peer.batches.lock().clone();
        assert_eq!(batches.iter().sum::<usize>(), 300, "every call sent once");
        assert!(
            batches.len() <= 30,
            "calls queued behind in-flight batches travel together: {batches:?}"
        );
        assert!(batches.iter().all(|&n| n <= PEER_BATCH_CALLS_MAX));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_call_that_waits_holds_up_no_other_call() {
        // Group 0's calls wait 6 s at the peer (a commit in a group without
        // quorum); every other group's must be answered at their own pace,
        // in the same batch or in the ones after it.
        let peer = EchoPeer {
            slow: Arc::new(vec![0]),
            ..EchoPeer::default()
        };
        let clients = clients(serve(peer.clone()).await, Duration::from_secs(30));
        // The lane's stream is open and has been idle for longer than a
        // batch holds its slot: the slow calls' batches must still give
        // their slots back on time.
        assert!(clients.forward(2, 1, &PeerCall::ReadIndex).await.is_ok());
        tokio::time::sleep(PEER_BATCH_SLOT_HOLD * 4).await;
        let slow: Vec<_> = (0..4)
            .map(|_| {
                let clients = clients.clone();
                tokio::spawn(async move { clients.forward(2, 0, &PeerCall::ReadIndex).await })
            })
            .collect();
        let started = Instant::now();
        for round in 0..5u32 {
            let fast = futures::future::join_all(
                (1..=20u32)
                    .map(|group| clients.forward(2, group + round * 20, &PeerCall::ReadIndex)),
            )
            .await;
            for reply in fast {
                assert!(
                    matches!(reply, Ok(PeerResult::ReadIndex { .. })),
                    "{reply:?}"
                );
            }
        }
        // Behind the slow calls they would take 6 s at least.
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "100 fast calls took {:?} behind 4 slow ones",
            started.elapsed()
        );
        for call in slow {
            assert!(matches!(
                call.await.unwrap(),
                Ok(PeerResult::ReadIndex { applied_index: 0 })
            ));
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_broken_stream_fails_its_unanswered_calls_and_the_next_batch_opens_another() {
        let peer = EchoPeer {
            cut_first_stream: true,
            ..EchoPeer::default()
        };
        let clients = clients(serve(peer.clone()).await, Duration::from_secs(10));
        let first = futures::future::join_all(
            (0..10u32).map(|group| clients.forward(2, group, &PeerCall::ReadIndex)),
        )
        .await;
        let answered = first.iter().filter(|r| r.is_ok()).count();
        assert!(answered >= 1, "{first:?}");
        for failed in first.iter().filter(|r| r.is_err()) {
            assert!(
                matches!(failed, Err(PeerError::Rpc { status, .. }) if status.code() == tonic::Code::Unavailable),
                "{failed:?}"
            );
        }
        assert!(answered < 10, "the stream broke with calls unanswered");
        // The next calls go on a new stream, and every one is answered by
        // its own reply.
        let second = futures::future::join_all(
            (0..10u32).map(|group| clients.forward(2, group, &PeerCall::ReadIndex)),
        )
        .await;
        for (group, reply) in second.into_iter().enumerate() {
            assert!(
                matches!(reply, Ok(PeerResult::ReadIndex { applied_index }) if applied_index == group as u64),
                "{reply:?}"
            );
        }
        assert_eq!(peer.streams.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn an_unreachable_peer_fails_every_queued_call() {
        // A port nobody listens on.
        let addr = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().to_string()
        };
        let clients = clients(addr, Duration::from_millis(500));
        let results = futures::future::join_all(
            (0..20u32).map(|group| clients.forward(2, group, &PeerCall::ReadIndex)),
        )
        .await;
        for result in results {
            assert!(
                matches!(result, Err(PeerError::Rpc { node: 2, .. })),
                "{result:?}"
            );
        }
        assert!(matches!(
            clients.forward(9, 0, &PeerCall::ReadIndex).await,
            Err(PeerError::UnknownNode(9))
        ));
    }
}
