//! Prometheus metrics: a recorder (the `metrics` crate's facade, rendered by
//! `metrics-exporter-prometheus`), a tower layer that counts and times every
//! gRPC call on the client port, a loop that copies the node's state (cache,
//! storage counters, every hosted group's Raft position) into gauges, and
//! the HTTP listener Prometheus scrapes (`metrics_listen_addr`, `/metrics`).
//!
//! Names end in their unit (`_seconds`, `_bytes`, `_total`). Label values
//! come from fixed sets (method names, status codes, group ids of this
//! cluster), never from what a client sends, so a client cannot grow the
//! number of series.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::routing::get;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use metrics_util::MetricKindMask;
use parking_lot::Mutex;

use crate::node::Node;

/// How often the gauges are refreshed from the node's state: cheap (one
/// pass over the hosted groups), and well under a scrape interval.
pub const METRICS_COLLECT_INTERVAL: Duration = Duration::from_secs(5);

/// A gauge not refreshed for this long is dropped from the output: a group
/// this node no longer leads has no follower lag, a deleted view no
/// freshness.
pub const METRICS_GAUGE_IDLE: Duration = Duration::from_secs(30);

/// Histogram buckets of request latency (seconds): 100 µs to 10 s.
const LATENCY_BUCKETS_SECONDS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// Methods of the client port, the only values of the `method` label.
const METHODS: &[&str] = &[
    "/quiver.v1.FeatureStore/ApplyFeatureView",
    "/quiver.v1.FeatureStore/ListFeatureViews",
    "/quiver.v1.FeatureStore/DeleteFeatureView",
    "/quiver.v1.FeatureStore/Write",
    "/quiver.v1.FeatureStore/WriteStream",
    "/quiver.v1.FeatureStore/Get",
    "/quiver.v1.FeatureStore/Invalidate",
    "/quiver.v1.FeatureStore/Delete",
    "/quiver.v1.FeatureStore/Status",
    "/quiver.admin.v1.Admin/TransferLeader",
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
];

/// Why metrics could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The recorder could not be built or installed.
    #[error("metrics recorder: {0}")]
    Recorder(#[from] metrics_exporter_prometheus::BuildError),
}

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide recorder (once; later calls return the same
/// handle).
pub fn install() -> Result<PrometheusHandle, MetricsError> {
    if let Some(handle) = HANDLE.get() {
        return Ok(handle.clone());
    }
    let handle = PrometheusBuilder::new()
        .idle_timeout(MetricKindMask::GAUGE, Some(METRICS_GAUGE_IDLE))
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &LATENCY_BUCKETS_SECONDS)?
        .install_recorder()?;
    describe();
    Ok(HANDLE.get_or_init(|| handle).clone())
}

/// HELP lines (docs/operations.md has the full table).
fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "quiver_requests_total",
        "Calls on the client port by method and status code."
    );
    describe_histogram!(
        "quiver_request_duration_seconds",
        metrics::Unit::Seconds,
        "Time to the response headers, by method."
    );
    describe_counter!(
        "quiver_rows_applied_total",
        "Rows this node's replicas applied."
    );
    describe_counter!(
        "quiver_rows_stale_total",
        "Rows refused as older than the stored row."
    );
    describe_counter!(
        "quiver_rows_compared_total",
        "Rows whose write read the stored row first: rows older than what their view \
         and key-hash bucket may hold in the shard."
    );
    describe_counter!(
        "quiver_cache_hits_total",
        "Hot cache lookups served from the cache."
    );
    describe_counter!(
        "quiver_cache_misses_total",
        "Hot cache lookups that went to storage."
    );
    describe_gauge!("quiver_group_is_leader", "1 if this node leads the group.");
    describe_gauge!(
        "quiver_group_term",
        "The group's Raft term as this replica knows it."
    );
    describe_gauge!(
        "quiver_group_follower_lag_entries",
        "On a leader: entries each follower is behind its last log."
    );
    describe_gauge!(
        "quiver_view_newest_event_time_seconds",
        "Newest event time written through this node, per view."
    );
    describe_counter!(
        "quiver_leader_handovers_total",
        "Handovers this node started as leader."
    );
    describe_gauge!(
        "quiver_peer_queue_depth_calls",
        "Calls waiting per peer and lane."
    );
    describe_counter!(
        "quiver_peer_calls_dropped_total",
        "Peer calls that got no answer."
    );
    describe_counter!(
        "quiver_degraded_serves_total",
        "Values a degraded Get answered stale or defaulted."
    );
    describe_gauge!(
        "quiver_tls_cert_expiry_timestamp_seconds",
        "When this node's certificate chain expires first (Unix time; reloaded on SIGHUP)."
    );
    describe_counter!(
        "quiver_degraded_fallbacks_total",
        "Shard reads of degraded Gets that fell back, by what answered."
    );
    describe_gauge!(
        "quiver_last_known_entries",
        "Rows kept from shards with no replica on this node."
    );
    describe_gauge!(
        "quiver_last_known_used_bytes",
        "Bytes of rows kept from shards with no replica on this node."
    );
    describe_counter!(
        "quiver_tls_handshake_failures_total",
        "TLS connections refused before any call, by port and reason."
    );
    describe_counter!(
        "quiver_tls_reloads_total",
        "SIGHUP reloads of the TLS files, by result."
    );
}

/// Serves `/metrics` on `listener` until `stop` resolves.
pub async fn serve<L>(
    listener: L,
    handle: PrometheusHandle,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()>
where
    L: axum::serve::Listener,
    L::Addr: std::fmt::Debug,
{
    let app = axum::Router::new().route(
        "/metrics",
        get(move || {
            let handle = handle.clone();
            async move { handle.render() }
        }),
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(stop)
        .await
}

/// Refreshes the gauges every [`METRICS_COLLECT_INTERVAL`] until the node
/// is gone or stopping.
pub async fn collect_loop(node: Weak<Node>, handle: PrometheusHandle, mut collector: Collector) {
    loop {
        tokio::time::sleep(METRICS_COLLECT_INTERVAL).await;
        let Some(node) = node.upgrade() else {
            return;
        };
        if node.cluster.is_stopping() {
            return;
        }
        collector.collect(&node);
        // Histograms are merged lazily; keep them from piling up between
        // scrapes.
        handle.run_upkeep();
    }
}

/// Copies the node's state into gauges and counters.
#[derive(Debug, Default)]
pub struct Collector {
    /// Each group's storage counters at the last pass: a store replaced by
    /// a snapshot install starts its counters at 0 again, so the totals
    /// advance by each store's own increase, never by a sum that can drop.
    rows_seen: HashMap<quiver_raft::GroupId, (u64, u64, u64)>,
}

impl Collector {
    /// One pass.
    pub fn collect(&mut self, node: &Node) {
        collect_state(node);
        let (mut applied, mut stale, mut compared) = (0, 0, 0);
        for (group, hosted) in node.cluster.groups() {
            let stats = hosted.state.store().stats();
            let now = (stats.rows_written, stats.rows_stale, stats.rows_compared);
            let before = self.rows_seen.insert(group, now).unwrap_or((0, 0, 0));
            // Lower than before: a new store, counting from 0.
            let increase = |now: u64, before: u64| if now >= before { now - before } else { now };
            applied += increase(now.0, before.0);
            stale += increase(now.1, before.1);
            compared += increase(now.2, before.2);
        }
        metrics::counter!("quiver_rows_applied_total").increment(applied);
        metrics::counter!("quiver_rows_stale_total").increment(stale);
        metrics::counter!("quiver_rows_compared_total").increment(compared);
        // Views that exist now; a deleted view's gauge goes idle.
        let catalog = node.registry.load();
        for (view, newest_us) in node
            .view_freshness
            .newest(|name| catalog.view(name).is_some())
        {
            metrics::gauge!("quiver_view_newest_event_time_seconds", "view" => view)
                .set(newest_us as f64 / 1e6);
        }
    }
}

/// The gauges and the counters that only grow while the process lives.
fn collect_state(node: &Node) {
    let cache = node.cache.stats();
    metrics::gauge!("quiver_cache_entries").set(cache.entries as f64);
    metrics::gauge!("quiver_cache_used_bytes").set(cache.bytes_used as f64);
    metrics::gauge!("quiver_cache_max_bytes").set(cache.bytes_max as f64);
    metrics::counter!("quiver_cache_hits_total").absolute(cache.hits);
    metrics::counter!("quiver_cache_misses_total").absolute(cache.misses);
    if let Some(tls) = &node.tls {
        metrics::gauge!("quiver_tls_cert_expiry_timestamp_seconds")
            .set(tls.expires_unix_s() as f64);
    }
    let (entries, bytes) = node.last_known.usage();
    metrics::gauge!("quiver_last_known_entries").set(entries as f64);
    metrics::gauge!("quiver_last_known_used_bytes").set(bytes as f64);
    for status in node.cluster.group_status() {
        let group = status.group.to_string();
        let labels = [("group", group.clone())];
        metrics::gauge!("quiver_group_is_leader", &labels).set(if status.role == "leader" {
            1.0
        } else {
            0.0
        });
        metrics::gauge!("quiver_group_asleep", &labels).set(if status.asleep { 1.0 } else { 0.0 });
        metrics::gauge!("quiver_group_term", &labels).set(status.term as f64);
        metrics::gauge!("quiver_group_applied_index", &labels).set(status.applied_index as f64);
        metrics::gauge!("quiver_group_last_log_index", &labels).set(status.last_log_index as f64);
        metrics::gauge!("quiver_group_log_bytes", &labels).set(status.log_bytes as f64);
        metrics::gauge!("quiver_group_rows_estimate", &labels).set(status.rows_estimate as f64);
        for lag in &status.lag {
            let labels = [
                ("group", group.clone()),
                ("follower", lag.node_id.to_string()),
            ];
            metrics::gauge!("quiver_group_follower_lag_entries", &labels)
                .set(lag.entries_behind as f64);
        }
    }
    for (peer, lane, depth) in node.cluster.peer_queue_depths() {
        let labels = [("peer", peer.to_string()), ("lane", lane.to_owned())];
        metrics::gauge!("quiver_peer_queue_depth_calls", &labels).set(depth as f64);
    }
    for (peer, state) in node.cluster.peer_breakers() {
        metrics::gauge!("quiver_peer_breaker_state", "peer" => peer.to_string()).set(state.gauge());
    }
    for (shard, state) in node.cluster.shard_breakers() {
        metrics::gauge!("quiver_shard_breaker_state", "shard" => shard.to_string())
            .set(state.gauge());
    }
    for (group, hosted) in node.cluster.groups() {
        let labels = [("group", group.to_string())];
        metrics::gauge!("quiver_group_leader_time_seconds", &labels)
            .set(hosted.state.leader_time_us() as f64 / 1e6);
    }
}

/// The newest event time written per view through this node, so that
/// `time() - quiver_view_newest_event_time_seconds` is how far behind a
/// materialization job is. Published by the [`Collector`], for views that
/// still exist.
#[derive(Debug, Default)]
pub struct Freshness {
    newest_us: Mutex<HashMap<String, i64>>,
}

impl Freshness {
    /// Records that rows of `view` up to event time `event_ts_us` were
    /// acknowledged (one short lock per write request; no allocation but
    /// for a view's first write).
    pub fn written(&self, view: &str, event_ts_us: i64) {
        let mut newest = self.newest_us.lock();
        match newest.get_mut(view) {
            Some(seen) => *seen = (*seen).max(event_ts_us),
            None => {
                newest.insert(view.to_owned(), event_ts_us);
            }
        }
    }

    /// Forgets a deleted view.
    pub fn forget(&self, view: &str) {
        self.newest_us.lock().remove(view);
    }

    /// Every view for which `exists` holds, with its newest event time;
    /// the others are forgotten (so the map never outgrows the registry).
    fn newest(&self, exists: impl Fn(&str) -> bool) -> Vec<(String, i64)> {
        let mut newest = self.newest_us.lock();
        newest.retain(|view, _| exists(view));
        newest
            .iter()
            .map(|(view, &ts)| (view.clone(), ts))
            .collect()
    }
}

/// Counts and times every call on the client port:
/// `quiver_requests_total{method, code}` and
/// `quiver_request_duration_seconds{method}` (to the response headers:
/// for unary calls, the whole handler).
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestMetricsLayer;

impl<S> tower::Layer<S> for RequestMetricsLayer {
    type Service = RequestMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequestMetrics { inner }
    }
}

/// See [`RequestMetricsLayer`].
#[derive(Debug, Clone)]
pub struct RequestMetrics<S> {
    inner: S,
}

impl<S, B, RB> tower::Service<http::Request<B>> for RequestMetrics<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = futures::future::BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let outcome = Outcome {
            method: method_label(request.uri().path()),
            started: Instant::now(),
            code: None,
        };
        let request_id = request_id_of(request.headers());
        let span = tracing::info_span!(
            "request",
            method = outcome.method,
            request_id = %request_id.to_str().unwrap_or_default()
        );
        let future = {
            let _entered = span.enter();
            REQUEST_ID.scope(
                Arc::from(request_id.to_str().unwrap_or_default()),
                self.inner.call(request),
            )
        };
        Box::pin(tracing::Instrument::instrument(
            async move {
                // The whole record moves into the future (not just the field
                // set below), so it drops when the future does.
                let mut outcome = outcome;
                let mut result = future.await;
                if let Ok(response) = &mut result {
                    response.headers_mut().insert(REQUEST_ID_HEADER, request_id);
                }
                outcome.code = Some(match &result {
                    // An error is in the headers (trailers-only); success is
                    // in the trailers, after the headers.
                    Ok(response) => response
                        .headers()
                        .get("grpc-status")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<i32>().ok())
                        .map_or(tonic::Code::Ok, tonic::Code::from_i32),
                    Err(_) => tonic::Code::Internal,
                });
                let elapsed_us =
                    u64::try_from(outcome.started.elapsed().as_micros()).unwrap_or(u64::MAX);
                tracing::debug!(code = ?outcome.code, elapsed_us, "request done");
                result
            },
            span,
        ))
    }
}

/// The header naming a request across the logs: the client's, else one
/// made up here; answered in the response headers either way.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

tokio::task_local! {
    /// The id of the client request the current task serves (set around
    /// every client call): peer calls made for it carry it, so the node
    /// that does the work logs under the same id.
    static REQUEST_ID: Arc<str>;
}

/// The id of the client request the current task serves, if any.
pub fn current_request_id() -> Option<Arc<str>> {
    REQUEST_ID.try_with(Arc::clone).ok()
}
/// Longest client request id kept (a longer or unprintable one is
/// replaced).
const REQUEST_ID_BYTES_MAX: usize = 64;

/// The request's id: its `x-request-id` if printable and short, else 16
/// random hex digits.
fn request_id_of(headers: &http::HeaderMap) -> http::HeaderValue {
    headers
        .get(REQUEST_ID_HEADER)
        .filter(|v| {
            !v.is_empty()
                && v.len() <= REQUEST_ID_BYTES_MAX
                && v.as_bytes().iter().all(|b| b.is_ascii_graphic())
        })
        .cloned()
        .unwrap_or_else(|| {
            http::HeaderValue::from_str(&format!("{:016x}", rand::random::<u64>()))
                .unwrap_or_else(|_| http::HeaderValue::from_static("unknown"))
        })
}

/// One call's record, written when the call ends, also when it never
/// finishes: past the client's deadline (`grpc-timeout`) tonic drops the
/// handler and answers `CANCELLED`, and a client that goes away drops it
/// too.
struct Outcome {
    method: &'static str,
    started: Instant,
    code: Option<tonic::Code>,
}

impl Drop for Outcome {
    fn drop(&mut self) {
        let code = self.code.unwrap_or(tonic::Code::Cancelled);
        metrics::counter!(
            "quiver_requests_total",
            "method" => self.method,
            "code" => code_label(code)
        )
        .increment(1);
        metrics::histogram!("quiver_request_duration_seconds", "method" => self.method)
            .record(self.started.elapsed().as_secs_f64());
    }
}

/// The `method` label of a request path: the method's name if it is one of
/// ours, "reflection" for server reflection, "other" for anything else.
fn method_label(path: &str) -> &'static str {
    if let Some(known) = METHODS.iter().find(|m| **m == path) {
        return known.rsplit('/').next().unwrap_or("other");
    }
    if path.starts_with("/grpc.reflection.") {
        "reflection"
    } else {
        "other"
    }
}

/// The `code` label: the status code's name, without an allocation per
/// request.
fn code_label(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "Ok",
        Code::Cancelled => "Cancelled",
        Code::Unknown => "Unknown",
        Code::InvalidArgument => "InvalidArgument",
        Code::DeadlineExceeded => "DeadlineExceeded",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Aborted => "Aborted",
        Code::OutOfRange => "OutOfRange",
        Code::Unimplemented => "Unimplemented",
        Code::Internal => "Internal",
        Code::Unavailable => "Unavailable",
        Code::DataLoss => "DataLoss",
        Code::Unauthenticated => "Unauthenticated",
    }
}

/// Records the outcome of a leader handover this node carried out.
pub fn handover(outcome: &'static str) {
    metrics::counter!("quiver_leader_handovers_total", "outcome" => outcome).increment(1);
}

/// Records a request part refused because a split moved its keys, routed
/// again: by the refusal's descriptors at once (`descriptor`), or after a
/// wait and a read of the cluster map (`map`).
pub fn wrong_shard_rerouted(kind: &'static str, by_descriptor: bool) {
    let route = if by_descriptor { "descriptor" } else { "map" };
    metrics::counter!("quiver_wrong_shard_reroutes_total", "kind" => kind, "route" => route)
        .increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_labels_come_from_a_fixed_set() {
        assert_eq!(method_label("/quiver.v1.FeatureStore/Get"), "Get");
        assert_eq!(
            method_label("/quiver.admin.v1.Admin/TransferLeader"),
            "TransferLeader"
        );
        assert_eq!(
            method_label("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"),
            "reflection"
        );
        assert_eq!(
            method_label("/quiver.v1.FeatureStore/NoSuchMethod"),
            "other"
        );
        assert_eq!(method_label("/x"), "other");
    }

    #[test]
    fn code_labels_are_the_codes_names() {
        for value in 0..=16 {
            let code = tonic::Code::from_i32(value);
            assert_eq!(code_label(code), format!("{code:?}"));
        }
    }
}
