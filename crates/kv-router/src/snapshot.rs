//! Serializable copies of the index, for re-syncing a router from the control plane (after a
//! gap in a worker's events, or at start) and for persisting it.
//!
//! A snapshot is keyed by worker because re-sync is per worker: when one worker's event stream
//! has a gap, only that worker's blocks are replaced. Each worker carries the id of the next
//! event the snapshot expects, so the stream resumes exactly where the snapshot was cut.

use kvfleet_proto::{SequenceHash, Tier, WorkerId};
use serde::{Deserialize, Serialize};

/// The whole index: every registered worker's blocks and event position.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct IndexSnapshot {
    /// One entry per worker, in worker-id order.
    pub workers: Vec<WorkerSnapshot>,
}

/// One worker's blocks and event position.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerSnapshot {
    /// The worker.
    pub worker: WorkerId,
    /// The id of the first event not reflected in `tiers`.
    pub next_event_id: u64,
    /// Blocks per tier; tiers with no blocks are left out. Hashes are sorted.
    pub tiers: Vec<TierBlocks>,
}

/// The blocks a worker holds in one tier.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TierBlocks {
    /// The tier.
    pub tier: Tier,
    /// Sequence hashes of the blocks held there.
    pub blocks: Vec<SequenceHash>,
}

/// What [`crate::Router::restore`] did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RestoreReport {
    /// Workers whose blocks were replaced.
    pub restored: usize,
    /// Workers in the snapshot that are not registered with this router (skipped: a worker
    /// joins through [`crate::Router::add_worker`], with its capacity).
    pub unknown: Vec<WorkerId>,
}
