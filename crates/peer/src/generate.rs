//! Forwarded generate requests: one bidirectional stream per request.
//!
//! ```text
//! client (routing node)                         server (node with the worker)
//!   ── Request(GenerateRequest) ──────────────▶  GenerateHandler::generate
//!   ◀─ Token(TokenChunk) ... ◀─ Finish(Finish) | Error(ErrorMessage)
//! ```
//!
//! Cancellation crosses the hop: dropping a [`GenerateStream`] before its end resets our send
//! side and stops our receive side; the server sees the reset (or the stop, when it next writes),
//! drops the handler's event stream, which is how the handler learns to free the sequence, and
//! counts `generate_cancelled`. A handler failure reaches the client as
//! [`PeerError::Remote`] with the handler's [`ErrorCode`].

use std::future::Future;
use std::sync::Arc;

use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use kvfleet_proto::frame::FrameKind;
use kvfleet_proto::peer::{
    CancelMessage, ErrorCode, ErrorMessage, Finish, GenerateRequest, PeerMessage, TokenChunk,
};
use quinn::{RecvStream, SendStream};

use crate::endpoint::{PeerConnection, Shared, refuse};
use crate::error::PeerError;
use crate::metrics::{ErrorKind, add};
use crate::tls::PeerInfo;
use crate::wire::{self, ReadFailure, WriteFailure, codes};

/// What a generation produces, in order: any number of `Tokens`, then one `Finished`.
#[derive(Debug, Clone, PartialEq)]
pub enum GenerateEvent {
    /// Newly generated tokens (and their logprobs when asked for).
    Tokens(TokenChunk),
    /// The end: why, and the token counts.
    Finished(Finish),
}

/// The handler's events. A failure mid-way is an `Err` item and ends the stream. Dropping the
/// stream is the cancellation: the handler must free the sequence when that happens.
pub type EventStream = BoxStream<'static, Result<GenerateEvent, ErrorMessage>>;

/// What the agent implements to serve requests forwarded by peers.
pub trait GenerateHandler: Send + Sync + 'static {
    /// Starts generating for `request` from `peer`. An `Err` refuses it (e.g.
    /// [`ErrorCode::UnknownModel`], [`ErrorCode::Overloaded`]); the client gets the code.
    fn generate(
        &self,
        peer: &PeerInfo,
        request: GenerateRequest,
    ) -> impl Future<Output = Result<EventStream, ErrorMessage>> + Send;
}

/// How the server's watch on the client's half of the stream ended.
enum ClientSide {
    /// Cancel frame, reset, or connection lost: stop generating.
    Cancelled(String),
    /// The client broke the protocol.
    Malformed(String),
}

/// Reads the client's half after the request: only a Cancel frame (or nothing) may follow.
/// Pends forever when the client finished its half cleanly, since that does not cancel.
async fn watch_client(mut recv: RecvStream, shared: &Shared) -> ClientSide {
    match wire::read_frame(&mut recv, &shared.generate_codec).await {
        Ok(Some((FrameKind::Cancel, payload))) => {
            let reason = match wire::decode(FrameKind::Cancel, &payload) {
                Ok(PeerMessage::Cancel(CancelMessage { reason })) => reason,
                _ => String::new(),
            };
            ClientSide::Cancelled(format!("cancel frame: {reason}"))
        }
        Ok(Some((kind, _))) => {
            ClientSide::Malformed(format!("unexpected {kind:?} frame after the request"))
        }
        Ok(None) => std::future::pending().await,
        Err(ReadFailure::Frame(error)) => ClientSide::Malformed(error.to_string()),
        Err(failure) => ClientSide::Cancelled(failure.to_string()),
    }
}

/// Server side of one generate stream, after its first frame.
pub(crate) async fn serve<G: GenerateHandler>(
    shared: &Shared,
    handler: &G,
    peer: &PeerInfo,
    payload: &[u8],
    mut send: SendStream,
    mut recv: RecvStream,
) {
    let metrics = &shared.metrics;
    let codec = &shared.generate_codec;
    let request = match wire::decode(FrameKind::Request, payload) {
        Ok(PeerMessage::Generate(request)) => request,
        Ok(_) | Err(_) => {
            let reason = match wire::decode(FrameKind::Request, payload) {
                Err(e) => e.to_string(),
                Ok(_) => "not a generate request".to_owned(),
            };
            metrics.count_error(ErrorKind::BadRequest);
            tracing::warn!(node = %peer.node_id, %reason, "bad forwarded request refused");
            refuse(&mut send, &mut recv, codec, ErrorCode::BadRequest, reason).await;
            return;
        }
    };
    add(&metrics.generate_served, 1);
    let request_id = request.request_id.clone();
    let client = watch_client(recv, shared);
    tokio::pin!(client);
    let stopped = send.stopped();
    tokio::pin!(stopped);

    let started = tokio::select! {
        started = handler.generate(peer, request) => started,
        side = &mut client => {
            finish_cancelled(shared, &mut send, &request_id, side);
            return;
        }
    };
    let mut events = match started {
        Ok(events) => events,
        Err(error) => {
            metrics.count_error(ErrorKind::Handler);
            let _ = wire::write_message(&mut send, codec, &PeerMessage::Error(error)).await;
            let _ = send.finish();
            return;
        }
    };
    loop {
        let event = tokio::select! {
            biased;
            side = &mut client => {
                drop(events);
                finish_cancelled(shared, &mut send, &request_id, side);
                return;
            }
            _ = &mut stopped => {
                drop(events);
                finish_cancelled(shared, &mut send, &request_id,
                    ClientSide::Cancelled("client stopped reading".to_owned()));
                return;
            }
            event = events.next() => event,
        };
        let (message, last) = match event {
            Some(Ok(GenerateEvent::Tokens(chunk))) => (PeerMessage::Tokens(chunk), false),
            Some(Ok(GenerateEvent::Finished(finish))) => (PeerMessage::Finish(finish), true),
            Some(Err(error)) => {
                metrics.count_error(ErrorKind::Handler);
                (PeerMessage::Error(error), true)
            }
            None => {
                metrics.count_error(ErrorKind::Handler);
                let error = ErrorMessage::new(
                    ErrorCode::Internal,
                    "the worker's event stream ended without a finish",
                );
                (PeerMessage::Error(error), true)
            }
        };
        match wire::write_message(&mut send, codec, &message).await {
            Ok(()) => {}
            Err(WriteFailure::Encode(error)) => {
                // The handler produced something the protocol cannot carry (empty chunk, NaN
                // logprob): a bug on this node, reported to the client as internal.
                metrics.count_error(ErrorKind::Handler);
                let error = ErrorMessage::new(ErrorCode::Internal, error.to_string());
                let _ = wire::write_message(&mut send, codec, &PeerMessage::Error(error)).await;
                let _ = send.finish();
                return;
            }
            Err(failure) => {
                drop(events);
                finish_cancelled(
                    shared,
                    &mut send,
                    &request_id,
                    ClientSide::Cancelled(failure.to_string()),
                );
                return;
            }
        }
        if last {
            let _ = send.finish();
            return;
        }
    }
}

fn finish_cancelled(shared: &Shared, send: &mut SendStream, request_id: &str, side: ClientSide) {
    match side {
        ClientSide::Cancelled(reason) => {
            add(&shared.metrics.generate_cancelled, 1);
            tracing::info!(request_id, %reason, "forwarded request cancelled by the peer");
            let _ = send.reset(codes::CANCELLED);
        }
        ClientSide::Malformed(reason) => {
            shared.metrics.count_error(ErrorKind::Malformed);
            tracing::warn!(request_id, %reason, "malformed frame on a generate stream");
            let _ = send.reset(codes::PROTOCOL);
        }
    }
}

impl PeerConnection {
    /// Forwards a generate request: opens a stream, sends the request, returns the stream of
    /// events. Errors here are local (invalid request) or the link; the peer's refusal arrives
    /// as the first [`GenerateStream::next`] result.
    pub async fn generate(&self, request: &GenerateRequest) -> Result<GenerateStream, PeerError> {
        let codec = self.shared.generate_codec;
        let bytes = PeerMessage::Generate(request.clone()).to_frame_bytes(&codec)?;
        let (send, recv) = self
            .connection
            .open_bi()
            .await
            .map_err(|e| self.connection_error(e))?;
        let mut stream = GenerateStream {
            send,
            recv,
            connection: self.clone(),
            done: false,
        };
        // `stream` owns both halves now: on error below, its Drop resets them.
        send_first(&mut stream.send, &bytes)
            .await
            .map_err(|e| self.write_error(e))?;
        add(&self.shared.metrics.generate_forwarded, 1);
        Ok(stream)
    }

    pub(crate) fn write_error(&self, error: quinn::WriteError) -> PeerError {
        match error {
            quinn::WriteError::ConnectionLost(e) => self.connection_error(e),
            other => PeerError::Stream(other.to_string()),
        }
    }
}

async fn send_first(send: &mut SendStream, bytes: &[u8]) -> Result<(), quinn::WriteError> {
    send.write_all(bytes).await
}

/// The client's view of one forwarded request. Dropping it before the end cancels the request
/// on the serving node.
#[derive(Debug)]
pub struct GenerateStream {
    send: SendStream,
    recv: RecvStream,
    connection: PeerConnection,
    done: bool,
}

impl GenerateStream {
    /// The next event: `Ok(Some(Tokens))` any number of times, then `Ok(Some(Finished))`, then
    /// `Ok(None)`. A refusal or failure on the serving node is [`PeerError::Remote`] with its
    /// code; anything else means the link or the peer broke the protocol.
    pub async fn next(&mut self) -> Result<Option<GenerateEvent>, PeerError> {
        if self.done {
            return Ok(None);
        }
        let codec = self.connection.shared.generate_codec;
        let result = match wire::read_frame(&mut self.recv, &codec).await {
            Ok(Some((kind, payload))) => match wire::decode(kind, &payload) {
                Ok(PeerMessage::Tokens(chunk)) => return Ok(Some(GenerateEvent::Tokens(chunk))),
                Ok(PeerMessage::Finish(finish)) => Ok(Some(GenerateEvent::Finished(finish))),
                Ok(PeerMessage::Error(error)) => Err(PeerError::Remote(error)),
                Ok(other) => Err(PeerError::Protocol(
                    kvfleet_proto::FrameError::Unexpected {
                        found: other.kind(),
                        expected: "Token, Finish or Error",
                    }
                    .into(),
                )),
                Err(error) => Err(PeerError::Protocol(error)),
            },
            Ok(None) => Err(PeerError::Truncated(
                "the serving node closed the stream before the finish".to_owned(),
            )),
            Err(ReadFailure::Frame(error)) => Err(PeerError::Protocol(error.into())),
            Err(ReadFailure::Reset(code)) if code == codes::CANCELLED => {
                Err(PeerError::Remote(ErrorMessage::new(
                    ErrorCode::Cancelled,
                    "the serving node cancelled the request",
                )))
            }
            Err(failure) => match self.connection.connection.close_reason() {
                Some(reason) => Err(self.connection.connection_error(reason)),
                None => Err(PeerError::Stream(failure.to_string())),
            },
        };
        if let Err(PeerError::Protocol(_)) = &result {
            self.connection
                .shared
                .metrics
                .count_error(ErrorKind::Malformed);
        }
        self.done = true;
        let _ = self.send.finish();
        result
    }

    /// Cancels the request now, telling the serving node why (dropping does the same without a
    /// reason).
    pub async fn cancel(mut self, reason: &str) {
        if self.done {
            return;
        }
        let cancel = PeerMessage::Cancel(CancelMessage {
            reason: reason
                .chars()
                .take(kvfleet_proto::peer::MAX_MESSAGE_LEN / 4)
                .collect(),
        });
        let codec = self.connection.shared.generate_codec;
        if wire::write_message(&mut self.send, &codec, &cancel)
            .await
            .is_ok()
        {
            // Finish rather than reset, so that the Cancel frame (and its reason) arrives.
            self.done = true;
            let _ = self.send.finish();
            let _ = self.recv.stop(codes::CANCELLED);
        }
        // Otherwise Drop resets both halves.
    }

    /// The node serving the request.
    pub fn peer(&self) -> &PeerInfo {
        self.connection.peer()
    }
}

impl Drop for GenerateStream {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.send.reset(codes::CANCELLED);
            let _ = self.recv.stop(codes::CANCELLED);
        }
    }
}

/// An [`EventStream`] from a plain list, for tests and simple handlers.
pub fn events_from(events: Vec<Result<GenerateEvent, ErrorMessage>>) -> EventStream {
    futures_util::stream::iter(events).boxed()
}

/// Keeps `Arc<H>` usable as a handler.
impl<H: GenerateHandler> GenerateHandler for Arc<H> {
    fn generate(
        &self,
        peer: &PeerInfo,
        request: GenerateRequest,
    ) -> impl Future<Output = Result<EventStream, ErrorMessage>> + Send {
        (**self).generate(peer, request)
    }
}
