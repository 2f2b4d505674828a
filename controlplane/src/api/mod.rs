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
use crate::telemetry::{LatencyFamily, Registry, latency_family};
use problem::{ApiError, DatabaseFailed};
use types::{Page, PageQuery};

/// The largest `limit` a list accepts.
pub const MAX_PAGE_SIZE: u32 = 500;
/// The `limit` when none is given.
pub const DEFAULT_PAGE_SIZE: u32 = 100;
/// Request bodies above this are refused (413): inventories and heartbeats are small.
pub const MAX_BODY_BYTES: usize = 1 << 20;

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

async fn openapi_json() -> axum::Json<utoipa::openapi::OpenApi> {
    axum::Json(ApiDoc::openapi())
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

/// A cursor for lists keyed by UUID.
pub fn uuid_cursor(query: &PageQuery) -> Result<Option<uuid::Uuid>, ApiError> {
    query
        .cursor
        .as_deref()
        .map(|c| {
            c.parse()
                .map_err(|_| ApiError::invalid("cursor", "not a cursor this API issued"))
        })
        .transpose()
}

/// A cursor for lists keyed by a number.
pub fn i64_cursor(query: &PageQuery) -> Result<Option<i64>, ApiError> {
    query
        .cursor
        .as_deref()
        .map(|c| {
            c.parse()
                .map_err(|_| ApiError::invalid("cursor", "not a cursor this API issued"))
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
    ),
    components(schemas(problem::Problem, problem::InvalidParam)),
    modifiers(&BearerAuth),
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

    /// Every `$ref` in the document points at a schema the document defines.
    #[test]
    fn openapi_has_no_dangling_references() {
        let doc = serde_json::to_value(ApiDoc::openapi()).unwrap();
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
