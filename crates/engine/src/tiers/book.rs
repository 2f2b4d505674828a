//! The tier policy core: which blocks G2 (host memory) and G3 (local disk) hold, what enters
//! them, what they evict, and the KV events and counters that follow. Pure: no bytes, no files,
//! no clock. [`super::TierStore`] is its IO layer (and the simulator's mock engines run it
//! alone, with the bytes only modelled).
//!
//! Both tiers are LRU caches with a byte budget, inclusive of G1: a block onboarded back into
//! G1 stays in its lower tier, so evicting it from G1 again costs no second write. A block
//! leaving G1 goes to G2 when G2 is on, else to G3; a block G2 evicts goes down to G3. What
//! enters at all is the [`Admission`] policy's decision.
//!
//! Each entry keeps the [`Origin`] its G1 block had (the node that supplied it, if any), so
//! [`TierBook::evict_origin`] can drop what a revoked node supplied from both tiers, and a
//! block onboarded back into G1 gets its origin back.

use std::collections::BTreeMap;

use kvfleet_proto::{BlockHash, KvEventData, SequenceHash, Tier};
use serde::{Deserialize, Serialize};

use crate::block_pool::{Evicted, Origin};
use crate::fast_hash::FastMap;

/// Which blocks leaving G1 are written to the lower tiers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Admission {
    /// Every evicted block (the most hits per eviction, the most bytes written).
    #[default]
    All,
    /// Only blocks some later prompt hit while they were in G1: one-off prompts never reach
    /// host memory or disk (fewer writes, less churn of the blocks that do get reused).
    Reused,
}

/// Why a block in a lower tier could not be onboarded; the block is dropped from its tier and
/// its tokens are recomputed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Fault {
    /// The payload does not match its checksum.
    Checksum,
    /// The file is shorter (or longer) than its header says.
    Truncated,
    /// The file belongs to another KV layout (model, shape, dtype or block size).
    Layout,
    /// The header is not a block file's, or names another block.
    Header,
    /// The tier's index had it but the bytes are gone.
    Missing,
    /// Reading or writing failed (permissions, a failing disk).
    Io,
    /// The disk is full.
    NoSpace,
}

/// A lower tier's figures, cumulative since start except `blocks`/`bytes`/`capacity_bytes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct TierCounters {
    /// Blocks held now.
    pub blocks: u64,
    /// Bytes held now.
    pub bytes: u64,
    /// The byte budget.
    pub capacity_bytes: u64,
    /// Blocks onboarded from this tier into G1 (prefix hits that were not recomputed).
    pub hits: u64,
    /// Bytes onboarded from this tier.
    pub onboard_bytes: u64,
    /// Blocks written into this tier.
    pub offload_blocks: u64,
    /// Bytes written into this tier.
    pub offload_bytes: u64,
    /// Blocks this tier evicted to stay within its budget.
    pub evictions: u64,
    /// Blocks refused: by the admission policy, or because the write queue was full.
    pub refusals: u64,
    /// Blocks found unusable (checksum, truncation, layout, header, missing, IO, full disk),
    /// dropped and recomputed.
    pub faults: u64,
    /// Of `faults`, those whose checksum failed.
    pub checksum_faults: u64,
    /// Of `faults`, those found truncated.
    pub truncated_faults: u64,
    /// Of `faults`, those written for another layout (or whose header was not a block's).
    pub layout_faults: u64,
    /// Of `faults`, failed writes (IO errors and a full disk).
    pub write_faults: u64,
}

/// The lower tiers' figures: G2 and G3.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct TierStats {
    /// Host memory.
    pub g2: TierCounters,
    /// Local disk.
    pub g3: TierCounters,
}

/// What the IO layer must do with bytes, in order, after a decision of the core.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Keep the content of G1 block `block` in host memory under `hash`.
    HostFromG1 {
        /// The evicted G1 block to copy out.
        block: u32,
        /// Its hashes.
        hash: BlockHash,
    },
    /// Write the content of G1 block `block` to disk (no G2 in between).
    DiskFromG1 {
        /// The evicted G1 block.
        block: u32,
        /// Its hashes.
        hash: BlockHash,
        /// Its parent.
        parent: Option<SequenceHash>,
        /// Who supplied it (the file is marked, and not kept across a restart).
        origin: Option<Origin>,
    },
    /// Write host memory's copy of `hash` to disk (G2 is evicting it).
    DiskFromHost {
        /// The block.
        hash: BlockHash,
        /// Its parent.
        parent: Option<SequenceHash>,
        /// Who supplied it.
        origin: Option<Origin>,
    },
    /// Free host memory's copy of `hash` (after any `DiskFromHost` for it).
    DropHost(SequenceHash),
    /// Delete the disk's copy of `hash`.
    DeleteDisk(SequenceHash),
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    hash: BlockHash,
    parent: Option<SequenceHash>,
    origin: Option<Origin>,
    tick: u64,
}

/// One tier's LRU index with a capacity in blocks.
#[derive(Debug, Clone, Default)]
struct Lru {
    capacity: u64,
    entries: FastMap<SequenceHash, Entry>,
    order: BTreeMap<u64, SequenceHash>,
    next_tick: u64,
}

impl Lru {
    fn new(capacity: u64) -> Self {
        Self {
            capacity,
            ..Self::default()
        }
    }

    fn contains(&self, hash: SequenceHash) -> bool {
        self.entries.contains_key(&hash)
    }

    fn touch(&mut self, hash: SequenceHash) {
        if let Some(e) = self.entries.get_mut(&hash) {
            self.order.remove(&e.tick);
            e.tick = self.next_tick;
            self.order.insert(e.tick, hash);
            self.next_tick += 1;
        }
    }

    /// Inserts as most recent (the caller made room).
    fn insert(&mut self, hash: BlockHash, parent: Option<SequenceHash>, origin: Option<Origin>) {
        let tick = self.next_tick;
        self.next_tick += 1;
        self.entries.insert(
            hash.sequence,
            Entry {
                hash,
                parent,
                origin,
                tick,
            },
        );
        self.order.insert(tick, hash.sequence);
    }

    fn remove(&mut self, hash: SequenceHash) -> Option<Entry> {
        let e = self.entries.remove(&hash)?;
        self.order.remove(&e.tick);
        Some(e)
    }

    fn pop_oldest(&mut self) -> Option<Entry> {
        let (_, hash) = self.order.pop_first()?;
        self.entries.remove(&hash)
    }

    fn is_full(&self) -> bool {
        self.entries.len() as u64 >= self.capacity
    }
}

/// The policy core of the lower tiers (see the module docs).
#[derive(Debug, Clone)]
pub struct TierBook {
    block_bytes: u64,
    admission: Admission,
    g2: Lru,
    g3: Lru,
    events: Vec<(Tier, KvEventData)>,
    stats: TierStats,
}

impl TierBook {
    /// A book for blocks of `block_bytes` bytes with `g2_blocks` blocks of host memory and
    /// `g3_blocks` of disk (0 turns a tier off).
    pub fn new(block_bytes: u64, g2_blocks: u64, g3_blocks: u64, admission: Admission) -> Self {
        let mut stats = TierStats::default();
        stats.g2.capacity_bytes = g2_blocks.saturating_mul(block_bytes);
        stats.g3.capacity_bytes = g3_blocks.saturating_mul(block_bytes);
        Self {
            block_bytes,
            admission,
            g2: Lru::new(g2_blocks),
            g3: Lru::new(g3_blocks),
            events: Vec::new(),
            stats,
        }
    }

    /// Whether any lower tier is on.
    pub fn enabled(&self) -> bool {
        self.g2.capacity > 0 || self.g3.capacity > 0
    }

    /// The admission policy.
    pub fn admission(&self) -> Admission {
        self.admission
    }

    /// The figures so far.
    pub fn stats(&self) -> TierStats {
        self.stats
    }

    /// The fastest lower tier holding `hash`.
    pub fn lookup(&self, hash: SequenceHash) -> Option<Tier> {
        if self.g2.contains(hash) {
            Some(Tier::G2)
        } else if self.g3.contains(hash) {
            Some(Tier::G3)
        } else {
            None
        }
    }

    /// Every block G3 holds, oldest first (what a restarted worker announces).
    pub fn g3_blocks(&self) -> Vec<SequenceHash> {
        self.g3.order.values().copied().collect()
    }

    /// Decides where a block evicted from G1 goes; the actions say what to do with its bytes.
    pub fn offload(&mut self, evicted: &Evicted, actions: &mut Vec<Action>) {
        let seq = evicted.hash.sequence;
        if self.g2.contains(seq) {
            self.g2.touch(seq);
            return;
        }
        let top = if self.g2.capacity > 0 {
            Tier::G2
        } else if self.g3.capacity > 0 {
            Tier::G3
        } else {
            return;
        };
        // A block a lower tier already holds was hit there: it is admitted as reused.
        let reused = evicted.reused || self.g3.contains(seq);
        if self.admission == Admission::Reused && !reused {
            self.counters(top).refusals += 1;
            return;
        }
        if top == Tier::G3 {
            if self.g3.contains(seq) {
                self.g3.touch(seq);
                return;
            }
            actions.push(Action::DiskFromG1 {
                block: evicted.block,
                hash: evicted.hash,
                parent: evicted.parent,
                origin: evicted.origin,
            });
            self.insert_g3(evicted.hash, evicted.parent, evicted.origin, actions);
            return;
        }
        while self.g2.is_full() {
            let Some(old) = self.g2.pop_oldest() else {
                break;
            };
            self.stats.g2.evictions += 1;
            self.forget(Tier::G2, old.hash.sequence);
            if self.g3.capacity > 0 && !self.g3.contains(old.hash.sequence) {
                actions.push(Action::DiskFromHost {
                    hash: old.hash,
                    parent: old.parent,
                    origin: old.origin,
                });
                self.insert_g3(old.hash, old.parent, old.origin, actions);
            } else if self.g3.contains(old.hash.sequence) {
                self.g3.touch(old.hash.sequence);
            }
            actions.push(Action::DropHost(old.hash.sequence));
        }
        actions.push(Action::HostFromG1 {
            block: evicted.block,
            hash: evicted.hash,
        });
        self.g2.insert(evicted.hash, evicted.parent, evicted.origin);
        self.remember(Tier::G2, evicted.hash, evicted.parent);
    }

    fn insert_g3(
        &mut self,
        hash: BlockHash,
        parent: Option<SequenceHash>,
        origin: Option<Origin>,
        actions: &mut Vec<Action>,
    ) {
        while self.g3.is_full() {
            let Some(old) = self.g3.pop_oldest() else {
                break;
            };
            self.stats.g3.evictions += 1;
            self.forget(Tier::G3, old.hash.sequence);
            actions.push(Action::DeleteDisk(old.hash.sequence));
        }
        self.g3.insert(hash, parent, origin);
        self.remember(Tier::G3, hash, parent);
    }

    /// Takes blocks a restarted worker found on its disk, oldest first, into G3; announces
    /// them. Beyond the budget, the oldest are deleted (the actions say which).
    pub fn restore_g3(
        &mut self,
        blocks: impl IntoIterator<Item = (BlockHash, Option<SequenceHash>)>,
        actions: &mut Vec<Action>,
    ) {
        for (hash, parent) in blocks {
            if self.g3.capacity == 0 {
                actions.push(Action::DeleteDisk(hash.sequence));
                continue;
            }
            if self.g3.contains(hash.sequence) {
                continue;
            }
            // Files of supplied blocks are deleted by the scan: none is restored with an origin.
            self.insert_g3(hash, parent, None, actions);
            // Restored, not written: undo the write figures `remember` counted.
            self.stats.g3.offload_blocks -= 1;
            self.stats.g3.offload_bytes -= self.block_bytes;
        }
    }

    /// Who supplied the block `hash` in the fastest lower tier holding it (`None`: not held,
    /// or computed here).
    pub fn origin_of(&self, hash: SequenceHash) -> Option<Origin> {
        self.g2
            .entries
            .get(&hash)
            .or_else(|| self.g3.entries.get(&hash))
            .and_then(|e| e.origin)
    }

    /// Drops every block `origin` supplied from G2 and G3 (`Removed` events; the actions free
    /// host memory and delete files). Returns how many entries went. O(entries).
    pub fn evict_origin(&mut self, origin: Origin, actions: &mut Vec<Action>) -> usize {
        let mut n = 0;
        for tier in [Tier::G2, Tier::G3] {
            let Some(lru) = self.lru(tier) else {
                continue;
            };
            let doomed: Vec<SequenceHash> = lru
                .entries
                .values()
                .filter(|e| e.origin == Some(origin))
                .map(|e| e.hash.sequence)
                .collect();
            for hash in doomed {
                if let Some(lru) = self.lru(tier) {
                    lru.remove(hash);
                }
                self.forget(tier, hash);
                actions.push(match tier {
                    Tier::G2 => Action::DropHost(hash),
                    _ => Action::DeleteDisk(hash),
                });
                n += 1;
            }
        }
        n
    }

    /// A block was brought from `tier` into G1.
    pub fn onboarded(&mut self, hash: SequenceHash, tier: Tier) {
        let block_bytes = self.block_bytes;
        let Some(lru) = self.lru(tier) else {
            return;
        };
        lru.touch(hash);
        let c = self.counters(tier);
        c.hits += 1;
        c.onboard_bytes += block_bytes;
    }

    /// A block in `tier` turned out unusable (or its write failed): drop it and count why.
    pub fn fault(&mut self, hash: SequenceHash, tier: Tier, fault: Fault) {
        let Some(lru) = self.lru(tier) else {
            return;
        };
        if lru.remove(hash).is_none() {
            return;
        }
        self.forget(tier, hash);
        let c = self.counters(tier);
        c.faults += 1;
        match fault {
            Fault::Checksum => c.checksum_faults += 1,
            Fault::Truncated => c.truncated_faults += 1,
            Fault::Layout | Fault::Header => c.layout_faults += 1,
            Fault::Io | Fault::NoSpace => c.write_faults += 1,
            Fault::Missing => {}
        }
    }

    /// A write to `tier` was refused (its queue was full): the block is not there after all.
    pub fn refused(&mut self, hash: SequenceHash, tier: Tier) {
        let Some(lru) = self.lru(tier) else {
            return;
        };
        if lru.remove(hash).is_some() {
            self.forget(tier, hash);
            let block_bytes = self.block_bytes;
            let c = self.counters(tier);
            c.refusals += 1;
            c.offload_blocks -= 1;
            c.offload_bytes -= block_bytes;
        }
    }

    /// Takes the lower tiers' cache changes since the last call, oldest first; runs of
    /// chained `Stored` and of `Removed` in one tier are merged into one event each.
    pub fn take_events(&mut self) -> Vec<(Tier, KvEventData)> {
        let mut out: Vec<(Tier, KvEventData)> = Vec::new();
        for (tier, data) in self.events.drain(..) {
            if let Some((last_tier, last)) = out.last_mut()
                && *last_tier == tier
            {
                match (last, &data) {
                    (
                        KvEventData::Stored { blocks, .. },
                        KvEventData::Stored {
                            parent: Some(p),
                            blocks: more,
                        },
                    ) if blocks.last().map(|b| b.sequence) == Some(*p) => {
                        blocks.extend_from_slice(more);
                        continue;
                    }
                    (KvEventData::Removed { blocks }, KvEventData::Removed { blocks: more }) => {
                        blocks.extend_from_slice(more);
                        continue;
                    }
                    _ => {}
                }
            }
            out.push((tier, data));
        }
        out
    }

    fn remember(&mut self, tier: Tier, hash: BlockHash, parent: Option<SequenceHash>) {
        let block_bytes = self.block_bytes;
        let c = self.counters(tier);
        c.blocks += 1;
        c.bytes += block_bytes;
        c.offload_blocks += 1;
        c.offload_bytes += block_bytes;
        self.events.push((
            tier,
            KvEventData::Stored {
                parent,
                blocks: vec![hash],
            },
        ));
    }

    fn forget(&mut self, tier: Tier, hash: SequenceHash) {
        let block_bytes = self.block_bytes;
        let c = self.counters(tier);
        c.blocks -= 1;
        c.bytes -= block_bytes;
        self.events
            .push((tier, KvEventData::Removed { blocks: vec![hash] }));
    }

    fn lru(&mut self, tier: Tier) -> Option<&mut Lru> {
        match tier {
            Tier::G2 => Some(&mut self.g2),
            Tier::G3 => Some(&mut self.g3),
            Tier::G1 | Tier::G4 => None,
        }
    }

    fn counters(&mut self, tier: Tier) -> &mut TierCounters {
        match tier {
            Tier::G3 => &mut self.stats.g3,
            _ => &mut self.stats.g2,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvfleet_proto::BlockSize;
    use kvfleet_proto::hash::block_hashes;

    fn chain(n: usize) -> Vec<BlockHash> {
        let tokens: Vec<u32> = (0..n as u32 * 4).collect();
        block_hashes(&tokens, BlockSize::new(4).unwrap())
    }

    fn evicted(h: &[BlockHash], i: usize, reused: bool) -> Evicted {
        Evicted {
            block: i as u32,
            hash: h[i],
            parent: i.checked_sub(1).map(|p| h[p].sequence),
            reused,
            origin: None,
        }
    }

    #[test]
    fn g1_evictions_fill_g2_then_spill_to_g3_then_fall_off() {
        let h = chain(5);
        let mut book = TierBook::new(10, 2, 2, Admission::All);
        let mut actions = Vec::new();
        for i in 0..5 {
            book.offload(&evicted(&h, i, false), &mut actions);
        }
        // G2 holds the two newest, G3 the two before, the oldest fell off the disk.
        assert_eq!(book.lookup(h[4].sequence), Some(Tier::G2));
        assert_eq!(book.lookup(h[3].sequence), Some(Tier::G2));
        assert_eq!(book.lookup(h[2].sequence), Some(Tier::G3));
        assert_eq!(book.lookup(h[1].sequence), Some(Tier::G3));
        assert_eq!(book.lookup(h[0].sequence), None);
        assert!(actions.contains(&Action::DeleteDisk(h[0].sequence)));
        assert!(actions.contains(&Action::DiskFromHost {
            hash: h[2],
            parent: Some(h[1].sequence),
            origin: None,
        }));
        // The host copy is written before it is dropped.
        let write = actions
            .iter()
            .position(|a| matches!(a, Action::DiskFromHost { hash, .. } if *hash == h[0]));
        let drop = actions
            .iter()
            .position(|a| *a == Action::DropHost(h[0].sequence));
        assert!(write.unwrap() < drop.unwrap());
        let s = book.stats();
        assert_eq!((s.g2.blocks, s.g2.bytes, s.g2.evictions), (2, 20, 3));
        assert_eq!(
            (s.g3.blocks, s.g3.evictions, s.g3.offload_blocks),
            (2, 1, 3)
        );
        // Events: G2 and G3 stored/removed, mirrored exactly by a replay.
        let mut held = std::collections::HashSet::new();
        for (tier, e) in book.take_events() {
            match e {
                KvEventData::Stored { blocks, .. } => {
                    for b in blocks {
                        assert!(held.insert((tier, b.sequence)));
                    }
                }
                KvEventData::Removed { blocks } => {
                    for b in blocks {
                        assert!(held.remove(&(tier, b)));
                    }
                }
                KvEventData::Cleared => unreachable!(),
            }
        }
        assert_eq!(held.len(), 4);
    }

    #[test]
    fn reused_admission_refuses_blocks_nobody_hit() {
        let h = chain(2);
        let mut book = TierBook::new(10, 4, 0, Admission::Reused);
        let mut actions = Vec::new();
        book.offload(&evicted(&h, 0, false), &mut actions);
        book.offload(&evicted(&h, 1, true), &mut actions);
        assert_eq!(book.lookup(h[0].sequence), None);
        assert_eq!(book.lookup(h[1].sequence), Some(Tier::G2));
        assert_eq!(book.stats().g2.refusals, 1);
        assert_eq!(actions.len(), 1);
    }

    #[test]
    fn onboarded_blocks_stay_and_are_not_written_twice() {
        let h = chain(1);
        let mut book = TierBook::new(10, 4, 0, Admission::All);
        let mut actions = Vec::new();
        book.offload(&evicted(&h, 0, false), &mut actions);
        book.onboarded(h[0].sequence, Tier::G2);
        actions.clear();
        book.offload(&evicted(&h, 0, true), &mut actions);
        assert!(actions.is_empty());
        let s = book.stats().g2;
        assert_eq!((s.hits, s.onboard_bytes, s.offload_blocks), (1, 10, 1));
    }

    #[test]
    fn faults_and_refusals_drop_the_block_and_are_counted() {
        let h = chain(3);
        let mut book = TierBook::new(10, 0, 8, Admission::All);
        let mut actions = Vec::new();
        for i in 0..3 {
            book.offload(&evicted(&h, i, false), &mut actions);
        }
        book.fault(h[0].sequence, Tier::G3, Fault::Checksum);
        book.fault(h[1].sequence, Tier::G3, Fault::Truncated);
        book.refused(h[2].sequence, Tier::G3);
        for x in &h {
            assert_eq!(book.lookup(x.sequence), None);
        }
        let s = book.stats().g3;
        assert_eq!(
            (
                s.blocks,
                s.faults,
                s.checksum_faults,
                s.truncated_faults,
                s.refusals
            ),
            (0, 2, 1, 1, 1)
        );
        assert_eq!(s.offload_blocks, 2);
        // The three stored blocks form one chained event; the removals merge too.
        let events = book.take_events();
        assert_eq!(events.len(), 2, "{events:?}");
        assert!(
            matches!(&events[0].1, KvEventData::Stored { parent: None, blocks } if blocks.len() == 3)
        );
    }

    #[test]
    fn restore_announces_and_trims_to_the_budget() {
        let h = chain(3);
        let mut book = TierBook::new(10, 0, 2, Admission::All);
        let mut actions = Vec::new();
        book.restore_g3(
            h.iter()
                .enumerate()
                .map(|(i, b)| (*b, i.checked_sub(1).map(|p| h[p].sequence))),
            &mut actions,
        );
        assert_eq!(actions, vec![Action::DeleteDisk(h[0].sequence)]);
        assert_eq!(book.g3_blocks(), vec![h[1].sequence, h[2].sequence]);
        assert_eq!(book.stats().g3.offload_blocks, 0);
    }
}
