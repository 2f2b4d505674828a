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
    ConfigError, Engine, EngineOutput, ExecError, MockEngine, MockExecutor, MockProfile, Request,
    RequestId as EngineRequestId, SchedulerConfig,
};
use kvfleet_kv_router::{
    PredictionSummary, RequestId, RouteError, RouteRequest, Router, RouterConfig, RoutingMode,
    TooManyWorkers, WorkerCapacity, WorkerLoad,
};
use kvfleet_proto::hash::sequence_hashes;
use kvfleet_proto::profile::ProfileError;
use kvfleet_proto::{KvEvent, SamplingParams, WorkerId};

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
    /// `workers` is 0.
    #[error("the fleet needs at least one worker")]
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
struct Live {
    trace_index: usize,
    /// When the router placed it, and the TTFT it predicted from then, ms.
    routed_at: Duration,
    predicted_ttft_ms: f64,
    /// The router's estimate of the prompt tokens the worker must compute (for load reports).
    prefill_estimate: u64,
    last_token: Option<Duration>,
}

#[derive(Debug)]
struct Worker {
    id: WorkerId,
    engine: MockEngine,
    /// The time of this worker's live entry in the engine heap.
    scheduled: Option<Duration>,
    live: HashMap<EngineRequestId, Live>,
    /// Sum of `prefill_estimate` over live requests without a first token.
    pending_prefill: u64,
    report: WorkerReport,
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

struct Sim<'a> {
    config: &'a SimConfig,
    trace: &'a [TraceRequest],
    router: Router,
    workers: Vec<Worker>,
    heap: BinaryHeap<Reverse<(Duration, usize)>>,
    to_router: VecDeque<(Duration, ToRouter)>,
    /// Requests that found every worker overloaded, oldest first.
    backlog: VecDeque<usize>,
    max_prompt_blocks: usize,
    totals: Totals,
}

/// Replays `trace` on the fleet `config` describes and reports what happened.
pub fn run(config: &SimConfig, trace: &[TraceRequest]) -> Result<SimReport, SimError> {
    let started = Instant::now();
    let mut sim = Sim::new(config, trace)?;
    sim.run()?;
    Ok(sim.report(started.elapsed()))
}

impl<'a> Sim<'a> {
    fn new(config: &'a SimConfig, trace: &'a [TraceRequest]) -> Result<Self, SimError> {
        if config.workers == 0 {
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
        for i in 0..config.workers {
            let id = WorkerId(i as u64 + 1);
            let mut scheduler = config.scheduler.clone();
            scheduler.worker = id;
            if config.pool_from_profile {
                scheduler.kv_memory = config.profile.pool_sizing();
            }
            let engine = MockEngine::new(scheduler, MockExecutor::new(config.profile.clone()))?;
            router.add_worker(
                id,
                WorkerCapacity {
                    kv_blocks: u64::from(engine.pool().usage().total),
                    max_queue_depth: None,
                },
            )?;
            workers.push(Worker {
                id,
                engine,
                scheduled: None,
                live: HashMap::new(),
                pending_prefill: 0,
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
            });
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
            to_router: VecDeque::new(),
            backlog: VecDeque::new(),
            max_prompt_blocks: pool_blocks,
            totals: Totals::default(),
        })
    }

    fn arrival_time(&self, index: usize) -> Duration {
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
    fn busy(&self) -> bool {
        !self.backlog.is_empty() || self.workers.iter().any(|w| w.engine.has_work())
    }

    fn run(&mut self) -> Result<(), SimError> {
        let mut next_arrival = 0usize;
        let mut next_tick = Duration::ZERO;
        loop {
            let engine = self.next_engine();
            let delivery = self.to_router.front().map(|(at, _)| *at);
            let arrival =
                (next_arrival < self.trace.len()).then(|| self.arrival_time(next_arrival));
            // Load reports run while anything is going on; an idle fleet has nothing to report.
            let tick = (arrival.is_some() || self.busy()).then_some(next_tick);
            let Some(now) = [engine.map(|e| e.0), delivery, tick, arrival]
                .into_iter()
                .flatten()
                .min()
            else {
                break;
            };
            if let Some((at, w)) = engine.filter(|e| e.0 == now) {
                self.heap.pop();
                self.workers[w].scheduled = None;
                self.step(w, at)?;
            } else if delivery == Some(now) {
                self.deliver(now);
            } else if tick == Some(now) {
                self.tick(now)?;
                next_tick = now
                    + self
                        .config
                        .load_report_interval
                        .max(Duration::from_micros(1));
            } else {
                self.arrive(next_arrival, now)?;
                next_arrival += 1;
            }
        }
        Ok(())
    }

    /// Puts the worker's next event time in the heap if it changed.
    fn reschedule(&mut self, w: usize, now: Duration) -> Result<(), SimError> {
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
        self.reschedule(w, now)
    }

    fn output(&mut self, w: usize, output: EngineOutput) {
        let worker = &mut self.workers[w];
        let engine_id = output.request();
        let Some(live) = worker.live.get_mut(&engine_id) else {
            return;
        };
        let trace_index = live.trace_index;
        let router_id = RequestId(trace_index as u128);
        match output {
            EngineOutput::Token(token) => {
                match live.last_token {
                    None => {
                        worker.pending_prefill =
                            worker.pending_prefill.saturating_sub(live.prefill_estimate);
                        self.router.prefill_done(router_id, token.time);
                        let actual = token.time.saturating_sub(live.routed_at);
                        self.totals
                            .predictions
                            .push((live.predicted_ttft_ms, actual.as_secs_f64() * 1e3));
                    }
                    Some(last) => self
                        .totals
                        .itl_us
                        .record(token.time.saturating_sub(last).as_secs_f64() * 1e6),
                }
                live.last_token = Some(token.time);
                if let Some(finish) = token.finish {
                    worker.live.remove(&engine_id);
                    self.router.finished(router_id, token.time);
                    let s = finish.stats;
                    let t = &mut self.totals;
                    t.completed += 1;
                    t.prompt_tokens += u64::from(s.prompt_tokens);
                    t.cached_tokens += u64::from(s.cached_tokens);
                    t.output_tokens += u64::from(s.output_tokens);
                    t.ttft_ms
                        .push(s.first_token.saturating_sub(s.arrival).as_secs_f64() * 1e3);
                    t.e2e_ms
                        .push(s.finished.saturating_sub(s.arrival).as_secs_f64() * 1e3);
                    t.last_finish = t.last_finish.max(s.finished);
                    let r = &mut worker.report;
                    r.requests += 1;
                    r.prompt_tokens += u64::from(s.prompt_tokens);
                    r.cached_tokens += u64::from(s.cached_tokens);
                    r.output_tokens += u64::from(s.output_tokens);
                }
            }
            EngineOutput::Aborted { time, .. } => {
                if live.last_token.is_none() {
                    worker.pending_prefill =
                        worker.pending_prefill.saturating_sub(live.prefill_estimate);
                }
                worker.live.remove(&engine_id);
                self.router.finished(router_id, time);
                self.totals.aborted += 1;
            }
        }
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
        for worker in &self.workers {
            let metrics = worker.engine.metrics();
            let load = WorkerLoad {
                prefill_tokens: worker.pending_prefill,
                decode_blocks: u64::from(metrics.kv_blocks_used),
                queue_depth: u32::try_from(metrics.waiting).unwrap_or(u32::MAX),
            };
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
        let decision = match self.router.select(&route, now) {
            Ok(decision) => decision,
            Err(RouteError::Overloaded { .. }) if !give_up_if_overloaded => {
                self.totals.overload_retries += 1;
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
        let block_tokens = u64::from(self.config.profile.layout.block_size.get());
        let prefill_estimate = u64::from(request.input_length)
            .saturating_sub(u64::from(decision.overlap_blocks) * block_tokens);
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
                    },
                );
                worker.pending_prefill += prefill_estimate;
                self.reschedule(w, now)
            }
            Err(e) => {
                self.router.finished(RequestId(index as u128), now);
                self.reject(format!("engine: {e}"));
                Ok(())
            }
        }
    }

    fn report(mut self, wall: Duration) -> SimReport {
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
