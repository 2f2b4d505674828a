//! The REST API over real HTTP against a real Postgres: the authorization matrix with its audit
//! rows, validation and problem JSON, paging, the OpenAPI document, tokens and bootstrap.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use kvfleet_controlplane::auth::Role;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use sqlx::PgPool;

/// What a route needs before it runs.
#[derive(Debug, Clone, Copy)]
enum Prep {
    None,
    /// A node nobody else uses (for removal).
    FreshNode,
    /// A fresh node waiting for an admin's approval (to approve or reject).
    PendingNode,
    FreshModel,
    FreshDeployment,
    FreshToken,
    FreshProfile,
    /// A stored response (`/agent/responses/{id}`).
    FreshResponse,
}

/// How the authorization matrix calls a route: the served OpenAPI document says who may call it
/// (`x-kvfleet-roles`); this table says what to send and what a permitted call returns. Every
/// operation of the document must have an entry (a route without one fails the matrix).
struct Route {
    method: Method,
    /// `{node}`, `{gpu}`, `{worker}`, `{model}`, `{deployment}`, `{profile}`, `{fresh}` are
    /// substituted.
    path: &'static str,
    prep: Prep,
    success: StatusCode,
    /// The audit action a successful call must write.
    audit: Option<&'static str>,
}

fn route(method: Method, path: &'static str, success: u16, audit: Option<&'static str>) -> Route {
    Route {
        method,
        path,
        prep: Prep::None,
        success: StatusCode::from_u16(success).unwrap(),
        audit,
    }
}

fn routes() -> Vec<Route> {
    let with = |mut r: Route, prep| {
        r.prep = prep;
        r
    };
    vec![
        route(Method::GET, "/openapi.json", 200, None),
        route(Method::GET, "/status", 200, None),
        route(Method::GET, "/ca", 200, None),
        route(Method::GET, "/nodes", 200, None),
        route(Method::GET, "/kv/stats", 200, None),
        route(Method::GET, "/kv/workers", 200, None),
        route(Method::GET, "/nodes/{node}", 200, None),
        route(
            Method::POST,
            "/nodes/{node}/cordon",
            200,
            Some("node.cordon"),
        ),
        route(
            Method::POST,
            "/nodes/{node}/uncordon",
            200,
            Some("node.uncordon"),
        ),
        route(Method::POST, "/nodes/{node}/drain", 200, Some("node.drain")),
        with(
            route(Method::DELETE, "/nodes/{fresh}", 200, Some("node.remove")),
            Prep::FreshNode,
        ),
        with(
            route(
                Method::POST,
                "/nodes/{fresh}/approve",
                200,
                Some("node.approve"),
            ),
            Prep::PendingNode,
        ),
        with(
            route(
                Method::POST,
                "/nodes/{fresh}/reject",
                200,
                Some("node.reject"),
            ),
            Prep::PendingNode,
        ),
        route(
            Method::POST,
            "/nodes/{node}/labels",
            200,
            Some("node.labels"),
        ),
        route(Method::GET, "/gpus", 200, None),
        route(Method::GET, "/gpus/{gpu}", 200, None),
        route(Method::GET, "/workers", 200, None),
        route(Method::GET, "/workers/{worker}", 200, None),
        route(Method::GET, "/models", 200, None),
        route(Method::POST, "/models", 201, Some("model.create")),
        route(Method::GET, "/models/{model}", 200, None),
        with(
            route(Method::DELETE, "/models/{fresh}", 204, Some("model.delete")),
            Prep::FreshModel,
        ),
        route(Method::GET, "/deployments", 200, None),
        route(Method::POST, "/deployments", 201, Some("deployment.create")),
        route(Method::GET, "/deployments/{deployment}", 200, None),
        route(
            Method::PATCH,
            "/deployments/{deployment}",
            200,
            Some("deployment.update"),
        ),
        with(
            route(
                Method::DELETE,
                "/deployments/{fresh}",
                204,
                Some("deployment.delete"),
            ),
            Prep::FreshDeployment,
        ),
        route(Method::GET, "/tokens", 200, None),
        route(Method::POST, "/tokens", 201, Some("token.create")),
        with(
            route(Method::DELETE, "/tokens/{fresh}", 200, Some("token.revoke")),
            Prep::FreshToken,
        ),
        route(Method::GET, "/audit", 200, None),
        route(Method::GET, "/whoami", 200, None),
        route(Method::GET, "/decisions", 200, None),
        route(Method::GET, "/metrics/workers/{worker}", 200, None),
        route(Method::GET, "/metrics/deployments/{deployment}", 200, None),
        route(Method::POST, "/agent/register", 200, Some("node.register")),
        route(Method::POST, "/agent/heartbeat", 200, None),
        route(Method::GET, "/agent/desired-state", 200, None),
        route(Method::GET, "/agent/fleet", 200, None),
        route(
            Method::POST,
            "/agent/certificate",
            200,
            Some("certificate.renew"),
        ),
        route(Method::GET, "/planner", 200, None),
        route(Method::PATCH, "/planner", 200, Some("planner.update")),
        route(Method::GET, "/planner/decisions", 200, None),
        route(Method::GET, "/deployments/{deployment}/planner", 200, None),
        route(Method::GET, "/models/{model}/profiles", 200, None),
        route(
            Method::POST,
            "/models/{model}/profiles",
            201,
            Some("profile.create"),
        ),
        route(Method::GET, "/profiles/{profile}", 200, None),
        with(
            route(
                Method::DELETE,
                "/profiles/{fresh}",
                204,
                Some("profile.delete"),
            ),
            Prep::FreshProfile,
        ),
        route(Method::POST, "/agent/kv-events", 200, None),
        route(Method::GET, "/agent/kv-stream", 200, None),
        route(Method::GET, "/agent/kv-snapshot", 200, None),
        with(
            route(Method::PUT, "/agent/responses/{fresh}", 204, None),
            Prep::FreshResponse,
        ),
        with(
            route(Method::GET, "/agent/responses/{fresh}", 200, None),
            Prep::FreshResponse,
        ),
        with(
            route(Method::DELETE, "/agent/responses/{fresh}", 204, None),
            Prep::FreshResponse,
        ),
    ]
}

/// The callers: a role's token (allowed or wrong scope, as the document says), or no usable
/// token.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Who {
    Role(Role),
    NoToken,
    Malformed,
    /// Well-formed, but no such token.
    Unknown,
    /// An admin token past its expiry.
    Expired,
    /// An admin token revoked through the API.
    Revoked,
}

struct Fixture {
    node: String,
    /// The registration the fixture node made (its agent re-sends it).
    registration: Value,
    gpu: String,
    worker: String,
    model: String,
    deployment: String,
    profile: String,
    tokens: Vec<(Role, String)>,
    revoked: String,
    expired: String,
}

/// A valid performance profile of the fixture's model for `device` (a new device each time
/// creates a profile instead of replacing one).
fn profile_body(device: &str) -> Value {
    let mut profile = kvfleet_proto::profile::PerfProfile::from_toml_str(
        kvfleet_engine::DEFAULT_PERF_PROFILE_TOML,
    )
    .unwrap();
    profile.model = "chat-model".to_owned();
    profile.device = device.to_owned();
    serde_json::to_value(profile).unwrap()
}

async fn fixture(pool: &PgPool, server: &Server) -> Fixture {
    let mut tokens = Vec::new();
    for role in [Role::Admin, Role::Operator, Role::Viewer, Role::Join] {
        tokens.push((role, token(pool, role).await));
    }
    let admin = tokens[0].1.clone();
    let join = tokens[3].1.clone();
    let registration = register_body("gpu-node-01", 2);
    let r = post(server, "/agent/register", &join, registration.clone()).await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    let node = r.body["node_id"].as_str().unwrap().to_owned();
    let agent = r.body["credential"].as_str().unwrap().to_owned();
    tokens.push((Role::Agent, agent.clone()));
    // A first heartbeat makes the node healthy, so placement may use it.
    let beat = post(server, "/agent/heartbeat", &agent, json!({})).await;
    assert_eq!(beat.status, StatusCode::OK, "{beat:?}");
    let (model, deployment) = model_and_deployment(server, &admin, "chat", 1).await;
    // Placement runs on the leader; wait for the worker it creates.
    let worker = eventually(
        std::time::Duration::from_secs(10),
        "a placed worker",
        || async {
            let list = get(server, "/workers", &admin).await;
            list.body["items"][0]["id"]
                .as_i64()
                .map(|id| id.to_string())
        },
    )
    .await;
    let gpus = get(server, &format!("/gpus?node_id={node}"), &admin).await;
    let gpu = gpus.body["items"][0]["id"].as_str().unwrap().to_owned();
    let uploaded = post(
        server,
        &format!("/models/{model}/profiles"),
        &admin,
        profile_body("fixture-device"),
    )
    .await;
    assert_eq!(uploaded.status, StatusCode::CREATED, "{uploaded:?}");
    let profile = uploaded.body["id"].as_str().unwrap().to_owned();
    let revoked_token = token(pool, Role::Admin).await;
    let listed = get(server, "/tokens?limit=500", &admin).await;
    let prefix = &revoked_token[..16];
    let id = listed.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["prefix"] == prefix)
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let revoked = call(
        Method::DELETE,
        &server.url(&format!("/tokens/{id}")),
        Some(&admin),
        None,
    )
    .await;
    assert_eq!(revoked.status, StatusCode::OK);
    let expired = token(pool, Role::Admin).await;
    // Made two minutes ago with a one-minute life (the schema wants expiry after creation).
    sqlx::query(
        "UPDATE api_tokens SET created_at = now() - interval '2 minutes',
             expires_at = now() - interval '1 minute' WHERE prefix = $1",
    )
    .bind(&expired[..16])
    .execute(pool)
    .await
    .unwrap();
    Fixture {
        node,
        registration,
        gpu,
        worker,
        model,
        deployment,
        profile,
        tokens,
        revoked: revoked_token,
        expired,
    }
}

/// Makes whatever a route consumes and returns the id to put in `{fresh}`.
async fn prepare(pool: &PgPool, server: &Server, fx: &Fixture, prep: Prep, n: usize) -> String {
    let admin = &fx.tokens[0].1;
    let join = &fx.tokens[3].1;
    match prep {
        Prep::None => String::new(),
        Prep::FreshNode => register(server, join, &format!("spare-{n}"), 0).await.0,
        Prep::PendingNode => {
            // The matrix's server auto-approves; this node is put back to what a join makes
            // when approval is required (the approval tests below run that way).
            let node = register(server, join, &format!("pending-{n}"), 0).await.0;
            sqlx::query("UPDATE nodes SET approval = 'pending' WHERE id = $1::uuid")
                .bind(&node)
                .execute(pool)
                .await
                .unwrap();
            node
        }
        Prep::FreshModel => {
            let r = post(
                server,
                "/models",
                admin,
                json!({"name": format!("spare-{n}"), "format": "mock", "path": "/m"}),
            )
            .await;
            r.body["id"].as_str().unwrap().to_owned()
        }
        Prep::FreshDeployment => {
            let r = post(
                server,
                "/deployments",
                admin,
                json!({"name": format!("spare-{n}"), "model": "chat-model", "min_workers": 0}),
            )
            .await;
            r.body["id"].as_str().unwrap().to_owned()
        }
        Prep::FreshToken => {
            let r = post(
                server,
                "/tokens",
                admin,
                json!({"name": format!("spare-{n}"), "role": "viewer"}),
            )
            .await;
            r.body["token"]["id"].as_str().unwrap().to_owned()
        }
        Prep::FreshProfile => {
            let r = post(
                server,
                &format!("/models/{}/profiles", fx.model),
                admin,
                profile_body(&format!("spare-{n}")),
            )
            .await;
            r.body["id"].as_str().unwrap().to_owned()
        }
        Prep::FreshResponse => {
            let id = format!("resp_matrix_{n}");
            sqlx::query(
                "INSERT INTO stored_responses (id, owner, body, expires_at) \
                 VALUES ($1, 'o', '{}'::jsonb, now() + interval '1 hour')",
            )
            .bind(&id)
            .execute(pool)
            .await
            .unwrap();
            id
        }
    }
}

fn body_for(route: &Route, who: Who, fx: &Fixture, n: usize) -> Option<Value> {
    let path = route.path;
    match (route.method.as_str(), path) {
        ("POST", "/models") => {
            Some(json!({"name": format!("m-{n}"), "format": "gguf", "path": "/models/m.gguf"}))
        }
        ("POST", "/deployments") => {
            Some(json!({"name": format!("d-{n}"), "model": "chat-model", "min_workers": 0}))
        }
        ("PATCH", "/planner") => Some(json!({"gpu_budget": 100 + n})),
        ("PATCH", _) => Some(json!({"max_workers": 2 + n % 3})),
        ("POST", "/tokens") => Some(json!({"name": format!("t-{n}"), "role": "viewer"})),
        ("POST", "/agent/register") => {
            // An agent re-registers its own node; a join token registers a new one.
            if who == Who::Role(Role::Agent) {
                Some(fx.registration.clone())
            } else {
                Some(register_body(&format!("new-{n}"), 0))
            }
        }
        ("POST", "/agent/heartbeat") => Some(json!({"workers": []})),
        ("POST", "/agent/certificate") => Some(json!({})),
        ("POST", "/agent/kv-events") => Some(json!({"events": []})),
        ("PUT", "/agent/responses/{fresh}") => {
            Some(json!({"owner": "o", "body": {"id": format!("resp_{n}")}}))
        }
        ("POST", "/models/{model}/profiles") => Some(profile_body(&format!("device-{n}"))),
        ("POST", "/nodes/{node}/labels") => Some(json!({"set": {"zone": format!("z{n}")}})),
        _ => None,
    }
}

/// A table path with its placeholders written as the document writes them (`{id}`).
fn template(path: &str) -> String {
    [
        "{node}",
        "{gpu}",
        "{worker}",
        "{model}",
        "{deployment}",
        "{profile}",
        "{fresh}",
    ]
    .iter()
    .fold(path.to_owned(), |p, placeholder| {
        p.replace(placeholder, "{id}")
    })
}

/// The authorization matrix, generated from the served OpenAPI document: every documented
/// operation × every role (those in its `x-kvfleet-roles` must succeed; the others are the
/// wrong scope: 403) × a missing, malformed, unknown, expired and revoked token (401). Each
/// outcome must be a status the document lists for that operation, refusals are problem JSON
/// and change nothing (no audit row); a documented route the table cannot call fails.
#[sqlx::test(migrator = "kvfleet_controlplane::store::MIGRATOR")]
async fn authorization_matrix(pool: PgPool) {
    let server = start(&pool, test_config()).await;
    let fx = fixture(&pool, &server).await;
    let doc = call(Method::GET, &server.url("/openapi.json"), None, None)
        .await
        .body;
    let table = routes();
    let mut failures = Vec::new();
    // (table row, public, documented roles, documented statuses)
    let mut matrix: Vec<(&Route, bool, Vec<Role>, Vec<String>)> = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let name = format!("{} {path}", method.to_uppercase());
            let Some(roles) = op["x-kvfleet-roles"].as_array() else {
                failures.push(format!(
                    "{name}: the document names no roles (x-kvfleet-roles)"
                ));
                continue;
            };
            let roles: Vec<Role> = roles
                .iter()
                .map(|r| Role::parse(r.as_str().unwrap()).unwrap())
                .collect();
            let public = op["x-kvfleet-permission"] == "public";
            let names: Vec<&str> = roles.iter().map(|r| r.as_str()).collect();
            let security = if public {
                json!([])
            } else {
                json!([{ "bearer": names }])
            };
            if op["security"] != security {
                failures.push(format!(
                    "{name}: security {} does not say what x-kvfleet-roles says",
                    op["security"]
                ));
            }
            if !public && roles.is_empty() {
                failures.push(format!("{name}: no role may call it"));
            }
            let statuses: Vec<String> = op["responses"]
                .as_object()
                .map(|r| r.keys().cloned().collect())
                .unwrap_or_default();
            let row = table.iter().find(|r| {
                r.method.as_str().eq_ignore_ascii_case(method)
                    && format!("/api/v1{}", template(r.path)) == *path
            });
            match row {
                Some(row) => matrix.push((row, public, roles, statuses)),
                None => failures.push(format!(
                    "{name}: documented, but the matrix has no way to call it (add it to routes())"
                )),
            }
        }
    }
    for row in &table {
        if row.path != "/openapi.json" && !matrix.iter().any(|(r, ..)| std::ptr::eq(*r, row)) {
            failures.push(format!(
                "{} {}: served but not documented",
                row.method, row.path
            ));
        }
    }
    let mut callers: Vec<Who> = Role::ALL.iter().map(|r| Who::Role(*r)).collect();
    callers.extend([
        Who::NoToken,
        Who::Malformed,
        Who::Unknown,
        Who::Expired,
        Who::Revoked,
    ]);
    let unknown = kvfleet_controlplane::auth::generate_token();
    let mut n = 0;
    for (route, public, roles, statuses) in &matrix {
        for &who in &callers {
            n += 1;
            let fresh = prepare(&pool, &server, &fx, route.prep, n).await;
            let path = route
                .path
                .replace("{node}", &fx.node)
                .replace("{gpu}", &fx.gpu)
                .replace("{worker}", &fx.worker)
                .replace("{model}", &fx.model)
                .replace("{deployment}", &fx.deployment)
                .replace("{profile}", &fx.profile)
                .replace("{fresh}", &fresh);
            let token: Option<String> = match who {
                Who::Role(role) => fx
                    .tokens
                    .iter()
                    .find(|(r, _)| *r == role)
                    .map(|(_, t)| t.clone()),
                Who::NoToken => None,
                Who::Malformed => Some("not-a-token".into()),
                Who::Unknown => Some(unknown.clone()),
                Who::Expired => Some(fx.expired.clone()),
                Who::Revoked => Some(fx.revoked.clone()),
            };
            let expected = match who {
                _ if *public => route.success,
                Who::Role(role) if roles.contains(&role) => route.success,
                Who::Role(_) => StatusCode::FORBIDDEN,
                _ => StatusCode::UNAUTHORIZED,
            };
            let audit_action = match (route.path, who) {
                ("/agent/register", Who::Role(Role::Agent)) => Some("node.reregister"),
                _ => route.audit,
            };
            let audit_before = match audit_action {
                Some(action) => audit_count(&pool, action).await,
                None => 0,
            };
            let body = body_for(route, who, &fx, n);
            let response = call(
                route.method.clone(),
                &server.url(&path),
                token.as_deref(),
                body.as_ref(),
            )
            .await;
            if response.status != expected {
                failures.push(format!(
                    "{} {path} as {who:?}: want {expected}, got {response:?}",
                    route.method
                ));
                continue;
            }
            if !statuses.contains(&expected.as_u16().to_string()) {
                failures.push(format!(
                    "{} {path} as {who:?}: {expected} is not among the documented {statuses:?}",
                    route.method
                ));
            }
            if !response.status.is_success() {
                // Every refusal is problem JSON with the documented fields.
                assert_eq!(
                    response.content_type, "application/problem+json",
                    "{} {path} {who:?}",
                    route.method
                );
                assert_eq!(response.body["status"], expected.as_u16());
                assert!(
                    response.body["type"]
                        .as_str()
                        .unwrap()
                        .starts_with("/api/v1/problems/")
                );
                assert!(response.body["title"].is_string() && response.body["detail"].is_string());
            }
            if let Some(action) = audit_action {
                let after = audit_count(&pool, action).await;
                let want = audit_before + i64::from(response.status.is_success());
                if after != want {
                    failures.push(format!(
                        "{} {path} as {who:?}: audit {action} went {audit_before} → {after}",
                        route.method
                    ));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(
        matrix.len() >= 47,
        "{} operations in the document",
        matrix.len()
    );
    // The audit rows name the actor and carry before/after.
    let (actor, before, after): (String, Option<Value>, Option<Value>) = sqlx::query_as(
        "SELECT actor, before, after FROM audit_log WHERE action = 'node.cordon' ORDER BY id LIMIT 1",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(actor.starts_with("test admin (kvf_"), "{actor}");
    assert_eq!(before.unwrap()["cordoned"], false);
    assert_eq!(after.unwrap()["cordoned"], true);
    server.stop().await;
}

#[sqlx::test(migrator = "kvfleet_controlplane::store::MIGRATOR")]
async fn invalid_deployments_name_the_field_and_change_nothing(pool: PgPool) {
    let server = start(&pool, test_config()).await;
    let operator = token(&pool, Role::Operator).await;
    let (_, deployment) = model_and_deployment(&server, &operator, "base", 0).await;
    let deployments_before: i64 = sqlx::query_scalar("SELECT count(*) FROM deployments")
        .fetch_one(&pool)
        .await
        .unwrap();
    let audit_before: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_log")
        .fetch_one(&pool)
        .await
        .unwrap();
    let cases: Vec<(Value, u16, Vec<&str>)> = vec![
        (
            json!({"name": "x", "model": "no-such-model"}),
            422,
            vec!["model"],
        ),
        (
            json!({"name": "x", "model": "base-model", "min_workers": 3, "max_workers": 2}),
            422,
            vec!["min_workers"],
        ),
        (
            json!({"name": "x", "model": "base-model", "sla": {"ttft_ms": -5}}),
            422,
            vec!["sla.ttft_ms"],
        ),
        (
            json!({"name": "x", "model": "base-model", "sla": {"itl_ms": 0}}),
            422,
            vec!["sla.itl_ms"],
        ),
        (
            json!({"name": "x", "model": "base-model", "replicas": 2}),
            422,
            vec!["replicas"],
        ),
        (
            json!({"name": "x", "model": "base-model", "placement": {"zone": "a"}}),
            422,
            vec!["placement.zone"],
        ),
        (
            json!({"name": "x", "model": "base-model", "mode": "sharded"}),
            422,
            vec!["mode"],
        ),
        (
            json!({"name": "x", "model": "base-model", "tool_parser": "xml"}),
            422,
            vec!["tool_parser"],
        ),
        (
            json!({"name": "x", "model": "base-model", "reasoning_parser": "r1"}),
            422,
            vec!["reasoning_parser"],
        ),
        (
            json!({"name": "Bad Name", "model": "nope", "min_workers": -1}),
            422,
            vec!["name", "model", "min_workers"],
        ),
        (
            json!({"name": "x", "model": "base-model",
                   "disaggregation": {"prefill_timeout_ms": 99, "max_prefill_queue_tokens": 0}}),
            422,
            vec![
                "disaggregation.prefill_timeout_ms",
                "disaggregation.max_prefill_queue_tokens",
            ],
        ),
        (
            json!({"name": "x", "model": "base-model", "disaggregation": {"prefill_timeout_ms": 600_001}}),
            422,
            vec!["disaggregation.prefill_timeout_ms"],
        ),
        (
            json!({"name": "x", "model": "base-model", "disaggregation": {"min_remote_prefill_tokens": -1}}),
            422,
            vec!["disaggregation.min_remote_prefill_tokens"],
        ),
        (
            json!({"name": "x", "model": "base-model", "disaggregation": {"threshold": 5}}),
            422,
            vec!["disaggregation.threshold"],
        ),
        (json!({"model": "base-model"}), 422, vec!["name"]),
        (json!({"name": "base", "model": "base-model"}), 409, vec![]),
    ];
    for (body, status, fields) in cases {
        let r = post(&server, "/deployments", &operator, body.clone()).await;
        assert_eq!(r.status.as_u16(), status, "{body}: {r:?}");
        assert_eq!(r.content_type, "application/problem+json");
        let names: Vec<&str> = r.body["invalid_params"]
            .as_array()
            .map(|a| a.iter().map(|p| p["name"].as_str().unwrap()).collect())
            .unwrap_or_default();
        assert_eq!(names, fields, "{body}: {r:?}");
    }
    // Malformed JSON and the wrong content type.
    let raw = reqwest::Client::new()
        .post(server.url("/deployments"))
        .bearer_auth(&operator)
        .header("content-type", "application/json")
        .body("{\"name\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(raw.status(), StatusCode::BAD_REQUEST);
    let raw = reqwest::Client::new()
        .post(server.url("/deployments"))
        .bearer_auth(&operator)
        .body("name=x")
        .send()
        .await
        .unwrap();
    assert_eq!(raw.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    // A bad PATCH names the field and leaves the deployment as it was.
    let r = call(
        Method::PATCH,
        &server.url(&format!("/deployments/{deployment}")),
        Some(&operator),
        Some(&json!({"max_workers": 5, "min_workers": 9})),
    )
    .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(r.body["invalid_params"][0]["name"], "min_workers");
    let now = get(&server, &format!("/deployments/{deployment}"), &operator).await;
    assert_eq!(
        (
            now.body["min_workers"].as_i64(),
            now.body["max_workers"].as_i64()
        ),
        (Some(0), Some(1))
    );
    // Nothing was half-applied.
    let deployments_after: i64 = sqlx::query_scalar("SELECT count(*) FROM deployments")
        .fetch_one(&pool)
        .await
        .unwrap();
    let audit_after: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_log")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(
        (deployments_after, audit_after),
        (deployments_before, audit_before)
    );
    // Unknown ids are 404 problems; unknown routes too.
    for path in [
        "/deployments/not-a-uuid",
        &format!("/deployments/{}", uuid::Uuid::new_v4()),
        "/nope",
    ] {
        let r = get(&server, path, &operator).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{path}");
        assert_eq!(r.content_type, "application/problem+json");
    }
    server.stop().await;
}

#[sqlx::test(migrator = "kvfleet_controlplane::store::MIGRATOR")]
async fn disaggregation_policy_is_stored_patched_audited_and_in_the_fleet_directory(pool: PgPool) {
    let server = start(&pool, test_config()).await;
    let operator = token(&pool, Role::Operator).await;
    let join = token(&pool, Role::Join).await;
    for model in ["split-model", "plain-model"] {
        let r = post(
            &server,
            "/models",
            &operator,
            json!({"name": model, "format": "mock", "path": "/models/mock"}),
        )
        .await;
        assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
    }
    let defaults = json!({
        "min_remote_prefill_tokens": 256,
        "max_prefill_queue_tokens": 16384,
        "prefill_timeout_ms": 30000,
    });
    // A policy given in part: the rest are defaults; the whole u32 range is stored.
    let created = post(
        &server,
        "/deployments",
        &operator,
        json!({"name": "split", "model": "split-model", "mode": "disaggregated", "min_workers": 0,
               "disaggregation": {"min_remote_prefill_tokens": u32::MAX, "prefill_timeout_ms": 100}}),
    )
    .await;
    assert_eq!(created.status, StatusCode::CREATED, "{created:?}");
    let split = created.body["id"].as_str().unwrap().to_owned();
    assert_eq!(
        created.body["disaggregation"],
        json!({"min_remote_prefill_tokens": u32::MAX, "max_prefill_queue_tokens": 16384,
               "prefill_timeout_ms": 100})
    );
    // No policy: the defaults.
    let plain = post(
        &server,
        "/deployments",
        &operator,
        json!({"name": "plain", "model": "plain-model", "min_workers": 0}),
    )
    .await;
    assert_eq!(plain.status, StatusCode::CREATED, "{plain:?}");
    assert_eq!(plain.body["disaggregation"], defaults);
    assert_eq!(plain.body["migration_limit"], 3, "the default");

    // A PATCH replaces the policy (absent keys take their defaults), bumps the generation and
    // is audited with the policy before and after.
    let generation = created.body["generation"].as_i64().unwrap();
    let patched = call(
        Method::PATCH,
        &server.url(&format!("/deployments/{split}")),
        Some(&operator),
        Some(&json!({"disaggregation": {"min_remote_prefill_tokens": 0, "max_prefill_queue_tokens": 1}})),
    )
    .await;
    assert_eq!(patched.status, StatusCode::OK, "{patched:?}");
    let policy = json!({"min_remote_prefill_tokens": 0, "max_prefill_queue_tokens": 1,
                        "prefill_timeout_ms": 30000});
    assert_eq!(patched.body["disaggregation"], policy);
    assert_eq!(patched.body["generation"], generation + 1);
    let (before, after): (Value, Value) = sqlx::query_as(
        "SELECT before, after FROM audit_log WHERE action = 'deployment.update' AND target_id = $1",
    )
    .bind(&split)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(before["disaggregation"]["prefill_timeout_ms"], 100);
    assert_eq!(after["disaggregation"], policy);
    // The migration limit: patched and audited like the rest; out of range refused, named.
    let limited = call(
        Method::PATCH,
        &server.url(&format!("/deployments/{split}")),
        Some(&operator),
        Some(&json!({"migration_limit": 0})),
    )
    .await;
    assert_eq!(limited.status, StatusCode::OK, "{limited:?}");
    assert_eq!(limited.body["migration_limit"], 0);
    assert_eq!(limited.body["disaggregation"], policy);
    let (before, after) = last_deployment_update(&pool, &split).await;
    assert_eq!(
        (&before["migration_limit"], &after["migration_limit"]),
        (&json!(3), &json!(0))
    );
    let too_many = call(
        Method::PATCH,
        &server.url(&format!("/deployments/{split}")),
        Some(&operator),
        Some(&json!({"migration_limit": 21})),
    )
    .await;
    assert_eq!(
        too_many.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{too_many:?}"
    );
    assert_eq!(
        too_many.body["invalid_params"][0]["name"],
        "migration_limit"
    );
    let created_bad = post(
        &server,
        "/deployments",
        &operator,
        json!({"name": "eager", "model": "plain-model", "min_workers": 0, "migration_limit": 99}),
    )
    .await;
    assert_eq!(
        created_bad.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{created_bad:?}"
    );
    assert_eq!(
        created_bad.body["invalid_params"][0]["name"],
        "migration_limit"
    );
    // A PATCH of another field keeps the policy; a bad one names the field and changes nothing.
    let other = call(
        Method::PATCH,
        &server.url(&format!("/deployments/{split}")),
        Some(&operator),
        Some(&json!({"max_workers": 2})),
    )
    .await;
    assert_eq!(other.body["disaggregation"], policy, "{other:?}");
    let bad = call(
        Method::PATCH,
        &server.url(&format!("/deployments/{split}")),
        Some(&operator),
        Some(&json!({"disaggregation": {"prefill_timeout_ms": 600_001}})),
    )
    .await;
    assert_eq!(bad.status, StatusCode::UNPROCESSABLE_ENTITY, "{bad:?}");
    assert_eq!(
        bad.body["invalid_params"][0]["name"],
        "disaggregation.prefill_timeout_ms"
    );
    let now = get(&server, &format!("/deployments/{split}"), &operator).await;
    assert_eq!(now.body["disaggregation"], policy);
    assert_eq!(now.body["generation"], generation + 3);

    // A row written without the policy columns (as before migration 0004) reads as defaults.
    let model: uuid::Uuid = sqlx::query_scalar("SELECT id FROM models WHERE name = 'plain-model'")
        .fetch_one(&pool)
        .await
        .unwrap();
    let legacy = uuid::Uuid::new_v4();
    sqlx::query(
        "INSERT INTO deployments (id, name, model_id, min_workers) VALUES ($1, 'legacy', $2, 0)",
    )
    .bind(legacy)
    .bind(model)
    .execute(&pool)
    .await
    .unwrap();
    let legacy = get(&server, &format!("/deployments/{legacy}"), &operator).await;
    assert_eq!(legacy.body["disaggregation"], defaults, "{legacy:?}");
    // The schema refuses what the API refuses.
    let refused =
        sqlx::query("UPDATE deployments SET prefill_timeout_ms = 50 WHERE name = 'legacy'")
            .execute(&pool)
            .await;
    assert!(refused.is_err(), "{refused:?}");
    let refused = sqlx::query("UPDATE deployments SET migration_limit = 21 WHERE name = 'legacy'")
        .execute(&pool)
        .await;
    assert!(refused.is_err(), "{refused:?}");

    // Agents see each model's mode and policy in the fleet directory.
    let (_, agent, _) = register(&server, &join, "gpu-a", 0).await;
    let directory = get(&server, "/agent/fleet", &agent).await;
    assert_eq!(directory.status, StatusCode::OK, "{directory:?}");
    let mut models = directory.body["models"].as_array().unwrap().clone();
    models.sort_by_key(|m| m["model"].as_str().unwrap().to_owned());
    assert_eq!(
        models,
        vec![
            json!({"model": "plain-model", "mode": "aggregated", "disaggregation": defaults,
                   "migration_limit": 3}),
            json!({"model": "split-model", "mode": "disaggregated", "disaggregation": policy,
                   "migration_limit": 0}),
        ]
    );
    server.stop().await;
}

/// The deployment's latest `deployment.update` audit entry: (before, after).
async fn last_deployment_update(pool: &PgPool, deployment: &str) -> (Value, Value) {
    sqlx::query_as(
        "SELECT before, after FROM audit_log WHERE action = 'deployment.update' AND target_id = $1
         ORDER BY id DESC LIMIT 1",
    )
    .bind(deployment)
    .fetch_one(pool)
    .await
    .unwrap()
}

#[sqlx::test(migrator = "kvfleet_controlplane::store::MIGRATOR")]
async fn output_parsers_are_stored_patched_audited_and_handed_to_the_agents(pool: PgPool) {
    let server = start(&pool, test_config()).await;
    let join = token(&pool, Role::Join).await;
    let operator = token(&pool, Role::Operator).await;
    let (_, agent, _) = register(&server, &join, "gpu-a", 1).await;
    let beat = post(&server, "/agent/heartbeat", &agent, json!({})).await;
    assert_eq!(beat.status, StatusCode::OK, "{beat:?}");
    let (_, deployment) = model_and_deployment(&server, &operator, "tools", 1).await;
    let url = server.url(&format!("/deployments/{deployment}"));
    let created = get(&server, &format!("/deployments/{deployment}"), &operator).await;
    assert_eq!(
        (
            &created.body["tool_parser"],
            &created.body["reasoning_parser"]
        ),
        (&json!("auto"), &json!("auto")),
        "the defaults"
    );
    // The agent's desired state carries the deployment's parsers with the model.
    let parsers = |d: &Value| {
        d["workers"].as_array().and_then(|w| w.first()).map(|w| {
            (
                w["model"]["tool_parser"].clone(),
                w["model"]["reasoning_parser"].clone(),
            )
        })
    };
    let first = eventually(
        std::time::Duration::from_secs(5),
        "a worker placed",
        || async { parsers(&get(&server, "/agent/desired-state", &agent).await.body) },
    )
    .await;
    assert_eq!(first, (json!("auto"), json!("auto")));
    // An unknown parser is refused, named, and changes nothing.
    let bad = call(
        Method::PATCH,
        &url,
        Some(&operator),
        Some(&json!({"tool_parser": "xml"})),
    )
    .await;
    assert_eq!(bad.status, StatusCode::UNPROCESSABLE_ENTITY, "{bad:?}");
    assert_eq!(bad.body["invalid_params"][0]["name"], "tool_parser");
    // A patch sets them, bumps the generation, is audited and reaches the agent.
    let patched = call(
        Method::PATCH,
        &url,
        Some(&operator),
        Some(&json!({"tool_parser": "llama3_json", "reasoning_parser": "deepseek_r1"})),
    )
    .await;
    assert_eq!(patched.status, StatusCode::OK, "{patched:?}");
    assert_eq!(patched.body["tool_parser"], "llama3_json");
    assert_eq!(patched.body["reasoning_parser"], "deepseek_r1");
    assert_eq!(
        patched.body["generation"].as_i64(),
        created.body["generation"].as_i64().map(|g| g + 1)
    );
    let (before, after) = last_deployment_update(&pool, &deployment).await;
    assert_eq!(
        (&before["tool_parser"], &after["tool_parser"]),
        (&json!("auto"), &json!("llama3_json"))
    );
    let desired = get(&server, "/agent/desired-state", &agent).await;
    assert_eq!(
        parsers(&desired.body),
        Some((json!("llama3_json"), json!("deepseek_r1"))),
        "{desired:?}"
    );
    // A patch of another field keeps them; the schema refuses what the API refuses.
    let other = call(
        Method::PATCH,
        &url,
        Some(&operator),
        Some(&json!({"migration_limit": 1})),
    )
    .await;
    assert_eq!(other.body["tool_parser"], "llama3_json", "{other:?}");
    let refused = sqlx::query("UPDATE deployments SET reasoning_parser = 'r1'")
        .execute(&pool)
        .await;
    assert!(refused.is_err(), "{refused:?}");
    server.stop().await;
}

#[sqlx::test(migrator = "kvfleet_controlplane::store::MIGRATOR")]
async fn lists_page_with_a_cursor_and_a_documented_maximum(pool: PgPool) {
    let server = start(&pool, test_config()).await;
    let operator = token(&pool, Role::Operator).await;
    for i in 0..7 {
        let r = post(
            &server,
            "/models",
            &operator,
            json!({"name": format!("m{i}"), "format": "mock", "path": "/m"}),
        )
        .await;
        assert_eq!(r.status, StatusCode::CREATED);
    }
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let path = match &cursor {
            Some(c) => format!("/models?limit=3&cursor={c}"),
            None => "/models?limit=3".to_owned(),
        };
        let r = get(&server, &path, &operator).await;
        assert_eq!(r.status, StatusCode::OK, "{r:?}");
        pages += 1;
        for item in r.body["items"].as_array().unwrap() {
            seen.push(item["name"].as_str().unwrap().to_owned());
        }
        match r.body["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    seen.sort();
    assert_eq!(seen, ["m0", "m1", "m2", "m3", "m4", "m5", "m6"]);
    for bad in [
        "/models?limit=0",
        "/models?limit=501",
        "/models?cursor=zzz",
        "/models?limit=abc",
        // Only the form the API issues (schemathesis found a signed number accepted).
        "/decisions?cursor=-1",
        "/nodes?cursor=%7B00000000-0000-0000-0000-000000000000%7D",
    ] {
        let r = get(&server, bad, &operator).await;
        assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{bad}: {r:?}");
        assert!(
            r.body["invalid_params"][0]["name"].is_string(),
            "{bad}: {r:?}"
        );
    }
    // A NUL in a query value went to Postgres as a text parameter: a 500 before.
    let admin = token(&pool, Role::Admin).await;
    let r = get(&server, "/audit?action=a%00b", &admin).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{r:?}");
    assert_eq!(r.body["invalid_params"][0]["name"], "action", "{r:?}");
    // A query parameter the route does not take is refused by name, not ignored (a typo such
    // as `node=` would otherwise list everything).
    for path in [
        "/nodes?colour=red",
        "/workers?node=x",
        "/models?limit=5&sort=name",
    ] {
        let r = get(&server, path, &admin).await;
        assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{path}: {r:?}");
        let name = r.body["invalid_params"][0]["name"]
            .as_str()
            .unwrap_or_default();
        assert!(["colour", "node", "sort"].contains(&name), "{path}: {r:?}");
    }
    // A NUL in a JSON string, and a body that is not an object: 422 naming the field (the NUL
    // was a 500 from the insert; the array was read as an empty struct).
    let r = post(
        &server,
        "/models",
        &operator,
        json!({"name": "nul", "format": "mock", "path": "/m\u{0}x"}),
    )
    .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{r:?}");
    assert_eq!(r.body["invalid_params"][0]["name"], "path", "{r:?}");
    let r = call(
        Method::PATCH,
        &server.url("/planner"),
        Some(&operator),
        Some(&json!([])),
    )
    .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{r:?}");
    assert_eq!(r.body["invalid_params"][0]["name"], "body", "{r:?}");
    server.stop().await;
}

#[sqlx::test(migrator = "kvfleet_controlplane::store::MIGRATOR")]
async fn openapi_document_covers_every_route(pool: PgPool) {
    let server = start(&pool, test_config()).await;
    let r = call(Method::GET, &server.url("/openapi.json"), None, None).await;
    assert_eq!(r.status, StatusCode::OK);
    let paths = r.body["paths"].as_object().unwrap();
    for route in routes() {
        let templ = template(route.path);
        if templ == "/openapi.json" {
            continue;
        }
        let item = paths
            .get(&format!("/api/v1{templ}"))
            .unwrap_or_else(|| panic!("{templ} missing"));
        assert!(
            item.get(route.method.as_str().to_lowercase()).is_some(),
            "{} {templ} missing",
            route.method
        );
    }
    let schemas = r.body["components"]["schemas"].as_object().unwrap();
    for name in [
        "Problem",
        "NewDeployment",
        "RegisterRequest",
        "Heartbeat",
        "DesiredState",
    ] {
        assert!(schemas.contains_key(name), "schema {name} missing");
    }
    assert!(r.body["components"]["securitySchemes"]["bearer"].is_object());
    server.stop().await;
}

/// Stored responses (issue #23): an agent stores one, any agent reads and deletes it; an
/// expired one is gone for readers at once and the leader's sweep deletes its row.
#[sqlx::test(migrator = "kvfleet_controlplane::store::MIGRATOR")]
async fn stored_responses_round_trip_and_expire(pool: PgPool) {
    let server = start(&pool, test_config()).await;
    let join = token(&pool, Role::Join).await;
    let (_, agent_a, _) = register(&server, &join, "resp-a", 0).await;
    let (_, agent_b, _) = register(&server, &join, "resp-b", 0).await;
    let url = server.url("/agent/responses/resp_abc");
    let stored =
        json!({"owner": "digest-1", "body": {"response": {"id": "resp_abc"}, "items": []}});
    let put = call(Method::PUT, &url, Some(&agent_a), Some(&stored)).await;
    assert_eq!(put.status, StatusCode::NO_CONTENT, "{put:?}");
    // Another node reads what this one stored.
    let read = call(Method::GET, &url, Some(&agent_b), None).await;
    assert_eq!(read.status, StatusCode::OK, "{read:?}");
    assert_eq!(read.body, stored);
    let bad = call(
        Method::GET,
        &server.url("/agent/responses/bad%20id"),
        Some(&agent_b),
        None,
    )
    .await;
    assert_eq!(bad.status, StatusCode::UNPROCESSABLE_ENTITY, "{bad:?}");
    let gone = call(Method::DELETE, &url, Some(&agent_b), None).await;
    assert_eq!(gone.status, StatusCode::NO_CONTENT, "{gone:?}");
    for method in [Method::GET, Method::DELETE] {
        let again = call(method, &url, Some(&agent_a), None).await;
        assert_eq!(again.status, StatusCode::NOT_FOUND, "{again:?}");
    }
    // Expired: not served, and swept.
    let put = call(Method::PUT, &url, Some(&agent_a), Some(&stored)).await;
    assert_eq!(put.status, StatusCode::NO_CONTENT);
    sqlx::query("UPDATE stored_responses SET expires_at = now() - interval '1 second'")
        .execute(&pool)
        .await
        .unwrap();
    let expired = call(Method::GET, &url, Some(&agent_a), None).await;
    assert_eq!(expired.status, StatusCode::NOT_FOUND, "{expired:?}");
    let fence = eventually(std::time::Duration::from_secs(5), "a leader", || async {
        server.state.fence()
    })
    .await;
    let swept = kvfleet_controlplane::api::responses::sweep(&pool, &fence)
        .await
        .unwrap();
    assert_eq!(swept, 1);
    server.stop().await;
}

#[sqlx::test(migrator = "kvfleet_controlplane::store::MIGRATOR")]
async fn tokens_are_shown_once_stored_hashed_and_revocable(pool: PgPool) {
    let mut config = test_config();
    // Short, so the expiry written behind the replica's back below is seen within the test.
    config.auth.cache_ttl = std::time::Duration::from_secs(1);
    let server = start(&pool, config).await;
    let admin = token(&pool, Role::Admin).await;
    let r = post(
        &server,
        "/tokens",
        &admin,
        json!({"name": "ci", "role": "operator", "expires_in_s": 3600}),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED);
    let secret = r.body["secret"].as_str().unwrap().to_owned();
    let id = r.body["token"]["id"].as_str().unwrap().to_owned();
    // Only the hash is stored.
    let stored: Vec<u8> =
        sqlx::query_scalar("SELECT secret_hash FROM api_tokens WHERE id = $1::uuid")
            .bind(&id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(stored, kvfleet_controlplane::auth::hash_token(&secret));
    let dump: String = sqlx::query_scalar("SELECT string_agg(t::text, ' ') FROM api_tokens t")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(
        !dump.contains(&secret[17..]),
        "the secret part must not be stored"
    );
    // Listing never shows secrets.
    let list = get(&server, "/tokens", &admin).await;
    assert!(!list.body.to_string().contains(&secret));
    // The token works, then stops working when revoked.
    assert_eq!(
        get(&server, "/models", &secret).await.status,
        StatusCode::OK
    );
    let revoke = call(
        Method::DELETE,
        &server.url(&format!("/tokens/{id}")),
        Some(&admin),
        None,
    )
    .await;
    assert_eq!(revoke.status, StatusCode::OK);
    let refused = get(&server, "/models", &secret).await;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
    assert!(refused.body["detail"].as_str().unwrap().contains("revoked"));
    // Agent credentials cannot be minted here; the role names the field.
    let r = post(
        &server,
        "/tokens",
        &admin,
        json!({"name": "x", "role": "agent"}),
    )
    .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(r.body["invalid_params"][0]["name"], "role");
    // An expired token is refused. The expiry is written behind the replica's back (as the CLI
    // or another replica would), so this replica sees it once its cached verification is
    // auth.cache_ttl old; revoking through the API (above) took effect at once.
    sqlx::query("UPDATE api_tokens SET created_at = now() - interval '2 hours', expires_at = now() - interval '1 hour' WHERE role = 'admin'")
        .execute(&pool)
        .await
        .unwrap();
    let r = eventually(
        std::time::Duration::from_secs(3),
        "the expiry seen past the cache TTL",
        || async {
            let r = get(&server, "/models", &admin).await;
            (r.status != StatusCode::OK).then_some(r)
        },
    )
    .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert!(r.body["detail"].as_str().unwrap().contains("expired"));
    server.stop().await;
}

#[sqlx::test(migrator = "kvfleet_controlplane::store::MIGRATOR")]
async fn bootstrap_creates_one_admin_token_once(pool: PgPool) {
    let config = test_config();
    let first = kvfleet_controlplane::bootstrap_admin(&pool, &config)
        .await
        .unwrap();
    let token = first.expect("the first start creates an admin token");
    assert!(kvfleet_controlplane::auth::parse_token(&token).is_ok());
    // Written to the token file, readable by its owner only; never logged (see
    // tests/tests/security.rs for the log grep).
    {
        use std::os::unix::fs::PermissionsExt as _;
        let path = &config.auth.bootstrap_token_file;
        assert_eq!(std::fs::read_to_string(path).unwrap().trim(), token);
        assert_eq!(
            std::fs::metadata(path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        std::fs::remove_file(path).unwrap();
    }
    assert_eq!(
        kvfleet_controlplane::bootstrap_admin(&pool, &config)
            .await
            .unwrap(),
        None
    );
    assert_eq!(audit_count(&pool, "token.create").await, 1);
    // A configured bootstrap token is inserted once and works.
    let mut config = test_config();
    let configured = kvfleet_controlplane::auth::generate_token();
    config.auth.bootstrap_admin_token = Some(configured.clone());
    assert_eq!(
        kvfleet_controlplane::bootstrap_admin(&pool, &config)
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        kvfleet_controlplane::bootstrap_admin(&pool, &config)
            .await
            .unwrap(),
        None
    );
    let server = start(&pool, config).await;
    assert_eq!(
        get(&server, "/tokens", &configured).await.status,
        StatusCode::OK
    );
    assert_eq!(get(&server, "/tokens", &token).await.status, StatusCode::OK);
    server.stop().await;
}

/// The node CA's private key is never in the database in the clear: it is sealed under
/// `ca.key_file`, which every replica needs; a key stored in the clear by an older version is
/// sealed on the next start, and the CA stays the same.
#[sqlx::test(migrator = "kvfleet_controlplane::store::MIGRATOR")]
async fn the_node_ca_key_is_sealed_at_rest_under_the_key_file(pool: PgPool) {
    let stored = |pool: PgPool| async move {
        sqlx::query_as::<_, (String, String)>("SELECT cert_pem, key_pem FROM node_ca WHERE id = 1")
            .fetch_one(&pool)
            .await
            .unwrap()
    };
    let mut config = test_config();
    config.ca.key_file = scratch_file("ca.key");
    let first = start(&pool, config.clone()).await;
    let fingerprint = first.state.ca.fingerprint();
    first.stop().await;
    let (cert, key) = stored(pool.clone()).await;
    assert!(key.starts_with("kvfleet-sealed:v1:"), "{key}");
    assert!(!key.contains("PRIVATE KEY"));
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&config.ca.key_file)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    // A second replica with the same key file signs with the same CA.
    let again = start(&pool, config.clone()).await;
    assert_eq!(again.state.ca.fingerprint(), fingerprint);
    again.stop().await;

    // Without the key file, or with another one, the replica does not start, and says which
    // file to copy from where.
    let own_pool = || async {
        sqlx::postgres::PgPoolOptions::new()
            .max_connections(2)
            .connect_with((*pool.connect_options()).clone())
            .await
            .unwrap()
    };
    let mut missing = config.clone();
    missing.ca.key_file = scratch_file("absent.key");
    let err = kvfleet_controlplane::AppState::new(own_pool().await, missing)
        .await
        .unwrap_err();
    assert!(
        format!("{err:#}").contains("copy that file from the control-plane host"),
        "{err:#}"
    );
    let mut other = config.clone();
    other.ca.key_file = scratch_file("other.key");
    std::fs::copy(&config.ca.key_file, &other.ca.key_file).unwrap();
    let mut text = std::fs::read_to_string(&other.ca.key_file).unwrap();
    let last = text.trim_end().len() - 1;
    let flipped = if &text[last..=last] == "0" { "1" } else { "0" };
    text.replace_range(last..=last, flipped);
    std::fs::write(&other.ca.key_file, text).unwrap();
    let err = kvfleet_controlplane::AppState::new(own_pool().await, other)
        .await
        .unwrap_err();
    assert!(
        format!("{err:#}").contains("sealed with another key file"),
        "{err:#}"
    );

    // A database from before sealing (the key in the clear) is sealed in place at start.
    let (ca, clear_key) = kvfleet_controlplane::ca::NodeCa::generate(
        "legacy CA",
        chrono::Utc::now(),
        std::time::Duration::from_secs(86_400 * 30),
    )
    .unwrap();
    sqlx::query("UPDATE node_ca SET name = 'legacy CA', cert_pem = $1, key_pem = $2 WHERE id = 1")
        .bind(ca.cert_pem())
        .bind(&clear_key)
        .execute(&pool)
        .await
        .unwrap();
    let legacy = start(&pool, config.clone()).await;
    assert_eq!(legacy.state.ca.fingerprint(), ca.fingerprint());
    legacy.stop().await;
    let (cert_after, key_after) = stored(pool.clone()).await;
    assert_eq!(cert_after, ca.cert_pem());
    assert_ne!(cert_after, cert);
    assert!(key_after.starts_with("kvfleet-sealed:v1:"));
    assert!(!key_after.contains("PRIVATE KEY"));
}

#[sqlx::test(migrator = "kvfleet_controlplane::store::MIGRATOR")]
async fn a_newer_schema_is_refused_with_a_clear_message(pool: PgPool) {
    let known = kvfleet_controlplane::store::known_version();
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time)
         VALUES ($1, 'from the future', true, '\\x00', 0)",
    )
    .bind(known + 1)
    .execute(&pool)
    .await
    .unwrap();
    let error = kvfleet_controlplane::store::migrate(&pool)
        .await
        .unwrap_err();
    let text = error.to_string();
    assert!(
        matches!(error, kvfleet_controlplane::store::StoreError::SchemaTooNew { found, known: k } if found == known + 1 && k == known),
        "{text}"
    );
    assert!(text.contains("newer than this control plane"), "{text}");
}

#[sqlx::test(migrator = "kvfleet_controlplane::store::MIGRATOR")]
async fn errors_outside_handlers_are_problem_json_too(pool: PgPool) {
    let server = start(&pool, test_config()).await;
    let admin = token(&pool, Role::Admin).await;
    // 405: the route exists, the method does not.
    let r = call(
        Method::PUT,
        &server.url("/nodes"),
        Some(&admin),
        Some(&json!({})),
    )
    .await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(r.content_type, "application/problem+json");
    assert_eq!(r.body["status"], 405);
    // 413: a body above the limit.
    let huge = "x".repeat(kvfleet_controlplane::api::MAX_BODY_BYTES + 1);
    let r = call(
        Method::POST,
        &server.url("/models"),
        Some(&admin),
        Some(&json!({ "name": huge })),
    )
    .await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(r.content_type, "application/problem+json");
    // 404 outside /api/v1.
    let r = call(
        Method::GET,
        &format!("http://{}/elsewhere", server.addr),
        None,
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.content_type, "application/problem+json");
    server.stop().await;
}

#[sqlx::test(migrator = "kvfleet_controlplane::store::MIGRATOR")]
async fn request_ids_are_echoed_and_audited(pool: PgPool) {
    let server = start(&pool, test_config()).await;
    let operator = token(&pool, Role::Operator).await;
    let client = reqwest::Client::new();
    let response = client
        .post(server.url("/models"))
        .bearer_auth(&operator)
        .header("x-request-id", "ci-run-42")
        .json(&json!({"name": "m", "format": "mock", "path": "/m"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(response.headers()["x-request-id"], "ci-run-42");
    let stored: Option<String> =
        sqlx::query_scalar("SELECT request_id FROM audit_log WHERE action = 'model.create'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(stored.as_deref(), Some("ci-run-42"));
    // Without one (or with an unusable one) the server makes one up.
    for header in [None, Some("has spaces in it")] {
        let mut request = client.get(server.url("/models")).bearer_auth(&operator);
        if let Some(h) = header {
            request = request.header("x-request-id", h);
        }
        let response = request.send().await.unwrap();
        let id = response.headers()["x-request-id"].to_str().unwrap();
        assert!(id.parse::<uuid::Uuid>().is_ok(), "{id}");
    }
    server.stop().await;
}

/// `GET /metrics`: no token, Prometheus text 0.0.4, HELP on every family, and the figures the
/// modules registered: requests by route template, leadership, the inventory's SLA targets,
/// database errors per source (zero, present from the start), the KV index.
#[sqlx::test(migrator = "kvfleet_controlplane::store::MIGRATOR")]
async fn metrics_come_from_one_registry_with_help_for_every_family(pool: PgPool) {
    let server = start(&pool, test_config()).await;
    let operator = token(&pool, Role::Operator).await;
    let client = reqwest::Client::new();
    let created = client
        .post(server.url("/models"))
        .bearer_auth(&operator)
        .json(&json!({"name": "m", "format": "mock", "path": "/m"}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), StatusCode::CREATED);
    let created = client
        .post(server.url("/deployments"))
        .bearer_auth(&operator)
        .json(&json!({"name": "chat", "model": "m", "sla": {"ttft_ms": 300, "itl_ms": 40}}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), StatusCode::CREATED);
    let missing = client
        .get(format!("http://{}/no/such/path/42", server.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    let metrics_url = format!("http://{}/metrics", server.addr);
    // The inventory is re-read every 5 s and leadership takes a retry interval.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(15);
    let text = loop {
        let response = client.get(&metrics_url).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            response.headers()["content-type"],
            "text/plain; version=0.0.4; charset=utf-8"
        );
        let text = response.text().await.unwrap();
        if text.contains("kvfleet_cp_deployment_ttft_target_seconds{")
            && text.contains("kvfleet_cp_leader 1")
        {
            break text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no SLA target or leadership in\n{text}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    for line in [
        "kvfleet_cp_http_requests_total{route=\"/api/v1/models\",method=\"POST\",status=\"201\"} 1",
        "kvfleet_cp_http_requests_total{route=\"unmatched\",method=\"GET\",status=\"404\"} 1",
        "kvfleet_cp_http_request_seconds_bucket{route=\"/api/v1/deployments\",method=\"POST\",le=\"+Inf\"} 1",
        "kvfleet_cp_deployment_ttft_target_seconds{deployment=\"chat\",model=\"m\"} 0.3",
        "kvfleet_cp_deployment_itl_target_seconds{deployment=\"chat\",model=\"m\"} 0.04",
        "kvfleet_cp_db_errors_total{source=\"api\"} 0",
        "kvfleet_cp_db_errors_total{source=\"leader\"} 0",
        "kvfleet_cp_leader_passes_total{loop=\"placement\",outcome=\"error\"} 0",
        "kvfleet_cp_agent_heartbeats_total 0",
        "kvfleet_cp_kv_head_seq 0",
        "kvfleet_cp_kv_events_total{outcome=\"applied\"} 0",
        "kvfleet_cp_nodes{state=\"healthy\"} 0",
        "kvfleet_cp_build_info{version=",
    ] {
        assert!(text.contains(line), "missing {line:?} in\n{text}");
    }
    // Every family has HELP text, and every sample belongs to a family with both.
    let named = |prefix: &str| -> std::collections::BTreeSet<String> {
        text.lines()
            .filter_map(|l| l.strip_prefix(prefix)?.split(' ').next().map(str::to_owned))
            .collect()
    };
    let (help, types) = (named("# HELP "), named("# TYPE "));
    assert_eq!(help, types);
    assert!(help.len() > 20, "{help:?}");
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let name = line.split(['{', ' ']).next().unwrap();
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|f| types.contains(*f)))
            .unwrap_or(name);
        assert!(types.contains(family), "{line} has no HELP/TYPE");
        assert!(family.starts_with("kvfleet_cp_"), "{line}");
    }
    server.stop().await;
}

#[sqlx::test(migrator = "kvfleet_controlplane::store::MIGRATOR")]
async fn join_tokens_are_single_use_and_short_lived_by_default(pool: PgPool) {
    let server = start(&pool, test_config()).await;
    let admin = token(&pool, Role::Admin).await;
    let r = post(
        &server,
        "/tokens",
        &admin,
        json!({"name": "j", "role": "join"}),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
    assert_eq!(r.body["token"]["uses_left"], 1);
    let expires: chrono::DateTime<chrono::Utc> =
        serde_json::from_value(r.body["token"]["expires_at"].clone()).unwrap();
    let ttl = expires - chrono::Utc::now();
    assert!(
        ttl > chrono::Duration::minutes(59) && ttl <= chrono::Duration::hours(1),
        "{ttl}"
    );
    let join = r.body["secret"].as_str().unwrap().to_owned();
    let first = post(&server, "/agent/register", &join, register_body("a", 0)).await;
    assert_eq!(first.status, StatusCode::OK, "{first:?}");
    let second = post(&server, "/agent/register", &join, register_body("b", 0)).await;
    assert_eq!(second.status, StatusCode::UNAUTHORIZED, "{second:?}");
    assert_eq!(second.content_type, "application/problem+json");
    assert!(
        second.body["detail"].as_str().unwrap().contains("used up"),
        "{second:?}"
    );
    // More uses when asked; `uses` is for join tokens only and bounded.
    let r = post(
        &server,
        "/tokens",
        &admin,
        json!({"name": "rack", "role": "join", "uses": 2, "expires_in_s": 60}),
    )
    .await;
    let rack = r.body["secret"].as_str().unwrap().to_owned();
    for host in ["c", "d"] {
        let r = post(&server, "/agent/register", &rack, register_body(host, 0)).await;
        assert_eq!(r.status, StatusCode::OK, "{r:?}");
    }
    let r = post(&server, "/agent/register", &rack, register_body("e", 0)).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    for (body, field) in [
        (json!({"name": "x", "role": "viewer", "uses": 2}), "uses"),
        (json!({"name": "x", "role": "join", "uses": 0}), "uses"),
        (json!({"name": "x", "role": "join", "uses": 10001}), "uses"),
    ] {
        let r = post(&server, "/tokens", &admin, body.clone()).await;
        assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        assert_eq!(r.body["invalid_params"][0]["name"], field, "{body}");
    }
    server.stop().await;
}

#[sqlx::test(migrator = "kvfleet_controlplane::store::MIGRATOR")]
async fn the_last_live_admin_token_cannot_be_revoked(pool: PgPool) {
    let server = start(&pool, test_config()).await;
    let admin = token(&pool, Role::Admin).await;
    let id_of = |secret: &str| {
        let prefix = secret[..16].to_owned();
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, uuid::Uuid>("SELECT id FROM api_tokens WHERE prefix = $1")
                .bind(prefix)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    let own = id_of(&admin).await;
    let revoke = |id: uuid::Uuid, with: String| {
        let url = server.url(&format!("/tokens/{id}"));
        async move { call(Method::DELETE, &url, Some(&with), None).await }
    };
    let refused = revoke(own, admin.clone()).await;
    assert_eq!(refused.status, StatusCode::CONFLICT, "{refused:?}");
    assert_eq!(refused.content_type, "application/problem+json");
    let detail = refused.body["detail"].as_str().unwrap();
    assert!(detail.contains("last live admin token"), "{detail}");
    assert!(
        detail.contains("kvfleet-controlplane token create"),
        "{detail}"
    );
    // With a second admin, either may go; then the survivor is the last one again.
    let second = token(&pool, Role::Admin).await;
    let r = revoke(own, second.clone()).await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    let r = revoke(id_of(&second).await, second.clone()).await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{r:?}");
    assert_eq!(
        get(&server, "/tokens", &second).await.status,
        StatusCode::OK
    );
    server.stop().await;
}

/// `[tls]`: HTTPS from a certificate the fleet CA issues, and from the operator's PEM files.
mod https {
    use std::sync::Arc;
    use std::time::Duration;

    use kvfleet_controlplane::config::TlsConfig;
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, ServerName};
    use sqlx::PgPool;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::common::*;

    fn roots(pem: &str) -> rustls::RootCertStore {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            roots.add(cert.unwrap()).unwrap();
        }
        roots
    }

    /// `GET path` over TLS trusting only `roots`, as `name`; the status line and body.
    async fn https_get(
        addr: std::net::SocketAddr,
        roots: rustls::RootCertStore,
        name: &str,
        path: &str,
    ) -> std::io::Result<String> {
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        let server_name = ServerName::try_from(name.to_owned()).unwrap();
        let mut tls = connector.connect(server_name, tcp).await?;
        tls.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
        let mut response = String::new();
        tls.read_to_string(&mut response).await?;
        Ok(response)
    }

    #[sqlx::test(migrator = "kvfleet_controlplane::store::MIGRATOR")]
    async fn fleet_ca_https_is_trusted_through_the_ca_alone_and_survives_bad_clients(pool: PgPool) {
        let mut config = test_config();
        config.tls = TlsConfig::FleetCa {
            names: vec!["localhost".into(), "127.0.0.1".into()],
        };
        let server = start(&pool, config).await;
        let ca_pem = server.state.ca.cert_pem().to_owned();

        // A silent client and a plain-HTTP client hold no accept slot: they are handshaking
        // (or failing to) on their own tasks while a real client is served.
        let _silent = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        let mut plain = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        plain
            .write_all(b"GET /api/v1/openapi.json HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut answer = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), plain.read_to_end(&mut answer))
            .await
            .expect("a plain-HTTP client is dropped, not left hanging");
        assert!(
            read.is_err() || !String::from_utf8_lossy(&answer).contains("openapi"),
            "plain HTTP must not be served on an HTTPS port"
        );

        for name in ["localhost", "127.0.0.1"] {
            let response = tokio::time::timeout(
                Duration::from_secs(10),
                https_get(server.addr, roots(&ca_pem), name, "/api/v1/openapi.json"),
            )
            .await
            .expect("served while a silent client is still handshaking")
            .unwrap();
            assert!(
                response.starts_with("HTTP/1.1 200"),
                "{name}: {response:.200}"
            );
            assert!(response.contains("\"openapi\""), "{response:.200}");
        }

        // Another fleet's CA does not vouch for this control plane, and a name the certificate
        // was not issued for is refused.
        let now = chrono::Utc::now();
        let (other_ca, _) =
            kvfleet_controlplane::ca::NodeCa::generate("other", now, Duration::from_secs(3600))
                .unwrap();
        let refused = https_get(server.addr, roots(other_ca.cert_pem()), "localhost", "/").await;
        assert!(
            refused.is_err(),
            "trusted through a foreign CA: {refused:?}"
        );
        let refused = https_get(server.addr, roots(&ca_pem), "evil.example", "/").await;
        assert!(refused.is_err(), "trusted for a name it was not issued for");
        server.stop().await;
    }

    #[sqlx::test(migrator = "kvfleet_controlplane::store::MIGRATOR")]
    async fn operator_pem_files_are_served_and_bad_ones_name_the_file(pool: PgPool) {
        // The operator's certificate: here issued from a CA the test makes, written as PEM.
        let now = chrono::Utc::now();
        let (operator_ca, _) =
            kvfleet_controlplane::ca::NodeCa::generate("operator", now, Duration::from_secs(3600))
                .unwrap();
        let issued = operator_ca
            .issue_server(&["localhost".into()], now, Duration::from_secs(3600))
            .unwrap();
        let cert_file = scratch_file("cert.pem");
        let key_file = scratch_file("key.pem");
        std::fs::write(&cert_file, &issued.cert_pem).unwrap();
        std::fs::write(&key_file, issued.private_key_pem.unwrap()).unwrap();

        let mut config = test_config();
        config.tls = TlsConfig::Files {
            cert_file: cert_file.clone(),
            key_file: key_file.clone(),
        };
        let server = start(&pool, config).await;
        let response = https_get(
            server.addr,
            roots(operator_ca.cert_pem()),
            "localhost",
            "/api/v1/openapi.json",
        )
        .await
        .unwrap();
        assert!(response.starts_with("HTTP/1.1 200"), "{response:.200}");
        server.stop().await;

        // A key file that holds a certificate: the error names the file and what was missing.
        let mut config = test_config();
        config.database.url = "postgres://unused".into();
        config.tls = TlsConfig::Files {
            cert_file: cert_file.clone(),
            key_file: cert_file.clone(),
        };
        let state = kvfleet_controlplane::AppState::new(pool.clone(), config).await;
        let error = format!("{:#}", state.expect_err("a certificate is not a key"));
        assert!(
            error.contains(&cert_file.display().to_string()) && error.contains("PRIVATE KEY"),
            "{error}"
        );
    }
}

/// One sample of `series` (exact name with labels) from Prometheus text; 0 when absent.
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

/// An unauthenticated flood (missing, malformed and well-formed but unknown tokens, many at
/// once, against admin and agent routes) neither reaches Postgres beyond the address's
/// failed-authentication budget nor disturbs a healthy agent: its heartbeats keep succeeding
/// from the verified-token cache and the agent pool, and still do while every connection of
/// the admin pool is taken. Removing the node stops its cached credential at once.
#[sqlx::test(migrator = "kvfleet_controlplane::store::MIGRATOR")]
async fn an_unauthenticated_flood_does_not_reach_the_database_or_starve_heartbeats(pool: PgPool) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    let mut config = test_config();
    config.database.max_connections = 4;
    config.database.agent_max_connections = 4;
    config.auth.failed_burst = 5;
    // 10 a second: the budget the flood drove below zero comes back within the test.
    config.auth.failed_per_minute = 600;
    let server = start(&pool, config).await;
    let admin = token(&pool, Role::Admin).await;
    let join = token(&pool, Role::Join).await;
    let (node, agent, _) = register(&server, &join, "gpu-a", 1).await;
    let r = post(&server, "/agent/heartbeat", &agent, json!({})).await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    // The admin's token is verified (and cached) before the flood spends 127.0.0.1's budget.
    assert_eq!(get(&server, "/nodes", &admin).await.status, StatusCode::OK);
    let before = server.state.telemetry.encode();

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let limited = Arc::new(AtomicU64::new(0));
    let client = reqwest::Client::new();
    let mut flood = tokio::task::JoinSet::new();
    for i in 0..64_u64 {
        let (stop, sent, limited, client) =
            (stop.clone(), sent.clone(), limited.clone(), client.clone());
        let (nodes, heartbeat) = (server.url("/nodes"), server.url("/agent/heartbeat"));
        flood.spawn(async move {
            let mut n = 0_u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let request = if (i + n).is_multiple_of(2) {
                    client.get(&nodes)
                } else {
                    client.post(&heartbeat).json(&json!({}))
                };
                let request = match (i + n) % 3 {
                    0 => request,
                    1 => request.header("authorization", "Bearer not-a-token"),
                    _ => request.bearer_auth(kvfleet_controlplane::auth::generate_token()),
                };
                let response = request.send().await.unwrap();
                sent.fetch_add(1, Ordering::Relaxed);
                match response.status() {
                    StatusCode::UNAUTHORIZED => {}
                    StatusCode::TOO_MANY_REQUESTS => {
                        let retry_after: u64 = response.headers()["retry-after"]
                            .to_str()
                            .unwrap()
                            .parse()
                            .unwrap();
                        assert!(retry_after >= 1);
                        assert_eq!(
                            response.headers()["content-type"],
                            "application/problem+json"
                        );
                        limited.fetch_add(1, Ordering::Relaxed);
                    }
                    other => panic!("a bad credential got {other}"),
                }
            }
        });
    }
    // Heartbeats while the flood runs: every one succeeds, promptly.
    let started = std::time::Instant::now();
    let mut beats = 0;
    while started.elapsed() < std::time::Duration::from_secs(3) {
        let at = std::time::Instant::now();
        let r = post(&server, "/agent/heartbeat", &agent, json!({})).await;
        assert_eq!(
            r.status,
            StatusCode::OK,
            "heartbeat during the flood: {r:?}"
        );
        assert!(
            at.elapsed() < std::time::Duration::from_secs(2),
            "heartbeat took {:?}",
            at.elapsed()
        );
        beats += 1;
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::Relaxed);
    while let Some(done) = flood.join_next().await {
        done.unwrap();
    }
    let flood_s = started.elapsed().as_secs_f64();

    let after = server.state.telemetry.encode();
    let delta = |series: &str| metric(&after, series) - metric(&before, series);
    let sent = sent.load(Ordering::Relaxed) as f64;
    // (A loaded CI box serves a heartbeat in a few hundred ms under the flood.)
    assert!(beats >= 3, "{beats} heartbeats");
    assert!(sent > 300.0, "the flood sent only {sent}");
    assert!(limited.load(Ordering::Relaxed) > 0, "no 429 seen");
    // Missing and malformed credentials are refused by shape; only well-formed unknown tokens
    // are looked up, and only as many as the budget allows: the burst, plus the lookups already
    // in flight when it ran out (at most one per flooding connection), plus the refill.
    let looked_up = delta("kvfleet_cp_auth_lookups_total{result=\"denied\"}")
        + delta("kvfleet_cp_auth_lookups_total{result=\"error\"}");
    let budget = 5.0 + 64.0 + 10.0 * flood_s + 1.0;
    eprintln!("{sent} bad requests in {flood_s:.1} s, {looked_up} looked up (budget {budget})");
    assert!(
        looked_up <= budget,
        "{looked_up} lookups for {sent} bad requests (budget {budget})"
    );
    assert!(delta("kvfleet_cp_auth_failures_total{reason=\"missing\"}") > 50.0);
    assert!(delta("kvfleet_cp_auth_failures_total{reason=\"malformed\"}") > 50.0);
    assert!(delta("kvfleet_cp_auth_rate_limited_total") > 50.0);
    assert!(delta("kvfleet_cp_auth_cache_hits_total") >= f64::from(beats));
    assert_eq!(
        delta("kvfleet_cp_db_errors_total{source=\"api\"}"),
        0.0,
        "no request failed on the database"
    );

    // The admin pool exhausted (every connection taken): agent traffic has a pool of its own.
    // (The replica's own background tasks hold some of them already.)
    let mut held = Vec::new();
    while let Ok(Ok(conn)) = tokio::time::timeout(
        std::time::Duration::from_millis(300),
        server.state.pool.acquire(),
    )
    .await
    {
        held.push(conn);
    }
    assert!(!held.is_empty());
    assert_eq!(server.state.pool.size(), 4);
    assert_eq!(server.state.pool.num_idle(), 0);
    for _ in 0..5 {
        let r = post(&server, "/agent/heartbeat", &agent, json!({})).await;
        assert_eq!(
            r.status,
            StatusCode::OK,
            "heartbeat with the admin pool taken: {r:?}"
        );
    }
    drop(held);

    // Removing the node revokes its credential, and this replica's cache forgets it at once.
    let r = call(
        Method::DELETE,
        &server.url(&format!("/nodes/{node}")),
        Some(&admin),
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    // (Not cached any more, its lookup spends 127.0.0.1's budget, which the flood emptied: 429
    // until the bucket refills a unit, then the lookup says 401. Never 200.)
    eventually(
        std::time::Duration::from_secs(15),
        "the removed node's credential refused",
        || async {
            let r = post(&server, "/agent/heartbeat", &agent, json!({})).await;
            assert!(
                [StatusCode::UNAUTHORIZED, StatusCode::TOO_MANY_REQUESTS].contains(&r.status),
                "{r:?}"
            );
            (r.status == StatusCode::UNAUTHORIZED).then_some(())
        },
    )
    .await;

    // The 429 is in the OpenAPI document for every route that takes a token, and only those.
    let doc = call(Method::GET, &server.url("/openapi.json"), None, None).await;
    let paths = &doc.body["paths"];
    let limited = &paths["/api/v1/agent/heartbeat"]["post"]["responses"]["429"];
    assert!(
        limited["content"]["application/problem+json"].is_object(),
        "{limited}"
    );
    assert!(limited["headers"]["Retry-After"].is_object(), "{limited}");
    assert!(paths["/api/v1/nodes"]["get"]["responses"]["429"].is_object());
    assert!(paths["/api/v1/status"]["get"]["responses"]["429"].is_null());
    server.stop().await;
}

/// The control plane as production runs it: every join waits for an admin.
fn approval_required() -> kvfleet_controlplane::Config {
    let mut config = test_config();
    config.join.auto_approve = false;
    config
}

async fn post_empty(server: &Server, path: &str, token: &str) -> common::Response {
    call(Method::POST, &server.url(path), Some(token), None).await
}

/// Issue #22: with approval required, a joined node is `pending`: it may heartbeat, but gets no
/// peer certificate and no workers; an admin (not an operator) approves it, and then it gets
/// both.
#[sqlx::test(migrator = "kvfleet_controlplane::store::MIGRATOR")]
async fn a_joined_node_is_pending_until_an_admin_approves_it(pool: PgPool) {
    let server = start(&pool, approval_required()).await;
    let admin = token(&pool, Role::Admin).await;
    let operator = token(&pool, Role::Operator).await;
    let join = token(&pool, Role::Join).await;
    let (node, agent, body) = register(&server, &join, "newcomer", 1).await;
    assert_eq!(body["approval"], "pending", "{body}");
    assert!(
        body["certificate"].is_null(),
        "a pending node got a certificate: {body}"
    );
    assert_eq!(
        audit_count(&pool, "node.register").await,
        1,
        "the join itself is audited"
    );
    let beat = post(&server, "/agent/heartbeat", &agent, json!({})).await;
    assert_eq!(beat.status, StatusCode::OK, "{beat:?}");
    assert_eq!(beat.body["approval"], "pending");
    assert_eq!(
        beat.body["node_state"], "healthy",
        "alive, just not admitted"
    );
    let renew = post(&server, "/agent/certificate", &agent, json!({})).await;
    assert_eq!(renew.status, StatusCode::CONFLICT, "{renew:?}");
    assert_eq!(renew.content_type, "application/problem+json");
    assert!(
        renew.body["detail"]
            .as_str()
            .unwrap()
            .contains(&format!("kvfleet nodes approve {node}")),
        "{renew:?}"
    );
    let pending = get(&server, "/nodes?approval=pending", &admin).await;
    assert_eq!(
        pending.body["items"].as_array().unwrap().len(),
        1,
        "{pending:?}"
    );
    assert_eq!(pending.body["items"][0]["id"], node.as_str());
    // A deployment wants a worker and the pending node's GPU is the only one: placement (every
    // 200 ms) leaves it alone.
    model_and_deployment(&server, &admin, "chat", 1).await;
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let workers = get(&server, "/workers", &admin).await;
    assert_eq!(workers.body["items"], json!([]), "{workers:?}");
    let desired = get(&server, "/agent/desired-state", &agent).await;
    assert_eq!(desired.body["workers"], json!([]), "{desired:?}");

    let refused = post_empty(&server, &format!("/nodes/{node}/approve"), &operator).await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN, "{refused:?}");
    let approved = post_empty(&server, &format!("/nodes/{node}/approve"), &admin).await;
    assert_eq!(approved.status, StatusCode::OK, "{approved:?}");
    assert_eq!(approved.body["approval"], "approved");
    // Approving again changes nothing and writes no second audit row.
    let again = post_empty(&server, &format!("/nodes/{node}/approve"), &admin).await;
    assert_eq!(again.status, StatusCode::OK, "{again:?}");
    assert_eq!(audit_count(&pool, "node.approve").await, 1);
    let beat = post(&server, "/agent/heartbeat", &agent, json!({})).await;
    assert_eq!(beat.body["approval"], "approved", "{beat:?}");
    let issued = post(&server, "/agent/certificate", &agent, json!({})).await;
    assert_eq!(issued.status, StatusCode::OK, "{issued:?}");
    assert!(
        issued.body["cert_pem"]
            .as_str()
            .unwrap()
            .contains("CERTIFICATE")
    );
    eventually(
        std::time::Duration::from_secs(10),
        "a worker on the approved node",
        || async {
            let workers = get(&server, "/workers", &admin).await;
            (workers.body["items"][0]["node_id"] == node.as_str()).then_some(())
        },
    )
    .await;
    // Its agent restarting re-registers with its credential and gets a certificate at once.
    let again = post(
        &server,
        "/agent/register",
        &agent,
        register_body("newcomer", 0),
    )
    .await;
    assert_eq!(again.status, StatusCode::OK, "{again:?}");
    assert_eq!(again.body["approval"], "approved");
    assert!(again.body["certificate"]["serial"].is_string(), "{again:?}");
    server.stop().await;
}

/// Issue #22: a rejected node is out for good: its credential is refused, the join token it
/// used is spent, an admin cannot approve it later, and its GPUs are free for another node.
#[sqlx::test(migrator = "kvfleet_controlplane::store::MIGRATOR")]
async fn a_rejected_node_cannot_join(pool: PgPool) {
    let server = start(&pool, approval_required()).await;
    let admin = token(&pool, Role::Admin).await;
    let r = post(
        &server,
        "/tokens",
        &admin,
        json!({"name": "j", "role": "join"}),
    )
    .await;
    let join = r.body["secret"].as_str().unwrap().to_owned();
    let body = register_body("intruder", 1);
    let r = post(&server, "/agent/register", &join, body.clone()).await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    assert_eq!(r.body["approval"], "pending");
    let node = r.body["node_id"].as_str().unwrap().to_owned();
    let agent = r.body["credential"].as_str().unwrap().to_owned();
    // A pending node heartbeats: its credential is verified, and cached, before the rejection.
    let beat = post(&server, "/agent/heartbeat", &agent, json!({})).await;
    assert_eq!(beat.status, StatusCode::OK, "{beat:?}");
    let rejected = post_empty(&server, &format!("/nodes/{node}/reject"), &admin).await;
    assert_eq!(rejected.status, StatusCode::OK, "{rejected:?}");
    assert_eq!(rejected.body["approval"], "rejected");
    assert_eq!(rejected.body["state"], "removed");
    for (path, body) in [
        ("/agent/heartbeat", json!({})),
        ("/agent/register", body.clone()),
    ] {
        let r = post(&server, path, &agent, body).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{path}: {r:?}");
    }
    let r = post(&server, "/agent/register", &join, body.clone()).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{r:?}");
    let r = post_empty(&server, &format!("/nodes/{node}/approve"), &admin).await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{r:?}");
    assert_eq!(r.content_type, "application/problem+json");
    assert!(
        r.body["detail"].as_str().unwrap().contains("rejected"),
        "{r:?}"
    );
    // An admitted node is removed, not rejected.
    let other = token(&pool, Role::Join).await;
    let (admitted, _, _) = register(&server, &other, "admitted", 0).await;
    post_empty(&server, &format!("/nodes/{admitted}/approve"), &admin).await;
    let r = post_empty(&server, &format!("/nodes/{admitted}/reject"), &admin).await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{r:?}");
    assert!(
        r.body["detail"].as_str().unwrap().contains("nodes remove"),
        "{r:?}"
    );
    // The rejected node's GPU was released: a real node with it may join.
    let mut legit = register_body("legit", 0);
    legit["gpus"] = body["gpus"].clone();
    let r = post(&server, "/agent/register", &other, legit).await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    server.stop().await;
}

/// Issue #22, for labs: `[join] auto_approve` admits a join at once, certificate included.
#[sqlx::test(migrator = "kvfleet_controlplane::store::MIGRATOR")]
async fn auto_approve_admits_joins_at_once(pool: PgPool) {
    let mut config = test_config();
    config.join.auto_approve = true;
    let server = start(&pool, config).await;
    let join = token(&pool, Role::Join).await;
    let (_, agent, body) = register(&server, &join, "lab-node", 0).await;
    assert_eq!(body["approval"], "approved", "{body}");
    assert!(body["certificate"]["cert_pem"].is_string(), "{body}");
    let beat = post(&server, "/agent/heartbeat", &agent, json!({})).await;
    assert_eq!(beat.body["approval"], "approved");
    let loaded = kvfleet_controlplane::Config::load(&kvfleet_controlplane::config::Source {
        file: Some(kvfleet_controlplane::config::FileSource {
            path: "/etc/kvfleet/controlplane.toml".into(),
            text: "[database]\nurl = \"postgres://x\"\n[join]\nauto_approve = true\n".into(),
        }),
        ..Default::default()
    })
    .unwrap();
    assert!(loaded.join.auto_approve);
    assert!(
        !kvfleet_controlplane::Config::new("postgres://x")
            .join
            .auto_approve,
        "off by default"
    );
    server.stop().await;
}

/// Issue #22: a GPU UUID has one owner. Another node reporting it, at registration or in a
/// heartbeat, is refused with a 409 naming the owner, counted, and changes nothing.
#[sqlx::test(migrator = "kvfleet_controlplane::store::MIGRATOR")]
async fn a_gpu_uuid_another_node_owns_is_refused(pool: PgPool) {
    let server = start(&pool, test_config()).await;
    let admin = token(&pool, Role::Admin).await;
    let join = token(&pool, Role::Join).await;
    let (owner, owner_agent, _) = register(&server, &join, "owner", 1).await;
    let listed = get(&server, &format!("/gpus?node_id={owner}"), &admin).await;
    let gpu_id = listed.body["items"][0]["id"].as_str().unwrap().to_owned();
    let mut thief = register_body("thief", 0);
    thief["gpus"] = json!([{"id": gpu_id, "index": 0, "name": "NVIDIA H100 80GB HBM3",
        "memory_total_bytes": 80_i64 << 30}]);
    let r = post(&server, "/agent/register", &join, thief.clone()).await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{r:?}");
    assert_eq!(r.content_type, "application/problem+json");
    let detail = r.body["detail"].as_str().unwrap();
    assert!(
        detail.contains(&gpu_id) && detail.contains(&owner) && detail.contains("gpus[0].id"),
        "{detail}"
    );
    // Nothing was made: no node, and the GPU still belongs to its owner.
    let nodes = get(&server, "/nodes", &admin).await;
    assert_eq!(
        nodes.body["items"].as_array().unwrap().len(),
        1,
        "{nodes:?}"
    );
    let g = get(&server, &format!("/gpus/{gpu_id}"), &admin).await;
    assert_eq!(g.body["node_id"], owner.as_str());
    // A node that joined without it cannot report it in a heartbeat either.
    let (_, thief_agent, _) = register(&server, &join, "thief", 0).await;
    let beat = post(
        &server,
        "/agent/heartbeat",
        &thief_agent,
        json!({"gpus": [{"id": gpu_id, "utilization": 0.5, "memory_used_bytes": 1}]}),
    )
    .await;
    assert_eq!(beat.status, StatusCode::CONFLICT, "{beat:?}");
    assert_eq!(beat.content_type, "application/problem+json");
    // Its owner reports it as before, in registrations and heartbeats.
    let again = post(&server, "/agent/register", &owner_agent, {
        let mut b = register_body("owner", 0);
        b["gpus"] = thief["gpus"].clone();
        b
    })
    .await;
    assert_eq!(again.status, StatusCode::OK, "{again:?}");
    let beat = post(
        &server,
        "/agent/heartbeat",
        &owner_agent,
        json!({"gpus": [{"id": gpu_id, "utilization": 0.5, "memory_used_bytes": 1}]}),
    )
    .await;
    assert_eq!(beat.status, StatusCode::OK, "{beat:?}");
    let metrics = reqwest::get(format!("http://{}/metrics", server.addr))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("kvfleet_cp_agent_gpu_claims_refused_total 2"),
        "{metrics}"
    );
    server.stop().await;
}

/// Issue #22: labels an admin sets are kept apart from the ones a node reports. Both are
/// visible, placement matches them merged with the admin's value winning on a shared key, and
/// the node's next report (its agent re-registering) leaves the admin's alone.
#[sqlx::test(migrator = "kvfleet_controlplane::store::MIGRATOR")]
async fn admin_labels_survive_a_nodes_report_and_win_in_placement(pool: PgPool) {
    let server = start(&pool, test_config()).await;
    let admin = token(&pool, Role::Admin).await;
    let operator = token(&pool, Role::Operator).await;
    let join = token(&pool, Role::Join).await;
    // b claims tier=gold itself; the admin says otherwise. a reports nothing; the admin makes
    // it gold. Only a may serve a gold deployment.
    let mut body_a = register_body("node-a", 1);
    body_a["labels"] = json!({"zone": "a"});
    let a = post(&server, "/agent/register", &join, body_a.clone()).await;
    let (a, a_agent) = (
        a.body["node_id"].as_str().unwrap().to_owned(),
        a.body["credential"].as_str().unwrap().to_owned(),
    );
    let mut body_b = register_body("node-b", 1);
    body_b["labels"] = json!({"tier": "gold"});
    let b = post(&server, "/agent/register", &join, body_b).await;
    let (b, b_agent) = (
        b.body["node_id"].as_str().unwrap().to_owned(),
        b.body["credential"].as_str().unwrap().to_owned(),
    );
    let r = post(
        &server,
        &format!("/nodes/{a}/labels"),
        &admin,
        json!({"set": {"tier": "gold", "rack": "r1"}}),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    assert_eq!(
        r.body["labels"],
        json!({"zone": "a", "tier": "gold", "rack": "r1"})
    );
    assert_eq!(r.body["reported_labels"], json!({"zone": "a"}));
    assert_eq!(
        r.body["admin_labels"],
        json!({"tier": "gold", "rack": "r1"})
    );
    let r = post(
        &server,
        &format!("/nodes/{b}/labels"),
        &admin,
        json!({"set": {"tier": "silver"}}),
    )
    .await;
    assert_eq!(r.body["labels"], json!({"tier": "silver"}), "{r:?}");
    assert_eq!(r.body["reported_labels"], json!({"tier": "gold"}));
    // Operators cannot; bad keys and a key both set and removed are 422 naming the field.
    let r = post(
        &server,
        &format!("/nodes/{a}/labels"),
        &operator,
        json!({"set": {"x": "y"}}),
    )
    .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{r:?}");
    for (bad, field) in [
        (json!({"set": {"bad key": "v"}}), "set.bad key"),
        (json!({"set": {"k": "v"}, "remove": ["k"]}), "remove.k"),
    ] {
        let r = post(&server, &format!("/nodes/{a}/labels"), &admin, bad.clone()).await;
        assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{bad}: {r:?}");
        assert_eq!(r.body["invalid_params"][0]["name"], field, "{bad}: {r:?}");
    }
    // The node's agent reports again (a restart): its labels change, the admin's stay.
    body_a["labels"] = json!({"zone": "c", "tier": "bronze"});
    let r = post(&server, "/agent/register", &a_agent, body_a).await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    let node = get(&server, &format!("/nodes/{a}"), &admin).await;
    assert_eq!(
        node.body["admin_labels"],
        json!({"tier": "gold", "rack": "r1"})
    );
    assert_eq!(
        node.body["reported_labels"],
        json!({"zone": "c", "tier": "bronze"})
    );
    assert_eq!(
        node.body["labels"],
        json!({"zone": "c", "tier": "gold", "rack": "r1"})
    );
    // Placement: a gold deployment lands on a (admin gold over reported bronze), never on b
    // (reported gold under admin silver).
    for agent in [&a_agent, &b_agent] {
        post(&server, "/agent/heartbeat", agent, json!({})).await;
    }
    let model = post(
        &server,
        "/models",
        &admin,
        json!({"name": "gold-model", "format": "mock", "path": "/m"}),
    )
    .await;
    assert_eq!(model.status, StatusCode::CREATED, "{model:?}");
    let d = post(
        &server,
        "/deployments",
        &admin,
        json!({"name": "gold", "model": "gold-model", "min_workers": 2, "max_workers": 2,
            "placement": {"node_labels": {"tier": "gold"}}}),
    )
    .await;
    assert_eq!(d.status, StatusCode::CREATED, "{d:?}");
    eventually(
        std::time::Duration::from_secs(10),
        "a worker on a",
        || async {
            let w = get(&server, "/workers", &admin).await;
            w.body["items"]
                .as_array()
                .unwrap()
                .iter()
                .any(|w| w["node_id"] == a.as_str())
                .then_some(())
        },
    )
    .await;
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    let w = get(&server, &format!("/workers?node_id={b}"), &admin).await;
    assert_eq!(w.body["items"], json!([]), "b is silver: {w:?}");
    // Removing an admin label gives the reported value back.
    let r = post(
        &server,
        &format!("/nodes/{b}/labels"),
        &admin,
        json!({"remove": ["tier"]}),
    )
    .await;
    assert_eq!(r.body["labels"], json!({"tier": "gold"}), "{r:?}");
    assert_eq!(audit_count(&pool, "node.labels").await, 3);
    server.stop().await;
}
