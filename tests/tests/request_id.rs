//! One request id from the client to the last token, in every log: two agents run as real
//! processes (the agent binary, JSON logs on stderr into a file each, their worker processes
//! logging into the same file), a `disaggregated` deployment of the mock model puts the prefill
//! worker on one node and the decode worker on the other. A request with `X-Request-Id` enters
//! the prefill node: its decode leg is forwarded to the decode node, which asks the prefill node
//! for the prefill leg. The id comes back in the response header and appears in the log lines of
//! both agents and both workers. Both agents' `/metrics` pass `promtool check metrics` (when
//! Prometheus's `promtool` is installed).
//!
//! Needs `DATABASE_URL` (`source scripts/lib/common.sh && ensure_test_postgres`); without it the
//! test prints why and skips.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    clippy::print_stderr,
    unreachable_pub
)]

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use kvfleet_controlplane::auth::Role;
use serde_json::{Value, json};

/// Two full KV blocks and a bit: a prompt the fleet router routes (shorter ones stay local).
const PROMPT: &str = "a prompt long enough for two blocks of sixteen tokens each, and more";

/// An agent process and the file its (and its workers') logs go to.
struct AgentProcess {
    child: tokio::process::Child,
    log: PathBuf,
    addr: String,
}

impl AgentProcess {
    async fn start(name: &str, cp: &ControlPlane, join: &str) -> Self {
        let dir = temp_dir(name);
        std::fs::create_dir_all(&dir).unwrap();
        let toml = format!(
            "[node]\nname = \"{name}\"\n\
             [log]\nlevel = \"info\"\nformat = \"json\"\n\
             [frontend]\nlisten = \"127.0.0.1:0\"\n\
             [supervisor]\nsocket_dir = {sockets:?}\nrestart_backoff_initial_ms = 100\n\
             [[models]]\nname = \"{MODEL}\"\nengine = \"mock\"\ncontext_length = 256\n\
             block_size = 16\nkv_blocks = 256\n\
             [control_plane]\nurl = \"{url}\"\njoin_token = \"{join}\"\nstate_dir = {state:?}\n\
             watch_wait_secs = 2\nrequest_timeout_secs = 2\n\
             retry_backoff_initial_ms = 100\nretry_backoff_max_ms = 500\ncpu_slots = 1\n\
             [peer]\nlisten = \"127.0.0.1:0\"\n",
            sockets = dir.join("sockets"),
            url = cp.base(),
            state = dir.join("state"),
        );
        let config = dir.join("agent.toml");
        std::fs::write(&config, toml).unwrap();
        let log = dir.join("agent.log");
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_kvfleet-e2e-agent"))
            .arg("run")
            .arg("--config")
            .arg(&config)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        // The frontend's address, from the agent's first log line about it.
        let mut addr = None;
        wait_for(
            &format!("{name} to say where it listens"),
            Duration::from_secs(30),
            || {
                addr = lines(&log).iter().find_map(|l| {
                    (l["message"] == "kvfleet-agent starting")
                        .then(|| l["addr"].as_str().map(str::to_owned))
                        .flatten()
                });
                std::future::ready(addr.is_some())
            },
        )
        .await;
        Self {
            child,
            log,
            addr: addr.unwrap(),
        }
    }

    async fn get(&self, path: &str) -> (reqwest::StatusCode, String) {
        let response = reqwest::get(format!("http://{}{path}", self.addr))
            .await
            .unwrap();
        (response.status(), response.text().await.unwrap())
    }

    /// The role of this node's ready worker, if it has one.
    async fn ready_role(&self) -> Option<String> {
        let (_, body) = self.get("/ready").await;
        let body: Value = serde_json::from_str(&body).ok()?;
        body["workers"]
            .as_array()?
            .iter()
            .find(|w| w["state"] == "ready")
            .and_then(|w| w["role"].as_str().map(str::to_owned))
    }

    async fn metric(&self, line_prefix: &str) -> f64 {
        let (_, text) = self.get("/metrics").await;
        text.lines()
            .find_map(|l| l.strip_prefix(line_prefix)?.trim().parse().ok())
            .unwrap_or(0.0)
    }

    /// SIGTERM, then the exit.
    async fn stop(mut self) -> PathBuf {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
        let _ = tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await;
        self.log
    }
}

/// The JSON log lines of `path` (other lines, e.g. a panic, are skipped).
fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Whether a log line came from a worker process (its lines run in the `worker` span).
fn from_worker(line: &Value) -> bool {
    line["span"]["name"] == "worker"
}

fn promtool_check(who: &str, text: &str) {
    use std::io::Write as _;
    let Ok(mut promtool) = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    else {
        eprintln!("SKIPPED promtool on {who}: promtool is not installed (apt install prometheus)");
        return;
    };
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let output = promtool.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "promtool check metrics on {who}:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_disaggregated_forwarded_requests_id_is_in_both_agents_and_both_workers_logs() {
    let Some(db) = TestDb::create().await else {
        eprintln!("SKIPPED: DATABASE_URL is not set");
        return;
    };
    let cp =
        ControlPlane::start(&db, "127.0.0.1:0".parse().unwrap(), Duration::from_secs(60)).await;
    let admin = token(&db, Role::Admin).await;
    let join = token(&db, Role::Join).await;
    let a = AgentProcess::start("rid-a", &cp, &join).await;
    let b = AgentProcess::start("rid-b", &cp, &join).await;
    wait_nodes_healthy(&cp, &admin, &["rid-a", "rid-b"]).await;
    register_and_deploy(
        &cp,
        &admin,
        json!({"name": MODEL, "format": "mock", "path": "mock", "block_size": 16,
            "context_length": 256}),
        json!({"name": "split", "model": MODEL, "mode": "disaggregated",
            "min_workers": 2, "max_workers": 2, "placement": {"allow_cpu": true},
            "disaggregation": {"min_remote_prefill_tokens": 0, "prefill_timeout_ms": 60000}}),
    )
    .await;
    wait_for(
        "a prefill worker on one node and a decode worker on the other",
        Duration::from_secs(60),
        || async {
            let roles = (a.ready_role().await, b.ready_role().await);
            matches!(
                (roles.0.as_deref(), roles.1.as_deref()),
                (Some("prefill"), Some("decode")) | (Some("decode"), Some("prefill"))
            )
        },
    )
    .await;
    let (prefill, decode) = if a.ready_role().await.as_deref() == Some("prefill") {
        (a, b)
    } else {
        (b, a)
    };
    wait_for(
        "both fleet routers to know both workers",
        Duration::from_secs(30),
        || async {
            prefill.metric("kvfleet_fleet_router_workers ").await == 2.0
                && decode.metric("kvfleet_fleet_router_workers ").await == 2.0
        },
    )
    .await;

    // Requests enter the prefill node until one is disaggregated and forwarded (the routers
    // may still be learning where the workers are for the first ones).
    let client = reqwest::Client::new();
    let remote_prefills = "kvfleet_disagg_prefill_total{outcome=\"remote\"} ";
    let mut id = None;
    for attempt in 0..50 {
        let before = decode.metric(remote_prefills).await;
        let candidate = format!("e2e-rid-{attempt}-{}", uuid::Uuid::new_v4().simple());
        let response = client
            .post(format!("http://{}/v1/completions", prefill.addr))
            .header("x-request-id", &candidate)
            .json(&json!({"model": MODEL, "prompt": PROMPT, "max_tokens": 4, "stream": true}))
            .send()
            .await
            .unwrap();
        assert_eq!(
            response.headers()["x-request-id"].to_str().unwrap(),
            candidate,
            "the id comes back in the response headers, whatever the status"
        );
        if response.status() == 503 {
            // Only a prefill worker here, and the router does not know the decode one yet.
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        assert_eq!(response.status(), 200);
        let body = response.text().await.unwrap();
        assert!(body.contains("[DONE]"), "{body}");
        if decode.metric(remote_prefills).await > before {
            id = Some(candidate);
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let id = id.expect("a request disaggregated across the two nodes");
    // An id the client did not give is made up, and returned all the same.
    let response = client
        .post(format!("http://{}/v1/completions", prefill.addr))
        .json(&json!({"model": MODEL, "prompt": PROMPT, "max_tokens": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let generated = response.headers()["x-request-id"].to_str().unwrap();
    assert!(!generated.is_empty());

    for (who, node) in [("prefill node", &prefill), ("decode node", &decode)] {
        let (status, text) = node.get("/metrics").await;
        assert_eq!(status, 200);
        promtool_check(who, &text);
    }

    let prefill_log = prefill.stop().await;
    let decode_log = decode.stop().await;
    cp.stop().await;
    db.drop_now().await;
    for (who, log) in [("prefill node", &prefill_log), ("decode node", &decode_log)] {
        let lines = lines(log);
        let about: Vec<&Value> = lines
            .iter()
            .filter(|l| l.to_string().contains(&id))
            .collect();
        let agent = about.iter().filter(|l| !from_worker(l)).count();
        let worker = about.iter().filter(|l| from_worker(l)).count();
        println!("{who}: {agent} agent and {worker} worker log lines name {id}");
        assert!(
            agent > 0,
            "{who}'s agent logged nothing about {id}: {}",
            log.display()
        );
        assert!(
            worker > 0,
            "{who}'s worker logged nothing about {id}: {}",
            log.display()
        );
    }
}
