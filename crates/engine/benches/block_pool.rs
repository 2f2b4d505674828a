//! Block pool throughput: allocate/free pairs, allocation through LRU eviction, and prefix
//! lookups, per second.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use kvfleet_engine::BlockPool;
use kvfleet_proto::hash::block_hashes;
use kvfleet_proto::{BlockHash, BlockSize};

const BLOCKS: u32 = 65_536;

fn chain(seed: u32, blocks: usize) -> Vec<BlockHash> {
    let tokens: Vec<u32> = (0..(blocks as u32 * 16))
        .map(|t| t ^ seed.rotate_left(7))
        .collect();
    block_hashes(&tokens, BlockSize::default())
}

/// A pool whose every block is cached and unreferenced: `chains` prompts of `len` blocks.
fn full_cached_pool(chains: u32, len: usize) -> (BlockPool, Vec<Vec<BlockHash>>) {
    let mut pool = BlockPool::new(chains * len as u32, 1 << 21);
    let mut all = Vec::new();
    for c in 0..chains {
        let hashes = chain(c, len);
        let mut ids = Vec::new();
        pool.allocate(len, &mut ids).expect("room");
        let pairs: Vec<_> = ids.iter().copied().zip(hashes.iter().copied()).collect();
        pool.register(None, &pairs);
        pool.release(ids.into_iter().rev());
        all.push(hashes);
    }
    pool.take_events();
    (pool, all)
}

fn pool_ops(c: &mut Criterion) {
    let mut group = c.benchmark_group("block_pool");

    let mut pool = BlockPool::new(BLOCKS, 1 << 21);
    let mut ids = Vec::with_capacity(16);
    group.throughput(Throughput::Elements(16));
    group.bench_function("allocate_free_16", |b| {
        b.iter(|| {
            ids.clear();
            pool.allocate(16, &mut ids).expect("room");
            pool.release(ids.drain(..).rev());
        });
    });

    // Every allocation evicts: the free list is empty, all blocks are cached.
    let (mut pool, _) = full_cached_pool(BLOCKS / 64, 64);
    // Fresh hashes for each round, computed outside the measurement.
    let fresh: Vec<Vec<BlockHash>> = (0..4096).map(|r| chain(1_000_000 + r, 16)).collect();
    let mut round = 0usize;
    group.bench_function("allocate_evict_register_free_16", |b| {
        b.iter(|| {
            ids.clear();
            pool.allocate(16, &mut ids).expect("evictable");
            round = (round + 1) % fresh.len();
            let pairs: Vec<_> = ids
                .iter()
                .copied()
                .zip(fresh[round].iter().copied())
                .collect();
            pool.register(None, &pairs);
            pool.release(ids.drain(..).rev());
            black_box(pool.take_events());
        });
    });

    let (pool, chains) = full_cached_pool(BLOCKS / 64, 64);
    let seqs: Vec<Vec<_>> = chains
        .iter()
        .map(|c| c.iter().map(|h| h.sequence).collect())
        .collect();
    let mut i = 0;
    group.throughput(Throughput::Elements(64));
    group.bench_function("prefix_lookup_64_blocks", |b| {
        b.iter(|| {
            i = (i + 1) % seqs.len();
            black_box(pool.lookup_prefix(&seqs[i]))
        });
    });
    group.finish();
}

criterion_group!(benches, pool_ops);
criterion_main!(benches);
