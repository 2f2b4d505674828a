//! OpenAI's Responses API (`POST /v1/responses`, `GET` and `DELETE /v1/responses/{id}`) as a
//! translation onto the chat pipeline: one implementation of templating, sampling, tools and
//! grammar-constrained output, not a second one.
//!
//! A create request is checked field by field ([`super::fields::RESPONSES_FIELDS`]), its input
//! items (with the stored conversation of `previous_response_id` before them and
//! `instructions` as a system message in front) become chat messages, `tools` / `tool_choice`
//! / `text.format` / `max_output_tokens` become their chat equivalents ([`chat_body`]), and the
//! result runs through [`super::prepare`] and [`super::run`] as a streamed chat completion. Its
//! chunks are folded ([`Fold`]) into the Response object and, for `stream: true`, into the typed
//! SSE events the SDKs expect (`response.created` … `response.completed`, each with its
//! `sequence_number`). A chat error names the chat field; [`remap`] names the responses one.
//!
//! `store` (default true, as OpenAI) keeps the Response and its conversation in
//! [`super::response_store`], which writes it behind to the control plane.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use serde_json::{Value, json};
use tracing::Instrument;

use super::Frontend;
use super::api::{self, ApiError};
use super::prepare::{self, Endpoint};
use super::response_store::Stored;
use super::{fields, run};

/// A create request translated: the chat body to run and what the response echoes and stores.
#[derive(Debug)]
pub(super) struct Translated {
    /// The `/v1/chat/completions` body (always streamed, with usage).
    pub(super) chat: Value,
    /// The conversation so far as input items: the previous response's, then this input.
    pub(super) items: Vec<Value>,
    /// The Response object's fields other than status, output and usage.
    pub(super) base: Value,
    pub(super) stream: bool,
    pub(super) store: bool,
}

fn invalid(param: &str, message: impl Into<String>) -> ApiError {
    ApiError::invalid_value(param, message)
}

/// `input` as a list of input items (a string is one user message).
pub(super) fn input_items(input: Option<&Value>) -> Result<Vec<Value>, ApiError> {
    match input {
        None | Some(Value::Null) => Err(invalid("input", "input is required")),
        Some(Value::String(text)) => Ok(vec![json!({"type": "message", "role": "user",
            "content": [{"type": "input_text", "text": text}]})]),
        Some(Value::Array(items)) if !items.is_empty() => Ok(items.clone()),
        Some(Value::Array(_)) => Err(invalid("input", "input must contain at least one item")),
        Some(_) => Err(invalid(
            "input",
            "input must be a string or a list of input items",
        )),
    }
}

/// The text of a message item's `content`: a string, or `input_text` / `output_text` parts.
fn content_text(content: Option<&Value>, param: &str) -> Result<String, ApiError> {
    match content {
        Some(Value::String(text)) => Ok(text.clone()),
        Some(Value::Array(parts)) => {
            let mut text = String::new();
            for (j, part) in parts.iter().enumerate() {
                let kind = part.get("type").and_then(Value::as_str).unwrap_or("");
                match (kind, part.get("text").and_then(Value::as_str)) {
                    ("input_text" | "output_text" | "text", Some(piece)) => text.push_str(piece),
                    ("input_text" | "output_text" | "text", None) => {
                        return Err(invalid(
                            &format!("{param}[{j}].text"),
                            "a text part needs its text",
                        ));
                    }
                    _ => {
                        return Err(invalid(
                            &format!("{param}[{j}].type"),
                            format!(
                                "content part type {kind:?} is not served: the models served \
                                 here take input_text (and output_text in assistant turns) only"
                            ),
                        ));
                    }
                }
            }
            Ok(text)
        }
        _ => Err(invalid(
            param,
            "content must be a string or a list of input_text parts",
        )),
    }
}

const ROLES: &[&str] = &["user", "system", "developer", "assistant"];

/// Chat messages for `items` (input items, or the output items of an earlier response),
/// `instructions` first as a system message.
pub(super) fn to_messages(
    items: &[Value],
    instructions: Option<&str>,
) -> Result<Vec<Value>, ApiError> {
    let mut messages: Vec<Value> = Vec::with_capacity(items.len() + 1);
    if let Some(instructions) = instructions {
        messages.push(json!({"role": "system", "content": instructions}));
    }
    for (i, item) in items.iter().enumerate() {
        let at = format!("input[{i}]");
        let Some(object) = item.as_object() else {
            return Err(invalid(&at, "an input item must be an object"));
        };
        let kind = object.get("type").and_then(Value::as_str);
        match kind {
            None | Some("message") => {
                let role = object.get("role").and_then(Value::as_str).unwrap_or("");
                if !ROLES.contains(&role) {
                    return Err(invalid(
                        &format!("{at}.role"),
                        format!("role {role:?} is unknown: expected one of {ROLES:?}"),
                    ));
                }
                let text = content_text(object.get("content"), &format!("{at}.content"))?;
                messages.push(json!({"role": role, "content": text}));
            }
            Some("function_call") => {
                let field = |name: &str| {
                    object.get(name).and_then(Value::as_str).ok_or_else(|| {
                        invalid(
                            &format!("{at}.{name}"),
                            format!("a function_call item needs {name}"),
                        )
                    })
                };
                let call = json!({"id": field("call_id")?, "type": "function",
                    "function": {"name": field("name")?, "arguments": field("arguments")?}});
                // Consecutive calls are one assistant turn, as the chat API writes them.
                let joined = messages.last_mut().and_then(|last| {
                    (last["role"] == "assistant")
                        .then(|| last.get_mut("tool_calls"))
                        .flatten()
                        .and_then(Value::as_array_mut)
                });
                match joined {
                    Some(calls) => calls.push(call),
                    None => messages
                        .push(json!({"role": "assistant", "content": null, "tool_calls": [call]})),
                }
            }
            Some("function_call_output") => {
                let call_id = object
                    .get("call_id")
                    .and_then(Value::as_str)
                    .ok_or_else(|| {
                        invalid(
                            &format!("{at}.call_id"),
                            "a function_call_output item needs call_id",
                        )
                    })?;
                let output = match object.get("output") {
                    Some(Value::String(text)) => text.clone(),
                    Some(other @ Value::Array(_)) => {
                        content_text(Some(other), &format!("{at}.output"))?
                    }
                    _ => {
                        return Err(invalid(
                            &format!("{at}.output"),
                            "a function_call_output item needs its output as a string",
                        ));
                    }
                };
                messages.push(json!({"role": "tool", "tool_call_id": call_id, "content": output}));
            }
            Some(other) => {
                return Err(invalid(
                    &format!("{at}.type"),
                    format!(
                        "input item type {other:?} is not served: use message, function_call \
                         and function_call_output items"
                    ),
                ));
            }
        }
    }
    Ok(messages)
}

/// `tools` in the chat shape (`{"type": "function", "function": {...}}`).
fn chat_tools(tools: &Value) -> Result<Value, ApiError> {
    let Some(list) = tools.as_array() else {
        return Err(invalid("tools", "tools must be a list of tools"));
    };
    let mut out = Vec::with_capacity(list.len());
    for (i, tool) in list.iter().enumerate() {
        let kind = tool.get("type").and_then(Value::as_str).unwrap_or("");
        if kind != "function" {
            return Err(invalid(
                &format!("tools[{i}].type"),
                format!(
                    "tool type {kind:?} is not served: only function tools (built-in tools such \
                     as web search run nowhere here)"
                ),
            ));
        }
        let mut function = serde_json::Map::new();
        for key in ["name", "description", "parameters", "strict"] {
            if let Some(value) = tool.get(key).filter(|v| !v.is_null()) {
                function.insert(key.to_owned(), value.clone());
            }
        }
        out.push(json!({"type": "function", "function": function}));
    }
    Ok(Value::Array(out))
}

/// `tool_choice` in the chat shape.
fn chat_tool_choice(choice: &Value) -> Result<Value, ApiError> {
    match choice {
        Value::String(_) => Ok(choice.clone()),
        Value::Object(object) if object.get("type").and_then(Value::as_str) == Some("function") => {
            let name = object.get("name").and_then(Value::as_str).ok_or_else(|| {
                invalid("tool_choice.name", "a function tool_choice needs the name")
            })?;
            Ok(json!({"type": "function", "function": {"name": name}}))
        }
        _ => Err(invalid(
            "tool_choice",
            "tool_choice must be \"none\", \"auto\", \"required\" or {\"type\": \"function\", \
             \"name\": ...}",
        )),
    }
}

/// `text.format` as a chat `response_format` (`None` for plain text).
fn response_format(format: &Value) -> Result<Option<Value>, ApiError> {
    let kind = format.get("type").and_then(Value::as_str).unwrap_or("");
    match kind {
        "text" => Ok(None),
        "json_object" => Ok(Some(json!({"type": "json_object"}))),
        "json_schema" => {
            let mut schema = serde_json::Map::new();
            for key in ["name", "schema", "strict", "description"] {
                if let Some(value) = format.get(key).filter(|v| !v.is_null()) {
                    schema.insert(key.to_owned(), value.clone());
                }
            }
            Ok(Some(json!({"type": "json_schema", "json_schema": schema})))
        }
        _ => Err(invalid(
            "text.format.type",
            "text.format.type must be \"text\", \"json_object\" or \"json_schema\"",
        )),
    }
}

/// The chat body for a responses `body` whose conversation is `messages`.
pub(super) fn chat_body(body: &Value, messages: Vec<Value>) -> Result<Value, ApiError> {
    let mut chat = json!({
        "messages": messages,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    let present = |key: &str| body.get(key).filter(|v| !v.is_null());
    for key in ["model", "temperature", "top_p", "parallel_tool_calls"] {
        if let Some(value) = present(key) {
            chat[key] = value.clone();
        }
    }
    if let Some(max) = present("max_output_tokens") {
        chat["max_completion_tokens"] = max.clone();
    }
    if let Some(tools) = present("tools") {
        chat["tools"] = chat_tools(tools)?;
    }
    if let Some(choice) = present("tool_choice") {
        chat["tool_choice"] = chat_tool_choice(choice)?;
    }
    if let Some(format) = body.pointer("/text/format").filter(|v| !v.is_null())
        && let Some(format) = response_format(format)?
    {
        chat["response_format"] = format;
    }
    Ok(chat)
}

/// A chat pipeline error with the responses field named instead of the chat one.
pub(super) fn remap(mut error: ApiError) -> ApiError {
    let rename = |text: &str| -> String {
        let text = text
            .replace("response_format.json_schema.", "text.format.")
            .replace("response_format", "text.format")
            .replace("max_completion_tokens", "max_output_tokens");
        // `tools[i].function.x` → `tools[i].x`.
        let text = text.replace("].function.", "].");
        if text.starts_with("messages") {
            text.replacen("messages", "input", 1)
        } else {
            text
        }
    };
    error.param = error.param.as_deref().map(rename);
    error.message = rename(&error.message);
    error
}

fn random_id(prefix: &str) -> String {
    format!("{prefix}{:032x}", rand::random::<u128>())
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// Translates a checked create `body` whose earlier conversation (from `previous_response_id`)
/// is `previous`.
pub(super) fn translate(body: &Value, previous: Vec<Value>) -> Result<Translated, ApiError> {
    let bool_or = |key: &str, default: bool| -> Result<bool, ApiError> {
        match body.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(_) => Err(invalid(key, format!("{key} must be true or false"))),
        }
    };
    let stream = bool_or("stream", false)?;
    let store = bool_or("store", true)?;
    let instructions = match body.get("instructions") {
        None | Some(Value::Null) => None,
        Some(Value::String(text)) => Some(text.as_str()),
        Some(_) => return Err(invalid("instructions", "instructions must be a string")),
    };
    if let Some(metadata) = body.get("metadata").filter(|v| !v.is_null())
        && !metadata.is_object()
    {
        return Err(invalid("metadata", "metadata must be an object"));
    }
    let mut items = previous;
    items.extend(input_items(body.get("input"))?);
    let messages = to_messages(&items, instructions)?;
    let chat = chat_body(body, messages)?;
    let echo = |key: &str, default: Value| {
        body.get(key)
            .filter(|v| !v.is_null())
            .cloned()
            .unwrap_or(default)
    };
    let base = json!({
        "id": random_id("resp_"),
        "object": "response",
        "created_at": now_secs(),
        "status": "in_progress",
        "background": false,
        "error": null,
        "incomplete_details": null,
        "instructions": instructions,
        "max_output_tokens": echo("max_output_tokens", Value::Null),
        "model": echo("model", Value::Null),
        "output": [],
        "parallel_tool_calls": echo("parallel_tool_calls", json!(true)),
        "previous_response_id": echo("previous_response_id", Value::Null),
        "reasoning": {"effort": null, "summary": null},
        "store": store,
        "temperature": echo("temperature", json!(1.0)),
        "text": {"format": body.pointer("/text/format").filter(|v| !v.is_null()).cloned()
            .unwrap_or(json!({"type": "text"}))},
        "tool_choice": echo("tool_choice", json!("auto")),
        "tools": echo("tools", json!([])),
        "top_p": echo("top_p", json!(1.0)),
        "truncation": "disabled",
        "usage": null,
        "user": echo("user", Value::Null),
        "metadata": echo("metadata", json!({})),
    });
    Ok(Translated {
        chat,
        items,
        base,
        stream,
        store,
    })
}

/// The item of the output being written.
#[derive(Debug, Clone, Copy)]
enum Open {
    Message(usize),
    Call(usize),
}

/// Folds the chat chunks of one response into its output items and the typed events.
#[derive(Debug)]
pub(super) struct Fold {
    response: Value,
    seq: u64,
    output: Vec<Value>,
    open: Option<Open>,
    /// Chat tool-call index → output index.
    calls: HashMap<u64, usize>,
    usage: Option<(u64, u64)>,
    finish: Option<String>,
    /// The response id's hex part, for item ids.
    stem: String,
}

impl Fold {
    pub(super) fn new(base: Value) -> Self {
        let stem = base["id"]
            .as_str()
            .and_then(|id| id.strip_prefix("resp_"))
            .unwrap_or("")
            .to_owned();
        Self {
            response: base,
            seq: 0,
            output: Vec::new(),
            open: None,
            calls: HashMap::new(),
            usage: None,
            finish: None,
            stem,
        }
    }

    fn event(&mut self, kind: &str, mut fields: Value) -> Value {
        fields["type"] = json!(kind);
        fields["sequence_number"] = json!(self.seq);
        self.seq += 1;
        fields
    }

    /// The Response object now, with `status`.
    pub(super) fn snapshot(&self, status: &str) -> Value {
        let mut response = self.response.clone();
        response["status"] = json!(status);
        response["output"] = Value::Array(self.output.clone());
        if let Some((input, output)) = self.usage {
            response["usage"] = json!({"input_tokens": input,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": output, "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": input + output});
        }
        response
    }

    /// `response.created` and `response.in_progress`.
    pub(super) fn start(&mut self) -> Vec<Value> {
        let response = self.snapshot("in_progress");
        vec![
            self.event("response.created", json!({"response": response})),
            self.event("response.in_progress", json!({"response": response})),
        ]
    }

    fn item_id(&self, prefix: &str) -> String {
        format!("{prefix}_{}_{}", self.stem, self.output.len())
    }

    fn open_message(&mut self, events: &mut Vec<Value>) -> usize {
        if let Some(Open::Message(index)) = self.open {
            return index;
        }
        self.close(events, "completed");
        let index = self.output.len();
        let item = json!({"id": self.item_id("msg"), "type": "message", "status": "in_progress",
            "role": "assistant", "content": []});
        self.output.push(item.clone());
        self.open = Some(Open::Message(index));
        let id = item["id"].clone();
        events.push(self.event(
            "response.output_item.added",
            json!({"output_index": index, "item": item}),
        ));
        events.push(self.event(
            "response.content_part.added",
            json!({"item_id": id,
            "output_index": index, "content_index": 0,
            "part": {"type": "output_text", "text": "", "annotations": []}}),
        ));
        self.output[index]["content"] =
            json!([{"type": "output_text", "text": "", "annotations": [], "logprobs": []}]);
        index
    }

    /// Ends the open item (if any) with its done events.
    fn close(&mut self, events: &mut Vec<Value>, status: &str) {
        let Some(open) = self.open.take() else {
            return;
        };
        match open {
            Open::Message(index) => {
                let id = self.output[index]["id"].clone();
                let text = self.output[index]["content"][0]["text"].clone();
                events.push(self.event(
                    "response.output_text.done",
                    json!({"item_id": id,
                    "output_index": index, "content_index": 0, "text": text, "logprobs": []}),
                ));
                events.push(self.event(
                    "response.content_part.done",
                    json!({"item_id": id,
                    "output_index": index, "content_index": 0,
                    "part": {"type": "output_text", "text": text, "annotations": []}}),
                ));
                self.output[index]["status"] = json!(status);
            }
            Open::Call(index) => {
                let item = &self.output[index];
                let fields = json!({"item_id": item["id"], "output_index": index,
                    "name": item["name"], "arguments": item["arguments"]});
                events.push(self.event("response.function_call_arguments.done", fields));
                self.output[index]["status"] = json!(status);
            }
        }
        let (Open::Message(index) | Open::Call(index)) = open;
        let item = self.output[index].clone();
        events.push(self.event(
            "response.output_item.done",
            json!({"output_index": index, "item": item}),
        ));
    }

    /// The events for one chat chunk.
    pub(super) fn chunk(&mut self, chunk: &Value) -> Vec<Value> {
        let mut events = Vec::new();
        if let (Some(input), Some(output)) = (
            chunk
                .pointer("/usage/prompt_tokens")
                .and_then(Value::as_u64),
            chunk
                .pointer("/usage/completion_tokens")
                .and_then(Value::as_u64),
        ) {
            self.usage = Some((input, output));
        }
        let Some(choice) = chunk.pointer("/choices/0") else {
            return events;
        };
        if let Some(text) = choice
            .pointer("/delta/content")
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty())
        {
            let index = self.open_message(&mut events);
            let id = self.output[index]["id"].clone();
            let so_far = self.output[index]["content"][0]["text"]
                .as_str()
                .unwrap_or("")
                .to_owned();
            self.output[index]["content"][0]["text"] = json!(format!("{so_far}{text}"));
            events.push(self.event(
                "response.output_text.delta",
                json!({"item_id": id,
                "output_index": index, "content_index": 0, "delta": text, "logprobs": []}),
            ));
        }
        if let Some(calls) = choice
            .pointer("/delta/tool_calls")
            .and_then(Value::as_array)
        {
            for call in calls {
                let chat_index = call.get("index").and_then(Value::as_u64).unwrap_or(0);
                if let Some(call_id) = call.get("id").and_then(Value::as_str) {
                    self.close(&mut events, "completed");
                    let index = self.output.len();
                    let name = call.pointer("/function/name").cloned().unwrap_or(json!(""));
                    let item = json!({"id": self.item_id("fc"), "type": "function_call",
                        "status": "in_progress", "call_id": call_id, "name": name,
                        "arguments": ""});
                    self.output.push(item.clone());
                    self.calls.insert(chat_index, index);
                    self.open = Some(Open::Call(index));
                    events.push(self.event(
                        "response.output_item.added",
                        json!({"output_index": index, "item": item}),
                    ));
                }
                let Some(&index) = self.calls.get(&chat_index) else {
                    continue;
                };
                if let Some(delta) = call
                    .pointer("/function/arguments")
                    .and_then(Value::as_str)
                    .filter(|d| !d.is_empty())
                {
                    let so_far = self.output[index]["arguments"]
                        .as_str()
                        .unwrap_or("")
                        .to_owned();
                    self.output[index]["arguments"] = json!(format!("{so_far}{delta}"));
                    let id = self.output[index]["id"].clone();
                    events.push(self.event(
                        "response.function_call_arguments.delta",
                        json!({"item_id": id, "output_index": index, "delta": delta}),
                    ));
                }
            }
        }
        if let Some(reason) = choice.get("finish_reason").and_then(Value::as_str) {
            self.finish = Some(reason.to_owned());
        }
        events
    }

    /// The closing events (`response.completed`, or `response.incomplete` when the output hit
    /// `max_output_tokens`) and the final Response object.
    pub(super) fn finish(&mut self) -> (Vec<Value>, Value) {
        let mut events = Vec::new();
        let incomplete = self.finish.as_deref() == Some("length");
        let item_status = if incomplete {
            "incomplete"
        } else {
            "completed"
        };
        self.close(&mut events, item_status);
        let (status, kind) = if incomplete {
            self.response["incomplete_details"] = json!({"reason": "max_output_tokens"});
            ("incomplete", "response.incomplete")
        } else {
            ("completed", "response.completed")
        };
        let response = self.snapshot(status);
        events.push(self.event(kind, json!({"response": response})));
        (events, response)
    }

    /// `response.failed` with `message` (the worker failed mid-response).
    pub(super) fn fail(&mut self, message: &str) -> Value {
        self.response["error"] = json!({"code": "server_error", "message": message});
        let response = self.snapshot("failed");
        self.event("response.failed", json!({"response": response}))
    }
}

/// What the SSE of the internal chat stream carried.
#[derive(Debug, PartialEq)]
pub(super) enum Chunk {
    Data(Value),
    Error(String),
    Done,
}

/// Splits the internal chat SSE bytes into its `data:` payloads.
#[derive(Debug, Default)]
pub(super) struct SseReader {
    buffer: Vec<u8>,
}

impl SseReader {
    pub(super) fn push(&mut self, bytes: &[u8]) -> Vec<Chunk> {
        self.buffer.extend_from_slice(bytes);
        let mut out = Vec::new();
        while let Some(end) = self.buffer.windows(2).position(|w| w == b"\n\n") {
            let block: Vec<u8> = self.buffer.drain(..end + 2).collect();
            let text = String::from_utf8_lossy(&block);
            for line in text.lines() {
                let Some(data) = line.strip_prefix("data:") else {
                    continue;
                };
                let data = data.trim_start();
                if data == "[DONE]" {
                    out.push(Chunk::Done);
                    continue;
                }
                match serde_json::from_str::<Value>(data) {
                    Ok(value) if value.get("error").is_some() => out.push(Chunk::Error(
                        value
                            .pointer("/error/message")
                            .and_then(Value::as_str)
                            .unwrap_or("generation failed")
                            .to_owned(),
                    )),
                    Ok(value) => out.push(Chunk::Data(value)),
                    Err(e) => out.push(Chunk::Error(format!("unreadable chunk: {e}"))),
                }
            }
        }
        out
    }
}

/// What the end of a response stores.
struct Storing {
    frontend: Arc<Frontend>,
    owner: String,
    items: Vec<Value>,
    store: bool,
}

impl Storing {
    /// Keeps `response` (with the conversation it ends) when `store` asked for it.
    fn keep(&mut self, response: &Value) {
        if !self.store {
            return;
        }
        let Some(id) = response["id"].as_str() else {
            return;
        };
        let mut items = std::mem::take(&mut self.items);
        if let Some(output) = response["output"].as_array() {
            items.extend(output.iter().cloned());
        }
        let body = json!({"response": response, "items": items});
        self.frontend.responses.put(
            id,
            Stored {
                owner: self.owner.clone(),
                body,
            },
        );
    }
}

fn sse_event(event: &Value) -> Event {
    let kind = event["type"].as_str().unwrap_or("message");
    Event::default().event(kind).data(event.to_string())
}

/// `POST /v1/responses`.
pub(super) async fn create(
    State(frontend): State<Arc<Frontend>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let start = Instant::now();
    let id = frontend.request_id(&headers);
    let span = tracing::info_span!("request", request_id = %id, endpoint = "responses");
    let result = async {
        let key = frontend.check_auth(&headers)?;
        let owner = frontend.owner(&headers);
        prepare::check_content_type(&headers)?;
        let bytes = tokio::time::timeout(
            frontend.config.body_read_timeout,
            prepare::read_body(&headers, body, frontend.config.max_body_bytes),
        )
        .await
        .map_err(|_| ApiError::body_timeout(frontend.config.body_read_timeout))??;
        let value = api::parse_json(&bytes)?;
        fields::check_responses(&value)?;
        let previous = match value.get("previous_response_id") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::String(previous)) => {
                let stored = frontend
                    .responses
                    .get(previous, &owner)
                    .await
                    .map_err(|e| store_unavailable(&frontend, e))?
                    .ok_or_else(|| not_found(previous).with_param("previous_response_id"))?;
                stored.body["items"].as_array().cloned().unwrap_or_default()
            }
            Some(_) => {
                return Err(invalid(
                    "previous_response_id",
                    "previous_response_id must be a string",
                ));
            }
        };
        let translated = translate(&value, previous)?;
        let chat = serde_json::to_vec(&translated.chat)
            .map_err(|e| ApiError::worker_failed(format!("encoding the chat request: {e}")))?;
        let admitted = run::admit(&frontend).await?;
        let prepared = {
            let (frontend, id, span) = (frontend.clone(), id.clone(), tracing::Span::current());
            tokio::task::spawn_blocking(move || {
                span.in_scope(|| prepare::prepare(&frontend, Endpoint::Chat, id, &chat))
            })
            .await
            .map_err(|e| ApiError::worker_failed(format!("preparing the request failed: {e}")))?
            .map_err(remap)?
        };
        let tokens = run::reserve_tokens(&frontend, key, &prepared)?;
        let chat = run::execute(frontend.clone(), prepared, admitted, start, tokens).await?;
        let storing = Storing {
            frontend: frontend.clone(),
            owner,
            items: translated.items,
            store: translated.store,
        };
        let fold = Fold::new(translated.base);
        let body = chat.into_body().into_data_stream();
        if translated.stream {
            Ok(stream(fold, body, storing))
        } else {
            collect(fold, body, storing).await
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
            frontend.metrics.request("responses", error.status.as_u16());
            error.into_response()
        }
    };
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert("x-request-id", value);
    }
    response
}

type ChatBody = axum::body::BodyDataStream;

async fn collect(
    mut fold: Fold,
    mut body: ChatBody,
    mut storing: Storing,
) -> Result<Response, ApiError> {
    let mut reader = SseReader::default();
    while let Some(bytes) = body.next().await {
        let bytes = bytes.map_err(|e| ApiError::worker_failed(e.to_string()))?;
        for chunk in reader.push(&bytes) {
            match chunk {
                Chunk::Data(value) => {
                    fold.chunk(&value);
                }
                Chunk::Error(message) => return Err(ApiError::worker_failed(message)),
                Chunk::Done => {
                    let (_, response) = fold.finish();
                    storing.keep(&response);
                    return Ok((
                        StatusCode::OK,
                        [(header::CONTENT_TYPE, "application/json")],
                        response.to_string(),
                    )
                        .into_response());
                }
            }
        }
    }
    Err(ApiError::worker_failed(
        "the generation ended without finishing",
    ))
}

struct Streaming {
    fold: Fold,
    body: ChatBody,
    reader: SseReader,
    storing: Storing,
    out: VecDeque<Value>,
    done: bool,
}

fn stream(mut fold: Fold, body: ChatBody, storing: Storing) -> Response {
    let out: VecDeque<Value> = fold.start().into();
    let state = Streaming {
        fold,
        body,
        reader: SseReader::default(),
        storing,
        out,
        done: false,
    };
    let events = futures_util::stream::unfold(state, |mut s| async move {
        loop {
            if let Some(event) = s.out.pop_front() {
                return Some((Ok::<_, Infallible>(sse_event(&event)), s));
            }
            if s.done {
                return None;
            }
            match s.body.next().await {
                Some(Ok(bytes)) => {
                    for chunk in s.reader.push(&bytes) {
                        match chunk {
                            Chunk::Data(value) => s.out.extend(s.fold.chunk(&value)),
                            Chunk::Error(message) => {
                                s.out.push_back(s.fold.fail(&message));
                                s.done = true;
                            }
                            Chunk::Done => {
                                let (events, response) = s.fold.finish();
                                // Stored before the client hears `response.completed`: a
                                // client that chains at once finds it.
                                s.storing.keep(&response);
                                s.out.extend(events);
                                s.done = true;
                            }
                        }
                        if s.done {
                            break;
                        }
                    }
                }
                Some(Err(e)) => {
                    s.out.push_back(s.fold.fail(&e.to_string()));
                    s.done = true;
                }
                None => {
                    s.out
                        .push_back(s.fold.fail("the generation ended without finishing"));
                    s.done = true;
                }
            }
        }
    });
    Sse::new(events).into_response()
}

fn not_found(id: &str) -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        kind: "invalid_request_error",
        code: "not_found",
        message: format!("No response found with id {id:?}."),
        param: None,
        retry_after: None,
    }
}

fn store_unavailable(frontend: &Frontend, error: super::response_store::Unavailable) -> ApiError {
    ApiError::unavailable(
        "store_unavailable",
        error.to_string(),
        frontend.config.retry_after,
    )
}

/// `GET /v1/responses/{id}`.
pub(super) async fn retrieve(
    State(frontend): State<Arc<Frontend>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let result = async {
        frontend.check_auth(&headers)?;
        let owner = frontend.owner(&headers);
        let stored = frontend
            .responses
            .get(&id, &owner)
            .await
            .map_err(|e| store_unavailable(&frontend, e))?
            .ok_or_else(|| not_found(&id))?;
        Ok::<_, ApiError>(axum::Json(stored.body["response"].clone()).into_response())
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

/// `DELETE /v1/responses/{id}`.
pub(super) async fn delete(
    State(frontend): State<Arc<Frontend>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let result = async {
        frontend.check_auth(&headers)?;
        let owner = frontend.owner(&headers);
        let deleted = frontend
            .responses
            .delete(&id, &owner)
            .await
            .map_err(|e| store_unavailable(&frontend, e))?;
        if !deleted {
            return Err(not_found(&id));
        }
        Ok(axum::Json(json!({"id": id, "object": "response", "deleted": true})).into_response())
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_items_and_instructions_become_chat_messages() {
        let body = json!({"model": "m", "instructions": "Be brief.", "input": [
            {"role": "user", "content": "What is the weather?"},
            {"type": "function_call", "call_id": "c1", "name": "weather", "arguments": "{}"},
            {"type": "function_call", "call_id": "c2", "name": "time", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
            {"type": "message", "role": "assistant",
                "content": [{"type": "output_text", "text": "It is sunny."}]},
        ], "max_output_tokens": 9, "tools": [{"type": "function", "name": "weather",
            "parameters": {"type": "object"}, "strict": true}],
            "tool_choice": {"type": "function", "name": "weather"},
            "text": {"format": {"type": "json_schema", "name": "w", "schema": {"type": "object"},
                "strict": true}}});
        let previous = vec![json!({"role": "user", "content": "hi"})];
        let t = translate(&body, previous).unwrap();
        assert_eq!(
            t.chat["messages"],
            json!([
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "hi"},
                {"role": "user", "content": "What is the weather?"},
                {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": "{}"}},
                    {"id": "c2", "type": "function", "function": {"name": "time", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
                {"role": "assistant", "content": "It is sunny."},
            ])
        );
        assert_eq!(t.chat["max_completion_tokens"], 9);
        assert_eq!(t.chat["stream"], true);
        assert_eq!(
            t.chat["tools"],
            json!([{"type": "function", "function": {"name": "weather",
                "parameters": {"type": "object"}, "strict": true}}])
        );
        assert_eq!(
            t.chat["tool_choice"],
            json!({"type": "function", "function": {"name": "weather"}})
        );
        assert_eq!(
            t.chat["response_format"],
            json!({"type": "json_schema", "json_schema": {"name": "w",
                "schema": {"type": "object"}, "strict": true}})
        );
        assert_eq!(t.items.len(), 6);
        assert!(t.store && !t.stream);
        assert!(t.base["id"].as_str().unwrap().starts_with("resp_"));
    }

    #[test]
    fn unsupported_items_and_tools_are_named() {
        let cases = [
            (json!({"model": "m"}), "input"),
            (
                json!({"model": "m", "input": [{"type": "input_image", "image_url": "x"}]}),
                "input[0].type",
            ),
            (
                json!({"model": "m", "input": [{"role": "user",
                    "content": [{"type": "input_image", "image_url": "x"}]}]}),
                "input[0].content[0].type",
            ),
            (
                json!({"model": "m", "input": "x", "tools": [{"type": "web_search"}]}),
                "tools[0].type",
            ),
            (
                json!({"model": "m", "input": "x", "text": {"format": {"type": "xml"}}}),
                "text.format.type",
            ),
        ];
        for (body, param) in cases {
            let error = translate(&body, Vec::new()).unwrap_err();
            assert_eq!(error.param.as_deref(), Some(param), "{body}");
        }
        let error = remap(ApiError::invalid_value(
            "response_format.json_schema.schema",
            "bad response_format.json_schema.schema",
        ));
        assert_eq!(error.param.as_deref(), Some("text.format.schema"));
        let error = remap(ApiError::invalid_value("messages[1].content", "x"));
        assert_eq!(error.param.as_deref(), Some("input[1].content"));
    }

    fn chunk(delta: Value, finish: Option<&str>) -> Value {
        json!({"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
    }

    /// The typed events of a text answer and of a tool call, in order, numbered.
    #[test]
    fn chat_chunks_fold_into_the_typed_events() {
        let base = translate(&json!({"model": "m", "input": "hi"}), Vec::new())
            .unwrap()
            .base;
        let mut fold = Fold::new(base);
        let mut events = fold.start();
        events.extend(fold.chunk(&chunk(json!({"role": "assistant", "content": ""}), None)));
        events.extend(fold.chunk(&chunk(json!({"content": "Hel"}), None)));
        events.extend(fold.chunk(&chunk(json!({"content": "lo"}), None)));
        events.extend(fold.chunk(&chunk(
            json!({"tool_calls": [{"index": 0, "id": "call_1",
            "type": "function", "function": {"name": "f", "arguments": ""}}]}),
            None,
        )));
        events.extend(fold.chunk(&chunk(
            json!({"tool_calls": [{"index": 0, "function": {"arguments": "{\"a\":"}}]}),
            None,
        )));
        events.extend(fold.chunk(&chunk(
            json!({"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]}),
            None,
        )));
        events.extend(fold.chunk(&chunk(json!({}), Some("tool_calls"))));
        events.extend(
            fold.chunk(&json!({"choices": [], "usage": {"prompt_tokens": 5,
            "completion_tokens": 7, "total_tokens": 12}})),
        );
        let (tail, response) = fold.finish();
        events.extend(tail);
        let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
        assert_eq!(
            kinds,
            [
                "response.created",
                "response.in_progress",
                "response.output_item.added",
                "response.content_part.added",
                "response.output_text.delta",
                "response.output_text.delta",
                "response.output_text.done",
                "response.content_part.done",
                "response.output_item.done",
                "response.output_item.added",
                "response.function_call_arguments.delta",
                "response.function_call_arguments.delta",
                "response.function_call_arguments.done",
                "response.output_item.done",
                "response.completed",
            ]
        );
        for (i, event) in events.iter().enumerate() {
            assert_eq!(event["sequence_number"], i as u64);
        }
        assert_eq!(response["status"], "completed");
        assert_eq!(response["output"][0]["content"][0]["text"], "Hello");
        assert_eq!(response["output"][1]["type"], "function_call");
        assert_eq!(response["output"][1]["call_id"], "call_1");
        assert_eq!(response["output"][1]["arguments"], "{\"a\":1}");
        assert_eq!(response["usage"]["total_tokens"], 12);
        assert_eq!(events[14]["response"], response);
        // The stored output becomes the next turn's conversation.
        let messages = to_messages(response["output"].as_array().unwrap(), None).unwrap();
        assert_eq!(
            messages[0],
            json!({"role": "assistant", "content": "Hello"})
        );
        assert_eq!(messages[1]["tool_calls"][0]["id"], "call_1");
    }

    #[test]
    fn a_length_stop_is_incomplete_and_sse_splits_anywhere() {
        let base = translate(&json!({"model": "m", "input": "hi"}), Vec::new())
            .unwrap()
            .base;
        let mut fold = Fold::new(base);
        fold.chunk(&chunk(json!({"content": "a"}), Some("length")));
        let (events, response) = fold.finish();
        assert_eq!(response["status"], "incomplete");
        assert_eq!(
            response["incomplete_details"]["reason"],
            "max_output_tokens"
        );
        assert_eq!(events.last().unwrap()["type"], "response.incomplete");

        let stream =
            b"data: {\"a\":1}\n\ndata: {\"error\":{\"message\":\"boom\"}}\n\ndata: [DONE]\n\n";
        for split in 0..stream.len() {
            let mut reader = SseReader::default();
            let mut chunks = reader.push(&stream[..split]);
            chunks.extend(reader.push(&stream[split..]));
            assert_eq!(
                chunks,
                [
                    Chunk::Data(json!({"a": 1})),
                    Chunk::Error("boom".into()),
                    Chunk::Done
                ]
            );
        }
    }
}
