//! Prefill and decode throughput of a model on this machine.
//!
//! `cargo run -p kvfleet-model --example bench -- <model.gguf|dir> [threads]`
//!
//! Prints one line per measurement: prefill of a 512-token prompt at batch 1, batched prefill
//! (128-token prompts) and decode (32 steps after a 64-token prompt) at batch 1, 8 and 32.
//! Each line also gives the CPU time of the calling thread (`/proc/thread-self/schedstat`):
//! with `KVFLEET_THREADS=1` that is all the work, and a busy machine disturbs it far less than
//! wall time.
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
    let path = std::env::args()
        .nth(1)
        .context("usage: bench <model.gguf|dir> [batches, e.g. 1,8,32]")?;
    let batches: Vec<usize> = std::env::args()
        .nth(2)
        .unwrap_or_else(|| "1,8,32".into())
        .split(',')
        .map(|s| s.parse().context("batch size"))
        .collect::<anyhow::Result<_>>()?;
    let t0 = Instant::now();
    let m = kvfleet_model::load(std::path::Path::new(&path)).context("loading model")?;
    println!(
        "loaded {} in {:.2}s (kernels {})",
        path,
        t0.elapsed().as_secs_f64(),
        m.model.kernel_path()
    );
    let model = &m.model;
    let bs = BlockSize::default();
    let vocab = model.config().vocab_size as u32;
    let tokens = |seed: usize, n: usize| -> Vec<u32> {
        (0..n)
            .map(|i| ((i * 7919 + seed * 104_729) as u32 % (vocab - 300)) + 256)
            .collect()
    };

    // Prefill, one 512-token prompt (the llama.cpp comparison point).
    {
        let p = tokens(0, 512);
        let nb = bs.blocks_for(512);
        let mut cache = model.new_cache(nb, bs)?;
        let table: Vec<u32> = (0..nb as u32).collect();
        let (t, c) = (Instant::now(), thread_cpu());
        model.forward(
            &[SeqInput {
                tokens: &p,
                start_pos: 0,
                block_table: &table,
                want_logits: true,
            }],
            &mut cache,
        )?;
        let s = t.elapsed().as_secs_f64();
        println!(
            "prefill batch 1 x 512 tokens: {:.1} tok/s ({s:.2}s; {:.0} ms CPU on the calling thread)",
            512.0 / s,
            (thread_cpu() - c) * 1e3
        );
    }
    for &b in &batches {
        let plen = 128;
        let prompts: Vec<Vec<u32>> = (0..b).map(|i| tokens(i + 1, plen)).collect();
        let per = bs.blocks_for(plen);
        let mut cache = model.new_cache(b * per, bs)?;
        let tables: Vec<Vec<u32>> = (0..b)
            .map(|i| ((i * per) as u32..((i + 1) * per) as u32).collect())
            .collect();
        let batch: Vec<SeqInput<'_>> = (0..b)
            .map(|i| SeqInput {
                tokens: &prompts[i],
                start_pos: 0,
                block_table: &tables[i],
                want_logits: true,
            })
            .collect();
        let (t, c) = (Instant::now(), thread_cpu());
        model.forward(&batch, &mut cache)?;
        let s = t.elapsed().as_secs_f64();
        println!(
            "prefill batch {b} x {plen} tokens: {:.1} tok/s ({s:.2}s; {:.0} ms CPU on the calling thread)",
            (b * plen) as f64 / s,
            (thread_cpu() - c) * 1e3
        );
    }
    for &b in &batches {
        let (plen, steps) = (64, 32);
        let prompts: Vec<Vec<u32>> = (0..b).map(|i| tokens(i + 100, plen)).collect();
        let per = bs.blocks_for(plen + steps);
        let mut cache = model.new_cache(b * per, bs)?;
        let tables: Vec<Vec<u32>> = (0..b)
            .map(|i| ((i * per) as u32..((i + 1) * per) as u32).collect())
            .collect();
        let batch: Vec<SeqInput<'_>> = (0..b)
            .map(|i| SeqInput {
                tokens: &prompts[i],
                start_pos: 0,
                block_table: &tables[i],
                want_logits: true,
            })
            .collect();
        let out = model.forward(&batch, &mut cache)?;
        let mut last: Vec<[u32; 1]> = out
            .iter()
            .map(|l| [top_k(l.as_ref().map_or(&[][..], |v| v), 1)[0].0])
            .collect();
        let (t, c) = (Instant::now(), thread_cpu());
        for step in 0..steps {
            let batch: Vec<SeqInput<'_>> = (0..b)
                .map(|i| SeqInput {
                    tokens: &last[i],
                    start_pos: plen + step,
                    block_table: &tables[i],
                    want_logits: true,
                })
                .collect();
            let out = model.forward(&batch, &mut cache)?;
            last = out
                .iter()
                .map(|l| [top_k(l.as_ref().map_or(&[][..], |v| v), 1)[0].0])
                .collect();
        }
        let s = t.elapsed().as_secs_f64();
        println!(
            "decode batch {b}: {:.1} tok/s ({:.1} ms/step; {:.2} ms CPU/step on the calling thread)",
            (b * steps) as f64 / s,
            s * 1000.0 / steps as f64,
            (thread_cpu() - c) * 1e3 / steps as f64
        );
    }
    Ok(())
}
