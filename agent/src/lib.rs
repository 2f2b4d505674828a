//! The kvfleet node agent as a library; `main.rs` stays thin (parse → build → run → drain).
//!
//! - [`cp_client`]: joining a control plane (register, heartbeat, desired state → workers).
//! - [`config`]: the typed configuration, from file + environment + flags, validated in one place.
//! - [`cli`]: the command line.
//! - [`gpu`]: the GPU inventory (NVML, or a fake; no driver means CPU-only, never a crash).
//! - [`worker`]: worker processes over Unix sockets, supervised and restarted with backoff.
//! - [`frontend`]: the OpenAI-compatible HTTP API, admission control, streaming.
//! - [`backend`]: the seam between the frontend and token generation.
//! - [`metrics`]: the one metrics registry every module registers into.
//! - [`systemd`]: `sd_notify` readiness, watchdog and status.
//! - [`dbus`]: `org.kvfleet.Agent1` (status, drain, resume) and a logind shutdown inhibitor.
//! - [`logging`]: `tracing` output, text or JSON.
//! - [`kv_sync`]: the KV event pipeline's agent side (batched uploads, following the control
//!   plane's stream into a router), as state machines the control-plane client drives.
//! - [`fleet`]: the fleet-wide KV router the control-plane client keeps current.
//! - [`serving`]: how a request is served beyond one local worker (the driver of
//!   `kvfleet-serving`'s state machine): the frontend's backend in control-plane mode, local,
//!   forwarded to a peer, or in prefill and decode legs; and what peers forward here.
//! - [`peer`]: the QUIC peer endpoint (node-CA mTLS); it runs only what [`serving`] gives it.
//! - [`state_dir`]: what the agent keeps on disk between runs in control-plane mode (identity,
//!   certificate, last desired state).
//!
//! [`run`] is the whole agent: tests call [`serve`] with a listener bound to port 0, a fake GPU
//! inventory and the built binary as the worker program. With `[control_plane]` the
//! [`cp_client`] runs beside the frontend and reconciles the worker pool to the control plane's
//! desired state, the [`peer`] endpoint serves requests forwarded by other agents, and the
//! frontend routes through [`serving`]: to the worker holding the prompt's prefix, here or on a
//! peer, or split into a prefill and a decode leg.

pub mod backend;
pub mod cli;
pub mod config;
pub mod cp_client;
pub mod dbus;
pub mod fleet;
pub mod fleet_hash;
pub mod frontend;
pub mod gpu;
pub mod kv_sync;
pub mod logging;
pub mod metrics;
pub mod peer;
pub mod serving;
pub mod state_dir;
pub mod systemd;
pub mod worker;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use kvfleet_proto::api::WorkerRole;

use crate::config::Config;
use crate::frontend::Frontend;
use crate::frontend::models::ModelRegistry;
use crate::frontend::text::{ByteTokenizer, Tokenizer};
use crate::gpu::Inventory;
use crate::systemd::Notifier;
use crate::worker::{Device, WorkerConfig};
use crate::worker::{WorkerCommand, WorkerPool};

/// What the agent needs from its surroundings, injectable for tests.
#[derive(Debug, Clone)]
pub struct Deps {
    /// The GPU inventory.
    pub inventory: Arc<dyn Inventory>,
    /// How to start worker processes.
    pub worker: WorkerCommand,
    /// systemd notifications.
    pub notifier: Notifier,
    /// Which D-Bus to export `org.kvfleet.Agent1` on.
    pub dbus: dbus::Bus,
}

impl Deps {
    /// The real surroundings: NVML (or no GPUs), this binary, `$NOTIFY_SOCKET`.
    pub fn detect() -> anyhow::Result<Self> {
        let program = std::env::current_exe().context("finding the agent's own executable")?;
        Ok(Self {
            inventory: Arc::from(gpu::detect()),
            worker: WorkerCommand { program },
            notifier: Notifier::from_env(),
            dbus: dbus::Bus::System,
        })
    }
}

/// Runs the agent until `shutdown` completes, then drains.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let listener = frontend::bind(config.frontend.listen)
        .with_context(|| format!("binding the frontend to {}", config.frontend.listen))?;
    serve(config, listener, Deps::detect()?, shutdown).await
}

/// The workers to run: the configured ones, or one per GPU found (one CPU worker when none),
/// serving the first model.
pub fn plan_workers(config: &Config, inventory: &dyn Inventory) -> Vec<WorkerConfig> {
    let gpus = match inventory.snapshot() {
        Ok(snapshot) => snapshot.gpus,
        Err(e) => {
            tracing::warn!(error = %e, "GPU inventory unavailable: planning CPU workers");
            Vec::new()
        }
    };
    if !config.workers.is_empty() {
        for worker in &config.workers {
            if let Device::Gpu(index) = worker.device
                && !gpus.iter().any(|g| g.index == index)
            {
                tracing::warn!(device = %worker.device,
                        "configured GPU not found in the inventory; the worker starts anyway");
            }
        }
        return config.workers.clone();
    }
    let Some(model) = config.models.first() else {
        return Vec::new();
    };
    let devices: Vec<Device> = if gpus.is_empty() {
        vec![Device::Cpu]
    } else {
        gpus.iter().map(|g| Device::Gpu(g.index)).collect()
    };
    devices
        .into_iter()
        .map(|device| WorkerConfig {
            model: model.name.clone(),
            device,
            role: WorkerRole::Aggregated,
        })
        .collect()
}

/// Handles to a running agent, for `serve_with` callers.
#[derive(Debug, Clone)]
pub struct Running {
    /// The frontend (drain, resume, readiness).
    pub frontend: Arc<Frontend>,
    /// The worker pool.
    pub pool: Arc<WorkerPool>,
    /// The models the frontend serves (register more at runtime).
    pub models: Arc<ModelRegistry>,
    /// What the node does beyond its own workers.
    pub mode: Mode,
    /// Where `/metrics` and `/ready` are served when `frontend.metrics_listen` moves them off
    /// the API port (the bound address: port 0 in the config picks one).
    pub metrics_addr: Option<std::net::SocketAddr>,
}

impl Running {
    /// The fleet parts, in control-plane mode.
    pub fn fleet(&self) -> Option<&FleetMode> {
        match &self.mode {
            Mode::Standalone => None,
            Mode::Fleet(fleet) => Some(fleet),
        }
    }
}

/// What a node does beyond serving its own workers.
#[derive(Debug, Clone)]
pub enum Mode {
    /// The configured workers, for this node's frontend only.
    Standalone,
    /// A member of a control plane's fleet (`[control_plane]`).
    Fleet(FleetMode),
}

/// Everything control-plane mode adds to a node.
#[derive(Debug, Clone)]
pub struct FleetMode {
    /// The control-plane client.
    pub control_plane: cp_client::Handle,
    /// The fleet-wide KV router.
    pub router: Arc<fleet::FleetRouter>,
    /// The peer endpoint (bound once registration saved the node certificate).
    pub peer: peer::PeerHandle,
    /// Serving beyond this node's workers: forwarded requests, both legs of disaggregated
    /// ones, the KV transfers in between.
    pub serving: Arc<serving::Serving>,
}

/// Serves on `listener` until `shutdown` completes, then drains: stop accepting, finish
/// in-flight requests within `drain_grace`, stop the workers.
pub async fn serve(
    config: Config,
    listener: tokio::net::TcpListener,
    deps: Deps,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    serve_with(config, listener, deps, shutdown, |_| {}).await
}

/// [`serve`], handing the caller the running agent once it is started (tests use this to kill
/// workers and watch readiness).
pub async fn serve_with(
    config: Config,
    listener: tokio::net::TcpListener,
    deps: Deps,
    shutdown: impl Future<Output = ()>,
    started: impl FnOnce(Running),
) -> anyhow::Result<()> {
    let addr = listener
        .local_addr()
        .context("reading the listener's address")?;
    // Bound first, so a taken port stops the start with its address before any worker runs.
    let metrics_listener = match config.frontend.metrics_listen {
        Some(addr) => Some(
            frontend::bind(addr)
                .with_context(|| format!("binding frontend.metrics_listen to {addr}"))?,
        ),
        None => None,
    };
    let metrics_addr = match &metrics_listener {
        Some(listener) => Some(
            listener
                .local_addr()
                .context("reading the metrics listener's address")?,
        ),
        None => None,
    };
    // With a control plane, it decides the workers (cp_client starts them); standalone, the
    // config does.
    let workers = if config.control_plane.is_some() {
        Vec::new()
    } else {
        plan_workers(&config, deps.inventory.as_ref())
    };
    tracing::info!(node = %config.node_name, %addr, workers = workers.len(), "kvfleet-agent starting");
    // Tokenizers and chat templates first: a model file that does not load stops the start
    // with its name and path, before any worker is spawned.
    let models = Arc::new(ModelRegistry::new());
    if config.control_plane.is_none() {
        for model in &config.models {
            models.register(model.clone()).await?;
        }
    }
    let tokenizer = ByteTokenizer;
    let pool = WorkerPool::start(
        &workers,
        &config.models,
        config.routing,
        config.supervisor.clone(),
        config.log.clone(),
        deps.worker.clone(),
        tokenizer.vocab_size(),
    );
    // One registry: every module adds its families, the frontend serves the whole.
    let mut registry = metrics::Registry::default();
    pool.register_metrics(&mut registry);
    gpu::register_metrics(&mut registry, deps.inventory.clone());
    let cp_stop = CancellationToken::new();
    let mut responses = Arc::new(frontend::response_store::ResponseStore::default());
    let (mode, backend, fleet_tasks): (Mode, Arc<dyn backend::Backend>, _) =
        match &config.control_plane {
            None => {
                // The pool chooses each worker; the serving driver resumes what a lost worker
                // was serving on another one.
                let serving = Arc::new(
                    serving::Serving::new(pool.clone(), peer::PeerHandle::default())
                        .with_block_hasher(config.supervisor.fleet_hasher.clone()),
                );
                serving.register_metrics(&mut registry);
                let backend =
                    serving::PoolBackend::new(serving, kvfleet_proto::api::DEFAULT_MIGRATION_LIMIT);
                (Mode::Standalone, Arc::new(backend), None)
            }
            Some(cp) => {
                let StartedFleet {
                    fleet,
                    backend,
                    responses: shared,
                    tasks,
                } = start_fleet(
                    (&config, cp),
                    addr,
                    &deps,
                    &pool,
                    &models,
                    &mut registry,
                    cp_stop.clone(),
                )?;
                responses = shared;
                (Mode::Fleet(fleet), backend, Some(tasks))
            }
        };
    let mut frontend = Frontend::new(config.frontend.clone(), models.clone(), backend, registry);
    frontend.responses = responses;
    frontend.block_hasher = config.supervisor.fleet_hasher.clone();
    let frontend = Arc::new(frontend);
    if let Mode::Fleet(fleet) = &mode {
        // Requests other nodes forward here take this node's admission slots too.
        fleet.serving.admit_through(frontend.clone());
    }
    started(Running {
        frontend: frontend.clone(),
        pool: pool.clone(),
        models,
        mode,
        metrics_addr,
    });

    let stop_http = CancellationToken::new();
    let http = tokio::spawn({
        let stop = stop_http.clone();
        frontend::serve(
            frontend.clone(),
            listener,
            async move { stop.cancelled().await },
        )
    });
    let background = CancellationToken::new();
    // The metrics address stays up through the drain (`/ready` says 503 there meanwhile) and
    // stops with the background tasks.
    let metrics_http =
        metrics_listener.map(|listener| {
            tokio::spawn({
                let stop = background.clone();
                frontend::serve_metrics(frontend.clone(), listener, async move {
                    stop.cancelled().await
                })
            })
        });
    let notifier = deps.notifier.clone();
    let readiness = tokio::spawn(watch_readiness(
        pool.clone(),
        frontend.clone(),
        notifier.clone(),
        background.clone(),
    ));

    let logind_shutdown = CancellationToken::new();
    let bus = dbus::Dbus::start(
        &deps.dbus,
        frontend.clone(),
        pool.clone(),
        logind_shutdown.clone(),
    )
    .await;

    tokio::select! {
        () = shutdown => {}
        () = logind_shutdown.cancelled() => {}
    }
    tracing::info!(
        in_flight = frontend.in_flight(),
        grace_s = config.drain_grace.as_secs_f64(),
        "shutdown requested: draining"
    );
    frontend.drain();
    notifier.notify("STOPPING=1");
    notifier.status("draining: finishing in-flight requests");
    stop_http.cancel();
    match tokio::time::timeout(config.drain_grace, http).await {
        Ok(Ok(Ok(()))) => tracing::info!("drained: every in-flight request finished"),
        Ok(Ok(Err(e))) => tracing::error!(error = %e, "the HTTP server failed"),
        Ok(Err(e)) => tracing::error!(error = %e, "the HTTP server task failed"),
        Err(_) => tracing::warn!(
            in_flight = frontend.in_flight(),
            "drain grace period over: stopping with requests still in flight"
        ),
    }
    background.cancel();
    if let Some(task) = metrics_http {
        match tokio::time::timeout(Duration::from_secs(5), task).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::error!(error = %e, "the metrics server failed"),
            Ok(Err(e)) => tracing::error!(error = %e, "the metrics server task failed"),
            Err(_) => tracing::warn!("the metrics server did not stop within 5 s"),
        }
    }
    let _ = readiness.await;
    cp_stop.cancel();
    if let Some(tasks) = fleet_tasks {
        for task in tasks {
            let _ = task.await;
        }
    }
    pool.shutdown().await;
    if let Some(bus) = &bus {
        bus.release_inhibitor();
    }
    notifier.status("stopped");
    tracing::info!("kvfleet-agent stopped");
    Ok(())
}

/// What [`start_fleet`] started.
struct StartedFleet {
    fleet: FleetMode,
    backend: Arc<dyn backend::Backend>,
    /// The frontend's stored responses, which the client connects to the control plane.
    responses: Arc<frontend::response_store::ResponseStore>,
    tasks: [JoinHandle<()>; 2],
}

/// Control-plane mode: the fleet router, the peer endpoint and disaggregated serving, and the
/// control-plane client that keeps them (and the pool) current. Returns the fleet parts, the
/// frontend's backend (routing over the whole fleet, unless `[peer] forward = false`), and the
/// client's and the endpoint's tasks, which end when `stop` is cancelled.
fn start_fleet(
    (config, cp): (&Config, &cp_client::ControlPlaneConfig),
    addr: std::net::SocketAddr,
    deps: &Deps,
    pool: &Arc<WorkerPool>,
    models: &Arc<ModelRegistry>,
    registry: &mut metrics::Registry,
    stop: CancellationToken,
) -> anyhow::Result<StartedFleet> {
    let router = Arc::new(fleet::FleetRouter::new(config.fleet_routing));
    if let Some(profile) = &config.fleet_profile {
        router
            .with_router(|r| r.set_default_profile(profile.clone()))
            .context("routing.fleet_profile does not fit the fleet router")?;
    }
    let peer = peer::PeerHandle::default();
    // Forwarded requests and both legs of disaggregated ones run through the peer endpoint.
    let serving = Arc::new(
        serving::Serving::new(pool.clone(), peer.clone())
            .with_peer_limits(&config.peer)
            .with_block_hasher(config.supervisor.fleet_hasher.clone()),
    );
    router.register_metrics(registry);
    serving.register_metrics(registry);
    peer.register_metrics(registry);
    let backend: Arc<dyn backend::Backend> = if config.peer.forward {
        Arc::new(serving::FleetBackend::new(serving.clone(), router.clone()))
    } else {
        Arc::new(serving::PoolBackend::new(
            serving.clone(),
            kvfleet_proto::api::DEFAULT_MIGRATION_LIMIT,
        ))
    };
    let peer_task = tokio::spawn(peer::run(
        config.peer.clone(),
        if addr.ip().is_unspecified() {
            config.node_name.clone()
        } else {
            addr.ip().to_string()
        },
        cp.state_dir.clone(),
        (
            Arc::new(serving::forwarded::Forwarded::new(serving.clone())),
            serving.transfers(),
        ),
        peer.clone(),
        stop.clone(),
    ));
    let frontend_addr = cp.advertise_addr.clone().unwrap_or_else(|| {
        if addr.ip().is_unspecified() {
            format!("{}:{}", config.node_name, addr.port())
        } else {
            addr.to_string()
        }
    });
    let addresses = if addr.ip().is_unspecified() {
        Vec::new()
    } else {
        vec![addr.ip().to_string()]
    };
    let responses = Arc::new(frontend::response_store::ResponseStore::default());
    let node = cp_client::Node {
        hostname: config.node_name.clone(),
        frontend_addr,
        addresses,
        local_models: config.models.clone(),
        drain_grace: config.drain_grace,
        pool: pool.clone(),
        models: models.clone(),
        inventory: deps.inventory.clone(),
        fleet: router.clone(),
        peer: peer.clone(),
        responses: responses.clone(),
        fleet_hasher: config.supervisor.fleet_hasher.clone(),
    };
    let (control_plane, client) =
        cp_client::start(cp.clone(), node, stop).context("starting the control-plane client")?;
    tracing::info!(url = %cp.url, state_dir = %cp.state_dir.display(),
        "control-plane mode: the control plane decides this node's workers");
    let fleet = FleetMode {
        control_plane,
        router,
        peer,
        serving,
    };
    Ok(StartedFleet {
        fleet,
        backend,
        responses,
        tasks: [tokio::spawn(client), peer_task],
    })
}

/// Sends READY=1 once every worker is ready, STATUS= whenever the picture changes, and
/// WATCHDOG=1 pings while the frontend answers.
async fn watch_readiness(
    pool: Arc<WorkerPool>,
    frontend: Arc<Frontend>,
    notifier: Notifier,
    stop: CancellationToken,
) {
    use crate::backend::{Backend, WorkerState};
    let mut announced_ready = false;
    let mut last_status = String::new();
    let tick = notifier
        .watchdog_interval()
        .unwrap_or(Duration::from_secs(1))
        .min(Duration::from_millis(500));
    let mut interval = tokio::time::interval(tick);
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            () = stop.cancelled() => return,
        }
        let workers = pool.workers();
        let ready = workers
            .iter()
            .filter(|w| w.state == WorkerState::Ready)
            .count();
        let status = format!(
            "{ready}/{} workers ready, {} requests in flight{}",
            workers.len(),
            frontend.in_flight(),
            if frontend.is_draining() {
                ", draining"
            } else {
                ""
            }
        );
        if !announced_ready && pool.all_ready() {
            announced_ready = true;
            notifier.notify("READY=1");
            tracing::info!("{status}: ready");
        }
        if status != last_status {
            notifier.status(&status);
            last_status = status;
        }
        notifier.notify("WATCHDOG=1");
    }
}

/// The default socket directory under systemd (`RuntimeDirectory=kvfleet`).
pub fn runtime_dir() -> PathBuf {
    PathBuf::from("/run/kvfleet")
}
