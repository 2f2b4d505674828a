//! The capacity model: for a load and a worker count, the TTFT and ITL percentiles a
//! deployment should see, from its performance profile and the learned corrections.
//!
//! **Prefill** is a queue. A request's service is its prefill alone on an idle worker,
//! `S = profile.prefill_ms(new, cached) × prefill_speed` (new and cached tokens from the mean
//! prompt length and the prefix hit rate; an aggregated worker also pays a decode step per
//! prefill chunk). `n` workers behind a load-aware router behave like one M/M/n queue:
//! with offered load `a = λ·S` and Erlang's C(n, a), the wait exceeds `t` with probability
//! `C·e^(−(n/S − λ)·t)`, so the q-percentile wait is `ln(C / (1 − q)) / (n/S − λ)` (0 when
//! `C ≤ 1 − q`). The TTFT percentile is `spread × S + wait_q`: `spread` (learned) is how much
//! longer the q-percentile prompt is than the mean one.
//!
//! **Decode** is a batch. Little's law gives the streams in flight, `λ·(TTFT + OSL·ITL)`
//! (solved by a few fixed-point rounds since ITL depends on the batch), each holding
//! `ISL + OSL/2` tokens of context on average; the q-percentile batch per worker is the mean
//! plus `z_q·√mean` (Poisson arrivals), and the ITL is the profile's at that batch and context,
//! times `decode_speed` (learned). A batch whose KV does not fit the worker's pool, or exceeds
//! its `max_num_seqs`, would be preempted: that counts as a missed ITL.
//!
//! **Aggregated** workers do both in one engine. The TTFT is the prefill queue's; the ITL is
//! the decode batch's unless more than `1 − q` of the decode tokens come out of steps that
//! also carry a prefill chunk, in which case the ITL percentile is that chunk's step time.
//!
//! Everything is monotone: more load never needs fewer workers, more workers never predict a
//! worse latency. [`workers_needed`] searches the smallest count that meets the targets.

use kvfleet_proto::api::WorkerRole;
use kvfleet_proto::profile::PerfProfile;
use serde::{Deserialize, Serialize};

/// The load one role must carry, as the planner predicts it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Load {
    /// Requests per second.
    pub rate: f64,
    /// Mean prompt length, tokens.
    pub isl: f64,
    /// Mean output length, tokens.
    pub osl: f64,
    /// Share of prompt tokens found in a prefix cache, 0..1.
    pub hit_rate: f64,
}

impl Load {
    /// Prompt tokens each request must compute.
    pub fn new_tokens(&self) -> f64 {
        (self.isl * (1.0 - self.hit_rate.clamp(0.0, 1.0))).max(1.0)
    }

    /// Prompt tokens each request finds cached.
    pub fn cached_tokens(&self) -> f64 {
        (self.isl - self.new_tokens()).max(0.0)
    }

    /// Mean context of a decoding sequence, tokens.
    pub fn decode_context(&self) -> f64 {
        self.isl + self.osl / 2.0
    }
}

/// What the planner has learned about how the real workers differ from their profile.
/// Each factor is bounded and smoothed by [`crate::correction`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Corrections {
    /// Real prefill time over the profile's (1.3: 30% slower than profiled).
    pub prefill_speed: f64,
    /// The q-percentile request's service time over the mean request's (≥ 1).
    pub ttft_spread: f64,
    /// Real ITL over the model's.
    pub decode_speed: f64,
}

impl Default for Corrections {
    fn default() -> Self {
        Self {
            prefill_speed: 1.0,
            ttft_spread: 1.0,
            decode_speed: 1.0,
        }
    }
}

/// The latency targets, as the model reads them.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Targets {
    /// TTFT target at the percentile, ms (`None`: no TTFT target).
    pub ttft_ms: Option<f64>,
    /// ITL target at the percentile, ms (`None`: no ITL target).
    pub itl_ms: Option<f64>,
    /// The percentile both hold at, as a fraction (0.9 = p90).
    pub quantile: f64,
}

/// What the model predicts for `n` workers of a role.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Estimate {
    /// Workers.
    pub workers: u32,
    /// Mean prefill service time, ms (0 for decode workers).
    pub service_ms: f64,
    /// Busy fraction of each worker's prefill capacity (`λ·S/n`; ≥ 1 is saturated).
    pub prefill_utilization: f64,
    /// TTFT at the percentile, ms (infinite when saturated; 0 for decode workers).
    pub ttft_ms: f64,
    /// Decoding streams per worker at the percentile.
    pub batch: f64,
    /// ITL at the percentile, ms (0 for prefill workers).
    pub itl_ms: f64,
}

/// Why a role needs the workers it needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Binding {
    /// No load: nothing needs a worker.
    Idle,
    /// The TTFT target.
    Ttft,
    /// The ITL target.
    Itl,
    /// Neither target is set; enough workers not to saturate.
    Throughput,
    /// A target no number of workers can meet: sized to within 10% of the best possible.
    Unreachable,
}

impl Binding {
    /// How a sentence names it.
    pub fn describe(self) -> &'static str {
        match self {
            Binding::Idle => "no load",
            Binding::Ttft => "the TTFT target",
            Binding::Itl => "the ITL target",
            Binding::Throughput => "throughput",
            Binding::Unreachable => "an unreachable target (within 10% of the best possible)",
        }
    }
}

/// A target below the best achievable latency is sized as this multiple of that latency.
const UNREACHABLE_SLACK: f64 = 1.1;

/// The most workers of one role the model ever proposes (a guard, far above any fleet).
pub const MAX_MODEL_WORKERS: u32 = 100_000;

/// Blocks of a worker's KV pool the model lets decoding fill (the rest is headroom).
const KV_FILL_LIMIT: f64 = 0.95;

/// `z` with `P(Z ≤ z) = q` for a standard normal (Abramowitz & Stegun 26.2.23, error
/// < 4.5e-4), for `q` in [0.5, 0.9999]; 0 below.
pub fn normal_quantile(q: f64) -> f64 {
    if q.is_nan() || q <= 0.5 {
        return 0.0;
    }
    let p = (1.0 - q).max(1e-4);
    let t = (-2.0 * p.ln()).sqrt();
    t - (2.515517 + 0.802853 * t + 0.010328 * t * t)
        / (1.0 + 1.432788 * t + 0.189269 * t * t + 0.001308 * t * t * t)
}

/// Erlang's C: the probability that an arrival waits in an M/M/n queue with offered load `a`
/// (in servers). 1 when saturated (`a ≥ n`).
pub fn erlang_c(n: u32, a: f64) -> f64 {
    if n == 0 || a >= f64::from(n) {
        return 1.0;
    }
    if a <= 0.0 {
        return 0.0;
    }
    // Erlang B by its stable recurrence, then C from B.
    let mut b = 1.0;
    for k in 1..=n {
        b = a * b / (f64::from(k) + a * b);
    }
    let n = f64::from(n);
    (n * b / (n - a * (1.0 - b))).clamp(0.0, 1.0)
}

/// The q-percentile wait of an M/M/n queue, seconds; `None` when saturated.
pub fn wait_quantile_s(n: u32, rate: f64, service_s: f64, q: f64) -> Option<f64> {
    if rate <= 0.0 || service_s <= 0.0 {
        return Some(0.0);
    }
    let a = rate * service_s;
    if n == 0 || a >= f64::from(n) {
        return None;
    }
    let c = erlang_c(n, a);
    let tail = 1.0 - q.clamp(0.0, 0.9999);
    if c <= tail {
        return Some(0.0);
    }
    Some((c / tail).ln() / (f64::from(n) / service_s - rate))
}

/// The mean wait of an M/M/n queue, seconds; `None` when saturated.
pub fn wait_mean_s(n: u32, rate: f64, service_s: f64) -> Option<f64> {
    if rate <= 0.0 || service_s <= 0.0 {
        return Some(0.0);
    }
    let a = rate * service_s;
    if n == 0 || a >= f64::from(n) {
        return None;
    }
    Some(erlang_c(n, a) / (f64::from(n) / service_s - rate))
}

/// The model of one deployment's workers: its profile, corrections and targets.
#[derive(Debug, Clone, Copy)]
pub struct Model<'a> {
    /// The workers' performance profile.
    pub profile: &'a PerfProfile,
    /// Learned corrections.
    pub corrections: Corrections,
    /// The targets.
    pub targets: Targets,
}

impl Model<'_> {
    /// Prefill chunks (engine steps) a request's new tokens take.
    fn chunks(&self, load: &Load) -> f64 {
        (load.new_tokens() / f64::from(self.profile.max_batched_tokens.max(1)))
            .ceil()
            .max(1.0)
    }

    /// Mean prefill service time of one request alone, seconds (an aggregated worker also
    /// runs a decode step with every prefill chunk).
    pub fn service_s(&self, role: WorkerRole, load: &Load, decode_itl_ms: f64) -> f64 {
        let prefill = self
            .profile
            .prefill_ms(load.new_tokens() as u64, load.cached_tokens() as u64)
            * self.corrections.prefill_speed;
        let decode = if role == WorkerRole::Aggregated {
            self.chunks(load) * decode_itl_ms
        } else {
            0.0
        };
        (prefill + decode) / 1000.0
    }

    /// Mean TTFT with `n` workers, seconds; `None` when saturated.
    pub fn ttft_mean_s(&self, role: WorkerRole, load: &Load, n: u32) -> Option<f64> {
        let s = self.service_s(role, load, self.idle_itl_ms(load));
        wait_mean_s(n, load.rate, s).map(|w| s + w)
    }

    /// The q-percentile TTFT with `n` workers, seconds; `None` when saturated.
    pub fn ttft_quantile_s(&self, role: WorkerRole, load: &Load, n: u32) -> Option<f64> {
        let s = self.service_s(role, load, self.idle_itl_ms(load));
        wait_quantile_s(n, load.rate, s, self.targets.quantile)
            .map(|w| self.corrections.ttft_spread.max(1.0) * s + w)
    }

    fn idle_itl_ms(&self, load: &Load) -> f64 {
        self.profile.itl_ms(1, load.decode_context() as u64) * self.corrections.decode_speed
    }

    /// Everything the model predicts for `n` workers of `role` under `load`.
    pub fn estimate(&self, role: WorkerRole, load: &Load, n: u32) -> Estimate {
        let context = load.decode_context().max(1.0) as u64;
        let mut estimate = Estimate {
            workers: n,
            service_ms: 0.0,
            prefill_utilization: 0.0,
            ttft_ms: 0.0,
            batch: 0.0,
            itl_ms: 0.0,
        };
        if n == 0 {
            let saturated = load.rate > 0.0;
            estimate.ttft_ms = if saturated { f64::INFINITY } else { 0.0 };
            estimate.itl_ms = estimate.ttft_ms;
            estimate.prefill_utilization = estimate.ttft_ms;
            return estimate;
        }
        let does_prefill = role != WorkerRole::Decode;
        let does_decode = role != WorkerRole::Prefill;
        // Decode batch and ITL (fixed point over Little's law).
        let mut itl = self.idle_itl_ms(load);
        let mut ttft_s = 0.0;
        if does_prefill {
            let s = self.service_s(role, load, itl);
            estimate.service_ms = s * 1000.0;
            estimate.prefill_utilization = load.rate * s / f64::from(n);
            ttft_s = wait_quantile_s(n, load.rate, s, self.targets.quantile)
                .map_or(f64::INFINITY, |w| {
                    self.corrections.ttft_spread.max(1.0) * s + w
                });
            estimate.ttft_ms = ttft_s * 1000.0;
        }
        if does_decode && load.rate > 0.0 {
            let z = normal_quantile(self.targets.quantile);
            let mean_ttft = if does_prefill {
                self.ttft_mean_s(role, load, n).unwrap_or(ttft_s)
            } else {
                0.0
            };
            let mut batch_q = 1.0;
            for _ in 0..4 {
                let in_flight = load.rate * (mean_ttft.min(60.0) + load.osl * itl / 1000.0);
                let mean = in_flight / f64::from(n);
                batch_q = (mean + z * mean.sqrt()).max(1.0);
                itl = self.profile.itl_ms(batch_q.ceil() as u32, context)
                    * self.corrections.decode_speed;
            }
            estimate.batch = batch_q;
            let blocks_per_seq = (context + 1).div_ceil(u64::from(self.profile.block_size.max(1)));
            let fits_kv =
                batch_q * blocks_per_seq as f64 <= self.profile.kv_blocks as f64 * KV_FILL_LIMIT;
            let fits_seqs = batch_q <= f64::from(self.profile.max_num_seqs);
            if !(fits_kv && fits_seqs) {
                itl = f64::INFINITY;
            }
            if role == WorkerRole::Aggregated && itl.is_finite() {
                itl = self.with_prefill_interference(load, estimate.prefill_utilization, itl);
            }
            estimate.itl_ms = itl;
        }
        estimate
    }

    /// An aggregated worker's ITL percentile given its prefill busy fraction `u`: the share
    /// of decode tokens emitted by steps that carry a prefill chunk is
    /// `(u/Tp) / (u/Tp + (1 − u)/Td)`; above `1 − q` the percentile is the chunk step.
    fn with_prefill_interference(&self, load: &Load, u: f64, decode_ms: f64) -> f64 {
        if u >= 1.0 {
            return f64::INFINITY;
        }
        if u <= 0.0 {
            return decode_ms;
        }
        let chunks = self.chunks(load);
        let chunk_ms = self
            .profile
            .prefill_ms(load.new_tokens() as u64, load.cached_tokens() as u64)
            * self.corrections.prefill_speed
            / chunks
            + decode_ms;
        let in_prefill = (u / chunk_ms) / (u / chunk_ms + (1.0 - u) / decode_ms);
        if in_prefill > 1.0 - self.targets.quantile {
            chunk_ms.max(decode_ms)
        } else {
            decode_ms
        }
    }

    /// The best TTFT and ITL percentiles any number of `role` workers can reach under `load`,
    /// ms: an idle worker's service (times the spread) and a lone stream's ITL.
    pub fn floors(&self, role: WorkerRole, load: &Load) -> (f64, f64) {
        let itl = self.idle_itl_ms(load);
        let ttft = if role == WorkerRole::Decode {
            0.0
        } else {
            self.corrections.ttft_spread.max(1.0) * self.service_s(role, load, itl) * 1000.0
        };
        (ttft, itl)
    }

    /// Whether `estimate` meets the targets that apply to `role`.
    pub fn meets(&self, role: WorkerRole, estimate: &Estimate) -> bool {
        let ttft_ok = role == WorkerRole::Decode
            || match self.targets.ttft_ms {
                Some(t) => estimate.ttft_ms <= t,
                None => estimate.prefill_utilization < 1.0,
            };
        let itl_ok = role == WorkerRole::Prefill
            || match self.targets.itl_ms {
                Some(t) => estimate.itl_ms <= t,
                None => estimate.itl_ms.is_finite(),
            };
        ttft_ok && itl_ok
    }

    /// Which target a count that just fails is failing (for the explanation).
    fn failing(&self, role: WorkerRole, estimate: &Estimate) -> Binding {
        let ttft_fails = role != WorkerRole::Decode
            && match self.targets.ttft_ms {
                Some(t) => estimate.ttft_ms > t,
                None => estimate.prefill_utilization >= 1.0,
            };
        if ttft_fails {
            if self.targets.ttft_ms.is_some() {
                Binding::Ttft
            } else {
                Binding::Throughput
            }
        } else if self.targets.itl_ms.is_some() {
            Binding::Itl
        } else {
            Binding::Throughput
        }
    }
}

/// How many workers of `role` the load needs, with the estimate at that count and at one
/// fewer (what makes the count necessary).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Need {
    /// The smallest count that meets the targets (capped at [`MAX_MODEL_WORKERS`]).
    pub workers: u32,
    /// What the count is for.
    pub binding: Binding,
    /// The model's prediction at `workers`.
    pub at: Estimate,
    /// The model's prediction at `workers − 1` (absent when `workers` ≤ 1).
    pub below: Option<Estimate>,
}

/// The smallest number of `role` workers that meets the targets under `load`.
pub fn workers_needed(model: &Model<'_>, role: WorkerRole, load: &Load) -> Need {
    if load.rate.is_nan() || load.rate <= 0.0 {
        return Need {
            workers: 0,
            binding: Binding::Idle,
            at: model.estimate(role, load, 0),
            below: None,
        };
    }
    // A target no number of workers can meet (even idle workers are slower) is relaxed to
    // 10% above the best the model can do, so the fleet still grows to where more workers
    // stop helping instead of to the maximum.
    let (ttft_floor, itl_floor) = model.floors(role, load);
    let mut relaxed = false;
    let mut targets = model.targets;
    if let Some(t) = targets.ttft_ms
        && role != WorkerRole::Decode
        && t < ttft_floor * UNREACHABLE_SLACK
    {
        targets.ttft_ms = Some(ttft_floor * UNREACHABLE_SLACK);
        relaxed = true;
    }
    if let Some(t) = targets.itl_ms
        && role != WorkerRole::Prefill
        && t < itl_floor * UNREACHABLE_SLACK
    {
        targets.itl_ms = Some(itl_floor * UNREACHABLE_SLACK);
        relaxed = true;
    }
    let model = &Model { targets, ..*model };
    // Exponential search for a count that meets, then bisection (meeting is monotone in n).
    let mut hi = 1u32;
    while !model.meets(role, &model.estimate(role, load, hi)) {
        if hi >= MAX_MODEL_WORKERS {
            break;
        }
        hi = (hi * 2).min(MAX_MODEL_WORKERS);
    }
    let mut lo = hi / 2; // fails (or 0)
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if model.meets(role, &model.estimate(role, load, mid)) {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    let below = (hi > 1).then(|| model.estimate(role, load, hi - 1));
    let binding = if relaxed {
        Binding::Unreachable
    } else {
        below.map_or_else(
            || model.failing(role, &model.estimate(role, load, 0)),
            |b| model.failing(role, &b),
        )
    };
    Need {
        workers: hi,
        binding,
        at: model.estimate(role, load, hi),
        below,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The default mock's profile (Llama 3.1 8B on an H100), as the simulator uses it.
    pub(crate) fn h100() -> PerfProfile {
        PerfProfile::from_toml_str(include_str!(
            "../../engine/profiles/llama-3.1-8b-h100.perf.toml"
        ))
        .expect("the shipped profile is valid")
    }

    pub(crate) fn targets() -> Targets {
        Targets {
            ttft_ms: Some(2000.0),
            itl_ms: Some(25.0),
            quantile: 0.9,
        }
    }

    pub(crate) fn load(rate: f64) -> Load {
        Load {
            rate,
            isl: 15_000.0,
            osl: 150.0,
            hit_rate: 0.25,
        }
    }

    #[test]
    fn erlang_c_matches_known_values() {
        // One server: C = utilisation.
        assert!((erlang_c(1, 0.7) - 0.7).abs() < 1e-12);
        // Two servers, a = 1: C = 1/3.
        assert!((erlang_c(2, 1.0) - 1.0 / 3.0).abs() < 1e-12);
        assert_eq!(erlang_c(3, 3.0), 1.0);
        assert_eq!(erlang_c(3, 0.0), 0.0);
        // M/M/1, ρ = 0.5, S = 1 s: P(W > t) = 0.5·e^(−0.5 t), so the p90 wait is 2·ln 5.
        let w = wait_quantile_s(1, 0.5, 1.0, 0.9).unwrap();
        assert!((w - 2.0 * 5f64.ln()).abs() < 1e-9, "{w}");
        assert_eq!(wait_quantile_s(1, 0.05, 1.0, 0.9), Some(0.0));
        assert_eq!(wait_quantile_s(2, 3.0, 1.0, 0.9), None);
        // Mean wait of M/M/1: ρ/(μ − λ) = 0.5 / 0.5.
        assert!((wait_mean_s(1, 0.5, 1.0).unwrap() - 1.0).abs() < 1e-12);
    }

    #[test]
    fn normal_quantiles_are_close() {
        for (q, z) in [(0.5, 0.0), (0.9, 1.2816), (0.95, 1.6449), (0.99, 2.3263)] {
            assert!((normal_quantile(q) - z).abs() < 1e-3, "{q}");
        }
    }

    #[test]
    fn more_workers_never_predict_worse_latency() {
        let p = h100();
        let model = Model {
            profile: &p,
            corrections: Corrections::default(),
            targets: targets(),
        };
        for role in [
            WorkerRole::Aggregated,
            WorkerRole::Prefill,
            WorkerRole::Decode,
        ] {
            let mut last = model.estimate(role, &load(10.0), 1);
            for n in 2..40 {
                let e = model.estimate(role, &load(10.0), n);
                assert!(e.ttft_ms <= last.ttft_ms, "{role} n={n}");
                assert!(e.itl_ms <= last.itl_ms, "{role} n={n}");
                last = e;
            }
        }
    }

    #[test]
    fn sizing_table() {
        let p = h100();
        let model = Model {
            profile: &p,
            corrections: Corrections::default(),
            targets: targets(),
        };
        // (role, rate, expected binding): counts are checked against the model's own
        // estimates, the binding against what fails one below.
        let rows = [
            (WorkerRole::Prefill, 10.0, Binding::Ttft),
            (WorkerRole::Decode, 10.0, Binding::Itl),
            (WorkerRole::Aggregated, 10.0, Binding::Itl),
            (WorkerRole::Aggregated, 0.0, Binding::Idle),
        ];
        for (role, rate, binding) in rows {
            let need = workers_needed(&model, role, &load(rate));
            assert_eq!(need.binding, binding, "{role} {rate}: {need:?}");
            if rate > 0.0 {
                assert!(model.meets(role, &need.at), "{need:?}");
                assert!(!model.meets(role, &need.below.unwrap()), "{need:?}");
            } else {
                assert_eq!(need.workers, 0);
            }
        }
        // Prefill throughput bound: 10 req/s of 11,250 new tokens at ~0.25 s each is ≥ 2.5
        // busy workers, so at least 3; the TTFT tail asks for a bit more.
        let prefill = workers_needed(&model, WorkerRole::Prefill, &load(10.0));
        assert!((3..=6).contains(&prefill.workers), "{prefill:?}");
        // An aggregated worker does both jobs: more than either alone.
        let decode = workers_needed(&model, WorkerRole::Decode, &load(10.0));
        let agg = workers_needed(&model, WorkerRole::Aggregated, &load(10.0));
        assert!(
            agg.workers >= prefill.workers.max(decode.workers),
            "{agg:?}"
        );
    }

    #[test]
    fn slower_workers_need_more_of_them() {
        let p = h100();
        let mut model = Model {
            profile: &p,
            corrections: Corrections::default(),
            targets: targets(),
        };
        let nominal = workers_needed(&model, WorkerRole::Aggregated, &load(20.0)).workers;
        model.corrections.prefill_speed = 1.3;
        model.corrections.decode_speed = 1.3;
        let slow = workers_needed(&model, WorkerRole::Aggregated, &load(20.0)).workers;
        assert!(slow > nominal, "{slow} vs {nominal}");
    }

    #[test]
    fn no_targets_still_avoid_saturation() {
        let p = h100();
        let model = Model {
            profile: &p,
            corrections: Corrections::default(),
            targets: Targets {
                ttft_ms: None,
                itl_ms: None,
                quantile: 0.9,
            },
        };
        let need = workers_needed(&model, WorkerRole::Prefill, &load(10.0));
        assert_eq!(need.binding, Binding::Throughput);
        assert!(need.at.prefill_utilization < 1.0);
        assert!(need.below.unwrap().prefill_utilization >= 1.0);
    }
}
