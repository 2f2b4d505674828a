//! An in-process STAND-IN for the mock engine of `kvfleet-engine`, used by worker processes
//! until that crate's engine API has landed in git and is wired here. It is deliberately simple:
//!
//! - tokens are the bytes of a fixed multilingual text (so, through the frontend's byte-level
//!   test tokenizer, output is readable and multi-byte characters are split across tokens,
//!   which exercises UTF-8-safe streaming);
//! - KV accounting reserves `ceil((prompt + max_tokens) / block_size)` blocks per sequence at
//!   admission and frees them when it ends or is cancelled; a sequence that does not fit waits;
//! - timing: a prompt costs `prefill_time_per_token × len`, each token `token_time`; with both
//!   zero every step makes one token per running sequence (the "zero cost per token" benchmark).
//!
//! No prefix caching, no preemption, no sampling: that is the real engine's job. Pure: time is
//! passed in as a `Duration` since the worker's start.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use crate::backend::EndReason;

use super::protocol::{EngineSpec, WireRequest, WireStatus};

/// The text the stand-in "generates", byte by byte.
const TEXT: &str = "The quick brown fox jumps over the lazy dog. Café, naïve, jalapeño — \
                    東京は晴れ 🚀 Zoë's smörgåsbord. ";

/// What a step produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// New tokens for a sequence.
    Tokens {
        /// The agent's sequence number.
        seq: u64,
        /// Token ids.
        tokens: Vec<u32>,
    },
    /// A sequence ended; its blocks are free.
    Finished {
        /// The agent's sequence number.
        seq: u64,
        /// Why.
        reason: EndReason,
    },
}

/// Why a request was refused at submission.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// Longer than the whole KV pool or the context: it could never run.
    #[error("request needs {need} KV blocks but the pool has {total}")]
    TooLarge {
        /// Blocks needed.
        need: u64,
        /// Blocks in the pool.
        total: u64,
    },
    /// The sequence number is already running.
    #[error("sequence {0} is already running")]
    Duplicate(u64),
}

#[derive(Debug)]
struct Seq {
    request_id: String,
    blocks: u64,
    max_tokens: u32,
    generated: u32,
    offset: usize,
    next_at: Duration,
}

/// The stand-in engine.
#[derive(Debug)]
pub struct StandInEngine {
    spec: EngineSpec,
    waiting: VecDeque<(u64, WireRequest)>,
    running: BTreeMap<u64, Seq>,
    blocks_used: u64,
}

impl StandInEngine {
    /// An idle engine.
    pub fn new(spec: EngineSpec) -> Self {
        Self {
            spec,
            waiting: VecDeque::new(),
            running: BTreeMap::new(),
            blocks_used: 0,
        }
    }

    fn blocks_for(&self, request: &WireRequest) -> u64 {
        let tokens = request.prompt.len() + request.sampling.max_tokens as usize;
        self.spec.block_size.blocks_for(tokens) as u64
    }

    /// Queues a request; it starts at once if its blocks are free.
    pub fn submit(&mut self, request: WireRequest, now: Duration) -> Result<(), SubmitError> {
        let need = self.blocks_for(&request);
        let total = u64::from(self.spec.kv_blocks);
        if need > total {
            return Err(SubmitError::TooLarge { need, total });
        }
        if self.running.contains_key(&request.seq)
            || self.waiting.iter().any(|(seq, _)| *seq == request.seq)
        {
            return Err(SubmitError::Duplicate(request.seq));
        }
        self.waiting.push_back((request.seq, request));
        self.admit(now);
        Ok(())
    }

    /// Drops a request, freeing its blocks (a waiting request may start in them). Returns its
    /// request id if it was known.
    pub fn cancel(&mut self, seq: u64, now: Duration) -> Option<String> {
        if let Some(running) = self.running.remove(&seq) {
            self.blocks_used -= running.blocks;
            self.admit(now);
            return Some(running.request_id);
        }
        let at = self.waiting.iter().position(|(s, _)| *s == seq)?;
        self.waiting.remove(at).map(|(_, r)| r.request_id)
    }

    /// Starts waiting requests that fit (FIFO: the head blocks the rest, so nothing starves).
    fn admit(&mut self, now: Duration) {
        while let Some((_, head)) = self.waiting.front() {
            let need = self.blocks_for(head);
            if self.blocks_used + need > u64::from(self.spec.kv_blocks) {
                break;
            }
            let Some((seq, request)) = self.waiting.pop_front() else {
                break;
            };
            self.blocks_used += need;
            let prefill = Duration::from_micros(
                self.spec.prefill_time_per_token_us * request.prompt.len() as u64,
            );
            let digest = request
                .prompt
                .iter()
                .fold(0usize, |h, t| h.wrapping_mul(31).wrapping_add(*t as usize));
            let mut offset = digest % TEXT.len();
            while !TEXT.is_char_boundary(offset) {
                offset -= 1;
            }
            self.running.insert(
                seq,
                Seq {
                    request_id: request.request_id,
                    blocks: need,
                    max_tokens: request.sampling.max_tokens,
                    generated: 0,
                    offset,
                    next_at: now + prefill,
                },
            );
        }
    }

    /// Advances to `now`: every running sequence that is due makes one token.
    pub fn step(&mut self, now: Duration) -> Vec<Output> {
        self.admit(now);
        let token_time = Duration::from_micros(self.spec.token_time_us);
        let bytes = TEXT.as_bytes();
        let mut out = Vec::new();
        let mut ended = Vec::new();
        for (seq, s) in &mut self.running {
            if s.next_at > now {
                continue;
            }
            let token = u32::from(bytes[(s.offset + s.generated as usize) % bytes.len()]);
            s.generated += 1;
            s.next_at += token_time;
            out.push(Output::Tokens {
                seq: *seq,
                tokens: vec![token],
            });
            if s.generated >= s.max_tokens {
                ended.push(*seq);
            }
        }
        for seq in ended {
            if let Some(s) = self.running.remove(&seq) {
                self.blocks_used -= s.blocks;
            }
            out.push(Output::Finished {
                seq,
                reason: EndReason::Length,
            });
        }
        self.admit(now);
        out
    }

    /// When the next step has something to do; `None` when idle.
    pub fn next_wakeup(&self) -> Option<Duration> {
        self.running.values().map(|s| s.next_at).min()
    }

    /// Load and KV use.
    pub fn status(&self) -> WireStatus {
        WireStatus {
            running: self.running.len() as u32,
            waiting: self.waiting.len() as u32,
            kv_blocks_used: self.blocks_used,
            kv_blocks_total: u64::from(self.spec.kv_blocks),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvfleet_proto::{BlockSize, SamplingParams};

    fn spec(kv_blocks: u32, token_time_us: u64) -> EngineSpec {
        EngineSpec {
            model: "m".into(),
            context_length: 1024,
            block_size: BlockSize::new(4).unwrap(),
            kv_blocks,
            token_time_us,
            prefill_time_per_token_us: 0,
        }
    }

    fn request(seq: u64, prompt: usize, max_tokens: u32) -> WireRequest {
        WireRequest {
            seq,
            request_id: format!("r{seq}"),
            prompt: vec![1; prompt],
            block_hashes: Vec::new(),
            sampling: SamplingParams::greedy(max_tokens),
        }
    }

    fn run_to_end(engine: &mut StandInEngine) -> Vec<Output> {
        let mut all = Vec::new();
        let mut now = Duration::ZERO;
        for _ in 0..10_000 {
            all.extend(engine.step(now));
            match engine.next_wakeup() {
                Some(t) => now = now.max(t),
                None if engine.status().waiting == 0 => break,
                None => {}
            }
        }
        all
    }

    #[test]
    fn a_request_makes_max_tokens_tokens_then_finishes_and_frees_its_blocks() {
        let mut engine = StandInEngine::new(spec(16, 1000));
        engine.submit(request(1, 6, 5), Duration::ZERO).unwrap();
        let outputs = run_to_end(&mut engine);
        let tokens: usize = outputs
            .iter()
            .map(|o| match o {
                Output::Tokens { tokens, .. } => tokens.len(),
                Output::Finished { .. } => 0,
            })
            .sum();
        assert_eq!(tokens, 5);
        assert_eq!(
            outputs.last(),
            Some(&Output::Finished {
                seq: 1,
                reason: EndReason::Length
            })
        );
        assert_eq!(engine.status().kv_blocks_used, 0);
    }

    #[test]
    fn a_request_that_does_not_fit_waits_and_cancel_frees_blocks() {
        // 12 tokens = 3 blocks each; the pool holds 4 blocks: one at a time.
        let mut engine = StandInEngine::new(spec(4, 1000));
        engine.submit(request(1, 8, 4), Duration::ZERO).unwrap();
        engine.submit(request(2, 8, 4), Duration::ZERO).unwrap();
        engine.step(Duration::ZERO);
        assert_eq!(engine.status().running, 1);
        assert_eq!(engine.status().waiting, 1);
        assert_eq!(engine.status().kv_blocks_used, 3);
        assert_eq!(engine.cancel(1, Duration::ZERO).as_deref(), Some("r1"));
        // The waiting request took the freed blocks at once.
        assert_eq!(engine.status().running, 1);
        assert_eq!(engine.status().waiting, 0);
        assert_eq!(engine.cancel(2, Duration::ZERO).as_deref(), Some("r2"));
        assert_eq!(engine.status().kv_blocks_used, 0);
        assert_eq!(engine.cancel(2, Duration::ZERO), None);
    }

    #[test]
    fn impossible_and_duplicate_requests_are_refused() {
        let mut engine = StandInEngine::new(spec(2, 0));
        assert_eq!(
            engine.submit(request(1, 100, 1), Duration::ZERO),
            Err(SubmitError::TooLarge { need: 26, total: 2 })
        );
        engine.submit(request(2, 1, 1), Duration::ZERO).unwrap();
        assert_eq!(
            engine.submit(request(2, 1, 1), Duration::ZERO),
            Err(SubmitError::Duplicate(2))
        );
    }

    #[test]
    fn output_is_valid_utf8_once_whole() {
        let mut engine = StandInEngine::new(spec(64, 0));
        engine.submit(request(1, 3, 40), Duration::ZERO).unwrap();
        let bytes: Vec<u8> = run_to_end(&mut engine)
            .into_iter()
            .flat_map(|o| match o {
                Output::Tokens { tokens, .. } => tokens,
                Output::Finished { .. } => Vec::new(),
            })
            .map(|t| t as u8)
            .collect();
        assert_eq!(bytes.len(), 40);
        // It starts on a character boundary; only the tail may be cut mid-character.
        let lossy = String::from_utf8_lossy(&bytes);
        assert!(
            !lossy.trim_end_matches('\u{fffd}').contains('\u{fffd}'),
            "{lossy}"
        );
    }
}
