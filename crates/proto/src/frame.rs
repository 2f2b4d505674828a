//! The peer frame codec: how agents, workers and peers cut a byte stream into messages.
//!
//! Every frame is a 12-byte header followed by a payload:
//!
//! ```text
//! offset  size  field
//!      0     2  magic, the bytes "KF"
//!      2     1  version (currently 1)
//!      3     1  kind (see FrameKind)
//!      4     4  payload length, u32 little-endian, at most the codec's max_payload
//!      8     4  CRC-32 (IEEE) of the payload, u32 little-endian
//!     12     n  payload
//! ```
//!
//! The codec is pure: [`FrameCodec::decode`] looks at a byte slice and says "a frame of this many
//! bytes", "need more bytes" or "this is not a valid frame" — it never reads a socket and never
//! panics, whatever the input (a cargo-fuzz target checks that). [`FrameReader`] adds the
//! buffering that a stream driver needs, bounded by the maximum frame size.
//!
//! Payloads are opaque here. Control messages are JSON ([`Frame::json`], [`FrameRef::parse_json`]);
//! KV block data is raw bytes, so a multi-megabyte block never goes through a text encoder.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// The two bytes every frame starts with.
pub const MAGIC: [u8; 2] = *b"KF";
/// The frame format version this build writes and reads.
pub const VERSION: u8 = 1;
/// Header length in bytes.
pub const HEADER_LEN: usize = 12;
/// Default payload limit: 64 MiB holds a KV block of a large model (e.g. 16 tokens × 80 layers ×
/// 8 KV heads × 128 × 2 (K and V) × 2 bytes = 5 MiB) with room to spare, and bounds what a peer
/// can make us buffer.
pub const DEFAULT_MAX_PAYLOAD: u32 = 64 * 1024 * 1024;

/// What a frame carries. The numeric values are part of the wire format: never reuse one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameKind {
    /// First frame on a connection or stream: who is speaking and what it supports.
    Hello = 1,
    /// A generate request (JSON).
    Request = 2,
    /// One or more generated tokens (JSON).
    Token = 3,
    /// The end of a generation, with usage and finish reason (JSON).
    Finish = 4,
    /// The sender gives up on a request; the receiver frees its resources.
    Cancel = 5,
    /// A request failed; the payload says why (JSON).
    Error = 6,
    /// A KV transfer's layout handshake (JSON).
    KvLayout = 7,
    /// One KV block's bytes (raw).
    KvBlock = 8,
    /// The end of a KV transfer (JSON).
    KvDone = 9,
    /// A batch of KV events (JSON).
    KvEvents = 10,
    /// A worker's live load (JSON).
    Load = 11,
    /// Liveness probe; the payload is echoed in `Pong`.
    Ping = 12,
    /// Answer to `Ping`.
    Pong = 13,
    /// A worker's status and metrics (JSON).
    Status = 14,
    /// An instruction from agent to worker: drain, stop (JSON).
    Control = 15,
}

impl FrameKind {
    /// Every kind, for tests and fuzzing.
    pub const ALL: [FrameKind; 15] = [
        FrameKind::Hello,
        FrameKind::Request,
        FrameKind::Token,
        FrameKind::Finish,
        FrameKind::Cancel,
        FrameKind::Error,
        FrameKind::KvLayout,
        FrameKind::KvBlock,
        FrameKind::KvDone,
        FrameKind::KvEvents,
        FrameKind::Load,
        FrameKind::Ping,
        FrameKind::Pong,
        FrameKind::Status,
        FrameKind::Control,
    ];

    /// Decodes a kind byte.
    pub const fn from_u8(byte: u8) -> Option<Self> {
        let index = byte as usize;
        if index >= 1 && index <= Self::ALL.len() {
            Some(Self::ALL[index - 1])
        } else {
            None
        }
    }
}

/// Why bytes are not a valid frame. Every variant is the peer's fault or a damaged link; the
/// receiver closes the stream (not the process) and counts the error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The input ended inside a frame.
    #[error("truncated frame: {have} bytes present, {need} needed")]
    Truncated {
        /// Bytes available.
        have: usize,
        /// Bytes the frame needs in total.
        need: usize,
    },
    /// The header announces more payload than this codec accepts.
    #[error("frame payload of {len} bytes exceeds the limit of {max} bytes")]
    Oversized {
        /// Announced (or attempted) payload length.
        len: u64,
        /// The codec's limit.
        max: u32,
    },
    /// The first two bytes are not `KF`: not a kvfleet frame, or the stream lost sync.
    #[error("bad frame magic {found:02x?}: not a kvfleet frame stream")]
    BadMagic {
        /// The two bytes found.
        found: [u8; 2],
    },
    /// A version this build does not speak.
    #[error("unsupported frame version {found} (this build speaks version {VERSION})")]
    UnknownVersion {
        /// The version byte found.
        found: u8,
    },
    /// A kind byte with no meaning in this version.
    #[error("unknown frame kind {found}")]
    UnknownKind {
        /// The kind byte found.
        found: u8,
    },
    /// The payload does not match its checksum: corrupted in transit.
    #[error(
        "frame checksum mismatch: header says {expected:#010x}, payload hashes to {actual:#010x}"
    )]
    Checksum {
        /// The checksum in the header.
        expected: u32,
        /// The checksum of the payload received.
        actual: u32,
    },
    /// Bytes follow a frame where exactly one frame was expected.
    #[error("{extra} unexpected bytes after the frame")]
    TrailingBytes {
        /// How many bytes follow the frame.
        extra: usize,
    },
    /// The frame is well formed but its payload is not the message its kind promises.
    #[error("invalid {kind:?} payload: {reason}")]
    Payload {
        /// The frame's kind.
        kind: FrameKind,
        /// What was wrong.
        reason: String,
    },
    /// A frame of one kind arrived where another was required.
    #[error("unexpected {found:?} frame, expected {expected}")]
    Unexpected {
        /// The kind that arrived.
        found: FrameKind,
        /// What the protocol expected at this point.
        expected: &'static str,
    },
}

/// An owned frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// What it carries.
    pub kind: FrameKind,
    /// The payload bytes.
    pub payload: Vec<u8>,
}

/// A frame borrowed from a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameRef<'a> {
    /// What it carries.
    pub kind: FrameKind,
    /// The payload bytes.
    pub payload: &'a [u8],
}

impl Frame {
    /// A frame whose payload is `message` as JSON.
    pub fn json<T: Serialize>(kind: FrameKind, message: &T) -> Result<Self, FrameError> {
        let payload = serde_json::to_vec(message).map_err(|e| FrameError::Payload {
            kind,
            reason: e.to_string(),
        })?;
        Ok(Self { kind, payload })
    }

    /// Borrows this frame.
    pub fn as_ref(&self) -> FrameRef<'_> {
        FrameRef {
            kind: self.kind,
            payload: &self.payload,
        }
    }

    /// Parses the payload as the JSON message `T`.
    pub fn parse_json<T: DeserializeOwned>(&self) -> Result<T, FrameError> {
        self.as_ref().parse_json()
    }
}

impl FrameRef<'_> {
    /// Copies the frame out of its buffer.
    pub fn to_owned(&self) -> Frame {
        Frame {
            kind: self.kind,
            payload: self.payload.to_vec(),
        }
    }

    /// Parses the payload as the JSON message `T`.
    pub fn parse_json<T: DeserializeOwned>(&self) -> Result<T, FrameError> {
        serde_json::from_slice(self.payload).map_err(|e| FrameError::Payload {
            kind: self.kind,
            reason: e.to_string(),
        })
    }
}

/// The result of looking at the front of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decoded<'a> {
    /// A whole frame, which used the first `consumed` bytes.
    Frame {
        /// The frame.
        frame: FrameRef<'a>,
        /// Bytes it occupied, header included.
        consumed: usize,
    },
    /// The buffer holds a valid prefix of a frame; at least `need` bytes in total are required.
    NeedMore {
        /// Total bytes needed before decoding can make progress.
        need: usize,
    },
}

/// Encodes and decodes frames under one payload limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameCodec {
    max_payload: u32,
}

impl Default for FrameCodec {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_PAYLOAD)
    }
}

impl FrameCodec {
    /// A codec that refuses payloads over `max_payload` bytes, in both directions.
    pub const fn new(max_payload: u32) -> Self {
        Self { max_payload }
    }

    /// The payload limit.
    pub const fn max_payload(&self) -> u32 {
        self.max_payload
    }

    /// The largest whole frame, header included.
    pub const fn max_frame_len(&self) -> usize {
        HEADER_LEN + self.max_payload as usize
    }

    /// Appends one frame to `out`.
    pub fn encode(
        &self,
        kind: FrameKind,
        payload: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), FrameError> {
        let len = u32::try_from(payload.len())
            .ok()
            .filter(|len| *len <= self.max_payload)
            .ok_or(FrameError::Oversized {
                len: payload.len() as u64,
                max: self.max_payload,
            })?;
        out.reserve(HEADER_LEN + payload.len());
        out.extend_from_slice(&MAGIC);
        out.push(VERSION);
        out.push(kind as u8);
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
        out.extend_from_slice(payload);
        Ok(())
    }

    /// Encodes one frame into a new buffer.
    pub fn encode_frame(&self, frame: &Frame) -> Result<Vec<u8>, FrameError> {
        let mut out = Vec::new();
        self.encode(frame.kind, &frame.payload, &mut out)?;
        Ok(out)
    }

    /// Looks at the front of `buf`. Header fields are checked as soon as they are present, so a
    /// garbage or hostile stream is refused after a few bytes instead of after `max_payload`.
    pub fn decode<'a>(&self, buf: &'a [u8]) -> Result<Decoded<'a>, FrameError> {
        // Validate whatever part of the header is present, byte by byte.
        match buf {
            [a, b, ..] if [*a, *b] != MAGIC => {
                return Err(FrameError::BadMagic { found: [*a, *b] });
            }
            [first] if *first != MAGIC[0] => {
                return Err(FrameError::BadMagic { found: [*first, 0] });
            }
            _ => {}
        }
        if let Some(&version) = buf.get(2)
            && version != VERSION
        {
            return Err(FrameError::UnknownVersion { found: version });
        }
        let kind = match buf.get(3) {
            Some(&byte) => {
                Some(FrameKind::from_u8(byte).ok_or(FrameError::UnknownKind { found: byte })?)
            }
            None => None,
        };
        let (Some(kind), Some(len_bytes), Some(crc_bytes)) =
            (kind, read_u32(buf, 4), read_u32(buf, 8))
        else {
            return Ok(Decoded::NeedMore { need: HEADER_LEN });
        };
        if len_bytes > self.max_payload {
            return Err(FrameError::Oversized {
                len: u64::from(len_bytes),
                max: self.max_payload,
            });
        }
        let total = HEADER_LEN + len_bytes as usize;
        let Some(payload) = buf.get(HEADER_LEN..total) else {
            return Ok(Decoded::NeedMore { need: total });
        };
        let actual = crc32fast::hash(payload);
        if actual != crc_bytes {
            return Err(FrameError::Checksum {
                expected: crc_bytes,
                actual,
            });
        }
        Ok(Decoded::Frame {
            frame: FrameRef { kind, payload },
            consumed: total,
        })
    }

    /// Decodes a buffer that must hold exactly one frame (a datagram, a fuzz input, a test).
    pub fn decode_exact<'a>(&self, buf: &'a [u8]) -> Result<FrameRef<'a>, FrameError> {
        match self.decode(buf)? {
            Decoded::Frame { frame, consumed } if consumed == buf.len() => Ok(frame),
            Decoded::Frame { consumed, .. } => Err(FrameError::TrailingBytes {
                extra: buf.len() - consumed,
            }),
            Decoded::NeedMore { need } => Err(FrameError::Truncated {
                have: buf.len(),
                need,
            }),
        }
    }
}

fn read_u32(buf: &[u8], at: usize) -> Option<u32> {
    let bytes: [u8; 4] = buf.get(at..at + 4)?.try_into().ok()?;
    Some(u32::from_le_bytes(bytes))
}

/// Reassembles frames from the chunks a stream delivers. Pure: the driver pushes the bytes it
/// read and pulls frames. It holds at most one partial frame (bounded by the codec's limit) plus
/// whatever the last push added.
#[derive(Debug, Default)]
pub struct FrameReader {
    codec: FrameCodec,
    buf: Vec<u8>,
    start: usize,
    failed: Option<FrameError>,
}

impl FrameReader {
    /// A reader with the given codec's limits.
    pub fn new(codec: FrameCodec) -> Self {
        Self {
            codec,
            buf: Vec::new(),
            start: 0,
            failed: None,
        }
    }

    /// Adds bytes read from the stream.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete frame, `None` if more bytes are needed. After an error the stream is
    /// out of sync: every later call returns the same error.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        if let Some(error) = &self.failed {
            return Err(error.clone());
        }
        let pending = &self.buf[self.start..];
        match self.codec.decode(pending) {
            Ok(Decoded::Frame { frame, consumed }) => {
                let frame = frame.to_owned();
                self.start += consumed;
                if self.start * 2 > self.buf.capacity() {
                    self.buf.drain(..self.start);
                    self.start = 0;
                }
                Ok(Some(frame))
            }
            Ok(Decoded::NeedMore { .. }) => Ok(None),
            Err(error) => {
                self.failed = Some(error.clone());
                Err(error)
            }
        }
    }

    /// Bytes received but not yet returned as frames. Non-zero at end of stream means the peer
    /// stopped in the middle of a frame.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// Call at end of stream: an error if the stream stopped inside a frame.
    pub fn finish(&self) -> Result<(), FrameError> {
        match self.buffered() {
            0 => Ok(()),
            have => {
                let need = match self.codec.decode(&self.buf[self.start..]) {
                    Ok(Decoded::NeedMore { need }) => need,
                    _ => have + 1,
                };
                Err(FrameError::Truncated { have, need })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn encoded(kind: FrameKind, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        FrameCodec::default()
            .encode(kind, payload, &mut out)
            .unwrap();
        out
    }

    #[test]
    fn header_layout_is_as_documented() {
        let bytes = encoded(FrameKind::Ping, b"abc");
        assert_eq!(&bytes[..2], b"KF");
        assert_eq!(bytes[2], VERSION);
        assert_eq!(bytes[3], 12);
        assert_eq!(&bytes[4..8], &3u32.to_le_bytes());
        assert_eq!(&bytes[8..12], &crc32fast::hash(b"abc").to_le_bytes());
        assert_eq!(&bytes[12..], b"abc");
    }

    #[test]
    fn every_kind_round_trips() {
        for kind in FrameKind::ALL {
            assert_eq!(FrameKind::from_u8(kind as u8), Some(kind));
            let bytes = encoded(kind, b"payload");
            let frame = FrameCodec::default().decode_exact(&bytes).unwrap();
            assert_eq!(frame.kind, kind);
            assert_eq!(frame.payload, b"payload");
        }
        assert_eq!(FrameKind::from_u8(0), None);
        assert_eq!(FrameKind::from_u8(16), None);
    }

    /// One row per way a frame can be bad: the input and the error it must produce.
    #[test]
    fn bad_frames_get_typed_errors() {
        let codec = FrameCodec::new(1024);
        let good = encoded(FrameKind::Token, b"hello");
        let mut bad_magic = good.clone();
        bad_magic[0] = b'X';
        let mut bad_version = good.clone();
        bad_version[2] = 9;
        let mut bad_kind = good.clone();
        bad_kind[3] = 200;
        let mut oversized = good.clone();
        oversized[4..8].copy_from_slice(&2048u32.to_le_bytes());
        let mut corrupted = good.clone();
        corrupted[HEADER_LEN] ^= 0xff;
        let mut trailing = good.clone();
        trailing.push(0);

        let cases: Vec<(&str, Vec<u8>, FrameError)> = vec![
            (
                "empty",
                vec![],
                FrameError::Truncated {
                    have: 0,
                    need: HEADER_LEN,
                },
            ),
            (
                "half header",
                good[..6].to_vec(),
                FrameError::Truncated {
                    have: 6,
                    need: HEADER_LEN,
                },
            ),
            (
                "half payload",
                good[..14].to_vec(),
                FrameError::Truncated { have: 14, need: 17 },
            ),
            (
                "bad magic",
                bad_magic,
                FrameError::BadMagic { found: *b"XF" },
            ),
            (
                "garbage first byte",
                vec![0xff],
                FrameError::BadMagic { found: [0xff, 0] },
            ),
            (
                "unknown version",
                bad_version,
                FrameError::UnknownVersion { found: 9 },
            ),
            (
                "unknown kind",
                bad_kind,
                FrameError::UnknownKind { found: 200 },
            ),
            (
                "oversized",
                oversized,
                FrameError::Oversized {
                    len: 2048,
                    max: 1024,
                },
            ),
            (
                "corrupted payload",
                corrupted.clone(),
                FrameError::Checksum {
                    expected: crc32fast::hash(b"hello"),
                    actual: crc32fast::hash(&corrupted[HEADER_LEN..]),
                },
            ),
            (
                "trailing bytes",
                trailing,
                FrameError::TrailingBytes { extra: 1 },
            ),
        ];
        for (name, input, expected) in cases {
            assert_eq!(codec.decode_exact(&input), Err(expected), "case {name}");
        }
    }

    #[test]
    fn encoder_refuses_oversized_payloads() {
        let codec = FrameCodec::new(4);
        let mut out = Vec::new();
        assert_eq!(
            codec.encode(FrameKind::KvBlock, b"12345", &mut out),
            Err(FrameError::Oversized { len: 5, max: 4 })
        );
        assert!(out.is_empty(), "nothing half-written");
    }

    #[test]
    fn json_payloads_round_trip_and_bad_json_is_a_payload_error() {
        let frame = Frame::json(
            FrameKind::Request,
            &serde_json::json!({"tokens": [1, 2, 3]}),
        )
        .unwrap();
        let value: serde_json::Value = frame.parse_json().unwrap();
        assert_eq!(value["tokens"][2], 3);
        let bad = Frame {
            kind: FrameKind::Request,
            payload: b"{not json".to_vec(),
        };
        assert!(matches!(
            bad.parse_json::<serde_json::Value>(),
            Err(FrameError::Payload {
                kind: FrameKind::Request,
                ..
            })
        ));
    }

    #[test]
    fn reader_reports_a_stream_that_ends_inside_a_frame() {
        let bytes = encoded(FrameKind::Finish, b"done");
        let mut reader = FrameReader::new(FrameCodec::default());
        reader.push(&bytes[..7]);
        assert_eq!(reader.next_frame(), Ok(None));
        assert_eq!(
            reader.finish(),
            Err(FrameError::Truncated {
                have: 7,
                need: HEADER_LEN
            })
        );
        reader.push(&bytes[7..]);
        assert!(reader.next_frame().unwrap().is_some());
        assert_eq!(reader.finish(), Ok(()));
    }

    #[test]
    fn reader_stays_failed_after_garbage() {
        let mut reader = FrameReader::new(FrameCodec::default());
        reader.push(b"GET / HTTP/1.1\r\n");
        let error = reader.next_frame().unwrap_err();
        assert!(matches!(error, FrameError::BadMagic { .. }));
        reader.push(&encoded(FrameKind::Ping, b""));
        assert_eq!(reader.next_frame(), Err(error));
    }

    fn arb_frame() -> impl Strategy<Value = Frame> {
        (
            prop::sample::select(FrameKind::ALL.to_vec()),
            prop::collection::vec(any::<u8>(), 0..2048),
        )
            .prop_map(|(kind, payload)| Frame { kind, payload })
    }

    proptest! {
        /// Any sequence of frames, cut into arbitrary chunks, comes back whole and in order.
        #[test]
        fn frames_round_trip_through_arbitrary_chunking(
            frames in prop::collection::vec(arb_frame(), 0..12),
            cuts in prop::collection::vec(1usize..700, 1..40),
        ) {
            let codec = FrameCodec::default();
            let mut stream = Vec::new();
            for frame in &frames {
                codec.encode(frame.kind, &frame.payload, &mut stream).unwrap();
            }
            let mut reader = FrameReader::new(codec);
            let mut out = Vec::new();
            let mut rest = &stream[..];
            let mut cut = cuts.iter().cycle();
            while !rest.is_empty() {
                let n = (*cut.next().unwrap()).min(rest.len());
                reader.push(&rest[..n]);
                rest = &rest[n..];
                while let Some(frame) = reader.next_frame().unwrap() {
                    out.push(frame);
                }
            }
            prop_assert_eq!(out, frames);
            prop_assert_eq!(reader.finish(), Ok(()));
        }

        /// Arbitrary bytes never panic the decoder, and whatever it accepts re-encodes to the
        /// same bytes.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            let codec = FrameCodec::new(128);
            if let Ok(frame) = codec.decode_exact(&bytes) {
                let mut again = Vec::new();
                codec.encode(frame.kind, frame.payload, &mut again).unwrap();
                prop_assert_eq!(again, bytes);
            }
        }

        /// Flipping any single bit of a valid frame is detected.
        #[test]
        fn single_bit_flips_are_detected(frame in arb_frame(), bit in any::<prop::sample::Index>()) {
            let codec = FrameCodec::default();
            let mut bytes = codec.encode_frame(&frame).unwrap();
            let bit = bit.index(bytes.len() * 8);
            bytes[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(codec.decode_exact(&bytes).map(|f| f.to_owned()) != Ok(frame));
        }
    }
}
