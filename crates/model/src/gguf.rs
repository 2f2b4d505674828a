//! A bounds-checked GGUF reader.
//!
//! The file is memory-mapped (`mmap`) and its header parsed here, with every length and offset
//! checked against the file size (a corrupt string length must not allocate whatever it says),
//! so the weights can then be used in place as byte views of exactly the right size. It owns
//! the file's metadata and tensor directory, not the interpretation of either (that is `config`
//! and `weights`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::GgmlDType;

use crate::error::{ModelError, Result};
use crate::kernels::quant::{WType, dequantize_row};
use crate::mmap::Bytes;

/// One metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// Any unsigned integer type.
    U64(u64),
    /// Any signed integer type.
    I64(i64),
    /// f32 or f64.
    F64(f64),
    /// A boolean.
    Bool(bool),
    /// A UTF-8 string (invalid UTF-8 is replaced, never rejected: token texts may be odd).
    Str(String),
    /// An array of values.
    Array(Vec<Value>),
}

impl Value {
    /// As an unsigned integer, when it is a non-negative integer.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U64(v) => Some(v),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }
    /// As a float, when it is numeric.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::U64(v) => Some(v as f64),
            Value::I64(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => None,
        }
    }
    /// As a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
    /// As a boolean.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }
    /// As an array.
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// Where one tensor lies in the file.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    /// Shape in candle order (outermost first; GGUF stores it innermost first).
    pub shape: Vec<usize>,
    /// The GGML type id as stored.
    pub type_id: u32,
    /// Absolute byte offset in the file.
    pub offset: usize,
    /// Size in bytes.
    pub size: usize,
}

/// A parsed GGUF file: metadata, tensor directory and the mapped bytes.
pub struct GgufFile {
    path: PathBuf,
    bytes: Bytes,
    /// Metadata key → value.
    pub metadata: BTreeMap<String, Value>,
    /// Tensor name → location, in file order of names.
    pub tensors: BTreeMap<String, TensorInfo>,
    /// The GGUF version (2 or 3).
    pub version: u32,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata_keys", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

/// The name llama.cpp uses for a GGML type id, for messages and `inspect`.
pub fn ggml_type_name(id: u32) -> String {
    let name = match id {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        6 => "Q5_0",
        7 => "Q5_1",
        8 => "Q8_0",
        9 => "Q8_1",
        10 => "Q2_K",
        11 => "Q3_K",
        12 => "Q4_K",
        13 => "Q5_K",
        14 => "Q6_K",
        15 => "Q8_K",
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        30 => "BF16",
        _ => return format!("type#{id}"),
    };
    name.to_string()
}

/// The candle type for a GGML type id, when candle can compute with it.
pub fn ggml_dtype(id: u32) -> Option<GgmlDType> {
    Some(match id {
        0 => GgmlDType::F32,
        1 => GgmlDType::F16,
        2 => GgmlDType::Q4_0,
        3 => GgmlDType::Q4_1,
        6 => GgmlDType::Q5_0,
        7 => GgmlDType::Q5_1,
        8 => GgmlDType::Q8_0,
        9 => GgmlDType::Q8_1,
        10 => GgmlDType::Q2K,
        11 => GgmlDType::Q3K,
        12 => GgmlDType::Q4K,
        13 => GgmlDType::Q5K,
        14 => GgmlDType::Q6K,
        15 => GgmlDType::Q8K,
        30 => GgmlDType::BF16,
        _ => return None,
    })
}

struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> std::result::Result<&'a [u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&end| end <= self.bytes.len())
            .ok_or_else(|| {
                format!(
                    "{what}: needs {n} bytes at offset {} but the file has {}",
                    self.pos,
                    self.bytes.len()
                )
            })?;
        let out = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(out)
    }
    fn array<const N: usize>(&mut self, what: &str) -> std::result::Result<[u8; N], String> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }
    fn u32(&mut self, what: &str) -> std::result::Result<u32, String> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }
    fn u64(&mut self, what: &str) -> std::result::Result<u64, String> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }
    fn len(&mut self, what: &str) -> std::result::Result<usize, String> {
        let n = self.u64(what)?;
        // No length can exceed the bytes that remain: this is what keeps a corrupt length from
        // turning into a huge allocation.
        let left = (self.bytes.len() - self.pos) as u64;
        if n > left {
            return Err(format!(
                "{what}: length {n} at offset {} exceeds the {left} bytes left",
                self.pos
            ));
        }
        Ok(n as usize)
    }
    fn string(&mut self, what: &str) -> std::result::Result<String, String> {
        let n = self.len(what)?;
        Ok(String::from_utf8_lossy(self.take(n, what)?).into_owned())
    }
    fn value(&mut self, ty: u32, key: &str, depth: u32) -> std::result::Result<Value, String> {
        Ok(match ty {
            0 => Value::U64(u64::from(self.array::<1>(key)?[0])),
            1 => Value::I64(i64::from(self.array::<1>(key)?[0] as i8)),
            2 => Value::U64(u64::from(u16::from_le_bytes(self.array(key)?))),
            3 => Value::I64(i64::from(i16::from_le_bytes(self.array(key)?))),
            4 => Value::U64(u64::from(self.u32(key)?)),
            5 => Value::I64(i64::from(i32::from_le_bytes(self.array(key)?))),
            6 => Value::F64(f64::from(f32::from_le_bytes(self.array(key)?))),
            7 => Value::Bool(self.array::<1>(key)?[0] != 0),
            8 => Value::Str(self.string(key)?),
            9 => {
                if depth > 2 {
                    return Err(format!("{key}: arrays nested too deep"));
                }
                let elem = self.u32(key)?;
                let n = self.len(key)?;
                let mut out = Vec::with_capacity(n.min(1 << 20));
                for _ in 0..n {
                    out.push(self.value(elem, key, depth + 1)?);
                }
                Value::Array(out)
            }
            10 => Value::U64(self.u64(key)?),
            11 => Value::I64(i64::from_le_bytes(self.array(key)?)),
            12 => Value::F64(f64::from_le_bytes(self.array(key)?)),
            other => return Err(format!("{key}: unknown metadata value type {other}")),
        })
    }
}

impl GgufFile {
    /// Maps and parses `path`. Errors name the file and what is malformed.
    ///
    /// The weights are used in place from the mapping (shared with every other process that
    /// maps the same file): the file must not be modified while a model built from it is
    /// served (replace it by renaming a new file over it).
    pub fn open(path: &Path) -> Result<Self> {
        let bytes = Bytes::map(path).map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(path.to_path_buf(), bytes)
    }

    /// Parses bytes already in memory (tests, fuzzing).
    pub fn from_bytes(path: PathBuf, bytes: Vec<u8>) -> Result<Self> {
        Self::parse(path, Bytes::from_vec(bytes))
    }

    pub(crate) fn parse(path: PathBuf, bytes: Bytes) -> Result<Self> {
        let corrupt = |detail: String| ModelError::Corrupt {
            path: path.clone(),
            format: "GGUF",
            detail,
        };
        let mut cur = Cursor {
            bytes: bytes.as_slice(),
            pos: 0,
        };
        let magic = cur.array::<4>("magic").map_err(corrupt)?;
        if &magic != b"GGUF" {
            return Err(corrupt(format!(
                "bad magic {magic:02x?}, expected \"GGUF\""
            )));
        }
        let version = cur.u32("version").map_err(corrupt)?;
        if !(2..=3).contains(&version) {
            return Err(corrupt(format!("unsupported GGUF version {version}")));
        }
        let n_tensors = cur.u64("tensor count").map_err(corrupt)?;
        let n_kv = cur.u64("metadata count").map_err(corrupt)?;
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = cur.string("metadata key").map_err(corrupt)?;
            let ty = cur.u32(&key).map_err(corrupt)?;
            let value = cur.value(ty, &key, 0).map_err(corrupt)?;
            metadata.insert(key, value);
        }
        let alignment = match metadata.get("general.alignment") {
            None => 32,
            Some(v) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() && a <= 1 << 20 => a as usize,
                _ => return Err(corrupt(format!("bad general.alignment {v:?}"))),
            },
        };
        let mut raw = Vec::new();
        for _ in 0..n_tensors {
            let name = cur.string("tensor name").map_err(corrupt)?;
            let n_dims = cur.u32(&name).map_err(corrupt)?;
            if n_dims == 0 || n_dims > 4 {
                return Err(corrupt(format!("tensor `{name}` has {n_dims} dimensions")));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                let d = cur.u64(&name).map_err(corrupt)?;
                dims.push(usize::try_from(d).map_err(|_| corrupt(format!("`{name}` dim {d}")))?);
            }
            dims.reverse();
            let type_id = cur.u32(&name).map_err(corrupt)?;
            let offset = cur.u64(&name).map_err(corrupt)?;
            raw.push((name, dims, type_id, offset));
        }
        let data_start = cur.pos.div_ceil(alignment) * alignment;
        let mut tensors = BTreeMap::new();
        for (name, shape, type_id, offset) in raw {
            let elems = shape
                .iter()
                .try_fold(1usize, |acc, &d| acc.checked_mul(d))
                .ok_or_else(|| corrupt(format!("tensor `{name}` shape {shape:?} overflows")))?;
            // Size is only known for types candle implements; others are rejected when used
            // (as UnsupportedQuant), not here, so that `inspect` can still describe the file.
            let size = match ggml_dtype(type_id) {
                Some(dt) => {
                    let last = shape.last().copied().unwrap_or(0);
                    if last % dt.block_size() != 0 {
                        return Err(corrupt(format!(
                            "tensor `{name}` row of {last} is not a multiple of the {} block size {}",
                            ggml_type_name(type_id),
                            dt.block_size()
                        )));
                    }
                    elems / dt.block_size() * dt.type_size()
                }
                None => 0,
            };
            let start = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(data_start))
                .ok_or_else(|| corrupt(format!("tensor `{name}` offset {offset}")))?;
            match start.checked_add(size) {
                Some(end) if end <= bytes.len() => {}
                _ => {
                    return Err(corrupt(format!(
                        "tensor `{name}` needs bytes {start}..{} but the file has {} (truncated?)",
                        start.saturating_add(size),
                        bytes.len()
                    )));
                }
            }
            tensors.insert(
                name,
                TensorInfo {
                    shape,
                    type_id,
                    offset: start,
                    size,
                },
            );
        }
        Ok(Self {
            path,
            bytes,
            metadata,
            tensors,
            version,
        })
    }

    /// The file this was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A metadata value.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    /// A tensor's directory entry and a view of its bytes (bounds-checked at parse time).
    pub(crate) fn tensor_bytes(&self, name: &str) -> Result<(&TensorInfo, Bytes)> {
        let info = self
            .tensors
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor(name.to_string()))?;
        let bytes = self
            .bytes
            .slice(info.offset..info.offset + info.size)
            .ok_or_else(|| ModelError::Corrupt {
                path: self.path.clone(),
                format: "GGUF",
                detail: format!("tensor `{name}` lies outside the file"),
            })?;
        Ok((info, bytes))
    }

    /// Whether the tensor data is used in place from a file mapping.
    pub fn is_mapped(&self) -> bool {
        self.bytes.is_mapped()
    }

    /// A tensor dequantized to f32 values (norm weights, biases).
    pub fn f32_vec(&self, name: &str) -> Result<Vec<f32>> {
        let (info, bytes) = self.tensor_bytes(name)?;
        let wtype = WType::from_ggml(info.type_id).ok_or_else(|| ModelError::UnsupportedQuant {
            tensor: name.to_string(),
            kind: ggml_type_name(info.type_id),
        })?;
        let elems: usize = info.shape.iter().product();
        let mut out = vec![0f32; elems];
        let row = *info.shape.last().unwrap_or(&0);
        if row > 0 {
            let rb = wtype.row_bytes(row).unwrap_or(0);
            for (r, o) in out.chunks_exact_mut(row).enumerate() {
                dequantize_row(wtype, &bytes.as_slice()[r * rb..(r + 1) * rb], o);
            }
        }
        Ok(out)
    }
}
