//! Heartbeat windows: what each worker served since its previous heartbeat
//! ([`WorkerWindow`]: sums and mergeable histograms), kept per deployment and role in
//! `worker_windows` until the planner folds one interval of them into an [`Observation`].
//!
//! Any replica may receive a heartbeat; only the leader plans. The windows therefore go to
//! Postgres, stamped with the receiving replica's clock, and the leader reads back those of
//! `(previous round, this round]`. A window is counted in the interval in which it arrived.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use kvfleet_planner::Observation;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::rows;
use kvfleet_proto::api::{ObservedWorker, WorkerRole, WorkerWindow};

/// Stores the windows of one heartbeat; workers that are not on `node` are ignored.
pub async fn record(
    conn: &mut PgConnection,
    node: Uuid,
    workers: &[ObservedWorker],
) -> Result<u64, sqlx::Error> {
    let (ids, windows): (Vec<i64>, Vec<serde_json::Value>) = workers
        .iter()
        .filter_map(|w| {
            let win = w.window.as_ref()?;
            Some((w.worker_id, serde_json::to_value(win).ok()?))
        })
        .unzip();
    if ids.is_empty() {
        return Ok(0);
    }
    let result = sqlx::query(
        "INSERT INTO worker_windows (worker_id, deployment_id, role, at, win)
         SELECT w.id, w.deployment_id, w.role, now(), s.win
         FROM UNNEST($2::bigint[], $3::jsonb[]) AS s(id, win)
         JOIN workers w ON w.id = s.id AND w.node_id = $1",
    )
    .bind(node)
    .bind(&ids)
    .bind(&windows)
    .execute(conn)
    .await?;
    Ok(result.rows_affected())
}

/// Seconds since the Unix epoch, as the planner's time.
pub fn since_epoch(at: DateTime<Utc>) -> Duration {
    Duration::try_from_secs_f64(at.timestamp_micros() as f64 / 1e6).unwrap_or_default()
}

/// One window, decoded, with its worker and role.
struct Row {
    worker: i64,
    role: WorkerRole,
    window: WorkerWindow,
}

/// Folds windows into one observation of `(from, to]`: sums and histograms add up; the state
/// at the end (queue, pending prefill, KV use) is each worker's last window's; the workers
/// that served are those that sent a window.
fn fold(rows: &[Row], from: DateTime<Utc>, to: DateTime<Utc>) -> Observation {
    let end = since_epoch(to);
    let mut obs = Observation {
        end,
        length: end.saturating_sub(since_epoch(from)),
        ..Observation::default()
    };
    let mut last: BTreeMap<i64, (WorkerRole, &WorkerWindow)> = BTreeMap::new();
    for r in rows {
        let w = &r.window;
        obs.requests += w.requests;
        obs.prompt_tokens += w.prompt_tokens;
        obs.cached_tokens += w.cached_tokens;
        obs.finished += w.finished;
        obs.output_tokens += w.output_tokens;
        obs.ttft.merge(&w.ttft);
        obs.itl.merge(&w.itl);
        last.insert(r.worker, (r.role, w));
    }
    for (role, w) in last.values() {
        obs.queue_depth += w.queue_depth;
        obs.pending_prefill_tokens += w.pending_prefill_tokens;
        *obs.kv_blocks_used.get_mut(*role) += w.kv_blocks_used;
        *obs.kv_blocks_total.get_mut(*role) += w.kv_blocks_total;
        *obs.workers.get_mut(*role) += 1;
    }
    obs
}

/// The observation of `deployment` over `(from, to]`. Windows that do not decode (written by
/// a newer agent, say) are skipped with a warning, never an error.
pub async fn observation(
    conn: &mut PgConnection,
    deployment: Uuid,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Result<Observation, sqlx::Error> {
    let raw: Vec<(i64, String, serde_json::Value)> = sqlx::query_as(
        "SELECT worker_id, role, win FROM worker_windows
         WHERE deployment_id = $1 AND at > $2 AND at <= $3 ORDER BY at",
    )
    .bind(deployment)
    .bind(from)
    .bind(to)
    .fetch_all(conn)
    .await?;
    let mut decoded = Vec::with_capacity(raw.len());
    for (worker, role, win) in raw {
        match serde_json::from_value::<WorkerWindow>(win) {
            Ok(window) => decoded.push(Row {
                worker,
                role: rows::parse(&role)?,
                window,
            }),
            Err(error) => {
                tracing::warn!(worker, %error, "skipping a heartbeat window that does not decode")
            }
        }
    }
    Ok(fold(&decoded, from, to))
}

/// Deletes windows older than `keep`.
pub async fn expire(conn: &mut PgConnection, keep: Duration) -> Result<u64, sqlx::Error> {
    Ok(
        sqlx::query("DELETE FROM worker_windows WHERE at < now() - make_interval(secs => $1)")
            .bind(keep.as_secs_f64())
            .execute(conn)
            .await?
            .rows_affected(),
    )
}

#[cfg(test)]
mod tests {
    use kvfleet_proto::histogram::LatencyHistogram;

    use super::*;

    fn window(requests: u64, ttft_s: f64, kv_used: u64) -> WorkerWindow {
        let mut ttft = LatencyHistogram::default();
        for _ in 0..requests {
            ttft.observe_seconds(ttft_s);
        }
        WorkerWindow {
            seconds: 2.0,
            requests,
            prompt_tokens: requests * 1000,
            cached_tokens: requests * 250,
            finished: requests,
            output_tokens: requests * 100,
            ttft,
            itl: LatencyHistogram::default(),
            queue_depth: 1,
            pending_prefill_tokens: 500,
            kv_blocks_used: kv_used,
            kv_blocks_total: 1000,
        }
    }

    #[test]
    fn windows_fold_into_one_observation() {
        let rows = [
            Row {
                worker: 1,
                role: WorkerRole::Prefill,
                window: window(10, 0.2, 100),
            },
            Row {
                worker: 2,
                role: WorkerRole::Decode,
                window: window(5, 0.4, 300),
            },
            Row {
                worker: 1,
                role: WorkerRole::Prefill,
                window: window(10, 0.2, 200),
            },
        ];
        let from = DateTime::from_timestamp(1_000, 0).unwrap();
        let to = DateTime::from_timestamp(1_030, 0).unwrap();
        let obs = fold(&rows, from, to);
        assert_eq!(obs.length, Duration::from_secs(30));
        assert_eq!(obs.requests, 25);
        assert_eq!(obs.ttft.count(), 25);
        assert_eq!(obs.prefix_hit_rate(), Some(0.25));
        // End state: each worker's last window.
        assert_eq!(obs.kv_blocks_used.prefill, 200);
        assert_eq!(obs.kv_blocks_used.decode, 300);
        assert_eq!(obs.queue_depth, 2);
        assert_eq!((obs.workers.prefill, obs.workers.decode), (1, 1));
        assert!((obs.request_rate() - 25.0 / 30.0).abs() < 1e-9);
    }
}
