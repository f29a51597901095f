//! Parsing feature values from CSV cells and JSON, by the feature's type.

use anyhow::{Context, Result, anyhow, bail};
use quiver_proto::v1::value::Kind;
use quiver_proto::v1::{self as pb, ValueType};

/// Microseconds from an integer (µs since epoch) or an RFC 3339 timestamp.
pub fn parse_timestamp_us(text: &str) -> Result<i64> {
    let text = text.trim();
    if let Ok(us) = text.parse::<i64>() {
        return Ok(us);
    }
    let time = humantime::parse_rfc3339_weak(text)
        .with_context(|| format!("{text:?} is not µs since epoch or RFC 3339"))?;
    let since = time
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|_| anyhow!("{text:?} is before 1970"))?;
    i64::try_from(since.as_micros()).map_err(|_| anyhow!("{text:?} is out of range"))
}

/// A value from a CSV cell. Empty is null; lists are JSON arrays.
pub fn from_text(value_type: ValueType, text: &str) -> Result<pb::Value> {
    if text.is_empty() {
        return Ok(pb::Value { kind: None });
    }
    let kind = match value_type {
        ValueType::Int64 => Kind::Int64Val(
            text.trim()
                .parse()
                .with_context(|| format!("{text:?} is not an int64"))?,
        ),
        ValueType::Double => Kind::DoubleVal(
            text.trim()
                .parse()
                .with_context(|| format!("{text:?} is not a double"))?,
        ),
        ValueType::Float => Kind::FloatVal(
            text.trim()
                .parse()
                .with_context(|| format!("{text:?} is not a float"))?,
        ),
        ValueType::Bool => Kind::BoolVal(match text.trim() {
            "true" | "1" => true,
            "false" | "0" => false,
            other => bail!("{other:?} is not a bool"),
        }),
        ValueType::String => Kind::StringVal(text.to_owned()),
        ValueType::Bytes => Kind::BytesVal(text.as_bytes().to_vec()),
        ValueType::UnixTimestamp => Kind::UnixTimestampVal(parse_timestamp_us(text)?),
        _ => {
            let json: serde_json::Value = serde_json::from_str(text)
                .with_context(|| format!("{text:?} is not a JSON list"))?;
            return from_json(value_type, &json);
        }
    };
    Ok(pb::Value { kind: Some(kind) })
}

fn items<T>(
    json: &serde_json::Value,
    item: impl Fn(&serde_json::Value) -> Option<T>,
    what: &str,
) -> Result<Vec<T>> {
    let array = json
        .as_array()
        .ok_or_else(|| anyhow!("{json} is not a list"))?;
    array
        .iter()
        .map(|v| item(v).ok_or_else(|| anyhow!("{v} is not {what}")))
        .collect()
}

fn timestamp(json: &serde_json::Value) -> Option<i64> {
    json.as_i64()
        .or_else(|| json.as_str().and_then(|s| parse_timestamp_us(s).ok()))
}

/// A value from JSON, by type. `null` is null.
pub fn from_json(value_type: ValueType, json: &serde_json::Value) -> Result<pb::Value> {
    if json.is_null() {
        return Ok(pb::Value { kind: None });
    }
    let wrong = || anyhow!("{json} is not {}", value_type.as_str_name().to_lowercase());
    let kind = match value_type {
        ValueType::Int64 => Kind::Int64Val(json.as_i64().ok_or_else(wrong)?),
        ValueType::Double => Kind::DoubleVal(json.as_f64().ok_or_else(wrong)?),
        ValueType::Float => Kind::FloatVal(json.as_f64().ok_or_else(wrong)? as f32),
        ValueType::Bool => Kind::BoolVal(json.as_bool().ok_or_else(wrong)?),
        ValueType::String => Kind::StringVal(json.as_str().ok_or_else(wrong)?.to_owned()),
        ValueType::Bytes => Kind::BytesVal(json.as_str().ok_or_else(wrong)?.as_bytes().to_vec()),
        ValueType::UnixTimestamp => Kind::UnixTimestampVal(timestamp(json).ok_or_else(wrong)?),
        ValueType::Int64List => Kind::Int64ListVal(pb::Int64List {
            values: items(json, |v| v.as_i64(), "an int64")?,
        }),
        ValueType::DoubleList => Kind::DoubleListVal(pb::DoubleList {
            values: items(json, |v| v.as_f64(), "a double")?,
        }),
        ValueType::FloatList => Kind::FloatListVal(pb::FloatList {
            values: items(json, |v| v.as_f64().map(|f| f as f32), "a float")?,
        }),
        ValueType::BoolList => Kind::BoolListVal(pb::BoolList {
            values: items(json, |v| v.as_bool(), "a bool")?,
        }),
        ValueType::StringList => Kind::StringListVal(pb::StringList {
            values: items(json, |v| v.as_str().map(str::to_owned), "a string")?,
        }),
        ValueType::BytesList => Kind::BytesListVal(pb::BytesList {
            values: items(
                json,
                |v| v.as_str().map(|s| s.as_bytes().to_vec()),
                "a string",
            )?,
        }),
        ValueType::UnixTimestampList => Kind::UnixTimestampListVal(pb::Int64List {
            values: items(json, timestamp, "a timestamp")?,
        }),
        ValueType::Unspecified => bail!("feature has no type"),
    };
    Ok(pb::Value { kind: Some(kind) })
}

/// A value as JSON, for `--json` output.
pub fn to_json(value: &pb::Value) -> serde_json::Value {
    use serde_json::json;
    match &value.kind {
        None => serde_json::Value::Null,
        Some(kind) => match kind {
            Kind::Int64Val(v) | Kind::UnixTimestampVal(v) => json!(v),
            Kind::DoubleVal(v) => json!(v),
            // Through the shortest f32 text, so 0.65 prints as 0.65, not 0.6499999761581421.
            Kind::FloatVal(v) => v
                .to_string()
                .parse::<f64>()
                .map_or(serde_json::Value::Null, |f| json!(f)),
            Kind::BoolVal(v) => json!(v),
            Kind::StringVal(v) => json!(v),
            Kind::BytesVal(v) => json!(String::from_utf8_lossy(v)),
            Kind::Int64ListVal(l) | Kind::UnixTimestampListVal(l) => json!(l.values),
            Kind::DoubleListVal(l) => json!(l.values),
            Kind::FloatListVal(l) => json!(l.values),
            Kind::BoolListVal(l) => json!(l.values),
            Kind::StringListVal(l) => json!(l.values),
            Kind::BytesListVal(l) => json!(
                l.values
                    .iter()
                    .map(|b| String::from_utf8_lossy(b))
                    .collect::<Vec<_>>()
            ),
        },
    }
}

/// A value as table text (timestamps as RFC 3339).
pub fn to_text(value: &pb::Value) -> String {
    if let Some(Kind::UnixTimestampVal(us)) = value.kind
        && let Ok(us) = u64::try_from(us)
    {
        let time = std::time::UNIX_EPOCH + std::time::Duration::from_micros(us);
        return humantime::format_rfc3339_seconds(time).to_string();
    }
    match to_json(value) {
        serde_json::Value::String(s) => s,
        serde_json::Value::Null => String::new(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_and_json_parse_by_type() {
        assert_eq!(
            from_text(ValueType::Int64, "42").unwrap().kind,
            Some(Kind::Int64Val(42))
        );
        assert_eq!(from_text(ValueType::Int64, "").unwrap().kind, None);
        assert!(from_text(ValueType::Int64, "x").is_err());
        assert!(from_text(ValueType::Bool, "yes").is_err());
        assert_eq!(
            from_text(ValueType::StringList, r#"["a","b"]"#)
                .unwrap()
                .kind,
            Some(Kind::StringListVal(pb::StringList {
                values: vec!["a".into(), "b".into()]
            }))
        );
        assert_eq!(
            parse_timestamp_us("1970-01-01T00:00:01Z").unwrap(),
            1_000_000
        );
        assert_eq!(parse_timestamp_us("17").unwrap(), 17);
        assert!(from_json(ValueType::Double, &serde_json::json!("x")).is_err());
        assert_eq!(
            from_json(ValueType::Float, &serde_json::json!(1.5))
                .unwrap()
                .kind,
            Some(Kind::FloatVal(1.5))
        );
    }
}
