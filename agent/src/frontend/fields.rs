//! Every field of the chat and completions request bodies and what this server does with it:
//! nothing a client sends is silently dropped.
//!
//! [`FIELDS`] is the one list. A field is [`Treatment::Honoured`] (read and acted on),
//! [`Treatment::Accepted`] (metadata that does not change the output, such as `user`), or
//! [`Treatment::Refused`]: a 400 `unsupported_parameter` naming it, unless its value is the
//! neutral one that asks for nothing (`null` always is, so clients that send every field with
//! its default keep working). A field on no list is a 400 `unknown_parameter` naming it.
//! Message objects and `stream_options` are checked the same way.
//!
//! `docs/openai-api.md` holds the same list as a table; a test fails when the two differ.
//! Range checks of honoured fields stay in [`super::prepare`]: this module only decides whether
//! a field is served at all.

use serde_json::Value;

use super::api::ApiError;
use super::prepare::Endpoint;

/// Which request bodies a field belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum On {
    /// `POST /v1/chat/completions`.
    Chat,
    /// `POST /v1/completions`.
    Completion,
    /// Both.
    Both,
    /// `POST /v1/responses` ([`RESPONSES_FIELDS`]; its own table in the docs).
    Responses,
}

impl On {
    pub(super) fn includes(self, endpoint: Endpoint) -> bool {
        matches!(
            (self, endpoint),
            (On::Both, _) | (On::Chat, Endpoint::Chat) | (On::Completion, Endpoint::Completion)
        )
    }

    /// The word the docs table uses.
    pub fn label(self) -> &'static str {
        match self {
            On::Chat => "chat",
            On::Completion => "completions",
            On::Both => "both",
            On::Responses => "responses",
        }
    }
}

/// What the server does with a field.
#[derive(Debug, Clone, Copy)]
pub enum Treatment {
    /// Read and acted on.
    Honoured,
    /// Accepted and documented; it does not change the generated output.
    Accepted,
    /// Refused with a 400 naming the field unless `neutral` holds for its value.
    Refused {
        /// True for the value that asks for nothing (`null` is always neutral).
        neutral: fn(&Value) -> bool,
        /// Why it is refused, in the error message.
        why: &'static str,
        /// A value that is refused (the tests send it).
        example: &'static str,
    },
}

impl Treatment {
    /// The word the docs table uses.
    pub fn label(self) -> &'static str {
        match self {
            Treatment::Honoured => "honoured",
            Treatment::Accepted => "accepted",
            Treatment::Refused { .. } => "refused",
        }
    }
}

/// One field of a request body (or of a message, or of `stream_options`).
#[derive(Debug, Clone, Copy)]
pub struct Field {
    /// The name on the wire.
    pub name: &'static str,
    /// The bodies it belongs to.
    pub on: On,
    /// What the server does with it.
    pub treatment: Treatment,
}

const fn honoured(name: &'static str, on: On) -> Field {
    Field {
        name,
        on,
        treatment: Treatment::Honoured,
    }
}

const fn accepted(name: &'static str, on: On) -> Field {
    Field {
        name,
        on,
        treatment: Treatment::Accepted,
    }
}

const fn refused(
    name: &'static str,
    on: On,
    neutral: fn(&Value) -> bool,
    why: &'static str,
    example: &'static str,
) -> Field {
    Field {
        name,
        on,
        treatment: Treatment::Refused {
            neutral,
            why,
            example,
        },
    }
}

fn never(_: &Value) -> bool {
    false
}

fn is_false(v: &Value) -> bool {
    v == &Value::Bool(false)
}

fn is_one(v: &Value) -> bool {
    v.as_f64() == Some(1.0)
}

/// An empty string, list or object.
fn is_empty(v: &Value) -> bool {
    match v {
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        _ => false,
    }
}

fn is_text_only(v: &Value) -> bool {
    v.as_array()
        .is_some_and(|a| a.iter().all(|m| m.as_str() == Some("text")))
}

fn is_default_tier(v: &Value) -> bool {
    matches!(v.as_str(), Some("auto" | "default"))
}

const NO_TOOLS: &str =
    "the deprecated function-calling fields are not served: use tools and tool_choice";

/// Every top-level field of the two request bodies.
pub const FIELDS: &[Field] = &[
    honoured("model", On::Both),
    honoured("messages", On::Chat),
    honoured("prompt", On::Completion),
    honoured("stream", On::Both),
    honoured("stream_options", On::Both),
    honoured("max_tokens", On::Both),
    honoured("max_completion_tokens", On::Both),
    honoured("temperature", On::Both),
    honoured("top_p", On::Both),
    honoured("top_k", On::Both),
    honoured("seed", On::Both),
    honoured("stop", On::Both),
    honoured("logprobs", On::Both),
    honoured("top_logprobs", On::Chat),
    honoured("ignore_eos", On::Both),
    honoured("cache_salt", On::Both),
    accepted("user", On::Both),
    accepted("metadata", On::Chat),
    accepted("safety_identifier", On::Chat),
    accepted("prompt_cache_key", On::Chat),
    refused(
        "service_tier",
        On::Chat,
        is_default_tier,
        "every request is served at one tier: send \"auto\" or \"default\"",
        r#""priority""#,
    ),
    honoured("n", On::Both),
    refused(
        "best_of",
        On::Completion,
        is_one,
        "this server returns exactly one candidate (best_of = 1)",
        "3",
    ),
    refused(
        "echo",
        On::Completion,
        is_false,
        "the prompt is not echoed",
        "true",
    ),
    refused(
        "suffix",
        On::Completion,
        is_empty,
        "insertion (fill in the middle) is not served",
        r#""end""#,
    ),
    honoured("min_p", On::Both),
    honoured("presence_penalty", On::Both),
    honoured("frequency_penalty", On::Both),
    honoured("repetition_penalty", On::Both),
    honoured("logit_bias", On::Both),
    honoured("response_format", On::Chat),
    honoured("guided_json", On::Both),
    honoured("guided_regex", On::Both),
    honoured("guided_choice", On::Both),
    honoured("guided_grammar", On::Both),
    honoured("structured_outputs", On::Both),
    honoured("tools", On::Chat),
    honoured("tool_choice", On::Chat),
    honoured("parallel_tool_calls", On::Chat),
    refused(
        "functions",
        On::Chat,
        is_empty,
        NO_TOOLS,
        r#"[{"name": "f"}]"#,
    ),
    refused("function_call", On::Chat, never, NO_TOOLS, r#""auto""#),
    refused(
        "modalities",
        On::Chat,
        is_text_only,
        "the models served here produce text only",
        r#"["text", "audio"]"#,
    ),
    refused(
        "audio",
        On::Chat,
        never,
        "the models served here produce text only",
        r#"{"voice": "alloy", "format": "wav"}"#,
    ),
    refused(
        "prediction",
        On::Chat,
        never,
        "predicted outputs (speculative decoding from a given text) are not served",
        r#"{"type": "content", "content": "x"}"#,
    ),
    refused(
        "reasoning_effort",
        On::Chat,
        never,
        "the models served here have no reasoning-effort control",
        r#""high""#,
    ),
    refused(
        "verbosity",
        On::Chat,
        never,
        "the models served here have no verbosity control",
        r#""low""#,
    ),
    refused(
        "web_search_options",
        On::Chat,
        never,
        "web search is not served",
        "{}",
    ),
    refused(
        "store",
        On::Chat,
        is_false,
        "chat completions are not stored",
        "true",
    ),
];

/// Every top-level field of a `POST /v1/responses` body. What the honoured ones become on the
/// chat pipeline is in [`super::responses`].
pub const RESPONSES_FIELDS: &[Field] = &[
    honoured("model", On::Responses),
    honoured("input", On::Responses),
    honoured("instructions", On::Responses),
    honoured("max_output_tokens", On::Responses),
    honoured("temperature", On::Responses),
    honoured("top_p", On::Responses),
    honoured("tools", On::Responses),
    honoured("tool_choice", On::Responses),
    honoured("parallel_tool_calls", On::Responses),
    honoured("text", On::Responses),
    honoured("store", On::Responses),
    honoured("previous_response_id", On::Responses),
    honoured("stream", On::Responses),
    accepted("metadata", On::Responses),
    accepted("user", On::Responses),
    accepted("safety_identifier", On::Responses),
    accepted("prompt_cache_key", On::Responses),
    refused(
        "background",
        On::Responses,
        is_false,
        "background responses are not served: the response is produced while the request is open",
        "true",
    ),
    refused(
        "conversation",
        On::Responses,
        never,
        "conversations are not served: chain responses with previous_response_id",
        r#""conv_1""#,
    ),
    refused(
        "include",
        On::Responses,
        is_empty,
        "no additional output data is served",
        r#"["message.output_text.logprobs"]"#,
    ),
    refused(
        "reasoning",
        On::Responses,
        never,
        "the models served here have no reasoning controls",
        r#"{"effort": "high"}"#,
    ),
    refused(
        "truncation",
        On::Responses,
        is_disabled,
        "the input is never truncated: a conversation longer than the context is refused",
        r#""auto""#,
    ),
    refused(
        "service_tier",
        On::Responses,
        is_default_tier,
        "every request is served at one tier: send \"auto\" or \"default\"",
        r#""priority""#,
    ),
    refused(
        "prompt",
        On::Responses,
        never,
        "stored prompt templates are not served",
        r#"{"id": "pmpt_1"}"#,
    ),
    refused(
        "max_tool_calls",
        On::Responses,
        never,
        "the number of tool calls is not limited separately",
        "2",
    ),
    refused(
        "top_logprobs",
        On::Responses,
        never,
        "log-probabilities are served on /v1/chat/completions",
        "2",
    ),
    refused(
        "stream_options",
        On::Responses,
        never,
        "there are no stream options on this endpoint",
        r#"{"include_obfuscation": false}"#,
    ),
];

/// The fields of `text` in a responses body.
pub const RESPONSES_TEXT_FIELDS: &[Field] = &[
    honoured("format", On::Responses),
    refused(
        "verbosity",
        On::Responses,
        is_medium,
        "the models served here have no verbosity control",
        r#""low""#,
    ),
];

fn is_disabled(v: &Value) -> bool {
    v.as_str() == Some("disabled")
}

fn is_medium(v: &Value) -> bool {
    v.as_str() == Some("medium")
}

/// The fields of one chat message (`messages[i]`).
pub const MESSAGE_FIELDS: &[Field] = &[
    honoured("role", On::Chat),
    honoured("content", On::Chat),
    refused(
        "name",
        On::Chat,
        never,
        "the chat template renders a message's role and content only",
        r#""alice""#,
    ),
    honoured("tool_calls", On::Chat),
    honoured("tool_call_id", On::Chat),
    refused(
        "function_call",
        On::Chat,
        never,
        NO_TOOLS,
        r#"{"name": "f"}"#,
    ),
    refused(
        "reasoning_content",
        On::Chat,
        is_empty,
        "an assistant message's reasoning is not fed back to the model: send the message \
         without it",
        r#""Let me think.""#,
    ),
    refused(
        "refusal",
        On::Chat,
        never,
        "the chat template renders a message's role and content only",
        r#""no""#,
    ),
    refused(
        "audio",
        On::Chat,
        never,
        "the models served here take text only",
        r#"{"id": "a1"}"#,
    ),
];

/// The fields of `stream_options`.
pub const STREAM_OPTION_FIELDS: &[Field] = &[
    honoured("include_usage", On::Both),
    // Padding against length side channels; this server sends none, which is always valid.
    accepted("include_obfuscation", On::Both),
];

/// Checks every field of a parsed body (an object) against [`FIELDS`], and the fields of each
/// message and of `stream_options`: the first field that is unknown, or refused with a value
/// that asks for something, is a 400 naming it.
pub(super) fn check(endpoint: Endpoint, body: &Value) -> Result<(), ApiError> {
    let on = |on: On| on.includes(endpoint);
    check_object(FIELDS, &on, body, "")?;
    if endpoint == Endpoint::Chat
        && let Some(messages) = body.get("messages").and_then(Value::as_array)
    {
        for (i, message) in messages.iter().enumerate() {
            check_object(MESSAGE_FIELDS, &on, message, &format!("messages[{i}]."))?;
        }
    }
    if let Some(options) = body.get("stream_options") {
        check_object(STREAM_OPTION_FIELDS, &on, options, "stream_options.")?;
    }
    Ok(())
}

/// [`check`] for a `POST /v1/responses` body: [`RESPONSES_FIELDS`] and `text`'s fields.
pub(super) fn check_responses(body: &Value) -> Result<(), ApiError> {
    let on = |on: On| on == On::Responses;
    check_object(RESPONSES_FIELDS, &on, body, "")?;
    if let Some(text) = body.get("text") {
        check_object(RESPONSES_TEXT_FIELDS, &on, text, "text.")?;
    }
    Ok(())
}

/// Checks the keys of `object` (anything else is left to the typed parse) against `fields`;
/// `prefix` makes the `param` a path (`messages[0].name`).
fn check_object(
    fields: &[Field],
    on: &dyn Fn(On) -> bool,
    object: &Value,
    prefix: &str,
) -> Result<(), ApiError> {
    let Some(object) = object.as_object() else {
        return Ok(());
    };
    for (key, value) in object {
        let param = format!("{prefix}{key}");
        let Some(field) = fields.iter().find(|f| f.name == key && on(f.on)) else {
            return Err(ApiError::bad_request(
                "unknown_parameter",
                format!(
                    "unrecognized request argument `{param}`: this server reads the fields listed \
                     in docs/openai-api.md and refuses the others rather than ignore them"
                ),
            )
            .with_param(&param));
        };
        if let Treatment::Refused { neutral, why, .. } = field.treatment
            && !value.is_null()
            && !neutral(value)
        {
            return Err(ApiError::bad_request(
                "unsupported_parameter",
                format!("`{param}` = {value} is not supported: {why}"),
            )
            .with_param(&param));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base(endpoint: Endpoint) -> Value {
        match endpoint {
            Endpoint::Chat => {
                json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
            }
            Endpoint::Completion => json!({"model": "m", "prompt": "hi"}),
        }
    }

    fn endpoints(on: On) -> Vec<Endpoint> {
        [Endpoint::Chat, Endpoint::Completion]
            .into_iter()
            .filter(|e| on.includes(*e))
            .collect()
    }

    /// Every refused top-level field: its example is refused with the field named, and `null`
    /// (and the neutral value, where the example's opposite is one) passes.
    #[test]
    fn every_refused_field_is_refused_by_name_and_null_passes() {
        for field in FIELDS {
            let Treatment::Refused { example, .. } = field.treatment else {
                continue;
            };
            for endpoint in endpoints(field.on) {
                let mut body = base(endpoint);
                body[field.name] = serde_json::from_str(example).unwrap();
                let error = check(endpoint, &body).unwrap_err();
                assert_eq!(error.code, "unsupported_parameter", "{}", field.name);
                assert_eq!(error.param.as_deref(), Some(field.name));
                assert!(error.message.contains(field.name), "{}", error.message);
                body[field.name] = Value::Null;
                check(endpoint, &body).unwrap();
            }
        }
    }

    /// The same for a responses body: every refused field (and `text.` field) is named, `null`
    /// passes, and a chat-only field is unknown there.
    #[test]
    fn every_refused_responses_field_is_refused_by_name() {
        let base = json!({"model": "m", "input": "hi"});
        for (prefix, fields) in [("", RESPONSES_FIELDS), ("text.", RESPONSES_TEXT_FIELDS)] {
            for field in fields {
                let Treatment::Refused { example, .. } = field.treatment else {
                    continue;
                };
                let mut body = base.clone();
                let value: Value = serde_json::from_str(example).unwrap();
                let (slot, param) = if prefix.is_empty() {
                    body[field.name] = value;
                    (field.name.to_owned(), field.name.to_owned())
                } else {
                    body["text"] = json!({field.name: value});
                    ("text".to_owned(), format!("text.{}", field.name))
                };
                let error = check_responses(&body).unwrap_err();
                assert_eq!(error.code, "unsupported_parameter", "{param}");
                assert_eq!(error.param.as_deref(), Some(param.as_str()));
                body[slot.as_str()] = Value::Null;
                check_responses(&body).unwrap();
            }
        }
        let chat_only = json!({"model": "m", "input": "hi", "messages": []});
        let error = check_responses(&chat_only).unwrap_err();
        assert_eq!(error.code, "unknown_parameter");
        assert_eq!(error.param.as_deref(), Some("messages"));
        check_responses(&json!({"model": "m", "input": "hi", "store": false,
            "truncation": "disabled", "include": [], "background": false,
            "text": {"format": {"type": "text"}, "verbosity": "medium"}}))
        .unwrap();
    }

    #[test]
    fn every_refused_message_field_is_refused_by_path() {
        for field in MESSAGE_FIELDS {
            let Treatment::Refused { example, .. } = field.treatment else {
                continue;
            };
            let mut body = base(Endpoint::Chat);
            body["messages"] =
                json!([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]);
            body["messages"][1][field.name] = serde_json::from_str(example).unwrap();
            let error = check(Endpoint::Chat, &body).unwrap_err();
            assert_eq!(error.code, "unsupported_parameter", "{}", field.name);
            assert_eq!(
                error.param.as_deref(),
                Some(format!("messages[1].{}", field.name).as_str())
            );
        }
    }

    /// Neutral values ask for nothing and pass; fields of the other endpoint and made-up fields
    /// are unknown.
    #[test]
    fn neutral_values_pass_and_unknown_fields_are_named() {
        let chat = json!({"model": "m", "messages": [{"role": "user", "content": "hi", "tool_calls": []}],
            "n": 2, "presence_penalty": 0.5, "frequency_penalty": 0.0, "logit_bias": {"3": 1},
            "response_format": {"type": "text"}, "tools": [], "tool_choice": "none",
            "modalities": ["text"], "store": false, "service_tier": "auto", "user": "u",
            "metadata": {"k": "v"}, "parallel_tool_calls": true,
            "stream": true, "stream_options": {"include_usage": true, "include_obfuscation": false}});
        check(Endpoint::Chat, &chat).unwrap();
        let completion = json!({"model": "m", "prompt": "x", "echo": false, "best_of": 1,
            "suffix": "", "repetition_penalty": 1.0, "min_p": 0});
        check(Endpoint::Completion, &completion).unwrap();
        let cases = [
            (
                Endpoint::Chat,
                json!({"model": "m", "messages": [], "frobnicate": 1}),
                "frobnicate",
            ),
            (
                Endpoint::Chat,
                json!({"model": "m", "messages": [], "echo": false}),
                "echo",
            ),
            (
                Endpoint::Completion,
                json!({"model": "m", "prompt": "x", "tools": []}),
                "tools",
            ),
            (
                Endpoint::Chat,
                json!({"model": "m", "messages": [{"role": "user", "content": "x", "weight": 1}]}),
                "messages[0].weight",
            ),
            (
                Endpoint::Chat,
                json!({"model": "m", "messages": [], "stream_options": {"chunk_size": 2}}),
                "stream_options.chunk_size",
            ),
        ];
        for (endpoint, body, param) in cases {
            let error = check(endpoint, &body).unwrap_err();
            assert_eq!(error.code, "unknown_parameter", "{body}");
            assert_eq!(error.param.as_deref(), Some(param));
        }
    }

    /// `docs/openai-api.md` lists exactly these fields with the same treatment.
    #[test]
    fn the_docs_table_matches_the_code() {
        let docs = include_str!("../../../docs/openai-api.md");
        let tables: [(&str, &[Field]); 5] = [
            ("", FIELDS),
            ("messages[].", MESSAGE_FIELDS),
            ("stream_options.", STREAM_OPTION_FIELDS),
            ("", RESPONSES_FIELDS),
            ("text.", RESPONSES_TEXT_FIELDS),
        ];
        let mut expected = Vec::new();
        for (prefix, fields) in tables {
            for field in fields {
                expected.push(format!(
                    "| `{prefix}{}` | {} | {} |",
                    field.name,
                    field.on.label(),
                    field.treatment.label()
                ));
            }
        }
        let documented: Vec<String> = docs
            .lines()
            .filter(|l| l.starts_with("| `"))
            .map(|l| {
                // The first three cells: field, endpoints, treatment.
                let cells: Vec<&str> = l.split(" | ").take(3).collect();
                format!("{} |", cells.join(" | "))
            })
            .collect();
        for row in &expected {
            assert!(
                documented.contains(row),
                "docs/openai-api.md lacks the row {row}"
            );
        }
        for row in &documented {
            assert!(
                expected.contains(row),
                "docs/openai-api.md has the row {row}, which the code does not"
            );
        }
    }
}
