//! The agent protocol and the leader's loops, over real HTTP and a real Postgres: register,
//! heartbeat, watch; liveness transitions; placement, drain and removal; leader failover;
//! fleet metrics; certificates.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use kvfleet_controlplane::auth::Role;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use sqlx::PgPool;

async fn node_state(server: &Server, token: &str, node: &str) -> String {
    get(server, &format!("/nodes/{node}"), token).await.body["state"]
        .as_str()
        .unwrap()
        .to_owned()
}

async fn workers_on(server: &Server, token: &str, node: &str) -> Vec<Value> {
    get(server, &format!("/workers?node_id={node}"), token)
        .await
        .body["items"]
        .as_array()
        .unwrap()
        .clone()
}

#[sqlx::test(migrator = "kvfleet_controlplane::store::MIGRATOR")]
async fn register_heartbeat_and_watch(pool: PgPool) {
    let server = start(&pool, test_config()).await;
    let join = token(&pool, Role::Join).await;
    let operator = token(&pool, Role::Operator).await;
    let (node, agent, registered) = register(&server, &join, "gpu-a", 2).await;
    assert_eq!(node_state(&server, &operator, &node).await, "joining");
    assert!(
        registered["certificate"]["cert_pem"]
            .as_str()
            .unwrap()
            .contains("BEGIN CERTIFICATE")
    );
    assert!(
        registered["certificate"]["private_key_pem"]
            .as_str()
            .unwrap()
            .contains("PRIVATE KEY")
    );
    assert_eq!(registered["heartbeat_interval_ms"], 200);
    // The join token registers nodes, nothing else; the credential is for this node only.
    assert_eq!(
        get(&server, "/nodes", &join).await.status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        get(&server, "/nodes", &agent).await.status,
        StatusCode::FORBIDDEN
    );
    // The same hostname cannot join twice while the first node lives.
    let again = post(&server, "/agent/register", &join, register_body("gpu-a", 0)).await;
    assert_eq!(again.status, StatusCode::CONFLICT, "{again:?}");

    let beat = post(&server, "/agent/heartbeat", &agent, json!({})).await;
    assert_eq!(beat.status, StatusCode::OK);
    assert_eq!(beat.body["node_state"], "healthy");
    let generation = beat.body["desired_generation"].as_i64().unwrap();

    // Nothing to run yet: the current state comes back at once.
    let desired = get(&server, "/agent/desired-state", &agent).await;
    assert_eq!(desired.body["workers"], json!([]));
    assert_eq!(desired.body["generation"], generation);
    // With the fleet's hash secret: derived from the sealing key file (what the harness reads
    // too), and in no admin or operator view of the node.
    let secret = desired.body["fleet_hash_secret"]
        .as_str()
        .unwrap()
        .to_owned();
    let expected =
        kvfleet_controlplane::ca_key::fleet_hash_secret(&test_config().ca.key_file).unwrap();
    assert_eq!(secret, expected.0);
    assert!(expected.key().is_some(), "long enough to key the hasher");
    for path in [
        "/nodes".to_owned(),
        format!("/nodes/{node}"),
        "/ca".to_owned(),
        "/status".to_owned(),
    ] {
        let r = get(&server, &path, &operator).await;
        assert!(!r.body.to_string().contains(&secret), "{path}: {r:?}");
    }

    // A watch parked on the current generation wakes when placement assigns a worker here.
    let watch_url = server.url(&format!(
        "/agent/desired-state?after_generation={generation}&wait_s=10"
    ));
    let agent2 = agent.clone();
    let watch =
        tokio::spawn(async move { call(Method::GET, &watch_url, Some(&agent2), None).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!watch.is_finished(), "the watch must wait for a change");
    let started = tokio::time::Instant::now();
    let (_, deployment) = model_and_deployment(&server, &operator, "chat", 2).await;
    let woke = tokio::time::timeout(Duration::from_secs(8), watch)
        .await
        .unwrap()
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(
        woke.body["generation"].as_i64().unwrap() > generation,
        "{woke:?}"
    );
    let workers = woke.body["workers"].as_array().unwrap();
    assert!(!workers.is_empty());
    assert_eq!(workers[0]["deployment_id"], deployment.as_str());
    assert_eq!(workers[0]["model"]["name"], "chat-model");
    assert_eq!(workers[0]["desired_state"], "running");

    // Both GPUs get a worker eventually; the agent reports them ready with metrics.
    let placed = eventually(Duration::from_secs(5), "two workers", || async {
        let d = get(&server, "/agent/desired-state", &agent).await;
        let w = d.body["workers"].as_array().unwrap().clone();
        (w.len() == 2).then_some(w)
    })
    .await;
    let gpus: Vec<&Value> = placed.iter().map(|w| &w["gpu_id"]).collect();
    assert_ne!(gpus[0], gpus[1], "one worker per GPU");
    let observed: Vec<Value> = placed
        .iter()
        .map(|w| json!({"worker_id": w["worker_id"], "state": "ready", "metrics": {
            "request_rate": 2.0, "ttft_p50_ms": 80.0, "ttft_p99_ms": 200.0, "tokens_per_s": 150.0,
            "kv_blocks_used": 100, "kv_blocks_total": 1000, "prefix_hit_rate": 0.5, "gpu_utilization": 0.7}}))
        .collect();
    let beat = post(
        &server,
        "/agent/heartbeat",
        &agent,
        json!({"workers": observed}),
    )
    .await;
    assert_eq!(beat.status, StatusCode::OK, "{beat:?}");
    for w in workers_on(&server, &operator, &node).await {
        assert_eq!(w["observed_state"], "ready");
    }
    // An agent cannot report on workers of another node.
    let (_, other_agent, _) = register(&server, &join, "gpu-b", 0).await;
    let foreign = json!({"workers": [{"worker_id": placed[0]["worker_id"], "state": "failed"}]});
    assert_eq!(
        post(&server, "/agent/heartbeat", &other_agent, foreign)
            .await
            .status,
        StatusCode::OK
    );
    let w = get(
        &server,
        &format!("/workers/{}", placed[0]["worker_id"]),
        &operator,
    )
    .await;
    assert_eq!(w.body["observed_state"], "ready");

    // Bad heartbeats are problems naming the field.
    let bad = post(
        &server,
        "/agent/heartbeat",
        &agent,
        json!({"workers": [{"worker_id": 1, "state": "dancing"}]}),
    )
    .await;
    assert_eq!(bad.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(bad.body["invalid_params"][0]["name"], "workers[0].state");
    let bad = post(&server, "/agent/heartbeat", &agent, json!({"workers": [{"worker_id": 1, "state": "ready", "metrics": {"request_rate": -1.0, "tokens_per_s": 0.0, "kv_blocks_used": 0, "kv_blocks_total": 0}}]})).await;
    assert_eq!(bad.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(bad.body["invalid_params"][0]["name"], "workers[0].metrics");

    // Re-registering with the credential keeps the node id and issues no new credential.
    let again = post(
        &server,
        "/agent/register",
        &agent,
        register_body("gpu-a", 2),
    )
    .await;
    assert_eq!(again.status, StatusCode::OK, "{again:?}");
    assert_eq!(again.body["node_id"], node.as_str());
    assert!(again.body["credential"].is_null());
    server.stop().await;
}

#[sqlx::test(migrator = "kvfleet_controlplane::store::MIGRATOR")]
async fn silent_nodes_become_unhealthy_then_lost_and_their_workers_move(pool: PgPool) {
    let mut config = test_config();
    short_liveness(&mut config);
    let server = start(&pool, config).await;
    let join = token(&pool, Role::Join).await;
    let operator = token(&pool, Role::Operator).await;
    let (quiet, quiet_agent, _) = register(&server, &join, "quiet", 1).await;
    post(&server, "/agent/heartbeat", &quiet_agent, json!({})).await;
    model_and_deployment(&server, &operator, "chat", 1).await;
    let first = eventually(
        Duration::from_secs(5),
        "a worker on the quiet node",
        || async {
            workers_on(&server, &operator, &quiet)
                .await
                .first()
                .cloned()
        },
    )
    .await;
    // A second node keeps heartbeating; the first goes silent.
    let (busy, busy_agent, _) = register(&server, &join, "busy", 1).await;
    let beating = tokio::spawn({
        let url = server.url("/agent/heartbeat");
        async move {
            loop {
                call(Method::POST, &url, Some(&busy_agent), Some(&json!({}))).await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });
    eventually(Duration::from_secs(5), "unhealthy", || async {
        (node_state(&server, &operator, &quiet).await == "unhealthy").then_some(())
    })
    .await;
    eventually(Duration::from_secs(5), "lost", || async {
        (node_state(&server, &operator, &quiet).await == "lost").then_some(())
    })
    .await;
    assert_eq!(node_state(&server, &operator, &busy).await, "healthy");
    // The lost node's worker is marked lost, stopped, and replaced on the healthy node.
    let moved = eventually(Duration::from_secs(5), "a replacement", || async {
        workers_on(&server, &operator, &busy).await.first().cloned()
    })
    .await;
    assert_ne!(moved["id"], first["id"]);
    let old = get(&server, &format!("/workers/{}", first["id"]), &operator).await;
    assert_eq!(old.body["observed_state"], "lost");
    assert_eq!(old.body["desired_state"], "stopped");
    assert_eq!(audit_count(&pool, "node.unhealthy").await, 1);
    assert_eq!(audit_count(&pool, "node.lost").await, 1);
    // A heartbeat brings the node back.
    let back = post(&server, "/agent/heartbeat", &quiet_agent, json!({})).await;
    assert_eq!(back.body["node_state"], "healthy");
    assert_eq!(
        audit_count(&pool, "node.healthy").await,
        3,
        "quiet twice (joining, lost) and busy once"
    );
    beating.abort();
    server.stop().await;
}

#[sqlx::test(migrator = "kvfleet_controlplane::store::MIGRATOR")]
async fn a_control_plane_outage_does_not_make_every_node_lost(pool: PgPool) {
    let mut config = test_config();
    short_liveness(&mut config);
    let server = start(&pool, config.clone()).await;
    let join = token(&pool, Role::Join).await;
    let operator = token(&pool, Role::Operator).await;
    let (node, agent, _) = register(&server, &join, "patient", 1).await;
    post(&server, "/agent/heartbeat", &agent, json!({})).await;
    assert_eq!(node_state(&server, &operator, &node).await, "healthy");
    server.stop().await;
    // The whole control plane was down for an hour: the node's last heartbeat is that old.
    sqlx::query("UPDATE nodes SET last_heartbeat_at = now() - interval '1 hour'")
        .execute(&pool)
        .await
        .unwrap();
    let server = start(&pool, config).await;
    // Several liveness passes run in this time (every 100 ms), well before `unhealthy_after`
    // counted from the restart; silence from the old heartbeat would say "lost" at once.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(node_state(&server, &operator, &node).await, "healthy");
    // A node that stays silent after the restart still goes unhealthy, then lost.
    eventually(Duration::from_secs(5), "lost after the restart", || async {
        (node_state(&server, &operator, &node).await == "lost").then_some(())
    })
    .await;
    server.stop().await;
}

#[sqlx::test(migrator = "kvfleet_controlplane::store::MIGRATOR")]
async fn drain_moves_workers_and_remove_revokes_the_node(pool: PgPool) {
    let server = start(&pool, test_config()).await;
    let join = token(&pool, Role::Join).await;
    let admin = token(&pool, Role::Admin).await;
    let (a, agent_a, reg_a) = register(&server, &join, "node-a", 1).await;
    post(&server, "/agent/heartbeat", &agent_a, json!({})).await;
    model_and_deployment(&server, &admin, "chat", 1).await;
    let first = eventually(Duration::from_secs(5), "placed on a", || async {
        workers_on(&server, &admin, &a).await.first().cloned()
    })
    .await;
    let (b, agent_b, _) = register(&server, &join, "node-b", 1).await;
    post(&server, "/agent/heartbeat", &agent_b, json!({})).await;
    // Cordon: nothing moves. Drain: a replacement starts on b, the old worker drains.
    let r = post(&server, &format!("/nodes/{a}/cordon"), &admin, json!({})).await;
    assert_eq!(r.body["cordoned"], true);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(workers_on(&server, &admin, &b).await.is_empty());
    let r = post(&server, &format!("/nodes/{a}/drain"), &admin, json!({})).await;
    assert_eq!(r.body["draining"], true);
    eventually(Duration::from_secs(5), "replacement on b", || async {
        workers_on(&server, &admin, &b).await.first().cloned()
    })
    .await;
    let desired = get(&server, "/agent/desired-state", &agent_a).await;
    assert_eq!(desired.body["draining"], true);
    assert_eq!(desired.body["workers"][0]["desired_state"], "draining");
    // The agent reports the drained worker stopped; placement stops it for good.
    post(
        &server,
        "/agent/heartbeat",
        &agent_a,
        json!({"workers": [{"worker_id": first["id"], "state": "stopped"}]}),
    )
    .await;
    eventually(Duration::from_secs(5), "old worker stopped", || async {
        let d = get(&server, "/agent/desired-state", &agent_a).await;
        d.body["workers"]
            .as_array()
            .unwrap()
            .is_empty()
            .then_some(())
    })
    .await;

    // Removing b: its credential stops working, its certificates are revoked, its worker moves
    // back to a once a is uncordoned.
    let serial = reg_a["certificate"]["serial"].as_str().unwrap().to_owned();
    let r = call(
        Method::DELETE,
        &server.url(&format!("/nodes/{b}")),
        Some(&admin),
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body["state"], "removed");
    assert_eq!(
        post(&server, "/agent/heartbeat", &agent_b, json!({}))
            .await
            .status,
        StatusCode::UNAUTHORIZED
    );
    let ca = call(Method::GET, &server.url("/ca"), None, None).await;
    let revoked = ca.body["revoked_serials"].as_array().unwrap();
    assert_eq!(revoked.len(), 1);
    assert_ne!(
        revoked[0],
        serial.as_str(),
        "node a's certificate stays valid"
    );
    let r = post(&server, &format!("/nodes/{a}/uncordon"), &admin, json!({})).await;
    assert_eq!(
        (r.body["cordoned"].clone(), r.body["draining"].clone()),
        (json!(false), json!(false))
    );
    eventually(Duration::from_secs(5), "back on a", || async {
        workers_on(&server, &admin, &a).await.first().cloned()
    })
    .await;
    // The hostname of a removed node may join again, as a new node.
    let (b2, _, _) = register(&server, &join, "node-b", 0).await;
    assert_ne!(b2, b);
    // Modifying a removed node is a conflict.
    let r = post(&server, &format!("/nodes/{b}/cordon"), &admin, json!({})).await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    server.stop().await;
}

#[sqlx::test(migrator = "kvfleet_controlplane::store::MIGRATOR")]
async fn another_replica_takes_over_when_the_leader_goes(pool: PgPool) {
    let config = test_config();
    let first = start(&pool, config.clone()).await;
    eventually(Duration::from_secs(5), "a leader", || async {
        first.state.is_leader().then_some(())
    })
    .await;
    let second = start(&pool, config).await;
    // Only one leader at a time.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(first.state.is_leader() && !second.state.is_leader());
    let status = call(Method::GET, &second.url("/status"), None, None).await;
    assert_eq!(status.body["leader"], false);

    let join = token(&pool, Role::Join).await;
    let operator = token(&pool, Role::Operator).await;
    let (node, agent, _) = register(&second, &join, "gpu-a", 2).await;
    post(&second, "/agent/heartbeat", &agent, json!({})).await;
    model_and_deployment(&second, &operator, "one", 1).await;
    eventually(
        Duration::from_secs(5),
        "placement by the first leader",
        || async { (workers_on(&second, &operator, &node).await.len() == 1).then_some(()) },
    )
    .await;

    // A watch held on the follower wakes for a change the leader makes (NOTIFY crosses replicas).
    let desired = get(&second, "/agent/desired-state", &agent).await.body;
    let generation = desired["generation"].as_i64().unwrap();
    // Every replica derives the same fleet hash secret from the shared sealing key.
    assert_eq!(
        desired["fleet_hash_secret"],
        get(&first, "/agent/desired-state", &agent).await.body["fleet_hash_secret"]
    );
    assert!(desired["fleet_hash_secret"].is_string());
    let url = second.url(&format!(
        "/agent/desired-state?after_generation={generation}&wait_s=10"
    ));
    let agent2 = agent.clone();
    let watch = tokio::spawn(async move { call(Method::GET, &url, Some(&agent2), None).await });
    tokio::time::sleep(Duration::from_millis(200)).await;

    let dropped_at = tokio::time::Instant::now();
    first.stop().await;
    eventually(
        Duration::from_secs(5),
        "the second replica to lead",
        || async { second.state.is_leader().then_some(()) },
    )
    .await;
    let takeover = dropped_at.elapsed();
    assert!(takeover < Duration::from_secs(3), "took {takeover:?}");
    // Placement goes on under the new leader.
    model_and_deployment(&second, &operator, "two", 1).await;
    eventually(
        Duration::from_secs(5),
        "placement by the new leader",
        || async { (workers_on(&second, &operator, &node).await.len() == 2).then_some(()) },
    )
    .await;
    let woke = tokio::time::timeout(Duration::from_secs(10), watch)
        .await
        .unwrap()
        .unwrap();
    assert!(woke.body["generation"].as_i64().unwrap() > generation);
    second.stop().await;
}

#[sqlx::test(migrator = "kvfleet_controlplane::store::MIGRATOR")]
async fn heartbeat_metrics_are_served_per_worker_and_deployment(pool: PgPool) {
    let config = test_config();
    let server = start(&pool, config.clone()).await;
    let join = token(&pool, Role::Join).await;
    let viewer = token(&pool, Role::Viewer).await;
    let operator = token(&pool, Role::Operator).await;
    let (node, agent, _) = register(&server, &join, "gpu-a", 2).await;
    post(&server, "/agent/heartbeat", &agent, json!({})).await;
    let (_, deployment) = model_and_deployment(&server, &operator, "chat", 2).await;
    let workers = eventually(Duration::from_secs(5), "two workers", || async {
        let w = workers_on(&server, &viewer, &node).await;
        (w.len() == 2).then_some(w)
    })
    .await;
    for round in 0..3 {
        let observed: Vec<Value> = workers
            .iter()
            .enumerate()
            .map(|(i, w)| {
                json!({"worker_id": w["id"], "state": "ready", "metrics": {
                    "request_rate": 1.0 + i as f64, "ttft_p50_ms": 100.0, "ttft_p99_ms": 100.0 * (i as f64 + 1.0) + round as f64,
                    "tokens_per_s": 10.0, "kv_blocks_used": 10, "kv_blocks_total": 100}})
            })
            .collect();
        let r = post(
            &server,
            "/agent/heartbeat",
            &agent,
            json!({"workers": observed}),
        )
        .await;
        assert_eq!(r.status, StatusCode::OK);
    }
    let d = get(
        &server,
        &format!("/metrics/deployments/{deployment}?step_s=3600"),
        &viewer,
    )
    .await;
    assert_eq!(d.status, StatusCode::OK, "{d:?}");
    assert_eq!(d.body["source"], "raw");
    let points = d.body["points"].as_array().unwrap();
    assert_eq!(points.len(), 1, "{d:?}");
    let p = &points[0];
    assert_eq!(p["workers"], 2);
    assert_eq!(p["request_rate"], 3.0, "summed over workers");
    assert_eq!(p["tokens_per_s"], 20.0);
    assert_eq!(p["kv_blocks_used"], 20.0);
    assert_eq!(p["ttft_p99_ms"], 202.0, "the worst worker's p99");
    let w = get(
        &server,
        &format!("/metrics/workers/{}?step_s=3600", workers[0]["id"]),
        &viewer,
    )
    .await;
    assert_eq!(w.body["points"][0]["request_rate"], 1.0);
    assert_eq!(w.body["points"][0]["workers"], 1);
    let bad = get(
        &server,
        &format!("/metrics/workers/{}?step_s=0", workers[0]["id"]),
        &viewer,
    )
    .await;
    assert_eq!(bad.body["invalid_params"][0]["name"], "step_s");

    // Downsampling: once the raw rows are old, maintenance rolls them up and expires them, and
    // long windows read the rollups.
    sqlx::query("UPDATE worker_metrics SET at = at - interval '3 hours'")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("DELETE FROM metrics_rollup_state")
        .execute(&pool)
        .await
        .unwrap();
    // Fenced: run under the epoch this replica leads with.
    let fence = server.state.fence().expect("the only replica leads");
    let (buckets, deleted) =
        kvfleet_controlplane::metrics::maintain(&pool, &config.metrics, &fence)
            .await
            .unwrap();
    // Two workers' samples, in one bucket each (two if a minute boundary fell between rounds).
    assert!((2..=4).contains(&buckets), "{buckets}");
    assert_eq!(deleted, 6);
    let raw_left: i64 = sqlx::query_scalar("SELECT count(*) FROM worker_metrics")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(raw_left, 0);
    let since = (chrono::Utc::now() - chrono::Duration::hours(4)).to_rfc3339();
    let since = since.replace('+', "%2B");
    let d = get(
        &server,
        &format!("/metrics/deployments/{deployment}?step_s=864000&since={since}"),
        &viewer,
    )
    .await;
    assert_eq!(d.body["source"], "rollup", "{d:?}");
    assert_eq!(d.body["points"][0]["request_rate"], 3.0);
    server.stop().await;
}

#[sqlx::test(migrator = "kvfleet_controlplane::store::MIGRATOR")]
async fn certificates_sign_the_agents_key_and_renew(pool: PgPool) {
    use base64::Engine as _;
    let server = start(&pool, test_config()).await;
    let join = token(&pool, Role::Join).await;
    let key = rcgen::KeyPair::generate().unwrap();
    let public = base64::engine::general_purpose::STANDARD.encode(key.public_key_raw());
    let mut body = register_body("gpu-a", 0);
    body["public_key"] = json!({"algorithm": "ecdsa_p256", "public_key": public});
    let r = post(&server, "/agent/register", &join, body).await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    assert!(
        r.body["certificate"]["private_key_pem"].is_null(),
        "the key never leaves the agent"
    );
    let ca = call(Method::GET, &server.url("/ca"), None, None).await;
    assert_eq!(r.body["certificate"]["ca_cert_pem"], ca.body["cert_pem"]);
    let agent = r.body["credential"].as_str().unwrap().to_owned();
    let renewed = post(
        &server,
        "/agent/certificate",
        &agent,
        json!({"public_key": {"algorithm": "ecdsa_p256", "public_key": public}}),
    )
    .await;
    assert_eq!(renewed.status, StatusCode::OK);
    assert_ne!(renewed.body["serial"], r.body["certificate"]["serial"]);
    let bad = post(
        &server,
        "/agent/certificate",
        &agent,
        json!({"public_key": {"algorithm": "ed25519", "public_key": "AAAA"}}),
    )
    .await;
    assert_eq!(bad.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        bad.body["invalid_params"][0]["name"],
        "public_key.public_key"
    );
    // The CA survives a restart: a second replica serves the same CA.
    let other = start(&pool, test_config()).await;
    let again = call(Method::GET, &other.url("/ca"), None, None).await;
    assert_eq!(again.body["cert_pem"], ca.body["cert_pem"]);
    other.stop().await;
    server.stop().await;
}

#[sqlx::test(migrator = "kvfleet_controlplane::store::MIGRATOR")]
async fn shutdown_answers_long_polls_instead_of_waiting_them_out(pool: PgPool) {
    let mut config = test_config();
    config.watch.max_wait = Duration::from_secs(60);
    let server = start(&pool, config).await;
    let join = token(&pool, Role::Join).await;
    let (_, agent, registered) = register(&server, &join, "gpu-a", 0).await;
    let generation = registered["desired_generation"].as_i64().unwrap();
    let url = server.url(&format!(
        "/agent/desired-state?after_generation={generation}&wait_s=60"
    ));
    let watch = tokio::spawn(async move { call(Method::GET, &url, Some(&agent), None).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = tokio::time::Instant::now();
    server.stop().await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "stop took {:?}",
        started.elapsed()
    );
    let answered = tokio::time::timeout(Duration::from_secs(5), watch)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(answered.status, StatusCode::OK);
    assert_eq!(answered.body["generation"], generation);
}

/// The DER inside a PEM block.
fn pem_der(pem: &str) -> Vec<u8> {
    use base64::Engine as _;
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    base64::engine::general_purpose::STANDARD
        .decode(body)
        .unwrap()
}

/// A peer certificate is what QUIC mTLS will check: rustls's WebPKI verifiers accept it as a
/// client certificate and as a server certificate for the node's names, chained to the node
/// CA, and refuse it under another CA or another name.
#[sqlx::test(migrator = "kvfleet_controlplane::store::MIGRATOR")]
async fn peer_certificates_verify_with_rustls_for_client_and_server_auth(pool: PgPool) {
    use rustls::client::danger::ServerCertVerifier as _;
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    use std::sync::Arc;

    let server = start(&pool, test_config()).await;
    let join = token(&pool, Role::Join).await;
    let mut body = register_body("gpu-a", 0);
    body["addresses"] = json!(["10.1.2.3"]);
    let r = post(&server, "/agent/register", &join, body).await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    let node = r.body["node_id"].as_str().unwrap().to_owned();
    let cert = CertificateDer::from(pem_der(r.body["certificate"]["cert_pem"].as_str().unwrap()));
    let ca = CertificateDer::from(pem_der(
        r.body["certificate"]["ca_cert_pem"].as_str().unwrap(),
    ));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca).unwrap();
    let roots = Arc::new(roots);
    let now = UnixTime::now();

    let clients = rustls::server::WebPkiClientVerifier::builder_with_provider(
        roots.clone(),
        provider.clone(),
    )
    .build()
    .unwrap();
    clients
        .verify_client_cert(&cert, &[], now)
        .expect("valid client certificate");
    let servers =
        rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
            .build()
            .unwrap();
    for name in [
        format!("{node}.node.kvfleet"),
        "gpu-a".to_owned(),
        "10.1.2.3".to_owned(),
    ] {
        let name = ServerName::try_from(name.clone()).unwrap();
        servers
            .verify_server_cert(&cert, &[], &name, &[], now)
            .unwrap_or_else(|e| panic!("{name:?}: {e}"));
    }
    let wrong = ServerName::try_from("gpu-b").unwrap();
    assert!(
        servers
            .verify_server_cert(&cert, &[], &wrong, &[], now)
            .is_err()
    );

    // Another fleet's CA does not vouch for this node.
    let (other_ca, _) = kvfleet_controlplane::ca::NodeCa::generate(
        "other",
        chrono::Utc::now(),
        Duration::from_secs(86_400),
    )
    .unwrap();
    let mut other_roots = rustls::RootCertStore::empty();
    other_roots
        .add(CertificateDer::from(pem_der(other_ca.cert_pem())))
        .unwrap();
    let other = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(other_roots),
        provider,
    )
    .build()
    .unwrap();
    assert!(other.verify_client_cert(&cert, &[], now).is_err());
    server.stop().await;
}

/// An agent holding a generation the server no longer has (a database restored from backup)
/// gets the server's state at once instead of waiting for a number it may never reach.
#[sqlx::test(migrator = "kvfleet_controlplane::store::MIGRATOR")]
async fn a_watch_from_the_future_returns_at_once(pool: PgPool) {
    let server = start(&pool, test_config()).await;
    let join = token(&pool, Role::Join).await;
    let (_, agent, registered) = register(&server, &join, "gpu-a", 0).await;
    let generation = registered["desired_generation"].as_i64().unwrap();
    let started = tokio::time::Instant::now();
    let r = get(
        &server,
        &format!(
            "/agent/desired-state?after_generation={}&wait_s=30",
            generation + 100
        ),
        &agent,
    )
    .await;
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(r.body["generation"], generation);
    server.stop().await;
}

/// The leader's lock connection killed from the database side (what Postgres does to a
/// partitioned leader once its keepalives fail): a replica takes over within the lease with a
/// higher epoch, and the old leader's fenced writes are refused, whatever it still believes.
#[sqlx::test(migrator = "kvfleet_controlplane::store::MIGRATOR")]
async fn a_deposed_leaders_writes_are_refused(pool: PgPool) {
    use kvfleet_controlplane::leader::{self, LeaderError};

    let config = test_config();
    let first = start(&pool, config.clone()).await;
    let old = eventually(Duration::from_secs(5), "a leader", || async {
        first.state.fence()
    })
    .await;
    let second = start(&pool, config.clone()).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(second.state.fence(), None, "one leader at a time");

    // The session holding the leader's advisory lock (a bigint key: classid is its high half,
    // objid its low half) in this test's database.
    let key = leader::LEADER_LOCK_KEY;
    let killed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (
             SELECT pg_terminate_backend(pid) FROM pg_locks
             WHERE locktype = 'advisory' AND granted AND objsubid = 1
               AND classid::int8 = $1 AND objid::int8 = $2
               AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
         ) t",
    )
    .bind(key >> 32)
    .bind(key & 0xffff_ffff)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(killed, 1, "the leader's lock session");
    let killed_at = tokio::time::Instant::now();

    // Whichever replica wins the lock next, it leads with a newer epoch, within the lease.
    let new = eventually(Duration::from_secs(5), "a new leader", || async {
        [first.state.fence(), second.state.fence()]
            .into_iter()
            .flatten()
            .find(|f| f.epoch > old.epoch)
    })
    .await;
    assert!(
        killed_at.elapsed() < config.leader.lease,
        "took {:?}",
        killed_at.elapsed()
    );

    // The old leader's writes: refused in their own transaction.
    let refused = leader::placement_pass(&pool, &config.placement, &old).await;
    assert!(
        matches!(refused, Err(LeaderError::Deposed { held, current })
            if held == old.epoch && current == new.epoch),
        "{refused:?}"
    );
    // The new leader's go through.
    leader::placement_pass(&pool, &config.placement, &new)
        .await
        .unwrap();
    // Metrics maintenance (rollups, pruning) and the stored responses' sweep likewise.
    let refused = kvfleet_controlplane::metrics::maintain(&pool, &config.metrics, &old).await;
    assert!(
        matches!(refused, Err(LeaderError::Deposed { held, current })
            if held == old.epoch && current == new.epoch),
        "{refused:?}"
    );
    let refused = kvfleet_controlplane::api::responses::sweep(&pool, &old).await;
    assert!(
        matches!(refused, Err(LeaderError::Deposed { .. })),
        "{refused:?}"
    );
    kvfleet_controlplane::metrics::maintain(&pool, &config.metrics, &new)
        .await
        .unwrap();
    kvfleet_controlplane::api::responses::sweep(&pool, &new)
        .await
        .unwrap();
    // The old one may still believe it leads for up to a check interval (exactly the window
    // the fence covers); then it steps down and one replica leads.
    eventually(Duration::from_secs(3), "a single leader", || async {
        let leaders = [first.state.is_leader(), second.state.is_leader()];
        (leaders.iter().filter(|l| **l).count() == 1).then_some(())
    })
    .await;
    first.stop().await;
    second.stop().await;
}
