//! How this node serves a request beyond handing it to one of its workers: the driver of
//! `kvfleet-serving`'s state machine, with this node's worker pool, the fleet router and the
//! peer transport as its IO.
//!
//! - [`FleetBackend`] (control-plane mode, the frontend's backend): asks the fleet router for a
//!   plan — the decode worker, and for a disaggregated model perhaps a prefill worker — and
//!   serves it: here, forwarded to the decode worker's node, or in a prefill leg and a decode
//!   leg ([`driver`]). A request without full blocks, or with no ready decode worker anywhere,
//!   goes to this node's pool as is.
//! - [`forwarded`]: the peer endpoint's handler, for what other nodes forward here: whole
//!   requests, decode legs (with the prefill leg they plan), prefill legs (which push their KV
//!   blocks back as they are computed).
//! - [`transfers`]: the KV transfers this node expects, the endpoint's block sink.
//!
//! ```text
//! decode node (driver: Serve + legs)                         prefill node (forwarded::prefill)
//!   register transfer T (expected sender, layout, hashes)
//!   ── peer Request{prompt, max_tokens 1, kv_push: T} ───▶  prefill worker runs the prompt,
//!                                                          exporting blocks as chunks complete
//!   ◀══ KV blocks of T (kvfleet-peer transfer streams) ══  (overlaps the prefill compute)
//!   ◀── Token(first token) ────────────────────────────── streamed to the client at once
//!   ◀── Finish{kv_push: blocks acknowledged} ─────────────  once the transfer ended
//!   decode worker: prompt + first token, the blocks received (contiguous from block 0)
//!   imported into its prefix cache; it prefills only the tail and decodes
//! ```
//!
//! The driver runs in the task that reads the request's events (the frontend's response, or
//! the peer stream serving a forwarded request): no task and no channel of its own, so a token
//! crosses at most the pool's channel between its worker and the client. Dropping the
//! generation (the client went away) drops the current leg — the worker cancels its sequence,
//! a peer's stream is reset — and the state machine releases the router's picks.

pub mod driver;
pub mod forwarded;
pub mod transfers;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use kvfleet_peer::TransferOptions;
use kvfleet_proto::api::WorkerRole;
pub use kvfleet_serving::PrefillOutcome;
use kvfleet_serving::{Pick, Plan, PrefillPick, Target, Timeouts};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use self::transfers::Transfers;
use crate::backend::{Backend, GenerateRequest, Generation, SubmitError, WorkerStatus};
use crate::fleet::FleetRouter;
use crate::metrics::Registry;
use crate::peer::PeerHandle;

/// The prefill leg's deadline when the directory names no policy.
const DEFAULT_PREFILL_TIMEOUT: Duration = Duration::from_secs(30);

/// What serving needs on this node: its workers, its peer endpoint, the transfers it expects,
/// and the counters of disaggregated serving.
#[derive(Debug)]
pub struct Serving {
    local: Arc<dyn Backend>,
    peer: PeerHandle,
    transfers: Arc<Transfers>,
    /// Requests decoded here by how their prefill ended (`kvfleet_disagg_prefill_total`).
    outcomes: Family<[(&'static str, &'static str); 1], Counter>,
    prefill_served: Counter,
    /// Legs lost mid-request and resumed elsewhere (`kvfleet_request_migrations_total`).
    migrated: Counter,
    /// Legs cut off for sending what their request did not ask for.
    refused_legs: Counter,
    next_transfer: AtomicU64,
    options: TransferOptions,
    timeouts: Timeouts,
    /// The frontend whose admission forwarded requests go through (set once it exists).
    admission: std::sync::OnceLock<Arc<crate::frontend::Frontend>>,
    /// The longest prefill deadline a peer's plan may ask of this node
    /// (`[peer] transfer_timeout_secs`).
    max_prefill_deadline: Duration,
    /// The fleet's block hasher: this node's own hashes of a request's tokens (decode legs,
    /// resumed requests) are computed with it, salted with the request's `cache_salt`.
    hasher: crate::fleet_hash::FleetHasher,
}

impl Serving {
    /// Makes requests forwarded here take a slot of `frontend`'s admission.
    pub fn admit_through(&self, frontend: Arc<crate::frontend::Frontend>) {
        let _ = self.admission.set(frontend);
    }

    /// A slot for a forwarded request (none before the frontend exists, at start-up).
    async fn admit(
        &self,
    ) -> Result<Option<crate::frontend::admission::Slot>, crate::frontend::api::ApiError> {
        match self.admission.get() {
            Some(frontend) => frontend.admit_forwarded().await.map(Some),
            None => Ok(None),
        }
    }

    /// A slot for a prefill leg, only if one is free now (none before the frontend exists).
    fn admit_prefill_leg(
        &self,
    ) -> Result<Option<crate::frontend::admission::Slot>, crate::frontend::api::ApiError> {
        match self.admission.get() {
            Some(frontend) => frontend.admit_prefill_leg().map(Some),
            None => Ok(None),
        }
    }

    /// Serving over this node's workers (`local`) and peer endpoint.
    pub fn new(local: Arc<dyn Backend>, peer: PeerHandle) -> Self {
        Self {
            local,
            peer,
            transfers: Arc::new(Transfers::default()),
            outcomes: Family::default(),
            prefill_served: Counter::default(),
            migrated: Counter::default(),
            refused_legs: Counter::default(),
            next_transfer: AtomicU64::new(0),
            options: TransferOptions::default(),
            timeouts: Timeouts::default(),
            admission: std::sync::OnceLock::new(),
            max_prefill_deadline: crate::peer::PeerSettings::default().transfer_timeout,
            hasher: crate::fleet_hash::FleetHasher::default(),
        }
    }

    /// Computes this node's hashes with the fleet's key (`fleet_hash`).
    pub fn with_block_hasher(mut self, hasher: crate::fleet_hash::FleetHasher) -> Self {
        self.hasher = hasher;
        self
    }

    /// This node's sequence hashes of `prompt`, salted as `sampling` asks.
    fn hashes(
        &self,
        prompt: &[u32],
        sampling: &kvfleet_proto::SamplingParams,
        block_size: kvfleet_proto::BlockSize,
    ) -> Vec<kvfleet_proto::SequenceHash> {
        sampling
            .hasher(&self.hasher.get())
            .sequence_hashes(prompt, block_size)
    }

    /// Applies `[peer]`'s limits on what one peer can ask of this node: the bytes its
    /// transfers may buffer here and the longest prefill deadline its plans may carry.
    pub fn with_peer_limits(mut self, settings: &crate::peer::PeerSettings) -> Self {
        self.transfers = Arc::new(Transfers::with_budget(settings.max_buffered_bytes_per_peer));
        self.max_prefill_deadline = settings.transfer_timeout;
        self
    }

    /// Counts a peer's request refused under `kind` in the peer endpoint's counters (exported
    /// with the transport's own, `kvfleet_peer_errors_total{kind=...}`).
    fn count_peer_refusal(&self, kind: kvfleet_peer::ErrorKind) {
        if let Some(endpoint) = self.peer.endpoint() {
            endpoint.metrics().count_error(kind);
        }
    }

    /// The peer endpoint's handle.
    pub fn peer(&self) -> &PeerHandle {
        &self.peer
    }

    /// The block sink the peer endpoint serves transfers into.
    pub fn transfers(&self) -> Arc<Transfers> {
        self.transfers.clone()
    }

    /// Requests whose prefill ended with `outcome` on this node (as the decode node).
    pub fn outcome_count(&self, outcome: PrefillOutcome) -> u64 {
        self.outcomes.get_or_create(&outcome_labels(outcome)).get()
    }

    fn count(&self, outcome: PrefillOutcome) {
        self.outcomes.get_or_create(&outcome_labels(outcome)).inc();
    }

    /// Registers disaggregated serving's counters: outcomes, prefill legs served, transfers.
    pub fn register_metrics(&self, registry: &mut Registry) {
        // Every outcome from the start, so a dashboard sees zeros rather than nothing.
        for outcome in PrefillOutcome::ALL {
            let _ = self.outcomes.get_or_create(&outcome_labels(outcome));
        }
        registry.register(
            "kvfleet_disagg_prefill",
            "Disaggregated requests decoded here, by how their prefill ended",
            self.outcomes.clone(),
        );
        registry.register(
            "kvfleet_disagg_prefill_served",
            "Prefill legs this node's prefill workers ran for other nodes' decode workers",
            self.prefill_served.clone(),
        );
        registry.register(
            "kvfleet_request_migrations",
            "Request legs lost mid-request (worker exit, broken stream, drain deadline) and \
             resumed on another worker after the tokens already delivered",
            self.migrated.clone(),
        );
        registry.register(
            "kvfleet_request_legs_refused",
            "Request legs refused as bad input: a leg that sent more tokens than its request \
             asked for, or a peer resuming a request that is already being resumed here",
            self.refused_legs.clone(),
        );
        self.transfers.register_metrics(registry);
    }

    /// Legs resumed elsewhere so far.
    pub fn migrations(&self) -> u64 {
        self.migrated.get()
    }

    /// A name for a transfer of `request_id`, unique among this node's transfers (where it is
    /// looked up) and carrying the request's id for the logs.
    fn transfer_id(&self, request_id: &str) -> String {
        let n = self.next_transfer.fetch_add(1, Ordering::Relaxed);
        format!("{request_id}/{n}")
    }
}

fn outcome_labels(outcome: PrefillOutcome) -> [(&'static str, &'static str); 1] {
    [("outcome", outcome.as_str())]
}

/// The frontend's backend in control-plane mode: each request goes where the fleet router
/// plans it; see the module docs.
#[derive(Debug)]
pub struct FleetBackend {
    serving: Arc<Serving>,
    fleet: Arc<FleetRouter>,
}

impl FleetBackend {
    /// A backend planning with `fleet` and serving through `serving`.
    pub fn new(serving: Arc<Serving>, fleet: Arc<FleetRouter>) -> Self {
        Self { serving, fleet }
    }
}

/// The serving plan of `request`: the router's picks, with where they run as this node reaches
/// them. `None`: no plan (the pool chooses).
pub(super) fn plan_request(
    serving: &Serving,
    fleet: &FleetRouter,
    request: &GenerateRequest,
) -> Option<Plan> {
    if request.block_hashes.is_empty() {
        return None;
    }
    let prompt_tokens = u32::try_from(request.prompt.len()).unwrap_or(u32::MAX);
    let planned = fleet.plan(&request.model, &request.block_hashes, prompt_tokens)?;
    let peer = &serving.peer;
    let endpoint = peer.endpoint();
    let decode_target = match (&planned.decode.target, &endpoint) {
        (Target::Remote { node, addr }, Some(_)) => Target::Remote {
            node: *node,
            addr: *addr,
        },
        // Without this node's endpoint up, the decode worker's node cannot be reached: the
        // request runs here (the pool does not know the worker and chooses).
        _ => Target::Local,
    };
    let mut unused = Vec::new();
    let prefill = planned.prefill.and_then(|pick| {
        let (node, addr) = match &pick.target {
            Target::Remote { node, addr } => (*node, addr.to_string()),
            // As the fleet directory advertises this node, so that the decode node
            // reaches it; without this node's endpoint up, the decode worker prefills.
            Target::Local => match (&endpoint, peer.advertised()) {
                (Some(endpoint), Some(advertised)) => (endpoint.node_id(), advertised),
                _ => {
                    unused.push(pick.decision.request);
                    return None;
                }
            },
        };
        Some(PrefillPick {
            worker: pick.decision.worker,
            node,
            addr,
            hold: Some(pick.decision.request),
        })
    });
    let deadline = planned.policy.map_or(DEFAULT_PREFILL_TIMEOUT, |p| {
        Duration::from_millis(u64::from(p.prefill_timeout_ms))
    });
    Some(Plan {
        decode: Some(Pick {
            worker: planned.decode.decision.worker,
            role: planned.decode.role,
            target: decode_target,
            hold: Some(planned.decode.decision.request),
        }),
        prefill,
        prefill_deadline: deadline,
        unused,
        migration_limit: planned.migration_limit,
    })
}

impl Backend for FleetBackend {
    fn submit(&self, request: GenerateRequest) -> Result<Generation, SubmitError> {
        // Without a plan the pool chooses; the driver still migrates what its worker loses.
        let plan = plan_request(&self.serving, &self.fleet, &request).unwrap_or_else(|| Plan {
            migration_limit: self.fleet.migration_limit(&request.model),
            ..Plan::local()
        });
        driver::Driver::start(
            self.serving.clone(),
            Some(self.fleet.clone()),
            request,
            plan,
        )
    }

    fn workers(&self) -> Vec<WorkerStatus> {
        self.serving.local.workers()
    }
}

/// The frontend's backend on a standalone node (and a fleet node that does not forward): this
/// node's pool chooses each request's worker, and the driver resumes a request whose worker
/// was lost on another worker of the pool (at most `migration_limit` times).
#[derive(Debug)]
pub struct PoolBackend {
    serving: Arc<Serving>,
    migration_limit: u32,
}

impl PoolBackend {
    /// Serving through `serving`'s pool, migrating at most `migration_limit` times.
    pub fn new(serving: Arc<Serving>, migration_limit: u32) -> Self {
        Self {
            serving,
            migration_limit,
        }
    }
}

impl Backend for PoolBackend {
    fn submit(&self, request: GenerateRequest) -> Result<Generation, SubmitError> {
        let plan = Plan {
            migration_limit: self.migration_limit,
            ..Plan::local()
        };
        driver::Driver::start(self.serving.clone(), None, request, plan)
    }

    fn workers(&self) -> Vec<WorkerStatus> {
        self.serving.local.workers()
    }

    fn kv_layout(&self, worker: kvfleet_proto::WorkerId) -> Option<kvfleet_proto::KvLayout> {
        self.serving.local.kv_layout(worker)
    }
}

/// The decode leg of a disaggregated request whose prefill `prefill` planned elsewhere runs
/// here, on `worker` (a forwarded request's plan: no router picks are held on this node).
fn decode_leg_plan(
    worker: kvfleet_proto::WorkerId,
    prefill: PrefillPick,
    deadline: Duration,
) -> Plan {
    Plan {
        decode: Some(Pick {
            worker,
            role: WorkerRole::Decode,
            target: Target::Local,
            hold: None,
        }),
        prefill: Some(prefill),
        prefill_deadline: deadline,
        unused: Vec::new(),
        // The node that forwarded it owns the client's stream and migrates a lost leg.
        migration_limit: 0,
    }
}

/// Resolves `host:port`: a literal address at once, a name through the system resolver on
/// tokio's blocking pool (never on the request path's threads).
pub async fn lookup(addr: &str) -> Result<SocketAddr, String> {
    if let Ok(literal) = addr.parse() {
        return Ok(literal);
    }
    tokio::net::lookup_host(addr)
        .await
        .map_err(|e| format!("cannot resolve {addr:?}: {e}"))?
        .next()
        .ok_or_else(|| format!("{addr:?} resolves to no address"))
}
