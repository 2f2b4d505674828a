//! Every SIMD kernel against the portable reference, bit for bit, on random weights of every
//! type, random activations, and random tile shapes; and the reference against plain f32
//! arithmetic on dequantized weights (so the reference is right, not only self-consistent).
//! Paths this CPU lacks are skipped with a printed reason.
#![allow(clippy::print_stderr)]

use half::{bf16, f16};
use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::attention::{self, Shape};
use super::matmul::tile;
use super::portable::{self, KForm};
use super::quant::{ActKind, Acts, QMatrix, WType, dequantize_row};
use super::{Arithmetic, Isa, KernelPath};
use crate::mmap::Bytes;

const TYPES: [WType; 13] = [
    WType::F32,
    WType::F16,
    WType::Bf16,
    WType::Q4_0,
    WType::Q4_1,
    WType::Q5_0,
    WType::Q5_1,
    WType::Q8_0,
    WType::Q2K,
    WType::Q3K,
    WType::Q4K,
    WType::Q5K,
    WType::Q6K,
];

/// The SIMD paths this CPU runs; prints why the others are skipped (once per test).
fn simd_paths() -> Vec<Isa> {
    let mut paths = Vec::new();
    for isa in [Isa::Avx2, Isa::Avx512Vnni] {
        match isa.unavailable_reason() {
            None => paths.push(isa),
            Some(why) => eprintln!("SKIP: {} kernels not tested: {why}", isa.name()),
        }
    }
    paths
}

/// Random bytes for `rows × cols` of `wtype`, with every f16 scale finite and of a realistic
/// size (random bytes would make NaNs and infinities).
pub(crate) fn random_matrix(wtype: WType, rows: usize, cols: usize, seed: u64) -> QMatrix {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let rb = wtype.row_bytes(cols).expect("whole blocks");
    let mut bytes: Vec<u8> = (0..rows * rb).map(|_| rng.random()).collect();
    let put = |bytes: &mut [u8], at: usize, v: f32| {
        bytes[at..at + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes());
    };
    match wtype {
        WType::F32 => {
            for c in bytes.chunks_exact_mut(4) {
                c.copy_from_slice(&rng.random_range(-2.0f32..2.0).to_le_bytes());
            }
        }
        WType::F16 => {
            for c in bytes.chunks_exact_mut(2) {
                put(c, 0, rng.random_range(-2.0..2.0));
            }
        }
        WType::Bf16 => {
            for c in bytes.chunks_exact_mut(2) {
                c.copy_from_slice(&bf16::from_f32(rng.random_range(-2.0..2.0)).to_le_bytes());
            }
        }
        _ => {
            let bb = wtype.block_bytes();
            let scales: &[usize] = match wtype {
                WType::Q4_0 | WType::Q5_0 | WType::Q8_0 => &[0],
                WType::Q4_1 | WType::Q5_1 | WType::Q4K | WType::Q5K => &[0, 2],
                WType::Q2K => &[80, 82],
                WType::Q3K => &[108],
                _ => &[208],
            };
            for blk in bytes.chunks_exact_mut(bb) {
                for &at in scales {
                    put(blk, at, rng.random_range(-0.05..0.05));
                }
            }
        }
    }
    QMatrix::new(wtype, rows, cols, Bytes::from_vec(bytes)).expect("sizes")
}

fn random_x(tokens: usize, cols: usize, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed);
    (0..tokens * cols)
        .map(|i| {
            // Mostly small values, some outliers, some exact zeros (a zero block too).
            if i % 97 == 0 {
                rng.random_range(-30.0..30.0)
            } else if (i / 256) % 7 == 3 {
                0.0
            } else {
                rng.random_range(-2.0..2.0)
            }
        })
        .collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|f| f.to_bits()).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Every SIMD tile equals the portable tile bit for bit, for every weight type, random
    /// row/token ranges and both K-quant forms.
    #[test]
    fn simd_tiles_equal_the_reference(
        seed in any::<u64>(),
        rows in 1usize..21,
        superblocks in prop::sample::select(vec![1usize, 2, 3, 5]),
        blocks in 1usize..45,
        tokens in 1usize..10,
        fine in proptest::collection::vec(any::<bool>(), 10),
    ) {
        for wtype in TYPES {
            // The 32-element types with any block count (tails of a group of eight), the others
            // in whole super-blocks.
            let cols = match wtype.acts() {
                ActKind::Q8 => 32 * blocks,
                _ => 256 * superblocks,
            };
            let m = random_matrix(wtype, rows + 3, cols, seed);
            let x = random_x(tokens, cols, seed);
            let acts = Acts::new(wtype.acts(), &x, tokens, cols);
            let forms: Vec<KForm> = fine.iter().map(|&f| if f { KForm::Fine } else { KForm::PerBlock }).collect();
            let (r, t) = (1..rows + 1, 0..tokens);
            for arith in [Arithmetic::Fast, Arithmetic::Exact] {
                let mut want = vec![0f32; r.len() * t.len()];
                portable::tile(&m, r.clone(), &acts, t.clone(), arith, &forms, &mut want);
                for isa in Isa::ALL.into_iter().filter(|i| i.available() && *i != Isa::Portable) {
                    let mut got = vec![0f32; want.len()];
                    let path = KernelPath { isa, arithmetic: arith };
                    tile(path, &m, r.clone(), &acts, t.clone(), &forms, &mut got);
                    prop_assert_eq!(bits(&got), bits(&want), "{:?} on {} {:?}", wtype, isa.name(), arith);
                }
            }
        }
    }
}

#[test]
fn simd_paths_are_tested_or_skipped_with_a_reason() {
    // On this project's machines (AVX-512 EPYC) both SIMD paths run.
    let paths = simd_paths();
    for isa in &paths {
        assert!(isa.available());
    }
    eprintln!(
        "SIMD paths tested here: {:?}",
        paths.iter().map(|i| i.name()).collect::<Vec<_>>()
    );
}

/// The reference kernels against f32 arithmetic on the dequantized weights and the
/// unquantized activations: within what 8-bit activations cost.
#[test]
fn reference_kernels_compute_the_product() {
    let (rows, cols, tokens) = (6, 512, 3);
    for wtype in TYPES {
        let m = random_matrix(wtype, rows, cols, 7);
        let x = random_x(tokens, cols, 7);
        let acts = Acts::new(wtype.acts(), &x, tokens, cols);
        let mut w = vec![0f32; cols];
        for r in 0..rows {
            dequantize_row(wtype, m.row(r), &mut w);
            for t in 0..tokens {
                let xt = &x[t * cols..(t + 1) * cols];
                let want: f64 = w
                    .iter()
                    .zip(xt)
                    .map(|(&a, &b)| f64::from(a) * f64::from(b))
                    .sum();
                let norm: f64 = w
                    .iter()
                    .zip(xt)
                    .map(|(&a, &b)| (f64::from(a) * f64::from(b)).abs())
                    .sum();
                for (arith, form) in [
                    (Arithmetic::Fast, KForm::PerBlock),
                    (Arithmetic::Exact, KForm::PerBlock),
                    (Arithmetic::Exact, KForm::Fine),
                ] {
                    let got = f64::from(portable::dot(&m, r, &acts, t, arith, form));
                    assert!(
                        (got - want).abs() <= 0.02 * norm + 1e-6,
                        "{wtype:?} r{r} t{t} {arith:?} {form:?}: {got} vs {want} (scale {norm})"
                    );
                }
            }
        }
    }
}

/// A random paged cache for attention tests: `blocks` blocks of one layer.
fn random_cache(shape: &Shape, blocks: usize, seed: u64) -> (Vec<f16>, Vec<f16>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n = blocks * shape.block_elems();
    let mut fill = || {
        (0..n)
            .map(|_| f16::from_f32(rng.random_range(-3.0..3.0)))
            .collect()
    };
    (fill(), fill())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    /// The SIMD attention tile equals the portable one bit for bit: random head sizes,
    /// windows, block tables and query positions (including tiles that straddle blocks).
    #[test]
    fn simd_attention_equals_the_reference(
        seed in any::<u64>(),
        head_dim in prop::sample::select(vec![8usize, 16, 64, 72, 256]),
        group in 1usize..5,
        block_size in prop::sample::select(vec![1usize, 4, 16, 32]),
        start in 0usize..70,
        len in 1usize..20,
        window in prop::option::of(1usize..40),
    ) {
        let shape = Shape { heads: 2 * group, kv_heads: 2, head_dim, block_size, scale: 0.125, window };
        let blocks = (start + len).div_ceil(block_size) + 2;
        let (kc, vc) = random_cache(&shape, blocks, seed);
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 1);
        let mut table: Vec<u32> = (0..blocks as u32).collect();
        for i in (1..table.len()).rev() {
            table.swap(i, rng.random_range(0..=i));
        }
        let positions: Vec<usize> = (0..len * group).map(|r| start + r / group).collect();
        let rows: Vec<f32> = (0..positions.len() * head_dim).map(|_| rng.random_range(-2.0..2.0)).collect();
        let mut want = vec![0f32; rows.len()];
        attention::tile_portable(&shape, 1, &rows, &positions, &table, &kc, &vc, &mut want);
        prop_assert!(want.iter().all(|v| v.is_finite()));
        for isa in Isa::ALL.into_iter().filter(|i| i.available() && *i != Isa::Portable) {
            let mut got = vec![0f32; rows.len()];
            attention::tile(isa, &shape, 1, &rows, &positions, &table, &kc, &vc, &mut got);
            prop_assert_eq!(bits(&got), bits(&want), "{}", isa.name());
        }
    }
}

/// The fast attention against a plain f64 softmax over the same f16 cache.
#[test]
fn fast_attention_computes_softmax_attention() {
    let shape = Shape {
        heads: 4,
        kv_heads: 2,
        head_dim: 32,
        block_size: 4,
        scale: 0.2,
        window: Some(9),
    };
    let (kc, vc) = random_cache(&shape, 8, 3);
    let table: Vec<u32> = vec![5, 2, 7, 0, 1, 3, 6, 4];
    let positions = vec![3usize, 3, 17, 17, 30, 30];
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let rows: Vec<f32> = (0..positions.len() * 32)
        .map(|_| rng.random_range(-1.0..1.0))
        .collect();
    let mut got = vec![0f32; rows.len()];
    attention::tile_portable(&shape, 1, &rows, &positions, &table, &kc, &vc, &mut got);
    let bs = shape.block_size;
    for (r, &pos) in positions.iter().enumerate() {
        let lo = (pos + 1).saturating_sub(9);
        let q = &rows[r * 32..(r + 1) * 32];
        let scores: Vec<f64> = (lo..=pos)
            .map(|p| {
                let b = table[p / bs] as usize;
                (0..32)
                    .map(|d| {
                        f64::from(q[d]) * f64::from(kc[shape.k_index(b, p % bs, 1, d)].to_f32())
                    })
                    .sum::<f64>()
                    * 0.2
            })
            .collect();
        let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
        let sum: f64 = e.iter().sum();
        for d in 0..32 {
            let want: f64 = (lo..=pos)
                .zip(&e)
                .map(|(p, w)| {
                    let b = table[p / bs] as usize;
                    w / sum * f64::from(vc[shape.v_index(b, p % bs, 1, d)].to_f32())
                })
                .sum();
            let g = f64::from(got[r * 32 + d]);
            assert!((g - want).abs() < 1e-4, "row {r} dim {d}: {g} vs {want}");
        }
    }
}
