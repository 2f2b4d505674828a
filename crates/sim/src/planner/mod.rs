//! `kvfleet sim --planner`: the SLA planner in virtual time on a fleet that grows and shrinks.
//!
//! The simulation runs interval by interval. At each interval's end the driver turns what the
//! fleet did into an [`Observation`] (the same sums and histograms heartbeats carry), asks
//! [`kvfleet_planner::plan`] for a decision — given the profile the operator would have, not
//! the workers' real speed — and carries it out: new workers start at once on free GPUs but
//! serve only after the start-up time; workers to remove stop taking requests, finish what
//! they hold (drain) and only then free their GPU. Starting workers are cancelled first.
//!
//! Workers can be slower or faster than their profile (`speed_error`, per worker class), so
//! the planner's corrections have something to learn. A static fleet (`Controller::Static`)
//! runs the same way without decisions, as the baseline the planner saves GPU-hours against.
//!
//! Reported per interval: arrivals, the predicted rate, workers per phase, the exact TTFT and
//! ITL percentiles of the tokens emitted in it and whether both met their targets (SLA
//! attainment counts intervals with traffic); per run: attainment, GPU-hours (allocated GPU
//! time, start-up and drain included, over the trace's span), and the plain simulator report.

pub mod cli;
pub mod plot;
mod stats;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use kvfleet_engine::{Engine as _, MockEngine, MockExecutor, MockProfile, PoolSizing};
use kvfleet_kv_router::WorkerCapacity;
use kvfleet_planner::plan::Memory;
use kvfleet_planner::policy::{DeploymentPolicy, FleetPolicy};
use kvfleet_planner::{
    Action, Algorithm, DeploymentObservations, Observation, PredictorKind, RoleCounts, plan,
};
use kvfleet_proto::WorkerId;
use kvfleet_proto::api::WorkerRole;
use kvfleet_proto::profile::PerfProfile;
use serde::{Deserialize, Serialize};

use crate::report::SimReport;
use crate::sim::{Phase, Sim, SimConfig, SimError, Worker};
use crate::trace::TraceRequest;

pub(crate) use stats::IntervalStats;

/// How much slower (> 0) or faster (< 0) than their profile the workers of each class really
/// are: 0.3 means every step takes 30% longer than profiled.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct SpeedError {
    /// Aggregated workers.
    pub aggregated: f64,
    /// Prefill workers.
    pub prefill: f64,
    /// Decode workers.
    pub decode: f64,
}

impl SpeedError {
    /// The error of `role`'s workers.
    pub fn of(&self, role: WorkerRole) -> f64 {
        match role {
            WorkerRole::Aggregated => self.aggregated,
            WorkerRole::Prefill => self.prefill,
            WorkerRole::Decode => self.decode,
        }
    }
}

/// `profile` with every step `1 + error` times as long.
pub fn slowed(profile: &MockProfile, error: f64) -> MockProfile {
    let f = (1.0 + error).max(0.05);
    let mut p = profile.clone();
    p.prefill.c0 *= f;
    p.prefill.c1 *= f;
    p.prefill.c2 *= f;
    p.decode.c0 *= f;
    p.decode.c1 *= f;
    p.decode.c2 *= f;
    p.decode.per_seq *= f;
    if error != 0.0 {
        p.name = format!("{} ×{f:.2}", profile.name);
    }
    p
}

/// Who decides the fleet's size.
#[derive(Debug, Clone, PartialEq)]
pub enum Controller {
    /// The planner, with the policy's algorithm and predictor.
    Planner,
    /// A fixed number of workers.
    Static(u32),
}

/// Everything a planner run needs besides the trace.
#[derive(Debug, Clone)]
pub struct PlannerSimConfig {
    /// The fleet simulator's config; its `workers` is the planner's fleet at time 0 (all
    /// serving; a static fleet has its own size).
    pub sim: SimConfig,
    /// The planner's policy: one deployment (aggregated), the tunables, the GPU budget.
    pub policy: FleetPolicy,
    /// Planner or static.
    pub controller: Controller,
    /// The performance profile the planner is given.
    pub profile: PerfProfile,
    /// How long a new worker takes before it serves.
    pub startup: Duration,
    /// How the workers' real speed differs from the profile's.
    pub speed_error: SpeedError,
    /// A name for the run in tables and plots.
    pub label: String,
    /// Intervals ending before this are left out of SLA attainment and GPU-hours (the fleet
    /// starts from `sim.workers`, not from what the load needs).
    pub warmup: Duration,
    /// The controller plans for the deployment's SLA targets times this (1 = as given; 0.8 =
    /// 20% tighter); attainment is always measured against the targets as given. Puts two
    /// controllers at equal attainment so that their GPU-hours compare.
    pub headroom: f64,
}

impl PlannerSimConfig {
    /// The deployment the run plans.
    pub fn deployment(&self) -> &DeploymentPolicy {
        &self.policy.deployments[0]
    }
}

/// One interval of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IntervalReport {
    /// When it ended, seconds.
    pub end_s: f64,
    /// Requests that arrived.
    pub arrivals: u64,
    /// Arrivals per second.
    pub rate: f64,
    /// The rate the planner predicted at this interval's end (for the intervals ahead).
    pub predicted_rate: Option<f64>,
    /// Serving workers at the end.
    pub serving: u32,
    /// Starting workers at the end.
    pub starting: u32,
    /// Draining workers at the end.
    pub draining: u32,
    /// The planner's target at the end (or the static size).
    pub target: u32,
    /// TTFT at the SLA percentile of the first tokens emitted in the interval, ms (exact).
    pub ttft_ms: Option<f64>,
    /// ITL at the SLA percentile of the tokens emitted in the interval, ms (0.5% buckets).
    pub itl_ms: Option<f64>,
    /// Both within target (`None`: no tokens).
    pub met: Option<bool>,
    /// The planner's correction factors after this interval: prefill speed, TTFT spread,
    /// decode speed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub corrections: Option<[f64; 3]>,
    /// The decision's action, when it changed something.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    /// Its reason, when it changed something.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// One run of a controller over a trace.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlannerReport {
    /// The run's name.
    pub label: String,
    /// `kvfleet`, `dynamo` or `static`.
    pub algorithm: String,
    /// The predictor (planner runs).
    pub predictor: Option<PredictorKind>,
    /// The targets.
    pub ttft_target_ms: Option<f64>,
    /// The targets.
    pub itl_target_ms: Option<f64>,
    /// Their percentile.
    pub percentile: f64,
    /// The speed error of the run.
    pub speed_error: SpeedError,
    /// Start-up time of a worker, s.
    pub startup_s: f64,
    /// Planner interval, s.
    pub interval_s: f64,
    /// Intervals with tokens.
    pub intervals: usize,
    /// Of those, intervals that met both targets.
    pub intervals_met: usize,
    /// `intervals_met / intervals`.
    pub attainment: f64,
    /// Allocated GPU time over the trace's span, hours.
    pub gpu_hours: f64,
    /// The span GPU-hours are counted over (end of the warm-up to the last arrival), hours.
    pub span_hours: f64,
    /// Most workers allocated at once.
    pub peak_workers: u32,
    /// Workers started during the run.
    pub started: u32,
    /// Workers drained and stopped.
    pub stopped: u32,
    /// Decisions that scaled up / down.
    pub scale_ups: u32,
    /// Decisions that scaled up / down.
    pub scale_downs: u32,
    /// Whole-run TTFT p50/p90/p99, ms.
    pub ttft_ms: crate::stats::Percentiles,
    /// Whole-run ITL p50/p90/p99, ms.
    pub itl_ms: crate::stats::Percentiles,
    /// Requests completed / in the trace.
    pub completed: u64,
    /// Requests in the trace.
    pub requests: u64,
    /// Wall time of the run, s.
    pub wall_time_s: f64,
    /// Per interval.
    pub timeline: Vec<IntervalReport>,
}

/// Runs the controller over `trace`.
pub fn run_planned(
    config: &PlannerSimConfig,
    trace: &[TraceRequest],
) -> Result<PlannerReport, SimError> {
    let started = Instant::now();
    let deployment = config.deployment().clone();
    let role = deployment.roles_in_use()[0];
    let real_profile = slowed(&config.sim.profile, config.speed_error.of(role));
    // A static fleet has its size from the start.
    let sim_config = match config.controller {
        Controller::Static(n) => SimConfig {
            workers: n as usize,
            ..config.sim.clone()
        },
        Controller::Planner => config.sim.clone(),
    };
    let mut sim = Sim::new(&sim_config, trace)?;
    for w in 0..sim.workers.len() {
        sim.workers[w].engine = new_engine(&config.sim, &real_profile, sim.workers[w].id)?;
    }
    sim.interval = Some(Box::default());
    sim.candidates = Some(sim.workers.iter().map(|w| w.id).collect());
    let interval = config.policy.config.interval.max(Duration::from_secs(1));
    let span_end = if trace.is_empty() {
        Duration::ZERO
    } else {
        sim.arrival_time(trace.len() - 1)
    };
    let quantile = deployment.sla.quantile();
    let planning = with_headroom(&config.policy, config.headroom);
    let profiles = BTreeMap::from([(deployment.name.clone(), config.profile.clone())]);
    let mut history: Vec<Observation> = Vec::new();
    let mut memory: Option<Memory> = None;
    let mut timeline = Vec::new();
    let (mut scale_ups, mut scale_downs, mut started_n, mut stopped_n) = (0u32, 0u32, 0u32, 0u32);
    let mut peak = sim.workers.len() as u32;
    let mut now = Duration::ZERO;
    loop {
        now += interval;
        let more = sim.run_until(now)?;
        let (obs, measured) = sim.observe(now, interval, role, quantile);
        history.push(obs);
        let running = sim.count(|p| matches!(p, Phase::Serving | Phase::Starting { .. }));
        let mut report = IntervalReport {
            end_s: now.as_secs_f64(),
            arrivals: measured.arrivals,
            rate: measured.arrivals as f64 / interval.as_secs_f64(),
            predicted_rate: None,
            serving: 0,
            starting: 0,
            draining: 0,
            target: running,
            ttft_ms: measured.ttft_ms,
            itl_ms: measured.itl_ms,
            met: measured.met(deployment.sla.ttft_ms, deployment.sla.itl_ms),
            corrections: None,
            action: None,
            reason: None,
        };
        let target = match config.controller {
            Controller::Static(n) => n,
            Controller::Planner => {
                let observations = [DeploymentObservations {
                    deployment: &deployment.name,
                    history: &history,
                    running: RoleCounts::default().with(role, running),
                    previous: memory.as_ref(),
                }];
                let mut decision = plan(&observations, &profiles, &planning, now);
                let d = decision.deployments.remove(0);
                report.predicted_rate = Some(d.prediction.rate);
                let c = d.corrections.after;
                report.corrections = Some([c.prefill_speed, c.ttft_spread, c.decode_speed]);
                match d.action {
                    Action::Hold => {}
                    action => {
                        if action == Action::ScaleUp {
                            scale_ups += 1;
                        } else {
                            scale_downs += 1;
                        }
                        report.action = Some(action.as_str().to_owned());
                        report.reason = Some(d.reason.clone());
                    }
                }
                memory = Some(d.memory);
                d.targets.get(role)
            }
        };
        report.target = target;
        let (up, down) = sim.resize(
            target,
            now,
            now + config.startup,
            &config.sim,
            &real_profile,
        )?;
        started_n += up;
        stopped_n += down;
        report.serving = sim.count(|p| p == Phase::Serving);
        report.starting = sim.count(|p| matches!(p, Phase::Starting { .. }));
        report.draining = sim.count(|p| p == Phase::Draining);
        peak = peak.max(report.serving + report.starting + report.draining);
        timeline.push(report);
        // Keep history bounded (the planner reads at most a few seasons).
        if history.len() > 4 * config.policy.config.season_intervals().max(64) {
            history.drain(..history.len() / 2);
        }
        if !more && sim.arrivals_done() && !sim.busy() {
            break;
        }
    }
    let span_start = config.warmup.min(span_end);
    let gpu_hours = sim
        .workers
        .iter()
        .map(|w| {
            let (from, to) = w.allocated;
            let to = to.unwrap_or(now).min(span_end);
            to.saturating_sub(from.max(span_start)).as_secs_f64()
        })
        .sum::<f64>()
        / 3600.0;
    let with_traffic: Vec<&IntervalReport> = timeline
        .iter()
        .filter(|i| i.met.is_some() && i.end_s > config.warmup.as_secs_f64())
        .collect();
    let met = with_traffic.iter().filter(|i| i.met == Some(true)).count();
    let sim_report: SimReport = sim.report(started.elapsed());
    let (algorithm, predictor) = match config.controller {
        Controller::Static(_) => ("static".to_owned(), None),
        Controller::Planner => (
            config.policy.config.algorithm.as_str().to_owned(),
            Some(config.policy.config.predictor),
        ),
    };
    Ok(PlannerReport {
        label: config.label.clone(),
        algorithm,
        predictor,
        ttft_target_ms: deployment.sla.ttft_ms,
        itl_target_ms: deployment.sla.itl_ms,
        percentile: deployment.sla.percentile,
        speed_error: config.speed_error,
        startup_s: config.startup.as_secs_f64(),
        interval_s: interval.as_secs_f64(),
        intervals: with_traffic.len(),
        intervals_met: met,
        attainment: if with_traffic.is_empty() {
            1.0
        } else {
            met as f64 / with_traffic.len() as f64
        },
        gpu_hours,
        span_hours: span_end.saturating_sub(span_start).as_secs_f64() / 3600.0,
        peak_workers: peak,
        started: started_n,
        stopped: stopped_n,
        scale_ups,
        scale_downs,
        ttft_ms: sim_report.ttft_ms,
        itl_ms: sim_report.itl_ms,
        completed: sim_report.completed,
        requests: sim_report.requests,
        wall_time_s: started.elapsed().as_secs_f64(),
        timeline,
    })
}

/// A fresh engine for worker `id` running `profile` (the config's scheduler and pool).
fn new_engine(
    config: &SimConfig,
    profile: &MockProfile,
    id: WorkerId,
) -> Result<MockEngine, SimError> {
    let mut scheduler = config.scheduler.clone();
    scheduler.worker = id;
    if config.pool_from_profile {
        scheduler.kv_memory = config.profile.pool_sizing();
    }
    Ok(MockEngine::new(
        scheduler,
        MockExecutor::new(profile.clone()),
    )?)
}

/// What the driver measured of an interval, beyond the planner's observation.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Measured {
    arrivals: u64,
    ttft_ms: Option<f64>,
    itl_ms: Option<f64>,
}

impl Measured {
    fn met(&self, ttft_target: Option<f64>, itl_target: Option<f64>) -> Option<bool> {
        if self.ttft_ms.is_none() && self.itl_ms.is_none() {
            return None;
        }
        let ok = |v: Option<f64>, t: Option<f64>| match (v, t) {
            (Some(v), Some(t)) => v <= t,
            _ => true,
        };
        Some(ok(self.ttft_ms, ttft_target) && ok(self.itl_ms, itl_target))
    }
}

impl Sim<'_> {
    /// Workers whose phase satisfies `f`.
    pub(crate) fn count(&self, f: impl Fn(Phase) -> bool) -> u32 {
        self.workers.iter().filter(|w| f(w.phase)).count() as u32
    }

    fn refresh_candidates(&mut self) {
        self.candidates = Some(
            self.workers
                .iter()
                .filter(|w| w.phase == Phase::Serving)
                .map(|w| w.id)
                .collect(),
        );
    }

    /// A starting worker begins to serve (called by the event loop at its ready time).
    pub(crate) fn start_serving(&mut self, w: usize, _now: Duration) -> Result<(), SimError> {
        let worker = &mut self.workers[w];
        if !matches!(worker.phase, Phase::Starting { .. }) {
            return Ok(());
        }
        worker.phase = Phase::Serving;
        let capacity = WorkerCapacity {
            kv_blocks: u64::from(worker.engine.pool().usage().total),
            max_queue_depth: None,
        };
        self.router.add_worker(worker.id, capacity)?;
        self.refresh_candidates();
        // Requests that waited for a worker get one.
        Ok(())
    }

    /// A drained (or cancelled) worker releases its GPU.
    pub(crate) fn stop_worker(&mut self, w: usize, now: Duration) {
        let worker = &mut self.workers[w];
        if worker.phase == Phase::Stopped {
            return;
        }
        let was_registered = matches!(worker.phase, Phase::Serving | Phase::Draining);
        worker.phase = Phase::Stopped;
        worker.allocated.1 = Some(now);
        let id = worker.id;
        // Its pool's memory goes back too: a day of scaling creates hundreds of workers.
        let mut tiny = self.config.scheduler.clone();
        tiny.worker = id;
        tiny.kv_memory = PoolSizing::Blocks(1);
        if let Ok(engine) = MockEngine::new(tiny, MockExecutor::new(self.config.profile.clone())) {
            worker.engine = engine;
        }
        if was_registered {
            self.router.remove_worker(id);
        }
        self.refresh_candidates();
    }

    /// Brings the non-draining workers to `target`: starts new ones (serving at `ready_at`)
    /// or cancels starting ones and drains serving ones (fewest requests in flight first).
    /// Returns (started, drained or cancelled).
    fn resize(
        &mut self,
        target: u32,
        now: Duration,
        ready_at: Duration,
        config: &SimConfig,
        profile: &MockProfile,
    ) -> Result<(u32, u32), SimError> {
        let running = self.count(|p| matches!(p, Phase::Serving | Phase::Starting { .. }));
        if target > running {
            for _ in running..target {
                let id = WorkerId(self.workers.len() as u64 + 1);
                let engine = new_engine(config, profile, id)?;
                let w = self.workers.len();
                self.workers
                    .push(Worker::new(id, engine, Phase::Starting { ready_at }, now));
                self.starting.push(std::cmp::Reverse((ready_at, w)));
            }
            return Ok((target - running, 0));
        }
        let mut excess = running - target;
        let removed = excess;
        // Starting workers first (newest first): nothing to drain.
        for w in (0..self.workers.len()).rev() {
            if excess == 0 {
                break;
            }
            if matches!(self.workers[w].phase, Phase::Starting { .. }) {
                self.stop_worker(w, now);
                excess -= 1;
            }
        }
        let mut serving: Vec<usize> = (0..self.workers.len())
            .filter(|&w| self.workers[w].phase == Phase::Serving)
            .collect();
        serving.sort_by_key(|&w| (self.workers[w].live.len(), std::cmp::Reverse(w)));
        for w in serving.into_iter().take(excess as usize) {
            self.workers[w].phase = Phase::Draining;
            if !self.workers[w].engine.has_work() {
                self.stop_worker(w, now);
            }
        }
        self.refresh_candidates();
        Ok((0, removed))
    }

    /// The interval just ended, as the planner's observation, and the exact percentiles.
    fn observe(
        &mut self,
        now: Duration,
        length: Duration,
        role: WorkerRole,
        quantile: f64,
    ) -> (Observation, Measured) {
        let stats = self.interval.take().map(|b| *b).unwrap_or_default();
        self.interval = Some(Box::default());
        let mut obs = stats.observation(now, length);
        let measured = stats.measured(quantile);
        let mut queue = self.backlog.len() as u64;
        let mut pending: u64 = self
            .backlog
            .iter()
            .map(|&i| u64::from(self.trace[i].input_length))
            .sum();
        let mut serving = 0;
        for w in self
            .workers
            .iter()
            .filter(|w| w.phase == Phase::Serving || w.phase == Phase::Draining)
        {
            let m = w.engine.metrics();
            queue += m.waiting as u64;
            pending += w.pending_prefill;
            *obs.kv_blocks_used.get_mut(role) += u64::from(m.kv_blocks_used);
            *obs.kv_blocks_total.get_mut(role) += u64::from(m.kv_blocks_total);
            if w.phase == Phase::Serving {
                serving += 1;
            }
        }
        obs.queue_depth = queue;
        obs.pending_prefill_tokens = pending;
        *obs.workers.get_mut(role) = serving;
        (obs, measured)
    }
}

/// The label of a planner run: `kvfleet/holt`, `dynamo/last`.
pub fn planner_label(algorithm: Algorithm, predictor: PredictorKind) -> String {
    format!("{}/{}", algorithm.as_str(), predictor)
}

/// `policy` with every deployment's SLA targets multiplied by `headroom`.
fn with_headroom(policy: &FleetPolicy, headroom: f64) -> FleetPolicy {
    let mut planning = policy.clone();
    for d in &mut planning.deployments {
        d.sla.ttft_ms = d.sla.ttft_ms.map(|t| t * headroom);
        d.sla.itl_ms = d.sla.itl_ms.map(|t| t * headroom);
    }
    planning
}

#[cfg(test)]
mod tests;
