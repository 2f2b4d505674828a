//! The KV index authority: agents upload their workers' KV events, the control plane applies
//! them to one fleet-wide index, persists them in Postgres and streams them, numbered, to every
//! agent's router.
//!
//! What it owns: the in-memory index (a [`kvfleet_kv_router::Router`] used only as the block
//! index with per-worker event positions), the engine incarnation (`epoch`) of every worker,
//! the retained tail of the stream, the `kv_log` and `kv_checkpoints` tables, and the three
//! agent routes (`POST /agent/kv-events`, `GET /agent/kv-stream`, `GET /agent/kv-snapshot`) plus
//! `GET /kv/stats` for operators. Wire types are in [`kvfleet_proto::kv_stream`]. It does not
//! route anything or know about models.
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

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::State;
use kvfleet_kv_router::{Router, RouterConfig, WorkerCapacity};
use kvfleet_proto::hash::chain;
use kvfleet_proto::kv_stream::{
    KvEventBatch, KvEventBatchResult, KvSnapshot, KvStreamItem, KvStreamPage, KvStreamQuery,
    KvTierBlocks, KvWorkerSnapshot, MAX_BATCH_EVENTS, MAX_BATCH_LOADS, MAX_PAGE_BLOCKS,
    MAX_STREAM_PAGE, SequencedItem, WorkerLoadReport,
};
use kvfleet_proto::{KvEventData, WorkerId};
use serde::{Deserialize, Serialize};
use sqlx::{PgConnection, PgPool};
use tokio::sync::watch;
use uuid::Uuid;

use crate::AppState;
use crate::api::extract::{Agent, ApiJson, ApiQuery, Caller, Read};
use crate::api::problem::ApiError;
use crate::store::sleep_or_shutdown;

/// Transaction lock around every write to `kv_log` ("kvfleet" + 4).
pub const KV_LOCK_KEY: i64 = 0x6b76_666c_6565_7404;

/// Upload bodies may be this large (a batch of long prompts' blocks is bigger than the API's
/// default body limit).
pub const MAX_UPLOAD_BYTES: usize = 16 << 20;

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

/// Running totals since this replica started (per replica: each counts the uploads it took).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct KvCounters {
    /// Uploads taken.
    pub batches: u64,
    /// Events applied (gaps included).
    pub applied: u64,
    /// Applied events whose id skipped ahead.
    pub gaps: u64,
    /// Redelivered events, ignored.
    pub duplicate: u64,
    /// Stale events, ignored.
    pub out_of_order: u64,
    /// Events from workers that are not live workers of the uploading node, rejected.
    pub unknown_worker: u64,
    /// `Stored` events whose blocks do not chain, rejected.
    pub broken_chain: u64,
    /// Events from an older engine incarnation, ignored.
    pub stale_epoch: u64,
    /// Engine restarts (new epochs) applied.
    pub resets: u64,
    /// Workers removed by the sweep (lost or removed nodes, stopped workers).
    pub removed: u64,
    /// Load reports taken.
    #[serde(default)]
    pub loads_received: u64,
    /// Load reports of workers that are not live workers of the uploading node, rejected.
    #[serde(default)]
    pub loads_rejected: u64,
}

/// `GET /api/v1/kv/stats`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvIndexStats {
    /// The newest sequence number applied by this replica.
    pub head_seq: u64,
    /// The oldest sequence number a stream can still continue from (`after` ≥ this - 1).
    pub oldest_seq: u64,
    /// Workers in the index.
    pub workers: usize,
    /// Distinct blocks in the index.
    pub blocks: u64,
    /// Workers with a current load report on this replica.
    #[serde(default)]
    pub loads: usize,
    /// This replica's counters.
    pub counters: KvCounters,
}

/// A sequence number the in-memory index cannot take: the log skipped ahead of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("kv_log continues at {got} but this replica has applied up to {have}")]
pub struct SeqHole {
    /// The last sequence number applied.
    pub have: u64,
    /// The one that arrived.
    pub got: u64,
}

/// The index and the retained stream, without IO: what one replica knows. Every method is
/// synchronous and cheap enough to run under the [`KvIndex`] mutex.
#[derive(Debug)]
pub struct Core {
    index: Router,
    epochs: HashMap<WorkerId, u64>,
    seq: u64,
    log: VecDeque<SequencedItem>,
    retention: usize,
    counters: KvCounters,
    /// The latest load report per worker (in memory only; see the module docs).
    loads: HashMap<WorkerId, HeldLoad>,
    /// The version of the newest report in `loads`.
    loads_version: u64,
}

/// A load report as a replica holds it.
#[derive(Debug, Clone, Copy)]
struct HeldLoad {
    report: WorkerLoadReport,
    /// When the figures were measured, on the caller's clock (receipt minus the report's age).
    measured: Duration,
    version: u64,
}

/// A worker's position while a batch is validated.
#[derive(Debug, Clone, Copy)]
struct Position {
    epoch: u64,
    next: u64,
    indexed: bool,
    stale: bool,
}

impl Core {
    /// An empty index at sequence 0.
    pub fn new(retention: usize) -> Self {
        Self {
            index: Router::new(index_config()),
            epochs: HashMap::new(),
            seq: 0,
            log: VecDeque::new(),
            retention: retention.max(1),
            counters: KvCounters::default(),
            loads: HashMap::new(),
            loads_version: 0,
        }
    }

    /// The index as of `snapshot.seq`, with no stream retained before it.
    pub fn from_snapshot(snapshot: &KvSnapshot, retention: usize) -> Self {
        let mut core = Core::new(retention);
        let mut restore = kvfleet_kv_router::IndexSnapshot::default();
        for worker in &snapshot.workers {
            // The index has room for 2^27 workers; a checkpoint never names more.
            let _ = core.index.add_worker(worker.worker, unknown_capacity());
            core.epochs.insert(worker.worker, worker.epoch);
            restore.workers.push(kvfleet_kv_router::WorkerSnapshot {
                worker: worker.worker,
                next_event_id: worker.next_event_id,
                tiers: worker
                    .tiers
                    .iter()
                    .map(|t| kvfleet_kv_router::TierBlocks {
                        tier: t.tier,
                        blocks: t.blocks.clone(),
                    })
                    .collect(),
            });
        }
        core.index.restore(&restore);
        core.seq = snapshot.seq;
        core
    }

    /// The last sequence number applied.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// This replica's counters.
    pub fn counters(&self) -> KvCounters {
        self.counters
    }

    fn position(&self, worker: WorkerId) -> Position {
        let next = self.index.next_event_id(worker);
        Position {
            epoch: self.epochs.get(&worker).copied().unwrap_or(0),
            next: next.unwrap_or(0),
            indexed: next.is_some(),
            stale: false,
        }
    }

    /// Validates `batch` from a node whose live workers are `live`: the changes to log (in
    /// order) and the per-batch answer (`head_seq` left 0). Changes nothing.
    pub fn plan(
        &self,
        batch: &KvEventBatch,
        live: &HashSet<WorkerId>,
    ) -> (Vec<KvStreamItem>, KvEventBatchResult) {
        let mut items = Vec::new();
        let mut result = KvEventBatchResult::default();
        let mut positions: HashMap<WorkerId, Position> = HashMap::new();
        let mut unknown = Vec::new();
        for entry in &batch.epochs {
            if !live.contains(&entry.worker) {
                continue;
            }
            let position = positions
                .entry(entry.worker)
                .or_insert_with(|| self.position(entry.worker));
            if entry.epoch > position.epoch || (!position.indexed && entry.epoch != position.epoch)
            {
                items.push(KvStreamItem::WorkerReset {
                    worker: entry.worker,
                    epoch: entry.epoch,
                });
                *position = Position {
                    epoch: entry.epoch,
                    next: 0,
                    indexed: true,
                    stale: false,
                };
            } else if entry.epoch < position.epoch {
                position.stale = true;
            }
        }
        for event in &batch.events {
            if !live.contains(&event.worker) {
                result.unknown_worker += 1;
                unknown.push(event.worker);
                continue;
            }
            let position = positions
                .entry(event.worker)
                .or_insert_with(|| self.position(event.worker));
            if position.stale {
                result.stale_epoch += 1;
                continue;
            }
            if event.event_id < position.next {
                if event.event_id + 1 == position.next {
                    result.duplicate += 1;
                } else {
                    result.out_of_order += 1;
                }
                continue;
            }
            let gap = event.event_id > position.next;
            // Like the router: a rejected event's id still counts as received.
            position.next = event.event_id.saturating_add(1);
            if let KvEventData::Stored { parent, blocks } = &event.data {
                let mut prev = *parent;
                let mut chained = true;
                for block in blocks {
                    if chain(prev, block.local) != block.sequence {
                        chained = false;
                        break;
                    }
                    prev = Some(block.sequence);
                }
                if !chained {
                    result.broken_chain += 1;
                    continue;
                }
            }
            if gap {
                result.gaps += 1;
            }
            position.indexed = true;
            result.applied += 1;
            items.push(KvStreamItem::Event {
                event: event.clone(),
            });
        }
        unknown.sort_unstable();
        unknown.dedup();
        result.unknown_workers = unknown;
        (items, result)
    }

    /// `worker_removed` changes for those of `workers` that the index holds.
    pub fn plan_removals(&self, workers: &[WorkerId]) -> Vec<KvStreamItem> {
        workers
            .iter()
            .filter(|w| self.index.next_event_id(**w).is_some())
            .map(|&worker| KvStreamItem::WorkerRemoved { worker })
            .collect()
    }

    /// Applies the change numbered `seq`. Returns `Ok(false)` for one already applied (another
    /// path got there first) and [`SeqHole`] if `seq` skips ahead.
    pub fn apply(&mut self, seq: u64, item: KvStreamItem) -> Result<bool, SeqHole> {
        if seq <= self.seq {
            return Ok(false);
        }
        if seq != self.seq + 1 {
            return Err(SeqHole {
                have: self.seq,
                got: seq,
            });
        }
        // The index never selects, so its clock never matters.
        let now = Duration::ZERO;
        match &item {
            KvStreamItem::Event { event } => {
                let _ = self.index.add_worker(event.worker, unknown_capacity());
                // Validated before logging; a gap is applied and was counted then.
                let _ = self.index.apply(event, now);
            }
            KvStreamItem::WorkerReset { worker, epoch } => {
                let _ = self.index.add_worker(*worker, unknown_capacity());
                let _ = self.index.reset_worker(*worker);
                self.epochs.insert(*worker, *epoch);
            }
            KvStreamItem::WorkerRemoved { worker } => {
                self.index.remove_worker(*worker);
                self.epochs.remove(worker);
                // A removed worker's load must not steer routers either.
                self.loads.remove(worker);
            }
        }
        self.seq = seq;
        self.log.push_back(SequencedItem { seq, item });
        while self.log.len() > self.retention {
            self.log.pop_front();
        }
        Ok(true)
    }

    fn count(&mut self, result: &KvEventBatchResult, items: &[KvStreamItem]) {
        let c = &mut self.counters;
        c.batches += 1;
        c.applied += u64::from(result.applied);
        c.gaps += u64::from(result.gaps);
        c.duplicate += u64::from(result.duplicate);
        c.out_of_order += u64::from(result.out_of_order);
        c.unknown_worker += u64::from(result.unknown_worker);
        c.broken_chain += u64::from(result.broken_chain);
        c.stale_epoch += u64::from(result.stale_epoch);
        c.resets += items
            .iter()
            .filter(|i| matches!(i, KvStreamItem::WorkerReset { .. }))
            .count() as u64;
    }

    /// Takes `loads` reported at `now` by a node whose live workers are `live`: each accepted
    /// report replaces its worker's previous one under a new load version. Returns how many
    /// were taken, how many rejected, and the rejected workers. Reports older than `ttl` (by
    /// `now`) are dropped on the way, so the map holds only workers that still report.
    pub fn take_loads(
        &mut self,
        loads: &[WorkerLoadReport],
        live: &HashSet<WorkerId>,
        now: Duration,
        ttl: Duration,
    ) -> (u32, u32, Vec<WorkerId>) {
        let (mut taken, mut rejected, mut unknown) = (0u32, 0u32, Vec::new());
        for report in loads {
            if !live.contains(&report.worker) {
                rejected += 1;
                unknown.push(report.worker);
                continue;
            }
            let measured = now.saturating_sub(Duration::from_millis(report.age_ms));
            // A retried upload may bring figures older than ones already held.
            if self
                .loads
                .get(&report.worker)
                .is_some_and(|held| held.measured > measured)
            {
                continue;
            }
            self.loads_version += 1;
            self.loads.insert(
                report.worker,
                HeldLoad {
                    report: WorkerLoadReport {
                        age_ms: 0,
                        ..*report
                    },
                    measured,
                    version: self.loads_version,
                },
            );
            taken += 1;
        }
        self.loads
            .retain(|_, held| now.saturating_sub(held.measured) < ttl);
        self.counters.loads_received += u64::from(taken);
        self.counters.loads_rejected += u64::from(rejected);
        (taken, rejected, unknown)
    }

    /// The load reports newer than version `after` (every current one when `after` is not a
    /// version this replica has issued), no older than `ttl` at `now`, each dated with its age;
    /// and the version to ask with next.
    pub fn loads_since(
        &self,
        after: u64,
        now: Duration,
        ttl: Duration,
    ) -> (Vec<WorkerLoadReport>, u64) {
        let after = if after > self.loads_version { 0 } else { after };
        let mut loads: Vec<WorkerLoadReport> = self
            .loads
            .values()
            .filter(|held| held.version > after)
            .filter_map(|held| {
                let age = now.saturating_sub(held.measured);
                (age < ttl).then(|| WorkerLoadReport {
                    age_ms: u64::try_from(age.as_millis()).unwrap_or(u64::MAX),
                    ..held.report
                })
            })
            .collect();
        loads.sort_unstable_by_key(|l| l.worker);
        (loads, self.loads_version)
    }

    /// The oldest `after` a stream can continue from.
    fn oldest_after(&self) -> u64 {
        self.log.front().map_or(self.seq, |first| first.seq - 1)
    }

    /// Items after `after`, at most `limit`; `resync` when `after` is outside what is retained.
    pub fn page(&self, after: u64, limit: usize) -> KvStreamPage {
        let mut page = KvStreamPage {
            items: Vec::new(),
            next_after: after,
            head_seq: self.seq,
            ..KvStreamPage::default()
        };
        if after > self.seq || after < self.oldest_after() {
            page.resync = true;
            return page;
        }
        let skip = usize::try_from(after - self.oldest_after()).unwrap_or(usize::MAX);
        let mut blocks = 0usize;
        for item in self.log.range(skip.min(self.log.len())..) {
            let size = match &item.item {
                KvStreamItem::Event { event } => event.data.block_count(),
                _ => 0,
            };
            if page.items.len() >= limit.max(1)
                || (!page.items.is_empty() && blocks + size > MAX_PAGE_BLOCKS)
            {
                break;
            }
            blocks += size;
            page.items.push(item.clone());
        }
        if let Some(last) = page.items.last() {
            page.next_after = last.seq;
        }
        page
    }

    /// The whole index as of [`Core::seq`].
    pub fn snapshot(&self) -> KvSnapshot {
        KvSnapshot {
            seq: self.seq,
            workers: self
                .index
                .snapshot()
                .workers
                .into_iter()
                .map(|w| KvWorkerSnapshot {
                    epoch: self.epochs.get(&w.worker).copied().unwrap_or(0),
                    worker: w.worker,
                    next_event_id: w.next_event_id,
                    tiers: w
                        .tiers
                        .into_iter()
                        .map(|t| KvTierBlocks {
                            tier: t.tier,
                            blocks: t.blocks,
                        })
                        .collect(),
                })
                .collect(),
        }
    }

    /// Workers in the index, in id order.
    pub fn workers(&self) -> Vec<WorkerId> {
        self.index.workers().collect()
    }

    /// Sizes and counters.
    pub fn stats(&self) -> KvIndexStats {
        KvIndexStats {
            head_seq: self.seq,
            oldest_seq: self.oldest_after() + 1,
            workers: self.index.workers().len(),
            blocks: self.index.index_stats().blocks,
            loads: self.loads.len(),
            counters: self.counters,
        }
    }
}

fn index_config() -> RouterConfig {
    RouterConfig {
        // Chains are checked in `Core::plan`, before an event is logged.
        verify_chains: false,
        ..RouterConfig::default()
    }
}

fn unknown_capacity() -> WorkerCapacity {
    WorkerCapacity {
        kv_blocks: 0,
        max_queue_depth: None,
    }
}

/// One replica's index, shared by its handlers and background loop.
#[derive(Debug)]
pub struct KvIndex {
    config: KvIndexConfig,
    core: Mutex<Core>,
    head: watch::Sender<u64>,
    /// The load version, bumped by every upload that brought loads.
    loads: watch::Sender<u64>,
    /// The clock load reports are dated on.
    origin: Instant,
}

fn db_i64(value: u64, what: &str) -> Result<i64, ApiError> {
    i64::try_from(value).map_err(|_| ApiError::Internal(format!("{what} {value} exceeds bigint")))
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
            core: Mutex::new(core),
            config,
        };
        index
            .catch_up(&mut conn)
            .await
            .map_err(|e| anyhow::anyhow!("replaying kv_log: {e}"))?;
        Ok(index)
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
    pub async fn catch_up(&self, conn: &mut PgConnection) -> Result<(), ApiError> {
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
                            ApiError::Internal(format!("loading the KV checkpoint: {e}"))
                        })?;
                    let mut core = core;
                    {
                        // Counters and loads are this replica's own, not the log's.
                        let mut old = self.core();
                        core.counters = old.counters;
                        core.loads = std::mem::take(&mut old.loads);
                        core.loads_version = old.loads_version;
                    }
                    *self.core() = core;
                    rebuilt = true;
                    continue;
                }
                Err(hole) => return Err(ApiError::Internal(hole.to_string())),
            }
            if (count as i64) < CATCH_UP_ROWS {
                return Ok(());
            }
        }
    }

    /// Logs and applies `items` under the fleet-wide KV lock (catching up first), with the
    /// per-batch answer computed against the caught-up index by `plan`.
    async fn write<F>(&self, pool: &PgPool, plan: F) -> Result<KvEventBatchResult, ApiError>
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
                    serde_json::to_string(item).map_err(|e| ApiError::Internal(e.to_string()))?,
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
            return Err(ApiError::Internal(hole.to_string()));
        }
        {
            let mut core = self.core();
            core.count(&result, &items);
            let removed = items
                .iter()
                .filter(|i| matches!(i, KvStreamItem::WorkerRemoved { .. }))
                .count() as u64;
            core.counters.removed += removed;
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
    ) -> Result<KvEventBatchResult, ApiError> {
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
            core.counters.batches += 1;
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
    pub async fn sweep(&self, pool: &PgPool) -> Result<usize, ApiError> {
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
    ) -> Result<Option<u64>, ApiError> {
        let snapshot = self.snapshot();
        if last == Some(snapshot.seq) {
            return Ok(None);
        }
        let seq = db_i64(snapshot.seq, "sequence number")?;
        let body = serde_json::to_vec(&snapshot).map_err(|e| ApiError::Internal(e.to_string()))?;
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
) -> Result<Vec<WorkerId>, ApiError> {
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
                }
            }
            Err(error) => tracing::warn!(%error, "reading the KV log: no connection"),
        }
        let now = tokio::time::Instant::now();
        if state.is_leader() && now.duration_since(last_sweep) >= config.sweep_interval {
            last_sweep = now;
            if let Err(error) = index.sweep(&state.pool).await {
                tracing::warn!(%error, "KV index sweep failed");
            }
        }
        if state.is_leader() && now.duration_since(last_checkpoint) >= config.checkpoint_interval {
            last_checkpoint = now;
            match index.checkpoint(&state.pool, checkpointed).await {
                Ok(Some(seq)) => checkpointed = Some(seq),
                Ok(None) => {}
                Err(error) => tracing::warn!(%error, "KV checkpoint failed"),
            }
        }
    }
}

fn node_of(caller: &crate::auth::Principal) -> Result<Uuid, ApiError> {
    caller
        .node_id
        .ok_or_else(|| ApiError::Internal("agent token without a node".into()))
}

/// Upload a batch of the node's workers' KV events and live loads (agent credential). Body:
/// `KvEventBatch` (at most 10,000 events and 4,096 loads, 16 MiB); answer:
/// `KvEventBatchResult`. Safe to retry.
#[utoipa::path(post, path = "/api/v1/agent/kv-events", tag = "agent",
    request_body(content = String, content_type = "application/json", description = "KvEventBatch: {\"epochs\": [{\"worker\", \"epoch\"}], \"events\": [KvEvent], \"loads\": [{\"worker\", \"prefill_tokens\", \"decode_blocks\", \"queue_depth\", \"age_ms\"}]}"),
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
    let result = state.kv.ingest(&state.pool, node, &batch).await?;
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
        ("wait_s" = Option<u64>, Query, description = "long-poll wait when nothing is newer"),
        ("limit" = Option<u32>, Query, description = "most items (max 10000)")),
    responses((status = 200, description = "KvStreamPage: items [{seq, kind, ...}], next_after, head_seq, resync, loads [{worker, prefill_tokens, decode_blocks, queue_depth, age_ms}], loads_version")))]
pub async fn stream(
    _caller: Caller<Agent>,
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<KvStreamQuery>,
) -> Result<Json<KvStreamPage>, ApiError> {
    let limit = query
        .limit
        .map_or(MAX_STREAM_PAGE, |l| (l as usize).clamp(1, MAX_STREAM_PAGE));
    // Subscribe before reading, so a change between the read and the wait is not missed.
    let mut head = state.kv.head.subscribe();
    let mut loads = state.kv.loads.subscribe();
    let arrived = tokio::time::Instant::now();
    let page = state.kv.page(query.after, query.loads_after, limit);
    let wait = Duration::from_secs(query.wait_s.unwrap_or(0)).min(state.kv.config.max_wait);
    if !page.items.is_empty() || page.resync || wait.is_zero() {
        return Ok(Json(page));
    }
    let deadline = arrived + wait;
    // New loads end the poll, but not before `load_page_interval` after it arrived: a follower
    // polls again at once, so this caps how often loads alone make it read a page.
    let loads_due = |now: tokio::time::Instant| {
        (arrived + state.kv.config.load_page_interval)
            .max(now)
            .min(deadline)
    };
    let mut due = (!page.loads.is_empty()).then(|| loads_due(arrived));
    let mut stopping = state.stopping.subscribe();
    loop {
        if *stopping.borrow_and_update() {
            break;
        }
        let until = due.unwrap_or(deadline);
        tokio::select! {
            changed = tokio::time::timeout_at(until, head.changed()) => match changed {
                Ok(Ok(())) if *head.borrow_and_update() > query.after => break,
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
    Ok(Json(state.kv.page(query.after, query.loads_after, limit)))
}

/// The whole index as of one sequence number (`KvSnapshot`): follow the stream from its `seq`.
#[utoipa::path(get, path = "/api/v1/agent/kv-snapshot", tag = "agent",
    responses((status = 200, description = "KvSnapshot: seq, workers [{worker, epoch, next_event_id, tiers [{tier, blocks}]}]")))]
pub async fn snapshot(
    _caller: Caller<Agent>,
    State(state): State<AppState>,
) -> Result<Json<KvSnapshot>, ApiError> {
    Ok(Json(state.kv.snapshot()))
}

/// This replica's KV index: head sequence number, sizes, and counters of rejected events.
#[utoipa::path(get, path = "/api/v1/kv/stats", tag = "fleet",
    responses((status = 200, description = "KvIndexStats: head_seq, oldest_seq, workers, blocks, counters")))]
pub async fn stats(
    _caller: Caller<Read>,
    State(state): State<AppState>,
) -> Result<Json<KvIndexStats>, ApiError> {
    Ok(Json(state.kv.stats()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvfleet_proto::hash::{BlockSize, block_hashes};
    use kvfleet_proto::kv_stream::WorkerEpoch;
    use kvfleet_proto::{KvEvent, Tier};

    fn stored(worker: u64, event_id: u64, first_token: u32) -> KvEvent {
        let tokens: Vec<u32> = (first_token..first_token + 32).collect();
        KvEvent {
            worker: WorkerId(worker),
            event_id,
            tier: Tier::G1,
            data: KvEventData::Stored {
                parent: None,
                blocks: block_hashes(&tokens, BlockSize::default()),
            },
        }
    }

    fn live(ids: &[u64]) -> HashSet<WorkerId> {
        ids.iter().map(|&i| WorkerId(i)).collect()
    }

    fn commit(core: &mut Core, items: Vec<KvStreamItem>) {
        let start = core.seq() + 1;
        for (i, item) in items.into_iter().enumerate() {
            assert_eq!(core.apply(start + i as u64, item), Ok(true));
        }
    }

    #[test]
    fn plan_counts_each_outcome_and_retries_are_idempotent() {
        let mut core = Core::new(100);
        let batch = KvEventBatch {
            epochs: vec![],
            events: vec![
                stored(1, 0, 0),
                stored(1, 1, 100),
                stored(2, 0, 0),
                stored(9, 0, 0),
                stored(1, 1, 100),
                stored(1, 4, 200),
            ],
            loads: vec![],
        };
        let (items, result) = core.plan(&batch, &live(&[1, 2]));
        assert_eq!(
            (
                result.applied,
                result.duplicate,
                result.unknown_worker,
                result.gaps
            ),
            (4, 1, 1, 1)
        );
        assert_eq!(result.unknown_workers, vec![WorkerId(9)]);
        commit(&mut core, items);
        let (items, again) = core.plan(&batch, &live(&[1, 2]));
        assert!(items.is_empty(), "{items:?}");
        assert_eq!(
            (again.applied, again.duplicate, again.out_of_order),
            (0, 2, 3)
        );
    }

    #[test]
    fn broken_chains_are_rejected() {
        let core = Core::new(100);
        let mut event = stored(1, 0, 0);
        if let KvEventData::Stored { blocks, .. } = &mut event.data {
            blocks[1].sequence.0 ^= 1;
        }
        let (items, result) = core.plan(
            &KvEventBatch {
                epochs: vec![],
                events: vec![event],
                loads: vec![],
            },
            &live(&[1]),
        );
        assert!(items.is_empty());
        assert_eq!(result.broken_chain, 1);
    }

    #[test]
    fn a_new_epoch_resets_the_worker_and_an_old_one_is_stale() {
        let mut core = Core::new(100);
        let (items, _) = core.plan(
            &KvEventBatch {
                epochs: vec![WorkerEpoch {
                    worker: WorkerId(1),
                    epoch: 5,
                }],
                events: vec![stored(1, 0, 0), stored(1, 1, 100)],
                loads: vec![],
            },
            &live(&[1]),
        );
        assert!(matches!(
            items[0],
            KvStreamItem::WorkerReset { epoch: 5, .. }
        ));
        commit(&mut core, items);
        // The engine restarts: ids begin at 0 again under a higher epoch.
        let (items, result) = core.plan(
            &KvEventBatch {
                epochs: vec![WorkerEpoch {
                    worker: WorkerId(1),
                    epoch: 6,
                }],
                events: vec![stored(1, 0, 500)],
                loads: vec![],
            },
            &live(&[1]),
        );
        assert_eq!((items.len(), result.applied), (2, 1));
        commit(&mut core, items);
        let snapshot = core.snapshot();
        assert_eq!(snapshot.workers[0].epoch, 6);
        assert_eq!(snapshot.workers[0].next_event_id, 1);
        assert_eq!(
            snapshot.block_count(),
            2,
            "only the new incarnation's blocks"
        );
        let (items, result) = core.plan(
            &KvEventBatch {
                epochs: vec![WorkerEpoch {
                    worker: WorkerId(1),
                    epoch: 5,
                }],
                events: vec![stored(1, 2, 0)],
                loads: vec![],
            },
            &live(&[1]),
        );
        assert!(items.is_empty());
        assert_eq!(result.stale_epoch, 1);
    }

    #[test]
    fn pages_continue_without_holes_and_ask_for_resync_outside_retention() {
        let mut core = Core::new(3);
        let events: Vec<KvEvent> = (0..5).map(|i| stored(1, i, 0)).collect();
        let (items, _) = core.plan(
            &KvEventBatch {
                epochs: vec![],
                events,
                loads: vec![],
            },
            &live(&[1]),
        );
        commit(&mut core, items);
        assert_eq!(core.seq(), 5);
        let page = core.page(3, 10);
        assert_eq!(
            page.items.iter().map(|i| i.seq).collect::<Vec<_>>(),
            vec![4, 5]
        );
        assert_eq!((page.next_after, page.head_seq, page.resync), (5, 5, false));
        assert_eq!(core.page(2, 1).items[0].seq, 3);
        assert_eq!(core.page(2, 1).items.len(), 1);
        assert!(core.page(1, 10).resync, "seq 2 is no longer retained");
        assert!(core.page(6, 10).resync, "ahead of the head");
        let caught_up = core.page(5, 10);
        assert!(caught_up.items.is_empty() && !caught_up.resync);
        assert_eq!(
            core.apply(
                7,
                KvStreamItem::WorkerRemoved {
                    worker: WorkerId(1)
                }
            ),
            Err(SeqHole { have: 5, got: 7 })
        );
        assert_eq!(
            core.apply(
                5,
                KvStreamItem::WorkerRemoved {
                    worker: WorkerId(1)
                }
            ),
            Ok(false)
        );
    }

    #[test]
    fn pages_are_bounded_by_blocks() {
        let mut core = Core::new(1_000);
        // Three events of 10,000 tokens of prompt each: 625 blocks apiece.
        let long = |event_id: u64| {
            let tokens: Vec<u32> = (0..10_000).map(|t| t + event_id as u32 * 10_000).collect();
            KvEvent {
                worker: WorkerId(1),
                event_id,
                tier: Tier::G1,
                data: KvEventData::Stored {
                    parent: None,
                    blocks: block_hashes(&tokens, BlockSize::default()),
                },
            }
        };
        let per_event = long(0).data.block_count();
        let fit = MAX_PAGE_BLOCKS / per_event;
        let events: Vec<KvEvent> = (0..fit as u64 + 2).map(long).collect();
        let (items, _) = core.plan(
            &KvEventBatch {
                epochs: vec![],
                events,
                loads: vec![],
            },
            &live(&[1]),
        );
        commit(&mut core, items);
        let page = core.page(0, MAX_STREAM_PAGE);
        assert_eq!(page.items.len(), fit);
        assert_eq!(page.next_after, fit as u64);
        let rest = core.page(page.next_after, MAX_STREAM_PAGE);
        assert_eq!(rest.items.len(), 2);
    }

    fn load(worker: u64, decode_blocks: u64, age_ms: u64) -> WorkerLoadReport {
        WorkerLoadReport {
            worker: WorkerId(worker),
            prefill_tokens: 0,
            decode_blocks,
            queue_depth: 0,
            age_ms,
        }
    }

    #[test]
    fn loads_are_validated_versioned_and_expire() {
        let ttl = Duration::from_secs(5);
        let s = Duration::from_secs;
        let mut core = Core::new(10);
        let (taken, rejected, unknown) =
            core.take_loads(&[load(1, 10, 0), load(9, 5, 0)], &live(&[1, 2]), s(1), ttl);
        assert_eq!((taken, rejected, unknown), (1, 1, vec![WorkerId(9)]));
        let (loads, v1) = core.loads_since(0, s(1), ttl);
        assert_eq!(loads, vec![load(1, 10, 0)]);
        // Nothing new since v1; a newer report of worker 2 is.
        assert!(core.loads_since(v1, s(2), ttl).0.is_empty());
        core.take_loads(&[load(2, 7, 300)], &live(&[1, 2]), s(2), ttl);
        let (loads, v2) = core.loads_since(v1, s(3), ttl);
        assert_eq!(loads, vec![load(2, 7, 1300)], "dated with its age");
        // A version this replica never issued (another replica's, or before a restart):
        // everything current.
        assert_eq!(core.loads_since(v2 + 100, s(3), ttl).0.len(), 2);
        // Older figures than the held ones (a retried upload) do not replace them.
        core.take_loads(&[load(2, 99, 2000)], &live(&[2]), s(3), ttl);
        assert_eq!(core.loads_since(0, s(3), ttl).0[1].decode_blocks, 7);
        // Worker 1 stops reporting: past the TTL it is no longer served, then dropped.
        core.take_loads(&[load(2, 8, 0)], &live(&[2]), s(6), ttl);
        let (loads, _) = core.loads_since(0, s(6), ttl);
        assert_eq!(
            loads.iter().map(|l| l.worker.0).collect::<Vec<_>>(),
            vec![2]
        );
        assert_eq!(core.stats().loads, 1);
        assert_eq!(
            (
                core.counters().loads_received,
                core.counters().loads_rejected
            ),
            (3, 1)
        );
        // A removed worker's load goes with it.
        core.apply(
            1,
            KvStreamItem::WorkerRemoved {
                worker: WorkerId(2),
            },
        )
        .unwrap();
        assert!(core.loads_since(0, s(6), ttl).0.is_empty());
    }

    #[test]
    fn snapshots_restore_the_same_index() {
        let mut core = Core::new(10);
        let (items, _) = core.plan(
            &KvEventBatch {
                epochs: vec![WorkerEpoch {
                    worker: WorkerId(2),
                    epoch: 3,
                }],
                events: vec![stored(1, 0, 0), stored(2, 0, 64)],
                loads: vec![],
            },
            &live(&[1, 2]),
        );
        commit(&mut core, items);
        let snapshot = core.snapshot();
        let restored = Core::from_snapshot(&snapshot, 10);
        assert_eq!(restored.snapshot(), snapshot);
        assert!(restored.page(snapshot.seq - 1, 10).resync);
        assert!(!restored.page(snapshot.seq, 10).resync);
        let removals = restored.plan_removals(&[WorkerId(2), WorkerId(7)]);
        assert_eq!(
            removals,
            vec![KvStreamItem::WorkerRemoved {
                worker: WorkerId(2)
            }]
        );
    }
}
