//! A human-readable summary of a model (`kvfleet model inspect`): architecture, size,
//! quantization mix, context, vocabulary and chat template.

use std::collections::BTreeMap;
use std::fmt;

use crate::chat::ChatTemplate;
use crate::config::ModelConfig;
use crate::gguf::{GgufFile, Value, ggml_type_name};
use crate::weights::Weights;

/// What a model is.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelInfo {
    /// `llama`, `qwen2`, `gemma3`, ...
    pub architecture: String,
    /// The name in the file's metadata, when present.
    pub name: Option<String>,
    /// `gguf` or `safetensors`.
    pub format: String,
    /// Total parameters.
    pub parameters: u64,
    /// Storage type → number of tensors, e.g. `{"Q4_1": 210, "F32": 61}`.
    pub quantization: BTreeMap<String, usize>,
    /// Context window.
    pub context_length: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Layers.
    pub layers: usize,
    /// Hidden size.
    pub hidden_size: usize,
    /// Query heads / KV heads.
    pub heads: (usize, usize),
    /// Elements per head.
    pub head_dim: usize,
    /// The chat template, when present.
    pub chat_template: Option<String>,
}

impl fmt::Display for ModelInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "architecture:   {}", self.architecture)?;
        if let Some(n) = &self.name {
            writeln!(f, "name:           {n}")?;
        }
        writeln!(f, "format:         {}", self.format)?;
        writeln!(
            f,
            "parameters:     {} ({:.1} M)",
            self.parameters,
            self.parameters as f64 / 1e6
        )?;
        let quant: Vec<String> = self
            .quantization
            .iter()
            .map(|(k, v)| format!("{k} ×{v}"))
            .collect();
        writeln!(f, "quantization:   {}", quant.join(", "))?;
        writeln!(f, "context length: {}", self.context_length)?;
        writeln!(f, "vocabulary:     {}", self.vocab_size)?;
        writeln!(
            f,
            "layers:         {} (hidden {}, heads {}/{} kv, head dim {})",
            self.layers, self.hidden_size, self.heads.0, self.heads.1, self.head_dim
        )?;
        match &self.chat_template {
            Some(t) => writeln!(f, "chat template:  yes ({} chars)", t.len()),
            None => writeln!(f, "chat template:  none"),
        }
    }
}

fn base(config: &ModelConfig, format: &str, chat: Option<&ChatTemplate>) -> ModelInfo {
    ModelInfo {
        architecture: config.architecture.name().to_string(),
        name: None,
        format: format.to_string(),
        parameters: 0,
        quantization: BTreeMap::new(),
        context_length: config.context_length,
        vocab_size: config.vocab_size,
        layers: config.num_layers,
        hidden_size: config.hidden_size,
        heads: (config.num_heads, config.num_kv_heads),
        head_dim: config.head_dim,
        chat_template: chat.map(|c| c.source().to_string()),
    }
}

pub(crate) fn from_gguf(
    file: &GgufFile,
    config: &ModelConfig,
    chat: Option<&ChatTemplate>,
) -> ModelInfo {
    let mut info = base(config, "gguf", chat);
    info.name = file
        .get("general.name")
        .and_then(Value::as_str)
        .map(str::to_string);
    for t in file.tensors.values() {
        info.parameters += t.shape.iter().product::<usize>() as u64;
        *info
            .quantization
            .entry(ggml_type_name(t.type_id))
            .or_default() += 1;
    }
    info
}

pub(crate) fn from_weights(
    weights: &Weights,
    config: &ModelConfig,
    format: &str,
    chat: Option<&ChatTemplate>,
) -> ModelInfo {
    let mut info = base(config, format, chat);
    if let Weights::Safetensors(s) = weights {
        for (shape, kind) in s.summary() {
            info.parameters += shape.iter().product::<usize>() as u64;
            *info.quantization.entry(kind).or_default() += 1;
        }
    }
    info
}
