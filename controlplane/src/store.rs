//! The Postgres store. The schema lives in `migrations/` at the workspace root and is embedded
//! into the binary, so a control plane always knows exactly which schema it was built for.
//!
//! This module owns connecting, migrating (and refusing a database whose schema is newer than
//! this build), and the few helpers every writer shares: the audit row and the desired-state
//! generation bump. Queries that belong to one resource live beside its API handlers.

use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use serde_json::Value;
use sqlx::migrate::{MigrateError, Migrator};
use sqlx::postgres::PgPoolOptions;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::telemetry::{Registry, collector};

/// Every migration this build knows, in order.
pub static MIGRATOR: Migrator = sqlx::migrate!("../migrations");

/// The channel on which desired-state generation bumps are announced (payload: node id).
pub const DESIRED_STATE_CHANNEL: &str = "kvfleet_desired_state";

/// Why the store could not be brought up.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "the database schema is newer than this control plane: it has migration {found} but this \
         build knows migrations up to {known}. Run the newer kvfleet-controlplane (or restore a \
         backup taken before the upgrade); refusing to start rather than corrupt newer data"
    )]
    SchemaTooNew { found: i64, known: i64 },
    #[error("applying migrations: {0}")]
    Migrate(#[from] MigrateError),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// Opens a pool with the configured limits.
pub async fn connect(config: &crate::config::DatabaseConfig) -> Result<PgPool, sqlx::Error> {
    PgPoolOptions::new()
        .max_connections(config.max_connections)
        .acquire_timeout(config.connect_timeout)
        .connect(&config.url)
        .await
}

/// The newest migration version this build carries.
pub fn known_version() -> i64 {
    MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0)
}

/// Brings the database up to this build's schema. sqlx takes a Postgres advisory lock while it
/// migrates, so replicas starting together apply each migration once. A database that already
/// has a migration this build does not know is refused with [`StoreError::SchemaTooNew`].
pub async fn migrate(pool: &PgPool) -> Result<(), StoreError> {
    check_not_newer(pool).await?;
    MIGRATOR.run(pool).await?;
    Ok(())
}

/// Fails when the database has applied a migration newer than this build knows.
pub async fn check_not_newer(pool: &PgPool) -> Result<(), StoreError> {
    let table: Option<String> =
        sqlx::query_scalar("SELECT to_regclass('public._sqlx_migrations')::text")
            .fetch_one(pool)
            .await?;
    if table.is_none() {
        return Ok(());
    }
    let found: Option<i64> =
        sqlx::query_scalar("SELECT max(version) FROM _sqlx_migrations WHERE success")
            .fetch_one(pool)
            .await?;
    let known = known_version();
    match found {
        Some(found) if found > known => Err(StoreError::SchemaTooNew { found, known }),
        _ => Ok(()),
    }
}

/// One audit row; callers pass the transaction that makes the change, so the change and its
/// record commit together or not at all.
#[derive(Debug, Clone)]
pub struct AuditEntry<'a> {
    pub actor_token: Option<Uuid>,
    pub actor: &'a str,
    pub action: &'a str,
    pub target_type: &'a str,
    pub target_id: Option<String>,
    pub before: Option<Value>,
    pub after: Option<Value>,
    /// The request's `x-request-id`, to find the change in the logs (none for background loops).
    pub request_id: Option<String>,
}

/// Writes `entry` inside the caller's transaction.
pub async fn audit(conn: &mut PgConnection, entry: AuditEntry<'_>) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO audit_log (actor_token, actor, action, target_type, target_id, before, after,
             request_id)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(entry.actor_token)
    .bind(entry.actor)
    .bind(entry.action)
    .bind(entry.target_type)
    .bind(entry.target_id)
    .bind(entry.before)
    .bind(entry.after)
    .bind(entry.request_id)
    .execute(conn)
    .await?;
    Ok(())
}

/// Bumps a node's desired-state generation and announces it (delivered on commit).
pub async fn bump_generation(conn: &mut PgConnection, node: Uuid) -> Result<i64, sqlx::Error> {
    let generation: i64 = sqlx::query_scalar(
        "UPDATE nodes SET desired_generation = desired_generation + 1, updated_at = now()
         WHERE id = $1 RETURNING desired_generation",
    )
    .bind(node)
    .fetch_one(&mut *conn)
    .await?;
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(DESIRED_STATE_CHANNEL)
        .bind(node.to_string())
        .execute(conn)
        .await?;
    Ok(generation)
}

/// Registers the connection gauges of one of the replica's other pools
/// (`kvfleet_cp_db_<name>_pool_connections{state}` and `..._max_connections`).
pub fn register_pool_metrics(registry: &mut Registry, name: &'static str, pool: &PgPool) {
    let pool = pool.clone();
    let connections = format!("kvfleet_cp_db_{name}_pool_connections");
    let max = format!("kvfleet_cp_db_{name}_pool_max_connections");
    registry.register_collector(collector("db_pool", move |s| {
        let size = pool.size();
        let idle = u32::try_from(pool.num_idle()).unwrap_or(u32::MAX);
        s.gauges(
            &connections,
            "Connections of this replica's agent (or leader) Postgres pool, in use and idle",
            [
                ([("state", "in_use")], size.saturating_sub(idle)),
                ([("state", "idle")], idle),
            ],
        )?;
        s.gauge(
            &max,
            "The most connections this pool opens (database.agent_max_connections or \
             database.leader_max_connections)",
            pool.options().get_max_connections(),
        )
    }));
}

/// The leader epoch a replica was elected with: what its loops' writes are fenced by (here,
/// not in `leader`, because the planner's round is fenced too and `leader` imports `planner`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fence {
    pub epoch: i64,
}

/// Why a fenced write of the leader's loops did not happen.
#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error(
        "refused: this replica led with epoch {held}, but another replica has taken over \
         (epoch {current})"
    )]
    Deposed { held: i64, current: i64 },
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

impl Fence {
    /// Checks, inside the write's transaction, that the epoch is still this one. The row lock
    /// (`FOR SHARE`) holds off a new leader's epoch bump until the transaction ends.
    pub async fn check(&self, conn: &mut PgConnection) -> Result<(), LeaderError> {
        let current: i64 = sqlx::query_scalar("SELECT epoch FROM leader_epoch WHERE id FOR SHARE")
            .fetch_one(&mut *conn)
            .await?;
        if current == self.epoch {
            Ok(())
        } else {
            Err(LeaderError::Deposed {
                held: self.epoch,
                current,
            })
        }
    }
}

/// Database errors by where they surfaced, and the pool's connections, for `/metrics`.
#[derive(Debug, Clone)]
pub struct DbMetrics {
    errors: Family<[(&'static str, &'static str); 1], Counter>,
}

impl DbMetrics {
    /// Registers `kvfleet_cp_db_errors_total{source}` and the pool's connection gauges.
    pub fn register(registry: &mut Registry, pool: &PgPool) -> Self {
        let errors = Family::default();
        registry.register(
            "kvfleet_cp_db_errors",
            "Database errors (unreachable, timed out, failed statements) by where they surfaced: \
             api (a request answered 500/503), kv_index, leader, notifications, fleet_gauges",
            errors.clone(),
        );
        // Every source appears from the start, so a rate over it is 0 rather than absent.
        for source in DB_ERROR_SOURCES {
            errors.get_or_create_owned(&[("source", source)]);
        }
        let pool = pool.clone();
        registry.register_collector(collector("db_pool", move |s| {
            let size = pool.size();
            let idle = u32::try_from(pool.num_idle()).unwrap_or(u32::MAX);
            s.gauges(
                "kvfleet_cp_db_pool_connections",
                "Connections of this replica's Postgres pool, in use and idle",
                [
                    ([("state", "in_use")], size.saturating_sub(idle)),
                    ([("state", "idle")], idle),
                ],
            )?;
            s.gauge(
                "kvfleet_cp_db_pool_max_connections",
                "The most connections this replica's pool opens (database.max_connections)",
                pool.options().get_max_connections(),
            )
        }));
        Self { errors }
    }

    /// Counts one database error seen by `source` (one of [`DB_ERROR_SOURCES`]).
    pub fn count(&self, source: &'static str) {
        self.errors.get_or_create(&[("source", source)]).inc();
    }
}

/// The `source` label values of `kvfleet_cp_db_errors_total`.
pub const DB_ERROR_SOURCES: [&str; 5] =
    ["api", "kv_index", "leader", "notifications", "fleet_gauges"];

/// Whether an error means "the database is unreachable right now" (→ 503, retry) rather than
/// a bug or bad input.
pub fn is_unavailable(error: &sqlx::Error) -> bool {
    matches!(
        error,
        sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed
    )
}

/// Sleeps `delay`, or returns early when `shutdown` fires; returns whether shutdown fired.
pub(crate) async fn sleep_or_shutdown(
    delay: Duration,
    shutdown: &mut tokio::sync::watch::Receiver<bool>,
) -> bool {
    if *shutdown.borrow() {
        return true;
    }
    tokio::select! {
        () = tokio::time::sleep(delay) => false,
        _ = shutdown.changed() => true,
    }
}
