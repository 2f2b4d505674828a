//! What agents say to each other over the peer QUIC transport: the messages inside the frames of
//! [`crate::frame`], with an encoder and a validating decoder. No IO: `kvfleet-peer` drives the
//! streams.
//!
//! Every peer stream is one bidirectional QUIC stream with one job, named by its first frame:
//!
//! ```text
//! forwarded generate                        KV block transfer (one of several parallel streams)
//! client                    server          sender (prefill)               receiver (decode)
//!   ── Request(GenerateRequest) ─▶            ── KvLayout(KvHandshake) ───────▶
//!   ◀─ Token(TokenChunk)   (any number)       ◀─ KvLayout(KvHandshake) echo = accepted, or Error
//!   ◀─ Finish(Finish) | Error(ErrorMessage)   ── KvBlock(header ‖ bytes)  (any number)
//!   ── Cancel (optional; a stream reset       ── KvDone(KvDone) ──────────────▶
//!      says the same)                         ◀─ KvDone(KvDone) receipt, or Error
//! ```
//!
//! Control messages are JSON with unknown fields refused. A KV block frame is binary so that a
//! multi-megabyte block is never text-encoded:
//!
//! ```text
//! offset  size  field (little-endian)
//!      0     4  block index within the transfer (u32)
//!      4     4  reserved, must be 0
//!      8     8  the block's sequence hash (u64)
//!     16     8  checksum of the block bytes: XXH3-64 with seed BLOCK_CHECKSUM_SEED
//!     24     n  the block bytes (K and V, every layer, as the layout says)
//! ```
//!
//! The frame's CRC-32 catches damage on the link; the block checksum is end to end, computed where
//! the block was exported and verified where it is imported.
//!
//! [`PeerMessage::decode`] checks every field a peer controls (lengths, ranges, that arithmetic on
//! announced sizes cannot overflow) and returns a [`PeerWireError`]; it never panics (a cargo-fuzz
//! target, `peer_decode`, checks that).

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64_with_seed;

use crate::frame::{FrameCodec, FrameError, FrameKind, FrameRef, HEADER_LEN, MAGIC, VERSION};
use crate::hash::SequenceHash;
use crate::ids::WorkerId;
use crate::request::{KvLayout, SamplingParams};

/// The ALPN protocol name of the peer transport; both sides must offer it.
pub const PEER_ALPN: &[u8] = b"kvfleet-peer/1";
/// Longest request id accepted (bytes).
pub const MAX_ID_LEN: usize = 256;
/// Longest model name accepted (bytes).
pub const MAX_MODEL_LEN: usize = 256;
/// Longest prefill deadline a [`PrefillPlan`] may carry (10 minutes). The receiving agent
/// bounds it further by its own `[peer] transfer_timeout_secs`.
pub const MAX_PREFILL_TIMEOUT_MS: u32 = 600_000;
/// Longest error message accepted (bytes); [`ErrorMessage::new`] truncates to it.
pub const MAX_MESSAGE_LEN: usize = 4096;
/// Bytes of the binary header in front of a KV block's bytes.
pub const KV_BLOCK_HEADER_LEN: usize = 24;
/// Seed of the end-to-end KV block checksum (ASCII "kvblock1"), distinct from the block-hash seed.
pub const BLOCK_CHECKSUM_SEED: u64 = 0x6b76_626c_6f63_6b31;

/// The end-to-end checksum of one KV block's bytes.
pub fn block_checksum(data: &[u8]) -> u64 {
    xxh3_64_with_seed(data, BLOCK_CHECKSUM_SEED)
}

/// Why bytes from a peer are not a valid peer message.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PeerWireError {
    /// The frame itself is bad, its JSON does not parse, or its kind is wrong here.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The message parsed but a field is out of range.
    #[error("invalid {kind:?} message: {field}: {reason}")]
    Invalid {
        /// The frame's kind.
        kind: FrameKind,
        /// The offending field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A KV block frame shorter than its header.
    #[error("KV block frame of {len} bytes is shorter than its {KV_BLOCK_HEADER_LEN}-byte header")]
    ShortBlock {
        /// Payload bytes present.
        len: usize,
    },
    /// A kind that the peer transport does not use.
    #[error("{0:?} frames are not part of the peer protocol")]
    NotPeerKind(FrameKind),
}

fn invalid(kind: FrameKind, field: &'static str, reason: impl Into<String>) -> PeerWireError {
    PeerWireError::Invalid {
        kind,
        field,
        reason: reason.into(),
    }
}

fn check_len(
    kind: FrameKind,
    field: &'static str,
    value: &str,
    max: usize,
) -> Result<(), PeerWireError> {
    if value.is_empty() {
        return Err(invalid(kind, field, "empty"));
    }
    if value.len() > max {
        return Err(invalid(
            kind,
            field,
            format!("{} bytes, at most {max}", value.len()),
        ));
    }
    Ok(())
}

/// A generate request forwarded to another node's worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerateRequest {
    /// The frontend's request id (`chatcmpl-...`), for log lines on both nodes.
    pub request_id: String,
    /// The model's name.
    pub model: String,
    /// The worker the router picked on the receiving node; `None` lets that node choose.
    #[serde(default)]
    pub worker: Option<WorkerId>,
    /// Prompt token ids; never empty.
    pub prompt: Vec<u32>,
    /// Sequence hashes of the prompt's full blocks (`crate::hash`).
    #[serde(default)]
    pub block_hashes: Vec<SequenceHash>,
    /// Sampling parameters; validated on decode.
    pub sampling: SamplingParams,
    /// Disaggregated serving, sent to the decode worker's node: prefill this prompt on that
    /// prefill worker first and import its KV blocks here. `None`: prefill locally.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefill: Option<PrefillPlan>,
    /// Disaggregated serving, sent to the prefill worker's node: run the prompt (the first
    /// token comes back on this stream) and push its KV blocks to that decode node as they are
    /// computed. `None`: an ordinary request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_push: Option<KvPush>,
}

/// Where a request's prompt is prefilled when it is not the decode worker's own job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrefillPlan {
    /// The prefill worker.
    pub worker: WorkerId,
    /// Its node's id (the server name its certificate must carry).
    pub node: uuid::Uuid,
    /// Its node's peer endpoint, `host:port`.
    pub addr: String,
    /// The prefill leg's deadline, transfer included: a leg with no first token by then means
    /// the decode node prefills the prompt itself; one past its first token means it continues
    /// with the blocks that arrived.
    #[serde(default = "default_prefill_timeout_ms")]
    pub timeout_ms: u32,
}

fn default_prefill_timeout_ms() -> u32 {
    30_000
}

/// Where a prefill worker's KV blocks go.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KvPush {
    /// Names the transfer on the receiving node (the KV handshake's `request_id`).
    pub transfer_id: String,
    /// The decode worker that imports the blocks.
    pub worker: WorkerId,
    /// The decode node's id.
    pub node: uuid::Uuid,
    /// The decode node's peer endpoint, `host:port`.
    pub addr: String,
}

/// What a prefill node pushed, reported in its [`Finish`] once the transfer ended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KvPushReport {
    /// Blocks the receiver acknowledged over every stream of the transfer (the decode node
    /// keeps at most this many of the contiguous blocks it holds from block 0).
    pub blocks: u32,
    /// Their bytes.
    pub bytes: u64,
}

impl GenerateRequest {
    /// Checks what a peer could get wrong.
    pub fn validate(&self) -> Result<(), PeerWireError> {
        let kind = FrameKind::Request;
        check_len(kind, "request_id", &self.request_id, MAX_ID_LEN)?;
        check_len(kind, "model", &self.model, MAX_MODEL_LEN)?;
        if self.prompt.is_empty() {
            return Err(invalid(kind, "prompt", "empty"));
        }
        if self.block_hashes.len() > self.prompt.len() {
            return Err(invalid(
                kind,
                "block_hashes",
                format!(
                    "{} block hashes for a {}-token prompt",
                    self.block_hashes.len(),
                    self.prompt.len()
                ),
            ));
        }
        if self.prefill.is_some() && self.kv_push.is_some() {
            return Err(invalid(
                kind,
                "kv_push",
                "a request is either the decode leg (prefill) or the prefill leg (kv_push)",
            ));
        }
        if let Some(plan) = &self.prefill {
            check_len(kind, "prefill.addr", &plan.addr, MAX_MODEL_LEN)?;
            // A u32 of milliseconds reaches 49 days: a plan could hold a transfer (and the
            // buffers it fills) that long.
            if !(1..=MAX_PREFILL_TIMEOUT_MS).contains(&plan.timeout_ms) {
                return Err(invalid(
                    kind,
                    "prefill.timeout_ms",
                    format!(
                        "{} ms, must be 1 to {MAX_PREFILL_TIMEOUT_MS}",
                        plan.timeout_ms
                    ),
                ));
            }
        }
        if let Some(push) = &self.kv_push {
            check_len(kind, "kv_push.transfer_id", &push.transfer_id, MAX_ID_LEN)?;
            check_len(kind, "kv_push.addr", &push.addr, MAX_MODEL_LEN)?;
        }
        self.sampling
            .validate()
            .map_err(|e| invalid(kind, "sampling", e.to_string()))
    }
}

/// The log-probability of one alternative token.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopLogprob {
    /// Token id.
    pub token: u32,
    /// Natural-log probability; finite.
    pub logprob: f32,
}

/// The log-probability of a sampled token and of the most likely alternatives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenLogprob {
    /// The sampled token id.
    pub token: u32,
    /// Its natural-log probability; finite.
    pub logprob: f32,
    /// Alternatives, most likely first; at most [`SamplingParams::MAX_LOGPROBS`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub top: Vec<TopLogprob>,
}

/// Newly generated tokens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenChunk {
    /// Token ids, in order; never empty.
    pub tokens: Vec<u32>,
    /// One entry per token when the request asked for logprobs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<Vec<TokenLogprob>>,
}

impl TokenChunk {
    /// Tokens without logprobs.
    pub fn tokens(tokens: Vec<u32>) -> Self {
        Self {
            tokens,
            logprobs: None,
        }
    }

    /// Checks what a peer could get wrong.
    pub fn validate(&self) -> Result<(), PeerWireError> {
        let kind = FrameKind::Token;
        if self.tokens.is_empty() {
            return Err(invalid(kind, "tokens", "empty"));
        }
        let Some(logprobs) = &self.logprobs else {
            return Ok(());
        };
        if logprobs.len() != self.tokens.len() {
            return Err(invalid(
                kind,
                "logprobs",
                format!(
                    "{} entries for {} tokens",
                    logprobs.len(),
                    self.tokens.len()
                ),
            ));
        }
        for (entry, token) in logprobs.iter().zip(&self.tokens) {
            if entry.token != *token {
                return Err(invalid(
                    kind,
                    "logprobs",
                    format!(
                        "entry for token {} where token {token} was sampled",
                        entry.token
                    ),
                ));
            }
            if entry.top.len() > SamplingParams::MAX_LOGPROBS as usize {
                return Err(invalid(kind, "logprobs.top", "more than 20 alternatives"));
            }
            let values = std::iter::once(entry.logprob).chain(entry.top.iter().map(|t| t.logprob));
            for value in values {
                // JSON cannot carry NaN or infinities; a log-probability is never positive.
                if !value.is_finite() || value > 0.0 {
                    return Err(invalid(
                        kind,
                        "logprobs",
                        format!("{value} is not a log-probability"),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Why a generation ended. Serialized like the agent's `EndReason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// `max_tokens` reached.
    Length,
    /// EOS or a stop token.
    Stop,
}

/// Token counts of a finished generation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Usage {
    /// Prompt tokens.
    pub prompt_tokens: u32,
    /// Generated tokens.
    pub completion_tokens: u32,
    /// Prompt tokens served from the prefix cache (or imported KV blocks) instead of computed.
    #[serde(default)]
    pub cached_tokens: u32,
}

/// The end of a generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Finish {
    /// Why it ended.
    pub reason: FinishReason,
    /// Token counts.
    pub usage: Usage,
    /// The prefill leg of a disaggregated request: the KV blocks pushed to the decode node.
    /// Absent when the first token ended the request (`Stop`), which the prefill node reports
    /// at once instead of waiting for its transfer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_push: Option<KvPushReport>,
}

/// What went wrong, as one peer tells another. The receiving agent maps it to its own surface
/// (e.g. `Overloaded` → HTTP 429 on the frontend).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request is invalid (bad field, unknown stream kind).
    BadRequest,
    /// No worker on this node serves the model.
    UnknownModel,
    /// The node is at capacity; retry elsewhere or later.
    Overloaded,
    /// The node is draining or its workers are not ready.
    Unavailable,
    /// The worker failed while generating.
    Internal,
    /// The request was cancelled.
    Cancelled,
    /// A KV transfer named a request the receiver does not expect.
    UnknownRequest,
    /// A KV transfer's layout differs from the receiver's.
    LayoutMismatch,
    /// A KV block's size differs from what the layout implies.
    BlockSizeMismatch,
    /// A KV block's bytes do not match its checksum.
    ChecksumMismatch,
    /// The stream ended before its final frame.
    Truncated,
    /// A frame was malformed or out of place.
    Malformed,
    /// The receiver could not import a block (pool full, request gone).
    ImportFailed,
    /// A KV block's sequence hash is not the one the receiver computed from the request's own
    /// tokens for that position.
    HashMismatch,
}

/// An error sent on a stream before it is closed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(deny_unknown_fields)]
#[error("{code:?}: {message}")]
pub struct ErrorMessage {
    /// What kind of failure, for the receiver to branch on.
    pub code: ErrorCode,
    /// What happened, for people; at most [`MAX_MESSAGE_LEN`] bytes.
    pub message: String,
}

impl ErrorMessage {
    /// An error message, truncated (on a character boundary) to [`MAX_MESSAGE_LEN`] bytes.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        let mut message = message.into();
        if message.len() > MAX_MESSAGE_LEN {
            let mut end = MAX_MESSAGE_LEN;
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            message.truncate(end);
        }
        Self { code, message }
    }
}

/// First frame of a KV transfer stream (sender → receiver), and the receiver's acceptance (the
/// same message echoed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KvHandshake {
    /// The request whose blocks follow; the receiver must expect it.
    pub request_id: String,
    /// The sender's layout; the receiver refuses any difference from its own.
    pub layout: KvLayout,
}

impl KvHandshake {
    /// Checks what a peer could get wrong.
    pub fn validate(&self) -> Result<(), PeerWireError> {
        let kind = FrameKind::KvLayout;
        check_len(kind, "request_id", &self.request_id, MAX_ID_LEN)?;
        check_len(kind, "layout.model", &self.layout.model, MAX_MODEL_LEN)?;
        match self.layout.checked_block_bytes() {
            Some(bytes) if bytes <= u64::from(u32::MAX) => Ok(()),
            Some(bytes) => Err(invalid(
                kind,
                "layout",
                format!("a block of {bytes} bytes exceeds any frame"),
            )),
            None => Err(invalid(
                kind,
                "layout",
                "a zero dimension or an overflowing block size",
            )),
        }
    }
}

/// The binary header in front of each KV block's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KvBlockHeader {
    /// Position of the block in the request's prompt (0 = first block).
    pub index: u32,
    /// The block's sequence hash.
    pub hash: SequenceHash,
    /// [`block_checksum`] of the block bytes.
    pub checksum: u64,
}

impl KvBlockHeader {
    /// The header for `data`, computing its checksum.
    pub fn for_block(index: u32, hash: SequenceHash, data: &[u8]) -> Self {
        Self {
            index,
            hash,
            checksum: block_checksum(data),
        }
    }

    /// The header's bytes.
    pub fn to_bytes(&self) -> [u8; KV_BLOCK_HEADER_LEN] {
        let mut out = [0u8; KV_BLOCK_HEADER_LEN];
        out[0..4].copy_from_slice(&self.index.to_le_bytes());
        // 4..8 reserved, zero.
        out[8..16].copy_from_slice(&self.hash.0.to_le_bytes());
        out[16..24].copy_from_slice(&self.checksum.to_le_bytes());
        out
    }

    /// Splits a KV block payload into its header and the block bytes.
    pub fn parse(payload: &[u8]) -> Result<(Self, &[u8]), PeerWireError> {
        let (Some(head), Some(data)) = (
            payload.get(..KV_BLOCK_HEADER_LEN),
            payload.get(KV_BLOCK_HEADER_LEN..),
        ) else {
            return Err(PeerWireError::ShortBlock { len: payload.len() });
        };
        let u32_at = |at: usize| {
            head.get(at..at + 4)
                .and_then(|b| <[u8; 4]>::try_from(b).ok())
                .map(u32::from_le_bytes)
                .unwrap_or(0)
        };
        let u64_at = |at: usize| {
            head.get(at..at + 8)
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map(u64::from_le_bytes)
                .unwrap_or(0)
        };
        let reserved = u32_at(4);
        if reserved != 0 {
            return Err(invalid(
                FrameKind::KvBlock,
                "reserved",
                format!("{reserved:#x}, expected 0"),
            ));
        }
        Ok((
            Self {
                index: u32_at(0),
                hash: SequenceHash(u64_at(8)),
                checksum: u64_at(16),
            },
            data,
        ))
    }

    /// True when `data` matches the checksum.
    pub fn verify(&self, data: &[u8]) -> bool {
        block_checksum(data) == self.checksum
    }
}

/// Bytes that put a KV block on the wire without copying it: the frame header and the block
/// header. The sender writes these and then the block bytes; the result is exactly
/// `codec.encode(FrameKind::KvBlock, header ‖ data)`.
pub fn kv_block_frame_prefix(
    codec: &FrameCodec,
    header: &KvBlockHeader,
    data: &[u8],
) -> Result<[u8; HEADER_LEN + KV_BLOCK_HEADER_LEN], FrameError> {
    let total = (KV_BLOCK_HEADER_LEN as u64) + data.len() as u64;
    let len = u32::try_from(total)
        .ok()
        .filter(|len| *len <= codec.max_payload())
        .ok_or(FrameError::Oversized {
            len: total,
            max: codec.max_payload(),
        })?;
    let block_header = header.to_bytes();
    let mut crc = crc32fast::Hasher::new();
    crc.update(&block_header);
    crc.update(data);
    let mut out = [0u8; HEADER_LEN + KV_BLOCK_HEADER_LEN];
    out[0..2].copy_from_slice(&MAGIC);
    out[2] = VERSION;
    out[3] = FrameKind::KvBlock as u8;
    out[4..8].copy_from_slice(&len.to_le_bytes());
    out[8..12].copy_from_slice(&crc.finalize().to_le_bytes());
    out[HEADER_LEN..].copy_from_slice(&block_header);
    Ok(out)
}

/// The end of a KV transfer stream (sender → receiver: what was sent), and the receiver's
/// receipt (what was imported).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KvDone {
    /// Blocks on this stream.
    pub blocks: u64,
    /// Block bytes on this stream (headers excluded).
    pub bytes: u64,
}

/// Asks the server to stop a generation (a stream reset says the same thing).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CancelMessage {
    /// Why, for logs.
    #[serde(default)]
    pub reason: String,
}

/// One decoded peer message. KV block bytes borrow from the frame.
// A message is decoded, handled and dropped one at a time, never stored in bulk: boxing the
// request would cost an allocation per message for nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum PeerMessage<'a> {
    /// `Request`: forwarded generate.
    Generate(GenerateRequest),
    /// `Token`: generated tokens.
    Tokens(TokenChunk),
    /// `Finish`: the generation ended.
    Finish(Finish),
    /// `Cancel`: stop generating.
    Cancel(CancelMessage),
    /// `Error`: the stream failed.
    Error(ErrorMessage),
    /// `KvLayout`: KV transfer handshake or its acceptance.
    KvHandshake(KvHandshake),
    /// `KvBlock`: one block.
    KvBlock {
        /// Index, hash, checksum.
        header: KvBlockHeader,
        /// The block bytes (not yet checked against the checksum: [`KvBlockHeader::verify`]).
        data: &'a [u8],
    },
    /// `KvDone`: end of a transfer stream or its receipt.
    KvDone(KvDone),
}

impl<'a> PeerMessage<'a> {
    /// The frame kind this message travels in.
    pub fn kind(&self) -> FrameKind {
        match self {
            PeerMessage::Generate(_) => FrameKind::Request,
            PeerMessage::Tokens(_) => FrameKind::Token,
            PeerMessage::Finish(_) => FrameKind::Finish,
            PeerMessage::Cancel(_) => FrameKind::Cancel,
            PeerMessage::Error(_) => FrameKind::Error,
            PeerMessage::KvHandshake(_) => FrameKind::KvLayout,
            PeerMessage::KvBlock { .. } => FrameKind::KvBlock,
            PeerMessage::KvDone(_) => FrameKind::KvDone,
        }
    }

    /// Decodes and validates a frame's payload. Any input gives a message or a typed error.
    pub fn decode(frame: FrameRef<'a>) -> Result<Self, PeerWireError> {
        let message = match frame.kind {
            FrameKind::Request => {
                let request: GenerateRequest = frame.parse_json()?;
                request.validate()?;
                PeerMessage::Generate(request)
            }
            FrameKind::Token => {
                let chunk: TokenChunk = frame.parse_json()?;
                chunk.validate()?;
                PeerMessage::Tokens(chunk)
            }
            FrameKind::Finish => PeerMessage::Finish(frame.parse_json()?),
            FrameKind::Cancel => {
                let cancel: CancelMessage = frame.parse_json()?;
                if cancel.reason.len() > MAX_MESSAGE_LEN {
                    return Err(invalid(frame.kind, "reason", "too long"));
                }
                PeerMessage::Cancel(cancel)
            }
            FrameKind::Error => {
                let error: ErrorMessage = frame.parse_json()?;
                if error.message.len() > MAX_MESSAGE_LEN {
                    return Err(invalid(frame.kind, "message", "too long"));
                }
                PeerMessage::Error(error)
            }
            FrameKind::KvLayout => {
                let handshake: KvHandshake = frame.parse_json()?;
                handshake.validate()?;
                PeerMessage::KvHandshake(handshake)
            }
            FrameKind::KvBlock => {
                let (header, data) = KvBlockHeader::parse(frame.payload)?;
                PeerMessage::KvBlock { header, data }
            }
            FrameKind::KvDone => PeerMessage::KvDone(frame.parse_json()?),
            other => return Err(PeerWireError::NotPeerKind(other)),
        };
        Ok(message)
    }

    /// Appends this message as one frame to `out`. Messages are validated first, so an encoder
    /// never puts on the wire what the decoder would refuse.
    pub fn encode(&self, codec: &FrameCodec, out: &mut Vec<u8>) -> Result<(), PeerWireError> {
        fn json<T: Serialize>(kind: FrameKind, message: &T) -> Result<Vec<u8>, PeerWireError> {
            serde_json::to_vec(message).map_err(|e| {
                PeerWireError::Frame(FrameError::Payload {
                    kind,
                    reason: e.to_string(),
                })
            })
        }
        let kind = self.kind();
        let payload = match self {
            PeerMessage::Generate(request) => {
                request.validate()?;
                json(kind, request)?
            }
            PeerMessage::Tokens(chunk) => {
                chunk.validate()?;
                json(kind, chunk)?
            }
            PeerMessage::Finish(finish) => json(kind, finish)?,
            PeerMessage::Cancel(cancel) => {
                if cancel.reason.len() > MAX_MESSAGE_LEN {
                    return Err(invalid(kind, "reason", "too long"));
                }
                json(kind, cancel)?
            }
            PeerMessage::Error(error) => {
                json(kind, &ErrorMessage::new(error.code, &error.message))?
            }
            PeerMessage::KvHandshake(handshake) => {
                handshake.validate()?;
                json(kind, handshake)?
            }
            PeerMessage::KvBlock { header, data } => {
                let prefix = kv_block_frame_prefix(codec, header, data)?;
                out.reserve(prefix.len() + data.len());
                out.extend_from_slice(&prefix);
                out.extend_from_slice(data);
                return Ok(());
            }
            PeerMessage::KvDone(done) => json(kind, done)?,
        };
        codec.encode(kind, &payload, out)?;
        Ok(())
    }

    /// Encodes this message as one frame in a new buffer.
    pub fn to_frame_bytes(&self, codec: &FrameCodec) -> Result<Vec<u8>, PeerWireError> {
        let mut out = Vec::new();
        self.encode(codec, &mut out)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::BlockSize;
    use crate::request::KvDtype;
    use proptest::prelude::*;

    fn layout() -> KvLayout {
        KvLayout {
            model: "llama-3-8b".into(),
            layers: 32,
            kv_heads: 8,
            head_dim: 128,
            dtype: KvDtype::Bf16,
            block_size: BlockSize::new(16).unwrap(),
        }
    }

    fn request() -> GenerateRequest {
        GenerateRequest {
            request_id: "chatcmpl-1".into(),
            model: "smollm2".into(),
            worker: Some(WorkerId(7)),
            prompt: vec![1, 2, 3, 4, 5],
            block_hashes: vec![SequenceHash(42)],
            sampling: SamplingParams::greedy(8),
            prefill: None,
            kv_push: None,
        }
    }

    fn round_trip(message: &PeerMessage<'_>) -> Vec<u8> {
        let codec = FrameCodec::default();
        let bytes = message.to_frame_bytes(&codec).unwrap();
        let frame = codec.decode_exact(&bytes).unwrap();
        assert_eq!(&PeerMessage::decode(frame).unwrap(), message);
        bytes
    }

    #[test]
    fn every_message_round_trips() {
        let data = vec![0xabu8; 100];
        let messages = vec![
            PeerMessage::Generate(request()),
            PeerMessage::Tokens(TokenChunk::tokens(vec![9, 10])),
            PeerMessage::Tokens(TokenChunk {
                tokens: vec![9],
                logprobs: Some(vec![TokenLogprob {
                    token: 9,
                    logprob: -0.25,
                    top: vec![TopLogprob {
                        token: 3,
                        logprob: -2.0,
                    }],
                }]),
            }),
            PeerMessage::Finish(Finish {
                reason: FinishReason::Length,
                usage: Usage {
                    prompt_tokens: 5,
                    completion_tokens: 8,
                    cached_tokens: 0,
                },
                kv_push: None,
            }),
            PeerMessage::Cancel(CancelMessage::default()),
            PeerMessage::Error(ErrorMessage::new(ErrorCode::Overloaded, "busy")),
            PeerMessage::KvHandshake(KvHandshake {
                request_id: "r1".into(),
                layout: layout(),
            }),
            PeerMessage::KvBlock {
                header: KvBlockHeader::for_block(3, SequenceHash(99), &data),
                data: &data,
            },
            PeerMessage::KvDone(KvDone {
                blocks: 4,
                bytes: 400,
            }),
        ];
        for message in &messages {
            round_trip(message);
        }
    }

    #[test]
    fn block_frame_prefix_is_the_codec_encoding() {
        let codec = FrameCodec::default();
        let data: Vec<u8> = (0..5000u32).map(|i| i as u8).collect();
        let header = KvBlockHeader::for_block(1, SequenceHash(5), &data);
        let mut payload = header.to_bytes().to_vec();
        payload.extend_from_slice(&data);
        let mut expected = Vec::new();
        codec
            .encode(FrameKind::KvBlock, &payload, &mut expected)
            .unwrap();
        let prefix = kv_block_frame_prefix(&codec, &header, &data).unwrap();
        let mut actual = prefix.to_vec();
        actual.extend_from_slice(&data);
        assert_eq!(actual, expected);
        let small = FrameCodec::new(100);
        assert!(matches!(
            kv_block_frame_prefix(&small, &header, &data),
            Err(FrameError::Oversized { .. })
        ));
    }

    #[test]
    fn block_checksum_detects_a_flipped_byte() {
        let mut data = vec![1u8; 64];
        let header = KvBlockHeader::for_block(0, SequenceHash(1), &data);
        assert!(header.verify(&data));
        data[10] ^= 1;
        assert!(!header.verify(&data));
    }

    /// One row per way a message can be bad, with the field the error must name.
    #[test]
    fn invalid_messages_are_refused_naming_the_field() {
        let json_frame = |kind: FrameKind, value: serde_json::Value| {
            let mut out = Vec::new();
            FrameCodec::default()
                .encode(kind, &serde_json::to_vec(&value).unwrap(), &mut out)
                .unwrap();
            out
        };
        let request = serde_json::to_value(request()).unwrap();
        let with = |mut value: serde_json::Value, key: &str, new: serde_json::Value| {
            value[key] = new;
            value
        };
        let handshake = serde_json::to_value(KvHandshake {
            request_id: "r".into(),
            layout: layout(),
        })
        .unwrap();
        let mut huge_layout = handshake.clone();
        huge_layout["layout"]["layers"] = u32::MAX.into();
        huge_layout["layout"]["kv_heads"] = u32::MAX.into();
        huge_layout["layout"]["head_dim"] = u32::MAX.into();
        let mut zero_layout = handshake.clone();
        zero_layout["layout"]["kv_heads"] = 0.into();
        let cases: Vec<(&str, FrameKind, serde_json::Value, &str)> = vec![
            (
                "empty request id",
                FrameKind::Request,
                with(request.clone(), "request_id", "".into()),
                "request_id",
            ),
            (
                "long model",
                FrameKind::Request,
                with(request.clone(), "model", "m".repeat(300).into()),
                "model",
            ),
            (
                "empty prompt",
                FrameKind::Request,
                with(request.clone(), "prompt", serde_json::json!([])),
                "prompt",
            ),
            (
                "more hashes than tokens",
                FrameKind::Request,
                with(
                    request.clone(),
                    "block_hashes",
                    serde_json::json!([1, 2, 3, 4, 5, 6]),
                ),
                "block_hashes",
            ),
            (
                "bad sampling",
                FrameKind::Request,
                with(
                    request.clone(),
                    "sampling",
                    serde_json::json!({"max_tokens": 0}),
                ),
                "sampling",
            ),
            (
                "a 49-day prefill deadline",
                FrameKind::Request,
                with(
                    request.clone(),
                    "prefill",
                    serde_json::json!({"worker": 1, "node": "00000000-0000-0000-0000-000000000001",
                        "addr": "n:7500", "timeout_ms": u32::MAX}),
                ),
                "prefill.timeout_ms",
            ),
            (
                "empty tokens",
                FrameKind::Token,
                serde_json::json!({"tokens": []}),
                "tokens",
            ),
            (
                "logprobs count",
                FrameKind::Token,
                serde_json::json!({"tokens": [1, 2], "logprobs": [{"token": 1, "logprob": -1.0}]}),
                "logprobs",
            ),
            (
                "positive logprob",
                FrameKind::Token,
                serde_json::json!({"tokens": [1], "logprobs": [{"token": 1, "logprob": 1.5}]}),
                "logprobs",
            ),
            (
                "overflowing layout",
                FrameKind::KvLayout,
                huge_layout,
                "layout",
            ),
            ("zero kv heads", FrameKind::KvLayout, zero_layout, "layout"),
        ];
        for (name, kind, value, field) in cases {
            let bytes = json_frame(kind, value);
            let frame = FrameCodec::default().decode_exact(&bytes).unwrap();
            match PeerMessage::decode(frame) {
                Err(PeerWireError::Invalid { field: got, .. }) => {
                    assert_eq!(got, field, "case {name}")
                }
                other => panic!("case {name}: expected an invalid {field}, got {other:?}"),
            }
        }
    }

    #[test]
    fn wrong_shapes_and_kinds_are_typed_errors() {
        let codec = FrameCodec::default();
        let frame = |kind, payload: &[u8]| {
            codec.encode_frame(&crate::frame::Frame {
                kind,
                payload: payload.to_vec(),
            })
        };
        let cases: Vec<(FrameKind, &[u8])> = vec![
            (FrameKind::Request, b"{not json"),
            (FrameKind::Finish, br#"{"reason": "sideways", "usage": {}}"#),
            (
                FrameKind::KvDone,
                br#"{"blocks": 1, "bytes": 2, "extra": 3}"#,
            ),
            (FrameKind::KvBlock, &[0u8; 10]),
            (FrameKind::Ping, b""),
        ];
        for (kind, payload) in cases {
            let bytes = frame(kind, payload).unwrap();
            let decoded = codec.decode_exact(&bytes).unwrap();
            assert!(
                PeerMessage::decode(decoded).is_err(),
                "{kind:?} {payload:?}"
            );
        }
        let mut block = KvBlockHeader::for_block(0, SequenceHash(0), b"").to_bytes();
        block[5] = 1;
        let bytes = frame(FrameKind::KvBlock, &block).unwrap();
        assert!(matches!(
            PeerMessage::decode(codec.decode_exact(&bytes).unwrap()),
            Err(PeerWireError::Invalid {
                field: "reserved",
                ..
            })
        ));
    }

    #[test]
    fn error_messages_are_truncated_on_a_char_boundary() {
        let long = "é".repeat(MAX_MESSAGE_LEN);
        let error = ErrorMessage::new(ErrorCode::Internal, long);
        assert!(error.message.len() <= MAX_MESSAGE_LEN);
        round_trip(&PeerMessage::Error(error));
    }

    proptest! {
        /// Arbitrary payloads under every kind never panic the decoder, and whatever decodes
        /// re-encodes to a frame that decodes to the same message.
        #[test]
        fn arbitrary_payloads_never_panic(
            kind in prop::sample::select(FrameKind::ALL.to_vec()),
            payload in prop::collection::vec(any::<u8>(), 0..512),
        ) {
            let codec = FrameCodec::default();
            let bytes = codec.encode_frame(&crate::frame::Frame { kind, payload }).unwrap();
            let frame = codec.decode_exact(&bytes).unwrap();
            if let Ok(message) = PeerMessage::decode(frame) {
                let again = message.to_frame_bytes(&codec).unwrap();
                let frame = codec.decode_exact(&again).unwrap();
                prop_assert_eq!(PeerMessage::decode(frame).unwrap(), message);
            }
        }

        /// Block frames round-trip for any index, hash and bytes.
        #[test]
        fn block_frames_round_trip(
            index in any::<u32>(),
            hash in any::<u64>(),
            data in prop::collection::vec(any::<u8>(), 0..4096),
        ) {
            let header = KvBlockHeader::for_block(index, SequenceHash(hash), &data);
            let message = PeerMessage::KvBlock { header, data: &data };
            let codec = FrameCodec::default();
            let bytes = message.to_frame_bytes(&codec).unwrap();
            let frame = codec.decode_exact(&bytes).unwrap();
            let decoded = PeerMessage::decode(frame).unwrap();
            prop_assert_eq!(decoded, message);
        }
    }
}
