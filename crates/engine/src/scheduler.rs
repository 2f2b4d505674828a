//! The scheduler core every engine shares: continuous batching over a paged, prefix-cached KV
//! pool, generic over the [`Executor`] that computes tokens.
//!
//! Each step, running sequences go first (oldest first): each gets one decode token or its next
//! prefill chunk, within `max_batched_tokens`. A running sequence that needs a block when none is
//! free or evictable preempts the newest running sequence (its blocks are freed and it goes back
//! to the front of the waiting queue to be recomputed, often partly from the prefix cache).
//! Then waiting requests are admitted in arrival order while there are sequence slots, token
//! budget and blocks, each starting after its longest cached prefix.
//!
//! A step has a start and an end. At the start the batch is planned, blocks are allocated and
//! the executor runs; its tokens are applied at the end (`start + elapsed`), when newly computed
//! full blocks enter the prefix cache. Between the two, requests can be submitted (they join the
//! next step) or cancelled (their tokens are discarded). Nothing here reads a clock.

use std::collections::{HashMap, VecDeque};

use std::time::Duration;

use kvfleet_proto::hash::BlockHasher;
use kvfleet_proto::{BlockHash, BlockSize, KvEvent, KvLayout, SamplingParams, SequenceHash, Tier};

use crate::block_pool::{BlockId, BlockPool, Origin, PoolUsage};
use crate::config::{ConfigError, SchedulerConfig};
use crate::engine::{
    Engine, EngineMetrics, EngineOutput, ExportError, Finish, FinishReason, ImportError,
    ImportReport, KvExport, Request, RequestStats, SubmitError, TokenOutput,
};
use crate::executor::{ExecError, Executor, RequestId, ScheduledBatch, ScheduledSeq, StepOutput};
use crate::fast_hash::FastMap;
use crate::tiers::TierStore;

#[derive(Debug)]
struct Sequence {
    /// Prompt followed by the tokens generated so far.
    tokens: Vec<u32>,
    prompt_len: usize,
    sampling: SamplingParams,
    /// Hashes of every full block of `tokens`.
    hashes: Vec<BlockHash>,
    /// The fleet's hasher salted with the request's `cache_salt`: the blocks a decode step
    /// fills are hashed with it too.
    hasher: BlockHasher,
    /// The block table: covers positions `0..num_computed` plus this step's tokens.
    blocks: Vec<BlockId>,
    /// Tokens whose KV is in `blocks`.
    num_computed: usize,
    /// Leading blocks already offered to the prefix cache.
    num_registered: usize,
    arrival: Duration,
    first_token: Option<Duration>,
    admitted_once: bool,
    /// When it was first admitted (its arrival until then).
    admitted: Duration,
    cached_tokens: u32,
    preemptions: u32,
}

impl Sequence {
    fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }
}

#[derive(Debug, Clone, Copy)]
struct Planned {
    id: RequestId,
    num_tokens: usize,
    sample: bool,
}

#[derive(Debug)]
struct InFlight {
    end: Duration,
    plan: Vec<Planned>,
    outputs: Vec<StepOutput>,
}

#[derive(Debug, Clone, Copy)]
struct StepRecord {
    end: Duration,
    seqs: usize,
    prefill_tokens: usize,
    decode_tokens: usize,
}

/// Cumulative counters behind [`EngineMetrics`].
#[derive(Debug, Default)]
struct Counters {
    steps: u64,
    preemptions: u64,
    finished: u64,
    output_tokens: u64,
    admitted: u64,
    prefix_query_tokens: u64,
    prefix_hit_tokens: u64,
    events_dropped: u64,
    last_batch_seqs: usize,
    last_batch_tokens: usize,
}

/// The scheduler core over an executor `E`; implements [`Engine`].
#[derive(Debug)]
pub struct Scheduler<E> {
    config: SchedulerConfig,
    executor: E,
    layout: KvLayout,
    block_size: BlockSize,
    pool: BlockPool,
    seqs: FastMap<RequestId, Sequence>,
    waiting: VecDeque<RequestId>,
    running: Vec<RequestId>,
    next_request: u64,
    now: Duration,
    inflight: Option<InFlight>,
    outputs: Vec<EngineOutput>,
    events: VecDeque<KvEvent>,
    next_event_id: u64,
    counters: Counters,
    window: VecDeque<StepRecord>,
    first_step_start: Option<Duration>,
    /// The lower KV tiers, when configured.
    tiers: Option<TierStore>,
    /// Blocks onboarded from G2, G3, G4 for the step being planned.
    step_onboard: [u32; 3],
}

impl<E: Executor> Scheduler<E> {
    /// A scheduler over `executor`, with a pool sized from `config.kv_memory` and the
    /// executor's block layout.
    pub fn new(config: SchedulerConfig, executor: E) -> Result<Self, ConfigError> {
        config.validate()?;
        let layout = executor.kv_layout();
        let block_bytes = layout.block_bytes() as u64;
        let num_blocks = config.kv_memory.blocks(block_bytes)?;
        let tiers = if config.tiers.enabled() {
            // The tiers' blocks are in the executor's tier order: one fingerprint per layout
            // and order (0, the canonical order, leaves the layout's fingerprint as it is).
            Some(TierStore::open(
                &config.tiers,
                layout.fingerprint() ^ executor.tier_order(),
                block_bytes,
            )?)
        } else {
            None
        };
        let mut pool = BlockPool::new(num_blocks, block_bytes);
        pool.track_evictions(tiers.is_some());
        let mut scheduler = Self {
            block_size: layout.block_size,
            layout,
            pool,
            executor,
            config,
            seqs: FastMap::default(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            next_request: 0,
            now: Duration::ZERO,
            inflight: None,
            outputs: Vec::new(),
            events: VecDeque::new(),
            next_event_id: 0,
            counters: Counters::default(),
            window: VecDeque::new(),
            first_step_start: None,
            tiers,
            step_onboard: [0; 3],
        };
        // A disk tier that survived a restart announces what it holds.
        scheduler.push_pool_events();
        Ok(scheduler)
    }

    /// The lower KV tiers, when configured.
    pub fn tiers(&self) -> Option<&TierStore> {
        self.tiers.as_ref()
    }

    /// Waits until every queued disk write is done (tests, and a clean shutdown that wants
    /// its offloaded blocks on disk; dropping the engine also does it).
    pub fn flush_tiers(&mut self) {
        if let Some(tiers) = &mut self.tiers {
            tiers.flush();
        }
        self.push_pool_events();
    }

    /// Hands the blocks the pool evicted since the last call to the lower tiers, copying out
    /// the bytes they keep. Called before anything can overwrite an evicted block.
    fn offload_evicted(&mut self) {
        let Some(tiers) = &mut self.tiers else {
            return;
        };
        let evicted = self.pool.take_evicted();
        if evicted.is_empty() {
            return;
        }
        let blocks = tiers.plan_offload(&evicted);
        if blocks.is_empty() {
            tiers.offload(&[], &[]);
            return;
        }
        // A failed copy leaves those blocks out of the lower tiers (counted as missing).
        let data = self
            .executor
            .copy_tier_blocks_out(&blocks)
            .unwrap_or_default();
        if data.is_empty() {
            tiers.offload(&[], &[]);
        } else {
            tiers.offload(&blocks, &data);
        }
    }

    /// Brings `lower` (the prompt's next blocks after its G1 hits, each with the tier holding
    /// it) into the fresh blocks `targets`, stopping at the first that cannot be read. Returns
    /// how many were onboarded and registered in the prefix cache after `parent`.
    fn onboard(
        &mut self,
        lower: &[(BlockHash, Tier)],
        targets: &[BlockId],
        parent: Option<SequenceHash>,
    ) -> usize {
        let Some(tiers) = &mut self.tiers else {
            return 0;
        };
        let mut found: Vec<(BlockHash, Tier, Option<Origin>)> = Vec::with_capacity(lower.len());
        for &(hash, _) in lower {
            // Looked up again: offloading what this admission evicted may have moved a block
            // down a tier (or off the last one) since the walk.
            let Some(tier) = tiers.lookup(hash.sequence) else {
                break;
            };
            match tiers.fetch(hash.sequence, tier) {
                // Block by block, straight from the tier's bytes: one copy each.
                Ok(Some(bytes)) => {
                    let target = targets[found.len()];
                    if self
                        .executor
                        .copy_tier_blocks_in(&[target], &bytes)
                        .is_err()
                    {
                        break;
                    }
                }
                Ok(None) => {}
                Err(_) => break,
            }
            found.push((hash, tier, tiers.origin_of(hash.sequence)));
        }
        let got = found.len();
        for &(hash, tier, _) in &found {
            tiers.onboarded(hash.sequence, tier);
            let slot = match tier {
                Tier::G2 => 0,
                Tier::G3 => 1,
                Tier::G1 | Tier::G4 => 2,
            };
            self.step_onboard[slot] += 1;
        }
        // Each block gets its origin back: one registration per run of blocks from one origin.
        let mut parent = parent;
        let mut start = 0;
        while start < found.len() {
            let origin = found[start].2;
            let end = found[start..]
                .iter()
                .position(|f| f.2 != origin)
                .map_or(found.len(), |n| start + n);
            let pairs: Vec<(BlockId, BlockHash)> = targets[start..end]
                .iter()
                .zip(&found[start..end])
                .map(|(&b, &(h, _, _))| (b, h))
                .collect();
            self.pool.register_from(parent, &pairs, origin);
            parent = Some(found[end - 1].0.sequence);
            start = end;
        }
        got
    }

    /// The configuration in force.
    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    /// The block pool (read-only: for metrics, tests and invariant checks).
    pub fn pool(&self) -> &BlockPool {
        &self.pool
    }

    /// The executor.
    pub fn executor(&self) -> &E {
        &self.executor
    }

    /// The executor, mutably (e.g. to change a mock's profile between runs).
    pub fn executor_mut(&mut self) -> &mut E {
        &mut self.executor
    }

    /// The engine's clock: the latest time it was given.
    pub fn now(&self) -> Duration {
        self.now
    }

    /// Whether any request is waiting, running or in flight.
    pub fn has_work(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty() || self.inflight.is_some()
    }

    /// Checks the pool's invariants and that every block reference is held by exactly one
    /// sequence's block table. For tests; O(blocks + tokens).
    pub fn check_invariants(&self) -> Result<(), String> {
        self.pool.check()?;
        let mut refs: HashMap<BlockId, u32> = HashMap::new();
        for (id, seq) in &self.seqs {
            let in_running = self.running.contains(id);
            if !in_running && !seq.blocks.is_empty() {
                return Err(format!("{id:?} is not running but holds blocks"));
            }
            for &b in &seq.blocks {
                *refs.entry(b).or_default() += 1;
            }
            if seq.hashes.len() != seq.tokens.len() / self.block_size.tokens() {
                return Err(format!("{id:?} has stale block hashes"));
            }
        }
        for b in 0..self.pool.num_blocks() {
            let held = refs.get(&b).copied().unwrap_or(0);
            if held != self.pool.ref_count(b) {
                return Err(format!(
                    "block {b}: {held} holders but ref count {}",
                    self.pool.ref_count(b)
                ));
            }
        }
        if self.waiting.len() + self.running.len() != self.seqs.len() {
            return Err("a sequence is in neither or both queues".into());
        }
        Ok(())
    }

    fn validate(&self, request: &Request) -> Result<(), SubmitError> {
        let prompt_tokens = request.prompt.len();
        if prompt_tokens == 0 {
            return Err(SubmitError::EmptyPrompt);
        }
        request.sampling.validate()?;
        if request.sampling.generated_in_prompt as usize >= prompt_tokens {
            return Err(SubmitError::GeneratedInPromptTooLong {
                generated_in_prompt: request.sampling.generated_in_prompt,
                prompt_tokens,
            });
        }
        if let Some(vocab_size) = self.executor.vocab_size()
            && let Some((position, &token)) = request
                .prompt
                .iter()
                .enumerate()
                .find(|(_, t)| **t >= vocab_size)
        {
            return Err(SubmitError::TokenOutOfVocab {
                position,
                token,
                vocab_size,
            });
        }
        let max_tokens = request.sampling.max_tokens;
        let total = prompt_tokens.saturating_add(max_tokens as usize);
        if total > self.config.max_model_len {
            return Err(SubmitError::ExceedsContext {
                prompt_tokens,
                max_tokens,
                max_model_len: self.config.max_model_len,
            });
        }
        // The last generated token is never fed back, so it needs no KV slot.
        let needed_blocks = self.block_size.blocks_for(total - 1);
        if needed_blocks > self.pool.num_blocks() as usize {
            return Err(SubmitError::ExceedsPool {
                needed_blocks,
                pool_blocks: self.pool.num_blocks(),
            });
        }
        if !self.config.chunked_prefill && total - 1 > self.config.max_batched_tokens {
            // A recompute after preemption replays prompt and output in one chunk.
            return Err(SubmitError::ExceedsBatch {
                prompt_tokens,
                max_batched_tokens: self.config.max_batched_tokens,
            });
        }
        if self.waiting.len() >= self.config.max_waiting {
            return Err(SubmitError::Overloaded {
                waiting: self.waiting.len(),
                limit: self.config.max_waiting,
            });
        }
        Ok(())
    }

    /// Numbers the cache changes of the pool (G1) and then of the lower tiers, and queues them
    /// for the caller.
    fn push_pool_events(&mut self) {
        let lower = self
            .tiers
            .as_mut()
            .map(TierStore::take_events)
            .unwrap_or_default();
        let g1 = self.pool.take_events().into_iter().map(|d| (Tier::G1, d));
        for (tier, data) in g1.chain(lower) {
            if self.events.len() >= self.config.max_pending_events {
                self.events.pop_front();
                self.counters.events_dropped += 1;
            }
            self.events.push_back(KvEvent {
                worker: self.config.worker,
                event_id: self.next_event_id,
                tier,
                data,
            });
            self.next_event_id += 1;
        }
    }

    fn release_seq_blocks(pool: &mut BlockPool, seq: &mut Sequence) {
        pool.release(seq.blocks.drain(..).rev());
        seq.num_computed = 0;
        seq.num_registered = 0;
    }

    /// Removes a request entirely (finished, cancelled or aborted).
    fn remove(&mut self, id: RequestId) -> bool {
        let Some(mut seq) = self.seqs.remove(&id) else {
            return false;
        };
        Self::release_seq_blocks(&mut self.pool, &mut seq);
        if let Some(i) = self.running.iter().position(|&r| r == id) {
            self.running.remove(i);
        } else if let Some(i) = self.waiting.iter().position(|&r| r == id) {
            self.waiting.remove(i);
        }
        self.executor.release(id);
        true
    }

    fn preempt(&mut self, id: RequestId) {
        if let Some(seq) = self.seqs.get_mut(&id) {
            Self::release_seq_blocks(&mut self.pool, seq);
            seq.preemptions += 1;
        }
        self.running.retain(|&r| r != id);
        self.waiting.push_front(id);
        self.counters.preemptions += 1;
    }

    /// Plans the next batch: which sequences run and how many tokens each processes. Allocates
    /// their blocks (preempting when the pool runs dry).
    fn plan(&mut self) -> Vec<Planned> {
        let bs = self.block_size;
        let mut budget = self.config.max_batched_tokens;
        let mut plan = Vec::with_capacity(self.running.len() + 1);
        let mut preempted = false;
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let id = self.running[i];
            let Some(seq) = self.seqs.get(&id) else {
                i += 1;
                continue;
            };
            let remaining = seq.tokens.len() - seq.num_computed;
            let n = remaining.min(budget);
            if n == 0 {
                i += 1;
                continue;
            }
            let need = bs
                .blocks_for(seq.num_computed + n)
                .saturating_sub(seq.blocks.len());
            let mut self_preempted = false;
            while need > self.pool.available() {
                // Lowest priority: the newest running sequence, which may be this one.
                let Some(&victim) = self.running.last() else {
                    break;
                };
                preempted = true;
                self.preempt(victim);
                if victim == id {
                    self_preempted = true;
                    break;
                }
            }
            if self_preempted {
                break;
            }
            let Some(seq) = self.seqs.get_mut(&id) else {
                break;
            };
            if self.pool.allocate(need, &mut seq.blocks).is_err() {
                // Unreachable: availability was checked above. Preempt rather than panic.
                self.preempt(id);
                break;
            }
            plan.push(Planned {
                id,
                num_tokens: n,
                sample: seq.num_computed + n == seq.tokens.len(),
            });
            budget -= n;
            i += 1;
        }

        // No admissions in a step that had to preempt: the pool is under pressure.
        while !preempted && budget > 0 && self.running.len() < self.config.max_num_seqs {
            let Some(&id) = self.waiting.front() else {
                break;
            };
            let Some(seq) = self.seqs.get(&id) else {
                self.waiting.pop_front();
                continue;
            };
            // Keep at least one token to compute: its logits give the next token.
            let max_hits = if self.config.enable_prefix_caching {
                (seq.tokens.len() - 1) / bs.tokens()
            } else {
                0
            };
            let mut hit_blocks: Vec<BlockId> = Vec::new();
            let mut evictable_hits = 0;
            for h in &seq.hashes[..max_hits] {
                match self.pool.cached_block(h.sequence) {
                    Some(b) => {
                        evictable_hits += usize::from(self.pool.is_evictable(b));
                        hit_blocks.push(b);
                    }
                    None => break,
                }
            }
            // Then the longest continuation held in a lower tier (G2 before G3).
            let hits = hit_blocks.len();
            let mut lower: Vec<(BlockHash, Tier)> = Vec::new();
            if let Some(tiers) = &self.tiers {
                for h in &seq.hashes[hits..max_hits] {
                    match tiers.lookup(h.sequence) {
                        Some(tier) => lower.push((*h, tier)),
                        None => break,
                    }
                }
            }
            let parent = hits.checked_sub(1).map(|i| seq.hashes[i].sequence);
            let total_tokens = seq.tokens.len();
            let mut computed = (hits + lower.len()) * bs.tokens();
            let remaining = total_tokens - computed;
            if !self.config.chunked_prefill && remaining > budget {
                break;
            }
            let mut n = remaining.min(budget);
            let need = bs.blocks_for(computed + n) - hits;
            if need + evictable_hits > self.pool.available() {
                break;
            }
            for &b in &hit_blocks {
                self.pool.acquire(b);
            }
            let mut blocks = hit_blocks;
            if self.pool.allocate(need, &mut blocks).is_err() {
                // Unreachable (checked above); undo and stop admitting.
                self.pool.release(blocks.drain(..).rev());
                break;
            }
            if !lower.is_empty() {
                // The fresh blocks may have evicted cached ones: save those before writing.
                self.offload_evicted();
                let targets = blocks[hits..hits + lower.len()].to_vec();
                let onboarded = self.onboard(&lower, &targets, parent);
                if onboarded < lower.len() {
                    // A block could not be read: compute from there on.
                    computed = (hits + onboarded) * bs.tokens();
                    let remaining = total_tokens - computed;
                    if !self.config.chunked_prefill && remaining > budget {
                        // Leave it waiting; the unreadable block is gone from its tier, so the
                        // next attempt plans without it.
                        self.pool.release(blocks.drain(..).rev());
                        break;
                    }
                    n = remaining.min(budget);
                    let keep = bs.blocks_for(computed + n);
                    self.pool.release(blocks.drain(keep..).rev());
                }
            }
            let Some(seq) = self.seqs.get_mut(&id) else {
                self.pool.release(blocks.drain(..).rev());
                self.waiting.pop_front();
                continue;
            };
            seq.blocks = blocks;
            seq.num_computed = computed;
            seq.num_registered = computed / bs.tokens();
            if !seq.admitted_once {
                seq.admitted_once = true;
                seq.admitted = self.now;
                seq.cached_tokens = computed as u32;
                self.counters.admitted += 1;
                self.counters.prefix_query_tokens += seq.prompt_len as u64;
                self.counters.prefix_hit_tokens += computed.min(seq.prompt_len) as u64;
            }
            plan.push(Planned {
                id,
                num_tokens: n,
                sample: computed + n == seq.tokens.len(),
            });
            budget -= n;
            self.waiting.pop_front();
            self.running.push(id);
        }
        plan
    }

    /// Starts a step at `start`. Returns false when nothing could be scheduled.
    fn start_step(&mut self, start: Duration) -> Result<bool, ExecError> {
        if let Some(tiers) = &mut self.tiers {
            tiers.poll();
        }
        self.step_onboard = [0; 3];
        let plan = self.plan();
        self.offload_evicted();
        // Preemption and eviction events happen at the start of the step.
        self.push_pool_events();
        if plan.is_empty() {
            return Ok(false);
        }
        let usage = self.pool.usage();
        let mut batch = ScheduledBatch {
            seqs: Vec::with_capacity(plan.len()),
            num_tokens: 0,
            num_prefill_tokens: 0,
            num_decode_seqs: 0,
            kv_blocks_used: usage.used,
            kv_blocks_total: usage.total,
            onboarded_blocks: std::mem::take(&mut self.step_onboard),
        };
        for p in &plan {
            let Some(seq) = self.seqs.get(&p.id) else {
                continue;
            };
            let s = ScheduledSeq {
                request: p.id,
                tokens: &seq.tokens[seq.num_computed..seq.num_computed + p.num_tokens],
                start_pos: seq.num_computed,
                block_table: &seq.blocks,
                prompt: &seq.tokens[..seq.prompt_len],
                generated: &seq.tokens[seq.prompt_len..],
                sampling: &seq.sampling,
                sample: p.sample,
            };
            batch.num_tokens += p.num_tokens;
            if s.is_decode() {
                batch.num_decode_seqs += 1;
            } else {
                batch.num_prefill_tokens += p.num_tokens;
            }
            batch.seqs.push(s);
        }
        let (seqs, tokens) = (batch.seqs.len(), batch.num_tokens);
        let (prefill, decode) = (batch.num_prefill_tokens, batch.num_decode_seqs);
        let result = self.executor.execute(&batch);
        drop(batch);
        match result {
            Ok(result) => {
                let end = start.saturating_add(result.elapsed);
                self.counters.steps += 1;
                self.counters.last_batch_seqs = seqs;
                self.counters.last_batch_tokens = tokens;
                self.first_step_start.get_or_insert(start);
                self.window.push_back(StepRecord {
                    end,
                    seqs,
                    prefill_tokens: prefill,
                    decode_tokens: decode,
                });
                self.inflight = Some(InFlight {
                    end,
                    plan,
                    outputs: result.outputs,
                });
                Ok(true)
            }
            Err(e) => {
                for p in plan {
                    if self.remove(p.id) {
                        self.outputs.push(EngineOutput::Aborted {
                            request: p.id,
                            time: start,
                            error: e.to_string(),
                        });
                    }
                }
                self.push_pool_events();
                Err(e)
            }
        }
    }

    /// Applies the in-flight step's results at its end time.
    fn finish_step(&mut self, step: InFlight) {
        let bs = self.block_size;
        let end = step.end;
        let mut sampled: FastMap<RequestId, StepOutput> =
            step.outputs.into_iter().map(|o| (o.request, o)).collect();
        let mut done: Vec<RequestId> = Vec::new();
        for p in step.plan {
            let Some(seq) = self.seqs.get_mut(&p.id) else {
                continue; // cancelled while in flight
            };
            seq.num_computed += p.num_tokens;
            let full = (seq.num_computed / bs.tokens()).min(seq.hashes.len());
            if full > seq.num_registered && self.config.enable_prefix_caching {
                let parent = seq
                    .num_registered
                    .checked_sub(1)
                    .map(|i| seq.hashes[i].sequence);
                let pairs: Vec<(BlockId, BlockHash)> = (seq.num_registered..full)
                    .map(|k| (seq.blocks[k], seq.hashes[k]))
                    .collect();
                self.pool.register(parent, &pairs);
                seq.num_registered = full;
            }
            if !p.sample {
                continue;
            }
            let Some(out) = sampled.remove(&p.id) else {
                done.push(p.id);
                self.outputs.push(EngineOutput::Aborted {
                    request: p.id,
                    time: end,
                    error: "the executor returned no token for this sequence".into(),
                });
                continue;
            };
            seq.tokens.push(out.token);
            if seq.tokens.len() % bs.tokens() == 0 {
                let parent = seq.hashes.last().map(|h| h.sequence);
                let start = seq.tokens.len() - bs.tokens();
                let hash = seq.hasher.hash_block(parent, &seq.tokens[start..]);
                seq.hashes.push(hash);
            }
            let first = *seq.first_token.get_or_insert(end);
            let generated = seq.generated();
            let reason = if seq.sampling.stop_token_ids.contains(&out.token) {
                Some(FinishReason::Stop(out.token))
            } else if !seq.sampling.ignore_eos && self.config.eos_token_ids.contains(&out.token) {
                Some(FinishReason::Eos(out.token))
            } else if generated >= seq.sampling.max_tokens as usize
                || seq.tokens.len() >= self.config.max_model_len
            {
                Some(FinishReason::Length)
            } else {
                None
            };
            let finish = reason.map(|reason| Finish {
                reason,
                stats: RequestStats {
                    arrival: seq.arrival,
                    admitted: seq.admitted,
                    first_token: first,
                    finished: end,
                    prompt_tokens: seq.prompt_len as u32,
                    cached_tokens: seq.cached_tokens,
                    output_tokens: generated as u32,
                    preemptions: seq.preemptions,
                },
            });
            self.outputs.push(EngineOutput::Token(TokenOutput {
                request: p.id,
                token: out.token,
                logprob: out.logprob,
                top_logprobs: out.top_logprobs,
                index: (generated - 1) as u32,
                time: end,
                finish,
            }));
            if finish.is_some() {
                self.counters.output_tokens += generated as u64;
                done.push(p.id);
            }
        }
        for id in done {
            if self.remove(id) {
                self.counters.finished += 1;
            }
        }
        self.push_pool_events();
        // Keep the metrics window bounded in time and length.
        let window = self.config.metrics_window;
        while let Some(front) = self.window.front() {
            if front.end.saturating_add(window) < end || self.window.len() > 100_000 {
                self.window.pop_front();
            } else {
                break;
            }
        }
    }

    fn pool_usage(&self) -> PoolUsage {
        self.pool.usage()
    }
}

impl<E: Executor> Engine for Scheduler<E> {
    fn kv_layout(&self) -> &KvLayout {
        &self.layout
    }

    fn submit(&mut self, request: Request, now: Duration) -> Result<RequestId, SubmitError> {
        self.validate(&request)?;
        let hasher = request.sampling.hasher(&self.config.block_hasher);
        let hashes = hasher.block_hashes(&request.prompt, self.block_size);
        if let Some(kv) = &request.kv {
            if kv.first_block != 0 {
                return Err(ImportError::NotFromStart {
                    first_block: kv.first_block,
                }
                .into());
            }
            let ours = hashes
                .iter()
                .map(|h| Some(h.sequence))
                .chain(std::iter::repeat(None));
            if let Some(index) = kv
                .blocks
                .iter()
                .zip(ours)
                .position(|(theirs, ours)| ours != Some(theirs.sequence))
            {
                return Err(SubmitError::KvMismatch { index });
            }
            self.import_kv(kv)?;
        }
        self.now = self.now.max(now);
        let id = RequestId(self.next_request);
        self.next_request += 1;
        let Request {
            prompt, sampling, ..
        } = request;
        let prompt_len = prompt.len();
        let mut tokens = prompt;
        tokens.reserve(sampling.max_tokens as usize);
        self.seqs.insert(
            id,
            Sequence {
                tokens,
                prompt_len,
                sampling,
                hashes,
                hasher,
                blocks: Vec::new(),
                num_computed: 0,
                num_registered: 0,
                arrival: now,
                first_token: None,
                admitted_once: false,
                admitted: now,
                cached_tokens: 0,
                preemptions: 0,
            },
        );
        self.waiting.push_back(id);
        Ok(id)
    }

    fn cancel(&mut self, request: RequestId) -> bool {
        let removed = self.remove(request);
        self.push_pool_events();
        removed
    }

    fn step_until(&mut self, until: Duration) -> Result<(), ExecError> {
        loop {
            if let Some(end) = self.inflight.as_ref().map(|f| f.end) {
                if end > until {
                    break;
                }
                self.now = self.now.max(end);
                if let Some(step) = self.inflight.take() {
                    self.finish_step(step);
                }
                continue;
            }
            if self.waiting.is_empty() && self.running.is_empty() {
                break;
            }
            if self.now > until {
                break;
            }
            if self.config.realtime {
                self.now = until;
            }
            if !self.start_step(self.now)? {
                break;
            }
        }
        self.now = self.now.max(until);
        Ok(())
    }

    fn next_event_time(&self) -> Option<Duration> {
        match &self.inflight {
            Some(f) => Some(f.end),
            None if !self.waiting.is_empty() || !self.running.is_empty() => Some(self.now),
            None => None,
        }
    }

    fn drain_outputs(&mut self) -> Vec<EngineOutput> {
        std::mem::take(&mut self.outputs)
    }

    fn drain_events(&mut self) -> Vec<KvEvent> {
        self.events.drain(..).collect()
    }

    fn export_kv_salted(
        &self,
        tokens: &[u32],
        cache_salt: Option<&str>,
        first_block: usize,
    ) -> Result<KvExport, ExportError> {
        let mut blocks = self
            .config
            .block_hasher
            .salted(cache_salt)
            .block_hashes(tokens, self.block_size);
        // The chain must be cached from block 0: a block whose parent is gone is unusable.
        let ids: Vec<BlockId> = blocks
            .iter()
            .map_while(|h| self.pool.cached_block(h.sequence))
            .collect();
        let first = first_block.min(ids.len());
        blocks.truncate(ids.len());
        blocks.drain(..first);
        let data = if first == ids.len() {
            Vec::new()
        } else {
            self.executor.copy_blocks_out(&ids[first..])?
        };
        Ok(KvExport {
            layout: self.layout.clone(),
            first_block: first,
            blocks,
            data,
            origin: None,
        })
    }

    fn import_kv(&mut self, export: &KvExport) -> Result<ImportReport, ImportError> {
        if !self.config.enable_prefix_caching {
            return Err(ImportError::PrefixCachingDisabled);
        }
        if export.first_block != 0 {
            return Err(ImportError::NotFromStart {
                first_block: export.first_block,
            });
        }
        if let Some((field, ours, theirs)) = self.layout.mismatch(&export.layout) {
            return Err(ImportError::LayoutMismatch {
                field,
                ours,
                theirs,
            });
        }
        let block_bytes = self.layout.block_bytes();
        let expected = export.blocks.len().saturating_mul(block_bytes);
        if export.data.len() != expected {
            return Err(ImportError::DataLength {
                blocks: export.blocks.len(),
                expected,
                got: export.data.len(),
            });
        }
        let mut report = ImportReport::default();
        // Every block of the chain walked so far, each holding one reference taken here.
        let mut chain: Vec<(BlockId, BlockHash)> = Vec::new();
        let mut fresh: Vec<(BlockId, usize)> = Vec::new();
        for (i, hash) in export.blocks.iter().enumerate() {
            if let Some(b) = self.pool.cached_block(hash.sequence) {
                self.pool.acquire(b);
                chain.push((b, *hash));
                report.already_cached += 1;
                continue;
            }
            let mut one = Vec::with_capacity(1);
            if self.pool.allocate(1, &mut one).is_err() {
                report.dropped = export.blocks.len() - i;
                break;
            }
            chain.push((one[0], *hash));
            fresh.push((one[0], i));
        }
        // Blocks the import's allocations evicted keep their bytes in the lower tiers.
        self.offload_evicted();
        if !fresh.is_empty() {
            let ids: Vec<BlockId> = fresh.iter().map(|&(b, _)| b).collect();
            let mut data = Vec::with_capacity(fresh.len() * block_bytes);
            for &(_, i) in &fresh {
                data.extend_from_slice(&export.data[i * block_bytes..(i + 1) * block_bytes]);
            }
            if let Err(e) = self.executor.copy_blocks_in(&ids, &data) {
                self.pool.release(chain.iter().rev().map(|&(b, _)| b));
                self.push_pool_events();
                return Err(e.into());
            }
        }
        report.imported = fresh.len();
        self.pool.register_from(None, &chain, export.origin);
        self.pool.release(chain.iter().rev().map(|&(b, _)| b));
        self.push_pool_events();
        Ok(report)
    }

    fn evict_origin(&mut self, origin: Origin) -> usize {
        let mut n = self.pool.evict_origin(origin);
        if let Some(tiers) = &mut self.tiers {
            n += tiers.evict_origin(origin);
        }
        self.push_pool_events();
        n
    }

    fn clear_prefix_cache(&mut self) {
        self.pool.clear_cache();
        for seq in self.seqs.values_mut() {
            // Blocks computed so far will never be registered: their slots lost their hashes.
            seq.num_registered = seq.num_computed / self.block_size.tokens();
        }
        self.push_pool_events();
    }

    fn metrics(&self) -> EngineMetrics {
        let usage = self.pool_usage();
        let window = self.config.metrics_window;
        let from = self.now.saturating_sub(window);
        let mut prefill = 0usize;
        let mut decode = 0usize;
        let mut seqs = 0usize;
        let mut steps = 0usize;
        for r in self
            .window
            .iter()
            .filter(|r| r.end > from && r.end <= self.now)
        {
            prefill += r.prefill_tokens;
            decode += r.decode_tokens;
            seqs += r.seqs;
            steps += 1;
        }
        let span = match self.first_step_start {
            Some(first) => self.now.saturating_sub(first).min(window).as_secs_f64(),
            None => 0.0,
        };
        let rate = |tokens: usize| {
            if span > 0.0 {
                tokens as f64 / span
            } else {
                0.0
            }
        };
        let prefill_tokens_pending = self
            .seqs
            .values()
            .map(|seq| {
                // A sequence that has sampled feeds back its last token as a decode; a
                // sequence that has not must still compute its whole prompt.
                let end = if seq.generated() == 0 {
                    seq.tokens.len()
                } else {
                    seq.tokens.len() - 1
                };
                end.saturating_sub(seq.num_computed) as u64
            })
            .sum();
        EngineMetrics {
            waiting: self.waiting.len(),
            running: self.running.len(),
            prefill_tokens_pending,
            kv_blocks_total: usage.total,
            kv_blocks_used: usage.used,
            kv_blocks_cached: usage.cached,
            kv_blocks_free: usage.free,
            kv_block_bytes: self.pool.block_bytes(),
            block_size: self.block_size.get(),
            last_batch_seqs: self.counters.last_batch_seqs,
            last_batch_tokens: self.counters.last_batch_tokens,
            mean_batch_seqs: if steps > 0 {
                seqs as f64 / steps as f64
            } else {
                0.0
            },
            prefill_tokens_per_s: rate(prefill),
            decode_tokens_per_s: rate(decode),
            steps: self.counters.steps,
            preemptions: self.counters.preemptions,
            finished: self.counters.finished,
            output_tokens: self.counters.output_tokens,
            admitted: self.counters.admitted,
            prefix_query_tokens: self.counters.prefix_query_tokens,
            prefix_hit_tokens: self.counters.prefix_hit_tokens,
            events_dropped: self.counters.events_dropped,
            tiers: self
                .tiers
                .as_ref()
                .map(TierStore::stats)
                .unwrap_or_default(),
        }
    }
}
