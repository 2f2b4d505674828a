//! Workers: one engine per GPU (or CPU slot), each in its own OS process, so a fault kills one
//! worker and not the node.
//!
//! - [`protocol`]: the frames spoken over each worker's Unix socket.
//! - [`supervisor`]: the [`WorkerPool`]: starts, watches and restarts worker processes; routes
//!   requests to them (least-loaded or round-robin).
//! - [`process`]: the worker side (`kvfleet-agent worker --socket PATH`).
//! - [`engine`]: the stand-in mock engine the worker runs until `kvfleet-engine`'s mock engine
//!   is wired in.

pub mod engine;
pub mod process;
pub mod protocol;
pub mod supervisor;

pub use supervisor::{WorkerCommand, WorkerPool};
