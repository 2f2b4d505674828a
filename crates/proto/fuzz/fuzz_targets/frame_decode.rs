//! Feeds arbitrary bytes to the frame decoder, whole and in chunks. The decoder must return a
//! frame or a typed error for any input; a panic, overflow or out-of-bounds read is a crash.
#![no_main]

use kvfleet_proto::frame::{Decoded, FrameCodec, FrameReader};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // A small limit so that length fields near it are exercised too.
    let codec = FrameCodec::new(4096);
    if let Ok(frame) = codec.decode_exact(data) {
        // Whatever decodes must re-encode to the same bytes.
        let mut again = Vec::new();
        codec.encode(frame.kind, frame.payload, &mut again).expect("re-encoding a decoded frame");
        assert_eq!(again, data);
    }
    if let Ok(Decoded::Frame { consumed, .. }) = codec.decode(data) {
        assert!(consumed <= data.len());
    }
    // The stream reader, fed in chunks whose sizes come from the input itself.
    let mut reader = FrameReader::new(codec);
    let step = usize::from(data.first().copied().unwrap_or(1)).max(1);
    for chunk in data.chunks(step) {
        reader.push(chunk);
        while let Ok(Some(_)) = reader.next_frame() {}
    }
    let _ = reader.finish();
});
