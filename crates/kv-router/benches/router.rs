//! Router throughput and latency: KV events applied per second, and `select` latency for
//! 1k–32k-token prompts over 100 and 1,000 workers with about a million indexed blocks, with
//! the time-based `kv` cost (`select/…`) and Dynamo's block cost (`select_kv_blocks/…`).
//!
//! `cargo bench -p kvfleet-kv-router --bench router -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use kvfleet_kv_router::{RequestId, RouteRequest, RoutingMode};
use kvfleet_proto::{KvEvent, KvEventData, Tier, WorkerId};

mod common;
use common::{chain_blocks, fleet};

const UNIQUE_BLOCKS: usize = 1_000_000;

/// Stored/Removed pairs of 16-block chains on a 100-worker fleet already holding ~1M blocks,
/// so the index stays the same size while events stream in.
fn events(c: &mut Criterion) {
    let mut group = c.benchmark_group("apply");
    let (mut router, _) = fleet(100, UNIQUE_BLOCKS, 2);
    let prompts: Vec<_> = (0..1024u64)
        .map(|i| chain_blocks(None, 1_000_000 + i, 16))
        .collect();
    let mut stored: Vec<KvEvent> = prompts
        .iter()
        .enumerate()
        .map(|(i, blocks)| KvEvent {
            worker: WorkerId(i as u64 % 100),
            event_id: 0,
            tier: Tier::G1,
            data: KvEventData::Stored {
                parent: None,
                blocks: blocks.clone(),
            },
        })
        .collect();
    let mut removed: Vec<KvEvent> = prompts
        .iter()
        .enumerate()
        .map(|(i, blocks)| KvEvent {
            worker: WorkerId(i as u64 % 100),
            event_id: 0,
            tier: Tier::G1,
            data: KvEventData::Removed {
                blocks: blocks.iter().map(|b| b.sequence).collect(),
            },
        })
        .collect();
    group.throughput(Throughput::Elements(2));
    let mut k = 0usize;
    group.bench_function("stored+removed_16_blocks_1M_index", |b| {
        b.iter(|| {
            let i = k % stored.len();
            k += 1;
            for event in [&mut stored[i], &mut removed[i]] {
                event.event_id = router.next_event_id(event.worker).unwrap_or(0);
                black_box(router.apply(event, Duration::ZERO)).ok();
            }
        })
    });
    group.finish();
}

/// `select` + `finished` for prompts that follow one chain for their whole length, in `kv`
/// mode (group `select`) and with Dynamo's block cost (`select_kv_blocks`), on the same fleet.
fn select(c: &mut Criterion) {
    for (group_name, mode) in [
        ("select", RoutingMode::Kv),
        ("select_kv_blocks", RoutingMode::KvBlocks),
    ] {
        let mut group = c.benchmark_group(group_name);
        for workers in [100u64, 1000] {
            let (mut router, chains) = fleet(workers, UNIQUE_BLOCKS, 2);
            router.set_mode(mode);
            let stats = router.index_stats();
            eprintln!(
                "fleet: {workers} workers, {} unique blocks, {} (block, worker) entries, mode {mode}",
                stats.blocks, stats.entries
            );
            for tokens in [1024usize, 4096, 16384, 32768] {
                let blocks = tokens / 16;
                let mut n = 0u128;
                group.throughput(Throughput::Elements(1));
                group.bench_with_input(
                    BenchmarkId::new(format!("{workers}_workers"), format!("{tokens}_tokens")),
                    &blocks,
                    |b, &blocks| {
                        b.iter(|| {
                            // Each request continues one chain for its whole length: a full
                            // hit on the 2 workers holding it (and, at 1k tokens, on every
                            // worker: it is exactly the system prompt).
                            let chain = &chains[n as usize % chains.len()];
                            let request =
                                RouteRequest::new(RequestId(n), &chain[..blocks], tokens as u32);
                            let decision = router.select(&request, Duration::ZERO);
                            router.finished(RequestId(n), Duration::ZERO);
                            n += 1;
                            black_box(decision)
                        })
                    },
                );
            }
        }
        group.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20);
    targets = events, select
}
criterion_main!(benches);
