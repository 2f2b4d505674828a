//! The lower KV tiers below the engine's own pool (G1): G2 host memory and G3 local disk.
//!
//! - [`book`]: [`TierBook`], the pure policy core: what each tier holds (LRU within a byte
//!   budget), what enters ([`Admission`]), where evictions go, the KV events (with their tier)
//!   and the counters ([`TierStats`]).
//! - [`disk`]: G3's checksummed block files and their directory, which is also the index a
//!   restarted worker rebuilds and announces.
//! - [`store`]: [`TierStore`], the IO layer: host memory's bytes, the disk writer thread behind a
//!   bounded queue (the step loop never waits on a disk write), checked reads at onboarding.
//!
//! The scheduler drives it: blocks evicted from G1 are offloaded at the step that evicts them,
//! and at admission the longest prefix found G1 → G2 → G3 is onboarded before the rest is
//! computed. A block that fails its checksum, is truncated or belongs to another layout is
//! dropped, counted and recomputed: never a failed request. Blocks are keyed by sequence hash
//! within one layout (the disk directory is per layout fingerprint, and every file names it).
//!
//! With [`TierStorage::Modelled`] (the simulator) only the book runs: capacities and hits are
//! real, bytes and their copy times are modelled (the mock executor charges onboarding from
//! its performance profile's `tiers` table).

pub mod book;
pub mod disk;
mod store;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use book::{Admission, Fault, TierBook, TierCounters, TierStats};
pub use store::TierStore;

/// Where the lower tiers' bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TierStorage {
    /// In host memory and files: real engines.
    #[default]
    Stored,
    /// Nowhere: only which blocks each tier would hold is tracked (the simulator's mocks).
    Modelled,
}

/// The default G3 directory.
pub const DEFAULT_DISK_DIR: &str = "/var/cache/kvfleet/kv";

/// The lower tiers of one engine. All off by default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TierConfig {
    /// G2: bytes of host memory for blocks evicted from G1; 0 turns G2 off.
    pub host_bytes: u64,
    /// G3: bytes of local disk; 0 turns G3 off.
    pub disk_bytes: u64,
    /// G3's directory; each KV layout gets a subdirectory named by its fingerprint.
    pub disk_dir: PathBuf,
    /// Which evicted blocks enter the lower tiers.
    pub admission: Admission,
    /// Most blocks waiting for the disk writer; a write beyond it is refused and counted.
    pub write_queue_blocks: usize,
    /// Real bytes, or capacities only (simulation).
    pub storage: TierStorage,
}

impl Default for TierConfig {
    fn default() -> Self {
        Self {
            host_bytes: 0,
            disk_bytes: 0,
            disk_dir: PathBuf::from(DEFAULT_DISK_DIR),
            admission: Admission::All,
            write_queue_blocks: 64,
            storage: TierStorage::Stored,
        }
    }
}

impl TierConfig {
    /// Whether any lower tier is on.
    pub fn enabled(&self) -> bool {
        self.host_bytes > 0 || self.disk_bytes > 0
    }
}

/// The tiers could not be opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TierError {
    /// The disk tier's directory is unusable.
    #[error(
        "KV disk tier at {path}: {message} (check that the directory exists and is writable by the agent, or set a smaller or zero disk budget)"
    )]
    Io {
        /// The directory.
        path: PathBuf,
        /// What failed.
        message: String,
    },
}
