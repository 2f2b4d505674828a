//! The worker pool: one OS process per worker, each supervised by its own task, restarted with
//! exponential backoff when it dies, and reached over its Unix socket.
//!
//! A worker that crashes takes down only its own requests: each gets a `Failed` event naming the
//! worker (the frontend turns it into a 502 or an SSE error event), the worker is marked
//! `failed` (so `/ready` and the router see it), and its task restarts the process after the
//! backoff. The pool implements [`Backend`], routing among ready workers by least-loaded or
//! round-robin, or to the worker a request names (any role: that is how prefill workers are
//! reached).
//!
//! Disaggregated serving: [`Backend::submit_prefill`] sends an `export_kv` request and routes
//! the worker's binary `KvBlock` frames for it to an [`ExportedBlock`] receiver, closed when
//! the request ends, fails or is cancelled, or the worker dies; [`Backend::submit_with_kv`]
//! sends the blocks as import frames right before the request (under the connection's send
//! lock, so `seq`s reach the worker in order and its stale-frame rule holds). Each block costs
//! one copy into its frame. Each worker's KV layout comes from its hello
//! ([`Backend::kv_layout`]).
//!
//! The set of workers can change while the agent runs: the control-plane client calls
//! [`WorkerPool::start_worker`], [`WorkerPool::stop_worker`] and [`WorkerPool::set_draining`]
//! to reconcile to the desired state (the decisions are in `cp_client::reconcile`). A stopped
//! worker leaves the routing set at once, its process gets a `Stop` frame and
//! `STOP_GRACE` (5 s) before it is killed, and its in-flight requests fail with a message that says
//! to retry. Standalone agents start their configured workers once and never change them.
//!
//! This file is the pool (routing, submission, the workers' state and metrics); [`lifecycle`]
//! is the supervision of one worker's process (start, connect, read its frames, stop, restart
//! with backoff).

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use kvfleet_engine::{TierConfig, TierCounters};
use kvfleet_engine_events::TranslatorCounters;
use kvfleet_proto::api::WorkerRole;
use kvfleet_proto::frame::{Frame, FrameKind};
use kvfleet_proto::histogram::LatencyHistogram;
use kvfleet_proto::{KvEvent, KvLayout, NodeId, WorkerId};
use tokio::sync::{broadcast, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::config::{ModelConfig, RoutingMode, SupervisorConfig, WorkerConfig};
use super::protocol::{
    Control, EngineSpec, KvBlockHeader, MAX_KV_BLOCK_BYTES, WireCancel, WireRequest, WireStatus,
    WorkerLatencies, WorkerSpec,
};
use crate::backend::{
    Backend, ExportedBlock, GenEvent, GenerateRequest, Generation, KvOrigin, SubmitError,
    WorkerState, WorkerStatus,
};
use crate::logging::LogConfig;

mod lifecycle;

use self::lifecycle::supervise;

/// How to start a worker process: the agent's own binary with the `worker` subcommand.
#[derive(Debug, Clone)]
pub struct WorkerCommand {
    /// The executable (normally `std::env::current_exe()`; tests pass the built binary).
    pub program: PathBuf,
}

/// KV events kept for a slow subscriber of [`WorkerPool::subscribe_kv_events`].
pub const KV_EVENT_BUFFER: usize = 4096;

/// Where a running request's output goes.
#[derive(Debug)]
struct Pending {
    events: mpsc::UnboundedSender<GenEvent>,
    /// `submit_prefill` requests: their exported KV blocks. Dropped with the entry, which
    /// closes the receiver.
    blocks: Option<mpsc::UnboundedSender<ExportedBlock>>,
}

/// One worker's live connection.
#[derive(Debug)]
struct Conn {
    tx: mpsc::UnboundedSender<Frame>,
    pending: Mutex<HashMap<u64, Pending>>,
    next_seq: AtomicU64,
    /// Held while a request's `seq` is allocated and its frames queued, so requests (with their
    /// import frames) reach the worker whole and in `seq` order.
    send: Mutex<()>,
    alive: AtomicBool,
}

impl Conn {
    fn outstanding(&self) -> usize {
        self.pending.lock().map(|p| p.len()).unwrap_or(0)
    }

    /// Fails every pending request (the worker is gone).
    fn fail_all(&self, message: &str) {
        self.alive.store(false, Ordering::Release);
        let pending: Vec<_> = match self.pending.lock() {
            Ok(mut p) => p.drain().collect(),
            Err(_) => Vec::new(),
        };
        for (_, p) in pending {
            let _ = p.events.send(GenEvent::Lost(message.to_owned()));
        }
    }

    fn deliver(&self, seq: u64, event: GenEvent, last: bool) {
        let tx = match self.pending.lock() {
            Ok(mut p) if last => p.remove(&seq).map(|p| p.events),
            Ok(p) => p.get(&seq).map(|p| p.events.clone()),
            Err(_) => None,
        };
        // A missing entry is a request the client already cancelled.
        if let Some(tx) = tx {
            let _ = tx.send(event);
        }
    }

    /// Hands an exported block to its request's receiver; a block for a request that is gone
    /// (cancelled) or did not ask for blocks is dropped.
    fn deliver_block(&self, seq: u64, block: ExportedBlock) {
        let tx = match self.pending.lock() {
            Ok(p) => p.get(&seq).and_then(|p| p.blocks.clone()),
            Err(_) => None,
        };
        if let Some(tx) = tx {
            let _ = tx.send(block);
        }
    }
}

#[derive(Debug)]
struct SlotState {
    state: WorkerState,
    pid: Option<u32>,
    conn: Option<Arc<Conn>>,
    status: WireStatus,
    starts: u64,
    /// The engine's KV layout, from the current incarnation's hello.
    kv_layout: Option<KvLayout>,
    /// Status reports received, ever (all incarnations).
    reports: u64,
    /// An external engine's server URL, from the current incarnation's hello.
    endpoint: Option<String>,
    /// The engine and its version, from the last hello.
    engine_version: Option<String>,
    /// Why the process last failed, until it is ready again.
    last_error: Option<String>,
}

impl SlotState {
    fn new(state: WorkerState) -> Self {
        Self {
            state,
            pid: None,
            conn: None,
            status: WireStatus::default(),
            starts: 0,
            kv_layout: None,
            reports: 0,
            endpoint: None,
            engine_version: None,
            last_error: None,
        }
    }

    /// What a slot whose lock is poisoned shows.
    fn failed() -> Self {
        Self::new(WorkerState::Failed)
    }
}

/// One configured worker and its supervision state.
#[derive(Debug)]
struct Slot {
    id: WorkerId,
    config: WorkerConfig,
    model: ModelConfig,
    state: Mutex<SlotState>,
    /// Cancelled to stop this worker (a child of the pool's shutdown token).
    stop: CancellationToken,
    /// Draining: serving what it has, taking nothing new.
    draining: AtomicBool,
    /// Makes the socket path unique per incarnation, so a worker restarted under the same id
    /// (a role change) never races its predecessor's socket cleanup.
    tag: u64,
    /// Requests handed to this worker, ever.
    requests: AtomicU64,
    /// Tokens it generated, ever.
    tokens: AtomicU64,
}

impl Slot {
    fn set(&self, f: impl FnOnce(&mut SlotState)) {
        if let Ok(mut s) = self.state.lock() {
            f(&mut s);
        }
    }

    fn conn(&self) -> Option<Arc<Conn>> {
        self.state.lock().ok().and_then(|s| {
            (s.state == WorkerState::Ready)
                .then(|| s.conn.clone())
                .flatten()
        })
    }

    fn status(&self) -> WorkerStatus {
        let s = self.state.lock();
        let draining = self.draining.load(Ordering::Acquire);
        let failed = SlotState::failed();
        let s = s.as_deref().unwrap_or(&failed);
        let state = match s.state {
            WorkerState::Ready | WorkerState::Starting if draining => WorkerState::Draining,
            other => other,
        };
        let (pid, status, starts) = (s.pid, &s.status, s.starts);
        let outstanding = s.conn.as_ref().map_or(0, |c| c.outstanding());
        WorkerStatus {
            id: self.id,
            model: self.model.name.clone(),
            device: self.config.device.to_string(),
            role: self.config.role,
            state,
            outstanding,
            kv_blocks_used: status.kv_blocks_used,
            kv_blocks_total: status.kv_blocks_total,
            prefix_query_tokens: status.prefix_query_tokens,
            prefix_hit_tokens: status.prefix_hit_tokens,
            prefill_tokens: status.prefill_tokens,
            waiting: status.waiting,
            starts,
            pid,
            kv_tiers: status.kv_tiers,
            kv_blocks_evicted_origin: status.kv_blocks_evicted_origin,
            engine: self.model.engine.name(),
            endpoint: s.endpoint.clone(),
            engine_version: s.engine_version.clone(),
            last_error: s.last_error.clone(),
            engine_events: status.engine_events.clone(),
        }
    }

    fn spec(&self, vocab_size: u32, supervisor: &SupervisorConfig) -> WorkerSpec {
        let kv_tiers = &supervisor.kv_tiers;
        let mut engine = EngineSpec::for_model(&self.model, vocab_size);
        engine.fleet_hash_secret = supervisor.fleet_hasher.secret();
        if let Some(external) = engine.external.as_mut() {
            // The worker gives up before the agent would kill it (a tenth of the timeout, at
            // least a second, at most half), so its reason (the server's exit, its last
            // output) reaches the agent.
            let margin = (supervisor.start_timeout / 10)
                .max(Duration::from_secs(1))
                .min(supervisor.start_timeout / 2);
            let timeout = supervisor.start_timeout.saturating_sub(margin);
            external.start_timeout_ms = timeout.as_millis().max(1) as u64;
        }
        if kv_tiers.enabled() {
            // Each worker its own directory: two workers never evict each other's files, and
            // a restarted worker (same id) finds its blocks again.
            engine.kv_tiers = TierConfig {
                disk_dir: kv_tiers.disk_dir.join(format!("worker-{}", self.id.0)),
                ..kv_tiers.clone()
            };
        }
        WorkerSpec {
            worker: self.id,
            role: self.config.role,
            device: self.config.device.to_string(),
            engine,
        }
    }
}

/// The node's workers.
#[derive(Debug)]
pub struct WorkerPool {
    slots: RwLock<Vec<Arc<Slot>>>,
    routing: RoutingMode,
    next: AtomicUsize,
    shutdown: CancellationToken,
    tasks: Mutex<JoinSet<()>>,
    kv_events: broadcast::Sender<KvEvent>,
    launch: Launch,
    next_tag: AtomicU64,
    /// Nodes that supplied KV blocks to these workers, with the certificate serials they sent
    /// them under: a heartbeat listing one of those serials as revoked evicts the node's
    /// blocks ([`WorkerPool::evict_revoked`]).
    origins: Mutex<HashMap<NodeId, HashSet<String>>>,
}

/// A worker the pool runs, as the reconciler sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolWorker {
    /// Its id (the control plane's worker id in control-plane mode).
    pub id: WorkerId,
    /// What it runs.
    pub config: WorkerConfig,
    /// Whether it was told to drain.
    pub draining: bool,
}

/// One worker's cumulative counters (for rates over a heartbeat interval).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerCounters {
    /// Its id.
    pub id: WorkerId,
    /// Requests handed to it.
    pub requests: u64,
    /// Tokens it generated.
    pub tokens: u64,
}

/// One worker's KV transfer counters since its process started (as last reported).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KvTransferCounters {
    /// Blocks it sent up for `submit_prefill` requests.
    pub blocks_exported: u64,
    /// Attached blocks it handed to its engine for import.
    pub blocks_imported: u64,
    /// Requests that ran with less of their attached KV than was sent (the rest recomputed).
    pub import_fallbacks: u64,
}

/// Everything a supervisor task needs besides its slot.
#[derive(Debug, Clone)]
struct Launch {
    command: WorkerCommand,
    supervisor: SupervisorConfig,
    log: LogConfig,
    vocab_size: u32,
    kv_events: broadcast::Sender<KvEvent>,
}

impl WorkerPool {
    /// Starts one supervised process per worker; `vocab_size` is the frontend tokenizer's. `models` must contain every worker's model
    /// (config validation guarantees it); a worker whose model is missing is skipped with an
    /// error line.
    pub fn start(
        workers: &[WorkerConfig],
        models: &[ModelConfig],
        routing: RoutingMode,
        supervisor: SupervisorConfig,
        log: LogConfig,
        command: WorkerCommand,
        vocab_size: u32,
    ) -> Arc<Self> {
        let shutdown = CancellationToken::new();
        let (kv_events, _) = broadcast::channel(KV_EVENT_BUFFER);
        let launch = Launch {
            command,
            supervisor,
            log,
            vocab_size,
            kv_events: kv_events.clone(),
        };
        let pool = Arc::new(Self {
            slots: RwLock::new(Vec::new()),
            routing,
            next: AtomicUsize::new(0),
            shutdown,
            tasks: Mutex::new(JoinSet::new()),
            kv_events,
            launch,
            next_tag: AtomicU64::new(0),
            origins: Mutex::new(HashMap::new()),
        });
        for (i, config) in workers.iter().enumerate() {
            let Some(model) = models.iter().find(|m| m.name == config.model) else {
                tracing::error!(model = %config.model, "worker skipped: unknown model");
                continue;
            };
            pool.start_worker(WorkerId(i as u64 + 1), config.clone(), model.clone());
        }
        pool
    }

    /// Starts (and from then on supervises) a worker with this id; `false` when one with the
    /// id already runs (stop it first to change what it runs) or the pool is shutting down.
    pub fn start_worker(&self, id: WorkerId, config: WorkerConfig, model: ModelConfig) -> bool {
        if self.shutdown.is_cancelled() {
            return false;
        }
        let slot = {
            let Ok(mut slots) = self.slots.write() else {
                return false;
            };
            if slots.iter().any(|s| s.id == id) {
                return false;
            }
            let slot = Arc::new(Slot {
                id,
                config,
                model,
                state: Mutex::new(SlotState::new(WorkerState::Starting)),
                stop: self.shutdown.child_token(),
                draining: AtomicBool::new(false),
                tag: self.next_tag.fetch_add(1, Ordering::Relaxed),
                requests: AtomicU64::new(0),
                tokens: AtomicU64::new(0),
            });
            slots.push(slot.clone());
            slot
        };
        if let Ok(mut tasks) = self.tasks.lock() {
            // Reap supervisors of workers stopped earlier, so the set does not grow.
            while tasks.try_join_next().is_some() {}
            tasks.spawn(supervise(slot, self.launch.clone()));
        }
        true
    }

    /// Stops the worker with this id: out of the routing set now, its process stopped in the
    /// background (in-flight requests fail and may be retried elsewhere). `false` if unknown.
    pub fn stop_worker(&self, id: WorkerId) -> bool {
        let removed = self.slots.write().ok().and_then(|mut slots| {
            let i = slots.iter().position(|s| s.id == id)?;
            Some(slots.remove(i))
        });
        match removed {
            Some(slot) => {
                slot.stop.cancel();
                true
            }
            None => false,
        }
    }

    /// Stops a worker gracefully: draining at once, stopped when its last request finishes or
    /// after `grace`, whichever comes first. Marking it serving again ([`Self::set_draining`]
    /// with `false`) before then keeps it. `false` if unknown.
    pub fn retire_worker(self: &Arc<Self>, id: WorkerId, grace: Duration) -> bool {
        let Some(slot) = self.slot(id) else {
            return false;
        };
        if slot.draining.swap(true, Ordering::AcqRel) {
            // Already draining (or retiring): one retirement at a time.
            return true;
        }
        let pool = Arc::downgrade(self);
        let Ok(mut tasks) = self.tasks.lock() else {
            return false;
        };
        tasks.spawn(async move {
            let deadline = tokio::time::Instant::now() + grace;
            loop {
                let idle = slot.state.lock().map_or(true, |s| {
                    s.conn.as_ref().is_none_or(|c| c.outstanding() == 0)
                });
                if idle || tokio::time::Instant::now() >= deadline || slot.stop.is_cancelled() {
                    break;
                }
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(50)) => {}
                    () = slot.stop.cancelled() => break,
                }
            }
            if !slot.draining.load(Ordering::Acquire) {
                return;
            }
            if let Some(pool) = pool.upgrade()
                && let Ok(mut slots) = pool.slots.write()
            {
                // This incarnation only: a worker started since under the same id stays.
                slots.retain(|s| !Arc::ptr_eq(s, &slot));
            }
            slot.stop.cancel();
        });
        true
    }

    /// Marks a worker draining (no new requests; running ones finish) or serving again.
    /// `false` if unknown.
    pub fn set_draining(&self, id: WorkerId, draining: bool) -> bool {
        match self.slot(id) {
            Some(slot) => {
                slot.draining.store(draining, Ordering::Release);
                true
            }
            None => false,
        }
    }

    /// The workers the pool runs now, in start order.
    pub fn running(&self) -> Vec<PoolWorker> {
        self.slots_snapshot()
            .iter()
            .map(|s| PoolWorker {
                id: s.id,
                config: s.config.clone(),
                draining: s.draining.load(Ordering::Acquire),
            })
            .collect()
    }

    /// Every running worker's cumulative counters.
    pub fn counters(&self) -> Vec<WorkerCounters> {
        self.slots_snapshot()
            .iter()
            .map(|s| WorkerCounters {
                id: s.id,
                requests: s.requests.load(Ordering::Relaxed),
                tokens: s.tokens.load(Ordering::Relaxed),
            })
            .collect()
    }

    /// Every running worker's last status report, with which start of its process sent it
    /// (its cumulative figures restart with each start) and whether it serves (ready or
    /// draining): what the heartbeat's windows are computed from.
    pub fn reports(&self) -> Vec<(WorkerId, u64, bool, WireStatus)> {
        self.slots_snapshot()
            .iter()
            .filter_map(|slot| {
                let serving = matches!(
                    slot.status().state,
                    WorkerState::Ready | WorkerState::Draining
                );
                let s = slot.state.lock().ok()?;
                Some((slot.id, s.starts, serving, s.status.clone()))
            })
            .collect()
    }

    /// A worker's KV transfer counters, as of its last status report; `None` if unknown.
    pub fn kv_transfers(&self, id: WorkerId) -> Option<KvTransferCounters> {
        let slot = self.slot(id)?;
        let state = slot.state.lock().ok()?;
        let status = &state.status;
        Some(KvTransferCounters {
            blocks_exported: status.kv_blocks_exported,
            blocks_imported: status.kv_blocks_imported,
            import_fallbacks: status.kv_import_fallbacks,
        })
    }

    /// Evicts, from every worker, the KV blocks supplied by each node that sent blocks here
    /// under one of the `revoked` certificate serials (the heartbeat's list, applied at every
    /// heartbeat). Returns those nodes; each is forgotten until it supplies blocks again.
    pub fn evict_revoked<'a>(&self, revoked: impl IntoIterator<Item = &'a str>) -> Vec<NodeId> {
        let revoked: HashSet<String> = revoked.into_iter().map(str::to_ascii_lowercase).collect();
        let nodes: Vec<NodeId> = {
            let Ok(mut origins) = self.origins.lock() else {
                return Vec::new();
            };
            let nodes: Vec<NodeId> = origins
                .iter()
                .filter(|(_, serials)| serials.iter().any(|s| revoked.contains(s)))
                .map(|(&node, _)| node)
                .collect();
            for node in &nodes {
                origins.remove(node);
            }
            nodes
        };
        for &node in &nodes {
            self.evict_origin(node);
        }
        nodes
    }

    /// Tells every running worker to drop the KV blocks `node` supplied from all its tiers
    /// (`Control::EvictOrigin`, after any request already queued to it). Logged once.
    pub fn evict_origin(&self, node: NodeId) {
        let Ok(frame) = Frame::json(FrameKind::Control, &Control::EvictOrigin { node }) else {
            return;
        };
        let mut workers = 0;
        for slot in self.slots_snapshot() {
            let conn = slot.state.lock().ok().and_then(|s| s.conn.clone());
            if let Some(conn) = conn
                && conn.alive.load(Ordering::Acquire)
                && conn.tx.send(frame.clone()).is_ok()
            {
                workers += 1;
            }
        }
        tracing::warn!(%node, workers,
            "a node that supplied KV blocks here was revoked: its blocks are evicted from every tier");
    }

    /// How many status reports a worker has sent (every 250 ms while it runs): a caller that
    /// needs a status taken after some moment waits for this to grow by two.
    pub fn status_reports(&self, id: WorkerId) -> Option<u64> {
        let slot = self.slot(id)?;
        let reports = slot.state.lock().ok()?.reports;
        Some(reports)
    }

    fn slot(&self, id: WorkerId) -> Option<Arc<Slot>> {
        self.slots
            .read()
            .ok()
            .and_then(|slots| slots.iter().find(|s| s.id == id).cloned())
    }

    fn slots_snapshot(&self) -> Vec<Arc<Slot>> {
        self.slots.read().map(|s| s.clone()).unwrap_or_default()
    }

    /// The KV events of every worker, as they arrive (each stamped with its worker id and
    /// per-worker event id). A subscriber that falls more than [`KV_EVENT_BUFFER`] events
    /// behind gets `RecvError::Lagged`: a gap, after which it re-syncs like any consumer that
    /// lost events. A restarted worker's ids start again from 0.
    pub fn subscribe_kv_events(&self) -> broadcast::Receiver<KvEvent> {
        self.kv_events.subscribe()
    }

    /// Whether every worker is ready.
    pub fn all_ready(&self) -> bool {
        self.slots_snapshot()
            .iter()
            .all(|s| s.status().state == WorkerState::Ready)
    }

    /// Stops every worker (in-flight requests fail) and waits for the supervisors.
    pub async fn shutdown(&self) {
        self.shutdown.cancel();
        let mut tasks = self.take_tasks();
        while tasks.join_next().await.is_some() {}
    }

    fn take_tasks(&self) -> JoinSet<()> {
        match self.tasks.lock() {
            Ok(mut tasks) => std::mem::take(&mut *tasks),
            Err(_) => JoinSet::new(),
        }
    }

    /// The worker for a request: the one it names when that one is ready, not draining and
    /// serves `model` (any role), else the pool's own choice among the non-prefill workers.
    fn choose(
        &self,
        model: &str,
        named: Option<WorkerId>,
    ) -> Option<(WorkerId, Arc<Conn>, Arc<Slot>)> {
        if let Some(id) = named
            && let Some(slot) = self.slot(id)
            && slot.model.name == model
            && !slot.draining.load(Ordering::Acquire)
            && let Some(conn) = slot.conn()
        {
            return Some((id, conn, slot));
        }
        let candidates: Vec<(WorkerId, Arc<Conn>, Arc<Slot>)> = self
            .slots_snapshot()
            .into_iter()
            .filter(|s| s.model.name == model && s.config.role != WorkerRole::Prefill)
            .filter(|s| !s.draining.load(Ordering::Acquire))
            .filter_map(|s| s.conn().map(|c| (s.id, c, s)))
            .collect();
        if candidates.is_empty() {
            return None;
        }
        match self.routing {
            RoutingMode::RoundRobin => {
                let i = self.next.fetch_add(1, Ordering::Relaxed) % candidates.len();
                candidates.into_iter().nth(i)
            }
            RoutingMode::LeastLoaded => {
                // Ties go round-robin so equal workers share the load.
                let start = self.next.fetch_add(1, Ordering::Relaxed) % candidates.len();
                let n = candidates.len();
                (0..n)
                    .map(|k| &candidates[(start + k) % n])
                    .min_by_key(|(_, c, _)| c.outstanding())
                    .cloned()
            }
        }
    }
}

/// `{worker, model, device, role}` of the per-worker families.
#[derive(Debug, Clone, PartialEq, Eq, Hash, prometheus_client::encoding::EncodeLabelSet)]
struct WorkerLabels {
    worker: String,
    model: String,
    device: String,
    role: &'static str,
}

/// `{worker, model, device, role, reason}` of `kvfleet_worker_blocks_evicted_total`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, prometheus_client::encoding::EncodeLabelSet)]
struct WorkerReasonLabels {
    worker: String,
    model: String,
    device: String,
    role: &'static str,
    reason: &'static str,
}

/// `{worker, engine}` of `kvfleet_worker_engine_info`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, prometheus_client::encoding::EncodeLabelSet)]
struct WorkerEngineLabels {
    worker: String,
    engine: &'static str,
}

/// `{worker, model, device, role, tier}` of the per-worker lower-KV-tier families.
#[derive(Debug, Clone, PartialEq, Eq, Hash, prometheus_client::encoding::EncodeLabelSet)]
struct WorkerTierLabels {
    worker: String,
    model: String,
    device: String,
    role: &'static str,
    tier: &'static str,
}

impl WorkerTierLabels {
    /// One label set and counters per lower tier a worker has on.
    fn of(w: &WorkerStatus) -> impl Iterator<Item = (Self, &TierCounters)> {
        [("g2", &w.kv_tiers.g2), ("g3", &w.kv_tiers.g3)]
            .into_iter()
            .filter(|(_, c)| c.capacity_bytes > 0)
            .map(move |(tier, c)| {
                let l = WorkerLabels::of(w);
                (
                    Self {
                        worker: l.worker,
                        model: l.model,
                        device: l.device,
                        role: l.role,
                        tier,
                    },
                    c,
                )
            })
    }
}

impl WorkerLabels {
    fn of(w: &WorkerStatus) -> Self {
        Self {
            worker: w.id.to_string(),
            model: w.model.clone(),
            device: w.device.clone(),
            role: w.role.as_str(),
        }
    }
}

impl WorkerPool {
    /// Registers the workers' figures (their last status reports, read at every scrape).
    pub fn register_metrics(self: &Arc<Self>, registry: &mut crate::metrics::Registry) {
        let pool = Arc::downgrade(self);
        registry.register_collector(crate::metrics::collector("workers", move |s| {
            let workers = pool.upgrade().map(|p| p.workers()).unwrap_or_default();
            type Field = fn(&WorkerStatus) -> u64;
            let gauges: [(&str, &str, Field); 5] = [
                (
                    "kvfleet_worker_prefill_tokens_pending",
                    "Prompt tokens admitted or waiting and not yet computed (the prefill \
                     queue), per worker",
                    |w| w.prefill_tokens,
                ),
                (
                    "kvfleet_worker_waiting_requests",
                    "Requests waiting for admission into the worker's batch",
                    |w| u64::from(w.waiting),
                ),
                (
                    "kvfleet_worker_kv_blocks_used",
                    "KV blocks in use, per worker",
                    |w| w.kv_blocks_used,
                ),
                (
                    "kvfleet_worker_outstanding_requests",
                    "Requests sent to the worker and not finished",
                    |w| w.outstanding as u64,
                ),
                ("kvfleet_worker_ready", "1 when the worker is ready", |w| {
                    u64::from(w.state == WorkerState::Ready)
                }),
            ];
            for (name, help, field) in gauges {
                s.gauges(
                    name,
                    help,
                    workers.iter().map(|w| (WorkerLabels::of(w), field(w))),
                )?;
            }
            s.gauges(
                "kvfleet_worker_engine_info",
                "1 per worker, labelled with its engine (mock, native, llamacpp, openai, vllm, \
                 sglang)",
                workers.iter().map(|w| {
                    let labels = WorkerEngineLabels {
                        worker: w.id.to_string(),
                        engine: w.engine,
                    };
                    (labels, 1u64)
                }),
            )?;
            // The pool's size is typed a counter, as it always was: Prometheus allows the
            // `_total` name of the family dashboards already read only on counters.
            let counters: [(&str, &str, Field); 4] = [
                (
                    "kvfleet_worker_kv_blocks",
                    "KV blocks in the pool, per worker",
                    |w| w.kv_blocks_total,
                ),
                (
                    "kvfleet_worker_prefix_query_tokens",
                    "Prompt tokens looked up in the worker's prefix cache since its process \
                     started",
                    |w| w.prefix_query_tokens,
                ),
                (
                    "kvfleet_worker_prefix_hit_tokens",
                    "Prompt tokens found in the worker's prefix cache (not recomputed) since its \
                     process started",
                    |w| w.prefix_hit_tokens,
                ),
                (
                    "kvfleet_worker_starts",
                    "Times the worker process was started",
                    |w| w.starts,
                ),
            ];
            for (name, help, field) in counters {
                s.counters(
                    name,
                    help,
                    workers.iter().map(|w| (WorkerLabels::of(w), field(w))),
                )?;
            }
            s.counters(
                "kvfleet_worker_blocks_evicted",
                "KV blocks a worker dropped from every tier outside its LRU order, by reason \
                 (origin_revoked: the node that supplied them was revoked), since its process \
                 started",
                workers.iter().map(|w| {
                    let l = WorkerLabels::of(w);
                    let labels = WorkerReasonLabels {
                        worker: l.worker,
                        model: l.model,
                        device: l.device,
                        role: l.role,
                        reason: "origin_revoked",
                    };
                    (labels, w.kv_blocks_evicted_origin)
                }),
            )?;
            // vllm/sglang workers' KV event translation (only workers with an event stream).
            let translated: Vec<_> = workers
                .iter()
                .filter_map(|w| w.engine_events.as_ref().map(|c| (WorkerLabels::of(w), c)))
                .collect();
            if !translated.is_empty() {
                for (name, help, _) in TranslatorCounters::default().families() {
                    s.counters(
                        name,
                        help,
                        translated
                            .iter()
                            .map(|(l, c)| (l.clone(), c.get(name).copied().unwrap_or(0))),
                    )?;
                }
            }
            // The lower KV tiers, per worker and tier (only tiers a worker has on).
            type TierField = fn(&TierCounters) -> u64;
            let tier_gauges: [(&str, &str, TierField); 3] = [
                (
                    "kvfleet_worker_kv_tier_blocks",
                    "KV blocks held in a lower tier (g2 host memory, g3 disk), per worker",
                    |c| c.blocks,
                ),
                (
                    "kvfleet_worker_kv_tier_bytes",
                    "Bytes of KV held in a lower tier, per worker",
                    |c| c.bytes,
                ),
                (
                    "kvfleet_worker_kv_tier_capacity_bytes",
                    "The byte budget of a lower KV tier, per worker",
                    |c| c.capacity_bytes,
                ),
            ];
            for (name, help, field) in tier_gauges {
                s.gauges(
                    name,
                    help,
                    workers
                        .iter()
                        .flat_map(WorkerTierLabels::of)
                        .map(|(l, c)| (l, field(c))),
                )?;
            }
            let tier_counters: [(&str, &str, TierField); 8] = [
                (
                    "kvfleet_worker_kv_tier_hits",
                    "KV blocks onboarded from a lower tier instead of recomputed",
                    |c| c.hits,
                ),
                (
                    "kvfleet_worker_kv_tier_onboard_bytes",
                    "Bytes onboarded from a lower tier into the engine's pool",
                    |c| c.onboard_bytes,
                ),
                (
                    "kvfleet_worker_kv_tier_offload_blocks",
                    "KV blocks written into a lower tier",
                    |c| c.offload_blocks,
                ),
                (
                    "kvfleet_worker_kv_tier_offload_bytes",
                    "Bytes written into a lower tier",
                    |c| c.offload_bytes,
                ),
                (
                    "kvfleet_worker_kv_tier_evictions",
                    "KV blocks a lower tier evicted to stay within its budget",
                    |c| c.evictions,
                ),
                (
                    "kvfleet_worker_kv_tier_refusals",
                    "KV blocks refused by a lower tier (admission policy or a full write queue)",
                    |c| c.refusals,
                ),
                (
                    "kvfleet_worker_kv_tier_faults",
                    "KV blocks found unusable in a lower tier (checksum, truncation, other \
                     layout, failed write), dropped and recomputed",
                    |c| c.faults,
                ),
                (
                    "kvfleet_worker_kv_tier_write_faults",
                    "Failed writes to a lower tier (IO errors, a full disk)",
                    |c| c.write_faults,
                ),
            ];
            for (name, help, field) in tier_counters {
                s.counters(
                    name,
                    help,
                    workers
                        .iter()
                        .flat_map(WorkerTierLabels::of)
                        .map(|(l, c)| (l, field(c))),
                )?;
            }
            let latencies = pool.upgrade().map(|p| p.latencies()).unwrap_or_default();
            type Pick = fn(&WorkerLatencies) -> &LatencyHistogram;
            let histograms: [(&str, &str, Pick); 3] = [
                (
                    "kvfleet_worker_ttft_seconds",
                    "Time to first token in the worker's engine (arrival to first token), since \
                     its process started",
                    |l| &l.ttft,
                ),
                (
                    "kvfleet_worker_itl_seconds",
                    "Time between consecutive tokens in the worker's engine, since its process \
                     started",
                    |l| &l.itl,
                ),
                (
                    "kvfleet_worker_queue_seconds",
                    "Time from arrival to the first admission into the worker's batch, since its \
                     process started",
                    |l| &l.queue,
                ),
            ];
            for (name, help, pick) in histograms {
                s.histograms(
                    name,
                    help,
                    latencies.iter().map(|(l, h)| (l.as_slice(), pick(h))),
                )?;
            }
            Ok(())
        }));
    }

    /// Every worker's latency histograms as last reported, labelled `{worker, model, role}`.
    fn latencies(&self) -> Vec<([(&'static str, String); 3], WorkerLatencies)> {
        self.slots_snapshot()
            .iter()
            .filter_map(|slot| {
                let state = slot.state.lock().ok()?;
                let labels = [
                    ("worker", slot.id.to_string()),
                    ("model", slot.model.name.clone()),
                    ("role", slot.config.role.as_str().to_owned()),
                ];
                Some((labels, state.status.latencies.clone()))
            })
            .collect()
    }
}

impl WorkerPool {
    /// Sends `request` (after `blocks` as import frames) to the worker it names or the pool
    /// picks; with `export`, the worker streams the prompt's KV blocks back.
    fn send(
        &self,
        request: GenerateRequest,
        export: bool,
        mut blocks: Vec<bytes::Bytes>,
        origin: Option<KvOrigin>,
    ) -> Result<(Generation, Option<mpsc::UnboundedReceiver<ExportedBlock>>), SubmitError> {
        let (worker, conn, slot) = self
            .choose(&request.model, request.worker)
            .ok_or_else(|| SubmitError::NoReadyWorker(request.model.clone()))?;
        if export {
            let layout = slot.state.lock().ok().and_then(|s| s.kv_layout.clone());
            if let Some(layout) = layout
                && layout.block_bytes() > MAX_KV_BLOCK_BYTES
            {
                return Err(SubmitError::Invalid(format!(
                    "worker {worker}'s KV blocks are {} bytes; a worker socket frame carries at \
                     most {MAX_KV_BLOCK_BYTES}",
                    layout.block_bytes()
                )));
            }
        }
        // A block that cannot travel in a frame ends the attached run: the worker recomputes
        // from there (the request never fails because of its KV).
        if let Some(i) = blocks.iter().position(|b| b.len() > MAX_KV_BLOCK_BYTES) {
            tracing::warn!(request_id = %request.request_id, block = i, bytes = blocks[i].len(),
                "attached KV block too large for a worker frame: recomputing from it");
            blocks.truncate(i);
        }
        let origin = origin.filter(|_| !blocks.is_empty());
        if let Some(origin) = &origin
            && let Ok(mut origins) = self.origins.lock()
        {
            origins
                .entry(origin.node)
                .or_default()
                .extend(origin.serials.iter().map(|s| s.to_ascii_lowercase()));
        }
        let mut frames = Vec::with_capacity(blocks.len() + 1);
        let (tx, rx) = mpsc::unbounded_channel();
        let (blocks_tx, blocks_rx) = if export {
            let (t, r) = mpsc::unbounded_channel();
            (Some(t), Some(r))
        } else {
            (None, None)
        };
        let seq = {
            let _order = conn
                .send
                .lock()
                .map_err(|_| SubmitError::WorkerGone(worker))?;
            let seq = conn.next_seq.fetch_add(1, Ordering::Relaxed);
            for (index, block) in (0u32..).zip(&blocks) {
                let hash = request
                    .block_hashes
                    .get(index as usize)
                    .copied()
                    .unwrap_or(kvfleet_proto::SequenceHash(0));
                let header = KvBlockHeader { seq, index, hash };
                frames.push(Frame {
                    kind: FrameKind::KvBlock,
                    payload: header.payload(block),
                });
            }
            let wire = WireRequest {
                seq,
                request_id: request.request_id,
                prompt: request.prompt,
                block_hashes: request.block_hashes,
                sampling: request.sampling,
                export_kv: export,
                kv_blocks: blocks.len() as u32,
                kv_origin: origin.map(|o| o.node),
            };
            frames.push(
                Frame::json(FrameKind::Request, &wire)
                    .map_err(|_| SubmitError::WorkerGone(worker))?,
            );
            if let Ok(mut pending) = conn.pending.lock() {
                pending.insert(
                    seq,
                    Pending {
                        events: tx,
                        blocks: blocks_tx,
                    },
                );
            }
            let sent = conn.alive.load(Ordering::Acquire)
                && frames.into_iter().all(|f| conn.tx.send(f).is_ok());
            if !sent {
                if let Ok(mut pending) = conn.pending.lock() {
                    pending.remove(&seq);
                }
                return Err(SubmitError::WorkerGone(worker));
            }
            seq
        };
        slot.requests.fetch_add(1, Ordering::Relaxed);
        let cancel_conn = conn.clone();
        let generation = Generation::new(worker, slot.config.role, rx, move || {
            let was_pending = cancel_conn
                .pending
                .lock()
                .map(|mut p| p.remove(&seq).is_some())
                .unwrap_or(false);
            if was_pending
                && cancel_conn.alive.load(Ordering::Acquire)
                && let Ok(frame) = Frame::json(FrameKind::Cancel, &WireCancel { seq })
            {
                let _ = cancel_conn.tx.send(frame);
            }
        });
        Ok((generation, blocks_rx))
    }
}

impl Backend for WorkerPool {
    fn submit(&self, request: GenerateRequest) -> Result<Generation, SubmitError> {
        self.send(request, false, Vec::new(), None).map(|(g, _)| g)
    }

    fn submit_prefill(
        &self,
        request: GenerateRequest,
    ) -> Result<(Generation, mpsc::UnboundedReceiver<ExportedBlock>), SubmitError> {
        match self.send(request, true, Vec::new(), None)? {
            (generation, Some(blocks)) => Ok((generation, blocks)),
            // `send` makes a receiver whenever it exports.
            (_, None) => Err(SubmitError::Unsupported),
        }
    }

    fn submit_with_kv(
        &self,
        request: GenerateRequest,
        blocks: Vec<bytes::Bytes>,
        origin: KvOrigin,
    ) -> Result<Generation, SubmitError> {
        self.send(request, false, blocks, Some(origin))
            .map(|(g, _)| g)
    }

    fn workers(&self) -> Vec<WorkerStatus> {
        self.slots_snapshot().iter().map(|s| s.status()).collect()
    }

    fn kv_layout(&self, worker: WorkerId) -> Option<KvLayout> {
        self.slot(worker)
            .and_then(|s| s.state.lock().ok().and_then(|s| s.kv_layout.clone()))
    }
}
