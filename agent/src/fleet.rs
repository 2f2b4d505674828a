//! The fleet router: one [`Router`] holding every worker of the fleet (this node's and the
//! others'), kept current by the control plane's KV stream.
//!
//! In control-plane mode the control-plane client drives a [`crate::kv_sync::Follower`] into
//! it (snapshot, then the sequenced stream; approximate fallback while the control plane is
//! away), and registers this node's ready workers with their KV capacity and role. Remote
//! workers enter the router when the stream first names them (capacity unknown) and leave it
//! when the control plane removes them (their node lost or removed); the fleet directory gives
//! their model, role and node's peer address, and how each model is served (mode and
//! disaggregation policy).
//!
//! One router serves every model: a request is restricted to the workers serving its model with
//! [`RouteRequest::with_candidates`], so equal block hashes of two models never mix.
//!
//! [`FleetRouter::plan`] decides where a request runs: a decode worker (aggregated or decode
//! role, KV-aware) and, for a disaggregated model whose prompt is long enough past what that
//! decode worker caches and whose chosen prefill worker is not saturated, a prefill worker
//! (KV-aware among prefill-role workers). The decision is pure bookkeeping under one lock;
//! executing it (forwarding, KV transfer, timeouts) is [`crate::serving`]'s.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use kvfleet_kv_router::PrefillDecision;
use kvfleet_kv_router::{
    Decision, RequestId, RouteRequest, Router, RouterConfig, RoutingMode, WorkerCapacity,
    choose_prefill,
};
use kvfleet_proto::api::{
    DeploymentMode, DisaggregationPolicy, FleetDirectory, FleetModel, ObservedWorkerState,
    WorkerRole,
};
use kvfleet_proto::{NodeId, SequenceHash, WorkerId};
use std::net::SocketAddr;

use crate::backend::{WorkerState, WorkerStatus};
use crate::kv_sync::{Follower, FollowerCounters};

/// A local worker as the fleet router knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct LocalWorker {
    model: String,
    role: WorkerRole,
    ready: bool,
}

/// A worker on another node, from the control plane's fleet directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteWorker {
    /// Its node.
    pub node: NodeId,
    /// The model it serves.
    pub model: String,
    /// What part of serving it does.
    pub role: WorkerRole,
    /// Whether it reported `ready`.
    pub ready: bool,
    /// The node's peer endpoint, once reported and resolvable.
    pub peer_addr: Option<SocketAddr>,
}

pub use kvfleet_serving::Target;

/// A pick: the router's decision and where the worker is.
#[derive(Debug, Clone)]
pub struct Pick {
    /// The router's decision; `decision.request` ends it ([`FleetRouter::finished`]).
    pub decision: Decision,
    /// Where the worker is.
    pub target: Target,
    /// The worker's role.
    pub role: WorkerRole,
}

/// Where a request runs: `decode` generates its tokens; `prefill`, when set, prefills the
/// prompt on another worker and pushes the KV blocks to `decode` (disaggregated serving).
///
/// Both picks stay counted in their workers' load until [`FleetRouter::finished`] with their
/// `decision.request`.
#[derive(Debug, Clone)]
pub struct RoutePlan {
    /// The worker that generates the tokens (aggregated or decode role).
    pub decode: Pick,
    /// The worker that prefills the prompt first (prefill role), when worth it.
    pub prefill: Option<Pick>,
    /// The model's policy when it is served disaggregated.
    pub policy: Option<DisaggregationPolicy>,
    /// Why `prefill` is set or not, for a disaggregated model; `None` when aggregated.
    pub prefill_decision: Option<PrefillDecision>,
    /// The model's deployment's `migration_limit`.
    pub migration_limit: u32,
}

/// Whether a worker of `role` can generate a request's tokens.
fn decodes(role: WorkerRole) -> bool {
    matches!(role, WorkerRole::Aggregated | WorkerRole::Decode)
}

#[derive(Debug)]
struct Inner {
    router: Router,
    local: BTreeMap<WorkerId, LocalWorker>,
    remote: BTreeMap<WorkerId, RemoteWorker>,
    /// How each model is served, from the directory.
    models: BTreeMap<String, FleetModel>,
    /// Prefill decisions so far, indexed by [`PrefillDecision::index`].
    prefill_decisions: [u64; 4],
    /// Picks per worker, for `/metrics`.
    picked: BTreeMap<WorkerId, u64>,
    follower: FollowerCounters,
    position: Option<u64>,
    fallen_back: bool,
    next_request: u128,
}

impl Inner {
    fn migration_limit(&self, model: &str) -> u32 {
        self.models
            .get(model)
            .map_or(kvfleet_proto::api::DEFAULT_MIGRATION_LIMIT, |m| {
                m.migration_limit
            })
    }

    /// The ready workers of `model` whose role passes `role`: local ones, and remote ones whose
    /// peer endpoint is known.
    fn candidates(&self, model: &str, role: impl Fn(WorkerRole) -> bool) -> Vec<WorkerId> {
        let mut candidates: Vec<WorkerId> = self
            .local
            .iter()
            .filter(|(_, w)| w.ready && w.model == model && role(w.role))
            .map(|(id, _)| *id)
            .collect();
        candidates.extend(
            self.remote
                .iter()
                .filter(|(_, w)| {
                    w.ready && w.model == model && role(w.role) && w.peer_addr.is_some()
                })
                .map(|(id, _)| *id),
        );
        candidates
    }

    /// A KV-aware pick among `candidates(model, role)`, counted in the worker's load (and in
    /// the per-worker pick metric). `None` when there is no candidate.
    fn pick(
        &mut self,
        model: &str,
        hashes: &[SequenceHash],
        prompt_tokens: u32,
        role: impl Fn(WorkerRole) -> bool,
        now: Duration,
    ) -> Option<Pick> {
        let candidates = self.candidates(model, role);
        if candidates.is_empty() {
            return None;
        }
        self.next_request = self.next_request.wrapping_add(1);
        let id = RequestId(self.next_request);
        let request = RouteRequest::new(id, hashes, prompt_tokens).with_candidates(&candidates);
        let decision = self.router.select(&request, now).ok()?;
        Some(self.picked_worker(decision))
    }

    /// A decision as a [`Pick`]: where its worker is, counted in the per-worker pick metric.
    fn picked_worker(&mut self, decision: Decision) -> Pick {
        *self.picked.entry(decision.worker).or_default() += 1;
        let (target, role) = match self.remote.get(&decision.worker) {
            Some(RemoteWorker {
                node,
                peer_addr: Some(addr),
                role,
                ..
            }) => (
                Target::Remote {
                    node: *node,
                    addr: *addr,
                },
                *role,
            ),
            _ => {
                let role = self.local.get(&decision.worker).map(|w| w.role);
                (Target::Local, role.unwrap_or(WorkerRole::Aggregated))
            }
        };
        Pick {
            decision,
            target,
            role,
        }
    }
}

/// The fleet-wide router, shared by the control-plane client (which feeds it) and whoever
/// routes (which asks it).
#[derive(Debug)]
pub struct FleetRouter {
    inner: Mutex<Inner>,
    origin: Instant,
    /// Picks served here, picks forwarded to a peer, forwards retried locally.
    picks: [AtomicU64; 3],
}

impl FleetRouter {
    /// An empty router in `mode`.
    pub fn new(mode: RoutingMode) -> Self {
        let config = RouterConfig {
            mode,
            ..RouterConfig::default()
        };
        Self {
            inner: Mutex::new(Inner {
                router: Router::new(config),
                local: BTreeMap::new(),
                remote: BTreeMap::new(),
                models: BTreeMap::new(),
                prefill_decisions: [0; 4],
                picked: BTreeMap::new(),
                follower: FollowerCounters::default(),
                position: None,
                fallen_back: false,
                next_request: 0,
            }),
            origin: Instant::now(),
            picks: Default::default(),
        }
    }

    /// A pick ran on this node.
    pub fn count_local(&self) {
        self.picks[0].fetch_add(1, Ordering::Relaxed);
    }

    /// A pick was forwarded to a peer.
    pub fn count_remote(&self) {
        self.picks[1].fetch_add(1, Ordering::Relaxed);
    }

    /// A forward failed before the first token and ran on this node instead.
    pub fn count_fallback(&self) {
        self.picks[2].fetch_add(1, Ordering::Relaxed);
    }

    /// `(local, forwarded, fallbacks)` so far.
    pub fn pick_counts(&self) -> (u64, u64, u64) {
        let [a, b, c] = &self.picks;
        (
            a.load(Ordering::Relaxed),
            b.load(Ordering::Relaxed),
            c.load(Ordering::Relaxed),
        )
    }

    /// The router's clock: time since this router was made.
    pub fn now(&self) -> Duration {
        self.origin.elapsed()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves a router that is still consistent enough to
        // route with (every mutation is a single call into it); keep serving.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` on the router (the follower's sink).
    pub fn with_router<R>(&self, f: impl FnOnce(&mut Router) -> R) -> R {
        f(&mut self.lock().router)
    }

    /// Records the follower's position and counters, for metrics.
    pub fn record_follower(&self, follower: &Follower) {
        let mut inner = self.lock();
        inner.follower = follower.counters();
        inner.position = follower.position();
        inner.fallen_back = follower.is_fallen_back();
    }

    /// Registers this node's workers: each one gets its KV capacity and role, and only ready
    /// ones are offered by [`FleetRouter::plan`] and [`FleetRouter::select_local`]. A worker
    /// gone from the pool leaves the router.
    pub fn sync_local(&self, workers: &[WorkerStatus]) {
        let mut inner = self.lock();
        let Inner { router, local, .. } = &mut *inner;
        for w in workers {
            let capacity = WorkerCapacity {
                kv_blocks: w.kv_blocks_total,
                max_queue_depth: None,
            };
            // add_worker updates the capacity of a worker already known (from the stream).
            if let Err(e) = router.add_worker(w.id, capacity) {
                tracing::warn!(worker = %w.id, error = %e, "cannot add a worker to the fleet router");
                continue;
            }
            local.insert(
                w.id,
                LocalWorker {
                    model: w.model.clone(),
                    role: w.role,
                    ready: w.state == WorkerState::Ready,
                },
            );
        }
        let gone: Vec<WorkerId> = local
            .keys()
            .filter(|id| !workers.iter().any(|w| w.id == **id))
            .copied()
            .collect();
        for id in gone {
            local.remove(&id);
            router.remove_worker(id);
        }
    }

    /// Replaces the remote workers (every role) and the models' serving modes with the control
    /// plane's directory (this node's own entries, `own_node`, are skipped: the pool knows them
    /// better). Remote workers enter the router if the stream has not named them yet; ones gone
    /// from the directory stop being candidates (the stream removes their blocks).
    pub fn set_directory(&self, directory: &FleetDirectory, own_node: uuid::Uuid) {
        // Names are resolved before the lock is taken: routing never waits on DNS.
        let entries: Vec<_> = directory
            .workers
            .iter()
            .filter(|w| w.node_id != own_node)
            .filter_map(|w| {
                let id = WorkerId(u64::try_from(w.worker_id).ok()?);
                Some((id, w, w.peer_addr.as_deref().and_then(resolve)))
            })
            .collect();
        let models = directory
            .models
            .iter()
            .map(|m| (m.model.clone(), m.clone()))
            .collect();
        let mut inner = self.lock();
        inner.models = models;
        let Inner { router, remote, .. } = &mut *inner;
        remote.clear();
        for (id, w, peer_addr) in entries {
            if router.next_event_id(id).is_none() {
                let capacity = WorkerCapacity {
                    kv_blocks: 0,
                    max_queue_depth: None,
                };
                if router.add_worker(id, capacity).is_err() {
                    continue;
                }
            }
            remote.insert(
                id,
                RemoteWorker {
                    node: NodeId(w.node_id),
                    model: w.model.clone(),
                    role: w.role,
                    ready: w.observed_state == ObservedWorkerState::Ready,
                    peer_addr,
                },
            );
        }
    }

    /// Chooses among every ready aggregated or decode worker of the fleet serving `model` (this
    /// node's, and other nodes' whose peer endpoint is known), by the fleet index; a prefill
    /// worker is never chosen. `None` when there is none. The decision stays counted in the
    /// worker's load until [`FleetRouter::finished`]. No prefill worker is planned: callers
    /// that serve disaggregated use [`FleetRouter::plan`].
    pub fn select(
        &self,
        model: &str,
        hashes: &[SequenceHash],
        prompt_tokens: u32,
    ) -> Option<(Decision, Target)> {
        let now = self.now();
        let mut inner = self.lock();
        let decode = inner.pick(model, hashes, prompt_tokens, decodes, now)?;
        Some((decode.decision, decode.target))
    }

    /// Plans where a request for `model` runs (see [`RoutePlan`]):
    ///
    /// - the decode worker: KV-aware among the model's ready aggregated and decode workers;
    /// - for a model the directory says is disaggregated, a prefill worker when the prompt's
    ///   part the decode worker does not cache (`prompt_tokens` minus its overlap in blocks of
    ///   the router's block size) is at least `min_remote_prefill_tokens`, a ready prefill
    ///   worker exists (KV-aware pick: the one caching most of the prompt wins, load-balanced
    ///   otherwise), and that worker's prefill load (published and own in-flight) plus the
    ///   uncached tokens stays within `max_prefill_queue_tokens`; otherwise the decode worker
    ///   prefills and a prefill pick made is released at once (none is made when every prefill
    ///   worker is that full).
    ///
    /// `None` when no decode worker is ready. Counted in
    /// `kvfleet_fleet_prefill_decisions_total` for disaggregated models.
    pub fn plan(
        &self,
        model: &str,
        hashes: &[SequenceHash],
        prompt_tokens: u32,
    ) -> Option<RoutePlan> {
        let now = self.now();
        let mut inner = self.lock();
        let decode = inner.pick(model, hashes, prompt_tokens, decodes, now)?;
        let migration_limit = inner.migration_limit(model);
        let policy = inner
            .models
            .get(model)
            .filter(|m| m.mode == DeploymentMode::Disaggregated)
            .map(|m| m.disaggregation);
        let Some(policy) = policy else {
            return Some(RoutePlan {
                decode,
                prefill: None,
                policy: None,
                prefill_decision: None,
                migration_limit,
            });
        };
        let candidates = inner.candidates(model, |role| role == WorkerRole::Prefill);
        inner.next_request = inner.next_request.wrapping_add(1);
        let prefill_request = RequestId(inner.next_request);
        let request = RouteRequest::new(decode.decision.request, hashes, prompt_tokens);
        let choice = choose_prefill(
            &mut inner.router,
            &request,
            &decode.decision,
            &policy,
            &candidates,
            prefill_request,
            now,
        );
        let decision = choice.decision;
        let prefill = choice.pick.map(|pick| inner.picked_worker(pick));
        inner.prefill_decisions[decision.index()] += 1;
        Some(RoutePlan {
            decode,
            prefill,
            policy: Some(policy),
            prefill_decision: Some(decision),
            migration_limit,
        })
    }

    /// The `migration_limit` of `model`'s deployment (the default for a model the directory
    /// does not name).
    pub fn migration_limit(&self, model: &str) -> u32 {
        self.lock().migration_limit(model)
    }

    /// How the directory says `model` is served (mode, policy); `None` when it names no such
    /// model (served aggregated).
    pub fn model_serving(&self, model: &str) -> Option<FleetModel> {
        self.lock().models.get(model).cloned()
    }

    /// Prefill decisions for disaggregated models so far, per kind.
    pub fn prefill_decision_counts(&self) -> [(PrefillDecision, u64); 4] {
        let counts = self.lock().prefill_decisions;
        PrefillDecision::ALL.map(|d| (d, counts[d.index()]))
    }

    /// The remote workers the directory named last.
    pub fn remote_workers(&self) -> BTreeMap<WorkerId, RemoteWorker> {
        self.lock().remote.clone()
    }

    /// Chooses among this node's ready workers serving `model`, by the fleet index (prefix
    /// overlap and load). `None` when no such worker is ready. The decision stays counted in
    /// the worker's load until [`FleetRouter::finished`] with its `request`.
    pub fn select_local(
        &self,
        model: &str,
        hashes: &[SequenceHash],
        prompt_tokens: u32,
    ) -> Option<Decision> {
        let now = self.now();
        let mut inner = self.lock();
        let candidates: Vec<WorkerId> = inner
            .local
            .iter()
            .filter(|(_, w)| w.ready && w.model == model && decodes(w.role))
            .map(|(id, _)| *id)
            .collect();
        if candidates.is_empty() {
            return None;
        }
        inner.next_request = inner.next_request.wrapping_add(1);
        let id = RequestId(inner.next_request);
        let request = RouteRequest::new(id, hashes, prompt_tokens).with_candidates(&candidates);
        inner.router.select(&request, now).ok()
    }

    /// A request chosen by [`FleetRouter::plan`], [`FleetRouter::select`] or
    /// [`FleetRouter::select_local`] ended: its load stops counting. Call it for each pick of
    /// a plan (decode and prefill).
    pub fn finished(&self, request: RequestId) {
        let now = self.now();
        self.lock().router.finished(request, now);
    }

    /// The prefill part of a pick is over (the decode worker received the prompt's KV blocks,
    /// or its first token came back), in case its KV events have not said so yet: its queued
    /// prefill tokens stop counting. Returns whether the request was in flight.
    pub fn prefill_done(&self, request: RequestId) -> bool {
        let now = self.now();
        self.lock().router.prefill_done(request, now)
    }

    /// Every worker in the router (local and remote).
    pub fn workers(&self) -> Vec<WorkerId> {
        self.lock().router.workers().collect()
    }

    /// Blocks the index holds for `worker`, summed over tiers (`None`: unknown worker).
    pub fn worker_blocks(&self, worker: WorkerId) -> Option<u64> {
        self.lock()
            .router
            .worker_blocks(worker)
            .map(|tiers| tiers.iter().sum())
    }

    /// The follower's counters so far.
    pub fn follower_counters(&self) -> FollowerCounters {
        self.lock().follower
    }

    /// The mode in force (`approximate` while the control plane is away).
    pub fn mode(&self) -> RoutingMode {
        self.lock().router.config().mode
    }

    /// Registers the router's figures (read under its lock at every scrape).
    pub fn register_metrics(self: &Arc<Self>, registry: &mut crate::metrics::Registry) {
        let fleet = Arc::downgrade(self);
        registry.register_collector(crate::metrics::collector("fleet", move |s| {
            match fleet.upgrade() {
                Some(fleet) => fleet.write_metrics(s),
                None => Ok(()),
            }
        }));
    }

    fn write_metrics(&self, s: &mut crate::metrics::Scrape<'_>) -> std::fmt::Result {
        let (local, forwarded, fallbacks) = self.pick_counts();
        let inner = self.lock();
        let router = &inner.router;
        let worker = |w: WorkerId| [("worker", w.to_string())];
        s.gauge(
            "kvfleet_fleet_router_workers",
            "Workers in the fleet router (all nodes)",
            router.workers().len() as u64,
        )?;
        s.gauge(
            "kvfleet_fleet_router_blocks",
            "Distinct KV blocks in the fleet index",
            router.index_stats().blocks,
        )?;
        s.gauges(
            "kvfleet_fleet_router_worker_blocks",
            "KV blocks the fleet index holds for each worker, summed over tiers",
            router.workers().filter_map(|w| {
                let blocks = router.worker_blocks(w)?.iter().sum::<u64>();
                Some((worker(w), blocks))
            }),
        )?;
        s.gauge(
            "kvfleet_fleet_router_fallen_back",
            "1 while the control plane is away and the router predicts on its own",
            u64::from(inner.fallen_back),
        )?;
        s.gauge(
            "kvfleet_fleet_router_stream_position",
            "Sequence number of the last KV stream item the router applied",
            inner.position.unwrap_or(0),
        )?;
        s.counters(
            "kvfleet_fleet_route",
            "Fleet router picks: served here, forwarded to a peer, forwards that failed and \
             were retried here",
            [
                ([("target", "local")], local),
                ([("target", "remote")], forwarded),
                ([("target", "fallback_local")], fallbacks),
            ],
        )?;
        s.counters(
            "kvfleet_fleet_prefill_decisions",
            "How disaggregated models' requests were prefilled: on a prefill worker, or by the \
             decode worker because the uncached prompt was short, the prefill worker's queue \
             was full or none was ready",
            PrefillDecision::ALL.map(|d| {
                (
                    [("decision", d.as_str())],
                    inner.prefill_decisions[d.index()],
                )
            }),
        )?;
        s.counters(
            "kvfleet_fleet_route_worker",
            "Fleet router picks by worker",
            inner.picked.iter().map(|(w, n)| (worker(*w), *n)),
        )?;
        let f = inner.follower;
        s.counters(
            "kvfleet_fleet_router_stream",
            "The fleet router's KV stream: items applied, snapshots loaded, re-syncs asked \
             for, gaps, events refused, fallbacks to approximate routing, failed polls",
            [
                ("items", f.items),
                ("snapshots", f.snapshots),
                ("resyncs_requested", f.resyncs_requested),
                ("gaps", f.gaps),
                ("event_errors", f.event_errors),
                ("fallbacks", f.fallbacks),
                ("failures", f.failures),
            ]
            .map(|(what, n)| ([("what", what)], n)),
        )?;
        let loads: Vec<_> = router
            .workers()
            .filter_map(|w| Some((w, router.worker_load(w)?)))
            .collect();
        s.gauges(
            "kvfleet_fleet_router_worker_load",
            "A worker's load as this router weighs it: its last published report plus this \
             router's decisions since",
            loads.iter().flat_map(|(w, load)| {
                [
                    ("prefill_tokens", load.prefill_tokens),
                    ("decode_blocks", load.decode_blocks),
                    ("queue_depth", u64::from(load.queue_depth)),
                ]
                .map(|(kind, value)| {
                    (
                        [("worker", w.to_string()), ("kind", kind.to_owned())],
                        value,
                    )
                })
            }),
        )?;
        s.counters(
            "kvfleet_fleet_router_load_reports",
            "Worker load reports from the KV stream: applied, and expired (no newer report in \
             time)",
            [
                ([("what", "applied")], f.loads),
                ([("what", "expired")], f.loads_expired),
            ],
        )
    }
}

/// `host:port` → an address (a name is resolved once, here; the directory is re-read every
/// second, so a changed address is picked up).
fn resolve(text: &str) -> Option<SocketAddr> {
    if let Ok(addr) = text.parse() {
        return Some(addr);
    }
    use std::net::ToSocketAddrs as _;
    text.to_socket_addrs().ok()?.next()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv_sync::FollowerConfig;
    use crate::metrics::{Registry, encode};
    use kvfleet_proto::hash::{BlockSize, sequence_hashes};
    use kvfleet_proto::kv_stream::{KvSnapshot, KvTierBlocks, KvWorkerSnapshot};
    use kvfleet_proto::{Tier, WorkerId};

    fn status(id: u64, model: &str, state: WorkerState) -> WorkerStatus {
        WorkerStatus {
            id: WorkerId(id),
            model: model.into(),
            device: "cpu".into(),
            role: WorkerRole::Aggregated,
            state,
            outstanding: 0,
            kv_blocks_used: 0,
            kv_blocks_total: 1000,
            prefix_query_tokens: 0,
            prefix_hit_tokens: 0,
            prefill_tokens: 0,
            waiting: 0,
            starts: 1,
            pid: None,
            kv_tiers: Default::default(),
            kv_blocks_evicted_origin: 0,
            engine: "mock",
            endpoint: None,
            engine_version: None,
            last_error: None,
            engine_events: None,
        }
    }

    fn hashes(first: u32) -> Vec<SequenceHash> {
        let tokens: Vec<u32> = (first..first + 256).collect();
        let size = BlockSize::new(16).expect("16 is a valid block size");
        sequence_hashes(&tokens, size)
    }

    impl FleetRouter {
        /// This router's families alone, as `/metrics` shows them.
        fn render_metrics(self: &Arc<Self>) -> String {
            let mut registry = Registry::default();
            self.register_metrics(&mut registry);
            encode(&registry)
        }
    }

    #[test]
    fn a_snapshot_steers_local_picks_to_the_prefix_holder_of_the_model() {
        let fleet = Arc::new(FleetRouter::new(RoutingMode::Kv));
        fleet.sync_local(&[
            status(1, "a", WorkerState::Ready),
            status(2, "a", WorkerState::Ready),
            status(3, "b", WorkerState::Ready),
            status(4, "a", WorkerState::Starting),
        ]);
        let snapshot = KvSnapshot {
            seq: 7,
            workers: vec![
                KvWorkerSnapshot {
                    worker: WorkerId(2),
                    epoch: 0,
                    next_event_id: 1,
                    tiers: vec![KvTierBlocks {
                        tier: Tier::G1,
                        blocks: hashes(0),
                    }],
                },
                // A remote worker: known to the router, never a local pick.
                KvWorkerSnapshot {
                    worker: WorkerId(9),
                    epoch: 0,
                    next_event_id: 1,
                    tiers: vec![KvTierBlocks {
                        tier: Tier::G1,
                        blocks: hashes(0),
                    }],
                },
            ],
        };
        let mut follower = Follower::new(FollowerConfig::default());
        fleet.with_router(|r| follower.on_snapshot(r, &snapshot, Duration::ZERO));
        fleet.record_follower(&follower);
        assert_eq!(fleet.worker_blocks(WorkerId(9)), Some(16));
        for _ in 0..5 {
            let d = fleet
                .select_local("a", &hashes(0), 256)
                .expect("a ready worker");
            assert_eq!(d.worker, WorkerId(2));
            assert_eq!(d.overlap_blocks, 16);
            fleet.finished(d.request);
        }
        let d = fleet.select_local("b", &hashes(0), 256).expect("model b");
        assert_eq!(d.worker, WorkerId(3));
        assert!(fleet.select_local("c", &hashes(0), 256).is_none());
        let metrics = fleet.render_metrics();
        assert!(
            metrics.contains("kvfleet_fleet_router_workers 5"),
            "{metrics}"
        );
        assert!(metrics.contains("kvfleet_fleet_router_stream_position 7"));
        assert!(metrics.contains("kvfleet_fleet_router_stream_total{what=\"snapshots\"} 1"));

        // The directory names worker 9 (node n2, peer endpoint known, ready) and worker 8
        // (no peer address yet): a fleet-wide pick of the prefix goes to worker 9, remotely.
        let own = uuid::Uuid::from_u128(1);
        let n2 = uuid::Uuid::from_u128(2);
        let entry = |id: i64, node, addr: Option<&str>| kvfleet_proto::api::FleetWorker {
            worker_id: id,
            node_id: node,
            model: "a".into(),
            role: WorkerRole::Aggregated,
            observed_state: ObservedWorkerState::Ready,
            peer_addr: addr.map(str::to_owned),
        };
        fleet.set_directory(
            &FleetDirectory {
                workers: vec![
                    entry(1, own, Some("127.0.0.1:1")),
                    entry(9, n2, Some("127.0.0.1:7500")),
                    entry(8, n2, None),
                ],
                models: Vec::new(),
            },
            own,
        );
        assert_eq!(fleet.remote_workers().len(), 2, "own node skipped");
        // Worker 2 (the local holder of the prefix) left the pool: the remote holder wins.
        fleet.sync_local(&[
            status(1, "a", WorkerState::Ready),
            status(3, "b", WorkerState::Ready),
        ]);
        let (d, target) = fleet.select("a", &hashes(0), 256).expect("a pick");
        assert_eq!(d.worker, WorkerId(9));
        assert_eq!(
            target,
            Target::Remote {
                node: NodeId(n2),
                addr: "127.0.0.1:7500".parse().unwrap()
            }
        );
        fleet.finished(d.request);
        let (d, target) = fleet.select("a", &hashes(5000), 256).expect("a pick");
        assert_ne!(d.worker, WorkerId(8), "no peer address: never picked");
        if d.worker == WorkerId(1) {
            assert_eq!(target, Target::Local);
        }

        // Worker 2 leaves the pool: it leaves the router too.
        fleet.sync_local(&[status(1, "a", WorkerState::Ready)]);
        assert_eq!(fleet.worker_blocks(WorkerId(2)), None);
        let d = fleet.select_local("a", &hashes(0), 256).expect("worker 1");
        assert_eq!(d.worker, WorkerId(1));
    }

    // ----- plan: the prefill/decode decision -------------------------------------------------

    const OWN: uuid::Uuid = uuid::Uuid::from_u128(1);
    const N2: uuid::Uuid = uuid::Uuid::from_u128(2);

    fn worker(id: u64, model: &str, role: WorkerRole, state: WorkerState) -> WorkerStatus {
        WorkerStatus {
            role,
            ..status(id, model, state)
        }
    }

    fn remote(id: i64, role: WorkerRole, addr: Option<&str>) -> kvfleet_proto::api::FleetWorker {
        kvfleet_proto::api::FleetWorker {
            worker_id: id,
            node_id: N2,
            model: "a".into(),
            role,
            observed_state: ObservedWorkerState::Ready,
            peer_addr: addr.map(str::to_owned),
        }
    }

    fn policy(min: u32, max_queue: u32) -> DisaggregationPolicy {
        DisaggregationPolicy {
            min_remote_prefill_tokens: min,
            max_prefill_queue_tokens: max_queue,
            prefill_timeout_ms: 2000,
        }
    }

    /// Model "a" served `mode` under `policy`, with these remote workers.
    fn set_directory(
        fleet: &FleetRouter,
        mode: DeploymentMode,
        policy: DisaggregationPolicy,
        workers: Vec<kvfleet_proto::api::FleetWorker>,
    ) {
        fleet.set_directory(
            &FleetDirectory {
                workers,
                models: vec![FleetModel {
                    model: "a".into(),
                    migration_limit: kvfleet_proto::api::DEFAULT_MIGRATION_LIMIT,
                    mode,
                    disaggregation: policy,
                }],
            },
            OWN,
        );
    }

    /// `n` prompt tokens starting at `first` (distinct prompts for distinct `first`).
    fn prompt(first: u32, n: u32) -> Vec<u32> {
        (first..first + n).collect()
    }

    fn seq(tokens: &[u32]) -> Vec<SequenceHash> {
        sequence_hashes(tokens, BlockSize::new(16).expect("valid"))
    }

    /// `worker` reports the full blocks of `tokens` stored in its G1 tier.
    fn store(fleet: &FleetRouter, worker: u64, tokens: &[u32]) {
        let blocks = kvfleet_proto::hash::block_hashes(tokens, BlockSize::new(16).expect("valid"));
        fleet.with_router(|r| {
            let event_id = r.next_event_id(WorkerId(worker)).expect("a known worker");
            let event = kvfleet_proto::KvEvent {
                worker: WorkerId(worker),
                event_id,
                tier: Tier::G1,
                data: kvfleet_proto::kv_event::KvEventData::Stored {
                    parent: None,
                    blocks,
                },
            };
            r.apply(&event, Duration::ZERO).expect("a valid event");
        });
    }

    fn prefill_load(fleet: &FleetRouter, worker: u64) -> u64 {
        fleet.with_router(|r| {
            r.worker_load(WorkerId(worker))
                .map_or(0, |l| l.prefill_tokens)
        })
    }

    fn count(fleet: &FleetRouter, decision: PrefillDecision) -> u64 {
        fleet
            .prefill_decision_counts()
            .into_iter()
            .find(|(d, _)| *d == decision)
            .map_or(0, |(_, n)| n)
    }

    /// Local decode worker 1 and local prefill worker 2 of model "a", disaggregated.
    fn disaggregated(policy: DisaggregationPolicy) -> Arc<FleetRouter> {
        let fleet = Arc::new(FleetRouter::new(RoutingMode::Kv));
        fleet.sync_local(&[
            worker(1, "a", WorkerRole::Decode, WorkerState::Ready),
            worker(2, "a", WorkerRole::Prefill, WorkerState::Ready),
        ]);
        set_directory(&fleet, DeploymentMode::Disaggregated, policy, Vec::new());
        fleet
    }

    #[test]
    fn an_aggregated_model_plans_no_prefill_worker() {
        let fleet = Arc::new(FleetRouter::new(RoutingMode::Kv));
        fleet.sync_local(&[
            worker(1, "a", WorkerRole::Aggregated, WorkerState::Ready),
            worker(2, "a", WorkerRole::Prefill, WorkerState::Ready),
        ]);
        set_directory(
            &fleet,
            DeploymentMode::Aggregated,
            policy(0, 100_000),
            Vec::new(),
        );
        let tokens = prompt(0, 1024);
        let plan = fleet.plan("a", &seq(&tokens), 1024).expect("a plan");
        assert_eq!(plan.decode.decision.worker, WorkerId(1));
        assert!(plan.prefill.is_none());
        assert_eq!(plan.policy, None);
        assert_eq!(plan.prefill_decision, None);
        assert_eq!(prefill_load(&fleet, 2), 0, "no prefill pick made");
        assert!(fleet.prefill_decision_counts().iter().all(|(_, n)| *n == 0));
        // A model the directory does not name is served aggregated too.
        fleet.sync_local(&[worker(3, "b", WorkerRole::Decode, WorkerState::Ready)]);
        let plan = fleet.plan("b", &seq(&tokens), 1024).expect("a plan");
        assert!(plan.prefill.is_none() && plan.policy.is_none());
        assert_eq!(fleet.model_serving("b"), None);
        assert_eq!(
            fleet.model_serving("a").map(|m| m.mode),
            Some(DeploymentMode::Aggregated)
        );
    }

    #[test]
    fn prefill_decisions_table() {
        // (what, policy, prompt tokens, tokens the decode worker caches, expected decision)
        let rows = [
            (
                "short prompt",
                policy(256, 16384),
                128,
                0,
                PrefillDecision::LocalShort,
            ),
            (
                "at the threshold",
                policy(256, 16384),
                256,
                0,
                PrefillDecision::Remote,
            ),
            (
                "long prompt",
                policy(256, 16384),
                1024,
                0,
                PrefillDecision::Remote,
            ),
            (
                "long, but the decode worker caches most of it",
                policy(256, 16384),
                1024,
                800,
                PrefillDecision::LocalShort,
            ),
            (
                "long, the decode worker caches a little",
                policy(256, 16384),
                1024,
                512,
                PrefillDecision::Remote,
            ),
            (
                "0: always remote",
                policy(0, 16384),
                16,
                0,
                PrefillDecision::Remote,
            ),
            (
                "queue too small",
                policy(0, 1000),
                1024,
                0,
                PrefillDecision::LocalQueueFull,
            ),
            (
                "queue just fits",
                policy(0, 1024),
                1024,
                0,
                PrefillDecision::Remote,
            ),
        ];
        for (what, policy, tokens, cached, expected) in rows {
            let fleet = disaggregated(policy);
            let tokens = prompt(0, tokens);
            store(&fleet, 1, &tokens[..cached]);
            let plan = fleet
                .plan("a", &seq(&tokens), tokens.len() as u32)
                .expect("a plan");
            assert_eq!(plan.decode.decision.worker, WorkerId(1), "{what}");
            assert_eq!(plan.decode.target, Target::Local, "{what}");
            assert_eq!(plan.policy, Some(policy), "{what}");
            assert_eq!(plan.prefill_decision, Some(expected), "{what}");
            assert_eq!(count(&fleet, expected), 1, "{what}");
            match &plan.prefill {
                Some(p) => {
                    assert_eq!(expected, PrefillDecision::Remote, "{what}");
                    assert_eq!(p.decision.worker, WorkerId(2), "{what}");
                    assert_eq!(p.target, Target::Local, "{what}");
                    assert_ne!(p.decision.request, plan.decode.decision.request, "{what}");
                    assert_eq!(prefill_load(&fleet, 2), tokens.len() as u64, "{what}");
                    fleet.finished(p.decision.request);
                }
                None => assert_ne!(expected, PrefillDecision::Remote, "{what}"),
            }
            // Nothing left counted on the prefill worker once the plan's picks are finished.
            fleet.finished(plan.decode.decision.request);
            assert_eq!(prefill_load(&fleet, 2), 0, "{what}");
            assert_eq!(prefill_load(&fleet, 1), 0, "{what}");
        }
    }

    #[test]
    fn a_full_prefill_queue_keeps_prefill_local_and_releases_the_prefill_pick() {
        let fleet = disaggregated(policy(0, 1500));
        let first = prompt(0, 1024);
        let plan = fleet.plan("a", &seq(&first), 1024).expect("a plan");
        let held = plan
            .prefill
            .expect("remote prefill while the queue is empty");
        assert_eq!(prefill_load(&fleet, 2), 1024);
        // The second prompt would take the prefill queue to 2048 > 1500: local, and the
        // prefill worker's load is what it was (its pick was released at once).
        let second = prompt(5000, 1024);
        let plan = fleet.plan("a", &seq(&second), 1024).expect("a plan");
        assert!(plan.prefill.is_none());
        assert_eq!(plan.prefill_decision, Some(PrefillDecision::LocalQueueFull));
        assert_eq!(prefill_load(&fleet, 2), 1024);
        assert_eq!(count(&fleet, PrefillDecision::LocalQueueFull), 1);
        // The decode worker prefills the second prompt itself: it counts there.
        assert!(prefill_load(&fleet, 1) >= 1024);
        // A published load counts as well: the queue stays full after the first pick ends.
        fleet.finished(held.decision.request);
        assert_eq!(prefill_load(&fleet, 2), 0);
        fleet.with_router(|r| {
            let load = kvfleet_kv_router::WorkerLoad {
                prefill_tokens: 1000,
                decode_blocks: 0,
                queue_depth: 0,
            };
            r.apply_load(WorkerId(2), load, Duration::ZERO)
                .expect("a known worker")
        });
        let plan = fleet
            .plan("a", &seq(&prompt(9000, 1024)), 1024)
            .expect("a plan");
        assert_eq!(plan.prefill_decision, Some(PrefillDecision::LocalQueueFull));
        assert_eq!(
            prefill_load(&fleet, 2),
            1000,
            "the released pick left no load"
        );
        // Once the worker reports its queue drained, prefill goes remote again.
        fleet.with_router(|r| {
            r.apply_load(WorkerId(2), Default::default(), Duration::ZERO)
                .expect("a known worker")
        });
        let plan = fleet
            .plan("a", &seq(&prompt(9000, 1024)), 1024)
            .expect("a plan");
        assert_eq!(plan.prefill_decision, Some(PrefillDecision::Remote));
        let metrics = fleet.render_metrics();
        for line in [
            "kvfleet_fleet_prefill_decisions_total{decision=\"remote\"} 2",
            "kvfleet_fleet_prefill_decisions_total{decision=\"local_short\"} 0",
            "kvfleet_fleet_prefill_decisions_total{decision=\"local_queue_full\"} 2",
            "kvfleet_fleet_prefill_decisions_total{decision=\"local_no_prefill_worker\"} 0",
            "# TYPE kvfleet_fleet_prefill_decisions_total counter",
        ] {
            assert!(metrics.contains(line), "{line} in\n{metrics}");
        }
        // Released picks are not counted as picks of the prefill worker.
        assert!(
            metrics.contains("kvfleet_fleet_route_worker_total{worker=\"w2\"} 2"),
            "{metrics}"
        );
    }

    #[test]
    fn a_full_prefill_worker_picked_for_its_prefix_is_released() {
        // Prefill worker 2 caches 768 of the prompt's 1024 tokens and has 64 tokens queued;
        // worker 3 caches nothing and is idle. The router prefers 2 (16 blocks to prefill plus
        // 4 queued, against 64), but 64 + 1024 uncached on the decode worker > 1050.
        let fleet = Arc::new(FleetRouter::new(RoutingMode::Kv));
        fleet.sync_local(&[
            worker(1, "a", WorkerRole::Decode, WorkerState::Ready),
            worker(2, "a", WorkerRole::Prefill, WorkerState::Ready),
            worker(3, "a", WorkerRole::Prefill, WorkerState::Ready),
        ]);
        set_directory(
            &fleet,
            DeploymentMode::Disaggregated,
            policy(0, 1050),
            Vec::new(),
        );
        let tokens = prompt(0, 1024);
        store(&fleet, 2, &tokens[..768]);
        fleet.with_router(|r| {
            let load = kvfleet_kv_router::WorkerLoad {
                prefill_tokens: 64,
                decode_blocks: 0,
                queue_depth: 0,
            };
            r.apply_load(WorkerId(2), load, Duration::ZERO)
                .expect("a known worker")
        });
        let plan = fleet.plan("a", &seq(&tokens), 1024).expect("a plan");
        assert_eq!(plan.prefill_decision, Some(PrefillDecision::LocalQueueFull));
        assert!(plan.prefill.is_none());
        assert_eq!((prefill_load(&fleet, 2), prefill_load(&fleet, 3)), (64, 0));
        let metrics = fleet.render_metrics();
        assert!(
            !metrics.contains("kvfleet_fleet_route_worker_total{worker=\"w2\"}")
                || metrics.contains("kvfleet_fleet_route_worker_total{worker=\"w2\"} 0"),
            "{metrics}"
        );
        // With room on worker 2 the same prompt goes there.
        fleet.with_router(|r| {
            r.apply_load(WorkerId(2), Default::default(), Duration::ZERO)
                .expect("a known worker")
        });
        let plan = fleet.plan("a", &seq(&tokens), 1024).expect("a plan");
        let prefill = plan.prefill.expect("remote prefill");
        assert_eq!(prefill.decision.worker, WorkerId(2));
    }

    #[test]
    fn no_reachable_ready_prefill_worker_means_local_prefill() {
        let fleet = Arc::new(FleetRouter::new(RoutingMode::Kv));
        fleet.sync_local(&[
            worker(1, "a", WorkerRole::Decode, WorkerState::Ready),
            worker(2, "a", WorkerRole::Prefill, WorkerState::Starting),
            worker(3, "b", WorkerRole::Prefill, WorkerState::Ready),
        ]);
        // A remote prefill worker with no peer address cannot be reached.
        set_directory(
            &fleet,
            DeploymentMode::Disaggregated,
            policy(0, 16384),
            vec![remote(9, WorkerRole::Prefill, None)],
        );
        let plan = fleet
            .plan("a", &seq(&prompt(0, 1024)), 1024)
            .expect("a plan");
        assert!(plan.prefill.is_none());
        assert_eq!(
            plan.prefill_decision,
            Some(PrefillDecision::LocalNoPrefillWorker)
        );
        assert_eq!(count(&fleet, PrefillDecision::LocalNoPrefillWorker), 1);
        // Once it has one, it is used, remotely.
        set_directory(
            &fleet,
            DeploymentMode::Disaggregated,
            policy(0, 16384),
            vec![remote(9, WorkerRole::Prefill, Some("127.0.0.1:7500"))],
        );
        let plan = fleet
            .plan("a", &seq(&prompt(0, 1024)), 1024)
            .expect("a plan");
        let prefill = plan.prefill.expect("the remote prefill worker");
        assert_eq!(prefill.decision.worker, WorkerId(9));
        assert_eq!(
            prefill.target,
            Target::Remote {
                node: NodeId(N2),
                addr: "127.0.0.1:7500".parse().expect("an address")
            }
        );
    }

    #[test]
    fn a_prefill_worker_is_never_a_decode_pick() {
        let fleet = Arc::new(FleetRouter::new(RoutingMode::Kv));
        fleet.sync_local(&[worker(2, "a", WorkerRole::Prefill, WorkerState::Ready)]);
        set_directory(
            &fleet,
            DeploymentMode::Disaggregated,
            policy(0, 16384),
            vec![remote(9, WorkerRole::Prefill, Some("127.0.0.1:7500"))],
        );
        let tokens = prompt(0, 512);
        store(&fleet, 2, &tokens);
        // Only prefill workers: nothing can decode.
        assert!(fleet.plan("a", &seq(&tokens), 512).is_none());
        assert!(fleet.select("a", &seq(&tokens), 512).is_none());
        assert!(fleet.select_local("a", &seq(&tokens), 512).is_none());
        // With a decode worker holding nothing, it decodes although prefill worker 2 holds the
        // whole prompt; `select` makes no prefill pick.
        fleet.sync_local(&[
            worker(2, "a", WorkerRole::Prefill, WorkerState::Ready),
            worker(1, "a", WorkerRole::Decode, WorkerState::Ready),
        ]);
        for _ in 0..4 {
            let (d, target) = fleet.select("a", &seq(&tokens), 512).expect("worker 1");
            assert_eq!((d.worker, target), (WorkerId(1), Target::Local));
            let d = fleet
                .select_local("a", &seq(&tokens), 512)
                .expect("worker 1");
            assert_eq!(d.worker, WorkerId(1));
        }
        assert_eq!(
            (prefill_load(&fleet, 2), prefill_load(&fleet, 9)),
            (0, 0),
            "select plans no prefill"
        );
        assert!(fleet.prefill_decision_counts().iter().all(|(_, n)| *n == 0));
        for _ in 0..4 {
            let plan = fleet.plan("a", &seq(&tokens), 512).expect("a plan");
            assert_eq!(plan.decode.decision.worker, WorkerId(1));
            let prefill = plan.prefill.expect("a prefill pick");
            assert_ne!(prefill.decision.worker, WorkerId(1));
        }
        assert_eq!(count(&fleet, PrefillDecision::Remote), 4);
    }

    #[test]
    fn the_prefill_worker_holding_the_prefix_wins() {
        let fleet = Arc::new(FleetRouter::new(RoutingMode::Kv));
        fleet.sync_local(&[
            worker(1, "a", WorkerRole::Decode, WorkerState::Ready),
            worker(2, "a", WorkerRole::Prefill, WorkerState::Ready),
        ]);
        set_directory(
            &fleet,
            DeploymentMode::Disaggregated,
            policy(256, 16384),
            vec![remote(9, WorkerRole::Prefill, Some("127.0.0.1:7500"))],
        );
        // Remote prefill worker 9 holds the first 768 tokens of prompt A, local prefill worker
        // 2 the first 768 of prompt B; the decode worker holds neither.
        let (a, b) = (prompt(0, 1024), prompt(7000, 1024));
        fleet.with_router(|r| {
            r.add_worker(WorkerId(9), WorkerCapacity::default())
                .expect("room for a worker")
        });
        store(&fleet, 9, &a[..768]);
        store(&fleet, 2, &b[..768]);
        for _ in 0..3 {
            let plan = fleet.plan("a", &seq(&a), 1024).expect("a plan");
            let p = plan.prefill.clone().expect("remote prefill");
            assert_eq!(p.decision.worker, WorkerId(9));
            assert_eq!(p.decision.overlap_blocks, 48);
            assert!(matches!(p.target, Target::Remote { .. }));
            // Released before their prefill: the decode worker was to import the prompt's
            // blocks, and a `kv` router counts them there until then.
            fleet.finished(p.decision.request);
            fleet.finished(plan.decode.decision.request);
            let plan = fleet.plan("a", &seq(&b), 1024).expect("a plan");
            let p = plan.prefill.clone().expect("remote prefill");
            assert_eq!((p.decision.worker, p.target), (WorkerId(2), Target::Local));
            fleet.finished(p.decision.request);
            fleet.finished(plan.decode.decision.request);
        }
        // Unrelated prompts spread over both prefill workers by load.
        let mut seen = std::collections::BTreeSet::new();
        for i in 0..4 {
            let tokens = prompt(20_000 + i * 2000, 1024);
            let plan = fleet.plan("a", &seq(&tokens), 1024).expect("a plan");
            seen.insert(plan.prefill.expect("remote prefill").decision.worker);
        }
        assert_eq!(seen.len(), 2, "{seen:?}");
    }

    #[test]
    fn prefill_done_ends_the_prefill_part_of_a_decode_pick() {
        let fleet = disaggregated(policy(0, 16384));
        let tokens = prompt(0, 1024);
        let plan = fleet.plan("a", &seq(&tokens), 1024).expect("a plan");
        assert!(plan.prefill.is_some());
        assert_eq!(prefill_load(&fleet, 1), 1024);
        assert!(fleet.prefill_done(plan.decode.decision.request));
        assert_eq!(prefill_load(&fleet, 1), 0);
        fleet.finished(plan.decode.decision.request);
        assert!(!fleet.prefill_done(plan.decode.decision.request), "ended");
    }
}
