//! What the agent and a worker process say to each other over the worker's Unix socket: frames
//! of the proto codec (`kvfleet_proto::frame`) with JSON payloads.
//!
//! ```text
//! agent                                   worker
//!   ── Hello(WorkerSpec) ────────────────▶   (builds its engine)
//!   ◀──────────────────── Hello(WorkerHello)
//!   ── Request(WireRequest) ─────────────▶
//!   ◀──────────────────── Token(WireTokens)   (any number)
//!   ◀──────────────────── Finish(WireFinish) | Error(WireError)
//!   ── Cancel(WireCancel) ───────────────▶   (client went away: free the KV blocks)
//!   ◀──────────────────── Status(WireStatus)  (every 250 ms)
//!   ◀──────────────────── KvEvents(WireKvEvents) (after a step that changed the prefix cache)
//!   ── Control(Stop) ────────────────────▶   (shutdown)
//! ```
//!
//! The worker answers `Hello` only once its engine is built: for a native model that is after
//! the weights are loaded, so "ready" means "can generate now".
//!
//! Each request gets a `seq` from the agent, unique on the connection. [`FrameStream`] reads
//! frames from any async reader; a malformed frame is an error that closes the connection (and
//! so restarts the worker), never a panic.

use std::path::PathBuf;

use kvfleet_model::KvBudget;
use kvfleet_proto::frame::{Frame, FrameCodec, FrameKind, FrameReader};
use kvfleet_proto::{BlockSize, KvEvent, KvLayout, SamplingParams, SequenceHash, WorkerId};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::backend::{EndReason, GenEvent, TokenLogprob};
use crate::config::{EngineKind, ModelConfig, Role};

/// Payload limit on worker sockets: a long prompt's JSON fits many times over.
pub const MAX_PAYLOAD: u32 = 16 * 1024 * 1024;

/// The codec both ends use.
pub fn codec() -> FrameCodec {
    FrameCodec::new(MAX_PAYLOAD)
}

/// Which engine a worker runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WireEngine {
    /// The mock engine (timing model, pseudo-tokens).
    #[default]
    Mock,
    /// The real model at [`EngineSpec::path`].
    Native,
}

/// A KV cache budget on the wire (see [`KvBudget`]).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WireKvBudget {
    /// Exactly this many blocks.
    Blocks(u32),
    /// As many blocks as fit in this many bytes.
    Bytes(u64),
    /// This fraction of the memory available after loading the weights.
    FractionOfAvailable(f64),
}

impl From<KvBudget> for WireKvBudget {
    fn from(b: KvBudget) -> Self {
        match b {
            KvBudget::Blocks(n) => WireKvBudget::Blocks(n),
            KvBudget::Bytes(n) => WireKvBudget::Bytes(n),
            KvBudget::FractionOfAvailable(f) => WireKvBudget::FractionOfAvailable(f),
        }
    }
}

impl From<WireKvBudget> for KvBudget {
    fn from(b: WireKvBudget) -> Self {
        match b {
            WireKvBudget::Blocks(n) => KvBudget::Blocks(n),
            WireKvBudget::Bytes(n) => KvBudget::Bytes(n),
            WireKvBudget::FractionOfAvailable(f) => KvBudget::FractionOfAvailable(f),
        }
    }
}

/// Which engine a worker builds, and its parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EngineSpec {
    /// The model's name.
    pub model: String,
    /// Mock or native.
    #[serde(default)]
    pub engine: WireEngine,
    /// Native: the model file or directory.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// Native: the KV cache budget (the mock uses `kv_blocks`).
    #[serde(default)]
    pub kv_memory: Option<WireKvBudget>,
    /// Prompt plus completion tokens, at most.
    pub context_length: u32,
    /// Tokens per KV block.
    pub block_size: BlockSize,
    /// Blocks in the KV pool.
    pub kv_blocks: u32,
    /// Token ids the mock draws from: the frontend tokenizer's vocabulary.
    pub vocab_size: u32,
    /// Mock timing: microseconds per generated token.
    pub token_time_us: u64,
    /// Mock timing: microseconds per prompt token.
    pub prefill_time_per_token_us: u64,
}

impl EngineSpec {
    /// The spec of a worker serving `model`; `vocab_size` is what the mock draws tokens from
    /// (the mock frontend tokenizer's vocabulary; a native worker uses its model's).
    pub fn for_model(model: &ModelConfig, vocab_size: u32) -> Self {
        Self {
            model: model.name.clone(),
            engine: match model.engine {
                EngineKind::Mock => WireEngine::Mock,
                EngineKind::Native => WireEngine::Native,
            },
            path: model.path.clone(),
            kv_memory: model.kv_memory.map(WireKvBudget::from),
            context_length: model.context_length,
            block_size: model.block_size,
            kv_blocks: model.kv_blocks,
            vocab_size,
            token_time_us: model.mock_token_time.as_micros() as u64,
            prefill_time_per_token_us: model.mock_prefill_time_per_token.as_micros() as u64,
        }
    }
}

/// Agent → worker, first frame.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerSpec {
    /// The worker's id.
    pub worker: WorkerId,
    /// Its role.
    pub role: Role,
    /// `cpu` or `gpu:N`.
    pub device: String,
    /// Its engine.
    pub engine: EngineSpec,
}

/// Worker → agent, answer to the spec: the engine is loaded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerHello {
    /// Echo of the worker's id.
    pub worker: WorkerId,
    /// The worker's process id.
    pub pid: u32,
    /// Engine name, for logs.
    pub engine: String,
    /// KV blocks in its pool.
    pub kv_blocks_total: u64,
    /// The layout of its engine's KV blocks (what an import must match); absent from workers
    /// built before disaggregated serving.
    #[serde(default)]
    pub kv_layout: Option<KvLayout>,
}

/// Agent → worker: generate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WireRequest {
    /// Connection-unique sequence number.
    pub seq: u64,
    /// The frontend's request id, for the worker's log lines.
    pub request_id: String,
    /// Prompt tokens.
    pub prompt: Vec<u32>,
    /// Sequence hashes of the prompt's full blocks.
    pub block_hashes: Vec<SequenceHash>,
    /// Sampling.
    pub sampling: SamplingParams,
}

/// Worker → agent: generated tokens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WireTokens {
    /// Which request.
    pub seq: u64,
    /// Token ids, in order.
    pub tokens: Vec<u32>,
    /// One entry per token when the request asked for logprobs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<Vec<TokenLogprob>>,
}

impl From<WireTokens> for GenEvent {
    fn from(t: WireTokens) -> Self {
        GenEvent::Tokens {
            ids: t.tokens,
            logprobs: t.logprobs,
        }
    }
}

/// Worker → agent: KV events from the worker's engine (prefix cache changes), oldest first,
/// stamped with the worker id and per-worker event ids.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WireKvEvents {
    /// The events.
    pub events: Vec<KvEvent>,
}

/// Worker → agent: the request is done.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WireFinish {
    /// Which request.
    pub seq: u64,
    /// Why.
    pub reason: EndReason,
}

/// Worker → agent: the request failed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WireError {
    /// Which request.
    pub seq: u64,
    /// What happened.
    pub message: String,
}

/// Agent → worker: stop a request and free its blocks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WireCancel {
    /// Which request.
    pub seq: u64,
}

/// Worker → agent: load and KV use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct WireStatus {
    /// Requests generating.
    pub running: u32,
    /// Requests waiting for KV blocks.
    pub waiting: u32,
    /// KV blocks in use.
    pub kv_blocks_used: u64,
    /// KV blocks in the pool.
    pub kv_blocks_total: u64,
    /// Prompt tokens looked up in the prefix cache since the worker started.
    #[serde(default)]
    pub prefix_query_tokens: u64,
    /// Of those, tokens found in the cache (not recomputed).
    #[serde(default)]
    pub prefix_hit_tokens: u64,
    /// Prefill tokens queued: prompt tokens admitted or waiting whose KV is not computed yet.
    #[serde(default)]
    pub prefill_tokens: u64,
}

/// Agent → worker instructions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Control {
    /// Exit now (the agent has already failed or finished every request).
    Stop,
}

/// Reads frames from an async byte stream.
#[derive(Debug)]
pub struct FrameStream<R> {
    reader: R,
    frames: FrameReader,
    buf: Vec<u8>,
}

/// Why a frame stream stopped.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The socket failed.
    #[error("socket error: {0}")]
    Io(#[from] std::io::Error),
    /// The peer sent bytes that are not frames.
    #[error("bad frame: {0}")]
    Frame(#[from] kvfleet_proto::FrameError),
}

impl<R: AsyncRead + Unpin> FrameStream<R> {
    /// Wraps a reader.
    pub fn new(reader: R) -> Self {
        Self {
            reader,
            frames: FrameReader::new(codec()),
            buf: vec![0; 64 * 1024],
        }
    }

    /// The next frame; `None` at a clean end of stream. Cancel-safe: bytes read are buffered
    /// before any await point can be abandoned.
    pub async fn next(&mut self) -> Result<Option<Frame>, StreamError> {
        loop {
            if let Some(frame) = self.frames.next_frame()? {
                return Ok(Some(frame));
            }
            let n = self.reader.read(&mut self.buf).await?;
            if n == 0 {
                self.frames.finish()?;
                return Ok(None);
            }
            self.frames.push(&self.buf[..n]);
        }
    }
}

/// Encodes `message` as a JSON frame of `kind` and appends it to `out`.
pub fn encode_json<T: Serialize>(
    kind: FrameKind,
    message: &T,
    out: &mut Vec<u8>,
) -> Result<(), kvfleet_proto::FrameError> {
    let frame = Frame::json(kind, message)?;
    codec().encode(frame.kind, &frame.payload, out)
}

/// Writes one JSON frame.
pub async fn write_json<W: AsyncWrite + Unpin, T: Serialize>(
    writer: &mut W,
    kind: FrameKind,
    message: &T,
) -> anyhow::Result<()> {
    let mut out = Vec::new();
    encode_json(kind, message, &mut out)?;
    writer.write_all(&out).await?;
    writer.flush().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_cross_a_socket_pair_and_garbage_is_an_error() {
        let (a, mut b) = tokio::io::duplex(64);
        let request = WireRequest {
            seq: 7,
            request_id: "r1".into(),
            prompt: (0..100).collect(),
            block_hashes: vec![SequenceHash(1)],
            sampling: SamplingParams::greedy(4),
        };
        let sent = request.clone();
        let writer = tokio::spawn(async move {
            write_json(&mut b, FrameKind::Request, &sent).await.unwrap();
            b.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        });
        let mut stream = FrameStream::new(a);
        let frame = stream.next().await.unwrap().unwrap();
        assert_eq!(frame.kind, FrameKind::Request);
        assert_eq!(frame.parse_json::<WireRequest>().unwrap(), request);
        assert!(matches!(stream.next().await, Err(StreamError::Frame(_))));
        writer.await.unwrap();
    }
}
