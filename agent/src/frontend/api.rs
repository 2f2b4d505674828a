//! The OpenAI wire types the frontend speaks, the checks a request must pass before it costs
//! anything, and the one mapping from internal errors to OpenAI's error JSON.
//!
//! | condition | status | `type` | `code` |
//! | --- | --- | --- | --- |
//! | body not UTF-8, not JSON, wrong field type, missing field | 400 | `invalid_request_error` | `invalid_json` / `invalid_type` / `missing_field` |
//! | a field this server does not know (see `fields.rs`, `docs/openai-api.md`) | 400 | `invalid_request_error` | `unknown_parameter` |
//! | a known field it does not serve, with a value that asks for something | 400 | `invalid_request_error` | `unsupported_parameter` |
//! | field out of range (`n`, `max_tokens`, `temperature`, `top_logprobs`, …), empty `messages`, a chat template that refuses the messages | 400 | `invalid_request_error` | `invalid_value` |
//! | prompt plus `max_tokens` over the model's context | 400 | `invalid_request_error` | `context_length_exceeded` |
//! | missing or wrong API key | 401 | `invalid_request_error` | `invalid_api_key` |
//! | unknown model | 404 | `invalid_request_error` | `model_not_found` |
//! | unknown path | 404 | `invalid_request_error` | `unknown_url` |
//! | wrong method | 405 | `invalid_request_error` | `method_not_allowed` |
//! | body over `frontend.max_body_bytes` | 413 | `invalid_request_error` | `request_too_large` |
//! | a POST body whose `Content-Type` is not `application/json` (a `charset` other than UTF-8 included) | 415 | `invalid_request_error` | `unsupported_media_type` |
//! | the API key is over its rate limit (`ratelimit.rs`) | 429 (+ `Retry-After`) | `rate_limit_error` | `rate_limit_exceeded` |
//! | queue full | 429 (+ `Retry-After`) | `rate_limit_error` | `queue_full` |
//! | no ready worker, draining, queue wait timed out | 503 (+ `Retry-After`) | `service_unavailable` | `no_ready_worker` / `draining` / `queue_timeout` |
//! | the worker failed during the request | 502 | `server_error` | `worker_failed` |

use std::borrow::Cow;
use std::time::Duration;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

/// An error on the way to the client, in OpenAI's shape.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// `error.type`.
    pub kind: &'static str,
    /// `error.code`.
    pub code: &'static str,
    /// `error.message`: what was wrong and what is accepted.
    pub message: String,
    /// `error.param`: the request field at fault.
    pub param: Option<String>,
    /// Sent as `Retry-After` (whole seconds) on 429 and 503.
    pub retry_after: Option<Duration>,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

#[derive(Serialize)]
struct ErrorDetail<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: &'a str,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, code: &'static str, message: String) -> Self {
        Self {
            status,
            kind,
            code,
            message,
            param: None,
            retry_after: None,
        }
    }

    /// A 400 about one field.
    pub fn invalid_value(param: &str, message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "invalid_value",
            message.into(),
        )
        .with_param(param)
    }

    /// A 400 with a specific code.
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            code,
            message.into(),
        )
    }

    /// 408: the body did not arrive within the deadline.
    pub fn body_timeout(limit: std::time::Duration) -> Self {
        Self::new(
            StatusCode::REQUEST_TIMEOUT,
            "invalid_request_error",
            "request_timeout",
            format!("the request body did not arrive within {limit:?}"),
        )
    }

    /// 401.
    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "invalid_api_key",
            "missing or invalid API key: send `Authorization: Bearer <key>`".into(),
        )
    }

    /// 404 for a model this node does not serve.
    pub fn model_not_found(model: &str, known: &[&str]) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "model_not_found",
            format!("the model {model:?} does not exist on this node; available: {known:?}"),
        )
        .with_param("model")
    }

    /// 404 for an unknown path.
    pub fn unknown_url(path: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "unknown_url",
            format!("unknown URL {path}: see /v1/models, /v1/chat/completions, /v1/completions"),
        )
    }

    /// 405.
    pub fn method_not_allowed() -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request_error",
            "method_not_allowed",
            "method not allowed on this URL".into(),
        )
    }

    /// 413.
    pub fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            "request_too_large",
            format!("request body is larger than the limit of {limit} bytes"),
        )
    }

    /// 415: the body is not declared as JSON.
    pub fn unsupported_media_type(given: Option<&str>) -> Self {
        let given = match given {
            Some(value) => format!("Content-Type {value:?}"),
            None => "no Content-Type".to_owned(),
        };
        Self::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "invalid_request_error",
            "unsupported_media_type",
            format!(
                "the request body must be JSON sent with `Content-Type: application/json` \
                 (a charset, if any, must be utf-8); got {given}"
            ),
        )
    }

    /// 429: the API key has spent its rate limit; a token is back after `retry_after`.
    pub fn rate_limited(retry_after: Duration) -> Self {
        Self {
            retry_after: Some(retry_after),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "rate_limit_exceeded",
                format!(
                    "this API key is over its rate limit; retry after {}s (Retry-After)",
                    retry_after.as_secs()
                ),
            )
        }
    }

    /// 429: the queue is full.
    pub fn queue_full(retry_after: Duration) -> Self {
        Self {
            retry_after: Some(retry_after),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "queue_full",
                "the server's request queue is full; retry after the Retry-After delay".into(),
            )
        }
    }

    /// 503 with a reason code.
    pub fn unavailable(code: &'static str, message: impl Into<String>, retry: Duration) -> Self {
        Self {
            retry_after: Some(retry),
            ..Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "service_unavailable",
                code,
                message.into(),
            )
        }
    }

    /// 502: the worker failed mid-request.
    pub fn worker_failed(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_GATEWAY,
            "server_error",
            "worker_failed",
            message.into(),
        )
    }

    /// Names the request field at fault.
    pub fn with_param(mut self, param: &str) -> Self {
        self.param = Some(param.to_owned());
        self
    }

    /// The `{"error": {...}}` body.
    pub fn body(&self) -> String {
        serde_json::to_string(&ErrorBody {
            error: ErrorDetail {
                message: &self.message,
                kind: self.kind,
                param: self.param.as_deref(),
                code: self.code,
            },
        })
        .unwrap_or_else(|_| String::from("{\"error\":{\"message\":\"internal error\"}}"))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (
            self.status,
            [(header::CONTENT_TYPE, "application/json")],
            self.body(),
        )
            .into_response();
        if let Some(retry) = self.retry_after {
            let secs = retry.as_secs().max(1);
            if let Ok(value) = HeaderValue::from_str(&secs.to_string()) {
                response.headers_mut().insert(header::RETRY_AFTER, value);
            }
        }
        response
    }
}

/// Parses a request body as a JSON object, turning every failure into the right 400.
pub fn parse_json(bytes: &[u8]) -> Result<serde_json::Value, ApiError> {
    let text = std::str::from_utf8(bytes).map_err(|e| {
        ApiError::bad_request(
            "invalid_json",
            format!("request body is not valid UTF-8: {e}"),
        )
    })?;
    let value: serde_json::Value = serde_json::from_str(text).map_err(|e| {
        ApiError::bad_request(
            "invalid_json",
            format!("request body is not valid JSON: {e}"),
        )
    })?;
    if !value.is_object() {
        return Err(ApiError::bad_request(
            "invalid_json",
            "request body must be a JSON object",
        ));
    }
    Ok(value)
}

/// Reads `T` out of a parsed body; a missing or wrong-typed field is a 400 naming it. (The
/// shared fields are a separate struct read from the same value rather than `#[serde(flatten)]`,
/// which would lose the field path.)
pub fn typed<T: serde::de::DeserializeOwned>(value: &serde_json::Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        let (code, param) = if let Some(field) = inner
            .strip_prefix("missing field `")
            .and_then(|rest| rest.split('`').next())
        {
            let param = if path == "." {
                field.to_owned()
            } else {
                format!("{path}.{field}")
            };
            ("missing_field", param)
        } else {
            ("invalid_type", path)
        };
        ApiError::bad_request(code, format!("{param}: {inner}")).with_param(&param)
    })
}

/// [`parse_json`] then [`typed`].
pub fn parse_body<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    typed(&parse_json(bytes)?)
}

/// `stop`: a string or a list of strings.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum StopSpec {
    /// One stop string.
    One(String),
    /// Several.
    Many(Vec<String>),
}

/// `stream_options`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct StreamOptions {
    /// Send a last chunk with token usage.
    #[serde(default)]
    pub include_usage: bool,
}

/// Message content: a string or a list of parts (only text parts are accepted).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum Content {
    /// Plain text.
    Text(String),
    /// Content parts.
    Parts(Vec<ContentPart>),
}

/// One content part.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ContentPart {
    /// Must be `text`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The text.
    #[serde(default)]
    pub text: Option<String>,
}

/// One chat message.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant`, `developer` or `tool`.
    pub role: String,
    /// What was said (`null` allowed for assistant messages).
    #[serde(default)]
    pub content: Option<Content>,
    /// An assistant message's tool calls (`[{"id", "type": "function", "function": {"name",
    /// "arguments"}}]`), checked in `tools.rs`.
    #[serde(default)]
    pub tool_calls: Option<Vec<serde_json::Value>>,
    /// A tool message's call id.
    #[serde(default)]
    pub tool_call_id: Option<String>,
}

/// The sampling fields both endpoints share.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct CommonParams {
    /// Stream over SSE.
    #[serde(default)]
    pub stream: Option<bool>,
    /// Streaming options.
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// Number of choices; only 1 is served (others are refused in `fields.rs`).
    #[serde(default)]
    pub n: Option<i64>,
    /// Stop strings (at most 4).
    #[serde(default)]
    pub stop: Option<StopSpec>,
    /// Completion token limit.
    #[serde(default)]
    pub max_tokens: Option<i64>,
    /// Same as `max_tokens` (the newer name); wins when both are given.
    #[serde(default)]
    pub max_completion_tokens: Option<i64>,
    /// Sampling temperature, 0 to 2.
    #[serde(default)]
    pub temperature: Option<f64>,
    /// Nucleus sampling, (0, 1].
    #[serde(default)]
    pub top_p: Option<f64>,
    /// RNG seed.
    #[serde(default)]
    pub seed: Option<u64>,
    /// Keep only the `top_k` most likely tokens (vLLM's extension); 0 or -1 disables it.
    #[serde(default)]
    pub top_k: Option<i64>,
    /// Min-p sampling (vLLM's extension), 0 to 1; 0 disables it.
    #[serde(default)]
    pub min_p: Option<f64>,
    /// Penalty per token already generated, -2 to 2.
    #[serde(default)]
    pub presence_penalty: Option<f64>,
    /// Penalty per time a token was generated, -2 to 2.
    #[serde(default)]
    pub frequency_penalty: Option<f64>,
    /// vLLM's multiplicative penalty on every token of the prompt and output, (0, 2].
    #[serde(default)]
    pub repetition_penalty: Option<f64>,
    /// Token id (as a string) → bias added to its logit, -100 to 100.
    #[serde(default)]
    pub logit_bias: Option<std::collections::BTreeMap<String, f64>>,
    /// Keep generating past the model's end-of-sequence token until `max_tokens` (vLLM's
    /// extension; for benchmarks and load tests).
    #[serde(default)]
    pub ignore_eos: bool,
    /// End-user id, for logs.
    #[serde(default)]
    pub user: Option<String>,
    /// vLLM's prefix-cache salt: requests with different salts share no cached block.
    #[serde(default)]
    pub cache_salt: Option<String>,
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ChatCompletionRequest {
    /// Model name.
    pub model: String,
    /// The conversation.
    pub messages: Vec<ChatMessage>,
    /// Return each generated token's log-probability.
    #[serde(default)]
    pub logprobs: Option<bool>,
    /// With `logprobs`, also this many most likely alternatives per token (0 to 20).
    #[serde(default)]
    pub top_logprobs: Option<u32>,
}

/// `prompt`: a string, a one-element list of strings, or token ids.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum PromptSpec {
    /// Text.
    Text(String),
    /// A list of texts (only one is served).
    Texts(Vec<String>),
    /// Token ids.
    Tokens(Vec<u32>),
}

/// `POST /v1/completions`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct CompletionRequest {
    /// Model name.
    pub model: String,
    /// The prompt.
    pub prompt: PromptSpec,
    /// Return each generated token's log-probability and this many alternatives (0 to 20).
    #[serde(default)]
    pub logprobs: Option<u32>,
    /// Echo the prompt (not served: `true` is refused).
    #[serde(default)]
    pub echo: Option<bool>,
}

/// Why a generation ended, as OpenAI names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// EOS or a stop string.
    Stop,
    /// `max_tokens` or the context length.
    Length,
    /// The model called tools (it ended after a call).
    ToolCalls,
}

/// Token counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    /// Prompt tokens.
    pub prompt_tokens: u32,
    /// Generated tokens.
    pub completion_tokens: u32,
    /// Both.
    pub total_tokens: u32,
}

impl Usage {
    /// Counts for a prompt and a completion.
    pub fn new(prompt: u32, completion: u32) -> Self {
        Self {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt + completion,
        }
    }
}

/// A model in `GET /v1/models`.
#[derive(Debug, Clone, Serialize)]
pub struct ModelCard<'a> {
    /// The name clients use.
    pub id: &'a str,
    /// Always `model`.
    pub object: &'static str,
    /// Unix seconds; the agent's start.
    pub created: u64,
    /// Always `kvfleet`.
    pub owned_by: &'static str,
    /// Context length (a vLLM extension that clients find useful).
    pub max_model_len: u32,
}

/// Renders chat messages into one string per message role, checking content.
pub fn message_text(message: &ChatMessage, index: usize) -> Result<Cow<'_, str>, ApiError> {
    let param = || format!("messages[{index}].content");
    match &message.content {
        None => Ok(Cow::Borrowed("")),
        Some(Content::Text(text)) => Ok(Cow::Borrowed(text)),
        Some(Content::Parts(parts)) => {
            let mut out = String::new();
            for part in parts {
                match (part.kind.as_str(), &part.text) {
                    ("text", Some(text)) => out.push_str(text),
                    ("text", None) => {
                        return Err(ApiError::invalid_value(
                            &param(),
                            "a text content part needs a `text` field",
                        ));
                    }
                    (other, _) => {
                        return Err(ApiError::invalid_value(
                            &param(),
                            format!("content part type {other:?} is not supported: only \"text\""),
                        ));
                    }
                }
            }
            Ok(Cow::Owned(out))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_have_the_openai_shape() {
        let error = ApiError::invalid_value("n", "n must be 1");
        let body: serde_json::Value = serde_json::from_str(&error.body()).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"error": {"message": "n must be 1", "type": "invalid_request_error",
                "param": "n", "code": "invalid_value"}})
        );
        let response = ApiError::queue_full(Duration::from_secs(2)).into_response();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[header::RETRY_AFTER], "2");
    }

    /// One row per malformed body: the bytes, the code and the param the error names.
    #[test]
    fn bad_bodies_name_the_field() {
        let cases: &[(&[u8], &str, Option<&str>)] = &[
            (b"\xff\xfe{}", "invalid_json", None),
            (b"{\"model\": ", "invalid_json", None),
            (b"[1, 2]", "invalid_json", None),
            (b"{\"messages\": []}", "missing_field", Some("model")),
            (
                b"{\"model\": \"m\", \"messages\": [], \"max_tokens\": \"ten\"}",
                "invalid_type",
                Some("max_tokens"),
            ),
            (
                b"{\"model\": \"m\", \"messages\": [{\"content\": \"hi\"}]}",
                "missing_field",
                Some("messages[0].role"),
            ),
            (
                b"{\"model\": 7, \"messages\": []}",
                "invalid_type",
                Some("model"),
            ),
        ];
        for (body, code, param) in cases {
            let error = parse_json(body)
                .and_then(|v| typed::<ChatCompletionRequest>(&v).and(typed::<CommonParams>(&v)))
                .unwrap_err();
            assert_eq!(error.status, StatusCode::BAD_REQUEST);
            assert_eq!(
                error.code,
                *code,
                "{:?}: {}",
                String::from_utf8_lossy(body),
                error.message
            );
            assert_eq!(error.param.as_deref(), *param, "{}", error.message);
        }
    }

    #[test]
    fn a_good_body_parses_with_all_fields() {
        let request: ChatCompletionRequest = parse_body(
            br#"{"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                 "stream": true, "stream_options": {"include_usage": true}, "stop": "x",
                 "max_completion_tokens": 5, "temperature": 0.5, "seed": 3}"#,
        )
        .unwrap();
        let common: CommonParams = parse_body(br#"{"stream": true, "stop": "x"}"#).unwrap();
        assert_eq!(common.stream, Some(true));
        assert_eq!(common.stop, Some(StopSpec::One("x".into())));
        assert_eq!(message_text(&request.messages[0], 0).unwrap(), "hi");
        let request: CompletionRequest =
            parse_body(br#"{"model": "m", "prompt": [1, 2, 3]}"#).unwrap();
        assert_eq!(request.prompt, PromptSpec::Tokens(vec![1, 2, 3]));
    }
}
