//! The worker pool changed at runtime, as the control-plane client changes it: workers started,
//! retired (drained, then stopped), drained and undrained, and restarted under the same id
//! with another role. Real worker processes.

mod common;

use std::time::Duration;

use common::{TestAgent, model};
use kvfleet_agent::backend::{Backend as _, WorkerState};
use kvfleet_agent::worker::{Device, ModelConfig, WorkerConfig};
use kvfleet_proto::WorkerId;
use kvfleet_proto::api::WorkerRole;
use serde_json::json;

fn worker(role: WorkerRole) -> WorkerConfig {
    WorkerConfig {
        model: "m".into(),
        device: Device::Cpu,
        role,
    }
}

fn state(agent: &TestAgent, id: u64) -> Option<(WorkerState, WorkerRole, u64)> {
    agent
        .running
        .pool
        .workers()
        .into_iter()
        .find(|w| w.id == WorkerId(id))
        .map(|w| (w.state, w.role, w.starts))
}

async fn wait(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !check() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn chat_status(agent: &TestAgent) -> u16 {
    agent
        .post(
            "/v1/chat/completions",
            json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}),
        )
        .await
        .status()
        .as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_start_stop_drain_and_change_role_at_runtime() {
    let agent = TestAgent::start(&format!(
        "{}[[workers]]\nmodel = \"m\"\ndevice = \"cpu\"\n",
        model("m", 0, 256)
    ))
    .await;
    let pool = agent.running.pool.clone();
    let mut mock = ModelConfig::mock("m");
    mock.context_length = 256;
    mock.kv_blocks = 4096;

    // A second worker under a control-plane id.
    assert!(pool.start_worker(WorkerId(42), worker(WorkerRole::Aggregated), mock.clone()));
    assert!(
        !pool.start_worker(WorkerId(42), worker(WorkerRole::Aggregated), mock.clone()),
        "one worker per id"
    );
    wait("worker 42 ready", || {
        state(&agent, 42).is_some_and(|s| s.0 == WorkerState::Ready)
    })
    .await;

    // Draining: reported as such and left out of routing; the other worker serves.
    assert!(pool.set_draining(WorkerId(1), true));
    assert_eq!(state(&agent, 1).map(|s| s.0), Some(WorkerState::Draining));
    for _ in 0..4 {
        assert_eq!(chat_status(&agent).await, 200);
    }
    let counters = pool.counters();
    let served = |id| {
        counters
            .iter()
            .find(|c| c.id == WorkerId(id))
            .map(|c| (c.requests, c.tokens))
    };
    assert_eq!(
        served(1),
        Some((0, 0)),
        "a draining worker gets nothing new"
    );
    assert_eq!(served(42), Some((4, 16)));
    assert!(pool.set_draining(WorkerId(1), false));
    assert_eq!(state(&agent, 1).map(|s| s.0), Some(WorkerState::Ready));

    // A role change: stopped and started again under the same id.
    assert!(pool.stop_worker(WorkerId(42)));
    assert!(pool.start_worker(WorkerId(42), worker(WorkerRole::Decode), mock.clone()));
    wait("worker 42 ready as decode", || {
        state(&agent, 42).is_some_and(|s| s.0 == WorkerState::Ready && s.1 == WorkerRole::Decode)
    })
    .await;
    assert_eq!(state(&agent, 42).map(|s| s.2), Some(1), "a new incarnation");

    // Retiring: idle, so it goes at once; unknown ids are refused.
    assert!(pool.retire_worker(WorkerId(1), Duration::from_secs(10)));
    wait("worker 1 gone", || state(&agent, 1).is_none()).await;
    assert!(!pool.stop_worker(WorkerId(1)));
    assert!(!pool.set_draining(WorkerId(7), true));
    let ids: Vec<WorkerId> = pool.running().iter().map(|w| w.id).collect();
    assert_eq!(ids, [WorkerId(42)]);
    // The decode worker serves (prefill-only workers would not).
    assert_eq!(chat_status(&agent).await, 200);
    agent.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retired_worker_finishes_its_requests_first() {
    // 20 ms per token: a 30-token answer takes about 600 ms.
    let agent = TestAgent::start(&format!(
        "{}[[workers]]\nmodel = \"m\"\ndevice = \"cpu\"\n",
        model("m", 20_000, 256)
    ))
    .await;
    let pool = agent.running.pool.clone();
    let request = {
        let client = agent.client.clone();
        let url = format!("http://{}/v1/chat/completions", agent.addr);
        tokio::spawn(async move {
            let response = client
                .post(url)
                .json(
                    &json!({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                              "max_tokens": 30}),
                )
                .send()
                .await
                .unwrap();
            let status = response.status().as_u16();
            let body: serde_json::Value = response.json().await.unwrap();
            (status, body)
        })
    };
    wait("the request to reach the worker", || {
        agent
            .running
            .pool
            .workers()
            .first()
            .is_some_and(|w| w.outstanding == 1)
    })
    .await;
    assert!(pool.retire_worker(WorkerId(1), Duration::from_secs(30)));
    // Draining at once: no new work...
    assert_eq!(state(&agent, 1).map(|s| s.0), Some(WorkerState::Draining));
    assert_eq!(chat_status(&agent).await, 503);
    // ...but the request in flight completes, and only then does the worker go.
    let (status, body) = request.await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["usage"]["completion_tokens"], 30, "{body}");
    wait("worker 1 gone", || state(&agent, 1).is_none()).await;
    agent.stop().await.unwrap();
}
