//! The SLA planner end to end: a real Postgres, two control-plane replicas, and two agents
//! running mock workers on fake GPUs (two each), measured by their own heartbeats.
//!
//! A deployment in planner mode `auto`, with an SLA and the performance profile of the very
//! mock workers the agents run (computed from their timing model, as `kvfleet profile` would
//! measure it), starts at one worker. Then, each phase printing what it saw:
//!
//! 1. **Windows.** Requests served show up, exactly once, in the heartbeat windows the control
//!    plane stored: requests, prompt and output tokens as the clients' `usage` counted them,
//!    one TTFT per request and one ITL per further token.
//! 2. **Ramp.** A client load ramp makes the leader's planner add workers: an applied
//!    `scale_up` decision row (REST `GET /api/v1/planner/decisions` and `kvfleet decisions`),
//!    more workers ready on the agents.
//! 3. **Leader kill.** The leading replica is killed mid-ramp; the other takes the loop over
//!    within seconds and the next decision rows are its.
//! 4. **Scale-down.** The load drops to a trickle: after the cooldown the planner removes the
//!    extra workers, each drained before it stops, and no client request fails, through the
//!    whole test.
//!
//! Needs `DATABASE_URL` (`source scripts/lib/common.sh && ensure_test_postgres`); without it
//! the test prints why and skips.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    unreachable_pub
)]

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use kvfleet_agent::gpu::FakeInventory;
use kvfleet_agent::worker::protocol::{EngineSpec, WireEngine};
use kvfleet_controlplane::auth::Role;
use kvfleet_proto::BlockSize;
use kvfleet_proto::profile::PerfProfile;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use sqlx::Connection as _;
use tokio::time::Instant;

/// The mock workers' timing: prefill is the bottleneck (1 ms per prompt token), so a few tens
/// of short chat requests per second fill one worker.
const PREFILL_US_PER_TOKEN: u64 = 1_000;
const TOKEN_TIME_US: u32 = 2_000;
const KV_BLOCKS: u32 = 256;
const MAX_TOKENS: u64 = 4;
const GPUS_PER_AGENT: u32 = 2;

/// The performance profile of the agents' mock workers, from their own timing model.
fn profile() -> PerfProfile {
    let spec = EngineSpec {
        model: MODEL.into(),
        engine: WireEngine::Mock,
        path: None,
        kv_memory: None,
        context_length: 256,
        block_size: BlockSize::new(16).unwrap(),
        kv_blocks: KV_BLOCKS,
        vocab_size: 257,
        token_time_us: u64::from(TOKEN_TIME_US),
        prefill_time_per_token_us: PREFILL_US_PER_TOKEN,
        mock_kv_head_dim: 1,
        kv_tiers: Default::default(),
        external: None,
        fleet_hash_secret: None,
    };
    let mut mock = kvfleet_agent::worker::engine::profile(&spec);
    mock.kv_cache_bytes = u64::from(KV_BLOCKS) * mock.layout.block_bytes() as u64;
    let mut p = mock.perf_profile(&kvfleet_engine::SchedulerConfig::default());
    p.model = MODEL.into();
    p.device = "Fake GPU 80GB".into();
    p.source = "the e2e agents' mock workers (computed from their timing model)".into();
    p
}

/// Client load at a settable rate, spread over the frontends that serve the model (as a load
/// balancer's health check would pick them); every answer that is not a whole completion is a
/// failure, kept with its reason.
#[derive(Default)]
struct Load {
    /// The frontends to send to.
    targets: Mutex<Vec<SocketAddr>>,
    /// Requests per second × 1000; 0 pauses.
    millirate: AtomicU64,
    stop: AtomicBool,
    sent: AtomicU64,
    ok: AtomicU64,
    failures: Mutex<Vec<String>>,
}

impl Load {
    fn set_rate(&self, per_second: f64) {
        self.millirate
            .store((per_second * 1000.0) as u64, Ordering::Relaxed);
    }

    fn failed(&self) -> Vec<String> {
        self.failures.lock().unwrap().clone()
    }

    /// Keeps `targets` to the agents with a ready worker of the model (a node serves a model
    /// while it runs a worker of it; one whose worker drains leaves the rotation at once).
    async fn track(self: Arc<Self>, agents: Vec<(SocketAddr, kvfleet_agent::Running)>) {
        use kvfleet_agent::backend::{Backend as _, WorkerState};
        while !self.stop.load(Ordering::Relaxed) {
            let serving: Vec<SocketAddr> = agents
                .iter()
                .filter(|(_, r)| {
                    r.models.names().iter().any(|m| m == MODEL)
                        && r.pool
                            .workers()
                            .iter()
                            .any(|w| w.state == WorkerState::Ready)
                })
                .map(|(addr, _)| *addr)
                .collect();
            *self.targets.lock().unwrap() = serving;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn drive(self: Arc<Self>) {
        let client = reqwest::Client::new();
        let mut inflight = tokio::task::JoinSet::new();
        let mut next = Instant::now();
        let mut i = 0u64;
        while !self.stop.load(Ordering::Relaxed) {
            let rate = self.millirate.load(Ordering::Relaxed);
            if rate == 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
                next = Instant::now();
                continue;
            }
            next += Duration::from_micros(1_000_000_000 / rate);
            tokio::time::sleep_until(next).await;
            while inflight.try_join_next().is_some() {}
            let targets = self.targets.lock().unwrap().clone();
            if targets.is_empty() {
                continue;
            }
            let addr = targets[(i % targets.len() as u64) as usize];
            i += 1;
            let (client, load) = (client.clone(), Arc::clone(&self));
            load.sent.fetch_add(1, Ordering::Relaxed);
            inflight.spawn(async move {
                match chat(
                    &client,
                    addr,
                    &format!("request {i}: tell me about planners"),
                )
                .await
                {
                    Ok(_) => {
                        load.ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(why) => load.failures.lock().unwrap().push(why),
                }
            });
        }
        while inflight.join_next().await.is_some() {}
    }
}

/// One chat completion; its `usage` (prompt and completion tokens), or why it failed.
async fn chat(
    client: &reqwest::Client,
    addr: SocketAddr,
    content: &str,
) -> Result<(u64, u64), String> {
    let response = client
        .post(format!("http://{addr}/v1/chat/completions"))
        .json(
            &json!({"model": MODEL, "messages": [{"role": "user", "content": content}],
                      "max_tokens": MAX_TOKENS}),
        )
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .map_err(|e| format!("{addr}: {e}"))?;
    let status = response.status();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    let usage = &body["usage"];
    match (
        status,
        usage["prompt_tokens"].as_u64(),
        usage["completion_tokens"].as_u64(),
    ) {
        (StatusCode::OK, Some(prompt), Some(completion)) if completion == MAX_TOKENS => {
            Ok((prompt, completion))
        }
        _ => Err(format!("{addr}: {status} {body}")),
    }
}

/// Whether the replica at `cp` says it leads.
async fn leads(cp: &ControlPlane) -> bool {
    let (_, body) = api(Method::GET, &cp.url("/status"), "", None).await;
    body["leader"] == true
}

/// The deployment's workers the control plane wants running.
async fn desired_running(cp: &ControlPlane, token: &str, deployment: &str) -> usize {
    let (_, body) = api(
        Method::GET,
        &cp.url(&format!("/workers?deployment_id={deployment}")),
        token,
        None,
    )
    .await;
    body["items"].as_array().map_or(0, |w| {
        w.iter().filter(|w| w["desired_state"] == "running").count()
    })
}

/// The planner's decisions that changed something, newest first.
async fn changes(cp: &ControlPlane, token: &str) -> Vec<Value> {
    let (status, body) = api(
        Method::GET,
        &cp.url("/planner/decisions?deployment=chat&changes_only=true"),
        token,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["items"].as_array().cloned().unwrap_or_default()
}

fn describe(d: &Value) -> String {
    format!(
        "#{} {} {}→{} applied={} by {}: {}",
        d["id"],
        d["action"].as_str().unwrap_or("?"),
        d["current"]["aggregated"],
        d["targets"]["aggregated"],
        d["applied"],
        d["decided_by"].as_str().unwrap_or("?"),
        d["reason"].as_str().unwrap_or("?")
    )
}

/// The newest decision row's id, any decision.
async fn last_decision(db: &TestDb) -> i64 {
    let mut conn = sqlx::PgConnection::connect(&db.url).await.unwrap();
    sqlx::query_scalar("SELECT COALESCE(max(id), 0) FROM planner_decisions")
        .fetch_one(&mut conn)
        .await
        .unwrap()
}

/// The sums of every heartbeat window stored for the deployment:
/// (requests, prompt tokens, finished, output tokens, TTFTs, ITLs).
async fn window_sums(db: &TestDb, deployment: &str) -> (u64, u64, u64, u64, u64, u64) {
    let mut conn = sqlx::PgConnection::connect(&db.url).await.unwrap();
    let wins: Vec<Value> =
        sqlx::query_scalar("SELECT win FROM worker_windows WHERE deployment_id = $1::uuid")
            .bind(deployment)
            .fetch_all(&mut conn)
            .await
            .unwrap();
    let mut sums = (0, 0, 0, 0, 0, 0);
    let count = |h: &Value| -> u64 {
        h["counts"]
            .as_array()
            .map_or(0, |c| c.iter().filter_map(Value::as_u64).sum())
    };
    for w in &wins {
        let n = |f: &str| w[f].as_u64().unwrap_or(0);
        sums.0 += n("requests");
        sums.1 += n("prompt_tokens");
        sums.2 += n("finished");
        sums.3 += n("output_tokens");
        sums.4 += count(&w["ttft"]);
        sums.5 += count(&w["itl"]);
    }
    sums
}

/// `kvfleet decisions --changes --json` against `cp`, when the CLI is built beside this test.
async fn cli_decisions(cp: &ControlPlane, token: &str) -> Option<Vec<Value>> {
    let exe = std::env::current_exe().ok()?;
    let cli = exe.parent()?.parent()?.join("kvfleet");
    if !cli.exists() {
        println!(
            "SKIPPED (CLI part): {} is not built (cargo build -p kvfleet)",
            cli.display()
        );
        return None;
    }
    let out = tokio::process::Command::new(&cli)
        .args(["decisions", "-d", "chat", "--changes", "--json"])
        .env("KVFLEET_URL", cp.base())
        .env("KVFLEET_TOKEN", token)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "kvfleet decisions: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(serde_json::from_slice(&out.stdout).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_planner_sizes_a_real_fleet_to_its_load_and_survives_its_leader() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let begin = Instant::now();
    let planner = |c: &mut kvfleet_controlplane::Config| {
        c.planner.interval = Duration::from_millis(1000);
        c.planner.cooldown = Duration::from_secs(4);
        c.planner.lookahead = 1;
    };
    let lost_after = Duration::from_secs(120);
    // The first replica leads; the agents talk to the second, which survives.
    let first =
        ControlPlane::start_with(&db, "127.0.0.1:0".parse().unwrap(), lost_after, planner).await;
    wait_for("the first replica to lead", Duration::from_secs(10), || {
        leads(&first)
    })
    .await;
    let second =
        ControlPlane::start_with(&db, "127.0.0.1:0".parse().unwrap(), lost_after, planner).await;
    assert!(!leads(&second).await, "one leader at a time");
    let admin = token(&db, Role::Admin).await;
    let join = token(&db, Role::Join).await;
    let setup = AgentSetup {
        mock_token_time_us: TOKEN_TIME_US,
        peer_on_loopback: true,
    };
    let mut agents = Vec::new();
    for name in ["plan-a", "plan-b"] {
        let toml = Agent::config(name, &second, &join, &temp_dir(name), setup).replace(
            "mock_token_time_us =",
            &format!(
                "mock_prefill_time_per_token_us = {PREFILL_US_PER_TOKEN}\nmock_token_time_us ="
            ),
        );
        let gpus = Arc::new(FakeInventory::gpus(GPUS_PER_AGENT));
        agents.push(Agent::launch_with_gpus(name, toml, gpus).await);
    }
    wait_nodes_healthy(&second, &admin, &["plan-a", "plan-b"]).await;
    let (status, body) = api(
        Method::POST,
        &second.url("/models"),
        &admin,
        Some(
            json!({"name": MODEL, "format": "mock", "path": "mock", "block_size": 16,
                    "context_length": 256}),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, body) = api(
        Method::POST,
        &second.url(&format!("/models/{MODEL}/profiles")),
        &admin,
        Some(serde_json::to_value(profile()).unwrap()),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, body) = api(
        Method::POST,
        &second.url("/deployments"),
        &admin,
        Some(json!({"name": "chat", "model": MODEL, "min_workers": 1,
                    "max_workers": 2 * GPUS_PER_AGENT, "planner": "auto",
                    "sla": {"ttft_ms": 300, "itl_ms": 50}})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let deployment = body["id"].as_str().unwrap().to_owned();
    let ready = |agents: &[Agent]| agents.iter().map(Agent::ready_workers).sum::<usize>();
    let running = |agents: &[Agent]| agents.iter().map(Agent::workers).sum::<usize>();
    let fleet = &agents;
    wait_for("one ready worker", Duration::from_secs(30), || async move {
        ready(fleet) == 1
    })
    .await;
    println!(
        "setup: 2 replicas, 2 agents × {GPUS_PER_AGENT} fake GPUs, 1 worker ready after {:.1}s",
        begin.elapsed().as_secs_f64()
    );

    // 1. Windows: what the worker served arrives in the heartbeat windows, exactly once.
    let client = reqwest::Client::new();
    let client = &client;
    // The node running the worker serves the model (the other learns it with a worker of it).
    let entry = agents
        .iter()
        .find(|a| a.ready_workers() == 1)
        .map(|a| a.addr)
        .unwrap();
    let mut served = Vec::new();
    let probes = futures_util::future::join_all((0..10).map(|i| {
        let addr = entry;
        async move { chat(client, addr, &format!("window probe {i}")).await }
    }))
    .await;
    served.extend(probes.into_iter().map(|r| r.unwrap()));
    let n = served.len() as u64;
    let prompt: u64 = served.iter().map(|u| u.0).sum();
    let output: u64 = served.iter().map(|u| u.1).sum();
    let expected = (n, prompt, n, output, n, output - n);
    let t = Instant::now();
    let db_ref = &db;
    let dep = deployment.as_str();
    wait_for(
        "the served requests in the heartbeat windows",
        Duration::from_secs(10),
        || async move { window_sums(db_ref, dep).await == expected },
    )
    .await;
    let arrived = t.elapsed();
    // Several more heartbeats: nothing is counted twice.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(window_sums(&db, &deployment).await, expected);
    println!(
        "windows: {n} requests ({prompt} prompt, {output} output tokens, {n} TTFTs, {} ITLs) \
         stored {:.2}s after the last answer, and still exactly that 1s later",
        output - n,
        arrived.as_secs_f64()
    );

    // 2. Ramp: the planner adds workers.
    let load = Arc::new(Load::default());
    let tracker = tokio::spawn(
        Arc::clone(&load).track(agents.iter().map(|a| (a.addr, a.running.clone())).collect()),
    );
    let driver = tokio::spawn(Arc::clone(&load).drive());
    let ramp_start = Instant::now();
    let mut up = None;
    for rate in [5.0, 15.0, 30.0, 45.0] {
        load.set_rate(rate);
        let step = Instant::now();
        while step.elapsed() < Duration::from_secs(4) {
            if let Some(d) = changes(&second, &admin)
                .await
                .into_iter()
                .find(|d| d["action"] == "scale_up" && d["applied"] == true)
            {
                println!(
                    "ramp: at {rate} req/s, {:.1}s into the ramp: {}",
                    ramp_start.elapsed().as_secs_f64(),
                    describe(&d)
                );
                up = Some(d);
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        if up.is_some() {
            break;
        }
        println!("ramp: {rate} req/s held 4s, no scale-up yet");
    }
    let up = up.expect("the load ramp makes the planner scale up");
    assert!(up["targets"]["aggregated"].as_i64().unwrap() > 1, "{up}");
    assert!(
        up["detail"]["inputs"]["rate"].as_f64().unwrap() > 1.0,
        "{up}"
    );

    // 3. Leader kill, mid-ramp: the other replica takes the loop over within seconds.
    let before = last_decision(&db).await;
    let killed = Instant::now();
    first.kill().await;
    let second_ref = &second;
    wait_for(
        "the second replica to lead",
        Duration::from_secs(10),
        || leads(second_ref),
    )
    .await;
    let leading_after = killed.elapsed();
    let mut next = None;
    while killed.elapsed() < Duration::from_secs(15) && next.is_none() {
        let mut conn = sqlx::PgConnection::connect(&db.url).await.unwrap();
        next = sqlx::query_as::<_, (i64, String)>(
            "SELECT id, action FROM planner_decisions WHERE id > $1 ORDER BY id LIMIT 1",
        )
        .bind(before)
        .fetch_optional(&mut conn)
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (next_id, next_action) = next.expect("the new leader plans within 15 s");
    let handover = killed.elapsed();
    println!(
        "leader kill: the second replica led {:.2}s after the kill; its first decision \
         (#{next_id}, {next_action}) {:.2}s after",
        leading_after.as_secs_f64(),
        handover.as_secs_f64()
    );
    assert!(handover < Duration::from_secs(10), "{handover:?}");
    // The workers the planner asked for run on the agents.
    let fleet = &agents;
    wait_for(
        "more than one ready worker",
        Duration::from_secs(30),
        || async move { ready(fleet) > 1 },
    )
    .await;
    let peak_desired = desired_running(&second, &admin, &deployment).await;
    println!(
        "ramp: {} workers ready on the agents ({} desired), {} requests sent so far",
        ready(&agents),
        peak_desired,
        load.sent.load(Ordering::Relaxed)
    );
    if let Some(cli) = cli_decisions(&second, &admin).await {
        assert!(
            cli.iter()
                .any(|d| d["id"] == up["id"] && d["action"] == "scale_up"),
            "kvfleet decisions shows the scale-up: {cli:?}"
        );
        println!(
            "cli: `kvfleet decisions -d chat --changes` lists {} changes",
            cli.len()
        );
    }

    // 4. Scale-down: a trickle of load; after the cooldown the extra workers drain and stop,
    // and no request fails.
    load.set_rate(2.0);
    let dropped = Instant::now();
    let fleet = &agents;
    let second_ref = &second;
    let admin_ref = admin.as_str();
    let dep = deployment.as_str();
    wait_for(
        "the planner to scale back to one worker",
        Duration::from_secs(40),
        || async move {
            desired_running(second_ref, admin_ref, dep).await == 1 && running(fleet) == 1
        },
    )
    .await;
    let down = changes(&second, &admin)
        .await
        .into_iter()
        .find(|d| d["action"] == "scale_down" && d["applied"] == true)
        .expect("a scale-down decision row");
    println!(
        "scale-down: {:.1}s after the load dropped one worker runs; {}",
        dropped.elapsed().as_secs_f64(),
        describe(&down)
    );
    // A trickle more through the single worker, then stop.
    tokio::time::sleep(Duration::from_secs(1)).await;
    load.stop.store(true, Ordering::Relaxed);
    driver.await.unwrap();
    tracker.await.unwrap();
    let mut conn = sqlx::PgConnection::connect(&db.url).await.unwrap();
    let drains: i64 =
        sqlx::query_scalar("SELECT count(*) FROM audit_log WHERE action = 'worker.drain'")
            .fetch_one(&mut conn)
            .await
            .unwrap();
    assert!(drains >= 1, "scale-down drains before it stops");
    let failed = load.failed();
    println!(
        "load: {} requests sent, {} completed, {} failed; {} drains; {:.1}s in all",
        load.sent.load(Ordering::Relaxed),
        load.ok.load(Ordering::Relaxed),
        failed.len(),
        drains,
        begin.elapsed().as_secs_f64()
    );
    assert!(failed.is_empty(), "failed requests: {failed:#?}");

    for agent in agents {
        agent.stop().await;
    }
    second.stop().await;
    db.drop_now().await;
}
