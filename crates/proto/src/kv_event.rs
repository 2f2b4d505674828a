//! KV cache events: what engines report when blocks enter or leave a cache tier.
//!
//! Events flow engine → agent → control plane → every router. Each worker numbers its events
//! with a monotonic `event_id` so that a consumer can tell a gap (re-sync from a snapshot) from a
//! duplicate (ignore). Ordering checks live with the consumers; this module only defines the data.

use serde::{Deserialize, Serialize};

use crate::hash::{BlockHash, SequenceHash};
use crate::ids::WorkerId;

/// Where a cached block lives. Lower tiers are larger and slower; a hit in any tier saves
/// recomputation, so routers credit every tier (weighted by how fast it onboards).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    /// G1: accelerator memory, usable immediately.
    G1,
    /// G2: host (CPU) memory, one copy away.
    G2,
    /// G3: local disk (`/var/cache/kvfleet`).
    G3,
    /// G4: another node's cache, reachable over the peer transport.
    G4,
}

impl Tier {
    /// Every tier, fastest first.
    pub const ALL: [Tier; 4] = [Tier::G1, Tier::G2, Tier::G3, Tier::G4];

    /// The tier's short name (`g1`..`g4`) as used in metrics labels and JSON.
    pub const fn as_str(self) -> &'static str {
        match self {
            Tier::G1 => "g1",
            Tier::G2 => "g2",
            Tier::G3 => "g3",
            Tier::G4 => "g4",
        }
    }
}

/// One change to one worker's cache in one tier.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvEvent {
    /// The worker whose cache changed.
    pub worker: WorkerId,
    /// Per-worker, strictly increasing by one from 0 for each engine start.
    pub event_id: u64,
    /// The tier the change happened in.
    pub tier: Tier,
    /// What changed.
    #[serde(flatten)]
    pub data: KvEventData,
}

/// The change itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum KvEventData {
    /// Blocks became reusable. `blocks` form a chain: the first block's parent is `parent`
    /// (`None` when it starts a prompt) and each later block's parent is the one before it.
    Stored {
        /// The sequence hash of the block before `blocks[0]`, if any.
        parent: Option<SequenceHash>,
        /// The stored blocks, in prompt order.
        blocks: Vec<BlockHash>,
    },
    /// Blocks were evicted from this tier.
    Removed {
        /// Sequence hashes of the evicted blocks.
        blocks: Vec<SequenceHash>,
    },
    /// Everything in this tier was dropped (engine restart, cache reset).
    Cleared,
}

impl KvEventData {
    /// How many blocks the event names (0 for `Cleared`).
    pub fn block_count(&self) -> usize {
        match self {
            KvEventData::Stored { blocks, .. } => blocks.len(),
            KvEventData::Removed { blocks } => blocks.len(),
            KvEventData::Cleared => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::{BlockSize, block_hashes};

    #[test]
    fn events_have_a_stable_json_shape() {
        let blocks = block_hashes(&(0..32).collect::<Vec<u32>>(), BlockSize::default());
        let stored = KvEvent {
            worker: WorkerId(3),
            event_id: 7,
            tier: Tier::G2,
            data: KvEventData::Stored {
                parent: None,
                blocks: blocks.clone(),
            },
        };
        let json = serde_json::to_value(&stored).unwrap();
        assert_eq!(json["type"], "stored");
        assert_eq!(json["worker"], 3);
        assert_eq!(json["tier"], "g2");
        assert_eq!(json["blocks"].as_array().unwrap().len(), 2);
        let back: KvEvent = serde_json::from_value(json).unwrap();
        assert_eq!(back, stored);

        let removed = KvEvent {
            worker: WorkerId(3),
            event_id: 8,
            tier: Tier::G1,
            data: KvEventData::Removed {
                blocks: vec![blocks[1].sequence],
            },
        };
        let text = serde_json::to_string(&removed).unwrap();
        assert_eq!(serde_json::from_str::<KvEvent>(&text).unwrap(), removed);

        let cleared: KvEvent =
            serde_json::from_str(r#"{"worker":1,"event_id":0,"tier":"g1","type":"cleared"}"#)
                .unwrap();
        assert_eq!(cleared.data, KvEventData::Cleared);
        assert_eq!(cleared.data.block_count(), 0);
    }

    #[test]
    fn unknown_tier_or_type_is_rejected() {
        assert!(
            serde_json::from_str::<KvEvent>(
                r#"{"worker":1,"event_id":0,"tier":"g9","type":"cleared"}"#
            )
            .is_err()
        );
        assert!(
            serde_json::from_str::<KvEvent>(
                r#"{"worker":1,"event_id":0,"tier":"g1","type":"exploded"}"#
            )
            .is_err()
        );
    }
}
