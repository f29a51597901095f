//! `quiverd`: runs one Quiver node. With no flags it serves on
//! 127.0.0.1:7470 with data in ./quiver-data.

use anyhow::Context;
use clap::Parser;
use quiver_server::config::{Config, Flags, LogFormat};
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;

fn main() -> anyhow::Result<()> {
    let flags = Flags::parse();
    let config = Config::load(&flags)?;
    init_logging(config.log_format);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the tokio runtime")?;
    runtime.block_on(run(config))
}

async fn run(config: Config) -> anyhow::Result<()> {
    let listener = TcpListener::bind(config.listen_addr)
        .await
        .with_context(|| format!("bind {}", config.listen_addr))?;
    let peer_addr = config.peer_listen_addr()?;
    let peer_listener = TcpListener::bind(peer_addr)
        .await
        .with_context(|| format!("bind the peer listener {peer_addr}"))?;
    // Scripts and tests read the bound addresses (port 0 picks one) from
    // these lines, the client address first.
    println!(
        "quiverd listening on {}",
        listener.local_addr().context("read the bound address")?
    );
    println!(
        "quiverd peers on {}",
        peer_listener
            .local_addr()
            .context("read the bound peer address")?
    );
    quiver_server::serve(config, listener, peer_listener, shutdown_signal())
        .await
        .context("run the node")
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = interrupt => {}
                    _ = terminate.recv() => {}
                }
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM; only SIGINT stops the node");
                let _ = interrupt.await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_env("QUIVER_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
