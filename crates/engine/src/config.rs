//! Scheduler configuration, parsed once into typed values, and the sizing of the KV pool.

use std::time::Duration;

use kvfleet_proto::WorkerId;

use crate::tiers::{TierConfig, TierError};
use serde::{Deserialize, Serialize};

/// How much memory the KV block pool gets.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PoolSizing {
    /// Exactly this many blocks (tests, simulations).
    Blocks(u32),
    /// As many blocks as fit in this many bytes.
    Bytes(u64),
    /// A fraction of the device memory that is free once the weights are loaded (what vLLM
    /// calls `gpu_memory_utilization`, applied to free rather than total memory). The caller
    /// measures `free_bytes` (NVML, or the host's available memory for CPU slots).
    FractionOfFree {
        /// In (0, 1].
        fraction: f64,
        /// Free device memory, in bytes.
        free_bytes: u64,
    },
}

impl PoolSizing {
    /// The number of blocks of `block_bytes` bytes this sizing allows.
    pub fn blocks(&self, block_bytes: u64) -> Result<u32, ConfigError> {
        if block_bytes == 0 {
            return Err(ConfigError::ZeroBlockBytes);
        }
        let blocks = match *self {
            PoolSizing::Blocks(n) => u64::from(n),
            PoolSizing::Bytes(bytes) => bytes / block_bytes,
            PoolSizing::FractionOfFree {
                fraction,
                free_bytes,
            } => {
                if !(fraction > 0.0 && fraction <= 1.0) {
                    return Err(ConfigError::Fraction(fraction));
                }
                // f64 is exact up to 2^53 bytes (8 PiB): enough for any device.
                ((free_bytes as f64 * fraction) as u64) / block_bytes
            }
        };
        if blocks == 0 {
            return Err(ConfigError::EmptyPool {
                sizing: *self,
                block_bytes,
            });
        }
        // Block ids are u32 and u32::MAX is reserved as the "no block" marker.
        u32::try_from(blocks)
            .ok()
            .filter(|&b| b < u32::MAX)
            .ok_or(ConfigError::TooManyBlocks(blocks))
    }
}

/// Limits and knobs of one scheduler. Defaults follow vLLM's for a single GPU.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SchedulerConfig {
    /// The worker id stamped on every KV event.
    pub worker: WorkerId,
    /// Most sequences in one batch (running at once).
    pub max_num_seqs: usize,
    /// Most tokens processed in one step (prefill chunks plus decode tokens).
    pub max_batched_tokens: usize,
    /// Longest sequence (prompt plus output) accepted.
    pub max_model_len: usize,
    /// Most requests waiting for admission; beyond it `submit` answers `Overloaded`.
    pub max_waiting: usize,
    /// Split long prompts into chunks of at most the remaining token budget. When off, a prompt
    /// is admitted only when it fits in one step, and longer prompts are rejected at submit.
    pub chunked_prefill: bool,
    /// Reuse the KV of shared prompt prefixes. When off, nothing enters the prefix cache (no
    /// `Stored` events), every prompt is computed in full, and imports are refused.
    pub enable_prefix_caching: bool,
    /// Memory for the KV block pool.
    pub kv_memory: PoolSizing,
    /// Tokens that end generation unless the request sets `ignore_eos` (the model's EOS).
    pub eos_token_ids: Vec<u32>,
    /// Most KV events kept for the caller; beyond it the oldest are dropped (consumers see the
    /// gap in event ids and re-sync, which is what they do after any loss).
    pub max_pending_events: usize,
    /// Span of the sliding window behind the tokens-per-second metrics.
    pub metrics_window: Duration,
    /// How to read the `until` given to `step_until`. Off (virtual time, the simulator): steps
    /// run back to back, each starting when the previous one ended, however late the caller
    /// is. On (real time: `until` is the wall clock now): a step that starts during a call
    /// starts at `until`, so a late driver shows up as latency, as it would on real hardware,
    /// and a measuring executor's timestamps do not drift behind the wall clock.
    pub realtime: bool,
    /// The lower KV tiers (G2 host memory, G3 local disk) that take what the pool evicts; off
    /// by default.
    pub tiers: TierConfig,
    /// The fleet's block hasher (its secret key, if any; `proto::hash`): every prompt's hashes
    /// are computed with it, salted with the request's `cache_salt`. Not configuration a file
    /// sets: the agent hands it to the worker (the key is a secret, never serialized).
    #[serde(skip)]
    pub block_hasher: kvfleet_proto::hash::BlockHasher,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            worker: WorkerId(0),
            max_num_seqs: 256,
            max_batched_tokens: 8192,
            max_model_len: 32768,
            max_waiting: 4096,
            chunked_prefill: true,
            enable_prefix_caching: true,
            kv_memory: PoolSizing::Blocks(4096),
            eos_token_ids: Vec::new(),
            max_pending_events: 65536,
            metrics_window: Duration::from_secs(5),
            realtime: false,
            tiers: TierConfig::default(),
            block_hasher: kvfleet_proto::hash::BlockHasher::UNKEYED,
        }
    }
}

impl SchedulerConfig {
    /// Checks the limits that would make a scheduler useless or stuck.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let positive = [
            ("max_num_seqs", self.max_num_seqs),
            ("max_batched_tokens", self.max_batched_tokens),
            ("max_model_len", self.max_model_len),
            ("max_waiting", self.max_waiting),
            ("max_pending_events", self.max_pending_events),
        ];
        for (field, value) in positive {
            if value == 0 {
                return Err(ConfigError::Zero(field));
            }
        }
        if self.metrics_window.is_zero() {
            return Err(ConfigError::Zero("metrics_window"));
        }
        Ok(())
    }
}

/// A configuration that cannot work.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    /// A limit that must be positive is zero.
    #[error("{0} must be at least 1")]
    Zero(&'static str),
    /// The executor reports zero-byte blocks.
    #[error("the executor's KV layout has zero bytes per block")]
    ZeroBlockBytes,
    /// The memory fraction is outside (0, 1].
    #[error("KV memory fraction {0} must be greater than 0 and at most 1")]
    Fraction(f64),
    /// The memory budget does not hold a single block.
    #[error("KV memory {sizing:?} holds no block of {block_bytes} bytes")]
    EmptyPool {
        /// The sizing asked for.
        sizing: PoolSizing,
        /// Bytes per block.
        block_bytes: u64,
    },
    /// More blocks than a u32 block id can name.
    #[error("KV memory holds {0} blocks; at most 4294967294 are supported")]
    TooManyBlocks(u64),
    /// The lower KV tiers could not be opened.
    #[error(transparent)]
    Tiers(#[from] TierError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_sizing_table() {
        let cases: Vec<(PoolSizing, u64, Result<u32, ConfigError>)> = vec![
            (PoolSizing::Blocks(10), 1 << 20, Ok(10)),
            (PoolSizing::Bytes(10 << 20), 1 << 20, Ok(10)),
            (PoolSizing::Bytes((10 << 20) + 5), 1 << 20, Ok(10)),
            (
                PoolSizing::FractionOfFree {
                    fraction: 0.5,
                    free_bytes: 20 << 20,
                },
                1 << 20,
                Ok(10),
            ),
            (
                PoolSizing::FractionOfFree {
                    fraction: 1.5,
                    free_bytes: 20 << 20,
                },
                1 << 20,
                Err(ConfigError::Fraction(1.5)),
            ),
            (
                PoolSizing::Bytes(100),
                1 << 20,
                Err(ConfigError::EmptyPool {
                    sizing: PoolSizing::Bytes(100),
                    block_bytes: 1 << 20,
                }),
            ),
            (PoolSizing::Blocks(1), 0, Err(ConfigError::ZeroBlockBytes)),
            (
                PoolSizing::Bytes(u64::MAX),
                1,
                Err(ConfigError::TooManyBlocks(u64::MAX)),
            ),
        ];
        for (sizing, block_bytes, expected) in cases {
            assert_eq!(sizing.blocks(block_bytes), expected, "{sizing:?}");
        }
    }

    #[test]
    fn zero_limits_are_rejected() {
        assert!(SchedulerConfig::default().validate().is_ok());
        let bad = SchedulerConfig {
            max_batched_tokens: 0,
            ..SchedulerConfig::default()
        };
        assert_eq!(bad.validate(), Err(ConfigError::Zero("max_batched_tokens")));
    }

    #[test]
    fn config_parses_from_toml_with_defaults() {
        let config: SchedulerConfig = toml::from_str(
            "max_num_seqs = 8\nkv_memory = { fraction_of_free = { fraction = 0.9, free_bytes = 1000 } }\n",
        )
        .unwrap();
        assert_eq!(config.max_num_seqs, 8);
        assert_eq!(config.max_batched_tokens, 8192);
        assert!(matches!(
            config.kv_memory,
            PoolSizing::FractionOfFree { .. }
        ));
        assert!(toml::from_str::<SchedulerConfig>("max_num_seq = 8").is_err());
    }
}
