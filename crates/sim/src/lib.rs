//! The fleet simulator: replays a request trace on N mock-engine workers behind one KV-aware
//! router, in virtual time, and reports what each routing mode does to prefix reuse, latency
//! and load.
//!
//! - [`trace`]: the Mooncake JSONL trace format (typed errors with line numbers) and how a
//!   trace's hash ids become prompt tokens.
//! - [`sim`]: [`SimConfig`] and [`run`], the discrete-event loop that plays the agent's part:
//!   arrivals, routing, engine steps, KV events and load reports delivered after a delay.
//! - [`report`]: [`SimReport`] (serde JSON) and the Markdown table of a [`Comparison`].
//! - [`plot`]: the SVG of a comparison (and of a sweep), written by hand.
//! - [`workload`]: generators of multi-turn chat and agent-burst traffic, the stand-ins for real
//!   traffic, with knobs for sessions, turns, think time and rate.
//! - [`sweep`]: every mode on several fleet sizes at several multiples of the base rate.
//! - [`cli`]: [`SimArgs`] and [`cli_main`], the `kvfleet sim` command.
//! - [`shape`]: time-varying traces — a base trace replayed at a rate that follows a ramp, a
//!   day or a spike.
//! - [`planner`]: `kvfleet sim --planner`: the SLA planner (or Dynamo's algorithm, or a static
//!   fleet) sizing the fleet in virtual time, workers that take time to start and drain before
//!   they stop, speed errors against the profile, SLA attainment per interval, GPU-hours and a
//!   timeline SVG.
//!
//! Everything runs on one thread with no clock but the one measuring the run's wall time:
//! the same config and trace give the same report. It uses the engine (`kvfleet-engine`'s
//! [`MockEngine`](kvfleet_engine::MockEngine)) and the router (`kvfleet-kv-router`) exactly as
//! the agent does; nothing depends on this crate.
//!
//! ```
//! use kvfleet_sim::{SimConfig, run, trace::parse_trace};
//! use kvfleet_kv_router::RoutingMode;
//!
//! // Two requests sharing their first 512-token block, 100 ms apart.
//! let trace = parse_trace(
//!     "{\"timestamp\": 0, \"input_length\": 700, \"output_length\": 4, \"hash_ids\": [1, 2]}\n\
//!      {\"timestamp\": 100, \"input_length\": 600, \"output_length\": 4, \"hash_ids\": [1, 3]}\n"
//!         .as_bytes(),
//! )?;
//! let config = SimConfig { workers: 2, ..SimConfig::default() }.with_mode(RoutingMode::Kv);
//! let report = run(&config, &trace)?;
//! assert_eq!(report.completed, 2);
//! // The second request went where the first one's 512 tokens were cached.
//! assert_eq!(report.cached_tokens, 512);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod cli;
pub mod planner;
pub mod plot;
pub mod report;
pub mod shape;
pub mod sim;
pub mod stats;
pub mod sweep;
pub mod trace;
pub mod workload;

#[cfg(test)]
mod tests;

pub use cli::{SimArgs, cli_main, cli_run};
pub use report::{Comparison, SimReport, WorkerReport};
pub use sim::{SimConfig, SimError, run};
pub use trace::{TraceError, TraceRequest, load_trace, parse_trace};
