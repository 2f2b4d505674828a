//! The KV index's routes: agents upload events and loads, follow the sequenced stream and
//! load snapshots; operators read its stats. What the index does with them is in
//! [`crate::kv_index`].

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use kvfleet_proto::kv_stream::{
    KvEventBatch, KvEventBatchResult, KvSnapshot, KvStreamPage, KvStreamQuery, KvWorkerBlocks,
    MAX_BATCH_EVENTS, MAX_BATCH_LOADS, MAX_STREAM_PAGE,
};

use super::agent::node_of;
use super::extract::{Agent, ApiJson, ApiQuery, Caller, Read};
use super::problem::ApiError;
use crate::AppState;
use crate::kv_index::KvIndexStats;
use kvfleet_proto::api::MAX_WAIT_S;

/// Upload bodies may be this large (a batch of long prompts' blocks is bigger than the API's
/// default body limit).
pub const MAX_UPLOAD_BYTES: usize = 16 << 20;

/// Upload a batch of the node's workers' KV events and live loads (agent credential). Body:
/// `KvEventBatch` (at most 10,000 events and 4,096 loads, 16 MiB); answer:
/// `KvEventBatchResult`. Safe to retry.
#[utoipa::path(post, path = "/api/v1/agent/kv-events", tag = "agent",
    request_body(content = String, content_type = "application/json", description = "KvEventBatch: {\"epochs\": [{\"worker\", \"epoch\"}], \"events\": [KvEvent], \"loads\": [{\"worker\", \"prefill_tokens\", \"decode_blocks\", \"queue_depth\", \"age_ms\"}]}"),
    extensions(("x-kvfleet-permission" = json!("agent"))),
    responses((status = 200, description = "KvEventBatchResult: counts per outcome, unknown_workers, head_seq"),
        (status = 422, description = "too many events or a malformed event"), (status = 503, description = "database unavailable; retry")))]
pub async fn upload(
    caller: Caller<Agent>,
    State(state): State<AppState>,
    ApiJson(batch): ApiJson<KvEventBatch>,
) -> Result<Json<KvEventBatchResult>, ApiError> {
    let node = node_of(&caller.principal)?;
    if batch.events.len() > MAX_BATCH_EVENTS {
        return Err(ApiError::invalid(
            "events",
            format!("at most {MAX_BATCH_EVENTS} events per batch"),
        ));
    }
    if batch.loads.len() > MAX_BATCH_LOADS {
        return Err(ApiError::invalid(
            "loads",
            format!("at most {MAX_BATCH_LOADS} load reports per batch"),
        ));
    }
    let result = state.kv.ingest(&state.agent_pool, node, &batch).await?;
    if result.unknown_worker > 0 || result.loads_rejected > 0 {
        tracing::warn!(%node, workers = ?result.unknown_workers, events = result.unknown_worker,
            loads = result.loads_rejected,
            "rejected KV events or loads from workers that are not live on this node");
    }
    Ok(Json(result))
}

/// The sequenced stream of index changes after `after`, with the workers' loads reported since
/// load version `loads_after` (long poll: waits up to `wait_s`, capped by the server, when
/// there is nothing newer; new loads alone end it after `load_page_interval`). Answer:
/// `KvStreamPage`; `resync: true` means load `GET /agent/kv-snapshot` and continue from its
/// `seq`.
#[utoipa::path(get, path = "/api/v1/agent/kv-stream", tag = "agent",
    params(("after" = Option<u64>, Query, description = "last applied sequence number (0: from the start)"),
        ("loads_after" = Option<u64>, Query, description = "load version last seen (the previous page's loads_version; 0: every current load)"),
        ("wait_s" = Option<u64>, Query, maximum = 3600, description = "long-poll wait when nothing is newer (seconds, at most 3600; capped by the server)"),
        ("limit" = Option<u32>, Query, description = "most items (max 10000)")),
    extensions(("x-kvfleet-permission" = json!("agent"))),
    responses((status = 200, description = "KvStreamPage: items [{seq, kind, ...}], next_after, head_seq, resync, loads [{worker, prefill_tokens, decode_blocks, queue_depth, age_ms}], loads_version")))]
pub async fn stream(
    _caller: Caller<Agent>,
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<KvStreamQuery>,
) -> Result<Json<KvStreamPage>, ApiError> {
    check_wait(query.wait_s)?;
    let limit = query
        .limit
        .map_or(MAX_STREAM_PAGE, |l| (l as usize).clamp(1, MAX_STREAM_PAGE));
    let wait = Duration::from_secs(query.wait_s.unwrap_or(0));
    let page = state
        .kv
        .next_page(
            query.after,
            query.loads_after,
            limit,
            wait,
            state.stopping.subscribe(),
        )
        .await;
    Ok(Json(page))
}

/// Refuses a long-poll `wait_s` above the documented [`MAX_WAIT_S`].
pub fn check_wait(wait_s: Option<u64>) -> Result<(), ApiError> {
    match wait_s {
        Some(s) if s > MAX_WAIT_S => Err(ApiError::invalid(
            "wait_s",
            format!("must be at most {MAX_WAIT_S}"),
        )),
        _ => Ok(()),
    }
}

/// The whole index as of one sequence number (`KvSnapshot`): follow the stream from its `seq`.
#[utoipa::path(get, path = "/api/v1/agent/kv-snapshot", tag = "agent",
    extensions(("x-kvfleet-permission" = json!("agent"))),
    responses((status = 200, description = "KvSnapshot: seq, workers [{worker, epoch, next_event_id, tiers [{tier, blocks}]}]")))]
pub async fn snapshot(
    _caller: Caller<Agent>,
    State(state): State<AppState>,
) -> Result<Json<KvSnapshot>, ApiError> {
    Ok(Json(state.kv.snapshot()))
}

/// This replica's KV index: head sequence number, sizes, and counters of rejected events.
#[utoipa::path(get, path = "/api/v1/kv/stats", tag = "fleet",
    extensions(("x-kvfleet-permission" = json!("read"))),
    responses((status = 200, description = "KvIndexStats: head_seq, oldest_seq, workers, blocks, counters")))]
pub async fn stats(
    _caller: Caller<Read>,
    State(state): State<AppState>,
) -> Result<Json<KvIndexStats>, ApiError> {
    Ok(Json(state.kv.stats()))
}

/// Blocks per tier (G1 device, G2 host, G3 disk, G4 remote) of every worker in this replica's
/// KV index, in worker-id order.
#[utoipa::path(get, path = "/api/v1/kv/workers", tag = "fleet",
    extensions(("x-kvfleet-permission" = json!("read"))),
    responses((status = 200, description = "[KvWorkerBlocks]: [{worker, g1, g2, g3, g4}]")))]
pub async fn workers(
    _caller: Caller<Read>,
    State(state): State<AppState>,
) -> Result<Json<Vec<KvWorkerBlocks>>, ApiError> {
    Ok(Json(state.kv.worker_blocks()))
}
