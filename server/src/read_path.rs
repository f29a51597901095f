//! The read path: resolve feature references, dedup entity keys, look rows up
//! in the hot cache and then in storage, and judge every value's status.

use std::collections::HashMap;
use std::sync::Arc;

use quiver_engine::keys::storage_key;
use quiver_engine::view::Feature;
use quiver_engine::{Catalog, FeatureView, RowFreshness, StoredRow, Value};
use quiver_proto::v1 as pb;

use crate::cache::Lookup;
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

/// Serves a Get. Blocking: call from a blocking thread.
pub fn get(node: &Node, request: pb::GetRequest) -> Result<pb::GetResponse, ServiceError> {
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
    let catalog = node.store.registry().load();
    let plan = ReadPlan::resolve(&catalog, &request.features)?;
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

    let rows = fetch(node, &plan.views, &unique_keys, !request.skip_cache);
    let now_us = node.store.clock().now_us();

    let entities = request
        .entity_keys
        .iter()
        .zip(&slots)
        .map(|(key, &slot)| pb::EntityResult {
            entity_key: key.clone(),
            features: plan
                .columns
                .iter()
                .map(|&(v, f)| {
                    let view = &plan.views[v];
                    feature_result(
                        view,
                        &view.features[f],
                        &rows[v * unique_keys.len() + slot],
                        now_us,
                    )
                })
                .collect(),
        })
        .collect();
    Ok(pb::GetResponse {
        feature_names: plan.names(),
        entities,
    })
}

/// Looks up `views x keys`, cache first. Result index: `view * keys.len() + key`.
fn fetch(node: &Node, views: &[Arc<FeatureView>], keys: &[&str], use_cache: bool) -> Vec<Fetched> {
    let mut results: Vec<Fetched> = vec![Ok(None); views.len() * keys.len()];
    let mut misses = Vec::new();
    for (v, view) in views.iter().enumerate() {
        for (k, key) in keys.iter().enumerate() {
            let slot = v * keys.len() + k;
            let storage = storage_key(view.id, key.as_bytes());
            if !use_cache {
                misses.push((slot, storage, None));
                continue;
            }
            match node.cache.lookup(&storage) {
                Lookup::Hit(row) => results[slot] = Ok(row),
                Lookup::Miss(guard) => misses.push((slot, storage, guard)),
            }
        }
    }
    if misses.is_empty() {
        return results;
    }
    let storage_keys: Vec<&[u8]> = misses.iter().map(|(_, key, _)| key.as_slice()).collect();
    let fetched = node.store.get_rows(&storage_keys);
    for ((slot, _, guard), result) in misses.into_iter().zip(fetched) {
        results[slot] = match result {
            Ok(row) => {
                let row = row.map(Arc::new);
                if let Some(guard) = guard {
                    node.cache.fill(guard, row.clone());
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

/// The value and status of one feature of one entity.
fn feature_result(
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
