//! The worker's engine: `kvfleet-engine`'s scheduler core (continuous batching, paged KV block
//! pool with prefix caching) over either executor, behind the small interface the worker loop
//! needs:
//! - mock: a timing model instead of math (a profile from the configured per-token costs; "zero
//!   cost" becomes a 1 ns step, the least the profile accepts);
//! - native: the real model (`kvfleet_model::NativeExecutor`), loaded from the spec's path.
//!   The weights load before the worker says hello, so the agent sees it ready only once it
//!   can generate. Steps run on the worker's thread (they block it for the step's compute).
//!
//! The adapter's other jobs: map the agent's per-connection `seq` numbers to engine request ids
//! and back, group a step's tokens (and their logprobs) into one output per request, turn
//! finishes and aborts into outputs, and hand the engine's KV events to the caller. Time is
//! passed in as a `Duration` since the worker's start.
//!
//! The mock's tokens are pseudo-random ids below the tokenizer's vocabulary size; through the
//! byte-level test tokenizer they are random bytes, which also exercises the frontend's
//! UTF-8-safe detokenization (invalid sequences come out as U+FFFD).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use kvfleet_engine::{
    DecodeModel, Engine, EngineOutput, FinishReason, MockEngine, MockExecutor, MockProfile,
    PoolSizing, Quadratic, Request, RequestId, Scheduler, SchedulerConfig,
};
use kvfleet_model::{KvBudget, NativeExecutor};
use kvfleet_proto::{KvDtype, KvEvent, KvLayout, WorkerId};

use super::protocol::{EngineSpec, WireEngine, WireRequest, WireStatus};
use crate::backend::{EndReason, TokenLogprob};

/// The shortest step the mock profile accepts (its times must be positive): 1 ns.
const MIN_STEP_MS: f64 = 1e-6;

/// What a step produced.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// New tokens for a request.
    Tokens {
        /// The agent's sequence number.
        seq: u64,
        /// Token ids, in order.
        tokens: Vec<u32>,
        /// One per token, when the request asked for logprobs.
        logprobs: Option<Vec<TokenLogprob>>,
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
pub struct WorkerEngine {
    engine: Box<dyn Engine>,
    name: String,
    by_seq: HashMap<u64, (RequestId, String)>,
    by_id: HashMap<RequestId, u64>,
    kv_events: Vec<KvEvent>,
    kv_events_total: u64,
}

impl std::fmt::Debug for WorkerEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerEngine")
            .field("engine", &self.name)
            .field("requests", &self.by_seq.len())
            .finish()
    }
}

/// Tokens per step of a native engine on CPU: a long prompt is prefilled in chunks of this, so
/// running decodes get a step (and the worker reads its socket) between chunks.
const NATIVE_MAX_BATCHED_TOKENS: usize = 512;

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
    /// Builds the engine `spec` asks for; a native one loads its model first (seconds for a
    /// real model; progress is logged).
    pub fn new(worker: WorkerId, spec: &EngineSpec) -> anyhow::Result<Self> {
        let config = SchedulerConfig {
            worker,
            max_model_len: spec.context_length as usize,
            kv_memory: PoolSizing::Blocks(spec.kv_blocks),
            // The caller passes the wall clock: a late driver shows up as latency.
            realtime: true,
            ..SchedulerConfig::default()
        };
        let (engine, name): (Box<dyn Engine>, String) = match spec.engine {
            WireEngine::Mock => {
                let profile = profile(spec);
                profile.validate()?;
                let engine = MockEngine::new(config, MockExecutor::new(profile))?;
                (Box::new(engine), "kvfleet-engine mock".into())
            }
            WireEngine::Native => {
                let engine = native(spec, config)?;
                (Box::new(engine), "kvfleet-model native (CPU)".into())
            }
        };
        Ok(Self {
            engine,
            name,
            by_seq: HashMap::new(),
            by_id: HashMap::new(),
            kv_events: Vec::new(),
            kv_events_total: 0,
        })
    }

    /// The layout of the engine's KV blocks.
    pub fn kv_layout(&self) -> &KvLayout {
        self.engine.kv_layout()
    }

    /// The engine's name, for logs and the worker's hello.
    pub fn name(&self) -> &str {
        &self.name
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
        // An executor failure aborts that step's requests (they come out as `Aborted` below)
        // and leaves the engine usable: the worker carries on.
        if let Err(e) = self.engine.step_until(now) {
            tracing::warn!(error = %e, "a step failed: its requests are aborted");
        }
        let mut tokens: BTreeMap<u64, (Vec<u32>, Option<Vec<TokenLogprob>>)> = BTreeMap::new();
        let mut ends = Vec::new();
        for output in self.engine.drain_outputs() {
            let Some(&seq) = self.by_id.get(&output.request()) else {
                continue;
            };
            match output {
                EngineOutput::Token(token) => {
                    let entry = tokens.entry(seq).or_default();
                    entry.0.push(token.token);
                    if let Some(logprob) = token.logprob {
                        entry.1.get_or_insert_with(Vec::new).push(TokenLogprob {
                            logprob,
                            top: token.top_logprobs,
                        });
                    }
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
            .map(|(seq, (tokens, logprobs))| Output::Tokens {
                seq,
                tokens,
                logprobs,
            })
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
            prefix_query_tokens: m.prefix_query_tokens,
            prefix_hit_tokens: m.prefix_hit_tokens,
            prefill_tokens: m.prefill_tokens_pending,
        }
    }

    /// Takes the KV events the engine emitted since the last call (after steps and cancels).
    pub fn drain_kv_events(&mut self) -> Vec<KvEvent> {
        let mut events = std::mem::take(&mut self.kv_events);
        events.extend(self.engine.drain_events());
        self.kv_events_total += events.len() as u64;
        events
    }

    /// KV events drained so far.
    pub fn kv_events_total(&self) -> u64 {
        self.kv_events_total
    }
}

/// Loads the model at `spec.path` and builds the native engine over it.
fn native(
    spec: &EngineSpec,
    mut config: SchedulerConfig,
) -> anyhow::Result<Scheduler<NativeExecutor>> {
    let path = spec
        .path
        .as_deref()
        .context("a native engine needs the model's path")?;
    let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    tracing::info!(path = %path.display(), mb = size as f64 / 1e6, "loading model");
    let start = Instant::now();
    let model =
        kvfleet_model::load(path).with_context(|| format!("loading model {}", path.display()))?;
    tracing::info!(
        path = %path.display(),
        architecture = %model.info.architecture,
        parameters_m = model.info.parameters as f64 / 1e6,
        secs = start.elapsed().as_secs_f64(),
        "model loaded"
    );
    let budget: KvBudget = spec
        .kv_memory
        .map(KvBudget::from)
        .unwrap_or(KvBudget::Blocks(spec.kv_blocks));
    config.kv_memory = budget.sizing().context("sizing the KV cache")?;
    config.max_batched_tokens = NATIVE_MAX_BATCHED_TOKENS;
    // Caps the context at the model's window and takes its EOS tokens.
    let config = kvfleet_model::executor::engine_config(&model, config);
    let executor = NativeExecutor::new(Arc::new(model), &config, spec.block_size)
        .context("allocating the KV cache")?;
    let engine = Scheduler::new(config, executor).context("building the engine")?;
    let m = engine.metrics();
    tracing::info!(
        kv_blocks = m.kv_blocks_total,
        kv_mb = f64::from(m.kv_blocks_total) * m.kv_block_bytes as f64 / 1e6,
        max_model_len = engine.config().max_model_len,
        "KV cache allocated"
    );
    Ok(engine)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvfleet_proto::{BlockSize, SamplingParams};

    fn spec(kv_blocks: u32, token_time_us: u64) -> EngineSpec {
        EngineSpec {
            model: "m".into(),
            engine: WireEngine::Mock,
            path: None,
            kv_memory: None,
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
            !engine.drain_kv_events().is_empty(),
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
