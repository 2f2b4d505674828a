//! The chat output parsers (reasoning, then tool calls in each format) on arbitrary model
//! output: they never panic, and the text cut in two at any point gives the same reasoning,
//! content and calls as the whole text. The first byte picks the tool-call format and the
//! reasoning mode, the next two the cut; the rest is the output (lossy UTF-8, as the
//! frontend's UTF-8 stream delivers it).

#![no_main]
// The parsers' file has what only the agent uses (the marker list, the config spellings).
#![allow(dead_code)]

use libfuzzer_sys::fuzz_target;

/// The agent's `crate::worker` as the parsers see it.
#[path = "../../src/worker/formats.rs"]
mod worker;

/// The agent's `frontend/parsers.rs`, at the crate root here.
#[path = "../../src/frontend/parsers.rs"]
mod parsers;

use parsers::{OutputParser, Piece};

use crate::worker::{ReasoningParserKind, ToolParserKind};

/// Reasoning, content and calls (id, name, arguments) gathered from pieces.
type Gathered = (String, String, Vec<(String, String, String)>);

fn gather(pieces: Vec<Piece>) -> Gathered {
    let mut out: Gathered = Default::default();
    for piece in pieces {
        match piece {
            Piece::Reasoning(text) => out.0.push_str(&text),
            Piece::Content(text) => out.1.push_str(&text),
            Piece::Call { index, id, name } => {
                assert_eq!(index, out.2.len());
                out.2.push((id, name, String::new()));
            }
            Piece::Arguments { index, text } => out.2[index].2.push_str(&text),
        }
    }
    out
}

fn run(data: &[u8]) {
    let [mode, cut_hi, cut_lo, text @ ..] = data else {
        return;
    };
    let tools = match mode % 5 {
        0 => None,
        1 => Some(ToolParserKind::Hermes),
        2 => Some(ToolParserKind::Llama3Json),
        3 => Some(ToolParserKind::Mistral),
        _ => Some(ToolParserKind::Pythonic),
    };
    let reasoning = match (mode / 5) % 3 {
        0 => ReasoningParserKind::Off,
        1 => ReasoningParserKind::Think,
        _ => ReasoningParserKind::DeepSeekR1,
    };
    let new = || OutputParser::new(reasoning, tools.map(|t| (t, "call_f".to_owned())));
    let Some(mut whole) = new() else {
        return;
    };
    let text = String::from_utf8_lossy(text);
    // The template detection reads arbitrary templates too.
    parsers::detect_tools(Some(&text));
    parsers::detect_reasoning(Some(&text));
    let mut pieces = whole.push(&text);
    pieces.extend(whole.finish());
    let expected = gather(pieces);
    let mut cut = usize::from(u16::from_be_bytes([*cut_hi, *cut_lo])) % (text.len() + 1);
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    let Some(mut split) = new() else {
        return;
    };
    let mut pieces = split.push(&text[..cut]);
    pieces.extend(split.push(&text[cut..]));
    pieces.extend(split.finish());
    assert_eq!(gather(pieces), expected, "cut at {cut}");
}

fuzz_target!(|data: &[u8]| run(data));
