//! A node-wide byte rate for snapshot sends, so that a replica move or a
//! repair streaming a whole shard leaves disk and network to serving (TiKV
//! saw serving p99 triple without such a limit).
//!
//! Every snapshot this node sends draws on one budget
//! (`cluster.snapshot_send_bytes_per_second_max`). The limiter is virtual
//! scheduling (GCRA): it remembers when the bytes granted so far will have
//! been "paid for" and makes the next sender wait until then; a sender
//! idle for a while gets no saved-up burst beyond the chunk it asks for.
//! Senders read files on blocking threads, so they simply sleep there.

use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// Longest a single grant can cost (a guard: grants are snapshot chunks).
const GRANT_WAIT_MAX: Duration = Duration::from_secs(3600);

/// A byte rate shared by every snapshot this node sends.
#[derive(Debug)]
pub struct ByteRate {
    /// 0: unlimited.
    bytes_per_second: u64,
    /// When the bytes granted so far are paid for.
    paid_until: Mutex<Option<Instant>>,
}

impl ByteRate {
    /// A rate of `bytes_per_second` (0: unlimited).
    pub fn new(bytes_per_second: u64) -> ByteRate {
        ByteRate {
            bytes_per_second,
            paid_until: Mutex::new(None),
        }
    }

    /// Grants `bytes` at `now` and says how long the caller must wait
    /// before sending them.
    pub fn reserve(&self, bytes: u64, now: Instant) -> Duration {
        if self.bytes_per_second == 0 || bytes == 0 {
            return Duration::ZERO;
        }
        // One grant is a chunk; capped all the same, so no size can
        // overflow the clock.
        let cost = Duration::try_from_secs_f64(bytes as f64 / self.bytes_per_second as f64)
            .unwrap_or(GRANT_WAIT_MAX)
            .min(GRANT_WAIT_MAX);
        let mut paid_until = self.paid_until.lock();
        let start = paid_until.map_or(now, |paid| paid.max(now));
        *paid_until = Some(start + cost);
        start.saturating_duration_since(now)
    }

    /// [`Self::reserve`] now, then sleeps the thread for the wait (for
    /// blocking threads only).
    pub fn wait_blocking(&self, bytes: u64) {
        let wait = self.reserve(bytes, Instant::now());
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn grants_follow_the_rate_whoever_asks() {
        let rate = ByteRate::new(10 * MIB);
        let t0 = Instant::now();
        // The first chunk goes at once; each next waits for the ones before.
        assert_eq!(rate.reserve(MIB, t0), Duration::ZERO);
        let second = rate.reserve(MIB, t0);
        assert!((second.as_secs_f64() - 0.1).abs() < 1e-6, "{second:?}");
        // Two senders share the budget: a third chunk waits for both.
        let third = rate.reserve(MIB, t0);
        assert!((third.as_secs_f64() - 0.2).abs() < 1e-6, "{third:?}");
        // 100 MiB in all takes 10 s, whatever the chunking.
        let mut last = Duration::ZERO;
        for _ in 3..100 {
            last = rate.reserve(MIB, t0);
        }
        assert!((last.as_secs_f64() - 9.9).abs() < 1e-3, "{last:?}");
    }

    #[test]
    fn idle_time_saves_no_burst_and_zero_is_unlimited() {
        let rate = ByteRate::new(MIB);
        let t0 = Instant::now();
        assert_eq!(rate.reserve(MIB, t0), Duration::ZERO);
        // An hour later: the first chunk goes at once, the second waits a
        // full second, as if the sender had never been idle.
        let later = t0 + Duration::from_secs(3600);
        assert_eq!(rate.reserve(MIB, later), Duration::ZERO);
        let wait = rate.reserve(MIB, later);
        assert!((wait.as_secs_f64() - 1.0).abs() < 1e-6, "{wait:?}");
        let unlimited = ByteRate::new(0);
        for _ in 0..1000 {
            assert_eq!(unlimited.reserve(u64::MAX, t0), Duration::ZERO);
        }
    }
}
