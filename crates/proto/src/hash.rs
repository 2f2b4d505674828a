//! Block hashing: the one definition of "these two prompts share a prefix".
//!
//! A prompt is cut into full blocks of `block_size` tokens; a trailing partial block is never
//! hashed (it cannot be shared until it is full). Each block gets
//!
//! - a **local hash**: XXH3-64 with seed [`HASH_SEED`] over the block's token ids, each written
//!   as 4 little-endian bytes;
//! - a **sequence hash**, which names the block *and everything before it*:
//!   `seq[0] = local[0]`, `seq[i] = XXH3-64(seed, seq[i-1] as 8 LE bytes ‖ local[i] as 8 LE bytes)`.
//!
//! Engines key their prefix caches by sequence hash, KV events carry sequence hashes, and routers
//! index them, so all three must agree bit for bit: this module is the only implementation.
//! The known-answer vectors in the crate docs and in the tests below pin it down.

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64_with_seed;

/// Seed for every XXH3-64 call in block hashing: the ASCII bytes of `kvfleet1` read as a
/// big-endian u64. Changing it invalidates every persisted index; bump it only with a migration.
pub const HASH_SEED: u64 = 0x6b76_666c_6565_7431;

/// The default number of tokens per KV block.
pub const DEFAULT_BLOCK_SIZE: u32 = 16;

/// Tokens per KV block. Never zero; at most [`BlockSize::MAX`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "u32", into = "u32")]
pub struct BlockSize(u32);

/// A block size of zero or above [`BlockSize::MAX`] was asked for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("block size {0} is out of range: it must be between 1 and {max} tokens", max = BlockSize::MAX)]
pub struct InvalidBlockSize(pub u32);

impl BlockSize {
    /// The largest block size accepted (vLLM and Dynamo use 16–64; 1024 leaves room).
    pub const MAX: u32 = 1024;

    /// Validates a block size.
    pub const fn new(tokens: u32) -> Result<Self, InvalidBlockSize> {
        if tokens == 0 || tokens > Self::MAX {
            Err(InvalidBlockSize(tokens))
        } else {
            Ok(Self(tokens))
        }
    }

    /// Tokens per block.
    pub const fn get(self) -> u32 {
        self.0
    }

    /// Tokens per block as a `usize`, for slicing.
    pub const fn tokens(self) -> usize {
        self.0 as usize
    }

    /// How many blocks `len` tokens occupy, counting a trailing partial block.
    pub const fn blocks_for(self, len: usize) -> usize {
        len.div_ceil(self.0 as usize)
    }
}

impl Default for BlockSize {
    fn default() -> Self {
        Self(DEFAULT_BLOCK_SIZE)
    }
}

impl TryFrom<u32> for BlockSize {
    type Error = InvalidBlockSize;
    fn try_from(value: u32) -> Result<Self, Self::Error> {
        Self::new(value)
    }
}

impl From<BlockSize> for u32 {
    fn from(value: BlockSize) -> Self {
        value.0
    }
}

/// The hash of one block's tokens alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct LocalBlockHash(pub u64);

/// The hash of a block together with every block before it: equal sequence hashes mean equal
/// prefixes (up to XXH3 collisions).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SequenceHash(pub u64);

/// Both hashes of one full block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BlockHash {
    /// The block's own tokens.
    pub local: LocalBlockHash,
    /// The block and its whole prefix.
    pub sequence: SequenceHash,
}

/// Hashes one block's token ids.
pub fn local_block_hash(tokens: &[u32]) -> LocalBlockHash {
    let mut bytes = Vec::with_capacity(tokens.len() * 4);
    for token in tokens {
        bytes.extend_from_slice(&token.to_le_bytes());
    }
    LocalBlockHash(xxh3_64_with_seed(&bytes, HASH_SEED))
}

/// Chains a block onto its parent's sequence hash (`None` for the first block of a prompt).
pub fn chain(parent: Option<SequenceHash>, local: LocalBlockHash) -> SequenceHash {
    match parent {
        None => SequenceHash(local.0),
        Some(parent) => {
            let mut bytes = [0u8; 16];
            bytes[..8].copy_from_slice(&parent.0.to_le_bytes());
            bytes[8..].copy_from_slice(&local.0.to_le_bytes());
            SequenceHash(xxh3_64_with_seed(&bytes, HASH_SEED))
        }
    }
}

/// Hashes one full block given its parent: what an engine calls when a decode step fills a block.
pub fn hash_block(parent: Option<SequenceHash>, tokens: &[u32]) -> BlockHash {
    let local = local_block_hash(tokens);
    BlockHash {
        local,
        sequence: chain(parent, local),
    }
}

/// Both hashes of every full block of `tokens`; a trailing partial block is left out.
pub fn block_hashes(tokens: &[u32], block_size: BlockSize) -> Vec<BlockHash> {
    let mut parent = None;
    tokens
        .chunks_exact(block_size.tokens())
        .map(|block| {
            let hash = hash_block(parent, block);
            parent = Some(hash.sequence);
            hash
        })
        .collect()
}

/// The sequence hashes of every full block of `tokens`: what routers and prefix caches key on.
pub fn sequence_hashes(tokens: &[u32], block_size: BlockSize) -> Vec<SequenceHash> {
    block_hashes(tokens, block_size)
        .into_iter()
        .map(|hash| hash.sequence)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn bs(n: u32) -> BlockSize {
        BlockSize::new(n).unwrap()
    }

    /// Known answers, cross-checked against the Python `xxhash` package
    /// (`xxh3_64_intdigest(struct.pack('<4I', 0, 1, 2, 3), seed=0x6b76666c65657431)`). The same
    /// vectors are in the crate-level docs (a doctest), so the docs cannot drift from the code.
    #[test]
    fn known_answer_vectors() {
        assert_eq!(local_block_hash(&[]), LocalBlockHash(0xadc2_1f2c_63e2_2871));
        assert_eq!(
            local_block_hash(&[0, 1, 2, 3]),
            LocalBlockHash(0x13d2_a914_ba1a_bcc4)
        );
        assert_eq!(
            local_block_hash(&[4, 5, 6, 7]),
            LocalBlockHash(0xd692_f554_c2ff_4528)
        );
        let tokens: Vec<u32> = (0..8).collect();
        let hashes = sequence_hashes(&tokens, bs(4));
        assert_eq!(
            hashes,
            vec![
                SequenceHash(0x13d2_a914_ba1a_bcc4),
                SequenceHash(0x9554_8eab_7998_2cb5)
            ]
        );
    }

    #[test]
    fn partial_blocks_are_not_hashed() {
        let tokens: Vec<u32> = (0..35).collect();
        assert_eq!(block_hashes(&tokens, bs(16)).len(), 2);
        assert!(block_hashes(&tokens[..15], bs(16)).is_empty());
    }

    #[test]
    fn first_sequence_hash_is_the_local_hash() {
        let tokens: Vec<u32> = (100..116).collect();
        let hashes = block_hashes(&tokens, bs(16));
        assert_eq!(hashes[0].sequence.0, hashes[0].local.0);
    }

    #[test]
    fn block_size_bounds() {
        assert!(BlockSize::new(0).is_err());
        assert!(BlockSize::new(BlockSize::MAX + 1).is_err());
        assert_eq!(BlockSize::new(16).unwrap().get(), 16);
        assert_eq!(BlockSize::default().get(), DEFAULT_BLOCK_SIZE);
        assert!(serde_json::from_str::<BlockSize>("0").is_err());
        assert_eq!(serde_json::from_str::<BlockSize>("32").unwrap().get(), 32);
        assert_eq!(bs(16).blocks_for(33), 3);
    }

    proptest! {
        #[test]
        fn hashes_of_a_prefix_are_a_prefix_of_the_hashes(
            tokens in prop::collection::vec(any::<u32>(), 0..300),
            cut in 0usize..300,
            size in 1u32..40,
        ) {
            let size = bs(size);
            let cut = cut.min(tokens.len());
            let whole = block_hashes(&tokens, size);
            let prefix = block_hashes(&tokens[..cut], size);
            prop_assert_eq!(prefix.len(), cut / size.tokens());
            prop_assert_eq!(&whole[..prefix.len()], &prefix[..]);
        }

        #[test]
        fn changing_one_token_changes_its_block_and_every_later_one(
            tokens in prop::collection::vec(any::<u32>(), 1..300),
            at in any::<prop::sample::Index>(),
            delta in 1u32..,
            size in 1u32..40,
        ) {
            let size = bs(size);
            let at = at.index(tokens.len());
            let mut changed = tokens.clone();
            changed[at] = changed[at].wrapping_add(delta);
            let before = block_hashes(&tokens, size);
            let after = block_hashes(&changed, size);
            let block = at / size.tokens();
            for i in 0..before.len() {
                if i < block {
                    prop_assert_eq!(before[i], after[i]);
                } else {
                    prop_assert_ne!(before[i].sequence, after[i].sequence, "block {}", i);
                }
            }
        }

        #[test]
        fn incremental_hashing_matches_whole_prompt_hashing(
            tokens in prop::collection::vec(any::<u32>(), 0..200),
            size in 1u32..20,
        ) {
            let size = bs(size);
            let mut parent = None;
            let mut incremental = Vec::new();
            for block in tokens.chunks_exact(size.tokens()) {
                let hash = hash_block(parent, block);
                parent = Some(hash.sequence);
                incremental.push(hash);
            }
            prop_assert_eq!(incremental, block_hashes(&tokens, size));
        }
    }
}
