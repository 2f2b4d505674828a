//! KV-cache-aware routing: an index of which workers hold which block-hash chains, and the
//! choice of worker for each request.
//!
//! Pure logic: no tokio, sockets, files or clocks; time is a `Duration` since an arbitrary
//! epoch, passed by the caller (the agent with its clock, the simulator with a virtual one).
//! The driver feeds a [`Router`] four kinds of input and asks one question:
//!
//! - workers joining and leaving ([`Router::add_worker`], [`Router::remove_worker`]);
//! - KV events ([`Router::apply`]), validated per worker (unknown worker, duplicate, out of
//!   order, gap, broken hash chain — see [`EventError`]) and counted ([`EventCounters`]);
//!   a gap means "re-sync this worker" via [`Router::restore_worker`] from a [`WorkerSnapshot`];
//! - load reports that workers publish ([`Router::apply_load`]), blended with the router's own
//!   decisions made since ([`load`]);
//! - requests ending ([`Router::finished`], optionally [`Router::prefill_done`]);
//! - and: where should this request go? ([`Router::select`] → [`Decision`] or [`RouteError`]),
//!   or just: how much of this prompt does each worker hold? ([`Router::overlaps`]);
//! - for a model served disaggregated, also: is the prompt prefilled on a prefill worker, and
//!   which? ([`choose_prefill`], in [`disagg`]).
//!
//! Selection in `kv` mode (the default) minimises predicted time ([`cost`]): for each candidate,
//! its prefill queue at its profile's rate, the prefill of the part of the prompt it does not
//! cache (non-linear in length, from its [`kvfleet_proto::profile::PerfProfile`]), onboarding of
//! prefix blocks it holds in lower tiers, decode steps interleaved with that prefill, a wait for
//! KV memory when it is full, and — weighted by [`RouterConfig::itl_weight`] — the delay the
//! request adds to the streams already decoding there. Candidates within a small margin of the
//! cheapest tie, and ties are spread by rendezvous hashing on the prompt's first block (a cold
//! request first goes where it displaces the fewest cached blocks), so no worker becomes the
//! sink for cold requests, a hot prefix spills to a second worker when its holder's queue makes
//! that faster and comes back when it cools. A prompt being computed counts as held by its
//! worker from the decision on. Every decision's predicted TTFT is checked against the actual
//! one ([`Router::prefill_done`], [`prediction`]) and teaches each worker's correction factor.
//!
//! `kv-blocks` mode keeps Dynamo's block cost for comparison:
//! `overlap_weight × new_prefill_blocks + active_decode_blocks
//!  + prefill_queue_weight × queued_prefill_blocks + queue_depth_weight × queue_depth`,
//! where `new_prefill_blocks` is the request's blocks minus the (tier-weighted) length of the
//! longest prefix the worker already holds; ties go to the less loaded worker, then the lower
//! id. A positive temperature samples from a softmax instead. See [`RoutingMode`] for the other
//! modes. The index itself is in [`index`]; its memory layout is described there.
//!
//! ```
//! use std::time::Duration;
//! use kvfleet_kv_router::*;
//! use kvfleet_proto::hash::{block_hashes, BlockSize};
//! use kvfleet_proto::{KvEvent, KvEventData, Tier, WorkerId};
//!
//! let mut router = Router::new(RouterConfig::default());
//! for id in [1, 2] {
//!     router.add_worker(WorkerId(id), WorkerCapacity { kv_blocks: 4096, max_queue_depth: None })?;
//! }
//! // Worker 2's engine reports that it cached the first two blocks of a prompt.
//! let tokens: Vec<u32> = (0..40).collect();
//! let blocks = block_hashes(&tokens, BlockSize::default());
//! let event = KvEvent {
//!     worker: WorkerId(2),
//!     event_id: 0,
//!     tier: Tier::G1,
//!     data: KvEventData::Stored { parent: None, blocks: blocks.clone() },
//! };
//! router.apply(&event, Duration::from_millis(5))?;
//! // A request with the same prompt goes where its prefix is cached.
//! let hashes: Vec<_> = blocks.iter().map(|b| b.sequence).collect();
//! let request = RouteRequest::new(RequestId(7), &hashes, tokens.len() as u32);
//! let decision = router.select(&request, Duration::from_millis(6))?;
//! assert_eq!((decision.worker, decision.overlap_blocks), (WorkerId(2), 2));
//! // The worker's published load replaces the router's own estimate for older decisions.
//! router.apply_load(WorkerId(2), WorkerLoad { prefill_tokens: 8, decode_blocks: 3, queue_depth: 0 },
//!     Duration::from_millis(50))?;
//! assert_eq!(router.finished(RequestId(7), Duration::from_secs(2)), Some(WorkerId(2)));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod config;
pub mod cost;
pub mod disagg;
pub mod error;
pub mod index;
pub mod load;
pub mod prediction;
pub mod router;
pub mod snapshot;

use std::fmt;

use serde::{Deserialize, Serialize};

pub use config::{RouterConfig, RoutingMode, UnknownMode};
pub use cost::{TimeCost, TimeModel};
pub use disagg::{PrefillChoice, PrefillDecision, choose_prefill};
pub use error::{EventCounters, EventError, RouteCounters, RouteError};
pub use index::IndexStats;
pub use load::{WorkerCapacity, WorkerLoad};
pub use prediction::{PredictionErrors, PredictionSummary};
pub use router::{
    CandidateCost, Decision, RouteRequest, Router, SetProfileError, TooManyWorkers, UnknownWorker,
};
pub use snapshot::{IndexSnapshot, RestoreReport, TierBlocks, WorkerSnapshot};

/// A request's id, unique among requests in flight. 128 bits so a driver can use a UUID's
/// value (`Uuid::as_u128`) directly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RequestId(pub u128);

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

/// SplitMix64's output function: a cheap, well-mixed bijection on u64 (rendezvous scores).
pub(crate) const fn mix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// SplitMix64: a tiny seeded generator, enough for softmax sampling and `random` mode, and
/// deterministic across platforms so simulations replay exactly.
#[derive(Debug, Clone)]
pub(crate) struct SplitMix64(u64);

impl SplitMix64 {
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        let z = self.0;
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix64(z)
    }

    /// Uniform in [0, 1).
    pub(crate) fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in `0..n` (`n > 0`); the modulo bias is below 2^-40 for any realistic `n`.
    pub(crate) fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}
