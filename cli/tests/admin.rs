//! The admin commands against a real control plane (library on 127.0.0.1:0, real Postgres via
//! `$DATABASE_URL`): login, models and deployments from TOML (valid, invalid with the field
//! named, exit codes), tokens, `--json` output, and an unreachable server; joins approved,
//! rejected and labelled (this harness requires approval, as production does).

mod common;

use std::os::unix::fs::PermissionsExt as _;
use std::time::Duration;

use common::{ControlPlane, kvfleet_with};

const MODEL: &str = r#"
name = "mock-model"
format = "mock"
path = "mock"
"#;

const DEPLOYMENT: &str = r#"# a deployment
name = "chat"
model = "mock-model"
min_workers = 1
max_workers = 2

[sla]
ttft_ms = 500
itl_ms = 50

[placement]
allow_cpu = true
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_checks_the_token_and_saves_a_private_file() {
    let Some(cp) = ControlPlane::start("login_checks_the_token_and_saves_a_private_file").await
    else {
        return;
    };
    let url = cp.url();

    // Nothing configured: a usage error that says what to do.
    let run = cp.kvfleet(&["nodes"], &[], "").await;
    run.expect(2);
    assert!(run.stderr.contains("kvfleet login"), "{run:?}");

    // A wrong token is refused (exit 3) and nothing is saved.
    let bogus = "kvf_AAAAAAAAAAAA_BBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB";
    cp.kvfleet(&["login", &url, "--token-stdin"], &[], bogus)
        .await
        .expect(3);
    assert!(!cp.cli_config().exists());

    // The admin token is accepted, saved with mode 0600, and used by later commands.
    let run = cp
        .kvfleet(
            &["login", &url, "--token-stdin"],
            &[],
            &format!("{}\n", cp.admin_token),
        )
        .await;
    run.expect(0);
    assert!(run.stderr.contains("role admin"), "{run:?}");
    let mode = std::fs::metadata(cp.cli_config())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the login file holds a secret");
    let saved = std::fs::read_to_string(cp.cli_config()).unwrap();
    assert!(saved.contains(&url) && saved.contains(&cp.admin_token));

    let nodes = cp.kvfleet(&["nodes", "--json"], &[], "").await;
    nodes.expect(0);
    assert_eq!(nodes.json(), serde_json::json!([]));
    let status = cp.kvfleet(&["status", "--json"], &[], "").await;
    status.expect(0);
    let access = status.json()["access"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(access.starts_with("role admin, token "), "{status:?}");
    assert!(status.json()["status"]["schema_version"].as_i64().unwrap() > 0);

    // KVFLEET_TOKEN overrides the file: a bad one is an auth failure (3).
    let run = cp
        .kvfleet(&["nodes"], &[("KVFLEET_TOKEN", bogus)], "")
        .await;
    run.expect(3);
    assert!(run.stderr.contains("HTTP 401"), "{run:?}");

    cp.kvfleet(&["logout"], &[], "").await.expect(0);
    assert!(!cp.cli_config().exists());
    cp.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployments_apply_creates_updates_and_names_refused_fields() {
    let Some(cp) =
        ControlPlane::start("deployments_apply_creates_updates_and_names_refused_fields").await
    else {
        return;
    };
    let model = cp.file("model.toml", MODEL);
    let chat = cp.file("chat.toml", DEPLOYMENT);

    // A deployment of a model that does not exist: refused, the field named (exit 1).
    let run = cp.admin(&["deployments", "apply", "-f", &chat]).await;
    run.expect(1);
    assert!(run.stderr.contains(":3: model: no model named"), "{run:?}");

    let run = cp.admin(&["models", "apply", "-f", &model]).await;
    run.expect(0);
    assert!(run.stderr.contains("model mock-model created"), "{run:?}");
    // Applying the same model again changes nothing.
    let run = cp.admin(&["models", "apply", "-f", &model]).await;
    run.expect(0);
    assert!(run.stderr.contains("unchanged"), "{run:?}");

    let run = cp
        .admin(&["deployments", "apply", "-f", &chat, "--json"])
        .await;
    run.expect(0);
    let created = run.json();
    assert_eq!(created["name"], "chat");
    assert_eq!(created["sla"]["ttft_ms"], 500);
    assert_eq!(created["placement"]["allow_cpu"], true);

    // The table and the JSON list agree.
    let run = cp.admin(&["deployments"]).await;
    run.expect(0);
    let header = run.stdout.lines().next().unwrap_or_default();
    assert!(
        header.starts_with("ID") && header.contains("READY"),
        "{run:?}"
    );
    assert!(run.stdout.contains("chat") && run.stdout.contains("mock-model"));
    let list = cp.admin(&["deployments", "list", "--json"]).await.json();
    assert_eq!(list.as_array().map(Vec::len), Some(1));

    // Apply again with a change: the same deployment, updated.
    let bigger = cp.file(
        "bigger.toml",
        &DEPLOYMENT.replace("max_workers = 2", "max_workers = 3"),
    );
    let run = cp.admin(&["deployments", "apply", "-f", &bigger]).await;
    run.expect(0);
    assert!(run.stderr.contains("deployment chat configured"), "{run:?}");
    let got = cp.admin(&["deployments", "get", "chat", "--json"]).await;
    got.expect(0);
    assert_eq!(got.json()["max_workers"], 3);
    assert_eq!(got.json()["id"], created["id"]);

    // Invalid values: every field named with its line; nothing changes.
    let invalid = cp.file(
        "invalid.toml",
        &DEPLOYMENT
            .replace("min_workers = 1", "min_workers = 5")
            .replace("ttft_ms = 500", "ttft_ms = -5"),
    );
    let run = cp.admin(&["deployments", "apply", "-f", &invalid]).await;
    run.expect(1);
    assert!(
        run.stderr.contains(&format!("{invalid}:4: min_workers:")),
        "{run:?}"
    );
    assert!(
        run.stderr.contains(&format!("{invalid}:8: sla.ttft_ms:")),
        "{run:?}"
    );
    let after = cp
        .admin(&["deployments", "get", "chat", "--json"])
        .await
        .json();
    assert_eq!(
        (
            after["min_workers"].clone(),
            after["sla"]["ttft_ms"].clone()
        ),
        (1.into(), 500.into())
    );

    // The disaggregation policy comes from a `[disaggregation]` table; a bad value is refused
    // with its field and line, a good one is applied.
    let policy = |timeout: u32| {
        DEPLOYMENT.replacen(
            "max_workers = 2\n",
            &format!(
                "max_workers = 2\nmode = \"disaggregated\"\n\n[disaggregation]\n\
                 min_remote_prefill_tokens = 64\nprefill_timeout_ms = {timeout}\n"
            ),
            1,
        )
    };
    let too_short = cp.file("too-short.toml", &policy(5));
    let run = cp.admin(&["deployments", "apply", "-f", &too_short]).await;
    run.expect(1);
    assert!(
        run.stderr.contains(&format!(
            "{too_short}:10: disaggregation.prefill_timeout_ms:"
        )),
        "{run:?}"
    );
    let disaggregated = cp.file("disaggregated.toml", &policy(2000));
    let run = cp
        .admin(&["deployments", "apply", "-f", &disaggregated])
        .await;
    run.expect(0);
    assert!(run.stderr.contains("deployment chat configured"), "{run:?}");
    let got = cp
        .admin(&["deployments", "get", "chat", "--json"])
        .await
        .json();
    assert_eq!(got["mode"], "disaggregated");
    assert_eq!(
        got["disaggregation"],
        serde_json::json!({
            "min_remote_prefill_tokens": 64,
            "max_prefill_queue_tokens": 16384,
            "prefill_timeout_ms": 2000,
        })
    );
    let run = cp.admin(&["deployments", "get", "chat"]).await;
    run.expect(0);
    assert!(
        run.stdout
            .contains("remote prefill from 64 uncached tokens"),
        "{run:?}"
    );

    // An unknown field (a typo) is refused by the server, by name.
    let typo = cp.file(
        "typo.toml",
        "name = \"other\"\nmodel = \"mock-model\"\nmin_worker = 1\n",
    );
    let run = cp.admin(&["deployments", "apply", "-f", &typo]).await;
    run.expect(1);
    assert!(run.stderr.contains("min_worker"), "{run:?}");

    // A TOML syntax error is a usage error (2), caught before any request.
    let broken = cp.file("broken.toml", "name = \"chat\"\nmin_workers = = 1\n");
    let run = cp.admin(&["deployments", "apply", "-f", &broken]).await;
    run.expect(2);
    assert!(run.stderr.contains("not valid TOML"), "{run:?}");
    // The model of a deployment cannot change.
    let other_model = cp.file(
        "other.toml",
        &DEPLOYMENT.replace("\"mock-model\"", "\"elsewhere\""),
    );
    cp.admin(&["deployments", "apply", "-f", &other_model])
        .await
        .expect(1);

    // The audit log has the changes, newest first.
    let audit = cp.admin(&["audit", "--json", "-n", "50"]).await.json();
    let actions: Vec<&str> = audit
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["action"].as_str())
        .collect();
    assert!(actions.contains(&"deployment.create"), "{actions:?}");
    assert!(actions.contains(&"model.create"), "{actions:?}");

    // rm, then the deployment is gone (4), and so is the model once unused.
    cp.admin(&["deployments", "rm", "chat"]).await.expect(0);
    cp.admin(&["deployments", "get", "chat"]).await.expect(4);
    cp.admin(&["deployments", "rm", "chat"]).await.expect(4);
    cp.admin(&["models", "rm", "mock-model"]).await.expect(0);
    assert_eq!(
        cp.admin(&["models", "--json"]).await.json(),
        serde_json::json!([])
    );
    cp.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_create_and_revoke_with_roles_enforced() {
    let Some(cp) = ControlPlane::start("tokens_create_and_revoke_with_roles_enforced").await else {
        return;
    };
    let url = cp.url();

    // The secret alone on stdout, so scripts can capture it.
    let run = cp
        .admin(&[
            "tokens",
            "create",
            "--name",
            "ci",
            "--role",
            "viewer",
            "--expires-in",
            "1h",
        ])
        .await;
    run.expect(0);
    let secret = run.stdout.trim().to_owned();
    assert!(
        secret.starts_with("kvf_") && !secret.contains('\n'),
        "{run:?}"
    );

    // A viewer reads but may not change anything (exit 3, the role named as the reason).
    let viewer = [
        ("KVFLEET_URL", url.as_str()),
        ("KVFLEET_TOKEN", secret.as_str()),
    ];
    cp.kvfleet(&["nodes"], &viewer, "").await.expect(0);
    let model = cp.file("model.toml", MODEL);
    let run = cp
        .kvfleet(&["models", "apply", "-f", &model], &viewer, "")
        .await;
    run.expect(3);
    assert!(run.stderr.contains("HTTP 403"), "{run:?}");
    cp.kvfleet(&["tokens"], &viewer, "").await.expect(3);

    let list = cp.admin(&["tokens", "--json"]).await;
    list.expect(0);
    let ci = list
        .json()
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "ci")
        .cloned()
        .unwrap();
    assert_eq!(ci["role"], "viewer");
    assert!(ci["expires_at"].is_string());
    assert!(!list.stdout.contains(&secret), "secrets are never listed");

    // Revoke by the token itself (its public prefix); then it no longer works.
    let run = cp.admin(&["tokens", "revoke", &secret, "--json"]).await;
    run.expect(0);
    assert!(run.json()["revoked_at"].is_string());
    cp.kvfleet(&["nodes"], &viewer, "").await.expect(3);
    cp.admin(&["tokens", "revoke", "no-such-token"])
        .await
        .expect(4);

    // A join token cannot log in: it only registers nodes.
    let join = cp
        .admin(&["tokens", "create", "--name", "node", "--role", "join"])
        .await;
    join.expect(0);
    let run = cp
        .kvfleet(&["login", &url, "--token-stdin"], &[], &join.stdout)
        .await;
    run.expect(3);
    assert!(run.stderr.contains("join token"), "{run:?}");

    // Bad flags are usage errors (2).
    cp.admin(&["tokens", "create", "--name", "x", "--role", "wizard"])
        .await
        .expect(2);
    cp.admin(&["nodes", "get", "no-such-node"]).await.expect(4);
    cp.stop().await;
}

#[tokio::test]
async fn an_unreachable_control_plane_exits_5() {
    // A port that was just free: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let dir = std::env::temp_dir().join(format!("kvfleet-cli-unreachable-{port}"));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("cli.toml");
    let env = [("KVFLEET_URL", url.as_str()), ("KVFLEET_TOKEN", "kvf_x")];
    for args in [
        &["nodes"][..],
        &["deployments", "--json"],
        &["tokens", "create", "--name", "a", "--role", "viewer"],
    ] {
        let run = kvfleet_with(&config, args, &env, "").await;
        run.expect(5);
        assert!(
            run.stderr.contains("cannot reach the control plane"),
            "{run:?}"
        );
        assert!(run.stdout.is_empty(), "{run:?}");
    }
    let run = kvfleet_with(&config, &["login", &url, "--token-stdin"], &[], "kvf_x\n").await;
    run.expect(5);
    assert!(!config.exists());
    // No token at all is an auth problem (3), found before any request.
    let run = kvfleet_with(&config, &["nodes"], &[("KVFLEET_URL", url.as_str())], "").await;
    run.expect(3);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `kvfleet profiles MODEL --upload FILE`: a file that is malformed, not monotone or for another
/// model is refused with the problem named, and nothing is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn profile_uploads_name_what_is_wrong_and_store_nothing() {
    let Some(cp) =
        ControlPlane::start("profile_uploads_name_what_is_wrong_and_store_nothing").await
    else {
        return;
    };
    let model = cp.file("model.toml", MODEL);
    cp.admin(&["models", "apply", "-f", &model]).await.expect(0);
    let shipped = kvfleet_engine::DEFAULT_PERF_PROFILE_TOML;
    let good = shipped.replace(
        "model = \"llama-3.1-8b-instruct\"",
        "model = \"mock-model\"",
    );
    assert_ne!(good, shipped);
    let stored = || async {
        let list = cp.admin(&["profiles", "mock-model", "--json"]).await;
        list.expect(0);
        list.json().as_array().map_or(0, Vec::len)
    };

    // Malformed: the file and the parser's complaint (exit 2, nothing sent).
    let broken = cp.file(
        "broken.toml",
        "format = 1\nmodel = \"mock-model\"\n[prefill\n",
    );
    let run = cp
        .admin(&["profiles", "mock-model", "--upload", &broken])
        .await;
    run.expect(2);
    assert!(
        run.stderr.contains("broken.toml") && run.stderr.contains("does not parse"),
        "{run:?}"
    );
    // Not monotone: a longer prompt prefilled faster (exit 2, the field named).
    let faster = good.replace("ms = [17.4745, 18.4525,", "ms = [17.4745, 10.0,");
    assert_ne!(faster, good);
    let faster = cp.file("faster.toml", &faster);
    let run = cp
        .admin(&["profiles", "mock-model", "--upload", &faster])
        .await;
    run.expect(2);
    assert!(
        run.stderr.contains("prefill.ms") && run.stderr.contains("not monotone"),
        "{run:?}"
    );
    // For another model: the control plane refuses it (exit 1), naming both models.
    let other = cp.file("other.toml", shipped);
    let run = cp
        .admin(&["profiles", "mock-model", "--upload", &other])
        .await;
    run.expect(1);
    assert!(
        run.stderr.contains("llama-3.1-8b-instruct") && run.stderr.contains("mock-model"),
        "{run:?}"
    );
    assert_eq!(stored().await, 0, "nothing stored");

    let good = cp.file("good.toml", &good);
    cp.admin(&["profiles", "mock-model", "--upload", &good])
        .await
        .expect(0);
    assert_eq!(stored().await, 1);
}

/// An https control plane is reached through its fleet CA (`--ca-file`, saved by `login`), and
/// without it the CLI says what to pass instead of failing obscurely.
#[tokio::test]
async fn https_control_planes_are_trusted_through_the_ca_file() {
    let Some(cp) = ControlPlane::start_with("https_control_planes", true).await else {
        return;
    };
    let url = cp.url();
    assert!(url.starts_with("https://"), "{url}");
    let ca_file = cp.file("fleet-ca.pem", cp.ca_pem.as_deref().unwrap());
    let env = [
        ("KVFLEET_URL", url.as_str()),
        ("KVFLEET_TOKEN", cp.admin_token.as_str()),
    ];

    let run = cp.kvfleet(&["nodes"], &env, "").await;
    run.expect(5);
    assert!(run.stderr.contains("--ca-file"), "{run:?}");

    // Another CA's certificate does not vouch for it.
    let (other, _) = kvfleet_controlplane::ca::NodeCa::generate(
        "another fleet",
        chrono::Utc::now(),
        Duration::from_secs(3600),
    )
    .unwrap();
    let other_file = cp.file("other-ca.pem", other.cert_pem());
    let run = cp
        .kvfleet(&["nodes", "--ca-file", &other_file], &env, "")
        .await;
    run.expect(5);

    let run = cp
        .kvfleet(&["nodes", "--ca-file", &ca_file], &env, "")
        .await;
    run.expect(0);

    // A service's environment (no HOME, no login file) with the URL and token given: the
    // login file is not looked for (what packaging/test-install.sh runs under systemd).
    let mut bare = env.to_vec();
    bare.extend([
        ("KVFLEET_CLI_CONFIG", ""),
        ("HOME", ""),
        ("XDG_CONFIG_HOME", ""),
    ]);
    let run = cp
        .kvfleet(&["nodes", "--ca-file", &ca_file], &bare, "")
        .await;
    run.expect(0);
    let run = cp.kvfleet(&["nodes"], &bare, "").await;
    run.expect(5);
    assert!(run.stderr.contains("--ca-file"), "{run:?}");

    // A join token carries the fingerprint its agent pins, the CA's own: one string to paste
    // (issue #22, `kvfj1.<hex>.<secret>`), so no separate ca_fingerprint line is printed.
    let run = cp
        .kvfleet(
            &[
                "tokens",
                "create",
                "--name",
                "gpu-07",
                "--role",
                "join",
                "--ca-file",
                &ca_file,
            ],
            &env,
            "",
        )
        .await;
    run.expect(0);
    let pin = kvfleet_proto::CaFingerprint::of_pem(cp.ca_pem.as_deref().unwrap()).unwrap();
    let pasted = kvfleet_proto::JoinTokenText::parse(run.stdout.trim()).unwrap();
    assert!(run.stdout.trim().starts_with("kvfj1."), "{run:?}");
    assert_eq!(pasted.ca, Some(pin), "{run:?}");
    assert!(pasted.bearer.starts_with("kvf_"), "{run:?}");
    assert!(
        run.stderr
            .contains(&format!("carries this fleet's CA fingerprint ({pin})"))
            && !run.stderr.contains("ca_fingerprint = "),
        "{run:?}"
    );
    // --json shows both: the secret alone and the string to paste.
    let run = cp
        .kvfleet(
            &[
                "tokens",
                "create",
                "--name",
                "gpu-08",
                "--role",
                "join",
                "--ca-file",
                &ca_file,
                "--json",
            ],
            &env,
            "",
        )
        .await;
    run.expect(0);
    let created: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    let secret = created["secret"].as_str().unwrap();
    assert_eq!(
        created["join_token"].as_str().unwrap(),
        kvfleet_proto::JoinTokenText::compose(&pin, secret),
        "{run:?}"
    );
    // A viewer token is a bearer token only.
    let run = cp
        .kvfleet(
            &[
                "tokens",
                "create",
                "--name",
                "v",
                "--role",
                "viewer",
                "--ca-file",
                &ca_file,
                "--json",
            ],
            &env,
            "",
        )
        .await;
    run.expect(0);
    assert!(!run.stdout.contains("join_token"), "{run:?}");

    // `kvfleet api` GETs any path through the same URL, token and CA: the API and the UI.
    let run = cp
        .kvfleet(&["api", "/api/v1/status", "--ca-file", &ca_file], &env, "")
        .await;
    run.expect(0);
    assert!(run.stdout.contains("\"schema_version\""), "{run:?}");
    let run = cp
        .kvfleet(&["api", "/ui/", "--ca-file", &ca_file], &env, "")
        .await;
    run.expect(0);
    assert!(run.stdout.to_lowercase().contains("<html"), "{run:?}");
    let run = cp
        .kvfleet(&["api", "/api/v1/nope", "--ca-file", &ca_file], &env, "")
        .await;
    run.expect(4);
    let run = cp
        .kvfleet(&["api", "status", "--ca-file", &ca_file], &env, "")
        .await;
    run.expect(2);

    // `login` saves the CA file with the URL and the token; later commands need neither flag.
    let token_line = format!("{}\n", cp.admin_token);
    let run = cp
        .kvfleet(
            &["login", &url, "--token-stdin", "--ca-file", &ca_file],
            &[],
            &token_line,
        )
        .await;
    run.expect(0);
    let run = cp.kvfleet(&["nodes", "--json"], &[], "").await;
    run.expect(0);
    cp.stop().await;
}

/// Registers a node as its agent would (with a join token); returns (node id, credential).
#[allow(clippy::unwrap_used)] // a test helper: a failed call fails the test
async fn join(cp: &ControlPlane, token: &str, hostname: &str) -> (String, String) {
    let response = reqwest::Client::new()
        .post(format!("{}/api/v1/agent/register", cp.url()))
        .bearer_auth(token)
        .json(&serde_json::json!({"hostname": hostname, "labels": {"zone": "reported"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["approval"], "pending", "{body}");
    (
        body["node_id"].as_str().unwrap().to_owned(),
        body["credential"].as_str().unwrap().to_owned(),
    )
}

/// Issue #22 from the CLI: `nodes list` shows pending joins (and says how to decide), `approve`
/// lets one in, `reject` turns one away for good, `label` sets and removes admin labels that
/// sit beside the reported ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_joins_are_approved_rejected_and_labelled() {
    let Some(cp) = ControlPlane::start("pending_joins_are_approved_rejected_and_labelled").await
    else {
        return;
    };
    let token = cp
        .admin(&[
            "tokens", "create", "--name", "rack", "--role", "join", "--uses", "2",
        ])
        .await;
    token.expect(0);
    let token = token.stdout.trim().to_owned();
    let (a, _) = join(&cp, &token, "node-a").await;
    let (b, b_credential) = join(&cp, &token, "node-b").await;

    let run = cp.admin(&["nodes"]).await;
    run.expect(0);
    assert!(run.stdout.contains("APPROVAL"), "{run:?}");
    assert_eq!(run.stdout.matches("pending").count(), 2, "{run:?}");
    assert!(
        run.stderr.contains("2 node(s) wait for approval")
            && run.stderr.contains("kvfleet nodes approve"),
        "{run:?}"
    );
    let pending = cp.admin(&["nodes", "list", "--pending", "--json"]).await;
    pending.expect(0);
    assert_eq!(pending.json().as_array().unwrap().len(), 2);

    let run = cp.admin(&["nodes", "approve", "node-a"]).await;
    run.expect(0);
    assert!(run.stderr.contains("approved"), "{run:?}");
    let run = cp.admin(&["nodes", "get", &a, "--json"]).await;
    assert_eq!(run.json()["approval"], "approved");

    let run = cp.admin(&["nodes", "reject", &b, "--json"]).await;
    run.expect(0);
    assert_eq!(run.json()["approval"], "rejected");
    assert_eq!(run.json()["state"], "removed");
    // Its agent is out: its credential is refused.
    let beat = reqwest::Client::new()
        .post(format!("{}/api/v1/agent/heartbeat", cp.url()))
        .bearer_auth(&b_credential)
        .json(&serde_json::json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(beat.status(), 401);
    // Deciding again is refused with the reason (exit 1).
    let run = cp.admin(&["nodes", "approve", &b]).await;
    run.expect(1);
    assert!(run.stderr.contains("rejected"), "{run:?}");
    let run = cp.admin(&["nodes", "reject", "node-a"]).await;
    run.expect(1);
    assert!(run.stderr.contains("nodes remove"), "{run:?}");

    // Admin labels: set two, override the reported zone, then remove one.
    let run = cp
        .admin(&["nodes", "label", "node-a", "zone=admin", "tier=gold"])
        .await;
    run.expect(0);
    assert!(run.stderr.contains("tier=gold"), "{run:?}");
    let run = cp
        .admin(&["nodes", "label", "node-a", "tier-", "--json"])
        .await;
    run.expect(0);
    let node = run.json();
    assert_eq!(node["admin_labels"], serde_json::json!({"zone": "admin"}));
    assert_eq!(
        node["reported_labels"],
        serde_json::json!({"zone": "reported"})
    );
    assert_eq!(node["labels"], serde_json::json!({"zone": "admin"}));
    let run = cp.admin(&["nodes", "get", "node-a"]).await;
    assert!(
        run.stdout.contains("admin labels") && run.stdout.contains("zone=reported"),
        "{run:?}"
    );
    // A malformed argument is a usage error before anything is sent.
    cp.admin(&["nodes", "label", "node-a", "no equals sign"])
        .await
        .expect(2);
    cp.stop().await;
}

/// Issue #24 from the CLI: a worker its agent reports failed shows, in `kvfleet workers`, the
/// engine it runs and the agent's reason on one line (`--json` keeps the whole text).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::unwrap_used)] // a failed call fails the test
async fn workers_show_a_failed_workers_engine_and_reason() {
    let Some(cp) = ControlPlane::start("workers_show_a_failed_workers_engine_and_reason").await
    else {
        return;
    };
    let token = cp
        .admin(&["tokens", "create", "--name", "llama", "--role", "join"])
        .await;
    token.expect(0);
    let client = reqwest::Client::new();
    let registered: serde_json::Value = client
        .post(format!("{}/api/v1/agent/register", cp.url()))
        .bearer_auth(token.stdout.trim())
        .json(&serde_json::json!({"hostname": "llama-node", "cpu_slots": 1}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let credential = registered["credential"].as_str().unwrap().to_owned();
    cp.admin(&["nodes", "approve", "llama-node"])
        .await
        .expect(0);
    cp.admin(&["models", "apply", "-f", &cp.file("model.toml", MODEL)])
        .await
        .expect(0);
    cp.admin(&[
        "deployments",
        "apply",
        "-f",
        &cp.file("chat.toml", DEPLOYMENT),
    ])
    .await
    .expect(0);
    // The worker placed on the node (healthy once it heartbeats), as its agent learns it.
    let mut worker = None;
    for _ in 0..150 {
        client
            .post(format!("{}/api/v1/agent/heartbeat", cp.url()))
            .bearer_auth(&credential)
            .json(&serde_json::json!({"workers": []}))
            .send()
            .await
            .unwrap();
        let desired: serde_json::Value = client
            .get(format!("{}/api/v1/agent/desired-state", cp.url()))
            .bearer_auth(&credential)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        worker = desired["workers"][0]["worker_id"].as_i64();
        if worker.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let worker = worker.expect("no worker placed on the node");
    let reason = "llamacpp: cannot start /nonexistent/llama-server: No such file or directory \
                  (os error 2)\nset the model's `command` to llama-server's path";
    let beat = client
        .post(format!("{}/api/v1/agent/heartbeat", cp.url()))
        .bearer_auth(&credential)
        .json(
            &serde_json::json!({"workers": [{"worker_id": worker, "state": "failed",
            "engine": "llamacpp b6123", "error": reason}]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(beat.status(), 200, "{:?}", beat.text().await);

    let run = cp.admin(&["workers"]).await;
    run.expect(0);
    let row = run
        .stdout
        .lines()
        .find(|l| l.contains("llama-node"))
        .unwrap_or_else(|| panic!("no row for the worker: {run:?}"));
    assert!(row.contains("failed"), "{row}");
    assert!(row.contains("llamacpp b6123"), "{row}");
    // The reason on the row's one line, its newline folded.
    assert!(
        row.contains("cannot start /nonexistent/llama-server")
            && row.contains("(os error 2) set the model's"),
        "{row}"
    );
    let json = cp.admin(&["workers", "--json"]).await;
    json.expect(0);
    let listed = json.json();
    let listed = listed.as_array().unwrap();
    assert_eq!(listed[0]["observed_error"], reason);
    assert_eq!(listed[0]["observed_engine"], "llamacpp b6123");
    cp.stop().await;
}
