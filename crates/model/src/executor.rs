//! The native executor: the real model behind the engine's scheduler core.
//!
//! [`NativeExecutor`] implements [`kvfleet_engine::Executor`]: it owns a [`LoadedModel`] (shared
//! through an `Arc`, so several engines can serve one copy of the weights) and a
//! [`PagedKvCache`] with exactly as many blocks as the engine's block pool, runs each
//! [`ScheduledBatch`] through [`Model::forward`](crate::Model::forward) with the batch's block
//! tables, samples with a [`Sampler`] per sequence and measures the step. It is the driver-side
//! boundary of the engine: reading the clock here is what lets the scheduler core stay pure.
//!
//! It does not schedule, allocate blocks or hash prompts: that is the scheduler's business. It
//! reports the vocabulary (`Executor::vocab_size`), so the scheduler refuses a prompt with an
//! unknown token id at submit; the ids of each batch are still checked here, before anything
//! runs, as a second line of defence.
//!
//! [`native_engine`] loads a model (GGUF file or Hugging Face directory) and builds a
//! [`NativeEngine`]; [`KvBudget`] turns "so many bytes" or "this share of available memory" into
//! the pool's [`PoolSizing`].

use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Instant;

use kvfleet_engine::{
    ConfigError, ExecError, Executor, PoolSizing, RequestId, ScheduledBatch, ScheduledSeq,
    Scheduler, SchedulerConfig, StepOutput, StepResult,
};
use kvfleet_proto::{BlockSize, KvLayout, SamplingParams};
use rayon::prelude::*;

use crate::LoadedModel;
use crate::adjust::History;
use crate::error::ModelError;
use crate::grammar::{Constrained, GrammarEngine, GrammarError, TokenMask};
use crate::kv_cache::PagedKvCache;
use crate::model::SeqInput;
use crate::sampler::Sampler;

/// The scheduler core over the real model.
pub type NativeEngine = Scheduler<NativeExecutor>;

/// Why a native engine could not be built.
#[derive(Debug, thiserror::Error)]
pub enum NativeError {
    /// Loading the model failed (missing, corrupt or unsupported file).
    #[error("loading model: {0}")]
    Load(#[source] ModelError),
    /// The scheduler configuration or the KV pool sizing is unusable.
    #[error("engine configuration: {0}")]
    Config(#[from] ConfigError),
    /// The KV cache could not be allocated.
    #[error("allocating the KV cache: {0}")]
    Cache(#[source] ModelError),
    /// Available host memory could not be read (for a fraction-of-available budget).
    #[error("reading available memory from /proc/meminfo: {0}")]
    Memory(String),
    /// A KV memory budget string did not parse.
    #[error(
        "KV memory budget `{0}`: expected bytes with an optional unit (e.g. `512MiB`, `2GB`), a percentage of available memory (`25%`) or a block count (`4096blocks`)"
    )]
    BadBudget(String),
}

/// How much memory the KV cache gets, as an operator says it. Resolved into the engine's
/// [`PoolSizing`] by [`KvBudget::sizing`], after the weights are loaded (so "available" means
/// what is left for the cache).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum KvBudget {
    /// Exactly this many blocks.
    Blocks(u32),
    /// As many blocks as fit in this many bytes.
    Bytes(u64),
    /// This fraction, in (0, 1], of the host's available memory (`MemAvailable`): the CPU
    /// counterpart of a GPU's free memory.
    FractionOfAvailable(f64),
}

impl KvBudget {
    /// The pool sizing this budget means now (reads `/proc/meminfo` for a fraction).
    pub fn sizing(self) -> Result<PoolSizing, NativeError> {
        Ok(match self {
            KvBudget::Blocks(n) => PoolSizing::Blocks(n),
            KvBudget::Bytes(b) => PoolSizing::Bytes(b),
            KvBudget::FractionOfAvailable(fraction) => PoolSizing::FractionOfFree {
                fraction,
                free_bytes: host_available_memory()?,
            },
        })
    }
}

impl FromStr for KvBudget {
    type Err = NativeError;

    /// `4096blocks`, `25%`, `1073741824`, `512MiB`, `1.5GiB`, `2GB`, `100k` (units are
    /// case-insensitive; `K/M/G/T` alone mean binary units, as memory sizes usually do).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || NativeError::BadBudget(s.to_string());
        let t = s.trim();
        if let Some(n) = t.strip_suffix("blocks").or_else(|| t.strip_suffix("block")) {
            let n: u32 = n.trim().parse().map_err(|_| bad())?;
            return Ok(KvBudget::Blocks(n));
        }
        if let Some(p) = t.strip_suffix('%') {
            let p: f64 = p.trim().parse().map_err(|_| bad())?;
            if !(p > 0.0 && p <= 100.0) {
                return Err(bad());
            }
            return Ok(KvBudget::FractionOfAvailable(p / 100.0));
        }
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let num: f64 = num.parse().map_err(|_| bad())?;
        let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1.0,
            "k" | "kib" => 1024.0,
            "kb" => 1e3,
            "m" | "mib" => 1024.0 * 1024.0,
            "mb" => 1e6,
            "g" | "gib" => 1024.0 * 1024.0 * 1024.0,
            "gb" => 1e9,
            "t" | "tib" => 1024f64.powi(4),
            "tb" => 1e12,
            _ => return Err(bad()),
        };
        let bytes = num * mult;
        if !(bytes.is_finite() && bytes >= 1.0 && bytes < u64::MAX as f64) {
            return Err(bad());
        }
        Ok(KvBudget::Bytes(bytes as u64))
    }
}

/// The host's available memory in bytes (`MemAvailable` in `/proc/meminfo`).
pub fn host_available_memory() -> Result<u64, NativeError> {
    let text =
        std::fs::read_to_string("/proc/meminfo").map_err(|e| NativeError::Memory(e.to_string()))?;
    parse_mem_available(&text)
        .ok_or_else(|| NativeError::Memory("no MemAvailable line in kB".into()))
}

fn parse_mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let mut parts = line.split_whitespace().skip(1);
    let kb: u64 = parts.next()?.parse().ok()?;
    (parts.next() == Some("kB")).then_some(kb.saturating_mul(1024))
}

/// A request's sampling as the executor keeps it between steps.
#[derive(Debug)]
struct RequestSampling {
    /// The request's parameters with `seed` cleared (the per-position seed replaces it).
    params: SamplingParams,
    /// The request's seed, or one derived from its id when it has none.
    seed: u64,
    /// Its grammar's state, once a constrained request sampled (or why it could not be built).
    grammar: Option<Result<Constrained, GrammarError>>,
}

/// SplitMix64's finaliser: a cheap, well-mixed 64-bit hash.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Runs the real model for the scheduler: see the [module docs](self).
pub struct NativeExecutor {
    model: Arc<LoadedModel>,
    cache: PagedKvCache,
    sampling: HashMap<RequestId, RequestSampling>,
    /// The grammar compiler for the model's tokenizer, built by the first constrained request.
    grammar: Option<Result<GrammarEngine, GrammarError>>,
}

impl std::fmt::Debug for NativeExecutor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NativeExecutor")
            .field("model", &self.model.model.name())
            .field("kv_blocks", &self.cache.num_blocks())
            .field("requests", &self.sampling.len())
            .finish()
    }
}

impl NativeExecutor {
    /// The bytes of one block, when `data` is exactly `blocks.len()` of them.
    fn checked_block_bytes(&self, blocks: &[u32], data: &[u8]) -> Result<usize, ExecError> {
        let block_bytes = self.cache.layout().block_bytes();
        if data.len() != blocks.len().saturating_mul(block_bytes) {
            return Err(ExecError::BadTransfer(format!(
                "{} bytes for {} blocks of {block_bytes} bytes",
                data.len(),
                blocks.len()
            )));
        }
        Ok(block_bytes)
    }

    /// An executor for `model` whose KV cache has as many blocks of `block_size` tokens as
    /// `config.kv_memory` allows (the same count the scheduler's pool will compute).
    pub fn new(
        model: impl Into<Arc<LoadedModel>>,
        config: &SchedulerConfig,
        block_size: BlockSize,
    ) -> Result<Self, NativeError> {
        let model = model.into();
        let c = model.model.config();
        let probe = PagedKvCache::new(
            model.model.name(),
            c.num_layers,
            c.num_kv_heads,
            c.head_dim,
            0,
            block_size,
        )
        .map_err(NativeError::Cache)?;
        let blocks = config
            .kv_memory
            .blocks(probe.layout().block_bytes() as u64)?;
        let cache = model
            .model
            .new_cache(blocks as usize, block_size)
            .map_err(NativeError::Cache)?;
        Ok(Self {
            model,
            cache,
            sampling: HashMap::new(),
            grammar: None,
        })
    }

    /// The model, its tokenizer and chat template.
    pub fn model(&self) -> &Arc<LoadedModel> {
        &self.model
    }

    /// The kernels the model runs on: what a worker advertises (`avx512-vnni`, `avx2`,
    /// `portable` or `exact`), so that a request's legs and migrations can stay on workers that
    /// compute the same bits.
    pub fn kernel_path(&self) -> crate::KernelPath {
        self.model.model.kernel_path()
    }

    /// Blocks in the KV cache.
    pub fn num_blocks(&self) -> usize {
        self.cache.num_blocks()
    }

    /// Requests with sampling state held (dropped on `release`).
    pub fn tracked_requests(&self) -> usize {
        self.sampling.len()
    }

    fn check_tokens(&self, batch: &ScheduledBatch<'_>) -> Result<(), ExecError> {
        let vocab = self.model.model.config().vocab_size;
        for s in &batch.seqs {
            if let Some(&id) = s.tokens.iter().find(|&&t| t as usize >= vocab) {
                return Err(ExecError::Failed(format!(
                    "request {}: {}",
                    s.request.0,
                    ModelError::BadToken { id, vocab }
                )));
            }
        }
        Ok(())
    }
}

/// The tokens `seq`'s grammar allows next: the request's matcher (compiled on its first
/// constrained step) caught up with the output so far, then asked for its mask.
fn next_mask(
    engine: &Result<GrammarEngine, GrammarError>,
    seq: &ScheduledSeq<'_>,
    state: &mut RequestSampling,
) -> Result<TokenMask, GrammarError> {
    let Some(constraint) = &state.params.constraint else {
        return Err(GrammarError::Failed("the request has no constraint".into()));
    };
    let grammar = state.grammar.get_or_insert_with(|| match engine {
        Ok(engine) => engine.matcher(constraint),
        Err(e) => Err(e.clone()),
    });
    let history = History::new(seq.prompt, state.params.generated_in_prompt, seq.generated);
    match grammar {
        Ok(grammar) => grammar
            .catch_up(history.all_output())
            .and_then(|()| grammar.allowed()),
        Err(e) => Err(e.clone()),
    }
}

impl Executor for NativeExecutor {
    fn kv_layout(&self) -> KvLayout {
        self.cache.layout()
    }

    fn execute(&mut self, batch: &ScheduledBatch<'_>) -> Result<StepResult, ExecError> {
        let start = Instant::now();
        // Checked before anything runs, so a bad id leaves no half-written KV behind.
        self.check_tokens(batch)?;
        for s in batch.seqs.iter().filter(|s| s.sample) {
            self.sampling.entry(s.request).or_insert_with(|| {
                let seed = s.sampling.seed.unwrap_or_else(|| mix(s.request.0));
                RequestSampling {
                    params: SamplingParams {
                        seed: None,
                        ..s.sampling.clone()
                    },
                    seed,
                    grammar: None,
                }
            });
        }
        let inputs: Vec<SeqInput<'_>> = batch
            .seqs
            .iter()
            .map(|s| SeqInput {
                tokens: s.tokens,
                start_pos: s.start_pos,
                block_table: s.block_table,
                want_logits: s.sample,
            })
            .collect();
        let Self {
            model,
            cache,
            sampling,
            grammar,
        } = self;
        // Structured output: the grammar masks what it does not allow next. A mask depends on
        // the output so far, not on this step's logits, so this step's masks are computed on
        // another thread while the forward pass runs instead of after it, one sequence after
        // another, on the step's critical path. Each grammar first catches up with the output
        // (a new request, a recompute, a decode leg or a migrated request replays the tokens
        // generated before it reached this state).
        let sampled: HashMap<RequestId, &ScheduledSeq<'_>> = batch
            .seqs
            .iter()
            .filter(|s| s.sample)
            .map(|s| (s.request, s))
            .collect();
        let constrained: Vec<(&ScheduledSeq<'_>, &mut RequestSampling)> = sampling
            .iter_mut()
            .filter(|(_, state)| state.params.constraint.is_some())
            .filter_map(|(id, state)| sampled.get(id).map(|&seq| (seq, state)))
            .collect();
        let engine = (!constrained.is_empty())
            .then(|| &*grammar.get_or_insert_with(|| GrammarEngine::new(&model.tokenizer)));
        let (logits, masks) = std::thread::scope(|scope| {
            let masker = engine.map(|engine| {
                scope.spawn(move || {
                    constrained
                        .into_iter()
                        .map(|(seq, state)| (seq.request, next_mask(engine, seq, state)))
                        .collect::<HashMap<_, _>>()
                })
            });
            let logits = model.model.forward(&inputs, cache);
            let masks = match masker.map(|m| m.join()) {
                None => Ok(HashMap::new()),
                Some(Ok(masks)) => Ok(masks),
                Some(Err(_)) => Err(ExecError::Failed(
                    "the grammar thread panicked computing the step's masks".into(),
                )),
            };
            (logits, masks)
        });
        let logits = logits.map_err(|e| ExecError::Failed(e.to_string()))?;
        let mut masks = masks?;
        let mut jobs: Vec<(&ScheduledSeq<'_>, u64, Vec<f32>)> =
            Vec::with_capacity(batch.seqs.len());
        for (s, logits) in batch.seqs.iter().zip(logits) {
            if !s.sample {
                continue;
            }
            let Some(mut logits) = logits else {
                return Err(ExecError::Failed(format!(
                    "request {}: the model returned no logits",
                    s.request.0
                )));
            };
            if let Some(mask) = masks.remove(&s.request)
                && let Err(e) = mask.and_then(|mask| mask.apply(&mut logits))
            {
                // Ends this request (only this one) where it is: the frontend validated the
                // grammar, so this is a grammar that allows nothing more.
                tracing::warn!(request = s.request.0, error = %e,
                    "constrained decoding failed: ending the sequence");
                let eos = model.tokenizer.eos_ids().first().copied().unwrap_or(0);
                logits.iter_mut().for_each(|l| *l = f32::NEG_INFINITY);
                if let Some(l) = logits.get_mut(eos as usize) {
                    *l = 0.0;
                }
            }
            jobs.push((s, (s.start_pos + s.tokens.len()) as u64, logits));
        }
        // A softmax and a top-k over the vocabulary per sequence (262k entries for Gemma 3):
        // worth spreading over the cores at large batches.
        let sampling = &*sampling;
        let outputs = jobs
            .into_par_iter()
            .filter_map(|(seq, pos, logits)| {
                let request = seq.request;
                let state = sampling.get(&request)?;
                let history =
                    History::new(seq.prompt, state.params.generated_in_prompt, seq.generated);
                // The RNG is seeded from the request's seed and the sampled token's absolute
                // position, not drawn from a stream: a recompute after preemption, or a decode
                // worker that received the prompt and first token from a prefill worker, draws
                // exactly what an uninterrupted run would.
                let sampled = Sampler::new(&state.params, mix(state.seed ^ mix(pos)))
                    .sample_after(&logits, &history);
                Some(StepOutput {
                    request,
                    token: sampled.token,
                    logprob: state.params.logprobs.is_some().then_some(sampled.logprob),
                    top_logprobs: sampled.top,
                })
            })
            .collect();
        Ok(StepResult {
            outputs,
            elapsed: start.elapsed(),
        })
    }

    fn copy_blocks_out(&self, blocks: &[u32]) -> Result<Vec<u8>, ExecError> {
        let mut out = Vec::with_capacity(blocks.len() * self.cache.layout().block_bytes());
        for &b in blocks {
            let bytes = self
                .cache
                .read_block(b)
                .map_err(|e| ExecError::BadTransfer(e.to_string()))?;
            out.extend_from_slice(&bytes);
        }
        Ok(out)
    }

    fn tier_order(&self) -> u64 {
        crate::kv_cache::NATIVE_ORDER
    }

    fn copy_tier_blocks_out(&self, blocks: &[u32]) -> Result<Vec<u8>, ExecError> {
        let mut out = Vec::with_capacity(blocks.len() * self.cache.layout().block_bytes());
        for &b in blocks {
            self.cache
                .read_block_native_into(b, &mut out)
                .map_err(|e| ExecError::BadTransfer(e.to_string()))?;
        }
        Ok(out)
    }

    fn copy_tier_blocks_in(&mut self, blocks: &[u32], data: &[u8]) -> Result<(), ExecError> {
        let block_bytes = self.checked_block_bytes(blocks, data)?;
        for (&b, bytes) in blocks.iter().zip(data.chunks_exact(block_bytes.max(1))) {
            self.cache
                .write_block_native(b, bytes)
                .map_err(|e| ExecError::BadTransfer(e.to_string()))?;
        }
        Ok(())
    }

    fn copy_blocks_in(&mut self, blocks: &[u32], data: &[u8]) -> Result<(), ExecError> {
        let block_bytes = self.checked_block_bytes(blocks, data)?;
        // Check every id first so a bad one writes nothing.
        if let Some(&b) = blocks
            .iter()
            .find(|&&b| b as usize >= self.cache.num_blocks())
        {
            return Err(ExecError::BadTransfer(format!(
                "block id {b} is outside the cache's {} blocks",
                self.cache.num_blocks()
            )));
        }
        for (&b, bytes) in blocks.iter().zip(data.chunks_exact(block_bytes.max(1))) {
            self.cache
                .write_block(b, bytes)
                .map_err(|e| ExecError::BadTransfer(e.to_string()))?;
        }
        Ok(())
    }

    fn release(&mut self, request: RequestId) {
        self.sampling.remove(&request);
    }

    fn vocab_size(&self) -> Option<u32> {
        u32::try_from(self.model.model.config().vocab_size).ok()
    }
}

/// `config` adjusted to the model: `max_model_len` capped at its context window, and its
/// end-of-sequence tokens as `eos_token_ids` when the config names none.
pub fn engine_config(model: &LoadedModel, mut config: SchedulerConfig) -> SchedulerConfig {
    config.max_model_len = config
        .max_model_len
        .min(model.model.config().context_length);
    if config.eos_token_ids.is_empty() {
        config.eos_token_ids = model.tokenizer.eos_ids().to_vec();
    }
    config
}

/// A native engine over an already loaded model (see [`engine_config`] for what is adjusted).
/// Blocks hold [`BlockSize::default`] tokens, what routers hash prompts with.
pub fn native_engine_from(
    model: impl Into<Arc<LoadedModel>>,
    config: SchedulerConfig,
) -> Result<NativeEngine, NativeError> {
    let model = model.into();
    let config = engine_config(&model, config);
    let executor = NativeExecutor::new(model, &config, BlockSize::default())?;
    Ok(Scheduler::new(config, executor)?)
}

/// Loads the model at `path` (a `.gguf` file or a Hugging Face directory) and builds a native
/// engine over it.
pub fn native_engine(path: &Path, config: SchedulerConfig) -> Result<NativeEngine, NativeError> {
    let model = crate::load(path).map_err(NativeError::Load)?;
    native_engine_from(model, config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_parse() {
        let cases: Vec<(&str, Option<KvBudget>)> = vec![
            ("4096blocks", Some(KvBudget::Blocks(4096))),
            ("12 blocks", Some(KvBudget::Blocks(12))),
            ("25%", Some(KvBudget::FractionOfAvailable(0.25))),
            ("100%", Some(KvBudget::FractionOfAvailable(1.0))),
            ("0%", None),
            ("150%", None),
            ("1024", Some(KvBudget::Bytes(1024))),
            ("512MiB", Some(KvBudget::Bytes(512 << 20))),
            ("512m", Some(KvBudget::Bytes(512 << 20))),
            ("1.5GiB", Some(KvBudget::Bytes(3 << 29))),
            ("2GB", Some(KvBudget::Bytes(2_000_000_000))),
            ("", None),
            ("lots", None),
            ("12parsecs", None),
            ("-5", None),
            ("0", None),
            ("1e999", None),
        ];
        for (text, want) in cases {
            let got = text.parse::<KvBudget>().ok();
            assert_eq!(got, want, "{text:?}");
        }
    }

    #[test]
    fn mem_available_parses() {
        let text = "MemTotal:       24000000 kB\nMemFree:  100 kB\nMemAvailable:   2048 kB\n";
        assert_eq!(parse_mem_available(text), Some(2048 * 1024));
        assert_eq!(parse_mem_available("MemFree: 1 kB\n"), None);
        assert_eq!(parse_mem_available("MemAvailable: x kB\n"), None);
        assert!(host_available_memory().is_ok_and(|b| b > 0));
    }

    #[test]
    fn positions_get_distinct_seeds() {
        let seeds: std::collections::HashSet<u64> = (0..1000).map(|p| mix(7 ^ mix(p))).collect();
        assert_eq!(seeds.len(), 1000);
    }
}
