//! The external engine's server process: started on a free loopback port with the worker's
//! GPU (`CUDA_VISIBLE_DEVICES`), its output logged line by line under the engine's target (so it
//! reaches the journal with the worker's), killed with the worker (`kill_on_drop`, and
//! `setpriv --pdeathsig KILL` where present, so even a `kill -9` of the worker leaves no
//! orphan), and waited on until `/health` answers 200.

use std::collections::VecDeque;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use tokio::io::{AsyncBufReadExt as _, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tracing::Instrument as _;

use super::super::protocol::{EngineSpec, WireEngine, WireExternal};

/// Output lines kept for the error message when the server fails.
const TAIL_LINES: usize = 8;
/// How often `/health` is polled while the server loads.
const HEALTH_POLL: Duration = Duration::from_millis(200);

/// A running engine server.
#[derive(Debug)]
pub struct Server {
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    /// `llamacpp`, `openai`, `vllm` or `sglang`.
    pub engine: &'static str,
    /// vllm/sglang: the engine's KV event endpoint and replay endpoint, placeholders filled.
    pub kv_events: Option<(String, Option<String>)>,
    child: Child,
    tail: Arc<Mutex<VecDeque<String>>>,
    logs: Vec<tokio::task::JoinHandle<()>>,
}

impl Server {
    /// Starts the server `spec` describes on `device` (`cpu` or `gpu:N`) and waits until it
    /// is healthy, it exits, or `timeout` passes (each an error naming the engine).
    pub async fn start(spec: &EngineSpec, device: &str, timeout: Duration) -> anyhow::Result<Self> {
        let external = spec
            .external
            .as_ref()
            .context("an external engine's spec has no server command")?;
        let engine = engine_name(spec.engine);
        // Three distinct free ports (each listener held until all are picked); the KV event
        // ones are used only where a placeholder names them.
        let [port, kv_port, kv_replay_port] = free_ports()?;
        let model = spec
            .path
            .as_deref()
            .context("an external engine needs the model's path")?;
        // A KV event port only where the command line or the endpoint names one.
        let named = |placeholder: &str| {
            external.args.iter().any(|a| a.contains(placeholder))
                || [&external.kv_events, &external.kv_events_replay]
                    .into_iter()
                    .flatten()
                    .any(|e| e.contains(placeholder))
        };
        let ports = Ports {
            http: port,
            kv: if named("{kv_port}") { kv_port } else { 0 },
            kv_replay: if named("{kv_replay_port}") {
                kv_replay_port
            } else {
                0
            },
        };
        let args = arguments(spec.engine, external, model, ports, spec.context_length);
        let model_text = model.display().to_string();
        let kv_events = external.kv_events.as_ref().map(|endpoint| {
            (
                fill(endpoint, ports, &model_text),
                external
                    .kv_events_replay
                    .as_ref()
                    .map(|r| fill(r, ports, &model_text)),
            )
        });
        let program = resolve(&external.command).ok_or_else(|| {
            anyhow::anyhow!(
                "{engine}: cannot start {:?}: no such executable (set `command` in the model's \
                 config to the server binary's path)",
                external.command
            )
        })?;
        let mut command = match pdeathsig() {
            Some(setpriv) => {
                let mut c = Command::new(setpriv);
                c.args(["--pdeathsig", "KILL", "--"]).arg(&program);
                c
            }
            None => Command::new(&program),
        };
        command
            .args(&args)
            .env("CUDA_VISIBLE_DEVICES", cuda_devices(device))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        tracing::info!(engine, command = %external.command, args = ?args, port, "starting the engine server");
        let mut child = command.spawn().map_err(|e| {
            anyhow::anyhow!(
                "{engine}: cannot start {:?}: {e} (set `command` in the model's config to the \
                 server binary's path)",
                external.command
            )
        })?;
        let tail = Arc::new(Mutex::new(VecDeque::new()));
        let mut logs = Vec::new();
        if let Some(out) = child.stdout.take() {
            logs.push(tokio::spawn(
                log_lines(out, engine, tail.clone()).instrument(tracing::Span::current()),
            ));
        }
        if let Some(err) = child.stderr.take() {
            logs.push(tokio::spawn(
                // In the worker's span: each line names its worker and model.
                log_lines(err, engine, tail.clone()).instrument(tracing::Span::current()),
            ));
        }
        let mut server = Self {
            base: format!("http://127.0.0.1:{port}"),
            engine,
            kv_events,
            child,
            tail,
            logs,
        };
        server.wait_healthy(timeout).await?;
        Ok(server)
    }

    async fn wait_healthy(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()?;
        let url = format!("{}/health", self.base);
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            // Each poll within what is left, so a server that accepts and never answers
            // cannot hold the worker past its deadline.
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let poll = tokio::time::timeout(left, client.get(&url).send()).await;
            let last = match poll {
                Ok(Ok(r)) if r.status().is_success() => return Ok(()),
                Ok(Ok(r)) => format!("/health answered {}", r.status()),
                Ok(Err(e)) => format!("/health: {:#}", anyhow::Error::new(e)),
                Err(_) => "/health did not answer".to_owned(),
            };
            if let Some(status) = self.child.try_wait()? {
                self.drain_logs().await;
                anyhow::bail!(
                    "{}: the server exited at start ({status}){}",
                    self.engine,
                    self.tail_text(TAIL_LINES)
                );
            }
            if tokio::time::Instant::now() >= deadline {
                anyhow::bail!(
                    "{}: the server did not become healthy within {timeout:?} ({last}){}",
                    self.engine,
                    self.tail_text(TAIL_LINES)
                );
            }
            tokio::time::sleep(HEALTH_POLL).await;
        }
    }

    /// The server's version, where it says: llama-server's `/props` `build_info`, else an
    /// OpenAI server's `/version` (vLLM, SGLang).
    pub async fn version(&self) -> Option<String> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .ok()?;
        for (path, field) in [("/props", "build_info"), ("/version", "version")] {
            let Ok(response) = client.get(format!("{}{path}", self.base)).send().await else {
                continue;
            };
            if let Ok(body) = response.json::<serde_json::Value>().await
                && let Some(version) = body.get(field).and_then(|v| v.as_str())
            {
                return Some(version.chars().take(64).collect());
            }
        }
        None
    }

    /// Waits for the server to exit; the error names the engine, its exit status and its
    /// last output lines.
    pub async fn exited(&mut self) -> anyhow::Error {
        let status = self.child.wait().await;
        let status = match status {
            Ok(s) => s.to_string(),
            Err(e) => format!("unknown: {e}"),
        };
        self.drain_logs().await;
        anyhow::anyhow!(
            "{}: the server process exited ({status}){}",
            self.engine,
            self.tail_text(3)
        )
    }

    /// Lets the log readers reach the end of the dead server's output (briefly: a child of
    /// the server may hold the pipes open).
    async fn drain_logs(&mut self) {
        for log in self.logs.drain(..) {
            let _ = tokio::time::timeout(Duration::from_millis(500), log).await;
        }
    }

    /// Its last `lines` output lines, for an error message.
    fn tail_text(&self, lines: usize) -> String {
        let tail = self.tail.lock().map(|t| t.clone()).unwrap_or_default();
        let skip = tail.len().saturating_sub(lines);
        let lines: Vec<_> = tail.into_iter().skip(skip).collect();
        if lines.is_empty() {
            String::new()
        } else {
            format!("; its last output: {}", lines.join(" | "))
        }
    }
}

/// `llamacpp` or `openai`, for logs and errors.
pub fn engine_name(engine: WireEngine) -> &'static str {
    match engine {
        WireEngine::OpenAi => "openai",
        WireEngine::Vllm => "vllm",
        WireEngine::Sglang => "sglang",
        _ => "llamacpp",
    }
}

/// The ports a server's command line names: its HTTP port, and its KV event ports where the
/// operator wrote `{kv_port}` / `{kv_replay_port}`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ports {
    /// `{port}`.
    pub http: u16,
    /// `{kv_port}`.
    pub kv: u16,
    /// `{kv_replay_port}`.
    pub kv_replay: u16,
}

/// `text` with the worker's placeholders filled in.
pub fn fill(text: &str, ports: Ports, model: &str) -> String {
    text.replace("{port}", &ports.http.to_string())
        .replace("{kv_port}", &ports.kv.to_string())
        .replace("{kv_replay_port}", &ports.kv_replay.to_string())
        .replace("{model}", model)
}

/// The server's arguments: llama-server's own then the operator's, or the operator's with
/// `{port}`, `{kv_port}`, `{kv_replay_port}` and `{model}` replaced.
fn arguments(
    engine: WireEngine,
    external: &WireExternal,
    model: &Path,
    ports: Ports,
    context: u32,
) -> Vec<String> {
    let model = model.display().to_string();
    let port = ports.http;
    if engine.openai_api() {
        return external
            .args
            .iter()
            .map(|a| fill(a, ports, &model))
            .collect();
    }
    let slots = external.slots.max(1);
    let mut args: Vec<String> = vec![
        "-m".into(),
        model,
        "--host".into(),
        "127.0.0.1".into(),
        "--port".into(),
        port.to_string(),
        "-np".into(),
        slots.to_string(),
        // llama-server splits its context among the slots: each gets the model's context.
        "-c".into(),
        (u64::from(context) * u64::from(slots)).to_string(),
        "--metrics".into(),
    ];
    args.extend(external.args.iter().cloned());
    args
}

/// `CUDA_VISIBLE_DEVICES` for a worker's device: its GPU's index, or empty (no GPU) on a CPU
/// slot.
fn cuda_devices(device: &str) -> String {
    device.strip_prefix("gpu:").unwrap_or("").to_owned()
}

/// Three distinct loopback ports free now (the server binds them a moment later).
fn free_ports() -> anyhow::Result<[u16; 3]> {
    let bind =
        || std::net::TcpListener::bind("127.0.0.1:0").context("finding a free loopback port");
    let listeners = [bind()?, bind()?, bind()?];
    let port = |l: &std::net::TcpListener| l.local_addr().map(|a| a.port());
    Ok([
        port(&listeners[0])?,
        port(&listeners[1])?,
        port(&listeners[2])?,
    ])
}

/// The program's path: `command` itself when it names a path, else the first executable of
/// that name on PATH.
fn resolve(command: &str) -> Option<std::path::PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;
    let executable = |p: &Path| {
        p.metadata()
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if command.contains('/') {
        let path = Path::new(command);
        return executable(path).then(|| path.to_path_buf());
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(command))
        .find(|p| executable(p))
}

/// `setpriv`, where installed: it makes the kernel kill the server when the worker dies.
fn pdeathsig() -> Option<&'static str> {
    ["/usr/bin/setpriv", "/bin/setpriv"]
        .into_iter()
        .find(|p| Path::new(p).exists())
}

async fn log_lines(
    reader: impl AsyncRead + Unpin,
    engine: &'static str,
    tail: Arc<Mutex<VecDeque<String>>>,
) {
    let mut lines = BufReader::new(reader).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if line.trim().is_empty() {
            continue;
        }
        tracing::info!(target: "kvfleet::engine", engine, "{line}");
        if let Ok(mut tail) = tail.lock() {
            if tail.len() == TAIL_LINES {
                tail.pop_front();
            }
            tail.push_back(line);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_and_devices() {
        let external = WireExternal {
            command: "llama-server".into(),
            args: vec!["--threads".into(), "2".into()],
            slots: 2,
            kv_ttl_secs: 60,
            start_timeout_ms: 0,
            kv_events: None,
            kv_events_replay: None,
        };
        let ports = |http| Ports {
            http,
            kv: 7000,
            kv_replay: 7001,
        };
        let args = arguments(
            WireEngine::LlamaCpp,
            &external,
            Path::new("/m.gguf"),
            ports(9000),
            512,
        );
        assert_eq!(
            args.join(" "),
            "-m /m.gguf --host 127.0.0.1 --port 9000 -np 2 -c 1024 --metrics --threads 2"
        );
        let openai = WireExternal {
            args: vec!["serve".into(), "{model}".into(), "--port={port}".into()],
            ..external
        };
        let args = arguments(
            WireEngine::OpenAi,
            &openai,
            Path::new("/m"),
            ports(9001),
            512,
        );
        assert_eq!(args, ["serve", "/m", "--port=9001"]);
        let vllm = WireExternal {
            args: vec![
                "--port={port}".into(),
                r#"{"endpoint":"tcp://*:{kv_port}","replay_endpoint":"tcp://*:{kv_replay_port}"}"#
                    .into(),
            ],
            ..openai
        };
        let args = arguments(WireEngine::Vllm, &vllm, Path::new("/m"), ports(9002), 512);
        assert_eq!(
            args,
            [
                "--port=9002",
                r#"{"endpoint":"tcp://*:7000","replay_endpoint":"tcp://*:7001"}"#
            ]
        );
        assert_eq!(cuda_devices("gpu:3"), "3");
        assert_eq!(cuda_devices("cpu"), "");
    }
}
