//! Connecting to a node.

use std::time::Duration;

use anyhow::{Context, Result};
use quiver_proto::admin::admin_client::AdminClient;
use quiver_proto::v1::feature_store_client::FeatureStoreClient;
use tonic::transport::{Channel, Endpoint};

/// Largest response the CLI accepts.
const RESPONSE_BYTES_MAX: usize = 256 << 20;

/// A client of one node.
pub type Client = FeatureStoreClient<Channel>;

/// Connects to `endpoint` (`host:port` or a URL).
pub async fn connect(endpoint: &str) -> Result<Client> {
    let channel = channel(endpoint).await?;
    Ok(FeatureStoreClient::new(channel).max_decoding_message_size(RESPONSE_BYTES_MAX))
}

/// A client of one node's admin service.
pub async fn connect_admin(endpoint: &str) -> Result<AdminClient<Channel>> {
    let channel = channel(endpoint).await?;
    Ok(AdminClient::new(channel).max_decoding_message_size(RESPONSE_BYTES_MAX))
}

/// A client of one node's admin service whose calls may take up to
/// `timeout` (a backup).
pub async fn connect_admin_waiting(
    endpoint: &str,
    timeout: Duration,
) -> Result<AdminClient<Channel>> {
    let channel = channel_with_timeout(endpoint, timeout).await?;
    Ok(AdminClient::new(channel).max_decoding_message_size(RESPONSE_BYTES_MAX))
}

/// A channel to `endpoint`.
async fn channel(endpoint: &str) -> Result<Channel> {
    channel_with_timeout(endpoint, REQUEST_TIMEOUT).await
}

/// How long a call may take, unless a command says otherwise.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// A channel to `endpoint` whose calls may take up to `timeout`.
async fn channel_with_timeout(endpoint: &str, timeout: Duration) -> Result<Channel> {
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
    Ok(channel)
}

/// Turns a gRPC status into an error that says what the server said.
pub fn status_error(action: &str, status: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{action}: {} ({:?})", status.message(), status.code())
}
