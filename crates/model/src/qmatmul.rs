//! Our own matmul for the 32-element GGML block types candle has no SIMD kernel for on x86
//! (Q4_1, Q5_0, Q5_1; profiling showed candle's scalar fallback at ~5 tok/s decode), plus
//! Q4_0 and Q8_0 so that every small-block type shares one fast path.
//!
//! Weights are unpacked once at load into i8 values with one f32 scale (and, for the
//! asymmetric types, one f32 offset) per 32 elements. Activations are quantized per 32-element
//! block exactly as llama.cpp's `quantize_row_q8_0/1` do (scale = amax/127 stored as f16,
//! round-half-even, block sum for the offset term), and each block's dot product is an i32 sum
//! the compiler vectorises (AVX2 `vpmaddwd` with `-C target-cpu=x86-64-v3`). Reproducing
//! llama.cpp's rounding keeps our logits close to its (the golden tests measure this).

use half::f16;
use rayon::prelude::*;

const QK: usize = 32;

/// A weight matrix `[rows, cols]` as i8 blocks of 32 with per-block scale (and offset).
#[derive(Debug, Clone)]
pub(crate) struct BlockQ8Matrix {
    rows: usize,
    cols: usize,
    q: Vec<i8>,
    d: Vec<f32>,
    m: Option<Vec<f32>>,
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

impl BlockQ8Matrix {
    /// Unpacks GGML blocks of type `type_id` (Q4_0 2, Q4_1 3, Q5_0 6, Q5_1 7, Q8_0 8);
    /// `None` for other types or sizes that do not fit.
    pub(crate) fn from_ggml(type_id: u32, bytes: &[u8], rows: usize, cols: usize) -> Option<Self> {
        let block_bytes = match type_id {
            2 => 18,
            3 => 20,
            6 => 22,
            7 => 24,
            8 => 34,
            _ => return None,
        };
        if !cols.is_multiple_of(QK) || bytes.len() != rows * cols / QK * block_bytes {
            return None;
        }
        let nb = rows * cols / QK;
        let mut q = vec![0i8; rows * cols];
        let mut d = vec![0f32; nb];
        let asym = matches!(type_id, 3 | 7);
        let mut m = if asym { vec![0f32; nb] } else { Vec::new() };
        for (bi, blk) in bytes.chunks_exact(block_bytes).enumerate() {
            let out = &mut q[bi * QK..(bi + 1) * QK];
            d[bi] = f16_at(blk, 0);
            match type_id {
                2 => {
                    let qs = &blk[2..18];
                    for j in 0..16 {
                        out[j] = (qs[j] & 0x0F) as i8 - 8;
                        out[j + 16] = (qs[j] >> 4) as i8 - 8;
                    }
                }
                3 => {
                    m[bi] = f16_at(blk, 2);
                    let qs = &blk[4..20];
                    for j in 0..16 {
                        out[j] = (qs[j] & 0x0F) as i8;
                        out[j + 16] = (qs[j] >> 4) as i8;
                    }
                }
                6 | 7 => {
                    let off = if type_id == 7 {
                        m[bi] = f16_at(blk, 2);
                        4
                    } else {
                        2
                    };
                    let qh =
                        u32::from_le_bytes([blk[off], blk[off + 1], blk[off + 2], blk[off + 3]]);
                    let qs = &blk[off + 4..off + 20];
                    let bias = if type_id == 6 { 16 } else { 0 };
                    for j in 0..16 {
                        let h0 = (((qh >> j) << 4) & 0x10) as u8;
                        let h1 = ((qh >> (j + 12)) & 0x10) as u8;
                        out[j] = ((qs[j] & 0x0F) | h0) as i8 - bias;
                        out[j + 16] = ((qs[j] >> 4) | h1) as i8 - bias;
                    }
                }
                _ => {
                    for (o, &b) in out.iter_mut().zip(&blk[2..34]) {
                        *o = b as i8;
                    }
                }
            }
        }
        for blk in q.chunks_exact_mut(QK) {
            permute_block(blk);
        }
        Some(Self {
            rows,
            cols,
            q,
            d,
            m: asym.then_some(m),
        })
    }

    /// `x [t, cols] → [t, rows]`.
    pub(crate) fn matmul(&self, x: &[f32], t: usize) -> Vec<f32> {
        Self::matmul_group(&[self], x, t).pop().unwrap_or_default()
    }

    /// [`BlockQ8Matrix::matmul`] of several matrices over the same input (q/k/v, gate/up):
    /// the input is quantized once and all their rows go through one parallel region, so a
    /// decode step pays rayon's wake-up and join once per group instead of once per matrix.
    /// Every output is bit-identical to `matmul`'s. Matrices whose `cols` differ from the
    /// first one's are multiplied on their own.
    pub(crate) fn matmul_group(mats: &[&Self], x: &[f32], t: usize) -> Vec<Vec<f32>> {
        let Some(k) = mats.first().map(|m| m.cols) else {
            return Vec::new();
        };
        if mats.iter().any(|m| m.cols != k) {
            return mats.iter().map(|m| m.matmul(x, t)).collect();
        }
        let act = QuantizedActs::new(x, t, k);
        // Rows in chunks: each chunk's weights stay in cache while every token passes. A
        // decode step (t = 1) is small work per row, so use few chunks there: rayon's per-task
        // overhead otherwise dominates (thousands of tasks per step).
        let tasks_per = (rayon::current_num_threads() * 4).max(1);
        let mut tasks = Vec::new();
        for (mi, m) in mats.iter().enumerate() {
            let n = m.rows;
            let chunk = n.div_ceil(tasks_per).max(16 / t.max(1)).max(1);
            tasks.extend((0..n.div_ceil(chunk)).map(|c| (mi, c * chunk, ((c + 1) * chunk).min(n))));
        }
        let parts: Vec<Vec<f32>> = tasks
            .par_iter()
            .map(|&(mi, r0, r1)| mats[mi].rows_part(&act, t, r0, r1))
            .collect();
        let mut outs: Vec<Vec<f32>> = mats.iter().map(|m| vec![0f32; t * m.rows]).collect();
        for (&(mi, r0, _), part) in tasks.iter().zip(&parts) {
            let (out, n) = (&mut outs[mi], mats[mi].rows);
            let rows = part.len() / t.max(1);
            for i in 0..rows {
                for ti in 0..t {
                    out[ti * n + r0 + i] = part[i * t + ti];
                }
            }
        }
        outs
    }

    /// Output rows `r0..r1` for every token, as `[row][token]`.
    fn rows_part(&self, act: &QuantizedActs, t: usize, r0: usize, r1: usize) -> Vec<f32> {
        let k = self.cols;
        let nb = k / QK;
        let mut part = vec![0f32; (r1 - r0) * t];
        for r in r0..r1 {
            let wq = &self.q[r * k..(r + 1) * k];
            let wd = &self.d[r * nb..(r + 1) * nb];
            let wm = self.m.as_ref().map(|m| &m[r * nb..(r + 1) * nb]);
            let out_row = &mut part[(r - r0) * t..(r - r0 + 1) * t];
            // Four tokens at a time share each loaded weight block.
            let mut ti = 0;
            while ti + 4 <= t {
                let a = |u: usize| &act.q[(ti + u) * k..(ti + u + 1) * k];
                let d = |u: usize| &act.d[(ti + u) * nb..(ti + u + 1) * nb];
                let acc = row_dot4(wq, wd, [a(0), a(1), a(2), a(3)], [d(0), d(1), d(2), d(3)]);
                out_row[ti..ti + 4].copy_from_slice(&acc);
                ti += 4;
            }
            for (tj, o) in out_row.iter_mut().enumerate().skip(ti) {
                let aq = &act.q[tj * k..(tj + 1) * k];
                let ad = &act.d[tj * nb..(tj + 1) * nb];
                *o = row_dot(wq, wd, aq, ad);
            }
            if let Some(wm) = wm {
                // llama.cpp: `summs += m·s` block by block, added after the lanes.
                for (ti, o) in out_row.iter_mut().enumerate() {
                    let asum = &act.s[ti * nb..(ti + 1) * nb];
                    let summs = wm
                        .iter()
                        .zip(asum)
                        .fold(0f32, |acc, (&m, &s)| m.mul_add(s, acc));
                    *o += summs;
                }
            }
        }
        part
    }
}

/// ggml's AVX2 horizontal sum of eight lanes (`hsum_float_8`), in its order.
#[inline(always)]
fn hsum8(a: &[f32; 8]) -> f32 {
    let r = [a[4] + a[0], a[5] + a[1], a[6] + a[2], a[7] + a[3]];
    (r[0] + r[2]) + (r[1] + r[3])
}

/// Where element `i` of a 32-element block is stored: ggml's AVX2 kernels sum elements
/// `4j..4j+4` into lane `j` (`maddubs` + `madd`); storing element `4j + k` at `j + 8k` (weights
/// at load, activations when quantized) lets [`block_lanes`] form exactly those lane sums with
/// plain strided arithmetic that LLVM vectorises.
#[inline(always)]
fn permute_block(b: &mut [i8]) {
    let src: [i8; QK] = match <[i8; QK]>::try_from(&*b) {
        Ok(a) => a,
        Err(_) => return,
    };
    for j in 0..8 {
        for k in 0..4 {
            b[j + 8 * k] = src[4 * j + k];
        }
    }
}

/// One block's integer dot product in ggml's lane layout (see [`permute_block`]): lane `j`
/// holds the exact sum over original elements `4j..4j+4`, exactly representable in f32.
#[inline(always)]
fn block_lanes(w: &[i8; QK], a: &[i8; QK]) -> [f32; 8] {
    let mut s = [0f32; 8];
    for (j, lane) in s.iter_mut().enumerate() {
        let t = i32::from(w[j]) * i32::from(a[j])
            + i32::from(w[j + 8]) * i32::from(a[j + 8])
            + i32::from(w[j + 16]) * i32::from(a[j + 16])
            + i32::from(w[j + 24]) * i32::from(a[j + 24]);
        *lane = t as f32;
    }
    s
}

/// Σ_b wd[b]·ad[b]·(wq_b · aq_b), rounded exactly as llama.cpp's AVX2 `ggml_vec_dot_q*_q8_*`
/// (and llamafile's tinyBLAS) round it: per block `acc_j = fma(d_w·d_a, lane_j, acc_j)` over
/// eight lanes, then `hsum_float_8`. Bit-equal results keep the next layer's 8-bit
/// requantization on the same side of every rounding boundary as llama.cpp's.
#[inline(always)]
fn row_dot(wq: &[i8], wd: &[f32], aq: &[i8], ad: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    for (((w, a), &dw), &da) in wq.chunks_exact(QK).zip(aq.chunks_exact(QK)).zip(wd).zip(ad) {
        let (Ok(w), Ok(a)) = (<&[i8; QK]>::try_from(w), <&[i8; QK]>::try_from(a)) else {
            continue;
        };
        let lanes = block_lanes(w, a);
        let d = dw * da;
        for j in 0..8 {
            acc[j] = d.mul_add(lanes[j], acc[j]);
        }
    }
    hsum8(&acc)
}

/// Activations quantized to i8 per 32-element block, as llama.cpp's Q8_0/Q8_1 do.
struct QuantizedActs {
    q: Vec<i8>,
    /// Block scales, rounded through f16 as llama.cpp stores them.
    d: Vec<f32>,
    /// d × Σq per block (Q8_1's `s`), through f16.
    s: Vec<f32>,
}

impl QuantizedActs {
    fn new(x: &[f32], t: usize, k: usize) -> Self {
        let nb = k / QK;
        let mut q = vec![0i8; t * k];
        let mut d = vec![0f32; t * nb];
        let mut s = vec![0f32; t * nb];
        for ((xs, qs), (dd, ss)) in x
            .chunks_exact(QK)
            .zip(q.chunks_exact_mut(QK))
            .zip(d.iter_mut().zip(s.iter_mut()))
        {
            let amax = xs.iter().fold(0f32, |a, &v| a.max(v.abs()));
            let scale = amax / 127.0;
            let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
            let mut sum = 0i32;
            for (o, &v) in qs.iter_mut().zip(xs) {
                let r = (v * id).round_ties_even() as i32;
                *o = r as i8;
                sum += r;
            }
            *dd = f16::from_f32(scale).to_f32();
            *ss = f16::from_f32(scale * sum as f32).to_f32();
            permute_block(qs);
        }
        Self { q, d, s }
    }
}

/// [`row_dot`] for four activation rows at once (each row's arithmetic is identical to
/// `row_dot`'s; only the weight loads are shared).
#[inline(always)]
fn row_dot4(wq: &[i8], wd: &[f32], a: [&[i8]; 4], ad: [&[f32]; 4]) -> [f32; 4] {
    let mut acc = [[0f32; 8]; 4];
    let nb = wd.len();
    for b in 0..nb {
        let w: &[i8; QK] = match wq[b * QK..(b + 1) * QK].try_into() {
            Ok(w) => w,
            Err(_) => return [0.0; 4],
        };
        for u in 0..4 {
            let x: &[i8; QK] = match a[u][b * QK..(b + 1) * QK].try_into() {
                Ok(x) => x,
                Err(_) => return [0.0; 4],
            };
            let lanes = block_lanes(w, x);
            let d = wd[b] * ad[u][b];
            for j in 0..8 {
                acc[u][j] = d.mul_add(lanes[j], acc[u][j]);
            }
        }
    }
    [
        hsum8(&acc[0]),
        hsum8(&acc[1]),
        hsum8(&acc[2]),
        hsum8(&acc[3]),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    /// Our unpacking and matmul against candle's dequantization and an f32 matmul, for every
    /// block type we take over: errors stay at activation-quantization level.
    #[test]
    fn matches_candle_dequantized_matmul() {
        let (rows, cols, t) = (8, 64, 7);
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 40.0)
            .collect();
        let x: Vec<f32> = (0..t * cols)
            .map(|i| ((i * 13 % 29) as f32 - 14.0) / 7.0)
            .collect();
        let wt = Tensor::from_vec(w, (rows, cols), &Device::Cpu).unwrap();
        for (dtype, id) in [
            (GgmlDType::Q4_0, 2),
            (GgmlDType::Q4_1, 3),
            (GgmlDType::Q5_0, 6),
            (GgmlDType::Q5_1, 7),
            (GgmlDType::Q8_0, 8),
        ] {
            let qt = QTensor::quantize(&wt, dtype).unwrap();
            let bytes = qt.data().unwrap();
            let ours = BlockQ8Matrix::from_ggml(id, &bytes, rows, cols).unwrap();
            let deq: Vec<f32> = qt
                .dequantize(&Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let y = ours.matmul(&x, t);
            for ti in 0..t {
                for r in 0..rows {
                    let exact: f32 = (0..cols)
                        .map(|c| deq[r * cols + c] * x[ti * cols + c])
                        .sum();
                    let got = y[ti * rows + r];
                    assert!(
                        (got - exact).abs() < 0.05 * (1.0 + exact.abs()),
                        "{dtype:?} r{r} t{ti}: {got} vs {exact}"
                    );
                }
            }
        }
        assert!(BlockQ8Matrix::from_ggml(12, &[0; 144], 1, 256).is_none());
    }

    /// Grouped matmuls (one activation quantization, one parallel region) give exactly the
    /// bits of separate ones, for decode-sized and prefill-sized steps and mixed block types.
    #[test]
    fn grouped_matmul_is_bit_identical() {
        let cols = 96;
        let w = |rows: usize, seed: usize| -> Tensor {
            let v: Vec<f32> = (0..rows * cols)
                .map(|i| (((i + seed) * 37 % 101) as f32 - 50.0) / 40.0)
                .collect();
            Tensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap()
        };
        let mats: Vec<BlockQ8Matrix> = [(GgmlDType::Q4_1, 3, 40, 1), (GgmlDType::Q8_0, 8, 13, 2)]
            .into_iter()
            .chain([(GgmlDType::Q4_0, 2, 7, 3)])
            .map(|(dtype, id, rows, seed)| {
                let qt = QTensor::quantize(&w(rows, seed), dtype).unwrap();
                BlockQ8Matrix::from_ggml(id, &qt.data().unwrap(), rows, cols).unwrap()
            })
            .collect();
        let refs: Vec<&BlockQ8Matrix> = mats.iter().collect();
        for t in [1, 3, 9] {
            let x: Vec<f32> = (0..t * cols)
                .map(|i| ((i * 13 % 29) as f32 - 14.0) / 7.0)
                .collect();
            let grouped = BlockQ8Matrix::matmul_group(&refs, &x, t);
            assert_eq!(grouped.len(), mats.len());
            for (m, g) in mats.iter().zip(&grouped) {
                let alone = m.matmul(&x, t);
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(g), bits(&alone), "t = {t}, rows = {}", m.rows);
            }
        }
    }
}
