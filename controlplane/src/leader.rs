//! Leader election and the background loops that only the leader runs.
//!
//! Every replica keeps trying `pg_try_advisory_lock` on a dedicated connection (not a pool
//! connection: a session lock belongs to the connection, and a pool would hand it to someone
//! else). The holder runs placement, liveness, metrics maintenance and the SLA planner; it checks the
//! connection every `leader.retry_interval` and stops its loops the moment the check fails.
//! When a leader process dies its connection closes and Postgres frees the lock, so a follower
//! takes over within one retry interval.
//!
//! The lock keeps itself alive only as long as both ends hear each other, bounded by
//! `leader.lease`: the leader's check must answer within the lease or it steps down, and the
//! lock connection asks Postgres for TCP keepalives and a `tcp_user_timeout` that drop a silent
//! leader's session (freeing the lock) within about the same time. So a partition stalls the
//! loops for at most a lease, not until the kernel gives up on the connection (hours).
//!
//! Fencing: taking the lock bumps the epoch in `leader_epoch` (migration 0010), and every write
//! transaction of the leader's loops (placement, liveness, planner, metrics maintenance) first
//! reads that row `FOR SHARE` and refuses to go on ([`LeaderError::Deposed`]) unless it still
//! holds the epoch it was elected with. The shared lock makes a new leader's bump wait for a write in
//! flight, so a write either commits before the takeover or is refused: a deposed leader that
//! has not noticed yet can never run the loops a second time alongside the new one. Metrics
//! maintenance (rollups, pruning, the stored responses' sweep) is fenced the same way.
//!
//! As a further guard, each placement pass runs under a transaction-scoped advisory lock, so
//! even two replicas that briefly both believe they lead never interleave placement writes.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use sqlx::{Connection as _, PgConnection, PgPool};
use tokio::sync::watch;
use uuid::Uuid;

use crate::AppState;
use crate::liveness;
use crate::placement::{self, Action, DeploymentView, GpuView, NodeView, WorkerView};
use crate::rows::parse;
use crate::store::{self, AuditEntry, sleep_or_shutdown};
use kvfleet_proto::api::{DesiredWorkerState, NodeState, PlacementConstraints, RoleCountsView};

/// Session lock held by the leader ("kvfleet" + 1).
pub const LEADER_LOCK_KEY: i64 = 0x6b76_666c_6565_7401;
/// Transaction lock around each placement pass.
pub const PLACEMENT_LOCK_KEY: i64 = 0x6b76_666c_6565_7402;
/// Transaction lock around the first-admin bootstrap.
pub const BOOTSTRAP_LOCK_KEY: i64 = 0x6b76_666c_6565_7403;

pub use crate::store::{Fence, LeaderError};

/// Asks Postgres to drop the lock connection's session once the leader has been silent for
/// about `lease` (keepalives from the server, and `tcp_user_timeout` for unacknowledged data),
/// so a partitioned leader's lock is freed within the lease. Best effort: over a Unix socket
/// these settings do nothing, and there a dead process closes the socket anyway.
async fn bound_session(conn: &mut PgConnection, lease: Duration) {
    let idle = (lease.as_secs() / 3).max(1);
    let interval = (lease.as_secs() / 6).max(1);
    let user_timeout_ms = lease.as_millis().min(i32::MAX as u128);
    for setting in [
        format!("SET tcp_keepalives_idle = {idle}"),
        format!("SET tcp_keepalives_interval = {interval}"),
        "SET tcp_keepalives_count = 2".to_owned(),
        format!("SET tcp_user_timeout = {user_timeout_ms}"),
    ] {
        if let Err(error) = sqlx::query(sqlx::AssertSqlSafe(setting))
            .execute(&mut *conn)
            .await
        {
            tracing::debug!(%error, "leader lock connection: a TCP setting was not accepted");
        }
    }
}

/// Takes the next epoch for a replica that has just taken the lock.
async fn next_epoch(conn: &mut PgConnection) -> Result<Fence, sqlx::Error> {
    let epoch: i64 = sqlx::query_scalar(
        "UPDATE leader_epoch SET epoch = epoch + 1, acquired_at = now(),
             holder = coalesce(current_setting('application_name', true), '')
         WHERE id RETURNING epoch",
    )
    .fetch_one(&mut *conn)
    .await?;
    Ok(Fence { epoch })
}

/// Whether this replica leads and how the leader's loops fare, for `/metrics`.
#[derive(Debug, Clone)]
pub struct LeaderMetrics {
    leading: Gauge,
    passes: Family<[(&'static str, &'static str); 2], Counter>,
}

/// The `loop` label values of `kvfleet_cp_leader_passes_total`.
const LOOPS: [&str; 3] = ["placement", "liveness", "metrics_maintenance"];

impl LeaderMetrics {
    /// Registers `kvfleet_cp_leader` and `kvfleet_cp_leader_passes_total{loop, outcome}`.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self {
            leading: Gauge::default(),
            passes: Family::default(),
        };
        registry.register(
            "kvfleet_cp_leader",
            "1 while this replica holds the leader lock and runs placement, liveness and \
             metrics maintenance; 0 otherwise",
            metrics.leading.clone(),
        );
        registry.register(
            "kvfleet_cp_leader_passes",
            "Passes of the leader's loops (placement, liveness, metrics_maintenance) by \
             outcome (ok, error)",
            metrics.passes.clone(),
        );
        for name in LOOPS {
            for outcome in ["ok", "error"] {
                metrics
                    .passes
                    .get_or_create_owned(&[("loop", name), ("outcome", outcome)]);
            }
        }
        metrics
    }

    /// Records whether this replica leads.
    pub fn set_leading(&self, leading: bool) {
        self.leading.set(i64::from(leading));
    }

    /// Counts one pass of `name`; a failed one also counts as a database error (every pass is
    /// database work).
    fn pass(&self, name: &'static str, ok: bool, db: &store::DbMetrics) {
        let outcome = if ok { "ok" } else { "error" };
        self.passes
            .get_or_create(&[("loop", name), ("outcome", outcome)])
            .inc();
        if !ok {
            db.count("leader");
        }
    }
}

/// Campaigns for leadership until `shutdown`; while leading, runs the background loops.
pub async fn run_elections(state: AppState, mut shutdown: watch::Receiver<bool>) {
    let retry = state.config.leader.retry_interval;
    loop {
        if *shutdown.borrow() {
            return;
        }
        // Same server and credentials as the pool, but a connection of its own.
        let options = state.pool.connect_options();
        let mut conn = match PgConnection::connect_with(&options).await {
            Ok(mut conn) => {
                bound_session(&mut conn, state.config.leader.lease).await;
                conn
            }
            Err(error) => {
                tracing::warn!(%error, "leader election: cannot connect; retrying");
                state.db.count("leader");
                if sleep_or_shutdown(retry, &mut shutdown).await {
                    return;
                }
                continue;
            }
        };
        // Follow until the lock is ours.
        let acquired = loop {
            match sqlx::query_scalar::<_, bool>("SELECT pg_try_advisory_lock($1)")
                .bind(LEADER_LOCK_KEY)
                .fetch_one(&mut conn)
                .await
            {
                Ok(true) => break true,
                Ok(false) => {
                    if sleep_or_shutdown(retry, &mut shutdown).await {
                        return;
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "leader election: lock attempt failed; reconnecting");
                    state.db.count("leader");
                    break false;
                }
            }
        };
        if !acquired {
            if sleep_or_shutdown(retry, &mut shutdown).await {
                return;
            }
            continue;
        }
        let fence = match next_epoch(&mut conn).await {
            Ok(fence) => fence,
            Err(error) => {
                tracing::warn!(%error, "leader election: cannot take the next epoch; reconnecting");
                state.db.count("leader");
                let _ = conn.close().await;
                if sleep_or_shutdown(retry, &mut shutdown).await {
                    return;
                }
                continue;
            }
        };
        tracing::info!(epoch = fence.epoch, "this replica is now the leader");
        state.set_leader(Some(fence));
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut loops = tokio::task::JoinSet::new();
        loops.spawn(placement_loop(state.clone(), fence, stop_rx.clone()));
        loops.spawn(liveness_loop(state.clone(), fence, stop_rx.clone()));
        loops.spawn(metrics_loop(state.clone(), fence, stop_rx.clone()));
        loops.spawn(planner_loop(state.clone(), fence, stop_rx));
        let lease = state.config.leader.lease;
        let shutting_down = loop {
            if sleep_or_shutdown(retry, &mut shutdown).await {
                break true;
            }
            // The lock is ours while this session lives and the epoch is still ours; a check
            // that does not answer within the lease counts as lost (a partition).
            let check = sqlx::query_scalar::<_, i64>("SELECT epoch FROM leader_epoch WHERE id")
                .fetch_one(&mut conn);
            match tokio::time::timeout(lease, check).await {
                Ok(Ok(epoch)) if epoch == fence.epoch => {}
                Ok(Ok(epoch)) => {
                    tracing::warn!(
                        held = fence.epoch,
                        epoch,
                        "another replica took the leader epoch; stepping down"
                    );
                    break false;
                }
                Ok(Err(error)) => {
                    tracing::warn!(%error, "lost the leader connection; stepping down");
                    state.db.count("leader");
                    break false;
                }
                Err(_) => {
                    tracing::warn!(
                        ?lease,
                        "the leader lock check did not answer within the lease; stepping down"
                    );
                    state.db.count("leader");
                    break false;
                }
            }
        };
        // Stop the loops first: from here their writes would be refused anyway.
        state.set_leader(None);
        let _ = stop_tx.send(true);
        while loops.join_next().await.is_some() {}
        // Closing the session releases the lock for the next leader.
        let _ = conn.close().await;
        tracing::info!("this replica stepped down");
        if shutting_down {
            return;
        }
    }
}

async fn placement_loop(state: AppState, fence: Fence, mut stop: watch::Receiver<bool>) {
    loop {
        let outcome = placement_pass(&state.leader_pool, &state.config.placement, &fence).await;
        if let Err(error) = &outcome {
            tracing::warn!(%error, "placement pass failed");
        }
        state
            .leader_metrics
            .pass("placement", outcome.is_ok(), &state.db);
        if sleep_or_shutdown(state.config.placement.interval, &mut stop).await {
            return;
        }
    }
}

async fn liveness_loop(state: AppState, fence: Fence, mut stop: watch::Receiver<bool>) {
    // Silence is only counted from when this replica started watching: after an outage of the
    // whole control plane every node's last heartbeat is old, but the nodes did nothing wrong.
    let watching_since = loop {
        match sqlx::query_scalar::<_, DateTime<Utc>>("SELECT now()")
            .fetch_one(&state.leader_pool)
            .await
        {
            Ok(now) => break now,
            Err(error) => {
                tracing::warn!(%error, "liveness: reading the database clock failed");
                state.leader_metrics.pass("liveness", false, &state.db);
            }
        }
        if sleep_or_shutdown(state.config.liveness.check_interval, &mut stop).await {
            return;
        }
    };
    loop {
        let outcome = liveness_pass(
            &state.leader_pool,
            &state.config.liveness,
            watching_since,
            &fence,
        )
        .await;
        if let Err(error) = &outcome {
            tracing::warn!(%error, "liveness pass failed");
        }
        state
            .leader_metrics
            .pass("liveness", outcome.is_ok(), &state.db);
        if sleep_or_shutdown(state.config.liveness.check_interval, &mut stop).await {
            return;
        }
    }
}

async fn metrics_loop(state: AppState, fence: Fence, mut stop: watch::Receiver<bool>) {
    loop {
        let outcome =
            crate::metrics::maintain(&state.leader_pool, &state.config.metrics, &fence).await;
        // Stored responses past their retention go with the same pass.
        match crate::api::responses::sweep(&state.leader_pool, &fence).await {
            Ok(0) => {}
            Ok(swept) => tracing::debug!(swept, "expired stored responses deleted"),
            Err(error) => tracing::warn!(%error, "sweeping expired stored responses failed"),
        }
        if let Err(error) = &outcome {
            tracing::warn!(%error, "metrics maintenance failed");
        }
        state
            .leader_metrics
            .pass("metrics_maintenance", outcome.is_ok(), &state.db);
        if sleep_or_shutdown(state.config.metrics.maintenance_interval, &mut stop).await {
            return;
        }
    }
}

/// The SLA planner: a round now, then one every `planner.interval` until `stop`; a round that
/// changed placement's targets is acted on at once rather than at the next placement tick.
async fn planner_loop(state: AppState, fence: Fence, mut stop: watch::Receiver<bool>) {
    loop {
        match crate::planner::round(&state, &fence).await {
            Ok(outcome) if outcome.applied > 0 => {
                if let Err(error) =
                    placement_pass(&state.leader_pool, &state.config.placement, &fence).await
                {
                    tracing::warn!(%error, "placement after a planner round failed");
                }
            }
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "planner round failed"),
        }
        if sleep_or_shutdown(state.config.planner.interval, &mut stop).await {
            return;
        }
    }
}

/// Applies liveness transitions; returns how many nodes changed state.
///
/// Silence is measured from the later of the node's last heartbeat and `watching_since` (when
/// the calling leader started watching, on the database clock): a control plane that was down
/// could not have received heartbeats, so its outage must not make every node lost.
pub async fn liveness_pass(
    pool: &PgPool,
    config: &crate::config::LivenessConfig,
    watching_since: DateTime<Utc>,
    fence: &Fence,
) -> Result<usize, LeaderError> {
    let rows: Vec<(Uuid, String, f64)> = sqlx::query_as(
        "SELECT id, state,
                EXTRACT(EPOCH FROM now() - greatest(coalesce(last_heartbeat_at, state_changed_at), $1))::float8
         FROM nodes WHERE state NOT IN ('removed', 'lost')",
    )
    .bind(watching_since)
    .fetch_all(pool)
    .await?;
    let mut changed = 0;
    for (node, current, silence) in rows {
        let current: NodeState = parse(&current)?;
        let silence = Duration::from_secs_f64(silence.max(0.0));
        let Some(next) = liveness::assess(current, silence, config) else {
            continue;
        };
        let threshold = liveness::threshold(next, config);
        let mut tx = pool.begin().await?;
        fence.check(&mut tx).await?;
        // Re-checked here: a heartbeat that arrived since the read wins.
        let updated = sqlx::query(
            "UPDATE nodes SET state = $3, state_changed_at = now(), updated_at = now()
             WHERE id = $1 AND state = $2
               AND now() - greatest(coalesce(last_heartbeat_at, state_changed_at), $5)
                   >= make_interval(secs => $4)",
        )
        .bind(node)
        .bind(current.as_str())
        .bind(next.as_str())
        .bind(threshold.as_secs_f64())
        .bind(watching_since)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if updated == 0 {
            continue;
        }
        if next == NodeState::Lost {
            sqlx::query(
                "UPDATE workers SET observed_state = 'lost', observed_at = now(), updated_at = now()
                 WHERE node_id = $1 AND desired_state <> 'stopped'",
            )
            .bind(node)
            .execute(&mut *tx)
            .await?;
        }
        store::audit(
            &mut tx,
            AuditEntry {
                actor_token: None,
                request_id: None,
                actor: "liveness",
                action: if next == NodeState::Lost {
                    "node.lost"
                } else {
                    "node.unhealthy"
                },
                target_type: "node",
                target_id: Some(node.to_string()),
                before: Some(serde_json::json!({ "state": current })),
                after: Some(
                    serde_json::json!({ "state": next, "silence_s": silence.as_secs_f64() }),
                ),
            },
        )
        .await?;
        tx.commit().await?;
        tracing::info!(%node, from = %current, to = %next, "node liveness changed");
        changed += 1;
    }
    Ok(changed)
}

/// One placement pass: snapshot, plan, apply, notify. Returns the actions taken.
/// Fenced: refused with [`LeaderError::Deposed`] unless `fence` is still the current epoch.
pub async fn placement_pass(
    pool: &PgPool,
    config: &crate::config::PlacementConfig,
    fence: &Fence,
) -> Result<Vec<Action>, LeaderError> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(PLACEMENT_LOCK_KEY)
        .execute(&mut *tx)
        .await?;
    fence.check(&mut tx).await?;
    let (nodes, deployments, workers) = snapshot(&mut tx).await?;
    let actions = placement::plan(&nodes, &deployments, &workers, config.replace_failed_after);
    // Lock the nodes the actions touch before their workers, in id order: a heartbeat locks
    // its node and then its workers, so taking them the other way round could deadlock.
    let nodes_to_lock: Vec<Uuid> = actions
        .iter()
        .filter_map(|a| match a {
            Action::Start { node, .. } | Action::Drain { node, .. } | Action::Stop { node, .. } => {
                Some(*node)
            }
            Action::Unplaceable { .. } => None,
        })
        .collect::<BTreeSet<Uuid>>()
        .into_iter()
        .collect();
    if !nodes_to_lock.is_empty() {
        sqlx::query("SELECT id FROM nodes WHERE id = ANY($1) ORDER BY id FOR UPDATE")
            .bind(&nodes_to_lock)
            .execute(&mut *tx)
            .await?;
    }
    let mut touched = BTreeSet::new();
    for action in &actions {
        match action {
            Action::Start {
                deployment,
                node,
                gpu,
                role,
            } => {
                let id: i64 = sqlx::query_scalar(
                    "INSERT INTO workers (deployment_id, node_id, gpu_id, role) VALUES ($1, $2, $3, $4)
                     RETURNING id",
                )
                .bind(deployment)
                .bind(node)
                .bind(gpu)
                .bind(role.as_str())
                .fetch_one(&mut *tx)
                .await?;
                placement_audit(
                    &mut tx,
                    "worker.create",
                    id,
                    None,
                    Some(serde_json::json!({
                        "deployment_id": deployment, "node_id": node, "gpu_id": gpu, "role": role,
                    })),
                )
                .await?;
                touched.insert(*node);
            }
            Action::Drain {
                worker,
                node,
                reason,
            }
            | Action::Stop {
                worker,
                node,
                reason,
            } => {
                let (to, verb) = match action {
                    Action::Drain { .. } => (DesiredWorkerState::Draining, "worker.drain"),
                    _ => (DesiredWorkerState::Stopped, "worker.stop"),
                };
                let before: Option<String> = sqlx::query_scalar(
                    "UPDATE workers w SET desired_state = $2, updated_at = now()
                     FROM (SELECT id, desired_state FROM workers WHERE id = $1 FOR UPDATE) old
                     WHERE w.id = old.id RETURNING old.desired_state",
                )
                .bind(worker)
                .bind(to.as_str())
                .fetch_optional(&mut *tx)
                .await?;
                placement_audit(
                    &mut tx,
                    verb,
                    *worker,
                    before.map(|b| serde_json::json!({ "desired_state": b })),
                    Some(serde_json::json!({ "desired_state": to, "reason": reason })),
                )
                .await?;
                touched.insert(*node);
            }
            Action::Unplaceable {
                deployment,
                role,
                missing,
            } => {
                tracing::debug!(%deployment, %role, missing, "not enough capacity to place workers");
            }
        }
    }
    for node in touched {
        store::bump_generation(&mut tx, node).await?;
    }
    tx.commit().await?;
    Ok(actions)
}

async fn placement_audit(
    tx: &mut PgConnection,
    action: &str,
    worker: i64,
    before: Option<serde_json::Value>,
    after: Option<serde_json::Value>,
) -> Result<(), sqlx::Error> {
    store::audit(
        tx,
        AuditEntry {
            actor_token: None,
            actor: "placement",
            action,
            target_type: "worker",
            target_id: Some(worker.to_string()),
            before,
            after,
            request_id: None,
        },
    )
    .await
}

type Snapshot = (Vec<NodeView>, Vec<DeploymentView>, Vec<WorkerView>);

async fn snapshot(tx: &mut PgConnection) -> Result<Snapshot, sqlx::Error> {
    type NodeRow = (
        Uuid,
        String,
        bool,
        bool,
        sqlx::types::Json<BTreeMap<String, String>>,
        i32,
    );
    let node_rows: Vec<NodeRow> = sqlx::query_as(
        // Pending nodes are not offered to placement at all: no worker lands on a machine an
        // admin has not let in. Labels: what the node reports, an admin's value on top.
        "SELECT id, state, cordoned, draining, labels || admin_labels, cpu_slots FROM nodes
         WHERE state <> 'removed' AND approval = 'approved'",
    )
    .fetch_all(&mut *tx)
    .await?;
    let gpu_rows: Vec<(Uuid, Uuid, String, i64)> = sqlx::query_as(
        "SELECT id, node_id, name, memory_total_bytes FROM gpus ORDER BY node_id, device_index",
    )
    .fetch_all(&mut *tx)
    .await?;
    let mut gpus: BTreeMap<Uuid, Vec<GpuView>> = BTreeMap::new();
    for (id, node, name, memory_total_bytes) in gpu_rows {
        gpus.entry(node).or_default().push(GpuView {
            id,
            name,
            memory_total_bytes,
        });
    }
    let nodes = node_rows
        .into_iter()
        .map(|(id, state, cordoned, draining, labels, cpu_slots)| {
            Ok(NodeView {
                id,
                state: parse(&state)?,
                cordoned,
                draining,
                labels: labels.0,
                cpu_slots,
                gpus: gpus.remove(&id).unwrap_or_default(),
            })
        })
        .collect::<Result<_, sqlx::Error>>()?;
    type DeploymentRow = (
        Uuid,
        String,
        i32,
        i32,
        Option<i64>,
        sqlx::types::Json<PlacementConstraints>,
        Option<sqlx::types::Json<RoleCountsView>>,
    );
    // The planner's targets count only in `auto` mode.
    let deployments = sqlx::query_as::<_, DeploymentRow>(
        "SELECT d.id, d.mode, d.min_workers, d.max_workers, m.memory_bytes, d.placement,
                CASE WHEN d.planner = 'auto' THEN d.planner_targets END
         FROM deployments d JOIN models m ON m.id = d.model_id",
    )
    .fetch_all(&mut *tx)
    .await?
    .into_iter()
    .map(
        |(id, mode, min_workers, max_workers, memory_bytes, constraints, targets)| {
            let mode = parse(&mode)?;
            Ok(DeploymentView {
                id,
                mode,
                min_workers,
                max_workers,
                memory_bytes,
                constraints: constraints.0,
                targets: targets.map(|t| crate::planner::role_targets_of(mode, &t.0)),
            })
        },
    )
    .collect::<Result<_, sqlx::Error>>()?;
    type WorkerRow = (i64, Uuid, Uuid, Option<Uuid>, String, String, String, f64);
    // `updated_at` is when the observed state last changed: a heartbeat that reports the same
    // state leaves it (a desired-state change moves it too, which only lengthens a grace).
    let workers = sqlx::query_as::<_, WorkerRow>(
        "SELECT id, deployment_id, node_id, gpu_id, role, desired_state, observed_state,
                GREATEST(EXTRACT(EPOCH FROM now() - updated_at), 0)::float8
         FROM workers WHERE desired_state <> 'stopped'",
    )
    .fetch_all(&mut *tx)
    .await?
    .into_iter()
    .map(
        |(id, deployment_id, node_id, gpu_id, role, desired, observed, observed_s)| {
            Ok(WorkerView {
                id,
                deployment_id,
                node_id,
                gpu_id,
                role: parse(&role)?,
                desired: parse(&desired)?,
                observed: parse(&observed)?,
                observed_for: Duration::try_from_secs_f64(observed_s).unwrap_or_default(),
            })
        },
    )
    .collect::<Result<_, sqlx::Error>>()?;
    Ok((nodes, deployments, workers))
}
