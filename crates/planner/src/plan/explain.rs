//! The words of a decision: the one-sentence reason and the arithmetic lines.

use std::fmt::Write as _;
use std::time::Duration;

use kvfleet_proto::api::WorkerRole;

use super::{Action, DeploymentDecision, Limit, RoleNeed};
use crate::model::{Binding, Need, Targets};
use crate::observe::RoleCounts;
use crate::policy::{Algorithm, PlannerConfig};

/// The action and the reason, once the targets are final.
pub(super) fn finish(d: &mut DeploymentDecision) {
    let mut up = false;
    let mut down = false;
    for (role, target) in d.targets.iter() {
        let current = d.current.get(role);
        up |= target > current;
        down |= target < current;
    }
    d.action = match (up, down) {
        (false, false) => Action::Hold,
        (true, false) => Action::ScaleUp,
        (false, true) => Action::ScaleDown,
        (true, true) => Action::Rebalance,
    };
    d.reason = reason(d);
    if let Some(Limit::Budget {
        budget,
        wanted,
        granted,
        holders,
    }) = d.limits.iter().find(|l| matches!(l, Limit::Budget { .. }))
    {
        let held = if holders.is_empty() {
            "no other deployment holds any".to_owned()
        } else {
            let list = holders
                .iter()
                .map(|(n, c)| format!("{n} {c}"))
                .collect::<Vec<_>>()
                .join(", ");
            format!("others hold: {list}")
        };
        d.arithmetic.push(format!(
            "GPU budget {budget}: wanted {wanted}, granted {granted} ({held})"
        ));
    }
}

fn roles_text(counts: &RoleCounts, roles: &[WorkerRole]) -> String {
    roles
        .iter()
        .map(|&r| format!("{} {}", counts.get(r), r))
        .collect::<Vec<_>>()
        .join(" + ")
}

/// The one-sentence explanation.
fn reason(d: &DeploymentDecision) -> String {
    let roles: Vec<WorkerRole> = d.needs.iter().map(|n| n.role).collect();
    if d.limits.contains(&Limit::NoProfile) {
        return format!(
            "Keeping {}: no performance profile for this deployment's model and device; upload one with `kvfleet profile`.",
            roles_text(&d.targets, &roles_or_all(&roles, d))
        );
    }
    let changes: Vec<String> = d
        .needs
        .iter()
        .filter(|n| d.targets.get(n.role) != d.current.get(n.role))
        .map(|n| {
            format!(
                "{} workers {} → {}",
                n.role,
                d.current.get(n.role),
                d.targets.get(n.role)
            )
        })
        .collect();
    // The role whose need explains the decision: the one that changed most, else the one
    // closest to its target.
    let main = d
        .needs
        .iter()
        .max_by_key(|n| d.targets.get(n.role).abs_diff(d.current.get(n.role)))
        .copied();
    let because = main
        .map(|n| {
            if d.algorithm == Algorithm::Dynamo {
                format!(
                    "Dynamo's throughput formula gives {} {} for the predicted {} req/s",
                    n.workers,
                    n.role,
                    num(d.prediction.rate)
                )
            } else if let (true, Some(quiet)) =
                (d.targets.get(n.role) < d.current.get(n.role), n.quiet_for)
            {
                format!(
                    "for the last {} the load, with {:.0}% headroom, needed at most {} {} ({} now for the predicted {} req/s)",
                    human_duration(quiet),
                    d.stability.scale_down_margin * 100.0,
                    n.stabilised,
                    n.role,
                    n.workers,
                    num(d.prediction.rate)
                )
            } else {
                why(d, &n)
            }
        })
        .unwrap_or_default();
    let budget = d.limits.iter().find_map(|l| match l {
        Limit::Budget {
            budget,
            wanted,
            granted,
            holders,
        } => Some(format!(
            "; the GPU budget of {budget} allows {granted} of the {wanted} wanted ({})",
            holders.first().map_or_else(
                || "no other deployment holds any".to_owned(),
                |(n, c)| format!("{n} holds {c}")
            )
        )),
        _ => None,
    });
    let capped = d.limits.iter().find_map(|l| match l {
        Limit::Maximum { role, max } => Some(format!(
            "; capped at {}max {max}",
            role.map_or_else(String::new, |r| format!("{r} "))
        )),
        Limit::Minimum { role, min } => Some(format!(
            "; held at {}min {min}",
            role.map_or_else(String::new, |r| format!("{r} "))
        )),
        _ => None,
    });
    let tail = format!(
        "{}{}.",
        budget.unwrap_or_default(),
        if d.limits.iter().any(|l| matches!(l, Limit::Budget { .. })) {
            String::new()
        } else {
            capped.unwrap_or_default()
        }
    );
    match d.action {
        Action::Hold => {
            let held = d.limits.iter().find_map(|l| match l {
                Limit::Cooldown {
                    role,
                    needs,
                    remaining,
                } => Some(format!(
                    "Keeping {}: the load needs {needs} {role}, but scale-down waits {} more for the cooldown",
                    roles_text(&d.targets, &roles),
                    human_duration(*remaining)
                )),
                Limit::Hysteresis {
                    role,
                    needs,
                    margin,
                } => Some(format!(
                    "Keeping {}: the load needs {needs} {role}, but not with {:.0}% headroom",
                    roles_text(&d.targets, &roles),
                    margin * 100.0
                )),
                _ => None,
            });
            match held {
                Some(h) => format!("{h}{tail}"),
                None => format!(
                    "Keeping {}: {because}{tail}",
                    roles_text(&d.targets, &roles)
                ),
            }
        }
        _ => {
            let verb = match d.action {
                Action::ScaleUp => "Scaling up",
                Action::ScaleDown => "Scaling down",
                _ => "Rebalancing",
            };
            format!("{verb} {}: {because}{tail}", changes.join(" and "))
        }
    }
}

fn roles_or_all(roles: &[WorkerRole], d: &DeploymentDecision) -> Vec<WorkerRole> {
    if roles.is_empty() {
        d.targets
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|(r, _)| r)
            .collect()
    } else {
        roles.to_vec()
    }
}

/// Why a role needs its count, in words.
fn why(d: &DeploymentDecision, need: &RoleNeed) -> String {
    let rate = num(d.prediction.rate);
    let pct = format!("p{}", trim(d.sla.quantile() * 100.0));
    match need.binding {
        Binding::Idle => "no load is predicted".to_owned(),
        Binding::Ttft => format!(
            "the predicted {rate} req/s needs {} {} to hold TTFT {pct} within target (model: {} ms with {}{})",
            need.workers,
            need.role,
            num(need.estimate.ttft_ms),
            need.workers,
            need.below
                .map(|b| format!(", {} ms with {}", num(b.ttft_ms), b.workers))
                .unwrap_or_default()
        ),
        Binding::Itl => format!(
            "the predicted {rate} req/s needs {} {} to hold ITL {pct} within target (model: {} ms with {}{})",
            need.workers,
            need.role,
            num(need.estimate.itl_ms),
            need.workers,
            need.below
                .map(|b| format!(", {} ms with {}", num(b.itl_ms), b.workers))
                .unwrap_or_default()
        ),
        Binding::Throughput => format!(
            "the predicted {rate} req/s needs {} {} not to saturate",
            need.workers, need.role
        ),
        Binding::Unreachable => format!(
            "no number of workers meets the {pct} targets (model: TTFT {} ms, ITL {} ms at best), so the predicted {rate} req/s gets {} {}, within 10% of the best possible",
            num(need.estimate.ttft_ms),
            num(need.estimate.itl_ms),
            need.workers,
            need.role
        ),
    }
}

pub(super) fn describe_need(
    role: WorkerRole,
    need: &Need,
    targets: &Targets,
    config: &PlannerConfig,
) -> String {
    let e = &need.at;
    let pct = format!("p{}", trim(targets.quantile * 100.0));
    let target = |t: Option<f64>| t.map_or_else(|| "none".to_owned(), |v| format!("{} ms", num(v)));
    if config.algorithm == Algorithm::Dynamo {
        return format!(
            "{role}: {} worker(s) by Dynamo's throughput formula ({})",
            need.workers,
            need.binding.describe()
        );
    }
    let mut line = format!(
        "{role}: {} worker(s) for {}",
        need.workers,
        need.binding.describe()
    );
    if role != WorkerRole::Decode && e.workers > 0 {
        let _ = write!(
            line,
            "; prefill {} ms per request, {:.0}% busy, TTFT {pct} {} ms (target {})",
            num(e.service_ms),
            e.prefill_utilization * 100.0,
            num(e.ttft_ms),
            target(targets.ttft_ms)
        );
    }
    if role != WorkerRole::Prefill && e.workers > 0 {
        let _ = write!(
            line,
            "; {} streams per worker, ITL {pct} {} ms (target {})",
            num(e.batch),
            num(e.itl_ms),
            target(targets.itl_ms)
        );
    }
    if let Some(b) = &need.below {
        let _ = write!(line, "; with {}:", b.workers);
        if role != WorkerRole::Decode {
            let _ = write!(line, " TTFT {} ms", num(b.ttft_ms));
        }
        if role == WorkerRole::Aggregated {
            line.push(',');
        }
        if role != WorkerRole::Prefill {
            let _ = write!(line, " ITL {} ms", num(b.itl_ms));
        }
    }
    line
}

fn trim(v: f64) -> String {
    let s = format!("{v:.2}");
    s.trim_end_matches('0').trim_end_matches('.').to_owned()
}

/// A number for a sentence: 3 significant digits, no exponent, `∞` for infinity.
pub fn num(v: f64) -> String {
    if !v.is_finite() {
        return "∞".to_owned();
    }
    let a = v.abs();
    if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// `90 s`, `2 min 30 s`.
pub fn human_duration(d: Duration) -> String {
    let s = d.as_secs_f64().round() as u64;
    if s < 120 {
        format!("{s} s")
    } else if s.is_multiple_of(60) {
        format!("{} min", s / 60)
    } else {
        format!("{} min {} s", s / 60, s % 60)
    }
}
