//! The agent protocol: register (join token → agent credential + peer certificate), heartbeat
//! (observed worker states and metrics), watch the desired state (long poll on a generation
//! number), renew the certificate, read the fleet directory (every running worker with its
//! model and its node's peer address, for the agents' fleet routers).
//!
//! An agent's loop: register once (or again after a restart, with its credential); heartbeat
//! every `heartbeat_interval_ms`; keep one `GET /agent/desired-state?after_generation=G` open
//! and apply whatever it returns. The desired state is the node's complete list of workers:
//! a worker the agent runs that is not listed (its deployment was deleted) must be stopped.

use std::collections::HashSet;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use chrono::Utc;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use sqlx::PgConnection;
use sqlx::postgres::PgListener;
use tokio::sync::{broadcast, watch};
use uuid::Uuid;

use super::change::Change;
use super::extract::{Agent, ApiJson, ApiQuery, Caller, Register};
use super::problem::{ApiError, InvalidParam, Problem};
use super::types::{
    AgentPublicKey, DesiredState, DesiredWorker, FleetDirectory, FleetModel, FleetWorker,
    Heartbeat, HeartbeatResponse, IssuedCertificate, ModelSpec, NodeApproval, NodeState,
    RegisterRequest, RegisterResponse, RenewRequest, WatchQuery,
};
use crate::AppState;
use crate::auth::{self, Principal, Role};
use crate::ca::{CaError, Subject};
use crate::rows;
use crate::store::{self, AuditEntry};

/// What the agent protocol counts, for `/metrics`.
#[derive(Debug, Clone)]
pub struct AgentMetrics {
    heartbeats: Counter,
    registrations: Family<[(&'static str, &'static str); 1], Counter>,
    certificates_renewed: Counter,
    gpu_claims_refused: Counter,
}

impl AgentMetrics {
    /// Registers the heartbeat, registration and renewal counters.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self {
            heartbeats: Counter::default(),
            registrations: Family::default(),
            certificates_renewed: Counter::default(),
            gpu_claims_refused: Counter::default(),
        };
        registry.register(
            "kvfleet_cp_agent_heartbeats",
            "Agent heartbeats accepted (observed worker states and metrics written)",
            metrics.heartbeats.clone(),
        );
        registry.register(
            "kvfleet_cp_agent_registrations",
            "Agent registrations accepted: kind=new (a join token made a node) or \
             kind=returning (a node's agent registered again with its credential)",
            metrics.registrations.clone(),
        );
        for kind in ["new", "returning"] {
            metrics.registrations.get_or_create_owned(&[("kind", kind)]);
        }
        registry.register(
            "kvfleet_cp_agent_certificate_renewals",
            "Node certificates renewed at an agent's request",
            metrics.certificates_renewed.clone(),
        );
        registry.register(
            "kvfleet_cp_agent_gpu_claims_refused",
            "Registrations and heartbeats refused because they reported a GPU UUID another node \
             owns",
            metrics.gpu_claims_refused.clone(),
        );
        metrics
    }

    fn registered(&self, action: &str) {
        let kind = if action == "node.register" {
            "new"
        } else {
            "returning"
        };
        self.registrations.get_or_create(&[("kind", kind)]).inc();
    }
}

fn validate_register(request: &RegisterRequest) -> Vec<InvalidParam> {
    let mut problems = Vec::new();
    if !kvfleet_proto::api::valid_hostname(&request.hostname) {
        problems.push(InvalidParam::new("hostname", "must be a DNS hostname"));
    }
    if request.cpu_slots < 0 {
        problems.push(InvalidParam::new("cpu_slots", "must be 0 or more"));
    }
    let mut indices = HashSet::new();
    let mut ids = HashSet::new();
    for (i, gpu) in request.gpus.iter().enumerate() {
        if gpu.index < 0 || !indices.insert(gpu.index) {
            problems.push(InvalidParam::new(
                format!("gpus[{i}].index"),
                "must be unique and 0 or more",
            ));
        }
        if !ids.insert(gpu.id) {
            problems.push(InvalidParam::new(format!("gpus[{i}].id"), "appears twice"));
        }
        if gpu.memory_total_bytes <= 0 {
            problems.push(InvalidParam::new(
                format!("gpus[{i}].memory_total_bytes"),
                "must be above 0",
            ));
        }
        if gpu.name.is_empty() {
            problems.push(InvalidParam::new(
                format!("gpus[{i}].name"),
                "must not be empty",
            ));
        }
    }
    problems
}

fn ca_error(error: CaError) -> ApiError {
    match error {
        CaError::KeyEncoding | CaError::KeyLength(_) => {
            ApiError::invalid("public_key.public_key", error.to_string())
        }
        CaError::Database(e) => e.into(),
        other => ApiError::Internal(other.to_string()),
    }
}

/// Signs and records a certificate for `node`.
async fn issue_certificate(
    state: &AppState,
    tx: &mut PgConnection,
    node: Uuid,
    hostname: &str,
    addresses: &[String],
    public_key: Option<&AgentPublicKey>,
) -> Result<IssuedCertificate, ApiError> {
    let issued = state
        .ca
        .issue(
            &Subject {
                node_id: node,
                hostname,
                addresses,
            },
            public_key,
            Utc::now(),
            state.config.ca.cert_validity,
        )
        .map_err(ca_error)?;
    sqlx::query(
        "INSERT INTO node_certificates (serial, node_id, not_before, not_after) VALUES ($1, $2, $3, $4)",
    )
    .bind(&issued.serial)
    .bind(node)
    .bind(issued.not_before)
    .bind(issued.not_after)
    .execute(tx)
    .await?;
    Ok(IssuedCertificate {
        serial: issued.serial,
        cert_pem: issued.cert_pem,
        ca_cert_pem: state.ca.cert_pem().to_owned(),
        private_key_pem: issued.private_key_pem,
        not_before: issued.not_before,
        not_after: issued.not_after,
    })
}

/// Register a node (join token) or refresh its inventory after a restart (its agent credential).
/// A new node is `pending` (no certificate in the response) unless `[join] auto_approve` is on.
/// 409: the hostname is taken by a live node, or a reported GPU UUID belongs to another node.
#[utoipa::path(post, path = "/api/v1/agent/register", request_body = RegisterRequest, tag = "agent",
    extensions(("x-kvfleet-permission" = json!("register"))),
    responses((status = 200, body = RegisterResponse), (status = 401, body = Problem), (status = 409, body = Problem), (status = 422, body = Problem)))]
pub async fn register(
    caller: Caller<Register>,
    State(state): State<AppState>,
    ApiJson(request): ApiJson<RegisterRequest>,
) -> Result<Json<RegisterResponse>, ApiError> {
    let problems = validate_register(&request);
    if !problems.is_empty() {
        return Err(ApiError::Validation(problems));
    }
    let principal = &caller.principal;
    let mut change = Change::begin(&state, principal).await?;
    let labels = sqlx::types::Json(&request.labels);
    let addresses = sqlx::types::Json(&request.addresses);
    let (node, credential, action, approval) = match (principal.role, principal.node_id) {
        (Role::Agent, Some(node)) => {
            // `labels` is the reported set only: the admin's (`admin_labels`) are never
            // written by an agent call.
            let approval: Option<String> = sqlx::query_scalar(
                "UPDATE nodes SET hostname = $2, agent_version = $3, frontend_addr = $4,
                     peer_addr = $5, addresses = $6, cpu_slots = $7, labels = $8, updated_at = now()
                 WHERE id = $1 AND state <> 'removed'
                 RETURNING approval",
            )
            .bind(node)
            .bind(&request.hostname)
            .bind(&request.agent_version)
            .bind(&request.frontend_addr)
            .bind(&request.peer_addr)
            .bind(addresses)
            .bind(request.cpu_slots)
            .bind(labels)
            .fetch_optional(&mut *change)
            .await?;
            let Some(approval) = approval else {
                return Err(ApiError::Conflict(format!(
                    "node {node} has been removed; join again"
                )));
            };
            (node, None, "node.reregister", rows::parse(&approval)?)
        }
        _ => {
            // A join token: take one of its uses in this transaction, so a single-use token
            // makes exactly one node (and a removed node cannot come back with the token it
            // joined with).
            auth::take_join_use(&mut change, principal.token_id).await?;
            let node = Uuid::new_v4();
            let approval = if state.config.join.auto_approve {
                NodeApproval::Approved
            } else {
                NodeApproval::Pending
            };
            sqlx::query(
                "INSERT INTO nodes (id, hostname, agent_version, frontend_addr, peer_addr, addresses,
                     cpu_slots, labels, approval, last_heartbeat_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, now())",
            )
            .bind(node)
            .bind(&request.hostname)
            .bind(&request.agent_version)
            .bind(&request.frontend_addr)
            .bind(&request.peer_addr)
            .bind(addresses)
            .bind(request.cpu_slots)
            .bind(labels)
            .bind(approval.as_str())
            .execute(&mut *change)
            .await
            .map_err(|e| match ApiError::from(e) {
                ApiError::Conflict(_) => ApiError::Conflict(format!(
                    "a live node named {:?} exists: register with its agent credential, or remove it first",
                    request.hostname
                )),
                other => other,
            })?;
            let name = format!("agent {}", request.hostname);
            let (_, token) = auth::insert_token(
                &mut change,
                &auth::NewToken {
                    name: &name,
                    role: Role::Agent,
                    node_id: Some(node),
                    created_by: Some(principal.token_id),
                    expires_at: None,
                    uses: None,
                },
                None,
            )
            .await?;
            (node, Some(token), "node.register", approval)
        }
    };
    let gpu_ids: Vec<Uuid> = request.gpus.iter().map(|g| g.id).collect();
    sqlx::query("DELETE FROM gpus WHERE node_id = $1 AND NOT (id = ANY($2))")
        .bind(node)
        .bind(&gpu_ids)
        .execute(&mut *change)
        .await?;
    for (i, gpu) in request.gpus.iter().enumerate() {
        // A GPU's UUID belongs to one node: the upsert only refreshes a row this node owns, so
        // a node cannot take over another's GPU (and the workers placed on it) by reporting
        // its UUID. The row lock the upsert takes makes two joins racing for one UUID end
        // with one owner. Removing or rejecting a node releases its GPUs.
        let claimed = sqlx::query(
            "INSERT INTO gpus (id, node_id, device_index, name, memory_total_bytes, pci_bus_id)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (id) DO UPDATE SET
                 device_index = EXCLUDED.device_index, name = EXCLUDED.name,
                 memory_total_bytes = EXCLUDED.memory_total_bytes,
                 pci_bus_id = EXCLUDED.pci_bus_id, updated_at = now()
             WHERE gpus.node_id = EXCLUDED.node_id",
        )
        .bind(gpu.id)
        .bind(node)
        .bind(gpu.index)
        .bind(&gpu.name)
        .bind(gpu.memory_total_bytes)
        .bind(&gpu.pci_bus_id)
        .execute(&mut *change)
        .await?;
        if claimed.rows_affected() == 0 {
            // The transaction is dropped uncommitted: no node, no token use, no GPU moved.
            return Err(gpu_owned_elsewhere(&state, &mut change, node, i, gpu.id).await);
        }
    }
    // A pending node gets no certificate: with one it could open peer connections to every
    // node of the fleet before anyone let it in. Its agent asks once a heartbeat says it was
    // approved.
    let certificate = match approval {
        NodeApproval::Approved => Some(
            issue_certificate(
                &state,
                &mut change,
                node,
                &request.hostname,
                &request.addresses,
                request.public_key.as_ref(),
            )
            .await?,
        ),
        NodeApproval::Pending | NodeApproval::Rejected => None,
    };
    let generation: i64 = sqlx::query_scalar("SELECT desired_generation FROM nodes WHERE id = $1")
        .bind(node)
        .fetch_one(&mut *change)
        .await?;
    let mut after = serde_json::to_value(&request).unwrap_or_default();
    if let Some(object) = after.as_object_mut() {
        object.remove("public_key");
        object.insert("approval".into(), approval.as_str().into());
        if let Some(certificate) = &certificate {
            object.insert(
                "certificate_serial".into(),
                certificate.serial.clone().into(),
            );
        }
    }
    change
        .commit(action, "node", node, None, Some(after))
        .await?;
    state.agents.registered(action);
    if approval == NodeApproval::Pending && action == "node.register" {
        tracing::info!(%node, hostname = %request.hostname,
            "a node joined and waits for approval: `kvfleet nodes approve {node}` lets it in");
    }
    Ok(Json(RegisterResponse {
        node_id: node,
        credential,
        certificate,
        approval,
        heartbeat_interval_ms: millis(state.config.liveness.heartbeat_interval),
        desired_generation: generation,
    }))
}

/// The refusal of a registration or heartbeat that reported the GPU `id` (at `gpus[index]`),
/// which another node owns: counted, logged with both nodes, and a 409 naming the owner and
/// the way out.
async fn gpu_owned_elsewhere(
    state: &AppState,
    conn: &mut PgConnection,
    node: Uuid,
    index: usize,
    id: Uuid,
) -> ApiError {
    let owner: Option<(Uuid, String)> = sqlx::query_as(
        "SELECT n.id, n.hostname FROM gpus g JOIN nodes n ON n.id = g.node_id WHERE g.id = $1",
    )
    .bind(id)
    .fetch_optional(conn)
    .await
    .unwrap_or_default();
    let owner = owner.map_or_else(
        || "another node".to_owned(),
        |(id, hostname)| format!("node {id} ({hostname})"),
    );
    state.agents.gpu_claims_refused.inc();
    tracing::warn!(%node, gpu = %id, %owner, "refused a GPU UUID another node owns");
    ApiError::Conflict(format!(
        "gpus[{index}].id: GPU {id} belongs to {owner}; a GPU has one owner (remove that node \
         first if the GPU moved)"
    ))
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

pub(super) fn node_of(principal: &Principal) -> Result<Uuid, ApiError> {
    principal
        .node_id
        .ok_or_else(|| ApiError::Internal("agent token without a node".into()))
}

/// Report what the node observes. Heartbeats are observations, not changes: they update
/// liveness, observed worker states and metrics, and write no audit row (a node's return to
/// health after a silence does).
#[utoipa::path(post, path = "/api/v1/agent/heartbeat", request_body = Heartbeat, tag = "agent",
    extensions(("x-kvfleet-permission" = json!("agent"))),
    responses((status = 200, body = HeartbeatResponse), (status = 401, body = Problem), (status = 409, body = Problem, description = "A reported GPU belongs to another node"), (status = 422, body = Problem)))]
pub async fn heartbeat(
    caller: Caller<Agent>,
    State(state): State<AppState>,
    ApiJson(beat): ApiJson<Heartbeat>,
) -> Result<Json<HeartbeatResponse>, ApiError> {
    let node = node_of(&caller.principal)?;
    let mut problems = Vec::new();
    for (i, w) in beat.workers.iter().enumerate() {
        if let Some(m) = &w.metrics {
            let rates = [
                Some(m.request_rate),
                Some(m.tokens_per_s),
                m.ttft_p50_ms,
                m.ttft_p99_ms,
                m.itl_p50_ms,
                m.itl_p99_ms,
            ];
            if rates.iter().flatten().any(|v| !v.is_finite() || *v < 0.0)
                || m.kv_blocks_used < 0
                || m.kv_blocks_total < 0
            {
                problems.push(InvalidParam::new(
                    format!("workers[{i}].metrics"),
                    "values must be finite and 0 or more",
                ));
            }
            if [m.prefix_hit_rate, m.gpu_utilization]
                .iter()
                .flatten()
                .any(|v| !(0.0..=1.0).contains(v))
            {
                problems.push(InvalidParam::new(
                    format!("workers[{i}].metrics"),
                    "rates must be within 0..=1",
                ));
            }
        }
    }
    for (i, w) in beat.workers.iter().enumerate() {
        if let Some(reason) = w.window.as_ref().and_then(|win| win.invalid_reason()) {
            problems.push(InvalidParam::new(format!("workers[{i}].window"), reason));
        }
    }
    for (i, g) in beat.gpus.iter().enumerate() {
        if g.utilization.is_some_and(|u| !(0.0..=1.0).contains(&u))
            || g.memory_used_bytes.is_some_and(|m| m < 0)
        {
            problems.push(InvalidParam::new(
                format!("gpus[{i}]"),
                "utilization must be within 0..=1, memory 0 or more",
            ));
        }
    }
    if let Some(addr) = &beat.peer_addr
        && (addr.is_empty() || addr.len() > 300 || !addr.contains(':'))
    {
        problems.push(InvalidParam::new("peer_addr", "must be host:port"));
    }
    if !problems.is_empty() {
        return Err(ApiError::Validation(problems));
    }
    // Round trips inside this transaction hold an agent-pool connection, and under load each
    // one also waits for the runtime: the fewer, the more heartbeats the pool carries (see
    // docs/benchmarks.md, "Unauthenticated flood"). So the commit mode is set with the
    // `BEGIN`, and the revoked serials come back with the node's update.
    let mut tx = if durable_commit(&beat) {
        state.agent_pool.begin().await?
    } else {
        state
            .agent_pool
            .begin_with("BEGIN; SET LOCAL synchronous_commit = off")
            .await?
    };
    if !beat.gpus.is_empty() {
        // Heartbeats only update GPUs this node owns; one that reports another node's GPU is
        // refused as its registration would be (a GPU with two reporters is a clone, a
        // spoof or a misconfiguration, and both nodes' figures would be wrong).
        let ids: Vec<Uuid> = beat.gpus.iter().map(|g| g.id).collect();
        let foreign: Option<Uuid> = sqlx::query_scalar(
            "SELECT id FROM gpus WHERE id = ANY($1) AND node_id <> $2 ORDER BY id LIMIT 1",
        )
        .bind(&ids)
        .bind(node)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(id) = foreign {
            let index = ids.iter().position(|g| *g == id).unwrap_or_default();
            return Err(gpu_owned_elsewhere(&state, &mut tx, node, index, id).await);
        }
    }
    // Every revoked node certificate serial that has not expired (a partial index on
    // revoked_at: a handful of rows), read with the update.
    let row: Option<(String, String, i64, String, Vec<String>)> = sqlx::query_as(
        "WITH old AS (SELECT id, state FROM nodes WHERE id = $1 FOR UPDATE)
         UPDATE nodes n SET last_heartbeat_at = now(),
             state = CASE WHEN old.state = 'removed' THEN 'removed' ELSE 'healthy' END,
             state_changed_at = CASE WHEN old.state IN ('healthy', 'removed') THEN n.state_changed_at ELSE now() END,
             peer_addr = COALESCE($2, n.peer_addr)
         FROM old WHERE n.id = old.id
         RETURNING old.state, n.state, n.desired_generation, n.approval,
             ARRAY(SELECT serial FROM node_certificates
                   WHERE revoked_at IS NOT NULL AND not_after > now() ORDER BY serial)",
    )
    .bind(node)
    .bind(beat.peer_addr.as_deref())
    .fetch_optional(&mut *tx)
    .await?;
    let (before, after, generation, approval, revoked_serials) =
        row.ok_or_else(|| ApiError::not_found("node", node))?;
    let approval: NodeApproval = rows::parse(&approval)?;
    let before: NodeState = rows::parse(&before)?;
    let after: NodeState = rows::parse(&after)?;
    if !beat.workers.is_empty() {
        let ids: Vec<i64> = beat.workers.iter().map(|w| w.worker_id).collect();
        let states: Vec<&str> = beat.workers.iter().map(|w| w.state.as_str()).collect();
        // Clipped: a reason is a line for people, not a log.
        let errors: Vec<Option<String>> = beat
            .workers
            .iter()
            .map(|w| w.error.as_ref().map(|e| e.chars().take(1000).collect()))
            .collect();
        let engines: Vec<Option<String>> = beat
            .workers
            .iter()
            .map(|w| w.engine.as_ref().map(|e| e.chars().take(100).collect()))
            .collect();
        sqlx::query(
            "UPDATE workers w SET observed_state = u.state, observed_error = u.error,
                 observed_engine = COALESCE(u.engine, w.observed_engine), observed_at = now(),
                 updated_at = CASE WHEN w.observed_state = u.state THEN w.updated_at ELSE now() END
             FROM UNNEST($2::bigint[], $3::text[], $4::text[], $5::text[]) AS u(id, state, error, engine)
             WHERE w.id = u.id AND w.node_id = $1",
        )
        .bind(node)
        .bind(&ids)
        .bind(&states)
        .bind(&errors)
        .bind(&engines)
        .execute(&mut *tx)
        .await?;
        crate::metrics::record(&mut tx, node, &beat.workers).await?;
        crate::planner::windows::record(&mut tx, node, &beat.workers).await?;
    }
    if !beat.gpus.is_empty() {
        let ids: Vec<Uuid> = beat.gpus.iter().map(|g| g.id).collect();
        let utilization: Vec<Option<f32>> = beat.gpus.iter().map(|g| g.utilization).collect();
        let used: Vec<Option<i64>> = beat.gpus.iter().map(|g| g.memory_used_bytes).collect();
        sqlx::query(
            "UPDATE gpus g SET utilization = u.util, memory_used_bytes = u.used
             FROM UNNEST($2::uuid[], $3::real[], $4::bigint[]) AS u(id, util, used)
             WHERE g.id = u.id AND g.node_id = $1",
        )
        .bind(node)
        .bind(&ids)
        .bind(&utilization)
        .bind(&used)
        .execute(&mut *tx)
        .await?;
    }
    if before != after {
        store::audit(
            &mut tx,
            AuditEntry {
                actor_token: Some(caller.principal.token_id),
                request_id: caller.principal.request_id.clone(),
                actor: &caller.principal.actor,
                action: "node.healthy",
                target_type: "node",
                target_id: Some(node.to_string()),
                before: Some(serde_json::json!({ "state": before })),
                after: Some(serde_json::json!({ "state": after })),
            },
        )
        .await?;
    }
    tx.commit().await?;
    state.agents.heartbeats.inc();
    Ok(Json(HeartbeatResponse {
        node_state: after,
        approval,
        desired_generation: generation,
        heartbeat_interval_ms: millis(state.config.liveness.heartbeat_interval),
        revoked_serials,
    }))
}

/// Whether a heartbeat must commit durably. Its liveness and states are an observation the
/// next one repeats: losing the last few hundred milliseconds of them in a Postgres crash is
/// harmless, so such a heartbeat skips the WAL flush that durable commits wait for (the audit
/// row of a recovery is the one exception, and the next heartbeat would write it again).
/// Windows are not repeated: the agent moves its baselines on once the heartbeat is answered,
/// so a window acknowledged and then lost in a crash would be lost for good (the fault suite's
/// Postgres restart lost 3 requests of 39 that way). A heartbeat whose windows count anything
/// served commits durably.
fn durable_commit(beat: &Heartbeat) -> bool {
    beat.workers
        .iter()
        .filter_map(|w| w.window.as_ref())
        .any(|w| w.requests + w.prompt_tokens + w.finished + w.output_tokens > 0)
}

async fn load_desired(state: &AppState, node: Uuid) -> Result<DesiredState, ApiError> {
    let mut conn = state.agent_pool.acquire().await?;
    let (generation, node_state, draining): (i64, String, bool) =
        sqlx::query_as("SELECT desired_generation, state, draining FROM nodes WHERE id = $1")
            .bind(node)
            .fetch_optional(&mut *conn)
            .await?
            .ok_or_else(|| ApiError::not_found("node", node))?;
    let node_state: NodeState = rows::parse(&node_state)?;
    type Row = (
        i64,
        Uuid,
        String,
        String,
        Option<Uuid>,
        String,
        String,
        String,
        String,
        i32,
        Option<i32>,
        String,
        String,
    );
    let desired: Vec<Row> = sqlx::query_as(
        "SELECT w.id, d.id, d.name, w.role, w.gpu_id, w.desired_state,
                m.name, m.format, m.path, m.block_size, m.context_length, d.tool_parser,
                d.reasoning_parser
         FROM workers w JOIN deployments d ON d.id = w.deployment_id JOIN models m ON m.id = d.model_id
         WHERE w.node_id = $1 AND w.desired_state <> 'stopped' ORDER BY w.id",
    )
    .bind(node)
    .fetch_all(&mut *conn)
    .await?;
    Ok(DesiredState {
        node_id: node,
        generation,
        node_state,
        draining,
        workers: desired
            .into_iter()
            .map(|r| {
                Ok(DesiredWorker {
                    worker_id: r.0,
                    deployment_id: r.1,
                    deployment: r.2,
                    role: rows::parse(&r.3)?,
                    gpu_id: r.4,
                    desired_state: rows::parse(&r.5)?,
                    model: ModelSpec {
                        name: r.6,
                        format: rows::parse(&r.7)?,
                        path: r.8,
                        block_size: r.9,
                        context_length: r.10,
                        tool_parser: rows::parse(&r.11)?,
                        reasoning_parser: rows::parse(&r.12)?,
                    },
                })
            })
            .collect::<Result<_, sqlx::Error>>()?,
        fleet_hash_secret: Some(state.fleet_hash_secret.clone()),
    })
}

/// The node's desired state; with `after_generation`, waits (up to `wait_s`, capped by the
/// server) until the generation differs from it. A generation lower than the agent's (a
/// database restored from a backup) is returned at once and is authoritative.
#[utoipa::path(get, path = "/api/v1/agent/desired-state", params(WatchQuery), tag = "agent",
    extensions(("x-kvfleet-permission" = json!("agent"))),
    responses((status = 200, body = DesiredState), (status = 401, body = Problem)))]
pub async fn desired_state(
    caller: Caller<Agent>,
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<WatchQuery>,
) -> Result<Json<DesiredState>, ApiError> {
    super::kv::check_wait(query.wait_s)?;
    let node = node_of(&caller.principal)?;
    // Subscribe before reading, so a change between the read and the wait is not missed.
    let mut changes = state.desired_changed.subscribe();
    let current = load_desired(&state, node).await?;
    let Some(after) = query.after_generation else {
        return Ok(Json(current));
    };
    if current.generation != after {
        return Ok(Json(current));
    }
    let wait =
        Duration::from_secs(query.wait_s.unwrap_or(u64::MAX / 2)).min(state.config.watch.max_wait);
    let deadline = tokio::time::Instant::now() + wait;
    let mut stopping = state.stopping.subscribe();
    loop {
        if *stopping.borrow_and_update() {
            return Ok(Json(load_desired(&state, node).await?));
        }
        let next = tokio::select! {
            next = tokio::time::timeout_at(deadline, changes.recv()) => next,
            _ = stopping.changed() => continue,
        };
        match next {
            Err(_elapsed) => return Ok(Json(load_desired(&state, node).await?)),
            Ok(Ok(changed)) if changed != node => continue,
            // Our node changed, or we fell behind and cannot tell: re-read.
            Ok(Ok(_)) | Ok(Err(broadcast::error::RecvError::Lagged(_))) => {
                let now = load_desired(&state, node).await?;
                if now.generation != after {
                    return Ok(Json(now));
                }
            }
            Ok(Err(broadcast::error::RecvError::Closed)) => {
                return Ok(Json(load_desired(&state, node).await?));
            }
        }
    }
}

/// Renew the node's peer certificate (before it expires), or get its first one once an admin
/// approved the node (409 while it is pending). Old certificates stay valid until
/// their own expiry, so peers holding them keep working during the rollover.
#[utoipa::path(post, path = "/api/v1/agent/certificate", request_body = RenewRequest, tag = "agent",
    extensions(("x-kvfleet-permission" = json!("agent"))),
    responses((status = 200, body = IssuedCertificate), (status = 401, body = Problem), (status = 404, body = Problem), (status = 409, body = Problem, description = "The node waits for an admin's approval"), (status = 422, body = Problem)))]
pub async fn renew_certificate(
    caller: Caller<Agent>,
    State(state): State<AppState>,
    ApiJson(request): ApiJson<RenewRequest>,
) -> Result<Json<IssuedCertificate>, ApiError> {
    let node = node_of(&caller.principal)?;
    let mut change = Change::begin(&state, &caller.principal).await?;
    let (hostname, addresses, approval): (String, sqlx::types::Json<Vec<String>>, String) =
        sqlx::query_as(
            "SELECT hostname, addresses, approval FROM nodes WHERE id = $1 AND state <> 'removed'",
        )
        .bind(node)
        .fetch_optional(&mut *change)
        .await?
        .ok_or_else(|| ApiError::not_found("node", node))?;
    if rows::parse::<NodeApproval>(&approval)? != NodeApproval::Approved {
        return Err(ApiError::Conflict(format!(
            "node {node} waits for an admin's approval (`kvfleet nodes approve {node}`): it gets \
             a peer certificate once approved"
        )));
    }
    let certificate = issue_certificate(
        &state,
        &mut change,
        node,
        &hostname,
        &addresses.0,
        request.public_key.as_ref(),
    )
    .await?;
    let after =
        serde_json::json!({ "serial": certificate.serial, "not_after": certificate.not_after });
    change
        .commit("certificate.renew", "node", node, None, Some(after))
        .await?;
    state.agents.certificates_renewed.inc();
    Ok(Json(certificate))
}

/// Relays Postgres notifications of desired-state changes (from any replica) to this replica's
/// watchers. Reconnects on failure; watchers time out and re-read meanwhile, so a gap delays
/// agents by at most one watch period, never loses a change.
pub async fn forward_notifications(state: AppState, mut shutdown: watch::Receiver<bool>) {
    loop {
        let mut listener = match PgListener::connect_with(&state.pool).await {
            Ok(listener) => listener,
            Err(error) => {
                tracing::warn!(%error, "cannot listen for desired-state changes; retrying");
                state.db.count("notifications");
                if store::sleep_or_shutdown(Duration::from_secs(1), &mut shutdown).await {
                    return;
                }
                continue;
            }
        };
        if let Err(error) = listener.listen(store::DESIRED_STATE_CHANNEL).await {
            tracing::warn!(%error, "LISTEN failed; retrying");
            state.db.count("notifications");
            if store::sleep_or_shutdown(Duration::from_secs(1), &mut shutdown).await {
                return;
            }
            continue;
        }
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                received = listener.recv() => match received {
                    Ok(notification) => {
                        if let Ok(node) = notification.payload().parse::<Uuid>() {
                            let _ = state.desired_changed.send(node);
                        }
                    }
                    Err(error) => {
                        tracing::warn!(%error, "lost the notification connection; reconnecting");
                        state.db.count("notifications");
                        break;
                    }
                }
            }
        }
    }
}

/// The fleet directory: every worker that should be running on a healthy node, with its model
/// and its node's peer address, and how each deployed model is served (mode, disaggregation
/// policy), for the agents' fleet routers.
#[utoipa::path(get, path = "/api/v1/agent/fleet", tag = "agent",
    extensions(("x-kvfleet-permission" = json!("agent"))),
    responses((status = 200, body = FleetDirectory), (status = 401, body = Problem)))]
pub async fn fleet_directory(
    _caller: Caller<Agent>,
    State(state): State<AppState>,
) -> Result<Json<FleetDirectory>, ApiError> {
    let mut conn = state.agent_pool.acquire().await?;
    let found: Vec<(i64, Uuid, String, String, String, Option<String>)> = sqlx::query_as(
        "SELECT w.id, w.node_id, m.name, w.role, w.observed_state, n.peer_addr
         FROM workers w
         JOIN nodes n ON n.id = w.node_id
         JOIN deployments d ON d.id = w.deployment_id
         JOIN models m ON m.id = d.model_id
         WHERE w.desired_state = 'running' AND n.state = 'healthy'
         ORDER BY w.id",
    )
    .fetch_all(&mut *conn)
    .await?;
    let mut workers = Vec::with_capacity(found.len());
    for (worker_id, node_id, model, role, observed, peer_addr) in found {
        workers.push(FleetWorker {
            worker_id,
            node_id,
            model,
            role: rows::parse(&role)?,
            observed_state: rows::parse(&observed)?,
            peer_addr,
        });
    }
    // One entry per model. A model may have several deployments; its requests are routed across
    // all of their workers, so it is served disaggregated as soon as one of them is (that one
    // has prefill workers), under the oldest such deployment's policy.
    let models = sqlx::query(
        "SELECT DISTINCT ON (m.name) m.name AS model, d.mode, d.min_remote_prefill_tokens,
             d.max_prefill_queue_tokens, d.prefill_timeout_ms, d.migration_limit
         FROM deployments d
         JOIN models m ON m.id = d.model_id
         ORDER BY m.name, d.mode = 'disaggregated' DESC, d.created_at, d.id",
    )
    .try_map(|row: sqlx::postgres::PgRow| {
        use sqlx::Row as _;
        Ok(FleetModel {
            model: row.try_get("model")?,
            mode: rows::text(&row, "mode")?,
            disaggregation: rows::disaggregation(&row)?,
            migration_limit: rows::migration_limit(&row)?,
        })
    })
    .fetch_all(&mut *conn)
    .await?;
    Ok(Json(FleetDirectory { workers, models }))
}

#[cfg(test)]
mod tests {
    use super::super::types::GpuInventory;
    use super::*;

    #[test]
    fn register_validation_names_fields() {
        let gpu = |index, id: u128, mem| GpuInventory {
            id: Uuid::from_u128(id),
            index,
            name: "H100".into(),
            memory_total_bytes: mem,
            pci_bus_id: None,
        };
        let request = RegisterRequest {
            hostname: "bad host".into(),
            agent_version: None,
            frontend_addr: None,
            peer_addr: None,
            addresses: vec![],
            cpu_slots: -1,
            labels: Default::default(),
            gpus: vec![gpu(0, 1, 1), gpu(0, 1, 0)],
            public_key: None,
        };
        let names: Vec<String> = validate_register(&request)
            .into_iter()
            .map(|p| p.name)
            .collect();
        assert_eq!(
            names,
            [
                "hostname",
                "cpu_slots",
                "gpus[1].index",
                "gpus[1].id",
                "gpus[1].memory_total_bytes"
            ]
        );
        assert!(kvfleet_proto::api::valid_hostname("gpu-node-01.dc1"));
        assert!(!kvfleet_proto::api::valid_hostname("-x"));
    }
}
