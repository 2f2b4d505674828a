//! `plan(observations, profiles, policy, now) -> Decision`: one planning round for the fleet.
//!
//! For each deployment whose planner is not `off`:
//!
//! 1. **Correct**: fit the correction factors to the newest observation ([`crate::correction`])
//!    and blend them into the ones the previous decision carried.
//! 2. **Predict** request rate, prompt length and output length `lookahead` intervals ahead
//!    with the configured predictor, refitted over the history ([`crate::predict`]); the prefix
//!    hit rate is smoothed. (A backlog is not added as extra rate: requests already queued on
//!    a worker stay there, so workers started for them arrive after they are served — the
//!    simulator's spike runs measured no gain and a third more GPU-hours.)
//! 3. **Size** each role from the profile ([`crate::model`]): the fewest workers that meet the
//!    targets, and the fewest at `(1 + scale_down_margin)` × the load (for the hysteresis).
//! 4. **Stabilise** each role: scale up at once; scale down only when even the margin load
//!    needs fewer workers than are running, continuously for the cooldown, and not within a
//!    cooldown of a scale-up — and then to the most any interval of that window needed.
//! 5. **Bound** by the role and deployment limits.
//!
//! Then the fleet's GPU budget: if the deployments want more than it holds (after what the
//! `off` deployments run), every deployment keeps its minimum and the rest goes one worker at
//! a time to the deployment that has the smallest share of what it wants; those that get less
//! are told why and who holds the budget.
//!
//! Every [`DeploymentDecision`] carries its inputs, predictions, corrections, the sizing
//! arithmetic as lines of text and a one-sentence reason, plus the [`Memory`] the next round
//! needs, so a planner that restarts (or a new leader) continues where the last one stopped.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use kvfleet_proto::api::{DeploymentMode, PlannerMode, WorkerRole};
use kvfleet_proto::profile::PerfProfile;
use serde::{Deserialize, Serialize};

use crate::correction::{self, RawCorrections};
use crate::dynamo;
use crate::model::{Binding, Corrections, Estimate, Load, Model, Targets, workers_needed};
use crate::observe::{Observation, PerRole, RoleCounts};
use crate::policy::{Algorithm, DeploymentPolicy, FleetPolicy, PlannerConfig, Sla};
use crate::predict::{PredictorKind, forecast_ahead, recent_noise};

/// Intervals whose rate noise sizes the scale-down margin.
const NOISE_WINDOW: usize = 60;
/// The scale-down margin is at least this multiple of the measured noise (σ).
const NOISE_MARGIN: f64 = 2.0;
/// The largest scale-down margin the noise can ask for.
const MAX_MARGIN: f64 = 0.5;
use crate::secs;

/// What the planner knows of one deployment at a round.
#[derive(Debug, Clone, Copy)]
pub struct DeploymentObservations<'a> {
    /// The deployment's name, as its policy names it.
    pub deployment: &'a str,
    /// Its observations, one per interval, oldest first (the planner reads the last
    /// `season + a few` at most; pass what you keep).
    pub history: &'a [Observation],
    /// Workers that count now, per role: running or starting, not draining.
    pub running: RoleCounts,
    /// The previous decision's memory (`None` for the first round).
    pub previous: Option<&'a Memory>,
}

/// What one round carries to the next, per deployment.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Memory {
    /// The smoothed correction factors.
    pub corrections: Corrections,
    /// The end of the newest observation the corrections have learned from (so one interval
    /// is never counted twice).
    #[serde(default, with = "secs::option")]
    pub fitted_until: Option<Duration>,
    /// Per role: scale-up and scale-down timing.
    #[serde(default)]
    pub roles: PerRole<RoleMemory>,
    /// The targets decided (after bounds and budget).
    #[serde(default)]
    pub targets: RoleCounts,
}

/// Scale-down bookkeeping of one role.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoleMemory {
    /// When this role last scaled up.
    #[serde(default, with = "secs::option")]
    pub last_scale_up: Option<Duration>,
    /// The rounds of the last cooldown, oldest first: when, and the workers the load needed
    /// with the scale-down margin.
    #[serde(default)]
    pub recent: Vec<RecentNeed>,
}

/// What one recent round needed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecentNeed {
    /// The round.
    #[serde(with = "secs")]
    pub at: Duration,
    /// Workers the load needed, with the scale-down margin.
    pub workers: u32,
}

/// One planning round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    /// When it was made.
    #[serde(with = "secs")]
    pub at: Duration,
    /// The GPU budget in force.
    pub gpu_budget: Option<u32>,
    /// One per deployment whose planner is not off, in policy order.
    pub deployments: Vec<DeploymentDecision>,
}

/// What the planner decided for one deployment, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeploymentDecision {
    /// The deployment.
    pub deployment: String,
    /// When.
    #[serde(with = "secs")]
    pub at: Duration,
    /// `advise` (recorded only) or `auto` (acted on).
    pub mode: PlannerMode,
    /// The sizing method.
    pub algorithm: Algorithm,
    /// The targets it sized for.
    pub sla: Sla,
    /// The scale-down rules in force.
    pub stability: Stability,
    /// What was observed.
    pub inputs: Inputs,
    /// What was predicted.
    pub prediction: Prediction,
    /// Corrections before this round, what the newest interval said, and after.
    pub corrections: CorrectionReport,
    /// Per role in use: what the model says the load needs.
    pub needs: Vec<RoleNeed>,
    /// Workers that counted when the round started.
    pub current: RoleCounts,
    /// Workers the deployment should have.
    pub targets: RoleCounts,
    /// What held the targets back from the needs.
    pub limits: Vec<Limit>,
    /// The change, in one word.
    pub action: Action,
    /// The arithmetic, one step per line.
    pub arithmetic: Vec<String>,
    /// One sentence.
    pub reason: String,
    /// What the next round needs.
    pub memory: Memory,
}

/// The scale-down rules of a round ([`PlannerConfig::cooldown`],
/// [`PlannerConfig::scale_down_margin`]).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Stability {
    /// How long a lower need must last before a scale-down (the whole of it for a small step).
    #[serde(with = "secs")]
    pub cooldown: Duration,
    /// The headroom a scale-down keeps this round: the configured minimum or twice the load's
    /// measured noise, whichever is larger.
    pub scale_down_margin: f64,
}

/// The change a decision makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Nothing changes.
    Hold,
    /// More workers, no role fewer.
    ScaleUp,
    /// Fewer workers, no role more.
    ScaleDown,
    /// Some roles up, some down (a role flip where placement can).
    Rebalance,
}

impl Action {
    /// The word.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Hold => "hold",
            Action::ScaleUp => "scale_up",
            Action::ScaleDown => "scale_down",
            Action::Rebalance => "rebalance",
        }
    }
}

/// The observed side of a decision (the newest interval).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Inputs {
    /// Intervals of history the round had.
    pub intervals: usize,
    /// Requests per second.
    pub rate: f64,
    /// Mean prompt tokens.
    pub isl: Option<f64>,
    /// Mean output tokens.
    pub osl: Option<f64>,
    /// Prefix hit rate.
    pub hit_rate: Option<f64>,
    /// TTFT at the target percentile, ms.
    pub ttft_ms: Option<f64>,
    /// Mean TTFT, ms.
    pub ttft_mean_ms: Option<f64>,
    /// ITL at the target percentile, ms.
    pub itl_ms: Option<f64>,
    /// Requests waiting at the end.
    pub queue_depth: u64,
    /// Prompt tokens waiting for prefill at the end.
    pub pending_prefill_tokens: u64,
    /// KV use of the decoding role (aggregated or decode) at the end, 0..1.
    pub kv_use: Option<f64>,
    /// Workers that served.
    pub workers: RoleCounts,
}

/// The predicted side.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    /// The method.
    pub predictor: PredictorKind,
    /// Intervals ahead.
    pub lookahead: u32,
    /// Predicted requests per second.
    pub rate: f64,
    /// Predicted mean prompt tokens.
    pub isl: f64,
    /// Predicted mean output tokens.
    pub osl: f64,
    /// Smoothed prefix hit rate.
    pub hit_rate: f64,
    /// The recent rate's noise around the predictions (relative, robust σ): the scale-down
    /// margin is at least twice this.
    pub noise: f64,
}

/// The correction factors of a round.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CorrectionReport {
    /// Carried from the previous round.
    pub before: Corrections,
    /// What the newest interval said (absent factors: too few samples).
    pub interval: RawCorrections,
    /// Used for this round and carried on.
    pub after: Corrections,
}

/// One role's sizing.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RoleNeed {
    /// The role.
    pub role: WorkerRole,
    /// Workers the predicted load needs.
    pub workers: u32,
    /// Workers `(1 + margin)` × the load needs (the scale-down test).
    pub with_margin: u32,
    /// What the count is for.
    pub binding: Binding,
    /// The model at that count.
    pub estimate: Estimate,
    /// The model at one fewer.
    pub below: Option<Estimate>,
    /// After stabilising, before bounds and budget.
    pub stabilised: u32,
    /// When this round scaled down: how long the load had needed at most `stabilised`.
    #[serde(default, with = "secs::option")]
    pub quiet_for: Option<Duration>,
}

/// Something that held a target away from the need.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Limit {
    /// Scale-down waits: `remaining` of the cooldown is left.
    Cooldown {
        /// The role.
        role: WorkerRole,
        /// What the load needs.
        needs: u32,
        /// Time left.
        #[serde(with = "secs")]
        remaining: Duration,
    },
    /// Within the hysteresis band: the margin load still needs the running count.
    Hysteresis {
        /// The role.
        role: WorkerRole,
        /// What the load needs.
        needs: u32,
        /// The margin (0.2 = 20%).
        margin: f64,
    },
    /// A role's or the deployment's minimum raised it.
    Minimum {
        /// The role (`None`: the deployment's total).
        role: Option<WorkerRole>,
        /// The bound.
        min: u32,
    },
    /// A role's or the deployment's maximum capped it.
    Maximum {
        /// The role (`None`: the deployment's total).
        role: Option<WorkerRole>,
        /// The bound.
        max: u32,
    },
    /// The fleet's GPU budget capped it.
    Budget {
        /// The budget.
        budget: u32,
        /// Workers wanted.
        wanted: u32,
        /// Workers granted.
        granted: u32,
        /// What the other deployments hold, by name, largest first.
        holders: Vec<(String, u32)>,
    },
    /// No profile for the deployment: it stays as it is.
    NoProfile,
}

/// Runs one planning round. `profiles` maps a deployment's name to the performance profile
/// of its workers. Deployments with the planner off get no decision.
pub fn plan(
    observations: &[DeploymentObservations<'_>],
    profiles: &BTreeMap<String, PerfProfile>,
    policy: &FleetPolicy,
    now: Duration,
) -> Decision {
    let by_name: BTreeMap<&str, &DeploymentObservations<'_>> =
        observations.iter().map(|o| (o.deployment, o)).collect();
    let mut decisions = Vec::new();
    let mut fixed = 0u32;
    for deployment in &policy.deployments {
        let obs = by_name.get(deployment.name.as_str()).copied();
        if deployment.planner == PlannerMode::Off {
            fixed += obs.map_or(0, |o| o.running.total());
            continue;
        }
        let empty = DeploymentObservations {
            deployment: &deployment.name,
            history: &[],
            running: RoleCounts::default(),
            previous: None,
        };
        decisions.push(plan_deployment(
            deployment,
            obs.unwrap_or(&empty),
            profiles.get(&deployment.name),
            &policy.config,
            now,
        ));
    }
    if let Some(budget) = policy.gpu_budget {
        apply_budget(&mut decisions, &policy.deployments, budget, fixed);
    }
    for d in &mut decisions {
        explain::finish(d);
    }
    Decision {
        at: now,
        gpu_budget: policy.gpu_budget,
        deployments: decisions,
    }
}

/// The history's newest entries a round reads: enough for the seasonal predictor and a few
/// more.
fn window<'a>(history: &'a [Observation], config: &PlannerConfig) -> &'a [Observation] {
    let keep = if config.predictor == PredictorKind::Seasonal {
        config.season_intervals() * 3 + 8
    } else {
        256
    };
    &history[history.len().saturating_sub(keep)..]
}

fn plan_deployment(
    policy: &DeploymentPolicy,
    obs: &DeploymentObservations<'_>,
    profile: Option<&PerfProfile>,
    config: &PlannerConfig,
    now: Duration,
) -> DeploymentDecision {
    let previous = obs.previous.cloned().unwrap_or_default();
    let history = window(obs.history, config);
    let last = history.last();
    let quantile = policy.sla.quantile();
    let inputs = inputs(history, quantile, policy);
    let mut arithmetic = Vec::new();
    let mut decision = DeploymentDecision {
        deployment: policy.name.clone(),
        at: now,
        mode: policy.planner,
        algorithm: config.algorithm,
        sla: policy.sla,
        stability: Stability {
            cooldown: config.cooldown,
            scale_down_margin: config.scale_down_margin,
        },
        inputs,
        prediction: Prediction {
            predictor: config.predictor,
            lookahead: config.lookahead.max(1),
            rate: 0.0,
            isl: 0.0,
            osl: 0.0,
            hit_rate: 0.0,
            noise: 0.0,
        },
        corrections: CorrectionReport {
            before: previous.corrections,
            interval: RawCorrections::default(),
            after: previous.corrections,
        },
        needs: Vec::new(),
        current: obs.running,
        targets: obs.running,
        limits: Vec::new(),
        action: Action::Hold,
        arithmetic: Vec::new(),
        reason: String::new(),
        memory: previous.clone(),
    };
    let Some(profile) = profile else {
        decision.limits.push(Limit::NoProfile);
        decision.targets = bound(policy, obs.running, &mut decision.limits);
        return decision;
    };
    let targets = Targets {
        ttft_ms: policy.sla.ttft_ms,
        itl_ms: policy.sla.itl_ms,
        quantile,
    };
    // 1. Corrections.
    let mut corrections = previous.corrections;
    let mut fitted_until = previous.fitted_until;
    if let Some(last) = last
        && fitted_until.is_none_or(|t| last.end > t)
    {
        let model = Model {
            profile,
            corrections,
            targets,
        };
        match config.algorithm {
            Algorithm::Kvfleet => {
                let raw = correction::fit(&model, last, &config.correction);
                decision.corrections.interval = raw;
                corrections = correction::smooth(corrections, &raw, &config.correction);
            }
            Algorithm::Dynamo => {
                let raw = dynamo::corrections(profile, last, corrections);
                decision.corrections.interval = raw;
                corrections = Corrections {
                    prefill_speed: raw.prefill_speed.unwrap_or(corrections.prefill_speed),
                    ttft_spread: 1.0,
                    decode_speed: raw.decode_speed.unwrap_or(corrections.decode_speed),
                };
            }
        }
        fitted_until = Some(last.end);
    }
    decision.corrections.after = corrections;
    let model = Model {
        profile,
        corrections,
        targets,
    };
    // 2. Prediction.
    let load = predict(history, config, &mut decision.prediction);
    let p = &decision.prediction;
    let mut line = format!(
        "load: {} req/s predicted {} interval(s) ahead by {} (observed {} req/s)",
        num(p.rate),
        p.lookahead,
        p.predictor,
        num(decision.inputs.rate),
    );
    let _ = write!(
        line,
        "; prompts {} tokens ({:.0}% cached), outputs {} tokens",
        num(p.isl),
        p.hit_rate * 100.0,
        num(p.osl)
    );
    arithmetic.push(line);
    if config.algorithm == Algorithm::Kvfleet {
        let c = corrections;
        arithmetic.push(format!(
            "corrections: prefill ×{:.2}, TTFT spread ×{:.2}, decode ×{:.2} (profile {} on {})",
            c.prefill_speed, c.ttft_spread, c.decode_speed, profile.model, profile.device
        ));
    } else {
        arithmetic.push(format!(
            "corrections (Dynamo: observed ÷ expected, last interval): prefill {:.2}, decode {:.2}",
            corrections.prefill_speed, corrections.decode_speed
        ));
    }
    // 3. Sizing per role, 4. stability.
    // The scale-down test sizes for the larger of the prediction and what the last interval
    // saw (the predictors smooth noise away; a scale-down must survive it), plus the margin.
    let margin = config
        .scale_down_margin
        .max(NOISE_MARGIN * decision.prediction.noise)
        .clamp(0.0, MAX_MARGIN);
    decision.stability.scale_down_margin = margin;
    let margin_load = Load {
        rate: load.rate.max(decision.inputs.rate) * (1.0 + margin),
        ..load
    };
    let mut stabilised = RoleCounts::default();
    let mut memory_roles = previous.roles.clone();
    for &role in policy.roles_in_use() {
        let (need, with_margin) = match config.algorithm {
            Algorithm::Kvfleet => (
                workers_needed(&model, role, &load),
                workers_needed(&model, role, &margin_load).workers,
            ),
            Algorithm::Dynamo => {
                let need = dynamo::workers_needed(&model, policy.mode, role, &load, config);
                (need, need.workers)
            }
        };
        arithmetic.push(explain::describe_need(role, &need, &targets, config));
        let current = obs.running.get(role);
        // The role's own bounds come first: a need below the minimum is the minimum (not a
        // scale-down waiting for its cooldown).
        let bounds = policy.role_bounds(role);
        if bounds.clamp(need.workers) > need.workers {
            decision.limits.push(Limit::Minimum {
                role: Some(role),
                min: bounds.min,
            });
        } else if bounds.clamp(need.workers) < need.workers {
            decision.limits.push(Limit::Maximum {
                role: Some(role),
                max: bounds.max,
            });
        }
        let target = match config.algorithm {
            Algorithm::Kvfleet => stabilise(
                role,
                (
                    bounds.clamp(need.workers),
                    bounds.clamp(with_margin),
                    margin,
                ),
                current,
                memory_roles.get_mut(role),
                config,
                now,
                &mut decision.limits,
            ),
            Algorithm::Dynamo => (need.workers, None),
        };
        let (target, quiet) = target;
        *stabilised.get_mut(role) = target;
        decision.needs.push(RoleNeed {
            role,
            workers: need.workers,
            with_margin,
            binding: need.binding,
            estimate: need.at,
            below: need.below,
            stabilised: target,
            quiet_for: quiet,
        });
    }
    // 5. Bounds.
    decision.targets = bound(policy, stabilised, &mut decision.limits);
    for &role in policy.roles_in_use() {
        let target = decision.targets.get(role);
        if target > obs.running.get(role) {
            memory_roles.get_mut(role).last_scale_up = Some(now);
        }
    }
    decision.arithmetic = arithmetic;
    decision.memory = Memory {
        corrections,
        fitted_until,
        roles: memory_roles,
        targets: decision.targets,
    };
    decision
}

fn inputs(history: &[Observation], quantile: f64, policy: &DeploymentPolicy) -> Inputs {
    let Some(last) = history.last() else {
        return Inputs::default();
    };
    let decoding = match policy.mode {
        DeploymentMode::Aggregated => WorkerRole::Aggregated,
        DeploymentMode::Disaggregated => WorkerRole::Decode,
    };
    Inputs {
        intervals: history.len(),
        rate: last.request_rate(),
        isl: last.mean_isl(),
        osl: last.mean_osl(),
        hit_rate: last.prefix_hit_rate(),
        ttft_ms: last.ttft.quantile(quantile).map(|s| s * 1000.0),
        ttft_mean_ms: last.ttft.mean_seconds().map(|s| s * 1000.0),
        itl_ms: last.itl.quantile(quantile).map(|s| s * 1000.0),
        queue_depth: last.queue_depth,
        pending_prefill_tokens: last.pending_prefill_tokens,
        kv_use: last.kv_use(decoding),
        workers: last.workers,
    }
}

/// Predicts the load `lookahead` intervals ahead and fills `out`.
fn predict(history: &[Observation], config: &PlannerConfig, out: &mut Prediction) -> Load {
    let season = config.season_intervals();
    let ahead = config.lookahead.max(1) as usize;
    let series = |f: &dyn Fn(&Observation) -> Option<f64>| -> Vec<f64> {
        history.iter().filter_map(f).collect()
    };
    let rates = series(&|o| Some(o.request_rate()));
    let rate = forecast_ahead(config.predictor, season, &rates, ahead).unwrap_or(0.0);
    let noise = recent_noise(config.predictor, season, &rates, NOISE_WINDOW);
    // Means of empty intervals are skipped; without any, a neutral guess that the profile
    // can size (the rate is then 0 anyway).
    let isl = forecast_ahead(
        config.predictor,
        season,
        &series(&Observation::mean_isl),
        ahead,
    )
    .unwrap_or(1024.0)
    .max(1.0);
    let osl = forecast_ahead(
        config.predictor,
        season,
        &series(&Observation::mean_osl),
        ahead,
    )
    .unwrap_or(128.0)
    .max(1.0);
    let hit_rate = forecast_ahead(
        PredictorKind::Ewma,
        0,
        &series(&Observation::prefix_hit_rate),
        1,
    )
    .unwrap_or(0.0)
    .clamp(0.0, 0.99);
    let load = Load {
        rate,
        isl,
        osl,
        hit_rate,
    };
    *out = Prediction {
        predictor: config.predictor,
        lookahead: ahead as u32,
        rate: load.rate,
        isl,
        osl,
        hit_rate,
        noise,
    };
    load
}

/// Step 4 for one role; returns the stabilised count and notes what held it.
///
/// Scale-up is immediate. A scale-down needs a quiet period: the newest rounds, all needing
/// fewer workers (with the margin) than are running, lasting at least `cooldown × (m / n)²`
/// where `m` is the most any of them needed and `n` the running count — and at least two
/// rounds — and then goes to `m`. A dip of noise (`m` close to `n`) waits nearly the whole
/// cooldown; the end of a spike (`m` a fraction of `n`) is followed within a minute; a load
/// that keeps falling is followed step by step.
#[allow(clippy::too_many_arguments)]
fn stabilise(
    role: WorkerRole,
    (need, with_margin, margin): (u32, u32, f64),
    current: u32,
    memory: &mut RoleMemory,
    config: &PlannerConfig,
    now: Duration,
    limits: &mut Vec<Limit>,
) -> (u32, Option<Duration>) {
    let cutoff = now.saturating_sub(config.cooldown);
    memory.recent.retain(|r| r.at >= cutoff && r.at < now);
    memory.recent.push(RecentNeed {
        at: now,
        workers: with_margin.max(need),
    });
    if need >= current {
        return (need, None);
    }
    if with_margin >= current {
        limits.push(Limit::Hysteresis {
            role,
            needs: need,
            margin,
        });
        return (current, None);
    }
    let quiet_for = |m: u32| -> Duration {
        let ratio = f64::from(m) / f64::from(current.max(1));
        config.cooldown.mul_f64((ratio * ratio).clamp(0.0, 1.0))
    };
    let mut most = 0u32;
    let mut longest_wait = Duration::ZERO;
    for (k, r) in memory.recent.iter().rev().enumerate() {
        if r.workers >= current {
            break;
        }
        most = most.max(r.workers);
        // The rounds from `r` on cover their intervals.
        let covered = now.saturating_sub(r.at) + config.interval;
        let wanted = quiet_for(most);
        if k >= 1 && covered >= wanted {
            return (most, Some(covered));
        }
        longest_wait = wanted.saturating_sub(covered);
    }
    limits.push(Limit::Cooldown {
        role,
        needs: with_margin,
        remaining: longest_wait.max(config.interval.min(config.cooldown)),
    });
    (current, None)
}

/// Applies role and deployment bounds to `wanted`.
fn bound(policy: &DeploymentPolicy, wanted: RoleCounts, limits: &mut Vec<Limit>) -> RoleCounts {
    let roles = policy.roles_in_use();
    let mut out = RoleCounts::default();
    for &role in roles {
        let b = policy.role_bounds(role);
        let v = wanted.get(role);
        let c = b.clamp(v);
        if c > v {
            limits.push(Limit::Minimum {
                role: Some(role),
                min: b.min,
            });
        } else if c < v {
            limits.push(Limit::Maximum {
                role: Some(role),
                max: b.max,
            });
        }
        *out.get_mut(role) = c;
    }
    let total = out.total();
    if total < policy.workers.min {
        // Decode (the last role) can do both jobs.
        if let Some(&last) = roles.last() {
            *out.get_mut(last) += policy.workers.min - total;
        }
        limits.push(Limit::Minimum {
            role: None,
            min: policy.workers.min,
        });
    } else if total > policy.workers.max {
        out = shrink(policy, out, policy.workers.max);
        limits.push(Limit::Maximum {
            role: None,
            max: policy.workers.max,
        });
    }
    out
}

/// `counts` reduced to `total` workers in proportion, keeping each role's minimum.
fn shrink(policy: &DeploymentPolicy, counts: RoleCounts, total: u32) -> RoleCounts {
    let roles = policy.roles_in_use();
    let have = counts.total();
    if have <= total {
        return counts;
    }
    let mins: Vec<u32> = roles.iter().map(|&r| policy.role_bounds(r).min).collect();
    let floor: u32 = mins.iter().sum();
    if total <= floor {
        let mut out = RoleCounts::default();
        let mut left = total;
        for (&role, &min) in roles.iter().zip(&mins).rev() {
            let v = min.min(left);
            *out.get_mut(role) = v;
            left -= v;
        }
        return out;
    }
    // Shares of the room above the minimums, by largest remainder.
    let room = total - floor;
    let extra: Vec<u32> = roles
        .iter()
        .zip(&mins)
        .map(|(&r, &m)| counts.get(r).saturating_sub(m))
        .collect();
    let extra_sum: u32 = extra.iter().sum();
    let mut shares: Vec<(u32, f64, usize)> = extra
        .iter()
        .enumerate()
        .map(|(i, &e)| {
            let exact = f64::from(e) * f64::from(room) / f64::from(extra_sum.max(1));
            (exact.floor() as u32, exact - exact.floor(), i)
        })
        .collect();
    let mut left = room - shares.iter().map(|s| s.0).sum::<u32>();
    let mut order: Vec<usize> = (0..shares.len()).collect();
    order.sort_by(|&a, &b| shares[b].1.total_cmp(&shares[a].1).then(a.cmp(&b)));
    for i in order {
        if left == 0 {
            break;
        }
        if shares[i].0 < extra[i] {
            shares[i].0 += 1;
            left -= 1;
        }
    }
    let mut out = RoleCounts::default();
    for (i, &role) in roles.iter().enumerate() {
        *out.get_mut(role) = mins[i] + shares[i].0;
    }
    out
}

/// The fleet-wide GPU budget over every decision (see the module docs).
fn apply_budget(
    decisions: &mut [DeploymentDecision],
    policies: &[DeploymentPolicy],
    budget: u32,
    fixed: u32,
) {
    let available = budget.saturating_sub(fixed);
    let wanted: Vec<u32> = decisions.iter().map(|d| d.targets.total()).collect();
    if wanted.iter().sum::<u32>() <= available {
        return;
    }
    let policy_of = |name: &str| policies.iter().find(|p| p.name == name);
    let floors: Vec<u32> = decisions
        .iter()
        .zip(&wanted)
        .map(|(d, &w)| {
            policy_of(&d.deployment)
                .map_or(0, DeploymentPolicy::minimum)
                .min(w)
        })
        .collect();
    let mut granted = floors.clone();
    let mut left = available.saturating_sub(floors.iter().sum());
    while left > 0 {
        // The deployment with the smallest share of what it wants (ties: policy order).
        let next = (0..decisions.len())
            .filter(|&i| granted[i] < wanted[i])
            .min_by(|&a, &b| {
                let share = |i: usize| f64::from(granted[i]) / f64::from(wanted[i].max(1));
                share(a).total_cmp(&share(b)).then(a.cmp(&b))
            });
        let Some(i) = next else { break };
        granted[i] += 1;
        left -= 1;
    }
    for i in 0..decisions.len() {
        if granted[i] >= wanted[i] {
            continue;
        }
        let mut holders: Vec<(String, u32)> = decisions
            .iter()
            .enumerate()
            .filter(|&(j, _)| j != i)
            .map(|(j, d)| (d.deployment.clone(), granted[j]))
            .filter(|(_, n)| *n > 0)
            .collect();
        if fixed > 0 {
            holders.push(("(deployments with the planner off)".into(), fixed));
        }
        holders.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        let d = &mut decisions[i];
        if let Some(policy) = policy_of(&d.deployment) {
            d.targets = shrink(policy, d.targets, granted[i]);
        }
        d.limits.push(Limit::Budget {
            budget,
            wanted: wanted[i],
            granted: granted[i],
            holders,
        });
        d.memory.targets = d.targets;
    }
}

mod explain;

pub use explain::{human_duration, num};

#[cfg(test)]
mod tests;
