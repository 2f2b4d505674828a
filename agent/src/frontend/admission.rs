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

use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::api::ApiError;

/// The node's request slots and waiting queue.
#[derive(Debug)]
pub struct Admission {
    slots: Arc<Semaphore>,
    waiting: AtomicUsize,
    capacity: usize,
    timeout: Duration,
    retry_after: Duration,
    gauges: Gauges,
}

/// The occupancy the admission keeps current (the frontend's metrics).
#[derive(Debug, Clone, Default)]
pub struct Gauges {
    /// Requests holding a slot.
    pub in_flight: Gauge,
    /// Requests waiting for one.
    pub queue_depth: Gauge,
}

/// A request's right to generate; gives the slot back when dropped.
#[derive(Debug)]
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    in_flight: Gauge,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.in_flight.dec();
    }
}

struct Waiting<'a> {
    admission: &'a Admission,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.admission.waiting.fetch_sub(1, Ordering::AcqRel);
        self.admission.gauges.queue_depth.dec();
    }
}

impl Admission {
    /// `slots` generating at once, `capacity` waiting; occupancy kept in `gauges`.
    pub fn new(
        slots: usize,
        capacity: usize,
        timeout: Duration,
        retry_after: Duration,
        gauges: Gauges,
    ) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(slots)),
            waiting: AtomicUsize::new(0),
            capacity,
            timeout,
            retry_after,
            gauges,
        }
    }

    /// Requests waiting now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Acquire)
    }

    fn slot(&self, permit: OwnedSemaphorePermit) -> Slot {
        self.gauges.in_flight.inc();
        Slot {
            _permit: permit,
            in_flight: self.gauges.in_flight.clone(),
        }
    }

    /// A slot if one is free now, without queueing: 429 otherwise. A free slot is never taken
    /// ahead of a waiting request (the fair semaphore gives freed slots to waiters first).
    pub fn try_admit(&self) -> Result<Slot, ApiError> {
        self.slots
            .clone()
            .try_acquire_owned()
            .map(|permit| self.slot(permit))
            .map_err(|_| ApiError::queue_full(self.retry_after))
    }

    /// Waits for a slot: 429 when the queue is full, 503 when the wait times out.
    pub async fn admit(&self) -> Result<Slot, ApiError> {
        let slot = |permit| self.slot(permit);
        if let Ok(permit) = self.slots.clone().try_acquire_owned() {
            return Ok(slot(permit));
        }
        if self.waiting.fetch_add(1, Ordering::AcqRel) >= self.capacity {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            return Err(ApiError::queue_full(self.retry_after));
        }
        self.gauges.queue_depth.inc();
        let _waiting = Waiting { admission: self };
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
        let gauges = Gauges::default();
        let admission = Arc::new(Admission::new(
            1,
            1,
            Duration::from_secs(5),
            Duration::from_secs(2),
            gauges.clone(),
        ));
        let first = admission.admit().await.unwrap();
        // The second waits in the queue.
        let a = admission.clone();
        let second = tokio::spawn(async move { a.admit().await.map(|_| ()) });
        tokio::task::yield_now().await;
        assert_eq!(admission.waiting(), 1);
        // The third finds the queue full.
        let third = admission.admit().await.unwrap_err();
        assert_eq!(third.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(third.retry_after, Some(Duration::from_secs(2)));
        // The second times out with 503.
        tokio::time::advance(Duration::from_secs(6)).await;
        let second = second.await.unwrap().unwrap_err();
        assert_eq!(second.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(second.code, "queue_timeout");
        assert_eq!(admission.waiting(), 0);
        assert_eq!(gauges.queue_depth.get(), 0);
        drop(first);
        assert_eq!(gauges.in_flight.get(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn try_admit_takes_a_free_slot_and_never_queues() {
        let gauges = Gauges::default();
        let admission = Arc::new(Admission::new(
            1,
            4,
            Duration::from_secs(5),
            Duration::from_secs(1),
            gauges.clone(),
        ));
        let first = admission.try_admit().unwrap();
        assert_eq!(gauges.in_flight.get(), 1);
        // Every slot taken: refused at once, nothing queued.
        let refused = admission.try_admit().unwrap_err();
        assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(admission.waiting(), 0);
        // A queued request gets the freed slot, not a later try.
        let a = admission.clone();
        let waiter = tokio::spawn(async move { a.admit().await.map(|_| ()) });
        tokio::task::yield_now().await;
        drop(first);
        assert!(admission.try_admit().is_err());
        assert!(waiter.await.unwrap().is_ok());
        assert!(admission.try_admit().is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_freed_slot_goes_to_the_waiter() {
        let admission = Arc::new(Admission::new(
            1,
            4,
            Duration::from_secs(5),
            Duration::from_secs(1),
            Gauges::default(),
        ));
        let first = admission.admit().await.unwrap();
        let a = admission.clone();
        let second = tokio::spawn(async move { a.admit().await.is_ok() });
        tokio::task::yield_now().await;
        drop(first);
        assert!(second.await.unwrap());
    }
}
