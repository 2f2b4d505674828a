//! The KV index authority: agents upload their workers' KV events, the control plane applies
//! them to one fleet-wide index, persists them in Postgres and streams them, numbered, to every
//! agent's router.
//!
//! What it owns: the in-memory index (a [`kvfleet_kv_router::Router`] used only as the block
//! index with per-worker event positions), the engine incarnation (`epoch`) of every worker,
//! the retained tail of the stream, and the `kv_log` and `kv_checkpoints` tables. Its routes
//! (`POST /agent/kv-events`, `GET /agent/kv-stream`, `GET /agent/kv-snapshot`, and
//! `GET /kv/stats` for operators) are in `api/kv.rs`. Wire types are in
//! [`kvfleet_proto::kv_stream`]. It does not route anything or know about models.
//!
//! # Order, persistence, replicas
//!
//! Postgres is the order. `kv_log` holds one row per applied change, keyed by its global
//! sequence number. An upload takes a transaction-scoped advisory lock ([`KV_LOCK_KEY`]), brings
//! this replica's index up to the log's head (rows other replicas wrote), validates the batch
//! against that index, inserts the accepted changes with the next sequence numbers in one
//! `INSERT ... SELECT FROM UNNEST(...)` statement, commits, and only then applies them in memory.
//! So sequence numbers are allocated and committed in the same order, every replica applies the
//! same changes in the same order, and a failed commit leaves memory untouched. Commits are
//! durable (`synchronous_commit` stays on): a change that was streamed must never be reused by a
//! different change after a database crash.
//!
//! Every replica rebuilds its index at start from the newest checkpoint plus the log rows after
//! it, then tails the log every `poll_interval` (an agent's stream may be served by any replica;
//! it lags the writing replica by at most that interval). The leader writes a checkpoint (the
//! serialized index at sequence S) every `checkpoint_interval` and prunes log rows older than
//! `S - stream_retention`; a replica that falls behind the pruned log rebuilds from the
//! checkpoint. Simple and correct rather than clever: ingest is serialized fleet-wide, which
//! bounds throughput to what one lock holder can commit (see docs/benchmarks.md).
//!
//! # Validation
//!
//! Per event, against the worker's position after everything applied before it (earlier
//! events of the same batch included): a worker that is not a live worker of the uploading node
//! (unknown, another node's, stopped, or its node lost/removed) → rejected; an id below the next
//! expected one → ignored as a duplicate (the one just before) or out of order (older), so
//! retrying a batch is idempotent; an id above it → applied and counted as a gap; a `Stored`
//! whose blocks do not chain → rejected; an epoch older than the worker's → ignored. Everything is
//! counted ([`KvCounters`], `GET /api/v1/kv/stats`) and answered per batch. KV events are
//! observations, like heartbeats: they write no audit rows.
//!
//! # Live loads
//!
//! Uploads also carry the node's workers' live loads (in-flight prefill tokens, decode blocks,
//! queue depth), every half second or so with or without events. They are validated like
//! events (a worker that is not a live worker of the uploading node → rejected and counted),
//! but they are not changes: no sequence number, no Postgres, no snapshot. Each replica keeps
//! the latest report per worker in memory, numbered by a per-replica load version, and every
//! stream page carries the reports newer than the version the follower last saw. A long poll
//! with nothing else to say returns for new loads, but no sooner than `load_page_interval`
//! after it arrived, so a follower reads loads at most a few times a second however many
//! agents report. A report older than `load_ttl` is no longer served (its agent is gone or cut
//! off), and a removed worker's report goes with it. An upload that carries only loads (and
//! epochs the index already has) takes no lock and no transaction: one `SELECT` of the live
//! workers. Loads go to the replica the agent uploads to: with several replicas behind a
//! balancer, a follower sees only the loads its own replica received.
//!
//! # Lost nodes
//!
//! The leader sweeps every `sweep_interval`: workers in the index that are no longer live
//! (node lost or removed, worker stopped or deleted) get a `worker_removed` change, so their
//! blocks leave the index, the snapshot and every router that follows the stream. A synthetic
//! `Cleared` event would not do: its event id would collide with the engine's own numbering.

//!
//! # Layout
//!
//! [`memory`] is the pure part (the index, the retained stream, loads, validation, counters);
//! this module is its IO: the Postgres log and checkpoints, the watch channels that wake long
//! polls, and the background loop. The HTTP handlers are in `api/kv.rs`.

mod memory;

use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use kvfleet_proto::WorkerId;
use kvfleet_proto::kv_stream::{
    KvEventBatch, KvEventBatchResult, KvSnapshot, KvStreamItem, KvStreamPage,
};
use sqlx::{PgConnection, PgPool};
use tokio::sync::watch;
use uuid::Uuid;

pub use memory::{Core, KvCounters, KvIndexStats, SeqHole};

use crate::AppState;
use crate::store::sleep_or_shutdown;
use crate::telemetry::{Registry, Scrape, collector};

/// Why a KV index operation failed.
#[derive(Debug, thiserror::Error)]
pub enum KvIndexError {
    /// The database refused or could not be reached.
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    /// A sequence number, id or body the index cannot represent (a bug, not input).
    #[error("{0}")]
    Internal(String),
}

/// Transaction lock around every write to `kv_log` ("kvfleet" + 4).
pub const KV_LOCK_KEY: i64 = 0x6b76_666c_6565_7404;

/// How many log rows one catch-up query reads.
const CATCH_UP_ROWS: i64 = 10_000;

/// Tuning of the index; the defaults suit a fleet of hundreds of workers.
#[derive(Debug, Clone, PartialEq)]
pub struct KvIndexConfig {
    /// Changes kept in memory (and at least this many kept in Postgres behind the latest
    /// checkpoint) for routers to catch up from; a router further behind re-syncs.
    pub stream_retention: usize,
    /// How often each replica reads log rows that other replicas wrote.
    pub poll_interval: Duration,
    /// How often the leader looks for workers that are no longer live.
    pub sweep_interval: Duration,
    /// How often the leader writes a checkpoint (when something changed since the last one).
    pub checkpoint_interval: Duration,
    /// The longest a stream long poll is held open.
    pub max_wait: Duration,
    /// A long poll woken only by new loads returns no sooner than this after it arrived.
    pub load_page_interval: Duration,
    /// A worker's load report is served this long after it was measured, and no longer.
    pub load_ttl: Duration,
}

impl Default for KvIndexConfig {
    fn default() -> Self {
        Self {
            stream_retention: 100_000,
            poll_interval: Duration::from_millis(200),
            sweep_interval: Duration::from_secs(1),
            checkpoint_interval: Duration::from_secs(60),
            max_wait: Duration::from_secs(30),
            load_page_interval: Duration::from_millis(250),
            load_ttl: Duration::from_secs(5),
        }
    }
}

/// One replica's index, shared by its handlers and background loop.
#[derive(Debug)]
pub struct KvIndex {
    config: KvIndexConfig,
    core: Arc<Mutex<Core>>,
    head: watch::Sender<u64>,
    /// The load version, bumped by every upload that brought loads.
    loads: watch::Sender<u64>,
    /// The clock load reports are dated on.
    origin: Instant,
}

fn db_i64(value: u64, what: &str) -> Result<i64, KvIndexError> {
    i64::try_from(value)
        .map_err(|_| KvIndexError::Internal(format!("{what} {value} exceeds bigint")))
}

impl KvIndex {
    /// Rebuilds the index from Postgres: the newest checkpoint, then every log row after it.
    pub async fn load(pool: &PgPool, config: KvIndexConfig) -> anyhow::Result<Self> {
        let mut conn = pool.acquire().await?;
        let core = load_checkpoint(&mut conn, config.stream_retention).await?;
        let index = KvIndex {
            head: watch::channel(core.seq()).0,
            loads: watch::channel(0).0,
            origin: Instant::now(),
            core: Arc::new(Mutex::new(core)),
            config,
        };
        index
            .catch_up(&mut conn)
            .await
            .map_err(|e| anyhow::anyhow!("replaying kv_log: {e}"))?;
        Ok(index)
    }

    /// Registers this index's counters and sizes (read from it at each scrape) as
    /// `kvfleet_cp_kv_*`.
    pub fn register_metrics(&self, registry: &mut Registry) {
        let core = Arc::clone(&self.core);
        registry.register_collector(collector("kv_index", move |s| {
            let stats = core.lock().unwrap_or_else(PoisonError::into_inner).stats();
            encode_stats(s, &stats)
        }));
    }

    /// The configuration it runs with.
    pub fn config(&self) -> &KvIndexConfig {
        &self.config
    }

    fn core(&self) -> MutexGuard<'_, Core> {
        // A panic while holding the lock cannot leave the core half-updated in a way that
        // matters more than stopping the service would; keep serving.
        self.core.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The last sequence number applied here.
    pub fn head(&self) -> u64 {
        self.core().seq()
    }

    /// The whole index as of [`KvIndex::head`].
    pub fn snapshot(&self) -> KvSnapshot {
        self.core().snapshot()
    }

    /// Sizes and counters.
    pub fn stats(&self) -> KvIndexStats {
        self.core().stats()
    }

    /// Blocks per tier of every worker in the index.
    pub fn worker_blocks(&self) -> Vec<kvfleet_proto::kv_stream::KvWorkerBlocks> {
        self.core().worker_blocks()
    }

    /// Items after `after` (see [`Core::page`]) and the loads reported since load version
    /// `loads_after` (see [`Core::loads_since`]).
    pub fn page(&self, after: u64, loads_after: u64, limit: usize) -> KvStreamPage {
        let now = self.origin.elapsed();
        let core = self.core();
        let mut page = core.page(after, limit);
        if !page.resync {
            (page.loads, page.loads_version) =
                core.loads_since(loads_after, now, self.config.load_ttl);
        }
        page
    }

    /// The page after `after` (see [`KvIndex::page`]), waiting up to `wait` (capped by
    /// `max_wait`) when there is nothing newer: a new change ends the wait at once, new loads
    /// alone end it `load_page_interval` after the poll arrived, and so does `stopping`
    /// turning true (the replica is shutting down).
    pub async fn next_page(
        &self,
        after: u64,
        loads_after: u64,
        limit: usize,
        wait: Duration,
        mut stopping: watch::Receiver<bool>,
    ) -> KvStreamPage {
        // Subscribe before reading, so a change between the read and the wait is not missed.
        let mut head = self.head.subscribe();
        let mut loads = self.loads.subscribe();
        let arrived = tokio::time::Instant::now();
        let page = self.page(after, loads_after, limit);
        let wait = wait.min(self.config.max_wait);
        if !page.items.is_empty() || page.resync || wait.is_zero() {
            return page;
        }
        let deadline = arrived + wait;
        // New loads end the poll, but not before `load_page_interval` after it arrived: a follower
        // polls again at once, so this caps how often loads alone make it read a page.
        let loads_due = |now: tokio::time::Instant| {
            (arrived + self.config.load_page_interval)
                .max(now)
                .min(deadline)
        };
        let mut due = (!page.loads.is_empty()).then(|| loads_due(arrived));
        loop {
            if *stopping.borrow_and_update() {
                break;
            }
            let until = due.unwrap_or(deadline);
            tokio::select! {
                changed = tokio::time::timeout_at(until, head.changed()) => match changed {
                    Ok(Ok(())) if *head.borrow_and_update() > after => break,
                    Ok(Ok(())) => continue,
                    Ok(Err(_)) | Err(_) => break,
                },
                changed = loads.changed(), if due.is_none() => match changed {
                    Ok(()) => due = Some(loads_due(tokio::time::Instant::now())),
                    Err(_) => break,
                },
                _ = stopping.changed() => break,
            }
        }
        self.page(after, loads_after, limit)
    }

    fn apply_all(&self, rows: Vec<(u64, KvStreamItem)>) -> Result<(), SeqHole> {
        let head = {
            let mut core = self.core();
            for (seq, item) in rows {
                core.apply(seq, item)?;
            }
            core.seq()
        };
        self.head.send_if_modified(|h| {
            let changed = *h != head;
            *h = head;
            changed
        });
        Ok(())
    }

    /// Applies the log rows this replica has not seen yet. A hole (rows pruned past this
    /// replica's position) rebuilds the index from the newest checkpoint.
    pub async fn catch_up(&self, conn: &mut PgConnection) -> Result<(), KvIndexError> {
        let mut rebuilt = false;
        loop {
            let after = db_i64(self.head(), "sequence number")?;
            let rows: Vec<(i64, sqlx::types::Json<KvStreamItem>)> =
                sqlx::query_as("SELECT seq, item FROM kv_log WHERE seq > $1 ORDER BY seq LIMIT $2")
                    .bind(after)
                    .bind(CATCH_UP_ROWS)
                    .fetch_all(&mut *conn)
                    .await?;
            let count = rows.len();
            let rows = rows
                .into_iter()
                .map(|(seq, item)| (seq as u64, item.0))
                .collect();
            match self.apply_all(rows) {
                Ok(()) => {}
                Err(hole) if !rebuilt => {
                    tracing::warn!(%hole, "this replica fell behind the pruned KV log; rebuilding from the checkpoint");
                    let core = load_checkpoint(conn, self.config.stream_retention)
                        .await
                        .map_err(|e| {
                            KvIndexError::Internal(format!("loading the KV checkpoint: {e}"))
                        })?;
                    let mut core = core;
                    core.keep_replica_state(&mut self.core());
                    *self.core() = core;
                    rebuilt = true;
                    continue;
                }
                Err(hole) => return Err(KvIndexError::Internal(hole.to_string())),
            }
            if (count as i64) < CATCH_UP_ROWS {
                return Ok(());
            }
        }
    }

    /// Logs and applies `items` under the fleet-wide KV lock (catching up first), with the
    /// per-batch answer computed against the caught-up index by `plan`.
    async fn write<F>(&self, pool: &PgPool, plan: F) -> Result<KvEventBatchResult, KvIndexError>
    where
        F: FnOnce(&Core) -> (Vec<KvStreamItem>, KvEventBatchResult),
    {
        let mut tx = pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(KV_LOCK_KEY)
            .execute(&mut *tx)
            .await?;
        self.catch_up(&mut tx).await?;
        let (start, items, mut result) = {
            let core = self.core();
            let (items, result) = plan(&core);
            (core.seq() + 1, items, result)
        };
        if !items.is_empty() {
            let mut seqs = Vec::with_capacity(items.len());
            let mut workers = Vec::with_capacity(items.len());
            let mut bodies = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                seqs.push(db_i64(start + i as u64, "sequence number")?);
                workers.push(db_i64(item.worker().0, "worker id")?);
                bodies.push(
                    serde_json::to_string(item)
                        .map_err(|e| KvIndexError::Internal(e.to_string()))?,
                );
            }
            // One statement per batch, however many events it carries.
            sqlx::query(
                "INSERT INTO kv_log (seq, worker, item)
                 SELECT u.seq, u.worker, u.item::jsonb
                 FROM UNNEST($1::bigint[], $2::bigint[], $3::text[]) AS u(seq, worker, item)",
            )
            .bind(&seqs)
            .bind(&workers)
            .bind(&bodies)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        let rows: Vec<(u64, KvStreamItem)> = items
            .iter()
            .cloned()
            .enumerate()
            .map(|(i, item)| (start + i as u64, item))
            .collect();
        // Rows another path already applied (the poller, the next upload) are skipped.
        if let Err(hole) = self.apply_all(rows) {
            return Err(KvIndexError::Internal(hole.to_string()));
        }
        {
            let mut core = self.core();
            core.count(&result, &items);
            result.head_seq = core.seq();
        }
        Ok(result)
    }

    /// Takes one node's batch: validates, logs, applies. See the module docs.
    pub async fn ingest(
        &self,
        pool: &PgPool,
        node: Uuid,
        batch: &KvEventBatch,
    ) -> Result<KvEventBatchResult, KvIndexError> {
        let mut ids: Vec<i64> = Vec::new();
        for worker in batch
            .events
            .iter()
            .map(|e| e.worker)
            .chain(batch.epochs.iter().map(|e| e.worker))
            .chain(batch.loads.iter().map(|l| l.worker))
        {
            // Ids beyond bigint cannot name a worker row: they stay out of `live`.
            if let Ok(id) = i64::try_from(worker.0) {
                ids.push(id);
            }
        }
        ids.sort_unstable();
        ids.dedup();
        let live: HashSet<WorkerId> = live_workers(pool, &ids, Some(node))
            .await?
            .into_iter()
            .collect();
        // Loads only (epochs the index already has): nothing to log, so no lock and no
        // transaction. An epoch this replica has not applied yet plans a reset and takes the
        // write path below, which catches up first.
        let quiet = batch.events.is_empty() && {
            let core = self.core();
            let (items, _) = core.plan(batch, &live);
            items.is_empty()
        };
        let mut result = if quiet {
            let mut core = self.core();
            core.count_quiet_batch();
            KvEventBatchResult {
                head_seq: core.seq(),
                ..KvEventBatchResult::default()
            }
        } else {
            self.write(pool, |core| core.plan(batch, &live)).await?
        };
        if !batch.loads.is_empty() {
            let now = self.origin.elapsed();
            let (taken, rejected, unknown) = {
                let mut core = self.core();
                core.take_loads(&batch.loads, &live, now, self.config.load_ttl)
            };
            result.loads_applied = taken;
            result.loads_rejected = rejected;
            result.unknown_workers.extend(unknown);
            result.unknown_workers.sort_unstable();
            result.unknown_workers.dedup();
            if taken > 0 {
                self.loads.send_modify(|v| *v = v.wrapping_add(1));
            }
        }
        Ok(result)
    }

    /// Removes workers that are no longer live from the index (the leader's sweep). Returns how
    /// many were removed.
    pub async fn sweep(&self, pool: &PgPool) -> Result<usize, KvIndexError> {
        let indexed = self.core().workers();
        if indexed.is_empty() {
            return Ok(0);
        }
        let ids: Vec<i64> = indexed
            .iter()
            .filter_map(|w| i64::try_from(w.0).ok())
            .collect();
        let live: HashSet<WorkerId> = live_workers(pool, &ids, None).await?.into_iter().collect();
        let dead: Vec<WorkerId> = indexed.into_iter().filter(|w| !live.contains(w)).collect();
        if dead.is_empty() {
            return Ok(0);
        }
        let mut removed = 0;
        self.write(pool, |core| {
            let items = core.plan_removals(&dead);
            removed = items.len();
            (items, KvEventBatchResult::default())
        })
        .await?;
        if removed > 0 {
            tracing::info!(
                removed,
                "removed workers that are no longer live from the KV index"
            );
        }
        Ok(removed)
    }

    /// Writes a checkpoint of the index and prunes the log behind it. Returns its sequence
    /// number, or `None` when nothing changed since `last`.
    pub async fn checkpoint(
        &self,
        pool: &PgPool,
        last: Option<u64>,
    ) -> Result<Option<u64>, KvIndexError> {
        let snapshot = self.snapshot();
        if last == Some(snapshot.seq) {
            return Ok(None);
        }
        let seq = db_i64(snapshot.seq, "sequence number")?;
        let body =
            serde_json::to_vec(&snapshot).map_err(|e| KvIndexError::Internal(e.to_string()))?;
        let keep = db_i64(self.config.stream_retention as u64, "retention")?;
        let mut tx = pool.begin().await?;
        sqlx::query(
            "INSERT INTO kv_checkpoints (seq, snapshot) VALUES ($1, $2) ON CONFLICT (seq) DO NOTHING",
        )
        .bind(seq)
        .bind(&body)
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM kv_checkpoints WHERE seq < $1")
            .bind(seq)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM kv_log WHERE seq <= $1 - $2")
            .bind(seq)
            .bind(keep)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Some(snapshot.seq))
    }
}

async fn load_checkpoint(conn: &mut PgConnection, retention: usize) -> anyhow::Result<Core> {
    let row: Option<(i64, Vec<u8>)> =
        sqlx::query_as("SELECT seq, snapshot FROM kv_checkpoints ORDER BY seq DESC LIMIT 1")
            .fetch_optional(&mut *conn)
            .await?;
    Ok(match row {
        None => Core::new(retention),
        Some((seq, body)) => {
            let snapshot: KvSnapshot = serde_json::from_slice(&body)
                .map_err(|e| anyhow::anyhow!("kv_checkpoints row {seq} does not parse: {e}"))?;
            Core::from_snapshot(&snapshot, retention)
        }
    })
}

/// Which of `ids` are live workers (not stopped, node neither lost nor removed), of `node` only
/// when given.
async fn live_workers(
    pool: &PgPool,
    ids: &[i64],
    node: Option<Uuid>,
) -> Result<Vec<WorkerId>, KvIndexError> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let rows: Vec<i64> = sqlx::query_scalar(
        "SELECT w.id FROM workers w JOIN nodes n ON n.id = w.node_id
         WHERE w.id = ANY($1) AND ($2::uuid IS NULL OR w.node_id = $2)
           AND w.desired_state <> 'stopped' AND n.state NOT IN ('lost', 'removed')",
    )
    .bind(ids)
    .bind(node)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(|id| WorkerId(id as u64)).collect())
}

/// Each replica: tail the log; the leader also sweeps dead workers and writes checkpoints.
pub async fn run(state: AppState, mut shutdown: watch::Receiver<bool>) {
    let index = &state.kv;
    let config = index.config().clone();
    let mut last_sweep = tokio::time::Instant::now();
    let mut last_checkpoint = tokio::time::Instant::now();
    let mut checkpointed: Option<u64> = None;
    // The index was rebuilt from Postgres when the state was built, so the first read of the
    // log is due one interval from now, not at once.
    loop {
        if sleep_or_shutdown(config.poll_interval, &mut shutdown).await {
            return;
        }
        match state.pool.acquire().await {
            Ok(mut conn) => {
                if let Err(error) = index.catch_up(&mut conn).await {
                    tracing::warn!(%error, "reading the KV log failed");
                    state.db.count("kv_index");
                }
            }
            Err(error) => {
                tracing::warn!(%error, "reading the KV log: no connection");
                state.db.count("kv_index");
            }
        }
        let now = tokio::time::Instant::now();
        if state.is_leader() && now.duration_since(last_sweep) >= config.sweep_interval {
            last_sweep = now;
            if let Err(error) = index.sweep(&state.pool).await {
                tracing::warn!(%error, "KV index sweep failed");
                state.db.count("kv_index");
            }
        }
        if state.is_leader() && now.duration_since(last_checkpoint) >= config.checkpoint_interval {
            last_checkpoint = now;
            match index.checkpoint(&state.pool, checkpointed).await {
                Ok(Some(seq)) => checkpointed = Some(seq),
                Ok(None) => {}
                Err(error) => {
                    tracing::warn!(%error, "KV checkpoint failed");
                    state.db.count("kv_index");
                }
            }
        }
    }
}

/// The index's counters and sizes as `kvfleet_cp_kv_*` families.
fn encode_stats(s: &mut Scrape<'_>, stats: &KvIndexStats) -> std::fmt::Result {
    let c = &stats.counters;
    s.counter(
        "kvfleet_cp_kv_batches",
        "KV event and load uploads this replica took, and the leader's sweeps",
        c.batches,
    )?;
    s.counters(
        "kvfleet_cp_kv_events",
        "KV events by outcome: applied (logged and indexed), duplicate and out_of_order \
         (redelivered, ignored), unknown_worker and broken_chain (rejected), stale_epoch (from \
         an older engine incarnation, ignored)",
        [
            ("applied", c.applied),
            ("duplicate", c.duplicate),
            ("out_of_order", c.out_of_order),
            ("unknown_worker", c.unknown_worker),
            ("broken_chain", c.broken_chain),
            ("stale_epoch", c.stale_epoch),
        ]
        .map(|(outcome, n)| ([("outcome", outcome)], n)),
    )?;
    s.counter(
        "kvfleet_cp_kv_event_gaps",
        "Applied KV events whose id skipped ahead of the worker's next expected id (events \
         lost between the engine and the control plane)",
        c.gaps,
    )?;
    s.counter(
        "kvfleet_cp_kv_worker_resets",
        "Engine restarts (new epochs) applied to the index",
        c.resets,
    )?;
    s.counter(
        "kvfleet_cp_kv_workers_removed",
        "Workers removed from the index by the leader's sweep (node lost or removed, worker \
         stopped)",
        c.removed,
    )?;
    s.counters(
        "kvfleet_cp_kv_load_reports",
        "Worker load reports by outcome: received, or rejected (not a live worker of the \
         uploading node)",
        [
            ([("outcome", "received")], c.loads_received),
            ([("outcome", "rejected")], c.loads_rejected),
        ],
    )?;
    let gauges: [(&str, &str, u64); 5] = [
        (
            "kvfleet_cp_kv_head_seq",
            "The newest KV stream sequence number this replica applied",
            stats.head_seq,
        ),
        (
            "kvfleet_cp_kv_oldest_seq",
            "The oldest sequence number a router can still continue the stream from",
            stats.oldest_seq,
        ),
        (
            "kvfleet_cp_kv_index_workers",
            "Workers in the fleet-wide KV index",
            stats.workers as u64,
        ),
        (
            "kvfleet_cp_kv_index_blocks",
            "Distinct KV blocks in the fleet-wide index",
            stats.blocks,
        ),
        (
            "kvfleet_cp_kv_loads_held",
            "Workers with a current load report on this replica",
            stats.loads as u64,
        ),
    ];
    for (name, help, value) in gauges {
        s.gauge(name, help, value)?;
    }
    Ok(())
}
