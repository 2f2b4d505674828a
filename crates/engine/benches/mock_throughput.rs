//! Mock-engine simulated tokens per wall-second: 1,000 requests (512-token prompts sharing a
//! 256-token system prompt among 8 variants, 128 output tokens) arriving at 40 requests/s,
//! replayed in virtual time on the default 8B/H100 profile until idle.

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use kvfleet_engine::{Engine, MockEngine, MockExecutor, MockProfile, Request, SchedulerConfig};
use kvfleet_proto::SamplingParams;

const REQUESTS: u64 = 1000;
const OUTPUT: u32 = 128;

/// Returns (tokens generated, virtual time at which the last one was produced).
fn replay() -> (u64, Duration) {
    let profile = MockProfile::default_8b_h100();
    let config = SchedulerConfig {
        kv_memory: profile.pool_sizing(),
        ..Default::default()
    };
    let mut engine = MockEngine::new(config, MockExecutor::new(profile)).expect("engine");
    let mut tokens = 0u64;
    for i in 0..REQUESTS {
        let t = Duration::from_millis(25 * i);
        engine.step_until(t).expect("step");
        tokens += engine.drain_outputs().len() as u64;
        let mut prompt: Vec<u32> = (0..256).map(|x| x * 8 + (i % 8) as u32).collect();
        prompt.extend((0..256).map(|x| (x as u64 * 7919 + i) as u32));
        engine
            .submit(Request::new(prompt, SamplingParams::greedy(OUTPUT)), t)
            .expect("submit");
    }
    while let Some(t) = engine.next_event_time() {
        engine.step_until(t).expect("step");
        tokens += engine.drain_outputs().len() as u64;
    }
    black_box(engine.drain_events());
    (tokens, engine.now())
}

fn simulated_tokens(c: &mut Criterion) {
    let (tokens, virtual_time) = replay();
    assert_eq!(tokens, REQUESTS * u64::from(OUTPUT));
    eprintln!("one replay covers {virtual_time:?} of virtual time");
    let mut group = c.benchmark_group("mock");
    group.sample_size(10);
    group.throughput(Throughput::Elements(REQUESTS * u64::from(OUTPUT)));
    group.bench_function("replay_1000_requests", |b| b.iter(replay));
    group.finish();
}

criterion_group!(benches, simulated_tokens);
criterion_main!(benches);
