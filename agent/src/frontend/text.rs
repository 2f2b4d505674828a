//! Text in and out: tokenization and chat templates behind traits, and the two stateful filters
//! every streamed completion goes through on its way out.
//!
//! - [`Tokenizer`] and [`ChatTemplate`]: the real ones will come from `kvfleet-model` (Hugging
//!   Face tokenizer and the model's Jinja template). Until that crate is wired into the agent,
//!   [`ByteTokenizer`] (one token per byte, EOS = 256) and [`PlainChatTemplate`] serve the mock
//!   engine path. They are test stand-ins: not the tokenizer of any real model.
//! - [`Utf8Stream`]: incremental detokenization. Tokens are byte pieces, and a character may be
//!   split across tokens; the stream emits only whole characters, holding back an incomplete
//!   tail, so an SSE chunk never carries broken UTF-8. Bytes that can never become valid are
//!   emitted as U+FFFD, as Hugging Face's decoder does.
//! - [`StopMatcher`]: stop strings. It holds back the longest tail of the text that could still
//!   grow into a stop string, so a client never sees a partial stop string that is later cut.

use std::borrow::Cow;

/// Turns text into token ids and token ids back into bytes.
pub trait Tokenizer: Send + Sync + std::fmt::Debug {
    /// Token ids of `text` (no special tokens added).
    fn encode(&self, text: &str) -> Vec<u32>;
    /// The bytes one token stands for; empty for special tokens.
    fn token_bytes(&self, token: u32) -> Cow<'_, [u8]>;
    /// The end-of-sequence token.
    fn eos(&self) -> u32;
    /// Number of token ids.
    fn vocab_size(&self) -> u32;
}

/// Turns a conversation into a prompt.
pub trait ChatTemplate: Send + Sync + std::fmt::Debug {
    /// The prompt for `(role, content)` messages, ending where the assistant's reply begins.
    fn render(&self, messages: &[(&str, &str)]) -> String;
}

/// One token per byte; token 256 is EOS. A test stand-in for the mock engine path.
#[derive(Debug, Clone, Copy, Default)]
pub struct ByteTokenizer;

impl Tokenizer for ByteTokenizer {
    fn encode(&self, text: &str) -> Vec<u32> {
        text.bytes().map(u32::from).collect()
    }

    fn token_bytes(&self, token: u32) -> Cow<'_, [u8]> {
        match u8::try_from(token) {
            Ok(byte) => Cow::Owned(vec![byte]),
            Err(_) => Cow::Borrowed(&[]),
        }
    }

    fn eos(&self) -> u32 {
        256
    }

    fn vocab_size(&self) -> u32 {
        257
    }
}

/// `<|role|>\ncontent\n` per message, then `<|assistant|>\n`. A test stand-in.
#[derive(Debug, Clone, Copy, Default)]
pub struct PlainChatTemplate;

impl ChatTemplate for PlainChatTemplate {
    fn render(&self, messages: &[(&str, &str)]) -> String {
        let mut out = String::new();
        for (role, content) in messages {
            out.push_str("<|");
            out.push_str(role);
            out.push_str("|>\n");
            out.push_str(content);
            out.push('\n');
        }
        out.push_str("<|assistant|>\n");
        out
    }
}

/// Incremental UTF-8 decoding of a byte stream.
#[derive(Debug, Default, Clone)]
pub struct Utf8Stream {
    pending: Vec<u8>,
}

impl Utf8Stream {
    /// Adds bytes; returns the text that is now complete.
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let mut out = String::new();
        let mut rest: &[u8] = &self.pending;
        loop {
            match std::str::from_utf8(rest) {
                Ok(text) => {
                    out.push_str(text);
                    rest = &[];
                    break;
                }
                Err(e) => {
                    let (valid, after) = rest.split_at(e.valid_up_to());
                    // Checked by from_utf8 just above.
                    out.push_str(std::str::from_utf8(valid).unwrap_or_default());
                    match e.error_len() {
                        // A sequence that may still be completed by the next token.
                        None => {
                            rest = after;
                            break;
                        }
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            rest = &after[bad..];
                        }
                    }
                }
            }
        }
        self.pending = rest.to_vec();
        out
    }

    /// The end of the stream: an incomplete tail becomes U+FFFD.
    pub fn finish(&mut self) -> String {
        let tail = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        tail
    }
}

/// Cuts generated text at the first stop string, never emitting part of one.
#[derive(Debug, Clone)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
    stopped: bool,
}

/// What [`StopMatcher::push`] decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StopStep {
    /// Text safe to send now.
    pub emit: String,
    /// A stop string was found: the completion ends here (the stop string is not emitted).
    pub stopped: bool,
}

impl StopMatcher {
    /// A matcher for `stops` (empty strings are ignored).
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            held: String::new(),
            stopped: false,
        }
    }

    /// Adds text; returns what may be sent now.
    pub fn push(&mut self, text: &str) -> StopStep {
        if self.stopped {
            return StopStep {
                emit: String::new(),
                stopped: true,
            };
        }
        self.held.push_str(text);
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|stop| self.held.find(stop.as_str()))
            .min()
        {
            self.stopped = true;
            let emit = self.held[..at].to_owned();
            self.held.clear();
            return StopStep {
                emit,
                stopped: true,
            };
        }
        let hold = self.holdback();
        let cut = self.held.len() - hold;
        let emit = self.held[..cut].to_owned();
        self.held.drain(..cut);
        StopStep {
            emit,
            stopped: false,
        }
    }

    /// Length in bytes of the longest tail of `held` that is a proper prefix of a stop string.
    fn holdback(&self) -> usize {
        let longest = self.stops.iter().map(String::len).max().unwrap_or(0);
        let len = self.held.len();
        (1..longest.min(len + 1))
            .rev()
            .find(|&k| {
                self.held.is_char_boundary(len - k)
                    && self
                        .stops
                        .iter()
                        .any(|stop| stop.starts_with(&self.held[len - k..]))
            })
            .unwrap_or(0)
    }

    /// The end of generation: whatever was held back is not a stop string after all.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn utf8_stream_holds_back_split_characters() {
        let mut stream = Utf8Stream::default();
        let bytes = "aé€😀".as_bytes();
        let mut out = Vec::new();
        for byte in bytes {
            out.push(stream.push(&[*byte]));
        }
        assert_eq!(out.concat(), "aé€😀");
        // Each character appears whole in exactly one push.
        assert_eq!(out.iter().filter(|s| !s.is_empty()).count(), 4);
        assert_eq!(stream.finish(), "");
    }

    #[test]
    fn utf8_stream_replaces_bytes_that_cannot_be_valid() {
        let mut stream = Utf8Stream::default();
        assert_eq!(stream.push(b"a\xffb"), "a\u{fffd}b");
        assert_eq!(stream.push(b"\xe2\x82"), "");
        assert_eq!(stream.finish(), "\u{fffd}");
    }

    /// One row per case: stops, pieces pushed, the text emitted, whether it stopped.
    #[test]
    fn stop_strings_table() {
        let cases: &[(&[&str], &[&str], &str, bool)] = &[
            (&["END"], &["hello ", "EN", "D more"], "hello ", true),
            (&["END"], &["hello ", "EN", "X"], "hello ENX", false),
            (&["\n\n", "###"], &["a\n", "b##", "#c"], "a\nb", true),
            (&[], &["anything"], "anything", false),
            (&["é!"], &["caf", "é", "!"], "caf", true),
        ];
        for (stops, pieces, want, want_stopped) in cases {
            let mut matcher = StopMatcher::new(stops.iter().map(|s| (*s).to_owned()).collect());
            let mut got = String::new();
            let mut stopped = false;
            for piece in *pieces {
                let step = matcher.push(piece);
                got.push_str(&step.emit);
                stopped |= step.stopped;
            }
            if !stopped {
                got.push_str(&matcher.finish());
            }
            assert_eq!(
                (got.as_str(), stopped),
                (*want, *want_stopped),
                "{stops:?} {pieces:?}"
            );
        }
    }

    proptest! {
        /// Whatever the chunking, the emitted text is the text before the first stop string,
        /// and no emitted prefix ever contains a stop string's first character sequence that is
        /// later cut.
        #[test]
        fn stop_matching_is_independent_of_chunking(
            text in "[ab\\n]{0,40}",
            cuts in prop::collection::vec(1usize..6, 1..20),
        ) {
            let stops = vec!["ab\n".to_owned(), "bb".to_owned()];
            let expected = match stops.iter().filter_map(|s| text.find(s.as_str())).min() {
                Some(at) => text[..at].to_owned(),
                None => text.clone(),
            };
            let mut matcher = StopMatcher::new(stops);
            let mut got = String::new();
            let mut rest = text.as_str();
            let mut cut = cuts.iter().cycle();
            let mut stopped = false;
            while !rest.is_empty() && !stopped {
                let n = (*cut.next().unwrap()).min(rest.len());
                let step = matcher.push(&rest[..n]);
                rest = &rest[n..];
                got.push_str(&step.emit);
                prop_assert!(expected.starts_with(&got), "emitted {:?} beyond {:?}", got, expected);
                stopped = step.stopped;
            }
            if !stopped {
                got.push_str(&matcher.finish());
            }
            prop_assert_eq!(got, expected);
        }

        /// Byte-by-byte decoding of valid UTF-8 gives back the string.
        #[test]
        fn utf8_stream_round_trips(text in "\\PC{0,30}", cuts in prop::collection::vec(1usize..5, 1..10)) {
            let bytes = text.as_bytes();
            let mut stream = Utf8Stream::default();
            let mut got = String::new();
            let mut at = 0;
            let mut cut = cuts.iter().cycle();
            while at < bytes.len() {
                let n = (*cut.next().unwrap()).min(bytes.len() - at);
                got.push_str(&stream.push(&bytes[at..at + n]));
                at += n;
            }
            got.push_str(&stream.finish());
            prop_assert_eq!(got, text);
        }
    }
}
