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
use std::time::{Duration, Instant};

use axum::http::{StatusCode, header};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use kvfleet_proto::hash::sequence_hashes;
use serde_json::json;

use super::Frontend;
use super::admission::Slot;
use super::api::{ApiError, FinishReason, Usage};
use super::metrics::{ModelRole, RequestLatencies};
use super::models::TextCodec;
use super::prepare::{Endpoint, Prepared};
use super::text::{StopMatcher, Utf8Stream};
use crate::backend::{self, GenEvent, GenerateRequest, Generation, TokenLogprob};

/// Admits `prepared` (waiting in the bounded queue), submits it to a worker and answers it:
/// streamed when it asked to be, otherwise once the completion is whole. `start` is when the
/// request arrived.
pub(super) async fn execute(
    frontend: Arc<Frontend>,
    prepared: Prepared,
    start: Instant,
) -> Result<Response, ApiError> {
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
        ApiError::unavailable(
            "no_ready_worker",
            e.to_string(),
            frontend.config.retry_after,
        )
    })?;
    tracing::debug!(worker = %generation.worker, prompt_tokens = prepared.prompt.len(), "submitted");
    frontend
        .metrics
        .tokens_in
        .inc_by(prepared.prompt.len() as u64);
    let run = Run::new(frontend, prepared, generation, slot, start, queued);
    if run.prepared.stream {
        Ok(run.into_sse())
    } else {
        run.collect().await
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
