//! Feature views: the schema rows are written and read against.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::error::ViewError;
use crate::keys::ViewId;
use crate::row::FieldId;
use crate::value::{Value, ValueType};

/// Longest view, feature or entity name, in bytes.
pub const NAME_BYTES_MAX: usize = 128;
/// Most features one view may have.
pub const FEATURES_PER_VIEW_MAX: usize = 1024;
/// Most entity key names one view may declare.
pub const ENTITIES_PER_VIEW_MAX: usize = 8;
/// Longest ttl: 100 years, far beyond any sane feature but safely inside i64 µs.
pub const TTL_SECONDS_MAX: u64 = 100 * 365 * 24 * 3600;
/// Longest description, in bytes.
pub const DESCRIPTION_BYTES_MAX: usize = 4096;
/// Largest default value, in payload bytes: a view is read on every request
/// and replicated to every node.
pub const DEFAULT_BYTES_MAX: usize = 64 << 10;

/// A feature as a user declares it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeatureSpec {
    /// Feature name, unique within the view.
    pub name: String,
    /// Type of its values.
    pub value_type: ValueType,
    /// Value served (as `DEFAULTED`) for entities with no row.
    pub default: Option<Value>,
}

/// A feature view as a user declares it (the input of apply).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ViewSpec {
    /// View name.
    pub name: String,
    /// Names of the entity key parts.
    pub entities: Vec<String>,
    /// Features, in the order reads expand `view:*`.
    pub features: Vec<FeatureSpec>,
    /// Rows older than this read as `OUTSIDE_MAX_AGE`; 0 = never.
    pub ttl_seconds: u64,
    /// Free text.
    pub description: String,
}

/// A stored feature: the spec plus its stable field id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Feature {
    /// Feature name.
    pub name: String,
    /// Stable id used in row encodings.
    pub field_id: FieldId,
    /// Type of its values.
    pub value_type: ValueType,
    /// Default value, if any.
    pub default: Option<Value>,
}

/// A registered feature view.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FeatureView {
    /// Storage id (part of every row key).
    pub id: ViewId,
    /// View name.
    pub name: String,
    /// Bumped on every change.
    pub version: u64,
    /// Names of the entity key parts.
    pub entities: Vec<String>,
    /// Features in declaration order.
    pub features: Vec<Feature>,
    /// ttl in seconds; 0 = never expires.
    pub ttl_seconds: u64,
    /// Free text.
    pub description: String,
    /// The next unused field id: ids are never reused.
    pub next_field_id: FieldId,
    #[serde(skip)]
    by_name: HashMap<String, usize>,
}

impl PartialEq for FeatureView {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id
            && self.name == other.name
            && self.version == other.version
            && self.entities == other.entities
            && self.features == other.features
            && self.ttl_seconds == other.ttl_seconds
            && self.description == other.description
            && self.next_field_id == other.next_field_id
    }
}

/// Checks a view, feature or entity name.
pub fn check_name(what: &'static str, name: &str) -> Result<(), ViewError> {
    let reason = if name.is_empty() {
        "empty"
    } else if name.len() > NAME_BYTES_MAX {
        "longer than 128 bytes"
    } else if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
    {
        "only letters, digits, '_', '-' and '.' are allowed"
    } else {
        return Ok(());
    };
    Err(ViewError::InvalidName {
        what,
        name: name.to_owned(),
        reason,
    })
}

impl ViewSpec {
    /// Checks the spec on its own: names, duplicates, limits, default types.
    pub fn validate(&self) -> Result<(), ViewError> {
        check_name("view", &self.name)?;
        let shape = |reason: String| ViewError::BadShape {
            view: self.name.clone(),
            reason,
        };
        if self.features.is_empty() {
            return Err(shape("has no features".into()));
        }
        if self.features.len() > FEATURES_PER_VIEW_MAX {
            return Err(shape(format!(
                "has {} features, the limit is {FEATURES_PER_VIEW_MAX}",
                self.features.len()
            )));
        }
        if self.entities.len() > ENTITIES_PER_VIEW_MAX {
            return Err(shape(format!(
                "has {} entities, the limit is {ENTITIES_PER_VIEW_MAX}",
                self.entities.len()
            )));
        }
        if self.ttl_seconds > TTL_SECONDS_MAX {
            return Err(shape(format!(
                "ttl {}s exceeds the limit of {TTL_SECONDS_MAX}s",
                self.ttl_seconds
            )));
        }
        if self.description.len() > DESCRIPTION_BYTES_MAX {
            return Err(shape(format!(
                "description exceeds {DESCRIPTION_BYTES_MAX} bytes"
            )));
        }
        for entity in &self.entities {
            check_name("entity", entity)?;
        }
        let mut seen = std::collections::HashSet::new();
        for feature in &self.features {
            check_name("feature", &feature.name)?;
            if !seen.insert(feature.name.as_str()) {
                return Err(ViewError::DuplicateFeature {
                    view: self.name.clone(),
                    feature: feature.name.clone(),
                });
            }
            if let Some(default) = &feature.default {
                if let Some(found) = default.value_type()
                    && found != feature.value_type
                {
                    return Err(ViewError::DefaultTypeMismatch {
                        view: self.name.clone(),
                        feature: feature.name.clone(),
                        expected: feature.value_type.to_string(),
                        found: found.to_string(),
                    });
                }
                let invalid = |reason: String| ViewError::InvalidDefault {
                    view: self.name.clone(),
                    feature: feature.name.clone(),
                    reason,
                };
                if !default.is_finite() {
                    return Err(invalid(
                        "it is not a finite number (NaN or infinity)".into(),
                    ));
                }
                if default.payload_bytes() > DEFAULT_BYTES_MAX {
                    return Err(invalid(format!(
                        "it is {} bytes, the limit is {DEFAULT_BYTES_MAX}",
                        default.payload_bytes()
                    )));
                }
            }
        }
        Ok(())
    }
}

impl FeatureView {
    /// Builds the stored view for `spec`: a new view with id `new_id` when
    /// `existing` is `None`, else a compatible evolution of `existing`
    /// (features keep their field ids; new ones get fresh ids; a type change is
    /// rejected). Returns the view and whether anything changed.
    pub fn evolve(
        existing: Option<&FeatureView>,
        spec: ViewSpec,
        new_id: ViewId,
    ) -> Result<(FeatureView, bool), ViewError> {
        spec.validate()?;
        let (id, version, mut next_field_id) = match existing {
            Some(old) => (old.id, old.version, old.next_field_id),
            None => (new_id, 0, 1),
        };
        let mut features = Vec::with_capacity(spec.features.len());
        for feature in spec.features {
            let field_id = match existing.and_then(|old| old.feature(&feature.name)) {
                Some(old) if old.value_type != feature.value_type => {
                    return Err(ViewError::IncompatibleChange {
                        view: spec.name,
                        feature: feature.name,
                        old: old.value_type.to_string(),
                        new: feature.value_type.to_string(),
                    });
                }
                Some(old) => old.field_id,
                None => {
                    next_field_id += 1;
                    next_field_id - 1
                }
            };
            features.push(Feature {
                name: feature.name,
                field_id,
                value_type: feature.value_type,
                default: feature.default,
            });
        }
        let mut view = FeatureView {
            id,
            name: spec.name,
            version,
            entities: spec.entities,
            features,
            ttl_seconds: spec.ttl_seconds,
            description: spec.description,
            next_field_id,
            by_name: HashMap::new(),
        };
        view.rebuild_index();
        let changed = match existing {
            None => true,
            Some(old) => {
                old.entities != view.entities
                    || old.features != view.features
                    || old.ttl_seconds != view.ttl_seconds
                    || old.description != view.description
            }
        };
        if changed {
            view.version += 1;
        } else {
            // Unchanged: keep the old field-id counter so a no-op apply is a no-op.
            view.next_field_id = existing.map_or(view.next_field_id, |old| old.next_field_id);
        }
        Ok((view, changed))
    }

    /// Decodes a view as the registry stores it (JSON) and checks what the
    /// rest of the engine relies on: the rules a declared view obeys, plus
    /// distinct field ids below `next_field_id`. Bytes from disk or a
    /// snapshot may be anything: a typed error, never a panic.
    pub fn decode_stored(bytes: &[u8]) -> Result<FeatureView, ViewError> {
        let bad = |reason: String| ViewError::BadShape {
            view: String::from("(stored record)"),
            reason,
        };
        let mut view: FeatureView =
            serde_json::from_slice(bytes).map_err(|e| bad(format!("undecodable: {e}")))?;
        view.spec().validate()?;
        let mut ids = std::collections::HashSet::new();
        for feature in &view.features {
            if feature.field_id == 0
                || feature.field_id >= view.next_field_id
                || !ids.insert(feature.field_id)
            {
                return Err(bad(format!(
                    "view {:?}: field id {} of {:?} is zero, repeated or not below next_field_id {}",
                    view.name, feature.field_id, feature.name, view.next_field_id
                )));
            }
        }
        view.rebuild_index();
        Ok(view)
    }

    /// Rebuilds the name index after deserialisation.
    pub fn rebuild_index(&mut self) {
        self.by_name = self
            .features
            .iter()
            .enumerate()
            .map(|(i, f)| (f.name.clone(), i))
            .collect();
    }

    /// The feature called `name`.
    pub fn feature(&self, name: &str) -> Option<&Feature> {
        self.feature_index(name).map(|i| &self.features[i])
    }

    /// Position of the feature called `name` in [`FeatureView::features`].
    pub fn feature_index(&self, name: &str) -> Option<usize> {
        self.by_name.get(name).copied()
    }

    /// ttl in microseconds; 0 = never expires.
    pub fn ttl_us(&self) -> i64 {
        // TTL_SECONDS_MAX keeps this far from overflow.
        i64::try_from(self.ttl_seconds)
            .unwrap_or(i64::MAX / 1_000_000)
            .saturating_mul(1_000_000)
    }

    /// The spec this view was built from.
    pub fn spec(&self) -> ViewSpec {
        ViewSpec {
            name: self.name.clone(),
            entities: self.entities.clone(),
            features: self
                .features
                .iter()
                .map(|f| FeatureSpec {
                    name: f.name.clone(),
                    value_type: f.value_type,
                    default: f.default.clone(),
                })
                .collect(),
            ttl_seconds: self.ttl_seconds,
            description: self.description.clone(),
        }
    }

    /// Checks named values against the schema and returns them as a row's
    /// field list (sorted by field id). Features left out are stored as null.
    pub fn row_values<S: AsRef<str>>(
        &self,
        values: impl IntoIterator<Item = (S, Value)>,
    ) -> Result<Vec<(FieldId, Value)>, ViewError> {
        let mut slots: Vec<Option<Value>> = vec![None; self.features.len()];
        for (name, value) in values {
            let name = name.as_ref();
            let index = *self
                .by_name
                .get(name)
                .ok_or_else(|| ViewError::UnknownFeature {
                    view: self.name.clone(),
                    feature: name.to_owned(),
                })?;
            let feature = &self.features[index];
            if let Some(found) = value.value_type()
                && found != feature.value_type
            {
                return Err(ViewError::ValueTypeMismatch {
                    view: self.name.clone(),
                    feature: feature.name.clone(),
                    expected: feature.value_type.to_string(),
                    found: found.to_string(),
                });
            }
            slots[index] = Some(value);
        }
        let mut out: Vec<(FieldId, Value)> = self
            .features
            .iter()
            .zip(slots)
            .map(|(feature, slot)| (feature.field_id, slot.unwrap_or(Value::Null)))
            .collect();
        out.sort_unstable_by_key(|(id, _)| *id);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(features: &[(&str, ValueType)]) -> ViewSpec {
        ViewSpec {
            name: "driver_stats".into(),
            entities: vec!["driver_id".into()],
            features: features
                .iter()
                .map(|(n, t)| FeatureSpec {
                    name: (*n).into(),
                    value_type: *t,
                    default: None,
                })
                .collect(),
            ttl_seconds: 3600,
            description: String::new(),
        }
    }

    #[test]
    fn evolution_keeps_field_ids_and_never_reuses_them() {
        let (v1, changed) = FeatureView::evolve(
            None,
            spec(&[("a", ValueType::Int64), ("b", ValueType::Double)]),
            7,
        )
        .unwrap();
        assert!(changed);
        assert_eq!((v1.id, v1.version), (7, 1));
        assert_eq!(v1.feature("b").unwrap().field_id, 2);
        // Drop b, add c: c must not get b's id.
        let (v2, changed) = FeatureView::evolve(
            Some(&v1),
            spec(&[("a", ValueType::Int64), ("c", ValueType::Bool)]),
            99,
        )
        .unwrap();
        assert!(changed);
        assert_eq!((v2.id, v2.version), (7, 2));
        assert_eq!(v2.feature("a").unwrap().field_id, 1);
        assert_eq!(v2.feature("c").unwrap().field_id, 3);
        let (v3, changed) = FeatureView::evolve(Some(&v2), v2.spec(), 99).unwrap();
        assert!(!changed);
        assert_eq!(v3, v2);
    }

    #[test]
    fn type_change_is_incompatible() {
        let (v1, _) = FeatureView::evolve(None, spec(&[("a", ValueType::Int64)]), 1).unwrap();
        let err = FeatureView::evolve(Some(&v1), spec(&[("a", ValueType::String)]), 1).unwrap_err();
        assert!(
            matches!(err, ViewError::IncompatibleChange { ref feature, .. } if feature == "a"),
            "{err}"
        );
    }

    #[test]
    fn bad_specs_are_rejected_naming_the_field() {
        let err = spec(&[("a", ValueType::Int64), ("a", ValueType::Int64)])
            .validate()
            .unwrap_err();
        assert!(matches!(err, ViewError::DuplicateFeature { .. }));
        assert!(spec(&[]).validate().is_err());
        assert!(spec(&[("bad name", ValueType::Int64)]).validate().is_err());
        let mut s = spec(&[("a", ValueType::Int64)]);
        s.features[0].default = Some(Value::String("x".into()));
        assert!(matches!(
            s.validate().unwrap_err(),
            ViewError::DefaultTypeMismatch { .. }
        ));
        let mut s = spec(&[("a", ValueType::Int64)]);
        s.ttl_seconds = TTL_SECONDS_MAX + 1;
        assert!(s.validate().is_err());
    }

    #[test]
    fn non_finite_and_oversized_defaults_are_rejected() {
        for bad in [
            Value::Double(f64::NAN),
            Value::Double(f64::INFINITY),
            Value::Float(f32::NEG_INFINITY),
        ] {
            let mut s = spec(&[("a", bad.value_type().unwrap())]);
            s.features[0].default = Some(bad.clone());
            assert!(
                matches!(s.validate().unwrap_err(), ViewError::InvalidDefault { ref feature, .. } if feature == "a"),
                "{bad:?}"
            );
        }
        let mut s = spec(&[("a", ValueType::DoubleList)]);
        s.features[0].default = Some(Value::DoubleList(vec![1.0, f64::NAN]));
        assert!(matches!(
            s.validate().unwrap_err(),
            ViewError::InvalidDefault { .. }
        ));
        let mut s = spec(&[("a", ValueType::Bytes)]);
        s.features[0].default = Some(Value::Bytes(vec![0; DEFAULT_BYTES_MAX + 1]));
        assert!(matches!(
            s.validate().unwrap_err(),
            ViewError::InvalidDefault { .. }
        ));
    }

    proptest::proptest! {
        /// The registry stores views as JSON: every view that validates
        /// reads back exactly, whatever its defaults (the types of
        /// `any_value`, NaN and infinities included, are all tried; those
        /// that do not validate must not reach the store).
        #[test]
        fn every_valid_view_round_trips_through_the_registry_encoding(
            defaults in proptest::collection::vec(
                proptest::option::of(crate::value::strategies::any_value()), 1..12),
            ttl_seconds in 0..=TTL_SECONDS_MAX,
        ) {
            let features = defaults
                .into_iter()
                .enumerate()
                .map(|(i, default)| FeatureSpec {
                    name: format!("f{i}"),
                    value_type: default
                        .as_ref()
                        .and_then(Value::value_type)
                        .unwrap_or(ValueType::Int64),
                    default,
                })
                .collect();
            let spec = ViewSpec {
                name: "v".into(),
                entities: vec!["id".into()],
                features,
                ttl_seconds,
                description: "d".into(),
            };
            let all_finite = spec
                .features
                .iter()
                .all(|f| f.default.as_ref().is_none_or(Value::is_finite));
            match FeatureView::evolve(None, spec, 3) {
                Ok((view, _)) => {
                    proptest::prop_assert!(all_finite);
                    let json = serde_json::to_vec(&view).unwrap();
                    let mut back: FeatureView = serde_json::from_slice(&json).unwrap();
                    back.rebuild_index();
                    proptest::prop_assert_eq!(back, view);
                }
                Err(ViewError::InvalidDefault { .. }) => proptest::prop_assert!(!all_finite),
                Err(other) => proptest::prop_assert!(false, "unexpected {other}"),
            }
        }
    }

    fn stored_view_json() -> Vec<u8> {
        let (view, _) = FeatureView::evolve(
            None,
            spec(&[("a", ValueType::Int64), ("b", ValueType::String)]),
            4,
        )
        .unwrap();
        serde_json::to_vec(&view).unwrap()
    }

    #[test]
    fn a_stored_view_decodes_and_broken_invariants_are_refused() {
        let json = stored_view_json();
        let view = FeatureView::decode_stored(&json).unwrap();
        assert_eq!(view.feature_index("b"), Some(1));
        let text = String::from_utf8(json).unwrap();
        for broken in [
            text.replace("\"field_id\":2", "\"field_id\":1"),
            text.replace("\"next_field_id\":3", "\"next_field_id\":2"),
            text.replace("\"name\":\"b\"", "\"name\":\"a\""),
            text.replace("\"features\":[", "\"features\":[],\"x\":["),
        ] {
            assert_ne!(broken, text, "the replacement applies");
            assert!(
                FeatureView::decode_stored(broken.as_bytes()).is_err(),
                "{broken}"
            );
        }
    }

    proptest::proptest! {
        /// Stored view records may be anything (a torn write, a bad disk, a
        /// bad snapshot): arbitrary bytes and valid records with bytes
        /// changed decode to a typed error or to a view that keeps every
        /// invariant, never a panic.
        #[test]
        fn arbitrary_bytes_never_panic_the_view_decoder(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600)
        ) {
            if let Ok(view) = FeatureView::decode_stored(&bytes) {
                proptest::prop_assert!(!view.features.is_empty());
            }
        }

        #[test]
        fn mutated_records_never_panic_the_view_decoder(
            flips in proptest::collection::vec(
                (proptest::prelude::any::<usize>(), proptest::prelude::any::<u8>()), 1..4),
            cut in proptest::prelude::any::<usize>(),
        ) {
            let mut bytes = stored_view_json();
            for (at, value) in flips {
                let len = bytes.len();
                bytes[at % len] = value;
            }
            let keep = cut % (bytes.len() + 1);
            for candidate in [&bytes[..], &bytes[..keep]] {
                if let Ok(view) = FeatureView::decode_stored(candidate) {
                    for (i, feature) in view.features.iter().enumerate() {
                        proptest::prop_assert_eq!(view.feature_index(&feature.name), Some(i));
                        proptest::prop_assert!(feature.field_id < view.next_field_id);
                    }
                }
            }
        }
    }

    #[test]
    fn row_values_check_types_and_fill_nulls() {
        let (v, _) = FeatureView::evolve(
            None,
            spec(&[("a", ValueType::Int64), ("b", ValueType::String)]),
            1,
        )
        .unwrap();
        let row = v.row_values([("b", Value::String("x".into()))]).unwrap();
        assert_eq!(row, vec![(1, Value::Null), (2, Value::String("x".into()))]);
        let err = v.row_values([("a", Value::Double(1.0))]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "value for driver_stats:a is double, the feature is int64"
        );
        assert!(matches!(
            v.row_values([("zz", Value::Null)]).unwrap_err(),
            ViewError::UnknownFeature { .. }
        ));
    }
}
