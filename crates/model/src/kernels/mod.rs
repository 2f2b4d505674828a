//! The arithmetic kernels of the forward pass, chosen at run time by CPU feature detection.
//!
//! Everything that multiplies weights or reads the KV cache at scale lives here, in one module
//! tree, because it is the one place in the model crate that needs `unsafe` (SIMD intrinsics,
//! and the lifetime erasure of the fork-join [`pool`]). Every `unsafe` block carries a
//! `// SAFETY:` comment (enforced by `clippy::undocumented_unsafe_blocks`), and every SIMD
//! kernel is property-tested against the safe [`portable`] kernel it must equal bit for bit.
//!
//! - [`quant`]: the GGML weight types as they lie in the (memory-mapped) file, decoded per block
//!   into integers, and the activation quantizations (`Q8` per 32 elements, `Q8K` per 256);
//! - [`portable`]: the reference kernels in safe Rust, which define the arithmetic: exact
//!   integer dot products, then a fixed sequence of f32 operations per output;
//! - `avx2` (AVX2 + FMA + F16C) and `avx512` (AVX-512 F/BW/VL + VNNI): the same arithmetic,
//!   faster. Integer sums are exact however they are formed, and the f32 steps are the same
//!   operations in the same order, so every path gives the same bits;
//! - [`matmul`]: `x @ Wᵀ` for a whole step's tokens in one pass over the weights (a GEMM, not
//!   one GEMV per token), split into tiles over the [`pool`];
//! - [`attention`]: attention over the paged f16 KV cache: tiled with an online softmax (the
//!   fast path), or llama.cpp's materialised softmax (the exact path);
//! - [`pool`]: the fork-join thread pool all of the above run on (spinning workers: a decode
//!   step runs ~150 parallel regions, so a handoff must cost microseconds, not a futex wake).
//!
//! Two modes ([`Arithmetic`]): `Fast` fixes one reduction order per output row whatever the
//! batch (a sequence's logits do not depend on its batch mates, its position in the batch, or
//! how its prompt was chunked); `Exact` reproduces llama.cpp's AVX-512 build bit for bit,
//! including its choice of kernel by the shape of a step (see `ggml_math`).
#![allow(unsafe_code)]
#![deny(clippy::undocumented_unsafe_blocks)]
// Kernels index several parallel arrays (rows, tokens, lanes) with the same counter; index loops
// say that more plainly than zipped iterators.
#![allow(clippy::needless_range_loop)]

pub(crate) mod attention;
#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
pub(crate) mod matmul;
pub(crate) mod pool;
pub(crate) mod portable;
pub(crate) mod quant;
#[cfg(test)]
mod reference_tests;

use std::fmt;
use std::str::FromStr;

/// The instruction set the kernels run with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Isa {
    /// Safe Rust, no intrinsics: the reference every other path must equal.
    Portable,
    /// AVX2 + FMA + F16C (`x86-64-v3`): every x86 GPU server of the last decade.
    Avx2,
    /// AVX-512 F/BW/VL with VNNI (`vpdpbusd`): Ice Lake and later Xeons, Zen 4 and later EPYCs.
    Avx512Vnni,
}

impl Isa {
    /// Every path, slowest first.
    pub const ALL: [Isa; 3] = [Isa::Portable, Isa::Avx2, Isa::Avx512Vnni];

    /// The fastest path this CPU runs.
    pub fn detect() -> Isa {
        Isa::ALL
            .into_iter()
            .rev()
            .find(|isa| isa.available())
            .unwrap_or(Isa::Portable)
    }

    /// Whether this CPU (and this build's target) can run the path.
    pub fn available(self) -> bool {
        match self {
            Isa::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni => {
                Isa::Avx2.available()
                    && is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vl")
                    && is_x86_feature_detected!("avx512vnni")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The name workers report (`portable`, `avx2`, `avx512-vnni`).
    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            Isa::Avx2 => "avx2",
            Isa::Avx512Vnni => "avx512-vnni",
        }
    }

    /// Why the path cannot run here, for messages; `None` when it can.
    pub fn unavailable_reason(self) -> Option<String> {
        (!self.available()).then(|| {
            format!(
                "this CPU (or build target) lacks the {} instructions",
                match self {
                    Isa::Portable => "baseline",
                    Isa::Avx2 => "AVX2/FMA/F16C",
                    Isa::Avx512Vnni => "AVX-512 F/BW/VL/VNNI",
                }
            )
        })
    }
}

/// Which arithmetic the forward pass runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Arithmetic {
    /// One fixed reduction order per output (batch-invariant), tiled online-softmax attention.
    #[default]
    Fast,
    /// llama.cpp's AVX-512 build, bit for bit (the golden outputs), including its per-shape
    /// kernel choices; slower attention on long prompts.
    Exact,
}

/// The kernels a model runs: an instruction set and an arithmetic. Displayed as what a worker
/// advertises: the instruction set's name on the fast path, `exact` on the exact one. Two
/// workers advertising the same path produce the same bits for the same input; every fast path
/// computes the same arithmetic, so in fact all of `avx512-vnni`, `avx2` and `portable` agree
/// (the kernels' property tests check it), and only speed differs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KernelPath {
    /// The instruction set.
    pub isa: Isa,
    /// The arithmetic.
    pub arithmetic: Arithmetic,
}

impl KernelPath {
    /// The fastest path on this CPU, fast arithmetic.
    pub fn detect() -> KernelPath {
        KernelPath {
            isa: Isa::detect(),
            arithmetic: Arithmetic::Fast,
        }
    }

    /// The exact arithmetic on the fastest instruction set here.
    pub fn exact() -> KernelPath {
        KernelPath {
            isa: Isa::detect(),
            arithmetic: Arithmetic::Exact,
        }
    }

    /// The path `KVFLEET_KERNELS` names (`auto`, `exact`, `avx512-vnni`, `avx2`, `portable`),
    /// or [`KernelPath::detect`] when it is unset: the operator's override for every model a
    /// process loads (e.g. `Environment=KVFLEET_KERNELS=exact` in a systemd unit).
    pub fn from_env() -> Result<KernelPath, KernelChoiceError> {
        match std::env::var("KVFLEET_KERNELS") {
            Ok(v) if !v.trim().is_empty() => v.parse(),
            _ => Ok(KernelPath::detect()),
        }
    }

    /// What a worker reports: `avx512-vnni`, `avx2`, `portable` or `exact`.
    pub fn name(self) -> &'static str {
        match self.arithmetic {
            Arithmetic::Exact => "exact",
            Arithmetic::Fast => self.isa.name(),
        }
    }

    /// Whether this is the exact arithmetic.
    pub fn is_exact(self) -> bool {
        self.arithmetic == Arithmetic::Exact
    }
}

impl Default for KernelPath {
    fn default() -> Self {
        KernelPath::detect()
    }
}

impl fmt::Display for KernelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A kernel choice that did not parse or cannot run on this CPU.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KernelChoiceError {
    /// Not one of the names.
    #[error(
        "unknown kernels `{0}`: expected `auto` (the fastest this CPU runs), `exact` (llama.cpp's arithmetic bit for bit), `avx512-vnni`, `avx2` or `portable`"
    )]
    Unknown(String),
    /// The named instruction set is missing here.
    #[error("kernels `{name}` cannot run here: {reason}; use `auto`")]
    Unavailable {
        /// The path asked for.
        name: String,
        /// What is missing.
        reason: String,
    },
}

impl FromStr for KernelPath {
    type Err = KernelChoiceError;

    /// `auto`, `exact`, `avx512-vnni`, `avx2`, `portable` (case-insensitive).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let name = s.trim().to_ascii_lowercase();
        let isa = match name.as_str() {
            "auto" | "fast" => return Ok(KernelPath::detect()),
            "exact" => return Ok(KernelPath::exact()),
            "avx512-vnni" | "avx512" => Isa::Avx512Vnni,
            "avx2" => Isa::Avx2,
            "portable" => Isa::Portable,
            _ => return Err(KernelChoiceError::Unknown(s.to_string())),
        };
        match isa.unavailable_reason() {
            Some(reason) => Err(KernelChoiceError::Unavailable { name, reason }),
            None => Ok(KernelPath {
                isa,
                arithmetic: Arithmetic::Fast,
            }),
        }
    }
}

/// `hsum_float_8` of ggml's AVX2 code: `((a4+a0)+(a6+a2)) + ((a5+a1)+(a7+a3))`. The one
/// horizontal sum of eight lanes every kernel uses.
#[inline(always)]
pub(crate) fn hsum8(a: &[f32; 8]) -> f32 {
    let r = [a[4] + a[0], a[5] + a[1], a[6] + a[2], a[7] + a[3]];
    (r[0] + r[2]) + (r[1] + r[3])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_back_and_unavailable_paths_are_refused() {
        assert_eq!("exact".parse::<KernelPath>().unwrap().name(), "exact");
        assert_eq!("AUTO".parse::<KernelPath>().unwrap(), KernelPath::detect());
        assert_eq!("portable".parse::<KernelPath>().unwrap().isa, Isa::Portable);
        for isa in Isa::ALL {
            let parsed = isa.name().parse::<KernelPath>();
            if isa.available() {
                assert_eq!(parsed.unwrap().name(), isa.name());
            } else {
                assert!(matches!(parsed, Err(KernelChoiceError::Unavailable { .. })));
            }
        }
        assert!(matches!(
            "sse9".parse::<KernelPath>(),
            Err(KernelChoiceError::Unknown(_))
        ));
        assert!(KernelPath::detect().isa.available());
    }
}
