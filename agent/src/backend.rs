//! The seam between the frontend and whatever generates tokens.
//!
//! The frontend sees a [`Backend`]: submit a tokenized request, get a [`Generation`] (a stream of
//! [`GenEvent`]s). Dropping a `Generation` before it finished cancels the sequence, which frees
//! its KV blocks in the worker: that is how a client disconnect reaches the engine. The worker
//! pool implements this over Unix sockets; tests implement it in-process.
//!
//! Disaggregated serving adds two calls: [`Backend::submit_prefill`] runs a request on a
//! (normally prefill-role) worker and streams the KV blocks of its prompt as they are computed
//! ([`ExportedBlock`]s), and [`Backend::submit_with_kv`] runs a request with such blocks attached,
//! imported into the worker's prefix cache before it is scheduled. Both have defaults
//! (`Unsupported`, and a plain `submit` that recomputes) so in-process test backends need not
//! implement them.

use std::fmt;

use kvfleet_proto::api::WorkerRole;
use kvfleet_proto::{KvLayout, SamplingParams, SequenceHash, WorkerId};
use serde::Serialize;
use tokio::sync::mpsc;

/// A tokenized request, ready for a worker.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    /// The frontend's request id (`chatcmpl-...`), carried into the worker's log lines.
    pub request_id: String,
    /// The model's name.
    pub model: String,
    /// Prompt token ids.
    pub prompt: Vec<u32>,
    /// Sequence hashes of the prompt's full blocks (`kvfleet_proto::hash`).
    pub block_hashes: Vec<SequenceHash>,
    /// Sampling, validated.
    pub sampling: SamplingParams,
    /// The worker a router picked for it; `None` lets the pool choose. A named worker that is
    /// ready, not draining and serves the model is used whatever its role (a prefill worker is
    /// only ever reached this way); otherwise the name is ignored and the pool chooses (never a
    /// prefill worker).
    pub worker: Option<WorkerId>,
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EndReason {
    /// `max_tokens` reached.
    Length,
    /// EOS or a stop token.
    Stop,
}

/// A generated token's log-probability and the most likely alternatives.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct TokenLogprob {
    /// log P(token).
    pub logprob: f32,
    /// `(token id, log-probability)`, most likely first; as many as the request asked for
    /// (the mock engine gives none).
    #[serde(default)]
    pub top: Vec<(u32, f32)>,
}

/// What a generation produces, in order: tokens, then exactly one `Finished` or `Failed`.
#[derive(Debug, Clone, PartialEq)]
pub enum GenEvent {
    /// Newly generated token ids.
    Tokens {
        /// The ids, in order.
        ids: Vec<u32>,
        /// One per id, when the request asked for logprobs.
        logprobs: Option<Vec<TokenLogprob>>,
    },
    /// Done.
    Finished(EndReason),
    /// The worker failed; the message says what happened.
    Failed(String),
}

/// Why a request could not be handed to a worker.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// No worker serving this model is ready (starting, restarting or failed).
    #[error("no ready worker serves model {0:?}")]
    NoReadyWorker(String),
    /// The chosen worker went away while the request was sent.
    #[error("worker {0} is gone")]
    WorkerGone(WorkerId),
    /// This backend cannot do what was asked (e.g. export KV blocks).
    #[error("this backend does not support that operation")]
    Unsupported,
    /// The request cannot be sent as asked (e.g. a KV block larger than a worker frame).
    #[error("invalid request: {0}")]
    Invalid(String),
}

/// One KV block a prefill worker exported: its position in the prompt, its sequence hash, its
/// bytes (`layout.block_bytes()` long, in the worker's [`KvLayout`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportedBlock {
    /// The block's index in the prompt (block 0 holds tokens `0..block_size`).
    pub index: u32,
    /// Its sequence hash (`kvfleet_proto::hash`).
    pub hash: SequenceHash,
    /// Its bytes.
    pub data: bytes::Bytes,
}

/// A running generation. Dropping it before the final event cancels the sequence.
pub struct Generation {
    /// The worker running it.
    pub worker: WorkerId,
    /// The role of the worker that produces its first token (a disaggregated request's prefill
    /// worker), for the latency metrics.
    pub role: WorkerRole,
    /// Events, ending with `Finished` or `Failed`. Unbounded on purpose: a request produces
    /// at most `max_tokens` events, so its memory is bounded by the context length, and a slow
    /// client must not stall the worker connection shared by every other request.
    pub events: mpsc::UnboundedReceiver<GenEvent>,
    cancel: Option<Box<dyn FnOnce() + Send>>,
}

impl fmt::Debug for Generation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Generation")
            .field("worker", &self.worker)
            .field("role", &self.role)
            .field("armed", &self.cancel.is_some())
            .finish()
    }
}

impl Generation {
    /// A generation whose `cancel` runs if it is dropped before [`Generation::done`].
    pub fn new(
        worker: WorkerId,
        role: WorkerRole,
        events: mpsc::UnboundedReceiver<GenEvent>,
        cancel: impl FnOnce() + Send + 'static,
    ) -> Self {
        Self {
            worker,
            role,
            events,
            cancel: Some(Box::new(cancel)),
        }
    }

    /// The final event arrived: dropping no longer cancels.
    pub fn done(&mut self) {
        self.cancel = None;
    }
}

impl Drop for Generation {
    fn drop(&mut self) {
        if let Some(cancel) = self.cancel.take() {
            cancel();
        }
    }
}

/// A worker's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkerState {
    /// Process starting, engine loading.
    Starting,
    /// Serving.
    Ready,
    /// Finishing its requests, taking no new ones.
    Draining,
    /// Stopped on purpose.
    Stopped,
    /// Died or failed to start; will be restarted after a backoff.
    Failed,
}

/// What the frontend shows about one worker (`/ready`, `/metrics`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WorkerStatus {
    /// Its id.
    pub id: WorkerId,
    /// Model served.
    pub model: String,
    /// `cpu` or `gpu:N`.
    pub device: String,
    /// Role.
    pub role: WorkerRole,
    /// State.
    pub state: WorkerState,
    /// Requests sent and not finished.
    pub outstanding: usize,
    /// KV blocks in use, as last reported.
    pub kv_blocks_used: u64,
    /// KV blocks in the pool.
    pub kv_blocks_total: u64,
    /// Prompt tokens looked up in the prefix cache since the worker process started.
    pub prefix_query_tokens: u64,
    /// Of those, tokens found in the cache.
    pub prefix_hit_tokens: u64,
    /// Prompt tokens admitted or waiting and not yet computed (prefill work queued), as last
    /// reported.
    pub prefill_tokens: u64,
    /// Requests waiting for admission, as last reported.
    pub waiting: u32,
    /// Times the process was (re)started.
    pub starts: u64,
    /// The OS process id, while running.
    pub pid: Option<u32>,
}

/// Whatever generates tokens for the frontend.
pub trait Backend: Send + Sync + fmt::Debug + 'static {
    /// Hands a request to a worker.
    fn submit(&self, request: GenerateRequest) -> Result<Generation, SubmitError>;
    /// Every worker's status.
    fn workers(&self) -> Vec<WorkerStatus>;

    /// Runs `request` (normally on the worker it names, whatever its role: a prefill worker is
    /// only ever reached this way) and streams the KV blocks of its prompt as the worker
    /// computes them, in prompt order from block 0, each once. The receiver ends after the
    /// request ended (finished, failed or cancelled by dropping the [`Generation`]).
    fn submit_prefill(
        &self,
        request: GenerateRequest,
    ) -> Result<(Generation, mpsc::UnboundedReceiver<ExportedBlock>), SubmitError> {
        let _ = request;
        Err(SubmitError::Unsupported)
    }

    /// Runs `request` with `blocks[i]` = the bytes of its prompt's block `i` (contiguous from
    /// block 0) imported into the worker's prefix cache first. Blocks the worker cannot import
    /// (layout, length, pool full) are recomputed: the request never fails because of them.
    fn submit_with_kv(
        &self,
        request: GenerateRequest,
        blocks: Vec<bytes::Bytes>,
    ) -> Result<Generation, SubmitError> {
        let _ = blocks;
        self.submit(request)
    }

    /// The KV block layout of `worker`'s engine (from its hello), for transfer handshakes;
    /// `None` for an unknown worker or one that has not said hello.
    fn kv_layout(&self, worker: WorkerId) -> Option<KvLayout> {
        let _ = worker;
        None
    }
}
