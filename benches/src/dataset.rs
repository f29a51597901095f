//! The benchmark data set: one view of 10 features per entity, values derived
//! from the entity id so any response can be checked.

use quiver_proto::v1::value::Kind;
use quiver_proto::v1::{self as pb, ValueType};

/// The benchmark view's name.
pub const VIEW: &str = "bench_stats";
/// Features in the benchmark view.
pub const FEATURES: usize = 10;

/// Entity key of id `id`.
pub fn entity_key(id: u64) -> String {
    format!("user:{id:010}")
}

fn feature_type(index: usize) -> ValueType {
    match index {
        0..=4 => ValueType::Double,
        5..=7 => ValueType::Int64,
        8 => ValueType::Float,
        _ => ValueType::String,
    }
}

/// The view definition.
pub fn view() -> pb::FeatureView {
    pb::FeatureView {
        name: VIEW.into(),
        entities: vec!["user_id".into()],
        features: (0..FEATURES)
            .map(|i| pb::FeatureSpec {
                name: format!("f{i}"),
                r#type: feature_type(i) as i32,
                default_value: None,
            })
            .collect(),
        ttl_seconds: 0,
        description: "quiver-bench data set".into(),
        version: 0,
    }
}

/// Feature `index` of entity `id` at write generation `generation`. Feature
/// 0 is always the id itself, so reads can be checked under concurrent writes.
pub fn value(id: u64, index: usize, generation: u64) -> pb::Value {
    let x = id.wrapping_mul(2654435761).wrapping_add(generation);
    let kind = match feature_type(index) {
        ValueType::Double if index == 0 => Kind::DoubleVal(id as f64),
        ValueType::Double => Kind::DoubleVal((x % 10_000) as f64 / 100.0),
        ValueType::Int64 => Kind::Int64Val((x % 100_000) as i64),
        ValueType::Float => Kind::FloatVal((x % 1000) as f32 / 10.0),
        _ => Kind::StringVal(format!("seg-{:011}", x % 100_000_000_000)),
    };
    pb::Value { kind: Some(kind) }
}

/// The full row of entity `id`.
pub fn row(id: u64, event_ts_us: i64, generation: u64) -> pb::WriteRow {
    pb::WriteRow {
        entity_key: entity_key(id),
        event_ts_us,
        values: (0..FEATURES)
            .map(|i| (format!("f{i}"), value(id, i, generation)))
            .collect(),
    }
}

/// Whether a response's feature 0 matches the entity it is for.
pub fn check_entity(entity: &pb::EntityResult) -> Result<(), String> {
    let id: u64 = entity
        .entity_key
        .strip_prefix("user:")
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("unexpected key {}", entity.entity_key))?;
    match entity
        .features
        .first()
        .and_then(|f| f.value.as_ref())
        .and_then(|v| v.kind.as_ref())
    {
        Some(Kind::DoubleVal(v)) if *v == id as f64 => Ok(()),
        other => Err(format!(
            "{}: f0 is {other:?}, expected {id}",
            entity.entity_key
        )),
    }
}

/// A write of `rows` to the benchmark view.
pub fn write_request(rows: Vec<pb::WriteRow>) -> pb::WriteRequest {
    pb::WriteRequest {
        view: VIEW.into(),
        rows,
    }
}
