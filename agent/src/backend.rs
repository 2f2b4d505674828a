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
use std::future::Future;
use std::pin::Pin;

use kvfleet_proto::api::WorkerRole;
pub use kvfleet_proto::peer::{FinishReason, TokenChunk, TokenLogprob, TopLogprob};
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

/// What a generation produces, in order: token chunks, then exactly one `Finished` or
/// `Failed`. A chunk is the proto's [`TokenChunk`] from the worker protocol to the SSE writer
/// (and across the peer transport), never reshaped on the way.
#[derive(Debug, Clone, PartialEq)]
pub enum GenEvent {
    /// Newly generated tokens (with their logprobs, when the request asked).
    Tokens(TokenChunk),
    /// Done.
    Finished(FinishReason),
    /// The worker failed on the request or refused it; the message says what happened.
    /// Trying it elsewhere would fail the same way.
    Failed(String),
    /// The worker (or the node serving the request) went away mid-request — the process
    /// exited, its connection broke, it missed its drain deadline: the request may resume
    /// elsewhere (the serving driver migrates it; a frontend that gets one reports a failure).
    Lost(String),
}

impl GenEvent {
    /// Whether it is the generation's last event.
    pub fn is_final(&self) -> bool {
        !matches!(self, GenEvent::Tokens(_))
    }
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

/// A running generation. Dropping it before its final event cancels it: the worker frees the
/// sequence, a peer's stream is reset, the router's picks are released.
pub struct Generation {
    /// The worker running it (the decode worker of a request served in legs).
    pub worker: WorkerId,
    source: Source,
}

enum Source {
    /// A worker of this node's pool, through its channel (the only channel between a worker
    /// and the client); `cancel` runs on a drop before the final event.
    Channel {
        events: mpsc::UnboundedReceiver<GenEvent>,
        role: WorkerRole,
        cancel: Option<Box<dyn FnOnce() + Send>>,
    },
    /// A request served in legs (forwarded, disaggregated): the serving driver, polled in the
    /// caller's task.
    Driven(Box<dyn Events>),
}

/// The events of a request served in legs (the agent's serving driver).
pub trait Events: Send + 'static {
    /// The next event; `None` after the final one.
    fn next(&mut self) -> Pin<Box<dyn Future<Output = Option<GenEvent>> + Send + '_>>;
    /// The role of the worker whose tokens reached (or will reach) the client first.
    fn role(&self) -> WorkerRole;
}

impl fmt::Debug for Generation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Generation");
        d.field("worker", &self.worker).field("role", &self.role());
        if let Source::Channel { cancel, .. } = &self.source {
            d.field("armed", &cancel.is_some());
        }
        d.finish()
    }
}

impl Generation {
    /// A generation on a pool worker of `role`: its events from `events`; `cancel` runs if it
    /// is dropped before its final event.
    pub fn new(
        worker: WorkerId,
        role: WorkerRole,
        events: mpsc::UnboundedReceiver<GenEvent>,
        cancel: impl FnOnce() + Send + 'static,
    ) -> Self {
        Self {
            worker,
            source: Source::Channel {
                events,
                role,
                cancel: Some(Box::new(cancel)),
            },
        }
    }

    /// A generation served in legs by `events`.
    pub fn driven(worker: WorkerId, events: Box<dyn Events>) -> Self {
        Self {
            worker,
            source: Source::Driven(events),
        }
    }

    /// The next event; `None` after the final one, or when the worker went away without one
    /// (which the serving driver counts as [`GenEvent::Lost`]).
    pub async fn next(&mut self) -> Option<GenEvent> {
        match &mut self.source {
            Source::Channel { events, cancel, .. } => {
                let event = events.recv().await;
                if event.as_ref().is_none_or(GenEvent::is_final) {
                    *cancel = None;
                }
                event
            }
            Source::Driven(events) => events.next().await,
        }
    }

    /// The role of the worker that produces its first token (a disaggregated request's prefill
    /// worker, unless its leg failed), for the latency metrics.
    pub fn role(&self) -> WorkerRole {
        match &self.source {
            Source::Channel { role, .. } => *role,
            Source::Driven(events) => events.role(),
        }
    }
}

impl Drop for Generation {
    fn drop(&mut self) {
        if let Source::Channel { cancel, .. } = &mut self.source
            && let Some(cancel) = cancel.take()
        {
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

/// The node that supplied imported KV blocks, and the serials of the certificates it sent
/// them under (what a revocation names).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvOrigin {
    /// The sending node.
    pub node: kvfleet_proto::NodeId,
    /// Its certificates' serials (lowercase hex).
    pub serials: Vec<String>,
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
    /// Its lower KV tiers' figures, from its last status report (zero when they are off).
    pub kv_tiers: kvfleet_engine::TierStats,
    /// KV blocks it dropped from every tier because the node that supplied them was revoked,
    /// since its process started.
    pub kv_blocks_evicted_origin: u64,
    /// Its engine kind: `mock`, `native`, `llamacpp`, `openai`, `vllm` or `sglang`.
    pub engine: &'static str,
    /// An external engine's server URL (its own `/health` and `/metrics`), while it runs.
    pub endpoint: Option<String>,
    /// The engine and its version as the worker said at its last start (`llamacpp b1-0c1e570`,
    /// `kvfleet-model native (CPU)`).
    pub engine_version: Option<String>,
    /// Why its process last failed (cleared when it is ready again).
    pub last_error: Option<String>,
    /// A vllm/sglang worker's KV event translator counters, by metric family name
    /// (`kvfleet_engine_events_gaps`, …), as last reported; `None` without an event stream.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub engine_events: Option<std::collections::BTreeMap<String, u64>>,
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
    /// `origin` supplied them: the blocks remember it, so revoking it evicts them.
    fn submit_with_kv(
        &self,
        request: GenerateRequest,
        blocks: Vec<bytes::Bytes>,
        origin: KvOrigin,
    ) -> Result<Generation, SubmitError> {
        let _ = (blocks, origin);
        self.submit(request)
    }

    /// The KV block layout of `worker`'s engine (from its hello), for transfer handshakes;
    /// `None` for an unknown worker or one that has not said hello.
    fn kv_layout(&self, worker: WorkerId) -> Option<KvLayout> {
        let _ = worker;
        None
    }
}
