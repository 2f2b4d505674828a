//! The `kv` mode's cost: predicted time, in milliseconds, from each worker's performance profile.
//!
//! A block count is not a time: a prefix hit on a worker with a long queue is not worth what it
//! costs, and a worker holding many decode blocks (long contexts, cheap to decode) is not busier
//! than one with a few long prompts still to prefill. So for each candidate the router predicts
//! the request's time to first token there, and what the request does to the streams already
//! decoding there:
//!
//! ```text
//! ttft     = correction × (queue + prefill + decode_interleave) + busy + onboard + memory_wait
//! queue    = f(Q − P) − f(0)                 Q: prompt tokens queued ahead (reports + own decisions)
//! busy     = what is left of a prefill step in progress, of P tokens (own decisions: see below)
//! prefill  = f(0) + f(c + n) − f(c)          n new tokens after c cached ones (the profile's curve)
//! decode_interleave = steps × itl(B, ctx)    chunked prefill shares each step with B decoders
//!          (+ half a decode step when nothing is queued: the step in progress finishes first)
//! onboard  = Σ tiers latency + blocks × bytes / bandwidth     prefix blocks held in G2..G4
//! memory_wait = the share of the decode blocks that must end before the prompt fits, × the
//!          worker's mean decode time (learned from its requests' first and last tokens); a
//!          share over one (the queue ahead needs more than the running requests hold) counts
//!          one decode time per turnover of the running set
//! slowdown = B × (prefill + (itl(B+1, ctx') − itl(B, ctx)) × output_tokens)
//! cost     = ttft + itl_weight × slowdown
//! ```
//!
//! `f` is the profile's prefill curve ([`PerfProfile::prefill_curve_ms`]: TTFT of a prompt alone
//! on an idle worker, non-linear in length, chunking included), `itl(batch, context)` its decode
//! table, `steps = ⌈(Q − P + n) / max_batched_tokens⌉`. `B` (sequences running there) and `ctx`
//! (context per sequence) come from the worker's decode blocks and the router's own decisions.
//! `correction` is learned per worker from the predictions' errors
//! ([`crate::RouterConfig::learn_rate`]); the predicted TTFT of every decision is kept and
//! checked against the actual one ([`crate::prediction`]).
//!
//! Tokens still waiting are prefilled in the same steps as the request's own (chunked prefill
//! batches them), so they cost their marginal time `f(Q) − f(0)`, not a step each. A step
//! already running cannot take the request in: it waits for the whole of it. The router knows
//! such a step from its own decisions (a prompt sent to a worker with nothing queued starts at
//! once and ends when its prediction says), and costs its remainder as `busy`; without that
//! term every request of a burst sent to one worker within one prefill was predicted as if it
//! joined the first one's step, and came out later than predicted.
//!
//! A worker without a profile is costed with [`TimeModel::nominal`], a linear placeholder whose
//! scale the correction then learns.
//!
//! Pure arithmetic over the profile; the router calls it per candidate, so it allocates nothing.

use std::sync::Arc;

use kvfleet_proto::profile::{DecodeTable, PROFILE_FORMAT, PerfProfile, PrefillTable};
use kvfleet_proto::{Tier, profile::ProfileError};
use serde::{Deserialize, Serialize};

/// A performance profile prepared for costing: the figures the router needs per candidate,
/// looked up once.
#[derive(Debug, Clone)]
pub struct TimeModel {
    profile: Arc<PerfProfile>,
    /// `f(0)`: the fixed cost of a prefill step.
    overhead_ms: f64,
    /// Tokens one step prefills at most (chunked prefill).
    step_tokens: u64,
    /// Per lower tier (G2..G4): `(latency_ms, ms per block)`, `None` when the profile has no
    /// figure (those blocks are recomputed).
    onboard: [Option<(f64, f64)>; 3],
}

impl TimeModel {
    /// Prepares a validated profile.
    pub fn new(profile: Arc<PerfProfile>) -> Result<Self, ProfileError> {
        profile.validate()?;
        let block_bytes = profile.kv_block_bytes;
        let onboard = [Tier::G2, Tier::G3, Tier::G4].map(|tier| {
            let latency = profile.onboard_ms(tier, 0)?;
            let per_block = profile.onboard_ms(tier, block_bytes)? - latency;
            Some((latency, per_block))
        });
        Ok(Self {
            overhead_ms: profile.prefill_curve_ms(0),
            step_tokens: u64::from(profile.max_batched_tokens.max(1)),
            profile,
            onboard,
        })
    }

    /// The placeholder for workers without a profile: prefill 15 ms + 20 µs per token (about
    /// an 8B model on one modern GPU), decode 10 ms per token whatever the batch, 8,192 tokens
    /// per step. Only the shape matters much: the per-worker correction learns the scale.
    pub fn nominal(block_size: u32) -> Self {
        let profile = PerfProfile {
            format: PROFILE_FORMAT,
            model: "unknown".into(),
            device: "unknown".into(),
            engine: "unknown".into(),
            kernel_path: None,
            source: "kv-router's nominal placeholder (no profile for this worker)".into(),
            block_size: block_size.max(1),
            kv_block_bytes: 1,
            kv_blocks: 1,
            max_num_seqs: 256,
            max_batched_tokens: 8192,
            prefill: PrefillTable {
                tokens: vec![1024, 8192],
                ms: vec![15.0 + 1024.0 * 0.02, 15.0 + 8192.0 * 0.02],
            },
            decode: DecodeTable {
                batch: vec![1],
                context: vec![0],
                itl_ms: vec![vec![10.0]],
            },
            tiers: Vec::new(),
        };
        Self::new(Arc::new(profile))
            .unwrap_or_else(|_| unreachable!("the nominal profile is valid"))
    }

    /// The profile behind it.
    pub fn profile(&self) -> &PerfProfile {
        &self.profile
    }

    /// Time to work through `tokens` of other requests' prompts queued ahead, ms.
    pub fn queue_ms(&self, tokens: u64) -> f64 {
        if tokens == 0 {
            0.0
        } else {
            (self.profile.prefill_curve_ms(tokens) - self.overhead_ms).max(0.0)
        }
    }

    /// Time to prefill `new` tokens after `cached` ones, alone, ms.
    pub fn prefill_ms(&self, new: u64, cached: u64) -> f64 {
        self.profile.prefill_ms(new, cached)
    }

    /// Prefill steps needed for `tokens` (at least one).
    pub fn steps(&self, tokens: u64) -> u64 {
        tokens.div_ceil(self.step_tokens).max(1)
    }

    /// Inter-token latency of `batch` sequences of `context` tokens, ms; 0 for no batch.
    pub fn itl_ms(&self, batch: u32, context: u64) -> f64 {
        if batch == 0 {
            0.0
        } else {
            self.profile.itl_ms(batch, context)
        }
    }

    /// Onboarding `blocks[i]` blocks from G2, G3, G4 into G1, ms, and how many of them cannot be
    /// onboarded (no figure for their tier: they are recomputed instead).
    pub fn onboard_ms(&self, blocks: [u32; 3]) -> (f64, u32) {
        let mut ms = 0.0;
        let mut recompute = 0;
        for (count, cost) in blocks.into_iter().zip(self.onboard) {
            if count == 0 {
                continue;
            }
            match cost {
                Some((latency, per_block)) => ms += latency + f64::from(count) * per_block,
                None => recompute += count,
            }
        }
        (ms, recompute)
    }
}

/// What the router knows about one candidate when it costs a request there.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct Candidate {
    /// Prompt tokens queued ahead (reported plus own decisions since).
    pub(crate) queued_tokens: u64,
    /// Of those, the tokens of a prefill step already running, and the ms left of that step.
    pub(crate) busy_tokens: u64,
    pub(crate) busy_ms: f64,
    /// KV blocks held by its running requests.
    pub(crate) decode_blocks: u64,
    /// Sequences estimated to be running there.
    pub(crate) running: u32,
    /// Its KV capacity in blocks (0: unknown).
    pub(crate) kv_blocks: u64,
    /// Its mean time from first to last token, ms, once learned.
    pub(crate) decode_time_ms: Option<f64>,
    /// The learned factor on its predicted compute times.
    pub(crate) correction: f64,
    /// Leading prompt blocks it holds, and how many of them are in G2, G3, G4.
    pub(crate) overlap_blocks: u32,
    pub(crate) lower_tier_blocks: [u32; 3],
}

/// The request being costed.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Shape {
    pub(crate) prompt_tokens: u64,
    pub(crate) request_blocks: u32,
    pub(crate) output_tokens: u32,
    pub(crate) block_size: u32,
    pub(crate) itl_weight: f64,
}

/// The terms of one candidate's predicted time (see the module docs), ms.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct TimeCost {
    /// Other requests' prefill queued ahead of it (a step in progress included).
    pub queue_ms: f64,
    /// Its own prefill of the uncached part.
    pub prefill_ms: f64,
    /// Decode steps of the running streams interleaved with that prefill.
    pub decode_ms: f64,
    /// Copying prefix blocks up from lower tiers.
    pub onboard_ms: f64,
    /// Waiting for KV blocks to free up.
    pub memory_ms: f64,
    /// The learned factor applied to queue, prefill and decode.
    pub correction: f64,
    /// Predicted time to first token: the sum of the above.
    pub ttft_ms: f64,
    /// Delay it adds to the streams already decoding there, summed over them.
    pub slowdown_ms: f64,
}

impl TimeCost {
    /// The cost the router minimises: `ttft + itl_weight × slowdown`.
    pub fn cost(&self, itl_weight: f64) -> f64 {
        self.ttft_ms + itl_weight * self.slowdown_ms
    }
}

/// Work already done during one selection. Most candidates of a large fleet look alike to the
/// cost (idle, holding none of the prompt or the same shared prefix, one profile), so the last
/// candidate's prediction is reused when the next one is the same, and prefill times are read
/// from the curve once per distinct `(new, cached)` pair, not once per worker.
#[derive(Debug, Default)]
pub(crate) struct PrefillMemo {
    /// `(model address, new tokens, cached tokens, ms)`, most recent last.
    entries: Vec<(usize, u64, u64, f64)>,
    /// The last candidate predicted, with its model's address, and the prediction.
    last: Option<(usize, Candidate, TimeCost)>,
}

impl PrefillMemo {
    const CAPACITY: usize = 8;

    fn prefill_ms(&mut self, model: &TimeModel, new: u64, cached: u64) -> f64 {
        let address = std::ptr::from_ref(model) as usize;
        if let Some(&(_, _, _, ms)) = self
            .entries
            .iter()
            .rev()
            .find(|e| e.0 == address && e.1 == new && e.2 == cached)
        {
            return ms;
        }
        let ms = model.prefill_ms(new, cached);
        if self.entries.len() == Self::CAPACITY {
            self.entries.remove(0);
        }
        self.entries.push((address, new, cached, ms));
        ms
    }
}

/// Predicts `shape` on `candidate` with `model`, reusing the prediction for the previous
/// candidate when this one is the same (`shape` is the same for a whole selection).
pub(crate) fn predict(
    model: &TimeModel,
    shape: &Shape,
    candidate: &Candidate,
    memo: &mut PrefillMemo,
) -> TimeCost {
    let address = std::ptr::from_ref(model) as usize;
    if let Some((a, c, cost)) = &memo.last
        && *a == address
        && c == candidate
    {
        return *cost;
    }
    let cost = compute(model, shape, candidate, memo);
    memo.last = Some((address, *candidate, cost));
    cost
}

/// The prediction itself (see the module docs).
fn compute(
    model: &TimeModel,
    shape: &Shape,
    candidate: &Candidate,
    memo: &mut PrefillMemo,
) -> TimeCost {
    let bs = u64::from(shape.block_size.max(1));
    let (onboard_ms, recompute) = model.onboard_ms(candidate.lower_tier_blocks);
    let cached = (u64::from(candidate.overlap_blocks.saturating_sub(recompute)) * bs)
        .min(shape.prompt_tokens.saturating_sub(1));
    // An engine computes at least the last prompt token to sample from it.
    let new = shape.prompt_tokens.saturating_sub(cached).max(1);
    // A step in progress is waited for whole; the rest of the queue batches with this prompt.
    let busy = candidate.busy_tokens.min(candidate.queued_tokens);
    let queued = candidate.queued_tokens - busy;
    let busy_ms = if busy > 0 {
        candidate.busy_ms.max(0.0)
    } else {
        0.0
    };
    let waiting_ms = model.queue_ms(queued);
    let prefill_ms = memo.prefill_ms(model, new, cached);

    let running = candidate.running;
    let context = if running == 0 {
        0
    } else {
        candidate.decode_blocks * bs / u64::from(running)
    };
    let itl = model.itl_ms(running, context);
    let mut decode_ms = model.steps(queued + new) as f64 * itl;
    if queued == 0 && busy == 0 {
        decode_ms += 0.5 * itl;
    }

    // Memory: the prompt's blocks (and those of the prompts queued ahead) must fit beside the
    // running requests'; otherwise it waits for enough of them to finish.
    let mut memory_ms = 0.0;
    if candidate.kv_blocks > 0 {
        let needed = u64::from(shape.request_blocks) + queued.div_ceil(bs);
        let free = candidate.kv_blocks.saturating_sub(candidate.decode_blocks);
        if needed > free && candidate.decode_blocks > 0 {
            // Not capped at one: prompts queued ahead that need more than the running
            // requests hold are admitted in waves, one mean decode time each.
            let share = (needed - free) as f64 / candidate.decode_blocks as f64;
            let decode_time = candidate.decode_time_ms.unwrap_or_else(|| {
                itl.max(model.itl_ms(1, context)) * f64::from(shape.output_tokens)
            });
            memory_ms = share * decode_time;
        }
    }

    let correction = candidate.correction;
    // The step in progress was predicted with the correction already.
    let ttft_ms =
        correction * (waiting_ms + prefill_ms + decode_ms) + busy_ms + onboard_ms + memory_ms;

    let slowdown_ms = if running == 0 || shape.itl_weight == 0.0 {
        0.0
    } else {
        let joined_context =
            (candidate.decode_blocks * bs + shape.prompt_tokens) / (u64::from(running) + 1);
        let extra_itl = (model.itl_ms(running + 1, joined_context) - itl).max(0.0);
        f64::from(running) * correction * (prefill_ms + extra_itl * f64::from(shape.output_tokens))
    };
    TimeCost {
        queue_ms: busy_ms + waiting_ms,
        prefill_ms,
        decode_ms,
        onboard_ms,
        memory_ms,
        correction,
        ttft_ms,
        slowdown_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> TimeModel {
        let profile = PerfProfile {
            format: PROFILE_FORMAT,
            model: "m".into(),
            device: "d".into(),
            engine: "mock".into(),
            kernel_path: None,
            source: String::new(),
            block_size: 16,
            kv_block_bytes: 1 << 20,
            kv_blocks: 1000,
            max_num_seqs: 64,
            max_batched_tokens: 1024,
            prefill: PrefillTable {
                tokens: vec![512, 1024, 2048],
                ms: vec![35.0, 60.0, 120.0],
            },
            decode: DecodeTable {
                batch: vec![1, 8],
                context: vec![0, 1024],
                itl_ms: vec![vec![5.0, 6.0], vec![8.0, 12.0]],
            },
            tiers: vec![kvfleet_proto::profile::TierCost {
                tier: Tier::G2,
                bytes_per_second: 1e9,
                latency_ms: 1.0,
            }],
        };
        TimeModel::new(Arc::new(profile)).unwrap()
    }

    fn shape(prompt_tokens: u64) -> Shape {
        Shape {
            prompt_tokens,
            request_blocks: prompt_tokens.div_ceil(16) as u32,
            output_tokens: 100,
            block_size: 16,
            itl_weight: 1.0,
        }
    }

    fn run(model: &TimeModel, shape: &Shape, candidate: &Candidate) -> TimeCost {
        predict(model, shape, candidate, &mut PrefillMemo::default())
    }

    fn idle() -> Candidate {
        Candidate {
            correction: 1.0,
            ..Candidate::default()
        }
    }

    #[test]
    fn an_idle_worker_costs_the_profiles_prefill() {
        let t = run(&model(), &shape(1024), &idle());
        assert_eq!(
            (t.queue_ms, t.decode_ms, t.memory_ms, t.slowdown_ms),
            (0.0, 0.0, 0.0, 0.0)
        );
        assert!((t.prefill_ms - 60.0).abs() < 1e-9);
        assert!((t.ttft_ms - 60.0).abs() < 1e-9);
    }

    #[test]
    fn a_cached_prefix_leaves_the_overhead_and_the_marginal_cost() {
        let hit = Candidate {
            overlap_blocks: 32, // 512 tokens
            ..idle()
        };
        let t = run(&model(), &shape(1024), &hit);
        // f(0) + f(1024) − f(512) = 10 + 60 − 35.
        assert!((t.prefill_ms - 35.0).abs() < 1e-9, "{t:?}");
        // A prompt held whole still computes its last token.
        let whole = Candidate {
            overlap_blocks: 64,
            ..idle()
        };
        assert!(run(&model(), &shape(1024), &whole).prefill_ms > 10.0);
    }

    #[test]
    fn queue_decoders_and_lower_tiers_add_time() {
        let m = model();
        let busy = Candidate {
            queued_tokens: 1024,
            decode_blocks: 4 * 64,
            running: 4,
            ..idle()
        };
        let t = run(&m, &shape(1024), &busy);
        assert!((t.queue_ms - 50.0).abs() < 1e-9, "{t:?}");
        // Two steps of 1024 tokens, each with 4 decoders of 1024 tokens of context.
        assert!(
            (t.decode_ms - 2.0 * m.itl_ms(4, 1024)).abs() < 1e-9,
            "{t:?}"
        );
        assert!(t.slowdown_ms > 4.0 * t.prefill_ms, "{t:?}");
        // 32 blocks in G2 cost 1 ms + 32 MiB at 1 GB/s; blocks in G3 (no figure) are recomputed.
        let g2 = Candidate {
            overlap_blocks: 32,
            lower_tier_blocks: [32, 0, 0],
            ..idle()
        };
        let t = run(&m, &shape(1024), &g2);
        assert!(
            (t.onboard_ms - (1.0 + 32.0 * 1048.576 / 1000.0)).abs() < 1e-6,
            "{t:?}"
        );
        let g3 = Candidate {
            overlap_blocks: 32,
            lower_tier_blocks: [0, 32, 0],
            ..idle()
        };
        let t3 = run(&m, &shape(1024), &g3);
        assert_eq!(t3.onboard_ms, 0.0);
        assert!((t3.prefill_ms - 60.0).abs() < 1e-9, "{t3:?}");
    }

    #[test]
    fn a_step_in_progress_is_waited_for_whole_and_the_rest_batches() {
        let m = model();
        let running = Candidate {
            queued_tokens: 1536,
            busy_tokens: 512,
            busy_ms: 30.0,
            correction: 2.0,
            ..idle()
        };
        let t = run(&m, &shape(1024), &running);
        // 30 ms left of the 512-token step (already corrected), then 1,024 waiting tokens at
        // their marginal time: f(1024) − f(0) = 50, corrected.
        assert!((t.queue_ms - 80.0).abs() < 1e-9, "{t:?}");
        assert!(
            (t.ttft_ms - (30.0 + 2.0 * (50.0 + t.prefill_ms))).abs() < 1e-9,
            "{t:?}"
        );
        // A step that is over (its tokens no longer queued) adds nothing.
        let over = Candidate {
            queued_tokens: 0,
            ..running
        };
        assert_eq!(run(&m, &shape(1024), &over).queue_ms, 0.0);
    }

    #[test]
    fn a_full_worker_waits_for_decodes_to_end() {
        let full = Candidate {
            decode_blocks: 900,
            running: 9,
            kv_blocks: 1000,
            decode_time_ms: Some(2000.0),
            ..idle()
        };
        // 128 blocks needed, 100 free: 28 of the 900 blocks must go first.
        let t = run(&model(), &shape(2048), &full);
        assert!((t.memory_ms - 28.0 / 900.0 * 2000.0).abs() < 1e-6, "{t:?}");
        // With 28,800 tokens (1,800 blocks) of prompts queued ahead, 1,828 of the 900 running
        // blocks must go: about two turnovers of the running set.
        let queued = Candidate {
            queued_tokens: 1800 * 16,
            ..full
        };
        let t = run(&model(), &shape(2048), &queued);
        assert!(
            (t.memory_ms - 1828.0 / 900.0 * 2000.0).abs() < 1e-6,
            "{t:?}"
        );
    }

    #[test]
    fn the_correction_scales_compute_not_transfers() {
        let slow = Candidate {
            correction: 2.0,
            overlap_blocks: 32,
            lower_tier_blocks: [32, 0, 0],
            ..idle()
        };
        let fast = Candidate {
            correction: 1.0,
            ..slow
        };
        let (a, b) = (
            run(&model(), &shape(1024), &slow),
            run(&model(), &shape(1024), &fast),
        );
        assert!((a.ttft_ms - b.ttft_ms - b.prefill_ms).abs() < 1e-9);
        assert_eq!(a.onboard_ms, b.onboard_ms);
    }

    #[test]
    fn the_memo_reuses_only_an_identical_candidates_prediction() {
        let m = model();
        let other = TimeModel::nominal(16);
        let mut memo = PrefillMemo::default();
        let busy = Candidate {
            queued_tokens: 1024,
            ..idle()
        };
        for (model, candidate) in [
            (&m, idle()),
            (&m, idle()),
            (&m, busy),
            (&other, busy),
            (&m, idle()),
        ] {
            let fresh = compute(model, &shape(1024), &candidate, &mut PrefillMemo::default());
            assert_eq!(predict(model, &shape(1024), &candidate, &mut memo), fresh);
        }
    }

    #[test]
    fn the_nominal_model_is_usable() {
        let m = TimeModel::nominal(16);
        assert!((m.prefill_ms(8192, 0) - (15.0 + 8192.0 * 0.02)).abs() < 1e-9);
        assert_eq!(m.itl_ms(32, 4096), 10.0);
    }
}
