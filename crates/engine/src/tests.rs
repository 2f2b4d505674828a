//! Tests of the scheduler core through the [`Engine`] trait: bad input, batching, preemption,
//! prefix caching, disaggregation, virtual time and property tests over random request streams.
//!
//! Most tests use [`ToyExecutor`], which — unlike the mock — really depends on the KV cache:
//! each position's state is a hash of the previous position's state (read back from the block
//! table) and its token, and the sampled token is derived from the last state. A scheduler that
//! hands out the wrong blocks, reuses a block whose contents are stale, or gets a prefix-cache
//! hit wrong produces different tokens, which the reference [`toy_reference`] catches.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use kvfleet_proto::hash::chain;
use kvfleet_proto::{
    BlockSize, KvDtype, KvEventData, KvLayout, LocalBlockHash, SamplingParams, SequenceHash, Tier,
    WorkerId,
};
use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::*;

const VOCAB: u32 = 1000;
const START_STATE: u64 = 0x1234_5678;

fn toy_layout(block_size: u32) -> KvLayout {
    KvLayout {
        model: "toy".into(),
        layers: 1,
        kv_heads: 1,
        head_dim: 1,
        dtype: KvDtype::F32,
        block_size: BlockSize::new(block_size).unwrap(),
    }
}

fn mix(prev: u64, token: u32, pos: usize) -> u64 {
    chain(
        Some(SequenceHash(prev)),
        LocalBlockHash(u64::from(token) | ((pos as u64) << 32)),
    )
    .0
}

/// What a toy engine must output for `prompt`, computed without any engine.
fn toy_reference(prompt: &[u32], n: usize) -> Vec<u32> {
    let mut state = START_STATE;
    for (pos, &t) in prompt.iter().enumerate() {
        state = mix(state, t, pos);
    }
    let mut out = Vec::new();
    for k in 0..n {
        let token = (state % u64::from(VOCAB)) as u32;
        out.push(token);
        state = mix(state, token, prompt.len() + k);
    }
    out
}

/// A tiny "model" whose output depends on the KV it reads back: see the module docs.
#[derive(Debug, Default)]
struct ToyExecutor {
    block_size: u32,
    slots: HashMap<BlockId, Vec<Option<u64>>>,
    fail_next: bool,
    step_ms: u64,
    /// Reported as the executor's vocabulary (None: no check), like the native executor's.
    vocab: Option<u32>,
}

impl ToyExecutor {
    fn new(block_size: u32) -> Self {
        Self {
            block_size,
            step_ms: 10,
            ..Default::default()
        }
    }

    fn slot(&mut self, block: BlockId) -> &mut Vec<Option<u64>> {
        let bs = self.block_size as usize;
        self.slots.entry(block).or_insert_with(|| vec![None; bs])
    }
}

impl Executor for ToyExecutor {
    fn kv_layout(&self) -> KvLayout {
        toy_layout(self.block_size)
    }

    fn vocab_size(&self) -> Option<u32> {
        self.vocab
    }

    fn execute(&mut self, batch: &ScheduledBatch<'_>) -> Result<StepResult, ExecError> {
        if std::mem::take(&mut self.fail_next) {
            return Err(ExecError::Failed("injected".into()));
        }
        let bs = self.block_size as usize;
        let mut outputs = Vec::new();
        for seq in &batch.seqs {
            let mut state = START_STATE;
            for (j, &token) in seq.tokens.iter().enumerate() {
                let pos = seq.start_pos + j;
                let prev = if pos == 0 {
                    START_STATE
                } else {
                    let b = seq.block_table[(pos - 1) / bs];
                    self.slot(b)[(pos - 1) % bs].ok_or_else(|| {
                        ExecError::Failed(format!("read of unwritten slot {pos} in block {b}"))
                    })?
                };
                state = mix(prev, token, pos);
                let b = *seq.block_table.get(pos / bs).ok_or_else(|| {
                    ExecError::Failed(format!("block table too short for position {pos}"))
                })?;
                self.slot(b)[pos % bs] = Some(state);
            }
            if seq.sample {
                outputs.push(StepOutput {
                    request: seq.request,
                    token: (state % u64::from(VOCAB)) as u32,
                    logprob: None,
                    top_logprobs: Vec::new(),
                });
            }
        }
        Ok(StepResult {
            outputs,
            elapsed: Duration::from_millis(self.step_ms),
        })
    }

    fn copy_blocks_out(&self, blocks: &[BlockId]) -> Result<Vec<u8>, ExecError> {
        let mut out = Vec::new();
        for b in blocks {
            let slots = self
                .slots
                .get(b)
                .ok_or_else(|| ExecError::BadTransfer(format!("block {b} never written")))?;
            for s in slots {
                out.extend_from_slice(&s.unwrap_or(u64::MAX).to_le_bytes());
            }
        }
        Ok(out)
    }

    fn copy_blocks_in(&mut self, blocks: &[BlockId], data: &[u8]) -> Result<(), ExecError> {
        let bs = self.block_size as usize;
        if data.len() != blocks.len() * bs * 8 {
            return Err(ExecError::BadTransfer("wrong length".into()));
        }
        for (i, &b) in blocks.iter().enumerate() {
            let chunk = &data[i * bs * 8..(i + 1) * bs * 8];
            let slots = chunk
                .chunks_exact(8)
                .map(|c| {
                    let v = u64::from_le_bytes(c.try_into().unwrap_or([0xff; 8]));
                    (v != u64::MAX).then_some(v)
                })
                .collect();
            self.slots.insert(b, slots);
        }
        Ok(())
    }
}

fn toy_engine(
    blocks: u32,
    block_size: u32,
    tweak: impl FnOnce(&mut SchedulerConfig),
) -> Scheduler<ToyExecutor> {
    let mut config = SchedulerConfig {
        worker: WorkerId(7),
        kv_memory: PoolSizing::Blocks(blocks),
        max_model_len: 100_000,
        ..Default::default()
    };
    tweak(&mut config);
    Scheduler::new(config, ToyExecutor::new(block_size)).unwrap()
}

/// Everything one request produced.
#[derive(Debug, Default, Clone)]
struct Stream {
    tokens: Vec<u32>,
    times: Vec<Duration>,
    finish: Option<Finish>,
    aborted: bool,
}

fn collect(outputs: Vec<EngineOutput>, streams: &mut HashMap<RequestId, Stream>) {
    for out in outputs {
        match out {
            EngineOutput::Token(t) => {
                let s = streams.entry(t.request).or_default();
                assert_eq!(t.index as usize, s.tokens.len(), "token index");
                assert!(s.finish.is_none(), "token after finish");
                s.tokens.push(t.token);
                s.times.push(t.time);
                s.finish = t.finish;
            }
            EngineOutput::Aborted { request, .. } => {
                streams.entry(request).or_default().aborted = true;
            }
        }
    }
}

/// Runs in virtual time until idle, checking invariants after every step.
fn run_to_idle<E: Executor>(engine: &mut Scheduler<E>, streams: &mut HashMap<RequestId, Stream>) {
    let mut guard = 0;
    while let Some(t) = engine.next_event_time() {
        engine.step_until(t).unwrap();
        collect(engine.drain_outputs(), streams);
        engine.check_invariants().unwrap();
        guard += 1;
        assert!(guard < 1_000_000, "engine does not make progress");
    }
}

fn prompt(seed: u64, len: usize) -> Vec<u32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..len).map(|_| rng.random_range(0..VOCAB)).collect()
}

#[test]
fn bad_input_is_a_typed_error_table() {
    let mut engine = toy_engine(8, 4, |c| {
        c.max_model_len = 40;
        c.max_waiting = 1;
    });
    let ok = SamplingParams::greedy(4);
    let layout_err = |field: &'static str| move |e: &SubmitError| matches!(e, SubmitError::Import(ImportError::LayoutMismatch { field: f, .. }) if *f == field);
    let other_layout = KvLayout {
        head_dim: 2,
        ..toy_layout(4)
    };
    type Check = Box<dyn Fn(&SubmitError) -> bool>;
    let cases: Vec<(&str, Request, Check)> = vec![
        (
            "empty prompt",
            Request::new(vec![], ok.clone()),
            Box::new(|e| *e == SubmitError::EmptyPrompt),
        ),
        (
            "temperature out of range",
            Request::new(
                vec![1],
                SamplingParams {
                    temperature: 3.0,
                    ..ok.clone()
                },
            ),
            Box::new(|e| matches!(e, SubmitError::InvalidSampling(s) if s.field == "temperature")),
        ),
        (
            "max_tokens zero",
            Request::new(
                vec![1],
                SamplingParams {
                    max_tokens: 0,
                    ..ok.clone()
                },
            ),
            Box::new(|e| matches!(e, SubmitError::InvalidSampling(s) if s.field == "max_tokens")),
        ),
        (
            "longer than the context",
            Request::new(vec![1; 39], ok.clone()),
            Box::new(|e| {
                matches!(
                    e,
                    SubmitError::ExceedsContext {
                        prompt_tokens: 39,
                        ..
                    }
                )
            }),
        ),
        (
            "longer than the pool",
            Request::new(vec![1; 33], ok.clone()),
            Box::new(|e| {
                matches!(
                    e,
                    SubmitError::ExceedsPool {
                        needed_blocks: 9,
                        pool_blocks: 8
                    }
                )
            }),
        ),
        (
            "KV with the wrong layout",
            Request {
                kv: Some(KvExport {
                    first_block: 0,
                    layout: other_layout,
                    blocks: vec![],
                    data: vec![],
                    origin: None,
                }),
                ..Request::new(vec![1; 8], ok.clone())
            },
            Box::new(layout_err("head_dim")),
        ),
        (
            "KV of another prompt",
            Request {
                kv: Some(KvExport {
                    first_block: 0,
                    layout: toy_layout(4),
                    blocks: kvfleet_proto::hash::block_hashes(&[9; 8], BlockSize::new(4).unwrap()),
                    data: vec![0; 64],
                    origin: None,
                }),
                ..Request::new(vec![1; 8], ok.clone())
            },
            Box::new(|e| *e == SubmitError::KvMismatch { index: 0 }),
        ),
        (
            "KV data of the wrong length",
            Request {
                kv: Some(KvExport {
                    first_block: 0,
                    layout: toy_layout(4),
                    blocks: kvfleet_proto::hash::block_hashes(&[1; 8], BlockSize::new(4).unwrap()),
                    data: vec![0; 63],
                    origin: None,
                }),
                ..Request::new(vec![1; 8], ok.clone())
            },
            Box::new(|e| {
                matches!(
                    e,
                    SubmitError::Import(ImportError::DataLength {
                        expected: 64,
                        got: 63,
                        ..
                    })
                )
            }),
        ),
    ];
    for (name, request, check) in cases {
        let err = engine.submit(request, Duration::ZERO).unwrap_err();
        assert!(check(&err), "{name}: got {err:?}");
        assert!(!err.to_string().is_empty());
    }
    assert_eq!(engine.metrics().waiting, 0, "nothing was queued");
    engine.check_invariants().unwrap();
    // The waiting queue holds one request; the second is refused with Overloaded.
    engine
        .submit(Request::new(vec![1], ok.clone()), Duration::ZERO)
        .unwrap();
    assert_eq!(
        engine.submit(Request::new(vec![1], ok), Duration::ZERO),
        Err(SubmitError::Overloaded {
            waiting: 1,
            limit: 1
        })
    );
}

#[test]
fn chunked_prefill_off_rejects_prompts_over_the_step_budget() {
    let mut engine = toy_engine(64, 4, |c| {
        c.chunked_prefill = false;
        c.max_batched_tokens = 16;
    });
    let err = engine
        .submit(
            Request::new(vec![1; 17], SamplingParams::greedy(1)),
            Duration::ZERO,
        )
        .unwrap_err();
    assert!(matches!(err, SubmitError::ExceedsBatch { .. }), "{err:?}");
    // Fits: two prompts of 10 do not share a step (budget 16), so they run one after another.
    let a = engine
        .submit(
            Request::new(prompt(1, 10), SamplingParams::greedy(2)),
            Duration::ZERO,
        )
        .unwrap();
    let b = engine
        .submit(
            Request::new(prompt(2, 10), SamplingParams::greedy(2)),
            Duration::ZERO,
        )
        .unwrap();
    engine.step_until(Duration::ZERO).unwrap();
    assert_eq!(engine.metrics().running, 1);
    let mut streams = HashMap::new();
    run_to_idle(&mut engine, &mut streams);
    assert_eq!(streams[&a].tokens, toy_reference(&prompt(1, 10), 2));
    assert_eq!(streams[&b].tokens, toy_reference(&prompt(2, 10), 2));
}

#[test]
fn invalid_configs_are_rejected() {
    let cases = [
        (
            SchedulerConfig {
                max_num_seqs: 0,
                ..Default::default()
            },
            ConfigError::Zero("max_num_seqs"),
        ),
        (
            SchedulerConfig {
                kv_memory: PoolSizing::Bytes(10),
                ..Default::default()
            },
            ConfigError::EmptyPool {
                sizing: PoolSizing::Bytes(10),
                block_bytes: 32,
            },
        ),
    ];
    for (config, expected) in cases {
        assert_eq!(
            Scheduler::new(config, ToyExecutor::new(4)).unwrap_err(),
            expected
        );
    }
}

#[test]
fn pool_is_sized_from_a_memory_budget() {
    let profile = MockProfile::default_8b_h100();
    let config = SchedulerConfig {
        kv_memory: PoolSizing::FractionOfFree {
            fraction: 0.5,
            free_bytes: 64 << 30,
        },
        ..Default::default()
    };
    let engine = MockEngine::new(config, MockExecutor::new(profile)).unwrap();
    // 2 MiB blocks (32 layers × 8 heads × 128 × 16 tokens × 2 (K, V) × 2 bytes) in 32 GiB.
    assert_eq!(engine.pool().block_bytes(), 2 << 20);
    assert_eq!(engine.pool().num_blocks(), 16384);
    let m = engine.metrics();
    assert_eq!(
        (m.kv_blocks_total, m.kv_block_bytes, m.block_size),
        (16384, 2 << 20, 16)
    );
}

#[test]
fn one_request_streams_its_tokens_with_times_and_stats() {
    let mut engine = toy_engine(64, 4, |_| {});
    let p = prompt(3, 10);
    let id = engine
        .submit(
            Request::new(p.clone(), SamplingParams::greedy(5)),
            Duration::from_millis(100),
        )
        .unwrap();
    let mut streams = HashMap::new();
    run_to_idle(&mut engine, &mut streams);
    let s = &streams[&id];
    assert_eq!(s.tokens, toy_reference(&p, 5));
    // Toy steps take 10 ms: prefill ends at 110 ms, then one decode step per token.
    let expected: Vec<Duration> = (1..=5)
        .map(|k| Duration::from_millis(100 + 10 * k))
        .collect();
    assert_eq!(s.times, expected);
    let finish = s.finish.unwrap();
    assert_eq!(finish.reason, FinishReason::Length);
    assert_eq!(
        finish.stats,
        RequestStats {
            arrival: Duration::from_millis(100),
            admitted: Duration::from_millis(100),
            first_token: Duration::from_millis(110),
            finished: Duration::from_millis(150),
            prompt_tokens: 10,
            cached_tokens: 0,
            output_tokens: 5,
            preemptions: 0,
        }
    );
    // 14 tokens were fed (10 prompt + 4 generated): 3 full blocks of 4 are cached.
    assert_eq!(engine.pool().usage().cached, 3);
    let m = engine.metrics();
    assert_eq!((m.waiting, m.running, m.finished, m.steps), (0, 0, 1, 5));
}

#[test]
fn stop_tokens_and_eos_end_the_stream() {
    let p = prompt(4, 6);
    let reference = toy_reference(&p, 6);
    let stop = reference[2];
    let cases: Vec<(&str, SamplingParams, Vec<u32>, FinishReason, usize)> = vec![
        (
            "stop token",
            SamplingParams {
                stop_token_ids: vec![stop],
                ..SamplingParams::greedy(6)
            },
            vec![],
            FinishReason::Stop(stop),
            3,
        ),
        (
            "eos",
            SamplingParams::greedy(6),
            vec![stop],
            FinishReason::Eos(stop),
            3,
        ),
        (
            "eos ignored",
            SamplingParams {
                ignore_eos: true,
                ..SamplingParams::greedy(6)
            },
            vec![stop],
            FinishReason::Length,
            6,
        ),
    ];
    for (name, sampling, eos, reason, len) in cases {
        let mut engine = toy_engine(64, 4, |c| c.eos_token_ids = eos);
        let id = engine
            .submit(Request::new(p.clone(), sampling), Duration::ZERO)
            .unwrap();
        let mut streams = HashMap::new();
        run_to_idle(&mut engine, &mut streams);
        assert_eq!(streams[&id].tokens, reference[..len], "{name}");
        assert_eq!(streams[&id].finish.unwrap().reason, reason, "{name}");
    }
}

#[test]
fn continuous_batching_respects_max_num_seqs_and_token_budget() {
    let mut engine = toy_engine(1000, 4, |c| {
        c.max_num_seqs = 3;
        c.max_batched_tokens = 20;
    });
    let prompts: Vec<Vec<u32>> = (0..5).map(|i| prompt(10 + i, 8)).collect();
    let ids: Vec<RequestId> = prompts
        .iter()
        .map(|p| {
            engine
                .submit(
                    Request::new(p.clone(), SamplingParams::greedy(4)),
                    Duration::ZERO,
                )
                .unwrap()
        })
        .collect();
    // Step 1: 8 + 8 tokens admitted, the third prompt gets a 4-token chunk (budget 20).
    engine.step_until(Duration::ZERO).unwrap();
    let m = engine.metrics();
    assert_eq!(
        (m.running, m.waiting, m.last_batch_seqs, m.last_batch_tokens),
        (3, 2, 3, 20)
    );
    let mut streams = HashMap::new();
    run_to_idle(&mut engine, &mut streams);
    for (id, p) in ids.iter().zip(&prompts) {
        assert_eq!(streams[id].tokens, toy_reference(p, 4));
    }
}

#[test]
fn long_prompts_are_prefilled_in_chunks() {
    let mut engine = toy_engine(1000, 4, |c| c.max_batched_tokens = 16);
    let p = prompt(20, 50);
    let id = engine
        .submit(
            Request::new(p.clone(), SamplingParams::greedy(3)),
            Duration::ZERO,
        )
        .unwrap();
    let mut streams = HashMap::new();
    run_to_idle(&mut engine, &mut streams);
    // 50 tokens in chunks of 16: 4 steps of 10 ms before the first token.
    assert_eq!(streams[&id].times[0], Duration::from_millis(40));
    assert_eq!(streams[&id].tokens, toy_reference(&p, 3));
}

#[test]
fn prefix_cache_hits_skip_prefill_and_keep_outputs() {
    let mut engine = toy_engine(100, 4, |_| {});
    let shared = prompt(30, 20);
    let mut a = shared.clone();
    a.extend([1, 2, 3]);
    let mut b = shared.clone();
    b.extend([4, 5, 6]);
    let ia = engine
        .submit(
            Request::new(a.clone(), SamplingParams::greedy(4)),
            Duration::ZERO,
        )
        .unwrap();
    let mut streams = HashMap::new();
    run_to_idle(&mut engine, &mut streams);
    let t = engine.now();
    let ib = engine
        .submit(Request::new(b.clone(), SamplingParams::greedy(4)), t)
        .unwrap();
    // The same prompt again: all but its last (partial) block hits.
    let ia2 = engine
        .submit(Request::new(a.clone(), SamplingParams::greedy(4)), t)
        .unwrap();
    run_to_idle(&mut engine, &mut streams);
    assert_eq!(streams[&ia].tokens, toy_reference(&a, 4));
    assert_eq!(streams[&ib].tokens, toy_reference(&b, 4));
    assert_eq!(streams[&ia2].tokens, streams[&ia].tokens);
    assert_eq!(streams[&ia].finish.unwrap().stats.cached_tokens, 0);
    assert_eq!(streams[&ib].finish.unwrap().stats.cached_tokens, 20);
    assert_eq!(streams[&ia2].finish.unwrap().stats.cached_tokens, 20);
    let m = engine.metrics();
    assert_eq!((m.prefix_query_tokens, m.prefix_hit_tokens), (69, 40));
    // Three requests admitted and finished, four tokens each: the heartbeat window's sums.
    assert_eq!((m.admitted, m.finished, m.output_tokens), (3, 3, 12));
}

#[test]
fn a_fully_cached_prompt_still_computes_its_last_token() {
    let mut engine = toy_engine(100, 4, |_| {});
    let p = prompt(31, 16);
    let first = engine
        .submit(
            Request::new(p.clone(), SamplingParams::greedy(1)),
            Duration::ZERO,
        )
        .unwrap();
    let mut streams = HashMap::new();
    run_to_idle(&mut engine, &mut streams);
    let again = engine
        .submit(
            Request::new(p.clone(), SamplingParams::greedy(2)),
            engine.now(),
        )
        .unwrap();
    run_to_idle(&mut engine, &mut streams);
    assert_eq!(streams[&again].finish.unwrap().stats.cached_tokens, 12);
    assert_eq!(streams[&again].tokens[..1], streams[&first].tokens[..]);
    assert_eq!(streams[&again].tokens, toy_reference(&p, 2));
}

#[test]
fn kv_events_are_numbered_stamped_and_mirror_the_cache() {
    let mut engine = toy_engine(6, 4, |_| {});
    let mut streams = HashMap::new();
    for seed in 0..4 {
        let t = engine.now();
        engine
            .submit(
                Request::new(prompt(40 + seed, 12), SamplingParams::greedy(1)),
                t,
            )
            .unwrap();
        run_to_idle(&mut engine, &mut streams);
    }
    engine.clear_prefix_cache();
    let events = engine.drain_events();
    let mut mirror = HashSet::new();
    for (i, e) in events.iter().enumerate() {
        assert_eq!(
            (e.worker, e.event_id, e.tier),
            (WorkerId(7), i as u64, Tier::G1)
        );
        match &e.data {
            KvEventData::Stored { parent, blocks } => {
                assert_eq!(*parent, None);
                assert_eq!(blocks.len(), 3);
                for b in blocks {
                    assert!(mirror.insert(b.sequence));
                }
            }
            KvEventData::Removed { blocks } => {
                for b in blocks {
                    assert!(mirror.remove(b), "removed a block never stored");
                }
            }
            KvEventData::Cleared => mirror.clear(),
        }
    }
    // 4 prompts of 3 blocks in a 6-block pool: evictions happened; then the final Cleared.
    assert!(
        events
            .iter()
            .any(|e| matches!(e.data, KvEventData::Removed { .. }))
    );
    assert_eq!(events.last().map(|e| &e.data), Some(&KvEventData::Cleared));
    assert_eq!(engine.pool().usage().free, 6);
    assert!(engine.drain_events().is_empty());
}

#[test]
fn undrained_events_are_bounded_and_the_gap_is_visible() {
    let mut engine = toy_engine(100, 4, |c| c.max_pending_events = 2);
    let mut streams = HashMap::new();
    for seed in 0..5 {
        let t = engine.now();
        engine
            .submit(
                Request::new(prompt(50 + seed, 8), SamplingParams::greedy(1)),
                t,
            )
            .unwrap();
        run_to_idle(&mut engine, &mut streams);
    }
    let ids: Vec<u64> = engine.drain_events().iter().map(|e| e.event_id).collect();
    assert_eq!(ids, vec![3, 4]);
    assert_eq!(engine.metrics().events_dropped, 3);
}

#[test]
fn cancel_frees_blocks_and_discards_in_flight_tokens() {
    let mut engine = toy_engine(100, 4, |_| {});
    let a = engine
        .submit(
            Request::new(prompt(60, 10), SamplingParams::greedy(50)),
            Duration::ZERO,
        )
        .unwrap();
    let b = engine
        .submit(
            Request::new(prompt(61, 10), SamplingParams::greedy(50)),
            Duration::ZERO,
        )
        .unwrap();
    engine.step_until(Duration::from_millis(25)).unwrap();
    // At 25 ms: two steps done, the third (20..30 ms) is in flight.
    let mut streams = HashMap::new();
    collect(engine.drain_outputs(), &mut streams);
    assert_eq!(streams[&a].tokens.len(), 2);
    assert!(engine.cancel(a));
    assert!(!engine.cancel(a), "second cancel");
    engine.check_invariants().unwrap();
    engine.step_until(Duration::from_millis(30)).unwrap();
    collect(engine.drain_outputs(), &mut streams);
    assert_eq!(
        streams[&a].tokens.len(),
        2,
        "the in-flight token of a cancelled request is dropped"
    );
    assert_eq!(streams[&b].tokens.len(), 3);
    // Cancel a waiting request.
    let c = engine
        .submit(
            Request::new(prompt(62, 10), SamplingParams::greedy(5)),
            engine.now(),
        )
        .unwrap();
    assert!(engine.cancel(c));
    assert_eq!(engine.metrics().waiting, 0);
    assert!(engine.cancel(b));
    engine.step_until(Duration::from_secs(1)).unwrap();
    assert_eq!(engine.next_event_time(), None);
    engine.clear_prefix_cache();
    assert_eq!(engine.pool().usage().free, 100);
}

#[test]
fn executor_failure_aborts_the_batch_and_the_engine_recovers() {
    let mut engine = toy_engine(100, 4, |_| {});
    let a = engine
        .submit(
            Request::new(prompt(70, 10), SamplingParams::greedy(3)),
            Duration::ZERO,
        )
        .unwrap();
    engine.executor_mut().fail_next = true;
    assert!(engine.step_until(Duration::ZERO).is_err());
    let mut streams = HashMap::new();
    collect(engine.drain_outputs(), &mut streams);
    assert!(streams[&a].aborted);
    engine.check_invariants().unwrap();
    assert_eq!(engine.pool().usage().used, 0);
    let p = prompt(71, 10);
    let b = engine
        .submit(
            Request::new(p.clone(), SamplingParams::greedy(3)),
            engine.now(),
        )
        .unwrap();
    run_to_idle(&mut engine, &mut streams);
    assert_eq!(streams[&b].tokens, toy_reference(&p, 3));
}

/// A prompt token outside the executor's vocabulary is refused at submit, naming it; requests
/// already running are untouched (before the check, the executor failed the whole step).
#[test]
fn out_of_vocabulary_tokens_are_refused_at_submit_not_mid_step() {
    let mut engine = toy_engine(100, 4, |_| {});
    engine.executor_mut().vocab = Some(VOCAB);
    let p = prompt(80, 10);
    let good = engine
        .submit(
            Request::new(p.clone(), SamplingParams::greedy(5)),
            Duration::ZERO,
        )
        .unwrap();
    engine.step_until(Duration::ZERO).unwrap();
    let mut bad = prompt(81, 10);
    bad[3] = VOCAB;
    assert_eq!(
        engine.submit(Request::new(bad, SamplingParams::greedy(5)), Duration::ZERO),
        Err(SubmitError::TokenOutOfVocab {
            position: 3,
            token: VOCAB,
            vocab_size: VOCAB
        })
    );
    let mut streams = HashMap::new();
    collect(engine.drain_outputs(), &mut streams);
    run_to_idle(&mut engine, &mut streams);
    assert_eq!(streams[&good].tokens, toy_reference(&p, 5));
    assert!(!streams[&good].aborted);
    assert_eq!(streams.len(), 1);
}

/// 200 concurrent long requests on a pool that holds 10 of them all finish, with the outputs
/// they have when run one by one.
#[test]
fn preemption_under_memory_pressure_keeps_outputs() {
    let (prompt_len, max_tokens, bs) = (60usize, 40u32, 4u32);
    // A whole sequence needs ceil((60 + 40 - 1) / 4) = 25 blocks; the pool holds 10 of them.
    let mut engine = toy_engine(250, bs, |c| c.max_batched_tokens = 2048);
    let prompts: Vec<Vec<u32>> = (0..200).map(|i| prompt(1000 + i, prompt_len)).collect();
    let ids: Vec<RequestId> = prompts
        .iter()
        .map(|p| {
            engine
                .submit(
                    Request::new(p.clone(), SamplingParams::greedy(max_tokens)),
                    Duration::ZERO,
                )
                .unwrap()
        })
        .collect();
    let mut streams = HashMap::new();
    run_to_idle(&mut engine, &mut streams);
    let m = engine.metrics();
    assert!(m.preemptions > 0, "the test must exercise preemption");
    let mut preempted = 0;
    for (id, p) in ids.iter().zip(&prompts) {
        let s = &streams[id];
        assert_eq!(
            s.tokens,
            toy_reference(p, max_tokens as usize),
            "request {id:?}"
        );
        preempted += usize::from(s.finish.unwrap().stats.preemptions > 0);
    }
    assert!(preempted > 10, "only {preempted} requests were preempted");
    // One by one, on a fresh engine each: the same outputs.
    for (id, p) in ids.iter().zip(&prompts).take(20) {
        let mut solo = toy_engine(250, bs, |_| {});
        let sid = solo
            .submit(
                Request::new(p.clone(), SamplingParams::greedy(max_tokens)),
                Duration::ZERO,
            )
            .unwrap();
        let mut solo_streams = HashMap::new();
        run_to_idle(&mut solo, &mut solo_streams);
        assert_eq!(solo_streams[&sid].tokens, streams[id].tokens);
    }
    assert_eq!(m.finished, 200);
    // Readmissions after a preemption are not new admissions, nor their prompts new prompt
    // tokens (what a heartbeat window counts).
    assert_eq!(m.admitted, 200);
    assert_eq!(m.prefix_query_tokens, 200 * prompt_len as u64);
    assert_eq!(m.output_tokens, 200 * u64::from(max_tokens));
    engine.clear_prefix_cache();
    assert_eq!(engine.pool().usage().free, 250);
}

#[test]
fn mock_engine_matches_its_documented_tokens_under_preemption() {
    let profile = MockProfile::default_8b_h100();
    let config = SchedulerConfig {
        kv_memory: PoolSizing::Blocks(10 * 8),
        ..Default::default()
    };
    let mut engine = MockEngine::new(config, MockExecutor::new(profile.clone())).unwrap();
    // 100 + 28 tokens = 8 blocks of 16 each: the pool holds 10 such requests.
    let prompts: Vec<Vec<u32>> = (0..200).map(|i| prompt(2000 + i, 100)).collect();
    let ids: Vec<RequestId> = prompts
        .iter()
        .map(|p| {
            engine
                .submit(
                    Request::new(p.clone(), SamplingParams::greedy(29)),
                    Duration::ZERO,
                )
                .unwrap()
        })
        .collect();
    let mut streams = HashMap::new();
    run_to_idle(&mut engine, &mut streams);
    assert!(engine.metrics().preemptions > 0);
    for (id, p) in ids.iter().zip(&prompts) {
        assert_eq!(
            streams[id].tokens,
            expected_output(p, 29, profile.vocab_size)
        );
    }
}

#[test]
fn a_resumed_mock_request_continues_exactly_where_the_unbroken_run_was() {
    // A migration re-submits the prompt followed by the tokens the client has, with
    // `generated_in_prompt` saying so: the continuation must be the unbroken run's tail.
    let profile = MockProfile::default_8b_h100();
    let mut engine = MockEngine::new(
        SchedulerConfig::default(),
        MockExecutor::new(profile.clone()),
    )
    .unwrap();
    let p = prompt(77, 40);
    let whole = expected_output(&p, 20, profile.vocab_size);
    for cut in [1, 7, 19] {
        let mut resumed = p.clone();
        resumed.extend_from_slice(&whole[..cut]);
        let sampling = SamplingParams {
            generated_in_prompt: cut as u32,
            ..SamplingParams::greedy(20 - cut as u32)
        };
        let id = engine
            .submit(Request::new(resumed, sampling), Duration::ZERO)
            .unwrap();
        let mut streams = HashMap::new();
        run_to_idle(&mut engine, &mut streams);
        assert_eq!(streams[&id].tokens, whole[cut..], "cut after {cut} tokens");
    }
    // A prior output as long as the prompt leaves no prompt: refused at submit.
    let sampling = SamplingParams {
        generated_in_prompt: 40,
        ..SamplingParams::greedy(4)
    };
    assert!(matches!(
        engine.submit(Request::new(p, sampling), Duration::ZERO),
        Err(SubmitError::GeneratedInPromptTooLong {
            generated_in_prompt: 40,
            prompt_tokens: 40
        })
    ));
}

#[test]
fn disaggregated_prefill_export_import_gives_the_aggregated_output() {
    let p = prompt(80, 30);
    let n = 6;
    // Prefill worker: max_tokens = 1, then export.
    let mut prefill = toy_engine(100, 4, |_| {});
    prefill
        .submit(
            Request::new(p.clone(), SamplingParams::greedy(1)),
            Duration::ZERO,
        )
        .unwrap();
    let mut streams = HashMap::new();
    run_to_idle(&mut prefill, &mut streams);
    let export = prefill.export_kv(&p).unwrap();
    assert_eq!(export.blocks.len(), 7, "30 tokens = 7 full blocks of 4");
    assert_eq!(export.data.len(), 7 * toy_layout(4).block_bytes());
    // Decode worker: submit with the KV attached; prefill is a cache hit.
    let mut decode = toy_engine(100, 4, |_| {});
    let id = decode
        .submit(
            Request {
                kv: Some(export.clone()),
                ..Request::new(p.clone(), SamplingParams::greedy(n))
            },
            Duration::ZERO,
        )
        .unwrap();
    let stored: usize = decode
        .drain_events()
        .iter()
        .map(|e| match &e.data {
            KvEventData::Stored { blocks, .. } => blocks.len(),
            _ => 0,
        })
        .sum();
    assert_eq!(stored, 7, "imported blocks are announced");
    let mut dstreams = HashMap::new();
    run_to_idle(&mut decode, &mut dstreams);
    assert_eq!(dstreams[&id].tokens, toy_reference(&p, n as usize));
    assert_eq!(dstreams[&id].finish.unwrap().stats.cached_tokens, 28);
    // A direct import with another layout or a short buffer is refused, and changes nothing.
    decode.drain_events();
    let wrong = KvExport {
        layout: KvLayout {
            model: "other".into(),
            ..toy_layout(4)
        },
        ..export.clone()
    };
    let err = decode.import_kv(&wrong).unwrap_err();
    assert!(
        matches!(err, ImportError::LayoutMismatch { field: "model", .. }),
        "{err}"
    );
    let short = KvExport {
        data: export.data[1..].to_vec(),
        ..export.clone()
    };
    assert!(matches!(
        decode.import_kv(&short),
        Err(ImportError::DataLength { .. })
    ));
    assert!(decode.drain_events().is_empty());
    // Importing again finds everything cached.
    assert_eq!(
        decode.import_kv(&export).unwrap(),
        ImportReport {
            imported: 0,
            already_cached: 7,
            dropped: 0
        }
    );
    // Corrupted KV changes the output: the test above is not vacuous.
    let mut corrupted = export.clone();
    // The last slot of the last block: the only imported state the decode worker reads.
    let last = corrupted.data.len() - 8;
    corrupted.data[last] ^= 1;
    let mut other = toy_engine(100, 4, |_| {});
    let id = other
        .submit(
            Request {
                kv: Some(corrupted),
                ..Request::new(p.clone(), SamplingParams::greedy(n))
            },
            Duration::ZERO,
        )
        .unwrap();
    let mut ostreams = HashMap::new();
    run_to_idle(&mut other, &mut ostreams);
    assert_ne!(ostreams[&id].tokens, toy_reference(&p, n as usize));
}

#[test]
fn import_into_a_full_pool_keeps_what_fits() {
    let p = prompt(81, 32);
    let mut prefill = toy_engine(100, 4, |_| {});
    prefill
        .submit(
            Request::new(p.clone(), SamplingParams::greedy(1)),
            Duration::ZERO,
        )
        .unwrap();
    run_to_idle(&mut prefill, &mut HashMap::new());
    let export = prefill.export_kv(&p).unwrap();
    assert_eq!(export.blocks.len(), 8);
    let mut small = toy_engine(20, 4, |_| {});
    // A running request holds 15 of the 20 blocks.
    small
        .submit(
            Request::new(prompt(82, 59), SamplingParams::greedy(2)),
            Duration::ZERO,
        )
        .unwrap();
    small.step_until(Duration::ZERO).unwrap();
    let report = small.import_kv(&export).unwrap();
    assert_eq!(
        report,
        ImportReport {
            imported: 5,
            already_cached: 0,
            dropped: 3
        }
    );
    small.check_invariants().unwrap();
    let seq: Vec<SequenceHash> = export.blocks.iter().map(|b| b.sequence).collect();
    assert_eq!(small.pool().lookup_prefix(&seq), 5);
}

fn low_load_check(
    profile: &MockProfile,
    engine: &MockEngine,
    p_len: usize,
    s: &Stream,
    arrival: Duration,
) {
    let total = f64::from(engine.pool().num_blocks());
    let bs = engine.kv_layout().block_size;
    let tol = 2e-6; // Duration rounds to whole nanoseconds
    let ttft = (s.times[0] - arrival).as_secs_f64();
    let want = profile.prefill_ms(p_len) / 1000.0;
    assert!((ttft - want).abs() < tol, "TTFT {ttft} vs profile {want}");
    for k in 1..s.times.len() {
        let itl = (s.times[k] - s.times[k - 1]).as_secs_f64();
        let used = bs.blocks_for(p_len + k) as f64;
        let want = profile.decode_ms(used / total, 1) / 1000.0;
        assert!((itl - want).abs() < tol, "ITL {k}: {itl} vs profile {want}");
    }
}

/// 10,000 mock requests in virtual time: a few seconds of wall time, and at low load every
/// request's TTFT and ITL are exactly the profile's formulas.
#[test]
fn virtual_time_replay_follows_the_profile() {
    let profile = MockProfile::default_8b_h100();
    let config = SchedulerConfig {
        kv_memory: profile.pool_sizing(),
        ..Default::default()
    };
    let mut engine = MockEngine::new(config, MockExecutor::new(profile.clone())).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let wall = Instant::now();
    let mut arrivals = HashMap::new();
    let mut streams = HashMap::new();
    let mut t = Duration::ZERO;
    for i in 0..10_000u64 {
        // One request every 2 s of virtual time: each finishes before the next arrives.
        t += Duration::from_secs(2);
        engine.step_until(t).unwrap();
        collect(engine.drain_outputs(), &mut streams);
        let len = rng.random_range(16..2048);
        let out = rng.random_range(2..40);
        let p = prompt(i, len);
        let id = engine
            .submit(Request::new(p.clone(), SamplingParams::greedy(out)), t)
            .unwrap();
        arrivals.insert(id, (t, len, out));
    }
    run_to_idle(&mut engine, &mut streams);
    let elapsed = wall.elapsed();
    println!("10,000 requests at low load: {elapsed:?} wall");
    assert!(elapsed < Duration::from_secs(60), "{elapsed:?}");
    assert_eq!(streams.len(), 10_000);
    for (id, (arrival, len, out)) in &arrivals {
        let s = &streams[id];
        assert_eq!(s.tokens.len(), *out as usize);
        low_load_check(&profile, &engine, *len, s, *arrival);
    }
    let m = engine.metrics();
    assert_eq!(m.finished, 10_000);
    assert_eq!(m.preemptions, 0);
}

/// The same engine under heavy load: 10,000 requests arriving at 50/s, batched.
#[test]
fn virtual_time_replay_under_load_is_fast_and_batches() {
    let profile = MockProfile::default_8b_h100();
    let config = SchedulerConfig {
        kv_memory: profile.pool_sizing(),
        ..Default::default()
    };
    let mut engine = MockEngine::new(config, MockExecutor::new(profile.clone())).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    let wall = Instant::now();
    let mut streams = HashMap::new();
    let mut expected = HashMap::new();
    let mut t = Duration::ZERO;
    let mut max_running = 0;
    for i in 0..10_000u64 {
        t += Duration::from_micros(rng.random_range(0..40_000));
        engine.step_until(t).unwrap();
        collect(engine.drain_outputs(), &mut streams);
        max_running = max_running.max(engine.metrics().running);
        // Ten shared system prompts of 512 tokens, then a per-request suffix.
        let mut p = prompt(9000 + i % 10, 512);
        p.extend(prompt(i, rng.random_range(16..256)));
        let out = rng.random_range(16..128);
        let id = engine
            .submit(Request::new(p.clone(), SamplingParams::greedy(out)), t)
            .unwrap();
        expected.insert(id, expected_output(&p, out as usize, profile.vocab_size));
    }
    run_to_idle(&mut engine, &mut streams);
    let elapsed = wall.elapsed();
    let m = engine.metrics();
    println!(
        "10,000 requests under load: {elapsed:?} wall, {} steps, up to {max_running} running, {:.0}% prefix hits",
        m.steps,
        100.0 * m.prefix_hit_tokens as f64 / m.prefix_query_tokens as f64
    );
    assert!(elapsed < Duration::from_secs(60), "{elapsed:?}");
    assert!(max_running > 10, "requests were batched");
    assert!(m.prefix_hit_tokens > m.prefix_query_tokens / 2);
    for (id, tokens) in &expected {
        assert_eq!(&streams[id].tokens, tokens);
    }
}

#[test]
fn metrics_report_queues_and_throughput() {
    let profile = MockProfile::default_8b_h100();
    let config = SchedulerConfig {
        kv_memory: PoolSizing::Blocks(1000),
        max_num_seqs: 4,
        metrics_window: Duration::from_secs(1),
        ..Default::default()
    };
    let mut engine = MockEngine::new(config, MockExecutor::new(profile)).unwrap();
    for i in 0..6 {
        engine
            .submit(
                Request::new(prompt(i, 100), SamplingParams::greedy(1000)),
                Duration::ZERO,
            )
            .unwrap();
    }
    engine.step_until(Duration::from_millis(2000)).unwrap();
    let m = engine.metrics();
    assert_eq!(
        (m.running, m.waiting, m.last_batch_seqs, m.last_batch_tokens),
        (4, 2, 4, 4)
    );
    // Four sequences decode every ~6–7 ms step: several hundred tokens per second each.
    assert!(m.decode_tokens_per_s > 4.0 * 100.0, "{m:?}");
    assert_eq!(
        m.prefill_tokens_per_s, 0.0,
        "the prefill was more than a window ago"
    );
    assert!((m.mean_batch_seqs - 4.0).abs() < 1e-9);
    assert!(m.kv_blocks_used >= 4 * 7, "{m:?}");
    assert_eq!(
        m.kv_blocks_used + m.kv_blocks_cached + m.kv_blocks_free,
        1000
    );
    // Idle for a whole window: rates fall to zero.
    for i in 0..6 {
        engine.cancel(RequestId(i));
    }
    engine.step_until(Duration::from_secs(10)).unwrap();
    assert_eq!(engine.metrics().decode_tokens_per_s, 0.0);
}

#[test]
fn shipped_profile_parses_and_matches_dynamo_coefficients() {
    let p = MockProfile::default_8b_h100();
    assert_eq!(
        p.prefill,
        Quadratic {
            c0: 16.5,
            c1: 1.52e-2,
            c2: 4.21e-7
        }
    );
    assert_eq!((p.decode.c0, p.decode.c1, p.decode.c2), (5.7, 54.0, -25.7));
    assert_eq!(p.layout.block_bytes(), 2 << 20);
    // JSON round trip, and a profile that makes time run backwards is refused.
    let json = serde_json::to_string(&p).unwrap();
    assert_eq!(MockProfile::from_json_str(&json).unwrap(), p);
    let mut bad = p.clone();
    bad.decode.c0 = -100.0;
    let err = MockProfile::from_json_str(&serde_json::to_string(&bad).unwrap()).unwrap_err();
    assert!(matches!(err, ProfileError::Invalid(_)), "{err}");
    assert!(matches!(
        MockProfile::from_toml_str("name = 1"),
        Err(ProfileError::Toml(_))
    ));
    let missing = MockProfile::from_file(std::path::Path::new("/nonexistent/profile.toml"));
    assert!(matches!(missing, Err(ProfileError::Io { .. })));
}

#[test]
fn fitting_recovers_profile_coefficients() {
    let truth = Quadratic {
        c0: 16.5,
        c1: 1.52e-2,
        c2: 4.21e-7,
    };
    let points: Vec<(f64, f64)> = [128.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0]
        .iter()
        .map(|&t| (t, truth.eval(t)))
        .collect();
    let fit = Quadratic::fit(&points).unwrap();
    for (t, _) in &points {
        assert!((fit.eval(*t) - truth.eval(*t)).abs() < 1e-6);
    }
    let decode = DecodeModel {
        c0: 5.7,
        c1: 54.0,
        c2: -25.7,
        per_seq: 0.02,
    };
    let samples: Vec<(f64, usize, f64)> = [
        (0.05, 8),
        (0.2, 64),
        (0.4, 32),
        (0.6, 128),
        (0.8, 200),
        (0.95, 256),
    ]
    .iter()
    .map(|&(p, b)| (p, b, decode.eval(p, b)))
    .collect();
    let fit = DecodeModel::fit(&samples, true).unwrap();
    assert!(
        (fit.per_seq - 0.02).abs() < 1e-6 && (fit.c1 - 54.0).abs() < 1e-4,
        "{fit:?}"
    );
    assert_eq!(
        Quadratic::fit(&[(1.0, 1.0), (1.0, 2.0)]),
        Err(FitError::Degenerate)
    );
}

// ---- property tests over random request streams ----

#[derive(Debug, Clone)]
enum Action {
    Submit {
        prefix: u8,
        prefix_len: usize,
        suffix_len: usize,
        max_tokens: u32,
    },
    Advance(u64),
    Cancel(usize),
    ClearCache,
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        6 => (0u8..4, 0usize..40, 1usize..20, 1u32..24).prop_map(|(prefix, prefix_len, suffix_len, max_tokens)| {
            Action::Submit { prefix, prefix_len, suffix_len, max_tokens }
        }),
        6 => (1u64..60).prop_map(Action::Advance),
        1 => any::<usize>().prop_map(Action::Cancel),
        1 => Just(Action::ClearCache),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    /// Over random streams of submits, time advances, cancels and cache clears on a small pool:
    /// the pool's books balance after every operation; the event stream mirrors the cache (every
    /// `Stored` is later `Removed`/`Cleared` or still cached); every finished request's output
    /// equals the reference (so prefix hits, preemption and chunking never change outputs); and
    /// at the end, with the cache cleared, every block is free.
    #[test]
    fn random_request_streams_keep_every_invariant(
        actions in prop::collection::vec(action(), 1..80),
        blocks in 24u32..80,
        max_num_seqs in 1usize..8,
        max_batched_tokens in 8usize..64,
        caching in prop::bool::weighted(0.8),
    ) {
        let bs = 4;
        let mut engine = toy_engine(blocks, bs, |c| {
            c.max_num_seqs = max_num_seqs;
            c.max_batched_tokens = max_batched_tokens;
            c.max_waiting = 16;
            c.enable_prefix_caching = caching;
        });
        let mut now = Duration::ZERO;
        let mut prompts: HashMap<RequestId, (Vec<u32>, u32)> = HashMap::new();
        let mut ids: Vec<RequestId> = Vec::new();
        let mut cancelled = HashSet::new();
        let mut streams = HashMap::new();
        let mut mirror: HashSet<SequenceHash> = HashSet::new();
        let mut next_event = 0u64;
        let mut check_events = |engine: &mut Scheduler<ToyExecutor>, mirror: &mut HashSet<SequenceHash>| -> Result<(), TestCaseError> {
            for e in engine.drain_events() {
                prop_assert_eq!(e.event_id, next_event);
                next_event += 1;
                match e.data {
                    KvEventData::Stored { blocks, .. } => for b in blocks {
                        prop_assert!(caching, "Stored with prefix caching off");
                        prop_assert!(mirror.insert(b.sequence));
                    },
                    KvEventData::Removed { blocks } => for b in blocks { prop_assert!(mirror.remove(&b)); },
                    KvEventData::Cleared => mirror.clear(),
                }
            }
            let cached: HashSet<SequenceHash> = engine.pool().cached_hashes().collect();
            prop_assert_eq!(&cached, &*mirror);
            Ok(())
        };
        for a in actions {
            match a {
                Action::Submit { prefix, prefix_len, suffix_len, max_tokens } => {
                    let mut p = prompt(u64::from(prefix), prefix_len);
                    p.extend(prompt(now.as_nanos() as u64 + 7919, suffix_len));
                    match engine.submit(Request::new(p.clone(), SamplingParams::greedy(max_tokens)), now) {
                        Ok(id) => { prompts.insert(id, (p, max_tokens)); ids.push(id); }
                        Err(SubmitError::ExceedsPool { .. } | SubmitError::Overloaded { .. }) => {}
                        Err(e) => prop_assert!(false, "unexpected {e}"),
                    }
                }
                Action::Advance(ms) => {
                    now += Duration::from_millis(ms);
                    engine.step_until(now).unwrap();
                }
                Action::Cancel(i) => {
                    if !ids.is_empty() {
                        let id = ids[i % ids.len()];
                        if engine.cancel(id) { cancelled.insert(id); }
                    }
                }
                Action::ClearCache => engine.clear_prefix_cache(),
            }
            collect(engine.drain_outputs(), &mut streams);
            engine.check_invariants().map_err(TestCaseError::fail)?;
            let u = engine.pool().usage();
            prop_assert_eq!(u.used + u.free + u.cached, u.total);
            check_events(&mut engine, &mut mirror)?;
        }
        while let Some(t) = engine.next_event_time() {
            engine.step_until(t).unwrap();
            collect(engine.drain_outputs(), &mut streams);
            engine.check_invariants().map_err(TestCaseError::fail)?;
            check_events(&mut engine, &mut mirror)?;
        }
        for (id, (p, n)) in &prompts {
            if cancelled.contains(id) { continue; }
            let s = &streams[id];
            prop_assert!(!s.aborted);
            prop_assert!(s.finish.is_some());
            prop_assert_eq!(&s.tokens, &toy_reference(p, *n as usize), "request {:?}", id);
        }
        engine.clear_prefix_cache();
        check_events(&mut engine, &mut mirror)?;
        prop_assert!(mirror.is_empty());
        prop_assert_eq!(engine.pool().usage().free, blocks);
    }
}

#[test]
fn engines_are_usable_as_trait_objects() {
    let profile = MockProfile::default_8b_h100();
    let mut engines: Vec<Box<dyn Engine>> = vec![
        Box::new(MockEngine::new(SchedulerConfig::default(), MockExecutor::new(profile)).unwrap()),
        Box::new(toy_engine(16, 4, |_| {})),
    ];
    for engine in &mut engines {
        engine
            .submit(
                Request::new(vec![1, 2, 3], SamplingParams::greedy(2)),
                Duration::ZERO,
            )
            .unwrap();
        while let Some(t) = engine.next_event_time() {
            engine.step_until(t).unwrap();
        }
        assert_eq!(engine.drain_outputs().len(), 2);
    }
}

/// Virtual time chains steps back to back; real time starts a step when the caller calls.
#[test]
fn realtime_mode_starts_steps_at_the_callers_time() {
    for (realtime, second_token_ms) in [(false, 20), (true, 35)] {
        let mut engine = toy_engine(64, 4, |c| c.realtime = realtime);
        let id = engine
            .submit(
                Request::new(prompt(90, 8), SamplingParams::greedy(2)),
                Duration::ZERO,
            )
            .unwrap();
        // The prefill ends at 10 ms; the caller is 15 ms late for it.
        engine.step_until(Duration::ZERO).unwrap();
        engine.step_until(Duration::from_millis(25)).unwrap();
        engine.step_until(Duration::from_secs(1)).unwrap();
        let mut streams = HashMap::new();
        collect(engine.drain_outputs(), &mut streams);
        assert_eq!(
            streams[&id].times,
            vec![
                Duration::from_millis(10),
                Duration::from_millis(second_token_ms)
            ],
            "realtime = {realtime}"
        );
    }
}

/// 200 mock engines driven in real time by one thread on the wall clock: every request
/// finishes with the documented tokens, and the whole run takes about its modelled time.
#[test]
fn a_fleet_of_mock_engines_runs_in_real_time() {
    let profile = MockProfile::default_8b_h100();
    let mut engines: Vec<MockEngine> = (0..200)
        .map(|w| {
            let config = SchedulerConfig {
                worker: WorkerId(w),
                kv_memory: PoolSizing::Blocks(2048),
                realtime: true,
                ..Default::default()
            };
            MockEngine::new(config, MockExecutor::new(profile.clone())).unwrap()
        })
        .collect();
    let epoch = Instant::now();
    let mut expected = Vec::new();
    for (w, engine) in engines.iter_mut().enumerate() {
        for r in 0..4 {
            let p = prompt((w * 10 + r) as u64, 64);
            let id = engine
                .submit(
                    Request::new(p.clone(), SamplingParams::greedy(16)),
                    epoch.elapsed(),
                )
                .unwrap();
            expected.push((w, id, expected_output(&p, 16, profile.vocab_size)));
        }
    }
    let mut streams: Vec<HashMap<RequestId, Stream>> = vec![HashMap::new(); engines.len()];
    loop {
        let now = epoch.elapsed();
        let mut next: Option<Duration> = None;
        for (engine, s) in engines.iter_mut().zip(&mut streams) {
            engine.step_until(now).unwrap();
            collect(engine.drain_outputs(), s);
            next = match (next, engine.next_event_time()) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        let Some(next) = next else { break };
        std::thread::sleep(next.saturating_sub(epoch.elapsed()));
        assert!(
            epoch.elapsed() < Duration::from_secs(30),
            "the fleet fell behind"
        );
    }
    let wall = epoch.elapsed();
    // Four 64-token prompts in one 17.5 ms prefill step, then 15 decode steps of ~5.7 ms.
    let modelled = Duration::from_secs_f64(
        (profile.prefill_ms(256) + 15.0 * profile.decode_ms(0.0, 4)) / 1000.0,
    );
    println!("200 engines in real time: {wall:?} wall, {modelled:?} modelled per engine");
    assert!(wall >= modelled);
    for (w, id, tokens) in expected {
        assert_eq!(streams[w][&id].tokens, tokens);
    }
}

/// The same workload with the prefix cache on and off: identical outputs, and the cached run
/// really did hit (and computed fewer tokens).
#[test]
fn prefix_cache_on_and_off_give_identical_outputs() {
    let shared = prompt(95, 40);
    let prompts: Vec<Vec<u32>> = (0..30)
        .map(|i| {
            let mut p = shared.clone();
            p.extend(prompt(500 + i, 1 + i as usize % 9));
            p
        })
        .collect();
    let mut results = Vec::new();
    for caching in [true, false] {
        let mut engine = toy_engine(120, 4, |c| {
            c.enable_prefix_caching = caching;
            c.max_num_seqs = 6;
        });
        let mut ids = Vec::new();
        for (i, p) in prompts.iter().enumerate() {
            let t = Duration::from_millis(15 * i as u64);
            engine.step_until(t).unwrap();
            ids.push(
                engine
                    .submit(Request::new(p.clone(), SamplingParams::greedy(12)), t)
                    .unwrap(),
            );
        }
        let mut streams = HashMap::new();
        run_to_idle(&mut engine, &mut streams);
        let outputs: Vec<Vec<u32>> = ids.iter().map(|id| streams[id].tokens.clone()).collect();
        let hits = engine.metrics().prefix_hit_tokens;
        let stored = engine
            .drain_events()
            .iter()
            .any(|e| matches!(e.data, KvEventData::Stored { .. }));
        results.push((outputs, hits, stored));
    }
    assert_eq!(results[0].0, results[1].0);
    assert!(
        results[0].1 >= 29 * 40,
        "hits with caching: {}",
        results[0].1
    );
    assert_eq!((results[1].1, results[1].2), (0, false));
    let mut off = toy_engine(16, 4, |c| c.enable_prefix_caching = false);
    let export = KvExport {
        layout: toy_layout(4),
        first_block: 0,
        blocks: vec![],
        data: vec![],
        origin: None,
    };
    assert_eq!(
        off.import_kv(&export),
        Err(ImportError::PrefixCachingDisabled)
    );
}

proptest! {
    /// Arbitrary requests — any prompt length, any sampling values (NaN included), attached KV
    /// with junk layouts, hashes and data — are accepted or refused with an error; never a
    /// panic, and the engine stays consistent and keeps serving.
    #[test]
    fn arbitrary_submits_never_panic(
        prompt_len in 0usize..80,
        temperature in prop_oneof![
            3 => 0.0f32..2.0,
            1 => prop_oneof![Just(f32::NAN), Just(f32::INFINITY), -3.0f32..3.0],
        ],
        top_p in prop_oneof![3 => 0.01f32..1.0, 1 => prop_oneof![Just(f32::NAN), -1.0f32..2.0]],
        max_tokens in 0u32..40,
        logprobs in prop::option::of(0u32..40),
        kv in prop::option::of((1u32..3, 0usize..4, 0usize..200, any::<u64>())),
    ) {
        let mut engine = toy_engine(16, 4, |c| c.max_model_len = 64);
        let p: Vec<u32> = (0..prompt_len as u32).collect();
        let sampling = SamplingParams {
            temperature,
            top_p,
            max_tokens,
            logprobs,
            ..SamplingParams::greedy(1)
        };
        let kv = kv.map(|(head_dim, blocks, bytes, seed)| KvExport {
            layout: KvLayout { head_dim, ..toy_layout(4) },
            first_block: 0,
            blocks: kvfleet_proto::hash::block_hashes(
                &(0..(blocks * 4) as u32).map(|t| t ^ (seed as u32 & 1)).collect::<Vec<_>>(),
                BlockSize::new(4).unwrap(),
            ),
            data: vec![0xAB; bytes],
            origin: None,
        });
        let accepted = engine.submit(Request { prompt: p, sampling, kv }, Duration::ZERO);
        engine.check_invariants().map_err(TestCaseError::fail)?;
        let mut streams = HashMap::new();
        run_to_idle(&mut engine, &mut streams);
        if let Ok(id) = accepted {
            prop_assert!(streams[&id].finish.is_some() || streams[&id].aborted);
        }
        // And it still serves a good request.
        let t = engine.now();
        let id = engine.submit(Request::new(vec![5; 6], SamplingParams::greedy(3)), t).unwrap();
        run_to_idle(&mut engine, &mut streams);
        prop_assert_eq!(streams[&id].tokens.len(), 3);
    }
}

#[test]
fn incremental_export_streams_a_chunked_prefill_block_by_block() {
    let p = prompt(90, 30);
    let hashes = kvfleet_proto::hash::block_hashes(&p, BlockSize::new(4).unwrap());
    let mut engine = toy_engine(100, 4, |c| c.max_batched_tokens = 8);
    let id = engine
        .submit(
            Request::new(p.clone(), SamplingParams::greedy(1)),
            Duration::ZERO,
        )
        .unwrap();
    assert_eq!(engine.metrics().prefill_tokens_pending, 30);
    let mut streams = HashMap::new();
    let (mut sent, mut data, mut calls, mut parts_before_finish) = (0, Vec::new(), 0, 0);
    while let Some(t) = engine.next_event_time() {
        engine.step_until(t).unwrap();
        calls += 1;
        collect(engine.drain_outputs(), &mut streams);
        // Each call finishes the previous step (8 more prompt tokens) and starts the next.
        let computed = (8 * (calls - 1)).min(30);
        if streams.get(&id).is_none_or(|s| s.finish.is_none()) {
            assert_eq!(
                engine.metrics().prefill_tokens_pending,
                30 - computed as u64
            );
        }
        let part = engine.export_kv_from(&p, sent).unwrap();
        assert_eq!(part.first_block, sent);
        assert_eq!(
            part.blocks,
            hashes[sent..computed / 4],
            "exactly the blocks computed so far, after step {}",
            calls - 1
        );
        assert_eq!(
            part.data.len(),
            part.blocks.len() * toy_layout(4).block_bytes()
        );
        if !part.blocks.is_empty() && streams.get(&id).is_none_or(|s| s.finish.is_none()) {
            parts_before_finish += 1;
        }
        sent += part.blocks.len();
        data.extend_from_slice(&part.data);
    }
    assert!(streams[&id].finish.is_some());
    assert_eq!(engine.metrics().prefill_tokens_pending, 0);
    assert_eq!(sent, 7, "30 tokens = 7 full blocks of 4");
    assert!(
        parts_before_finish >= 3,
        "blocks came out while the prefill ran: {parts_before_finish}"
    );
    // The parts joined are the whole-prefix export, byte for byte.
    let whole = engine.export_kv(&p).unwrap();
    assert_eq!((whole.first_block, whole.blocks.len()), (0, 7));
    assert_eq!(whole.data, data);
    // Past the cached prefix there is nothing; a part that does not start at block 0 cannot
    // be imported.
    assert!(engine.export_kv_from(&p, 9).unwrap().blocks.is_empty());
    let tail = engine.export_kv_from(&p, 3).unwrap();
    assert_eq!((tail.first_block, tail.blocks.len()), (3, 4));
    let mut other = toy_engine(100, 4, |_| {});
    assert_eq!(
        other.import_kv(&tail),
        Err(ImportError::NotFromStart { first_block: 3 })
    );
    assert!(matches!(
        other.submit(
            Request {
                kv: Some(tail),
                ..Request::new(p.clone(), SamplingParams::greedy(1))
            },
            Duration::ZERO
        ),
        Err(SubmitError::Import(ImportError::NotFromStart { .. }))
    ));
}

#[test]
fn pending_prefill_counts_waiting_prompts_but_not_a_decode_token() {
    let mut engine = toy_engine(100, 4, |_| {});
    engine
        .submit(
            Request::new(prompt(91, 10), SamplingParams::greedy(5)),
            Duration::ZERO,
        )
        .unwrap();
    let mut streams = HashMap::new();
    // Step 1 prefills the prompt and samples; from then on the sequence decodes.
    let t = engine.next_event_time().unwrap();
    engine.step_until(t).unwrap();
    let t = engine.next_event_time().unwrap();
    engine.step_until(t).unwrap();
    collect(engine.drain_outputs(), &mut streams);
    assert_eq!(streams.values().next().unwrap().tokens.len(), 1);
    assert_eq!(engine.metrics().prefill_tokens_pending, 0);
    engine
        .submit(
            Request::new(prompt(92, 7), SamplingParams::greedy(5)),
            engine.now(),
        )
        .unwrap();
    assert_eq!(engine.metrics().prefill_tokens_pending, 7);
}

#[test]
fn the_mock_perf_profile_predicts_what_the_mock_engine_does() {
    let profile = MockProfile::default_8b_h100();
    let config = SchedulerConfig {
        kv_memory: profile.pool_sizing(),
        ..Default::default()
    };
    let perf = profile.perf_profile(&config);
    perf.validate().unwrap();
    // Idle TTFT, one chunk and several chunks of max_batched_tokens.
    for len in [300usize, 5000, 20_000] {
        let mut engine =
            MockEngine::new(config.clone(), MockExecutor::new(profile.clone())).unwrap();
        let id = engine
            .submit(
                Request::new(prompt(len as u64, len), SamplingParams::greedy(9)),
                Duration::ZERO,
            )
            .unwrap();
        let mut streams = HashMap::new();
        run_to_idle(&mut engine, &mut streams);
        let times = &streams[&id].times;
        let ttft_ms = times[0].as_secs_f64() * 1000.0;
        let predicted = perf.prefill_ms(len as u64, 0);
        // Linear interpolation between table points of a convex curve: within 2%.
        assert!(
            (ttft_ms - predicted).abs() / predicted < 0.02,
            "{len} tokens: engine {ttft_ms:.2} ms, profile {predicted:.2} ms"
        );
    }
    // Decode: 16 sequences of ~1,000 tokens decoding together.
    let mut engine = MockEngine::new(config.clone(), MockExecutor::new(profile.clone())).unwrap();
    let ids: Vec<RequestId> = (0..16)
        .map(|i| {
            engine
                .submit(
                    Request::new(prompt(100 + i, 1000), SamplingParams::greedy(8)),
                    Duration::ZERO,
                )
                .unwrap()
        })
        .collect();
    let mut streams = HashMap::new();
    run_to_idle(&mut engine, &mut streams);
    let gap = |id: &RequestId| {
        let t = &streams[id].times;
        (t[7] - t[6]).as_secs_f64() * 1000.0
    };
    let itl = gap(&ids[0]);
    let predicted = perf.itl_ms(16, 1006);
    assert!(
        (itl - predicted).abs() / predicted < 0.02,
        "engine ITL {itl:.3} ms, profile {predicted:.3} ms"
    );
}

#[test]
fn the_shipped_perf_profile_is_the_default_mocks() {
    let profile = MockProfile::default_8b_h100();
    let config = SchedulerConfig {
        kv_memory: profile.pool_sizing(),
        ..Default::default()
    };
    let computed = profile.perf_profile(&config);
    let shipped = kvfleet_proto::profile::PerfProfile::from_toml_str(DEFAULT_PERF_PROFILE_TOML)
        .expect("the shipped perf profile parses");
    assert_eq!(
        shipped,
        computed,
        "regenerate crates/engine/profiles/llama-3.1-8b-h100.perf.toml:\n{}",
        computed.to_toml_string().unwrap()
    );
}

// ---------------------------------------------------------------------------------------------
// Lower KV tiers: G2 host memory and G3 files in a temporary directory, under the toy executor
// (whose tokens depend on the KV bytes read back, so a wrong onboarded block shows).

/// A directory under the system's temp dir, removed on drop.
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let dir = std::env::temp_dir().join(format!(
            "kvfleet-tiers-{name}-{}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const TIER_BS: u32 = 4;
/// The toy's block bytes: one f32 K and V per token.
const TIER_BLOCK_BYTES: u64 = 8 * TIER_BS as u64;

/// A toy engine with 8 G1 blocks and the given lower tiers (in blocks).
fn tiered_engine(g2_blocks: u64, g3_blocks: u64, dir: &TempDir) -> Scheduler<ToyExecutor> {
    toy_engine(8, TIER_BS, |c| {
        c.tiers = TierConfig {
            host_bytes: g2_blocks * TIER_BLOCK_BYTES,
            disk_bytes: g3_blocks * TIER_BLOCK_BYTES,
            disk_dir: dir.0.clone(),
            ..TierConfig::default()
        };
    })
}

/// Runs one greedy request to the end; returns its tokens and the prompt tokens it found cached.
fn run_one(engine: &mut Scheduler<ToyExecutor>, prompt: &[u32], n: u32) -> (Vec<u32>, u32) {
    let id = engine
        .submit(
            Request::new(prompt.to_vec(), SamplingParams::greedy(n)),
            engine.now(),
        )
        .unwrap();
    let mut streams = HashMap::new();
    run_to_idle(engine, &mut streams);
    let s = &streams[&id];
    assert!(!s.aborted, "a tier fault must never fail the request");
    (s.tokens.clone(), s.finish.unwrap().stats.cached_tokens)
}

/// Fills G1 with `a`, then evicts it with two other prompts.
fn evict_through(engine: &mut Scheduler<ToyExecutor>, a: &[u32]) {
    let (tokens, _) = run_one(engine, a, 2);
    assert_eq!(tokens, toy_reference(a, 2));
    for seed in [101, 102] {
        let p = prompt(seed, 24);
        assert_eq!(run_one(engine, &p, 2).0, toy_reference(&p, 2));
    }
}

fn block_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for layout in std::fs::read_dir(dir).unwrap() {
        for f in std::fs::read_dir(layout.unwrap().path()).unwrap() {
            files.push(f.unwrap().path());
        }
    }
    files.sort();
    files
}

#[test]
fn an_evicted_prefix_comes_back_from_host_memory_with_the_cold_tokens() {
    let dir = TempDir::new("g2");
    let mut engine = tiered_engine(64, 0, &dir);
    let a = prompt(100, 17); // 4 full blocks, the last token computed
    evict_through(&mut engine, &a);
    assert_eq!(
        engine.pool().lookup_prefix(&sequence_hashes(&a)),
        0,
        "A left G1"
    );
    let events = engine.drain_events();
    assert!(
        events
            .iter()
            .any(|e| e.tier == Tier::G2 && matches!(e.data, KvEventData::Stored { .. }))
    );
    let (tokens, cached) = run_one(&mut engine, &a, 4);
    assert_eq!(
        tokens,
        toy_reference(&a, 4),
        "onboarded KV gives the cold run's tokens"
    );
    assert_eq!(cached, 16, "all four blocks onboarded, not recomputed");
    let stats = engine.metrics().tiers.g2;
    assert_eq!(stats.hits, 4);
    assert_eq!(stats.onboard_bytes, 4 * TIER_BLOCK_BYTES);
    assert!(stats.offload_blocks >= 4);
    // Without tiers the same sequence recomputes A.
    let mut plain = toy_engine(8, TIER_BS, |_| {});
    evict_through(&mut plain, &a);
    assert_eq!(run_one(&mut plain, &a, 4).1, 0);
}

fn sequence_hashes(tokens: &[u32]) -> Vec<SequenceHash> {
    kvfleet_proto::hash::sequence_hashes(tokens, BlockSize::new(TIER_BS).unwrap())
}

#[test]
fn disk_blocks_survive_a_restart_are_announced_and_hit_again() {
    let dir = TempDir::new("g3");
    let a = prompt(200, 17);
    {
        let mut engine = tiered_engine(0, 64, &dir);
        evict_through(&mut engine, &a);
        engine.flush_tiers();
        assert!(engine.metrics().tiers.g3.blocks >= 4);
    } // dropped: the worker stops
    let files = block_files(&dir.0);
    assert!(files.len() >= 4, "{files:?}");
    let mut engine = tiered_engine(0, 64, &dir);
    // The restarted engine announces what its disk holds, as G3 blocks.
    let announced: HashSet<SequenceHash> = engine
        .drain_events()
        .into_iter()
        .filter(|e| e.tier == Tier::G3)
        .flat_map(|e| match e.data {
            KvEventData::Stored { blocks, .. } => blocks.into_iter().map(|b| b.sequence).collect(),
            _ => Vec::new(),
        })
        .collect();
    for h in sequence_hashes(&a) {
        assert!(announced.contains(&h), "block {h:?} not announced");
    }
    let (tokens, cached) = run_one(&mut engine, &a, 4);
    assert_eq!(tokens, toy_reference(&a, 4));
    assert_eq!(cached, 16);
    assert_eq!(engine.metrics().tiers.g3.hits, 4);
}

#[test]
fn g2_spills_to_g3_and_a_prefix_is_onboarded_across_both() {
    let dir = TempDir::new("g2g3");
    let mut engine = tiered_engine(2, 64, &dir);
    let a = prompt(300, 17);
    evict_through(&mut engine, &a);
    engine.flush_tiers();
    let (tokens, cached) = run_one(&mut engine, &a, 3);
    assert_eq!(tokens, toy_reference(&a, 3));
    assert_eq!(cached, 16);
    let t = engine.metrics().tiers;
    assert_eq!(t.g2.hits + t.g3.hits, 4);
    assert!(t.g3.hits > 0, "{t:?}");
    assert!(t.g2.evictions > 0);
}

#[test]
fn damaged_block_files_are_counted_and_recomputed_never_failed() {
    let dir = TempDir::new("faults");
    let mut engine = tiered_engine(0, 64, &dir);
    let a = prompt(400, 25); // 6 full blocks
    let (tokens, _) = run_one(&mut engine, &a, 2);
    assert_eq!(tokens, toy_reference(&a, 2));
    for seed in [401, 402] {
        run_one(&mut engine, &prompt(seed, 32), 1);
    }
    engine.flush_tiers();
    let layout_dir = tiers::disk::layout_dir(&dir.0, toy_layout(TIER_BS).fingerprint());
    let hashes = sequence_hashes(&a);
    let path = |i: usize| tiers::disk::block_path(&layout_dir, hashes[i]);
    assert!(path(1).exists() && path(2).exists() && path(3).exists());
    // One payload byte of block 1 flipped: the walk stops at the first bad block, so block 0
    // is onboarded and blocks 1.. are recomputed.
    let mut bytes = std::fs::read(path(1)).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    std::fs::write(path(1), &bytes).unwrap();
    let (tokens, cached) = run_one(&mut engine, &a, 3);
    assert_eq!(tokens, toy_reference(&a, 3));
    assert_eq!(cached, 4, "only block 0 onboarded");
    let g3 = engine.metrics().tiers.g3;
    assert_eq!((g3.faults, g3.checksum_faults), (1, 1));
    engine.flush_tiers();
    assert!(!path(1).exists(), "the bad file is deleted");

    // Truncated, and written for another layout: evict `b`, damage its files, ask again.
    let b = prompt(500, 17);
    run_one(&mut engine, &b, 1);
    for seed in [501, 502] {
        run_one(&mut engine, &prompt(seed, 32), 1);
    }
    engine.flush_tiers();
    let hb = sequence_hashes(&b);
    let bpath = |i: usize| tiers::disk::block_path(&layout_dir, hb[i]);
    let whole = std::fs::read(bpath(0)).unwrap();
    std::fs::write(bpath(0), &whole[..whole.len() - 5]).unwrap();
    let (tokens, cached) = run_one(&mut engine, &b, 2);
    assert_eq!(tokens, toy_reference(&b, 2));
    assert_eq!(cached, 0);
    assert_eq!(engine.metrics().tiers.g3.truncated_faults, 1);

    let c = prompt(600, 17);
    run_one(&mut engine, &c, 1);
    for seed in [601, 602] {
        run_one(&mut engine, &prompt(seed, 32), 1);
    }
    engine.flush_tiers();
    let hc = sequence_hashes(&c);
    let payload = vec![7u8; TIER_BLOCK_BYTES as usize];
    let hc_full = kvfleet_proto::hash::block_hashes(&c, BlockSize::new(TIER_BS).unwrap());
    let foreign = tiers::disk::encode(12345, hc_full[0], None, &payload);
    std::fs::write(tiers::disk::block_path(&layout_dir, hc[0]), foreign).unwrap();
    let (tokens, cached) = run_one(&mut engine, &c, 2);
    assert_eq!(tokens, toy_reference(&c, 2));
    assert_eq!(cached, 0);
    assert_eq!(engine.metrics().tiers.g3.layout_faults, 1);
    assert_eq!(engine.metrics().tiers.g3.faults, 3);
}

#[test]
fn a_restart_deletes_unusable_files_and_keeps_the_rest() {
    let dir = TempDir::new("scan");
    let a = prompt(700, 17);
    {
        let mut engine = tiered_engine(0, 64, &dir);
        evict_through(&mut engine, &a);
        engine.flush_tiers();
    }
    let layout_dir = tiers::disk::layout_dir(&dir.0, toy_layout(TIER_BS).fingerprint());
    let h = sequence_hashes(&a);
    let p3 = tiers::disk::block_path(&layout_dir, h[3]);
    let bytes = std::fs::read(&p3).unwrap();
    std::fs::write(&p3, &bytes[..30]).unwrap();
    std::fs::write(layout_dir.join("junk.kvb"), b"not a block").unwrap();
    std::fs::write(layout_dir.join("0000000000000001.tmp"), b"half").unwrap();
    let mut engine = tiered_engine(0, 64, &dir);
    assert_eq!(engine.tiers().unwrap().deleted_at_start(), 3);
    assert!(!p3.exists());
    let (tokens, cached) = run_one(&mut engine, &a, 2);
    assert_eq!(tokens, toy_reference(&a, 2));
    assert_eq!(cached, 12, "blocks 0..3 from disk, block 3 recomputed");
}

#[test]
fn the_disk_budget_holds_and_a_failing_disk_is_counted_not_fatal() {
    let dir = TempDir::new("budget");
    let mut engine = tiered_engine(0, 3, &dir);
    for seed in 800..806 {
        let p = prompt(seed, 17);
        assert_eq!(run_one(&mut engine, &p, 1).0, toy_reference(&p, 1));
    }
    engine.flush_tiers();
    let g3 = engine.metrics().tiers.g3;
    assert_eq!(g3.blocks, 3);
    assert_eq!(g3.bytes, 3 * TIER_BLOCK_BYTES);
    assert!(g3.evictions > 0);
    assert_eq!(block_files(&dir.0).len(), 3, "evicted files are deleted");

    // The directory disappears under the engine (a failed disk, an operator's rm -rf): writes
    // fail, are counted, and requests still complete.
    std::fs::remove_dir_all(&dir.0).unwrap();
    std::fs::write(&dir.0, b"a file where the directory was").unwrap();
    for seed in 810..814 {
        let p = prompt(seed, 17);
        assert_eq!(run_one(&mut engine, &p, 1).0, toy_reference(&p, 1));
    }
    engine.flush_tiers();
    assert!(engine.metrics().tiers.g3.write_faults > 0);
    let _ = std::fs::remove_file(&dir.0);
}

#[test]
fn reused_admission_keeps_one_off_prompts_out_of_the_tiers() {
    let dir = TempDir::new("admission");
    let mut engine = toy_engine(8, TIER_BS, |c| {
        c.tiers = TierConfig {
            host_bytes: 64 * TIER_BLOCK_BYTES,
            admission: Admission::Reused,
            ..TierConfig::default()
        };
    });
    let _ = &dir;
    let a = prompt(900, 17);
    // A is hit once in G1 (second run), so its blocks are reused when evicted.
    run_one(&mut engine, &a, 1);
    assert_eq!(run_one(&mut engine, &a, 1).1, 16);
    for seed in [901, 902] {
        run_one(&mut engine, &prompt(seed, 24), 1);
    }
    let t = engine.metrics().tiers.g2;
    assert!(t.refusals > 0, "the one-off prompts were refused: {t:?}");
    let (tokens, cached) = run_one(&mut engine, &a, 2);
    assert_eq!(tokens, toy_reference(&a, 2));
    assert_eq!(cached, 16);
}

#[test]
fn the_mock_charges_onboarding_from_its_profile_and_models_capacity() {
    let profile = MockProfile::default_8b_h100();
    let block_bytes = profile.layout.block_bytes() as u64;
    let config = |g2: u64| SchedulerConfig {
        kv_memory: PoolSizing::Blocks(300),
        tiers: TierConfig {
            host_bytes: g2 * block_bytes,
            storage: TierStorage::Modelled,
            ..TierConfig::default()
        },
        ..Default::default()
    };
    let a: Vec<u32> = (0..2049).collect();
    let ttft = |engine: &mut MockEngine| {
        let id = engine
            .submit(
                Request::new(a.clone(), SamplingParams::greedy(1)),
                engine.now(),
            )
            .unwrap();
        let start = engine.now();
        let mut first = None;
        while let Some(t) = engine.next_event_time() {
            engine.step_until(t).unwrap();
            for out in engine.drain_outputs() {
                if let EngineOutput::Token(tok) = out
                    && tok.request == id
                {
                    first.get_or_insert(tok.time);
                }
            }
        }
        first.unwrap() - start
    };
    let mut tiered = MockEngine::new(config(1000), MockExecutor::new(profile.clone())).unwrap();
    let cold = ttft(&mut tiered);
    for base in [10_000u32, 20_000] {
        let other: Vec<u32> = (base..base + 2400).collect();
        tiered
            .submit(Request::new(other, SamplingParams::greedy(1)), tiered.now())
            .unwrap();
        while let Some(t) = tiered.next_event_time() {
            tiered.step_until(t).unwrap();
        }
    }
    let warm = ttft(&mut tiered);
    let g2 = tiered.metrics().tiers.g2;
    assert_eq!(g2.hits, 128);
    // 128 blocks of 2 MiB over 50 GB/s plus 0.01 ms, on top of a 1-token prefill step.
    let onboard = profile.onboard_time([128, 0, 0]);
    assert!((onboard.as_secs_f64() * 1000.0 - (0.01 + 128.0 * 2097152.0 / 50e6)).abs() < 1e-6);
    let one_token = profile.step_time(1, 0, 0.5);
    assert!(
        warm > onboard && warm < onboard + one_token * 2,
        "{warm:?} vs {onboard:?}"
    );
    assert!(
        warm * 2 < cold,
        "onboarding beats recompute: {warm:?} vs {cold:?}"
    );
    // A G2 of 10 blocks holds only the tail of what was evicted: capacity is modelled.
    let mut small = MockEngine::new(config(10), MockExecutor::new(profile)).unwrap();
    ttft(&mut small);
    assert!(small.metrics().tiers.g2.blocks <= 10);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    /// Random request streams over a small G1 with a small G2 and a G3 of real files: every
    /// finished request's tokens equal the reference (so every onboarded block held the right
    /// KV), no request fails, and each tier's events mirror what the tier holds.
    #[test]
    fn random_streams_through_the_tiers_give_the_reference_tokens(
        actions in prop::collection::vec(action(), 1..60),
        blocks in 24u32..48,
        g2 in 0u64..12,
        g3 in 0u64..24,
        reused in prop::bool::weighted(0.3),
    ) {
        let dir = TempDir::new("prop");
        let mut engine = toy_engine(blocks, TIER_BS, |c| {
            c.max_waiting = 16;
            c.tiers = TierConfig {
                host_bytes: g2 * TIER_BLOCK_BYTES,
                disk_bytes: g3 * TIER_BLOCK_BYTES,
                disk_dir: dir.0.clone(),
                admission: if reused { Admission::Reused } else { Admission::All },
                ..TierConfig::default()
            };
        });
        let mut now = Duration::ZERO;
        let mut prompts: HashMap<RequestId, (Vec<u32>, u32)> = HashMap::new();
        let mut streams = HashMap::new();
        let mut mirror: HashSet<(Tier, SequenceHash)> = HashSet::new();
        let apply = |engine: &mut Scheduler<ToyExecutor>, mirror: &mut HashSet<(Tier, SequenceHash)>| -> Result<(), TestCaseError> {
            for e in engine.drain_events() {
                match e.data {
                    KvEventData::Stored { blocks, .. } => for b in blocks {
                        prop_assert!(mirror.insert((e.tier, b.sequence)), "stored twice in {:?}", e.tier);
                    },
                    KvEventData::Removed { blocks } => for b in blocks {
                        prop_assert!(mirror.remove(&(e.tier, b)), "removed unknown from {:?}", e.tier);
                    },
                    KvEventData::Cleared => mirror.retain(|(t, _)| *t != e.tier),
                }
            }
            let g1: HashSet<SequenceHash> = engine.pool().cached_hashes().collect();
            let mirrored: HashSet<SequenceHash> = mirror.iter().filter(|(t, _)| *t == Tier::G1).map(|(_, h)| *h).collect();
            prop_assert_eq!(g1, mirrored);
            if let Some(tiers) = engine.tiers() {
                let g3: HashSet<SequenceHash> = tiers.g3_blocks().into_iter().collect();
                let mirrored: HashSet<SequenceHash> = mirror.iter().filter(|(t, _)| *t == Tier::G3).map(|(_, h)| *h).collect();
                prop_assert_eq!(g3, mirrored);
                let g2 = mirror.iter().filter(|(t, _)| *t == Tier::G2).count() as u64;
                prop_assert_eq!(tiers.stats().g2.blocks, g2);
                prop_assert!(g2 <= 12);
            }
            Ok(())
        };
        for a in actions {
            match a {
                Action::Submit { prefix, prefix_len, suffix_len, max_tokens } => {
                    let mut p = prompt(u64::from(prefix), prefix_len);
                    p.extend(prompt(now.as_nanos() as u64 + 7919, suffix_len));
                    match engine.submit(Request::new(p.clone(), SamplingParams::greedy(max_tokens)), now) {
                        Ok(id) => { prompts.insert(id, (p, max_tokens)); }
                        Err(SubmitError::ExceedsPool { .. } | SubmitError::Overloaded { .. }) => {}
                        Err(e) => prop_assert!(false, "unexpected {e}"),
                    }
                }
                Action::Advance(ms) => {
                    now += Duration::from_millis(ms);
                    engine.step_until(now).unwrap();
                }
                Action::Cancel(_) => {}
                Action::ClearCache => engine.clear_prefix_cache(),
            }
            collect(engine.drain_outputs(), &mut streams);
            engine.check_invariants().map_err(TestCaseError::fail)?;
            apply(&mut engine, &mut mirror)?;
        }
        while let Some(t) = engine.next_event_time() {
            engine.step_until(t).unwrap();
            collect(engine.drain_outputs(), &mut streams);
            engine.check_invariants().map_err(TestCaseError::fail)?;
            apply(&mut engine, &mut mirror)?;
        }
        engine.flush_tiers();
        apply(&mut engine, &mut mirror)?;
        for (id, (p, n)) in &prompts {
            let s = &streams[id];
            prop_assert!(!s.aborted);
            prop_assert_eq!(&s.tokens, &toy_reference(p, *n as usize), "request {:?}", id);
        }
        let t = engine.metrics().tiers;
        prop_assert_eq!(t.g2.faults + t.g3.faults, 0, "{:?}", t);
    }
}

/// Regression: the admission that onboards a prefix also evicts blocks, whose offload can push
/// that very prefix from G2 down to G3 before it is read; it must be read from where it went.
#[test]
fn an_admission_that_pushes_its_own_prefix_down_a_tier_still_onboards_it() {
    let mut profile = MockProfile::default_8b_h100();
    profile.layout = KvLayout {
        model: "m".into(),
        layers: 1,
        kv_heads: 1,
        head_dim: 1,
        dtype: KvDtype::F16,
        block_size: BlockSize::new(16).unwrap(),
    };
    let dir = TempDir::new("pushed-down");
    let config = SchedulerConfig {
        kv_memory: PoolSizing::Blocks(32),
        max_model_len: 512,
        // 64-byte blocks: G2 holds 16, G3 1024.
        tiers: TierConfig {
            host_bytes: 1024,
            disk_bytes: 65536,
            disk_dir: dir.0.clone(),
            ..TierConfig::default()
        },
        ..Default::default()
    };
    let mut e = MockEngine::new(config, MockExecutor::new(profile)).unwrap();
    let story = |i: u32| -> Vec<u32> {
        let mut v = vec![i];
        v.extend((0..235).map(|t| t % 200 + 1));
        v
    };
    for i in [0, 1, 2, 3] {
        e.submit(Request::new(story(i), SamplingParams::greedy(2)), e.now())
            .unwrap();
        while let Some(t) = e.next_event_time() {
            e.step_until(t).unwrap();
        }
    }
    let first = kvfleet_proto::hash::sequence_hashes(&story(0), BlockSize::new(16).unwrap())[0];
    assert_eq!(e.tiers().unwrap().lookup(first), Some(Tier::G2));
    e.submit(Request::new(story(0), SamplingParams::greedy(2)), e.now())
        .unwrap();
    while let Some(t) = e.next_event_time() {
        e.step_until(t).unwrap();
    }
    let m = e.metrics();
    assert_eq!(m.tiers.g2.hits + m.tiers.g3.hits, 14, "{:?}", m.tiers);
    assert_eq!(m.prefix_hit_tokens, 14 * 16);
    assert_eq!(
        e.tiers().unwrap().lookup(first),
        Some(Tier::G3),
        "it was pushed down"
    );
}

/// Blocks another node supplied keep their origin in G1, G2 and G3 and back in G1 after
/// onboarding, and pass it to blocks computed on top of them; evicting the origin drops all
/// of them from every tier (with `Removed` events, files deleted) while locally computed blocks
/// stay, and a running request using them finishes with the reference tokens.
#[test]
fn evicting_an_origin_drops_what_it_supplied_from_every_tier() {
    let dir = TempDir::new("origin");
    let node = Origin(std::num::NonZeroU32::new(7).unwrap());
    let a = prompt(300, 16); // 4 full blocks
    let mut prefill = toy_engine(100, TIER_BS, |_| {});
    run_one(&mut prefill, &a, 1);
    let mut export = prefill.export_kv(&a).unwrap();
    export.origin = Some(node);
    let mut engine = tiered_engine(2, 64, &dir);
    assert_eq!(engine.import_kv(&export).unwrap().imported, 4);
    let ah = sequence_hashes(&a);
    assert!(ah.iter().all(|&h| engine.pool().origin_of(h) == Some(node)));
    // Two local prompts push A down to G2 (2 blocks) and G3.
    for seed in [101, 102] {
        let p = prompt(seed, 24);
        assert_eq!(run_one(&mut engine, &p, 2).0, toy_reference(&p, 2));
    }
    assert_eq!(engine.pool().lookup_prefix(&ah), 0, "A left G1");
    let tiers = engine.tiers().unwrap();
    assert!(ah.iter().all(|&h| tiers.lookup(h).is_some()));
    assert!(ah.iter().all(|&h| tiers.origin_of(h) == Some(node)));
    engine.flush_tiers();
    assert!(!block_files(&dir.0).is_empty());
    engine.drain_events();

    // A request on A's prefix onboards it (origin and all) and computes a fifth block on top.
    let mut longer = a.clone();
    longer.extend(prompt(303, 4));
    let lh = sequence_hashes(&longer);
    let id = engine
        .submit(
            Request::new(longer.clone(), SamplingParams::greedy(8)),
            engine.now(),
        )
        .unwrap();
    let mut streams = HashMap::new();
    while engine.pool().cached_block(lh[4]).is_none() {
        let t = engine.next_event_time().unwrap();
        engine.step_until(t).unwrap();
        collect(engine.drain_outputs(), &mut streams);
    }
    assert!(ah.iter().all(|&h| engine.pool().origin_of(h) == Some(node)));
    assert_eq!(
        engine.pool().origin_of(lh[4]),
        Some(node),
        "computed on top of supplied KV"
    );
    let local = sequence_hashes(&prompt(102, 24));
    let local_held = |e: &Scheduler<ToyExecutor>| {
        local
            .iter()
            .filter(|&&h| {
                e.pool().cached_block(h).is_some() || e.tiers().unwrap().lookup(h).is_some()
            })
            .count()
    };
    let local_before = local_held(&engine);
    assert!(local_before > 0);
    engine.drain_events();

    let evicted = engine.evict_origin(node);
    assert!(evicted >= 5, "{evicted}");
    engine.check_invariants().unwrap();
    assert_eq!(engine.pool().lookup_prefix(&lh), 0);
    let tiers = engine.tiers().unwrap();
    assert!(lh.iter().all(|&h| tiers.lookup(h).is_none()));
    assert_eq!(local_held(&engine), local_before, "local blocks stay");
    let removed: HashSet<SequenceHash> = engine
        .drain_events()
        .into_iter()
        .flat_map(|e| match e.data {
            KvEventData::Removed { blocks } => blocks,
            _ => Vec::new(),
        })
        .collect();
    assert!(lh.iter().all(|h| removed.contains(h)), "routers are told");
    // The running request is not disturbed; its blocks are freed when it ends.
    run_to_idle(&mut engine, &mut streams);
    assert_eq!(streams[&id].tokens, toy_reference(&longer, 8));
    assert_eq!(engine.pool().lookup_prefix(&lh), 0, "not cached again");
    assert_eq!(engine.pool().usage().used, 0);
    engine.flush_tiers();
    let names: Vec<String> = lh.iter().map(|h| format!("{:016x}.kvb", h.0)).collect();
    assert!(
        block_files(&dir.0)
            .iter()
            .all(|f| !names.iter().any(|n| f.ends_with(n))),
        "A's files are deleted"
    );
    // A repeat of A recomputes it.
    assert_eq!(run_one(&mut engine, &a, 1).1, 0);
}

/// A block another node supplied is written to disk marked as such and not restored by the
/// next start (its origin, interned by the process, is gone).
#[test]
fn supplied_blocks_on_disk_are_not_restored_after_a_restart() {
    let dir = TempDir::new("origin-restart");
    let a = prompt(310, 16);
    let mut prefill = toy_engine(100, TIER_BS, |_| {});
    run_one(&mut prefill, &a, 1);
    let mut export = prefill.export_kv(&a).unwrap();
    export.origin = Some(Origin(std::num::NonZeroU32::new(1).unwrap()));
    let local = prompt(311, 24);
    {
        let mut engine = tiered_engine(0, 64, &dir);
        engine.import_kv(&export).unwrap();
        run_one(&mut engine, &local, 2);
        evict_through(&mut engine, &prompt(312, 16));
        engine.flush_tiers();
        let tiers = engine.tiers().unwrap();
        assert!(
            sequence_hashes(&a)
                .iter()
                .all(|&h| tiers.lookup(h) == Some(Tier::G3))
        );
    }
    let engine = tiered_engine(0, 64, &dir);
    let tiers = engine.tiers().unwrap();
    assert!(
        sequence_hashes(&a)
            .iter()
            .all(|&h| tiers.lookup(h).is_none())
    );
    assert!(
        sequence_hashes(&local)
            .iter()
            .any(|&h| tiers.lookup(h).is_some())
    );
    assert!(tiers.deleted_at_start() >= 4);
}
