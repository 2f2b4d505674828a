//! What the operator asks of the planner: per deployment its SLA, bounds and mode; fleet-wide
//! the GPU budget and the planner's tunables.

use std::time::Duration;

use kvfleet_proto::api::{
    DeploymentMode, PlannerMode, RoleWorkerBounds, SlaTargets, WorkerBounds, WorkerRole,
};
use serde::{Deserialize, Serialize};

use crate::correction::CorrectionConfig;
use crate::observe::RoleCounts;
use crate::predict::PredictorKind;
use crate::secs;

/// Latency targets and the percentile they hold at.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Sla {
    /// Time to first token, ms (`None`: no target).
    pub ttft_ms: Option<f64>,
    /// Inter-token latency, ms (`None`: no target).
    pub itl_ms: Option<f64>,
    /// The percentile, e.g. 90 for p90.
    pub percentile: f64,
}

impl Sla {
    /// The percentile the targets hold at when none is given.
    pub const DEFAULT_PERCENTILE: f64 = 90.0;

    /// The percentile as a fraction (p90 → 0.9), clamped to 50..=99.99.
    pub fn quantile(&self) -> f64 {
        if self.percentile.is_finite() {
            (self.percentile / 100.0).clamp(0.5, 0.9999)
        } else {
            0.9
        }
    }

    /// `p90`, `p99.5`.
    pub fn percentile_label(&self) -> String {
        format!("p{}", self.percentile)
    }
}

/// An inclusive range of worker counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bounds {
    /// Fewest workers.
    pub min: u32,
    /// Most workers.
    pub max: u32,
}

impl Bounds {
    /// `value` held within the bounds (`max` wins when they cross).
    pub fn clamp(&self, value: u32) -> u32 {
        value.max(self.min).min(self.max)
    }
}

/// Per-role bounds; an absent role takes the deployment's defaults ([`DeploymentPolicy::role_bounds`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoleBounds {
    /// Prefill workers (disaggregated).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefill: Option<Bounds>,
    /// Decode workers (disaggregated).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decode: Option<Bounds>,
}

/// One deployment as the planner sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeploymentPolicy {
    /// The deployment's name (decisions name it).
    pub name: String,
    /// Aggregated or disaggregated.
    pub mode: DeploymentMode,
    /// Off, advise or auto.
    pub planner: PlannerMode,
    /// The targets.
    pub sla: Sla,
    /// Workers of all roles together.
    pub workers: Bounds,
    /// Per-role bounds (disaggregated deployments).
    #[serde(default)]
    pub roles: RoleBounds,
}

impl DeploymentPolicy {
    /// The roles this deployment's mode uses.
    pub fn roles_in_use(&self) -> &'static [WorkerRole] {
        match self.mode {
            DeploymentMode::Aggregated => &[WorkerRole::Aggregated],
            DeploymentMode::Disaggregated => &[WorkerRole::Prefill, WorkerRole::Decode],
        }
    }

    /// The bounds of `role`: what the policy sets, else the deployment's (an aggregated
    /// worker gets all of them; a decode role at least one worker when the deployment has a
    /// minimum, since decode workers can prefill but not the other way round; prefill none).
    pub fn role_bounds(&self, role: WorkerRole) -> Bounds {
        let total = self.workers;
        match (self.mode, role) {
            (DeploymentMode::Aggregated, WorkerRole::Aggregated) => total,
            (DeploymentMode::Aggregated, _)
            | (DeploymentMode::Disaggregated, WorkerRole::Aggregated) => Bounds { min: 0, max: 0 },
            (DeploymentMode::Disaggregated, WorkerRole::Prefill) => {
                self.roles.prefill.unwrap_or(Bounds {
                    min: 0,
                    max: total.max,
                })
            }
            (DeploymentMode::Disaggregated, WorkerRole::Decode) => {
                self.roles.decode.unwrap_or(Bounds {
                    min: total.min.min(1),
                    max: total.max,
                })
            }
        }
    }

    /// The least this deployment may run: its minimum, or the sum of its roles' minimums if
    /// larger. What the GPU budget must at least cover.
    pub fn minimum(&self) -> u32 {
        let roles: u32 = self
            .roles_in_use()
            .iter()
            .map(|&r| self.role_bounds(r).min)
            .sum();
        roles.max(self.workers.min)
    }

    /// Every field that makes this policy unusable, as `(field, what is wrong)`; empty when
    /// valid. The rules are the REST API's (`kvfleet_proto::api`), fields named as there.
    pub fn invalid_fields(&self) -> Vec<(String, String)> {
        let ms = |v: Option<f64>| {
            v.map(|v| {
                if v.is_finite() {
                    v.ceil().clamp(f64::from(i32::MIN), f64::from(i32::MAX)) as i32
                } else {
                    0
                }
            })
        };
        let sla = SlaTargets {
            ttft_ms: ms(self.sla.ttft_ms),
            itl_ms: ms(self.sla.itl_ms),
            percentile: Some(self.sla.percentile),
        };
        let mut problems: Vec<(String, String)> = sla
            .invalid_fields()
            .into_iter()
            .map(|(f, r)| (f.to_owned(), r))
            .collect();
        let count = |v: u32| i32::try_from(v).unwrap_or(i32::MAX);
        if self.workers.min > self.workers.max {
            problems.push((
                "min_workers".to_owned(),
                format!(
                    "{} exceeds max_workers {}",
                    self.workers.min, self.workers.max
                ),
            ));
        }
        let bounds = |b: Option<Bounds>| {
            b.map(|b| WorkerBounds {
                min: count(b.min),
                max: count(b.max),
            })
        };
        let roles = RoleWorkerBounds {
            prefill: bounds(self.roles.prefill),
            decode: bounds(self.roles.decode),
        };
        problems.extend(roles.invalid_fields(
            self.mode,
            count(self.workers.min),
            count(self.workers.max),
        ));
        problems
    }
}

/// The planner's sizing method.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    /// This crate's: queueing model, learned corrections, stability rules.
    Kvfleet,
    /// Dynamo's SLA planner as its documentation describes it ([`crate::dynamo`]): the
    /// simulator's baseline.
    Dynamo,
}

impl Algorithm {
    /// The name in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::Kvfleet => "kvfleet",
            Algorithm::Dynamo => "dynamo",
        }
    }
}

/// The planner's tunables (the control plane's `[planner]` config; the simulator's flags).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlannerConfig {
    /// Sizing method.
    pub algorithm: Algorithm,
    /// Time between decisions (and the length of an observation).
    #[serde(with = "secs")]
    pub interval: Duration,
    /// How load is predicted.
    pub predictor: PredictorKind,
    /// The seasonal predictor's season.
    #[serde(with = "secs")]
    pub season: Duration,
    /// How far ahead to size the fleet, in intervals (a worker started now serves only after
    /// its start-up time: size for when it will be ready). At least 1.
    pub lookahead: u32,
    /// How long the load must have needed fewer workers before a scale-down: the whole of it
    /// for a small step down, a fraction for a large one (see `plan::stabilise`).
    #[serde(with = "secs")]
    pub cooldown: Duration,
    /// Hysteresis: a scale-down is only considered while even `(1 + margin)` × the load (the
    /// larger of predicted and last observed) needs fewer workers than are running. This is
    /// the least margin; the planner uses twice the load's measured noise when that is more.
    pub scale_down_margin: f64,
    /// The correction factors' bounds and smoothing.
    pub correction: CorrectionConfig,
}

impl Default for PlannerConfig {
    fn default() -> Self {
        Self {
            algorithm: Algorithm::Kvfleet,
            interval: Duration::from_secs(30),
            // The lowest one-step error on the shaped Mooncake traces (docs/benchmarks.md).
            predictor: PredictorKind::Ewma,
            season: Duration::from_secs(86_400),
            lookahead: 2,
            cooldown: Duration::from_secs(300),
            scale_down_margin: 0.05,
            correction: CorrectionConfig::default(),
        }
    }
}

impl PlannerConfig {
    /// The season in intervals.
    pub fn season_intervals(&self) -> usize {
        let i = self.interval.as_secs_f64();
        if i > 0.0 {
            (self.season.as_secs_f64() / i).round() as usize
        } else {
            0
        }
    }
}

/// The whole fleet's policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FleetPolicy {
    /// Tunables.
    pub config: PlannerConfig,
    /// Most workers (GPUs or CPU slots) all planned deployments may hold together; `None`:
    /// only each deployment's own maximum.
    pub gpu_budget: Option<u32>,
    /// Every deployment (those with the planner off count toward the budget with what they
    /// run).
    pub deployments: Vec<DeploymentPolicy>,
}

/// A GPU budget that cannot cover the deployments' minimums.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "gpu_budget {budget} is less than the {minimums} workers the deployments' minimums add up to ({detail})"
)]
pub struct BudgetTooSmall {
    /// The budget.
    pub budget: u32,
    /// The sum of minimums.
    pub minimums: u32,
    /// `name: min` per deployment with a minimum.
    pub detail: String,
}

/// Checks that `budget` covers every deployment's minimum.
pub fn check_budget(budget: u32, deployments: &[DeploymentPolicy]) -> Result<(), BudgetTooSmall> {
    let minimums: u32 = deployments.iter().map(DeploymentPolicy::minimum).sum();
    if budget >= minimums {
        return Ok(());
    }
    let detail = deployments
        .iter()
        .filter(|d| d.minimum() > 0)
        .map(|d| format!("{}: {}", d.name, d.minimum()))
        .collect::<Vec<_>>()
        .join(", ");
    Err(BudgetTooSmall {
        budget,
        minimums,
        detail,
    })
}

/// The counts each role of `policy` runs when nothing else is known: the minimums (what
/// placement runs with the planner off).
pub fn minimum_counts(policy: &DeploymentPolicy) -> RoleCounts {
    let mut counts = RoleCounts::default();
    for &role in policy.roles_in_use() {
        *counts.get_mut(role) = policy.role_bounds(role).min;
    }
    // The deployment's total minimum goes to the last role (decode: it can do both jobs).
    let short = policy.workers.min.saturating_sub(counts.total());
    if let Some(&last) = policy.roles_in_use().last() {
        *counts.get_mut(last) += short;
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn policy(name: &str, mode: DeploymentMode, min: u32, max: u32) -> DeploymentPolicy {
        DeploymentPolicy {
            name: name.into(),
            mode,
            planner: PlannerMode::Auto,
            sla: Sla {
                ttft_ms: Some(2000.0),
                itl_ms: Some(25.0),
                percentile: 90.0,
            },
            workers: Bounds { min, max },
            roles: RoleBounds::default(),
        }
    }

    #[test]
    fn bad_policies_name_each_field() {
        let mut p = policy("d", DeploymentMode::Aggregated, 3, 2);
        p.sla.ttft_ms = Some(0.0);
        p.sla.itl_ms = Some(-5.0);
        p.sla.percentile = 100.0;
        p.roles.prefill = Some(Bounds { min: 1, max: 5 });
        let fields: Vec<String> = p.invalid_fields().into_iter().map(|f| f.0).collect();
        assert_eq!(
            fields,
            [
                "sla.ttft_ms",
                "sla.itl_ms",
                "sla.percentile",
                "min_workers",
                "roles.prefill"
            ]
        );
        let mut d = policy("d", DeploymentMode::Disaggregated, 1, 4);
        d.roles.prefill = Some(Bounds { min: 3, max: 4 });
        d.roles.decode = Some(Bounds { min: 2, max: 4 });
        let fields: Vec<String> = d.invalid_fields().into_iter().map(|f| f.0).collect();
        assert_eq!(fields, ["roles"]);
        // An unset decode role still needs its one worker: prefill may not take them all
        // (proptest found this one: the planner could not hold both bounds).
        let mut full = policy("d", DeploymentMode::Disaggregated, 1, 2);
        full.roles.prefill = Some(Bounds { min: 2, max: 2 });
        let fields: Vec<String> = full.invalid_fields().into_iter().map(|f| f.0).collect();
        assert_eq!(fields, ["roles"]);
        full.workers.min = 0;
        assert!(
            full.invalid_fields().is_empty(),
            "a deployment allowed to run nothing"
        );
        assert!(
            policy("ok", DeploymentMode::Disaggregated, 2, 8)
                .invalid_fields()
                .is_empty()
        );
    }

    #[test]
    fn the_budget_must_cover_the_minimums() {
        let mut a = policy("a", DeploymentMode::Aggregated, 2, 8);
        let mut b = policy("b", DeploymentMode::Disaggregated, 1, 8);
        b.roles.prefill = Some(Bounds { min: 2, max: 4 });
        assert_eq!(b.minimum(), 3);
        assert!(check_budget(5, &[a.clone(), b.clone()]).is_ok());
        let err = check_budget(4, &[a.clone(), b.clone()]).unwrap_err();
        assert_eq!(err.minimums, 5);
        assert!(err.to_string().contains("a: 2, b: 3"), "{err}");
        a.workers.min = 0;
        assert!(check_budget(3, &[a, b]).is_ok());
    }

    #[test]
    fn role_defaults_and_minimum_counts() {
        let d = policy("d", DeploymentMode::Disaggregated, 3, 8);
        assert_eq!(
            d.role_bounds(WorkerRole::Prefill),
            Bounds { min: 0, max: 8 }
        );
        assert_eq!(d.role_bounds(WorkerRole::Decode), Bounds { min: 1, max: 8 });
        assert_eq!(
            d.role_bounds(WorkerRole::Aggregated),
            Bounds { min: 0, max: 0 }
        );
        assert_eq!(
            minimum_counts(&d),
            RoleCounts {
                aggregated: 0,
                prefill: 0,
                decode: 3
            }
        );
        let a = policy("a", DeploymentMode::Aggregated, 2, 8);
        assert_eq!(minimum_counts(&a).aggregated, 2);
        assert_eq!(
            Sla {
                ttft_ms: None,
                itl_ms: None,
                percentile: 99.0
            }
            .quantile(),
            0.99
        );
    }
}
