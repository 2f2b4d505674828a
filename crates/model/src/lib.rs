//! Native LLM execution on CPU.
//!
//! This crate owns the math of a model and nothing about scheduling: it loads weights (GGUF,
//! memory-mapped and used in place, or Hugging Face safetensors), builds the tokenizer and chat template
//! the model ships with, and runs a batched forward step over a [`PagedKvCache`] addressed
//! through per-sequence block tables. The engine (`kvfleet-engine`) decides which sequences run
//! each step, allocates and shares blocks (prefix caching), and calls [`Model::forward`]; only
//! [`executor`], the adapter that plugs the model into it, depends on it.
//!
//! - [`gguf`]: bounds-checked GGUF parsing (no panics on corrupt files);
//! - [`config`]: architecture description from GGUF metadata or `config.json`;
//! - [`tokenizer`], [`chat`]: text to prompt ids the way llama.cpp / transformers do it;
//! - [`model`]: Llama-family (Llama 2/3, Mistral, Qwen 2/3) and Gemma 3 forward passes;
//! - [`kernels`]: the matmul and attention kernels, chosen at run time by CPU feature detection
//!   (AVX-512 VNNI, AVX2, portable), with the fast (batch-invariant) or the exact (llama.cpp,
//!   bit for bit) arithmetic ([`KernelPath`]); the only module with `unsafe` besides `mmap`
//!   (the memory map of model files);
//! - `ggml_math` (private, [`Rounding`] public): llama.cpp's CPU rounding reproduced bit for
//!   bit (f16 dot-product lane orders, vectorised `expf`, GELU table), because 8-bit
//!   requantization between layers turns last-bit differences into different tokens;
//! - [`kv_cache`]: paged K/V storage and block bytes for transfer;
//! - [`sampler`]: greedy / temperature / top-k / top-p / min-p with per-request seeds, after
//!   [`adjust`]: `logit_bias` and the repetition, presence and frequency penalties;
//! - [`executor`]: [`NativeExecutor`], the model behind `kvfleet-engine`'s scheduler, and
//!   [`native_engine`], which loads a model into a [`NativeEngine`];
//! - [`tiny`]: writes a tiny random Llama model for tests; [`inspect`]: a summary of a model.
//!
//! [`load`] builds a [`LoadedModel`] (weights included); [`load_text`] only the [`TextModel`]
//! (tokenizer, chat template, architecture) that a frontend needs.

pub mod adjust;
pub mod chat;
pub mod config;
pub mod error;
pub mod executor;
mod ggml_math;
pub mod gguf;
pub mod grammar;
pub mod inspect;
pub mod kernels;
pub mod kv_cache;
mod mmap;
pub mod model;
pub mod sampler;
pub mod tiny;
pub mod tokenizer;
mod weights;

use std::path::Path;

use kvfleet_proto::{BlockSize, SamplingParams};

pub use chat::{ChatMessage, ChatTemplate};
pub use config::{Architecture, ModelConfig};
pub use error::{ModelError, Result};
pub use executor::{
    KvBudget, NativeEngine, NativeError, NativeExecutor, native_engine, native_engine_from,
};
pub use ggml_math::Rounding;
pub use inspect::ModelInfo;
pub use kernels::{Arithmetic, Isa, KernelChoiceError, KernelPath};
pub use kv_cache::PagedKvCache;
pub use model::{Model, SeqInput};
pub use sampler::{Sampled, Sampler};
pub use tokenizer::Tokenizer;

use crate::gguf::{GgufFile, Value};
use crate::weights::{SafetensorsDir, Weights};

/// A model ready to serve: weights, tokenizer, chat template and a summary.
#[derive(Debug)]
pub struct LoadedModel {
    /// The weights and forward pass.
    pub model: Model,
    /// The tokenizer.
    pub tokenizer: Tokenizer,
    /// The chat template, when the model ships one.
    pub chat_template: Option<ChatTemplate>,
    /// What `inspect` prints.
    pub info: ModelInfo,
}

/// Loads a model from a `.gguf` file or a Hugging Face directory (`config.json`,
/// `*.safetensors`, `tokenizer.json`, optionally `tokenizer_config.json`), on the kernels
/// `KVFLEET_KERNELS` names (default: the fastest this CPU runs; see [`KernelPath::from_env`]).
pub fn load(path: &Path) -> Result<LoadedModel> {
    load_with(path, KernelPath::from_env()?)
}

/// [`load`] on the given kernels.
pub fn load_with(path: &Path, kernels: KernelPath) -> Result<LoadedModel> {
    let mut m = if path.is_dir() {
        load_hf_dir(path)?
    } else {
        load_gguf(path)?
    };
    m.model.set_kernel_path(kernels);
    Ok(m)
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

/// What serving a model needs besides its weights: the tokenizer, the chat template and the
/// architecture description (context window, vocabulary). The agent's frontend holds one per
/// model it serves, while the weights live in worker processes.
#[derive(Debug)]
pub struct TextModel {
    /// The tokenizer.
    pub tokenizer: Tokenizer,
    /// The chat template, when the model ships one.
    pub chat_template: Option<ChatTemplate>,
    /// The architecture (context length, vocabulary size, ...).
    pub config: ModelConfig,
}

impl TextModel {
    /// Prompt ids for `text`, with BOS when the model wants one.
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>> {
        self.tokenizer.encode(text, true)
    }

    /// Renders `messages` with the chat template (generation prompt appended) and tokenizes it,
    /// exactly as [`LoadedModel::chat_prompt`] does.
    pub fn chat_prompt(&self, messages: &[ChatMessage]) -> Result<(String, Vec<u32>)> {
        render_chat(&self.tokenizer, self.chat_template.as_ref(), messages, None)
    }

    /// [`TextModel::chat_prompt`] with tool definitions passed to the template (which must
    /// read them: see [`ChatTemplate::renders_tools`]).
    pub fn chat_prompt_with_tools(
        &self,
        messages: &[ChatMessage],
        tools: Option<&serde_json::Value>,
    ) -> Result<(String, Vec<u32>)> {
        render_chat(
            &self.tokenizer,
            self.chat_template.as_ref(),
            messages,
            tools,
        )
    }
}

/// Loads what [`TextModel`] holds from a `.gguf` file or a Hugging Face directory, without
/// building the weights. (A GGUF file is still read whole: the parser works on bytes in memory.)
pub fn load_text(path: &Path) -> Result<TextModel> {
    if path.is_dir() {
        let cfg_path = path.join("config.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(|source| ModelError::Io {
            path: cfg_path.clone(),
            source,
        })?;
        let config = ModelConfig::from_hf_json(&text)?;
        let (tokenizer, chat_template) = hf_text(path)?;
        Ok(TextModel {
            tokenizer,
            chat_template,
            config,
        })
    } else {
        let file = GgufFile::open(path)?;
        let config = ModelConfig::from_gguf(&file)?;
        let tokenizer = Tokenizer::from_gguf(&file)?;
        let chat_template = gguf_chat_template(&file, &tokenizer)?;
        Ok(TextModel {
            tokenizer,
            chat_template,
            config,
        })
    }
}

fn gguf_chat_template(file: &GgufFile, tokenizer: &Tokenizer) -> Result<Option<ChatTemplate>> {
    Ok(
        match file.get("tokenizer.chat_template").and_then(Value::as_str) {
            Some(src) => {
                let text =
                    |id: Option<u32>| id.and_then(|i| tokenizer.token_str(i)).unwrap_or_default();
                let eos = text(tokenizer.eos_ids().first().copied());
                Some(ChatTemplate::new(src, &text(tokenizer.bos_id()), &eos)?)
            }
            None => None,
        },
    )
}

fn render_chat(
    tokenizer: &Tokenizer,
    template: Option<&ChatTemplate>,
    messages: &[ChatMessage],
    tools: Option<&serde_json::Value>,
) -> Result<(String, Vec<u32>)> {
    let template = template
        .ok_or_else(|| ModelError::ChatTemplate("this model has no chat template".into()))?;
    let mut text = template.render_with_tools(messages, tools, true)?;
    let bos = template.bos_token();
    if tokenizer.adds_bos() && !bos.is_empty() && text.starts_with(bos) {
        text = text[bos.len()..].to_string();
    }
    let ids = tokenizer.encode(&text, true)?;
    Ok((text, ids))
}

fn load_gguf(path: &Path) -> Result<LoadedModel> {
    let file = GgufFile::open(path)?;
    let config = ModelConfig::from_gguf(&file)?;
    let tokenizer = Tokenizer::from_gguf(&file)?;
    let chat_template = gguf_chat_template(&file, &tokenizer)?;
    let info = inspect::from_gguf(&file, &config, chat_template.as_ref());
    let weights = Weights::Gguf(file);
    let model = Model::from_weights(config, file_name(path), &weights)?;
    Ok(LoadedModel {
        model,
        tokenizer,
        chat_template,
        info,
    })
}

fn load_hf_dir(dir: &Path) -> Result<LoadedModel> {
    let cfg_path = dir.join("config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(|source| ModelError::Io {
        path: cfg_path.clone(),
        source,
    })?;
    let config = ModelConfig::from_hf_json(&text)?;
    let (tokenizer, chat_template) = hf_text(dir)?;
    let weights = Weights::Safetensors(SafetensorsDir::open(dir, config.architecture)?);
    let info = inspect::from_weights(&weights, &config, "safetensors", chat_template.as_ref());
    let model = Model::from_weights(config, file_name(dir), &weights)?;
    Ok(LoadedModel {
        model,
        tokenizer,
        chat_template,
        info,
    })
}

/// The tokenizer and chat template of a Hugging Face directory.
fn hf_text(dir: &Path) -> Result<(Tokenizer, Option<ChatTemplate>)> {
    let tokenizer = Tokenizer::from_hf_dir(dir)?;
    let tok_cfg: Option<serde_json::Value> =
        match std::fs::read_to_string(dir.join("tokenizer_config.json")) {
            Ok(t) => serde_json::from_str(&t).ok(),
            Err(_) => None,
        };
    let token_text = |key: &str| -> String {
        match tok_cfg.as_ref().and_then(|c| c.get(key)) {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(serde_json::Value::Object(o)) => o
                .get("content")
                .and_then(|c| c.as_str())
                .unwrap_or_default()
                .to_string(),
            _ => String::new(),
        }
    };
    let chat_template = match tok_cfg
        .as_ref()
        .and_then(|c| c.get("chat_template"))
        .and_then(|t| t.as_str())
    {
        Some(src) => Some(ChatTemplate::new(
            src,
            &token_text("bos_token"),
            &token_text("eos_token"),
        )?),
        None => None,
    };
    Ok((tokenizer, chat_template))
}

/// The result of [`LoadedModel::generate`].
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// Generated token ids (the stop token included when one ended it).
    pub tokens: Vec<u32>,
    /// Per generated token: its log-probability and the requested alternatives.
    pub logprobs: Vec<Sampled>,
}

impl LoadedModel {
    /// Prompt ids for `text`, with BOS when the model wants one.
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>> {
        self.tokenizer.encode(text, true)
    }

    /// Renders `messages` with the chat template (generation prompt appended) and tokenizes it.
    /// Returns the text (without a leading BOS string when BOS is added as a token) and ids.
    pub fn chat_prompt(&self, messages: &[ChatMessage]) -> Result<(String, Vec<u32>)> {
        render_chat(&self.tokenizer, self.chat_template.as_ref(), messages, None)
    }

    /// Generates for one prompt on a private cache: the simplest driver of [`Model::forward`]
    /// (the engine batches many; tools and tests use this). Prefill runs in chunks of
    /// `chunk` tokens; stops at EOS (unless `ignore_eos`), a stop token or `max_tokens`.
    pub fn generate(
        &self,
        prompt: &[u32],
        params: &SamplingParams,
        chunk: usize,
    ) -> Result<Generation> {
        let c = self.model.config();
        let total = prompt.len() + params.max_tokens as usize;
        if prompt.len() > c.context_length {
            return Err(ModelError::PromptTooLong {
                tokens: prompt.len(),
                context: c.context_length,
            });
        }
        let total = total.min(c.context_length);
        let bs = BlockSize::default();
        let blocks = bs.blocks_for(total).max(1);
        let mut cache = self.model.new_cache(blocks, bs)?;
        let table: Vec<u32> = (0..blocks as u32).collect();
        let mut sampler = Sampler::new(params, 0);
        let chunk = chunk.max(1);
        let mut pos = 0;
        let mut last = None;
        while pos < prompt.len() {
            let end = (pos + chunk).min(prompt.len());
            let out = self.model.forward(
                &[SeqInput {
                    tokens: &prompt[pos..end],
                    start_pos: pos,
                    block_table: &table,
                    want_logits: end == prompt.len(),
                }],
                &mut cache,
            )?;
            last = out.into_iter().next().flatten();
            pos = end;
        }
        let mut out = Generation {
            tokens: Vec::new(),
            logprobs: Vec::new(),
        };
        while let Some(logits) = last.take() {
            let history = adjust::History::new(prompt, params.generated_in_prompt, &out.tokens);
            let s = sampler.sample_after(&logits, &history);
            let tok = s.token;
            out.tokens.push(tok);
            out.logprobs.push(s);
            let stop = (!params.ignore_eos && self.tokenizer.eos_ids().contains(&tok))
                || params.stop_token_ids.contains(&tok)
                || out.tokens.len() >= params.max_tokens as usize
                || pos >= c.context_length;
            if stop {
                break;
            }
            let out = self.model.forward(
                &[SeqInput {
                    tokens: &[tok],
                    start_pos: pos,
                    block_table: &table,
                    want_logits: true,
                }],
                &mut cache,
            )?;
            pos += 1;
            last = out.into_iter().next().flatten();
        }
        Ok(out)
    }
}
