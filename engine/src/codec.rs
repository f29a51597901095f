//! The versioned binary encoding of a stored row.
//!
//! ```text
//! row    := version:u8 (=1) event_ts_us:i64le written_ts_us:i64le count:varint field*
//! field  := field_id:varint tag:u8 payload
//! ```
//! A tombstone (what a delete leaves, so that an older write arriving later
//! stays deleted) is the header alone, with its own version byte:
//!
//! ```text
//! tombstone := version:u8 (=2) event_ts_us:i64le written_ts_us:i64le
//! ```
//! Tag 0 is null (no payload); other tags are [`ValueType`] tags. Scalars are
//! fixed-width little endian; strings and bytes are `len:varint bytes`; lists
//! are `count:varint element*`. Field ids are strictly increasing.
//!
//! The decoder rejects anything it cannot read exactly: unknown version or
//! tag, truncation, lengths beyond the input, non-canonical bools, invalid
//! UTF-8, unsorted fields, trailing bytes. It never allocates more than the
//! input could hold, so a hostile length cannot exhaust memory.

use crate::row::{FieldId, StoredRow};
use crate::value::{Value, ValueType};

/// The only row encoding version this build reads and writes.
pub const ROW_FORMAT_VERSION: u8 = 1;
/// First byte of a tombstone.
pub const TOMBSTONE_FORMAT_VERSION: u8 = 2;
const HEADER_BYTES: usize = 1 + 8 + 8;
const NULL_TAG: u8 = 0;

/// Why bytes do not decode as a row.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason} at byte {offset}")]
pub struct DecodeError {
    /// What is wrong.
    pub reason: &'static str,
    /// Where in the input.
    pub offset: usize,
}

/// Appends the encoding of `row` to `out`.
pub fn encode_row(row: &StoredRow, out: &mut Vec<u8>) {
    encode_row_parts(row.event_ts_us, row.written_ts_us, &row.values, out);
}

/// Appends the encoding of a row given by its parts: lets the write path
/// encode borrowed values without building a [`StoredRow`] copy.
pub fn encode_row_parts(
    event_ts_us: i64,
    written_ts_us: i64,
    values: &[(FieldId, Value)],
    out: &mut Vec<u8>,
) {
    debug_assert!(
        values.windows(2).all(|w| w[0].0 < w[1].0),
        "row fields must be sorted and unique"
    );
    out.push(ROW_FORMAT_VERSION);
    out.extend_from_slice(&event_ts_us.to_le_bytes());
    out.extend_from_slice(&written_ts_us.to_le_bytes());
    put_varint(out, values.len() as u64);
    for (field, value) in values {
        put_varint(out, u64::from(*field));
        encode_value(value, out);
    }
}

/// The encoding of `row` as a new buffer.
pub fn encode_row_to_vec(row: &StoredRow) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_BYTES + 16 * row.values.len());
    encode_row(row, &mut out);
    out
}

/// Appends the encoding of one value (its type tag, then its payload).
pub fn encode_value(value: &Value, out: &mut Vec<u8>) {
    let Some(value_type) = value.value_type() else {
        out.push(NULL_TAG);
        return;
    };
    out.push(value_type.tag());
    match value {
        Value::Null => {}
        Value::Int64(v) | Value::UnixTimestamp(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::Double(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::Float(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::Bool(v) => out.push(u8::from(*v)),
        Value::String(s) => put_bytes(out, s.as_bytes()),
        Value::Bytes(b) => put_bytes(out, b),
        Value::Int64List(v) | Value::UnixTimestampList(v) => {
            put_varint(out, v.len() as u64);
            v.iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes()));
        }
        Value::DoubleList(v) => {
            put_varint(out, v.len() as u64);
            v.iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes()));
        }
        Value::FloatList(v) => {
            put_varint(out, v.len() as u64);
            v.iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes()));
        }
        Value::BoolList(v) => {
            put_varint(out, v.len() as u64);
            v.iter().for_each(|x| out.push(u8::from(*x)));
        }
        Value::StringList(v) => {
            put_varint(out, v.len() as u64);
            v.iter().for_each(|s| put_bytes(out, s.as_bytes()));
        }
        Value::BytesList(v) => {
            put_varint(out, v.len() as u64);
            v.iter().for_each(|b| put_bytes(out, b));
        }
    }
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// Appends a tombstone: the entity was deleted as of `event_ts_us`.
pub fn encode_tombstone(event_ts_us: i64, written_ts_us: i64, out: &mut Vec<u8>) {
    out.push(TOMBSTONE_FORMAT_VERSION);
    out.extend_from_slice(&event_ts_us.to_le_bytes());
    out.extend_from_slice(&written_ts_us.to_le_bytes());
}

/// Reads only the event time of an encoded row or tombstone: what
/// last-write-wins and the ttl compaction filter need, without decoding the
/// values.
pub fn peek_event_ts(bytes: &[u8]) -> Result<i64, DecodeError> {
    let mut reader = Reader { bytes, offset: 0 };
    if bytes.first() == Some(&TOMBSTONE_FORMAT_VERSION) {
        return reader.tombstone().map(|(event_ts, _)| event_ts);
    }
    reader.header().map(|(event_ts, _)| event_ts)
}

/// Decodes a stored record: `Some` row, or `None` for a tombstone (the
/// entity reads as not found).
pub fn decode_stored(bytes: &[u8]) -> Result<Option<StoredRow>, DecodeError> {
    if bytes.first() == Some(&TOMBSTONE_FORMAT_VERSION) {
        let mut reader = Reader { bytes, offset: 0 };
        return reader.tombstone().map(|_| None);
    }
    decode_row(bytes).map(Some)
}

/// Decodes a whole row (a tombstone is an error here: see [`decode_stored`]).
pub fn decode_row(bytes: &[u8]) -> Result<StoredRow, DecodeError> {
    let mut r = Reader { bytes, offset: 0 };
    let (event_ts_us, written_ts_us) = r.header()?;
    // Each field takes at least 2 bytes (id + tag): bound the allocation by that.
    let count = r.count(2)?;
    let mut values = Vec::with_capacity(count);
    let mut last: Option<FieldId> = None;
    for _ in 0..count {
        let at = r.offset;
        let field =
            FieldId::try_from(r.varint()?).map_err(|_| r.error_at("field id out of range", at))?;
        if last.is_some_and(|prev| prev >= field) {
            return Err(r.error_at("field ids not strictly increasing", at));
        }
        last = Some(field);
        values.push((field, r.value()?));
    }
    if r.offset != bytes.len() {
        return Err(r.error("trailing bytes"));
    }
    Ok(StoredRow {
        event_ts_us,
        written_ts_us,
        values,
    })
}

struct Reader<'a> {
    bytes: &'a [u8],
    offset: usize,
}

impl<'a> Reader<'a> {
    fn error(&self, reason: &'static str) -> DecodeError {
        self.error_at(reason, self.offset)
    }

    fn error_at(&self, reason: &'static str, offset: usize) -> DecodeError {
        DecodeError { reason, offset }
    }

    fn remaining(&self) -> usize {
        self.bytes.len() - self.offset
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.remaining() < n {
            return Err(self.error("truncated"));
        }
        let slice = &self.bytes[self.offset..self.offset + n];
        self.offset += n;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let slice = self.take(N)?;
        let mut out = [0u8; N];
        out.copy_from_slice(slice);
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.array::<1>()?[0])
    }

    fn header(&mut self) -> Result<(i64, i64), DecodeError> {
        let version = self.u8()?;
        if version != ROW_FORMAT_VERSION {
            return Err(self.error_at("unknown row format version", 0));
        }
        let event_ts = i64::from_le_bytes(self.array()?);
        let written_ts = i64::from_le_bytes(self.array()?);
        Ok((event_ts, written_ts))
    }

    fn tombstone(&mut self) -> Result<(i64, i64), DecodeError> {
        if self.u8()? != TOMBSTONE_FORMAT_VERSION {
            return Err(self.error_at("not a tombstone", 0));
        }
        let event_ts = i64::from_le_bytes(self.array()?);
        let written_ts = i64::from_le_bytes(self.array()?);
        if self.remaining() != 0 {
            return Err(self.error("trailing bytes"));
        }
        Ok((event_ts, written_ts))
    }

    fn varint(&mut self) -> Result<u64, DecodeError> {
        let start = self.offset;
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = self.u8()?;
            // The tenth byte may carry only the top bit of a u64.
            if shift == 63 && byte > 1 {
                return Err(self.error_at("varint overflows u64", start));
            }
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(self.error_at("varint too long", start))
    }

    /// A count of items each at least `min_item_bytes` long, checked against
    /// what is left of the input.
    fn count(&mut self, min_item_bytes: usize) -> Result<usize, DecodeError> {
        let at = self.offset;
        let count = self.varint()?;
        match usize::try_from(count) {
            Ok(n) if n.saturating_mul(min_item_bytes) <= self.remaining() => Ok(n),
            _ => Err(self.error_at("count exceeds input", at)),
        }
    }

    fn bytes_field(&mut self) -> Result<&'a [u8], DecodeError> {
        let len = self.count(1)?;
        self.take(len)
    }

    fn string(&mut self) -> Result<String, DecodeError> {
        let at = self.offset;
        let bytes = self.bytes_field()?;
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|_| self.error_at("invalid utf-8", at))
    }

    fn bool(&mut self) -> Result<bool, DecodeError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(self.error_at("bool not 0 or 1", self.offset - 1)),
        }
    }

    fn list<T>(
        &mut self,
        min_item_bytes: usize,
        mut item: impl FnMut(&mut Self) -> Result<T, DecodeError>,
    ) -> Result<Vec<T>, DecodeError> {
        let count = self.count(min_item_bytes)?;
        let mut out = Vec::with_capacity(count);
        for _ in 0..count {
            out.push(item(self)?);
        }
        Ok(out)
    }

    fn i64(&mut self) -> Result<i64, DecodeError> {
        Ok(i64::from_le_bytes(self.array()?))
    }

    fn value(&mut self) -> Result<Value, DecodeError> {
        let at = self.offset;
        let tag = self.u8()?;
        if tag == NULL_TAG {
            return Ok(Value::Null);
        }
        let value_type =
            ValueType::from_tag(tag).ok_or_else(|| self.error_at("unknown value tag", at))?;
        Ok(match value_type {
            ValueType::Int64 => Value::Int64(self.i64()?),
            ValueType::UnixTimestamp => Value::UnixTimestamp(self.i64()?),
            ValueType::Double => Value::Double(f64::from_le_bytes(self.array()?)),
            ValueType::Float => Value::Float(f32::from_le_bytes(self.array()?)),
            ValueType::Bool => Value::Bool(self.bool()?),
            ValueType::String => Value::String(self.string()?),
            ValueType::Bytes => Value::Bytes(self.bytes_field()?.to_vec()),
            ValueType::Int64List => Value::Int64List(self.list(8, Self::i64)?),
            ValueType::UnixTimestampList => Value::UnixTimestampList(self.list(8, Self::i64)?),
            ValueType::DoubleList => {
                Value::DoubleList(self.list(8, |r| Ok(f64::from_le_bytes(r.array()?)))?)
            }
            ValueType::FloatList => {
                Value::FloatList(self.list(4, |r| Ok(f32::from_le_bytes(r.array()?)))?)
            }
            ValueType::BoolList => Value::BoolList(self.list(1, Self::bool)?),
            ValueType::StringList => Value::StringList(self.list(1, Self::string)?),
            ValueType::BytesList => {
                Value::BytesList(self.list(1, |r| Ok(r.bytes_field()?.to_vec()))?)
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::value::strategies::any_value;
    use proptest::prelude::*;

    fn any_row() -> impl Strategy<Value = StoredRow> {
        (
            any::<i64>(),
            any::<i64>(),
            proptest::collection::btree_map(any::<u32>(), any_value(), 0..12),
        )
            .prop_map(|(event_ts_us, written_ts_us, fields)| StoredRow {
                event_ts_us,
                written_ts_us,
                values: fields.into_iter().collect(),
            })
    }

    /// Floats compare by bits so NaN payloads round-trip exactly.
    fn same(a: &StoredRow, b: &StoredRow) -> bool {
        format!("{a:?}") == format!("{b:?}")
    }

    proptest! {
        #[test]
        fn round_trip(row in any_row()) {
            let bytes = encode_row_to_vec(&row);
            let back = decode_row(&bytes).expect("own encoding decodes");
            prop_assert!(same(&row, &back), "{row:?} != {back:?}");
            prop_assert_eq!(peek_event_ts(&bytes), Ok(row.event_ts_us));
        }

        #[test]
        fn every_strict_prefix_is_rejected(row in any_row()) {
            let bytes = encode_row_to_vec(&row);
            for len in 0..bytes.len() {
                prop_assert!(decode_row(&bytes[..len]).is_err(), "prefix of {len} bytes decoded");
            }
        }

        #[test]
        fn trailing_bytes_are_rejected(row in any_row(), extra in proptest::collection::vec(any::<u8>(), 1..8)) {
            let mut bytes = encode_row_to_vec(&row);
            bytes.extend_from_slice(&extra);
            prop_assert!(decode_row(&bytes).is_err());
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode_row(&bytes);
            let _ = decode_stored(&bytes);
            let _ = peek_event_ts(&bytes);
        }

        #[test]
        fn tombstones_round_trip_and_read_as_no_row(event_ts in any::<i64>(), written_ts in any::<i64>()) {
            let mut bytes = Vec::new();
            encode_tombstone(event_ts, written_ts, &mut bytes);
            prop_assert_eq!(decode_stored(&bytes), Ok(None));
            prop_assert_eq!(peek_event_ts(&bytes), Ok(event_ts));
            prop_assert!(decode_row(&bytes).is_err(), "a tombstone is not a row");
            for len in 0..bytes.len() {
                prop_assert!(decode_stored(&bytes[..len]).is_err());
                prop_assert!(peek_event_ts(&bytes[..len]).is_err());
            }
            bytes.push(0);
            prop_assert!(decode_stored(&bytes).is_err());
            prop_assert!(peek_event_ts(&bytes).is_err());
        }

        #[test]
        fn single_byte_flips_never_panic(row in any_row(), index in any::<usize>(), bit in 0u8..8) {
            let mut bytes = encode_row_to_vec(&row);
            let i = index % bytes.len();
            bytes[i] ^= 1 << bit;
            let _ = decode_row(&bytes);
        }
    }

    #[test]
    fn unknown_version_is_rejected() {
        let row = StoredRow {
            event_ts_us: 5,
            written_ts_us: 6,
            values: vec![],
        };
        let mut bytes = encode_row_to_vec(&row);
        bytes[0] = 3;
        assert_eq!(
            decode_row(&bytes).unwrap_err().reason,
            "unknown row format version"
        );
    }

    #[test]
    fn hostile_list_length_does_not_allocate() {
        let row = StoredRow {
            event_ts_us: 0,
            written_ts_us: 0,
            values: vec![(1, Value::Int64List(vec![]))],
        };
        let mut bytes = encode_row_to_vec(&row);
        // Replace the empty list's count (last byte) with a huge varint.
        bytes.pop();
        bytes.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f]);
        assert_eq!(
            decode_row(&bytes).unwrap_err().reason,
            "count exceeds input"
        );
    }

    #[test]
    fn unsorted_fields_and_bad_bools_are_rejected() {
        let mut bytes = vec![ROW_FORMAT_VERSION];
        bytes.extend_from_slice(&0i64.to_le_bytes());
        bytes.extend_from_slice(&0i64.to_le_bytes());
        let header = bytes.clone();
        bytes.extend_from_slice(&[2, 5, 0, 5, 0]); // two fields, both id 5, null
        assert_eq!(
            decode_row(&bytes).unwrap_err().reason,
            "field ids not strictly increasing"
        );
        let mut bytes = header;
        bytes.extend_from_slice(&[1, 1, ValueType::Bool.tag(), 2]);
        assert_eq!(decode_row(&bytes).unwrap_err().reason, "bool not 0 or 1");
    }
}
