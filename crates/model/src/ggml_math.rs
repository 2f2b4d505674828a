//! llama.cpp's CPU arithmetic, reproduced to the last bit where it decides roundings.
//!
//! Why bit-equality matters: every quantized matmul requantizes its input to 8 bits per
//! 32-element block (Q8_0/Q8_1/Q8_K), so a one-ulp difference anywhere upstream that lands on a
//! rounding boundary moves a whole quantization step, and these small models amplify that into
//! log-probability differences of 0.1–0.3 nats and different greedy continuations. Measured: a
//! plain f64 forward pass and llama.cpp's own AVX2 and AVX-512 builds all disagree with each
//! other by that much (crates/model/tools/).
//!
//! What llama.cpp's result depends on besides the model is which SIMD kernels ggml was built
//! with: the f16 attention dot products (llamafile's tinyBLAS), the softmax and SiLU `expf`,
//! and their horizontal sums differ between the AVX2 and AVX-512 builds. [`Rounding`] names
//! the two; the default is AVX-512, the build that produced the golden outputs in
//! ../shared/golden (an AVX-512 llama.cpp reproduces them exactly; an AVX2 one does not). The
//! K-quant kernels (`kquant`) follow the AVX-512 build whatever [`Rounding`] says.

use half::f16;

/// Which llama.cpp CPU build's rounding the forward pass reproduces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Rounding {
    /// ggml built with AVX2 + FMA (eight-lane kernels).
    LlamaCppAvx2,
    /// ggml built with AVX-512 (sixteen-lane kernels); the golden outputs' build.
    #[default]
    LlamaCppAvx512,
}

impl Rounding {
    /// SIMD lanes of the f32 kernels.
    pub(crate) fn lanes(self) -> usize {
        match self {
            Rounding::LlamaCppAvx2 => 8,
            Rounding::LlamaCppAvx512 => 16,
        }
    }

    /// Horizontal sum of one vector of `lanes()` values in the kernel's order (AVX2
    /// `hsum_float_8`; AVX-512 GCC's `_mm512_reduce_add_ps`, which halves to eight first).
    #[inline]
    pub(crate) fn hsum(self, a: &[f32]) -> f32 {
        match self {
            Rounding::LlamaCppAvx2 => hsum8(a),
            Rounding::LlamaCppAvx512 => {
                let mut h = [0f32; 8];
                for (i, v) in h.iter_mut().enumerate() {
                    *v = a[8 + i] + a[i];
                }
                hsum8(&h)
            }
        }
    }

    /// One output of llamafile's tinyBLAS f16 GEMM, which llama.cpp uses for the attention
    /// products of every step with two or more tokens: a single `lanes()`-wide accumulator of
    /// fused multiply-adds along the row, then [`Rounding::hsum`]. (A row that is not a whole
    /// number of vectors is treated as zero-padded, which leaves every lane's sum unchanged.)
    ///
    /// llama.cpp switches to `ggml_vec_dot_f16` (four accumulators, another reduction order)
    /// when a step has a single token. We do not: a token's arithmetic would then depend on
    /// what else shares its step, and results must not change when a sequence is batched,
    /// chunked or recomputed after preemption. The golden outputs still match exactly
    /// (their first-position log-probabilities come from multi-token prefills).
    #[inline]
    pub(crate) fn dot(self, a: &[f32], b: &[f32]) -> f32 {
        let w = self.lanes();
        let mut acc = [0f32; 16];
        for (x, y) in a.chunks(w).zip(b.chunks(w)) {
            for j in 0..x.len().min(y.len()) {
                acc[j] = x[j].mul_add(y[j], acc[j]);
            }
        }
        self.hsum(&acc[..w])
    }

    /// ggml's vectorised `expf` (`ggml_v_expf`) of this build, lane by lane.
    #[inline]
    pub(crate) fn expf(self, x: f32) -> f32 {
        match self {
            Rounding::LlamaCppAvx2 => expf_avx2(x),
            Rounding::LlamaCppAvx512 => expf_avx512(x),
        }
    }

    /// `silu(x)` for element `i` of a row of `n`: the vector kernel (`x / (1 + v_expf(0 - x))`)
    /// for whole vectors, the scalar libm `expf` for the tail, as `ggml_vec_swiglu_f32` does.
    #[inline]
    pub(crate) fn silu(self, x: f32, i: usize, n: usize) -> f32 {
        if i < n - n % self.lanes() {
            x / (1.0 + self.expf(0.0 - x))
        } else {
            x / (1.0 + (-x).exp())
        }
    }
}

/// AVX2 `hsum_float_8` (and llamafile's `hsum(__m256)`): `((a4+a0)+(a6+a2)) + ((a5+a1)+(a7+a3))`.
#[inline]
pub(crate) fn hsum8(a: &[f32]) -> f32 {
    let r = [a[4] + a[0], a[5] + a[1], a[6] + a[2], a[7] + a[3]];
    (r[0] + r[2]) + (r[1] + r[3])
}

const EXP_SHIFT: u32 = 0x4B40_0000; // 0x1.8p23
const LOG2E: u32 = 0x3FB8_AA3B; // 0x1.715476p+0
const LN2_HI: u32 = 0x3F31_7200; // 0x1.62e4p-1
const LN2_LO: u32 = 0x35BF_BE8E; // 0x1.7f7d1cp-20
const C5: u32 = 0x3C07_2010; // 0x1.0e4020p-7
const C4: u32 = 0x3D2B_9F17; // 0x1.573e2ep-5
const C3: u32 = 0x3E2A_AF33; // 0x1.555e66p-3
const C2: u32 = 0x3EFF_FEDB; // 0x1.fffdb6p-2
const C1: u32 = 0x3F7F_FFF6; // 0x1.ffffecp-1

/// Range reduction shared by both builds: `(z, n, b)` with `x = n·ln2 + b`.
#[inline]
fn exp_reduce(x: f32) -> (f32, f32, f32) {
    let r = f32::from_bits(EXP_SHIFT);
    let z = x.mul_add(f32::from_bits(LOG2E), r);
    let n = z - r;
    let b = (-n).mul_add(
        f32::from_bits(LN2_LO),
        (-n).mul_add(f32::from_bits(LN2_HI), x),
    );
    (z, n, b)
}

/// `ggml_v_expf` for AVX2 + FMA, one lane. Also the fast path's `exp` (no f64, no table).
pub(crate) fn expf_avx2(x: f32) -> f32 {
    let (z, n, b) = exp_reduce(x);
    let e = z.to_bits().wrapping_shl(23);
    let k = f32::from_bits(e.wrapping_add(1.0f32.to_bits()));
    let u = b * b;
    let j = f32::from_bits(C5)
        .mul_add(b, f32::from_bits(C4))
        .mul_add(u, f32::from_bits(C3).mul_add(b, f32::from_bits(C2)))
        .mul_add(u, f32::from_bits(C1) * b);
    if n.abs() <= 126.0 {
        return j.mul_add(k, k);
    }
    let g: u32 = if n <= 0.0 { 0x8200_0000 } else { 0 };
    let s1 = f32::from_bits(g.wrapping_add(0x7F00_0000));
    let s2 = f32::from_bits(e.wrapping_sub(g));
    if n.abs() > 192.0 {
        s1 * s1
    } else {
        s2.mul_add(j, s2) * s1
    }
}

/// `ggml_v_expf` for AVX-512, one lane (`scalef` does the 2^n scaling with one rounding).
fn expf_avx512(x: f32) -> f32 {
    let (_, n, b) = exp_reduce(x);
    if n.abs() > 192.0 {
        return if n <= 0.0 { 0.0 } else { f32::INFINITY };
    }
    let u = b * b;
    let j = f32::from_bits(C5)
        .mul_add(b, f32::from_bits(C4))
        .mul_add(u, f32::from_bits(C3).mul_add(b, f32::from_bits(C2)))
        .mul_add(u, f32::from_bits(C1).mul_add(b, 1.0));
    // j · 2^n exactly in f64, then one rounding to f32 (subnormals included), as `scalef`.
    (f64::from(j) * 2f64.powi(n as i32)) as f32
}

/// GELU (tanh form) as ggml evaluates it on CPU: through a table indexed by the f16 input and
/// holding f16 outputs (`GGML_GELU_FP16`), saturating outside ±10; the table entry is
/// computed with GCC's contraction of `1 + a·x·x` into a fused multiply-add. The table (64 Ki
/// entries, built once) is what makes it cheap, as in ggml.
#[inline]
pub(crate) fn gelu(x: f32) -> f32 {
    static TABLE: std::sync::OnceLock<Vec<f16>> = std::sync::OnceLock::new();
    if x <= -10.0 {
        0.0
    } else if x >= 10.0 {
        x
    } else {
        let table = TABLE.get_or_init(|| {
            (0..=u16::MAX)
                .map(|b| gelu_entry(f16::from_bits(b)))
                .collect()
        });
        table[usize::from(f16::from_f32(x).to_bits())].to_f32()
    }
}

/// One entry of [`gelu`]'s table.
fn gelu_entry(h: f16) -> f16 {
    let h = h.to_f32();
    let inner = (0.044_715 * h).mul_add(h, 1.0);
    let y = 0.5 * h * (1.0 + (0.797_884_6 * h * inner).tanh());
    f16::from_f32(y)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expf_variants_stay_within_two_ulp_of_libm() {
        for r in [Rounding::LlamaCppAvx2, Rounding::LlamaCppAvx512] {
            for i in -2000..2000 {
                let x = i as f32 * 0.043;
                let (got, want) = (r.expf(x), x.exp());
                let ulp = (want.to_bits() as i64 - got.to_bits() as i64).abs();
                assert!(ulp <= 2, "{r:?} expf({x}) = {got}, libm {want}");
            }
            assert_eq!(r.expf(f32::NEG_INFINITY), 0.0);
            assert_eq!(r.expf(-200.0), 0.0);
        }
    }

    #[test]
    fn gelu_table_matches_the_formula() {
        for i in -12_000..12_000 {
            let x = i as f32 * 0.001 + 0.000_37;
            let want = if x <= -10.0 {
                0.0
            } else if x >= 10.0 {
                x
            } else {
                gelu_entry(f16::from_f32(x)).to_f32()
            };
            assert_eq!(gelu(x).to_bits(), want.to_bits(), "gelu({x})");
        }
        assert!((gelu(1.0) - 0.8412).abs() < 1e-3);
    }

    #[test]
    fn reductions_sum_every_lane() {
        let a: Vec<f32> = (0..64).map(|i| i as f32).collect();
        for r in [Rounding::LlamaCppAvx2, Rounding::LlamaCppAvx512] {
            let w = r.lanes();
            assert_eq!(r.hsum(&a[..w]), a[..w].iter().sum::<f32>());
            let ones = vec![1.0f32; 64];
            assert_eq!(r.dot(&a, &ones), 2016.0);
            assert_eq!(r.dot(&a[..37], &ones[..37]), 666.0);
        }
    }
}
