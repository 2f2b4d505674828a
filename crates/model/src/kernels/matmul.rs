//! `y = x · Wᵀ` for every token of a step in one pass over the weights.
//!
//! The step's activations are quantized once (per activation kind), then the work is cut into
//! tiles of (weight rows × tokens): a tile's weight rows are read from memory once and stay in
//! cache while all its tokens pass, so a batch of 16 decode tokens costs about one pass over the
//! weights, not sixteen. Tiles run on the kernel [`Pool`]; which thread runs a tile never
//! changes a value (each output is one kernel's fixed arithmetic), so results do not depend on
//! the tiling, the batch, or the thread count.

use std::cell::RefCell;
use std::ops::Range;

use super::pool::{OutPtr, Pool};
use super::portable::KForm;
use super::quant::{ActKind, Acts, QMatrix, WType};
use super::{Arithmetic, Isa, KernelPath};

/// Tokens per tile: the activations of a tile stay in L2 while its weight rows stream.
const TOKENS_PER_TILE: usize = 64;
/// Weight rows are split in multiples of this (the SIMD kernels' row blocking).
const ROW_ALIGN: usize = 16;

thread_local! {
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// One tile: rows of matrix `m` × tokens.
struct Tile {
    m: usize,
    rows: Range<usize>,
    toks: Range<usize>,
}

/// Every output of one tile into `out` (`[token][row]`), on `path`.
pub(crate) fn tile(
    path: KernelPath,
    m: &QMatrix,
    rows: Range<usize>,
    acts: &Acts,
    toks: Range<usize>,
    forms: &[KForm],
    out: &mut [f32],
) {
    let arith = path.arithmetic;
    match path.isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Vnni => {
            if let Some(cpu) = super::avx512::Avx512::new() {
                return super::avx512::tile(cpu, m, rows, acts, toks, arith, forms, out);
            }
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => {
            if let Some(cpu) = super::avx2::Avx2::new() {
                return super::avx2::tile(cpu, m, rows, acts, toks, arith, forms, out);
            }
        }
        _ => {}
    }
    super::portable::tile(m, rows, acts, toks, arith, forms, out);
}

thread_local! {
    /// The calling thread's quantized activations, refilled by every matmul (no allocation
    /// once warm).
    static ACTS: RefCell<Vec<(ActKind, Acts)>> = const { RefCell::new(Vec::new()) };
}

/// `x [t, k]` times each matrix's transpose (every matrix has `k` columns), into `outs` (one
/// `[t, rows]` output per matrix, resized; their capacity is reused). `chunks` are the lengths
/// of the step's sequences, in order (they sum to `t`); the exact arithmetic uses them to pick
/// llama.cpp's K-quant kernels. The activations are quantized once per kind the group needs.
pub(crate) fn matmul_into(
    path: KernelPath,
    mats: &[&QMatrix],
    x: &[f32],
    chunks: &[usize],
    outs: &mut [&mut Vec<f32>],
) {
    let t: usize = chunks.iter().sum();
    let Some(k) = mats.first().map(|m| m.cols) else {
        return;
    };
    assert!(
        mats.iter().all(|m| m.cols == k) && x.len() == t * k && outs.len() == mats.len(),
        "matmul shapes: x has {} values for {t} tokens, matrices have {:?} columns",
        x.len(),
        mats.iter().map(|m| m.cols).collect::<Vec<_>>()
    );
    for (o, m) in outs.iter_mut().zip(mats) {
        o.resize(t * m.rows, 0.0);
    }
    if t == 0 {
        return;
    }
    ACTS.with_borrow_mut(|cache| {
        // Activations, once per kind the group needs.
        cache.retain(|(kind, _)| mats.iter().any(|m| m.wtype.acts() == *kind));
        let mut fresh = Vec::new();
        for m in mats {
            let kind = m.wtype.acts();
            if fresh.contains(&kind) {
                continue;
            }
            fresh.push(kind);
            match cache.iter_mut().find(|(k, _)| *k == kind) {
                Some((_, acts)) => acts.refill(x, t, k),
                None => cache.push((kind, Acts::new(kind, x, t, k))),
            }
        }
        run_tiles(path, mats, cache, chunks, t, outs);
    });
}

fn run_tiles(
    path: KernelPath,
    mats: &[&QMatrix],
    acts: &[(ActKind, Acts)],
    chunks: &[usize],
    t: usize,
    outs: &mut [&mut Vec<f32>],
) {
    let pool = Pool::global();
    let acts_of = |m: &QMatrix| -> &Acts {
        let kind = m.wtype.acts();
        &acts
            .iter()
            .find(|(k, _)| *k == kind)
            .expect("quantized above")
            .1
    };
    // K-quant forms per token (only the exact arithmetic varies them).
    let forms_of = |wtype: WType| -> Vec<KForm> {
        match path.arithmetic {
            Arithmetic::Exact if matches!(wtype, WType::Q4K | WType::Q6K) => chunks
                .iter()
                .flat_map(|&len| (0..len).map(move |i| KForm::llama_cpp(wtype, i, len)))
                .collect(),
            _ => vec![KForm::PerBlock; t],
        }
    };
    let forms: Vec<Vec<KForm>> = mats.iter().map(|m| forms_of(m.wtype)).collect();
    // Tiles: enough row ranges per matrix to keep every thread busy, tokens in cache-sized
    // groups.
    let threads = pool.threads();
    let mut tiles = Vec::new();
    for (mi, m) in mats.iter().enumerate() {
        let n = m.rows;
        let per = n
            .div_ceil(4 * threads)
            .next_multiple_of(ROW_ALIGN)
            .max(ROW_ALIGN);
        for r0 in (0..n).step_by(per) {
            for t0 in (0..t).step_by(TOKENS_PER_TILE) {
                tiles.push(Tile {
                    m: mi,
                    rows: r0..(r0 + per).min(n),
                    toks: t0..(t0 + TOKENS_PER_TILE).min(t),
                });
            }
        }
    }
    let targets: Vec<OutPtr> = outs.iter_mut().map(|o| OutPtr::new(o)).collect();
    pool.run(tiles.len(), &|i| {
        let tl = &tiles[i];
        let m = mats[tl.m];
        let (nr, nt) = (tl.rows.len(), tl.toks.len());
        SCRATCH.with_borrow_mut(|buf| {
            buf.clear();
            buf.resize(nr * nt, 0.0);
            tile(
                path,
                m,
                tl.rows.clone(),
                acts_of(m),
                tl.toks.clone(),
                &forms[tl.m],
                buf,
            );
            for (ti, tok) in tl.toks.clone().enumerate() {
                // SAFETY: tiles of one matrix cover disjoint (row range × token range)
                // rectangles, so the range `[tok·rows + r0, tok·rows + r1)` is written by this
                // tile alone, and `outs` outlives `pool.run`.
                unsafe {
                    targets[tl.m].write(tok * m.rows + tl.rows.start, &buf[ti * nr..(ti + 1) * nr]);
                }
            }
        });
    });
}
