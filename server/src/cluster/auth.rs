//! Peer authentication by a cluster secret: every peer call carries it in a
//! metadata header and the peer listener refuses calls without it
//! (`UNAUTHENTICATED`). The comparison takes the same time wherever the
//! first difference lies. Without peer TLS the secret crosses the wire in
//! clear: it keeps clients and strays off the peer port, not an attacker
//! who can read the traffic.
//!
//! With peer TLS every call also names its node (`x-quiver-node-id`), and
//! the certificate of the connection it came on must be a node certificate
//! (cluster CA, server use) naming that node's address in the cluster map:
//! a certificate for one host cannot claim a node at another, and a
//! client's certificate is not a node's. Pings must name the node the call
//! was authenticated as; Raft messages name replicas, which are not checked
//! against it.

use std::collections::HashMap;
use std::sync::{Arc, Weak};

use rustls::pki_types::CertificateDer;
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::service::Interceptor;
use tonic::{Request, Status};

use super::NodeId;

/// The metadata header carrying the secret.
pub const SECRET_HEADER: &str = "x-quiver-cluster-secret";
/// The metadata header naming the calling node.
pub const NODE_HEADER: &str = "x-quiver-node-id";

/// Adds the secret (nothing if it is empty) and this node's id to every
/// outgoing peer call.
#[derive(Debug, Clone)]
pub struct SignPeerCalls {
    secret: Option<AsciiMetadataValue>,
    node: AsciiMetadataValue,
}

impl SignPeerCalls {
    /// For `secret` (empty: calls go unsigned), from `node`. Fails on a
    /// secret that cannot be a header value (config validation refuses
    /// those first).
    pub fn new(secret: &str, node: NodeId) -> Result<Self, String> {
        let node = MetadataValue::from(node);
        if secret.is_empty() {
            return Ok(Self { secret: None, node });
        }
        let value = MetadataValue::try_from(secret)
            .map_err(|_| "cluster.secret is not a valid header value".to_owned())?;
        Ok(Self {
            secret: Some(value),
            node,
        })
    }
}

impl Interceptor for SignPeerCalls {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(secret) = &self.secret {
            request.metadata_mut().insert(SECRET_HEADER, secret.clone());
        }
        request
            .metadata_mut()
            .insert(NODE_HEADER, self.node.clone());
        Ok(request)
    }
}

/// The peer address the cluster map gives a node, if it is a member.
pub type PeerAddrOf = Arc<dyn Fn(NodeId) -> Option<String> + Send + Sync>;

/// The node a peer call was authenticated as (peer TLS), in the call's
/// extensions: calls whose body names a node (pings) must name this one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthenticatedPeer(pub NodeId);

/// Most connections [`PeerIdentity`] remembers as checked.
const CHECKED_CONNECTIONS_MAX: usize = 4096;

/// Checks that a peer call's certificate is a node certificate for the
/// address of the node the call says it comes from (peer TLS).
#[derive(Clone)]
pub struct PeerIdentity {
    tls: Arc<crate::tls::Tls>,
    addr_of: PeerAddrOf,
    /// Connections already checked, by the address of their certificate
    /// list (one per connection, shared by its calls): a call on a checked
    /// connection costs a lookup, not a certificate check. The weak pointer
    /// keeps the allocation, so its address is never another connection's.
    checked: Arc<parking_lot::Mutex<HashMap<usize, Checked>>>,
}

struct Checked {
    certificates: Weak<Vec<CertificateDer<'static>>>,
    node: NodeId,
    addr: String,
}

impl std::fmt::Debug for PeerIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerIdentity").finish_non_exhaustive()
    }
}

impl PeerIdentity {
    /// Checks against the addresses `addr_of` gives, with `tls`'s cluster
    /// CA.
    pub fn new(tls: Arc<crate::tls::Tls>, addr_of: PeerAddrOf) -> Self {
        Self {
            tls,
            addr_of,
            checked: Arc::default(),
        }
    }

    /// Whether a call from `node` on a connection with `certificates` may
    /// pass.
    pub fn check(
        &self,
        node: NodeId,
        certificates: Option<&Arc<Vec<CertificateDer<'static>>>>,
    ) -> Result<(), Status> {
        let Some(certificates) = certificates else {
            return Err(Status::unauthenticated(
                "peer call without a client certificate (peer TLS)",
            ));
        };
        let Some(addr) = (self.addr_of)(node) else {
            return Err(Status::permission_denied(format!(
                "node {node} is not in the cluster map"
            )));
        };
        let key = Arc::as_ptr(certificates) as usize;
        let mut checked = self.checked.lock();
        if let Some(seen) = checked.get(&key)
            && seen.node == node
            && seen.addr == addr
            && seen.certificates.upgrade().is_some()
        {
            return Ok(());
        }
        let host = crate::tls::host_of(&addr);
        self.tls
            .verify_node(Some(certificates), host)
            .map_err(|why| {
                Status::permission_denied(format!(
                    "the peer certificate is not node {node}'s ({host}, its address in the cluster map): {why}"
                ))
            })?;
        if checked.len() >= CHECKED_CONNECTIONS_MAX {
            checked.retain(|_, seen| seen.certificates.strong_count() > 0);
            if checked.len() >= CHECKED_CONNECTIONS_MAX {
                checked.clear();
            }
        }
        checked.insert(
            key,
            Checked {
                certificates: Arc::downgrade(certificates),
                node,
                addr,
            },
        );
        Ok(())
    }
}

/// Refuses incoming peer calls that do not carry the secret (or, while a
/// secret is being rotated, the previous one).
#[derive(Debug, Clone)]
pub struct CheckPeerCalls {
    secret: Vec<u8>,
    previous: Vec<u8>,
    identity: Option<PeerIdentity>,
}

impl CheckPeerCalls {
    /// For `secret` (empty: every call is let through), also accepting
    /// `previous` unless it is empty.
    pub fn new(secret: &str, previous: &str) -> Self {
        Self {
            secret: secret.as_bytes().to_vec(),
            previous: previous.as_bytes().to_vec(),
            identity: None,
        }
    }

    /// Also checks each call's certificate against its node (peer TLS).
    pub fn with_identity(mut self, identity: PeerIdentity) -> Self {
        self.identity = Some(identity);
        self
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
        if !self.accepts(given) {
            return Err(Status::unauthenticated(
                "peer call without the cluster secret (cluster.secret)",
            ));
        }
        if let Some(identity) = &self.identity {
            let node = request
                .metadata()
                .get(NODE_HEADER)
                .and_then(|value| value.to_str().ok())
                .and_then(|value| value.parse::<NodeId>().ok())
                .ok_or_else(|| {
                    Status::unauthenticated(format!("peer call without its node ({NODE_HEADER})"))
                })?;
            identity.check(node, request.peer_certs().as_ref())?;
            let mut request = request;
            request.extensions_mut().insert(AuthenticatedPeer(node));
            return Ok(request);
        }
        Ok(request)
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
        let mut sign = SignPeerCalls::new("s3cret", 1).unwrap();
        let signed = sign.call(Request::new(())).unwrap();
        assert!(CheckPeerCalls::new("s3cret", "").call(signed).is_ok());
        let unsigned = SignPeerCalls::new("", 1)
            .unwrap()
            .call(Request::new(()))
            .unwrap();
        assert!(CheckPeerCalls::new("s3cret", "").call(unsigned).is_err());
    }
}
