//! The architecture-independent description of a model: dimensions, attention layout, RoPE,
//! normalisation and activation flavour, read from GGUF metadata or a Hugging Face
//! `config.json`. Everything the forward pass branches on is decided here, once, so that the
//! forward code reads as arithmetic and a bad file fails at load time with a named key.

use serde::Deserialize;

use crate::error::{ModelError, Result};
use crate::gguf::GgufFile;

/// The model families this crate implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// Llama 2/3, SmolLM, TinyLlama and other `LlamaForCausalLM` models.
    Llama,
    /// Mistral (Llama layout, optional sliding window).
    Mistral,
    /// Qwen 2 / 2.5 (q/k/v biases).
    Qwen2,
    /// Qwen 3 (QK-norm, no biases).
    Qwen3,
    /// Gemma 3 text models.
    Gemma3,
}

impl Architecture {
    /// The GGUF `general.architecture` spelling.
    pub fn name(self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Mistral => "mistral",
            Architecture::Qwen2 => "qwen2",
            Architecture::Qwen3 => "qwen3",
            Architecture::Gemma3 => "gemma3",
        }
    }

    fn from_name(name: &str) -> Result<Self> {
        Ok(match name.to_ascii_lowercase().as_str() {
            "llama" | "llamaforcausallm" => Architecture::Llama,
            "mistral" | "mistralforcausallm" => Architecture::Mistral,
            "qwen2" | "qwen2forcausallm" => Architecture::Qwen2,
            "qwen3" | "qwen3forcausallm" => Architecture::Qwen3,
            "gemma3" | "gemma3_text" | "gemma3forcausallm" => Architecture::Gemma3,
            _ => return Err(ModelError::UnsupportedArchitecture(name.to_string())),
        })
    }
}

/// How rotary embeddings pair up the elements of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Adjacent pairs (2i, 2i+1): llama.cpp's "normal" RoPE, used by GGUF Llama files whose
    /// Q/K rows the converter permuted.
    Interleaved,
    /// First half with second half (`rotate_half`): Hugging Face weights, and GGUF Qwen/Gemma.
    Half,
}

/// RoPE frequency scaling.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// None.
    None,
    /// Positions divided by `factor`.
    Linear {
        /// The factor.
        factor: f32,
    },
    /// Llama 3.1 frequency-dependent scaling.
    Llama3 {
        /// Overall factor.
        factor: f32,
        /// Wavelengths above original/low are scaled fully.
        low_freq_factor: f32,
        /// Wavelengths below original/high are kept.
        high_freq_factor: f32,
        /// The pre-training context.
        original_max_position: usize,
    },
    /// Explicit per-frequency divisors (GGUF `rope_freqs.weight`, llama.cpp's baked Llama 3).
    Factors(Vec<f32>),
}

/// The MLP's gate activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// SiLU (SwiGLU).
    Silu,
    /// GELU with the tanh approximation (GeGLU).
    GeluTanh,
}

/// Everything the forward pass needs to know about a model.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// The family.
    pub architecture: Architecture,
    /// Residual stream width.
    pub hidden_size: usize,
    /// MLP inner width.
    pub intermediate_size: usize,
    /// Transformer layers.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (grouped-query attention when fewer than `num_heads`).
    pub num_kv_heads: usize,
    /// Elements per head.
    pub head_dim: usize,
    /// Vocabulary size (rows of the embedding).
    pub vocab_size: usize,
    /// The context window.
    pub context_length: usize,
    /// RMSNorm epsilon.
    pub rms_eps: f32,
    /// RoPE base for global layers.
    pub rope_theta: f32,
    /// RoPE base for sliding-window layers (Gemma 3 uses 10 000 there).
    pub rope_local_theta: f32,
    /// RoPE pairing.
    pub rope_style: RopeStyle,
    /// RoPE scaling (global layers only, as in Gemma 3 and llama.cpp).
    pub rope_scaling: RopeScaling,
    /// Sliding-window size for local layers; `None` means every layer is global.
    pub sliding_window: Option<usize>,
    /// With a sliding window: every `n`-th layer (1-based) is global; 0 means all layers slide.
    pub global_every: usize,
    /// Q/K/V projections carry biases (Qwen 2).
    pub attn_bias: bool,
    /// Per-head RMSNorm on queries and keys (Qwen 3, Gemma 3).
    pub qk_norm: bool,
    /// Extra RMSNorm after attention and after the MLP (Gemma 3's sandwich norms).
    pub post_norms: bool,
    /// Multiply embeddings by this (Gemma: sqrt(hidden)).
    pub embedding_scale: Option<f32>,
    /// Attention score scale (1/sqrt(head_dim) unless the model says otherwise).
    pub attn_scale: f32,
    /// The MLP activation.
    pub activation: Activation,
    /// The LM head reuses the token embedding.
    pub tie_embeddings: bool,
    /// RMSNorm weights are stored as (w - 1) and must be used as (1 + w) (Gemma in HF format;
    /// llama.cpp's converter already adds the 1).
    pub norm_weight_offset: f32,
}

impl ModelConfig {
    /// True when `layer` attends only within the sliding window.
    pub fn is_sliding(&self, layer: usize) -> bool {
        match self.sliding_window {
            None => false,
            Some(_) if self.global_every == 0 => true,
            Some(_) => !(layer + 1).is_multiple_of(self.global_every),
        }
    }

    /// The window (in tokens, including the current one) that `layer` may attend to.
    pub fn window(&self, layer: usize) -> Option<usize> {
        if self.is_sliding(layer) {
            self.sliding_window
        } else {
            None
        }
    }

    /// Checks internal consistency so later tensor shapes can be trusted.
    pub fn validate(&self) -> Result<()> {
        let bad = |key: &str, detail: String| {
            Err(ModelError::Metadata {
                key: key.to_string(),
                detail,
            })
        };
        for (key, v) in [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_layers", self.num_layers),
            ("num_heads", self.num_heads),
            ("num_kv_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
            ("vocab_size", self.vocab_size),
            ("context_length", self.context_length),
        ] {
            if v == 0 || v > 1 << 24 {
                return bad(key, format!("{v} is out of range"));
            }
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return bad(
                "num_kv_heads",
                format!(
                    "{} query heads are not a multiple of {} KV heads",
                    self.num_heads, self.num_kv_heads
                ),
            );
        }
        if !self.head_dim.is_multiple_of(2) {
            return bad("head_dim", format!("{} is odd (RoPE pairs)", self.head_dim));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return bad("rope_theta", format!("{}", self.rope_theta));
        }
        if let RopeScaling::Factors(f) = &self.rope_scaling
            && f.len() != self.head_dim / 2
        {
            return bad(
                "rope_freqs",
                format!("{} factors for head_dim {}", f.len(), self.head_dim),
            );
        }
        Ok(())
    }

    /// Reads the configuration from GGUF metadata (llama.cpp's key names).
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let arch_name = file
            .get("general.architecture")
            .and_then(|v| v.as_str())
            .ok_or_else(|| ModelError::Metadata {
                key: "general.architecture".into(),
                detail: "missing".into(),
            })?
            .to_string();
        let architecture = Architecture::from_name(&arch_name)?;
        let key = |k: &str| format!("{arch_name}.{k}");
        let req_u = |k: &str| -> Result<usize> {
            let full = key(k);
            file.get(&full)
                .and_then(|v| v.as_u64())
                .map(|v| v as usize)
                .ok_or_else(|| ModelError::Metadata {
                    key: full,
                    detail: "missing or not an unsigned integer".into(),
                })
        };
        let opt_u = |k: &str| {
            file.get(&key(k))
                .and_then(|v| v.as_u64())
                .map(|v| v as usize)
        };
        let opt_f = |k: &str| file.get(&key(k)).and_then(|v| v.as_f64()).map(|v| v as f32);

        let hidden_size = req_u("embedding_length")?;
        let num_heads = req_u("attention.head_count")?;
        let num_kv_heads = opt_u("attention.head_count_kv").unwrap_or(num_heads);
        let head_dim = opt_u("attention.key_length")
            .or_else(|| opt_u("rope.dimension_count"))
            .unwrap_or(hidden_size / num_heads.max(1));
        let vocab_size = match opt_u("vocab_size") {
            Some(v) => v,
            None => file
                .tensors
                .get("token_embd.weight")
                .map(|t| t.shape[0])
                .ok_or_else(|| ModelError::MissingTensor("token_embd.weight".into()))?,
        };
        let rope_theta = opt_f("rope.freq_base").unwrap_or(10_000.0);
        let rope_scaling = if file.tensors.contains_key("rope_freqs.weight") {
            RopeScaling::Factors(file.f32_vec("rope_freqs.weight")?)
        } else {
            match file
                .get(&key("rope.scaling.type"))
                .and_then(|v| v.as_str())
                .unwrap_or("none")
            {
                "linear" => RopeScaling::Linear {
                    factor: opt_f("rope.scaling.factor").unwrap_or(1.0),
                },
                "none" => RopeScaling::None,
                other => {
                    return Err(ModelError::Metadata {
                        key: key("rope.scaling.type"),
                        detail: format!("unsupported RoPE scaling `{other}`"),
                    });
                }
            }
        };
        let gemma = architecture == Architecture::Gemma3;
        let (sliding_window, global_every) = if gemma {
            (Some(opt_u("attention.sliding_window").unwrap_or(512)), 6)
        } else {
            (opt_u("attention.sliding_window").filter(|&w| w > 0), 0)
        };
        let config = ModelConfig {
            architecture,
            hidden_size,
            intermediate_size: req_u("feed_forward_length")?,
            num_layers: req_u("block_count")?,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size,
            context_length: req_u("context_length")?,
            rms_eps: opt_f("attention.layer_norm_rms_epsilon").unwrap_or(1e-6),
            rope_theta,
            rope_local_theta: if gemma { 10_000.0 } else { rope_theta },
            // llama.cpp permutes Q/K rows for the llama arch only (LLAMA_ROPE_TYPE_NORM).
            rope_style: match architecture {
                Architecture::Llama | Architecture::Mistral => RopeStyle::Interleaved,
                _ => RopeStyle::Half,
            },
            rope_scaling,
            sliding_window,
            global_every,
            attn_bias: file.tensors.contains_key("blk.0.attn_q.bias"),
            qk_norm: file.tensors.contains_key("blk.0.attn_q_norm.weight"),
            post_norms: gemma,
            embedding_scale: gemma.then(|| (hidden_size as f32).sqrt()),
            attn_scale: 1.0 / (head_dim as f32).sqrt(),
            activation: if gemma {
                Activation::GeluTanh
            } else {
                Activation::Silu
            },
            tie_embeddings: !file.tensors.contains_key("output.weight"),
            norm_weight_offset: 0.0,
        };
        config.validate()?;
        Ok(config)
    }

    /// Reads a Hugging Face `config.json`.
    pub fn from_hf_json(text: &str) -> Result<Self> {
        let raw: HfConfig = serde_json::from_str(text).map_err(|e| ModelError::Metadata {
            key: "config.json".into(),
            detail: e.to_string(),
        })?;
        let arch_name = raw
            .architectures
            .as_ref()
            .and_then(|a| a.first().cloned())
            .or_else(|| raw.model_type.clone())
            .ok_or_else(|| ModelError::Metadata {
                key: "architectures".into(),
                detail: "neither `architectures` nor `model_type` is set".into(),
            })?;
        let architecture =
            Architecture::from_name(&arch_name).or_else(|e| match &raw.model_type {
                Some(m) => Architecture::from_name(m),
                None => Err(e),
            })?;
        let gemma = architecture == Architecture::Gemma3;
        let num_heads = raw.num_attention_heads;
        let head_dim = raw.head_dim.unwrap_or(raw.hidden_size / num_heads.max(1));
        let rope_scaling = match &raw.rope_scaling {
            None => RopeScaling::None,
            Some(s) => {
                let kind = s
                    .rope_type
                    .clone()
                    .or_else(|| s.kind.clone())
                    .unwrap_or_else(|| "default".into());
                match kind.as_str() {
                    "default" => RopeScaling::None,
                    "linear" => RopeScaling::Linear {
                        factor: s.factor.unwrap_or(1.0),
                    },
                    "llama3" => RopeScaling::Llama3 {
                        factor: s.factor.unwrap_or(8.0),
                        low_freq_factor: s.low_freq_factor.unwrap_or(1.0),
                        high_freq_factor: s.high_freq_factor.unwrap_or(4.0),
                        original_max_position: s.original_max_position_embeddings.unwrap_or(8192),
                    },
                    other => {
                        return Err(ModelError::Metadata {
                            key: "rope_scaling.rope_type".into(),
                            detail: format!("unsupported RoPE scaling `{other}`"),
                        });
                    }
                }
            }
        };
        let sliding_window = if gemma {
            Some(raw.sliding_window.unwrap_or(512))
        } else if raw
            .use_sliding_window
            .unwrap_or(architecture == Architecture::Mistral)
        {
            raw.sliding_window
        } else {
            None
        };
        let rope_theta = raw.rope_theta.unwrap_or(10_000.0);
        let config = ModelConfig {
            architecture,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_layers: raw.num_hidden_layers,
            num_heads,
            num_kv_heads: raw.num_key_value_heads.unwrap_or(num_heads),
            head_dim,
            vocab_size: raw.vocab_size,
            context_length: raw.max_position_embeddings.unwrap_or(4096),
            rms_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            rope_theta,
            rope_local_theta: if gemma {
                raw.rope_local_base_freq.unwrap_or(10_000.0)
            } else {
                rope_theta
            },
            rope_style: RopeStyle::Half,
            rope_scaling,
            sliding_window,
            global_every: if gemma {
                raw.sliding_window_pattern.unwrap_or(6)
            } else {
                0
            },
            attn_bias: raw
                .attention_bias
                .unwrap_or(architecture == Architecture::Qwen2),
            qk_norm: matches!(architecture, Architecture::Qwen3 | Architecture::Gemma3),
            post_norms: gemma,
            embedding_scale: gemma.then(|| (raw.hidden_size as f32).sqrt()),
            attn_scale: 1.0
                / raw
                    .query_pre_attn_scalar
                    .map(|s| s as f32)
                    .unwrap_or(head_dim as f32)
                    .sqrt(),
            activation: if gemma {
                Activation::GeluTanh
            } else {
                Activation::Silu
            },
            tie_embeddings: raw.tie_word_embeddings.unwrap_or(gemma),
            norm_weight_offset: if gemma { 1.0 } else { 0.0 },
        };
        config.validate()?;
        Ok(config)
    }
}

#[derive(Debug, Deserialize)]
struct HfRopeScaling {
    rope_type: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    factor: Option<f32>,
    low_freq_factor: Option<f32>,
    high_freq_factor: Option<f32>,
    original_max_position_embeddings: Option<usize>,
}

#[derive(Debug, Deserialize)]
struct HfConfig {
    architectures: Option<Vec<String>>,
    model_type: Option<String>,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: usize,
    max_position_embeddings: Option<usize>,
    rms_norm_eps: Option<f32>,
    rope_theta: Option<f32>,
    rope_local_base_freq: Option<f32>,
    rope_scaling: Option<HfRopeScaling>,
    sliding_window: Option<usize>,
    sliding_window_pattern: Option<usize>,
    use_sliding_window: Option<bool>,
    attention_bias: Option<bool>,
    query_pre_attn_scalar: Option<f64>,
    tie_word_embeddings: Option<bool>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hf_config_parses_llama_and_rejects_unknown_arch() {
        let llama = r#"{"architectures":["LlamaForCausalLM"],"hidden_size":64,"intermediate_size":128,
            "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"vocab_size":300,
            "max_position_embeddings":256,"rms_norm_eps":1e-5,"rope_theta":10000.0,"tie_word_embeddings":true}"#;
        let c = ModelConfig::from_hf_json(llama).unwrap();
        assert_eq!(c.architecture, Architecture::Llama);
        assert_eq!((c.head_dim, c.num_kv_heads), (16, 2));
        assert!(c.tie_embeddings);
        assert!(!c.is_sliding(0));

        let bert = llama.replace("LlamaForCausalLM", "BertModel");
        match ModelConfig::from_hf_json(&bert) {
            Err(ModelError::UnsupportedArchitecture(a)) => assert_eq!(a, "BertModel"),
            other => panic!("expected UnsupportedArchitecture, got {other:?}"),
        }
        let bad_heads = llama.replace("\"num_key_value_heads\":2", "\"num_key_value_heads\":3");
        assert!(matches!(
            ModelConfig::from_hf_json(&bad_heads),
            Err(ModelError::Metadata { key, .. }) if key == "num_kv_heads"
        ));
    }

    #[test]
    fn gemma_layers_alternate_five_local_one_global() {
        let gemma = r#"{"architectures":["Gemma3ForCausalLM"],"hidden_size":64,"intermediate_size":128,
            "num_hidden_layers":12,"num_attention_heads":4,"num_key_value_heads":1,"head_dim":32,
            "vocab_size":300,"sliding_window":512,"query_pre_attn_scalar":32}"#;
        let c = ModelConfig::from_hf_json(gemma).unwrap();
        let global: Vec<usize> = (0..12).filter(|&l| !c.is_sliding(l)).collect();
        assert_eq!(global, [5, 11]);
        assert_eq!(c.window(0), Some(512));
        assert_eq!(c.norm_weight_offset, 1.0);
    }
}
