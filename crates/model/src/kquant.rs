//! Q4_K and Q6_K matmuls (Gemma 3's `attn_output` and `ffn_down`) rounded as llama.cpp's x86
//! kernels round them, so that their outputs, and the 8-bit requantizations downstream, match
//! llama.cpp's bit for bit (see `ggml_math`); candle's kernels accumulate in another order.
//!
//! Activations are quantized per 256 elements as `quantize_row_q8_K` does (`-127/max`,
//! round-half-even of the f32 product, f32 scale, 16-element sums). llama.cpp then picks a
//! kernel by the shape of the step, and each rounds differently, so we pick the same way:
//! - Q4_K is repacked into 8×8 interleaved blocks on x86. The first `t - t % 4` rows of a step
//!   go through the four-row GEMM, which adds the exact integer sums `Σ sc·q4·q8` and
//!   `Σ min·bsum` into two f32 accumulators with a fused multiply-add (`d_w·d_a`,
//!   `dmin_w·d_a`) every 64 elements; the remaining rows through the GEMV, which does the
//!   same once per 256-element super-block. The result is the difference.
//! - Q6_K goes through ggml's tiled K-quant matmul when the step has 8 rows or more (per
//!   super-block `fma(f32(Σ sc·(q−32)·q8)·d_w, d_a, acc)`), and otherwise through
//!   `ggml_vec_dot_q6_K_q8_K` (eight i32 lanes, lane `j` holding elements `32g+4j..+4` of
//!   every 32-element group, each lane `fma(d_w·d_a, lane, acc)`, then `hsum_float_8`).
//!
//! "Step" means one sequence's chunk here (llama.cpp runs one sequence per step in the golden
//! runs): decode rows, one per sequence, always take the one-row kernels, so batching
//! sequences together does not change their results. A chunked prefill, or recomputing a
//! preempted sequence as one prefill, does change which kernel some tokens take, exactly as a
//! different batch size does in llama.cpp; for models with K-quant weights the last bits (and
//! rarely a greedy token) can then differ. Block-quant models (SmolLM2's Q4_1/Q8_0) are
//! unaffected.

use half::f16;
use rayon::prelude::*;

use crate::ggml_math::hsum8;

const QK_K: usize = 256;

/// A Q4_K or Q6_K matrix `[rows, cols]`, unpacked to one byte per weight.
#[derive(Debug, Clone)]
pub(crate) struct KQuantMatrix {
    rows: usize,
    cols: usize,
    kind: Kind,
    /// Quant values in element order (Q4_K 0..15, Q6_K 0..63).
    q: Vec<u8>,
    /// Per super-block: `d` (f16 → f32).
    d: Vec<f32>,
    /// Q4_K: per super-block `dmin`; empty for Q6_K.
    dmin: Vec<f32>,
    /// Q4_K: 8 scales and 8 mins per super-block; Q6_K: 16 signed scales.
    scales: Vec<i32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Q4K,
    Q6K,
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

impl KQuantMatrix {
    /// Unpacks GGML Q4_K (type 12) or Q6_K (type 14) data; `None` for other types or sizes.
    pub(crate) fn from_ggml(type_id: u32, bytes: &[u8], rows: usize, cols: usize) -> Option<Self> {
        let (kind, block_bytes) = match type_id {
            12 => (Kind::Q4K, 144),
            14 => (Kind::Q6K, 210),
            _ => return None,
        };
        if !cols.is_multiple_of(QK_K) || bytes.len() != rows * cols / QK_K * block_bytes {
            return None;
        }
        let nb = rows * cols / QK_K;
        let mut q = vec![0u8; rows * cols];
        let mut d = vec![0f32; nb];
        let mut dmin = Vec::new();
        let mut scales = Vec::with_capacity(nb * 16);
        for (bi, blk) in bytes.chunks_exact(block_bytes).enumerate() {
            let out = &mut q[bi * QK_K..(bi + 1) * QK_K];
            match kind {
                Kind::Q4K => {
                    d[bi] = f16_at(blk, 0);
                    dmin.push(f16_at(blk, 2));
                    let sc = &blk[4..16];
                    let (mut s8, mut m8) = ([0i32; 8], [0i32; 8]);
                    for j in 0..8 {
                        let (s, m) = if j < 4 {
                            (sc[j] & 63, sc[j + 4] & 63)
                        } else {
                            (
                                (sc[j + 4] & 0xF) | ((sc[j - 4] >> 6) << 4),
                                (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4),
                            )
                        };
                        (s8[j], m8[j]) = (i32::from(s), i32::from(m));
                    }
                    scales.extend_from_slice(&s8);
                    scales.extend_from_slice(&m8);
                    let qs = &blk[16..144];
                    for c in 0..4 {
                        for l in 0..32 {
                            out[64 * c + l] = qs[32 * c + l] & 0xF;
                            out[64 * c + 32 + l] = qs[32 * c + l] >> 4;
                        }
                    }
                }
                Kind::Q6K => {
                    let (ql, qh, sc) = (&blk[0..128], &blk[128..192], &blk[192..208]);
                    d[bi] = f16_at(blk, 208);
                    scales.extend(sc.iter().map(|&s| i32::from(s as i8)));
                    for h in 0..2 {
                        let (ql, qh) = (&ql[64 * h..], &qh[32 * h..]);
                        let o = &mut out[128 * h..];
                        for l in 0..32 {
                            o[l] = (ql[l] & 0xF) | ((qh[l] & 3) << 4);
                            o[l + 32] = (ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4);
                            o[l + 64] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
                            o[l + 96] = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
                        }
                    }
                }
            }
        }
        Some(Self {
            rows,
            cols,
            kind,
            q,
            d,
            dmin,
            scales,
        })
    }

    /// `x [t, cols] → [t, rows]`; `chunks` are the lengths of the sequences' runs of rows.
    pub(crate) fn matmul(&self, x: &[f32], chunks: &[usize]) -> Vec<f32> {
        let t: usize = chunks.iter().sum();
        // (index within its sequence's chunk, chunk length) per row.
        let pos: Vec<(usize, usize)> = chunks
            .iter()
            .flat_map(|&len| (0..len).map(move |i| (i, len)))
            .collect();
        let (k, n) = (self.cols, self.rows);
        let nb = k / QK_K;
        let acts: Vec<Q8K> = x.chunks_exact(k).map(Q8K::new).collect();
        let mut out = vec![0f32; t * n];
        if t == 0 || n == 0 {
            return out;
        }
        // Results as [row][token], filled in chunks of rows: one task per chunk rather than a
        // small Vec per row (a decode step's LM-sized matrices have thousands of rows). Each
        // output's arithmetic is the same whatever the chunking.
        let chunk = n.div_ceil((rayon::current_num_threads() * 4).max(1)).max(1);
        let mut by_row = vec![0f32; n * t];
        by_row
            .par_chunks_mut(chunk * t)
            .enumerate()
            .for_each(|(c, rows)| {
                for (i, row_out) in rows.chunks_exact_mut(t).enumerate() {
                    let r = c * chunk + i;
                    let q = &self.q[r * k..(r + 1) * k];
                    let d = &self.d[r * nb..(r + 1) * nb];
                    let sc = &self.scales[r * nb * 16..(r + 1) * nb * 16];
                    for ((o, a), &(i, len)) in row_out.iter_mut().zip(&acts).zip(&pos) {
                        *o = match self.kind {
                            // llama.cpp's repacked Q4_K: four-row GEMM for the first
                            // `len - len % 4` rows, one-row GEMV for the rest.
                            Kind::Q4K => {
                                let dmin = &self.dmin[r * nb..(r + 1) * nb];
                                q4k_dot(q, d, dmin, sc, a, i < len - len % 4)
                            }
                            // ggml's tiled K-quant matmul from 8 rows, `vec_dot` below.
                            Kind::Q6K if len >= 8 => q6k_dot_tiled(q, d, sc, a),
                            Kind::Q6K => q6k_dot(q, d, sc, a),
                        };
                    }
                }
            });
        for (r, col) in by_row.chunks_exact(t).enumerate() {
            for (ti, v) in col.iter().enumerate() {
                out[ti * n + r] = *v;
            }
        }
        out
    }
}

/// One activation row quantized as `quantize_row_q8_K`.
struct Q8K {
    q: Vec<i8>,
    d: Vec<f32>,
    bsums: Vec<i32>,
}

impl Q8K {
    fn new(x: &[f32]) -> Self {
        let mut q = vec![0i8; x.len()];
        let mut d = Vec::with_capacity(x.len() / QK_K);
        let mut bsums = Vec::with_capacity(x.len() / 16);
        for (xs, qs) in x.chunks_exact(QK_K).zip(q.chunks_exact_mut(QK_K)) {
            let (mut max, mut amax) = (0f32, 0f32);
            for &v in xs {
                if v.abs() > amax {
                    amax = v.abs();
                    max = v;
                }
            }
            if amax == 0.0 {
                d.push(0.0);
                bsums.extend([0; 16]);
                continue;
            }
            let iscale = -127.0 / max;
            for (o, &v) in qs.iter_mut().zip(xs) {
                *o = ((iscale * v).round_ties_even() as i32).min(127) as i8;
            }
            bsums.extend(
                qs.chunks_exact(16)
                    .map(|c| c.iter().map(|&v| i32::from(v)).sum::<i32>()),
            );
            d.push(1.0 / iscale);
        }
        Self { q, d, bsums }
    }
}

fn q4k_dot(q: &[u8], d: &[f32], dmin: &[f32], sc: &[i32], a: &Q8K, per64: bool) -> f32 {
    let (mut acc, mut acc_min) = (0f32, 0f32);
    for (b, ((&dw, &mw), (qb, ab))) in d
        .iter()
        .zip(dmin)
        .zip(q.chunks_exact(QK_K).zip(a.q.chunks_exact(QK_K)))
        .enumerate()
    {
        let (s8, m8) = (&sc[b * 16..b * 16 + 8], &sc[b * 16 + 8..b * 16 + 16]);
        let bs = &a.bsums[b * 16..(b + 1) * 16];
        let da = a.d[b];
        let mut isum = 0i32;
        let mut imin = 0i32;
        for sb in 0..8 {
            let mut s = 0i32;
            for (&w, &x) in qb[32 * sb..32 * sb + 32]
                .iter()
                .zip(&ab[32 * sb..32 * sb + 32])
            {
                s += i32::from(w) * i32::from(x);
            }
            isum += s8[sb] * s;
            imin += m8[sb] * (bs[2 * sb] + bs[2 * sb + 1]);
            if per64 && sb % 2 == 1 {
                acc = (isum as f32).mul_add(dw * da, acc);
                acc_min = (imin as f32).mul_add(mw * da, acc_min);
                (isum, imin) = (0, 0);
            }
        }
        if !per64 {
            acc = (isum as f32).mul_add(dw * da, acc);
            acc_min = (imin as f32).mul_add(mw * da, acc_min);
        }
    }
    acc - acc_min
}

/// ggml's tiled K-quant matmul (AVX-512): per super-block the exact integer
/// `Σ sc·(q − 32)·q8`, times `d_w`, times `d_a`, added in block order without fusing.
fn q6k_dot_tiled(q: &[u8], d: &[f32], sc: &[i32], a: &Q8K) -> f32 {
    let mut out = 0f32;
    for (b, (&dw, (qb, ab))) in d
        .iter()
        .zip(q.chunks_exact(QK_K).zip(a.q.chunks_exact(QK_K)))
        .enumerate()
    {
        let s = &sc[b * 16..(b + 1) * 16];
        let mut isum = 0i32;
        for (g, (qg, ag)) in qb.chunks_exact(16).zip(ab.chunks_exact(16)).enumerate() {
            let raw: i32 = qg
                .iter()
                .zip(ag)
                .map(|(&w, &x)| i32::from(w) * i32::from(x))
                .sum();
            isum += s[g] * (raw - 32 * a.bsums[b * 16 + g]);
        }
        out = (isum as f32 * dw).mul_add(a.d[b], out);
    }
    out
}

fn q6k_dot(q: &[u8], d: &[f32], sc: &[i32], a: &Q8K) -> f32 {
    let mut acc = [0f32; 8];
    for (b, (&dw, (qb, ab))) in d
        .iter()
        .zip(q.chunks_exact(QK_K).zip(a.q.chunks_exact(QK_K)))
        .enumerate()
    {
        let s = &sc[b * 16..(b + 1) * 16];
        let bs = &a.bsums[b * 16..(b + 1) * 16];
        let mut lanes = [0i32; 8];
        for h in 0..2 {
            for g in 0..4 {
                let base = 128 * h + 32 * g;
                for (j, lane) in lanes.iter_mut().enumerate() {
                    let scale = s[8 * h + 2 * g + j / 4];
                    let mut t = 0i32;
                    for kk in 0..4 {
                        let i = base + 4 * j + kk;
                        t += i32::from(qb[i]) * i32::from(ab[i]);
                    }
                    *lane += scale * t;
                }
            }
        }
        let dd = a.d[b] * dw;
        for (j, lane) in lanes.iter().enumerate() {
            let sub = 32 * (bs[2 * j] * s[2 * j] + bs[2 * j + 1] * s[2 * j + 1]);
            acc[j] = dd.mul_add((lane - sub) as f32, acc[j]);
        }
    }
    hsum8(&acc)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    /// Unpacking and arithmetic against candle's own K-quant matmul, which quantizes the
    /// activations to Q8_K the same way and differs only in summation order.
    #[test]
    fn matches_candle_qmatmul() {
        let (rows, cols, t) = (8, 512, 3);
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 40.0)
            .collect();
        let x: Vec<f32> = (0..t * cols)
            .map(|i| ((i * 13 % 29) as f32 - 14.0) / 7.0)
            .collect();
        let wt = Tensor::from_vec(w, (rows, cols), &Device::Cpu).unwrap();
        let xt = Tensor::from_vec(x.clone(), (t, cols), &Device::Cpu).unwrap();
        for (dtype, id) in [(GgmlDType::Q4K, 12), (GgmlDType::Q6K, 14)] {
            let qt = QTensor::quantize(&wt, dtype).unwrap();
            let bytes = qt.data().unwrap();
            let ours = KQuantMatrix::from_ggml(id, &bytes, rows, cols).unwrap();
            let qm = candle_core::quantized::QMatMul::from_qtensor(qt).unwrap();
            let want: Vec<f32> = candle_core::Module::forward(&qm, &xt)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let got = ours.matmul(&x, &[1; 3]);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g - w).abs() < 1e-4 * (1.0 + w.abs()),
                    "{dtype:?} output {i}: {g} vs candle {w}"
                );
            }
        }
        assert!(KQuantMatrix::from_ggml(8, &[0; 34], 1, 32).is_none());
    }
}
