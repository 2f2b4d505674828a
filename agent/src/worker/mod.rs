//! Workers: one engine per GPU (or CPU slot), each in its own OS process, so a fault kills one
//! worker and not the node.
//!
//! - [`protocol`]: the frames spoken over each worker's Unix socket (JSON, and binary KV block
//!   frames for disaggregated serving).
//! - [`supervisor`]: the [`WorkerPool`]: routes requests to the workers (least-loaded or
//!   round-robin, or the worker a request names), streams a prefill's exported KV blocks back
//!   and sends attached blocks with a request; its `lifecycle` child supervises each worker's
//!   process (start, connect, read frames, stop, restart with backoff).
//! - [`process`]: the worker side (`kvfleet-agent worker --socket PATH`).
//! - [`external`]: the worker side when the engine is an external server (`llamacpp`,
//!   `openai`): it supervises the server and speaks its HTTP API instead of [`engine`].
//! - [`engine`]: the worker's engine adapter: `kvfleet-engine`'s scheduler over the mock or the
//!   native executor, request bookkeeping, KV export after each step and attached-KV import.

mod config;
pub mod engine;
pub mod external;
mod formats;
pub mod process;
pub mod protocol;
pub mod supervisor;

pub use config::{
    DEFAULT_EXTERNAL_CONTEXT, DEFAULT_EXTERNAL_SLOTS, DEFAULT_NATIVE_KV_MEMORY, Device, EngineKind,
    ExternalEngine, ModelConfig, NATIVE_CONTEXT_UNCAPPED, RoutingMode, SupervisorConfig,
    WorkerConfig,
};
pub use formats::{ReasoningParserKind, ToolParserKind};
pub use supervisor::{KvTransferCounters, WorkerCommand, WorkerPool};
