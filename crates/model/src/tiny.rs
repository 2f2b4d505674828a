//! A tiny random Llama-family model written as a Hugging Face directory (`config.json`,
//! `model.safetensors`, `tokenizer.json`, `tokenizer_config.json`), for tests and for
//! `kvfleet model init-tiny`. Deterministic for a given seed; small enough (≈ 100 k
//! parameters) that a forward step takes microseconds.

use std::path::Path;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use safetensors::Dtype;
use safetensors::tensor::TensorView;
use tokenizers::AddedToken;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;

use crate::error::{ModelError, Result};

/// The tiny model's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TinySpec {
    /// Residual width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Layers.
    pub layers: usize,
    /// Query heads.
    pub heads: usize,
    /// KV heads.
    pub kv_heads: usize,
    /// Context window.
    pub context_length: usize,
}

impl Default for TinySpec {
    fn default() -> Self {
        Self {
            hidden_size: 64,
            intermediate_size: 128,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            context_length: 1024,
        }
    }
}

const SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
const MERGES: [(&str, &str); 12] = [
    ("Ġ", "t"),
    ("h", "e"),
    ("Ġt", "he"),
    ("i", "n"),
    ("Ġ", "a"),
    ("e", "r"),
    ("o", "n"),
    ("Ġ", "s"),
    ("r", "e"),
    ("a", "t"),
    ("Ġ", "o"),
    ("e", "n"),
];
const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ModelError + '_ {
    move |source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn tokenizer() -> Result<(tokenizers::Tokenizer, usize)> {
    let mut vocab: Vec<String> = SPECIALS.iter().map(|s| s.to_string()).collect();
    let mut bytes: Vec<char> = ByteLevel::alphabet().into_iter().collect();
    bytes.sort_unstable();
    vocab.extend(bytes.iter().map(|c| c.to_string()));
    vocab.extend(MERGES.iter().map(|(a, b)| format!("{a}{b}")));
    let map: Vocab = vocab
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let merges = MERGES
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(map, merges)
        .build()
        .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
    let mut tok = tokenizers::Tokenizer::new(bpe);
    tok.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tok.with_decoder(Some(ByteLevel::new(false, true, true)));
    tok.add_special_tokens(SPECIALS.iter().map(|s| AddedToken::from(*s, true)))
        .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
    Ok((tok, vocab.len()))
}

/// Writes a tiny random Llama model into `dir` (created if needed).
pub fn write_tiny_llama(dir: &Path, spec: TinySpec, seed: u64) -> Result<()> {
    write_tiny(dir, spec, seed, false)
}

/// Writes a tiny random Gemma 3 model (QK-norm, sandwich norms, GeGLU, tied embeddings, an
/// 8-token sliding window on even layers and global odd layers) into `dir`, to exercise those
/// paths where no real model is installed.
pub fn write_tiny_gemma3(dir: &Path, spec: TinySpec, seed: u64) -> Result<()> {
    write_tiny(dir, spec, seed, true)
}

fn write_tiny(dir: &Path, spec: TinySpec, seed: u64, gemma: bool) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let (tok, vocab) = tokenizer()?;
    let tok_path = dir.join("tokenizer.json");
    tok.save(&tok_path, true)
        .map_err(|e| ModelError::Tokenizer(format!("writing {}: {e}", tok_path.display())))?;
    let tok_cfg = serde_json::json!({
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "add_bos_token": false,
        "chat_template": CHATML,
    });
    let cfg_path = dir.join("tokenizer_config.json");
    std::fs::write(&cfg_path, tok_cfg.to_string()).map_err(io_err(&cfg_path))?;

    let head_dim = spec.hidden_size / spec.heads;
    let config = if gemma {
        serde_json::json!({
            "architectures": ["Gemma3ForCausalLM"],
            "model_type": "gemma3_text",
            "hidden_size": spec.hidden_size,
            "intermediate_size": spec.intermediate_size,
            "num_hidden_layers": spec.layers,
            "num_attention_heads": spec.heads,
            "num_key_value_heads": spec.kv_heads,
            "head_dim": head_dim,
            "vocab_size": vocab,
            "max_position_embeddings": spec.context_length,
            "rms_norm_eps": 1e-6,
            "rope_theta": 1_000_000.0,
            "rope_local_base_freq": 10000.0,
            "sliding_window": 8,
            "sliding_window_pattern": 2,
            "query_pre_attn_scalar": head_dim,
            "tie_word_embeddings": true,
            "torch_dtype": "float32",
        })
    } else {
        serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": spec.hidden_size,
            "intermediate_size": spec.intermediate_size,
            "num_hidden_layers": spec.layers,
            "num_attention_heads": spec.heads,
            "num_key_value_heads": spec.kv_heads,
            "head_dim": head_dim,
            "vocab_size": vocab,
            "max_position_embeddings": spec.context_length,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "tie_word_embeddings": false,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "torch_dtype": "float32",
        })
    };
    let cfg_path = dir.join("config.json");
    std::fs::write(&cfg_path, config.to_string()).map_err(io_err(&cfg_path))?;

    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (h, i, hd) = (spec.hidden_size, spec.intermediate_size, head_dim);
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    // Weights scaled well above 1/sqrt(fan_in) so the random model has confident (far from
    // tied) next-token choices: equivalence tests compare greedy tokens.
    let mut random = |name: String, shape: Vec<usize>, scale: f32| {
        let n: usize = shape.iter().product();
        let data: Vec<u8> = (0..n)
            .flat_map(|_| {
                (rng.random::<f32>() * 2.0 - 1.0)
                    .mul_add(scale, 0.0)
                    .to_le_bytes()
            })
            .collect();
        tensors.push((name, shape, data));
    };
    let fan = |n: usize| 2.0 / (n as f32).sqrt();
    random("model.embed_tokens.weight".into(), vec![vocab, h], 1.0);
    if !gemma {
        random("lm_head.weight".into(), vec![vocab, h], fan(h) * 2.0);
    }
    for l in 0..spec.layers {
        let p = format!("model.layers.{l}");
        random(
            format!("{p}.self_attn.q_proj.weight"),
            vec![spec.heads * hd, h],
            fan(h),
        );
        random(
            format!("{p}.self_attn.k_proj.weight"),
            vec![spec.kv_heads * hd, h],
            fan(h),
        );
        random(
            format!("{p}.self_attn.v_proj.weight"),
            vec![spec.kv_heads * hd, h],
            fan(h),
        );
        random(
            format!("{p}.self_attn.o_proj.weight"),
            vec![h, spec.heads * hd],
            fan(h),
        );
        random(format!("{p}.mlp.gate_proj.weight"), vec![i, h], fan(h));
        random(format!("{p}.mlp.up_proj.weight"), vec![i, h], fan(h));
        random(format!("{p}.mlp.down_proj.weight"), vec![h, i], fan(i));
    }
    let ones = |n: usize| -> Vec<u8> { (0..n).flat_map(|_| 1.0f32.to_le_bytes()).collect() };
    // Gemma stores norm weights as (w - 1): zeros mean unit weights.
    let norm = |n: usize| -> Vec<u8> { if gemma { vec![0; n * 4] } else { ones(n) } };
    tensors.push(("model.norm.weight".into(), vec![h], norm(h)));
    let layer_norms: &[&str] = if gemma {
        &[
            "input_layernorm",
            "post_attention_layernorm",
            "pre_feedforward_layernorm",
            "post_feedforward_layernorm",
        ]
    } else {
        &["input_layernorm", "post_attention_layernorm"]
    };
    for l in 0..spec.layers {
        for n in layer_norms {
            tensors.push((format!("model.layers.{l}.{n}.weight"), vec![h], norm(h)));
        }
        if gemma {
            for n in ["q_norm", "k_norm"] {
                tensors.push((
                    format!("model.layers.{l}.self_attn.{n}.weight"),
                    vec![hd],
                    norm(hd),
                ));
            }
        }
    }
    let views = tensors
        .iter()
        .map(|(name, shape, data)| {
            TensorView::new(Dtype::F32, shape.clone(), data).map(|v| (name.clone(), v))
        })
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| ModelError::BadInput(format!("tiny model tensor: {e}")))?;
    let st_path = dir.join("model.safetensors");
    safetensors::serialize_to_file(views, None, &st_path).map_err(|e| ModelError::Io {
        path: st_path.clone(),
        source: std::io::Error::other(e.to_string()),
    })?;
    Ok(())
}
