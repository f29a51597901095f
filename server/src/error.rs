//! The server's error type and its mapping to gRPC status codes: the one
//! place where a failure becomes a code a client can act on.

use quiver_engine::{EngineError, ViewError};
use quiver_raft::types::RejectKind;

use crate::cluster::ClusterError;
use tonic::{Code, Status};

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServiceError {
    /// The request is malformed or breaks the schema.
    #[error("{0}")]
    InvalidArgument(String),
    /// The request exceeds a configured limit.
    #[error("{what} is {actual}, the limit ({limit_name}) is {limit}")]
    LimitExceeded {
        /// What was measured.
        what: &'static str,
        /// The measurement.
        actual: u64,
        /// The config key of the limit.
        limit_name: &'static str,
        /// The limit.
        limit: u64,
    },
    /// A named view or feature does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The storage engine failed.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// A blocking task died (panicked or was cancelled).
    #[error("internal task failed: {0}")]
    TaskFailed(String),
    /// Routing or replication failed, or a replicated command was refused.
    #[error(transparent)]
    Cluster(#[from] crate::cluster::ClusterError),
    /// The caller did not prove who it is (the cluster secret).
    #[error("{0}")]
    Unauthenticated(String),
    /// The caller is known but may not do this (a certificate that does
    /// not name the node it claims to be).
    #[error("{0}")]
    PermissionDenied(String),
    /// A backup operation failed.
    #[error(transparent)]
    Backup(#[from] crate::backup::BackupError),
    /// The node has as much work in flight as it takes; retry later.
    #[error("overloaded: too many {what} ({limit_name}); retry in {retry_after_ms} ms")]
    Overloaded {
        /// What is at its bound.
        what: &'static str,
        /// The config key of the bound.
        limit_name: &'static str,
        /// When to retry.
        retry_after_ms: u64,
    },
}

/// Trailing metadata key of the retry hint on `RESOURCE_EXHAUSTED` and
/// `UNAVAILABLE` (gRPC's server pushback, gRFC A6): milliseconds to wait.
pub const RETRY_PUSHBACK_KEY: &str = "grpc-retry-pushback-ms";

/// The hint on `UNAVAILABLE` after routing gave up: about an election.
const UNAVAILABLE_RETRY_AFTER_MS: u64 = 500;

impl ServiceError {
    /// An `InvalidArgument` with `message`.
    pub fn invalid(message: impl Into<String>) -> Self {
        ServiceError::InvalidArgument(message.into())
    }

    /// Checks `actual <= limit`.
    pub fn check_limit(
        what: &'static str,
        actual: usize,
        limit_name: &'static str,
        limit: u64,
    ) -> Result<(), Self> {
        let actual = actual as u64;
        if actual > limit {
            Err(ServiceError::LimitExceeded {
                what,
                actual,
                limit_name,
                limit,
            })
        } else {
            Ok(())
        }
    }

    /// The gRPC code of this error.
    pub fn code(&self) -> Code {
        match self {
            ServiceError::InvalidArgument(_) | ServiceError::LimitExceeded { .. } => {
                Code::InvalidArgument
            }
            ServiceError::NotFound(_) => Code::NotFound,
            ServiceError::Unauthenticated(_) => Code::Unauthenticated,
            ServiceError::PermissionDenied(_) => Code::PermissionDenied,
            ServiceError::Engine(e) => match e {
                EngineError::View(ViewError::IncompatibleChange { .. }) => Code::FailedPrecondition,
                EngineError::View(_) => Code::InvalidArgument,
                EngineError::UnknownView(_) => Code::NotFound,
                EngineError::RegistryFull(_) => Code::ResourceExhausted,
                EngineError::Corrupt { .. } => Code::DataLoss,
                EngineError::Rocks(_) | EngineError::DataDir { .. } => Code::Unavailable,
                _ => Code::Internal,
            },
            ServiceError::TaskFailed(_) => Code::Internal,
            ServiceError::Overloaded { .. } => Code::ResourceExhausted,
            ServiceError::Cluster(e) => cluster_code(e),
            ServiceError::Backup(e) => {
                use crate::backup::BackupError;
                match e {
                    BackupError::Target { .. } | BackupError::Invalid(_) => Code::InvalidArgument,
                    BackupError::NotFound(_) => Code::NotFound,
                    BackupError::Busy | BackupError::Refused(_) => Code::FailedPrecondition,
                    BackupError::Corrupt { .. } | BackupError::Shard(_) => Code::DataLoss,
                    BackupError::Store(_) | BackupError::Io { .. } => Code::Unavailable,
                    BackupError::Cluster(inner) => cluster_code(inner),
                }
            }
        }
    }
}

impl From<ViewError> for ServiceError {
    fn from(e: ViewError) -> Self {
        ServiceError::Engine(EngineError::View(e))
    }
}

impl From<ServiceError> for Status {
    fn from(e: ServiceError) -> Self {
        let code = e.code();
        // Server-side failures are logged here, where they become a status;
        // client mistakes are the client's to log.
        // A call an open breaker refused is counted, not logged: there may be
        // thousands a second, and the breaker logged when it opened.
        let refused = matches!(e, ServiceError::Cluster(ClusterError::BreakerOpen { .. }));
        if matches!(code, Code::Internal | Code::Unavailable | Code::DataLoss) && !refused {
            tracing::error!(error = %e, ?code, "request failed");
        }
        let retry_after_ms = match &e {
            ServiceError::Overloaded { retry_after_ms, .. } => Some(*retry_after_ms),
            ServiceError::Cluster(ClusterError::BreakerOpen { open_ms, .. }) => Some(*open_ms),
            _ if code == Code::Unavailable => Some(UNAVAILABLE_RETRY_AFTER_MS),
            _ => None,
        };
        let mut status = Status::new(code, e.to_string());
        if let Some(ms) = retry_after_ms
            && let Ok(value) = ms.to_string().parse()
        {
            status.metadata_mut().insert(RETRY_PUSHBACK_KEY, value);
        }
        status
    }
}

impl From<tokio::task::JoinError> for ServiceError {
    fn from(e: tokio::task::JoinError) -> Self {
        ServiceError::TaskFailed(e.to_string())
    }
}

/// The gRPC code of a routing or replication failure.
fn cluster_code(e: &ClusterError) -> Code {
    match e {
        ClusterError::Unavailable { .. } | ClusterError::BreakerOpen { .. } => Code::Unavailable,
        ClusterError::Rejected { kind, .. } => match kind {
            RejectKind::Invalid => Code::InvalidArgument,
            RejectKind::Conflict => Code::FailedPrecondition,
            RejectKind::NotFound => Code::NotFound,
            RejectKind::LimitExceeded => Code::ResourceExhausted,
            // A split moved the keys: retryable once the map caught up.
            RejectKind::WrongShard => Code::Unavailable,
        },
        ClusterError::Start(_) => Code::Internal,
        ClusterError::NoSuchGroup(_) => Code::NotFound,
        ClusterError::Refused { .. } => Code::FailedPrecondition,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_stable() {
        let incompatible = ViewError::IncompatibleChange {
            view: "v".into(),
            feature: "f".into(),
            old: "int64".into(),
            new: "string".into(),
        };
        assert_eq!(
            ServiceError::from(incompatible).code(),
            Code::FailedPrecondition
        );
        assert_eq!(
            ServiceError::Engine(EngineError::UnknownView("v".into())).code(),
            Code::NotFound
        );
        assert_eq!(
            ServiceError::check_limit("rows", 11, "write_rows_max", 10)
                .unwrap_err()
                .code(),
            Code::InvalidArgument
        );
        assert!(ServiceError::check_limit("rows", 10, "write_rows_max", 10).is_ok());
    }

    #[test]
    fn overload_and_unavailable_carry_a_retry_hint() {
        let status = Status::from(ServiceError::Overloaded {
            what: "rows being written",
            limit_name: "limits.write_inflight_rows_max",
            retry_after_ms: 200,
        });
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert_eq!(status.metadata().get(RETRY_PUSHBACK_KEY).unwrap(), "200");
        let status = Status::from(ServiceError::Cluster(ClusterError::Unavailable {
            group: 3,
            attempts: 12,
            last: "no leader".into(),
        }));
        assert_eq!(status.code(), Code::Unavailable);
        assert!(status.metadata().get(RETRY_PUSHBACK_KEY).is_some());
        let status = Status::from(ServiceError::Cluster(ClusterError::BreakerOpen {
            group: 3,
            open_ms: 1000,
        }));
        assert_eq!(status.code(), Code::Unavailable);
        assert_eq!(status.metadata().get(RETRY_PUSHBACK_KEY).unwrap(), "1000");
        let status = Status::from(ServiceError::invalid("bad"));
        assert!(status.metadata().get(RETRY_PUSHBACK_KEY).is_none());
    }
}
