//! The paged KV block pool and its prefix cache.
//!
//! The pool owns the bookkeeping for a fixed number of KV blocks (the memory itself belongs to
//! the executor; a [`BlockId`] is an index into it). Every block is in exactly one state:
//!
//! - **free**: no owner and no content worth keeping;
//! - **used**: referenced by at least one sequence (reference count > 0); it may also be in the
//!   prefix cache, shared by every sequence whose prompt starts the same way;
//! - **cached**: referenced by nobody but still holding the KV of a known sequence hash, so a
//!   later prompt with that prefix can reuse it. Cached blocks sit in an LRU list and are evicted
//!   (oldest first) when an allocation finds no free block.
//!
//! `used + free + cached = total` always holds ([`BlockPool::check`] verifies it and every other
//! invariant). The pool records the `Stored`/`Removed`/`Cleared` changes to its prefix cache as
//! [`KvEventData`]; the scheduler numbers them and hands them to its caller.
//!
//! The pool knows nothing about tokens or time: keys are [`SequenceHash`]es computed by
//! `kvfleet_proto::hash`, and the LRU order is the order of release.
//!
//! A cached block may have an [`Origin`]: the (interned) node that supplied its KV through an
//! import, so that revoking that node can evict what it supplied ([`BlockPool::evict_origin`]).
//! Locally computed blocks have none, except that a block computed on top of a supplied one
//! inherits its parent's origin (its KV attends to the supplied KV). The first supplier of a
//! hash wins: a block already cached keeps its origin (or lack of one) until it is evicted.

use kvfleet_proto::{BlockHash, KvEventData, LocalBlockHash, SequenceHash};

use crate::fast_hash::FastMap;

/// A block's index in the pool (and in the executor's KV memory).
pub type BlockId = u32;

/// Who supplied a block's KV: a small id the caller interns for a node (the worker maps node
/// ids to these). Non-zero, so `Option<Origin>` is 4 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Origin(pub std::num::NonZeroU32);

const NIL: u32 = u32::MAX;

#[derive(Debug, Clone)]
struct Meta {
    refs: u32,
    hash: Option<SequenceHash>,
    /// With `hash`: the block's own hash and its parent, so an evicted block can be announced
    /// in a lower tier as a verifiable chain link.
    local: LocalBlockHash,
    parent: Option<SequenceHash>,
    /// Acquired again after it entered the prefix cache: some later prompt hit it.
    reused: bool,
    /// The node that supplied its KV (`None`: computed here); cleared when the block is freed.
    origin: Option<Origin>,
    // Intrusive doubly linked LRU list of cached (unreferenced, hashed) blocks: O(1) touch.
    prev: u32,
    next: u32,
    in_lru: bool,
}

/// Counts of blocks by state; `used + free + cached == total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PoolUsage {
    /// Blocks in the pool.
    pub total: u32,
    /// Blocks referenced by at least one sequence.
    pub used: u32,
    /// Blocks nobody references that still hold a cached prefix (evictable).
    pub cached: u32,
    /// Blocks with no owner and no cached content.
    pub free: u32,
}

/// A cached block evicted from the pool, recorded (when tracking is on) so that the lower KV
/// tiers can take its content before the block is overwritten.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Evicted {
    /// The block, still holding the evicted content until the executor next writes it.
    pub block: BlockId,
    /// Its hashes.
    pub hash: BlockHash,
    /// Its parent in the chain (`None` for a prompt's first block).
    pub parent: Option<SequenceHash>,
    /// Whether a later prompt hit it while it was cached.
    pub reused: bool,
    /// Who supplied it (`None`: computed here).
    pub origin: Option<Origin>,
}

/// The pool: reference counts, a free list, the prefix-cache map and its LRU list.
#[derive(Debug, Clone)]
pub struct BlockPool {
    meta: Vec<Meta>,
    free: Vec<BlockId>,
    by_hash: FastMap<SequenceHash, BlockId>,
    lru_head: u32,
    lru_tail: u32,
    lru_len: u32,
    used: u32,
    block_bytes: u64,
    events: Vec<KvEventData>,
    track_evictions: bool,
    evicted: Vec<Evicted>,
}

/// Not enough free or evictable blocks for an allocation; nothing was allocated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("KV pool exhausted: {wanted} blocks wanted, {available} free or evictable")]
pub struct PoolExhausted {
    /// Blocks asked for.
    pub wanted: usize,
    /// Blocks that could have been handed out.
    pub available: usize,
}

impl BlockPool {
    /// A pool of `num_blocks` free blocks of `block_bytes` bytes each (the byte size is only
    /// reported, never used for arithmetic on memory the pool does not own).
    pub fn new(num_blocks: u32, block_bytes: u64) -> Self {
        let meta = (0..num_blocks)
            .map(|_| Meta {
                refs: 0,
                hash: None,
                local: LocalBlockHash(0),
                parent: None,
                reused: false,
                origin: None,
                prev: NIL,
                next: NIL,
                in_lru: false,
            })
            .collect();
        // Reverse so that `pop` hands out low ids first: easier to read in tests and traces.
        let free = (0..num_blocks).rev().collect();
        Self {
            meta,
            free,
            by_hash: FastMap::default(),
            lru_head: NIL,
            lru_tail: NIL,
            lru_len: 0,
            used: 0,
            block_bytes,
            events: Vec::new(),
            track_evictions: false,
            evicted: Vec::new(),
        }
    }

    /// Records every evicted block for [`BlockPool::take_evicted`] (the KV tiers turn this on).
    pub fn track_evictions(&mut self, on: bool) {
        self.track_evictions = on;
        if !on {
            self.evicted.clear();
        }
    }

    /// Takes the blocks evicted since the last call, in eviction order. Their content is intact
    /// until the executor writes them, so callers copy them out before the next step runs.
    pub fn take_evicted(&mut self) -> Vec<Evicted> {
        std::mem::take(&mut self.evicted)
    }

    /// Number of blocks in the pool.
    pub fn num_blocks(&self) -> u32 {
        self.meta.len() as u32
    }

    /// Bytes of KV memory per block (from the executor's layout).
    pub fn block_bytes(&self) -> u64 {
        self.block_bytes
    }

    /// Blocks by state.
    pub fn usage(&self) -> PoolUsage {
        PoolUsage {
            total: self.num_blocks(),
            used: self.used,
            cached: self.lru_len,
            free: self.free.len() as u32,
        }
    }

    /// Blocks an allocation could hand out now (free plus evictable).
    pub fn available(&self) -> usize {
        self.free.len() + self.lru_len as usize
    }

    /// The reference count of a block (0 for free and cached blocks, and for unknown ids).
    pub fn ref_count(&self, block: BlockId) -> u32 {
        self.meta.get(block as usize).map_or(0, |m| m.refs)
    }

    /// The block holding the KV of this sequence hash, if cached (used or not).
    pub fn cached_block(&self, hash: SequenceHash) -> Option<BlockId> {
        self.by_hash.get(&hash).copied()
    }

    /// How many leading hashes of `hashes` are in the prefix cache.
    pub fn lookup_prefix(&self, hashes: &[SequenceHash]) -> usize {
        hashes
            .iter()
            .take_while(|h| self.by_hash.contains_key(h))
            .count()
    }

    /// Whether `block` is cached and referenced by nobody (so acquiring it removes it from the
    /// evictable set).
    pub fn is_evictable(&self, block: BlockId) -> bool {
        self.meta.get(block as usize).is_some_and(|m| m.in_lru)
    }

    /// Takes a reference on a block that holds content: one found in the prefix cache, or one
    /// already referenced. Returns false (and does nothing) for a free or unknown block: fresh
    /// blocks come from [`BlockPool::allocate`].
    pub fn acquire(&mut self, block: BlockId) -> bool {
        let Some(meta) = self.meta.get(block as usize) else {
            return false;
        };
        if meta.refs == 0 {
            if !meta.in_lru {
                return false;
            }
            self.lru_unlink(block);
            self.used += 1;
        }
        let meta = &mut self.meta[block as usize];
        meta.refs += 1;
        meta.reused |= meta.hash.is_some();
        true
    }

    /// Allocates `n` blocks with a reference count of 1 each, evicting the least recently used
    /// cached blocks when the free list runs out (each eviction records a `Removed` event).
    /// Allocates nothing when fewer than `n` blocks are available.
    pub fn allocate(&mut self, n: usize, out: &mut Vec<BlockId>) -> Result<(), PoolExhausted> {
        if n > self.available() {
            return Err(PoolExhausted {
                wanted: n,
                available: self.available(),
            });
        }
        let mut evicted = Vec::new();
        for _ in 0..n {
            let block = match self.free.pop() {
                Some(block) => block,
                None => {
                    let block = self.lru_head;
                    self.lru_unlink(block);
                    let meta = &mut self.meta[block as usize];
                    if let Some(hash) = meta.hash.take() {
                        self.by_hash.remove(&hash);
                        evicted.push(hash);
                        if self.track_evictions {
                            self.evicted.push(Evicted {
                                block,
                                hash: BlockHash {
                                    local: meta.local,
                                    sequence: hash,
                                },
                                parent: meta.parent,
                                reused: meta.reused,
                                origin: meta.origin,
                            });
                        }
                    }
                    meta.reused = false;
                    block
                }
            };
            let meta = &mut self.meta[block as usize];
            meta.refs = 1;
            meta.origin = None;
            self.used += 1;
            out.push(block);
        }
        if !evicted.is_empty() {
            self.events.push(KvEventData::Removed { blocks: evicted });
        }
        Ok(())
    }

    /// Drops one reference on each block, in the order given. A block that reaches zero goes to
    /// the tail of the LRU list if it is cached, else back to the free list. Callers release a
    /// sequence's blocks last-first, so a prompt's tail is evicted before its head (the head is
    /// the part other prompts are likeliest to share). Unknown and unreferenced blocks are
    /// skipped.
    pub fn release(&mut self, blocks: impl IntoIterator<Item = BlockId>) {
        for block in blocks {
            let Some(meta) = self.meta.get_mut(block as usize) else {
                continue;
            };
            if meta.refs == 0 {
                continue;
            }
            meta.refs -= 1;
            if meta.refs == 0 {
                self.used -= 1;
                if meta.hash.is_some() {
                    self.lru_push_back(block);
                } else {
                    meta.origin = None;
                    self.free.push(block);
                }
            }
        }
    }

    /// Puts computed blocks into the prefix cache. `blocks` pairs each block with its hashes, in
    /// prompt order, continuing the chain after `parent`. A block whose hash is already cached
    /// (another sequence computed the same prefix in the same step) stays private to its
    /// sequence. Each maximal run of newly cached blocks records one `Stored` event.
    ///
    /// The blocks get the origin of `parent`'s block, if any (what is computed on top of a
    /// supplied block is derived from it); [`BlockPool::register_from`] names one.
    pub fn register(&mut self, parent: Option<SequenceHash>, blocks: &[(BlockId, BlockHash)]) {
        self.register_from(parent, blocks, None);
    }

    /// [`BlockPool::register`] for blocks whose KV `origin` supplied (an import); with `None`,
    /// the origin of `parent`'s cached block carries on. (A block whose parent was evicted
    /// is registered without one, but it is unreachable: every lookup walks from block 0.)
    pub fn register_from(
        &mut self,
        parent: Option<SequenceHash>,
        blocks: &[(BlockId, BlockHash)],
        origin: Option<Origin>,
    ) {
        let origin = origin.or_else(|| {
            let b = parent.and_then(|p| self.by_hash.get(&p).copied());
            b.and_then(|b| self.meta.get(b as usize))
                .and_then(|m| m.origin)
        });
        let mut parent = parent;
        let mut run: Vec<BlockHash> = Vec::new();
        let mut run_parent = parent;
        for &(block, hash) in blocks {
            let fresh = match self.meta.get(block as usize) {
                Some(meta) if meta.refs > 0 && meta.hash.is_none() => {
                    !self.by_hash.contains_key(&hash.sequence)
                }
                _ => false,
            };
            if fresh {
                let meta = &mut self.meta[block as usize];
                meta.hash = Some(hash.sequence);
                meta.local = hash.local;
                meta.parent = parent;
                meta.reused = false;
                meta.origin = origin;
                self.by_hash.insert(hash.sequence, block);
                if run.is_empty() {
                    run_parent = parent;
                }
                run.push(hash);
            } else if !run.is_empty() {
                self.events.push(KvEventData::Stored {
                    parent: run_parent,
                    blocks: std::mem::take(&mut run),
                });
            }
            parent = Some(hash.sequence);
        }
        if !run.is_empty() {
            self.events.push(KvEventData::Stored {
                parent: run_parent,
                blocks: run,
            });
        }
    }

    /// Empties the prefix cache: cached blocks become free, used blocks stay with their
    /// sequences but lose their hash (they go straight to the free list when released). Records
    /// one `Cleared` event.
    pub fn clear_cache(&mut self) {
        while self.lru_head != NIL {
            let block = self.lru_head;
            self.lru_unlink(block);
            self.free.push(block);
        }
        for meta in &mut self.meta {
            meta.hash = None;
            meta.reused = false;
            meta.origin = None;
        }
        self.by_hash.clear();
        self.events.push(KvEventData::Cleared);
    }

    /// Evicts every cached block `origin` supplied (and every block that inherited it). Blocks
    /// nobody uses become free; blocks a running sequence still uses leave the prefix cache
    /// (no later prompt can hit them) and go to the free list when it releases them, so the
    /// sequence itself runs on undisturbed. Records one `Removed` event; returns how many
    /// blocks left the cache. O(blocks): revocations are rare.
    pub fn evict_origin(&mut self, origin: Origin) -> usize {
        let mut removed = Vec::new();
        for block in 0..self.num_blocks() {
            let meta = &self.meta[block as usize];
            if meta.origin != Some(origin) {
                continue;
            }
            let Some(hash) = meta.hash else {
                continue;
            };
            if meta.in_lru {
                self.lru_unlink(block);
                self.free.push(block);
                self.meta[block as usize].origin = None;
            }
            let meta = &mut self.meta[block as usize];
            meta.hash = None;
            meta.reused = false;
            self.by_hash.remove(&hash);
            removed.push(hash);
        }
        let n = removed.len();
        if n > 0 {
            self.events.push(KvEventData::Removed { blocks: removed });
        }
        n
    }

    /// The origin of the cached block holding `hash` (`None`: not cached, or computed here).
    pub fn origin_of(&self, hash: SequenceHash) -> Option<Origin> {
        let block = self.by_hash.get(&hash)?;
        self.meta.get(*block as usize).and_then(|m| m.origin)
    }

    /// Every sequence hash in the prefix cache (used or not), in no particular order.
    pub fn cached_hashes(&self) -> impl Iterator<Item = SequenceHash> + '_ {
        self.by_hash.keys().copied()
    }

    /// Takes the cache changes recorded since the last call, oldest first.
    pub fn take_events(&mut self) -> Vec<KvEventData> {
        std::mem::take(&mut self.events)
    }

    /// Verifies every invariant of the pool; `Err` names the first one broken. Cheap enough for
    /// tests to call after every operation; O(blocks).
    pub fn check(&self) -> Result<(), String> {
        let total = self.num_blocks();
        let usage = self.usage();
        if usage.used + usage.free + usage.cached != total {
            return Err(format!("accounting: {usage:?}"));
        }
        let mut in_free = vec![false; total as usize];
        for &b in &self.free {
            let m = self
                .meta
                .get(b as usize)
                .ok_or(format!("free list holds unknown block {b}"))?;
            if in_free[b as usize] {
                return Err(format!("block {b} twice in the free list"));
            }
            in_free[b as usize] = true;
            if m.refs != 0 || m.hash.is_some() || m.in_lru || m.origin.is_some() {
                return Err(format!(
                    "free block {b} is referenced, hashed, in the LRU or has an origin"
                ));
            }
        }
        let mut used = 0;
        let mut lru = 0;
        for (i, m) in self.meta.iter().enumerate() {
            if m.refs > 0 {
                used += 1;
                if m.in_lru || in_free[i] {
                    return Err(format!("referenced block {i} is also free or evictable"));
                }
            }
            if m.in_lru {
                lru += 1;
                if m.hash.is_none() {
                    return Err(format!("evictable block {i} has no hash"));
                }
            }
            if m.refs == 0 && !m.in_lru && !in_free[i] {
                return Err(format!("block {i} is in no state"));
            }
            if let Some(h) = m.hash
                && self.by_hash.get(&h) != Some(&(i as u32))
            {
                return Err(format!("block {i}'s hash does not map back to it"));
            }
        }
        if used != self.used || lru != self.lru_len {
            return Err(format!(
                "counters drifted: used {used} vs {}, lru {lru} vs {}",
                self.used, self.lru_len
            ));
        }
        let mut walked = 0;
        let mut cur = self.lru_head;
        let mut prev = NIL;
        while cur != NIL {
            let m = &self.meta[cur as usize];
            if m.prev != prev || !m.in_lru {
                return Err(format!("LRU list broken at block {cur}"));
            }
            walked += 1;
            if walked > lru {
                return Err("LRU list has a cycle".into());
            }
            prev = cur;
            cur = m.next;
        }
        if walked != lru || prev != self.lru_tail {
            return Err("LRU list length or tail is wrong".into());
        }
        for (h, &b) in &self.by_hash {
            if self.meta.get(b as usize).and_then(|m| m.hash) != Some(*h) {
                return Err(format!(
                    "hash {h:?} maps to block {b}, which does not hold it"
                ));
            }
        }
        Ok(())
    }

    fn lru_unlink(&mut self, block: BlockId) {
        let (prev, next) = {
            let m = &mut self.meta[block as usize];
            m.in_lru = false;
            let pn = (m.prev, m.next);
            m.prev = NIL;
            m.next = NIL;
            pn
        };
        if prev == NIL {
            self.lru_head = next;
        } else {
            self.meta[prev as usize].next = next;
        }
        if next == NIL {
            self.lru_tail = prev;
        } else {
            self.meta[next as usize].prev = prev;
        }
        self.lru_len -= 1;
    }

    fn lru_push_back(&mut self, block: BlockId) {
        let tail = self.lru_tail;
        {
            let m = &mut self.meta[block as usize];
            m.in_lru = true;
            m.prev = tail;
            m.next = NIL;
        }
        if tail == NIL {
            self.lru_head = block;
        } else {
            self.meta[tail as usize].next = block;
        }
        self.lru_tail = block;
        self.lru_len += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvfleet_proto::BlockSize;
    use kvfleet_proto::hash::block_hashes;
    use proptest::prelude::*;

    fn hashes(seed: u32, n: usize) -> Vec<BlockHash> {
        let tokens: Vec<u32> = (0..(n as u32 * 4)).map(|t| t ^ seed).collect();
        block_hashes(&tokens, BlockSize::new(4).unwrap())
    }

    #[test]
    fn allocate_release_and_reuse_through_the_cache() {
        let mut pool = BlockPool::new(4, 100);
        let mut a = Vec::new();
        pool.allocate(2, &mut a).unwrap();
        assert_eq!(a, vec![0, 1]);
        let h = hashes(0, 2);
        pool.register(None, &[(a[0], h[0]), (a[1], h[1])]);
        assert_eq!(
            pool.take_events(),
            vec![KvEventData::Stored {
                parent: None,
                blocks: h.clone()
            }]
        );
        pool.release(a.iter().rev().copied());
        assert_eq!(
            pool.usage(),
            PoolUsage {
                total: 4,
                used: 0,
                cached: 2,
                free: 2
            }
        );
        let seq: Vec<_> = h.iter().map(|h| h.sequence).collect();
        assert_eq!(pool.lookup_prefix(&seq), 2);
        assert!(pool.acquire(pool.cached_block(seq[0]).unwrap()));
        // Free and unknown blocks cannot be acquired; releasing them is a no-op.
        assert!(!pool.acquire(3));
        assert!(!pool.acquire(99));
        pool.release([3, 99]);
        assert_eq!(pool.usage().used, 1);
        assert_eq!(pool.usage().cached, 1);
        // Three more blocks: 2 free, then the one evictable block (seq[1]) is evicted.
        let mut b = Vec::new();
        pool.allocate(3, &mut b).unwrap();
        assert_eq!(
            pool.take_events(),
            vec![KvEventData::Removed {
                blocks: vec![seq[1]]
            }]
        );
        assert_eq!(pool.lookup_prefix(&seq), 1);
        assert_eq!(
            pool.allocate(1, &mut b),
            Err(PoolExhausted {
                wanted: 1,
                available: 0
            })
        );
        pool.check().unwrap();
    }

    #[test]
    fn lru_evicts_least_recently_released_first() {
        let mut pool = BlockPool::new(3, 1);
        let h = hashes(7, 3);
        let mut a = Vec::new();
        pool.allocate(3, &mut a).unwrap();
        pool.register(None, &[(a[0], h[0]), (a[1], h[1]), (a[2], h[2])]);
        pool.take_events();
        // Released tail first: block 2, then 1, then 0. Eviction order follows.
        pool.release([2, 1, 0]);
        let mut b = Vec::new();
        pool.allocate(1, &mut b).unwrap();
        assert_eq!(b, vec![2]);
        assert_eq!(
            pool.take_events(),
            vec![KvEventData::Removed {
                blocks: vec![h[2].sequence]
            }]
        );
        pool.check().unwrap();
    }

    #[test]
    fn duplicate_hashes_stay_private_and_split_stored_runs() {
        let mut pool = BlockPool::new(6, 1);
        let h = hashes(1, 3);
        let mut a = Vec::new();
        pool.allocate(3, &mut a).unwrap();
        pool.register(None, &[(a[0], h[0])]);
        pool.take_events();
        let mut b = Vec::new();
        pool.allocate(3, &mut b).unwrap();
        // b[0] duplicates h[0]: only h[1], h[2] are stored, with parent h[0].
        pool.register(None, &[(b[0], h[0]), (b[1], h[1]), (b[2], h[2])]);
        assert_eq!(
            pool.take_events(),
            vec![KvEventData::Stored {
                parent: Some(h[0].sequence),
                blocks: vec![h[1], h[2]]
            }]
        );
        assert_eq!(pool.cached_block(h[0].sequence), Some(a[0]));
        pool.release(b.iter().rev().copied());
        // b[0] was private: straight to free. b[1], b[2] cached.
        assert_eq!(pool.usage().cached, 2);
        pool.check().unwrap();
    }

    #[test]
    fn clear_cache_frees_cached_and_unhashes_used() {
        let mut pool = BlockPool::new(4, 1);
        let h = hashes(2, 2);
        let mut a = Vec::new();
        pool.allocate(2, &mut a).unwrap();
        pool.register(None, &[(a[0], h[0]), (a[1], h[1])]);
        pool.release([a[1]]);
        pool.clear_cache();
        assert_eq!(pool.usage().free, 3);
        assert_eq!(pool.lookup_prefix(&[h[0].sequence]), 0);
        pool.release([a[0]]);
        assert_eq!(pool.usage().free, 4);
        assert_eq!(pool.take_events().last(), Some(&KvEventData::Cleared));
        pool.check().unwrap();
    }

    /// The origin costs 8 bytes of metadata per G1 block (56 → 64; KV blocks themselves are
    /// kilobytes to megabytes).
    #[test]
    fn block_metadata_stays_small() {
        assert_eq!(std::mem::size_of::<Option<Origin>>(), 4);
        assert_eq!(std::mem::size_of::<Meta>(), 64);
    }

    #[test]
    fn evicting_an_origin_frees_cached_blocks_and_unshares_used_ones() {
        let node = Origin(std::num::NonZeroU32::new(3).unwrap());
        let other = Origin(std::num::NonZeroU32::new(4).unwrap());
        let mut pool = BlockPool::new(10, 1);
        let (h, o, l) = (hashes(1, 3), hashes(2, 1), hashes(3, 1));
        let mut a = Vec::new();
        pool.allocate(2, &mut a).unwrap();
        pool.register_from(None, &[(a[0], h[0]), (a[1], h[1])], Some(node));
        // Computed on top of a supplied block: inherits its origin.
        let mut c = Vec::new();
        pool.allocate(1, &mut c).unwrap();
        pool.register(Some(h[1].sequence), &[(c[0], h[2])]);
        assert_eq!(pool.origin_of(h[2].sequence), Some(node));
        let mut b = Vec::new();
        pool.allocate(2, &mut b).unwrap();
        pool.register_from(None, &[(b[0], o[0])], Some(other));
        pool.register(None, &[(b[1], l[0])]);
        assert_eq!(pool.origin_of(l[0].sequence), None);
        // The first supplier wins: re-supplying a cached hash changes nothing.
        let mut d = Vec::new();
        pool.allocate(1, &mut d).unwrap();
        pool.register_from(None, &[(d[0], h[0])], Some(other));
        assert_eq!(pool.origin_of(h[0].sequence), Some(node));
        pool.release(d);
        // a[0] stays in use by a running sequence; the rest is only cached.
        pool.release([c[0], a[1]]);
        pool.release(b.iter().rev().copied());
        pool.take_events();
        assert_eq!(pool.evict_origin(node), 3);
        assert_eq!(
            pool.take_events(),
            vec![KvEventData::Removed {
                blocks: vec![h[0].sequence, h[1].sequence, h[2].sequence]
            }]
        );
        assert_eq!(pool.lookup_prefix(&[h[0].sequence]), 0);
        assert_eq!(
            pool.ref_count(a[0]),
            1,
            "the running sequence keeps its block"
        );
        pool.check().unwrap();
        assert!(pool.cached_block(o[0].sequence).is_some());
        assert!(pool.cached_block(l[0].sequence).is_some());
        pool.release([a[0]]);
        assert_eq!(pool.usage().free, 8, "freed when the sequence ends");
        assert_eq!(pool.evict_origin(node), 0);
        pool.check().unwrap();
    }

    #[derive(Debug, Clone)]
    enum Op {
        Alloc(usize),
        Release(usize),
        Register(usize, u32),
        Acquire(u32),
        Clear,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (1usize..5).prop_map(Op::Alloc),
            4 => any::<usize>().prop_map(Op::Release),
            3 => (any::<usize>(), 0u32..6).prop_map(|(i, s)| Op::Register(i, s)),
            2 => (0u32..6).prop_map(Op::Acquire),
            1 => Just(Op::Clear),
        ]
    }

    proptest! {
        /// Random allocate/register/acquire/release/clear sequences keep every pool invariant,
        /// the event stream mirrors the cache, and releasing everything frees the pool.
        #[test]
        fn random_operations_keep_the_books_balanced(ops in prop::collection::vec(op(), 1..200)) {
            let mut pool = BlockPool::new(12, 1);
            // Owned references, one entry per reference held.
            let mut held: Vec<BlockId> = Vec::new();
            let mut mirror = std::collections::HashSet::new();
            for op in ops {
                match op {
                    Op::Alloc(n) => {
                        let before = pool.available();
                        let mut out = Vec::new();
                        match pool.allocate(n, &mut out) {
                            Ok(()) => held.extend(out),
                            Err(_) => prop_assert!(before < n),
                        }
                    }
                    Op::Release(i) => {
                        if !held.is_empty() {
                            let b = held.swap_remove(i % held.len());
                            pool.release([b]);
                        }
                    }
                    Op::Register(i, seed) => {
                        if !held.is_empty() {
                            let b = held[i % held.len()];
                            let h = hashes(seed, 1)[0];
                            pool.register(None, &[(b, h)]);
                        }
                    }
                    Op::Acquire(seed) => {
                        let h = hashes(seed, 1)[0].sequence;
                        if let Some(b) = pool.cached_block(h) {
                            prop_assert!(pool.acquire(b));
                            held.push(b);
                        }
                    }
                    Op::Clear => pool.clear_cache(),
                }
                pool.check().map_err(TestCaseError::fail)?;
                for e in pool.take_events() {
                    match e {
                        KvEventData::Stored { blocks, .. } => {
                            for b in blocks { prop_assert!(mirror.insert(b.sequence)); }
                        }
                        KvEventData::Removed { blocks } => {
                            for b in blocks { prop_assert!(mirror.remove(&b)); }
                        }
                        KvEventData::Cleared => mirror.clear(),
                    }
                }
                let cached: std::collections::HashSet<_> = pool.cached_hashes().collect();
                prop_assert_eq!(&cached, &mirror);
            }
            pool.release(held.drain(..));
            pool.clear_cache();
            prop_assert_eq!(pool.usage().free, 12);
        }
    }
}
