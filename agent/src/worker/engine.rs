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
//! Disaggregated serving, both halves:
//! - export (`WireRequest::export_kv`): after every step, the prompt blocks the request newly
//!   got into the prefix cache come out as one [`Output::KvBlocks`] (`Engine::export_kv_from`
//!   with the count already sent, so each block is copied once), ahead of that step's tokens;
//!   the step that finishes the request sends whatever prompt blocks remain cached.
//! - import ([`WorkerEngine::add_import_block`], then a request with `kv_blocks`): blocks are
//!   buffered per `seq` until the request arrives (bounded: bytes, pending requests, blocks per
//!   prompt), then the contiguous run of well-formed blocks from block 0 is attached to the
//!   engine request with the prompt's own block hashes. Missing or malformed blocks, and an
//!   import the engine refuses, mean recompute (logged and counted), never a failed request;
//!   only more blocks than the prompt has full blocks is refused, as the agent's bug it is.
//!   Imported blocks carry their supplier (`WireRequest::kv_origin`, a node id interned here
//!   as a small [`Origin`]) into every KV tier; [`WorkerEngine::evict_origin`] drops them
//!   all when the agent says that node was revoked.
//!
//! The mock's tokens are pseudo-random ids below the tokenizer's vocabulary size; through the
//! byte-level test tokenizer they are random bytes, which also exercises the frontend's
//! UTF-8-safe detokenization (invalid sequences come out as U+FFFD).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use kvfleet_engine::{
    DecodeModel, Engine, EngineOutput, FinishReason, KvExport, MockEngine, MockExecutor,
    MockProfile, Origin, PoolSizing, Quadratic, Request, RequestId, Scheduler, SchedulerConfig,
    SubmitError as EngineSubmitError,
};
use kvfleet_model::{KvBudget, NativeExecutor};
use kvfleet_proto::hash::BlockHasher;
use kvfleet_proto::{KvDtype, KvEvent, KvLayout, NodeId, SequenceHash, WorkerId};

use super::protocol::{
    EngineSpec, MAX_KV_BLOCK_BYTES, WireEngine, WireRequest, WireStatus, WorkerLatencies,
};
use crate::backend::{FinishReason as EndReason, TokenChunk, TokenLogprob, TopLogprob};

/// The shortest step the mock profile accepts (its times must be positive): 1 ns.
const MIN_STEP_MS: f64 = 1e-6;

/// What a step produced.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// New tokens for a request.
    Tokens {
        /// The agent's sequence number.
        seq: u64,
        /// The tokens, with their logprobs when the request asked.
        chunk: TokenChunk,
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
    /// Prompt blocks of an `export_kv` request, newly in the prefix cache.
    KvBlocks {
        /// The agent's sequence number.
        seq: u64,
        /// The prompt index of the first block.
        first_block: u32,
        /// The blocks' sequence hashes, in order.
        hashes: Vec<SequenceHash>,
        /// `hashes.len()` blocks of [`WorkerEngine::block_bytes`] bytes each, in order.
        data: Vec<u8>,
    },
}

impl Output {
    /// The agent's sequence number it belongs to.
    pub fn seq(&self) -> u64 {
        match self {
            Output::Tokens { seq, .. }
            | Output::Finished { seq, .. }
            | Output::Failed { seq, .. }
            | Output::KvBlocks { seq, .. } => *seq,
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

/// Why an import frame was not buffered (the block will be recomputed, or the request refused).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DroppedBlock {
    /// The request for this `seq` already arrived (or an earlier one did: seqs increase).
    #[error("no request is waiting for KV blocks under this seq")]
    UnknownSeq,
    /// Too many requests have import frames waiting.
    #[error("{0} requests already have KV blocks waiting")]
    TooManyPending(usize),
    /// The block is not one of the engine's blocks.
    #[error("block of {got} bytes; this engine's blocks are {expected} bytes")]
    WrongLength {
        /// Bytes received.
        got: usize,
        /// The layout's block size in bytes.
        expected: usize,
    },
    /// More blocks than any prompt can have, or an index past them.
    #[error("block index {0} is past the longest prompt's blocks")]
    OutOfRange(u32),
    /// The same index twice: neither copy is trusted.
    #[error("block {0} arrived twice")]
    Duplicate(u32),
    /// The buffer for waiting blocks is full.
    #[error("the KV import buffer ({0} bytes) is full")]
    BufferFull(usize),
}

/// Requests that may have import frames waiting at once; far more than an agent ever has in
/// flight between sending a request's blocks and the request.
const MAX_PENDING_IMPORTS: usize = 1024;

/// Import frames received for a request that has not arrived yet.
#[derive(Debug, Default)]
struct PendingImport {
    /// Block index → its bytes, `None` when the block is unusable (wrong length, duplicate,
    /// buffer full), which stops the attached run there.
    blocks: BTreeMap<u32, Option<Vec<u8>>>,
    /// An index past any prompt's blocks arrived: the request is refused.
    out_of_range: bool,
}

/// An `export_kv` request's progress.
#[derive(Debug)]
struct Export {
    prompt: Vec<u32>,
    /// The request's `cache_salt`: its blocks are cached (and exported) under salted hashes.
    cache_salt: Option<String>,
    /// Prompt blocks sent so far (blocks `0..sent`).
    sent: usize,
}

/// A request the engine is running.
#[derive(Debug)]
struct Running {
    id: RequestId,
    request_id: String,
    export: Option<Export>,
    /// When it was submitted, in engine time.
    arrival: Duration,
    /// When its last token came out, in engine time.
    last_token: Option<Duration>,
}

/// The worker's engine and its request bookkeeping.
pub struct WorkerEngine {
    engine: Box<dyn Engine>,
    name: String,
    by_seq: HashMap<u64, Running>,
    by_id: HashMap<RequestId, u64>,
    kv_events: Vec<KvEvent>,
    kv_events_total: u64,
    imports: HashMap<u64, PendingImport>,
    /// Bytes held in `imports`.
    import_bytes: usize,
    /// The most `imports` may hold: the KV pool's size (more could never be imported at once).
    import_cap: usize,
    /// The highest `seq` a request arrived with.
    last_seq: Option<u64>,
    /// Blocks in the longest prompt the engine accepts.
    max_blocks: usize,
    kv_blocks_exported: u64,
    kv_blocks_imported: u64,
    kv_import_fallbacks: u64,
    /// Blocks dropped because their supplier was revoked.
    kv_blocks_evicted_origin: u64,
    /// The nodes that supplied imported blocks, interned (a few per fleet: ids are never
    /// reused, so an evicted node's id cannot be mistaken for a later supplier's).
    origins: HashMap<NodeId, Origin>,
    latencies: WorkerLatencies,
    /// The fleet's hasher (the engine has its own copy in its config).
    block_hasher: BlockHasher,
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
            head_dim: spec.mock_kv_head_dim.max(1),
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
        tiers: Vec::new(),
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
            tiers: spec.kv_tiers.clone(),
            block_hasher: spec.block_hasher(),
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
            WireEngine::LlamaCpp | WireEngine::OpenAi | WireEngine::Vllm | WireEngine::Sglang => {
                anyhow::bail!("external engines are served by worker::external, not WorkerEngine")
            }
        };
        let layout = engine.kv_layout();
        let block_bytes = layout.block_bytes();
        let max_blocks = spec.context_length as usize / layout.block_size.tokens();
        let import_cap = (engine.metrics().kv_blocks_total as usize).saturating_mul(block_bytes);
        Ok(Self {
            engine,
            name,
            by_seq: HashMap::new(),
            by_id: HashMap::new(),
            kv_events: Vec::new(),
            kv_events_total: 0,
            imports: HashMap::new(),
            import_bytes: 0,
            import_cap,
            last_seq: None,
            max_blocks,
            kv_blocks_exported: 0,
            kv_blocks_imported: 0,
            kv_import_fallbacks: 0,
            kv_blocks_evicted_origin: 0,
            origins: HashMap::new(),
            latencies: WorkerLatencies::default(),
            block_hasher: spec.block_hasher(),
        })
    }

    /// Bytes of one KV block of this engine's layout.
    pub fn block_bytes(&self) -> usize {
        self.engine.kv_layout().block_bytes()
    }

    /// Buffers one import frame's block for the request `seq` that will follow it. An unusable
    /// block is remembered as such (the attached run stops before it); nothing here fails the
    /// worker.
    pub fn add_import_block(
        &mut self,
        seq: u64,
        index: u32,
        data: &[u8],
    ) -> Result<(), DroppedBlock> {
        if self.last_seq.is_some_and(|last| seq <= last) {
            return Err(DroppedBlock::UnknownSeq);
        }
        if !self.imports.contains_key(&seq) && self.imports.len() >= MAX_PENDING_IMPORTS {
            return Err(DroppedBlock::TooManyPending(self.imports.len()));
        }
        let expected = self.block_bytes();
        let (cap, used, max_blocks) = (self.import_cap, self.import_bytes, self.max_blocks);
        let pending = self.imports.entry(seq).or_default();
        if index as usize >= max_blocks {
            pending.out_of_range = true;
            return Err(DroppedBlock::OutOfRange(index));
        }
        let (verdict, stored) = if let Some(previous) = pending.blocks.insert(index, None) {
            let freed = previous.map_or(0, |b| b.len());
            self.import_bytes -= freed;
            (Err(DroppedBlock::Duplicate(index)), None)
        } else if data.len() != expected {
            (
                Err(DroppedBlock::WrongLength {
                    got: data.len(),
                    expected,
                }),
                None,
            )
        } else if used.saturating_add(data.len()) > cap {
            (Err(DroppedBlock::BufferFull(cap)), None)
        } else {
            (Ok(()), Some(data.to_vec()))
        };
        if let Some(block) = stored {
            self.import_bytes += block.len();
            pending.blocks.insert(index, Some(block));
        }
        verdict
    }

    /// Forgets the import frames buffered for `seq`.
    fn take_imports(&mut self, seq: u64) -> PendingImport {
        let pending = self.imports.remove(&seq).unwrap_or_default();
        let bytes: usize = pending.blocks.values().flatten().map(Vec::len).sum();
        self.import_bytes -= bytes;
        pending
    }

    /// The layout of the engine's KV blocks.
    pub fn kv_layout(&self) -> &KvLayout {
        self.engine.kv_layout()
    }

    /// The engine's name, for logs and the worker's hello.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Queues a request, with the KV blocks buffered for its `seq` attached (see the module
    /// docs: unusable ones are recomputed).
    pub fn submit(&mut self, request: WireRequest, now: Duration) -> Result<(), SubmitError> {
        let pending = self.take_imports(request.seq);
        self.last_seq = self.last_seq.max(Some(request.seq));
        if self.by_seq.contains_key(&request.seq) {
            return Err(SubmitError::Duplicate(request.seq));
        }
        let block_bytes = self.block_bytes();
        if request.export_kv && block_bytes > MAX_KV_BLOCK_BYTES {
            return Err(SubmitError::Refused(format!(
                "KV blocks of {block_bytes} bytes do not fit the worker socket's \
                 {MAX_KV_BLOCK_BYTES}-byte block frames; this layout cannot be exported"
            )));
        }
        let block_size = self.engine.kv_layout().block_size;
        let full = request.prompt.len() / block_size.tokens();
        let announced = request.kv_blocks as usize;
        let highest = pending.blocks.keys().next_back().map(|&i| i as usize + 1);
        if pending.out_of_range || announced > full || highest.is_some_and(|h| h > full) {
            return Err(SubmitError::Refused(format!(
                "{} KV blocks attached, but the prompt of {} tokens has {full} full blocks",
                announced.max(highest.unwrap_or(0)),
                request.prompt.len()
            )));
        }
        // The contiguous run of usable blocks from block 0.
        let mut data = Vec::new();
        let mut attached = 0;
        while attached < announced {
            match pending.blocks.get(&(attached as u32)) {
                Some(Some(block)) => data.extend_from_slice(block),
                _ => break,
            }
            attached += 1;
        }
        let mut fallback = (attached < announced)
            .then(|| format!("{attached} of the {announced} attached KV blocks arrived intact"));
        let origin = request
            .kv_origin
            .filter(|_| attached > 0)
            .and_then(|node| self.origin(node));
        let kv = (attached > 0).then(|| {
            // The receiver names imported blocks by its own hashes of the request's tokens,
            // salted as the request is.
            let mut blocks = self
                .block_hasher
                .salted(request.sampling.cache_salt.as_deref())
                .block_hashes(&request.prompt, block_size);
            blocks.truncate(attached);
            KvExport {
                layout: self.engine.kv_layout().clone(),
                first_block: 0,
                blocks,
                data,
                origin,
            }
        });
        let export = request.export_kv.then(|| Export {
            prompt: request.prompt.clone(),
            cache_salt: request.sampling.cache_salt.clone(),
            sent: 0,
        });
        let retry = kv
            .is_some()
            .then(|| (request.prompt.clone(), request.sampling.clone()));
        let engine_request = Request {
            kv,
            ..Request::new(request.prompt, request.sampling)
        };
        let id = match self.engine.submit(engine_request, now) {
            Ok(id) => {
                self.kv_blocks_imported += attached as u64;
                id
            }
            Err(e @ (EngineSubmitError::KvMismatch { .. } | EngineSubmitError::Import(_))) => {
                // Without attached KV the engine never refuses for it: no retry to make.
                let Some((prompt, sampling)) = retry else {
                    return Err(SubmitError::Refused(e.to_string()));
                };
                fallback = Some(format!("the engine refused the attached KV: {e}"));
                self.engine
                    .submit(Request::new(prompt, sampling), now)
                    .map_err(|e| SubmitError::Refused(e.to_string()))?
            }
            Err(e) => return Err(SubmitError::Refused(e.to_string())),
        };
        if let Some(reason) = fallback {
            self.kv_import_fallbacks += 1;
            tracing::warn!(request_id = %request.request_id, %reason,
                "attached KV not fully used: the rest of the prompt is recomputed");
        }
        self.by_seq.insert(
            request.seq,
            Running {
                id,
                request_id: request.request_id,
                export,
                arrival: now,
                last_token: None,
            },
        );
        self.by_id.insert(id, request.seq);
        Ok(())
    }

    /// The interned origin of `node` (a new one at its first import). `None` only if 2^32 - 1
    /// nodes have supplied blocks to this process.
    fn origin(&mut self, node: NodeId) -> Option<Origin> {
        if let Some(&o) = self.origins.get(&node) {
            return Some(o);
        }
        let next = u32::try_from(self.origins.len() + 1).ok()?;
        let o = Origin(std::num::NonZeroU32::new(next)?);
        self.origins.insert(node, o);
        Some(o)
    }

    /// Drops every KV block `node` supplied from every tier (see `Engine::evict_origin`); its
    /// `Removed` events come out of the next [`WorkerEngine::drain_kv_events`]. Returns how
    /// many blocks went (0 when it supplied none here).
    pub fn evict_origin(&mut self, node: NodeId) -> usize {
        let Some(&origin) = self.origins.get(&node) else {
            return 0;
        };
        let n = self.engine.evict_origin(origin);
        self.kv_blocks_evicted_origin += n as u64;
        n
    }

    /// Drops a request, releasing its blocks (and any import frames waiting for it). Returns
    /// its request id if it was running.
    pub fn cancel(&mut self, seq: u64) -> Option<String> {
        self.take_imports(seq);
        let running = self.by_seq.remove(&seq)?;
        self.by_id.remove(&running.id);
        self.engine.cancel(running.id);
        Some(running.request_id)
    }

    /// The frontend's request id of a running sequence (for log lines).
    pub fn request_id(&self, seq: u64) -> Option<&str> {
        self.by_seq.get(&seq).map(|r| r.request_id.as_str())
    }

    /// The prompt blocks `export_kv` requests got into the prefix cache since the last call.
    /// An export the executor fails to read fails its request.
    fn exports(&mut self) -> (Vec<Output>, Vec<Output>) {
        let mut parts = Vec::new();
        let mut failed = Vec::new();
        let block_size = self.engine.kv_layout().block_size.tokens();
        // Requests with prompt blocks still to send (a decoding one has sent them all).
        let mut seqs: Vec<u64> = self
            .by_seq
            .iter()
            .filter(|(_, r)| {
                r.export
                    .as_ref()
                    .is_some_and(|e| e.sent < e.prompt.len() / block_size)
            })
            .map(|(&seq, _)| seq)
            .collect();
        // Deterministic order across requests (within one, blocks are always in order).
        seqs.sort_unstable();
        for seq in seqs {
            let Some(export) = self.by_seq.get_mut(&seq).and_then(|r| r.export.as_mut()) else {
                continue;
            };
            match self.engine.export_kv_salted(
                &export.prompt,
                export.cache_salt.as_deref(),
                export.sent,
            ) {
                Ok(part) if part.blocks.is_empty() => {}
                Ok(part) => {
                    export.sent = part.first_block + part.blocks.len();
                    self.kv_blocks_exported += part.blocks.len() as u64;
                    parts.push(Output::KvBlocks {
                        seq,
                        first_block: part.first_block as u32,
                        hashes: part.blocks.iter().map(|h| h.sequence).collect(),
                        data: part.data,
                    });
                }
                Err(e) => failed.push(Output::Failed {
                    seq,
                    message: format!("exporting the prompt's KV blocks failed: {e}"),
                }),
            }
        }
        (parts, failed)
    }

    /// Advances to `now` and collects what the finished steps produced.
    pub fn step(&mut self, now: Duration) -> anyhow::Result<Vec<Output>> {
        // An executor failure aborts that step's requests (they come out as `Aborted` below)
        // and leaves the engine usable: the worker carries on.
        if let Err(e) = self.engine.step_until(now) {
            tracing::warn!(error = %e, "a step failed: its requests are aborted");
        }
        let mut tokens: BTreeMap<u64, TokenChunk> = BTreeMap::new();
        let mut ends = Vec::new();
        for output in self.engine.drain_outputs() {
            let Some(&seq) = self.by_id.get(&output.request()) else {
                continue;
            };
            match output {
                EngineOutput::Token(token) => {
                    if let Some(running) = self.by_seq.get_mut(&seq) {
                        let since = running.last_token.unwrap_or(running.arrival);
                        let gap = token.time.saturating_sub(since).as_secs_f64();
                        match running.last_token {
                            None => self.latencies.ttft.observe_seconds(gap),
                            Some(_) => self.latencies.itl.observe_seconds(gap),
                        }
                        running.last_token = Some(token.time);
                    }
                    if let Some(finish) = &token.finish {
                        let stats = finish.stats;
                        let queued = stats.admitted.saturating_sub(stats.arrival);
                        self.latencies.queue.observe_seconds(queued.as_secs_f64());
                    }
                    let chunk = tokens
                        .entry(seq)
                        .or_insert_with(|| TokenChunk::tokens(Vec::new()));
                    chunk.tokens.push(token.token);
                    if let Some(logprob) = token.logprob {
                        chunk
                            .logprobs
                            .get_or_insert_with(Vec::new)
                            .push(TokenLogprob {
                                token: token.token,
                                logprob,
                                top: token
                                    .top_logprobs
                                    .into_iter()
                                    .map(|(token, logprob)| TopLogprob { token, logprob })
                                    .collect(),
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
        // Blocks first, so a prefill's last blocks reach the agent before its finish.
        let (mut out, failed) = self.exports();
        for failure in failed {
            if !ends.iter().any(|e| e.seq() == failure.seq())
                && let Some(running) = self.by_seq.get(&failure.seq())
            {
                self.engine.cancel(running.id);
                tokens.remove(&failure.seq());
                ends.push(failure);
            }
        }
        out.extend(
            tokens
                .into_iter()
                .map(|(seq, chunk)| Output::Tokens { seq, chunk }),
        );
        for end in &ends {
            if let Some(running) = self.by_seq.remove(&end.seq()) {
                self.by_id.remove(&running.id);
                if let Output::Failed { message, .. } = end {
                    tracing::warn!(request_id = %running.request_id, %message,
                        "the engine aborted a request");
                }
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
            admitted: m.admitted,
            finished: m.finished,
            output_tokens: m.output_tokens,
            kv_blocks_exported: self.kv_blocks_exported,
            kv_blocks_imported: self.kv_blocks_imported,
            kv_import_fallbacks: self.kv_import_fallbacks,
            kv_blocks_evicted_origin: self.kv_blocks_evicted_origin,
            latencies: self.latencies.clone(),
            kv_tiers: m.tiers,
            engine_events: None,
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
            mock_kv_head_dim: 1,
            kv_tiers: Default::default(),
            external: None,
            fleet_hash_secret: None,
        }
    }

    fn request(seq: u64, prompt: usize, max_tokens: u32) -> WireRequest {
        WireRequest {
            seq,
            request_id: format!("r{seq}"),
            prompt: (0..prompt as u32).collect(),
            block_hashes: Vec::new(),
            sampling: SamplingParams::greedy(max_tokens),
            export_kv: false,
            kv_blocks: 0,
            kv_origin: None,
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
                Output::Tokens { chunk, .. } => chunk.tokens.clone(),
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

    fn prefill_request(seq: u64, prompt: &[u32], max_tokens: u32) -> WireRequest {
        WireRequest {
            prompt: prompt.to_vec(),
            export_kv: true,
            ..request(seq, 0, max_tokens)
        }
    }

    /// The blocks a prefill of `prompt` exports, one `Vec` per block.
    fn exported_blocks(prompt: &[u32]) -> Vec<Vec<u8>> {
        let mut engine = WorkerEngine::new(WorkerId(1), &spec(64, 1000)).unwrap();
        engine
            .submit(prefill_request(1, prompt, 1), Duration::ZERO)
            .unwrap();
        let bytes = engine.block_bytes();
        run_to_end(&mut engine)
            .into_iter()
            .flat_map(|o| match o {
                Output::KvBlocks { data, .. } => data.chunks(bytes).map(<[u8]>::to_vec).collect(),
                _ => Vec::new(),
            })
            .collect()
    }

    #[test]
    fn an_export_request_sends_its_prompt_blocks_before_its_token() {
        let mut engine = WorkerEngine::new(WorkerId(1), &spec(64, 1000)).unwrap();
        let prompt: Vec<u32> = (10..21).collect();
        engine
            .submit(prefill_request(3, &prompt, 1), Duration::ZERO)
            .unwrap();
        let outputs = run_to_end(&mut engine);
        let hashes: Vec<SequenceHash> =
            kvfleet_proto::hash::block_hashes(&prompt, kvfleet_proto::BlockSize::new(4).unwrap())
                .iter()
                .map(|h| h.sequence)
                .collect();
        assert!(
            matches!(&outputs[..], [
                Output::KvBlocks { seq: 3, first_block: 0, hashes: h, data },
                Output::Tokens { seq: 3, .. },
                Output::Finished { seq: 3, .. },
            ] if *h == hashes && data.len() == 2 * engine.block_bytes()),
            "{outputs:?}"
        );
        assert_eq!(engine.status().kv_blocks_exported, 2);
        // A request that did not ask exports nothing.
        engine.submit(request(4, 11, 1), Duration::ZERO).unwrap();
        assert!(
            !run_to_end(&mut engine)
                .iter()
                .any(|o| matches!(o, Output::KvBlocks { .. }))
        );
    }

    #[test]
    fn attached_blocks_are_prefix_hits_and_bad_ones_are_recomputed() {
        let prompt: Vec<u32> = (10..23).collect();
        let blocks = exported_blocks(&prompt);
        assert_eq!(blocks.len(), 3);
        let mut engine = WorkerEngine::new(WorkerId(2), &spec(64, 1000)).unwrap();
        for (i, block) in blocks.iter().enumerate() {
            engine.add_import_block(1, i as u32, block).unwrap();
        }
        let attached = |seq, kv_blocks| WireRequest {
            prompt: prompt.clone(),
            kv_blocks,
            ..request(seq, 0, 2)
        };
        engine.submit(attached(1, 3), Duration::ZERO).unwrap();
        run_to_end(&mut engine);
        let status = engine.status();
        assert_eq!(
            (status.prefix_hit_tokens, status.kv_blocks_imported),
            (12, 3)
        );
        assert_eq!(status.kv_import_fallbacks, 0);
        assert_eq!(engine.import_bytes, 0);

        // Block 1 has the wrong length: block 0 is used, the rest recomputed, the request runs.
        let mut engine = WorkerEngine::new(WorkerId(2), &spec(64, 1000)).unwrap();
        engine.add_import_block(2, 0, &blocks[0]).unwrap();
        assert_eq!(
            engine.add_import_block(2, 1, &blocks[1][1..]),
            Err(DroppedBlock::WrongLength {
                got: blocks[1].len() - 1,
                expected: blocks[1].len()
            })
        );
        engine.add_import_block(2, 2, &blocks[2]).unwrap();
        engine.submit(attached(2, 3), Duration::ZERO).unwrap();
        let outputs = run_to_end(&mut engine);
        assert!(matches!(
            outputs.last(),
            Some(Output::Finished { seq: 2, .. })
        ));
        let status = engine.status();
        assert_eq!(
            (status.prefix_hit_tokens, status.kv_blocks_imported),
            (4, 1)
        );
        assert_eq!(status.kv_import_fallbacks, 1);
        // Frames for a seq whose request already came are stale.
        assert_eq!(
            engine.add_import_block(2, 0, &blocks[0]),
            Err(DroppedBlock::UnknownSeq)
        );
        assert_eq!(engine.import_bytes, 0);
    }

    #[test]
    fn too_many_attached_blocks_refuse_the_request_and_cancel_frees_buffered_ones() {
        let prompt: Vec<u32> = (10..23).collect();
        let blocks = exported_blocks(&prompt);
        let mut engine = WorkerEngine::new(WorkerId(2), &spec(64, 1000)).unwrap();
        // Announced more than the 3 full blocks the prompt has.
        let refused = engine.submit(
            WireRequest {
                prompt: prompt.clone(),
                kv_blocks: 4,
                ..request(1, 0, 2)
            },
            Duration::ZERO,
        );
        assert!(matches!(refused, Err(SubmitError::Refused(m)) if m.contains("3 full blocks")));
        // Sent a frame past the prompt's blocks (but announced fewer).
        engine.add_import_block(2, 3, &blocks[0]).unwrap();
        assert!(matches!(
            engine.submit(
                WireRequest {
                    prompt: prompt.clone(),
                    kv_blocks: 1,
                    ..request(2, 0, 2)
                },
                Duration::ZERO
            ),
            Err(SubmitError::Refused(_))
        ));
        // An index past the longest prompt (context 1024 / 4 = 256 blocks) is never buffered.
        assert_eq!(
            engine.add_import_block(3, 256, &blocks[0]),
            Err(DroppedBlock::OutOfRange(256))
        );
        assert_eq!(
            engine
                .add_import_block(3, 0, &blocks[0])
                .and(engine.add_import_block(3, 0, &blocks[0])),
            Err(DroppedBlock::Duplicate(0))
        );
        engine.add_import_block(4, 0, &blocks[0]).unwrap();
        assert!(engine.import_bytes > 0);
        engine.cancel(4);
        engine.cancel(3);
        assert_eq!(engine.import_bytes, 0);
        assert!(engine.imports.is_empty());
        assert_eq!(engine.status().kv_blocks_used, 0);
    }

    #[test]
    fn zero_cost_is_a_valid_profile() {
        assert!(profile(&spec(8, 0)).validate().is_ok());
    }
}
