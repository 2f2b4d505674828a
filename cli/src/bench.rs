//! `kvfleet bench engine`: prefill and decode throughput of the native engine on this machine
//! at several batch sizes, measured through the scheduler as serving would run it.
//!
//! For each batch size B: B distinct random prompts of `--prompt-tokens` tokens are prefilled
//! (requests with `max_tokens = 1`, so every step is prefill); then the same prompts are
//! submitted again with `max_tokens = decode + 1`, so they start from the prefix cache
//! (only the last partial block is recomputed) and decode together. Times are the engine's
//! clock, which in virtual time is the sum of the executor's measured step durations.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use kvfleet_engine::{Engine, EngineOutput, Request, RequestId, SchedulerConfig};
use kvfleet_model::{KvBudget, NativeEngine};
use kvfleet_proto::{BlockSize, SamplingParams};

#[derive(Debug, Subcommand)]
pub(crate) enum BenchCommand {
    /// Prefill and decode tokens/s of the native engine at several batch sizes.
    ///
    /// For each batch size B, B distinct random prompts are prefilled (one token each, so every
    /// step is prefill: prefill tok/s = B × prompt tokens / time), then the same prompts run
    /// again from the prefix cache and decode together (decode tok/s = B × decode tokens / time
    /// after every first token). Times are the executor's measured step durations. Prints a
    /// Markdown table on stdout.
    Engine(EngineArgs),
}

#[derive(Debug, Args)]
pub(crate) struct EngineArgs {
    /// A `.gguf` file or a Hugging Face model directory.
    #[arg(long, short)]
    model: PathBuf,
    /// Tokens per prompt.
    #[arg(long, default_value_t = 512)]
    prompt_tokens: usize,
    /// Tokens decoded per sequence.
    #[arg(long, default_value_t = 64)]
    decode_tokens: u32,
    /// Batch sizes to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 8, 32])]
    batches: Vec<usize>,
    /// Most tokens in one engine step (prefill is chunked to fit).
    #[arg(long, default_value_t = 8192)]
    max_batched_tokens: usize,
    /// Memory for the KV cache (`512MiB`, `25%`, `4096blocks`). Default: what the largest
    /// batch needs.
    #[arg(long, value_parser = crate::generate::parse_budget)]
    kv_memory: Option<KvBudget>,
    /// Constrain the decoded tokens by this JSON Schema file (structured output, llguidance):
    /// the grammar's mask and advance are then part of every decode step. Pick a schema whose
    /// shortest valid value is longer than `--decode-tokens` (e.g. an array with a large
    /// `minItems`), so every measured step is constrained.
    #[arg(long)]
    json_schema: Option<PathBuf>,
    /// Print one JSON object per batch size instead of the table (for scripts, e.g.
    /// scripts/bench-vs-llamacpp.sh).
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    kernels: crate::load::KernelArgs,
}

pub(crate) fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Engine(args) => engine(&args),
    }
}

/// Runs until idle; returns, per request, the time of its first token and of its last.
fn drive(engine: &mut NativeEngine) -> anyhow::Result<Vec<(RequestId, Duration, Duration)>> {
    let mut first: std::collections::HashMap<RequestId, Duration> = Default::default();
    let mut done = Vec::new();
    while let Some(t) = engine.next_event_time() {
        engine.step_until(t).context("running the model")?;
        for o in engine.drain_outputs() {
            match o {
                EngineOutput::Token(tok) => {
                    let f = *first.entry(tok.request).or_insert(tok.time);
                    if tok.finish.is_some() {
                        done.push((tok.request, f, tok.time));
                    }
                }
                EngineOutput::Aborted { error, .. } => bail!("a request was aborted: {error}"),
            }
        }
    }
    Ok(done)
}

fn engine(args: &EngineArgs) -> anyhow::Result<()> {
    if args.prompt_tokens == 0 || args.decode_tokens == 0 || args.batches.contains(&0) {
        bail!("--prompt-tokens, --decode-tokens and every batch size must be at least 1");
    }
    let constraint = match &args.json_schema {
        Some(path) => Some(kvfleet_proto::Constraint::JsonSchema(
            std::fs::read_to_string(path)
                .with_context(|| format!("reading the JSON schema {}", path.display()))?,
        )),
        None => None,
    };
    let m = crate::load::model(&args.model, args.kernels.path())?;
    if let Some(constraint) = &constraint
        && !args.json
    {
        let (per_token, tokens) = grammar_cost(&m, constraint, args.decode_tokens)?;
        writeln!(
            std::io::stdout().lock(),
            "grammar alone: {:.0} µs per token (advance + mask over the vocabulary), {tokens} tokens",
            per_token * 1e6
        )?;
    }
    let kernels = m.model.kernel_path();
    let vocab = m.model.config().vocab_size;
    let context = m.model.config().context_length;
    let per_seq = args.prompt_tokens + args.decode_tokens as usize + 1;
    if per_seq > context {
        bail!(
            "--prompt-tokens {} plus --decode-tokens {} exceed the model's context of {context}",
            args.prompt_tokens,
            args.decode_tokens
        );
    }
    let max_batch = args.batches.iter().copied().max().unwrap_or(1);
    let bs = BlockSize::default();
    let config = SchedulerConfig {
        max_num_seqs: max_batch,
        max_batched_tokens: args.max_batched_tokens,
        kv_memory: crate::load::kv_sizing(args.kv_memory, max_batch * bs.blocks_for(per_seq) * 16)?,
        ..SchedulerConfig::default()
    };
    let mut engine = crate::load::engine(&m, config)?;
    let mut out = std::io::stdout().lock();
    if !args.json {
        writeln!(
            out,
            "model {} ({}), prompt {} tokens, decode {} tokens, KV cache {} blocks, kernels {kernels}",
            args.model.display(),
            m.info.architecture,
            args.prompt_tokens,
            args.decode_tokens,
            engine.executor().num_blocks()
        )?;
        writeln!(out, "| batch | prefill tok/s | decode tok/s |")?;
        writeln!(out, "| ---: | ---: | ---: |")?;
    }
    // Ordinary tokens: skip the low ids, where vocabularies keep their control tokens.
    let low = (vocab / 8) as u64;
    let span = vocab as u64 - low;
    let mut seed = 0x5EED_u64;
    for &batch in &args.batches {
        engine.clear_prefix_cache();
        let prompts: Vec<Vec<u32>> = (0..batch)
            .map(|_| {
                (0..args.prompt_tokens)
                    .map(|_| {
                        // xorshift64*: distinct prompts without pulling in an RNG crate.
                        seed ^= seed << 13;
                        seed ^= seed >> 7;
                        seed ^= seed << 17;
                        (low + seed % span) as u32
                    })
                    .collect()
            })
            .collect();
        let submit = |engine: &mut NativeEngine,
                      max_tokens: u32,
                      constraint: Option<&kvfleet_proto::Constraint>|
         -> anyhow::Result<Duration> {
            let start = engine.now();
            for p in &prompts {
                let sampling = SamplingParams {
                    ignore_eos: true,
                    constraint: constraint.cloned(),
                    ..SamplingParams::greedy(max_tokens)
                };
                engine
                    .submit(Request::new(p.clone(), sampling), start)
                    .context("submitting a benchmark request")?;
            }
            Ok(start)
        };
        let start = submit(&mut engine, 1, None)?;
        let prefill = drive(&mut engine)?;
        let prefill_end = prefill.iter().map(|r| r.1).max().unwrap_or(start);
        let prefill_secs = prefill_end.saturating_sub(start).as_secs_f64();

        submit(&mut engine, args.decode_tokens + 1, constraint.as_ref())?;
        let decode = drive(&mut engine)?;
        let decode_start = decode.iter().map(|r| r.1).max().unwrap_or_default();
        let decode_end = decode.iter().map(|r| r.2).max().unwrap_or_default();
        let decode_secs = decode_end.saturating_sub(decode_start).as_secs_f64();
        let rate = |tokens: usize, secs: f64| (secs > 0.0).then(|| tokens as f64 / secs);
        let prefill_rate = rate(batch * args.prompt_tokens, prefill_secs);
        let decode_rate = rate(batch * args.decode_tokens as usize, decode_secs);
        if args.json {
            let line = serde_json::json!({
                "model": args.model.display().to_string(),
                "kernels": kernels.name(),
                "batch": batch,
                "prompt_tokens": args.prompt_tokens,
                "decode_tokens": args.decode_tokens,
                "prefill_tok_s": prefill_rate,
                "decode_tok_s": decode_rate,
                "json_schema": args.json_schema.as_ref().map(|p| p.display().to_string()),
            });
            writeln!(out, "{line}")?;
        } else {
            let show = |r: Option<f64>| r.map_or_else(|| "n/a".to_string(), |r| format!("{r:.1}"));
            writeln!(
                out,
                "| {batch} | {} | {} |",
                show(prefill_rate),
                show(decode_rate)
            )?;
        }
        out.flush()?;
    }
    Ok(())
}

/// The grammar's own time per token, without the model: `tokens` steps of masking pseudo-random
/// logits, taking the best allowed token and advancing over it (what the executor adds to each
/// constrained decode step, plus a copy of the logits and an arg-max). Returns seconds per
/// token and the steps taken.
fn grammar_cost(
    m: &kvfleet_model::LoadedModel,
    constraint: &kvfleet_proto::Constraint,
    tokens: u32,
) -> anyhow::Result<(f64, usize)> {
    let engine = kvfleet_model::grammar::GrammarEngine::new(&m.tokenizer)?;
    let mut grammar = engine.matcher(constraint)?;
    let vocab = m.model.config().vocab_size;
    let mut output: Vec<u32> = Vec::new();
    let mut seed = 0x1234_5678_u64;
    // One set of logits for every step (made before the clock starts): the mask, which changes
    // with the grammar's state, decides what is picked.
    let logits: Vec<f32> = (0..vocab)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % 1000) as f32 / 100.0
        })
        .collect();
    let started = std::time::Instant::now();
    for _ in 0..tokens {
        grammar.catch_up(output.iter().copied())?;
        let mut logits = logits.clone();
        grammar.mask(&mut logits)?;
        let best = kvfleet_model::sampler::top_k(&logits, 1);
        let Some(&(token, _)) = best.first() else {
            break;
        };
        if m.tokenizer.eos_ids().contains(&token) {
            break;
        }
        output.push(token);
    }
    let steps = output.len().max(1);
    Ok((started.elapsed().as_secs_f64() / steps as f64, output.len()))
}
