//! Synthetic fleets for the router benchmarks: real chained sequence hashes (so the router's
//! chain check runs as in production), a system prompt every worker holds, and long private
//! continuations each held by a few workers.

// Each bench binary compiles this module and uses a different part of it.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use kvfleet_kv_router::{Router, RouterConfig, WorkerCapacity};
use kvfleet_proto::hash::chain;
use kvfleet_proto::profile::PerfProfile;
use kvfleet_proto::{
    BlockHash, KvEvent, KvEventData, LocalBlockHash, SequenceHash, Tier, WorkerId,
};

/// Blocks in the system prompt every worker holds (1,024 tokens at block size 16).
pub(crate) const SYSTEM_BLOCKS: usize = 64;
/// Blocks per conversation chain, system prompt included (32,768 tokens).
pub(crate) const CHAIN_BLOCKS: usize = 2048;

/// A chain of `len` blocks continuing `parent`, with local hashes drawn from `seed`.
pub(crate) fn chain_blocks(parent: Option<SequenceHash>, seed: u64, len: usize) -> Vec<BlockHash> {
    let mut prev = parent;
    (0..len as u64)
        .map(|i| {
            let local = LocalBlockHash(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ i);
            let sequence = chain(prev, local);
            prev = Some(sequence);
            BlockHash { local, sequence }
        })
        .collect()
}

/// Stores `blocks` (continuing `parent`) on `worker`, 64 blocks per event.
pub(crate) fn store(
    router: &mut Router,
    worker: WorkerId,
    parent: Option<SequenceHash>,
    blocks: &[BlockHash],
) {
    let mut parent = parent;
    for piece in blocks.chunks(64) {
        let event = KvEvent {
            worker,
            event_id: router.next_event_id(worker).unwrap_or(0),
            tier: Tier::G1,
            data: KvEventData::Stored {
                parent,
                blocks: piece.to_vec(),
            },
        };
        router
            .apply(&event, Duration::ZERO)
            .expect("benchmark events are in order and chain");
        parent = piece.last().map(|b| b.sequence);
    }
}

/// A fleet of `workers` workers whose index holds at least `unique_blocks` distinct blocks:
/// the system prompt on every worker, then chains of [`CHAIN_BLOCKS`] each stored on
/// `replicas` workers. Returns the router and the chains (system prompt first in each).
pub(crate) fn fleet(
    workers: u64,
    unique_blocks: usize,
    replicas: u64,
) -> (Router, Vec<Vec<SequenceHash>>) {
    let mut router = Router::new(RouterConfig::default());
    // The default `kv` mode costs candidates in time from their performance profile.
    let profile = PerfProfile::from_toml_str(kvfleet_engine::DEFAULT_PERF_PROFILE_TOML)
        .expect("the shipped profile is valid");
    router
        .set_default_profile(Arc::new(profile))
        .expect("the shipped profile has the router's block size");
    for id in 0..workers {
        router
            .add_worker(
                WorkerId(id),
                WorkerCapacity {
                    kv_blocks: 0,
                    max_queue_depth: None,
                },
            )
            .expect("few workers");
    }
    let system = chain_blocks(None, 1, SYSTEM_BLOCKS);
    for id in 0..workers {
        store(&mut router, WorkerId(id), None, &system);
    }
    let tail_len = CHAIN_BLOCKS - SYSTEM_BLOCKS;
    let chains_needed = unique_blocks
        .saturating_sub(SYSTEM_BLOCKS)
        .div_ceil(tail_len);
    let parent = system.last().map(|b| b.sequence);
    let mut chains = Vec::with_capacity(chains_needed);
    for c in 0..chains_needed as u64 {
        let tail = chain_blocks(parent, 1000 + c, tail_len);
        for r in 0..replicas {
            let worker = WorkerId((c * 7 + r * 13) % workers);
            store(&mut router, worker, parent, &tail);
        }
        chains.push(
            system
                .iter()
                .chain(&tail)
                .map(|b| b.sequence)
                .collect::<Vec<_>>(),
        );
    }
    (router, chains)
}
