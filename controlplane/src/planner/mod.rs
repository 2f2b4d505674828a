//! The SLA planner loop: every `planner.interval` (30 s by default) the leader folds the
//! heartbeat windows of the interval into one observation per deployment, runs the pure
//! planner ([`kvfleet_planner::plan`]) over the stored history, and records each decision.
//!
//! - `advise` deployments: the decision is recorded (`planner_decisions`), nothing changes.
//! - `auto` deployments: the targets also become the deployment's `planner_targets`, which
//!   placement ([`crate::placement`]) turns into workers started on free GPUs or CPU slots and
//!   workers drained before they stop; a change writes an audit row (actor `planner`, action
//!   `deployment.scale`, the reason in `after`), so `/api/v1/decisions` shows it too.
//! - `off` deployments run `min_workers`, and count against the GPU budget with what they run.
//!
//! A round is one transaction under a transaction-scoped advisory lock: its observations,
//! decisions and targets commit together or not at all, and two replicas that both think they
//! lead never interleave rounds. Everything a round needs — the observation history and the
//! previous decision's memory (corrections, scale-down bookkeeping) — is in Postgres, so a new
//! leader continues exactly where the old one stopped: a leader change loses no decision.
//!
//! - [`policy`]: deployments as the planner's policies; the GPU budget (its checks answer in
//!   `api::planner`).
//! - [`windows`]: heartbeat windows in, one observation per interval out.
//! - [`profiles`]: which performance profile a deployment is planned with.

pub mod policy;
pub mod profiles;
pub mod windows;

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use kvfleet_planner::plan::Memory;
use kvfleet_planner::{
    Action, DeploymentDecision, DeploymentObservations, FleetPolicy, Observation, PredictorKind,
    RoleCounts, plan,
};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::AppState;
use crate::rows::parse;
use crate::store::{self, AuditEntry};
use kvfleet_proto::api::{
    Deployment, DeploymentMode, ModelFormat, PlannerMode, RoleCountsView, WorkerRole,
};

/// Transaction lock around each planner round.
pub const PLANNER_LOCK_KEY: i64 = 0x6b76_666c_6565_7404;

/// Heartbeat windows are kept this many intervals (the round reads one).
const WINDOW_KEEP_INTERVALS: u32 = 10;
/// Observations and decisions are kept this long.
const HISTORY_RETENTION: Duration = Duration::from_secs(14 * 86_400);

/// What a round did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoundOutcome {
    /// Decisions recorded.
    pub decisions: usize,
    /// Of those, `auto` decisions whose targets changed placement's.
    pub applied: usize,
}

/// The worker roles and counts of `counts` a deployment of `mode` uses.
pub fn role_targets_of(mode: DeploymentMode, counts: &RoleCountsView) -> Vec<(WorkerRole, u32)> {
    let n = |v: i64| u32::try_from(v.max(0)).unwrap_or(u32::MAX);
    match mode {
        DeploymentMode::Aggregated => vec![(WorkerRole::Aggregated, n(counts.aggregated))],
        DeploymentMode::Disaggregated => vec![
            (WorkerRole::Prefill, n(counts.prefill)),
            (WorkerRole::Decode, n(counts.decode)),
        ],
    }
}

/// The planner's counts as the API spells them.
pub fn view(counts: &RoleCounts) -> RoleCountsView {
    RoleCountsView {
        aggregated: i64::from(counts.aggregated),
        prefill: i64::from(counts.prefill),
        decode: i64::from(counts.decode),
    }
}

/// This replica, as decisions name it.
fn replica() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "unknown-host".to_owned());
    format!("{host}/{}", std::process::id())
}

/// How many observations a round reads back.
fn history_len(config: &kvfleet_planner::PlannerConfig) -> i64 {
    let n = if config.predictor == PredictorKind::Seasonal {
        config.season_intervals() * 2 + 8
    } else {
        256
    };
    i64::try_from(n).unwrap_or(256)
}

/// One deployment's part of a round.
struct Planned {
    deployment: Deployment,
    history: Vec<Observation>,
    running: RoleCounts,
    memory: Option<Memory>,
}

/// One planner round (see the module docs).
///
/// Fenced: the round's transaction checks `fence`, so a deposed leader's round writes nothing.
pub async fn round(
    state: &AppState,
    fence: &crate::store::Fence,
) -> Result<RoundOutcome, crate::store::LeaderError> {
    let config = &state.config.planner;
    let mut tx = state.leader_pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(PLANNER_LOCK_KEY)
        .execute(&mut *tx)
        .await?;
    fence.check(&mut tx).await?;
    let now: DateTime<Utc> = sqlx::query_scalar("SELECT now()")
        .fetch_one(&mut *tx)
        .await?;
    let deployments: Vec<Deployment> = sqlx::query(crate::rows::sql_select_deployments())
        .try_map(crate::rows::deployment)
        .fetch_all(&mut *tx)
        .await?;
    let running = running_counts(&mut tx).await?;
    let formats: BTreeMap<Uuid, ModelFormat> =
        sqlx::query_as::<_, (Uuid, String)>("SELECT id, format FROM models")
            .fetch_all(&mut *tx)
            .await?
            .into_iter()
            .map(|(id, f)| Ok((id, parse(&f)?)))
            .collect::<Result<_, sqlx::Error>>()?;
    let mut planned = Vec::new();
    for d in deployments {
        let counts = running.get(&d.id).copied().unwrap_or_default();
        if d.planner == PlannerMode::Off {
            planned.push(Planned {
                deployment: d,
                history: Vec::new(),
                running: counts,
                memory: None,
            });
            continue;
        }
        let last: Option<DateTime<Utc>> =
            sqlx::query_scalar("SELECT max(at) FROM planner_observations WHERE deployment_id = $1")
                .bind(d.id)
                .fetch_one(&mut *tx)
                .await?;
        let interval = chrono::Duration::from_std(config.interval).unwrap_or_default();
        let from = last.unwrap_or(now - interval).min(now);
        let observation = windows::observation(&mut tx, d.id, from, now).await?;
        sqlx::query(
            "INSERT INTO planner_observations (deployment_id, at, observation) VALUES ($1, $2, $3)
             ON CONFLICT DO NOTHING",
        )
        .bind(d.id)
        .bind(now)
        .bind(sqlx::types::Json(&observation))
        .execute(&mut *tx)
        .await?;
        let mut history: Vec<Observation> =
            sqlx::query_scalar::<_, sqlx::types::Json<Observation>>(
                "SELECT observation FROM planner_observations WHERE deployment_id = $1
             ORDER BY at DESC LIMIT $2",
            )
            .bind(d.id)
            .bind(history_len(config))
            .fetch_all(&mut *tx)
            .await?
            .into_iter()
            .map(|o| o.0)
            .collect();
        history.reverse();
        let memory: Option<Memory> = sqlx::query_scalar::<_, sqlx::types::Json<Memory>>(
            "SELECT decision->'memory' FROM planner_decisions WHERE deployment_id = $1
             ORDER BY id DESC LIMIT 1",
        )
        .bind(d.id)
        .fetch_optional(&mut *tx)
        .await?
        .map(|m| m.0);
        planned.push(Planned {
            deployment: d,
            history,
            running: counts,
            memory,
        });
    }
    let keys: Vec<(Uuid, String, Uuid, String, ModelFormat)> = planned
        .iter()
        .filter(|p| p.deployment.planner != PlannerMode::Off)
        .map(|p| {
            let d = &p.deployment;
            let format = formats
                .get(&d.model_id)
                .copied()
                .unwrap_or(ModelFormat::Gguf);
            (d.id, d.name.clone(), d.model_id, d.model.clone(), format)
        })
        .collect();
    let profiles = profiles::for_deployments(&mut tx, &keys).await?;
    let fleet = FleetPolicy {
        config: config.clone(),
        gpu_budget: policy::budget(&mut tx, false)
            .await?
            .and_then(|b| u32::try_from(b).ok()),
        deployments: planned.iter().map(|p| policy::of(&p.deployment)).collect(),
    };
    let observations: Vec<DeploymentObservations<'_>> = planned
        .iter()
        .map(|p| DeploymentObservations {
            deployment: &p.deployment.name,
            history: &p.history,
            running: p.running,
            previous: p.memory.as_ref(),
        })
        .collect();
    let decision = plan(&observations, &profiles, &fleet, windows::since_epoch(now));
    let by_name: BTreeMap<&str, &Deployment> = planned
        .iter()
        .map(|p| (p.deployment.name.as_str(), &p.deployment))
        .collect();
    let decided_by = replica();
    let mut outcome = RoundOutcome::default();
    for d in &decision.deployments {
        let Some(deployment) = by_name.get(d.deployment.as_str()) else {
            continue;
        };
        let applied = record(&mut tx, deployment, d, now, &decided_by).await?;
        outcome.decisions += 1;
        outcome.applied += usize::from(applied);
    }
    windows::expire(&mut tx, config.interval * WINDOW_KEEP_INTERVALS).await?;
    for table in ["planner_observations", "planner_decisions"] {
        sqlx::query(sql!(
            "DELETE FROM {table} WHERE at < now() - make_interval(secs => $1)"
        ))
        .bind(HISTORY_RETENTION.as_secs_f64())
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(outcome)
}

/// Workers that count per deployment and role: running (starting or ready), not draining.
async fn running_counts(
    conn: &mut PgConnection,
) -> Result<BTreeMap<Uuid, RoleCounts>, sqlx::Error> {
    let rows: Vec<(Uuid, String, i64)> = sqlx::query_as(
        "SELECT deployment_id, role, count(*) FROM workers WHERE desired_state = 'running'
         GROUP BY 1, 2",
    )
    .fetch_all(conn)
    .await?;
    let mut out: BTreeMap<Uuid, RoleCounts> = BTreeMap::new();
    for (deployment, role, n) in rows {
        let role: WorkerRole = parse(&role)?;
        *out.entry(deployment).or_default().get_mut(role) = u32::try_from(n).unwrap_or(u32::MAX);
    }
    Ok(out)
}

/// Writes one decision; for `auto`, its targets and an audit row when they change. Returns
/// whether placement's targets changed.
async fn record(
    tx: &mut PgConnection,
    deployment: &Deployment,
    decision: &DeploymentDecision,
    now: DateTime<Utc>,
    decided_by: &str,
) -> Result<bool, sqlx::Error> {
    let targets = view(&decision.targets);
    let mut applied = false;
    if decision.mode == PlannerMode::Auto {
        let before: Option<sqlx::types::Json<RoleCountsView>> =
            sqlx::query_scalar("SELECT planner_targets FROM deployments WHERE id = $1 FOR UPDATE")
                .bind(deployment.id)
                .fetch_one(&mut *tx)
                .await?;
        let before = before.map(|b| b.0);
        if before != Some(targets) {
            sqlx::query(
                "UPDATE deployments SET planner_targets = $2, updated_at = now() WHERE id = $1",
            )
            .bind(deployment.id)
            .bind(sqlx::types::Json(&targets))
            .execute(&mut *tx)
            .await?;
            store::audit(
                tx,
                AuditEntry {
                    actor_token: None,
                    actor: "planner",
                    action: "deployment.scale",
                    target_type: "deployment",
                    target_id: Some(deployment.id.to_string()),
                    before: Some(serde_json::json!({ "targets": before })),
                    after: Some(serde_json::json!({
                        "targets": targets,
                        "reason": decision.reason,
                    })),
                    request_id: None,
                },
            )
            .await?;
            applied = true;
        }
    }
    let action = match decision.action {
        Action::Hold => "hold",
        Action::ScaleUp => "scale_up",
        Action::ScaleDown => "scale_down",
        Action::Rebalance => "rebalance",
    };
    sqlx::query(
        "INSERT INTO planner_decisions (deployment_id, at, mode, action, reason, current, targets,
             applied, decided_by, decision)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
    )
    .bind(deployment.id)
    .bind(now)
    .bind(decision.mode.as_str())
    .bind(action)
    .bind(&decision.reason)
    .bind(sqlx::types::Json(view(&decision.current)))
    .bind(sqlx::types::Json(&targets))
    .bind(applied)
    .bind(decided_by)
    .bind(sqlx::types::Json(decision))
    .execute(&mut *tx)
    .await?;
    if applied {
        tracing::info!(
            deployment = %deployment.name,
            action,
            reason = %decision.reason,
            "planner changed a deployment's targets"
        );
    }
    Ok(applied)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_map_to_the_roles_of_the_mode() {
        let counts = RoleCountsView {
            aggregated: 3,
            prefill: 2,
            decode: -1,
        };
        assert_eq!(
            role_targets_of(DeploymentMode::Aggregated, &counts),
            vec![(WorkerRole::Aggregated, 3)]
        );
        assert_eq!(
            role_targets_of(DeploymentMode::Disaggregated, &counts),
            vec![(WorkerRole::Prefill, 2), (WorkerRole::Decode, 0)]
        );
        let round_trip = view(&RoleCounts {
            aggregated: 1,
            prefill: 2,
            decode: 3,
        });
        assert_eq!((round_trip.prefill, round_trip.decode), (2, 3));
    }
}
