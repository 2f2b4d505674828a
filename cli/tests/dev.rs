//! `kvfleet dev` end to end: the real binaries (kvfleet, kvfleet-controlplane, kvfleet-agent)
//! on a private PostgreSQL cluster. With the mock engine: wait for the printed URLs, get a chat
//! completion, look at the fleet with the admin commands, stop with SIGTERM (every port freed),
//! start again (the cluster, the token and the node are reused), `kill -9` it and start again
//! (the leftover children are stopped, the running cluster is reused), stop with SIGINT (what
//! Ctrl-C sends). With `--disaggregated`: a long prompt goes through the prefill worker, and a
//! rerun without the flag returns the deployment to aggregated. With the real SmolLM2 model when
//! `KVFLEET_SMOLLM2_GGUF` is set.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::{Child, Command};

/// Why this machine cannot run the test, if it cannot.
fn missing_prerequisite() -> Option<String> {
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_kvfleet"))
        .parent()?
        .to_path_buf();
    for name in ["kvfleet-controlplane", "kvfleet-agent"] {
        if !bin_dir.join(name).is_file() {
            return Some(format!(
                "{name} is not built next to kvfleet ({}): cargo build -p kvfleet-controlplane \
                 -p kvfleet-agent (scripts/test.sh builds the whole workspace)",
                bin_dir.display()
            ));
        }
    }
    let has_postgres = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .any(|v| v.path().join("bin/initdb").exists());
    if !has_postgres {
        return Some(
            "no PostgreSQL server binaries under /usr/lib/postgresql (apt install postgresql)"
                .to_owned(),
        );
    }
    None
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running `kvfleet dev`; dropped without `stop`, it is terminated (so a failing test leaves
/// nothing behind).
struct Dev {
    child: Option<Child>,
    /// Everything it wrote to stderr so far (progress lines).
    stderr: Arc<Mutex<String>>,
    /// The summary it printed on stdout (up to the admin token).
    summary: String,
}

impl Dev {
    fn start(state: &Path, ports: &Ports, model: &[&str]) -> Dev {
        let child = Command::new(env!("CARGO_BIN_EXE_kvfleet"))
            .arg("dev")
            .args(model)
            .args(["--ready-timeout", "240"])
            .arg("--state-dir")
            .arg(state)
            .args(["--openai-port", &ports.openai.to_string()])
            .args(["--api-port", &ports.api.to_string()])
            .args(["--peer-port", &ports.peer.to_string()])
            .args(["--pg-port", &ports.pg.to_string()])
            // The private cluster, not a database the test run may have set.
            .env_remove("DATABASE_URL")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        Dev {
            child: Some(child),
            stderr: Arc::default(),
            summary: String::new(),
        }
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Reads stdout until the summary is printed: (OpenAI base URL, admin token).
    async fn wait_for_summary(&mut self) -> (String, String) {
        let child = self.child.as_mut().unwrap();
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        // Collect stderr as it comes, so the child never blocks on a full pipe.
        let collected = self.stderr.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let mut text = collected.lock().unwrap();
                text.push_str(&line);
                text.push('\n');
            }
        });
        let mut lines = BufReader::new(stdout).lines();
        let mut openai = None;
        let summary = &mut self.summary;
        let read = async {
            while let Some(line) = lines.next_line().await.unwrap() {
                summary.push_str(&line);
                summary.push('\n');
                let words: Vec<&str> = line.split_whitespace().collect();
                match words.as_slice() {
                    ["OpenAI", "API", url, ..] => openai = Some((*url).to_owned()),
                    ["Admin", "token", token] => return Some((*token).to_owned()),
                    _ => {}
                }
            }
            None
        };
        let token = tokio::time::timeout(Duration::from_secs(240), read).await;
        match (token, openai) {
            (Ok(Some(token)), Some(url)) => (url, token),
            (outcome, _) => {
                tokio::time::sleep(Duration::from_secs(1)).await;
                panic!(
                    "kvfleet dev did not print its summary ({outcome:?}); stderr:\n{}",
                    self.stderr()
                );
            }
        }
    }

    /// Sends `signal` (TERM, INT, KILL), then the exit status within 90 s.
    async fn stop(mut self, signal: &str) -> std::process::ExitStatus {
        let mut child = self.child.take().unwrap();
        let pid = child.id().unwrap();
        std::process::Command::new("kill")
            .args([&format!("-{signal}"), &pid.to_string()])
            .status()
            .unwrap();
        tokio::time::timeout(Duration::from_secs(90), child.wait())
            .await
            .expect("kvfleet dev stops within 90 s of SIGTERM")
            .unwrap()
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        if let Some(child) = &self.child
            && let Some(pid) = child.id()
        {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
            std::thread::sleep(Duration::from_secs(10));
        }
    }
}

struct Ports {
    openai: u16,
    api: u16,
    peer: u16,
    pg: u16,
}

async fn chat(openai: &str, model: &str) -> serde_json::Value {
    let response = reqwest::Client::new()
        .post(format!("{openai}/chat/completions"))
        .json(&serde_json::json!({
            "model": model,
            "messages": [{"role": "user", "content": "Say hello."}],
            "max_tokens": 8,
        }))
        .send()
        .await
        .unwrap();
    let status = response.status();
    let body: serde_json::Value = response.json().await.unwrap();
    assert!(status.is_success(), "{status}: {body}");
    body
}

/// A new state directory and free ports for one `kvfleet dev` run.
fn fresh_state_and_ports() -> (PathBuf, Ports) {
    let state: PathBuf = std::env::temp_dir().join(format!(
        "kvfleet-dev-test-{}",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&state).unwrap();
    let ports = Ports {
        openai: free_port(),
        api: free_port(),
        peer: free_port(),
        pg: free_port(),
    };
    (state, ports)
}

fn port_is_free(port: u16) -> bool {
    std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_runs_a_one_node_fleet_and_restarts_idempotently() {
    if let Some(reason) = missing_prerequisite() {
        eprintln!("skipped dev_runs_a_one_node_fleet_and_restarts_idempotently: {reason}");
        return;
    }
    let (state, ports) = fresh_state_and_ports();

    let mock = ["--mock"];
    let mut dev = Dev::start(&state, &ports, &mock);
    let (openai, token) = dev.wait_for_summary().await;
    assert_eq!(openai, format!("http://127.0.0.1:{}/v1", ports.openai));
    let completion = chat(&openai, "mock").await;
    assert_eq!(completion["object"], "chat.completion", "{completion}");
    assert!(completion["usage"]["completion_tokens"].as_u64().unwrap() > 0);
    assert!(dev.stderr().contains("creating a PostgreSQL cluster"));
    // The dev fleet is keyed like any other: its agent got the fleet hash secret from the
    // control plane (the log names the event, never the secret).
    let agent_log = std::fs::read_to_string(state.join("kvfleet-agent.log")).unwrap();
    assert!(agent_log.contains("fleet hash key set"), "{agent_log}");
    // The cluster trusts nobody: TCP needs the kvfleet role's password (kept 0600 beside it),
    // and the password is not on any process's command line.
    {
        use std::os::unix::fs::PermissionsExt as _;
        let pg = state.join("pg");
        let hba = std::fs::read_to_string(pg.join("data/pg_hba.conf")).unwrap();
        assert!(!hba.contains("trust"), "{hba}");
        assert!(hba.contains("scram-sha-256"), "{hba}");
        let password_file = pg.join("kvfleet-password");
        let mode = std::fs::metadata(&password_file)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let password = std::fs::read_to_string(&password_file).unwrap();
        let password = password.trim();
        let url = |auth: &str| format!("postgres://{auth}@127.0.0.1:{}/kvfleet", ports.pg);
        let refused = <sqlx::PgConnection as sqlx::Connection>::connect(&url("kvfleet")).await;
        assert!(refused.is_err(), "no password, no connection");
        let accepted =
            <sqlx::PgConnection as sqlx::Connection>::connect(&url(&format!("kvfleet:{password}")))
                .await;
        assert!(accepted.is_ok(), "{:?}", accepted.err());
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline);
            assert!(
                !cmdline.contains(password),
                "the password is on a command line: {cmdline}"
            );
        }
    }

    // The admin commands see the fleet kvfleet dev made.
    let api = format!("http://127.0.0.1:{}", ports.api);
    let env = [
        ("KVFLEET_URL", api.as_str()),
        ("KVFLEET_TOKEN", token.as_str()),
    ];
    let login = state.join("cli.toml");
    let nodes = common::kvfleet_with(&login, &["nodes", "--json"], &env, "").await;
    let nodes = nodes.expect(0).json();
    assert_eq!(nodes.as_array().map(Vec::len), Some(1), "{nodes}");
    assert_eq!(nodes[0]["state"], "healthy");
    let workers = common::kvfleet_with(&login, &["workers", "--json"], &env, "").await;
    let workers = workers.expect(0).json();
    assert_eq!(workers[0]["observed_state"], "ready", "{workers}");
    // The table shows the blocks the chat left in the worker's cache, per tier, as the fleet
    // KV index knows them (the agent uploads its events every half second).
    let kv_column = |table: &str| -> Option<(u64, u64, u64)> {
        let header = table.lines().next()?;
        let at = header.find("KV G1/G2/G3")?;
        let row = table.lines().nth(1)?;
        let cell = row.get(at..)?.split_whitespace().next()?;
        let mut parts = cell.split('/').map(|p| p.parse::<u64>().ok());
        Some((parts.next()??, parts.next()??, parts.next()??))
    };
    let mut table = String::new();
    let mut seen = None;
    for _ in 0..40 {
        let run = common::kvfleet_with(&login, &["workers"], &env, "").await;
        table = run.expect(0).stdout.clone();
        seen = kv_column(&table).filter(|(g1, _, _)| *g1 > 0);
        if seen.is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    assert!(seen.is_some(), "no G1 blocks in the KV column:\n{table}");
    let node_id = nodes[0]["id"].clone();

    let status = dev.stop("TERM").await;
    assert!(status.success(), "kvfleet dev exits 0 on SIGTERM: {status}");
    for port in [ports.openai, ports.api, ports.pg] {
        assert!(
            port_is_free(port),
            "port {port} is still held after stopping"
        );
    }

    // Again: the same cluster (the data survived), the same admin token, the same node.
    let mut dev = Dev::start(&state, &ports, &mock);
    let (openai_again, token_again) = dev.wait_for_summary().await;
    assert_eq!((openai_again, &token_again), (openai.clone(), &token));
    chat(&openai, "mock").await;
    let nodes = common::kvfleet_with(&login, &["nodes", "--json"], &env, "").await;
    let nodes = nodes.expect(0).json();
    assert_eq!(nodes.as_array().map(Vec::len), Some(1), "{nodes}");
    assert_eq!(
        nodes[0]["id"], node_id,
        "the agent rejoined as the same node"
    );

    // kill -9 leaves the children and PostgreSQL running; the next start copes.
    dev.stop("KILL").await;
    assert!(
        !port_is_free(ports.api),
        "the orphaned control plane still listens"
    );
    let mut dev = Dev::start(&state, &ports, &mock);
    dev.wait_for_summary().await;
    let progress = dev.stderr();
    assert!(
        progress.contains("reusing the running PostgreSQL cluster"),
        "{progress}"
    );
    assert!(progress.contains("left by an earlier run"), "{progress}");
    chat(&openai, "mock").await;

    // Another admin revokes the token dev saved (the last live one cannot be revoked, so a
    // second comes first); the next run notices and makes itself a new one.
    let other = common::kvfleet_with(
        &login,
        &["tokens", "create", "--name", "other", "--role", "admin"],
        &env,
        "",
    )
    .await;
    let other = other.expect(0).stdout.trim().to_owned();
    let other_env = [
        ("KVFLEET_URL", api.as_str()),
        ("KVFLEET_TOKEN", other.as_str()),
    ];
    common::kvfleet_with(&login, &["tokens", "revoke", &token[..16]], &other_env, "")
        .await
        .expect(0);
    dev.stop("INT").await;
    let mut dev = Dev::start(&state, &ports, &mock);
    let (_, recovered) = dev.wait_for_summary().await;
    assert_ne!(recovered, token, "a new admin token");
    assert!(
        dev.stderr()
            .contains("the saved admin token no longer works"),
        "{}",
        dev.stderr()
    );
    let recovered_env = [
        ("KVFLEET_URL", api.as_str()),
        ("KVFLEET_TOKEN", recovered.as_str()),
    ];
    common::kvfleet_with(&login, &["nodes", "--json"], &recovered_env, "")
        .await
        .expect(0);
    chat(&openai, "mock").await;

    // Ctrl-C sends SIGINT: the same clean stop.
    let status = dev.stop("INT").await;
    assert!(status.success(), "kvfleet dev exits 0 on SIGINT: {status}");
    for port in [ports.openai, ports.api, ports.pg] {
        assert!(
            port_is_free(port),
            "port {port} is still held after stopping"
        );
    }
    let _ = std::fs::remove_dir_all(&state);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_serves_the_default_smollm2_model() {
    if let Some(reason) = missing_prerequisite() {
        eprintln!("skipped dev_serves_the_default_smollm2_model: {reason}");
        return;
    }
    if std::env::var_os("KVFLEET_SMOLLM2_GGUF").is_none() {
        eprintln!(
            "skipped dev_serves_the_default_smollm2_model: KVFLEET_SMOLLM2_GGUF is not set \
             (source scripts/lib/common.sh && ensure_default_model)"
        );
        return;
    }
    let (state, ports) = fresh_state_and_ports();
    // No --model: kvfleet dev finds the default model through KVFLEET_SMOLLM2_GGUF.
    let mut dev = Dev::start(&state, &ports, &[]);
    let (openai, _token) = dev.wait_for_summary().await;
    let completion = chat(&openai, "smollm2-135m-instruct").await;
    let text = completion["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default();
    assert!(!text.trim().is_empty(), "{completion}");
    let status = dev.stop("TERM").await;
    assert!(status.success(), "{status}");
    let _ = std::fs::remove_dir_all(&state);
}

/// A completion of a prompt well past `kvfleet dev --disaggregated`'s remote-prefill threshold
/// (64 tokens): its usage.
async fn long_completion(openai: &str) -> serde_json::Value {
    let prompt = "The quick brown fox jumps over the lazy dog. ".repeat(40);
    let response = reqwest::Client::new()
        .post(format!("{openai}/completions"))
        .json(&serde_json::json!({"model": "mock", "prompt": prompt, "max_tokens": 4}))
        .send()
        .await
        .unwrap();
    let status = response.status();
    let body: serde_json::Value = response.json().await.unwrap();
    assert!(status.is_success(), "{status}: {body}");
    assert_eq!(body["object"], "text_completion", "{body}");
    body["usage"].clone()
}

/// The agent's `kvfleet_disagg_prefill_total{outcome="remote"}` (0 when absent).
async fn remote_prefills(frontend: &str) -> u64 {
    let text = reqwest::get(format!("{frontend}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("kvfleet_disagg_prefill_total{outcome=\"remote\"} "))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0)
}

/// The deployment `dev` as the REST API shows it.
async fn dev_deployment(api: &str, token: &str) -> serde_json::Value {
    let page: serde_json::Value = reqwest::Client::new()
        .get(format!("{api}/api/v1/deployments"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .error_for_status()
        .unwrap()
        .json()
        .await
        .unwrap();
    page["items"]
        .as_array()
        .and_then(|items| items.iter().find(|d| d["name"] == "dev"))
        .cloned()
        .unwrap_or_else(|| panic!("no deployment dev: {page}"))
}

/// The live workers of the deployment `dev`: (role, observed state), sorted.
async fn dev_workers(api: &str, token: &str, deployment_id: &str) -> Vec<(String, String)> {
    let page: serde_json::Value = reqwest::Client::new()
        .get(format!(
            "{api}/api/v1/workers?deployment_id={deployment_id}"
        ))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .error_for_status()
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut workers: Vec<(String, String)> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| {
            (
                w["role"].as_str().unwrap().to_owned(),
                w["observed_state"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    workers.sort();
    workers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_disaggregated_prefills_remotely_and_a_rerun_converges_back() {
    if let Some(reason) = missing_prerequisite() {
        eprintln!(
            "skipped dev_disaggregated_prefills_remotely_and_a_rerun_converges_back: {reason}"
        );
        return;
    }
    let (state, ports) = fresh_state_and_ports();
    let frontend = format!("http://127.0.0.1:{}", ports.openai);
    let api = format!("http://127.0.0.1:{}", ports.api);

    let mut dev = Dev::start(&state, &ports, &["--mock", "--disaggregated"]);
    let (openai, token) = dev.wait_for_summary().await;
    assert!(
        dev.summary.contains("disaggregated")
            && dev.summary.contains("kvfleet_disagg_prefill_total"),
        "{}",
        dev.summary
    );
    let deployment = dev_deployment(&api, &token).await;
    assert_eq!(deployment["mode"], "disaggregated", "{deployment}");
    assert_eq!(deployment["min_workers"], 2, "{deployment}");
    assert_eq!(
        deployment["disaggregation"]["min_remote_prefill_tokens"],
        64
    );
    let id = deployment["id"].as_str().unwrap().to_owned();
    // kvfleet dev printed its summary only once both workers were ready.
    assert_eq!(
        dev_workers(&api, &token, &id).await,
        [
            ("decode".to_owned(), "ready".to_owned()),
            ("prefill".to_owned(), "ready".to_owned())
        ]
    );
    assert_eq!(remote_prefills(&frontend).await, 0);
    let usage = long_completion(&openai).await;
    assert!(
        usage["prompt_tokens"].as_u64().unwrap() >= 64,
        "the prompt is past the threshold: {usage}"
    );
    assert!(usage["completion_tokens"].as_u64().unwrap() > 0, "{usage}");
    assert_eq!(
        remote_prefills(&frontend).await,
        1,
        "the long prompt went through the prefill worker; the agent log:\n{}",
        std::fs::read_to_string(state.join("kvfleet-agent.log")).unwrap_or_default()
    );
    let status = dev.stop("TERM").await;
    assert!(status.success(), "{status}");

    // Without the flag: the same deployment, back to one aggregated worker.
    let mut dev = Dev::start(&state, &ports, &["--mock"]);
    let (_, token) = dev.wait_for_summary().await;
    assert!(
        dev.stderr()
            .contains("switching deployment dev from disaggregated to aggregated"),
        "{}",
        dev.stderr()
    );
    let deployment = dev_deployment(&api, &token).await;
    assert_eq!(deployment["id"], id.as_str(), "{deployment}");
    assert_eq!(deployment["mode"], "aggregated", "{deployment}");
    assert_eq!(deployment["max_workers"], 1, "{deployment}");
    assert_eq!(
        dev_workers(&api, &token, &id).await,
        [("aggregated".to_owned(), "ready".to_owned())]
    );
    long_completion(&openai).await;
    assert_eq!(remote_prefills(&frontend).await, 0);
    let status = dev.stop("TERM").await;
    assert!(status.success(), "{status}");
    let _ = std::fs::remove_dir_all(&state);
}
