//! The translator: one engine worker's event stream in, kvfleet [`KvEvent`]s out. Pure: no
//! sockets, no clock; the driver hands it `(seq, payload)` pairs.
//!
//! ## Hashes
//!
//! Engine block hashes are opaque names (vLLM's are SHA-256 or Python `hash()` over its own
//! key, SGLang's its own). kvfleet's routers key on `kvfleet_proto::hash`, so the translator
//! recomputes kvfleet's block hashes from the token ids each `BlockStored` carries, with that
//! one implementation ([`hash_block`]), and keeps per engine block what it needs to continue the
//! chain: the kvfleet sequence hash so far and the tokens not yet in a full kvfleet block.
//!
//! ## Block sizes (the rule)
//!
//! An engine block of `E` tokens and kvfleet's block of `K` tokens need not agree (vLLM's 16 vs
//! a deployment's 32, SGLang's page size 1). The token stream along a chain of engine blocks
//! (root → … → this block) is cut into kvfleet blocks of `K` from the start of the prompt; each
//! engine block remembers the tokens after the last full kvfleet block ("tail", fewer than `K`).
//! A kvfleet block is **credited** (a `Stored` event) when the engine block holding its last token
//! is stored — by then every engine block it spans is cached, because an engine only stores a
//! block whose parent it holds. It is **removed** when any engine block it spans is removed
//! (the engine can no longer serve it: its prefix match stops at the first missing block). A
//! trailing partial kvfleet block is never credited, as `kvfleet_proto::hash` never hashes one.
//! When `E` is a multiple of `K`, every engine block credits `E / K` kvfleet blocks and nothing is
//! buffered; when `K` is a multiple of `E`, every `K / E`-th block along a chain credits one.
//!
//! Two engine blocks can name the same kvfleet block (the same tokens under different engine
//! keys); a kvfleet block is stored once and removed when the last engine block crediting it
//! goes (a reference count per tier).
//!
//! A block removed and then stored again while a descendant spanning it stayed cached does not
//! credit that descendant's kvfleet block again until the descendant is itself stored again
//! (under-credit; engines evict a chain from its tail, so this is rare).
//!
//! ## What gets no credit
//!
//! Blocks whose engine hash covers more than tokens: a LoRA adapter (`lora_id`/`lora_name`), or
//! `extra_keys` (multimodal inputs, `cache_salt`) — and every block after them on their chain.
//! kvfleet's hashes are over tokens only, so crediting them would send plain requests to a cache
//! that cannot serve them. Older engines (SGLang, vLLM before `extra_keys`) send no salt at all:
//! a salted request's blocks look like plain ones there and are credited as such; a request
//! with a `cache_salt` itself never matches them on these workers (its own hashes differ), so it
//! is routed on load alone. Blocks whose parent the translator never saw (it joined late, or
//! lost a batch) cannot be hashed (the chain starts at the prompt's first token) and are
//! counted as orphans. Cache groups other than the first (hybrid models' sliding-window
//! groups) repeat the same tokens and are ignored.
//!
//! ## Sequence numbers
//!
//! Batches carry a publisher sequence number from 0. The next expected one is applied; an
//! older one is stale (a duplicate or one overtaken by a resync) and dropped; a newer one is a
//! [`Outcome::Gap`]: nothing is applied and the driver either replays the missing batches
//! (feeding them through [`Translator::accept_replayed`], then the held batch again) or calls
//! [`Translator::skip_to`], which clears the worker (`Cleared` events) and rebuilds from what
//! follows. A batch numbered 0 after others is an engine restart: the worker is cleared. A
//! batch that does not decode is a lost batch whose number arrived: cleared, counted.

use std::collections::{HashMap, HashSet};

use kvfleet_proto::hash::{BlockHash, BlockHasher, BlockSize, SequenceHash};
use kvfleet_proto::ids::WorkerId;
use kvfleet_proto::kv_event::{KvEvent, KvEventData, Tier};

use crate::decode::{
    BlockRemoved, BlockStored, DecodeError, EngineBlockHash, EngineEvent, decode_batch,
};

/// What the translator counts; the agent exports these per worker on `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TranslatorCounters {
    /// Batches applied (live or replayed).
    pub batches: u64,
    /// Engine events in applied batches.
    pub engine_events: u64,
    /// kvfleet events emitted.
    pub kv_events: u64,
    /// Batches that arrived after a missing one (each one resync).
    pub gaps: u64,
    /// Batches dropped as older than the next expected one (duplicates, overtaken).
    pub stale: u64,
    /// Batches applied from the engine's replay socket.
    pub replayed: u64,
    /// Times the worker's blocks were cleared to resynchronise (gap without replay, restart,
    /// malformed batch).
    pub resets: u64,
    /// Engine restarts seen (sequence back to 0, or the driver said so).
    pub restarts: u64,
    /// Times the publisher's connection dropped (each one resync).
    pub disconnects: u64,
    /// Batches that did not decode.
    pub malformed: u64,
    /// Stored blocks whose parent was unknown (not creditable).
    pub orphan_blocks: u64,
    /// Stored blocks with a LoRA adapter or extra hash keys, or below one (not creditable).
    pub uncredited_blocks: u64,
    /// Removals of blocks the translator did not hold.
    pub unknown_removals: u64,
    /// Engine events ignored: other KV cache groups, unknown media.
    pub ignored_events: u64,
}

impl TranslatorCounters {
    /// Every counter as `(Prometheus name without `_total`, help, value)`, for the agent's
    /// `/metrics` collector (one family per name, labelled by worker).
    pub fn families(&self) -> [(&'static str, &'static str, u64); 14] {
        [
            (
                "kvfleet_engine_events_batches",
                "Engine KV event batches applied (live or replayed)",
                self.batches,
            ),
            (
                "kvfleet_engine_events_engine_events",
                "Engine KV events in applied batches",
                self.engine_events,
            ),
            (
                "kvfleet_engine_events_kv_events",
                "kvfleet KV events emitted from engine events",
                self.kv_events,
            ),
            (
                "kvfleet_engine_events_gaps",
                "Engine event batches that arrived after a missing one",
                self.gaps,
            ),
            (
                "kvfleet_engine_events_stale",
                "Engine event batches dropped as older than the next expected",
                self.stale,
            ),
            (
                "kvfleet_engine_events_replayed",
                "Engine event batches applied from the engine's replay socket",
                self.replayed,
            ),
            (
                "kvfleet_engine_events_resets",
                "Times a worker's translated blocks were cleared to resynchronise",
                self.resets,
            ),
            (
                "kvfleet_engine_events_restarts",
                "Engine restarts seen in the event stream",
                self.restarts,
            ),
            (
                "kvfleet_engine_events_disconnects",
                "Times the connection to the engine's event publisher dropped",
                self.disconnects,
            ),
            (
                "kvfleet_engine_events_malformed",
                "Engine event messages or batches that did not decode",
                self.malformed,
            ),
            (
                "kvfleet_engine_events_orphan_blocks",
                "Stored engine blocks whose parent was unknown (no credit)",
                self.orphan_blocks,
            ),
            (
                "kvfleet_engine_events_uncredited_blocks",
                "Stored engine blocks under a LoRA adapter or extra hash keys (no credit)",
                self.uncredited_blocks,
            ),
            (
                "kvfleet_engine_events_unknown_removals",
                "Removals of engine blocks the translator did not hold",
                self.unknown_removals,
            ),
            (
                "kvfleet_engine_events_ignored_events",
                "Engine events ignored (other KV cache groups, unknown media)",
                self.ignored_events,
            ),
        ]
    }
}

/// What became of one batch.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Applied in order.
    Applied,
    /// Applied after clearing the worker: the sequence restarted at 0.
    Restarted,
    /// Older than the next expected batch: dropped.
    Stale {
        /// The next expected sequence number.
        expected: u64,
    },
    /// Newer than the next expected: nothing applied. Replay `expected..seq` and offer this
    /// batch again, or [`Translator::skip_to`] it.
    Gap {
        /// The first missing sequence number.
        expected: u64,
    },
    /// In order but undecodable: the worker was cleared (the batch's changes are lost).
    Malformed(DecodeError),
}

/// The events one batch produced, and what became of it.
#[derive(Debug, Clone, PartialEq)]
pub struct Output {
    /// kvfleet events, in order, to hand to the router.
    pub events: Vec<KvEvent>,
    /// What became of the batch.
    pub outcome: Outcome,
}

/// One engine block as the translator knows it.
#[derive(Debug)]
struct EngineBlock {
    /// `None`: not creditable (tainted by extra keys, or an orphan), nor is anything below it.
    chain: Option<Chain>,
    /// Blocks further down the chain whose kvfleet blocks span tokens of this one: removing
    /// this block removes their credit too.
    covered_by: HashSet<EngineBlockHash>,
    /// The reverse: earlier blocks whose tokens this one's kvfleet blocks span. When this block
    /// goes, it leaves their `covered_by`, so a hot prefix's set holds only live descendants.
    owners: Vec<EngineBlockHash>,
    /// Tiers that hold the block (bit per [`Tier`]).
    tiers: u8,
    /// Tiers in which `chain.completed` is credited.
    credited: u8,
}

/// Where a chain of engine blocks stands in kvfleet's block grid after this block.
#[derive(Debug, Clone, Default)]
struct Chain {
    /// The kvfleet sequence hash of the last full kvfleet block so far.
    last: Option<SequenceHash>,
    /// Tokens after that block (fewer than kvfleet's block size).
    tail: Vec<u32>,
    /// The engine blocks those tail tokens came from.
    tail_owners: Vec<EngineBlockHash>,
    /// The kvfleet blocks whose last token is in this engine block, in order.
    completed: Vec<BlockHash>,
    /// The kvfleet parent of `completed[0]`.
    completed_parent: Option<SequenceHash>,
}

const fn bit(tier: Tier) -> u8 {
    match tier {
        Tier::G1 => 1,
        Tier::G2 => 2,
        Tier::G3 => 4,
        Tier::G4 => 8,
    }
}

/// The kvfleet tier of an engine's `medium` (absent: the GPU).
pub fn tier_of_medium(medium: Option<&str>) -> Option<Tier> {
    match medium {
        None => Some(Tier::G1),
        Some(m) if m.eq_ignore_ascii_case("gpu") => Some(Tier::G1),
        Some(m) if m.eq_ignore_ascii_case("cpu") => Some(Tier::G2),
        Some(m) if m.eq_ignore_ascii_case("disk") || m.eq_ignore_ascii_case("local_disk") => {
            Some(Tier::G3)
        }
        Some(_) => None,
    }
}

/// One engine worker's translator.
#[derive(Debug)]
pub struct Translator {
    worker: WorkerId,
    block_size: BlockSize,
    next_event_id: u64,
    expected_seq: u64,
    seen_any: bool,
    blocks: HashMap<EngineBlockHash, EngineBlock>,
    credits: HashMap<(Tier, SequenceHash), u32>,
    /// Tiers with credited blocks since the last clear: what a clear must announce.
    touched: u8,
    counters: TranslatorCounters,
    /// Names each kvfleet block (the fleet's key, if any).
    hasher: BlockHasher,
}

impl Translator {
    /// Names blocks with `hasher` (a fleet's keyed hasher) instead of the unkeyed one.
    pub fn with_hasher(mut self, hasher: BlockHasher) -> Self {
        self.hasher = hasher;
        self
    }

    /// A translator for `worker`, hashing into kvfleet blocks of `block_size` tokens.
    pub fn new(worker: WorkerId, block_size: BlockSize) -> Self {
        Self {
            worker,
            block_size,
            next_event_id: 0,
            expected_seq: 0,
            seen_any: false,
            blocks: HashMap::new(),
            credits: HashMap::new(),
            touched: 0,
            counters: TranslatorCounters::default(),
            hasher: BlockHasher::UNKEYED,
        }
    }

    /// The counters so far.
    pub fn counters(&self) -> TranslatorCounters {
        self.counters
    }

    /// The next sequence number the translator will apply.
    pub fn expected_seq(&self) -> u64 {
        self.expected_seq
    }

    /// kvfleet blocks currently credited in `tier`.
    pub fn credited_blocks(&self, tier: Tier) -> usize {
        self.credits.keys().filter(|(t, _)| *t == tier).count()
    }

    /// Engine blocks the translator tracks.
    pub fn engine_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Descendant links held (memory that must not outlive the descendants).
    #[cfg(test)]
    fn links(&self) -> usize {
        self.blocks.values().map(|b| b.covered_by.len()).sum()
    }

    /// Offers one live batch.
    pub fn accept(&mut self, seq: u64, payload: &[u8]) -> Output {
        if seq == 0 && self.seen_any && self.expected_seq > 0 {
            self.counters.restarts += 1;
            let mut events = self.clear();
            self.expected_seq = 0;
            let mut output = self.apply_in_order(seq, payload);
            events.append(&mut output.events);
            output.events = events;
            if output.outcome == Outcome::Applied {
                output.outcome = Outcome::Restarted;
            }
            return output;
        }
        if seq < self.expected_seq {
            self.counters.stale += 1;
            return Output {
                events: Vec::new(),
                outcome: Outcome::Stale {
                    expected: self.expected_seq,
                },
            };
        }
        if seq > self.expected_seq {
            self.counters.gaps += 1;
            return Output {
                events: Vec::new(),
                outcome: Outcome::Gap {
                    expected: self.expected_seq,
                },
            };
        }
        self.apply_in_order(seq, payload)
    }

    /// Offers one batch from the engine's replay socket (counted as replayed when applied).
    pub fn accept_replayed(&mut self, seq: u64, payload: &[u8]) -> Output {
        if seq != self.expected_seq {
            // A replay answers from the requested number on; anything else is not the batch
            // the translator needs (and never a restart).
            if seq < self.expected_seq {
                self.counters.stale += 1;
                return Output {
                    events: Vec::new(),
                    outcome: Outcome::Stale {
                        expected: self.expected_seq,
                    },
                };
            }
            return Output {
                events: Vec::new(),
                outcome: Outcome::Gap {
                    expected: self.expected_seq,
                },
            };
        }
        let output = self.apply_in_order(seq, payload);
        if output.outcome == Outcome::Applied {
            self.counters.replayed += 1;
        }
        output
    }

    /// Gives up on the batches before `seq` (no replay, or the replay did not reach back far
    /// enough): clears the worker and expects `seq` next. Returns the `Cleared` events.
    pub fn skip_to(&mut self, seq: u64) -> Vec<KvEvent> {
        let events = self.clear();
        self.expected_seq = seq;
        events
    }

    /// The engine process restarted (the driver knows before any batch says so): clears the
    /// worker and expects sequence 0.
    pub fn engine_restarted(&mut self) -> Vec<KvEvent> {
        self.counters.restarts += 1;
        let events = self.clear();
        self.expected_seq = 0;
        self.seen_any = false;
        events
    }

    /// A message that was not `[topic, seq, payload]`: counted as malformed. Its sequence
    /// number is unknown, so a lost batch shows as a gap at the next one.
    pub fn note_malformed_message(&mut self) {
        self.counters.malformed += 1;
    }

    /// The connection to the publisher dropped: what it published meanwhile is unknown, and it
    /// may come back as a new process numbering from 0. Clears the worker and expects 0; a
    /// publisher that kept its numbers shows a gap at its next batch (replayed, or skipped to).
    pub fn disconnected(&mut self) -> Vec<KvEvent> {
        self.counters.disconnects += 1;
        let events = self.clear();
        self.expected_seq = 0;
        self.seen_any = false;
        events
    }

    fn apply_in_order(&mut self, seq: u64, payload: &[u8]) -> Output {
        self.seen_any = true;
        self.expected_seq = seq.saturating_add(1);
        match decode_batch(payload) {
            Ok(batch) => {
                self.counters.batches += 1;
                let mut events = Vec::new();
                for event in batch.events {
                    self.counters.engine_events += 1;
                    match event {
                        EngineEvent::BlockStored(stored) => self.stored(stored, &mut events),
                        EngineEvent::BlockRemoved(removed) => self.removed(removed, &mut events),
                        EngineEvent::AllBlocksCleared => {
                            let mut cleared = self.clear_state();
                            events.append(&mut cleared);
                        }
                    }
                }
                Output {
                    events,
                    outcome: Outcome::Applied,
                }
            }
            Err(error) => {
                self.counters.malformed += 1;
                let events = self.clear();
                Output {
                    events,
                    outcome: Outcome::Malformed(error),
                }
            }
        }
    }

    /// A resync's clear (counted as a reset).
    fn clear(&mut self) -> Vec<KvEvent> {
        self.counters.resets += 1;
        self.clear_state()
    }

    fn clear_state(&mut self) -> Vec<KvEvent> {
        self.blocks.clear();
        self.credits.clear();
        let touched = std::mem::take(&mut self.touched);
        let mut events = Vec::new();
        for tier in Tier::ALL {
            if touched & bit(tier) != 0 {
                events.push(self.event(tier, KvEventData::Cleared));
            }
        }
        events
    }

    fn event(&mut self, tier: Tier, data: KvEventData) -> KvEvent {
        let event = KvEvent {
            worker: self.worker,
            event_id: self.next_event_id,
            tier,
            data,
        };
        self.next_event_id += 1;
        self.counters.kv_events += 1;
        event
    }

    fn stored(&mut self, stored: BlockStored, out: &mut Vec<KvEvent>) {
        let Some(tier) = tier_of_medium(stored.medium.as_deref()) else {
            self.counters.ignored_events += 1;
            return;
        };
        if stored.group_idx.is_some_and(|group| group != 0) {
            self.counters.ignored_events += 1;
            return;
        }
        let lora = stored.lora_id.is_some() || stored.lora_name.is_some();
        // The chain state the first block continues from; `None` when not creditable.
        let orphan = stored
            .parent
            .as_ref()
            .is_some_and(|parent| !self.blocks.contains_key(parent));
        let mut current: Option<Chain> = match &stored.parent {
            _ if orphan => {
                self.counters.orphan_blocks += stored.block_hashes.len() as u64;
                None
            }
            None => Some(Chain::default()),
            Some(parent) => self
                .blocks
                .get(parent)
                .and_then(|block| block.chain.clone()),
        };
        let size = stored.block_size as usize;
        let mut credited: Vec<(Option<SequenceHash>, BlockHash)> = Vec::new();
        for (index, hash) in stored.block_hashes.into_iter().enumerate() {
            let tokens = stored
                .token_ids
                .get(index * size..(index + 1) * size)
                .unwrap_or_default();
            if let Some(existing) = self.blocks.get_mut(&hash) {
                // The same block again (another tier, or a duplicate): its chain is known.
                existing.tiers |= bit(tier);
                current = existing.chain.clone();
            } else {
                let tainted = lora || stored.extra_keys.get(index).copied().unwrap_or(false);
                let mut owners = Vec::new();
                let chain = match current.take() {
                    Some(previous) if !tainted => {
                        let chain;
                        (chain, owners) = self.advance(previous, tokens, &hash);
                        owners.retain(|owner| match self.blocks.get_mut(owner) {
                            Some(block) => {
                                block.covered_by.insert(hash.clone());
                                true
                            }
                            None => false,
                        });
                        Some(chain)
                    }
                    _ => {
                        if !orphan {
                            self.counters.uncredited_blocks += 1;
                        }
                        None
                    }
                };
                current = chain.clone();
                self.blocks.insert(
                    hash.clone(),
                    EngineBlock {
                        chain,
                        covered_by: HashSet::new(),
                        owners,
                        tiers: bit(tier),
                        credited: 0,
                    },
                );
            }
            self.credit(tier, &hash, &mut credited);
        }
        // One `Stored` event per run of blocks that chain onto each other.
        let mut run: Option<(Option<SequenceHash>, Vec<BlockHash>)> = None;
        for (parent, block) in credited {
            match &mut run {
                Some((_, blocks)) if blocks.last().map(|b| Some(b.sequence)) == Some(parent) => {
                    blocks.push(block);
                }
                _ => {
                    if let Some((parent, blocks)) = run.take() {
                        let event = self.event(tier, KvEventData::Stored { parent, blocks });
                        out.push(event);
                    }
                    run = Some((parent, vec![block]));
                }
            }
        }
        if let Some((parent, blocks)) = run {
            let event = self.event(tier, KvEventData::Stored { parent, blocks });
            out.push(event);
        }
    }

    /// Continues `chain` by one engine block's tokens; returns the new state and the earlier
    /// engine blocks whose tokens went into kvfleet blocks this block completed.
    fn advance(
        &self,
        mut chain: Chain,
        tokens: &[u32],
        hash: &EngineBlockHash,
    ) -> (Chain, Vec<EngineBlockHash>) {
        let k = self.block_size.tokens();
        let mut owners = Vec::new();
        chain.completed.clear();
        chain.completed_parent = chain.last;
        let mut rest = tokens;
        if !rest.is_empty() {
            chain.tail_owners.push(hash.clone());
        }
        while !rest.is_empty() {
            let need = k - chain.tail.len();
            if rest.len() < need {
                chain.tail.extend_from_slice(rest);
                break;
            }
            chain.tail.extend_from_slice(&rest[..need]);
            rest = &rest[need..];
            let block = self.hasher.hash_block(chain.last, &chain.tail);
            chain.last = Some(block.sequence);
            chain.completed.push(block);
            chain.tail.clear();
            for owner in chain.tail_owners.drain(..) {
                if &owner != hash && !owners.contains(&owner) {
                    owners.push(owner);
                }
            }
            if !rest.is_empty() {
                chain.tail_owners.push(hash.clone());
            }
        }
        (chain, owners)
    }

    fn credit(
        &mut self,
        tier: Tier,
        hash: &EngineBlockHash,
        out: &mut Vec<(Option<SequenceHash>, BlockHash)>,
    ) {
        let Some(block) = self.blocks.get_mut(hash) else {
            return;
        };
        if block.credited & bit(tier) != 0 {
            return;
        }
        block.credited |= bit(tier);
        let Some(chain) = &block.chain else {
            return;
        };
        let mut parent = chain.completed_parent;
        for kv in &chain.completed {
            let count = self.credits.entry((tier, kv.sequence)).or_insert(0);
            *count += 1;
            if *count == 1 {
                out.push((parent, *kv));
                self.touched |= bit(tier);
            }
            parent = Some(kv.sequence);
        }
    }

    fn uncredit(&mut self, tier: Tier, hash: &EngineBlockHash, out: &mut Vec<SequenceHash>) {
        let Some(block) = self.blocks.get_mut(hash) else {
            return;
        };
        if block.credited & bit(tier) == 0 {
            return;
        }
        block.credited &= !bit(tier);
        let Some(chain) = &block.chain else {
            return;
        };
        for kv in &chain.completed {
            if let Some(count) = self.credits.get_mut(&(tier, kv.sequence)) {
                *count -= 1;
                if *count == 0 {
                    self.credits.remove(&(tier, kv.sequence));
                    out.push(kv.sequence);
                }
            }
        }
    }

    fn removed(&mut self, removed: BlockRemoved, out: &mut Vec<KvEvent>) {
        let Some(tier) = tier_of_medium(removed.medium.as_deref()) else {
            self.counters.ignored_events += 1;
            return;
        };
        if removed.group_idx.is_some_and(|group| group != 0) {
            self.counters.ignored_events += 1;
            return;
        }
        let mut gone = Vec::new();
        for hash in removed.block_hashes {
            let Some(block) = self.blocks.get_mut(&hash) else {
                self.counters.unknown_removals += 1;
                continue;
            };
            if block.tiers & bit(tier) == 0 {
                self.counters.unknown_removals += 1;
                continue;
            }
            block.tiers &= !bit(tier);
            let covered_by: Vec<EngineBlockHash> = block.covered_by.iter().cloned().collect();
            let empty = block.tiers == 0;
            self.uncredit(tier, &hash, &mut gone);
            for descendant in &covered_by {
                self.uncredit(tier, descendant, &mut gone);
            }
            if empty && let Some(block) = self.blocks.remove(&hash) {
                for owner in &block.owners {
                    if let Some(owner) = self.blocks.get_mut(owner) {
                        owner.covered_by.remove(&hash);
                    }
                }
            }
        }
        if !gone.is_empty() {
            let event = self.event(tier, KvEventData::Removed { blocks: gone });
            out.push(event);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use kvfleet_proto::hash::sequence_hashes;
    use proptest::prelude::*;

    use super::*;
    use crate::decode::EventBatch;
    use crate::encode::{Flavor, encode_batch};

    /// The engine's name for the block ending at `end` of `tokens`: any injective function of
    /// the prefix does (engines chain their hashes the same way).
    fn name(tokens: &[u32], end: usize) -> EngineBlockHash {
        let mut bytes = Vec::with_capacity(end * 4);
        for t in &tokens[..end] {
            bytes.extend_from_slice(&t.to_le_bytes());
        }
        EngineBlockHash::Bytes(bytes.into_boxed_slice())
    }

    /// `BlockStored` for engine blocks `first..last` of `tokens` (block indices).
    fn stored(tokens: &[u32], e: usize, first: usize, last: usize) -> EngineEvent {
        EngineEvent::BlockStored(BlockStored {
            block_hashes: (first..last).map(|b| name(tokens, (b + 1) * e)).collect(),
            parent: (first > 0).then(|| name(tokens, first * e)),
            token_ids: tokens[first * e..last * e].to_vec(),
            block_size: e as u32,
            lora_id: None,
            medium: None,
            lora_name: None,
            extra_keys: Vec::new(),
            group_idx: None,
        })
    }

    fn removed(tokens: &[u32], e: usize, blocks: &[usize]) -> EngineEvent {
        EngineEvent::BlockRemoved(BlockRemoved {
            block_hashes: blocks.iter().map(|b| name(tokens, (b + 1) * e)).collect(),
            medium: None,
            group_idx: None,
        })
    }

    fn batch(events: Vec<EngineEvent>) -> Vec<u8> {
        encode_batch(
            &EventBatch {
                ts: 1.0,
                events,
                data_parallel_rank: None,
            },
            Flavor::VllmMap,
        )
    }

    /// Applies kvfleet events to a set per tier, checking chains as the router does.
    #[derive(Default)]
    struct Index {
        blocks: BTreeSet<(Tier, u64)>,
        next_id: u64,
    }

    impl Index {
        fn apply(&mut self, events: &[KvEvent]) {
            for event in events {
                assert_eq!(event.event_id, self.next_id, "event ids are contiguous");
                self.next_id += 1;
                match &event.data {
                    KvEventData::Stored { parent, blocks } => {
                        let mut prev = *parent;
                        for block in blocks {
                            assert_eq!(
                                kvfleet_proto::hash::chain(prev, block.local),
                                block.sequence
                            );
                            prev = Some(block.sequence);
                            assert!(self.blocks.insert((event.tier, block.sequence.0)));
                        }
                    }
                    KvEventData::Removed { blocks } => {
                        for block in blocks {
                            assert!(self.blocks.remove(&(event.tier, block.0)));
                        }
                    }
                    KvEventData::Cleared => self.blocks.retain(|(t, _)| *t != event.tier),
                }
            }
        }

        fn tier(&self, tier: Tier) -> BTreeSet<u64> {
            self.blocks
                .iter()
                .filter(|(t, _)| *t == tier)
                .map(|(_, h)| *h)
                .collect()
        }
    }

    /// What the router computes for the cached prefixes: the oracle.
    fn expected(prefixes: &[&[u32]], k: u32) -> BTreeSet<u64> {
        let size = BlockSize::new(k).unwrap();
        prefixes
            .iter()
            .flat_map(|tokens| sequence_hashes(tokens, size))
            .map(|h| h.0)
            .collect()
    }

    fn run(t: &mut Translator, index: &mut Index, seq: u64, events: Vec<EngineEvent>) -> Outcome {
        let out = t.accept(seq, &batch(events));
        index.apply(&out.events);
        out.outcome
    }

    #[test]
    fn engine_blocks_smaller_than_kvfleets_are_buffered_along_the_chain() {
        // vLLM's 16 against kvfleet's 32: every second engine block completes a kvfleet block.
        let a: Vec<u32> = (0..80).collect();
        let mut t = Translator::new(WorkerId(1), BlockSize::new(32).unwrap());
        let mut index = Index::default();
        assert_eq!(
            run(&mut t, &mut index, 0, vec![stored(&a, 16, 0, 1)]),
            Outcome::Applied
        );
        assert!(
            index.tier(Tier::G1).is_empty(),
            "half a kvfleet block is not credited"
        );
        run(&mut t, &mut index, 1, vec![stored(&a, 16, 1, 3)]);
        assert_eq!(index.tier(Tier::G1), expected(&[&a[..48]], 32));
        run(&mut t, &mut index, 2, vec![stored(&a, 16, 3, 5)]);
        assert_eq!(index.tier(Tier::G1), expected(&[&a[..80]], 32));
        // Evicting the engine block 2 (tokens 32..48) takes kvfleet block 1 (32..64) with it.
        run(&mut t, &mut index, 3, vec![removed(&a, 16, &[2])]);
        assert_eq!(index.tier(Tier::G1), expected(&[&a[..32]], 32));
        assert_eq!(t.counters().batches, 4);
    }

    #[test]
    fn every_counter_has_one_metric_family() {
        let counters = TranslatorCounters {
            batches: 1,
            engine_events: 2,
            kv_events: 3,
            gaps: 4,
            stale: 5,
            replayed: 6,
            resets: 7,
            restarts: 8,
            disconnects: 9,
            malformed: 10,
            orphan_blocks: 11,
            uncredited_blocks: 12,
            unknown_removals: 13,
            ignored_events: 14,
        };
        let families = counters.families();
        let names: BTreeSet<&str> = families.iter().map(|(name, _, _)| *name).collect();
        assert_eq!(names.len(), families.len());
        let values: Vec<u64> = families.iter().map(|(_, _, value)| *value).collect();
        assert_eq!(values, (1..=14).collect::<Vec<u64>>());
        assert!(families.iter().all(|(name, help, _)| {
            name.starts_with("kvfleet_engine_events_")
                && !name.ends_with("_total")
                && !help.ends_with('.')
        }));
    }

    #[test]
    fn a_hot_prefix_holds_no_links_to_evicted_descendants() {
        // One shared first engine block, a thousand different second blocks stored and
        // evicted: kvfleet blocks of 32 span both, so each child links to the prefix while live.
        let mut t = Translator::new(WorkerId(1), BlockSize::new(32).unwrap());
        let mut index = Index::default();
        let mut seq = 0;
        let prefix: Vec<u32> = (0..16).collect();
        run(&mut t, &mut index, seq, vec![stored(&prefix, 16, 0, 1)]);
        for child in 0..1000u32 {
            let mut tokens = prefix.clone();
            tokens.extend((0..16).map(|i| 10_000 + child * 16 + i));
            seq += 1;
            run(&mut t, &mut index, seq, vec![stored(&tokens, 16, 1, 2)]);
            assert_eq!(index.tier(Tier::G1), expected(&[&tokens], 32));
            seq += 1;
            run(&mut t, &mut index, seq, vec![removed(&tokens, 16, &[1])]);
        }
        assert!(index.tier(Tier::G1).is_empty());
        assert_eq!((t.engine_blocks(), t.links()), (1, 0));
    }

    #[test]
    fn engine_blocks_larger_than_kvfleets_credit_several() {
        let a: Vec<u32> = (500..564).collect();
        let mut t = Translator::new(WorkerId(1), BlockSize::new(16).unwrap());
        let mut index = Index::default();
        run(&mut t, &mut index, 0, vec![stored(&a, 64, 0, 1)]);
        assert_eq!(index.tier(Tier::G1).len(), 4);
        assert_eq!(index.tier(Tier::G1), expected(&[&a[..]], 16));
        run(&mut t, &mut index, 1, vec![removed(&a, 64, &[0])]);
        assert!(index.tier(Tier::G1).is_empty());
    }

    #[test]
    fn salted_and_lora_blocks_and_their_descendants_get_no_credit() {
        let a: Vec<u32> = (0..64).collect();
        let mut t = Translator::new(WorkerId(1), BlockSize::new(16).unwrap());
        let mut index = Index::default();
        let EngineEvent::BlockStored(mut salted) = stored(&a, 16, 0, 2) else {
            unreachable!()
        };
        salted.extra_keys = vec![false, true];
        run(
            &mut t,
            &mut index,
            0,
            vec![EngineEvent::BlockStored(salted)],
        );
        run(&mut t, &mut index, 1, vec![stored(&a, 16, 2, 3)]);
        assert_eq!(index.tier(Tier::G1), expected(&[&a[..16]], 16));
        assert_eq!(t.counters().uncredited_blocks, 2);
        let b: Vec<u32> = (100..132).collect();
        let EngineEvent::BlockStored(mut lora) = stored(&b, 16, 0, 2) else {
            unreachable!()
        };
        lora.lora_id = Some(3);
        run(&mut t, &mut index, 2, vec![EngineEvent::BlockStored(lora)]);
        assert_eq!(index.tier(Tier::G1), expected(&[&a[..16]], 16));
        assert_eq!(t.counters().uncredited_blocks, 4);
    }

    #[test]
    fn orphans_other_groups_and_unknown_media_are_counted_not_credited() {
        let a: Vec<u32> = (0..48).collect();
        let mut t = Translator::new(WorkerId(1), BlockSize::new(16).unwrap());
        let mut index = Index::default();
        // The parent (block 0) was never seen.
        run(&mut t, &mut index, 0, vec![stored(&a, 16, 1, 3)]);
        assert!(index.tier(Tier::G1).is_empty());
        assert_eq!(t.counters().orphan_blocks, 2);
        let EngineEvent::BlockStored(mut other_group) = stored(&a, 16, 0, 1) else {
            unreachable!()
        };
        other_group.group_idx = Some(1);
        let EngineEvent::BlockStored(mut tape) = stored(&a, 16, 0, 1) else {
            unreachable!()
        };
        tape.medium = Some("TAPE".into());
        run(
            &mut t,
            &mut index,
            1,
            vec![
                EngineEvent::BlockStored(other_group),
                EngineEvent::BlockStored(tape),
                removed(&a, 16, &[0]),
            ],
        );
        assert!(index.tier(Tier::G1).is_empty());
        assert_eq!(t.counters().ignored_events, 2);
        assert_eq!(t.counters().unknown_removals, 1);
    }

    #[test]
    fn sequence_numbers_gap_stale_restart_and_malformed() {
        let a: Vec<u32> = (0..32).collect();
        let mut t = Translator::new(WorkerId(9), BlockSize::new(16).unwrap());
        let mut index = Index::default();
        run(&mut t, &mut index, 0, vec![stored(&a, 16, 0, 1)]);
        // 2 before 1: a gap, nothing applied.
        let b2 = batch(vec![stored(&a, 16, 1, 2)]);
        assert_eq!(t.accept(2, &b2).outcome, Outcome::Gap { expected: 1 });
        let cleared = t.skip_to(2);
        assert_eq!(cleared.len(), 1);
        assert_eq!(cleared[0].data, KvEventData::Cleared);
        index.apply(&cleared);
        let out = t.accept(2, &b2);
        assert_eq!(out.outcome, Outcome::Applied);
        index.apply(&out.events);
        // Block 1's parent went with the clear: an orphan.
        assert!(index.tier(Tier::G1).is_empty());
        assert_eq!(t.counters().orphan_blocks, 1);
        // The late batch 1 is stale.
        assert_eq!(
            t.accept(1, &batch(vec![])).outcome,
            Outcome::Stale { expected: 3 }
        );
        // Garbage at 3: counted, cleared (nothing was credited, so no event).
        let out = t.accept(3, b"\x93\xcb\x41");
        assert!(
            matches!(out.outcome, Outcome::Malformed(DecodeError::Msgpack(_))),
            "{:?}",
            out.outcome
        );
        // The engine restarts.
        let out = t.accept(0, &batch(vec![stored(&a, 16, 0, 2)]));
        assert_eq!(out.outcome, Outcome::Restarted);
        index.apply(&out.events);
        assert_eq!(index.tier(Tier::G1), expected(&[&a[..]], 16));
        let c = t.counters();
        assert_eq!(
            (c.gaps, c.stale, c.malformed, c.restarts, c.resets),
            (1, 1, 1, 1, 3)
        );
    }

    proptest! {
        /// Random prompts split into engine blocks of random size, stored in random chunks,
        /// one branching off the other, then the first's last block evicted: the translated
        /// kvfleet blocks are exactly what the router computes from the cached tokens.
        #[test]
        fn translated_hashes_are_the_routers(
            first in prop::collection::vec(0u32..50_000, 0..300),
            tail in prop::collection::vec(50_000u32..100_000, 0..200),
            e in 1usize..40,
            k in 1u32..70,
            cut in 0usize..300,
            chunks in prop::collection::vec(1usize..6, 1..80),
        ) {
            let mut t = Translator::new(WorkerId(1), BlockSize::new(k).unwrap());
            let mut index = Index::default();
            let mut seq = 0;
            let n1 = first.len() / e;
            // The first prompt, in chunks of engine blocks.
            let mut at = 0;
            let mut sizes = chunks.iter().cycle();
            while at < n1 {
                let next = (at + sizes.next().copied().unwrap_or(1)).min(n1);
                run(&mut t, &mut index, seq, vec![stored(&first, e, at, next)]);
                seq += 1;
                at = next;
            }
            // The second shares `shared` engine blocks of the first.
            let shared = cut.min(n1);
            let mut second = first[..shared * e].to_vec();
            second.extend_from_slice(&tail);
            let n2 = second.len() / e;
            if n2 > shared {
                run(&mut t, &mut index, seq, vec![stored(&second, e, shared, n2)]);
                seq += 1;
            }
            prop_assert_eq!(
                index.tier(Tier::G1),
                expected(&[&first[..n1 * e], &second[..n2 * e]], k)
            );
            // Evict the first prompt's last block (if the second does not hold it too).
            if n1 > shared {
                run(&mut t, &mut index, seq, vec![removed(&first, e, &[n1 - 1])]);
                prop_assert_eq!(
                    index.tier(Tier::G1),
                    expected(&[&first[..(n1 - 1) * e], &second[..n2 * e]], k)
                );
            }
            prop_assert_eq!(t.counters().orphan_blocks, 0);
        }
    }
}
