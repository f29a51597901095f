//! A circuit breaker per shard, for client calls that need the shard's
//! leader (writes, and reads at `LEADER` or `STRONG`): a shard that keeps
//! failing or timing out (no quorum, an election that does not finish, a
//! leader too slow for its callers' deadlines) fails those calls at once,
//! so a degraded read goes straight to its fallback and a writer gets a
//! retryable `UNAVAILABLE` instead of waiting out its deadline. The peer
//! breakers ([`super::network`]) cannot see this: a leader that lost its
//! quorum answers its own node's proposals locally, slowly.
//!
//! What counts, per call made through this node:
//! - **Success**: an answer, including a refusal by the state machine (the
//!   shard is there).
//! - **Failure**: routing gave up (`Unavailable`); or the call went without
//!   an answer for `shard_breaker_slow_call_ms` or longer (its caller's
//!   deadline cut it off late: resilience4j's slow-call rule); or its
//!   caller's deadline cut it off after a leader-bound attempt on the shard
//!   failed while it ran, with no such attempt succeeding since (a node
//!   refused the connection or timed out, its peer breaker is open, or a
//!   local proposal or lease renewal found no quorum): then the shard, not
//!   the short deadline, is at fault. Attempts by the node's own work count
//!   too: they are evidence about the shard, whoever made them.
//! - **Nothing**: a call cut off sooner with no failed attempt meanwhile: a
//!   caller's 5 ms deadline on a healthy shard must not open the breaker for
//!   everyone. (A redirect or "no leader known" from a live replica is not
//!   a failed attempt: a leader handover must not open it either; nor is
//!   this node's own backlog of calls to a peer, or a refusal.)
//!
//! The rules are those of [`Breaker`]: open past `error_rate_percent` of a
//! full window, half-open after `open`, closed after `close_successes`
//! probes. An open breaker is half-open at once when this node's replica
//! of the shard learns of a leader in a later term than any failed call
//! knew (an election ended: the shard is likely back), as the peer
//! breakers half-open when the peer answers Raft traffic. Internal work
//! (operators, expiry, backups, metadata) is not refused by it, as Raft
//! traffic is not by the peer breakers; its failed attempts are still
//! evidence against the shard (above).
//!
//! Architecture invariant: knows nothing of routing or the transport; the
//! callers ask it and tell it.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use quiver_raft::GroupId;

use super::ClusterError;
use super::breaker::{Admitted, Breaker, BreakerRules, BreakerState};

/// Every shard's breaker on this node, made on first use.
#[derive(Debug)]
pub struct ShardBreakers {
    rules: BreakerRules,
    slow_call: Duration,
    by_shard: Mutex<HashMap<GroupId, Arc<ShardBreaker>>>,
    /// What [`ShardBreaker::failed_attempt_ns`] counts from.
    epoch: Instant,
}

/// One shard's breaker, and the newest leader term a failed call knew.
#[derive(Debug)]
struct ShardBreaker {
    breaker: Breaker,
    /// The newest term of a leader this node knew of when a call that
    /// failed was admitted (0: none known): a leader of a later term was
    /// elected after the failures that opened the breaker.
    opened_term: AtomicU64,
    /// When an attempt on the shard last failed (ns since
    /// [`ShardBreakers::epoch`]; 0: never).
    failed_attempt_ns: AtomicU64,
    /// When a leader-bound attempt last succeeded (same clock).
    succeeded_attempt_ns: AtomicU64,
}

/// A call a shard's breaker let through: report how it ended with
/// [`ShardCall::finish`]; dropped without a report, it counts as a failure
/// if it ran for the slow-call time, else as nothing.
#[derive(Debug)]
pub struct ShardCall {
    group: GroupId,
    shard: Arc<ShardBreaker>,
    admitted: Option<Admitted>,
    started: Instant,
    /// `started`, in ns since [`ShardBreakers::epoch`].
    started_ns: u64,
    slow_call: Duration,
    /// The leader term known when it was admitted.
    leader_term: Option<u64>,
}

impl ShardBreakers {
    /// Breakers with `rules`; calls without an answer after `slow_call`
    /// count as failures.
    pub fn new(rules: BreakerRules, slow_call: Duration) -> ShardBreakers {
        ShardBreakers {
            rules,
            slow_call,
            by_shard: Mutex::new(HashMap::new()),
            epoch: Instant::now(),
        }
    }

    fn since_epoch_ns(&self, at: Instant) -> u64 {
        // Never 0: that means "never failed".
        u64::try_from(at.saturating_duration_since(self.epoch).as_nanos())
            .unwrap_or(u64::MAX)
            .max(1)
    }

    /// Notes that an attempt on `group` that began at `attempt_started`
    /// failed (see the module doc), for the calls in flight. An attempt
    /// that began before the last success says nothing new (a call to a
    /// stopped old leader timing out after a new one answered). Shards no
    /// call has passed yet are not made.
    pub fn attempt_failed(&self, group: GroupId, attempt_started: Instant) {
        let shard = self.by_shard.lock().get(&group).cloned();
        if let Some(shard) = shard {
            let began_ns = self.since_epoch_ns(attempt_started);
            if began_ns > shard.succeeded_attempt_ns.load(Ordering::Relaxed) {
                shard
                    .failed_attempt_ns
                    .fetch_max(self.since_epoch_ns(Instant::now()), Ordering::Relaxed);
            }
        }
    }

    /// Notes that a leader-bound attempt on `group` succeeded: the shard is
    /// there, so earlier failed attempts no longer blame it.
    pub fn attempt_succeeded(&self, group: GroupId) {
        let shard = self.by_shard.lock().get(&group).cloned();
        if let Some(shard) = shard {
            shard
                .succeeded_attempt_ns
                .fetch_max(self.since_epoch_ns(Instant::now()), Ordering::Relaxed);
        }
    }

    /// Lets a call to `group` through, or fails it fast with
    /// [`ClusterError::BreakerOpen`]. `leader_term`: the term of the leader
    /// this node's replica of the group knows of, if any.
    pub fn admit(
        &self,
        group: GroupId,
        leader_term: Option<u64>,
    ) -> Result<ShardCall, ClusterError> {
        let now = Instant::now();
        let shard = self
            .by_shard
            .lock()
            .entry(group)
            .or_insert_with(|| {
                Arc::new(ShardBreaker {
                    breaker: Breaker::new(self.rules, now),
                    opened_term: AtomicU64::new(0),
                    failed_attempt_ns: AtomicU64::new(0),
                    succeeded_attempt_ns: AtomicU64::new(0),
                })
            })
            .clone();
        let admitted = shard.breaker.admit(now).or_else(|refused| {
            // A leader elected since it opened: probe now.
            let elected =
                leader_term.is_some_and(|term| term > shard.opened_term.load(Ordering::Relaxed));
            if elected && let Some(state) = shard.breaker.heard(refused) {
                changed(group, state);
            }
            if elected {
                shard.breaker.admit(now)
            } else {
                Err(refused)
            }
        });
        match admitted {
            Ok(admitted) => Ok(ShardCall {
                group,
                shard,
                admitted: Some(admitted),
                started: now,
                started_ns: self.since_epoch_ns(now),
                slow_call: self.slow_call,
                leader_term,
            }),
            Err(_) => {
                metrics::counter!("quiver_shard_breaker_refused_total", "shard" => group.to_string())
                    .increment(1);
                Err(ClusterError::BreakerOpen {
                    group,
                    open_ms: self.rules.open.as_millis() as u64,
                })
            }
        }
    }

    /// Each shard's breaker state now, forgetting shards `keep` rejects
    /// (gone from the map).
    pub fn states(&self, keep: impl Fn(GroupId) -> bool) -> Vec<(GroupId, BreakerState)> {
        let now = Instant::now();
        let mut by_shard = self.by_shard.lock();
        by_shard.retain(|&group, _| keep(group));
        let mut states: Vec<_> = by_shard
            .iter()
            .map(|(&group, shard)| (group, shard.breaker.state(now)))
            .collect();
        states.sort_unstable_by_key(|&(group, _)| group);
        states
    }
}

impl ShardCall {
    /// Reports how the call ended (see the module doc for what counts).
    pub fn finish<T>(mut self, result: &Result<T, ClusterError>) {
        let ok = match result {
            Ok(_) | Err(ClusterError::Rejected { .. }) => Some(true),
            Err(ClusterError::Unavailable { .. }) => Some(false),
            Err(_) => None,
        };
        self.report(ok);
    }

    fn report(&mut self, ok: Option<bool>) {
        let Some(admitted) = self.admitted.take() else {
            return;
        };
        // Raised before the failure is recorded (so an `admit` racing with
        // the breaker opening compares against it), and never lowered.
        if ok == Some(false) {
            self.shard
                .opened_term
                .fetch_max(self.leader_term.unwrap_or(0), Ordering::Relaxed);
        }
        if let Some(state) = self.shard.breaker.record(admitted, ok, Instant::now()) {
            changed(self.group, state);
        }
    }
}

impl Drop for ShardCall {
    fn drop(&mut self) {
        let Some(admitted) = self.admitted else {
            return;
        };
        let failed_ns = self.shard.failed_attempt_ns.load(Ordering::Relaxed);
        let failed_meanwhile = failed_ns >= self.started_ns
            && failed_ns > self.shard.succeeded_attempt_ns.load(Ordering::Relaxed);
        if failed_meanwhile || self.started.elapsed() >= self.slow_call {
            self.report(Some(false));
        } else {
            self.admitted = None;
            self.shard.breaker.abandon(admitted);
        }
    }
}

/// Logs and counts a shard breaker's change of state.
fn changed(group: GroupId, state: BreakerState) {
    metrics::gauge!("quiver_shard_breaker_state", "shard" => group.to_string()).set(state.gauge());
    match state {
        BreakerState::Open => {
            metrics::counter!("quiver_shard_breaker_opened_total", "shard" => group.to_string())
                .increment(1);
            tracing::warn!(
                shard = group,
                "shard circuit breaker open: its leader-bound calls fail fast"
            );
        }
        BreakerState::Closed => tracing::info!(shard = group, "shard circuit breaker closed"),
        BreakerState::HalfOpen => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULES: BreakerRules = BreakerRules {
        window_calls: 4,
        error_rate_percent: 50,
        open: Duration::from_millis(100),
        close_successes: 2,
    };

    fn unavailable() -> Result<(), ClusterError> {
        Err(ClusterError::Unavailable {
            group: 1,
            attempts: 3,
            last: "no leader".into(),
        })
    }

    #[test]
    fn gives_up_answers_and_slow_drops_count_and_quick_drops_do_not() {
        let breakers = ShardBreakers::new(RULES, Duration::from_millis(30));
        // Quick drops (a caller's short deadline) and refusals: still closed.
        for _ in 0..10 {
            drop(breakers.admit(1, None).unwrap());
        }
        for _ in 0..4 {
            breakers
                .admit(1, None)
                .unwrap()
                .finish(&Err::<(), _>(ClusterError::Rejected {
                    kind: quiver_raft::types::RejectKind::Invalid,
                    message: "bad".into(),
                }));
        }
        assert_eq!(breakers.states(|_| true), vec![(1, BreakerState::Closed)]);
        // Two give-ups and one slow drop in the last four: open.
        breakers.admit(1, None).unwrap().finish(&unavailable());
        breakers.admit(1, None).unwrap().finish(&unavailable());
        let slow = breakers.admit(1, None).unwrap();
        std::thread::sleep(Duration::from_millis(40));
        drop(slow);
        assert_eq!(breakers.states(|_| true), vec![(1, BreakerState::Open)]);
        let refused = breakers.admit(1, None).unwrap_err();
        assert!(matches!(
            refused,
            ClusterError::BreakerOpen { group: 1, .. }
        ));
        // Other shards are untouched.
        breakers.admit(2, None).unwrap().finish(&Ok(()));
        // After the open time, two probes at a time; two answers close it.
        std::thread::sleep(RULES.open);
        let probes = [
            breakers.admit(1, None).unwrap(),
            breakers.admit(1, None).unwrap(),
        ];
        assert!(
            breakers.admit(1, None).is_err(),
            "only two probes at a time"
        );
        for probe in probes {
            probe.finish(&Ok(()));
        }
        assert_eq!(
            breakers.states(|_| true),
            vec![(1, BreakerState::Closed), (2, BreakerState::Closed)]
        );
        // Shards gone from the map are forgotten.
        assert_eq!(
            breakers.states(|group| group == 2),
            vec![(2, BreakerState::Closed)]
        );
    }

    #[test]
    fn a_quick_drop_counts_when_an_attempt_failed_while_it_ran() {
        let breakers = ShardBreakers::new(RULES, Duration::from_secs(60));
        // Not made by a failure report before any call.
        breakers.attempt_failed(4, Instant::now());
        assert!(breakers.states(|_| true).is_empty());
        // An attempt failed before these calls began: their drops say
        // nothing.
        drop(breakers.admit(4, None).unwrap());
        breakers.attempt_failed(4, Instant::now());
        std::thread::sleep(Duration::from_millis(1));
        for _ in 0..4 {
            drop(breakers.admit(4, None).unwrap());
        }
        assert_eq!(breakers.states(|_| true), vec![(4, BreakerState::Closed)]);
        // A success after the failure: the shard is there, drops say
        // nothing.
        let calls: Vec<_> = (0..4).map(|_| breakers.admit(4, None).unwrap()).collect();
        breakers.attempt_failed(4, Instant::now());
        std::thread::sleep(Duration::from_millis(1));
        breakers.attempt_succeeded(4);
        drop(calls);
        assert_eq!(breakers.states(|_| true), vec![(4, BreakerState::Closed)]);
        // An attempt that began before that success and failed after it
        // (a stopped old leader timing out) blames nothing.
        let old_attempt = Instant::now() - Duration::from_secs(6);
        let calls: Vec<_> = (0..4).map(|_| breakers.admit(4, None).unwrap()).collect();
        breakers.attempt_failed(4, old_attempt);
        drop(calls);
        assert_eq!(breakers.states(|_| true), vec![(4, BreakerState::Closed)]);
        // Calls in flight when an attempt fails, with none succeeding
        // since, count as failures when their callers give up, however
        // soon.
        let calls: Vec<_> = (0..4).map(|_| breakers.admit(4, None).unwrap()).collect();
        std::thread::sleep(Duration::from_millis(1));
        breakers.attempt_failed(4, Instant::now());
        drop(calls);
        assert_eq!(breakers.states(|_| true), vec![(4, BreakerState::Open)]);
    }

    #[test]
    fn a_failed_probe_opens_it_again_and_a_dropped_probe_frees_its_slot() {
        let breakers = ShardBreakers::new(RULES, Duration::from_secs(60));
        for _ in 0..4 {
            breakers.admit(7, None).unwrap().finish(&unavailable());
        }
        assert!(breakers.admit(7, None).is_err());
        std::thread::sleep(RULES.open);
        let probe = breakers.admit(7, None).unwrap();
        drop(breakers.admit(7, None).unwrap());
        // The dropped probe's slot is free again.
        let second = breakers.admit(7, None).unwrap();
        probe.finish(&unavailable());
        assert_eq!(breakers.states(|_| true), vec![(7, BreakerState::Open)]);
        // A probe admitted before it reopened counts for nothing.
        second.finish(&Ok(()));
        assert!(breakers.admit(7, None).is_err());
    }

    #[test]
    fn a_leader_elected_since_it_opened_half_opens_it_at_once() {
        let breakers = ShardBreakers::new(RULES, Duration::from_secs(60));
        // Opened while a leader of term 5 was known (it lost its quorum).
        for _ in 0..4 {
            breakers.admit(3, Some(5)).unwrap().finish(&unavailable());
        }
        assert!(breakers.admit(3, Some(5)).is_err(), "the same leader");
        assert!(breakers.admit(3, None).is_err(), "no leader");
        // An election ended: probes go at once, and close it.
        let probes = [
            breakers.admit(3, Some(6)).unwrap(),
            breakers.admit(3, Some(6)).unwrap(),
        ];
        assert!(breakers.admit(3, Some(6)).is_err(), "two probes at a time");
        for probe in probes {
            probe.finish(&Ok(()));
        }
        assert_eq!(breakers.states(|_| true), vec![(3, BreakerState::Closed)]);
        // Failures with no leader known do not lower the term: a leader
        // newer than any failed call knew still half-opens it.
        for _ in 0..4 {
            breakers.admit(3, None).unwrap().finish(&unavailable());
        }
        assert!(breakers.admit(3, None).is_err());
        assert!(breakers.admit(3, Some(6)).is_ok());
    }
}
