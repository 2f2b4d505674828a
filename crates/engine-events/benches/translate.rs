//! Translator throughput: a batch storing one 1,024-token prompt (a 512-token shared system
//! prefix plus its own 512) as 32 engine blocks of 16, decoded from vLLM's msgpack and translated
//! into kvfleet blocks of 16 and of 32, then a batch evicting the prompt's own blocks — so the
//! translator's state stays the same size while batches stream in.
//!
//! `cargo bench -p kvfleet-engine-events --bench translate -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use kvfleet_engine_events::decode::EventBatch;
use kvfleet_engine_events::encode::{Flavor, encode_batch};
use kvfleet_engine_events::publisher::{block_removed, block_stored};
use kvfleet_engine_events::translate::Translator;
use kvfleet_proto::hash::BlockSize;
use kvfleet_proto::ids::WorkerId;

const E: usize = 16;

fn batch(events: Vec<kvfleet_engine_events::EngineEvent>) -> Vec<u8> {
    encode_batch(
        &EventBatch {
            ts: 1.0,
            events,
            data_parallel_rank: Some(0),
        },
        Flavor::VllmMap,
    )
}

fn translate(c: &mut Criterion) {
    let mut group = c.benchmark_group("store_evict_1024_tokens");
    let system: Vec<u32> = (0..512).collect();
    let prompts: Vec<Vec<u32>> = (0..256u32)
        .map(|p| {
            let mut tokens = system.clone();
            tokens.extend((0..512).map(|i| 100_000 + p * 512 + i));
            tokens
        })
        .collect();
    let pairs: Vec<(Vec<u8>, Vec<u8>)> = prompts
        .iter()
        .map(|tokens| {
            let own: Vec<usize> = (32..64).collect();
            (
                batch(vec![block_stored(tokens, E, 32, 64, None)]),
                batch(vec![block_removed(tokens, E, &own, None)]),
            )
        })
        .collect();
    for k in [16u32, 32] {
        let mut translator = Translator::new(WorkerId(1), BlockSize::new(k).unwrap_or_default());
        let mut seq = 0u64;
        let _ = translator.accept(seq, &batch(vec![block_stored(&system, E, 0, 32, None)]));
        seq += 1;
        // Two batches (store + evict) per iteration, 32 engine blocks each.
        group.throughput(Throughput::Elements(2));
        group.bench_with_input(BenchmarkId::new("kvfleet_block", k), &k, |b, _| {
            let mut i = 0;
            b.iter(|| {
                let (stored, removed) = &pairs[i % pairs.len()];
                i += 1;
                black_box(translator.accept(seq, stored));
                black_box(translator.accept(seq + 1, removed));
                seq += 2;
            });
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default();
    targets = translate
}
criterion_main!(benches);
