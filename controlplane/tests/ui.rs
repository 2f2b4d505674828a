//! The web UI's assets as the control plane serves them, and the two read-only endpoints the
//! UI relies on (`/whoami`, `/decisions`). The UI's behaviour in a browser is tested by
//! `web-ui/tests/` (Playwright + Chromium), which scripts/test.sh runs.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use kvfleet_controlplane::auth::Role;
use reqwest::StatusCode;
use serde_json::json;
use sqlx::PgPool;

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

#[sqlx::test(migrator = "kvfleet_controlplane::store::MIGRATOR")]
async fn ui_serves_index_and_assets_with_their_content_types(pool: PgPool) {
    let server = start(&pool, test_config()).await;
    let base = format!("http://{}", server.addr);
    let http = client();
    for (path, content_type, needle) in [
        (
            "/ui/",
            "text/html; charset=utf-8",
            "<script type=\"module\" src=\"/ui/js/app.js\">",
        ),
        // App routes fall back to index.html so they can be bookmarked and reloaded.
        (
            "/ui/deployments",
            "text/html; charset=utf-8",
            "<main id=\"main\"",
        ),
        (
            "/ui/nodes/0b7a3c1e-0000-4000-8000-000000000000",
            "text/html; charset=utf-8",
            "<main id=\"main\"",
        ),
        (
            "/ui/js/app.js",
            "text/javascript; charset=utf-8",
            "export function navigate",
        ),
        (
            "/ui/js/pages/deployments.js",
            "text/javascript; charset=utf-8",
            "invalid_params",
        ),
        ("/ui/style.css", "text/css; charset=utf-8", ":root"),
        ("/ui/favicon.svg", "image/svg+xml", "<svg"),
    ] {
        let r = http.get(format!("{base}{path}")).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{path}");
        let headers = r.headers().clone();
        assert_eq!(headers["content-type"], content_type, "{path}");
        assert_eq!(headers["cache-control"], "no-cache", "{path}");
        assert_eq!(headers["x-content-type-options"], "nosniff", "{path}");
        assert!(
            headers["content-security-policy"]
                .to_str()
                .unwrap()
                .contains("script-src 'self'"),
            "{path}"
        );
        let body = r.text().await.unwrap();
        assert!(body.contains(needle), "{path}: {needle} not in the body");
        // Revalidation with the ETag answers 304 without a body.
        let etag = headers["etag"].clone();
        let again = http
            .get(format!("{base}{path}"))
            .header("if-none-match", etag.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(again.status(), StatusCode::NOT_MODIFIED, "{path}");
        assert_eq!(again.headers()["etag"], etag);
        assert!(again.bytes().await.unwrap().is_empty());
    }
    // A missing file is 404, not the app shell (a broken import must not get HTML back).
    let r = http
        .get(format!("{base}/ui/js/nope.js"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    for from in ["/", "/ui"] {
        let r = http.get(format!("{base}{from}")).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::PERMANENT_REDIRECT, "{from}");
        assert_eq!(r.headers()["location"], "/ui/", "{from}");
    }
    // The UI's routes sit beside the API and do not shadow it.
    let r = http
        .get(format!("{base}/api/v1/nope"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    server.stop().await;
}

#[sqlx::test(migrator = "kvfleet_controlplane::store::MIGRATOR")]
async fn whoami_names_the_role_and_what_it_may_do(pool: PgPool) {
    let server = start(&pool, test_config()).await;
    for (role, permissions) in [
        (Role::Admin, json!(["read", "operate", "admin"])),
        (Role::Operator, json!(["read", "operate"])),
        (Role::Viewer, json!(["read"])),
    ] {
        let token = token(&pool, role).await;
        let r = get(&server, "/whoami", &token).await;
        assert_eq!(r.status, StatusCode::OK, "{r:?}");
        assert_eq!(r.body["role"], role.as_str());
        assert_eq!(r.body["permissions"], permissions);
        assert!(
            r.body["actor"]
                .as_str()
                .unwrap()
                .starts_with(&format!("test {role}"))
        );
    }
    let join = token(&pool, Role::Join).await;
    assert_eq!(
        get(&server, "/whoami", &join).await.status,
        StatusCode::FORBIDDEN
    );
    let anonymous = call(reqwest::Method::GET, &server.url("/whoami"), None, None).await;
    assert_eq!(anonymous.status, StatusCode::UNAUTHORIZED);
    server.stop().await;
}

#[sqlx::test(migrator = "kvfleet_controlplane::store::MIGRATOR")]
async fn decisions_show_placement_with_reasons_to_viewers(pool: PgPool) {
    let server = start(&pool, test_config()).await;
    let admin = token(&pool, Role::Admin).await;
    let viewer = token(&pool, Role::Viewer).await;
    let join = post(
        &server,
        "/tokens",
        &admin,
        json!({"name": "j", "role": "join"}),
    )
    .await;
    let join = join.body["secret"].as_str().unwrap().to_owned();
    let (node, credential, _) = register(&server, &join, "node-a", 2).await;
    post(&server, "/agent/heartbeat", &credential, json!({})).await;
    let (_, deployment) = model_and_deployment(&server, &admin, "chat", 2).await;

    let decisions = eventually(
        Duration::from_secs(15),
        "two placement decisions",
        || async {
            let r = get(&server, "/decisions", &viewer).await;
            assert_eq!(r.status, StatusCode::OK, "{r:?}");
            let items = r.body["items"].as_array().unwrap().clone();
            (items.len() >= 2).then_some(items)
        },
    )
    .await;
    for d in &decisions {
        assert_eq!(d["source"], "placement");
        assert_eq!(d["action"], "worker.create");
        assert_eq!(d["deployment_id"], deployment.as_str());
        assert_eq!(d["node_id"], node.as_str());
        assert_eq!(
            d["reason"],
            "fewer aggregated workers than the deployment's target; placed one on a GPU"
        );
    }
    // Newest first, and pages like every other list.
    assert!(decisions[0]["id"].as_i64() > decisions[1]["id"].as_i64());
    let first = get(&server, "/decisions?limit=1", &viewer).await;
    let cursor = first.body["next_cursor"].as_str().unwrap().to_owned();
    let second = get(
        &server,
        &format!("/decisions?limit=1&cursor={cursor}"),
        &viewer,
    )
    .await;
    assert_eq!(second.body["items"][0]["id"], decisions[1]["id"]);

    // A drain is a decision too, with the reason placement gave.
    post(&server, &format!("/nodes/{node}/drain"), &admin, json!({})).await;
    let drained = eventually(Duration::from_secs(15), "a drain decision", || async {
        let r = get(&server, &format!("/decisions?node_id={node}"), &viewer).await;
        r.body["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["action"] == "worker.stop" || d["action"] == "worker.drain")
            .cloned()
    })
    .await;
    assert_eq!(drained["reason"], "node draining");
    assert_eq!(
        drained["deployment_id"],
        deployment.as_str(),
        "resolved from the worker row"
    );

    // Filters: by source, by deployment; an unknown source names the parameter.
    let r = get(&server, "/decisions?source=liveness", &viewer).await;
    assert_eq!(r.body["items"], json!([]));
    let other = uuid::Uuid::new_v4();
    let r = get(
        &server,
        &format!("/decisions?deployment_id={other}"),
        &viewer,
    )
    .await;
    assert_eq!(r.body["items"], json!([]));
    let r = get(&server, "/decisions?source=people", &viewer).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(r.body["invalid_params"][0]["name"], "source");
    // People's changes are in the audit log, not here.
    let r = get(&server, "/decisions?limit=500", &viewer).await;
    assert!(
        r.body["items"]
            .as_array()
            .unwrap()
            .iter()
            .all(|d| d["source"] == "placement"),
        "{:?}",
        r.body
    );
    server.stop().await;
}
