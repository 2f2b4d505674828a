//! The boundary between the scheduler and whatever computes tokens.
//!
//! The scheduler decides *what* runs each step (a [`ScheduledBatch`]); an [`Executor`] runs it
//! and says which token each sequence sampled and how long the step took. The mock executor
//! computes pseudo-tokens and takes the duration from a timing profile; the native executor runs
//! the model and measures. Executors own the KV memory that [`BlockId`]s index and the sampling
//! (seeded sampling must be reproducible per request, including after a preemption recompute:
//! derive randomness from the seed and the position, not from a stream).

use std::time::Duration;

use kvfleet_proto::{KvLayout, SamplingParams};
use serde::Serialize;

use crate::block_pool::BlockId;

/// Names a request for its whole life in one engine; assigned by the engine at submit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct RequestId(pub u64);

/// One sequence's share of a step.
#[derive(Debug, Clone, Copy)]
pub struct ScheduledSeq<'a> {
    /// The request this sequence belongs to.
    pub request: RequestId,
    /// The tokens to process this step: a prefill chunk, or the one token of a decode step.
    pub tokens: &'a [u32],
    /// The absolute position of `tokens[0]` in the sequence.
    pub start_pos: usize,
    /// Physical blocks covering positions `0..start_pos + tokens.len()`; position `p` lives in
    /// `block_table[p / block_size]` at slot `p % block_size`. Blocks before `start_pos` already
    /// hold computed KV (earlier steps, the prefix cache, or an import).
    pub block_table: &'a [BlockId],
    /// The original prompt (without generated tokens), for executors that key on it.
    pub prompt: &'a [u32],
    /// The tokens generated so far (what output penalties look at).
    pub generated: &'a [u32],
    /// How to sample.
    pub sampling: &'a SamplingParams,
    /// Whether a token must be sampled after the last of `tokens` (false for a prefill chunk
    /// that does not reach the end of the known tokens).
    pub sample: bool,
}

impl ScheduledSeq<'_> {
    /// Whether this is a one-token decode step (rather than a prefill chunk).
    pub fn is_decode(&self) -> bool {
        self.tokens.len() == 1 && self.start_pos >= self.prompt.len()
    }
}

/// Everything that runs in one step.
#[derive(Debug, Clone, Default)]
pub struct ScheduledBatch<'a> {
    /// The sequences, running ones first (oldest first), then newly admitted ones.
    pub seqs: Vec<ScheduledSeq<'a>>,
    /// Total tokens processed this step.
    pub num_tokens: usize,
    /// Tokens of prefill chunks (prompt or recompute).
    pub num_prefill_tokens: usize,
    /// Sequences doing a one-token decode step.
    pub num_decode_seqs: usize,
    /// Blocks referenced by sequences once this step's allocations are made.
    pub kv_blocks_used: u32,
    /// Blocks in the pool.
    pub kv_blocks_total: u32,
    /// Blocks brought into the pool from G2, G3 and G4 (in that order) for this step's newly
    /// admitted sequences. Their bytes are already in place; an executor that models time
    /// charges their copy (the native one measured it).
    pub onboarded_blocks: [u32; 3],
}

/// The token sampled for one sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct StepOutput {
    /// The sequence.
    pub request: RequestId,
    /// The sampled token.
    pub token: u32,
    /// Its log-probability, when the request asked for logprobs.
    pub logprob: Option<f32>,
    /// The `sampling.logprobs` most likely tokens and their log-probabilities, most likely
    /// first (empty unless asked for).
    pub top_logprobs: Vec<(u32, f32)>,
}

/// What one step produced.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepResult {
    /// One entry per scheduled sequence with `sample == true`, any order.
    pub outputs: Vec<StepOutput>,
    /// How long the step took: modelled (mock) or measured (native). The core never reads a
    /// clock, so the executor is the one that knows.
    pub elapsed: Duration,
}

/// An executor failed; the scheduler aborts the step's requests with this message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExecError {
    /// The computation itself failed (device error, out of memory, a kernel fault).
    #[error("execution failed: {0}")]
    Failed(String),
    /// A block id outside the executor's memory, or a byte buffer of the wrong size.
    #[error("bad block transfer: {0}")]
    BadTransfer(String),
}

/// Runs scheduled batches and moves KV blocks in and out of its memory.
pub trait Executor {
    /// The shape of one KV block in this executor's memory.
    fn kv_layout(&self) -> KvLayout;

    /// Runs one step: writes the KV of every scheduled token into its slot and samples a token
    /// for every sequence with `sample` set.
    fn execute(&mut self, batch: &ScheduledBatch<'_>) -> Result<StepResult, ExecError>;

    /// The KV bytes of `blocks`, concatenated in order (`blocks.len() * layout.block_bytes()`).
    fn copy_blocks_out(&self, blocks: &[BlockId]) -> Result<Vec<u8>, ExecError>;

    /// Writes `data` (as produced by `copy_blocks_out` of an executor with the same layout) into
    /// `blocks`.
    fn copy_blocks_in(&mut self, blocks: &[BlockId], data: &[u8]) -> Result<(), ExecError>;

    /// Which byte order [`Executor::copy_tier_blocks_out`] writes: 0 for the canonical bytes of
    /// `copy_blocks_out` (the default), else a tag of the executor's own memory order. Mixed
    /// into the lower tiers' fingerprint, so blocks of one order are never read as another.
    fn tier_order(&self) -> u64 {
        0
    }

    /// The bytes of `blocks` for this worker's own lower tiers (G2, G3), concatenated: by
    /// default the canonical bytes; an executor whose memory order differs from the canonical
    /// one may copy its own order instead (a plain copy, not a transposition), tagged by
    /// [`Executor::tier_order`].
    fn copy_tier_blocks_out(&self, blocks: &[BlockId]) -> Result<Vec<u8>, ExecError> {
        self.copy_blocks_out(blocks)
    }

    /// Writes `data`, as [`Executor::copy_tier_blocks_out`] of an executor with the same layout
    /// and tier order wrote it, into `blocks`.
    fn copy_tier_blocks_in(&mut self, blocks: &[BlockId], data: &[u8]) -> Result<(), ExecError> {
        self.copy_blocks_in(blocks, data)
    }

    /// The request finished, was cancelled or aborted: drop any per-request state. Not called on
    /// preemption (the request comes back).
    fn release(&mut self, request: RequestId) {
        let _ = request;
    }

    /// Token ids this executor accepts are `0..vocab_size`; `None` when any id is fine. The
    /// scheduler checks prompts against it at submit, so a bad id is one refused request, not an
    /// executor failure that aborts every request in the step.
    fn vocab_size(&self) -> Option<u32> {
        None
    }
}
