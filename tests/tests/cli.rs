//! quiverctl against a real node: apply the sample views, load generated
//! sample data from CSV and JSON lines, read it back.

#![allow(clippy::unwrap_used)]

use quiver_tests::{Node, quiverctl};

fn workspace_file(path: &str) -> String {
    quiver_tests::workspace_path(path).display().to_string()
}

#[tokio::test]
async fn views_apply_put_get_status() {
    let dir = tempfile::tempdir().expect("temp dir");
    let node = Node::start(&dir.path().join("node"), &[])
        .await
        .expect("node starts");
    let endpoint = node.endpoint();
    let ctl = |args: &[&str]| quiverctl(&endpoint, args).expect("quiverctl succeeds");

    eprintln!("--- apply the sample views (twice: the second is a no-op)");
    let applied = ctl(&["views", "apply", "-f", &workspace_file("sample/views.yaml")]);
    assert!(
        applied.contains("driver_hourly_stats") && applied.contains("applied"),
        "{applied}"
    );
    assert!(
        ctl(&["views", "apply", "-f", &workspace_file("sample/views.yaml")]).contains("unchanged")
    );
    let listed: serde_json::Value =
        serde_json::from_str(&ctl(&["views", "list", "--json"])).expect("json");
    assert_eq!(listed.as_array().expect("array").len(), 2);

    eprintln!("--- generate and load sample data");
    let data = dir.path().join("data");
    let data_dir = data.to_str().expect("utf-8 path");
    ctl(&[
        "sample",
        "generate",
        "--drivers",
        "300",
        "--customers",
        "200",
        "--out-dir",
        data_dir,
    ]);
    let put: serde_json::Value = serde_json::from_str(&ctl(&[
        "--json",
        "put",
        "--view",
        "driver_hourly_stats",
        "-f",
        &format!("{data_dir}/drivers.csv"),
        "--batch-rows",
        "64",
    ]))
    .expect("json");
    assert_eq!(put["rows_applied"], 300);
    ctl(&[
        "put",
        "--view",
        "customer_profile",
        "-f",
        &format!("{data_dir}/customers.jsonl"),
    ]);

    eprintln!("--- read back what the CSV holds");
    let csv = std::fs::read_to_string(format!("{data_dir}/drivers.csv")).expect("read csv");
    let first: Vec<&str> = csv
        .lines()
        .nth(1)
        .expect("a data line")
        .split(',')
        .collect();
    let got: serde_json::Value = serde_json::from_str(&ctl(&[
        "--json",
        "get",
        "--features",
        "driver_hourly_stats:avg_daily_trips,driver_hourly_stats:city",
        first[0],
    ]))
    .expect("json");
    let features = &got["entities"][0]["features"];
    assert_eq!(
        features["driver_hourly_stats:avg_daily_trips"]["value"],
        first[4].parse::<i64>().expect("int")
    );
    assert_eq!(features["driver_hourly_stats:city"]["value"], first[6]);

    let got: serde_json::Value = serde_json::from_str(&ctl(&[
        "--json",
        "get",
        "--features",
        "customer_profile",
        "1",
        "999999",
    ]))
    .expect("json");
    assert_eq!(
        got["entities"][0]["features"]["customer_profile:lifetime_trip_count"]["status"],
        "PRESENT"
    );
    assert_eq!(
        got["entities"][1]["features"]["customer_profile:lifetime_trip_count"]["status"],
        "DEFAULTED"
    );

    let table = ctl(&["get", "--features", "driver_hourly_stats", "1001", "1002"]);
    assert!(
        table.contains("driver_hourly_stats:conv_rate") && table.contains("1002"),
        "{table}"
    );
    let latency = ctl(&[
        "get",
        "--features",
        "driver_hourly_stats",
        "1001",
        "1002",
        "--repeat",
        "20",
    ]);
    assert!(latency.contains("p99"), "{latency}");

    let status: serde_json::Value =
        serde_json::from_str(&ctl(&["--json", "status"])).expect("json");
    assert_eq!(status["feature_views"], 2);
    assert!(status["rows_written"].as_u64().expect("number") >= 500);

    eprintln!("--- bad input to the CLI is a clear error");
    let err = quiverctl(
        &endpoint,
        &[
            "put",
            "--view",
            "nope",
            "-f",
            &format!("{data_dir}/drivers.csv"),
        ],
    )
    .unwrap_err();
    assert!(err.to_string().contains("does not exist"), "{err}");
}
