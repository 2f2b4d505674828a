//! Feeds arbitrary bytes to the engine event decoder and translator: the first byte picks the
//! sequence number's relation to the translator's (in order, a gap, stale, a restart) and the
//! kvfleet block size, the rest is the msgpack payload. Any input must give a batch or a typed
//! error, and the translator must neither panic nor emit an event whose blocks do not chain;
//! whatever decodes must re-encode (vLLM's map layout) to a payload that decodes to the same
//! batch.
#![no_main]

use kvfleet_engine_events::decode::decode_batch;
use kvfleet_engine_events::encode::{Flavor, encode_batch};
use kvfleet_engine_events::translate::Translator;
use kvfleet_proto::hash::{BlockSize, chain};
use kvfleet_proto::ids::WorkerId;
use kvfleet_proto::kv_event::KvEventData;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&control, payload)) = data.split_first() else {
        return;
    };
    let decoded = decode_batch(payload);
    if let Ok(batch) = &decoded {
        let again = encode_batch(batch, Flavor::VllmMap);
        let back = decode_batch(&again).expect("a re-encoded batch decodes");
        // NaN timestamps compare unequal; the events are what matter.
        assert_eq!(back.events, batch.events);
    }
    let k = u32::from(control & 0x1f) + 1;
    let mut translator = Translator::new(WorkerId(1), BlockSize::new(k).expect("1..=32"));
    // A first batch, then the same payload under a sequence number the control byte picks:
    // every path through the sequence checks sees the payload once in order.
    let mut outputs = vec![translator.accept(0, payload)];
    let seq = match control >> 5 {
        0 => 1,
        1 => 3,
        2 => 0,
        _ => u64::MAX,
    };
    outputs.push(translator.accept(seq, payload));
    outputs.push(translator.accept_replayed(translator.expected_seq(), payload));
    let skipped = translator.skip_to(u64::MAX);
    for event in outputs.iter().flat_map(|o| o.events.iter()).chain(skipped.iter()) {
        if let KvEventData::Stored { parent, blocks } = &event.data {
            let mut prev = *parent;
            for block in blocks {
                assert_eq!(chain(prev, block.local), block.sequence);
                prev = Some(block.sequence);
            }
        }
    }
});
