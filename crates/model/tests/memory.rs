//! Resident memory with the model mapped: the weights are the file's pages (shared with every
//! other process mapping the file), not a private copy, so a worker's resident memory is about
//! the file size plus its KV cache. Measured from `/proc/self/status` around loading the real
//! models and running them (Linux; skipped with a printed reason elsewhere or without the
//! models).
#![allow(clippy::print_stderr)]

mod common;

use std::path::Path;

use kvfleet_model::SeqInput;
use kvfleet_proto::BlockSize;

/// `(VmRSS, RssAnon, RssFile)` in bytes.
fn rss() -> Option<(u64, u64, u64)> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = s.lines().find(|l| l.starts_with(name))?;
        let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb * 1024)
    };
    Some((field("VmRSS:")?, field("RssAnon:")?, field("RssFile:")?))
}

fn check(path: &Path, name: &str) {
    let Some(before) = rss() else {
        eprintln!("SKIP: no /proc/self/status on this system");
        return;
    };
    let file = std::fs::metadata(path).expect("model file").len();
    let m = kvfleet_model::load(path).expect("load");
    let bs = BlockSize::default();
    let blocks = 256usize;
    let mut cache = m.model.new_cache(blocks, bs).expect("cache");
    let kv = (blocks * cache.layout().block_bytes()) as u64;
    let prompt: Vec<u32> = (0..200u32).map(|i| 300 + i * 7).collect();
    let table: Vec<u32> = (0..blocks as u32).collect();
    for start in [0, 100] {
        m.model
            .forward(
                &[SeqInput {
                    tokens: &prompt[start..start + 100],
                    start_pos: start,
                    block_table: &table,
                    want_logits: true,
                }],
                &mut cache,
            )
            .expect("forward");
    }
    let after = rss().expect("status");
    let (total, anon, file_pages) = (
        after.0.saturating_sub(before.0),
        after.1.saturating_sub(before.1),
        after.2.saturating_sub(before.2),
    );
    let mb = |b: u64| b as f64 / 1e6;
    eprintln!(
        "{name}: file {:.1} MB, KV cache {:.1} MB; resident growth {:.1} MB ({:.1} MB anonymous, {:.1} MB file pages)",
        mb(file),
        mb(kv),
        mb(total),
        mb(anon),
        mb(file_pages)
    );
    // The weights are mapped, not copied: private memory is the KV cache, the tokenizer and
    // the step's buffers.
    assert!(
        anon <= kv + 100_000_000,
        "{name}: {:.1} MB of private memory for a {:.1} MB KV cache",
        mb(anon),
        mb(kv)
    );
    assert!(
        total <= file + kv + 100_000_000,
        "{name}: resident memory grew {:.1} MB for a {:.1} MB file and a {:.1} MB KV cache",
        mb(total),
        mb(file),
        mb(kv)
    );
    drop(m);
}

/// One test for both models: resident memory is per process, so they must not run at once.
#[test]
fn resident_memory_is_file_plus_kv() {
    match common::smollm2_path() {
        Some(p) => check(&p, "SmolLM2"),
        None => eprintln!("SKIP: SmolLM2 GGUF not found"),
    }
    match common::gemma3_path() {
        Some(p) => check(&p, "Gemma 3"),
        None => eprintln!("SKIP: Gemma 3 GGUF not found"),
    }
}
