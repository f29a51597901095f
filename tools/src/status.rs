//! `quiverctl status`.

use anyhow::Result;
use comfy_table::Table;
use quiver_proto::v1 as pb;

use crate::client::{Client, status_error};

/// `status`.
pub async fn run(client: &mut Client, json: bool) -> Result<()> {
    let s = client
        .status(pb::StatusRequest {})
        .await
        .map_err(|s| status_error("status", s))?
        .into_inner();
    let cache = s.cache.unwrap_or_default();
    let hit_rate = if cache.hits + cache.misses > 0 {
        format!(
            "{:.1}%",
            100.0 * cache.hits as f64 / (cache.hits + cache.misses) as f64
        )
    } else {
        "-".to_owned()
    };
    let fields: Vec<(&str, serde_json::Value)> = vec![
        ("node_version", s.node_version.clone().into()),
        ("listen_addr", s.listen_addr.clone().into()),
        ("data_dir", s.data_dir.clone().into()),
        ("uptime_seconds", s.uptime_seconds.into()),
        ("feature_views", s.feature_views.into()),
        ("rows_estimate", s.rows_estimate.into()),
        ("rows_written", s.rows_written.into()),
        ("rows_stale", s.rows_stale.into()),
        ("cache_entries", cache.entries.into()),
        ("cache_bytes_used", cache.bytes_used.into()),
        ("cache_bytes_max", cache.bytes_max.into()),
        ("cache_hits", cache.hits.into()),
        ("cache_misses", cache.misses.into()),
        ("cache_hit_rate", hit_rate.into()),
    ];
    if json {
        let object: serde_json::Map<String, serde_json::Value> =
            fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
        println!("{}", serde_json::to_string_pretty(&object)?);
    } else {
        let mut table = Table::new();
        table.set_header(["", "value"]);
        for (key, value) in fields {
            let text = match value {
                serde_json::Value::String(s) => s,
                other => other.to_string(),
            };
            table.add_row([key.to_owned(), text]);
        }
        println!("{table}");
    }
    Ok(())
}
