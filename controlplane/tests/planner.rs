//! The SLA planner on a real control plane and Postgres: deployment SLA fields, the GPU budget,
//! performance profiles, and the leader's loop turning heartbeat windows into decisions and
//! workers.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use kvfleet_controlplane::auth::Role;
use kvfleet_proto::api::WorkerWindow;
use kvfleet_proto::histogram::LatencyHistogram;
use kvfleet_proto::profile::PerfProfile;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use sqlx::PgPool;

/// The control plane's warnings and errors in the test's output (shown when it fails).
fn logs() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter("warn")
        .try_init();
}

fn planner_config() -> kvfleet_controlplane::Config {
    logs();
    let mut config = test_config();
    config.planner.interval = Duration::from_millis(400);
    config.planner.cooldown = Duration::from_secs(3);
    config.planner.lookahead = 1;
    config
}

async fn patch(server: &Server, path: &str, token: &str, body: Value) -> Response {
    call(Method::PATCH, &server.url(path), Some(token), Some(&body)).await
}

fn names(r: &Response) -> Vec<String> {
    r.body["invalid_params"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|p| p["name"].as_str().unwrap().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[sqlx::test(migrator = "kvfleet_controlplane::store::MIGRATOR")]
async fn sla_fields_are_validated_stored_patched_and_audited(pool: PgPool) {
    let server = start(&pool, test_config()).await;
    let operator = token(&pool, Role::Operator).await;
    let admin = token(&pool, Role::Admin).await;
    let m = post(
        &server,
        "/models",
        &operator,
        json!({"name": "m", "format": "mock", "path": "/m"}),
    )
    .await;
    assert_eq!(m.status, StatusCode::CREATED);
    // Every bad field is named, and nothing is created.
    let bad = post(
        &server,
        "/deployments",
        &operator,
        json!({"name": "bad", "model": "m", "max_workers": 4,
               "sla": {"ttft_ms": 0, "itl_ms": -5, "percentile": 100},
               "roles": {"prefill": {"min": 1, "max": 2}}}),
    )
    .await;
    assert_eq!(bad.status, StatusCode::UNPROCESSABLE_ENTITY, "{bad:?}");
    assert_eq!(
        names(&bad),
        [
            "sla.ttft_ms",
            "sla.itl_ms",
            "sla.percentile",
            "roles.prefill"
        ]
    );
    let bad = post(
        &server,
        "/deployments",
        &operator,
        json!({"name": "bad", "model": "m", "mode": "disaggregated", "max_workers": 4,
               "roles": {"prefill": {"min": 3, "max": 5}, "decode": {"min": 2, "max": 4}}}),
    )
    .await;
    assert_eq!(names(&bad), ["roles.prefill.max", "roles"], "{bad:?}");
    let bad = post(
        &server,
        "/deployments",
        &operator,
        json!({"name": "bad", "model": "m", "planner": "sometimes"}),
    )
    .await;
    assert_eq!(bad.status, StatusCode::UNPROCESSABLE_ENTITY, "{bad:?}");
    assert_eq!(names(&bad), ["planner"]);
    let none: i64 = sqlx::query_scalar("SELECT count(*) FROM deployments")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(none, 0);

    // Stored with the defaults filled in.
    let created = post(
        &server,
        "/deployments",
        &operator,
        json!({"name": "split", "model": "m", "mode": "disaggregated", "min_workers": 2,
               "max_workers": 8, "planner": "advise", "sla": {"ttft_ms": 500, "itl_ms": 30},
               "roles": {"prefill": {"min": 1, "max": 4}}}),
    )
    .await;
    assert_eq!(created.status, StatusCode::CREATED, "{created:?}");
    let id = created.body["id"].as_str().unwrap().to_owned();
    assert_eq!(created.body["planner"], "advise");
    assert_eq!(created.body["sla"]["percentile"], 90.0);
    assert_eq!(
        created.body["roles"]["prefill"],
        json!({"min": 1, "max": 4})
    );
    assert!(created.body["roles"].get("decode").is_none());

    // Patched: a new SLA keeps the percentile unless it names one; a bad patch changes nothing.
    let p = patch(
        &server,
        &format!("/deployments/{id}"),
        &operator,
        json!({"planner": "auto", "sla": {"ttft_ms": 400}}),
    )
    .await;
    assert_eq!(p.status, StatusCode::OK, "{p:?}");
    assert_eq!(p.body["planner"], "auto");
    assert_eq!(p.body["sla"]["ttft_ms"], 400);
    assert_eq!(p.body["sla"]["percentile"], 90.0);
    let p = patch(
        &server,
        &format!("/deployments/{id}"),
        &operator,
        json!({"sla": {"ttft_ms": 400, "percentile": 99}, "roles": {}}),
    )
    .await;
    assert_eq!(p.body["sla"]["percentile"], 99.0);
    assert!(p.body.get("roles").is_none() || p.body["roles"] == json!({}));
    let before = get(&server, &format!("/deployments/{id}"), &operator)
        .await
        .body;
    let bad = patch(
        &server,
        &format!("/deployments/{id}"),
        &operator,
        json!({"sla": {"itl_ms": 0}, "planner": "off"}),
    )
    .await;
    assert_eq!(names(&bad), ["sla.itl_ms"]);
    let mut after = get(&server, &format!("/deployments/{id}"), &operator)
        .await
        .body;
    // The planner, on since the first patch, may store its targets meanwhile, which touches
    // `updated_at` and nothing the API shows: everything else must be as it was.
    let mut before = before;
    for body in [&mut before, &mut after] {
        body.as_object_mut().unwrap().remove("updated_at");
    }
    assert_eq!(before, after, "a refused patch changes nothing");
    // Audited with before and after.
    let audit = get(&server, "/audit?action=deployment.update", &admin).await;
    let items = audit.body["items"].as_array().unwrap();
    assert_eq!(items.len(), 2, "one row per accepted patch: {audit:?}");
    let first = &items[1];
    assert_eq!(first["before"]["planner"], "advise");
    assert_eq!(first["after"]["planner"], "auto");
    assert_eq!(items[0]["after"]["sla"]["percentile"], 99.0);
    server.stop().await;
}

#[sqlx::test(migrator = "kvfleet_controlplane::store::MIGRATOR")]
async fn the_gpu_budget_must_cover_the_minimums(pool: PgPool) {
    let server = start(&pool, test_config()).await;
    let operator = token(&pool, Role::Operator).await;
    let admin = token(&pool, Role::Admin).await;
    let (_, a_id) = model_and_deployment(&server, &operator, "a", 3).await;
    post(
        &server,
        "/deployments",
        &operator,
        json!({"name": "b", "model": "a-model", "mode": "disaggregated", "min_workers": 1,
               "max_workers": 8, "roles": {"prefill": {"min": 2, "max": 4}}}),
    )
    .await;
    let s = get(&server, "/planner", &operator).await;
    assert_eq!(s.status, StatusCode::OK, "{s:?}");
    assert_eq!(s.body["gpu_budget"], Value::Null);
    assert_eq!(s.body["minimums"], 6, "3 + max(1, 2 + 1)");
    let bad = patch(&server, "/planner", &operator, json!({"gpu_budget": 5})).await;
    assert_eq!(bad.status, StatusCode::UNPROCESSABLE_ENTITY, "{bad:?}");
    assert_eq!(names(&bad), ["gpu_budget"]);
    let reason = bad.body["invalid_params"][0]["reason"].as_str().unwrap();
    assert!(
        reason.contains("a: 3") && reason.contains("b: 3"),
        "{reason}"
    );
    assert_eq!(
        get(&server, "/planner", &operator).await.body["gpu_budget"],
        Value::Null,
        "nothing changed"
    );
    let negative = patch(&server, "/planner", &operator, json!({"gpu_budget": -1})).await;
    assert_eq!(names(&negative), ["gpu_budget"], "{negative:?}");
    let ok = patch(&server, "/planner", &operator, json!({"gpu_budget": 6})).await;
    assert_eq!(ok.body["gpu_budget"], 6, "{ok:?}");
    // A patch that would push the minimums past the budget is refused and changes nothing.
    let a_path = format!("/deployments/{a_id}");
    let a = get(&server, &a_path, &operator).await.body;
    let over = patch(
        &server,
        &a_path,
        &operator,
        json!({"min_workers": 4, "max_workers": 4}),
    )
    .await;
    assert_eq!(over.status, StatusCode::UNPROCESSABLE_ENTITY, "{over:?}");
    assert_eq!(names(&over), ["min_workers"], "{over:?}");
    assert_eq!(
        get(&server, &a_path, &operator).await.body,
        a,
        "a refused patch changes nothing"
    );
    // A deployment that would push the minimums past the budget is refused at min_workers.
    let over = post(
        &server,
        "/deployments",
        &operator,
        json!({"name": "c", "model": "a-model", "min_workers": 1}),
    )
    .await;
    assert_eq!(names(&over), ["min_workers"], "{over:?}");
    assert!(
        over.body["invalid_params"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("gpu-budget")
    );
    let zero = post(
        &server,
        "/deployments",
        &operator,
        json!({"name": "c", "model": "a-model", "min_workers": 0}),
    )
    .await;
    assert_eq!(zero.status, StatusCode::CREATED, "{zero:?}");
    let cleared = patch(&server, "/planner", &operator, json!({"gpu_budget": null})).await;
    assert_eq!(cleared.body["gpu_budget"], Value::Null);
    let unchanged = patch(&server, "/planner", &operator, json!({})).await;
    assert_eq!(unchanged.status, StatusCode::OK);
    let bad = patch(&server, "/planner", &operator, json!({"budget": 3})).await;
    assert_eq!(names(&bad), ["budget"]);
    assert_eq!(audit_count(&pool, "planner.update").await, 2);
    let viewer = token(&pool, Role::Viewer).await;
    let refused = patch(&server, "/planner", &viewer, json!({"gpu_budget": 9})).await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    let _ = admin;
    server.stop().await;
}

fn mock_profile(model: &str) -> PerfProfile {
    let mut p = PerfProfile::from_toml_str(kvfleet_engine::DEFAULT_PERF_PROFILE_TOML).unwrap();
    p.model = model.to_owned();
    p
}

#[sqlx::test(migrator = "kvfleet_controlplane::store::MIGRATOR")]
async fn profiles_are_validated_stored_per_device_and_audited(pool: PgPool) {
    let server = start(&pool, test_config()).await;
    let operator = token(&pool, Role::Operator).await;
    let viewer = token(&pool, Role::Viewer).await;
    model_and_deployment(&server, &operator, "p", 1).await;
    let good = serde_json::to_value(mock_profile("p-model")).unwrap();
    // Malformed: a field missing.
    let mut malformed = good.clone();
    malformed.as_object_mut().unwrap().remove("decode");
    let r = post(&server, "/models/p-model/profiles", &operator, malformed).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{r:?}");
    // Non-monotone: more work taking less time.
    let mut slower = mock_profile("p-model");
    slower.decode.itl_ms[3][1] = 0.5;
    let slower = serde_json::to_value(&slower).unwrap();
    let r = post(
        &server,
        "/models/p-model/profiles",
        &operator,
        slower.clone(),
    )
    .await;
    assert_eq!(names(&r), ["decode.itl_ms[3][1]"], "{r:?}");
    // For another model.
    let r = post(
        &server,
        "/models/p-model/profiles",
        &operator,
        serde_json::to_value(mock_profile("llama-70b")).unwrap(),
    )
    .await;
    assert_eq!(names(&r), ["model"], "{r:?}");
    assert!(
        r.body["invalid_params"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("llama-70b")
    );
    let none: i64 = sqlx::query_scalar("SELECT count(*) FROM perf_profiles")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(none, 0, "nothing stored");
    // Stored, then replaced for the same device, a second device beside it.
    let r = post(&server, "/models/p-model/profiles", &operator, good.clone()).await;
    assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
    let id = r.body["id"].as_str().unwrap().to_owned();
    // A bad replacement (same model and device) leaves the stored profile as it was.
    let stored = get(&server, &format!("/profiles/{id}"), &viewer).await.body;
    let r = post(&server, "/models/p-model/profiles", &operator, slower).await;
    assert_eq!(names(&r), ["decode.itl_ms[3][1]"], "{r:?}");
    assert_eq!(
        get(&server, &format!("/profiles/{id}"), &viewer).await.body,
        stored
    );
    // A profile for a model that is not registered: 404, nothing stored.
    let r = post(&server, "/models/nobody/profiles", &operator, good.clone()).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{r:?}");
    let r = post(&server, "/models/p-model/profiles", &operator, good.clone()).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body["id"], id.as_str());
    let mut a100 = mock_profile("p-model");
    a100.device = "nvidia-a100".into();
    let r = post(
        &server,
        "/models/p-model/profiles",
        &operator,
        serde_json::to_value(&a100).unwrap(),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED);
    let list = get(&server, "/models/p-model/profiles", &viewer).await;
    assert_eq!(list.body.as_array().unwrap().len(), 2, "{list:?}");
    let one = get(&server, &format!("/profiles/{id}"), &viewer).await;
    assert_eq!(one.body["profile"]["model"], "p-model");
    assert_eq!(
        one.body["profile"],
        serde_json::to_value(mock_profile("p-model")).unwrap()
    );
    let refused = post(&server, "/models/p-model/profiles", &viewer, good).await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    let gone = call(
        Method::DELETE,
        &server.url(&format!("/profiles/{id}")),
        Some(&operator),
        None,
    )
    .await;
    assert_eq!(gone.status, StatusCode::NO_CONTENT);
    assert_eq!(
        get(&server, &format!("/profiles/{id}"), &viewer)
            .await
            .status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(audit_count(&pool, "profile.create").await, 2);
    assert_eq!(audit_count(&pool, "profile.update").await, 1);
    assert_eq!(audit_count(&pool, "profile.delete").await, 1);
    // The OpenAPI document describes the new endpoints.
    let doc = call(Method::GET, &server.url("/openapi.json"), None, None).await;
    for path in [
        "/api/v1/models/{id}/profiles",
        "/api/v1/profiles/{id}",
        "/api/v1/planner",
        "/api/v1/planner/decisions",
        "/api/v1/deployments/{id}/planner",
    ] {
        assert!(doc.body["paths"].get(path).is_some(), "{path}");
    }
    server.stop().await;
}

/// A heartbeat window of `requests` 8k-token prompts, each with a TTFT of `ttft_s` and 100
/// output tokens at 20 ms.
fn window(requests: u64, ttft_s: f64) -> Value {
    let mut ttft = LatencyHistogram::default();
    let mut itl = LatencyHistogram::default();
    for _ in 0..requests {
        ttft.observe_seconds(ttft_s);
        for _ in 0..10 {
            itl.observe_seconds(0.02);
        }
    }
    serde_json::to_value(WorkerWindow {
        seconds: 0.4,
        requests,
        prompt_tokens: requests * 8192,
        cached_tokens: 0,
        finished: requests,
        output_tokens: requests * 100,
        ttft,
        itl,
        queue_depth: 0,
        pending_prefill_tokens: 0,
        kv_blocks_used: 1000,
        kv_blocks_total: 26_624,
    })
    .unwrap()
}

async fn heartbeat(server: &Server, agent: &str, workers: &[Value], per_worker: u64) {
    let observed: Vec<Value> = workers
        .iter()
        .map(|w| json!({"worker_id": w["id"], "state": "ready", "window": window(per_worker, 0.3)}))
        .collect();
    let r = post(
        server,
        "/agent/heartbeat",
        agent,
        json!({ "workers": observed }),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
}

async fn running_workers(server: &Server, token: &str, deployment: &str) -> Vec<Value> {
    let r = get(
        server,
        &format!("/workers?deployment_id={deployment}"),
        token,
    )
    .await;
    r.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| w["desired_state"] == "running")
        .cloned()
        .collect()
}

#[sqlx::test(migrator = "kvfleet_controlplane::store::MIGRATOR")]
async fn the_leader_scales_an_auto_deployment_from_heartbeat_windows(pool: PgPool) {
    let server = start(&pool, planner_config()).await;
    let join = token(&pool, Role::Join).await;
    let viewer = token(&pool, Role::Viewer).await;
    let operator = token(&pool, Role::Operator).await;
    let (_node, agent, _) = register(&server, &join, "gpu-a", 6).await;
    post(&server, "/agent/heartbeat", &agent, json!({})).await;
    let model = post(
        &server,
        "/models",
        &operator,
        json!({"name": "mock-8b", "format": "mock", "path": "/m"}),
    )
    .await;
    assert_eq!(model.status, StatusCode::CREATED);
    // No uploaded profile: a mock model plans with the built-in mock profile.
    let d = post(
        &server,
        "/deployments",
        &operator,
        json!({"name": "chat", "model": "mock-8b", "min_workers": 1, "max_workers": 6,
               "planner": "auto", "sla": {"ttft_ms": 2000, "itl_ms": 40}}),
    )
    .await;
    assert_eq!(d.status, StatusCode::CREATED, "{d:?}");
    let id = d.body["id"].as_str().unwrap().to_owned();
    let workers = eventually(Duration::from_secs(10), "the first worker", || async {
        let w = running_workers(&server, &viewer, &id).await;
        (w.len() == 1).then_some(w)
    })
    .await;
    // Heavy load: 20 prompts of 8k tokens per 0.4 s window on one worker (50 req/s).
    let grown = eventually(
        Duration::from_secs(20),
        "the planner to add workers",
        || async {
            heartbeat(&server, &agent, &workers, 20).await;
            let w = running_workers(&server, &viewer, &id).await;
            (w.len() > 1).then_some(w)
        },
    )
    .await;
    let decisions = get(
        &server,
        "/planner/decisions?deployment=chat&changes_only=true",
        &viewer,
    )
    .await;
    assert_eq!(decisions.status, StatusCode::OK, "{decisions:?}");
    let up = &decisions.body["items"][0];
    assert_eq!(up["action"], "scale_up", "{decisions:?}");
    assert_eq!(up["applied"], true);
    assert!(
        up["reason"]
            .as_str()
            .unwrap()
            .starts_with("Scaling up aggregated workers 1 → "),
        "{up}"
    );
    assert!(up["detail"]["arithmetic"].as_array().unwrap().len() >= 3);
    assert!(
        up["detail"]["inputs"]["rate"].as_f64().unwrap() > 5.0,
        "{up}"
    );
    // The audit trail and the decisions timeline show it too.
    assert!(audit_count(&pool, "deployment.scale").await >= 1);
    let timeline = get(&server, "/decisions?source=planner", &viewer).await;
    assert_eq!(timeline.body["items"][0]["action"], "deployment.scale");
    // The series plots observed vs target and workers per role.
    let series = get(&server, &format!("/deployments/{id}/planner"), &viewer).await;
    let points = series.body.as_array().unwrap();
    assert!(!points.is_empty(), "{series:?}");
    let last = points.last().unwrap();
    assert_eq!(last["ttft_target_ms"], 2000.0);
    assert!(last["targets"]["aggregated"].as_i64().unwrap() > 1);

    // The load stops: after the (3 s) cooldown the extra workers drain, never just stop.
    let all = grown.clone();
    eventually(
        Duration::from_secs(30),
        "the planner to scale down",
        || async {
            heartbeat(&server, &agent, &all, 0).await;
            let w = running_workers(&server, &viewer, &id).await;
            (w.len() == 1).then_some(())
        },
    )
    .await;
    let drains = audit_count(&pool, "worker.drain").await;
    assert!(drains >= 1, "scale-down drains");
    let stopped_without_drain: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM audit_log WHERE action = 'worker.stop' AND after->>'reason' = 'scale down'
           AND target_id IN (SELECT id::text FROM workers WHERE observed_state = 'ready')",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        stopped_without_drain, 0,
        "no ready worker was stopped outright"
    );
    server.stop().await;
}

#[sqlx::test(migrator = "kvfleet_controlplane::store::MIGRATOR")]
async fn advise_records_and_a_new_leader_continues(pool: PgPool) {
    let first = start(&pool, planner_config()).await;
    let join = token(&pool, Role::Join).await;
    let viewer = token(&pool, Role::Viewer).await;
    let operator = token(&pool, Role::Operator).await;
    let (_node, agent, _) = register(&first, &join, "gpu-a", 4).await;
    post(&first, "/agent/heartbeat", &agent, json!({})).await;
    post(
        &first,
        "/models",
        &operator,
        json!({"name": "mock-8b", "format": "mock", "path": "/m"}),
    )
    .await;
    let d = post(
        &first,
        "/deployments",
        &operator,
        json!({"name": "chat", "model": "mock-8b", "min_workers": 1, "max_workers": 4,
               "planner": "advise", "sla": {"ttft_ms": 2000, "itl_ms": 40}}),
    )
    .await;
    let id = d.body["id"].as_str().unwrap().to_owned();
    let workers = eventually(Duration::from_secs(10), "the first worker", || async {
        let w = running_workers(&first, &viewer, &id).await;
        (w.len() == 1).then_some(w)
    })
    .await;
    // Advice to scale up is recorded, and nothing moves.
    eventually(Duration::from_secs(20), "advice to scale up", || async {
        heartbeat(&first, &agent, &workers, 20).await;
        let r = get(
            &first,
            "/planner/decisions?deployment=chat&changes_only=true",
            &viewer,
        )
        .await;
        let item = r.body["items"].as_array()?.first()?.clone();
        (item["action"] == "scale_up").then_some(item)
    })
    .await;
    assert_eq!(running_workers(&first, &viewer, &id).await.len(), 1);
    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM planner_decisions WHERE applied")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(applied, 0, "advise never applies");
    // The leader goes; another replica takes the loop over and continues from the stored
    // memory (its corrections, its scale-down history), losing no decision.
    first.stop().await;
    let before: i64 = sqlx::query_scalar("SELECT max(id) FROM planner_decisions")
        .fetch_one(&pool)
        .await
        .unwrap();
    let memory: Value = sqlx::query_scalar(
        "SELECT decision->'memory' FROM planner_decisions ORDER BY id DESC LIMIT 1",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    let second = start(&pool, planner_config()).await;
    let next: (i64, String, Value) = eventually(
        Duration::from_secs(20),
        "a decision by the new leader",
        || async {
            heartbeat(&second, &agent, &workers, 20).await;
            sqlx::query_as::<_, (i64, String, Value)>(
                "SELECT id, decided_by, decision FROM planner_decisions WHERE id > $1
                 ORDER BY id LIMIT 1",
            )
            .bind(before)
            .fetch_optional(&pool)
            .await
            .unwrap()
        },
    )
    .await;
    assert!(next.0 > before);
    assert_eq!(
        next.2["corrections"]["before"], memory["corrections"],
        "the new leader starts from the old one's corrections"
    );
    let ids: Vec<i64> = sqlx::query_scalar("SELECT id FROM planner_decisions ORDER BY id")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert!(
        ids.windows(2).all(|w| w[1] == w[0] + 1),
        "no decision lost: {ids:?}"
    );
    second.stop().await;
}
