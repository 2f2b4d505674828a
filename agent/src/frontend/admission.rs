//! Admission control: at most `max_in_flight` requests generate at once, at most
//! `queue_capacity` wait for a slot, and a request waits at most `queue_timeout`.
//!
//! When the queue is full the decision is to reject at once with 429 (and `Retry-After`) rather
//! than grow: memory stays bounded whatever the offered load. A waiting request whose client
//! disconnects leaves the queue as its future is dropped. Slots are handed out in FIFO order
//! (tokio's semaphore is fair).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::api::ApiError;
use crate::metrics::Metrics;

/// The node's request slots and waiting queue.
#[derive(Debug)]
pub struct Admission {
    slots: Arc<Semaphore>,
    waiting: AtomicUsize,
    capacity: usize,
    timeout: Duration,
    retry_after: Duration,
}

/// A request's right to generate; gives the slot back when dropped.
#[derive(Debug)]
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    metrics: Arc<Metrics>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.metrics.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

struct Waiting<'a> {
    admission: &'a Admission,
    metrics: &'a Metrics,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.admission.waiting.fetch_sub(1, Ordering::AcqRel);
        self.metrics.queue_depth.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Admission {
    /// `slots` generating at once, `capacity` waiting.
    pub fn new(slots: usize, capacity: usize, timeout: Duration, retry_after: Duration) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(slots)),
            waiting: AtomicUsize::new(0),
            capacity,
            timeout,
            retry_after,
        }
    }

    /// Requests waiting now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Acquire)
    }

    /// Waits for a slot: 429 when the queue is full, 503 when the wait times out.
    pub async fn admit(&self, metrics: &Arc<Metrics>) -> Result<Slot, ApiError> {
        let slot = |permit| {
            metrics.in_flight.fetch_add(1, Ordering::Relaxed);
            Slot {
                _permit: permit,
                metrics: metrics.clone(),
            }
        };
        if let Ok(permit) = self.slots.clone().try_acquire_owned() {
            return Ok(slot(permit));
        }
        if self.waiting.fetch_add(1, Ordering::AcqRel) >= self.capacity {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            return Err(ApiError::queue_full(self.retry_after));
        }
        metrics.queue_depth.fetch_add(1, Ordering::Relaxed);
        let _waiting = Waiting {
            admission: self,
            metrics,
        };
        match tokio::time::timeout(self.timeout, self.slots.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Ok(slot(permit)),
            Ok(Err(_closed)) => Err(ApiError::unavailable(
                "draining",
                "the server is shutting down",
                self.retry_after,
            )),
            Err(_elapsed) => Err(ApiError::unavailable(
                "queue_timeout",
                format!(
                    "the request waited {}s in the queue without a free slot",
                    self.timeout.as_secs_f64()
                ),
                self.retry_after,
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::StatusCode;

    #[tokio::test(start_paused = true)]
    async fn full_queue_rejects_and_waiting_times_out() {
        let metrics = Arc::new(Metrics::default());
        let admission = Arc::new(Admission::new(
            1,
            1,
            Duration::from_secs(5),
            Duration::from_secs(2),
        ));
        let first = admission.admit(&metrics).await.unwrap();
        // The second waits in the queue.
        let a = admission.clone();
        let m = metrics.clone();
        let second = tokio::spawn(async move { a.admit(&m).await.map(|_| ()) });
        tokio::task::yield_now().await;
        assert_eq!(admission.waiting(), 1);
        // The third finds the queue full.
        let third = admission.admit(&metrics).await.unwrap_err();
        assert_eq!(third.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(third.retry_after, Some(Duration::from_secs(2)));
        // The second times out with 503.
        tokio::time::advance(Duration::from_secs(6)).await;
        let second = second.await.unwrap().unwrap_err();
        assert_eq!(second.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(second.code, "queue_timeout");
        assert_eq!(admission.waiting(), 0);
        assert_eq!(metrics.queue_depth.load(Ordering::Relaxed), 0);
        drop(first);
        assert_eq!(metrics.in_flight.load(Ordering::Relaxed), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_freed_slot_goes_to_the_waiter() {
        let metrics = Arc::new(Metrics::default());
        let admission = Arc::new(Admission::new(
            1,
            4,
            Duration::from_secs(5),
            Duration::from_secs(1),
        ));
        let first = admission.admit(&metrics).await.unwrap();
        let a = admission.clone();
        let m = metrics.clone();
        let second = tokio::spawn(async move { a.admit(&m).await.is_ok() });
        tokio::task::yield_now().await;
        drop(first);
        assert!(second.await.unwrap());
    }
}
