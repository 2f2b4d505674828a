//! The transformer forward pass over a paged KV cache.
//!
//! One call processes a batch of sequences, each contributing a chunk of new tokens (a prefill
//! chunk or one decode token) at an absolute start position with its block table. All tokens of
//! the batch go through the projections and MLPs together (one matmul per weight per layer, so
//! decode is batched across sequences); attention is per sequence and reads K/V through the
//! block table. New K/V are written into the cache before attention, so a chunk attends to
//! itself causally and to everything cached before it.
//!
//! Matmuls and attention run in [`crate::kernels`] (SIMD chosen at run time, on the kernels'
//! thread pool); norms, RoPE and activations are plain Rust over f32 slices here. Which
//! arithmetic runs is the model's [`KernelPath`]: the fast path (one fixed reduction order per
//! output, tiled attention) or the exact one (llama.cpp's rounding, bit for bit).

use half::f16;

use crate::config::{Activation, ModelConfig, RopeScaling, RopeStyle};
use crate::error::{ModelError, Result};
use crate::ggml_math::{Rounding, expf_avx2, gelu};
use crate::kernels::KernelPath;
use crate::kernels::attention::{self, SeqSpan, TokenAt};
use crate::kv_cache::PagedKvCache;
use crate::weights::{Embedding, Linear, Weights};

/// One sequence's part of a forward step.
#[derive(Debug, Clone, Copy)]
pub struct SeqInput<'a> {
    /// Token ids to process this step (non-empty).
    pub tokens: &'a [u32],
    /// Absolute position of `tokens[0]`: everything before it is already in the cache.
    pub start_pos: usize,
    /// Physical block ids holding positions `0..start_pos + tokens.len()`, in order.
    pub block_table: &'a [u32],
    /// Return logits for the last token (the caller samples this step).
    pub want_logits: bool,
}

struct Layer {
    attn_norm: Vec<f32>,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    q_norm: Option<Vec<f32>>,
    k_norm: Option<Vec<f32>>,
    post_attn_norm: Option<Vec<f32>>,
    ffn_norm: Vec<f32>,
    gate: Linear,
    up: Linear,
    down: Linear,
    post_ffn_norm: Option<Vec<f32>>,
}

/// One RoPE variant, evaluated the way ggml's `ggml_rope_cache_init` does: the angle of pair `i`
/// at position `p` is `freq_scale · (p · θ^i / ff_i)` with `θ = base^(-2/d)` raised by repeated
/// f32 multiplication, not `powf` per pair. The two differ in the last bits, and last bits matter
/// here: every matmul requantizes its input to 8 bits, so a one-ulp change that crosses a
/// rounding boundary moves a whole quantization step (see `ggml_math`).
#[derive(Debug, Clone)]
struct Rope {
    theta_scale: f32,
    /// Per-pair divisors (`rope_freqs.weight`, or Llama 3 scaling expressed as divisors).
    freq_factors: Option<Vec<f32>>,
    freq_scale: f32,
}

impl Rope {
    fn new(theta: f32, head_dim: usize, scaling: &RopeScaling) -> Self {
        let half = head_dim / 2;
        let theta_scale = theta.powf(-2.0 / head_dim as f32);
        let mut freq_factors = None;
        let mut freq_scale = 1.0;
        match scaling {
            RopeScaling::None => {}
            RopeScaling::Linear { factor } => freq_scale = 1.0 / factor,
            RopeScaling::Factors(f) => freq_factors = Some(f.clone()),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position,
            } => {
                // As llama.cpp's converter bakes it into `rope_freqs.weight`.
                let orig = *original_max_position as f32;
                let low_wavelen = orig / low_freq_factor;
                let high_wavelen = orig / high_freq_factor;
                let f = (0..half)
                    .map(|i| {
                        let inv = theta.powf(-2.0 * i as f32 / head_dim as f32);
                        let wavelen = 2.0 * std::f32::consts::PI / inv;
                        if wavelen < high_wavelen {
                            1.0
                        } else if wavelen > low_wavelen {
                            *factor
                        } else {
                            let smooth = (orig / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            1.0 / ((1.0 - smooth) / factor + smooth)
                        }
                    })
                    .collect();
                freq_factors = Some(f);
            }
        }
        Self {
            theta_scale,
            freq_factors,
            freq_scale,
        }
    }

    /// cos and sin for one position, `head_dim / 2` each.
    fn cos_sin(&self, pos: usize, half: usize) -> (Vec<f32>, Vec<f32>) {
        let mut theta = pos as f32;
        let mut cos = Vec::with_capacity(half);
        let mut sin = Vec::with_capacity(half);
        for i in 0..half {
            let ff = self.freq_factors.as_ref().map_or(1.0, |f| f[i]);
            let t = self.freq_scale * (theta / ff);
            cos.push(t.cos());
            sin.push(t.sin());
            theta *= self.theta_scale;
        }
        (cos, sin)
    }
}

/// A loaded model's weights and the arithmetic over them.
pub struct Model {
    config: ModelConfig,
    name: String,
    embed: Embedding,
    layers: Vec<Layer>,
    final_norm: Vec<f32>,
    lm_head: Linear,
    rope_global: Rope,
    rope_local: Rope,
    rounding: Rounding,
    kernels: KernelPath,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("name", &self.name)
            .field("config", &self.config)
            .finish()
    }
}

#[derive(Clone, Copy)]
struct TokenMeta {
    seq: usize,
    pos: usize,
}

/// RMSNorm with ggml's exact rounding (f32 squares summed in f64, mean and scale in f32, then
/// `x · scale` and `· w` as two f32 products): the output feeds an 8-bit requantization, where
/// a one-ulp difference can move a whole step.
fn rms_norm_rows(x: &mut [f32], width: usize, w: &[f32], eps: f32, offset: f32) {
    for row in x.chunks_exact_mut(width) {
        let ss: f64 = row.iter().map(|&v| f64::from(v * v)).sum();
        let mean = (ss / width as f64) as f32;
        let scale = 1.0f32 / (mean + eps).sqrt();
        for (v, &g) in row.iter_mut().zip(w) {
            *v = (*v * scale) * (g + offset);
        }
    }
}

fn rms_norm_into(x: &[f32], width: usize, w: &[f32], eps: f32, offset: f32, out: &mut Vec<f32>) {
    out.clear();
    out.extend_from_slice(x);
    rms_norm_rows(out, width, w, eps, offset);
}

/// Rotates one head. The products are fused as GCC fuses ggml's `x0*cos - x1*sin` (measured
/// bit-equal against llama.cpp's RoPE output).
fn apply_rope(x: &mut [f32], cos: &[f32], sin: &[f32], style: RopeStyle) {
    let half = cos.len();
    let rot = |a: f32, b: f32, c: f32, s: f32| (a.mul_add(c, -(b * s)), a.mul_add(s, b * c));
    match style {
        RopeStyle::Interleaved => {
            for i in 0..half {
                (x[2 * i], x[2 * i + 1]) = rot(x[2 * i], x[2 * i + 1], cos[i], sin[i]);
            }
        }
        RopeStyle::Half => {
            for i in 0..half {
                (x[i], x[i + half]) = rot(x[i], x[i + half], cos[i], sin[i]);
            }
        }
    }
}

fn round_f16(x: &mut [f32]) {
    x.iter_mut().for_each(|v| *v = f16::from_f32(*v).to_f32());
}

impl Model {
    pub(crate) fn from_weights(config: ModelConfig, name: String, w: &Weights) -> Result<Self> {
        let c = &config;
        let (h, hd) = (c.hidden_size, c.head_dim);
        let (qd, kvd) = (c.num_heads * hd, c.num_kv_heads * hd);
        let (embed, tied_head) = w.embedding(c.vocab_size, h)?;
        let lm_head = if w.has("output.weight") {
            w.linear("output.weight", c.vocab_size, h)?
        } else {
            tied_head
        };
        let opt_vec = |name: String, len: usize| -> Result<Option<Vec<f32>>> {
            if w.has(&name) {
                w.vector(&name, len).map(Some)
            } else {
                Ok(None)
            }
        };
        let mut layers = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            let n = |s: &str| format!("blk.{i}.{s}");
            let (q_norm, k_norm) = if c.qk_norm {
                (
                    Some(w.vector(&n("attn_q_norm.weight"), hd)?),
                    Some(w.vector(&n("attn_k_norm.weight"), hd)?),
                )
            } else {
                (None, None)
            };
            let (post_attn_norm, post_ffn_norm) = if c.post_norms {
                (
                    Some(w.vector(&n("post_attention_norm.weight"), h)?),
                    Some(w.vector(&n("post_ffw_norm.weight"), h)?),
                )
            } else {
                (
                    opt_vec(n("post_attention_norm.weight"), h)?,
                    opt_vec(n("post_ffw_norm.weight"), h)?,
                )
            };
            layers.push(Layer {
                attn_norm: w.vector(&n("attn_norm.weight"), h)?,
                q: w.linear(&n("attn_q.weight"), qd, h)?,
                k: w.linear(&n("attn_k.weight"), kvd, h)?,
                v: w.linear(&n("attn_v.weight"), kvd, h)?,
                o: w.linear(&n("attn_output.weight"), h, qd)?,
                q_norm,
                k_norm,
                post_attn_norm,
                ffn_norm: w.vector(&n("ffn_norm.weight"), h)?,
                gate: w.linear(&n("ffn_gate.weight"), c.intermediate_size, h)?,
                up: w.linear(&n("ffn_up.weight"), c.intermediate_size, h)?,
                down: w.linear(&n("ffn_down.weight"), h, c.intermediate_size)?,
                post_ffn_norm,
            });
        }
        let final_norm = w.vector("output_norm.weight", h)?;
        let rope_global = Rope::new(c.rope_theta, hd, &c.rope_scaling);
        let rope_local = if c.sliding_window.is_some() && c.global_every > 0 {
            Rope::new(c.rope_local_theta, hd, &RopeScaling::None)
        } else {
            rope_global.clone()
        };
        Ok(Self {
            config,
            name,
            embed,
            layers,
            final_norm,
            lm_head,
            rope_global,
            rope_local,
            rounding: Rounding::default(),
            kernels: KernelPath::detect(),
        })
    }

    /// Which llama.cpp build's rounding the forward pass reproduces (see [`Rounding`]);
    /// AVX-512 unless changed.
    pub fn rounding(&self) -> Rounding {
        self.rounding
    }

    /// Reproduces another llama.cpp build's rounding (comparison tools use this).
    pub fn set_rounding(&mut self, rounding: Rounding) {
        self.rounding = rounding;
    }

    /// The kernels the forward pass runs (what a worker advertises).
    pub fn kernel_path(&self) -> KernelPath {
        self.kernels
    }

    /// Runs the forward pass on `path` from now on (e.g. [`KernelPath::exact`]).
    pub fn set_kernel_path(&mut self, path: KernelPath) {
        self.kernels = path;
    }

    /// The configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The name KV layouts carry (the weights file's name).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A zeroed KV cache for this model.
    pub fn new_cache(
        &self,
        num_blocks: usize,
        block_size: kvfleet_proto::BlockSize,
    ) -> Result<PagedKvCache> {
        PagedKvCache::new(
            &self.name,
            self.config.num_layers,
            self.config.num_kv_heads,
            self.config.head_dim,
            num_blocks,
            block_size,
        )
    }

    fn validate(&self, batch: &[SeqInput<'_>], cache: &PagedKvCache) -> Result<()> {
        let c = &self.config;
        let layout = cache.layout();
        if layout.layers as usize != c.num_layers
            || layout.kv_heads as usize != c.num_kv_heads
            || layout.head_dim as usize != c.head_dim
        {
            return Err(ModelError::BadInput(format!(
                "KV cache layout {layout:?} does not fit this model"
            )));
        }
        let bs = cache.block_size().tokens();
        for (i, s) in batch.iter().enumerate() {
            if s.tokens.is_empty() {
                return Err(ModelError::BadInput(format!("sequence {i} has no tokens")));
            }
            let end = s.start_pos + s.tokens.len();
            if end > c.context_length {
                return Err(ModelError::PromptTooLong {
                    tokens: end,
                    context: c.context_length,
                });
            }
            if let Some(&id) = s.tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
                return Err(ModelError::BadToken {
                    id,
                    vocab: c.vocab_size,
                });
            }
            let need = end.div_ceil(bs);
            if s.block_table.len() < need {
                return Err(ModelError::BadInput(format!(
                    "sequence {i}: {end} tokens need {need} blocks, the block table has {}",
                    s.block_table.len()
                )));
            }
            if let Some(&b) = s.block_table[..need]
                .iter()
                .find(|&&b| b as usize >= cache.num_blocks())
            {
                return Err(ModelError::BadInput(format!(
                    "sequence {i}: block id {b} is outside the cache's {} blocks",
                    cache.num_blocks()
                )));
            }
        }
        Ok(())
    }

    /// Runs one step. Returns, for each input in order, the logits of its last token when it
    /// asked for them.
    pub fn forward(
        &self,
        batch: &[SeqInput<'_>],
        cache: &mut PagedKvCache,
    ) -> Result<Vec<Option<Vec<f32>>>> {
        self.forward_traced(batch, cache, &mut |_, _, _| {})
    }

    /// [`Model::forward`] that also hands every intermediate activation to `trace` as
    /// (name, layer, values `[tokens, width]`), named as llama.cpp's graph names them
    /// (`attn_norm`, `Qcur`, `kqv_out`, `ffn_inp`, `ffn_out`, `l_out`, `result_norm`), so a
    /// disagreement with llama.cpp can be located layer by layer (crates/model/tools/).
    pub fn forward_traced(
        &self,
        batch: &[SeqInput<'_>],
        cache: &mut PagedKvCache,
        trace: &mut dyn FnMut(&str, usize, &[f32]),
    ) -> Result<Vec<Option<Vec<f32>>>> {
        self.validate(batch, cache)?;
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let c = &self.config;
        let (h, hd, nh, nkv) = (c.hidden_size, c.head_dim, c.num_heads, c.num_kv_heads);
        let mut ids = Vec::new();
        let mut meta = Vec::new();
        for (si, s) in batch.iter().enumerate() {
            ids.extend_from_slice(s.tokens);
            meta.extend((0..s.tokens.len()).map(|j| TokenMeta {
                seq: si,
                pos: s.start_pos + j,
            }));
        }
        let t = ids.len();
        let chunks: Vec<usize> = batch.iter().map(|s| s.tokens.len()).collect();
        let path = self.kernels;
        let exact = path.is_exact();
        let mut x = self.embed.lookup(&ids);
        if let Some(scale) = c.embedding_scale {
            x.iter_mut().for_each(|v| *v *= scale);
        }
        trace("inp_embd", 0, &x);
        // cos/sin per token, shared by all layers of a kind.
        let rope_of = |rope: &Rope| -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
            meta.iter().map(|m| rope.cos_sin(m.pos, hd / 2)).unzip()
        };
        let global = rope_of(&self.rope_global);
        let local = if c.sliding_window.is_some() && c.global_every > 0 {
            Some(rope_of(&self.rope_local))
        } else {
            None
        };
        let tables: Vec<&[u32]> = batch.iter().map(|s| s.block_table).collect();
        let mut spans = Vec::with_capacity(batch.len());
        let mut first = 0;
        for s in batch {
            spans.push(SeqSpan {
                first,
                len: s.tokens.len(),
                start: s.start_pos,
                table: s.block_table,
            });
            first += s.tokens.len();
        }
        let bs = cache.block_size().tokens();
        let eps = c.rms_eps;
        let off = c.norm_weight_offset;

        // Buffers reused by every layer (no allocation, no page faults, per layer).
        let (mut hn, mut q, mut k, mut v) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let (mut o, mut g, mut u, mut d) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut attn = vec![0.0f32; t * nh * hd];
        for (li, layer) in self.layers.iter().enumerate() {
            rms_norm_into(&x, h, &layer.attn_norm, eps, off, &mut hn);
            trace("attn_norm", li, &hn);
            Linear::forward_group_into(
                path,
                [&layer.q, &layer.k, &layer.v],
                &hn,
                &chunks,
                [&mut q, &mut k, &mut v],
            );
            trace("Vcur", li, &v);
            if let Some(w) = &layer.q_norm {
                rms_norm_rows(&mut q, hd, w, eps, off);
            }
            if let Some(w) = &layer.k_norm {
                rms_norm_rows(&mut k, hd, w, eps, off);
            }
            trace("Qcur_pre", li, &q);
            let (cos, sin) = match (&local, c.is_sliding(li)) {
                (Some(l), true) => (&l.0, &l.1),
                _ => (&global.0, &global.1),
            };
            for ti in 0..t {
                for head in q[ti * nh * hd..(ti + 1) * nh * hd].chunks_exact_mut(hd) {
                    apply_rope(head, &cos[ti], &sin[ti], c.rope_style);
                }
                for head in k[ti * nkv * hd..(ti + 1) * nkv * hd].chunks_exact_mut(hd) {
                    apply_rope(head, &cos[ti], &sin[ti], c.rope_style);
                }
            }
            trace("Qcur", li, &q);
            trace("Kcur", li, &k);
            // Write this step's K/V into their slots.
            let row = nkv * hd;
            for (ti, m) in meta.iter().enumerate() {
                let block = tables[m.seq][m.pos / bs] as usize;
                cache.store(
                    li,
                    block,
                    m.pos % bs,
                    &k[ti * row..(ti + 1) * row],
                    &v[ti * row..(ti + 1) * row],
                );
            }
            let shape = cache.shape(nh, c.attn_scale, c.window(li));
            let (kc, vc) = (&cache.k[li], &cache.v[li]);
            if exact {
                // Queries meet f16 keys at f16 precision, as in llama.cpp's f16 K·Q matmul.
                round_f16(&mut q);
                let tokens: Vec<TokenAt<'_>> = meta
                    .iter()
                    .map(|m| TokenAt {
                        pos: m.pos,
                        table: tables[m.seq],
                    })
                    .collect();
                attention::exact(self.rounding, &shape, &q, kc, vc, &tokens, &mut attn);
            } else {
                attention::fast(path.isa, &shape, &q, kc, vc, &spans, &mut attn);
            }
            trace("kqv_out", li, &attn);
            Linear::forward_group_into(path, [&layer.o], &attn, &chunks, [&mut o]);
            trace("attn_out", li, &o);
            if let Some(w) = &layer.post_attn_norm {
                rms_norm_rows(&mut o, h, w, eps, off);
            }
            x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
            trace("ffn_inp", li, &x);

            rms_norm_into(&x, h, &layer.ffn_norm, eps, off, &mut hn);
            trace("ffn_norm", li, &hn);
            Linear::forward_group_into(
                path,
                [&layer.gate, &layer.up],
                &hn,
                &chunks,
                [&mut g, &mut u],
            );
            match c.activation {
                // silu(g)·u and gelu(g)·u, each rounded as ggml's fused GLU kernels round them
                // (the fast path: one `exp` for every element, without the build's lane split).
                Activation::Silu if exact => {
                    let r = self.rounding;
                    let n = c.intermediate_size;
                    for (row_u, row_g) in u.chunks_exact_mut(n).zip(g.chunks_exact(n)) {
                        for (i, (u, &g)) in row_u.iter_mut().zip(row_g).enumerate() {
                            *u *= r.silu(g, i, n);
                        }
                    }
                }
                Activation::Silu => {
                    u.iter_mut()
                        .zip(&g)
                        .for_each(|(u, &g)| *u *= g / (1.0 + expf_avx2(0.0 - g)));
                }
                Activation::GeluTanh => u.iter_mut().zip(&g).for_each(|(u, &g)| *u *= gelu(g)),
            }
            trace("ffn_act", li, &u);
            Linear::forward_group_into(path, [&layer.down], &u, &chunks, [&mut d]);
            trace("ffn_out", li, &d);
            if let Some(w) = &layer.post_ffn_norm {
                rms_norm_rows(&mut d, h, w, eps, off);
            }
            x.iter_mut().zip(&d).for_each(|(a, b)| *a += b);
            trace("l_out", li, &x);
        }

        // Logits only for the last token of each sequence that asked.
        let mut rows = Vec::new();
        let mut which = Vec::new();
        let mut offset = 0;
        for (si, s) in batch.iter().enumerate() {
            offset += s.tokens.len();
            if s.want_logits {
                rows.extend_from_slice(&x[(offset - 1) * h..offset * h]);
                which.push(si);
            }
        }
        let mut out = vec![None; batch.len()];
        if which.is_empty() {
            return Ok(out);
        }
        rms_norm_rows(&mut rows, h, &self.final_norm, eps, off);
        trace("result_norm", 0, &rows);
        let logits = self.lm_head.forward(path, &rows, &vec![1; which.len()]);
        trace("result_output", 0, &logits);
        let vocab = self.lm_head.out;
        for (i, si) in which.into_iter().enumerate() {
            out[si] = Some(logits[i * vocab..(i + 1) * vocab].to_vec());
        }
        Ok(out)
    }
}
