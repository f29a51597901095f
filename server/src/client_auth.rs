//! Client authentication on the client port: bearer tokens with a scope
//! (`read` < `write` < `admin`), configured by their sha256 under
//! `[auth] tokens`, so a config file or a leaked copy of it holds no usable
//! token. With no token configured every call is let through (a local or
//! firewalled cluster, as before).
//!
//! - A call names its token in `authorization: Bearer <token>`. None, or
//!   one that matches no configured hash: `UNAUTHENTICATED`. A token whose
//!   scope is too narrow for the method: `PERMISSION_DENIED`.
//! - Scopes by method: `Get`, `ListFeatureViews`, `Status`, `GetRoutes`
//!   and reflection need `read`; `Write`, `WriteStream`, `Delete`, `Invalidate`,
//!   `ApplyFeatureView` and `DeleteFeatureView` need `write`; every
//!   `quiver.admin.v1.Admin` method needs `admin`. Health checks need none
//!   (load balancers probe without credentials).
//! - The presented token is hashed, then compared with each configured
//!   hash in constant time: how long a refusal takes says nothing about
//!   how close a guess was.
//!
//! Tokens travel in clear until the client port has TLS (issue 13).
//!
//! Architecture invariant: knows the gRPC paths and the config, nothing of
//! the cluster.

use std::sync::Arc;
use std::task::{Context, Poll};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Most tokens a node accepts.
pub const TOKENS_MAX: usize = 1000;
/// Longest token name, in bytes.
pub const TOKEN_NAME_BYTES_MAX: usize = 64;
/// Longest `authorization` header read, in bytes.
const AUTHORIZATION_BYTES_MAX: usize = 1024;

/// What a token may do; each scope includes the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Reads: `Get`, view listings, status.
    Read,
    /// Reads, and writes of rows and views.
    Write,
    /// Everything, the admin service included.
    Admin,
}

impl Scope {
    fn name(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Write => "write",
            Scope::Admin => "admin",
        }
    }
}

/// One configured token (`[[auth.tokens]]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// Who holds it (logs and errors name it; 1 to 64 bytes).
    pub name: String,
    /// The token's sha256, 64 hex digits (`quiverctl token new` prints it).
    pub sha256: String,
    /// What it may do.
    pub scope: Scope,
}

/// The scope a gRPC path needs (`None`: none, a health check).
pub fn scope_needed(path: &str) -> Option<Scope> {
    let (service, method) = path.trim_start_matches('/').split_once('/')?;
    match service {
        "grpc.health.v1.Health" => None,
        "quiver.admin.v1.Admin" => Some(Scope::Admin),
        "quiver.v1.FeatureStore" => Some(match method {
            "Get" | "ListFeatureViews" | "Status" | "GetRoutes" => Scope::Read,
            // Writes, and any method this build does not know yet.
            _ => Scope::Write,
        }),
        // Reflection, and anything else served on the port.
        _ => Some(Scope::Read),
    }
}

/// The accepted tokens, by hash.
#[derive(Debug, Clone, Default)]
pub struct Tokens {
    tokens: Vec<([u8; 32], String, Scope)>,
}

impl Tokens {
    /// From the configuration; refuses a malformed or repeated entry.
    pub fn new(configured: &[TokenConfig]) -> Result<Tokens, String> {
        if configured.len() > TOKENS_MAX {
            return Err(format!("auth.tokens holds more than {TOKENS_MAX} tokens"));
        }
        let mut tokens: Vec<([u8; 32], String, Scope)> = Vec::with_capacity(configured.len());
        for token in configured {
            if token.name.is_empty() || token.name.len() > TOKEN_NAME_BYTES_MAX {
                return Err(format!(
                    "auth.tokens: a name must be 1 to {TOKEN_NAME_BYTES_MAX} bytes: {:?}",
                    token.name
                ));
            }
            let hash = parse_sha256(&token.sha256).ok_or_else(|| {
                format!(
                    "auth.tokens {:?}: sha256 must be 64 hex digits (quiverctl token new prints it)",
                    token.name
                )
            })?;
            if tokens
                .iter()
                .any(|(h, n, _)| *h == hash || *n == token.name)
            {
                return Err(format!(
                    "auth.tokens {:?}: a name or hash is listed twice",
                    token.name
                ));
            }
            tokens.push((hash, token.name.clone(), token.scope));
        }
        Ok(Tokens { tokens })
    }

    /// Whether any token is configured (else every call goes).
    pub fn enabled(&self) -> bool {
        !self.tokens.is_empty()
    }

    /// Admits a call to `path` with the `authorization` header value
    /// `authorization`, or says why not.
    pub fn check(&self, path: &str, authorization: Option<&[u8]>) -> Result<(), tonic::Status> {
        let Some(needed) = scope_needed(path).filter(|_| self.enabled()) else {
            return Ok(());
        };
        let token = authorization
            .filter(|value| value.len() <= AUTHORIZATION_BYTES_MAX)
            .and_then(|value| value.strip_prefix(b"Bearer "))
            .ok_or_else(|| {
                tonic::Status::unauthenticated(
                    "this node needs a token: send `authorization: Bearer <token>` \
                     (quiverctl --token or QUIVER_TOKEN)",
                )
            })?;
        let hash: [u8; 32] = Sha256::digest(token).into();
        // Every configured hash compared, in constant time each.
        let mut found: Option<(&str, Scope)> = None;
        for (configured, name, scope) in &self.tokens {
            if constant_time_eq(configured, &hash) {
                found = Some((name, *scope));
            }
        }
        let Some((name, scope)) = found else {
            return Err(tonic::Status::unauthenticated("unknown token"));
        };
        if scope < needed {
            return Err(tonic::Status::permission_denied(format!(
                "token {name:?} has scope {}; {path} needs {}",
                scope.name(),
                needed.name()
            )));
        }
        Ok(())
    }
}

fn parse_sha256(hex: &str) -> Option<[u8; 32]> {
    let bytes = hex.as_bytes();
    if bytes.len() != 64 || !bytes.iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in bytes.chunks(2).enumerate() {
        let text = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(text, 16).ok()?;
    }
    Some(out)
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The sha256 of `token` as configured (64 lowercase hex digits).
pub fn token_sha256(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A tower layer that checks every call on the client port (see the
/// module doc).
#[derive(Debug, Clone)]
pub struct ClientAuthLayer {
    tokens: Arc<Tokens>,
}

impl ClientAuthLayer {
    /// Checking against `tokens`.
    pub fn new(tokens: Tokens) -> Self {
        Self {
            tokens: Arc::new(tokens),
        }
    }
}

impl<S> tower::Layer<S> for ClientAuthLayer {
    type Service = ClientAuth<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ClientAuth {
            inner,
            tokens: self.tokens.clone(),
        }
    }
}

/// See [`ClientAuthLayer`].
#[derive(Debug, Clone)]
pub struct ClientAuth<S> {
    inner: S,
    tokens: Arc<Tokens>,
}

impl<S, B, RB> tower::Service<http::Request<B>> for ClientAuth<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
    RB: Default + Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = futures::future::BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let verdict = self.tokens.check(
            request.uri().path(),
            request
                .headers()
                .get(http::header::AUTHORIZATION)
                .map(|v| v.as_bytes()),
        );
        match verdict {
            Ok(()) => Box::pin(self.inner.call(request)),
            Err(status) => {
                let response = status.into_http::<RB>();
                Box::pin(async move { Ok(response) })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn tokens() -> Tokens {
        Tokens::new(&[
            TokenConfig {
                name: "serving".into(),
                sha256: token_sha256("r-token"),
                scope: Scope::Read,
            },
            TokenConfig {
                name: "materialize".into(),
                sha256: token_sha256("w-token"),
                scope: Scope::Write,
            },
            TokenConfig {
                name: "ops".into(),
                sha256: token_sha256("a-token"),
                scope: Scope::Admin,
            },
        ])
        .unwrap()
    }

    fn code(result: Result<(), tonic::Status>) -> tonic::Code {
        result.err().map_or(tonic::Code::Ok, |s| s.code())
    }

    #[test]
    fn scopes_nest_and_every_refusal_has_its_code() {
        use tonic::Code::*;
        let t = tokens();
        let get = "/quiver.v1.FeatureStore/Get";
        let write = "/quiver.v1.FeatureStore/Write";
        let admin = "/quiver.admin.v1.Admin/CreateBackup";
        let health = "/grpc.health.v1.Health/Check";
        for (path, token, expected) in [
            (get, None, Unauthenticated),
            (get, Some("Bearer nope"), Unauthenticated),
            (get, Some("r-token"), Unauthenticated),
            (get, Some("Bearer r-token"), Ok),
            (write, Some("Bearer r-token"), PermissionDenied),
            (write, Some("Bearer w-token"), Ok),
            (admin, Some("Bearer w-token"), PermissionDenied),
            (admin, Some("Bearer a-token"), Ok),
            (get, Some("Bearer a-token"), Ok),
            (health, None, Ok),
            (
                "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                None,
                Unauthenticated,
            ),
            (
                "/quiver.v1.FeatureStore/SomethingNew",
                Some("Bearer r-token"),
                PermissionDenied,
            ),
        ] {
            assert_eq!(
                code(t.check(path, token.map(str::as_bytes))),
                expected,
                "{path} {token:?}"
            );
        }
        // No token configured: everything goes.
        assert_eq!(code(Tokens::default().check(admin, None)), Ok);
    }

    #[test]
    fn malformed_or_repeated_tokens_are_refused() {
        let token = |name: &str, sha256: String| TokenConfig {
            name: name.into(),
            sha256,
            scope: Scope::Read,
        };
        assert!(Tokens::new(&[token("", token_sha256("x"))]).is_err());
        assert!(Tokens::new(&[token("a", "abc".into())]).is_err());
        assert!(Tokens::new(&[token("a", "zz".repeat(32))]).is_err());
        assert!(
            Tokens::new(&[token("a", token_sha256("x")), token("b", token_sha256("x"))]).is_err()
        );
        assert!(
            Tokens::new(&[token("a", token_sha256("x")), token("a", token_sha256("y"))]).is_err()
        );
        assert!(Tokens::new(&[token("a", token_sha256("x").to_uppercase())]).is_ok());
    }

    proptest! {
        /// Whatever a client sends as its header, the check answers (never
        /// panics), and only the exact token is accepted.
        #[test]
        fn arbitrary_headers_are_refused_or_accepted_never_crash(header in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let t = tokens();
            let accepted = t.check("/quiver.v1.FeatureStore/Get", Some(&header)).is_ok();
            let exact = [b"Bearer r-token".as_slice(), b"Bearer w-token", b"Bearer a-token"]
                .contains(&header.as_slice());
            prop_assert_eq!(accepted, exact);
        }
    }
}
