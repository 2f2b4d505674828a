//! The heartbeat loop: every few seconds the node's worker states, request and token rates, KV
//! blocks and GPU figures, each serving worker's window (what it served since the last
//! heartbeat the control plane took: [`super::window`]), and the peer certificate's renewal
//! once two thirds of its lifetime have passed. A heartbeat that reports a newer desired
//! generation wakes the watch loop. While the node waits for an admin's approval the loop says
//! so once a minute; once a heartbeat says `approved` it fetches the node's first certificate.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use kvfleet_proto::WorkerId;
use kvfleet_proto::api::{
    GpuStatus, Heartbeat, NodeApproval, ObservedWorker, ObservedWorkerState, RenewRequest,
    WorkerMetrics, WorkerWindow,
};

use super::http::CpError;
use super::window::{Sample, Windows};
use super::{Client, log_failure, reconcile, timing};
use crate::backend::{Backend as _, WorkerState};
use crate::state_dir::Identity;

/// How often a pending node says again that it waits for an admin's approval.
const APPROVAL_LOG_EVERY: Duration = Duration::from_secs(60);

/// Cumulative (requests, tokens) per worker.
type Totals = BTreeMap<WorkerId, (u64, u64)>;

impl Client {
    /// Heartbeats until the credential is refused (the returned error).
    pub(super) async fn heartbeat_loop(&self, identity: &Identity) -> CpError {
        let mut interval = self
            .config
            .heartbeat_interval
            .unwrap_or(Duration::from_secs(5));
        let mut rates = Rates::default();
        let mut failures = 0u32;
        let mut windows = Windows::new(tokio::time::Instant::now());
        // When the waiting-for-approval line was last logged: once a minute while pending.
        let mut waiting_logged: Option<tokio::time::Instant> = None;
        loop {
            self.prune_models();
            // Sampled before drained workers stop, so their last window goes with their stop.
            let samples = self.window_samples();
            self.retire_drained();
            let draft = windows.draft(tokio::time::Instant::now(), &samples);
            let beat = self.heartbeat(&mut rates, &draft.windows);
            let reported_stops: Vec<WorkerId> = self
                .book
                .lock()
                .map(|b| b.stopped.iter().copied().collect())
                .unwrap_or_default();
            let delay = match self.api.heartbeat(&identity.credential, &beat).await {
                Ok(response) => {
                    failures = 0;
                    windows.acknowledge(draft);
                    self.handle.update(|s| s.connected = true);
                    if let Ok(mut book) = self.book.lock() {
                        for id in &reported_stops {
                            book.stopped.remove(id);
                        }
                    }
                    // Revocation bites here: every heartbeat carries the fleet's revoked
                    // serials, and the endpoint closes what it holds from them.
                    if let Some(endpoint) = self.node.peer.endpoint() {
                        endpoint.set_revoked_serials(response.revoked_serials.iter().cloned());
                    }
                    // And what a revoked node already supplied to the workers goes too.
                    self.node
                        .pool
                        .evict_revoked(response.revoked_serials.iter().map(String::as_str));
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
                    self.handle.update(|s| s.approval = Some(response.approval));
                    match response.approval {
                        NodeApproval::Pending => {
                            let now = tokio::time::Instant::now();
                            if waiting_logged
                                .is_none_or(|at| now.duration_since(at) >= APPROVAL_LOG_EVERY)
                            {
                                if waiting_logged.is_some() {
                                    super::log_waiting_for_approval(identity.node_id);
                                }
                                waiting_logged = Some(now);
                            }
                        }
                        NodeApproval::Approved => {
                            if self
                                .needs_certificate
                                .load(std::sync::atomic::Ordering::Relaxed)
                            {
                                self.first_certificate(identity).await;
                            } else {
                                self.renew_if_due(identity).await;
                            }
                        }
                        // A rejected node's credential is revoked: the next call gets 401.
                        NodeApproval::Rejected => {}
                    }
                    interval
                }
                Err(e @ CpError::Unauthorized(_)) => return e,
                Err(e) => {
                    if !e.is_transient() {
                        // Refused as it is: sending the same windows again would be refused
                        // again. They are dropped; a transient failure keeps them for the next.
                        tracing::warn!(error = %e, "heartbeat refused: its windows are dropped");
                        windows.acknowledge(draft);
                    }
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

    /// The node was approved after it registered: ask for its peer certificate (the peer
    /// endpoint waits for it in the state directory). A failure is retried with the next
    /// heartbeat.
    async fn first_certificate(&self, identity: &Identity) {
        let request = RenewRequest {
            public_key: Some(self.public_key()),
        };
        match self.api.renew(&identity.credential, &request).await {
            Ok(issued) => match self.state.save_certificate(&issued) {
                Ok(()) => {
                    self.needs_certificate
                        .store(false, std::sync::atomic::Ordering::Relaxed);
                    tracing::info!(node = %identity.node_id, serial = %issued.serial,
                        not_after = %issued.not_after,
                        "approved by an admin: got the peer certificate");
                }
                Err(e) => tracing::error!(error = %e, "cannot store the peer certificate"),
            },
            Err(e) => tracing::warn!(error = %e,
                "approved, but getting the peer certificate failed; retrying with the next heartbeat"),
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

    /// Every worker's window sample, from its last status report.
    fn window_samples(&self) -> Vec<Sample> {
        self.node
            .pool
            .reports()
            .iter()
            .map(|(id, incarnation, serving, status)| {
                Sample::of(*id, *incarnation, *serving, status)
            })
            .collect()
    }

    /// The heartbeat body now, with `windows` (per worker, from [`Windows::draft`]).
    fn heartbeat(
        &self,
        rates: &mut Rates,
        windows: &BTreeMap<WorkerId, WorkerWindow>,
    ) -> Heartbeat {
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
                    engine: w.engine_version.clone(),
                    error: match w.state {
                        WorkerState::Ready | WorkerState::Draining | WorkerState::Stopped => None,
                        WorkerState::Starting | WorkerState::Failed => w.last_error.clone(),
                    },
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
                    window: windows.get(&w.id).cloned(),
                }
            })
            .collect();
        let running: BTreeSet<WorkerId> = statuses.iter().map(|w| w.id).collect();
        if let Ok(book) = self.book.lock() {
            for (id, unrunnable) in book
                .unrunnable
                .iter()
                .filter(|(id, _)| !running.contains(id))
            {
                workers.push(ObservedWorker {
                    worker_id: id.0 as i64,
                    state: ObservedWorkerState::Failed,
                    engine: None,
                    error: Some(unrunnable.clone()),
                    metrics: None,
                    window: None,
                });
            }
            for id in book.stopped.iter().filter(|id| !running.contains(id)) {
                workers.push(ObservedWorker {
                    worker_id: id.0 as i64,
                    state: ObservedWorkerState::Stopped,
                    engine: None,
                    error: None,
                    metrics: None,
                    // A retired worker's last window (sampled before it stopped).
                    window: windows.get(id).cloned(),
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

fn observed_state(state: WorkerState) -> ObservedWorkerState {
    match state {
        WorkerState::Starting => ObservedWorkerState::Starting,
        WorkerState::Ready => ObservedWorkerState::Ready,
        WorkerState::Draining => ObservedWorkerState::Draining,
        WorkerState::Stopped => ObservedWorkerState::Stopped,
        WorkerState::Failed => ObservedWorkerState::Failed,
    }
}

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
