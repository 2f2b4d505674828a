//! Where tensors come from: a GGUF file (quantized or not) or a directory of Hugging Face
//! safetensors files (f32/f16/bf16). Both are addressed by llama.cpp's tensor names
//! (`blk.3.attn_q.weight`); the safetensors side maps them to Hugging Face names. Every tensor
//! is checked against the shape the configuration implies before candle sees it, because
//! candle panics rather than errors on some shape mismatches.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{DType, Device, Tensor};

use crate::config::Architecture;
use crate::error::{ModelError, Result};
use crate::gguf::GgufFile;
use crate::kquant::KQuantMatrix;
use crate::qmatmul::BlockQ8Matrix;

struct StTensor {
    file: usize,
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

/// Safetensors files read into memory with their tensor directories.
pub(crate) struct SafetensorsDir {
    files: Vec<(PathBuf, Vec<u8>)>,
    tensors: BTreeMap<String, StTensor>,
    arch: Architecture,
}

impl SafetensorsDir {
    pub(crate) fn open(dir: &Path, arch: Architecture) -> Result<Self> {
        let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|source| ModelError::Io {
                path: dir.to_path_buf(),
                source,
            })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .collect();
        paths.sort();
        if paths.is_empty() {
            return Err(ModelError::Io {
                path: dir.to_path_buf(),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no *.safetensors files in the model directory",
                ),
            });
        }
        let mut files = Vec::new();
        let mut tensors = BTreeMap::new();
        for (idx, path) in paths.into_iter().enumerate() {
            let bytes = std::fs::read(&path).map_err(|source| ModelError::Io {
                path: path.clone(),
                source,
            })?;
            let corrupt = |detail: String| ModelError::Corrupt {
                path: path.clone(),
                format: "safetensors",
                detail,
            };
            let (header_len, meta) = safetensors::SafeTensors::read_metadata(&bytes)
                .map_err(|e| corrupt(e.to_string()))?;
            let base = 8 + header_len;
            for (name, info) in meta.tensors() {
                let (s, e) = info.data_offsets;
                let (start, end) = (base + s, base + e);
                if end > bytes.len() || start > end {
                    return Err(corrupt(format!(
                        "tensor `{name}` needs bytes {start}..{end} of {} (truncated?)",
                        bytes.len()
                    )));
                }
                let elems: usize = info.shape.iter().product();
                let size = info.dtype.bitsize() / 8;
                if elems * size != end - start {
                    return Err(corrupt(format!(
                        "tensor `{name}` has {} bytes for shape {:?}",
                        end - start,
                        info.shape
                    )));
                }
                tensors.insert(
                    name.clone(),
                    StTensor {
                        file: idx,
                        dtype: info.dtype,
                        shape: info.shape.clone(),
                        start,
                        end,
                    },
                );
            }
            files.push((path, bytes));
        }
        Ok(Self {
            files,
            tensors,
            arch,
        })
    }

    /// (shape, dtype name) of every tensor, for `inspect`.
    pub(crate) fn summary(&self) -> Vec<(Vec<usize>, String)> {
        self.tensors
            .values()
            .map(|t| (t.shape.clone(), format!("{:?}", t.dtype)))
            .collect()
    }

    fn hf_name(&self, gguf: &str) -> String {
        let gemma = self.arch == Architecture::Gemma3;
        match gguf {
            "token_embd.weight" => return "model.embed_tokens.weight".into(),
            "output_norm.weight" => return "model.norm.weight".into(),
            "output.weight" => return "lm_head.weight".into(),
            _ => {}
        }
        let Some(rest) = gguf.strip_prefix("blk.") else {
            return gguf.to_string();
        };
        let Some((layer, rest)) = rest.split_once('.') else {
            return gguf.to_string();
        };
        let (base, suffix) = rest.rsplit_once('.').unwrap_or((rest, "weight"));
        let hf = match base {
            "attn_norm" => "input_layernorm",
            "attn_q" => "self_attn.q_proj",
            "attn_k" => "self_attn.k_proj",
            "attn_v" => "self_attn.v_proj",
            "attn_output" => "self_attn.o_proj",
            "attn_q_norm" => "self_attn.q_norm",
            "attn_k_norm" => "self_attn.k_norm",
            "ffn_norm" if gemma => "pre_feedforward_layernorm",
            "ffn_norm" => "post_attention_layernorm",
            "post_attention_norm" => "post_attention_layernorm",
            "post_ffw_norm" => "post_feedforward_layernorm",
            "ffn_gate" => "mlp.gate_proj",
            "ffn_up" => "mlp.up_proj",
            "ffn_down" => "mlp.down_proj",
            other => other,
        };
        format!("model.layers.{layer}.{hf}.{suffix}")
    }

    fn tensor(&self, gguf_name: &str) -> Result<Option<Tensor>> {
        let name = self.hf_name(gguf_name);
        let Some(t) = self.tensors.get(&name) else {
            return Ok(None);
        };
        let dtype = match t.dtype {
            safetensors::Dtype::F32 => DType::F32,
            safetensors::Dtype::F16 => DType::F16,
            safetensors::Dtype::BF16 => DType::BF16,
            other => {
                return Err(ModelError::UnsupportedQuant {
                    tensor: name,
                    kind: format!("{other:?}"),
                });
            }
        };
        let bytes = &self.files[t.file].1[t.start..t.end];
        let tensor = Tensor::from_raw_buffer(bytes, dtype, &t.shape, &Device::Cpu)?;
        Ok(Some(tensor.to_dtype(DType::F32)?))
    }
}

/// Either kind of weight source.
pub(crate) enum Weights {
    Gguf(GgufFile),
    Safetensors(SafetensorsDir),
}

/// How a weight matrix is multiplied.
#[derive(Debug, Clone)]
pub(crate) enum LinearKind {
    /// candle: dense f32, or K-quants (which have SIMD kernels there).
    Candle(QMatMul),
    /// Our kernel for the 32-element block types.
    Blocks(BlockQ8Matrix),
    /// Our Q4_K / Q6_K kernel (llama.cpp's rounding).
    KQuant(KQuantMatrix),
}

/// A weight matrix `[out, in]` ready for `x @ W^T`, plus an optional bias.
#[derive(Debug, Clone)]
pub(crate) struct Linear {
    pub(crate) kind: LinearKind,
    pub(crate) bias: Option<Vec<f32>>,
    pub(crate) out: usize,
    pub(crate) inp: usize,
}

impl Linear {
    /// `x [t, in] → [t, out]`, where the `t` rows are the step's tokens grouped into one
    /// chunk per sequence (`chunks` holds their lengths; the K-quant kernels round like
    /// llama.cpp would for a step of that one sequence).
    pub(crate) fn forward(&self, x: &[f32], chunks: &[usize]) -> Result<Vec<f32>> {
        let t: usize = chunks.iter().sum();
        debug_assert_eq!(x.len(), t * self.inp);
        let mut y = match &self.kind {
            LinearKind::Blocks(b) => b.matmul(x, t),
            LinearKind::KQuant(b) => b.matmul(x, chunks),
            LinearKind::Candle(w) => {
                let xt = Tensor::from_slice(x, (t, self.inp), &Device::Cpu)?;
                let y = candle_core::Module::forward(w, &xt)?;
                y.flatten_all()?.to_vec1::<f32>()?
            }
        };
        if let Some(b) = &self.bias {
            for row in y.chunks_exact_mut(self.out) {
                row.iter_mut().zip(b).for_each(|(v, b)| *v += b);
            }
        }
        Ok(y)
    }
}

impl Linear {
    /// [`Linear::forward`] of several weights over the same input (q/k/v, gate/up). When all
    /// are our block kernel the input is quantized once and their rows share one parallel
    /// region ([`BlockQ8Matrix::matmul_group`]); the results are bit-identical to calling
    /// `forward` on each.
    pub(crate) fn forward_group<const N: usize>(
        group: [&Linear; N],
        x: &[f32],
        chunks: &[usize],
    ) -> Result<[Vec<f32>; N]> {
        let blocks: Vec<&BlockQ8Matrix> = group
            .iter()
            .filter_map(|l| match &l.kind {
                LinearKind::Blocks(b) => Some(b),
                _ => None,
            })
            .collect();
        if blocks.len() < N {
            let mut out: [Vec<f32>; N] = std::array::from_fn(|_| Vec::new());
            for (o, l) in out.iter_mut().zip(group) {
                *o = l.forward(x, chunks)?;
            }
            return Ok(out);
        }
        let t: usize = chunks.iter().sum();
        let mut ys = BlockQ8Matrix::matmul_group(&blocks, x, t).into_iter();
        let mut out: [Vec<f32>; N] = std::array::from_fn(|_| ys.next().unwrap_or_default());
        for (y, l) in out.iter_mut().zip(group) {
            if let Some(b) = &l.bias {
                for row in y.chunks_exact_mut(l.out) {
                    row.iter_mut().zip(b).for_each(|(v, b)| *v += b);
                }
            }
        }
        Ok(out)
    }
}

/// The token embedding: quantized rows are dequantized on lookup.
#[derive(Debug, Clone)]
pub(crate) enum Embedding {
    Quantized(Arc<QTensor>),
    Dense(Tensor),
}

impl Embedding {
    pub(crate) fn lookup(&self, ids: &[u32]) -> Result<Tensor> {
        let ids_t = Tensor::from_slice(ids, ids.len(), &Device::Cpu)?;
        Ok(match self {
            Embedding::Quantized(q) => q.embedding(&ids_t)?,
            Embedding::Dense(t) => t.index_select(&ids_t, 0)?,
        })
    }
}

fn check_shape(name: &str, actual: &[usize], expected: &[usize]) -> Result<()> {
    if actual != expected {
        return Err(ModelError::BadShape {
            tensor: name.to_string(),
            actual: actual.to_vec(),
            expected: expected.to_vec(),
        });
    }
    Ok(())
}

impl Weights {
    pub(crate) fn has(&self, name: &str) -> bool {
        match self {
            Weights::Gguf(g) => g.tensors.contains_key(name),
            Weights::Safetensors(s) => s.tensors.contains_key(&s.hf_name(name)),
        }
    }

    pub(crate) fn linear(&self, name: &str, out: usize, inp: usize) -> Result<Linear> {
        let kind = match self {
            Weights::Gguf(g) => {
                let (info, bytes) = g.raw(name)?;
                check_shape(name, &info.shape, &[out, inp])?;
                if let Some(b) = BlockQ8Matrix::from_ggml(info.type_id, bytes, out, inp) {
                    LinearKind::Blocks(b)
                } else if let Some(b) = KQuantMatrix::from_ggml(info.type_id, bytes, out, inp) {
                    LinearKind::KQuant(b)
                } else {
                    LinearKind::Candle(QMatMul::from_arc(g.qtensor(name)?)?)
                }
            }
            Weights::Safetensors(s) => {
                let t = s
                    .tensor(name)?
                    .ok_or_else(|| ModelError::MissingTensor(s.hf_name(name)))?;
                check_shape(name, t.dims(), &[out, inp])?;
                LinearKind::Candle(QMatMul::Tensor(t))
            }
        };
        let bias_name = name.replace(".weight", ".bias");
        let bias = if bias_name != name && self.has(&bias_name) {
            Some(self.vector(&bias_name, out)?)
        } else {
            None
        };
        Ok(Linear {
            kind,
            bias,
            out,
            inp,
        })
    }

    pub(crate) fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>> {
        let v = match self {
            Weights::Gguf(g) => {
                let shape = g
                    .tensors
                    .get(name)
                    .map(|t| t.shape.clone())
                    .ok_or_else(|| ModelError::MissingTensor(name.to_string()))?;
                check_shape(name, &shape, &[len])?;
                g.f32_vec(name)?
            }
            Weights::Safetensors(s) => {
                let t = s
                    .tensor(name)?
                    .ok_or_else(|| ModelError::MissingTensor(s.hf_name(name)))?;
                check_shape(name, t.dims(), &[len])?;
                t.to_vec1::<f32>()?
            }
        };
        Ok(v)
    }

    /// The embedding table and, when the LM head is tied to it, the head built from the same
    /// storage.
    pub(crate) fn embedding(&self, vocab: usize, hidden: usize) -> Result<(Embedding, Linear)> {
        let name = "token_embd.weight";
        let (emb, kind) = match self {
            Weights::Gguf(g) => {
                let q = g.qtensor(name)?;
                check_shape(name, q.shape().dims(), &[vocab, hidden])?;
                let (info, bytes) = g.raw(name)?;
                let head = QMatMul::from_arc(q.clone())?;
                let emb = match &head {
                    QMatMul::Tensor(t) => Embedding::Dense(t.clone()),
                    _ => Embedding::Quantized(q),
                };
                let kind = match BlockQ8Matrix::from_ggml(info.type_id, bytes, vocab, hidden) {
                    Some(b) => LinearKind::Blocks(b),
                    None => LinearKind::Candle(head),
                };
                (emb, kind)
            }
            Weights::Safetensors(s) => {
                let t = s
                    .tensor(name)?
                    .ok_or_else(|| ModelError::MissingTensor(s.hf_name(name)))?;
                check_shape(name, t.dims(), &[vocab, hidden])?;
                (
                    Embedding::Dense(t.clone()),
                    LinearKind::Candle(QMatMul::Tensor(t)),
                )
            }
        };
        Ok((
            emb,
            Linear {
                kind,
                bias: None,
                out: vocab,
                inp: hidden,
            },
        ))
    }
}
