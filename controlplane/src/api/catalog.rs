//! Models and deployments: what the fleet should serve. Validation collects every problem
//! with its field before anything is written, so a bad request changes nothing.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use sqlx::PgConnection;
use uuid::Uuid;

use super::change::{Change, json};
use super::extract::{ApiJson, Caller, Operate, Read, parse_uuid};
use super::problem::{ApiError, InvalidParam, Problem};
use super::types::{
    Deployment, DeploymentMode, DeploymentPatch, DisaggregationPolicy, Model, NewDeployment,
    NewModel, Page, PageQuery, PlacementConstraints, PlannerMode, ReasoningParser,
    RoleWorkerBounds, SlaTargets, ToolParser,
};
use super::{page, page_limit, uuid_cursor};
use crate::AppState;
use crate::rows;
use crate::rows::DEPLOYMENT_COLUMNS;
use crate::store;

const MODEL_COLUMNS: &str =
    "id, name, format, path, block_size, context_length, memory_bytes, created_at, updated_at";
fn valid_model_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 128
        && bytes[0].is_ascii_alphanumeric()
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"._:/-".contains(b))
}

fn valid_deployment_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    let ok = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes.first().is_some_and(ok)
        && bytes.last().is_some_and(ok)
        && bytes.iter().all(|b| ok(b) || *b == b'-')
}

fn validate_model(new: &NewModel) -> Vec<InvalidParam> {
    let mut problems = Vec::new();
    if !valid_model_name(&new.name) {
        problems.push(InvalidParam::new(
            "name",
            "must match [A-Za-z0-9][A-Za-z0-9._:/-]{0,127}",
        ));
    }
    if new.path.trim().is_empty() {
        problems.push(InvalidParam::new("path", "must not be empty"));
    }
    if new.block_size.is_some_and(|b| !(1..=1024).contains(&b)) {
        problems.push(InvalidParam::new("block_size", "must be from 1 to 1024"));
    }
    if new.context_length.is_some_and(|c| c <= 0) {
        problems.push(InvalidParam::new("context_length", "must be above 0"));
    }
    if new.memory_bytes.is_some_and(|m| m <= 0) {
        problems.push(InvalidParam::new("memory_bytes", "must be above 0"));
    }
    problems
}

/// A deployment's settable fields, as a create or a patch leaves them.
#[derive(Debug, Clone)]
pub struct DeploymentFields {
    pub mode: DeploymentMode,
    pub sla: SlaTargets,
    pub min_workers: i32,
    pub max_workers: i32,
    pub roles: RoleWorkerBounds,
    pub planner: PlannerMode,
    pub placement: PlacementConstraints,
    pub disaggregation: DisaggregationPolicy,
    pub migration_limit: u32,
    pub tool_parser: ToolParser,
    pub reasoning_parser: ReasoningParser,
}

impl DeploymentFields {
    /// The deployment as the planner sees it (named `name`).
    pub fn policy(&self, name: &str) -> kvfleet_planner::DeploymentPolicy {
        crate::planner::policy::deployment_policy(
            name,
            self.mode,
            self.planner,
            &self.sla,
            self.min_workers,
            self.max_workers,
            &self.roles,
        )
    }
}

impl DeploymentFields {
    /// Binds the stored columns, `mode` through `reasoning_parser`, in the order in which both
    /// the INSERT and the UPDATE name them (one list, so the two cannot drift apart).
    fn bind_columns<'q>(
        &'q self,
        query: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
        query
            .bind(self.mode.as_str())
            .bind(self.sla.ttft_ms)
            .bind(self.sla.itl_ms)
            .bind(self.sla.percentile_or_default())
            .bind(self.min_workers)
            .bind(self.max_workers)
            .bind(self.roles.prefill.map(|b| b.min))
            .bind(self.roles.prefill.map(|b| b.max))
            .bind(self.roles.decode.map(|b| b.min))
            .bind(self.roles.decode.map(|b| b.max))
            .bind(self.planner.as_str())
            .bind(sqlx::types::Json(&self.placement))
            .bind(i64::from(self.disaggregation.min_remote_prefill_tokens))
            .bind(i64::from(self.disaggregation.max_prefill_queue_tokens))
            .bind(i64::from(self.disaggregation.prefill_timeout_ms))
            .bind(i64::from(self.migration_limit))
            .bind(self.tool_parser.as_str())
            .bind(self.reasoning_parser.as_str())
    }
}

/// The deployment rules that do not need the database.
pub fn validate_deployment_fields(fields: &DeploymentFields) -> Vec<InvalidParam> {
    let DeploymentFields {
        min_workers,
        max_workers,
        sla,
        placement,
        disaggregation,
        ..
    } = fields;
    let (min_workers, max_workers) = (*min_workers, *max_workers);
    let mut problems = Vec::new();
    if min_workers < 0 {
        problems.push(InvalidParam::new("min_workers", "must be 0 or more"));
    }
    if max_workers < 1 {
        problems.push(InvalidParam::new("max_workers", "must be 1 or more"));
    }
    if min_workers > max_workers {
        problems.push(InvalidParam::new(
            "min_workers",
            "must not exceed max_workers",
        ));
    }
    if let Some((field, reason)) =
        kvfleet_proto::api::invalid_migration_limit(fields.migration_limit)
    {
        problems.push(InvalidParam::new(field, reason));
    }
    for (field, reason) in sla.invalid_fields() {
        problems.push(InvalidParam::new(field, reason));
    }
    for (field, reason) in fields
        .roles
        .invalid_fields(fields.mode, min_workers, max_workers)
    {
        problems.push(InvalidParam::new(field, reason));
    }
    if placement
        .gpu_name
        .as_deref()
        .is_some_and(|g| g.trim().is_empty())
    {
        problems.push(InvalidParam::new("placement.gpu_name", "must not be empty"));
    }
    if placement.node_labels.keys().any(|k| k.is_empty()) {
        problems.push(InvalidParam::new(
            "placement.node_labels",
            "label names must not be empty",
        ));
    }
    for (field, reason) in disaggregation.invalid_fields() {
        problems.push(InvalidParam::new(field, reason));
    }
    problems
}

/// List models (viewer+).
#[utoipa::path(get, path = "/api/v1/models", params(PageQuery), tag = "models",
    extensions(("x-kvfleet-permission" = json!("read"))),
    responses((status = 200, body = Page<Model>), (status = 401, body = Problem)))]
pub async fn list_models(
    _caller: Caller<Read>,
    State(state): State<AppState>,
    super::extract::ApiQuery(paging): super::extract::ApiQuery<PageQuery>,
) -> Result<Json<Page<Model>>, ApiError> {
    let limit = page_limit(&paging)?;
    let rows: Vec<Model> = sqlx::query(sql!(
        "SELECT {MODEL_COLUMNS} FROM models WHERE ($1::uuid IS NULL OR id > $1) ORDER BY id LIMIT $2"
    ))
    .bind(uuid_cursor(&paging)?)
    .bind(limit + 1)
    .try_map(rows::model)
    .fetch_all(&state.pool)
    .await?;
    Ok(Json(page(rows, limit, |m| m.id.to_string())))
}

async fn fetch_model(conn: &mut PgConnection, id: Uuid) -> Result<Model, ApiError> {
    sqlx::query(sql!("SELECT {MODEL_COLUMNS} FROM models WHERE id = $1"))
        .bind(id)
        .try_map(rows::model)
        .fetch_optional(conn)
        .await?
        .ok_or_else(|| ApiError::not_found("model", id))
}

/// Register a model (operator+).
#[utoipa::path(post, path = "/api/v1/models", request_body = NewModel, tag = "models",
    extensions(("x-kvfleet-permission" = json!("operate"))),
    responses((status = 201, body = Model), (status = 409, body = Problem), (status = 422, body = Problem)))]
pub async fn create_model(
    caller: Caller<Operate>,
    State(state): State<AppState>,
    ApiJson(new): ApiJson<NewModel>,
) -> Result<(StatusCode, Json<Model>), ApiError> {
    let problems = validate_model(&new);
    if !problems.is_empty() {
        return Err(ApiError::Validation(problems));
    }
    let id = Uuid::new_v4();
    let mut change = Change::begin(&state, &caller.principal).await?;
    sqlx::query(
        "INSERT INTO models (id, name, format, path, block_size, context_length, memory_bytes)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(id)
    .bind(&new.name)
    .bind(new.format.as_str())
    .bind(&new.path)
    .bind(new.block_size.unwrap_or(16))
    .bind(new.context_length)
    .bind(new.memory_bytes)
    .execute(&mut *change)
    .await
    .map_err(|e| match ApiError::from(e) {
        ApiError::Conflict(_) => ApiError::Conflict(format!("a model named {:?} exists", new.name)),
        other => other,
    })?;
    let model = fetch_model(&mut change, id).await?;
    change
        .commit("model.create", "model", id, None, json(&model))
        .await?;
    Ok((StatusCode::CREATED, Json(model)))
}

/// Get one model (viewer+).
#[utoipa::path(get, path = "/api/v1/models/{id}", params(("id" = String, Path, description = "The resource id")), tag = "models",
    extensions(("x-kvfleet-permission" = json!("read"))),
    responses((status = 200, body = Model), (status = 404, body = Problem)))]
pub async fn get_model(
    _caller: Caller<Read>,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Model>, ApiError> {
    let id = parse_uuid("model", &id)?;
    let mut conn = state.pool.acquire().await?;
    Ok(Json(fetch_model(&mut conn, id).await?))
}

/// Delete a model no deployment uses (operator+).
#[utoipa::path(delete, path = "/api/v1/models/{id}", params(("id" = String, Path, description = "The resource id")), tag = "models",
    extensions(("x-kvfleet-permission" = json!("operate"))),
    responses((status = 204), (status = 404, body = Problem), (status = 409, body = Problem)))]
pub async fn delete_model(
    caller: Caller<Operate>,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let id = parse_uuid("model", &id)?;
    let mut change = Change::begin(&state, &caller.principal).await?;
    let before = fetch_model(&mut change, id).await?;
    sqlx::query("DELETE FROM models WHERE id = $1")
        .bind(id)
        .execute(&mut *change)
        .await
        .map_err(|e| match ApiError::from(e) {
            ApiError::Conflict(_) => ApiError::Conflict(format!(
                "model {:?} is used by a deployment; delete the deployment first",
                before.name
            )),
            other => other,
        })?;
    change
        .commit("model.delete", "model", id, json(&before), None)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// List deployments (viewer+).
#[utoipa::path(get, path = "/api/v1/deployments", params(PageQuery), tag = "deployments",
    extensions(("x-kvfleet-permission" = json!("read"))),
    responses((status = 200, body = Page<Deployment>), (status = 401, body = Problem)))]
pub async fn list_deployments(
    _caller: Caller<Read>,
    State(state): State<AppState>,
    super::extract::ApiQuery(paging): super::extract::ApiQuery<PageQuery>,
) -> Result<Json<Page<Deployment>>, ApiError> {
    let limit = page_limit(&paging)?;
    let rows: Vec<Deployment> = sqlx::query(sql!(
        "SELECT {DEPLOYMENT_COLUMNS} FROM deployments d JOIN models m ON m.id = d.model_id
         WHERE ($1::uuid IS NULL OR d.id > $1) ORDER BY d.id LIMIT $2"
    ))
    .bind(uuid_cursor(&paging)?)
    .bind(limit + 1)
    .try_map(rows::deployment)
    .fetch_all(&state.pool)
    .await?;
    Ok(Json(page(rows, limit, |d| d.id.to_string())))
}

async fn fetch_deployment(
    conn: &mut PgConnection,
    id: Uuid,
    lock: bool,
) -> Result<Deployment, ApiError> {
    let lock = if lock { "FOR UPDATE OF d" } else { "" };
    sqlx::query(sql!(
        "SELECT {DEPLOYMENT_COLUMNS} FROM deployments d JOIN models m ON m.id = d.model_id
         WHERE d.id = $1 {lock}"
    ))
    .bind(id)
    .try_map(rows::deployment)
    .fetch_optional(conn)
    .await?
    .ok_or_else(|| ApiError::not_found("deployment", id))
}

/// Create a deployment (operator+). `model` is a model's name or id.
#[utoipa::path(post, path = "/api/v1/deployments", request_body = NewDeployment, tag = "deployments",
    extensions(("x-kvfleet-permission" = json!("operate"))),
    responses((status = 201, body = Deployment), (status = 409, body = Problem), (status = 422, body = Problem)))]
pub async fn create_deployment(
    caller: Caller<Operate>,
    State(state): State<AppState>,
    ApiJson(new): ApiJson<NewDeployment>,
) -> Result<(StatusCode, Json<Deployment>), ApiError> {
    let mut problems = Vec::new();
    if !valid_deployment_name(&new.name) {
        problems.push(InvalidParam::new(
            "name",
            "must match [a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?",
        ));
    }
    let mut change = Change::begin(&state, &caller.principal).await?;
    let model: Option<Uuid> =
        sqlx::query_scalar("SELECT id FROM models WHERE name = $1 OR id::text = $1")
            .bind(&new.model)
            .fetch_optional(&mut *change)
            .await?;
    if model.is_none() {
        problems.push(InvalidParam::new(
            "model",
            format!("no model named {:?}", new.model),
        ));
    }
    let fields = DeploymentFields {
        mode: new.mode,
        sla: new.sla,
        min_workers: new.min_workers,
        max_workers: new.max_workers,
        roles: new.roles,
        planner: new.planner,
        placement: new.placement.clone(),
        disaggregation: new.disaggregation,
        migration_limit: new.migration_limit,
        tool_parser: new.tool_parser,
        reasoning_parser: new.reasoning_parser,
    };
    problems.extend(validate_deployment_fields(&fields));
    let Some(model) = model.filter(|_| problems.is_empty()) else {
        return Err(ApiError::Validation(problems));
    };
    super::planner::check_budget_with(&mut change, None, &fields.policy(&new.name)).await?;
    let id = Uuid::new_v4();
    let insert = sqlx::query(
        "INSERT INTO deployments (id, name, model_id, mode, ttft_target_ms, itl_target_ms,
             sla_percentile, min_workers, max_workers, min_prefill_workers, max_prefill_workers,
             min_decode_workers, max_decode_workers, planner, placement,
             min_remote_prefill_tokens, max_prefill_queue_tokens, prefill_timeout_ms,
             migration_limit, tool_parser, reasoning_parser)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18,
             $19, $20, $21)",
    )
    .bind(id)
    .bind(&new.name)
    .bind(model);
    fields
        .bind_columns(insert)
        .execute(&mut *change)
        .await
        .map_err(|e| match ApiError::from(e) {
            ApiError::Conflict(_) => {
                ApiError::Conflict(format!("a deployment named {:?} exists", new.name))
            }
            other => other,
        })?;
    let deployment = fetch_deployment(&mut change, id, false).await?;
    change
        .commit(
            "deployment.create",
            "deployment",
            id,
            None,
            json(&deployment),
        )
        .await?;
    Ok((StatusCode::CREATED, Json(deployment)))
}

/// Get one deployment (viewer+).
#[utoipa::path(get, path = "/api/v1/deployments/{id}", params(("id" = String, Path, description = "The resource id")), tag = "deployments",
    extensions(("x-kvfleet-permission" = json!("read"))),
    responses((status = 200, body = Deployment), (status = 404, body = Problem)))]
pub async fn get_deployment(
    _caller: Caller<Read>,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Deployment>, ApiError> {
    let id = parse_uuid("deployment", &id)?;
    let mut conn = state.pool.acquire().await?;
    Ok(Json(fetch_deployment(&mut conn, id, false).await?))
}

/// Change a deployment's mode, SLA targets and percentile, worker bounds (per role too),
/// planner mode, placement, disaggregation policy, migration limit or output parsers
/// (operator+).
#[utoipa::path(patch, path = "/api/v1/deployments/{id}", request_body = DeploymentPatch, params(("id" = String, Path, description = "The resource id")), tag = "deployments",
    extensions(("x-kvfleet-permission" = json!("operate"))),
    responses((status = 200, body = Deployment), (status = 404, body = Problem), (status = 422, body = Problem)))]
pub async fn update_deployment(
    caller: Caller<Operate>,
    State(state): State<AppState>,
    Path(id): Path<String>,
    ApiJson(patch): ApiJson<DeploymentPatch>,
) -> Result<Json<Deployment>, ApiError> {
    let id = parse_uuid("deployment", &id)?;
    let mut change = Change::begin(&state, &caller.principal).await?;
    let before = fetch_deployment(&mut change, id, true).await?;
    let fields = DeploymentFields {
        mode: patch.mode.unwrap_or(before.mode),
        // A patched SLA without a percentile keeps the deployment's.
        sla: patch.sla.map_or(before.sla, |sla| SlaTargets {
            percentile: sla.percentile.or(before.sla.percentile),
            ..sla
        }),
        min_workers: patch.min_workers.unwrap_or(before.min_workers),
        max_workers: patch.max_workers.unwrap_or(before.max_workers),
        roles: patch.roles.unwrap_or(before.roles),
        planner: patch.planner.unwrap_or(before.planner),
        placement: patch
            .placement
            .clone()
            .unwrap_or_else(|| before.placement.clone()),
        disaggregation: patch.disaggregation.unwrap_or(before.disaggregation),
        migration_limit: patch.migration_limit.unwrap_or(before.migration_limit),
        tool_parser: patch.tool_parser.unwrap_or(before.tool_parser),
        reasoning_parser: patch.reasoning_parser.unwrap_or(before.reasoning_parser),
    };
    let problems = validate_deployment_fields(&fields);
    if !problems.is_empty() {
        return Err(ApiError::Validation(problems));
    }
    super::planner::check_budget_with(&mut change, Some(id), &fields.policy(&before.name)).await?;
    // Placement follows the planner's targets only in `auto`: leaving it drops them.
    let keep_targets = fields.planner == PlannerMode::Auto;
    let update = sqlx::query(
        "UPDATE deployments SET mode = $2, ttft_target_ms = $3, itl_target_ms = $4,
             sla_percentile = $5, min_workers = $6, max_workers = $7, min_prefill_workers = $8,
             max_prefill_workers = $9, min_decode_workers = $10, max_decode_workers = $11,
             planner = $12, placement = $13, min_remote_prefill_tokens = $14,
             max_prefill_queue_tokens = $15, prefill_timeout_ms = $16,
             migration_limit = $17, tool_parser = $18, reasoning_parser = $19,
             planner_targets = CASE WHEN $20 THEN planner_targets END,
             generation = generation + 1, updated_at = now()
         WHERE id = $1",
    )
    .bind(id);
    fields
        .bind_columns(update)
        .bind(keep_targets)
        .execute(&mut *change)
        .await?;
    let after = fetch_deployment(&mut change, id, false).await?;
    change
        .commit(
            "deployment.update",
            "deployment",
            id,
            json(&before),
            json(&after),
        )
        .await?;
    Ok(Json(after))
}

/// Delete a deployment; its workers disappear from their nodes' desired state, so agents stop
/// them (operator+).
#[utoipa::path(delete, path = "/api/v1/deployments/{id}", params(("id" = String, Path, description = "The resource id")), tag = "deployments",
    extensions(("x-kvfleet-permission" = json!("operate"))),
    responses((status = 204), (status = 404, body = Problem)))]
pub async fn delete_deployment(
    caller: Caller<Operate>,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let id = parse_uuid("deployment", &id)?;
    let mut change = Change::begin(&state, &caller.principal).await?;
    let before = fetch_deployment(&mut change, id, true).await?;
    let nodes: Vec<Uuid> = sqlx::query_scalar(
        "SELECT DISTINCT node_id FROM workers WHERE deployment_id = $1 AND desired_state <> 'stopped'",
    )
    .bind(id)
    .fetch_all(&mut *change)
    .await?;
    // The nodes first, in id order, then (by the cascade) their workers: the order heartbeats
    // and placement take them in. Deleting first locked the workers, then the nodes, and could
    // deadlock with a heartbeat (a 500 seen in CI).
    sqlx::query("SELECT id FROM nodes WHERE id = ANY($1) ORDER BY id FOR UPDATE")
        .bind(&nodes)
        .execute(&mut *change)
        .await?;
    sqlx::query("DELETE FROM deployments WHERE id = $1")
        .bind(id)
        .execute(&mut *change)
        .await?;
    for node in nodes {
        store::bump_generation(&mut change, node).await?;
    }
    change
        .commit("deployment.delete", "deployment", id, json(&before), None)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_table() {
        for (name, model_ok, deployment_ok) in [
            ("chat", true, true),
            ("chat-2", true, true),
            ("Chat", true, false),
            ("-chat", false, false),
            ("chat-", true, false),
            ("meta/llama:3.1", true, false),
            ("", false, false),
            ("a b", false, false),
        ] {
            assert_eq!(valid_model_name(name), model_ok, "model {name:?}");
            assert_eq!(
                valid_deployment_name(name),
                deployment_ok,
                "deployment {name:?}"
            );
        }
        assert!(!valid_deployment_name(&"a".repeat(64)));
        assert!(valid_deployment_name(&"a".repeat(63)));
    }

    #[test]
    fn deployment_fields_table() {
        let sla = |t, i| SlaTargets {
            ttft_ms: t,
            itl_ms: i,
            percentile: None,
        };
        let none = PlacementConstraints::default();
        let cases: Vec<(i32, i32, SlaTargets, Vec<&str>)> = vec![
            (1, 2, sla(Some(200), Some(20)), vec![]),
            (0, 1, sla(None, None), vec![]),
            (3, 2, sla(None, None), vec!["min_workers"]),
            (-1, 0, sla(None, None), vec!["min_workers", "max_workers"]),
            (
                1,
                1,
                sla(Some(-5), Some(0)),
                vec!["sla.ttft_ms", "sla.itl_ms"],
            ),
        ];
        for (min, max, sla, want) in cases {
            let fields = DeploymentFields {
                mode: DeploymentMode::Aggregated,
                sla,
                min_workers: min,
                max_workers: max,
                roles: RoleWorkerBounds::default(),
                planner: PlannerMode::Off,
                placement: none.clone(),
                disaggregation: DisaggregationPolicy::default(),
                migration_limit: kvfleet_proto::api::DEFAULT_MIGRATION_LIMIT,
                tool_parser: ToolParser::Auto,
                reasoning_parser: ReasoningParser::Auto,
            };
            let got: Vec<String> = validate_deployment_fields(&fields)
                .into_iter()
                .map(|p| p.name)
                .collect();
            assert_eq!(got, want, "{min} {max} {sla:?}");
        }
    }
}
