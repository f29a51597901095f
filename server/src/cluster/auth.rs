//! Peer authentication by a cluster secret: every peer call carries it in a
//! metadata header and the peer listener refuses calls without it
//! (`UNAUTHENTICATED`). The comparison takes the same time wherever the
//! first difference lies. Until peer TLS exists the secret crosses the wire
//! in clear: it keeps clients and strays off the peer port, not an attacker
//! who can read the traffic.

use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::service::Interceptor;
use tonic::{Request, Status};

/// The metadata header carrying the secret.
pub const SECRET_HEADER: &str = "x-quiver-cluster-secret";

/// Adds the secret to every outgoing peer call (nothing if it is empty).
#[derive(Debug, Clone)]
pub struct SignPeerCalls {
    secret: Option<AsciiMetadataValue>,
}

impl SignPeerCalls {
    /// For `secret` (empty: calls go unsigned). Fails on a secret that
    /// cannot be a header value (config validation refuses those first).
    pub fn new(secret: &str) -> Result<Self, String> {
        if secret.is_empty() {
            return Ok(Self { secret: None });
        }
        let value = MetadataValue::try_from(secret)
            .map_err(|_| "cluster.secret is not a valid header value".to_owned())?;
        Ok(Self {
            secret: Some(value),
        })
    }
}

impl Interceptor for SignPeerCalls {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(secret) = &self.secret {
            request.metadata_mut().insert(SECRET_HEADER, secret.clone());
        }
        Ok(request)
    }
}

/// Refuses incoming peer calls that do not carry the secret (or, while a
/// secret is being rotated, the previous one).
#[derive(Debug, Clone)]
pub struct CheckPeerCalls {
    secret: Vec<u8>,
    previous: Vec<u8>,
}

impl CheckPeerCalls {
    /// For `secret` (empty: every call is let through), also accepting
    /// `previous` unless it is empty.
    pub fn new(secret: &str, previous: &str) -> Self {
        Self {
            secret: secret.as_bytes().to_vec(),
            previous: previous.as_bytes().to_vec(),
        }
    }
}

impl CheckPeerCalls {
    /// Whether `given` is the secret (or the previous one); anything is
    /// when there is no secret.
    pub fn accepts(&self, given: &[u8]) -> bool {
        if self.secret.is_empty() {
            return true;
        }
        let previous_ok = !self.previous.is_empty() && constant_time_eq(given, &self.previous);
        constant_time_eq(given, &self.secret) || previous_ok
    }
}

impl Interceptor for CheckPeerCalls {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let given = request
            .metadata()
            .get(SECRET_HEADER)
            .map(|value| value.as_bytes())
            .unwrap_or_default();
        if self.accepts(given) {
            Ok(request)
        } else {
            Err(Status::unauthenticated(
                "peer call without the cluster secret (cluster.secret)",
            ))
        }
    }
}

/// Equal bytes, in time that depends on the lengths only.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |diff, (x, y)| diff | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checked(check: &mut CheckPeerCalls, header: Option<&str>) -> Result<(), tonic::Code> {
        let mut request = Request::new(());
        if let Some(value) = header {
            request
                .metadata_mut()
                .insert(SECRET_HEADER, value.parse().unwrap());
        }
        check.call(request).map(|_| ()).map_err(|s| s.code())
    }

    #[test]
    fn only_the_exact_secret_passes() {
        let mut check = CheckPeerCalls::new("s3cret", "");
        assert_eq!(checked(&mut check, Some("s3cret")), Ok(()));
        for wrong in [
            None,
            Some(""),
            Some("s3cre"),
            Some("s3cretx"),
            Some("S3cret"),
        ] {
            assert_eq!(
                checked(&mut check, wrong),
                Err(tonic::Code::Unauthenticated),
                "{wrong:?}"
            );
        }
        let mut open = CheckPeerCalls::new("", "");
        assert_eq!(checked(&mut open, None), Ok(()));
        // Rotation: the previous secret is accepted too, an empty one never.
        let mut rotating = CheckPeerCalls::new("new-one", "old-one");
        assert_eq!(checked(&mut rotating, Some("old-one")), Ok(()));
        assert_eq!(checked(&mut rotating, Some("new-one")), Ok(()));
        assert_eq!(
            checked(&mut rotating, Some("")),
            Err(tonic::Code::Unauthenticated)
        );
    }

    #[test]
    fn signed_calls_pass_the_check() {
        let mut sign = SignPeerCalls::new("s3cret").unwrap();
        let signed = sign.call(Request::new(())).unwrap();
        assert!(CheckPeerCalls::new("s3cret", "").call(signed).is_ok());
        let unsigned = SignPeerCalls::new("")
            .unwrap()
            .call(Request::new(()))
            .unwrap();
        assert!(CheckPeerCalls::new("s3cret", "").call(unsigned).is_err());
    }
}
