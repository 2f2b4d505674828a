//! Tool calling: `tools`, `tool_choice` and `parallel_tool_calls` read and checked
//! ([`read`]); tool definitions and tool messages rendered into the prompt ([`render`]); the
//! grammar that makes `required` and a named function always produce valid calls
//! ([`ToolSet::constraint`]); and the parser that turns the generated text into `tool_calls`,
//! piece by piece as it streams ([`ToolStream`]).
//!
//! One format throughout, Hermes' (which Qwen and many fine-tunes use):
//! `<tool_call>\n{"name": "f", "arguments": {...}}\n</tool_call>`. A template that reads
//! `tools` itself gets the definitions and the messages' `tool_calls` as `transformers` passes
//! them; a template that does not (SmolLM2's plain ChatML) gets [`TOOL_PROMPT`] in the system
//! message, assistant calls written in that format and tool results as `<tool_response>` user
//! turns, as vLLM's and llama.cpp's generic tool prompts do. With `required` or a named
//! function the output is constrained (llguidance, a Lark grammar embedding each function's
//! parameter schema), so even a 135M model produces calls whose arguments validate; with
//! `auto` the model chooses and the parser finds the calls it made.
//!
//! The parser is the same for a streamed and a whole answer: the whole answer is the streamed
//! pieces gathered, so the two never differ.

use kvfleet_model::ChatMessage;
use kvfleet_proto::Constraint;
use serde_json::Value;

use super::api::{self, ApiError};

/// How the model may use the tools.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum ToolChoice {
    /// No calls: the tools are left out of the prompt and the output is text.
    None,
    /// The model chooses between text and calls.
    Auto,
    /// At least one call (constrained).
    Required,
    /// Exactly this function (constrained).
    Named(String),
}

/// One function the model may call.
#[derive(Debug, Clone)]
struct Tool {
    name: String,
    /// Its JSON Schema (`{"type": "object", "properties": {}}` when none was given).
    parameters: Value,
    /// The definition as the client sent it, for templates and the default prompt.
    definition: Value,
}

/// The tools of one request and how they may be used.
#[derive(Debug, Clone)]
pub(super) struct ToolSet {
    tools: Vec<Tool>,
    pub(super) choice: ToolChoice,
    parallel: bool,
}

/// The tool prompt for templates that do not render tools (Qwen 2.5's wording, the format the
/// parser reads); the definitions, one JSON object a line, go between the tags.
pub(super) const TOOL_PROMPT: &str = "# Tools\n\nYou may call one or more functions to assist \
with the user query.\n\nYou are provided with function signatures within <tools></tools> XML \
tags:\n<tools>\n{tools}\n</tools>\n\nFor each function call, return a json object with function \
name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": \
<function-name>, \"arguments\": <args-json-object>}\n</tool_call>";

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";

/// Reads `tools`, `tool_choice` and `parallel_tool_calls`; `None` when no tools were given.
pub(super) fn read(body: &Value) -> Result<Option<ToolSet>, ApiError> {
    let bad = |param: &str, message: String| ApiError::invalid_value(param, message);
    let list = match body.get("tools") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(list)) => list.clone(),
        Some(_) => return Err(bad("tools", "tools must be a list of tools".into())),
    };
    let choice_value = body.get("tool_choice").filter(|v| !v.is_null());
    if list.is_empty() {
        return match choice_value {
            Some(v) if v.as_str() != Some("none") => Err(bad(
                "tool_choice",
                "tool_choice needs tools: give `tools` or leave tool_choice out".into(),
            )),
            _ => Ok(None),
        };
    }
    let mut tools: Vec<Tool> = Vec::with_capacity(list.len());
    for (i, definition) in list.into_iter().enumerate() {
        let kind = definition.get("type").and_then(Value::as_str);
        if kind != Some("function") {
            return Err(bad(
                &format!("tools[{i}].type"),
                format!("tools[{i}].type must be \"function\""),
            ));
        }
        let function = definition
            .get("function")
            .filter(|f| f.is_object())
            .ok_or_else(|| {
                bad(
                    &format!("tools[{i}].function"),
                    format!("tools[{i}].function must be an object with a name"),
                )
            })?;
        let name = function
            .get("name")
            .and_then(Value::as_str)
            .filter(|n| {
                !n.is_empty()
                    && n.len() <= 64
                    && n.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            })
            .ok_or_else(|| {
                bad(
                    &format!("tools[{i}].function.name"),
                    format!(
                        "tools[{i}].function.name must be 1 to 64 letters, digits, \
                         underscores or dashes"
                    ),
                )
            })?
            .to_owned();
        if tools.iter().any(|t| t.name == name) {
            return Err(bad(
                &format!("tools[{i}].function.name"),
                format!("two tools are named {name:?}"),
            ));
        }
        let parameters = match function.get("parameters") {
            None | Some(Value::Null) => {
                serde_json::json!({"type": "object", "properties": {}})
            }
            Some(p) if p.is_object() => p.clone(),
            Some(_) => {
                return Err(bad(
                    &format!("tools[{i}].function.parameters"),
                    format!("tools[{i}].function.parameters must be a JSON Schema object"),
                ));
            }
        };
        tools.push(Tool {
            name,
            parameters,
            definition,
        });
    }
    let choice = match choice_value {
        None => ToolChoice::Auto,
        Some(Value::String(s)) => match s.as_str() {
            "none" => ToolChoice::None,
            "auto" => ToolChoice::Auto,
            "required" => ToolChoice::Required,
            other => {
                return Err(bad(
                    "tool_choice",
                    format!(
                        "tool_choice {other:?} is unknown: expected \"none\", \"auto\", \
                         \"required\" or {{\"type\": \"function\", \"function\": {{\"name\": …}}}}"
                    ),
                ));
            }
        },
        Some(object) => {
            let name = object
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .filter(|_| object.get("type").and_then(Value::as_str) == Some("function"))
                .ok_or_else(|| {
                    bad(
                        "tool_choice",
                        "tool_choice must be \"none\", \"auto\", \"required\" or \
                         {\"type\": \"function\", \"function\": {\"name\": …}}"
                            .into(),
                    )
                })?;
            if !tools.iter().any(|t| t.name == name) {
                return Err(bad(
                    "tool_choice.function.name",
                    format!("tool_choice names {name:?}, which is not one of the tools"),
                ));
            }
            ToolChoice::Named(name.to_owned())
        }
    };
    let parallel = match body.get("parallel_tool_calls") {
        None | Some(Value::Null) => true,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            return Err(bad(
                "parallel_tool_calls",
                "parallel_tool_calls must be true or false".into(),
            ));
        }
    };
    Ok(Some(ToolSet {
        tools,
        choice,
        parallel,
    }))
}

impl ToolSet {
    /// Whether the model is told about the tools and its output parsed for calls.
    pub(super) fn active(&self) -> bool {
        self.choice != ToolChoice::None
    }

    /// The definitions as templates take them.
    pub(super) fn definitions(&self) -> Value {
        Value::Array(self.tools.iter().map(|t| t.definition.clone()).collect())
    }

    /// The grammar for `required` and a named function: one call (or, with parallel calls,
    /// one or more) of the allowed functions, each `{"name": …, "arguments": …}` with the
    /// arguments valid against the function's parameters. Properties a parameters object does
    /// not name are not generated unless it says `additionalProperties` itself (a small model
    /// otherwise invents keys until `max_tokens`). `None` for `auto` and `none`.
    pub(super) fn constraint(&self) -> Option<Constraint> {
        let allowed: Vec<&Tool> = match &self.choice {
            ToolChoice::None | ToolChoice::Auto => return None,
            ToolChoice::Required => self.tools.iter().collect(),
            ToolChoice::Named(name) => self.tools.iter().filter(|t| &t.name == name).collect(),
        };
        let calls: Vec<Value> = allowed
            .iter()
            .map(|tool| {
                let mut parameters = tool.parameters.clone();
                if let Some(object) = parameters.as_object_mut()
                    && object.get("type").and_then(Value::as_str) == Some("object")
                    && !object.contains_key("additionalProperties")
                {
                    object.insert("additionalProperties".into(), Value::Bool(false));
                }
                serde_json::json!({"type": "object",
                    "properties": {"name": {"const": tool.name}, "arguments": parameters},
                    "required": ["name", "arguments"], "additionalProperties": false})
            })
            .collect();
        let mut schema = if calls.len() == 1 {
            calls.into_iter().next().unwrap_or_default()
        } else {
            serde_json::json!({"anyOf": calls})
        };
        if let Some(object) = schema.as_object_mut() {
            object.insert(
                "x-guidance".into(),
                serde_json::json!({"whitespace_flexible": false,
                    "item_separator": ", ", "key_separator": ": "}),
            );
        }
        let literal = |s: &str| serde_json::to_string(s).unwrap_or_default();
        let repeat = if self.parallel && self.choice == ToolChoice::Required {
            format!(" ({} call)*", literal("\n"))
        } else {
            String::new()
        };
        Some(Constraint::Lark(format!(
            "start: call{repeat}\ncall: {} %json {schema} {}\n",
            literal(&format!("{OPEN}\n")),
            literal(&format!("\n{CLOSE}")),
        )))
    }
}

/// The conversation as the model's template takes it. `template_renders_tools`: the template
/// reads `tools` and the messages' tool fields itself; otherwise they are written into the
/// messages' text (see the module comment).
pub(super) fn render(
    messages: &[api::ChatMessage],
    tools: Option<&ToolSet>,
    template_renders_tools: bool,
) -> Result<Vec<ChatMessage>, ApiError> {
    let mut out: Vec<ChatMessage> = Vec::with_capacity(messages.len() + 1);
    for (i, message) in messages.iter().enumerate() {
        let mut rendered = ChatMessage::new(&message.role, api::message_text(message, i)?);
        let calls = tool_calls(message, i)?;
        if template_renders_tools {
            if !calls.is_empty() {
                let list = calls
                    .iter()
                    .map(|c| {
                        serde_json::json!({"id": c.id, "type": "function",
                            "function": {"name": c.name, "arguments": c.arguments}})
                    })
                    .collect();
                rendered.tool_calls = Some(Value::Array(list));
            }
            rendered.tool_call_id.clone_from(&message.tool_call_id);
            out.push(rendered);
            continue;
        }
        if !calls.is_empty() {
            let written: Vec<String> = calls
                .iter()
                .map(|c| {
                    let call = serde_json::json!({"name": c.name, "arguments": c.arguments});
                    format!("{OPEN}\n{}\n{CLOSE}", spaced(&call))
                })
                .collect();
            if !rendered.content.is_empty() {
                rendered.content.push('\n');
            }
            rendered.content.push_str(&written.join("\n"));
        }
        if message.role == "tool" {
            let response = format!("<tool_response>\n{}\n</tool_response>", rendered.content);
            // Consecutive results answer one turn's calls: one user turn holds them all.
            match out.last_mut() {
                Some(last) if last.role == "user" && messages[i - 1].role == "tool" => {
                    last.content.push('\n');
                    last.content.push_str(&response);
                }
                _ => out.push(ChatMessage::new("user", response)),
            }
            continue;
        }
        out.push(rendered);
    }
    if let Some(tools) = tools.filter(|t| t.active())
        && !template_renders_tools
    {
        let lines: Vec<String> = tools.tools.iter().map(|t| spaced(&t.definition)).collect();
        let prompt = TOOL_PROMPT.replace("{tools}", &lines.join("\n"));
        match out.first_mut() {
            Some(first) if first.role == "system" || first.role == "developer" => {
                first.content = format!("{}\n\n{prompt}", first.content);
            }
            _ => out.insert(0, ChatMessage::new("system", prompt)),
        }
    }
    Ok(out)
}

/// A call of an assistant message in the conversation.
struct PastCall {
    id: String,
    name: String,
    /// The arguments as JSON (templates print them with `tojson`).
    arguments: Value,
}

fn tool_calls(message: &api::ChatMessage, i: usize) -> Result<Vec<PastCall>, ApiError> {
    let Some(list) = message.tool_calls.as_ref().filter(|l| !l.is_empty()) else {
        return Ok(Vec::new());
    };
    if message.role != "assistant" {
        return Err(ApiError::invalid_value(
            &format!("messages[{i}].tool_calls"),
            "only assistant messages carry tool_calls",
        ));
    }
    list.iter()
        .enumerate()
        .map(|(j, call)| {
            let param = format!("messages[{i}].tool_calls[{j}]");
            let function = call.get("function");
            let name = function
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .ok_or_else(|| {
                    ApiError::invalid_value(
                        &format!("{param}.function.name"),
                        format!("{param} needs function.name"),
                    )
                })?;
            let arguments = match function.and_then(|f| f.get("arguments")) {
                Some(Value::String(text)) => {
                    serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.clone()))
                }
                Some(other) => other.clone(),
                None => Value::Object(serde_json::Map::new()),
            };
            Ok(PastCall {
                id: call
                    .get("id")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned(),
                name: name.to_owned(),
                arguments,
            })
        })
        .collect()
}

/// JSON with Python's `json.dumps` separators (`", "`, `": "`): the form the grammar produces
/// and the default prompt shows.
pub(super) fn spaced(value: &Value) -> String {
    match value {
        Value::Array(items) => {
            let items: Vec<String> = items.iter().map(spaced).collect();
            format!("[{}]", items.join(", "))
        }
        Value::Object(map) => {
            let items: Vec<String> = map
                .iter()
                .map(|(k, v)| {
                    format!(
                        "{}: {}",
                        serde_json::to_string(k).unwrap_or_default(),
                        spaced(v)
                    )
                })
                .collect();
            format!("{{{}}}", items.join(", "))
        }
        other => other.to_string(),
    }
}

/// What a piece of generated text turned out to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Piece {
    /// Text for `content`.
    Content(String),
    /// A call begins: its index in the choice's `tool_calls`, id and function name.
    Call {
        index: usize,
        id: String,
        name: String,
    },
    /// More of call `index`'s arguments (JSON text).
    Arguments { index: usize, text: String },
}

/// The streaming tool-call parser of one choice.
#[derive(Debug)]
pub(super) struct ToolStream {
    /// Call ids are `{id_prefix}{index}`.
    id_prefix: String,
    calls: usize,
    state: State,
}

#[derive(Debug)]
enum State {
    /// Outside a call; `held` may still begin `<tool_call>` (or is whitespace that goes away
    /// if a call follows).
    Text { held: String },
    /// Inside `<tool_call>`: `body` so far; once the name is read, where the arguments start
    /// and how many of their bytes went out.
    Call {
        body: String,
        arguments: Option<(usize, usize)>,
    },
}

impl ToolStream {
    pub(super) fn new(id_prefix: String) -> Self {
        Self {
            id_prefix,
            calls: 0,
            state: State::Text {
                held: String::new(),
            },
        }
    }

    /// Calls found so far.
    pub(super) fn calls(&self) -> usize {
        self.calls
    }

    /// Feeds generated text; returns what can be said about it already.
    pub(super) fn push(&mut self, text: &str) -> Vec<Piece> {
        let mut out = Vec::new();
        let mut input = text.to_owned();
        loop {
            match &mut self.state {
                State::Text { held } => {
                    held.push_str(&input);
                    if let Some(at) = held.find(OPEN) {
                        // Whitespace before a call is layout, not content (it may have been
                        // held back already, so dropping it here keeps the two forms equal).
                        let before = held[..at].trim_end().to_owned();
                        let rest = held[at + OPEN.len()..].to_owned();
                        if !before.is_empty() {
                            out.push(Piece::Content(before));
                        }
                        self.state = State::Call {
                            body: String::new(),
                            arguments: None,
                        };
                        input = rest;
                        continue;
                    }
                    // Hold the tail that may begin a tag, and trailing whitespace.
                    let keep_from = (1..OPEN.len())
                        .rev()
                        .find(|&k| held.len() >= k && held.ends_with(&OPEN[..k]))
                        .map_or(held.len(), |k| held.len() - k);
                    let keep_from = held[..keep_from].trim_end().len();
                    if keep_from > 0 {
                        out.push(Piece::Content(held[..keep_from].to_owned()));
                        held.replace_range(..keep_from, "");
                    }
                    return out;
                }
                State::Call { body, .. } => {
                    body.push_str(&input);
                    if let Some(at) = body.find(CLOSE) {
                        let rest = body[at + CLOSE.len()..].to_owned();
                        body.truncate(at);
                        self.end_call(&mut out, true);
                        self.state = State::Text {
                            held: String::new(),
                        };
                        input = rest;
                        continue;
                    }
                    self.advance_call(&mut out);
                    return out;
                }
            }
        }
    }

    /// The generation ended: what was held back, and a call left open (cut by `max_tokens`,
    /// or a model that never closed the tag).
    pub(super) fn finish(&mut self) -> Vec<Piece> {
        let mut out = Vec::new();
        match &mut self.state {
            State::Text { held } => {
                if !held.is_empty() && (self.calls == 0 || !held.trim().is_empty()) {
                    out.push(Piece::Content(std::mem::take(held)));
                }
            }
            State::Call { .. } => self.end_call(&mut out, false),
        }
        self.state = State::Text {
            held: String::new(),
        };
        out
    }

    /// Inside a call: says the name once it is read, then the arguments as they grow.
    fn advance_call(&mut self, out: &mut Vec<Piece>) {
        let State::Call { body, arguments } = &mut self.state else {
            return;
        };
        if arguments.is_none() {
            let Some((name, start)) = call_head(body) else {
                return;
            };
            let index = self.calls;
            self.calls += 1;
            out.push(Piece::Call {
                index,
                id: format!("{}{index}", self.id_prefix),
                name,
            });
            *arguments = Some((start, 0));
        }
        if let Some((start, sent)) = arguments {
            let end = value_end(&body[*start..]).map_or(body.len(), |e| *start + e);
            if end > *start + *sent {
                out.push(Piece::Arguments {
                    index: self.calls - 1,
                    text: body[*start + *sent..end].to_owned(),
                });
                *sent = end - *start;
            }
        }
    }

    /// The call's body is complete (`closed`) or the output ended inside it.
    fn end_call(&mut self, out: &mut Vec<Piece>, closed: bool) {
        self.advance_call(out);
        let State::Call { body, arguments } = &mut self.state else {
            return;
        };
        if arguments.is_some() {
            return;
        }
        // The name never appeared where the streaming read looks for it: the whole body may
        // still be a call with its keys in another order.
        let parsed: Option<(String, String)> = serde_json::from_str::<Value>(body.trim())
            .ok()
            .and_then(|v| {
                let name = v.get("name")?.as_str()?.to_owned();
                let args = v.get("arguments").or_else(|| v.get("parameters"))?;
                let text = match args {
                    Value::String(s) => s.clone(),
                    other => spaced(other),
                };
                Some((name, text))
            });
        match parsed {
            Some((name, text)) => {
                let index = self.calls;
                self.calls += 1;
                out.push(Piece::Call {
                    index,
                    id: format!("{}{index}", self.id_prefix),
                    name,
                });
                out.push(Piece::Arguments { index, text });
            }
            None => {
                let tail = if closed { CLOSE } else { "" };
                out.push(Piece::Content(format!("{OPEN}{body}{tail}")));
            }
        }
    }
}

/// Reads `{"name": "<name>", "arguments": ` at the start of `body`: the name and where the
/// arguments' value begins, or `None` if that is not (yet) there.
fn call_head(body: &str) -> Option<(String, usize)> {
    let mut at = skip_ws(body, 0);
    at = expect(body, at, "{")?;
    at = expect(body, skip_ws(body, at), "\"name\"")?;
    at = expect(body, skip_ws(body, at), ":")?;
    at = skip_ws(body, at);
    let name_end = string_end(body, at)?;
    let name: String = serde_json::from_str(&body[at..name_end]).ok()?;
    at = expect(body, skip_ws(body, name_end), ",")?;
    at = skip_ws(body, at);
    at = expect(body, at, "\"arguments\"").or_else(|| expect(body, at, "\"parameters\""))?;
    at = expect(body, skip_ws(body, at), ":")?;
    at = skip_ws(body, at);
    // The value must have begun, or trailing whitespace might still be ahead of it.
    (at < body.len()).then_some((name, at))
}

fn skip_ws(s: &str, at: usize) -> usize {
    at + s[at..].len() - s[at..].trim_start().len()
}

fn expect(s: &str, at: usize, what: &str) -> Option<usize> {
    s[at..].starts_with(what).then_some(at + what.len())
}

/// The end (exclusive) of the JSON string starting at `at`, if it is closed.
fn string_end(s: &str, at: usize) -> Option<usize> {
    let bytes = s.as_bytes();
    if bytes.get(at) != Some(&b'"') {
        return None;
    }
    let mut i = at + 1;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => i += 2,
            b'"' => return Some(i + 1),
            _ => i += 1,
        }
    }
    None
}

/// The end (exclusive) of the JSON value at the start of `s`, if it is complete: an object or
/// array is closed, a string is closed; a bare number or literal ends at a delimiter.
fn value_end(s: &str) -> Option<usize> {
    let bytes = s.as_bytes();
    match bytes.first()? {
        b'"' => string_end(s, 0),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut i = 0;
            while i < bytes.len() {
                match bytes[i] {
                    b'"' => {
                        i = string_end(s, i)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(i + 1);
                        }
                    }
                    _ => {}
                }
                i += 1;
            }
            None
        }
        _ => s.find([',', '}', ']', '\n', ' ']),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn weather() -> Value {
        json!({"type": "function", "function": {"name": "get_weather",
            "description": "the weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                "required": ["city"]}}})
    }

    /// Gathers the pieces into (content, [(id, name, arguments)]).
    fn gather(pieces: &[Piece]) -> (String, Vec<(String, String, String)>) {
        let mut content = String::new();
        let mut calls: Vec<(String, String, String)> = Vec::new();
        for piece in pieces {
            match piece {
                Piece::Content(text) => content.push_str(text),
                Piece::Call { index, id, name } => {
                    assert_eq!(*index, calls.len());
                    calls.push((id.clone(), name.clone(), String::new()));
                }
                Piece::Arguments { index, text } => calls[*index].2.push_str(text),
            }
        }
        (content, calls)
    }

    /// The same text split at every byte boundary (and fed whole) gives the same content and
    /// calls: streamed and whole answers agree.
    #[test]
    fn every_split_of_the_output_parses_the_same() {
        // (output, content, [(name, arguments)])
        type Case<'a> = (&'a str, &'a str, Vec<(&'a str, &'a str)>);
        let cases: Vec<Case<'_>> = vec![
            ("no tools here < at all", "no tools here < at all", vec![]),
            (
                "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris {x}\"}}\n</tool_call>",
                "",
                vec![("get_weather", "{\"city\": \"Paris {x}\"}")],
            ),
            (
                "Let me check.\n<tool_call>\n{\"name\": \"a\", \"arguments\": {}}\n</tool_call>\n<tool_call>\n{\"arguments\": {\"k\": [1, 2]}, \"name\": \"b\"}\n</tool_call>\n",
                "Let me check.",
                vec![("a", "{}"), ("b", "{\"k\": [1, 2]}")],
            ),
            (
                "<tool_call>\nnot json\n</tool_call> after",
                "<tool_call>\nnot json\n</tool_call> after",
                vec![],
            ),
            (
                "<tool_call>\n{\"name\": \"cut\", \"arguments\": {\"a\": \"hal",
                "",
                vec![("cut", "{\"a\": \"hal")],
            ),
            ("<tool_ca", "<tool_ca", vec![]),
        ];
        for (text, content, calls) in cases {
            let mut whole = ToolStream::new("call_x".into());
            let mut pieces = whole.push(text);
            pieces.extend(whole.finish());
            let expected = gather(&pieces);
            assert_eq!(expected.0, content, "{text:?}");
            let got: Vec<(&str, &str)> = expected
                .1
                .iter()
                .map(|(_, n, a)| (n.as_str(), a.as_str()))
                .collect();
            assert_eq!(got, calls, "{text:?}");
            for (i, (id, _, _)) in expected.1.iter().enumerate() {
                assert_eq!(id, &format!("call_x{i}"));
            }
            for cut in 1..text.len() {
                if !text.is_char_boundary(cut) {
                    continue;
                }
                let mut split = ToolStream::new("call_x".into());
                let mut pieces = split.push(&text[..cut]);
                pieces.extend(split.push(&text[cut..]));
                pieces.extend(split.finish());
                assert_eq!(gather(&pieces), expected, "{text:?} cut at {cut}");
            }
        }
    }

    /// Arguments stream as they are generated: the name goes out before the arguments end.
    #[test]
    fn the_name_and_arguments_stream_before_the_call_closes() {
        let mut stream = ToolStream::new("c".into());
        let pieces = stream.push("<tool_call>\n{\"name\": \"f\", \"arguments\": {\"a\": ");
        assert_eq!(
            pieces,
            vec![
                Piece::Call {
                    index: 0,
                    id: "c0".into(),
                    name: "f".into()
                },
                Piece::Arguments {
                    index: 0,
                    text: "{\"a\": ".into()
                }
            ]
        );
        let pieces = stream.push("1}}\n</tool");
        assert_eq!(
            pieces,
            vec![Piece::Arguments {
                index: 0,
                text: "1}".into()
            }]
        );
        assert!(stream.push("_call>").is_empty());
        assert!(stream.finish().is_empty());
        assert_eq!(stream.calls(), 1);
    }

    #[test]
    fn tools_and_tool_choice_are_checked_naming_the_field() {
        let ok = read(&json!({"tools": [weather()], "tool_choice": "required",
            "parallel_tool_calls": false}))
        .unwrap()
        .unwrap();
        assert_eq!(ok.choice, ToolChoice::Required);
        assert!(!ok.parallel);
        let named = read(&json!({"tools": [weather()],
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}))
        .unwrap()
        .unwrap();
        assert_eq!(named.choice, ToolChoice::Named("get_weather".into()));
        assert!(read(&json!({"tools": []})).unwrap().is_none());
        assert!(
            read(&json!({"tool_choice": "none"})).unwrap().is_none(),
            "none without tools asks for nothing"
        );
        let bad: Vec<(Value, &str)> = vec![
            (json!({"tool_choice": "auto"}), "tool_choice"),
            (json!({"tools": [{"type": "retrieval"}]}), "tools[0].type"),
            (
                json!({"tools": [{"type": "function", "function": {"name": "a b"}}]}),
                "tools[0].function.name",
            ),
            (
                json!({"tools": [weather(), weather()]}),
                "tools[1].function.name",
            ),
            (
                json!({"tools": [{"type": "function", "function": {"name": "f", "parameters": 3}}]}),
                "tools[0].function.parameters",
            ),
            (
                json!({"tools": [weather()], "tool_choice": "sometimes"}),
                "tool_choice",
            ),
            (
                json!({"tools": [weather()], "tool_choice": {"type": "function", "function": {"name": "nope"}}}),
                "tool_choice.function.name",
            ),
            (
                json!({"tools": [weather()], "parallel_tool_calls": "yes"}),
                "parallel_tool_calls",
            ),
        ];
        for (body, param) in bad {
            let error = read(&body).unwrap_err();
            assert_eq!(
                error.param.as_deref(),
                Some(param),
                "{body}: {}",
                error.message
            );
        }
    }

    #[test]
    fn the_default_prompt_writes_tools_calls_and_results_into_the_text() {
        let tools = read(&json!({"tools": [weather()]})).unwrap();
        let messages: Vec<api::ChatMessage> = serde_json::from_value(json!([
            {"role": "user", "content": "weather in Paris?"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function",
                "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
            {"role": "tool", "tool_call_id": "c2", "content": "warm"},
        ]))
        .unwrap();
        let out = render(&messages, tools.as_ref(), false).unwrap();
        let roles: Vec<&str> = out.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(roles, ["system", "user", "assistant", "user"]);
        assert!(out[0].content.starts_with("# Tools"), "{}", out[0].content);
        assert!(out[0].content.contains(&spaced(&weather())));
        assert_eq!(
            out[2].content,
            "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>"
        );
        assert_eq!(
            out[3].content,
            "<tool_response>\nsunny\n</tool_response>\n<tool_response>\nwarm\n</tool_response>"
        );
        // A template that renders tools gets the fields instead.
        let native = render(&messages, tools.as_ref(), true).unwrap();
        assert_eq!(native.len(), 4);
        assert_eq!(
            native[1].tool_calls.as_ref().unwrap()[0]["function"]["arguments"],
            json!({"city": "Paris"})
        );
        assert_eq!(native[2].tool_call_id.as_deref(), Some("c1"));
    }

    #[test]
    fn forced_choices_compile_to_a_grammar_and_auto_to_none() {
        let body = json!({"tools": [weather(), {"type": "function", "function": {"name": "noop"}}],
            "tool_choice": "required"});
        let Some(Constraint::Lark(grammar)) = read(&body).unwrap().unwrap().constraint() else {
            panic!("required is constrained");
        };
        assert!(grammar.contains("anyOf") && grammar.contains("(\"\\n\" call)*"));
        let auto = read(&json!({"tools": [weather()]})).unwrap().unwrap();
        assert_eq!(auto.constraint(), None);
    }
}
