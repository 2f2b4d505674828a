//! End-to-end tests of the simulator on small synthetic traces.

use std::time::Duration;

use kvfleet_engine::{Engine, PoolSizing};
use kvfleet_kv_router::RoutingMode;
use proptest::prelude::*;

use crate::report::SimReport;
use crate::sim::{SimConfig, SimError, run};
use crate::trace::{TRACE_BLOCK_TOKENS, TraceRequest};

/// `groups` shared prefixes of `prefix_blocks` trace blocks each; request `i` belongs to group
/// `i % groups`, adds one block of its own, and arrives `gap_ms` after the previous one.
fn grouped_trace(
    requests: usize,
    groups: u64,
    prefix_blocks: u64,
    gap_ms: u64,
) -> Vec<TraceRequest> {
    (0..requests)
        .map(|i| {
            let group = i as u64 % groups;
            let mut hash_ids: Vec<u64> = (0..prefix_blocks).map(|b| group * 1000 + b).collect();
            hash_ids.push(1_000_000 + i as u64);
            TraceRequest {
                line: i + 1,
                arrival: Duration::from_millis(gap_ms * i as u64),
                input_length: (hash_ids.len() * TRACE_BLOCK_TOKENS - 100) as u32,
                output_length: 8 + (i % 5) as u32,
                hash_ids,
            }
        })
        .collect()
}

fn config(workers: usize, mode: RoutingMode) -> SimConfig {
    SimConfig {
        workers,
        ..SimConfig::default()
    }
    .with_mode(mode)
}

fn assert_conserved(report: &SimReport, trace: &[TraceRequest]) {
    assert_eq!(report.requests, trace.len() as u64);
    assert_eq!(
        report.completed + report.rejected + report.aborted,
        report.requests
    );
    let per_worker: u64 = report.per_worker.iter().map(|w| w.requests).sum();
    assert_eq!(per_worker, report.completed, "{:?}", report.per_worker);
    let prompt: u64 = report.per_worker.iter().map(|w| w.prompt_tokens).sum();
    assert_eq!(prompt, report.prompt_tokens);
    let cached: u64 = report.per_worker.iter().map(|w| w.cached_tokens).sum();
    assert_eq!(cached, report.cached_tokens);
    let output: u64 = report.per_worker.iter().map(|w| w.output_tokens).sum();
    assert_eq!(output, report.output_tokens);
    assert!(report.cached_tokens <= report.prompt_tokens);
    // In-order, lossless delivery: the router never sees a gap, a duplicate or a broken chain.
    let events = report.router_events;
    assert_eq!(
        (
            events.gaps,
            events.duplicate,
            events.out_of_order,
            events.broken_chain,
            events.unknown_worker
        ),
        (0, 0, 0, 0, 0)
    );
    assert!(events.applied > 0 || report.completed == 0);
    assert_eq!(report.ttft_cdf_ms.len(), 101);
    assert!(report.ttft_cdf_ms.windows(2).all(|w| w[0] <= w[1]));
}

#[test]
fn every_request_completes_and_per_worker_figures_add_up() {
    let trace = grouped_trace(120, 6, 3, 40);
    let expected_prompt: u64 = trace.iter().map(|r| u64::from(r.input_length)).sum();
    let expected_output: u64 = trace.iter().map(|r| u64::from(r.output_length)).sum();
    for mode in RoutingMode::ALL {
        let report = run(&config(4, mode), &trace).unwrap();
        assert_conserved(&report, &trace);
        assert_eq!(report.completed, 120, "{mode}");
        assert_eq!(report.prompt_tokens, expected_prompt, "{mode}");
        assert_eq!(report.output_tokens, expected_output, "{mode}");
        assert_eq!(report.router_routes.routed, 120, "{mode}");
        assert!(report.ttft_ms.p50 > 0.0 && report.ttft_ms.p50 <= report.ttft_ms.p99);
        assert!(report.itl_ms.p50 > 0.0 && report.e2e_ms.p50 >= report.ttft_ms.p50);
        assert!(
            report.virtual_duration_s >= 119.0 * 0.040,
            "{}",
            report.virtual_duration_s
        );
    }
}

#[test]
fn kv_routing_beats_round_robin_on_hit_rate_and_ttft() {
    // 31 prefixes of 4 × 512 tokens, 4 requests each, over 4 workers. Group `g`'s requests are
    // numbers g, g + 31, g + 62, g + 93, which round-robin sends to four different workers (31 is
    // 3 mod 4), so it never reuses a prefix; kv sends each group back to where its prefix is.
    let trace = grouped_trace(124, 31, 4, 50);
    let kv = run(&config(4, RoutingMode::Kv), &trace).unwrap();
    let rr = run(&config(4, RoutingMode::RoundRobin), &trace).unwrap();
    // Upper bound: every request but the first of each group hits its 4 shared blocks (62 %).
    // kv gets well over half of that; it gives up a hit when the worker holding the prefix is
    // busier (active decode blocks) than the prefill it would save, as its cost function says.
    let shared = (4 * TRACE_BLOCK_TOKENS) as f64;
    let best = (124.0 - 31.0) * shared / rr.prompt_tokens as f64;
    assert!(
        kv.prefix_hit_rate > best * 0.5,
        "kv {} vs best {best}",
        kv.prefix_hit_rate
    );
    assert!(
        rr.prefix_hit_rate < 0.01,
        "round-robin {}",
        rr.prefix_hit_rate
    );
    assert!(
        kv.ttft_ms.mean < rr.ttft_ms.mean,
        "{:?} vs {:?}",
        kv.ttft_ms,
        rr.ttft_ms
    );
    // Round-robin spreads requests evenly regardless of prefixes.
    assert!(
        rr.per_worker.iter().all(|w| w.requests == 31),
        "{:?}",
        rr.per_worker
    );
}

#[test]
fn every_run_reports_how_good_its_ttft_predictions_were() {
    // Arrivals 200 ms apart: a light load, where a request's wait does not depend on arrivals
    // after it (the simulator's reports show how the error grows with load).
    let trace = grouped_trace(120, 6, 3, 200);
    for mode in [
        RoutingMode::Kv,
        RoutingMode::KvBlocks,
        RoutingMode::RoundRobin,
    ] {
        let report = run(&config(3, mode), &trace).unwrap();
        let p = report.ttft_prediction;
        // Every completed request had its prediction checked at its first token.
        assert_eq!(p.count, report.completed, "{mode}");
        // The mock's profile is exact, so predictions on a lightly loaded fleet are close.
        assert!(p.rel_p50 < 0.2, "{mode}: {p:?}");
        assert!(p.abs_p90_ms < report.ttft_ms.p90, "{mode}: {p:?}");
    }
}

#[test]
fn time_based_kv_beats_kv_blocks_where_decode_blocks_mislead_it() {
    // Long shared prefixes whose requests decode for long: the block cost counts each worker's
    // decode blocks as if they were prefill work, and moves requests away from their cached
    // prefixes; the time cost knows decoding is cheap next to recomputing 4k tokens.
    let mut trace = grouped_trace(160, 8, 8, 60);
    for r in &mut trace {
        r.output_length = 400;
    }
    let kv = run(&config(4, RoutingMode::Kv), &trace).unwrap();
    let blocks = run(&config(4, RoutingMode::KvBlocks), &trace).unwrap();
    assert!(
        kv.prefix_hit_rate > blocks.prefix_hit_rate,
        "{} vs {}",
        kv.prefix_hit_rate,
        blocks.prefix_hit_rate
    );
    assert!(
        kv.ttft_ms.mean < blocks.ttft_ms.mean,
        "{:?} vs {:?}",
        kv.ttft_ms,
        blocks.ttft_ms
    );
}

#[test]
fn generated_workloads_replay_and_multi_turn_sessions_hit_their_cache() {
    use crate::workload::{AgentConfig, ChatConfig};
    let chat = ChatConfig {
        sessions: 60,
        ..ChatConfig::default()
    }
    .generate()
    .unwrap();
    let agent = AgentConfig {
        runs: 15,
        ..AgentConfig::default()
    }
    .generate()
    .unwrap();
    for (name, trace) in [("chat", chat), ("agent", agent)] {
        let kv = run(&config(4, RoutingMode::Kv), &trace).unwrap();
        assert_conserved(&kv, &trace);
        assert_eq!(kv.completed, trace.len() as u64, "{name}");
        let rr = run(&config(4, RoutingMode::RoundRobin), &trace).unwrap();
        // Later turns and burst siblings find their prefix where kv sent the earlier ones.
        assert!(kv.prefix_hit_rate > 0.5, "{name}: {}", kv.prefix_hit_rate);
        assert!(
            kv.prefix_hit_rate > rr.prefix_hit_rate,
            "{name}: {} vs {}",
            kv.prefix_hit_rate,
            rr.prefix_hit_rate
        );
    }
}

#[test]
fn kv_events_reach_the_router_only_after_the_delay() {
    // The 124 arrivals span 6.2 s. With events 5 ms late the router sees each prefix cached
    // before the group's next request; with events 10 s late a kv-blocks router learns nothing
    // before the last arrival, so it never predicts an overlap (the engines may still hit by
    // chance). The time-based kv router counts the prompts it sent as held by their workers
    // from the start, so it does not depend on the events' delay to find them.
    let trace = grouped_trace(124, 31, 4, 50);
    let prompt = run(&config(4, RoutingMode::KvBlocks), &trace).unwrap();
    let late_config = SimConfig {
        event_delay: Duration::from_secs(10),
        ..config(4, RoutingMode::KvBlocks)
    };
    let late = run(&late_config, &trace).unwrap();
    let late_kv = run(&late_config.clone().with_mode(RoutingMode::Kv), &trace).unwrap();
    assert!(late_kv.router_routes.hit_blocks > 0);
    assert_conserved(&late, &trace);
    assert_eq!(late.completed, 124);
    assert_eq!(late.router_routes.hit_blocks, 0);
    assert!(prompt.router_routes.hit_blocks > 0);
    // The events still arrive (after the last token), in order.
    assert!(late.router_events.applied > 0);
    assert_eq!(late.event_delay_ms, 10_000.0);
}

#[test]
fn the_same_config_and_trace_give_the_same_report() {
    let trace = grouped_trace(60, 5, 2, 30);
    for mode in [
        RoutingMode::Kv,
        RoutingMode::Random,
        RoutingMode::Approximate,
    ] {
        let mut a = run(&config(3, mode), &trace).unwrap();
        let mut b = run(&config(3, mode), &trace).unwrap();
        a.wall_time_s = 0.0;
        b.wall_time_s = 0.0;
        assert_eq!(a, b, "{mode}");
    }
    // A different seed changes random routing.
    let mut seeded = config(3, RoutingMode::Random);
    seeded.router.seed ^= 1;
    let a = run(&config(3, RoutingMode::Random), &trace).unwrap();
    let b = run(&seeded, &trace).unwrap();
    assert_ne!(a.per_worker, b.per_worker);
}

#[test]
fn time_scale_stretches_arrivals() {
    let trace = grouped_trace(20, 2, 1, 1000);
    let normal = run(&config(2, RoutingMode::Kv), &trace).unwrap();
    let fast = run(
        &SimConfig {
            time_scale: 0.1,
            ..config(2, RoutingMode::Kv)
        },
        &trace,
    )
    .unwrap();
    assert!(
        normal.virtual_duration_s > 19.0,
        "{}",
        normal.virtual_duration_s
    );
    assert!(fast.virtual_duration_s < 2.5, "{}", fast.virtual_duration_s);
    assert_eq!(fast.completed, 20);
}

#[test]
fn too_long_requests_are_refused_and_counted() {
    let mut trace = grouped_trace(5, 1, 1, 10);
    trace[2].input_length = 200_000;
    trace[2].hash_ids = (0..391).map(|i| 5_000_000 + i).collect();
    let report = run(&config(2, RoutingMode::Kv), &trace).unwrap();
    assert_conserved(&report, &trace);
    assert_eq!((report.completed, report.rejected), (4, 1));
    assert!(
        report.rejections[0].reason.contains("max_model_len"),
        "{:?}",
        report.rejections
    );
}

#[test]
fn requests_wait_at_the_frontend_while_every_worker_is_full() {
    // One worker with 100 blocks of 16 tokens; each request needs ~60 blocks, and five arrive
    // at once: the router refuses all but one until the load reports show room again.
    let trace: Vec<TraceRequest> = (0..5)
        .map(|i| TraceRequest {
            line: i + 1,
            arrival: Duration::ZERO,
            input_length: 950,
            output_length: 4,
            hash_ids: vec![10 * i as u64, 10 * i as u64 + 1],
        })
        .collect();
    let mut small = config(1, RoutingMode::Kv);
    small.pool_from_profile = false;
    small.scheduler.kv_memory = PoolSizing::Blocks(100);
    let report = run(&small, &trace).unwrap();
    assert_conserved(&report, &trace);
    assert_eq!(report.completed, 5);
    assert!(report.overload_retries >= 4, "{}", report.overload_retries);
}

#[test]
fn load_reports_count_the_recompute_of_preempted_requests() {
    // One worker whose pool holds the prompts but not all of their answers: it preempts, and
    // a preempted request's recompute is in its load report beside the prompts not started.
    let trace: Vec<TraceRequest> = (0..6)
        .map(|i| TraceRequest {
            line: i + 1,
            arrival: Duration::from_millis(i as u64),
            input_length: 400,
            output_length: 600,
            hash_ids: vec![10 * i as u64],
        })
        .collect();
    let mut small = config(1, RoutingMode::Kv);
    small.pool_from_profile = false;
    small.scheduler.kv_memory = PoolSizing::Blocks(160);
    let mut sim = crate::sim::Sim::new(&small, &trace).unwrap();
    let mut seen = false;
    for step in 1..2000u64 {
        if !sim.run_until(Duration::from_millis(step * 5)).unwrap() {
            break;
        }
        let worker = &sim.workers[0];
        let metrics = worker.engine.metrics();
        let report = worker.load_report();
        assert!(report.prefill_tokens >= worker.pending_prefill);
        if metrics.preemptions > 0 && report.prefill_tokens > worker.pending_prefill {
            seen = true;
            break;
        }
    }
    assert!(seen, "no preempted work was ever reported");
}

#[test]
fn bad_configs_are_errors() {
    let trace = grouped_trace(2, 1, 1, 10);
    assert!(matches!(
        run(&config(0, RoutingMode::Kv), &trace),
        Err(SimError::NoWorkers)
    ));
    let scaled = SimConfig {
        time_scale: 0.0,
        ..config(1, RoutingMode::Kv)
    };
    assert!(matches!(run(&scaled, &trace), Err(SimError::TimeScale(_))));
    let mut unsorted = grouped_trace(3, 1, 1, 10);
    unsorted.swap(0, 2);
    assert!(matches!(
        run(&config(1, RoutingMode::Kv), &unsorted),
        Err(SimError::UnsortedTrace { line: 2 })
    ));
    let mut empty = config(1, RoutingMode::Kv);
    empty.scheduler.max_num_seqs = 0;
    assert!(matches!(run(&empty, &trace), Err(SimError::Engine(_))));
}

#[test]
fn an_empty_trace_gives_an_empty_report() {
    let report = run(&config(2, RoutingMode::Kv), &[]).unwrap();
    assert_eq!((report.requests, report.completed), (0, 0));
    assert_eq!(report.per_worker.len(), 2);
    assert_eq!(report.output_tokens_per_s, 0.0);
}

prop_compose! {
    fn arb_trace()(rows in proptest::collection::vec(
        (0u64..400, 1u32..2000, 1u32..20, 0u64..6), 1..40)
    ) -> Vec<TraceRequest> {
        let mut t = 0;
        rows.into_iter().enumerate().map(|(i, (gap, input, output, prefix))| {
            t += gap;
            let blocks = (input as usize).div_ceil(TRACE_BLOCK_TOKENS) as u64;
            // The first block comes from a small shared pool; the rest are unique.
            let hash_ids = (0..blocks)
                .map(|b| if b == 0 { prefix } else { 100 + i as u64 * 10 + b })
                .collect();
            TraceRequest {
                line: i + 1,
                arrival: Duration::from_millis(t),
                input_length: input,
                output_length: output,
                hash_ids,
            }
        }).collect()
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Any trace, any mode, any fleet size: every request completes exactly once and the
    /// per-worker figures add up to the totals.
    #[test]
    fn conservation_holds_for_arbitrary_traces(
        trace in arb_trace(),
        workers in 1usize..5,
        mode in proptest::sample::select(RoutingMode::ALL.to_vec()),
        delay_ms in 0u64..300,
    ) {
        let config = SimConfig {
            event_delay: Duration::from_millis(delay_ms),
            ..config(workers, mode)
        };
        let report = run(&config, &trace).unwrap();
        assert_conserved(&report, &trace);
        prop_assert_eq!(report.completed, trace.len() as u64);
        let output: u64 = trace.iter().map(|r| u64::from(r.output_length)).sum();
        prop_assert_eq!(report.output_tokens, output);
    }
}

#[test]
fn a_disaggregated_fleet_prefills_on_prefill_workers_and_decodes_on_the_others() {
    let trace = grouped_trace(60, 4, 3, 40);
    let config = SimConfig {
        workers: 4,
        prefill_workers: 2,
        ..SimConfig::default()
    }
    .with_mode(RoutingMode::Kv);
    let report = run(&config, &trace).unwrap();
    assert_eq!(report.completed, 60);
    assert_eq!((report.rejected, report.aborted), (0, 0));
    let expected_output: u64 = trace.iter().map(|r| u64::from(r.output_length)).sum();
    assert_eq!(report.output_tokens, expected_output);
    // Every prompt is long (3 shared blocks + 1 of 512 tokens): all are prefilled remotely.
    assert_eq!(report.prefill_decisions["remote"], 60);
    let (prefill, decode) = report.per_worker.split_at(2);
    // Prefill workers ran each prompt for its first token only.
    let prefill_requests: u64 = prefill.iter().map(|w| w.requests).sum();
    let prefill_outputs: u64 = prefill.iter().map(|w| w.output_tokens).sum();
    assert_eq!((prefill_requests, prefill_outputs), (60, 60));
    // Decode workers generated the rest and computed next to nothing of the prompts: their
    // blocks were imported (only each prompt's partial last block and first token remain).
    let decode_outputs: u64 = decode.iter().map(|w| w.output_tokens).sum();
    assert_eq!(decode_outputs, expected_output - 60);
    let decode_computed: u64 = decode.iter().map(|w| w.computed_prompt_tokens).sum();
    let prompts: u64 = trace.iter().map(|r| u64::from(r.input_length)).sum();
    assert!(
        decode_computed * 50 < prompts,
        "decode workers computed {decode_computed} of {prompts} prompt tokens"
    );
    assert!(decode.iter().all(|w| w.requests > 0), "{decode:?}");
    // The same fleet with a threshold above every prompt prefills nothing remotely.
    let local = SimConfig {
        disaggregation: kvfleet_proto::api::DisaggregationPolicy {
            min_remote_prefill_tokens: 1_000_000,
            ..Default::default()
        },
        ..config.clone()
    };
    let report = run(&local, &trace).unwrap();
    assert_eq!(report.prefill_decisions["local_short"], 60);
    assert!(report.per_worker[..2].iter().all(|w| w.requests == 0));
    assert_eq!(report.completed, 60);
}

#[test]
fn host_memory_tier_recovers_the_hits_a_small_device_pool_loses() {
    // 30 prefixes of 4 × 512 tokens (128 blocks each) cycling over 2 workers whose device pools
    // hold 1,200 blocks: each worker sees 15 prefixes (1,920 blocks), so G1 alone evicts a
    // prefix before it comes back; a G2 of 4,000 blocks keeps them all.
    let trace = grouped_trace(150, 30, 4, 60);
    let small = |g2_blocks: u64| {
        let mut c = config(2, RoutingMode::Kv);
        c.pool_from_profile = false;
        c.scheduler.kv_memory = PoolSizing::Blocks(1200);
        let block_bytes = c.profile.layout.block_bytes() as u64;
        c.scheduler.tiers = kvfleet_engine::TierConfig {
            host_bytes: g2_blocks * block_bytes,
            storage: kvfleet_engine::TierStorage::Modelled,
            ..Default::default()
        };
        c
    };
    let g1 = run(&small(0), &trace).unwrap();
    let g2 = run(&small(4000), &trace).unwrap();
    assert_conserved(&g1, &trace);
    assert_conserved(&g2, &trace);
    assert_eq!(g1.tier_hit_blocks, [0, 0]);
    assert_eq!(g2.tier_blocks_per_worker, [4000, 0]);
    assert!(g2.tier_hit_blocks[0] > 0, "{:?}", g2.tier_hit_blocks);
    assert!(
        g2.prefix_hit_rate > g1.prefix_hit_rate + 0.1,
        "G2 {} vs G1 alone {}",
        g2.prefix_hit_rate,
        g1.prefix_hit_rate
    );
    assert!(
        g2.ttft_ms.mean < g1.ttft_ms.mean,
        "{:?} vs {:?}",
        g2.ttft_ms,
        g1.ttft_ms
    );
}
