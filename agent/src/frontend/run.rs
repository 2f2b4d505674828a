//! Request execution: a [`Prepared`] request admitted, submitted to a worker, and its tokens
//! turned into the response as they arrive — one JSON body, or SSE events.
//!
//! Tokens go from the worker's [`Generation`] straight into the response stream: bytes →
//! whole characters → cut at stop strings ([`Assembler`]) → a chunk. There is no task or
//! channel of the frontend's own in between; dropping the response (a client that went away)
//! drops the generation, which cancels the sequence in the worker.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use axum::http::{StatusCode, header};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use serde_json::json;

use super::Frontend;
use super::admission::Slot;
use super::api::{ApiError, FinishReason, Usage};
use super::metrics::{ModelRole, RequestLatencies};
use super::models::TextCodec;
use super::parsers::{OutputParser, Piece};
use super::prepare::{Endpoint, Prepared};
use super::ratelimit::Reservation;
use super::text::{StopMatcher, Utf8Stream};
use crate::backend::{self, GenEvent, GenerateRequest, Generation, TokenLogprob};
use crate::worker::ReasoningParserKind;

/// Waits for an admission slot (the bounded queue). The frontend takes it *before* it
/// templates and tokenizes a request, so a flood queues or gets 429 instead of costing
/// tokenization each; returns the slot and how long it waited.
pub(super) async fn admit(frontend: &Frontend) -> Result<(Slot, Duration), ApiError> {
    if frontend.is_draining() {
        return Err(draining(frontend));
    }
    let admitting = Instant::now();
    let slot = frontend.admission.admit().await?;
    Ok((slot, admitting.elapsed()))
}

/// Reserves `prepared`'s worst case (its prompt plus `max_tokens` for each of its `n`
/// choices) from the tokens per minute of the API key at `key` (none without keys); the
/// request gives back what it did not use when it ends with its usage.
pub(super) fn reserve_tokens(
    frontend: &Frontend,
    key: Option<usize>,
    prepared: &Prepared,
) -> Result<Option<Reservation>, ApiError> {
    let cost = prepared.prompt.len() as u64
        + u64::from(prepared.sampling.max_tokens) * u64::from(prepared.n);
    frontend.limiter.reserve(key, cost)
}

/// Submits an admitted `prepared` (its `slot` from [`admit`], which waited `queued`) to a
/// worker and answers it: streamed when it asked to be, otherwise once the completion is
/// whole. `start` is when the request arrived.
pub(super) async fn execute(
    frontend: Arc<Frontend>,
    prepared: Prepared,
    (slot, queued): (Slot, Duration),
    start: Instant,
    mut tokens: Option<Reservation>,
) -> Result<Response, ApiError> {
    if frontend.is_draining() {
        return Err(draining(&frontend));
    }
    let choices = prepared.n;
    let mut first = submit(&frontend, &prepared, 0, None)?;
    if let Some(tokens) = tokens.as_mut() {
        tokens.started();
    }
    tracing::debug!(worker = %first.worker, prompt_tokens = prepared.prompt.len(), choices, "submitted");
    frontend
        .metrics
        .tokens_in
        .inc_by(prepared.prompt.len() as u64);
    let prepared = Arc::new(prepared);
    let mut runs = Vec::with_capacity(choices as usize);
    if choices == 1 {
        runs.push(Run::new(&frontend, &prepared, 0, first, start, queued));
    } else {
        // The other choices wait for the first one's first token: by then the prompt's full
        // blocks are in its worker's prefix cache, and the others, sent to the same worker (or
        // routed there by the fleet router, which counts the prompt as held by it), reuse them
        // instead of prefilling again.
        let event = first.next().await;
        let worker = first.worker;
        let mut run = Run::new(&frontend, &prepared, 0, first, start, queued);
        run.pending = Some(event);
        runs.push(run);
        for index in 1..choices {
            let generation = submit(&frontend, &prepared, index, Some(worker))?;
            runs.push(Run::new(
                &frontend, &prepared, index, generation, start, queued,
            ));
        }
    }
    let request = Request {
        frontend,
        prepared,
        _slot: slot,
        tokens,
    };
    if request.prepared.stream {
        Ok(into_sse(request, runs))
    } else {
        collect(request, runs).await
    }
}

/// Submits choice `index` of `prepared` (pinned to `worker` when given). A seeded request's
/// choice `i` samples with `seed + i`: the same seed gives the same choices on any worker, and
/// choice 0 is what `n = 1` gives.
fn submit(
    frontend: &Frontend,
    prepared: &Prepared,
    index: u32,
    worker: Option<kvfleet_proto::WorkerId>,
) -> Result<Generation, ApiError> {
    let mut sampling = prepared.sampling.clone();
    sampling.seed = sampling
        .seed
        .map(|seed| seed.wrapping_add(u64::from(index)));
    let request = GenerateRequest {
        request_id: if index == 0 {
            prepared.id.clone()
        } else {
            format!("{}-{index}", prepared.id)
        },
        model: prepared.model.clone(),
        block_hashes: sampling
            .hasher(&frontend.block_hasher.get())
            .sequence_hashes(&prepared.prompt, prepared.block_size),
        prompt: prepared.prompt.clone(),
        sampling,
        worker,
    };
    frontend.backend.submit(request).map_err(|e| {
        ApiError::unavailable(
            "no_ready_worker",
            e.to_string(),
            frontend.config.retry_after,
        )
    })
}

/// What the choices of one request share: the request and its admission slot (one per request,
/// whatever its `n`).
struct Request {
    frontend: Arc<Frontend>,
    prepared: Arc<Prepared>,
    _slot: Slot,
    /// Its key's tokens-per-minute reservation, settled with its usage at the end.
    tokens: Option<Reservation>,
}

impl Request {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.prepared.endpoint, chunk) {
            (Endpoint::Chat, false) => "chat.completion",
            (Endpoint::Chat, true) => "chat.completion.chunk",
            (Endpoint::Completion, _) => "text_completion",
        }
    }

    fn response_id(&self) -> String {
        response_id(&self.prepared)
    }

    /// Usage of the whole request: the prompt once, the completions of every choice.
    fn usage(&self, completion_tokens: u32) -> Usage {
        Usage::new(self.prepared.prompt.len() as u32, completion_tokens)
    }

    /// Charges the key's tokens per minute what the request used (the rest goes back).
    fn settle(&mut self, completion_tokens: u32) {
        if let Some(tokens) = self.tokens.as_mut() {
            tokens.settle(self.prepared.prompt.len() as u64 + u64::from(completion_tokens));
        }
    }
}

fn response_id(prepared: &Prepared) -> String {
    match prepared.endpoint {
        Endpoint::Chat => format!("chatcmpl-{}", prepared.id),
        Endpoint::Completion => format!("cmpl-{}", prepared.id),
    }
}

fn draining(frontend: &Frontend) -> ApiError {
    ApiError::unavailable(
        "draining",
        "this node is draining and takes no new requests",
        frontend.config.retry_after,
    )
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

/// One choice of an admitted request, from submission to its last byte.
struct Run {
    frontend: Arc<Frontend>,
    prepared: Arc<Prepared>,
    /// The choice's `index`.
    index: u32,
    generation: Generation,
    /// An event already taken from `generation` (the first choice's first, when `n > 1`).
    pending: Option<Option<GenEvent>>,
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
    /// The output parser (reasoning, tool calls), when the model separates reasoning or the
    /// request has active tools.
    parser: Option<OutputParser>,
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Run")
            .field("id", &self.prepared.id)
            .field("index", &self.index)
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
        frontend: &Arc<Frontend>,
        prepared: &Arc<Prepared>,
        index: u32,
        generation: Generation,
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
            frontend: frontend.clone(),
            prepared: prepared.clone(),
            index,
            generation,
            pending: None,
            assembler,
            start,
            queued,
            last_token: None,
            latencies: None,
            finished: false,
            text_offset: 0,
            parser: OutputParser::new(
                prepared.reasoning_parser,
                prepared.tool_calls.then(|| {
                    let prefix = if prepared.n > 1 {
                        format!("call_{}_{index}_", prepared.id)
                    } else {
                        format!("call_{}_", prepared.id)
                    };
                    (prepared.tool_parser, prefix)
                }),
            ),
        }
    }

    /// Text as reasoning, content and tool-call pieces (all content without a parser);
    /// `last`: the generation ended, so nothing more is held back.
    fn pieces(&mut self, text: &str, last: bool) -> Vec<Piece> {
        match &mut self.parser {
            None if text.is_empty() => Vec::new(),
            None => vec![Piece::Content(text.to_owned())],
            Some(parser) => {
                let mut pieces = parser.push(text);
                if last {
                    pieces.extend(parser.finish());
                }
                pieces
            }
        }
    }

    /// `tool_calls` when the model called a tool and ended on its own.
    fn finish_reason(&self, reason: FinishReason) -> FinishReason {
        match &self.parser {
            Some(parser) if parser.calls() > 0 && reason == FinishReason::Stop => {
                FinishReason::ToolCalls
            }
            _ => reason,
        }
    }

    /// Waits for the next event from the worker.
    async fn step(&mut self) -> Step {
        let event = match self.pending.take() {
            Some(event) => event,
            None => self.generation.next().await,
        };
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
            Some(GenEvent::Failed(message) | GenEvent::Lost(message)) => {
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

    fn object(&self, chunk: bool) -> &'static str {
        match (self.prepared.endpoint, chunk) {
            (Endpoint::Chat, false) => "chat.completion",
            (Endpoint::Chat, true) => "chat.completion.chunk",
            (Endpoint::Completion, _) => "text_completion",
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

    /// Non-streaming: gathers the whole choice, as its JSON object.
    async fn gather(&mut self) -> Result<serde_json::Value, ApiError> {
        let mut pieces = Vec::new();
        let mut all_scored = Vec::new();
        let reason = loop {
            match self.step().await {
                Step::Text(piece, scored) => {
                    let last = self.assembler.stopped;
                    pieces.extend(self.pieces(&piece, last));
                    all_scored.extend(scored);
                    if last {
                        break FinishReason::Stop;
                    }
                }
                Step::Done(reason) => {
                    let tail = self.assembler.finish();
                    pieces.extend(self.pieces(&tail, true));
                    break if self.assembler.stopped {
                        FinishReason::Stop
                    } else {
                        reason
                    };
                }
                Step::Failed(message) => {
                    tracing::warn!(%message, choice = self.index, "generation failed");
                    return Err(ApiError::worker_failed(message));
                }
            }
        };
        let reason = self.finish_reason(reason);
        let mut text = String::new();
        let mut reasoning = String::new();
        let mut calls: Vec<serde_json::Value> = Vec::new();
        for piece in pieces {
            match piece {
                Piece::Reasoning(piece) => reasoning.push_str(&piece),
                Piece::Content(piece) => text.push_str(&piece),
                Piece::Call { id, name, .. } => calls.push(
                    json!({"id": id, "type": "function", "function": {"name": name, "arguments": ""}}),
                ),
                Piece::Arguments { index, text } => {
                    if let Some(arguments) = calls
                        .get_mut(index)
                        .and_then(|c| c.pointer_mut("/function/arguments"))
                    {
                        *arguments = json!(format!("{}{text}", arguments.as_str().unwrap_or("")));
                    }
                }
            }
        }
        let logprobs = self.logprobs_json(&all_scored);
        let index = self.index;
        tracing::debug!(choice = index, completion_tokens = self.assembler.completion_tokens,
            tool_calls = calls.len(), finish = ?reason, "choice complete");
        Ok(match self.prepared.endpoint {
            Endpoint::Chat => {
                let mut message = if calls.is_empty() {
                    json!({"role": "assistant", "content": text})
                } else {
                    let content = if text.is_empty() { None } else { Some(text) };
                    json!({"role": "assistant", "content": content, "tool_calls": calls})
                };
                // A model that reasons always says so (null when it did not this time).
                if self.prepared.reasoning_parser != ReasoningParserKind::Off {
                    message["reasoning_content"] = if reasoning.is_empty() {
                        serde_json::Value::Null
                    } else {
                        json!(reasoning)
                    };
                }
                json!({"index": index, "message": message, "logprobs": logprobs,
                    "finish_reason": reason})
            }
            Endpoint::Completion => {
                json!({"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason})
            }
        })
    }

    /// A chat chunk whose delta carries a piece of reasoning, content or a tool call.
    fn piece_chunk(&self, piece: &Piece) -> Event {
        let call = match piece {
            Piece::Reasoning(text) => {
                return Event::default().data(
                    json!({"id": response_id(&self.prepared), "object": self.object(true),
                        "created": self.prepared.created, "model": self.prepared.model,
                        "choices": [{"index": self.index, "delta": {"reasoning_content": text},
                            "logprobs": null, "finish_reason": null}]})
                    .to_string(),
                );
            }
            Piece::Call { index, id, name } => json!({"index": index, "id": id,
                "type": "function", "function": {"name": name, "arguments": ""}}),
            Piece::Arguments { index, text } => {
                json!({"index": index, "function": {"arguments": text}})
            }
            Piece::Content(text) => {
                return Event::default().data(
                    json!({"id": response_id(&self.prepared), "object": self.object(true),
                        "created": self.prepared.created, "model": self.prepared.model,
                        "choices": [{"index": self.index, "delta": {"content": text},
                            "logprobs": null, "finish_reason": null}]})
                    .to_string(),
                );
            }
        };
        let body = json!({"id": response_id(&self.prepared), "object": self.object(true),
            "created": self.prepared.created, "model": self.prepared.model,
            "choices": [{"index": self.index, "delta": {"tool_calls": [call]},
                "logprobs": null, "finish_reason": null}]});
        Event::default().data(body.to_string())
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
                json!({"index": self.index, "delta": delta, "logprobs": logprobs,
                    "finish_reason": reason})
            }
            Endpoint::Completion => json!({"index": self.index, "text": delta.unwrap_or(""),
                "logprobs": logprobs, "finish_reason": reason}),
        };
        let body = json!({"id": response_id(&self.prepared), "object": self.object(true),
            "created": self.prepared.created, "model": self.prepared.model,
            "choices": [choice]});
        Event::default().data(body.to_string())
    }
}

/// Non-streaming: every choice gathered (concurrently), then one body.
async fn collect(mut request: Request, mut runs: Vec<Run>) -> Result<Response, ApiError> {
    let gathered = futures_util::future::try_join_all(runs.iter_mut().map(Run::gather)).await;
    let completion_tokens = runs.iter().map(|r| r.assembler.completion_tokens).sum();
    // Failed or not, what was generated is charged, and nothing more.
    request.settle(completion_tokens);
    let choices = gathered?;
    let usage = request.usage(completion_tokens);
    let body = json!({"id": request.response_id(), "object": request.object(false),
        "created": request.prepared.created, "model": request.prepared.model,
        "choices": choices, "usage": usage});
    request
        .frontend
        .metrics
        .request(request.prepared.endpoint.label(), 200);
    tracing::info!(
        completion_tokens = usage.completion_tokens,
        choices = runs.len(),
        "completed"
    );
    Ok((
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response())
}

/// Streaming: each choice's chunks as they come (interleaved when `n > 1`), then the usage
/// chunk when asked for and `[DONE]` — after every choice ended, and not after a failure.
fn into_sse(request: Request, runs: Vec<Run>) -> Response {
    request
        .frontend
        .metrics
        .request(request.prepared.endpoint.label(), 200);
    let tally = Arc::new(Tally::default());
    let streams = runs.into_iter().map(|run| {
        let mut first = VecDeque::new();
        if run.prepared.endpoint == Endpoint::Chat {
            let body = json!({"id": response_id(&run.prepared), "object": run.object(true),
                "created": run.prepared.created, "model": run.prepared.model,
                "choices": [{"index": run.index, "delta": {"role": "assistant", "content": ""},
                    "logprobs": null, "finish_reason": null}]});
            first.push_back(Event::default().data(body.to_string()));
        }
        let streamer = Streamer {
            run,
            out: first,
            done: false,
            tally: tally.clone(),
        };
        futures_util::stream::unfold(streamer, |mut s| async move {
            s.next().await.map(|event| (event, s))
        })
        .boxed()
    });
    let choices = futures_util::stream::select_all(streams);
    let tail = futures_util::stream::once(async move {
        let mut request = request;
        request.settle(tally.completion_tokens.load(Ordering::Acquire));
        let mut events = Vec::new();
        if tally.failed.load(Ordering::Acquire) {
            return futures_util::stream::iter(events);
        }
        if request.prepared.include_usage {
            let usage = request.usage(tally.completion_tokens.load(Ordering::Acquire));
            let body = json!({"id": request.response_id(), "object": request.object(true),
                "created": request.prepared.created, "model": request.prepared.model,
                "choices": [], "usage": usage});
            events.push(Event::default().data(body.to_string()));
        }
        events.push(Event::default().data("[DONE]"));
        // The request (and its admission slot) lives until the last event.
        drop(request);
        futures_util::stream::iter(events)
    })
    .flatten();
    Sse::new(choices.chain(tail).map(Ok::<_, Infallible>)).into_response()
}

/// What the choices of a streamed request report for its last chunks.
#[derive(Debug, Default)]
struct Tally {
    completion_tokens: AtomicU32,
    failed: AtomicBool,
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
    tally: Arc<Tally>,
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
                Step::Text(text, scored) if self.run.parser.is_some() => {
                    let last = self.run.assembler.stopped;
                    self.push_pieces(&text, &scored, last);
                    if last {
                        self.end(FinishReason::Stop);
                    }
                }
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
                    if self.run.parser.is_some() {
                        self.push_pieces(&tail, &[], true);
                    } else if !tail.is_empty() {
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
                    self.tally.failed.store(true, Ordering::Release);
                    self.done = true;
                }
            }
        }
    }

    /// With a parser: reasoning, content and tool-call deltas for `text`; the tokens' logprobs
    /// ride on a content chunk (an empty one when the text had no content).
    fn push_pieces(&mut self, text: &str, scored: &[Scored], last: bool) {
        let pieces = self.run.pieces(text, last);
        let mut scored = Some(scored).filter(|s| !s.is_empty());
        for piece in &pieces {
            let event = match (piece, scored.take()) {
                (Piece::Content(text), Some(s)) => self.run.chunk(Some(text), None, s),
                (piece, taken) => {
                    scored = taken;
                    self.run.piece_chunk(piece)
                }
            };
            self.out.push_back(event);
        }
        if let Some(s) = scored {
            let event = self.run.chunk(Some(""), None, s);
            self.out.push_back(event);
        }
    }

    fn end(&mut self, reason: FinishReason) {
        let reason = self.run.finish_reason(reason);
        let event = self.run.chunk(None, Some(reason), &[]);
        self.out.push_back(event);
        self.done = true;
        let tokens = self.run.assembler.completion_tokens;
        self.tally
            .completion_tokens
            .fetch_add(tokens, Ordering::AcqRel);
        tracing::info!(request_id = %self.run.prepared.id, choice = self.run.index,
            completion_tokens = tokens, finish = ?reason, "streamed");
    }
}
