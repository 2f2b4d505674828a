//! A cheap hasher for keys that are already hashes (sequence hashes) or counters (request ids).
//!
//! SipHash, std's default, guards against adversarial keys; ours are XXH3 outputs or ids the
//! engine assigns, so one multiply (Fibonacci hashing, as in rustc's FxHash) is enough and makes
//! prefix lookups several times faster. The multiply spreads sequential ids into the high bits
//! that hashbrown's control bytes use.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// A `HashMap` keyed by `u64`-like values with [`MulHasher`].
pub(crate) type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<MulHasher>>;

/// Multiplicative hasher for `u64` keys; other writes fall back to folding bytes in.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct MulHasher(u64);

const K: u64 = 0x9e37_79b9_7f4a_7c15;

impl Hasher for MulHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(5) ^ u64::from(b)).wrapping_mul(K);
        }
    }

    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0.rotate_left(5) ^ v).wrapping_mul(K);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::BuildHasher;

    #[test]
    fn sequential_keys_spread_into_high_bits() {
        let build = BuildHasherDefault::<MulHasher>::default();
        let tops: std::collections::HashSet<u64> =
            (0u64..64).map(|k| build.hash_one(k) >> 57).collect();
        assert!(tops.len() > 32, "{}", tops.len());
    }
}
