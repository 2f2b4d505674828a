//! The discrete-event loop: trace arrivals, N mock engines and one router on a virtual clock.
//!
//! The simulator plays the agent's part. At each request's arrival it synthesises the prompt
//! ([`crate::trace::synthesize_prompt`]), asks the [`Router`] for a worker and submits the
//! request to that worker's [`MockEngine`]. The engines' KV events and their periodic load
//! reports reach the router only after [`SimConfig::event_delay`], the way they would cross the
//! network in a real fleet, so routing decisions blend stale reports with the router's own
//! recent decisions exactly as the agent's router will. When a request's first token comes back
//! the router hears `prefill_done`; when its last token does, `finished`.
//!
//! Time is a [`Duration`] since the trace's epoch; nothing reads the wall clock except the
//! measurement of how long the run took. Events at the same instant are handled in a fixed
//! order (engine steps, then deliveries to the router, then load-report ticks, then arrivals,
//! each in worker or trace order), so a run is a pure function of its config and trace.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvfleet_engine::{
    ConfigError, Engine, EngineOutput, ExecError, KvExport, MockEngine, MockExecutor, MockProfile,
    PoolSizing, Request, RequestId as EngineRequestId, SchedulerConfig,
};
use kvfleet_kv_router::{
    PredictionSummary, PrefillDecision, RequestId, RouteError, RouteRequest, Router, RouterConfig,
    RoutingMode, TooManyWorkers, WorkerCapacity, WorkerLoad, choose_prefill,
};
use kvfleet_proto::api::DisaggregationPolicy;
use kvfleet_proto::hash::{block_hashes, sequence_hashes};
use kvfleet_proto::profile::ProfileError;
use kvfleet_proto::{KvDtype, KvEvent, KvLayout, SamplingParams, WorkerId};

use crate::planner::IntervalStats;
use crate::report::{Rejection, SimReport, WorkerReport};
use crate::stats::{LogHistogram, percentiles, quantile};
use crate::trace::{TraceRequest, synthesize_prompt};

/// Everything a run needs besides the trace.
#[derive(Debug, Clone, PartialEq)]
pub struct SimConfig {
    /// Workers in the fleet (ids 1..=workers).
    pub workers: usize,
    /// The mock engines' timing profile; its `kv_cache_bytes` sizes each engine's KV pool
    /// when [`SimConfig::pool_from_profile`] is set.
    pub profile: MockProfile,
    /// Each engine's scheduler limits; `worker` is overwritten per engine.
    pub scheduler: SchedulerConfig,
    /// Size the KV pool from `profile.kv_cache_bytes` (true) or keep `scheduler.kv_memory`.
    pub pool_from_profile: bool,
    /// The router; its `block_size` is overwritten with the profile's.
    pub router: RouterConfig,
    /// How long KV events and load reports take to reach the router.
    pub event_delay: Duration,
    /// How often each worker publishes its load.
    pub load_report_interval: Duration,
    /// Trace timestamps are multiplied by this: 0.5 replays the trace at twice its request rate.
    pub time_scale: f64,
    /// Of the `workers`, how many are prefill workers (ids `1..=prefill_workers`). With any,
    /// the model is served disaggregated: the rest decode, and the agent's decision
    /// (`kvfleet_kv_router::choose_prefill`, under `disaggregation`) sends a prompt to a prefill
    /// worker, whose first token ends its leg; its KV blocks reach the decode worker
    /// `event_delay` later, which decodes the rest.
    pub prefill_workers: usize,
    /// The disaggregation policy when `prefill_workers > 0`.
    pub disaggregation: DisaggregationPolicy,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            workers: 8,
            profile: MockProfile::default_8b_h100(),
            scheduler: SchedulerConfig {
                // Llama 3.1's context; longer trace requests are refused as a frontend would.
                max_model_len: 131_072,
                ..SchedulerConfig::default()
            },
            pool_from_profile: true,
            router: RouterConfig::default(),
            event_delay: Duration::from_millis(5),
            load_report_interval: Duration::from_millis(100),
            time_scale: 1.0,
            prefill_workers: 0,
            disaggregation: DisaggregationPolicy::default(),
        }
    }
}

impl SimConfig {
    /// The same config with another routing mode.
    pub fn with_mode(mut self, mode: RoutingMode) -> Self {
        self.router.mode = mode;
        self
    }
}

/// A run that could not be carried out.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// `workers` is 0, or no worker is left to decode after the prefill workers.
    #[error("the fleet needs at least one worker that decodes")]
    NoWorkers,
    /// `time_scale` is not a positive finite number.
    #[error("time scale {0} must be a positive finite number")]
    TimeScale(f64),
    /// The trace's arrivals go backwards (a parsed trace never does; a hand-built one might).
    #[error("trace line {line} arrives before the request before it")]
    UnsortedTrace {
        /// The line of the first request out of order.
        line: usize,
    },
    /// The scheduler config or pool sizing is unusable.
    #[error("engine config: {0}")]
    Engine(#[from] ConfigError),
    /// More workers than the router can track.
    #[error(transparent)]
    Router(#[from] TooManyWorkers),
    /// The mock's performance profile is unusable for the router.
    #[error("performance profile: {0}")]
    Profile(#[from] ProfileError),
    /// A mock engine's step failed (the mock executor never fails; kept for other executors).
    #[error("worker {worker} at {at:?}: {source}")]
    Exec {
        /// The worker.
        worker: WorkerId,
        /// Virtual time.
        at: Duration,
        /// The failure.
        source: ExecError,
    },
    /// An engine has work but cannot make progress: a simulator or engine bug.
    #[error("worker {worker} stalled at {at:?} with work queued")]
    Stalled {
        /// The worker.
        worker: WorkerId,
        /// Virtual time.
        at: Duration,
    },
}

/// A message on its way to the router.
#[derive(Debug)]
enum ToRouter {
    Events(Vec<KvEvent>),
    Load(WorkerId, WorkerLoad),
}

/// A request between routing and its last token.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Live {
    pub(crate) trace_index: usize,
    /// When the router placed it, and the TTFT it predicted from then, ms.
    routed_at: Duration,
    predicted_ttft_ms: f64,
    /// The router's estimate of the prompt tokens the worker must compute (for load reports).
    prefill_estimate: u64,
    last_token: Option<Duration>,
    leg: Leg,
}

/// Which part of a request an engine runs.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Leg {
    /// All of it.
    Whole,
    /// A disaggregated request's prefill (its first token), for the decode worker at this index.
    Prefill { decode: usize },
    /// A disaggregated request's decode, after a prefill leg that ended at `first_token` with
    /// `cached_tokens` of its prompt found in the prefill worker's cache.
    Decode {
        arrival: Duration,
        first_token: Duration,
        cached_tokens: u32,
    },
}

/// A decode leg to submit once its prefill leg's blocks arrive.
#[derive(Debug)]
struct Handoff {
    at: Duration,
    trace_index: usize,
    decode: usize,
    first_token: u32,
    arrival: Duration,
    first_token_at: Duration,
    cached_tokens: u32,
}

/// `profile` with a layout of a few bytes per token: the same block size and timing, KV blocks
/// the simulator can move between engines without copying the real model's bytes.
fn compact(profile: &MockProfile) -> MockProfile {
    MockProfile {
        layout: KvLayout {
            layers: 1,
            kv_heads: 1,
            head_dim: 1,
            dtype: KvDtype::F16,
            ..profile.layout.clone()
        },
        ..profile.clone()
    }
}

/// The router's id of a request's prefill pick (its decode pick has the trace index).
fn prefill_request(trace_index: usize) -> RequestId {
    RequestId(trace_index as u128 | 1 << 64)
}

/// Where a worker is in its life. Without a planner every worker serves from the start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Allocated, loading; serves from `ready_at`.
    Starting {
        /// When it starts serving.
        ready_at: Duration,
    },
    /// Takes new requests.
    Serving,
    /// Finishes what it has, takes nothing new.
    Draining,
    /// Gone (its GPU is free).
    Stopped,
}

#[derive(Debug)]
pub(crate) struct Worker {
    pub(crate) id: WorkerId,
    pub(crate) engine: MockEngine,
    pub(crate) phase: Phase,
    /// When its GPU was allocated and, once stopped, released.
    pub(crate) allocated: (Duration, Option<Duration>),
    /// The time of this worker's live entry in the engine heap.
    scheduled: Option<Duration>,
    pub(crate) live: HashMap<EngineRequestId, Live>,
    /// Sum of `prefill_estimate` over live requests without a first token.
    pub(crate) pending_prefill: u64,
    /// Sum of the whole prompts of those requests (the engine's count of their work, which
    /// does not know the cache hits they will get).
    pending_prompt: u64,
    report: WorkerReport,
}

impl Worker {
    /// A worker allocated at `now` in `phase`.
    pub(crate) fn new(id: WorkerId, engine: MockEngine, phase: Phase, now: Duration) -> Self {
        Worker {
            id,
            engine,
            phase,
            allocated: (now, None),
            scheduled: None,
            live: HashMap::new(),
            pending_prefill: 0,
            pending_prompt: 0,
            report: WorkerReport {
                worker: id.0,
                requests: 0,
                prompt_tokens: 0,
                cached_tokens: 0,
                computed_prompt_tokens: 0,
                output_tokens: 0,
                prefix_hit_rate: 0.0,
                steps: 0,
                preemptions: 0,
            },
        }
    }

    /// The load this worker publishes. Prompts not yet started count with the router's
    /// estimate of their uncached part; on top comes the rest of the engine's pending prefill
    /// (its figure less those prompts whole): the work of preempted requests, which recompute
    /// their whole context (prompt and generated tokens) and which no routing decision
    /// accounts for. The agent's report carries it too (its prefill figure is the engine's).
    pub(crate) fn load_report(&self) -> WorkerLoad {
        let metrics = self.engine.metrics();
        let recompute = metrics
            .prefill_tokens_pending
            .saturating_sub(self.pending_prompt);
        WorkerLoad {
            prefill_tokens: self.pending_prefill + recompute,
            decode_blocks: u64::from(metrics.kv_blocks_used),
            queue_depth: u32::try_from(metrics.waiting).unwrap_or(u32::MAX),
        }
    }
}

/// Per-run accumulators.
#[derive(Debug, Default)]
struct Totals {
    completed: u64,
    aborted: u64,
    overload_retries: u64,
    rejections: BTreeMap<String, u64>,
    prompt_tokens: u64,
    cached_tokens: u64,
    output_tokens: u64,
    ttft_ms: Vec<f64>,
    e2e_ms: Vec<f64>,
    /// (predicted, actual) TTFT from routing, ms, per request that got its first token.
    predictions: Vec<(f64, f64)>,
    itl_us: LogHistogram,
    first_arrival: Option<Duration>,
    last_finish: Duration,
}

/// The simulation state. `crate::planner` drives it interval by interval with
/// [`Sim::run_until`] and changes the fleet between intervals.
pub(crate) struct Sim<'a> {
    pub(crate) config: &'a SimConfig,
    pub(crate) trace: &'a [TraceRequest],
    pub(crate) router: Router,
    pub(crate) workers: Vec<Worker>,
    heap: BinaryHeap<Reverse<(Duration, usize)>>,
    /// Starting workers by the time they start serving.
    pub(crate) starting: BinaryHeap<Reverse<(Duration, usize)>>,
    /// The workers new requests may go to; `None`: every registered one.
    pub(crate) candidates: Option<Vec<WorkerId>>,
    to_router: VecDeque<(Duration, ToRouter)>,
    /// Requests that found every worker overloaded, oldest first.
    pub(crate) backlog: VecDeque<usize>,
    max_prompt_blocks: usize,
    totals: Totals,
    /// Per-interval measurements for the planner (`None`: not collected).
    pub(crate) interval: Option<Box<IntervalStats>>,
    next_arrival: usize,
    next_tick: Duration,
    /// Disaggregated serving: the prefill and the decode workers' ids, decode legs waiting for
    /// their blocks (in time order), the decisions made.
    prefill_ids: Vec<WorkerId>,
    decode_ids: Vec<WorkerId>,
    handoffs: VecDeque<Handoff>,
    prefill_decisions: [u64; 4],
}

/// Replays `trace` on the fleet `config` describes and reports what happened.
pub fn run(config: &SimConfig, trace: &[TraceRequest]) -> Result<SimReport, SimError> {
    let started = Instant::now();
    let mut sim = Sim::new(config, trace)?;
    sim.run_until(Duration::MAX)?;
    Ok(sim.report(started.elapsed()))
}

impl<'a> Sim<'a> {
    pub(crate) fn new(config: &'a SimConfig, trace: &'a [TraceRequest]) -> Result<Self, SimError> {
        if config.workers <= config.prefill_workers {
            return Err(SimError::NoWorkers);
        }
        if !(config.time_scale.is_finite() && config.time_scale > 0.0) {
            return Err(SimError::TimeScale(config.time_scale));
        }
        if let Some(pair) = trace.windows(2).find(|p| p[1].arrival < p[0].arrival) {
            return Err(SimError::UnsortedTrace { line: pair[1].line });
        }
        let mut router_config = config.router.clone();
        router_config.block_size = config.profile.layout.block_size;
        let mut router = Router::new(router_config);
        let mut workers = Vec::with_capacity(config.workers);
        // Disaggregated, blocks really move from engine to engine: in a layout of a few bytes
        // per token (the mock holds no data) with pools as many blocks as the real layout
        // gives, a transfer costs no gigabytes of zeros.
        let (profile, pool) = if config.prefill_workers > 0 {
            let pool = match config.pool_from_profile {
                true => config.profile.pool_sizing(),
                false => config.scheduler.kv_memory,
            };
            let pool = match pool {
                PoolSizing::Bytes(bytes) => {
                    let blocks = bytes / (config.profile.layout.block_bytes() as u64).max(1);
                    PoolSizing::Blocks(u32::try_from(blocks).unwrap_or(u32::MAX))
                }
                other => other,
            };
            (compact(&config.profile), Some(pool))
        } else {
            (config.profile.clone(), None)
        };
        for i in 0..config.workers {
            let id = WorkerId(i as u64 + 1);
            let mut scheduler = config.scheduler.clone();
            scheduler.worker = id;
            if let Some(pool) = pool {
                scheduler.kv_memory = pool;
            } else if config.pool_from_profile {
                scheduler.kv_memory = config.profile.pool_sizing();
            }
            let engine = MockEngine::new(scheduler, MockExecutor::new(profile.clone()))?;
            router.add_worker(
                id,
                WorkerCapacity {
                    kv_blocks: u64::from(engine.pool().usage().total),
                    max_queue_depth: None,
                },
            )?;
            workers.push(Worker::new(id, engine, Phase::Serving, Duration::ZERO));
        }
        let pool_blocks = workers
            .first()
            .map_or(0, |w| w.engine.pool().usage().total as usize);
        // Every worker runs the same mock, so they share its performance profile (for the pool
        // they really have, which `--kv-blocks` may have resized): what the agent hands the
        // router for a fleet of mock workers.
        let mut mock = config.profile.clone();
        mock.kv_cache_bytes = pool_blocks as u64 * mock.layout.block_bytes() as u64;
        router.set_default_profile(Arc::new(mock.perf_profile(&config.scheduler)))?;
        Ok(Self {
            config,
            trace,
            router,
            workers,
            heap: BinaryHeap::new(),
            starting: BinaryHeap::new(),
            candidates: None,
            to_router: VecDeque::new(),
            backlog: VecDeque::new(),
            max_prompt_blocks: pool_blocks,
            totals: Totals::default(),
            interval: None,
            next_arrival: 0,
            next_tick: Duration::ZERO,
            prefill_ids: (1..=config.prefill_workers as u64).map(WorkerId).collect(),
            decode_ids: (config.prefill_workers as u64 + 1..=config.workers as u64)
                .map(WorkerId)
                .collect(),
            handoffs: VecDeque::new(),
            prefill_decisions: [0; 4],
        })
    }

    pub(crate) fn arrival_time(&self, index: usize) -> Duration {
        let at = self.trace[index].arrival.as_secs_f64() * self.config.time_scale;
        Duration::try_from_secs_f64(at).unwrap_or(Duration::MAX)
    }

    /// The earliest live engine event, dropping stale heap entries.
    fn next_engine(&mut self) -> Option<(Duration, usize)> {
        while let Some(&Reverse((at, w))) = self.heap.peek() {
            if self.workers[w].scheduled == Some(at) {
                return Some((at, w));
            }
            self.heap.pop();
        }
        None
    }

    /// Whether load reports are still needed: an engine has work or a request waits for a
    /// retry. Messages in transit do not count: they are delivered without ticks, and counting
    /// them would keep a fleet whose reports take longer than the interval ticking forever.
    pub(crate) fn busy(&self) -> bool {
        !self.backlog.is_empty()
            || !self.handoffs.is_empty()
            || self.workers.iter().any(|w| w.engine.has_work())
    }

    /// Whether every request of the trace has arrived.
    pub(crate) fn arrivals_done(&self) -> bool {
        self.next_arrival >= self.trace.len()
    }

    /// Handles every event before `until` (all of them for `Duration::MAX`); returns whether
    /// any remain.
    pub(crate) fn run_until(&mut self, until: Duration) -> Result<bool, SimError> {
        loop {
            let engine = self.next_engine();
            let handoff = self.handoffs.front().map(|h| h.at);
            let delivery = self.to_router.front().map(|(at, _)| *at);
            let ready = self.starting.peek().map(|Reverse((at, _))| *at);
            let arrival = (self.next_arrival < self.trace.len())
                .then(|| self.arrival_time(self.next_arrival));
            // Load reports run while anything is going on; an idle fleet has nothing to report.
            let tick = (arrival.is_some() || self.busy()).then_some(self.next_tick);
            let Some(now) = [engine.map(|e| e.0), handoff, delivery, ready, tick, arrival]
                .into_iter()
                .flatten()
                .min()
            else {
                return Ok(false);
            };
            if now >= until {
                return Ok(true);
            }
            if let Some((at, w)) = engine.filter(|e| e.0 == now) {
                self.heap.pop();
                self.workers[w].scheduled = None;
                self.step(w, at)?;
            } else if handoff == Some(now) {
                self.hand_off(now)?;
            } else if delivery == Some(now) {
                self.deliver(now);
            } else if ready == Some(now) {
                if let Some(Reverse((_, w))) = self.starting.pop() {
                    self.start_serving(w, now)?;
                }
            } else if tick == Some(now) {
                self.tick(now)?;
                self.next_tick = now
                    + self
                        .config
                        .load_report_interval
                        .max(Duration::from_micros(1));
            } else {
                self.arrive(self.next_arrival, now)?;
                self.next_arrival += 1;
            }
        }
    }

    /// Puts the worker's next event time in the heap if it changed.
    pub(crate) fn reschedule(&mut self, w: usize, now: Duration) -> Result<(), SimError> {
        let worker = &mut self.workers[w];
        let next = worker.engine.next_event_time();
        if let Some(at) = next {
            // An engine that wants to run again at the instant it just ran at, without having
            // been given anything new, would spin forever.
            if at < now {
                return Err(SimError::Stalled {
                    worker: worker.id,
                    at: now,
                });
            }
        }
        if next != worker.scheduled {
            worker.scheduled = next;
            if let Some(at) = next {
                self.heap.push(Reverse((at, w)));
            }
        }
        Ok(())
    }

    fn step(&mut self, w: usize, now: Duration) -> Result<(), SimError> {
        let worker = &mut self.workers[w];
        worker
            .engine
            .step_until(now)
            .map_err(|source| SimError::Exec {
                worker: worker.id,
                at: now,
                source,
            })?;
        let outputs = worker.engine.drain_outputs();
        let events = worker.engine.drain_events();
        if !events.is_empty() {
            self.to_router
                .push_back((now + self.config.event_delay, ToRouter::Events(events)));
        }
        for output in outputs {
            self.output(w, output);
        }
        // After stepping at `now`, the engine's next event must lie in the future.
        if self.workers[w].engine.next_event_time() == Some(now) {
            return Err(SimError::Stalled {
                worker: self.workers[w].id,
                at: now,
            });
        }
        if self.workers[w].phase == Phase::Draining && !self.workers[w].engine.has_work() {
            self.stop_worker(w, now);
        }
        self.reschedule(w, now)
    }

    fn output(&mut self, w: usize, output: EngineOutput) {
        let worker = &mut self.workers[w];
        let engine_id = output.request();
        let Some(live) = worker.live.get_mut(&engine_id) else {
            return;
        };
        let trace_index = live.trace_index;
        let decode_id = RequestId(trace_index as u128);
        let router_id = match live.leg {
            Leg::Prefill { .. } => prefill_request(trace_index),
            Leg::Whole | Leg::Decode { .. } => decode_id,
        };
        match output {
            EngineOutput::Token(token) => {
                match live.last_token {
                    None => {
                        worker.pending_prefill =
                            worker.pending_prefill.saturating_sub(live.prefill_estimate);
                        worker.pending_prompt = worker
                            .pending_prompt
                            .saturating_sub(u64::from(self.trace[trace_index].input_length));
                        self.router.prefill_done(router_id, token.time);
                        if live.leg == Leg::Whole {
                            // The router predicts the TTFT of a worker serving the whole
                            // request; a prefill leg's first token is not that.
                            let actual = token.time.saturating_sub(live.routed_at);
                            self.totals
                                .predictions
                                .push((live.predicted_ttft_ms, actual.as_secs_f64() * 1e3));
                        }
                        if let Leg::Prefill { .. } = live.leg {
                            // The decode worker imports the prompt instead of computing it.
                            self.router.prefill_done(decode_id, token.time);
                        }
                        // A decode leg's first output is the request's second token.
                        if let (Some(stats), Leg::Whole | Leg::Prefill { .. }) =
                            (&mut self.interval, live.leg)
                        {
                            let at = self.trace[trace_index].arrival.as_secs_f64()
                                * self.config.time_scale;
                            stats.first_token(token.time.as_secs_f64() - at);
                        }
                    }
                    Some(last) => {
                        let gap = token.time.saturating_sub(last).as_secs_f64();
                        self.totals.itl_us.record(gap * 1e6);
                        if let Some(stats) = &mut self.interval {
                            stats.token(gap);
                        }
                    }
                }
                live.last_token = Some(token.time);
                let leg = live.leg;
                let Some(finish) = token.finish else {
                    return;
                };
                worker.live.remove(&engine_id);
                self.router.finished(router_id, token.time);
                let s = finish.stats;
                let r = &mut worker.report;
                r.requests += 1;
                r.prompt_tokens += u64::from(s.prompt_tokens);
                r.cached_tokens += u64::from(s.cached_tokens);
                r.output_tokens += u64::from(s.output_tokens);
                let output_length = self.trace[trace_index].output_length;
                let (arrival, first_token, cached, prompt, outputs) = match leg {
                    Leg::Whole => (
                        s.arrival,
                        s.first_token,
                        s.cached_tokens,
                        s.prompt_tokens,
                        s.output_tokens,
                    ),
                    Leg::Prefill { decode } if output_length > 1 => {
                        self.handoffs.push_back(Handoff {
                            at: token.time + self.config.event_delay,
                            trace_index,
                            decode,
                            first_token: token.token,
                            arrival: s.arrival,
                            first_token_at: s.first_token,
                            cached_tokens: s.cached_tokens,
                        });
                        return;
                    }
                    Leg::Prefill { .. } => {
                        self.router.finished(decode_id, token.time);
                        (
                            s.arrival,
                            s.first_token,
                            s.cached_tokens,
                            s.prompt_tokens,
                            s.output_tokens,
                        )
                    }
                    Leg::Decode {
                        arrival,
                        first_token,
                        cached_tokens,
                    } => (
                        arrival,
                        first_token,
                        cached_tokens,
                        s.prompt_tokens.saturating_sub(1),
                        s.output_tokens + 1,
                    ),
                };
                let t = &mut self.totals;
                t.completed += 1;
                t.prompt_tokens += u64::from(prompt);
                t.cached_tokens += u64::from(cached);
                t.output_tokens += u64::from(outputs);
                t.ttft_ms
                    .push(first_token.saturating_sub(arrival).as_secs_f64() * 1e3);
                t.e2e_ms
                    .push(s.finished.saturating_sub(arrival).as_secs_f64() * 1e3);
                t.last_finish = t.last_finish.max(s.finished);
                if let Some(stats) = &mut self.interval {
                    stats.finished(u64::from(outputs));
                }
            }
            EngineOutput::Aborted { time, .. } => {
                if live.last_token.is_none() {
                    worker.pending_prefill =
                        worker.pending_prefill.saturating_sub(live.prefill_estimate);
                    worker.pending_prompt = worker
                        .pending_prompt
                        .saturating_sub(u64::from(self.trace[live.trace_index].input_length));
                }
                if let Leg::Prefill { .. } = live.leg {
                    self.router.finished(decode_id, time);
                }
                worker.live.remove(&engine_id);
                self.router.finished(router_id, time);
                self.totals.aborted += 1;
            }
        }
    }

    /// Submits the decode legs whose blocks arrived by `now`: prompt + first token, the
    /// prompt's full blocks imported (the decode worker computes only the tail).
    fn hand_off(&mut self, now: Duration) -> Result<(), SimError> {
        while self.handoffs.front().is_some_and(|h| h.at <= now) {
            let Some(h) = self.handoffs.pop_front() else {
                break;
            };
            let request = &self.trace[h.trace_index];
            let mut prompt = synthesize_prompt(request, self.config.profile.vocab_size);
            let worker = &mut self.workers[h.decode];
            let layout = worker.engine.kv_layout().clone();
            let blocks = block_hashes(&prompt, layout.block_size);
            let kv = KvExport {
                data: vec![0; blocks.len() * layout.block_bytes()],
                layout,
                first_block: 0,
                blocks,
                origin: None,
            };
            prompt.push(h.first_token);
            let mut sampling = SamplingParams::greedy(request.output_length - 1);
            sampling.ignore_eos = true;
            let leg = Leg::Decode {
                arrival: h.arrival,
                first_token: h.first_token_at,
                cached_tokens: h.cached_tokens,
            };
            let submitted = worker.engine.submit(
                Request {
                    kv: Some(kv),
                    ..Request::new(prompt, sampling)
                },
                now,
            );
            match submitted {
                Ok(engine_id) => {
                    worker.live.insert(
                        engine_id,
                        Live {
                            trace_index: h.trace_index,
                            routed_at: h.arrival,
                            // Not compared: the first token came from the prefill leg.
                            predicted_ttft_ms: f64::NAN,
                            prefill_estimate: 0,
                            last_token: Some(h.first_token_at),
                            leg,
                        },
                    );
                    self.reschedule(h.decode, now)?;
                }
                Err(e) => {
                    self.router.finished(RequestId(h.trace_index as u128), now);
                    self.reject(format!("decode engine: {e}"));
                }
            }
        }
        Ok(())
    }

    fn deliver(&mut self, now: Duration) {
        while let Some((at, _)) = self.to_router.front() {
            if *at > now {
                break;
            }
            let Some((_, message)) = self.to_router.pop_front() else {
                break;
            };
            match message {
                ToRouter::Events(events) => {
                    for event in &events {
                        // Delivery is in order and lossless here, so the router cannot see a gap
                        // or a duplicate; its counters (in the report) would show one if it did.
                        let _ = self.router.apply(event, now);
                    }
                }
                ToRouter::Load(worker, load) => {
                    let _ = self.router.apply_load(worker, load, now);
                }
            }
        }
    }

    /// Every worker publishes its load (it reaches the router `event_delay` later), and
    /// requests waiting at the frontend are retried.
    fn tick(&mut self, now: Duration) -> Result<(), SimError> {
        for worker in self
            .workers
            .iter()
            .filter(|w| matches!(w.phase, Phase::Serving | Phase::Draining))
        {
            let load = worker.load_report();
            self.to_router.push_back((
                now + self.config.event_delay,
                ToRouter::Load(worker.id, load),
            ));
        }
        // An idle fleet with nothing in flight that still refuses a request never will accept
        // it (it is larger than the router thinks any worker can take).
        let idle = self.workers.iter().all(|w| !w.engine.has_work());
        for _ in 0..self.backlog.len() {
            let Some(index) = self.backlog.pop_front() else {
                break;
            };
            self.route(index, now, idle)?;
        }
        Ok(())
    }

    fn reject(&mut self, reason: String) {
        *self.totals.rejections.entry(reason).or_default() += 1;
    }

    fn arrive(&mut self, index: usize, now: Duration) -> Result<(), SimError> {
        self.totals.first_arrival.get_or_insert(now);
        let trace = self.trace;
        let request = &trace[index];
        if let Some(stats) = &mut self.interval {
            stats.arrived(u64::from(request.input_length));
        }
        let scheduler = &self.config.scheduler;
        let total = request.input_length as usize + request.output_length as usize;
        // What a frontend checks before routing (the engine would refuse these at submit).
        if total > scheduler.max_model_len {
            self.reject(format!(
                "prompt + output longer than max_model_len {}",
                scheduler.max_model_len
            ));
            return Ok(());
        }
        let block_tokens = self.config.profile.layout.block_size.tokens();
        if total.div_ceil(block_tokens) > self.max_prompt_blocks {
            self.reject("sequence larger than a worker's KV pool".into());
            return Ok(());
        }
        self.route(index, now, false)
    }

    /// Routes and submits one request; on `Overloaded` it joins the backlog unless
    /// `give_up_if_overloaded`.
    fn route(
        &mut self,
        index: usize,
        now: Duration,
        give_up_if_overloaded: bool,
    ) -> Result<(), SimError> {
        let trace = self.trace;
        let request = &trace[index];
        let prompt = synthesize_prompt(request, self.config.profile.vocab_size);
        let hashes = sequence_hashes(&prompt, self.config.profile.layout.block_size);
        let route = RouteRequest::new(RequestId(index as u128), &hashes, request.input_length)
            .with_output_tokens(request.output_length);
        let decode_ids = std::mem::take(&mut self.decode_ids);
        let selected = match (&self.candidates, self.config.prefill_workers) {
            (Some(candidates), _) => self.router.select(&route.with_candidates(candidates), now),
            (None, 0) => self.router.select(&route, now),
            (None, _) => self.router.select(&route.with_candidates(&decode_ids), now),
        };
        self.decode_ids = decode_ids;
        let decision = match selected {
            Ok(decision) => decision,
            Err(RouteError::Overloaded { .. }) if !give_up_if_overloaded => {
                self.totals.overload_retries += 1;
                self.backlog.push_back(index);
                return Ok(());
            }
            // A fleet whose workers are all starting (or draining) holds the request until
            // one serves.
            Err(RouteError::NoWorkers)
                if self.candidates.is_some() && !self.starting.is_empty() =>
            {
                self.backlog.push_back(index);
                return Ok(());
            }
            Err(e) => {
                self.reject(format!("router: {e}"));
                return Ok(());
            }
        };
        let Some(w) = self.workers.iter().position(|w| w.id == decision.worker) else {
            self.router.finished(RequestId(index as u128), now);
            self.reject("router chose an unknown worker".into());
            return Ok(());
        };
        let mut sampling = SamplingParams::greedy(request.output_length);
        sampling.ignore_eos = true;
        let (w, leg, overlap) = match self.prefill_pick(&route, &decision, index, now) {
            // The prefill leg runs first; the decode worker gets the rest once it is over.
            Some(pick) => {
                sampling.max_tokens = 1;
                let p = self.workers.iter().position(|w| w.id == pick.worker);
                let p = p.unwrap_or(w);
                (p, Leg::Prefill { decode: w }, pick.overlap_blocks)
            }
            None => (w, Leg::Whole, decision.overlap_blocks),
        };
        let block_tokens = u64::from(self.config.profile.layout.block_size.get());
        let prefill_estimate =
            u64::from(request.input_length).saturating_sub(u64::from(overlap) * block_tokens);
        if let Some(stats) = &mut self.interval {
            stats.routed(u64::from(request.input_length) - prefill_estimate);
        }
        let worker = &mut self.workers[w];
        match worker.engine.submit(Request::new(prompt, sampling), now) {
            Ok(engine_id) => {
                worker.live.insert(
                    engine_id,
                    Live {
                        trace_index: index,
                        routed_at: now,
                        predicted_ttft_ms: decision.predicted_ttft_ms,
                        prefill_estimate,
                        last_token: None,
                        leg,
                    },
                );
                worker.pending_prefill += prefill_estimate;
                worker.pending_prompt += u64::from(request.input_length);
                self.reschedule(w, now)
            }
            Err(e) => {
                self.router.finished(RequestId(index as u128), now);
                if leg != Leg::Whole {
                    self.router.finished(prefill_request(index), now);
                }
                self.reject(format!("engine: {e}"));
                Ok(())
            }
        }
    }

    /// In a disaggregated fleet, the agent's decision for this request: its prefill worker's
    /// pick, or `None` when the decode worker prefills (or the fleet is not disaggregated).
    fn prefill_pick(
        &mut self,
        route: &RouteRequest<'_>,
        decode: &kvfleet_kv_router::Decision,
        index: usize,
        now: Duration,
    ) -> Option<kvfleet_kv_router::Decision> {
        if self.config.prefill_workers == 0 {
            return None;
        }
        let choice = choose_prefill(
            &mut self.router,
            route,
            decode,
            &self.config.disaggregation,
            &self.prefill_ids,
            prefill_request(index),
            now,
        );
        self.prefill_decisions[choice.decision.index()] += 1;
        choice.pick
    }

    pub(crate) fn report(mut self, wall: Duration) -> SimReport {
        let t = &mut self.totals;
        let ttft_ms = percentiles(&mut t.ttft_ms);
        let ttft_cdf_ms = (0..=100)
            .map(|p| quantile(&t.ttft_ms, f64::from(p) / 100.0))
            .collect();
        let e2e_ms = percentiles(&mut t.e2e_ms);
        let virtual_duration = t
            .last_finish
            .saturating_sub(t.first_arrival.unwrap_or_default())
            .as_secs_f64();
        let per_second = |n: u64| {
            if virtual_duration > 0.0 {
                n as f64 / virtual_duration
            } else {
                0.0
            }
        };
        let ratio = |a: u64, b: u64| if b == 0 { 0.0 } else { a as f64 / b as f64 };
        let mut preemptions = 0;
        let mut tier_hit_blocks = [0u64; 2];
        let per_worker = self
            .workers
            .iter()
            .map(|w| {
                let metrics = w.engine.metrics();
                preemptions += metrics.preemptions;
                tier_hit_blocks[0] += metrics.tiers.g2.hits;
                tier_hit_blocks[1] += metrics.tiers.g3.hits;
                WorkerReport {
                    computed_prompt_tokens: w.report.prompt_tokens - w.report.cached_tokens,
                    prefix_hit_rate: ratio(w.report.cached_tokens, w.report.prompt_tokens),
                    steps: metrics.steps,
                    preemptions: metrics.preemptions,
                    ..w.report.clone()
                }
            })
            .collect();
        let rejections: Vec<Rejection> = t
            .rejections
            .iter()
            .map(|(reason, &count)| Rejection {
                reason: reason.clone(),
                count,
            })
            .collect();
        SimReport {
            mode: self.router.config().mode,
            workers: self.workers.len(),
            profile: self.config.profile.name.clone(),
            kv_blocks_per_worker: self.max_prompt_blocks as u32,
            tier_blocks_per_worker: {
                let tiers = &self.config.scheduler.tiers;
                let block_bytes = (self.config.profile.layout.block_bytes() as u64).max(1);
                [
                    tiers.host_bytes / block_bytes,
                    tiers.disk_bytes / block_bytes,
                ]
            },
            tier_hit_blocks,
            block_size: self.config.profile.layout.block_size.get(),
            event_delay_ms: self.config.event_delay.as_secs_f64() * 1e3,
            load_report_interval_ms: self.config.load_report_interval.as_secs_f64() * 1e3,
            time_scale: self.config.time_scale,
            requests: self.trace.len() as u64,
            completed: t.completed,
            rejected: rejections.iter().map(|r| r.count).sum(),
            rejections,
            aborted: t.aborted,
            overload_retries: t.overload_retries,
            prompt_tokens: t.prompt_tokens,
            cached_tokens: t.cached_tokens,
            output_tokens: t.output_tokens,
            prefix_hit_rate: ratio(t.cached_tokens, t.prompt_tokens),
            ttft_ms,
            itl_ms: t.itl_us.percentiles_ms(),
            e2e_ms,
            ttft_cdf_ms,
            output_tokens_per_s: per_second(t.output_tokens),
            prompt_tokens_per_s: per_second(t.prompt_tokens),
            virtual_duration_s: virtual_duration,
            wall_time_s: wall.as_secs_f64(),
            preemptions,
            per_worker,
            router_routes: self.router.route_counters(),
            router_events: self.router.event_counters(),
            ttft_prediction: prediction_summary(&t.predictions),
            prefill_workers: self.config.prefill_workers,
            prefill_decisions: match self.config.prefill_workers {
                0 => BTreeMap::new(),
                _ => PrefillDecision::ALL
                    .iter()
                    .map(|d| (d.as_str().to_owned(), self.prefill_decisions[d.index()]))
                    .collect(),
            },
        }
    }
}

/// Bias and absolute errors (exact percentiles) of predicted TTFTs against the actual ones.
fn prediction_summary(pairs: &[(f64, f64)]) -> PredictionSummary {
    if pairs.is_empty() {
        return PredictionSummary::default();
    }
    let n = pairs.len() as f64;
    let mut absolute: Vec<f64> = pairs.iter().map(|(p, a)| (p - a).abs()).collect();
    let mut relative: Vec<f64> = pairs
        .iter()
        .map(|(p, a)| (p - a).abs() / a.max(1e-3))
        .collect();
    absolute.sort_unstable_by(f64::total_cmp);
    relative.sort_unstable_by(f64::total_cmp);
    PredictionSummary {
        count: pairs.len() as u64,
        bias_ms: pairs.iter().map(|(p, a)| p - a).sum::<f64>() / n,
        abs_p50_ms: quantile(&absolute, 0.5),
        abs_p90_ms: quantile(&absolute, 0.9),
        rel_p50: quantile(&relative, 0.5),
        rel_p90: quantile(&relative, 0.9),
    }
}
