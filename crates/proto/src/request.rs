//! What a generate request asks for, as it travels from a frontend to a worker (over the agent's
//! Unix socket or a peer QUIC stream), and the KV layout that two workers must share before they
//! exchange blocks.

use serde::{Deserialize, Serialize};

use crate::hash::BlockSize;

/// How to pick each next token. Validated once at the edge ([`SamplingParams::validate`]); an
/// engine may assume a validated value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SamplingParams {
    /// 0 means greedy. At most [`SamplingParams::MAX_TEMPERATURE`].
    #[serde(default)]
    pub temperature: f32,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches `top_p`.
    /// In (0, 1]; 1 disables it.
    #[serde(default = "one")]
    pub top_p: f32,
    /// Keep only the `top_k` most likely tokens; 0 disables it.
    #[serde(default)]
    pub top_k: u32,
    /// Seed for the sampler's RNG; the same seed and prompt give the same tokens.
    #[serde(default)]
    pub seed: Option<u64>,
    /// Stop after this many generated tokens. At least 1.
    pub max_tokens: u32,
    /// Stop when one of these tokens is generated (the model's EOS is added by the engine unless
    /// `ignore_eos`).
    #[serde(default)]
    pub stop_token_ids: Vec<u32>,
    /// Keep generating past EOS (benchmarks).
    #[serde(default)]
    pub ignore_eos: bool,
    /// Return the log-probability of each sampled token and this many alternatives (0..=20).
    #[serde(default)]
    pub logprobs: Option<u32>,
    /// Min-p sampling: drop tokens less likely than `min_p` times the most likely one. In
    /// [0, 1]; 0 disables it.
    #[serde(default)]
    pub min_p: f32,
    /// Subtracted once from the logit of every token already generated (OpenAI's
    /// `presence_penalty`). In [-2, 2].
    #[serde(default)]
    pub presence_penalty: f32,
    /// Subtracted from a token's logit once per time it was generated (OpenAI's
    /// `frequency_penalty`). In [-2, 2].
    #[serde(default)]
    pub frequency_penalty: f32,
    /// Divides positive (multiplies negative) logits of every token of the prompt or the output
    /// (vLLM's and Hugging Face's `repetition_penalty`). In (0, 2]; 1 disables it.
    #[serde(default = "one")]
    pub repetition_penalty: f32,
    /// Added to a token's logit before sampling (OpenAI's `logit_bias`), as (token, bias)
    /// sorted by token, each token once, each bias in [-100, 100].
    #[serde(default)]
    pub logit_bias: Vec<(u32, f32)>,
    /// How many of the prompt's last tokens this request generated itself, on an earlier leg
    /// (the first token a prefill worker sent before the decode leg, the tokens before a
    /// migration): penalties count them as output, so the continuation samples exactly what an
    /// uninterrupted run would.
    #[serde(default)]
    pub generated_in_prompt: u32,
    /// What the output must match (structured output): every sampled token is one the grammar
    /// allows, and the sequence ends only where the grammar may. The grammar's state is not
    /// carried: a worker rebuilds it from this and the output so far, so it survives
    /// preemption, forwarding, the prefill → decode hand-off and migration.
    #[serde(default)]
    pub constraint: Option<Constraint>,
    /// The request's `cache_salt` (vLLM's field): not sampling, but like `constraint` part of
    /// what the request is, so it travels wherever the request does (forwarded to a peer, the
    /// prefill and decode legs, a migration). Mixed into the prompt's first block hash
    /// ([`crate::hash::BlockHasher::salted`]): requests with different salts share no cached
    /// block. Validated: non-empty, at most [`crate::hash::MAX_CACHE_SALT_BYTES`] bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_salt: Option<String>,
}

/// A grammar the output must match.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "spec", rename_all = "snake_case")]
pub enum Constraint {
    /// A JSON value valid against this JSON Schema (as JSON text). `{"type": "object"}` is
    /// OpenAI's `json_object`.
    JsonSchema(String),
    /// Text matching this regular expression (the whole output).
    Regex(String),
    /// Exactly one of these strings.
    Choice(Vec<String>),
    /// A Lark grammar (llguidance's dialect; `start` is the root rule).
    Lark(String),
}

fn one() -> f32 {
    1.0
}

/// A sampling parameter out of range; names the field and the accepted range.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field} = {value} is out of range: {expected}")]
pub struct InvalidSampling {
    /// The offending field, as named in the OpenAI API.
    pub field: &'static str,
    /// The value given.
    pub value: String,
    /// The accepted range, in words.
    pub expected: &'static str,
}

impl SamplingParams {
    /// The largest temperature accepted (OpenAI's limit).
    pub const MAX_TEMPERATURE: f32 = 2.0;
    /// The most alternatives `logprobs` may ask for.
    pub const MAX_LOGPROBS: u32 = 20;

    /// Greedy decoding for `max_tokens` tokens.
    pub fn greedy(max_tokens: u32) -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: None,
            max_tokens,
            stop_token_ids: Vec::new(),
            ignore_eos: false,
            logprobs: None,
            min_p: 0.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            logit_bias: Vec::new(),
            generated_in_prompt: 0,
            constraint: None,
            cache_salt: None,
        }
    }

    /// This request's block hasher: the fleet's, salted with its `cache_salt`.
    pub fn hasher(&self, fleet: &crate::hash::BlockHasher) -> crate::hash::BlockHasher {
        fleet.salted(self.cache_salt.as_deref())
    }

    /// The original prompt of `prompt`: without its last [`generated_in_prompt`] tokens,
    /// which an earlier leg of the request generated.
    ///
    /// [`generated_in_prompt`]: SamplingParams::generated_in_prompt
    pub fn original_prompt<'a>(&self, prompt: &'a [u32]) -> &'a [u32] {
        let keep = prompt
            .len()
            .saturating_sub(self.generated_in_prompt as usize);
        &prompt[..keep]
    }

    /// The largest `|logit_bias|` (OpenAI's limit).
    pub const MAX_LOGIT_BIAS: f32 = 100.0;
    /// The largest `|presence_penalty|` and `|frequency_penalty|` (OpenAI's limit).
    pub const MAX_PENALTY: f32 = 2.0;

    /// True when a bias or penalty changes the logits before sampling.
    pub fn adjusts_logits(&self) -> bool {
        self.presence_penalty != 0.0
            || self.frequency_penalty != 0.0
            || self.repetition_penalty != 1.0
            || !self.logit_bias.is_empty()
    }

    /// True when every step takes the most likely token.
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0 || self.top_k == 1
    }

    /// Checks every field's range.
    pub fn validate(&self) -> Result<(), InvalidSampling> {
        let bad = |field, value: String, expected| {
            Err(InvalidSampling {
                field,
                value,
                expected,
            })
        };
        if !(0.0..=Self::MAX_TEMPERATURE).contains(&self.temperature) {
            return bad(
                "temperature",
                self.temperature.to_string(),
                "between 0 and 2",
            );
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(
                "top_p",
                self.top_p.to_string(),
                "greater than 0 and at most 1",
            );
        }
        if self.max_tokens == 0 {
            return bad("max_tokens", "0".to_owned(), "at least 1");
        }
        if let Some(n) = self.logprobs
            && n > Self::MAX_LOGPROBS
        {
            return bad("logprobs", n.to_string(), "between 0 and 20");
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad("min_p", self.min_p.to_string(), "between 0 and 1");
        }
        for (field, value) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !(-Self::MAX_PENALTY..=Self::MAX_PENALTY).contains(&value) {
                return bad(field, value.to_string(), "between -2 and 2");
            }
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty <= 2.0) {
            return bad(
                "repetition_penalty",
                self.repetition_penalty.to_string(),
                "greater than 0 and at most 2",
            );
        }
        if let Some((token, bias)) = self
            .logit_bias
            .iter()
            .find(|(_, b)| !(-Self::MAX_LOGIT_BIAS..=Self::MAX_LOGIT_BIAS).contains(b))
        {
            return bad(
                "logit_bias",
                format!("{bias} (token {token})"),
                "a bias between -100 and 100",
            );
        }
        if self.logit_bias.windows(2).any(|w| w[0].0 >= w[1].0) {
            return bad(
                "logit_bias",
                "unsorted or repeated tokens".to_owned(),
                "each token once, sorted",
            );
        }
        if let Some(salt) = &self.cache_salt
            && crate::hash::validate_cache_salt(salt).is_err()
        {
            // The salt is a tenant's secret: say how long it is, never what it is.
            return bad(
                "cache_salt",
                format!("a string of {} bytes", salt.len()),
                "a non-empty string of at most 1024 bytes",
            );
        }
        Ok(())
    }
}

/// Element type of stored K/V values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KvDtype {
    /// 32-bit float.
    F32,
    /// IEEE half.
    F16,
    /// bfloat16.
    Bf16,
}

impl KvDtype {
    /// Bytes per element.
    pub const fn size(self) -> usize {
        match self {
            KvDtype::F32 => 4,
            KvDtype::F16 | KvDtype::Bf16 => 2,
        }
    }
}

/// The shape of one KV block as stored by a worker. Two workers exchange blocks only when their
/// layouts are equal; the transfer handshake compares them field by field.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KvLayout {
    /// The model's name (weights must be identical, not just the architecture).
    pub model: String,
    /// Transformer layers.
    pub layers: u32,
    /// Key/value heads per layer (after grouped-query sharing).
    pub kv_heads: u32,
    /// Elements per head.
    pub head_dim: u32,
    /// Element type.
    pub dtype: KvDtype,
    /// Tokens per block.
    pub block_size: BlockSize,
}

impl KvLayout {
    /// Bytes of one block: K and V, every layer. Saturates instead of overflowing; a layout that
    /// came from outside (a peer's handshake) is checked with [`KvLayout::checked_block_bytes`].
    pub fn block_bytes(&self) -> usize {
        self.checked_block_bytes()
            .map_or(0, |bytes| usize::try_from(bytes).unwrap_or(usize::MAX))
    }

    /// Bytes of one block, or `None` when a dimension is zero or the product overflows `u64`.
    pub fn checked_block_bytes(&self) -> Option<u64> {
        if self.layers == 0 || self.kv_heads == 0 || self.head_dim == 0 {
            return None;
        }
        2u64.checked_mul(u64::from(self.layers))?
            .checked_mul(u64::from(self.kv_heads))?
            .checked_mul(u64::from(self.head_dim))?
            .checked_mul(self.block_size.tokens() as u64)?
            .checked_mul(self.dtype.size() as u64)
    }

    /// The first field in which `other` differs, with both values, or `None` when they match.
    pub fn mismatch(&self, other: &KvLayout) -> Option<(&'static str, String, String)> {
        let pairs: [(&'static str, String, String); 6] = [
            ("model", self.model.clone(), other.model.clone()),
            ("layers", self.layers.to_string(), other.layers.to_string()),
            (
                "kv_heads",
                self.kv_heads.to_string(),
                other.kv_heads.to_string(),
            ),
            (
                "head_dim",
                self.head_dim.to_string(),
                other.head_dim.to_string(),
            ),
            (
                "dtype",
                format!("{:?}", self.dtype),
                format!("{:?}", other.dtype),
            ),
            (
                "block_size",
                self.block_size.get().to_string(),
                other.block_size.get().to_string(),
            ),
        ];
        pairs.into_iter().find(|(_, a, b)| a != b)
    }

    /// A stable 64-bit name for this layout: XXH3-64 (seed "kvlayout") of its JSON encoding
    /// (fields in declaration order). Stored KV (the disk tier's directories and block files)
    /// is keyed by it, so blocks of one layout are never read back into another. Not a block
    /// hash; equal fingerprints with unequal layouts are still told apart by [`KvLayout::mismatch`]
    /// wherever the full layout travels.
    pub fn fingerprint(&self) -> u64 {
        const LAYOUT_SEED: u64 = u64::from_le_bytes(*b"kvlayout");
        let json = serde_json::to_vec(self).unwrap_or_default();
        xxhash_rust::xxh3::xxh3_64_with_seed(&json, LAYOUT_SEED)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampling_ranges_are_enforced_field_by_field() {
        let ok = SamplingParams::greedy(16);
        assert!(ok.validate().is_ok());
        let cases: Vec<(&str, SamplingParams)> = vec![
            (
                "temperature",
                SamplingParams {
                    temperature: -0.1,
                    ..ok.clone()
                },
            ),
            (
                "temperature",
                SamplingParams {
                    temperature: 2.5,
                    ..ok.clone()
                },
            ),
            (
                "temperature",
                SamplingParams {
                    temperature: f32::NAN,
                    ..ok.clone()
                },
            ),
            (
                "top_p",
                SamplingParams {
                    top_p: 0.0,
                    ..ok.clone()
                },
            ),
            (
                "top_p",
                SamplingParams {
                    top_p: 1.5,
                    ..ok.clone()
                },
            ),
            (
                "max_tokens",
                SamplingParams {
                    max_tokens: 0,
                    ..ok.clone()
                },
            ),
            (
                "logprobs",
                SamplingParams {
                    logprobs: Some(21),
                    ..ok.clone()
                },
            ),
            (
                "min_p",
                SamplingParams {
                    min_p: 1.5,
                    ..ok.clone()
                },
            ),
            (
                "presence_penalty",
                SamplingParams {
                    presence_penalty: -2.5,
                    ..ok.clone()
                },
            ),
            (
                "frequency_penalty",
                SamplingParams {
                    frequency_penalty: f32::NAN,
                    ..ok.clone()
                },
            ),
            (
                "repetition_penalty",
                SamplingParams {
                    repetition_penalty: 0.0,
                    ..ok.clone()
                },
            ),
            (
                "logit_bias",
                SamplingParams {
                    logit_bias: vec![(3, 101.0)],
                    ..ok.clone()
                },
            ),
            (
                "logit_bias",
                SamplingParams {
                    logit_bias: vec![(3, 1.0), (3, 2.0)],
                    ..ok.clone()
                },
            ),
        ];
        for (field, params) in cases {
            assert_eq!(params.validate().unwrap_err().field, field, "{params:?}");
        }
    }

    #[test]
    fn sampling_json_defaults_and_unknown_fields() {
        let params: SamplingParams = serde_json::from_str(r#"{"max_tokens": 4}"#).unwrap();
        assert_eq!(params, SamplingParams::greedy(4));
        assert!(
            serde_json::from_str::<SamplingParams>(r#"{"max_tokens": 4, "tempreature": 1}"#)
                .is_err()
        );
    }

    #[test]
    fn layout_block_bytes_and_mismatch() {
        let layout = KvLayout {
            model: "llama-3-8b".into(),
            layers: 32,
            kv_heads: 8,
            head_dim: 128,
            dtype: KvDtype::Bf16,
            block_size: BlockSize::new(16).unwrap(),
        };
        assert_eq!(layout.block_bytes(), 2 * 32 * 8 * 128 * 16 * 2);
        assert_eq!(layout.mismatch(&layout.clone()), None);
        let other = KvLayout {
            head_dim: 64,
            ..layout.clone()
        };
        assert_eq!(
            layout.mismatch(&other),
            Some(("head_dim", "128".to_owned(), "64".to_owned()))
        );
        // The fingerprint is stable (stored files are keyed by it) and tells layouts apart.
        assert_eq!(layout.fingerprint(), layout.clone().fingerprint());
        assert_ne!(layout.fingerprint(), other.fingerprint());
        let other_model = KvLayout {
            model: "llama-3-8b-instruct".into(),
            ..layout.clone()
        };
        assert_ne!(layout.fingerprint(), other_model.fingerprint());
    }
}
