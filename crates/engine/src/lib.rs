//! The engine: what turns token ids into more token ids on one GPU or CPU slot.
//!
//! - [`engine`]: the [`Engine`] trait (submit, cancel, step, token outputs, KV events, KV
//!   export/import — whole prefixes, or incrementally from a block index while a prefill runs —
//!   metrics) and its request, output and error types.
//! - [`scheduler`]: [`Scheduler`], the one scheduler core every engine uses: continuous
//!   batching with chunked prefill, preemption by recompute, generic over an [`Executor`].
//! - [`block_pool`]: the paged KV block pool with prefix caching (sequence hash → block,
//!   reference counts, LRU eviction), which emits the `Stored`/`Removed`/`Cleared` events.
//! - [`executor`]: the [`Executor`] trait between the scheduler and the compute.
//! - [`mock`]: [`MockExecutor`] and [`MockProfile`]: pseudo-tokens and a timing model, so fleets
//!   of mock engines run on one machine in real or virtual time.
//! - [`config`]: [`SchedulerConfig`] and the KV pool's [`PoolSizing`].
//! - [`tiers`]: the lower KV tiers (G2 host memory, G3 local disk) that take what the pool
//!   evicts and give it back at admission: [`TierStore`] over the pure [`TierBook`].
//!
//! The core is synchronous and never reads a clock: callers pass time as a [`Duration`](std::time::Duration) since
//! an epoch they choose. Async drivers (the agent) and virtual-time drivers (the simulator) wrap
//! it. Block hashing is `kvfleet_proto::hash`, the one implementation.
//!
//! # How to use
//!
//! ```
//! use std::time::Duration;
//! use kvfleet_engine::{Engine, EngineOutput, MockEngine, MockExecutor, MockProfile, Request,
//!     SchedulerConfig, PoolSizing, expected_output};
//! use kvfleet_proto::SamplingParams;
//!
//! let profile = MockProfile::default_8b_h100();
//! let config = SchedulerConfig { kv_memory: PoolSizing::Blocks(1024), ..Default::default() };
//! let mut engine = MockEngine::new(config, MockExecutor::new(profile.clone())).unwrap();
//!
//! let prompt: Vec<u32> = (0..100).collect();
//! let id = engine.submit(Request::new(prompt.clone(), SamplingParams::greedy(8)), Duration::ZERO)
//!     .unwrap();
//! // Virtual time: jump from event to event until the engine is idle.
//! let mut tokens = Vec::new();
//! while let Some(t) = engine.next_event_time() {
//!     engine.step_until(t).unwrap();
//!     for out in engine.drain_outputs() {
//!         if let EngineOutput::Token(tok) = out {
//!             assert_eq!(tok.request, id);
//!             tokens.push(tok.token);
//!         }
//!     }
//! }
//! assert_eq!(tokens, expected_output(&prompt, 8, profile.vocab_size));
//! // The prompt's 6 full blocks entered the prefix cache: one `Stored` event.
//! assert_eq!(engine.drain_events().len(), 1);
//! assert_eq!(engine.metrics().finished, 1);
//! ```

pub mod block_pool;
pub mod config;
pub mod engine;
pub mod executor;
mod fast_hash;
pub mod mock;
pub mod scheduler;
pub mod tiers;

#[cfg(test)]
mod tests;

pub use block_pool::{BlockId, BlockPool, Evicted, Origin, PoolExhausted, PoolUsage};
pub use config::{ConfigError, PoolSizing, SchedulerConfig};
pub use engine::{
    Engine, EngineMetrics, EngineOutput, ExportError, Finish, FinishReason, ImportError,
    ImportReport, KvExport, Request, RequestStats, SubmitError, TokenOutput,
};
pub use executor::{
    ExecError, Executor, RequestId, ScheduledBatch, ScheduledSeq, StepOutput, StepResult,
};
pub use mock::{
    DEFAULT_PERF_PROFILE_TOML, DecodeModel, FitError, MockEngine, MockExecutor, MockProfile,
    ProfileError, Quadratic, expected_output, prompt_digest, pseudo_token,
};
pub use scheduler::Scheduler;
pub use tiers::{
    Admission, TierBook, TierConfig, TierCounters, TierError, TierStats, TierStorage, TierStore,
};
