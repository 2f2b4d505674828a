//! Shared helpers for the end-to-end and invariant tests in `tests/tests/*.rs`.
//!
//! - [`deps`]: walks `cargo metadata` to prove which crates a crate can reach.
//! - [`modules`]: the graph of references between a crate's top-level modules, and its cycles.

pub mod deps;
pub mod modules;
