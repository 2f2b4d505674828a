//! AVX2 + FMA + F16C kernels: the portable kernels' arithmetic, 32 weights per instruction.
//!
//! Integer parts: a 32-element block's codes are unpacked in a register (nibbles split, fifth
//! bits spread with a byte shuffle) and multiplied with the activation codes by `vpmaddubsw`
//! (unsigned × signed bytes → pairs) and `vpmaddwd` (pairs → four-element lane sums), exactly
//! llama.cpp's lane layout. Signed weight values use the `vpsignb` trick (|w| × sign(w)·x), so
//! no pair overflows. Float parts: the same fused multiply-adds, lane by lane, as
//! [`super::portable`].
//!
//! A tile walks its weight rows one at a time; each block of a row is unpacked once and
//! multiplied with up to four tokens before the next block is loaded.

use std::arch::x86_64::*;
use std::ops::Range;

use half::f16;

use super::attention::{RowState, Shape};
use super::hsum8;
use super::portable::KForm;
use super::quant::{Acts, Q8Acts, Q8KActs, QK, QK_K, QMatrix, WType};
use super::{Arithmetic, Isa};

/// Proof that this CPU runs AVX2, FMA and F16C: the only way to reach the kernels below.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Avx2(());

impl Avx2 {
    /// `Some` when the CPU has the features.
    pub(crate) fn new() -> Option<Avx2> {
        Isa::Avx2.available().then_some(Avx2(()))
    }
}

// Weight-type tags for const generics.
pub(super) const T_Q4_0: u8 = 0;
pub(super) const T_Q4_1: u8 = 1;
pub(super) const T_Q5_0: u8 = 2;
pub(super) const T_Q5_1: u8 = 3;
pub(super) const T_Q8_0: u8 = 4;

/// [`super::portable::tile`] on AVX2.
#[allow(clippy::too_many_arguments)]
pub(crate) fn tile(
    _cpu: Avx2,
    m: &QMatrix,
    rows: Range<usize>,
    acts: &Acts,
    toks: Range<usize>,
    arith: Arithmetic,
    forms: &[KForm],
    out: &mut [f32],
) {
    // SAFETY: `Avx2` exists only when the CPU has AVX2, FMA and F16C.
    unsafe { tile_impl(m, rows, acts, toks, arith, forms, out) }
}

#[target_feature(enable = "avx2,fma,f16c")]
fn tile_impl(
    m: &QMatrix,
    rows: Range<usize>,
    acts: &Acts,
    toks: Range<usize>,
    arith: Arithmetic,
    forms: &[KForm],
    out: &mut [f32],
) {
    if let (Acts::Q8(a), Arithmetic::Fast) = (acts, arith) {
        return match m.wtype {
            WType::Q4_0 => q8s_tile::<T_Q4_0>(m, rows, a, toks, out),
            WType::Q4_1 => q8s_tile::<T_Q4_1>(m, rows, a, toks, out),
            WType::Q5_0 => q8s_tile::<T_Q5_0>(m, rows, a, toks, out),
            WType::Q5_1 => q8s_tile::<T_Q5_1>(m, rows, a, toks, out),
            _ => q8s_tile::<T_Q8_0>(m, rows, a, toks, out),
        };
    }
    match (acts, m.wtype) {
        (Acts::Q8(a), WType::Q4_0) => q8_tile::<T_Q4_0>(m, rows, a, toks, out),
        (Acts::Q8(a), WType::Q4_1) => q8_tile::<T_Q4_1>(m, rows, a, toks, out),
        (Acts::Q8(a), WType::Q5_0) => q8_tile::<T_Q5_0>(m, rows, a, toks, out),
        (Acts::Q8(a), WType::Q5_1) => q8_tile::<T_Q5_1>(m, rows, a, toks, out),
        (Acts::Q8(a), WType::Q8_0) => q8_tile::<T_Q8_0>(m, rows, a, toks, out),
        (Acts::Q8K(a), WType::Q4K | WType::Q6K) => k_tile(m, rows, a, toks, forms, out),
        (Acts::F32 { x, cols }, WType::F32 | WType::F16 | WType::Bf16) => {
            dense_tile(m, rows, x, *cols, toks, out)
        }
        _ => super::portable::tile(m, rows, acts, toks, arith, forms, out),
    }
}

/// 32 bytes at `s[at..at + 32]`.
#[inline]
#[target_feature(enable = "avx2")]
pub(super) fn load32<T: Copy>(s: &[T], at: usize) -> __m256i {
    let c = &s[at..at + 32 / size_of::<T>()];
    // SAFETY: `c` is 32 readable bytes (bounds-checked above); unaligned loads are allowed.
    unsafe { _mm256_loadu_si256(c.as_ptr().cast()) }
}

/// 16 bytes at `s[at..at + 16]`.
#[inline]
#[target_feature(enable = "avx2")]
pub(super) fn load16(s: &[u8], at: usize) -> __m128i {
    let c = &s[at..at + 16];
    // SAFETY: `c` is 16 readable bytes (bounds-checked above); unaligned loads are allowed.
    unsafe { _mm_loadu_si128(c.as_ptr().cast()) }
}

/// Eight f32 at `s[at..at + 8]`.
#[inline]
#[target_feature(enable = "avx2")]
pub(super) fn loadf(s: &[f32], at: usize) -> __m256 {
    let c = &s[at..at + 8];
    // SAFETY: `c` is eight readable f32 (bounds-checked above); unaligned loads are allowed.
    unsafe { _mm256_loadu_ps(c.as_ptr()) }
}

/// Eight f32 to `s[at..at + 8]`.
#[inline]
#[target_feature(enable = "avx2")]
pub(super) fn storef(s: &mut [f32], at: usize, v: __m256) {
    let c = &mut s[at..at + 8];
    // SAFETY: `c` is eight writable f32 (bounds-checked above); unaligned stores are allowed.
    unsafe { _mm256_storeu_ps(c.as_mut_ptr(), v) }
}

/// Eight f16 at `s[at..at + 8]`, as f32.
#[inline]
#[target_feature(enable = "avx2,f16c")]
pub(super) fn load_f16x8(s: &[f16], at: usize) -> __m256 {
    let c = &s[at..at + 8];
    // SAFETY: `c` is 16 readable bytes (bounds-checked above); unaligned loads are allowed.
    _mm256_cvtph_ps(unsafe { _mm_loadu_si128(c.as_ptr().cast()) })
}

/// An f16 stored little-endian at `b[at..at + 2]`, as f32.
#[inline]
#[target_feature(enable = "avx2,f16c")]
pub(super) fn f16_at(b: &[u8], at: usize) -> f32 {
    let bits = u16::from_le_bytes([b[at], b[at + 1]]);
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(bits))))
}

#[inline]
#[target_feature(enable = "avx2")]
pub(super) fn to_array(v: __m256) -> [f32; 8] {
    let mut a = [0f32; 8];
    storef(&mut a, 0, v);
    a
}

/// Byte `i` of the result is `0x10` when bit `i` of `bits` is set (Q5's fifth bits).
#[inline]
#[target_feature(enable = "avx2")]
pub(super) fn spread_bits(bits: u32) -> __m256i {
    let shuf = _mm256_setr_epi64x(
        0,
        0x0101_0101_0101_0101,
        0x0202_0202_0202_0202,
        0x0303_0303_0303_0303,
    );
    let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(bits as i32), shuf);
    let probe = _mm256_or_si256(bytes, _mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfe));
    let set = _mm256_cmpeq_epi8(probe, _mm256_set1_epi64x(-1));
    _mm256_and_si256(set, _mm256_set1_epi8(0x10))
}

/// Bytes per block of a 32-element type tag.
pub(super) const fn block_bytes(w: u8) -> usize {
    match w {
        T_Q4_0 => 18,
        T_Q4_1 => 20,
        T_Q5_0 => 22,
        T_Q5_1 => 24,
        _ => 34,
    }
}

/// Whether a 32-element type tag has a per-block minimum.
pub(super) const fn asym(w: u8) -> bool {
    w == T_Q4_1 || w == T_Q5_1
}

/// Scale and minimum of a 32-element block at `p` (the minimum is 0 for the types without).
///
/// # Safety
/// `p` points to a whole block of type `W`.
#[inline]
#[target_feature(enable = "avx2,f16c")]
pub(super) unsafe fn scales_at<const W: u8>(p: *const u8) -> (f32, f32) {
    // SAFETY: a block starts with its f16 scale (and, for the types with a minimum, the f16
    // minimum right after it): 2 or 4 readable bytes (the caller's contract).
    let bits = unsafe {
        if asym(W) {
            std::ptr::read_unaligned(p.cast::<u32>())
        } else {
            u32::from(std::ptr::read_unaligned(p.cast::<u16>()))
        }
    };
    let v = _mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32));
    (_mm_cvtss_f32(v), _mm_cvtss_f32(_mm_movehdup_ps(v)))
}

/// A 32-element block's values at `p`, as bytes in element order: unsigned codes for the types
/// with a minimum, signed values (`code − offset`) otherwise.
///
/// # Safety
/// `p` points to a whole block of type `W`.
#[inline]
#[target_feature(enable = "avx2")]
pub(super) unsafe fn values_at<const W: u8>(p: *const u8) -> __m256i {
    let m4 = _mm_set1_epi8(0x0F);
    // SAFETY: every offset read below lies inside a block of type `W` (18, 20, 22, 24 or 34
    // bytes; the caller's contract); unaligned loads are allowed.
    unsafe {
        match W {
            T_Q4_0 | T_Q4_1 => {
                let x = _mm_loadu_si128(p.add(if W == T_Q4_1 { 4 } else { 2 }).cast());
                let codes = _mm256_set_m128i(
                    _mm_and_si128(_mm_srli_epi16::<4>(x), m4),
                    _mm_and_si128(x, m4),
                );
                if W == T_Q4_0 {
                    _mm256_sub_epi8(codes, _mm256_set1_epi8(8))
                } else {
                    codes
                }
            }
            T_Q5_0 | T_Q5_1 => {
                let at = if W == T_Q5_1 { 4 } else { 2 };
                let qh = std::ptr::read_unaligned(p.add(at).cast::<u32>());
                let x = _mm_loadu_si128(p.add(at + 4).cast());
                let nibbles = _mm256_set_m128i(
                    _mm_and_si128(_mm_srli_epi16::<4>(x), m4),
                    _mm_and_si128(x, m4),
                );
                let codes = _mm256_or_si256(nibbles, spread_bits(qh));
                if W == T_Q5_0 {
                    _mm256_sub_epi8(codes, _mm256_set1_epi8(16))
                } else {
                    codes
                }
            }
            _ => _mm256_loadu_si256(p.add(2).cast()),
        }
    }
}

/// What the AVX2 lane sums need of a block's values: `|w|` for the signed types.
#[inline]
#[target_feature(enable = "avx2")]
pub(super) fn wprep_avx2<const W: u8>(w: __m256i) -> __m256i {
    if asym(W) { w } else { _mm256_sign_epi8(w, w) }
}

/// What the AVX2 lane sums need of a token's block of codes: the codes.
#[inline]
#[target_feature(enable = "avx2")]
pub(super) fn xprep_avx2<const W: u8>(x: __m256i) -> (__m256i, __m256i) {
    (x, x)
}

/// Lane sums of `w · x` (four elements per i32 lane), AVX2: `vpmaddubsw` + `vpmaddwd`, the
/// signed types through `|w| · sign(w)·x`.
#[inline]
#[target_feature(enable = "avx2")]
pub(super) fn lanes_avx2<const W: u8>(w: __m256i, wabs: __m256i, x: (__m256i, __m256i)) -> __m256i {
    let pairs = if asym(W) {
        _mm256_maddubs_epi16(w, x.0)
    } else {
        _mm256_maddubs_epi16(wabs, _mm256_sign_epi8(x.0, w))
    };
    _mm256_madd_epi16(pairs, _mm256_set1_epi16(1))
}

/// The 32-element-block matmul tile, instantiated per instruction set. The hooks: `$values`
/// unpacks a block's values, `$wprep` prepares them once per block, `$xprep` prepares a
/// token's codes once per block (e.g. an offset correction), `$lanes` forms the i32 lane sums
/// (four elements per lane, exactly). `$RT` × `$TT` (rows × tokens) is the register blocking
/// of many-token tiles.
macro_rules! q8_family {
    ($features:literal, $values:ident, $wprep:ident, $xprep:ident, $lanes:ident, $RT:literal, $TT:literal) => {
        #[target_feature(enable = $features)]
        pub(super) fn q8_tile<const W: u8>(
            m: &QMatrix,
            rows: Range<usize>,
            a: &Q8Acts,
            toks: Range<usize>,
            out: &mut [f32],
        ) {
            let n = rows.len();
            let mut put =
                |r: usize, t: usize, v: f32| out[(t - toks.start) * n + (r - rows.start)] = v;
            let mut t = toks.start;
            // Several tokens share each unpacked weight block.
            while t + $TT <= toks.end {
                let mut r = rows.start;
                while rows.end - r >= $RT {
                    let v = q8_dot::<W, $RT, $TT>(m, r, a, t);
                    for (u, v) in v.into_iter().enumerate() {
                        for (i, v) in v.into_iter().enumerate() {
                            put(r + i, t + u, v);
                        }
                    }
                    r += $RT;
                }
                while r < rows.end {
                    for (u, v) in q8_dot::<W, 1, $TT>(m, r, a, t).into_iter().enumerate() {
                        put(r, t + u, v[0]);
                    }
                    r += 1;
                }
                t += $TT;
            }
            // Single tokens (decode): one row after the other. Rows are contiguous, so this is
            // one sequential stream through the weights, which the hardware prefetcher follows;
            // interleaving several rows measured 1.5× slower (memory stalls).
            while t < toks.end {
                for r in rows.clone() {
                    put(r, t, q8_dot::<W, 1, 1>(m, r, a, t)[0][0]);
                }
                t += 1;
            }
        }

        /// Rows `r0..r0 + R` against tokens `t0..t0 + T` (`[token][row]`), each exactly as
        /// [`super::portable::dot_q8`].
        #[inline]
        #[target_feature(enable = $features)]
        fn q8_dot<const W: u8, const R: usize, const T: usize>(
            m: &QMatrix,
            r0: usize,
            a: &Q8Acts,
            t0: usize,
        ) -> [[f32; R]; T] {
            let nb = a.cols / QK;
            let bb = block_bytes(W);
            assert!(m.cols == a.cols && r0 + R <= m.rows && t0 + T <= a.tokens);
            assert!(a.q.len() >= a.tokens * a.cols);
            assert!(a.dt.len() >= a.tokens * nb && a.st.len() >= a.tokens * nb);
            let rows: [*const u8; R] = std::array::from_fn(|i| m.row(r0 + i).as_ptr());
            let qs: [*const i8; T] = std::array::from_fn(|u| a.q_row(t0 + u).as_ptr());
            let mut acc = [[_mm256_setzero_ps(); R]; T];
            let mut summs = [[0f32; T]; R];
            for b in 0..nb {
                let mut w = [_mm256_setzero_si256(); R];
                let mut wp = [_mm256_setzero_si256(); R];
                let mut dw = [0f32; R];
                let mut mw = [0f32; R];
                for i in 0..R {
                    // SAFETY: row `r0 + i` exists (asserted) and holds `nb` blocks of `bb`
                    // bytes; `b < nb`.
                    unsafe {
                        let p = rows[i].add(b * bb);
                        w[i] = $values::<W>(p);
                        (dw[i], mw[i]) = scales_at::<W>(p);
                    }
                    wp[i] = $wprep::<W>(w[i]);
                }
                let da: [f32; T] = std::array::from_fn(|u| {
                    // SAFETY: the transposed scales hold `nb·tokens` entries (asserted); tokens
                    // `t0..t0 + T` exist and `b < nb`.
                    unsafe { *a.dt.as_ptr().add(b * a.tokens + t0 + u) }
                });
                for u in 0..T {
                    // SAFETY: token `t0 + u` exists (asserted): `nb·32` codes from its
                    // pointer; `b < nb`; unaligned loads are allowed.
                    let x = unsafe { _mm256_loadu_si256(qs[u].add(b * QK).cast()) };
                    let xp = $xprep::<W>(x);
                    for i in 0..R {
                        let l = $lanes::<W>(w[i], wp[i], xp);
                        let d = dw[i] * da[u];
                        acc[u][i] =
                            _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(l), acc[u][i]);
                    }
                }
                if asym(W) {
                    let sa: [f32; T] = std::array::from_fn(|u| {
                        // SAFETY: as for `da`.
                        unsafe { *a.st.as_ptr().add(b * a.tokens + t0 + u) }
                    });
                    for i in 0..R {
                        for u in 0..T {
                            summs[i][u] = mw[i].mul_add(sa[u], summs[i][u]);
                        }
                    }
                }
            }
            std::array::from_fn(|u| {
                std::array::from_fn(|i| {
                    let r = hsum8(&to_array(acc[u][i]));
                    if asym(W) { r + summs[i][u] } else { r }
                })
            })
        }
    };
}
pub(super) use q8_family;

q8_family!(
    "avx2,fma,f16c",
    values_at,
    wprep_avx2,
    xprep_avx2,
    lanes_avx2,
    1,
    4
);

/// The f16 scales (and minimums, for the types with one) of eight consecutive 32-element
/// blocks from `p`, as f32 (minimums 0 when none).
///
/// # Safety
/// `p` points to eight whole blocks of type `W`.
#[inline]
#[target_feature(enable = "avx2,f16c")]
pub(super) unsafe fn group_scales<const W: u8>(p: *const u8) -> (__m256, __m256) {
    let bb = block_bytes(W) as i32;
    let offsets = _mm256_setr_epi32(0, bb, 2 * bb, 3 * bb, 4 * bb, 5 * bb, 6 * bb, 7 * bb);
    // SAFETY: each lane reads the first four bytes of one of the eight blocks (every block is
    // at least 18 bytes long; the caller's contract).
    let g = unsafe { _mm256_i32gather_epi32::<1>(p.cast(), offsets) };
    let halves = |v: __m256i| {
        _mm256_cvtph_ps(_mm_packus_epi32(
            _mm256_castsi256_si128(v),
            _mm256_extracti128_si256::<1>(v),
        ))
    };
    let d = halves(_mm256_and_si256(g, _mm256_set1_epi32(0xFFFF)));
    let m = if asym(W) {
        halves(_mm256_srli_epi32::<16>(g))
    } else {
        _mm256_setzero_ps()
    };
    (d, m)
}

/// `[Σ p0, Σ p1, …, Σ p7]`: the lane totals of eight vectors (exact).
#[inline]
#[target_feature(enable = "avx2")]
pub(super) fn reduce8(p: [__m256i; 8]) -> __m256i {
    let a0 = _mm256_hadd_epi32(p[0], p[1]);
    let a1 = _mm256_hadd_epi32(p[2], p[3]);
    let a2 = _mm256_hadd_epi32(p[4], p[5]);
    let a3 = _mm256_hadd_epi32(p[6], p[7]);
    let b0 = _mm256_hadd_epi32(a0, a1);
    let b1 = _mm256_hadd_epi32(a2, a3);
    _mm256_add_epi32(
        _mm256_permute2x128_si256::<0x20>(b0, b1),
        _mm256_permute2x128_si256::<0x31>(b0, b1),
    )
}

/// The AVX2 lane sums are already the signed values' sums.
#[inline]
#[target_feature(enable = "avx2")]
pub(super) fn correct_avx2<const W: u8>(sums: __m256i, _bsum: __m256i) -> __m256i {
    sums
}

/// As [`correct_avx2`], one block.
#[inline]
pub(super) fn correct1_avx2<const W: u8>(sum: i32, _bsum: i32) -> i32 {
    sum
}

/// The fast arithmetic's 32-element-block tile ([`super::portable::dot_q8_sums`]),
/// instantiated per instruction set with the hooks of [`q8_family`] plus `$correct` /
/// `$correct1`, which turn per-block lane totals into the signed values' totals (vector of
/// eight blocks / one block; `bsum` is the token's code sum per block). `$TT` tokens share each
/// unpacked group of eight weight blocks.
macro_rules! q8s_family {
    ($features:literal, $values:ident, $wprep:ident, $xprep:ident, $lanes:ident, $correct:ident, $correct1:ident, $TT:literal) => {
        #[target_feature(enable = $features)]
        pub(super) fn q8s_tile<const W: u8>(
            m: &QMatrix,
            rows: Range<usize>,
            a: &Q8Acts,
            toks: Range<usize>,
            out: &mut [f32],
        ) {
            let n = rows.len();
            for r in rows.clone() {
                let mut t = toks.start;
                let ri = r - rows.start;
                while toks.end - t >= $TT {
                    for (u, v) in q8s_dot::<W, $TT>(m, r, a, t).into_iter().enumerate() {
                        out[(t + u - toks.start) * n + ri] = v;
                    }
                    t += $TT;
                }
                while t < toks.end {
                    out[(t - toks.start) * n + ri] = q8s_dot::<W, 1>(m, r, a, t)[0];
                    t += 1;
                }
            }
        }

        /// Row `r` against tokens `t0..t0 + T`, each exactly as
        /// [`super::portable::dot_q8_sums`].
        #[inline]
        #[target_feature(enable = $features)]
        pub(super) fn q8s_dot<const W: u8, const T: usize>(
            m: &QMatrix,
            r: usize,
            a: &Q8Acts,
            t0: usize,
        ) -> [f32; T] {
            let nb = a.cols / QK;
            let bb = block_bytes(W);
            assert!(m.cols == a.cols && r < m.rows && t0 + T <= a.tokens);
            assert!(a.q.len() >= a.tokens * a.cols && a.d.len() >= a.tokens * nb);
            assert!(a.s.len() >= a.tokens * nb && a.bsum.len() >= a.tokens * a.groups() * 8);
            let row = m.row(r).as_ptr();
            let mut acc = [_mm256_setzero_ps(); T];
            let groups = nb / 8;
            for g in 0..groups {
                let mut w = [_mm256_setzero_si256(); 8];
                let mut wp = [_mm256_setzero_si256(); 8];
                // SAFETY: the row holds `nb` blocks of `bb` bytes (a `QMatrix` row) and
                // `8g + 8 ≤ nb`.
                let (dw, mw) = unsafe {
                    for j in 0..8 {
                        w[j] = $values::<W>(row.add((8 * g + j) * bb));
                    }
                    group_scales::<W>(row.add(8 * g * bb))
                };
                for j in 0..8 {
                    wp[j] = $wprep::<W>(w[j]);
                }
                for u in 0..T {
                    let t = t0 + u;
                    let at = t * nb + 8 * g;
                    let bat = t * a.groups() * 8 + 8 * g;
                    // SAFETY: token `t` exists (asserted): codes `[t·cols, (t+1)·cols)`,
                    // per-block values `[t·nb, (t+1)·nb)` and padded sums from
                    // `t·groups·8`; blocks `8g..8g + 8` are inside.
                    let (sums, da, sa, bsum) = unsafe {
                        let x = a.q.as_ptr().add(t * a.cols + 8 * g * QK);
                        let p: [__m256i; 8] = std::array::from_fn(|j| {
                            let xj = _mm256_loadu_si256(x.add(j * QK).cast());
                            $lanes::<W>(w[j], wp[j], $xprep::<W>(xj))
                        });
                        (
                            reduce8(p),
                            _mm256_loadu_ps(a.d.as_ptr().add(at)),
                            _mm256_loadu_ps(a.s.as_ptr().add(at)),
                            _mm256_loadu_si256(a.bsum.as_ptr().add(bat).cast()),
                        )
                    };
                    let totals = _mm256_cvtepi32_ps($correct::<W>(sums, bsum));
                    acc[u] = _mm256_fmadd_ps(_mm256_mul_ps(dw, da), totals, acc[u]);
                    if asym(W) {
                        acc[u] = _mm256_fmadd_ps(mw, sa, acc[u]);
                    }
                }
            }
            // The last `nb mod 8` blocks, lane by lane.
            let mut lanes: [[f32; 8]; T] = std::array::from_fn(|u| to_array(acc[u]));
            for b in 8 * groups..nb {
                // SAFETY: block `b < nb` of the row.
                let (w, (dw, mw)) = unsafe {
                    let p = row.add(b * bb);
                    ($values::<W>(p), scales_at::<W>(p))
                };
                let wp = $wprep::<W>(w);
                for u in 0..T {
                    let t = t0 + u;
                    let at = t * a.cols + b * QK;
                    // SAFETY: as above, for block `b` of token `t`.
                    let x = unsafe { _mm256_loadu_si256(a.q.as_ptr().add(at).cast()) };
                    let bsum = a.bsum[t * a.groups() * 8 + b];
                    let total = $correct1::<W>(hsum_i32($lanes::<W>(w, wp, $xprep::<W>(x))), bsum);
                    let lane = &mut lanes[u][b % 8];
                    *lane = (dw * a.d[t * nb + b]).mul_add(total as f32, *lane);
                    if asym(W) {
                        *lane = mw.mul_add(a.s[t * nb + b], *lane);
                    }
                }
            }
            std::array::from_fn(|u| hsum8(&lanes[u]))
        }
    };
}
#[allow(unused_imports)]
pub(super) use q8s_family;

q8s_family!(
    "avx2,fma,f16c",
    values_at,
    wprep_avx2,
    xprep_avx2,
    lanes_avx2,
    correct_avx2,
    correct1_avx2,
    4
);

/// Sum of the eight i32 lanes (exact).
#[inline]
#[target_feature(enable = "avx2")]
pub(super) fn hsum_i32(v: __m256i) -> i32 {
    let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
    _mm_cvtsi128_si32(s)
}

/// Q4_K / Q6_K rows against tokens, four tokens sharing each unpacked super-block.
#[target_feature(enable = "avx2,fma,f16c")]
fn k_tile(
    m: &QMatrix,
    rows: Range<usize>,
    a: &Q8KActs,
    toks: Range<usize>,
    forms: &[KForm],
    out: &mut [f32],
) {
    let n = rows.len();
    assert!(m.cols == a.cols && toks.end <= a.tokens && forms.len() >= toks.end);
    assert!(a.q.len() >= a.tokens * a.cols);
    assert!(a.d.len() * 16 == a.bsums.len() && a.d.len() * 8 == a.bsums32.len());
    assert!(a.d.len() >= a.tokens * (a.cols / QK_K));
    for (ri, r) in rows.enumerate() {
        let row = m.row(r);
        let mut t = toks.start;
        let mut put = |t: usize, v: &[f32]| {
            for (u, &v) in v.iter().enumerate() {
                out[(t + u - toks.start) * n + ri] = v;
            }
        };
        while t < toks.end {
            if t + 4 <= toks.end {
                let f = [forms[t], forms[t + 1], forms[t + 2], forms[t + 3]];
                // SAFETY: the row holds whole super-blocks of its type (a `QMatrix`), and the
                // activations cover tokens `t..t + 4` (asserted above).
                let v = unsafe {
                    match m.wtype {
                        WType::Q4K => q4k_dot::<4>(row, a, t, f),
                        _ => q6k_dot::<4>(row, a, t, f),
                    }
                };
                put(t, &v);
                t += 4;
            } else {
                // SAFETY: as above, for token `t`.
                let v = unsafe {
                    match m.wtype {
                        WType::Q4K => q4k_dot::<1>(row, a, t, [forms[t]]),
                        _ => q6k_dot::<1>(row, a, t, [forms[t]]),
                    }
                };
                put(t, &v);
                t += 1;
            }
        }
    }
}

/// Q4_K, as [`super::portable::dot_k`], for tokens `t0..t0 + T`.
///
/// # Safety
/// `row` is a whole Q4_K row of `a.cols` columns; tokens `t0..t0 + T` exist in `a`, whose
/// arrays have their full sizes.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4k_dot<const T: usize>(
    row: &[u8],
    a: &Q8KActs,
    t0: usize,
    forms: [KForm; T],
) -> [f32; T] {
    let nb = a.cols / QK_K;
    assert!(row.len() >= nb * 144);
    let m4 = _mm256_set1_epi8(0x0F);
    let mut acc = [0f32; T];
    let mut acc_min = [0f32; T];
    for b in 0..nb {
        let blk = &row[b * 144..(b + 1) * 144];
        let (dw, mw) = (f16_at(blk, 0), f16_at(blk, 2));
        // Scales and mins (get_scale_min_k4, as llama.cpp's `utmp` shuffle).
        let u = |i: usize| {
            u32::from_le_bytes([
                blk[4 + 4 * i],
                blk[5 + 4 * i],
                blk[6 + 4 * i],
                blk[7 + 4 * i],
            ])
        };
        let (u0, u1, u2) = (u(0), u(1), u(2));
        let (k1, k2, k3) = (0x3f3f_3f3fu32, 0x0f0f_0f0fu32, 0x0303_0303u32);
        let sc = [
            (u0 & k1).to_le_bytes(),
            ((u2 & k2) | (((u0 >> 6) & k3) << 4)).to_le_bytes(),
        ];
        let mn = [
            (u1 & k1).to_le_bytes(),
            (((u2 >> 4) & k2) | (((u1 >> 6) & k3) << 4)).to_le_bytes(),
        ];
        let s = |j: usize| i16::from(sc[j / 4][j % 4]);
        let mv = |j: usize| i16::from(mn[j / 4][j % 4]);
        let mvec = _mm_setr_epi16(mv(0), mv(1), mv(2), mv(3), mv(4), mv(5), mv(6), mv(7));
        let mut isum64 = [[0i32; 4]; T];
        let mut total = [_mm256_setzero_si256(); T];
        for c in 0..4 {
            let q = load32(blk, 16 + 32 * c);
            let lo = _mm256_and_si256(q, m4);
            let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(q), m4);
            let (slo, shi) = (_mm256_set1_epi16(s(2 * c)), _mm256_set1_epi16(s(2 * c + 1)));
            for u in 0..T {
                let at = (t0 + u) * a.cols + b * QK_K + 64 * c;
                // SAFETY: token `t0 + u` exists and `b < nb`: 64 codes from `at` are in `a.q`
                // (the caller's contract); unaligned loads are allowed.
                let (x0, x1) = unsafe {
                    let p = a.q.as_ptr().add(at);
                    (
                        _mm256_loadu_si256(p.cast()),
                        _mm256_loadu_si256(p.add(32).cast()),
                    )
                };
                let v = _mm256_add_epi32(
                    _mm256_madd_epi16(_mm256_maddubs_epi16(lo, x0), slo),
                    _mm256_madd_epi16(_mm256_maddubs_epi16(hi, x1), shi),
                );
                if forms[u] == KForm::Fine {
                    isum64[u][c] = hsum_i32(v);
                } else {
                    total[u] = _mm256_add_epi32(total[u], v);
                }
            }
        }
        for u in 0..T {
            let sb = (t0 + u) * nb + b;
            let da = a.d[sb];
            // SAFETY: super-block `sb` exists (the caller's contract): 8 pair sums from
            // `8·sb`; unaligned loads are allowed.
            let bvec = unsafe { _mm_loadu_si128(a.bsums32.as_ptr().add(8 * sb).cast()) };
            let imin64 = _mm_madd_epi16(mvec, bvec);
            if forms[u] == KForm::Fine {
                let mut m64 = [0i32; 4];
                // SAFETY: `m64` is 16 writable bytes; unaligned stores are allowed.
                unsafe { _mm_storeu_si128(m64.as_mut_ptr().cast(), imin64) };
                for c in 0..4 {
                    acc[u] = (isum64[u][c] as f32).mul_add(dw * da, acc[u]);
                    acc_min[u] = (m64[c] as f32).mul_add(mw * da, acc_min[u]);
                }
            } else {
                let s4 = _mm_add_epi32(imin64, _mm_shuffle_epi32::<0b01_00_11_10>(imin64));
                let s4 = _mm_add_epi32(s4, _mm_shuffle_epi32::<0b10_11_00_01>(s4));
                let imin = _mm_cvtsi128_si32(s4);
                acc[u] = (hsum_i32(total[u]) as f32).mul_add(dw * da, acc[u]);
                acc_min[u] = (imin as f32).mul_add(mw * da, acc_min[u]);
            }
        }
    }
    std::array::from_fn(|u| acc[u] - acc_min[u])
}

/// Q6_K, as [`super::portable::dot_k`], for tokens `t0..t0 + T`.
///
/// # Safety
/// As [`q4k_dot`], for a Q6_K row.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q6k_dot<const T: usize>(
    row: &[u8],
    a: &Q8KActs,
    t0: usize,
    forms: [KForm; T],
) -> [f32; T] {
    let nb = a.cols / QK_K;
    assert!(row.len() >= nb * 210);
    let m4 = _mm256_set1_epi8(0x0F);
    let m2 = _mm256_set1_epi8(3);
    let mut acc = [0f32; T];
    let mut lanes_acc = [_mm256_setzero_ps(); T];
    for b in 0..nb {
        let blk = &row[b * 210..(b + 1) * 210];
        let dw = f16_at(blk, 208);
        let scale = |g: usize| i16::from(blk[192 + g] as i8);
        let svec: [__m256i; 8] = std::array::from_fn(|g32| {
            _mm256_set_m128i(
                _mm_set1_epi16(scale(2 * g32 + 1)),
                _mm_set1_epi16(scale(2 * g32)),
            )
        });
        let sc16 = _mm256_cvtepi8_epi16(load16(blk, 192));
        let mut lanes = [_mm256_setzero_si256(); T];
        for h in 0..2 {
            let ql0 = load32(blk, 64 * h);
            let ql1 = load32(blk, 64 * h + 32);
            let qh = load32(blk, 128 + 32 * h);
            let hb = |v: __m256i| _mm256_slli_epi16::<4>(_mm256_and_si256(v, m2));
            let q = [
                _mm256_or_si256(_mm256_and_si256(ql0, m4), hb(qh)),
                _mm256_or_si256(_mm256_and_si256(ql1, m4), hb(_mm256_srli_epi16::<2>(qh))),
                _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16::<4>(ql0), m4),
                    hb(_mm256_srli_epi16::<4>(qh)),
                ),
                _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16::<4>(ql1), m4),
                    hb(_mm256_srli_epi16::<6>(qh)),
                ),
            ];
            for (k, q) in q.into_iter().enumerate() {
                let g32 = 4 * h + k;
                for u in 0..T {
                    let at = (t0 + u) * a.cols + b * QK_K + 32 * g32;
                    // SAFETY: token `t0 + u` exists and `b < nb`: 32 codes from `at` are in
                    // `a.q` (the caller's contract); unaligned loads are allowed.
                    let x = unsafe { _mm256_loadu_si256(a.q.as_ptr().add(at).cast()) };
                    let p = _mm256_maddubs_epi16(q, x);
                    lanes[u] = _mm256_add_epi32(lanes[u], _mm256_madd_epi16(p, svec[g32]));
                }
            }
        }
        for u in 0..T {
            let sb = (t0 + u) * nb + b;
            let da = a.d[sb];
            // Lane j subtracts 32·(bsum[2j]·s[2j] + bsum[2j+1]·s[2j+1]).
            // SAFETY: super-block `sb` exists (the caller's contract): 16 sums from `16·sb`;
            // unaligned loads are allowed.
            let bs = unsafe { _mm256_loadu_si256(a.bsums.as_ptr().add(16 * sb).cast()) };
            let sub = _mm256_slli_epi32::<5>(_mm256_madd_epi16(bs, sc16));
            let l = _mm256_sub_epi32(lanes[u], sub);
            match forms[u] {
                KForm::PerBlock => acc[u] = (hsum_i32(l) as f32 * dw).mul_add(da, acc[u]),
                KForm::Fine => {
                    lanes_acc[u] = _mm256_fmadd_ps(
                        _mm256_set1_ps(da * dw),
                        _mm256_cvtepi32_ps(l),
                        lanes_acc[u],
                    );
                }
            }
        }
    }
    std::array::from_fn(|u| match forms[u] {
        KForm::PerBlock => acc[u] - 0.0,
        KForm::Fine => hsum8(&to_array(lanes_acc[u])),
    })
}

/// Dense rows (f32, f16, bf16), as [`super::portable`]'s dense kernel.
#[target_feature(enable = "avx2,fma,f16c")]
fn dense_tile(
    m: &QMatrix,
    rows: Range<usize>,
    x: &[f32],
    cols: usize,
    toks: Range<usize>,
    out: &mut [f32],
) {
    let n = rows.len();
    let full = cols - cols % 8;
    for (ri, r) in rows.enumerate() {
        let row = m.row(r);
        let w8 = |i: usize| -> __m256 {
            match m.wtype {
                WType::F32 => _mm256_castsi256_ps(load32(row, 4 * i)),
                WType::F16 => _mm256_cvtph_ps(load16(row, 2 * i)),
                _ => _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(load16(
                    row,
                    2 * i,
                )))),
            }
        };
        let w1 = |i: usize| -> f32 {
            let mut v = [0f32; 1];
            super::quant::dequantize_row(
                m.wtype,
                &row[i * m.wtype.block_bytes()..(i + 1) * m.wtype.block_bytes()],
                &mut v,
            );
            v[0]
        };
        for (ti, t) in toks.clone().enumerate() {
            let xt = &x[t * cols..(t + 1) * cols];
            let mut acc = _mm256_setzero_ps();
            for i in (0..full).step_by(8) {
                acc = _mm256_fmadd_ps(w8(i), loadf(xt, i), acc);
            }
            let mut lanes = to_array(acc);
            for i in full..cols {
                lanes[i % 8] = w1(i).mul_add(xt[i], lanes[i % 8]);
            }
            out[ti * n + ri] = hsum8(&lanes);
        }
    }
}

/// [`super::attention::exp_nonpos`], eight lanes, the same operations.
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(super) fn exp_nonpos8(x: __m256) -> __m256 {
    let keep = _mm256_cmp_ps::<_CMP_GE_OQ>(x, _mm256_set1_ps(-87.0));
    let c = |bits: u32| _mm256_set1_ps(f32::from_bits(bits));
    let shift = c(0x4B40_0000);
    let z = _mm256_fmadd_ps(x, c(0x3FB8_AA3B), shift);
    let n = _mm256_sub_ps(z, shift);
    let b = _mm256_fnmadd_ps(n, c(0x35BF_BE8E), _mm256_fnmadd_ps(n, c(0x3F31_7200), x));
    let e = _mm256_slli_epi32::<23>(_mm256_castps_si256(z));
    let k = _mm256_castsi256_ps(_mm256_add_epi32(
        e,
        _mm256_set1_epi32(1.0f32.to_bits() as i32),
    ));
    let u = _mm256_mul_ps(b, b);
    let j = _mm256_fmadd_ps(
        _mm256_fmadd_ps(
            _mm256_fmadd_ps(c(0x3C07_2010), b, c(0x3D2B_9F17)),
            u,
            _mm256_fmadd_ps(c(0x3E2A_AF33), b, c(0x3EFF_FEDB)),
        ),
        u,
        _mm256_mul_ps(c(0x3F7F_FFF6), b),
    );
    _mm256_and_ps(_mm256_fmadd_ps(j, k, k), keep)
}

/// [`super::attention::tile_portable`] on AVX2 (bit for bit): scores for eight keys of a block
/// at a time (one dimension of the keys is contiguous in the cache), four query rows sharing
/// each key load; values accumulated eight dimensions at a time.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention_tile(
    _cpu: Avx2,
    shape: &Shape,
    g: usize,
    rows: &[f32],
    positions: &[usize],
    table: &[u32],
    kc: &[f16],
    vc: &[f16],
    out: &mut [f32],
) {
    if !shape.block_size.is_multiple_of(8) || !shape.head_dim.is_multiple_of(8) {
        return super::attention::tile_portable(shape, g, rows, positions, table, kc, vc, out);
    }
    // SAFETY: `Avx2` exists only when the CPU has AVX2, FMA and F16C.
    unsafe { attention_impl(shape, g, rows, positions, table, kc, vc, out) }
}

#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma,f16c")]
fn attention_impl(
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
    assert!(rows.len() >= n * hd && out.len() >= n * hd);
    out.fill(0.0);
    let mut state = vec![RowState::NEW; n];
    let Some(&last) = positions.iter().max() else {
        return;
    };
    let lowest = |p: usize| shape.window.map_or(0, |w| (p + 1).saturating_sub(w));
    let first = positions.iter().map(|&p| lowest(p)).min().unwrap_or(0);
    let mut scores = vec![0f32; n * bs];
    let mut e = vec![0f32; bs];
    let scale = _mm256_set1_ps(shape.scale);
    for b in first / bs..=last / bs {
        let block = table[b] as usize;
        let p0 = b * bs;
        // K·Q for every row and every slot of the block, four rows at a time.
        let kb = shape.k_index(block, 0, g, 0);
        let kblk = &kc[kb..kb + hd * bs];
        for r0 in (0..n).step_by(4) {
            let rr: [usize; 4] = std::array::from_fn(|i| (r0 + i).min(n - 1));
            for c in (0..bs).step_by(8) {
                let mut acc = [_mm256_setzero_ps(); 4];
                for d in 0..hd {
                    let kv = load_f16x8(kblk, d * bs + c);
                    for i in 0..4 {
                        let q = _mm256_set1_ps(rows[rr[i] * hd + d]);
                        acc[i] = _mm256_fmadd_ps(q, kv, acc[i]);
                    }
                }
                for i in 0..4.min(n - r0) {
                    storef(&mut scores, (r0 + i) * bs + c, _mm256_mul_ps(acc[i], scale));
                }
            }
        }
        for r in 0..n {
            let (pos, lo) = (positions[r], lowest(positions[r]));
            if pos < p0 || lo >= p0 + bs {
                continue;
            }
            let (k0, k1) = (lo.max(p0) - p0, pos.min(p0 + bs - 1) - p0);
            let sr = &scores[r * bs..(r + 1) * bs];
            let bmax = sr[k0..=k1]
                .iter()
                .copied()
                .fold(f32::NEG_INFINITY, f32::max);
            let o = &mut out[r * hd..(r + 1) * hd];
            let st = &mut state[r];
            if let Some(cf) = st.rescale(bmax) {
                let cv = _mm256_set1_ps(cf);
                for d in (0..hd).step_by(8) {
                    storef(o, d, _mm256_mul_ps(loadf(o, d), cv));
                }
            }
            let mv = _mm256_set1_ps(st.max);
            for c in (0..bs).step_by(8) {
                storef(&mut e, c, exp_nonpos8(_mm256_sub_ps(loadf(sr, c), mv)));
            }
            for &ev in &e[k0..=k1] {
                st.sum += ev;
            }
            // P·V, 64 dimensions (eight registers) at a time.
            let vb = shape.v_index(block, 0, g, 0);
            let vblk = &vc[vb..vb + bs * hd];
            for d0 in (0..hd).step_by(64) {
                let w = (hd - d0).min(64) / 8;
                let mut acc = [_mm256_setzero_ps(); 8];
                for j in 0..w {
                    acc[j] = loadf(o, d0 + 8 * j);
                }
                for slot in k0..=k1 {
                    let ev = _mm256_set1_ps(e[slot]);
                    for j in 0..w {
                        let v = load_f16x8(vblk, slot * hd + d0 + 8 * j);
                        acc[j] = _mm256_fmadd_ps(ev, v, acc[j]);
                    }
                }
                for j in 0..w {
                    storef(o, d0 + 8 * j, acc[j]);
                }
            }
        }
    }
    for (r, st) in state.iter().enumerate() {
        let inv = _mm256_set1_ps(1.0 / st.sum);
        let o = &mut out[r * hd..(r + 1) * hd];
        for d in (0..hd).step_by(8) {
            storef(o, d, _mm256_mul_ps(loadf(o, d), inv));
        }
    }
}
