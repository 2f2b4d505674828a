//! The OpenAI-compatible HTTP frontend every node runs (axum).
//!
//! A request goes: authenticate → its key's rate limit ([`ratelimit`]) → `Content-Type` must be
//! JSON → read the body (bounded in size and time) → admission
//! ([`admission`]: bounded queue; before any tokenization, so a flood waits or gets 429 instead
//! of costing CPU) → on the blocking pool: parse and validate ([`api`]) → look the model up
//! ([`models`]: its tokenizer, chat template and limits) → chat template and tokenize → block
//! hashes (`kvfleet_proto::hash`) → a worker ([`Backend`]) → detokenize and cut at stop strings
//! → JSON or SSE. Every failure on the way is an OpenAI error body with the status [`api`]
//! documents. A client that disconnects drops its response stream, which drops the
//! [`crate::backend::Generation`], which cancels the sequence in the worker.
//!
//! The request's way is split in two: [`prepare`] (body → validated, tokenized request; no
//! worker or capacity involved) and [`run`] (admission, the worker, the response as JSON or
//! SSE). This module holds the shared [`Frontend`] and the routes.
//!
//! Routes: `POST /v1/chat/completions`, `POST /v1/completions`, `POST /v1/responses` with
//! `GET`/`DELETE /v1/responses/{id}` ([`responses`], stored in [`response_store`]),
//! `GET /v1/models`, `/health`
//! (the process is up), `/ready` (workers can serve and the node is not draining), `/metrics`.
//! With `metrics_listen` set, `/metrics` and `/ready` are served only there ([`serve_metrics`]).
//!
//! Logprobs: `logprobs`/`top_logprobs` (chat) and `logprobs: N` (completions, N ≤ 20) are
//! served from what the engine sampled with. A native model gives the real log-probabilities
//! under the model's unmodified distribution; the mock engine gives synthetic ones (0.0 for
//! every token, no alternatives), documented as such in `docs/`.
//!
//! Accepted sockets get `TCP_NODELAY`: SSE writes are small, and Nagle's algorithm held each
//! one back until the client's delayed ACK (~40 ms per stream start).

pub mod admission;
pub mod api;
mod conn;
pub mod fields;
pub mod metrics;
pub mod models;
mod parsers;
mod prepare;
pub mod ratelimit;
pub mod response_store;
mod responses;
mod run;
mod structured;
pub mod text;
mod tools;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;
use tracing::Instrument;

use self::admission::{Admission, Gauges};
use self::api::{ApiError, ModelCard};
use self::metrics::FrontendMetrics;
use self::models::{ModelRegistry, ServedModel};
use self::prepare::Endpoint;
use crate::backend::{Backend, WorkerState};
use crate::metrics::Registry;

/// The OpenAI frontend's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct FrontendConfig {
    /// Address to listen on (`127.0.0.1:8000`; port 0 picks a free port, for tests). Any
    /// other than loopback needs `api_keys` or an explicit `allow_unauthenticated`.
    pub listen: std::net::SocketAddr,
    /// Largest request body accepted; larger bodies get 413.
    pub max_body_bytes: usize,
    /// Requests generating at once across the node's workers.
    pub max_in_flight: usize,
    /// Requests waiting for an in-flight slot. When full, new requests get 429 at once: the queue
    /// never grows without bound.
    pub queue_capacity: usize,
    /// How long a request may wait in the queue before it gets 503.
    pub queue_timeout: Duration,
    /// The `Retry-After` value sent with 429 and 503.
    pub retry_after: Duration,
    /// Bearer tokens accepted on `/v1/*`, kept hashed; empty means no authentication.
    pub api_keys: ApiKeys,
    /// Serve `/v1/*` without keys on a non-loopback address (config validation refuses that
    /// otherwise; the agent warns at every start).
    pub allow_unauthenticated: bool,
    /// Connections served at once; more wait in the listen backlog.
    pub max_connections: usize,
    /// How long a client may take to send a request's head.
    pub header_read_timeout: Duration,
    /// How long a client may take to send a request's body (then 408).
    pub body_read_timeout: Duration,
    /// The fraction (0 to 0.9) by which each connection's first-head deadline is randomly
    /// shortened, so attack connections opened together are not cut (and reopened) together.
    pub header_timeout_jitter: f64,
    /// Headerless connections (accepted, first request head not yet in) above which each new
    /// connection cuts up to two of the oldest ones older than
    /// `header_read_timeout_under_pressure` (0: never).
    pub headerless_pressure: usize,
    /// Under pressure, how old a headerless connection must be to be cut early.
    pub header_read_timeout_under_pressure: Duration,
    /// Headerless connections one client IP may hold; a new one cuts its oldest (0, the
    /// default: no limit). Against an attacker that reconnects at once it turns held
    /// connections into reconnect churn, which costs normal clients more (docs/benchmarks.md).
    pub max_headerless_per_ip: usize,
    /// Without API keys: each client IP's request rate limit (`None`: none).
    pub keyless_rate_limit: Option<ratelimit::RateLimit>,
    /// Client IPs whose buckets `keyless_rate_limit` keeps; new IPs beyond share one bucket.
    pub keyless_max_clients: usize,
    /// Every key's rate limit unless the key has its own; `None`: keys are not limited.
    pub rate_limit: Option<ratelimit::RateLimit>,
    /// Every key's tokens-per-minute limit unless the key has its own; `None`: no limit.
    pub tokens_per_minute: Option<u32>,
    /// Where `/metrics` and `/ready` are served instead of `listen` (`None`: on `listen`).
    pub metrics_listen: Option<std::net::SocketAddr>,
}

/// The frontend's API keys, stored as SHA-256 digests: the plain keys leave memory once the
/// config is parsed, and `Debug` (config dumps, logs) shows only how many there are. Each key
/// has a label for metrics (its configured `name`, else `key-N` by its position) and may have
/// its own rate limit.
#[derive(Clone, PartialEq, Default)]
pub struct ApiKeys(Vec<ApiKey>);

/// One accepted key.
#[derive(Clone, PartialEq)]
pub struct ApiKey {
    digest: [u8; 32],
    /// What metrics and logs call it: never the key.
    pub label: String,
    /// Its own limit (else `frontend.rate_limit`, else none).
    pub limit: Option<ratelimit::RateLimit>,
    /// Its own tokens-per-minute limit (else `frontend.rate_limit.tokens_per_minute`, else
    /// none).
    pub tokens_per_minute: Option<u32>,
}

impl ApiKeys {
    /// Hashes `keys`, labelled `key-0`, `key-1`, … by position.
    pub fn new<S: AsRef<str>>(keys: impl IntoIterator<Item = S>) -> Self {
        let mut all = Self::default();
        for key in keys {
            let label = format!("key-{}", all.0.len());
            all.push(key.as_ref(), label, None, None);
        }
        all
    }

    /// Adds `key` under `label`, with its own limits if any.
    pub fn push(
        &mut self,
        key: &str,
        label: String,
        limit: Option<ratelimit::RateLimit>,
        tokens_per_minute: Option<u32>,
    ) {
        self.0.push(ApiKey {
            digest: digest(key),
            label,
            limit,
            tokens_per_minute,
        });
    }

    /// Whether no key is configured (no authentication).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// How many keys.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// The keys, in order.
    pub fn entries(&self) -> impl Iterator<Item = &ApiKey> {
        self.0.iter()
    }

    /// Whether `key` is one of them.
    pub fn accepts(&self, key: &str) -> bool {
        self.find(key).is_some()
    }

    /// The position of `key` among them. Compares every digest without an early exit.
    pub fn find(&self, key: &str) -> Option<usize> {
        let given = digest(key);
        self.0.iter().enumerate().fold(None, |found, (i, k)| {
            let equal = k
                .digest
                .iter()
                .zip(&given)
                .fold(0u8, |acc, (x, y)| acc | (x ^ y))
                == 0;
            found.or(equal.then_some(i))
        })
    }
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiKeys({} hashed)", self.0.len())
    }
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiKey")
            .field("label", &self.label)
            .field("limit", &self.limit)
            .field("tokens_per_minute", &self.tokens_per_minute)
            .finish_non_exhaustive()
    }
}

fn digest(key: &str) -> [u8; 32] {
    use sha2::Digest as _;
    sha2::Sha256::digest(key.as_bytes()).into()
}

impl Default for FrontendConfig {
    fn default() -> Self {
        Self {
            listen: std::net::SocketAddr::from(([127, 0, 0, 1], 8000)),
            max_body_bytes: 4 * 1024 * 1024,
            max_in_flight: 256,
            queue_capacity: 1024,
            queue_timeout: Duration::from_secs(30),
            retry_after: Duration::from_secs(1),
            api_keys: ApiKeys::default(),
            allow_unauthenticated: false,
            max_connections: 10_000,
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(30),
            header_timeout_jitter: 0.5,
            headerless_pressure: 8000,
            header_read_timeout_under_pressure: Duration::from_secs(2),
            max_headerless_per_ip: 0,
            keyless_rate_limit: None,
            keyless_max_clients: 65_536,
            rate_limit: None,
            tokens_per_minute: None,
            metrics_listen: None,
        }
    }
}

/// Everything the handlers share.
#[derive(Debug)]
pub struct Frontend {
    /// Settings.
    pub config: FrontendConfig,
    /// Models served, with their tokenizers and chat templates; may change at runtime.
    pub models: Arc<ModelRegistry>,
    /// Where tokens come from.
    pub backend: Arc<dyn Backend>,
    /// What the frontend measures (registered in `registry`).
    pub metrics: FrontendMetrics,
    /// Responses kept for `previous_response_id` and `GET /v1/responses/{id}`; the
    /// control-plane client connects it to the control plane ([`response_store::ResponseStore::set_remote`]).
    pub responses: Arc<response_store::ResponseStore>,
    /// The agent's metrics, every module's, served on `/metrics`.
    registry: Arc<Registry>,
    /// The fleet's block hasher: a request's routing hashes are computed with it, salted with
    /// its `cache_salt` (`fleet_hash`).
    pub block_hasher: crate::fleet_hash::FleetHasher,
    admission: Admission,
    limiter: ratelimit::RateLimiter,
    /// Per client IP, when there are no API keys and `keyless_rate_limit` is set.
    keyless: Option<ratelimit::KeylessLimiter>,
    draining: AtomicBool,
    next_id: AtomicU64,
    id_prefix: u64,
    started: u64,
}

/// The API key a request presents (`Authorization: Bearer KEY`), if any.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
}

impl Frontend {
    /// A frontend serving the models in `models` over `backend`; it adds its own metrics to
    /// `registry` (which the other modules have registered into) and serves the whole.
    pub fn new(
        config: FrontendConfig,
        models: Arc<ModelRegistry>,
        backend: Arc<dyn Backend>,
        mut registry: Registry,
    ) -> Self {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let metrics = FrontendMetrics::register(&mut registry);
        let limiter = ratelimit::RateLimiter::new(
            &config.api_keys,
            config.rate_limit,
            config.tokens_per_minute,
            &mut registry,
        );
        let keyless = config
            .keyless_rate_limit
            .filter(|_| config.api_keys.is_empty())
            .map(|limit| {
                ratelimit::KeylessLimiter::new(limit, config.keyless_max_clients, &mut registry)
            });
        let admission = Admission::new(
            config.max_in_flight,
            config.queue_capacity,
            config.queue_timeout,
            config.retry_after,
            Gauges {
                in_flight: metrics.in_flight.clone(),
                queue_depth: metrics.queue_depth.clone(),
            },
        );
        Self {
            config,
            models,
            backend,
            metrics,
            responses: Arc::new(response_store::ResponseStore::default()),
            registry: Arc::new(registry),
            admission,
            limiter,
            keyless,
            block_hasher: Default::default(),
            draining: AtomicBool::new(false),
            next_id: AtomicU64::new(0),
            id_prefix: u64::from(now.subsec_nanos()) ^ (now.as_secs() << 20),
            started: now.as_secs(),
        }
    }

    /// Stop taking requests (SIGTERM): new ones get 503 `draining`, `/ready` says 503.
    pub fn drain(&self) {
        self.draining.store(true, Ordering::Release);
    }

    /// Take requests again.
    pub fn resume(&self) {
        self.draining.store(false, Ordering::Release);
    }

    /// Whether draining.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Takes an admission slot for a request another node forwarded here (held until its
    /// stream ends): the same bounded queue as this node's own clients, so forwarding cannot
    /// bypass a node's limits.
    pub async fn admit_forwarded(&self) -> Result<admission::Slot, ApiError> {
        run::admit(self).await.map(|(slot, _)| slot)
    }

    /// A slot for the prefill leg of a request another node admitted, only if one is free now
    /// (429 `queue_full` otherwise, and the asking node prefills on its decode worker). It does
    /// not queue: the asking node already holds a slot for the request, and a leg waiting in
    /// this queue while this node's own requests wait on prefill legs elsewhere could hold
    /// slots across nodes in a cycle until the queue timeout.
    pub fn admit_prefill_leg(&self) -> Result<admission::Slot, ApiError> {
        if self.is_draining() {
            return Err(ApiError::unavailable(
                "draining",
                "the server is shutting down",
                self.config.retry_after,
            ));
        }
        self.admission.try_admit()
    }

    /// Requests generating now.
    pub fn in_flight(&self) -> i64 {
        self.metrics.in_flight.get()
    }

    /// Whether every model has a ready worker and the node is not draining.
    pub fn is_ready(&self) -> bool {
        if self.is_draining() {
            return false;
        }
        let workers = self.backend.workers();
        let names = self.models.names();
        !names.is_empty()
            && names.iter().all(|name| {
                workers
                    .iter()
                    .any(|w| &w.model == name && w.state == WorkerState::Ready)
            })
    }

    fn request_id(&self, headers: &HeaderMap) -> String {
        let given = headers
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .filter(|v| {
                !v.is_empty()
                    && v.len() <= 128
                    && v.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
            });
        match given {
            Some(id) => id.to_owned(),
            None => {
                let n = self.next_id.fetch_add(1, Ordering::Relaxed);
                format!("{:012x}{n:08x}", self.id_prefix & 0xffff_ffff_ffff)
            }
        }
    }

    /// Authenticates the request (401 without a valid key), then takes a token from its key's
    /// rate limit (429 when it has none left). Returns the key's index (`None` without keys).
    fn check_auth(&self, headers: &HeaderMap) -> Result<Option<usize>, ApiError> {
        if self.config.api_keys.is_empty() {
            return Ok(None);
        }
        match bearer(headers).and_then(|key| self.config.api_keys.find(key)) {
            Some(index) => self.limiter.check(index).map(|()| Some(index)),
            None => Err(ApiError::unauthorized()),
        }
    }

    /// Who owns the responses this request stores and may read: a digest of its API key
    /// (call after [`Frontend::check_auth`]), or one anonymous owner without authentication.
    /// The digest is of the key's own SHA-256 under a domain prefix, so the stored value is
    /// neither the key nor the hash the frontend compares keys with.
    fn owner(&self, headers: &HeaderMap) -> String {
        use sha2::Digest as _;
        if self.config.api_keys.is_empty() {
            return "anonymous".to_owned();
        }
        let key = bearer(headers).unwrap_or("");
        let mut hasher = sha2::Sha256::new();
        hasher.update(b"kvfleet response owner\0");
        hasher.update(digest(key));
        hasher
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    fn model(&self, name: &str) -> Result<Arc<ServedModel>, ApiError> {
        self.models.get(name).ok_or_else(|| {
            let names = self.models.names();
            let known: Vec<&str> = names.iter().map(String::as_str).collect();
            ApiError::model_not_found(name, &known)
        })
    }
}

/// The axum router of the API port. `/metrics` and `/ready` are on it unless
/// `metrics_listen` moves them to [`metrics_router`]'s address (then they are 404 here).
pub fn router(frontend: Arc<Frontend>) -> Router {
    let api = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/responses", post(responses::create))
        .route(
            "/v1/responses/{id}",
            get(responses::retrieve).delete(responses::delete),
        )
        .route("/v1/models", get(models))
        // On the `/v1/*` routes above only: `/health` and `/metrics` are not limited.
        .route_layer(axum::middleware::from_fn_with_state(
            frontend.clone(),
            keyless_limit,
        ))
        .route("/health", get(health));
    let api = if frontend.config.metrics_listen.is_none() {
        api.route("/ready", get(ready))
            .route("/metrics", get(metrics))
    } else {
        api
    };
    api.fallback(|request: Request| async move {
        ApiError::unknown_url(request.uri().path()).into_response()
    })
    .method_not_allowed_fallback(|| async { ApiError::method_not_allowed().into_response() })
    .with_state(frontend)
}

/// Without API keys, each client IP's `keyless_rate_limit` (429 with `Retry-After` over it),
/// before the body is read. The address is the one `conn` puts on every request; a request
/// without one (a router driven directly, in tests) is not limited.
async fn keyless_limit(
    State(frontend): State<Arc<Frontend>>,
    request: Request,
    next: axum::middleware::Next,
) -> Response {
    if let Some(limiter) = &frontend.keyless
        && let Some(axum::extract::ConnectInfo(client)) =
            request
                .extensions()
                .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        && let Err(error) = limiter.check(client.ip())
    {
        return error.into_response();
    }
    next.run(request).await
}

/// The router of `metrics_listen`: `/metrics`, `/ready` and `/health`, nothing of the API.
pub fn metrics_router(frontend: Arc<Frontend>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .with_state(frontend)
}

async fn chat_completions(
    State(frontend): State<Arc<Frontend>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    handle(frontend, Endpoint::Chat, headers, body).await
}

async fn completions(
    State(frontend): State<Arc<Frontend>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    handle(frontend, Endpoint::Completion, headers, body).await
}

async fn handle(
    frontend: Arc<Frontend>,
    endpoint: Endpoint,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let start = Instant::now();
    let id = frontend.request_id(&headers);
    let span = tracing::info_span!("request", request_id = %id, endpoint = endpoint.label());
    let result = async {
        let key = frontend.check_auth(&headers)?;
        prepare::check_content_type(&headers)?;
        let limit = frontend.config.max_body_bytes;
        let bytes = tokio::time::timeout(
            frontend.config.body_read_timeout,
            prepare::read_body(&headers, body, limit),
        )
        .await
        .map_err(|_| ApiError::body_timeout(frontend.config.body_read_timeout))??;
        let admitted = run::admit(&frontend).await?;
        // Templating and tokenizing cost CPU in proportion to the prompt: off the async
        // threads, so a long prompt does not stall other connections.
        let prepared = {
            let (frontend, id, span) = (frontend.clone(), id.clone(), tracing::Span::current());
            tokio::task::spawn_blocking(move || {
                span.in_scope(|| prepare::prepare(&frontend, endpoint, id, &bytes))
            })
            .await
            .map_err(|e| ApiError::worker_failed(format!("preparing the request failed: {e}")))??
        };
        let tokens = run::reserve_tokens(&frontend, key, &prepared)?;
        run::execute(frontend.clone(), prepared, admitted, start, tokens).await
    }
    .instrument(span.clone())
    .await;
    let mut response = match result {
        Ok(response) => response,
        Err(error) => {
            span.in_scope(|| {
                tracing::info!(
                    status = error.status.as_u16(),
                    code = error.code,
                    "rejected"
                )
            });
            frontend
                .metrics
                .request(endpoint.label(), error.status.as_u16());
            error.into_response()
        }
    };
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert("x-request-id", value);
    }
    response
}

async fn models(State(frontend): State<Arc<Frontend>>, headers: HeaderMap) -> Response {
    if let Err(e) = frontend.check_auth(&headers) {
        return e.into_response();
    }
    let models = frontend.models.list();
    let data: Vec<ModelCard<'_>> = models
        .iter()
        .map(|m| ModelCard {
            id: m.name(),
            object: "model",
            created: frontend.started,
            owned_by: "kvfleet",
            max_model_len: m.context_length,
        })
        .collect();
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

async fn health() -> Response {
    axum::Json(json!({"status": "ok"})).into_response()
}

async fn ready(State(frontend): State<Arc<Frontend>>) -> Response {
    let workers = frontend.backend.workers();
    let ready = frontend.is_ready();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({"ready": ready, "draining": frontend.is_draining(), "workers": workers});
    (status, axum::Json(body)).into_response()
}

/// The agent's registry as Prometheus text. Encoded off the async threads: collectors read
/// state that may block (the GPU inventory asks the driver).
async fn metrics(State(frontend): State<Arc<Frontend>>) -> Response {
    let registry = frontend.registry.clone();
    match tokio::task::spawn_blocking(move || crate::metrics::encode(&registry)).await {
        Ok(body) => ([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], body).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "encoding the metrics panicked");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

/// Serves the frontend on `listener` until `shutdown` completes, then waits for in-flight
/// responses (the caller bounds that wait with its drain deadline).
pub async fn serve(
    frontend: Arc<Frontend>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let limits = conn::ConnLimits::of(&frontend.config);
    if frontend.config.api_keys.is_empty()
        && let Ok(addr) = listener.local_addr()
        && !addr.ip().is_loopback()
    {
        tracing::warn!(%addr, "the OpenAI API is served WITHOUT authentication on a non-loopback \
            address (frontend.allow_unauthenticated = true): anyone who can reach it can use it");
    }
    let cuts = frontend.metrics.headerless_cut.clone();
    conn::serve(listener, router(frontend), limits, &cuts, shutdown).await
}

/// A listener for the frontend (or its metrics address) on `addr`, with a listen backlog deep
/// enough for bursts of connections (4096; tokio's own `bind` gives 1024). Call it inside the
/// runtime.
pub fn bind(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    conn::bind(addr)
}

/// Serves [`metrics_router`] on `listener` (`frontend.metrics_listen`) until `shutdown`
/// completes, with the API port's connection cap and header timeout.
pub async fn serve_metrics(
    frontend: Arc<Frontend>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let limits = conn::ConnLimits::of(&frontend.config);
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "serving /metrics and /ready on their own address");
    }
    let cuts = frontend.metrics.headerless_cut.clone();
    conn::serve(listener, metrics_router(frontend), limits, &cuts, shutdown).await
}
