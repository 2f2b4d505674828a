//! Scheduler step cost with 256 running sequences (mock executor, virtual time).
//!
//! Each iteration finishes one step (applying 256 sampled tokens, registering full blocks) and
//! plans and starts the next (block allocation, batch assembly, pseudo-tokens). Finished
//! requests are replaced so the batch stays at 256 (a 128-token prefill now and then).

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use kvfleet_engine::{
    Engine, EngineOutput, MockEngine, MockExecutor, MockProfile, PoolSizing, Request,
    SchedulerConfig,
};
use kvfleet_proto::SamplingParams;

const RUNNING: usize = 256;

fn request(i: u64) -> Request {
    let prompt = (0..128u32)
        .map(|t| t.wrapping_mul(31).wrapping_add(i as u32))
        .collect();
    Request::new(prompt, SamplingParams::greedy(1024))
}

fn step_with_256_running(c: &mut Criterion) {
    let config = SchedulerConfig {
        max_num_seqs: RUNNING,
        kv_memory: PoolSizing::Blocks(48_000),
        ..Default::default()
    };
    let mut engine =
        MockEngine::new(config, MockExecutor::new(MockProfile::default_8b_h100())).expect("engine");
    let mut next = 0u64;
    for _ in 0..RUNNING {
        engine
            .submit(request(next), Duration::ZERO)
            .expect("submit");
        next += 1;
    }
    let mut group = c.benchmark_group("scheduler");
    group.throughput(Throughput::Elements(1));
    group.bench_function("step_256_running", |b| {
        b.iter(|| {
            let t = engine.next_event_time().expect("work");
            engine.step_until(t).expect("step");
            for out in engine.drain_outputs() {
                if let EngineOutput::Token(tok) = out
                    && tok.finish.is_some()
                {
                    engine.submit(request(next), t).expect("resubmit");
                    next += 1;
                }
            }
            black_box(engine.drain_events());
        });
    });
    group.finish();
    assert!(engine.metrics().running >= RUNNING - 1);
}

criterion_group!(benches, step_with_256_running);
criterion_main!(benches);
