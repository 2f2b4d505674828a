//! Batch invariance of the fast path: a sequence's logits are bit-identical whether it runs
//! alone or inside a batch of 2–16 other sequences (at any position in the batch, next to
//! prefills and decodes of other lengths), and whether its prompt is prefilled whole or in
//! chunks. That is what lets disaggregated prefill/decode, migration and seeded sampling give
//! identical text on any two workers running the same kernel path.
//!
//! Runs on the tiny generated models (dense f32 weights) and, when installed, SmolLM2 (Q4_1 +
//! Q8_0) and Gemma 3 (Q5_0, Q8_0, Q4_K, Q6_K), on the fastest kernels of this CPU.

mod common;

use kvfleet_model::{LoadedModel, Model, SeqInput};
use kvfleet_proto::BlockSize;

const BS: u32 = 16;
const STEPS: usize = 4;

fn bs() -> BlockSize {
    BlockSize::new(BS).expect("block size")
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|f| f.to_bits()).collect()
}

fn argmax(v: &[f32]) -> u32 {
    kvfleet_model::sampler::top_k(v, 1)[0].0
}

fn prompt(m: &LoadedModel, i: usize) -> Vec<u32> {
    let text = format!(
        "Note {i}: {} boxes of {} were shipped to the harbour on day {}, and {} came back.",
        i * 3 + 1,
        ["apples", "nails", "paper", "tea"][i % 4],
        i * 7 % 31,
        i % 5
    );
    let mut ids = m.encode_prompt(&text).expect("encode");
    // Lengths vary across sequences.
    ids.truncate(12 + (i * 5) % 17);
    ids
}

/// The logits of the prompt's last token and of `STEPS` greedy decode steps, as bits.
type Trace = Vec<Vec<u32>>;

/// Runs `prompts` together: prefill in chunks of `chunk` tokens (every sequence advancing in
/// each step), then `STEPS` batched decode steps. Returns each sequence's trace.
fn run_batch(model: &Model, prompts: &[Vec<u32>], chunk: usize) -> Vec<Trace> {
    let per = bs().blocks_for(prompts.iter().map(Vec::len).max().unwrap_or(0) + STEPS + 1) as u32;
    let n = prompts.len() as u32;
    // Block tables interleaved and reversed, so physical placement differs from "alone".
    let tables: Vec<Vec<u32>> = (0..n)
        .map(|s| (0..per).rev().map(|b| b * n + s).collect())
        .collect();
    let mut cache = model.new_cache((n * per) as usize, bs()).expect("cache");
    let mut traces: Vec<Trace> = vec![Vec::new(); prompts.len()];
    let mut pos = vec![0usize; prompts.len()];
    let mut last = vec![0u32; prompts.len()];
    // Prefill: sequences whose prompt is done wait (their decode starts with everyone's).
    while pos.iter().zip(prompts).any(|(p, pr)| p < &pr.len()) {
        let mut batch = Vec::new();
        let mut who = Vec::new();
        for (s, pr) in prompts.iter().enumerate() {
            if pos[s] < pr.len() {
                let end = (pos[s] + chunk).min(pr.len());
                batch.push(SeqInput {
                    tokens: &pr[pos[s]..end],
                    start_pos: pos[s],
                    block_table: &tables[s],
                    want_logits: end == pr.len(),
                });
                who.push((s, end));
            }
        }
        let out = model.forward(&batch, &mut cache).expect("prefill");
        for ((s, end), l) in who.into_iter().zip(out) {
            pos[s] = end;
            if let Some(l) = l {
                traces[s].push(bits(&l));
                last[s] = argmax(&l);
            }
        }
    }
    for _ in 0..STEPS {
        let toks: Vec<[u32; 1]> = last.iter().map(|&t| [t]).collect();
        let batch: Vec<SeqInput<'_>> = (0..prompts.len())
            .map(|s| SeqInput {
                tokens: &toks[s],
                start_pos: pos[s],
                block_table: &tables[s],
                want_logits: true,
            })
            .collect();
        let out = model.forward(&batch, &mut cache).expect("decode");
        for (s, l) in out.into_iter().enumerate() {
            let l = l.expect("logits");
            traces[s].push(bits(&l));
            last[s] = argmax(&l);
            pos[s] += 1;
        }
    }
    traces
}

fn batch_invariant(m: &LoadedModel) {
    let model = &m.model;
    assert!(
        !model.kernel_path().is_exact(),
        "these tests run the fast path"
    );
    let target = prompt(m, 0);
    let alone = run_batch(model, std::slice::from_ref(&target), usize::MAX)
        .pop()
        .expect("trace");
    assert_eq!(alone.len(), 1 + STEPS);
    // Batches of 2..=16 with the target at the front, the back, and in the middle.
    for (size, at) in [(2, 1), (3, 0), (5, 2), (9, 8), (16, 7), (16, 0)] {
        let mut prompts: Vec<Vec<u32>> = (1..size).map(|i| prompt(m, i + size)).collect();
        prompts.insert(at, target.clone());
        for chunk in [usize::MAX, 5] {
            let traces = run_batch(model, &prompts, chunk);
            assert_eq!(
                traces[at],
                alone,
                "{}: logits differ in a batch of {size} at position {at} (prefill chunks of {chunk})",
                model.kernel_path()
            );
        }
    }
    eprintln!(
        "batch-invariant on {}: {} logit vectors compared bit for bit",
        model.kernel_path(),
        (1 + STEPS) * 12
    );
}

#[test]
fn tiny_llama_is_batch_invariant() {
    batch_invariant(&common::tiny());
}

#[test]
fn tiny_gemma_is_batch_invariant() {
    batch_invariant(&common::tiny_gemma());
}

#[test]
fn smollm2_is_batch_invariant() {
    if let Some(m) = common::smollm2() {
        batch_invariant(m);
    }
}

#[test]
fn gemma3_is_batch_invariant() {
    if let Some(m) = common::gemma3() {
        batch_invariant(m);
    }
}
