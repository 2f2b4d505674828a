//! API tokens, the audit log, and the unauthenticated status and CA endpoints.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::Deserialize;
use uuid::Uuid;

use super::change::{Change, json};
use super::extract::{Admin, ApiJson, ApiQuery, Caller, parse_uuid};
use super::problem::{ApiError, InvalidParam, Problem};
use super::types::{AuditEntry, CaInfo, CreatedToken, NewToken, Page, PageQuery, Status, Token};
use super::{i64_cursor, page, page_limit, uuid_cursor};
use crate::AppState;
use crate::auth::{self, Role};
use crate::rows;
use crate::store;

const TOKEN_COLUMNS: &str =
    "id, name, role, prefix, node_id, created_at, expires_at, revoked_at, last_used_at, uses_left";

/// This replica's version and whether it leads (no token needed).
#[utoipa::path(get, path = "/api/v1/status", tag = "status", security(()),
    extensions(("x-kvfleet-permission" = json!("public"))),
    responses((status = 200, body = Status)))]
pub async fn status(State(state): State<AppState>) -> Json<Status> {
    Json(Status {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        leader: state.is_leader(),
        schema_version: store::known_version(),
    })
}

/// The node CA certificate and revoked serials (no token needed: both are public).
#[utoipa::path(get, path = "/api/v1/ca", tag = "status", security(()),
    extensions(("x-kvfleet-permission" = json!("public"))),
    responses((status = 200, body = CaInfo)))]
pub async fn ca(State(state): State<AppState>) -> Result<Json<CaInfo>, ApiError> {
    let revoked_serials: Vec<String> = sqlx::query_scalar(
        "SELECT serial FROM node_certificates WHERE revoked_at IS NOT NULL AND not_after > now()
         ORDER BY serial",
    )
    .fetch_all(&state.pool)
    .await?;
    Ok(Json(CaInfo {
        cert_pem: state.ca.cert_pem().to_owned(),
        revoked_serials,
    }))
}

/// List tokens; secrets are never shown (admin).
#[utoipa::path(get, path = "/api/v1/tokens", params(PageQuery), tag = "tokens",
    extensions(("x-kvfleet-permission" = json!("admin"))),
    responses((status = 200, body = Page<Token>), (status = 403, body = Problem)))]
pub async fn list_tokens(
    _caller: Caller<Admin>,
    State(state): State<AppState>,
    ApiQuery(paging): ApiQuery<PageQuery>,
) -> Result<Json<Page<Token>>, ApiError> {
    let limit = page_limit(&paging)?;
    let rows: Vec<Token> = sqlx::query(sql!(
        "SELECT {TOKEN_COLUMNS} FROM api_tokens WHERE ($1::uuid IS NULL OR id > $1) ORDER BY id LIMIT $2"
    ))
    .bind(uuid_cursor(&paging)?)
    .bind(limit + 1)
    .try_map(rows::token)
    .fetch_all(&state.pool)
    .await?;
    Ok(Json(page(rows, limit, |t| t.id.to_string())))
}

/// Create a token; the secret is in this response only (admin).
#[utoipa::path(post, path = "/api/v1/tokens", request_body = NewToken, tag = "tokens",
    extensions(("x-kvfleet-permission" = json!("admin"))),
    responses((status = 201, body = CreatedToken), (status = 422, body = Problem)))]
pub async fn create_token(
    caller: Caller<Admin>,
    State(state): State<AppState>,
    ApiJson(new): ApiJson<NewToken>,
) -> Result<(StatusCode, Json<CreatedToken>), ApiError> {
    let mut problems = Vec::new();
    if new.name.is_empty() || new.name.len() > 128 {
        problems.push(InvalidParam::new("name", "must be 1 to 128 characters"));
    }
    if new.role == Role::Agent {
        problems.push(InvalidParam::new(
            "role",
            "agent credentials come from registration; create a join token instead",
        ));
    }
    let join = new.role == Role::Join;
    // A join token is a credential that mints nodes: single-use and short-lived unless the
    // admin asks for more, so a leaked one cannot join machines for ever.
    let expires_in_s = new
        .expires_in_s
        .or(join.then_some(kvfleet_proto::api::DEFAULT_JOIN_TOKEN_TTL_S));
    let uses = match (join, new.uses) {
        (false, None) => None,
        (false, Some(_)) => {
            problems.push(InvalidParam::new("uses", "only join tokens have uses"));
            None
        }
        (true, None) => Some(1),
        (true, Some(n)) if (1..=kvfleet_proto::api::MAX_JOIN_TOKEN_USES).contains(&n) => Some(n),
        (true, Some(_)) => {
            problems.push(InvalidParam::new("uses", "must be from 1 to 10000"));
            None
        }
    };
    let expires_at = match expires_in_s {
        None => None,
        Some(s) if (1..=10 * 365 * 86_400).contains(&s) => {
            Some(chrono::Utc::now() + chrono::Duration::seconds(s))
        }
        Some(_) => {
            problems.push(InvalidParam::new(
                "expires_in_s",
                "must be from 1 to 315360000",
            ));
            None
        }
    };
    if !problems.is_empty() {
        return Err(ApiError::Validation(problems));
    }
    let mut change = Change::begin(&state, &caller.principal).await?;
    let (id, secret) = auth::insert_token(
        &mut change,
        &auth::NewToken {
            name: &new.name,
            role: new.role,
            node_id: None,
            created_by: Some(caller.principal.token_id),
            expires_at,
            uses,
        },
        None,
    )
    .await?;
    let token: Token = sqlx::query(sql!("SELECT {TOKEN_COLUMNS} FROM api_tokens WHERE id = $1"))
        .bind(id)
        .try_map(rows::token)
        .fetch_one(&mut *change)
        .await?;
    change
        .commit("token.create", "token", id, None, json(&token))
        .await?;
    // The CA a client pins is the fleet CA only when the API serves a certificate from it.
    let join_token = (join
        && state.tls.is_some()
        && matches!(state.config.tls, crate::config::TlsConfig::FleetCa { .. }))
    .then(|| kvfleet_proto::JoinTokenText::compose(&state.ca.fingerprint(), &secret));
    Ok((
        StatusCode::CREATED,
        Json(CreatedToken {
            token,
            secret,
            join_token,
        }),
    ))
}

/// Revoke a token; it stops working at once (admin). Revoking the last live admin token is
/// refused (409): the fleet would have no one left to administer it.
#[utoipa::path(delete, path = "/api/v1/tokens/{id}", params(("id" = String, Path, description = "The resource id")), tag = "tokens",
    extensions(("x-kvfleet-permission" = json!("admin"))),
    responses((status = 200, body = Token), (status = 404, body = Problem), (status = 409, body = Problem)))]
pub async fn revoke_token(
    caller: Caller<Admin>,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Token>, ApiError> {
    let id: Uuid = parse_uuid("token", &id)?;
    let mut change = Change::begin(&state, &caller.principal).await?;
    let before: Token = sqlx::query(sql!(
        "SELECT {TOKEN_COLUMNS} FROM api_tokens WHERE id = $1 FOR UPDATE"
    ))
    .bind(id)
    .try_map(rows::token)
    .fetch_optional(&mut *change)
    .await?
    .ok_or_else(|| ApiError::not_found("token", id))?;
    if before.role == Role::Admin && live(&before) {
        // Every live admin row is locked, so two admins revoking each other's tokens at once
        // cannot both succeed and leave none.
        let live_admins: Vec<Uuid> = sqlx::query_scalar(
            "SELECT id FROM api_tokens WHERE role = 'admin' AND revoked_at IS NULL
             AND (expires_at IS NULL OR expires_at > now()) ORDER BY id FOR UPDATE",
        )
        .fetch_all(&mut *change)
        .await?;
        if live_admins.iter().all(|admin| *admin == id) {
            return Err(ApiError::Conflict(format!(
                "token {id} is the last live admin token: create another admin token first \
                 (or recover with `kvfleet-controlplane token create --role admin` on a \
                 control-plane host)"
            )));
        }
    }
    let after: Token = sqlx::query(sql!(
        "UPDATE api_tokens SET revoked_at = coalesce(revoked_at, now()) WHERE id = $1
         RETURNING {TOKEN_COLUMNS}"
    ))
    .bind(id)
    .try_map(rows::token)
    .fetch_one(&mut *change)
    .await?;
    change
        .commit("token.revoke", "token", id, json(&before), json(&after))
        .await?;
    // Stops working on this replica at once; other replicas within auth.cache_ttl.
    state.auth_gate.forget_token(id);
    Ok(Json(after))
}

/// Not revoked and not expired.
fn live(token: &Token) -> bool {
    token.revoked_at.is_none() && token.expires_at.is_none_or(|at| at > chrono::Utc::now())
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct AuditFilter {
    /// `node`, `deployment`, `model`, `token`, `worker`.
    pub target_type: Option<String>,
    pub target_id: Option<String>,
    /// Only entries with this action, e.g. `deployment.create`.
    pub action: Option<String>,
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<u32>,
    /// The `next_cursor` of the previous page (a row id: decimal digits).
    #[param(pattern = r"^[0-9]{1,18}$")]
    pub cursor: Option<String>,
}

/// The audit log, newest first (admin).
#[utoipa::path(get, path = "/api/v1/audit", params(AuditFilter), tag = "audit",
    extensions(("x-kvfleet-permission" = json!("admin"))),
    responses((status = 200, body = Page<AuditEntry>), (status = 403, body = Problem)))]
pub async fn list_audit(
    _caller: Caller<Admin>,
    State(state): State<AppState>,
    ApiQuery(filter): ApiQuery<AuditFilter>,
) -> Result<Json<Page<AuditEntry>>, ApiError> {
    let paging = PageQuery {
        limit: filter.limit,
        cursor: filter.cursor,
    };
    let limit = page_limit(&paging)?;
    let rows: Vec<AuditEntry> = sqlx::query(
        "SELECT id, at, actor, actor_token, action, target_type, target_id, before, after
         FROM audit_log
         WHERE ($1::bigint IS NULL OR id < $1) AND ($2::text IS NULL OR target_type = $2)
           AND ($3::text IS NULL OR target_id = $3) AND ($4::text IS NULL OR action = $4)
         ORDER BY id DESC LIMIT $5",
    )
    .bind(i64_cursor(&paging)?)
    .bind(filter.target_type)
    .bind(filter.target_id)
    .bind(filter.action)
    .bind(limit + 1)
    .try_map(rows::audit_entry)
    .fetch_all(&state.pool)
    .await?;
    Ok(Json(page(rows, limit, |a| a.id.to_string())))
}
