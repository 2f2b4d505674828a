//! The approximate KV record of an engine that publishes no KV events (llama-server, a generic
//! OpenAI server): after each request the worker assumes the server caches the full blocks of
//! its prompt and output, as `Stored` events, and forgets them — `Removed` events — when the
//! record outgrows the server's KV capacity (least recently used first, leaves before their
//! prefixes) or a block has not been reused for the TTL. The fleet's KV index and routers then
//! treat the worker like any other: repeated prefixes go back to it.
//!
//! Approximate: the server may have reused the slot (or evicted its prompt cache) sooner, or
//! kept it longer; a wrong guess costs one recomputed prefix, never a wrong answer.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use kvfleet_proto::{BlockHash, KvEventData, SequenceHash};

/// What the worker assumes its server holds.
#[derive(Debug)]
pub struct ApproxKv {
    capacity: usize,
    ttl: Duration,
    /// Block → (its place in `order`, last use).
    blocks: HashMap<SequenceHash, (u64, Instant)>,
    /// Least recently used first.
    order: BTreeMap<u64, SequenceHash>,
    next: u64,
}

impl ApproxKv {
    /// A record of at most `capacity` blocks, each forgotten `ttl` after its last use.
    pub fn new(capacity: usize, ttl: Duration) -> Self {
        Self {
            capacity: capacity.max(1),
            ttl,
            blocks: HashMap::new(),
            order: BTreeMap::new(),
            next: 0,
        }
    }

    /// Blocks held.
    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    /// Records a finished request's full blocks (in prompt order): `Stored` events for the new
    /// runs, then `Removed` for what no longer fits.
    pub fn record(&mut self, chain: &[BlockHash], now: Instant) -> Vec<KvEventData> {
        let mut events = Vec::new();
        let mut run: Vec<BlockHash> = Vec::new();
        let mut parent = None;
        for block in chain {
            if self.blocks.contains_key(&block.sequence) {
                if !run.is_empty() {
                    let blocks = std::mem::take(&mut run);
                    events.push(KvEventData::Stored { parent, blocks });
                }
                parent = Some(block.sequence);
            } else {
                // A run's parent is the block before it (`None` at the prompt's start).
                run.push(*block);
            }
        }
        if !run.is_empty() {
            events.push(KvEventData::Stored {
                parent,
                blocks: run,
            });
        }
        // Touched last to first: a prefix is used more recently than its continuation, so
        // eviction takes leaves before the blocks they hang from.
        for block in chain.iter().rev() {
            if let Some((tick, _)) = self.blocks.remove(&block.sequence) {
                self.order.remove(&tick);
            }
            self.order.insert(self.next, block.sequence);
            self.blocks.insert(block.sequence, (self.next, now));
            self.next += 1;
        }
        let mut evicted = Vec::new();
        while self.blocks.len() > self.capacity {
            let Some((_, hash)) = self.order.pop_first() else {
                break;
            };
            self.blocks.remove(&hash);
            evicted.push(hash);
        }
        if !evicted.is_empty() {
            events.push(KvEventData::Removed { blocks: evicted });
        }
        events
    }

    /// Forgets the blocks not used for the TTL.
    pub fn expire(&mut self, now: Instant) -> Option<KvEventData> {
        let expired: Vec<SequenceHash> = self
            .blocks
            .iter()
            .filter(|(_, (_, used))| now.duration_since(*used) >= self.ttl)
            .map(|(hash, _)| *hash)
            .collect();
        if expired.is_empty() {
            return None;
        }
        for hash in &expired {
            if let Some((tick, _)) = self.blocks.remove(hash) {
                self.order.remove(&tick);
            }
        }
        Some(KvEventData::Removed { blocks: expired })
    }
}

#[cfg(test)]
mod tests {
    use kvfleet_proto::BlockSize;
    use kvfleet_proto::hash::block_hashes;

    use super::*;

    fn stored(events: &[KvEventData]) -> Vec<(Option<SequenceHash>, usize)> {
        events
            .iter()
            .filter_map(|e| match e {
                KvEventData::Stored { parent, blocks } => Some((*parent, blocks.len())),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn new_runs_are_stored_and_the_least_recent_leaves_evicted_first() {
        let bs = BlockSize::new(4).unwrap();
        let now = Instant::now();
        let mut kv = ApproxKv::new(5, Duration::from_secs(60));
        let a: Vec<u32> = (0..12).collect();
        let chain_a = block_hashes(&a, bs);
        assert_eq!(stored(&kv.record(&chain_a, now)), [(None, 3)]);
        // The same prefix, one block longer: only the new block, hanging from the prefix.
        let b: Vec<u32> = (0..16).collect();
        let chain_b = block_hashes(&b, bs);
        let events = kv.record(&chain_b, now);
        assert_eq!(stored(&events), [(Some(chain_a[2].sequence), 1)]);
        assert_eq!(kv.len(), 4);
        // Another prompt of two blocks: one over capacity; the oldest leaf (b's last block)
        // goes, not the shared prefix.
        let c: Vec<u32> = (100..108).collect();
        let events = kv.record(&block_hashes(&c, bs), now);
        assert_eq!(stored(&events), [(None, 2)]);
        assert_eq!(
            events.last(),
            Some(&KvEventData::Removed {
                blocks: vec![chain_b[3].sequence]
            })
        );
        assert_eq!(kv.len(), 5);
        // Past the TTL everything goes.
        let later = now + Duration::from_secs(61);
        match kv.expire(later) {
            Some(KvEventData::Removed { blocks }) => assert_eq!(blocks.len(), 5),
            other => panic!("{other:?}"),
        }
        assert_eq!(kv.len(), 0);
        assert!(kv.expire(later).is_none());
    }
}
