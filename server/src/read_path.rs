//! The read path: resolve feature references, dedup entity keys, group them
//! by shard, read every shard in parallel from the replica the consistency
//! level asks for (this node's replica through the hot cache, or another
//! node's), merge, and judge every value's status.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use prost::Message as _;
use quiver_engine::codec::decode_stored;
use quiver_engine::keys::storage_key;
use quiver_engine::view::Feature;
use quiver_engine::{Catalog, FeatureView, RowFreshness, StateStore, StoredRow, Value};
use quiver_proto::v1 as pb;
use quiver_raft::{GroupId, StateMachine};

use crate::cache::{HotCache, Lookup};
use crate::cluster::wire::ReadLevel;
use crate::cluster::{ReadSource, ShardRead};
use crate::convert::value_to_pb;
use crate::error::ServiceError;
use crate::node::Node;

/// Which features a Get returns, in response order.
#[derive(Debug)]
struct ReadPlan {
    /// Distinct views referenced.
    views: Vec<Arc<FeatureView>>,
    /// (index into `views`, index into that view's features), one per column.
    columns: Vec<(usize, usize)>,
}

impl ReadPlan {
    /// Resolves `view:feature`, `view:*` and `view` references.
    fn resolve(catalog: &Catalog, refs: &[String]) -> Result<ReadPlan, ServiceError> {
        let mut plan = ReadPlan {
            views: Vec::new(),
            columns: Vec::new(),
        };
        for reference in refs {
            let (view_name, feature) = match reference.split_once(':') {
                Some((view, "*")) => (view, None),
                Some((view, feature)) => (view, Some(feature)),
                None => (reference.as_str(), None),
            };
            let view = catalog.view(view_name).ok_or_else(|| {
                ServiceError::NotFound(format!("feature view {view_name:?} does not exist"))
            })?;
            let view_index = match plan.views.iter().position(|v| v.id == view.id) {
                Some(index) => index,
                None => {
                    plan.views.push(view.clone());
                    plan.views.len() - 1
                }
            };
            match feature {
                None => plan
                    .columns
                    .extend((0..view.features.len()).map(|f| (view_index, f))),
                Some(name) => {
                    let feature = view.feature_index(name).ok_or_else(|| {
                        ServiceError::NotFound(format!(
                            "feature view {view_name:?} has no feature {name:?}"
                        ))
                    })?;
                    plan.columns.push((view_index, feature));
                }
            }
        }
        Ok(plan)
    }

    fn names(&self) -> Vec<String> {
        self.columns
            .iter()
            .map(|&(v, f)| format!("{}:{}", self.views[v].name, self.views[v].features[f].name))
            .collect()
    }
}

/// A row lookup: the row, absent, or unreadable (storage failed or the row is
/// corrupt; already logged).
type Fetched = Result<Option<Arc<StoredRow>>, ()>;

/// The share of a degraded Get's deadline its shards' normal reads may
/// take; the rest is for the fallback and the answer.
const DEGRADED_BUDGET_SHARE: f64 = 0.8;
/// The share by which a degraded read's fallback to another node's replica
/// must have answered (then the last-known rows answer, in no time).
const FALLBACK_BUDGET_SHARE: f64 = 0.95;

/// What a Get does with a shard it cannot read at the requested level.
#[derive(Debug, Clone, Copy)]
enum OnFailure {
    /// Its rows are `UNAVAILABLE`.
    Strict,
    /// A replica answers as it is (`STALE`): this node's own, else the
    /// first of another node's by `fallback_until`; else the rows last read
    /// from the shard (`STALE`), else defaults. The normal read must be done
    /// by `until`. Both are unbounded if the call has no deadline.
    Degraded {
        until: Option<tokio::time::Instant>,
        fallback_until: Option<tokio::time::Instant>,
    },
}

/// Serves a Get; `deadline` is when the call arrived and the caller's
/// timeout (`grpc-timeout`), if it gave one.
pub async fn get(
    node: &Node,
    request: pb::GetRequest,
    deadline: Option<(tokio::time::Instant, std::time::Duration)>,
) -> Result<pb::GetResponse, ServiceError> {
    let limits = &node.limits;
    if request.entity_keys.is_empty() {
        return Err(ServiceError::invalid("no entity keys given"));
    }
    if request.features.is_empty() {
        return Err(ServiceError::invalid("no feature references given"));
    }
    ServiceError::check_limit(
        "number of entity keys",
        request.entity_keys.len(),
        "limits.get_keys_max",
        limits.get_keys_max,
    )?;
    ServiceError::check_limit(
        "number of feature references",
        request.features.len(),
        "limits.get_feature_refs_max",
        limits.get_feature_refs_max,
    )?;
    for key in &request.entity_keys {
        node.check_entity_key(key)?;
    }
    let within_ms = request.max_staleness_ms;
    let level = match request.consistency() {
        pb::Consistency::Strong if within_ms > 0 => {
            return Err(ServiceError::InvalidArgument(
                "max_staleness_ms allows a stale answer; a STRONG read allows none".into(),
            ));
        }
        pb::Consistency::Strong if request.degraded => {
            return Err(ServiceError::InvalidArgument(
                "degraded allows a stale answer; a STRONG read allows none".into(),
            ));
        }
        pb::Consistency::Strong => ReadLevel::Strong,
        pb::Consistency::Replica => ReadLevel::Replica { within_ms },
        // A staleness budget allows a follower's answer.
        pb::Consistency::Leader | pb::Consistency::Unspecified if within_ms > 0 => {
            ReadLevel::Replica { within_ms }
        }
        pb::Consistency::Leader | pb::Consistency::Unspecified => ReadLevel::Leader,
    };
    ServiceError::check_limit(
        "max_staleness_ms",
        usize::try_from(request.max_staleness_ms).unwrap_or(usize::MAX),
        "limits.replica_staleness_ms_max",
        limits.replica_staleness_ms_max,
    )?;
    let _admitted = node.admission.read().await?;
    let plan = if request.consistency() == pb::Consistency::Strong {
        // Linearizable: names resolve at a metadata read index (not the
        // lease writes use: STRONG makes no clock assumption), so a view
        // deleted or changed before this read began is seen as it now is.
        let catalog = node.strict_client_catalog().await?;
        ReadPlan::resolve(&catalog, &request.features)?
    } else {
        // The node's own metadata replica; caught up only if it lacks a name
        // (a view or feature added through another node a moment ago).
        let catalog = crate::node::settled(node.registry.load_full()).await;
        match ReadPlan::resolve(&catalog, &request.features) {
            Ok(plan) => plan,
            Err(_) => {
                let catalog = node.client_catalog().await?;
                ReadPlan::resolve(&catalog, &request.features)?
            }
        }
    };
    ServiceError::check_limit(
        "number of values (keys x features)",
        request.entity_keys.len().saturating_mul(plan.columns.len()),
        "limits.get_values_max",
        limits.get_values_max,
    )?;

    // Dedup entity keys: each distinct key is fetched once per view.
    let mut unique: HashMap<&str, usize> = HashMap::with_capacity(request.entity_keys.len());
    let mut unique_keys: Vec<&str> = Vec::with_capacity(request.entity_keys.len());
    let slots: Vec<usize> = request
        .entity_keys
        .iter()
        .map(|key| {
            *unique.entry(key.as_str()).or_insert_with(|| {
                unique_keys.push(key);
                unique_keys.len() - 1
            })
        })
        .collect();

    let on_failure = if request.degraded {
        let share =
            |share: f64| deadline.map(|(arrived, timeout)| arrived + timeout.mul_f64(share));
        OnFailure::Degraded {
            until: share(DEGRADED_BUDGET_SHARE),
            fallback_until: share(FALLBACK_BUDGET_SHARE),
        }
    } else {
        OnFailure::Strict
    };
    let (rows, stale, sources) = fetch(
        node,
        &plan.views,
        &unique_keys,
        level,
        !request.skip_cache,
        on_failure,
    )
    .await;
    let degraded = request.degraded;
    let now_us = node.clock.now_us();

    // The response is bounded as it is built: keys x features is checked
    // above, but values can be large, and a Get must not make a node
    // assemble gigabytes.
    let response_bytes_max = usize::try_from(limits.get_response_bytes_max).unwrap_or(usize::MAX);
    let mut response_bytes = 0usize;
    let mut entities = Vec::with_capacity(request.entity_keys.len());
    for (key, &slot) in request.entity_keys.iter().zip(&slots) {
        let mut features = Vec::with_capacity(plan.columns.len());
        for &(v, f) in &plan.columns {
            let view = &plan.views[v];
            let at = v * unique_keys.len() + slot;
            let result = feature_result(
                view,
                &view.features[f],
                &rows[at],
                Judge {
                    now_us,
                    stale: stale[at],
                    degraded,
                },
            );
            response_bytes = response_bytes.saturating_add(result.encoded_len());
            if response_bytes > response_bytes_max {
                return Err(ServiceError::LimitExceeded {
                    what: "response size in bytes",
                    actual: response_bytes as u64,
                    limit_name: "limits.get_response_bytes_max",
                    limit: limits.get_response_bytes_max,
                });
            }
            features.push(result);
        }
        entities.push(pb::EntityResult {
            entity_key: key.clone(),
            features,
        });
    }
    Ok(pb::GetResponse {
        feature_names: plan.names(),
        entities,
        sources: sources
            .into_iter()
            .map(|(s, stale)| pb::ReadSource {
                shard: s.group,
                node_id: s.node_id,
                leader: s.leader,
                applied_index: s.applied_index,
                stale,
            })
            .collect(),
    })
}

/// Looks up `views x keys`, shard by shard in parallel. Result index:
/// `view * keys.len() + key`, with whether the row came from a degraded
/// fallback. A shard that cannot be read leaves its rows unreadable (served
/// as `UNAVAILABLE`, or per `on_failure`), the other shards still answer.
async fn fetch(
    node: &Node,
    views: &[Arc<FeatureView>],
    keys: &[&str],
    level: ReadLevel,
    use_cache: bool,
    on_failure: OnFailure,
) -> (Vec<Fetched>, Vec<bool>, Vec<(ReadSource, bool)>) {
    let mut by_shard: BTreeMap<GroupId, (Vec<usize>, Vec<Vec<u8>>)> = BTreeMap::new();
    let placement = node.cluster.placement();
    for (k, key) in keys.iter().enumerate() {
        let shard = placement.shard_of_key(key);
        let (slots, storage_keys) = by_shard.entry(shard).or_default();
        for (v, view) in views.iter().enumerate() {
            slots.push(v * keys.len() + k);
            storage_keys.push(storage_key(view.id, key.as_bytes()));
        }
    }
    let reads = by_shard.into_iter().map(|(shard, (slots, storage_keys))| {
        let key_count = storage_keys.len();
        tracing::Instrument::instrument(
            async move {
                let rows = match on_failure {
                    OnFailure::Strict => read_shard(node, shard, storage_keys, level, use_cache)
                        .await
                        .map(|(rows, source)| (rows, source, false)),
                    OnFailure::Degraded {
                        until,
                        fallback_until,
                    } => {
                        let budget = Budget {
                            until,
                            fallback_until,
                        };
                        read_degraded(node, shard, storage_keys, level, use_cache, budget).await
                    }
                };
                tracing::debug!(ok = rows.is_ok(), "shard read");
                (slots, rows)
            },
            tracing::debug_span!("shard_read", shard, keys = key_count),
        )
    });
    let mut results: Vec<Fetched> = vec![Ok(None); views.len() * keys.len()];
    let mut stale = vec![false; views.len() * keys.len()];
    let mut sources = Vec::new();
    for (slots, shard_rows) in futures::future::join_all(reads).await {
        match shard_rows {
            Ok((rows, source, from_fallback)) => {
                sources.push((source, from_fallback));
                for (slot, row) in slots.into_iter().zip(rows) {
                    results[slot] = row;
                    stale[slot] = from_fallback;
                }
            }
            Err(error) => {
                // A breaker's refusals are counted, not logged (thousands a
                // second; the breaker logged when it opened).
                if !breaker_open(&error) {
                    tracing::warn!(%error, "shard unreadable; its rows are served as UNAVAILABLE");
                }
                for slot in slots {
                    results[slot] = Err(());
                }
            }
        }
    }
    (results, stale, sources)
}

/// When a degraded shard read's steps must have answered.
#[derive(Debug, Clone, Copy)]
struct Budget {
    /// The read at the requested level.
    until: Option<tokio::time::Instant>,
    /// Another node's replica.
    fallback_until: Option<tokio::time::Instant>,
}

/// Waits for `read` until `until` (forever if `None`).
async fn within<T>(
    until: Option<tokio::time::Instant>,
    shard: GroupId,
    read: impl std::future::Future<Output = Result<T, ServiceError>>,
) -> Result<T, ServiceError> {
    match until {
        Some(until) => tokio::time::timeout_at(until, read)
            .await
            .unwrap_or_else(|_| {
                Err(ServiceError::TaskFailed(format!(
                    "shard {shard}: no answer within the call's budget"
                )))
            }),
        None => read.await,
    }
}

/// A degraded shard read: the requested level within the budget, else a
/// replica as it is, else the rows last read (true: the rows are from a
/// fallback). This node's own replica is the first fallback; a node that
/// holds none asks the shard's replicas elsewhere, then its last-known rows.
async fn read_degraded(
    node: &Node,
    shard: GroupId,
    keys: Vec<Vec<u8>>,
    level: ReadLevel,
    use_cache: bool,
    budget: Budget,
) -> Result<(Vec<Fetched>, ReadSource, bool), ServiceError> {
    let attempt = read_shard(node, shard, keys.clone(), level, use_cache);
    let error = match within(budget.until, shard, attempt).await {
        Ok((rows, source)) => return Ok((rows, source, false)),
        Err(error) => error,
    };
    let Some(hosted) = node.cluster.group(shard) else {
        return read_elsewhere(node, shard, keys, budget, error).await;
    };
    if breaker_open(&error) {
        tracing::debug!(shard, %error, "degraded read: answering from this node's replica");
    } else {
        tracing::warn!(shard, %error, "degraded read: answering from this node's replica");
    }
    metrics::counter!("quiver_degraded_fallbacks_total", "from" => "own_replica").increment(1);
    let state = hosted.state.clone();
    let node_id = node.cluster.node_id;
    let (rows, applied_index) = tokio::task::spawn_blocking(move || {
        let store = state.store();
        // The position of the store read, not of one a snapshot replaced.
        let applied_index = state.applied().map_or(0, |id| id.index);
        let rows = store
            .get_rows(&keys)
            .into_iter()
            .map(|row| match row {
                Ok(row) => Ok(row.map(Arc::new)),
                Err(error) => {
                    tracing::error!(%error, "row unreadable; served as UNAVAILABLE");
                    Err(())
                }
            })
            .collect::<Vec<Fetched>>();
        (rows, applied_index)
    })
    .await?;
    let source = ReadSource {
        group: shard,
        node_id,
        leader: false,
        applied_index,
    };
    Ok((rows, source, true))
}

/// The degraded fallback of a node that holds no replica of `shard`: the
/// first of its replicas elsewhere to answer as it is, by the fallback
/// budget; else the rows this node last read from it (unknown keys stay
/// unreadable, so they get their defaults); else `error`, the normal
/// read's failure.
async fn read_elsewhere(
    node: &Node,
    shard: GroupId,
    keys: Vec<Vec<u8>>,
    budget: Budget,
    error: ServiceError,
) -> Result<(Vec<Fetched>, ReadSource, bool), ServiceError> {
    let log = |from: &'static str, why: &dyn std::fmt::Display| {
        if breaker_open(&error) {
            tracing::debug!(shard, %error, %why, from, "degraded read: answering from a fallback");
        } else {
            tracing::warn!(shard, %error, %why, from, "degraded read: answering from a fallback");
        }
        metrics::counter!("quiver_degraded_fallbacks_total", "from" => from).increment(1);
    };
    let any = async {
        let read = node.cluster.read_any_replica(shard, &keys).await?;
        decode_remote(node, shard, &keys, read, false)
    };
    let any_error = match within(budget.fallback_until, shard, any).await {
        Ok((rows, source)) => {
            log("other_replica", &format!("node {}", source.node_id));
            // The first replica to answer may lag: where the last-known
            // row is newer, that row answers. (Its answer was just
            // remembered, newer kept, absent forgotten: recall is the
            // newer, and nothing where the replica has no row.)
            let rows = rows
                .into_iter()
                .zip(&keys)
                .map(|(row, key)| {
                    node.last_known
                        .recall(key)
                        .map_or(row, |known| Ok(Some(known)))
                })
                .collect();
            return Ok((rows, source, true));
        }
        Err(any_error) => any_error,
    };
    let rows: Vec<Fetched> = keys
        .iter()
        .map(|key| node.last_known.recall(key).map(Some).ok_or(()))
        .collect();
    if rows.iter().all(Result::is_err) {
        log("none", &any_error);
        return Err(error);
    }
    log("last_known", &any_error);
    let source = ReadSource {
        group: shard,
        node_id: node.cluster.node_id,
        leader: false,
        // No replica position: rows this node read from others earlier.
        applied_index: 0,
    };
    Ok((rows, source, true))
}

/// Reads of keys a split moved, tried again through the map at most this
/// many times (each waits for a metadata read index: the map records a
/// split moments after the shard applies it).
const WRONG_SHARD_RETRIES_MAX: u32 = 5;

/// Refused by a shard's circuit breaker.
fn breaker_open(error: &ServiceError) -> bool {
    matches!(
        error,
        ServiceError::Cluster(crate::cluster::ClusterError::BreakerOpen { .. })
    )
}

fn wrong_shard(error: &ServiceError) -> bool {
    matches!(
        error,
        ServiceError::Cluster(crate::cluster::ClusterError::Rejected {
            kind: quiver_raft::types::RejectKind::WrongShard,
            ..
        })
    )
}

/// Reads one shard's keys from the replica the level asks for; keys a
/// split moved meanwhile are read where the current map says they are (the
/// first source answers for all of them).
async fn read_shard(
    node: &Node,
    shard: GroupId,
    keys: Vec<Vec<u8>>,
    level: ReadLevel,
    use_cache: bool,
) -> Result<(Vec<Fetched>, ReadSource), ServiceError> {
    let mut last = match read_one_shard(node, shard, keys.clone(), level, use_cache).await {
        Err(error) if wrong_shard(&error) => error,
        other => return other,
    };
    let by_placement = |placement: &crate::cluster::placement::Placement| {
        let mut by_shard: BTreeMap<GroupId, Vec<usize>> = BTreeMap::new();
        for (slot, key) in keys.iter().enumerate() {
            let hash = quiver_engine::keys::split_storage_key(key).map_or(0, |(hash, _, _)| hash);
            by_shard
                .entry(placement.shard_of_hash(hash))
                .or_default()
                .push(slot);
        }
        by_shard
    };
    let mut tried = BTreeMap::from([(shard, (0..keys.len()).collect::<Vec<usize>>())]);
    for attempt in 0..WRONG_SHARD_RETRIES_MAX {
        // The refusal's descriptors usually route the keys anew at once;
        // when they did not, the map records the split moments after the
        // shard applies it.
        let mut by_shard = by_placement(&node.cluster.placement());
        crate::metrics::wrong_shard_rerouted("read", by_shard != tried);
        if by_shard == tried {
            tokio::time::sleep(std::time::Duration::from_millis(50 << attempt)).await;
            node.cluster.sync_metadata().await?;
            by_shard = by_placement(&node.cluster.placement());
        }
        tried = by_shard.clone();
        let mut rows: Vec<Fetched> = vec![Ok(None); keys.len()];
        let mut first_source = None;
        let mut failed = None;
        for (group, slots) in by_shard {
            let subset: Vec<Vec<u8>> = slots.iter().map(|&slot| keys[slot].clone()).collect();
            match read_one_shard(node, group, subset, level, use_cache).await {
                Ok((read, source)) => {
                    first_source.get_or_insert(source);
                    for (slot, row) in slots.into_iter().zip(read) {
                        rows[slot] = row;
                    }
                }
                Err(error) => {
                    failed = Some(error);
                    break;
                }
            }
        }
        match (failed, first_source) {
            (None, Some(source)) => return Ok((rows, source)),
            (Some(error), _) if wrong_shard(&error) => last = error,
            (Some(error), _) => return Err(error),
            (None, None) => {
                return Ok((
                    rows,
                    ReadSource {
                        group: shard,
                        node_id: node.cluster.node_id,
                        leader: false,
                        applied_index: 0,
                    },
                ));
            }
        }
    }
    Err(last)
}

/// [`read_shard`] without the retry through the map.
async fn read_one_shard(
    node: &Node,
    shard: GroupId,
    keys: Vec<Vec<u8>>,
    level: ReadLevel,
    use_cache: bool,
) -> Result<(Vec<Fetched>, ReadSource), ServiceError> {
    // Calls that need the leader pass the shard's breaker: a shard that
    // keeps failing fails them at once (a degraded read then goes straight
    // to its fallback). REPLICA reads need no leader.
    let call = match level {
        ReadLevel::Replica { .. } | ReadLevel::Any => None,
        ReadLevel::Leader | ReadLevel::Strong => Some(node.cluster.shard_call(shard)?),
    };
    let read = node.cluster.read(shard, &keys, level).await;
    if let Some(call) = call {
        call.finish(&read);
    }
    match read? {
        ShardRead::Local {
            state,
            source,
            range_version,
        } => {
            // A split between the ownership check and the read may have
            // deleted rows it gave away: then read through the map again.
            let moved = |state: &StateMachine| {
                state.range().map_or(0, |range| range.version) != range_version
            };
            // Keys in the hot cache are answered here; only the rest cost a
            // trip to the blocking pool (a thread handoff each way).
            let mut rows: Vec<Fetched> = Vec::with_capacity(keys.len());
            let mut missing = Vec::new();
            let store = state.store();
            for (slot, key) in keys.into_iter().enumerate() {
                let cached = if use_cache {
                    node.cache.peek(&key)
                } else {
                    None
                };
                match cached {
                    Some(row) => rows.push(Ok(unexpired(&store, &key, row))),
                    None => {
                        rows.push(Ok(None));
                        missing.push((slot, key));
                    }
                }
            }
            if missing.is_empty() {
                return Ok((rows, source));
            }
            let after = state.clone();
            let (slots, missing_keys): (Vec<usize>, Vec<Vec<u8>>) = missing.into_iter().unzip();
            let cache = node.cache.clone();
            let loaded = tokio::task::spawn_blocking(move || {
                read_local(&cache, &state, &missing_keys, use_cache, range_version)
            })
            .await?;
            for (slot, row) in slots.into_iter().zip(loaded) {
                rows[slot] = row;
            }
            if moved(&after) {
                return Err(ServiceError::Cluster(
                    crate::cluster::ClusterError::Rejected {
                        kind: quiver_raft::types::RejectKind::WrongShard,
                        message: format!("shard {shard} split during the read"),
                    },
                ));
            }
            Ok((rows, source))
        }
        remote @ ShardRead::Remote { .. } => {
            let leader_answered = matches!(level, ReadLevel::Leader | ReadLevel::Strong);
            decode_remote(node, shard, &keys, remote, leader_answered)
        }
    }
}

/// Rows another node answered for `keys`, decoded; kept as the shard's
/// last-known rows if this node holds no replica of it (`leader_answered`:
/// see [`crate::cache::LastKnown::remember`]).
fn decode_remote(
    node: &Node,
    shard: GroupId,
    keys: &[Vec<u8>],
    read: ShardRead,
    leader_answered: bool,
) -> Result<(Vec<Fetched>, ReadSource), ServiceError> {
    let ShardRead::Remote { rows, source } = read else {
        return Err(ServiceError::TaskFailed(format!(
            "shard {shard}: a local read where a peer's answer was expected"
        )));
    };
    // One row per key asked for, or the whole shard is unreadable: a short
    // reply must not turn rows into NOT_FOUND.
    if rows.len() != keys.len() {
        return Err(ServiceError::TaskFailed(format!(
            "node {} answered {} rows for {} keys",
            source.node_id,
            rows.len(),
            keys.len()
        )));
    }
    let remember = !node.last_known.is_off() && node.cluster.group(shard).is_none();
    let rows = rows
        .into_iter()
        .zip(keys)
        .map(|(row, key)| match row {
            None => {
                if remember {
                    node.last_known.remember(key, None, leader_answered);
                }
                Ok(None)
            }
            Some(bytes) => match decode_stored(&bytes) {
                Ok(row) => {
                    let row = row.map(Arc::new);
                    if remember {
                        node.last_known.remember(key, row.as_ref(), leader_answered);
                    }
                    Ok(row)
                }
                Err(error) => {
                    tracing::error!(%error, node = source.node_id, "row from a peer is corrupt; served as UNAVAILABLE");
                    Err(())
                }
            },
        })
        .collect();
    Ok((rows, source))
}

/// A cached row below its view's expiry floor reads as absent, as the store
/// would answer. An applied `Expire` touches no cache entry (a view-wide
/// sweep per round would empty the cache, and could still not reach a read
/// that took its placeholder before the floor moved and fills it after):
/// the floor is checked on every hit instead (one lock-free map lookup).
fn unexpired(
    store: &StateStore,
    key: &[u8],
    row: Option<Arc<StoredRow>>,
) -> Option<Arc<StoredRow>> {
    row.filter(|row| !store.is_expired(key, row.event_ts_us))
}

/// Reads keys from this node's replica, hot cache first. Blocking.
fn read_local(
    cache: &HotCache,
    state: &StateMachine,
    keys: &[Vec<u8>],
    use_cache: bool,
    range_version: u64,
) -> Vec<Fetched> {
    let mut results: Vec<Fetched> = vec![Ok(None); keys.len()];
    let mut misses = Vec::new();
    let floors_of = state.store();
    for (slot, key) in keys.iter().enumerate() {
        if !use_cache {
            misses.push((slot, None));
            continue;
        }
        match cache.lookup(key) {
            Lookup::Hit(row) => results[slot] = Ok(unexpired(&floors_of, key, row)),
            Lookup::Miss(guard) => misses.push((slot, guard)),
        }
    }
    if misses.is_empty() {
        return results;
    }
    let storage_keys: Vec<&[u8]> = misses
        .iter()
        .map(|(slot, _)| keys[*slot].as_slice())
        .collect();
    // Loaded after the placeholders: see ShardRead::Local.
    let fetched = state.store().get_rows(&storage_keys);
    // Rows read after a split gave them away are absent here but present in
    // the new shard: never cached. (A split updates the range before it
    // clears the cache, so a fill that passes this check is either of rows
    // read before the split, or removed by the clear.)
    let still_owned = state.range().map_or(0, |range| range.version) == range_version;
    for ((slot, guard), result) in misses.into_iter().zip(fetched) {
        results[slot] = match result {
            Ok(row) => {
                let row = row.map(Arc::new);
                if let Some(guard) = guard
                    && still_owned
                {
                    cache.fill(guard, row.clone());
                }
                Ok(row)
            }
            Err(error) => {
                tracing::error!(%error, "row unreadable; served as UNAVAILABLE");
                Err(())
            }
        };
    }
    results
}

/// How a fetched row is judged.
#[derive(Debug, Clone, Copy)]
struct Judge {
    now_us: i64,
    /// From a degraded fallback (a replica not known to be fresh).
    stale: bool,
    /// The Get asked for degraded answers.
    degraded: bool,
}

/// The value and status of one feature of one entity.
fn feature_result(
    view: &FeatureView,
    feature: &Feature,
    fetched: &Fetched,
    judge: Judge,
) -> pb::FeatureResult {
    let result = judged(view, feature, fetched, judge.now_us);
    if judge.degraded && fetched.is_err() {
        // Nothing could be read: the view's default, if it has one.
        if let Some(default) = &feature.default {
            metrics::counter!("quiver_degraded_serves_total", "status" => "defaulted").increment(1);
            return pb::FeatureResult {
                value: Some(value_to_pb(default)),
                status: pb::FeatureStatus::Defaulted as i32,
                event_ts_us: 0,
            };
        }
        return result;
    }
    if !judge.stale {
        return result;
    }
    metrics::counter!("quiver_degraded_serves_total", "status" => "stale").increment(1);
    match fetched {
        // A row the stale replica does not have may exist elsewhere: STALE
        // without a value, not NOT_FOUND or the default.
        Ok(None) => pb::FeatureResult {
            value: None,
            status: pb::FeatureStatus::Stale as i32,
            event_ts_us: 0,
        },
        // What it holds, marked as such (the source says STALE too, for
        // NULL_VALUE and OUTSIDE_MAX_AGE judged from it).
        Ok(Some(_)) if result.status() == pb::FeatureStatus::Present => pb::FeatureResult {
            status: pb::FeatureStatus::Stale as i32,
            ..result
        },
        _ => result,
    }
}

/// The value and status of one feature of one entity, as the row says.
fn judged(
    view: &FeatureView,
    feature: &Feature,
    fetched: &Fetched,
    now_us: i64,
) -> pb::FeatureResult {
    let status_only = |status: pb::FeatureStatus, event_ts_us: i64| pb::FeatureResult {
        value: None,
        status: status as i32,
        event_ts_us,
    };
    let defaulted = |event_ts_us: i64| match &feature.default {
        Some(default) => pb::FeatureResult {
            value: Some(value_to_pb(default)),
            status: pb::FeatureStatus::Defaulted as i32,
            event_ts_us,
        },
        None => status_only(pb::FeatureStatus::NotFound, event_ts_us),
    };
    let row = match fetched {
        Err(()) => return status_only(pb::FeatureStatus::Unavailable, 0),
        Ok(None) => return defaulted(0),
        Ok(Some(row)) => row,
    };
    if row.freshness(view.ttl_us(), now_us) == RowFreshness::Expired {
        return status_only(pb::FeatureStatus::OutsideMaxAge, row.event_ts_us);
    }
    match row.value(feature.field_id) {
        // The row predates the feature.
        None => defaulted(row.event_ts_us),
        Some(Value::Null) => status_only(pb::FeatureStatus::NullValue, row.event_ts_us),
        Some(value) => pb::FeatureResult {
            value: Some(value_to_pb(value)),
            status: pb::FeatureStatus::Present as i32,
            event_ts_us: row.event_ts_us,
        },
    }
}
