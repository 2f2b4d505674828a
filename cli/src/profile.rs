//! `kvfleet profile`: measure a worker's performance profile (docs/profiles.md) and upload it.
//!
//! The sweep runs the same engine a worker runs (the scheduler with the native executor, or
//! the mock), in-process, on the engine's clock (the executor's measured step times; the
//! mock's modelled ones):
//!
//! - **prefill** (`--role prefill` or both): for each prompt length, a fresh prompt alone on
//!   an idle engine with `max_tokens = 1`; its TTFT is the table's value. With a prefix of
//!   half the prompt cached first, the model `f(0) + f(c + n) − f(c)` is checked against the
//!   measurement and the error printed (the cached fraction is not a table axis).
//! - **decode** (`--role decode` or both): for each batch size and context length, that many
//!   prompts of that length prefilled, then decoding together; the mean gap between steps
//!   once all decode is the ITL. Cells whose batch does not fit the KV pool (or
//!   `max_num_seqs`) hold the last value that did, as the mock's own profile does.
//!
//! The profile is written as TOML (`-o FILE`, default stdout) and, with `--upload`, stored in
//! the control plane for the model (`POST /api/v1/models/{model}/profiles`).

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use kvfleet_engine::mock::{PROFILE_DECODE_BATCH, PROFILE_DECODE_CONTEXT, PROFILE_PREFILL_TOKENS};
use kvfleet_engine::{
    Engine, EngineOutput, Executor, MockEngine, MockExecutor, MockProfile, Request, Scheduler,
    SchedulerConfig,
};
use kvfleet_proto::SamplingParams;
use kvfleet_proto::profile::{DecodeTable, PROFILE_FORMAT, PerfProfile, PrefillTable};

/// Which phases to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Phase {
    Prefill,
    Decode,
    Both,
}

#[derive(Debug, Args)]
pub(crate) struct ProfileArgs {
    /// The model's name as deployed (the profile is for it; `--upload` stores it there).
    #[arg(long, value_name = "MODEL")]
    model: String,
    /// Measure prefill, decode or both (the other table is then the previous profile's, from
    /// --base, or both are measured).
    #[arg(long, value_enum, default_value_t = Phase::Both)]
    role: Phase,
    /// The engine: a `.gguf` file or model directory for the native engine, or `mock`
    /// (with --mock-profile, default the Llama 3.1 8B on H100 timing model).
    #[arg(long, value_name = "PATH|mock", default_value = "mock")]
    engine: String,
    /// The mock's timing profile (TOML), with --engine mock.
    #[arg(long, value_name = "FILE")]
    mock_profile: Option<PathBuf>,
    /// The device kind to record (default: `cpu` for the native engine, the mock profile's
    /// name for the mock).
    #[arg(long, value_name = "KIND")]
    device: Option<String>,
    /// A profile whose tables fill what this run does not measure (with --role).
    #[arg(long, value_name = "FILE.toml")]
    base: Option<PathBuf>,
    /// Prompt lengths to measure (default: 64 … 32768, capped by the model's context).
    #[arg(long, value_delimiter = ',', value_name = "TOKENS")]
    prefill_tokens: Vec<u32>,
    /// Decode batch sizes (default: 1 … 256, capped by --max-num-seqs).
    #[arg(long, value_delimiter = ',', value_name = "N")]
    decode_batch: Vec<u32>,
    /// Decode context lengths (default: 128 … 16384, capped by the model's context).
    #[arg(long, value_delimiter = ',', value_name = "TOKENS")]
    decode_context: Vec<u32>,
    /// The engine's `max_num_seqs`.
    #[arg(long, default_value_t = 256)]
    max_num_seqs: usize,
    /// The engine's `max_batched_tokens`.
    #[arg(long, default_value_t = 8192)]
    max_batched_tokens: usize,
    /// Write the profile here (default: stdout).
    #[arg(short = 'o', long, value_name = "FILE.toml")]
    output: Option<PathBuf>,
    /// Store it in the control plane for --model (needs `kvfleet login`, operator role).
    #[arg(long)]
    upload: bool,
    #[command(flatten)]
    api: crate::admin::ApiOpts,
}

/// The grid a sweep covers.
#[derive(Debug, Clone)]
pub(crate) struct Grid {
    pub(crate) prefill_tokens: Vec<u32>,
    pub(crate) decode_batch: Vec<u32>,
    pub(crate) decode_context: Vec<u32>,
}

/// Distinct token ids for prompt `n` of length `len` (never shared with another prompt).
fn prompt(n: u64, len: u32, vocab: u32) -> Vec<u32> {
    let low = u64::from(vocab / 8);
    let span = u64::from(vocab).saturating_sub(low).max(1);
    let mut seed = 0x9E37_79B9_7F4A_7C15u64 ^ n.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    (0..len)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (low + seed % span) as u32
        })
        .collect()
}

/// Runs the engine until idle; per request, its token times.
fn drive<E: Executor>(
    engine: &mut Scheduler<E>,
) -> anyhow::Result<HashMap<kvfleet_engine::RequestId, Vec<Duration>>> {
    let mut times: HashMap<_, Vec<Duration>> = HashMap::new();
    while let Some(t) = engine.next_event_time() {
        engine.step_until(t).context("running the engine")?;
        for o in engine.drain_outputs() {
            match o {
                EngineOutput::Token(tok) => times.entry(tok.request).or_default().push(tok.time),
                EngineOutput::Aborted { error, .. } => bail!("a request was aborted: {error}"),
            }
        }
    }
    Ok(times)
}

/// A sweep over one engine.
pub(crate) struct Sweep<E: Executor> {
    engine: Scheduler<E>,
    vocab: u32,
    next_prompt: u64,
}

impl<E: Executor> Sweep<E> {
    pub(crate) fn new(engine: Scheduler<E>, vocab: u32) -> Self {
        Sweep {
            engine,
            vocab,
            next_prompt: 0,
        }
    }

    fn submit(&mut self, len: u32, max_tokens: u32) -> anyhow::Result<kvfleet_engine::RequestId> {
        let p = prompt(self.next_prompt, len, self.vocab);
        self.next_prompt += 1;
        self.submit_tokens(p, max_tokens)
    }

    fn submit_tokens(
        &mut self,
        tokens: Vec<u32>,
        max_tokens: u32,
    ) -> anyhow::Result<kvfleet_engine::RequestId> {
        let sampling = SamplingParams {
            ignore_eos: true,
            ..SamplingParams::greedy(max_tokens)
        };
        let now = self.engine.now();
        self.engine
            .submit(Request::new(tokens, sampling), now)
            .context("submitting a profiling request")
    }

    /// TTFT of a fresh prompt of `len` tokens alone, ms.
    pub(crate) fn prefill_ms(&mut self, len: u32) -> anyhow::Result<f64> {
        let start = self.engine.now();
        let id = self.submit(len, 1)?;
        let times = drive(&mut self.engine)?;
        let first = times
            .get(&id)
            .and_then(|t| t.first())
            .context("the prompt produced no token")?;
        Ok(first.saturating_sub(start).as_secs_f64() * 1e3)
    }

    /// TTFT of `len` tokens whose first half was computed (and cached) just before, ms.
    pub(crate) fn half_cached_prefill_ms(&mut self, len: u32) -> anyhow::Result<f64> {
        let p = prompt(self.next_prompt, len, self.vocab);
        self.next_prompt += 1;
        self.submit_tokens(p[..len as usize / 2].to_vec(), 1)?;
        drive(&mut self.engine)?;
        let start = self.engine.now();
        let id = self.submit_tokens(p, 1)?;
        let times = drive(&mut self.engine)?;
        let first = times
            .get(&id)
            .and_then(|t| t.first())
            .context("the prompt produced no token")?;
        Ok(first.saturating_sub(start).as_secs_f64() * 1e3)
    }

    /// ITL of `batch` sequences with `context` tokens each, ms; `None` when they do not fit.
    pub(crate) fn itl_ms(&mut self, batch: u32, context: u32) -> anyhow::Result<Option<f64>> {
        let cfg = self.engine.config();
        if batch as usize > cfg.max_num_seqs {
            return Ok(None);
        }
        // Chunked prefill admits the batch over several steps, and the first sequences decode
        // meanwhile: each decodes long enough to still run when the last one starts.
        let prefill_steps =
            (u64::from(batch) * u64::from(context)).div_ceil(cfg.max_batched_tokens.max(1) as u64);
        let decode = 8 + u32::try_from(prefill_steps).unwrap_or(u32::MAX / 2);
        let block = u64::from(self.engine.pool().usage().total);
        let tokens_per_block = self.engine.executor().kv_layout().block_size.tokens() as u64;
        let need = u64::from(batch) * (u64::from(context + decode) + 1).div_ceil(tokens_per_block);
        if need > block {
            return Ok(None);
        }
        let ids: Vec<_> = (0..batch)
            .map(|_| self.submit(context, decode + 1))
            .collect::<anyhow::Result<_>>()?;
        let times = drive(&mut self.engine)?;
        // Gaps while the whole batch decodes: after the last first token, before the first
        // sequence ends.
        let firsts = ids
            .iter()
            .filter_map(|id| times.get(id).and_then(|t| t.first()));
        let decoding_from = firsts.max().copied().unwrap_or_default();
        let lasts = ids
            .iter()
            .filter_map(|id| times.get(id).and_then(|t| t.last()));
        let decoding_to = lasts.min().copied().unwrap_or_default();
        let mut gaps = Vec::new();
        for id in &ids {
            if let Some(t) = times.get(id) {
                for w in t.windows(2) {
                    if w[0] >= decoding_from && w[1] <= decoding_to {
                        gaps.push(w[1].saturating_sub(w[0]).as_secs_f64() * 1e3);
                    }
                }
            }
        }
        if gaps.is_empty() {
            return Ok(None);
        }
        Ok(Some(gaps.iter().sum::<f64>() / gaps.len() as f64))
    }
}

/// Keeps a table non-decreasing (later cells hold at least the earlier ones), rounded to
/// 0.1 µs: measurement noise and cells that did not fit never make a profile non-monotone.
fn monotone(values: impl IntoIterator<Item = Option<f64>>) -> Vec<f64> {
    let mut high = 0.0f64;
    values
        .into_iter()
        .map(|v| {
            if let Some(v) = v {
                high = high.max((v * 1e4).round() / 1e4);
            }
            high
        })
        .collect()
}

/// Measures the prefill table.
pub(crate) fn measure_prefill<E: Executor>(
    sweep: &mut Sweep<E>,
    tokens: &[u32],
) -> anyhow::Result<PrefillTable> {
    let mut ms = Vec::with_capacity(tokens.len());
    for &t in tokens {
        eprint!("\rprefill {t} tokens…        ");
        ms.push(Some(sweep.prefill_ms(t)?));
    }
    eprintln!();
    Ok(PrefillTable {
        tokens: tokens.to_vec(),
        ms: monotone(ms),
    })
}

/// Measures the decode table.
pub(crate) fn measure_decode<E: Executor>(
    sweep: &mut Sweep<E>,
    batch: &[u32],
    context: &[u32],
) -> anyhow::Result<DecodeTable> {
    let mut rows: Vec<Vec<Option<f64>>> = Vec::new();
    for &b in batch {
        let mut row = Vec::new();
        for &c in context {
            eprint!("\rdecode batch {b} × context {c}…        ");
            row.push(sweep.itl_ms(b, c)?);
        }
        rows.push(row);
    }
    eprintln!();
    // Monotone along context (per row), then along batch (per column).
    let mut itl: Vec<Vec<f64>> = rows.into_iter().map(monotone).collect();
    for i in 1..itl.len() {
        let (done, rest) = itl.split_at_mut(i);
        for (cell, below) in rest[0].iter_mut().zip(&done[i - 1]) {
            *cell = cell.max(*below);
        }
    }
    Ok(DecodeTable {
        batch: batch.to_vec(),
        context: context.to_vec(),
        itl_ms: itl,
    })
}

fn defaults(given: &[u32], all: &[u32], cap: u32) -> Vec<u32> {
    if given.is_empty() {
        all.iter().copied().filter(|&v| v <= cap).collect()
    } else {
        given.to_vec()
    }
}

/// Runs `kvfleet profile`.
pub(crate) fn run(args: &ProfileArgs) -> anyhow::Result<()> {
    let scheduler = SchedulerConfig {
        max_num_seqs: args.max_num_seqs,
        max_batched_tokens: args.max_batched_tokens,
        ..SchedulerConfig::default()
    };
    let base = args
        .base
        .as_ref()
        .map(|p| -> anyhow::Result<PerfProfile> {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            PerfProfile::from_toml_str(&text).with_context(|| format!("{}", p.display()))
        })
        .transpose()?;
    let profile = if args.engine == "mock" {
        let mock = match &args.mock_profile {
            Some(p) => {
                MockProfile::from_file(p).with_context(|| format!("loading {}", p.display()))?
            }
            None => MockProfile::default_8b_h100(),
        };
        let mut config = scheduler.clone();
        config.kv_memory = mock.pool_sizing();
        let engine: MockEngine = MockEngine::new(config.clone(), MockExecutor::new(mock.clone()))?;
        let context = u32::try_from(config.max_model_len).unwrap_or(u32::MAX);
        let grid = grid(args, context);
        let kv_blocks = u64::from(engine.pool().usage().total);
        let mut sweep = Sweep::new(engine, mock.vocab_size);
        measure(
            &mut sweep,
            args,
            &grid,
            base.as_ref(),
            Header {
                device: args.device.clone().unwrap_or_else(|| mock.name.clone()),
                engine: "mock",
                kernel_path: None,
                block_size: mock.layout.block_size.get(),
                kv_block_bytes: mock.layout.block_bytes() as u64,
                kv_blocks,
                config: &config,
            },
        )?
    } else {
        let path = PathBuf::from(&args.engine);
        let m = crate::load::model(&path, None)?;
        let kernel_path = m.model.kernel_path().to_string();
        let vocab = u32::try_from(m.model.config().vocab_size).unwrap_or(u32::MAX);
        let context = u32::try_from(m.model.config().context_length).unwrap_or(u32::MAX);
        let grid = grid(args, context);
        let longest = grid
            .prefill_tokens
            .iter()
            .chain(&grid.decode_context)
            .copied()
            .max()
            .unwrap_or(1) as usize;
        let max_batch = grid.decode_batch.iter().copied().max().unwrap_or(1) as usize;
        let mut config = scheduler.clone();
        config.max_model_len = context as usize;
        config.kv_memory =
            crate::load::kv_sizing(None, (max_batch * (longest + 32)).max(longest * 2))?;
        let engine = crate::load::engine(&m, config.clone())?;
        let blocks = engine.pool().usage().total;
        let layout = engine.executor().kv_layout();
        let mut sweep = Sweep::new(engine, vocab);
        measure(
            &mut sweep,
            args,
            &grid,
            base.as_ref(),
            Header {
                device: args.device.clone().unwrap_or_else(|| "cpu".to_owned()),
                engine: "native",
                kernel_path: Some(kernel_path),
                block_size: layout.block_size.get(),
                kv_block_bytes: layout.block_bytes() as u64,
                kv_blocks: u64::from(blocks),
                config: &config,
            },
        )?
    };
    let text = profile.to_toml_string()?;
    match &args.output {
        Some(path) => {
            std::fs::write(path, &text).with_context(|| format!("writing {}", path.display()))?
        }
        None => {
            use std::io::Write as _;
            std::io::stdout().lock().write_all(text.as_bytes())?;
        }
    }
    if args.upload {
        upload(args, &profile)?;
    }
    Ok(())
}

fn grid(args: &ProfileArgs, context: u32) -> Grid {
    let batch_cap = u32::try_from(args.max_num_seqs).unwrap_or(u32::MAX);
    Grid {
        prefill_tokens: defaults(&args.prefill_tokens, &PROFILE_PREFILL_TOKENS, context),
        decode_batch: defaults(&args.decode_batch, &PROFILE_DECODE_BATCH, batch_cap),
        decode_context: defaults(&args.decode_context, &PROFILE_DECODE_CONTEXT, context),
    }
}

/// What a profile says about the worker, beside its tables.
struct Header<'a> {
    device: String,
    engine: &'static str,
    kernel_path: Option<String>,
    block_size: u32,
    kv_block_bytes: u64,
    kv_blocks: u64,
    config: &'a SchedulerConfig,
}

fn measure<E: Executor>(
    sweep: &mut Sweep<E>,
    args: &ProfileArgs,
    grid: &Grid,
    base: Option<&PerfProfile>,
    header: Header<'_>,
) -> anyhow::Result<PerfProfile> {
    let want_prefill = args.role != Phase::Decode || base.is_none();
    let want_decode = args.role != Phase::Prefill || base.is_none();
    let prefill = match (want_prefill, base) {
        (false, Some(b)) => b.prefill.clone(),
        _ => measure_prefill(sweep, &grid.prefill_tokens)?,
    };
    let decode = match (want_decode, base) {
        (false, Some(b)) => b.decode.clone(),
        _ => measure_decode(sweep, &grid.decode_batch, &grid.decode_context)?,
    };
    let profile = PerfProfile {
        format: PROFILE_FORMAT,
        model: args.model.clone(),
        device: header.device,
        engine: header.engine.to_owned(),
        kernel_path: header.kernel_path,
        source: format!(
            "kvfleet profile ({} engine, max_num_seqs {}, max_batched_tokens {})",
            header.engine, header.config.max_num_seqs, header.config.max_batched_tokens
        ),
        block_size: header.block_size,
        kv_block_bytes: header.kv_block_bytes,
        kv_blocks: header.kv_blocks,
        max_num_seqs: u32::try_from(header.config.max_num_seqs).unwrap_or(u32::MAX),
        max_batched_tokens: u32::try_from(header.config.max_batched_tokens).unwrap_or(u32::MAX),
        prefill,
        decode,
        tiers: base.map(|b| b.tiers.clone()).unwrap_or_default(),
    };
    profile.validate()?;
    if want_prefill && let Some(&len) = grid.prefill_tokens.iter().rev().nth(1) {
        let measured = sweep.half_cached_prefill_ms(len)?;
        let modelled = profile.prefill_ms(u64::from(len - len / 2), u64::from(len / 2));
        eprintln!(
            "cached prefix check: {len} tokens with half cached took {measured:.1} ms; the profile predicts {modelled:.1} ms ({:+.1}%)",
            (modelled / measured - 1.0) * 100.0
        );
    }
    Ok(profile)
}

fn upload(args: &ProfileArgs, profile: &PerfProfile) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let client =
            crate::admin::config::client(&args.api, false).map_err(|e| anyhow::anyhow!("{e}"))?;
        let stored = crate::admin::planner::upload(&client, &args.model, profile)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        eprintln!(
            "uploaded: profile {} for {} on {}",
            stored.info.id, stored.info.model, stored.info.device
        );
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sweep against the default mock reproduces the mock's own computed profile (shipped
    /// as `DEFAULT_PERF_PROFILE_TOML`): measured and computed agree.
    #[test]
    fn a_mock_sweep_agrees_with_the_shipped_profile() {
        let shipped =
            PerfProfile::from_toml_str(kvfleet_engine::DEFAULT_PERF_PROFILE_TOML).unwrap();
        let mock = MockProfile::default_8b_h100();
        let config = SchedulerConfig {
            kv_memory: mock.pool_sizing(),
            max_model_len: 131_072,
            ..SchedulerConfig::default()
        };
        let engine = MockEngine::new(config, MockExecutor::new(mock.clone())).unwrap();
        let mut sweep = Sweep::new(engine, mock.vocab_size);
        let prefill = measure_prefill(&mut sweep, &[128, 1024, 8192, 16384]).unwrap();
        for (t, ms) in prefill.tokens.iter().zip(&prefill.ms) {
            let want = shipped.prefill_curve_ms(u64::from(*t));
            assert!(
                (ms - want).abs() / want < 0.02,
                "prefill {t}: {ms} vs {want}"
            );
        }
        let decode = measure_decode(&mut sweep, &[1, 16, 64], &[512, 4096]).unwrap();
        for (i, b) in decode.batch.iter().enumerate() {
            for (j, c) in decode.context.iter().enumerate() {
                let got = decode.itl_ms[i][j];
                let want = shipped.itl_ms(*b, u64::from(*c));
                assert!(
                    (got - want).abs() / want < 0.05,
                    "decode {b}×{c}: {got} vs {want}"
                );
            }
        }
        // A half-cached prompt: the mock charges only the new tokens (no attention over the
        // cached half), so it costs at least the new half alone and at most what the profile's
        // formula charges (which counts the cached prefix's attention): the profile is never
        // optimistic about a cached prompt.
        let measured = sweep.half_cached_prefill_ms(8192).unwrap();
        let alone = shipped.prefill_ms(4096, 0);
        let modelled = shipped.prefill_ms(4096, 4096);
        assert!(
            measured >= alone * 0.99 && measured <= modelled * 1.01,
            "{measured} ms outside [{alone}, {modelled}]"
        );
        assert!(
            modelled > alone * 1.05,
            "the formula charges the cached prefix"
        );
    }

    #[test]
    fn tables_are_made_monotone() {
        assert_eq!(
            monotone([Some(1.0), Some(0.5), None, Some(2.0)]),
            vec![1.0, 1.0, 1.0, 2.0]
        );
        assert_eq!(defaults(&[], &[1, 2, 4], 2), vec![1, 2]);
        assert_eq!(defaults(&[9], &[1, 2, 4], 2), vec![9]);
        assert_ne!(prompt(1, 8, 1000), prompt(2, 8, 1000));
    }
}
