//! The KV index as one replica holds it in memory, without IO: the block index (a
//! [`kvfleet_kv_router::Router`] used only as the index, with per-worker event positions), the
//! engine incarnation (`epoch`) of every worker, the retained tail of the sequenced stream,
//! the latest load report per worker, and this replica's counters. Every method is
//! synchronous, takes time as a parameter and is cheap enough to run under the
//! [`super::KvIndex`] mutex; the validation rules are in the parent module's docs.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Duration;

use kvfleet_kv_router::{Router, RouterConfig, WorkerCapacity};
use kvfleet_proto::hash::chain;
use kvfleet_proto::kv_stream::{
    KvEventBatch, KvEventBatchResult, KvSnapshot, KvStreamItem, KvStreamPage, KvTierBlocks,
    KvWorkerBlocks, KvWorkerSnapshot, MAX_PAGE_BLOCKS, SequencedItem, WorkerLoadReport,
};
use kvfleet_proto::{KvEventData, WorkerId};
use serde::{Deserialize, Serialize};

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

/// The index and the retained stream, without IO: what one replica knows.
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

    /// Takes over what belongs to this replica rather than to the log (counters, loads) from
    /// `old`, when this core replaces it after a rebuild from a checkpoint.
    pub fn keep_replica_state(&mut self, old: &mut Core) {
        self.counters = old.counters;
        self.loads = std::mem::take(&mut old.loads);
        self.loads_version = old.loads_version;
    }

    /// Counts an upload that changed nothing in the log (loads only).
    pub fn count_quiet_batch(&mut self) {
        self.counters.batches += 1;
    }

    /// Counts a written batch (an upload or a sweep): its per-batch answer and the changes it
    /// logged.
    pub fn count(&mut self, result: &KvEventBatchResult, items: &[KvStreamItem]) {
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
        c.removed += items
            .iter()
            .filter(|i| matches!(i, KvStreamItem::WorkerRemoved { .. }))
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

    /// Blocks per tier of every worker in the index, in id order (counts, not hashes: cheap
    /// under the lock for any fleet size).
    pub fn worker_blocks(&self) -> Vec<KvWorkerBlocks> {
        self.index
            .workers()
            .filter_map(|w| {
                self.index
                    .worker_blocks(w)
                    .map(|counts| KvWorkerBlocks::from_counts(w, counts))
            })
            .collect()
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

#[cfg(test)]
mod tests {
    use super::*;
    use kvfleet_proto::hash::{BlockSize, block_hashes};
    use kvfleet_proto::kv_stream::{MAX_STREAM_PAGE, WorkerEpoch};
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
