//! Shared helpers for the end-to-end and invariant tests in `tests/tests/*.rs`.
//!
//! - [`deps`]: walks `cargo metadata` to prove which crates a crate can reach.

pub mod deps;
