//! Time sources. Everything that depends on "now" (ttl at read, ttl in
//! compaction, timestamp sanity checks) takes a [`Clock`], so tests drive time
//! with a [`ManualClock`] instead of sleeping.

use std::fmt::Debug;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// A source of wall-clock time in microseconds since the Unix epoch.
pub trait Clock: Send + Sync + Debug {
    /// Now, in microseconds since the Unix epoch.
    fn now_us(&self) -> i64;
}

/// The system's wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_us(&self) -> i64 {
        // A clock before 1970 is a broken machine; report the epoch rather than panic.
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
            .unwrap_or(0)
    }
}

/// Largest skew a [`SkewedClock`] applies: a day.
pub const CLOCK_SKEW_US_MAX: i64 = 86_400 * 1_000_000;

/// The system clock moved by an offset (µs, a decimal integer) read from a
/// file every 50 ms: how fault tests make one node's wall clock jump while
/// the process runs (monotonic time, which leases and timeouts use, is not
/// moved, as a real wall-clock step does not move it). A missing or
/// unreadable file means no offset; the offset is clamped to
/// [`CLOCK_SKEW_US_MAX`] either way.
#[derive(Debug)]
pub struct SkewedClock {
    offset_us: std::sync::Arc<AtomicI64>,
}

impl SkewedClock {
    /// A clock following the offset in `path`; its watcher thread ends when
    /// the clock is dropped.
    pub fn watching(path: std::path::PathBuf) -> Self {
        let offset_us = std::sync::Arc::new(AtomicI64::new(read_skew(&path)));
        let watched = std::sync::Arc::downgrade(&offset_us);
        // No watcher thread (the system refused one): the offset stays as
        // read at start.
        let _ = std::thread::Builder::new()
            .name("clock-skew".into())
            .spawn(move || {
                while let Some(offset) = watched.upgrade() {
                    offset.store(read_skew(&path), Ordering::SeqCst);
                    drop(offset);
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
            });
        Self { offset_us }
    }
}

fn read_skew(path: &std::path::Path) -> i64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|text| text.trim().parse::<i64>().ok())
        .unwrap_or(0)
        .clamp(-CLOCK_SKEW_US_MAX, CLOCK_SKEW_US_MAX)
}

impl Clock for SkewedClock {
    fn now_us(&self) -> i64 {
        SystemClock
            .now_us()
            .saturating_add(self.offset_us.load(Ordering::SeqCst))
    }
}

/// A clock that moves only when told to: for tests of ttl logic.
#[derive(Debug, Default)]
pub struct ManualClock {
    now_us: AtomicI64,
}

impl ManualClock {
    /// A clock standing at `now_us`.
    pub fn new(now_us: i64) -> Self {
        Self {
            now_us: AtomicI64::new(now_us),
        }
    }

    /// Moves the clock forward by `delta_us` (or back, if negative).
    pub fn advance_us(&self, delta_us: i64) {
        self.now_us.fetch_add(delta_us, Ordering::SeqCst);
    }

    /// Sets the clock to `now_us`.
    pub fn set_us(&self, now_us: i64) {
        self.now_us.store(now_us, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_us(&self) -> i64 {
        self.now_us.load(Ordering::SeqCst)
    }
}

/// Microseconds in one second.
pub const MICROS_PER_SECOND: i64 = 1_000_000;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_skewed_clock_follows_its_file_within_bounds() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("skew");
        std::fs::write(&path, "3600000000").unwrap();
        let clock = SkewedClock::watching(path.clone());
        let ahead = clock.now_us() - SystemClock.now_us();
        assert!((3_599_000_000..=3_601_000_000).contains(&ahead), "{ahead}");
        std::fs::write(&path, "-99999999999999999").unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let behind = SystemClock.now_us() - clock.now_us();
            if (CLOCK_SKEW_US_MAX - 1_000_000..=CLOCK_SKEW_US_MAX + 1_000_000).contains(&behind) {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "clamped: {behind}");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        std::fs::write(&path, "not a number").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert!((clock.now_us() - SystemClock.now_us()).abs() < 1_000_000);
    }
}
