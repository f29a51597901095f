//! `quiverctl put`: bulk-load rows from a CSV or JSON-lines file, with a
//! progress bar.
//!
//! Both formats are flat: an `entity_key` column, an `event_ts` column (µs
//! since epoch or RFC 3339), and one column per feature. CSV cells are parsed
//! by the feature's type (lists as JSON arrays, empty = null).
//!
//! Rows go as unary `Write` batches, a few in flight, each with its own
//! idempotency key (`request_id`). A batch that fails in a way worth retrying
//! (the cluster electing a leader, a node overloaded and saying when to come
//! back, a connection reset) is retried with the same key, with exponential
//! backoff and jitter, at least as long as the server's hint, until it has
//! been failing for `--retry-for`: the load slows down instead of aborting,
//! and a retry never applies a batch twice. When it does give up, it prints
//! the server's status and the line to resume from (`--skip-rows`).

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Read as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use backon::{ExponentialBuilder, Retryable};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use indicatif::{ProgressBar, ProgressStyle};
use quiver_proto::v1::{self as pb, ValueType};
use tokio::sync::mpsc;

use crate::client::Client;
use crate::{values, views};

/// Longest line of a JSON-lines file.
const LINE_BYTES_MAX: usize = 16 << 20;
/// Deadline of one attempt of one batch.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(30);
/// First and longest pause between attempts of a batch.
const RETRY_DELAY_MIN: Duration = Duration::from_millis(100);
const RETRY_DELAY_MAX: Duration = Duration::from_secs(5);
/// The server's retry hint (gRPC server pushback), in milliseconds.
const RETRY_PUSHBACK_KEY: &str = "grpc-retry-pushback-ms";

/// Arguments of `put`.
#[derive(Debug, Clone, clap::Args)]
pub struct PutArgs {
    /// The feature view to write.
    #[arg(long)]
    view: String,
    /// The input file (.csv, or .jsonl / .ndjson).
    #[arg(short = 'f', long = "file")]
    file: PathBuf,
    /// Rows per write batch.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    batch_rows: u64,
    /// Column holding the entity key.
    #[arg(long, default_value = "entity_key")]
    key_column: String,
    /// Column holding the event time.
    #[arg(long, default_value = "event_ts")]
    ts_column: String,
    /// Batches in flight at once. Rows of one entity with equal event times
    /// keep file order only with 1 (the later write wins).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=64))]
    parallel: u64,
    /// Keep retrying a failing batch for this long before giving up.
    #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
    retry_for: Duration,
    /// Skip this many data rows first (to resume a load that gave up).
    #[arg(long, default_value_t = 0)]
    skip_rows: u64,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Format {
    Csv,
    JsonLines,
}

fn format_of(path: &Path) -> Result<Format> {
    match path.extension().and_then(|e| e.to_str()) {
        Some("csv") => Ok(Format::Csv),
        Some("jsonl" | "ndjson") => Ok(Format::JsonLines),
        _ => bail!("{}: use a .csv, .jsonl or .ndjson file", path.display()),
    }
}

/// Feature types of a view, by name.
type Schema = HashMap<String, ValueType>;

struct RowParser<'a> {
    args: &'a PutArgs,
    schema: Schema,
}

impl RowParser<'_> {
    fn csv_row(
        &self,
        header: &csv::StringRecord,
        record: &csv::StringRecord,
    ) -> Result<pb::WriteRow> {
        let mut row = pb::WriteRow::default();
        let mut has_ts = false;
        for (column, cell) in header.iter().zip(record.iter()) {
            if column == self.args.key_column {
                row.entity_key = cell.to_owned();
            } else if column == self.args.ts_column {
                row.event_ts_us = values::parse_timestamp_us(cell)?;
                has_ts = true;
            } else {
                let value_type = self.feature(column)?;
                row.values.insert(
                    column.to_owned(),
                    values::from_text(value_type, cell)
                        .with_context(|| format!("column {column}"))?,
                );
            }
        }
        if !has_ts {
            bail!("no {:?} column", self.args.ts_column);
        }
        Ok(row)
    }

    fn json_row(&self, line: &str) -> Result<pb::WriteRow> {
        let object: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(line).context("not a JSON object")?;
        let mut row = pb::WriteRow::default();
        let mut has_ts = false;
        for (field, json) in object {
            if field == self.args.key_column {
                row.entity_key = match json {
                    serde_json::Value::String(s) => s,
                    serde_json::Value::Number(n) => n.to_string(),
                    other => bail!("entity key {other} is not a string or number"),
                };
            } else if field == self.args.ts_column {
                row.event_ts_us = match &json {
                    serde_json::Value::Number(n) => n
                        .as_i64()
                        .ok_or_else(|| anyhow!("event time {n} is not an integer"))?,
                    serde_json::Value::String(s) => values::parse_timestamp_us(s)?,
                    other => bail!("event time {other} is not a number or string"),
                };
                has_ts = true;
            } else {
                let value_type = self.feature(&field)?;
                let value = values::from_json(value_type, &json)
                    .with_context(|| format!("field {field}"))?;
                row.values.insert(field, value);
            }
        }
        if !has_ts {
            bail!("no {:?} field", self.args.ts_column);
        }
        Ok(row)
    }

    fn feature(&self, name: &str) -> Result<ValueType> {
        self.schema.get(name).copied().ok_or_else(|| {
            let mut known: Vec<_> = self.schema.keys().cloned().collect();
            known.sort();
            anyhow!(
                "view {} has no feature {name:?} (it has: {})",
                self.args.view,
                known.join(", ")
            )
        })
    }
}

/// Rows of the file, in order, ready to send.
struct Batch {
    rows: Vec<pb::WriteRow>,
    /// Number of its first row among the file's data rows (0-based).
    first_row: u64,
    /// Line of the file its first row is on (1-based).
    first_line: u64,
    /// File offset after its last row (for the progress bar).
    end_byte: u64,
}

/// Collects rows into batches and hands them to the sender.
struct Batcher<'a> {
    tx: mpsc::Sender<Batch>,
    batch_rows: usize,
    skip_rows: u64,
    rows: Vec<pb::WriteRow>,
    first_row: u64,
    first_line: u64,
    /// Data rows seen, skipped ones included.
    seen: u64,
    file: &'a Path,
}

impl Batcher<'_> {
    /// Takes row number `seen` (on `line`); parses it unless skipped.
    fn row(
        &mut self,
        line: u64,
        end_byte: u64,
        parse: impl FnOnce() -> Result<pb::WriteRow>,
    ) -> Result<()> {
        let number = self.seen;
        self.seen += 1;
        if number < self.skip_rows {
            return Ok(());
        }
        let row = parse().with_context(|| format!("{} line {line}", self.file.display()))?;
        if self.rows.is_empty() {
            self.first_row = number;
            self.first_line = line;
        }
        self.rows.push(row);
        if self.rows.len() == self.batch_rows {
            self.send(end_byte)?;
        }
        Ok(())
    }

    fn send(&mut self, end_byte: u64) -> Result<()> {
        if self.rows.is_empty() {
            return Ok(());
        }
        let batch = Batch {
            rows: std::mem::take(&mut self.rows),
            first_row: self.first_row,
            first_line: self.first_line,
            end_byte,
        };
        // Closed: the sender gave up on a batch and says why.
        self.tx
            .blocking_send(batch)
            .map_err(|_| anyhow!("stopped reading: a batch failed"))
    }
}

/// Reads the file and sends batches; returns the data rows it holds
/// (skipped ones included). Runs on a blocking thread.
fn read_batches(parser: RowParser<'_>, format: Format, tx: mpsc::Sender<Batch>) -> Result<u64> {
    let args = parser.args;
    let file =
        std::fs::File::open(&args.file).with_context(|| format!("open {}", args.file.display()))?;
    let mut batcher = Batcher {
        tx,
        batch_rows: usize::try_from(args.batch_rows).unwrap_or(usize::MAX),
        skip_rows: args.skip_rows,
        rows: Vec::new(),
        first_row: 0,
        first_line: 0,
        seen: 0,
        file: &args.file,
    };
    let mut end_byte = 0;
    match format {
        Format::Csv => {
            let mut reader = csv::Reader::from_reader(file);
            let header = reader.headers().context("read the CSV header")?.clone();
            if !header.iter().any(|c| c == args.key_column) {
                bail!("the CSV header has no {:?} column", args.key_column);
            }
            let mut record = csv::StringRecord::new();
            while reader.read_record(&mut record).context("read CSV")? {
                let line = record.position().map_or(0, |p| p.line());
                end_byte = reader.position().byte();
                batcher.row(line, end_byte, || parser.csv_row(&header, &record))?;
            }
        }
        Format::JsonLines => {
            let mut reader = BufReader::new(file);
            let mut line = String::new();
            let mut line_number = 0u64;
            loop {
                line.clear();
                let read = (&mut reader)
                    .take(LINE_BYTES_MAX as u64 + 1)
                    .read_line(&mut line)?;
                if read == 0 {
                    break;
                }
                line_number += 1;
                end_byte += read as u64;
                if read > LINE_BYTES_MAX {
                    bail!(
                        "{} line {line_number} is longer than {LINE_BYTES_MAX} bytes",
                        args.file.display()
                    );
                }
                if line.trim().is_empty() {
                    continue;
                }
                batcher.row(line_number, end_byte, || parser.json_row(&line))?;
            }
        }
    }
    batcher.send(end_byte)?;
    Ok(batcher.seen)
}

/// Whether a failed attempt is worth repeating: the cluster is electing,
/// a node is overloaded (and said when to come back), a connection broke.
/// Anything the request itself caused is not.
fn retryable(status: &tonic::Status) -> bool {
    use tonic::Code;
    match status.code() {
        Code::Unavailable | Code::DeadlineExceeded | Code::Aborted | Code::Cancelled => true,
        // Transport failures (a reset stream) surface as UNKNOWN.
        Code::Unknown => true,
        // Overload carries a hint; a full registry or a hard limit does not.
        Code::ResourceExhausted => pushback(status).is_some(),
        _ => false,
    }
}

/// The server's retry hint, if it gave one.
fn pushback(status: &tonic::Status) -> Option<Duration> {
    let ms: u64 = status
        .metadata()
        .get(RETRY_PUSHBACK_KEY)?
        .to_str()
        .ok()?
        .parse()
        .ok()?;
    Some(Duration::from_millis(ms).min(RETRY_DELAY_MAX))
}

/// A batch that could not be written.
struct GaveUp {
    status: tonic::Status,
    attempts: u64,
    failing_for: Duration,
}

/// Writes one batch, retrying as [`retryable`] says for up to `retry_for`.
async fn write_batch(
    client: Client,
    view: String,
    rows: Vec<pb::WriteRow>,
    retry_for: Duration,
    retries: Arc<AtomicU64>,
) -> Result<pb::WriteResponse, GaveUp> {
    // Random, and the same for every attempt: the cluster applies it once.
    let request_id = (rand::random::<u128>() | 1).to_be_bytes().to_vec();
    let request = pb::WriteRequest {
        view,
        rows,
        request_id,
    };
    let attempts = AtomicU64::new(0);
    let started = Instant::now();
    let attempt = || {
        let mut client = client.clone();
        let mut request = tonic::Request::new(request.clone());
        request.set_timeout(ATTEMPT_TIMEOUT);
        attempts.fetch_add(1, Ordering::Relaxed);
        async move { client.write(request).await.map(tonic::Response::into_inner) }
    };
    let backoff = ExponentialBuilder::default()
        .with_min_delay(RETRY_DELAY_MIN)
        .with_max_delay(RETRY_DELAY_MAX)
        .with_jitter()
        .without_max_times()
        .with_total_delay(Some(retry_for));
    attempt
        .retry(backoff)
        .when(retryable)
        .adjust(|status, delay| {
            delay.map(|delay| pushback(status).map_or(delay, |hint| delay.max(hint)))
        })
        .notify(|_, _| {
            retries.fetch_add(1, Ordering::Relaxed);
        })
        .await
        .map_err(|status| GaveUp {
            status,
            attempts: attempts.load(Ordering::Relaxed),
            failing_for: started.elapsed(),
        })
}

/// `put --view V -f FILE`.
pub async fn run(client: &mut Client, args: &PutArgs, json: bool) -> Result<()> {
    let format = format_of(&args.file)?;
    let views = views::fetch_all(client).await?;
    let view = views
        .into_iter()
        .find(|v| v.name == args.view)
        .ok_or_else(|| {
            anyhow!(
                "feature view {:?} does not exist (apply it first)",
                args.view
            )
        })?;
    let schema: Schema = view
        .features
        .iter()
        .map(|f| (f.name.clone(), f.r#type()))
        .collect();
    let size = std::fs::metadata(&args.file)
        .with_context(|| format!("open {}", args.file.display()))?
        .len();
    let progress = if json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(size)
    };
    progress.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} ({eta}) {msg}",
        )
        .expect("valid progress template"),
    );

    let parallel = usize::try_from(args.parallel).unwrap_or(1);
    let (tx, mut rx) = mpsc::channel(parallel);
    let started = Instant::now();
    let reader = {
        let args = args.clone();
        tokio::task::spawn_blocking(move || {
            read_batches(
                RowParser {
                    args: &args,
                    schema,
                },
                format,
                tx,
            )
        })
    };
    let retries = Arc::new(AtomicU64::new(0));
    let mut in_flight = FuturesUnordered::new();
    // Batches sent and not yet acknowledged: (first row, first line) by
    // sequence number, to say where to resume.
    let mut unacknowledged: BTreeMap<u64, (u64, u64)> = BTreeMap::new();
    let mut sequence = 0u64;
    let mut reading = true;
    let mut total = pb::WriteResponse::default();
    let mut rows_written = 0u64;
    let mut failure = None;
    loop {
        // Reading the next batch and finishing sent ones run side by side:
        // a slow reader must not stall the writes in flight.
        tokio::select! {
            batch = rx.recv(), if reading && in_flight.len() < parallel => {
                let Some(batch) = batch else {
                    reading = false;
                    continue;
                };
                unacknowledged.insert(sequence, (batch.first_row, batch.first_line));
                let rows = batch.rows.len() as u64;
                let send = write_batch(
                    client.clone(),
                    args.view.clone(),
                    batch.rows,
                    args.retry_for,
                    retries.clone(),
                );
                let (this, end_byte) = (sequence, batch.end_byte);
                in_flight.push(async move { (this, rows, end_byte, send.await) });
                sequence += 1;
            }
            Some((this, rows, end_byte, outcome)) = in_flight.next(), if !in_flight.is_empty() => {
                match outcome {
                    Ok(response) => {
                        total.rows_applied += response.rows_applied;
                        total.rows_stale += response.rows_stale;
                        rows_written += rows;
                        unacknowledged.remove(&this);
                        progress.set_position(progress.position().max(end_byte));
                        let retried = retries.load(Ordering::Relaxed);
                        if retried > 0 {
                            progress.set_message(format!("{retried} retries"));
                        }
                    }
                    Err(gave_up) => {
                        failure = Some(gave_up);
                        break;
                    }
                }
            }
            else => break,
        }
    }
    // Stop the reader (if a batch failed) and collect its outcome.
    drop(rx);
    let read = reader.await.context("reader thread")?;
    progress.finish_and_clear();
    let resume = unacknowledged.values().next().copied();
    if let Some(gave_up) = failure {
        let (row, line) = resume.unwrap_or((0, 0));
        bail!(
            "writing the batch from line {line} of {} failed {} times over {:.1}s; the server said: {} ({:?}). \
             {rows_written} rows were written; to resume, run again with --skip-rows {row}",
            args.file.display(),
            gave_up.attempts,
            gave_up.failing_for.as_secs_f64(),
            gave_up.status.message(),
            gave_up.status.code(),
        );
    }
    // A bad row stops the load where it is: report it with what got in.
    let rows_in_file = read.with_context(|| {
        format!(
            "{rows_written} rows were written before this; rows after them were not sent{}",
            resume.map_or(String::new(), |(row, _)| format!(
                " (resume with --skip-rows {row})"
            ))
        )
    })?;
    let seconds = started.elapsed().as_secs_f64();
    let retried = retries.load(Ordering::Relaxed);
    if json {
        println!(
            "{}",
            serde_json::json!({
                "rows_read": rows_in_file.saturating_sub(args.skip_rows),
                "rows_written": rows_written,
                "rows_applied": total.rows_applied,
                "rows_stale": total.rows_stale,
                "retries": retried,
                "seconds": seconds,
            })
        );
    } else {
        println!(
            "wrote {} rows to {} in {:.2}s ({:.0} rows/s): {} applied, {} stale (older than stored){}",
            rows_written,
            args.view,
            seconds,
            rows_written as f64 / seconds.max(1e-9),
            total.rows_applied,
            total.rows_stale,
            if retried > 0 {
                format!("; {retried} retried attempts")
            } else {
                String::new()
            }
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_know_their_rows_and_lines_and_skipped_rows_are_not_parsed() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("rows.csv");
        // Row 0 would not parse: skipping it must not parse it.
        std::fs::write(
            &file,
            "entity_key,event_ts,x\n0,10,oops\n1,10,1\n2,10,2\n3,10,3\n4,10,4\n",
        )
        .unwrap();
        let args = PutArgs {
            view: "v".into(),
            file,
            batch_rows: 2,
            key_column: "entity_key".into(),
            ts_column: "event_ts".into(),
            parallel: 1,
            retry_for: Duration::from_secs(1),
            skip_rows: 1,
        };
        let schema = HashMap::from([("x".to_owned(), ValueType::Int64)]);
        let (tx, mut rx) = mpsc::channel(16);
        let rows = read_batches(
            RowParser {
                args: &args,
                schema: schema.clone(),
            },
            Format::Csv,
            tx,
        )
        .unwrap();
        assert_eq!(rows, 5, "every data row counted, skipped ones too");
        let batches: Vec<(u64, u64, usize)> = std::iter::from_fn(|| rx.try_recv().ok())
            .map(|b| (b.first_row, b.first_line, b.rows.len()))
            .collect();
        assert_eq!(batches, vec![(1, 3, 2), (3, 5, 2)]);

        // Without the skip, the bad row is an error that names its line.
        let args = PutArgs {
            skip_rows: 0,
            ..args
        };
        let (tx, _rx) = mpsc::channel(16);
        let error = read_batches(
            RowParser {
                args: &args,
                schema,
            },
            Format::Csv,
            tx,
        )
        .unwrap_err();
        assert!(format!("{error:#}").contains("line 2"), "{error:#}");
    }

    #[test]
    fn overload_with_a_hint_is_retried_hard_limits_are_not() {
        let mut overloaded = tonic::Status::resource_exhausted("too many rows in flight");
        overloaded
            .metadata_mut()
            .insert(RETRY_PUSHBACK_KEY, "250".parse().unwrap());
        assert!(retryable(&overloaded));
        assert_eq!(pushback(&overloaded), Some(Duration::from_millis(250)));
        assert!(!retryable(&tonic::Status::resource_exhausted(
            "registry full"
        )));
        assert!(retryable(&tonic::Status::unavailable("electing")));
        assert!(!retryable(&tonic::Status::invalid_argument("bad row")));
        assert!(!retryable(&tonic::Status::not_found("no view")));
        let mut absurd = tonic::Status::unavailable("x");
        absurd
            .metadata_mut()
            .insert(RETRY_PUSHBACK_KEY, "99999999".parse().unwrap());
        assert_eq!(pushback(&absurd), Some(RETRY_DELAY_MAX), "a hint is capped");
    }
}
