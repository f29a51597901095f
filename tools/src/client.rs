//! Connecting to a node.

use std::path::Path;
use std::time::Duration;

use std::sync::OnceLock;

use anyhow::{Context, Result, bail};
use quiver_proto::admin::admin_client;
use quiver_proto::v1::feature_store_client::FeatureStoreClient;
use tonic::metadata::AsciiMetadataValue;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// Largest response the CLI accepts.
const RESPONSE_BYTES_MAX: usize = 256 << 20;

/// A channel whose every call carries the `--token`, if one was given.
pub type AuthChannel = InterceptedService<Channel, AddToken>;
/// A client of one node.
pub type Client = FeatureStoreClient<AuthChannel>;
/// A client of one node's admin service.
pub type AdminClient = admin_client::AdminClient<AuthChannel>;

/// The `authorization` value every call carries (`--token`).
static AUTHORIZATION: OnceLock<AsciiMetadataValue> = OnceLock::new();

/// Makes every later call carry `token` (`--token` / `QUIVER_TOKEN`).
pub fn set_token(token: &str) -> Result<()> {
    let Ok(value) = AsciiMetadataValue::try_from(format!("Bearer {token}")) else {
        bail!("--token must be printable ASCII");
    };
    let _ = AUTHORIZATION.set(value);
    Ok(())
}

/// TLS for every later connection (`--ca`, `--cert`, `--key`).
static TLS: OnceLock<ClientTlsConfig> = OnceLock::new();

/// Largest CA, certificate or key file read.
const TLS_FILE_BYTES_MAX: u64 = 1 << 20;

/// Makes every later connection use TLS, trusting `ca`, and presenting
/// `identity` (certificate, key) if given.
pub fn set_tls(ca: &Path, identity: Option<(&Path, &Path)>) -> Result<()> {
    let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read_pem(ca)?));
    if let Some((cert, key)) = identity {
        config = config.identity(Identity::from_pem(read_pem(cert)?, read_pem(key)?));
    }
    let _ = TLS.set(config);
    Ok(())
}

fn read_pem(path: &Path) -> Result<Vec<u8>> {
    crate::files::read_bounded(path, TLS_FILE_BYTES_MAX)
}

/// Adds the token to a call.
#[derive(Debug, Clone, Copy, Default)]
pub struct AddToken;

impl Interceptor for AddToken {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = AUTHORIZATION.get() {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// Connects to `endpoint` (`host:port` or a URL).
pub async fn connect(endpoint: &str) -> Result<Client> {
    let channel = channel(endpoint).await?;
    Ok(FeatureStoreClient::new(channel).max_decoding_message_size(RESPONSE_BYTES_MAX))
}

/// A client of one node's admin service.
pub async fn connect_admin(endpoint: &str) -> Result<AdminClient> {
    let channel = channel(endpoint).await?;
    Ok(admin_client::AdminClient::new(channel).max_decoding_message_size(RESPONSE_BYTES_MAX))
}

/// A client of one node's admin service whose calls may take up to
/// `timeout` (a backup).
pub async fn connect_admin_waiting(endpoint: &str, timeout: Duration) -> Result<AdminClient> {
    let channel = channel_with_timeout(endpoint, timeout).await?;
    Ok(admin_client::AdminClient::new(channel).max_decoding_message_size(RESPONSE_BYTES_MAX))
}

/// A channel to `endpoint`.
async fn channel(endpoint: &str) -> Result<AuthChannel> {
    channel_with_timeout(endpoint, REQUEST_TIMEOUT).await
}

/// How long a call may take, unless a command says otherwise.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// A channel to `endpoint` whose calls may take up to `timeout`.
async fn channel_with_timeout(endpoint: &str, timeout: Duration) -> Result<AuthChannel> {
    let tls = TLS.get();
    let host_port = endpoint
        .split_once("://")
        .map_or(endpoint, |(_, rest)| rest);
    let url = match (tls, endpoint.split_once("://")) {
        (Some(_), _) => format!("https://{host_port}"),
        (None, Some(("https", _))) => bail!("{endpoint} is https: give --ca (QUIVER_CA)"),
        (None, Some(_)) => endpoint.to_owned(),
        (None, None) => format!("http://{endpoint}"),
    };
    let mut builder = Endpoint::from_shared(url.clone())
        .with_context(|| format!("parse endpoint {endpoint:?}"))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(timeout);
    if let Some(tls) = tls {
        builder = builder.tls_config(tls.clone()).context("TLS settings")?;
    }
    let channel = builder.connect().await.with_context(|| {
        format!("connect to quiverd at {url} (is it running? see --endpoint / QUIVER_ENDPOINT)")
    })?;
    Ok(InterceptedService::new(channel, AddToken))
}

/// Turns a gRPC status into an error that says what the server said.
pub fn status_error(action: &str, status: tonic::Status) -> anyhow::Error {
    // A transport failure (a refused TLS handshake, say) says why only in
    // its sources.
    let mut why = String::new();
    let mut source = std::error::Error::source(&status);
    while let Some(error) = source {
        why.push_str(&format!(": {error}"));
        source = error.source();
    }
    anyhow::anyhow!("{action}: {}{why} ({:?})", status.message(), status.code())
}
