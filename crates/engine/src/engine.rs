//! The [`Engine`] trait: what the agent, the simulator and tests drive, and the types it speaks.
//!
//! An engine is a synchronous state machine with time passed in. The caller submits requests,
//! advances the engine with [`Engine::step_until`], and drains token outputs and KV events. In
//! real time the caller passes the wall clock (as a `Duration` since an epoch of its choosing);
//! in virtual time (the simulator) it owns the clock and jumps from one
//! [`Engine::next_event_time`] to the next.

use std::time::Duration;

use kvfleet_proto::{BlockHash, InvalidSampling, KvEvent, KvLayout, SamplingParams};
use serde::Serialize;

use crate::block_pool::Origin;
use crate::executor::{ExecError, RequestId};

/// A generate request.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// The prompt's token ids. Not empty.
    pub prompt: Vec<u32>,
    /// How to sample; validated at submit.
    pub sampling: SamplingParams,
    /// KV blocks another engine computed for a prefix of this prompt (disaggregated serving):
    /// imported into the prefix cache before the request is queued, so its prefill is a hit.
    pub kv: Option<KvExport>,
}

impl Request {
    /// A request without attached KV.
    pub fn new(prompt: Vec<u32>, sampling: SamplingParams) -> Self {
        Self {
            prompt,
            sampling,
            kv: None,
        }
    }
}

/// Why a request stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// `max_tokens` were generated (or the context is full).
    Length,
    /// One of the request's `stop_token_ids` was generated (it is the last token output).
    Stop(u32),
    /// The model's end-of-sequence token was generated (it is the last token output).
    Eos(u32),
}

/// Per-request timing and accounting, reported with the last token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RequestStats {
    /// When `submit` was called.
    pub arrival: Duration,
    /// When the scheduler first admitted it into a batch (its queue time is
    /// `admitted - arrival`).
    pub admitted: Duration,
    /// When the first token was produced (TTFT = `first_token - arrival`).
    pub first_token: Duration,
    /// When the last token was produced.
    pub finished: Duration,
    /// Prompt length.
    pub prompt_tokens: u32,
    /// Prompt tokens found in the prefix cache when the request was first admitted.
    pub cached_tokens: u32,
    /// Tokens generated.
    pub output_tokens: u32,
    /// Times the request was preempted (and recomputed).
    pub preemptions: u32,
}

/// The end of a request's stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Finish {
    /// Why it stopped.
    pub reason: FinishReason,
    /// Its timing and accounting.
    pub stats: RequestStats,
}

/// One generated token.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TokenOutput {
    /// The request.
    pub request: RequestId,
    /// The token id.
    pub token: u32,
    /// Its log-probability, when the request asked for logprobs and the executor provides them.
    pub logprob: Option<f32>,
    /// The most likely alternatives with their log-probabilities (see `SamplingParams::logprobs`).
    pub top_logprobs: Vec<(u32, f32)>,
    /// 0 for the first generated token, then 1, 2, ...
    pub index: u32,
    /// When the token was produced (the end of the step that sampled it).
    pub time: Duration,
    /// Set on the request's last token.
    pub finish: Option<Finish>,
}

/// What an engine hands its caller, in order.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub enum EngineOutput {
    /// A token of a request's stream.
    Token(TokenOutput),
    /// The request ended without finishing: the executor failed while running it.
    Aborted {
        /// The request.
        request: RequestId,
        /// When it was aborted.
        time: Duration,
        /// What went wrong.
        error: String,
    },
}

impl EngineOutput {
    /// The request this output belongs to.
    pub fn request(&self) -> RequestId {
        match self {
            EngineOutput::Token(t) => t.request,
            EngineOutput::Aborted { request, .. } => *request,
        }
    }
}

/// The KV blocks of a prompt prefix (or, from [`Engine::export_kv_from`], of the part of one
/// that starts at block `first_block`), ready to move to another engine with the same layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvExport {
    /// The exporting executor's block layout; an importer with a different one refuses.
    pub layout: KvLayout,
    /// The prompt block index of `blocks[0]`. Only exports from block 0 can be imported; an
    /// incremental exporter sends later parts and the receiver joins them.
    pub first_block: usize,
    /// The blocks' hashes, in prompt order, starting at the prompt's block `first_block`.
    pub blocks: Vec<BlockHash>,
    /// `blocks.len() * layout.block_bytes()` bytes, block after block.
    pub data: Vec<u8>,
    /// Who supplied these blocks, set by an importer that got them from another node (`None`
    /// from [`Engine::export_kv`]): the imported blocks keep it in every tier, so
    /// [`Engine::evict_origin`] can drop them when that node is revoked.
    pub origin: Option<Origin>,
}

/// What an import did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct ImportReport {
    /// Blocks written into the pool and its prefix cache.
    pub imported: usize,
    /// Blocks skipped because this engine already had them cached.
    pub already_cached: usize,
    /// Trailing blocks left out because the pool had no room (they will be recomputed).
    pub dropped: usize,
}

/// Why `submit` refused a request. Nothing was queued.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SubmitError {
    /// The prompt has no tokens.
    #[error("the prompt is empty")]
    EmptyPrompt,
    /// `generated_in_prompt` says the whole prompt (or more) was generated: no original prompt left.
    #[error(
        "generated_in_prompt {generated_in_prompt} leaves nothing of a prompt of {prompt_tokens} tokens"
    )]
    GeneratedInPromptTooLong {
        /// The claimed earlier output.
        generated_in_prompt: u32,
        /// Prompt length.
        prompt_tokens: usize,
    },
    /// A sampling parameter is out of range.
    #[error(transparent)]
    InvalidSampling(#[from] InvalidSampling),
    /// A prompt token id is not in the model's vocabulary.
    #[error("prompt token {position} is id {token}, outside the vocabulary of {vocab_size} tokens")]
    TokenOutOfVocab {
        /// Its index in the prompt.
        position: usize,
        /// The id.
        token: u32,
        /// The executor's vocabulary size.
        vocab_size: u32,
    },
    /// Prompt plus `max_tokens` exceeds the model's context.
    #[error(
        "prompt of {prompt_tokens} tokens plus max_tokens {max_tokens} exceeds the context of {max_model_len} tokens"
    )]
    ExceedsContext {
        /// Prompt length.
        prompt_tokens: usize,
        /// Requested output length.
        max_tokens: u32,
        /// The engine's limit.
        max_model_len: usize,
    },
    /// The whole sequence would need more KV blocks than the pool has, so it could never run.
    #[error("the sequence needs {needed_blocks} KV blocks; the pool has {pool_blocks}")]
    ExceedsPool {
        /// Blocks for prompt plus `max_tokens`.
        needed_blocks: usize,
        /// Blocks in the pool.
        pool_blocks: u32,
    },
    /// Chunked prefill is off and the prompt does not fit in one step.
    #[error(
        "prompt of {prompt_tokens} tokens exceeds max_batched_tokens {max_batched_tokens} with chunked prefill off"
    )]
    ExceedsBatch {
        /// Prompt length.
        prompt_tokens: usize,
        /// The per-step token budget.
        max_batched_tokens: usize,
    },
    /// The waiting queue is full: retry later or elsewhere (HTTP 429).
    #[error("overloaded: {waiting} requests already waiting (limit {limit})")]
    Overloaded {
        /// Requests waiting.
        waiting: usize,
        /// The configured limit.
        limit: usize,
    },
    /// The attached KV blocks are not a prefix of this prompt.
    #[error("attached KV block {index} does not match the prompt's block hash")]
    KvMismatch {
        /// The first block that differs.
        index: usize,
    },
    /// The attached KV could not be imported.
    #[error(transparent)]
    Import(#[from] ImportError),
}

/// Why an import of KV blocks failed. Nothing was imported.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ImportError {
    /// The blocks were computed with a different layout.
    #[error("KV layout mismatch in {field}: ours is {ours}, theirs is {theirs}")]
    LayoutMismatch {
        /// The first differing field.
        field: &'static str,
        /// This engine's value.
        ours: String,
        /// The export's value.
        theirs: String,
    },
    /// The data does not hold exactly one block's bytes per block hash.
    #[error("KV data is {got} bytes; {blocks} blocks of this layout are {expected} bytes")]
    DataLength {
        /// Block hashes in the export.
        blocks: usize,
        /// Bytes expected.
        expected: usize,
        /// Bytes given.
        got: usize,
    },
    /// The export does not start at the prompt's first block, so its chain cannot be joined.
    #[error("KV export starts at block {first_block}; imports must start at block 0")]
    NotFromStart {
        /// The export's first block index.
        first_block: usize,
    },
    /// This engine runs without a prefix cache, so imported blocks could never be used.
    #[error("prefix caching is disabled on this engine; KV imports need it")]
    PrefixCachingDisabled,
    /// The executor failed to write the blocks.
    #[error(transparent)]
    Exec(#[from] ExecError),
}

/// Why an export failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExportError {
    /// The executor failed to read the blocks.
    #[error(transparent)]
    Exec(#[from] ExecError),
}

/// A snapshot of an engine's load, for the agent's heartbeat, `/metrics` and the planner.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct EngineMetrics {
    /// Requests waiting for admission (including preempted ones).
    pub waiting: usize,
    /// Requests admitted and holding KV blocks.
    pub running: usize,
    /// Prefill work queued: tokens of waiting and running sequences whose KV is not computed
    /// yet, except a decoding sequence's one next token (a preempted sequence counts its
    /// generated tokens too: they are recomputed like its prompt). Cache hits a waiting
    /// request will get at admission are not subtracted.
    pub prefill_tokens_pending: u64,
    /// Blocks in the pool.
    pub kv_blocks_total: u32,
    /// Blocks referenced by running requests.
    pub kv_blocks_used: u32,
    /// Unreferenced blocks holding cached prefixes (evictable, so also available).
    pub kv_blocks_cached: u32,
    /// Blocks with nothing in them.
    pub kv_blocks_free: u32,
    /// Bytes of KV memory per block.
    pub kv_block_bytes: u64,
    /// Tokens per block.
    pub block_size: u32,
    /// Sequences in the last step.
    pub last_batch_seqs: usize,
    /// Tokens in the last step.
    pub last_batch_tokens: usize,
    /// Mean sequences per step over the metrics window.
    pub mean_batch_seqs: f64,
    /// Prefill tokens per second over the metrics window.
    pub prefill_tokens_per_s: f64,
    /// Decode tokens per second over the metrics window.
    pub decode_tokens_per_s: f64,
    /// Steps run since start.
    pub steps: u64,
    /// Preemptions since start.
    pub preemptions: u64,
    /// Requests finished since start.
    pub finished: u64,
    /// Tokens generated by the requests that finished (stop, EOS or length), since start.
    pub output_tokens: u64,
    /// Requests admitted into a batch for the first time, since start (a preempted request
    /// readmitted is not counted again).
    pub admitted: u64,
    /// Prompt tokens looked up in the prefix cache at first admission, since start.
    pub prefix_query_tokens: u64,
    /// Of those, tokens found.
    pub prefix_hit_tokens: u64,
    /// KV events dropped because the caller did not drain them in time.
    pub events_dropped: u64,
    /// The lower KV tiers (all zero when they are off).
    pub tiers: crate::tiers::TierStats,
}

/// An inference engine on one GPU or CPU slot.
///
/// Every method is non-blocking bookkeeping except `step_until`, which runs the executor (and
/// so blocks for real compute in the native engine).
pub trait Engine {
    /// The layout of this engine's KV blocks (what an import must match).
    fn kv_layout(&self) -> &KvLayout;

    /// Validates and queues a request that arrived at `now`. With attached KV, imports it first.
    fn submit(&mut self, request: Request, now: Duration) -> Result<RequestId, SubmitError>;

    /// Drops a request, waiting or running, and frees its blocks. Its stream ends without a
    /// final token; tokens of an in-flight step are discarded. False if it was unknown (or
    /// already finished).
    fn cancel(&mut self, request: RequestId) -> bool;

    /// Runs every step that can start and finish by `until`: finishes the in-flight step when
    /// its end time is reached (emitting its tokens, stamped with that time) and starts the next
    /// one while there is work. A step that starts before `until` but ends after it stays in
    /// flight. In virtual time steps chain back to back (see `SchedulerConfig::realtime`). On an executor failure the step's requests are aborted (see
    /// [`EngineOutput::Aborted`]) and the error is returned; the engine stays usable.
    fn step_until(&mut self, until: Duration) -> Result<(), ExecError>;

    /// When the engine next has something to do: the end of the in-flight step, or its current
    /// time when work is waiting to start; `None` when idle.
    fn next_event_time(&self) -> Option<Duration>;

    /// Takes the outputs produced since the last call, in order. Outputs accumulate at most
    /// `max_num_seqs` per step; callers drain after every `step_until`.
    fn drain_outputs(&mut self) -> Vec<EngineOutput>;

    /// Takes the KV events produced since the last call, oldest first (event ids strictly
    /// increasing by one unless some were dropped; see `SchedulerConfig::max_pending_events`).
    fn drain_events(&mut self) -> Vec<KvEvent>;

    /// Copies out the KV blocks of the longest cached prefix of `tokens` (full blocks only).
    /// After a prefill-only request (`max_tokens = 1`) finishes, its prompt's blocks are cached
    /// until evicted, so export right after it finishes.
    fn export_kv(&self, tokens: &[u32]) -> Result<KvExport, ExportError> {
        self.export_kv_from(tokens, 0)
    }

    /// Like [`Engine::export_kv`], but copies only the blocks of that longest cached prefix
    /// from block `first_block` on (none when the prefix is shorter). A running request's
    /// blocks enter the prefix cache as each step computes them, so calling this after every
    /// step with the count already sent streams a prefill's blocks out as they are computed,
    /// each copied once.
    fn export_kv_from(&self, tokens: &[u32], first_block: usize) -> Result<KvExport, ExportError> {
        self.export_kv_salted(tokens, None, first_block)
    }

    /// Like [`Engine::export_kv_from`] for a request with a `cache_salt`: its blocks are cached
    /// under salted hashes, so only the same salt finds them.
    fn export_kv_salted(
        &self,
        tokens: &[u32],
        cache_salt: Option<&str>,
        first_block: usize,
    ) -> Result<KvExport, ExportError>;

    /// Puts exported blocks into this engine's prefix cache (as many as fit).
    fn import_kv(&mut self, export: &KvExport) -> Result<ImportReport, ImportError>;

    /// Drops every cached prefix (a `Cleared` event); running requests keep their blocks.
    fn clear_prefix_cache(&mut self);

    /// Drops every block `origin` supplied (and every block computed on top of one) from the
    /// pool and the lower tiers, with `Removed` events. Blocks a running request uses leave
    /// the prefix cache now and are freed when it ends; the request runs on undisturbed.
    /// Returns how many blocks went, over all tiers.
    fn evict_origin(&mut self, origin: Origin) -> usize;

    /// A snapshot of load and throughput.
    fn metrics(&self) -> EngineMetrics;
}
