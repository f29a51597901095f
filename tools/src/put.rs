//! `quiverctl put`: bulk-load rows from a CSV or JSON-lines file through the
//! client-streaming `WriteStream` call, with a progress bar.
//!
//! Both formats are flat: an `entity_key` column, an `event_ts` column (µs
//! since epoch or RFC 3339), and one column per feature. CSV cells are parsed
//! by the feature's type (lists as JSON arrays, empty = null).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read as _};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use indicatif::{ProgressBar, ProgressStyle};
use quiver_proto::v1::{self as pb, ValueType};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::client::{Client, status_error};
use crate::{values, views};

/// Longest line of a JSON-lines file.
const LINE_BYTES_MAX: usize = 16 << 20;
/// Batches read ahead of the network.
const BATCHES_IN_FLIGHT_MAX: usize = 8;

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

/// Reads the file and sends batches; returns rows read. Runs on a blocking
/// thread.
fn read_batches(
    parser: RowParser<'_>,
    format: Format,
    tx: mpsc::Sender<pb::WriteRequest>,
    progress: &ProgressBar,
) -> Result<u64> {
    let args = parser.args;
    let file =
        std::fs::File::open(&args.file).with_context(|| format!("open {}", args.file.display()))?;
    let batch_rows = usize::try_from(args.batch_rows).unwrap_or(usize::MAX);
    let mut batch = Vec::with_capacity(batch_rows);
    let mut rows = 0u64;
    let send = |batch: &mut Vec<pb::WriteRow>| -> Result<()> {
        let request = pb::WriteRequest {
            view: args.view.clone(),
            rows: std::mem::take(batch),
        };
        tx.blocking_send(request)
            .map_err(|_| anyhow!("the write stream closed early"))
    };
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
                batch.push(
                    parser
                        .csv_row(&header, &record)
                        .with_context(|| format!("{} line {line}", args.file.display()))?,
                );
                rows += 1;
                if batch.len() == batch_rows {
                    send(&mut batch)?;
                    progress.set_position(reader.position().byte());
                }
            }
        }
        Format::JsonLines => {
            let mut reader = BufReader::new(file);
            let mut line = String::new();
            let mut line_number = 0u64;
            let mut bytes = 0u64;
            loop {
                line.clear();
                let read = (&mut reader)
                    .take(LINE_BYTES_MAX as u64 + 1)
                    .read_line(&mut line)?;
                if read == 0 {
                    break;
                }
                line_number += 1;
                bytes += read as u64;
                if read > LINE_BYTES_MAX {
                    bail!(
                        "{} line {line_number} is longer than {LINE_BYTES_MAX} bytes",
                        args.file.display()
                    );
                }
                if line.trim().is_empty() {
                    continue;
                }
                batch.push(
                    parser
                        .json_row(&line)
                        .with_context(|| format!("{} line {line_number}", args.file.display()))?,
                );
                rows += 1;
                if batch.len() == batch_rows {
                    send(&mut batch)?;
                    progress.set_position(bytes);
                }
            }
        }
    }
    if !batch.is_empty() {
        send(&mut batch)?;
    }
    Ok(rows)
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
            "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} ({eta})",
        )
        .expect("valid progress template"),
    );

    let (tx, rx) = mpsc::channel(BATCHES_IN_FLIGHT_MAX);
    let started = Instant::now();
    let reader = {
        let progress = progress.clone();
        let args = args.clone();
        tokio::task::spawn_blocking(move || {
            read_batches(
                RowParser {
                    args: &args,
                    schema,
                },
                format,
                tx,
                &progress,
            )
        })
    };
    let written = client.write_stream(ReceiverStream::new(rx)).await;
    let read = reader.await.context("reader thread")?;
    progress.finish_and_clear();
    // A read error explains a short stream better than the server's reply.
    let rows_read = read?;
    let response = written.map_err(|s| status_error("write", s))?.into_inner();
    let seconds = started.elapsed().as_secs_f64();
    if json {
        println!(
            "{}",
            serde_json::json!({"rows_read": rows_read, "rows_applied": response.rows_applied, "rows_stale": response.rows_stale, "seconds": seconds})
        );
    } else {
        println!(
            "wrote {} rows to {} in {:.2}s ({:.0} rows/s): {} applied, {} stale (older than stored)",
            rows_read,
            args.view,
            seconds,
            rows_read as f64 / seconds.max(1e-9),
            response.rows_applied,
            response.rows_stale
        );
    }
    Ok(())
}
