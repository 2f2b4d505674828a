//! `kvfleet model`: local model files.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use kvfleet_model::tiny::{TinySpec, write_tiny_llama};

#[derive(Debug, Subcommand)]
pub(crate) enum ModelCommand {
    /// Write a tiny random Llama-family model (≈100 k parameters, Hugging Face layout:
    /// config.json, model.safetensors, tokenizer.json, tokenizer_config.json with a ChatML
    /// template) into DIR. Its output is gibberish; it exists for tests and smoke runs.
    InitTiny {
        /// Directory to write (created if missing; existing files of the same names are
        /// overwritten).
        dir: PathBuf,
        /// Seed of the random weights (the same seed writes the same model).
        #[arg(long, default_value_t = 7)]
        seed: u64,
    },
    /// Describe a model: architecture, parameters, quantization, context length, vocabulary,
    /// special tokens and chat template.
    Inspect {
        /// A `.gguf` file or a Hugging Face model directory.
        path: PathBuf,
        /// Print the whole chat template, not just whether there is one.
        #[arg(long)]
        template: bool,
    },
}

pub(crate) fn run(cmd: ModelCommand) -> anyhow::Result<()> {
    match cmd {
        ModelCommand::InitTiny { dir, seed } => {
            write_tiny_llama(&dir, TinySpec::default(), seed)
                .with_context(|| format!("writing the tiny model into {}", dir.display()))?;
            writeln!(
                std::io::stdout(),
                "wrote a tiny random Llama model to {}",
                dir.display()
            )?;
            Ok(())
        }
        ModelCommand::Inspect { path, template } => inspect(&path, template),
    }
}

fn inspect(path: &std::path::Path, template: bool) -> anyhow::Result<()> {
    let m = crate::load::model(path, None)?;
    let mut out = std::io::stdout().lock();
    write!(out, "{}", m.info)?;
    let tok = &m.tokenizer;
    let name = |id: u32| format!("{} ({id})", tok.token_str(id).unwrap_or_default());
    let bos = tok.bos_id().map_or_else(|| "none".to_string(), name);
    let eos: Vec<String> = tok.eos_ids().iter().map(|&id| name(id)).collect();
    writeln!(
        out,
        "special tokens: bos {bos}; eos {}",
        if eos.is_empty() {
            "none".to_string()
        } else {
            eos.join(", ")
        }
    )?;
    if template && let Some(t) = &m.info.chat_template {
        writeln!(out, "--- chat template ---\n{t}")?;
    }
    Ok(())
}
