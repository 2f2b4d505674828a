//! The control-plane client: this node joins the fleet and runs what the control plane says.
//!
//! - [`reconcile`]: pure decisions — desired state + what runs → start/stop/drain/restart steps.
//! - [`timing`]: pure retry backoff (with jitter) and certificate-renewal timing.
//! - [`state`]: the state directory (credential, peer key and certificate, last desired state).
//! - [`http`]: the `/api/v1/agent/*` calls.
//! - `heartbeat`: the heartbeat loop, its body (worker states, rates, GPU figures) and
//!   certificate renewal.
//! - [`window`]: pure bookkeeping of the heartbeat windows (what each worker served since the
//!   last heartbeat the control plane took; a failed heartbeat's window merges into the next).
//! - `kv`: the KV event upload, the fleet directory and the KV stream follower loops.
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
mod heartbeat;
pub mod http;
mod kv;
pub mod reconcile;
pub mod timing;
pub mod trust;
pub mod window;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use kvfleet_proto::WorkerId;
use kvfleet_proto::api::{
    AgentPublicKey, DesiredState, GpuInventory, KeyAlgorithm, NodeApproval, RegisterRequest,
};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

pub use self::config::{ControlPlaneConfig, DEFAULT_STATE_DIR, JoinToken};
use self::http::{Api, CpError};
use self::kv::KvUpload;
pub use self::trust::CaTrust;
use crate::frontend::models::ModelRegistry;
use crate::gpu::{GpuInfo, Inventory};
use crate::state_dir::{self as state, Identity, StateDir};
use crate::worker::ModelConfig;
use crate::worker::WorkerPool;

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
    /// The frontend's stored responses: connected to the control plane at each registration.
    pub responses: Arc<crate::frontend::response_store::ResponseStore>,
    /// The fleet hash key every block hash of this node goes through (frontend, serving,
    /// workers): set from the desired state's `fleet_hash_secret`.
    pub fleet_hasher: crate::fleet_hash::FleetHasher,
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
    /// Whether an admin let the node in (`pending`: no workers, no peer certificate yet).
    pub approval: Option<NodeApproval>,
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
    /// The CA to trust an `https` control plane with is unusable.
    #[error(transparent)]
    Trust(#[from] trust::TrustError),
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
    /// Registration returned no certificate (the node waits for an admin's approval): the
    /// heartbeat loop asks for one once a heartbeat says the node was approved.
    needs_certificate: std::sync::atomic::AtomicBool,
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
    let tls = config.ca.as_ref().map(trust::client_config).transpose()?;
    let api = Api::new(&config.url, config.request_timeout, tls)?;
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
        needs_certificate: std::sync::atomic::AtomicBool::new(false),
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
        client
            .node
            .responses
            .set_remote(Arc::new(http::RemoteStore {
                api: client.api.clone(),
                bearer: identity.credential.clone(),
            }));
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

/// Says, at warn, that the node runs nothing until an admin approves it, and how.
fn log_waiting_for_approval(node: uuid::Uuid) {
    tracing::warn!(%node,
        "this node waits for an admin's approval: it runs no workers and has no peer \
         certificate until then. An admin runs `kvfleet nodes approve {node}` (or `kvfleet nodes \
         reject {node}`), or uses the Nodes page of the web UI");
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
            Some(JoinToken::Inline(token)) => self.bearer_of(token).map(Some),
            Some(JoinToken::File(path)) => std::fs::read_to_string(path)
                .map_err(|e| CpError::Rejected {
                    status: 0,
                    detail: format!("reading the join token {}: {e}", path.display()),
                })
                .and_then(|text| self.bearer_of(&text).map(Some)),
        }
    }

    /// The bearer part of a join token (`kvfj1.<hex>.<bearer>` or the bearer alone). A file
    /// replaced since the start with a token for another CA is refused, naming both.
    fn bearer_of(&self, text: &str) -> Result<String, CpError> {
        let parsed = kvfleet_proto::JoinTokenText::parse(text).map_err(|e| CpError::Rejected {
            status: 0,
            detail: format!("the join token: {e}"),
        })?;
        if let (Some(carried), Some(CaTrust::Fingerprint(pin) | CaTrust::JoinToken(pin))) =
            (parsed.ca, &self.config.ca)
            && carried != *pin
        {
            return Err(CpError::Rejected {
                status: 0,
                detail: format!(
                    "the join token carries the CA fingerprint {carried}, but this agent pins \
                     {pin}: they must be the same fleet CA"
                ),
            });
        }
        Ok(parsed.bearer.to_owned())
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
        // The pin a kvfj1 join token carried outlives the token: a later start without it in
        // the config still verifies the control plane.
        if let Some(CaTrust::JoinToken(pin)) = &self.config.ca
            && let Err(e) = self.state.save_ca_pin(pin)
        {
            tracing::error!(error = %e, "cannot save the control plane's CA fingerprint");
        }
        if let Err(e) = self.state.save_identity(&identity) {
            // Without it the next start registers again with the join token (and collides
            // with this node's hostname): loud, but serving goes on.
            tracing::error!(error = %e, "cannot store the agent credential");
        }
        match &response.certificate {
            Some(certificate) => {
                self.needs_certificate
                    .store(false, std::sync::atomic::Ordering::Relaxed);
                if let Err(e) = self.state.save_certificate(certificate) {
                    tracing::error!(error = %e, "cannot store the peer certificate");
                }
                tracing::info!(node = %identity.node_id, hostname = %self.node.hostname,
                    serial = %certificate.serial, not_after = %certificate.not_after,
                    desired_generation = response.desired_generation,
                    "registered with the control plane");
            }
            None => {
                self.needs_certificate
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                tracing::info!(node = %identity.node_id, hostname = %self.node.hostname,
                    approval = %response.approval, "registered with the control plane");
                log_waiting_for_approval(identity.node_id);
            }
        }
        self.handle.update(|s| {
            s.node_id = Some(identity.node_id);
            s.connected = true;
            s.approval = Some(response.approval);
        });
        Ok(identity)
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
                    // A new fleet hash secret (the control plane's sealing key changed) is
                    // applied even at the same generation.
                    if held != Some(desired.generation)
                        || desired.fleet_hash_secret != self.node.fleet_hasher.secret()
                    {
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

    /// Reconciles the pool (and the frontend's models) to `desired`.
    async fn apply(&self, desired: &DesiredState) {
        let _serial = self.apply_lock.lock().await;
        self.set_fleet_hash(desired);
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

    /// Keys this node's block hashes with the fleet's secret, before any worker is started for
    /// `desired`. Workers running under another key (an agent upgraded from an unkeyed
    /// control plane, or a control plane whose sealing key changed) are stopped, so the
    /// reconcile starts them again under the new one: until then their blocks would be indexed
    /// under hashes no other node computes. The secret itself is never logged.
    fn set_fleet_hash(&self, desired: &DesiredState) {
        let keyed = desired.fleet_hash_secret.is_some();
        match self
            .node
            .fleet_hasher
            .set(desired.fleet_hash_secret.clone())
        {
            Ok(false) => {}
            Ok(true) => {
                let running = self.node.pool.running();
                if keyed {
                    tracing::info!(restarted_workers = running.len(), "fleet hash key set");
                } else {
                    tracing::warn!(
                        restarted_workers = running.len(),
                        "the control plane sent no fleet hash key: block hashes are unkeyed"
                    );
                }
                for worker in &running {
                    tracing::info!(worker = %worker.id,
                        "restarting worker under the new fleet hash key");
                    self.node.pool.stop_worker(worker.id);
                }
            }
            Err(e) => tracing::error!(error = %e,
                "the control plane's fleet hash secret is unusable: block hashes keep their key"),
        }
    }

    /// Models that no desired worker uses, no running (draining) worker still serves and no
    /// ready worker of another node serves leave the frontend: their requests get 404 instead
    /// of 503. A model served elsewhere stays, so this frontend keeps forwarding it while its
    /// own worker is replaced (a killed worker the control plane moves to another node).
    /// Called after each reconcile and with each heartbeat, since retiring workers finish in
    /// the background.
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
            .chain(
                self.node
                    .fleet
                    .remote_workers()
                    .into_values()
                    .filter(|w| w.ready)
                    .map(|w| w.model),
            )
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
}
