//! The worker side of disaggregated serving, through the pool and real worker processes: a
//! prefill worker streams the KV blocks of a prompt as it computes them
//! (`Backend::submit_prefill`), a decode worker runs prompt + first token with those blocks
//! imported (`Backend::submit_with_kv`), and the result is the aggregated worker's greedy
//! output token for token — on a tiny generated native Llama, whose tokens depend on every KV
//! value. Also: bad attached blocks are recomputed (the request still succeeds), a cancelled
//! prefill frees everything, and the same handoff on the mock engine.
//!
//! Figures go to stderr (`--nocapture`): blocks received before the prefill's first token show
//! that the transfer overlaps the prefill.

#![allow(clippy::unwrap_used, clippy::print_stderr)]

mod common;

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use common::TestAgent;
use kvfleet_agent::backend::{
    Backend, ExportedBlock, GenEvent, GenerateRequest, Generation, KvOrigin, WorkerStatus,
};
use kvfleet_agent::worker::WorkerPool;
use kvfleet_proto::hash::{BlockSize, sequence_hashes};
use kvfleet_proto::{KvEventData, NodeId, SamplingParams, Tier, WorkerId};
use rand::{Rng, SeedableRng};
use tokio::sync::mpsc::UnboundedReceiver;

const PREFILL: WorkerId = WorkerId(1);
const DECODE: WorkerId = WorkerId(2);
const AGGREGATED: WorkerId = WorkerId(3);
/// Tokens per KV block in these tests.
const BLOCK: usize = 16;

/// The (made-up) prefill node the attached blocks come from, and its certificate serial.
fn origin() -> KvOrigin {
    KvOrigin {
        node: NodeId(uuid::Uuid::from_u128(0x5eed)),
        serials: vec!["0a1b".into()],
    }
}

/// A tiny Llama written once per test binary.
fn tiny_model() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("kvfleet-kv-handoff-{}", std::process::id()));
        let spec = kvfleet_model::tiny::TinySpec {
            context_length: 4096,
            ..Default::default()
        };
        kvfleet_model::tiny::write_tiny_llama(&dir, spec, 11).unwrap();
        dir
    })
    .clone()
}

/// One prefill, one decode and one aggregated worker of `model` (in that order: ids 1, 2, 3).
fn three_workers(model: &str) -> String {
    ["prefill", "decode", "aggregated"]
        .iter()
        .map(|role| {
            format!("[[workers]]\nmodel = \"{model}\"\ndevice = \"cpu\"\nrole = \"{role}\"\n")
        })
        .collect()
}

async fn native_agent() -> TestAgent {
    let config = format!(
        "[[models]]\nname = \"tiny\"\nengine = \"native\"\npath = {:?}\nkv_blocks = 512\n\
         block_size = {BLOCK}\n{}",
        tiny_model().display().to_string(),
        three_workers("tiny")
    );
    let agent = TestAgent::start(&config).await;
    wait(&agent.running.pool, "every worker ready", |_| {
        agent.running.pool.all_ready()
    })
    .await;
    agent
}

fn prompt(seed: u64, len: usize) -> Vec<u32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    // Byte tokens: inside both the tiny model's and the mock tokenizer's vocabulary.
    (0..len).map(|_| rng.random_range(3..256)).collect()
}

fn request(model: &str, prompt: &[u32], max_tokens: u32, worker: WorkerId) -> GenerateRequest {
    GenerateRequest {
        request_id: format!("test-{worker}-{}", prompt.len()),
        model: model.into(),
        prompt: prompt.to_vec(),
        block_hashes: sequence_hashes(prompt, BlockSize::new(BLOCK as u32).unwrap()),
        sampling: SamplingParams {
            ignore_eos: true,
            ..SamplingParams::greedy(max_tokens)
        },
        worker: Some(worker),
    }
}

/// A generation's tokens, or its failure.
async fn tokens(mut generation: Generation) -> Result<Vec<u32>, String> {
    let mut out = Vec::new();
    let result = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(event) = generation.next().await {
            match event {
                GenEvent::Tokens(chunk) => out.extend(chunk.tokens),
                GenEvent::Finished(_) => return Ok(()),
                GenEvent::Failed(message) | GenEvent::Lost(message) => return Err(message),
            }
        }
        Err("the event stream ended without a final event".to_owned())
    })
    .await
    .unwrap_or_else(|_| Err("timed out".into()));
    result.map(|()| out)
}

/// What a prefill produced.
struct Prefill {
    first_token: u32,
    blocks: Vec<ExportedBlock>,
    /// Per block, how long before the first token it arrived (zero if with or after it).
    leads: Vec<Duration>,
}

impl Prefill {
    /// Blocks that arrived at least `by` before the first token.
    fn blocks_ahead(&self, by: Duration) -> usize {
        self.leads.iter().filter(|&&lead| lead >= by).count()
    }
}

/// Runs a prefill-only request on the prefill worker and collects its blocks until the
/// receiver closes.
async fn prefill(pool: &WorkerPool, model: &str, prompt: &[u32]) -> Prefill {
    prefill_with(pool, request(model, prompt, 1, PREFILL)).await
}

/// [`prefill`] of a given request (its worker must be [`PREFILL`]).
async fn prefill_with(pool: &WorkerPool, request: GenerateRequest) -> Prefill {
    let (mut generation, mut rx) = pool.submit_prefill(request).unwrap();
    assert_eq!(
        generation.worker, PREFILL,
        "the named prefill worker runs it"
    );
    let mut blocks = Vec::new();
    let mut arrivals = Vec::new();
    let mut first_token = None;
    let mut token_at = None;
    let mut finished = false;
    let deadline = tokio::time::sleep(Duration::from_secs(60));
    tokio::pin!(deadline);
    while !finished {
        // Blocks first: a block is taken as soon as it is there, so its arrival time is true.
        tokio::select! {
            biased;
            Some(block) = rx.recv() => {
                blocks.push(block);
                arrivals.push(tokio::time::Instant::now());
            }
            event = generation.next() => match event {
                Some(GenEvent::Tokens(chunk)) => {
                    token_at = token_at.or(Some(tokio::time::Instant::now()));
                    first_token = first_token.or(chunk.tokens.first().copied());
                }
                Some(GenEvent::Finished(_)) => finished = true,
                other => panic!("prefill failed: {other:?}"),
            },
            () = &mut deadline => panic!("prefill timed out"),
        }
    }
    // The receiver closes once the request ended; every block was sent before the finish.
    while let Some(block) = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("the block receiver closes after the request ended")
    {
        blocks.push(block);
        arrivals.push(tokio::time::Instant::now());
    }
    let token_at = token_at.expect("a first token");
    Prefill {
        first_token: first_token.expect("a first token"),
        blocks,
        leads: arrivals
            .iter()
            .map(|&t| token_at.saturating_duration_since(t))
            .collect(),
    }
}

fn status(pool: &WorkerPool, id: WorkerId) -> WorkerStatus {
    pool.workers().into_iter().find(|w| w.id == id).unwrap()
}

async fn wait(pool: &WorkerPool, what: &str, mut check: impl FnMut(&WorkerPool) -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !check(pool) {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until `id` has reported `query` prompt tokens looked up, and returns its hits.
async fn hits_after(pool: &WorkerPool, id: WorkerId, query: u64) -> u64 {
    wait(pool, "the worker's prefix counters", |p| {
        status(p, id).prefix_query_tokens >= query
    })
    .await;
    let s = status(pool, id);
    assert_eq!(s.prefix_query_tokens, query, "only our requests ran there");
    s.prefix_hit_tokens
}

/// Waits for a status from every worker taken after this call, then until they all report no
/// KV block in use (a leak times out).
async fn no_blocks_in_use(pool: &WorkerPool) {
    let ids: Vec<WorkerId> = pool.workers().iter().map(|w| w.id).collect();
    let since: Vec<u64> = ids
        .iter()
        .map(|&id| pool.status_reports(id).unwrap())
        .collect();
    wait(pool, "a fresh status from every worker", |p| {
        ids.iter()
            .zip(&since)
            .all(|(&id, &n)| p.status_reports(id).unwrap() >= n + 2)
    })
    .await;
    wait(pool, "every worker's KV blocks released", |p| {
        p.workers()
            .iter()
            .all(|w| w.kv_blocks_used == 0 && w.outstanding == 0)
    })
    .await;
}

/// Checks the blocks of a prefill of `prompt`: each full block once, in order, with the
/// prompt's own sequence hashes and the layout's byte length.
fn check_blocks(pool: &WorkerPool, prompt: &[u32], blocks: &[ExportedBlock]) {
    let hashes = sequence_hashes(prompt, BlockSize::new(BLOCK as u32).unwrap());
    assert_eq!(blocks.len(), prompt.len() / BLOCK, "one per full block");
    let bytes = pool.kv_layout(PREFILL).unwrap().block_bytes();
    for (i, block) in blocks.iter().enumerate() {
        assert_eq!(block.index as usize, i, "in prompt order, each once");
        assert_eq!(block.hash, hashes[i]);
        assert_eq!(block.data.len(), bytes);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefill_on_one_worker_and_decode_on_another_gives_the_aggregated_tokens() {
    let agent = native_agent().await;
    let pool = agent.running.pool.clone();
    let layout = pool
        .kv_layout(PREFILL)
        .expect("the hello carries the layout");
    assert_eq!(pool.kv_layout(DECODE), Some(layout.clone()));
    assert_eq!(layout.block_size.tokens(), BLOCK);
    const N: u32 = 8;
    // Shorter than a block, exactly blocks, off by one, several blocks, and longer than the
    // native engine's 512-token step so the prefill runs in chunks.
    let lengths = [5, 15, 16, 17, 40, 64, 100, 333, 700, 1100];
    let (mut query, mut hits) = (0u64, 0u64);
    for (seed, &len) in lengths.iter().enumerate() {
        let p = prompt(seed as u64, len);
        let reference = tokens(pool.submit(request("tiny", &p, N, AGGREGATED)).unwrap())
            .await
            .unwrap();
        assert_eq!(reference.len(), N as usize);

        let prefill = prefill(&pool, "tiny", &p).await;
        check_blocks(&pool, &p, &prefill.blocks);
        let full = p.len() / BLOCK;
        eprintln!(
            "native prompt {len:>4} tokens: {full:>2} blocks exported, the first {:?} before the \
             first token",
            prefill.leads.first().copied().unwrap_or_default()
        );

        let mut decode_prompt = p.clone();
        decode_prompt.push(prefill.first_token);
        let data: Vec<Bytes> = prefill.blocks.into_iter().map(|b| b.data).collect();
        let rest = tokens(
            pool.submit_with_kv(
                request("tiny", &decode_prompt, N - 1, DECODE),
                data,
                origin(),
            )
            .unwrap(),
        )
        .await
        .unwrap();
        let mut disaggregated = vec![prefill.first_token];
        disaggregated.extend(rest);
        assert_eq!(disaggregated, reference, "prompt of {len} tokens");

        // The imported blocks were prefix hits on the decode worker, not recomputed.
        query += decode_prompt.len() as u64;
        let now = hits_after(&pool, DECODE, query).await;
        assert_eq!(now - hits, (full * BLOCK) as u64, "prompt of {len} tokens");
        hits = now;
    }
    let counters = pool.kv_transfers(DECODE).unwrap();
    let total: u64 = lengths.iter().map(|&l| (l / BLOCK) as u64).sum();
    assert_eq!(counters.blocks_imported, total);
    assert_eq!(counters.import_fallbacks, 0);
    no_blocks_in_use(&pool).await;
    assert_eq!(pool.kv_transfers(PREFILL).unwrap().blocks_exported, total);
    agent.stop().await.unwrap();
}

/// A seeded request with every sampler feature on (temperature, top-k, top-p, min-p, logit
/// bias, presence, frequency and repetition penalties) samples the same tokens on two workers,
/// and across a prefill → decode hand-off, where the decode leg counts the prefill leg's token
/// as output (`generated_in_prompt`; `kvfleet_model::adjust`'s tests show what it changes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seeded_penalised_sample_is_the_same_on_any_worker_and_across_the_handoff() {
    let agent = native_agent().await;
    let pool = agent.running.pool.clone();
    const N: u32 = 24;
    let sampling = SamplingParams {
        temperature: 0.9,
        top_k: 40,
        top_p: 0.95,
        min_p: 0.02,
        seed: Some(42),
        presence_penalty: 0.6,
        frequency_penalty: 0.8,
        repetition_penalty: 1.2,
        logit_bias: vec![(40, 3.0)],
        ignore_eos: true,
        ..SamplingParams::greedy(N)
    };
    let with = |worker: WorkerId, prompt: &[u32], max_tokens: u32, generated_in_prompt: u32| {
        GenerateRequest {
            sampling: SamplingParams {
                max_tokens,
                generated_in_prompt,
                ..sampling.clone()
            },
            ..request("tiny", prompt, max_tokens, worker)
        }
    };
    let p = prompt(7, 40);
    let on_aggregated = tokens(pool.submit(with(AGGREGATED, &p, N, 0)).unwrap())
        .await
        .unwrap();
    let on_decode = tokens(pool.submit(with(DECODE, &p, N, 0)).unwrap())
        .await
        .unwrap();
    assert_eq!(on_aggregated, on_decode, "the same seed on two workers");

    let prefill = prefill_with(&pool, with(PREFILL, &p, 1, 0)).await;
    assert_eq!(prefill.first_token, on_aggregated[0]);
    let mut decode_prompt = p.clone();
    decode_prompt.push(prefill.first_token);
    let data: Vec<Bytes> = prefill.blocks.iter().map(|b| b.data.clone()).collect();
    let decode = with(DECODE, &decode_prompt, N - 1, 1);
    let mut handed_off = vec![prefill.first_token];
    handed_off.extend(
        tokens(pool.submit_with_kv(decode, data, origin()).unwrap())
            .await
            .unwrap(),
    );
    assert_eq!(handed_off, on_aggregated, "across the hand-off");
    agent.stop().await.unwrap();
}

/// The reference tokens from the aggregated worker, and the first token and blocks from the
/// prefill worker, for a prompt.
async fn reference_and_prefill(pool: &WorkerPool, p: &[u32], n: u32) -> (Vec<u32>, Prefill) {
    let reference = tokens(pool.submit(request("tiny", p, n, AGGREGATED)).unwrap())
        .await
        .unwrap();
    let prefill = prefill(pool, "tiny", p).await;
    check_blocks(pool, p, &prefill.blocks);
    (reference, prefill)
}

/// Decodes `p` + the prefill's first token on the decode worker with `blocks` attached.
async fn decode_with(
    pool: &WorkerPool,
    p: &[u32],
    prefill: &Prefill,
    n: u32,
    blocks: Vec<Bytes>,
) -> Result<Vec<u32>, String> {
    let mut decode_prompt = p.to_vec();
    decode_prompt.push(prefill.first_token);
    let generation = pool
        .submit_with_kv(
            request("tiny", &decode_prompt, n - 1, DECODE),
            blocks,
            origin(),
        )
        .unwrap();
    let mut out = vec![prefill.first_token];
    out.extend(tokens(generation).await?);
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_attached_blocks_are_recomputed_and_too_many_are_refused() {
    let agent = native_agent().await;
    let pool = agent.running.pool.clone();
    let data = |prefill: &Prefill| -> Vec<Bytes> {
        prefill.blocks.iter().map(|b| b.data.clone()).collect()
    };

    // Every block one byte short: none is usable, the whole prompt is recomputed.
    let p = prompt(42, 70);
    let (reference, prefill) = reference_and_prefill(&pool, &p, 6).await;
    let short: Vec<Bytes> = data(&prefill).iter().map(|b| b.slice(1..)).collect();
    assert_eq!(
        decode_with(&pool, &p, &prefill, 6, short).await.unwrap(),
        reference
    );
    let mut query = p.len() as u64 + 1;
    assert_eq!(
        hits_after(&pool, DECODE, query).await,
        0,
        "nothing imported"
    );
    wait(&pool, "the fallback counted", |p| {
        p.kv_transfers(DECODE).unwrap().import_fallbacks == 1
    })
    .await;

    // Block 2 has another layout's size: blocks 0 and 1 are used, the rest recomputed.
    let p2 = prompt(43, 70);
    let (reference2, prefill2) = reference_and_prefill(&pool, &p2, 6).await;
    let mut mixed = data(&prefill2);
    mixed[2] = Bytes::from(vec![0u8; mixed[2].len() * 2]);
    assert_eq!(
        decode_with(&pool, &p2, &prefill2, 6, mixed).await.unwrap(),
        reference2
    );
    query += p2.len() as u64 + 1;
    assert_eq!(
        hits_after(&pool, DECODE, query).await,
        2 * BLOCK as u64,
        "blocks 0 and 1 were imported and hit"
    );
    wait(&pool, "the second fallback counted", |p| {
        p.kv_transfers(DECODE).unwrap().import_fallbacks == 2
    })
    .await;

    // More blocks than the prompt has full blocks: refused, not run with the wrong KV.
    let p3 = prompt(44, 40);
    let (_, prefill3) = reference_and_prefill(&pool, &p3, 6).await;
    let mut too_many = data(&prefill3);
    too_many.extend(data(&prefill2));
    let error = decode_with(&pool, &p3, &prefill3, 6, too_many)
        .await
        .unwrap_err();
    assert!(error.contains("full blocks"), "{error}");

    // Blocks of the right size are trusted (integrity is the transport's checksum's job), so
    // corrupted ones change the output: the token equality checks above are not vacuous.
    let p5 = prompt(46, 90);
    let (reference5, prefill5) = reference_and_prefill(&pool, &p5, 6).await;
    let corrupt: Vec<Bytes> = data(&prefill5)
        .iter()
        .map(|b| Bytes::from(b.iter().map(|x| x ^ 0x40).collect::<Vec<u8>>()))
        .collect();
    let wrong = decode_with(&pool, &p5, &prefill5, 6, corrupt)
        .await
        .unwrap();
    assert_ne!(wrong, reference5);
    query += p5.len() as u64 + 1;

    // And the decode worker still serves, with its KV.
    let p4 = prompt(45, 90);
    let (reference4, prefill4) = reference_and_prefill(&pool, &p4, 6).await;
    let good = data(&prefill4);
    assert_eq!(
        decode_with(&pool, &p4, &prefill4, 6, good).await.unwrap(),
        reference4
    );
    query += p4.len() as u64 + 1;
    assert_eq!(
        hits_after(&pool, DECODE, query).await,
        (2 * BLOCK + p5.len() / BLOCK * BLOCK + p4.len() / BLOCK * BLOCK) as u64
    );
    no_blocks_in_use(&pool).await;
    agent.stop().await.unwrap();
}

/// Mock workers whose prefill costs 50 µs per prompt token: the mock's 8192-token steps take
/// 410 ms, so a 10000-token prefill runs as a 410 ms step and a 90 ms one.
async fn mock_agent() -> TestAgent {
    let config = format!(
        "[[models]]\nname = \"m\"\ncontext_length = 12288\nblock_size = {BLOCK}\n\
         kv_blocks = 2048\nmock_token_time_us = 100\nmock_prefill_time_per_token_us = 50\n{}",
        three_workers("m")
    );
    let agent = TestAgent::start(&config).await;
    wait(&agent.running.pool, "every worker ready", |p| p.all_ready()).await;
    agent
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_prefill_frees_its_blocks_and_the_worker_keeps_serving() {
    let agent = mock_agent().await;
    let pool = agent.running.pool.clone();
    let p = prompt(7, 10_000);
    let (generation, mut rx): (Generation, UnboundedReceiver<ExportedBlock>) =
        pool.submit_prefill(request("m", &p, 1, PREFILL)).unwrap();
    // The first step's blocks arrive; the second step (90 ms) is running: cancel now.
    let first = tokio::time::timeout(Duration::from_secs(60), rx.recv())
        .await
        .unwrap()
        .expect("a first block");
    assert_eq!(first.index, 0);
    drop(generation);
    drop(rx);
    // A status taken after the first step (it counts its 512 blocks exported), then one with no
    // block in use: the request is gone, and it went before exporting the rest.
    wait(&pool, "the first step's blocks counted", |p| {
        p.kv_transfers(PREFILL).unwrap().blocks_exported >= 512
    })
    .await;
    wait(&pool, "the prefill worker's blocks released", |p| {
        status(p, PREFILL).kv_blocks_used == 0
    })
    .await;
    let exported = pool.kv_transfers(PREFILL).unwrap().blocks_exported;
    eprintln!(
        "cancelled prefill: {exported} of {} blocks exported",
        p.len() / BLOCK
    );
    assert_eq!(exported, 512, "the prefill stopped when cancelled");
    assert_eq!(status(&pool, PREFILL).prefill_tokens, 0);
    // The worker serves the next prefill normally, and nothing leaked.
    let q = prompt(8, 50);
    let next = prefill(&pool, "m", &q).await;
    check_blocks(&pool, &q, &next.blocks);
    no_blocks_in_use(&pool).await;
    agent.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefill_worker_crash_fails_the_generation_and_closes_the_block_receiver() {
    let agent = mock_agent().await;
    let pool = agent.running.pool.clone();
    let p = prompt(9, 10_000);
    let (mut generation, mut rx) = pool.submit_prefill(request("m", &p, 1, PREFILL)).unwrap();
    // Killed during its second step, after the first step's blocks came.
    let first = tokio::time::timeout(Duration::from_secs(60), rx.recv())
        .await
        .unwrap()
        .expect("a first block");
    assert_eq!(first.index, 0);
    let pid = status(&pool, PREFILL).pid.expect("a running worker");
    let killed = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let mut received = 1;
    let closed = tokio::time::timeout(Duration::from_secs(30), async {
        while rx.recv().await.is_some() {
            received += 1;
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "the block receiver closes when the worker dies"
    );
    assert!(
        received < p.len() / BLOCK,
        "{received} blocks before the crash"
    );
    let mut failed = None;
    while let Some(event) = generation.next().await {
        if let GenEvent::Lost(message) = event {
            failed = Some(message);
        }
    }
    let message = failed.expect("the generation is lost (for the driver to migrate)");
    assert!(message.contains("worker w1"), "{message}");
    // The worker comes back and serves prefills again.
    wait(&pool, "the prefill worker restarted", |p| {
        status(p, PREFILL).state == kvfleet_agent::backend::WorkerState::Ready
            && status(p, PREFILL).starts == 2
    })
    .await;
    let q = prompt(10, 40);
    let next = prefill(&pool, "m", &q).await;
    check_blocks(&pool, &q, &next.blocks);
    agent.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_handoff_works_on_the_mock_engine() {
    let agent = mock_agent().await;
    let pool = agent.running.pool.clone();
    let (mut query, mut hits) = (0u64, 0u64);
    for (seed, &len) in [3usize, 16, 31, 200, 1000, 10_000].iter().enumerate() {
        let p = prompt(100 + seed as u64, len);
        let prefill = prefill(&pool, "m", &p).await;
        check_blocks(&pool, &p, &prefill.blocks);
        let ahead = prefill.blocks_ahead(Duration::from_millis(30));
        eprintln!(
            "mock prompt {len:>5} tokens: {} blocks, {ahead} arrived 30 ms or more before the \
             first token",
            prefill.blocks.len()
        );
        // The first 8192-token step's 512 blocks come while the second step still runs.
        let chunked = if len > 8192 { 8192 / BLOCK } else { 0 };
        assert_eq!(ahead, chunked, "blocks stream out as steps compute them");
        let mut decode_prompt = p.clone();
        decode_prompt.push(prefill.first_token);
        let data: Vec<Bytes> = prefill.blocks.into_iter().map(|b| b.data).collect();
        let rest = tokens(
            pool.submit_with_kv(request("m", &decode_prompt, 4, DECODE), data, origin())
                .unwrap(),
        )
        .await
        .unwrap();
        assert_eq!(rest.len(), 4);
        query += decode_prompt.len() as u64;
        let now = hits_after(&pool, DECODE, query).await;
        assert_eq!(now - hits, (len / BLOCK * BLOCK) as u64, "prompt of {len}");
        hits = now;
    }
    // Unnamed requests never go to the prefill worker; a named one goes where it is told.
    for _ in 0..6 {
        let mut r = request("m", &prompt(1, 8), 1, PREFILL);
        r.worker = None;
        let generation = pool.submit(r).unwrap();
        assert_ne!(generation.worker, PREFILL);
        tokens(generation).await.unwrap();
    }
    // A named worker that is draining is passed over like an unnamed request.
    assert!(pool.set_draining(PREFILL, true));
    let generation = pool
        .submit(request("m", &prompt(2, 8), 1, PREFILL))
        .unwrap();
    assert_ne!(generation.worker, PREFILL);
    tokens(generation).await.unwrap();
    assert!(pool.set_draining(PREFILL, false));
    let generation = pool
        .submit(request("m", &prompt(2, 8), 1, PREFILL))
        .unwrap();
    assert_eq!(generation.worker, PREFILL);
    tokens(generation).await.unwrap();
    no_blocks_in_use(&pool).await;
    agent.stop().await.unwrap();
}

/// Blocks imported from a node are evicted from the decode worker (G1 and its host tier) when
/// a heartbeat lists that node's certificate serial as revoked: `Removed` events go out, the
/// worker counts them, and the same prompt again is recomputed (no prefix hit). A serial of
/// another node, or none, evicts nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_suppliers_blocks_are_evicted_from_the_decode_worker() {
    let config = format!(
        "[[models]]\nname = \"m\"\ncontext_length = 4096\nblock_size = {BLOCK}\n\
         kv_blocks = 64\nmock_token_time_us = 100\nmock_prefill_time_per_token_us = 50\n{}\
         [kv_tiers]\nhost_memory = \"1MiB\"\n",
        three_workers("m")
    );
    let agent = TestAgent::start(&config).await;
    let pool = agent.running.pool.clone();
    wait(&pool, "every worker ready", |p| p.all_ready()).await;
    let mut events = pool.subscribe_kv_events();
    let p = prompt(77, 200);
    let prefill = prefill(&pool, "m", &p).await;
    let mut decode_prompt = p.clone();
    decode_prompt.push(prefill.first_token);
    let data: Vec<Bytes> = prefill.blocks.into_iter().map(|b| b.data).collect();
    let supplied = data.len() as u64;
    assert_eq!(supplied, 12);
    tokens(
        pool.submit_with_kv(request("m", &decode_prompt, 2, DECODE), data, origin())
            .unwrap(),
    )
    .await
    .unwrap();
    let query = decode_prompt.len() as u64;
    assert_eq!(hits_after(&pool, DECODE, query).await, 12 * BLOCK as u64);
    // Another node's revocation, or none, leaves them.
    assert!(pool.evict_revoked(["ffff"]).is_empty());
    assert!(pool.evict_revoked([]).is_empty());
    // The heartbeat names the supplier's serial (any case).
    assert_eq!(pool.evict_revoked(["0A1B", "ffff"]), vec![origin().node]);
    wait(&pool, "the decode worker's eviction count", |p| {
        status(p, DECODE).kv_blocks_evicted_origin >= supplied
    })
    .await;
    let hashes = sequence_hashes(&decode_prompt, BlockSize::new(BLOCK as u32).unwrap());
    let mut removed = std::collections::HashSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !hashes.iter().all(|h| removed.contains(h)) {
        let event = tokio::time::timeout_at(deadline, events.recv())
            .await
            .expect("Removed events for every supplied block")
            .unwrap();
        if event.worker == DECODE
            && let KvEventData::Removed { blocks } = event.data
        {
            assert!(matches!(event.tier, Tier::G1 | Tier::G2));
            removed.extend(blocks);
        }
    }
    // Once is enough: the node is forgotten until it supplies again.
    assert!(pool.evict_revoked(["0a1b"]).is_empty());
    // The same prompt again finds nothing cached on the decode worker.
    tokens(
        pool.submit(request("m", &decode_prompt, 2, DECODE))
            .unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(
        hits_after(&pool, DECODE, 2 * query).await,
        12 * BLOCK as u64,
        "no new hits"
    );
    no_blocks_in_use(&pool).await;
    agent.stop().await.unwrap();
}
