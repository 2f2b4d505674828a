//! The router: workers, event validation, load accounting and worker selection around the
//! block index ([`crate::index`]).
//!
//! Everything here is driven by the caller: events, load reports, requests and their ends come
//! in as method calls with the current time; the router keeps no clock and spawns nothing. Time
//! based expiry (own decisions past [`RouterConfig::inflight_timeout`], predictions past
//! [`RouterConfig::approx_ttl`]) happens lazily at the start of each call that takes `now`.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use kvfleet_proto::hash::chain;
use kvfleet_proto::profile::{PerfProfile, ProfileError};
use kvfleet_proto::{KvEvent, KvEventData, SequenceHash, Tier, WorkerId};
use serde::{Deserialize, Serialize};

use crate::config::{RouterConfig, RoutingMode};
use crate::cost::{Candidate, PrefillMemo, Shape, TimeCost, TimeModel};
use crate::error::{EventCounters, EventError, RouteCounters, RouteError};
use crate::index::{
    BlockIndex, Held, IndexStats, KeyedBuild, MAX_SLOTS, Scratch, tier_bit, tier_index,
};
use crate::load::{Contribution, LoadState, WorkerCapacity, WorkerLoad};
use crate::prediction::{Correction, PredictionErrors};
use crate::snapshot::{IndexSnapshot, RestoreReport, TierBlocks, WorkerSnapshot};
use crate::{RequestId, SplitMix64, mix64};

/// The router's maps are keyed with its seed rather than `RandomState`: no OS entropy in a pure
/// crate, the same layout on every replay, and a cheaper hash for integer keys.
type Map<K, V> = HashMap<K, V, KeyedBuild>;

/// One request to place.
#[derive(Debug, Clone, Copy)]
pub struct RouteRequest<'a> {
    /// Unique while the request is in flight; [`Router::finished`] takes the same id.
    pub id: RequestId,
    /// The prompt's block sequence hashes (`kvfleet_proto::hash::sequence_hashes`).
    pub hashes: &'a [SequenceHash],
    /// Prompt length in tokens (including a trailing partial block the hashes leave out).
    pub prompt_tokens: u32,
    /// The workers that may serve it (those serving the model, in the right role); `None` for
    /// every registered worker. Unknown ids are ignored.
    pub candidates: Option<&'a [WorkerId]>,
    /// Output tokens it is expected to generate (its `max_tokens`, or a better guess); `None`
    /// for [`RouterConfig::default_output_tokens`]. Sizes the decode slowdown it causes.
    pub output_tokens: Option<u32>,
}

impl<'a> RouteRequest<'a> {
    /// A request any registered worker may serve.
    pub fn new(id: RequestId, hashes: &'a [SequenceHash], prompt_tokens: u32) -> Self {
        Self {
            id,
            hashes,
            prompt_tokens,
            candidates: None,
            output_tokens: None,
        }
    }

    /// Says how many output tokens the request is expected to generate.
    pub fn with_output_tokens(mut self, tokens: u32) -> Self {
        self.output_tokens = Some(tokens);
        self
    }

    /// Restricts the request to `candidates`.
    pub fn with_candidates(mut self, candidates: &'a [WorkerId]) -> Self {
        self.candidates = Some(candidates);
        self
    }
}

/// Why a candidate cost what it did. In `kv` (and `approximate`) mode the cost is the predicted
/// time in `time` (ms, see [`crate::cost`]); in `kv-blocks` mode it is
/// `overlap_weight × new_prefill_blocks + active_decode_blocks
///  + prefill_queue_weight × queued_prefill_blocks + queue_depth_weight × queue_depth`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CandidateCost {
    /// The candidate.
    pub worker: WorkerId,
    /// Leading blocks of the request it holds in some tier.
    pub overlap_blocks: u32,
    /// `overlap_blocks` weighted by the tier each block is in ([`RouterConfig::tier_weights`]).
    pub cached_blocks: f64,
    /// Blocks it would have to compute: the request's blocks minus `cached_blocks`.
    pub new_prefill_blocks: f64,
    /// Other requests' prefill already queued on it, in blocks.
    pub queued_prefill_blocks: f64,
    /// Blocks held by its running requests.
    pub active_decode_blocks: u64,
    /// Requests waiting in its queue (from its last load report).
    pub queue_depth: u32,
    /// The predicted time terms (time-based modes: every candidate; other modes: the chosen
    /// worker only).
    pub time: Option<TimeCost>,
    /// The total; the lowest wins.
    pub cost: f64,
    /// Left out of the choice because it is at capacity.
    pub overloaded: bool,
}

impl CandidateCost {
    /// The load that breaks cost ties and drives `least-loaded` mode, in blocks.
    pub fn load(&self) -> f64 {
        self.active_decode_blocks as f64 + self.queued_prefill_blocks + f64::from(self.queue_depth)
    }
}

/// Where a request goes and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    /// The request.
    pub request: RequestId,
    /// The chosen worker.
    pub worker: WorkerId,
    /// The mode that chose it.
    pub mode: RoutingMode,
    /// Leading blocks of the prompt the chosen worker already holds.
    pub overlap_blocks: u32,
    /// Blocks the prompt occupies (full and partial).
    pub request_blocks: u32,
    /// The time to first token the router predicts on the chosen worker, ms (in every mode:
    /// it is checked against the actual one, see [`Router::prediction_errors`]).
    pub predicted_ttft_ms: f64,
    /// Cost breakdowns, cheapest first, at most [`RouterConfig::breakdown_limit`] of them; the
    /// chosen worker is always among them.
    pub candidates: Vec<CandidateCost>,
}

/// How much of a prompt one worker already holds (see [`Router::overlaps`]).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Overlap {
    /// The worker.
    pub worker: WorkerId,
    /// Leading blocks of the prompt it holds, in any tier.
    pub blocks: u32,
    /// Those blocks weighted by the tier each is in ([`RouterConfig::tier_weights`]).
    pub cached_blocks: f64,
}

/// [`Router::add_worker`] was asked for more workers than the index can name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot add worker {0}: the router already tracks the maximum of {max} workers", max = MAX_SLOTS)]
pub struct TooManyWorkers(pub WorkerId);

/// A worker id that is not registered with the router.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("worker {0} is not registered with this router")]
pub struct UnknownWorker(pub WorkerId);

/// Why [`Router::set_profile`] refused a profile.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SetProfileError {
    /// The worker is not registered.
    #[error(transparent)]
    UnknownWorker(#[from] UnknownWorker),
    /// The profile is invalid or does not fit the router.
    #[error(transparent)]
    Profile(#[from] ProfileError),
}

#[derive(Debug)]
struct Worker {
    id: WorkerId,
    capacity: WorkerCapacity,
    next_event_id: u64,
    load: LoadState,
    /// Its performance profile; `None` for the router's default.
    model: Option<Arc<TimeModel>>,
    /// The learned factor on its predicted compute times.
    correction: Correction,
    /// Exponential average of its requests' first-to-last-token time, ms.
    decode_time_ms: Option<f64>,
    /// Own decisions in flight on it, and the blocks their prompts occupy.
    own_requests: u32,
    own_blocks: u64,
    /// The prefill step an own decision started on it when nothing was queued there: when it
    /// is predicted to end, the prompt tokens it computes ([`crate::cost`]'s `busy`), and the
    /// request (whose first token ends it early).
    prefill_step: Option<(Duration, u64, RequestId)>,
}

impl Worker {
    fn new(id: WorkerId, capacity: WorkerCapacity) -> Self {
        Self {
            id,
            capacity,
            next_event_id: 0,
            load: LoadState::default(),
            model: None,
            correction: Correction::default(),
            decode_time_ms: None,
            own_requests: 0,
            own_blocks: 0,
            prefill_step: None,
        }
    }

    /// `request`'s prefill is over (its first token came, or it ended): a step it started is
    /// no longer waited for.
    fn prefill_step_over(&mut self, request: RequestId) {
        if self.prefill_step.is_some_and(|(_, _, r)| r == request) {
            self.prefill_step = None;
        }
    }

    /// Sequences running there: the router's own decisions, or more when the reported decode
    /// blocks say so (other frontends route there too), sized like the own ones.
    fn running(&self, decode_blocks: u64, model: &TimeModel) -> u32 {
        if decode_blocks == 0 {
            return self.own_requests.min(1);
        }
        let per_request = if self.own_requests > 0 {
            (self.own_blocks / u64::from(self.own_requests)).max(1)
        } else {
            DEFAULT_REQUEST_BLOCKS
        };
        let from_blocks = u32::try_from(decode_blocks.div_ceil(per_request)).unwrap_or(u32::MAX);
        from_blocks
            .max(self.own_requests)
            .min(model.profile().max_num_seqs.max(1))
    }
}

/// Blocks a request is taken to hold when there is nothing to size it by (1,024 tokens at 16).
const DEFAULT_REQUEST_BLOCKS: u64 = 64;

/// Weight of each finished request in a worker's mean decode time.
const DECODE_TIME_WEIGHT: f64 = 0.05;

/// An own decision still counted in its worker's load.
#[derive(Debug, Clone, Copy)]
struct InFlight {
    slot: u32,
    decided_at: Duration,
    contribution: Contribution,
    /// Whether the worker's latest load report covers this decision.
    reported: bool,
    /// The prompt's last full block: once the worker reports it stored, prefill is over.
    prefill_until: Option<SequenceHash>,
    /// The TTFT predicted when it was routed, ms.
    predicted_ms: f64,
    /// When its first token came (prefill done), once it has.
    first_token: Option<Duration>,
    /// Blocks its prompt occupies (counted in the worker's `own_blocks`).
    blocks: u32,
}

/// Blocks predicted on a worker in `approximate` mode, expiring together.
#[derive(Debug)]
struct Prediction {
    expires: Duration,
    worker: WorkerId,
    slot: u32,
    hashes: Box<[SequenceHash]>,
}

/// KV-aware router for one model: block index, worker load and selection. See the crate docs.
#[derive(Debug)]
pub struct Router {
    config: RouterConfig,
    index: BlockIndex,
    slots: Vec<Option<Worker>>,
    free_slots: Vec<u32>,
    by_id: Map<WorkerId, u32>,
    /// Registered workers sorted by id: the order of "all workers" and of round-robin.
    order: Vec<(WorkerId, u32)>,
    inflight: Map<RequestId, InFlight>,
    /// Own decisions in the order they were made, for the timeout; ended ones are skipped.
    timeouts: VecDeque<(Duration, RequestId)>,
    /// Requests whose prefill ends when their worker stores this block.
    awaiting_prefill: Map<(u32, SequenceHash), Vec<RequestId>>,
    /// `kv` mode: blocks of in-flight prompts that their worker is still computing, entered in
    /// the index at the decision (see [`Router::select`]), by request.
    pending_blocks: Map<RequestId, (u32, Box<[SequenceHash]>)>,
    predictions: VecDeque<Prediction>,
    /// The expiry of each predicted (slot, block); a later prediction of the same block pushes
    /// it back, and the older [`Prediction`] then leaves the block alone.
    predicted: Map<(u32, SequenceHash), Duration>,
    scratch: Scratch,
    candidate_buf: Vec<u32>,
    rng: SplitMix64,
    round_robin: usize,
    events: EventCounters,
    routes: RouteCounters,
    /// The profile of workers that have none of their own.
    default_model: Arc<TimeModel>,
    /// Whether `default_model` is still the nominal placeholder.
    default_nominal: bool,
    ttft_errors: PredictionErrors,
}

impl Router {
    /// A router with no workers.
    pub fn new(config: RouterConfig) -> Self {
        let hasher = KeyedBuild(config.seed ^ 0x6d61_7073_0000_0002);
        let default_model = Arc::new(TimeModel::nominal(config.block_size.get()));
        Self {
            index: BlockIndex::new(config.seed ^ 0x5eed_1de5_0000_0001),
            rng: SplitMix64::new(config.seed),
            config,
            slots: Vec::new(),
            free_slots: Vec::new(),
            by_id: Map::with_hasher(hasher),
            order: Vec::new(),
            inflight: Map::with_hasher(hasher),
            timeouts: VecDeque::new(),
            awaiting_prefill: Map::with_hasher(hasher),
            pending_blocks: Map::with_hasher(hasher),
            predictions: VecDeque::new(),
            predicted: Map::with_hasher(hasher),
            scratch: Scratch::default(),
            candidate_buf: Vec::new(),
            round_robin: 0,
            events: EventCounters::default(),
            routes: RouteCounters::default(),
            default_model,
            default_nominal: true,
            ttft_errors: PredictionErrors::default(),
        }
    }

    /// The configuration the router was built with.
    pub fn config(&self) -> &RouterConfig {
        &self.config
    }

    /// Switches the routing mode, keeping workers, index and load. The agent falls back to
    /// `approximate` while the control plane's event stream is unreachable (predictions then
    /// sit on top of the last known index) and switches back after re-syncing from a snapshot,
    /// which replaces the predicted blocks of every worker it names.
    pub fn set_mode(&mut self, mode: RoutingMode) {
        self.config.mode = mode;
    }

    /// Restarts the router's random choices from `seed` (for replaying a simulation).
    pub fn reseed(&mut self, seed: u64) {
        self.rng = SplitMix64::new(seed);
    }

    /// The performance profile of workers without one of their own ([`Router::set_profile`]);
    /// until one is set, a nominal placeholder ([`TimeModel::nominal`]). Refused when invalid or
    /// measured with another block size than the router's.
    pub fn set_default_profile(&mut self, profile: Arc<PerfProfile>) -> Result<(), ProfileError> {
        self.default_model = Arc::new(self.prepare(profile)?);
        self.default_nominal = false;
        for worker in self.slots.iter_mut().flatten() {
            worker.correction = Correction::default();
        }
        Ok(())
    }

    /// One worker's performance profile (for a fleet of mixed devices); `None` goes back to the
    /// default profile. Its learned correction starts again.
    pub fn set_profile(
        &mut self,
        id: WorkerId,
        profile: Option<Arc<PerfProfile>>,
    ) -> Result<(), SetProfileError> {
        let model = profile.map(|p| self.prepare(p).map(Arc::new)).transpose()?;
        let slot = self.slot(id).ok_or(UnknownWorker(id))?;
        if let Some(worker) = self.slots[slot as usize].as_mut() {
            worker.model = model;
            worker.correction = Correction::default();
        }
        Ok(())
    }

    fn prepare(&self, profile: Arc<PerfProfile>) -> Result<TimeModel, ProfileError> {
        let ours = self.config.block_size.get();
        if profile.block_size != ours {
            return Err(ProfileError::Invalid {
                field: "block_size".into(),
                reason: format!(
                    "{} tokens per block, but this router's model uses {ours}",
                    profile.block_size
                ),
            });
        }
        TimeModel::new(profile)
    }

    /// The factor the router has learned to multiply a worker's predicted compute times by: 1
    /// for a worker with a profile (its own or the default), else learned from its TTFTs at
    /// [`RouterConfig::learn_rate`].
    pub fn worker_correction(&self, id: WorkerId) -> Option<f64> {
        self.worker(id).map(|w| w.correction.factor())
    }

    /// How the predicted TTFTs compared with the actual ones so far.
    pub fn prediction_errors(&self) -> &PredictionErrors {
        &self.ttft_errors
    }

    // ----- workers ---------------------------------------------------------------------------

    /// Registers a worker, or updates the capacity of a registered one (its blocks, load and
    /// event position are kept). Returns whether it was new. A new worker expects event id 0.
    pub fn add_worker(
        &mut self,
        id: WorkerId,
        capacity: WorkerCapacity,
    ) -> Result<bool, TooManyWorkers> {
        if let Some(&slot) = self.by_id.get(&id) {
            if let Some(worker) = self.slots[slot as usize].as_mut() {
                worker.capacity = capacity;
            }
            return Ok(false);
        }
        let slot = match self.free_slots.pop() {
            Some(slot) => slot,
            None if self.slots.len() < MAX_SLOTS as usize => {
                self.slots.push(None);
                (self.slots.len() - 1) as u32
            }
            None => return Err(TooManyWorkers(id)),
        };
        self.slots[slot as usize] = Some(Worker::new(id, capacity));
        self.index.ensure_slot(slot);
        self.by_id.insert(id, slot);
        let at = self.order.partition_point(|(other, _)| *other < id);
        self.order.insert(at, (id, slot));
        Ok(true)
    }

    /// Forgets a worker: its blocks leave the index at once and its in-flight requests stop
    /// counting (a later [`Router::finished`] for them returns `None`). Returns whether it was
    /// registered.
    pub fn remove_worker(&mut self, id: WorkerId) -> bool {
        let Some(slot) = self.by_id.remove(&id) else {
            return false;
        };
        self.index.clear_slot(slot, 0xF);
        self.inflight.retain(|_, request| request.slot != slot);
        self.awaiting_prefill.retain(|(s, _), _| *s != slot);
        self.pending_blocks.retain(|_, (s, _)| *s != slot);
        self.predicted.retain(|(s, _), _| *s != slot);
        self.order.retain(|(_, s)| *s != slot);
        self.slots[slot as usize] = None;
        self.free_slots.push(slot);
        true
    }

    /// The worker's engine restarted: its blocks are gone and its events start again at 0.
    pub fn reset_worker(&mut self, id: WorkerId) -> Result<(), UnknownWorker> {
        let slot = self.slot(id).ok_or(UnknownWorker(id))?;
        self.index.clear_slot(slot, 0xF);
        self.predicted.retain(|(s, _), _| *s != slot);
        self.pending_blocks.retain(|_, (s, _)| *s != slot);
        if let Some(worker) = self.slots[slot as usize].as_mut() {
            worker.next_event_id = 0;
        }
        Ok(())
    }

    /// Registered workers in id order.
    pub fn workers(&self) -> impl ExactSizeIterator<Item = WorkerId> + '_ {
        self.order.iter().map(|(id, _)| *id)
    }

    /// A worker's blended load (last report, minus what ended since, plus own newer decisions).
    pub fn worker_load(&self, id: WorkerId) -> Option<WorkerLoad> {
        self.worker(id).map(|w| w.load.effective())
    }

    /// Blocks a worker holds per tier, in [`Tier::ALL`] order.
    pub fn worker_blocks(&self, id: WorkerId) -> Option<[u64; 4]> {
        self.slot(id).map(|slot| self.index.counts(slot))
    }

    /// The id of the next event the router expects from a worker.
    pub fn next_event_id(&self, id: WorkerId) -> Option<u64> {
        self.worker(id).map(|w| w.next_event_id)
    }

    fn slot(&self, id: WorkerId) -> Option<u32> {
        self.by_id.get(&id).copied()
    }

    fn worker(&self, id: WorkerId) -> Option<&Worker> {
        self.slot(id)
            .and_then(|slot| self.slots[slot as usize].as_ref())
    }

    // ----- events and load reports -----------------------------------------------------------

    /// Applies one KV event. Rejected events (unknown worker, duplicate, out of order, broken
    /// chain) change nothing but the counters; a [`EventError::Gap`] is applied *and* returned
    /// so the driver re-syncs that worker.
    pub fn apply(&mut self, event: &KvEvent, now: Duration) -> Result<(), EventError> {
        self.expire(now);
        let Some(slot) = self.slot(event.worker) else {
            self.events.unknown_worker += 1;
            return Err(EventError::UnknownWorker {
                worker: event.worker,
                event_id: event.event_id,
            });
        };
        let expected = self.slots[slot as usize]
            .as_ref()
            .map_or(0, |w| w.next_event_id);
        if event.event_id < expected {
            return Err(if event.event_id + 1 == expected {
                self.events.duplicate += 1;
                EventError::Duplicate {
                    worker: event.worker,
                    event_id: event.event_id,
                }
            } else {
                self.events.out_of_order += 1;
                EventError::OutOfOrder {
                    worker: event.worker,
                    event_id: event.event_id,
                    expected,
                }
            });
        }
        if let Some(worker) = self.slots[slot as usize].as_mut() {
            worker.next_event_id = event.event_id.saturating_add(1);
        }
        let gap = event.event_id > expected;
        if gap {
            self.events.gaps += 1;
        }
        match &event.data {
            KvEventData::Stored { parent, blocks } => {
                if self.config.verify_chains {
                    let mut prev = *parent;
                    for (position, block) in blocks.iter().enumerate() {
                        if chain(prev, block.local) != block.sequence {
                            self.events.broken_chain += 1;
                            return Err(EventError::BrokenChain {
                                worker: event.worker,
                                event_id: event.event_id,
                                position,
                            });
                        }
                        prev = Some(block.sequence);
                    }
                }
                self.index
                    .insert_blocks(blocks.iter().map(|b| b.sequence), slot, event.tier);
                if !self.awaiting_prefill.is_empty() {
                    for block in blocks {
                        if let Some(requests) =
                            self.awaiting_prefill.remove(&(slot, block.sequence))
                        {
                            for request in requests {
                                self.end_prefill(request);
                            }
                        }
                    }
                }
            }
            KvEventData::Removed { blocks } => {
                self.index
                    .remove_blocks(blocks.iter().copied(), slot, event.tier);
            }
            KvEventData::Cleared => self.index.clear_slot(slot, tier_bit(event.tier)),
        }
        self.events.applied += 1;
        if gap {
            Err(EventError::Gap {
                worker: event.worker,
                expected,
                got: event.event_id,
            })
        } else {
            Ok(())
        }
    }

    /// Takes in a worker's published load, received at `now`. Own decisions made up to
    /// `now - report_lag` are taken as included in it; later ones are added on top.
    pub fn apply_load(
        &mut self,
        id: WorkerId,
        load: WorkerLoad,
        now: Duration,
    ) -> Result<(), UnknownWorker> {
        self.expire(now);
        let slot = self.slot(id).ok_or(UnknownWorker(id))?;
        let inflight = &mut self.inflight;
        if let Some(worker) = self.slots[slot as usize].as_mut() {
            worker
                .load
                .report(load, now, self.config.report_lag, |request| {
                    let r = inflight.get_mut(&request)?;
                    if r.slot != slot || r.reported {
                        return None;
                    }
                    r.reported = true;
                    Some(r.contribution)
                });
        }
        Ok(())
    }

    // ----- requests --------------------------------------------------------------------------

    /// The request left its worker (completed, cancelled or failed): its load stops counting.
    /// Returns the worker it was on, or `None` for an unknown (or timed-out) request.
    pub fn finished(&mut self, id: RequestId, now: Duration) -> Option<WorkerId> {
        self.expire(now);
        self.end_request(id, false, now)
    }

    /// The request's prefill is over (its first token came back), in case the worker's KV
    /// events have not said so already; its predicted TTFT is checked against the time since
    /// it was routed. Returns whether the request was in flight.
    pub fn prefill_done(&mut self, id: RequestId, now: Duration) -> bool {
        let actual = self
            .inflight
            .get(&id)
            .map(|r| now.saturating_sub(r.decided_at));
        self.first_token(id, actual, now)
    }

    /// Like [`Router::prefill_done`], with the TTFT the worker's engine measured (which leaves
    /// out the hops between router and engine) to check the prediction against.
    pub fn prefill_done_with_ttft(&mut self, id: RequestId, ttft: Duration, now: Duration) -> bool {
        self.first_token(id, Some(ttft), now)
    }

    fn first_token(&mut self, id: RequestId, ttft: Option<Duration>, now: Duration) -> bool {
        if let Some(request) = self.inflight.get_mut(&id)
            && request.first_token.is_none()
        {
            request.first_token = Some(now);
            if let Some(actual) = ttft {
                let actual_ms = actual.as_secs_f64() * 1e3;
                self.ttft_errors.record(request.predicted_ms, actual_ms);
                let rate = self.config.learn_rate;
                let default_nominal = self.default_nominal;
                if let Some(worker) = self.slots[request.slot as usize].as_mut()
                    && worker.model.is_none()
                    && default_nominal
                {
                    // Only a worker costed with the nominal placeholder learns its scale: a
                    // profile is a measurement, and the errors against it are queueing noise
                    // that a learned factor would only chase.
                    worker
                        .correction
                        .learn(request.predicted_ms, actual_ms, rate);
                }
            }
        }
        self.expire(now);
        if let Some(key) = self
            .inflight
            .get(&id)
            .and_then(|r| r.prefill_until.map(|h| (r.slot, h)))
        {
            self.stop_awaiting(key, id);
        }
        self.end_prefill(id)
    }

    fn stop_awaiting(&mut self, key: (u32, SequenceHash), id: RequestId) {
        if let Some(waiting) = self.awaiting_prefill.get_mut(&key) {
            waiting.retain(|r| *r != id);
            if waiting.is_empty() {
                self.awaiting_prefill.remove(&key);
            }
        }
    }

    fn end_prefill(&mut self, id: RequestId) -> bool {
        let Some(request) = self.inflight.get_mut(&id) else {
            return false;
        };
        // Its blocks are computed: from here on the worker's events speak for them.
        self.pending_blocks.remove(&id);
        request.prefill_until = None;
        let prefill = Contribution {
            prefill_tokens: request.contribution.prefill_tokens,
            decode_blocks: 0,
        };
        request.contribution.prefill_tokens = 0;
        let (slot, reported) = (request.slot, request.reported);
        if let Some(worker) = self.slots[slot as usize].as_mut() {
            worker.load.retire(prefill, reported, false);
            worker.prefill_step_over(id);
        }
        true
    }

    fn end_request(&mut self, id: RequestId, timed_out: bool, now: Duration) -> Option<WorkerId> {
        let request = self.inflight.remove(&id)?;
        if let Some((slot, hashes)) = self.pending_blocks.remove(&id) {
            // It ended before its prefill did: the blocks it was to compute are not coming.
            self.index
                .remove_blocks(hashes.iter().copied(), slot, Tier::G1);
        }
        if timed_out {
            self.routes.timed_out += 1;
        }
        if let Some(hash) = request.prefill_until {
            self.stop_awaiting((request.slot, hash), id);
        }
        let worker = self.slots[request.slot as usize].as_mut()?;
        worker
            .load
            .retire(request.contribution, request.reported, true);
        worker.prefill_step_over(id);
        worker.own_requests = worker.own_requests.saturating_sub(1);
        worker.own_blocks = worker.own_blocks.saturating_sub(u64::from(request.blocks));
        if let (Some(first), false) = (request.first_token, timed_out) {
            let decode_ms = now.saturating_sub(first).as_secs_f64() * 1e3;
            worker.decode_time_ms = Some(match worker.decode_time_ms {
                Some(mean) => mean + DECODE_TIME_WEIGHT * (decode_ms - mean),
                None => decode_ms,
            });
        }
        Some(worker.id)
    }

    /// Drops own decisions past their timeout and predictions past their TTL.
    fn expire(&mut self, now: Duration) {
        let timeout = self.config.inflight_timeout;
        while let Some(&(at, id)) = self.timeouts.front() {
            if at.saturating_add(timeout) > now {
                break;
            }
            self.timeouts.pop_front();
            if self.inflight.get(&id).is_some_and(|r| r.decided_at == at) {
                self.end_request(id, true, now);
            }
        }
        if self.timeouts.len() > 64 && self.timeouts.len() > 2 * self.inflight.len() {
            let inflight = &self.inflight;
            self.timeouts.retain(|(_, id)| inflight.contains_key(id));
        }
        while self.predictions.front().is_some_and(|p| p.expires <= now) {
            let Some(prediction) = self.predictions.pop_front() else {
                break;
            };
            let slot = prediction.slot;
            let current = self.slots[slot as usize].as_ref().map(|w| w.id);
            if current != Some(prediction.worker) {
                continue;
            }
            for hash in prediction.hashes.iter() {
                let key = (slot, *hash);
                if self.predicted.get(&key) == Some(&prediction.expires) {
                    self.predicted.remove(&key);
                    self.index.remove(*hash, slot, Tier::G1);
                }
            }
        }
    }

    /// How many leading blocks of `hashes` each candidate (every worker for `None`) holds, in
    /// worker-id order, without routing anything: for a disaggregated frontend deciding whether
    /// the uncached part of a prompt is worth a remote prefill, and for the UI.
    pub fn overlaps(
        &mut self,
        hashes: &[SequenceHash],
        candidates: Option<&[WorkerId]>,
        now: Duration,
    ) -> Vec<Overlap> {
        self.expire(now);
        let mut slots: Vec<(WorkerId, u32)> = match candidates {
            None => self.order.clone(),
            Some(ids) => ids
                .iter()
                .filter_map(|id| self.slot(*id).map(|slot| (*id, slot)))
                .collect(),
        };
        slots.sort_unstable();
        slots.dedup();
        self.scratch.begin(self.slots.len());
        for &(_, slot) in &slots {
            self.scratch.add_candidate(slot);
        }
        self.index.walk(hashes, &mut self.scratch);
        slots
            .into_iter()
            .map(|(worker, slot)| {
                let held = self.scratch.overlap(slot);
                Overlap {
                    worker,
                    blocks: held.blocks,
                    cached_blocks: held.weighted(&self.config.tier_weights),
                }
            })
            .collect()
    }

    /// Picks a worker for `request` and counts it in that worker's load until
    /// [`Router::finished`] (or the timeout).
    pub fn select(
        &mut self,
        request: &RouteRequest<'_>,
        now: Duration,
    ) -> Result<Decision, RouteError> {
        self.expire(now);
        if self.inflight.contains_key(&request.id) {
            return Err(RouteError::DuplicateRequest(request.id));
        }
        let mut candidates = std::mem::take(&mut self.candidate_buf);
        candidates.clear();
        match request.candidates {
            None => candidates.extend(self.order.iter().map(|(_, slot)| *slot)),
            Some(ids) => {
                let mut known: Vec<(WorkerId, u32)> = ids
                    .iter()
                    .filter_map(|id| self.slot(*id).map(|slot| (*id, slot)))
                    .collect();
                known.sort_unstable();
                known.dedup();
                candidates.extend(known.into_iter().map(|(_, slot)| slot));
            }
        }
        let result = self.select_among(request, &candidates, now);
        self.candidate_buf = candidates;
        match &result {
            Ok(_) => self.routes.routed += 1,
            Err(RouteError::NoWorkers) => self.routes.no_workers += 1,
            Err(RouteError::Overloaded { .. }) => self.routes.overloaded += 1,
            Err(RouteError::DuplicateRequest(_)) => {}
        }
        result
    }

    fn select_among(
        &mut self,
        request: &RouteRequest<'_>,
        candidates: &[u32],
        now: Duration,
    ) -> Result<Decision, RouteError> {
        if candidates.is_empty() {
            return Err(RouteError::NoWorkers);
        }
        let block_size = self.config.block_size;
        let request_blocks = (block_size.blocks_for(request.prompt_tokens as usize) as u32)
            .max(request.hashes.len() as u32);
        self.scratch.begin(self.slots.len());
        for &slot in candidates {
            self.scratch.add_candidate(slot);
        }
        self.index.walk(request.hashes, &mut self.scratch);

        let mode = self.config.mode;
        let timed = mode.is_time_based();
        let shape = Shape {
            prompt_tokens: u64::from(request.prompt_tokens),
            request_blocks,
            output_tokens: request
                .output_tokens
                .unwrap_or(self.config.default_output_tokens),
            block_size: block_size.get(),
            itl_weight: self.config.itl_weight,
        };
        // Candidates come from `by_id`, so every slot is occupied; `costs[i]` is `slots[i]`'s.
        let slots: Vec<u32> = candidates
            .iter()
            .copied()
            .filter(|&slot| self.slots[slot as usize].is_some())
            .collect();
        let mut memo = PrefillMemo::default();
        let costs: Vec<CandidateCost> = slots
            .iter()
            .filter_map(|&slot| {
                let worker = self.slots[slot as usize].as_ref()?;
                let held = self.scratch.overlap(slot);
                let load = worker.load.effective();
                let mut cost = self.block_cost(worker, held, load, request_blocks);
                if timed {
                    let time = self.time_cost(worker, held, load, &shape, now, &mut memo);
                    cost.cost = time.cost(shape.itl_weight);
                    cost.time = Some(time);
                }
                Some(cost)
            })
            .collect();
        let eligible: Vec<usize> = (0..costs.len()).filter(|&i| !costs[i].overloaded).collect();
        if eligible.is_empty() {
            return Err(RouteError::Overloaded {
                candidates: costs.len(),
            });
        }
        let chosen = match mode {
            RoutingMode::Kv | RoutingMode::Approximate => {
                self.pick_by_time(request, &slots, &costs, &eligible)
            }
            RoutingMode::KvBlocks => self.pick_by_cost(&costs, &eligible),
            RoutingMode::LeastLoaded => eligible
                .iter()
                .copied()
                .min_by(|&a, &b| costs[a].load().total_cmp(&costs[b].load()))
                .unwrap_or(eligible[0]),
            RoutingMode::RoundRobin => {
                let n = costs.len();
                let start = self.round_robin % n;
                self.round_robin = self.round_robin.wrapping_add(1);
                (0..n)
                    .map(|k| (start + k) % n)
                    .find(|&i| !costs[i].overloaded)
                    .unwrap_or(eligible[0])
            }
            RoutingMode::Random => eligible[self.rng.below(eligible.len())],
        };
        let slot = slots[chosen];
        let mut costs = costs;
        if costs[chosen].time.is_none()
            && let Some(worker) = self.slots[slot as usize].as_ref()
        {
            let held = self.scratch.overlap(slot);
            let load = worker.load.effective();
            costs[chosen].time = Some(self.time_cost(worker, held, load, &shape, now, &mut memo));
        }
        let predicted_ttft_ms = costs[chosen].time.map_or(0.0, |t| t.ttft_ms);
        let overlap_blocks = costs[chosen].overlap_blocks;
        if let Some(time) = costs[chosen].time
            && time.queue_ms == 0.0
            && let Some(worker) = self.slots[slot as usize].as_mut()
        {
            // Nothing was queued there: its prefill starts at once, and requests sent there
            // before it ends wait for that step (a prompt longer than one step only for its
            // first chunk).
            let model = worker.model.as_deref().unwrap_or(&self.default_model);
            let step = u64::from(model.profile().max_batched_tokens.max(1));
            let new = u64::from(request.prompt_tokens)
                .saturating_sub(u64::from(overlap_blocks) * u64::from(block_size.get()))
                .max(1);
            let ms = predicted_ttft_ms - time.onboard_ms - time.memory_ms;
            let ms = ms * step.min(new) as f64 / new as f64;
            worker.prefill_step = Duration::try_from_secs_f64(ms.max(0.0) / 1e3)
                .ok()
                .map(|d| (now.saturating_add(d), step.min(new), request.id));
        }
        self.record(
            request,
            slot,
            overlap_blocks,
            request_blocks,
            predicted_ttft_ms,
            now,
        );
        self.routes.hit_blocks += u64::from(overlap_blocks);
        self.routes.blocks += request.hashes.len() as u64;
        Ok(Decision {
            request: request.id,
            worker: costs[chosen].worker,
            mode,
            overlap_blocks,
            request_blocks,
            predicted_ttft_ms,
            candidates: self.breakdown(costs, chosen),
        })
    }

    /// The `kv-blocks` terms of one candidate and whether it is overloaded.
    fn block_cost(
        &self,
        worker: &Worker,
        held: Held,
        load: WorkerLoad,
        request_blocks: u32,
    ) -> CandidateCost {
        let config = &self.config;
        let cached_blocks = held.weighted(&config.tier_weights);
        let new_prefill_blocks = (f64::from(request_blocks) - cached_blocks).max(0.0);
        let queued_prefill_blocks = load.prefill_tokens as f64 / f64::from(config.block_size.get());
        let cost = config.overlap_weight * new_prefill_blocks
            + load.decode_blocks as f64
            + config.prefill_queue_weight * queued_prefill_blocks
            + config.queue_depth_weight * f64::from(load.queue_depth);
        let capacity = worker.capacity;
        let full = capacity.kv_blocks > 0
            && (load.decode_blocks + u64::from(request_blocks)) as f64
                > capacity.kv_blocks as f64 * config.overload_fraction;
        let queue_full = capacity
            .max_queue_depth
            .is_some_and(|max| load.queue_depth >= max);
        CandidateCost {
            worker: worker.id,
            overlap_blocks: held.blocks,
            cached_blocks,
            new_prefill_blocks,
            queued_prefill_blocks,
            active_decode_blocks: load.decode_blocks,
            queue_depth: load.queue_depth,
            time: None,
            cost,
            overloaded: full || queue_full,
        }
    }

    /// The predicted time of the request on one candidate ([`crate::cost`]), given its blended
    /// load.
    fn time_cost(
        &self,
        worker: &Worker,
        held: Held,
        load: WorkerLoad,
        shape: &Shape,
        now: Duration,
        memo: &mut PrefillMemo,
    ) -> TimeCost {
        let model = worker.model.as_ref().unwrap_or(&self.default_model);
        let (busy_tokens, busy_ms) = match worker.prefill_step {
            Some((end, tokens, _)) if end > now => (tokens, (end - now).as_secs_f64() * 1e3),
            _ => (0, 0.0),
        };
        let candidate = Candidate {
            queued_tokens: load.prefill_tokens,
            busy_tokens,
            busy_ms,
            decode_blocks: load.decode_blocks,
            running: worker.running(load.decode_blocks, model),
            kv_blocks: worker.capacity.kv_blocks,
            decode_time_ms: worker.decode_time_ms,
            correction: worker.correction.factor(),
            overlap_blocks: held.blocks,
            lower_tier_blocks: held.lower,
        };
        crate::cost::predict(model, shape, &candidate, memo)
    }

    /// Lowest predicted time wins. Candidates within [`RouterConfig::tie_fraction`] /
    /// [`RouterConfig::tie_ms`] of the cheapest tie, and ties are spread instead of going to the
    /// lowest id: to the tied worker holding the longest prefix of the prompt, a request nobody
    /// caches to where its blocks displace the least (the most free KV blocks), and otherwise
    /// to the tied worker that ranks highest for the prompt's first block (rendezvous hashing). Requests sharing a prefix thus agree on where it
    /// lives while it is cheap there, spill to a second worker when its holder's queue makes
    /// that faster (replication by routing), and come back to the first when the load cools;
    /// requests with different prefixes spread evenly. A positive temperature samples a
    /// softmax over the costs instead.
    fn pick_by_time(
        &mut self,
        request: &RouteRequest<'_>,
        slots: &[u32],
        costs: &[CandidateCost],
        eligible: &[usize],
    ) -> usize {
        if self.config.temperature > 0.0 {
            return self.pick_by_cost(costs, eligible);
        }
        let best = eligible
            .iter()
            .map(|&i| costs[i].cost)
            .fold(f64::INFINITY, f64::min);
        let slack = (best * self.config.tie_fraction).max(self.config.tie_ms);
        let cold = eligible.iter().all(|&i| costs[i].overlap_blocks == 0);
        let key = mix64(request.hashes.first().map_or(request.id.0 as u64, |h| h.0));
        let mut chosen = eligible[0];
        let mut chosen_rank = (0u64, 0u64, 0u64);
        let mut first = true;
        for &i in eligible {
            if costs[i].cost > best + slack {
                continue;
            }
            let headroom = if cold {
                self.slots[slots[i] as usize].as_ref().map_or(0, |w| {
                    let cached = self.index.counts(slots[i])[0];
                    w.capacity
                        .kv_blocks
                        .saturating_sub(cached.max(costs[i].active_decode_blocks))
                })
            } else {
                0
            };
            // Among near-ties the deepest cached prefix first (its blocks are already there:
            // going elsewhere would store a second copy), then the free room for a cold one.
            let rank = (
                u64::from(costs[i].overlap_blocks),
                headroom,
                mix64(key ^ costs[i].worker.0),
            );
            if first || rank > chosen_rank {
                chosen = i;
                chosen_rank = rank;
                first = false;
            }
        }
        chosen
    }

    /// Lowest cost wins; equal costs go to the less loaded, then the lower id (candidates are
    /// in id order). With a temperature, a softmax over costs normalised to [0, 1].
    fn pick_by_cost(&mut self, costs: &[CandidateCost], eligible: &[usize]) -> usize {
        let temperature = self.config.temperature;
        if temperature > 0.0 && eligible.len() > 1 {
            let (lo, hi) = eligible
                .iter()
                .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &i| {
                    (lo.min(costs[i].cost), hi.max(costs[i].cost))
                });
            let range = hi - lo;
            let weights: Vec<f64> = eligible
                .iter()
                .map(|&i| {
                    if range > 0.0 {
                        (-(costs[i].cost - lo) / range / temperature).exp()
                    } else {
                        1.0
                    }
                })
                .collect();
            let total: f64 = weights.iter().sum();
            let mut target = self.rng.next_f64() * total;
            for (k, w) in weights.iter().enumerate() {
                if target < *w {
                    return eligible[k];
                }
                target -= w;
            }
            return eligible[eligible.len() - 1];
        }
        const EPSILON: f64 = 1e-9;
        let mut best = eligible[0];
        for &i in &eligible[1..] {
            let (a, b) = (&costs[i], &costs[best]);
            if a.cost < b.cost - EPSILON
                || (a.cost <= b.cost + EPSILON && a.load() < b.load() - EPSILON)
            {
                best = i;
            }
        }
        best
    }

    fn breakdown(&self, costs: Vec<CandidateCost>, chosen: usize) -> Vec<CandidateCost> {
        let limit = self.config.breakdown_limit.max(1);
        if costs.len() <= limit {
            let mut costs = costs;
            costs.sort_unstable_by(|a, b| a.cost.total_cmp(&b.cost).then(a.worker.cmp(&b.worker)));
            return costs;
        }
        // The cheapest `limit - 1` others and the chosen one, selected by small keys rather
        // than by moving the breakdowns themselves (a fleet has many more candidates than
        // the breakdown keeps).
        let mut keys: Vec<(f64, WorkerId, u32)> = costs
            .iter()
            .enumerate()
            .filter(|&(i, _)| i != chosen)
            .map(|(i, c)| (c.cost, c.worker, i as u32))
            .collect();
        let by_key = |a: &(f64, WorkerId, u32), b: &(f64, WorkerId, u32)| {
            a.0.total_cmp(&b.0).then(a.1.cmp(&b.1))
        };
        keys.select_nth_unstable_by(limit - 1, by_key);
        keys.truncate(limit - 1);
        let c = &costs[chosen];
        keys.push((c.cost, c.worker, chosen as u32));
        keys.sort_unstable_by(by_key);
        keys.iter().map(|k| costs[k.2 as usize].clone()).collect()
    }

    /// Counts the decision in the worker's load and, in `approximate` mode, predicts the
    /// request's blocks cached there.
    fn record(
        &mut self,
        request: &RouteRequest<'_>,
        slot: u32,
        overlap_blocks: u32,
        request_blocks: u32,
        predicted_ms: f64,
        now: Duration,
    ) {
        let block_size = self.config.block_size.get();
        let cached_tokens = u64::from(overlap_blocks) * u64::from(block_size);
        let contribution = Contribution {
            prefill_tokens: u64::from(request.prompt_tokens).saturating_sub(cached_tokens),
            decode_blocks: u64::from(request_blocks),
        };
        let prefill_until = (overlap_blocks < request.hashes.len() as u32)
            .then(|| request.hashes.last().copied())
            .flatten();
        self.inflight.insert(
            request.id,
            InFlight {
                slot,
                decided_at: now,
                contribution,
                reported: false,
                prefill_until,
                predicted_ms,
                first_token: None,
                blocks: request_blocks,
            },
        );
        if let Some(hash) = prefill_until {
            self.awaiting_prefill
                .entry((slot, hash))
                .or_default()
                .push(request.id);
        }
        self.timeouts.push_back((now, request.id));
        let inflight = &self.inflight;
        if self.config.mode == RoutingMode::Kv && prefill_until.is_some() {
            // The worker will hold the whole prompt once it has computed it; a request that
            // shares the prefix and arrives meanwhile should queue behind this prefill there
            // rather than compute the prefix again elsewhere. Events confirm the blocks as they
            // are computed; if this request ends first, they are taken out again.
            let computing = &request.hashes[overlap_blocks as usize..];
            self.index
                .insert_blocks(computing.iter().copied(), slot, Tier::G1);
            self.pending_blocks
                .insert(request.id, (slot, computing.into()));
        }
        if let Some(worker) = self.slots[slot as usize].as_mut() {
            worker.own_requests += 1;
            worker.own_blocks += u64::from(request_blocks);
            worker.load.decided(request.id, contribution, now);
            worker.load.compact(|r| {
                inflight
                    .get(&r)
                    .is_some_and(|f| !f.reported && f.slot == slot)
            });
            if self.config.mode == RoutingMode::Approximate && !request.hashes.is_empty() {
                let expires = now.saturating_add(self.config.approx_ttl);
                self.index
                    .insert_blocks(request.hashes.iter().copied(), slot, Tier::G1);
                for hash in request.hashes {
                    self.predicted.insert((slot, *hash), expires);
                }
                self.predictions.push_back(Prediction {
                    expires,
                    worker: worker.id,
                    slot,
                    hashes: request.hashes.into(),
                });
            }
        }
    }

    // ----- snapshots and metrics ---------------------------------------------------------------

    /// Every registered worker's blocks and event position.
    pub fn snapshot(&self) -> IndexSnapshot {
        let mut blocks: HashMap<u32, [Vec<SequenceHash>; 4]> =
            self.index.export(None).into_iter().collect();
        IndexSnapshot {
            workers: self
                .order
                .iter()
                .filter_map(|&(id, slot)| {
                    let tiers = blocks.remove(&slot).unwrap_or_default();
                    self.worker_snapshot_from(id, slot, tiers)
                })
                .collect(),
        }
    }

    /// One worker's blocks and event position.
    pub fn worker_snapshot(&self, id: WorkerId) -> Option<WorkerSnapshot> {
        let slot = self.slot(id)?;
        let tiers = self
            .index
            .export(Some(slot))
            .into_iter()
            .next()
            .map(|(_, tiers)| tiers)
            .unwrap_or_default();
        self.worker_snapshot_from(id, slot, tiers)
    }

    fn worker_snapshot_from(
        &self,
        id: WorkerId,
        slot: u32,
        tiers: [Vec<SequenceHash>; 4],
    ) -> Option<WorkerSnapshot> {
        let worker = self.slots[slot as usize].as_ref()?;
        Some(WorkerSnapshot {
            worker: id,
            next_event_id: worker.next_event_id,
            tiers: Tier::ALL
                .into_iter()
                .zip(tiers)
                .filter(|(_, blocks)| !blocks.is_empty())
                .map(|(tier, blocks)| TierBlocks { tier, blocks })
                .collect(),
        })
    }

    /// Replaces one worker's blocks and event position with a snapshot's (re-sync after a gap).
    pub fn restore_worker(&mut self, snapshot: &WorkerSnapshot) -> Result<(), UnknownWorker> {
        let report = self.restore(&IndexSnapshot {
            workers: vec![snapshot.clone()],
        });
        if report.restored == 1 {
            Ok(())
        } else {
            Err(UnknownWorker(snapshot.worker))
        }
    }

    /// Replaces the blocks and event positions of every registered worker named in the snapshot
    /// (one pass over the index however many workers it names). Workers it does not name keep
    /// theirs; workers it names that are not registered are skipped and reported.
    pub fn restore(&mut self, snapshot: &IndexSnapshot) -> RestoreReport {
        let mut report = RestoreReport::default();
        let mut masks = vec![0u8; self.slots.len()];
        let mut known = Vec::new();
        for worker in &snapshot.workers {
            match self.slot(worker.worker) {
                Some(slot) => {
                    masks[slot as usize] = 0xF;
                    known.push((slot, worker));
                }
                None => report.unknown.push(worker.worker),
            }
        }
        self.index.clear_slots(&masks);
        self.predicted.retain(|(s, _), _| masks[*s as usize] == 0);
        self.pending_blocks
            .retain(|_, (s, _)| masks.get(*s as usize).is_none_or(|m| *m == 0));
        for (slot, worker) in known {
            for tier in &worker.tiers {
                self.index.insert_set(&tier.blocks, slot, tier.tier);
            }
            if let Some(w) = self.slots[slot as usize].as_mut() {
                w.next_event_id = worker.next_event_id;
            }
            report.restored += 1;
        }
        report
    }

    /// Event counters since the router was built.
    pub fn event_counters(&self) -> EventCounters {
        self.events
    }

    /// Routing counters since the router was built.
    pub fn route_counters(&self) -> RouteCounters {
        self.routes
    }

    /// Sizes of the block index.
    pub fn index_stats(&self) -> IndexStats {
        self.index.stats()
    }

    /// Own decisions still counted in some worker's load.
    pub fn inflight(&self) -> usize {
        self.inflight.len()
    }

    /// Whether `worker` holds `hash` in `tier` according to the index.
    pub fn holds(&self, worker: WorkerId, hash: SequenceHash, tier: Tier) -> bool {
        self.slot(worker)
            .is_some_and(|slot| self.index.tiers_of(hash, slot) & (1 << tier_index(tier)) != 0)
    }
}

#[cfg(test)]
mod tests;
