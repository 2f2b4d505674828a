//! Where tensors come from: a GGUF file (quantized or not, used in place from its memory map)
//! or a directory of Hugging Face safetensors files (f32/f16/bf16, converted to f32 at load).
//! Both are addressed by llama.cpp's tensor names (`blk.3.attn_q.weight`); the safetensors side
//! maps them to Hugging Face names. Every tensor is checked against the shape the
//! configuration implies before a kernel sees it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::config::Architecture;
use crate::error::{ModelError, Result};
use crate::gguf::{GgufFile, ggml_type_name};
use crate::kernels::KernelPath;
use crate::kernels::matmul::matmul_into;
use crate::kernels::quant::{QMatrix, WType};
use crate::mmap::Bytes;

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

/// A weight matrix `[out, in]` ready for `x @ W^T`, plus an optional bias.
#[derive(Debug, Clone)]
pub(crate) struct Linear {
    pub(crate) w: QMatrix,
    pub(crate) bias: Option<Vec<f32>>,
    pub(crate) out: usize,
}

impl Linear {
    /// `x [t, in] → [t, out]`, where the `t` rows are the step's tokens grouped into one
    /// chunk per sequence (`chunks` holds their lengths; the exact arithmetic picks
    /// llama.cpp's K-quant kernel for each token from them).
    pub(crate) fn forward(&self, path: KernelPath, x: &[f32], chunks: &[usize]) -> Vec<f32> {
        let [y] = Linear::forward_group(path, [self], x, chunks);
        y
    }

    /// [`Linear::forward`] of several weights over the same input (q/k/v, gate/up): the input
    /// is quantized once per activation kind and all their tiles share one parallel region.
    /// Each output is bit-identical to `forward`'s.
    pub(crate) fn forward_group<const N: usize>(
        path: KernelPath,
        group: [&Linear; N],
        x: &[f32],
        chunks: &[usize],
    ) -> [Vec<f32>; N] {
        let mut out: [Vec<f32>; N] = std::array::from_fn(|_| Vec::new());
        let outs: [&mut Vec<f32>; N] = out.each_mut();
        Linear::forward_group_into(path, group, x, chunks, outs);
        out
    }

    /// [`Linear::forward_group`] into existing buffers (resized; their capacity is reused).
    pub(crate) fn forward_group_into<const N: usize>(
        path: KernelPath,
        group: [&Linear; N],
        x: &[f32],
        chunks: &[usize],
        mut outs: [&mut Vec<f32>; N],
    ) {
        let mats: Vec<&QMatrix> = group.iter().map(|l| &l.w).collect();
        matmul_into(path, &mats, x, chunks, &mut outs);
        for (y, l) in outs.into_iter().zip(group) {
            if let Some(b) = &l.bias {
                for row in y.chunks_exact_mut(l.out) {
                    row.iter_mut().zip(b).for_each(|(v, b)| *v += b);
                }
            }
        }
    }
}

/// The token embedding, rows dequantized on lookup.
#[derive(Debug, Clone)]
pub(crate) struct Embedding(pub(crate) QMatrix);

impl Embedding {
    /// `[ids.len(), hidden]` f32 rows.
    pub(crate) fn lookup(&self, ids: &[u32]) -> Vec<f32> {
        let h = self.0.cols;
        let mut out = vec![0f32; ids.len() * h];
        for (&id, o) in ids.iter().zip(out.chunks_exact_mut(h)) {
            self.0.dequantize_row(id as usize, o);
        }
        out
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

    /// A `[rows, cols]` matrix, in place for GGUF.
    fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<QMatrix> {
        match self {
            Weights::Gguf(g) => {
                let (info, bytes) = g.tensor_bytes(name)?;
                check_shape(name, &info.shape, &[rows, cols])?;
                let unsupported = || ModelError::UnsupportedQuant {
                    tensor: name.to_string(),
                    kind: ggml_type_name(info.type_id),
                };
                let wtype = WType::from_ggml(info.type_id).ok_or_else(unsupported)?;
                QMatrix::new(wtype, rows, cols, bytes).ok_or_else(unsupported)
            }
            Weights::Safetensors(s) => {
                let t = s
                    .tensor(name)?
                    .ok_or_else(|| ModelError::MissingTensor(s.hf_name(name)))?;
                check_shape(name, t.dims(), &[rows, cols])?;
                let v = t.flatten_all()?.to_vec1::<f32>()?;
                let bytes = Bytes::from_vec(v.iter().flat_map(|f| f.to_le_bytes()).collect());
                QMatrix::new(WType::F32, rows, cols, bytes)
                    .ok_or_else(|| ModelError::BadInput(format!("tensor `{name}`: size")))
            }
        }
    }

    pub(crate) fn linear(&self, name: &str, out: usize, inp: usize) -> Result<Linear> {
        let w = self.matrix(name, out, inp)?;
        let bias_name = name.replace(".weight", ".bias");
        let bias = if bias_name != name && self.has(&bias_name) {
            Some(self.vector(&bias_name, out)?)
        } else {
            None
        };
        Ok(Linear { w, bias, out })
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

    /// The embedding table and, when the LM head is tied to it, the head over the same bytes.
    pub(crate) fn embedding(&self, vocab: usize, hidden: usize) -> Result<(Embedding, Linear)> {
        let m = self.matrix("token_embd.weight", vocab, hidden)?;
        Ok((
            Embedding(m.clone()),
            Linear {
                w: m,
                bias: None,
                out: vocab,
            },
        ))
    }
}
