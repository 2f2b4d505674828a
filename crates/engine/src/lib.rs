//! The engine: what turns token ids into more token ids on one GPU or CPU slot.
//!
//! Filled by the engine-core issue (the `Engine` trait, the scheduler with continuous batching,
//! the paged KV block pool with prefix caching, the mock engine) and the native-model issue (the
//! candle transformer). Nothing is implemented yet; the crate exists so the workspace has its
//! final shape.
