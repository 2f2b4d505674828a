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

mod common;

use std::time::Duration;

use common::*;
use kvfleet_controlplane::auth::Role;
use reqwest::StatusCode;
use serde_json::Value;

/// Long enough that no node goes silent by accident on a slow machine.
const LOST_AFTER: Duration = Duration::from_secs(120);

const SETUP: AgentSetup = AgentSetup {
    mock_token_time_us: 0,
    peer_on_loopback: false,
};

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
    let cp = ControlPlane::start(&db, "127.0.0.1:0".parse().unwrap(), LOST_AFTER).await;
    let admin = token(&db, Role::Admin).await;
    let join = token(&db, Role::Join).await;
    let (state_a, state_b) = (temp_dir("state-a"), temp_dir("state-b"));
    let a = Agent::start("e2e-node-a", &cp, &join, &state_a, SETUP).await;
    let b = Agent::start("e2e-node-b", &cp, &join, &state_b, SETUP).await;
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

    let deployment = deploy(&cp, &admin, 2).await;
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

/// Issue 23's acceptance line: `/v1/responses` with `store` and `previous_response_id` across
/// two agents (`tests/sdk/fleet_responses.py`): created on A, retrieved and continued on B,
/// deleted on B and then 404 on A; another API key gets 404 everywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stored_responses_are_found_continued_and_deleted_from_any_node() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    if !python_openai() {
        return;
    }
    let cp = ControlPlane::start(&db, "127.0.0.1:0".parse().unwrap(), LOST_AFTER).await;
    let admin = token(&db, Role::Admin).await;
    let join = token(&db, Role::Join).await;
    let (key, key2) = ("responses-key-one", "responses-key-two");
    let keys = format!("[frontend]\napi_keys = [\"{key}\", \"{key2}\"]\n");
    let mut agents = Vec::new();
    for name in ["resp-node-a", "resp-node-b"] {
        let state = temp_dir(name);
        let toml = Agent::config(name, &cp, &join, &state, SETUP) + &keys;
        agents.push(Agent::launch(name, toml).await);
    }
    let (a, b) = (&agents[0], &agents[1]);
    wait_nodes_healthy(&cp, &admin, &["resp-node-a", "resp-node-b"]).await;
    deploy(&cp, &admin, 2).await;
    wait_for(
        "a ready worker on each agent",
        Duration::from_secs(60),
        || async { a.ready_workers() == 1 && b.ready_workers() == 1 },
    )
    .await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk/fleet_responses.py");
    let output = tokio::process::Command::new("python3")
        .arg(script)
        .args([&format!("http://{}", a.addr), &format!("http://{}", b.addr)])
        .args([MODEL, key, key2])
        .output()
        .await
        .unwrap();
    assert!(
        output.status.success(),
        "stored responses across the fleet: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );

    // A control-plane outage affects only lookups of responses stored on other nodes.
    let http = reqwest::Client::new();
    let created: Value = http
        .post(format!("http://{}/v1/responses", a.addr))
        .bearer_auth(key)
        .json(
            &serde_json::json!({"model": MODEL, "input": "before the outage",
            "max_output_tokens": 2}),
        )
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = created["id"].as_str().unwrap().to_owned();
    let lookup = |addr: std::net::SocketAddr| {
        let (http, id) = (http.clone(), id.clone());
        async move {
            http.get(format!("http://{addr}/v1/responses/{id}"))
                .bearer_auth(key)
                .send()
                .await
                .unwrap()
                .status()
        }
    };
    wait_for(
        "the response written behind to the control plane",
        Duration::from_secs(10),
        || async { lookup(b.addr).await == StatusCode::OK },
    )
    .await;
    cp.stop().await;
    assert_eq!(
        lookup(a.addr).await,
        StatusCode::OK,
        "the serving node's own copy"
    );
    assert_eq!(
        lookup(b.addr).await,
        StatusCode::OK,
        "the copy node B read before the outage"
    );
    let elsewhere: Value = http
        .post(format!("http://{}/v1/responses", a.addr))
        .bearer_auth(key)
        .json(
            &serde_json::json!({"model": MODEL, "input": "during the outage",
            "max_output_tokens": 2}),
        )
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        elsewhere["status"], "incomplete",
        "served during the outage: {elsewhere}"
    );
    let status = http
        .get(format!(
            "http://{}/v1/responses/{}",
            b.addr,
            elsewhere["id"].as_str().unwrap()
        ))
        .bearer_auth(key)
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(
        status,
        StatusCode::SERVICE_UNAVAILABLE,
        "stored on A, looked up on B"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn agents_keep_serving_without_the_control_plane_and_reconcile_when_it_returns() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let cp = ControlPlane::start(&db, "127.0.0.1:0".parse().unwrap(), LOST_AFTER).await;
    let cp_addr = cp.addr;
    let admin = token(&db, Role::Admin).await;
    let join = token(&db, Role::Join).await;
    let (state_a, state_b) = (temp_dir("state-a"), temp_dir("state-b"));
    let a = Agent::start("e2e-out-a", &cp, &join, &state_a, SETUP).await;
    let b = Agent::start("e2e-out-b", &cp, &join, &state_b, SETUP).await;
    wait_nodes_healthy(&cp, &admin, &["e2e-out-a", "e2e-out-b"]).await;
    let deployment = deploy(&cp, &admin, 2).await;
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
    let cp = ControlPlane::start(&db, cp_addr, LOST_AFTER).await;
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

/// A worker whose engine cannot start (issue 24: a `llamacpp` model whose `llama-server` is
/// missing) is `failed` at the control plane with its agent's reason, which `kvfleet workers`
/// and the web UI show (`observed_error`).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_whose_engine_cannot_start_reports_why_to_the_control_plane() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let cp = ControlPlane::start(&db, "127.0.0.1:0".parse().unwrap(), LOST_AFTER).await;
    let admin = token(&db, Role::Admin).await;
    let join = token(&db, Role::Join).await;
    let state = temp_dir("state-engine-error");
    let tokenizer = temp_dir("tiny-llama-engine-error");
    kvfleet_model::tiny::write_tiny_llama(&tokenizer, Default::default(), 5).unwrap();
    let toml = Agent::config("e2e-node-engine", &cp, &join, &state, SETUP);
    let start = toml.find("[[models]]").unwrap();
    let end = toml.find("[control_plane]").unwrap();
    let local = format!(
        "[[models]]\nname = \"{MODEL}\"\nengine = \"llamacpp\"\npath = {:?}\n\
         command = \"/nonexistent/llama-server\"\ncontext_length = 256\nblock_size = 16\n",
        tokenizer.display().to_string()
    );
    let agent = Agent::launch(
        "e2e-node-engine",
        format!("{}{local}{}", &toml[..start], &toml[end..]),
    )
    .await;
    wait_nodes_healthy(&cp, &admin, &["e2e-node-engine"]).await;
    deploy(&cp, &admin, 1).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let seen = loop {
        let (_, body) = api(reqwest::Method::GET, &cp.url("/workers"), &admin, None).await;
        let failed = body["items"].as_array().and_then(|workers| {
            workers
                .iter()
                .find(|w| {
                    w["observed_state"] == "failed"
                        && w["observed_error"]
                            .as_str()
                            .is_some_and(|e| e.contains("llamacpp: cannot start"))
                })
                .cloned()
        });
        if let Some(worker) = failed {
            break worker;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no failed worker with its reason: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    println!("{seen}");
    agent.stop().await;
    cp.stop().await;
    db.drop_now().await;
    let _ = std::fs::remove_dir_all(state);
    let _ = std::fs::remove_dir_all(tokenizer);
}
