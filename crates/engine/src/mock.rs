//! The mock engine: the real scheduler and KV accounting with a timing model instead of math.
//!
//! [`MockExecutor`] answers each step with deterministic pseudo-tokens and a duration computed
//! from a [`MockProfile`] (prefill time as a function of batched prefill tokens, decode-step time
//! as a function of KV use and batch size). Hundreds of mock engines fit on one machine, in real
//! time or in virtual time.
//!
//! # Pseudo-tokens
//!
//! The token at absolute position `i` of a request whose prompt is `prompt` is
//!
//! ```text
//! digest   = XXH3-64(seed = HASH_SEED, prompt as little-endian u32s)   // = local_block_hash(prompt)
//! token(i) = XXH3-64(seed = HASH_SEED, digest as LE u64 ‖ i as LE u64) mod vocab_size
//!                                            // = chain(Some(SequenceHash(digest)), LocalBlockHash(i))
//! ```
//!
//! so the `k`-th generated token (from 0) is `token(prompt.len() + k)`. It depends only on the
//! prompt and the position: prefix-cache hits, preemption, batching and disaggregation cannot
//! change it, and any test can predict a mock's output with [`expected_output`]. Sampling
//! parameters other than `max_tokens`, stop tokens and `logprobs` are ignored.

use std::path::Path;
use std::time::Duration;

use kvfleet_proto::hash::{chain, local_block_hash};
use kvfleet_proto::profile::{DecodeTable, PROFILE_FORMAT, PerfProfile, PrefillTable, TierCost};
use kvfleet_proto::{KvLayout, LocalBlockHash, SequenceHash, Tier};
use serde::{Deserialize, Serialize};

use crate::block_pool::BlockId;
use crate::config::PoolSizing;
use crate::executor::{ExecError, Executor, RequestId, ScheduledBatch, StepOutput, StepResult};
use crate::fast_hash::FastMap;
use crate::scheduler::Scheduler;

/// The scheduler core driven by the mock executor.
pub type MockEngine = Scheduler<MockExecutor>;

/// The digest of a prompt that the pseudo-tokens are derived from.
pub fn prompt_digest(prompt: &[u32]) -> u64 {
    local_block_hash(prompt).0
}

/// The mock's token at absolute `position` of a sequence whose prompt has `digest`.
pub fn pseudo_token(digest: u64, position: usize, vocab_size: u32) -> u32 {
    let mixed = chain(Some(SequenceHash(digest)), LocalBlockHash(position as u64)).0;
    (mixed % u64::from(vocab_size.max(1))) as u32
}

/// The first `n` tokens a mock engine generates for `prompt` (ignoring stop tokens).
pub fn expected_output(prompt: &[u32], n: usize, vocab_size: u32) -> Vec<u32> {
    let digest = prompt_digest(prompt);
    (0..n)
        .map(|k| pseudo_token(digest, prompt.len() + k, vocab_size))
        .collect()
}

/// `ms = c2·x² + c1·x + c0`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quadratic {
    /// Constant term, ms.
    pub c0: f64,
    /// Linear coefficient.
    pub c1: f64,
    /// Quadratic coefficient.
    pub c2: f64,
}

impl Quadratic {
    /// The value at `x`.
    pub fn eval(&self, x: f64) -> f64 {
        (self.c2 * x + self.c1) * x + self.c0
    }

    /// Least-squares fit of `(x, ms)` points; needs at least three distinct `x`. The example
    /// is the one in `docs/mock-profile.md` (measurements from the default profile's curves):
    ///
    /// ```
    /// use kvfleet_engine::{DecodeModel, Quadratic};
    /// let prefill =
    ///     Quadratic::fit(&[(128.0, 18.5), (512.0, 24.4), (2048.0, 49.4), (8192.0, 169.3)])?;
    /// assert!((prefill.c1 - 1.52e-2).abs() < 1e-3 && (prefill.c0 - 16.5).abs() < 0.5);
    /// let decode = DecodeModel::fit(
    ///     &[(0.05, 8, 8.3), (0.3, 64, 19.6), (0.6, 128, 28.8), (0.9, 256, 33.5)],
    ///     false,
    /// )?;
    /// assert!((decode.eval(0.5, 1) - 26.3).abs() < 0.5);
    /// # Ok::<(), kvfleet_engine::FitError>(())
    /// ```
    pub fn fit(points: &[(f64, f64)]) -> Result<Self, FitError> {
        // Scale x into [0, 1] so the normal equations stay well conditioned (t² reaches 1e8).
        let scale = points.iter().map(|p| p.0.abs()).fold(0.0, f64::max);
        if scale == 0.0 || !scale.is_finite() {
            return Err(FitError::Degenerate);
        }
        let rows: Vec<([f64; 3], f64)> = points
            .iter()
            .map(|&(x, y)| {
                let u = x / scale;
                ([1.0, u, u * u], y)
            })
            .collect();
        let [a, b, c] = least_squares(&rows)?;
        Ok(Self {
            c0: a,
            c1: b / scale,
            c2: c / (scale * scale),
        })
    }
}

/// Decode-step time: `ms = c2·p² + c1·p + c0 + per_seq·b`, with `p` the fraction of KV blocks in
/// use and `b` the sequences decoding in the step.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecodeModel {
    /// Constant term, ms.
    pub c0: f64,
    /// Coefficient of `p`.
    pub c1: f64,
    /// Coefficient of `p²`.
    pub c2: f64,
    /// Coefficient of the batch size (0 in the default profile: on an H100 an 8B model's decode
    /// step is bound by reading weights and KV, which `p` already measures).
    #[serde(default)]
    pub per_seq: f64,
}

impl DecodeModel {
    /// The step time for KV fraction `p` and `batch` decoding sequences.
    pub fn eval(&self, p: f64, batch: usize) -> f64 {
        (self.c2 * p + self.c1) * p + self.c0 + self.per_seq * batch as f64
    }

    /// Least-squares fit of `(p, batch, ms)` samples. With `batch_term` false, `per_seq` is 0
    /// (use it when every sample has the same batch size, or batch does not matter).
    pub fn fit(samples: &[(f64, usize, f64)], batch_term: bool) -> Result<Self, FitError> {
        if batch_term {
            let rows: Vec<([f64; 4], f64)> = samples
                .iter()
                .map(|&(p, b, y)| ([1.0, p, p * p, b as f64], y))
                .collect();
            let [c0, c1, c2, per_seq] = least_squares(&rows)?;
            Ok(Self {
                c0,
                c1,
                c2,
                per_seq,
            })
        } else {
            let points: Vec<(f64, f64)> = samples.iter().map(|&(p, _, y)| (p, y)).collect();
            let q = Quadratic::fit(&points)?;
            Ok(Self {
                c0: q.c0,
                c1: q.c1,
                c2: q.c2,
                per_seq: 0.0,
            })
        }
    }
}

/// The fit has too few or collinear points.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FitError {
    /// Not enough distinct points to determine every coefficient.
    #[error("too few distinct points to fit the model")]
    Degenerate,
}

/// Solves the least-squares problem `min Σ (row·x − y)²` via the normal equations.
fn least_squares<const N: usize>(rows: &[([f64; N], f64)]) -> Result<[f64; N], FitError> {
    let mut a = [[0.0f64; N]; N];
    let mut b = [0.0f64; N];
    for (row, y) in rows {
        for i in 0..N {
            b[i] += row[i] * y;
            for j in 0..N {
                a[i][j] += row[i] * row[j];
            }
        }
    }
    // Gaussian elimination with partial pivoting.
    for col in 0..N {
        let pivot = (col..N)
            .max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))
            .ok_or(FitError::Degenerate)?;
        if a[pivot][col].abs() < 1e-12 {
            return Err(FitError::Degenerate);
        }
        a.swap(col, pivot);
        b.swap(col, pivot);
        let (pivot_row, pivot_b) = (a[col], b[col]);
        for r in col + 1..N {
            let f = a[r][col] / pivot_row[col];
            for (x, p) in a[r].iter_mut().zip(pivot_row.iter()).skip(col) {
                *x -= f * p;
            }
            b[r] -= f * pivot_b;
        }
    }
    let mut x = [0.0f64; N];
    for r in (0..N).rev() {
        let mut s = b[r];
        for c in r + 1..N {
            s -= a[r][c] * x[c];
        }
        x[r] = s / a[r][r];
    }
    if x.iter().all(|v| v.is_finite()) {
        Ok(x)
    } else {
        Err(FitError::Degenerate)
    }
}

/// A model-on-hardware timing profile for the mock engine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MockProfile {
    /// A name for logs and reports.
    pub name: String,
    /// Pseudo-tokens are drawn from `0..vocab_size`.
    pub vocab_size: u32,
    /// KV memory for the pool, in bytes (what the real engine would have after weights).
    pub kv_cache_bytes: u64,
    /// The KV block layout the mock reports (and checks imports against).
    pub layout: KvLayout,
    /// Prefill time in ms as a function of the prefill tokens batched in one step.
    pub prefill: Quadratic,
    /// Decode-step time in ms.
    pub decode: DecodeModel,
    /// Onboarding from the lower KV tiers into the pool (`kvfleet_proto::profile`'s table,
    /// copied into [`MockProfile::perf_profile`]); a step that onboards blocks takes that much
    /// longer. Empty: onboarding is free.
    #[serde(default)]
    pub tiers: Vec<TierCost>,
}

/// The default profile's file, shipped with the crate.
pub const DEFAULT_PROFILE_TOML: &str = include_str!("../profiles/llama-3.1-8b-h100.toml");

/// The performance profile of the default mock (an 8B model on one H100, with the scheduler's
/// default `max_num_seqs` and `max_batched_tokens`), as [`MockProfile::perf_profile`] computes
/// it; shipped so the simulator, the planner and mock fleets have one out of the box.
pub const DEFAULT_PERF_PROFILE_TOML: &str = include_str!("../profiles/llama-3.1-8b-h100.perf.toml");

/// A profile file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    /// Reading the file failed.
    #[error("reading mock profile {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The TOML did not parse into a profile.
    #[error("mock profile TOML: {0}")]
    Toml(#[from] toml::de::Error),
    /// The JSON did not parse into a profile.
    #[error("mock profile JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// A value is out of range.
    #[error("mock profile: {0}")]
    Invalid(String),
}

impl MockProfile {
    /// An 8B-class model (Llama 3.1 8B, bf16) on one H100 80GB: see `profiles/` and
    /// `docs/mock-profile.md` for where each figure comes from.
    pub fn default_8b_h100() -> Self {
        // The shipped file is checked by a test; this cannot fail short of a broken build.
        match Self::from_toml_str(DEFAULT_PROFILE_TOML) {
            Ok(p) => p,
            Err(e) => unreachable!("the shipped profile is invalid: {e}"),
        }
    }

    /// Parses and validates a TOML profile.
    pub fn from_toml_str(text: &str) -> Result<Self, ProfileError> {
        let profile: Self = toml::from_str(text)?;
        profile.validate()?;
        Ok(profile)
    }

    /// Parses and validates a JSON profile.
    pub fn from_json_str(text: &str) -> Result<Self, ProfileError> {
        let profile: Self = serde_json::from_str(text)?;
        profile.validate()?;
        Ok(profile)
    }

    /// Reads a profile file: JSON when the name ends in `.json`, TOML otherwise.
    pub fn from_file(path: &Path) -> Result<Self, ProfileError> {
        let text = std::fs::read_to_string(path).map_err(|source| ProfileError::Io {
            path: path.display().to_string(),
            source,
        })?;
        if path.extension().is_some_and(|e| e == "json") {
            Self::from_json_str(&text)
        } else {
            Self::from_toml_str(&text)
        }
    }

    /// Checks the ranges a profile needs to produce sane timings.
    pub fn validate(&self) -> Result<(), ProfileError> {
        if self.vocab_size == 0 {
            return Err(ProfileError::Invalid(
                "vocab_size must be at least 1".into(),
            ));
        }
        if self.layout.block_bytes() == 0 {
            return Err(ProfileError::Invalid(
                "layout has zero bytes per block".into(),
            ));
        }
        let coefficients = [
            ("prefill.c0", self.prefill.c0),
            ("prefill.c1", self.prefill.c1),
            ("prefill.c2", self.prefill.c2),
            ("decode.c0", self.decode.c0),
            ("decode.c1", self.decode.c1),
            ("decode.c2", self.decode.c2),
            ("decode.per_seq", self.decode.per_seq),
        ];
        for (name, value) in coefficients {
            if !value.is_finite() {
                return Err(ProfileError::Invalid(format!(
                    "{name} = {value} is not finite"
                )));
            }
        }
        kvfleet_proto::profile::validate_tiers(&self.tiers)
            .map_err(|e| ProfileError::Invalid(e.to_string()))?;
        // Time must not run backwards anywhere in the domain a scheduler can reach.
        if self.decode.eval(0.0, 1) <= 0.0 || self.decode.eval(1.0, 1) <= 0.0 {
            return Err(ProfileError::Invalid(
                "decode time must be positive for KV use between 0 and 1".into(),
            ));
        }
        if self.prefill.eval(1.0) <= 0.0 {
            return Err(ProfileError::Invalid(
                "prefill time of one token must be positive".into(),
            ));
        }
        Ok(())
    }

    /// The pool sizing this profile implies.
    pub fn pool_sizing(&self) -> PoolSizing {
        PoolSizing::Bytes(self.kv_cache_bytes)
    }

    /// Prefill time in ms for `tokens` batched prefill tokens (0 for none).
    pub fn prefill_ms(&self, tokens: usize) -> f64 {
        if tokens == 0 {
            0.0
        } else {
            self.prefill.eval(tokens as f64).max(0.0)
        }
    }

    /// Decode time in ms for `batch` decoding sequences at KV fraction `p` (0 for none).
    pub fn decode_ms(&self, p: f64, batch: usize) -> f64 {
        if batch == 0 {
            0.0
        } else {
            self.decode.eval(p.clamp(0.0, 1.0), batch).max(0.0)
        }
    }

    /// A step's time: prefill of its prefill tokens plus one decode step for its decoding
    /// sequences (a mixed batch pays both, as a chunked-prefill engine does).
    pub fn step_time(
        &self,
        prefill_tokens: usize,
        decode_seqs: usize,
        kv_fraction: f64,
    ) -> Duration {
        let ms = self.prefill_ms(prefill_tokens) + self.decode_ms(kv_fraction, decode_seqs);
        // A profile with huge coefficients saturates instead of panicking.
        Duration::try_from_secs_f64(ms.max(0.0) / 1000.0).unwrap_or(Duration::MAX)
    }
}

/// The prompt lengths and decode grid at which [`MockProfile::perf_profile`] samples the
/// timing model (and `kvfleet profile` sweeps a real worker by default).
pub const PROFILE_PREFILL_TOKENS: [u32; 10] =
    [64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768];
/// Decode batch sizes sampled into a performance profile.
pub const PROFILE_DECODE_BATCH: [u32; 9] = [1, 2, 4, 8, 16, 32, 64, 128, 256];
/// Decode context lengths (tokens per sequence) sampled into a performance profile.
pub const PROFILE_DECODE_CONTEXT: [u32; 7] = [128, 512, 1024, 2048, 4096, 8192, 16384];

impl MockProfile {
    /// The performance profile this timing model implies for an engine with `config`'s
    /// `max_num_seqs` and `max_batched_tokens`, computed from the formulas (exact for the mock):
    /// a prompt longer than a step is prefilled in chunks of `max_batched_tokens`, and a decode
    /// step's KV fraction counts each sequence's blocks of context plus its next token. The
    /// planner, the router's cost and the simulator read it like a measured one.
    pub fn perf_profile(&self, config: &crate::SchedulerConfig) -> PerfProfile {
        let block_size = u64::from(self.layout.block_size.get());
        let block_bytes = self.layout.block_bytes() as u64;
        let total_blocks = (self.kv_cache_bytes / block_bytes.max(1)).max(1);
        let step = config.max_batched_tokens.max(1) as u64;
        let prefill_ms = |tokens: u64| -> f64 {
            let full = tokens / step;
            let rest = tokens % step;
            full as f64 * self.prefill_ms(step as usize) + self.prefill_ms(rest as usize)
        };
        let itl = |batch: u32, context: u32| -> f64 {
            let blocks = u64::from(batch) * (u64::from(context) + 1).div_ceil(block_size);
            let p = blocks as f64 / total_blocks as f64;
            self.decode_ms(p, batch as usize)
        };
        let max_seqs = u32::try_from(config.max_num_seqs).unwrap_or(u32::MAX);
        let batch: Vec<u32> = PROFILE_DECODE_BATCH
            .into_iter()
            .filter(|&b| b <= max_seqs)
            .collect();
        // A decode step past a full pool cannot happen (the scheduler preempts); the model's
        // curve may bend down there, so the table holds the last value instead.
        // Rounded to 0.1 µs so the file reads well; far below any timing that matters.
        let monotone = |row: Vec<f64>| -> Vec<f64> {
            row.into_iter()
                .scan(0.0f64, |high, v| {
                    *high = high.max((v * 1e4).round() / 1e4);
                    Some(*high)
                })
                .collect()
        };
        let mut itl_ms: Vec<Vec<f64>> = batch
            .iter()
            .map(|&b| monotone(PROFILE_DECODE_CONTEXT.iter().map(|&c| itl(b, c)).collect()))
            .collect();
        for i in 1..itl_ms.len() {
            let (done, rest) = itl_ms.split_at_mut(i);
            for (cell, below) in rest[0].iter_mut().zip(&done[i - 1]) {
                *cell = cell.max(*below);
            }
        }
        PerfProfile {
            format: PROFILE_FORMAT,
            model: self.layout.model.clone(),
            device: self.name.clone(),
            engine: "mock".into(),
            kernel_path: None,
            source: format!(
                "computed from mock profile `{}` (max_num_seqs {}, max_batched_tokens {})",
                self.name, config.max_num_seqs, config.max_batched_tokens
            ),
            block_size: u32::try_from(block_size).unwrap_or(u32::MAX),
            kv_block_bytes: block_bytes,
            kv_blocks: total_blocks,
            max_num_seqs: max_seqs,
            max_batched_tokens: u32::try_from(config.max_batched_tokens).unwrap_or(u32::MAX),
            prefill: PrefillTable {
                tokens: PROFILE_PREFILL_TOKENS.to_vec(),
                ms: monotone(
                    PROFILE_PREFILL_TOKENS
                        .iter()
                        .map(|&t| prefill_ms(u64::from(t)))
                        .collect(),
                ),
            },
            decode: DecodeTable {
                batch,
                context: PROFILE_DECODE_CONTEXT.to_vec(),
                itl_ms,
            },
            tiers: self.tiers.clone(),
        }
    }

    /// Time to bring `blocks` blocks from G2, G3 and G4 (in that order) into the pool, from
    /// the `tiers` table; a tier without a figure costs nothing.
    pub fn onboard_time(&self, blocks: [u32; 3]) -> Duration {
        let block_bytes = self.layout.block_bytes() as u64;
        let ms: f64 = [Tier::G2, Tier::G3, Tier::G4]
            .into_iter()
            .zip(blocks)
            .filter(|&(_, n)| n > 0)
            .filter_map(|(tier, n)| {
                let cost = self.tiers.iter().find(|t| t.tier == tier)?;
                Some(cost.onboard_ms(u64::from(n) * block_bytes))
            })
            .sum();
        Duration::from_secs_f64(ms / 1000.0)
    }
}

/// The mock's executor: pseudo-tokens and modelled step times. Holds no KV data; exported
/// blocks are zero bytes of the profile's layout.
#[derive(Debug, Clone)]
pub struct MockExecutor {
    profile: MockProfile,
    digests: FastMap<RequestId, u64>,
}

impl MockExecutor {
    /// A mock executor with this profile.
    pub fn new(profile: MockProfile) -> Self {
        Self {
            profile,
            digests: FastMap::default(),
        }
    }

    /// The profile in use.
    pub fn profile(&self) -> &MockProfile {
        &self.profile
    }
}

impl Executor for MockExecutor {
    fn kv_layout(&self) -> KvLayout {
        self.profile.layout.clone()
    }

    fn execute(&mut self, batch: &ScheduledBatch<'_>) -> Result<StepResult, ExecError> {
        let vocab = self.profile.vocab_size;
        let mut outputs = Vec::with_capacity(batch.seqs.len());
        for seq in batch.seqs.iter().filter(|s| s.sample) {
            let digest = *self
                .digests
                .entry(seq.request)
                // Keyed on the original prompt: a resumed request continues what it began.
                .or_insert_with(|| prompt_digest(seq.sampling.original_prompt(seq.prompt)));
            let position = seq.start_pos + seq.tokens.len();
            outputs.push(StepOutput {
                request: seq.request,
                token: pseudo_token(digest, position, vocab),
                logprob: seq.sampling.logprobs.map(|_| 0.0),
                top_logprobs: Vec::new(),
            });
        }
        let kv_fraction = if batch.kv_blocks_total == 0 {
            0.0
        } else {
            f64::from(batch.kv_blocks_used) / f64::from(batch.kv_blocks_total)
        };
        Ok(StepResult {
            outputs,
            // Onboarding is charged on the step it feeds (no overlap with compute modelled).
            elapsed: self.profile.step_time(
                batch.num_prefill_tokens,
                batch.num_decode_seqs,
                kv_fraction,
            ) + self.profile.onboard_time(batch.onboarded_blocks),
        })
    }

    fn copy_blocks_out(&self, blocks: &[BlockId]) -> Result<Vec<u8>, ExecError> {
        Ok(vec![0; blocks.len() * self.profile.layout.block_bytes()])
    }

    fn copy_blocks_in(&mut self, blocks: &[BlockId], data: &[u8]) -> Result<(), ExecError> {
        let expected = blocks.len() * self.profile.layout.block_bytes();
        if data.len() == expected {
            Ok(())
        } else {
            Err(ExecError::BadTransfer(format!(
                "{} bytes for {} blocks; expected {expected}",
                data.len(),
                blocks.len()
            )))
        }
    }

    fn release(&mut self, request: RequestId) {
        self.digests.remove(&request);
    }
}
