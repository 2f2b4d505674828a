//! Performance profiles (`kvfleet_proto::profile::PerfProfile`, docs/profiles.md), one per
//! model and device kind: uploaded by `kvfleet profile` (or anyone with operator rights),
//! read by the planner ([`crate::planner::profiles`] picks one per deployment).
//!
//! A profile is validated whole before anything is written: malformed, non-monotone (more work
//! taking less time) or for another model than the one in the path is a 422 naming the field.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use kvfleet_proto::profile::{PerfProfile, ProfileError};
use sqlx::PgConnection;
use uuid::Uuid;

use super::change::Change;
use super::extract::{ApiJson, Caller, Operate, Read, parse_uuid};
use super::problem::{ApiError, InvalidParam, Problem};
use super::types::{ProfileInfo, StoredProfile};
use crate::AppState;

const COLUMNS: &str =
    "p.id, p.model_id, m.name AS model, p.device, p.profile, p.created_at, p.updated_at";

#[derive(sqlx::FromRow)]
struct Row {
    id: Uuid,
    model_id: Uuid,
    model: String,
    device: String,
    profile: sqlx::types::Json<PerfProfile>,
    created_at: chrono::DateTime<chrono::Utc>,
    updated_at: chrono::DateTime<chrono::Utc>,
}

impl Row {
    fn stored(self) -> StoredProfile {
        StoredProfile {
            info: ProfileInfo {
                id: self.id,
                model_id: self.model_id,
                model: self.model,
                device: self.device,
                engine: self.profile.0.engine.clone(),
                source: self.profile.0.source.clone(),
                created_at: self.created_at,
                updated_at: self.updated_at,
            },
            profile: self.profile.0,
        }
    }
}

/// A profile problem as the API's validation error, naming the field.
pub fn profile_problem(error: &ProfileError) -> InvalidParam {
    match error {
        ProfileError::Parse(reason) => InvalidParam::new("profile", reason.clone()),
        ProfileError::Format { .. } => InvalidParam::new("format", error.to_string()),
        ProfileError::Invalid { field, reason } => InvalidParam::new(field.clone(), reason.clone()),
        ProfileError::WrongModel { .. } => InvalidParam::new("model", error.to_string()),
    }
}

async fn model_of(conn: &mut PgConnection, key: &str) -> Result<(Uuid, String), ApiError> {
    sqlx::query_as("SELECT id, name FROM models WHERE name = $1 OR id::text = $1")
        .bind(key)
        .fetch_optional(conn)
        .await?
        .ok_or_else(|| ApiError::not_found("model", key))
}

async fn fetch(conn: &mut PgConnection, id: Uuid) -> Result<StoredProfile, ApiError> {
    let row: Row = sqlx::query_as(sql!(
        "SELECT {COLUMNS} FROM perf_profiles p JOIN models m ON m.id = p.model_id WHERE p.id = $1"
    ))
    .bind(id)
    .fetch_optional(conn)
    .await?
    .ok_or_else(|| ApiError::not_found("profile", id))?;
    Ok(row.stored())
}

/// Store a model's performance profile for the device kind it names (`profile.device`),
/// replacing the one measured on that kind before (operator+). `{id}` is the model's id or
/// name; the profile must be for that model.
#[utoipa::path(post, path = "/api/v1/models/{id}/profiles", request_body = PerfProfile,
    params(("id" = String, Path, description = "The model's id or name")), tag = "profiles",
    extensions(("x-kvfleet-permission" = json!("operate"))),
    responses((status = 201, body = StoredProfile), (status = 200, body = StoredProfile),
        (status = 404, body = Problem), (status = 422, body = Problem)))]
pub async fn upload(
    caller: Caller<Operate>,
    State(state): State<AppState>,
    Path(model): Path<String>,
    ApiJson(profile): ApiJson<PerfProfile>,
) -> Result<(StatusCode, Json<StoredProfile>), ApiError> {
    let mut change = Change::begin(&state, &caller.principal).await?;
    let (model_id, model_name) = model_of(&mut change, &model).await?;
    profile
        .validate()
        .and_then(|()| profile.check_model(&model_name))
        .map_err(|e| ApiError::Validation(vec![profile_problem(&e)]))?;
    let before: Option<(Uuid, sqlx::types::Json<PerfProfile>)> = sqlx::query_as(
        "SELECT id, profile FROM perf_profiles WHERE model_id = $1 AND device = $2 FOR UPDATE",
    )
    .bind(model_id)
    .bind(&profile.device)
    .fetch_optional(&mut *change)
    .await?;
    let id = before.as_ref().map_or_else(Uuid::new_v4, |b| b.0);
    sqlx::query(
        "INSERT INTO perf_profiles (id, model_id, device, profile) VALUES ($1, $2, $3, $4)
         ON CONFLICT (model_id, device) DO UPDATE SET profile = EXCLUDED.profile, updated_at = now()",
    )
    .bind(id)
    .bind(model_id)
    .bind(&profile.device)
    .bind(sqlx::types::Json(&profile))
    .execute(&mut *change)
    .await?;
    let stored = fetch(&mut change, id).await?;
    let status = if before.is_some() {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    let action = if before.is_some() {
        "profile.update"
    } else {
        "profile.create"
    };
    let before =
        before.map(|b| serde_json::json!({"device": b.1.0.device, "source": b.1.0.source}));
    let after = serde_json::json!({
        "model": model_name, "device": profile.device, "engine": profile.engine,
        "source": profile.source,
    });
    change
        .commit(action, "profile", id, before, Some(after))
        .await?;
    Ok((status, Json(stored)))
}

/// A model's profiles, one per device kind, without their tables (viewer+).
#[utoipa::path(get, path = "/api/v1/models/{id}/profiles",
    params(("id" = String, Path, description = "The model's id or name")), tag = "profiles",
    extensions(("x-kvfleet-permission" = json!("read"))),
    responses((status = 200, body = Vec<ProfileInfo>), (status = 404, body = Problem)))]
pub async fn list(
    _caller: Caller<Read>,
    State(state): State<AppState>,
    Path(model): Path<String>,
) -> Result<Json<Vec<ProfileInfo>>, ApiError> {
    let mut conn = state.pool.acquire().await?;
    let (model_id, _) = model_of(&mut conn, &model).await?;
    let rows: Vec<Row> = sqlx::query_as(sql!(
        "SELECT {COLUMNS} FROM perf_profiles p JOIN models m ON m.id = p.model_id
         WHERE p.model_id = $1 ORDER BY p.device"
    ))
    .bind(model_id)
    .fetch_all(&mut *conn)
    .await?;
    Ok(Json(rows.into_iter().map(|r| r.stored().info).collect()))
}

/// One profile with its tables (viewer+).
#[utoipa::path(get, path = "/api/v1/profiles/{id}", params(("id" = String, Path, description = "The resource id")), tag = "profiles",
    extensions(("x-kvfleet-permission" = json!("read"))),
    responses((status = 200, body = StoredProfile), (status = 404, body = Problem)))]
pub async fn get(
    _caller: Caller<Read>,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<StoredProfile>, ApiError> {
    let id = parse_uuid("profile", &id)?;
    let mut conn = state.pool.acquire().await?;
    Ok(Json(fetch(&mut conn, id).await?))
}

/// Delete a profile (operator+).
#[utoipa::path(delete, path = "/api/v1/profiles/{id}", params(("id" = String, Path, description = "The resource id")), tag = "profiles",
    extensions(("x-kvfleet-permission" = json!("operate"))),
    responses((status = 204), (status = 404, body = Problem)))]
pub async fn delete(
    caller: Caller<Operate>,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let id = parse_uuid("profile", &id)?;
    let mut change = Change::begin(&state, &caller.principal).await?;
    let before = fetch(&mut change, id).await?;
    sqlx::query("DELETE FROM perf_profiles WHERE id = $1")
        .bind(id)
        .execute(&mut *change)
        .await?;
    let before = serde_json::json!({
        "model": before.info.model, "device": before.info.device,
    });
    change
        .commit("profile.delete", "profile", id, Some(before), None)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}
