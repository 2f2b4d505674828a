//! AVX-512 (F/BW/VL) + VNNI kernels.
//!
//! The same arithmetic as [`super::avx2`] (and so as [`super::portable`]): the 32-element
//! blocks' lane sums come from one `vpdpbusd` (four u8 × i8 products summed into each i32 lane)
//! instead of `vpmaddubsw` + `vpmaddwd`, on 256-bit registers so the lanes stay llama.cpp's;
//! the 32 vector registers allow a larger register blocking of many-token tiles. Kernels not
//! specialised here run their AVX2 versions, which this CPU also runs.

use std::arch::x86_64::*;
use std::ops::Range;

use super::avx2::{T_Q4_0, T_Q4_1, T_Q5_0, T_Q5_1, T_Q8_0};
use super::avx2::{asym, block_bytes, q8_family, scales_at, to_array};
use super::hsum8;
use super::portable::KForm;
use super::quant::{Acts, Q8Acts, QK, QMatrix, WType};
use super::{Arithmetic, Isa};

/// Proof that this CPU runs AVX-512 F/BW/VL with VNNI (and AVX2/FMA/F16C).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Avx512(());

impl Avx512 {
    /// `Some` when the CPU has the features.
    pub(crate) fn new() -> Option<Avx512> {
        Isa::Avx512Vnni.available().then_some(Avx512(()))
    }
}

/// [`super::portable::tile`] on AVX-512 VNNI.
#[allow(clippy::too_many_arguments)]
pub(crate) fn tile(
    _cpu: Avx512,
    m: &QMatrix,
    rows: Range<usize>,
    acts: &Acts,
    toks: Range<usize>,
    arith: Arithmetic,
    forms: &[KForm],
    out: &mut [f32],
) {
    // SAFETY: `Avx512` exists only when the CPU has AVX-512 F/BW/VL/VNNI and AVX2/FMA/F16C.
    unsafe { tile_impl(m, rows, acts, toks, arith, forms, out) }
}

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
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
        _ => match super::avx2::Avx2::new() {
            Some(cpu) => super::avx2::tile(cpu, m, rows, acts, toks, arith, forms, out),
            None => super::portable::tile(m, rows, acts, toks, arith, forms, out),
        },
    }
}

/// A 32-element block's codes at `p` as unsigned bytes in element order: the nibbles (and
/// fifth bits) as stored, Q8_0's values offset by 128.
///
/// # Safety
/// `p` points to a whole block of type `W`.
#[inline]
#[target_feature(enable = "avx2,avx512f,avx512bw,avx512vl")]
unsafe fn codes_at<const W: u8>(p: *const u8) -> __m256i {
    let m4 = _mm_set1_epi8(0x0F);
    // SAFETY: every offset read below lies inside a block of type `W` (the caller's
    // contract); unaligned loads are allowed.
    unsafe {
        match W {
            T_Q4_0 | T_Q4_1 => {
                let x = _mm_loadu_si128(p.add(if W == T_Q4_1 { 4 } else { 2 }).cast());
                _mm256_set_m128i(
                    _mm_and_si128(_mm_srli_epi16::<4>(x), m4),
                    _mm_and_si128(x, m4),
                )
            }
            T_Q5_0 | T_Q5_1 => {
                let at = if W == T_Q5_1 { 4 } else { 2 };
                let qh = std::ptr::read_unaligned(p.add(at).cast::<u32>());
                let x = _mm_loadu_si128(p.add(at + 4).cast());
                let nibbles = _mm256_set_m128i(
                    _mm_and_si128(_mm_srli_epi16::<4>(x), m4),
                    _mm_and_si128(x, m4),
                );
                let fifth = _mm256_and_si256(_mm256_movm_epi8(qh), _mm256_set1_epi8(0x10));
                _mm256_or_si256(nibbles, fifth)
            }
            _ => _mm256_xor_si256(_mm256_loadu_si256(p.add(2).cast()), _mm256_set1_epi8(-128)),
        }
    }
}

/// Codes need no preparation for `vpdpbusd`.
#[inline]
#[target_feature(enable = "avx2")]
fn wprep_vnni<const W: u8>(w: __m256i) -> __m256i {
    w
}

/// A token's block of codes and the accumulator the lane sums start from: for the types whose
/// codes are offset (`value = code − offset`), `−offset × Σ` of each four codes, so that
/// `vpdpbusd` of the unsigned codes lands on the signed values' sums.
#[inline]
#[target_feature(enable = "avx2,avx512f,avx512vl,avx512vnni")]
fn xprep_vnni<const W: u8>(x: __m256i) -> (__m256i, __m256i) {
    let zero = _mm256_setzero_si256();
    let offset = match W {
        T_Q4_0 => 8,
        T_Q5_0 => 16,
        T_Q8_0 => -128,
        _ => return (x, zero),
    };
    let sums = _mm256_dpbusd_epi32(zero, _mm256_set1_epi8(offset), x);
    (x, _mm256_sub_epi32(zero, sums))
}

/// Lane sums of `w · x` (four elements per i32 lane) with one `vpdpbusd` (`w` unsigned codes,
/// the offset correction as the starting accumulator).
#[inline]
#[target_feature(enable = "avx2,avx512f,avx512vl,avx512vnni")]
fn lanes_vnni<const W: u8>(w: __m256i, _wp: __m256i, x: (__m256i, __m256i)) -> __m256i {
    _mm256_dpbusd_epi32(x.1, w, x.0)
}

q8_family!(
    "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni",
    codes_at,
    wprep_vnni,
    xprep_vnni,
    lanes_vnni,
    4,
    4
);

/// `log2` of a type's code offset, 0 for none.
const fn offset_shift(w: u8) -> i32 {
    match w {
        T_Q4_0 => 3,
        T_Q5_0 => 4,
        T_Q8_0 => 7,
        _ => 0,
    }
}

/// An 8×8 transpose of 32-bit elements: row `k` of the result holds element `k` of each input.
#[inline]
#[target_feature(enable = "avx2")]
fn transpose8(w: [__m256i; 8]) -> [__m256i; 8] {
    let t: [__m256i; 8] = std::array::from_fn(|i| {
        let (a, b) = (w[2 * (i / 2) % 8], w[2 * (i / 2) % 8 + 1]);
        if i % 2 == 0 {
            _mm256_unpacklo_epi32(a, b)
        } else {
            _mm256_unpackhi_epi32(a, b)
        }
    });
    // t[0] = lo(w0,w1), t[1] = hi(w0,w1), t[2] = lo(w2,w3), t[3] = hi(w2,w3), …
    let u = [
        _mm256_unpacklo_epi64(t[0], t[2]),
        _mm256_unpackhi_epi64(t[0], t[2]),
        _mm256_unpacklo_epi64(t[1], t[3]),
        _mm256_unpackhi_epi64(t[1], t[3]),
        _mm256_unpacklo_epi64(t[4], t[6]),
        _mm256_unpackhi_epi64(t[4], t[6]),
        _mm256_unpacklo_epi64(t[5], t[7]),
        _mm256_unpackhi_epi64(t[5], t[7]),
    ];
    [
        _mm256_permute2x128_si256::<0x20>(u[0], u[4]),
        _mm256_permute2x128_si256::<0x20>(u[1], u[5]),
        _mm256_permute2x128_si256::<0x20>(u[2], u[6]),
        _mm256_permute2x128_si256::<0x20>(u[3], u[7]),
        _mm256_permute2x128_si256::<0x31>(u[0], u[4]),
        _mm256_permute2x128_si256::<0x31>(u[1], u[5]),
        _mm256_permute2x128_si256::<0x31>(u[2], u[6]),
        _mm256_permute2x128_si256::<0x31>(u[3], u[7]),
    ]
}

/// The fast arithmetic's 32-element-block tile ([`super::portable::dot_q8_sums`]) with
/// transposed groups: each row's eight blocks are unpacked and transposed once and meet up to
/// eight tokens' transposed codes ([`Q8Acts::qt`]), eight chained `vpdpbusd` giving the eight
/// block totals in one register.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn q8s_tile<const W: u8>(
    m: &QMatrix,
    rows: Range<usize>,
    a: &Q8Acts,
    toks: Range<usize>,
    out: &mut [f32],
) {
    let n = rows.len();
    for r in rows.clone() {
        let ri = r - rows.start;
        let mut t = toks.start;
        let mut put = |t: usize, v: &[f32]| {
            for (u, &v) in v.iter().enumerate() {
                out[(t + u - toks.start) * n + ri] = v;
            }
        };
        while t + 8 <= toks.end {
            put(t, &q8t_dot::<W, 8>(m, r, a, t));
            t += 8;
        }
        while t + 4 <= toks.end {
            put(t, &q8t_dot::<W, 4>(m, r, a, t));
            t += 4;
        }
        while t < toks.end {
            // One token: the eight blocks' partial sums reduced horizontally, which costs less
            // than transposing the weights for a single use.
            put(t, &reduce::q8s_dot::<W, 1>(m, r, a, t));
            t += 1;
        }
    }
}

/// Row `r` against tokens `t0..t0 + T`, each exactly as [`super::portable::dot_q8_sums`].
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn q8t_dot<const W: u8, const T: usize>(m: &QMatrix, r: usize, a: &Q8Acts, t0: usize) -> [f32; T] {
    let nb = a.cols / QK;
    let bb = block_bytes(W);
    let groups = a.groups();
    assert!(m.cols == a.cols && r < m.rows && t0 + T <= a.tokens);
    assert!(a.d.len() >= a.tokens * nb && a.s.len() >= a.tokens * nb);
    assert!(a.bsum.len() >= a.tokens * groups * 8 && a.qt.len() >= a.tokens * groups * 256);
    let row = m.row(r).as_ptr();
    let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    let mut acc = [_mm256_setzero_ps(); T];
    for g in 0..groups {
        let blocks = (nb - 8 * g).min(8);
        let live = _mm256_cmpgt_epi32(_mm256_set1_epi32(blocks as i32), lane);
        // SAFETY: blocks `8g .. 8g + blocks` lie in the row (`8g + blocks ≤ nb`); the masked
        // gather reads only the first four bytes of those (each block has at least 18).
        let (w, dw, mw) = unsafe {
            let p = row.add(8 * g * bb);
            let w: [__m256i; 8] = std::array::from_fn(|j| {
                if j < blocks {
                    codes_at::<W>(p.add(j * bb))
                } else {
                    _mm256_setzero_si256()
                }
            });
            let bbi = bb as i32;
            let offsets = _mm256_mullo_epi32(lane, _mm256_set1_epi32(bbi));
            let sc =
                _mm256_mask_i32gather_epi32::<1>(_mm256_setzero_si256(), p.cast(), offsets, live);
            let halves = |v: __m256i| {
                _mm256_cvtph_ps(_mm_packus_epi32(
                    _mm256_castsi256_si128(v),
                    _mm256_extracti128_si256::<1>(v),
                ))
            };
            let dw = halves(_mm256_and_si256(sc, _mm256_set1_epi32(0xFFFF)));
            let mw = if asym(W) {
                halves(_mm256_srli_epi32::<16>(sc))
            } else {
                _mm256_setzero_ps()
            };
            (w, dw, mw)
        };
        let wt = transpose8(w);
        for u in 0..T {
            let t = t0 + u;
            let at = t * nb + 8 * g;
            // SAFETY: token `t` exists (asserted): its transposed group `g` is 256 bytes at
            // `(t·groups + g)·256` of `qt`, its padded sums 8 at `(t·groups + g)·8` of `bsum`;
            // `d` and `s` are read with the live lanes' mask (blocks `< nb` of token `t`).
            let (isum, da, sa) = unsafe {
                let x = a.qt.as_ptr().add((t * groups + g) * 256);
                let bsum = _mm256_loadu_si256(a.bsum.as_ptr().add((t * groups + g) * 8).cast());
                let mut isum = match offset_shift(W) {
                    0 => _mm256_setzero_si256(),
                    3 => _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32::<3>(bsum)),
                    4 => _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32::<4>(bsum)),
                    _ => _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32::<7>(bsum)),
                };
                for (k, wk) in wt.iter().enumerate() {
                    isum = _mm256_dpbusd_epi32(isum, *wk, _mm256_loadu_si256(x.add(32 * k).cast()));
                }
                (
                    isum,
                    _mm256_maskload_ps(a.d.as_ptr().add(at), live),
                    _mm256_maskload_ps(a.s.as_ptr().add(at), live),
                )
            };
            acc[u] = _mm256_fmadd_ps(_mm256_mul_ps(dw, da), _mm256_cvtepi32_ps(isum), acc[u]);
            if asym(W) {
                acc[u] = _mm256_fmadd_ps(mw, sa, acc[u]);
            }
        }
    }
    std::array::from_fn(|u| hsum8(&to_array(acc[u])))
}

/// The reduce-based fast kernel ([`super::avx2`]'s, with `vpdpbusd` lanes) for single tokens.
// Only the family's `q8s_dot` is used here: `q8s_tile` above drives it for the leftover tokens.
#[allow(dead_code)]
mod reduce {
    use std::arch::x86_64::*;
    use std::ops::Range;

    use super::super::avx2::{
        asym, block_bytes, group_scales, hsum_i32, q8s_family, reduce8, scales_at, to_array,
    };
    use super::super::hsum8;
    use super::super::quant::{Q8Acts, QK, QMatrix};
    use super::{codes_at, lanes_vnni, offset_shift, wprep_vnni};

    /// The codes alone: the offset is corrected on the block totals.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn xprep_sums<const W: u8>(x: __m256i) -> (__m256i, __m256i) {
        (x, _mm256_setzero_si256())
    }

    /// Block totals of unsigned codes → of signed values: `− offset × Σ codes` per block.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn correct<const W: u8>(sums: __m256i, bsum: __m256i) -> __m256i {
        match offset_shift(W) {
            0 => sums,
            3 => _mm256_sub_epi32(sums, _mm256_slli_epi32::<3>(bsum)),
            4 => _mm256_sub_epi32(sums, _mm256_slli_epi32::<4>(bsum)),
            _ => _mm256_sub_epi32(sums, _mm256_slli_epi32::<7>(bsum)),
        }
    }

    /// As [`correct`], one block.
    #[inline]
    fn correct1<const W: u8>(sum: i32, bsum: i32) -> i32 {
        match offset_shift(W) {
            0 => sum,
            k => sum - (bsum << k),
        }
    }

    q8s_family!(
        "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni",
        codes_at,
        wprep_vnni,
        xprep_sums,
        lanes_vnni,
        correct,
        correct1,
        1
    );
}
