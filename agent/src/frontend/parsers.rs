//! Generated text → what a chat answer carries: `reasoning_content`, `content` and
//! `tool_calls`, piece by piece as it streams ([`OutputParser`]).
//!
//! Two stages, each a state machine fed whatever text the worker produced since the last
//! push: the reasoning parser ([`ReasoningStream`]) splits `<think>…</think>` off the start of
//! the output, and what follows goes to the tool-call parser of the model's format
//! ([`ToolStream`], one state machine for the four formats of [`ToolParserKind`]). A streamed
//! and a whole answer run the same machine — the whole answer is the streamed pieces gathered
//! — and every decision depends only on the text, never on where it was cut: a marker cut in
//! two is held back until it is whole or cannot be one, so any split of the same output gives
//! the same result (the tests cut recorded outputs at every byte).
//!
//! Text that only looks like a call (a marker followed by something that is not one) goes out
//! as content, marker included; nothing here panics on any input.

use serde_json::Value;

use crate::worker::{ReasoningParserKind, ToolParserKind};

/// JSON with Python's `json.dumps` separators (`", "`, `": "`): the form the grammar produces
/// and the default prompt shows.
pub(super) fn spaced(value: &Value) -> String {
    render(value, false)
}

/// A JSON value as a Python literal (JSON strings, numbers, lists and dicts already are; `null`,
/// `true` and `false` are `None`, `True` and `False`), as pythonic tool calls write arguments.
pub(super) fn python_literal(value: &Value) -> String {
    render(value, true)
}

fn render(value: &Value, python: bool) -> String {
    match value {
        Value::Null if python => "None".into(),
        Value::Bool(true) if python => "True".into(),
        Value::Bool(false) if python => "False".into(),
        Value::Array(items) => {
            let items: Vec<String> = items.iter().map(|v| render(v, python)).collect();
            format!("[{}]", items.join(", "))
        }
        Value::Object(map) => {
            let items: Vec<String> = map
                .iter()
                .map(|(k, v)| {
                    format!(
                        "{}: {}",
                        serde_json::to_string(k).unwrap_or_default(),
                        render(v, python)
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
    /// Text for `reasoning_content`.
    Reasoning(String),
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

const THINK_OPEN: &str = "<think>";
const THINK_CLOSE: &str = "</think>";
const HERMES_OPEN: &str = "<tool_call>";
const HERMES_CLOSE: &str = "</tool_call>";
const PYTHON_TAG: &str = "<|python_tag|>";
const MISTRAL_OPEN: &str = "[TOOL_CALLS]";
const MISTRAL_ARGS: &str = "[ARGS]";

/// The special tokens whose text the parsers read: a tokenizer that marks them special spells
/// no text for them, so the codec keeps these few as text (`models.rs`).
pub(super) const MARKER_TOKENS: &[&str] = &[
    THINK_OPEN,
    THINK_CLOSE,
    HERMES_OPEN,
    HERMES_CLOSE,
    PYTHON_TAG,
    MISTRAL_OPEN,
    MISTRAL_ARGS,
];

/// The tool-call format a chat template implies: the markers it writes (a template without
/// any, or without tool support, gets the default Hermes-format prompt, so Hermes).
pub(super) fn detect_tools(template: Option<&str>) -> ToolParserKind {
    let Some(t) = template else {
        return ToolParserKind::Hermes;
    };
    if t.contains(MISTRAL_OPEN) {
        ToolParserKind::Mistral
    } else if t.contains("[func_name1(") {
        // vLLM's and Meta's pythonic templates show the model this example call.
        ToolParserKind::Pythonic
    } else if t.contains(HERMES_OPEN) {
        ToolParserKind::Hermes
    } else if t.contains(PYTHON_TAG) || (t.contains("<|eom_id|>") && t.contains("parameters")) {
        ToolParserKind::Llama3Json
    } else {
        ToolParserKind::Hermes
    }
}

/// The reasoning format a chat template implies: none unless it writes `<think>`;
/// DeepSeek R1's when its generation prompt opens `<think>` without closing it (the output
/// then starts inside the reasoning), `<think>` at the start of the output otherwise (Qwen 3,
/// whose generation prompt closes an empty one when thinking is off).
pub(super) fn detect_reasoning(template: Option<&str>) -> ReasoningParserKind {
    let Some(t) = template.filter(|t| t.contains(THINK_OPEN)) else {
        return ReasoningParserKind::Off;
    };
    let generation = t.rfind("add_generation_prompt").map_or("", |at| &t[at..]);
    if generation.contains(THINK_OPEN) && !generation.contains(THINK_CLOSE) {
        ReasoningParserKind::DeepSeekR1
    } else {
        ReasoningParserKind::Think
    }
}

/// The parser of one chat choice: reasoning first, then content and tool calls.
#[derive(Debug)]
pub(super) struct OutputParser {
    reasoning: Option<ReasoningStream>,
    tools: Option<ToolStream>,
}

impl OutputParser {
    /// `None` when there is nothing to parse (no reasoning format, no active tools): the
    /// text is all content.
    pub(super) fn new(
        reasoning: ReasoningParserKind,
        tools: Option<(ToolParserKind, String)>,
    ) -> Option<Self> {
        let reasoning = match reasoning {
            ReasoningParserKind::Off => None,
            ReasoningParserKind::Think => Some(ReasoningStream::new(false)),
            ReasoningParserKind::DeepSeekR1 => Some(ReasoningStream::new(true)),
        };
        let tools = tools.map(|(format, id_prefix)| ToolStream::new(format, id_prefix));
        (reasoning.is_some() || tools.is_some()).then_some(Self { reasoning, tools })
    }

    /// Feeds generated text; returns what can be said about it already.
    pub(super) fn push(&mut self, text: &str) -> Vec<Piece> {
        self.step(text, false)
    }

    /// The generation ended: what was held back.
    pub(super) fn finish(&mut self) -> Vec<Piece> {
        self.step("", true)
    }

    /// Tool calls found so far.
    pub(super) fn calls(&self) -> usize {
        self.tools.as_ref().map_or(0, |t| t.calls)
    }

    fn step(&mut self, text: &str, eof: bool) -> Vec<Piece> {
        let first = match &mut self.reasoning {
            Some(reasoning) => reasoning.run(text, eof),
            None => vec![Piece::Content(text.to_owned())],
        };
        let Some(tools) = &mut self.tools else {
            return first
                .into_iter()
                .filter(|p| !matches!(p, Piece::Content(t) | Piece::Reasoning(t) if t.is_empty()))
                .collect();
        };
        let mut out = Vec::new();
        for piece in first {
            match piece {
                Piece::Content(text) => out.extend(tools.run(&text, false)),
                Piece::Reasoning(text) if text.is_empty() => {}
                other => out.push(other),
            }
        }
        if eof {
            out.extend(tools.run("", true));
        }
        out
    }
}

/// Splits `<think>…</think>` off the start of the output.
#[derive(Debug)]
pub(super) struct ReasoningStream {
    /// DeepSeek R1: the output begins inside the reasoning.
    starts_inside: bool,
    state: Reasoning,
}

#[derive(Debug)]
enum Reasoning {
    /// Nothing decided yet: `held` is whitespace or the beginning of `<think>`.
    Start { held: String },
    /// In the reasoning; `held` may be the beginning of `</think>`.
    Inside { held: String },
    /// After it: content. `strip`: whitespace between `</think>` and the content is layout.
    After { strip: bool },
}

impl ReasoningStream {
    fn new(starts_inside: bool) -> Self {
        Self {
            starts_inside,
            state: Reasoning::Start {
                held: String::new(),
            },
        }
    }

    /// Reasoning and content pieces for `text` (content as it came: the tool parser reads it).
    fn run(&mut self, text: &str, eof: bool) -> Vec<Piece> {
        let mut out = Vec::new();
        let mut input = text.to_owned();
        loop {
            match &mut self.state {
                Reasoning::Start { held } => {
                    held.push_str(&input);
                    let trimmed = held.trim_start();
                    if let Some(rest) = trimmed.strip_prefix(THINK_OPEN) {
                        input = rest.to_owned();
                        self.state = Reasoning::Inside {
                            held: String::new(),
                        };
                        continue;
                    }
                    if THINK_OPEN.starts_with(trimmed) && !eof {
                        return out;
                    }
                    input = std::mem::take(held);
                    if self.starts_inside {
                        self.state = Reasoning::Inside {
                            held: String::new(),
                        };
                    } else {
                        self.state = Reasoning::After { strip: false };
                    }
                }
                Reasoning::Inside { held } => {
                    held.push_str(&input);
                    if let Some(at) = held.find(THINK_CLOSE) {
                        out.push(Piece::Reasoning(held[..at].to_owned()));
                        input = held[at + THINK_CLOSE.len()..].to_owned();
                        self.state = Reasoning::After { strip: true };
                        continue;
                    }
                    let keep = if eof {
                        0
                    } else {
                        partial_suffix(held, THINK_CLOSE)
                    };
                    let send = held.len() - keep;
                    out.push(Piece::Reasoning(held[..send].to_owned()));
                    held.replace_range(..send, "");
                    return out;
                }
                Reasoning::After { strip } => {
                    let text = if *strip {
                        let trimmed = input.trim_start();
                        if !trimmed.is_empty() {
                            *strip = false;
                        }
                        trimmed
                    } else {
                        &input
                    };
                    out.push(Piece::Content(text.to_owned()));
                    return out;
                }
            }
        }
    }
}

/// The length of the longest end of `text` that begins `marker` (without being all of it):
/// what must be held back in case the marker is being cut in two.
fn partial_suffix(text: &str, marker: &str) -> usize {
    (1..marker.len())
        .rev()
        .find(|&k| text.ends_with(&marker[..k]))
        .unwrap_or(0)
}

/// The streaming tool-call parser of one choice.
#[derive(Debug)]
pub(super) struct ToolStream {
    format: ToolParserKind,
    /// Call ids are `{id_prefix}{index}`.
    id_prefix: String,
    calls: usize,
    /// Only whitespace so far: bare Llama 3 JSON and pythonic calls begin only there.
    at_start: bool,
    /// Calls just ended: whitespace between them and what follows is layout.
    strip: bool,
    state: State,
    out: Vec<Piece>,
}

#[derive(Debug)]
enum State {
    /// Outside calls; `held` may still begin a marker (or is whitespace that goes away if a
    /// call follows).
    Text { held: String },
    /// After a marker (or, for bare JSON and pythonic, at the `{` or `[` that begins calls).
    Calls(Region),
}

/// Text after a call marker, read as the format's calls.
#[derive(Debug)]
struct Region {
    /// The marker that opened it and the whitespace before it; given back as content if no
    /// call follows.
    marker: &'static str,
    ws: String,
    /// The text after the marker.
    buf: String,
    /// Where the next item (or separator) begins in `buf`.
    cursor: usize,
    /// Calls read in this region.
    items: usize,
    /// A call was read and a separator (or the end) is next.
    after_item: bool,
    /// Mistral: the `[`-list form (`None` until its first character is read).
    list: Option<bool>,
    /// The call whose name went out and whose arguments are streaming.
    open: Option<Open>,
    /// Where the current call object's and its arguments' JSON scans got to: each push
    /// scans only the new text.
    object_scan: JsonScan,
    args_scan: JsonScan,
    /// Hermes: `</tool_call>` is not in `buf` before this.
    close_from: usize,
    /// Pythonic: `buf`'s length when the current call was last read.
    tried: usize,
}

#[derive(Debug, Clone, Copy)]
struct Open {
    index: usize,
    /// Where its arguments' JSON begins in `buf`.
    args: usize,
    /// Bytes of the arguments sent.
    sent: usize,
}

/// How a region went.
enum Outcome {
    /// More text is needed.
    Wait,
    /// The calls ended; text resumes at `buf[rest..]`.
    Done { rest: usize },
    /// Not (or no more) calls from `buf[from..]`: that text is content again.
    Failed { from: usize },
}

impl ToolStream {
    pub(super) fn new(format: ToolParserKind, id_prefix: String) -> Self {
        Self {
            format,
            id_prefix,
            calls: 0,
            at_start: true,
            strip: false,
            state: State::Text {
                held: String::new(),
            },
            out: Vec::new(),
        }
    }

    fn call(&mut self, name: String) -> usize {
        let index = self.calls;
        self.calls += 1;
        let id = match self.format {
            // Mistral's templates refuse any call id but 9 letters and digits when the call
            // comes back in the conversation.
            ToolParserKind::Mistral => mistral_id(&self.id_prefix, index),
            _ => format!("{}{index}", self.id_prefix),
        };
        self.out.push(Piece::Call { index, id, name });
        index
    }

    fn arguments(&mut self, index: usize, text: &str) {
        if !text.is_empty() {
            self.out.push(Piece::Arguments {
                index,
                text: text.to_owned(),
            });
        }
    }

    fn content(&mut self, text: &str) {
        if !text.is_empty() {
            self.at_start = false;
            self.out.push(Piece::Content(text.to_owned()));
        }
    }

    /// Where calls begin in `held`: the marker's position and length, and the marker.
    fn find_start(&self, held: &str) -> Option<(usize, usize, &'static str)> {
        let marker = |m: &'static str| held.find(m).map(|at| (at, m.len(), m));
        let bare = |c: char| {
            let at = held.len() - held.trim_start().len();
            (self.at_start && held[at..].starts_with(c)).then_some((at, 0, ""))
        };
        match self.format {
            ToolParserKind::Hermes => marker(HERMES_OPEN),
            ToolParserKind::Mistral => marker(MISTRAL_OPEN),
            ToolParserKind::Llama3Json => marker(PYTHON_TAG).or_else(|| bare('{')),
            ToolParserKind::Pythonic => bare('['),
        }
    }

    fn marker(&self) -> &'static str {
        match self.format {
            ToolParserKind::Hermes => HERMES_OPEN,
            ToolParserKind::Mistral => MISTRAL_OPEN,
            ToolParserKind::Llama3Json => PYTHON_TAG,
            ToolParserKind::Pythonic => "",
        }
    }

    /// Feeds `text` (`eof`: the output ended); returns the pieces it settled.
    fn run(&mut self, text: &str, eof: bool) -> Vec<Piece> {
        let mut input = text.to_owned();
        loop {
            let state = std::mem::replace(
                &mut self.state,
                State::Text {
                    held: String::new(),
                },
            );
            match state {
                State::Text { mut held } => {
                    held.push_str(&input);
                    input.clear();
                    if self.strip {
                        let trimmed = held.trim_start().len();
                        held.replace_range(..held.len() - trimmed, "");
                        self.strip = held.is_empty();
                    }
                    if let Some((at, len, marker)) = self.find_start(&held) {
                        // Whitespace before a call is layout, not content (it was held back,
                        // so dropping it here keeps the two forms equal); it comes back if
                        // no call follows.
                        let before = held[..at].trim_end().to_owned();
                        let ws = held[before.len()..at].to_owned();
                        self.content(&before);
                        self.at_start = false;
                        self.state = State::Calls(Region {
                            marker,
                            ws,
                            buf: held[at + len..].to_owned(),
                            cursor: 0,
                            items: 0,
                            after_item: false,
                            list: None,
                            open: None,
                            object_scan: JsonScan::default(),
                            args_scan: JsonScan::default(),
                            close_from: 0,
                            tried: 0,
                        });
                        continue;
                    }
                    if eof {
                        // Whitespace after calls is layout; an answer of whitespace is kept.
                        if self.calls == 0 || !held.trim().is_empty() {
                            self.content(&held);
                        }
                        break;
                    }
                    // Hold the tail that may begin a marker, and trailing whitespace.
                    let marker = self.marker();
                    let keep_from = held.len() - partial_suffix(&held, marker);
                    let keep_from = held[..keep_from].trim_end().len();
                    self.content(&held[..keep_from]);
                    held.replace_range(..keep_from, "");
                    self.state = State::Text { held };
                    break;
                }
                State::Calls(mut region) => {
                    region.buf.push_str(&input);
                    input.clear();
                    let outcome = match self.format {
                        ToolParserKind::Hermes => self.hermes(&mut region, eof),
                        ToolParserKind::Llama3Json => self.llama3(&mut region, eof),
                        ToolParserKind::Mistral => self.mistral(&mut region, eof),
                        ToolParserKind::Pythonic => self.pythonic(&mut region, eof),
                    };
                    match outcome {
                        Outcome::Wait => {
                            self.state = State::Calls(region);
                            break;
                        }
                        Outcome::Done { rest } => {
                            self.strip = true;
                            input = region.buf.get(rest..).unwrap_or_default().to_owned();
                        }
                        Outcome::Failed { from } => {
                            if region.items == 0 {
                                let given_back = format!("{}{}", region.ws, region.marker);
                                self.content(&given_back);
                            } else {
                                self.strip = true;
                            }
                            self.at_start = false;
                            input = region.buf.get(from..).unwrap_or_default().to_owned();
                        }
                    }
                }
            }
        }
        std::mem::take(&mut self.out)
    }

    /// Streams the JSON call object at `r.buf[start..limit]`: `Ok(Some(end))` once it is
    /// complete (or the output ended inside a call whose name went out), `Ok(None)` while it
    /// grows, `Err` when it is not a call. `hold`: the marker that ends the region, whose
    /// beginning is not sent as arguments.
    fn object(
        &mut self,
        r: &mut Region,
        start: usize,
        limit: usize,
        hold: &str,
        ended: bool,
    ) -> Result<Option<usize>, ()> {
        let text = &r.buf[start..limit];
        if r.open.is_none()
            && let Some((name, at)) = call_head(text)
        {
            let index = self.call(name);
            r.open = Some(Open {
                index,
                args: start + at,
                sent: 0,
            });
        }
        let object_end = r.object_scan.end(&r.buf[start..limit]);
        if object_end.is_some() || ended {
            r.object_scan = JsonScan::default();
        }
        if let Some(open) = &mut r.open {
            let args = &r.buf[open.args..limit];
            let args_end = r.args_scan.end(args);
            if object_end.is_some() || ended {
                r.args_scan = JsonScan::default();
            }
            let end = match args_end {
                Some(end) => end,
                None if ended || object_end.is_some() => args.len(),
                None => args.len() - partial_suffix(args, hold),
            };
            let (index, from) = (open.index, open.sent);
            if end > from {
                open.sent = end;
                let text = args[from..end].to_owned();
                self.arguments(index, &text);
            }
            return match object_end {
                Some(end) => {
                    r.open = None;
                    Ok(Some(start + end))
                }
                None if ended => {
                    r.open = None;
                    Ok(Some(limit))
                }
                None => Ok(None),
            };
        }
        match object_end {
            // The name was not where the streaming read looks for it: the whole object may
            // still be a call with its keys in another order.
            Some(end) => match whole_call(&r.buf[start..start + end]) {
                Some((name, arguments)) => {
                    let index = self.call(name);
                    self.arguments(index, &arguments);
                    Ok(Some(start + end))
                }
                None => Err(()),
            },
            None if ended => Err(()),
            None => Ok(None),
        }
    }

    /// `<tool_call>{…}</tool_call>`: one call between the tags.
    fn hermes(&mut self, r: &mut Region, eof: bool) -> Outcome {
        let close = r.buf[r.close_from..]
            .find(HERMES_CLOSE)
            .map(|at| at + r.close_from);
        if close.is_none() {
            // The marker may begin in the last bytes: look there again next time.
            let mut from = r.buf.len().saturating_sub(HERMES_CLOSE.len());
            while !r.buf.is_char_boundary(from) {
                from -= 1;
            }
            r.close_from = from;
        }
        let limit = close.unwrap_or(r.buf.len());
        let ended = close.is_some() || eof;
        let rest = close.map_or(r.buf.len(), |at| at + HERMES_CLOSE.len());
        if r.items == 0 {
            let start = skip_ws(&r.buf[..limit], 0);
            let result = if r.buf[start..limit].starts_with('{') {
                self.object(r, start, limit, HERMES_CLOSE, ended)
            } else if ended {
                Err(())
            } else {
                Ok(None)
            };
            match result {
                Ok(Some(_)) => r.items = 1,
                Ok(None) => return Outcome::Wait,
                Err(()) => {
                    return if ended {
                        Outcome::Failed { from: 0 }
                    } else {
                        // Content, but only once the tag closes (it is given back whole).
                        Outcome::Wait
                    };
                }
            }
        }
        if ended {
            Outcome::Done { rest }
        } else {
            Outcome::Wait
        }
    }

    /// Llama 3 JSON: `{…}` objects separated by `;`, to the end of the output.
    fn llama3(&mut self, r: &mut Region, eof: bool) -> Outcome {
        loop {
            let at = skip_ws(&r.buf, r.cursor);
            if at == r.buf.len() {
                return match (eof, r.items) {
                    (false, _) => Outcome::Wait,
                    (true, 0) => Outcome::Failed { from: 0 },
                    (true, _) => Outcome::Done { rest: at },
                };
            }
            if r.after_item {
                if r.buf[at..].starts_with(';') {
                    r.cursor = at + 1;
                    r.after_item = false;
                    continue;
                }
                return Outcome::Failed { from: r.cursor };
            }
            if !r.buf[at..].starts_with('{') {
                return Outcome::Failed { from: r.cursor };
            }
            let limit = r.buf.len();
            match self.object(r, at, limit, "", eof) {
                Ok(Some(end)) => {
                    r.items += 1;
                    r.cursor = end;
                    r.after_item = true;
                }
                Ok(None) => return Outcome::Wait,
                Err(()) => return Outcome::Failed { from: r.cursor },
            }
        }
    }

    /// Mistral: `[TOOL_CALLS] [{…}, …]`, or `[TOOL_CALLS]name[ARGS]{…}` (tokenizer v11+).
    fn mistral(&mut self, r: &mut Region, eof: bool) -> Outcome {
        let at = skip_ws(&r.buf, r.cursor);
        if r.list.is_none() {
            if at == r.buf.len() {
                return if eof {
                    Outcome::Failed { from: 0 }
                } else {
                    Outcome::Wait
                };
            }
            let list = r.buf[at..].starts_with('[');
            r.list = Some(list);
            if list {
                r.cursor = at + 1;
            }
        }
        if r.list == Some(true) {
            return self.json_list(r, eof);
        }
        // name[ARGS]{…}
        if let Some(open) = r.open {
            return self.stream_value(r, open, eof);
        }
        let Some(found) = r.buf[at..].find(MISTRAL_ARGS) else {
            let text = &r.buf[at..];
            let name_part = &text[..text.len() - partial_suffix(text, MISTRAL_ARGS)];
            return if eof || !name_part.bytes().all(name_byte) {
                Outcome::Failed { from: 0 }
            } else {
                Outcome::Wait
            };
        };
        let name = r.buf[at..at + found].trim_end();
        if name.is_empty() || !name.bytes().all(name_byte) {
            return Outcome::Failed { from: 0 };
        }
        let name = name.to_owned();
        let index = self.call(name);
        let args = skip_ws(&r.buf, at + found + MISTRAL_ARGS.len());
        let open = Open {
            index,
            args,
            sent: 0,
        };
        r.open = Some(open);
        r.items = 1;
        self.stream_value(r, open, eof)
    }

    /// Mistral v11: the arguments after `[ARGS]`, to the end of their JSON value.
    fn stream_value(&mut self, r: &mut Region, mut open: Open, eof: bool) -> Outcome {
        // Whitespace may still come before the value begins.
        open.args = skip_ws(&r.buf, open.args);
        let args = &r.buf[open.args..];
        let complete = if args.is_empty() {
            None
        } else {
            r.args_scan.end(args)
        };
        if complete.is_some() || eof {
            r.args_scan = JsonScan::default();
        }
        let end = complete.unwrap_or(args.len());
        if end > open.sent {
            let text = args[open.sent..end].to_owned();
            open.sent = end;
            self.arguments(open.index, &text);
        }
        r.open = Some(open);
        match complete {
            Some(end) => {
                r.open = None;
                Outcome::Done {
                    rest: open.args + end,
                }
            }
            None if eof => {
                r.open = None;
                Outcome::Done { rest: r.buf.len() }
            }
            None => Outcome::Wait,
        }
    }

    /// A JSON list of call objects (`r.cursor` is past its `[`).
    fn json_list(&mut self, r: &mut Region, eof: bool) -> Outcome {
        loop {
            let at = skip_ws(&r.buf, r.cursor);
            if at == r.buf.len() {
                return match (eof, r.items) {
                    (false, _) => Outcome::Wait,
                    (true, 0) => Outcome::Failed { from: 0 },
                    (true, _) => Outcome::Done { rest: at },
                };
            }
            if r.after_item {
                if r.buf[at..].starts_with(',') {
                    r.cursor = at + 1;
                    r.after_item = false;
                    continue;
                }
                if r.buf[at..].starts_with(']') {
                    return Outcome::Done { rest: at + 1 };
                }
                return Outcome::Failed { from: r.cursor };
            }
            if !r.buf[at..].starts_with('{') {
                let from = if r.items == 0 { 0 } else { r.cursor };
                return Outcome::Failed { from };
            }
            let limit = r.buf.len();
            match self.object(r, at, limit, "", eof) {
                Ok(Some(end)) => {
                    r.items += 1;
                    r.cursor = end;
                    r.after_item = true;
                }
                Ok(None) => return Outcome::Wait,
                Err(()) => {
                    let from = if r.items == 0 { 0 } else { r.cursor };
                    return Outcome::Failed { from };
                }
            }
        }
    }

    /// Pythonic: `[f(a=1, b="x"), g()]` at the start of the output. Each call goes out once
    /// its `)` is read (its arguments are Python literals, given as one JSON object).
    fn pythonic(&mut self, r: &mut Region, eof: bool) -> Outcome {
        if r.cursor == 0 {
            // The region begins at its `[`.
            r.cursor = 1;
        }
        loop {
            let at = skip_ws(&r.buf, r.cursor);
            if at == r.buf.len() {
                return match (eof, r.items) {
                    (false, _) => Outcome::Wait,
                    (true, 0) => Outcome::Failed { from: 0 },
                    (true, _) => Outcome::Done { rest: at },
                };
            }
            if r.after_item {
                if r.buf[at..].starts_with(',') {
                    r.cursor = at + 1;
                    r.after_item = false;
                    continue;
                }
                if r.buf[at..].starts_with(']') {
                    return Outcome::Done { rest: at + 1 };
                }
                return Outcome::Failed { from: r.cursor };
            }
            let from = if r.items == 0 { 0 } else { r.cursor };
            // A call completes at a `)`: a long one is read again only when one came (or the
            // output ended), so arguments of any length cost linear time. The result is the
            // same, only later: a call read from a text is the call read from any longer text.
            let seen = r.tried.max(at);
            r.tried = r.buf.len();
            if !eof && r.buf.len() - at > 256 && !r.buf[seen..].contains(')') {
                return Outcome::Wait;
            }
            match python_call(&r.buf[at..]) {
                Ok(Some((name, arguments, len))) => {
                    let index = self.call(name);
                    self.arguments(index, &spaced(&Value::Object(arguments)));
                    r.items += 1;
                    r.cursor = at + len;
                    r.after_item = true;
                }
                Ok(None) if eof => return Outcome::Failed { from },
                Ok(None) => return Outcome::Wait,
                Err(()) => return Outcome::Failed { from },
            }
        }
    }
}

/// A 9-character alphanumeric call id, unique per request (`prefix` holds its id) and call.
fn mistral_id(prefix: &str, index: usize) -> String {
    const DIGITS: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";
    // FNV-1a over the prefix and the index.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in prefix.bytes().chain(index.to_le_bytes()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    (0..9)
        .map(|_| {
            let digit = DIGITS[(hash % 62) as usize] as char;
            hash /= 62;
            digit
        })
        .collect()
}

/// Function names in the Mistral v11 form: what OpenAI allows, and dots.
fn name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.'
}

/// A whole call object, its keys in any order: the name and the arguments as JSON text.
fn whole_call(text: &str) -> Option<(String, String)> {
    let value: Value = serde_json::from_str(text).ok()?;
    let name = value.get("name")?.as_str()?.to_owned();
    let args = value.get("arguments").or_else(|| value.get("parameters"))?;
    let text = match args {
        Value::String(s) => s.clone(),
        other => spaced(other),
    };
    Some((name, text))
}

/// Reads `{"name": "<name>", "arguments": ` (or `"parameters"`) at the start of `body`: the
/// name and where the arguments' value begins, or `None` if that is not (yet) there.
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
    let at = at.min(s.len());
    at + s[at..].len() - s[at..].trim_start().len()
}

fn expect(s: &str, at: usize, what: &str) -> Option<usize> {
    s.get(at..)?.starts_with(what).then_some(at + what.len())
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
                        depth = depth.saturating_sub(1);
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
        _ => s.find([',', '}', ']', '\n', ' ', ';']),
    }
}

/// [`value_end`] resumable: it scans only what was added since the last call. The text given
/// must be the same value's text each time, grown.
#[derive(Debug, Clone, Copy, Default)]
struct JsonScan {
    pos: usize,
    depth: usize,
    in_string: bool,
    escaped: bool,
    /// Where the value ended, once it did.
    done: Option<usize>,
}

impl JsonScan {
    fn end(&mut self, s: &str) -> Option<usize> {
        if self.done.is_some() {
            return self.done;
        }
        let bytes = s.as_bytes();
        match bytes.first()? {
            b'"' | b'{' | b'[' => {}
            // A bare literal is short: read it whole.
            _ => return value_end(s),
        }
        while self.pos < bytes.len() {
            let c = bytes[self.pos];
            self.pos += 1;
            if self.in_string {
                if self.escaped {
                    self.escaped = false;
                } else if c == b'\\' {
                    self.escaped = true;
                } else if c == b'"' {
                    self.in_string = false;
                    if self.depth == 0 {
                        self.done = Some(self.pos);
                        return self.done;
                    }
                }
                continue;
            }
            match c {
                b'"' => self.in_string = true,
                b'{' | b'[' => self.depth += 1,
                b'}' | b']' => {
                    self.depth = self.depth.saturating_sub(1);
                    if self.depth == 0 {
                        self.done = Some(self.pos);
                        return self.done;
                    }
                }
                _ => {}
            }
        }
        None
    }
}

/// Nesting deeper than this in a pythonic call is refused (no stack for hostile output).
const MAX_DEPTH: usize = 64;

/// A pythonic call read: its name, its arguments as JSON, its length.
type PythonCall = (String, serde_json::Map<String, Value>, usize);

/// One pythonic call at the start of `s`: `name(key=value, …)`, its arguments as JSON, and
/// its length. `Ok(None)`: incomplete; `Err`: not a call.
fn python_call(s: &str) -> Result<Option<PythonCall>, ()> {
    let b = s.as_bytes();
    let name_len = b.iter().take_while(|&&c| name_byte(c)).count();
    if name_len == b.len() {
        return Ok(None);
    }
    if name_len == 0 || b[0].is_ascii_digit() {
        return Err(());
    }
    let name = s[..name_len].to_owned();
    let mut at = skip_ws(s, name_len);
    if at == b.len() {
        return Ok(None);
    }
    if b[at] != b'(' {
        return Err(());
    }
    at += 1;
    let mut arguments = serde_json::Map::new();
    loop {
        at = skip_ws(s, at);
        match b.get(at) {
            None => return Ok(None),
            Some(b')') => return Ok(Some((name, arguments, at + 1))),
            Some(_) => {}
        }
        let key_len = b[at..]
            .iter()
            .take_while(|c| c.is_ascii_alphanumeric() || **c == b'_')
            .count();
        if at + key_len == b.len() {
            return Ok(None);
        }
        if key_len == 0 {
            return Err(());
        }
        let key = s[at..at + key_len].to_owned();
        at = skip_ws(s, at + key_len);
        match b.get(at) {
            None => return Ok(None),
            Some(b'=') => at = skip_ws(s, at + 1),
            Some(_) => return Err(()),
        }
        let Some((value, end)) = python_value(s, at, 0)? else {
            return Ok(None);
        };
        arguments.insert(key, value);
        at = skip_ws(s, end);
        match b.get(at) {
            None => return Ok(None),
            Some(b',') => at += 1,
            Some(b')') => return Ok(Some((name, arguments, at + 1))),
            Some(_) => return Err(()),
        }
    }
}

/// A Python literal at `s[at..]` as JSON, and where it ends. `Ok(None)`: incomplete.
fn python_value(s: &str, at: usize, depth: usize) -> Result<Option<(Value, usize)>, ()> {
    if depth > MAX_DEPTH {
        return Err(());
    }
    let b = s.as_bytes();
    let Some(&first) = b.get(at) else {
        return Ok(None);
    };
    match first {
        b'"' | b'\'' => Ok(python_string(s, at)?.map(|(text, end)| (Value::String(text), end))),
        b'[' | b'(' => {
            let close = if first == b'[' { b']' } else { b')' };
            let mut items = Vec::new();
            let mut i = at + 1;
            loop {
                i = skip_ws(s, i);
                match b.get(i) {
                    None => return Ok(None),
                    Some(&c) if c == close => return Ok(Some((Value::Array(items), i + 1))),
                    Some(_) => {}
                }
                let Some((item, end)) = python_value(s, i, depth + 1)? else {
                    return Ok(None);
                };
                items.push(item);
                i = skip_ws(s, end);
                match b.get(i) {
                    None => return Ok(None),
                    Some(b',') => i += 1,
                    Some(&c) if c == close => return Ok(Some((Value::Array(items), i + 1))),
                    Some(_) => return Err(()),
                }
            }
        }
        b'{' => {
            let mut map = serde_json::Map::new();
            let mut i = at + 1;
            loop {
                i = skip_ws(s, i);
                match b.get(i) {
                    None => return Ok(None),
                    Some(b'}') => return Ok(Some((Value::Object(map), i + 1))),
                    Some(_) => {}
                }
                let Some((key, end)) = python_value(s, i, depth + 1)? else {
                    return Ok(None);
                };
                let key = match key {
                    Value::String(text) => text,
                    Value::Number(n) => n.to_string(),
                    _ => return Err(()),
                };
                i = skip_ws(s, end);
                match b.get(i) {
                    None => return Ok(None),
                    Some(b':') => i += 1,
                    Some(_) => return Err(()),
                }
                let Some((value, end)) = python_value(s, skip_ws(s, i), depth + 1)? else {
                    return Ok(None);
                };
                map.insert(key, value);
                i = skip_ws(s, end);
                match b.get(i) {
                    None => return Ok(None),
                    Some(b',') => i += 1,
                    Some(b'}') => return Ok(Some((Value::Object(map), i + 1))),
                    Some(_) => return Err(()),
                }
            }
        }
        b'-' | b'+' | b'0'..=b'9' | b'.' => {
            let len = b[at..]
                .iter()
                .enumerate()
                .take_while(|&(i, &c)| {
                    c.is_ascii_digit()
                        || matches!(c, b'.' | b'e' | b'E' | b'_')
                        || (matches!(c, b'-' | b'+')
                            && (i == 0 || matches!(b[at + i - 1], b'e' | b'E')))
                })
                .count();
            if at + len == b.len() {
                return Ok(None);
            }
            let text = s[at..at + len].replace('_', "");
            let number = match text.parse::<i64>() {
                Ok(n) => Value::from(n),
                Err(_) => text
                    .parse::<f64>()
                    .ok()
                    .and_then(serde_json::Number::from_f64)
                    .map(Value::Number)
                    .ok_or(())?,
            };
            Ok(Some((number, at + len)))
        }
        c if c.is_ascii_alphabetic() => {
            let len = b[at..]
                .iter()
                .take_while(|c| c.is_ascii_alphanumeric() || **c == b'_')
                .count();
            if at + len == b.len() {
                return Ok(None);
            }
            let value = match &s[at..at + len] {
                "True" | "true" => Value::Bool(true),
                "False" | "false" => Value::Bool(false),
                "None" | "null" => Value::Null,
                _ => return Err(()),
            };
            Ok(Some((value, at + len)))
        }
        _ => Err(()),
    }
}

/// A Python string literal (single or double quotes) at `s[at..]`, unescaped.
fn python_string(s: &str, at: usize) -> Result<Option<(String, usize)>, ()> {
    let quote = s.as_bytes()[at] as char;
    let mut out = String::new();
    let mut chars = s[at + 1..].char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            c if c == quote => return Ok(Some((out, at + 1 + i + 1))),
            '\\' => {
                let Some((_, e)) = chars.next() else {
                    return Ok(None);
                };
                match e {
                    'n' => out.push('\n'),
                    't' => out.push('\t'),
                    'r' => out.push('\r'),
                    '0' => out.push('\0'),
                    '\\' | '\'' | '"' => out.push(e),
                    'x' | 'u' => {
                        let len = if e == 'x' { 2 } else { 4 };
                        let mut hex = String::new();
                        for _ in 0..len {
                            match chars.next() {
                                Some((_, h)) => hex.push(h),
                                None => return Ok(None),
                            }
                        }
                        let code = u32::from_str_radix(&hex, 16).map_err(|_| ())?;
                        out.push(char::from_u32(code).ok_or(())?);
                    }
                    other => {
                        out.push('\\');
                        out.push(other);
                    }
                }
            }
            '\n' => return Err(()),
            c => out.push(c),
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::super::text::Utf8Stream;
    use super::*;

    /// (reasoning, content, [(id, name, arguments)]) gathered from pieces.
    type Gathered = (String, String, Vec<(String, String, String)>);

    fn gather(pieces: &[Piece]) -> Gathered {
        let mut reasoning = String::new();
        let mut content = String::new();
        let mut calls: Vec<(String, String, String)> = Vec::new();
        for piece in pieces {
            match piece {
                Piece::Reasoning(text) => {
                    assert!(!text.is_empty(), "empty reasoning piece");
                    reasoning.push_str(text);
                }
                Piece::Content(text) => {
                    assert!(!text.is_empty(), "empty content piece");
                    content.push_str(text);
                }
                Piece::Call { index, id, name } => {
                    assert_eq!(*index, calls.len());
                    calls.push((id.clone(), name.clone(), String::new()));
                }
                Piece::Arguments { index, text } => {
                    assert!(!text.is_empty(), "empty arguments piece");
                    calls[*index].2.push_str(text);
                }
            }
        }
        (reasoning, content, calls)
    }

    fn parser(reasoning: ReasoningParserKind, tools: Option<ToolParserKind>) -> OutputParser {
        OutputParser::new(reasoning, tools.map(|t| (t, "call_x".to_owned())))
            .expect("something to parse")
    }

    /// Parses `text` whole, then cut at every byte boundary (into two pieces, and into single
    /// bytes), and checks every form gives the same pieces gathered; returns the whole form's.
    fn every_split(
        reasoning: ReasoningParserKind,
        tools: Option<ToolParserKind>,
        text: &str,
    ) -> Gathered {
        splits(reasoning, tools, text, 1)
    }

    /// [`every_split`] with two-piece cuts every `step` bytes only (byte by byte still).
    fn splits(
        reasoning: ReasoningParserKind,
        tools: Option<ToolParserKind>,
        text: &str,
        step: usize,
    ) -> Gathered {
        let mut whole = parser(reasoning, tools);
        let mut pieces = whole.push(text);
        pieces.extend(whole.finish());
        let expected = gather(&pieces);
        for (i, (id, _, _)) in expected.2.iter().enumerate() {
            if tools == Some(ToolParserKind::Mistral) {
                assert_eq!(id, &mistral_id("call_x", i));
                assert!(id.len() == 9 && id.bytes().all(|b| b.is_ascii_alphanumeric()));
            } else {
                assert_eq!(id, &format!("call_x{i}"));
            }
        }
        // As the worker's bytes reach it: through the UTF-8 stream, cut in two at every byte
        // boundary (inside multi-byte characters too), and one byte at a time.
        let bytes = text.as_bytes();
        let through_utf8 = |cuts: &[usize]| {
            let mut utf8 = Utf8Stream::default();
            let mut parser = parser(reasoning, tools);
            let mut pieces = Vec::new();
            let mut from = 0;
            for &cut in cuts.iter().chain([bytes.len()].iter()) {
                pieces.extend(parser.push(&utf8.push(&bytes[from..cut])));
                from = cut;
            }
            pieces.extend(parser.push(&utf8.finish()));
            pieces.extend(parser.finish());
            gather(&pieces)
        };
        for cut in (1..bytes.len()).step_by(step) {
            assert_eq!(through_utf8(&[cut]), expected, "{text:?} cut at byte {cut}");
        }
        let every: Vec<usize> = (1..bytes.len()).collect();
        assert_eq!(through_utf8(&every), expected, "{text:?} byte by byte");
        // And one character at a time, straight into the parser.
        let mut each = parser(reasoning, tools);
        let mut pieces = Vec::new();
        for c in text.chars() {
            pieces.extend(each.push(c.encode_utf8(&mut [0; 4])));
        }
        pieces.extend(each.finish());
        assert_eq!(gather(&pieces), expected, "{text:?} char by char");
        expected
    }

    fn calls(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(n, a)| ((*n).to_owned(), (*a).to_owned()))
            .collect()
    }

    fn names_args(g: &Gathered) -> Vec<(String, String)> {
        g.2.iter().map(|(_, n, a)| (n.clone(), a.clone())).collect()
    }

    /// Recorded outputs of each family's format (as the models write them; special tokens
    /// as the codec spells them), their content and calls, for every split.
    #[test]
    fn recorded_tool_calls_parse_the_same_at_every_split() {
        use ToolParserKind::*;
        // (format, output, content, calls)
        type Case<'a> = (ToolParserKind, &'a str, &'a str, Vec<(&'a str, &'a str)>);
        let cases: Vec<Case<'_>> = vec![
            // Hermes / Qwen 2.5.
            (
                Hermes,
                "no tools here < at all",
                "no tools here < at all",
                vec![],
            ),
            (
                Hermes,
                "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris {x}\"}}\n</tool_call>",
                "",
                vec![("get_weather", "{\"city\": \"Paris {x}\"}")],
            ),
            (
                Hermes,
                "Let me check.\n<tool_call>\n{\"name\": \"a\", \"arguments\": {}}\n</tool_call>\n<tool_call>\n{\"arguments\": {\"k\": [1, 2]}, \"name\": \"b\"}\n</tool_call>\n",
                "Let me check.",
                vec![("a", "{}"), ("b", "{\"k\": [1, 2]}")],
            ),
            (
                Hermes,
                "<tool_call>\nnot json\n</tool_call> after",
                "<tool_call>\nnot json\n</tool_call> after",
                vec![],
            ),
            (
                Hermes,
                "<tool_call>\n{\"name\": \"cut\", \"arguments\": {\"a\": \"hal",
                "",
                vec![("cut", "{\"a\": \"hal")],
            ),
            (
                Hermes,
                "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"a\": 1\n</tool_call>",
                "",
                vec![("f", "{\"a\": 1\n")],
            ),
            (Hermes, "<tool_ca", "<tool_ca", vec![]),
            (
                Hermes,
                "<tool_call>{\"name\": \"météo\", \"arguments\": {\"ville\": \"Zürich 🌧\"}}</tool_call>",
                "",
                vec![("météo", "{\"ville\": \"Zürich 🌧\"}")],
            ),
            // Llama 3.1/3.2 JSON, with and without the python tag; several with `;`.
            (
                Llama3Json,
                "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"San Francisco\", \"unit\": \"celsius\"}}",
                "",
                vec![(
                    "get_weather",
                    "{\"city\": \"San Francisco\", \"unit\": \"celsius\"}",
                )],
            ),
            (
                Llama3Json,
                "<|python_tag|>{\"name\": \"search\", \"parameters\": {\"q\": \"rust\"}}; {\"name\": \"clock\", \"parameters\": {}}",
                "",
                vec![("search", "{\"q\": \"rust\"}"), ("clock", "{}")],
            ),
            (
                Llama3Json,
                "Sure: <|python_tag|>{\"type\": \"function\", \"name\": \"f\", \"parameters\": {\"x\": 1}}",
                "Sure:",
                vec![("f", "{\"x\": 1}")],
            ),
            (
                Llama3Json,
                "The answer is {\"name\": 1}.",
                "The answer is {\"name\": 1}.",
                vec![],
            ),
            (
                Llama3Json,
                "{\"a\": 1} is JSON",
                "{\"a\": 1} is JSON",
                vec![],
            ),
            (
                Llama3Json,
                "<|python_tag|>brave_search.call(query=\"kvfleet\")",
                "<|python_tag|>brave_search.call(query=\"kvfleet\")",
                vec![],
            ),
            (
                Llama3Json,
                "{\"name\": \"f\", \"parameters\": {}} and then text",
                "and then text",
                vec![("f", "{}")],
            ),
            // Mistral: the list form (v3) and the [ARGS] form (v11+).
            (
                Mistral,
                "[TOOL_CALLS] [{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Lyon\"}, \"id\": \"aB3dE5gH7\"}, {\"name\": \"clock\", \"arguments\": {}}]",
                "",
                vec![("get_weather", "{\"city\": \"Lyon\"}"), ("clock", "{}")],
            ),
            (
                Mistral,
                "[TOOL_CALLS]get_weather[ARGS]{\"city\": \"Lyon\"}[TOOL_CALLS]clock[ARGS]{}",
                "",
                vec![("get_weather", "{\"city\": \"Lyon\"}"), ("clock", "{}")],
            ),
            (
                Mistral,
                "I will look.[TOOL_CALLS][{\"name\": \"f\", \"arguments\": {\"a\": [1, {\"b\": \"]\"}]}}]",
                "I will look.",
                vec![("f", "{\"a\": [1, {\"b\": \"]\"}]}")],
            ),
            (
                Mistral,
                "[TOOL_CALLS] sorry, no",
                "[TOOL_CALLS] sorry, no",
                vec![],
            ),
            (
                Mistral,
                "[TOOL_CALLS] [1, 2]",
                "[TOOL_CALLS] [1, 2]",
                vec![],
            ),
            (Mistral, "[TOOL_CALL", "[TOOL_CALL", vec![]),
            // Pythonic (Llama 3.2/4 pythonic templates, ToolACE).
            (
                Pythonic,
                "[get_weather(city='San Francisco', metric=\"celsius\"), get_time(zone=None, dst=True, offsets=[1, -2.5], opts={'a': (1, 2)})]",
                "",
                vec![
                    (
                        "get_weather",
                        "{\"city\": \"San Francisco\", \"metric\": \"celsius\"}",
                    ),
                    (
                        "get_time",
                        "{\"zone\": null, \"dst\": true, \"offsets\": [1, -2.5], \"opts\": {\"a\": [1, 2]}}",
                    ),
                ],
            ),
            (Pythonic, "[noop()]", "", vec![("noop", "{}")]),
            (
                Pythonic,
                "[1, 2, 3] are numbers",
                "[1, 2, 3] are numbers",
                vec![],
            ),
            (
                Pythonic,
                "The list [f(a=1)] is not at the start",
                "The list [f(a=1)] is not at the start",
                vec![],
            ),
            (
                Pythonic,
                "[f(a='it\\'s ok ✓\\n'), g(b=1)",
                "",
                vec![("f", "{\"a\": \"it's ok ✓\\n\"}"), ("g", "{\"b\": 1}")],
            ),
            (Pythonic, "[f(a=1, b=)]", "[f(a=1, b=)]", vec![]),
            (
                Pythonic,
                "[f(a=1), oops] tail",
                "oops] tail",
                vec![("f", "{\"a\": 1}")],
            ),
        ];
        // Calls longer than the pythonic parser reads at every push (see `pythonic`).
        let long = "x(y) ".repeat(80);
        let long_python = format!("[write(text='{long}'), g(a=1)] done");
        let long_hermes = format!(
            "<tool_call>\n{{\"name\": \"write\", \"arguments\": {{\"text\": \"{long}\"}}}}\n</tool_call>"
        );
        let long_arguments = format!("{{\"text\": \"{long}\"}}");
        let mut cases = cases;
        cases.push((
            Pythonic,
            &long_python,
            "done",
            vec![("write", &long_arguments), ("g", "{\"a\": 1}")],
        ));
        cases.push((Hermes, &long_hermes, "", vec![("write", &long_arguments)]));
        for (format, text, content, expected) in cases {
            let got = every_split(ReasoningParserKind::Off, Some(format), text);
            assert_eq!(got.0, "", "{text:?}");
            assert_eq!(got.1, content, "{format:?} {text:?}");
            assert_eq!(names_args(&got), calls(&expected), "{format:?} {text:?}");
            for (_, _, arguments) in &got.2 {
                // Complete calls carry valid JSON (the cut ones are checked above).
                if !text.ends_with("hal") && !text.contains("{\"a\": 1\n") {
                    assert!(
                        serde_json::from_str::<Value>(arguments).is_ok(),
                        "{text:?}: {arguments}"
                    );
                }
            }
        }
    }

    #[test]
    fn recorded_reasoning_separates_at_every_split() {
        use ReasoningParserKind::*;
        // (format, output, reasoning, content)
        let cases: Vec<(ReasoningParserKind, &str, &str, &str)> = vec![
            // Qwen 3 / QwQ: the output opens the tag.
            (
                Think,
                "<think>\nThe user greets me. Reply briefly.\n</think>\n\nHello! How can I help?",
                "\nThe user greets me. Reply briefly.\n",
                "Hello! How can I help?",
            ),
            (Think, "No thinking here.", "", "No thinking here."),
            (Think, "  <thi", "", "  <thi"),
            (
                Think,
                "<think>cut by max_tokens, unfinish",
                "cut by max_tokens, unfinish",
                "",
            ),
            (
                Think,
                "<think>a < b but </thin is not the end</think>done",
                "a < b but </thin is not the end",
                "done",
            ),
            (
                Think,
                "Answer first <think>not reasoning</think>",
                "",
                "Answer first <think>not reasoning</think>",
            ),
            // DeepSeek R1: the prompt opened the tag.
            (
                DeepSeekR1,
                "Okay, 2 + 2 — c'est 4 ✓.\n</think>\n\nThe answer is **4**.",
                "Okay, 2 + 2 — c'est 4 ✓.\n",
                "The answer is **4**.",
            ),
            (DeepSeekR1, "<think>\nHmm.\n</think>\n\n4", "\nHmm.\n", "4"),
            (DeepSeekR1, "never closed", "never closed", ""),
        ];
        for (format, text, reasoning, content) in cases {
            let got = every_split(format, None, text);
            assert_eq!(
                (got.0.as_str(), got.1.as_str()),
                (reasoning, content),
                "{format:?} {text:?}"
            );
            assert!(got.2.is_empty());
        }
    }

    /// Reasoning first, then content and calls, in each format.
    #[test]
    fn reasoning_then_tool_calls_at_every_split() {
        let cases: Vec<(ToolParserKind, &str)> = vec![
            (
                ToolParserKind::Hermes,
                "<think>\nNeed the weather.\n</think>\n\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}\n</tool_call>",
            ),
            (
                ToolParserKind::Llama3Json,
                "<think>\nNeed the weather.\n</think>\n\n{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Oslo\"}}",
            ),
            (
                ToolParserKind::Mistral,
                "<think>\nNeed the weather.\n</think>\n\n[TOOL_CALLS][{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}]",
            ),
            (
                ToolParserKind::Pythonic,
                "<think>\nNeed the weather.\n</think>\n\n[get_weather(city=\"Oslo\")]",
            ),
        ];
        for (format, text) in cases {
            let got = every_split(ReasoningParserKind::Think, Some(format), text);
            assert_eq!(got.0, "\nNeed the weather.\n", "{format:?}");
            assert_eq!(got.1, "", "{format:?}");
            assert_eq!(
                names_args(&got),
                calls(&[("get_weather", "{\"city\": \"Oslo\"}")]),
                "{format:?}"
            );
        }
    }

    /// Arguments stream as they are generated: the name goes out before the arguments end.
    #[test]
    fn the_name_and_arguments_stream_before_the_call_closes() {
        let mut stream = ToolStream::new(ToolParserKind::Hermes, "c".into());
        let pieces = stream.run(
            "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"a\": ",
            false,
        );
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
        let pieces = stream.run("1}}\n</tool", false);
        assert_eq!(
            pieces,
            vec![Piece::Arguments {
                index: 0,
                text: "1}".into()
            }]
        );
        assert!(stream.run("_call>", false).is_empty());
        assert!(stream.run("", true).is_empty());
        assert_eq!(stream.calls, 1);
        // The same for the other JSON formats.
        for (format, head) in [
            (
                ToolParserKind::Llama3Json,
                "{\"name\": \"f\", \"parameters\": {\"a\": ",
            ),
            (
                ToolParserKind::Mistral,
                "[TOOL_CALLS][{\"name\": \"f\", \"arguments\": {\"a\": ",
            ),
            (ToolParserKind::Mistral, "[TOOL_CALLS]f[ARGS]{\"a\": "),
        ] {
            let mut stream = ToolStream::new(format, "c".into());
            let pieces = stream.run(head, false);
            assert!(
                matches!(&pieces[..], [Piece::Call { name, .. }, Piece::Arguments { text, .. }]
                    if name == "f" && text == "{\"a\": "),
                "{format:?}: {pieces:?}"
            );
        }
    }

    /// The resumable scan finds the same ends as `value_end`, fed any growing prefixes.
    #[test]
    fn the_resumable_scan_agrees_with_value_end() {
        for text in [
            "{\"a\": [1, \"}\\\"]\"], \"b\": {}} tail",
            "\"str \\\\\" x",
            "[[], {\"k\": \"]\"}] ,",
            "{\"open\": ",
            "12, 3",
        ] {
            for step in 1..=3 {
                let mut scan = JsonScan::default();
                let mut len = 0;
                while len < text.len() {
                    len = (len + step).min(text.len());
                    assert_eq!(
                        scan.end(&text[..len]),
                        value_end(&text[..len]),
                        "{text:?} {len}"
                    );
                }
            }
        }
    }

    #[test]
    fn templates_choose_the_parsers() {
        use ToolParserKind::*;
        let qwen = "{%- if tools %}...<tool_call>\\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\\n</tool_call>{% endif %}";
        let llama31 = "{%- if builtin_tools is defined or tools is not none %}{{- \"<|python_tag|>\" }}... \"parameters\" ...<|eom_id|>";
        let llama32_pythonic = "[func_name1(params_name1=params_value1, params_name2=params_value2...), func_name2(params)]";
        let mistral = "{%- if message.tool_calls %}{{- \"[TOOL_CALLS] [\" }}";
        let chatml = "{% for message in messages %}<|im_start|>{% endfor %}";
        assert_eq!(detect_tools(Some(qwen)), Hermes);
        assert_eq!(detect_tools(Some(llama31)), Llama3Json);
        assert_eq!(detect_tools(Some(llama32_pythonic)), Pythonic);
        assert_eq!(detect_tools(Some(mistral)), Mistral);
        assert_eq!(detect_tools(Some(chatml)), Hermes);
        assert_eq!(detect_tools(None), Hermes);
        let r1 = "{% if add_generation_prompt %}{{'<｜Assistant｜><think>\\n'}}{% endif %}";
        let qwen3 = "{%- if message.reasoning_content %}<think>{% endif %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}";
        assert_eq!(detect_reasoning(Some(r1)), ReasoningParserKind::DeepSeekR1);
        assert_eq!(detect_reasoning(Some(qwen3)), ReasoningParserKind::Think);
        assert_eq!(detect_reasoning(Some(chatml)), ReasoningParserKind::Off);
        assert_eq!(detect_reasoning(None), ReasoningParserKind::Off);
    }

    /// Malformed and hostile outputs: every format and reasoning mode, on mutations of the
    /// recorded outputs (each byte dropped, and a deterministic pseudo-random garbage mix),
    /// never panics and still gives the same result however it is cut.
    #[test]
    fn malformed_outputs_never_panic_and_split_the_same() {
        let seeds = [
            "<think>x</think><tool_call>\n{\"name\": \"f\", \"arguments\": {\"a\": [1, \"}\"]}}\n</tool_call>",
            "<|python_tag|>{\"name\": \"f\", \"parameters\": {\"a\": \"b\\\"c\"}}; {\"name\"",
            "[TOOL_CALLS] [{\"name\": \"f\", \"arguments\": {}}, {\"name\": \"g\"}][TOOL_CALLS]h[ARGS]{",
            "[f(a='x', b=[1, (2, {'k': None})]), g(c=-1.5e3)]",
            "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[f(a=",
        ];
        let formats = [
            ToolParserKind::Hermes,
            ToolParserKind::Llama3Json,
            ToolParserKind::Mistral,
            ToolParserKind::Pythonic,
        ];
        let mut inputs: Vec<String> = Vec::new();
        for seed in seeds {
            inputs.push(seed.to_owned());
            for drop in 0..seed.len() {
                if seed.is_char_boundary(drop) && seed.is_char_boundary(drop + 1) {
                    inputs.push(format!("{}{}", &seed[..drop], &seed[drop + 1..]));
                }
            }
        }
        // A fixed xorshift stream over the markers' characters and a few others.
        let alphabet: Vec<char> = "<>/{}[]()\"'\\,;:= \nathinkoolc_TOCALSRGpy|é𝄞0123456789"
            .chars()
            .collect();
        let mut x: u64 = 0x2545_F491_4F6C_DD1D;
        for _ in 0..100 {
            let mut s = String::new();
            for _ in 0..40 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                s.push(alphabet[(x % alphabet.len() as u64) as usize]);
            }
            inputs.push(s);
        }
        for input in &inputs {
            for format in formats {
                for reasoning in [ReasoningParserKind::Off, ReasoningParserKind::DeepSeekR1] {
                    // Cut in two every 5 bytes here (and byte by byte): the recorded outputs
                    // above are cut everywhere.
                    let got = splits(reasoning, Some(format), input, 5);
                    if got.2.is_empty() && reasoning == ReasoningParserKind::Off {
                        // No call: everything is content, as it came.
                        assert_eq!(&got.1, input, "{format:?}");
                    }
                }
            }
        }
    }

    /// A long call streamed in small pieces costs time linear in its length: each push scans
    /// only what is new (these 192 KiB take tens of milliseconds; rescanning from the start
    /// took minutes).
    #[test]
    fn long_outputs_parse_in_linear_time() {
        for (format, head) in [
            (
                ToolParserKind::Hermes,
                "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"a\": \"",
            ),
            (ToolParserKind::Hermes, "<tool_call>\nnot json "),
            (
                ToolParserKind::Llama3Json,
                "{\"name\": \"f\", \"parameters\": {\"a\": \"",
            ),
            (ToolParserKind::Pythonic, "[f(a=\""),
            (
                ToolParserKind::Mistral,
                "[TOOL_CALLS] [{\"name\": \"f\", \"arguments\": {\"a\": \"",
            ),
            (ToolParserKind::Mistral, "[TOOL_CALLS]f[ARGS]{\"a\": \""),
        ] {
            let mut parser = parser(ReasoningParserKind::DeepSeekR1, Some(format));
            let start = std::time::Instant::now();
            let mut pieces = parser.push("<think>");
            for _ in 0..16_384 {
                pieces.extend(parser.push("why "));
            }
            pieces.extend(parser.push("</think>"));
            pieces.extend(parser.push(head));
            for _ in 0..32_768 {
                pieces.extend(parser.push("abcd"));
            }
            pieces.extend(parser.finish());
            let elapsed = start.elapsed();
            let (reasoning, content, calls) = gather(&pieces);
            assert_eq!(reasoning.len(), 4 * 16_384);
            assert!(
                content.len() + calls.iter().map(|c| c.2.len()).sum::<usize>() >= 4 * 32_768,
                "{format:?}"
            );
            assert!(
                elapsed < std::time::Duration::from_secs(5),
                "{format:?} {head:?}: {elapsed:?}"
            );
        }
    }
}
