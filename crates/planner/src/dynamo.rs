//! Dynamo's SLA planner algorithm, as its documentation describes it (docs/planner, "Planner
//! Design": throughput-based scaling), written from that description as the simulator's
//! baseline. Not used by the control plane.
//!
//! Every interval:
//!
//! - **Corrections** are plain ratios of the last interval, not smoothed or bounded:
//!   `prefill = observed mean TTFT / profile TTFT(ISL)` and `decode = observed mean ITL /
//!   profile ITL(concurrency, ISL + OSL/2)`, where the concurrency per decode worker is
//!   `rate × (TTFT + OSL × ITL) / workers`.
//! - **Prefill**: `predicted tokens/s = rate × ISL × min(1, prefill correction)`; workers =
//!   `ceil(tokens/s ÷ the profile's prefill throughput at ISL)` (one prompt at a time:
//!   `ISL ÷ TTFT(ISL)`).
//! - **Decode**: the ITL target divided by the decode correction; the best throughput per GPU
//!   at that ITL and context `ISL + OSL/2` (the largest batch within it, times tokens per
//!   second at that batch); workers = `ceil(rate × OSL ÷ that throughput)`.
//! - No cooldown or hysteresis: the numbers are applied as computed (then bounds and budget).
//!
//! Dynamo sizes disaggregated deployments only; for an aggregated one this baseline runs the
//! prefill and the decode workers' worth of GPU time on the same workers, `prefill + decode`
//! (each at least one, as Dynamo's minimum endpoint counts).

use kvfleet_proto::api::{DeploymentMode, WorkerRole};
use kvfleet_proto::profile::PerfProfile;

use crate::correction::RawCorrections;
use crate::model::{Binding, Corrections, Load, Model, Need};
use crate::observe::Observation;
use crate::policy::PlannerConfig;

/// The last interval's correction ratios (absent without samples).
pub fn corrections(
    profile: &PerfProfile,
    obs: &Observation,
    _current: Corrections,
) -> RawCorrections {
    let mut raw = RawCorrections::default();
    let Some(isl) = obs.mean_isl() else {
        return raw;
    };
    let osl = obs.mean_osl().unwrap_or(1.0);
    let ttft_s = obs.ttft.mean_seconds();
    if let Some(ttft) = ttft_s {
        let expected = profile.prefill_ms(isl as u64, 0);
        if expected > 0.0 {
            raw.prefill_speed = Some(ttft * 1000.0 / expected);
        }
    }
    let decode_workers = if obs.workers.aggregated > 0 {
        obs.workers.aggregated
    } else {
        obs.workers.decode
    };
    if let Some(itl) = obs.itl.mean_seconds()
        && decode_workers > 0
    {
        let duration = ttft_s.unwrap_or(0.0) + osl * itl;
        let concurrency = obs.request_rate() * duration / f64::from(decode_workers);
        let expected = profile.itl_ms(concurrency.ceil().max(1.0) as u32, (isl + osl / 2.0) as u64);
        if expected > 0.0 {
            raw.decode_speed = Some(itl * 1000.0 / expected);
        }
    }
    raw
}

/// Prefill workers by Dynamo's formula.
fn prefill_workers(model: &Model<'_>, load: &Load) -> u32 {
    let p = model.profile;
    let tokens_per_s = load.rate * load.isl * model.corrections.prefill_speed.min(1.0);
    let ttft_ms = p.prefill_ms(load.isl.max(1.0) as u64, 0);
    let per_gpu = load.isl * 1000.0 / ttft_ms.max(1e-9);
    ceil_workers(tokens_per_s / per_gpu)
}

/// Decode workers by Dynamo's formula.
fn decode_workers(model: &Model<'_>, load: &Load) -> u32 {
    let p = model.profile;
    let context = load.decode_context().max(1.0) as u64;
    let batch = match model.targets.itl_ms {
        Some(target) => {
            let corrected = target / model.corrections.decode_speed.max(1e-9);
            p.max_batch_within_itl(corrected, context).max(1)
        }
        None => p.max_num_seqs.max(1),
    };
    let per_gpu = f64::from(batch) * 1000.0 / p.itl_ms(batch, context);
    ceil_workers(load.rate * load.osl / per_gpu)
}

fn ceil_workers(x: f64) -> u32 {
    if x.is_finite() && x > 0.0 {
        (x.ceil() as u32).max(1)
    } else {
        0
    }
}

/// Workers of `role` by Dynamo's formulas, with the kvfleet model's estimate at that count
/// (for the decision's explanation).
pub fn workers_needed(
    model: &Model<'_>,
    mode: DeploymentMode,
    role: WorkerRole,
    load: &Load,
    _config: &PlannerConfig,
) -> Need {
    let workers = if load.rate > 0.0 {
        match (mode, role) {
            (_, WorkerRole::Prefill) => prefill_workers(model, load).max(1),
            (_, WorkerRole::Decode) => decode_workers(model, load).max(1),
            (DeploymentMode::Aggregated, WorkerRole::Aggregated)
            | (DeploymentMode::Disaggregated, WorkerRole::Aggregated) => {
                prefill_workers(model, load).max(1) + decode_workers(model, load).max(1)
            }
        }
    } else {
        0
    };
    let binding = match (workers, role) {
        (0, _) => Binding::Idle,
        (_, WorkerRole::Prefill) => Binding::Throughput,
        _ => Binding::Itl,
    };
    Need {
        workers,
        binding,
        at: model.estimate(role, load, workers),
        below: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tests::{h100, load, targets};

    #[test]
    fn formulas_follow_the_description() {
        let p = h100();
        let model = Model {
            profile: &p,
            corrections: Corrections::default(),
            targets: targets(),
        };
        let l = load(10.0);
        // Prefill: 10 × 15,000 tokens/s over ISL/TTFT(ISL) per GPU.
        let per_gpu = 15_000.0 * 1000.0 / p.prefill_ms(15_000, 0);
        let want = (10.0 * 15_000.0 / per_gpu).ceil() as u32;
        assert_eq!(prefill_workers(&model, &l), want);
        // A prefill correction above 1 is ignored (min(1, ·)); below 1 it scales the load.
        let mut faster = model;
        faster.corrections.prefill_speed = 0.5;
        assert!(prefill_workers(&faster, &l) <= want.div_ceil(2) + 1);
        let mut slower = model;
        slower.corrections.prefill_speed = 2.0;
        assert_eq!(prefill_workers(&slower, &l), want);
        // Decode: a tighter effective ITL needs more workers.
        let d = decode_workers(&model, &l);
        let mut slow = model;
        slow.corrections.decode_speed = 1.3;
        assert!(decode_workers(&slow, &l) >= d);
        let agg = workers_needed(
            &model,
            DeploymentMode::Aggregated,
            WorkerRole::Aggregated,
            &l,
            &PlannerConfig::default(),
        );
        assert_eq!(agg.workers, want + d);
    }
}
