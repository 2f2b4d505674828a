//! `kvfleet generate`: one request through the native engine, its text streamed to stdout as
//! tokens arrive, its prefill and decode speed on stderr.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{ArgGroup, Args};
use kvfleet_engine::{Engine, EngineOutput, Finish, FinishReason, Request, SchedulerConfig};
use kvfleet_model::{ChatMessage, KvBudget, LoadedModel};
use kvfleet_proto::SamplingParams;

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("input").required(true).args(["prompt", "chat"])))]
pub(crate) struct GenerateArgs {
    /// A `.gguf` file or a Hugging Face model directory.
    #[arg(long, short)]
    pub(crate) model: PathBuf,
    /// Continue this text as it is (a completion; BOS is added when the model wants one).
    #[arg(long, short)]
    pub(crate) prompt: Option<String>,
    /// Ask this as a user message: rendered with the model's chat template, generation prompt
    /// appended; generation stops at the end of the assistant's turn.
    #[arg(long)]
    pub(crate) chat: Option<String>,
    /// Most tokens to generate.
    #[arg(long, short = 'n', default_value_t = 128)]
    pub(crate) max_tokens: u32,
    /// Sampling temperature, 0 to 2; 0 is greedy (the default: the same output every time).
    #[arg(long, short, default_value_t = 0.0)]
    pub(crate) temperature: f32,
    /// Seed of the sampler: with the same seed and prompt the output is the same.
    #[arg(long)]
    pub(crate) seed: Option<u64>,
    /// Nucleus sampling: keep the most likely tokens up to this total probability, in (0, 1].
    #[arg(long, default_value_t = 1.0)]
    pub(crate) top_p: f32,
    /// Keep only the K most likely tokens (0: all).
    #[arg(long, default_value_t = 0)]
    pub(crate) top_k: u32,
    /// Keep going past the end-of-sequence token.
    #[arg(long)]
    pub(crate) ignore_eos: bool,
    /// Memory for the KV cache: bytes (`512MiB`, `2GB`), a share of available memory (`25%`)
    /// or blocks (`4096blocks`). Default: exactly what this request needs.
    #[arg(long, value_parser = parse_budget)]
    pub(crate) kv_memory: Option<KvBudget>,
    #[command(flatten)]
    pub(crate) kernels: crate::load::KernelArgs,
}

pub(crate) fn parse_budget(s: &str) -> Result<KvBudget, String> {
    s.parse::<KvBudget>().map_err(|e| e.to_string())
}

fn prompt_ids(m: &LoadedModel, args: &GenerateArgs) -> anyhow::Result<Vec<u32>> {
    match (&args.prompt, &args.chat) {
        (Some(p), _) => m.encode_prompt(p).context("tokenizing the prompt"),
        (None, Some(c)) => Ok(m
            .chat_prompt(&[ChatMessage::new("user", c.as_str())])
            .context("rendering the chat prompt")?
            .1),
        (None, None) => bail!("give --prompt or --chat"),
    }
}

/// Prints the new part of the decoded text; holds back an incomplete UTF-8 sequence (a
/// byte-level token can end mid-character) until the next token completes it.
#[derive(Debug, Default)]
struct Streamer {
    printed: usize,
}

impl Streamer {
    fn push(&mut self, text: &str, out: &mut impl Write, last: bool) -> std::io::Result<()> {
        if !last && text.ends_with('\u{FFFD}') {
            return Ok(());
        }
        if let Some(new) = text.get(self.printed..) {
            out.write_all(new.as_bytes())?;
            out.flush()?;
        }
        self.printed = text.len();
        Ok(())
    }
}

fn rate(tokens: u32, secs: f64) -> String {
    if secs > 0.0 && tokens > 0 {
        format!("{:.1} tok/s", f64::from(tokens) / secs)
    } else {
        "n/a".to_string()
    }
}

pub(crate) fn run(args: &GenerateArgs) -> anyhow::Result<()> {
    let sampling = SamplingParams {
        temperature: args.temperature,
        top_p: args.top_p,
        top_k: args.top_k,
        seed: args.seed,
        ignore_eos: args.ignore_eos,
        ..SamplingParams::greedy(args.max_tokens)
    };
    sampling.validate().context("invalid sampling options")?;
    let m = crate::load::model(&args.model, args.kernels.path())?;
    let prompt = prompt_ids(&m, args)?;
    let context = m.model.config().context_length;
    let total = (prompt.len() + args.max_tokens as usize).min(context);
    let config = SchedulerConfig {
        kv_memory: crate::load::kv_sizing(args.kv_memory, total)?,
        ..SchedulerConfig::default()
    };
    let mut engine = crate::load::engine(&m, config)?;
    let id = engine
        .submit(Request::new(prompt, sampling), engine.now())
        .context("submitting the request")?;

    let mut out = std::io::stdout().lock();
    let mut streamer = Streamer::default();
    let mut generated: Vec<u32> = Vec::new();
    let mut finish: Option<Finish> = None;
    while let Some(t) = engine.next_event_time() {
        engine.step_until(t).context("running the model")?;
        for o in engine.drain_outputs() {
            match o {
                EngineOutput::Token(tok) if tok.request == id => {
                    generated.push(tok.token);
                    let text = m
                        .tokenizer
                        .decode(&generated, true)
                        .context("decoding output tokens")?;
                    streamer.push(&text, &mut out, tok.finish.is_some())?;
                    finish = finish.or(tok.finish);
                }
                EngineOutput::Token(_) => {}
                EngineOutput::Aborted { error, .. } => bail!("the request was aborted: {error}"),
            }
        }
    }
    writeln!(out)?;
    let Some(finish) = finish else {
        bail!("the engine went idle before the request finished");
    };
    let s = finish.stats;
    let prefill_tokens = s.prompt_tokens - s.cached_tokens;
    let prefill_secs = s.first_token.saturating_sub(s.arrival).as_secs_f64();
    let decode_secs = s.finished.saturating_sub(s.first_token).as_secs_f64();
    let reason = match finish.reason {
        FinishReason::Length => "length".to_string(),
        FinishReason::Stop(t) | FinishReason::Eos(t) => {
            format!("end of sequence ({})", m.tokenizer.token_text(t))
        }
    };
    eprintln!(
        "prompt {} tokens, generated {} (stopped: {reason}); prefill {} ({:.3} s), decode {} ({:.3} s)",
        s.prompt_tokens,
        s.output_tokens,
        rate(prefill_tokens, prefill_secs),
        prefill_secs,
        rate(s.output_tokens.saturating_sub(1), decode_secs),
        decode_secs,
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streamer_holds_back_partial_characters() {
        let mut s = Streamer::default();
        let mut out = Vec::new();
        // (decoded text so far, is last token, stdout after the push)
        let cases = [
            (" Par", false, " Par"),
            (" Par\u{FFFD}", false, " Par"),
            (" Paré", false, " Paré"),
            (" Paré!", false, " Paré!"),
            (" Paré!\u{FFFD}", true, " Paré!\u{FFFD}"),
        ];
        for (text, last, want) in cases {
            s.push(text, &mut out, last).unwrap();
            assert_eq!(String::from_utf8(out.clone()).unwrap(), want);
        }
    }
}
