//! The time-based `kv` mode: selection by predicted time, spreading ties and cold requests,
//! replication of a hot prefix by routing, and predictions checked against outcomes.

use std::sync::Arc;

use kvfleet_proto::profile::PerfProfile;

use super::*;

/// The default mock's profile (Llama 3.1 8B on one H100, block size 16, 8,192 tokens a step),
/// with host memory (G2) onboarding at 25 GB/s (the figures below are computed from that).
fn mock_profile() -> Arc<PerfProfile> {
    let mut profile =
        PerfProfile::from_toml_str(kvfleet_engine::DEFAULT_PERF_PROFILE_TOML).unwrap();
    profile.tiers.retain(|t| t.tier != Tier::G2);
    profile.tiers.push(kvfleet_proto::profile::TierCost {
        tier: Tier::G2,
        bytes_per_second: 25e9,
        latency_ms: 0.05,
    });
    Arc::new(profile)
}

/// A `kv`-mode router with the mock's profile for every worker.
fn timed(workers: &[u64], f: impl FnOnce(&mut RouterConfig)) -> Router {
    let mut router = router_with(workers, |c| {
        c.mode = RoutingMode::Kv;
        f(c);
    });
    router.set_default_profile(mock_profile()).unwrap();
    router
}

/// One worker of a time-based selection row.
struct T {
    id: u64,
    /// Leading blocks of the request it holds, and in which tier.
    held: usize,
    tier: Tier,
    load: WorkerLoad,
}

const fn t(id: u64, held: usize, load: WorkerLoad) -> T {
    T {
        id,
        held,
        tier: Tier::G1,
        load,
    }
}

const fn l(prefill_tokens: u64, decode_blocks: u64) -> WorkerLoad {
    WorkerLoad {
        prefill_tokens,
        decode_blocks,
        queue_depth: 0,
    }
}

#[test]
fn kv_selection_table() {
    // (name, workers, prompt blocks, expected worker in kv, expected worker in kv-blocks)
    let rows: Vec<(&str, Vec<T>, usize, u64, u64)> = vec![
        (
            "a prefix hit wins on equal load",
            vec![t(1, 0, l(0, 0)), t(2, 512, l(0, 0))],
            1024,
            2,
            2,
        ),
        (
            "a hit behind a long prefill queue is not worth what it costs",
            // w2 holds half the prompt but has 64k tokens (≈1.3 s) queued: recomputing all
            // 16k tokens on the idle w1 (≈340 ms) is faster. In blocks: 512 new vs
            // 1024 new + 4096 queued, so kv-blocks waits.
            vec![t(1, 0, l(0, 0)), t(2, 512, l(65_536, 0))],
            1024,
            1,
            1,
        ),
        (
            "decode blocks cost little time, a prefill queue a lot",
            // w1 decodes 40k tokens of context (2,500 blocks: the per-token cost grows a few
            // ms); w2 has 8k prompt tokens to prefill first (≈170 ms). kv-blocks counts 2,500
            // decode blocks against 512 queued ones and picks w2.
            vec![t(1, 0, l(0, 2_500)), t(2, 0, l(8_192, 0))],
            256,
            1,
            2,
        ),
        (
            "blocks in host memory are onboarded, not recomputed",
            vec![
                T {
                    tier: Tier::G2,
                    ..t(1, 1024, l(0, 0))
                },
                t(2, 256, l(0, 0)),
            ],
            1024,
            1,
            1,
        ),
    ];
    let shared = prompt(7, 1024);
    for (name, workers, blocks, expect_kv, expect_blocks) in rows {
        for (mode, expect) in [
            (RoutingMode::Kv, expect_kv),
            (RoutingMode::KvBlocks, expect_blocks),
        ] {
            let mut router = timed(&[], |c| c.mode = mode);
            for worker in &workers {
                router
                    .add_worker(w(worker.id), WorkerCapacity::default())
                    .unwrap();
                let held: Vec<usize> = (0..worker.held).collect();
                store(&mut router, worker.id, worker.tier, &shared, &held);
                router.apply_load(w(worker.id), worker.load, ms(1)).unwrap();
            }
            let hashes = seqs(&shared[..blocks]);
            let request = RouteRequest::new(RequestId(1), &hashes, blocks as u32 * BS);
            let decision = router.select(&request, ms(2)).unwrap();
            assert_eq!(decision.worker, w(expect), "{name} ({mode}): {decision:#?}");
        }
    }
}

#[test]
fn the_cost_is_the_predicted_time_and_explains_itself() {
    let shared = prompt(1, 256);
    let mut router = timed(&[1, 2], |_| {});
    store(
        &mut router,
        2,
        Tier::G1,
        &shared,
        &(0..128).collect::<Vec<_>>(),
    );
    router.apply_load(w(2), l(1024, 0), ms(1)).unwrap();
    let hashes = seqs(&shared);
    let decision = router
        .select(&RouteRequest::new(RequestId(1), &hashes, 256 * BS), ms(2))
        .unwrap();
    let profile = mock_profile();
    for c in &decision.candidates {
        let time = c.time.expect("every candidate is timed in kv mode");
        assert_eq!(
            c.cost, time.ttft_ms,
            "nothing decodes there, so nothing is slowed: {c:?}"
        );
        let sum = time.queue_ms + time.prefill_ms + time.decode_ms + time.onboard_ms;
        assert!((sum - time.ttft_ms).abs() < 1e-9, "{time:?}");
    }
    let w2 = decision
        .candidates
        .iter()
        .find(|c| c.worker == w(2))
        .unwrap();
    let time = w2.time.unwrap();
    // 2,048 cached tokens, 2,048 new; 1,024 tokens queued ahead.
    let prefill = profile.prefill_ms(2048, 2048);
    let queue = profile.prefill_curve_ms(1024) - profile.prefill_curve_ms(0);
    assert!((time.prefill_ms - prefill).abs() < 1e-9, "{time:?}");
    assert!((time.queue_ms - queue).abs() < 1e-9, "{time:?}");
    assert_eq!(decision.worker, w(2));
    assert_eq!(decision.predicted_ttft_ms, time.ttft_ms);
}

#[test]
fn a_request_sent_during_a_prefill_step_waits_for_all_of_it() {
    // Agent bursts: siblings sharing a prompt reach one worker within a few ms. The first
    // finds it idle and its prefill starts at once; the second cannot join that step, so it
    // waits for the rest of it (not the marginal time of batching with it), then its own.
    let profile = mock_profile();
    let mut router = timed(&[1], |_| {});
    let first = seqs(&prompt(1, 64));
    let a = router
        .select(&RouteRequest::new(RequestId(1), &first, 64 * BS), ms(0))
        .unwrap();
    let step_ms = a.predicted_ttft_ms;
    assert!(
        (step_ms - profile.prefill_ms(1024, 0)).abs() < 1e-9,
        "{a:?}"
    );
    let second = seqs(&prompt(2, 64));
    let b = router
        .select(&RouteRequest::new(RequestId(2), &second, 64 * BS), ms(5))
        .unwrap();
    let queue = b.candidates[0].time.unwrap().queue_ms;
    assert!(
        (queue - (step_ms - 5.0)).abs() < 1e-6,
        "{queue} vs {step_ms}: {b:?}"
    );
    // Once the first token came back, the step is over: the queue is what is still waiting.
    router.prefill_done(RequestId(1), ms(20));
    let third = seqs(&prompt(3, 64));
    let c = router
        .select(&RouteRequest::new(RequestId(3), &third, 64 * BS), ms(21))
        .unwrap();
    let queue = c.candidates[0].time.unwrap().queue_ms;
    let waiting = profile.prefill_curve_ms(1024) - profile.prefill_curve_ms(0);
    assert!(
        (queue - waiting).abs() < 1e-6,
        "{queue} vs {waiting}: {c:?}"
    );
}

#[test]
fn cold_requests_spread_instead_of_sinking_into_the_lowest_id() {
    let count = |mode| {
        let mut router = timed(&[1, 2, 3, 4, 5, 6, 7, 8], |c| c.mode = mode);
        let mut per_worker = BTreeMap::new();
        for i in 0..400u32 {
            // Each request is new and finishes before the next: the fleet is idle every time.
            let hashes = seqs(&prompt(1000 + i, 8));
            let d = router
                .select(
                    &RouteRequest::new(RequestId(u128::from(i)), &hashes, 128),
                    secs(u64::from(i)),
                )
                .unwrap();
            router.finished(RequestId(u128::from(i)), secs(u64::from(i)) + ms(500));
            *per_worker.entry(d.worker.0).or_insert(0u32) += 1;
        }
        per_worker
    };
    let blocks = count(RoutingMode::KvBlocks);
    assert_eq!(
        blocks.get(&1),
        Some(&400),
        "kv-blocks sends every tie to the lowest id"
    );
    let kv = count(RoutingMode::Kv);
    assert_eq!(kv.len(), 8, "{kv:?}");
    assert!(kv.values().all(|&n| (25..=75).contains(&n)), "{kv:?}");
}

#[test]
fn a_cold_request_goes_where_its_blocks_displace_the_least() {
    let mut router = timed(&[], |_| {});
    for id in 1..=3 {
        router
            .add_worker(
                w(id),
                WorkerCapacity {
                    kv_blocks: 1000,
                    max_queue_depth: None,
                },
            )
            .unwrap();
    }
    // w1 and w3 have full caches of other prompts; w2 has room.
    for (id, held) in [(1, 1000), (2, 200), (3, 990)] {
        let other = prompt(500 + id as u32, held);
        store(
            &mut router,
            id,
            Tier::G1,
            &other,
            &(0..held).collect::<Vec<_>>(),
        );
    }
    for i in 0..20u32 {
        let hashes = seqs(&prompt(2000 + i, 4));
        let d = router
            .select(
                &RouteRequest::new(RequestId(u128::from(i)), &hashes, 64),
                secs(u64::from(i)),
            )
            .unwrap();
        router.finished(RequestId(u128::from(i)), secs(u64::from(i)) + ms(100));
        assert_eq!(d.worker, w(2), "request {i}");
    }
}

#[test]
fn a_hot_prefix_spills_to_a_second_worker_and_comes_back_when_it_cools() {
    // A 4,096-token system prompt that w1 holds; every request adds 128 tokens of its own.
    let system = prompt(9, 256);
    let mut router = timed(&[1, 2, 3, 4], |_| {});
    store(
        &mut router,
        1,
        Tier::G1,
        &system,
        &(0..256).collect::<Vec<_>>(),
    );
    let request = |i: u32| -> (Vec<SequenceHash>, u32) {
        let tokens: Vec<u32> = (0..256 * BS)
            .map(|t| t * 7 + 9 * 100_003)
            .chain((0..128).map(|t| t * 13 + i * 7919 + 1))
            .collect();
        let hashes = block_hashes(&tokens, BlockSize::new(BS).unwrap());
        (seqs(&hashes), tokens.len() as u32)
    };
    // A burst of 40 at once: w1 takes the first ones (a hit costs ~20 ms against ~86 ms of
    // recompute), until its queue makes recomputing the prefix elsewhere faster.
    let mut burst = BTreeMap::new();
    for i in 0..40u32 {
        let (hashes, tokens) = request(i);
        let d = router
            .select(
                &RouteRequest::new(RequestId(u128::from(i)), &hashes, tokens),
                ms(10),
            )
            .unwrap();
        *burst.entry(d.worker.0).or_insert(0u32) += 1;
        if d.worker != w(1) && d.overlap_blocks == 0 {
            // The new holder computed the prefix: its engine reports it.
            store(
                &mut router,
                d.worker.0,
                Tier::G1,
                &system,
                &(0..256).collect::<Vec<_>>(),
            );
        }
    }
    assert!(burst[&1] >= 5, "the holder serves what it can: {burst:?}");
    assert!(
        burst.len() >= 2,
        "a second worker takes the prefix on: {burst:?}"
    );
    for i in 0..40u32 {
        // Their first tokens come, then their last (what a driver reports).
        router.prefill_done(RequestId(u128::from(i)), secs(2));
        router.finished(RequestId(u128::from(i)), secs(5));
    }
    let holders: Vec<u64> = (1..=4)
        .filter(|&id| router.holds(w(id), system[255].sequence, Tier::G1))
        .collect();
    assert!(holders.len() >= 2, "{holders:?}");
    // Cooled down: one request at a time. They all go to one holder, so the other copies
    // can age out of the other caches.
    let mut cool = BTreeMap::new();
    for i in 100..120u32 {
        let (hashes, tokens) = request(i);
        let at = secs(u64::from(i));
        let d = router
            .select(
                &RouteRequest::new(RequestId(u128::from(i)), &hashes, tokens),
                at,
            )
            .unwrap();
        router.finished(RequestId(u128::from(i)), at + ms(300));
        *cool.entry(d.worker.0).or_insert(0u32) += 1;
    }
    assert_eq!(cool.len(), 1, "{cool:?}");
    assert!(
        holders.contains(cool.keys().next().unwrap()),
        "{cool:?} {holders:?}"
    );
}

#[test]
fn predictions_are_checked_and_a_slow_worker_without_a_profile_is_learned() {
    // No profile: both are costed with the nominal placeholder, and learn their scale.
    let mut router = router_with(&[1, 2], |c| {
        c.mode = RoutingMode::Kv;
        c.learn_rate = 0.2;
    });
    let nominal = TimeModel::nominal(BS);
    // Worker 1 is twice as slow as its profile says; worker 2 is as fast.
    let mut at = Duration::ZERO;
    for i in 0..200u32 {
        let hashes = seqs(&prompt(3000 + i, 64));
        let id = RequestId(u128::from(i));
        // Alternate, so that both keep being measured.
        let only = [w(1 + u64::from(i % 2))];
        let d = router
            .select(
                &RouteRequest::new(id, &hashes, 1024).with_candidates(&only),
                at,
            )
            .unwrap();
        assert!(d.predicted_ttft_ms > 0.0);
        let correction = router.worker_correction(d.worker).unwrap();
        let truth = nominal.prefill_ms(1024, 0) * if d.worker == w(1) { 2.0 } else { 1.0 };
        let actual = Duration::from_secs_f64(truth / 1e3);
        // What the nominal model alone says, times what has been learned so far.
        assert!((d.predicted_ttft_ms - correction * nominal.prefill_ms(1024, 0)).abs() < 1e-6);
        assert!(router.prefill_done(id, at + actual));
        router.finished(id, at + actual + ms(100));
        at += secs(1);
    }
    let w1 = router.worker_correction(w(1)).unwrap();
    let w2 = router.worker_correction(w(2)).unwrap();
    assert!((w1 - 2.0).abs() < 0.05, "{w1}");
    assert!((w2 - 1.0).abs() < 0.05, "{w2}");
    let summary = router.prediction_errors().summary();
    assert_eq!(summary.count, 200);
    // The first predictions on w1 were 50 % low; once learned they are right.
    assert!(summary.bias_ms < 0.0, "{summary:?}");
    assert!(summary.rel_p50 <= 0.01, "{summary:?}");
    // The slow worker is avoided once known.
    let decision = router
        .select(
            &RouteRequest::new(RequestId(999), &seqs(&prompt(9999, 64)), 1024),
            at,
        )
        .unwrap();
    assert_eq!(decision.worker, w(2));
    // A profile is a measurement: setting one drops what was learned, and stops learning.
    router.set_default_profile(mock_profile()).unwrap();
    assert_eq!(router.worker_correction(w(1)), Some(1.0));
}

#[test]
fn an_engine_reported_ttft_is_what_gets_checked() {
    let mut router = timed(&[1], |_| {});
    let hashes = seqs(&prompt(1, 64));
    let d = router
        .select(&RouteRequest::new(RequestId(1), &hashes, 1024), secs(1))
        .unwrap();
    // The first token reached the router 500 ms later, but the engine says 40 ms of it were
    // its own: the rest was transport and queueing in front of the engine.
    let engine = Duration::from_secs_f64(d.predicted_ttft_ms / 1e3 * 1.25);
    assert!(router.prefill_done_with_ttft(RequestId(1), engine, secs(1) + ms(500)));
    let s = router.prediction_errors().summary();
    assert_eq!(s.count, 1);
    assert!((s.rel_p50 - 0.20).abs() < 0.011, "{s:?}");
    // A second report of the same first token is not counted again.
    assert!(router.prefill_done(RequestId(1), secs(2)));
    assert_eq!(router.prediction_errors().count(), 1);
}

#[test]
fn a_full_worker_costs_the_wait_for_its_decodes_to_end() {
    let mut router = timed(&[], |_| {});
    for id in [1, 2] {
        let capacity = WorkerCapacity {
            kv_blocks: 2000,
            max_queue_depth: None,
        };
        router.add_worker(w(id), capacity).unwrap();
    }
    // Both hold the prompt's first 64 blocks; w1 has 1,900 blocks of running requests.
    let shared = prompt(4, 512);
    for id in [1, 2] {
        store(
            &mut router,
            id,
            Tier::G1,
            &shared,
            &(0..64).collect::<Vec<_>>(),
        );
    }
    router.apply_load(w(1), l(0, 1900), ms(1)).unwrap();
    let hashes = seqs(&shared);
    let d = router
        .select(&RouteRequest::new(RequestId(1), &hashes, 512 * BS), ms(2))
        .unwrap();
    assert_eq!(d.worker, w(2));
    let w1 = d.candidates.iter().find(|c| c.worker == w(1)).unwrap();
    assert!(w1.time.unwrap().memory_ms > 0.0, "{w1:?}");
}

#[test]
fn profiles_are_checked_per_worker() {
    let mut router = timed(&[1], |_| {});
    let mut other = (*mock_profile()).clone();
    other.block_size = 32;
    let err = router.set_profile(w(1), Some(Arc::new(other))).unwrap_err();
    assert!(err.to_string().contains("block_size"), "{err}");
    assert_eq!(
        router.set_profile(w(9), Some(mock_profile())),
        Err(SetProfileError::UnknownWorker(UnknownWorker(w(9))))
    );
    // A faster device's profile makes its worker the cheaper one.
    router.add_worker(w(2), WorkerCapacity::default()).unwrap();
    let mut fast = (*mock_profile()).clone();
    for ms in &mut fast.prefill.ms {
        *ms /= 2.0;
    }
    router.set_profile(w(2), Some(Arc::new(fast))).unwrap();
    let hashes = seqs(&prompt(5, 64));
    let d = router
        .select(&RouteRequest::new(RequestId(1), &hashes, 1024), ms(1))
        .unwrap();
    assert_eq!(d.worker, w(2));
}
