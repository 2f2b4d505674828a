//! The output formats a model's `[[models]]` entry may name (`tool_parser`,
//! `reasoning_parser`); the frontend's parsers (`frontend/parsers.rs`) read each. No
//! dependencies: the parsers' fuzz target (`agent/fuzz`) compiles this file and the parsers
//! alone.

/// A tool-call format (`[[models]] tool_parser`); the frontend's parsers read each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolParserKind {
    /// `<tool_call>{"name": …, "arguments": …}</tool_call>` (Hermes, Qwen 2.5/3, many fine-tunes).
    Hermes,
    /// Llama 3.1+ JSON: `{"name": …, "parameters": …}`, bare or after `<|python_tag|>`, several
    /// separated by `;`.
    Llama3Json,
    /// `[TOOL_CALLS] [{"name": …, "arguments": …}, …]`, or `[TOOL_CALLS]name[ARGS]{…}`.
    Mistral,
    /// A Python list of calls: `[f(a=1, b="x"), g()]` (Llama 3.2/4, ToolACE, as vLLM's
    /// `pythonic`).
    Pythonic,
}

impl ToolParserKind {
    /// The config value's spelling.
    pub const NAMES: &'static str = "\"hermes\", \"llama3_json\", \"mistral\" or \"pythonic\"";

    /// The kind a config value names.
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "hermes" => Self::Hermes,
            "llama3_json" => Self::Llama3Json,
            "mistral" => Self::Mistral,
            "pythonic" => Self::Pythonic,
            _ => return None,
        })
    }
}

/// A reasoning format (`[[models]] reasoning_parser`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReasoningParserKind {
    /// No separation: `<think>` stays in the content.
    Off,
    /// `<think>…</think>` at the start of the output (Qwen 3, QwQ): reasoning only when the
    /// output opens with the tag.
    Think,
    /// DeepSeek R1: the template opens `<think>` in the prompt, so the output starts inside
    /// the reasoning (a leading `<think>` is skipped) and everything up to `</think>` is
    /// reasoning.
    DeepSeekR1,
}

impl ReasoningParserKind {
    /// The config value's spelling.
    pub const NAMES: &'static str = "\"deepseek_r1\", \"think\" or \"none\"";

    /// The kind a config value names.
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "none" => Self::Off,
            "think" => Self::Think,
            "deepseek_r1" => Self::DeepSeekR1,
            _ => return None,
        })
    }
}
