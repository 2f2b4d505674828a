//! External engines' KV event streams, translated into kvfleet's KV events.
//!
//! vLLM (`--kv-events-config`) and SGLang publish every block that enters or leaves their prefix
//! caches over ZeroMQ as msgpack batches, named by their own block hashes. kvfleet's routers key
//! on `kvfleet_proto::hash` sequence hashes, so an external worker's events are translated: the
//! token ids each `BlockStored` carries are re-hashed into kvfleet blocks (engine block sizes
//! other than kvfleet's included) and emitted as [`kvfleet_proto::kv_event::KvEvent`]s that the
//! agent feeds into the same pipeline as a native worker's.
//!
//! quinn-proto style: [`decode`] (bytes → typed batch, total, fuzzed) and [`translate`] (the
//! per-worker state machine: hashes, block sizes, sequence gaps and resyncs, counters) are pure;
//! [`driver`] is the thin tokio task that owns the sockets (SUB, and DEALER for the engine's
//! replay ROUTER) and hands events out on a bounded channel. [`encode`] writes batches the way
//! msgspec does, and [`publisher`] publishes them as vLLM's `ZmqEventPublisher` does (PUB and
//! replay ROUTER), for tests and the mock engine's vLLM mode.

pub mod decode;
pub mod driver;
pub mod encode;
pub mod publisher;
pub mod translate;

pub use decode::{DecodeError, EngineBlockHash, EngineEvent, EventBatch, decode_batch};
pub use driver::{Subscriber, SubscriberConfig, SubscriberError};
pub use translate::{Outcome, Output, Translator, TranslatorCounters};
