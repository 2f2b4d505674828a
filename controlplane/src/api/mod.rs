//! The REST API under `/api/v1`: routes, paging, the OpenAPI document.
//!
//! Every route names the permission it needs in its handler's signature (`Caller<Read>`, ...;
//! the matrix is in [`crate::auth`]); every change writes an audit row in the transaction that
//! makes it; every error is problem JSON ([`problem`]). Lists page with `limit` (default 100,
//! at most [`MAX_PAGE_SIZE`]) and an opaque `cursor` (the previous page's `next_cursor`).
//! `GET /api/v1/openapi.json`, `/api/v1/status` and `/api/v1/ca` need no token.

pub mod admin;
pub mod agent;
pub mod catalog;
pub mod change;
pub mod decisions;
pub mod extract;
pub mod fleet;
pub mod kv;
pub mod planner;
pub mod problem;
pub mod profiles;
pub mod responses;
pub mod session;
pub mod types;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use utoipa::OpenApi;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};

use crate::AppState;
use crate::auth::{Permission, Role};
use crate::telemetry::{LatencyFamily, Registry, latency_family};
use problem::{ApiError, DatabaseFailed};
use types::{Page, PageQuery};

/// The largest `limit` a list accepts.
pub const MAX_PAGE_SIZE: u32 = 500;
/// The `limit` when none is given.
pub const DEFAULT_PAGE_SIZE: u32 = 100;
/// Request bodies above this are refused (413): inventories and heartbeats are small.
pub const MAX_BODY_BYTES: usize = 1 << 20;

/// The peer address of a request's connection, for the failed-authentication budget
/// ([`crate::auth_gate`]); served through `into_make_service_with_connect_info`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr(pub std::net::SocketAddr);

impl
    axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, tokio::net::TcpListener>>
    for ClientAddr
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, tokio::net::TcpListener>) -> Self {
        ClientAddr(*stream.remote_addr())
    }
}

impl
    axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, crate::tls::TlsListener>>
    for ClientAddr
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, crate::tls::TlsListener>) -> Self {
        ClientAddr(*stream.remote_addr())
    }
}

/// All routes, ready to serve.
pub fn router(state: AppState) -> Router {
    let v1 = Router::new()
        .route("/openapi.json", get(openapi_json))
        .route("/status", get(admin::status))
        .route("/ca", get(admin::ca))
        .route("/nodes", get(fleet::list_nodes))
        .route(
            "/nodes/{id}",
            get(fleet::get_node).delete(fleet::remove_node),
        )
        .route("/nodes/{id}/cordon", post(fleet::cordon_node))
        .route("/nodes/{id}/uncordon", post(fleet::uncordon_node))
        .route("/nodes/{id}/drain", post(fleet::drain_node))
        .route("/nodes/{id}/approve", post(fleet::approve_node))
        .route("/nodes/{id}/reject", post(fleet::reject_node))
        .route("/nodes/{id}/labels", post(fleet::label_node))
        .route("/gpus", get(fleet::list_gpus))
        .route("/gpus/{id}", get(fleet::get_gpu))
        .route("/workers", get(fleet::list_workers))
        .route("/workers/{id}", get(fleet::get_worker))
        .route(
            "/models",
            get(catalog::list_models).post(catalog::create_model),
        )
        .route(
            "/models/{id}",
            get(catalog::get_model).delete(catalog::delete_model),
        )
        .route(
            "/deployments",
            get(catalog::list_deployments).post(catalog::create_deployment),
        )
        .route(
            "/deployments/{id}",
            get(catalog::get_deployment)
                .patch(catalog::update_deployment)
                .delete(catalog::delete_deployment),
        )
        .route("/deployments/{id}/planner", get(planner::deployment_series))
        .route(
            "/planner",
            get(planner::get_settings).patch(planner::update_settings),
        )
        .route("/planner/decisions", get(planner::list_decisions))
        .route(
            "/models/{id}/profiles",
            get(profiles::list).post(profiles::upload),
        )
        .route(
            "/profiles/{id}",
            get(profiles::get).delete(profiles::delete),
        )
        .route("/tokens", get(admin::list_tokens).post(admin::create_token))
        .route("/tokens/{id}", axum::routing::delete(admin::revoke_token))
        .route("/audit", get(admin::list_audit))
        .route("/whoami", get(session::whoami))
        .route("/decisions", get(decisions::list_decisions))
        .route("/metrics/workers/{id}", get(fleet::worker_metrics))
        .route("/metrics/deployments/{id}", get(fleet::deployment_metrics))
        .route("/agent/register", post(agent::register))
        .route("/agent/heartbeat", post(agent::heartbeat))
        .route("/agent/desired-state", get(agent::desired_state))
        .route("/agent/certificate", post(agent::renew_certificate))
        .route("/agent/fleet", get(agent::fleet_directory))
        .route(
            "/agent/kv-events",
            post(kv::upload).layer(DefaultBodyLimit::max(kv::MAX_UPLOAD_BYTES)),
        )
        .route("/agent/kv-stream", get(kv::stream))
        .route("/agent/kv-snapshot", get(kv::snapshot))
        .route(
            "/agent/responses/{id}",
            get(responses::get)
                .put(responses::put)
                .delete(responses::delete)
                .layer(DefaultBodyLimit::max(responses::MAX_STORED_BYTES)),
        )
        .route("/kv/stats", get(kv::stats))
        .route("/kv/workers", get(kv::workers))
        .fallback(not_found);
    Router::new()
        .nest("/api/v1", v1)
        .merge(crate::ui::router())
        .fallback(not_found)
        .layer(axum::middleware::map_response(problem_for_plain_errors))
        .route("/metrics", get(metrics))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn_with_state(state.clone(), measure))
        .layer(axum::middleware::from_fn(request_id))
        .with_state(state)
}

/// Request counts and latencies by route, for `/metrics`.
#[derive(Debug, Clone)]
pub struct HttpMetrics {
    requests: Family<HttpLabels, Counter>,
    seconds: LatencyFamily<RouteLabels>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpLabels {
    route: String,
    method: String,
    status: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: String,
    method: String,
}

/// The `route` label of a request that matched no route (one label value for every unknown
/// path, so scanners cannot blow up the series count).
const UNMATCHED_ROUTE: &str = "unmatched";

impl HttpMetrics {
    /// Registers `kvfleet_cp_http_requests_total` and `kvfleet_cp_http_request_seconds`.
    pub fn register(registry: &mut Registry) -> Self {
        let requests = Family::default();
        registry.register(
            "kvfleet_cp_http_requests",
            "HTTP requests answered, by route template (e.g. /api/v1/nodes/{id}; `unmatched` \
             for unknown paths), method and status",
            requests.clone(),
        );
        let seconds = latency_family();
        registry.register(
            "kvfleet_cp_http_request_seconds",
            "Time from a request's arrival to its response head, by route template and method \
             (long polls such as /agent/desired-state and /agent/kv-stream include their wait)",
            seconds.clone(),
        );
        Self { requests, seconds }
    }
}

/// Counts and times every request, and counts the database errors behind error responses.
async fn measure(
    axum::extract::State(state): axum::extract::State<AppState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or(UNMATCHED_ROUTE, axum::extract::MatchedPath::as_str)
        .to_owned();
    let method = request.method().as_str().to_owned();
    let started = std::time::Instant::now();
    let response = next.run(request).await;
    state
        .http
        .seconds
        .get_or_create(&RouteLabels {
            route: route.clone(),
            method: method.clone(),
        })
        .observe(started.elapsed().as_secs_f64());
    state
        .http
        .requests
        .get_or_create(&HttpLabels {
            route,
            method,
            status: response.status().as_u16().to_string(),
        })
        .inc();
    if response.extensions().get::<DatabaseFailed>().is_some() {
        state.db.count("api");
    }
    response
}

/// `GET /metrics`: every metric this replica's modules registered, in the Prometheus text
/// format (no token: counts and timings only, no fleet secrets).
async fn metrics(
    axum::extract::State(state): axum::extract::State<AppState>,
) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    (
        [(
            axum::http::header::CONTENT_TYPE,
            crate::telemetry::CONTENT_TYPE,
        )],
        state.telemetry.encode(),
    )
        .into_response()
}

/// The id of one request: the client's `x-request-id` when it sends a sane one (printable
/// ASCII, at most 128 bytes), otherwise a fresh UUID. Echoed in the response and stored in the
/// audit rows the request writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestId(pub String);

async fn request_id(
    mut request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let id = request
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map_or_else(|| uuid::Uuid::new_v4().to_string(), str::to_owned);
    request.extensions_mut().insert(RequestId(id.clone()));
    let mut response = next.run(request).await;
    if let Ok(value) = axum::http::HeaderValue::from_str(&id) {
        response.headers_mut().insert("x-request-id", value);
    }
    response
}

/// Errors produced outside our handlers (axum's 405, 413 from the body limit, ...) become
/// problem JSON too, so a client parses one error shape on every path.
async fn problem_for_plain_errors(response: axum::response::Response) -> axum::response::Response {
    use axum::http::header::CONTENT_TYPE;
    use axum::response::IntoResponse as _;
    let status = response.status();
    let is_problem = response
        .headers()
        .get(CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/problem+json"));
    if !(status.is_client_error() || status.is_server_error()) || is_problem {
        return response;
    }
    let (parts, body) = response.into_parts();
    let detail = axum::body::to_bytes(body, 4096)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
        .unwrap_or_default();
    let problem = problem::Problem {
        type_: format!("/api/v1/problems/http-{}", status.as_u16()),
        title: status.canonical_reason().unwrap_or("Error").to_owned(),
        status: status.as_u16(),
        detail: if detail.is_empty() {
            status.to_string()
        } else {
            detail
        },
        invalid_params: Vec::new(),
    };
    let mut response = (status, axum::Json(problem)).into_response();
    response.headers_mut().insert(
        CONTENT_TYPE,
        axum::http::HeaderValue::from_static("application/problem+json"),
    );
    // Keep headers such as Allow (405) from the original response.
    for (name, value) in &parts.headers {
        if name != CONTENT_TYPE && name != axum::http::header::CONTENT_LENGTH {
            response.headers_mut().insert(name.clone(), value.clone());
        }
    }
    response
}

async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::not_found("route", uri.path())
}

async fn openapi_json() -> axum::Json<serde_json::Value> {
    axum::Json(document().clone())
}

/// The extension every route's `#[utoipa::path]` carries: the permission its `Caller<_>`
/// extractor checks, spelled `read`, `operate`, `admin`, `agent`, `register`, or `public` for
/// the routes that take no token.
pub const PERMISSION_EXTENSION: &str = "x-kvfleet-permission";
/// The roles a route admits, which [`document`] derives from [`PERMISSION_EXTENSION`] through
/// [`Role::allows`] (empty for public routes). The same list is the route's `bearer` security
/// requirement: OpenAPI 3.1 lets a non-OAuth scheme's requirement name roles.
pub const ROLES_EXTENSION: &str = "x-kvfleet-roles";

/// The OpenAPI document as served: [`ApiDoc`] completed by [`complete`], built once.
pub fn document() -> &'static serde_json::Value {
    static DOCUMENT: std::sync::OnceLock<serde_json::Value> = std::sync::OnceLock::new();
    DOCUMENT.get_or_init(|| {
        let mut doc = serde_json::to_value(ApiDoc::openapi()).unwrap_or_default();
        complete(&mut doc);
        doc
    })
}

/// utoipa writes a `u32` or `u64` parameter as `format: int32`/`int64` with `minimum: 0`, which
/// says the largest value is `i32::MAX`/`i64::MAX`; the server takes up to `u32::MAX`/`u64::MAX`.
/// Says so (the format goes, the true maximum comes), unless a tighter maximum is documented.
fn unsigned_bounds(schema: &mut serde_json::Value) {
    let Some(schema) = schema.as_object_mut() else {
        return;
    };
    // utoipa's own mark of an unsigned type is `minimum: 0`; a documented `minimum = 1` (as
    // on `step_s`, an `i64`) is not one.
    let unsigned = schema
        .get("minimum")
        .and_then(serde_json::Value::as_f64)
        .is_some_and(|m| m == 0.0);
    let max = match schema.get("format").and_then(serde_json::Value::as_str) {
        Some("int32") => u64::from(u32::MAX),
        Some("int64") => u64::MAX,
        _ => return,
    };
    if !unsigned {
        return;
    }
    schema.remove("format");
    schema.entry("maximum").or_insert_with(|| max.into());
}

/// A free-form string parameter takes no NUL character (Postgres text cannot hold one;
/// `extract::ApiQuery` answers 422 naming the parameter), which the document says with a
/// pattern. Strings with a format, a pattern or a set of values already say what they take.
fn no_nul(schema: &mut serde_json::Value) {
    let Some(schema) = schema.as_object_mut() else {
        return;
    };
    let is_string = match schema.get("type") {
        Some(serde_json::Value::String(t)) => t == "string",
        Some(serde_json::Value::Array(ts)) => ts.iter().any(|t| t == "string"),
        _ => false,
    };
    if is_string
        && !["format", "pattern", "enum"]
            .iter()
            .any(|k| schema.contains_key(*k))
    {
        schema.insert("pattern".to_owned(), "^[^\\x00]*$".into());
    }
}

/// The permission a [`PERMISSION_EXTENSION`] value names; `Some(None)` for `public`.
fn parse_permission(text: &str) -> Option<Option<Permission>> {
    Some(Some(match text {
        "public" => return Some(None),
        "read" => Permission::Read,
        "operate" => Permission::Operate,
        "admin" => Permission::Admin,
        "agent" => Permission::Agent,
        "register" => Permission::Register,
        _ => return None,
    }))
}

/// Adds to every operation what the shared layers answer, so each handler's annotation lists
/// only its own outcomes: the roles and security requirement from its permission; 401 and 403
/// where a token is needed (the [`extract::Caller`] extractor); 404 where the path has an id
/// (a malformed id is a 404 too, [`extract::parse_uuid`]); 422 where there is a query string
/// ([`extract::ApiQuery`]); 400, 413, 415 and 422 where there is a JSON body
/// ([`extract::ApiJson`] and the body limit). Every 4xx/5xx is `application/problem+json`
/// with the `Problem` schema, as [`problem::ApiError`] and `problem_for_plain_errors` send it.
/// An operation whose permission is missing or unknown is left without roles; the unit test
/// and the authorization matrix (`controlplane/tests/api.rs`) fail on it.
fn complete(doc: &mut serde_json::Value) {
    use serde_json::{Value, json};
    let Some(paths) = doc.get_mut("paths").and_then(Value::as_object_mut) else {
        return;
    };
    for item in paths.values_mut() {
        let Some(item) = item.as_object_mut() else {
            continue;
        };
        for (method, op) in item.iter_mut() {
            if !matches!(method.as_str(), "get" | "post" | "put" | "patch" | "delete") {
                continue;
            }
            let Some(op) = op.as_object_mut() else {
                continue;
            };
            let permission = op
                .get("extensions")
                .and_then(|e| e.get(PERMISSION_EXTENSION))
                .or_else(|| op.get(PERMISSION_EXTENSION))
                .and_then(Value::as_str)
                .and_then(parse_permission);
            let params: Vec<String> = op
                .get("parameters")
                .and_then(Value::as_array)
                .map(|ps| {
                    ps.iter()
                        .filter_map(|p| p.get("in").and_then(Value::as_str))
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default();
            if let Some(parameters) = op.get_mut("parameters").and_then(Value::as_array_mut) {
                parameters
                    .iter_mut()
                    .filter_map(|p| p.get_mut("schema"))
                    .for_each(|schema| {
                        unsigned_bounds(schema);
                        no_nul(schema);
                    });
            }
            let has_body = op.contains_key("requestBody");
            let mut added: Vec<(u16, &str)> = Vec::new();
            match permission {
                Some(Some(permission)) => {
                    let roles: Vec<&str> = Role::ALL
                        .iter()
                        .filter(|r| r.allows(permission))
                        .map(|r| r.as_str())
                        .collect();
                    op.insert(ROLES_EXTENSION.to_owned(), json!(roles));
                    op.insert("security".to_owned(), json!([{ "bearer": roles }]));
                    added.push((
                        401,
                        "No token, or a malformed, unknown, expired, revoked or used-up one",
                    ));
                    added.push((
                        403,
                        "The token's role does not include this route's permission",
                    ));
                }
                Some(None) => {
                    op.insert(ROLES_EXTENSION.to_owned(), json!([]));
                    op.insert("security".to_owned(), json!([]));
                }
                None => {}
            }
            if params.iter().any(|p| p == "path") {
                added.push((404, "No such resource (a malformed id names none either)"));
            }
            if params.iter().any(|p| p == "query") {
                added.push((422, "A query parameter is out of range or does not parse"));
            }
            if has_body {
                added.push((400, "The body is not valid JSON"));
                added.push((413, "The body is larger than the route's limit"));
                added.push((415, "The body is not sent as application/json"));
                added.push((
                    422,
                    "The body does not fit the schema (invalid_params names the field)",
                ));
            }
            let responses = op.entry("responses").or_insert_with(|| json!({}));
            let Some(responses) = responses.as_object_mut() else {
                continue;
            };
            for (status, description) in added {
                responses
                    .entry(status.to_string())
                    .or_insert_with(|| json!({ "description": description }));
            }
            for (status, response) in responses.iter_mut() {
                if !(status.starts_with('4') || status.starts_with('5')) {
                    continue;
                }
                if let Some(response) = response.as_object_mut() {
                    response.insert(
                        "content".to_owned(),
                        json!({ "application/problem+json": {
                            "schema": { "$ref": "#/components/schemas/Problem" }
                        }}),
                    );
                    response
                        .entry("description")
                        .or_insert_with(|| json!("An error, as RFC 7807 problem JSON"));
                }
            }
        }
    }
}

/// The page size a query asks for, checked against the documented maximum.
pub fn page_limit(query: &PageQuery) -> Result<i64, ApiError> {
    match query.limit {
        None => Ok(i64::from(DEFAULT_PAGE_SIZE)),
        Some(n) if (1..=MAX_PAGE_SIZE).contains(&n) => Ok(i64::from(n)),
        Some(_) => Err(ApiError::invalid(
            "limit",
            format!("must be from 1 to {MAX_PAGE_SIZE}"),
        )),
    }
}

/// A cursor for lists keyed by UUID: the hyphenated form this API issues, as the document
/// says (`format: uuid`); the other spellings `Uuid` parses (braced, simple, URN) are refused.
pub fn uuid_cursor(query: &PageQuery) -> Result<Option<uuid::Uuid>, ApiError> {
    query
        .cursor
        .as_deref()
        .map(|c| {
            c.parse::<uuid::Uuid>()
                .ok()
                .filter(|u| c.len() == 36 && u.hyphenated().to_string() == c.to_ascii_lowercase())
                .ok_or_else(|| ApiError::invalid("cursor", "not a cursor this API issued"))
        })
        .transpose()
}

/// The most digits a numeric cursor has (the document's `pattern`): every row id fits.
const MAX_CURSOR_DIGITS: usize = 18;

/// A cursor for lists keyed by a number: decimal digits only, as the document's pattern says
/// (`i64::from_str` would also take a sign).
pub fn i64_cursor(query: &PageQuery) -> Result<Option<i64>, ApiError> {
    query
        .cursor
        .as_deref()
        .map(|c| {
            Some(c)
                .filter(|c| {
                    (1..=MAX_CURSOR_DIGITS).contains(&c.len())
                        && c.bytes().all(|b| b.is_ascii_digit())
                })
                .and_then(|c| c.parse().ok())
                .ok_or_else(|| ApiError::invalid("cursor", "not a cursor this API issued"))
        })
        .transpose()
}

/// Builds a page from `limit + 1` fetched rows.
pub fn page<T>(mut items: Vec<T>, limit: i64, key: impl Fn(&T) -> String) -> Page<T> {
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    let next_cursor = if items.len() > limit {
        items.truncate(limit);
        items.last().map(key)
    } else {
        None
    };
    Page { items, next_cursor }
}

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("kvf_<prefix>_<secret>")
                    .description(Some(
                        "Roles: admin, operator, viewer, agent, join. See the authorization matrix in docs.",
                    ))
                    .build(),
            ),
        );
    }
}

/// Every route that takes a token may answer 429: its lookup would spend a client address's
/// spent failed-authentication budget (`crate::auth_gate`). Added here once rather than on
/// each handler; routes with their own `security(())` (no token) are left alone.
struct RateLimited;

impl utoipa::Modify for RateLimited {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::{ContentBuilder, Header, ObjectBuilder, Ref, ResponseBuilder, Type};
        let mut retry_after = Header::new(ObjectBuilder::new().schema_type(Type::Integer));
        retry_after.description =
            Some("Seconds until a failed authentication is allowed again".into());
        let response = ResponseBuilder::new()
            .description(
                "Too many failed authentications from this client address; retry after \
                 Retry-After seconds",
            )
            .header("Retry-After", retry_after)
            .content(
                "application/problem+json",
                ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name("Problem")))
                    .build(),
            )
            .build();
        for item in openapi.paths.paths.values_mut() {
            for operation in [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
                &mut item.patch,
            ]
            .into_iter()
            .flatten()
            {
                if operation.security.is_none() {
                    operation
                        .responses
                        .responses
                        .entry("429".to_owned())
                        .or_insert_with(|| response.clone().into());
                }
            }
        }
    }
}

/// The OpenAPI document, generated from the handlers and wire types.
#[derive(OpenApi)]
#[openapi(
    info(title = "kvfleet control plane", description = "Fleet inventory, deployments, the SLA planner and performance profiles, agents. Errors are RFC 7807 problem JSON; lists page with limit (max 500) and cursor."),
    paths(
        admin::status, admin::ca,
        fleet::list_nodes, fleet::get_node, fleet::cordon_node, fleet::uncordon_node,
        fleet::drain_node, fleet::remove_node, fleet::approve_node, fleet::reject_node,
        fleet::label_node, fleet::list_gpus, fleet::get_gpu,
        fleet::list_workers, fleet::get_worker, fleet::worker_metrics, fleet::deployment_metrics,
        catalog::list_models, catalog::create_model, catalog::get_model, catalog::delete_model,
        catalog::list_deployments, catalog::create_deployment, catalog::get_deployment,
        catalog::update_deployment, catalog::delete_deployment,
        admin::list_tokens, admin::create_token, admin::revoke_token, admin::list_audit,
        session::whoami, decisions::list_decisions,
        planner::get_settings, planner::update_settings, planner::list_decisions,
        planner::deployment_series,
        profiles::upload, profiles::list, profiles::get, profiles::delete,
        agent::register, agent::heartbeat, agent::desired_state, agent::renew_certificate,
        agent::fleet_directory,
        kv::upload, kv::stream, kv::snapshot, kv::stats, kv::workers,
        responses::put, responses::get, responses::delete,
    ),
    components(schemas(problem::Problem, problem::InvalidParam)),
    modifiers(&BearerAuth, &RateLimited),
    security(("bearer" = [])),
)]
#[derive(Debug)]
pub struct ApiDoc;

#[cfg(test)]
mod tests {
    use super::*;

    fn refs(value: &serde_json::Value, out: &mut Vec<String>) {
        match value {
            serde_json::Value::Object(map) => {
                for (key, v) in map {
                    match (key.as_str(), v.as_str()) {
                        ("$ref", Some(target)) => out.push(target.to_owned()),
                        _ => refs(v, out),
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter().for_each(|v| refs(v, out)),
            _ => {}
        }
    }

    /// Every operation says who may call it and documents what the shared layers answer:
    /// problem JSON for every error, 401/403 where a token is needed, the paging bounds.
    #[test]
    fn every_operation_has_roles_and_documented_errors() {
        let doc = document();
        let mut operations = 0;
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                operations += 1;
                let name = format!("{method} {path}");
                let roles = op[ROLES_EXTENSION].as_array().expect(&name);
                let public = op[PERMISSION_EXTENSION] == "public";
                assert_eq!(public, roles.is_empty(), "{name}");
                let responses = op["responses"].as_object().unwrap();
                if !public {
                    assert_eq!(op["security"][0]["bearer"], op[ROLES_EXTENSION], "{name}");
                    assert!(responses.contains_key("401") && responses.contains_key("403"));
                }
                for (status, response) in responses {
                    if status.starts_with('4') || status.starts_with('5') {
                        let content = response["content"].as_object().unwrap();
                        assert_eq!(
                            content.keys().collect::<Vec<_>>(),
                            ["application/problem+json"],
                            "{name} {status}"
                        );
                    }
                }
                for param in op["parameters"].as_array().into_iter().flatten() {
                    if param["name"] == "limit" && path != "/api/v1/agent/kv-stream" {
                        assert_eq!(param["schema"]["minimum"], 1, "{name}");
                        assert_eq!(param["schema"]["maximum"], MAX_PAGE_SIZE, "{name}");
                    }
                    if param["name"] == "cursor" {
                        let schema = &param["schema"];
                        assert!(
                            schema["format"] == "uuid" || schema["pattern"].is_string(),
                            "{name}: {schema}"
                        );
                    }
                }
            }
        }
        assert!(operations >= 47, "{operations}");
        // Only the two public routes take no token.
        let public: Vec<&str> = ["/api/v1/status", "/api/v1/ca"].to_vec();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for op in item.as_object().unwrap().values() {
                assert_eq!(
                    op[PERMISSION_EXTENSION] == "public",
                    public.contains(&path.as_str()),
                    "{path}"
                );
            }
        }
    }

    /// Cursors are taken only in the form the API issues (what the document's pattern or
    /// format says).
    #[test]
    fn cursors_are_strict() {
        let q = |c: &str| PageQuery {
            limit: None,
            cursor: Some(c.to_owned()),
        };
        assert_eq!(i64_cursor(&q("42")).unwrap(), Some(42));
        for bad in ["-1", "+1", "", "1e3", "9999999999999999999"] {
            assert!(i64_cursor(&q(bad)).is_err(), "{bad}");
        }
        let id = uuid::Uuid::new_v4();
        assert_eq!(uuid_cursor(&q(&id.to_string())).unwrap(), Some(id));
        for bad in [
            id.simple().to_string(),
            id.braced().to_string(),
            id.urn().to_string(),
            "x".to_owned(),
        ] {
            assert!(uuid_cursor(&q(&bad)).is_err(), "{bad}");
        }
    }

    /// Every `$ref` in the document points at a schema the document defines.
    #[test]
    fn openapi_has_no_dangling_references() {
        let doc = document().clone();
        let schemas = doc["components"]["schemas"].as_object().unwrap();
        let mut found = Vec::new();
        refs(&doc, &mut found);
        assert!(found.len() > 20, "{found:?}");
        for target in found {
            let name = target
                .strip_prefix("#/components/schemas/")
                .unwrap_or(&target);
            assert!(schemas.contains_key(name), "dangling {target}");
        }
        // Every `{param}` in a path is declared by each of its operations.
        for (path, item) in doc["paths"].as_object().unwrap() {
            let wanted: Vec<&str> = path
                .split('{')
                .skip(1)
                .filter_map(|rest| rest.split('}').next())
                .collect();
            for (method, operation) in item.as_object().unwrap() {
                let declared: Vec<&str> = operation["parameters"]
                    .as_array()
                    .map(|ps| {
                        ps.iter()
                            .filter(|p| p["in"] == "path")
                            .filter_map(|p| p["name"].as_str())
                            .collect()
                    })
                    .unwrap_or_default();
                assert_eq!(declared, wanted, "{method} {path}");
            }
        }
    }
}
