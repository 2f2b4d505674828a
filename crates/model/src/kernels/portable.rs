//! The reference kernels: safe Rust, one output at a time. They *define* the arithmetic every
//! other path must reproduce bit for bit: an exact integer dot product per block (or group),
//! then a fixed sequence of f32 operations. For the 32-element types and Q4_K/Q6_K that
//! sequence is llama.cpp's (see `ggml_math`), so the exact and the fast arithmetic share these
//! kernels and differ only in [`KForm`] (which of llama.cpp's K-quant kernels a token takes).

use std::ops::Range;

use super::quant::{
    Acts, KBlock, Q8Acts, Q8KActs, QK, QK_K, QMatrix, WType, decode_block, decode_kblock,
};
use super::{Arithmetic, hsum8};

/// How a K-quant dot product is accumulated in f32; the integer sums are the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum KForm {
    /// One f32 step per super-block: Q4_K/Q5_K as llama.cpp's one-row GEMV
    /// (`fma(Σ sc·q·a, d_w·d_a, acc)`, mins likewise), Q6_K as its tiled matmul
    /// (`fma(Σ·d_w, d_a, acc)`). The fast path's only form: it does not depend on the step.
    PerBlock,
    /// Q4_K: one step per 64 elements (llama.cpp's repacked four-row GEMM). Q6_K: eight lanes
    /// with fused multiply-adds and `hsum_float_8` (`ggml_vec_dot_q6_K_q8_K`). Other types
    /// ignore it.
    Fine,
}

impl KForm {
    /// The form llama.cpp's CPU backend takes for row `i` of a step of `len` rows with weights
    /// of `wtype` (the exact arithmetic): Q4_K is repacked, so the first `len − len % 4` rows go
    /// through the four-row GEMM; Q6_K goes through the tiled matmul from 8 rows.
    pub(crate) fn llama_cpp(wtype: WType, i: usize, len: usize) -> KForm {
        match wtype {
            WType::Q4K if i < len - len % 4 => KForm::Fine,
            WType::Q6K if len < 8 => KForm::Fine,
            _ => KForm::PerBlock,
        }
    }
}

/// Output `(r, t)`: row `r` of `m` against token `t` of `acts`, in arithmetic `arith` (with
/// the K-quant form `form`).
pub(crate) fn dot(
    m: &QMatrix,
    r: usize,
    acts: &Acts,
    t: usize,
    arith: Arithmetic,
    form: KForm,
) -> f32 {
    let row = m.row(r);
    match acts {
        Acts::F32 { x, cols, .. } => dot_dense(m.wtype, row, &x[t * cols..(t + 1) * cols]),
        Acts::Q8(a) if arith == Arithmetic::Exact => dot_q8(m.wtype, row, a, t),
        Acts::Q8(a) => dot_q8_sums(m.wtype, row, a, t),
        Acts::Q8K(a) => dot_k(m.wtype, row, a, t, form),
    }
}

/// Every output of `rows × toks`, as `out[(t − toks.start) · rows.len() + (r − rows.start)]`.
pub(crate) fn tile(
    m: &QMatrix,
    rows: Range<usize>,
    acts: &Acts,
    toks: Range<usize>,
    arith: Arithmetic,
    forms: &[KForm],
    out: &mut [f32],
) {
    let n = rows.len();
    for (ti, t) in toks.enumerate() {
        for (ri, r) in rows.clone().enumerate() {
            out[ti * n + ri] = dot(m, r, acts, t, arith, forms[t]);
        }
    }
}

/// Dense weights: lane `j` accumulates elements `i ≡ j (mod 8)` in order with fused
/// multiply-adds, then `hsum_float_8`.
fn dot_dense(wtype: WType, row: &[u8], x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let w = |i: usize| -> f32 {
        match wtype {
            WType::F32 => {
                f32::from_le_bytes([row[4 * i], row[4 * i + 1], row[4 * i + 2], row[4 * i + 3]])
            }
            WType::F16 => half::f16::from_le_bytes([row[2 * i], row[2 * i + 1]]).to_f32(),
            _ => half::bf16::from_le_bytes([row[2 * i], row[2 * i + 1]]).to_f32(),
        }
    };
    for (i, &xi) in x.iter().enumerate() {
        acc[i % 8] = w(i).mul_add(xi, acc[i % 8]);
    }
    hsum8(&acc)
}

/// The 32-element types, as llama.cpp's AVX2/AVX-512 `ggml_vec_dot_q*_q8_*` (and tinyBLAS)
/// round them: per block, lane `j` is the exact integer sum over elements `4j..4j+4`; each lane
/// takes `fma(d_w·d_a, lane, acc_j)` in block order; then `hsum_float_8`. Types with a minimum
/// add `Σ m·s` (fused, in block order) after the lanes.
pub(crate) fn dot_q8(wtype: WType, row: &[u8], a: &Q8Acts, t: usize) -> f32 {
    let nb = a.cols / QK;
    let bb = wtype.block_bytes();
    let aq = a.q_row(t);
    let (ad, asum) = (&a.d[t * nb..(t + 1) * nb], &a.s[t * nb..(t + 1) * nb]);
    let mut acc = [0f32; 8];
    let mut summs = 0f32;
    let mut v = [0i32; QK];
    for b in 0..nb {
        let (dw, mw) = decode_block(wtype, &row[b * bb..(b + 1) * bb], &mut v);
        let x = &aq[b * QK..(b + 1) * QK];
        let d = dw * ad[b];
        for (j, acc) in acc.iter_mut().enumerate() {
            let lane: i32 = (4 * j..4 * j + 4).map(|i| v[i] * i32::from(x[i])).sum();
            *acc = d.mul_add(lane as f32, *acc);
        }
        if wtype.has_min() {
            summs = mw.mul_add(asum[b], summs);
        }
    }
    let r = hsum8(&acc);
    if wtype.has_min() { r + summs } else { r }
}

/// The 32-element types in the fast arithmetic: per block the exact integer total
/// `Σ value·code` (32 products), then `acc[b mod 8] = fma(d_w·d_a, total, acc[b mod 8])` and,
/// for the types with a minimum, `acc[b mod 8] = fma(m, s, acc[b mod 8])`; then
/// `hsum_float_8`. One f32 step per block instead of eight (llama.cpp's form), which is what
/// makes many-token steps (prefill, batched decode) cheap; still one fixed order per output.
pub(crate) fn dot_q8_sums(wtype: WType, row: &[u8], a: &Q8Acts, t: usize) -> f32 {
    let nb = a.cols / QK;
    let bb = wtype.block_bytes();
    let aq = a.q_row(t);
    let (ad, asum) = (&a.d[t * nb..(t + 1) * nb], &a.s[t * nb..(t + 1) * nb]);
    let mut acc = [0f32; 8];
    let mut v = [0i32; QK];
    for b in 0..nb {
        let (dw, mw) = decode_block(wtype, &row[b * bb..(b + 1) * bb], &mut v);
        let x = &aq[b * QK..(b + 1) * QK];
        let total: i32 = v.iter().zip(x).map(|(&v, &x)| v * i32::from(x)).sum();
        let lane = &mut acc[b % 8];
        *lane = (dw * ad[b]).mul_add(total as f32, *lane);
        if wtype.has_min() {
            *lane = mw.mul_add(asum[b], *lane);
        }
    }
    hsum8(&acc)
}

/// The K-quants (see [`KForm`] for Q4_K and Q6_K's two forms).
pub(crate) fn dot_k(wtype: WType, row: &[u8], a: &Q8KActs, t: usize, form: KForm) -> f32 {
    let nb = a.cols / QK_K;
    let bb = wtype.block_bytes();
    let aq = a.q_row(t);
    let ad = &a.d[t * nb..(t + 1) * nb];
    let bsums = &a.bsums[t * nb * 16..(t + 1) * nb * 16];
    let mut kb = KBlock::new();
    let (mut acc, mut acc_min) = (0f32, 0f32);
    let mut lanes_acc = [0f32; 8];
    for b in 0..nb {
        decode_kblock(wtype, &row[b * bb..(b + 1) * bb], &mut kb);
        let x = &aq[b * QK_K..(b + 1) * QK_K];
        let bs: [i32; 16] = std::array::from_fn(|g| i32::from(bsums[b * 16 + g]));
        let da = ad[b];
        let dot =
            |lo: usize, hi: usize| -> i32 { (lo..hi).map(|i| kb.q[i] * i32::from(x[i])).sum() };
        match wtype {
            WType::Q4K | WType::Q5K => {
                let (mut isum, mut imin) = (0i32, 0i32);
                for sb in 0..8 {
                    isum += kb.scales[sb] * dot(32 * sb, 32 * sb + 32);
                    imin += kb.mins[sb] * (bs[2 * sb] + bs[2 * sb + 1]);
                    if wtype == WType::Q4K && form == KForm::Fine && sb % 2 == 1 {
                        acc = (isum as f32).mul_add(kb.d * da, acc);
                        acc_min = (imin as f32).mul_add(kb.dmin * da, acc_min);
                        (isum, imin) = (0, 0);
                    }
                }
                if wtype == WType::Q5K || form == KForm::PerBlock {
                    acc = (isum as f32).mul_add(kb.d * da, acc);
                    acc_min = (imin as f32).mul_add(kb.dmin * da, acc_min);
                }
            }
            WType::Q6K => match form {
                KForm::PerBlock => {
                    let mut isum = 0i32;
                    for g in 0..16 {
                        isum += kb.scales[g] * (dot(16 * g, 16 * g + 16) - 32 * bs[g]);
                    }
                    acc = (isum as f32 * kb.d).mul_add(da, acc);
                }
                KForm::Fine => {
                    // Lane j: elements 32G + 4j .. + 4 of each 32-element group G, each sum
                    // times its 16-element group's scale.
                    let mut lanes = [0i32; 8];
                    for g32 in 0..8 {
                        for (j, lane) in lanes.iter_mut().enumerate() {
                            let base = 32 * g32 + 4 * j;
                            *lane += kb.scales[2 * g32 + j / 4] * dot(base, base + 4);
                        }
                    }
                    let dd = da * kb.d;
                    for (j, (l, acc)) in lanes.iter().zip(lanes_acc.iter_mut()).enumerate() {
                        let sub = 32
                            * (bs[2 * j] * kb.scales[2 * j] + bs[2 * j + 1] * kb.scales[2 * j + 1]);
                        *acc = dd.mul_add((l - sub) as f32, *acc);
                    }
                }
            },
            WType::Q2K => {
                let (mut isum, mut imin) = (0i32, 0i32);
                for g in 0..16 {
                    isum += kb.scales[g] * dot(16 * g, 16 * g + 16);
                    imin += kb.mins[g] * bs[g];
                }
                acc = (isum as f32).mul_add(kb.d * da, acc);
                acc_min = (imin as f32).mul_add(kb.dmin * da, acc_min);
            }
            WType::Q3K => {
                let mut isum = 0i32;
                for g in 0..16 {
                    isum += kb.scales[g] * dot(16 * g, 16 * g + 16);
                }
                acc = (isum as f32).mul_add(kb.d * da, acc);
            }
            _ => {}
        }
    }
    if wtype == WType::Q6K && form == KForm::Fine {
        return hsum8(&lanes_acc);
    }
    acc - acc_min
}
