//! The fleet router: one [`Router`] holding every worker of the fleet (this node's and the
//! others'), kept current by the control plane's KV stream.
//!
//! In control-plane mode the control-plane client drives a [`crate::kv_sync::Follower`] into
//! it (snapshot, then the sequenced stream; approximate fallback while the control plane is
//! away), and registers this node's ready workers with their KV capacity. Remote workers enter
//! the router when the stream first names them (capacity unknown) and leave it when the control
//! plane removes them (their node lost or removed).
//!
//! One router serves every model: a request is restricted to the workers serving its model with
//! [`RouteRequest::with_candidates`], so equal block hashes of two models never mix.
//!
//! Not here yet: the frontend does not ask this router (it routes among local workers through
//! [`crate::backend`]), and remote workers' models and peer addresses are not known to the
//! agent, so selection is offered among local workers only ([`FleetRouter::select_local`]).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use kvfleet_kv_router::{
    Decision, RequestId, RouteRequest, Router, RouterConfig, RoutingMode, WorkerCapacity,
};
use kvfleet_proto::api::{FleetDirectory, ObservedWorkerState, WorkerRole};
use kvfleet_proto::{NodeId, SequenceHash, WorkerId};
use std::net::SocketAddr;

use crate::backend::{WorkerState, WorkerStatus};
use crate::kv_sync::{Follower, FollowerCounters};

/// A local worker as the fleet router knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct LocalWorker {
    model: String,
    ready: bool,
}

/// A worker on another node, from the control plane's fleet directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteWorker {
    /// Its node.
    pub node: NodeId,
    /// The model it serves.
    pub model: String,
    /// Whether it reported `ready`.
    pub ready: bool,
    /// The node's peer endpoint, once reported and resolvable.
    pub peer_addr: Option<SocketAddr>,
}

/// Where a fleet-wide pick runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// On this node's worker.
    Local,
    /// On another node's worker, reached through its peer endpoint.
    Remote {
        /// The node.
        node: NodeId,
        /// Its peer endpoint.
        addr: SocketAddr,
    },
}

#[derive(Debug)]
struct Inner {
    router: Router,
    local: BTreeMap<WorkerId, LocalWorker>,
    remote: BTreeMap<WorkerId, RemoteWorker>,
    /// Picks per worker, for `/metrics`.
    picked: BTreeMap<WorkerId, u64>,
    follower: FollowerCounters,
    position: Option<u64>,
    fallen_back: bool,
    next_request: u128,
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

    /// Registers this node's workers: each one gets its KV capacity, and only ready ones are
    /// offered by [`FleetRouter::select_local`]. A worker gone from the pool leaves the router.
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

    /// Replaces the remote workers with the control plane's directory (this node's own
    /// entries, `own_node`, are skipped: the pool knows them better). Remote workers enter the
    /// router if the stream has not named them yet; ones gone from the directory stop being
    /// candidates (the stream removes their blocks).
    pub fn set_directory(&self, directory: &FleetDirectory, own_node: uuid::Uuid) {
        // Names are resolved before the lock is taken: routing never waits on DNS.
        let entries: Vec<_> = directory
            .workers
            .iter()
            .filter(|w| w.node_id != own_node && w.role == WorkerRole::Aggregated)
            .filter_map(|w| {
                let id = WorkerId(u64::try_from(w.worker_id).ok()?);
                Some((id, w, w.peer_addr.as_deref().and_then(resolve)))
            })
            .collect();
        let mut inner = self.lock();
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
                    ready: w.observed_state == ObservedWorkerState::Ready,
                    peer_addr,
                },
            );
        }
    }

    /// Chooses among every ready worker of the fleet serving `model` (this node's, and other
    /// nodes' whose peer endpoint is known), by the fleet index. `None` when there is none.
    /// The decision stays counted in the worker's load until [`FleetRouter::finished`].
    pub fn select(
        &self,
        model: &str,
        hashes: &[SequenceHash],
        prompt_tokens: u32,
    ) -> Option<(Decision, Target)> {
        let now = self.now();
        let mut inner = self.lock();
        let mut candidates: Vec<WorkerId> = inner
            .local
            .iter()
            .filter(|(_, w)| w.ready && w.model == model)
            .map(|(id, _)| *id)
            .collect();
        candidates.extend(
            inner
                .remote
                .iter()
                .filter(|(_, w)| w.ready && w.model == model && w.peer_addr.is_some())
                .map(|(id, _)| *id),
        );
        if candidates.is_empty() {
            return None;
        }
        inner.next_request = inner.next_request.wrapping_add(1);
        let id = RequestId(inner.next_request);
        let request = RouteRequest::new(id, hashes, prompt_tokens).with_candidates(&candidates);
        let decision = inner.router.select(&request, now).ok()?;
        *inner.picked.entry(decision.worker).or_default() += 1;
        let target = match inner.remote.get(&decision.worker) {
            Some(RemoteWorker {
                node,
                peer_addr: Some(addr),
                ..
            }) => Target::Remote {
                node: *node,
                addr: *addr,
            },
            _ => Target::Local,
        };
        Some((decision, target))
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
            .filter(|(_, w)| w.ready && w.model == model)
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

    /// A request chosen by [`FleetRouter::select_local`] ended.
    pub fn finished(&self, request: RequestId) {
        let now = self.now();
        self.lock().router.finished(request, now);
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

    /// Prometheus text for `/metrics`.
    pub fn render_metrics(&self) -> String {
        let inner = self.lock();
        let mut out = String::new();
        let stats = inner.router.index_stats();
        let f = inner.follower;
        let _ = writeln!(
            out,
            "# HELP kvfleet_fleet_router_workers Workers in the fleet router (all nodes).\n\
             # TYPE kvfleet_fleet_router_workers gauge\n\
             kvfleet_fleet_router_workers {}",
            inner.router.workers().len()
        );
        let _ = writeln!(
            out,
            "# HELP kvfleet_fleet_router_blocks Distinct KV blocks in the fleet index.\n\
             # TYPE kvfleet_fleet_router_blocks gauge\n\
             kvfleet_fleet_router_blocks {}",
            stats.blocks
        );
        for (worker, blocks) in inner.router.workers().filter_map(|w| {
            inner
                .router
                .worker_blocks(w)
                .map(|t| (w, t.iter().sum::<u64>()))
        }) {
            let _ = writeln!(
                out,
                "kvfleet_fleet_router_worker_blocks{{worker=\"{worker}\"}} {blocks}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP kvfleet_fleet_router_fallen_back 1 while the control plane is away and the \
             router predicts on its own.\n\
             # TYPE kvfleet_fleet_router_fallen_back gauge\n\
             kvfleet_fleet_router_fallen_back {}",
            u8::from(inner.fallen_back)
        );
        let _ = writeln!(
            out,
            "# TYPE kvfleet_fleet_router_stream_position gauge\n\
             kvfleet_fleet_router_stream_position {}",
            inner.position.unwrap_or(0)
        );
        let (local, forwarded, fallbacks) = self.pick_counts();
        let _ = writeln!(
            out,
            "# HELP kvfleet_fleet_route_total Fleet router picks: served here, forwarded to a \
             peer, forwards that failed and were retried here.\n\
             # TYPE kvfleet_fleet_route_total counter\n\
             kvfleet_fleet_route_total{{target=\"local\"}} {local}\n\
             kvfleet_fleet_route_total{{target=\"remote\"}} {forwarded}\n\
             kvfleet_fleet_route_total{{target=\"fallback_local\"}} {fallbacks}"
        );
        let _ = writeln!(
            out,
            "# HELP kvfleet_fleet_route_worker_total Fleet router picks by worker.\n\
             # TYPE kvfleet_fleet_route_worker_total counter"
        );
        for (worker, n) in &inner.picked {
            let _ = writeln!(
                out,
                "kvfleet_fleet_route_worker_total{{worker=\"{worker}\"}} {n}"
            );
        }
        let _ = writeln!(out, "# TYPE kvfleet_fleet_router_stream_total counter");
        for (what, n) in [
            ("items", f.items),
            ("snapshots", f.snapshots),
            ("resyncs_requested", f.resyncs_requested),
            ("gaps", f.gaps),
            ("event_errors", f.event_errors),
            ("fallbacks", f.fallbacks),
            ("failures", f.failures),
        ] {
            let _ = writeln!(
                out,
                "kvfleet_fleet_router_stream_total{{what=\"{what}\"}} {n}"
            );
        }
        out
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
    use crate::config::Role;
    use crate::kv_sync::FollowerConfig;
    use kvfleet_proto::hash::{BlockSize, sequence_hashes};
    use kvfleet_proto::kv_stream::{KvSnapshot, KvTierBlocks, KvWorkerSnapshot};
    use kvfleet_proto::{Tier, WorkerId};

    fn status(id: u64, model: &str, state: WorkerState) -> WorkerStatus {
        WorkerStatus {
            id: WorkerId(id),
            model: model.into(),
            device: "cpu".into(),
            role: Role::Aggregated,
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
        }
    }

    fn hashes(first: u32) -> Vec<SequenceHash> {
        let tokens: Vec<u32> = (first..first + 256).collect();
        let size = BlockSize::new(16).expect("16 is a valid block size");
        sequence_hashes(&tokens, size)
    }

    #[test]
    fn a_snapshot_steers_local_picks_to_the_prefix_holder_of_the_model() {
        let fleet = FleetRouter::new(RoutingMode::Kv);
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
}
