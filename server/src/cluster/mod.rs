//! The cluster as one node sees it: the Raft groups it hosts, the cluster
//! map it routes by, and the work the metadata group's leader does for the
//! whole cluster.
//!
//! Every node hosts a replica of the metadata group (voter or learner) and
//! the shard replicas the cluster map gives it. A request arriving at any
//! node is routed per shard (`router`): proposals go to the shard leader
//! (locally, or forwarded over the `Peer` service), reads to the leader or
//! a replica depending on consistency (`reads`).
//!
//! Rooms:
//! - `identity`: the node's id and first-start record in its data directory;
//! - `host`: the replicas hosted here, opened, stopped and destroyed at run
//!   time;
//! - `placement`: the cluster map and its range index;
//! - `metadata`: following the map (hosting what it says, peers it names)
//!   and, on the metadata leader, keeping the metadata group's membership;
//! - `operator`, `scheduler`: replica moves, and what decides them;
//! - `router`, `reads`: request routing and read levels;
//! - `hibernate`, `transfer`: idle groups, leadership handover;
//! - `network`, `peer_service`, `wire`, `auth`: the peer transport.

pub mod auth;
mod backup;
pub mod breaker;
pub mod hibernate;
pub mod host;
pub mod identity;
pub mod load;
pub mod metadata;
pub mod network;
pub mod operator;
pub mod peer_service;
pub mod placement;
pub mod reads;
pub mod router;
pub mod scheduler;
pub mod shard_breaker;
pub mod throttle;
pub mod transfer;
pub mod wire;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use openraft::async_runtime::WatchReceiver;
use openraft::{BasicNode, SnapshotPolicy};
use parking_lot::Mutex;
use quiver_engine::seglog::LogOptions;
use quiver_engine::{Clock, StoreOptions};
use quiver_proto::v1 as pb;
use quiver_raft::cluster_map::ClusterMap;
use quiver_raft::types::RejectKind;
use quiver_raft::{ApplyObserver, GroupId, METADATA_GROUP, NodeId, ReplicaId, StateMachine};

use crate::config::ClusterConfig;
pub use host::Group;
use host::{GROUPS_DIR, GroupFactory, GroupHost, SplitEvent};
use network::PeerClients;
use placement::{Placement, StaticLayout};

/// Errors of routing and replication.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// No replica could serve the request within the retry budget.
    #[error("shard {group}: unavailable after {attempts} attempts: {last}")]
    Unavailable {
        /// The group.
        group: GroupId,
        /// Attempts made.
        attempts: u32,
        /// The last failure.
        last: String,
    },
    /// The state machine refused the command (the same on every replica).
    #[error("{message}")]
    Rejected {
        /// Why, as a class.
        kind: RejectKind,
        /// Why, for people.
        message: String,
    },
    /// The node could not start its groups.
    #[error("cluster start: {0}")]
    Start(String),
    /// The cluster has no such group.
    #[error("no shard {0}")]
    NoSuchGroup(GroupId),
    /// The shard's circuit breaker is open: most recent leader-bound calls
    /// to it failed or timed out, so this one was not tried.
    #[error(
        "shard {group}: not tried, its circuit breaker is open (most recent calls to it failed \
         or timed out); it is probed again within {open_ms} ms"
    )]
    BreakerOpen {
        /// The group.
        group: GroupId,
        /// How long the breaker stays open before probing.
        open_ms: u64,
    },
    /// An operation's precondition does not hold (retrying as is will not
    /// help).
    #[error("shard {group}: {message}")]
    Refused {
        /// The group.
        group: GroupId,
        /// Why.
        message: String,
    },
}

/// Who served a shard read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadSource {
    /// The shard.
    pub group: GroupId,
    /// The serving node.
    pub node_id: NodeId,
    /// Whether it led the shard.
    pub leader: bool,
    /// Its applied index.
    pub applied_index: u64,
}

/// How a shard read is served.
pub enum ShardRead {
    /// By this node's replica: read the store (and the hot cache).
    Local {
        /// The replica (its live store is loaded at read time, after the
        /// cache placeholders are taken, so a snapshot install in between
        /// cannot leave a stale row cached).
        state: StateMachine,
        /// Provenance.
        source: ReadSource,
        /// The shard's range version when it was found to own the keys:
        /// if it changed by the time the rows are read, a split may have
        /// taken them (read again through the map).
        range_version: u64,
    },
    /// By another node, which returned the encoded rows.
    Remote {
        /// Encoded rows in key order.
        rows: Vec<Option<Vec<u8>>>,
        /// Provenance.
        source: ReadSource,
    },
}

/// Split children waiting to be hosted, at most.
const SPLIT_EVENTS_MAX: usize = 64;

/// Hosts every split child as soon as its replica is on disk; the child of
/// a shard this node leads campaigns at once (the others would wait out an
/// election timeout).
async fn host_split_children(
    cluster: std::sync::Weak<Cluster>,
    mut events: tokio::sync::mpsc::Receiver<SplitEvent>,
) {
    while let Some(event) = events.recv().await {
        let Some(cluster) = cluster.upgrade() else {
            return;
        };
        let led = cluster.group(event.parent).is_some_and(|parent| {
            parent.raft.metrics().borrow_watched().state == openraft::ServerState::Leader
        });
        // A replayed split announces a child that may be running already:
        // it must not be made to campaign again.
        let already = cluster
            .group(event.child)
            .is_some_and(|child| child.replica == event.replica);
        match cluster.host.open(event.child, event.replica, false).await {
            Ok(_) if already => {}
            Ok(child) => {
                if led {
                    child.pulse.wake(&child.raft);
                    if let Err(e) = child.raft.trigger().elect(true).await {
                        tracing::warn!(child = event.child, error = %e, "electing a split child");
                    }
                }
            }
            Err(e) => tracing::warn!(child = event.child, error = %e, "hosting a split child"),
        }
    }
}

/// The groups this node hosts and the routes to every other group.
pub struct Cluster {
    /// This node.
    pub node_id: NodeId,
    /// Where every group lives, as this node last learned it.
    placement: ArcSwap<Placement>,
    /// A static cluster's first layout (`None` on a node that joined).
    layout: Option<StaticLayout>,
    /// How this node reaches the nodes its static description and
    /// `cluster.peer_routes` name: their peer addresses as this node was
    /// told them, which win over the map's (each node of a test cluster
    /// reaches the others through its own proxies, and an operator may
    /// route peers differently per node).
    static_routes: BTreeMap<NodeId, String>,
    /// The static description's peer addresses alone: who is a node before
    /// the map is stored (a route is how this node dials a peer, not who
    /// the peer is, so `peer_routes` does not make a node a member).
    described_peers: BTreeMap<NodeId, String>,
    /// This node's own client and peer addresses.
    self_addrs: (String, String),
    clients: Arc<PeerClients>,
    host: GroupHost,
    leader_hints: Mutex<HashMap<GroupId, NodeId>>,
    request_sequence: std::sync::atomic::AtomicU64,
    config: ClusterConfig,
    clock: Arc<dyn Clock>,
    /// What peers last said (liveness pings).
    liveness: hibernate::Liveness,
    /// When this node started: hibernation's time base.
    started: tokio::time::Instant,
    /// Set when shutdown begins: background loops stop.
    stopping: std::sync::atomic::AtomicBool,
    /// Notices when this process stood still (REPLICA reads' freshness).
    stall: hibernate::StallWatch,
    /// Operators this node is carrying out (as metadata leader), by shard.
    operators: operator::Running,
    /// Shard loads: this node's measurements and every leader's reports.
    loads: load::Loads,
    /// This node's backup work, once the node has set it.
    backups: std::sync::OnceLock<Arc<crate::backup::Backups>>,
    /// Client calls' circuit breakers, per shard.
    shard_breakers: shard_breaker::ShardBreakers,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("node_id", &self.node_id)
            .field("host", &self.host)
            .finish_non_exhaustive()
    }
}

/// What [`Cluster::start`] needs besides the configuration.
pub struct StartOptions<'a> {
    /// Root of this node's data.
    pub data_dir: &'a Path,
    /// This node's client-facing address (used for a one-node cluster).
    pub self_addr: String,
    /// This node's peer address (likewise).
    pub self_peer_addr: String,
    /// Options of every group's store; `registry` must be the node's.
    pub store: StoreOptions,
    /// Cache coherence.
    pub observer: Arc<dyn ApplyObserver>,
    /// The node's clock (leader timestamps).
    pub clock: Arc<dyn Clock>,
    /// fsync Raft log appends before they count as written.
    pub sync_log: bool,
    /// This node ships its groups' logs to a backup target: said in every
    /// ping from the first (a node that does not ship releases log holds
    /// only while no peer does).
    pub ships_log: bool,
    /// Peer TLS, when on.
    pub tls: Option<Arc<crate::tls::Tls>>,
}

impl Cluster {
    /// Opens every replica this node hosts and starts their Raft instances.
    /// At the first start of a static cluster's node, creates and
    /// bootstraps the replicas its layout gives it; at the first start of a
    /// node that joined, creates its (empty) metadata replica.
    pub async fn start(
        config: &ClusterConfig,
        options: StartOptions<'_>,
    ) -> Result<Arc<Cluster>, ClusterError> {
        let identity = identity::Identity::load(options.data_dir, config.node_id)?;
        let node_id = identity.node_id;
        let layout = identity
            .joined
            .is_none()
            .then(|| StaticLayout::new(config, &options.self_addr, &options.self_peer_addr));
        let seed_map: ClusterMap = match (&identity.joined, &layout) {
            (Some(joined), _) => joined.clone(),
            (None, Some(layout)) => layout.map.clone(),
            (None, None) => {
                return Err(ClusterError::Start("no cluster description".into()));
            }
        };
        // The description's addresses (a static cluster), then the
        // operator's overrides (`peer_routes`), ahead of the map's.
        let mut static_routes: BTreeMap<NodeId, String> = if identity.joined.is_some() {
            BTreeMap::new()
        } else {
            config
                .nodes
                .iter()
                .filter_map(|node| node.peer_addr().map(|addr| (node.id, addr)))
                .collect()
        };
        let described_peers = static_routes.clone();
        let mut overrides = config
            .peer_route_overrides()
            .map_err(|e| ClusterError::Start(e.to_string()))?;
        // (A static node naming itself is refused with the config; a
        // joining node learned its id only now.)
        if overrides.remove(&node_id).is_some() {
            tracing::warn!(
                node_id,
                "cluster.peer_routes names this node's own id: ignored (a node does not dial itself)"
            );
        }
        static_routes.extend(overrides);
        let clients = Arc::new(
            PeerClients::new(
                &peer_routes(
                    &Placement::new(Arc::new(seed_map.clone()), false),
                    &static_routes,
                ),
                Duration::from_millis(config.peer_timeout_ms),
                Duration::from_millis(config.snapshot_timeout_ms),
                config.snapshot_send_bytes_per_second_max,
                auth::SignPeerCalls::new(&config.secret, node_id).map_err(ClusterError::Start)?,
                breaker::BreakerRules {
                    window_calls: config.breaker_window_calls,
                    error_rate_percent: config.breaker_error_rate_percent,
                    open: Duration::from_millis(config.breaker_open_ms),
                    close_successes: config.breaker_close_successes,
                },
                options.tls.clone(),
            )
            .map_err(ClusterError::Start)?,
        );
        let raft_config = Arc::new(
            openraft::Config {
                cluster_name: "quiver".into(),
                heartbeat_interval: config.heartbeat_ms,
                election_timeout_min: config.election_timeout_min_ms,
                election_timeout_max: config.election_timeout_max_ms,
                install_snapshot_timeout: config.snapshot_timeout_ms,
                snapshot_policy: SnapshotPolicy::LogsSinceLast(config.snapshot_logs_since),
                max_in_snapshot_log_to_keep: config.logs_kept_after_snapshot,
                // A candidate first asks whether it would win: a node that
                // lost touch (a slow link, a paused process, a sleeping group
                // woken late) cannot raise the term over a live leader.
                enable_pre_vote: Some(true),
                // A restarted leader must win an election again: our state
                // machine is not fsynced (the log is the durable record) and
                // the commit index is not persisted, so a leader restoring
                // itself could serve from a state missing acknowledged writes.
                enable_leader_restore: Some(false),
                // Every group starts asleep; the liveness rounds start its
                // ticker when the pings say so (cluster/hibernate.rs).
                enable_tick: false,
                ..openraft::Config::default()
            }
            .validate()
            .map_err(|e| ClusterError::Start(e.to_string()))?,
        );
        // Splits are rare; a full queue only delays a child to the next map
        // round.
        let (splits, split_events) = tokio::sync::mpsc::channel::<SplitEvent>(SPLIT_EVENTS_MAX);
        let host = GroupHost::new(GroupFactory {
            root: options.data_dir.join(GROUPS_DIR),
            raft_config,
            log_options: LogOptions {
                segment_bytes_max: config.log_segment_bytes_max,
                sync: options.sync_log,
                ..LogOptions::default()
            },
            log_hold_bytes_max: config.log_hold_bytes_max,
            store: options.store,
            observer: options.observer,
            clients: clients.clone(),
            splits,
            hosted: Arc::new(host::HostedLedger::load(
                &options.data_dir.join(GROUPS_DIR),
            )?),
        });
        host.factory.empty_trash();
        // What to open: every replica on disk, and at a first start the ones
        // this node is to create (a crash during an earlier first start may
        // have created some: none of them was ever initialized or voted,
        // since the first start's record is written after all of them).
        let first_start = identity.first_start;
        let mut to_open: BTreeMap<GroupId, (ReplicaId, bool)> = host
            .factory
            .existing(node_id)?
            .into_iter()
            .map(|(group, replica)| (group, (replica, false)))
            .collect();
        if first_start {
            let groups = match &layout {
                Some(layout) => layout.groups_of(node_id),
                None => vec![METADATA_GROUP],
            };
            for group in groups {
                to_open
                    .entry(group)
                    .or_insert((ReplicaId::first(node_id), true));
            }
        }
        let Some((metadata, create)) = to_open.remove(&METADATA_GROUP) else {
            return Err(ClusterError::Start(format!(
                "{} holds no metadata replica: this node's data is lost; start it with an empty \
                 data directory and --join (it gets a new node id)",
                options.data_dir.display()
            )));
        };
        let metadata_state = host
            .open(METADATA_GROUP, metadata, create)
            .await?
            .state
            .clone();
        // The stored map, unless this node joined with a newer one (it was
        // stopped while its metadata replica was still catching up).
        let placement = match metadata_state.cluster_map() {
            Some(map)
                if identity
                    .joined
                    .as_ref()
                    .is_none_or(|j| map.version >= j.version) =>
            {
                Placement::new(map, true)
            }
            _ => Placement::new(Arc::new(seed_map), identity.joined.is_some()),
        };
        // The peers were set from the seed map (the static layout, or the
        // map as of joining): a stored map also names the nodes that joined
        // since, which the replicas opened below must reach at once (the map
        // follower skips a map equal to the one routed by, so it would not).
        if let Err(e) = clients.set_nodes(&peer_routes(&placement, &static_routes)) {
            tracing::warn!(error = %e, "a node address in the cluster map is unusable");
        }
        for (group, (replica, create)) in to_open {
            if placement.map.tombstones.contains(&(group, replica)) {
                if let Err(e) = host.destroy(group, replica).await {
                    tracing::warn!(group, %replica, error = %e, "destroying a removed replica");
                }
                continue;
            }
            host.open(group, replica, create).await?;
        }
        identity::write_node(options.data_dir, node_id)?;
        let cluster = Arc::new(Cluster {
            node_id,
            placement: ArcSwap::from_pointee(placement),
            layout,
            static_routes,
            described_peers,
            self_addrs: (options.self_addr.clone(), options.self_peer_addr.clone()),
            clients,
            host,
            leader_hints: Mutex::new(HashMap::new()),
            request_sequence: router::request_sequence_start(),
            config: config.clone(),
            clock: options.clock,
            liveness: hibernate::Liveness::new(options.ships_log),
            started: tokio::time::Instant::now(),
            stopping: std::sync::atomic::AtomicBool::new(false),
            stall: hibernate::StallWatch::default(),
            operators: operator::Running::default(),
            loads: load::Loads::default(),
            backups: std::sync::OnceLock::new(),
            shard_breakers: shard_breaker::ShardBreakers::new(
                breaker::BreakerRules {
                    window_calls: config.shard_breaker_window_calls,
                    error_rate_percent: config.shard_breaker_error_rate_percent,
                    open: Duration::from_millis(config.shard_breaker_open_ms),
                    close_successes: config.shard_breaker_close_successes,
                },
                Duration::from_millis(config.shard_breaker_slow_call_ms),
            ),
        });
        if first_start {
            cluster.initialize_static().await?;
        }
        tokio::spawn(metadata::follow_map(
            Arc::downgrade(&cluster),
            metadata_state.watch_map(),
        ));
        tokio::spawn(metadata::reconcile_loop(Arc::downgrade(&cluster)));
        tokio::spawn(host_split_children(Arc::downgrade(&cluster), split_events));
        tokio::spawn(metadata::leader_loop(Arc::downgrade(&cluster)));
        tokio::spawn(hibernate::stall_loop(Arc::downgrade(&cluster)));
        tokio::spawn(hibernate::liveness_loop(
            Arc::downgrade(&cluster),
            Duration::from_millis(config.liveness_interval_ms),
        ));
        Ok(cluster)
    }

    /// At a static cluster's first start: initializes the groups whose first
    /// voter (in rendezvous order) is this node. The initializer usually
    /// wins the first election, so this also spreads the first leaders over
    /// the nodes.
    async fn initialize_static(&self) -> Result<(), ClusterError> {
        let Some(layout) = &self.layout else {
            return Ok(());
        };
        for (group, hosted) in self.host.all() {
            let voters = layout.voters(group);
            if voters.first() != Some(&self.node_id) {
                continue;
            }
            let initialized = hosted
                .raft
                .is_initialized()
                .await
                .map_err(|e| ClusterError::Start(e.to_string()))?;
            if initialized {
                continue;
            }
            let members: BTreeMap<ReplicaId, BasicNode> = voters
                .iter()
                .map(|&node| {
                    let addr = layout
                        .map
                        .nodes
                        .get(&node)
                        .map(|info| info.peer_addr.clone())
                        .unwrap_or_default();
                    (ReplicaId::first(node), BasicNode::new(addr))
                })
                .collect();
            if let Err(e) = hosted.raft.initialize(members).await {
                tracing::warn!(group, error = %e, "group initialization refused");
            }
        }
        Ok(())
    }

    /// How this node reaches every member of `placement`'s map.
    pub(super) fn peer_routes(&self, placement: &Placement) -> BTreeMap<NodeId, String> {
        peer_routes(placement, &self.static_routes)
    }

    /// The cluster map as this node routes by it now.
    pub fn placement(&self) -> Arc<Placement> {
        self.placement.load_full()
    }

    /// The peer address of `node` if it is part of the cluster: in the
    /// map, or before the map is stored, in the static description.
    pub fn peer_addr_of(&self, node: NodeId) -> Option<String> {
        let placement = self.placement();
        match placement.node(node) {
            Some(info) if placement.is_member(node) => Some(info.peer_addr.clone()),
            Some(_) => None,
            None => self.described_peers.get(&node).cloned(),
        }
    }

    /// The replica of `group` hosted here, if any.
    pub fn group(&self, group: GroupId) -> Option<Arc<Group>> {
        self.host.get(group)
    }

    /// Every hosted replica, by group.
    pub fn groups(&self) -> Vec<(GroupId, Arc<Group>)> {
        self.host.all()
    }

    /// Status of every hosted group.
    pub fn group_status(&self) -> Vec<pb::GroupStatus> {
        self.host
            .all()
            .into_iter()
            .map(|(group, hosted)| {
                let m = hosted.raft.metrics().borrow_watched().clone();
                let membership = m.membership_config.membership();
                let last_log_index = m.last_log_index.unwrap_or(0);
                let lag = m
                    .replication
                    .as_ref()
                    .map(|replication| {
                        replication
                            .iter()
                            .filter(|(id, _)| **id != hosted.replica)
                            .map(|(id, matched)| pb::ReplicaLag {
                                node_id: id.node(),
                                entries_behind: last_log_index
                                    .saturating_sub(matched.map_or(0, |l| l.index)),
                                replica_id: id.0,
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                pb::GroupStatus {
                    group,
                    role: format!("{:?}", m.state).to_lowercase(),
                    leader_id: m.current_leader.map_or(0, ReplicaId::node),
                    term: m.current_term,
                    applied_index: m.last_applied.map_or(0, |id| id.index),
                    last_log_index,
                    voters: membership.voter_ids().map(ReplicaId::node).collect(),
                    learners: membership.learner_ids().map(ReplicaId::node).collect(),
                    lag,
                    log_bytes: hosted.log.bytes(),
                    rows_estimate: hosted.state.store().stats().rows_estimate,
                    asleep: hosted.pulse.is_asleep(),
                    replica_id: hosted.replica.0,
                    log_holds: hosted.state.log_holds().into_iter().collect(),
                }
            })
            .collect()
    }

    /// Each peer's circuit breaker state now.
    pub fn peer_breakers(&self) -> Vec<(NodeId, breaker::BreakerState)> {
        self.clients.breaker_states()
    }

    /// Admits a client's leader-bound call to `shard` (a write, a `LEADER`
    /// or `STRONG` read) through the shard's circuit breaker: report its
    /// outcome with [`shard_breaker::ShardCall::finish`].
    pub fn shard_call(&self, shard: GroupId) -> Result<shard_breaker::ShardCall, ClusterError> {
        let leader_term = self.host.get(shard).and_then(|hosted| {
            let metrics = hosted.raft.metrics();
            let m = metrics.borrow_watched();
            m.current_leader.map(|_| m.current_term)
        });
        self.shard_breakers.admit(shard, leader_term)
    }

    /// Each shard's breaker state (the metadata group's as shard 0), for
    /// the metrics; shards gone from the map are forgotten.
    pub fn shard_breakers(&self) -> Vec<(GroupId, breaker::BreakerState)> {
        let placement = self.placement();
        self.shard_breakers.states(|shard| {
            shard == quiver_raft::METADATA_GROUP || placement.shard(shard).is_some()
        })
    }

    /// Calls waiting per peer and lane (see `PeerClients::queue_depths`).
    pub fn peer_queue_depths(&self) -> Vec<(NodeId, &'static str, usize)> {
        self.clients.queue_depths()
    }

    /// Whether shutdown has begun (background loops stop).
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Hands the groups this node leads to other voters, then stops every
    /// group's Raft and flushes its store.
    pub async fn shutdown(&self) {
        self.hand_over_all().await;
        self.stopping
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.host.stop_all().await;
    }
}

/// The map's peer addresses, overridden by the static routes for the nodes
/// those name.
fn peer_routes(
    placement: &Placement,
    static_routes: &BTreeMap<NodeId, String>,
) -> BTreeMap<NodeId, String> {
    let mut routes = placement.peer_addrs();
    for (node, addr) in routes.iter_mut() {
        if let Some(route) = static_routes.get(node) {
            addr.clone_from(route);
        }
    }
    routes
}
