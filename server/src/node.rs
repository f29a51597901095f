//! One quiverd node's shared state: its cluster (the Raft groups it hosts and
//! the routes to the others), the feature-view registry, the hot cache and
//! the limits.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quiver_engine::store::BlockCache;
use quiver_engine::{
    Catalog, Clock, FeatureView, Registry, SkewedClock, StoreOptions, SystemClock,
};

use quiver_raft::types::RejectKind;
use quiver_raft::{Command, GroupId, METADATA_GROUP, RequestId, Response as Applied};

use crate::admission::Admission;
use crate::cache::{HotCache, LastKnown};
use crate::cluster::{Cluster, ClusterError, StartOptions};
use crate::config::{Config, Limits};
use crate::error::ServiceError;

/// Commands refused because a split moved their keys, cut again and
/// proposed again at most this many times.
const WRONG_SHARD_RETRIES_MAX: u32 = 5;

/// Memtable size of each group's store: a node holds many groups, so each
/// gets a small one.
const GROUP_WRITE_BUFFER_BYTES: usize = 16 << 20;

/// Names a file in the data directory whose content (µs) offsets this
/// node's wall clock: for fault tests, never set in production.
pub const CLOCK_SKEW_FILE_ENV: &str = "QUIVER_TEST_CLOCK_SKEW_FILE";

/// Everything a request handler needs.
#[derive(Debug)]
pub struct Node {
    /// The groups hosted here and routing to the rest.
    pub cluster: Arc<Cluster>,
    /// Backups coordinated or carried out here.
    pub backups: Arc<crate::backup::Backups>,
    /// The feature-view registry, kept by the metadata group.
    pub registry: Registry,
    /// The hot row cache, kept coherent by every local replica's apply.
    pub cache: Arc<HotCache>,
    /// The last rows read from shards with no replica here (a degraded
    /// Get's last resort).
    pub last_known: LastKnown,
    /// The node's clock.
    pub clock: Arc<dyn Clock>,
    /// Per-request limits.
    pub limits: Limits,
    /// Bounds on the work in flight.
    pub admission: Admission,
    /// The address the gRPC server is bound to.
    pub listen_addr: SocketAddr,
    /// The data directory.
    pub data_dir: PathBuf,
    /// When the node started.
    pub started: Instant,
    /// Shares metadata read indexes between concurrent catch-ups of the
    /// node's own work ([`Node::fresh_catalog`]) and STRONG reads
    /// ([`Node::strict_client_catalog`]).
    pub freshness: MetadataFreshness,
    /// Shares the metadata leader's leased positions between concurrent
    /// client requests ([`Node::client_catalog`]). Apart from `freshness`:
    /// a caller that needs a read index must not be answered by a leased
    /// catch-up.
    pub client_freshness: MetadataFreshness,
    /// The newest event time written per view (a metric).
    pub view_freshness: crate::metrics::Freshness,
    /// TLS, when on.
    pub tls: Option<Arc<crate::tls::Tls>>,
}

/// Last-known rows a proposal changes.
#[derive(Debug, Default)]
struct Changed {
    keys: Vec<Vec<u8>>,
    views: Vec<quiver_engine::keys::ViewId>,
}

impl Changed {
    fn forget(&self, last_known: &LastKnown) {
        if !self.keys.is_empty() {
            last_known.forget(&self.keys);
        }
        for &view in &self.views {
            last_known.forget_view(view);
        }
    }
}

/// Forgets changed last-known rows when dropped.
struct ForgetOnDrop<'a> {
    last_known: &'a LastKnown,
    changed: Changed,
}

impl Drop for ForgetOnDrop<'_> {
    fn drop(&mut self) {
        self.changed.forget(self.last_known);
    }
}

/// Who a proposal is for: a client's call passes the shards' circuit
/// breakers, the node's own work (a restore) waits for the shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller {
    /// A client's write, invalidation or deletion.
    Client,
    /// The node's own work.
    Node,
}

impl Node {
    /// Proposes one command per shard in parallel and hands each response to
    /// `add`, which returns it back as `Err` if it is not the kind expected.
    /// A retry answered `AlreadyApplied` (its first attempt committed but the
    /// answer was lost) counts as done and adds nothing. A command refused
    /// because a split moved some of its keys is cut again by the current
    /// map and proposed to the shards that own them now (with the same
    /// request id). Waits for every shard, then fails with the first error:
    /// shards that committed stay committed.
    pub async fn propose_all(
        &self,
        proposals: impl IntoIterator<Item = (GroupId, Command)>,
        request_id: Option<RequestId>,
        caller: Caller,
        mut add: impl FnMut(Applied) -> Result<(), Applied>,
    ) -> Result<(), ServiceError> {
        let mut pending: Vec<(GroupId, Command)> = proposals.into_iter().collect();
        // Forgotten now, and again when done or when the caller's deadline
        // drops this (the write may still commit): a Get that read a key
        // before the write applied may have remembered the old row meanwhile.
        let changed = self.last_known_changes(pending.iter().map(|(_, command)| command));
        changed.forget(&self.last_known);
        let _forget_again = ForgetOnDrop {
            last_known: &self.last_known,
            changed,
        };
        let mut first_error = None;
        for attempt in 0..=WRONG_SHARD_RETRIES_MAX {
            let futures = pending.iter().map(|(shard, command)| {
                tracing::Instrument::instrument(
                    async move {
                        // A shard that keeps failing fails a client's write
                        // at once.
                        let call = match caller {
                            Caller::Client => Some(self.cluster.shard_call(*shard)?),
                            Caller::Node => None,
                        };
                        let result = self
                            .cluster
                            .propose_with_id(*shard, command.clone(), request_id)
                            .await;
                        if let Some(call) = call {
                            call.finish(&result);
                        }
                        result
                    },
                    tracing::debug_span!("shard_propose", shard = *shard, attempt),
                )
            });
            let results = futures::future::join_all(futures).await;
            let mut moved = Vec::new();
            for ((shard, command), result) in pending.into_iter().zip(results) {
                let outcome = match result {
                    Ok((Applied::AlreadyApplied, _)) => Ok(()),
                    Ok((response, _)) => add(response).map_err(|other| {
                        ServiceError::TaskFailed(format!("unexpected response {other:?}"))
                    }),
                    Err(ClusterError::Rejected {
                        kind: RejectKind::WrongShard,
                        ..
                    }) if attempt < WRONG_SHARD_RETRIES_MAX => {
                        moved.push((shard, command));
                        Ok(())
                    }
                    Err(e) => Err(e.into()),
                };
                if let Err(e) = outcome {
                    first_error.get_or_insert(e);
                }
            }
            if moved.is_empty() {
                break;
            }
            // The refusal's descriptors usually route the keys anew at
            // once; when they did not (an older peer, a descriptor the
            // answering replica lacked), the map records the split moments
            // after the shard applies it.
            let regrouped = regroup_all(&self.cluster.placement(), &moved);
            crate::metrics::wrong_shard_rerouted("write", regrouped.is_some());
            pending = match regrouped {
                Some(regrouped) => regrouped,
                None => {
                    tokio::time::sleep(Duration::from_millis(50 << attempt)).await;
                    self.cluster.sync_metadata().await?;
                    let placement = self.cluster.placement();
                    moved
                        .into_iter()
                        .flat_map(|(shard, command)| regroup(&placement, shard, command))
                        .collect()
                }
            };
        }
        first_error.map_or(Ok(()), Err)
    }

    /// What writes, deletes and invalidations proposed here change in the
    /// last-known rows: storage keys, and views invalidated whole. Nothing
    /// when none are held (then nothing can be stale).
    fn last_known_changes<'c>(&self, commands: impl Iterator<Item = &'c Command>) -> Changed {
        let mut changed = Changed::default();
        if self.last_known.is_empty() {
            return changed;
        }
        let mut entities = |view_id: u32, entities: &mut dyn Iterator<Item = &str>| {
            changed.keys.extend(
                entities.map(|entity| quiver_engine::keys::storage_key(view_id, entity.as_bytes())),
            );
        };
        let mut views = Vec::new();
        for command in commands {
            match command {
                Command::Write { view_id, rows } => {
                    entities(
                        *view_id,
                        &mut rows.iter().map(|row| row.entity_key.as_str()),
                    );
                }
                Command::Invalidate {
                    view_id,
                    entity_keys,
                } if entity_keys.is_empty() => views.push(*view_id),
                Command::Delete {
                    view_id,
                    entity_keys,
                }
                | Command::Invalidate {
                    view_id,
                    entity_keys,
                } => entities(*view_id, &mut entity_keys.iter().map(String::as_str)),
                _ => {}
            }
        }
        changed.views = views;
        changed
    }

    /// Opens the node's groups as configured and starts their Raft instances.
    pub async fn open(
        config: &Config,
        listen_addr: SocketAddr,
        peer_addr: SocketAddr,
        tls: Option<Arc<crate::tls::Tls>>,
    ) -> Result<Node, ClusterError> {
        let clock: Arc<dyn Clock> = match std::env::var_os(CLOCK_SKEW_FILE_ENV) {
            // Fault tests only (the nemesis's clock jumps): the named file,
            // in the data directory, holds this node's wall-clock offset.
            Some(name) => {
                let path = config.data_dir.join(name);
                tracing::warn!(path = %path.display(), "test-only wall-clock skew file in use");
                Arc::new(SkewedClock::watching(path))
            }
            None => Arc::new(SystemClock),
        };
        let registry = Registry::default();
        let cache = Arc::new(HotCache::new(
            config.cache.bytes_max,
            Duration::from_millis(config.cache.entry_ttl_ms),
            clock.clone(),
        ));
        let last_known = LastKnown::new(
            config.cache.last_known_bytes_max,
            Duration::from_millis(config.cache.last_known_age_ms_max),
            clock.clone(),
        );
        let block_cache_bytes = usize::try_from(config.block_cache_bytes).unwrap_or(usize::MAX);
        let store = StoreOptions {
            // The Raft log is the durable record: an entry is fsynced there
            // before it is acknowledged, and a crashed store replays it.
            sync_writes: false,
            block_cache_bytes,
            write_buffer_bytes: GROUP_WRITE_BUFFER_BYTES,
            clock: clock.clone(),
            block_cache: Some(BlockCache::new_lru_cache(block_cache_bytes)),
            registry: Some(registry.clone()),
            load_catalog: false,
        };
        if let Some(member) = &config.join {
            crate::join::join_if_new(
                member,
                &config.data_dir,
                listen_addr,
                peer_addr,
                &config.cluster.secret,
                tls.as_ref(),
            )
            .await?;
        }
        let cluster = Cluster::start(
            &config.cluster,
            StartOptions {
                data_dir: &config.data_dir,
                self_addr: listen_addr.to_string(),
                self_peer_addr: peer_addr.to_string(),
                store,
                observer: cache.clone(),
                clock: clock.clone(),
                sync_log: config.sync_writes,
                ships_log: !config.backup.log_url.is_empty(),
                tls: tls.clone(),
            },
        )
        .await?;
        let backups = crate::backup::Backups::new(config.backup.clone(), &config.data_dir);
        backups.clean_staging();
        cluster.set_backups(backups.clone());
        Ok(Node {
            cluster,
            backups,
            registry,
            cache,
            last_known,
            clock,
            limits: config.limits.clone(),
            admission: Admission::new(&config.limits),
            listen_addr,
            data_dir: config.data_dir.clone(),
            started: Instant::now(),
            freshness: MetadataFreshness::default(),
            client_freshness: MetadataFreshness::with_reuse(CLIENT_CATALOG_REUSE),
            view_freshness: crate::metrics::Freshness::default(),
            tls,
        })
    }

    /// Checks an entity key against the limits.
    pub fn check_entity_key(&self, key: &str) -> Result<(), ServiceError> {
        if key.is_empty() {
            return Err(ServiceError::invalid("entity key is empty"));
        }
        ServiceError::check_limit(
            "entity key length in bytes",
            key.len(),
            "limits.entity_key_bytes_max",
            self.limits.entity_key_bytes_max,
        )
    }

    /// The catalog as of at least every view change acknowledged before this
    /// call: this node's metadata replica has applied up to a read index of
    /// the metadata group taken after the call began. The node's own work
    /// (expiry, restores) resolves names here. Concurrent callers share one
    /// read index (`MetadataFreshness`).
    pub async fn fresh_catalog(&self) -> Result<Arc<Catalog>, ServiceError> {
        self.freshness
            .covered(|| self.cluster.sync_metadata())
            .await?;
        Ok(settled(self.registry.load_full()).await)
    }

    /// [`Self::fresh_catalog`] for a client's write, delete or
    /// invalidation (and a LEADER or REPLICA read that lacks a name), at
    /// the metadata leader's lease rather than a read index
    /// (`sync_metadata_leased`: as fresh under bounded clock drift, with no
    /// quorum round per call). One that starts after an ApplyFeatureView or
    /// DeleteFeatureView returned, through any node, sees its effect.
    /// Through the metadata group's circuit breaker (shard 0), so that
    /// while the metadata group has no quorum, requests fail at once
    /// instead of each waiting out its deadline. (The node's own work
    /// waits.)
    pub async fn client_catalog(&self) -> Result<Arc<Catalog>, ServiceError> {
        self.client_catalog_at(true).await
    }

    /// [`Self::client_catalog`] at a read index: a STRONG read's names, so
    /// that STRONG keeps its promise of no clock assumption.
    pub async fn strict_client_catalog(&self) -> Result<Arc<Catalog>, ServiceError> {
        self.client_catalog_at(false).await
    }

    async fn client_catalog_at(&self, leased: bool) -> Result<Arc<Catalog>, ServiceError> {
        // Each kind of catch-up has its own queue: a caller that needs a
        // read index is never answered by a leased catch-up.
        let freshness = if leased {
            &self.client_freshness
        } else {
            &self.freshness
        };
        // Inside the shared catch-up: callers that share one catch-up count
        // once, not once each.
        freshness
            .covered(|| async {
                let call = self.cluster.shard_call(METADATA_GROUP)?;
                let synced = if leased {
                    self.cluster.sync_metadata_leased().await
                } else {
                    self.cluster.sync_metadata().await
                };
                call.finish(&synced);
                synced
            })
            .await?;
        Ok(settled(self.registry.load_full()).await)
    }

    /// The named view as of [`Self::client_catalog`] (a client's call).
    pub async fn view(&self, name: &str) -> Result<Arc<FeatureView>, ServiceError> {
        self.client_catalog()
            .await?
            .view(name)
            .cloned()
            .ok_or_else(|| ServiceError::NotFound(format!("feature view {name:?} does not exist")))
    }
}

/// Coalesces metadata read indexes: one runs at a time, and a caller is
/// answered by any that started after the caller arrived (its read index
/// then includes every commit acknowledged before the caller arrived),
/// success or failure, or, with a reuse window (client calls: see
/// [`CLIENT_CATALOG_REUSE`]), by a success that started at most that long
/// before it arrived: under load every request waiting shares the next
/// read index instead of each paying its own round trip, and with the
/// metadata group down they share one failure instead of queueing one each.
#[derive(Debug, Default)]
pub struct MetadataFreshness {
    /// When the last catch-up started, and how it ended (the error's text).
    last: tokio::sync::Mutex<Option<(Instant, Result<(), String>)>>,
    /// How long before a caller's arrival a successful catch-up may have
    /// started and still answer it (zero: it must start after).
    reuse: Duration,
}

/// How long a client's catalog catch-up answers later client calls on the
/// same node: a write or read arriving within this of the start of a
/// successful catch-up uses it instead of asking the metadata leader again.
/// A view change waits this long after it commits before it is
/// acknowledged ([`VIEW_CHANGE_ACK_DELAY`]), so any call that starts after
/// the acknowledgment still sees it: its catch-up started after the commit.
pub const CLIENT_CATALOG_REUSE: Duration = Duration::from_millis(50);

/// How long ApplyFeatureView and DeleteFeatureView wait after their commit
/// before answering: at least [`CLIENT_CATALOG_REUSE`], plus a margin for
/// monotonic clocks running at slightly different rates on different nodes.
pub const VIEW_CHANGE_ACK_DELAY: Duration = Duration::from_millis(60);

/// `catalog`, once [`VIEW_CHANGE_ACK_DELAY`] has passed since this node
/// applied its newest view change. Every answer a client gets that depends
/// on the catalog comes through here: a change that a client can observe
/// (a listed view, a STRONG read, a write accepted with a new feature) is
/// then older than any catch-up another node may still be reusing, as an
/// acknowledged one is, so a write that follows the observation sees it.
/// Costs a clock read unless a view changed in the last 60 ms.
pub async fn settled(catalog: Arc<Catalog>) -> Arc<Catalog> {
    if let Some(until) = catalog
        .changed_at()
        .and_then(|at| at.checked_add(VIEW_CHANGE_ACK_DELAY))
        && until > Instant::now()
    {
        tokio::time::sleep_until(until.into()).await;
    }
    catalog
}

impl MetadataFreshness {
    /// Catch-ups that answer callers arriving up to `reuse` after they
    /// started (when they succeed).
    pub fn with_reuse(reuse: Duration) -> Self {
        Self {
            reuse,
            ..Self::default()
        }
    }

    /// [`Self::covered_since`] for a caller arriving now.
    pub async fn covered<F, Fut>(&self, sync: F) -> Result<(), ClusterError>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<(), ClusterError>>,
    {
        self.covered_since(Instant::now(), sync).await
    }

    /// Runs `sync` unless a catch-up that started after `arrived` (or a
    /// successful one that started within the reuse window before it) has
    /// already ended; then answers with its outcome.
    pub async fn covered_since<F, Fut>(&self, arrived: Instant, sync: F) -> Result<(), ClusterError>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<(), ClusterError>>,
    {
        let mut last = self.last.lock().await;
        // A failure answers only callers that arrived before it started:
        // a later caller tries again.
        if let Some((started, outcome)) = last.as_ref()
            && (*started > arrived
                || (outcome.is_ok()
                    && started
                        .checked_add(self.reuse)
                        .is_some_and(|until| until > arrived)))
        {
            return outcome.clone().map_err(|error| ClusterError::Unavailable {
                group: METADATA_GROUP,
                attempts: 1,
                last: format!("the feature-view registry cannot be confirmed current: {error}"),
            });
        }
        let started = Instant::now();
        let outcome = sync().await;
        *last = Some((
            started,
            outcome.as_ref().map(|_| ()).map_err(ToString::to_string),
        ));
        outcome
    }
}

/// Cuts a data command by the shards that own its keys now.
/// Commands refused for keys a split moved, cut again by `placement`;
/// `None` if it would send one of them whole to the shard that refused it
/// (the placement has not learned the split).
fn regroup_all(
    placement: &crate::cluster::placement::Placement,
    moved: &[(GroupId, Command)],
) -> Option<Vec<(GroupId, Command)>> {
    let mut regrouped = Vec::new();
    for (shard, command) in moved {
        let parts = regroup(placement, *shard, command.clone());
        if let [(same, _)] = parts.as_slice()
            && same == shard
        {
            return None;
        }
        regrouped.extend(parts);
    }
    Some(regrouped)
}

fn regroup(
    placement: &crate::cluster::placement::Placement,
    shard: GroupId,
    command: Command,
) -> Vec<(GroupId, Command)> {
    match command {
        Command::Write { view_id, rows } => placement
            .by_shard(rows, |row| row.entity_key.as_str())
            .into_iter()
            .map(|(shard, rows)| (shard, Command::Write { view_id, rows }))
            .collect(),
        Command::Delete {
            view_id,
            entity_keys,
        } => placement
            .by_shard(entity_keys, |key| key.as_str())
            .into_iter()
            .map(|(shard, entity_keys)| {
                (
                    shard,
                    Command::Delete {
                        view_id,
                        entity_keys,
                    },
                )
            })
            .collect(),
        Command::Invalidate {
            view_id,
            entity_keys,
        } => placement
            .by_shard(entity_keys, |key| key.as_str())
            .into_iter()
            .map(|(shard, entity_keys)| {
                (
                    shard,
                    Command::Invalidate {
                        view_id,
                        entity_keys,
                    },
                )
            })
            .collect(),
        // Only data commands name keys a split could move.
        other => vec![(shard, other)],
    }
}

/// Shared handle to a node.
pub type NodeRef = Arc<Node>;

/// The rounds of a node's background loop (expiry, log shipping,
/// scheduled backups): one per `interval`, a late round delaying the next
/// rather than bunching them, for as long as the node lives and is not
/// stopping.
pub struct Rounds {
    node: std::sync::Weak<Node>,
    ticker: tokio::time::Interval,
}

impl Rounds {
    /// Rounds of `node` every `interval`; with `skip_first`, the first one
    /// an interval after the start (else at once).
    pub fn new(
        node: std::sync::Weak<Node>,
        interval: std::time::Duration,
        skip_first: bool,
    ) -> Self {
        let start = tokio::time::Instant::now()
            + if skip_first {
                interval
            } else {
                std::time::Duration::ZERO
            };
        let mut ticker = tokio::time::interval_at(start, interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Rounds { node, ticker }
    }

    /// Waits for the next round; `None` once the node is gone or stopping.
    pub async fn next(&mut self) -> Option<Arc<Node>> {
        self.ticker.tick().await;
        self.node
            .upgrade()
            .filter(|node| !node.cluster.is_stopping())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn waiting_callers_share_one_catch_up_and_a_later_caller_gets_its_own() {
        let freshness = Arc::new(MetadataFreshness::default());
        let syncs = Arc::new(AtomicU32::new(0));
        let release = Arc::new(tokio::sync::Notify::new());
        let (started_tx, started_rx) = tokio::sync::oneshot::channel();
        // The first caller's catch-up starts and is held open.
        let first = {
            let (freshness, syncs, release) = (freshness.clone(), syncs.clone(), release.clone());
            tokio::spawn(async move {
                freshness
                    .covered(|| async move {
                        syncs.fetch_add(1, Ordering::SeqCst);
                        let _ = started_tx.send(());
                        release.notified().await;
                        Ok(())
                    })
                    .await
            })
        };
        started_rx.await.unwrap();
        // Nine arrive while it runs: it started before them, so it covers
        // none of them; one more catch-up (started after they all arrived)
        // covers all nine.
        let arrived = Instant::now();
        let waiting: Vec<_> = (0..9)
            .map(|_| {
                let (freshness, syncs) = (freshness.clone(), syncs.clone());
                tokio::spawn(async move {
                    freshness
                        .covered_since(arrived, || async move {
                            syncs.fetch_add(1, Ordering::SeqCst);
                            Ok(())
                        })
                        .await
                })
            })
            .collect();
        release.notify_one();
        first.await.unwrap().unwrap();
        for caller in waiting {
            caller.await.unwrap().unwrap();
        }
        assert_eq!(syncs.load(Ordering::SeqCst), 2);
        // A caller arriving after every catch-up ended gets its own.
        freshness
            .covered(|| async {
                syncs.fetch_add(1, Ordering::SeqCst);
                Ok(())
            })
            .await
            .unwrap();
        assert_eq!(syncs.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_failure_is_shared_with_those_waiting_and_covers_no_later_caller() {
        let freshness = MetadataFreshness::default();
        let arrived = Instant::now();
        let failed = freshness
            .covered(|| async { Err(ClusterError::Start("metadata group unreachable".into())) })
            .await;
        assert!(failed.is_err());
        // Arrived before the failed catch-up started: answered with it.
        let shared = freshness
            .covered_since(arrived, || async {
                Err(ClusterError::Start("ran again instead of sharing".into()))
            })
            .await;
        assert!(
            shared
                .unwrap_err()
                .to_string()
                .contains("metadata group unreachable")
        );
        let ran = AtomicU32::new(0);
        freshness
            .covered(|| async {
                ran.fetch_add(1, Ordering::SeqCst);
                Ok(())
            })
            .await
            .unwrap();
        assert_eq!(ran.load(Ordering::SeqCst), 1);
    }

    /// A catalog a view change just built is handed out only once the
    /// change is [`VIEW_CHANGE_ACK_DELAY`] old; an old one at once.
    #[tokio::test]
    async fn a_catalog_is_handed_out_once_its_change_is_old_enough() {
        let dir = tempfile::tempdir().unwrap();
        let store =
            quiver_engine::StateStore::open(dir.path(), quiver_engine::StoreOptions::scratch())
                .unwrap();
        assert!(store.registry().load_full().changed_at().is_some());
        let spec = quiver_engine::ViewSpec {
            name: "v".into(),
            entities: vec!["id".into()],
            features: vec![quiver_engine::FeatureSpec {
                name: "f".into(),
                value_type: quiver_engine::ValueType::Int64,
                default: None,
            }],
            ttl_seconds: 0,
            description: String::new(),
        };
        store.apply_view(spec).unwrap();
        let changed = store.registry().load_full();
        let changed_at = changed.changed_at().unwrap();
        settled(changed).await;
        assert!(Instant::now() >= changed_at + VIEW_CHANGE_ACK_DELAY);
        let never = Arc::new(Catalog::default());
        assert!(futures::FutureExt::now_or_never(settled(never)).is_some());
    }

    /// With a reuse window, a successful catch-up answers callers arriving
    /// up to the window after it started, and no later one; a failure still
    /// answers only those that arrived before it started.
    #[tokio::test]
    async fn a_success_answers_callers_within_the_reuse_window() {
        let reuse = Duration::from_secs(30);
        let freshness = MetadataFreshness::with_reuse(reuse);
        let ran = AtomicU32::new(0);
        let sync = || async {
            ran.fetch_add(1, Ordering::SeqCst);
            Ok(())
        };
        let first = Instant::now();
        freshness.covered(sync).await.unwrap();
        freshness.covered(sync).await.unwrap();
        freshness
            .covered_since(first + reuse / 2, sync)
            .await
            .unwrap();
        assert_eq!(ran.load(Ordering::SeqCst), 1);
        // Past the window: a catch-up of its own.
        freshness
            .covered_since(first + reuse + Duration::from_secs(1), sync)
            .await
            .unwrap();
        assert_eq!(ran.load(Ordering::SeqCst), 2);

        let failing = MetadataFreshness::with_reuse(reuse);
        let failed = failing
            .covered(|| async { Err(ClusterError::Start("metadata group unreachable".into())) })
            .await;
        assert!(failed.is_err());
        failing.covered(sync).await.unwrap();
        assert_eq!(ran.load(Ordering::SeqCst), 3);
    }
}
