//! Feeds arbitrary bytes to the peer message decoder: the first byte picks the frame kind, the
//! rest is the payload (a valid frame is built around it, so the fuzzer spends its time inside
//! the message decoder rather than failing CRC checks). Any input must give a message or a typed
//! error; whatever decodes must re-encode to a frame that decodes to the same message.
#![no_main]

use kvfleet_proto::frame::{Frame, FrameCodec, FrameKind};
use kvfleet_proto::peer::PeerMessage;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&kind, payload)) = data.split_first() else {
        return;
    };
    let kind = FrameKind::ALL[usize::from(kind) % FrameKind::ALL.len()];
    let codec = FrameCodec::new(1 << 20);
    let frame = Frame {
        kind,
        payload: payload.to_vec(),
    };
    let Ok(bytes) = codec.encode_frame(&frame) else {
        return;
    };
    let Ok(frame) = codec.decode_exact(&bytes) else {
        panic!("a frame the codec encoded does not decode");
    };
    if let Ok(message) = PeerMessage::decode(frame) {
        let again = message.to_frame_bytes(&codec).expect("re-encoding a decoded message");
        let frame = codec.decode_exact(&again).expect("re-encoded frame decodes");
        assert_eq!(PeerMessage::decode(frame).expect("re-encoded message decodes"), message);
    }
});
