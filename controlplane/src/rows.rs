//! Decoding the API's resources from Postgres rows.
//!
//! The resource types live in `kvfleet_proto::api`, which knows nothing of databases, so the
//! `FromRow` glue is here: each function reads one row of the matching `*_COLUMNS` select and
//! is passed to `sqlx::query(..).try_map(..)`. Text enums are stored as their `as_str` spelling;
//! a value the binary does not know is a decode error naming the column, never a panic.

use std::str::FromStr;

use sqlx::Row as _;
use sqlx::postgres::PgRow;
use sqlx::types::Json;

use kvfleet_proto::api::{
    AuditEntry, Deployment, DisaggregationPolicy, Gpu, Model, Node, RoleWorkerBounds, SlaTargets,
    Token, Worker, WorkerBounds,
};

/// A text column parsed into one of the API's text enums.
pub(crate) fn text<T>(row: &PgRow, column: &str) -> Result<T, sqlx::Error>
where
    T: FromStr,
    T::Err: std::error::Error + Send + Sync + 'static,
{
    let raw: String = row.try_get(column)?;
    raw.parse().map_err(|e: T::Err| sqlx::Error::ColumnDecode {
        index: column.to_owned(),
        source: Box::new(e),
    })
}

/// A text value (from a tuple or scalar query) parsed into one of the API's text enums.
pub(crate) fn parse<T>(raw: &str) -> Result<T, sqlx::Error>
where
    T: FromStr,
    T::Err: std::error::Error + Send + Sync + 'static,
{
    raw.parse()
        .map_err(|e: T::Err| sqlx::Error::Decode(Box::new(e)))
}

pub(crate) fn node(row: PgRow) -> Result<Node, sqlx::Error> {
    Ok(Node {
        id: row.try_get("id")?,
        hostname: row.try_get("hostname")?,
        state: text(&row, "state")?,
        cordoned: row.try_get("cordoned")?,
        draining: row.try_get("draining")?,
        approval: text(&row, "approval")?,
        labels: row.try_get::<Json<_>, _>("labels")?.0,
        reported_labels: row.try_get::<Json<_>, _>("reported_labels")?.0,
        admin_labels: row.try_get::<Json<_>, _>("admin_labels")?.0,
        frontend_addr: row.try_get("frontend_addr")?,
        peer_addr: row.try_get("peer_addr")?,
        addresses: row.try_get::<Json<_>, _>("addresses")?.0,
        agent_version: row.try_get("agent_version")?,
        cpu_slots: row.try_get("cpu_slots")?,
        gpu_count: row.try_get("gpu_count")?,
        desired_generation: row.try_get("desired_generation")?,
        last_heartbeat_at: row.try_get("last_heartbeat_at")?,
        state_changed_at: row.try_get("state_changed_at")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

pub(crate) fn gpu(row: PgRow) -> Result<Gpu, sqlx::Error> {
    Ok(Gpu {
        id: row.try_get("id")?,
        node_id: row.try_get("node_id")?,
        device_index: row.try_get("device_index")?,
        name: row.try_get("name")?,
        memory_total_bytes: row.try_get("memory_total_bytes")?,
        memory_used_bytes: row.try_get("memory_used_bytes")?,
        utilization: row.try_get("utilization")?,
        pci_bus_id: row.try_get("pci_bus_id")?,
    })
}

pub(crate) fn model(row: PgRow) -> Result<Model, sqlx::Error> {
    Ok(Model {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        format: text(&row, "format")?,
        path: row.try_get("path")?,
        block_size: row.try_get("block_size")?,
        context_length: row.try_get("context_length")?,
        memory_bytes: row.try_get("memory_bytes")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

pub(crate) fn deployment(row: PgRow) -> Result<Deployment, sqlx::Error> {
    Ok(Deployment {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        model_id: row.try_get("model_id")?,
        model: row.try_get("model")?,
        mode: text(&row, "mode")?,
        sla: SlaTargets {
            ttft_ms: row.try_get("ttft_target_ms")?,
            itl_ms: row.try_get("itl_target_ms")?,
            percentile: Some(row.try_get("sla_percentile")?),
        },
        min_workers: row.try_get("min_workers")?,
        max_workers: row.try_get("max_workers")?,
        roles: role_bounds(&row)?,
        planner: text(&row, "planner")?,
        placement: row.try_get::<Json<_>, _>("placement")?.0,
        disaggregation: disaggregation(&row)?,
        migration_limit: migration_limit(&row)?,
        tool_parser: text(&row, "tool_parser")?,
        reasoning_parser: text(&row, "reasoning_parser")?,
        generation: row.try_get("generation")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

/// The per-role bound columns of a deployment row (a role has bounds when both are set; the
/// API writes both or neither).
fn role_bounds(row: &PgRow) -> Result<RoleWorkerBounds, sqlx::Error> {
    let pair = |min: &str, max: &str| -> Result<Option<WorkerBounds>, sqlx::Error> {
        let min: Option<i32> = row.try_get(min)?;
        let max: Option<i32> = row.try_get(max)?;
        Ok(min.zip(max).map(|(min, max)| WorkerBounds { min, max }))
    };
    Ok(RoleWorkerBounds {
        prefill: pair("min_prefill_workers", "max_prefill_workers")?,
        decode: pair("min_decode_workers", "max_decode_workers")?,
    })
}

/// A deployment row's `migration_limit` (the schema bounds it to 0..=20).
pub(crate) fn migration_limit(row: &PgRow) -> Result<u32, sqlx::Error> {
    let value: i32 = row.try_get("migration_limit")?;
    u32::try_from(value).map_err(|e| sqlx::Error::ColumnDecode {
        index: "migration_limit".to_owned(),
        source: Box::new(e),
    })
}

/// The policy columns of a deployment row (`DISAGGREGATION_COLUMNS`); the schema bounds the
/// token counts to the u32 range, a value outside it is a decode error naming the column.
pub(crate) fn disaggregation(row: &PgRow) -> Result<DisaggregationPolicy, sqlx::Error> {
    let u32_column = |column: &str| -> Result<u32, sqlx::Error> {
        let value: i64 = row.try_get(column)?;
        u32::try_from(value).map_err(|e| sqlx::Error::ColumnDecode {
            index: column.to_owned(),
            source: Box::new(e),
        })
    };
    let timeout: i32 = row.try_get("prefill_timeout_ms")?;
    Ok(DisaggregationPolicy {
        min_remote_prefill_tokens: u32_column("min_remote_prefill_tokens")?,
        max_prefill_queue_tokens: u32_column("max_prefill_queue_tokens")?,
        prefill_timeout_ms: u32::try_from(timeout).map_err(|e| sqlx::Error::ColumnDecode {
            index: "prefill_timeout_ms".to_owned(),
            source: Box::new(e),
        })?,
    })
}

pub(crate) fn worker(row: PgRow) -> Result<Worker, sqlx::Error> {
    Ok(Worker {
        id: row.try_get("id")?,
        deployment_id: row.try_get("deployment_id")?,
        node_id: row.try_get("node_id")?,
        gpu_id: row.try_get("gpu_id")?,
        role: text(&row, "role")?,
        desired_state: text(&row, "desired_state")?,
        observed_state: text(&row, "observed_state")?,
        observed_error: row.try_get("observed_error")?,
        observed_engine: row.try_get("observed_engine")?,
        observed_at: row.try_get("observed_at")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

pub(crate) fn token(row: PgRow) -> Result<Token, sqlx::Error> {
    Ok(Token {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        role: text(&row, "role")?,
        prefix: row.try_get("prefix")?,
        node_id: row.try_get("node_id")?,
        created_at: row.try_get("created_at")?,
        expires_at: row.try_get("expires_at")?,
        revoked_at: row.try_get("revoked_at")?,
        last_used_at: row.try_get("last_used_at")?,
        uses_left: row.try_get("uses_left")?,
    })
}

pub(crate) fn audit_entry(row: PgRow) -> Result<AuditEntry, sqlx::Error> {
    Ok(AuditEntry {
        id: row.try_get("id")?,
        at: row.try_get("at")?,
        actor: row.try_get("actor")?,
        actor_token: row.try_get("actor_token")?,
        action: row.try_get("action")?,
        target_type: row.try_get("target_type")?,
        target_id: row.try_get("target_id")?,
        before: row.try_get("before")?,
        after: row.try_get("after")?,
    })
}

/// The columns [`deployment`] reads (deployments joined with their model as `m`).
pub(crate) const DEPLOYMENT_COLUMNS: &str =
    "d.id, d.name, d.model_id, m.name AS model, d.mode, d.ttft_target_ms,
    d.itl_target_ms, d.sla_percentile, d.min_workers, d.max_workers, d.min_prefill_workers,
    d.max_prefill_workers, d.min_decode_workers, d.max_decode_workers, d.planner, d.placement,
    d.min_remote_prefill_tokens, d.max_prefill_queue_tokens, d.prefill_timeout_ms,
    d.migration_limit, d.tool_parser, d.reasoning_parser, d.generation, d.created_at,
    d.updated_at";

/// Every deployment with its model's name, in id order.
pub(crate) fn sql_select_deployments() -> sqlx::AssertSqlSafe<String> {
    sql!(
        "SELECT {DEPLOYMENT_COLUMNS} FROM deployments d JOIN models m ON m.id = d.model_id
         ORDER BY d.id"
    )
}
