//! A real agent for tests: frontend on 127.0.0.1:0, worker processes started from the built
//! `kvfleet-agent` binary, a fake (empty) GPU inventory, a private socket directory.

// Test helpers: a panic is how they report a failure.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use kvfleet_agent::config::{Config, Sources};
use kvfleet_agent::dbus::Bus;
use kvfleet_agent::gpu::FakeInventory;
use kvfleet_agent::systemd::Notifier;
use kvfleet_agent::worker::WorkerCommand;
use kvfleet_agent::{Deps, Running};
use tokio::sync::oneshot;

pub struct TestAgent {
    pub addr: SocketAddr,
    pub running: Running,
    pub client: reqwest::Client,
    shutdown: Option<oneshot::Sender<()>>,
    pub task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    dir: std::path::PathBuf,
}

/// A config from TOML text, with a private socket directory.
pub fn config(toml: &str, backoff_ms: u64) -> (Config, std::path::PathBuf) {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("kvfleet-agent-test-{}-{n}", std::process::id()));
    let text = format!(
        "[log]\nlevel = \"warn\"\n[supervisor]\nsocket_dir = {:?}\n\
         restart_backoff_initial_ms = {backoff_ms}\n\n{toml}",
        dir.display().to_string()
    );
    let config = Config::from_sources(&Sources::from_text("test.toml", text)).unwrap();
    (config, dir)
}

impl TestAgent {
    /// Starts an agent and waits until `/ready` says 200.
    pub async fn start(toml: &str) -> Self {
        Self::start_with_backoff(toml, 100).await
    }

    /// Starts an agent whose workers restart `backoff_ms` after a failure.
    pub async fn start_with_backoff(toml: &str, backoff_ms: u64) -> Self {
        let agent = Self::start_unready(toml, backoff_ms).await;
        agent.wait_ready(Duration::from_secs(30)).await;
        agent
    }

    /// Starts an agent that sends systemd notifications through `notifier`.
    pub async fn start_notified(toml: &str, notifier: Notifier) -> Self {
        let agent = Self::launch(toml, 100, notifier, Bus::Off).await;
        agent.wait_ready(Duration::from_secs(30)).await;
        agent
    }

    /// Starts an agent that exports its D-Bus interface on `bus`.
    pub async fn start_on_bus(toml: &str, bus: Bus) -> Self {
        let agent = Self::launch(toml, 100, Notifier::default(), bus).await;
        agent.wait_ready(Duration::from_secs(30)).await;
        agent
    }

    pub async fn start_unready(toml: &str, backoff_ms: u64) -> Self {
        Self::launch(toml, backoff_ms, Notifier::default(), Bus::Off).await
    }

    async fn launch(toml: &str, backoff_ms: u64, notifier: Notifier, dbus: Bus) -> Self {
        let (config, dir) = config(toml, backoff_ms);
        let listener = kvfleet_agent::frontend::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let deps = Deps {
            inventory: Arc::new(FakeInventory::default()),
            worker: WorkerCommand {
                program: env!("CARGO_BIN_EXE_kvfleet-agent").into(),
            },
            notifier,
            dbus,
        };
        let (tx, rx) = oneshot::channel::<()>();
        let (started_tx, started_rx) = oneshot::channel();
        let task = tokio::spawn(kvfleet_agent::serve_with(
            config,
            listener,
            deps,
            async move {
                let _ = rx.await;
            },
            move |running| {
                let _ = started_tx.send(running);
            },
        ));
        let running = started_rx.await.unwrap();
        Self {
            addr,
            running,
            client: reqwest::Client::builder()
                .pool_max_idle_per_host(0)
                .build()
                .unwrap(),
            shutdown: Some(tx),
            task: Some(task),
            dir,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// A URL on the address serving `/metrics` and `/ready` (the API's unless
    /// `frontend.metrics_listen` moved them).
    pub fn metrics_url(&self, path: &str) -> String {
        let addr = self.running.metrics_addr.unwrap_or(self.addr);
        format!("http://{addr}{path}")
    }

    pub async fn ready_status(&self) -> (u16, serde_json::Value) {
        let response = self
            .client
            .get(self.metrics_url("/ready"))
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap())
    }

    pub async fn wait_ready(&self, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let (status, body) = self.ready_status().await;
            if status == 200 {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "agent not ready after {limit:?}: {body}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn post(&self, path: &str, body: serde_json::Value) -> reqwest::Response {
        self.client
            .post(self.url(path))
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    /// GETs `path` and parses the JSON body.
    pub async fn get_json(&self, path: &str) -> serde_json::Value {
        self.client
            .get(self.url(path))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// The whole `/metrics` exposition.
    pub async fn metrics_text(&self) -> String {
        self.client
            .get(self.metrics_url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Reads a metric's value (first sample whose line starts with `prefix`).
    pub async fn metric(&self, prefix: &str) -> f64 {
        let text = self.metrics_text().await;
        text.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no metric {prefix} in:\n{text}"))
    }

    /// Triggers shutdown (drain) and waits for `serve` to return.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.trigger_shutdown();
        self.task.take().unwrap().await.unwrap()
    }

    pub fn trigger_shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        self.trigger_shutdown();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Reads an SSE response into its `data:` payloads.
pub async fn sse_events(response: reqwest::Response) -> Vec<String> {
    let text = response.text().await.unwrap();
    text.split("\n\n")
        .filter_map(|event| {
            event
                .lines()
                .find_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")))
        })
        .map(str::to_owned)
        .collect()
}

/// A model that makes a token every `token_us` microseconds.
pub fn model(name: &str, token_us: u64, context: u32) -> String {
    format!(
        "[[models]]\nname = \"{name}\"\ncontext_length = {context}\nblock_size = 16\n\
         kv_blocks = 4096\nmock_token_time_us = {token_us}\n"
    )
}
