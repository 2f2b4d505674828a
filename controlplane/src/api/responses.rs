//! Stored OpenAI Responses (`/v1/responses` with `store: true`) for the agents: the node that
//! served a response writes it here behind its answer, and any node reads or deletes it by id
//! for `previous_response_id`, `GET` and `DELETE /v1/responses/{id}`. The control plane does not
//! interpret a response: it keeps the agent's JSON with the owner digest the agent computed, and
//! the agents compare owners (a response is visible only to the API key that created it).
//! Rows expire after `[responses] retention`; the leader sweeps them ([`sweep`]).

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use sqlx::PgPool;

use super::agent::node_of;
use super::extract::{Agent, ApiJson, Caller};
use super::problem::ApiError;
use crate::AppState;
use crate::store::{Fence, LeaderError};

/// The longest response id accepted (OpenAI's are ~50 characters).
const MAX_ID_LEN: usize = 128;
/// The largest stored body (a long conversation's items); the route's body limit matches.
pub const MAX_STORED_BYTES: usize = 8 << 20;

/// A stored response as agents write and read it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StoredResponse {
    /// Digest of the API key that created it (the agent's own scheme; opaque here).
    pub owner: String,
    /// The Response object and the conversation it continues.
    pub body: serde_json::Value,
}

fn check_id(id: &str) -> Result<(), ApiError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid(
            "id",
            format!("must be 1 to {MAX_ID_LEN} characters of [A-Za-z0-9_-]"),
        ))
    }
}

/// Store (or replace) response `id` (agent credential). Body: `{"owner", "body"}`; kept for
/// `[responses] retention` from now.
#[utoipa::path(put, path = "/api/v1/agent/responses/{id}", tag = "agent",
    params(("id" = String, Path, description = "The resource id")),
    request_body(content = String, content_type = "application/json", description = "{\"owner\": digest of the creating API key, \"body\": the stored response}"),
    extensions(("x-kvfleet-permission" = json!("agent"))),
    responses((status = 204, description = "stored"), (status = 422, description = "a malformed id or body"),
        (status = 503, description = "database unavailable; retry")))]
pub async fn put(
    caller: Caller<Agent>,
    State(state): State<AppState>,
    Path(id): Path<String>,
    ApiJson(stored): ApiJson<StoredResponse>,
) -> Result<StatusCode, ApiError> {
    check_id(&id)?;
    let node = node_of(&caller.principal)?;
    let retention = state.config.responses.retention.as_secs_f64();
    sqlx::query(
        "INSERT INTO stored_responses (id, owner, node_id, body, expires_at) \
         VALUES ($1, $2, $3, $4, now() + make_interval(secs => $5)) \
         ON CONFLICT (id) DO UPDATE SET owner = EXCLUDED.owner, node_id = EXCLUDED.node_id, \
           body = EXCLUDED.body, expires_at = EXCLUDED.expires_at",
    )
    .bind(&id)
    .bind(&stored.owner)
    .bind(node)
    .bind(&stored.body)
    .bind(retention)
    .execute(&state.agent_pool)
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Response `id` as stored (agent credential), unless it expired or was deleted.
#[utoipa::path(get, path = "/api/v1/agent/responses/{id}", tag = "agent",
    params(("id" = String, Path, description = "The resource id")),
    extensions(("x-kvfleet-permission" = json!("agent"))),
    responses((status = 200, description = "{\"owner\", \"body\"}"), (status = 404, description = "no such response (never stored, expired or deleted)"),
        (status = 422, description = "a malformed id (1 to 128 characters of [A-Za-z0-9_-])")))]
pub async fn get(
    _caller: Caller<Agent>,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<StoredResponse>, ApiError> {
    check_id(&id)?;
    let row: Option<(String, serde_json::Value)> = sqlx::query_as(
        "SELECT owner, body FROM stored_responses WHERE id = $1 AND expires_at > now()",
    )
    .bind(&id)
    .fetch_optional(&state.agent_pool)
    .await?;
    let (owner, body) = row.ok_or_else(|| ApiError::not_found("response", &id))?;
    Ok(Json(StoredResponse { owner, body }))
}

/// Delete response `id` (agent credential; the agent checked its owner first).
#[utoipa::path(delete, path = "/api/v1/agent/responses/{id}", tag = "agent",
    params(("id" = String, Path, description = "The resource id")),
    extensions(("x-kvfleet-permission" = json!("agent"))),
    responses((status = 204, description = "deleted"), (status = 404, description = "no such response"),
        (status = 422, description = "a malformed id (1 to 128 characters of [A-Za-z0-9_-])")))]
pub async fn delete(
    _caller: Caller<Agent>,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    check_id(&id)?;
    let deleted = sqlx::query("DELETE FROM stored_responses WHERE id = $1 AND expires_at > now()")
        .bind(&id)
        .execute(&state.agent_pool)
        .await?
        .rows_affected();
    if deleted == 0 {
        return Err(ApiError::not_found("response", &id));
    }
    Ok(StatusCode::NO_CONTENT)
}

/// Deletes expired responses (the leader, with its metrics maintenance); returns how many.
/// Fenced: refused unless `fence` is still the leader's epoch.
pub async fn sweep(pool: &PgPool, fence: &Fence) -> Result<u64, LeaderError> {
    let mut tx = pool.begin().await?;
    fence.check(&mut tx).await?;
    let swept = sqlx::query("DELETE FROM stored_responses WHERE expires_at <= now()")
        .execute(&mut *tx)
        .await?
        .rows_affected();
    tx.commit().await?;
    Ok(swept)
}
