//! Fleet-wide KV routing end to end: a real Postgres, a control plane and three agents on
//! loopback, each with one mock worker.
//!
//! Every agent follows the control plane's KV stream into its fleet router: a prompt served on
//! one node shows up, as that worker's blocks, in every node's router (and its `/metrics`); an
//! agent that goes away has its worker's blocks leave the other routers within seconds.
//!
//! Needs `DATABASE_URL` (`source scripts/lib/common.sh && ensure_test_postgres`); without it
//! the test prints why and skips.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    unreachable_pub
)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use kvfleet_agent::config::{Config as AgentConfig, Sources};
use kvfleet_agent::dbus::Bus;
use kvfleet_agent::fleet::Target;
use kvfleet_agent::gpu::NoGpus;
use kvfleet_agent::systemd::Notifier;
use kvfleet_agent::worker::WorkerCommand;
use kvfleet_agent::{Deps, Running};
use kvfleet_controlplane::auth::Role;
use kvfleet_peer::{GenerateEvent, PeerConfig, PeerEndpoint, PeerIdentity};
use kvfleet_proto::hash::{BlockSize, sequence_hashes};
use kvfleet_proto::{NodeId, SamplingParams, Tier, WorkerId};
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
        config.liveness.unhealthy_after = Duration::from_secs(1);
        config.liveness.lost_after = Duration::from_secs(2);
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
             block_size = 16\nkv_blocks = 256\nmock_token_time_us = 10000\n\
             [control_plane]\nurl = \"{}\"\njoin_token = \"{join_token}\"\nstate_dir = {state_dir:?}\n\
             watch_wait_secs = 2\nrequest_timeout_secs = 2\n\
             retry_backoff_initial_ms = 100\nretry_backoff_max_ms = 500\ncpu_slots = 1\n\
             [peer]\nlisten = \"127.0.0.1:0\"\n",
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

/// Registers the model and applies a three-worker CPU deployment; returns its id.
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
            json!({"name": "tiny", "model": MODEL, "min_workers": 3, "max_workers": 3,
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

/// The worker ids of `agent`'s pool.
fn worker_ids(agent: &Agent) -> Vec<WorkerId> {
    use kvfleet_agent::backend::Backend as _;
    agent.running.pool.workers().iter().map(|w| w.id).collect()
}

fn fleet(agent: &Agent) -> &kvfleet_agent::fleet::FleetRouter {
    agent
        .running
        .fleet
        .as_deref()
        .expect("control-plane mode has a fleet router")
}

async fn metrics(agent: &Agent) -> String {
    reqwest::get(format!("http://{}/metrics", agent.addr))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// Node `agent`'s peer endpoint address and node id, once it is up.
async fn wait_peer(agent: &Agent) -> (SocketAddr, NodeId) {
    let mut found = None;
    wait_for(
        "the peer endpoint and node id",
        Duration::from_secs(20),
        || {
            let addr = agent.running.peer.as_ref().and_then(|p| p.local_addr());
            let node = agent
                .running
                .control_plane
                .as_ref()
                .and_then(|h| h.status().node_id);
            if let (Some(addr), Some(node)) = (addr, node) {
                found = Some((addr, NodeId(node)));
            }
            let ok = found.is_some();
            async move { ok }
        },
    )
    .await;
    found.unwrap()
}

fn outstanding(agent: &Agent) -> usize {
    use kvfleet_agent::backend::Backend as _;
    agent
        .running
        .pool
        .workers()
        .iter()
        .map(|w| w.outstanding)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_agent_follows_the_fleet_kv_index_and_a_lost_node_leaves_it() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let cp = ControlPlane::start(&db, "127.0.0.1:0".parse().unwrap()).await;
    let admin = token(&db, Role::Admin).await;
    let join = token(&db, Role::Join).await;
    let names = ["kvr-node-a", "kvr-node-b", "kvr-node-c"];
    let dirs: Vec<PathBuf> = names.iter().map(|n| temp_dir(n)).collect();
    let mut agents = Vec::new();
    for (name, dir) in names.iter().zip(&dirs) {
        agents.push(Agent::start(name, &cp, &join, dir).await);
    }
    wait_nodes_healthy(&cp, &admin, &names).await;
    deploy(&cp, &admin).await;
    wait_for(
        "a ready worker on each agent",
        Duration::from_secs(60),
        || async { agents.iter().all(|a| a.ready_workers() == 1) },
    )
    .await;
    let ids: Vec<WorkerId> = agents.iter().map(|a| worker_ids(a)[0]).collect();

    // A long prompt served on node a: its worker's blocks reach every node's router.
    let long = "a prompt long enough to fill a few KV blocks of sixteen tokens each ".repeat(2);
    assert_completion("node a", &complete(agents[0].addr, &long).await);
    wait_for(
        "node a's blocks in every fleet router",
        Duration::from_secs(20),
        || async {
            agents
                .iter()
                .all(|a| fleet(a).worker_blocks(ids[0]).is_some_and(|b| b > 0))
        },
    )
    .await;
    // Every router knows all three workers (local ones from the pool, remote ones from the
    // stream once they have events: serve one prompt on each of the others).
    for (k, agent) in agents.iter().enumerate().skip(1) {
        let prompt = format!("node {k} says: {long}");
        assert_completion(&agent.name, &complete(agent.addr, &prompt).await);
    }
    wait_for(
        "every worker in every fleet router",
        Duration::from_secs(20),
        || async {
            agents.iter().all(|a| {
                ids.iter()
                    .all(|id| fleet(a).worker_blocks(*id).is_some_and(|b| b > 0))
            })
        },
    )
    .await;
    for agent in &agents {
        let text = metrics(agent).await;
        assert!(
            text.contains("kvfleet_fleet_router_workers 3"),
            "{}: {text}",
            agent.name
        );
        assert!(
            text.contains(&format!(
                "kvfleet_fleet_router_worker_blocks{{worker=\"{}\"}}",
                ids[0]
            )),
            "{}: {text}",
            agent.name
        );
        assert!(fleet(agent).follower_counters().snapshots >= 1);
    }

    // Node b forwards a request to node a's peer endpoint with its own node certificate: node
    // a's worker generates it, the tokens come back over QUIC.
    let (a_peer, a_node) = wait_peer(&agents[0]).await;
    let b_identity = PeerIdentity {
        ca_pem: std::fs::read_to_string(dirs[1].join("ca.crt")).unwrap(),
        cert_pem: std::fs::read_to_string(dirs[1].join("node.crt")).unwrap(),
        key_pem: std::fs::read_to_string(dirs[1].join("node.key")).unwrap(),
    };
    let forwarded_hashes =
        sequence_hashes(&(1..60).collect::<Vec<u32>>(), BlockSize::new(16).unwrap());
    let client =
        PeerEndpoint::bind(PeerConfig::new("127.0.0.1:0".parse().unwrap(), b_identity)).unwrap();
    let connection = client.connection(a_peer, a_node).await.unwrap();
    let request = kvfleet_peer::GenerateRequest {
        request_id: "fwd-1".into(),
        model: MODEL.into(),
        worker: None,
        prompt: (1..60).collect(),
        block_hashes: forwarded_hashes.clone(),
        sampling: SamplingParams::greedy(8),
    };
    let mut stream = connection.generate(&request).await.unwrap();
    let mut tokens = 0;
    let finish = loop {
        match stream.next().await.unwrap() {
            Some(GenerateEvent::Tokens(chunk)) => tokens += chunk.tokens.len(),
            Some(GenerateEvent::Finished(finish)) => break finish,
            None => panic!("the stream ended without a finish"),
        }
    };
    assert_eq!(tokens, 8);
    assert_eq!(finish.usage.completion_tokens, 8);
    assert_eq!(finish.usage.prompt_tokens, 59);
    wait_for(
        "the forwarded prompt's blocks on node a's worker, in node b's router",
        Duration::from_secs(10),
        || async {
            fleet(&agents[1]).with_router(|r| {
                forwarded_hashes
                    .iter()
                    .all(|h| r.holds(ids[0], *h, Tier::G1))
            })
        },
    )
    .await;
    // Node c's router, fed by the directory (peer addresses from heartbeats) and the stream,
    // sends that prefix to node a's worker, over the peer endpoint.
    wait_for(
        "peer addresses in the directory",
        Duration::from_secs(10),
        || async {
            agents.iter().all(|a| {
                let remote = fleet(a).remote_workers();
                remote.len() == 2 && remote.values().all(|w| w.ready && w.peer_addr.is_some())
            })
        },
    )
    .await;
    let (decision, target) = fleet(&agents[2])
        .select(MODEL, &forwarded_hashes, 59)
        .expect("a worker for the model");
    fleet(&agents[2]).finished(decision.request);
    assert_eq!(decision.worker, ids[0]);
    assert_eq!(decision.overlap_blocks, 3);
    assert_eq!(
        target,
        Target::Remote {
            node: a_node,
            addr: a_peer
        }
    );

    // A forwarded request cancelled mid-way frees node a's worker.
    let mut long = request.clone();
    long.request_id = "fwd-2".into();
    // 190 tokens at 10 ms each: about 2 s if it ran to the end.
    long.sampling = SamplingParams::greedy(190);
    let mut stream = connection.generate(&long).await.unwrap();
    let _ = stream.next().await.unwrap();
    assert_eq!(outstanding(&agents[0]), 1, "generating on node a");
    stream.cancel("client went away").await;
    wait_for(
        "node a's worker to drop the cancelled request",
        Duration::from_millis(1000),
        || async { outstanding(&agents[0]) == 0 },
    )
    .await;
    client.close().await;

    // Node a goes away: its worker leaves the other routers within seconds (node lost after
    // 2 s here, the control plane's sweep, the stream).
    let a = agents.remove(0);
    let gone = ids[0];
    a.stop().await;
    let started = std::time::Instant::now();
    wait_for(
        "node a's worker to leave the other routers",
        Duration::from_secs(15),
        || async {
            agents
                .iter()
                .all(|a| fleet(a).worker_blocks(gone).is_none())
        },
    )
    .await;
    println!(
        "node a's worker left the other routers {:.1} s after it stopped",
        started.elapsed().as_secs_f64()
    );
    // The others keep serving.
    for agent in &agents {
        assert_completion(&agent.name, &complete(agent.addr, "still serving").await);
    }

    for agent in agents {
        agent.stop().await;
    }
    cp.stop().await;
    db.drop_now().await;
    for dir in dirs {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// `name{label}` counters summed from one `/metrics` text, keyed by the label's value.
fn counters(text: &str, name: &str, label: &str) -> std::collections::BTreeMap<String, u64> {
    let prefix = format!("{name}{{{label}=\"");
    let mut out = std::collections::BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix(&prefix)
            && let Some((key, value)) = rest.split_once("\"} ")
        {
            *out.entry(key.to_owned()).or_default() += value.trim().parse::<u64>().unwrap();
        }
    }
    out
}

/// The prefix-cache hit tokens of an agent's workers, summed, from its `/metrics`.
async fn prefix_hit_tokens(agent: &Agent) -> u64 {
    let text = metrics(agent).await;
    counters(&text, "kvfleet_worker_prefix_hit_tokens_total", "worker")
        .values()
        .sum()
}

async fn route_counts(agents: &[Agent]) -> (Vec<BTreeMap<String, u64>>, BTreeMap<String, u64>) {
    let mut per_agent = Vec::new();
    let mut per_worker = BTreeMap::new();
    for agent in agents {
        let text = metrics(agent).await;
        per_agent.push(counters(&text, "kvfleet_fleet_route_total", "target"));
        for (worker, n) in counters(&text, "kvfleet_fleet_route_worker_total", "worker") {
            *per_worker.entry(worker).or_default() += n;
        }
    }
    (per_agent, per_worker)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_go_to_the_prefix_holder_from_any_frontend_and_spread_otherwise() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let cp = ControlPlane::start(&db, "127.0.0.1:0".parse().unwrap()).await;
    let admin = token(&db, Role::Admin).await;
    let join = token(&db, Role::Join).await;
    let names = ["kvf-node-a", "kvf-node-b", "kvf-node-c"];
    let dirs: Vec<PathBuf> = names.iter().map(|n| temp_dir(n)).collect();
    let mut agents = Vec::new();
    for (name, dir) in names.iter().zip(&dirs) {
        agents.push(Agent::start(name, &cp, &join, dir).await);
    }
    wait_nodes_healthy(&cp, &admin, &names).await;
    deploy(&cp, &admin).await;
    wait_for(
        "a ready worker on each agent",
        Duration::from_secs(60),
        || async { agents.iter().all(|a| a.ready_workers() == 1) },
    )
    .await;
    let ids: Vec<WorkerId> = agents.iter().map(|a| worker_ids(a)[0]).collect();
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

    // A long prefix, first served wherever node a's router sends it; every router learns
    // which worker holds it.
    let prefix = "You are a careful assistant for the kvfleet project. Answer briefly. ".repeat(2);
    assert_completion("node a", &complete(agents[0].addr, &prefix).await);
    let holds = |a: &Agent| -> Option<usize> {
        ids.iter()
            .position(|id| fleet(a).worker_blocks(*id).is_some_and(|b| b >= 5))
    };
    wait_for(
        "the prefix blocks in every router",
        Duration::from_secs(20),
        || async {
            let seen: Vec<Option<usize>> = agents.iter().map(&holds).collect();
            seen[0].is_some() && seen.iter().all(|s| *s == seen[0])
        },
    )
    .await;
    let h = holds(&agents[0]).unwrap();
    println!("the prefix is held by {}'s worker", agents[h].name);
    let (before, _) = route_counts(&agents).await;
    let mut hits_before = Vec::new();
    for agent in &agents {
        hits_before.push(prefix_hit_tokens(agent).await);
    }
    // The same prefix with different questions, entering every frontend: all go to the
    // holder's worker (the other nodes forward them), and all succeed.
    for round in 0..2 {
        for (k, agent) in agents.iter().enumerate() {
            let prompt = format!("{prefix}Question {round}-{k}?");
            assert_completion(&agent.name, &complete(agent.addr, &prompt).await);
        }
    }
    let (after, _) = route_counts(&agents).await;
    let delta = |k: usize, target: &str| {
        after[k].get(target).copied().unwrap_or(0) - before[k].get(target).copied().unwrap_or(0)
    };
    println!("prefix picks: {after:?} (before {before:?})");
    for (k, agent) in agents.iter().enumerate() {
        if k == h {
            assert_eq!(delta(k, "local"), 2, "the holder's node serves its own");
            assert_eq!(delta(k, "remote"), 0);
        } else {
            assert_eq!(
                delta(k, "remote"),
                2,
                "{} forwards to the holder",
                agent.name
            );
            assert_eq!(delta(k, "local"), 0);
        }
        assert_eq!(delta(k, "fallback_local"), 0);
    }
    // The workers' own prefix-cache counters agree: the holder's worker found the prefix in
    // its cache for all six requests (at least 4 blocks of 16 tokens each); the others were
    // asked nothing.
    wait_for(
        "the holder's worker to report its prefix-cache hits",
        Duration::from_secs(10),
        || async { prefix_hit_tokens(&agents[h]).await >= hits_before[h] + 6 * 4 * 16 },
    )
    .await;
    for (k, agent) in agents.iter().enumerate() {
        if k != h {
            assert_eq!(
                prefix_hit_tokens(agent).await,
                hits_before[k],
                "{}'s worker served none of the prefix requests",
                agent.name
            );
        }
    }

    // A streamed request with the prefix enters a non-holder's frontend and is forwarded; the
    // client goes away after the first chunk: the holder's worker stops generating at once
    // (80 tokens at 10 ms would take 0.8 s).
    let entry = &agents[(h + 1) % 3];
    let mut response = reqwest::Client::new()
        .post(format!("http://{}/v1/chat/completions", entry.addr))
        .json(&json!({
            "model": MODEL,
            "messages": [{"role": "user", "content": format!("{prefix}Stream?")}],
            "max_tokens": 80,
            "stream": true,
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let first = response.chunk().await.unwrap();
    assert!(first.is_some_and(|c| !c.is_empty()));
    // The first chunk may be the frontend's role chunk, sent before the peer answers.
    wait_for(
        "the forwarded request generating on the holder",
        Duration::from_millis(500),
        || async { outstanding(&agents[h]) == 1 },
    )
    .await;
    assert_eq!(outstanding(entry), 0, "not on the entry node");
    let dropped = std::time::Instant::now();
    drop(response);
    wait_for(
        "the holder's worker to drop the abandoned request",
        Duration::from_millis(600),
        || async { outstanding(&agents[h]) == 0 },
    )
    .await;
    println!(
        "remote generation cancelled {:.0} ms after the client left",
        dropped.elapsed().as_secs_f64() * 1000.0
    );

    // Unrelated prompts (no shared prefix), 10 at once into each frontend: no worker gets
    // more than 1.5x its fair share.
    let (_, workers_before) = route_counts(&agents).await;
    let mut tasks = Vec::new();
    for (k, agent) in agents.iter().enumerate() {
        for i in 0..10 {
            let addr = agent.addr;
            let prompt = format!(
                "{} unrelated request {k}-{i} with enough text to fill a block or two",
                uuid::Uuid::new_v4()
            );
            tasks.push(tokio::spawn(async move { complete(addr, &prompt).await }));
        }
    }
    for task in tasks {
        assert_completion("unrelated", &task.await.unwrap());
    }
    let (_, workers_after) = route_counts(&agents).await;
    let spread: Vec<u64> = ids
        .iter()
        .map(|id| {
            let key = id.to_string();
            workers_after.get(&key).copied().unwrap_or(0)
                - workers_before.get(&key).copied().unwrap_or(0)
        })
        .collect();
    println!("unrelated requests per worker: {spread:?}");
    assert_eq!(
        spread.iter().sum::<u64>(),
        30,
        "every request was routed by the fleet router"
    );
    assert!(
        spread.iter().all(|&n| n <= 15),
        "no worker over 1.5x its fair share of 10: {spread:?}"
    );

    // The holder's node goes away: requests with its prefix keep succeeding from the others
    // (a local retry while their routers still name it, then the directory and the stream
    // drop it).
    let a = agents.remove(h);
    let gone = ids[h];
    a.stop().await;
    for round in 0..3 {
        for agent in &agents {
            let prompt = format!("{prefix}After the loss {round}?");
            assert_completion(&agent.name, &complete(agent.addr, &prompt).await);
        }
    }
    // The first of those picked the lost holder (its routers had not heard yet) and was
    // retried locally.
    let (counts, _) = route_counts(&agents).await;
    let fallbacks: u64 = counts
        .iter()
        .map(|c| c.get("fallback_local").copied().unwrap_or(0))
        .sum();
    println!("after the loss: {counts:?}");
    assert!(
        fallbacks >= 1,
        "a failed forward was retried locally: {counts:?}"
    );
    wait_for(
        "the holder's worker to leave the other routers",
        Duration::from_secs(15),
        || async {
            agents
                .iter()
                .all(|a| fleet(a).worker_blocks(gone).is_none())
        },
    )
    .await;

    for agent in agents {
        agent.stop().await;
    }
    cp.stop().await;
    db.drop_now().await;
    for dir in dirs {
        let _ = std::fs::remove_dir_all(dir);
    }
}
