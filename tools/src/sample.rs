//! `quiverctl sample generate`: a realistic, deterministic sample data set for
//! `sample/views.yaml`: drivers as CSV, customers as JSON lines.
//!
//! Event times are recent (within the last hour) except for a small share of
//! drivers whose data is older than the view's 1-day ttl, and a few null
//! values, so every read status shows up in the demo.

use std::io::{BufWriter, Write};
use std::path::PathBuf;

use anyhow::{Context, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Most entities of each kind.
const ENTITIES_MAX: u64 = 50_000_000;
const CITIES: [&str; 8] = [
    "Amsterdam",
    "Berlin",
    "Lisbon",
    "Madrid",
    "Paris",
    "Prague",
    "Vienna",
    "Warsaw",
];
const SEGMENTS: [&str; 6] = [
    "commuter", "airport", "night", "business", "family", "student",
];
/// First driver id, as in Feast's demo.
pub const FIRST_DRIVER_ID: u64 = 1001;

/// Arguments of `sample generate`.
#[derive(Debug, clap::Args)]
pub struct GenerateArgs {
    /// Number of drivers.
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..=ENTITIES_MAX))]
    drivers: u64,
    /// Number of customers.
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..=ENTITIES_MAX))]
    customers: u64,
    /// Output directory.
    #[arg(long, default_value = ".")]
    out_dir: PathBuf,
    /// Random seed.
    #[arg(long, default_value_t = 7)]
    seed: u64,
}

/// Writes drivers.csv and customers.jsonl.
pub fn generate(args: &GenerateArgs) -> Result<()> {
    std::fs::create_dir_all(&args.out_dir)
        .with_context(|| format!("create {}", args.out_dir.display()))?;
    let now_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .context("system clock before 1970")?
        .as_micros() as i64;
    let hour_us = 3_600_000_000i64;
    let mut rng = StdRng::seed_from_u64(args.seed);

    let drivers_path = args.out_dir.join("drivers.csv");
    let mut out = BufWriter::new(
        std::fs::File::create(&drivers_path)
            .with_context(|| format!("create {}", drivers_path.display()))?,
    );
    writeln!(
        out,
        "entity_key,event_ts,conv_rate,acc_rate,avg_daily_trips,rating,city,last_trip_ts"
    )?;
    for id in FIRST_DRIVER_ID..FIRST_DRIVER_ID + args.drivers {
        // 2% of drivers have not reported for over a day: OUTSIDE_MAX_AGE.
        let age_us = if rng.random_bool(0.02) {
            rng.random_range(25 * hour_us..72 * hour_us)
        } else {
            rng.random_range(0..hour_us)
        };
        let event_ts = now_us - age_us;
        let conv_rate = if rng.random_bool(0.01) {
            String::new()
        } else {
            format!("{:.4}", rng.random::<f32>())
        };
        writeln!(
            out,
            "{id},{event_ts},{conv_rate},{:.4},{},{:.2},{},{}",
            rng.random::<f32>(),
            rng.random_range(0..40),
            rng.random_range(3.0..5.0f64),
            CITIES[rng.random_range(0..CITIES.len())],
            event_ts - rng.random_range(0..hour_us),
        )?;
    }
    out.flush()?;

    let customers_path = args.out_dir.join("customers.jsonl");
    let mut out = BufWriter::new(
        std::fs::File::create(&customers_path)
            .with_context(|| format!("create {}", customers_path.display()))?,
    );
    for id in 1..=args.customers {
        let segments: Vec<&str> = SEGMENTS
            .iter()
            .copied()
            .filter(|_| rng.random_bool(0.3))
            .collect();
        let row = serde_json::json!({
            "entity_key": id.to_string(),
            "event_ts": now_us - rng.random_range(0..24 * hour_us),
            "current_balance": (rng.random_range(-50.0..500.0f64) * 100.0).round() / 100.0,
            "avg_passenger_count": (rng.random_range(1.0..4.0f64) * 10.0).round() / 10.0,
            "lifetime_trip_count": rng.random_range(0..2_000),
            "segments": segments,
        });
        writeln!(out, "{row}")?;
    }
    out.flush()?;
    println!(
        "wrote {} drivers to {} and {} customers to {}",
        args.drivers,
        drivers_path.display(),
        args.customers,
        customers_path.display()
    );
    Ok(())
}
