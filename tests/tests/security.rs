//! The fleet attacked the way issue #22 lists it, end to end: a real Postgres, a control plane
//! and agents on loopback (the harness in `common/`).
//!
//! - Join tokens: a used one and an expired one are refused; a removed node's agent, which
//!   falls back to the join token it started with, cannot come back with it.
//! - Revocation bites: a removed (revoked) node's open peer connections to another agent are
//!   closed within one heartbeat interval of the removal, and new ones are refused; the KV
//!   blocks it supplied to another node's decode worker are evicted from it within a heartbeat.
//! - A fleet member that stalls a peer stream, or opens more than `[peer] max_streams_per_peer`
//!   against a real agent, is refused and counted, while a client's request on that node
//!   completes.
//! - Nothing in the logs: every log line the control plane and the agents write during all of
//!   that (debug level for our crates) is captured and searched for the admin token, the join
//!   token, the agent credential and the node's private key.
//!
//! - Joins an admin approves: with approval required, a real agent's node waits `pending` (its
//!   agent says so and names the command), runs nothing and holds no peer certificate; once an
//!   admin approves it, it gets its certificate and its worker.
//!
//! - HTTPS: an agent that pins the fleet CA by fingerprint joins a control plane serving a
//!   fleet-CA certificate; one pinning another fleet's CA is refused with an error that says so.
//!
//! Needs `DATABASE_URL` (see `fleet.rs`); without it the tests print why and skip.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    unreachable_pub
)]

mod common;

use std::io::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use kvfleet_agent::backend::Backend as _;
use kvfleet_controlplane::auth::Role;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

/// The control plane's heartbeat interval in this harness (`ControlPlane::start_with`).
const HEARTBEAT: Duration = Duration::from_millis(200);
const LOST_AFTER: Duration = Duration::from_secs(60);

/// Every log line written in this process (one test per process under nextest).
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    /// Installs the process-wide subscriber: debug for our crates, info for the rest.
    fn install() -> Self {
        let captured = Self::default();
        let writer = captured.clone();
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(
                "info,kvfleet_agent=debug,kvfleet_controlplane=debug,kvfleet_peer=debug",
            ))
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .try_init();
        captured
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

async fn register(cp: &ControlPlane, token: &str, hostname: &str) -> (StatusCode, Value) {
    api(
        Method::POST,
        &cp.url("/agent/register"),
        token,
        Some(json!({"hostname": hostname, "agent_version": "test", "cpu_slots": 1})),
    )
    .await
}

async fn new_join_token(cp: &ControlPlane, admin: &str, body: Value) -> String {
    let (status, created) = api(Method::POST, &cp.url("/tokens"), admin, Some(body)).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    created["secret"].as_str().unwrap().to_owned()
}

async fn nodes(cp: &ControlPlane, admin: &str) -> Vec<Value> {
    let (status, body) = api(Method::GET, &cp.url("/nodes"), admin, None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["items"].as_array().unwrap().clone()
}

/// Join tokens are single-use with an expiry; a removed node stays out; no secret is logged.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn used_or_expired_join_tokens_and_removed_nodes_stay_out_and_nothing_secret_is_logged() {
    let logs = Captured::install();
    let Some(db) = TestDb::create().await else {
        return;
    };
    // No bootstrap token configured and an empty database: the control plane makes the first
    // admin token and writes it to its token file (never to the log).
    let token_file = temp_dir("admin-token");
    let cp = ControlPlane::start_with(&db, "127.0.0.1:0".parse().unwrap(), LOST_AFTER, |c| {
        c.auth.bootstrap_token_file = token_file.clone();
    })
    .await;
    let admin = std::fs::read_to_string(&token_file)
        .expect("the bootstrap admin token is in its file")
        .trim()
        .to_owned();
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&token_file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "the token file is the owner's only");
    }
    assert_eq!(
        api(Method::GET, &cp.url("/tokens"), &admin, None).await.0,
        StatusCode::OK
    );

    // A node joins with a fresh (single-use, 1 h) join token.
    let join = new_join_token(&cp, &admin, json!({"name": "node-a", "role": "join"})).await;
    let dir = temp_dir("node-a");
    let setup = AgentSetup {
        mock_token_time_us: 1000,
        peer_on_loopback: true,
    };
    let agent = Agent::start("node-a", &cp, &join, &dir, setup).await;
    wait_nodes_healthy(&cp, &admin, &["node-a"]).await;

    // The used token is refused for anyone else, with a reason.
    let (status, body) = register(&cp, &join, "intruder").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert!(
        body["detail"].as_str().unwrap().contains("used up"),
        "{body}"
    );
    // An expired one too.
    let short = new_join_token(
        &cp,
        &admin,
        json!({"name": "short", "role": "join", "expires_in_s": 1}),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (status, body) = register(&cp, &short, "late").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert!(
        body["detail"].as_str().unwrap().contains("expired"),
        "{body}"
    );

    // Removing the node sticks: its agent's credential is refused, it falls back to its join
    // token (as it would after a reinstall), and that is used up.
    let identity = kvfleet_agent::state_dir::StateDir::open(&dir)
        .unwrap()
        .identity()
        .unwrap()
        .expect("the agent saved its identity");
    let key_pem = std::fs::read_to_string(
        kvfleet_agent::state_dir::StateDir::open(&dir)
            .unwrap()
            .key_path(),
    )
    .unwrap();
    let (status, body) = api(
        Method::DELETE,
        &cp.url(&format!("/nodes/{}", identity.node_id)),
        &admin,
        None,
    )
    .await;
    assert!(status.is_success(), "{status} {body}");
    // Many heartbeats' worth: every retry the agent makes is refused.
    tokio::time::sleep(HEARTBEAT * 15).await;
    let all = nodes(&cp, &admin).await;
    let named_a: Vec<&Value> = all.iter().filter(|n| n["hostname"] == "node-a").collect();
    assert_eq!(named_a.len(), 1, "no second node-a joined: {all:?}");
    assert_eq!(named_a[0]["state"], "removed", "{all:?}");
    let (status, _) = api(
        Method::POST,
        &cp.url("/agent/heartbeat"),
        &identity.credential,
        Some(json!({})),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    agent.stop().await;
    cp.stop().await;
    db.drop_now().await;

    // Nothing secret in any log line of all that.
    let text = logs.text();
    assert!(
        text.contains("created the first admin token"),
        "the capture works and saw the bootstrap"
    );
    // The agent was keyed with the fleet hash secret, and said so without it.
    let fleet_secret = kvfleet_controlplane::ca_key::fleet_hash_secret(&ca_key_file()).unwrap();
    assert!(
        text.contains("fleet hash key set"),
        "the agent logged its key's arrival"
    );
    let key_body: String = key_pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect::<Vec<_>>()
        .join("");
    let secrets = [
        ("the admin token", admin.as_str()),
        ("the join token", join.as_str()),
        ("the expired join token", short.as_str()),
        ("the agent credential", identity.credential.as_str()),
        (
            "the node's private key",
            &key_body[..40.min(key_body.len())],
        ),
        ("a private key", "PRIVATE KEY"),
        ("the fleet hash secret", fleet_secret.0.as_str()),
    ];
    for (what, secret) in secrets {
        assert!(!secret.is_empty());
        assert!(!text.contains(secret), "{what} is in the logs");
    }
    // The tokens' secret halves (after the public prefix) too.
    for token in [&admin, &join, &identity.credential] {
        assert!(
            !text.contains(&token[17..]),
            "a token's secret is in the logs"
        );
    }
    let _ = std::io::stdout().write_all(
        format!(
            "captured {} log lines, no secret among them\n",
            text.lines().count()
        )
        .as_bytes(),
    );
    let _ = std::fs::remove_file(&token_file);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A revoked node's open peer connections are closed within one heartbeat interval.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_removed_nodes_open_peer_connections_close_within_one_heartbeat() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let cp = ControlPlane::start(&db, "127.0.0.1:0".parse().unwrap(), LOST_AFTER).await;
    let admin = token(&db, Role::Admin).await;
    let join = token(&db, Role::Join).await;
    let setup = AgentSetup {
        mock_token_time_us: 1000,
        peer_on_loopback: true,
    };
    let dirs = [temp_dir("node-a"), temp_dir("node-b")];
    let a = Agent::start("node-a", &cp, &join, &dirs[0], setup).await;
    let b = Agent::start("node-b", &cp, &join, &dirs[1], setup).await;
    wait_nodes_healthy(&cp, &admin, &["node-a", "node-b"]).await;
    let peer = |agent: &Agent| agent.running.fleet().unwrap().peer.clone();
    wait_for(
        "both peer endpoints bound",
        Duration::from_secs(20),
        || async { peer(&a).endpoint().is_some() && peer(&b).endpoint().is_some() },
    )
    .await;
    let a_end = peer(&a).endpoint().unwrap();
    let b_addr = peer(&b).local_addr().unwrap();
    let node = |agent: &Agent| {
        agent
            .running
            .fleet()
            .unwrap()
            .control_plane
            .status()
            .node_id
            .unwrap()
    };
    let (a_id, b_id) = (node(&a), node(&b));
    let connection = a_end
        .connection(b_addr, kvfleet_proto::NodeId(b_id))
        .await
        .expect("node-a connects to node-b");
    let b_metrics = peer(&b).endpoint().unwrap().metrics();

    let removed = Instant::now();
    let (status, body) = api(
        Method::DELETE,
        &cp.url(&format!("/nodes/{a_id}")),
        &admin,
        None,
    )
    .await;
    assert!(status.is_success(), "{status} {body}");
    wait_for(
        "node-b to close node-a's connection",
        Duration::from_secs(10),
        || async { connection.close_reason().is_some() },
    )
    .await;
    let took = removed.elapsed();
    println!("closed {took:?} after the removal (heartbeat every {HEARTBEAT:?})");
    // One interval, plus the heartbeat's own round trip and this poll's 100 ms step.
    assert!(
        took < HEARTBEAT + Duration::from_millis(900),
        "closed after {took:?}"
    );
    assert!(
        connection.close_reason().unwrap().contains("revoked"),
        "{:?}",
        connection.close_reason()
    );
    assert_eq!(
        b_metrics
            .connections_revoked
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    // A new connection from the revoked node is closed as well.
    if let Ok(fresh) = a_end.connect(b_addr, kvfleet_proto::NodeId(b_id)).await {
        wait_for(
            "the fresh connection closed",
            Duration::from_secs(5),
            || async { fresh.close_reason().is_some() },
        )
        .await;
    }
    a.stop().await;
    b.stop().await;
    cp.stop().await;
    db.drop_now().await;
    for dir in dirs {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// A request another node forwards takes a slot of the serving node's admission like a local
/// one: with node-b's only slot taken (and no queue), a request forwarded from node-a is refused
/// `Overloaded` before anything runs (node-a then serves it elsewhere), and so is the prefill leg
/// of a disaggregated request (it takes a slot there too, without queueing); once the slot is
/// free, the same forwarded request is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forwarded_requests_go_through_the_serving_nodes_admission() {
    use futures_util::StreamExt as _;
    use kvfleet_peer::{ErrorCode, GenerateEvent, GenerateRequest};
    let Some(db) = TestDb::create().await else {
        return;
    };
    let cp = ControlPlane::start(&db, "127.0.0.1:0".parse().unwrap(), LOST_AFTER).await;
    let admin = token(&db, Role::Admin).await;
    let join = token(&db, Role::Join).await;
    let setup = AgentSetup {
        mock_token_time_us: 20_000,
        peer_on_loopback: true,
    };
    let dirs = [temp_dir("node-a"), temp_dir("node-b")];
    let a = Agent::start("node-a", &cp, &join, &dirs[0], setup).await;
    let b_config = Agent::config("node-b", &cp, &join, &dirs[1], setup).replacen(
        "[log]",
        "[frontend]\nmax_in_flight = 1\nqueue_capacity = 0\n[log]",
        1,
    );
    let b = Agent::launch("node-b", b_config).await;
    wait_nodes_healthy(&cp, &admin, &["node-a", "node-b"]).await;
    deploy(&cp, &admin, 2).await;
    wait_for(
        "a ready worker on each agent",
        Duration::from_secs(60),
        || async { a.ready_workers() == 1 && b.ready_workers() == 1 },
    )
    .await;
    let peer = |agent: &Agent| agent.running.fleet().unwrap().peer.clone();
    wait_for(
        "both peer endpoints bound",
        Duration::from_secs(20),
        || async { peer(&a).endpoint().is_some() && peer(&b).endpoint().is_some() },
    )
    .await;
    let b_id = b
        .running
        .fleet()
        .unwrap()
        .control_plane
        .status()
        .node_id
        .unwrap();
    let connection = peer(&a)
        .endpoint()
        .unwrap()
        .connection(peer(&b).local_addr().unwrap(), kvfleet_proto::NodeId(b_id))
        .await
        .unwrap();
    let forwarded = GenerateRequest {
        request_id: "chatcmpl-forwarded".into(),
        model: MODEL.into(),
        worker: Some(worker_ids(&b)[0]),
        prompt: vec![1, 2, 3],
        block_hashes: Vec::new(),
        sampling: kvfleet_proto::SamplingParams::greedy(2),
        prefill: None,
        kv_push: None,
    };

    // node-b's one slot is taken by a local streaming request.
    let holder = reqwest::Client::new()
        .post(format!("http://{}/v1/chat/completions", b.addr))
        .json(
            &json!({"model": MODEL, "messages": [{"role": "user", "content": "hold"}],
            "max_tokens": 200, "stream": true}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(holder.status(), StatusCode::OK);
    let mut holder = holder.bytes_stream();
    holder.next().await.unwrap().unwrap();
    let mut stream = connection.generate(&forwarded).await.unwrap();
    let error = stream
        .next()
        .await
        .expect_err("refused while the slot is taken");
    assert_eq!(error.remote_code(), Some(ErrorCode::Overloaded), "{error}");
    let a_id = a
        .running
        .fleet()
        .unwrap()
        .control_plane
        .status()
        .node_id
        .unwrap();
    let prefill_leg = GenerateRequest {
        request_id: "chatcmpl-prefill-leg".into(),
        sampling: kvfleet_proto::SamplingParams::greedy(1),
        kv_push: Some(kvfleet_proto::peer::KvPush {
            transfer_id: "chatcmpl-prefill-leg-0".into(),
            worker: worker_ids(&a)[0],
            node: a_id,
            addr: peer(&a).local_addr().unwrap().to_string(),
        }),
        ..forwarded.clone()
    };
    let mut stream = connection.generate(&prefill_leg).await.unwrap();
    let error = stream
        .next()
        .await
        .expect_err("a prefill leg is refused while the slot is taken");
    assert_eq!(error.remote_code(), Some(ErrorCode::Overloaded), "{error}");

    drop(holder);
    let mut served = false;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !served {
        assert!(
            Instant::now() < deadline,
            "the forwarded request was never served"
        );
        let mut stream = connection.generate(&forwarded).await.unwrap();
        loop {
            match stream.next().await {
                Ok(Some(GenerateEvent::Finished(_))) => {
                    served = true;
                    break;
                }
                Ok(Some(_)) => continue,
                Ok(None) | Err(_) => break,
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    a.stop().await;
    b.stop().await;
    cp.stop().await;
    db.drop_now().await;
    for dir in dirs {
        let _ = std::fs::remove_dir_all(dir);
    }
}

const TLS_SETUP: AgentSetup = AgentSetup {
    mock_token_time_us: 0,
    peer_on_loopback: true,
};

/// An agent reaches an https control plane through the pinned fleet CA only.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn agents_join_an_https_control_plane_through_the_pinned_fleet_ca_only() {
    let logs = Captured::install();
    let Some(db) = TestDb::create().await else {
        return;
    };
    // The fleet CA exists before the control plane starts (the first start would make it), so
    // the test knows the fingerprint an operator reads from the start-up log.
    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    kvfleet_controlplane::store::migrate(&pool).await.unwrap();
    // The same sealing key file as the harness's control planes (one per test process).
    let key_file = ca_key_file();
    let (ca, _) =
        kvfleet_controlplane::ca_key::load_or_create(&pool, &key_file, Duration::from_secs(86_400))
            .await
            .unwrap();
    let pin = ca.fingerprint();
    let cp = ControlPlane::start_with(&db, "127.0.0.1:0".parse().unwrap(), LOST_AFTER, |c| {
        c.tls = kvfleet_controlplane::config::TlsConfig::FleetCa {
            names: vec!["127.0.0.1".into()],
        };
    })
    .await;
    assert!(cp.base().starts_with("https://"));

    // Pinned to another fleet's CA: never connects, and says why.
    let (other_ca, _) = kvfleet_controlplane::ca::NodeCa::generate(
        "another fleet",
        chrono::Utc::now(),
        Duration::from_secs(3600),
    )
    .unwrap();
    let join = token(&db, Role::Join).await;
    let wrong = Agent::config("tls-wrong", &cp, &join, &temp_dir("state-wrong"), TLS_SETUP)
        .replace(
            "[control_plane]\n",
            &format!(
                "[control_plane]\nca_fingerprint = \"{}\"\n",
                other_ca.fingerprint()
            ),
        );
    let wrong = Agent::launch("tls-wrong", wrong).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!wrong.connected(), "joined through a CA it did not pin");
    assert!(
        logs.text().contains("does not carry the fleet CA pinned"),
        "the refusal names the pin"
    );
    wrong.stop().await;

    // Issue #22: the join token alone, carrying the fleet CA's fingerprint (`kvfj1.<hex>.<token>`,
    // what `POST /tokens` returns as join_token): with another fleet's fingerprint in it, the
    // agent never connects and says which pin refused the control plane...
    let foreign = kvfleet_proto::JoinTokenText::compose(&other_ca.fingerprint(), &join);
    let config = Agent::config(
        "tls-token-wrong",
        &cp,
        &foreign,
        &temp_dir("state-tw"),
        TLS_SETUP,
    );
    assert!(!config.contains("ca_fingerprint"), "{config}");
    let wrong = Agent::launch("tls-token-wrong", config).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        !wrong.connected(),
        "joined through a CA its token did not carry"
    );
    assert!(
        logs.text()
            .contains("does not carry the fleet CA pinned by the join token"),
        "the refusal names the token's pin"
    );
    wrong.stop().await;
    // ...and with this fleet's, it joins with nothing else: the very first contact verified.
    let carried = kvfleet_proto::JoinTokenText::compose(&pin, &join);
    let dir = temp_dir("state-token");
    let agent = Agent::launch(
        "tls-token",
        Agent::config("tls-token", &cp, &carried, &dir, TLS_SETUP),
    )
    .await;
    wait_for(
        "the agent to join with the token alone over https",
        Duration::from_secs(30),
        || {
            let connected = agent.connected();
            async move { connected }
        },
    )
    .await;
    agent.stop().await;
    // The pin outlives the token: saved at the join, for starts without it.
    assert_eq!(
        kvfleet_agent::state_dir::StateDir::saved_ca_pin(&dir),
        Some(pin)
    );

    // Pinned right by the config line (and a bare token): joins over https and stays connected.
    let join = token(&db, Role::Join).await;
    let good = Agent::config("tls-good", &cp, &join, &temp_dir("state-good"), TLS_SETUP).replace(
        "[control_plane]\n",
        &format!("[control_plane]\nca_fingerprint = \"{pin}\"\n"),
    );
    let good = Agent::launch("tls-good", good).await;
    wait_for(
        "the pinned agent to join over https",
        Duration::from_secs(30),
        || {
            let connected = good.connected();
            async move { connected }
        },
    )
    .await;
    good.stop().await;
    cp.stop().await;
    pool.close().await;
    db.drop_now().await;
}

/// Issue #22: with approval required (the default outside labs), a real agent's node waits for
/// an admin: its agent logs that it waits and the command that lets it in, it runs no worker
/// and has no peer certificate; approved, it gets both within a few heartbeats.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_joined_node_waits_for_an_admin_and_runs_nothing_until_approved() {
    let logs = Captured::install();
    let Some(db) = TestDb::create().await else {
        return;
    };
    let cp = ControlPlane::start_with(&db, "127.0.0.1:0".parse().unwrap(), LOST_AFTER, |c| {
        c.join.auto_approve = false;
    })
    .await;
    let admin = token(&db, Role::Admin).await;
    let join = token(&db, Role::Join).await;
    deploy(&cp, &admin, 1).await;
    let dir = temp_dir("pending");
    let setup = AgentSetup {
        mock_token_time_us: 1000,
        peer_on_loopback: true,
    };
    let agent = Agent::start("node-p", &cp, &join, &dir, setup).await;
    wait_nodes_healthy(&cp, &admin, &["node-p"]).await;
    let node = nodes(&cp, &admin).await[0].clone();
    assert_eq!(node["approval"], "pending", "{node}");
    let id = node["id"].as_str().unwrap().to_owned();
    // Many placement passes (200 ms) and heartbeats: nothing runs, no certificate is held.
    tokio::time::sleep(HEARTBEAT * 10).await;
    assert_eq!(agent.workers(), 0, "a pending node runs nothing");
    let state = kvfleet_agent::state_dir::StateDir::open(&dir).unwrap();
    assert!(
        state.certificate().unwrap().is_none(),
        "a pending node holds no peer certificate"
    );
    let text = logs.text();
    assert!(
        text.contains("waits for an admin's approval")
            && text.contains(&format!("kvfleet nodes approve {id}")),
        "the agent says it waits and how to let it in"
    );
    let (status, body) = api(
        Method::POST,
        &cp.url(&format!("/nodes/{id}/approve")),
        &admin,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // The worker comes by the desired-state watch, the certificate with the next heartbeat:
    // either may be first.
    wait_for(
        "the approved node's ready worker and its peer certificate",
        Duration::from_secs(30),
        || async { agent.ready_workers() == 1 && state.certificate().unwrap().is_some() },
    )
    .await;
    assert!(
        logs.text()
            .contains("approved by an admin: got the peer certificate")
    );
    let (status, body) = complete(agent.addr, "hello").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    agent.stop().await;
    cp.stop().await;
    db.drop_now().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// A node that supplied KV blocks to another node's decode worker (a disaggregated request) is
/// removed: within a heartbeat the decode worker has evicted every block it supplied (counted
/// in `/metrics`), and the same prompt again gets no prefix hit from them there.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_removed_nodes_kv_blocks_leave_the_decode_worker_within_a_heartbeat() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let cp = ControlPlane::start(&db, "127.0.0.1:0".parse().unwrap(), LOST_AFTER).await;
    let admin = token(&db, Role::Admin).await;
    let join = token(&db, Role::Join).await;
    let setup = AgentSetup {
        mock_token_time_us: 1000,
        peer_on_loopback: true,
    };
    let dirs = [temp_dir("supplier-a"), temp_dir("supplier-b")];
    let a = Agent::start("supplier-a", &cp, &join, &dirs[0], setup).await;
    let b = Agent::start("supplier-b", &cp, &join, &dirs[1], setup).await;
    wait_nodes_healthy(&cp, &admin, &["supplier-a", "supplier-b"]).await;
    register_and_deploy(
        &cp,
        &admin,
        mock_model(),
        json!({"name": "split", "model": MODEL, "mode": "disaggregated",
            "min_workers": 2, "max_workers": 2, "placement": {"allow_cpu": true},
            "disaggregation": {"min_remote_prefill_tokens": 0, "prefill_timeout_ms": 60000}}),
    )
    .await;
    let worker = |agent: &Agent| agent.running.pool.workers().into_iter().next();
    let ready_role = |agent: &Agent| {
        worker(agent)
            .filter(|w| w.state == kvfleet_agent::backend::WorkerState::Ready)
            .map(|w| w.role)
    };
    wait_for(
        "a ready prefill worker on one node and a decode worker on the other",
        Duration::from_secs(60),
        || async {
            let roles = [ready_role(&a), ready_role(&b)];
            roles.contains(&Some(kvfleet_proto::api::WorkerRole::Prefill))
                && roles.contains(&Some(kvfleet_proto::api::WorkerRole::Decode))
        },
    )
    .await;
    let (supplier, decode) = if ready_role(&a) == Some(kvfleet_proto::api::WorkerRole::Prefill) {
        (&a, &b)
    } else {
        (&b, &a)
    };
    wait_for(
        "the decode node's router to know the prefill worker",
        Duration::from_secs(30),
        || async {
            decode.running.fleet().is_some_and(|f| {
                f.router
                    .remote_workers()
                    .values()
                    .any(|w| w.ready && w.peer_addr.is_some())
            })
        },
    )
    .await;
    // 50 token ids: three full blocks of 16 cross from the prefill node.
    let prompt: Vec<u32> = (0..50).map(|i| 8 + (i * 37) % 200).collect();
    let complete = || async {
        let response = reqwest::Client::new()
            .post(format!("http://{}/v1/completions", decode.addr))
            .json(&json!({"model": MODEL, "prompt": prompt, "max_tokens": 2, "temperature": 0}))
            .timeout(Duration::from_secs(30))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
    };
    complete().await;
    let decode_worker = worker(decode).unwrap().id;
    wait_for(
        "the decode worker to report the imported blocks",
        Duration::from_secs(10),
        || async {
            decode
                .running
                .pool
                .kv_transfers(decode_worker)
                .is_some_and(|c| c.blocks_imported == 3)
        },
    )
    .await;
    let hits_before = worker(decode).unwrap().prefix_hit_tokens;
    assert!(hits_before >= 48, "the supplied blocks were prefix hits");

    let supplier_id = supplier
        .running
        .fleet()
        .unwrap()
        .control_plane
        .status()
        .node_id
        .unwrap();
    let removed = Instant::now();
    let (status, body) = api(
        Method::DELETE,
        &cp.url(&format!("/nodes/{supplier_id}")),
        &admin,
        None,
    )
    .await;
    assert!(status.is_success(), "{status} {body}");
    wait_for(
        "the decode worker to evict the removed node's blocks",
        Duration::from_secs(10),
        || async { worker(decode).is_some_and(|w| w.kv_blocks_evicted_origin >= 3) },
    )
    .await;
    let took = removed.elapsed();
    // The worker reports its counters every 250 ms: one heartbeat, one report and a poll.
    println!("evicted {took:?} after the removal (heartbeat every {HEARTBEAT:?})");
    assert!(took < HEARTBEAT + Duration::from_millis(1500), "{took:?}");
    let metrics = reqwest::get(format!("http://{}/metrics", decode.addr))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let line = metrics
        .lines()
        .find(|l| {
            l.starts_with("kvfleet_worker_blocks_evicted_total{")
                && l.contains("reason=\"origin_revoked\"")
        })
        .unwrap_or_else(|| panic!("no eviction counter in:\n{metrics}"));
    let counted: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(counted >= 3.0, "{line}");

    // The same prompt again, served by the decode node alone: nothing of the supplier's hits.
    let query_before = worker(decode).unwrap().prefix_query_tokens;
    complete().await;
    wait_for(
        "the decode worker to report the repeat",
        Duration::from_secs(10),
        || async { worker(decode).is_some_and(|w| w.prefix_query_tokens > query_before) },
    )
    .await;
    assert_eq!(
        worker(decode).unwrap().prefix_hit_tokens,
        hits_before,
        "no prefix hit from the evicted blocks"
    );
    a.stop().await;
    b.stop().await;
    cp.stop().await;
    db.drop_now().await;
    for dir in dirs {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// A node with a valid fleet certificate, against a real agent: a stream it stalls inside its
/// first frame is refused after `[peer] stall_timeout_secs` (counted as `stalled`), and with
/// `[peer] max_streams_per_peer` forwarded requests held open its next stream is refused at
/// once (`Overloaded`, counted as `peer_limit`); a client's request on the same node completes
/// meanwhile, each time.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_peer_that_stalls_or_opens_too_many_streams_is_refused_and_counted_and_clients_are_served()
 {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let cp = ControlPlane::start(&db, "127.0.0.1:0".parse().unwrap(), LOST_AFTER).await;
    let admin = token(&db, Role::Admin).await;
    let join = token(&db, Role::Join).await;
    // 20 ms a token: a forwarded request of 200 tokens holds its stream for 4 s.
    let setup = AgentSetup {
        mock_token_time_us: 20_000,
        peer_on_loopback: true,
    };
    let dirs = [temp_dir("limited-a"), temp_dir("limited-b")];
    let config = Agent::config("limited-a", &cp, &join, &dirs[0], setup)
        + "max_streams_per_peer = 2\nstall_timeout_secs = 1\n";
    let a = Agent::launch("limited-a", config).await;
    let b = Agent::start("limited-b", &cp, &join, &dirs[1], setup).await;
    wait_nodes_healthy(&cp, &admin, &["limited-a", "limited-b"]).await;
    deploy(&cp, &admin, 2).await;
    wait_for("node-a's worker ready", Duration::from_secs(60), || async {
        a.ready_workers() == 1
    })
    .await;
    let target = a.running.fleet().unwrap().peer.clone();
    wait_for(
        "node-a's peer endpoint",
        Duration::from_secs(20),
        || async { target.endpoint().is_some() },
    )
    .await;
    let target = target.endpoint().unwrap();
    // The rogue: node-b's certificate, in an endpoint of its own.
    let identity = kvfleet_peer::PeerIdentity {
        ca_pem: std::fs::read_to_string(dirs[1].join("ca.crt")).unwrap(),
        cert_pem: std::fs::read_to_string(dirs[1].join("node.crt")).unwrap(),
        key_pem: std::fs::read_to_string(dirs[1].join("node.key")).unwrap(),
    };
    let rogue = kvfleet_peer::PeerEndpoint::bind(kvfleet_peer::PeerConfig::new(
        "127.0.0.1:0".parse().unwrap(),
        identity.clone(),
    ))
    .unwrap();
    let connection = rogue
        .connection(target.local_addr().unwrap(), target.node_id())
        .await
        .unwrap();
    let long = |i: u32| kvfleet_peer::GenerateRequest {
        request_id: format!("cmpl-hold-{i}"),
        model: MODEL.into(),
        worker: None,
        prompt: vec![8 + i, 9, 10, 11],
        block_hashes: Vec::new(),
        sampling: kvfleet_proto::SamplingParams::greedy(200),
        prefill: None,
        kv_push: None,
    };
    let metrics = || async {
        reqwest::get(format!("http://{}/metrics", a.addr))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    let counter = |text: &str, kind: &str| {
        let prefix = format!("kvfleet_peer_errors_total{{kind=\"{kind}\"}}");
        text.lines()
            .find(|l| l.starts_with(&prefix))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or(0.0)
    };

    // A stream that stalls inside its first frame: refused after `stall_timeout_secs` and
    // counted as `stalled`; a client's request is served meanwhile.
    let stalled_before = counter(&metrics().await, "stalled");
    let raw = raw_connection(&target, &identity).await;
    let (mut send, mut recv) = raw.open_bi().await.unwrap();
    let mut first = Vec::new();
    kvfleet_proto::frame::FrameCodec::default()
        .encode(
            kvfleet_proto::frame::FrameKind::Request,
            br#"{"request_id":"cmpl-stall"}"#,
            &mut first,
        )
        .unwrap();
    send.write_all(&first[..5]).await.unwrap();
    let started = Instant::now();
    let response = reqwest::Client::new()
        .post(format!("http://{}/v1/completions", a.addr))
        .json(&json!({"model": MODEL, "prompt": "hello", "max_tokens": 2}))
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    println!(
        "a client's request took {:?} beside the stalled stream",
        started.elapsed()
    );
    let answer = tokio::time::timeout(Duration::from_secs(10), recv.read_to_end(1 << 16))
        .await
        .expect("the stalled stream is ended by the agent")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    println!(
        "stalled stream ended after {:?}: {answer}",
        started.elapsed()
    );
    assert!(answer.contains("stalled"), "{answer}");
    wait_for("the stall counted", Duration::from_secs(5), || async {
        counter(&metrics().await, "stalled") == stalled_before + 1.0
    })
    .await;
    raw.close(0u32.into(), b"done");

    let before = counter(&metrics().await, "peer_limit");
    // Its share: two streams, each a request that runs for seconds; the first token of each
    // shows it was taken.
    let mut held = Vec::new();
    for i in 0..2 {
        let mut stream = connection.generate(&long(i)).await.unwrap();
        stream.next().await.expect("a held request streams");
        held.push(stream);
    }
    let refused = match connection.generate(&long(2)).await {
        Err(e) => e,
        Ok(mut stream) => loop {
            match stream.next().await {
                Err(e) => break e,
                Ok(None) => panic!("the third stream was served"),
                Ok(Some(_)) => {}
            }
        },
    };
    assert_eq!(
        refused.remote_code(),
        Some(kvfleet_peer::ErrorCode::Overloaded),
        "{refused}"
    );
    assert_eq!(
        counter(&metrics().await, "peer_limit"),
        before + 1.0,
        "counted once"
    );
    // A client of the node is served while the two streams still hold their slots.
    let started = Instant::now();
    let response = reqwest::Client::new()
        .post(format!("http://{}/v1/completions", a.addr))
        .json(&json!({"model": MODEL, "prompt": "hello", "max_tokens": 2}))
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    println!("a client's request took {:?} meanwhile", started.elapsed());
    drop(held);
    connection.close();
    a.stop().await;
    b.stop().await;
    cp.stop().await;
    db.drop_now().await;
    for dir in dirs {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// A QUIC connection to `target` with `identity`'s certificate, whose streams the test writes
/// byte by byte (what `PeerEndpoint` never sends: a frame cut short).
async fn raw_connection(
    target: &kvfleet_peer::PeerEndpoint,
    identity: &kvfleet_peer::PeerIdentity,
) -> quinn::Connection {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(identity.ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let chain = CertificateDer::pem_slice_iter(identity.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_slice(identity.key_pem.as_bytes()).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap();
    config.alpn_protocols = vec![kvfleet_proto::peer::PEER_ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(config).unwrap();
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(quic)));
    endpoint
        .connect(
            target.local_addr().unwrap(),
            &kvfleet_peer::node_server_name(target.node_id()),
        )
        .unwrap()
        .await
        .unwrap()
}
