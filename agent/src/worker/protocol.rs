//! What the agent and a worker process say to each other over the worker's Unix socket: frames
//! of the proto codec (`kvfleet_proto::frame`) with JSON payloads, except KV blocks, which are
//! binary (`KvBlock` frames: a fixed [`KvBlockHeader`] then the block's bytes).
//!
//! ```text
//! agent                                   worker
//!   ── Hello(WorkerSpec) ────────────────▶   (builds its engine)
//!   ◀──────────────────── Hello(WorkerHello)  (with its KV layout)
//!   ── KvBlock(seq, i, bytes) ───────────▶   (0..kv_blocks import frames, before their request)
//!   ── Request(WireRequest) ─────────────▶
//!   ◀──────────────────── KvBlock(seq, i, hash, bytes) (export_kv requests: after each step,
//!                                              the prompt blocks it newly computed, in order,
//!                                              before that step's Token/Finish)
//!   ◀──────────────────── Token(WireTokens)   (any number)
//!   ◀──────────────────── Finish(WireFinish) | Error(WireError)
//!   ── Cancel(WireCancel) ───────────────▶   (client went away: free the KV blocks)
//!   ◀──────────────────── Status(WireStatus)  (every 250 ms)
//!   ◀──────────────────── KvEvents(WireKvEvents) (after a step that changed the prefix cache)
//!   ── Control(EvictOrigin) ─────────────▶   (a node was revoked: drop the blocks it supplied)
//!   ── Control(Stop) ────────────────────▶   (shutdown)
//! ```
//!
//! The worker answers `Hello` only once its engine is built: for a native model that is after
//! the weights are loaded, so "ready" means "can generate now".
//!
//! Each request gets a `seq` from the agent, unique and increasing on the connection; the agent
//! sends a request's import frames and the request itself in one go, in `seq` order, so import
//! frames for a `seq` the worker has already seen a request for are stale and dropped.
//! [`FrameStream`] reads frames from any async reader; a malformed frame is an error that closes
//! the connection (and so restarts the worker), never a panic; a `KvBlock` frame too short for
//! its header is dropped with a warning.

use std::path::PathBuf;

use kvfleet_engine::{TierConfig, TierStats};
use kvfleet_model::KvBudget;
use kvfleet_proto::api::WorkerRole;
use kvfleet_proto::frame::{Frame, FrameCodec, FrameKind, FrameReader};
use kvfleet_proto::histogram::LatencyHistogram;
use kvfleet_proto::{BlockSize, KvEvent, KvLayout, NodeId, SamplingParams, SequenceHash, WorkerId};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::config::{EngineKind, ExternalEngine, ModelConfig};
use crate::backend::{FinishReason, GenEvent, TokenChunk};

/// Payload limit on worker sockets: a long prompt's JSON fits many times over.
pub const MAX_PAYLOAD: u32 = 16 * 1024 * 1024;

/// Bytes of a `KvBlock` frame's header: seq (u64), block index (u32), sequence hash (u64), all
/// little-endian.
pub const KV_BLOCK_HEADER_LEN: usize = 20;

/// The largest KV block a worker socket carries (one block per frame): a layout with bigger
/// blocks cannot export or import over it, and such requests are refused.
pub const MAX_KV_BLOCK_BYTES: usize = MAX_PAYLOAD as usize - KV_BLOCK_HEADER_LEN;

/// The fixed header of a binary `KvBlock` frame; the block's bytes follow it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvBlockHeader {
    /// The request it belongs to.
    pub seq: u64,
    /// The block's index in the request's prompt.
    pub index: u32,
    /// Its sequence hash: set by the worker on export; the agent sends the request's hash on
    /// import (or 0), and the worker uses the hashes of the prompt it receives, never this.
    pub hash: SequenceHash,
}

/// A `KvBlock` payload shorter than its header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("KvBlock frame of {0} bytes is shorter than its {KV_BLOCK_HEADER_LEN}-byte header")]
pub struct ShortKvBlock(pub usize);

impl KvBlockHeader {
    /// The payload of a `KvBlock` frame: this header, then `data`.
    pub fn payload(&self, data: &[u8]) -> Vec<u8> {
        let mut payload = Vec::with_capacity(KV_BLOCK_HEADER_LEN + data.len());
        payload.extend_from_slice(&self.seq.to_le_bytes());
        payload.extend_from_slice(&self.index.to_le_bytes());
        payload.extend_from_slice(&self.hash.0.to_le_bytes());
        payload.extend_from_slice(data);
        payload
    }

    /// Splits a `KvBlock` payload into its header and the block's bytes.
    pub fn parse(payload: &[u8]) -> Result<(Self, &[u8]), ShortKvBlock> {
        let (Some(seq), Some(index), Some(hash)) = (
            payload.get(0..8).and_then(|b| b.try_into().ok()),
            payload.get(8..12).and_then(|b| b.try_into().ok()),
            payload.get(12..20).and_then(|b| b.try_into().ok()),
        ) else {
            return Err(ShortKvBlock(payload.len()));
        };
        let header = Self {
            seq: u64::from_le_bytes(seq),
            index: u32::from_le_bytes(index),
            hash: SequenceHash(u64::from_le_bytes(hash)),
        };
        Ok((header, &payload[KV_BLOCK_HEADER_LEN..]))
    }
}

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
    /// llama.cpp's `llama-server`, started by the worker ([`EngineSpec::external`]).
    #[serde(rename = "llamacpp")]
    LlamaCpp,
    /// An OpenAI-compatible server, started by the worker ([`EngineSpec::external`]).
    #[serde(rename = "openai")]
    OpenAi,
    /// vLLM: the OpenAI adapter, and its KV event stream where configured.
    Vllm,
    /// SGLang: as vLLM.
    Sglang,
}

impl WireEngine {
    /// Whether the worker speaks the server's OpenAI `/v1/completions` (openai, vllm, sglang).
    pub fn openai_api(self) -> bool {
        matches!(
            self,
            WireEngine::OpenAi | WireEngine::Vllm | WireEngine::Sglang
        )
    }

    /// Whether an external server is started by the worker.
    pub fn external(self) -> bool {
        !matches!(self, WireEngine::Mock | WireEngine::Native)
    }
}

/// How the worker starts an external engine's server (see [`ExternalEngine`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireExternal {
    /// The program.
    pub command: String,
    /// Its arguments (llamacpp: after the worker's own; openai: all, with placeholders).
    pub args: Vec<String>,
    /// Requests it runs at once.
    pub slots: u32,
    /// Seconds a prefix the approximate KV record holds lives without reuse.
    pub kv_ttl_secs: u64,
    /// How long the server may take to become healthy (the agent's start timeout, less a
    /// margin so the worker's own error reaches it); 0: the worker's default.
    #[serde(default)]
    pub start_timeout_ms: u64,
    /// vllm/sglang: the engine's KV event endpoint, `{kv_port}` allowed (see
    /// [`ExternalEngine::kv_events`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_events: Option<String>,
    /// vllm/sglang: its replay endpoint, `{kv_replay_port}` allowed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_events_replay: Option<String>,
}

impl From<&ExternalEngine> for WireExternal {
    fn from(e: &ExternalEngine) -> Self {
        Self {
            command: e.command.clone(),
            args: e.args.clone(),
            slots: e.slots,
            kv_ttl_secs: e.kv_ttl.as_secs(),
            start_timeout_ms: 0,
            kv_events: e.kv_events.clone(),
            kv_events_replay: e.kv_events_replay.clone(),
        }
    }
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
    /// The mock's KV head dimension (its block size in bytes); see
    /// [`ModelConfig::mock_kv_head_dim`].
    #[serde(default = "one")]
    pub mock_kv_head_dim: u32,
    /// The lower KV tiers (G2 host memory, G3 disk) below the engine's pool; off by default.
    #[serde(default)]
    pub kv_tiers: TierConfig,
    /// External engines: the server to start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external: Option<WireExternal>,
    /// The fleet's hash secret (`proto::hash`): every block hash the worker computes is keyed
    /// with it. `None`: unkeyed (`kvfleet dev`, a standalone agent without one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleet_hash_secret: Option<kvfleet_proto::hash::FleetHashSecret>,
}

impl EngineSpec {
    /// The worker's block hasher: keyed with the fleet's secret, if any.
    pub fn block_hasher(&self) -> kvfleet_proto::hash::BlockHasher {
        kvfleet_proto::hash::BlockHasher::keyed(
            self.fleet_hash_secret
                .as_ref()
                .and_then(kvfleet_proto::hash::FleetHashSecret::key),
        )
    }
}

fn one() -> u32 {
    1
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
                EngineKind::LlamaCpp => WireEngine::LlamaCpp,
                EngineKind::OpenAi => WireEngine::OpenAi,
                EngineKind::Vllm => WireEngine::Vllm,
                EngineKind::Sglang => WireEngine::Sglang,
            },
            path: model.path.clone(),
            kv_memory: model.kv_memory.map(WireKvBudget::from),
            context_length: model.context_length,
            block_size: model.block_size,
            kv_blocks: model.kv_blocks,
            vocab_size,
            token_time_us: model.mock_token_time.as_micros() as u64,
            prefill_time_per_token_us: model.mock_prefill_time_per_token.as_micros() as u64,
            mock_kv_head_dim: model.mock_kv_head_dim,
            kv_tiers: TierConfig::default(),
            external: model.external.as_ref().map(WireExternal::from),
            fleet_hash_secret: None,
        }
    }
}

/// Agent → worker, first frame.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerSpec {
    /// The worker's id.
    pub worker: WorkerId,
    /// Its role.
    pub role: WorkerRole,
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
    /// built before disaggregated serving, and from external engines (no KV import or export).
    #[serde(default)]
    pub kv_layout: Option<KvLayout>,
    /// External engines: the URL of the server the worker started (its own `/metrics` there).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
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
    /// Send the prompt's KV blocks up as they are computed (`KvBlock` frames), then whatever
    /// prompt blocks remain cached when it finishes: a prefill worker's request.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub export_kv: bool,
    /// How many `KvBlock` import frames (prompt blocks 0..kv_blocks) the agent sent for this
    /// `seq` before this frame: they go into the prefix cache before the request is queued.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub kv_blocks: u32,
    /// The node that supplied those blocks (a disaggregated request's prefill node): the
    /// worker keeps it with them in every tier, so `Control::EvictOrigin` can drop them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_origin: Option<NodeId>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// Worker → agent: generated tokens, in the chunk the client's stream carries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WireTokens {
    /// Which request.
    pub seq: u64,
    /// The tokens (and their logprobs, when the request asked).
    pub chunk: TokenChunk,
}

impl From<WireTokens> for GenEvent {
    fn from(t: WireTokens) -> Self {
        GenEvent::Tokens(t.chunk)
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
    pub reason: FinishReason,
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

/// What a worker measured of its requests since its process started, in engine time: time to
/// first token and between tokens from the scheduler's clock, queue time from arrival to the
/// first admission into a batch.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WorkerLatencies {
    /// Arrival to first token.
    pub ttft: LatencyHistogram,
    /// Between consecutive tokens of a request.
    pub itl: LatencyHistogram,
    /// Arrival to the first admission into a batch (observed when the request finishes).
    pub queue: LatencyHistogram,
}

/// Worker → agent: load and KV use.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
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
    /// Requests admitted into a batch for the first time since the worker started (their
    /// prompt and cached tokens are `prefix_query_tokens` and `prefix_hit_tokens`).
    #[serde(default)]
    pub admitted: u64,
    /// Requests finished since the worker started.
    #[serde(default)]
    pub finished: u64,
    /// Tokens generated by those finished requests.
    #[serde(default)]
    pub output_tokens: u64,
    /// KV blocks sent up for `export_kv` requests since the worker started.
    #[serde(default)]
    pub kv_blocks_exported: u64,
    /// Attached KV blocks handed to the engine for import since the worker started.
    #[serde(default)]
    pub kv_blocks_imported: u64,
    /// Requests that ran with less of their attached KV than the agent announced (bad or
    /// missing blocks, or the engine refused the import): the rest was recomputed.
    #[serde(default)]
    pub kv_import_fallbacks: u64,
    /// KV blocks dropped from every tier because the node that supplied them was revoked
    /// (`Control::EvictOrigin`), since the worker started.
    #[serde(default)]
    pub kv_blocks_evicted_origin: u64,
    /// Its requests' latencies, cumulative.
    #[serde(default)]
    pub latencies: WorkerLatencies,
    /// Its lower KV tiers' figures (zero when they are off).
    #[serde(default)]
    pub kv_tiers: TierStats,
    /// vllm/sglang with a KV event stream: the translator's counters, by metric family name
    /// (`kvfleet_engine_events_*`, without `_total`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine_events: Option<std::collections::BTreeMap<String, u64>>,
}

/// Agent → worker instructions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Control {
    /// Exit now (the agent has already failed or finished every request).
    Stop,
    /// `node`'s certificate was revoked (or it was removed): drop every KV block it supplied
    /// from every tier (blocks a running request uses: when it ends), with `Removed` events.
    EvictOrigin {
        /// The node.
        node: NodeId,
    },
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
            export_kv: false,
            kv_blocks: 0,
            kv_origin: None,
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

    #[test]
    fn kv_block_headers_round_trip_and_short_payloads_are_errors() {
        let header = KvBlockHeader {
            seq: u64::MAX - 3,
            index: 7,
            hash: SequenceHash(0x0123_4567_89ab_cdef),
        };
        let payload = header.payload(b"block bytes");
        assert_eq!(payload.len(), KV_BLOCK_HEADER_LEN + 11);
        assert_eq!(
            KvBlockHeader::parse(&payload),
            Ok((header, &b"block bytes"[..]))
        );
        assert_eq!(
            KvBlockHeader::parse(&header.payload(&[])),
            Ok((header, &[][..]))
        );
        for len in 0..KV_BLOCK_HEADER_LEN {
            assert_eq!(
                KvBlockHeader::parse(&payload[..len]),
                Err(ShortKvBlock(len))
            );
        }
        // Agents from before disaggregation leave the new request fields out.
        let request = WireRequest {
            seq: 1,
            request_id: "r".into(),
            prompt: vec![1, 2],
            block_hashes: Vec::new(),
            sampling: SamplingParams::greedy(1),
            export_kv: false,
            kv_blocks: 0,
            kv_origin: None,
        };
        let json = serde_json::to_value(&request).unwrap();
        assert!(json.get("export_kv").is_none() && json.get("kv_blocks").is_none());
        assert_eq!(
            serde_json::from_value::<WireRequest>(json).unwrap(),
            request
        );
    }
}
