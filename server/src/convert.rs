//! Conversions between the wire types (`quiver_proto::v1`) and the engine's.

use quiver_engine::view::FeatureSpec;
use quiver_engine::{FeatureView, Value, ValueType, ViewSpec};
use quiver_proto::v1 as pb;
use quiver_proto::v1::value::Kind;

use crate::error::ServiceError;

/// Engine type of a wire type; `None` for `VALUE_TYPE_UNSPECIFIED` or unknown.
pub fn value_type_from_pb(raw: i32) -> Option<ValueType> {
    let wire = pb::ValueType::try_from(raw).ok()?;
    // The wire enum's numbers are the engine's tags by construction.
    u8::try_from(wire as i32).ok().and_then(ValueType::from_tag)
}

/// Wire type of an engine type.
pub fn value_type_to_pb(value_type: ValueType) -> pb::ValueType {
    pb::ValueType::try_from(i32::from(value_type.tag()))
        .expect("every engine tag is a wire enum value")
}

/// Engine value of a wire value (no kind = null).
pub fn value_from_pb(value: pb::Value) -> Value {
    match value.kind {
        None => Value::Null,
        Some(kind) => match kind {
            Kind::Int64Val(v) => Value::Int64(v),
            Kind::DoubleVal(v) => Value::Double(v),
            Kind::FloatVal(v) => Value::Float(v),
            Kind::BoolVal(v) => Value::Bool(v),
            Kind::StringVal(v) => Value::String(v),
            Kind::BytesVal(v) => Value::Bytes(v),
            Kind::UnixTimestampVal(v) => Value::UnixTimestamp(v),
            Kind::Int64ListVal(l) => Value::Int64List(l.values),
            Kind::DoubleListVal(l) => Value::DoubleList(l.values),
            Kind::FloatListVal(l) => Value::FloatList(l.values),
            Kind::BoolListVal(l) => Value::BoolList(l.values),
            Kind::StringListVal(l) => Value::StringList(l.values),
            Kind::BytesListVal(l) => Value::BytesList(l.values),
            Kind::UnixTimestampListVal(l) => Value::UnixTimestampList(l.values),
        },
    }
}

/// Wire value of an engine value.
pub fn value_to_pb(value: &Value) -> pb::Value {
    let kind = match value {
        Value::Null => None,
        Value::Int64(v) => Some(Kind::Int64Val(*v)),
        Value::Double(v) => Some(Kind::DoubleVal(*v)),
        Value::Float(v) => Some(Kind::FloatVal(*v)),
        Value::Bool(v) => Some(Kind::BoolVal(*v)),
        Value::String(v) => Some(Kind::StringVal(v.clone())),
        Value::Bytes(v) => Some(Kind::BytesVal(v.clone())),
        Value::UnixTimestamp(v) => Some(Kind::UnixTimestampVal(*v)),
        Value::Int64List(v) => Some(Kind::Int64ListVal(pb::Int64List { values: v.clone() })),
        Value::DoubleList(v) => Some(Kind::DoubleListVal(pb::DoubleList { values: v.clone() })),
        Value::FloatList(v) => Some(Kind::FloatListVal(pb::FloatList { values: v.clone() })),
        Value::BoolList(v) => Some(Kind::BoolListVal(pb::BoolList { values: v.clone() })),
        Value::StringList(v) => Some(Kind::StringListVal(pb::StringList { values: v.clone() })),
        Value::BytesList(v) => Some(Kind::BytesListVal(pb::BytesList { values: v.clone() })),
        Value::UnixTimestampList(v) => Some(Kind::UnixTimestampListVal(pb::Int64List {
            values: v.clone(),
        })),
    };
    pb::Value { kind }
}

/// The engine spec of a wire view. Checks what the wire allows but the engine
/// type cannot express (an unset type).
pub fn view_spec_from_pb(view: pb::FeatureView) -> Result<ViewSpec, ServiceError> {
    let features = view
        .features
        .into_iter()
        .map(|f| {
            let value_type = value_type_from_pb(f.r#type).ok_or_else(|| {
                ServiceError::invalid(format!(
                    "feature {}:{} has no valid type",
                    view.name, f.name
                ))
            })?;
            Ok(FeatureSpec {
                name: f.name,
                value_type,
                default: f.default_value.map(value_from_pb),
            })
        })
        .collect::<Result<_, ServiceError>>()?;
    Ok(ViewSpec {
        name: view.name,
        entities: view.entities,
        features,
        ttl_seconds: view.ttl_seconds,
        description: view.description,
    })
}

/// The wire form of a stored view.
pub fn view_to_pb(view: &FeatureView) -> pb::FeatureView {
    pb::FeatureView {
        name: view.name.clone(),
        entities: view.entities.clone(),
        features: view
            .features
            .iter()
            .map(|f| pb::FeatureSpec {
                name: f.name.clone(),
                r#type: value_type_to_pb(f.value_type) as i32,
                default_value: f.default.as_ref().map(value_to_pb),
            })
            .collect(),
        ttl_seconds: view.ttl_seconds,
        description: view.description.clone(),
        version: view.version,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_type_maps_both_ways() {
        for value_type in ValueType::ALL {
            assert_eq!(
                value_type_from_pb(value_type_to_pb(value_type) as i32),
                Some(value_type)
            );
        }
        assert_eq!(value_type_from_pb(0), None);
        assert_eq!(value_type_from_pb(999), None);
    }

    #[test]
    fn values_map_both_ways() {
        let values = [
            Value::Null,
            Value::Int64(-3),
            Value::Float(1.5),
            Value::String("s".into()),
            Value::BytesList(vec![vec![1], vec![]]),
            Value::UnixTimestampList(vec![7]),
        ];
        for value in values {
            assert_eq!(value_from_pb(value_to_pb(&value)), value);
        }
    }
}
