//! Request extractors whose rejections are problem JSON: the caller (authenticated and
//! authorized before the body is read), JSON bodies (errors name the field), query strings and
//! path ids.

use std::marker::PhantomData;

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::header;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use super::AppState;
use super::problem::{ApiError, InvalidParam};
use crate::auth::{self, Permission, Principal};

/// A permission as a type, so a handler's signature says what it needs.
pub trait Needs: Send + Sync + 'static {
    const PERMISSION: Permission;
}

macro_rules! needs {
    ($($name:ident),+) => {$(
        #[doc = concat!("Marker: the route needs `Permission::", stringify!($name), "`.")]
        #[derive(Debug)]
        pub struct $name;
        impl Needs for $name {
            const PERMISSION: Permission = Permission::$name;
        }
    )+};
}
needs!(Read, Operate, Admin, Agent, Register);

/// The authenticated caller, already checked for `N`'s permission. Extracted from the request
/// head, so an unauthorized caller is refused before its body is even parsed.
#[derive(Debug)]
pub struct Caller<N> {
    pub principal: Principal,
    _needs: PhantomData<N>,
}

impl<N: Needs> FromRequestParts<AppState> for Caller<N> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let header = parts
            .headers
            .get(header::AUTHORIZATION)
            .map(|v| {
                v.to_str()
                    .map_err(|_| ApiError::Unauthorized(auth::AuthError::Malformed))
            })
            .transpose()?;
        // Shape first: a missing or malformed credential never reaches the database.
        let parsed = auth::parse_bearer(header).map_err(|error| {
            state.auth_gate.refused(error);
            ApiError::Unauthorized(error)
        })?;
        let hash = auth::hash_token(parsed.full);
        let mut principal = match state.auth_gate.cached(&hash) {
            crate::auth_gate::Cached::Fresh(principal) => principal,
            known_or_not => {
                let admitted = match known_or_not {
                    crate::auth_gate::Cached::Stale(admitted) => admitted,
                    _ => {
                        let client = parts
                            .extensions
                            .get::<axum::extract::ConnectInfo<super::ClientAddr>>()
                            .map_or(std::net::IpAddr::from([0, 0, 0, 0]), |c| c.0.0.ip());
                        state.auth_gate.admit(client).map_err(|retry_after_s| {
                            ApiError::TooManyAuthFailures { retry_after_s }
                        })?
                    }
                };
                // Agent traffic authenticates on the agent pool, everything else on the admin
                // pool: a flood against one cannot take the other's connections.
                let pool = state.pool_for_permission(N::PERMISSION);
                let looked_up = match pool.acquire().await {
                    Ok(mut conn) => auth::lookup(&mut conn, &parsed).await,
                    Err(error) => Err(auth::AuthFailure::Database(error)),
                };
                match looked_up {
                    Ok((principal, expires_at)) => {
                        state
                            .auth_gate
                            .verified(admitted, hash, &principal, expires_at);
                        principal
                    }
                    Err(auth::AuthFailure::Denied(error)) => {
                        state.auth_gate.denied(admitted, &hash, error);
                        return Err(ApiError::Unauthorized(error));
                    }
                    Err(auth::AuthFailure::Database(error)) => {
                        state.auth_gate.errored(admitted);
                        return Err(error.into());
                    }
                }
            }
        };
        principal.request_id = parts
            .extensions
            .get::<super::RequestId>()
            .map(|r| r.0.clone());
        if !principal.role.allows(N::PERMISSION) {
            return Err(ApiError::Forbidden {
                role: principal.role,
                needed: N::PERMISSION,
            });
        }
        Ok(Caller {
            principal,
            _needs: PhantomData,
        })
    }
}

/// A JSON body. Syntax errors → 400; well-formed JSON that does not fit the type (unknown
/// field, missing field, wrong type) → 422 naming the field.
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let is_json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                let essence = v.split(';').next().unwrap_or("").trim();
                essence == "application/json" || essence.ends_with("+json")
            });
        if !is_json {
            return Err(ApiError::UnsupportedMediaType);
        }
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|e| {
                if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::PayloadTooLarge(super::MAX_BODY_BYTES)
                } else {
                    ApiError::BadRequest(format!("reading the body: {e}"))
                }
            })?;
        parse_json(&bytes).map(ApiJson)
    }
}

/// Deserializes `bytes`, turning serde's error into a problem that names the field.
///
/// Two things serde would let through are refused first, as the document's schemas say: a
/// body that is not a JSON object (serde fills a struct from an array too), and a string with
/// a NUL character (`\u0000`), which Postgres cannot store in `text` or `jsonb`: it used to
/// come back as a 500 from the insert.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
    if first.is_some_and(|b| *b != b'{') {
        return Err(ApiError::Validation(vec![InvalidParam::new(
            "body",
            "must be a JSON object",
        )]));
    }
    if has_nul_escape(bytes) {
        let field = serde_json::from_slice::<serde_json::Value>(bytes)
            .ok()
            .and_then(|value| nul_path(&value, String::new()))
            .unwrap_or_else(|| "body".to_owned());
        return Err(ApiError::Validation(vec![InvalidParam::new(
            field,
            "must not contain a NUL character (\\u0000)",
        )]));
    }
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let result: Result<T, _> = serde_path_to_error::deserialize(&mut deserializer);
    let value = result.map_err(|error| {
        let inner = error.inner();
        if inner.is_syntax() || inner.is_eof() || inner.is_io() {
            return ApiError::BadRequest(format!("the body is not valid JSON: {inner}"));
        }
        let path = error.path().to_string();
        let message = inner.to_string();
        let message = strip_position(&message);
        let name = match unknown_field(message) {
            Some(field) if path == "." || path.is_empty() => field.to_owned(),
            // serde_path_to_error already ends the path with the unknown field.
            Some(field) if path == field || path.ends_with(&format!(".{field}")) => path,
            Some(field) => format!("{path}.{field}"),
            None if path == "." => missing_field(message).unwrap_or("body").to_owned(),
            None => match missing_field(message) {
                Some(field) => format!("{path}.{field}"),
                None => path,
            },
        };
        ApiError::Validation(vec![InvalidParam::new(name, message.to_owned())])
    })?;
    deserializer.end().map_err(|e| {
        ApiError::BadRequest(format!("trailing characters after the JSON body: {e}"))
    })?;
    Ok(value)
}

/// Whether JSON text holds the escape `\u0000` in a string (a raw NUL byte is not valid JSON
/// at all). Escapes are skipped pairwise, so an escaped backslash followed by `u0000` is not one.
fn has_nul_escape(bytes: &[u8]) -> bool {
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' {
            if bytes.get(i + 1) == Some(&b'u') && bytes.get(i + 2..i + 6) == Some(&b"0000"[..]) {
                return true;
            }
            i += 2;
        } else {
            i += 1;
        }
    }
    false
}

/// The path (as serde_path_to_error writes it) of the first key or string with a NUL.
fn nul_path(value: &serde_json::Value, at: String) -> Option<String> {
    let join = |key: &str| {
        if at.is_empty() {
            key.to_owned()
        } else {
            format!("{at}.{key}")
        }
    };
    match value {
        serde_json::Value::String(text) if text.contains('\0') => {
            Some(if at.is_empty() { "body".to_owned() } else { at })
        }
        serde_json::Value::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(i, v)| nul_path(v, format!("{at}[{i}]"))),
        serde_json::Value::Object(map) => map.iter().find_map(|(k, v)| {
            if k.contains('\0') {
                Some(join(&k.replace('\0', "\\u0000")))
            } else {
                nul_path(v, join(k))
            }
        }),
        _ => None,
    }
}

/// "unknown field `colour`, expected one of ..." → `colour`.
fn unknown_field(message: &str) -> Option<&str> {
    let rest = message.strip_prefix("unknown field `")?;
    rest.split('`').next()
}

/// "missing field `model`" → `model`.
fn missing_field(message: &str) -> Option<&str> {
    let rest = message.strip_prefix("missing field `")?;
    rest.split('`').next()
}

/// serde_json appends " at line 1 column 42"; the field path says more.
fn strip_position(message: &str) -> &str {
    match message.rfind(" at line ") {
        Some(index) => &message[..index],
        None => message,
    }
}

/// A query string; a parameter that does not parse → 422 naming it (as far as serde says).
#[derive(Debug)]
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        let query = parts.uri.query().unwrap_or_default();
        // A NUL would reach Postgres as a text parameter, which it cannot take (a 500).
        if let Some(pair) = query
            .split('&')
            .find(|pair| pair.to_ascii_lowercase().contains("%00"))
        {
            let name = pair.split('=').next().unwrap_or(pair);
            return Err(ApiError::Validation(vec![InvalidParam::new(
                name.to_owned(),
                "must not contain a NUL character (%00)",
            )]));
        }
        axum::extract::Query::<T>::try_from_uri(&parts.uri)
            .map(|q| ApiQuery(q.0))
            .map_err(|rejection| {
                let text = rejection.body_text();
                let name = text
                    .split('`')
                    .nth(1)
                    .map(str::to_owned)
                    .unwrap_or_else(|| format!("query {query:?}"));
                ApiError::Validation(vec![InvalidParam::new(name, text)])
            })
    }
}

/// Parses a UUID path segment (a malformed id is a 404: no such resource can exist).
pub fn parse_uuid(kind: &'static str, text: &str) -> Result<uuid::Uuid, ApiError> {
    text.parse().map_err(|_| ApiError::not_found(kind, text))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::types::NewDeployment;

    fn field_of(body: &str) -> (u16, Vec<String>) {
        match parse_json::<NewDeployment>(body.as_bytes()) {
            Ok(_) => (200, vec![]),
            Err(error) => {
                let problem = error.to_problem();
                (
                    problem.status,
                    problem.invalid_params.into_iter().map(|p| p.name).collect(),
                )
            }
        }
    }

    #[test]
    fn json_errors_name_the_field() {
        let cases: &[(&str, u16, &[&str])] = &[
            (r#"{"name":"a","model":"m"}"#, 200, &[]),
            (r#"{"name":"a","model":"m","colour":1}"#, 422, &["colour"]),
            (
                r#"{"name":"a","model":"m","sla":{"ttft":5}}"#,
                422,
                &["sla.ttft"],
            ),
            (
                r#"{"name":"a","model":"m","sla":{"ttft_ms":"fast"}}"#,
                422,
                &["sla.ttft_ms"],
            ),
            (r#"{"name":"a"}"#, 422, &["model"]),
            (
                r#"{"name":"a","model":"m","mode":"sharded"}"#,
                422,
                &["mode"],
            ),
            (
                r#"{"name":"a","model":"m","placement":{"zone":"x"}}"#,
                422,
                &["placement.zone"],
            ),
            (
                r#"{"name":"a","model":"m","min_workers":-1.5}"#,
                422,
                &["min_workers"],
            ),
            (r#"{"name":"a","#, 400, &[]),
            (r#"[]"#, 422, &["body"]),
            (r#""x""#, 422, &["body"]),
            (r#"{"name":"a\u0000","model":"m"}"#, 422, &["name"]),
            (
                r#"{"name":"a","model":"m","placement":{"node_labels":{"k":"\u0000"}}}"#,
                422,
                &["placement.node_labels.k"],
            ),
            (r#"{"name":"a\\u0000","model":"m"}"#, 200, &[]),
            (r#"{"name":"a","model":"m"} x"#, 400, &[]),
        ];
        for (body, status, fields) in cases {
            let (got_status, got_fields) = field_of(body);
            assert_eq!(got_status, *status, "{body}");
            assert_eq!(got_fields, *fields, "{body}");
        }
    }
}
