//! Router behaviour: selection tables, event validation, load blending, approximate mode,
//! snapshots, and a property test of the index against a reference model.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use kvfleet_proto::hash::{BlockHash, BlockSize, LocalBlockHash, block_hashes};
use kvfleet_proto::{KvEvent, KvEventData, SequenceHash, Tier, WorkerId};
use proptest::prelude::*;

use super::*;

const BS: u32 = 16;

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// The block hashes of a prompt of `blocks` full blocks; prompts with different `seed`s share
/// no blocks.
fn prompt(seed: u32, blocks: usize) -> Vec<BlockHash> {
    let tokens: Vec<u32> = (0..blocks as u32 * BS)
        .map(|t| t * 7 + seed * 100_003)
        .collect();
    block_hashes(&tokens, BlockSize::new(BS).unwrap())
}

fn seqs(blocks: &[BlockHash]) -> Vec<SequenceHash> {
    blocks.iter().map(|b| b.sequence).collect()
}

fn w(n: u64) -> WorkerId {
    WorkerId(n)
}

/// A router with the given workers (capacity unknown) and the config tweaked by `f`; in
/// `kv-blocks` mode, whose cost these tests compute by hand (the time-based `kv` mode has its
/// own tests below).
fn router_with(workers: &[u64], f: impl FnOnce(&mut RouterConfig)) -> Router {
    let mut config = RouterConfig {
        mode: RoutingMode::KvBlocks,
        block_size: BlockSize::new(BS).unwrap(),
        breakdown_limit: usize::MAX,
        ..RouterConfig::default()
    };
    f(&mut config);
    let mut router = Router::new(config);
    for &id in workers {
        router.add_worker(w(id), WorkerCapacity::default()).unwrap();
    }
    router
}

/// Stores `indices` of `blocks` on `worker` in `tier`, one event per block, each with its true
/// parent (so the chain check passes even for non-contiguous blocks).
fn store(router: &mut Router, worker: u64, tier: Tier, blocks: &[BlockHash], indices: &[usize]) {
    for &i in indices {
        let event = KvEvent {
            worker: w(worker),
            event_id: router.next_event_id(w(worker)).unwrap(),
            tier,
            data: KvEventData::Stored {
                parent: i.checked_sub(1).map(|p| blocks[p].sequence),
                blocks: vec![blocks[i]],
            },
        };
        router.apply(&event, Duration::ZERO).unwrap();
    }
}

fn event(worker: u64, event_id: u64, data: KvEventData) -> KvEvent {
    KvEvent {
        worker: w(worker),
        event_id,
        tier: Tier::G1,
        data,
    }
}

fn load(prefill_tokens: u64, decode_blocks: u64, queue_depth: u32) -> WorkerLoad {
    WorkerLoad {
        prefill_tokens,
        decode_blocks,
        queue_depth,
    }
}

/// One worker in a selection table row.
struct W {
    id: u64,
    /// Blocks of the request's prompt it holds, and in which tier.
    held: &'static [usize],
    tier: Tier,
    /// Its reported load.
    load: WorkerLoad,
    /// Its KV capacity in blocks (0: unknown).
    kv_blocks: u64,
}

const fn idle(id: u64, held: &'static [usize]) -> W {
    W {
        id,
        held,
        tier: Tier::G1,
        load: WorkerLoad {
            prefill_tokens: 0,
            decode_blocks: 0,
            queue_depth: 0,
        },
        kv_blocks: 0,
    }
}

const fn busy(id: u64, held: &'static [usize], decode_blocks: u64, queue_depth: u32) -> W {
    W {
        id,
        held,
        tier: Tier::G1,
        load: WorkerLoad {
            prefill_tokens: 0,
            decode_blocks,
            queue_depth,
        },
        kv_blocks: 0,
    }
}

const fn in_tier(id: u64, held: &'static [usize], tier: Tier) -> W {
    W {
        id,
        held,
        tier,
        load: WorkerLoad {
            prefill_tokens: 0,
            decode_blocks: 0,
            queue_depth: 0,
        },
        kv_blocks: 0,
    }
}

struct Row {
    name: &'static str,
    mode: RoutingMode,
    overlap_weight: f64,
    workers: Vec<W>,
    /// The request is the first `blocks` blocks of the shared prompt.
    blocks: usize,
    candidates: Option<&'static [u64]>,
    expect: u64,
    expect_overlap: u32,
}

fn row(
    name: &'static str,
    workers: Vec<W>,
    blocks: usize,
    expect: u64,
    expect_overlap: u32,
) -> Row {
    Row {
        name,
        mode: RoutingMode::KvBlocks,
        overlap_weight: 1.0,
        workers,
        blocks,
        candidates: None,
        expect,
        expect_overlap,
    }
}

#[test]
fn selection_table() {
    let rows = vec![
        row(
            "longest prefix wins",
            vec![idle(1, &[0, 1]), idle(2, &[0, 1, 2, 3])],
            8,
            2,
            4,
        ),
        row(
            "a prefix match is a prefix: holding 0,1,3 is an overlap of 2",
            vec![idle(1, &[0, 1, 3, 4, 5]), idle(2, &[0, 1, 2])],
            8,
            2,
            3,
        ),
        row(
            "block 0 missing means no overlap",
            vec![idle(1, &[1, 2, 3, 4]), busy(2, &[], 1, 0)],
            8,
            1,
            0,
        ),
        row(
            "decode load outweighs a small overlap",
            vec![busy(1, &[0, 1], 50, 0), idle(2, &[])],
            8,
            2,
            0,
        ),
        row(
            "equal cost goes to the less loaded worker",
            // w1: 5 new prefill + 3 decode = 8; w2: 8 new prefill + 0 = 8.
            vec![busy(1, &[0, 1, 2], 3, 0), idle(2, &[])],
            8,
            2,
            0,
        ),
        row(
            "equal cost and load goes to the lower id",
            vec![idle(3, &[]), idle(2, &[])],
            8,
            2,
            0,
        ),
        row(
            "a G1 hit beats the same hit in G2",
            vec![
                in_tier(1, &[0, 1, 2, 3], Tier::G2),
                in_tier(2, &[0, 1, 2, 3], Tier::G1),
            ],
            8,
            2,
            4,
        ),
        row(
            "a long G3 prefix beats a short G1 one",
            // w1: 8 - 7×0.6 = 3.8; w2: 8 - 4 = 4.
            vec![
                in_tier(1, &[0, 1, 2, 3, 4, 5, 6], Tier::G3),
                in_tier(2, &[0, 1, 2, 3], Tier::G1),
            ],
            8,
            1,
            7,
        ),
        row(
            "queue depth counts",
            vec![busy(1, &[0, 1, 2, 3], 0, 10), idle(2, &[])],
            8,
            2,
            0,
        ),
        row(
            "an overloaded worker is skipped",
            vec![
                W {
                    kv_blocks: 10,
                    ..busy(1, &[0, 1, 2, 3, 4, 5, 6, 7], 5, 0)
                },
                busy(2, &[], 20, 0),
            ],
            8,
            2,
            0,
        ),
        Row {
            candidates: Some(&[3, 2, 99]),
            ..row(
                "only candidates are considered; unknown ids are ignored",
                vec![idle(1, &[0, 1, 2, 3]), idle(2, &[0]), idle(3, &[])],
                8,
                2,
                1,
            )
        },
        Row {
            overlap_weight: 0.0,
            ..row(
                "overlap weight 0 routes on load alone",
                vec![busy(1, &[0, 1, 2, 3, 4, 5, 6, 7], 1, 0), idle(2, &[])],
                8,
                2,
                0,
            )
        },
        Row {
            mode: RoutingMode::LeastLoaded,
            ..row(
                "least-loaded ignores the cache",
                vec![busy(1, &[0, 1, 2, 3, 4, 5, 6, 7], 2, 0), busy(2, &[], 1, 0)],
                8,
                2,
                0,
            )
        },
        Row {
            mode: RoutingMode::RoundRobin,
            ..row(
                "round-robin starts at the lowest id",
                vec![busy(2, &[0, 1], 9, 0), idle(1, &[])],
                8,
                1,
                0,
            )
        },
    ];
    let shared = prompt(1, 8);
    for row in rows {
        let mut router = router_with(&[], |c| {
            c.mode = row.mode;
            c.overlap_weight = row.overlap_weight;
        });
        for worker in &row.workers {
            let capacity = WorkerCapacity {
                kv_blocks: worker.kv_blocks,
                max_queue_depth: None,
            };
            router.add_worker(w(worker.id), capacity).unwrap();
            store(&mut router, worker.id, worker.tier, &shared, worker.held);
            router.apply_load(w(worker.id), worker.load, ms(1)).unwrap();
        }
        let hashes = seqs(&shared[..row.blocks]);
        let candidates: Option<Vec<WorkerId>> = row
            .candidates
            .map(|ids| ids.iter().map(|&id| w(id)).collect());
        let mut request = RouteRequest::new(RequestId(1), &hashes, row.blocks as u32 * BS);
        if let Some(candidates) = &candidates {
            request = request.with_candidates(candidates);
        }
        let decision = router
            .select(&request, ms(2))
            .unwrap_or_else(|e| panic!("{}: {e}", row.name));
        assert_eq!(
            decision.worker,
            w(row.expect),
            "{}: {decision:#?}",
            row.name
        );
        assert_eq!(decision.overlap_blocks, row.expect_overlap, "{}", row.name);
    }
}

#[test]
fn overlaps_are_prefixes_per_worker_and_route_nothing() {
    let shared = prompt(1, 6);
    let mut router = router_with(&[1, 2, 3, 4], |_| {});
    store(&mut router, 1, Tier::G1, &shared, &[0, 1, 3]);
    store(&mut router, 2, Tier::G2, &shared, &[0, 1, 2, 3, 4, 5]);
    store(&mut router, 3, Tier::G1, &shared, &[2, 3]);
    let hashes = seqs(&shared);
    let got: Vec<(u64, u32)> = router
        .overlaps(&hashes, None, ms(1))
        .iter()
        .map(|o| (o.worker.0, o.blocks))
        .collect();
    assert_eq!(got, [(1, 2), (2, 6), (3, 0), (4, 0)]);
    let only = router.overlaps(&hashes, Some(&[w(2), w(9)]), ms(1));
    assert_eq!(only.len(), 1);
    assert!((only[0].cached_blocks - 6.0 * 0.8).abs() < 1e-9);
    assert_eq!(router.inflight(), 0);
}

#[test]
fn the_decision_explains_every_candidate_cheapest_first() {
    let shared = prompt(1, 8);
    let mut router = router_with(&[1, 2, 3], |_| {});
    store(&mut router, 1, Tier::G1, &shared, &[0, 1, 2, 3]);
    store(&mut router, 2, Tier::G2, &shared, &[0, 1]);
    router.apply_load(w(3), load(32, 6, 1), ms(1)).unwrap();
    let hashes = seqs(&shared);
    // 136 tokens: 8 full blocks and a partial one.
    let decision = router
        .select(&RouteRequest::new(RequestId(9), &hashes, 8 * BS + 8), ms(2))
        .unwrap();
    assert_eq!(decision.request_blocks, 9);
    let costs: Vec<(u64, i64)> = decision
        .candidates
        .iter()
        .map(|c| (c.worker.0, (c.cost * 1000.0).round() as i64))
        .collect();
    // w1: 9 - 4 = 5. w2: 9 - 1.6 = 7.4. w3: 9 + 6 decode + 32/16 queued prefill + 1 queued = 18.
    assert_eq!(costs, [(1, 5000), (2, 7400), (3, 18000)]);
    let w3 = &decision.candidates[2];
    assert_eq!(
        (
            w3.queued_prefill_blocks,
            w3.active_decode_blocks,
            w3.queue_depth
        ),
        (2.0, 6, 1)
    );
    assert!((decision.candidates[1].cached_blocks - 1.6).abs() < 1e-9);
}

#[test]
fn the_breakdown_is_capped_but_keeps_the_chosen_worker() {
    let shared = prompt(1, 4);
    let mut router = router_with(&[1, 2, 3, 4, 5], |c| c.breakdown_limit = 2);
    // w5 is the only one with a cache hit but also the busiest: it should still be chosen,
    // and kept in the breakdown.
    store(&mut router, 5, Tier::G1, &shared, &[0, 1, 2, 3]);
    router.apply_load(w(5), load(0, 3, 0), ms(1)).unwrap();
    let hashes = seqs(&shared);
    let decision = router
        .select(&RouteRequest::new(RequestId(1), &hashes, 4 * BS), ms(2))
        .unwrap();
    assert_eq!(decision.worker, w(5));
    let listed: Vec<u64> = decision.candidates.iter().map(|c| c.worker.0).collect();
    assert_eq!(listed, [5, 1]);
}

#[test]
fn route_errors() {
    let hashes = seqs(&prompt(1, 2));
    let request = RouteRequest::new(RequestId(1), &hashes, 32);
    let mut router = router_with(&[], |_| {});
    assert_eq!(router.select(&request, ms(1)), Err(RouteError::NoWorkers));
    router
        .add_worker(
            w(1),
            WorkerCapacity {
                kv_blocks: 4,
                max_queue_depth: Some(2),
            },
        )
        .unwrap();
    router
        .add_worker(
            w(2),
            WorkerCapacity {
                kv_blocks: 4,
                max_queue_depth: Some(2),
            },
        )
        .unwrap();
    let elsewhere = [w(7)];
    assert_eq!(
        router.select(&request.with_candidates(&elsewhere), ms(1)),
        Err(RouteError::NoWorkers)
    );
    router.apply_load(w(1), load(0, 3, 0), ms(1)).unwrap(); // 3 + 2 blocks > 4
    router.apply_load(w(2), load(0, 0, 2), ms(1)).unwrap(); // queue full
    assert_eq!(
        router.select(&request, ms(2)),
        Err(RouteError::Overloaded { candidates: 2 })
    );
    router.apply_load(w(2), load(0, 0, 1), ms(3)).unwrap();
    assert_eq!(router.select(&request, ms(4)).map(|d| d.worker), Ok(w(2)));
    assert_eq!(
        router.select(&request, ms(5)),
        Err(RouteError::DuplicateRequest(RequestId(1)))
    );
    let counters = router.route_counters();
    assert_eq!(
        (counters.routed, counters.no_workers, counters.overloaded),
        (1, 2, 1)
    );
}

#[test]
fn event_validation_rejects_counts_and_reports_gaps() {
    let blocks = prompt(1, 4);
    let mut router = router_with(&[1], |_| {});
    let stored = |id, range: std::ops::Range<usize>| {
        event(
            1,
            id,
            KvEventData::Stored {
                parent: range.start.checked_sub(1).map(|p| blocks[p].sequence),
                blocks: blocks[range].to_vec(),
            },
        )
    };
    assert_eq!(router.apply(&stored(0, 0..1), ms(1)), Ok(()));
    assert_eq!(
        router.apply(&event(9, 0, KvEventData::Cleared), ms(1)),
        Err(EventError::UnknownWorker {
            worker: w(9),
            event_id: 0
        })
    );
    assert_eq!(router.apply(&stored(1, 1..2), ms(1)), Ok(()));
    assert_eq!(
        router.apply(&stored(1, 1..2), ms(1)),
        Err(EventError::Duplicate {
            worker: w(1),
            event_id: 1
        })
    );
    assert_eq!(
        router.apply(&stored(0, 0..1), ms(1)),
        Err(EventError::OutOfOrder {
            worker: w(1),
            event_id: 0,
            expected: 2
        })
    );
    // Events 2..5 are lost; 5 is applied and reported.
    let err = router.apply(&stored(5, 2..3), ms(1)).unwrap_err();
    assert_eq!(
        err,
        EventError::Gap {
            worker: w(1),
            expected: 2,
            got: 5
        }
    );
    assert!(err.applied());
    assert!(router.holds(w(1), blocks[2].sequence, Tier::G1));
    assert_eq!(router.next_event_id(w(1)), Some(6));
    // A block that does not chain onto its parent: the engine hashes differently.
    let mut forged = blocks[3];
    forged.local = LocalBlockHash(forged.local.0 ^ 1);
    let bad = event(
        1,
        6,
        KvEventData::Stored {
            parent: Some(blocks[2].sequence),
            blocks: vec![forged],
        },
    );
    assert_eq!(
        router.apply(&bad, ms(1)),
        Err(EventError::BrokenChain {
            worker: w(1),
            event_id: 6,
            position: 0
        })
    );
    assert!(!router.holds(w(1), blocks[3].sequence, Tier::G1));
    assert_eq!(router.next_event_id(w(1)), Some(7), "the id was received");
    assert_eq!(
        router.event_counters(),
        EventCounters {
            applied: 3,
            unknown_worker: 1,
            duplicate: 1,
            out_of_order: 1,
            gaps: 1,
            broken_chain: 1,
        }
    );
}

#[test]
fn removed_and_cleared_events_take_blocks_out() {
    let blocks = prompt(1, 4);
    let mut router = router_with(&[1], |_| {});
    store(&mut router, 1, Tier::G1, &blocks, &[0, 1, 2, 3]);
    store(&mut router, 1, Tier::G2, &blocks, &[0, 1]);
    let next = router.next_event_id(w(1)).unwrap();
    let removed = KvEventData::Removed {
        blocks: vec![blocks[1].sequence, blocks[3].sequence],
    };
    router.apply(&event(1, next, removed), ms(1)).unwrap();
    assert_eq!(router.worker_blocks(w(1)), Some([2, 2, 0, 0]));
    let cleared = KvEvent {
        tier: Tier::G2,
        ..event(1, next + 1, KvEventData::Cleared)
    };
    router.apply(&cleared, ms(1)).unwrap();
    assert_eq!(router.worker_blocks(w(1)), Some([2, 0, 0, 0]));
    assert!(router.holds(w(1), blocks[2].sequence, Tier::G1));
}

#[test]
fn own_decisions_blend_with_load_reports() {
    let a = prompt(1, 4);
    let b = prompt(2, 4);
    let mut router = router_with(&[1], |_| {});
    let ha = seqs(&a);
    let hb = seqs(&b);
    // Request 1 at t=1: 64 new prompt tokens + 4 blocks.
    router
        .select(&RouteRequest::new(RequestId(1), &ha, 64), secs(1))
        .unwrap();
    assert_eq!(router.worker_load(w(1)), Some(load(64, 4, 0)));
    // The worker's report at t=2 includes request 1 (and another frontend's work).
    router.apply_load(w(1), load(200, 10, 1), secs(2)).unwrap();
    assert_eq!(router.worker_load(w(1)), Some(load(200, 10, 1)));
    // Request 2 at t=3 is newer than the report: it adds on top.
    router
        .select(&RouteRequest::new(RequestId(2), &hb, 64), secs(3))
        .unwrap();
    assert_eq!(router.worker_load(w(1)), Some(load(264, 14, 1)));
    // Request 1's blocks are stored: its prefill is over (taken off the report it is in).
    store(&mut router, 1, Tier::G1, &a, &[0, 1, 2, 3]);
    assert_eq!(router.worker_load(w(1)), Some(load(200, 14, 1)));
    // Request 1 finishes: its decode blocks come off the report too.
    assert_eq!(router.finished(RequestId(1), secs(4)), Some(w(1)));
    assert_eq!(router.worker_load(w(1)), Some(load(200, 10, 1)));
    // Request 2's first token came back before its blocks were reported stored.
    assert!(router.prefill_done(RequestId(2), secs(4)));
    assert_eq!(router.worker_load(w(1)), Some(load(136, 10, 1)));
    assert_eq!(router.finished(RequestId(2), secs(5)), Some(w(1)));
    assert_eq!(router.finished(RequestId(2), secs(5)), None);
    assert_eq!(router.worker_load(w(1)), Some(load(136, 6, 1)));
    // The next report is the truth again.
    router.apply_load(w(1), load(0, 0, 0), secs(6)).unwrap();
    assert_eq!(router.worker_load(w(1)), Some(load(0, 0, 0)));
}

#[test]
fn a_report_lag_keeps_recent_decisions_counted() {
    let a = seqs(&prompt(1, 2));
    let mut router = router_with(&[1], |c| c.report_lag = ms(500));
    router
        .select(&RouteRequest::new(RequestId(1), &a, 32), ms(1000))
        .unwrap();
    // Published 200 ms after the decision, the report cannot have seen it yet.
    router.apply_load(w(1), load(0, 0, 0), ms(1200)).unwrap();
    assert_eq!(router.worker_load(w(1)), Some(load(32, 2, 0)));
    router.apply_load(w(1), load(32, 2, 0), ms(1600)).unwrap();
    assert_eq!(
        router.worker_load(w(1)),
        Some(load(32, 2, 0)),
        "no double count"
    );
}

#[test]
fn forgotten_requests_time_out() {
    let a = seqs(&prompt(1, 2));
    let mut router = router_with(&[1, 2], |c| c.inflight_timeout = secs(10));
    for i in 0..3 {
        router
            .select(&RouteRequest::new(RequestId(i), &a, 32), secs(i as u64))
            .unwrap();
    }
    assert_eq!(router.inflight(), 3);
    // At t=11 requests made at t=0 and t=1 have timed out.
    router.apply_load(w(1), load(0, 0, 0), secs(11)).unwrap();
    assert_eq!(router.inflight(), 1);
    assert_eq!(router.route_counters().timed_out, 2);
    assert_eq!(router.finished(RequestId(0), secs(11)), None);
    assert_eq!(router.finished(RequestId(2), secs(11)), Some(w(1)));
    assert_eq!(router.worker_load(w(2)), Some(WorkerLoad::default()));
}

#[test]
fn approximate_mode_predicts_from_its_own_decisions_until_the_ttl() {
    let a = prompt(1, 6);
    let ha = seqs(&a);
    let mut router = router_with(&[1, 2], |c| {
        c.mode = RoutingMode::Approximate;
        c.approx_ttl = secs(60);
    });
    // Nothing known: a tie, broken by the prompt's rendezvous ranking.
    let first = router
        .select(&RouteRequest::new(RequestId(1), &ha, 96), secs(0))
        .unwrap();
    assert_eq!(first.overlap_blocks, 0);
    let (a, b) = (first.worker, if first.worker == w(1) { w(2) } else { w(1) });
    router.finished(RequestId(1), secs(1));
    assert!(router.holds(a, ha[5], Tier::G1) && !router.holds(b, ha[0], Tier::G1));
    // `a` now has a little prefill queued, but it is predicted to hold the prompt.
    router.apply_load(a, load(16, 0, 0), secs(2)).unwrap();
    let again = router
        .select(&RouteRequest::new(RequestId(2), &ha[..4], 64), secs(30))
        .unwrap();
    assert_eq!((again.worker, again.overlap_blocks), (a, 4));
    router.finished(RequestId(2), secs(31));
    // At t=61 the first prediction has expired, but blocks 0..4 were predicted again at t=30.
    let later = router
        .select(&RouteRequest::new(RequestId(3), &ha, 96), secs(61))
        .unwrap();
    assert_eq!((later.worker, later.overlap_blocks), (a, 4));
    router.finished(RequestId(3), secs(62));
    assert!(router.holds(a, ha[5], Tier::G1), "re-predicted at t=61");
    // Past every TTL the index is empty but for the new request's prediction.
    let other = seqs(&prompt(2, 1));
    let d = router
        .select(&RouteRequest::new(RequestId(4), &other, 16), secs(200))
        .unwrap();
    let idle = if d.worker == a { b } else { a };
    assert_eq!(router.worker_blocks(idle), Some([0, 0, 0, 0]));
    assert_eq!(
        router.index_stats().blocks,
        1,
        "only request 4's prediction"
    );
}

#[test]
fn kv_blocks_mode_does_not_predict() {
    let ha = seqs(&prompt(1, 4));
    let mut router = router_with(&[1], |_| {});
    router
        .select(&RouteRequest::new(RequestId(1), &ha, 64), secs(0))
        .unwrap();
    assert_eq!(router.index_stats().blocks, 0);
}

#[test]
fn kv_mode_counts_a_prompt_being_computed_until_events_confirm_it_or_it_fails() {
    // 8,192 tokens: about 180 ms of prefill with the router's nominal profile.
    let a = prompt(1, 512);
    let ha = seqs(&a);
    let mut router = router_with(&[1, 2], |c| c.mode = RoutingMode::Kv);
    store(&mut router, 2, Tier::G1, &a, &[0, 1]);
    let first = router
        .select(&RouteRequest::new(RequestId(1), &ha, 512 * BS), secs(0))
        .unwrap();
    let w = first.worker;
    // The worker is computing the rest of the prompt: a request sharing it sees the blocks
    // there at once, before any event, and once the worker reports most of the prefill done,
    // waiting for it beats computing the whole prompt elsewhere.
    assert!(router.holds(w, ha[511], Tier::G1));
    router.apply_load(w, load(1024, 0, 0), ms(150)).unwrap();
    let second = router
        .select(&RouteRequest::new(RequestId(2), &ha, 512 * BS), ms(160))
        .unwrap();
    assert_eq!((second.worker, second.overlap_blocks), (w, 512));
    // The engine reports the blocks: the prefill is done and the blocks stay.
    store(
        &mut router,
        w.0,
        Tier::G1,
        &a,
        &(0..512).collect::<Vec<_>>(),
    );
    router.finished(RequestId(1), secs(1));
    router.finished(RequestId(2), secs(1));
    assert!(router.holds(w, ha[511], Tier::G1));
    // A prompt whose request fails before its prefill ends leaves nothing behind.
    let b = seqs(&prompt(2, 4));
    let d = router
        .select(&RouteRequest::new(RequestId(3), &b, 64), secs(2))
        .unwrap();
    assert!(router.holds(d.worker, b[3], Tier::G1));
    router.finished(RequestId(3), secs(3));
    assert!(!router.holds(d.worker, b[0], Tier::G1));
    assert!(!router.holds(d.worker, b[3], Tier::G1));
}

#[test]
fn round_robin_and_random_cover_every_worker_deterministically() {
    let ha = seqs(&prompt(1, 1));
    let mut rr = router_with(&[3, 1, 2], |c| c.mode = RoutingMode::RoundRobin);
    let order: Vec<u64> = (0..6)
        .map(|i| {
            rr.select(&RouteRequest::new(RequestId(i), &ha, 16), secs(0))
                .unwrap()
                .worker
                .0
        })
        .collect();
    assert_eq!(order, [1, 2, 3, 1, 2, 3]);

    let picks = |seed| {
        let mut router = router_with(&[1, 2, 3, 4], |c| {
            c.mode = RoutingMode::Random;
            c.seed = seed;
        });
        (0..64)
            .map(|i| {
                router
                    .select(&RouteRequest::new(RequestId(i), &ha, 16), secs(0))
                    .unwrap()
                    .worker
                    .0
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(picks(7), picks(7));
    assert_ne!(picks(7), picks(8));
    assert_eq!(picks(7).into_iter().collect::<BTreeSet<_>>().len(), 4);
}

#[test]
fn temperature_samples_cheaper_workers_more_often() {
    let shared = prompt(1, 8);
    let hashes = seqs(&shared);
    let run = |temperature: f64, seed: u64| {
        let mut router = router_with(&[1, 2, 3], |c| {
            c.temperature = temperature;
            c.seed = seed;
        });
        store(&mut router, 1, Tier::G1, &shared, &[0, 1, 2, 3, 4, 5, 6, 7]);
        store(&mut router, 2, Tier::G1, &shared, &[0, 1, 2, 3]);
        let mut counts = [0u32; 3];
        for i in 0..600 {
            let d = router
                .select(&RouteRequest::new(RequestId(i), &hashes, 128), secs(0))
                .unwrap();
            router.finished(RequestId(i), secs(0));
            counts[d.worker.0 as usize - 1] += 1;
        }
        counts
    };
    assert_eq!(run(0.0, 1), [600, 0, 0]);
    let warm = run(0.5, 1);
    assert_eq!(warm, run(0.5, 1), "same seed, same choices");
    assert!(warm[0] > warm[1] && warm[1] > warm[2], "{warm:?}");
    assert!(warm[2] > 0, "{warm:?}");
}

#[test]
fn removing_a_worker_takes_its_blocks_and_requests_at_once() {
    let a = prompt(1, 4);
    let ha = seqs(&a);
    let mut router = router_with(&[1, 2], |_| {});
    store(&mut router, 1, Tier::G1, &a, &[0, 1, 2, 3]);
    store(&mut router, 2, Tier::G1, &a, &[0, 1]);
    let d = router
        .select(&RouteRequest::new(RequestId(1), &ha, 64), secs(0))
        .unwrap();
    assert_eq!(d.worker, w(1));
    assert!(router.remove_worker(w(1)));
    assert!(!router.remove_worker(w(1)));
    assert_eq!(router.index_stats().entries, 2);
    assert_eq!(router.finished(RequestId(1), secs(1)), None);
    let d = router
        .select(&RouteRequest::new(RequestId(2), &ha, 64), secs(1))
        .unwrap();
    assert_eq!((d.worker, d.overlap_blocks), (w(2), 2));
    // A new worker reusing the slot starts empty and expects event 0.
    router.add_worker(w(3), WorkerCapacity::default()).unwrap();
    assert_eq!(router.worker_blocks(w(3)), Some([0; 4]));
    assert_eq!(router.next_event_id(w(3)), Some(0));
    assert_eq!(router.workers().collect::<Vec<_>>(), [w(2), w(3)]);
}

#[test]
fn an_engine_restart_resets_blocks_and_event_ids() {
    let a = prompt(1, 2);
    let mut router = router_with(&[1], |_| {});
    store(&mut router, 1, Tier::G1, &a, &[0, 1]);
    router.reset_worker(w(1)).unwrap();
    assert_eq!(router.worker_blocks(w(1)), Some([0; 4]));
    assert_eq!(router.next_event_id(w(1)), Some(0));
    assert_eq!(router.reset_worker(w(5)), Err(UnknownWorker(w(5))));
}

#[test]
fn snapshots_round_trip_and_resync_a_worker_after_a_gap() {
    let a = prompt(1, 4);
    let b = prompt(2, 3);
    let mut source = router_with(&[1, 2], |_| {});
    store(&mut source, 1, Tier::G1, &a, &[0, 1, 2, 3]);
    store(&mut source, 1, Tier::G3, &b, &[0, 1]);
    store(&mut source, 2, Tier::G1, &a, &[0, 1]);
    let snapshot = source.snapshot();
    let json = serde_json::to_string(&snapshot).unwrap();
    let back: IndexSnapshot = serde_json::from_str(&json).unwrap();
    assert_eq!(back, snapshot);

    let mut replica = router_with(&[1, 2], |_| {});
    // The replica saw one event from w1 then lost the rest.
    store(&mut replica, 1, Tier::G2, &b, &[0]);
    let report = replica.restore(&IndexSnapshot {
        workers: back
            .workers
            .iter()
            .cloned()
            .chain([WorkerSnapshot {
                worker: w(9),
                next_event_id: 0,
                tiers: vec![],
            }])
            .collect(),
    });
    assert_eq!(
        report,
        RestoreReport {
            restored: 2,
            unknown: vec![w(9)]
        }
    );
    assert_eq!(replica.snapshot(), snapshot);
    assert_eq!(replica.next_event_id(w(1)), Some(6));
    assert!(
        !replica.holds(w(1), b[0].sequence, Tier::G2),
        "replaced, not merged"
    );

    // Per-worker re-sync after a gap.
    let next = source.next_event_id(w(2)).unwrap();
    let removed = KvEventData::Removed {
        blocks: vec![a[1].sequence],
    };
    source.apply(&event(2, next, removed), ms(1)).unwrap();
    source
        .apply(&event(2, next + 1, KvEventData::Cleared), ms(1))
        .unwrap();
    let gap = replica.apply(&event(2, next + 1, KvEventData::Cleared), ms(1));
    assert!(matches!(gap, Err(EventError::Gap { .. })));
    replica
        .restore_worker(&source.worker_snapshot(w(2)).unwrap())
        .unwrap();
    assert_eq!(replica.snapshot(), source.snapshot());
    assert_eq!(
        replica.restore_worker(&WorkerSnapshot {
            worker: w(4),
            next_event_id: 0,
            tiers: vec![]
        }),
        Err(UnknownWorker(w(4)))
    );
}

// ----- property test: the index against a reference model --------------------------------------

#[derive(Debug, Clone)]
enum Op {
    Stored {
        worker: u64,
        tier: Tier,
        blocks: Vec<u64>,
    },
    Removed {
        worker: u64,
        tier: Tier,
        blocks: Vec<u64>,
    },
    Cleared {
        worker: u64,
        tier: Tier,
    },
    RemoveWorker(u64),
    AddWorker(u64),
    Query(Vec<u64>),
}

fn tier() -> impl Strategy<Value = Tier> {
    prop::sample::select(Tier::ALL.to_vec())
}

/// Small universes so that workers, blocks and tiers collide often.
fn op() -> impl Strategy<Value = Op> {
    let worker = 1u64..=5;
    let blocks = prop::collection::vec(0u64..16, 0..6);
    prop_oneof![
        4 => (worker.clone(), tier(), blocks.clone())
            .prop_map(|(worker, tier, blocks)| Op::Stored { worker, tier, blocks }),
        2 => (worker.clone(), tier(), blocks.clone())
            .prop_map(|(worker, tier, blocks)| Op::Removed { worker, tier, blocks }),
        1 => (worker.clone(), tier()).prop_map(|(worker, tier)| Op::Cleared { worker, tier }),
        1 => worker.clone().prop_map(Op::RemoveWorker),
        1 => worker.prop_map(Op::AddWorker),
        3 => prop::collection::vec(0u64..16, 0..8).prop_map(Op::Query),
    ]
}

/// The reference: per (worker, tier), a plain set of block hashes.
#[derive(Default)]
struct Model {
    workers: BTreeMap<u64, u64>, // worker → next event id
    held: BTreeMap<(u64, Tier), BTreeSet<u64>>,
}

impl Model {
    fn holds_any_tier(&self, worker: u64, block: u64) -> bool {
        Tier::ALL.iter().any(|t| {
            self.held
                .get(&(worker, *t))
                .is_some_and(|s| s.contains(&block))
        })
    }

    fn snapshot(&self) -> IndexSnapshot {
        IndexSnapshot {
            workers: self
                .workers
                .iter()
                .map(|(&worker, &next)| WorkerSnapshot {
                    worker: w(worker),
                    next_event_id: next,
                    tiers: Tier::ALL
                        .iter()
                        .filter_map(|&tier| {
                            let set = self.held.get(&(worker, tier))?;
                            (!set.is_empty()).then(|| TierBlocks {
                                tier,
                                blocks: set.iter().map(|&b| SequenceHash(b)).collect(),
                            })
                        })
                        .collect(),
                })
                .collect(),
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn the_index_agrees_with_a_reference_model(ops in prop::collection::vec(op(), 1..60)) {
        // Chains are not checked here: the blocks are bare numbers, not real hashes.
        let mut router = router_with(&[1, 2, 3, 4], |c| c.verify_chains = false);
        let mut model = Model::default();
        for id in 1..=4 {
            model.workers.insert(id, 0);
        }
        let mut request = 0u128;
        for op in ops {
            let (worker, tier, data) = match op {
                Op::Stored { worker, tier, blocks } => {
                    let blocks = blocks
                        .iter()
                        .map(|&b| BlockHash { local: LocalBlockHash(b), sequence: SequenceHash(b) })
                        .collect();
                    (worker, tier, KvEventData::Stored { parent: None, blocks })
                }
                Op::Removed { worker, tier, blocks } => {
                    let blocks = blocks.into_iter().map(SequenceHash).collect();
                    (worker, tier, KvEventData::Removed { blocks })
                }
                Op::Cleared { worker, tier } => (worker, tier, KvEventData::Cleared),
                Op::RemoveWorker(worker) => {
                    prop_assert_eq!(router.remove_worker(w(worker)), model.workers.remove(&worker).is_some());
                    model.held.retain(|(wk, _), _| *wk != worker);
                    continue;
                }
                Op::AddWorker(worker) => {
                    let new = router.add_worker(w(worker), WorkerCapacity::default()).unwrap();
                    prop_assert_eq!(new, !model.workers.contains_key(&worker));
                    model.workers.entry(worker).or_insert(0);
                    continue;
                }
                Op::Query(blocks) => {
                    let hashes: Vec<SequenceHash> = blocks.iter().map(|&b| SequenceHash(b)).collect();
                    request += 1;
                    let decision = router.select(
                        &RouteRequest::new(RequestId(request), &hashes, hashes.len() as u32 * BS),
                        Duration::ZERO,
                    );
                    router.finished(RequestId(request), Duration::ZERO);
                    if model.workers.is_empty() {
                        prop_assert_eq!(decision, Err(RouteError::NoWorkers));
                        continue;
                    }
                    let decision = decision.unwrap();
                    prop_assert_eq!(decision.candidates.len(), model.workers.len());
                    for candidate in &decision.candidates {
                        let worker = candidate.worker.0;
                        let expected = blocks
                            .iter()
                            .take_while(|&&b| model.holds_any_tier(worker, b))
                            .count() as u32;
                        prop_assert_eq!(candidate.overlap_blocks, expected, "worker {}", worker);
                    }
                    continue;
                }
            };
            let Some(&next) = model.workers.get(&worker) else {
                let result = router.apply(&KvEvent { worker: w(worker), event_id: 0, tier, data }, Duration::ZERO);
                prop_assert!(
                    matches!(result, Err(EventError::UnknownWorker { .. })),
                    "unexpected {:?}", result
                );
                continue;
            };
            let event = KvEvent { worker: w(worker), event_id: next, tier, data: data.clone() };
            prop_assert_eq!(router.apply(&event, Duration::ZERO), Ok(()));
            model.workers.insert(worker, next + 1);
            let set = model.held.entry((worker, tier)).or_default();
            match data {
                KvEventData::Stored { blocks, .. } => set.extend(blocks.iter().map(|b| b.sequence.0)),
                KvEventData::Removed { blocks } => {
                    for b in blocks {
                        set.remove(&b.0);
                    }
                }
                KvEventData::Cleared => set.clear(),
            }
        }
        prop_assert_eq!(router.snapshot(), model.snapshot());
        let entries: usize = model.held.values().map(BTreeSet::len).sum();
        prop_assert_eq!(router.index_stats().entries, entries as u64);
        let distinct: BTreeSet<u64> = model.held.values().flatten().copied().collect();
        prop_assert_eq!(router.index_stats().blocks, distinct.len() as u64);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// With temperature 0 the chosen worker has the lowest cost, equal costs go to the lower
    /// load, and each cost is the documented formula of the worker's overlap and load.
    #[test]
    fn kv_blocks_selection_minimises_the_documented_cost(
        workers in prop::collection::vec((0usize..=8, 0u64..40, 0u64..400, 0u32..4), 1..8),
        blocks in 0usize..=8,
        partial in 0u32..16,
    ) {
        let shared = prompt(3, 8);
        let mut router = router_with(&[], |_| {});
        for (i, &(held, decode, prefill, queue)) in workers.iter().enumerate() {
            let id = i as u64 + 1;
            router.add_worker(w(id), WorkerCapacity::default()).unwrap();
            store(&mut router, id, Tier::G1, &shared, &(0..held).collect::<Vec<_>>());
            router.apply_load(w(id), load(prefill, decode, queue), ms(1)).unwrap();
        }
        let hashes = seqs(&shared[..blocks]);
        let tokens = blocks as u32 * BS + partial;
        let decision = router.select(&RouteRequest::new(RequestId(1), &hashes, tokens), ms(2)).unwrap();
        let request_blocks = tokens.div_ceil(BS) as f64;
        prop_assert_eq!(decision.candidates.len(), workers.len());
        for c in &decision.candidates {
            let (held, decode, prefill, queue) = workers[c.worker.0 as usize - 1];
            let overlap = held.min(blocks) as f64;
            let expected = (request_blocks - overlap)
                + decode as f64
                + prefill as f64 / f64::from(BS)
                + f64::from(queue);
            prop_assert!((c.cost - expected).abs() < 1e-9, "{:?} expected {}", c, expected);
        }
        let chosen = decision.candidates.iter().find(|c| c.worker == decision.worker).unwrap();
        for c in &decision.candidates {
            prop_assert!(chosen.cost <= c.cost + 1e-9);
            if (chosen.cost - c.cost).abs() < 1e-9 {
                prop_assert!(chosen.load() <= c.load() + 1e-9);
            }
        }
    }
}

mod time;
