//! Admission control: a node bounds the work it has in flight, and refuses
//! more with `RESOURCE_EXHAUSTED` and a retry hint instead of queueing it.
//!
//! Without a bound, an overloaded node accepts everything, its queues (Raft
//! proposals, peer calls, the blocking pool) grow, every request slows down
//! until commits miss their deadlines, and clients retry into a deeper
//! queue. With it, work beyond the bound waits at most
//! `limits.admission_wait_ms` for a slot and is then refused at once: the
//! client backs off (quiverctl does, for the time the hint says) and the
//! requests that were admitted keep their latency.
//!
//! Writes are counted in rows (a 10,000-row batch is not one unit of work),
//! reads in requests. Tokio's semaphore is fair, so a large write waits its
//! turn rather than being starved by small ones.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::Limits;
use crate::error::ServiceError;

/// The node's admission gates.
#[derive(Debug)]
pub struct Admission {
    write_rows: Arc<Semaphore>,
    write_rows_max: u32,
    reads: Arc<Semaphore>,
    wait: Duration,
}

/// Held while an admitted request runs; its slots free when dropped.
#[derive(Debug)]
pub struct Admitted {
    _permit: OwnedSemaphorePermit,
}

impl Admission {
    /// Gates sized by the limits.
    pub fn new(limits: &Limits) -> Self {
        let write_rows_max = u32::try_from(limits.write_inflight_rows_max).unwrap_or(u32::MAX);
        let reads_max = usize::try_from(limits.read_inflight_requests_max).unwrap_or(usize::MAX);
        Self {
            write_rows: Arc::new(Semaphore::new(write_rows_max as usize)),
            write_rows_max,
            reads: Arc::new(Semaphore::new(reads_max.min(Semaphore::MAX_PERMITS))),
            wait: Duration::from_millis(limits.admission_wait_ms),
        }
    }

    /// Admits a write of `rows` rows, or refuses it after the wait.
    pub async fn write(&self, rows: usize) -> Result<Admitted, ServiceError> {
        // A batch larger than the whole budget waits for all of it.
        let slots = u32::try_from(rows.max(1))
            .unwrap_or(u32::MAX)
            .min(self.write_rows_max);
        self.admit(
            self.write_rows.clone().acquire_many_owned(slots),
            "rows being written",
            "limits.write_inflight_rows_max",
        )
        .await
    }

    /// Admits a read, or refuses it after the wait.
    pub async fn read(&self) -> Result<Admitted, ServiceError> {
        self.admit(
            self.reads.clone().acquire_owned(),
            "reads in flight",
            "limits.read_inflight_requests_max",
        )
        .await
    }

    async fn admit(
        &self,
        acquire: impl Future<Output = Result<OwnedSemaphorePermit, tokio::sync::AcquireError>>,
        what: &'static str,
        limit_name: &'static str,
    ) -> Result<Admitted, ServiceError> {
        let overloaded = || ServiceError::Overloaded {
            what,
            limit_name,
            retry_after_ms: self.retry_after_ms(),
        };
        match tokio::time::timeout(self.wait, acquire).await {
            Ok(Ok(permit)) => Ok(Admitted { _permit: permit }),
            // The semaphore is never closed; treat it as overload if it were.
            Ok(Err(_)) | Err(_) => Err(overloaded()),
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
            ..Limits::default()
        }
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
