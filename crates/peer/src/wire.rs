//! Frames on quinn streams: read one frame (bounded, validated as soon as its header is in),
//! write one message.
//!
//! Not `FrameReader`: a KV block frame is 2 MiB, and reading it into a buffer of exactly its
//! size and handing out `Bytes` slices of that buffer saves two copies per block against
//! pushing chunks through a reassembly buffer. The validation is the codec's own
//! (`FrameCodec::decode` on the header, `decode_exact` with the CRC on the whole frame).

use bytes::Bytes;
use kvfleet_proto::frame::{Decoded, FrameCodec, FrameError, FrameKind, HEADER_LEN};
use kvfleet_proto::peer::{PeerMessage, PeerWireError};
use quinn::{ReadError, RecvStream, SendStream, VarInt};

/// Application error codes on stream resets and stops.
pub(crate) mod codes {
    use quinn::VarInt;
    /// The requester gave up (client dropped its generate stream, sender aborted a transfer).
    pub(crate) const CANCELLED: VarInt = VarInt::from_u32(1);
    /// The peer broke the protocol; an Error frame, when it could be sent, says how.
    pub(crate) const PROTOCOL: VarInt = VarInt::from_u32(2);
    /// The request was refused; an Error frame says why.
    pub(crate) const REFUSED: VarInt = VarInt::from_u32(3);
    /// Connection closed because the endpoint shuts down.
    pub(crate) const SHUTDOWN: VarInt = VarInt::from_u32(4);
    /// Connection closed because the peer's certificate is not acceptable.
    pub(crate) const IDENTITY: VarInt = VarInt::from_u32(5);
}

/// Payload limit on generate streams: a long prompt's JSON fits many times over.
pub(crate) const GENERATE_MAX_PAYLOAD: u32 = 16 * 1024 * 1024;

/// Why reading a frame failed.
#[derive(Debug)]
pub(crate) enum ReadFailure {
    /// The bytes are not a valid frame (including a stream that ended inside one).
    Frame(FrameError),
    /// The peer reset the stream with this code.
    Reset(VarInt),
    /// The connection is gone, or the stream was closed locally.
    Lost(String),
}

impl From<ReadError> for ReadFailure {
    fn from(error: ReadError) -> Self {
        match error {
            ReadError::Reset(code) => ReadFailure::Reset(code),
            other => ReadFailure::Lost(other.to_string()),
        }
    }
}

/// Largest buffer allocated up front for a frame; a bigger one grows as its bytes arrive, so a
/// peer that announces 64 MiB and sends nothing costs nothing.
const INITIAL_CAPACITY: usize = 4 * 1024 * 1024;

/// Reads one frame. `Ok(None)` at a clean end of stream (between frames). The payload is a
/// slice of the frame's buffer. Not cancel-safe: abandon the stream if the future is dropped.
pub(crate) async fn read_frame(
    recv: &mut RecvStream,
    codec: &FrameCodec,
) -> Result<Option<(FrameKind, Bytes)>, ReadFailure> {
    let mut header = [0u8; HEADER_LEN];
    let mut filled = 0;
    while filled < HEADER_LEN {
        match recv.read(&mut header[filled..]).await? {
            None if filled == 0 => return Ok(None),
            None => {
                return Err(ReadFailure::Frame(FrameError::Truncated {
                    have: filled,
                    need: HEADER_LEN,
                }));
            }
            Some(n) => filled += n,
        }
        // Refuse garbage after its first bytes instead of after a whole header.
        codec
            .decode(&header[..filled])
            .map_err(ReadFailure::Frame)?;
    }
    let need = match codec.decode(&header).map_err(ReadFailure::Frame)? {
        Decoded::NeedMore { need } => need,
        Decoded::Frame { frame, .. } => return Ok(Some((frame.kind, Bytes::new()))),
    };
    let mut buf = Vec::with_capacity(need.min(INITIAL_CAPACITY));
    buf.extend_from_slice(&header);
    while buf.len() < need {
        match recv.read_chunk(need - buf.len(), true).await? {
            None => {
                return Err(ReadFailure::Frame(FrameError::Truncated {
                    have: buf.len(),
                    need,
                }));
            }
            Some(chunk) => {
                if buf.capacity() - buf.len() < chunk.bytes.len() {
                    buf.reserve_exact(need - buf.len());
                }
                buf.extend_from_slice(&chunk.bytes);
            }
        }
    }
    let kind = codec.decode_exact(&buf).map_err(ReadFailure::Frame)?.kind;
    Ok(Some((kind, Bytes::from(buf).slice(HEADER_LEN..))))
}

/// Decodes a frame read by [`read_frame`] as a peer message.
pub(crate) fn decode(kind: FrameKind, payload: &[u8]) -> Result<PeerMessage<'_>, PeerWireError> {
    PeerMessage::decode(kvfleet_proto::frame::FrameRef { kind, payload })
}

/// Why writing failed.
#[derive(Debug)]
pub(crate) enum WriteFailure {
    /// The message could not be encoded (a local bug, or an oversized message).
    Encode(PeerWireError),
    /// The peer stopped the stream with this code.
    Stopped(VarInt),
    /// The connection is gone or the stream closed.
    Lost(String),
}

impl From<quinn::WriteError> for WriteFailure {
    fn from(error: quinn::WriteError) -> Self {
        match error {
            quinn::WriteError::Stopped(code) => WriteFailure::Stopped(code),
            other => WriteFailure::Lost(other.to_string()),
        }
    }
}

impl std::fmt::Display for WriteFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WriteFailure::Encode(e) => write!(f, "encoding: {e}"),
            WriteFailure::Stopped(code) => write!(f, "peer stopped the stream (code {code})"),
            WriteFailure::Lost(e) => write!(f, "{e}"),
        }
    }
}

impl std::fmt::Display for ReadFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadFailure::Frame(e) => write!(f, "{e}"),
            ReadFailure::Reset(code) => write!(f, "peer reset the stream (code {code})"),
            ReadFailure::Lost(e) => write!(f, "{e}"),
        }
    }
}

/// Writes one message as one frame.
pub(crate) async fn write_message(
    send: &mut SendStream,
    codec: &FrameCodec,
    message: &PeerMessage<'_>,
) -> Result<(), WriteFailure> {
    let bytes = message
        .to_frame_bytes(codec)
        .map_err(WriteFailure::Encode)?;
    send.write_all(&bytes).await?;
    Ok(())
}
