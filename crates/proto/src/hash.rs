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
//!
//! # Salts and the fleet key
//!
//! Two inputs change a prompt's hashes, both through its **local** hashes only (the chaining
//! step stays public, so a KV event's chain can be verified by anyone — a router, the disk
//! tier — without a secret):
//!
//! - a request's **`cache_salt`** (vLLM's field, one tenant's secret or id): the *first* block's
//!   local hash is computed over `root ‖ tokens` instead of `tokens`, where
//!   `root = XXH3-64("kvfleet cache_salt\0" ‖ salt)` as 8 LE bytes. Every later sequence hash
//!   chains from the first, so two requests with the same prompt and different salts share no
//!   block anywhere (engine prefix cache, KV events, every router's index). A salted first block
//!   hashes `8 + 4·block_size` bytes, an unsalted one `4·block_size`, so no salted block can
//!   equal an unsalted one by construction.
//! - a fleet's **secret key** ([`FleetHashKey`]): every local hash is XXH3-64 keyed with a
//!   192-byte secret derived from the key (SHA-256 in counter mode) instead of [`HASH_SEED`].
//!   Someone who reads the KV index (the control plane's, a router's, `/api/v1/kv/*`) but not
//!   the key cannot compute the hash of a candidate prompt, so cannot ask "has anyone sent this
//!   prefix?". Two fleets with different keys hash the same prompt differently.
//!
//! Without a salt or a key ([`BlockHasher::UNKEYED`]) the hashes are exactly the known answers
//! below; the free functions of this module are that hasher's.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use xxhash_rust::xxh3::{xxh3_64_with_secret, xxh3_64_with_seed};

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

/// Hashes one block's token ids (unkeyed, unsalted: [`BlockHasher::UNKEYED`]).
pub fn local_block_hash(tokens: &[u32]) -> LocalBlockHash {
    BlockHasher::UNKEYED.local_block_hash(false, tokens)
}

/// The longest `cache_salt` accepted, in bytes (vLLM suggests 43 base64 characters).
pub const MAX_CACHE_SALT_BYTES: usize = 1024;

/// How many secret bytes XXH3 is keyed with (at least its minimum of 136).
const SECRET_BYTES: usize = 192;

/// A fleet's hash key: the secret every local block hash of the fleet is keyed with. Derived
/// from the operator's (or the control plane's generated) secret; never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct FleetHashKey(Arc<[u8; SECRET_BYTES]>);

impl FleetHashKey {
    /// The shortest secret accepted, in bytes (128 bits of a random string's entropy fit).
    pub const MIN_SECRET_BYTES: usize = 16;

    /// Derives the XXH3 secret from a fleet secret: `SHA-256(secret ‖ i as u8)` for i = 0..6,
    /// concatenated. `None` if the secret is shorter than [`Self::MIN_SECRET_BYTES`].
    pub fn derive(secret: &[u8]) -> Option<Self> {
        if secret.len() < Self::MIN_SECRET_BYTES {
            return None;
        }
        let mut key = [0u8; SECRET_BYTES];
        for (i, chunk) in key.chunks_mut(32).enumerate() {
            let mut h = Sha256::new();
            h.update(b"kvfleet fleet hash key\0");
            h.update(secret);
            h.update([i as u8]);
            chunk.copy_from_slice(&h.finalize());
        }
        Some(Self(Arc::new(key)))
    }
}

impl fmt::Debug for FleetHashKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FleetHashKey(<redacted>)")
    }
}

/// A fleet's hash secret as it travels (control plane → agent → worker, over mTLS or the
/// agent's own Unix socket): text, never printed. [`FleetHashSecret::key`] derives the key.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct FleetHashSecret(pub String);

impl FleetHashSecret {
    /// The key it derives; `None` if it is shorter than [`FleetHashKey::MIN_SECRET_BYTES`].
    pub fn key(&self) -> Option<FleetHashKey> {
        FleetHashKey::derive(self.0.as_bytes())
    }
}

impl fmt::Debug for FleetHashSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FleetHashSecret(<redacted>)")
    }
}

/// Computes a prompt's block hashes under a fleet key (or none) and a request's `cache_salt`
/// (or none). Cheap to clone (the key is shared). See the module docs for the construction.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlockHasher {
    key: Option<FleetHashKey>,
    /// The salt's root, mixed into the first block's local hash.
    root: Option<u64>,
}

impl BlockHasher {
    /// No key, no salt: today's hashes, the known-answer vectors.
    pub const UNKEYED: BlockHasher = BlockHasher {
        key: None,
        root: None,
    };

    /// A fleet's hasher: every local hash keyed with `key` (no salt yet).
    pub fn keyed(key: Option<FleetHashKey>) -> Self {
        Self { key, root: None }
    }

    /// Whether a fleet key is set.
    pub fn is_keyed(&self) -> bool {
        self.key.is_some()
    }

    /// This hasher for one request: the same key, salted with the request's `cache_salt`
    /// (`None` leaves it unsalted).
    pub fn salted(&self, cache_salt: Option<&str>) -> Self {
        Self {
            key: self.key.clone(),
            root: cache_salt.map(|salt| {
                let mut bytes = b"kvfleet cache_salt\0".to_vec();
                bytes.extend_from_slice(salt.as_bytes());
                self.xxh3(&bytes)
            }),
        }
    }

    fn xxh3(&self, bytes: &[u8]) -> u64 {
        match &self.key {
            None => xxh3_64_with_seed(bytes, HASH_SEED),
            Some(key) => xxh3_64_with_secret(bytes, &key.0[..]),
        }
    }

    /// One block's local hash; `first` for a prompt's first block (the one a salt goes into).
    pub fn local_block_hash(&self, first: bool, tokens: &[u32]) -> LocalBlockHash {
        let mut bytes = Vec::with_capacity(tokens.len() * 4 + 8);
        if first && let Some(root) = self.root {
            bytes.extend_from_slice(&root.to_le_bytes());
        }
        for token in tokens {
            bytes.extend_from_slice(&token.to_le_bytes());
        }
        LocalBlockHash(self.xxh3(&bytes))
    }

    /// Hashes one full block given its parent (`None`: the prompt's first block).
    pub fn hash_block(&self, parent: Option<SequenceHash>, tokens: &[u32]) -> BlockHash {
        let local = self.local_block_hash(parent.is_none(), tokens);
        BlockHash {
            local,
            sequence: chain(parent, local),
        }
    }

    /// Both hashes of every full block of `tokens`; a trailing partial block is left out.
    pub fn block_hashes(&self, tokens: &[u32], block_size: BlockSize) -> Vec<BlockHash> {
        let mut parent = None;
        tokens
            .chunks_exact(block_size.tokens())
            .map(|block| {
                let hash = self.hash_block(parent, block);
                parent = Some(hash.sequence);
                hash
            })
            .collect()
    }

    /// The sequence hashes of every full block of `tokens`.
    pub fn sequence_hashes(&self, tokens: &[u32], block_size: BlockSize) -> Vec<SequenceHash> {
        self.block_hashes(tokens, block_size)
            .into_iter()
            .map(|hash| hash.sequence)
            .collect()
    }
}

/// Checks a request's `cache_salt`: a non-empty string of at most [`MAX_CACHE_SALT_BYTES`].
pub fn validate_cache_salt(salt: &str) -> Result<(), String> {
    if salt.is_empty() {
        Err("cache_salt must be a non-empty string".to_owned())
    } else if salt.len() > MAX_CACHE_SALT_BYTES {
        Err(format!(
            "cache_salt is {} bytes; at most {MAX_CACHE_SALT_BYTES} are accepted",
            salt.len()
        ))
    } else {
        Ok(())
    }
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

/// Hashes one full block given its parent: what an engine calls when a decode step fills a block
/// (unkeyed, unsalted).
pub fn hash_block(parent: Option<SequenceHash>, tokens: &[u32]) -> BlockHash {
    BlockHasher::UNKEYED.hash_block(parent, tokens)
}

/// Both hashes of every full block of `tokens`; a trailing partial block is left out (unkeyed,
/// unsalted).
pub fn block_hashes(tokens: &[u32], block_size: BlockSize) -> Vec<BlockHash> {
    BlockHasher::UNKEYED.block_hashes(tokens, block_size)
}

/// The sequence hashes of every full block of `tokens`: what routers and prefix caches key on
/// (unkeyed, unsalted).
pub fn sequence_hashes(tokens: &[u32], block_size: BlockSize) -> Vec<SequenceHash> {
    BlockHasher::UNKEYED.sequence_hashes(tokens, block_size)
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

    /// Salted and keyed known answers. Cross-checked against the Python `xxhash` package:
    /// `root = xxh3_64_intdigest(b"kvfleet cache_salt\0tenant-a", seed=0x6b76666c65657431)`,
    /// then `xxh3_64_intdigest(struct.pack('<Q4I', root, 0, 1, 2, 3), seed=...)`.
    #[test]
    fn salted_and_keyed_known_answers() {
        let tokens: Vec<u32> = (0..8).collect();
        let salted = BlockHasher::UNKEYED.salted(Some("tenant-a"));
        assert_eq!(salted.root, Some(SALT_ROOT_TENANT_A));
        let hashes = salted.block_hashes(&tokens, bs(4));
        assert_eq!(hashes[0].local, LocalBlockHash(SALTED_LOCAL_0));
        assert_eq!(hashes[0].sequence.0, hashes[0].local.0);
        // The second block's local hash is unsalted; only its chain differs.
        assert_eq!(hashes[1].local, local_block_hash(&[4, 5, 6, 7]));
        assert_eq!(hashes[1].sequence, SequenceHash(SALTED_SEQ_1));
        let key = FleetHashKey::derive(b"0123456789abcdef-fleet-one").unwrap();
        let keyed = BlockHasher::keyed(Some(key));
        assert_eq!(
            keyed.local_block_hash(true, &[0, 1, 2, 3]),
            LocalBlockHash(KEYED_LOCAL_0)
        );
        // A hasher with neither is the free functions, bit for bit.
        assert_eq!(
            BlockHasher::default().block_hashes(&tokens, bs(4)),
            block_hashes(&tokens, bs(4))
        );
        assert_eq!(BlockHasher::UNKEYED.salted(None), BlockHasher::UNKEYED);
    }

    const SALT_ROOT_TENANT_A: u64 = 0x8cf2_b20d_7b7c_fceb;
    const SALTED_LOCAL_0: u64 = 0x7075_2cc6_a046_4a73;
    const SALTED_SEQ_1: u64 = 0x91a7_8331_3159_85ab;
    /// Pinned from this implementation (xxhash-rust's `xxh3_64_with_secret`; the Python package
    /// takes no custom secret, so this one is not cross-checked there).
    const KEYED_LOCAL_0: u64 = 0x1b51_38ac_6d96_b10c;

    #[test]
    fn salts_and_keys_separate_prompts() {
        let tokens: Vec<u32> = (0..64).collect();
        let size = bs(16);
        let plain = sequence_hashes(&tokens, size);
        let a = BlockHasher::UNKEYED
            .salted(Some("a"))
            .sequence_hashes(&tokens, size);
        let a_again = BlockHasher::UNKEYED
            .salted(Some("a"))
            .sequence_hashes(&tokens, size);
        let b = BlockHasher::UNKEYED
            .salted(Some("b"))
            .sequence_hashes(&tokens, size);
        assert_eq!(a, a_again);
        for i in 0..plain.len() {
            assert_ne!(a[i], b[i]);
            assert_ne!(a[i], plain[i]);
        }
        // No salted block equals any unsalted one anywhere in the chain.
        assert!(a.iter().all(|h| !plain.contains(h) && !b.contains(h)));
        let one = BlockHasher::keyed(FleetHashKey::derive(&[1; 32]));
        let two = BlockHasher::keyed(FleetHashKey::derive(&[2; 32]));
        let h1 = one.sequence_hashes(&tokens, size);
        let h2 = two.sequence_hashes(&tokens, size);
        assert!(h1.iter().all(|h| !h2.contains(h) && !plain.contains(h)));
        // A keyed fleet still salts per request.
        assert_ne!(one.salted(Some("a")).sequence_hashes(&tokens, size), h1);
        // The chaining step stays public: anyone can verify a keyed chain.
        let blocks = one.block_hashes(&tokens, size);
        assert_eq!(
            chain(Some(blocks[0].sequence), blocks[1].local),
            blocks[1].sequence
        );
        assert!(FleetHashKey::derive(b"short").is_none());
        assert_eq!(format!("{:?}", one), format!("{:?}", two));
        assert!(format!("{one:?}").contains("redacted"));
        assert!(validate_cache_salt("").is_err());
        assert!(validate_cache_salt(&"x".repeat(MAX_CACHE_SALT_BYTES + 1)).is_err());
        assert!(validate_cache_salt("tenant").is_ok());
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
