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
    let groups: Vec<serde_json::Value> = s
        .groups
        .iter()
        .map(|g| {
            serde_json::json!({
                "group": g.group,
                "role": g.role,
                "asleep": g.asleep,
                "leader_id": g.leader_id,
                "term": g.term,
                "applied_index": g.applied_index,
                "last_log_index": g.last_log_index,
                "voters": g.voters,
                "learners": g.learners,
                "lag": g.lag.iter().map(|l| serde_json::json!({"node_id": l.node_id, "entries_behind": l.entries_behind})).collect::<Vec<_>>(),
                "log_bytes": g.log_bytes,
                "rows_estimate": g.rows_estimate,
                "log_holds": g.log_holds,
            })
        })
        .collect();
    let nodes: Vec<serde_json::Value> = s
        .nodes
        .iter()
        .map(|n| serde_json::json!({"node_id": n.node_id, "addr": n.addr}))
        .collect();
    let fields: Vec<(&str, serde_json::Value)> = vec![
        ("node_id", s.node_id.into()),
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
        ("shard_count", s.shard_count.into()),
        ("replication_factor", s.replication_factor.into()),
    ];
    if json {
        let mut object: serde_json::Map<String, serde_json::Value> =
            fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
        object.insert("nodes".into(), nodes.into());
        object.insert("groups".into(), groups.into());
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
        let mut node_table = Table::new();
        node_table.set_header(["node", "address"]);
        for n in &s.nodes {
            let me = if n.node_id == s.node_id {
                " (this node)"
            } else {
                ""
            };
            node_table.add_row([format!("{}{me}", n.node_id), n.addr.clone()]);
        }
        println!("{node_table}");
        let mut group_table = Table::new();
        group_table.set_header([
            "group",
            "role",
            "leader",
            "term",
            "applied",
            "last log",
            "voters",
            "learners",
            "lag (entries)",
            "rows",
            "log holds",
        ]);
        for g in &s.groups {
            let ids = |ids: &[u64]| ids.iter().map(u64::to_string).collect::<Vec<_>>().join(",");
            let lag = g
                .lag
                .iter()
                .map(|l| format!("{}:{}", l.node_id, l.entries_behind))
                .collect::<Vec<_>>()
                .join(" ");
            let name = if g.group == 0 {
                "0 (meta)".to_owned()
            } else {
                g.group.to_string()
            };
            group_table.add_row([
                name,
                if g.asleep {
                    format!("{} (asleep)", g.role)
                } else {
                    g.role.clone()
                },
                if g.leader_id == 0 {
                    "-".into()
                } else {
                    g.leader_id.to_string()
                },
                g.term.to_string(),
                g.applied_index.to_string(),
                g.last_log_index.to_string(),
                ids(&g.voters),
                ids(&g.learners),
                if lag.is_empty() { "-".into() } else { lag },
                g.rows_estimate.to_string(),
                if g.log_holds.is_empty() {
                    "-".into()
                } else {
                    let mut holds: Vec<_> = g.log_holds.iter().collect();
                    holds.sort();
                    holds
                        .iter()
                        .map(|(consumer, index)| format!("{consumer}@{index}"))
                        .collect::<Vec<_>>()
                        .join(" ")
                },
            ]);
        }
        println!("{group_table}");
    }
    Ok(())
}
