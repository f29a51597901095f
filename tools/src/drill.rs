//! `quiverctl backup drill` and `quiverctl checksum`.
//!
//! A drill is the restore test operators are told to run every week, made
//! one command: a scratch `quiverd` is started on this machine (loopback,
//! ephemeral ports, a directory of its own, no log shipping, no expiry), a
//! backup is restored into it by the ordinary restore (every file and every
//! shard's rows checked against the manifest, the shipped log replayed to a
//! time if one is asked), and the scratch cluster's content checksum is
//! compared with the digest of what the restore read from the backup. The
//! scratch node is then stopped and its directory removed (kept, with the
//! node's log, when the drill fails). The cluster that took the backup is
//! not involved: a drill works when it is gone, which is when it matters.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use comfy_table::Table;
use quiver_proto::admin as pb;
use tonic::Code;

use crate::backup::{
    BACKUP_WAIT, ToTime, parse_to_time, precise_time_text, print_json, restore_request, spinner,
};
use crate::client::{self, status_error};

/// How long the scratch node may take to start and elect its leaders.
const SCRATCH_START_WAIT: Duration = Duration::from_secs(60);

/// The pause before asking a starting node again.
const RETRY_PAUSE: Duration = Duration::from_millis(200);

/// `backup drill`.
#[derive(Debug, Args)]
pub struct DrillArgs {
    /// The target holding the backup (it must be readable from this
    /// machine: for file:// a directory here).
    pub url: String,
    /// The backup to restore [default: the newest complete one, at or
    /// before --to-time with one].
    #[arg(long = "backup")]
    pub backup_id: Option<String>,
    /// Also replay the shipped log to this time: RFC 3339 or `latest`.
    #[arg(long, value_parser = parse_to_time)]
    pub to_time: Option<ToTime>,
    /// Only backups of this cluster, when the target holds several.
    #[arg(long)]
    pub cluster_id: Option<String>,
    /// The quiverd binary [default: the one next to quiverctl, else
    /// quiverd on PATH].
    #[arg(long)]
    pub quiverd: Option<PathBuf>,
    /// Where the scratch node's directory goes [default: the system's
    /// temporary directory]. It needs room for the restored data.
    #[arg(long)]
    pub scratch_dir: Option<PathBuf>,
    /// Keep the scratch directory (data and node log) after a passed drill.
    #[arg(long)]
    pub keep: bool,
}

/// A scratch `quiverd`: killed when dropped.
struct ScratchNode {
    child: Child,
    endpoint: String,
}

impl Drop for ScratchNode {
    fn drop(&mut self) {
        // A scratch node holds nothing to keep: no graceful stop needed.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl ScratchNode {
    /// Starts `quiverd` with its data in `dir/node` and its log in
    /// `dir/quiverd.log`, and reads the address it bound.
    async fn start(binary: &Path, dir: &Path) -> Result<ScratchNode> {
        let log_path = dir.join("quiverd.log");
        let log = std::fs::File::create(&log_path)
            .with_context(|| format!("create {}", log_path.display()))?;
        let mut command = Command::new(binary);
        command
            .arg("--listen-addr")
            .arg("127.0.0.1:0")
            .arg("--peer-listen-addr")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(dir.join("node"))
            .arg("--sync-writes")
            .arg("false")
            .arg("--cache-bytes-max")
            .arg("0");
        // The caller's node settings (a log target, a schedule, a cluster
        // description) are not the scratch node's.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("QUIVER_") {
                command.env_remove(key);
            }
        }
        let mut child = command
            // Rows older than their ttl are restored as the backup holds
            // them; expiry would drop them before they are counted.
            .env("QUIVER_TTL_EXPIRE_INTERVAL_SECONDS", "86400")
            .env("QUIVER_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .with_context(|| format!("start {}", binary.display()))?;
        let Some(stdout) = child.stdout.take() else {
            let _ = child.kill();
            bail!("no output from {}", binary.display());
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let _ = tx.send(lines.next().and_then(Result::ok));
            // Drained so the node never blocks on a full pipe.
            for _ in lines.map_while(Result::ok) {}
        });
        // From here the guard kills the node on every early return.
        let mut node = ScratchNode {
            child,
            endpoint: String::new(),
        };
        let line = match tokio::time::timeout(SCRATCH_START_WAIT, rx).await {
            Ok(Ok(Some(line))) => line,
            _ => bail!(
                "the scratch quiverd did not start; its log: {}",
                log_path.display()
            ),
        };
        node.endpoint = line
            .strip_prefix("quiverd listening on ")
            .ok_or_else(|| anyhow!("unexpected first line from quiverd: {line:?}"))?
            .to_owned();
        Ok(node)
    }
}

/// The quiverd to start: `--quiverd`, else next to this executable, else
/// on PATH.
fn quiverd_binary(given: Option<&Path>) -> PathBuf {
    if let Some(path) = given {
        return path.to_path_buf();
    }
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join("quiverd")))
        .filter(|path| path.is_file())
        .unwrap_or_else(|| PathBuf::from("quiverd"))
}

/// Runs a drill.
pub async fn drill(args: &DrillArgs, json: bool) -> Result<()> {
    let started = Instant::now();
    let root = args.scratch_dir.clone().unwrap_or_else(std::env::temp_dir);
    let dir = root.join(format!(
        "quiver-drill-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    // Interrupted, the drill's future is dropped, and with it the scratch
    // node (killed), so no quiverd outlives the command.
    let (outcome, interrupted) = tokio::select! {
        outcome = run_drill(args, &dir, json) => (outcome, false),
        signal = interrupted() => (Err(anyhow!("interrupted ({signal})")), true),
    };
    let keep = args.keep || (!interrupted && !matches!(outcome, Ok(true)));
    if keep {
        eprintln!("scratch directory kept: {}", dir.display());
    } else if let Err(e) = std::fs::remove_dir_all(&dir) {
        eprintln!(
            "could not remove the scratch directory {}: {e}",
            dir.display()
        );
    }
    match outcome {
        Ok(true) => {
            if !json {
                println!(
                    "drill passed in {}",
                    humantime::format_duration(Duration::from_millis(
                        started.elapsed().as_millis() as u64
                    ))
                );
            }
            Ok(())
        }
        Ok(false) => bail!("drill FAILED: the restored cluster does not hold what the backup does"),
        Err(e) => Err(e.context("drill FAILED")),
    }
}

/// Resolves on SIGINT or SIGTERM, naming it (never, for a signal that
/// cannot be listened to).
async fn interrupted() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let sigint = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    let sigterm = async {
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                term.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        () = sigint => "SIGINT",
        () = sigterm => "SIGTERM",
    }
}

/// The drill's steps; `Ok(false)` when the checksums differ.
async fn run_drill(args: &DrillArgs, dir: &Path, json: bool) -> Result<bool> {
    let binary = quiverd_binary(args.quiverd.as_deref());
    let node = ScratchNode::start(&binary, dir).await?;
    let request = restore_request(
        &args.url,
        args.backup_id.as_deref(),
        args.to_time,
        args.cluster_id.as_deref(),
    );
    let bar = spinner(
        json,
        format!("restoring into a scratch node at {}", node.endpoint),
    );
    let outcome = async {
        let restore_started = Instant::now();
        let restored = restore_when_ready(&node.endpoint, request).await?;
        let took = restore_started.elapsed();
        bar.set_message("computing the scratch cluster's checksum");
        Ok::<_, anyhow::Error>((restored, took, checksum_of(&node.endpoint, false).await?))
    }
    .await;
    bar.finish_and_clear();
    let (restored, restore_took, checksum) = outcome?;
    let unknown: u64 = checksum.shards.iter().map(|s| s.unknown_view_rows).sum();
    let passed = restored.content_rows == checksum.rows
        && restored.content_sum == checksum.sum
        && unknown == 0;
    let rows_per_second = restored.rows_restored as f64 / restore_took.as_secs_f64().max(1e-3);
    if json {
        print_json(&serde_json::json!({
            "passed": passed,
            "backup_id": restored.backup_id,
            "restored_to_us": restored.restored_to_us,
            "log_entries_replayed": restored.log_entries_replayed,
            "views": restored.views,
            "shards_read": restored.shards,
            "rows_restored": restored.rows_restored,
            "restore_seconds": restore_took.as_secs_f64(),
            "expected": {"rows": restored.content_rows, "sum": restored.content_sum},
            "found": {"rows": checksum.rows, "sum": checksum.sum,
                      "unknown_view_rows": unknown},
        }))?;
        return Ok(passed);
    }
    let mut table = Table::new();
    table.set_header(["", "rows", "content checksum"]);
    table.add_row([
        "read from the backup".to_owned(),
        restored.content_rows.to_string(),
        restored.content_sum.clone(),
    ]);
    table.add_row([
        "found in the restored cluster".to_owned(),
        checksum.rows.to_string(),
        checksum.sum.clone(),
    ]);
    println!(
        "backup {}{}: {} views, {} rows from {} shards restored in {:.1} s ({:.0} rows/s)",
        restored.backup_id,
        if restored.restored_to_us > 0 {
            format!(
                " replayed to {} ({} log entries)",
                precise_time_text(restored.restored_to_us),
                restored.log_entries_replayed
            )
        } else {
            String::new()
        },
        restored.views,
        restored.rows_restored,
        restored.shards,
        restore_took.as_secs_f64(),
        rows_per_second
    );
    println!("{table}");
    if unknown > 0 {
        println!("{unknown} restored rows belong to no view the scratch cluster knows");
    }
    println!(
        "{}",
        if passed {
            "the checksums match"
        } else {
            "the checksums DIFFER"
        }
    );
    Ok(passed)
}

/// Restores into the scratch node, waiting while it elects its leaders.
async fn restore_when_ready(
    endpoint: &str,
    request: pb::RestoreBackupRequest,
) -> Result<pb::RestoreBackupResponse> {
    let deadline = Instant::now() + SCRATCH_START_WAIT;
    loop {
        let attempt = match client::connect_admin_waiting(endpoint, BACKUP_WAIT).await {
            Ok(mut admin) => admin.restore_backup(request.clone()).await,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(RETRY_PAUSE).await;
                continue;
            }
            Err(e) => return Err(e.context("connect to the scratch node")),
        };
        match attempt {
            Ok(answer) => return Ok(answer.into_inner()),
            // Not ready yet (no metadata leader): the restore changed nothing.
            Err(status) if status.code() == Code::Unavailable && Instant::now() < deadline => {
                tokio::time::sleep(RETRY_PAUSE).await;
            }
            Err(status) => return Err(status_error("restore", status)),
        }
    }
}

/// `quiverctl checksum`.
#[derive(Debug, clap::Args)]
pub struct ChecksumArgs {
    /// The node's own shard replicas, each at the index it has applied
    /// (leader or not, no read barrier), instead of every shard at its
    /// leader: replicas of a shard that show the same applied index must
    /// show the same checksum, and no rows outside their range.
    #[arg(long)]
    pub local_replicas: bool,
}

/// The content checksum of the cluster at `endpoint` (or of its replicas).
async fn checksum_of(endpoint: &str, local_replicas: bool) -> Result<pb::ChecksumResponse> {
    let mut admin = client::connect_admin_waiting(endpoint, BACKUP_WAIT).await?;
    Ok(admin
        .checksum(pb::ChecksumRequest { local_replicas })
        .await
        .map_err(|s| status_error("checksum", s))?
        .into_inner())
}

/// `quiverctl checksum`: the content checksum of the cluster at
/// `endpoint`, per shard and in all, or of the node's own replicas.
pub async fn checksum(endpoint: &str, args: &ChecksumArgs, json: bool) -> Result<()> {
    let local = args.local_replicas;
    let answer = checksum_of(endpoint, local).await?;
    if json {
        return print_json(&serde_json::json!({
            "rows": answer.rows,
            "sum": answer.sum,
            "map_version": answer.map_version,
            "shards": answer.shards.iter().map(|s| {
                let mut shard = serde_json::json!({
                    "shard": s.shard,
                    "rows": s.rows,
                    "sum": s.sum,
                    "tombstones": s.tombstones,
                    "expired": s.expired,
                    "dropped_view_rows": s.dropped_view_rows,
                    "unknown_view_rows": s.unknown_view_rows,
                });
                if local {
                    shard["replica"] = s.replica.into();
                    shard["applied_index"] = s.applied_index.into();
                    shard["start"] = s.start.into();
                    shard["end"] = s.end.into();
                    shard["rows_outside"] = s.rows_outside.into();
                }
                shard
            }).collect::<Vec<_>>(),
        }));
    }
    let mut table = Table::new();
    let mut header = vec!["shard"];
    if local {
        header.extend(["replica", "applied", "range", "rows outside"]);
    }
    header.extend([
        "rows",
        "content checksum",
        "deleted",
        "expired",
        "of deleted views",
        "of unknown views",
    ]);
    table.set_header(header);
    for s in &answer.shards {
        let mut row = vec![s.shard.to_string()];
        if local {
            let end = if s.end == 0 {
                "end".to_owned()
            } else {
                format!("{:#x}", s.end)
            };
            row.extend([
                crate::cluster::replica_name(s.replica),
                s.applied_index.to_string(),
                format!("{:#x}..{end}", s.start),
                s.rows_outside.to_string(),
            ]);
        }
        row.extend([
            s.rows.to_string(),
            s.sum.clone(),
            s.tombstones.to_string(),
            s.expired.to_string(),
            s.dropped_view_rows.to_string(),
            s.unknown_view_rows.to_string(),
        ]);
        table.add_row(row);
    }
    println!("{table}");
    let whose = if local {
        "this node's replicas"
    } else {
        "cluster"
    };
    println!(
        "{whose} (map version {}): {} rows, content checksum {}",
        answer.map_version, answer.rows, answer.sum
    );
    Ok(())
}
