//! Nodes, GPUs, workers and their metrics: what the fleet is and what it is doing.

use axum::Json;
use axum::extract::{Path, State};
use chrono::Utc;
use serde::Deserialize;
use sqlx::PgConnection;
use uuid::Uuid;

use super::change::Change;
use super::extract::{Admin, ApiJson, ApiQuery, Caller, Operate, Read, parse_uuid};
use super::problem::InvalidParam;
use super::problem::{ApiError, Problem};
use super::types::{
    Gpu, MetricsQuery, MetricsSeries, Node, NodeApproval, NodeLabelsChange, NodeState, Page,
    PageQuery, Worker,
};
use super::{i64_cursor, page, page_limit, uuid_cursor};
use crate::AppState;
use crate::metrics::{self, Scope};
use crate::rows;
use crate::store;

/// The columns of [`Node`], for every query that returns nodes.
pub(crate) const NODE_COLUMNS: &str =
    "n.id, n.hostname, n.state, n.cordoned, n.draining, n.approval,
    n.labels || n.admin_labels AS labels, n.labels AS reported_labels, n.admin_labels,
    n.frontend_addr, n.peer_addr, n.addresses, n.agent_version, n.cpu_slots,
    (SELECT count(*) FROM gpus g WHERE g.node_id = n.id) AS gpu_count, n.desired_generation,
    n.last_heartbeat_at, n.state_changed_at, n.created_at, n.updated_at";

const GPU_COLUMNS: &str = "id, node_id, device_index, name, memory_total_bytes, memory_used_bytes, utilization, pci_bus_id";

pub(crate) const WORKER_COLUMNS: &str = "id, deployment_id, node_id, gpu_id, role, desired_state,
    observed_state, observed_error, observed_engine, observed_at, created_at, updated_at";

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct NodeFilter {
    /// Only nodes in this state.
    pub state: Option<NodeState>,
    /// Only nodes with this approval (`pending`: the joins waiting for an admin).
    pub approval: Option<NodeApproval>,
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<u32>,
    /// The `next_cursor` of the previous page (a node, GPU, model, deployment or token id).
    #[param(format = Uuid)]
    pub cursor: Option<String>,
}

/// List nodes (viewer+).
#[utoipa::path(get, path = "/api/v1/nodes", params(NodeFilter), tag = "nodes",
    extensions(("x-kvfleet-permission" = json!("read"))),
    responses((status = 200, body = Page<Node>), (status = 401, body = Problem), (status = 403, body = Problem)))]
pub async fn list_nodes(
    _caller: Caller<Read>,
    State(state): State<AppState>,
    ApiQuery(filter): ApiQuery<NodeFilter>,
) -> Result<Json<Page<Node>>, ApiError> {
    let paging = PageQuery {
        limit: filter.limit,
        cursor: filter.cursor,
    };
    let limit = page_limit(&paging)?;
    let rows: Vec<Node> = sqlx::query(sql!(
        "SELECT {NODE_COLUMNS} FROM nodes n
         WHERE ($1::uuid IS NULL OR n.id > $1) AND ($2::text IS NULL OR n.state = $2)
             AND ($4::text IS NULL OR n.approval = $4)
         ORDER BY n.id LIMIT $3"
    ))
    .bind(uuid_cursor(&paging)?)
    .bind(filter.state.map(NodeState::as_str))
    .bind(limit + 1)
    .bind(filter.approval.map(NodeApproval::as_str))
    .try_map(rows::node)
    .fetch_all(&state.pool)
    .await?;
    Ok(Json(page(rows, limit, |n| n.id.to_string())))
}

pub(crate) async fn fetch_node(
    conn: &mut PgConnection,
    id: Uuid,
    lock: bool,
) -> Result<Node, ApiError> {
    let lock = if lock { "FOR UPDATE" } else { "" };
    sqlx::query(sql!(
        "SELECT {NODE_COLUMNS} FROM nodes n WHERE n.id = $1 {lock}"
    ))
    .bind(id)
    .try_map(rows::node)
    .fetch_optional(conn)
    .await?
    .ok_or_else(|| ApiError::not_found("node", id))
}

/// Get one node (viewer+).
#[utoipa::path(get, path = "/api/v1/nodes/{id}", params(("id" = String, Path, description = "The resource id")), tag = "nodes",
    extensions(("x-kvfleet-permission" = json!("read"))),
    responses((status = 200, body = Node), (status = 404, body = Problem)))]
pub async fn get_node(
    _caller: Caller<Read>,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Node>, ApiError> {
    let id = parse_uuid("node", &id)?;
    let mut conn = state.pool.acquire().await?;
    Ok(Json(fetch_node(&mut conn, id, false).await?))
}

/// Applies `set` (a SET clause) to a node, with its audit row, in one transaction.
async fn change_node(
    state: &AppState,
    caller: &crate::auth::Principal,
    id: &str,
    action: &str,
    set: &str,
    bump: bool,
) -> Result<Json<Node>, ApiError> {
    let id = parse_uuid("node", id)?;
    let mut change = Change::begin(state, caller).await?;
    let before = fetch_node(&mut change, id, true).await?;
    if before.state == NodeState::Removed {
        return Err(ApiError::Conflict(format!("node {id} has been removed")));
    }
    sqlx::query(sql!(
        "UPDATE nodes SET {set}, updated_at = now() WHERE id = $1"
    ))
    .bind(id)
    .execute(&mut *change)
    .await?;
    if bump {
        store::bump_generation(&mut change, id).await?;
    }
    let after = fetch_node(&mut change, id, false).await?;
    commit_node(change, action, &before, &after).await?;
    Ok(Json(after))
}

/// Commits a change of a node with its audit row (state, cordon and drain before and after).
async fn commit_node(
    change: Change<'_>,
    action: &str,
    before: &Node,
    after: &Node,
) -> Result<(), ApiError> {
    let summary = |n: &Node| serde_json::json!({ "state": n.state, "approval": n.approval, "cordoned": n.cordoned, "draining": n.draining, "admin_labels": n.admin_labels });
    change
        .commit(
            action,
            "node",
            after.id,
            Some(summary(before)),
            Some(summary(after)),
        )
        .await
}

/// Cordon: place no new workers on the node (operator+).
#[utoipa::path(post, path = "/api/v1/nodes/{id}/cordon", params(("id" = String, Path, description = "The resource id")), tag = "nodes",
    extensions(("x-kvfleet-permission" = json!("operate"))),
    responses((status = 200, body = Node), (status = 404, body = Problem), (status = 409, body = Problem)))]
pub async fn cordon_node(
    caller: Caller<Operate>,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Node>, ApiError> {
    change_node(
        &state,
        &caller.principal,
        &id,
        "node.cordon",
        "cordoned = true",
        false,
    )
    .await
}

/// Uncordon: the node takes new workers again; ends a drain (operator+).
#[utoipa::path(post, path = "/api/v1/nodes/{id}/uncordon", params(("id" = String, Path, description = "The resource id")), tag = "nodes",
    extensions(("x-kvfleet-permission" = json!("operate"))),
    responses((status = 200, body = Node), (status = 404, body = Problem), (status = 409, body = Problem)))]
pub async fn uncordon_node(
    caller: Caller<Operate>,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Node>, ApiError> {
    change_node(
        &state,
        &caller.principal,
        &id,
        "node.uncordon",
        "cordoned = false, draining = false",
        true,
    )
    .await
}

/// Drain: cordon, and move the node's workers elsewhere (operator+).
#[utoipa::path(post, path = "/api/v1/nodes/{id}/drain", params(("id" = String, Path, description = "The resource id")), tag = "nodes",
    extensions(("x-kvfleet-permission" = json!("operate"))),
    responses((status = 200, body = Node), (status = 404, body = Problem), (status = 409, body = Problem)))]
pub async fn drain_node(
    caller: Caller<Operate>,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Node>, ApiError> {
    change_node(
        &state,
        &caller.principal,
        &id,
        "node.drain",
        "cordoned = true, draining = true",
        true,
    )
    .await
}

/// What removing (or rejecting) a node does in its transaction: the node is `removed`, its
/// workers stop (and are replaced elsewhere), its agent credential and certificates are
/// revoked, and its GPUs are released (another node may claim their UUIDs).
const REMOVE_STATEMENTS: [&str; 5] = [
    "UPDATE nodes SET state = 'removed', state_changed_at = now(), cordoned = true,
         draining = false, updated_at = now() WHERE id = $1",
    "UPDATE workers SET desired_state = 'stopped',
         observed_state = CASE WHEN observed_state = 'stopped' THEN 'stopped' ELSE 'lost' END,
         updated_at = now() WHERE node_id = $1 AND desired_state <> 'stopped'",
    "UPDATE api_tokens SET revoked_at = now() WHERE node_id = $1 AND revoked_at IS NULL",
    "UPDATE node_certificates SET revoked_at = now() WHERE node_id = $1 AND revoked_at IS NULL",
    "DELETE FROM gpus WHERE node_id = $1",
];

/// Runs [`REMOVE_STATEMENTS`] for node `id` in the change's transaction and wakes its agent's
/// watch. The caller commits, then drops the node's cached credential
/// (`AuthGate::forget_node`).
async fn remove_in(conn: &mut PgConnection, id: Uuid) -> Result<(), ApiError> {
    for statement in REMOVE_STATEMENTS {
        sqlx::query(statement).bind(id).execute(&mut *conn).await?;
    }
    store::bump_generation(conn, id).await?;
    Ok(())
}

/// Remove a node: its workers stop (and are replaced elsewhere), its agent credential and
/// certificates are revoked, its GPUs forgotten (admin). Removing a removed node is a no-op.
#[utoipa::path(delete, path = "/api/v1/nodes/{id}", params(("id" = String, Path, description = "The resource id")), tag = "nodes",
    extensions(("x-kvfleet-permission" = json!("admin"))),
    responses((status = 200, body = Node), (status = 404, body = Problem)))]
pub async fn remove_node(
    caller: Caller<Admin>,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Node>, ApiError> {
    let id = parse_uuid("node", &id)?;
    let mut change = Change::begin(&state, &caller.principal).await?;
    let before = fetch_node(&mut change, id, true).await?;
    if before.state == NodeState::Removed {
        return Ok(Json(before));
    }
    remove_in(&mut change, id).await?;
    let after = fetch_node(&mut change, id, false).await?;
    commit_node(change, "node.remove", &before, &after).await?;
    // Its revoked agent credential stops working on this replica at once (others within
    // auth.cache_ttl).
    state.auth_gate.forget_node(id);
    Ok(Json(after))
}

/// Approve a pending node (admin): placement may give it workers, and its agent gets a peer
/// certificate at its next heartbeat. Approving an approved node changes nothing; a rejected or
/// removed node cannot be approved (409: it joins again with a new token).
#[utoipa::path(post, path = "/api/v1/nodes/{id}/approve", params(("id" = String, Path, description = "The resource id")), tag = "nodes",
    extensions(("x-kvfleet-permission" = json!("admin"))),
    responses((status = 200, body = Node), (status = 401, body = Problem), (status = 403, body = Problem), (status = 404, body = Problem), (status = 409, body = Problem)))]
pub async fn approve_node(
    caller: Caller<Admin>,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Node>, ApiError> {
    let id = parse_uuid("node", &id)?;
    let mut change = Change::begin(&state, &caller.principal).await?;
    let before = fetch_node(&mut change, id, true).await?;
    match (before.approval, before.state) {
        (NodeApproval::Approved, NodeState::Removed) | (NodeApproval::Rejected, _) => {
            return Err(ApiError::Conflict(format!(
                "node {id} was {}: it joins again with a new join token",
                if before.approval == NodeApproval::Rejected {
                    "rejected"
                } else {
                    "removed"
                }
            )));
        }
        (NodeApproval::Approved, _) => return Ok(Json(before)),
        (NodeApproval::Pending, _) => {}
    }
    sqlx::query("UPDATE nodes SET approval = 'approved', updated_at = now() WHERE id = $1")
        .bind(id)
        .execute(&mut *change)
        .await?;
    // Wakes the agent's desired-state watch and the leader's next placement pass.
    store::bump_generation(&mut change, id).await?;
    let after = fetch_node(&mut change, id, false).await?;
    commit_node(change, "node.approve", &before, &after).await?;
    Ok(Json(after))
}

/// Reject a pending node (admin): it is removed as `DELETE /nodes/{id}` removes a node (its
/// credential revoked, its GPUs released), so its agent cannot come back without a new join
/// token. Only pending nodes are rejected (409 otherwise: an admitted node is removed).
#[utoipa::path(post, path = "/api/v1/nodes/{id}/reject", params(("id" = String, Path, description = "The resource id")), tag = "nodes",
    extensions(("x-kvfleet-permission" = json!("admin"))),
    responses((status = 200, body = Node), (status = 401, body = Problem), (status = 403, body = Problem), (status = 404, body = Problem), (status = 409, body = Problem)))]
pub async fn reject_node(
    caller: Caller<Admin>,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Node>, ApiError> {
    let id = parse_uuid("node", &id)?;
    let mut change = Change::begin(&state, &caller.principal).await?;
    let before = fetch_node(&mut change, id, true).await?;
    match before.approval {
        NodeApproval::Rejected => return Ok(Json(before)),
        NodeApproval::Approved => {
            return Err(ApiError::Conflict(format!(
                "node {id} was approved already: remove it instead (`kvfleet nodes remove {id}`)"
            )));
        }
        NodeApproval::Pending => {}
    }
    remove_in(&mut change, id).await?;
    sqlx::query("UPDATE nodes SET approval = 'rejected' WHERE id = $1")
        .bind(id)
        .execute(&mut *change)
        .await?;
    let after = fetch_node(&mut change, id, false).await?;
    commit_node(change, "node.reject", &before, &after).await?;
    // As for a removal: its revoked credential stops working on this replica at once.
    state.auth_gate.forget_node(id);
    Ok(Json(after))
}

/// How many admin labels one node may carry.
const MAX_ADMIN_LABELS: usize = 64;

fn validate_labels(change: &NodeLabelsChange) -> Vec<InvalidParam> {
    let mut problems = Vec::new();
    for (key, value) in &change.set {
        if !kvfleet_proto::api::valid_label_key(key) {
            problems.push(InvalidParam::new(
                format!("set.{key}"),
                "a key is 1 to 63 of A-Za-z0-9._/- and starts with a letter or digit",
            ));
        }
        if value.len() > 253 {
            problems.push(InvalidParam::new(
                format!("set.{key}"),
                "a value is at most 253 bytes",
            ));
        }
        if change.remove.contains(key) {
            problems.push(InvalidParam::new(format!("remove.{key}"), "is also in set"));
        }
    }
    if change.set.len() + change.remove.len() > MAX_ADMIN_LABELS {
        problems.push(InvalidParam::new(
            "set",
            format!("at most {MAX_ADMIN_LABELS} labels at once"),
        ));
    }
    problems
}

/// Set or remove a node's admin labels (admin). They sit beside the labels its agent reports:
/// placement matches both, an admin label wins on a shared key, and no agent call changes them.
#[utoipa::path(post, path = "/api/v1/nodes/{id}/labels", params(("id" = String, Path, description = "The resource id")), request_body = NodeLabelsChange, tag = "nodes",
    extensions(("x-kvfleet-permission" = json!("admin"))),
    responses((status = 200, body = Node), (status = 401, body = Problem), (status = 403, body = Problem), (status = 404, body = Problem), (status = 409, body = Problem), (status = 422, body = Problem)))]
pub async fn label_node(
    caller: Caller<Admin>,
    State(state): State<AppState>,
    Path(id): Path<String>,
    ApiJson(request): ApiJson<NodeLabelsChange>,
) -> Result<Json<Node>, ApiError> {
    let id = parse_uuid("node", &id)?;
    let problems = validate_labels(&request);
    if !problems.is_empty() {
        return Err(ApiError::Validation(problems));
    }
    let mut change = Change::begin(&state, &caller.principal).await?;
    let before = fetch_node(&mut change, id, true).await?;
    if before.state == NodeState::Removed {
        return Err(ApiError::Conflict(format!("node {id} has been removed")));
    }
    let mut labels = before.admin_labels.clone();
    for key in &request.remove {
        labels.remove(key);
    }
    labels.extend(request.set.clone());
    if labels.len() > MAX_ADMIN_LABELS {
        return Err(ApiError::invalid(
            "set",
            format!("a node carries at most {MAX_ADMIN_LABELS} admin labels"),
        ));
    }
    sqlx::query("UPDATE nodes SET admin_labels = $2, updated_at = now() WHERE id = $1")
        .bind(id)
        .bind(sqlx::types::Json(&labels))
        .execute(&mut *change)
        .await?;
    // Labels steer placement: a deployment's constraints may now match (or stop matching).
    store::bump_generation(&mut change, id).await?;
    let after = fetch_node(&mut change, id, false).await?;
    commit_node(change, "node.labels", &before, &after).await?;
    Ok(Json(after))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct GpuFilter {
    pub node_id: Option<Uuid>,
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<u32>,
    /// The `next_cursor` of the previous page (a node, GPU, model, deployment or token id).
    #[param(format = Uuid)]
    pub cursor: Option<String>,
}

/// List GPUs (viewer+).
#[utoipa::path(get, path = "/api/v1/gpus", params(GpuFilter), tag = "gpus",
    extensions(("x-kvfleet-permission" = json!("read"))),
    responses((status = 200, body = Page<Gpu>), (status = 401, body = Problem)))]
pub async fn list_gpus(
    _caller: Caller<Read>,
    State(state): State<AppState>,
    ApiQuery(filter): ApiQuery<GpuFilter>,
) -> Result<Json<Page<Gpu>>, ApiError> {
    let paging = PageQuery {
        limit: filter.limit,
        cursor: filter.cursor,
    };
    let limit = page_limit(&paging)?;
    let rows: Vec<Gpu> = sqlx::query(sql!(
        "SELECT {GPU_COLUMNS} FROM gpus WHERE ($1::uuid IS NULL OR id > $1)
         AND ($2::uuid IS NULL OR node_id = $2) ORDER BY id LIMIT $3"
    ))
    .bind(uuid_cursor(&paging)?)
    .bind(filter.node_id)
    .bind(limit + 1)
    .try_map(rows::gpu)
    .fetch_all(&state.pool)
    .await?;
    Ok(Json(page(rows, limit, |g| g.id.to_string())))
}

/// Get one GPU (viewer+).
#[utoipa::path(get, path = "/api/v1/gpus/{id}", params(("id" = String, Path, description = "The resource id")), tag = "gpus",
    extensions(("x-kvfleet-permission" = json!("read"))),
    responses((status = 200, body = Gpu), (status = 404, body = Problem)))]
pub async fn get_gpu(
    _caller: Caller<Read>,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Gpu>, ApiError> {
    let id = parse_uuid("gpu", &id)?;
    sqlx::query(sql!("SELECT {GPU_COLUMNS} FROM gpus WHERE id = $1"))
        .bind(id)
        .try_map(rows::gpu)
        .fetch_optional(&state.pool)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::not_found("gpu", id))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct WorkerFilter {
    pub deployment_id: Option<Uuid>,
    pub node_id: Option<Uuid>,
    /// Include stopped workers (default: only live ones).
    pub include_stopped: Option<bool>,
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<u32>,
    /// The `next_cursor` of the previous page (a row id: decimal digits).
    #[param(pattern = r"^[0-9]{1,18}$")]
    pub cursor: Option<String>,
}

/// List workers (viewer+).
#[utoipa::path(get, path = "/api/v1/workers", params(WorkerFilter), tag = "workers",
    extensions(("x-kvfleet-permission" = json!("read"))),
    responses((status = 200, body = Page<Worker>), (status = 401, body = Problem)))]
pub async fn list_workers(
    _caller: Caller<Read>,
    State(state): State<AppState>,
    ApiQuery(filter): ApiQuery<WorkerFilter>,
) -> Result<Json<Page<Worker>>, ApiError> {
    let paging = PageQuery {
        limit: filter.limit,
        cursor: filter.cursor,
    };
    let limit = page_limit(&paging)?;
    let rows: Vec<Worker> = sqlx::query(sql!(
        "SELECT {WORKER_COLUMNS} FROM workers WHERE ($1::bigint IS NULL OR id > $1)
         AND ($2::uuid IS NULL OR deployment_id = $2) AND ($3::uuid IS NULL OR node_id = $3)
         AND ($4 OR desired_state <> 'stopped') ORDER BY id LIMIT $5"
    ))
    .bind(i64_cursor(&paging)?)
    .bind(filter.deployment_id)
    .bind(filter.node_id)
    .bind(filter.include_stopped.unwrap_or(false))
    .bind(limit + 1)
    .try_map(rows::worker)
    .fetch_all(&state.pool)
    .await?;
    Ok(Json(page(rows, limit, |w| w.id.to_string())))
}

fn parse_worker_id(text: &str) -> Result<i64, ApiError> {
    text.strip_prefix('w')
        .unwrap_or(text)
        .parse()
        .map_err(|_| ApiError::not_found("worker", text))
}

/// Get one worker (viewer+).
#[utoipa::path(get, path = "/api/v1/workers/{id}", params(("id" = String, Path, description = "The resource id")), tag = "workers",
    extensions(("x-kvfleet-permission" = json!("read"))),
    responses((status = 200, body = Worker), (status = 404, body = Problem)))]
pub async fn get_worker(
    _caller: Caller<Read>,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Worker>, ApiError> {
    let id = parse_worker_id(&id)?;
    sqlx::query(sql!("SELECT {WORKER_COLUMNS} FROM workers WHERE id = $1"))
        .bind(id)
        .try_map(rows::worker)
        .fetch_optional(&state.pool)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::not_found("worker", id))
}

fn window(
    query: &MetricsQuery,
) -> Result<(chrono::DateTime<Utc>, chrono::DateTime<Utc>, i64), ApiError> {
    let until = query.until.unwrap_or_else(Utc::now);
    let since = query.since.unwrap_or(until - chrono::Duration::hours(1));
    let step = query.step_s.unwrap_or(60);
    let mut problems = Vec::new();
    if since >= until {
        problems.push(super::problem::InvalidParam::new(
            "since",
            "must be before until",
        ));
    }
    if step < 1 {
        problems.push(super::problem::InvalidParam::new(
            "step_s",
            "must be at least 1",
        ));
    } else if (until - since).num_seconds() / step > 10_000 {
        problems.push(super::problem::InvalidParam::new(
            "step_s",
            "too small for the window (at most 10000 buckets)",
        ));
    }
    if problems.is_empty() {
        Ok((since, until, step))
    } else {
        Err(ApiError::Validation(problems))
    }
}

/// A worker's metrics over time (viewer+).
#[utoipa::path(get, path = "/api/v1/metrics/workers/{id}", params(("id" = String, Path, description = "The resource id"), MetricsQuery), tag = "metrics",
    extensions(("x-kvfleet-permission" = json!("read"))),
    responses((status = 200, body = MetricsSeries), (status = 404, body = Problem), (status = 422, body = Problem)))]
pub async fn worker_metrics(
    _caller: Caller<Read>,
    State(state): State<AppState>,
    Path(id): Path<String>,
    ApiQuery(query): ApiQuery<MetricsQuery>,
) -> Result<Json<MetricsSeries>, ApiError> {
    let id = parse_worker_id(&id)?;
    let (since, until, step) = window(&query)?;
    let exists: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM workers WHERE id = $1)
             OR EXISTS (SELECT 1 FROM worker_metrics_rollup WHERE worker_id = $1)",
    )
    .bind(id)
    .fetch_one(&state.pool)
    .await?;
    if !exists {
        return Err(ApiError::not_found("worker", id));
    }
    let series = metrics::query(
        &state.pool,
        &state.config.metrics,
        Scope::Worker(id),
        since,
        until,
        step,
    )
    .await?;
    Ok(Json(series))
}

/// A deployment's metrics over time, aggregated over its workers (viewer+).
#[utoipa::path(get, path = "/api/v1/metrics/deployments/{id}", params(("id" = String, Path, description = "The resource id"), MetricsQuery), tag = "metrics",
    extensions(("x-kvfleet-permission" = json!("read"))),
    responses((status = 200, body = MetricsSeries), (status = 404, body = Problem), (status = 422, body = Problem)))]
pub async fn deployment_metrics(
    _caller: Caller<Read>,
    State(state): State<AppState>,
    Path(id): Path<String>,
    ApiQuery(query): ApiQuery<MetricsQuery>,
) -> Result<Json<MetricsSeries>, ApiError> {
    let id = parse_uuid("deployment", &id)?;
    let (since, until, step) = window(&query)?;
    let series = metrics::query(
        &state.pool,
        &state.config.metrics,
        Scope::Deployment(id),
        since,
        until,
        step,
    )
    .await?;
    Ok(Json(series))
}
