//! Typed feature values and their types.

use serde::{Deserialize, Serialize};

/// The type of a feature. Tags are stable: they are stored in every encoded
/// value and match the wire enum's numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[repr(u8)]
pub enum ValueType {
    /// 64-bit signed integer.
    Int64 = 1,
    /// 64-bit float.
    Double = 2,
    /// 32-bit float.
    Float = 3,
    /// Boolean.
    Bool = 4,
    /// UTF-8 string.
    String = 5,
    /// Opaque bytes.
    Bytes = 6,
    /// Microseconds since the Unix epoch.
    UnixTimestamp = 7,
    /// List of int64.
    Int64List = 11,
    /// List of double.
    DoubleList = 12,
    /// List of float.
    FloatList = 13,
    /// List of bool.
    BoolList = 14,
    /// List of string.
    StringList = 15,
    /// List of bytes.
    BytesList = 16,
    /// List of unix timestamps (microseconds).
    UnixTimestampList = 17,
}

impl ValueType {
    /// Every type, in tag order.
    pub const ALL: [ValueType; 14] = [
        ValueType::Int64,
        ValueType::Double,
        ValueType::Float,
        ValueType::Bool,
        ValueType::String,
        ValueType::Bytes,
        ValueType::UnixTimestamp,
        ValueType::Int64List,
        ValueType::DoubleList,
        ValueType::FloatList,
        ValueType::BoolList,
        ValueType::StringList,
        ValueType::BytesList,
        ValueType::UnixTimestampList,
    ];

    /// The stable tag of this type.
    pub fn tag(self) -> u8 {
        self as u8
    }

    /// The type with tag `tag`, if any.
    pub fn from_tag(tag: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.tag() == tag)
    }

    /// The type's name as users write it in view files.
    pub fn name(self) -> &'static str {
        match self {
            ValueType::Int64 => "int64",
            ValueType::Double => "double",
            ValueType::Float => "float",
            ValueType::Bool => "bool",
            ValueType::String => "string",
            ValueType::Bytes => "bytes",
            ValueType::UnixTimestamp => "unix_timestamp",
            ValueType::Int64List => "int64_list",
            ValueType::DoubleList => "double_list",
            ValueType::FloatList => "float_list",
            ValueType::BoolList => "bool_list",
            ValueType::StringList => "string_list",
            ValueType::BytesList => "bytes_list",
            ValueType::UnixTimestampList => "unix_timestamp_list",
        }
    }

    /// Parses a type name (as printed by [`ValueType::name`]).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.name() == name)
    }
}

impl std::fmt::Display for ValueType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One feature value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Value {
    /// No value.
    Null,
    /// int64.
    Int64(i64),
    /// double.
    Double(f64),
    /// float.
    Float(f32),
    /// bool.
    Bool(bool),
    /// string.
    String(String),
    /// bytes.
    Bytes(Vec<u8>),
    /// Microseconds since the Unix epoch.
    UnixTimestamp(i64),
    /// int64 list.
    Int64List(Vec<i64>),
    /// double list.
    DoubleList(Vec<f64>),
    /// float list.
    FloatList(Vec<f32>),
    /// bool list.
    BoolList(Vec<bool>),
    /// string list.
    StringList(Vec<String>),
    /// bytes list.
    BytesList(Vec<Vec<u8>>),
    /// unix timestamp list.
    UnixTimestampList(Vec<i64>),
}

impl Value {
    /// The value's type; `None` for null, which fits every type.
    pub fn value_type(&self) -> Option<ValueType> {
        Some(match self {
            Value::Null => return None,
            Value::Int64(_) => ValueType::Int64,
            Value::Double(_) => ValueType::Double,
            Value::Float(_) => ValueType::Float,
            Value::Bool(_) => ValueType::Bool,
            Value::String(_) => ValueType::String,
            Value::Bytes(_) => ValueType::Bytes,
            Value::UnixTimestamp(_) => ValueType::UnixTimestamp,
            Value::Int64List(_) => ValueType::Int64List,
            Value::DoubleList(_) => ValueType::DoubleList,
            Value::FloatList(_) => ValueType::FloatList,
            Value::BoolList(_) => ValueType::BoolList,
            Value::StringList(_) => ValueType::StringList,
            Value::BytesList(_) => ValueType::BytesList,
            Value::UnixTimestampList(_) => ValueType::UnixTimestampList,
        })
    }

    /// The type's name, or "null".
    pub fn type_name(&self) -> &'static str {
        self.value_type().map_or("null", ValueType::name)
    }

    /// Whether the value is null.
    pub fn is_null(&self) -> bool {
        matches!(self, Value::Null)
    }

    /// Whether every number in the value is finite (no NaN, no infinity).
    /// A view's default must be: the registry stores views as JSON, which
    /// has no NaN or infinity, so such a default would not read back.
    pub fn is_finite(&self) -> bool {
        match self {
            Value::Double(v) => v.is_finite(),
            Value::Float(v) => v.is_finite(),
            Value::DoubleList(v) => v.iter().all(|x| x.is_finite()),
            Value::FloatList(v) => v.iter().all(|x| x.is_finite()),
            _ => true,
        }
    }

    /// Approximate payload size in bytes: what value-size limits and cache
    /// weights count.
    pub fn payload_bytes(&self) -> usize {
        match self {
            Value::Null => 0,
            Value::Bool(_) => 1,
            Value::Float(_) => 4,
            Value::Int64(_) | Value::Double(_) | Value::UnixTimestamp(_) => 8,
            Value::String(s) => s.len(),
            Value::Bytes(b) => b.len(),
            Value::Int64List(v) | Value::UnixTimestampList(v) => v.len() * 8,
            Value::DoubleList(v) => v.len() * 8,
            Value::FloatList(v) => v.len() * 4,
            Value::BoolList(v) => v.len(),
            Value::StringList(v) => v.iter().map(|s| s.len() + 4).sum(),
            Value::BytesList(v) => v.iter().map(|b| b.len() + 4).sum(),
        }
    }
}

/// Proptest strategies for values, shared by the engine's tests.
#[cfg(test)]
pub(crate) mod strategies {
    use super::Value;
    use proptest::prelude::*;

    /// Any value of any type, NaN and infinities included.
    pub(crate) fn any_value() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            any::<i64>().prop_map(Value::Int64),
            any::<f64>().prop_map(Value::Double),
            any::<f32>().prop_map(Value::Float),
            any::<bool>().prop_map(Value::Bool),
            ".{0,40}".prop_map(Value::String),
            proptest::collection::vec(any::<u8>(), 0..40).prop_map(Value::Bytes),
            any::<i64>().prop_map(Value::UnixTimestamp),
            proptest::collection::vec(any::<i64>(), 0..8).prop_map(Value::Int64List),
            proptest::collection::vec(any::<f64>(), 0..8).prop_map(Value::DoubleList),
            proptest::collection::vec(any::<f32>(), 0..8).prop_map(Value::FloatList),
            proptest::collection::vec(any::<bool>(), 0..8).prop_map(Value::BoolList),
            proptest::collection::vec(".{0,10}", 0..5).prop_map(Value::StringList),
            proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..10), 0..5)
                .prop_map(Value::BytesList),
            proptest::collection::vec(any::<i64>(), 0..8).prop_map(Value::UnixTimestampList),
        ]
    }
}
