//! The OpenAI-compatible HTTP frontend every node runs (axum).
//!
//! A request goes: authenticate → read the body (bounded) → parse and validate ([`api`]) →
//! look the model up ([`models`]: its tokenizer, chat template and limits) → chat template and
//! tokenize → block hashes (`kvfleet_proto::hash`) → admission
//! ([`admission`]: bounded queue) → a worker ([`Backend`]) → detokenize and cut at stop strings
//! → JSON or SSE. Every failure on the way is an OpenAI error body with the status [`api`]
//! documents. A client that disconnects drops its response stream, which drops the
//! [`crate::backend::Generation`], which cancels the sequence in the worker.
//!
//! Routes: `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models`, `/health`
//! (the process is up), `/ready` (workers can serve and the node is not draining), `/metrics`.
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
pub mod metrics;
pub mod models;
pub mod text;

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures_util::StreamExt;
use kvfleet_proto::SamplingParams;
use kvfleet_proto::hash::sequence_hashes;
use serde_json::json;
use tracing::Instrument;

use self::admission::{Admission, Gauges, Slot};
use self::api::{
    ApiError, ChatCompletionRequest, CommonParams, CompletionRequest, FinishReason, ModelCard,
    PromptSpec, StopSpec, Usage,
};
use self::metrics::{FrontendMetrics, ModelRole, RequestLatencies};
use self::models::{ModelRegistry, ServedModel, TextCodec};
use self::text::{StopMatcher, Utf8Stream};
use crate::backend::{
    self, Backend, GenEvent, GenerateRequest, Generation, TokenLogprob, WorkerState,
};
use crate::metrics::Registry;

/// The OpenAI frontend's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct FrontendConfig {
    /// Address to listen on (`0.0.0.0:8000`; port 0 picks a free port, for tests).
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
    /// Bearer tokens accepted on `/v1/*`; empty means no authentication.
    pub api_keys: Vec<String>,
}

impl Default for FrontendConfig {
    fn default() -> Self {
        Self {
            listen: std::net::SocketAddr::from(([0, 0, 0, 0], 8000)),
            max_body_bytes: 4 * 1024 * 1024,
            max_in_flight: 256,
            queue_capacity: 1024,
            queue_timeout: Duration::from_secs(30),
            retry_after: Duration::from_secs(1),
            api_keys: Vec::new(),
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
    /// The agent's metrics, every module's, served on `/metrics`.
    registry: Arc<Registry>,
    admission: Admission,
    draining: AtomicBool,
    next_id: AtomicU64,
    id_prefix: u64,
    started: u64,
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
            registry: Arc::new(registry),
            admission,
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

    fn check_auth(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        if self.config.api_keys.is_empty() {
            return Ok(());
        }
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        match given {
            Some(key)
                if self
                    .config
                    .api_keys
                    .iter()
                    .any(|k| constant_time_eq(k, key)) =>
            {
                Ok(())
            }
            _ => Err(ApiError::unauthorized()),
        }
    }

    fn model(&self, name: &str) -> Result<Arc<ServedModel>, ApiError> {
        self.models.get(name).ok_or_else(|| {
            let names = self.models.names();
            let known: Vec<&str> = names.iter().map(String::as_str).collect();
            ApiError::model_not_found(name, &known)
        })
    }
}

fn constant_time_eq(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// The axum router over a frontend.
pub fn router(frontend: Arc<Frontend>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .fallback(|request: Request| async move {
            ApiError::unknown_url(request.uri().path()).into_response()
        })
        .method_not_allowed_fallback(|| async { ApiError::method_not_allowed().into_response() })
        .with_state(frontend)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Chat,
    Completion,
}

impl Endpoint {
    fn label(self) -> &'static str {
        match self {
            Endpoint::Chat => "chat_completions",
            Endpoint::Completion => "completions",
        }
    }
}

/// A request that passed every check.
#[derive(Debug)]
struct Prepared {
    endpoint: Endpoint,
    id: String,
    model: String,
    text: Arc<dyn TextCodec>,
    /// Alternatives per token when logprobs were asked for (`Some(0)`: the token's own only).
    logprobs: Option<u32>,
    prompt: Vec<u32>,
    block_size: kvfleet_proto::BlockSize,
    sampling: SamplingParams,
    stops: Vec<String>,
    stream: bool,
    include_usage: bool,
    created: u64,
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
        frontend.check_auth(&headers)?;
        let limit = frontend.config.max_body_bytes;
        let declared = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|len| len > limit as u64) {
            return Err(ApiError::too_large(limit));
        }
        let bytes = read_body(body, limit).await?;
        let prepared = prepare(&frontend, endpoint, id.clone(), &bytes)?;
        if frontend.is_draining() {
            return Err(draining(&frontend));
        }
        let admitting = Instant::now();
        let slot = frontend.admission.admit().await?;
        let queued = admitting.elapsed();
        let request = GenerateRequest {
            request_id: prepared.id.clone(),
            model: prepared.model.clone(),
            block_hashes: sequence_hashes(&prepared.prompt, prepared.block_size),
            prompt: prepared.prompt.clone(),
            sampling: prepared.sampling.clone(),
            worker: None,
        };
        let generation = frontend.backend.submit(request).map_err(|e| {
            ApiError::unavailable("no_ready_worker", e.to_string(), frontend.config.retry_after)
        })?;
        tracing::debug!(worker = %generation.worker, prompt_tokens = prepared.prompt.len(), "submitted");
        frontend
            .metrics
            .tokens_in
            .inc_by(prepared.prompt.len() as u64);
        let run = Run::new(frontend.clone(), prepared, generation, slot, start, queued);
        if run.prepared.stream {
            Ok(run.into_sse())
        } else {
            run.collect().await
        }
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

fn draining(frontend: &Frontend) -> ApiError {
    ApiError::unavailable(
        "draining",
        "this node is draining and takes no new requests",
        frontend.config.retry_after,
    )
}

async fn read_body(body: Body, limit: usize) -> Result<Vec<u8>, ApiError> {
    let mut stream = body.into_data_stream();
    let mut bytes = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| {
            ApiError::bad_request("invalid_body", format!("reading the request body: {e}"))
        })?;
        if bytes.len() + chunk.len() > limit {
            return Err(ApiError::too_large(limit));
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(bytes)
}

const CHAT_ROLES: &[&str] = &["system", "developer", "user", "assistant", "tool"];

fn prepare(
    frontend: &Frontend,
    endpoint: Endpoint,
    id: String,
    bytes: &[u8],
) -> Result<Prepared, ApiError> {
    let value = api::parse_json(bytes)?;
    let common: CommonParams;
    let (model, prompt, logprobs, default_max) = match endpoint {
        Endpoint::Chat => {
            let request: ChatCompletionRequest = api::typed(&value)?;
            common = api::typed(&value)?;
            let model = frontend.model(&request.model)?;
            let logprobs = match (request.logprobs, request.top_logprobs) {
                (Some(true), top) => Some(top.unwrap_or(0)),
                (_, Some(_)) => {
                    return Err(ApiError::invalid_value(
                        "top_logprobs",
                        "top_logprobs needs logprobs: true",
                    ));
                }
                _ => None,
            };
            if request.messages.is_empty() {
                return Err(ApiError::invalid_value(
                    "messages",
                    "messages must contain at least one message",
                ));
            }
            let mut texts = Vec::with_capacity(request.messages.len());
            for (i, message) in request.messages.iter().enumerate() {
                if !CHAT_ROLES.contains(&message.role.as_str()) {
                    return Err(ApiError::invalid_value(
                        &format!("messages[{i}].role"),
                        format!(
                            "role {:?} is unknown: expected one of {CHAT_ROLES:?}",
                            message.role
                        ),
                    ));
                }
                texts.push((message.role.as_str(), api::message_text(message, i)?));
            }
            let pairs: Vec<(&str, &str)> = texts.iter().map(|(r, t)| (*r, t.as_ref())).collect();
            let prompt = model.text.chat(&pairs).map_err(|e| {
                ApiError::invalid_value(
                    "messages",
                    format!("the model's chat template refused these messages: {e}"),
                )
            })?;
            (model, prompt, logprobs, None)
        }
        Endpoint::Completion => {
            let request: CompletionRequest = api::typed(&value)?;
            common = api::typed(&value)?;
            let model = frontend.model(&request.model)?;
            if request.echo == Some(true) {
                return Err(ApiError::invalid_value("echo", "echo is not supported"));
            }
            let encode = |text: &str| {
                model.text.encode(text).map_err(|e| {
                    ApiError::invalid_value("prompt", format!("tokenizing the prompt: {e}"))
                })
            };
            let prompt = match &request.prompt {
                PromptSpec::Text(text) => encode(text)?,
                PromptSpec::Texts(texts) if texts.len() == 1 => encode(&texts[0])?,
                PromptSpec::Texts(texts) => {
                    return Err(ApiError::invalid_value(
                        "prompt",
                        format!(
                            "{} prompts were given: this server takes one prompt per request",
                            texts.len()
                        ),
                    ));
                }
                PromptSpec::Tokens(tokens) => {
                    let vocab = model.text.vocab_size();
                    if let Some(bad) = tokens.iter().find(|t| **t >= vocab) {
                        return Err(ApiError::invalid_value(
                            "prompt",
                            format!("token id {bad} is outside the vocabulary (size {vocab})"),
                        ));
                    }
                    tokens.clone()
                }
            };
            // OpenAI's legacy completions default.
            (model, prompt, request.logprobs, Some(16))
        }
    };
    if let Some(n) = logprobs
        && n > SamplingParams::MAX_LOGPROBS
    {
        let param = match endpoint {
            Endpoint::Chat => "top_logprobs",
            Endpoint::Completion => "logprobs",
        };
        return Err(ApiError::invalid_value(
            param,
            format!(
                "{param} = {n} is out of range: expected 0 to {}",
                SamplingParams::MAX_LOGPROBS
            ),
        ));
    }
    let prompt_param = match endpoint {
        Endpoint::Chat => "messages",
        Endpoint::Completion => "prompt",
    };
    if prompt.is_empty() {
        return Err(ApiError::invalid_value(prompt_param, "the prompt is empty"));
    }
    let context = model.context_length as usize;
    if prompt.len() >= context {
        return Err(ApiError::bad_request(
            "context_length_exceeded",
            format!(
                "the prompt is {} tokens; the model's context is {context} tokens and at least \
                 one must remain for the completion",
                prompt.len()
            ),
        )
        .with_param(prompt_param));
    }
    let room = (context - prompt.len()) as u32;
    let mut checked = check_common(&common, room, default_max)?;
    checked.sampling.logprobs = logprobs;
    Ok(Prepared {
        endpoint,
        id,
        model: model.config.name.clone(),
        text: model.text.clone(),
        logprobs,
        prompt,
        block_size: model.block_size,
        sampling: checked.sampling,
        stops: checked.stops,
        stream: checked.stream,
        include_usage: checked.include_usage,
        created: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(frontend.started),
    })
}

struct Checked {
    sampling: SamplingParams,
    stops: Vec<String>,
    stream: bool,
    include_usage: bool,
}

/// Validates the fields both endpoints share; `room` is the context left after the prompt.
fn check_common(
    common: &CommonParams,
    room: u32,
    default_max: Option<u32>,
) -> Result<Checked, ApiError> {
    if let Some(n) = common.n
        && n != 1
    {
        return Err(ApiError::invalid_value(
            "n",
            format!("n = {n} is not supported: this server returns exactly one choice (n = 1)"),
        ));
    }
    let (param, asked) = match (common.max_completion_tokens, common.max_tokens) {
        (Some(v), _) => ("max_completion_tokens", Some(v)),
        (None, Some(v)) => ("max_tokens", Some(v)),
        (None, None) => ("max_tokens", None),
    };
    let max_tokens = match asked {
        Some(v) if v <= 0 => {
            return Err(ApiError::invalid_value(
                param,
                format!("{param} = {v} must be at least 1"),
            ));
        }
        Some(v) if v > i64::from(room) => {
            return Err(ApiError::bad_request(
                "context_length_exceeded",
                format!(
                    "{param} = {v} does not fit: the prompt leaves {room} tokens of the model's \
                     context"
                ),
            )
            .with_param(param));
        }
        Some(v) => v as u32,
        None => default_max.map_or(room, |d| d.min(room)),
    };
    let temperature = common.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid_value(
            "temperature",
            format!("temperature = {temperature} is out of range: expected 0 to 2"),
        ));
    }
    let top_p = common.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid_value(
            "top_p",
            format!("top_p = {top_p} is out of range: expected more than 0 and at most 1"),
        ));
    }
    let stops = match &common.stop {
        None => Vec::new(),
        Some(StopSpec::One(s)) => vec![s.clone()],
        Some(StopSpec::Many(list)) => list.clone(),
    };
    if stops.len() > 4 {
        return Err(ApiError::invalid_value(
            "stop",
            format!("{} stop sequences were given: at most 4", stops.len()),
        ));
    }
    if stops.iter().any(String::is_empty) {
        return Err(ApiError::invalid_value("stop", "a stop sequence is empty"));
    }
    let stream = common.stream.unwrap_or(false);
    if common.stream_options.is_some() && !stream {
        return Err(ApiError::invalid_value(
            "stream_options",
            "stream_options is only allowed when stream is true",
        ));
    }
    let sampling = SamplingParams {
        temperature: temperature as f32,
        top_p: top_p as f32,
        top_k: 0,
        seed: common.seed,
        max_tokens,
        stop_token_ids: Vec::new(),
        ignore_eos: common.ignore_eos,
        logprobs: None,
    };
    sampling
        .validate()
        .map_err(|e| ApiError::invalid_value(e.field, e.to_string()))?;
    Ok(Checked {
        sampling,
        stops,
        stream,
        include_usage: common
            .stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage),
    })
}

/// Turns token ids into text: bytes → whole characters → cut at stop strings.
#[derive(Debug)]
struct Assembler {
    text: Arc<dyn TextCodec>,
    utf8: Utf8Stream,
    stop: StopMatcher,
    completion_tokens: u32,
    stopped: bool,
}

impl Assembler {
    fn push(&mut self, tokens: &[u32]) -> String {
        if self.stopped {
            return String::new();
        }
        self.completion_tokens += tokens.len() as u32;
        let mut bytes = Vec::new();
        for token in tokens {
            bytes.extend_from_slice(self.text.token_bytes(*token));
        }
        let text = self.utf8.push(&bytes);
        let step = self.stop.push(&text);
        self.stopped = step.stopped;
        step.emit
    }

    fn finish(&mut self) -> String {
        if self.stopped {
            return String::new();
        }
        let tail = self.utf8.finish();
        let mut out = self.stop.push(&tail);
        self.stopped = out.stopped;
        if !out.stopped {
            out.emit.push_str(&self.stop.finish());
        }
        out.emit
    }
}

/// One admitted request from submission to its last byte.
struct Run {
    frontend: Arc<Frontend>,
    prepared: Prepared,
    generation: Generation,
    _slot: Slot,
    assembler: Assembler,
    start: Instant,
    /// How long it waited for admission.
    queued: Duration,
    last_token: Option<Instant>,
    /// Its histograms, once the first token named the role that produced it.
    latencies: Option<RequestLatencies>,
    finished: bool,
    /// Completions logprobs: bytes of text before the next token.
    text_offset: usize,
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Run")
            .field("id", &self.prepared.id)
            .finish()
    }
}

/// A generated token with its log-probabilities.
type Scored = TokenLogprob;

/// What the next generation event meant.
enum Step {
    /// New text (possibly empty: held back) and, when asked for, the tokens' logprobs.
    Text(String, Vec<Scored>),
    Done(FinishReason),
    Failed(String),
}

impl Run {
    fn new(
        frontend: Arc<Frontend>,
        prepared: Prepared,
        generation: Generation,
        slot: Slot,
        start: Instant,
        queued: Duration,
    ) -> Self {
        let assembler = Assembler {
            text: prepared.text.clone(),
            utf8: Utf8Stream::default(),
            stop: StopMatcher::new(prepared.stops.clone()),
            completion_tokens: 0,
            stopped: false,
        };
        Self {
            frontend,
            prepared,
            generation,
            _slot: slot,
            assembler,
            start,
            queued,
            last_token: None,
            latencies: None,
            finished: false,
            text_offset: 0,
        }
    }

    /// Waits for the next event from the worker.
    async fn step(&mut self) -> Step {
        let event = self.generation.next().await;
        let now = Instant::now();
        match event {
            Some(GenEvent::Tokens(chunk)) => {
                match (self.last_token, &self.latencies) {
                    (Some(last), Some(latencies)) => latencies.inter_token(now - last),
                    _ => {
                        let labels = self.labels();
                        let metrics = &self.frontend.metrics;
                        metrics.first_token(&labels, now - self.start, self.queued);
                        self.latencies = Some(metrics.for_request(&labels));
                    }
                }
                self.last_token = Some(now);
                self.frontend
                    .metrics
                    .tokens_out
                    .inc_by(chunk.tokens.len() as u64);
                let text = self.assembler.push(&chunk.tokens);
                if self.assembler.stopped {
                    // A stop string ended it; dropping the generation cancels the rest.
                    self.finish_ok();
                }
                let scored = match (self.prepared.logprobs, chunk.logprobs) {
                    (Some(_), Some(lps)) => lps,
                    _ => Vec::new(),
                };
                Step::Text(text, scored)
            }
            Some(GenEvent::Finished(reason)) => {
                self.finish_ok();
                Step::Done(match reason {
                    backend::FinishReason::Length => FinishReason::Length,
                    backend::FinishReason::Stop => FinishReason::Stop,
                })
            }
            Some(GenEvent::Failed(message)) => {
                self.finished = true;
                Step::Failed(message)
            }
            None => {
                self.finished = true;
                Step::Failed(format!(
                    "worker {} went away during the request",
                    self.generation.worker
                ))
            }
        }
    }

    /// The request's `{model, role}`: the role of the worker its first token came from.
    fn labels(&self) -> ModelRole {
        ModelRole::new(&self.prepared.model, self.generation.role())
    }

    fn finish_ok(&mut self) {
        if !self.finished {
            self.finished = true;
            let latencies = match self.latencies.take() {
                Some(latencies) => latencies,
                None => self.frontend.metrics.for_request(&self.labels()),
            };
            latencies.end_to_end(self.start.elapsed());
        }
    }

    fn usage(&self) -> Usage {
        Usage::new(
            self.prepared.prompt.len() as u32,
            self.assembler.completion_tokens,
        )
    }

    fn object(&self, chunk: bool) -> &'static str {
        match (self.prepared.endpoint, chunk) {
            (Endpoint::Chat, false) => "chat.completion",
            (Endpoint::Chat, true) => "chat.completion.chunk",
            (Endpoint::Completion, _) => "text_completion",
        }
    }

    fn response_id(&self) -> String {
        match self.prepared.endpoint {
            Endpoint::Chat => format!("chatcmpl-{}", self.prepared.id),
            Endpoint::Completion => format!("cmpl-{}", self.prepared.id),
        }
    }

    /// The `logprobs` object of a choice or chunk for `scored` tokens, in the endpoint's
    /// format; `null` when the request did not ask.
    fn logprobs_json(&mut self, scored: &[Scored]) -> serde_json::Value {
        if self.prepared.logprobs.is_none() {
            return serde_json::Value::Null;
        }
        let text = self.prepared.text.clone();
        let token_text = |t: u32| String::from_utf8_lossy(text.token_bytes(t)).into_owned();
        match self.prepared.endpoint {
            Endpoint::Chat => {
                let content: Vec<serde_json::Value> = scored
                    .iter()
                    .map(|lp| {
                        let top: Vec<serde_json::Value> = lp
                            .top
                            .iter()
                            .map(|t| {
                                json!({"token": token_text(t.token), "logprob": t.logprob,
                                    "bytes": text.token_bytes(t.token)})
                            })
                            .collect();
                        json!({"token": token_text(lp.token), "logprob": lp.logprob,
                            "bytes": text.token_bytes(lp.token), "top_logprobs": top})
                    })
                    .collect();
                json!({"content": content})
            }
            Endpoint::Completion => {
                let mut offsets = Vec::with_capacity(scored.len());
                for lp in scored {
                    offsets.push(self.text_offset);
                    self.text_offset += token_text(lp.token).len();
                }
                let top: Vec<serde_json::Map<String, serde_json::Value>> = scored
                    .iter()
                    .map(|lp| {
                        lp.top
                            .iter()
                            .map(|t| (token_text(t.token), json!(t.logprob)))
                            .collect()
                    })
                    .collect();
                json!({
                    "tokens": scored.iter().map(|lp| token_text(lp.token)).collect::<Vec<_>>(),
                    "token_logprobs": scored.iter().map(|lp| lp.logprob).collect::<Vec<_>>(),
                    "top_logprobs": top,
                    "text_offset": offsets,
                })
            }
        }
    }

    /// Non-streaming: gathers the whole completion.
    async fn collect(mut self) -> Result<Response, ApiError> {
        let mut text = String::new();
        let mut all_scored = Vec::new();
        let reason = loop {
            match self.step().await {
                Step::Text(piece, scored) => {
                    text.push_str(&piece);
                    all_scored.extend(scored);
                    if self.assembler.stopped {
                        break FinishReason::Stop;
                    }
                }
                Step::Done(reason) => {
                    text.push_str(&self.assembler.finish());
                    break if self.assembler.stopped {
                        FinishReason::Stop
                    } else {
                        reason
                    };
                }
                Step::Failed(message) => {
                    tracing::warn!(%message, "generation failed");
                    return Err(ApiError::worker_failed(message));
                }
            }
        };
        let usage = self.usage();
        let logprobs = self.logprobs_json(&all_scored);
        let choice = match self.prepared.endpoint {
            Endpoint::Chat => json!({"index": 0, "message": {"role": "assistant", "content": text},
                "logprobs": logprobs, "finish_reason": reason}),
            Endpoint::Completion => {
                json!({"index": 0, "text": text, "logprobs": logprobs, "finish_reason": reason})
            }
        };
        let body = json!({"id": self.response_id(), "object": self.object(false),
            "created": self.prepared.created, "model": self.prepared.model,
            "choices": [choice], "usage": usage});
        self.frontend
            .metrics
            .request(self.prepared.endpoint.label(), 200);
        tracing::info!(completion_tokens = usage.completion_tokens, finish = ?reason, "completed");
        Ok((
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            body.to_string(),
        )
            .into_response())
    }

    fn chunk(
        &mut self,
        delta: Option<&str>,
        reason: Option<FinishReason>,
        scored: &[Scored],
    ) -> Event {
        let logprobs = if scored.is_empty() {
            serde_json::Value::Null
        } else {
            self.logprobs_json(scored)
        };
        let choice = match self.prepared.endpoint {
            Endpoint::Chat => {
                let delta = match delta {
                    Some(text) => json!({"content": text}),
                    None => json!({}),
                };
                json!({"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": reason})
            }
            Endpoint::Completion => json!({"index": 0, "text": delta.unwrap_or(""),
                "logprobs": logprobs, "finish_reason": reason}),
        };
        let body = json!({"id": self.response_id(), "object": self.object(true),
            "created": self.prepared.created, "model": self.prepared.model,
            "choices": [choice]});
        Event::default().data(body.to_string())
    }

    fn into_sse(self) -> Response {
        self.frontend
            .metrics
            .request(self.prepared.endpoint.label(), 200);
        let mut first = VecDeque::new();
        if self.prepared.endpoint == Endpoint::Chat {
            let body = json!({"id": self.response_id(), "object": self.object(true),
                "created": self.prepared.created, "model": self.prepared.model,
                "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                    "logprobs": null, "finish_reason": null}]});
            first.push_back(Event::default().data(body.to_string()));
        }
        let streamer = Streamer {
            run: self,
            out: first,
            done: false,
        };
        let stream = futures_util::stream::unfold(streamer, |mut s| async move {
            s.next().await.map(|event| (Ok::<_, Infallible>(event), s))
        });
        Sse::new(stream).into_response()
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        if !self.finished {
            self.frontend.metrics.cancelled.inc();
            tracing::info!(request_id = %self.prepared.id, "client went away: generation cancelled");
        }
    }
}

struct Streamer {
    run: Run,
    out: VecDeque<Event>,
    done: bool,
}

impl Streamer {
    async fn next(&mut self) -> Option<Event> {
        loop {
            if let Some(event) = self.out.pop_front() {
                return Some(event);
            }
            if self.done {
                return None;
            }
            match self.run.step().await {
                Step::Text(text, scored) => {
                    if !text.is_empty() || !scored.is_empty() {
                        let event = self.run.chunk(Some(&text), None, &scored);
                        self.out.push_back(event);
                    }
                    if self.run.assembler.stopped {
                        self.end(FinishReason::Stop);
                    }
                }
                Step::Done(reason) => {
                    let tail = self.run.assembler.finish();
                    if !tail.is_empty() {
                        let event = self.run.chunk(Some(&tail), None, &[]);
                        self.out.push_back(event);
                    }
                    let reason = if self.run.assembler.stopped {
                        FinishReason::Stop
                    } else {
                        reason
                    };
                    self.end(reason);
                }
                Step::Failed(message) => {
                    tracing::warn!(request_id = %self.run.prepared.id, %message, "generation failed mid-stream");
                    let error = ApiError::worker_failed(message);
                    self.out.push_back(Event::default().data(error.body()));
                    self.done = true;
                }
            }
        }
    }

    fn end(&mut self, reason: FinishReason) {
        let event = self.run.chunk(None, Some(reason), &[]);
        self.out.push_back(event);
        if self.run.prepared.include_usage {
            let body = json!({"id": self.run.response_id(), "object": self.run.object(true),
                "created": self.run.prepared.created, "model": self.run.prepared.model,
                "choices": [], "usage": self.run.usage()});
            self.out.push_back(Event::default().data(body.to_string()));
        }
        self.out.push_back(Event::default().data("[DONE]"));
        self.done = true;
        tracing::info!(request_id = %self.run.prepared.id,
            completion_tokens = self.run.assembler.completion_tokens, finish = ?reason, "streamed");
    }
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
    use axum::serve::ListenerExt;
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY on an accepted connection");
        }
    });
    axum::serve(listener, router(frontend))
        .with_graceful_shutdown(shutdown)
        .await
}
