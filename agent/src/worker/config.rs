//! What this node's workers run and how they are supervised: the models (`[[models]]`), the
//! workers (`[[workers]]`), their supervision (`[supervisor]`) and how the pool picks among them
//! (`[routing] mode`).

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use kvfleet_engine::TierConfig;
use kvfleet_model::KvBudget;
use kvfleet_proto::BlockSize;
use kvfleet_proto::api::WorkerRole;

use super::formats::{ReasoningParserKind, ToolParserKind};

/// Worker selection among the node's own workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoutingMode {
    /// The ready worker with the fewest outstanding requests.
    LeastLoaded,
    /// Ready workers in turn.
    RoundRobin,
}

/// What computes tokens in a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineKind {
    /// Pseudo-tokens with a timing model: no weights, no GPU. See `worker::engine`.
    Mock,
    /// The real model (`kvfleet-model`) from [`ModelConfig::path`]: its tokenizer and chat
    /// template in the frontend, its weights in each worker process.
    Native,
    /// llama.cpp's own `llama-server`, started and supervised by each worker process (see
    /// `worker::external`); the frontend loads the tokenizer and chat template from
    /// [`ModelConfig::path`] as for `Native`.
    LlamaCpp,
    /// Any OpenAI-compatible server at a command line the operator gives
    /// ([`ExternalEngine`]); tokenizer and chat template from [`ModelConfig::path`].
    OpenAi,
    /// vLLM: the `OpenAi` adapter, plus its KV event stream (`--kv-events-config`) translated
    /// into exact KV events where [`ExternalEngine::kv_events`] is set.
    Vllm,
    /// SGLang: as [`EngineKind::Vllm`] (`--kv-events-config` too).
    Sglang,
}

impl EngineKind {
    /// The word the config file and logs use.
    pub fn name(self) -> &'static str {
        match self {
            EngineKind::Mock => "mock",
            EngineKind::Native => "native",
            EngineKind::LlamaCpp => "llamacpp",
            EngineKind::OpenAi => "openai",
            EngineKind::Vllm => "vllm",
            EngineKind::Sglang => "sglang",
        }
    }

    /// Whether the model's tokenizer (and for a native model, its weights) come from
    /// [`ModelConfig::path`].
    pub fn has_model_file(self) -> bool {
        !matches!(self, EngineKind::Mock)
    }
}

/// How a worker starts an external engine's server (`engine = "llamacpp"` or `"openai"`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExternalEngine {
    /// The program: `llama-server` (found on PATH) unless the config names one.
    pub command: String,
    /// llamacpp: arguments appended after the worker's own (`-m PATH --port N --host
    /// 127.0.0.1 -np SLOTS -c SLOTS×CONTEXT --metrics`). openai: the whole argument list, with
    /// `{port}` and `{model}` replaced by the worker's port and the model's path.
    pub args: Vec<String>,
    /// Requests the server runs at once (llama-server's `-np`); the rest wait in its queue.
    pub slots: u32,
    /// The approximate KV record's time to live: a prefix not reused for this long is
    /// assumed evicted by the server.
    pub kv_ttl: Duration,
    /// vllm/sglang: the engine's KV event PUB endpoint (`tcp://127.0.0.1:{kv_port}`: the
    /// worker picks `{kv_port}` and puts it into `args` too). Unset: approximate KV events.
    pub kv_events: Option<String>,
    /// vllm/sglang: the engine's replay ROUTER endpoint (`{kv_replay_port}` likewise), where
    /// its `--kv-events-config` has a `replay_endpoint`.
    pub kv_events_replay: Option<String>,
}

/// The default llama-server slots per worker.
pub const DEFAULT_EXTERNAL_SLOTS: u32 = 4;
/// An external model's context when the config gives none: per slot.
pub const DEFAULT_EXTERNAL_CONTEXT: u32 = 4096;

impl ExternalEngine {
    /// `llama-server` on PATH, [`DEFAULT_EXTERNAL_SLOTS`] slots, a 10-minute KV TTL.
    pub fn llama_server() -> Self {
        Self {
            command: "llama-server".into(),
            args: Vec::new(),
            slots: DEFAULT_EXTERNAL_SLOTS,
            kv_ttl: Duration::from_secs(600),
            kv_events: None,
            kv_events_replay: None,
        }
    }
}

/// The default KV budget of a native model's worker: a tenth of the memory available once the
/// weights are loaded (the CPU counterpart of a GPU's free memory).
pub const DEFAULT_NATIVE_KV_MEMORY: KvBudget = KvBudget::FractionOfAvailable(0.10);
/// A native model's context cap when the file gives none: larger than any model's window, so
/// the model's own window applies.
pub const NATIVE_CONTEXT_UNCAPPED: u32 = 1 << 24;

/// One model this node serves.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// The name clients put in `"model"`.
    pub name: String,
    /// What runs it.
    pub engine: EngineKind,
    /// Prompt plus completion tokens, at most.
    pub context_length: u32,
    /// Tokens per KV block (for block hashing and KV accounting).
    pub block_size: BlockSize,
    /// KV blocks each worker's pool holds (the mock; a native model uses `kv_memory`).
    pub kv_blocks: u32,
    /// Native engine: the model, a `.gguf` file or a Hugging Face directory (relative paths in
    /// the file are resolved against the file's directory). `None` for the mock.
    pub path: Option<PathBuf>,
    /// Native engine: memory for each worker's KV cache (`kv_memory = "512MiB"`, `"10%"`, or
    /// `kv_blocks = N`); `None` for the mock.
    pub kv_memory: Option<KvBudget>,
    /// Mock engine: time per generated token (zero: as fast as the loop runs).
    pub mock_token_time: Duration,
    /// Mock engine: time to prefill one prompt token.
    pub mock_prefill_time_per_token: Duration,
    /// External engines (`llamacpp`, `openai`): how the server is started.
    pub external: Option<ExternalEngine>,
    /// Mock engine: the head dimension of its KV layout (one layer, one KV head, K and V in
    /// f16), so the bytes a disaggregated transfer moves per block (`4 × block_size × this`);
    /// 1 by default (tiny blocks that move in microseconds).
    pub mock_kv_head_dim: u32,
    /// The format the model writes tool calls in (`tool_parser`); `None`: chosen from the
    /// markers its chat template contains (Hermes when it names none).
    pub tool_parser: Option<ToolParserKind>,
    /// How the model marks its reasoning (`reasoning_parser`); `None`: chosen from the chat
    /// template (a template that writes `<think>` gets it separated).
    pub reasoning_parser: Option<ReasoningParserKind>,
}

/// Where a worker runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    /// A CPU slot.
    Cpu,
    /// The GPU with this NVML index.
    Gpu(u32),
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Gpu(index) => write!(f, "gpu:{index}"),
        }
    }
}

/// One worker the config asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerConfig {
    /// The model's name (one of [`Config::models`]).
    pub model: String,
    /// Where it runs.
    pub device: Device,
    /// What it does.
    pub role: WorkerRole,
}

/// Worker process supervision.
#[derive(Debug, Clone, PartialEq)]
pub struct SupervisorConfig {
    /// Directory for the workers' Unix sockets.
    pub socket_dir: PathBuf,
    /// First restart delay after a worker fails.
    pub restart_backoff_initial: Duration,
    /// Restart delays double up to this.
    pub restart_backoff_max: Duration,
    /// A worker that has not said hello within this is killed and restarted.
    pub start_timeout: Duration,
    /// The lower KV tiers of every worker (`[kv_tiers]`): budgets per worker; each worker's
    /// disk tier lives in `disk_dir/worker-<id>`, so a restarted worker finds its own blocks.
    pub kv_tiers: TierConfig,
    /// The fleet's hash key, shared with the frontend and the serving layer (a clone of this
    /// config shares the handle): each worker is spawned with the secret set at that time.
    pub fleet_hasher: crate::fleet_hash::FleetHasher,
}

impl ModelConfig {
    /// A mock model with defaults: zero cost per token, 4096 tokens of context.
    pub fn mock(name: &str) -> Self {
        Self {
            name: name.into(),
            engine: EngineKind::Mock,
            context_length: 4096,
            block_size: BlockSize::default(),
            kv_blocks: 4096,
            mock_token_time: Duration::ZERO,
            mock_prefill_time_per_token: Duration::ZERO,
            mock_kv_head_dim: 1,
            path: None,
            kv_memory: None,
            external: None,
            tool_parser: None,
            reasoning_parser: None,
        }
    }

    /// A native model at `path` with defaults: the model's own context window, blocks of
    /// 16 tokens, [`DEFAULT_NATIVE_KV_MEMORY`] for the KV cache.
    pub fn native(name: &str, path: impl Into<PathBuf>) -> Self {
        Self {
            engine: EngineKind::Native,
            context_length: NATIVE_CONTEXT_UNCAPPED,
            path: Some(path.into()),
            kv_memory: Some(DEFAULT_NATIVE_KV_MEMORY),
            ..Self::mock(name)
        }
    }

    /// A model served by llama.cpp's `llama-server` from the GGUF at `path`, with defaults:
    /// [`ExternalEngine::llama_server`], [`DEFAULT_EXTERNAL_CONTEXT`] tokens per slot.
    pub fn llamacpp(name: &str, path: impl Into<PathBuf>) -> Self {
        Self {
            engine: EngineKind::LlamaCpp,
            context_length: DEFAULT_EXTERNAL_CONTEXT,
            path: Some(path.into()),
            external: Some(ExternalEngine::llama_server()),
            ..Self::mock(name)
        }
    }
}

impl Default for SupervisorConfig {
    fn default() -> Self {
        Self {
            socket_dir: std::env::temp_dir().join("kvfleet-agent"),
            restart_backoff_initial: Duration::from_millis(500),
            restart_backoff_max: Duration::from_secs(30),
            start_timeout: Duration::from_secs(60),
            kv_tiers: TierConfig::default(),
            fleet_hasher: Default::default(),
        }
    }
}
