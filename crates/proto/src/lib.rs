//! Types that every kvfleet component shares, and nothing that does IO.
//!
//! - [`api`]: the control plane's REST bodies (`/api/v1`), agent protocol included; OpenAPI
//!   schema derives behind the `openapi` feature.
//! - [`ids`]: node, GPU, worker, model and deployment ids as distinct types.
//! - [`hash`]: block hashing, the single definition of a shared prompt prefix.
//! - [`histogram`]: mergeable latency histograms with the fixed buckets every component shares.
//! - [`kv_event`]: the `Stored` / `Removed` / `Cleared` events that engines emit and routers index.
//! - [`kv_stream`]: the KV event pipeline's wire types (agent uploads, the control plane's
//!   sequenced stream and snapshots).
//! - [`request`]: sampling parameters and the KV layout two workers must share.
//! - [`fingerprint`]: the fleet CA's SHA-256 fingerprint, what agents and the CLI pin, and join tokens
//!   that carry it.
//! - [`frame`]: the versioned, length-prefixed, checksummed frame codec spoken between agents,
//!   workers and peers.
//! - [`peer`]: the messages of the peer transport (forwarded generate, KV block transfer).
//! - [`profile`]: performance profiles (prefill, decode and onboarding cost tables per worker
//!   class), the one format the router's cost, the planner and the KV tiers read.
//!
//! This crate must stay free of IO (no tokio, sockets, files or clocks): the router, the planner
//! and the simulator depend on it, and `tests/tests/invariants.rs` fails the build if it drifts.
//!
//! # Block hash known answers
//!
//! Seed [`hash::HASH_SEED`] = `0x6b76666c65657431`, tokens as little-endian `u32`. These vectors
//! are checked here (as a doctest) and in `hash::tests::known_answer_vectors`:
//!
//! ```
//! use kvfleet_proto::hash::*;
//! // The local hash of the empty block and of tokens 0, 1, 2, 3.
//! assert_eq!(local_block_hash(&[]).0, 0xadc2_1f2c_63e2_2871);
//! assert_eq!(local_block_hash(&[0, 1, 2, 3]).0, 0x13d2_a914_ba1a_bcc4);
//! // Tokens 0..8 in blocks of 4: seq[0] = local[0], seq[1] = xxh3(seq[0] ‖ local[1]).
//! let tokens: Vec<u32> = (0..8).collect();
//! let hashes = sequence_hashes(&tokens, BlockSize::new(4).unwrap());
//! assert_eq!(hashes, [SequenceHash(0x13d2_a914_ba1a_bcc4), SequenceHash(0x9554_8eab_7998_2cb5)]);
//! ```

pub mod api;
pub mod fingerprint;
pub mod frame;
pub mod hash;
pub mod histogram;
pub mod ids;
pub mod kv_event;
pub mod kv_stream;
pub mod peer;
pub mod profile;
pub mod request;

pub use fingerprint::{CaFingerprint, JoinTokenText};
pub use frame::{Frame, FrameCodec, FrameError, FrameKind, FrameReader};
pub use hash::{BlockHash, BlockSize, LocalBlockHash, SequenceHash};
pub use ids::{DeploymentId, GpuId, ModelId, NodeId, WorkerId};
pub use kv_event::{KvEvent, KvEventData, Tier};
pub use request::{Constraint, InvalidSampling, KvDtype, KvLayout, SamplingParams};
