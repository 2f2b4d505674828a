//! The fleet end-to-end harness shared by the fleet tests (`fleet.rs`, `fleet_routing.rs`,
//! `faults.rs`, ...): a throwaway
//! database on the `DATABASE_URL` server, a control-plane replica (library `run`), agents in
//! control-plane mode (library `serve_with`, CPU only, mock workers), and the REST and OpenAI
//! calls the tests make.

#![allow(dead_code, unreachable_pub)]

pub mod load;
pub mod partition;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use kvfleet_agent::config::{Config as AgentConfig, Sources};
use kvfleet_agent::dbus::Bus;
use kvfleet_agent::gpu::{Inventory, NoGpus};
use kvfleet_agent::systemd::Notifier;
use kvfleet_agent::worker::WorkerCommand;
use kvfleet_agent::{Deps, Running};
use kvfleet_controlplane::auth::Role;
use kvfleet_proto::WorkerId;
use reqwest::StatusCode;
use serde_json::{Value, json};
use sqlx::Connection as _;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const MODEL: &str = "tiny-mock";

/// A database of its own on the `DATABASE_URL` server, dropped at the end.
pub struct TestDb {
    admin_url: String,
    name: String,
    pub url: String,
}

impl TestDb {
    pub async fn create() -> Option<Self> {
        let Ok(admin_url) = std::env::var("DATABASE_URL") else {
            println!(
                "SKIPPED: DATABASE_URL is not set (source scripts/lib/common.sh && ensure_test_postgres)"
            );
            return None;
        };
        Some(Self::create_on(admin_url).await)
    }

    /// A database of its own on the server `admin_url` names (a superuser's URL).
    pub async fn create_on(admin_url: String) -> Self {
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
        Self {
            admin_url,
            name,
            url,
        }
    }

    pub async fn drop_now(self) {
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
pub struct ControlPlane {
    pub addr: SocketAddr,
    /// Serving https (`[tls]` on): `base()` and `url()` say so.
    pub https: bool,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

/// The CA sealing key file of this test process's control planes (one per process: they share
/// one database).
pub fn ca_key_file() -> PathBuf {
    std::env::temp_dir().join(format!("kvfleet-test-{}-ca.key", std::process::id()))
}

/// The block hasher the fleet's agents use: keyed with the secret the control planes derive
/// from [`ca_key_file`] (the control plane's own derivation, not a copy of it). Call it once a
/// control plane has started (the first start creates the key file).
pub fn fleet_hasher() -> kvfleet_proto::hash::BlockHasher {
    let secret = kvfleet_controlplane::ca_key::fleet_hash_secret(&ca_key_file())
        .expect("the control plane's sealing key file (start a control plane first)");
    kvfleet_proto::hash::BlockHasher::keyed(secret.key())
}

/// [`kvfleet_proto::hash::sequence_hashes`] as the fleet computes them (keyed by
/// [`fleet_hasher`]).
pub fn fleet_sequence_hashes(tokens: &[u32]) -> Vec<kvfleet_proto::hash::SequenceHash> {
    fleet_hasher().sequence_hashes(
        tokens,
        kvfleet_proto::hash::BlockSize::new(16).expect("16 > 0"),
    )
}

impl ControlPlane {
    /// A replica on `addr` whose liveness calls a silent node unhealthy after half of
    /// `lost_after` and lost after `lost_after`.
    pub async fn start(db: &TestDb, addr: SocketAddr, lost_after: Duration) -> Self {
        Self::start_with(db, addr, lost_after, |_| {}).await
    }

    /// [`ControlPlane::start`] with `configure` applied last (the planner's interval, say).
    pub async fn start_with(
        db: &TestDb,
        addr: SocketAddr,
        lost_after: Duration,
        configure: impl FnOnce(&mut kvfleet_controlplane::Config),
    ) -> Self {
        log_to_file();
        let mut config = kvfleet_controlplane::Config::new(db.url.clone());
        config.database.max_connections = 8;
        config.leader.retry_interval = Duration::from_millis(200);
        config.placement.interval = Duration::from_millis(200);
        config.liveness.heartbeat_interval = Duration::from_millis(200);
        config.liveness.unhealthy_after = lost_after / 2;
        config.liveness.lost_after = lost_after;
        config.liveness.check_interval = Duration::from_millis(100);
        config.watch.max_wait = Duration::from_secs(2);
        // A first admin token made by bootstrap goes here, not into the host's state directory.
        config.auth.bootstrap_token_file = std::env::temp_dir().join(format!(
            "kvfleet-test-{}-{}-admin-token",
            std::process::id(),
            addr.port()
        ));
        // One CA sealing key per test process: its control planes share one database.
        config.ca.key_file = ca_key_file();
        // The fleet tests are about nodes in the fleet; the security suite turns this off to
        // show a join waiting for an admin.
        config.join.auto_approve = true;
        configure(&mut config);
        let https = config.tls != kvfleet_controlplane::config::TlsConfig::Off;
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
            https,
            stop: Some(stop),
            task: Some(task),
        };
        if https {
            // Its clients are the agents under test, which retry until it answers.
            return cp;
        }
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

    pub fn base(&self) -> String {
        let scheme = if self.https { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}/api/v1{path}", self.base())
    }

    /// Kills the replica as a crash would: its tasks are dropped mid-flight, its database
    /// connections close (Postgres frees the leader lock), its listener goes away.
    pub async fn kill(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }

    pub async fn stop(mut self) {
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
pub async fn token(db: &TestDb, role: Role) -> String {
    let mut conn = sqlx::PgConnection::connect(&db.url).await.unwrap();
    let mut tx = conn.begin().await.unwrap();
    let token = kvfleet_controlplane::create_token(&mut tx, &format!("e2e {role}"), role, None)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    token
}

/// One agent in control-plane mode (library `serve_with`), CPU only.
pub struct Agent {
    pub name: String,
    pub addr: SocketAddr,
    pub running: Running,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
    toml: String,
}

pub fn temp_dir(what: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "kvfleet-e2e-{what}-{}",
        uuid::Uuid::new_v4().simple()
    ))
}

/// What differs between the agents of different tests.
#[derive(Debug, Clone, Copy)]
pub struct AgentSetup {
    /// The mock engine's time per generated token.
    pub mock_token_time_us: u32,
    /// Bind the peer endpoint to a free loopback port (otherwise the default `0.0.0.0:7500`).
    pub peer_on_loopback: bool,
}

impl Agent {
    pub async fn start(
        name: &str,
        cp: &ControlPlane,
        join_token: &str,
        state_dir: &PathBuf,
        setup: AgentSetup,
    ) -> Self {
        Self::launch(name, Self::config(name, cp, join_token, state_dir, setup)).await
    }

    /// The configuration [`Agent::start`] runs with, for tests that change a line of it
    /// before [`Agent::launch`] (the `[peer]` table, when present, is its last).
    pub fn config(
        name: &str,
        cp: &ControlPlane,
        join_token: &str,
        state_dir: &PathBuf,
        setup: AgentSetup,
    ) -> String {
        let sockets = temp_dir("sockets");
        let peer = if setup.peer_on_loopback {
            "[peer]\nlisten = \"127.0.0.1:0\"\n"
        } else {
            ""
        };
        format!(
            "[node]\nname = \"{name}\"\n\
             [log]\nlevel = \"warn\"\n\
             [supervisor]\nsocket_dir = {sockets:?}\nrestart_backoff_initial_ms = 100\n\
             [[models]]\nname = \"{MODEL}\"\nengine = \"mock\"\ncontext_length = 256\n\
             block_size = 16\nkv_blocks = 256\nmock_token_time_us = {token_time}\n\
             [control_plane]\nurl = \"{}\"\njoin_token = \"{join_token}\"\nstate_dir = {state_dir:?}\n\
             watch_wait_secs = 2\nrequest_timeout_secs = 2\n\
             retry_backoff_initial_ms = 100\nretry_backoff_max_ms = 500\ncpu_slots = 1\n\
             {peer}",
            cp.base(),
            token_time = setup.mock_token_time_us,
        )
    }

    pub async fn launch(name: &str, toml: String) -> Self {
        Self::launch_with_gpus(name, toml, Arc::new(NoGpus)).await
    }

    /// [`Agent::launch`] on a node whose GPU inventory is `inventory` (a fake one in tests).
    pub async fn launch_with_gpus(name: &str, toml: String, inventory: Arc<dyn Inventory>) -> Self {
        log_to_file();
        let config = AgentConfig::from_sources(&Sources::from_text("e2e-agent.toml", &toml))
            .unwrap_or_else(|problems| panic!("agent config:\n{problems}"));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let deps = Deps {
            inventory,
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

    pub fn ready_workers(&self) -> usize {
        use kvfleet_agent::backend::{Backend as _, WorkerState};
        self.running
            .pool
            .workers()
            .iter()
            .filter(|w| w.state == WorkerState::Ready)
            .count()
    }

    pub fn workers(&self) -> usize {
        self.running.pool.running().len()
    }

    pub fn connected(&self) -> bool {
        self.running
            .fleet()
            .is_some_and(|f| f.control_plane.status().connected)
    }

    pub async fn stop(mut self) -> String {
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

/// With `RUST_LOG` set, everything this test process logs (its in-process agents and control
/// planes share one global subscriber) goes to `$KVFLEET_TEST_LOG_DIR/<test name>.log` (the
/// system's temp directory without it), which the test prints. Lines about a request carry its
/// `request_id`; a peer's lines name the asking node (`from`). Without `RUST_LOG`, nothing.
pub fn log_to_file() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let Ok(filter) = std::env::var("RUST_LOG") else {
            return;
        };
        let dir =
            std::env::var_os("KVFLEET_TEST_LOG_DIR").map_or_else(std::env::temp_dir, PathBuf::from);
        // nextest runs each test in a process of its own, on a thread named after it.
        let test = std::thread::current()
            .name()
            .unwrap_or("test")
            .replace("::", "-");
        let path = dir.join(format!("{test}-{}.log", std::process::id()));
        let file = std::fs::File::create(&path)
            .unwrap_or_else(|e| panic!("creating the log file {}: {e}", path.display()));
        let installed = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(&filter))
            .with_ansi(false)
            .with_writer(std::sync::Mutex::new(file))
            .try_init();
        if installed.is_ok() {
            println!("logging ({filter}) to {}", path.display());
        }
    });
}

/// Polls `check` every 100 ms until it holds; panics naming `what` after `limit`.
pub async fn wait_for<F, Fut>(what: &str, limit: Duration, mut check: F)
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

pub async fn api(
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
pub async fn complete(agent_addr: SocketAddr, content: &str) -> (StatusCode, Value) {
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

pub fn assert_completion(who: &str, (status, body): &(StatusCode, Value)) {
    assert_eq!(*status, StatusCode::OK, "{who}: {body}");
    assert_eq!(body["object"], "chat.completion", "{who}: {body}");
    assert_eq!(body["usage"]["completion_tokens"], 8, "{who}: {body}");
    assert!(
        body["choices"][0]["message"]["content"].is_string(),
        "{who}: {body}"
    );
}

/// Registers the model and applies a CPU deployment of `workers` workers; returns its id.
pub async fn deploy(cp: &ControlPlane, admin: &str, workers: usize) -> String {
    register_and_deploy(
        cp,
        admin,
        mock_model(),
        json!({"name": "tiny", "model": MODEL, "min_workers": workers, "max_workers": workers,
                "placement": {"allow_cpu": true}}),
    )
    .await
}

/// The mock model as `POST /models` registers it.
pub fn mock_model() -> Value {
    json!({"name": MODEL, "format": "mock", "path": "mock", "block_size": 16,
            "context_length": 256})
}

/// `POST /models` with `model`, then `POST /deployments` with `deployment`, each asserted
/// created; returns the deployment's id.
pub async fn register_and_deploy(
    cp: &ControlPlane,
    admin: &str,
    model: Value,
    deployment: Value,
) -> String {
    let (status, body) = api(
        reqwest::Method::POST,
        &cp.url("/models"),
        admin,
        Some(model),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, body) = api(
        reqwest::Method::POST,
        &cp.url("/deployments"),
        admin,
        Some(deployment),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    body["id"].as_str().unwrap().to_owned()
}

/// Both nodes registered and healthy at the control plane.
pub async fn wait_nodes_healthy(cp: &ControlPlane, admin: &str, names: &[&str]) {
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

/// The worker ids of `agent`'s pool.
pub fn worker_ids(agent: &Agent) -> Vec<WorkerId> {
    use kvfleet_agent::backend::Backend as _;
    agent.running.pool.workers().iter().map(|w| w.id).collect()
}

pub fn fleet(agent: &Agent) -> &kvfleet_agent::fleet::FleetRouter {
    agent
        .running
        .fleet()
        .map(|f| &*f.router)
        .expect("control-plane mode has a fleet router")
}

/// A control plane and three agents, each running one ready mock worker of a three-worker
/// deployment. `config` may edit agent `k`'s TOML before it starts.
pub struct ThreeNodes {
    pub db: TestDb,
    pub cp: ControlPlane,
    pub admin: String,
    pub agents: Vec<Agent>,
    pub dirs: Vec<PathBuf>,
    pub ids: Vec<WorkerId>,
}

impl ThreeNodes {
    pub async fn start(
        names: [&str; 3],
        lost_after: Duration,
        setup: AgentSetup,
        config: impl Fn(usize, String) -> String,
    ) -> Option<Self> {
        let deployment = json!({"name": "tiny", "model": MODEL, "min_workers": 3,
            "max_workers": 3, "placement": {"allow_cpu": true}});
        Self::start_deployed(names, lost_after, setup, config, deployment).await
    }

    /// [`ThreeNodes::start`] with `deployment` (of the mock model, three workers) applied.
    pub async fn start_deployed(
        names: [&str; 3],
        lost_after: Duration,
        setup: AgentSetup,
        config: impl Fn(usize, String) -> String,
        deployment: Value,
    ) -> Option<Self> {
        let db = TestDb::create().await?;
        Some(Self::start_on(db, names, lost_after, setup, config, deployment).await)
    }

    /// [`ThreeNodes::start_deployed`] on the database `db`.
    pub async fn start_on(
        db: TestDb,
        names: [&str; 3],
        lost_after: Duration,
        setup: AgentSetup,
        config: impl Fn(usize, String) -> String,
        deployment: Value,
    ) -> Self {
        let cp = ControlPlane::start(&db, "127.0.0.1:0".parse().unwrap(), lost_after).await;
        let admin = token(&db, Role::Admin).await;
        let join = token(&db, Role::Join).await;
        let dirs: Vec<PathBuf> = names.iter().map(|n| temp_dir(n)).collect();
        let mut agents = Vec::new();
        for (k, (name, dir)) in names.iter().zip(&dirs).enumerate() {
            let toml = config(k, Agent::config(name, &cp, &join, dir, setup));
            agents.push(Agent::launch(name, toml).await);
        }
        wait_nodes_healthy(&cp, &admin, &names).await;
        register_and_deploy(&cp, &admin, mock_model(), deployment).await;
        wait_for(
            "a ready worker on each agent",
            Duration::from_secs(60),
            || async { agents.iter().all(|a| a.ready_workers() == 1) },
        )
        .await;
        let ids = agents.iter().map(|a| worker_ids(a)[0]).collect();
        Self {
            db,
            cp,
            admin,
            agents,
            dirs,
            ids,
        }
    }

    pub async fn stop(self) {
        for agent in self.agents {
            agent.stop().await;
        }
        self.cp.stop().await;
        self.db.drop_now().await;
        for dir in self.dirs {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Waits until every agent's router knows the two other nodes' workers, ready, with their peer
/// addresses.
pub async fn wait_routers_know_everyone(agents: &[Agent]) {
    wait_for(
        "every router to know every worker and peer",
        Duration::from_secs(20),
        || async {
            agents.iter().all(|a| {
                let remote = fleet(a).remote_workers();
                remote.len() == 2 && remote.values().all(|w| w.ready && w.peer_addr.is_some())
            })
        },
    )
    .await;
}
