//! The real model's KV through the lower tiers: a prompt whose prefix was evicted from the
//! engine's pool and is onboarded from host memory (G2) or from block files on disk (G3, also
//! after a restart of the engine) gives exactly the greedy tokens of a cold run. Each runs on
//! the tiny generated model and, when installed, on SmolLM2.
#![allow(clippy::print_stderr)]

mod common;

use std::path::PathBuf;
use std::sync::Arc;

use kvfleet_engine::{
    Engine, EngineOutput, PoolSizing, Request, RequestStats, SchedulerConfig, TierConfig,
};
use kvfleet_model::{LoadedModel, NativeEngine, native_engine_from};
use kvfleet_proto::SamplingParams;

/// A directory under the system's temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let dir = std::env::temp_dir().join(format!(
            "kvfleet-model-tiers-{name}-{}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Device pool blocks: small, so that three other prompts evict the first one's prefix.
const G1_BLOCKS: u32 = 8;

fn engine(m: &Arc<LoadedModel>, tiers: TierConfig) -> NativeEngine {
    let config = SchedulerConfig {
        kv_memory: PoolSizing::Blocks(G1_BLOCKS),
        tiers,
        ..SchedulerConfig::default()
    };
    native_engine_from(Arc::clone(m), config).expect("engine")
}

fn tiers(m: &Arc<LoadedModel>, g2_blocks: u64, g3_blocks: u64, dir: &TempDir) -> TierConfig {
    let probe = engine(m, TierConfig::default());
    let block_bytes = probe.kv_layout().block_bytes() as u64;
    TierConfig {
        host_bytes: g2_blocks * block_bytes,
        disk_bytes: g3_blocks * block_bytes,
        disk_dir: dir.0.clone(),
        ..TierConfig::default()
    }
}

/// Runs one greedy request to its end.
fn one(engine: &mut NativeEngine, prompt: &[u32], n: u32) -> (Vec<u32>, RequestStats) {
    let sampling = SamplingParams {
        ignore_eos: true,
        ..SamplingParams::greedy(n)
    };
    let id = engine
        .submit(Request::new(prompt.to_vec(), sampling), engine.now())
        .expect("submit");
    let mut tokens = Vec::new();
    let mut stats = None;
    while let Some(t) = engine.next_event_time() {
        engine.step_until(t).expect("step");
        for out in engine.drain_outputs() {
            match out {
                EngineOutput::Token(t) if t.request == id => {
                    tokens.push(t.token);
                    stats = t.finish.map(|f| f.stats).or(stats);
                }
                EngineOutput::Token(_) => {}
                EngineOutput::Aborted { error, .. } => panic!("aborted: {error}"),
            }
        }
    }
    engine.check_invariants().expect("invariants");
    (tokens, stats.expect("finished"))
}

fn prompt(m: &LoadedModel, i: usize) -> Vec<u32> {
    let text = format!(
        "Story {i}: the old lighthouse keeper counted {} ships before the storm, then wrote their names in a book that nobody ever read again, and the harbour master kept a second list of his own, longer than the first and written in red ink on the back of old charts.",
        i * 7 + 3
    );
    let mut p = m.encode_prompt(&text).expect("encode");
    p.truncate(48);
    assert_eq!(p.len(), 48, "prompt too short for three blocks");
    p
}

/// Serves `a`, then three other prompts that push it out of the device pool.
fn serve_and_evict(engine: &mut NativeEngine, m: &LoadedModel, a: &[u32]) {
    one(engine, a, 2);
    for i in [41, 42, 43] {
        one(engine, &prompt(m, i), 2);
    }
}

fn cold_tokens(m: &Arc<LoadedModel>, a: &[u32], n: u32) -> Vec<u32> {
    let mut cold = engine(m, TierConfig::default());
    let (tokens, stats) = one(&mut cold, a, n);
    assert_eq!(stats.cached_tokens, 0);
    tokens
}

fn onboarded_from_host_memory_matches_a_cold_run(m: &Arc<LoadedModel>) {
    let dir = TempDir::new("g2");
    let a = prompt(m, 1);
    let mut e = engine(m, tiers(m, 64, 0, &dir));
    serve_and_evict(&mut e, m, &a);
    let (tokens, stats) = one(&mut e, &a, 12);
    // 48 tokens: two full blocks are reusable (the last block holds the token whose logits
    // give the first output, so it is computed).
    assert_eq!(stats.cached_tokens, 32, "prefix onboarded, not recomputed");
    assert_eq!(e.metrics().tiers.g2.hits, 2);
    assert_eq!(tokens, cold_tokens(m, &a, 12));
}

fn onboarded_from_disk_and_after_a_restart_matches_a_cold_run(m: &Arc<LoadedModel>) {
    let dir = TempDir::new("g3");
    let a = prompt(m, 2);
    let cold = cold_tokens(m, &a, 12);
    {
        let mut e = engine(m, tiers(m, 0, 64, &dir));
        serve_and_evict(&mut e, m, &a);
        e.flush_tiers();
        let (tokens, stats) = one(&mut e, &a, 12);
        assert_eq!(stats.cached_tokens, 32);
        assert_eq!(e.metrics().tiers.g3.hits, 2);
        assert_eq!(tokens, cold);
    }
    // A new engine over the same directory: what the disk holds is hit again.
    let mut restarted = engine(m, tiers(m, 0, 64, &dir));
    let (tokens, stats) = one(&mut restarted, &a, 12);
    assert_eq!(stats.cached_tokens, 32);
    assert_eq!(restarted.metrics().tiers.g3.hits, 2);
    assert_eq!(tokens, cold);
}

fn tiny() -> Arc<LoadedModel> {
    Arc::new(common::tiny())
}

fn smollm2() -> Option<Arc<LoadedModel>> {
    common::smollm2_shared()
}

mod tiny_model {
    #[test]
    fn onboarded_from_host_memory_matches_a_cold_run() {
        super::onboarded_from_host_memory_matches_a_cold_run(&super::tiny());
    }

    #[test]
    fn onboarded_from_disk_and_after_a_restart_matches_a_cold_run() {
        super::onboarded_from_disk_and_after_a_restart_matches_a_cold_run(&super::tiny());
    }
}

mod smollm2_model {
    #[test]
    fn onboarded_from_host_memory_matches_a_cold_run() {
        if let Some(m) = super::smollm2() {
            super::onboarded_from_host_memory_matches_a_cold_run(&m);
        }
    }

    #[test]
    fn onboarded_from_disk_and_after_a_restart_matches_a_cold_run() {
        if let Some(m) = super::smollm2() {
            super::onboarded_from_disk_and_after_a_restart_matches_a_cold_run(&m);
        }
    }
}
