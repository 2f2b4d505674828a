//! The KV event pipeline's wire types between agents and the control plane (JSON over HTTP).
//!
//! Three exchanges, all under `/api/v1/agent/` with the node's agent credential:
//!
//! - `POST kv-events` with a [`KvEventBatch`] (one node's workers' events, in order, and their
//!   live loads) → [`KvEventBatchResult`]: what the control plane did with each kind of event.
//!   Retrying a batch whose answer was lost is safe: events the index already has are ignored
//!   (and counted).
//! - `GET kv-stream?after=SEQ[&loads_after=V][&wait_s=S][&limit=N]` → [`KvStreamPage`]: the
//!   changes the control plane applied after sequence number `SEQ`, each a [`SequencedItem`]
//!   numbered `SEQ+1`, `SEQ+2`, ... without holes, plus the workers' loads reported since load
//!   version `V`; a long poll that waits up to `wait_s` when there is nothing new (new loads end
//!   it too, at most a few times a second). `resync: true` means `SEQ` is no longer (or not
//!   yet) known: load a snapshot.
//! - `GET kv-snapshot` → [`KvSnapshot`]: the whole index as of one sequence number; follow the
//!   stream from `after = snapshot.seq`.
//!
//! Sequence numbers are global to the fleet (one order for every router), start at 1, and only
//! ever name applied changes. Event ids stay per worker and per engine incarnation (`epoch`).
//! Loads ([`WorkerLoadReport`]) are not changes: they are not numbered, not persisted and not
//! in snapshots; the control plane keeps each worker's latest in memory and passes it on, and
//! a newer report simply replaces an older one.
//! This module is data only: the state machines that speak it live in the agent (`kv_sync`) and
//! the control plane (`kv_index`).

use serde::{Deserialize, Serialize};

use crate::hash::SequenceHash;
use crate::ids::WorkerId;
use crate::kv_event::{KvEvent, Tier};

/// The most events one upload may carry; the control plane answers 422 above it.
pub const MAX_BATCH_EVENTS: usize = 10_000;

/// The most items one stream page carries (`limit` is capped to it).
pub const MAX_STREAM_PAGE: usize = 10_000;

/// The most load reports one upload may carry (one per worker of the node); 422 above it.
pub const MAX_BATCH_LOADS: usize = 4_096;

/// A stream page stops early once its events name this many blocks (about 10 MB of JSON), so
/// long prompts cannot make a page unbounded; it always carries at least one item. Uploads
/// should stay under it too (the upload body limit is 16 MiB).
pub const MAX_PAGE_BLOCKS: usize = 200_000;

/// The body of `POST /api/v1/agent/kv-events`: events from the calling node's workers.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KvEventBatch {
    /// The engine incarnation of each worker whose events follow (or that just restarted).
    /// An epoch above the one the control plane knows means the engine restarted: its blocks
    /// are dropped and its event ids start again at 0. A lower one marks stale events (counted
    /// and ignored). Workers left out keep the epoch the control plane has (0 for new ones).
    /// Agents send every local worker's epoch with every batch; repeating one is harmless.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub epochs: Vec<WorkerEpoch>,
    /// Events in the order the engines emitted them (per worker, ids increasing).
    pub events: Vec<KvEvent>,
    /// The live load of each of the node's serving workers, sampled just before sending
    /// (agents post them every half second or so, with or without events). Loads of workers
    /// that are not live workers of the calling node are rejected and counted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub loads: Vec<WorkerLoadReport>,
}

/// One worker's live load, as its agent measured it: what a router needs to avoid piling
/// requests onto a worker that other frontends already keep busy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerLoadReport {
    /// The worker.
    pub worker: WorkerId,
    /// Prompt tokens admitted but not yet prefilled.
    #[serde(default)]
    pub prefill_tokens: u64,
    /// KV blocks held by its running requests.
    #[serde(default)]
    pub decode_blocks: u64,
    /// Requests waiting to be scheduled.
    #[serde(default)]
    pub queue_depth: u32,
    /// How old the figures were when this message was sent, in milliseconds (an upload that
    /// was retried, a report the control plane held): receivers date the report `now - age`.
    #[serde(default)]
    pub age_ms: u64,
}

/// One worker's engine incarnation. Agents use a number that grows with every engine start,
/// across agent restarts too (e.g. the engine's start time in milliseconds since the epoch).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerEpoch {
    /// The worker.
    pub worker: WorkerId,
    /// Its engine incarnation.
    pub epoch: u64,
}

/// The answer to an upload: how many events of each kind there were. Only `applied` ones
/// changed the index (and got a sequence number); the others changed nothing.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct KvEventBatchResult {
    /// Events applied to the index (including those after a gap).
    pub applied: u32,
    /// Applied events whose id skipped ahead of the next expected one (events were lost
    /// between the engine and the control plane; that worker's index may be incomplete).
    pub gaps: u32,
    /// Events the index already had (a retried batch): ignored.
    pub duplicate: u32,
    /// Events older than the last applied one from their worker: ignored.
    pub out_of_order: u32,
    /// Events from workers that are not live workers of the calling node: rejected.
    pub unknown_worker: u32,
    /// `Stored` events whose blocks do not chain onto their parent: rejected.
    pub broken_chain: u32,
    /// Events from an engine incarnation older than the one the control plane knows: ignored.
    pub stale_epoch: u32,
    /// The workers behind `unknown_worker` and `loads_rejected` (sorted, each once), so the
    /// agent can stop sending.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unknown_workers: Vec<WorkerId>,
    /// Load reports taken (each replaces its worker's previous one).
    #[serde(default)]
    pub loads_applied: u32,
    /// Load reports of workers that are not live workers of the calling node: rejected.
    #[serde(default)]
    pub loads_rejected: u32,
    /// The sequence number of the last change applied fleet-wide when this batch committed.
    pub head_seq: u64,
}

/// One change to the index, as streamed to routers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum KvStreamItem {
    /// An engine's event, applied (apply it to the router the same way).
    Event {
        /// The event as the engine sent it.
        event: KvEvent,
    },
    /// The worker's engine restarted (a new `epoch`): drop its blocks; its event ids start again
    /// at 0.
    WorkerReset {
        /// The worker.
        worker: WorkerId,
        /// Its new engine incarnation.
        epoch: u64,
    },
    /// The worker is gone (its node was lost or removed, or the worker was stopped): drop it and
    /// its blocks.
    WorkerRemoved {
        /// The worker.
        worker: WorkerId,
    },
}

impl KvStreamItem {
    /// The worker the change is about.
    pub fn worker(&self) -> WorkerId {
        match self {
            KvStreamItem::Event { event } => event.worker,
            KvStreamItem::WorkerReset { worker, .. } | KvStreamItem::WorkerRemoved { worker } => {
                *worker
            }
        }
    }
}

/// A change with its place in the fleet-wide order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SequencedItem {
    /// Position in the stream: the previous item has `seq - 1`.
    pub seq: u64,
    /// The change.
    #[serde(flatten)]
    pub item: KvStreamItem,
}

/// Query of `GET /api/v1/agent/kv-stream`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KvStreamQuery {
    /// The last sequence number the caller has applied (its snapshot's `seq`, or the previous
    /// page's `next_after`). 0: from the beginning, if the control plane still has it.
    #[serde(default)]
    pub after: u64,
    /// The load version the caller has seen (the previous page's `loads_version`; 0: none).
    /// The page carries the loads reported since; a version the server does not know (another
    /// replica's, or from before it restarted) gets every current load.
    #[serde(default)]
    pub loads_after: u64,
    /// How long to wait, in seconds, when nothing is newer than `after` (capped by the server;
    /// 0 or absent: answer at once).
    #[serde(default)]
    pub wait_s: Option<u64>,
    /// The most items to return (default and cap [`MAX_STREAM_PAGE`]).
    #[serde(default)]
    pub limit: Option<u32>,
}

/// One page of the stream.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct KvStreamPage {
    /// Items `after+1 ..= next_after`, in order, without holes (empty on timeout or resync).
    pub items: Vec<SequencedItem>,
    /// The `after` to ask with next (the last item's `seq`, or the request's `after`).
    pub next_after: u64,
    /// The newest sequence number this control plane has applied.
    pub head_seq: u64,
    /// The control plane cannot continue from `after` (older than it retains, or newer than it
    /// has: a restored database): load [`KvSnapshot`] and continue from its `seq`.
    #[serde(default)]
    pub resync: bool,
    /// The latest load of every worker that reported since the request's `loads_after`, each
    /// worker once, `age_ms` counting the time the control plane held it. Workers whose
    /// reports stopped (an agent gone or cut off) are left out once their last report is a
    /// few seconds old.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub loads: Vec<WorkerLoadReport>,
    /// The `loads_after` to ask with next.
    #[serde(default)]
    pub loads_version: u64,
}

/// How many blocks one worker holds in each tier, as the fleet index knows it
/// (`GET /api/v1/kv/workers`): what an operator reads to see whether offload is working.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvWorkerBlocks {
    /// The worker.
    pub worker: WorkerId,
    /// Blocks in device memory (the engine's own pool).
    pub g1: u64,
    /// Blocks in host memory.
    pub g2: u64,
    /// Blocks on the node's local disk.
    pub g3: u64,
    /// Blocks announced as fetchable from other nodes.
    pub g4: u64,
}

impl KvWorkerBlocks {
    /// Counts in [`crate::Tier::ALL`] order.
    pub fn from_counts(worker: WorkerId, [g1, g2, g3, g4]: [u64; 4]) -> Self {
        Self {
            worker,
            g1,
            g2,
            g3,
            g4,
        }
    }
}

/// The whole index as of one point of the stream (`GET /api/v1/agent/kv-snapshot`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct KvSnapshot {
    /// Every change up to and including this sequence number is reflected; none after it.
    pub seq: u64,
    /// Every worker the index knows, in worker-id order.
    pub workers: Vec<KvWorkerSnapshot>,
}

impl KvSnapshot {
    /// Blocks held in all tiers of all workers (a block held in two tiers counts twice).
    pub fn block_count(&self) -> usize {
        self.workers
            .iter()
            .flat_map(|w| &w.tiers)
            .map(|t| t.blocks.len())
            .sum()
    }
}

/// One worker's blocks and event position in a [`KvSnapshot`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvWorkerSnapshot {
    /// The worker.
    pub worker: WorkerId,
    /// Its engine incarnation.
    pub epoch: u64,
    /// The id of the next event the index expects from it.
    pub next_event_id: u64,
    /// Blocks per tier, tiers without blocks left out; hashes sorted.
    pub tiers: Vec<KvTierBlocks>,
}

/// The blocks a worker holds in one tier.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvTierBlocks {
    /// The tier.
    pub tier: Tier,
    /// Sequence hashes of the blocks.
    pub blocks: Vec<SequenceHash>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::{BlockSize, block_hashes};
    use crate::kv_event::KvEventData;

    fn stored(worker: u64, event_id: u64) -> KvEvent {
        KvEvent {
            worker: WorkerId(worker),
            event_id,
            tier: Tier::G1,
            data: KvEventData::Stored {
                parent: None,
                blocks: block_hashes(&(0..32).collect::<Vec<u32>>(), BlockSize::default()),
            },
        }
    }

    #[test]
    fn stream_items_have_a_flat_tagged_shape() {
        let item = SequencedItem {
            seq: 42,
            item: KvStreamItem::Event {
                event: stored(3, 7),
            },
        };
        let json = serde_json::to_value(&item).unwrap();
        assert_eq!(json["seq"], 42);
        assert_eq!(json["kind"], "event");
        assert_eq!(json["event"]["type"], "stored");
        assert_eq!(json["event"]["worker"], 3);
        assert_eq!(serde_json::from_value::<SequencedItem>(json).unwrap(), item);

        for item in [
            KvStreamItem::WorkerReset {
                worker: WorkerId(9),
                epoch: 1_700_000_000_000,
            },
            KvStreamItem::WorkerRemoved {
                worker: WorkerId(9),
            },
        ] {
            let sequenced = SequencedItem { seq: 1, item };
            let text = serde_json::to_string(&sequenced).unwrap();
            assert_eq!(
                serde_json::from_str::<SequencedItem>(&text).unwrap(),
                sequenced
            );
            assert_eq!(sequenced.item.worker(), WorkerId(9));
        }
        let removed: SequencedItem =
            serde_json::from_str(r#"{"seq":5,"kind":"worker_removed","worker":4}"#).unwrap();
        assert_eq!(
            removed.item,
            KvStreamItem::WorkerRemoved {
                worker: WorkerId(4)
            }
        );
    }

    #[test]
    fn batches_reject_unknown_fields_and_default_epochs() {
        let batch = KvEventBatch {
            epochs: vec![],
            events: vec![stored(1, 0)],
            loads: vec![],
        };
        let text = serde_json::to_string(&batch).unwrap();
        assert!(!text.contains("epochs"), "{text}");
        assert_eq!(serde_json::from_str::<KvEventBatch>(&text).unwrap(), batch);
        assert!(serde_json::from_str::<KvEventBatch>(r#"{"events":[],"extra":1}"#).is_err());
        assert!(
            serde_json::from_str::<KvEventBatch>(
                r#"{"events":[],"epochs":[{"worker":1,"epoch":2,"x":0}]}"#
            )
            .is_err()
        );
    }

    #[test]
    fn loads_ride_along_optionally_in_batches_and_pages() {
        let load = WorkerLoadReport {
            worker: WorkerId(7),
            prefill_tokens: 300,
            decode_blocks: 42,
            queue_depth: 2,
            age_ms: 15,
        };
        let batch = KvEventBatch {
            epochs: vec![],
            events: vec![],
            loads: vec![load],
        };
        let json = serde_json::to_value(&batch).unwrap();
        assert_eq!(json["loads"][0]["worker"], 7);
        assert_eq!(json["loads"][0]["decode_blocks"], 42);
        assert_eq!(serde_json::from_value::<KvEventBatch>(json).unwrap(), batch);
        // Absent figures are zero; unknown fields are refused, as everywhere in uploads.
        let sparse: WorkerLoadReport = serde_json::from_str(r#"{"worker":3}"#).unwrap();
        assert_eq!((sparse.decode_blocks, sparse.age_ms), (0, 0));
        assert!(serde_json::from_str::<WorkerLoadReport>(r#"{"worker":3,"x":1}"#).is_err());
        // Pages and answers from a control plane that knows nothing of loads still parse.
        let page: KvStreamPage =
            serde_json::from_str(r#"{"items":[],"next_after":3,"head_seq":9}"#).unwrap();
        assert!(page.loads.is_empty() && page.loads_version == 0);
        let result: KvEventBatchResult = serde_json::from_str(
            r#"{"applied":1,"gaps":0,"duplicate":0,"out_of_order":0,"unknown_worker":0,
                "broken_chain":0,"stale_epoch":0,"head_seq":4}"#,
        )
        .unwrap();
        assert_eq!((result.loads_applied, result.loads_rejected), (0, 0));
        let query: KvStreamQuery = serde_json::from_str(r#"{"after":4,"loads_after":9}"#).unwrap();
        assert_eq!(query.loads_after, 9);
    }

    #[test]
    fn snapshots_round_trip_and_count_blocks() {
        let snapshot = KvSnapshot {
            seq: 10,
            workers: vec![KvWorkerSnapshot {
                worker: WorkerId(1),
                epoch: 0,
                next_event_id: 4,
                tiers: vec![
                    KvTierBlocks {
                        tier: Tier::G1,
                        blocks: vec![SequenceHash(1), SequenceHash(2)],
                    },
                    KvTierBlocks {
                        tier: Tier::G3,
                        blocks: vec![SequenceHash(u64::MAX)],
                    },
                ],
            }],
        };
        assert_eq!(snapshot.block_count(), 3);
        let text = serde_json::to_string(&snapshot).unwrap();
        assert_eq!(serde_json::from_str::<KvSnapshot>(&text).unwrap(), snapshot);
        let page: KvStreamPage =
            serde_json::from_str(r#"{"items":[],"next_after":3,"head_seq":9}"#).unwrap();
        assert!(!page.resync);
    }
}
