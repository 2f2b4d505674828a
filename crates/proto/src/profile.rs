//! Performance profiles: how fast one class of worker — a model, on a device kind, with an engine
//! and kernel path — prefills, decodes and brings KV blocks back from lower tiers.
//!
//! One format read by three consumers: the router's time-based cost (`kv-router`), the SLA
//! planner (`planner`) and the KV tiers' onboarding cost. `kvfleet profile` measures one on a
//! real worker (native or mock) and the control plane stores it per model × device kind.
//!
//! A profile is tables of measurements, not a fitted formula, so a curve of any shape is kept:
//!
//! - `prefill`: the time to prefill a prompt of `tokens[i]` tokens alone on an idle worker
//!   (`ms[i]`, i.e. its TTFT). A prompt whose first `c` tokens are cached costs
//!   `f(0) + f(c + n) − f(c)` for its `n` new tokens, where `f` interpolates the table
//!   piecewise-linearly and `f(0)` is the fixed per-step overhead extrapolated from the first two
//!   points: attention over the cached part is paid, its projections are not.
//! - `decode`: the inter-token latency of `batch[i]` sequences decoding together with
//!   `context[j]` tokens of context each (`itl_ms[i][j]`), bilinear between points and linear
//!   past the last ones (more pessimistic than clamping).
//! - `tiers`: the cost of onboarding bytes from G2/G3/G4 into G1 (`latency_ms + bytes /
//!   bytes_per_second`).
//!
//! Validation names the field at fault ([`ProfileError`]); a profile that is not monotone (more
//! work taking less time) is refused, because every consumer would then prefer more load.
//!
//! ```
//! use kvfleet_proto::profile::PerfProfile;
//! let p = PerfProfile::from_toml_str(r#"
//!     format = 1
//!     model = "m"
//!     device = "cpu"
//!     engine = "native"
//!     block_size = 16
//!     kv_block_bytes = 1024
//!     kv_blocks = 1000
//!     max_num_seqs = 8
//!     max_batched_tokens = 2048
//!     [prefill]
//!     tokens = [128, 1024]
//!     ms = [20.0, 90.0]
//!     [decode]
//!     batch = [1, 8]
//!     context = [128, 2048]
//!     itl_ms = [[10.0, 12.0], [14.0, 20.0]]
//! "#)?;
//! assert!((p.prefill_ms(1024, 0) - 90.0).abs() < 1e-9);
//! // 512 new tokens after 512 cached ones: f(0) + f(1024) − f(512).
//! assert!((p.prefill_ms(512, 512) - (10.0 + 90.0 - 50.0)).abs() < 1e-9);
//! assert!((p.itl_ms(1, 128) - 10.0).abs() < 1e-9);
//! assert_eq!(p.max_batch_within_itl(14.0, 128), 8);
//! # Ok::<(), kvfleet_proto::profile::ProfileError>(())
//! ```

use serde::{Deserialize, Serialize};

use crate::Tier;

/// The profile format this build reads and writes.
pub const PROFILE_FORMAT: u32 = 1;

/// A worker class's measured performance. See the module docs for what each table means.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PerfProfile {
    /// Always [`PROFILE_FORMAT`]; a file from a newer kvfleet is refused, not misread.
    pub format: u32,
    /// The model name as deployed (a profile for another model is refused where it is used).
    pub model: String,
    /// The device kind, e.g. `nvidia-h100-80gb-hbm3` or `cpu-x86_64-2c`.
    pub device: String,
    /// The engine kind: `native`, `mock`, `vllm`, `sglang`, `llamacpp`, `openai`.
    pub engine: String,
    /// The kernel path the worker ran (`avx512-vnni`, `avx2`, `portable`, `exact`, `cuda`…).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_path: Option<String>,
    /// Free text: how and when it was measured.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub source: String,
    /// Tokens per KV block.
    pub block_size: u32,
    /// Bytes of one KV block (all layers, K and V).
    pub kv_block_bytes: u64,
    /// G1 capacity in blocks.
    pub kv_blocks: u64,
    /// The engine's `max_num_seqs` when measured.
    pub max_num_seqs: u32,
    /// The engine's `max_batched_tokens` (tokens per step) when measured.
    pub max_batched_tokens: u32,
    /// TTFT of a prompt alone on an idle worker, by prompt length.
    pub prefill: PrefillTable,
    /// Inter-token latency by concurrent sequences × context per sequence.
    pub decode: DecodeTable,
    /// Onboarding cost from the lower KV tiers into G1; absent tiers cannot be onboarded from.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tiers: Vec<TierCost>,
}

/// Prefill time by prompt length.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PrefillTable {
    /// Prompt lengths, strictly increasing, at least two.
    pub tokens: Vec<u32>,
    /// Time to first token of each prompt length alone on an idle worker, ms; non-decreasing.
    pub ms: Vec<f64>,
}

/// Decode inter-token latency by batch size and context length.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DecodeTable {
    /// Concurrent decoding sequences, strictly increasing, from 1.
    pub batch: Vec<u32>,
    /// Context tokens per sequence, strictly increasing.
    pub context: Vec<u32>,
    /// `itl_ms[i][j]`: ms per output token with `batch[i]` sequences of `context[j]` tokens;
    /// non-decreasing along both axes.
    pub itl_ms: Vec<Vec<f64>>,
}

/// The cost of onboarding blocks from one lower tier into G1.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TierCost {
    /// G2, G3 or G4 (G1 needs no onboarding).
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub tier: Tier,
    /// Sustained bytes per second into G1.
    pub bytes_per_second: f64,
    /// Fixed cost per onboarding (a lookup, a seek, a round trip), ms.
    pub latency_ms: f64,
}

/// A profile that cannot be used, naming the field at fault.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ProfileError {
    /// The text did not parse.
    #[error("profile does not parse: {0}")]
    Parse(String),
    /// The format version is not [`PROFILE_FORMAT`].
    #[error("profile format {found} is not supported (this kvfleet reads format {PROFILE_FORMAT})")]
    Format {
        /// The version in the file.
        found: u32,
    },
    /// A field's value is out of range or inconsistent.
    #[error("profile field `{field}`: {reason}")]
    Invalid {
        /// The field, as a path (`decode.itl_ms[2][0]`).
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The profile was measured for another model than the one it is used for.
    #[error("profile is for model `{profile}`, not `{wanted}`")]
    WrongModel {
        /// The profile's model.
        profile: String,
        /// The model it was offered for.
        wanted: String,
    },
}

/// Checks a `tiers` table (no G1, no tier twice, positive finite bandwidth, non-negative
/// latency), naming the field at fault. Also what other files carrying tier costs use (the
/// mock engine's timing profile).
pub fn validate_tiers(tiers: &[TierCost]) -> Result<(), ProfileError> {
    for (i, tier) in tiers.iter().enumerate() {
        if tier.tier == Tier::G1 {
            return Err(invalid(
                format!("tiers[{i}].tier"),
                "G1 needs no onboarding cost",
            ));
        }
        if tiers[..i].iter().any(|t| t.tier == tier.tier) {
            return Err(invalid(format!("tiers[{i}].tier"), "tier listed twice"));
        }
        if !(tier.bytes_per_second.is_finite() && tier.bytes_per_second > 0.0) {
            return Err(invalid(
                format!("tiers[{i}].bytes_per_second"),
                format!("{} must be finite and positive", tier.bytes_per_second),
            ));
        }
        if !(tier.latency_ms.is_finite() && tier.latency_ms >= 0.0) {
            return Err(invalid(
                format!("tiers[{i}].latency_ms"),
                format!("{} must be finite and not negative", tier.latency_ms),
            ));
        }
    }
    Ok(())
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> ProfileError {
    ProfileError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

impl PerfProfile {
    /// Parses and validates a TOML profile.
    pub fn from_toml_str(text: &str) -> Result<Self, ProfileError> {
        let profile: Self = toml::from_str(text).map_err(|e| ProfileError::Parse(e.to_string()))?;
        profile.validate()?;
        Ok(profile)
    }

    /// Parses and validates a JSON profile.
    pub fn from_json_str(text: &str) -> Result<Self, ProfileError> {
        let profile: Self =
            serde_json::from_str(text).map_err(|e| ProfileError::Parse(e.to_string()))?;
        profile.validate()?;
        Ok(profile)
    }

    /// The profile as TOML (what `kvfleet profile` writes).
    pub fn to_toml_string(&self) -> Result<String, ProfileError> {
        toml::to_string(self).map_err(|e| ProfileError::Parse(e.to_string()))
    }

    /// Refuses a profile measured for another model.
    pub fn check_model(&self, model: &str) -> Result<(), ProfileError> {
        if self.model == model {
            Ok(())
        } else {
            Err(ProfileError::WrongModel {
                profile: self.model.clone(),
                wanted: model.to_owned(),
            })
        }
    }

    /// Checks every field; the first problem is returned, naming its field.
    pub fn validate(&self) -> Result<(), ProfileError> {
        if self.format != PROFILE_FORMAT {
            return Err(ProfileError::Format { found: self.format });
        }
        for (field, value) in [
            ("model", &self.model),
            ("device", &self.device),
            ("engine", &self.engine),
        ] {
            if value.trim().is_empty() {
                return Err(invalid(field, "must not be empty"));
            }
        }
        for (field, value) in [
            ("block_size", u64::from(self.block_size)),
            ("kv_block_bytes", self.kv_block_bytes),
            ("kv_blocks", self.kv_blocks),
            ("max_num_seqs", u64::from(self.max_num_seqs)),
            ("max_batched_tokens", u64::from(self.max_batched_tokens)),
        ] {
            if value == 0 {
                return Err(invalid(field, "must be at least 1"));
            }
        }
        self.validate_prefill()?;
        self.validate_decode()?;
        validate_tiers(&self.tiers)
    }

    fn validate_prefill(&self) -> Result<(), ProfileError> {
        let t = &self.prefill;
        if t.tokens.len() < 2 {
            return Err(invalid(
                "prefill.tokens",
                "needs at least two prompt lengths",
            ));
        }
        if t.ms.len() != t.tokens.len() {
            return Err(invalid(
                "prefill.ms",
                format!(
                    "has {} values for {} prompt lengths",
                    t.ms.len(),
                    t.tokens.len()
                ),
            ));
        }
        strictly_increasing("prefill.tokens", &t.tokens, 1)?;
        non_decreasing_times("prefill.ms", &t.ms)?;
        Ok(())
    }

    fn validate_decode(&self) -> Result<(), ProfileError> {
        let d = &self.decode;
        if d.batch.is_empty() {
            return Err(invalid("decode.batch", "needs at least one batch size"));
        }
        if d.context.is_empty() {
            return Err(invalid(
                "decode.context",
                "needs at least one context length",
            ));
        }
        strictly_increasing("decode.batch", &d.batch, 1)?;
        strictly_increasing("decode.context", &d.context, 0)?;
        if d.itl_ms.len() != d.batch.len() {
            return Err(invalid(
                "decode.itl_ms",
                format!(
                    "has {} rows for {} batch sizes",
                    d.itl_ms.len(),
                    d.batch.len()
                ),
            ));
        }
        for (i, row) in d.itl_ms.iter().enumerate() {
            if row.len() != d.context.len() {
                return Err(invalid(
                    format!("decode.itl_ms[{i}]"),
                    format!(
                        "has {} values for {} context lengths",
                        row.len(),
                        d.context.len()
                    ),
                ));
            }
            non_decreasing_times(&format!("decode.itl_ms[{i}]"), row)?;
            if let Some(&first) = row.first()
                && first <= 0.0
            {
                return Err(invalid(
                    format!("decode.itl_ms[{i}][0]"),
                    "must be positive",
                ));
            }
        }
        for j in 0..d.context.len() {
            for i in 1..d.batch.len() {
                if d.itl_ms[i][j] < d.itl_ms[i - 1][j] {
                    return Err(invalid(
                        format!("decode.itl_ms[{i}][{j}]"),
                        format!(
                            "{} ms for batch {} is less than {} ms for batch {}: not monotone",
                            d.itl_ms[i][j],
                            d.batch[i],
                            d.itl_ms[i - 1][j],
                            d.batch[i - 1]
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The full-prompt TTFT curve `f(tokens)` on an idle worker: piecewise linear through the
    /// table, linear past its ends, never negative. `f(0)` is the fixed per-step overhead.
    pub fn prefill_curve_ms(&self, tokens: u64) -> f64 {
        interpolate(&self.prefill.tokens, &self.prefill.ms, tokens as f64).max(0.0)
    }

    /// Time to prefill `new_tokens` after `cached_tokens` already in KV, alone on an idle
    /// worker, ms: `f(0) + f(cached + new) − f(cached)`. 0 when there is nothing to compute.
    pub fn prefill_ms(&self, new_tokens: u64, cached_tokens: u64) -> f64 {
        if new_tokens == 0 {
            return 0.0;
        }
        let overhead = self.prefill_curve_ms(0);
        let marginal = self.prefill_curve_ms(cached_tokens + new_tokens)
            - self.prefill_curve_ms(cached_tokens);
        overhead + marginal.max(0.0)
    }

    /// Prefill throughput for prompts of `prompt_tokens`, tokens per second.
    pub fn prefill_tokens_per_second(&self, prompt_tokens: u64) -> f64 {
        let ms = self.prefill_ms(prompt_tokens.max(1), 0);
        if ms > 0.0 {
            prompt_tokens.max(1) as f64 * 1000.0 / ms
        } else {
            f64::INFINITY
        }
    }

    /// Inter-token latency with `batch` sequences of `context` tokens each, ms (bilinear inside
    /// the table, linear past it; `batch` 0 counts as 1).
    pub fn itl_ms(&self, batch: u32, context: u64) -> f64 {
        let d = &self.decode;
        let b = f64::from(batch.max(1));
        let c = context as f64;
        // Interpolate along the context axis on every row, then along the batch axis.
        let column: Vec<f64> = d
            .itl_ms
            .iter()
            .map(|row| interpolate(&d.context, row, c))
            .collect();
        interpolate(&d.batch, &column, b).max(f64::MIN_POSITIVE)
    }

    /// The largest batch of `context`-token sequences that decodes within `target_ms` per token
    /// (0 when even one sequence is slower), capped at `max_num_seqs`.
    pub fn max_batch_within_itl(&self, target_ms: f64, context: u64) -> u32 {
        if self.itl_ms(1, context) > target_ms {
            return 0;
        }
        // itl_ms is non-decreasing in batch: binary search.
        let (mut lo, mut hi) = (1u32, self.max_num_seqs.max(1));
        while lo < hi {
            let mid = lo + (hi - lo).div_ceil(2);
            if self.itl_ms(mid, context) <= target_ms {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        lo
    }

    /// Time to onboard `bytes` from `tier` into G1, ms; `None` when the profile has no figure
    /// for that tier (G1 costs nothing).
    pub fn onboard_ms(&self, tier: Tier, bytes: u64) -> Option<f64> {
        if tier == Tier::G1 {
            return Some(0.0);
        }
        self.tiers
            .iter()
            .find(|t| t.tier == tier)
            .map(|t| t.onboard_ms(bytes))
    }
}

impl TierCost {
    /// Time to onboard `bytes` from this tier into G1, ms: `latency_ms + bytes /
    /// bytes_per_second`.
    pub fn onboard_ms(&self, bytes: u64) -> f64 {
        self.latency_ms + bytes as f64 * 1000.0 / self.bytes_per_second
    }
}

fn strictly_increasing(field: &str, values: &[u32], min: u32) -> Result<(), ProfileError> {
    if let Some(&first) = values.first()
        && first < min
    {
        return Err(invalid(
            format!("{field}[0]"),
            format!("must be at least {min}"),
        ));
    }
    for (i, w) in values.windows(2).enumerate() {
        if w[1] <= w[0] {
            return Err(invalid(
                format!("{field}[{}]", i + 1),
                format!(
                    "{} does not exceed {}: must be strictly increasing",
                    w[1], w[0]
                ),
            ));
        }
    }
    Ok(())
}

fn non_decreasing_times(field: &str, values: &[f64]) -> Result<(), ProfileError> {
    for (i, &v) in values.iter().enumerate() {
        if !(v.is_finite() && v >= 0.0) {
            return Err(invalid(
                format!("{field}[{i}]"),
                format!("{v} must be finite and not negative"),
            ));
        }
        if i > 0 && v < values[i - 1] {
            return Err(invalid(
                format!("{field}[{i}]"),
                format!(
                    "{v} is less than {} before it: more work cannot take less time (not monotone)",
                    values[i - 1]
                ),
            ));
        }
    }
    Ok(())
}

/// Piecewise-linear interpolation of `ys` over `xs` (strictly increasing), extended linearly by
/// the first and last segments; a single point is a constant.
fn interpolate(xs: &[u32], ys: &[f64], x: f64) -> f64 {
    match xs.len() {
        0 => 0.0,
        1 => ys[0],
        n => {
            // The segment [i, i + 1] that holds x, or the end segment past either side.
            let i = xs
                .partition_point(|&p| f64::from(p) <= x)
                .saturating_sub(1)
                .min(n - 2);
            let (x0, x1) = (f64::from(xs[i]), f64::from(xs[i + 1]));
            let (y0, y1) = (ys[i], ys[i + 1]);
            y0 + (y1 - y0) * (x - x0) / (x1 - x0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> PerfProfile {
        PerfProfile {
            format: PROFILE_FORMAT,
            model: "llama".into(),
            device: "nvidia-h100".into(),
            engine: "mock".into(),
            kernel_path: None,
            source: String::new(),
            block_size: 16,
            kv_block_bytes: 2 << 20,
            kv_blocks: 26_624,
            max_num_seqs: 256,
            max_batched_tokens: 8192,
            prefill: PrefillTable {
                tokens: vec![128, 1024, 4096, 8192],
                ms: vec![18.5, 32.5, 85.8, 169.3],
            },
            decode: DecodeTable {
                batch: vec![1, 16, 64, 256],
                context: vec![256, 4096],
                itl_ms: vec![
                    vec![5.7, 5.8],
                    vec![6.0, 9.0],
                    vec![7.0, 18.0],
                    vec![10.0, 34.0],
                ],
            },
            tiers: vec![TierCost {
                tier: Tier::G2,
                bytes_per_second: 25e9,
                latency_ms: 0.05,
            }],
        }
    }

    #[test]
    fn toml_and_json_round_trip() {
        let p = sample();
        let toml = p.to_toml_string().unwrap();
        assert_eq!(PerfProfile::from_toml_str(&toml).unwrap(), p);
        let json = serde_json::to_string(&p).unwrap();
        assert_eq!(PerfProfile::from_json_str(&json).unwrap(), p);
    }

    #[test]
    fn bad_profiles_name_their_field() {
        type Breaker = fn(&mut PerfProfile);
        let cases: Vec<(&str, Breaker)> = vec![
            ("prefill.ms[2]", |p| p.prefill.ms[2] = 10.0),
            ("prefill.tokens[1]", |p| p.prefill.tokens[1] = 128),
            ("prefill.ms", |p| {
                p.prefill.ms.pop();
            }),
            ("decode.itl_ms[1][0]", |p| p.decode.itl_ms[1][0] = 1.0),
            ("decode.itl_ms[0][1]", |p| p.decode.itl_ms[0][1] = f64::NAN),
            ("decode.itl_ms[2]", |p| {
                p.decode.itl_ms[2].push(50.0);
            }),
            ("decode.batch[0]", |p| p.decode.batch[0] = 0),
            ("kv_blocks", |p| p.kv_blocks = 0),
            ("model", |p| p.model = " ".into()),
            ("tiers[0].bytes_per_second", |p| {
                p.tiers[0].bytes_per_second = 0.0
            }),
            ("tiers[1].tier", |p| {
                let t = p.tiers[0];
                p.tiers.push(t);
            }),
        ];
        for (field, break_it) in cases {
            let mut p = sample();
            break_it(&mut p);
            match p.validate() {
                Err(ProfileError::Invalid { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}: {other:?}"),
            }
        }
        let mut newer = sample();
        newer.format = 2;
        assert_eq!(newer.validate(), Err(ProfileError::Format { found: 2 }));
        assert!(matches!(
            PerfProfile::from_toml_str("format = 1\nmodel = 3"),
            Err(ProfileError::Parse(_))
        ));
        assert!(matches!(
            sample().check_model("other"),
            Err(ProfileError::WrongModel { .. })
        ));
    }

    #[test]
    fn prefill_credits_the_cached_part() {
        let p = sample();
        // Idle full prompt: the table itself.
        assert!((p.prefill_ms(1024, 0) - 32.5).abs() < 1e-9);
        // Past the table: linear with the last segment's slope.
        let past = p.prefill_ms(16_384, 0);
        assert!((past - (169.3 + (169.3 - 85.8) / 4096.0 * 8192.0)).abs() < 1e-6);
        // A cached prefix makes the same prompt cheaper, but never free.
        let cached = p.prefill_ms(128, 4096 - 128);
        assert!(cached < p.prefill_ms(4096, 0));
        assert!(cached >= p.prefill_curve_ms(0));
        assert_eq!(p.prefill_ms(0, 4096), 0.0);
    }

    #[test]
    fn decode_interpolates_and_sizes_batches() {
        let p = sample();
        assert!((p.itl_ms(16, 256) - 6.0).abs() < 1e-9);
        // Halfway between batch 16 and 64 at context 4096: between 9 and 18.
        let mid = p.itl_ms(40, 4096);
        assert!((mid - 13.5).abs() < 1e-9, "{mid}");
        assert_eq!(p.max_batch_within_itl(5.0, 256), 0);
        let b = p.max_batch_within_itl(18.0, 4096);
        assert_eq!(b, 64);
        assert!(p.itl_ms(b + 1, 4096) > 18.0);
    }

    #[test]
    fn onboarding_uses_the_tier_bandwidth() {
        let p = sample();
        let ms = p.onboard_ms(Tier::G2, 2 << 20).unwrap();
        assert!((ms - (0.05 + (2u64 << 20) as f64 * 1000.0 / 25e9)).abs() < 1e-9);
        assert_eq!(p.onboard_ms(Tier::G3, 1), None);
        assert_eq!(p.onboard_ms(Tier::G1, 1 << 30), Some(0.0));
    }

    proptest! {
        #[test]
        fn costs_are_monotone_in_work(
            a in 0u64..20_000, b in 0u64..20_000,
            ba in 1u32..400, bb in 1u32..400, ctx in 0u64..10_000,
        ) {
            let p = sample();
            let (lo, hi) = (a.min(b), a.max(b));
            prop_assert!(p.prefill_ms(lo, 0) <= p.prefill_ms(hi, 0) + 1e-9);
            let (blo, bhi) = (ba.min(bb), ba.max(bb));
            prop_assert!(p.itl_ms(blo, ctx) <= p.itl_ms(bhi, ctx) + 1e-9);
            prop_assert!(p.prefill_ms(hi.max(1), lo) >= 0.0);
        }
    }
}
