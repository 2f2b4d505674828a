//! Ways of running the same sequence that must give the same greedy tokens: chunked vs whole
//! prefill, alone vs in a batch of 16, decoding from KV blocks copied into another cache, and
//! prefilling only the suffix on top of reused prefix blocks. Each runs on the tiny generated
//! model and, when installed, SmolLM2.

mod common;

use kvfleet_model::sampler::top_k;
use kvfleet_model::{LoadedModel, Model, PagedKvCache, SeqInput};
use kvfleet_proto::BlockSize;

const BS: u32 = 16;

fn argmax(logits: &[f32]) -> u32 {
    top_k(logits, 1)[0].0
}

/// Prefills `prompt[start..]` in chunks of `chunk` (positions before `start` are already in
/// the blocks of `table`), then decodes `n` greedy tokens.
fn run(
    model: &Model,
    cache: &mut PagedKvCache,
    table: &[u32],
    prompt: &[u32],
    start: usize,
    chunk: usize,
    n: usize,
) -> Vec<u32> {
    let mut pos = start;
    let mut logits = None;
    while pos < prompt.len() {
        let end = pos.saturating_add(chunk).min(prompt.len());
        let out = model
            .forward(
                &[SeqInput {
                    tokens: &prompt[pos..end],
                    start_pos: pos,
                    block_table: table,
                    want_logits: end == prompt.len(),
                }],
                cache,
            )
            .expect("prefill");
        logits = out.into_iter().next().flatten();
        pos = end;
    }
    decode(model, cache, table, pos, logits.expect("logits"), n)
}

fn decode(
    model: &Model,
    cache: &mut PagedKvCache,
    table: &[u32],
    mut pos: usize,
    logits: Vec<f32>,
    n: usize,
) -> Vec<u32> {
    let mut toks = vec![argmax(&logits)];
    while toks.len() < n {
        let last = [*toks.last().expect("token")];
        let out = model
            .forward(
                &[SeqInput {
                    tokens: &last,
                    start_pos: pos,
                    block_table: table,
                    want_logits: true,
                }],
                cache,
            )
            .expect("decode");
        pos += 1;
        toks.push(argmax(out[0].as_ref().expect("logits")));
    }
    toks
}

fn bs() -> BlockSize {
    BlockSize::new(BS).expect("block size")
}

fn prompt(m: &LoadedModel, i: usize) -> Vec<u32> {
    let text = format!(
        "Story {i}: the old lighthouse keeper counted {} ships before the storm, then wrote their names in a book that nobody ever read again.",
        i * 7 + 3
    );
    m.encode_prompt(&text).expect("encode")
}

fn chunked_prefill_matches_whole(m: &LoadedModel) {
    let p = prompt(m, 1);
    let model = &m.model;
    let need = BlockSize::blocks_for(bs(), p.len() + 12);
    let table: Vec<u32> = (0..need as u32).collect();
    let mut a = model.new_cache(need, bs()).expect("cache");
    let whole = run(model, &mut a, &table, &p, 0, p.len(), 12);
    for chunk in [1, 5, 16, 17] {
        let mut b = model.new_cache(need, bs()).expect("cache");
        assert_eq!(
            run(model, &mut b, &table, &p, 0, chunk, 12),
            whole,
            "chunk {chunk}"
        );
    }
}

fn batch_of_16_matches_alone(m: &LoadedModel) {
    let model = &m.model;
    let prompts: Vec<Vec<u32>> = (0..16).map(|i| prompt(m, i)).collect();
    let n = 10;
    let longest = prompts.iter().map(Vec::len).max().expect("prompts");
    let per_seq = BlockSize::blocks_for(bs(), longest + n) as u32;
    let tables: Vec<Vec<u32>> = (0..16u32)
        .map(|s| (s * per_seq..(s + 1) * per_seq).rev().collect())
        .collect();
    let mut cache = model.new_cache(16 * per_seq as usize, bs()).expect("cache");
    // Batched prefill of all 16, then batched decode.
    let out = model
        .forward(
            &prompts
                .iter()
                .zip(&tables)
                .map(|(p, t)| SeqInput {
                    tokens: p,
                    start_pos: 0,
                    block_table: t,
                    want_logits: true,
                })
                .collect::<Vec<_>>(),
            &mut cache,
        )
        .expect("batched prefill");
    let mut toks: Vec<Vec<u32>> = out
        .iter()
        .map(|l| vec![argmax(l.as_ref().expect("logits"))])
        .collect();
    for step in 1..n {
        let lasts: Vec<[u32; 1]> = toks.iter().map(|t| [*t.last().expect("t")]).collect();
        let batch: Vec<SeqInput<'_>> = (0..16)
            .map(|s| SeqInput {
                tokens: &lasts[s],
                start_pos: prompts[s].len() + step - 1,
                block_table: &tables[s],
                want_logits: true,
            })
            .collect();
        let out = model.forward(&batch, &mut cache).expect("batched decode");
        for (t, l) in toks.iter_mut().zip(out) {
            t.push(argmax(&l.expect("logits")));
        }
    }
    for s in [0, 7, 15] {
        let mut alone = model.new_cache(per_seq as usize, bs()).expect("cache");
        let table: Vec<u32> = (0..per_seq).collect();
        let solo = run(model, &mut alone, &table, &prompts[s], 0, usize::MAX, n);
        assert_eq!(toks[s], solo, "sequence {s}");
    }
}

fn copied_blocks_decode_like_the_original(m: &LoadedModel) {
    let model = &m.model;
    let p = prompt(m, 3);
    let nblocks = BlockSize::blocks_for(bs(), p.len() + 12) as u32;
    let table_a: Vec<u32> = (0..nblocks).collect();
    let mut a = model.new_cache(nblocks as usize, bs()).expect("cache");
    let out = model
        .forward(
            &[SeqInput {
                tokens: &p,
                start_pos: 0,
                block_table: &table_a,
                want_logits: true,
            }],
            &mut a,
        )
        .expect("prefill");
    let logits = out[0].clone().expect("logits");
    // Copy the prompt's blocks into a bigger cache at other ids, through bytes.
    let mut b = model
        .new_cache(2 * nblocks as usize + 3, bs())
        .expect("cache");
    assert_eq!(a.layout(), b.layout());
    let table_b: Vec<u32> = (0..nblocks).map(|i| 2 * nblocks + 2 - i).collect();
    for i in 0..BlockSize::blocks_for(bs(), p.len()) {
        let bytes = a.read_block(table_a[i]).expect("read");
        assert_eq!(bytes.len(), a.layout().block_bytes());
        b.write_block(table_b[i], &bytes).expect("write");
    }
    let there = decode(model, &mut b, &table_b, p.len(), logits.clone(), 12);
    let here = decode(model, &mut a, &table_a, p.len(), logits, 12);
    assert_eq!(there, here);
}

fn prefix_reuse_matches_cold(m: &LoadedModel) {
    let model = &m.model;
    let first = prompt(m, 5);
    let shared_blocks = first.len() / BS as usize;
    assert!(shared_blocks >= 1, "prompt too short for a full block");
    let shared = shared_blocks * BS as usize;
    // A second prompt with the same first `shared` tokens and a different tail.
    let mut second = first[..shared].to_vec();
    second.extend(
        m.encode_prompt(" and then the sea was quiet for a year.")
            .expect("encode"),
    );
    let need = BlockSize::blocks_for(bs(), first.len().max(second.len()) + 12);
    let mut cache = model.new_cache(2 * need, bs()).expect("cache");
    let table_first: Vec<u32> = (0..need as u32).collect();
    run(model, &mut cache, &table_first, &first, 0, usize::MAX, 2);
    // The second sequence reuses the first's full prefix blocks and gets fresh ones after.
    let mut table_second: Vec<u32> = table_first[..shared_blocks].to_vec();
    table_second.extend(need as u32..2 * need as u32);
    let warm = run(
        model,
        &mut cache,
        &table_second,
        &second,
        shared,
        usize::MAX,
        12,
    );
    let mut cold_cache = model.new_cache(need, bs()).expect("cache");
    let cold_table: Vec<u32> = (0..need as u32).collect();
    let cold = run(
        model,
        &mut cold_cache,
        &cold_table,
        &second,
        0,
        usize::MAX,
        12,
    );
    assert_eq!(warm, cold);
}

#[test]
fn tiny_chunked_prefill_matches_whole() {
    chunked_prefill_matches_whole(&common::tiny());
}

#[test]
fn tiny_batch_of_16_matches_alone() {
    batch_of_16_matches_alone(&common::tiny());
}

#[test]
fn tiny_copied_blocks_decode_like_the_original() {
    copied_blocks_decode_like_the_original(&common::tiny());
}

#[test]
fn tiny_prefix_reuse_matches_cold() {
    prefix_reuse_matches_cold(&common::tiny());
}

// The same on a tiny Gemma 3 (8-token sliding window on layer 0, global layer 1): prompts are
// far longer than the window, so chunks and reused prefixes cross it.

#[test]
fn tiny_gemma_is_gemma_with_a_sliding_window() {
    let m = common::tiny_gemma();
    let c = m.model.config();
    assert_eq!(c.architecture, kvfleet_model::Architecture::Gemma3);
    assert_eq!((c.window(0), c.window(1)), (Some(8), None));
    assert!(c.qk_norm && c.post_norms && c.tie_embeddings);
    assert!(prompt(&m, 1).len() > 8 * 4);
}

#[test]
fn tiny_gemma_chunked_prefill_matches_whole() {
    chunked_prefill_matches_whole(&common::tiny_gemma());
}

#[test]
fn tiny_gemma_batch_of_16_matches_alone() {
    batch_of_16_matches_alone(&common::tiny_gemma());
}

#[test]
fn tiny_gemma_copied_blocks_decode_like_the_original() {
    copied_blocks_decode_like_the_original(&common::tiny_gemma());
}

#[test]
fn tiny_gemma_prefix_reuse_matches_cold() {
    prefix_reuse_matches_cold(&common::tiny_gemma());
}

#[test]
fn smollm2_chunked_prefill_matches_whole() {
    if let Some(m) = common::smollm2() {
        chunked_prefill_matches_whole(m);
    }
}

#[test]
fn smollm2_batch_of_16_matches_alone() {
    if let Some(m) = common::smollm2() {
        batch_of_16_matches_alone(m);
    }
}

#[test]
fn smollm2_copied_blocks_decode_like_the_original() {
    if let Some(m) = common::smollm2() {
        copied_blocks_decode_like_the_original(m);
    }
}

#[test]
fn smollm2_prefix_reuse_matches_cold() {
    if let Some(m) = common::smollm2() {
        prefix_reuse_matches_cold(m);
    }
}
