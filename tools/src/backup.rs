//! `quiverctl backup ...`: full backups of a running cluster to a target
//! URL, listed, shown and verified, through `quiver.admin.v1.Admin` (the
//! node asked does the work; the CLI moves no data).

use std::time::Duration;

use anyhow::{Result, bail};
use clap::{Args, Subcommand};
use comfy_table::Table;
use indicatif::{ProgressBar, ProgressStyle};
use quiver_proto::admin as pb;

use crate::client::{self, status_error};

/// How long the CLI waits for a backup or a verification (the node keeps
/// going if it gives up: a backup completes and is listed).
pub(crate) const BACKUP_WAIT: Duration = Duration::from_secs(24 * 3600);

/// `backup ...`.
#[derive(Debug, Subcommand)]
pub enum BackupCommand {
    /// Back up the whole cluster: every shard's checkpoint, then the
    /// feature views and cluster map, then the manifest.
    Create(UrlArgs),
    /// The complete backups at a target, oldest first.
    List(UrlArgs),
    /// One backup's shards: range, rows, bytes, position and time.
    Show(BackupArgs),
    /// Check every file of a backup against its checksums; with --data,
    /// also restore every shard into a scratch store on the node and
    /// compare its rows.
    Verify(VerifyArgs),
    /// Continuous log backup at a target: how far each group's shipped log
    /// reaches, and the time the cluster can be restored to (the RPO).
    Status(StatusArgs),
    /// Restore a backup into a scratch node started on this machine,
    /// compare what the restored cluster holds with what the backup does
    /// (content checksums), report, and clean up.
    Drill(crate::drill::DrillArgs),
    /// Delete what the retention does not keep: backups started before the
    /// window (but the newest of those, and always the newest), incomplete
    /// ones, and shipped log no kept backup needs.
    Prune(PruneArgs),
}

/// `backup prune`.
#[derive(Debug, Args)]
pub struct PruneArgs {
    /// The target.
    pub url: String,
    /// The window to keep, e.g. `7d`, `36h` [default: the node's
    /// backup.retention_hours].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub retention: Option<Duration>,
    /// Only print what would be deleted.
    #[arg(long)]
    pub dry_run: bool,
}

/// `backup status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The target the cluster ships its log to (backup.log_url).
    pub url: String,
    /// Another cluster's id (16 hex digits, as `backup show` prints it)
    /// [default: the cluster asked].
    #[arg(long)]
    pub cluster_id: Option<String>,
}

/// A target.
#[derive(Debug, Args)]
pub struct UrlArgs {
    /// The target: file:///absolute/dir (on the nodes' file system: a
    /// shared or local directory), or s3://bucket/prefix with an s3 build.
    pub url: String,
}

/// A backup at a target.
#[derive(Debug, Args)]
pub struct BackupArgs {
    /// The target.
    pub url: String,
    /// The backup's id (see `backup list`).
    pub backup_id: String,
}

/// `backup verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The target.
    pub url: String,
    /// The backup's id.
    pub backup_id: String,
    /// Also restore every shard into a scratch store and compare its rows
    /// (reads the whole backup onto the node asked).
    #[arg(long)]
    pub data: bool,
}

/// `restore`.
#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// The target holding the backup.
    #[arg(long = "from")]
    pub url: String,
    /// The backup to restore [default: the newest complete one, at or
    /// before --to-time with one].
    #[arg(long = "backup")]
    pub backup_id: Option<String>,
    /// Restore the cluster as it was at this time: RFC 3339
    /// (`2026-12-05T08:30:00Z`, `2026-12-05T08:30:00.250Z`), or `latest`
    /// (the latest time every shipped log reaches). Needs log shipping
    /// (backup.log_url) in the backed-up cluster.
    #[arg(long, value_parser = parse_to_time)]
    pub to_time: Option<ToTime>,
    /// Only backups (and the shipped log) of this cluster, when the target
    /// holds several (`backup show` prints a backup's cluster).
    #[arg(long)]
    pub cluster_id: Option<String>,
}

/// A point in time to restore to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToTime {
    /// µs since the epoch.
    At(i64),
    /// As far as the shipped logs reach.
    Latest,
}

/// Parses `--to-time`.
pub(crate) fn parse_to_time(text: &str) -> Result<ToTime, String> {
    if text == "latest" {
        return Ok(ToTime::Latest);
    }
    let at = humantime::parse_rfc3339_weak(text)
        .map_err(|e| format!("{text:?}: {e} (RFC 3339 like 2026-12-05T08:30:00Z, or latest)"))?;
    let us = at
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|_| format!("{text:?} is before 1970"))?
        .as_micros();
    i64::try_from(us)
        .ok()
        .filter(|&us| us > 0)
        .map(ToTime::At)
        .ok_or_else(|| format!("{text:?} is out of range"))
}

/// The request restoring backup `backup_id` (or the newest that fits) at
/// `url` as of `to_time`.
pub(crate) fn restore_request(
    url: &str,
    backup_id: Option<&str>,
    to_time: Option<ToTime>,
    cluster_id: Option<&str>,
) -> pb::RestoreBackupRequest {
    pb::RestoreBackupRequest {
        url: url.to_owned(),
        backup_id: backup_id.unwrap_or_default().to_owned(),
        to_time_us: match to_time {
            Some(ToTime::At(us)) => us,
            _ => 0,
        },
        to_latest: to_time == Some(ToTime::Latest),
        cluster_id: cluster_id.unwrap_or_default().to_owned(),
    }
}

/// Restores a backup into the (new, empty) cluster of `endpoint`.
pub async fn restore(endpoint: &str, args: &RestoreArgs, json: bool) -> Result<()> {
    let mut admin = client::connect_admin_waiting(endpoint, BACKUP_WAIT).await?;
    let what = match (&args.backup_id, args.to_time) {
        (_, Some(ToTime::Latest)) => "to the latest shipped time".to_owned(),
        (_, Some(ToTime::At(us))) => format!("to {}", precise_time_text(us)),
        (Some(id), None) => id.clone(),
        (None, None) => "the newest backup".to_owned(),
    };
    let spinner = spinner(json, format!("restoring {what}"));
    let answer = admin
        .restore_backup(restore_request(
            &args.url,
            args.backup_id.as_deref(),
            args.to_time,
            args.cluster_id.as_deref(),
        ))
        .await
        .map_err(|s| status_error("restore", s));
    spinner.finish_and_clear();
    let report = answer?.into_inner();
    let backup_id = &report.backup_id;
    if json {
        print_json(&serde_json::json!({
            "backup_id": backup_id,
            "restored_to_us": report.restored_to_us,
            "log_entries_replayed": report.log_entries_replayed,
            "views": report.views,
            "shards": report.shards,
            "rows_restored": report.rows_restored,
            "tombstones_skipped": report.tombstones_skipped,
            "expired_skipped": report.expired_skipped,
            "deleted_view_rows_skipped": report.deleted_view_rows_skipped,
            "content_rows": report.content_rows,
            "content_sum": report.content_sum,
        }))?;
    } else {
        println!(
            "restored backup {backup_id}: {} views, {} rows from {} shards (left out: {} deleted, \
             {} expired, {} of deleted views)",
            report.views,
            report.rows_restored,
            report.shards,
            report.tombstones_skipped,
            report.expired_skipped,
            report.deleted_view_rows_skipped
        );
        if report.restored_to_us > 0 {
            println!(
                "replayed {} shipped log entries: the cluster is as it was at {}",
                report.log_entries_replayed,
                precise_time_text(report.restored_to_us)
            );
        }
    }
    Ok(())
}

/// `backup status`.
async fn status(
    admin: &mut crate::client::AdminClient,
    args: &StatusArgs,
    json: bool,
) -> Result<()> {
    let answer = admin
        .backup_status(pb::BackupStatusRequest {
            url: args.url.clone(),
            cluster_id: args.cluster_id.clone().unwrap_or_default(),
        })
        .await
        .map_err(|s| status_error("backup status", s))?
        .into_inner();
    let rpo_us = (answer.restorable_until_us > 0)
        .then(|| answer.now_us.saturating_sub(answer.restorable_until_us));
    if json {
        return print_json(&serde_json::json!({
            "cluster_id": answer.cluster_id,
            "log_url": answer.log_url,
            "restorable_until_us": answer.restorable_until_us,
            "now_us": answer.now_us,
            "rpo_us": rpo_us,
            "groups": answer.groups.iter().map(|g| serde_json::json!({
                "group": g.group,
                "shipped": g.shipped,
                "index": g.index,
                "restorable_until_us": g.restorable_until_us,
                "shipped_at_us": g.shipped_at_us,
                "gap_at_us": (g.gap_at_us > 0).then_some(g.gap_at_us),
            })).collect::<Vec<_>>(),
        }));
    }
    let mut table = Table::new();
    table.set_header([
        "group",
        "shipped to index",
        "restorable until",
        "behind",
        "shipped at",
        "gap until",
    ]);
    for g in &answer.groups {
        let name = if g.group == 0 {
            "0 (metadata)".to_owned()
        } else {
            g.group.to_string()
        };
        if !g.shipped {
            table.add_row([
                name,
                "-".into(),
                "nothing shipped".into(),
                "-".into(),
                "-".into(),
                "-".into(),
            ]);
            continue;
        }
        table.add_row([
            name,
            g.index.to_string(),
            precise_time_text(g.restorable_until_us),
            elapsed_text(g.restorable_until_us, answer.now_us),
            time_text(g.shipped_at_us),
            if g.gap_at_us > 0 {
                precise_time_text(g.gap_at_us)
            } else {
                "-".into()
            },
        ]);
    }
    println!("{table}");
    if let Some(gap) = answer
        .groups
        .iter()
        .map(|g| g.gap_at_us)
        .max()
        .filter(|&g| g > 0)
    {
        println!(
            "the shipped log has a gap (a group's log was purged before it shipped): times \
             after {} restore only from a full backup taken after it",
            precise_time_text(gap)
        );
    }
    println!(
        "cluster {}: restorable until {}{}",
        answer.cluster_id,
        if answer.restorable_until_us > 0 {
            precise_time_text(answer.restorable_until_us)
        } else {
            "- (a group has shipped nothing)".to_owned()
        },
        rpo_us.map_or(String::new(), |rpo| format!(
            " (RPO now {})",
            elapsed_text(0, rpo)
        ))
    );
    if answer.log_url.is_empty() {
        println!("note: the node asked ships no log (backup.log_url is empty)");
    } else if answer.log_url != args.url {
        println!("note: the node asked ships its log to {}", answer.log_url);
    }
    Ok(())
}

/// Runs a `backup` command.
pub async fn run(endpoint: &str, command: &BackupCommand, json: bool) -> Result<()> {
    // A drill needs no running cluster: it starts its own.
    if let BackupCommand::Drill(args) = command {
        return crate::drill::drill(args, json).await;
    }
    let mut admin = client::connect_admin_waiting(endpoint, BACKUP_WAIT).await?;
    match command {
        BackupCommand::Create(args) => {
            let spinner = spinner(json, format!("backing up to {}", args.url));
            let answer = admin
                .create_backup(pb::CreateBackupRequest {
                    url: args.url.clone(),
                })
                .await
                .map_err(|s| status_error("backup create", s));
            spinner.finish_and_clear();
            let backup = answer?.into_inner().backup.unwrap_or_default();
            if json {
                print_json(&summary_json(&backup))?;
            } else {
                println!(
                    "backup {} complete: {} shards, {} rows, {} in {}",
                    backup.backup_id,
                    backup.shards,
                    backup.rows,
                    bytes_text(backup.bytes),
                    elapsed_text(backup.started_at_us, backup.finished_at_us)
                );
            }
        }
        BackupCommand::List(args) => {
            let backups = admin
                .list_backups(pb::ListBackupsRequest {
                    url: args.url.clone(),
                })
                .await
                .map_err(|s| status_error("backup list", s))?
                .into_inner()
                .backups;
            if json {
                let list: Vec<_> = backups.iter().map(summary_json).collect();
                print_json(&serde_json::Value::Array(list))?;
                return Ok(());
            }
            let mut table = Table::new();
            table.set_header([
                "backup",
                "started",
                "took",
                "shards",
                "rows",
                "size",
                "consistent at",
            ]);
            for b in &backups {
                table.add_row([
                    b.backup_id.clone(),
                    time_text(b.started_at_us),
                    elapsed_text(b.started_at_us, b.finished_at_us),
                    b.shards.to_string(),
                    b.rows.to_string(),
                    bytes_text(b.bytes),
                    time_text(b.consistent_at_us),
                ]);
            }
            println!("{table}");
        }
        BackupCommand::Show(args) => {
            let answer = admin
                .get_backup(pb::GetBackupRequest {
                    url: args.url.clone(),
                    backup_id: args.backup_id.clone(),
                })
                .await
                .map_err(|s| status_error("backup show", s))?
                .into_inner();
            if json {
                println!("{}", answer.manifest_json);
                return Ok(());
            }
            show(&answer)?;
        }
        BackupCommand::Status(args) => status(&mut admin, args, json).await?,
        // Run above, without the cluster.
        BackupCommand::Drill(_) => {}
        BackupCommand::Prune(args) => {
            let retention_seconds = match args.retention {
                Some(window) if window.as_secs() == 0 => bail!("--retention must be at least 1s"),
                Some(window) => window.as_secs(),
                None => 0,
            };
            let report = admin
                .prune_backups(pb::PruneBackupsRequest {
                    url: args.url.clone(),
                    retention_seconds,
                    dry_run: args.dry_run,
                })
                .await
                .map_err(|s| status_error("backup prune", s))?
                .into_inner();
            if json {
                print_json(&serde_json::json!({
                    "kept": report.kept,
                    "deleted": report.deleted,
                    "incomplete_deleted": report.incomplete_deleted,
                    "chunks_deleted": report.chunks_deleted,
                    "retired_logs_deleted": report.retired_logs_deleted,
                    "retention_seconds": report.retention_seconds,
                    "dry_run": args.dry_run,
                }))?;
            } else {
                let verb = if args.dry_run {
                    "would delete"
                } else {
                    "deleted"
                };
                for id in &report.deleted {
                    println!("{verb} backup {id}");
                }
                for id in &report.incomplete_deleted {
                    println!("{verb} incomplete backup {id}");
                }
                for id in &report.retired_logs_deleted {
                    println!("{verb} the shipped log of retired cluster {id}");
                }
                println!(
                    "{verb} {} backups, {} incomplete, {} shipped log chunks; kept {} (retention {})",
                    report.deleted.len(),
                    report.incomplete_deleted.len(),
                    report.chunks_deleted,
                    report.kept.len(),
                    humantime::format_duration(Duration::from_secs(report.retention_seconds))
                );
            }
        }
        BackupCommand::Verify(args) => {
            let spinner = spinner(json, format!("verifying {}", args.backup_id));
            let answer = admin
                .verify_backup(pb::VerifyBackupRequest {
                    url: args.url.clone(),
                    backup_id: args.backup_id.clone(),
                    data: args.data,
                })
                .await
                .map_err(|s| status_error("backup verify", s));
            spinner.finish_and_clear();
            let report = answer?.into_inner();
            if json {
                print_json(&serde_json::json!({
                    "backup_id": args.backup_id,
                    "files_checked": report.files_checked,
                    "bytes_checked": report.bytes_checked,
                    "shards_restored": report.shards_restored,
                    "log_chunks_checked": report.log_chunks_checked,
                    "log_reaches_us": report.log_reaches_us,
                    "log_gaps": report.log_gaps,
                    "problems": report.problems,
                }))?;
            } else {
                println!(
                    "{} files ({}) checked{}",
                    report.files_checked,
                    bytes_text(report.bytes_checked),
                    if args.data {
                        format!(", {} shards restored and compared", report.shards_restored)
                    } else {
                        String::new()
                    }
                );
                if report.log_chunks_checked > 0 {
                    println!(
                        "{} shipped log chunks checked{}",
                        report.log_chunks_checked,
                        if report.log_reaches_us > 0 {
                            format!(
                                ": from this backup, restorable to any time up to {}",
                                precise_time_text(report.log_reaches_us)
                            )
                        } else {
                            String::new()
                        }
                    );
                }
                for gap in &report.log_gaps {
                    println!("GAP {gap}");
                }
                for problem in &report.problems {
                    println!("PROBLEM {problem}");
                }
            }
            if !report.problems.is_empty() {
                bail!(
                    "backup {} is damaged: {} problems",
                    args.backup_id,
                    report.problems.len()
                );
            }
            if !json {
                println!("backup {} is intact", args.backup_id);
            }
        }
    }
    Ok(())
}

/// Prints a backup's shards from its manifest.
fn show(answer: &pb::GetBackupResponse) -> Result<()> {
    let manifest: serde_json::Value = serde_json::from_str(&answer.manifest_json)?;
    let backup = answer.backup.clone().unwrap_or_default();
    println!(
        "backup {}: started {}, took {}, {} shards, {} rows, {}; cluster {}, map version {}",
        backup.backup_id,
        time_text(backup.started_at_us),
        elapsed_text(backup.started_at_us, backup.finished_at_us),
        backup.shards,
        backup.rows,
        bytes_text(backup.bytes),
        manifest["cluster_id"].as_str().unwrap_or("unknown"),
        backup.map_version
    );
    let mut table = Table::new();
    table.set_header([
        "shard",
        "range",
        "rows",
        "size",
        "files",
        "applied",
        "leader time",
    ]);
    let shards = manifest["shards"].as_array().cloned().unwrap_or_default();
    let rows = shards
        .iter()
        .map(|s| (s.clone(), &s["record"]))
        .map(|(s, r)| {
            let end = s["end"]
                .as_u64()
                .map_or_else(|| "end".to_owned(), |e| format!("{e:#018x}"));
            (
                r["group"].to_string(),
                format!("{:#018x}..{end}", s["start"].as_u64().unwrap_or(0)),
                r.clone(),
            )
        })
        .chain(std::iter::once((
            "metadata".to_owned(),
            String::new(),
            manifest["metadata"].clone(),
        )));
    for (shard, range, record) in rows {
        let files = record["files"].as_array().cloned().unwrap_or_default();
        let bytes: u64 = files.iter().filter_map(|f| f["bytes"].as_u64()).sum();
        let applied = &record["applied"];
        table.add_row([
            shard,
            range,
            record["rows"].to_string(),
            bytes_text(bytes),
            files.len().to_string(),
            applied["index"]
                .as_u64()
                .map_or_else(|| "-".to_owned(), |i| i.to_string()),
            time_text(record["leader_ts_us"].as_i64().unwrap_or(0)),
        ]);
    }
    println!("{table}");
    Ok(())
}

pub(crate) fn print_json(value: &serde_json::Value) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

fn summary_json(b: &pb::BackupSummary) -> serde_json::Value {
    serde_json::json!({
        "backup_id": b.backup_id,
        "started_at_us": b.started_at_us,
        "finished_at_us": b.finished_at_us,
        "shards": b.shards,
        "rows": b.rows,
        "bytes": b.bytes,
        "map_version": b.map_version,
        "consistent_at_us": b.consistent_at_us,
    })
}

pub(crate) fn spinner(json: bool, message: String) -> ProgressBar {
    let bar = if json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new_spinner()
    };
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {msg}")
            .expect("valid progress template"),
    );
    bar.set_message(message);
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// A time (µs since the epoch) as RFC 3339 with milliseconds; "-" for
/// none.
pub(crate) fn precise_time_text(us: i64) -> String {
    match u64::try_from(us) {
        Ok(us) if us > 0 => {
            humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + Duration::from_micros(us))
                .to_string()
        }
        _ => "-".to_owned(),
    }
}

/// A time (µs since the epoch) as RFC 3339; "-" for none.
fn time_text(us: i64) -> String {
    match u64::try_from(us) {
        Ok(us) if us > 0 => {
            humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_micros(us))
                .to_string()
        }
        _ => "-".to_owned(),
    }
}

fn elapsed_text(from_us: i64, to_us: i64) -> String {
    let ms = u64::try_from(to_us.saturating_sub(from_us) / 1000).unwrap_or(0);
    humantime::format_duration(Duration::from_millis(ms)).to_string()
}

fn bytes_text(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_times_read_well() {
        assert_eq!(bytes_text(17), "17 B");
        assert_eq!(bytes_text(3 << 20), "3.0 MiB");
        assert_eq!(time_text(0), "-");
        assert_eq!(time_text(1_764_900_000_000_000), "2025-12-05T02:00:00Z");
        assert_eq!(elapsed_text(0, 1_500_000), "1s 500ms");
        assert_eq!(
            precise_time_text(1_764_900_000_250_000),
            "2025-12-05T02:00:00.250Z"
        );
    }

    #[test]
    fn restore_times_parse_or_say_why() {
        assert_eq!(parse_to_time("latest"), Ok(ToTime::Latest));
        assert_eq!(
            parse_to_time("2025-12-05T02:00:00.250Z"),
            Ok(ToTime::At(1_764_900_000_250_000))
        );
        assert!(parse_to_time("yesterday").unwrap_err().contains("RFC 3339"));
        assert!(parse_to_time("1969-01-01T00:00:00Z").is_err());
    }
}
