//! The engine's error types.

use std::path::PathBuf;

/// A feature view (or a row checked against one) that breaks the schema rules.
/// Every variant names the offending view or field.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ViewError {
    /// A name is empty, too long, or has characters outside `[A-Za-z0-9_.-]`.
    #[error("invalid {what} name {name:?}: {reason}")]
    InvalidName {
        /// What the name is for ("view", "feature", "entity").
        what: &'static str,
        /// The name as given.
        name: String,
        /// Why it is rejected.
        reason: &'static str,
    },
    /// The view lists the same feature twice.
    #[error("feature view {view:?} lists feature {feature:?} more than once")]
    DuplicateFeature {
        /// The view.
        view: String,
        /// The repeated feature name.
        feature: String,
    },
    /// A view with no features, or with more than the limit.
    #[error("feature view {view:?}: {reason}")]
    BadShape {
        /// The view.
        view: String,
        /// What is wrong.
        reason: String,
    },
    /// A feature's type is unset.
    #[error("feature {view}:{feature} has no type")]
    MissingType {
        /// The view.
        view: String,
        /// The feature.
        feature: String,
    },
    /// A default value of the wrong type.
    #[error("default of feature {view}:{feature} is {found}, the feature is {expected}")]
    DefaultTypeMismatch {
        /// The view.
        view: String,
        /// The feature.
        feature: String,
        /// The feature's type.
        expected: String,
        /// The default's type.
        found: String,
    },
    /// A default value that cannot be stored or served.
    #[error("default of feature {view}:{feature} is invalid: {reason}")]
    InvalidDefault {
        /// The view.
        view: String,
        /// The feature.
        feature: String,
        /// Why.
        reason: String,
    },
    /// Applying the view would change the type of an existing feature.
    #[error(
        "feature {view}:{feature} is {old}; changing it to {new} is incompatible (delete and recreate the view)"
    )]
    IncompatibleChange {
        /// The view.
        view: String,
        /// The feature.
        feature: String,
        /// The stored type.
        old: String,
        /// The requested type.
        new: String,
    },
    /// A written row names a feature the view does not have.
    #[error("feature view {view:?} has no feature {feature:?}")]
    UnknownFeature {
        /// The view.
        view: String,
        /// The unknown feature.
        feature: String,
    },
    /// A written value does not match the feature's type.
    #[error("value for {view}:{feature} is {found}, the feature is {expected}")]
    ValueTypeMismatch {
        /// The view.
        view: String,
        /// The feature.
        feature: String,
        /// The feature's type.
        expected: String,
        /// The value's type.
        found: String,
    },
}

/// Errors of the storage engine.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// RocksDB failed (I/O, corruption it detected, ...).
    #[error("rocksdb: {0}")]
    Rocks(#[from] rocksdb::Error),
    /// Stored bytes that do not decode: reported, never served.
    #[error("corrupt {what}: {reason}")]
    Corrupt {
        /// What was being decoded.
        what: String,
        /// Why it does not decode.
        reason: String,
    },
    /// A feature view breaks the schema rules.
    #[error(transparent)]
    View(#[from] ViewError),
    /// No feature view of that name.
    #[error("feature view {0:?} does not exist")]
    UnknownView(String),
    /// The data directory cannot be used.
    #[error("data directory {path}: {reason}")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A registry limit would be exceeded.
    #[error("registry limit: {0}")]
    RegistryFull(String),
}

/// Result with [`EngineError`].
pub type Result<T, E = EngineError> = std::result::Result<T, E>;
