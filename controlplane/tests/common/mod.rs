//! Shared by the integration tests: a control plane on 127.0.0.1:0 over the per-test database
//! that `#[sqlx::test]` creates, tokens for every role, and a small HTTP client.

#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Duration;

use kvfleet_controlplane::auth::Role;
use kvfleet_controlplane::{AppState, Config};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// One running control-plane replica.
pub struct Server {
    pub addr: SocketAddr,
    pub state: AppState,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl Server {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}/api/v1{path}", self.addr)
    }

    /// Stops the replica (graceful: its leader lock is released when its connection closes).
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(20), task)
                .await
                .expect("server stops within 20 s")
                .unwrap()
                .unwrap();
        }
    }
}

/// Config with short intervals so background behaviour shows within a test.
pub fn test_config() -> Config {
    let mut config = Config::new("postgres://unused");
    config.leader.retry_interval = Duration::from_millis(200);
    config.leader.lease = Duration::from_secs(3);
    // The authorization tests make hundreds of failed authentications from 127.0.0.1 on
    // purpose; the budget has a test of its own that sets it low.
    config.auth.failed_burst = 1_000_000;
    config.placement.interval = Duration::from_millis(200);
    config.liveness.heartbeat_interval = Duration::from_millis(200);
    // Long enough that a slow CI machine never sees a node go silent by accident; the liveness
    // test shortens them with `short_liveness`.
    config.liveness.unhealthy_after = Duration::from_secs(60);
    config.liveness.lost_after = Duration::from_secs(120);
    config.liveness.check_interval = Duration::from_millis(100);
    config.watch.max_wait = Duration::from_secs(5);
    // A first admin token made by bootstrap goes here, not into the host's state directory.
    config.auth.bootstrap_token_file = scratch_file("admin-token");
    // One CA sealing key per test process: the control planes of one test share a database.
    config.ca.key_file =
        std::env::temp_dir().join(format!("kvfleet-test-{}-ca.key", std::process::id()));
    // Most tests are about what a node does once in the fleet; the approval tests turn this
    // off (`approval_required`).
    config.join.auto_approve = true;
    config
}

/// A fresh path under the temporary directory (not created).
pub fn scratch_file(what: &str) -> std::path::PathBuf {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    std::env::temp_dir().join(format!("kvfleet-test-{}-{n}-{what}", std::process::id()))
}

/// Silence thresholds short enough to watch a node go unhealthy, then lost, in a test.
pub fn short_liveness(config: &mut Config) {
    config.liveness.unhealthy_after = Duration::from_millis(800);
    config.liveness.lost_after = Duration::from_millis(1600);
}

/// Starts a replica on its own pool over the test database.
pub async fn start(pool: &PgPool, config: Config) -> Server {
    let own_pool = PgPoolOptions::new()
        .max_connections(config.database.max_connections)
        .connect_with((*pool.connect_options()).clone())
        .await
        .unwrap();
    kvfleet_controlplane::store::migrate(&own_pool)
        .await
        .unwrap();
    let state = AppState::new(own_pool, config).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(kvfleet_controlplane::serve(
        state.clone(),
        listener,
        async move {
            let _ = stopped.await;
        },
    ));
    Server {
        addr,
        state,
        stop: Some(stop),
        task: Some(task),
    }
}

/// Creates a token of `role` directly in the database (as the CLI would).
pub async fn token(pool: &PgPool, role: Role) -> String {
    let mut tx = pool.begin().await.unwrap();
    let token = kvfleet_controlplane::create_token(&mut tx, &format!("test {role}"), role, None)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    token
}

pub struct Response {
    pub status: StatusCode,
    pub content_type: String,
    pub body: Value,
}

impl std::fmt::Debug for Response {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status, self.body)
    }
}

pub async fn call(
    method: Method,
    url: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> Response {
    let client = reqwest::Client::new();
    let mut request = client.request(method, url);
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    if let Some(body) = body {
        request = request.json(body);
    }
    let response = request.send().await.unwrap();
    let status = response.status();
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let bytes = response.bytes().await.unwrap();
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap_or(Value::Null)
    };
    Response {
        status,
        content_type,
        body,
    }
}

pub async fn get(server: &Server, path: &str, token: &str) -> Response {
    call(Method::GET, &server.url(path), Some(token), None).await
}

pub async fn post(server: &Server, path: &str, token: &str, body: Value) -> Response {
    call(Method::POST, &server.url(path), Some(token), Some(&body)).await
}

/// A registration body for a node with `gpus` 80 GB GPUs.
pub fn register_body(hostname: &str, gpus: usize) -> Value {
    let gpus: Vec<Value> = (0..gpus)
        .map(|i| {
            json!({
                "id": uuid::Uuid::new_v4(), "index": i, "name": "NVIDIA H100 80GB HBM3",
                "memory_total_bytes": 80_i64 << 30,
            })
        })
        .collect();
    json!({
        "hostname": hostname, "agent_version": "0.1.0", "peer_addr": "127.0.0.1:7500",
        "frontend_addr": "127.0.0.1:8000", "addresses": ["127.0.0.1"], "gpus": gpus,
    })
}

/// Registers a node with a join token; returns (node id, agent credential, response body).
pub async fn register(
    server: &Server,
    join: &str,
    hostname: &str,
    gpus: usize,
) -> (String, String, Value) {
    let response = post(
        server,
        "/agent/register",
        join,
        register_body(hostname, gpus),
    )
    .await;
    assert_eq!(response.status, StatusCode::OK, "{response:?}");
    let node = response.body["node_id"].as_str().unwrap().to_owned();
    let credential = response.body["credential"].as_str().unwrap().to_owned();
    (node, credential, response.body)
}

/// Polls `check` every 50 ms until it returns `Some`, or panics after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn audit_count(pool: &PgPool, action: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM audit_log WHERE action = $1")
        .bind(action)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// A model and a deployment of it; returns (model id, deployment id).
pub async fn model_and_deployment(
    server: &Server,
    operator: &str,
    name: &str,
    workers: i32,
) -> (String, String) {
    let model = post(
        server,
        "/models",
        operator,
        json!({ "name": format!("{name}-model"), "format": "mock", "path": "/models/mock" }),
    )
    .await;
    assert_eq!(model.status, StatusCode::CREATED, "{model:?}");
    let deployment = post(
        server,
        "/deployments",
        operator,
        json!({ "name": name, "model": format!("{name}-model"), "min_workers": workers, "max_workers": workers.max(1) }),
    )
    .await;
    assert_eq!(deployment.status, StatusCode::CREATED, "{deployment:?}");
    (
        model.body["id"].as_str().unwrap().to_owned(),
        deployment.body["id"].as_str().unwrap().to_owned(),
    )
}
