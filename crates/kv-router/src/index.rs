//! The block index: which workers hold which blocks, in which tiers.
//!
//! Owns one flat hash map from a block's sequence hash to the small set of workers (and, per
//! worker, the tiers) that hold it, and the longest-prefix walk over a request's hashes. It does
//! not know about event ids, load or time: [`crate::Router`] validates events before they get here.
//!
//! Why a flat map and no tree: a sequence hash already names a block *and its whole prefix*, so
//! "does worker w hold the first i+1 blocks" is "does w hold seq[0..=i]", and a request's walk is
//! one lookup per block. Parent links would only serve to find descendants of an evicted block,
//! but engines report every evicted block themselves, so the index does not pay 8 bytes per block
//! for them.
//!
//! Memory layout (the index is sized for millions of blocks): a map entry is 16 bytes, the key
//! plus a packed `Holders` word. Up to two holders live inline in that word; a block held by
//! three or more workers spills to a `Slab` of flat `u32` arrays in size classes of 4, 8,
//! 16, ... holders (no allocation, header or allocator overhead per list). Each holder is a
//! `u32`: the worker's dense slot number shifted left by 4, or-ed with a 4-bit mask of the tiers
//! it holds the block in. Workers are named by slot here; the router maps [`kvfleet_proto::WorkerId`]s to
//! slots and purges a worker's blocks before its slot is reused.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};

use kvfleet_proto::{SequenceHash, Tier};

/// The number of worker slots the packed encodings allow: a slot fits in 27 bits and so does
/// the length of a holder list.
pub(crate) const MAX_SLOTS: u32 = (1 << 27) - 1;

/// Marks a [`Holders`] word that names a slab list rather than inline holders. A real holder
/// never has its top bit set because slots stay below [`MAX_SLOTS`], so inline words never do.
const SLAB_BIT: u64 = 1 << 63;

/// The bit for `tier` in a holder's tier mask.
pub(crate) const fn tier_bit(tier: Tier) -> u8 {
    1 << tier_index(tier)
}

/// `tier`'s position in [`Tier::ALL`] (G1 = 0).
pub(crate) const fn tier_index(tier: Tier) -> usize {
    match tier {
        Tier::G1 => 0,
        Tier::G2 => 1,
        Tier::G3 => 2,
        Tier::G4 => 3,
    }
}

/// The fastest tier in a non-empty mask, as an index into [`Tier::ALL`].
const fn best_tier(mask: u8) -> usize {
    mask.trailing_zeros() as usize
}

const fn pack(slot: u32, mask: u8) -> u32 {
    (slot << 4) | mask as u32
}

const fn unpack(holder: u32) -> (u32, u8) {
    (holder >> 4, (holder & 0xF) as u8)
}

/// The workers holding one block, packed into one word (see the module docs).
#[derive(Clone, Copy, PartialEq, Eq)]
struct Holders(u64);

impl Holders {
    const EMPTY: Holders = Holders(0);

    /// The slab list this word names: size class (5 bits), length (27 bits), index within the
    /// class (31 bits).
    fn list(self) -> Option<List> {
        (self.0 & SLAB_BIT != 0).then_some(List {
            class: ((self.0 >> 58) & 0x1F) as u32,
            len: ((self.0 >> 31) & u64::from(MAX_SLOTS)) as u32,
            index: (self.0 & 0x7FFF_FFFF) as u32,
        })
    }

    fn from_list(list: List) -> Self {
        Holders(
            SLAB_BIT
                | (u64::from(list.class) << 58)
                | (u64::from(list.len) << 31)
                | u64::from(list.index),
        )
    }

    fn inline(a: u32, b: u32) -> Self {
        // Canonical form: a filled slot never follows an empty one.
        if a == 0 {
            Holders(u64::from(b))
        } else {
            Holders(u64::from(a) | (u64::from(b) << 32))
        }
    }

    fn halves(self) -> (u32, u32) {
        (self.0 as u32, (self.0 >> 32) as u32)
    }
}

/// A holder list in the [`Slab`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct List {
    class: u32,
    len: u32,
    index: u32,
}

impl List {
    const fn capacity(self) -> usize {
        4 << self.class
    }
    const fn range(self) -> std::ops::Range<usize> {
        let start = self.index as usize * self.capacity();
        start..start + self.len as usize
    }
}

/// Holder lists of three or more workers: per size class (4, 8, 16, ... holders) one flat
/// array of fixed-size cells and a free list of cells. A list moves up a class when it fills
/// its cell and down when it shrinks to a quarter of it (the gap avoids bouncing).
#[derive(Debug, Default)]
struct Slab {
    classes: Vec<(Vec<u32>, Vec<u32>)>,
}

impl Slab {
    fn items(&self, list: List) -> &[u32] {
        &self.classes[list.class as usize].0[list.range()]
    }

    fn items_mut(&mut self, list: List) -> &mut [u32] {
        &mut self.classes[list.class as usize].0[list.range()]
    }

    /// A free cell in `class`, holding a copy of `items` (which must fit).
    fn alloc(&mut self, class: u32, items: &[u32]) -> List {
        if self.classes.len() <= class as usize {
            self.classes
                .resize_with(class as usize + 1, Default::default);
        }
        let capacity = 4usize << class;
        let (cells, free) = &mut self.classes[class as usize];
        let index = match free.pop() {
            Some(index) => index,
            None => {
                cells.resize(cells.len() + capacity, 0);
                (cells.len() / capacity - 1) as u32
            }
        };
        let list = List {
            class,
            len: items.len() as u32,
            index,
        };
        let start = index as usize * capacity;
        cells[start..start + items.len()].copy_from_slice(items);
        list
    }

    fn free(&mut self, list: List) {
        self.classes[list.class as usize].1.push(list.index);
    }

    /// Moves `list` to `class` (its items must fit) and frees its old cell.
    fn relocate(&mut self, list: List, class: u32) -> List {
        let mut items = [0u32; 64];
        let moved = if list.len as usize <= items.len() {
            items[..list.len as usize].copy_from_slice(self.items(list));
            self.alloc(class, &items[..list.len as usize])
        } else {
            let items = self.items(list).to_vec();
            self.alloc(class, &items)
        };
        self.free(list);
        moved
    }

    /// Lists in use, and bytes reserved (cells and free lists, by capacity).
    fn usage(&self) -> (u64, usize) {
        let mut lists = 0;
        let mut bytes = self.classes.capacity() * std::mem::size_of::<(Vec<u32>, Vec<u32>)>();
        for (class, (cells, free)) in self.classes.iter().enumerate() {
            lists += (cells.len() / (4 << class) - free.len()) as u64;
            bytes += (cells.capacity() + free.capacity()) * std::mem::size_of::<u32>();
        }
        (lists, bytes)
    }
}

/// Hashes the index's keys. Sequence hashes are already XXH3 output, so one keyed folded
/// multiply is enough to spread them; the key (from the router's seed) keeps someone who can
/// choose prompts from aiming many blocks at one bucket.
#[derive(Debug, Clone, Copy)]
pub(crate) struct KeyedHasher {
    key: u64,
    state: u64,
}

/// Builds [`KeyedHasher`]s with a fixed key.
#[derive(Debug, Clone, Copy)]
pub(crate) struct KeyedBuild(pub(crate) u64);

impl BuildHasher for KeyedBuild {
    type Hasher = KeyedHasher;
    fn build_hasher(&self) -> KeyedHasher {
        KeyedHasher {
            key: self.0,
            state: 0,
        }
    }
}

const MIX: u64 = 0x9e37_79b9_7f4a_7c15;

fn fold_mul(a: u64, b: u64) -> u64 {
    let full = u128::from(a) * u128::from(b);
    (full as u64) ^ ((full >> 64) as u64)
}

impl Hasher for KeyedHasher {
    fn finish(&self) -> u64 {
        fold_mul(self.state ^ self.key, MIX)
    }
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(word));
        }
    }
    fn write_u64(&mut self, value: u64) {
        self.state = fold_mul(self.state ^ value, MIX ^ self.key).wrapping_add(value);
    }
    fn write_u32(&mut self, value: u32) {
        self.write_u64(u64::from(value));
    }
    fn write_u128(&mut self, value: u128) {
        self.write_u64(value as u64);
        self.write_u64((value >> 64) as u64);
    }
}

/// Per-call scratch for the overlap walk, kept by the router so a walk allocates nothing.
/// Entries are valid only where their stamp equals the current generation, so nothing is
/// cleared between calls. One struct per slot so that visiting a holder touches one cache line.
#[derive(Debug, Default)]
pub(crate) struct Scratch {
    generation: u32,
    slots: Vec<SlotScratch>,
    /// Candidate slots that hold at least the first block, in the order they were found.
    pub(crate) touched: Vec<u32>,
}

#[derive(Debug, Default, Clone, Copy)]
struct SlotScratch {
    /// Equals the generation when the slot is a candidate in this walk.
    candidate: u32,
    /// Equals the generation when `depth` and `lower` belong to this walk.
    stamp: u32,
    depth: u32,
    /// Of the `depth` blocks, how many are held in G2, G3, G4 only (the rest are in G1).
    lower: [u32; 3],
}

/// How much of a prompt one worker holds, from a walk: `blocks` leading blocks, of which
/// `lower[i]` are held no higher than tier G2+i.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Held {
    pub(crate) blocks: u32,
    pub(crate) lower: [u32; 3],
}

impl Held {
    /// The blocks weighted by the best tier each is in.
    pub(crate) fn weighted(&self, weights: &[f64; 4]) -> f64 {
        let lower: u32 = self.lower.iter().sum();
        f64::from(self.blocks - lower) * weights[0]
            + self
                .lower
                .iter()
                .zip(&weights[1..])
                .map(|(&n, w)| f64::from(n) * w)
                .sum::<f64>()
    }
}

impl Scratch {
    /// Starts a walk over `slots` worker slots with an empty candidate set.
    pub(crate) fn begin(&mut self, slots: usize) {
        if self.slots.len() < slots {
            self.slots.resize(slots, SlotScratch::default());
        }
        self.generation = self.generation.wrapping_add(1);
        if self.generation == 0 {
            self.slots.fill(SlotScratch::default());
            self.generation = 1;
        }
        self.touched.clear();
    }

    /// Lets the next walk advance `slot`.
    pub(crate) fn add_candidate(&mut self, slot: u32) {
        self.slots[slot as usize].candidate = self.generation;
    }

    /// The longest prefix `slot` holds, after a walk.
    pub(crate) fn overlap(&self, slot: u32) -> Held {
        match self.slots.get(slot as usize) {
            Some(s) if s.stamp == self.generation => Held {
                blocks: s.depth,
                lower: s.lower,
            },
            _ => Held::default(),
        }
    }
}

/// Which workers (by slot) hold which blocks, in which tiers.
#[derive(Debug)]
pub(crate) struct BlockIndex {
    map: HashMap<u64, Holders, KeyedBuild>,
    slab: Slab,
    /// Blocks per slot per tier, for metrics and for skipping scans of empty workers.
    counts: Vec<[u64; 4]>,
    /// (block, worker, tier) triples held.
    entries: u64,
}

impl std::fmt::Debug for Holders {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Holders({:#x})", self.0)
    }
}

/// Sizes of the index's structures, for metrics and the memory benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct IndexStats {
    /// Distinct block hashes held by at least one worker.
    pub blocks: u64,
    /// (block, worker, tier) triples: a block held by 3 workers in G1 and one of them also in
    /// G2 counts 4.
    pub entries: u64,
    /// Blocks held by three or more workers (their holder lists live in the slab).
    pub shared_blocks: u64,
    /// Estimated heap bytes of the index, computed from the structures' capacities (hash table
    /// buckets and control bytes, slab arrays); allocator overhead is not included.
    pub heap_bytes: u64,
}

impl BlockIndex {
    pub(crate) fn new(seed: u64) -> Self {
        Self {
            map: HashMap::with_hasher(KeyedBuild(seed)),
            slab: Slab::default(),
            counts: Vec::new(),
            entries: 0,
        }
    }

    /// Makes room for `slot` in the per-slot counters.
    pub(crate) fn ensure_slot(&mut self, slot: u32) {
        let need = slot as usize + 1;
        if self.counts.len() < need {
            self.counts.resize(need, [0; 4]);
        }
    }

    /// Blocks `slot` holds per tier, in [`Tier::ALL`] order.
    pub(crate) fn counts(&self, slot: u32) -> [u64; 4] {
        self.counts.get(slot as usize).copied().unwrap_or([0; 4])
    }

    /// The tier mask `slot` holds `hash` in (0 when it does not hold it).
    pub(crate) fn tiers_of(&self, hash: SequenceHash, slot: u32) -> u8 {
        let mut found = 0;
        if let Some(holders) = self.map.get(&hash.0) {
            self.each_holder(*holders, |s, mask| {
                if s == slot {
                    found = mask;
                }
            });
        }
        found
    }

    fn each_holder(&self, holders: Holders, mut f: impl FnMut(u32, u8)) {
        if let Some(list) = holders.list() {
            for &h in self.slab.items(list) {
                let (slot, mask) = unpack(h);
                f(slot, mask);
            }
        } else {
            let (a, b) = holders.halves();
            for h in [a, b] {
                if h != 0 {
                    let (slot, mask) = unpack(h);
                    f(slot, mask);
                }
            }
        }
    }

    /// Adds `tier` to what `slot` holds of `hash`; true when it was not there yet.
    pub(crate) fn insert(&mut self, hash: SequenceHash, slot: u32, tier: Tier) -> bool {
        let bit = tier_bit(tier);
        let (old, new) = self.update(hash.0, slot, |mask| mask | bit);
        let added = old & bit == 0 && new & bit != 0;
        if added {
            self.counts[slot as usize][tier_index(tier)] += 1;
            self.entries += 1;
        }
        added
    }

    /// Removes `tier` from what `slot` holds of `hash`; true when it was there.
    pub(crate) fn remove(&mut self, hash: SequenceHash, slot: u32, tier: Tier) -> bool {
        let bit = tier_bit(tier);
        if !self.map.contains_key(&hash.0) {
            return false;
        }
        let (old, _) = self.update(hash.0, slot, |mask| mask & !bit);
        let removed = old & bit != 0;
        if removed {
            self.counts[slot as usize][tier_index(tier)] -= 1;
            self.entries -= 1;
        }
        removed
    }

    /// Applies `f` to `slot`'s tier mask for `hash` and stores the result; returns (old, new).
    fn update(&mut self, key: u64, slot: u32, f: impl FnOnce(u8) -> u8) -> (u8, u8) {
        let holders = self.map.get(&key).copied().unwrap_or(Holders::EMPTY);
        let (old, new, updated) = match holders.list() {
            Some(mut list) => {
                let items = self.slab.items_mut(list);
                let pos = items.iter().position(|&h| unpack(h).0 == slot);
                let old = pos.map_or(0, |p| unpack(items[p]).1);
                let new = f(old);
                match (pos, new) {
                    (Some(p), 0) => {
                        items[p] = items[items.len() - 1];
                        list.len -= 1;
                    }
                    (Some(p), m) => items[p] = pack(slot, m),
                    (None, 0) => {}
                    (None, m) => {
                        if list.len as usize == list.capacity() {
                            list = self.slab.relocate(list, list.class + 1);
                        }
                        list.len += 1;
                        let last = list.len as usize - 1;
                        self.slab.items_mut(list)[last] = pack(slot, m);
                    }
                }
                let updated = if list.len <= 2 {
                    let items = self.slab.items(list);
                    let a = items.first().copied().unwrap_or(0);
                    let b = items.get(1).copied().unwrap_or(0);
                    self.slab.free(list);
                    Holders::inline(a, b)
                } else if list.class > 0 && list.len as usize <= list.capacity() / 4 {
                    Holders::from_list(self.slab.relocate(list, list.class - 1))
                } else {
                    Holders::from_list(list)
                };
                (old, new, updated)
            }
            None => {
                let (mut a, mut b) = holders.halves();
                let old = if a != 0 && unpack(a).0 == slot {
                    unpack(a).1
                } else if b != 0 && unpack(b).0 == slot {
                    unpack(b).1
                } else {
                    0
                };
                let new = f(old);
                let updated = if old != 0 {
                    let packed = if new == 0 { 0 } else { pack(slot, new) };
                    if unpack(a).0 == slot && a != 0 {
                        a = packed;
                    } else {
                        b = packed;
                    }
                    Holders::inline(a, b)
                } else if new == 0 {
                    holders
                } else if a == 0 {
                    Holders::inline(pack(slot, new), 0)
                } else if b == 0 {
                    Holders::inline(a, pack(slot, new))
                } else {
                    Holders::from_list(self.slab.alloc(0, &[a, b, pack(slot, new)]))
                };
                (old, new, updated)
            }
        };
        if updated != holders {
            if updated == Holders::EMPTY {
                self.map.remove(&key);
            } else {
                self.map.insert(key, updated);
            }
        }
        (old, new)
    }

    /// Drops the tiers in `mask` from every block `slot` holds (a `Cleared` event, or the
    /// worker leaving).
    pub(crate) fn clear_slot(&mut self, slot: u32, mask: u8) {
        let mut masks = vec![0u8; self.counts.len()];
        if let Some(m) = masks.get_mut(slot as usize) {
            *m = mask;
        }
        self.clear_slots(&masks);
    }

    /// Drops, for every slot `s`, the tiers in `masks[s]` from every block it holds. One pass
    /// over the whole map: clears are rare (engine restarts, workers leaving, re-syncs), and a
    /// per-worker block list that would make them cheap would double the index's memory.
    pub(crate) fn clear_slots(&mut self, masks: &[u8]) {
        let held: u64 = masks
            .iter()
            .zip(&self.counts)
            .map(|(mask, counts)| {
                Tier::ALL
                    .iter()
                    .filter(|t| mask & tier_bit(**t) != 0)
                    .map(|t| counts[tier_index(*t)])
                    .sum::<u64>()
            })
            .sum();
        if held == 0 {
            return;
        }
        let mut hits = Vec::new();
        for (key, holders) in &self.map {
            self.each_holder(*holders, |slot, mask| {
                let clear = masks.get(slot as usize).copied().unwrap_or(0) & mask;
                if clear != 0 {
                    hits.push((*key, slot, clear));
                }
            });
        }
        for (key, slot, clear) in hits {
            self.update(key, slot, |m| m & !clear);
        }
        for (mask, counts) in masks.iter().zip(self.counts.iter_mut()) {
            for tier in Tier::ALL {
                if mask & tier_bit(tier) != 0 {
                    self.entries -= counts[tier_index(tier)];
                    counts[tier_index(tier)] = 0;
                }
            }
        }
    }

    /// Walks `hashes` in order and records, for every candidate in `scratch`, how many leading
    /// blocks it holds (in any tier) and their tier-weighted sum. Stops at the first block no
    /// candidate still in the race holds: later blocks cannot extend anyone's prefix.
    pub(crate) fn walk(&self, hashes: &[SequenceHash], scratch: &mut Scratch) {
        // Lookups are done a batch at a time: they do not depend on each other, so the CPU can
        // overlap their cache misses (a large index is one or two DRAM misses per block).
        const BATCH: usize = 8;
        let generation = scratch.generation;
        let mut i = 0u32;
        for batch in hashes.chunks(BATCH) {
            let mut found = [Holders::EMPTY; BATCH];
            for (slot, hash) in found.iter_mut().zip(batch) {
                *slot = self.map.get(&hash.0).copied().unwrap_or(Holders::EMPTY);
            }
            for holders in &found[..batch.len()] {
                if *holders == Holders::EMPTY {
                    return;
                }
                let mut advanced = false;
                self.each_holder(*holders, |slot, mask| {
                    let Some(s) = scratch.slots.get_mut(slot as usize) else {
                        return;
                    };
                    if s.candidate != generation {
                        return;
                    }
                    if s.stamp != generation {
                        if i != 0 {
                            return;
                        }
                        s.stamp = generation;
                        s.depth = 0;
                        s.lower = [0; 3];
                        scratch.touched.push(slot);
                    } else if s.depth != i {
                        return;
                    }
                    s.depth = i + 1;
                    let best = best_tier(mask);
                    if best > 0 {
                        s.lower[best - 1] += 1;
                    }
                    advanced = true;
                });
                if !advanced {
                    return;
                }
                i += 1;
            }
        }
    }

    /// Every (slot, tier, hash) held, grouped by slot then tier, for snapshots. Hashes within a
    /// group are sorted so snapshots of equal indexes are equal.
    pub(crate) fn export(&self, slot_filter: Option<u32>) -> Vec<(u32, [Vec<SequenceHash>; 4])> {
        let mut by_slot: HashMap<u32, [Vec<SequenceHash>; 4]> = HashMap::new();
        for (key, holders) in &self.map {
            self.each_holder(*holders, |slot, mask| {
                if slot_filter.is_some_and(|only| only != slot) {
                    return;
                }
                let tiers = by_slot.entry(slot).or_default();
                for tier in Tier::ALL {
                    if mask & tier_bit(tier) != 0 {
                        tiers[tier_index(tier)].push(SequenceHash(*key));
                    }
                }
            });
        }
        let mut out: Vec<_> = by_slot.into_iter().collect();
        out.sort_by_key(|(slot, _)| *slot);
        for (_, tiers) in &mut out {
            for list in tiers.iter_mut() {
                list.sort_unstable();
            }
        }
        out
    }

    pub(crate) fn stats(&self) -> IndexStats {
        let (shared_blocks, slab) = self.slab.usage();
        // hashbrown keeps capacity at 7/8 of a power-of-two bucket count and one control byte
        // per bucket plus one group (16) of trailing control bytes.
        let cap = self.map.capacity();
        let buckets = if cap == 0 {
            0
        } else {
            (cap * 8 / 7).next_power_of_two()
        };
        let entry = std::mem::size_of::<(u64, Holders)>();
        let table = if buckets == 0 {
            0
        } else {
            buckets * (entry + 1) + 16
        };
        let counts = self.counts.capacity() * std::mem::size_of::<[u64; 4]>();
        IndexStats {
            blocks: self.map.len() as u64,
            entries: self.entries,
            shared_blocks,
            heap_bytes: (table + slab + counts) as u64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(n: u64) -> SequenceHash {
        SequenceHash(n)
    }

    fn index(slots: u32) -> BlockIndex {
        let mut index = BlockIndex::new(7);
        index.ensure_slot(slots);
        index
    }

    #[test]
    fn a_map_entry_is_sixteen_bytes() {
        assert_eq!(std::mem::size_of::<(u64, Holders)>(), 16);
    }

    #[test]
    fn holders_spill_to_the_slab_and_come_back() {
        let mut idx = index(10);
        for slot in 0..5 {
            assert!(idx.insert(h(1), slot, Tier::G1));
        }
        assert!(!idx.insert(h(1), 3, Tier::G1), "second insert is a no-op");
        assert_eq!(idx.stats().shared_blocks, 1);
        assert!(idx.insert(h(1), 3, Tier::G2));
        assert_eq!(
            idx.tiers_of(h(1), 3),
            tier_bit(Tier::G1) | tier_bit(Tier::G2)
        );
        for slot in [0, 1, 2] {
            assert!(idx.remove(h(1), slot, Tier::G1));
        }
        let stats = idx.stats();
        assert_eq!(stats.shared_blocks, 0, "two holders fit inline again");
        assert_eq!(stats.blocks, 1);
        assert_eq!(stats.entries, 3);
        assert_eq!(idx.tiers_of(h(1), 4), tier_bit(Tier::G1));
        assert!(idx.remove(h(1), 3, Tier::G1));
        assert!(idx.remove(h(1), 3, Tier::G2));
        assert!(idx.remove(h(1), 4, Tier::G1));
        assert!(!idx.remove(h(1), 4, Tier::G1));
        assert_eq!(idx.stats().blocks, 0);
        assert_eq!(idx.stats().entries, 0);
    }

    #[test]
    fn long_holder_lists_move_through_size_classes_both_ways() {
        let mut idx = index(200);
        let holders = |idx: &BlockIndex| -> Vec<u32> {
            let mut slots: Vec<u32> = (0..200).filter(|&s| idx.tiers_of(h(9), s) != 0).collect();
            slots.sort_unstable();
            slots
        };
        for slot in 0..150 {
            assert!(idx.insert(h(9), slot, Tier::G1));
            idx.insert(h(10), slot % 4, Tier::G2);
        }
        assert_eq!(holders(&idx), (0..150).collect::<Vec<_>>());
        assert_eq!(idx.stats().shared_blocks, 2);
        // Remove in a scattered order, checking the survivors after every step.
        let mut left: Vec<u32> = (0..150).collect();
        for k in 0..148 {
            let slot = left.remove((k * 37) % left.len());
            assert!(idx.remove(h(9), slot, Tier::G1));
            assert_eq!(holders(&idx), left);
        }
        assert_eq!(idx.stats().shared_blocks, 1, "two holders are inline again");
        assert_eq!(idx.stats().entries, 2 + 4);
        // Freed cells are reused rather than grown.
        let before = idx.slab.usage().1;
        for slot in 0..150 {
            idx.insert(h(11), slot, Tier::G3);
        }
        assert_eq!(idx.slab.usage().1, before);
    }

    #[test]
    fn the_walk_counts_only_unbroken_prefixes_of_candidates() {
        let mut idx = index(4);
        // slot 0 holds blocks 0,1,3; slot 1 holds 0,1,2,3 with block 1 only in G2; slot 2 holds
        // block 1 only; slot 3 holds everything but is not a candidate.
        for (slot, blocks) in [(0, vec![0, 1, 3]), (2, vec![1]), (3, vec![0, 1, 2, 3])] {
            for b in blocks {
                idx.insert(h(b), slot, Tier::G1);
            }
        }
        for b in [0, 2, 3] {
            idx.insert(h(b), 1, Tier::G1);
        }
        idx.insert(h(1), 1, Tier::G2);
        let mut scratch = Scratch::default();
        scratch.begin(4);
        for slot in 0..3 {
            scratch.add_candidate(slot);
        }
        let hashes: Vec<_> = (0..4).map(h).collect();
        idx.walk(&hashes, &mut scratch);
        let weights = [1.0, 0.5, 0.25, 0.125];
        let held = |slot| {
            let held = scratch.overlap(slot);
            (held.blocks, held.lower, held.weighted(&weights))
        };
        assert_eq!(held(0), (2, [0; 3], 2.0));
        assert_eq!(held(1), (4, [1, 0, 0], 3.5));
        assert_eq!(held(2), (0, [0; 3], 0.0));
        assert_eq!(held(3), (0, [0; 3], 0.0), "not a candidate");
        // A new walk forgets the old one.
        scratch.begin(4);
        scratch.add_candidate(3);
        idx.walk(&hashes, &mut scratch);
        assert_eq!(scratch.overlap(0), Held::default());
        assert_eq!(scratch.overlap(3).blocks, 4);
    }

    #[test]
    fn clearing_one_tier_keeps_the_others() {
        let mut idx = index(2);
        for b in 0..5 {
            idx.insert(h(b), 0, Tier::G1);
            idx.insert(h(b), 0, Tier::G3);
            idx.insert(h(b), 1, Tier::G1);
        }
        idx.clear_slot(0, tier_bit(Tier::G1));
        assert_eq!(idx.counts(0), [0, 0, 5, 0]);
        assert_eq!(idx.counts(1), [5, 0, 0, 0]);
        assert_eq!(idx.tiers_of(h(3), 0), tier_bit(Tier::G3));
        idx.clear_slot(0, 0xF);
        assert_eq!(idx.stats().entries, 5);
        assert_eq!(idx.export(None).len(), 1);
    }
}
