//! A stored row: the latest feature values of one entity in one view.

use crate::value::Value;

/// Identifier of a feature inside its view. Assigned once by the registry and
/// never reused, so rows written under an older schema still decode.
pub type FieldId = u32;

/// The stored state of `(view, entity_key)`.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredRow {
    /// Event time of the write that produced this row (µs since epoch).
    pub event_ts_us: i64,
    /// When the store applied it (µs since epoch).
    pub written_ts_us: i64,
    /// Values by field id, sorted by field id, no duplicates.
    pub values: Vec<(FieldId, Value)>,
}

/// Whether a row is within its view's ttl.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowFreshness {
    /// Within ttl (or the view has none).
    Fresh,
    /// Older than ttl: its values read as `OUTSIDE_MAX_AGE`.
    Expired,
}

impl StoredRow {
    /// The value of field `id`; `None` when the row predates the field.
    pub fn value(&self, id: FieldId) -> Option<&Value> {
        self.values
            .binary_search_by_key(&id, |(field, _)| *field)
            .ok()
            .map(|index| &self.values[index].1)
    }

    /// Fresh or expired at `now_us` under a ttl of `ttl_us` (0 = never expires).
    pub fn freshness(&self, ttl_us: i64, now_us: i64) -> RowFreshness {
        if ttl_us > 0 && now_us.saturating_sub(self.event_ts_us) > ttl_us {
            RowFreshness::Expired
        } else {
            RowFreshness::Fresh
        }
    }

    /// Approximate in-memory size, for cache weights.
    pub fn size_bytes(&self) -> usize {
        std::mem::size_of::<Self>()
            + self
                .values
                .iter()
                .map(|(_, v)| std::mem::size_of::<(FieldId, Value)>() + v.payload_bytes())
                .sum::<usize>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_boundary_is_inclusive_of_the_ttl_itself() {
        let row = StoredRow {
            event_ts_us: 1_000,
            written_ts_us: 1_000,
            values: vec![],
        };
        assert_eq!(row.freshness(500, 1_500), RowFreshness::Fresh);
        assert_eq!(row.freshness(500, 1_501), RowFreshness::Expired);
        assert_eq!(row.freshness(0, i64::MAX), RowFreshness::Fresh);
    }

    #[test]
    fn value_lookup_by_field_id() {
        let row = StoredRow {
            event_ts_us: 0,
            written_ts_us: 0,
            values: vec![
                (1, Value::Int64(1)),
                (4, Value::Null),
                (9, Value::Bool(true)),
            ],
        };
        assert_eq!(row.value(4), Some(&Value::Null));
        assert_eq!(row.value(9), Some(&Value::Bool(true)));
        assert_eq!(row.value(5), None);
    }
}
