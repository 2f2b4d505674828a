//! Attention over the paged KV cache.
//!
//! The cache holds f16 values, per layer and block, head-major: K as `[kv_head][dim][slot]`
//! (so one dimension of a block's keys is contiguous: eight keys per SIMD load) and V as
//! `[kv_head][slot][dim]`. See `kv_cache` for the transfer layout.
//!
//! Two algorithms:
//! - [`fast`]: tiled, with an online softmax (flash attention). A task takes one sequence's
//!   query tile (up to [`QUERY_TILE`] tokens × the query heads of one KV head) and walks the
//!   sequence's blocks once, so each key and value is read once per tile instead of once per
//!   query, and no score row is ever materialised. Every output row's arithmetic is fixed by its
//!   own position: blocks in order, scores as one fused-multiply-add chain over the head
//!   dimension, the running maximum/sum/accumulator updated per block, keys in order. Neither
//!   the batch, nor the tile a row shares, nor how the prompt was chunked changes a bit.
//! - [`exact`]: llama.cpp's CPU graph without flash attention, bit for bit (`ggml_math`): the
//!   whole score row, tinyBLAS lane order, the softmax's `expf` and f64 sums.

use half::f16;

use super::Isa;
use super::pool::{OutPtr, Pool};
use crate::ggml_math::Rounding;

/// Query tokens per fast-attention task.
pub(crate) const QUERY_TILE: usize = 16;

/// Shape of one layer's attention.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Shape {
    pub(crate) heads: usize,
    pub(crate) kv_heads: usize,
    pub(crate) head_dim: usize,
    pub(crate) block_size: usize,
    pub(crate) scale: f32,
    /// Sliding window (positions attended: `pos + 1 − window ..= pos`), if any.
    pub(crate) window: Option<usize>,
}

impl Shape {
    /// f16 values per block of one layer's K (or V).
    pub(crate) fn block_elems(&self) -> usize {
        self.block_size * self.kv_heads * self.head_dim
    }

    /// Index of key `slot`, dimension `d`, KV head `g` of block `block` in the K store.
    #[inline]
    pub(crate) fn k_index(&self, block: usize, slot: usize, g: usize, d: usize) -> usize {
        block * self.block_elems() + (g * self.head_dim + d) * self.block_size + slot
    }

    /// Index of value `slot`, dimension `d`, KV head `g` of block `block` in the V store.
    #[inline]
    pub(crate) fn v_index(&self, block: usize, slot: usize, g: usize, d: usize) -> usize {
        block * self.block_elems() + (g * self.block_size + slot) * self.head_dim + d
    }
}

/// One sequence's part of a step: tokens `first..first + len` of the step, at positions
/// `start..start + len`, its block table.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SeqSpan<'a> {
    pub(crate) first: usize,
    pub(crate) len: usize,
    pub(crate) start: usize,
    pub(crate) table: &'a [u32],
}

/// The first position a query at `pos` attends to.
#[inline]
fn lowest(pos: usize, window: Option<usize>) -> usize {
    window.map_or(0, |w| (pos + 1).saturating_sub(w))
}

/// `exp(x)` for `x ≤ 0` (and −∞): ggml's AVX2 `ggml_v_expf` polynomial for `x ≥ −87`, zero
/// below. Written so that its SIMD versions (same operations, lane by lane) give equal bits.
#[inline(always)]
pub(crate) fn exp_nonpos(x: f32) -> f32 {
    const SHIFT: f32 = f32::from_bits(0x4B40_0000); // 0x1.8p23
    const LOG2E: f32 = f32::from_bits(0x3FB8_AA3B);
    const LN2_HI: f32 = f32::from_bits(0x3F31_7200);
    const LN2_LO: f32 = f32::from_bits(0x35BF_BE8E);
    const C5: f32 = f32::from_bits(0x3C07_2010);
    const C4: f32 = f32::from_bits(0x3D2B_9F17);
    const C3: f32 = f32::from_bits(0x3E2A_AF33);
    const C2: f32 = f32::from_bits(0x3EFF_FEDB);
    const C1: f32 = f32::from_bits(0x3F7F_FFF6);
    if x.is_nan() || x < -87.0 {
        return 0.0;
    }
    let z = x.mul_add(LOG2E, SHIFT);
    let n = z - SHIFT;
    let b = (-n).mul_add(LN2_LO, (-n).mul_add(LN2_HI, x));
    let e = z.to_bits().wrapping_shl(23);
    let k = f32::from_bits(e.wrapping_add(1.0f32.to_bits()));
    let u = b * b;
    let j = C5
        .mul_add(b, C4)
        .mul_add(u, C3.mul_add(b, C2))
        .mul_add(u, C1 * b);
    j.mul_add(k, k)
}

/// The running softmax state of one query row.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RowState {
    pub(crate) max: f32,
    pub(crate) sum: f32,
}

impl RowState {
    pub(crate) const NEW: RowState = RowState {
        max: f32::NEG_INFINITY,
        sum: 0.0,
    };

    /// Takes a block's maximum score; returns the factor the accumulator must be scaled by,
    /// `None` when it stays as it is.
    #[inline(always)]
    pub(crate) fn rescale(&mut self, block_max: f32) -> Option<f32> {
        if block_max.is_nan() || block_max <= self.max {
            return None;
        }
        let corr = if self.max == f32::NEG_INFINITY {
            0.0
        } else {
            exp_nonpos(self.max - block_max)
        };
        self.max = block_max;
        self.sum *= corr;
        Some(corr)
    }
}

/// Fast attention for every token of the step. `q [tokens, heads·dim]`, `out` likewise.
#[allow(clippy::too_many_arguments)]
pub(crate) fn fast(
    isa: Isa,
    shape: &Shape,
    q: &[f32],
    kc: &[f16],
    vc: &[f16],
    seqs: &[SeqSpan<'_>],
    out: &mut [f32],
) {
    let group = shape.heads / shape.kv_heads;
    let (hd, nh) = (shape.head_dim, shape.heads);
    // Tasks: (sequence, KV head, first token of the query tile).
    let mut tasks = Vec::new();
    for (si, s) in seqs.iter().enumerate() {
        for g in 0..shape.kv_heads {
            for t0 in (0..s.len).step_by(QUERY_TILE) {
                tasks.push((si, g, t0));
            }
        }
    }
    let target = OutPtr::new(out);
    Pool::global().run(tasks.len(), &|i| {
        let (si, g, t0) = tasks[i];
        let s = &seqs[si];
        let tq = (s.len - t0).min(QUERY_TILE);
        // Rows: token-major, then the group's heads.
        let mut rows = vec![0f32; tq * group * hd];
        for tt in 0..tq {
            let tok = s.first + t0 + tt;
            let src = &q[tok * nh * hd + g * group * hd..tok * nh * hd + (g + 1) * group * hd];
            rows[tt * group * hd..(tt + 1) * group * hd].copy_from_slice(src);
        }
        let positions: Vec<usize> = (0..tq * group).map(|r| s.start + t0 + r / group).collect();
        let mut acc = vec![0f32; tq * group * hd];
        tile(isa, shape, g, &rows, &positions, s.table, kc, vc, &mut acc);
        for tt in 0..tq {
            let tok = s.first + t0 + tt;
            // SAFETY: each task writes the `group` heads of KV head `g` for its own tokens:
            // disjoint from every other task's range; `out` outlives the pool run.
            unsafe {
                target.write(
                    tok * nh * hd + g * group * hd,
                    &acc[tt * group * hd..(tt + 1) * group * hd],
                );
            }
        }
    });
}

/// One query tile against its sequence's blocks: `rows [r][dim]` at `positions[r]` (ascending
/// by row groups), attended values into `out [r][dim]` (normalised).
#[allow(clippy::too_many_arguments)]
pub(crate) fn tile(
    isa: Isa,
    shape: &Shape,
    g: usize,
    rows: &[f32],
    positions: &[usize],
    table: &[u32],
    kc: &[f16],
    vc: &[f16],
    out: &mut [f32],
) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512Vnni => {
            if let Some(cpu) = super::avx2::Avx2::new() {
                return super::avx2::attention_tile(
                    cpu, shape, g, rows, positions, table, kc, vc, out,
                );
            }
        }
        _ => {}
    }
    tile_portable(shape, g, rows, positions, table, kc, vc, out);
}

/// The reference for [`tile`].
#[allow(clippy::too_many_arguments)]
pub(crate) fn tile_portable(
    shape: &Shape,
    g: usize,
    rows: &[f32],
    positions: &[usize],
    table: &[u32],
    kc: &[f16],
    vc: &[f16],
    out: &mut [f32],
) {
    let (hd, bs) = (shape.head_dim, shape.block_size);
    let n = positions.len();
    let mut state = vec![RowState::NEW; n];
    out.fill(0.0);
    let Some(&last) = positions.iter().max() else {
        return;
    };
    let first = positions
        .iter()
        .map(|&p| lowest(p, shape.window))
        .min()
        .unwrap_or(0);
    let mut scores = vec![f32::NEG_INFINITY; bs];
    for b in first / bs..=last / bs {
        let block = table[b] as usize;
        let p0 = b * bs;
        for r in 0..n {
            let (pos, lo) = (positions[r], lowest(positions[r], shape.window));
            if pos < p0 || lo >= p0 + bs {
                continue;
            }
            let (k0, k1) = (lo.max(p0) - p0, pos.min(p0 + bs - 1) - p0);
            let qr = &rows[r * hd..(r + 1) * hd];
            let mut bmax = f32::NEG_INFINITY;
            for slot in k0..=k1 {
                let mut s = 0f32;
                for (d, &qd) in qr.iter().enumerate() {
                    s = qd.mul_add(kc[shape.k_index(block, slot, g, d)].to_f32(), s);
                }
                let s = s * shape.scale;
                scores[slot] = s;
                bmax = bmax.max(s);
            }
            let o = &mut out[r * hd..(r + 1) * hd];
            let st = &mut state[r];
            if let Some(c) = st.rescale(bmax) {
                o.iter_mut().for_each(|v| *v *= c);
            }
            for slot in k0..=k1 {
                let e = exp_nonpos(scores[slot] - st.max);
                st.sum += e;
                let v =
                    &vc[shape.v_index(block, slot, g, 0)..shape.v_index(block, slot, g, 0) + hd];
                for (o, &v) in o.iter_mut().zip(v) {
                    *o = e.mul_add(v.to_f32(), *o);
                }
            }
        }
    }
    for (r, st) in state.iter().enumerate() {
        let inv = 1.0 / st.sum;
        out[r * hd..(r + 1) * hd].iter_mut().for_each(|v| *v *= inv);
    }
}

/// One token of the step for [`exact`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct TokenAt<'a> {
    pub(crate) pos: usize,
    pub(crate) table: &'a [u32],
}

/// llama.cpp's attention (without flash attention), rounded as its CPU graph rounds it: Q and
/// the probabilities meet the f16 cache at f16 precision (the caller rounds Q); the K·Q and P·V
/// dot products accumulate in tinyBLAS's lane order ([`Rounding::dot`]); the softmax uses
/// ggml's vectorised `expf` and sums one vector of lanes at a time in f64. Masked positions
/// contribute exact zeros, as llama.cpp's padded cells do.
pub(crate) fn exact(
    rounding: Rounding,
    shape: &Shape,
    q: &[f32],
    kc: &[f16],
    vc: &[f16],
    tokens: &[TokenAt<'_>],
    out: &mut [f32],
) {
    let (hd, nh) = (shape.head_dim, shape.heads);
    let group = nh / shape.kv_heads;
    let bs = shape.block_size;
    let r = rounding;
    let w = r.lanes();
    let target = OutPtr::new(out);
    Pool::global().run(tokens.len() * nh, &|idx| {
        let (ti, head) = (idx / nh, idx % nh);
        let m = tokens[ti];
        let g = head / group;
        let qv = &q[idx * hd..(idx + 1) * hd];
        let lo = lowest(m.pos, shape.window);
        let block = |p: usize| m.table[p / bs] as usize;
        let n = (m.pos + 1).next_multiple_of(w);
        let mut scores = vec![f32::NEG_INFINITY; n];
        let mut k = vec![0f32; hd];
        for (p, s) in scores.iter_mut().enumerate().take(m.pos + 1).skip(lo) {
            for (d, kd) in k.iter_mut().enumerate() {
                *kd = kc[shape.k_index(block(p), p % bs, g, d)].to_f32();
            }
            *s = r.dot(qv, &k) * shape.scale;
        }
        let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0f64;
        for grp in scores.chunks_exact_mut(w) {
            for x in grp.iter_mut() {
                *x = r.expf(*x - max);
            }
            sum += f64::from(r.hsum(grp));
        }
        let inv = (1.0 / sum) as f32;
        // P·V: lane l accumulates positions p ≡ l (mod w), in position order, with fused
        // multiply-adds (tinyBLAS over the position axis).
        let mut acc = vec![0f32; w * hd];
        for p in lo..=m.pos {
            let pr = f16::from_f32(scores[p] * inv).to_f32();
            let lane = &mut acc[(p % w) * hd..(p % w + 1) * hd];
            let at = shape.v_index(block(p), p % bs, g, 0);
            for (a, &vi) in lane.iter_mut().zip(&vc[at..at + hd]) {
                *a = pr.mul_add(vi.to_f32(), *a);
            }
        }
        let mut o = vec![0f32; hd];
        let mut lanes = [0f32; 16];
        for (i, oi) in o.iter_mut().enumerate() {
            for (l, x) in lanes.iter_mut().enumerate().take(w) {
                *x = acc[l * hd + i];
            }
            *oi = r.hsum(&lanes[..w]);
        }
        // SAFETY: task `idx` writes the one head `idx` of `out` (`[idx·hd, (idx + 1)·hd)`),
        // which no other task touches; `out` outlives the pool run.
        unsafe { target.write(idx * hd, &o) };
    });
}
