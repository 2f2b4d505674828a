//! GGML weight types as they lie in a GGUF file, and the activation quantizations they are
//! multiplied with.
//!
//! Weights are never unpacked at load: a [`QMatrix`] is a view of the file's bytes (usually a
//! memory map), and kernels decode each block in registers. This module describes the block
//! layouts and decodes one block at a time for the reference kernels and for embedding lookups.
//!
//! Activations are quantized per step as llama.cpp quantizes them, because its rounding is
//! what the exact arithmetic must reproduce: [`Q8Acts`] per 32 elements (`quantize_row_q8_0`
//! and `q8_1`: scale `amax/127` through f16, round-half-even, the block sum for asymmetric
//! weights) for the 32-element block types, and per 256 elements (`quantize_row_q8_K`: scale
//! `-127/max`, f32, sums per 16) for the K-quants.

use half::{bf16, f16};

use crate::mmap::Bytes;

/// Elements per block of the 32-element ("legacy") types.
pub(crate) const QK: usize = 32;
/// Elements per super-block of the K-quants.
pub(crate) const QK_K: usize = 256;

/// A weight type the kernels multiply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum WType {
    F32,
    F16,
    Bf16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
}

/// How a weight type's activations are quantized.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum ActKind {
    /// Plain f32.
    F32,
    /// 8-bit per 32 elements.
    Q8,
    /// 8-bit per 256 elements.
    Q8K,
}

impl WType {
    /// The type of a GGML type id, when we compute with it.
    pub(crate) fn from_ggml(id: u32) -> Option<WType> {
        Some(match id {
            0 => WType::F32,
            1 => WType::F16,
            2 => WType::Q4_0,
            3 => WType::Q4_1,
            6 => WType::Q5_0,
            7 => WType::Q5_1,
            8 => WType::Q8_0,
            10 => WType::Q2K,
            11 => WType::Q3K,
            12 => WType::Q4K,
            13 => WType::Q5K,
            14 => WType::Q6K,
            30 => WType::Bf16,
            _ => return None,
        })
    }

    /// Elements per block.
    pub(crate) fn block_elems(self) -> usize {
        match self {
            WType::F32 | WType::F16 | WType::Bf16 => 1,
            WType::Q4_0 | WType::Q4_1 | WType::Q5_0 | WType::Q5_1 | WType::Q8_0 => QK,
            _ => QK_K,
        }
    }

    /// Bytes per block.
    pub(crate) fn block_bytes(self) -> usize {
        match self {
            WType::F32 => 4,
            WType::F16 | WType::Bf16 => 2,
            WType::Q4_0 => 18,
            WType::Q4_1 => 20,
            WType::Q5_0 => 22,
            WType::Q5_1 => 24,
            WType::Q8_0 => 34,
            WType::Q2K => 84,
            WType::Q3K => 110,
            WType::Q4K => 144,
            WType::Q5K => 176,
            WType::Q6K => 210,
        }
    }

    /// Bytes of one row of `cols` elements; `None` when `cols` is not a whole number of blocks.
    pub(crate) fn row_bytes(self, cols: usize) -> Option<usize> {
        cols.is_multiple_of(self.block_elems())
            .then(|| cols / self.block_elems() * self.block_bytes())
    }

    /// The activation quantization this type is multiplied with.
    pub(crate) fn acts(self) -> ActKind {
        match self {
            WType::F32 | WType::F16 | WType::Bf16 => ActKind::F32,
            WType::Q4_0 | WType::Q4_1 | WType::Q5_0 | WType::Q5_1 | WType::Q8_0 => ActKind::Q8,
            _ => ActKind::Q8K,
        }
    }

    /// Whether a 32-element type carries a per-block minimum (`Q4_1`, `Q5_1`).
    pub(crate) fn has_min(self) -> bool {
        matches!(self, WType::Q4_1 | WType::Q5_1)
    }

    /// What the unsigned 32-element codes are offset by (`value = code − offset`): 8 for Q4_0,
    /// 16 for Q5_0, 128 for Q8_0 seen as `code = value + 128`, 0 for the types with a minimum.
    pub(crate) fn code_offset(self) -> i32 {
        match self {
            WType::Q4_0 => 8,
            WType::Q5_0 => 16,
            WType::Q8_0 => 128,
            _ => 0,
        }
    }
}

/// A weight matrix `[rows, cols]` in its file encoding, rows contiguous.
#[derive(Clone)]
pub(crate) struct QMatrix {
    pub(crate) wtype: WType,
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    pub(crate) data: Bytes,
}

impl std::fmt::Debug for QMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QMatrix")
            .field("wtype", &self.wtype)
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .finish()
    }
}

impl QMatrix {
    /// A view of `data` as `[rows, cols]` of `wtype`; `None` when the sizes disagree.
    pub(crate) fn new(wtype: WType, rows: usize, cols: usize, data: Bytes) -> Option<QMatrix> {
        let need = wtype.row_bytes(cols)?.checked_mul(rows)?;
        (data.len() == need && cols > 0).then_some(QMatrix {
            wtype,
            rows,
            cols,
            data,
        })
    }

    /// Bytes per row.
    pub(crate) fn row_bytes(&self) -> usize {
        self.cols / self.wtype.block_elems() * self.wtype.block_bytes()
    }

    /// The bytes of row `r`.
    #[inline]
    pub(crate) fn row(&self, r: usize) -> &[u8] {
        let rb = self.row_bytes();
        &self.data.as_slice()[r * rb..(r + 1) * rb]
    }

    /// Row `r` as f32 values (embedding lookups).
    pub(crate) fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        dequantize_row(self.wtype, self.row(r), out);
    }
}

#[inline(always)]
pub(crate) fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// One 32-element block decoded: signed values (`code − offset`, or the code for the types
/// with a minimum), the scale `d` and the minimum `m` (0 when none).
#[inline(always)]
pub(crate) fn decode_block(wtype: WType, blk: &[u8], out: &mut [i32; QK]) -> (f32, f32) {
    let d = f16_at(blk, 0);
    let off = wtype.code_offset();
    match wtype {
        WType::Q4_0 | WType::Q4_1 => {
            let (m, qs) = if wtype == WType::Q4_1 {
                (f16_at(blk, 2), &blk[4..20])
            } else {
                (0.0, &blk[2..18])
            };
            for j in 0..16 {
                out[j] = i32::from(qs[j] & 0x0F) - off;
                out[j + 16] = i32::from(qs[j] >> 4) - off;
            }
            (d, m)
        }
        WType::Q5_0 | WType::Q5_1 => {
            let (m, at) = if wtype == WType::Q5_1 {
                (f16_at(blk, 2), 4)
            } else {
                (0.0, 2)
            };
            let qh = u32::from_le_bytes([blk[at], blk[at + 1], blk[at + 2], blk[at + 3]]);
            let qs = &blk[at + 4..at + 20];
            for j in 0..16 {
                let h0 = ((qh >> j) & 1) << 4;
                let h1 = ((qh >> (j + 16)) & 1) << 4;
                out[j] = (i32::from(qs[j] & 0x0F) | h0 as i32) - off;
                out[j + 16] = (i32::from(qs[j] >> 4) | h1 as i32) - off;
            }
            (d, m)
        }
        _ => {
            for (o, &b) in out.iter_mut().zip(&blk[2..34]) {
                *o = i32::from(b as i8);
            }
            (d, 0.0)
        }
    }
}

/// A K-quant super-block decoded to integers: codes in element order, and per group the scale
/// and minimum that multiply them (`value = d·scale·code − dmin·min`), for the group size of
/// the type (16 elements for Q2_K/Q3_K/Q6_K, 32 for Q4_K/Q5_K). Q3_K codes are signed (the
/// high-bit `− 4` folded in); Q6_K codes are unsigned (0..63, value `code − 32`: llama.cpp
/// applies the 32 through the activation sums, and its lane order depends on that). Neither
/// has a minimum.
#[derive(Debug)]
pub(crate) struct KBlock {
    pub(crate) q: [i32; QK_K],
    pub(crate) scales: [i32; 16],
    pub(crate) mins: [i32; 16],
    pub(crate) d: f32,
    pub(crate) dmin: f32,
}

impl KBlock {
    pub(crate) fn new() -> KBlock {
        KBlock {
            q: [0; QK_K],
            scales: [0; 16],
            mins: [0; 16],
            d: 0.0,
            dmin: 0.0,
        }
    }

    /// Elements per scale group.
    pub(crate) fn group(wtype: WType) -> usize {
        match wtype {
            WType::Q4K | WType::Q5K => 32,
            _ => 16,
        }
    }
}

/// The 6-bit scale and minimum of group `j` of a Q4_K/Q5_K super-block (`get_scale_min_k4`).
#[inline(always)]
pub(crate) fn scale_min_k4(j: usize, sc: &[u8]) -> (i32, i32) {
    let (s, m) = if j < 4 {
        (sc[j] & 63, sc[j + 4] & 63)
    } else {
        (
            (sc[j + 4] & 0xF) | ((sc[j - 4] >> 6) << 4),
            (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4),
        )
    };
    (i32::from(s), i32::from(m))
}

/// Decodes one K-quant super-block.
pub(crate) fn decode_kblock(wtype: WType, blk: &[u8], out: &mut KBlock) {
    match wtype {
        WType::Q4K | WType::Q5K => {
            out.d = f16_at(blk, 0);
            out.dmin = f16_at(blk, 2);
            let sc = &blk[4..16];
            for j in 0..8 {
                (out.scales[j], out.mins[j]) = scale_min_k4(j, sc);
            }
            let (qh, qs) = if wtype == WType::Q5K {
                (Some(&blk[16..48]), &blk[48..176])
            } else {
                (None, &blk[16..144])
            };
            for c in 0..4 {
                for l in 0..32 {
                    let (lo, hi) = (qs[32 * c + l] & 0xF, qs[32 * c + l] >> 4);
                    let (h_lo, h_hi) = match qh {
                        Some(h) => (
                            ((h[l] >> (2 * c)) & 1) << 4,
                            ((h[l] >> (2 * c + 1)) & 1) << 4,
                        ),
                        None => (0, 0),
                    };
                    out.q[64 * c + l] = i32::from(lo | h_lo);
                    out.q[64 * c + 32 + l] = i32::from(hi | h_hi);
                }
            }
        }
        WType::Q6K => {
            let (ql, qh, sc) = (&blk[0..128], &blk[128..192], &blk[192..208]);
            out.d = f16_at(blk, 208);
            out.dmin = 0.0;
            for (o, &s) in out.scales.iter_mut().zip(sc) {
                *o = i32::from(s as i8);
            }
            out.mins = [0; 16];
            for h in 0..2 {
                let (ql, qh) = (&ql[64 * h..], &qh[32 * h..]);
                let o = &mut out.q[128 * h..];
                for l in 0..32 {
                    o[l] = i32::from((ql[l] & 0xF) | ((qh[l] & 3) << 4));
                    o[l + 32] = i32::from((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4));
                    o[l + 64] = i32::from((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4));
                    o[l + 96] = i32::from((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4));
                }
            }
        }
        WType::Q2K => {
            let (sc, qs) = (&blk[0..16], &blk[16..80]);
            out.d = f16_at(blk, 80);
            out.dmin = f16_at(blk, 82);
            for (j, &s) in sc.iter().enumerate() {
                out.scales[j] = i32::from(s & 0xF);
                out.mins[j] = i32::from(s >> 4);
            }
            for n in 0..2 {
                let q = &qs[32 * n..32 * n + 32];
                for j in 0..4 {
                    for l in 0..32 {
                        out.q[128 * n + 32 * j + l] = i32::from((q[l] >> (2 * j)) & 3);
                    }
                }
            }
        }
        WType::Q3K => {
            let (hm, qs, sc) = (&blk[0..32], &blk[32..96], &blk[96..108]);
            out.d = f16_at(blk, 108);
            out.dmin = 0.0;
            let word = |i: usize| {
                u32::from_le_bytes([sc[4 * i], sc[4 * i + 1], sc[4 * i + 2], sc[4 * i + 3]])
            };
            let (a0, a1, tmp) = (word(0), word(1), word(2));
            let (k1, k2) = (0x0303_0303u32, 0x0f0f_0f0fu32);
            let aux = [
                (a0 & k2) | ((tmp & k1) << 4),
                (a1 & k2) | (((tmp >> 2) & k1) << 4),
                ((a0 >> 4) & k2) | (((tmp >> 4) & k1) << 4),
                ((a1 >> 4) & k2) | (((tmp >> 6) & k1) << 4),
            ];
            for (i, w) in aux.iter().enumerate() {
                for (b, byte) in w.to_le_bytes().iter().enumerate() {
                    out.scales[4 * i + b] = i32::from(*byte as i8) - 32;
                }
            }
            out.mins = [0; 16];
            for n in 0..2 {
                let q = &qs[32 * n..32 * n + 32];
                for j in 0..4 {
                    let bit = 4 * n + j;
                    for l in 0..32 {
                        let low = i32::from((q[l] >> (2 * j)) & 3);
                        let high = if hm[l] & (1 << bit) != 0 { 0 } else { 4 };
                        out.q[128 * n + 32 * j + l] = low - high;
                    }
                }
            }
        }
        _ => {}
    }
}

/// A row of any type as f32 values.
pub(crate) fn dequantize_row(wtype: WType, row: &[u8], out: &mut [f32]) {
    match wtype {
        WType::F32 => {
            for (o, c) in out.iter_mut().zip(row.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        WType::F16 => {
            for (o, c) in out.iter_mut().zip(row.chunks_exact(2)) {
                *o = f16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        WType::Bf16 => {
            for (o, c) in out.iter_mut().zip(row.chunks_exact(2)) {
                *o = bf16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        WType::Q4_0 | WType::Q4_1 | WType::Q5_0 | WType::Q5_1 | WType::Q8_0 => {
            let mut v = [0i32; QK];
            for (blk, o) in row
                .chunks_exact(wtype.block_bytes())
                .zip(out.chunks_exact_mut(QK))
            {
                let (d, m) = decode_block(wtype, blk, &mut v);
                for (o, &q) in o.iter_mut().zip(&v) {
                    // ggml: `x·d + m` for Q4_1/Q5_1, `x·d` otherwise.
                    *o = if wtype.has_min() {
                        (q as f32) * d + m
                    } else {
                        (q as f32) * d
                    };
                }
            }
        }
        _ => {
            let mut kb = KBlock::new();
            let g = KBlock::group(wtype);
            for (blk, o) in row
                .chunks_exact(wtype.block_bytes())
                .zip(out.chunks_exact_mut(QK_K))
            {
                decode_kblock(wtype, blk, &mut kb);
                let bias = if wtype == WType::Q6K { 32 } else { 0 };
                for (i, o) in o.iter_mut().enumerate() {
                    let (s, m) = (kb.scales[i / g], kb.mins[i / g]);
                    *o = kb.d * s as f32 * (kb.q[i] - bias) as f32 - kb.dmin * m as f32;
                }
            }
        }
    }
}

/// Activations quantized per 32 elements, for every token of a step.
#[derive(Debug, Default)]
pub(crate) struct Q8Acts {
    pub(crate) tokens: usize,
    pub(crate) cols: usize,
    /// `[token][col]` codes.
    pub(crate) q: Vec<i8>,
    /// `[token][block]` scales, rounded through f16 as llama.cpp stores them.
    pub(crate) d: Vec<f32>,
    /// `[token][block]` `d × Σq`, through f16 (Q8_1's `s`).
    pub(crate) s: Vec<f32>,
    /// `d` transposed, `[block][token]`: the scales of consecutive tokens in one load.
    pub(crate) dt: Vec<f32>,
    /// `s` transposed, `[block][token]`.
    pub(crate) st: Vec<f32>,
    /// `[token][block]` `Σq` of each block (the offset correction of the fast kernels), padded
    /// with zeros to a whole number of groups of eight blocks per token.
    pub(crate) bsum: Vec<i32>,
    /// The codes of each group of eight blocks transposed for the AVX-512 kernels,
    /// `[token][group][k][block j][4 bytes]`: row `k` of a group holds bytes `4k..4k+4` of each
    /// of its eight blocks (zeros past the last block), so one `vpdpbusd` per row `k` adds each
    /// block's partial sums into its own lane.
    pub(crate) qt: Vec<i8>,
}

impl Q8Acts {
    /// Groups of eight blocks per token (the last one possibly partial).
    pub(crate) fn groups(&self) -> usize {
        (self.cols / QK).div_ceil(8)
    }
}

impl Q8Acts {
    /// Quantizes `x [tokens, cols]` (`cols` a multiple of 32).
    pub(crate) fn new(x: &[f32], tokens: usize, cols: usize) -> Q8Acts {
        let mut a = Q8Acts::default();
        a.fill(x, tokens, cols);
        a
    }

    /// [`Q8Acts::new`] into existing buffers.
    pub(crate) fn fill(&mut self, x: &[f32], tokens: usize, cols: usize) {
        let nb = cols / QK;
        self.tokens = tokens;
        self.cols = cols;
        self.q.resize(tokens * cols, 0);
        self.d.resize(tokens * nb, 0.0);
        self.s.resize(tokens * nb, 0.0);
        let groups = nb.div_ceil(8);
        self.bsum.clear();
        self.bsum.resize(tokens * groups * 8, 0);
        for (t, (((xs, qs), (dd, ss)), b)) in x
            .chunks_exact(QK)
            .zip(self.q.chunks_exact_mut(QK))
            .zip(self.d.iter_mut().zip(self.s.iter_mut()))
            .enumerate()
            .map(|(i, v)| (i / nb, (v, i % nb)))
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
            self.bsum[t * groups * 8 + b] = sum;
        }
        self.qt.clear();
        self.qt.resize(tokens * groups * 256, 0);
        for t in 0..tokens {
            for b in 0..nb {
                let (g, j) = (b / 8, b % 8);
                let src = &self.q[t * cols + b * QK..t * cols + (b + 1) * QK];
                for k in 0..8 {
                    let at = ((t * groups + g) * 8 + k) * 32 + 4 * j;
                    self.qt[at..at + 4].copy_from_slice(&src[4 * k..4 * k + 4]);
                }
            }
        }
        self.dt.resize(tokens * nb, 0.0);
        self.st.resize(tokens * nb, 0.0);
        for t in 0..tokens {
            for b in 0..nb {
                self.dt[b * tokens + t] = self.d[t * nb + b];
                self.st[b * tokens + t] = self.s[t * nb + b];
            }
        }
    }

    /// Codes of token `t`.
    #[inline]
    pub(crate) fn q_row(&self, t: usize) -> &[i8] {
        &self.q[t * self.cols..(t + 1) * self.cols]
    }
}

/// Activations quantized per 256 elements (`quantize_row_q8_K`), for every token of a step.
#[derive(Debug, Default)]
pub(crate) struct Q8KActs {
    pub(crate) tokens: usize,
    pub(crate) cols: usize,
    /// `[token][col]` codes.
    pub(crate) q: Vec<i8>,
    /// `[token][super-block]` scales (f32).
    pub(crate) d: Vec<f32>,
    /// `[token][super-block][16]` sums of each 16 codes.
    pub(crate) bsums: Vec<i16>,
    /// `[token][super-block][8]` sums of each 32 codes.
    pub(crate) bsums32: Vec<i16>,
}

impl Q8KActs {
    /// Quantizes `x [tokens, cols]` (`cols` a multiple of 256).
    pub(crate) fn new(x: &[f32], tokens: usize, cols: usize) -> Q8KActs {
        let mut a = Q8KActs::default();
        a.fill(x, tokens, cols);
        a
    }

    /// [`Q8KActs::new`] into existing buffers.
    pub(crate) fn fill(&mut self, x: &[f32], tokens: usize, cols: usize) {
        let nb = cols / QK_K;
        self.tokens = tokens;
        self.cols = cols;
        self.q.resize(tokens * cols, 0);
        self.d.resize(tokens * nb, 0.0);
        self.bsums.resize(tokens * nb * 16, 0);
        self.bsums32.resize(tokens * nb * 8, 0);
        for ((((xs, qs), d), bs), bs32) in x
            .chunks_exact(QK_K)
            .zip(self.q.chunks_exact_mut(QK_K))
            .zip(self.d.iter_mut())
            .zip(self.bsums.chunks_exact_mut(16))
            .zip(self.bsums32.chunks_exact_mut(8))
        {
            let (mut max, mut amax) = (0f32, 0f32);
            for &v in xs {
                if v.abs() > amax {
                    amax = v.abs();
                    max = v;
                }
            }
            if amax == 0.0 {
                *d = 0.0;
                qs.fill(0);
                bs.fill(0);
                bs32.fill(0);
                continue;
            }
            let iscale = -127.0 / max;
            for (o, &v) in qs.iter_mut().zip(xs) {
                *o = ((iscale * v).round_ties_even() as i32).min(127) as i8;
            }
            // |Σ| ≤ 32·127: i16 holds it.
            for (b, c) in bs.iter_mut().zip(qs.chunks_exact(16)) {
                *b = c.iter().map(|&v| i16::from(v)).sum();
            }
            for (b, c) in bs32.iter_mut().zip(bs.chunks_exact(2)) {
                *b = c[0] + c[1];
            }
            *d = 1.0 / iscale;
        }
    }

    /// Codes of token `t`.
    #[inline]
    pub(crate) fn q_row(&self, t: usize) -> &[i8] {
        &self.q[t * self.cols..(t + 1) * self.cols]
    }
}

/// A step's activations, quantized for one weight type's kernel.
#[derive(Debug)]
pub(crate) enum Acts {
    /// `[tokens, cols]` f32.
    F32 { x: Vec<f32>, cols: usize },
    /// Per 32 elements.
    Q8(Q8Acts),
    /// Per 256 elements.
    Q8K(Q8KActs),
}

impl Acts {
    /// `x [tokens, cols]` prepared for weights of kind `kind`.
    pub(crate) fn new(kind: ActKind, x: &[f32], tokens: usize, cols: usize) -> Acts {
        match kind {
            ActKind::F32 => Acts::F32 {
                x: x[..tokens * cols].to_vec(),
                cols,
            },
            ActKind::Q8 => Acts::Q8(Q8Acts::new(x, tokens, cols)),
            ActKind::Q8K => Acts::Q8K(Q8KActs::new(x, tokens, cols)),
        }
    }

    /// Requantizes `x [tokens, cols]` into these buffers (same kind).
    pub(crate) fn refill(&mut self, x: &[f32], tokens: usize, cols: usize) {
        match self {
            Acts::F32 { x: v, cols: c } => {
                v.clear();
                v.extend_from_slice(&x[..tokens * cols]);
                *c = cols;
            }
            Acts::Q8(a) => a.fill(x, tokens, cols),
            Acts::Q8K(a) => a.fill(x, tokens, cols),
        }
    }
}
