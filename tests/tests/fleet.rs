//! The fleet end to end: a real Postgres, a control plane and two agents on loopback.
//!
//! The agents join with a join token, a deployment applied through the REST API starts a
//! worker on each of them, completions come from either node's OpenAI frontend (raw HTTP and
//! the official `openai` Python SDK), deleting the deployment stops the workers. The second test
//! takes the control plane away: the agents keep serving (one even restarts and comes back
//! from its saved desired state), and when the control plane returns they reconnect and
//! reconcile to a change made through it.
//!
//! Needs `DATABASE_URL` (a server where the user may create databases; each test makes and
//! drops its own): `source scripts/lib/common.sh && ensure_test_postgres`. Without it the tests
//! print why and skip.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    unreachable_pub
)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use kvfleet_agent::config::{Config as AgentConfig, Sources};
use kvfleet_agent::dbus::Bus;
use kvfleet_agent::gpu::NoGpus;
use kvfleet_agent::systemd::Notifier;
use kvfleet_agent::worker::WorkerCommand;
use kvfleet_agent::{Deps, Running};
use kvfleet_controlplane::auth::Role;
use reqwest::StatusCode;
use serde_json::{Value, json};
use sqlx::Connection as _;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const MODEL: &str = "tiny-mock";

/// A database of its own on the `DATABASE_URL` server, dropped at the end.
struct TestDb {
    admin_url: String,
    name: String,
    url: String,
}

impl TestDb {
    async fn create() -> Option<Self> {
        let Ok(admin_url) = std::env::var("DATABASE_URL") else {
            println!(
                "SKIPPED: DATABASE_URL is not set (source scripts/lib/common.sh && ensure_test_postgres)"
            );
            return None;
        };
        let name = format!("kvfleet_e2e_{}", uuid::Uuid::new_v4().simple());
        let mut conn = sqlx::PgConnection::connect(&admin_url).await.unwrap();
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await
            .unwrap();
        let url = match admin_url.rsplit_once('/') {
            Some((server, _)) => format!("{server}/{name}"),
            None => panic!("DATABASE_URL has no database part: {admin_url}"),
        };
        Some(Self {
            admin_url,
            name,
            url,
        })
    }

    async fn drop_now(self) {
        if let Ok(mut conn) = sqlx::PgConnection::connect(&self.admin_url).await {
            let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            )))
            .execute(&mut conn)
            .await;
        }
    }
}

/// One control-plane replica (library `run`), on `addr` (port 0 the first time).
struct ControlPlane {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl ControlPlane {
    async fn start(db: &TestDb, addr: SocketAddr) -> Self {
        let mut config = kvfleet_controlplane::Config::new(db.url.clone());
        config.database.max_connections = 8;
        config.leader.retry_interval = Duration::from_millis(200);
        config.placement.interval = Duration::from_millis(200);
        config.liveness.heartbeat_interval = Duration::from_millis(200);
        config.liveness.unhealthy_after = Duration::from_secs(60);
        config.liveness.lost_after = Duration::from_secs(120);
        config.liveness.check_interval = Duration::from_millis(100);
        config.watch.max_wait = Duration::from_secs(2);
        // A restarted replica takes the port its agents know; it was just freed, so retry
        // briefly.
        let mut tries = 0;
        let listener = loop {
            match tokio::net::TcpListener::bind(addr).await {
                Ok(listener) => break listener,
                Err(e) if tries < 50 => {
                    tries += 1;
                    eprintln!("binding {addr}: {e}; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("binding {addr}: {e}"),
            }
        };
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(kvfleet_controlplane::run(config, listener, async move {
            let _ = stopped.await;
        }));
        let cp = Self {
            addr,
            stop: Some(stop),
            task: Some(task),
        };
        let client = reqwest::Client::new();
        wait_for(
            "the control plane to answer",
            Duration::from_secs(30),
            || {
                let client = client.clone();
                let url = cp.url("/status");
                async move {
                    client
                        .get(url)
                        .send()
                        .await
                        .is_ok_and(|r| r.status().is_success())
                }
            },
        )
        .await;
        cp
    }

    fn base(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}/api/v1{path}", self.addr)
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(30), task)
                .await
                .expect("the control plane stops within 30 s")
                .unwrap()
                .unwrap();
        }
    }
}

/// Creates a token directly in the database, as `kvfleet-controlplane token create` does.
async fn token(db: &TestDb, role: Role) -> String {
    let mut conn = sqlx::PgConnection::connect(&db.url).await.unwrap();
    let mut tx = conn.begin().await.unwrap();
    let token = kvfleet_controlplane::create_token(&mut tx, &format!("e2e {role}"), role, None)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    token
}

/// One agent in control-plane mode (library `serve_with`), CPU only.
struct Agent {
    name: String,
    addr: SocketAddr,
    running: Running,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
    toml: String,
}

fn temp_dir(what: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "kvfleet-e2e-{what}-{}",
        uuid::Uuid::new_v4().simple()
    ))
}

impl Agent {
    async fn start(name: &str, cp: &ControlPlane, join_token: &str, state_dir: &PathBuf) -> Self {
        let sockets = temp_dir("sockets");
        let toml = format!(
            "[node]\nname = \"{name}\"\n\
             [log]\nlevel = \"warn\"\n\
             [supervisor]\nsocket_dir = {sockets:?}\nrestart_backoff_initial_ms = 100\n\
             [[models]]\nname = \"{MODEL}\"\nengine = \"mock\"\ncontext_length = 256\n\
             block_size = 16\nkv_blocks = 256\n\
             [control_plane]\nurl = \"{}\"\njoin_token = \"{join_token}\"\nstate_dir = {state_dir:?}\n\
             watch_wait_secs = 2\nrequest_timeout_secs = 2\n\
             retry_backoff_initial_ms = 100\nretry_backoff_max_ms = 500\ncpu_slots = 1\n",
            cp.base()
        );
        Self::launch(name, toml).await
    }

    async fn launch(name: &str, toml: String) -> Self {
        let config = AgentConfig::from_sources(&Sources::from_text("e2e-agent.toml", &toml))
            .unwrap_or_else(|problems| panic!("agent config:\n{problems}"));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let deps = Deps {
            inventory: Arc::new(NoGpus),
            worker: WorkerCommand {
                program: env!("CARGO_BIN_EXE_kvfleet-e2e-agent").into(),
            },
            notifier: Notifier::default(),
            dbus: Bus::Off,
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let (started_tx, started_rx) = oneshot::channel();
        let task = tokio::spawn(kvfleet_agent::serve_with(
            config,
            listener,
            deps,
            async move {
                let _ = stopped.await;
            },
            move |running| {
                let _ = started_tx.send(running);
            },
        ));
        let running = started_rx.await.expect("the agent starts");
        Self {
            name: name.to_owned(),
            addr,
            running,
            stop: Some(stop),
            task: Some(task),
            toml,
        }
    }

    fn ready_workers(&self) -> usize {
        use kvfleet_agent::backend::{Backend as _, WorkerState};
        self.running
            .pool
            .workers()
            .iter()
            .filter(|w| w.state == WorkerState::Ready)
            .count()
    }

    fn workers(&self) -> usize {
        self.running.pool.running().len()
    }

    fn connected(&self) -> bool {
        self.running
            .control_plane
            .as_ref()
            .is_some_and(|h| h.status().connected)
    }

    async fn stop(mut self) -> String {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(60), task)
                .await
                .expect("the agent stops within 60 s")
                .unwrap()
                .unwrap();
        }
        self.toml.clone()
    }
}

/// Polls `check` every 100 ms until it holds; panics naming `what` after `limit`.
async fn wait_for<F, Fut>(what: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if check().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn api(
    method: reqwest::Method,
    url: &str,
    token: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut request = reqwest::Client::new()
        .request(method, url)
        .bearer_auth(token);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    let status = response.status();
    let body = response.json().await.unwrap_or(Value::Null);
    (status, body)
}

/// A chat completion from one agent's frontend: its status and body.
async fn complete(agent_addr: SocketAddr, content: &str) -> (StatusCode, Value) {
    let response = reqwest::Client::new()
        .post(format!("http://{agent_addr}/v1/chat/completions"))
        .json(&json!({
            "model": MODEL,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": 8,
        }))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .unwrap();
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

fn assert_completion(who: &str, (status, body): &(StatusCode, Value)) {
    assert_eq!(*status, StatusCode::OK, "{who}: {body}");
    assert_eq!(body["object"], "chat.completion", "{who}: {body}");
    assert_eq!(body["usage"]["completion_tokens"], 8, "{who}: {body}");
    assert!(
        body["choices"][0]["message"]["content"].is_string(),
        "{who}: {body}"
    );
}

/// Registers the model and applies a two-worker CPU deployment; returns its id.
async fn deploy(cp: &ControlPlane, admin: &str) -> String {
    let (status, body) = api(
        reqwest::Method::POST,
        &cp.url("/models"),
        admin,
        Some(
            json!({"name": MODEL, "format": "mock", "path": "mock", "block_size": 16,
                    "context_length": 256}),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, body) = api(
        reqwest::Method::POST,
        &cp.url("/deployments"),
        admin,
        Some(
            json!({"name": "tiny", "model": MODEL, "min_workers": 2, "max_workers": 2,
                    "placement": {"allow_cpu": true}}),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    body["id"].as_str().unwrap().to_owned()
}

/// Both nodes registered and healthy at the control plane.
async fn wait_nodes_healthy(cp: &ControlPlane, admin: &str, names: &[&str]) {
    wait_for("both nodes healthy", Duration::from_secs(30), || async {
        let (status, body) = api(reqwest::Method::GET, &cp.url("/nodes"), admin, None).await;
        status == StatusCode::OK
            && names.iter().all(|name| {
                body["items"].as_array().is_some_and(|nodes| {
                    nodes
                        .iter()
                        .any(|n| n["hostname"] == *name && n["state"] == "healthy")
                })
            })
    })
    .await;
}

/// Every worker of the deployment observed `ready` at the control plane (heartbeats flow).
async fn wait_observed_ready(cp: &ControlPlane, admin: &str, count: usize) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (_, body) = api(reqwest::Method::GET, &cp.url("/workers"), admin, None).await;
        let ready: Vec<Value> = body["items"]
            .as_array()
            .map(|w| {
                w.iter()
                    .filter(|w| w["desired_state"] == "running" && w["observed_state"] == "ready")
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        if ready.len() == count {
            return ready;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the control plane does not see {count} ready workers: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn python_openai() -> bool {
    let probe = std::process::Command::new("python3")
        .args(["-c", "import openai"])
        .output();
    if probe.is_ok_and(|o| o.status.success()) {
        true
    } else {
        println!("SKIPPED (SDK part): python3 with the `openai` package is not installed");
        false
    }
}

async fn openai_sdk(agent: &Agent) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk/fleet_openai.py");
    let output = tokio::process::Command::new("python3")
        .args([script, &format!("http://{}", agent.addr), MODEL])
        .output()
        .await
        .unwrap();
    assert!(
        output.status.success(),
        "openai SDK against {}: {}{}",
        agent.name,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_deployment_applied_through_the_api_runs_on_both_agents() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let cp = ControlPlane::start(&db, "127.0.0.1:0".parse().unwrap()).await;
    let admin = token(&db, Role::Admin).await;
    let join = token(&db, Role::Join).await;
    let (state_a, state_b) = (temp_dir("state-a"), temp_dir("state-b"));
    let a = Agent::start("e2e-node-a", &cp, &join, &state_a).await;
    let b = Agent::start("e2e-node-b", &cp, &join, &state_b).await;
    wait_nodes_healthy(&cp, &admin, &["e2e-node-a", "e2e-node-b"]).await;

    // Registered: the credential and certificate are kept privately in the state directory.
    for dir in [&state_a, &state_b] {
        use std::os::unix::fs::PermissionsExt as _;
        for file in ["node.json", "node.key", "node.crt", "ca.crt"] {
            let meta = std::fs::metadata(dir.join(file)).unwrap();
            assert_eq!(meta.permissions().mode() & 0o777, 0o600, "{file}");
        }
    }
    // No deployment yet: no workers, the model is unknown to the frontends.
    assert_eq!((a.workers(), b.workers()), (0, 0));
    assert_eq!(complete(a.addr, "hi").await.0, StatusCode::NOT_FOUND);

    let deployment = deploy(&cp, &admin).await;
    wait_for(
        "a ready worker on each agent",
        Duration::from_secs(60),
        || async { a.ready_workers() == 1 && b.ready_workers() == 1 },
    )
    .await;
    let workers = wait_observed_ready(&cp, &admin, 2).await;
    let nodes: std::collections::BTreeSet<&str> = workers
        .iter()
        .filter_map(|w| w["node_id"].as_str())
        .collect();
    assert_eq!(nodes.len(), 2, "spread over both nodes: {workers:?}");

    for (who, agent) in [("node a", &a), ("node b", &b)] {
        assert_completion(who, &complete(agent.addr, "hello fleet").await);
    }
    if python_openai() {
        openai_sdk(&a).await;
        openai_sdk(&b).await;
    }

    // The workers' KV events reach the control plane's index (the prompt fills several
    // 16-token blocks).
    let long = "a prompt long enough to fill a few KV blocks of sixteen tokens each ".repeat(2);
    for agent in [&a, &b] {
        assert_completion(&agent.name, &complete(agent.addr, &long).await);
    }
    wait_for(
        "KV blocks in the control plane's index",
        Duration::from_secs(30),
        || async {
            let (status, body) =
                api(reqwest::Method::GET, &cp.url("/kv/stats"), &admin, None).await;
            status == StatusCode::OK
                && body["workers"].as_u64() >= Some(2)
                && body["blocks"].as_u64() > Some(0)
        },
    )
    .await;

    // Heartbeat metrics reach the control plane (request rate, KV blocks) for the workers.
    let worker_id = workers[0]["id"].as_i64().unwrap();
    wait_for(
        "worker metrics at the control plane",
        Duration::from_secs(30),
        || async {
            let (status, body) = api(
                reqwest::Method::GET,
                &cp.url(&format!("/metrics/workers/{worker_id}?step_s=1")),
                &admin,
                None,
            )
            .await;
            status == StatusCode::OK
                && body["points"]
                    .as_array()
                    .is_some_and(|p| p.iter().any(|p| p["kv_blocks_total"].as_f64() > Some(0.0)))
        },
    )
    .await;

    let (status, body) = api(
        reqwest::Method::DELETE,
        &cp.url(&format!("/deployments/{deployment}")),
        &admin,
        None,
    )
    .await;
    assert!(status.is_success(), "{status} {body}");
    wait_for(
        "the workers to stop on both agents",
        Duration::from_secs(30),
        || async { a.workers() == 0 && b.workers() == 0 },
    )
    .await;
    // Then the model leaves the frontends (within a heartbeat): 404, not 503.
    wait_for(
        "the model to leave both frontends",
        Duration::from_secs(10),
        || async {
            complete(a.addr, "still there?").await.0 == StatusCode::NOT_FOUND
                && complete(b.addr, "still there?").await.0 == StatusCode::NOT_FOUND
        },
    )
    .await;

    a.stop().await;
    b.stop().await;
    cp.stop().await;
    db.drop_now().await;
    for dir in [state_a, state_b] {
        let _ = std::fs::remove_dir_all(dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn agents_keep_serving_without_the_control_plane_and_reconcile_when_it_returns() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let cp = ControlPlane::start(&db, "127.0.0.1:0".parse().unwrap()).await;
    let cp_addr = cp.addr;
    let admin = token(&db, Role::Admin).await;
    let join = token(&db, Role::Join).await;
    let (state_a, state_b) = (temp_dir("state-a"), temp_dir("state-b"));
    let a = Agent::start("e2e-out-a", &cp, &join, &state_a).await;
    let b = Agent::start("e2e-out-b", &cp, &join, &state_b).await;
    wait_nodes_healthy(&cp, &admin, &["e2e-out-a", "e2e-out-b"]).await;
    let deployment = deploy(&cp, &admin).await;
    wait_for(
        "a ready worker on each agent",
        Duration::from_secs(60),
        || async { a.ready_workers() == 1 && b.ready_workers() == 1 },
    )
    .await;
    wait_observed_ready(&cp, &admin, 2).await;
    let before: Vec<_> = [&a, &b].iter().map(|x| x.running.pool.running()).collect();

    // The control plane goes away.
    cp.stop().await;
    wait_for("both agents to notice", Duration::from_secs(30), || async {
        !a.connected() && !b.connected()
    })
    .await;
    // They keep serving, on the same workers, for a while.
    let outage = tokio::time::Instant::now();
    while outage.elapsed() < Duration::from_secs(3) {
        for (who, agent) in [("node a", &a), ("node b", &b)] {
            assert_completion(who, &complete(agent.addr, "during the outage").await);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Node a even restarts during the outage: it comes back on its saved desired state.
    let toml = a.stop().await;
    let a = Agent::launch("e2e-out-a", toml).await;
    wait_for(
        "node a's worker from the saved desired state",
        Duration::from_secs(60),
        || async { a.ready_workers() == 1 },
    )
    .await;
    assert_completion("node a after restart", &complete(a.addr, "back").await);
    assert!(!a.connected());
    let after: Vec<_> = [&a, &b].iter().map(|x| x.running.pool.running()).collect();
    assert_eq!(before, after, "the same workers, with the same ids, run");

    // The control plane returns (same address, same database): both reconnect...
    let cp = ControlPlane::start(&db, cp_addr).await;
    wait_for(
        "both agents to reconnect",
        Duration::from_secs(30),
        || async { a.connected() && b.connected() },
    )
    .await;
    wait_nodes_healthy(&cp, &admin, &["e2e-out-a", "e2e-out-b"]).await;
    // ... keep their workers (nothing changed) ...
    wait_observed_ready(&cp, &admin, 2).await;
    assert_eq!((a.workers(), b.workers()), (1, 1));
    // ... and follow what is decided now.
    let (status, body) = api(
        reqwest::Method::DELETE,
        &cp.url(&format!("/deployments/{deployment}")),
        &admin,
        None,
    )
    .await;
    assert!(status.is_success(), "{status} {body}");
    wait_for(
        "the workers to stop on both agents",
        Duration::from_secs(30),
        || async { a.workers() == 0 && b.workers() == 0 },
    )
    .await;

    a.stop().await;
    b.stop().await;
    cp.stop().await;
    db.drop_now().await;
    for dir in [state_a, state_b] {
        let _ = std::fs::remove_dir_all(dir);
    }
}
