//! The paged KV cache: for every layer, K and V storage for `num_blocks` blocks of
//! `block_size` tokens, in IEEE half precision (llama.cpp's default cache precision; the golden
//! tests compare against llama.cpp). In memory each block is head-major, K as
//! `[kv_head, head_dim, slot]` and V as `[kv_head, slot, head_dim]`, the layout the attention
//! kernels read fastest (`kernels::attention`; the SIMD kernels convert f16 in registers).
//! Blocks are exchanged in the canonical layout `[slot, kv_head, head_dim]` (see
//! [`PagedKvCache::read_block`]), whatever the memory layout.
//!
//! The cache owns storage only. Which block belongs to which sequence (allocation, prefix
//! sharing, eviction) is the engine's block pool's business; the forward pass receives each
//! sequence's block table and reads and writes through it. Blocks serialise to bytes (layer by
//! layer, K then V, little-endian) for transfer between workers; [`PagedKvCache::layout`] is
//! the description both sides compare before exchanging them.

use half::f16;
use kvfleet_proto::{BlockSize, KvDtype, KvLayout};

use crate::error::{ModelError, Result};
use crate::kernels::attention::Shape;

/// Tags the tiers' blocks written in [`PagedKvCache`]'s own memory order (mixed into the tier
/// fingerprint, so that a change of this order, or canonical bytes, are never read as them).
/// Bump it when `kernels::attention::Shape`'s `k_index`/`v_index` change.
pub const NATIVE_ORDER: u64 = 0x6b76_666c_6e61_7431; // "kvflnat1"

/// Per-layer paged K/V storage.
#[derive(Debug, Clone)]
pub struct PagedKvCache {
    pub(crate) k: Vec<Vec<f16>>,
    pub(crate) v: Vec<Vec<f16>>,
    num_blocks: usize,
    block_size: BlockSize,
    kv_heads: usize,
    head_dim: usize,
    model: String,
}

impl PagedKvCache {
    /// Zeroed storage for `num_blocks` blocks. `model` names the weights (for [`KvLayout`]).
    pub fn new(
        model: &str,
        layers: usize,
        kv_heads: usize,
        head_dim: usize,
        num_blocks: usize,
        block_size: BlockSize,
    ) -> Result<Self> {
        let per_layer = num_blocks
            .checked_mul(block_size.tokens())
            .and_then(|n| n.checked_mul(kv_heads))
            .and_then(|n| n.checked_mul(head_dim))
            .filter(|&n| n <= isize::MAX as usize / 2)
            .ok_or_else(|| {
                ModelError::BadInput(format!(
                    "a KV cache of {num_blocks} blocks overflows memory"
                ))
            })?;
        Ok(Self {
            k: (0..layers).map(|_| vec![f16::ZERO; per_layer]).collect(),
            v: (0..layers).map(|_| vec![f16::ZERO; per_layer]).collect(),
            num_blocks,
            block_size,
            kv_heads,
            head_dim,
            model: model.to_string(),
        })
    }

    /// Blocks allocated.
    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    /// Tokens per block.
    pub fn block_size(&self) -> BlockSize {
        self.block_size
    }

    /// Layers.
    pub fn layers(&self) -> usize {
        self.k.len()
    }

    /// Floats in one block of one layer's K (or V).
    pub(crate) fn block_elems(&self) -> usize {
        self.block_size.tokens() * self.kv_heads * self.head_dim
    }

    /// The layout blocks are exchanged in.
    pub fn layout(&self) -> KvLayout {
        KvLayout {
            model: self.model.clone(),
            layers: self.layers() as u32,
            kv_heads: self.kv_heads as u32,
            head_dim: self.head_dim as u32,
            dtype: KvDtype::F16,
            block_size: self.block_size,
        }
    }

    fn check_block(&self, block: u32) -> Result<usize> {
        let b = block as usize;
        if b >= self.num_blocks {
            return Err(ModelError::BadInput(format!(
                "block id {block} is outside the cache's {} blocks",
                self.num_blocks
            )));
        }
        Ok(b)
    }

    /// The attention kernels' view of the cache's geometry for one layer.
    pub(crate) fn shape(&self, heads: usize, scale: f32, window: Option<usize>) -> Shape {
        Shape {
            heads,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            block_size: self.block_size.tokens(),
            scale,
            window,
        }
    }

    /// Stores one token's K and V (`[kv_head, head_dim]` each, rounded to f16) of `layer` at
    /// slot `slot` of block `block`.
    pub(crate) fn store(&mut self, layer: usize, block: usize, slot: usize, k: &[f32], v: &[f32]) {
        let shape = self.shape(self.kv_heads, 1.0, None);
        for g in 0..self.kv_heads {
            for d in 0..self.head_dim {
                let i = g * self.head_dim + d;
                self.k[layer][shape.k_index(block, slot, g, d)] = f16::from_f32(k[i]);
                self.v[layer][shape.v_index(block, slot, g, d)] = f16::from_f32(v[i]);
            }
        }
    }

    /// Memory index of each canonical (`[slot, kv_head, head_dim]`) element of one block of
    /// K and of V, relative to the block's start.
    fn canonical_order(&self) -> (Vec<usize>, Vec<usize>) {
        let shape = self.shape(self.kv_heads, 1.0, None);
        let mut k = Vec::with_capacity(self.block_elems());
        let mut v = Vec::with_capacity(self.block_elems());
        for slot in 0..self.block_size.tokens() {
            for g in 0..self.kv_heads {
                for d in 0..self.head_dim {
                    k.push(shape.k_index(0, slot, g, d));
                    v.push(shape.v_index(0, slot, g, d));
                }
            }
        }
        (k, v)
    }

    /// One block's K and V for every layer, as `layout().block_bytes()` bytes: layer by layer,
    /// K then V, each `[slot, kv_head, head_dim]` little-endian f16.
    pub fn read_block(&self, block: u32) -> Result<Vec<u8>> {
        let b = self.check_block(block)?;
        let n = self.block_elems();
        let (ko, vo) = self.canonical_order();
        let mut out = Vec::with_capacity(2 * self.layers() * n * 2);
        for layer in 0..self.layers() {
            for (store, order) in [(&self.k[layer], &ko), (&self.v[layer], &vo)] {
                let blk = &store[b * n..(b + 1) * n];
                for &i in order {
                    out.extend_from_slice(&blk[i].to_le_bytes());
                }
            }
        }
        Ok(out)
    }

    /// Appends one block's K and V for every layer to `out` in this cache's own memory order
    /// (layer by layer, K then V, each the block's contiguous run of its store, f16 in the
    /// machine's byte order): a plain copy, for this worker's own lower KV tiers, where the
    /// canonical order's transposition would cost several times the copy. Only
    /// [`write_block_native`](Self::write_block_native) of a cache with the same layout reads
    /// it ([`NATIVE_ORDER`] tells the tiers apart from canonical bytes).
    pub fn read_block_native_into(&self, block: u32, out: &mut Vec<u8>) -> Result<()> {
        let b = self.check_block(block)?;
        let n = self.block_elems();
        for layer in 0..self.layers() {
            for store in [&self.k[layer], &self.v[layer]] {
                out.extend_from_slice(bytemuck::cast_slice(&store[b * n..(b + 1) * n]));
            }
        }
        Ok(())
    }

    /// Overwrites one block from bytes produced by
    /// [`read_block_native_into`](Self::read_block_native_into) on a cache with the same layout.
    pub fn write_block_native(&mut self, block: u32, bytes: &[u8]) -> Result<()> {
        let b = self.check_block(block)?;
        let n = self.block_elems();
        let run = 2 * n;
        let expected = 2 * self.layers() * run;
        if bytes.len() != expected {
            return Err(ModelError::KvTransfer(format!(
                "block of {} bytes, this layout needs {expected}",
                bytes.len()
            )));
        }
        let mut runs = bytes.chunks_exact(run);
        for layer in 0..self.layers() {
            for store in [&mut self.k[layer], &mut self.v[layer]] {
                if let Some(src) = runs.next() {
                    bytemuck::cast_slice_mut::<f16, u8>(&mut store[b * n..(b + 1) * n])
                        .copy_from_slice(src);
                }
            }
        }
        Ok(())
    }

    /// Overwrites one block from bytes produced by [`read_block`](Self::read_block) on a cache
    /// with the same layout.
    pub fn write_block(&mut self, block: u32, bytes: &[u8]) -> Result<()> {
        let b = self.check_block(block)?;
        let n = self.block_elems();
        let expected = 2 * self.layers() * n * 2;
        if bytes.len() != expected {
            return Err(ModelError::KvTransfer(format!(
                "block of {} bytes, this layout needs {expected}",
                bytes.len()
            )));
        }
        let (ko, vo) = self.canonical_order();
        let mut values = bytes
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]));
        for layer in 0..self.layers() {
            for (store, order) in [(&mut self.k[layer], &ko), (&mut self.v[layer], &vo)] {
                let blk = &mut store[b * n..(b + 1) * n];
                for (&i, x) in order.iter().zip(&mut values) {
                    blk[i] = x;
                }
            }
        }
        Ok(())
    }

    /// Copies block `src` onto block `dst` (copy-on-write of a shared partial block).
    pub fn copy_block(&mut self, src: u32, dst: u32) -> Result<()> {
        let (s, d) = (self.check_block(src)?, self.check_block(dst)?);
        let n = self.block_elems();
        for layer in 0..self.layers() {
            self.k[layer].copy_within(s * n..(s + 1) * n, d * n);
            self.v[layer].copy_within(s * n..(s + 1) * n, d * n);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cache(blocks: usize) -> PagedKvCache {
        PagedKvCache::new("m", 2, 2, 4, blocks, BlockSize::new(3).unwrap()).unwrap()
    }

    /// A 4-block cache whose block `src` holds `values` (K then V, layer by layer).
    fn filled(values: &[f32], src: u32) -> PagedKvCache {
        let mut a = cache(4);
        let n = a.block_elems();
        let mut it = values.iter().map(|&v| f16::from_f32(v));
        let run = src as usize * n..(src as usize + 1) * n;
        for layer in 0..2 {
            for store in [&mut a.k[layer], &mut a.v[layer]] {
                for x in &mut store[run.clone()] {
                    *x = it.next().unwrap();
                }
            }
        }
        a
    }

    proptest! {
        #[test]
        fn block_bytes_round_trip(values in proptest::collection::vec(-1e3f32..1e3, 2 * 2 * 24), src in 0u32..4, dst in 0u32..4) {
            let a = filled(&values, src);
            let bytes = a.read_block(src).unwrap();
            prop_assert_eq!(bytes.len(), a.layout().block_bytes());
            let mut b = cache(4);
            b.write_block(dst, &bytes).unwrap();
            prop_assert_eq!(b.read_block(dst).unwrap(), bytes);
        }

        /// The tiers' native bytes are a plain copy: the block they are written into reads
        /// back (canonically) exactly as the block they came from, and their size is the
        /// layout's block size.
        #[test]
        fn native_tier_bytes_round_trip(values in proptest::collection::vec(-1e3f32..1e3, 2 * 2 * 24), src in 0u32..4, dst in 0u32..4) {
            let a = filled(&values, src);
            let mut native = Vec::new();
            a.read_block_native_into(src, &mut native).unwrap();
            prop_assert_eq!(native.len(), a.layout().block_bytes());
            let mut b = cache(4);
            b.write_block_native(dst, &native).unwrap();
            prop_assert_eq!(b.read_block(dst).unwrap(), a.read_block(src).unwrap());
            prop_assert!(b.write_block_native(dst, &native[1..]).is_err());
        }

        /// The transfer layout is `[slot, kv_head, head_dim]` whatever the memory layout.
        #[test]
        fn transfer_layout_is_slot_major(k in proptest::collection::vec(-8f32..8.0, 3 * 2 * 4), v in proptest::collection::vec(-8f32..8.0, 3 * 2 * 4), block in 0u32..4) {
            let mut a = cache(4);
            for slot in 0..3 {
                let row = 2 * 4;
                a.store(1, block as usize, slot, &k[slot * row..(slot + 1) * row], &v[slot * row..(slot + 1) * row]);
            }
            let bytes = a.read_block(block).unwrap();
            // Values per block of one layer's K (or V); layer 1's K follows layer 0's K and V.
            let n = 3 * 2 * 4;
            let half = |i: usize| f16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]]).to_f32();
            for i in 0..n {
                prop_assert_eq!(half(2 * n + i), f16::from_f32(k[i]).to_f32());
                prop_assert_eq!(half(3 * n + i), f16::from_f32(v[i]).to_f32());
            }
        }
    }

    #[test]
    fn bad_block_ids_and_sizes_are_errors() {
        let mut c = cache(2);
        assert!(matches!(c.read_block(2), Err(ModelError::BadInput(_))));
        assert!(matches!(
            c.write_block(0, &[0; 3]),
            Err(ModelError::KvTransfer(_))
        ));
        assert!(c.copy_block(0, 5).is_err());
        assert_eq!(c.layout().dtype, KvDtype::F16);
    }
}
