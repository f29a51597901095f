//! quiverd's configuration: defaults, then a TOML file, then `QUIVER_*`
//! environment variables, then command-line flags (each overriding the one
//! before). Nested keys in the environment use `__`:
//! `QUIVER_LIMITS__WRITE_ROWS_MAX=500`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

/// The default gRPC port.
pub const DEFAULT_PORT: u16 = 7470;
/// Most shards a cluster may be cut into.
pub const CLUSTER_SHARDS_MAX: u32 = 4096;
/// Top-level keys of [`Config`], the only ones read from `QUIVER_*`.
const CONFIG_KEYS: &[&str] = &[
    "listen_addr",
    "peer_listen_addr",
    "metrics_listen_addr",
    "data_dir",
    "sync_writes",
    "block_cache_bytes",
    "ttl_grace_seconds",
    "ttl_expire_interval_seconds",
    "log_format",
    "shutdown_drain_ms",
    "join",
    "cache",
    "limits",
    "cluster",
    "backup",
    "auth",
    "tls",
];

/// Longest `ttl_expire_interval_seconds`: a day.
pub const TTL_EXPIRE_INTERVAL_SECONDS_MAX: u64 = 86_400;
/// Longest `ttl_grace_seconds`: ten years.
pub const TTL_GRACE_SECONDS_MAX: u64 = 10 * 366 * 86_400;

/// Most nodes in a cluster description.
pub const CLUSTER_NODES_MAX: usize = 1024;

/// Everything quiverd can be told.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// gRPC listen address for clients. Port 0 picks a free port (printed
    /// at start).
    pub listen_addr: SocketAddr,
    /// Listen address of the internal peer service (Raft traffic and
    /// forwarded requests), which the client port does not serve. Unset:
    /// `listen_addr`'s host at its port + 10000 (Redis cluster's bus
    /// convention; on loopback for a one-node cluster), or a free port if
    /// `listen_addr`'s port is 0.
    pub peer_listen_addr: Option<SocketAddr>,
    /// Where Prometheus scrapes `/metrics` (plain HTTP). Unset: no metrics
    /// listener. Port 0 picks a free port (printed at start).
    pub metrics_listen_addr: Option<SocketAddr>,
    /// Where the node keeps its data.
    pub data_dir: PathBuf,
    /// fsync the write-ahead log before acknowledging a write.
    pub sync_writes: bool,
    /// RocksDB block cache.
    pub block_cache_bytes: u64,
    /// How long past its ttl a row still reads as `OUTSIDE_MAX_AGE` (with
    /// its event time) before it expires for good: from then on it reads as
    /// absent and compaction drops it.
    pub ttl_grace_seconds: u64,
    /// How often a shard leader moves its views' expiry floors forward (one
    /// small replicated entry per shard and round); a row stays readable
    /// as `OUTSIDE_MAX_AGE` for up to ttl + grace + this.
    pub ttl_expire_interval_seconds: u64,
    /// `text` or `json` logs (on stderr).
    pub log_format: LogFormat,
    /// On shutdown, how long to wait for in-flight requests and open client
    /// connections before closing them.
    pub shutdown_drain_ms: u64,
    /// The client address (`host:port`) of any member of a running cluster
    /// to join at this node's first start: the cluster gives it a node id
    /// and, once it has caught up, replicas. Ignored once the data directory
    /// has been used (a restarted node is already a member).
    pub join: Option<String>,
    /// The hot row cache.
    pub cache: CacheConfig,
    /// Per-request limits.
    pub limits: Limits,
    /// Replication: the cluster this node belongs to.
    pub cluster: ClusterConfig,
    /// Backups.
    pub backup: BackupConfig,
    /// Client authentication.
    pub auth: AuthConfig,
    /// TLS on every listener and on peer connections.
    pub tls: TlsConfig,
}

/// TLS on the client, peer and metrics ports and on outgoing peer
/// connections (see `tls`). All paths empty: plain TCP everywhere.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// This node's certificate chain (PEM), issued by the cluster CA. It
    /// serves every port and is the node's client certificate towards its
    /// peers, so it must name the host of the node's peer address (and of
    /// its client address, for clients that check it).
    pub cert_path: PathBuf,
    /// The private key of `cert_path` (PEM).
    pub key_path: PathBuf,
    /// The cluster CA (PEM): a peer must present a certificate it issued
    /// that names the host of the peer's address in the cluster map.
    pub ca_path: PathBuf,
    /// The CA of client certificates (PEM). Set: the client and metrics
    /// ports refuse a client without a certificate from it (or from the
    /// cluster CA: nodes call each other's client port to join). Empty:
    /// clients need no certificate.
    pub client_ca_path: PathBuf,
}

impl TlsConfig {
    /// Whether TLS is on.
    pub fn enabled(&self) -> bool {
        !self.cert_path.as_os_str().is_empty()
    }
}

/// Client authentication on the client port (see `client_auth`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Accepted bearer tokens, by sha256, with their scopes. Empty: every
    /// call is let through.
    pub tokens: Vec<crate::client_auth::TokenConfig>,
}

/// Backups to a target directory or object store (`quiverctl backup`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BackupConfig {
    /// Directories a `file://` backup target must lie under (absolute).
    /// Empty: any directory outside this node's data directory. Without
    /// `auth.tokens` anyone reaching the client port may call the admin
    /// service: on a shared machine, restrict targets here.
    pub file_roots: Vec<PathBuf>,
    /// Bytes per second this node reads and uploads checkpoint files at,
    /// all backups together, so serving keeps the disk. 0: unlimited; else
    /// at least 1 MiB/s.
    pub upload_bytes_per_second_max: u64,
    /// How long one shard's checkpoint and upload may take.
    pub shard_timeout_ms: u64,
    /// Where continuous log backup ships every group's change stream
    /// (a target URL, like a backup's); empty: not shipped. Every node of
    /// a cluster must name the same target. Point-in-time restore needs it.
    pub log_url: String,
    /// Between two shipping rounds (each shard's new entries go up as one
    /// chunk per round): the RPO of an active shard.
    pub log_interval_ms: u64,
    /// How often a hibernating (idle) group is woken to move its shipped
    /// log's time forward: how far an idle cluster's restorable time may
    /// lag. At least `log_interval_ms`.
    pub log_idle_interval_ms: u64,
    /// Where scheduled full backups go (empty: none are taken). The node
    /// leading the metadata group takes one when the newest there is
    /// `full_interval_seconds` old, then prunes to `retention_hours`.
    pub schedule_url: String,
    /// Between scheduled full backups.
    pub full_interval_seconds: u64,
    /// What `backup prune` (and a scheduled backup) keeps: every backup
    /// started within this many hours, the newest before them, the newest
    /// of all, and the shipped log they need.
    pub retention_hours: u64,
}

impl Default for BackupConfig {
    fn default() -> Self {
        Self {
            file_roots: Vec::new(),
            upload_bytes_per_second_max: 100 << 20,
            shard_timeout_ms: 3_600_000,
            log_url: String::new(),
            log_interval_ms: 10_000,
            log_idle_interval_ms: 60_000,
            schedule_url: String::new(),
            full_interval_seconds: 86_400,
            retention_hours: 168,
        }
    }
}

/// Shortest `backup.log_interval_ms`.
pub const LOG_INTERVAL_MS_MIN: u64 = 100;
/// Longest `backup.log_interval_ms` (one hour).
pub const LOG_INTERVAL_MS_MAX: u64 = 3_600_000;

/// Shortest `backup.full_interval_seconds`.
pub const FULL_INTERVAL_SECONDS_MIN: u64 = 10;
/// Longest `backup.full_interval_seconds` (a year).
pub const FULL_INTERVAL_SECONDS_MAX: u64 = 366 * 86_400;
/// Longest `backup.retention_hours` (ten years).
pub const RETENTION_HOURS_MAX: u64 = 10 * 366 * 24;

/// One node of the static cluster description.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeAddr {
    /// Node id, unique and non-zero.
    pub id: u64,
    /// Its client address, `host:port` (shown in status).
    pub addr: String,
    /// Its peer address, `host:port`, where the other nodes reach it.
    /// Unset: `addr`'s host at its port + 10000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_addr: Option<String>,
}

/// How far the peer port lies from the client port when it is not given.
pub const PEER_PORT_OFFSET: u16 = 10_000;

/// Longest cluster secret.
pub const CLUSTER_SECRET_BYTES_MAX: usize = 256;

/// `host:port` with the port moved by [`PEER_PORT_OFFSET`], or `None` if
/// the text is not `host:port` or the port would overflow.
pub fn default_peer_addr(addr: &str) -> Option<String> {
    let (host, port) = addr.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    Some(format!("{host}:{}", port.checked_add(PEER_PORT_OFFSET)?))
}

impl NodeAddr {
    /// The peer address: as given, or derived from `addr`.
    pub fn peer_addr(&self) -> Option<String> {
        self.peer_addr
            .clone()
            .or_else(|| default_peer_addr(&self.addr))
    }
}

impl Config {
    /// The peer listener's address: as given, or derived from
    /// `listen_addr` (port 0 stays 0: a free port). A cluster of one node
    /// has no peers: its derived peer listener is on loopback, wherever
    /// its clients are served.
    pub fn peer_listen_addr(&self) -> Result<SocketAddr, ConfigError> {
        if let Some(addr) = self.peer_listen_addr {
            return Ok(addr);
        }
        let mut addr = self.listen_addr;
        if self.cluster.nodes.len() <= 1 && self.join.is_none() {
            addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        if addr.port() != 0 {
            let port = addr.port().checked_add(PEER_PORT_OFFSET).ok_or_else(|| {
                ConfigError(format!(
                    "listen_addr port {} + {PEER_PORT_OFFSET} is not a port: set peer_listen_addr",
                    addr.port()
                ))
            })?;
            addr.set_port(port);
        }
        Ok(addr)
    }
}

/// The cluster description and replication tuning. Every node of a cluster
/// must be given the same `nodes`, `shard_count` and `replication_factor`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// This node's id.
    pub node_id: u64,
    /// Every node of the cluster. Empty: a cluster of this node alone, at
    /// `listen_addr`.
    pub nodes: Vec<NodeAddr>,
    /// Shared by every node: a peer call must carry it or is refused
    /// (`UNAUTHENTICATED`). Printable ASCII, at most 256 bytes. Empty: peers
    /// are not authenticated, which a multi-node cluster whose peer
    /// listener is not on loopback refuses to start with unless
    /// `allow_unauthenticated_peers` says so. Until TLS it crosses the
    /// network in clear: it keeps out clients and strays, not an attacker
    /// on the path.
    pub secret: String,
    /// Also accepted from peers (never sent), for rotating `secret` with
    /// rolling restarts: first every node accepts the new secret here while
    /// sending the old, then every node sends the new with the old here,
    /// then this is emptied. Same rules as `secret`.
    pub previous_secret: String,
    /// Start without a `secret` although peers are reachable beyond
    /// loopback (a trusted private network).
    pub allow_unauthenticated_peers: bool,
    /// How this node reaches some other nodes' peer ports when that is not
    /// the address they are known by (in `nodes` or the cluster map): a
    /// NAT, a proxy per link, a test's link proxies. `id=host:port,...`;
    /// at most [`CLUSTER_NODES_MAX`] entries. Empty (the default): the
    /// known addresses.
    pub peer_routes: String,
    /// Shards a new cluster's key space is cut into (hash arcs); splits
    /// add more. The default, 1, is TiKV's start: every Raft group costs
    /// each write that touches it a round, and each batch read a fan-out,
    /// so a new cluster runs fastest on one and splits when size (or load)
    /// asks (docs/decisions.md). 0: one per node of `nodes`.
    pub shard_count: u32,
    /// Replicas per shard (capped at the number of nodes).
    pub replication_factor: u32,
    /// Voting replicas of the metadata group (the feature-view registry);
    /// every other node follows it as a learner.
    pub metadata_voters: u32,
    /// Leader heartbeat interval.
    pub heartbeat_ms: u64,
    /// A follower that hears nothing for a random time in
    /// `[election_timeout_min_ms, election_timeout_max_ms)` starts an election.
    pub election_timeout_min_ms: u64,
    /// See `election_timeout_min_ms`.
    pub election_timeout_max_ms: u64,
    /// Build a snapshot (and let the log be purged) after this many applied
    /// entries.
    pub snapshot_logs_since: u64,
    /// Entries kept in the log behind a snapshot, so a briefly lagging
    /// follower catches up from the log instead of a snapshot.
    pub logs_kept_after_snapshot: u64,
    /// Size at which a Raft log segment is sealed.
    pub log_segment_bytes_max: u64,
    /// A shard's Raft log keeps the entries its change-stream consumers
    /// (backup shipping) have not confirmed, up to this size; past it they
    /// are purged and such a consumer must restart from a full backup (a
    /// dead consumer cannot fill the disk). At least
    /// `log_segment_bytes_max` (logs are purged a segment at a time).
    pub log_hold_bytes_max: u64,
    /// Deadline of one peer RPC (append, vote, forwarded request).
    pub peer_timeout_ms: u64,
    /// Deadline of one snapshot transfer.
    pub snapshot_timeout_ms: u64,
    /// Bytes per second this node sends snapshots at, all of them together
    /// (a replica move or repair streams a whole shard; serving keeps the
    /// rest of the disk and network). 0: unlimited; else at least 1 MiB/s.
    /// A shard's snapshot must fit in `snapshot_timeout_ms` at this rate.
    pub snapshot_send_bytes_per_second_max: u64,
    /// How many times a request is re-routed after a leader change or an
    /// unreachable replica before it fails with `UNAVAILABLE`.
    pub route_retries_max: u32,
    /// A `REPLICA` read is served by a local follower only if it is at most
    /// this many entries behind its own commit index; else by the leader.
    pub replica_lag_entries_max: u64,
    /// A group whose leader has seen no proposal or read for this long, with
    /// every replica caught up, hibernates: no heartbeats, no timers, until
    /// a request or a missing peer wakes it. 0: never hibernate.
    pub hibernate_after_ms: u64,
    /// How often a node pings every peer (one small call per peer, whatever
    /// the number of groups): node liveness, and the hibernation handshake.
    pub liveness_interval_ms: u64,
    /// A peer not heard from for this long is taken as down: the groups it
    /// led elect a new leader at once (pre-vote first, so a live leader
    /// cannot be deposed by one slow link).
    pub liveness_timeout_ms: u64,
    /// Each peer's circuit breaker keeps the outcomes of this many calls
    /// (0: breakers never open).
    pub breaker_window_calls: u32,
    /// A peer's breaker opens when more than this share (percent) of a
    /// full window failed: reads and writes forwarded to it then fail at
    /// once instead of waiting out `peer_timeout_ms` (Raft traffic always
    /// goes).
    pub breaker_error_rate_percent: u32,
    /// An open breaker is half-open after this long (or once the peer
    /// answers Raft traffic): up to `breaker_close_successes` probe calls
    /// at a time go.
    pub breaker_open_ms: u64,
    /// Successful probes in a row that close a breaker.
    pub breaker_close_successes: u32,
    /// Each shard's circuit breaker (for this node's clients' writes and
    /// `LEADER`/`STRONG` reads) keeps the outcomes of this many calls (0:
    /// shard breakers never open). An open one fails those calls at once:
    /// degraded reads go straight to their fallback.
    pub shard_breaker_window_calls: u32,
    /// A shard's breaker opens when more than this share (percent) of a
    /// full window failed.
    pub shard_breaker_error_rate_percent: u32,
    /// An open shard breaker is half-open after this long: up to
    /// `shard_breaker_close_successes` probe calls at a time go.
    pub shard_breaker_open_ms: u64,
    /// Successful probes in a row that close a shard breaker.
    pub shard_breaker_close_successes: u32,
    /// A call to a shard still without an answer after this long when its
    /// caller gives up counts as a failure (one cut off sooner, by a short
    /// deadline, counts for nothing).
    pub shard_breaker_slow_call_ms: u64,
    /// The metadata leader's scheduler keeps every shard at
    /// `replication_factor` voters on serving nodes and the nodes' replica
    /// counts within one of each other, by starting replica moves, and
    /// splits shards over their size or load limits. Off: only moves and
    /// splits asked for by hand (`quiverctl shard move|split`) happen.
    pub schedule_replicas: bool,
    /// Most operators (replica moves, removals, splits) under way in the
    /// cluster at once (each new replica may need a snapshot).
    pub operators_max: u32,
    /// Replica moves the scheduler starts into or out of any one node per
    /// minute, at most (PD's store limit); 0: no limit. Moves asked for by
    /// hand are not limited.
    pub moves_per_node_per_minute_max: u32,
    /// A new replica that has not caught up with its shard's leader this
    /// long after it was added is removed and its move cancelled.
    pub operator_catch_up_timeout_ms: u64,
    /// A node not heard from for this long has its replicas re-created on
    /// other nodes (it is not removed: if it comes back, its old replicas
    /// are deleted).
    pub replace_down_after_ms: u64,
    /// The scheduler splits a shard whose rows take more than this (its
    /// leader's estimate: table files over its range plus memtables).
    /// 0: never by size; otherwise at least [`SPLIT_SHARD_BYTES_MIN`].
    pub split_shard_bytes_max: u64,
    /// The scheduler splits a shard written at more than this many rows per
    /// second (over a load report interval). 0 (the default): never by
    /// load; a split's new shard is led where its parent was, so this helps
    /// once leaders are balanced afterwards (`balance_leaders`).
    pub split_shard_write_rows_per_second_max: u64,
    /// When replica counts are balanced, the scheduler moves (or swaps)
    /// replicas between the serving node holding the most bytes of shards
    /// (by the leaders' size reports) and the one holding the least while
    /// they differ by more than this and by more than a tenth of the
    /// fuller one's. 0: counts only.
    pub balance_size_gap_bytes_min: u64,
    /// The metadata leader hands shard leadership over, one shard per round,
    /// until every serving node leads within one shard of every other
    /// (where the voters allow it), and moves leadership off draining nodes.
    /// Off: leaders move only by hand (`quiverctl rebalance`,
    /// `shard transfer-leader`) and by elections.
    pub balance_leaders: bool,
    /// How often shard leaders measure their shards' size and write rate
    /// (carried to the scheduler by the liveness pings); at least
    /// `liveness_interval_ms`.
    pub load_report_interval_ms: u64,
}

impl ClusterConfig {
    /// The shards a new cluster starts with: `shard_count`, or one per node
    /// of the description when it is 0.
    pub fn initial_shards(&self) -> u32 {
        if self.shard_count > 0 {
            self.shard_count
        } else {
            u32::try_from(self.nodes.len().max(1)).unwrap_or(CLUSTER_SHARDS_MAX)
        }
    }

    /// `peer_routes` parsed: the peer address to dial per node id.
    pub fn peer_route_overrides(&self) -> Result<BTreeMap<u64, String>, ConfigError> {
        let mut routes = BTreeMap::new();
        for part in self
            .peer_routes
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
        {
            let bad = || ConfigError(format!("cluster.peer_routes: {part:?} is not id=host:port"));
            let (id, addr) = part.split_once('=').ok_or_else(bad)?;
            let (id, addr) = (id.trim(), addr.trim());
            let id: u64 = id.parse().map_err(|_| bad())?;
            if id == 0 || id > quiver_raft::types::NODE_ID_MAX || !is_host_port(addr) {
                return Err(bad());
            }
            if routes.insert(id, addr.to_owned()).is_some() {
                return Err(ConfigError(format!(
                    "cluster.peer_routes: node {id} is named twice"
                )));
            }
            if routes.len() > CLUSTER_NODES_MAX {
                return Err(ConfigError(format!(
                    "cluster.peer_routes: at most {CLUSTER_NODES_MAX} entries"
                )));
            }
        }
        Ok(routes)
    }
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            node_id: 1,
            nodes: Vec::new(),
            secret: String::new(),
            previous_secret: String::new(),
            allow_unauthenticated_peers: false,
            peer_routes: String::new(),
            shard_count: 1,
            replication_factor: 3,
            metadata_voters: 3,
            heartbeat_ms: 100,
            // The leader lease is election_timeout_max_ms: a voter that heard
            // from its leader within it refuses to vote, so it bounds how fast
            // a dead leader can be replaced (about 1.1 s with these values).
            election_timeout_min_ms: 500,
            election_timeout_max_ms: 1000,
            snapshot_logs_since: 20_000,
            logs_kept_after_snapshot: 2_000,
            log_segment_bytes_max: 64 << 20,
            log_hold_bytes_max: 1 << 30,
            peer_timeout_ms: 3_000,
            snapshot_timeout_ms: 300_000,
            // TiKV's default (snap-io-max-bytes-per-sec): a 256 MiB shard
            // (the split size) in under 3 s.
            snapshot_send_bytes_per_second_max: 100 << 20,
            route_retries_max: 12,
            replica_lag_entries_max: 100,
            hibernate_after_ms: 2_000,
            liveness_interval_ms: 200,
            liveness_timeout_ms: 1_000,
            breaker_window_calls: 10,
            breaker_error_rate_percent: 50,
            breaker_open_ms: 2_000,
            breaker_close_successes: 5,
            shard_breaker_window_calls: 10,
            shard_breaker_error_rate_percent: 50,
            // Most shard outages are an election (about a second): probe
            // again soon after one should have ended.
            shard_breaker_open_ms: 1_000,
            shard_breaker_close_successes: 5,
            shard_breaker_slow_call_ms: 1_000,
            schedule_replicas: true,
            operators_max: 4,
            moves_per_node_per_minute_max: 15,
            operator_catch_up_timeout_ms: 600_000,
            replace_down_after_ms: 1_800_000,
            // TiKV's large-region split size.
            split_shard_bytes_max: 256 << 20,
            split_shard_write_rows_per_second_max: 0,
            // Two shards at the split size: a smaller gap is not worth a
            // snapshot's traffic.
            balance_size_gap_bytes_min: 512 << 20,
            load_report_interval_ms: 10_000,
            balance_leaders: true,
        }
    }
}

/// Longest a request may wait for admission (and CoDel's longest interval):
/// a minute.
pub const ADMISSION_WAIT_MS_MAX: u64 = 60_000;

/// Most outcomes a peer's circuit breaker keeps (and most probes it asks
/// to close).
pub const BREAKER_WINDOW_CALLS_MAX: u32 = 10_000;
/// Longest a breaker stays open before a probe: an hour.
pub const BREAKER_OPEN_MS_MAX: u64 = 3_600_000;

/// The smallest `cluster.split_shard_bytes_max` other than 0 (never): an
/// empty replica measures tens of kilobytes (its memtables), which must
/// stay far below the limit.
pub const SPLIT_SHARD_BYTES_MIN: u64 = 1 << 20;

/// The smallest `cluster.snapshot_send_bytes_per_second_max` other than 0
/// (unlimited): slower, a split-sized shard (256 MiB) would not fit in the
/// default snapshot deadline.
pub const SNAPSHOT_SEND_BYTES_PER_SECOND_MIN: u64 = 1 << 20;

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The hot row cache (LRU by weight, entries expire after a time).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheConfig {
    /// Memory bound of the cache; 0 disables it.
    pub bytes_max: u64,
    /// Cached entries older than this are reloaded from storage; 0 = no
    /// expiry (the cache is kept coherent by writes either way).
    pub entry_ttl_ms: u64,
    /// Memory bound of the last rows read from other nodes for shards
    /// this node holds no replica of (a degraded Get's last resort, served
    /// as `STALE`); 0 keeps none.
    pub last_known_bytes_max: u64,
    /// Such a row read longer ago than this is not served; 0 = no bound.
    pub last_known_age_ms_max: u64,
}

/// Limits on what one request may ask. Every limit is checked before any work
/// is done, and a request over a limit is rejected with `INVALID_ARGUMENT`
/// naming the limit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest encoded request message.
    pub request_bytes_max: u64,
    /// Most rows in one Write (or one WriteStream message).
    pub write_rows_max: u64,
    /// Most entity keys in one Get.
    pub get_keys_max: u64,
    /// Most feature references in one Get.
    pub get_feature_refs_max: u64,
    /// Most values (keys x resolved features) one Get may return.
    pub get_values_max: u64,
    /// Largest encoded Get response; a Get that would exceed it fails with
    /// `INVALID_ARGUMENT` naming this limit (ask for fewer keys or features).
    pub get_response_bytes_max: u64,
    /// Largest `max_staleness_ms` a Get may ask for: how stale a follower's
    /// answer a caller may accept when its leader is slow or gone.
    pub replica_staleness_ms_max: u64,
    /// Longest entity key.
    pub entity_key_bytes_max: u64,
    /// Largest single feature value.
    pub value_bytes_max: u64,
    /// How far in the future an event time may be.
    pub event_ts_future_seconds_max: u64,
    /// Most concurrent requests per client connection.
    pub connection_requests_max: u64,
    /// Most rows this node has in flight in writes it coordinates; beyond,
    /// writes wait up to `admission_wait_ms`, then get `RESOURCE_EXHAUSTED`.
    pub write_inflight_rows_max: u64,
    /// Most Gets this node serves at once; beyond, likewise. Admitted Gets
    /// share the node's cores, so each waits for all the others: this bound
    /// over the node's Get rate is the latency of an admitted Get at
    /// overload (Little's law). Default: 16 per core, at least 32 (32 per
    /// node kept it near a few hundred ms at 2x with three nodes on one
    /// core: docs/benchmarks.md).
    pub read_inflight_requests_max: u64,
    /// How long a request over an in-flight bound waits for room before it
    /// is refused, while its queue drains now and then (a burst); the
    /// refusal's retry hint is this long too.
    pub admission_wait_ms: u64,
    /// Once a full queue has not emptied (no request found a free slot)
    /// for `admission_queue_interval_ms`, it is standing (the node is past
    /// capacity): requests wait at most this long (never longer than
    /// `admission_wait_ms`), and writes are refused at once so that reads
    /// go first (CoDel's target).
    pub admission_queue_target_ms: u64,
    /// CoDel's interval: how long a full queue must go without emptying to
    /// count as standing.
    pub admission_queue_interval_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen_addr: SocketAddr::from(([127, 0, 0, 1], DEFAULT_PORT)),
            peer_listen_addr: None,
            metrics_listen_addr: None,
            data_dir: PathBuf::from("quiver-data"),
            sync_writes: true,
            block_cache_bytes: 256 << 20,
            ttl_grace_seconds: 3600,
            ttl_expire_interval_seconds: 300,
            log_format: LogFormat::Text,
            shutdown_drain_ms: 10_000,
            join: None,
            cache: CacheConfig::default(),
            limits: Limits::default(),
            cluster: ClusterConfig::default(),
            backup: BackupConfig::default(),
            auth: AuthConfig::default(),
            tls: TlsConfig::default(),
        }
    }
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            bytes_max: 128 << 20,
            entry_ttl_ms: 0,
            last_known_bytes_max: 32 << 20,
            last_known_age_ms_max: 3_600_000,
        }
    }
}

/// Gets in flight per core by default.
const READ_INFLIGHT_PER_CORE: u64 = 16;
/// The fewest Gets in flight by default, whatever the cores.
const READ_INFLIGHT_MIN: u64 = 32;

/// The default bound on Gets in flight: [`READ_INFLIGHT_PER_CORE`] per
/// core, at least [`READ_INFLIGHT_MIN`]. Admitted Gets also wait on peers
/// (forwarded reads), so a bound near the core count would leave cores
/// idle while a peer answers.
fn read_inflight_default() -> u64 {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get() as u64);
    (cores * READ_INFLIGHT_PER_CORE).max(READ_INFLIGHT_MIN)
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            request_bytes_max: 16 << 20,
            write_rows_max: 10_000,
            get_keys_max: 10_000,
            get_feature_refs_max: 1_000,
            get_values_max: 1_000_000,
            get_response_bytes_max: 64 << 20,
            replica_staleness_ms_max: 300_000,
            entity_key_bytes_max: 512,
            value_bytes_max: 1 << 20,
            event_ts_future_seconds_max: 24 * 3600,
            connection_requests_max: 256,
            // About a second of RF 3 ingest on a small machine: a deeper
            // queue only adds latency until commits miss their deadlines.
            write_inflight_rows_max: 20_000,
            read_inflight_requests_max: read_inflight_default(),
            admission_wait_ms: 200,
            // CoDel's interval; a target of about one serving request's time.
            admission_queue_target_ms: 10,
            admission_queue_interval_ms: 100,
        }
    }
}

/// Command-line flags; each overrides the file and the environment.
#[derive(Debug, Default, clap::Parser, Serialize)]
#[command(
    name = "quiverd",
    version,
    about = "Quiver online feature store server"
)]
pub struct Flags {
    /// TOML config file (also QUIVER_CONFIG).
    #[arg(long, env = "QUIVER_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// gRPC listen address [default: 127.0.0.1:7470].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen_addr: Option<SocketAddr>,
    /// Peer listen address [default: the listen port + 10000].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer_listen_addr: Option<SocketAddr>,
    /// Prometheus `/metrics` listen address [default: none].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_listen_addr: Option<SocketAddr>,
    /// Data directory [default: ./quiver-data].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    /// fsync each write before acknowledging it [default: true].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sync_writes: Option<bool>,
    /// Log format: text or json.
    #[arg(long, value_parser = ["text", "json"])]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_format: Option<String>,
    /// Hot cache memory bound in bytes; 0 disables the cache.
    #[arg(long)]
    #[serde(skip)]
    pub cache_bytes_max: Option<u64>,
    /// How long shutdown waits for in-flight requests and open connections.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shutdown_drain_ms: Option<u64>,
    /// This node's id in the cluster [default: 1].
    #[arg(long)]
    #[serde(skip)]
    pub node_id: Option<u64>,
    /// Every node of the cluster: `1=host:port,2=host:port,...`, each
    /// optionally with its peer address: `1=host:port/host:peerport`.
    #[arg(long, value_parser = parse_nodes)]
    #[serde(skip)]
    pub cluster_nodes: Option<NodeList>,
    /// Shards of a new cluster's key space [default: 1; 0: one per node].
    #[arg(long)]
    #[serde(skip)]
    pub shard_count: Option<u32>,
    /// Replicas per shard [default: 3].
    #[arg(long)]
    #[serde(skip)]
    pub replication_factor: Option<u32>,
    /// Join the running cluster that the node at this client address
    /// (`host:port`) belongs to, at this node's first start.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub join: Option<String>,
}

/// Whether `addr` is `host:port` a peer can be dialled at: a host (a name,
/// an IPv4 address or a bracketed IPv6 one) and a nonzero port, nothing a
/// URI refuses, and at most `NODE_ADDR_BYTES_MAX` bytes.
fn is_host_port(addr: &str) -> bool {
    let Some((host, port)) = addr.rsplit_once(':') else {
        return false;
    };
    let bracketed = host.starts_with('[') == host.ends_with(']');
    addr.len() <= quiver_raft::cluster_map::NODE_ADDR_BYTES_MAX
        && !host.is_empty()
        && bracketed
        && !host.contains(['/', '?', '#', '@'])
        && !addr.chars().any(|c| c.is_whitespace() || c.is_control())
        && port.parse::<u16>().is_ok_and(|p| p != 0)
        && tonic::transport::Endpoint::from_shared(format!("http://{addr}")).is_ok()
}

/// A parsed `--cluster-nodes` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeList(pub Vec<NodeAddr>);

fn parse_nodes(text: &str) -> Result<NodeList, String> {
    let mut nodes = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, addrs) = part
            .split_once('=')
            .ok_or_else(|| format!("{part:?} is not id=host:port[/host:peerport]"))?;
        let id: u64 = id
            .trim()
            .parse()
            .map_err(|_| format!("node id {id:?} is not a number"))?;
        let (addr, peer_addr) = match addrs.split_once('/') {
            Some((addr, peer)) => (addr, Some(peer.trim().to_owned())),
            None => (addrs, None),
        };
        nodes.push(NodeAddr {
            id,
            addr: addr.trim().to_owned(),
            peer_addr,
        });
    }
    Ok(NodeList(nodes))
}

/// A configuration that cannot be loaded.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(String);

impl Config {
    /// Loads the configuration: defaults < file < environment < flags.
    pub fn load(flags: &Flags) -> Result<Config, ConfigError> {
        Self::load_from(
            flags,
            Env::prefixed("QUIVER_")
                // Only keys of this config: QUIVER_CONFIG, QUIVER_LOG,
                // QUIVER_ENDPOINT and scripts' own QUIVER_* variables are
                // someone else's. Nested keys stay strict (a typo in
                // QUIVER_LIMITS__... is an error).
                .filter(|key| {
                    let key = key.as_str();
                    CONFIG_KEYS.iter().any(|k| {
                        key.eq_ignore_ascii_case(k)
                            || key
                                .get(..k.len() + 2)
                                .is_some_and(|p| p.eq_ignore_ascii_case(&format!("{k}__")))
                    })
                })
                .split("__"),
        )
    }

    fn load_from(flags: &Flags, env: Env) -> Result<Config, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = &flags.config {
            if !path.is_file() {
                return Err(ConfigError(format!(
                    "config file {} does not exist",
                    path.display()
                )));
            }
            figment = figment.merge(Toml::file(path));
        }
        figment = figment.merge(env).merge(Serialized::defaults(flags));
        if let Some(bytes) = flags.cache_bytes_max {
            figment = figment.merge(Serialized::default("cache.bytes_max", bytes));
        }
        if let Some(id) = flags.node_id {
            figment = figment.merge(Serialized::default("cluster.node_id", id));
        }
        if let Some(NodeList(nodes)) = &flags.cluster_nodes {
            figment = figment.merge(Serialized::default("cluster.nodes", nodes));
        }
        if let Some(count) = flags.shard_count {
            figment = figment.merge(Serialized::default("cluster.shard_count", count));
        }
        if let Some(factor) = flags.replication_factor {
            figment = figment.merge(Serialized::default("cluster.replication_factor", factor));
        }
        let config: Config = figment.extract().map_err(|e| ConfigError(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let l = &self.limits;
        let nonzero = [
            ("limits.request_bytes_max", l.request_bytes_max),
            ("limits.write_rows_max", l.write_rows_max),
            ("limits.get_keys_max", l.get_keys_max),
            ("limits.get_feature_refs_max", l.get_feature_refs_max),
            ("limits.get_values_max", l.get_values_max),
            ("limits.get_response_bytes_max", l.get_response_bytes_max),
            (
                "limits.replica_staleness_ms_max",
                l.replica_staleness_ms_max,
            ),
            ("limits.entity_key_bytes_max", l.entity_key_bytes_max),
            ("limits.value_bytes_max", l.value_bytes_max),
            ("limits.connection_requests_max", l.connection_requests_max),
            ("limits.write_inflight_rows_max", l.write_inflight_rows_max),
            (
                "limits.read_inflight_requests_max",
                l.read_inflight_requests_max,
            ),
        ];
        for (name, value) in nonzero {
            if value == 0 {
                return Err(ConfigError(format!("{name} must be positive")));
            }
        }
        if l.admission_wait_ms > ADMISSION_WAIT_MS_MAX
            || l.admission_queue_target_ms > ADMISSION_WAIT_MS_MAX
            || !(1..=ADMISSION_WAIT_MS_MAX).contains(&l.admission_queue_interval_ms)
        {
            return Err(ConfigError(format!(
                "limits.admission_wait_ms and limits.admission_queue_target_ms must be at most \
                 {ADMISSION_WAIT_MS_MAX}, limits.admission_queue_interval_ms 1 to \
                 {ADMISSION_WAIT_MS_MAX}"
            )));
        }
        if !(1..=TTL_EXPIRE_INTERVAL_SECONDS_MAX).contains(&self.ttl_expire_interval_seconds) {
            return Err(ConfigError(format!(
                "ttl_expire_interval_seconds must be 1..={TTL_EXPIRE_INTERVAL_SECONDS_MAX}"
            )));
        }
        if self.ttl_grace_seconds > TTL_GRACE_SECONDS_MAX {
            return Err(ConfigError(format!(
                "ttl_grace_seconds must be at most {TTL_GRACE_SECONDS_MAX} (10 years)"
            )));
        }
        if l.request_bytes_max > u64::from(u32::MAX) {
            return Err(ConfigError(
                "limits.request_bytes_max must be below 4 GiB".into(),
            ));
        }
        if let Some(metrics) = self.metrics_listen_addr
            && metrics.port() != 0
        {
            let peer = self.peer_listen_addr()?;
            // The same port on overlapping addresses (an unspecified one
            // overlaps every other) cannot be bound twice.
            let clashes = |other: SocketAddr| {
                other.port() == metrics.port()
                    && (other.ip() == metrics.ip()
                        || other.ip().is_unspecified()
                        || metrics.ip().is_unspecified())
            };
            if clashes(self.listen_addr) || clashes(peer) {
                return Err(ConfigError(format!(
                    "metrics_listen_addr {metrics} is also the client or the peer listen address"
                )));
            }
        }
        crate::client_auth::Tokens::new(&self.auth.tokens).map_err(ConfigError)?;
        let t = &self.tls;
        let set = [&t.cert_path, &t.key_path, &t.ca_path].map(|p| !p.as_os_str().is_empty());
        if set.iter().any(|s| *s) && !set.iter().all(|s| *s) {
            return Err(ConfigError(
                "tls.cert_path, tls.key_path and tls.ca_path are set together or not at all".into(),
            ));
        }
        if !t.enabled() && !t.client_ca_path.as_os_str().is_empty() {
            return Err(ConfigError(
                "tls.client_ca_path needs tls.cert_path, tls.key_path and tls.ca_path".into(),
            ));
        }
        let b = &self.backup;
        if b.upload_bytes_per_second_max != 0
            && b.upload_bytes_per_second_max < SNAPSHOT_SEND_BYTES_PER_SECOND_MIN
        {
            return Err(ConfigError(format!(
                "backup.upload_bytes_per_second_max must be 0 (unlimited) or at least \
                 {SNAPSHOT_SEND_BYTES_PER_SECOND_MIN}"
            )));
        }
        if b.shard_timeout_ms < 1000 {
            return Err(ConfigError(
                "backup.shard_timeout_ms must be at least 1000".into(),
            ));
        }
        if !(LOG_INTERVAL_MS_MIN..=LOG_INTERVAL_MS_MAX).contains(&b.log_interval_ms) {
            return Err(ConfigError(format!(
                "backup.log_interval_ms must be {LOG_INTERVAL_MS_MIN} to {LOG_INTERVAL_MS_MAX}"
            )));
        }
        if !(b.log_interval_ms..=LOG_INTERVAL_MS_MAX).contains(&b.log_idle_interval_ms) {
            return Err(ConfigError(format!(
                "backup.log_idle_interval_ms must be backup.log_interval_ms to \
                 {LOG_INTERVAL_MS_MAX}"
            )));
        }
        for (name, url) in [("log_url", &b.log_url), ("schedule_url", &b.schedule_url)] {
            if url.len() > crate::backup::target::BACKUP_URL_BYTES_MAX {
                return Err(ConfigError(format!(
                    "backup.{name} is longer than {} bytes",
                    crate::backup::target::BACKUP_URL_BYTES_MAX
                )));
            }
        }
        if !(FULL_INTERVAL_SECONDS_MIN..=FULL_INTERVAL_SECONDS_MAX)
            .contains(&b.full_interval_seconds)
        {
            return Err(ConfigError(format!(
                "backup.full_interval_seconds must be {FULL_INTERVAL_SECONDS_MIN} to \
                 {FULL_INTERVAL_SECONDS_MAX}"
            )));
        }
        if !(1..=RETENTION_HOURS_MAX).contains(&b.retention_hours) {
            return Err(ConfigError(format!(
                "backup.retention_hours must be 1 to {RETENTION_HOURS_MAX}"
            )));
        }
        if let Some(relative) = b.file_roots.iter().find(|root| !root.is_absolute()) {
            return Err(ConfigError(format!(
                "backup.file_roots must be absolute paths, not {}",
                relative.display()
            )));
        }
        self.validate_cluster()
    }

    fn validate_cluster(&self) -> Result<(), ConfigError> {
        let c = &self.cluster;
        if c.node_id == 0 {
            return Err(ConfigError("cluster.node_id must be positive".into()));
        }
        if c.shard_count > CLUSTER_SHARDS_MAX || c.nodes.len() > CLUSTER_SHARDS_MAX as usize {
            return Err(ConfigError(format!(
                "cluster.shard_count (0: one per node) and the number of cluster.nodes \
                 must be at most {CLUSTER_SHARDS_MAX}"
            )));
        }
        if c.replication_factor == 0 || c.metadata_voters == 0 {
            return Err(ConfigError(
                "cluster.replication_factor and cluster.metadata_voters must be positive".into(),
            ));
        }
        if c.heartbeat_ms == 0 || c.election_timeout_min_ms <= c.heartbeat_ms {
            return Err(ConfigError(
                "cluster.election_timeout_min_ms must exceed cluster.heartbeat_ms (> 0)".into(),
            ));
        }
        if c.election_timeout_max_ms <= c.election_timeout_min_ms {
            return Err(ConfigError(
                "cluster.election_timeout_max_ms must exceed cluster.election_timeout_min_ms"
                    .into(),
            ));
        }
        if c.liveness_interval_ms == 0 || c.liveness_timeout_ms < 2 * c.liveness_interval_ms {
            return Err(ConfigError(
                "cluster.liveness_timeout_ms must be at least twice cluster.liveness_interval_ms (> 0)"
                    .into(),
            ));
        }
        if c.hibernate_after_ms != 0 && c.hibernate_after_ms < c.election_timeout_max_ms {
            return Err(ConfigError(
                "cluster.hibernate_after_ms must be 0 (never) or at least cluster.election_timeout_max_ms"
                    .into(),
            ));
        }
        if c.snapshot_logs_since == 0 || c.peer_timeout_ms == 0 || c.log_segment_bytes_max < 4096 {
            return Err(ConfigError(
                "cluster.snapshot_logs_since and cluster.peer_timeout_ms must be positive, cluster.log_segment_bytes_max at least 4096".into(),
            ));
        }
        for (prefix, window, rate, open, close) in [
            (
                "breaker",
                c.breaker_window_calls,
                c.breaker_error_rate_percent,
                c.breaker_open_ms,
                c.breaker_close_successes,
            ),
            (
                "shard_breaker",
                c.shard_breaker_window_calls,
                c.shard_breaker_error_rate_percent,
                c.shard_breaker_open_ms,
                c.shard_breaker_close_successes,
            ),
        ] {
            if window > BREAKER_WINDOW_CALLS_MAX
                || !(1..=100).contains(&rate)
                || !(1..=BREAKER_OPEN_MS_MAX).contains(&open)
                || !(1..=BREAKER_WINDOW_CALLS_MAX).contains(&close)
            {
                return Err(ConfigError(format!(
                    "cluster.{prefix}_window_calls must be at most {BREAKER_WINDOW_CALLS_MAX}, \
                     {prefix}_error_rate_percent 1 to 100, {prefix}_open_ms 1 to \
                     {BREAKER_OPEN_MS_MAX}, {prefix}_close_successes 1 to {BREAKER_WINDOW_CALLS_MAX}"
                )));
            }
        }
        if !(1..=BREAKER_OPEN_MS_MAX).contains(&c.shard_breaker_slow_call_ms) {
            return Err(ConfigError(format!(
                "cluster.shard_breaker_slow_call_ms must be 1 to {BREAKER_OPEN_MS_MAX}"
            )));
        }
        if c.log_hold_bytes_max < c.log_segment_bytes_max {
            return Err(ConfigError(
                "cluster.log_hold_bytes_max must be at least cluster.log_segment_bytes_max \
                 (logs are purged a segment at a time)"
                    .into(),
            ));
        }
        if c.operators_max == 0
            || c.load_report_interval_ms == 0
            || c.operator_catch_up_timeout_ms == 0
            || c.replace_down_after_ms < c.liveness_timeout_ms
        {
            return Err(ConfigError(
                "cluster.operators_max, cluster.load_report_interval_ms and \
                 cluster.operator_catch_up_timeout_ms must be positive, \
                 cluster.replace_down_after_ms at least cluster.liveness_timeout_ms"
                    .into(),
            ));
        }
        if c.split_shard_bytes_max != 0 && c.split_shard_bytes_max < SPLIT_SHARD_BYTES_MIN {
            return Err(ConfigError(format!(
                "cluster.split_shard_bytes_max must be 0 (never split by size) or at least \
                 {SPLIT_SHARD_BYTES_MIN}: below that a store's fixed overhead would split shards \
                 that hold nothing"
            )));
        }
        if c.snapshot_send_bytes_per_second_max != 0
            && c.snapshot_send_bytes_per_second_max < SNAPSHOT_SEND_BYTES_PER_SECOND_MIN
        {
            return Err(ConfigError(format!(
                "cluster.snapshot_send_bytes_per_second_max must be 0 (unlimited) or at least \
                 {SNAPSHOT_SEND_BYTES_PER_SECOND_MIN}"
            )));
        }
        if c.load_report_interval_ms < c.liveness_interval_ms {
            return Err(ConfigError(
                "cluster.load_report_interval_ms must be at least cluster.liveness_interval_ms \
                 (the pings carry the reports)"
                    .into(),
            ));
        }
        if let Some(join) = &self.join
            && (join.is_empty() || !join.contains(':') || join.len() > 256)
        {
            return Err(ConfigError(format!("join {join:?} is not host:port")));
        }
        if self.join.is_some() && !c.nodes.is_empty() {
            return Err(ConfigError(
                "join and cluster.nodes exclude each other: a joining node learns the cluster \
                 from the member it joins through"
                    .into(),
            ));
        }
        if c.nodes.len() > CLUSTER_NODES_MAX {
            return Err(ConfigError(format!(
                "at most {CLUSTER_NODES_MAX} cluster.nodes"
            )));
        }
        // (A joining node learns its id when it joins: checked then.)
        let routes = c.peer_route_overrides()?;
        if self.join.is_none() && routes.contains_key(&c.node_id) {
            return Err(ConfigError(format!(
                "cluster.peer_routes names this node ({}): it does not dial itself",
                c.node_id
            )));
        }
        let peer_listen = self.peer_listen_addr()?;
        let client_addrs: std::collections::HashSet<&str> =
            c.nodes.iter().map(|node| node.addr.as_str()).collect();
        let mut ids = std::collections::HashSet::new();
        for node in &c.nodes {
            if node.id == 0 || !ids.insert(node.id) {
                return Err(ConfigError(format!(
                    "cluster.nodes: node id {} is zero or repeated",
                    node.id
                )));
            }
            if node.addr.is_empty() || !node.addr.contains(':') {
                return Err(ConfigError(format!(
                    "cluster.nodes: node {} address {:?} is not host:port",
                    node.id, node.addr
                )));
            }
            let peer = match node.peer_addr() {
                Some(peer) if !peer.is_empty() && peer.contains(':') => peer,
                _ => {
                    return Err(ConfigError(format!(
                        "cluster.nodes: node {} has no usable peer address (give peer_addr, host:port)",
                        node.id
                    )));
                }
            };
            if client_addrs.contains(peer.as_str()) {
                return Err(ConfigError(format!(
                    "cluster.nodes: node {}'s peer address {peer} is a client address",
                    node.id
                )));
            }
            // This node's own entry must name the port it listens on for
            // peers, or no peer ever reaches it.
            if node.id == c.node_id && peer_listen.port() != 0 {
                let port = peer
                    .rsplit_once(':')
                    .and_then(|(_, p)| p.parse::<u16>().ok());
                if port != Some(peer_listen.port()) {
                    return Err(ConfigError(format!(
                        "cluster.nodes: this node's peer address {peer} does not match peer_listen_addr {peer_listen}"
                    )));
                }
            }
        }
        for (name, secret) in [
            ("cluster.secret", &c.secret),
            ("cluster.previous_secret", &c.previous_secret),
        ] {
            if secret.len() > CLUSTER_SECRET_BYTES_MAX
                || !secret.bytes().all(|b| b.is_ascii_graphic())
            {
                return Err(ConfigError(format!(
                    "{name} must be printable ASCII without spaces, at most {CLUSTER_SECRET_BYTES_MAX} bytes"
                )));
            }
        }
        // Whatever reaches the peer port can propose around every schema
        // check: beyond loopback it must be authenticated, by the secret or
        // by peer TLS (certificates from the cluster CA).
        if c.secret.is_empty()
            && !c.allow_unauthenticated_peers
            && !self.tls.enabled()
            && !peer_listen.ip().is_loopback()
        {
            return Err(ConfigError(format!(
                "cluster.secret is empty and the peer listener {peer_listen} is not on loopback: \
                 set cluster.secret (the same on every node), or tls, or cluster.allow_unauthenticated_peers = true"
            )));
        }
        if !c.nodes.is_empty() && !ids.contains(&c.node_id) {
            return Err(ConfigError(format!(
                "cluster.node_id {} is not one of cluster.nodes",
                c.node_id
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
// figment's Jail API returns its large error type; not ours to shrink.
#[allow(clippy::result_large_err)]
mod tests {
    #[test]
    fn every_top_level_key_can_come_from_the_environment() {
        let config = serde_json::to_value(Config::default()).unwrap();
        let mut keys: Vec<&str> = config
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort_unstable();
        let mut listed = CONFIG_KEYS.to_vec();
        listed.sort_unstable();
        assert_eq!(keys, listed);
    }

    use super::*;
    use clap::Parser;

    #[test]
    fn layers_override_in_order() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "quiver.toml",
                "data_dir = \"/from/file\"\nsync_writes = false\n[limits]\nwrite_rows_max = 7\n[cache]\nbytes_max = 5\n",
            )?;
            jail.set_env("QUIVER_DATA_DIR", "/from/env");
            jail.set_env("QUIVER_LIMITS__GET_KEYS_MAX", "9");
            jail.set_env("QUIVER_CLUSTER__SHARD_COUNT", "4");
            // Other tools' variables are not ours to reject.
            jail.set_env("QUIVER_CLUSTER_DIR", "/elsewhere");
            jail.set_env("QUIVER_ENDPOINT", "127.0.0.1:1");
            let flags = Flags::parse_from([
                "quiverd",
                "--config",
                "quiver.toml",
                "--cache-bytes-max",
                "0",
            ]);
            let config = Config::load(&flags).expect("loads");
            assert_eq!(config.data_dir, PathBuf::from("/from/env"));
            assert!(!config.sync_writes);
            assert_eq!(config.limits.write_rows_max, 7);
            assert_eq!(config.limits.get_keys_max, 9);
            assert_eq!(config.cluster.shard_count, 4);
            assert_eq!(config.cache.bytes_max, 0);

            let flags = Flags::parse_from([
                "quiverd",
                "--config",
                "quiver.toml",
                "--data-dir",
                "/from/flag",
            ]);
            assert_eq!(
                Config::load(&flags).expect("loads").data_dir,
                PathBuf::from("/from/flag")
            );
            Ok(())
        });
    }

    #[test]
    fn bad_config_is_a_clear_error() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("bad.toml", "no_such_key = 1\n")?;
            let flags = Flags::parse_from(["quiverd", "--config", "bad.toml"]);
            let err = Config::load(&flags).unwrap_err().to_string();
            assert!(err.contains("no_such_key"), "{err}");
            jail.create_file("zero.toml", "[limits]\nwrite_rows_max = 0\n")?;
            let flags = Flags::parse_from(["quiverd", "--config", "zero.toml"]);
            assert!(
                Config::load(&flags)
                    .unwrap_err()
                    .to_string()
                    .contains("write_rows_max")
            );
            let flags = Flags::parse_from(["quiverd", "--config", "missing.toml"]);
            assert!(Config::load(&flags).is_err());
            // A size limit so small that empty shards would split forever.
            jail.create_file("tiny.toml", "[cluster]\nsplit_shard_bytes_max = 1000\n")?;
            let flags = Flags::parse_from(["quiverd", "--config", "tiny.toml"]);
            let err = Config::load(&flags).unwrap_err().to_string();
            assert!(err.contains("split_shard_bytes_max"), "{err}");
            jail.create_file(
                "trickle.toml",
                "[cluster]\nsnapshot_send_bytes_per_second_max = 1000\n",
            )?;
            let flags = Flags::parse_from(["quiverd", "--config", "trickle.toml"]);
            let err = Config::load(&flags).unwrap_err().to_string();
            assert!(err.contains("snapshot_send_bytes_per_second_max"), "{err}");
            jail.create_file("hold.toml", "[cluster]\nlog_hold_bytes_max = 4096\n")?;
            let flags = Flags::parse_from(["quiverd", "--config", "hold.toml"]);
            let err = Config::load(&flags).unwrap_err().to_string();
            assert!(err.contains("log_hold_bytes_max"), "{err}");
            jail.create_file(
                "fast.toml",
                "[cluster]\nload_report_interval_ms = 50\nliveness_interval_ms = 200\n",
            )?;
            let flags = Flags::parse_from(["quiverd", "--config", "fast.toml"]);
            let err = Config::load(&flags).unwrap_err().to_string();
            assert!(err.contains("load_report_interval_ms"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn peer_routes_override_addresses_and_bad_ones_are_refused() {
        figment::Jail::expect_with(|jail| {
            jail.set_env(
                "QUIVER_CLUSTER__PEER_ROUTES",
                " 4=127.0.0.1:7004 , 5=proxy.internal:7005,",
            );
            let flags = Flags::parse_from(["quiverd"]);
            let config = Config::load(&flags).expect("loads");
            let routes = config.cluster.peer_route_overrides().expect("parses");
            assert_eq!(
                routes.into_iter().collect::<Vec<_>>(),
                vec![
                    (4, "127.0.0.1:7004".to_owned()),
                    (5, "proxy.internal:7005".to_owned())
                ]
            );
            for bad in [
                "node4",
                "x=127.0.0.1:1",
                "0=127.0.0.1:1",
                "4294967296=127.0.0.1:1",
                "4=nohost",
                "4=host:abc",
                "4=host:0",
                "4=:7000",
                "4=[::1:7000",
                "4=a b:7000",
                "4=h/x:7000",
                "4=127.0.0.1:1,4=127.0.0.1:2",
                // This node (1) itself.
                "1=127.0.0.1:1",
            ] {
                jail.set_env("QUIVER_CLUSTER__PEER_ROUTES", bad);
                let err = Config::load(&Flags::parse_from(["quiverd"]))
                    .unwrap_err()
                    .to_string();
                assert!(err.contains("cluster.peer_routes"), "{bad}: {err}");
            }
            // A joining node learns its id later: its own id is checked then.
            jail.set_env("QUIVER_CLUSTER__PEER_ROUTES", "1=127.0.0.1:1");
            let joining = Flags::parse_from(["quiverd", "--join", "127.0.0.1:7000"]);
            assert!(Config::load(&joining).is_ok());
            Ok(())
        });
    }

    #[test]
    fn overload_breaker_and_fallback_settings_load_and_are_checked() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "q.toml",
                "[cluster]\nshard_breaker_window_calls = 20\nshard_breaker_error_rate_percent = 75\n\
                 shard_breaker_open_ms = 2500\nshard_breaker_close_successes = 3\n\
                 shard_breaker_slow_call_ms = 400\n\
                 [limits]\nadmission_queue_target_ms = 5\n\
                 [cache]\nlast_known_bytes_max = 0\nlast_known_age_ms_max = 60000\n",
            )?;
            jail.set_env("QUIVER_LIMITS__ADMISSION_QUEUE_INTERVAL_MS", "250");
            let flags = Flags::parse_from(["quiverd", "--config", "q.toml"]);
            let config = Config::load(&flags).expect("loads");
            let c = &config.cluster;
            assert_eq!(
                (
                    c.shard_breaker_window_calls,
                    c.shard_breaker_error_rate_percent,
                    c.shard_breaker_open_ms,
                    c.shard_breaker_close_successes,
                    c.shard_breaker_slow_call_ms,
                ),
                (20, 75, 2500, 3, 400)
            );
            assert_eq!(config.limits.admission_queue_target_ms, 5);
            assert_eq!(config.limits.admission_queue_interval_ms, 250);
            assert_eq!(config.cache.last_known_bytes_max, 0);
            assert_eq!(config.cache.last_known_age_ms_max, 60_000);
            // The environment would override the files below.
            jail.clear_env();
            for (bad, named) in [
                (
                    "[cluster]\nshard_breaker_error_rate_percent = 101\n",
                    "shard_breaker_error_rate_percent",
                ),
                (
                    "[cluster]\nshard_breaker_close_successes = 0\n",
                    "shard_breaker_close_successes",
                ),
                (
                    "[cluster]\nshard_breaker_slow_call_ms = 0\n",
                    "shard_breaker_slow_call_ms",
                ),
                (
                    "[limits]\nadmission_queue_interval_ms = 0\n",
                    "admission_queue_interval_ms",
                ),
                (
                    "[limits]\nadmission_queue_target_ms = 99999999\n",
                    "admission_queue_target_ms",
                ),
                ("[cache]\nlast_known_bytes = 1\n", "last_known_bytes"),
            ] {
                jail.create_file("bad.toml", bad)?;
                let flags = Flags::parse_from(["quiverd", "--config", "bad.toml"]);
                let err = Config::load(&flags).unwrap_err().to_string();
                assert!(err.contains(named), "{bad}: {err}");
            }
            Ok(())
        });
    }

    #[test]
    fn the_metrics_listener_has_its_own_port() {
        let load = |args: &[&str]| {
            let flags = Flags::parse_from(args);
            Config::load_from(&flags, Env::prefixed("QUIVER_TEST_NOTHING_"))
        };
        let config = load(&["quiverd", "--metrics-listen-addr", "127.0.0.1:9470"]).unwrap();
        assert_eq!(
            config.metrics_listen_addr,
            Some("127.0.0.1:9470".parse().unwrap())
        );
        for taken in ["127.0.0.1:7470", "127.0.0.1:17470", "0.0.0.0:7470"] {
            let err = load(&["quiverd", "--metrics-listen-addr", taken])
                .unwrap_err()
                .to_string();
            assert!(err.contains("metrics_listen_addr"), "{err}");
        }
    }

    #[test]
    fn no_flags_means_defaults() {
        let config = Config::load_from(&Flags::default(), Env::prefixed("QUIVER_TEST_NOTHING_"))
            .expect("defaults load");
        assert_eq!(config, Config::default());
    }

    #[test]
    fn peer_addresses_are_given_or_the_client_port_plus_ten_thousand() {
        let args = |node: &'static str, listen: &'static str, peer: Option<&'static str>| {
            let mut args = vec![
                "quiverd",
                "--node-id",
                node,
                "--cluster-nodes",
                "1=10.0.0.1:7470,2=10.0.0.2:7470/10.0.9.2:9000",
                "--listen-addr",
                listen,
            ];
            if let Some(peer) = peer {
                args.extend(["--peer-listen-addr", peer]);
            }
            Flags::parse_from(args)
        };
        let mut config = Config::default();
        figment::Jail::expect_with(|jail| {
            jail.set_env("QUIVER_CLUSTER__SECRET", "s3cret");
            config = Config::load(&args("1", "10.0.0.1:7470", None)).expect("loads");
            // Node 2's own entry names peer port 9000: it must listen there.
            let err = Config::load(&args("2", "10.0.0.2:7470", None))
                .unwrap_err()
                .to_string();
            assert!(err.contains("does not match peer_listen_addr"), "{err}");
            Config::load(&args("2", "10.0.0.2:7470", Some("0.0.0.0:9000"))).expect("loads");
            Ok(())
        });
        // Beyond loopback, peers must authenticate unless told otherwise.
        let err = Config::load_from(
            &args("1", "10.0.0.1:7470", None),
            Env::prefixed("QUIVER_TEST_NOTHING_"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("cluster.secret is empty"), "{err}");
        let peers: Vec<Option<String>> = config
            .cluster
            .nodes
            .iter()
            .map(NodeAddr::peer_addr)
            .collect();
        assert_eq!(
            peers,
            vec![Some("10.0.0.1:17470".into()), Some("10.0.9.2:9000".into())]
        );
        assert_eq!(
            config.peer_listen_addr().unwrap(),
            "10.0.0.1:17470".parse().unwrap()
        );
        let ephemeral = Config {
            listen_addr: "127.0.0.1:0".parse().unwrap(),
            ..Config::default()
        };
        assert_eq!(ephemeral.peer_listen_addr().unwrap().port(), 0);
        // One node has no peers: its peer port stays on loopback, so it
        // needs no secret however its clients are served.
        let alone = Config {
            listen_addr: "0.0.0.0:7470".parse().unwrap(),
            ..Config::default()
        };
        assert_eq!(
            alone.peer_listen_addr().unwrap(),
            "127.0.0.1:17470".parse().unwrap()
        );
        alone.validate().unwrap();
        // A port that cannot move by 10000 needs an explicit peer address.
        let flags = Flags::parse_from(["quiverd", "--listen-addr", "127.0.0.1:60000"]);
        let err = Config::load_from(&flags, Env::prefixed("QUIVER_TEST_NOTHING_"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("peer_listen_addr"), "{err}");
        let flags = Flags::parse_from(["quiverd", "--cluster-nodes", "1=127.0.0.1:60000"]);
        let err = Config::load_from(&flags, Env::prefixed("QUIVER_TEST_NOTHING_"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("peer address"), "{err}");
    }

    #[test]
    fn a_cluster_secret_must_be_a_plain_header_value() {
        for bad in [
            "has space",
            "tab\there",
            &"x".repeat(CLUSTER_SECRET_BYTES_MAX + 1),
        ] {
            let config = Config {
                cluster: ClusterConfig {
                    secret: bad.to_owned(),
                    ..ClusterConfig::default()
                },
                ..Config::default()
            };
            assert!(config.validate().is_err(), "{bad:?}");
        }
    }
}
