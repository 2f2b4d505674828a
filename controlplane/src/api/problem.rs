//! The one mapping from internal errors to the wire: RFC 7807 problem JSON
//! (`application/problem+json`). Every error the API returns goes through [`ApiError`].
//!
//! `type` is a relative URI naming the kind of problem (`/api/v1/problems/validation`, ...);
//! validation problems list the offending fields in `invalid_params` (`name` is a dotted JSON
//! path such as `sla.ttft_ms`).

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::auth::{AuthError, Permission, Role};

/// RFC 7807 problem details.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Problem {
    #[serde(rename = "type")]
    pub type_: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub invalid_params: Vec<InvalidParam>,
}

/// One field that failed validation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct InvalidParam {
    /// Dotted path of the field in the request (`min_workers`, `sla.ttft_ms`, `cursor`).
    pub name: String,
    pub reason: String,
}

impl InvalidParam {
    pub fn new(name: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            reason: reason.into(),
        }
    }
}

/// Everything a handler can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    Unauthorized(AuthError),
    #[error("role {role} may not do this (needs {needed:?})")]
    Forbidden { role: Role, needed: Permission },
    #[error("no {kind} {id}")]
    NotFound { kind: &'static str, id: String },
    #[error("the request is invalid")]
    Validation(Vec<InvalidParam>),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Conflict(String),
    #[error("send the body as application/json")]
    UnsupportedMediaType,
    #[error("the body is larger than {0} bytes")]
    PayloadTooLarge(usize),
    #[error("the database is unavailable; retry shortly")]
    Unavailable,
    /// The client address spent its failed-authentication budget (see `auth_gate`).
    #[error("too many failed authentications from this address; retry in {retry_after_s} s")]
    TooManyAuthFailures { retry_after_s: u64 },
    /// A statement failed for a reason that is not the caller's (answered like
    /// [`ApiError::Internal`], counted as a database error).
    #[error("database error: {0}")]
    Database(String),
    #[error("internal error: {0}")]
    Internal(String),
}

/// Marks a response whose error came from the database, for the request metrics.
#[derive(Debug, Clone, Copy)]
pub struct DatabaseFailed;

impl ApiError {
    pub fn not_found(kind: &'static str, id: impl ToString) -> Self {
        ApiError::NotFound {
            kind,
            id: id.to_string(),
        }
    }

    pub fn invalid(name: impl Into<String>, reason: impl Into<String>) -> Self {
        ApiError::Validation(vec![InvalidParam::new(name, reason)])
    }

    fn parts(&self) -> (StatusCode, &'static str, &'static str) {
        match self {
            ApiError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized", "Unauthorized"),
            ApiError::Forbidden { .. } => (StatusCode::FORBIDDEN, "forbidden", "Forbidden"),
            ApiError::NotFound { .. } => (StatusCode::NOT_FOUND, "not-found", "Not found"),
            ApiError::Validation(_) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "validation",
                "The request is invalid",
            ),
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad-request", "Bad request"),
            ApiError::Conflict(_) => (StatusCode::CONFLICT, "conflict", "Conflict"),
            ApiError::UnsupportedMediaType => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported-media-type",
                "Unsupported media type",
            ),
            ApiError::PayloadTooLarge(_) => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload-too-large",
                "Payload too large",
            ),
            ApiError::TooManyAuthFailures { .. } => (
                StatusCode::TOO_MANY_REQUESTS,
                "too-many-requests",
                "Too many requests",
            ),
            ApiError::Unavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "Service unavailable",
            ),
            ApiError::Database(_) | ApiError::Internal(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "Internal error",
            ),
        }
    }

    pub fn to_problem(&self) -> Problem {
        let (status, slug, title) = self.parts();
        let (detail, invalid_params) = match self {
            ApiError::Validation(params) => (
                params
                    .iter()
                    .map(|p| format!("{}: {}", p.name, p.reason))
                    .collect::<Vec<_>>()
                    .join("; "),
                params.clone(),
            ),
            // Internal details go to the log, not to the caller.
            ApiError::Database(_) | ApiError::Internal(_) => (
                "an internal error occurred; the control plane log has details".to_owned(),
                Vec::new(),
            ),
            other => (other.to_string(), Vec::new()),
        };
        Problem {
            type_: format!("/api/v1/problems/{slug}"),
            title: title.to_owned(),
            status: status.as_u16(),
            detail,
            invalid_params,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let ApiError::Database(message) | ApiError::Internal(message) = &self {
            tracing::error!(%message, "request failed");
        }
        let problem = self.to_problem();
        let status =
            StatusCode::from_u16(problem.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = serde_json::to_vec(&problem).unwrap_or_default();
        let mut response = (status, body).into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if matches!(self, ApiError::Unauthorized(_)) {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let ApiError::TooManyAuthFailures { retry_after_s } = &self {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_s));
        }
        if matches!(self, ApiError::Unavailable | ApiError::Database(_)) {
            response.extensions_mut().insert(DatabaseFailed);
        }
        response
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(error: sqlx::Error) -> Self {
        if crate::store::is_unavailable(&error) {
            return ApiError::Unavailable;
        }
        if let Some(db) = error.as_database_error() {
            let constraint = db.constraint().unwrap_or_default().to_owned();
            match db.code().as_deref() {
                Some("23505") => {
                    return ApiError::Conflict(format!(
                        "already exists (unique constraint {constraint})"
                    ));
                }
                Some("23503") => {
                    return ApiError::Conflict(format!(
                        "still referenced or refers to something missing ({constraint})"
                    ));
                }
                Some("23514") => {
                    return ApiError::invalid(
                        field_of_constraint(&constraint),
                        format!("violates {constraint}"),
                    );
                }
                _ => {}
            }
        }
        ApiError::Database(error.to_string())
    }
}

/// `deployments_ttft_target_ms_check` → `ttft_target_ms` (a best guess for checks the API's own
/// validation did not catch first).
fn field_of_constraint(constraint: &str) -> String {
    let trimmed = constraint.strip_suffix("_check").unwrap_or(constraint);
    match trimmed.split_once('_') {
        Some((_table, field)) => field.to_owned(),
        None => trimmed.to_owned(),
    }
}

impl From<crate::kv_index::KvIndexError> for ApiError {
    fn from(error: crate::kv_index::KvIndexError) -> Self {
        match error {
            crate::kv_index::KvIndexError::Database(error) => error.into(),
            crate::kv_index::KvIndexError::Internal(message) => ApiError::Internal(message),
        }
    }
}

impl From<crate::auth::AuthFailure> for ApiError {
    fn from(failure: crate::auth::AuthFailure) -> Self {
        match failure {
            crate::auth::AuthFailure::Denied(reason) => ApiError::Unauthorized(reason),
            crate::auth::AuthFailure::Database(error) => error.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problems_carry_status_type_and_fields() {
        let cases: Vec<(ApiError, u16, &str)> = vec![
            (
                ApiError::Unauthorized(AuthError::Revoked),
                401,
                "/api/v1/problems/unauthorized",
            ),
            (
                ApiError::Forbidden {
                    role: Role::Viewer,
                    needed: Permission::Operate,
                },
                403,
                "/api/v1/problems/forbidden",
            ),
            (
                ApiError::not_found("node", "x"),
                404,
                "/api/v1/problems/not-found",
            ),
            (
                ApiError::invalid("min_workers", "must be <= max_workers"),
                422,
                "/api/v1/problems/validation",
            ),
            (
                ApiError::Conflict("dup".into()),
                409,
                "/api/v1/problems/conflict",
            ),
            (ApiError::Unavailable, 503, "/api/v1/problems/unavailable"),
            (
                ApiError::Internal("secret sql".into()),
                500,
                "/api/v1/problems/internal",
            ),
            (
                ApiError::Database("secret sql".into()),
                500,
                "/api/v1/problems/internal",
            ),
        ];
        for (error, status, type_) in cases {
            let problem = error.to_problem();
            assert_eq!(
                (problem.status, problem.type_.as_str()),
                (status, type_),
                "{error:?}"
            );
            assert!(!problem.detail.contains("secret sql"));
        }
        let problem = ApiError::invalid("sla.ttft_ms", "must be > 0").to_problem();
        assert_eq!(problem.invalid_params[0].name, "sla.ttft_ms");
        assert_eq!(problem.detail, "sla.ttft_ms: must be > 0");
    }

    #[test]
    fn constraint_names_map_to_fields() {
        assert_eq!(
            field_of_constraint("deployments_ttft_target_ms_check"),
            "ttft_target_ms"
        );
        assert_eq!(field_of_constraint("models_name_check"), "name");
    }
}
