//! Request traces in the Mooncake format, and the prompts the simulator makes from them.
//!
//! One JSON object per line: `{"timestamp": ms, "input_length": tokens, "output_length": tokens,
//! "hash_ids": [..]}` (Mooncake FAST'25 release). `hash_ids` name the prompt's 512-token blocks
//! (`TRACE_BLOCK_TOKENS`): two requests share a prompt prefix exactly as far as their ids agree.
//! Empty lines are skipped; any other line that does not parse, or that contradicts itself, is a
//! [`TraceError`] naming its line number. Parsing never panics.
//!
//! # Prompt synthesis
//!
//! The trace carries no tokens, so [`synthesize_prompt`] makes them: hash id `h` stands for the
//! fixed chunk of [`TRACE_BLOCK_TOKENS`] token ids
//!
//! ```text
//! token(h, j) = splitmix64(splitmix64(h) ^ j) mod vocab_size      j = 0..512
//! ```
//!
//! and a prompt is the concatenation of its ids' chunks, truncated to `input_length` (so the
//! last chunk is usually partial). Equal ids give equal tokens, hence equal engine block hashes;
//! different ids give different tokens (with overwhelming probability), hence different hashes.
//! A prompt whose ids cover fewer than `input_length` tokens (a trace that lists only the shared
//! blocks) is padded with tokens unique to the request (derived from its line number), which
//! never match another request.

use std::io::BufRead;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

/// Tokens per Mooncake hash id.
pub const TRACE_BLOCK_TOKENS: usize = 512;

/// One request of a trace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceRequest {
    /// The 1-based line it came from (for messages).
    pub line: usize,
    /// When it arrives, since the trace's epoch (its `timestamp`, in ms).
    pub arrival: Duration,
    /// Prompt length in tokens (at least 1).
    pub input_length: u32,
    /// Tokens to generate (at least 1).
    pub output_length: u32,
    /// The ids of its 512-token prompt blocks, in order.
    pub hash_ids: Vec<u64>,
}

/// A trace that could not be read. Every variant names the offending line.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// Reading the file failed.
    #[error("reading trace {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// Reading a line failed (bad UTF-8 or an IO error mid-file).
    #[error("trace line {line}: {source}")]
    Read {
        /// 1-based line number.
        line: usize,
        /// The cause.
        source: std::io::Error,
    },
    /// The line is not a JSON object with the four fields.
    #[error("trace line {line}: {source}")]
    Json {
        /// 1-based line number.
        line: usize,
        /// What serde_json said (it names the field and column).
        source: serde_json::Error,
    },
    /// The line parsed but its values are unusable.
    #[error("trace line {line}: {reason}")]
    Invalid {
        /// 1-based line number.
        line: usize,
        /// What is wrong, in words.
        reason: String,
    },
    /// Timestamps go backwards.
    #[error(
        "trace line {line}: timestamp {timestamp} ms is before the previous line's {previous} ms"
    )]
    Unordered {
        /// 1-based line number.
        line: usize,
        /// This line's timestamp.
        timestamp: u64,
        /// The previous request's timestamp.
        previous: u64,
    },
}

impl TraceError {
    /// The 1-based line the error is about (`None` for a file that could not be opened).
    pub fn line(&self) -> Option<usize> {
        match self {
            TraceError::Io { .. } => None,
            TraceError::Read { line, .. }
            | TraceError::Json { line, .. }
            | TraceError::Invalid { line, .. }
            | TraceError::Unordered { line, .. } => Some(*line),
        }
    }
}

#[derive(Deserialize)]
struct RawLine {
    timestamp: u64,
    input_length: u32,
    output_length: u32,
    hash_ids: Vec<u64>,
}

/// Parses a whole trace. Stops at the first bad line.
pub fn parse_trace(reader: impl BufRead) -> Result<Vec<TraceRequest>, TraceError> {
    let mut requests = Vec::new();
    let mut previous = 0u64;
    for (index, text) in reader.lines().enumerate() {
        let line = index + 1;
        let text = text.map_err(|source| TraceError::Read { line, source })?;
        if text.trim().is_empty() {
            continue;
        }
        let raw: RawLine =
            serde_json::from_str(&text).map_err(|source| TraceError::Json { line, source })?;
        let invalid = |reason: String| TraceError::Invalid { line, reason };
        if raw.input_length == 0 {
            return Err(invalid("input_length must be at least 1".into()));
        }
        if raw.output_length == 0 {
            return Err(invalid("output_length must be at least 1".into()));
        }
        let needed = (raw.input_length as usize).div_ceil(TRACE_BLOCK_TOKENS);
        if raw.hash_ids.len() > needed {
            return Err(invalid(format!(
                "{} hash_ids for {} input tokens: at most {needed} blocks of {TRACE_BLOCK_TOKENS} \
                 tokens",
                raw.hash_ids.len(),
                raw.input_length
            )));
        }
        if raw.timestamp < previous {
            return Err(TraceError::Unordered {
                line,
                timestamp: raw.timestamp,
                previous,
            });
        }
        previous = raw.timestamp;
        requests.push(TraceRequest {
            line,
            arrival: Duration::from_millis(raw.timestamp),
            input_length: raw.input_length,
            output_length: raw.output_length,
            hash_ids: raw.hash_ids,
        });
    }
    Ok(requests)
}

/// Reads and parses a trace file.
pub fn load_trace(path: &Path) -> Result<Vec<TraceRequest>, TraceError> {
    let file = std::fs::File::open(path).map_err(|source| TraceError::Io {
        path: path.display().to_string(),
        source,
    })?;
    parse_trace(std::io::BufReader::new(file))
}

/// SplitMix64's output function: a cheap, well-mixed bijection on u64.
fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Keeps padding tokens (unique per request) in a different stream from hash-id chunks.
const PADDING_DOMAIN: u64 = 0x7061_6464_696e_6700;

/// The prompt token ids for `request` (see the module docs), each below `vocab_size`.
pub fn synthesize_prompt(request: &TraceRequest, vocab_size: u32) -> Vec<u32> {
    let vocab = u64::from(vocab_size.max(1));
    let len = request.input_length as usize;
    let mut prompt = Vec::with_capacity(len);
    for &id in &request.hash_ids {
        let key = mix(id);
        let take = (len - prompt.len()).min(TRACE_BLOCK_TOKENS);
        prompt.extend((0..take as u64).map(|j| (mix(key ^ j) % vocab) as u32));
    }
    if prompt.len() < len {
        let key = mix(PADDING_DOMAIN ^ request.line as u64);
        let start = prompt.len() as u64;
        prompt.extend((start..len as u64).map(|j| (mix(key ^ j) % vocab) as u32));
    }
    prompt
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Vec<TraceRequest>, TraceError> {
        parse_trace(text.as_bytes())
    }

    #[test]
    fn good_lines_parse_and_blank_lines_are_skipped() {
        let text = "{\"timestamp\": 0, \"input_length\": 600, \"output_length\": 6, \"hash_ids\": [0, 1]}\n\
                    \n\
                    {\"timestamp\": 40, \"input_length\": 10, \"output_length\": 1, \"hash_ids\": [7]}\n";
        let requests = parse(text).unwrap();
        assert_eq!(
            requests,
            vec![
                TraceRequest {
                    line: 1,
                    arrival: Duration::ZERO,
                    input_length: 600,
                    output_length: 6,
                    hash_ids: vec![0, 1],
                },
                TraceRequest {
                    line: 3,
                    arrival: Duration::from_millis(40),
                    input_length: 10,
                    output_length: 1,
                    hash_ids: vec![7],
                },
            ]
        );
    }

    #[test]
    fn bad_lines_are_errors_naming_the_line() {
        let ok =
            "{\"timestamp\": 5, \"input_length\": 10, \"output_length\": 1, \"hash_ids\": [1]}\n";
        // (second line, expected line number, a fragment of the message)
        let cases = [
            ("not json", 2, "expected"),
            (
                "{\"timestamp\": 6, \"input_length\": 10}",
                2,
                "missing field",
            ),
            (
                "{\"timestamp\": -1, \"input_length\": 10, \"output_length\": 1, \"hash_ids\": []}",
                2,
                "invalid value",
            ),
            (
                "{\"timestamp\": 6, \"input_length\": 0, \"output_length\": 1, \"hash_ids\": []}",
                2,
                "input_length must be at least 1",
            ),
            (
                "{\"timestamp\": 6, \"input_length\": 3, \"output_length\": 0, \"hash_ids\": [1]}",
                2,
                "output_length must be at least 1",
            ),
            (
                "{\"timestamp\": 6, \"input_length\": 512, \"output_length\": 1, \"hash_ids\": [1, 2]}",
                2,
                "2 hash_ids for 512 input tokens",
            ),
            (
                "{\"timestamp\": 4, \"input_length\": 3, \"output_length\": 1, \"hash_ids\": [1]}",
                2,
                "before the previous line's 5 ms",
            ),
        ];
        for (bad, line, fragment) in cases {
            let err = parse(&format!("{ok}{bad}\n{ok}")).unwrap_err();
            assert_eq!(err.line(), Some(line), "{bad}: {err}");
            let message = err.to_string();
            assert!(
                message.starts_with(&format!("trace line {line}: ")),
                "{message}"
            );
            assert!(message.contains(fragment), "{bad}: {message}");
        }
    }

    #[test]
    fn invalid_utf8_is_an_error_not_a_panic() {
        let err = parse_trace(&b"\xff\xfe\n"[..]).unwrap_err();
        assert_eq!(err.line(), Some(1));
    }

    #[test]
    fn a_missing_file_is_an_io_error_naming_it() {
        let err = load_trace(Path::new("/nonexistent/trace.jsonl")).unwrap_err();
        assert!(
            err.to_string().contains("/nonexistent/trace.jsonl"),
            "{err}"
        );
        assert_eq!(err.line(), None);
    }

    fn request(line: usize, input_length: u32, hash_ids: Vec<u64>) -> TraceRequest {
        TraceRequest {
            line,
            arrival: Duration::ZERO,
            input_length,
            output_length: 1,
            hash_ids,
        }
    }

    #[test]
    fn equal_hash_ids_give_equal_prefixes_and_different_ids_differ() {
        let a = synthesize_prompt(&request(1, 1200, vec![4, 5, 6]), 1000);
        let b = synthesize_prompt(&request(2, 1100, vec![4, 5, 9]), 1000);
        let c = synthesize_prompt(&request(3, 700, vec![8, 5]), 1000);
        assert_eq!((a.len(), b.len(), c.len()), (1200, 1100, 700));
        assert!(a.iter().chain(&b).chain(&c).all(|&t| t < 1000));
        assert_eq!(a[..1024], b[..1024]);
        assert_ne!(a[1024..1100], b[1024..1100]);
        // Chunks depend on the id, not on the position in the prompt, but a different first
        // block means no shared prefix at all.
        assert_ne!(a[..512], c[..512]);
        // The same request always gives the same prompt.
        assert_eq!(a, synthesize_prompt(&request(1, 1200, vec![4, 5, 6]), 1000));
    }

    #[test]
    fn uncovered_tokens_are_unique_to_the_request() {
        let a = synthesize_prompt(&request(1, 1000, vec![3]), 50_000);
        let b = synthesize_prompt(&request(2, 1000, vec![3]), 50_000);
        assert_eq!(a[..512], b[..512]);
        assert_ne!(a[512..], b[512..]);
    }
}
