//! Tool calling: `tools`, `tool_choice` and `parallel_tool_calls` read and checked
//! ([`read`]); tool definitions and tool messages rendered into the prompt ([`render`]); and the
//! grammar that makes `required` and a named function always produce valid calls
//! ([`ToolSet::constraint`]). The output is parsed into `tool_calls` by the parser of the
//! model's format (`parsers.rs`).
//!
//! Four formats ([`ToolParserKind`]): Hermes' (Qwen and many fine-tunes),
//! `<tool_call>\n{"name": "f", "arguments": {...}}\n</tool_call>`; Llama 3's JSON
//! `{"name": "f", "parameters": {...}}`; Mistral's `[TOOL_CALLS] [{"name": …, "arguments": …}]`;
//! and pythonic `[f(a=1)]`. A template that reads `tools` itself gets the definitions and the
//! messages' `tool_calls` as `transformers` passes them; a template that does not (SmolLM2's
//! plain ChatML) gets the format's default prompt ([`default_prompt`]) in the system message,
//! assistant calls written in the format and tool results as `<tool_response>` user turns, as
//! vLLM's and llama.cpp's generic tool prompts do. With `required` or a named function the
//! output is constrained (llguidance, a Lark grammar embedding each function's parameter
//! schema, in the model's format), so even a 135M model produces calls whose arguments
//! validate; with `auto` the model chooses and the parser finds the calls it made.

use kvfleet_model::ChatMessage;
use kvfleet_proto::Constraint;
use serde_json::Value;

use super::api::{self, ApiError};
use super::parsers::{python_literal, spaced};
use crate::worker::ToolParserKind;

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

/// The Hermes tool prompt for templates that do not render tools (Qwen 2.5's wording, the
/// format the parser reads); the definitions, one JSON object a line, go between the tags.
pub(super) const TOOL_PROMPT: &str = "# Tools\n\nYou may call one or more functions to assist \
with the user query.\n\nYou are provided with function signatures within <tools></tools> XML \
tags:\n<tools>\n{tools}\n</tools>\n\nFor each function call, return a json object with function \
name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": \
<function-name>, \"arguments\": <args-json-object>}\n</tool_call>";

/// Llama 3's: Meta's wording for JSON tool calls (Llama 3.1/3.2 model cards).
const LLAMA3_PROMPT: &str = "Given the following functions, please respond with a JSON for a \
function call with its proper arguments that best answers the given prompt.\n\nRespond in the \
format {\"name\": function name, \"parameters\": dictionary of argument name and its value}. \
Do not use variables.\n\n{tools}";

/// Mistral's list form.
const MISTRAL_PROMPT: &str = "# Tools\n\nYou may call one or more functions to assist with the \
user query. The functions, one JSON object a line:\n{tools}\n\nTo call functions, answer with \
[TOOL_CALLS] followed by a JSON list of calls:\n[TOOL_CALLS] [{\"name\": <function-name>, \
\"arguments\": <args-json-object>}]";

/// Pythonic: the wording of vLLM's Llama 3.2 pythonic template.
const PYTHONIC_PROMPT: &str = "You are an expert in composing functions. You are given a \
question and a set of possible functions. Based on the question, you will need to make one or \
more function/tool calls to achieve the purpose.\n\nIf you decide to invoke any of the \
function(s), you MUST put it in the format of [func_name1(params_name1=params_value1, \
params_name2=params_value2...), func_name2(params)]\nYou SHOULD NOT include any other text in \
the response if you call a function.\nHere is a list of functions in JSON format that you can \
invoke.\n{tools}";

/// The default tool prompt of `format`, for templates that do not render tools; `{tools}`
/// stands for the definitions, one JSON object a line.
pub(super) fn default_prompt(format: ToolParserKind) -> &'static str {
    match format {
        ToolParserKind::Hermes => TOOL_PROMPT,
        ToolParserKind::Llama3Json => LLAMA3_PROMPT,
        ToolParserKind::Mistral => MISTRAL_PROMPT,
        ToolParserKind::Pythonic => PYTHONIC_PROMPT,
    }
}

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

    /// The grammar for `required` and a named function, in the model's `format`: one call
    /// (or, with parallel calls, one or more) of the allowed functions, each with arguments
    /// valid against the function's parameters. Properties a parameters object does not name
    /// are not generated unless it says `additionalProperties` itself (a small model otherwise
    /// invents keys until `max_tokens`). `None` for `auto` and `none`; an error when the
    /// format cannot spell a function's parameters (pythonic calls need named parameters).
    pub(super) fn constraint(
        &self,
        format: ToolParserKind,
    ) -> Result<Option<Constraint>, ApiError> {
        let allowed: Vec<&Tool> = match &self.choice {
            ToolChoice::None | ToolChoice::Auto => return Ok(None),
            ToolChoice::Required => self.tools.iter().collect(),
            ToolChoice::Named(name) => self.tools.iter().filter(|t| &t.name == name).collect(),
        };
        let literal = |s: &str| serde_json::to_string(s).unwrap_or_default();
        let parallel = self.parallel && self.choice == ToolChoice::Required;
        if format == ToolParserKind::Pythonic {
            let mut rules = Vec::with_capacity(allowed.len());
            for (i, tool) in allowed.iter().enumerate() {
                rules.push(format!("call{i}: {}", python_call_rule(tool)?));
            }
            let calls: Vec<String> = (0..allowed.len()).map(|i| format!("call{i}")).collect();
            let repeat = if parallel {
                format!(" ({} call)*", literal(", "))
            } else {
                String::new()
            };
            return Ok(Some(Constraint::Lark(format!(
                "start: {} call{repeat} {}\ncall: {}\n{}\n",
                literal("["),
                literal("]"),
                calls.join(" | "),
                rules.join("\n")
            ))));
        }
        let arguments_key = match format {
            ToolParserKind::Llama3Json => "parameters",
            _ => "arguments",
        };
        let calls: Vec<Value> = allowed
            .iter()
            .map(|tool| {
                let parameters = closed(&tool.parameters);
                serde_json::json!({"type": "object",
                    "properties": {"name": {"const": tool.name}, arguments_key: parameters},
                    "required": ["name", arguments_key], "additionalProperties": false})
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
        let (open, separator, close) = match format {
            ToolParserKind::Hermes => (format!("{OPEN}\n"), "\n", format!("\n{CLOSE}")),
            ToolParserKind::Llama3Json => (String::new(), "; ", String::new()),
            // The list is one region: the calls go inside it.
            _ => (String::new(), ", ", String::new()),
        };
        let repeat = if parallel {
            format!(" ({} call)*", literal(separator))
        } else {
            String::new()
        };
        // An empty literal is not a Lark terminal: the bare formats have none.
        let before = if open.is_empty() {
            String::new()
        } else {
            format!("{} ", literal(&open))
        };
        let after = if close.is_empty() {
            String::new()
        } else {
            format!(" {}", literal(&close))
        };
        let call = format!("call: {before}%json {schema}{after}");
        let grammar = if format == ToolParserKind::Mistral {
            format!(
                "start: {} call{repeat} {}\n{call}\n",
                literal("[TOOL_CALLS] ["),
                literal("]")
            )
        } else {
            format!("start: call{repeat}\n{call}\n")
        };
        Ok(Some(Constraint::Lark(grammar)))
    }
}

/// `parameters` with `additionalProperties: false` when it is an object schema that does not
/// say.
fn closed(parameters: &Value) -> Value {
    let mut parameters = parameters.clone();
    if let Some(object) = parameters.as_object_mut()
        && object.get("type").and_then(Value::as_str) == Some("object")
        && !object.contains_key("additionalProperties")
    {
        object.insert("additionalProperties".into(), Value::Bool(false));
    }
    parameters
}

/// The Lark rule of one forced pythonic call: `name(` the required parameters, each
/// `key=<JSON value valid against its schema>` (JSON's literals read as Python's), `)`.
fn python_call_rule(tool: &Tool) -> Result<String, ApiError> {
    let literal = |s: &str| serde_json::to_string(s).unwrap_or_default();
    let properties = tool.parameters.get("properties").and_then(Value::as_object);
    let required: Vec<&str> = tool
        .parameters
        .get("required")
        .and_then(Value::as_array)
        .map(|r| r.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let mut parts = vec![literal(&format!("{}(", tool.name))];
    for (i, key) in required.iter().enumerate() {
        let schema = properties.and_then(|p| p.get(*key));
        let identifier = !key.is_empty()
            && !key.starts_with(|c: char| c.is_ascii_digit())
            && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        let (Some(schema), true) = (schema, identifier) else {
            return Err(ApiError::invalid_value(
                "tool_choice",
                format!(
                    "function {:?}: required parameter {key:?} cannot be written as a pythonic \
                     keyword argument (a forced call with the pythonic tool parser needs each \
                     required parameter named in `properties` by an identifier)",
                    tool.name
                ),
            ));
        };
        let separator = if i == 0 { "" } else { ", " };
        parts.push(literal(&format!("{separator}{key}=")));
        let mut schema = closed(schema);
        if let Some(object) = schema.as_object_mut() {
            object.insert(
                "x-guidance".into(),
                serde_json::json!({"whitespace_flexible": false,
                    "item_separator": ", ", "key_separator": ": "}),
            );
        }
        parts.push(format!("%json {schema}"));
    }
    parts.push(literal(")"));
    Ok(parts.join(" "))
}

/// The conversation as the model's template takes it. `template_renders_tools`: the template
/// reads `tools` and the messages' tool fields itself; otherwise they are written into the
/// messages' text (see the module comment).
pub(super) fn render(
    messages: &[api::ChatMessage],
    tools: Option<&ToolSet>,
    template_renders_tools: bool,
    format: ToolParserKind,
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
            if !rendered.content.is_empty() {
                rendered.content.push('\n');
            }
            rendered.content.push_str(&write_calls(&calls, format));
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
        let prompt = default_prompt(format).replace("{tools}", &lines.join("\n"));
        match out.first_mut() {
            Some(first) if first.role == "system" || first.role == "developer" => {
                first.content = format!("{}\n\n{prompt}", first.content);
            }
            _ => out.insert(0, ChatMessage::new("system", prompt)),
        }
    }
    Ok(out)
}

/// An assistant turn's calls as the model writes them in `format`.
fn write_calls(calls: &[PastCall], format: ToolParserKind) -> String {
    let json = |c: &PastCall, key: &str| {
        let mut call = serde_json::Map::new();
        call.insert("name".into(), Value::String(c.name.clone()));
        call.insert(key.into(), c.arguments.clone());
        spaced(&Value::Object(call))
    };
    match format {
        ToolParserKind::Hermes => {
            let written: Vec<String> = calls
                .iter()
                .map(|c| format!("{OPEN}\n{}\n{CLOSE}", json(c, "arguments")))
                .collect();
            written.join("\n")
        }
        ToolParserKind::Llama3Json => {
            let written: Vec<String> = calls.iter().map(|c| json(c, "parameters")).collect();
            written.join("; ")
        }
        ToolParserKind::Mistral => {
            let written: Vec<String> = calls.iter().map(|c| json(c, "arguments")).collect();
            format!("[TOOL_CALLS] [{}]", written.join(", "))
        }
        ToolParserKind::Pythonic => {
            let written: Vec<String> = calls
                .iter()
                .map(|c| {
                    let arguments: Vec<String> = match &c.arguments {
                        Value::Object(map) => map
                            .iter()
                            .map(|(k, v)| format!("{k}={}", python_literal(v)))
                            .collect(),
                        _ => Vec::new(),
                    };
                    format!("{}({})", c.name, arguments.join(", "))
                })
                .collect();
            format!("[{}]", written.join(", "))
        }
    }
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
        let out = render(&messages, tools.as_ref(), false, ToolParserKind::Hermes).unwrap();
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
        // Each format writes past calls its own way.
        let written = |format| {
            render(&messages, tools.as_ref(), false, format).unwrap()[2]
                .content
                .clone()
        };
        assert_eq!(
            written(ToolParserKind::Llama3Json),
            "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\"}}"
        );
        assert_eq!(
            written(ToolParserKind::Mistral),
            "[TOOL_CALLS] [{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}]"
        );
        assert_eq!(
            written(ToolParserKind::Pythonic),
            "[get_weather(city=\"Paris\")]"
        );
        let native = render(&messages, tools.as_ref(), true, ToolParserKind::Hermes).unwrap();
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
        let set = read(&body).unwrap().unwrap();
        let Some(Constraint::Lark(grammar)) = set.constraint(ToolParserKind::Hermes).unwrap()
        else {
            panic!("required is constrained");
        };
        assert!(grammar.contains("anyOf") && grammar.contains("(\"\\n\" call)*"));
        let auto = read(&json!({"tools": [weather()]})).unwrap().unwrap();
        assert_eq!(auto.constraint(ToolParserKind::Hermes).unwrap(), None);
        // Each format's grammar writes its own calls.
        let Some(Constraint::Lark(llama)) = set.constraint(ToolParserKind::Llama3Json).unwrap()
        else {
            panic!("constrained");
        };
        assert!(
            llama.contains("\"parameters\"") && llama.contains("(\"; \" call)*"),
            "{llama}"
        );
        assert!(!llama.contains("\"\""), "no empty literal: {llama}");
        let Some(Constraint::Lark(mistral)) = set.constraint(ToolParserKind::Mistral).unwrap()
        else {
            panic!("constrained");
        };
        assert!(
            mistral.starts_with("start: \"[TOOL_CALLS] [\" call (\", \" call)* \"]\""),
            "{mistral}"
        );
        let Some(Constraint::Lark(python)) = set.constraint(ToolParserKind::Pythonic).unwrap()
        else {
            panic!("constrained");
        };
        assert!(
            python.contains("call0: \"get_weather(\" \"city=\" %json {"),
            "{python}"
        );
        assert!(python.contains("call1: \"noop(\" \")\""), "{python}");
        let unnamed = json!({"tools": [{"type": "function", "function": {"name": "f",
            "parameters": {"type": "object", "properties": {"first-name": {"type": "string"}},
                "required": ["first-name"]}}}], "tool_choice": "required"});
        let error = read(&unnamed)
            .unwrap()
            .unwrap()
            .constraint(ToolParserKind::Pythonic)
            .unwrap_err();
        assert_eq!(error.param.as_deref(), Some("tool_choice"));
    }
}
