//! The agent's side of the KV event pipeline, as two state machines without IO: the
//! [`Uploader`] batches this node's engines' KV events for `POST /api/v1/agent/kv-events`, and
//! the [`Follower`] applies the control plane's sequenced stream (`GET /api/v1/agent/kv-stream`,
//! `GET /api/v1/agent/kv-snapshot`) to a router.
//!
//! The control-plane client owns the HTTP calls and the clock and drives these: it feeds them
//! what arrived (events, answers, pages, failures) with the current time and asks what to send
//! next. Nothing here spawns, sleeps or reads a clock, so every decision is unit-tested with a
//! manual clock. Wire types are [`kvfleet_proto::kv_stream`]; the control plane's half is
//! `kvfleet_controlplane::kv_index`.
//!
//! Driving the uploader: [`Uploader::push`] every event a worker reports, [`Uploader::set_epoch`]
//! when an engine (re)starts, and when [`Uploader::loads_due`] sample the local workers' live
//! loads into [`Uploader::set_loads`]; loop { `poll(now)` → send the batch → `on_sent(result)`
//! or `on_failed(retryable)`; sleep until `next_wakeup()` or the next event }. Loads go out
//! every `load_interval` whether or not events do, in the same upload, and at once when a
//! worker goes idle.
//!
//! Driving the follower: loop { match `next_request()` { `Snapshot` → GET kv-snapshot →
//! `on_snapshot`, `Stream { after, loads_after }` → GET
//! kv-stream?after=..&loads_after=..&wait_s=.. → `on_page` }; on any transport error or 5xx →
//! `on_unreachable(now)` and wait `retry_delay()` }. Each page's loads go to the router with
//! [`Router::apply_load`], dated by their age, so the router blends them with its own
//! decisions made since; every worker's, this node's included (the local pool's figures would
//! be a little fresher, but one path for all keeps the blend the same everywhere, and the
//! router's own decisions cover the round trip). A worker whose reports stop for `load_ttl`
//! stops counting: its last report is replaced by an empty one dated as it was.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::time::Duration;

use kvfleet_kv_router::{
    EventError, IndexSnapshot, Router, RoutingMode, TierBlocks, WorkerCapacity, WorkerLoad,
    WorkerSnapshot,
};
use kvfleet_proto::kv_stream::{
    KvEventBatch, KvEventBatchResult, KvSnapshot, KvStreamItem, KvStreamPage, WorkerEpoch,
    WorkerLoadReport,
};
use kvfleet_proto::{KvEvent, WorkerId};
use serde::{Deserialize, Serialize};

// ----- uploader ------------------------------------------------------------------------------

/// How the uploader batches and retries.
#[derive(Debug, Clone, PartialEq)]
pub struct UploaderConfig {
    /// Events per upload (at most `kvfleet_proto::kv_stream::MAX_BATCH_EVENTS`).
    pub max_batch_events: usize,
    /// Blocks per upload: a batch closes early once its events name this many blocks, so
    /// long prompts stay under the control plane's 16 MiB body limit (a batch always carries at
    /// least one event).
    pub max_batch_blocks: usize,
    /// Events held while the control plane is slow or unreachable. When full, the oldest
    /// event not yet in flight is dropped (and counted): the control plane then sees a gap in
    /// that worker's ids and applies what follows, so the index misses a few blocks (a routing
    /// miss, never a wrong answer) instead of the agent growing without bound.
    pub max_buffered_events: usize,
    /// How long an event may wait for a batch to fill before it is sent anyway.
    pub linger: Duration,
    /// First retry delay after a failed upload; doubles per failure...
    pub retry_base: Duration,
    /// ...up to this.
    pub retry_max: Duration,
    /// How often the local workers' loads are sent (with the events due then, or alone).
    pub load_interval: Duration,
    /// How often they are sampled: a sample in which a worker went idle is sent at once
    /// rather than at the next `load_interval`, so routers stop counting finished work soon.
    pub load_probe: Duration,
}

impl Default for UploaderConfig {
    fn default() -> Self {
        Self {
            max_batch_events: 500,
            max_batch_blocks: kvfleet_proto::kv_stream::MAX_PAGE_BLOCKS,
            max_buffered_events: 100_000,
            linger: Duration::from_millis(20),
            retry_base: Duration::from_millis(100),
            retry_max: Duration::from_secs(5),
            load_interval: Duration::from_millis(500),
            load_probe: Duration::from_millis(50),
        }
    }
}

/// What the uploader did, for the agent's metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct UploaderCounters {
    /// Batches the control plane answered.
    pub batches: u64,
    /// Events in those batches that it applied.
    pub applied: u64,
    /// Events it ignored as already applied (retries after a lost answer).
    pub duplicate: u64,
    /// Events it rejected (unknown worker, broken chain, out of order, stale epoch).
    pub rejected: u64,
    /// Events dropped because the buffer was full.
    pub dropped_overflow: u64,
    /// Events dropped because their batch was refused for good (4xx).
    pub dropped_refused: u64,
    /// Failed attempts that will be retried.
    pub retries: u64,
    /// Load reports the control plane took.
    pub loads_sent: u64,
    /// Load reports it rejected (workers it does not know as this node's).
    pub loads_rejected: u64,
}

/// A worker's previous incarnation, whose last events can reach the uploader after the new
/// epoch was set: its epoch and the id of its last event pushed.
#[derive(Debug, Clone, Copy)]
struct Tail {
    epoch: u64,
    last: u64,
}

#[derive(Debug, Clone)]
struct Queued {
    at: Duration,
    epoch: u64,
    event: KvEvent,
}

/// Batches KV events for upload with bounded memory, one batch in flight at a time (so each
/// worker's events reach the control plane in order, retries included). See the module docs.
#[derive(Debug)]
pub struct Uploader {
    config: UploaderConfig,
    queue: VecDeque<Queued>,
    /// Events at the head of `queue` that belong to the batch in flight.
    in_flight: Option<usize>,
    /// The current engine incarnation of each local worker.
    epochs: BTreeMap<WorkerId, u64>,
    /// The id of the last event pushed under each worker's current epoch.
    last_ids: HashMap<WorkerId, u64>,
    /// Per restarted worker, the incarnation before the current one while its last events may
    /// still arrive (see [`Uploader::push`]).
    tails: HashMap<WorkerId, Tail>,
    /// Queued events per worker.
    queued: HashMap<WorkerId, usize>,
    /// Bumped by every epoch change; `announced` is the version the last answered batch
    /// carried, so a change made while a batch was in flight is still announced.
    epochs_version: u64,
    announced: u64,
    /// The version the batch in flight carries.
    sending: u64,
    failures: u32,
    retry_at: Option<Duration>,
    counters: UploaderCounters,
    /// The latest load sample not yet answered, when it was taken, and its number.
    loads: Option<(Vec<WorkerLoadReport>, Duration, u64)>,
    /// The number of the sample the batch in flight carries.
    loads_sending: Option<u64>,
    /// Samples taken so far (numbers them).
    samples: u64,
    /// When the next sample is due (`None`: none taken yet, due now).
    next_sample: Option<Duration>,
    /// When the last sample was taken for sending, and which workers were busy in it.
    last_taken: Option<Duration>,
    busy: HashSet<WorkerId>,
}

impl Uploader {
    /// An empty uploader.
    pub fn new(config: UploaderConfig) -> Self {
        Self {
            config,
            queue: VecDeque::new(),
            in_flight: None,
            epochs: BTreeMap::new(),
            last_ids: HashMap::new(),
            tails: HashMap::new(),
            queued: HashMap::new(),
            epochs_version: 0,
            announced: 0,
            sending: 0,
            failures: 0,
            retry_at: None,
            counters: UploaderCounters::default(),
            loads: None,
            loads_sending: None,
            samples: 0,
            next_sample: None,
            last_taken: None,
            busy: HashSet::new(),
        }
    }

    /// Whether the local workers' loads should be sampled now (then [`Uploader::set_loads`]).
    pub fn loads_due(&self, now: Duration) -> bool {
        self.next_sample.is_none_or(|at| now >= at)
    }

    /// The local workers' live loads, sampled at `now`. Taken for sending every
    /// `load_interval`, or at once when a worker that was busy in the last sample taken is idle
    /// in this one (a router would otherwise go on counting work that has ended); a sample
    /// taken goes out with the next batch, replacing any older one not yet answered (only the
    /// latest figures matter). An empty sample (no serving workers) sends nothing.
    pub fn set_loads(&mut self, loads: Vec<WorkerLoadReport>, now: Duration) {
        self.next_sample = Some(now + self.config.load_probe.max(Duration::from_millis(1)));
        if loads.is_empty() {
            return;
        }
        let is_idle = |l: &WorkerLoadReport| {
            l.prefill_tokens == 0 && l.decode_blocks == 0 && l.queue_depth == 0
        };
        let went_idle = loads
            .iter()
            .any(|l| is_idle(l) && self.busy.contains(&l.worker));
        let due = self
            .last_taken
            .is_none_or(|at| now.saturating_sub(at) >= self.config.load_interval);
        if !(due || went_idle) {
            return;
        }
        self.busy = loads
            .iter()
            .filter(|l| !is_idle(l))
            .map(|l| l.worker)
            .collect();
        self.last_taken = Some(now);
        self.samples += 1;
        self.loads = Some((loads, now, self.samples));
    }

    /// A worker's engine (re)started with incarnation `epoch` (a number that grows with every
    /// start, e.g. its start time in milliseconds since the Unix epoch). Events pushed from now
    /// on belong to it; the control plane drops the worker's old blocks when it sees it.
    pub fn set_epoch(&mut self, worker: WorkerId, epoch: u64) {
        let old = self.epochs.insert(worker, epoch);
        if old == Some(epoch) {
            return;
        }
        self.epochs_version += 1;
        // The old incarnation's last events may still be on their way (the agent learns of a
        // restart from the pool, not from the event stream): they keep its epoch.
        match (old, self.last_ids.remove(&worker)) {
            (Some(old), Some(last)) => {
                self.tails.insert(worker, Tail { epoch: old, last });
            }
            _ => {
                self.tails.remove(&worker);
            }
        }
    }

    /// The worker is gone from this node: stop announcing its epoch (queued events still go).
    pub fn forget_worker(&mut self, worker: WorkerId) {
        self.epochs.remove(&worker);
        self.last_ids.remove(&worker);
        self.tails.remove(&worker);
    }

    /// Events were lost before they reached [`Uploader::push`] (the agent's subscription
    /// lagged). A restarted worker's new incarnation is then told from its old one by the epoch
    /// alone: its first events may have been among those lost, so an id above the old
    /// incarnation's last no longer proves the event is the old one's.
    pub fn events_lost(&mut self) {
        self.tails.clear();
    }

    /// Queues one event, received at `now`.
    pub fn push(&mut self, event: KvEvent, now: Duration) {
        let max = self.config.max_buffered_events.max(1);
        while self.queue.len() >= max {
            // The oldest event that is not part of the batch in flight.
            let index = self.in_flight.unwrap_or(0);
            let Some(dropped) = self.queue.remove(index) else {
                break;
            };
            self.unqueue(dropped.event.worker);
            self.counters.dropped_overflow += 1;
        }
        let worker = event.worker;
        let current = self.epochs.get(&worker).copied().unwrap_or(0);
        // A worker's event ids restart at 0 with each incarnation. After a restart, events whose
        // ids continue the old incarnation's are its last ones (sent before it died, read only
        // now): tagged with the new epoch they would be applied after the reset, and would push
        // the worker's position past the ids its new incarnation then sends, which the control
        // plane would refuse as out of order. The first id that does not continue them is the
        // new incarnation's.
        let epoch = match self.tails.get_mut(&worker) {
            Some(tail) if event.event_id > tail.last => {
                tail.last = event.event_id;
                tail.epoch
            }
            Some(_) => {
                self.tails.remove(&worker);
                current
            }
            None => current,
        };
        if epoch == current {
            self.last_ids.insert(worker, event.event_id);
        }
        *self.queued.entry(event.worker).or_default() += 1;
        self.queue.push_back(Queued {
            at: now,
            epoch,
            event,
        });
    }

    fn unqueue(&mut self, worker: WorkerId) {
        if let Some(count) = self.queued.get_mut(&worker) {
            *count -= 1;
            if *count == 0 {
                self.queued.remove(&worker);
            }
        }
    }

    /// Events held (in flight included).
    pub fn buffered(&self) -> usize {
        self.queue.len()
    }

    /// What happened so far.
    pub fn counters(&self) -> UploaderCounters {
        self.counters
    }

    /// Whether a batch is out and unanswered.
    pub fn in_flight(&self) -> bool {
        self.in_flight.is_some()
    }

    /// The batch to send now, if one is due: when enough events wait, the oldest has waited
    /// `linger`, an epoch change is unannounced, or a retry is due. `None` while a batch is in
    /// flight or a retry is pending.
    pub fn poll(&mut self, now: Duration) -> Option<KvEventBatch> {
        if self.in_flight.is_some() || self.retry_at.is_some_and(|at| now < at) {
            return None;
        }
        let full = self.queue.len() >= self.config.max_batch_events.max(1);
        let lingered = self
            .queue
            .front()
            .is_some_and(|q| now.saturating_sub(q.at) >= self.config.linger);
        let retrying = self.retry_at.is_some() && !self.queue.is_empty();
        let loads_pending = self.loads.is_some();
        if !(full || lingered || self.epochs_dirty() || retrying || loads_pending) {
            return None;
        }
        // Each worker's events in one batch belong to one incarnation: stop at the first event
        // of a newer one (it goes in the next batch, after the epoch that resets the worker).
        let mut batch_epochs: BTreeMap<WorkerId, u64> = BTreeMap::new();
        let mut events = Vec::new();
        let mut blocks = 0usize;
        for queued in self.queue.iter().take(self.config.max_batch_events.max(1)) {
            let size = queued.event.data.block_count();
            if !events.is_empty() && blocks + size > self.config.max_batch_blocks {
                break;
            }
            let epoch = *batch_epochs
                .entry(queued.event.worker)
                .or_insert(queued.epoch);
            if epoch != queued.epoch {
                break;
            }
            blocks += size;
            events.push(queued.event.clone());
        }
        // Workers with nothing queued announce their current epoch (an engine that restarted
        // but has stored nothing yet must still lose its old blocks).
        for (worker, epoch) in &self.epochs {
            if !self.queued.contains_key(worker) {
                batch_epochs.insert(*worker, *epoch);
            }
        }
        self.in_flight = Some(events.len());
        self.sending = self.epochs_version;
        let loads = match &self.loads {
            Some((loads, sampled, number)) => {
                self.loads_sending = Some(*number);
                let age_ms =
                    u64::try_from(now.saturating_sub(*sampled).as_millis()).unwrap_or(u64::MAX);
                loads
                    .iter()
                    .map(|l| WorkerLoadReport { age_ms, ..*l })
                    .collect()
            }
            None => {
                self.loads_sending = None;
                Vec::new()
            }
        };
        Some(KvEventBatch {
            epochs: batch_epochs
                .into_iter()
                .map(|(worker, epoch)| WorkerEpoch { worker, epoch })
                .collect(),
            events,
            loads,
        })
    }

    /// The sample the answered (or refused) batch carried is done with, unless a newer one
    /// replaced it meanwhile.
    fn finish_loads(&mut self) {
        if let Some(sent) = self.loads_sending.take()
            && self.loads.as_ref().is_some_and(|(_, _, n)| *n == sent)
        {
            self.loads = None;
        }
    }

    /// The batch from the last [`Uploader::poll`] was answered.
    pub fn on_sent(&mut self, result: &KvEventBatchResult) {
        self.finish_in_flight();
        self.failures = 0;
        self.retry_at = None;
        self.announced = self.sending;
        let c = &mut self.counters;
        c.batches += 1;
        c.applied += u64::from(result.applied);
        c.duplicate += u64::from(result.duplicate);
        c.rejected += u64::from(
            result.unknown_worker + result.broken_chain + result.out_of_order + result.stale_epoch,
        );
        c.loads_sent += u64::from(result.loads_applied);
        c.loads_rejected += u64::from(result.loads_rejected);
        self.finish_loads();
    }

    /// The batch from the last [`Uploader::poll`] failed. `retryable` (transport errors,
    /// timeouts, 5xx, 429): the same events go again after a backoff, which is safe because the
    /// control plane ignores events it already has. Otherwise (4xx: the batch itself is bad)
    /// the batch is dropped and counted.
    pub fn on_failed(&mut self, retryable: bool, now: Duration) {
        if retryable {
            // The same sample goes again (older by then, and said so) unless a newer one comes.
            self.loads_sending = None;
            self.in_flight = None;
            self.failures = self.failures.saturating_add(1);
            self.counters.retries += 1;
            self.retry_at = Some(now + self.retry_delay());
        } else {
            let dropped = self.in_flight.unwrap_or(0) as u64;
            self.finish_in_flight();
            self.finish_loads();
            self.counters.dropped_refused += dropped;
            self.retry_at = None;
        }
    }

    /// An epoch changed that no answered batch has carried yet.
    fn epochs_dirty(&self) -> bool {
        self.epochs_version != self.announced
    }

    fn finish_in_flight(&mut self) {
        let count = self.in_flight.take().unwrap_or(0);
        for _ in 0..count {
            if let Some(done) = self.queue.pop_front() {
                self.unqueue(done.event.worker);
            }
        }
    }

    fn retry_delay(&self) -> Duration {
        let factor = 1u32 << self.failures.saturating_sub(1).min(16);
        self.config
            .retry_base
            .saturating_mul(factor)
            .min(self.config.retry_max)
    }

    /// When [`Uploader::poll`] may next return a batch, or loads are next due, without new
    /// input (`None`: only after an answer).
    pub fn next_wakeup(&self) -> Option<Duration> {
        if self.in_flight.is_some() {
            return None;
        }
        let earliest = |a: Option<Duration>, b: Option<Duration>| match (a, b) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if let Some(at) = self.retry_at {
            // Whatever waits goes with the retry; otherwise only the next sample is due.
            let waiting = !self.queue.is_empty() || self.epochs_dirty() || self.loads.is_some();
            return if waiting { Some(at) } else { self.next_sample };
        }
        if self.epochs_dirty() || self.loads.is_some() {
            return Some(Duration::ZERO);
        }
        let linger = self.queue.front().map(|q| q.at + self.config.linger);
        earliest(linger, self.next_sample)
    }
}

// ----- follower ------------------------------------------------------------------------------

/// What a follower applies the stream to: one [`Router`], or the agent's set of per-model
/// routers (which then dispatches by worker).
pub trait KvSink {
    /// Applies an event the control plane applied. A per-worker gap is expected (the control
    /// plane accepted it too) and is not an error here.
    fn apply_event(&mut self, event: &KvEvent, now: Duration) -> Result<(), EventError>;
    /// The worker's engine restarted: its blocks are gone, its event ids restart at 0.
    fn reset_worker(&mut self, worker: WorkerId);
    /// The worker is gone (its node was lost or removed, or it was stopped).
    fn remove_worker(&mut self, worker: WorkerId);
    /// Replaces the index with the snapshot's: named workers get its blocks and positions,
    /// every other worker loses its blocks.
    fn restore(&mut self, snapshot: &KvSnapshot);
    /// The routing mode in force.
    fn mode(&self) -> RoutingMode;
    /// Switches the routing mode (index, load and workers kept).
    fn set_mode(&mut self, mode: RoutingMode);
    /// Takes in a worker's published load, measured at `at` (on the sink's clock): own
    /// decisions made since still count on top of it. `false` (nothing changed) for a worker
    /// the sink does not know: it enters through events or the fleet directory, not through
    /// loads, so an expiring report never brings a removed worker back.
    fn apply_load(&mut self, worker: WorkerId, load: WorkerLoad, at: Duration) -> bool;
}

/// Capacity for a worker first heard of through the stream. The agent's worker directory
/// updates it with [`Router::add_worker`] when it knows more; 0 means unknown (never
/// "overloaded").
fn unknown_capacity() -> WorkerCapacity {
    WorkerCapacity {
        kv_blocks: 0,
        max_queue_depth: None,
    }
}

fn ensure_worker(router: &mut Router, worker: WorkerId) {
    if router.next_event_id(worker).is_none() {
        // Only fails beyond 2^27 workers; the event is then dropped as from an unknown worker.
        let _ = router.add_worker(worker, unknown_capacity());
    }
}

impl KvSink for Router {
    fn apply_event(&mut self, event: &KvEvent, now: Duration) -> Result<(), EventError> {
        ensure_worker(self, event.worker);
        match self.apply(event, now) {
            Err(EventError::Gap { .. }) => Ok(()),
            other => other,
        }
    }

    fn reset_worker(&mut self, worker: WorkerId) {
        ensure_worker(self, worker);
        let _ = Router::reset_worker(self, worker);
    }

    fn remove_worker(&mut self, worker: WorkerId) {
        Router::remove_worker(self, worker);
    }

    fn restore(&mut self, snapshot: &KvSnapshot) {
        let named: std::collections::HashSet<WorkerId> =
            snapshot.workers.iter().map(|w| w.worker).collect();
        let others: Vec<WorkerId> = self.workers().filter(|w| !named.contains(w)).collect();
        for worker in others {
            let _ = Router::reset_worker(self, worker);
        }
        let mut index = IndexSnapshot::default();
        for worker in &snapshot.workers {
            ensure_worker(self, worker.worker);
            index.workers.push(WorkerSnapshot {
                worker: worker.worker,
                next_event_id: worker.next_event_id,
                tiers: worker
                    .tiers
                    .iter()
                    .map(|t| TierBlocks {
                        tier: t.tier,
                        blocks: t.blocks.clone(),
                    })
                    .collect(),
            });
        }
        Router::restore(self, &index);
    }

    fn mode(&self) -> RoutingMode {
        self.config().mode
    }

    fn set_mode(&mut self, mode: RoutingMode) {
        Router::set_mode(self, mode);
    }

    fn apply_load(&mut self, worker: WorkerId, load: WorkerLoad, at: Duration) -> bool {
        Router::apply_load(self, worker, load, at).is_ok()
    }
}

/// How the follower reacts to an unreachable control plane.
#[derive(Debug, Clone, PartialEq)]
pub struct FollowerConfig {
    /// After this long without a successful answer the router falls back to `approximate`
    /// (a short blip does not: the stream just continues where it was).
    pub fallback_after: Duration,
    /// First retry delay after a failure; doubles per failure...
    pub retry_base: Duration,
    /// ...up to this.
    pub retry_max: Duration,
    /// A worker's load report stops counting this long after it was measured, unless a newer
    /// one came (its agent stopped reporting, or the control plane is away). Workers report
    /// every half second.
    pub load_ttl: Duration,
}

impl Default for FollowerConfig {
    fn default() -> Self {
        Self {
            fallback_after: Duration::from_secs(3),
            retry_base: Duration::from_millis(100),
            retry_max: Duration::from_secs(5),
            load_ttl: Duration::from_secs(3),
        }
    }
}

/// What the follower wants next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FollowerRequest {
    /// `GET /api/v1/agent/kv-snapshot`, then [`Follower::on_snapshot`].
    Snapshot,
    /// `GET /api/v1/agent/kv-stream?after=..&loads_after=..` (with a `wait_s`), then
    /// [`Follower::on_page`].
    Stream {
        /// The last sequence number applied.
        after: u64,
        /// The last load version seen.
        loads_after: u64,
    },
}

/// What [`Follower::on_page`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageOutcome {
    /// This many items were applied (0: nothing new).
    Applied(usize),
    /// The page could not be applied; the next request is a snapshot.
    Resync(ResyncReason),
}

/// Why the follower needs a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResyncReason {
    /// The control plane said so (the position is older than it retains, or newer than it has).
    Requested,
    /// The page's sequence numbers do not continue from the last one applied.
    Gap {
        /// The sequence number expected.
        expected: u64,
        /// The one that came.
        got: u64,
    },
}

/// What the follower did, for the agent's metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct FollowerCounters {
    /// Stream items applied.
    pub items: u64,
    /// Snapshots loaded.
    pub snapshots: u64,
    /// Re-syncs the control plane asked for.
    pub resyncs_requested: u64,
    /// Holes in sequence numbers detected.
    pub gaps: u64,
    /// Events the router refused (duplicate, out of order, broken chain: its state differed
    /// from the stream's; the next snapshot repairs it).
    pub event_errors: u64,
    /// Times the router fell back to approximate mode.
    pub fallbacks: u64,
    /// Failed requests.
    pub failures: u64,
    /// Worker load reports applied to the router.
    #[serde(default)]
    pub loads: u64,
    /// Load reports that stopped counting because no newer one came within `load_ttl`.
    #[serde(default)]
    pub loads_expired: u64,
}

/// Follows the control plane's KV stream into a router: snapshot, then pages in sequence;
/// any hole → snapshot again; control plane unreachable for `fallback_after` → approximate
/// mode (the index is kept), and back to the configured mode after the next snapshot.
#[derive(Debug)]
pub struct Follower {
    config: FollowerConfig,
    /// The last sequence number applied; `None` until a snapshot is loaded.
    after: Option<u64>,
    /// When the control plane last answered.
    last_ok: Option<Duration>,
    /// The mode to return to, while fallen back.
    saved_mode: Option<RoutingMode>,
    fallen_back: bool,
    failures: u32,
    counters: FollowerCounters,
    /// The load version of the last page.
    loads_after: u64,
    /// When each worker's last applied load report was measured.
    loads: HashMap<WorkerId, Duration>,
}

impl Follower {
    /// A follower that starts by loading a snapshot.
    pub fn new(config: FollowerConfig) -> Self {
        Self {
            config,
            after: None,
            last_ok: None,
            saved_mode: None,
            fallen_back: false,
            failures: 0,
            counters: FollowerCounters::default(),
            loads_after: 0,
            loads: HashMap::new(),
        }
    }

    /// The request to make next.
    pub fn next_request(&self) -> FollowerRequest {
        match self.after {
            None => FollowerRequest::Snapshot,
            Some(after) => FollowerRequest::Stream {
                after,
                loads_after: self.loads_after,
            },
        }
    }

    /// The last sequence number applied (`None` before the first snapshot or after a hole).
    pub fn position(&self) -> Option<u64> {
        self.after
    }

    /// Whether the router is running on its own predictions because the control plane is away.
    pub fn is_fallen_back(&self) -> bool {
        self.fallen_back
    }

    /// What happened so far.
    pub fn counters(&self) -> FollowerCounters {
        self.counters
    }

    fn answered(&mut self, now: Duration) {
        self.last_ok = Some(now);
        self.failures = 0;
    }

    /// A snapshot arrived: the router's index becomes exactly the snapshot (predictions made
    /// while fallen back are dropped), the configured mode returns, and the stream continues
    /// from `snapshot.seq`.
    pub fn on_snapshot(&mut self, sink: &mut impl KvSink, snapshot: &KvSnapshot, now: Duration) {
        self.answered(now);
        sink.restore(snapshot);
        if let Some(mode) = self.saved_mode.take() {
            sink.set_mode(mode);
        }
        self.fallen_back = false;
        self.after = Some(snapshot.seq);
        self.counters.snapshots += 1;
    }

    /// A stream page arrived.
    pub fn on_page(
        &mut self,
        sink: &mut impl KvSink,
        page: &KvStreamPage,
        now: Duration,
    ) -> PageOutcome {
        self.answered(now);
        let Some(after) = self.after else {
            // Not synced yet (a page for an old request): the snapshot comes first.
            return PageOutcome::Resync(ResyncReason::Requested);
        };
        if page.resync {
            self.counters.resyncs_requested += 1;
            self.after = None;
            return PageOutcome::Resync(ResyncReason::Requested);
        }
        // Items already applied (a repeated answer) are skipped; the rest must continue
        // without holes. Checked before anything is applied, so a bad page changes nothing.
        let fresh: Vec<_> = page.items.iter().filter(|i| i.seq > after).collect();
        for (k, item) in fresh.iter().enumerate() {
            let expected = after + 1 + k as u64;
            if item.seq != expected {
                self.counters.gaps += 1;
                self.after = None;
                return PageOutcome::Resync(ResyncReason::Gap {
                    expected,
                    got: item.seq,
                });
            }
        }
        for item in &fresh {
            match &item.item {
                KvStreamItem::Event { event } => {
                    if sink.apply_event(event, now).is_err() {
                        self.counters.event_errors += 1;
                    }
                }
                KvStreamItem::WorkerReset { worker, .. } => sink.reset_worker(*worker),
                KvStreamItem::WorkerRemoved { worker } => {
                    sink.remove_worker(*worker);
                    self.loads.remove(worker);
                }
            }
            self.after = Some(item.seq);
        }
        self.counters.items += fresh.len() as u64;
        self.apply_loads(sink, &page.loads, now);
        self.loads_after = page.loads_version;
        self.expire_loads(sink, now);
        PageOutcome::Applied(fresh.len())
    }

    /// Applies a page's load reports, each dated `now - age`; a report no newer than the one
    /// applied last for its worker (a repeated page, another replica's older copy), already
    /// past `load_ttl`, or of a worker the router does not know (yet) is skipped.
    fn apply_loads(&mut self, sink: &mut impl KvSink, loads: &[WorkerLoadReport], now: Duration) {
        for report in loads {
            let age = Duration::from_millis(report.age_ms);
            if age >= self.config.load_ttl {
                continue;
            }
            let at = now.saturating_sub(age);
            if self
                .loads
                .get(&report.worker)
                .is_some_and(|last| *last >= at)
            {
                continue;
            }
            let load = WorkerLoad {
                prefill_tokens: report.prefill_tokens,
                decode_blocks: report.decode_blocks,
                queue_depth: report.queue_depth,
            };
            if sink.apply_load(report.worker, load, at) {
                self.loads.insert(report.worker, at);
                self.counters.loads += 1;
            }
        }
    }

    /// Reports older than `load_ttl` stop counting: each is replaced by an empty report dated
    /// as it was, so the router's own decisions since still count and nothing else does.
    fn expire_loads(&mut self, sink: &mut impl KvSink, now: Duration) {
        let ttl = self.config.load_ttl;
        let stale: Vec<(WorkerId, Duration)> = self
            .loads
            .iter()
            .filter(|(_, at)| now.saturating_sub(**at) >= ttl)
            .map(|(w, at)| (*w, *at))
            .collect();
        for (worker, at) in stale {
            self.loads.remove(&worker);
            if sink.apply_load(worker, WorkerLoad::default(), at) {
                self.counters.loads_expired += 1;
            }
        }
    }

    /// A request failed (transport error, timeout, 5xx). Once the control plane has been away
    /// for `fallback_after` (at once if it never answered), a router in `kv` mode switches to
    /// `approximate`, keeping its index; when it answers again, the follower re-syncs from a
    /// snapshot, which also drops the predictions.
    pub fn on_unreachable(&mut self, sink: &mut impl KvSink, now: Duration) {
        self.failures = self.failures.saturating_add(1);
        self.counters.failures += 1;
        self.expire_loads(sink, now);
        let away_long_enough = self
            .last_ok
            .is_none_or(|ok| now.saturating_sub(ok) >= self.config.fallback_after);
        if away_long_enough && !self.fallen_back {
            self.fallen_back = true;
            self.counters.fallbacks += 1;
            if sink.mode() == RoutingMode::Kv {
                self.saved_mode = Some(RoutingMode::Kv);
                sink.set_mode(RoutingMode::Approximate);
            }
            self.after = None;
        }
    }

    /// How long to wait before the next request after a failure (0 after a success).
    pub fn retry_delay(&self) -> Duration {
        if self.failures == 0 {
            return Duration::ZERO;
        }
        let factor = 1u32 << (self.failures - 1).min(16);
        self.config
            .retry_base
            .saturating_mul(factor)
            .min(self.config.retry_max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvfleet_kv_router::{RequestId, RouteRequest, RouterConfig};
    use kvfleet_proto::hash::{BlockSize, block_hashes};
    use kvfleet_proto::kv_stream::{KvTierBlocks, KvWorkerSnapshot, SequencedItem};
    use kvfleet_proto::{KvEventData, SequenceHash, Tier};

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn tokens(first: u32) -> Vec<u32> {
        (first..first + 64).collect()
    }

    fn stored(worker: u64, event_id: u64, first: u32) -> KvEvent {
        KvEvent {
            worker: WorkerId(worker),
            event_id,
            tier: Tier::G1,
            data: KvEventData::Stored {
                parent: None,
                blocks: block_hashes(&tokens(first), BlockSize::default()),
            },
        }
    }

    fn hashes(first: u32) -> Vec<SequenceHash> {
        block_hashes(&tokens(first), BlockSize::default())
            .iter()
            .map(|b| b.sequence)
            .collect()
    }

    fn event_item(seq: u64, event: KvEvent) -> SequencedItem {
        SequencedItem {
            seq,
            item: KvStreamItem::Event { event },
        }
    }

    fn page(items: Vec<SequencedItem>, head: u64) -> KvStreamPage {
        let next_after = items.last().map_or(0, |i| i.seq);
        KvStreamPage {
            items,
            next_after,
            head_seq: head,
            ..KvStreamPage::default()
        }
    }

    fn snapshot(seq: u64, workers: &[(u64, u64, u32)]) -> KvSnapshot {
        KvSnapshot {
            seq,
            workers: workers
                .iter()
                .map(|&(worker, next, first)| KvWorkerSnapshot {
                    worker: WorkerId(worker),
                    epoch: 0,
                    next_event_id: next,
                    tiers: vec![KvTierBlocks {
                        tier: Tier::G1,
                        blocks: hashes(first),
                    }],
                })
                .collect(),
        }
    }

    fn router() -> Router {
        let mut router = Router::new(RouterConfig::default());
        for id in [1, 2] {
            router
                .add_worker(
                    WorkerId(id),
                    WorkerCapacity {
                        kv_blocks: 1000,
                        max_queue_depth: None,
                    },
                )
                .unwrap();
        }
        router
    }

    /// Which worker a request for the prompt starting at `first` goes to.
    fn route(router: &mut Router, id: u128, first: u32, now: Duration) -> WorkerId {
        let h = hashes(first);
        let decision = router
            .select(&RouteRequest::new(RequestId(id), &h, 64), now)
            .unwrap();
        router.finished(RequestId(id), now);
        decision.worker
    }

    #[test]
    fn follows_a_snapshot_then_pages_in_sequence() {
        let mut router = router();
        let mut follower = Follower::new(FollowerConfig::default());
        assert_eq!(follower.next_request(), FollowerRequest::Snapshot);
        follower.on_snapshot(&mut router, &snapshot(10, &[(2, 5, 0)]), ms(0));
        assert_eq!(
            follower.next_request(),
            FollowerRequest::Stream {
                after: 10,
                loads_after: 0
            }
        );
        assert_eq!(route(&mut router, 1, 0, ms(1)), WorkerId(2));
        assert_eq!(router.next_event_id(WorkerId(2)), Some(5));

        let outcome = follower.on_page(
            &mut router,
            &page(
                vec![
                    event_item(11, stored(1, 0, 1000)),
                    event_item(12, stored(3, 0, 2000)),
                ],
                12,
            ),
            ms(2),
        );
        assert_eq!(outcome, PageOutcome::Applied(2));
        assert_eq!(follower.position(), Some(12));
        assert_eq!(route(&mut router, 2, 1000, ms(3)), WorkerId(1));
        // Worker 3 was first heard of through the stream: registered with unknown capacity.
        assert_eq!(route(&mut router, 3, 2000, ms(4)), WorkerId(3));
        // A repeated page changes nothing.
        let again = follower.on_page(
            &mut router,
            &page(vec![event_item(12, stored(3, 0, 2000))], 12),
            ms(5),
        );
        assert_eq!(again, PageOutcome::Applied(0));
        assert_eq!(follower.counters().event_errors, 0);
        // Resets and removals.
        follower.on_page(
            &mut router,
            &page(
                vec![
                    SequencedItem {
                        seq: 13,
                        item: KvStreamItem::WorkerReset {
                            worker: WorkerId(1),
                            epoch: 2,
                        },
                    },
                    SequencedItem {
                        seq: 14,
                        item: KvStreamItem::WorkerRemoved {
                            worker: WorkerId(3),
                        },
                    },
                ],
                14,
            ),
            ms(6),
        );
        assert_eq!(router.worker_blocks(WorkerId(1)), Some([0; 4]));
        assert_eq!(router.next_event_id(WorkerId(3)), None);
    }

    #[test]
    fn a_hole_in_sequence_numbers_asks_for_a_snapshot_and_applies_nothing() {
        let mut router = router();
        let mut follower = Follower::new(FollowerConfig::default());
        follower.on_snapshot(&mut router, &snapshot(10, &[]), ms(0));
        let outcome = follower.on_page(
            &mut router,
            &page(
                vec![
                    event_item(11, stored(1, 0, 0)),
                    event_item(13, stored(1, 2, 500)),
                ],
                13,
            ),
            ms(1),
        );
        assert_eq!(
            outcome,
            PageOutcome::Resync(ResyncReason::Gap {
                expected: 12,
                got: 13
            })
        );
        assert_eq!(follower.next_request(), FollowerRequest::Snapshot);
        assert_eq!(router.worker_blocks(WorkerId(1)), Some([0; 4]));
        assert_eq!(follower.counters().gaps, 1);
        // The snapshot brings the router to the control plane's state and the stream resumes.
        follower.on_snapshot(&mut router, &snapshot(13, &[(1, 3, 500)]), ms(2));
        assert_eq!(
            follower.next_request(),
            FollowerRequest::Stream {
                after: 13,
                loads_after: 0
            }
        );
        assert!(router.holds(WorkerId(1), hashes(500)[0], Tier::G1));

        // The control plane's own resync marker does the same.
        let marker = KvStreamPage {
            resync: true,
            next_after: 13,
            head_seq: 90,
            items: vec![],
            ..KvStreamPage::default()
        };
        assert_eq!(
            follower.on_page(&mut router, &marker, ms(3)),
            PageOutcome::Resync(ResyncReason::Requested)
        );
        assert_eq!(follower.next_request(), FollowerRequest::Snapshot);
    }

    #[test]
    fn a_snapshot_replaces_stale_blocks_of_workers_it_does_not_name() {
        let mut router = router();
        let mut follower = Follower::new(FollowerConfig::default());
        follower.on_snapshot(&mut router, &snapshot(1, &[(1, 1, 0), (2, 1, 800)]), ms(0));
        follower.on_snapshot(&mut router, &snapshot(5, &[(2, 3, 900)]), ms(1));
        assert_eq!(router.worker_blocks(WorkerId(1)), Some([0; 4]));
        assert!(!router.holds(WorkerId(2), hashes(800)[0], Tier::G1));
        assert!(router.holds(WorkerId(2), hashes(900)[0], Tier::G1));
    }

    #[test]
    fn control_plane_away_falls_back_to_approximate_and_resyncs_on_return() {
        let mut router = router();
        let config = FollowerConfig {
            fallback_after: ms(3000),
            ..FollowerConfig::default()
        };
        let mut follower = Follower::new(config);
        follower.on_snapshot(&mut router, &snapshot(7, &[(2, 4, 0)]), ms(0));
        // A blip shorter than `fallback_after`: still `kv`, the stream continues where it was.
        follower.on_unreachable(&mut router, ms(1000));
        assert_eq!(router.config().mode, RoutingMode::Kv);
        assert_eq!(
            follower.next_request(),
            FollowerRequest::Stream {
                after: 7,
                loads_after: 0
            }
        );
        assert!(follower.retry_delay() > Duration::ZERO);
        follower.on_unreachable(&mut router, ms(2000));
        assert!(follower.retry_delay() > ms(100), "backs off");
        // Away for longer: approximate mode, the known index kept.
        follower.on_unreachable(&mut router, ms(3500));
        assert!(follower.is_fallen_back());
        assert_eq!(router.config().mode, RoutingMode::Approximate);
        assert_eq!(
            route(&mut router, 1, 0, ms(3600)),
            WorkerId(2),
            "index kept"
        );
        // New prompts are predicted on the worker they were sent to.
        let sent_to = route(&mut router, 2, 5000, ms(3700));
        assert_eq!(route(&mut router, 3, 5000, ms(3800)), sent_to);
        follower.on_unreachable(&mut router, ms(5000));
        assert_eq!(follower.counters().fallbacks, 1);
        // Back: a snapshot (not the old position) replaces the predictions; `kv` again.
        assert_eq!(follower.next_request(), FollowerRequest::Snapshot);
        follower.on_snapshot(&mut router, &snapshot(20, &[(1, 9, 6000)]), ms(6000));
        assert!(!follower.is_fallen_back());
        assert_eq!(router.config().mode, RoutingMode::Kv);
        assert_eq!(follower.retry_delay(), Duration::ZERO);
        assert!(router.holds(WorkerId(1), hashes(6000)[0], Tier::G1));
        assert!(
            !router.holds(sent_to, hashes(5000)[0], Tier::G1),
            "prediction dropped"
        );
        assert!(
            !router.holds(WorkerId(2), hashes(0)[0], Tier::G1),
            "snapshot says gone"
        );
    }

    #[test]
    fn a_router_in_another_mode_is_left_alone_and_a_never_reached_cp_falls_back_at_once() {
        let mut router = Router::new(RouterConfig {
            mode: RoutingMode::RoundRobin,
            ..RouterConfig::default()
        });
        let mut follower = Follower::new(FollowerConfig::default());
        follower.on_unreachable(&mut router, ms(0));
        assert!(follower.is_fallen_back());
        assert_eq!(router.config().mode, RoutingMode::RoundRobin);
        follower.on_snapshot(&mut router, &snapshot(1, &[]), ms(10));
        assert_eq!(router.config().mode, RoutingMode::RoundRobin);
    }

    fn report(worker: u64, decode_blocks: u64, age_ms: u64) -> WorkerLoadReport {
        WorkerLoadReport {
            worker: WorkerId(worker),
            prefill_tokens: 160,
            decode_blocks,
            queue_depth: 1,
            age_ms,
        }
    }

    fn load_page(after: u64, loads: Vec<WorkerLoadReport>, version: u64) -> KvStreamPage {
        KvStreamPage {
            next_after: after,
            head_seq: after,
            loads,
            loads_version: version,
            ..KvStreamPage::default()
        }
    }

    #[test]
    fn page_loads_reach_the_router_dated_by_age_and_blend_with_own_decisions() {
        let mut router = router();
        let mut follower = Follower::new(FollowerConfig::default());
        follower.on_snapshot(&mut router, &snapshot(4, &[]), ms(0));
        // Worker 1 is busy elsewhere (measured 200 ms before the page arrives); worker 9 is
        // not known to this router: its load is skipped, not registered.
        let page = load_page(4, vec![report(1, 50, 200), report(9, 5, 0)], 17);
        assert_eq!(
            follower.on_page(&mut router, &page, ms(1000)),
            PageOutcome::Applied(0)
        );
        assert_eq!(
            router.worker_load(WorkerId(1)),
            Some(WorkerLoad {
                prefill_tokens: 160,
                decode_blocks: 50,
                queue_depth: 1
            })
        );
        assert_eq!(router.next_event_id(WorkerId(9)), None);
        assert_eq!(follower.counters().loads, 1);
        assert_eq!(
            follower.next_request(),
            FollowerRequest::Stream {
                after: 4,
                loads_after: 17
            }
        );
        // So an unrelated request goes to worker 2, and stays counted there on top of
        // whatever worker 2 reports later.
        let h = hashes(7000);
        let decision = router
            .select(&RouteRequest::new(RequestId(1), &h, 64), ms(1100))
            .unwrap();
        assert_eq!(decision.worker, WorkerId(2));
        // A report measured before that decision does not cover it: it adds on top.
        follower.on_page(
            &mut router,
            &load_page(4, vec![report(2, 10, 50)], 18),
            ms(1120),
        );
        assert_eq!(
            router.worker_load(WorkerId(2)).unwrap().decode_blocks,
            10 + 4
        );
        // The same report again (a repeated page) or an older copy changes nothing.
        follower.on_page(
            &mut router,
            &load_page(4, vec![report(2, 99, 80)], 18),
            ms(1130),
        );
        assert_eq!(router.worker_load(WorkerId(2)).unwrap().decode_blocks, 14);
        // A report already past the TTL is not applied.
        follower.on_page(
            &mut router,
            &load_page(4, vec![report(2, 77, 3000)], 19),
            ms(1140),
        );
        assert_eq!(router.worker_load(WorkerId(2)).unwrap().decode_blocks, 14);
        assert_eq!(follower.counters().loads, 2);
    }

    #[test]
    fn loads_stop_counting_when_reports_stop() {
        let mut router = router();
        let mut follower = Follower::new(FollowerConfig::default());
        follower.on_snapshot(&mut router, &snapshot(1, &[]), ms(0));
        follower.on_page(
            &mut router,
            &load_page(1, vec![report(1, 80, 0)], 1),
            ms(100),
        );
        let h = hashes(100);
        router
            .select(
                &RouteRequest::new(RequestId(5), &h, 64).with_candidates(&[WorkerId(1)]),
                ms(2000),
            )
            .unwrap();
        assert_eq!(router.worker_load(WorkerId(1)).unwrap().decode_blocks, 84);
        // Within the TTL an empty page keeps it; past it (the control plane away, or the
        // worker's agent silent) only the own decision made since still counts.
        follower.on_page(&mut router, &load_page(1, vec![], 1), ms(3000));
        assert_eq!(router.worker_load(WorkerId(1)).unwrap().decode_blocks, 84);
        follower.on_unreachable(&mut router, ms(3200));
        assert_eq!(
            router.worker_load(WorkerId(1)),
            Some(WorkerLoad {
                prefill_tokens: 64,
                decode_blocks: 4,
                queue_depth: 0
            })
        );
        assert_eq!(follower.counters().loads_expired, 1);
        // A removed worker's expiry does not bring it back.
        follower.on_page(
            &mut router,
            &load_page(1, vec![report(2, 5, 0)], 2),
            ms(3300),
        );
        router.remove_worker(WorkerId(2));
        follower.on_unreachable(&mut router, ms(9000));
        assert_eq!(router.next_event_id(WorkerId(2)), None);
    }

    #[test]
    fn loads_are_sent_every_interval_with_or_without_events() {
        let mut up = uploader(10, 100);
        assert!(up.loads_due(ms(0)), "the first sample is due at once");
        up.set_loads(vec![report(1, 3, 0), report(2, 0, 0)], ms(0));
        assert!(!up.loads_due(ms(99)));
        assert!(up.loads_due(ms(100)), "sampled every probe interval");
        assert_eq!(up.next_wakeup(), Some(Duration::ZERO), "loads wait");
        // No events: the loads go alone, aged by the time since sampling.
        let batch = up.poll(ms(5)).unwrap();
        assert!(batch.events.is_empty());
        assert_eq!(batch.loads, vec![report(1, 3, 5), report(2, 0, 5)]);
        // A newer sample taken while that batch is in flight is kept for the next one.
        up.set_loads(vec![report(1, 9, 0)], ms(500));
        up.on_sent(&KvEventBatchResult {
            loads_applied: 2,
            ..KvEventBatchResult::default()
        });
        assert_eq!(up.counters().loads_sent, 2);
        let next = up.poll(ms(510)).unwrap();
        assert_eq!(next.loads, vec![report(1, 9, 10)]);
        // A failed upload sends the same sample again with the retry, older by then; events
        // pushed meanwhile ride along.
        up.on_failed(true, ms(520));
        up.push(stored(1, 0, 0), ms(530));
        assert!(up.poll(ms(600)).is_none(), "backing off");
        let retry = up.poll(ms(620)).unwrap();
        assert_eq!(retry.loads, vec![report(1, 9, 120)]);
        assert_eq!(retry.events.len(), 1);
        up.on_sent(&ok(1));
        assert!(up.poll(ms(630)).is_none());
        // A node with no serving worker sends no empty load batches.
        up.set_loads(vec![], ms(1000));
        assert!(up.poll(ms(1000)).is_none());
        assert_eq!(up.next_wakeup(), Some(ms(1100)), "the next probe");
        // A refused batch (4xx) drops its sample too.
        up.set_loads(vec![report(2, 1, 0)], ms(1100));
        assert!(up.poll(ms(1100)).is_some());
        up.on_failed(false, ms(1110));
        assert!(up.poll(ms(1120)).is_none());
    }

    #[test]
    fn a_worker_going_idle_is_reported_at_once() {
        let idle = |worker| WorkerLoadReport {
            worker: WorkerId(worker),
            prefill_tokens: 0,
            decode_blocks: 0,
            queue_depth: 0,
            age_ms: 0,
        };
        let mut up = uploader(10, 100);
        up.set_loads(vec![report(1, 5, 0), idle(2)], ms(1000));
        up.poll(ms(1000)).unwrap();
        up.on_sent(&ok(0));
        // Figures that merely change wait for the interval...
        up.set_loads(vec![report(1, 6, 0), idle(2)], ms(1100));
        assert!(up.poll(ms(1100)).is_none());
        // ...but worker 1 finishing its work goes out at the next probe.
        up.set_loads(vec![idle(1), idle(2)], ms(1200));
        let batch = up.poll(ms(1200)).unwrap();
        assert_eq!(batch.loads, vec![idle(1), idle(2)]);
        up.on_sent(&ok(0));
        // Idle stays idle: nothing new until the interval.
        up.set_loads(vec![idle(1), idle(2)], ms(1300));
        assert!(up.poll(ms(1300)).is_none());
        up.set_loads(vec![idle(1), idle(2)], ms(1700));
        assert!(up.poll(ms(1700)).is_some(), "every interval regardless");
    }

    fn uploader(max_batch: usize, max_buffered: usize) -> Uploader {
        Uploader::new(UploaderConfig {
            max_batch_events: max_batch,
            max_batch_blocks: 1_000,
            max_buffered_events: max_buffered,
            linger: ms(20),
            retry_base: ms(100),
            retry_max: ms(1000),
            load_interval: ms(500),
            load_probe: ms(100),
        })
    }

    fn ids(batch: &KvEventBatch) -> Vec<(u64, u64)> {
        batch
            .events
            .iter()
            .map(|e| (e.worker.0, e.event_id))
            .collect()
    }

    fn ok(applied: u32) -> KvEventBatchResult {
        KvEventBatchResult {
            applied,
            ..KvEventBatchResult::default()
        }
    }

    #[test]
    fn batches_by_size_or_linger_one_at_a_time() {
        let mut up = uploader(3, 100);
        assert!(up.poll(ms(0)).is_none());
        up.push(stored(1, 0, 0), ms(0));
        up.push(stored(1, 1, 0), ms(1));
        assert!(up.poll(ms(5)).is_none(), "neither full nor lingered");
        assert_eq!(up.next_wakeup(), Some(ms(20)));
        let batch = up.poll(ms(20)).unwrap();
        assert_eq!(ids(&batch), vec![(1, 0), (1, 1)]);
        // One batch in flight at a time, even when the next is full.
        for i in 2..8 {
            up.push(stored(1, i, 0), ms(21));
        }
        assert!(up.poll(ms(100)).is_none());
        up.on_sent(&ok(2));
        let batch = up.poll(ms(100)).unwrap();
        assert_eq!(ids(&batch), vec![(1, 2), (1, 3), (1, 4)]);
        up.on_sent(&ok(3));
        assert_eq!(up.buffered(), 3);
        assert_eq!(up.counters().applied, 5);
    }

    #[test]
    fn failures_retry_the_same_events_with_backoff_and_refusals_drop_them() {
        let mut up = uploader(10, 100);
        up.push(stored(1, 0, 0), ms(0));
        up.push(stored(2, 0, 0), ms(0));
        let first = up.poll(ms(30)).unwrap();
        up.push(stored(1, 1, 0), ms(31));
        up.on_failed(true, ms(40));
        assert!(up.poll(ms(100)).is_none(), "backing off");
        assert_eq!(up.next_wakeup(), Some(ms(140)));
        let retry = up.poll(ms(140)).unwrap();
        // The same events first (so the control plane can recognise them), then the new one.
        assert_eq!(ids(&retry)[..2], ids(&first)[..]);
        assert_eq!(ids(&retry), vec![(1, 0), (2, 0), (1, 1)]);
        up.on_failed(true, ms(150));
        assert!(up.poll(ms(300)).is_none(), "the backoff doubled");
        assert!(up.poll(ms(350)).is_some_and(|b| b.events.len() == 3));
        // A 4xx: that batch is dropped for good and counted.
        up.on_failed(false, ms(360));
        assert_eq!(up.buffered(), 0);
        assert_eq!(up.counters().dropped_refused, 3);
        assert_eq!(up.counters().retries, 2);
        assert!(up.poll(ms(400)).is_none());
    }

    #[test]
    fn memory_is_bounded_by_dropping_the_oldest_unsent_events() {
        let mut up = uploader(2, 4);
        for i in 0..3 {
            up.push(stored(1, i, 0), ms(0));
        }
        let in_flight = up.poll(ms(0)).unwrap();
        assert_eq!(ids(&in_flight), vec![(1, 0), (1, 1)]);
        for i in 3..7 {
            up.push(stored(1, i, 0), ms(1));
        }
        assert_eq!(up.buffered(), 4);
        assert_eq!(up.counters().dropped_overflow, 3);
        up.on_sent(&ok(2));
        // The in-flight events were kept; events 2..4 were dropped (the control plane will see
        // a gap from 2 to 5 and apply what follows).
        let next = up.poll(ms(50)).unwrap();
        assert_eq!(ids(&next), vec![(1, 5), (1, 6)]);
    }

    #[test]
    fn batches_close_early_at_the_block_budget() {
        // 64-token prompts: 4 blocks per event; the budget is 1,000 blocks.
        let mut up = uploader(500, 1000);
        for i in 0..300 {
            up.push(stored(1, i, 0), ms(0));
        }
        let first = up.poll(ms(30)).unwrap();
        assert_eq!(first.events.len(), 250);
        up.on_sent(&ok(250));
        assert_eq!(up.poll(ms(30)).unwrap().events.len(), 50);
    }

    #[test]
    fn an_engine_restart_splits_batches_at_the_new_epoch() {
        let mut up = uploader(10, 100);
        up.set_epoch(WorkerId(1), 100);
        up.set_epoch(WorkerId(2), 7);
        up.push(stored(1, 5, 0), ms(0));
        up.push(stored(2, 0, 0), ms(0));
        up.set_epoch(WorkerId(1), 200);
        up.push(stored(1, 0, 0), ms(0));
        let first = up.poll(ms(0)).unwrap();
        assert_eq!(ids(&first), vec![(1, 5), (2, 0)]);
        let epochs: Vec<(u64, u64)> = first.epochs.iter().map(|e| (e.worker.0, e.epoch)).collect();
        assert_eq!(epochs, vec![(1, 100), (2, 7)]);
        up.on_sent(&ok(2));
        let second = up.poll(ms(30)).unwrap();
        assert_eq!(ids(&second), vec![(1, 0)]);
        let epochs: Vec<(u64, u64)> = second
            .epochs
            .iter()
            .map(|e| (e.worker.0, e.epoch))
            .collect();
        assert_eq!(epochs, vec![(1, 200), (2, 7)]);
        up.on_sent(&ok(1));
        // A restart with nothing stored yet is still announced (its old blocks must go).
        up.set_epoch(WorkerId(2), 8);
        assert_eq!(up.next_wakeup(), Some(Duration::ZERO));
        let announce = up.poll(ms(40)).unwrap();
        assert!(announce.events.is_empty());
        assert!(announce.epochs.contains(&WorkerEpoch {
            worker: WorkerId(2),
            epoch: 8
        }));
        // An epoch change while a batch is in flight is announced by the next one.
        up.set_epoch(WorkerId(1), 300);
        up.on_sent(&ok(0));
        let later = up.poll(ms(50)).unwrap();
        assert!(later.epochs.contains(&WorkerEpoch {
            worker: WorkerId(1),
            epoch: 300
        }));
        up.on_sent(&ok(0));
        assert!(up.poll(ms(60)).is_none());
    }

    fn epochs_of(batch: &KvEventBatch) -> Vec<(u64, u64)> {
        batch.epochs.iter().map(|e| (e.worker.0, e.epoch)).collect()
    }

    /// The bug behind a restarted worker's new blocks going uncredited: its old incarnation's
    /// last events, read after the restart was seen, went out under the new epoch; the control
    /// plane applied them after the reset (a gap), which moved the worker's position past the
    /// ids its new incarnation then sent, and refused those as out of order.
    #[test]
    fn an_old_incarnations_late_events_keep_its_epoch() {
        let mut up = uploader(10, 100);
        up.set_epoch(WorkerId(1), 100);
        for id in 0..3 {
            up.push(stored(1, id, 0), ms(0));
        }
        let first = up.poll(ms(30)).unwrap();
        assert_eq!(epochs_of(&first), vec![(1, 100)]);
        up.on_sent(&ok(3));
        // The engine dies and restarts; the agent sees the restart before it reads the old
        // incarnation's last two events, then the new one's first.
        up.set_epoch(WorkerId(1), 200);
        up.push(stored(1, 3, 0), ms(40));
        up.push(stored(1, 4, 0), ms(40));
        up.push(stored(1, 0, 64), ms(40));
        up.push(stored(1, 1, 64), ms(40));
        let late = up.poll(ms(70)).unwrap();
        assert_eq!(ids(&late), vec![(1, 3), (1, 4)]);
        assert_eq!(
            epochs_of(&late),
            vec![(1, 100)],
            "the old incarnation's events"
        );
        up.on_sent(&ok(2));
        let new = up.poll(ms(70)).unwrap();
        assert_eq!(ids(&new), vec![(1, 0), (1, 1)]);
        assert_eq!(
            epochs_of(&new),
            vec![(1, 200)],
            "the new incarnation's, after its reset"
        );
        up.on_sent(&ok(2));
        // Its ids now pass the old incarnation's last: still the new epoch.
        for id in 2..7 {
            up.push(stored(1, id, 128), ms(80));
        }
        let later = up.poll(ms(110)).unwrap();
        assert_eq!(ids(&later).len(), 5);
        assert_eq!(epochs_of(&later), vec![(1, 200)]);
    }

    #[test]
    fn a_restart_without_late_events_or_after_lost_ones_tags_everything_new() {
        let mut up = uploader(10, 100);
        up.set_epoch(WorkerId(1), 100);
        up.push(stored(1, 0, 0), ms(0));
        up.set_epoch(WorkerId(1), 200);
        // The new incarnation's first event (id 0) ends the old one's tail at once.
        up.push(stored(1, 0, 64), ms(0));
        up.push(stored(1, 1, 64), ms(0));
        let old = up.poll(ms(30)).unwrap();
        assert_eq!((ids(&old), epochs_of(&old)), (vec![(1, 0)], vec![(1, 100)]));
        up.on_sent(&ok(1));
        let new = up.poll(ms(30)).unwrap();
        assert_eq!(
            (ids(&new), epochs_of(&new)),
            (vec![(1, 0), (1, 1)], vec![(1, 200)])
        );
        up.on_sent(&ok(2));
        // A worker that stored nothing before its restart has no tail.
        up.set_epoch(WorkerId(2), 7);
        up.set_epoch(WorkerId(2), 8);
        up.push(stored(2, 5, 0), ms(40));
        let batch = up.poll(ms(70)).unwrap();
        assert_eq!(epochs_of(&batch), vec![(1, 200), (2, 8)]);
        up.on_sent(&ok(1));
        // Lost events: the new incarnation's first ids may be among them, so an id above the
        // old incarnation's last proves nothing; the new epoch wins.
        up.push(stored(1, 2, 64), ms(80));
        up.set_epoch(WorkerId(1), 300);
        up.events_lost();
        up.push(stored(1, 9, 0), ms(80));
        let after_loss = up.poll(ms(110)).unwrap();
        assert_eq!(ids(&after_loss), vec![(1, 2)]);
        up.on_sent(&ok(1));
        let after_loss = up.poll(ms(110)).unwrap();
        assert_eq!(
            (ids(&after_loss), epochs_of(&after_loss)),
            (vec![(1, 9)], vec![(1, 300), (2, 8)])
        );
    }
}
