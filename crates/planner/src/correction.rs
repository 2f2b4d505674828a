//! Correction factors: how the real workers differ from their profile, learned from what each
//! interval observed, bounded and smoothed.
//!
//! From one interval with enough requests, at the load and worker count it had:
//!
//! - `prefill_speed` is the factor on the profile's prefill time that makes the model's mean
//!   TTFT (service + M/M/n mean wait) equal the observed mean TTFT (a bisection: the model's
//!   mean grows with the factor);
//! - `ttft_spread` is the observed TTFT percentile, less the model's percentile wait, over the
//!   corrected mean service time (how much longer the slow prompts are than the mean one);
//! - `decode_speed` is the observed ITL percentile over the model's at the observed load.
//!
//! Intervals that end with more than two requests per worker waiting teach nothing: the
//! fleet was not in a steady state. Each raw factor is clamped to [`CorrectionConfig::min`]..=[`CorrectionConfig::max`] (the
//! spread to `1..=max_spread`) and blended into the previous one with weight
//! [`CorrectionConfig::weight`], so one odd interval moves the planner a little and a lasting
//! difference moves it all the way within a few intervals.

use kvfleet_proto::api::WorkerRole;
use serde::{Deserialize, Serialize};

use crate::model::{Corrections, Load, Model, wait_quantile_s};
use crate::observe::Observation;

/// How corrections are bounded and smoothed.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CorrectionConfig {
    /// Whether to learn at all (off: the profile is taken as exact).
    pub enabled: bool,
    /// Smallest speed factor (0.5: twice as fast as profiled).
    pub min: f64,
    /// Largest speed factor (3: three times slower).
    pub max: f64,
    /// Largest TTFT spread.
    pub max_spread: f64,
    /// Weight of a new interval's factor (0..1].
    pub weight: f64,
    /// Fewest TTFT (or ITL) samples an interval needs to update a factor.
    pub min_samples: u64,
}

impl Default for CorrectionConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            min: 0.5,
            max: 3.0,
            max_spread: 8.0,
            weight: 0.3,
            min_samples: 20,
        }
    }
}

/// What one interval said, before smoothing (for the decision's explanation).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct RawCorrections {
    /// The interval's prefill speed factor, if it had enough first tokens.
    pub prefill_speed: Option<f64>,
    /// The interval's TTFT spread, if it had enough first tokens.
    pub ttft_spread: Option<f64>,
    /// The interval's decode speed factor, if it had enough tokens.
    pub decode_speed: Option<f64>,
}

/// The roles whose workers produce first tokens and decode tokens in a deployment whose
/// workers are `roles`.
fn serving_roles(obs: &Observation) -> (Option<WorkerRole>, Option<WorkerRole>) {
    if obs.workers.aggregated > 0 {
        (Some(WorkerRole::Aggregated), Some(WorkerRole::Aggregated))
    } else {
        (
            (obs.workers.prefill > 0).then_some(WorkerRole::Prefill),
            (obs.workers.decode > 0).then_some(WorkerRole::Decode),
        )
    }
}

/// The raw factors one interval implies, given the model with the current corrections (the
/// spread is fitted after the speed, and the decode factor uses the new prefill speed).
pub fn fit(model: &Model<'_>, obs: &Observation, config: &CorrectionConfig) -> RawCorrections {
    let mut raw = RawCorrections::default();
    if !config.enabled {
        return raw;
    }
    let (Some(isl), Some(hit)) = (obs.mean_isl(), obs.prefix_hit_rate()) else {
        return raw;
    };
    let osl = obs.mean_osl().unwrap_or(1.0);
    let load = Load {
        rate: obs.request_rate(),
        isl,
        osl,
        hit_rate: hit,
    };
    let (ttft_role, itl_role) = serving_roles(obs);
    // An interval that ended with a queue is not in a steady state (a backlog is building or
    // draining): its latencies say more about the backlog than about the workers' speed.
    let serving = obs.workers.total().max(1);
    if obs.queue_depth > 2 * u64::from(serving) {
        return raw;
    }
    let mut prefill_speed = model.corrections.prefill_speed;
    if let Some(role) = ttft_role
        && obs.ttft.count() >= config.min_samples
        && let Some(mean) = obs.ttft.mean_seconds()
    {
        let n = obs.workers.get(role);
        let with = |speed: f64| Model {
            corrections: Corrections {
                prefill_speed: speed,
                ..model.corrections
            },
            ..*model
        };
        let model_mean = |speed: f64| with(speed).ttft_mean_s(role, &load, n);
        // The model's mean TTFT grows with the factor (to infinity at saturation): bisect.
        let (mut lo, mut hi) = (config.min, config.max);
        prefill_speed = if model_mean(lo).is_none_or(|m| m >= mean) {
            lo
        } else if model_mean(hi).is_some_and(|m| m <= mean) {
            hi
        } else {
            for _ in 0..40 {
                let mid = 0.5 * (lo + hi);
                if model_mean(mid).is_some_and(|m| m <= mean) {
                    lo = mid;
                } else {
                    hi = mid;
                }
            }
            lo
        };
        raw.prefill_speed = Some(prefill_speed);
        let corrected = with(prefill_speed);
        let service = corrected.service_s(role, &load, 0.0);
        if let (Some(q), true) = (obs.ttft.quantile(model.targets.quantile), service > 0.0) {
            let wait =
                wait_quantile_s(n, load.rate, service, model.targets.quantile).unwrap_or(0.0);
            raw.ttft_spread = Some(((q - wait) / service).clamp(1.0, config.max_spread));
        }
    }
    if let Some(role) = itl_role
        && obs.itl.count() >= config.min_samples
        && let Some(observed) = obs.itl.quantile(model.targets.quantile)
    {
        let unit = Model {
            corrections: Corrections {
                prefill_speed,
                decode_speed: 1.0,
                ..model.corrections
            },
            ..*model
        };
        let predicted = unit
            .estimate(role, &load, obs.workers.get(role))
            .itl_ms
            .min(unit.profile.itl_ms(unit.profile.max_num_seqs, 1 << 20));
        if predicted.is_finite() && predicted > 0.0 {
            raw.decode_speed = Some((observed * 1000.0 / predicted).clamp(config.min, config.max));
        }
    }
    raw
}

/// Blends an interval's raw factors into the running corrections.
pub fn smooth(
    current: Corrections,
    raw: &RawCorrections,
    config: &CorrectionConfig,
) -> Corrections {
    let blend = |old: f64, new: Option<f64>, lo: f64, hi: f64| match new {
        Some(v) if v.is_finite() => {
            let w = config.weight.clamp(0.0, 1.0);
            ((1.0 - w) * old + w * v.clamp(lo, hi)).clamp(lo, hi)
        }
        _ => old,
    };
    Corrections {
        prefill_speed: blend(
            current.prefill_speed,
            raw.prefill_speed,
            config.min,
            config.max,
        ),
        ttft_spread: blend(current.ttft_spread, raw.ttft_spread, 1.0, config.max_spread),
        decode_speed: blend(
            current.decode_speed,
            raw.decode_speed,
            config.min,
            config.max,
        ),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::model::tests::{h100, targets};
    use crate::observe::RoleCounts;

    /// An interval of `rate` req/s on `workers` aggregated workers whose prefill really takes
    /// `speed` × the profile's: every first token at the service time it implies.
    fn observed(model: &Model<'_>, rate: f64, workers: u32, speed: f64) -> Observation {
        let load = crate::model::tests::load(rate);
        let real = Model {
            corrections: Corrections {
                prefill_speed: speed,
                decode_speed: speed,
                ..Corrections::default()
            },
            ..*model
        };
        let e = real.estimate(WorkerRole::Aggregated, &load, workers);
        let mut obs = Observation {
            end: Duration::from_secs(30),
            length: Duration::from_secs(30),
            requests: (rate * 30.0) as u64,
            finished: (rate * 30.0) as u64,
            workers: RoleCounts::default().with(WorkerRole::Aggregated, workers),
            ..Observation::default()
        };
        obs.prompt_tokens = obs.requests * load.isl as u64;
        obs.cached_tokens = (obs.prompt_tokens as f64 * load.hit_rate) as u64;
        obs.output_tokens = obs.finished * load.osl as u64;
        let mean = real
            .ttft_mean_s(WorkerRole::Aggregated, &load, workers)
            .unwrap();
        for _ in 0..100 {
            obs.ttft.observe_seconds(mean);
            obs.itl.observe_seconds(e.itl_ms / 1000.0);
        }
        obs
    }

    #[test]
    fn a_slower_fleet_is_learned_within_bounds() {
        let p = h100();
        let model = Model {
            profile: &p,
            corrections: Corrections::default(),
            targets: targets(),
        };
        let config = CorrectionConfig::default();
        let raw = fit(&model, &observed(&model, 2.0, 4, 1.3), &config);
        // The histogram buckets are 25% wide at most: the fit lands near 1.3.
        let speed = raw.prefill_speed.unwrap();
        assert!((1.05..1.6).contains(&speed), "{raw:?}");
        let decode = raw.decode_speed.unwrap();
        assert!((1.0..1.7).contains(&decode), "{raw:?}");
        // Smoothing moves 30% of the way per interval, and repeated intervals converge.
        let mut c = Corrections::default();
        c = smooth(c, &raw, &config);
        assert!((c.prefill_speed - (0.7 + 0.3 * speed)).abs() < 1e-9);
        for _ in 0..30 {
            c = smooth(c, &raw, &config);
        }
        assert!((c.prefill_speed - speed).abs() < 1e-3);
        // An absurd interval is clamped.
        let wild = RawCorrections {
            prefill_speed: Some(100.0),
            ttft_spread: Some(0.1),
            decode_speed: Some(f64::NAN),
        };
        let w = smooth(Corrections::default(), &wild, &config);
        assert!(w.prefill_speed <= config.max && w.ttft_spread >= 1.0);
        assert_eq!(w.decode_speed, 1.0);
    }

    #[test]
    fn thin_intervals_and_disabled_corrections_change_nothing() {
        let p = h100();
        let model = Model {
            profile: &p,
            corrections: Corrections::default(),
            targets: targets(),
        };
        let mut obs = observed(&model, 2.0, 4, 1.3);
        let off = CorrectionConfig {
            enabled: false,
            ..CorrectionConfig::default()
        };
        assert_eq!(fit(&model, &obs, &off), RawCorrections::default());
        obs.ttft = Default::default();
        obs.itl = Default::default();
        assert_eq!(
            fit(&model, &obs, &CorrectionConfig::default()),
            RawCorrections::default()
        );
    }
}
