//! The one error type of this crate. Every variant names what was wrong (the file, the tensor,
//! the metadata key, the limit) so that an operator can act on the message alone; callers branch
//! on the variant (e.g. `PromptTooLong` → HTTP 400, `Io` → the model is not installed).

use std::path::PathBuf;

/// What went wrong while loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// Reading a file failed.
    #[error("reading {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is not a well-formed GGUF/safetensors/JSON file (truncated, corrupt, wrong magic).
    #[error("{path}: corrupt or truncated {format} file: {detail}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// "GGUF", "safetensors", "config.json", ...
        format: &'static str,
        /// What exactly is wrong.
        detail: String,
    },
    /// A required metadata key or config field is missing or has the wrong type.
    #[error("model metadata `{key}`: {detail}")]
    Metadata {
        /// The key, e.g. `llama.block_count` or `num_hidden_layers`.
        key: String,
        /// What is wrong with it.
        detail: String,
    },
    /// The model's architecture is not one this crate implements.
    #[error("unsupported architecture `{0}` (supported: llama, mistral, qwen2, qwen3, gemma3)")]
    UnsupportedArchitecture(String),
    /// A tensor is stored in a quantization or dtype we cannot compute with.
    #[error("tensor `{tensor}` has unsupported type {kind}")]
    UnsupportedQuant {
        /// The tensor name.
        tensor: String,
        /// The type, as named in the file.
        kind: String,
    },
    /// A tensor the architecture needs is absent.
    #[error("missing tensor `{0}`")]
    MissingTensor(String),
    /// A tensor's shape disagrees with the configuration.
    #[error("tensor `{tensor}` has shape {actual:?}, expected {expected:?}")]
    BadShape {
        /// The tensor name.
        tensor: String,
        /// The shape found.
        actual: Vec<usize>,
        /// The shape the configuration implies.
        expected: Vec<usize>,
    },
    /// The tokenizer could not be built or failed on input.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The chat template failed to parse or render.
    #[error("chat template: {0}")]
    ChatTemplate(String),
    /// A prompt (or prompt plus generated tokens) exceeds the model's context window.
    #[error("sequence of {tokens} tokens exceeds the model's context length of {context}")]
    PromptTooLong {
        /// Tokens in the sequence after this step.
        tokens: usize,
        /// The model's context length.
        context: usize,
    },
    /// A token id is outside the vocabulary.
    #[error("token id {id} is outside the vocabulary of {vocab} tokens")]
    BadToken {
        /// The token id.
        id: u32,
        /// The vocabulary size.
        vocab: usize,
    },
    /// A forward-pass input is inconsistent (block table too short, bad block id, ...).
    #[error("invalid batch input: {0}")]
    BadInput(String),
    /// KV bytes do not match the cache's layout.
    #[error("KV block transfer: {0}")]
    KvTransfer(String),
    /// The kernels asked for (`KVFLEET_KERNELS`) are unknown or cannot run on this CPU.
    #[error("KVFLEET_KERNELS: {0}")]
    Kernels(#[from] crate::kernels::KernelChoiceError),
    /// An error inside candle (should not happen for validated input; reported, never panicked).
    #[error("tensor computation: {0}")]
    Candle(#[from] candle_core::Error),
}

/// Shorthand for this crate's results.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;
