//! The worker's engine: `kvfleet-engine`'s mock engine (the real scheduler core, paged KV block
//! pool with prefix caching, and a timing model instead of math), behind the small interface the
//! worker loop needs.
//!
//! The adapter's jobs: build the engine from the agent's [`EngineSpec`] (a timing profile from
//! the configured per-token costs; "zero cost" becomes a 1 ns step, the least the profile
//! accepts), map the agent's per-connection `seq` numbers to engine request ids and back, group
//! a step's tokens into one output per request, and turn finishes and aborts into outputs.
//! Pure like the engine: time is passed in as a `Duration` since the worker's start.
//!
//! The mock's tokens are pseudo-random ids below the tokenizer's vocabulary size; through the
//! byte-level test tokenizer they are random bytes, which also exercises the frontend's
//! UTF-8-safe detokenization (invalid sequences come out as U+FFFD).

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use kvfleet_engine::{
    DecodeModel, Engine, EngineOutput, FinishReason, MockEngine, MockExecutor, MockProfile,
    PoolSizing, Quadratic, Request, RequestId, SchedulerConfig,
};
use kvfleet_proto::{KvDtype, KvLayout, WorkerId};

use super::protocol::{EngineSpec, WireRequest, WireStatus};
use crate::backend::EndReason;

/// The shortest step the mock profile accepts (its times must be positive): 1 ns.
const MIN_STEP_MS: f64 = 1e-6;

/// What a step produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// New tokens for a request.
    Tokens {
        /// The agent's sequence number.
        seq: u64,
        /// Token ids, in order.
        tokens: Vec<u32>,
    },
    /// A request ended; its blocks are released.
    Finished {
        /// The agent's sequence number.
        seq: u64,
        /// Why.
        reason: EndReason,
    },
    /// The engine aborted a request.
    Failed {
        /// The agent's sequence number.
        seq: u64,
        /// What went wrong.
        message: String,
    },
}

impl Output {
    /// The agent's sequence number it belongs to.
    pub fn seq(&self) -> u64 {
        match self {
            Output::Tokens { seq, .. }
            | Output::Finished { seq, .. }
            | Output::Failed { seq, .. } => *seq,
        }
    }
}

/// A request the engine refused at submission (the message says why: context, pool, overload).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SubmitError {
    /// The engine said no.
    #[error("{0}")]
    Refused(String),
    /// The sequence number is already in use on this connection.
    #[error("sequence {0} is already running")]
    Duplicate(u64),
}

/// The worker's engine and its request bookkeeping.
#[derive(Debug)]
pub struct WorkerEngine {
    engine: MockEngine,
    by_seq: HashMap<u64, (RequestId, String)>,
    by_id: HashMap<RequestId, u64>,
    kv_events: u64,
}

/// The mock timing profile for a spec.
pub fn profile(spec: &EngineSpec) -> MockProfile {
    let ms = |us: u64| us as f64 / 1000.0;
    MockProfile {
        name: format!("{}-mock", spec.model),
        vocab_size: spec.vocab_size,
        kv_cache_bytes: 0,
        layout: KvLayout {
            model: spec.model.clone(),
            layers: 1,
            kv_heads: 1,
            head_dim: 1,
            dtype: KvDtype::F16,
            block_size: spec.block_size,
        },
        prefill: Quadratic {
            c0: MIN_STEP_MS,
            c1: ms(spec.prefill_time_per_token_us),
            c2: 0.0,
        },
        decode: DecodeModel {
            c0: ms(spec.token_time_us).max(MIN_STEP_MS),
            c1: 0.0,
            c2: 0.0,
            per_seq: 0.0,
        },
    }
}

impl WorkerEngine {
    /// Builds the mock engine for `spec`.
    pub fn new(worker: WorkerId, spec: &EngineSpec) -> anyhow::Result<Self> {
        let profile = profile(spec);
        profile.validate()?;
        let config = SchedulerConfig {
            worker,
            max_model_len: spec.context_length as usize,
            kv_memory: PoolSizing::Blocks(spec.kv_blocks),
            // The caller passes the wall clock: a late driver shows up as latency.
            realtime: true,
            ..SchedulerConfig::default()
        };
        let engine = MockEngine::new(config, MockExecutor::new(profile))?;
        Ok(Self {
            engine,
            by_seq: HashMap::new(),
            by_id: HashMap::new(),
            kv_events: 0,
        })
    }

    /// Queues a request.
    pub fn submit(&mut self, request: WireRequest, now: Duration) -> Result<(), SubmitError> {
        if self.by_seq.contains_key(&request.seq) {
            return Err(SubmitError::Duplicate(request.seq));
        }
        let id = self
            .engine
            .submit(Request::new(request.prompt, request.sampling), now)
            .map_err(|e| SubmitError::Refused(e.to_string()))?;
        self.by_seq.insert(request.seq, (id, request.request_id));
        self.by_id.insert(id, request.seq);
        Ok(())
    }

    /// Drops a request, releasing its blocks. Returns its request id if it was running.
    pub fn cancel(&mut self, seq: u64) -> Option<String> {
        let (id, request_id) = self.by_seq.remove(&seq)?;
        self.by_id.remove(&id);
        self.engine.cancel(id);
        Some(request_id)
    }

    /// The frontend's request id of a running sequence (for log lines).
    pub fn request_id(&self, seq: u64) -> Option<&str> {
        self.by_seq.get(&seq).map(|(_, r)| r.as_str())
    }

    /// Advances to `now` and collects what the finished steps produced.
    pub fn step(&mut self, now: Duration) -> anyhow::Result<Vec<Output>> {
        self.engine.step_until(now)?;
        // No consumer in the agent yet (the router and control-plane client come later):
        // drain so the engine's bounded event buffer never overflows, and count.
        self.kv_events += self.engine.drain_events().len() as u64;
        let mut tokens: BTreeMap<u64, Vec<u32>> = BTreeMap::new();
        let mut ends = Vec::new();
        for output in self.engine.drain_outputs() {
            let Some(&seq) = self.by_id.get(&output.request()) else {
                continue;
            };
            match output {
                EngineOutput::Token(token) => {
                    tokens.entry(seq).or_default().push(token.token);
                    if let Some(finish) = token.finish {
                        let reason = match finish.reason {
                            FinishReason::Length => EndReason::Length,
                            FinishReason::Stop(_) | FinishReason::Eos(_) => EndReason::Stop,
                        };
                        ends.push(Output::Finished { seq, reason });
                    }
                }
                EngineOutput::Aborted { error, .. } => {
                    ends.push(Output::Failed {
                        seq,
                        message: error,
                    });
                }
            }
        }
        let mut out: Vec<Output> = tokens
            .into_iter()
            .map(|(seq, tokens)| Output::Tokens { seq, tokens })
            .collect();
        for end in &ends {
            if let Some((id, _)) = self.by_seq.remove(&end.seq()) {
                self.by_id.remove(&id);
            }
        }
        out.extend(ends);
        Ok(out)
    }

    /// When the engine next has something to do; `None` when idle.
    pub fn next_wakeup(&self) -> Option<Duration> {
        self.engine.next_event_time()
    }

    /// Load and KV use.
    pub fn status(&self) -> WireStatus {
        let m = self.engine.metrics();
        WireStatus {
            running: m.running as u32,
            waiting: m.waiting as u32,
            kv_blocks_used: u64::from(m.kv_blocks_used),
            kv_blocks_total: u64::from(m.kv_blocks_total),
        }
    }

    /// KV events the engine emitted so far.
    pub fn kv_events(&self) -> u64 {
        self.kv_events
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
            vocab_size: 257,
            token_time_us,
            prefill_time_per_token_us: 0,
        }
    }

    fn request(seq: u64, prompt: usize, max_tokens: u32) -> WireRequest {
        WireRequest {
            seq,
            request_id: format!("r{seq}"),
            prompt: (0..prompt as u32).collect(),
            block_hashes: Vec::new(),
            sampling: SamplingParams::greedy(max_tokens),
        }
    }

    /// Runs virtual time forward until the engine is idle.
    fn run_to_end(engine: &mut WorkerEngine) -> Vec<Output> {
        let mut all = Vec::new();
        let mut now = Duration::ZERO;
        for _ in 0..10_000 {
            all.extend(engine.step(now).unwrap());
            match engine.next_wakeup() {
                Some(t) => now = now.max(t) + Duration::from_nanos(1),
                None => break,
            }
        }
        all
    }

    #[test]
    fn a_request_makes_max_tokens_tokens_then_finishes_and_releases_its_blocks() {
        let mut engine = WorkerEngine::new(WorkerId(1), &spec(64, 1000)).unwrap();
        let prompt: Vec<u32> = (0..6).collect();
        engine.submit(request(1, 6, 5), Duration::ZERO).unwrap();
        let outputs = run_to_end(&mut engine);
        let tokens: Vec<u32> = outputs
            .iter()
            .flat_map(|o| match o {
                Output::Tokens { tokens, .. } => tokens.clone(),
                _ => Vec::new(),
            })
            .collect();
        // The engine crate's documented pseudo-token sequence.
        assert_eq!(tokens, kvfleet_engine::expected_output(&prompt, 5, 257));
        assert_eq!(
            outputs.last(),
            Some(&Output::Finished {
                seq: 1,
                reason: EndReason::Length
            })
        );
        assert_eq!(engine.status().kv_blocks_used, 0);
        assert!(
            engine.kv_events() > 0,
            "the prompt's blocks entered the prefix cache"
        );
        assert_eq!(engine.request_id(1), None);
    }

    #[test]
    fn cancel_releases_blocks_and_forgets_the_request() {
        let mut engine = WorkerEngine::new(WorkerId(1), &spec(64, 1000)).unwrap();
        engine.submit(request(1, 16, 100), Duration::ZERO).unwrap();
        engine.step(Duration::ZERO).unwrap();
        engine.step(Duration::from_millis(5)).unwrap();
        assert!(engine.status().kv_blocks_used > 0);
        assert_eq!(engine.request_id(1), Some("r1"));
        assert_eq!(engine.cancel(1).as_deref(), Some("r1"));
        assert_eq!(engine.status().kv_blocks_used, 0);
        assert_eq!(engine.cancel(1), None);
        // Nothing more comes out for it.
        assert!(run_to_end(&mut engine).is_empty());
    }

    #[test]
    fn impossible_and_duplicate_requests_are_refused() {
        let mut engine = WorkerEngine::new(WorkerId(1), &spec(2, 0)).unwrap();
        assert!(matches!(
            engine.submit(request(1, 100, 1), Duration::ZERO),
            Err(SubmitError::Refused(_))
        ));
        engine.submit(request(2, 1, 1), Duration::ZERO).unwrap();
        assert_eq!(
            engine.submit(request(2, 1, 1), Duration::ZERO),
            Err(SubmitError::Duplicate(2))
        );
    }

    #[test]
    fn zero_cost_is_a_valid_profile() {
        assert!(profile(&spec(8, 0)).validate().is_ok());
    }
}
