//! Request preparation: from the client's bytes to a [`Prepared`] request a worker can run.
//!
//! The body is read within its limit, parsed and validated ([`super::api`]), the model looked
//! up, the chat template applied and the prompt tokenized, and the sampling parameters checked
//! against what the model's context leaves. Nothing here waits on a worker or takes an
//! admission slot: a request that fails here costs no capacity.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::http::{HeaderMap, header};
use futures_util::StreamExt;
use kvfleet_proto::SamplingParams;

use super::Frontend;
use super::api::{
    self, ApiError, ChatCompletionRequest, CommonParams, CompletionRequest, PromptSpec, StopSpec,
};
use super::models::TextCodec;
use super::{fields, structured, tools};
use crate::worker::protocol::WireEngine;
use crate::worker::{EngineKind, ReasoningParserKind, ToolParserKind};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Endpoint {
    Chat,
    Completion,
}

impl Endpoint {
    pub(super) fn label(self) -> &'static str {
        match self {
            Endpoint::Chat => "chat_completions",
            Endpoint::Completion => "completions",
        }
    }
}

/// A request that passed every check.
#[derive(Debug)]
pub(super) struct Prepared {
    pub(super) endpoint: Endpoint,
    pub(super) id: String,
    pub(super) model: String,
    pub(super) text: Arc<dyn TextCodec>,
    /// Alternatives per token when logprobs were asked for (`Some(0)`: the token's own only).
    pub(super) logprobs: Option<u32>,
    pub(super) prompt: Vec<u32>,
    pub(super) block_size: kvfleet_proto::BlockSize,
    pub(super) sampling: SamplingParams,
    pub(super) stops: Vec<String>,
    pub(super) stream: bool,
    pub(super) include_usage: bool,
    pub(super) created: u64,
    /// Choices to generate (`n`), each its own sequence; the prompt is prefilled once.
    pub(super) n: u32,
    /// Whether the output is parsed for tool calls (`tools` given, `tool_choice` not `none`).
    pub(super) tool_calls: bool,
    /// The format tool calls are parsed in (the model's).
    pub(super) tool_parser: ToolParserKind,
    /// How reasoning is separated (the model's, for chat; off for completions).
    pub(super) reasoning_parser: ReasoningParserKind,
}

/// The most choices one request may ask for.
pub(super) const MAX_CHOICES: i64 = 16;

/// Checks that the body is declared as JSON: `application/json`, any parameters, a `charset`
/// only if UTF-8 (the body is parsed as UTF-8). Anything else, or nothing, is 415 before a byte
/// of the body is read: a form post or a stray upload is refused as what it is, not as a JSON
/// syntax error.
pub(super) fn check_content_type(headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return Err(ApiError::unsupported_media_type(None));
    };
    let text = value.to_str().unwrap_or("");
    let mut parts = text.split(';').map(str::trim);
    let essence_ok = parts
        .next()
        .is_some_and(|m| m.eq_ignore_ascii_case("application/json"));
    let params_ok = parts.all(|param| match param.split_once('=') {
        Some((name, value)) if name.trim().eq_ignore_ascii_case("charset") => {
            let value = value.trim().trim_matches('"');
            value.eq_ignore_ascii_case("utf-8") || value.eq_ignore_ascii_case("utf8")
        }
        _ => true,
    });
    if essence_ok && params_ok {
        Ok(())
    } else {
        Err(ApiError::unsupported_media_type(Some(
            &String::from_utf8_lossy(value.as_bytes()),
        )))
    }
}

/// Reads the body, refusing one larger than `limit` bytes: at once when `Content-Length` says
/// so, otherwise as soon as the bytes read pass it.
pub(super) async fn read_body(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
) -> Result<Vec<u8>, ApiError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return Err(ApiError::too_large(limit));
    }
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

/// Parses and validates a request body into what the worker runs.
pub(super) fn prepare(
    frontend: &Frontend,
    endpoint: Endpoint,
    id: String,
    bytes: &[u8],
) -> Result<Prepared, ApiError> {
    let value = api::parse_json(bytes)?;
    fields::check(endpoint, &value)?;
    let common: CommonParams;
    let mut tool_set: Option<tools::ToolSet> = None;
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
            }
            tool_set = tools::read(&value)?;
            let renders_tools = model.text.renders_tools();
            let messages = tools::render(
                &request.messages,
                tool_set.as_ref(),
                renders_tools,
                model.tool_parser,
            )?;
            let definitions = tool_set
                .as_ref()
                .filter(|t| t.active() && renders_tools)
                .map(tools::ToolSet::definitions);
            let prompt = model
                .text
                .chat(&messages, definitions.as_ref())
                .map_err(|e| {
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
    if let Some((field, constraint)) = structured::constraint(&value)? {
        model
            .text
            .check_constraint(&constraint)
            .map_err(|e| ApiError::invalid_value(field, format!("{field}: {e}")))?;
        checked.sampling.constraint = Some(constraint);
    }
    let tool_constraint = match &tool_set {
        Some(set) => set.constraint(model.tool_parser)?,
        None => None,
    };
    if let Some(constraint) = tool_constraint {
        if checked.sampling.constraint.is_some() {
            return Err(ApiError::invalid_value(
                "tool_choice",
                "a forced tool call (tool_choice \"required\" or a function) constrains the \
                 output itself: it cannot be combined with response_format or guided_* fields",
            ));
        }
        model
            .text
            .check_constraint(&constraint)
            .map_err(|e| ApiError::invalid_value("tool_choice", format!("tool_choice: {e}")))?;
        checked.sampling.constraint = Some(constraint);
    }
    let vocab = model.text.vocab_size();
    if let Some(&(token, _)) = checked
        .sampling
        .logit_bias
        .iter()
        .find(|(t, _)| *t >= vocab)
    {
        return Err(ApiError::invalid_value(
            "logit_bias",
            format!("token id {token} is outside the vocabulary (size {vocab})"),
        ));
    }
    checked.sampling.logprobs = logprobs;
    let engine = match model.config.engine {
        EngineKind::LlamaCpp => Some(WireEngine::LlamaCpp),
        EngineKind::OpenAi => Some(WireEngine::OpenAi),
        EngineKind::Vllm => Some(WireEngine::Vllm),
        EngineKind::Sglang => Some(WireEngine::Sglang),
        EngineKind::Mock | EngineKind::Native => None,
    };
    if let Some((field, why)) =
        engine.and_then(|e| crate::worker::external::client::unsupported(e, &checked.sampling))
    {
        return Err(ApiError::bad_request("unsupported_parameter", why).with_param(field));
    }
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
        n: checked.n,
        tool_calls: tool_set.as_ref().is_some_and(tools::ToolSet::active),
        tool_parser: model.tool_parser,
        reasoning_parser: match endpoint {
            Endpoint::Chat => model.reasoning_parser,
            Endpoint::Completion => ReasoningParserKind::Off,
        },
        created: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(frontend.started),
    })
}

struct Checked {
    n: u32,
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
    let n = match common.n.unwrap_or(1) {
        n @ 1..=MAX_CHOICES => n as u32,
        n => {
            return Err(ApiError::invalid_value(
                "n",
                format!("n = {n} is out of range: expected 1 to {MAX_CHOICES}"),
            ));
        }
    };
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
    let top_k = match common.top_k.unwrap_or(0) {
        -1 | 0 => 0,
        k if k > 0 => u32::try_from(k).unwrap_or(u32::MAX),
        k => {
            return Err(ApiError::invalid_value(
                "top_k",
                format!("top_k = {k} is out of range: expected -1 or 0 (off) or at least 1"),
            ));
        }
    };
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
    let mut logit_bias = Vec::new();
    for (key, bias) in common.logit_bias.iter().flatten() {
        let token: u32 = key.trim().parse().map_err(|_| {
            ApiError::invalid_value(
                "logit_bias",
                format!("logit_bias key {key:?} is not a token id (a non-negative integer)"),
            )
        })?;
        logit_bias.push((token, *bias as f32));
    }
    logit_bias.sort_by_key(|&(token, _)| token);
    if let Some(pair) = logit_bias.windows(2).find(|w| w[0].0 == w[1].0) {
        return Err(ApiError::invalid_value(
            "logit_bias",
            format!("token id {} is given twice", pair[0].0),
        ));
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
        top_k,
        seed: common.seed,
        max_tokens,
        stop_token_ids: Vec::new(),
        ignore_eos: common.ignore_eos,
        logprobs: None,
        min_p: common.min_p.unwrap_or(0.0) as f32,
        presence_penalty: common.presence_penalty.unwrap_or(0.0) as f32,
        frequency_penalty: common.frequency_penalty.unwrap_or(0.0) as f32,
        repetition_penalty: common.repetition_penalty.unwrap_or(1.0) as f32,
        logit_bias,
        generated_in_prompt: 0,
        constraint: None,
        cache_salt: common.cache_salt.clone(),
    };
    sampling
        .validate()
        .map_err(|e| ApiError::invalid_value(e.field, e.to_string()))?;
    Ok(Checked {
        n,
        sampling,
        stops,
        stream,
        include_usage: common
            .stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage),
    })
}
