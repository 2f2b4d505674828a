//! The block index: which workers hold which blocks, in which tiers.
//!
//! Owns the blocks' holder sets and the longest-prefix walk over a request's hashes. It does
//! not know about event ids, load or time: [`crate::Router`] validates events before they get here.
//!
//! What it answers is exactly what a flat map from a block's sequence hash to its holders
//! would: "does worker w hold the first i+1 blocks" is "does w hold seq[0..=i]" (a sequence
//! hash names a block *and its whole prefix*), whatever order the hashes came in. How it stores
//! that is a **compressed-run index**:
//!
//! - An *arena* keeps every indexed block's hash in one array, and a hash map takes a hash to
//!   its arena position. Blocks stored by one event are appended in order, so a chain sits
//!   contiguously in the arena.
//! - The arena is cut into *runs*: maximal stretches of adjacent positions whose blocks have the
//!   same holder set (workers and their tiers). A run stores that set once. A worker storing or
//!   evicting part of a run splits it (the smaller side moves to a new run id); runs next to
//!   each other that end up with equal sets are merged again, so a worker evicting a tail block
//!   by block (as engines do, leaves first) leaves one run, not one per block.
//! - A walk probes the map once for a run, then compares the request's next hashes against the
//!   arena's contiguous hashes (a vectorisable compare, no probe), credits every holder once for
//!   the whole stretch, and probes again only where the request leaves the arena's order. A
//!   prompt of thousands of blocks held by hundreds of workers costs a few probes and a few
//!   holder-set visits, not one probe and one holder list per block.
//! - Events are applied a stretch at a time: consecutive blocks of an event that sit in one run
//!   are found by comparing the neighbouring arena hash (no probe), and their holder set changes
//!   once.
//! - Evicted blocks leave holes in the arena; when holes outnumber the live blocks, the arena is
//!   compacted in one sequential pass (the map's values are rewritten by iterating its table,
//!   not by lookups), so the arena stays under 4/3 of the live blocks.
//!
//! Holder sets: up to two holders live inline in the run's one-word `Holders`; three or more
//! spill to a `Slab` of flat `u32` arrays in size classes of 4, 8, 16, ... holders. Each holder
//! is a `u32`: the worker's dense slot number shifted left by 4, or-ed with a 4-bit mask of the
//! tiers it holds the run's blocks in; a set is kept sorted, so equal sets compare equal word by
//! word. Workers are named by slot here; the router maps [`kvfleet_proto::WorkerId`]s to slots
//! and purges a worker's blocks before its slot is reused.

use std::collections::HashMap;

use hashbrown::HashTable;
use hashbrown::hash_table::Entry;
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
/// array of fixed-size cells and a free list of cells. A run's list is rewritten whole when its
/// holders change (in the smallest class it fits), so a list never grows in place.
#[derive(Debug, Default)]
struct Slab {
    classes: Vec<(Vec<u32>, Vec<u32>)>,
}

impl Slab {
    fn items(&self, list: List) -> &[u32] {
        &self.classes[list.class as usize].0[list.range()]
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

/// Marks an arena position whose block was evicted (a hole until the next compaction).
const DEAD: u32 = u32::MAX;

/// Holes tolerated before a compaction is considered (below this the arena is small anyway).
const COMPACT_MIN_HOLES: usize = 4096;

/// The arena is compacted when more than one position in this many is a hole: memory (the
/// arena is 12 bytes a position) against the compactions' passes.
const HOLE_SHARE: usize = 4;

/// A stretch of adjacent arena positions whose blocks share one holder set. A free run id
/// (on `BlockIndex::free_runs`) has `len == 0`.
#[derive(Debug, Clone, Copy)]
struct Run {
    start: u32,
    len: u32,
    holders: Holders,
}

impl Run {
    const fn end(&self) -> u32 {
        self.start + self.len
    }
}

/// Which workers (by slot) hold which blocks, in which tiers.
#[derive(Debug)]
pub(crate) struct BlockIndex {
    /// A block's sequence hash to its arena position: the table stores only the position (4
    /// bytes) and compares keys against the arena, so no hash is stored twice.
    map: HashTable<u32>,
    build: KeyedBuild,
    /// The arena: each position's block hash (stale where `run_of` is [`DEAD`]).
    hashes: Vec<u64>,
    /// The arena: each position's run id, or [`DEAD`].
    run_of: Vec<u32>,
    /// Holes in the arena.
    dead: usize,
    runs: Vec<Run>,
    free_runs: Vec<u32>,
    slab: Slab,
    /// Blocks per slot per tier, for metrics and for skipping scans of empty workers.
    counts: Vec<[u64; 4]>,
    /// (block, worker, tier) triples held.
    entries: u64,
    /// Holes tolerated before compacting ([`COMPACT_MIN_HOLES`]; lower in tests).
    compact_min: usize,
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
    /// Blocks held by three or more workers (their runs' holder lists live in the slab).
    pub shared_blocks: u64,
    /// Estimated heap bytes of the index, computed from the structures' capacities (hash table
    /// buckets and control bytes, the arena with its holes, runs, slab arrays); allocator
    /// overhead is not included.
    pub heap_bytes: u64,
}

/// The length of the common prefix of `arena` and `query` (equal lengths). Compares 16 at a
/// time without an early exit inside a chunk, which the compiler vectorises.
fn common_prefix(arena: &[u64], query: &[SequenceHash]) -> usize {
    const CHUNK: usize = 16;
    let mut n = 0;
    for (a, q) in arena.chunks(CHUNK).zip(query.chunks(CHUNK)) {
        let all = a.iter().zip(q).fold(true, |acc, (x, y)| acc & (*x == y.0));
        if all {
            n += a.len();
        } else {
            return n + a.iter().zip(q).take_while(|(x, y)| **x == y.0).count();
        }
    }
    n
}

/// The size class whose cells fit `len` holders.
fn class_for(len: usize) -> u32 {
    let mut class = 0;
    while (4usize << class) < len {
        class += 1;
    }
    class
}

/// A stretch of arena positions `[lo, hi)` in one run, gathered from consecutive blocks of an
/// event so that their holder set changes once.
#[derive(Debug, Clone, Copy)]
struct Stretch {
    lo: u32,
    hi: u32,
}

impl BlockIndex {
    pub(crate) fn new(seed: u64) -> Self {
        Self {
            map: HashTable::new(),
            build: KeyedBuild(seed),
            hashes: Vec::new(),
            run_of: Vec::new(),
            dead: 0,
            runs: Vec::new(),
            free_runs: Vec::new(),
            slab: Slab::default(),
            counts: Vec::new(),
            entries: 0,
            compact_min: COMPACT_MIN_HOLES,
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
        let Some(pos) = self.find(hash.0) else {
            return 0;
        };
        let run = self.runs[self.run_of[pos as usize] as usize];
        let mut found = 0;
        self.each_holder(run.holders, |s, mask| {
            if s == slot {
                found = mask;
            }
        });
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

    /// `holders` as a sorted list, appended to `out`.
    fn holders_into(&self, holders: Holders, out: &mut Vec<u32>) {
        if let Some(list) = holders.list() {
            out.extend_from_slice(self.slab.items(list));
        } else {
            let (a, b) = holders.halves();
            out.extend([a, b].into_iter().filter(|&h| h != 0));
        }
    }

    /// Stores a sorted holder list: inline up to two, else a new slab list.
    fn store_holders(&mut self, items: &[u32]) -> Holders {
        match items {
            [] => Holders::EMPTY,
            [a] => Holders(u64::from(*a)),
            [a, b] => Holders(u64::from(*a) | (u64::from(*b) << 32)),
            _ => Holders::from_list(self.slab.alloc(class_for(items.len()), items)),
        }
    }

    fn release(&mut self, holders: Holders) {
        if let Some(list) = holders.list() {
            self.slab.free(list);
        }
    }

    fn copy_holders(&mut self, holders: Holders) -> Holders {
        match holders.list() {
            Some(list) => {
                let items = self.slab.items(list).to_vec();
                Holders::from_list(self.slab.alloc(list.class, &items))
            }
            None => holders,
        }
    }

    fn same_holders(&self, a: Holders, b: Holders) -> bool {
        match (a.list(), b.list()) {
            (None, None) => a == b,
            (Some(x), Some(y)) => self.slab.items(x) == self.slab.items(y),
            _ => false,
        }
    }

    fn new_run(&mut self, start: u32, len: u32, holders: Holders) -> u32 {
        let run = Run {
            start,
            len,
            holders,
        };
        match self.free_runs.pop() {
            Some(id) => {
                self.runs[id as usize] = run;
                id
            }
            None => {
                self.runs.push(run);
                (self.runs.len() - 1) as u32
            }
        }
    }

    fn relabel(&mut self, from: u32, to: u32, id: u32) {
        self.run_of[from as usize..to as usize].fill(id);
    }

    /// Splits run `id` at arena position `at` (strictly inside it); the smaller side moves to a
    /// new run id. Returns (head, tail).
    fn split(&mut self, id: u32, at: u32) -> (u32, u32) {
        let run = self.runs[id as usize];
        let holders = self.copy_holders(run.holders);
        let (head_len, tail_len) = (at - run.start, run.end() - at);
        if head_len < tail_len {
            let head = self.new_run(run.start, head_len, holders);
            self.relabel(run.start, at, head);
            let r = &mut self.runs[id as usize];
            r.start = at;
            r.len = tail_len;
            (head, id)
        } else {
            let tail = self.new_run(at, tail_len, holders);
            self.relabel(at, run.end(), tail);
            self.runs[id as usize].len = head_len;
            (id, tail)
        }
    }

    /// Splits as needed so that `[lo, hi)` (within one run) is exactly one run; returns it.
    fn isolate(&mut self, lo: u32, hi: u32) -> u32 {
        let mut id = self.run_of[lo as usize];
        if self.runs[id as usize].start < lo {
            id = self.split(id, lo).1;
        }
        if self.runs[id as usize].end() > hi {
            id = self.split(id, hi).0;
        }
        id
    }

    /// Merges run `b` into the run `a` directly before it in the arena (the longer keeps its
    /// id); returns the merged run's id.
    fn merge(&mut self, a: u32, b: u32) -> u32 {
        let (ra, rb) = (self.runs[a as usize], self.runs[b as usize]);
        let (keep, gone) = if ra.len >= rb.len { (a, b) } else { (b, a) };
        let g = self.runs[gone as usize];
        self.relabel(g.start, g.end(), keep);
        self.release(g.holders);
        self.runs[keep as usize].start = ra.start;
        self.runs[keep as usize].len = ra.len + rb.len;
        self.runs[gone as usize].len = 0;
        self.free_runs.push(gone);
        keep
    }

    /// After run `id`'s holders changed: drops it if nobody holds it any more, else merges it
    /// with equal neighbours.
    fn settle(&mut self, id: u32) {
        let run = self.runs[id as usize];
        if run.holders == Holders::EMPTY {
            self.kill(id);
            return;
        }
        let mut id = id;
        if run.start > 0 {
            let left = self.run_of[run.start as usize - 1];
            if left != DEAD && self.same_holders(self.runs[left as usize].holders, run.holders) {
                id = self.merge(left, id);
            }
        }
        let end = self.runs[id as usize].end();
        if let Some(&right) = self.run_of.get(end as usize)
            && right != DEAD
            && self.same_holders(
                self.runs[id as usize].holders,
                self.runs[right as usize].holders,
            )
        {
            self.merge(id, right);
        }
    }

    /// Forgets run `id`'s blocks: nobody holds them.
    fn kill(&mut self, id: u32) {
        let run = self.runs[id as usize];
        for pos in run.start..run.end() {
            let key = self.hashes[pos as usize];
            let hashes = &self.hashes;
            if let Ok(entry) = self
                .map
                .find_entry(self.build.hash_one(key), |&p| hashes[p as usize] == key)
            {
                entry.remove();
            }
        }
        self.run_of[run.start as usize..run.end() as usize].fill(DEAD);
        self.dead += run.len as usize;
        self.release(run.holders);
        self.runs[id as usize].len = 0;
        self.free_runs.push(id);
        // Holes at the end of the arena are simply cut off.
        while self.run_of.last() == Some(&DEAD) {
            self.run_of.pop();
            self.hashes.pop();
            self.dead -= 1;
        }
    }

    /// Applies `f` to `slot`'s tier mask on every block of `[lo, hi)` (within one run, so one
    /// mask for all); returns (old, new).
    fn change(&mut self, s: Stretch, slot: u32, f: impl FnOnce(u8) -> u8) -> (u8, u8) {
        let id = self.run_of[s.lo as usize];
        let mut items = Vec::new();
        self.holders_into(self.runs[id as usize].holders, &mut items);
        let found = items.binary_search_by_key(&slot, |&h| unpack(h).0);
        let old = found.map_or(0, |p| unpack(items[p]).1);
        let new = f(old);
        if new == old {
            return (old, new);
        }
        match (found, new) {
            (Ok(p), 0) => {
                items.remove(p);
            }
            (Ok(p), m) => items[p] = pack(slot, m),
            (Err(p), m) => items.insert(p, pack(slot, m)),
        }
        let id = self.isolate(s.lo, s.hi);
        let holders = self.store_holders(&items);
        let stale = std::mem::replace(&mut self.runs[id as usize].holders, holders);
        self.release(stale);
        self.settle(id);
        (old, new)
    }

    /// Appends a block nobody holds yet, held by `slot` in `bit`'s tier, extending the run at
    /// the arena's end when it has exactly that holder set.
    fn append(&mut self, hash: u64, slot: u32, bit: u8) -> u32 {
        let pos = self.hashes.len() as u32;
        if self.hashes.len() == self.hashes.capacity() {
            // Grow by a quarter, not double: the arena is most of the index's memory.
            let more = (self.hashes.len() / 4).max(1024);
            self.hashes.reserve_exact(more);
            self.run_of.reserve_exact(more);
        }
        let single = Holders(u64::from(pack(slot, bit)));
        let id = match self.run_of.last() {
            Some(&last) if last != DEAD && self.runs[last as usize].holders == single => {
                self.runs[last as usize].len += 1;
                last
            }
            _ => self.new_run(pos, 1, single),
        };
        self.hashes.push(hash);
        self.run_of.push(id);
        pos
    }

    /// The arena position of `hash`: `near` if that position holds it (the neighbour of the
    /// previous block, found without a probe), else from the map.
    fn locate(&self, hash: u64, near: Option<u32>) -> Option<u32> {
        if let Some(pos) = near
            && self.hashes.get(pos as usize) == Some(&hash)
            && self.run_of[pos as usize] != DEAD
        {
            return Some(pos);
        }
        self.find(hash)
    }

    /// The arena position of `key`, from the map.
    fn find(&self, key: u64) -> Option<u32> {
        let hashes = &self.hashes;
        self.map
            .find(self.build.hash_one(key), |&p| hashes[p as usize] == key)
            .copied()
    }

    /// Adds `tier` to what `slot` holds of `hash`; true when it was not there yet (the router
    /// always adds a batch, [`BlockIndex::insert_blocks`]).
    #[cfg(test)]
    pub(crate) fn insert(&mut self, hash: SequenceHash, slot: u32, tier: Tier) -> bool {
        self.insert_blocks([hash], slot, tier) == 1
    }

    /// Removes `tier` from what `slot` holds of `hash`; true when it was there.
    pub(crate) fn remove(&mut self, hash: SequenceHash, slot: u32, tier: Tier) -> bool {
        self.remove_blocks([hash], slot, tier) == 1
    }

    /// Adds `tier` to what `slot` holds of each of `hashes`; returns how many were not there
    /// yet. Consecutive hashes that follow each other in the arena change their run once.
    pub(crate) fn insert_blocks(
        &mut self,
        hashes: impl IntoIterator<Item = SequenceHash>,
        slot: u32,
        tier: Tier,
    ) -> u64 {
        let bit = tier_bit(tier);
        let mut added = 0u64;
        let mut pending: Option<Stretch> = None;
        let mut last: Option<u32> = None;
        for SequenceHash(hash) in hashes {
            let near = last.map(|p| p + 1);
            let (hashes, build) = (&self.hashes, &self.build);
            let found = match near {
                Some(pos)
                    if hashes.get(pos as usize) == Some(&hash)
                        && self.run_of[pos as usize] != DEAD =>
                {
                    Some(pos)
                }
                // One probe: a new block takes the arena's next position (nothing below
                // changes the arena's length before `append`).
                _ => match self.map.entry(
                    build.hash_one(hash),
                    |&p| hashes[p as usize] == hash,
                    |&p| build.hash_one(hashes[p as usize]),
                ) {
                    Entry::Occupied(e) => Some(*e.get()),
                    Entry::Vacant(e) => {
                        e.insert(hashes.len() as u32);
                        None
                    }
                },
            };
            let Some(pos) = found else {
                if let Some(s) = pending.take() {
                    added += self.add_stretch(s, slot, bit);
                }
                let pos = self.append(hash, slot, bit);
                debug_assert_eq!(self.find(hash), Some(pos));
                added += 1;
                last = Some(pos);
                continue;
            };
            last = Some(pos);
            pending = match pending {
                Some(s)
                    if s.hi == pos && self.run_of[pos as usize] == self.run_of[s.lo as usize] =>
                {
                    Some(Stretch {
                        lo: s.lo,
                        hi: pos + 1,
                    })
                }
                other => {
                    if let Some(s) = other {
                        added += self.add_stretch(s, slot, bit);
                    }
                    Some(Stretch {
                        lo: pos,
                        hi: pos + 1,
                    })
                }
            };
        }
        if let Some(s) = pending {
            added += self.add_stretch(s, slot, bit);
        }
        if added > 0 {
            self.counts[slot as usize][best_tier(bit)] += added;
            self.entries += added;
        }
        added
    }

    /// [`BlockIndex::insert_blocks`] for a set in no useful order (a snapshot's sorted hashes):
    /// the blocks already indexed are taken in arena order, so that neighbours change their
    /// run once instead of splitting it block by block; new ones are appended in the order
    /// given.
    pub(crate) fn insert_set(&mut self, hashes: &[SequenceHash], slot: u32, tier: Tier) -> u64 {
        let mut present = Vec::new();
        let mut absent = Vec::new();
        for hash in hashes {
            match self.find(hash.0) {
                Some(pos) => present.push((pos, *hash)),
                None => absent.push(*hash),
            }
        }
        present.sort_unstable();
        self.insert_blocks(present.into_iter().map(|(_, h)| h), slot, tier)
            + self.insert_blocks(absent, slot, tier)
    }

    fn add_stretch(&mut self, s: Stretch, slot: u32, bit: u8) -> u64 {
        let (old, _) = self.change(s, slot, |m| m | bit);
        if old & bit == 0 {
            u64::from(s.hi - s.lo)
        } else {
            0
        }
    }

    /// Removes `tier` from what `slot` holds of each of `hashes`; returns how many were there.
    /// Consecutive hashes next to each other in the arena (either way round: engines evict a
    /// chain's tail leaf first) change their run once.
    pub(crate) fn remove_blocks(
        &mut self,
        hashes: impl IntoIterator<Item = SequenceHash>,
        slot: u32,
        tier: Tier,
    ) -> u64 {
        let bit = tier_bit(tier);
        let mut removed = 0u64;
        let mut pending: Option<Stretch> = None;
        for SequenceHash(hash) in hashes {
            let near = pending.map(|s| {
                if s.lo > 0 && self.hashes[s.lo as usize - 1] == hash {
                    s.lo - 1
                } else {
                    s.hi
                }
            });
            let Some(pos) = self.locate(hash, near) else {
                continue;
            };
            let run = self.run_of[pos as usize];
            pending = match pending {
                Some(s) if s.hi == pos && self.run_of[s.lo as usize] == run => Some(Stretch {
                    lo: s.lo,
                    hi: pos + 1,
                }),
                Some(s) if s.lo == pos + 1 && self.run_of[s.lo as usize] == run => {
                    Some(Stretch { lo: pos, hi: s.hi })
                }
                None => Some(Stretch {
                    lo: pos,
                    hi: pos + 1,
                }),
                Some(s) => {
                    removed += self.remove_stretch(s, slot, bit);
                    // That may have dropped this very block (a repeated hash): look again.
                    self.find(hash).map(|pos| Stretch {
                        lo: pos,
                        hi: pos + 1,
                    })
                }
            };
        }
        if let Some(s) = pending {
            removed += self.remove_stretch(s, slot, bit);
        }
        if removed > 0 {
            self.counts[slot as usize][best_tier(bit)] -= removed;
            self.entries -= removed;
        }
        self.maybe_compact();
        removed
    }

    fn remove_stretch(&mut self, s: Stretch, slot: u32, bit: u8) -> u64 {
        let (old, _) = self.change(s, slot, |m| m & !bit);
        if old & bit != 0 {
            u64::from(s.hi - s.lo)
        } else {
            0
        }
    }

    /// Compacts the arena when its holes outnumber its blocks: one pass moves the live
    /// positions down (order kept, so chains stay contiguous), one pass over the map's table
    /// rewrites the positions.
    fn maybe_compact(&mut self) {
        if self.dead < self.compact_min.max(1) || self.dead * HOLE_SHARE <= self.hashes.len() {
            return;
        }
        // A run has no holes, so all its positions move by the same amount: first each run's
        // new start (runs are few), then the map's values, then the arena itself.
        let mut starts = vec![DEAD; self.runs.len()];
        let mut next = 0u32;
        let mut pos = 0usize;
        while pos < self.run_of.len() {
            let id = self.run_of[pos];
            if id == DEAD {
                pos += 1;
                continue;
            }
            starts[id as usize] = next;
            let len = self.runs[id as usize].len;
            next += len;
            pos += len as usize;
        }
        for pos in self.map.iter_mut() {
            let id = self.run_of[*pos as usize] as usize;
            *pos = *pos - self.runs[id].start + starts[id];
        }
        let mut next = 0usize;
        for pos in 0..self.hashes.len() {
            let run = self.run_of[pos];
            if run == DEAD {
                continue;
            }
            self.hashes[next] = self.hashes[pos];
            self.run_of[next] = run;
            next += 1;
        }
        self.hashes.truncate(next);
        self.run_of.truncate(next);
        for (id, run) in self.runs.iter_mut().enumerate() {
            if run.len > 0 {
                run.start = starts[id];
            }
        }
        self.dead = 0;
        // Give back what the holes took, keeping a quarter to grow into.
        let keep = next + (next / 4).max(1024);
        self.hashes.shrink_to(keep);
        self.run_of.shrink_to(keep);
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
    /// over the runs (not the blocks): clears are rare (engine restarts, workers leaving,
    /// re-syncs), and a per-worker block list that would make them cheaper would cost memory.
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
        let mut items = Vec::new();
        for id in 0..self.runs.len() as u32 {
            let run = self.runs[id as usize];
            if run.len == 0 {
                continue;
            }
            items.clear();
            self.holders_into(run.holders, &mut items);
            let before = items.len();
            let mut changed = false;
            for h in &mut items {
                let (slot, mask) = unpack(*h);
                let clear = masks.get(slot as usize).copied().unwrap_or(0) & mask;
                if clear != 0 {
                    changed = true;
                    *h = if mask & !clear == 0 {
                        0
                    } else {
                        pack(slot, mask & !clear)
                    };
                }
            }
            if !changed {
                continue;
            }
            items.retain(|&h| h != 0);
            debug_assert!(items.len() <= before);
            let holders = self.store_holders(&items);
            let stale = std::mem::replace(&mut self.runs[id as usize].holders, holders);
            self.release(stale);
            // A run merged away by an earlier settle is free now; its id may be reused by
            // nothing in this loop (no run is created), so `len == 0` skips it above.
            self.settle(id);
        }
        for (mask, counts) in masks.iter().zip(self.counts.iter_mut()) {
            for tier in Tier::ALL {
                if mask & tier_bit(tier) != 0 {
                    self.entries -= counts[tier_index(tier)];
                    counts[tier_index(tier)] = 0;
                }
            }
        }
        self.maybe_compact();
    }

    /// Walks `hashes` in order and records, for every candidate in `scratch`, how many leading
    /// blocks it holds (in any tier) and their tier-weighted sum. Stops at the first block no
    /// candidate still in the race holds: later blocks cannot extend anyone's prefix.
    pub(crate) fn walk(&self, hashes: &[SequenceHash], scratch: &mut Scratch) {
        let generation = scratch.generation;
        let mut i = 0usize;
        let mut next: Option<u32> = None;
        while i < hashes.len() {
            let Some(pos) = self.locate(hashes[i].0, next) else {
                return;
            };
            let run = self.runs[self.run_of[pos as usize] as usize];
            // Every block of the run from `pos` on that the request continues with has the
            // run's holders: credit them once for the whole stretch.
            let n = ((run.end() - pos) as usize).min(hashes.len() - i);
            let m = common_prefix(
                &self.hashes[pos as usize..pos as usize + n],
                &hashes[i..i + n],
            )
            .max(1);
            let (from, to) = (i as u32, (i + m) as u32);
            let mut advanced = false;
            self.each_holder(run.holders, |slot, mask| {
                let Some(s) = scratch.slots.get_mut(slot as usize) else {
                    return;
                };
                if s.candidate != generation {
                    return;
                }
                if s.stamp != generation {
                    if from != 0 {
                        return;
                    }
                    s.stamp = generation;
                    s.depth = 0;
                    s.lower = [0; 3];
                    scratch.touched.push(slot);
                } else if s.depth != from {
                    return;
                }
                s.depth = to;
                let best = best_tier(mask);
                if best > 0 {
                    s.lower[best - 1] += to - from;
                }
                advanced = true;
            });
            if !advanced {
                return;
            }
            i += m;
            next = Some(pos + m as u32);
        }
    }

    /// Every (slot, tier, hash) held, grouped by slot then tier, for snapshots. Hashes within a
    /// group are sorted so snapshots of equal indexes are equal.
    pub(crate) fn export(&self, slot_filter: Option<u32>) -> Vec<(u32, [Vec<SequenceHash>; 4])> {
        let mut by_slot: HashMap<u32, [Vec<SequenceHash>; 4]> = HashMap::new();
        for run in self.runs.iter().filter(|r| r.len > 0) {
            let blocks = &self.hashes[run.start as usize..run.end() as usize];
            self.each_holder(run.holders, |slot, mask| {
                if slot_filter.is_some_and(|only| only != slot) {
                    return;
                }
                let tiers = by_slot.entry(slot).or_default();
                for tier in Tier::ALL {
                    if mask & tier_bit(tier) != 0 {
                        tiers[tier_index(tier)].extend(blocks.iter().map(|&h| SequenceHash(h)));
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
        let (_, slab) = self.slab.usage();
        let mut shared_blocks = 0u64;
        for run in self.runs.iter().filter(|r| r.len > 0) {
            if run.holders.list().is_some() {
                shared_blocks += u64::from(run.len);
            }
        }
        // hashbrown keeps capacity at 7/8 of a power-of-two bucket count and one control byte
        // per bucket plus one group (16) of trailing control bytes.
        let cap = self.map.capacity();
        let buckets = if cap == 0 {
            0
        } else {
            (cap * 8 / 7).next_power_of_two()
        };
        let entry = std::mem::size_of::<u32>();
        let table = if buckets == 0 {
            0
        } else {
            buckets * (entry + 1) + 16
        };
        let arena = self.hashes.capacity() * std::mem::size_of::<u64>()
            + self.run_of.capacity() * std::mem::size_of::<u32>();
        let runs = self.runs.capacity() * std::mem::size_of::<Run>()
            + self.free_runs.capacity() * std::mem::size_of::<u32>();
        let counts = self.counts.capacity() * std::mem::size_of::<[u64; 4]>();
        IndexStats {
            blocks: self.map.len() as u64,
            entries: self.entries,
            shared_blocks,
            heap_bytes: (table + arena + runs + slab + counts) as u64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn h(n: u64) -> SequenceHash {
        SequenceHash(n)
    }

    fn index(slots: u32) -> BlockIndex {
        let mut index = BlockIndex::new(7);
        index.ensure_slot(slots);
        index
    }

    #[test]
    fn a_run_is_sixteen_bytes() {
        assert_eq!(std::mem::size_of::<Run>(), 16);
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

    fn live_runs(idx: &BlockIndex) -> usize {
        idx.runs.iter().filter(|r| r.len > 0).count()
    }

    /// The structure's own invariants: runs cover exactly the live arena positions, the map
    /// points at them, holder sets are sorted and non-empty, the hole count is right.
    fn check_invariants(idx: &BlockIndex) {
        let mut covered = 0usize;
        for (id, run) in idx.runs.iter().enumerate() {
            if run.len == 0 {
                assert!(idx.free_runs.contains(&(id as u32)));
                continue;
            }
            covered += run.len as usize;
            for pos in run.start..run.end() {
                assert_eq!(idx.run_of[pos as usize], id as u32, "run {id} at {pos}");
                assert_eq!(idx.find(idx.hashes[pos as usize]), Some(pos));
            }
            let mut items = Vec::new();
            idx.holders_into(run.holders, &mut items);
            assert!(!items.is_empty(), "run {id} has no holders");
            assert!(items.windows(2).all(|w| unpack(w[0]).0 < unpack(w[1]).0));
            assert!(items.iter().all(|&h| unpack(h).1 != 0));
        }
        assert_eq!(covered, idx.map.len());
        let dead = idx.run_of.iter().filter(|&&r| r == DEAD).count();
        assert_eq!(dead, idx.dead);
        assert_eq!(covered + dead, idx.hashes.len());
    }

    #[test]
    fn a_chain_is_one_run_and_a_tail_evicted_leaf_first_leaves_two() {
        let mut idx = index(3);
        let chain: Vec<_> = (100..400).map(h).collect();
        for slot in 0..3 {
            idx.insert_blocks(chain.iter().copied(), slot, Tier::G1);
        }
        assert_eq!(live_runs(&idx), 1, "three holders, one run");
        assert_eq!(idx.stats().shared_blocks, 300);
        // Slot 2 evicts the last 100 blocks one event at a time, leaves first.
        for b in (300..400).rev() {
            assert!(idx.remove(h(b), 2, Tier::G1));
        }
        assert_eq!(live_runs(&idx), 2, "the evicted tail is one run again");
        // Slot 1 stores a branch off block 199: a new run, the old ones untouched.
        idx.insert_blocks((1000..1050).map(h), 1, Tier::G1);
        assert_eq!(live_runs(&idx), 3);
        check_invariants(&idx);
        let mut scratch = Scratch::default();
        scratch.begin(3);
        for slot in 0..3 {
            scratch.add_candidate(slot);
        }
        let query: Vec<_> = (100..400).map(h).collect();
        idx.walk(&query, &mut scratch);
        assert_eq!(scratch.overlap(0).blocks, 300);
        assert_eq!(scratch.overlap(2).blocks, 200);
    }

    #[test]
    fn holes_are_compacted_and_the_chains_stay_whole() {
        let mut idx = index(2);
        idx.compact_min = 8;
        for round in 0..20u64 {
            let base = round * 1000;
            idx.insert_blocks((base..base + 50).map(h), 0, Tier::G1);
            idx.insert_blocks((base + 500..base + 520).map(h), 1, Tier::G2);
            if round > 0 {
                let old = base - 1000;
                idx.remove_blocks((old..old + 50).rev().map(h), 0, Tier::G1);
            }
            check_invariants(&idx);
        }
        assert!(idx.hashes.len() <= idx.map.len() * 4 / 3 + 8);
        assert_eq!(idx.counts(0), [50, 0, 0, 0]);
        assert_eq!(idx.counts(1), [0, 400, 0, 0]);
        let mut scratch = Scratch::default();
        scratch.begin(2);
        scratch.add_candidate(0);
        idx.walk(&(19_000..19_050).map(h).collect::<Vec<_>>(), &mut scratch);
        assert_eq!(scratch.overlap(0).blocks, 50);
    }

    /// The reference: a flat map from each block to its holders' tier masks, answering the
    /// way the index answered before it kept runs (one lookup per block of a walk).
    #[derive(Debug, Default)]
    struct Model {
        held: HashMap<u64, BTreeMap<u32, u8>>,
    }

    impl Model {
        fn insert(&mut self, hash: u64, slot: u32, bit: u8) -> bool {
            let mask = self.held.entry(hash).or_default().entry(slot).or_default();
            let added = *mask & bit == 0;
            *mask |= bit;
            added
        }

        fn remove(&mut self, hash: u64, slot: u32, bit: u8) -> bool {
            let Some(holders) = self.held.get_mut(&hash) else {
                return false;
            };
            let Some(mask) = holders.get_mut(&slot) else {
                return false;
            };
            let was = *mask & bit != 0;
            *mask &= !bit;
            if *mask == 0 {
                holders.remove(&slot);
            }
            if holders.is_empty() {
                self.held.remove(&hash);
            }
            was
        }

        fn clear(&mut self, masks: &[u8]) {
            for holders in self.held.values_mut() {
                for (slot, mask) in holders.iter_mut() {
                    *mask &= !masks.get(*slot as usize).copied().unwrap_or(0);
                }
                holders.retain(|_, m| *m != 0);
            }
            self.held.retain(|_, h| !h.is_empty());
        }

        fn overlap(&self, hashes: &[SequenceHash], slot: u32) -> Held {
            let mut held = Held::default();
            for hash in hashes {
                match self.held.get(&hash.0).and_then(|s| s.get(&slot)) {
                    Some(&mask) => {
                        held.blocks += 1;
                        let best = best_tier(mask);
                        if best > 0 {
                            held.lower[best - 1] += 1;
                        }
                    }
                    None => break,
                }
            }
            held
        }

        fn export(&self) -> Vec<(u32, [Vec<SequenceHash>; 4])> {
            let mut by_slot: BTreeMap<u32, [Vec<SequenceHash>; 4]> = BTreeMap::new();
            for (hash, holders) in &self.held {
                for (slot, mask) in holders {
                    let tiers = by_slot.entry(*slot).or_default();
                    for tier in Tier::ALL {
                        if mask & tier_bit(tier) != 0 {
                            tiers[tier_index(tier)].push(SequenceHash(*hash));
                        }
                    }
                }
            }
            let mut out: Vec<_> = by_slot.into_iter().collect();
            for (_, tiers) in &mut out {
                for list in tiers.iter_mut() {
                    list.sort_unstable();
                }
            }
            out
        }
    }

    const SLOTS: u32 = 6;
    const UNIVERSE: u64 = 48;

    #[derive(Debug, Clone)]
    enum Op {
        Insert(Vec<u64>, u32, usize),
        Remove(Vec<u64>, u32, usize),
        Clear(Vec<u8>),
        Walk(Vec<u64>, u8),
    }

    /// Block lists shaped like events and prompts: runs up, runs down (leaves first), and
    /// arbitrary picks.
    fn blocks() -> impl Strategy<Value = Vec<u64>> {
        prop_oneof![
            (0..UNIVERSE, 1..16u64).prop_map(|(a, n)| (a..(a + n).min(UNIVERSE)).collect()),
            (0..UNIVERSE, 1..16u64).prop_map(|(a, n)| (a..(a + n).min(UNIVERSE)).rev().collect()),
            prop::collection::vec(0..UNIVERSE, 1..10),
        ]
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (blocks(), 0..SLOTS, 0..4usize).prop_map(|(b, s, t)| Op::Insert(b, s, t)),
            3 => (blocks(), 0..SLOTS, 0..4usize).prop_map(|(b, s, t)| Op::Remove(b, s, t)),
            1 => prop::collection::vec(prop_oneof![3 => Just(0u8), 1 => 0u8..16], SLOTS as usize)
                .prop_map(Op::Clear),
            3 => (blocks(), any::<u8>()).prop_map(|(b, c)| Op::Walk(b, c)),
        ]
    }

    fn compare(idx: &BlockIndex, model: &Model) {
        check_invariants(idx);
        for hash in 0..UNIVERSE {
            for slot in 0..SLOTS {
                let want = model.held.get(&hash).and_then(|s| s.get(&slot)).copied();
                assert_eq!(
                    idx.tiers_of(h(hash), slot),
                    want.unwrap_or(0),
                    "{hash} {slot}"
                );
            }
        }
        for slot in 0..SLOTS {
            let mut counts = [0u64; 4];
            for holders in model.held.values() {
                if let Some(mask) = holders.get(&slot) {
                    for tier in Tier::ALL {
                        if mask & tier_bit(tier) != 0 {
                            counts[tier_index(tier)] += 1;
                        }
                    }
                }
            }
            assert_eq!(idx.counts(slot), counts, "slot {slot}");
        }
        let stats = idx.stats();
        assert_eq!(stats.blocks, model.held.len() as u64);
        let entries: u64 = model
            .held
            .values()
            .flat_map(|s| s.values())
            .map(|m| u64::from(m.count_ones()))
            .sum();
        assert_eq!(stats.entries, entries);
        let shared = model.held.values().filter(|s| s.len() >= 3).count() as u64;
        assert_eq!(stats.shared_blocks, shared);
        assert_eq!(idx.export(None), model.export());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Random event streams and lookups: the run index answers exactly as the flat map.
        #[test]
        fn runs_answer_exactly_as_a_flat_map(ops in prop::collection::vec(op(), 1..60), compact in any::<bool>()) {
            let mut idx = index(SLOTS);
            if compact {
                idx.compact_min = 1;
            }
            let mut model = Model::default();
            let mut scratch = Scratch::default();
            for op in ops {
                match op {
                    Op::Insert(blocks, slot, tier) => {
                        let tier = Tier::ALL[tier];
                        let want = blocks.iter().filter(|&&b| model.insert(b, slot, tier_bit(tier))).count();
                        let hashes: Vec<_> = blocks.iter().map(|&b| h(b)).collect();
                        let got = match blocks.len() % 3 {
                            _ if blocks.len() == 1 => u64::from(idx.insert(hashes[0], slot, tier)),
                            0 => idx.insert_set(&hashes, slot, tier),
                            _ => idx.insert_blocks(hashes, slot, tier),
                        };
                        prop_assert_eq!(got, want as u64);
                    }
                    Op::Remove(blocks, slot, tier) => {
                        let tier = Tier::ALL[tier];
                        let want = blocks.iter().filter(|&&b| model.remove(b, slot, tier_bit(tier))).count();
                        let got = if blocks.len() == 1 {
                            u64::from(idx.remove(h(blocks[0]), slot, tier))
                        } else {
                            idx.remove_blocks(blocks.iter().map(|&b| h(b)), slot, tier)
                        };
                        prop_assert_eq!(got, want as u64);
                    }
                    Op::Clear(masks) => {
                        model.clear(&masks);
                        if masks.iter().filter(|&&m| m != 0).count() == 1 {
                            let slot = masks.iter().position(|&m| m != 0).unwrap_or(0);
                            idx.clear_slot(slot as u32, masks[slot]);
                        } else {
                            idx.clear_slots(&masks);
                        }
                    }
                    Op::Walk(blocks, candidates) => {
                        let query: Vec<_> = blocks.iter().map(|&b| h(b)).collect();
                        scratch.begin(SLOTS as usize);
                        for slot in 0..SLOTS {
                            if candidates & (1 << slot) != 0 {
                                scratch.add_candidate(slot);
                            }
                        }
                        idx.walk(&query, &mut scratch);
                        for slot in 0..SLOTS {
                            let want = if candidates & (1 << slot) != 0 {
                                model.overlap(&query, slot)
                            } else {
                                Held::default()
                            };
                            prop_assert_eq!(scratch.overlap(slot), want, "slot {}", slot);
                        }
                    }
                }
                compare(&idx, &model);
            }
        }
    }
}
