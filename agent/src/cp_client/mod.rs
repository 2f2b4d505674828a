//! The control-plane client: this node joins the fleet and runs what the control plane says.
//!
//! - [`reconcile`]: pure decisions — desired state + what runs → start/stop/drain/restart steps.
//! - [`timing`]: pure retry backoff (with jitter) and certificate-renewal timing.
//! - [`state`]: the state directory (credential, peer key and certificate, last desired state).
//! - [`http`]: the `/api/v1/agent/*` calls.
//!
//! [`run`] is the driver. At start it applies the desired state saved by the previous run, so a
//! node that reboots while the control plane is down serves again at once. Then, in a loop:
//! register (the stored credential, or the join token the first time; a peer key generated and
//! kept here), and run a session of two concurrent loops — heartbeats every few seconds (worker
//! states, request and token rates, KV blocks, GPU figures; certificate renewal when two thirds
//! of its lifetime have passed) and the desired-state long poll, whose every new generation is
//! reconciled into the [`WorkerPool`] and saved. A third loop uploads the workers' KV events
//! (the [`crate::kv_sync::Uploader`] state machine: bounded batches, one in flight, in-order
//! retries, an engine epoch per worker start) so the control plane's KV index knows what every
//! worker caches, and, every half second with or without events, the serving workers' live
//! loads, which the control plane passes on to every fleet router. Any failure to reach the control plane is
//! retried with jittered exponential backoff while the workers keep serving; a refused
//! credential (the node was removed) ends the session and, with a join token at hand, the node
//! joins again as a new node.
//!
//! The data plane never waits on any of this: the frontend and the workers run whatever the
//! last reconcile left in place.

mod config;
pub mod http;
pub mod reconcile;
pub mod timing;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use kvfleet_proto::WorkerId;
use kvfleet_proto::api::{
    AgentPublicKey, DesiredState, GpuInventory, GpuStatus, Heartbeat, KeyAlgorithm, ObservedWorker,
    ObservedWorkerState, RegisterRequest, RenewRequest, WorkerMetrics,
};
use kvfleet_proto::kv_stream::WorkerLoadReport;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

pub use self::config::{ControlPlaneConfig, DEFAULT_STATE_DIR, JoinToken};
use self::http::{Api, CpError};
use crate::backend::{Backend as _, WorkerState};
use crate::frontend::models::ModelRegistry;
use crate::gpu::{GpuInfo, Inventory};
use crate::state_dir::{self as state, Identity, StateDir};
use crate::worker::ModelConfig;
use crate::worker::WorkerPool;

/// How long one KV stream request waits for news at the control plane.
const KV_STREAM_WAIT: Duration = Duration::from_secs(5);

/// How often the fleet directory is read.
const DIRECTORY_INTERVAL: Duration = Duration::from_secs(1);

/// What the client needs from the rest of the agent.
#[derive(Debug, Clone)]
pub struct Node {
    /// The hostname the node registers under (`[node] name`).
    pub hostname: String,
    /// The frontend address to advertise.
    pub frontend_addr: String,
    /// The node's addresses (certificate SANs when they are IPs).
    pub addresses: Vec<String>,
    /// Local model definitions (`[[models]]`).
    pub local_models: Vec<ModelConfig>,
    /// How long a worker that is no longer wanted may finish its requests.
    pub drain_grace: Duration,
    /// The worker pool to reconcile.
    pub pool: Arc<WorkerPool>,
    /// The frontend's models, registered and removed with the desired state.
    pub models: Arc<ModelRegistry>,
    /// The GPUs.
    pub inventory: Arc<dyn Inventory>,
    /// The fleet router to keep current from the control plane's KV stream and directory.
    pub fleet: Arc<crate::fleet::FleetRouter>,
    /// The peer endpoint, whose address heartbeats report.
    pub peer: crate::peer::PeerHandle,
}

/// What the client observed, for tests and status output.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Status {
    /// The node id, once registered.
    pub node_id: Option<uuid::Uuid>,
    /// The desired-state generation applied last.
    pub generation: Option<i64>,
    /// Whether the last call to the control plane succeeded.
    pub connected: bool,
}

/// A handle on the running client.
#[derive(Debug, Clone, Default)]
pub struct Handle {
    status: Arc<Mutex<Status>>,
}

impl Handle {
    /// The client's status now.
    pub fn status(&self) -> Status {
        self.status.lock().map(|s| s.clone()).unwrap_or_default()
    }

    fn update(&self, f: impl FnOnce(&mut Status)) {
        if let Ok(mut s) = self.status.lock() {
            f(&mut s);
        }
    }
}

/// Why the client cannot run at all (retrying would not help).
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The state directory is unusable.
    #[error(transparent)]
    State(#[from] state::StateError),
    /// The peer key could not be made or read.
    #[error("the peer key in {path}: {reason}")]
    Key {
        /// The key file.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// The HTTP client could not be built.
    #[error(transparent)]
    Http(#[from] CpError),
}

/// Reconcile bookkeeping shared by the two loops.
#[derive(Debug, Default)]
struct Book {
    /// Desired workers that cannot run here, with the reason.
    unrunnable: BTreeMap<WorkerId, String>,
    /// Workers stopped since the control plane last heard about them.
    stopped: BTreeSet<WorkerId>,
    /// Models the desired state's workers use.
    wanted_models: BTreeSet<String>,
}

struct Client {
    config: ControlPlaneConfig,
    node: Node,
    api: Api,
    state: StateDir,
    key: rcgen::KeyPair,
    handle: Handle,
    book: Mutex<Book>,
    /// Wakes the watch loop when a heartbeat reports a newer generation.
    wake: Notify,
    /// Serializes reconciles (the watch loop and the boot-time apply).
    apply_lock: tokio::sync::Mutex<()>,
    /// The KV upload state, kept across sessions so events queued during an outage go out
    /// when the control plane returns.
    kv: tokio::sync::Mutex<KvUpload>,
    /// The KV stream follower; kept across sessions so a re-registration continues the stream.
    follower: tokio::sync::Mutex<crate::kv_sync::Follower>,
}

/// The KV event uploader and the pool subscription that feeds it.
struct KvUpload {
    uploader: crate::kv_sync::Uploader,
    events: tokio::sync::broadcast::Receiver<kvfleet_proto::KvEvent>,
    /// Per worker: the process start count last seen and the epoch announced for it.
    epochs: BTreeMap<WorkerId, (u64, u64)>,
    /// The uploader's clock starts here.
    origin: tokio::time::Instant,
}

/// Prepares the client (state directory, peer key, HTTP client) and returns the future that
/// runs it until `stop` is cancelled. Preparation errors are returned at once, so a bad state
/// directory stops the agent's start with a clear message instead of failing in the background.
pub fn start(
    config: ControlPlaneConfig,
    node: Node,
    stop: CancellationToken,
) -> Result<(Handle, impl Future<Output = ()> + Send + 'static), ClientError> {
    let state = StateDir::open(&config.state_dir)?;
    let key = load_or_create_key(&state)?;
    let api = Api::new(&config.url, config.request_timeout)?;
    let handle = Handle::default();
    let kv_events = node.pool.subscribe_kv_events();
    let client = Arc::new(Client {
        config,
        node: node.clone(),
        api,
        state,
        key,
        handle: handle.clone(),
        book: Mutex::new(Book::default()),
        wake: Notify::new(),
        apply_lock: tokio::sync::Mutex::new(()),
        kv: tokio::sync::Mutex::new(KvUpload {
            uploader: crate::kv_sync::Uploader::new(crate::kv_sync::UploaderConfig::default()),
            events: kv_events,
            epochs: BTreeMap::new(),
            origin: tokio::time::Instant::now(),
        }),
        follower: tokio::sync::Mutex::new(crate::kv_sync::Follower::new(
            crate::kv_sync::FollowerConfig::default(),
        )),
    });
    Ok((handle, run(client, stop)))
}

fn load_or_create_key(state: &StateDir) -> Result<rcgen::KeyPair, ClientError> {
    let key_error = |reason: String| ClientError::Key {
        path: state.key_path().display().to_string(),
        reason,
    };
    if let Some(pem) = state.key_pem()? {
        return rcgen::KeyPair::from_pem(&pem).map_err(|e| key_error(e.to_string()));
    }
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| key_error(e.to_string()))?;
    state.save_key_pem(&key.serialize_pem())?;
    Ok(key)
}

async fn run(client: Arc<Client>, stop: CancellationToken) {
    // Serve what the control plane last asked for while we try to reach it.
    match client.state.desired() {
        Ok(Some(saved)) => {
            tracing::info!(
                generation = saved.generation,
                workers = saved.workers.len(),
                "starting the workers of the last desired state"
            );
            client.apply(&saved).await;
        }
        Ok(None) => {}
        Err(e) => tracing::warn!(error = %e, "cannot read the saved desired state"),
    }
    let mut attempt = 0u32;
    while !stop.is_cancelled() {
        let identity = match client.register().await {
            Ok(identity) => {
                attempt = 0;
                identity
            }
            Err(e) => {
                client.handle.update(|s| s.connected = false);
                let delay = client.backoff(attempt);
                attempt = attempt.saturating_add(1);
                log_failure("registration", &e, attempt, delay);
                if sleep_or_stop(delay, &stop).await {
                    return;
                }
                continue;
            }
        };
        let ended = tokio::select! {
            ended = client.heartbeat_loop(&identity) => ended,
            ended = client.watch_loop(&identity) => ended,
            ended = client.kv_upload_loop(&identity) => ended,
            ended = client.kv_follow_loop(&identity) => ended,
            ended = client.directory_loop(&identity) => ended,
            () = stop.cancelled() => return,
        };
        // The credential was refused: the node was removed (or its credential revoked).
        tracing::error!(node = %identity.node_id, error = %ended,
            "the control plane no longer accepts this node's credential");
        if client.config.join_token.is_some() {
            tracing::warn!("forgetting the old identity and joining again with the join token");
            if let Err(e) = client.state.forget_identity() {
                tracing::error!(error = %e, "cannot forget the old identity");
            }
        }
        if sleep_or_stop(client.backoff(attempt), &stop).await {
            return;
        }
        attempt = attempt.saturating_add(1);
    }
}

/// Sleeps; `true` when `stop` was cancelled first.
async fn sleep_or_stop(delay: Duration, stop: &CancellationToken) -> bool {
    tokio::select! {
        () = tokio::time::sleep(delay) => false,
        () = stop.cancelled() => true,
    }
}

/// Logs a failed call: the first failures and then every tenth at warn, so a long outage does
/// not flood the journal but stays visible.
fn log_failure(what: &str, error: &CpError, attempt: u32, retry_in: Duration) {
    let retry_ms = retry_in.as_millis() as u64;
    if attempt <= 3 || attempt.is_multiple_of(10) || !error.is_transient() {
        tracing::warn!(%error, attempt, retry_ms, "{what} failed; the workers keep serving");
    } else {
        tracing::debug!(%error, attempt, retry_ms, "{what} failed");
    }
}

impl Client {
    fn backoff(&self, attempt: u32) -> Duration {
        timing::backoff(
            self.config.retry_backoff_initial,
            self.config.retry_backoff_max,
            attempt,
            rand::random::<f64>(),
        )
    }

    fn public_key(&self) -> AgentPublicKey {
        AgentPublicKey {
            algorithm: KeyAlgorithm::EcdsaP256,
            public_key: base64::engine::general_purpose::STANDARD.encode(self.key.public_key_raw()),
        }
    }

    fn gpus(&self) -> Vec<GpuInfo> {
        match self.node.inventory.snapshot() {
            Ok(snapshot) => snapshot.gpus,
            Err(e) => {
                tracing::debug!(error = %e, "GPU inventory unavailable");
                Vec::new()
            }
        }
    }

    fn join_token(&self) -> Result<Option<String>, CpError> {
        match &self.config.join_token {
            None => Ok(None),
            Some(JoinToken::Inline(token)) => Ok(Some(token.clone())),
            Some(JoinToken::File(path)) => std::fs::read_to_string(path)
                .map(|t| Some(t.trim().to_owned()))
                .map_err(|e| CpError::Rejected {
                    status: 0,
                    detail: format!("reading the join token {}: {e}", path.display()),
                }),
        }
    }

    /// Registers with the stored credential (inventory refresh) or the join token (a new node);
    /// stores what comes back.
    async fn register(&self) -> Result<Identity, CpError> {
        let stored = self.state.identity().ok().flatten();
        let bearer = match (&stored, self.join_token()?) {
            (Some(identity), _) => identity.credential.clone(),
            (None, Some(token)) => token,
            (None, None) => {
                return Err(CpError::Rejected {
                    status: 0,
                    detail: format!(
                        "no credential in {} and no join token: set [control_plane] join_token \
                         or join_token_file",
                        self.state.path().display()
                    ),
                });
            }
        };
        let gpus = self.gpus();
        let request = RegisterRequest {
            hostname: self.node.hostname.clone(),
            agent_version: Some(env!("CARGO_PKG_VERSION").to_owned()),
            frontend_addr: Some(self.node.frontend_addr.clone()),
            peer_addr: self.node.peer.advertised(),
            addresses: self.node.addresses.clone(),
            cpu_slots: self
                .config
                .cpu_slots
                .unwrap_or(u32::from(gpus.is_empty()))
                .try_into()
                .unwrap_or(i32::MAX),
            labels: self.config.labels.clone(),
            gpus: gpus
                .iter()
                .filter_map(|g| {
                    Some(GpuInventory {
                        id: reconcile::gpu_uuid(g)?,
                        index: i32::try_from(g.index).ok()?,
                        name: g.name.clone(),
                        memory_total_bytes: i64::try_from(g.memory_total_bytes).ok()?,
                        pci_bus_id: g.pci_bus_id.clone(),
                    })
                })
                .collect(),
            public_key: Some(self.public_key()),
        };
        let response = match self.api.register(&bearer, &request).await {
            Err(CpError::Unauthorized(detail)) if stored.is_some() => {
                // The stored credential is dead; with a join token, join as a new node now.
                if self.config.join_token.is_some() {
                    tracing::warn!(%detail, "the stored credential was refused: joining again");
                    if let Err(e) = self.state.forget_identity() {
                        tracing::error!(error = %e, "cannot forget the old identity");
                    }
                }
                return Err(CpError::Unauthorized(detail));
            }
            other => other?,
        };
        let identity = Identity {
            node_id: response.node_id,
            credential: response
                .credential
                .clone()
                .or_else(|| stored.as_ref().map(|s| s.credential.clone()))
                .ok_or_else(|| {
                    CpError::BadResponse("registration returned no credential".into())
                })?,
        };
        if let Err(e) = self.state.save_identity(&identity) {
            // Without it the next start registers again with the join token (and collides
            // with this node's hostname): loud, but serving goes on.
            tracing::error!(error = %e, "cannot store the agent credential");
        }
        if let Err(e) = self.state.save_certificate(&response.certificate) {
            tracing::error!(error = %e, "cannot store the peer certificate");
        }
        tracing::info!(node = %identity.node_id, hostname = %self.node.hostname,
            serial = %response.certificate.serial, not_after = %response.certificate.not_after,
            desired_generation = response.desired_generation, "registered with the control plane");
        self.handle.update(|s| {
            s.node_id = Some(identity.node_id);
            s.connected = true;
        });
        Ok(identity)
    }

    /// Heartbeats until the credential is refused (the returned error).
    async fn heartbeat_loop(&self, identity: &Identity) -> CpError {
        let mut interval = self
            .config
            .heartbeat_interval
            .unwrap_or(Duration::from_secs(5));
        let mut rates = Rates::default();
        let mut failures = 0u32;
        loop {
            self.prune_models();
            self.retire_drained();
            let beat = self.heartbeat(&mut rates);
            let reported_stops: Vec<WorkerId> = self
                .book
                .lock()
                .map(|b| b.stopped.iter().copied().collect())
                .unwrap_or_default();
            let delay = match self.api.heartbeat(&identity.credential, &beat).await {
                Ok(response) => {
                    failures = 0;
                    self.handle.update(|s| s.connected = true);
                    if let Ok(mut book) = self.book.lock() {
                        for id in &reported_stops {
                            book.stopped.remove(id);
                        }
                    }
                    if Some(response.desired_generation) != self.handle.status().generation {
                        self.wake.notify_one();
                    }
                    if self.config.heartbeat_interval.is_none()
                        && response.heartbeat_interval_ms > 0
                    {
                        interval = Duration::from_millis(
                            response.heartbeat_interval_ms.clamp(100, 600_000),
                        );
                    }
                    self.renew_if_due(identity).await;
                    interval
                }
                Err(e @ CpError::Unauthorized(_)) => return e,
                Err(e) => {
                    self.handle.update(|s| s.connected = false);
                    let delay = self
                        .backoff(failures)
                        .min(interval.max(self.config.retry_backoff_initial));
                    failures = failures.saturating_add(1);
                    log_failure("heartbeat", &e, failures, delay);
                    delay
                }
            };
            tokio::time::sleep(delay).await;
        }
    }

    /// Long-polls the desired state and reconciles every new generation, until the credential
    /// is refused (the returned error).
    async fn watch_loop(&self, identity: &Identity) -> CpError {
        // The first call of a session returns at once: whatever changed while we were away
        // is applied right after (re)registration.
        let mut held: Option<i64> = None;
        let mut failures = 0u32;
        loop {
            match self
                .api
                .desired_state(&identity.credential, held, self.config.watch_wait)
                .await
            {
                Ok(desired) => {
                    failures = 0;
                    self.handle.update(|s| s.connected = true);
                    if held != Some(desired.generation) {
                        self.apply(&desired).await;
                        if let Err(e) = self.state.save_desired(&desired) {
                            tracing::warn!(error = %e, "cannot save the desired state");
                        }
                        held = Some(desired.generation);
                    }
                }
                Err(e @ CpError::Unauthorized(_)) => return e,
                Err(e) => {
                    self.handle.update(|s| s.connected = false);
                    let delay = self.backoff(failures);
                    failures = failures.saturating_add(1);
                    log_failure("desired-state watch", &e, failures, delay);
                    // A heartbeat that gets through means the control plane is back: retry
                    // then rather than at the end of a long backoff.
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = self.wake.notified() => {}
                    }
                }
            }
        }
    }

    /// Uploads the workers' KV events until the credential is refused (the returned error).
    async fn kv_upload_loop(&self, identity: &Identity) -> CpError {
        use tokio::sync::broadcast::error::TryRecvError;
        let mut kv = self.kv.lock().await;
        loop {
            let now = kv.origin.elapsed();
            self.refresh_epochs(&mut kv);
            if kv.uploader.loads_due(now) {
                let loads = self
                    .node
                    .pool
                    .workers()
                    .iter()
                    .filter_map(load_report)
                    .collect();
                kv.uploader.set_loads(loads, now);
            }
            loop {
                match kv.events.try_recv() {
                    Ok(event) => kv.uploader.push(event, now),
                    // Lost events show up as a gap in the worker's ids at the control plane,
                    // which applies what follows: a few blocks missing from the index.
                    Err(TryRecvError::Lagged(n)) => {
                        tracing::warn!(lost = n, "KV events dropped: the upload fell behind");
                    }
                    Err(TryRecvError::Empty | TryRecvError::Closed) => break,
                }
            }
            if let Some(batch) = kv.uploader.poll(now) {
                match self
                    .api
                    .upload_kv_events(&identity.credential, &batch)
                    .await
                {
                    Ok(result) => kv.uploader.on_sent(&result),
                    Err(e @ CpError::Unauthorized(_)) => return e,
                    Err(e) => {
                        tracing::debug!(error = %e, "KV event upload failed; retrying");
                        let now = kv.origin.elapsed();
                        kv.uploader.on_failed(e.is_transient(), now);
                    }
                }
                continue;
            }
            let wait = kv
                .uploader
                .next_wakeup()
                .map_or(Duration::from_millis(500), |at| {
                    at.saturating_sub(kv.origin.elapsed())
                })
                .clamp(Duration::from_millis(5), Duration::from_millis(500));
            // Wake for the next event, or when a batch, a retry or a load sample falls due; the
            // 500 ms cap also picks up engine restarts (new epochs) without events.
            let received = tokio::select! {
                received = kv.events.recv() => match received {
                    Ok(event) => Some(event),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(lost = n, "KV events dropped: the upload fell behind");
                        None
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                        tokio::time::sleep(wait).await;
                        None
                    }
                },
                () = tokio::time::sleep(wait) => None,
            };
            if let Some(event) = received {
                // A worker that just started can store blocks before this loop next looks at
                // the pool: give it its epoch first, or its first events would go out under
                // epoch 0 and the announcement that follows would reset the worker, dropping
                // those very blocks from every router.
                self.refresh_epochs(&mut kv);
                let now = kv.origin.elapsed();
                kv.uploader.push(event, now);
            }
        }
    }

    /// Reads the fleet directory (every running worker, its model and its node's peer address)
    /// into the fleet router every [`DIRECTORY_INTERVAL`], until the credential is refused.
    async fn directory_loop(&self, identity: &Identity) -> CpError {
        let fleet = &self.node.fleet;
        loop {
            match self.api.fleet_directory(&identity.credential).await {
                Ok(directory) => fleet.set_directory(&directory, identity.node_id),
                Err(e @ CpError::Unauthorized(_)) => return e,
                // The last directory stays in force; the stream still removes lost workers.
                Err(e) => tracing::debug!(error = %e, "fleet directory unavailable; retrying"),
            }
            tokio::time::sleep(DIRECTORY_INTERVAL).await;
        }
    }

    /// Follows the control plane's KV stream into the fleet router (snapshot, then the
    /// sequenced stream; approximate routing while the control plane is away), and keeps this
    /// node's workers registered in it, until the credential is refused (the returned error).
    async fn kv_follow_loop(&self, identity: &Identity) -> CpError {
        use crate::kv_sync::{Follower, FollowerRequest, PageOutcome};
        let fleet = &self.node.fleet;
        let mut follower = self.follower.lock().await;
        let follower: &mut Follower = &mut follower;
        loop {
            fleet.sync_local(&self.node.pool.workers());
            let answer = match follower.next_request() {
                FollowerRequest::Snapshot => {
                    self.api
                        .kv_snapshot(&identity.credential)
                        .await
                        .map(|snapshot| {
                            fleet.with_router(|r| follower.on_snapshot(r, &snapshot, fleet.now()));
                            tracing::info!(
                                seq = snapshot.seq,
                                workers = snapshot.workers.len(),
                                blocks = snapshot.block_count(),
                                "fleet router loaded a KV snapshot"
                            );
                        })
                }
                FollowerRequest::Stream { after, loads_after } => self
                    .api
                    .kv_stream(&identity.credential, after, loads_after, KV_STREAM_WAIT)
                    .await
                    .map(|page| {
                        let outcome =
                            fleet.with_router(|r| follower.on_page(r, &page, fleet.now()));
                        if let PageOutcome::Resync(reason) = outcome {
                            tracing::info!(?reason, "fleet router re-syncs from a snapshot");
                        }
                    }),
            };
            match answer {
                Ok(()) => {}
                Err(e @ CpError::Unauthorized(_)) => return e,
                Err(e) => {
                    let was = follower.is_fallen_back();
                    fleet.with_router(|r| follower.on_unreachable(r, fleet.now()));
                    if follower.is_fallen_back() && !was {
                        tracing::warn!(error = %e,
                            "KV stream unreachable: the fleet router predicts on its own \
                             (approximate) until the control plane is back");
                    } else {
                        tracing::debug!(error = %e, "KV stream request failed; retrying");
                    }
                    fleet.record_follower(follower);
                    tokio::time::sleep(follower.retry_delay().max(Duration::from_millis(50))).await;
                    continue;
                }
            }
            fleet.record_follower(follower);
        }
    }

    /// Announces a new engine epoch for every worker whose process (re)started, and forgets
    /// workers that left the pool. Epochs are wall-clock milliseconds, so they grow across
    /// agent restarts too.
    fn refresh_epochs(&self, kv: &mut KvUpload) {
        let statuses = self.node.pool.workers();
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        for w in &statuses {
            let known = kv.epochs.get(&w.id).copied();
            if known.is_none_or(|(starts, _)| starts != w.starts) && w.starts > 0 {
                let epoch = known.map_or(now_ms, |(_, e)| now_ms.max(e + 1));
                kv.epochs.insert(w.id, (w.starts, epoch));
                kv.uploader.set_epoch(w.id, epoch);
            }
        }
        let gone: Vec<WorkerId> = kv
            .epochs
            .keys()
            .filter(|id| !statuses.iter().any(|w| w.id == **id))
            .copied()
            .collect();
        for id in gone {
            kv.epochs.remove(&id);
            kv.uploader.forget_worker(id);
        }
    }

    async fn renew_if_due(&self, identity: &Identity) {
        let Ok(Some(cert)) = self.state.certificate() else {
            return;
        };
        if !timing::renewal_due(cert.not_before, cert.not_after, chrono::Utc::now()) {
            return;
        }
        let request = RenewRequest {
            public_key: Some(self.public_key()),
        };
        match self.api.renew(&identity.credential, &request).await {
            Ok(issued) => match self.state.save_certificate(&issued) {
                Ok(()) => tracing::info!(serial = %issued.serial, not_after = %issued.not_after,
                    "peer certificate renewed"),
                Err(e) => tracing::error!(error = %e, "cannot store the renewed certificate"),
            },
            Err(e) => tracing::warn!(error = %e, not_after = %cert.not_after,
                "certificate renewal failed; retrying with the next heartbeat"),
        }
    }

    /// Reconciles the pool (and the frontend's models) to `desired`.
    async fn apply(&self, desired: &DesiredState) {
        let _serial = self.apply_lock.lock().await;
        let gpus = self.gpus();
        let (targets, unrunnable) = reconcile::targets(desired, &gpus, &self.node.local_models);
        let mut unrunnable: BTreeMap<WorkerId, String> =
            unrunnable.into_iter().map(|u| (u.id, u.reason)).collect();
        // Models first: a worker is only useful once the frontend can tokenize for it.
        let mut runnable = Vec::new();
        let mut loaded: BTreeMap<String, Result<(), String>> = BTreeMap::new();
        for target in targets {
            let outcome = match loaded.get(&target.model.name) {
                Some(outcome) => outcome.clone(),
                None => {
                    let outcome = self.ensure_model(&target.model).await;
                    loaded.insert(target.model.name.clone(), outcome.clone());
                    outcome
                }
            };
            match outcome {
                Ok(()) => runnable.push(target),
                Err(reason) => {
                    unrunnable.insert(target.id, reason);
                }
            }
        }
        for (id, reason) in &unrunnable {
            tracing::error!(worker = %id, %reason, "desired worker cannot run on this node");
        }
        let running = self.node.pool.running();
        let steps = reconcile::plan(&runnable, &running);
        let pool = &self.node.pool;
        // A draining worker this node does not run (the agent restarted since) has nothing left
        // to drain: it is reported stopped, so the control plane retires it and frees its slot.
        let mut stopped: Vec<WorkerId> = runnable
            .iter()
            .filter(|t| t.draining && !running.iter().any(|w| w.id == t.id))
            .map(|t| t.id)
            .collect();
        for step in &steps {
            match step {
                reconcile::Step::Start(t) => {
                    tracing::info!(worker = %t.id, model = %t.model.name, device = %t.config.device,
                        role = %t.config.role, "starting worker (desired state)");
                    pool.start_worker(t.id, t.config.clone(), t.model.clone());
                }
                reconcile::Step::Stop(id) => {
                    tracing::info!(worker = %id, grace_s = self.node.drain_grace.as_secs_f64(),
                        "stopping worker (no longer desired)");
                    pool.retire_worker(*id, self.node.drain_grace);
                    stopped.push(*id);
                }
                reconcile::Step::Restart(t) => {
                    tracing::info!(worker = %t.id, role = %t.config.role, device = %t.config.device,
                        "restarting worker with its new definition");
                    pool.stop_worker(t.id);
                    pool.start_worker(t.id, t.config.clone(), t.model.clone());
                }
                reconcile::Step::Drain(id) => {
                    tracing::info!(worker = %id, "draining worker");
                    pool.set_draining(*id, true);
                }
                reconcile::Step::Undrain(id) => {
                    pool.set_draining(*id, false);
                }
            }
        }
        if let Ok(mut book) = self.book.lock() {
            book.unrunnable = unrunnable;
            book.stopped.extend(stopped);
            book.wanted_models = runnable.iter().map(|t| t.model.name.clone()).collect();
        }
        self.prune_models();
        self.handle
            .update(|s| s.generation = Some(desired.generation));
        tracing::info!(
            generation = desired.generation,
            steps = steps.len(),
            workers = runnable.len(),
            "desired state applied"
        );
    }

    /// Models that no desired worker uses and no running (draining) worker still serves leave
    /// the frontend: their requests get 404 instead of 503. Called after each reconcile and
    /// with each heartbeat, since retiring workers finish in the background.
    fn prune_models(&self) {
        let wanted = match self.book.lock() {
            Ok(book) => book.wanted_models.clone(),
            Err(_) => return,
        };
        let serving: BTreeSet<String> = self
            .node
            .pool
            .running()
            .into_iter()
            .map(|w| w.config.model)
            .collect();
        for name in self.node.models.names() {
            if !wanted.contains(&name) && !serving.contains(&name) {
                self.node.models.remove(&name);
            }
        }
    }

    async fn ensure_model(&self, model: &ModelConfig) -> Result<(), String> {
        if let Some(served) = self.node.models.get(&model.name)
            && served.config == *model
        {
            return Ok(());
        }
        self.node
            .models
            .register(model.clone())
            .await
            .map(drop)
            .map_err(|e| e.to_string())
    }

    /// Stops each draining worker that has nothing left to serve and reports it stopped, so the
    /// control plane retires it: a scale-down or a role flip ends without failing a request.
    fn retire_drained(&self) {
        let idle: Vec<WorkerId> = self
            .node
            .pool
            .workers()
            .iter()
            .filter(|w| w.state == WorkerState::Draining && w.outstanding == 0)
            .map(|w| w.id)
            .collect();
        for id in &idle {
            tracing::info!(worker = %id, "stopping drained worker (nothing left to serve)");
            // Not retire_worker: it returns at once for a worker already draining.
            self.node.pool.stop_worker(*id);
        }
        if let Ok(mut book) = self.book.lock() {
            book.stopped.extend(idle);
        }
    }

    /// The heartbeat body now.
    fn heartbeat(&self, rates: &mut Rates) -> Heartbeat {
        let now = tokio::time::Instant::now();
        let statuses = self.node.pool.workers();
        let counters = self.node.pool.counters();
        let gpus = self.gpus();
        let gpu_util: BTreeMap<u32, f32> = gpus
            .iter()
            .filter_map(|g| {
                Some((
                    g.index,
                    (g.utilization_percent? as f32 / 100.0).clamp(0.0, 1.0),
                ))
            })
            .collect();
        let per_second = rates.update(now, &counters);
        let mut workers: Vec<ObservedWorker> = statuses
            .iter()
            .map(|w| {
                let (request_rate, tokens_per_s) =
                    per_second.get(&w.id).copied().unwrap_or_default();
                let gpu_utilization =
                    match w.device.strip_prefix("gpu:").and_then(|i| i.parse().ok()) {
                        Some(index) => gpu_util.get(&index).copied(),
                        None => None,
                    };
                ObservedWorker {
                    worker_id: w.id.0 as i64,
                    state: observed_state(w.state),
                    metrics: Some(WorkerMetrics {
                        request_rate,
                        ttft_p50_ms: None,
                        ttft_p99_ms: None,
                        itl_p50_ms: None,
                        itl_p99_ms: None,
                        tokens_per_s,
                        kv_blocks_used: w.kv_blocks_used.try_into().unwrap_or(i64::MAX),
                        kv_blocks_total: w.kv_blocks_total.try_into().unwrap_or(i64::MAX),
                        // Since the worker process started (its engine's counters).
                        prefix_hit_rate: (w.prefix_query_tokens > 0).then(|| {
                            (w.prefix_hit_tokens as f64 / w.prefix_query_tokens as f64) as f32
                        }),
                        gpu_utilization,
                    }),
                    window: None,
                }
            })
            .collect();
        let running: BTreeSet<WorkerId> = statuses.iter().map(|w| w.id).collect();
        if let Ok(book) = self.book.lock() {
            for id in book.unrunnable.keys().filter(|id| !running.contains(id)) {
                workers.push(ObservedWorker {
                    worker_id: id.0 as i64,
                    state: ObservedWorkerState::Failed,
                    metrics: None,
                    window: None,
                });
            }
            for id in book.stopped.iter().filter(|id| !running.contains(id)) {
                workers.push(ObservedWorker {
                    worker_id: id.0 as i64,
                    state: ObservedWorkerState::Stopped,
                    metrics: None,
                    window: None,
                });
            }
        }
        Heartbeat {
            peer_addr: self.node.peer.advertised(),
            workers,
            gpus: gpus
                .iter()
                .filter_map(|g| {
                    Some(GpuStatus {
                        id: reconcile::gpu_uuid(g)?,
                        utilization: g
                            .utilization_percent
                            .map(|p| (p as f32 / 100.0).clamp(0.0, 1.0)),
                        memory_used_bytes: i64::try_from(g.memory_used_bytes).ok(),
                    })
                })
                .collect(),
        }
    }
}

/// A serving worker's live load as the pool last heard it, for the KV upload (`None` for
/// workers that serve nothing: starting, stopped, failed).
fn load_report(w: &crate::backend::WorkerStatus) -> Option<WorkerLoadReport> {
    if !matches!(w.state, WorkerState::Ready | WorkerState::Draining) {
        return None;
    }
    // The pool knows at once when a worker's last request ended; the worker's own figures
    // catch up only with its next status (every 250 ms). Idle is idle: report it exactly, so
    // routers stop counting finished work as soon as possible.
    if w.outstanding == 0 {
        return Some(WorkerLoadReport {
            worker: w.id,
            prefill_tokens: 0,
            decode_blocks: 0,
            queue_depth: 0,
            age_ms: 0,
        });
    }
    Some(WorkerLoadReport {
        worker: w.id,
        prefill_tokens: w.prefill_tokens,
        decode_blocks: w.kv_blocks_used,
        queue_depth: w.waiting,
        age_ms: 0,
    })
}

fn observed_state(state: WorkerState) -> ObservedWorkerState {
    match state {
        WorkerState::Starting => ObservedWorkerState::Starting,
        WorkerState::Ready => ObservedWorkerState::Ready,
        WorkerState::Draining => ObservedWorkerState::Draining,
        WorkerState::Stopped => ObservedWorkerState::Stopped,
        WorkerState::Failed => ObservedWorkerState::Failed,
    }
}

/// Cumulative (requests, tokens) per worker.
type Totals = BTreeMap<WorkerId, (u64, u64)>;

/// Request and token rates from cumulative counters between two heartbeats.
#[derive(Debug, Default)]
struct Rates {
    last: Option<(tokio::time::Instant, Totals)>,
}

impl Rates {
    fn update(
        &mut self,
        now: tokio::time::Instant,
        counters: &[crate::worker::supervisor::WorkerCounters],
    ) -> BTreeMap<WorkerId, (f32, f32)> {
        let current: Totals = counters
            .iter()
            .map(|c| (c.id, (c.requests, c.tokens)))
            .collect();
        let mut rates = BTreeMap::new();
        if let Some((then, before)) = &self.last {
            let secs = now.duration_since(*then).as_secs_f32();
            if secs > 0.0 {
                for (id, (requests, tokens)) in &current {
                    // A worker restarted under the same id starts from zero: no negative rates.
                    let (r0, t0) = before.get(id).copied().unwrap_or((0, 0));
                    rates.insert(
                        *id,
                        (
                            requests.saturating_sub(r0) as f32 / secs,
                            tokens.saturating_sub(t0) as f32 / secs,
                        ),
                    );
                }
            }
        }
        self.last = Some((now, current));
        rates
    }
}
