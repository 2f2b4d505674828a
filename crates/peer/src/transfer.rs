//! KV block transfer between workers on different nodes (disaggregated prefill → decode).
//!
//! ```text
//! sender (prefill node)                              receiver (decode node)
//!   on each of N streams (PeerConnection::send_blocks):
//!   ── KvLayout(KvHandshake{request_id, layout}) ──▶  BlockSink::expect(request_id)
//!                                                    unknown request / layout differs → Error
//!   ◀─ KvLayout(echo) = accepted
//!   ── KvBlock(header ‖ bytes) ... ────────────────▶  size and checksum checked,
//!                                                    BlockSink::import (awaited: backpressure)
//!   ── KvDone{blocks, bytes} ──────────────────────▶  counts checked, BlockSink::stream_finished
//!   ◀─ KvDone receipt | Error
//! ```
//!
//! The sender takes an async stream of blocks and pulls the next block only when one of its
//! stream writers is free, so blocks are sent as prefill produces them and never queued beyond
//! one per stream. Each writer waits on QUIC flow control; the receiver reads a stream's next
//! frame only after importing the previous block. So a slow receiver stalls the sender within
//! the configured windows: in flight per connection at most `connection_window` on the receiving
//! side plus `send_window` on the sending side, plus one block per stream at each end.
//!
//! Every refusal is an Error frame with its [`ErrorCode`] (the sender gets
//! [`PeerError::Remote`]), counted on both sides and logged once on the receiver with the
//! peer's node id; the receiving endpoint keeps serving. A receiver waits at most
//! `PeerConfig::stall_timeout` for each frame, so a sender that stops mid-transfer holds its
//! stream (and what the sink buffered for it) no longer than that.

use std::future::Future;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use kvfleet_proto::frame::{FrameError, FrameKind};
use kvfleet_proto::peer::{
    ErrorCode, ErrorMessage, GenerateRequest, KV_BLOCK_HEADER_LEN, KvBlockHeader, KvDone,
    KvHandshake, PeerMessage, kv_block_frame_prefix,
};
use kvfleet_proto::{KvLayout, SequenceHash};
use quinn::{RecvStream, SendStream};
use tokio::sync::Mutex;

use crate::endpoint::{PeerConnection, Shared, refuse};
use crate::error::PeerError;
use crate::generate::{EventStream, GenerateHandler};
use crate::metrics::{ErrorKind, add};
use crate::tls::PeerInfo;
use crate::wire::{self, ReadFailure, codes};

/// One KV block: where it sits in the prompt, its sequence hash, and its bytes (K and V of every
/// layer, laid out as the [`KvLayout`] says; exactly `layout.block_bytes()` long).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvBlock {
    /// Position in the request's prompt (0 = first block).
    pub index: u32,
    /// The block's sequence hash.
    pub hash: SequenceHash,
    /// The block's bytes.
    pub data: Bytes,
}

/// What the receiving agent implements to import blocks into its pool.
pub trait BlockSink: Send + Sync + 'static {
    /// The layout this node stores for `request_id`'s model, or `None` when it expects no
    /// transfer for that request (the stream is refused as [`ErrorCode::UnknownRequest`]).
    /// Called once per stream; a transfer uses several streams.
    fn expect(&self, peer: &PeerInfo, request_id: &str) -> Option<KvLayout>;

    /// Imports one block whose size and checksum were verified. The stream reads no further
    /// until this returns: a slow import slows the sender, it does not grow a queue. An `Err`
    /// refuses the rest of the stream with that message; its code says how it is counted:
    /// [`ErrorCode::HashMismatch`] as `hash_mismatch`, [`ErrorCode::Overloaded`] (a per-peer
    /// budget) as `peer_limit`, any other as `import_failed`.
    fn import(
        &self,
        request_id: &str,
        block: KvBlock,
    ) -> impl Future<Output = Result<(), ErrorMessage>> + Send;

    /// One stream of `request_id` ended: `Ok` with what it carried when complete, `Err` when it
    /// failed or was cancelled (free or distrust what it imported).
    fn stream_finished(&self, request_id: &str, outcome: Result<KvDone, ErrorMessage>);

    /// `peer`'s certificate was revoked and its connections here closed (their streams
    /// aborted, so `stream_finished` is not called for them): forget what it delivered and
    /// still buffers, so nothing a revoked node supplied is used after its revocation.
    fn peer_revoked(&self, peer: &PeerInfo) {
        let _ = peer;
    }
}

/// A handler and sink that refuse everything: for a node without workers of that role.
#[derive(Debug, Clone, Copy, Default)]
pub struct RefuseAll;

impl BlockSink for RefuseAll {
    fn expect(&self, _: &PeerInfo, _: &str) -> Option<KvLayout> {
        None
    }

    async fn import(&self, _: &str, _: KvBlock) -> Result<(), ErrorMessage> {
        Err(ErrorMessage::new(
            ErrorCode::UnknownRequest,
            "this node takes no KV transfers",
        ))
    }

    fn stream_finished(&self, _: &str, _: Result<KvDone, ErrorMessage>) {}
}

impl GenerateHandler for RefuseAll {
    async fn generate(
        &self,
        _: &PeerInfo,
        _: GenerateRequest,
    ) -> Result<EventStream, ErrorMessage> {
        Err(ErrorMessage::new(
            ErrorCode::Unavailable,
            "this node serves no forwarded requests",
        ))
    }
}

/// How a transfer is sent.
#[derive(Debug, Clone)]
pub struct TransferOptions {
    /// Parallel QUIC streams (at least 1). More streams keep the link busy while one waits
    /// for the receiver; 4 is plenty on loopback and a 100 Gb/s link alike.
    pub streams: usize,
}

impl Default for TransferOptions {
    fn default() -> Self {
        Self { streams: 4 }
    }
}

/// What a completed transfer moved.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TransferReport {
    /// Blocks acknowledged by the receiver.
    pub blocks: u64,
    /// Block bytes acknowledged (headers excluded).
    pub bytes: u64,
    /// Streams used.
    pub streams: usize,
    /// From the first stream opened to the last receipt.
    pub elapsed: Duration,
}

impl TransferReport {
    /// Throughput in GB/s (10^9 bytes per second).
    pub fn gigabytes_per_second(&self) -> f64 {
        self.bytes as f64 / self.elapsed.as_secs_f64().max(1e-9) / 1e9
    }
}

/// The error kind under which a refusal with this code is counted.
fn kind_of(code: ErrorCode) -> ErrorKind {
    match code {
        ErrorCode::LayoutMismatch => ErrorKind::LayoutMismatch,
        ErrorCode::BlockSizeMismatch => ErrorKind::BlockSizeMismatch,
        ErrorCode::ChecksumMismatch => ErrorKind::ChecksumMismatch,
        ErrorCode::Truncated => ErrorKind::Truncated,
        ErrorCode::UnknownRequest => ErrorKind::UnknownRequest,
        ErrorCode::ImportFailed => ErrorKind::ImportFailed,
        ErrorCode::Malformed => ErrorKind::Malformed,
        ErrorCode::BadRequest => ErrorKind::BadRequest,
        ErrorCode::Cancelled => ErrorKind::Stream,
        ErrorCode::HashMismatch => ErrorKind::HashMismatch,
        ErrorCode::UnknownModel
        | ErrorCode::Overloaded
        | ErrorCode::Unavailable
        | ErrorCode::Internal => ErrorKind::Handler,
    }
}

/// Resets and stops both halves unless the stream completed.
struct StreamGuard {
    send: SendStream,
    recv: RecvStream,
    done: bool,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.send.reset(codes::CANCELLED);
            let _ = self.recv.stop(codes::CANCELLED);
        }
    }
}

impl PeerConnection {
    /// Sends the KV blocks of `request_id` to this peer, on `options.streams` parallel streams,
    /// pulling from `blocks` as writers free up (so a producer that yields blocks as prefill
    /// completes them overlaps transfer with compute). Returns when the receiver has
    /// acknowledged every stream. Dropping the future aborts the transfer (streams reset; the
    /// receiver's sink sees the failure).
    pub async fn send_blocks<S>(
        &self,
        request_id: &str,
        layout: &KvLayout,
        blocks: S,
        options: &TransferOptions,
    ) -> Result<TransferReport, PeerError>
    where
        S: Stream<Item = KvBlock> + Send + Unpin,
    {
        let start = Instant::now();
        let handshake = KvHandshake {
            request_id: request_id.to_owned(),
            layout: layout.clone(),
        };
        let hello =
            PeerMessage::KvHandshake(handshake.clone()).to_frame_bytes(&self.shared.kv_codec)?;
        let block_bytes = layout
            .checked_block_bytes()
            .ok_or_else(|| PeerError::Identity("the KV layout has no valid block size".into()))?;
        // Several writers pull from it, and each one asks again after another saw the end.
        let source = Mutex::new(blocks.fuse());
        let streams = options.streams.max(1);
        // Every stream is accepted before any block is pulled: a refusal costs the producer
        // nothing, and no early stream takes every block while the others are handshaking.
        let opened = futures_util::future::try_join_all(
            (0..streams).map(|_| self.open_transfer_stream(&hello, &handshake)),
        )
        .await;
        let result = match opened {
            Ok(opened) => {
                let writers = opened
                    .into_iter()
                    .map(|stream| self.send_stream(stream, block_bytes, &source));
                futures_util::future::try_join_all(writers).await
            }
            Err(error) => Err(error),
        };
        let done = match result {
            Ok(done) => done,
            Err(error) => {
                if let PeerError::Remote(message) = &error {
                    self.shared.metrics.count_error(kind_of(message.code));
                }
                return Err(error);
            }
        };
        let elapsed = start.elapsed();
        let metrics = &self.shared.metrics;
        add(&metrics.kv_transfers_sent, 1);
        add(
            &metrics.kv_send_micros,
            u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX),
        );
        Ok(TransferReport {
            blocks: done.iter().map(|d| d.blocks).sum(),
            bytes: done.iter().map(|d| d.bytes).sum(),
            streams,
            elapsed,
        })
    }

    /// Opens one transfer stream and completes its handshake.
    async fn open_transfer_stream(
        &self,
        hello: &[u8],
        handshake: &KvHandshake,
    ) -> Result<StreamGuard, PeerError> {
        let (send, recv) = self
            .connection
            .open_bi()
            .await
            .map_err(|e| self.connection_error(e))?;
        let mut stream = StreamGuard {
            send,
            recv,
            done: false,
        };
        if let Err(error) = stream.send.write_all(hello).await {
            return Err(self.after_write_error(&mut stream.recv, error).await);
        }
        match self
            .read_answer(&mut stream.recv, "the KV handshake answer")
            .await?
        {
            PeerMessage::KvHandshake(echo) if echo == *handshake => {}
            other => return Err(unexpected(&other, "KvLayout echo")),
        }
        Ok(stream)
    }

    /// Sends blocks on one accepted stream until the source is exhausted, then waits for the
    /// receipt.
    async fn send_stream<S>(
        &self,
        mut stream: StreamGuard,
        block_bytes: u64,
        source: &Mutex<S>,
    ) -> Result<KvDone, PeerError>
    where
        S: Stream<Item = KvBlock> + Send + Unpin,
    {
        let codec = self.shared.kv_codec;
        let metrics = &self.shared.metrics;
        let mut sent = KvDone::default();
        loop {
            // Hold the lock while waiting for the producer: writers take blocks in order, and
            // only a writer that is ready to send takes one.
            let next = source.lock().await.next().await;
            let Some(block) = next else { break };
            let len = block.data.len() as u64;
            if len != block_bytes {
                return Err(PeerError::BlockSize {
                    index: block.index,
                    expected: block_bytes,
                    actual: len,
                });
            }
            let header = KvBlockHeader::for_block(block.index, block.hash, &block.data);
            let prefix = kv_block_frame_prefix(&codec, &header, &block.data)
                .map_err(|e| PeerError::Protocol(e.into()))?;
            let mut chunks = [Bytes::copy_from_slice(&prefix), block.data];
            if let Err(error) = stream.send.write_all_chunks(&mut chunks).await {
                return Err(self.after_write_error(&mut stream.recv, error).await);
            }
            sent.blocks += 1;
            sent.bytes += len;
            add(&metrics.kv_blocks_sent, 1);
            add(&metrics.kv_bytes_sent, len);
            // Writes that never wait (a fast receiver) would let this writer take every block;
            // yielding lets the other streams (polled by the same join) take their turn.
            tokio::task::yield_now().await;
        }
        let done = PeerMessage::KvDone(sent).to_frame_bytes(&codec)?;
        if let Err(error) = stream.send.write_all(&done).await {
            return Err(self.after_write_error(&mut stream.recv, error).await);
        }
        let _ = stream.send.finish();
        match self
            .read_answer(&mut stream.recv, "the KV transfer receipt")
            .await?
        {
            PeerMessage::KvDone(receipt) if receipt == sent => {}
            PeerMessage::KvDone(receipt) => {
                return Err(PeerError::Truncated(format!(
                    "the receiver acknowledged {} blocks ({} bytes), {} ({} bytes) were sent",
                    receipt.blocks, receipt.bytes, sent.blocks, sent.bytes
                )));
            }
            other => return Err(unexpected(&other, "KvDone receipt")),
        }
        stream.done = true;
        Ok(sent)
    }

    /// Reads the receiver's next frame: an Error frame becomes [`PeerError::Remote`].
    async fn read_answer(
        &self,
        recv: &mut RecvStream,
        what: &'static str,
    ) -> Result<PeerMessage<'static>, PeerError> {
        let timeout = self.shared.config.ack_timeout;
        let read = tokio::time::timeout(timeout, wire::read_frame(recv, &self.shared.kv_codec))
            .await
            .map_err(|_| PeerError::Timeout(what))?;
        let (kind, payload) = match read {
            Ok(Some(frame)) => frame,
            Ok(None) => return Err(PeerError::Truncated(format!("stream ended before {what}"))),
            Err(ReadFailure::Frame(error)) => return Err(PeerError::Protocol(error.into())),
            Err(failure) => return Err(self.stream_failure(failure)),
        };
        // Answers are small JSON messages: decode, then own them.
        match wire::decode(kind, &payload)? {
            PeerMessage::Error(error) => Err(PeerError::Remote(error)),
            PeerMessage::KvHandshake(h) => Ok(PeerMessage::KvHandshake(h)),
            PeerMessage::KvDone(d) => Ok(PeerMessage::KvDone(d)),
            other => Err(unexpected(&other, what)),
        }
    }

    /// A write failed: if the receiver stopped the stream it sent an Error frame first; read it
    /// for the reason.
    async fn after_write_error(
        &self,
        recv: &mut RecvStream,
        error: quinn::WriteError,
    ) -> PeerError {
        match error {
            quinn::WriteError::Stopped(_) => {
                match self.read_answer(recv, "the receiver's error").await {
                    Err(error) => error,
                    Ok(_) => PeerError::Stream("the receiver stopped the stream".to_owned()),
                }
            }
            other => self.write_error(other),
        }
    }

    fn stream_failure(&self, failure: ReadFailure) -> PeerError {
        match self.connection.close_reason() {
            Some(reason) => self.connection_error(reason),
            None => PeerError::Stream(failure.to_string()),
        }
    }
}

fn unexpected(message: &PeerMessage<'_>, expected: &'static str) -> PeerError {
    PeerError::Protocol(
        FrameError::Unexpected {
            found: message.kind(),
            expected,
        }
        .into(),
    )
}

/// Receiver side of one KV stream, after its first frame.
pub(crate) async fn serve<S: BlockSink>(
    shared: &Shared,
    sink: &S,
    peer: &PeerInfo,
    payload: &[u8],
    mut send: SendStream,
    mut recv: RecvStream,
) {
    let metrics = &shared.metrics;
    let codec = &shared.kv_codec;
    let handshake = match wire::decode(FrameKind::KvLayout, payload) {
        Ok(PeerMessage::KvHandshake(handshake)) => handshake,
        Ok(_) => return,
        Err(error) => {
            metrics.count_error(ErrorKind::Malformed);
            tracing::warn!(node = %peer.node_id, %error, "KV transfer handshake refused");
            refuse(
                &mut send,
                &mut recv,
                codec,
                ErrorCode::Malformed,
                error.to_string(),
            )
            .await;
            return;
        }
    };
    let request_id = handshake.request_id.as_str();
    let Some(ours) = sink.expect(peer, request_id) else {
        metrics.count_error(ErrorKind::UnknownRequest);
        tracing::warn!(node = %peer.node_id, request_id, "KV transfer for an unknown request refused");
        let message = format!("no KV transfer is expected for request {request_id:?}");
        refuse(
            &mut send,
            &mut recv,
            codec,
            ErrorCode::UnknownRequest,
            message,
        )
        .await;
        return;
    };
    if let Some((field, mine, theirs)) = ours.mismatch(&handshake.layout) {
        metrics.count_error(ErrorKind::LayoutMismatch);
        let message = format!(
            "KV layout mismatch on {field}: this receiver stores {mine}, the sender {theirs}"
        );
        tracing::warn!(node = %peer.node_id, request_id, %message, "KV transfer refused");
        refuse(
            &mut send,
            &mut recv,
            codec,
            ErrorCode::LayoutMismatch,
            message.clone(),
        )
        .await;
        sink.stream_finished(
            request_id,
            Err(ErrorMessage::new(ErrorCode::LayoutMismatch, message)),
        );
        return;
    }
    // The handshake was validated on decode, so this is Some.
    let block_bytes = ours.checked_block_bytes().unwrap_or(0);
    let echo = PeerMessage::KvHandshake(handshake.clone());
    if let Err(failure) = wire::write_message(&mut send, codec, &echo).await {
        metrics.count_error(ErrorKind::Stream);
        sink.stream_finished(
            request_id,
            Err(ErrorMessage::new(ErrorCode::Cancelled, failure.to_string())),
        );
        return;
    }
    let outcome = receive_blocks(shared, sink, request_id, block_bytes, &mut recv).await;
    match outcome {
        Ok(received) => {
            sink.stream_finished(request_id, Ok(received));
            let _ = wire::write_message(&mut send, codec, &PeerMessage::KvDone(received)).await;
            let _ = send.finish();
            add(&metrics.kv_streams_received, 1);
        }
        Err((kind, message)) => {
            if let Some(kind) = kind {
                metrics.count_error(kind);
                tracing::warn!(node = %peer.node_id, request_id, %message, "KV transfer stream refused");
            }
            sink.stream_finished(request_id, Err(message.clone()));
            refuse(&mut send, &mut recv, codec, message.code, message.message).await;
        }
    }
}

/// Reads block frames until `KvDone`. An error says which counter it goes under (`None`: the
/// sender cancelled, not an error) and what to tell the sender.
async fn receive_blocks<S: BlockSink>(
    shared: &Shared,
    sink: &S,
    request_id: &str,
    block_bytes: u64,
    recv: &mut RecvStream,
) -> Result<KvDone, (Option<ErrorKind>, ErrorMessage)> {
    let metrics = &shared.metrics;
    let fail = |kind: ErrorKind, code: ErrorCode, message: String| {
        Err((Some(kind), ErrorMessage::new(code, message)))
    };
    let mut received = KvDone::default();
    let stall = shared.config.stall_timeout;
    loop {
        let Ok(read) = tokio::time::timeout(stall, wire::read_frame(recv, &shared.kv_codec)).await
        else {
            return fail(
                ErrorKind::Stalled,
                ErrorCode::Truncated,
                format!(
                    "stalled: no frame for {stall:?} after {} blocks",
                    received.blocks
                ),
            );
        };
        let (kind, payload) = match read {
            Ok(Some(frame)) => frame,
            Ok(None) => {
                return fail(
                    ErrorKind::Truncated,
                    ErrorCode::Truncated,
                    format!(
                        "the stream ended after {} blocks without KvDone",
                        received.blocks
                    ),
                );
            }
            Err(ReadFailure::Frame(FrameError::Truncated { have, need })) => {
                return fail(
                    ErrorKind::Truncated,
                    ErrorCode::Truncated,
                    format!(
                        "the stream ended inside a frame ({have} of {need} bytes) after {} blocks",
                        received.blocks
                    ),
                );
            }
            Err(ReadFailure::Frame(error)) => {
                return fail(
                    ErrorKind::Malformed,
                    ErrorCode::Malformed,
                    error.to_string(),
                );
            }
            Err(ReadFailure::Reset(code)) if code == codes::CANCELLED => {
                return Err((
                    None,
                    ErrorMessage::new(ErrorCode::Cancelled, "the sender cancelled the transfer"),
                ));
            }
            Err(failure) => {
                return fail(ErrorKind::Stream, ErrorCode::Cancelled, failure.to_string());
            }
        };
        match kind {
            FrameKind::KvBlock => {
                let header = match KvBlockHeader::parse(&payload) {
                    Ok((header, _)) => header,
                    Err(error) => {
                        return fail(
                            ErrorKind::Malformed,
                            ErrorCode::Malformed,
                            error.to_string(),
                        );
                    }
                };
                let data = payload.slice(KV_BLOCK_HEADER_LEN..);
                let len = data.len() as u64;
                if len != block_bytes {
                    return fail(
                        ErrorKind::BlockSizeMismatch,
                        ErrorCode::BlockSizeMismatch,
                        format!(
                            "block {} has {len} bytes, the layout's blocks have {block_bytes}",
                            header.index
                        ),
                    );
                }
                if !header.verify(&data) {
                    return fail(
                        ErrorKind::ChecksumMismatch,
                        ErrorCode::ChecksumMismatch,
                        format!(
                            "block {} (hash {:#018x}) does not match its checksum",
                            header.index, header.hash.0
                        ),
                    );
                }
                let block = KvBlock {
                    index: header.index,
                    hash: header.hash,
                    data,
                };
                if let Err(error) = sink.import(request_id, block).await {
                    let (code, kind) = match error.code {
                        ErrorCode::HashMismatch => (error.code, ErrorKind::HashMismatch),
                        ErrorCode::Overloaded => (error.code, ErrorKind::PeerLimit),
                        _ => (ErrorCode::ImportFailed, ErrorKind::ImportFailed),
                    };
                    return Err((Some(kind), ErrorMessage::new(code, error.message)));
                }
                received.blocks += 1;
                received.bytes += len;
                add(&metrics.kv_blocks_received, 1);
                add(&metrics.kv_bytes_received, len);
            }
            FrameKind::KvDone => {
                let sent = match wire::decode(kind, &payload) {
                    Ok(PeerMessage::KvDone(sent)) => sent,
                    Ok(_) | Err(_) => {
                        return fail(
                            ErrorKind::Malformed,
                            ErrorCode::Malformed,
                            "bad KvDone".into(),
                        );
                    }
                };
                if sent != received {
                    return fail(
                        ErrorKind::Truncated,
                        ErrorCode::Truncated,
                        format!(
                            "the sender says {} blocks ({} bytes), {} ({} bytes) arrived",
                            sent.blocks, sent.bytes, received.blocks, received.bytes
                        ),
                    );
                }
                return Ok(received);
            }
            other => {
                return fail(
                    ErrorKind::Malformed,
                    ErrorCode::Malformed,
                    format!("unexpected {other:?} frame in a KV transfer"),
                );
            }
        }
    }
}
