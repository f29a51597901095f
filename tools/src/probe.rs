//! `quiverctl probe`: write a small row set at a fixed interval through one
//! long-lived connection and report every gap in acknowledged writes: what a
//! materialization job sees during a failover, measured from the client.
//! A gap is a stretch between two acknowledgements longer than a few
//! intervals, whether the rounds in it failed or just waited.
//!
//! Each round is one `Write` of `--keys` rows (one per entity `probe-<i>`,
//! spread over every shard by the key hash), with a deadline of
//! `--attempt-timeout` and no client retries (the server re-routes on its
//! own): a round either is acknowledged or counts as failed. A gap runs from one acknowledgement to the next.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};

use crate::client::Client;

/// Most rows in one probe round.
const KEYS_MAX: u64 = 10_000;

/// Arguments of `probe`.
#[derive(Debug, clap::Args)]
pub struct ProbeArgs {
    /// The feature view to write (its features are written as null).
    #[arg(long)]
    view: String,
    /// Rows per round: with 128, every one of 16 shards gets some with
    /// 99.6% odds.
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u64).range(1..=KEYS_MAX))]
    keys: u64,
    /// Time between the starts of two rounds.
    #[arg(long, default_value = "50ms", value_parser = humantime::parse_duration)]
    interval: Duration,
    /// How long to probe (Ctrl-C ends it early, with the report).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Deadline of one round. Longer than a failover, so a round that spans
    /// one ends when the cluster answers again (the server re-routes within
    /// it), not when the client gives up.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    attempt_timeout: Duration,
}

/// A stretch of time without an acknowledged write.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Gap {
    /// Since the probe started: the last acknowledged round before it.
    from: Duration,
    /// The first acknowledged round after it.
    to: Duration,
    /// Rounds that failed in it.
    failed: u64,
}

/// Follows the rounds' outcomes and collects the gaps: stretches between
/// two acknowledgements longer than `slack` (a few intervals), whether the
/// rounds in between failed or were just slow to answer (a write that
/// waited out a failover inside the server counts too).
#[derive(Debug, Default)]
struct Gaps {
    slack: Duration,
    last_ok: Option<Duration>,
    failed_since_ok: u64,
    gaps: Vec<Gap>,
    ok: u64,
    failed: u64,
}

impl Gaps {
    fn new(slack: Duration) -> Self {
        Self {
            slack,
            ..Self::default()
        }
    }

    fn ok(&mut self, at: Duration) {
        self.ok += 1;
        let from = self.last_ok.unwrap_or_default();
        if self.failed_since_ok > 0 || at.saturating_sub(from) > self.slack {
            self.gaps.push(Gap {
                from,
                to: at,
                failed: self.failed_since_ok,
            });
        }
        self.failed_since_ok = 0;
        self.last_ok = Some(at);
    }

    fn failed(&mut self) {
        self.failed += 1;
        self.failed_since_ok += 1;
    }

    fn longest(&self) -> Option<Gap> {
        self.gaps
            .iter()
            .copied()
            .max_by_key(|gap| gap.to.saturating_sub(gap.from))
    }
}

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

/// `probe`.
pub async fn run(client: &mut Client, args: &ProbeArgs, json: bool) -> Result<()> {
    if args.interval.is_zero() {
        bail!("--interval must be positive");
    }
    let started = Instant::now();
    let mut ticker = tokio::time::interval(args.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Normal rounds come an interval apart, plus a write's latency.
    let mut gaps = Gaps::new(args.interval * 4 + Duration::from_millis(100));
    let mut last_error = None;
    // Ctrl-C (or SIGINT from a script) ends the probe early, with its
    // report.
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    while started.elapsed() < args.duration {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = &mut interrupted => break,
        }
        let event_ts_us = now_us();
        let rows = (0..args.keys)
            .map(|i| quiver_proto::v1::WriteRow {
                entity_key: format!("probe-{i}"),
                event_ts_us,
                values: Default::default(),
            })
            .collect();
        let mut request = tonic::Request::new(quiver_proto::v1::WriteRequest {
            view: args.view.clone(),
            rows,
            request_id: Vec::new(),
        });
        request.set_timeout(args.attempt_timeout);
        let outcome = tokio::time::timeout(args.attempt_timeout, client.write(request)).await;
        match outcome {
            Ok(Ok(_)) => gaps.ok(started.elapsed()),
            Ok(Err(status)) => {
                if status.code() == tonic::Code::NotFound {
                    return Err(anyhow::anyhow!("{}", status.message()))
                        .context("probe writes need an existing view");
                }
                last_error = Some(format!("{}: {}", status.code(), status.message()));
                gaps.failed();
            }
            Err(_) => {
                last_error = Some("no answer within --attempt-timeout".to_owned());
                gaps.failed();
            }
        }
    }
    let longest = gaps.longest();
    if json {
        println!(
            "{}",
            serde_json::json!({
                "rounds_ok": gaps.ok,
                "rounds_failed": gaps.failed,
                "gaps": gaps.gaps.iter().map(|g| serde_json::json!({
                    "from_ms": g.from.as_millis() as u64,
                    "to_ms": g.to.as_millis() as u64,
                    "failed_rounds": g.failed,
                })).collect::<Vec<_>>(),
                "longest_gap_ms": longest.map(|g| g.to.saturating_sub(g.from).as_millis() as u64),
                "still_failing": gaps.failed_since_ok > 0,
            })
        );
    } else {
        println!(
            "probe: {} rounds acknowledged, {} failed, every {} ms for {:.1}s",
            gaps.ok,
            gaps.failed,
            args.interval.as_millis(),
            started.elapsed().as_secs_f64()
        );
        for gap in &gaps.gaps {
            println!(
                "  no acknowledged write for {} ms (from {:.2}s to {:.2}s, {} rounds failed)",
                gap.to.saturating_sub(gap.from).as_millis(),
                gap.from.as_secs_f64(),
                gap.to.as_secs_f64(),
                gap.failed
            );
        }
        match longest {
            Some(gap) => println!(
                "longest gap in acknowledged writes: {} ms",
                gap.to.saturating_sub(gap.from).as_millis()
            ),
            None => println!("no gap in acknowledged writes"),
        }
    }
    if gaps.failed_since_ok > 0 {
        bail!(
            "writes were still failing when the probe ended: {}",
            last_error.unwrap_or_default()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gap_runs_from_the_last_ok_round_to_the_next() {
        let ms = Duration::from_millis;
        let mut gaps = Gaps::new(ms(300));
        gaps.ok(ms(50));
        gaps.ok(ms(100));
        gaps.failed();
        gaps.failed();
        gaps.ok(ms(1_300));
        gaps.ok(ms(1_350));
        gaps.failed();
        gaps.ok(ms(1_500));
        // A round that answered late, with nothing failing: a gap too.
        gaps.ok(ms(2_700));
        gaps.ok(ms(2_750));
        assert_eq!(gaps.ok, 7);
        assert_eq!(gaps.failed, 3);
        assert_eq!(
            gaps.gaps,
            vec![
                Gap {
                    from: ms(100),
                    to: ms(1_300),
                    failed: 2
                },
                Gap {
                    from: ms(1_350),
                    to: ms(1_500),
                    failed: 1
                },
                Gap {
                    from: ms(1_500),
                    to: ms(2_700),
                    failed: 0
                }
            ]
        );
        assert_eq!(gaps.longest().map(|g| g.to - g.from), Some(ms(1_200)));
        // Failing from the start: the gap starts at the start.
        let mut gaps = Gaps::new(ms(300));
        gaps.failed();
        gaps.ok(ms(700));
        assert_eq!(gaps.longest().map(|g| g.from), Some(ms(0)));
    }
}
