//! What can go wrong when applying events or routing, and the counters that make it visible.

use kvfleet_proto::WorkerId;
use serde::{Deserialize, Serialize};

/// Why a KV event was not (fully) taken in. Each variant is counted in [`EventCounters`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    /// The worker is not registered ([`crate::Router::add_worker`]); the event was dropped.
    #[error("KV event {event_id} from unknown worker {worker}: dropped")]
    UnknownWorker {
        /// The worker named by the event.
        worker: WorkerId,
        /// The event's id.
        event_id: u64,
    },
    /// The most recently applied event arrived again (a redelivery); it was dropped.
    #[error("duplicate KV event {event_id} from worker {worker}: already applied, dropped")]
    Duplicate {
        /// The worker.
        worker: WorkerId,
        /// The repeated id.
        event_id: u64,
    },
    /// An event older than the most recently applied one arrived; it was dropped.
    #[error("out-of-order KV event {event_id} from worker {worker}: expected {expected}, dropped")]
    OutOfOrder {
        /// The worker.
        worker: WorkerId,
        /// The stale id.
        event_id: u64,
        /// The id the router expected next.
        expected: u64,
    },
    /// Events `expected..got` never arrived. The event `got` *was applied* (it is still the
    /// best information there is), but the worker's index may be missing blocks or hold evicted
    /// ones: re-sync it with [`crate::Router::restore_worker`] from a snapshot.
    #[error(
        "gap in KV events from worker {worker}: expected {expected}, got {got}; applied, but \
         re-sync this worker from a snapshot"
    )]
    Gap {
        /// The worker.
        worker: WorkerId,
        /// The id the router expected.
        expected: u64,
        /// The id that arrived (and was applied).
        got: u64,
    },
    /// A `Stored` event whose blocks do not chain: the engine hashes differently from
    /// `kvfleet_proto::hash`, so none of its blocks could ever match a request. Dropped (the
    /// event id still counts as received).
    #[error(
        "KV event {event_id} from worker {worker}: block {position} does not chain onto its \
         parent (engine and router disagree on block hashing); dropped"
    )]
    BrokenChain {
        /// The worker.
        worker: WorkerId,
        /// The event's id.
        event_id: u64,
        /// Index into the event's `blocks` of the first block that does not chain.
        position: usize,
    },
}

impl EventError {
    /// Whether the event's change reached the index despite the error (only for [`Self::Gap`]).
    pub const fn applied(&self) -> bool {
        matches!(self, EventError::Gap { .. })
    }

    /// The worker the event came from.
    pub const fn worker(&self) -> WorkerId {
        match self {
            EventError::UnknownWorker { worker, .. }
            | EventError::Duplicate { worker, .. }
            | EventError::OutOfOrder { worker, .. }
            | EventError::Gap { worker, .. }
            | EventError::BrokenChain { worker, .. } => *worker,
        }
    }
}

/// Why no worker was chosen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// No registered worker is among the candidates (or none is registered at all).
    #[error("no worker is available for this request")]
    NoWorkers,
    /// Every candidate is at capacity; the frontend should answer 429 / retry later.
    #[error("all {candidates} candidate workers are overloaded")]
    Overloaded {
        /// How many candidates were considered.
        candidates: usize,
    },
    /// A request with this id is already in flight (ids must be unique until `finished`).
    #[error("request {0} is already in flight")]
    DuplicateRequest(crate::RequestId),
}

/// Running totals of what happened to events and requests, for Prometheus counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct EventCounters {
    /// Events applied in order.
    pub applied: u64,
    /// Events from unregistered workers.
    pub unknown_worker: u64,
    /// Redelivered events.
    pub duplicate: u64,
    /// Stale events.
    pub out_of_order: u64,
    /// Gaps detected (each also counts its event in `applied`).
    pub gaps: u64,
    /// `Stored` events whose blocks did not chain.
    pub broken_chain: u64,
}

/// Running totals of routing outcomes, for Prometheus counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct RouteCounters {
    /// Requests routed.
    pub routed: u64,
    /// Requests refused with [`RouteError::NoWorkers`].
    pub no_workers: u64,
    /// Requests refused with [`RouteError::Overloaded`].
    pub overloaded: u64,
    /// Own decisions dropped by [`crate::RouterConfig::inflight_timeout`] rather than `finished`.
    pub timed_out: u64,
    /// Blocks routed that were already cached on the chosen worker (sum of overlaps).
    pub hit_blocks: u64,
    /// Full blocks routed (sum of request hash counts): `hit_blocks / blocks` is the hit rate.
    pub blocks: u64,
}
