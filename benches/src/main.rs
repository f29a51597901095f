//! `quiver-bench`: Quiver's load generator.
//!
//! Targets: Quiver, and its peers driven with the same key stream and the same
//! histograms: Redis (Feast's hash layout or packed blobs) and etcd (see
//! `quiver_bench::target`).
//! Workloads: `serve` (batch gets of B entities x all 10 features), `ingest`
//! (batched or single-row writes), `mixed` (95% serve, 5% ingest). Closed loop
//! at a concurrency, or open loop at a target rate, where latency is measured
//! from each request's intended start so queueing is not hidden (coordinated
//! omission). Preloads the data set, warms up, runs for a fixed time, checks
//! a sample of responses, prints throughput, percentiles and CPU seconds.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use hdrhistogram::Histogram;
use quiver_bench::keys::{KeyChooser, KeyDistribution};
use quiver_bench::report::{cpu_seconds, latency_histogram, ms_at, record};
use quiver_bench::target::{self, Conn, Routing, TargetKind};
use rand::SeedableRng;
use rand::rngs::StdRng;

/// Most requests in flight in open-loop mode before the generator itself is
/// the bottleneck (reported, never silently dropped).
const OPEN_LOOP_IN_FLIGHT_MAX: u64 = 4096;
/// How long a closed-loop client waits after a shed request.
const SHED_BACKOFF: Duration = Duration::from_millis(10);
/// Rows per write when preloading (etcd's writes split this further into
/// transactions it accepts).
const PRELOAD_BATCH_ROWS: u64 = 1000;
/// Tasks that preload or read the whole data set.
const PASS_TASKS: usize = 8;
/// Most connections the generator opens.
const CONNECTIONS_MAX: u64 = 8;

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
    /// What to drive.
    #[arg(long, value_enum, default_value = "quiver")]
    target: TargetKind,
    /// The target's addresses, comma separated (a cluster's members:
    /// connections are spread over them).
    #[arg(
        long,
        default_value = "127.0.0.1:7470",
        env = "QUIVER_ENDPOINT",
        value_delimiter = ','
    )]
    endpoint: Vec<String>,
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
    /// Before measuring, read every entity once (in batches of `--batch`), so
    /// a server cache that can hold the data set starts warm.
    #[arg(long)]
    read_all_first: bool,
    /// Bypass the server's hot cache on reads.
    #[arg(long)]
    skip_cache: bool,
    /// Server process ids (comma separated), to report their CPU seconds.
    #[arg(long, value_delimiter = ',')]
    server_pid: Vec<u32>,
    /// Label printed with the results (default: the target's name).
    #[arg(long)]
    label: Option<String>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// Quiver: send each request to any node (`spread`, the connections
    /// spread over the endpoints) or to its rows' shard leaders (`leader`,
    /// by the routes from `GetRoutes`).
    #[arg(long, value_enum, default_value = "spread")]
    routing: Routing,
}

fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

/// A pass over every entity before measuring.
#[derive(Debug, Clone, Copy)]
enum Pass {
    /// Write every row (generation 0) at this event time.
    Load { event_ts_us: i64 },
    /// Read every row once, so a server cache that can hold them is warm.
    ReadAll,
}

/// Runs `pass` over ids `0..entities` in chunks, 8 tasks spread over the
/// connections.
async fn pass_over_all(conns: &[Conn], entities: u64, batch: u64, pass: Pass) -> Result<()> {
    let started = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = conns
        .iter()
        .cycle()
        .take(PASS_TASKS)
        .map(|conn| {
            let mut conn = conn.clone();
            let next = next.clone();
            let batch = match pass {
                Pass::Load { .. } => PRELOAD_BATCH_ROWS,
                Pass::ReadAll => batch.max(1),
            };
            tokio::spawn(async move {
                loop {
                    let start = next.fetch_add(batch, Ordering::Relaxed);
                    if start >= entities {
                        return Ok::<_, anyhow::Error>(());
                    }
                    let ids: Vec<u64> = (start..(start + batch).min(entities)).collect();
                    match pass {
                        Pass::Load { event_ts_us } => conn.write(&ids, event_ts_us, 0).await?,
                        Pass::ReadAll => conn.get(&ids, true).await?,
                    }
                }
            })
        })
        .collect();
    for task in tasks {
        task.await??;
    }
    eprintln!(
        "{pass:?}: {entities} entities in {:.1}s",
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
    /// Requests the target refused as overloaded (`RESOURCE_EXHAUSTED`):
    /// load shedding, counted apart from errors and not in the latencies.
    shed: AtomicU64,
}

impl Generator {
    /// Counts a failed request, or a shed one (returns true); the first
    /// few failures are printed.
    fn failed(&self, error: &anyhow::Error) -> bool {
        let shed = error
            .chain()
            .filter_map(|e| e.downcast_ref::<tonic::Status>())
            .any(|status| status.code() == tonic::Code::ResourceExhausted);
        if shed {
            self.shed.fetch_add(1, Ordering::Relaxed);
            return true;
        }
        if self.errors.fetch_add(1, Ordering::Relaxed) < 5 {
            eprintln!("request failed: {error:#}");
        }
        false
    }

    async fn one(&self, conn: &mut Conn, rng: &mut StdRng) -> Result<Outcome> {
        use rand::Rng;
        let write = match self.args.workload {
            Workload::Serve => false,
            Workload::Ingest => true,
            Workload::Mixed => rng.random_bool(0.05),
        };
        if write {
            let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
            // Distinct keys: etcd refuses a transaction that puts a key twice.
            let mut seen = HashSet::new();
            let ids: Vec<u64> = (0..self.args.rows_per_write)
                .map(|_| self.keys.next(rng))
                .filter(|id| seen.insert(*id))
                .collect();
            conn.write(&ids, now_us(), generation).await?;
            return Ok(Outcome::Write {
                rows: ids.len() as u64,
            });
        }
        let ids = self.keys.batch(rng, self.args.batch);
        // Check about 1% of responses in full.
        let check = rng.random_ratio(1, 100);
        conn.get(&ids, check).await?;
        if check {
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
    conns: Vec<Conn>,
    until: Instant,
    measure_from: Instant,
) -> Result<Measured> {
    let tasks: Vec<_> = (0..generator.args.concurrency)
        .map(|i| {
            let generator = generator.clone();
            let mut conn = conns[i as usize % conns.len()].clone();
            tokio::spawn(async move {
                let mut rng = StdRng::seed_from_u64(i);
                let mut histogram = latency_histogram();
                let mut tally = Tally::default();
                while Instant::now() < until {
                    let sent = Instant::now();
                    let outcome = generator.one(&mut conn, &mut rng).await;
                    if sent < measure_from {
                        continue;
                    }
                    match outcome {
                        Ok(outcome) => {
                            record(&mut histogram, sent.elapsed());
                            tally.add(&outcome);
                        }
                        Err(error) => {
                            if generator.failed(&error) {
                                // Shed: back off as a client would, not spin.
                                tokio::time::sleep(SHED_BACKOFF).await;
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
    conns: Vec<Conn>,
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
            let mut conn = conns[i as usize % conns.len()].clone();
            let start = intended;
            tasks.push(tokio::spawn(async move {
                let mut rng = StdRng::seed_from_u64(i);
                let mut histogram = latency_histogram();
                let mut tally = Tally::default();
                let outcome = generator.one(&mut conn, &mut rng).await;
                in_flight.fetch_sub(1, Ordering::Relaxed);
                if start >= measure_from {
                    match outcome {
                        // From the intended start, not the actual send.
                        Ok(outcome) => {
                            record(&mut histogram, start.elapsed());
                            tally.add(&outcome);
                        }
                        Err(error) => {
                            generator.failed(&error);
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

/// CPU seconds of all `pids` together; `None` if none is given or one
/// cannot be read.
fn servers_cpu_seconds(pids: &[u32]) -> Option<f64> {
    if pids.is_empty() {
        return None;
    }
    pids.iter().map(|&pid| cpu_seconds(Some(pid))).sum()
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
    // A few connections spread the load like a real serving tier.
    if args.routing == Routing::Leader && args.target != TargetKind::Quiver {
        bail!("--routing leader routes Quiver requests only");
    }
    let connections = args.concurrency.clamp(1, CONNECTIONS_MAX) as usize;
    let conns = target::connect(
        args.target,
        &args.endpoint,
        connections,
        args.skip_cache,
        args.routing,
    )
    .await?;
    let batch = args.batch as u64;
    if args.preload {
        conns[0].clone().setup().await?;
        let event_ts_us = now_us() - 1_000_000;
        pass_over_all(&conns, args.entities, batch, Pass::Load { event_ts_us }).await?;
    }
    if args.read_all_first {
        pass_over_all(&conns, args.entities, batch, Pass::ReadAll).await?;
    }
    let generator = Arc::new(Generator {
        args: args.clone(),
        keys,
        generation: AtomicU64::new(0),
        checked: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        shed: AtomicU64::new(0),
    });
    let start = Instant::now();
    let measure_from = start + args.warmup;
    let until = measure_from + args.duration;
    // CPU time over the measured window only, not warm-up or draining.
    let pids = args.server_pid.clone();
    let cpu_sampler = tokio::spawn(async move {
        let sample = || (cpu_seconds(None), servers_cpu_seconds(&pids));
        tokio::time::sleep_until(measure_from.into()).await;
        let before = sample();
        tokio::time::sleep_until(until.into()).await;
        let after = sample();
        let diff = |b: Option<f64>, a: Option<f64>| b.zip(a).map(|(b, a)| b - a);
        (diff(after.0, before.0), diff(after.1, before.1))
    });
    let measured = match args.rate {
        None => closed_loop(generator.clone(), conns, until, measure_from).await?,
        Some(rate) => open_loop(generator.clone(), conns, rate, until, measure_from).await?,
    };
    let (client_cpu, server_cpu) = cpu_sampler.await?;
    let label = args
        .label
        .clone()
        .unwrap_or_else(|| args.target.name().to_owned());
    let seconds = args.duration.as_secs_f64();
    let h = &measured.histogram;
    let errors = generator.errors.load(Ordering::Relaxed);
    let shed = generator.shed.load(Ordering::Relaxed);
    let summary = serde_json::json!({
        "label": label,
        "target": args.target.name(),
        "workload": format!("{:?}", args.workload).to_lowercase(),
        "mode": if args.rate.is_some() { "open" } else { "closed" },
        "concurrency": args.concurrency,
        "rate": args.rate,
        "batch": args.batch,
        "rows_per_write": args.rows_per_write,
        "distribution": format!("{:?}", args.distribution).to_lowercase(),
        "skip_cache": args.skip_cache,
        "routing": format!("{:?}", args.routing).to_lowercase(),
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
        "shed": shed,
        "shed_per_second": shed as f64 / seconds,
    });
    if args.json {
        println!("{summary}");
    } else {
        println!(
            "{} {:?}: {:.0} req/s, {:.0} entities/s, {:.0} rows/s; p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms; cpu client {:.1}s server {}; {} responses checked, {} errors, {} shed",
            label,
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
            shed,
        );
    }
    if errors > 0 {
        bail!("{errors} requests failed");
    }
    Ok(())
}
