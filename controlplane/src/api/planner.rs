//! The SLA planner's REST surface: the fleet-wide settings (`GET`/`PATCH /api/v1/planner`,
//! the GPU budget), its decisions (`GET /api/v1/planner/decisions`), and one deployment's
//! history as a plottable series (`GET /api/v1/deployments/{id}/planner`). The loop itself is
//! [`crate::planner`]; deployments' SLA, bounds and mode are patched through `/deployments`.

use axum::Json;
use axum::extract::{Path, State};
use chrono::{DateTime, Utc};
use kvfleet_planner::policy::{BudgetTooSmall, check_budget};
use kvfleet_planner::{DeploymentDecision, DeploymentPolicy, Observation};
use sqlx::PgConnection;
use uuid::Uuid;

use super::change::Change;
use super::extract::{ApiJson, ApiQuery, Caller, Operate, Read, parse_uuid};
use super::problem::{ApiError, InvalidParam, Problem};
use super::types::{
    MetricsQuery, Page, PageQuery, PlannerDecision, PlannerDecisionQuery, PlannerPoint,
    PlannerSettings, PlannerSettingsPatch, RoleCountsView,
};
use super::{i64_cursor, page, page_limit};
use crate::AppState;
use crate::planner::policy;

async fn settings(state: &AppState) -> Result<PlannerSettings, ApiError> {
    let mut conn = state.pool.acquire().await?;
    let row: Option<(Option<i32>, DateTime<Utc>)> =
        sqlx::query_as("SELECT gpu_budget, updated_at FROM planner_settings WHERE id = 1")
            .fetch_optional(&mut *conn)
            .await?;
    let minimums: u32 = policy::all(&mut conn)
        .await?
        .iter()
        .map(|(_, p)| p.minimum())
        .sum();
    let last_round_at: Option<DateTime<Utc>> =
        sqlx::query_scalar("SELECT max(at) FROM planner_decisions")
            .fetch_one(&mut *conn)
            .await?;
    Ok(PlannerSettings {
        gpu_budget: row.and_then(|r| r.0),
        interval_s: state.config.planner.interval.as_secs_f64(),
        minimums: i32::try_from(minimums).unwrap_or(i32::MAX),
        last_round_at,
        updated_at: row.map(|r| r.1),
    })
}

/// The planner's fleet-wide settings (viewer+).
#[utoipa::path(get, path = "/api/v1/planner", tag = "planner",
    extensions(("x-kvfleet-permission" = json!("read"))),
    responses((status = 200, body = PlannerSettings), (status = 401, body = Problem)))]
pub async fn get_settings(
    _caller: Caller<Read>,
    State(state): State<AppState>,
) -> Result<Json<PlannerSettings>, ApiError> {
    Ok(Json(settings(&state).await?))
}

/// Set or clear the fleet-wide GPU budget (operator+). A budget below what the deployments'
/// minimums add up to is refused, naming each deployment's share.
#[utoipa::path(patch, path = "/api/v1/planner", request_body = PlannerSettingsPatch, tag = "planner",
    extensions(("x-kvfleet-permission" = json!("operate"))),
    responses((status = 200, body = PlannerSettings), (status = 422, body = Problem)))]
pub async fn update_settings(
    caller: Caller<Operate>,
    State(state): State<AppState>,
    ApiJson(patch): ApiJson<PlannerSettingsPatch>,
) -> Result<Json<PlannerSettings>, ApiError> {
    let Some(budget) = patch.gpu_budget else {
        return Ok(Json(settings(&state).await?));
    };
    let mut change = Change::begin(&state, &caller.principal).await?;
    let before = policy::budget(&mut change, true).await?;
    if let Some(b) = budget {
        check_new_budget(&mut change, b).await?;
    }
    sqlx::query(
        "INSERT INTO planner_settings (id, gpu_budget, updated_at) VALUES (1, $1, now())
         ON CONFLICT (id) DO UPDATE SET gpu_budget = EXCLUDED.gpu_budget, updated_at = now()",
    )
    .bind(budget)
    .execute(&mut *change)
    .await?;
    change
        .commit(
            "planner.update",
            "planner",
            "settings",
            Some(serde_json::json!({ "gpu_budget": before })),
            Some(serde_json::json!({ "gpu_budget": budget })),
        )
        .await?;
    Ok(Json(settings(&state).await?))
}

#[derive(sqlx::FromRow)]
struct DecisionRow {
    id: i64,
    at: DateTime<Utc>,
    deployment_id: Uuid,
    deployment: String,
    mode: String,
    action: String,
    reason: String,
    current: sqlx::types::Json<RoleCountsView>,
    targets: sqlx::types::Json<RoleCountsView>,
    applied: bool,
    decided_by: String,
    decision: serde_json::Value,
}

/// The planner's decisions, newest first: every round's per deployment, each with its reason,
/// its inputs and predictions, the sizing arithmetic and whether placement acted on it
/// (viewer+).
#[utoipa::path(get, path = "/api/v1/planner/decisions", params(PlannerDecisionQuery), tag = "planner",
    extensions(("x-kvfleet-permission" = json!("read"))),
    responses((status = 200, body = Page<PlannerDecision>), (status = 404, body = Problem), (status = 422, body = Problem)))]
pub async fn list_decisions(
    _caller: Caller<Read>,
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<PlannerDecisionQuery>,
) -> Result<Json<Page<PlannerDecision>>, ApiError> {
    let paging = PageQuery {
        limit: query.limit,
        cursor: query.cursor.clone(),
    };
    let limit = page_limit(&paging)?;
    let mut conn = state.pool.acquire().await?;
    let deployment: Option<Uuid> = match &query.deployment {
        None => None,
        Some(key) => Some(
            sqlx::query_scalar("SELECT id FROM deployments WHERE name = $1 OR id::text = $1")
                .bind(key)
                .fetch_optional(&mut *conn)
                .await?
                .ok_or_else(|| ApiError::not_found("deployment", key))?,
        ),
    };
    let rows: Vec<DecisionRow> = sqlx::query_as(
        "SELECT p.id, p.at, p.deployment_id, d.name AS deployment, p.mode, p.action, p.reason,
                p.current, p.targets, p.applied, p.decided_by, p.decision
         FROM planner_decisions p JOIN deployments d ON d.id = p.deployment_id
         WHERE ($1::uuid IS NULL OR p.deployment_id = $1)
           AND ($2::bigint IS NULL OR p.id < $2)
           AND (NOT $3 OR p.action <> 'hold')
         ORDER BY p.id DESC LIMIT $4",
    )
    .bind(deployment)
    .bind(i64_cursor(&paging)?)
    .bind(query.changes_only.unwrap_or(false))
    .bind(limit + 1)
    .fetch_all(&mut *conn)
    .await?;
    let items = rows
        .into_iter()
        .map(|r| {
            Ok(PlannerDecision {
                id: r.id,
                at: r.at,
                deployment_id: r.deployment_id,
                deployment: r.deployment,
                mode: crate::rows::parse(&r.mode)?,
                action: r.action,
                reason: r.reason,
                current: r.current.0,
                targets: r.targets.0,
                applied: r.applied,
                decided_by: r.decided_by,
                detail: r.decision,
            })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
    Ok(Json(page(items, limit, |d| d.id.to_string())))
}

/// One deployment's planner history (default: the last hour): per interval the observed rate
/// and TTFT/ITL at the deployment's percentile against its targets, the workers that served,
/// and what the planner predicted and decided then (viewer+).
#[utoipa::path(get, path = "/api/v1/deployments/{id}/planner", params(("id" = String, Path, description = "The resource id"), MetricsQuery), tag = "planner",
    extensions(("x-kvfleet-permission" = json!("read"))),
    responses((status = 200, body = Vec<PlannerPoint>), (status = 404, body = Problem), (status = 422, body = Problem)))]
pub async fn deployment_series(
    _caller: Caller<Read>,
    State(state): State<AppState>,
    Path(id): Path<String>,
    ApiQuery(query): ApiQuery<MetricsQuery>,
) -> Result<Json<Vec<PlannerPoint>>, ApiError> {
    let id = parse_uuid("deployment", &id)?;
    let until = query.until.unwrap_or_else(Utc::now);
    let since = query.since.unwrap_or(until - chrono::Duration::hours(1));
    if since >= until {
        return Err(ApiError::invalid("since", "must be before until"));
    }
    let mut conn = state.pool.acquire().await?;
    let exists: Option<Uuid> = sqlx::query_scalar("SELECT id FROM deployments WHERE id = $1")
        .bind(id)
        .fetch_optional(&mut *conn)
        .await?;
    if exists.is_none() {
        return Err(ApiError::not_found("deployment", id));
    }
    type Row = (
        DateTime<Utc>,
        sqlx::types::Json<Observation>,
        Option<sqlx::types::Json<DeploymentDecision>>,
    );
    // Each observation with the decision of the same round (same `at`).
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT o.at, o.observation, p.decision
         FROM planner_observations o
         LEFT JOIN LATERAL (
             SELECT decision FROM planner_decisions
             WHERE deployment_id = o.deployment_id AND at = o.at ORDER BY id DESC LIMIT 1
         ) p ON true
         WHERE o.deployment_id = $1 AND o.at > $2 AND o.at <= $3
         ORDER BY o.at LIMIT 5000",
    )
    .bind(id)
    .bind(since)
    .bind(until)
    .fetch_all(&mut *conn)
    .await?;
    let deployment = crate::planner::policy::all(&mut conn)
        .await?
        .into_iter()
        .find(|(d, _)| *d == id)
        .map(|(_, p)| p);
    let points = rows
        .into_iter()
        .map(|(at, obs, decision)| {
            let obs = obs.0;
            let decision = decision.map(|d| d.0);
            let sla = decision
                .as_ref()
                .map(|d| d.sla)
                .or_else(|| deployment.as_ref().map(|p| p.sla));
            let q = sla.map_or(0.9, |s| s.quantile());
            PlannerPoint {
                at,
                rate: obs.request_rate(),
                predicted_rate: decision.as_ref().map(|d| d.prediction.rate),
                ttft_ms: obs.ttft.quantile(q).map(|s| s * 1000.0),
                itl_ms: obs.itl.quantile(q).map(|s| s * 1000.0),
                ttft_target_ms: sla.and_then(|s| s.ttft_ms),
                itl_target_ms: sla.and_then(|s| s.itl_ms),
                percentile: q * 100.0,
                workers: crate::planner::view(&obs.workers),
                targets: decision.as_ref().map(|d| crate::planner::view(&d.targets)),
                action: decision.map(|d| d.action.as_str().to_owned()),
            }
        })
        .collect();
    Ok(Json(points))
}

fn budget_error(e: &BudgetTooSmall, field: &str) -> ApiError {
    ApiError::Validation(vec![InvalidParam::new(field, e.to_string())])
}

/// Checks that the budget still covers every deployment's minimum once the deployment
/// `replacing` (or a new one, for `None`) has the policy `changed`. The error names the
/// deployment's `min_workers` and says how to raise the budget.
pub async fn check_budget_with(
    conn: &mut PgConnection,
    replacing: Option<Uuid>,
    changed: &DeploymentPolicy,
) -> Result<(), ApiError> {
    let Some(budget) = policy::budget(conn, true).await? else {
        return Ok(());
    };
    let mut policies: Vec<DeploymentPolicy> = policy::all(conn)
        .await?
        .into_iter()
        .filter(|(id, _)| Some(*id) != replacing)
        .map(|(_, p)| p)
        .collect();
    policies.push(changed.clone());
    check_budget(policy::count(budget), &policies).map_err(|e| {
        let mut error = budget_error(&e, "min_workers");
        if let ApiError::Validation(params) = &mut error {
            params[0].reason = format!(
                "{}; raise the budget with PATCH /api/v1/planner (kvfleet planner --gpu-budget N) or lower the minimums",
                params[0].reason
            );
        }
        error
    })
}

/// Checks a new budget against the deployments as they are.
pub async fn check_new_budget(conn: &mut PgConnection, budget: i32) -> Result<(), ApiError> {
    if budget < 0 {
        return Err(ApiError::invalid("gpu_budget", "must be 0 or more"));
    }
    let policies: Vec<DeploymentPolicy> = policy::all(conn)
        .await?
        .into_iter()
        .map(|(_, p)| p)
        .collect();
    check_budget(policy::count(budget), &policies).map_err(|e| budget_error(&e, "gpu_budget"))
}
