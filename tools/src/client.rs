//! Connecting to a node.

use std::time::Duration;

use std::sync::OnceLock;

use anyhow::{Context, Result, bail};
use quiver_proto::admin::admin_client;
use quiver_proto::v1::feature_store_client::FeatureStoreClient;
use tonic::metadata::AsciiMetadataValue;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

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
    let url = if endpoint.contains("://") {
        endpoint.to_owned()
    } else {
        format!("http://{endpoint}")
    };
    let channel = Endpoint::from_shared(url.clone())
        .with_context(|| format!("parse endpoint {endpoint:?}"))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(timeout)
        .connect()
        .await
        .with_context(|| {
            format!("connect to quiverd at {url} (is it running? see --endpoint / QUIVER_ENDPOINT)")
        })?;
    Ok(InterceptedService::new(channel, AddToken))
}

/// Turns a gRPC status into an error that says what the server said.
pub fn status_error(action: &str, status: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{action}: {} ({:?})", status.message(), status.code())
}
