//! The models this node serves, by name, and what the frontend needs of each: a [`TextCodec`]
//! (prompt text → token ids with the model's own tokenizer and chat template; token ids → bytes
//! for detokenization), the context length requests are checked against and the KV block size
//! prompts are hashed with.
//!
//! The [`ModelRegistry`] can change while the agent runs: the control-plane client registers a
//! model when its desired state names one and removes it when it goes away; in standalone mode
//! the config's `[[models]]` are registered once at start. Registering a native model reads its
//! file (tokenizer, chat template, architecture; not the weights, which live in the worker
//! processes), so [`ModelRegistry::register`] runs the load on the blocking pool.
//!
//! Two codecs: [`MockText`] for `engine = "mock"` (the byte-level test tokenizer and plain
//! template of [`super::text`]), and [`NativeText`] for `engine = "native"` (the model's BPE or
//! SentencePiece tokenizer and Jinja chat template from `kvfleet-model`, with a per-token byte
//! table so that streamed text goes through [`super::text::Utf8Stream`] like the mock's).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use kvfleet_model::grammar::{GrammarEngine, GrammarError};
use kvfleet_model::tokenizer::{PieceKind, TokenPiece};
use kvfleet_model::{ChatMessage, TextModel};
use kvfleet_proto::BlockSize;
use kvfleet_proto::Constraint;

use super::parsers::{MARKER_TOKENS, detect_reasoning, detect_tools};
use super::text::{ByteTokenizer, ChatTemplate, PlainChatTemplate, Tokenizer};
use crate::worker::{EngineKind, ModelConfig, ReasoningParserKind, ToolParserKind};

/// Text in and out for one model.
pub trait TextCodec: Send + Sync + std::fmt::Debug {
    /// Token ids of a completion prompt (with BOS when the model wants one).
    fn encode(&self, text: &str) -> Result<Vec<u32>, String>;
    /// Token ids of a conversation rendered with the model's chat template (with `tools` for a
    /// template that [renders them](TextCodec::renders_tools)), ending where the assistant's
    /// reply begins. Errors say why the template refused.
    fn chat(
        &self,
        messages: &[ChatMessage],
        tools: Option<&serde_json::Value>,
    ) -> Result<Vec<u32>, String>;
    /// Whether the chat template renders tool definitions and tool-call messages itself;
    /// otherwise the frontend writes them into the messages' text (`tools.rs`).
    fn renders_tools(&self) -> bool;
    /// The chat template's source, whose markers choose the tool-call and reasoning parsers
    /// when the config names none (`parsers.rs`); `None` without one.
    fn chat_template(&self) -> Option<&str>;
    /// The bytes a generated token stands for; empty for special tokens (EOS, end of turn).
    fn token_bytes(&self, token: u32) -> &[u8];
    /// Token ids are `0..vocab_size`.
    fn vocab_size(&self) -> u32;
    /// What tokenizes, for logs.
    fn describe(&self) -> String;
    /// Compiles `constraint` for this model's tokenizer (structured output), or says why it
    /// cannot be served: a bad grammar, or an engine that does not constrain its output.
    fn check_constraint(&self, constraint: &Constraint) -> Result<(), String>;
}

/// The mock engine's codec: one token per byte, a plain `<|role|>` template.
#[derive(Debug, Clone, Copy, Default)]
pub struct MockText;

/// `ByteTokenizer`'s pieces: byte `b` is token `b`.
static BYTES: [u8; 256] = {
    let mut table = [0u8; 256];
    let mut i = 0;
    while i < 256 {
        table[i] = i as u8;
        i += 1;
    }
    table
};

impl TextCodec for MockText {
    fn encode(&self, text: &str) -> Result<Vec<u32>, String> {
        Ok(ByteTokenizer.encode(text))
    }

    fn chat(
        &self,
        messages: &[ChatMessage],
        _tools: Option<&serde_json::Value>,
    ) -> Result<Vec<u32>, String> {
        let pairs: Vec<(&str, &str)> = messages
            .iter()
            .map(|m| (m.role.as_str(), m.content.as_str()))
            .collect();
        Ok(ByteTokenizer.encode(&PlainChatTemplate.render(&pairs)))
    }

    fn renders_tools(&self) -> bool {
        false
    }

    fn chat_template(&self) -> Option<&str> {
        None
    }

    fn token_bytes(&self, token: u32) -> &[u8] {
        match usize::try_from(token) {
            Ok(i) if i < 256 => &BYTES[i..=i],
            _ => &[],
        }
    }

    fn vocab_size(&self) -> u32 {
        ByteTokenizer.vocab_size()
    }

    fn describe(&self) -> String {
        "byte-level test tokenizer (mock)".into()
    }

    fn check_constraint(&self, _: &Constraint) -> Result<(), String> {
        Err("the mock engine makes pseudo-tokens and cannot constrain them: structured output              needs a real model (engine = \"native\")"
            .into())
    }
}

/// A real model's tokenizer and chat template.
pub struct NativeText {
    model: TextModel,
    /// The bytes of every token id; empty for special tokens.
    pieces: Vec<Box<[u8]>>,
    kind: PieceKind,
    /// The grammar compiler for this tokenizer, built by the first constrained request.
    grammar: std::sync::OnceLock<Result<GrammarEngine, GrammarError>>,
}

impl std::fmt::Debug for NativeText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NativeText")
            .field("vocab", &self.pieces.len())
            .field("kind", &self.kind)
            .finish()
    }
}

impl NativeText {
    /// The codec of a loaded [`TextModel`]: builds the byte table once.
    pub fn new(model: TextModel) -> Self {
        let (pieces, kind) = model.tokenizer.token_pieces();
        let pieces = pieces
            .into_iter()
            .map(|piece| match piece {
                TokenPiece::Bytes(bytes) => bytes,
                // The markers the output parsers read keep their text even where the
                // tokenizer calls them special (`[TOOL_CALLS]`, `<|python_tag|>`, …).
                TokenPiece::Special(name) if MARKER_TOKENS.contains(&name.as_str()) => {
                    name.into_bytes().into_boxed_slice()
                }
                TokenPiece::Special(_) => Box::default(),
            })
            .collect();
        Self {
            model,
            pieces,
            kind,
            grammar: std::sync::OnceLock::new(),
        }
    }

    /// The model's context window.
    pub fn context_length(&self) -> usize {
        self.model.config.context_length
    }
}

impl TextCodec for NativeText {
    fn encode(&self, text: &str) -> Result<Vec<u32>, String> {
        self.model.encode_prompt(text).map_err(|e| e.to_string())
    }

    fn chat(
        &self,
        messages: &[ChatMessage],
        tools: Option<&serde_json::Value>,
    ) -> Result<Vec<u32>, String> {
        self.model
            .chat_prompt_with_tools(messages, tools)
            .map(|(_, ids)| ids)
            .map_err(|e| e.to_string())
    }

    fn renders_tools(&self) -> bool {
        self.model
            .chat_template
            .as_ref()
            .is_some_and(|t| t.renders_tools())
    }

    fn chat_template(&self) -> Option<&str> {
        self.model.chat_template.as_ref().map(|t| t.source())
    }

    fn token_bytes(&self, token: u32) -> &[u8] {
        self.pieces.get(token as usize).map_or(&[], |p| p)
    }

    fn vocab_size(&self) -> u32 {
        u32::try_from(self.pieces.len()).unwrap_or(u32::MAX)
    }

    fn check_constraint(&self, constraint: &Constraint) -> Result<(), String> {
        let engine = self
            .grammar
            .get_or_init(|| GrammarEngine::new(&self.model.tokenizer));
        match engine {
            Ok(engine) => engine.matcher(constraint).map(drop),
            Err(e) => Err(e.clone()),
        }
        .map_err(|e| e.to_string())
    }

    fn describe(&self) -> String {
        let kind = match self.kind {
            PieceKind::ByteLevel => "byte-level BPE",
            PieceKind::SentencePiece => "SentencePiece",
        };
        format!(
            "{kind} tokenizer, {} tokens, {}",
            self.pieces.len(),
            if self.model.chat_template.is_some() {
                "chat template from the model"
            } else {
                "no chat template"
            }
        )
    }
}

/// One model the frontend serves.
#[derive(Debug)]
pub struct ServedModel {
    /// Its configuration (name, engine, limits).
    pub config: ModelConfig,
    /// Prompt plus completion tokens, at most: the configured value capped by the model's own
    /// window for a native model.
    pub context_length: u32,
    /// Tokens per KV block, for block hashing.
    pub block_size: BlockSize,
    /// Its tokenizer and chat template.
    pub text: Arc<dyn TextCodec>,
    /// The format its tool calls are parsed in: the config's `tool_parser`, or the one its
    /// chat template implies.
    pub tool_parser: ToolParserKind,
    /// How its reasoning is separated: the config's `reasoning_parser`, or as its chat
    /// template implies.
    pub reasoning_parser: ReasoningParserKind,
}

impl ServedModel {
    /// The model's name.
    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// Builds what the frontend needs for `config`. For a native model this reads the model
    /// file (blocking: seconds for a large GGUF); see [`ModelRegistry::register`].
    pub fn load(config: ModelConfig) -> Result<Self, RegistryError> {
        let (text, context_length): (Arc<dyn TextCodec>, u32) = match config.engine {
            EngineKind::Mock => (Arc::new(MockText), config.context_length),
            EngineKind::Native
            | EngineKind::LlamaCpp
            | EngineKind::OpenAi
            | EngineKind::Vllm
            | EngineKind::Sglang => {
                let path = config
                    .path
                    .clone()
                    .ok_or_else(|| RegistryError::NoPath(config.name.clone()))?;
                let model =
                    kvfleet_model::load_text(&path).map_err(|source| RegistryError::Load {
                        model: config.name.clone(),
                        path: path.clone(),
                        source: Box::new(source),
                    })?;
                let text = NativeText::new(model);
                let window = u32::try_from(text.context_length()).unwrap_or(u32::MAX);
                (Arc::new(text), config.context_length.min(window))
            }
        };
        let tool_parser = config
            .tool_parser
            .unwrap_or_else(|| detect_tools(text.chat_template()));
        let reasoning_parser = config
            .reasoning_parser
            .unwrap_or_else(|| detect_reasoning(text.chat_template()));
        Ok(Self {
            context_length,
            block_size: config.block_size,
            text,
            config,
            tool_parser,
            reasoning_parser,
        })
    }
}

/// Why a model could not be registered.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// A native model without a path.
    #[error("model {0:?}: engine \"native\" needs a path")]
    NoPath(String),
    /// Its tokenizer, chat template or architecture could not be read.
    #[error("model {model:?}: loading {}: {source}", path.display())]
    Load {
        /// The model.
        model: String,
        /// Its file.
        path: PathBuf,
        /// What failed (boxed: model errors are large).
        #[source]
        source: Box<kvfleet_model::ModelError>,
    },
    /// The blocking load task panicked or was cancelled.
    #[error("model {0:?}: the load task failed: {1}")]
    Task(String, String),
}

/// The models served, by name; shared by the frontend's handlers and whoever changes the set.
#[derive(Debug, Default)]
pub struct ModelRegistry {
    models: RwLock<BTreeMap<String, Arc<ServedModel>>>,
}

impl ModelRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Loads `config`'s tokenizer and template on the blocking pool and adds (or replaces) the
    /// model. Requests already running keep the entry they started with.
    pub async fn register(&self, config: ModelConfig) -> Result<Arc<ServedModel>, RegistryError> {
        let name = config.name.clone();
        let served = tokio::task::spawn_blocking(move || ServedModel::load(config))
            .await
            .map_err(|e| RegistryError::Task(name, e.to_string()))??;
        Ok(self.insert(served))
    }

    /// Adds (or replaces) an already loaded model.
    pub fn insert(&self, model: ServedModel) -> Arc<ServedModel> {
        let model = Arc::new(model);
        tracing::info!(model = model.name(), engine = ?model.config.engine,
            context_length = model.context_length, text = %model.text.describe(),
            tool_parser = ?model.tool_parser, reasoning_parser = ?model.reasoning_parser,
            "model registered");
        if let Ok(mut models) = self.models.write() {
            models.insert(model.config.name.clone(), model.clone());
        }
        model
    }

    /// Removes a model: new requests for it get 404; running ones finish.
    pub fn remove(&self, name: &str) -> Option<Arc<ServedModel>> {
        let removed = self.models.write().ok()?.remove(name);
        if removed.is_some() {
            tracing::info!(model = name, "model removed");
        }
        removed
    }

    /// The model called `name`.
    pub fn get(&self, name: &str) -> Option<Arc<ServedModel>> {
        self.models.read().ok()?.get(name).cloned()
    }

    /// Every model, by name.
    pub fn list(&self) -> Vec<Arc<ServedModel>> {
        self.models
            .read()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Every model's name, sorted.
    pub fn names(&self) -> Vec<String> {
        self.models
            .read()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tiny model's real (byte-level BPE) tokenizer: the pieces of a prompt's tokens spell
    /// the prompt's bytes exactly (multi-byte characters split across tokens included), and
    /// special tokens spell nothing.
    #[test]
    fn native_pieces_spell_the_encoded_text() {
        let dir = std::env::temp_dir().join(format!("kvfleet-agent-pieces-{}", std::process::id()));
        kvfleet_model::tiny::write_tiny_llama(&dir, kvfleet_model::tiny::TinySpec::default(), 1)
            .unwrap();
        let text = NativeText::new(kvfleet_model::load_text(&dir).unwrap());
        assert_eq!(text.kind, PieceKind::ByteLevel);
        for s in [
            "the cat sat on the mat",
            "héllo wörld €5 😀\n\tok",
            "  two  spaces",
        ] {
            let ids = text.encode(s).unwrap();
            let bytes: Vec<u8> = ids
                .iter()
                .flat_map(|&t| text.token_bytes(t).to_vec())
                .collect();
            assert_eq!(String::from_utf8(bytes).unwrap(), s);
        }
        let chat = text.chat(&[ChatMessage::new("user", "hi")], None).unwrap();
        let spelled: Vec<u8> = chat
            .iter()
            .flat_map(|&t| text.token_bytes(t).to_vec())
            .collect();
        // `<|im_start|>` and `<|im_end|>` are special: only the text between them remains.
        assert_eq!(String::from_utf8(spelled).unwrap(), "user\nhi\nassistant\n");
        assert_eq!(text.token_bytes(u32::MAX), b"");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The same on the real models' tokenizers: SmolLM2 (byte-level BPE from GGUF) and Gemma 3
    /// (SentencePiece with byte fallback from GGUF), when their files are named.
    #[test]
    fn real_tokenizer_pieces_spell_the_encoded_text() {
        let cases = [
            ("KVFLEET_SMOLLM2_GGUF", PieceKind::ByteLevel),
            ("KVFLEET_GEMMA3_GGUF", PieceKind::SentencePiece),
        ];
        for (var, kind) in cases {
            let Ok(path) = std::env::var(var) else {
                eprintln!("SKIPPED ({var} is not set): the real tokenizer's byte pieces");
                continue;
            };
            let text =
                NativeText::new(kvfleet_model::load_text(std::path::Path::new(&path)).unwrap());
            assert_eq!(text.kind, kind, "{var}");
            for s in [
                "The capital of France is Paris.",
                "héllo wörld €5 😀 日本語\n\tok  two  spaces",
            ] {
                let ids = text.encode(s).unwrap();
                let bytes: Vec<u8> = ids
                    .iter()
                    .flat_map(|&t| text.token_bytes(t).to_vec())
                    .collect();
                assert_eq!(String::from_utf8(bytes).unwrap(), s, "{var}");
            }
        }
    }
}
