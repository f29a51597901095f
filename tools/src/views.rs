//! `quiverctl views`: feature views from YAML.
//!
//! ```yaml
//! views:
//!   - name: driver_hourly_stats
//!     entities: [driver_id]
//!     ttl: 1day            # humantime; "0s" or absent = never expires
//!     description: Hourly driver statistics
//!     features:
//!       - { name: conv_rate, type: double }
//!       - { name: avg_daily_trips, type: int64, default: 0 }
//! ```

use std::path::Path;

use anyhow::{Context, Result, anyhow};
use comfy_table::Table;
use quiver_proto::v1::{self as pb, ValueType};
use serde::Deserialize;

use crate::client::{Client, status_error};
use crate::values;

/// Largest views file read.
const VIEWS_FILE_BYTES_MAX: u64 = 16 << 20;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ViewsFile {
    views: Vec<ViewYaml>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ViewYaml {
    name: String,
    #[serde(default)]
    entities: Vec<String>,
    #[serde(default)]
    ttl: Option<String>,
    #[serde(default)]
    description: String,
    features: Vec<FeatureYaml>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FeatureYaml {
    name: String,
    #[serde(rename = "type")]
    value_type: String,
    #[serde(default)]
    default: Option<serde_json::Value>,
}

/// A wire value type from its YAML name (`int64`, `string_list`, ...).
pub fn parse_type(name: &str) -> Result<ValueType> {
    ValueType::from_str_name(&name.to_ascii_uppercase())
        .filter(|t| *t != ValueType::Unspecified)
        .ok_or_else(|| anyhow!("unknown feature type {name:?}"))
}

fn to_pb(view: ViewYaml) -> Result<pb::FeatureView> {
    let ttl_seconds = match view.ttl.as_deref() {
        None | Some("0") => 0,
        Some(text) => humantime::parse_duration(text)
            .with_context(|| {
                format!(
                    "view {}: ttl {text:?} is not a duration like 1day or 90m",
                    view.name
                )
            })?
            .as_secs(),
    };
    let features = view
        .features
        .into_iter()
        .map(|f| {
            let value_type = parse_type(&f.value_type)
                .with_context(|| format!("feature {}:{}", view.name, f.name))?;
            let default_value = f
                .default
                .map(|json| values::from_json(value_type, &json))
                .transpose()
                .with_context(|| format!("default of feature {}:{}", view.name, f.name))?;
            Ok(pb::FeatureSpec {
                name: f.name,
                r#type: value_type as i32,
                default_value,
            })
        })
        .collect::<Result<_>>()?;
    Ok(pb::FeatureView {
        name: view.name,
        entities: view.entities,
        features,
        ttl_seconds,
        description: view.description,
        version: 0,
    })
}

/// Reads and parses a views file.
fn read_views(path: &Path) -> Result<Vec<pb::FeatureView>> {
    let text = crate::files::read_text_bounded(path, VIEWS_FILE_BYTES_MAX)
        .context("a views file is UTF-8 YAML of bounded size")?;
    let file: ViewsFile =
        serde_yaml::from_str(&text).with_context(|| format!("parse {}", path.display()))?;
    file.views.into_iter().map(to_pb).collect()
}

/// `views apply -f FILE`.
pub async fn apply(client: &mut Client, path: &Path, json: bool) -> Result<()> {
    let views = read_views(path)?;
    let mut rows = Vec::new();
    for view in views {
        let name = view.name.clone();
        let response = client
            .apply_feature_view(pb::ApplyFeatureViewRequest { view: Some(view) })
            .await
            .map_err(|s| status_error(&format!("apply view {name}"), s))?
            .into_inner();
        let version = response.view.map_or(0, |v| v.version);
        rows.push((name, version, response.changed));
    }
    if json {
        let out: Vec<_> = rows
            .iter()
            .map(|(name, version, changed)| serde_json::json!({"name": name, "version": version, "changed": changed}))
            .collect();
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        let mut table = Table::new();
        table.set_header(["view", "version", "result"]);
        for (name, version, changed) in rows {
            table.add_row([
                name,
                version.to_string(),
                if changed { "applied" } else { "unchanged" }.to_owned(),
            ]);
        }
        println!("{table}");
    }
    Ok(())
}

/// Every view the node knows.
pub async fn fetch_all(client: &mut Client) -> Result<Vec<pb::FeatureView>> {
    Ok(client
        .list_feature_views(pb::ListFeatureViewsRequest {})
        .await
        .map_err(|s| status_error("list views", s))?
        .into_inner()
        .views)
}

/// `views list`.
pub async fn list(client: &mut Client, json: bool) -> Result<()> {
    let views = fetch_all(client).await?;
    if json {
        let out: Vec<_> = views
            .iter()
            .map(|v| {
                serde_json::json!({
                    "name": v.name, "version": v.version, "entities": v.entities, "ttl_seconds": v.ttl_seconds,
                    "description": v.description,
                    "features": v.features.iter().map(|f| serde_json::json!({
                        "name": f.name,
                        "type": f.r#type().as_str_name().to_lowercase(),
                        "default": f.default_value.as_ref().map(values::to_json),
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    let mut table = Table::new();
    table.set_header(["view", "version", "entities", "ttl", "features"]);
    for v in views {
        let ttl = if v.ttl_seconds == 0 {
            "never".to_owned()
        } else {
            humantime::format_duration(std::time::Duration::from_secs(v.ttl_seconds)).to_string()
        };
        let features: Vec<String> = v
            .features
            .iter()
            .map(|f| format!("{} ({})", f.name, f.r#type().as_str_name().to_lowercase()))
            .collect();
        table.add_row([
            v.name,
            v.version.to_string(),
            v.entities.join(", "),
            ttl,
            features.join("\n"),
        ]);
    }
    println!("{table}");
    Ok(())
}

/// `views delete NAME`.
pub async fn delete(client: &mut Client, name: &str) -> Result<()> {
    client
        .delete_feature_view(pb::DeleteFeatureViewRequest {
            name: name.to_owned(),
        })
        .await
        .map_err(|s| status_error(&format!("delete view {name}"), s))?;
    println!("deleted feature view {name}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_views_file_parses() {
        // The crate directory cargo runs the test in, not the one it was
        // compiled in: a shared target directory may hold a binary built
        // from another checkout of the same sources.
        let crate_dir = std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(
            || env!("CARGO_MANIFEST_DIR").into(),
            std::path::PathBuf::from,
        );
        let path = crate_dir.join("../sample/views.yaml");
        let views = read_views(&path).expect("the sample views parse");
        assert!(views.len() >= 2);
        assert!(views.iter().all(|v| !v.features.is_empty()));
    }

    #[test]
    fn bad_views_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.yaml");
        std::fs::write(
            &path,
            "views:\n  - name: v\n    features:\n      - {name: a, type: int65}\n",
        )
        .unwrap();
        let err = format!("{:#}", read_views(&path).unwrap_err());
        assert!(err.contains("int65"), "{err}");
        std::fs::write(
            &path,
            "views:\n  - name: v\n    ttl: soon\n    features: []\n",
        )
        .unwrap();
        assert!(format!("{:#}", read_views(&path).unwrap_err()).contains("ttl"));
    }
}
