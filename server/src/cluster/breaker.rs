//! A circuit breaker per peer node: calls to a peer that keeps failing fail
//! at once instead of each waiting out its deadline, so a stopped or
//! partitioned node costs a forwarded read or write one fast error, not a
//! timeout. (The peer client sends Raft traffic, heartbeats, votes, pings
//! and appends, whatever the state: elections, liveness and replication
//! must not wait for a breaker, and their answers tell it the peer is
//! back.)
//!
//! - **Closed**: every call goes; the outcomes of the last `window_calls`
//!   are kept. When the window is full and more than
//!   `error_rate_percent` of it failed, the breaker opens.
//! - **Open**: calls fail fast for `open_ms`, or until the peer answers a
//!   call that went anyway ([`Breaker::heard`]: the peer client always
//!   sends Raft traffic); then it is half-open.
//! - **Half-open**: up to `close_successes` probe calls at a time go
//!   (others fail fast); a failed probe opens it again for `open_ms`,
//!   `close_successes` successful probes in a row close it with an empty
//!   window (one round trip of a peer that is back).
//!
//! What counts as a failure is the caller's choice (the peer client counts
//! transport errors, and deadlines only of calls the peer answers without
//! waiting for anything else: a proposal that waits for a quorum says
//! nothing about the peer). A result from before the last change of state
//! is ignored, so a slow answer from a call admitted while closed cannot
//! close a breaker that opened since. Time is passed in, so the rules are
//! tested without sleeping.
//!
//! Architecture invariant: knows nothing of the transport; the peer client
//! asks it and tells it.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// A breaker's rules (`cluster.breaker_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerRules {
    /// Outcomes kept while closed (0: the breaker never opens).
    pub window_calls: u32,
    /// Opens when more than this share of a full window failed (percent).
    pub error_rate_percent: u32,
    /// How long it stays open before a probe is let through.
    pub open: Duration,
    /// Successful probes in a row that close it.
    pub close_successes: u32,
}

/// Where a breaker stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls go.
    Closed,
    /// Calls fail fast.
    Open,
    /// A few probes at a time go.
    HalfOpen,
}

impl BreakerState {
    /// The state as a gauge value: 0 closed, 1 half-open, 2 open.
    pub fn gauge(self) -> f64 {
        match self {
            BreakerState::Closed => 0.0,
            BreakerState::HalfOpen => 1.0,
            BreakerState::Open => 2.0,
        }
    }
}

#[derive(Debug)]
struct Inner {
    state: BreakerState,
    /// Outcomes while closed, newest last (true: success).
    window: VecDeque<bool>,
    /// When it last opened.
    opened_at: Instant,
    /// Successful probes in a row while half-open.
    successes: u32,
    /// Probes out while half-open.
    probes_out: u32,
    /// Bumped on every change of state: results of calls admitted before
    /// are ignored.
    generation: u64,
}

/// One peer's breaker.
#[derive(Debug)]
pub struct Breaker {
    rules: BreakerRules,
    inner: Mutex<Inner>,
}

/// A call the breaker let through: report its outcome with
/// [`Breaker::record`]. A half-open probe dropped without a report frees
/// the probe slot (see [`Breaker::abandon`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admitted {
    generation: u64,
    probe: bool,
}

/// A call the breaker would fail fast, with the breaker's generation at
/// that moment: a call sent anyway (Raft traffic) reports its answer with
/// [`Breaker::heard`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    generation: u64,
}

impl Breaker {
    /// A closed breaker with `rules`.
    pub fn new(rules: BreakerRules, now: Instant) -> Breaker {
        Breaker {
            rules,
            inner: Mutex::new(Inner {
                state: BreakerState::Closed,
                window: VecDeque::with_capacity(rules.window_calls as usize),
                opened_at: now,
                successes: 0,
                probes_out: 0,
                generation: 0,
            }),
        }
    }

    /// Where it stands at `now` (an open breaker past its time is
    /// half-open).
    pub fn state(&self, now: Instant) -> BreakerState {
        let inner = self.inner.lock();
        match inner.state {
            BreakerState::Open if now.duration_since(inner.opened_at) >= self.rules.open => {
                BreakerState::HalfOpen
            }
            state => state,
        }
    }

    /// Lets a call through, or refuses it: fail it fast.
    pub fn admit(&self, now: Instant) -> Result<Admitted, Refused> {
        let mut inner = self.inner.lock();
        if inner.state == BreakerState::Open
            && now.duration_since(inner.opened_at) >= self.rules.open
        {
            inner.state = BreakerState::HalfOpen;
            inner.successes = 0;
            inner.probes_out = 0;
            inner.generation += 1;
        }
        let refused = Refused {
            generation: inner.generation,
        };
        match inner.state {
            BreakerState::Closed => Ok(Admitted {
                generation: inner.generation,
                probe: false,
            }),
            BreakerState::Open => Err(refused),
            BreakerState::HalfOpen if inner.probes_out >= self.rules.close_successes => {
                Err(refused)
            }
            BreakerState::HalfOpen => {
                inner.probes_out += 1;
                Ok(Admitted {
                    generation: inner.generation,
                    probe: true,
                })
            }
        }
    }

    /// The outcome of an admitted call (`None`: it says nothing about the
    /// peer). Returns the state when this changed it.
    pub fn record(
        &self,
        admitted: Admitted,
        ok: Option<bool>,
        now: Instant,
    ) -> Option<BreakerState> {
        let mut inner = self.inner.lock();
        if admitted.generation != inner.generation {
            return None;
        }
        if admitted.probe {
            inner.probes_out = inner.probes_out.saturating_sub(1);
        }
        let ok = ok?;
        match inner.state {
            BreakerState::Closed => {
                let window_calls = self.rules.window_calls as usize;
                if window_calls == 0 {
                    return None;
                }
                if inner.window.len() == window_calls {
                    inner.window.pop_front();
                }
                inner.window.push_back(ok);
                let failed = inner.window.iter().filter(|&&ok| !ok).count();
                let over = failed * 100 > self.rules.error_rate_percent as usize * window_calls;
                (inner.window.len() == window_calls && over).then(|| Self::open(&mut inner, now))
            }
            BreakerState::HalfOpen if admitted.probe => {
                if !ok {
                    return Some(Self::open(&mut inner, now));
                }
                inner.successes += 1;
                (inner.successes >= self.rules.close_successes).then(|| {
                    inner.state = BreakerState::Closed;
                    inner.window.clear();
                    inner.generation += 1;
                    BreakerState::Closed
                })
            }
            BreakerState::HalfOpen | BreakerState::Open => None,
        }
    }

    /// The peer answered a call the breaker refused but that was sent
    /// anyway: an open breaker is half-open at once (the peer is back;
    /// probes decide). An answer to a call refused before the breaker last
    /// changed (before a failed probe reopened it) counts for nothing.
    /// Returns the state when this changed it.
    pub fn heard(&self, refused: Refused) -> Option<BreakerState> {
        let mut inner = self.inner.lock();
        (inner.state == BreakerState::Open && inner.generation == refused.generation).then(|| {
            inner.state = BreakerState::HalfOpen;
            inner.successes = 0;
            inner.probes_out = 0;
            inner.generation += 1;
            BreakerState::HalfOpen
        })
    }

    /// An admitted call that ended without an outcome (cancelled): frees
    /// its probe slot if it was a probe.
    pub fn abandon(&self, admitted: Admitted) {
        let mut inner = self.inner.lock();
        if admitted.probe && admitted.generation == inner.generation {
            inner.probes_out = inner.probes_out.saturating_sub(1);
        }
    }

    fn open(inner: &mut Inner, now: Instant) -> BreakerState {
        inner.state = BreakerState::Open;
        inner.opened_at = now;
        inner.window.clear();
        inner.generation += 1;
        BreakerState::Open
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const RULES: BreakerRules = BreakerRules {
        window_calls: 10,
        error_rate_percent: 50,
        open: Duration::from_secs(2),
        close_successes: 5,
    };

    fn call(breaker: &Breaker, ok: bool, now: Instant) -> Option<Option<BreakerState>> {
        let admitted = breaker.admit(now).ok()?;
        Some(breaker.record(admitted, Some(ok), now))
    }

    #[test]
    fn opens_past_half_failed_over_ten_calls_probes_after_the_timeout_and_closes_after_five() {
        let start = Instant::now();
        let breaker = Breaker::new(RULES, start);
        // 5 of 10 failed (S S S S S F F F F F) is not more than half.
        for i in 0..10 {
            assert_eq!(call(&breaker, i < 5, start), Some(None));
        }
        assert_eq!(breaker.state(start), BreakerState::Closed);
        // The 6th failure in the last 10 opens it.
        assert_eq!(
            call(&breaker, false, start),
            Some(Some(BreakerState::Open)),
            "window: S S S S F F F F F F -> 6 failures"
        );
        assert_eq!(
            breaker.admit(start + Duration::from_millis(1999)).ok(),
            None
        );
        // After the timeout, up to 5 probes at a time.
        let later = start + RULES.open;
        assert_eq!(breaker.state(later), BreakerState::HalfOpen);
        let probes: Vec<Admitted> = (0..5).map(|_| breaker.admit(later).unwrap()).collect();
        assert_eq!(breaker.admit(later).ok(), None, "5 probes at a time");
        for (i, probe) in probes.into_iter().enumerate() {
            let changed = breaker.record(probe, Some(true), later);
            assert_eq!(changed, (i == 4).then_some(BreakerState::Closed));
        }
        assert_eq!(breaker.state(later), BreakerState::Closed);
        // Closed with an empty window: 5 failures do not open it.
        for _ in 0..5 {
            assert_eq!(call(&breaker, false, later), Some(None));
        }
    }

    #[test]
    fn a_failed_probe_opens_it_again_for_the_whole_timeout() {
        let start = Instant::now();
        let breaker = Breaker::new(RULES, start);
        for _ in 0..10 {
            call(&breaker, false, start);
        }
        let later = start + RULES.open;
        let probe = breaker.admit(later).unwrap();
        assert_eq!(
            breaker.record(probe, Some(false), later),
            Some(BreakerState::Open)
        );
        assert_eq!(breaker.admit(later + RULES.open / 2).ok(), None);
        assert!(breaker.admit(later + RULES.open).is_ok());
    }

    #[test]
    fn late_results_and_abandoned_probes_change_nothing() {
        let start = Instant::now();
        let breaker = Breaker::new(RULES, start);
        let slow = breaker.admit(start).unwrap();
        for _ in 0..10 {
            call(&breaker, false, start);
        }
        assert_eq!(breaker.state(start), BreakerState::Open);
        // Admitted while closed, answered while open: ignored.
        assert_eq!(breaker.record(slow, Some(true), start), None);
        let later = start + RULES.open;
        let probes: Vec<Admitted> = (0..5).map(|_| breaker.admit(later).unwrap()).collect();
        assert_eq!(breaker.admit(later).ok(), None);
        breaker.abandon(probes[0]);
        // The slot is free again; a result that says nothing frees it too.
        let probe = breaker.admit(later).unwrap();
        assert_eq!(breaker.record(probe, None, later), None);
        assert!(breaker.admit(later).is_ok());
        assert_eq!(breaker.state(later), BreakerState::HalfOpen);
    }

    /// A refusal at the breaker's generation now.
    fn refused_now(breaker: &Breaker) -> Refused {
        Refused {
            generation: breaker.inner.lock().generation,
        }
    }

    #[test]
    fn an_answer_while_open_makes_it_half_open_at_once() {
        let start = Instant::now();
        let breaker = Breaker::new(RULES, start);
        assert_eq!(
            breaker.heard(refused_now(&breaker)),
            None,
            "closed stays closed"
        );
        let before = refused_now(&breaker);
        for _ in 0..10 {
            call(&breaker, false, start);
        }
        let refused = breaker.admit(start).unwrap_err();
        assert_eq!(breaker.heard(before), None, "sent before it opened");
        assert_eq!(breaker.state(start), BreakerState::Open);
        assert_eq!(breaker.heard(refused), Some(BreakerState::HalfOpen));
        assert_eq!(breaker.state(start), BreakerState::HalfOpen);
        for _ in 0..4 {
            assert_eq!(call(&breaker, true, start), Some(None));
        }
        assert_eq!(
            call(&breaker, true, start),
            Some(Some(BreakerState::Closed))
        );
    }

    #[test]
    fn a_zero_window_never_opens() {
        let start = Instant::now();
        let breaker = Breaker::new(
            BreakerRules {
                window_calls: 0,
                ..RULES
            },
            start,
        );
        for _ in 0..100 {
            assert_eq!(call(&breaker, false, start), Some(None));
        }
    }

    proptest! {
        /// Whatever the outcomes, a closed breaker opens exactly when more
        /// than half of the last 10 outcomes since it (re)closed failed, and
        /// an open one admits nothing before its timeout.
        #[test]
        fn opens_exactly_when_the_window_says(outcomes in proptest::collection::vec(any::<bool>(), 0..200)) {
            let start = Instant::now();
            let breaker = Breaker::new(RULES, start);
            let mut window: VecDeque<bool> = VecDeque::new();
            for ok in outcomes {
                match breaker.state(start) {
                    BreakerState::Closed => {
                        let changed = call(&breaker, ok, start).unwrap();
                        if window.len() == 10 {
                            window.pop_front();
                        }
                        window.push_back(ok);
                        let expect_open =
                            window.len() == 10 && window.iter().filter(|&&ok| !ok).count() > 5;
                        prop_assert_eq!(changed == Some(BreakerState::Open), expect_open);
                        if expect_open {
                            window.clear();
                        }
                    }
                    _ => prop_assert!(breaker.admit(start).is_err()),
                }
            }
        }
    }
}
