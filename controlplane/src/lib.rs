//! The kvfleet control plane as a library; `main.rs` only parses arguments and calls in here.
//!
//! - [`store`]: the Postgres schema (migrations embedded from `migrations/`) and access to it.
//!
//! The REST API, agent protocol, placement, planner loop and node CA arrive with the
//! control-plane issue.

pub mod store;
