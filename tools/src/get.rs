//! `quiverctl get`: read features of entities, as a table, as JSON, or
//! repeatedly to measure batch latency.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use comfy_table::Table;
use hdrhistogram::Histogram;
use quiver_proto::v1::{self as pb, FeatureStatus};

use crate::client::{Client, status_error};
use crate::values;

/// Most repetitions of one batch.
const REPEAT_MAX: u64 = 1_000_000;

/// Arguments of `get`.
#[derive(Debug, clap::Args)]
pub struct GetArgs {
    /// Feature references: view:feature, view:* or view (comma-separated).
    #[arg(long, value_delimiter = ',', required = true)]
    features: Vec<String>,
    /// Entity keys.
    #[arg(required = true)]
    keys: Vec<String>,
    /// leader (default), strong or replica.
    #[arg(long, default_value = "leader", value_parser = ["leader", "strong", "replica"])]
    consistency: String,
    /// Bypass the server's hot cache.
    #[arg(long)]
    skip_cache: bool,
    /// Accept a follower's answer if it heard from its leader within this
    /// long (e.g. 30s): served even while the leader is gone.
    #[arg(long, value_parser = humantime::parse_duration)]
    max_staleness: Option<Duration>,
    /// Answer what can be read when a shard cannot be read in time: this
    /// node's replica (stale) or defaults, instead of unavailable.
    #[arg(long)]
    degraded: bool,
    /// Send the same batch this many times and print latency percentiles
    /// instead of the values.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=REPEAT_MAX))]
    repeat: Option<u64>,
}

fn status_label(status: FeatureStatus) -> &'static str {
    match status {
        FeatureStatus::Present => "",
        FeatureStatus::NullValue => "(null)",
        FeatureStatus::NotFound => "(not found)",
        FeatureStatus::OutsideMaxAge => "(expired)",
        FeatureStatus::Defaulted => " (default)",
        FeatureStatus::Stale => " (stale)",
        FeatureStatus::Unavailable => "(unavailable)",
        FeatureStatus::Invalid => "(invalid)",
    }
}

/// `get`.
pub async fn run(client: &mut Client, args: &GetArgs, json: bool) -> Result<()> {
    let consistency = match args.consistency.as_str() {
        "strong" => pb::Consistency::Strong,
        "replica" => pb::Consistency::Replica,
        _ => pb::Consistency::Leader,
    };
    let request = pb::GetRequest {
        entity_keys: args.keys.clone(),
        features: args.features.clone(),
        consistency: consistency as i32,
        skip_cache: args.skip_cache,
        max_staleness_ms: args
            .max_staleness
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        degraded: args.degraded,
    };
    if let Some(repeat) = args.repeat {
        return measure(client, request, repeat, json).await;
    }
    let response = client
        .get(request)
        .await
        .map_err(|s| status_error("get", s))?
        .into_inner();
    if json {
        print_json(&response)?;
    } else {
        print_table(&response);
    }
    Ok(())
}

fn print_json(response: &pb::GetResponse) -> Result<()> {
    let entities: Vec<_> = response
        .entities
        .iter()
        .map(|entity| {
            let features: serde_json::Map<_, _> = response
                .feature_names
                .iter()
                .zip(&entity.features)
                .map(|(name, f)| {
                    (
                        name.clone(),
                        serde_json::json!({
                            "value": f.value.as_ref().map(values::to_json),
                            "status": f.status().as_str_name(),
                            "event_ts_us": f.event_ts_us,
                        }),
                    )
                })
                .collect();
            serde_json::json!({"entity_key": entity.entity_key, "features": features})
        })
        .collect();
    // Who served each shard: scripts check where a read came from.
    let sources: Vec<_> = response
        .sources
        .iter()
        .map(|s| {
            serde_json::json!({
                "shard": s.shard,
                "node_id": s.node_id,
                "leader": s.leader,
                "applied_index": s.applied_index,
            })
        })
        .collect();
    println!(
        "{}",
        serde_json::to_string_pretty(
            &serde_json::json!({ "entities": entities, "sources": sources })
        )?
    );
    Ok(())
}

fn print_table(response: &pb::GetResponse) {
    let now_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX));
    let mut table = Table::new();
    let mut header = vec!["entity".to_owned()];
    header.extend(response.feature_names.iter().cloned());
    header.push("age".to_owned());
    table.set_header(header);
    for entity in &response.entities {
        let mut row = vec![entity.entity_key.clone()];
        for feature in &entity.features {
            let value = feature
                .value
                .as_ref()
                .map(values::to_text)
                .unwrap_or_default();
            row.push(format!("{value}{}", status_label(feature.status())));
        }
        let newest = entity
            .features
            .iter()
            .map(|f| f.event_ts_us)
            .max()
            .unwrap_or(0);
        row.push(if newest > 0 {
            let age = Duration::from_secs(
                u64::try_from((now_us - newest).max(0) / 1_000_000).unwrap_or(0),
            );
            humantime::format_duration(age).to_string()
        } else {
            "-".to_owned()
        });
        table.add_row(row);
    }
    println!("{table}");
}

async fn measure(
    client: &mut Client,
    request: pb::GetRequest,
    repeat: u64,
    json: bool,
) -> Result<()> {
    let mut histogram =
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).context("histogram bounds")?;
    let started = Instant::now();
    let mut values = 0usize;
    for _ in 0..repeat {
        let sent = Instant::now();
        let response = client
            .get(request.clone())
            .await
            .map_err(|s| status_error("get", s))?
            .into_inner();
        let micros = u64::try_from(sent.elapsed().as_micros())
            .unwrap_or(u64::MAX)
            .max(1);
        histogram.saturating_record(micros);
        values = response.entities.iter().map(|e| e.features.len()).sum();
    }
    if values == 0 {
        bail!("the server returned no values");
    }
    let seconds = started.elapsed().as_secs_f64();
    let ms = |q: f64| histogram.value_at_quantile(q) as f64 / 1000.0;
    if json {
        println!(
            "{}",
            serde_json::json!({
                "requests": repeat, "entities_per_request": request.entity_keys.len(), "values_per_request": values,
                "requests_per_second": repeat as f64 / seconds,
                "p50_ms": ms(0.5), "p99_ms": ms(0.99), "max_ms": histogram.max() as f64 / 1000.0,
            })
        );
    } else {
        println!(
            "{repeat} requests of {} entities ({values} values) one at a time: {:.0} req/s, p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            request.entity_keys.len(),
            repeat as f64 / seconds,
            ms(0.5),
            ms(0.9),
            ms(0.99),
            histogram.max() as f64 / 1000.0
        );
    }
    Ok(())
}
