//! Admission control: a node bounds the work it has in flight, and refuses
//! more with `RESOURCE_EXHAUSTED` and a retry hint instead of queueing it.
//!
//! Without a bound, an overloaded node accepts everything, its queues (Raft
//! proposals, peer calls, the blocking pool) grow, every request slows down
//! until commits miss their deadlines, and clients retry into a deeper
//! queue. With it, work beyond the bound waits for a slot and is then
//! refused: the client backs off (quiverctl does, for the time the hint
//! says) and the requests that were admitted keep their latency.
//!
//! How long a request may wait is CoDel's rule, as Facebook's servers use it
//! ("Fail at scale", 2015): a queue that empties now and then is a burst,
//! and a request waits up to `admission_wait_ms` for a slot. A queue that
//! has not emptied (no request found a free slot) for more than
//! `admission_queue_interval_ms` is standing: the node is past its capacity.
//! Then a request waits at most `admission_queue_target_ms` before it is
//! refused, until a request finds a free slot again. Under overload,
//! admitted requests queue for milliseconds, not for the whole wait, and
//! the rest are refused after the target.
//!
//! Writes yield to reads, the serving tier's critical path: while the read
//! queue is standing, writes are refused at once (a materialization job
//! retries; a model server waits on its read). Heartbeats and votes never
//! pass here: they travel on the peer port.
//!
//! Writes are counted in rows (a 10,000-row batch is not one unit of work),
//! reads in requests. Tokio's semaphore is fair, so a large write waits its
//! turn rather than being starved by small ones.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::config::Limits;
use crate::error::ServiceError;

/// One gate: its slots, and since when its queue has been long.
#[derive(Debug)]
struct Gate {
    slots: Arc<Semaphore>,
    /// Since when requests have found no free slot, without one finding a
    /// free slot since (CoDel's first-above time); `None`: the queue is
    /// short.
    above_since: Mutex<Option<Instant>>,
    /// The gate's name in metrics.
    name: &'static str,
}

impl Gate {
    fn new(slots: usize, name: &'static str) -> Gate {
        Gate {
            slots: Arc::new(Semaphore::new(slots.min(Semaphore::MAX_PERMITS))),
            above_since: Mutex::new(None),
            name,
        }
    }

    /// Full, and long for more than an interval.
    fn standing(&self, now: Instant, interval: Duration) -> bool {
        self.slots.available_permits() == 0
            && self
                .above_since
                .lock()
                .is_some_and(|since| now.saturating_duration_since(since) > interval)
    }

    /// A request found no free slot at `now`.
    fn queued(&self, now: Instant) {
        self.above_since.lock().get_or_insert(now);
    }

    /// A request found a free slot: the queue is empty.
    fn short(&self) {
        *self.above_since.lock() = None;
    }
}

/// The node's admission gates.
#[derive(Debug)]
pub struct Admission {
    write_rows: Gate,
    write_rows_max: u32,
    reads: Gate,
    wait: Duration,
    target: Duration,
    interval: Duration,
}

/// Held while an admitted request runs; its slots free when dropped.
#[derive(Debug)]
pub struct Admitted {
    _permit: OwnedSemaphorePermit,
}

/// Why a request was refused (a metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    /// It waited `admission_wait_ms` for a slot.
    WaitPassed,
    /// The queue was standing: it waited the target.
    StandingQueue,
    /// A write, while reads queue.
    ReadsFirst,
}

impl Refusal {
    fn label(self) -> &'static str {
        match self {
            Refusal::WaitPassed => "wait_passed",
            Refusal::StandingQueue => "standing_queue",
            Refusal::ReadsFirst => "reads_first",
        }
    }
}

impl Admission {
    /// Gates sized by the limits.
    pub fn new(limits: &Limits) -> Self {
        let write_rows_max = u32::try_from(limits.write_inflight_rows_max).unwrap_or(u32::MAX);
        let reads_max = usize::try_from(limits.read_inflight_requests_max).unwrap_or(usize::MAX);
        Self {
            write_rows: Gate::new(write_rows_max as usize, "write_rows"),
            write_rows_max,
            reads: Gate::new(reads_max, "reads"),
            wait: Duration::from_millis(limits.admission_wait_ms),
            // A standing queue never waits longer than a burst.
            target: Duration::from_millis(
                limits
                    .admission_queue_target_ms
                    .min(limits.admission_wait_ms),
            ),
            interval: Duration::from_millis(limits.admission_queue_interval_ms),
        }
    }

    /// Admits a write of `rows` rows, or refuses it: at once while reads
    /// queue, else after its wait.
    pub async fn write(&self, rows: usize) -> Result<Admitted, ServiceError> {
        // A batch larger than the whole budget waits for all of it.
        let slots = u32::try_from(rows.max(1))
            .unwrap_or(u32::MAX)
            .min(self.write_rows_max);
        let what = "rows being written";
        let limit_name = "limits.write_inflight_rows_max";
        if self.reads_standing(Instant::now()) {
            return Err(self.refuse(&self.write_rows, Refusal::ReadsFirst, what, limit_name));
        }
        self.admit(&self.write_rows, slots, what, limit_name).await
    }

    /// Admits a read, or refuses it after its wait.
    pub async fn read(&self) -> Result<Admitted, ServiceError> {
        self.admit(
            &self.reads,
            1,
            "reads in flight",
            "limits.read_inflight_requests_max",
        )
        .await
    }

    async fn admit(
        &self,
        gate: &Gate,
        slots: u32,
        what: &'static str,
        limit_name: &'static str,
    ) -> Result<Admitted, ServiceError> {
        let arrived = Instant::now();
        if let Ok(permit) = gate.slots.clone().try_acquire_many_owned(slots) {
            gate.short();
            return Ok(Admitted { _permit: permit });
        }
        gate.queued(arrived);
        let (wait, refusal) = self.wait_at(gate, arrived);
        match tokio::time::timeout(wait, gate.slots.clone().acquire_many_owned(slots)).await {
            // A waiter admitted within the target does not end a standing
            // queue (while it stands, every waiter is): only a request that
            // finds a free slot, the queue empty, does.
            Ok(Ok(permit)) => Ok(Admitted { _permit: permit }),
            // The semaphore is never closed; treat it as overload if it were.
            Ok(Err(_)) | Err(_) => Err(self.refuse(gate, refusal, what, limit_name)),
        }
    }

    /// How long a request that found no free slot at `now` may wait, and
    /// why it is refused if that passes.
    fn wait_at(&self, gate: &Gate, now: Instant) -> (Duration, Refusal) {
        if gate.standing(now, self.interval) {
            (self.target, Refusal::StandingQueue)
        } else {
            (self.wait, Refusal::WaitPassed)
        }
    }

    /// Whether the read queue stands at `now` (writes then yield).
    fn reads_standing(&self, now: Instant) -> bool {
        self.reads.standing(now, self.interval)
    }

    fn refuse(
        &self,
        gate: &Gate,
        refusal: Refusal,
        what: &'static str,
        limit_name: &'static str,
    ) -> ServiceError {
        metrics::counter!(
            "quiver_admission_refused_total",
            "gate" => gate.name,
            "reason" => refusal.label()
        )
        .increment(1);
        ServiceError::Overloaded {
            what,
            limit_name,
            retry_after_ms: self.retry_after_ms(),
        }
    }

    /// How long a refused client should wait before retrying: long enough
    /// for the admitted work to drain a little, short enough to keep a
    /// pipeline fed.
    fn retry_after_ms(&self) -> u64 {
        u64::try_from(self.wait.as_millis())
            .unwrap_or(u64::MAX)
            .clamp(50, 1_000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(rows: u64, reads: u64) -> Limits {
        Limits {
            write_inflight_rows_max: rows,
            read_inflight_requests_max: reads,
            admission_wait_ms: 20,
            admission_queue_target_ms: 5,
            ..Limits::default()
        }
    }

    /// Takes every slot of `gate`.
    fn fill(gate: &Gate) -> OwnedSemaphorePermit {
        let slots = u32::try_from(gate.slots.available_permits()).unwrap();
        gate.slots.clone().try_acquire_many_owned(slots).unwrap()
    }

    /// The rule, with time passed in: a full queue that has been long for
    /// less than an interval lets a request wait the whole wait; one long
    /// for more lets it wait only the target, and refuses writes at once;
    /// a request that finds a free slot ends that.
    #[test]
    fn a_full_queue_long_for_an_interval_is_standing_until_one_is_admitted_quickly() {
        let admission = Admission::new(&Limits {
            admission_wait_ms: 200,
            admission_queue_target_ms: 10,
            admission_queue_interval_ms: 100,
            ..limits(100, 2)
        });
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        // Idle for long: nothing stands.
        assert!(!admission.reads_standing(at(10_000)));
        let full = fill(&admission.reads);
        assert!(
            !admission.reads_standing(at(10_000)),
            "full, but never long"
        );
        admission.reads.queued(start);
        assert_eq!(
            admission.wait_at(&admission.reads, at(100)),
            (Duration::from_millis(200), Refusal::WaitPassed),
            "long for one interval: still a burst"
        );
        assert!(!admission.reads_standing(at(100)));
        // Later requests that queue do not move its start.
        admission.reads.queued(at(90));
        assert_eq!(
            admission.wait_at(&admission.reads, at(101)),
            (Duration::from_millis(10), Refusal::StandingQueue),
            "long for more than an interval: standing"
        );
        assert!(admission.reads_standing(at(101)), "writes are refused");
        assert_eq!(
            admission.wait_at(&admission.write_rows, at(101)).1,
            Refusal::WaitPassed,
            "the write gate's own queue is short"
        );
        // A free slot: not standing (the next read gets it at once).
        drop(full);
        assert!(!admission.reads_standing(at(101)));
        let full = fill(&admission.reads);
        assert!(admission.reads_standing(at(101)));
        // A read that finds a free slot: short again.
        admission.reads.short();
        assert!(!admission.reads_standing(at(500)));
        admission.reads.queued(at(500));
        assert!(!admission.reads_standing(at(600)));
        assert!(admission.reads_standing(at(601)));
        drop(full);
    }

    /// On the real clock: a write is refused at once while the read queue
    /// stands, a read waits only the target, and one queued before it stood
    /// keeps its whole wait.
    #[tokio::test]
    async fn while_reads_queue_a_write_is_refused_at_once_and_a_read_waits_the_target() {
        let admission = Arc::new(Admission::new(&Limits {
            admission_wait_ms: 10_000,
            admission_queue_target_ms: 20,
            admission_queue_interval_ms: 100,
            ..limits(100, 1)
        }));
        let held = admission.read().await.unwrap();
        let queued = {
            let admission = admission.clone();
            tokio::spawn(async move { admission.read().await.map(drop) })
        };
        // Full, and nobody admitted quickly since the read above queued.
        tokio::time::sleep(Duration::from_millis(150)).await;
        let asked = Instant::now();
        let refused = admission.write(1).await.unwrap_err();
        assert!(matches!(refused, ServiceError::Overloaded { .. }));
        assert!(asked.elapsed() < Duration::from_secs(5), "refused at once");
        let asked = Instant::now();
        assert!(admission.read().await.is_err());
        let waited = asked.elapsed();
        assert!(
            waited >= Duration::from_millis(20) && waited < Duration::from_secs(5),
            "waited the target, not the whole wait: {waited:?}"
        );
        drop(held);
        assert!(queued.await.unwrap().is_ok(), "it kept its whole wait");
        // Free slots: writes go, a read is admitted at once.
        assert!(admission.write(1).await.is_ok());
        let _read = admission.read().await.unwrap();
    }

    #[tokio::test]
    async fn work_beyond_the_bound_is_refused_with_a_hint_and_admitted_once_slots_free() {
        let admission = Admission::new(&limits(100, 1));
        let first = admission.write(60).await.unwrap();
        let refused = admission.write(60).await.unwrap_err();
        assert!(
            matches!(
                refused,
                ServiceError::Overloaded {
                    limit_name: "limits.write_inflight_rows_max",
                    retry_after_ms: 50,
                    ..
                }
            ),
            "{refused:?}"
        );
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        // Rows are counted, not requests: a small write still fits.
        let small = admission.write(40).await.unwrap();
        drop(first);
        drop(small);
        // A batch larger than the whole budget is admitted alone.
        let _whole = admission.write(1_000).await.unwrap();
        assert!(admission.write(1).await.is_err());

        let read = admission.read().await.unwrap();
        assert!(admission.read().await.is_err());
        drop(read);
        assert!(admission.read().await.is_ok());
    }

    #[tokio::test]
    async fn a_waiting_request_is_admitted_when_a_slot_frees_within_the_wait() {
        let admission = Arc::new(Admission::new(&Limits {
            admission_wait_ms: 5_000,
            ..limits(10, 1)
        }));
        let held = admission.write(10).await.unwrap();
        let waiter = {
            let admission = admission.clone();
            tokio::spawn(async move { admission.write(5).await.map(|_| ()) })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(held);
        assert!(waiter.await.unwrap().is_ok());
    }
}
