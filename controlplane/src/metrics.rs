//! Fleet metrics over time, from heartbeats.
//!
//! Each heartbeat's per-worker metrics become one raw row in `worker_metrics`, stamped with the
//! control plane's receipt time (agents' clocks are not trusted, and a receipt stamp means a
//! sample never lands in a bucket that has already been rolled up). The leader's maintenance
//! loop folds complete buckets of `metrics.rollup_bucket` into `worker_metrics_rollup`
//! (averages, with the sample count), then deletes raw rows older than `metrics.raw_retention`
//! and rollups older than `metrics.rollup_retention`. Queries read raw rows when the window
//! fits in raw retention and rollups otherwise.

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::config::MetricsConfig;
use crate::store::{Fence, LeaderError};
use kvfleet_proto::api::{MetricsPoint, MetricsSeries, ObservedWorker};

/// Inserts the samples of one heartbeat; workers that are not on `node` are ignored (an agent
/// reports only its own workers).
pub async fn record(
    conn: &mut PgConnection,
    node: Uuid,
    workers: &[ObservedWorker],
) -> Result<u64, sqlx::Error> {
    let samples: Vec<_> = workers
        .iter()
        .filter_map(|w| w.metrics.map(|m| (w.worker_id, m)))
        .collect();
    if samples.is_empty() {
        return Ok(0);
    }
    macro_rules! column {
        ($f:ident) => {
            samples.iter().map(|(_, m)| m.$f).collect::<Vec<_>>()
        };
    }
    let ids: Vec<i64> = samples.iter().map(|(id, _)| *id).collect();
    let result = sqlx::query(
        "INSERT INTO worker_metrics (worker_id, deployment_id, node_id, at, request_rate,
             ttft_p50_ms, ttft_p99_ms, itl_p50_ms, itl_p99_ms, tokens_per_s, kv_blocks_used,
             kv_blocks_total, prefix_hit_rate, gpu_utilization)
         SELECT w.id, w.deployment_id, w.node_id, now(), s.rr, s.t50, s.t99, s.i50, s.i99, s.tps,
                s.used, s.total, s.hit, s.util
         FROM UNNEST($2::bigint[], $3::real[], $4::real[], $5::real[], $6::real[], $7::real[],
                     $8::real[], $9::bigint[], $10::bigint[], $11::real[], $12::real[])
              AS s(id, rr, t50, t99, i50, i99, tps, used, total, hit, util)
         JOIN workers w ON w.id = s.id AND w.node_id = $1",
    )
    .bind(node)
    .bind(&ids)
    .bind(column!(request_rate))
    .bind(column!(ttft_p50_ms))
    .bind(column!(ttft_p99_ms))
    .bind(column!(itl_p50_ms))
    .bind(column!(itl_p99_ms))
    .bind(column!(tokens_per_s))
    .bind(column!(kv_blocks_used))
    .bind(column!(kv_blocks_total))
    .bind(column!(prefix_hit_rate))
    .bind(column!(gpu_utilization))
    .execute(conn)
    .await?;
    Ok(result.rows_affected())
}

/// Rolls complete buckets up and expires old rows. Returns (buckets written, rows deleted).
/// Fenced like the leader's other loops: refused with [`LeaderError::Deposed`] unless `fence`
/// is still the current epoch, so a deposed leader never rolls up or deletes alongside the new
/// one. Running it twice gives the same rows, but a deposed replica may run another
/// configuration (a shorter retention during a rolling change) and must not delete by it.
pub async fn maintain(
    pool: &PgPool,
    config: &MetricsConfig,
    fence: &Fence,
) -> Result<(u64, u64), LeaderError> {
    let bucket_s = config.rollup_bucket.as_secs_f64().max(1.0);
    let mut tx = pool.begin().await?;
    fence.check(&mut tx).await?;
    // The end of the last complete bucket.
    let upto: DateTime<Utc> = sqlx::query_scalar(
        "SELECT date_bin(make_interval(secs => $1), now(), timestamptz '2000-01-01 00:00:00+00')",
    )
    .bind(bucket_s)
    .fetch_one(&mut *tx)
    .await?;
    let from: Option<DateTime<Utc>> =
        sqlx::query_scalar("SELECT rolled_until FROM metrics_rollup_state WHERE id = 1 FOR UPDATE")
            .fetch_optional(&mut *tx)
            .await?;
    let mut written = 0;
    if from.is_none_or(|from| upto > from) {
        written = sqlx::query(
            "INSERT INTO worker_metrics_rollup (worker_id, bucket_start, deployment_id, node_id,
                 samples, request_rate, ttft_p50_ms, ttft_p99_ms, itl_p50_ms, itl_p99_ms,
                 tokens_per_s, kv_blocks_used, kv_blocks_total, prefix_hit_rate, gpu_utilization)
             SELECT worker_id,
                    date_bin(make_interval(secs => $3), at, timestamptz '2000-01-01 00:00:00+00'),
                    (array_agg(deployment_id))[1], (array_agg(node_id))[1], count(*),
                    avg(request_rate), avg(ttft_p50_ms), max(ttft_p99_ms), avg(itl_p50_ms),
                    max(itl_p99_ms), avg(tokens_per_s), avg(kv_blocks_used)::bigint,
                    avg(kv_blocks_total)::bigint, avg(prefix_hit_rate), avg(gpu_utilization)
             FROM worker_metrics WHERE ($1::timestamptz IS NULL OR at >= $1) AND at < $2
             GROUP BY 1, 2
             ON CONFLICT (worker_id, bucket_start) DO NOTHING",
        )
        .bind(from)
        .bind(upto)
        .bind(bucket_s)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        sqlx::query(
            "INSERT INTO metrics_rollup_state (id, rolled_until) VALUES (1, $1)
             ON CONFLICT (id) DO UPDATE SET rolled_until = EXCLUDED.rolled_until",
        )
        .bind(upto)
        .execute(&mut *tx)
        .await?;
    }
    let raw = sqlx::query(
        "DELETE FROM worker_metrics WHERE at < now() - make_interval(secs => $1) AND at < $2",
    )
    .bind(config.raw_retention.as_secs_f64())
    .bind(upto)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    let rolled = sqlx::query(
        "DELETE FROM worker_metrics_rollup WHERE bucket_start < now() - make_interval(secs => $1)",
    )
    .bind(config.rollup_retention.as_secs_f64())
    .execute(&mut *tx)
    .await?
    .rows_affected();
    tx.commit().await?;
    Ok((written, raw + rolled))
}

/// Which rows a query reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Worker(i64),
    Deployment(Uuid),
}

/// A series for one worker or one deployment over `[since, until)` in buckets of `step_s`.
pub async fn query(
    pool: &PgPool,
    config: &MetricsConfig,
    scope: Scope,
    since: DateTime<Utc>,
    until: DateTime<Utc>,
    step_s: i64,
) -> Result<MetricsSeries, sqlx::Error> {
    let raw_from = Utc::now()
        - chrono::Duration::from_std(config.raw_retention).unwrap_or(chrono::Duration::MAX);
    let (source, table, at) = if since >= raw_from {
        ("raw", "worker_metrics", "at")
    } else {
        ("rollup", "worker_metrics_rollup", "bucket_start")
    };
    let (filter, worker, deployment) = match scope {
        Scope::Worker(id) => ("worker_id = $4", Some(id), None),
        Scope::Deployment(id) => ("deployment_id = $5", None, Some(id)),
    };
    // Per worker and bucket first (so a worker with more samples does not weigh more), then
    // across workers: sums for rates and sizes, mean of p50s, worst p99.
    let sql = format!(
        "WITH per_worker AS (
             SELECT date_bin(make_interval(secs => $3), {at}, timestamptz '2000-01-01 00:00:00+00') AS b,
                    worker_id, avg(request_rate) rr, avg(ttft_p50_ms) t50, max(ttft_p99_ms) t99,
                    avg(itl_p50_ms) i50, max(itl_p99_ms) i99, avg(tokens_per_s) tps,
                    avg(kv_blocks_used) used, avg(kv_blocks_total) total,
                    avg(prefix_hit_rate) hit, avg(gpu_utilization) util
             FROM {table}
             WHERE {at} >= $1 AND {at} < $2 AND ($4::bigint IS NULL OR true) AND ($5::uuid IS NULL OR true)
               AND {filter}
             GROUP BY 1, 2)
         SELECT b, sum(rr)::float8, avg(t50)::float8, max(t99)::float8, avg(i50)::float8,
                max(i99)::float8, sum(tps)::float8, sum(used)::float8, sum(total)::float8,
                avg(hit)::float8, avg(util)::float8, count(*)
         FROM per_worker GROUP BY b ORDER BY b"
    );
    type Row = (
        DateTime<Utc>,
        f64,
        Option<f64>,
        Option<f64>,
        Option<f64>,
        Option<f64>,
        f64,
        f64,
        f64,
        Option<f64>,
        Option<f64>,
        i64,
    );
    let rows: Vec<Row> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(since)
        .bind(until)
        .bind(step_s as f64)
        .bind(worker)
        .bind(deployment)
        .fetch_all(pool)
        .await?;
    Ok(MetricsSeries {
        source: source.to_owned(),
        step_s,
        points: rows
            .into_iter()
            .map(|r| MetricsPoint {
                at: r.0,
                request_rate: r.1,
                ttft_p50_ms: r.2,
                ttft_p99_ms: r.3,
                itl_p50_ms: r.4,
                itl_p99_ms: r.5,
                tokens_per_s: r.6,
                kv_blocks_used: r.7,
                kv_blocks_total: r.8,
                prefix_hit_rate: r.9,
                gpu_utilization: r.10,
                workers: r.11,
            })
            .collect(),
    })
}
