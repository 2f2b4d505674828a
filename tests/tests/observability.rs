//! Observability shipped, checked against the real thing: a Prometheus server (Debian's
//! `prometheus` package) scrapes a control plane and two agents (one with a fake GPU) serving
//! traffic, every query of the Grafana dashboard in `packaging/grafana/` returns at least one
//! series, the alert rules in `packaging/prometheus/` load and evaluate without error, and every
//! `/metrics` passes `promtool check metrics`.
//!
//! Needs `prometheus` and `promtool` on PATH and `DATABASE_URL`; without them it says why and
//! skips, unless `KVFLEET_REQUIRE_PROMETHEUS=1` (scripts/test.sh sets it), which makes a missing
//! Prometheus a failure.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    unreachable_pub
)]

mod common;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;
use kvfleet_agent::gpu::FakeInventory;
use kvfleet_controlplane::auth::Role;
use serde_json::{Value, json};

/// How often the test Prometheus scrapes and evaluates rules.
const SCRAPE: &str = "1s";
/// What the dashboard's `$__rate_interval` stands for here (several scrapes).
const RATE_INTERVAL: &str = "15s";
/// How long every query gets to return data once Prometheus runs.
const QUERY_DEADLINE: Duration = Duration::from_secs(45);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Whether `prometheus` and `promtool` run; `Err` with the reason when not.
fn prometheus_available() -> Result<(), String> {
    for tool in ["prometheus", "promtool"] {
        match Command::new(tool).arg("--version").output() {
            Ok(out) if out.status.success() => {}
            Ok(out) => return Err(format!("{tool} --version failed: {out:?}")),
            Err(e) => {
                return Err(format!(
                    "{tool} is not installed ({e}); apt-get install prometheus"
                ));
            }
        }
    }
    Ok(())
}

/// A Prometheus server on a free loopback port with a throwaway data directory, killed on drop.
struct Prometheus {
    child: Child,
    dir: PathBuf,
    base: String,
}

impl Prometheus {
    fn start(agents: &[String], control_plane: &str) -> Self {
        let dir = temp_dir("prometheus");
        std::fs::create_dir_all(&dir).unwrap();
        let rules = repo().join("packaging/prometheus/kvfleet-alerts.yml");
        let targets = |list: &[String]| {
            list.iter()
                .map(|t| format!("\"{t}\""))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let config = format!(
            "global:\n  scrape_interval: {SCRAPE}\n  evaluation_interval: {SCRAPE}\n\
             rule_files:\n  - {rules:?}\n\
             scrape_configs:\n\
             \x20 - job_name: kvfleet-agent\n    static_configs:\n      - targets: [{}]\n\
             \x20 - job_name: kvfleet-controlplane\n    static_configs:\n      - targets: [{}]\n",
            targets(agents),
            targets(&[control_plane.to_owned()]),
        );
        let config_path = dir.join("prometheus.yml");
        std::fs::write(&config_path, config).unwrap();
        let check = Command::new("promtool")
            .arg("check")
            .arg("config")
            .arg(&config_path)
            .output()
            .unwrap();
        assert!(check.status.success(), "promtool check config: {check:?}");
        // A free port: bound, read, released (Prometheus binds it a moment later).
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting prometheus");
        Self {
            child,
            dir,
            base: format!("http://127.0.0.1:{port}"),
        }
    }

    fn log(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// `GET /api/v1/<path>?query=<query>`: the `data` of a successful answer.
    async fn api(&self, path: &str, query: Option<&str>) -> Result<Value, String> {
        let mut url = format!("{}/api/v1/{path}", self.base);
        if let Some(query) = query {
            url.push_str("?query=");
            url.push_str(&percent_encode(query));
        }
        let response = reqwest::get(&url).await.map_err(|e| e.to_string())?;
        let body: Value = response.json().await.map_err(|e| e.to_string())?;
        if body["status"] != "success" {
            return Err(format!("{path} {query:?}: {body}"));
        }
        Ok(body["data"].clone())
    }

    /// How many series an instant query returns.
    async fn series(&self, query: &str) -> Result<usize, String> {
        let data = self.api("query", Some(query)).await?;
        Ok(data["result"].as_array().map_or(0, Vec::len))
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// One query of the dashboard: where it is and what it asks, variables substituted.
#[derive(Debug)]
struct Query {
    panel: String,
    expr: String,
}

/// Every panel target's and template variable's query, with the variables Grafana would
/// substitute set to "all nodes and models" and the documented job names.
fn dashboard_queries() -> Vec<Query> {
    let path = repo().join("packaging/grafana/kvfleet-fleet.json");
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).expect("dashboard JSON");
    let substitute = |expr: &str| {
        expr.replace("$__rate_interval", RATE_INTERVAL)
            .replace("$agent_job", "kvfleet-agent")
            .replace("$cp_job", "kvfleet-controlplane")
            .replace("$node", ".*")
            .replace("$model", ".*")
    };
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        if panel["type"] == "row" {
            continue;
        }
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "panel {} has no query", panel["title"]);
        for target in targets {
            let expr = target["expr"].as_str().unwrap();
            assert!(!expr.contains("$__interval") || expr.contains("$__rate_interval"));
            queries.push(Query {
                panel: panel["title"].as_str().unwrap().to_owned(),
                expr: substitute(expr),
            });
        }
    }
    // `label_values(selector, label)` variables: the same data as `count by (label) (selector)`.
    for variable in dashboard["templating"]["list"].as_array().unwrap() {
        if variable["type"] != "query" {
            continue;
        }
        let definition = variable["definition"].as_str().unwrap();
        let inner = definition
            .strip_prefix("label_values(")
            .and_then(|d| d.strip_suffix(')'))
            .unwrap_or_else(|| panic!("variable query {definition:?} is not label_values(...)"));
        let (selector, label) = inner.rsplit_once(',').unwrap();
        queries.push(Query {
            panel: format!("variable ${}", variable["name"].as_str().unwrap()),
            expr: substitute(&format!("count by ({}) ({selector})", label.trim())),
        });
    }
    assert!(queries.len() > 40, "{} queries", queries.len());
    queries
}

/// Runs `promtool check metrics` over a target's `/metrics`; the problems it names, if any.
async fn promtool_problems(url: &str) -> Option<String> {
    let text = reqwest::get(url).await.unwrap().text().await.unwrap();
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (!out.status.success()).then(|| {
        format!(
            "{url}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_real_prometheus_finds_data_for_every_dashboard_query_and_rule() {
    if let Err(reason) = prometheus_available() {
        assert!(
            std::env::var_os("KVFLEET_REQUIRE_PROMETHEUS").is_none(),
            "KVFLEET_REQUIRE_PROMETHEUS is set but {reason}"
        );
        println!("SKIPPED: {reason}");
        return;
    }
    let Some(db) = TestDb::create().await else {
        return;
    };
    let queries = dashboard_queries();
    let cp =
        ControlPlane::start(&db, "127.0.0.1:0".parse().unwrap(), Duration::from_secs(30)).await;
    let admin = token(&db, Role::Admin).await;
    let join = token(&db, Role::Join).await;
    let setup = AgentSetup {
        mock_token_time_us: 2_000,
        peer_on_loopback: true,
    };
    let mut agents = Vec::new();
    for (name, gpus) in [("obs-a", 1), ("obs-b", 0)] {
        let state = temp_dir(name);
        let toml = Agent::config(name, &cp, &join, &state, setup);
        agents.push(Agent::launch_with_gpus(name, toml, Arc::new(FakeInventory::gpus(gpus))).await);
    }
    wait_nodes_healthy(&cp, &admin, &["obs-a", "obs-b"]).await;
    register_and_deploy(
        &cp,
        &admin,
        json!({"name": MODEL, "format": "mock", "path": "mock", "block_size": 16,
                "context_length": 256}),
        json!({"name": "tiny", "model": MODEL, "min_workers": 2, "max_workers": 2,
                "placement": {"allow_cpu": true}, "sla": {"ttft_ms": 500, "itl_ms": 50}}),
    )
    .await;
    let fleet = &agents;
    wait_for(
        "two ready workers",
        Duration::from_secs(30),
        move || async move { fleet.iter().map(Agent::ready_workers).sum::<usize>() == 2 },
    )
    .await;
    let addrs: Vec<std::net::SocketAddr> = agents.iter().map(|a| a.addr).collect();

    // Traffic on both frontends for as long as Prometheus is asked.
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = tokio::spawn({
        let stop = Arc::clone(&stop);
        let addrs = addrs.clone();
        async move {
            let mut n = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let addr = addrs[n as usize % addrs.len()];
                // A shared prefix, so prefix caching and KV-aware routing have something to do.
                let prompt = format!("observability check: the same long prefix, then {}", n % 4);
                let (status, body) = complete(addr, &prompt).await;
                assert_eq!(status, reqwest::StatusCode::OK, "{body}");
                n += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            n
        }
    });

    let prometheus = Prometheus::start(
        &addrs.iter().map(ToString::to_string).collect::<Vec<_>>(),
        &cp.addr.to_string(),
    );
    let deadline = tokio::time::Instant::now() + QUERY_DEADLINE;
    let empty = loop {
        let mut empty = Vec::new();
        for query in &queries {
            let found = prometheus.series(&query.expr).await;
            if !found.as_ref().is_ok_and(|n| *n > 0) {
                empty.push(format!("{}: {} → {found:?}", query.panel, query.expr));
            }
        }
        if empty.is_empty() || tokio::time::Instant::now() >= deadline {
            break empty;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    assert!(
        empty.is_empty(),
        "dashboard queries without data:\n  {}\nprometheus log:\n{}",
        empty.join("\n  "),
        prometheus.log()
    );

    // Every alert rule loaded and evaluated without error.
    let expected_rules =
        std::fs::read_to_string(repo().join("packaging/prometheus/kvfleet-alerts.yml"))
            .unwrap()
            .lines()
            .filter(|l| l.trim_start().starts_with("- alert:"))
            .count();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let rules = prometheus.api("rules", None).await.unwrap();
        let all: Vec<&Value> = rules["groups"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|g| g["rules"].as_array().unwrap())
            .collect();
        let bad: Vec<String> = all
            .iter()
            .filter(|r| r["health"] != "ok")
            .map(|r| format!("{}: {} {}", r["name"], r["health"], r["lastError"]))
            .collect();
        if all.len() == expected_rules && bad.is_empty() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} of {expected_rules} rules loaded; not evaluated cleanly: {bad:?}",
            all.len()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // The exposition itself: what promtool says about each target.
    let mut problems = Vec::new();
    for url in std::iter::once(format!("http://{}/metrics", cp.addr))
        .chain(addrs.iter().map(|a| format!("http://{a}/metrics")))
    {
        problems.extend(promtool_problems(&url).await);
    }
    assert!(
        problems.is_empty(),
        "promtool check metrics:\n{}",
        problems.join("\n")
    );

    stop.store(true, Ordering::Relaxed);
    let requests = traffic.await.unwrap();
    assert!(requests > 10, "only {requests} requests were served");
    drop(prometheus);
    for agent in agents {
        agent.stop().await;
    }
    cp.stop().await;
    db.drop_now().await;
}
