//! `GET /api/v1/decisions`: what the control plane's own loops decided, and why.
//!
//! Placement (start, drain and stop workers) and liveness (nodes going unhealthy or lost)
//! record each change as an audit row in the transaction that makes it, with the actor
//! `placement` or `liveness`; rows of a `planner` actor are included too (no planner loop
//! writes them yet). The
//! audit log is admin-only because it also holds who changed tokens; these rows are about
//! the fleet, so viewers may read them here, newest first, each with a one-line reason and
//! the deployment and node it concerns (resolved from the worker where the row names one).
//! Read-only: this endpoint writes nothing and has no state of its own.

use axum::Json;
use axum::extract::State;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::extract::{ApiQuery, Caller, Read};
use super::problem::{ApiError, Problem};
use super::types::{Page, PageQuery};
use super::{i64_cursor, page, page_limit};
use crate::AppState;

/// The actors whose audit rows are decisions (background loops, not people).
pub const DECISION_SOURCES: &[&str] = &["placement", "liveness", "planner"];

/// One decision of a control-plane loop.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Decision {
    /// The audit row's id (also the paging key).
    pub id: i64,
    pub at: DateTime<Utc>,
    /// `placement`, `liveness` or `planner`.
    pub source: String,
    /// `<resource>.<verb>`, e.g. `worker.create`, `worker.drain`, `node.lost`.
    pub action: String,
    pub target_type: String,
    pub target_id: Option<String>,
    /// The deployment concerned, when there is one.
    pub deployment_id: Option<Uuid>,
    /// The node concerned, when there is one.
    pub node_id: Option<Uuid>,
    /// Why, in a few words.
    pub reason: String,
    pub before: Option<serde_json::Value>,
    pub after: Option<serde_json::Value>,
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct DecisionFilter {
    /// Only this loop's decisions: `placement`, `liveness` or `planner`.
    #[param(pattern = "^(placement|liveness|planner)$")]
    pub source: Option<String>,
    pub deployment_id: Option<Uuid>,
    pub node_id: Option<Uuid>,
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<u32>,
    /// The `next_cursor` of the previous page (a row id: decimal digits).
    #[param(pattern = r"^[0-9]{1,18}$")]
    pub cursor: Option<String>,
}

#[derive(sqlx::FromRow)]
struct Row {
    id: i64,
    at: DateTime<Utc>,
    actor: String,
    action: String,
    target_type: String,
    target_id: Option<String>,
    deployment_id: Option<Uuid>,
    node_id: Option<Uuid>,
    before: Option<serde_json::Value>,
    after: Option<serde_json::Value>,
}

/// Decisions of the placement, liveness and planner loops, newest first (viewer+).
#[utoipa::path(get, path = "/api/v1/decisions", params(DecisionFilter), tag = "decisions",
    extensions(("x-kvfleet-permission" = json!("read"))),
    responses((status = 200, body = Page<Decision>), (status = 401, body = Problem), (status = 422, body = Problem)))]
pub async fn list_decisions(
    _caller: Caller<Read>,
    State(state): State<AppState>,
    ApiQuery(filter): ApiQuery<DecisionFilter>,
) -> Result<Json<Page<Decision>>, ApiError> {
    let paging = PageQuery {
        limit: filter.limit,
        cursor: filter.cursor,
    };
    let limit = page_limit(&paging)?;
    let sources: Vec<&str> = match filter.source.as_deref() {
        None => DECISION_SOURCES.to_vec(),
        Some(s) if DECISION_SOURCES.contains(&s) => vec![s],
        Some(_) => {
            return Err(ApiError::invalid(
                "source",
                format!("must be one of {}", DECISION_SOURCES.join(", ")),
            ));
        }
    };
    // The worker rows hold the deployment and node of worker decisions whose audit row does
    // not (drain and stop record only the state change).
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT * FROM (
             SELECT a.id, a.at, a.actor, a.action, a.target_type, a.target_id, a.before, a.after,
                 coalesce(w.deployment_id,
                     CASE WHEN a.target_type = 'deployment' THEN a.target_id::uuid END)
                     AS deployment_id,
                 coalesce(w.node_id,
                     CASE WHEN a.target_type = 'node' THEN a.target_id::uuid END) AS node_id
             FROM audit_log a
             LEFT JOIN workers w ON a.target_type = 'worker' AND w.id::text = a.target_id
             WHERE a.actor_token IS NULL AND a.actor = ANY($1)
               AND ($2::bigint IS NULL OR a.id < $2)
         ) d
         WHERE ($3::uuid IS NULL OR d.deployment_id = $3) AND ($4::uuid IS NULL OR d.node_id = $4)
         ORDER BY d.id DESC LIMIT $5",
    )
    .bind(&sources)
    .bind(i64_cursor(&paging)?)
    .bind(filter.deployment_id)
    .bind(filter.node_id)
    .bind(limit + 1)
    .fetch_all(&state.pool)
    .await?;
    let decisions = rows
        .into_iter()
        .map(|r| Decision {
            reason: reason(&r.action, r.before.as_ref(), r.after.as_ref()),
            id: r.id,
            at: r.at,
            source: r.actor,
            action: r.action,
            target_type: r.target_type,
            target_id: r.target_id,
            deployment_id: r.deployment_id,
            node_id: r.node_id,
            before: r.before,
            after: r.after,
        })
        .collect();
    Ok(Json(page(decisions, limit, |d| d.id.to_string())))
}

/// A one-line explanation of a decision from what its row recorded.
pub fn reason(
    action: &str,
    before: Option<&serde_json::Value>,
    after: Option<&serde_json::Value>,
) -> String {
    let field = |v: Option<&serde_json::Value>, k: &str| {
        v.and_then(|v| v.get(k))
            .and_then(|x| x.as_str())
            .map(str::to_owned)
    };
    if let Some(reason) = field(after, "reason") {
        return reason;
    }
    match action {
        "worker.create" => {
            let role = field(after, "role").unwrap_or_else(|| "aggregated".into());
            let slot = if after
                .and_then(|a| a.get("gpu_id"))
                .is_some_and(|g| !g.is_null())
            {
                "a GPU"
            } else {
                "a CPU slot"
            };
            format!("fewer {role} workers than the deployment's target; placed one on {slot}")
        }
        "node.unhealthy" | "node.lost" => {
            let silence = after
                .and_then(|a| a.get("silence_s"))
                .and_then(serde_json::Value::as_f64);
            let from = field(before, "state").unwrap_or_else(|| "healthy".into());
            match silence {
                Some(s) => format!("no heartbeat for {s:.0} s (was {from})"),
                None => format!("no heartbeat (was {from})"),
            }
        }
        other => other.replace('.', " "),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reasons_read_from_what_the_row_recorded() {
        let cases = [
            (
                "worker.drain",
                None,
                Some(json!({"desired_state": "draining", "reason": "node draining"})),
                "node draining",
            ),
            (
                "worker.create",
                None,
                Some(json!({"role": "decode", "gpu_id": "x"})),
                "fewer decode workers than the deployment's target; placed one on a GPU",
            ),
            (
                "worker.create",
                None,
                Some(json!({"role": "aggregated", "gpu_id": null})),
                "fewer aggregated workers than the deployment's target; placed one on a CPU slot",
            ),
            (
                "node.lost",
                Some(json!({"state": "unhealthy"})),
                Some(json!({"state": "lost", "silence_s": 61.4})),
                "no heartbeat for 61 s (was unhealthy)",
            ),
            ("planner.scale", None, None, "planner scale"),
        ];
        for (action, before, after, want) in cases {
            assert_eq!(
                reason(action, before.as_ref(), after.as_ref()),
                want,
                "{action}"
            );
        }
    }
}
