//! The benchmark data set: one view of 10 features per entity, values derived
//! from the entity id so any response can be checked.

use prost::Message;
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
    let f0 = entity.features.first();
    // The status says why a value is missing: UNAVAILABLE (a shard that
    // could not be read, counted by the server) is not NOT_FOUND (a lost
    // row).
    check_f0(id, f0.and_then(|f| f.value.as_ref())).map_err(|e| {
        let status = f0.map_or("no feature", |f| f.status().as_str_name());
        format!("{e} (status {status})")
    })
}

/// Whether `f0`, feature 0 as read back for entity `id`, is that entity's.
pub fn check_f0(id: u64, f0: Option<&pb::Value>) -> Result<(), String> {
    match f0.and_then(|v| v.kind.as_ref()) {
        Some(Kind::DoubleVal(v)) if *v == id as f64 => Ok(()),
        other => Err(format!("entity {id}: f0 is {other:?}, expected {id}")),
    }
}

/// Feature names `f0`..`f9`, as the peers store them.
pub fn feature_names() -> Vec<String> {
    (0..FEATURES).map(|i| format!("f{i}")).collect()
}

/// One protobuf-encoded value, as Feast stores a feature in a Redis hash.
pub fn encoded_value(id: u64, index: usize, generation: u64) -> Vec<u8> {
    value(id, index, generation).encode_to_vec()
}

/// The packed blob of a whole row, for key-value peers that store one value
/// per entity (Redis MGET, etcd): the event time (8 bytes, little endian),
/// then the 10 values, each length-delimited protobuf.
pub fn packed_row(id: u64, event_ts_us: i64, generation: u64) -> Vec<u8> {
    let mut blob = Vec::with_capacity(8 + FEATURES * 24);
    blob.extend_from_slice(&event_ts_us.to_le_bytes());
    for index in 0..FEATURES {
        // Writing into a Vec cannot run out of room.
        let _ = value(id, index, generation).encode_length_delimited(&mut blob);
    }
    blob
}

/// Decodes a packed blob back into its event time and values.
pub fn unpack_row(blob: &[u8]) -> Result<(i64, Vec<pb::Value>), String> {
    let (ts, mut rest) = blob
        .split_first_chunk::<8>()
        .ok_or_else(|| format!("blob of {} bytes is too short", blob.len()))?;
    let mut values = Vec::with_capacity(FEATURES);
    while !rest.is_empty() {
        values
            .push(pb::Value::decode_length_delimited(&mut rest).map_err(|e| format!("blob: {e}"))?);
    }
    Ok((i64::from_le_bytes(*ts), values))
}

/// A write of `rows` to the benchmark view.
pub fn write_request(rows: Vec<pb::WriteRow>) -> pb::WriteRequest {
    pb::WriteRequest {
        view: VIEW.into(),
        rows,
        request_id: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packed_rows_round_trip_and_check() {
        let blob = packed_row(42, 1_700_000_000_000_000, 3);
        let (ts, values) = unpack_row(&blob).unwrap();
        assert_eq!(ts, 1_700_000_000_000_000);
        assert_eq!(values.len(), FEATURES);
        assert_eq!(values[9], value(42, 9, 3));
        check_f0(42, values.first()).unwrap();
        assert!(check_f0(43, values.first()).is_err());
        assert!(unpack_row(&blob[..5]).is_err());
        assert!(unpack_row(&blob[..blob.len() - 1]).is_err());
    }
}
