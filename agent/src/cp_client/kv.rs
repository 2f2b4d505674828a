//! The control-plane client's KV loops: the workers' KV events and live loads uploaded (the
//! [`crate::kv_sync::Uploader`] state machine: bounded batches, one in flight, in-order retries,
//! an engine epoch per worker start), the fleet directory read every second, and the control
//! plane's KV stream followed into the fleet router.

use std::collections::BTreeMap;
use std::time::Duration;

use kvfleet_proto::WorkerId;
use kvfleet_proto::kv_stream::WorkerLoadReport;

use super::Client;
use super::http::CpError;
use crate::backend::{Backend as _, WorkerState};
use crate::state_dir::Identity;

/// How long one KV stream request waits for news at the control plane.
const KV_STREAM_WAIT: Duration = Duration::from_secs(5);

/// How often the fleet directory is read.
const DIRECTORY_INTERVAL: Duration = Duration::from_secs(1);

/// The KV event uploader and the pool subscription that feeds it.
pub(super) struct KvUpload {
    pub(super) uploader: crate::kv_sync::Uploader,
    pub(super) events: tokio::sync::broadcast::Receiver<kvfleet_proto::KvEvent>,
    /// Per worker: the process start count last seen and the epoch announced for it.
    pub(super) epochs: BTreeMap<WorkerId, (u64, u64)>,
    /// The uploader's clock starts here.
    pub(super) origin: tokio::time::Instant,
}

impl Client {
    /// Uploads the workers' KV events until the credential is refused (the returned error).
    pub(super) async fn kv_upload_loop(&self, identity: &Identity) -> CpError {
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
                        kv.uploader.events_lost();
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
                        kv.uploader.events_lost();
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
    pub(super) async fn directory_loop(&self, identity: &Identity) -> CpError {
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
    pub(super) async fn kv_follow_loop(&self, identity: &Identity) -> CpError {
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
