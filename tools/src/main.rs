//! `quiverctl`: Quiver's admin and debugging CLI. Talks to any node over the
//! public gRPC API; human tables by default, `--json` for scripts.
//!
//! Architecture invariant: the CLI uses only `quiver-proto` (the wire API). It
//! must never link the engine or the server, so it can never do what a remote
//! client cannot.

// Tests may unwrap; production code may not (workspace lint).
#![cfg_attr(test, allow(clippy::unwrap_used))]

mod backup;
mod client;
mod cluster;
mod drill;
mod files;
mod get;
mod probe;
mod put;
mod rebalance;
mod sample;
mod shard;
mod status;
mod tls;
mod values;
mod views;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

/// Quiver admin CLI.
#[derive(Debug, Parser)]
#[command(name = "quiverctl", version, about)]
struct Cli {
    /// Node to talk to (host:port or http://host:port).
    #[arg(
        long,
        global = true,
        env = "QUIVER_ENDPOINT",
        default_value = "127.0.0.1:7470"
    )]
    endpoint: String,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    /// Bearer token sent with every call (nodes with `auth.tokens` need
    /// one; `quiverctl token new` makes one).
    #[arg(long, global = true, env = "QUIVER_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// TLS: the CA that issued the nodes' certificates (PEM). Given: calls
    /// go over TLS and the node's certificate must name the endpoint's host.
    #[arg(long, global = true, env = "QUIVER_CA")]
    ca: Option<PathBuf>,
    /// TLS: this client's certificate (PEM), for nodes with
    /// `tls.client_ca_path`; with `--key`.
    #[arg(long, global = true, env = "QUIVER_CERT", requires = "key")]
    cert: Option<PathBuf>,
    /// TLS: the private key of `--cert` (PEM).
    #[arg(long, global = true, env = "QUIVER_KEY", requires = "cert")]
    key: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Manage feature views.
    #[command(subcommand)]
    Views(ViewsCommand),
    /// Write rows from a CSV or JSON-lines file.
    Put(put::PutArgs),
    /// Read features of entities.
    Get(get::GetArgs),
    /// Write at a fixed interval and report gaps in acknowledged writes
    /// (failover time as a client sees it).
    Probe(probe::ProbeArgs),
    /// Show the node's status.
    Status,
    /// The cluster's content checksum: a digest of every live row by view
    /// name, entity key, event time and feature values, per shard (read at
    /// each leader) and in all. Equal for a backup and the cluster restored
    /// from it. With --local-replicas: the node's own replicas instead.
    Checksum(drill::ChecksumArgs),
    /// Client tokens for nodes with `auth.tokens`.
    #[command(subcommand)]
    Token(TokenCommand),
    /// A local CA and certificates for nodes and clients (TLS).
    #[command(subcommand)]
    Tls(tls::TlsCommand),
    /// Inspect and move shards.
    #[command(subcommand)]
    Shard(ShardCommand),
    /// The cluster's nodes: list, add, drain, remove.
    #[command(subcommand)]
    Node(cluster::NodeCommand),
    /// Replica moves under way.
    #[command(subcommand)]
    Operator(cluster::OperatorCommand),
    /// Plan (and with --apply, carry out) the replica moves the scheduler
    /// wants and leader handovers so that every node leads about as many
    /// groups.
    Rebalance(rebalance::RebalanceArgs),
    /// Full backups: create, list, show, verify.
    #[command(subcommand)]
    Backup(backup::BackupCommand),
    /// Restore a backup into this new, empty cluster (its views, then its
    /// rows, routed by this cluster's shards).
    Restore(backup::RestoreArgs),
    /// Generate the sample data set.
    #[command(subcommand)]
    Sample(SampleCommand),
}

#[derive(Debug, Subcommand)]
enum ViewsCommand {
    /// Create or update the views in a YAML file.
    Apply {
        /// The YAML file.
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
    },
    /// List the registered views.
    List,
    /// Delete a view and all its rows.
    Delete {
        /// The view's name.
        name: String,
    },
}

#[derive(Debug, Subcommand)]
enum ShardCommand {
    /// Every shard: its leader, term and replicas, as each node reports it.
    List,
    /// Hand a shard's leadership to another of its voters (no election
    /// timeout: the target campaigns at once).
    TransferLeader(shard::TransferArgs),
    /// Move a shard's replica from one node to another (or add or remove
    /// one): add a learner, let it catch up, swap it in, remove the old.
    Move(cluster::MoveArgs),
    /// The shards as the cluster map holds them: hash ranges, epochs,
    /// replicas.
    Map,
    /// Split a shard's hash range in two; the new shard's replicas are on
    /// the same nodes.
    Split(cluster::SplitArgs),
}

#[derive(Debug, Subcommand)]
enum SampleCommand {
    /// Write drivers.csv and customers.jsonl for sample/views.yaml.
    Generate(sample::GenerateArgs),
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(run(cli))
}

/// `quiverctl token`.
#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Make a new random token and print it with the `[[auth.tokens]]`
    /// entry (its sha256) to put in every node's configuration.
    New {
        /// Who will hold it (1 to 64 bytes).
        #[arg(long)]
        name: String,
        /// What it may do: read, write (and read) or admin (everything).
        #[arg(long, value_parser = ["read", "write", "admin"])]
        scope: String,
    },
}

async fn run(cli: Cli) -> Result<()> {
    if let Some(token) = &cli.token {
        client::set_token(token)?;
    }
    if let Command::Sample(SampleCommand::Generate(args)) = &cli.command {
        return sample::generate(args);
    }
    if let Command::Token(TokenCommand::New { name, scope }) = &cli.command {
        return token_new(name, scope, cli.json);
    }
    if let Command::Tls(command) = &cli.command {
        return tls::run(command, cli.json);
    }
    if let Some(ca) = &cli.ca {
        client::set_tls(ca, cli.cert.as_deref().zip(cli.key.as_deref()))?;
    } else if cli.cert.is_some() {
        anyhow::bail!("--cert needs --ca (the CA of the nodes' certificates)");
    }
    if let Command::Shard(ShardCommand::TransferLeader(args)) = &cli.command {
        return shard::transfer_leader(&cli.endpoint, args, cli.json).await;
    }
    if let Command::Rebalance(args) = &cli.command {
        return rebalance::rebalance(&cli.endpoint, args, cli.json).await;
    }
    match &cli.command {
        Command::Backup(command) => return backup::run(&cli.endpoint, command, cli.json).await,
        Command::Restore(args) => return backup::restore(&cli.endpoint, args, cli.json).await,
        Command::Checksum(args) => return drill::checksum(&cli.endpoint, args, cli.json).await,
        Command::Node(command) => return cluster::node(&cli.endpoint, command, cli.json).await,
        Command::Operator(command) => {
            return cluster::operator(&cli.endpoint, command, cli.json).await;
        }
        Command::Shard(ShardCommand::Move(args)) => {
            return cluster::move_replica(&cli.endpoint, args, cli.json).await;
        }
        Command::Shard(ShardCommand::Map) => {
            return cluster::shard_map(&cli.endpoint, cli.json).await;
        }
        Command::Shard(ShardCommand::Split(args)) => {
            return cluster::split(&cli.endpoint, args, cli.json).await;
        }
        _ => {}
    }
    let mut client = client::connect(&cli.endpoint).await?;
    match cli.command {
        Command::Views(ViewsCommand::Apply { file }) => {
            views::apply(&mut client, &file, cli.json).await
        }
        Command::Views(ViewsCommand::List) => views::list(&mut client, cli.json).await,
        Command::Views(ViewsCommand::Delete { name }) => views::delete(&mut client, &name).await,
        Command::Put(args) => put::run(&mut client, &args, cli.json).await,
        Command::Get(args) => get::run(&mut client, &args, cli.json).await,
        Command::Probe(args) => probe::run(&mut client, &args, cli.json).await,
        Command::Status => status::run(&mut client, cli.json).await,
        Command::Shard(ShardCommand::List) => shard::list(&mut client, cli.json).await,
        Command::Shard(
            ShardCommand::TransferLeader(_)
            | ShardCommand::Move(_)
            | ShardCommand::Map
            | ShardCommand::Split(_),
        )
        | Command::Rebalance(_)
        | Command::Backup(_)
        | Command::Restore(_)
        | Command::Checksum(_)
        | Command::Node(_)
        | Command::Operator(_) => {
            unreachable!("handled before")
        }
        Command::Sample(_) | Command::Token(_) | Command::Tls(_) => {
            unreachable!("handled before connecting")
        }
    }
}

/// `quiverctl token new`: 32 random bytes as hex, and their sha256.
fn token_new(name: &str, scope: &str, json: bool) -> Result<()> {
    use sha2::Digest as _;
    if name.is_empty() || name.len() > 64 || name.contains(['"', '\\']) {
        anyhow::bail!("--name must be 1 to 64 bytes, without quotes or backslashes");
    }
    let token: String = rand::random::<[u8; 32]>()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    // What the node compares with (`client_auth::token_sha256`).
    let sha256: String = sha2::Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    if json {
        println!(
            "{}",
            serde_json::json!({"name": name, "scope": scope, "token": token, "sha256": sha256})
        );
    } else {
        println!("token (give it to {name}; it is not stored anywhere): {token}");
        println!("add to every node's configuration:");
        println!();
        println!("[[auth.tokens]]");
        println!("name = \"{name}\"");
        println!("scope = \"{scope}\"");
        println!("sha256 = \"{sha256}\"");
    }
    Ok(())
}
