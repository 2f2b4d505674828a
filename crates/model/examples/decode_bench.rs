//! Batch-1 decode speed alone, for profiling and before/after comparisons of the kernels.
//!
//! `cargo run -p kvfleet-model --example decode_bench -- <model.gguf|dir> [steps] [rounds]`
//!
//! Prefills a 64-token prompt, then decodes `steps` tokens (greedy) `rounds` times from the same
//! prompt and prints each round's rate and the median. The last line also prints a checksum of
//! the generated ids, so two builds that must agree bit for bit can be compared at a glance.
//! With `KVFLEET_THREADS=1` it also prints the CPU time per token of the one thread (from
//! `/proc/thread-self/schedstat`), which a busy machine disturbs far less than wall time.
#![allow(clippy::print_stdout)]

use std::time::Instant;

use anyhow::Context;
use kvfleet_model::{SeqInput, sampler::top_k};
use kvfleet_proto::BlockSize;

/// CPU time this thread has run, in seconds (Linux).
fn thread_cpu() -> f64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |ns| ns / 1e9)
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let path = args
        .next()
        .context("usage: decode_bench <model.gguf|dir> [steps] [rounds]")?;
    let steps: usize = args.next().map_or(Ok(64), |s| s.parse()).context("steps")?;
    let rounds: usize = args.next().map_or(Ok(5), |s| s.parse()).context("rounds")?;
    let m = kvfleet_model::load(std::path::Path::new(&path)).context("loading model")?;
    let model = &m.model;
    let bs = BlockSize::default();
    let vocab = model.config().vocab_size as u32;
    let plen = 64;
    let prompt: Vec<u32> = (0..plen)
        .map(|i| ((i * 7919 + 104_729) as u32 % (vocab - 300)) + 256)
        .collect();
    let per = bs.blocks_for(plen + steps);
    let table: Vec<u32> = (0..per as u32).collect();
    let mut rates = Vec::new();
    let mut cpu = Vec::new();
    let mut ids = Vec::new();
    for round in 0..rounds {
        let mut cache = model.new_cache(per, bs)?;
        let out = model.forward(
            &[SeqInput {
                tokens: &prompt,
                start_pos: 0,
                block_table: &table,
                want_logits: true,
            }],
            &mut cache,
        )?;
        let first = out.first().and_then(|l| l.as_ref()).context("no logits")?;
        let mut last = [top_k(first, 1)[0].0];
        ids.clear();
        let t = Instant::now();
        let c0 = thread_cpu();
        for step in 0..steps {
            let out = model.forward(
                &[SeqInput {
                    tokens: &last,
                    start_pos: plen + step,
                    block_table: &table,
                    want_logits: true,
                }],
                &mut cache,
            )?;
            let l = out.first().and_then(|l| l.as_ref()).context("no logits")?;
            last = [top_k(l, 1)[0].0];
            ids.push(last[0]);
        }
        let rate = steps as f64 / t.elapsed().as_secs_f64();
        let ms = (thread_cpu() - c0) * 1e3 / steps as f64;
        println!(
            "round {round}: decode batch 1: {rate:.1} tok/s, {ms:.2} ms CPU/token on the calling thread"
        );
        rates.push(rate);
        cpu.push(ms);
    }
    rates.sort_by(f64::total_cmp);
    cpu.sort_by(f64::total_cmp);
    let checksum = ids.iter().fold(0u64, |h, &id| {
        h.wrapping_mul(1_000_003).wrapping_add(u64::from(id))
    });
    println!(
        "median decode batch 1: {:.1} tok/s, {:.2} ms CPU/token on the calling thread, over {rounds} rounds of {steps} steps (ids checksum {checksum:016x}, kernels {})",
        rates[rates.len() / 2],
        cpu[cpu.len() / 2],
        model.kernel_path()
    );
    Ok(())
}
