//! `quiver-bench`: Quiver's load generator.
//!
//! Workloads: `serve` (batch gets of B entities x all 10 features), `ingest`
//! (batched or single-row writes), `mixed` (95% serve, 5% ingest). Closed loop
//! at a concurrency, or open loop at a target rate, where latency is measured
//! from each request's intended start so queueing is not hidden (coordinated
//! omission). Preloads the data set, warms up, runs for a fixed time, checks
//! a sample of responses, prints throughput, percentiles and CPU seconds.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use hdrhistogram::Histogram;
use quiver_bench::dataset;
use quiver_bench::keys::{KeyChooser, KeyDistribution};
use quiver_bench::report::{cpu_seconds, latency_histogram, ms_at, record};
use quiver_proto::v1 as pb;
use quiver_proto::v1::feature_store_client::FeatureStoreClient;
use rand::SeedableRng;
use rand::rngs::StdRng;
use tonic::transport::Channel;

/// Most requests in flight in open-loop mode before the generator itself is
/// the bottleneck (reported, never silently dropped).
const OPEN_LOOP_IN_FLIGHT_MAX: u64 = 4096;
/// Rows per preload write.
const PRELOAD_BATCH_ROWS: u64 = 1000;

#[derive(Debug, Clone, Copy, PartialEq, clap::ValueEnum)]
enum Workload {
    Serve,
    Ingest,
    Mixed,
}

/// Quiver load generator.
#[derive(Debug, Clone, Parser)]
#[command(name = "quiver-bench", version, about)]
struct Args {
    /// quiverd address.
    #[arg(long, default_value = "127.0.0.1:7470", env = "QUIVER_ENDPOINT")]
    endpoint: String,
    /// What to run.
    #[arg(long, value_enum, default_value = "serve")]
    workload: Workload,
    /// Entities in the data set.
    #[arg(long, default_value_t = 1_000_000)]
    entities: u64,
    /// Entities per get.
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// Rows per write (1 = single-row writes).
    #[arg(long, default_value_t = 100)]
    rows_per_write: u64,
    /// Key distribution.
    #[arg(long, value_enum, default_value = "uniform")]
    distribution: KeyDistribution,
    /// Zipf exponent.
    #[arg(long, default_value_t = 0.99)]
    zipf_exponent: f64,
    /// Requests in flight (closed loop).
    #[arg(long, default_value_t = 16)]
    concurrency: u64,
    /// Target requests per second: open loop. Unset: closed loop.
    #[arg(long)]
    rate: Option<u64>,
    /// Measured duration.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Warm-up before measuring.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// Load the data set first (skip if it is already loaded).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    preload: bool,
    /// Bypass the server's hot cache on reads.
    #[arg(long)]
    skip_cache: bool,
    /// Server process id, to report its CPU seconds.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Label printed with the results.
    #[arg(long, default_value = "quiver")]
    label: String,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

type Client = FeatureStoreClient<Channel>;

async fn connect(endpoint: &str) -> Result<Client> {
    let url = if endpoint.contains("://") {
        endpoint.to_owned()
    } else {
        format!("http://{endpoint}")
    };
    let channel = tonic::transport::Endpoint::from_shared(url)?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .connect()
        .await
        .with_context(|| format!("connect to {endpoint}"))?;
    Ok(FeatureStoreClient::new(channel).max_decoding_message_size(256 << 20))
}

fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

async fn preload(clients: &[Client], entities: u64) -> Result<()> {
    let mut client = clients[0].clone();
    client
        .apply_feature_view(pb::ApplyFeatureViewRequest {
            view: Some(dataset::view()),
        })
        .await?;
    let started = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let event_ts = now_us() - 1_000_000;
    let tasks: Vec<_> = clients
        .iter()
        .take(4)
        .map(|client| {
            let mut client = client.clone();
            let next = next.clone();
            tokio::spawn(async move {
                loop {
                    let start = next.fetch_add(PRELOAD_BATCH_ROWS, Ordering::Relaxed);
                    if start >= entities {
                        return Ok::<_, anyhow::Error>(());
                    }
                    let end = (start + PRELOAD_BATCH_ROWS).min(entities);
                    let rows = (start..end)
                        .map(|id| dataset::row(id, event_ts, 0))
                        .collect();
                    client.write(dataset::write_request(rows)).await?;
                }
            })
        })
        .collect();
    for task in tasks {
        task.await??;
    }
    eprintln!(
        "preloaded {entities} entities in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// What one request did.
enum Outcome {
    Read { entities: u64 },
    Write { rows: u64 },
}

struct Generator {
    args: Args,
    keys: KeyChooser,
    generation: AtomicU64,
    checked: AtomicU64,
    errors: AtomicU64,
}

impl Generator {
    async fn one(&self, client: &mut Client, rng: &mut StdRng) -> Result<Outcome> {
        use rand::Rng;
        let write = match self.args.workload {
            Workload::Serve => false,
            Workload::Ingest => true,
            Workload::Mixed => rng.random_bool(0.05),
        };
        if write {
            let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
            let ts = now_us();
            let rows = (0..self.args.rows_per_write)
                .map(|_| dataset::row(self.keys.next(rng), ts, generation))
                .collect();
            client.write(dataset::write_request(rows)).await?;
            return Ok(Outcome::Write {
                rows: self.args.rows_per_write,
            });
        }
        let ids = self.keys.batch(rng, self.args.batch);
        let request = pb::GetRequest {
            entity_keys: ids.iter().map(|&id| dataset::entity_key(id)).collect(),
            features: vec![dataset::VIEW.into()],
            consistency: pb::Consistency::Leader as i32,
            skip_cache: self.args.skip_cache,
        };
        let response = client.get(request).await?.into_inner();
        // Check about 1% of responses in full.
        if rng.random_ratio(1, 100) {
            if response.entities.len() != ids.len() {
                bail!(
                    "asked for {} entities, got {}",
                    ids.len(),
                    response.entities.len()
                );
            }
            for entity in &response.entities {
                dataset::check_entity(entity).map_err(anyhow::Error::msg)?;
            }
            self.checked.fetch_add(1, Ordering::Relaxed);
        }
        Ok(Outcome::Read {
            entities: ids.len() as u64,
        })
    }
}

#[derive(Default)]
struct Tally {
    requests: u64,
    entities: u64,
    rows: u64,
}

struct Measured {
    histogram: Histogram<u64>,
    tally: Tally,
}

async fn closed_loop(
    generator: Arc<Generator>,
    clients: Vec<Client>,
    until: Instant,
    measure_from: Instant,
) -> Result<Measured> {
    let tasks: Vec<_> = (0..generator.args.concurrency)
        .map(|i| {
            let generator = generator.clone();
            let mut client = clients[i as usize % clients.len()].clone();
            tokio::spawn(async move {
                let mut rng = StdRng::seed_from_u64(i);
                let mut histogram = latency_histogram();
                let mut tally = Tally::default();
                while Instant::now() < until {
                    let sent = Instant::now();
                    let outcome = generator.one(&mut client, &mut rng).await;
                    if sent < measure_from {
                        continue;
                    }
                    match outcome {
                        Ok(outcome) => {
                            record(&mut histogram, sent.elapsed());
                            tally.add(&outcome);
                        }
                        Err(error) => {
                            if generator.errors.fetch_add(1, Ordering::Relaxed) < 5 {
                                eprintln!("request failed: {error:#}");
                            }
                        }
                    }
                }
                (histogram, tally)
            })
        })
        .collect();
    merge(tasks).await
}

async fn open_loop(
    generator: Arc<Generator>,
    clients: Vec<Client>,
    rate: u64,
    until: Instant,
    measure_from: Instant,
) -> Result<Measured> {
    let interval = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
    let in_flight = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    let mut intended = Instant::now();
    let mut i = 0u64;
    let mut overloaded = 0u64;
    while intended < until {
        tokio::time::sleep_until(intended.into()).await;
        if in_flight.load(Ordering::Relaxed) >= OPEN_LOOP_IN_FLIGHT_MAX {
            overloaded += 1;
        } else {
            in_flight.fetch_add(1, Ordering::Relaxed);
            let generator = generator.clone();
            let in_flight = in_flight.clone();
            let mut client = clients[i as usize % clients.len()].clone();
            let start = intended;
            tasks.push(tokio::spawn(async move {
                let mut rng = StdRng::seed_from_u64(i);
                let mut histogram = latency_histogram();
                let mut tally = Tally::default();
                let outcome = generator.one(&mut client, &mut rng).await;
                in_flight.fetch_sub(1, Ordering::Relaxed);
                if start >= measure_from {
                    match outcome {
                        // From the intended start, not the actual send.
                        Ok(outcome) => {
                            record(&mut histogram, start.elapsed());
                            tally.add(&outcome);
                        }
                        Err(_) => {
                            generator.errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                (histogram, tally)
            }));
        }
        i += 1;
        intended += interval;
    }
    if overloaded > 0 {
        eprintln!(
            "warning: {overloaded} requests not sent: {OPEN_LOOP_IN_FLIGHT_MAX} already in flight (target rate too high)"
        );
    }
    merge(tasks).await
}

impl Tally {
    fn add(&mut self, outcome: &Outcome) {
        self.requests += 1;
        match outcome {
            Outcome::Read { entities } => self.entities += entities,
            Outcome::Write { rows } => self.rows += rows,
        }
    }
}

async fn merge(tasks: Vec<tokio::task::JoinHandle<(Histogram<u64>, Tally)>>) -> Result<Measured> {
    let mut histogram = latency_histogram();
    let mut tally = Tally::default();
    for task in tasks {
        let (h, t) = task.await?;
        histogram.add(&h).context("merge histograms")?;
        tally.requests += t.requests;
        tally.entities += t.entities;
        tally.rows += t.rows;
    }
    Ok(Measured { histogram, tally })
}

fn main() -> Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(args))
}

async fn run(args: Args) -> Result<()> {
    let keys = KeyChooser::new(args.distribution, args.entities, args.zipf_exponent)?;
    // A few HTTP/2 connections spread the load like a real serving tier.
    let connections = args.concurrency.clamp(1, 8) as usize;
    let mut clients = Vec::with_capacity(connections);
    for _ in 0..connections {
        clients.push(connect(&args.endpoint).await?);
    }
    if args.preload {
        preload(&clients, args.entities).await?;
    }
    let generator = Arc::new(Generator {
        args: args.clone(),
        keys,
        generation: AtomicU64::new(0),
        checked: AtomicU64::new(0),
        errors: AtomicU64::new(0),
    });
    let start = Instant::now();
    let measure_from = start + args.warmup;
    let until = measure_from + args.duration;
    let (client_cpu_0, server_cpu_0) = (
        cpu_seconds(None),
        args.server_pid.and_then(|p| cpu_seconds(Some(p))),
    );
    let measured = match args.rate {
        None => closed_loop(generator.clone(), clients, until, measure_from).await?,
        Some(rate) => open_loop(generator.clone(), clients, rate, until, measure_from).await?,
    };
    let client_cpu = cpu_seconds(None).zip(client_cpu_0).map(|(b, a)| b - a);
    let server_cpu = args
        .server_pid
        .and_then(|p| cpu_seconds(Some(p)))
        .zip(server_cpu_0)
        .map(|(b, a)| b - a);
    let seconds = args.duration.as_secs_f64();
    let h = &measured.histogram;
    let errors = generator.errors.load(Ordering::Relaxed);
    let summary = serde_json::json!({
        "label": args.label,
        "workload": format!("{:?}", args.workload).to_lowercase(),
        "mode": if args.rate.is_some() { "open" } else { "closed" },
        "concurrency": args.concurrency,
        "rate": args.rate,
        "batch": args.batch,
        "rows_per_write": args.rows_per_write,
        "distribution": format!("{:?}", args.distribution).to_lowercase(),
        "skip_cache": args.skip_cache,
        "requests_per_second": measured.tally.requests as f64 / seconds,
        "entities_per_second": measured.tally.entities as f64 / seconds,
        "rows_per_second": measured.tally.rows as f64 / seconds,
        "p50_ms": ms_at(h, 0.5),
        "p99_ms": ms_at(h, 0.99),
        "p999_ms": ms_at(h, 0.999),
        "max_ms": h.max() as f64 / 1000.0,
        "client_cpu_seconds": client_cpu,
        "server_cpu_seconds": server_cpu,
        "responses_checked": generator.checked.load(Ordering::Relaxed),
        "errors": errors,
    });
    if args.json {
        println!("{summary}");
    } else {
        println!(
            "{} {:?}: {:.0} req/s, {:.0} entities/s, {:.0} rows/s; p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms; cpu client {:.1}s server {}; {} responses checked, {} errors",
            args.label,
            args.workload,
            summary["requests_per_second"].as_f64().unwrap_or(0.0),
            summary["entities_per_second"].as_f64().unwrap_or(0.0),
            summary["rows_per_second"].as_f64().unwrap_or(0.0),
            ms_at(h, 0.5),
            ms_at(h, 0.99),
            ms_at(h, 0.999),
            client_cpu.unwrap_or(f64::NAN),
            server_cpu.map_or("n/a".to_owned(), |s| format!("{s:.1}s")),
            generator.checked.load(Ordering::Relaxed),
            errors,
        );
    }
    if errors > 0 {
        bail!("{errors} requests failed");
    }
    Ok(())
}
