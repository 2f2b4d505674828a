//! Text ⇄ token ids, with the same splits llama.cpp and Hugging Face produce.
//!
//! Two sources: a Hugging Face `tokenizer.json` (loaded as is), or the vocabulary inside a GGUF
//! file, from which this module builds an equivalent `tokenizers` pipeline:
//! - `gpt2` (byte-level BPE): tokens + merges, llama.cpp's pre-tokenizer regexes for the file's
//!   `tokenizer.ggml.pre` type, byte-level decoding;
//! - `llama` (SentencePiece BPE, e.g. Gemma): merges derived from the token scores (a merge's
//!   priority is the score of the piece it produces, which is what SentencePiece's BPE does),
//!   spaces escaped as `▁`, byte fallback.
//!
//! Control tokens (`<|im_start|>`, `<bos>`) are parsed out of prompt text, as the chat template
//! relies on; user-defined tokens (Gemma's runs of spaces/newlines) always are.

use std::collections::HashMap;
use std::path::Path;

use tokenizers::AddedToken;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::normalizers::replace::Replace;
use tokenizers::normalizers::{NormalizerWrapper, Prepend, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel as ByteLevelPre;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::tokenizer::SplitDelimiterBehavior;

use crate::error::{ModelError, Result};
use crate::gguf::{GgufFile, Value};

const GPT2_REGEX: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
const LLAMA3_REGEX: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)";
const QWEN2_REGEX: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)";

/// llama.cpp's pre-tokenizer regexes (applied in order, each splitting the pieces of the last)
/// for a `tokenizer.ggml.pre` value, and whether whole words in the vocabulary skip merging.
fn pre_tokenizer_regexes(pre: &str) -> Option<(Vec<&'static str>, bool)> {
    Some(match pre {
        "gpt2" | "gpt-2" | "phi-2" | "jina-es" | "jina-de" | "olmo" | "jais" | "roberta-bpe" => {
            (vec![GPT2_REGEX], false)
        }
        "default" => (
            vec![
                r"[\p{P}\$\+<=>\^~\|]+",
                GPT2_REGEX,
                r"\p{N}+",
                r"[0-9][0-9][0-9]",
            ],
            false,
        ),
        "llama3" | "llama-bpe" | "llama-v3" | "smaug-bpe" | "dbrx" | "falcon3" | "pixtral" => {
            (vec![LLAMA3_REGEX], true)
        }
        "qwen2" | "deepseek-r1-qwen" | "stablelm2" | "hunyuan" | "megrez" => {
            (vec![QWEN2_REGEX], false)
        }
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b" => {
            (vec![r"\p{N}", GPT2_REGEX], false)
        }
        _ => return None,
    })
}

/// A tokenizer plus the ids the engine needs (BOS, EOS) and how prompts start.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos_id: Option<u32>,
    eos_ids: Vec<u32>,
    /// Prepend BOS ourselves (GGUF: `tokenizer.ggml.add_bos_token`); a `tokenizer.json`
    /// carries its own post-processor instead.
    prepend_bos: bool,
    /// Vocabulary size, added tokens included.
    vocab_size: usize,
}

fn tok_err(e: impl std::fmt::Display) -> ModelError {
    ModelError::Tokenizer(e.to_string())
}

fn meta_strings<'a>(file: &'a GgufFile, key: &str) -> Result<Vec<&'a str>> {
    let arr = file
        .get(key)
        .and_then(Value::as_array)
        .ok_or_else(|| ModelError::Metadata {
            key: key.into(),
            detail: "missing or not an array".into(),
        })?;
    arr.iter()
        .map(|v| {
            v.as_str().ok_or_else(|| ModelError::Metadata {
                key: key.into(),
                detail: "has a non-string element".into(),
            })
        })
        .collect()
}

fn meta_u32(file: &GgufFile, key: &str) -> Option<u32> {
    file.get(key)
        .and_then(Value::as_u64)
        .and_then(|v| u32::try_from(v).ok())
}

impl Tokenizer {
    /// Builds the tokenizer a GGUF file describes.
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let model = file
            .get("tokenizer.ggml.model")
            .and_then(Value::as_str)
            .ok_or_else(|| ModelError::Metadata {
                key: "tokenizer.ggml.model".into(),
                detail: "missing".into(),
            })?;
        let tokens = meta_strings(file, "tokenizer.ggml.tokens")?;
        let types: Vec<u64> = match file.get("tokenizer.ggml.token_type") {
            Some(Value::Array(a)) => a.iter().map(|v| v.as_u64().unwrap_or(1)).collect(),
            _ => vec![1; tokens.len()],
        };
        if types.len() != tokens.len() {
            return Err(ModelError::Metadata {
                key: "tokenizer.ggml.token_type".into(),
                detail: format!("{} types for {} tokens", types.len(), tokens.len()),
            });
        }
        let vocab: Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.to_string(), i as u32))
            .collect();
        let add_space_prefix = file
            .get("tokenizer.ggml.add_space_prefix")
            .and_then(Value::as_bool);
        let mut inner = match model {
            "gpt2" => {
                let merges: Vec<(String, String)> = meta_strings(file, "tokenizer.ggml.merges")?
                    .into_iter()
                    .map(|m| {
                        m.split_once(' ')
                            .map(|(a, b)| (a.to_string(), b.to_string()))
                            .ok_or_else(|| ModelError::Metadata {
                                key: "tokenizer.ggml.merges".into(),
                                detail: format!("merge `{m}` has no space"),
                            })
                    })
                    .collect::<Result<_>>()?;
                let pre = file
                    .get("tokenizer.ggml.pre")
                    .and_then(Value::as_str)
                    .unwrap_or("default");
                let (regexes, ignore_merges) =
                    pre_tokenizer_regexes(pre).ok_or_else(|| ModelError::Metadata {
                        key: "tokenizer.ggml.pre".into(),
                        detail: format!("unsupported pre-tokenizer `{pre}`"),
                    })?;
                let bpe = BPE::builder()
                    .vocab_and_merges(vocab, merges)
                    .ignore_merges(ignore_merges)
                    .build()
                    .map_err(tok_err)?;
                let mut t = tokenizers::Tokenizer::new(bpe);
                let mut steps: Vec<PreTokenizerWrapper> = Vec::new();
                for r in regexes {
                    let split = Split::new(
                        SplitPattern::Regex(r.to_string()),
                        SplitDelimiterBehavior::Isolated,
                        false,
                    )
                    .map_err(tok_err)?;
                    steps.push(split.into());
                }
                steps.push(ByteLevelPre::new(false, false, false).into());
                t.with_pre_tokenizer(Some(PreSequence::new(steps)));
                t.with_decoder(Some(ByteLevelDecoder::new(false, false, false)));
                t
            }
            "llama" => {
                let scores: Vec<f32> = match file.get("tokenizer.ggml.scores") {
                    Some(Value::Array(a)) => {
                        a.iter().map(|v| v.as_f64().unwrap_or(0.0) as f32).collect()
                    }
                    _ => {
                        return Err(ModelError::Metadata {
                            key: "tokenizer.ggml.scores".into(),
                            detail: "missing (needed by SentencePiece BPE)".into(),
                        });
                    }
                };
                let merges = spm_merges(&tokens, &types, &scores);
                let unk = meta_u32(file, "tokenizer.ggml.unknown_token_id")
                    .and_then(|id| tokens.get(id as usize))
                    .map(|s| s.to_string());
                let mut builder = BPE::builder()
                    .vocab_and_merges(vocab, merges)
                    .byte_fallback(true)
                    .fuse_unk(true);
                if let Some(unk) = unk {
                    builder = builder.unk_token(unk);
                }
                let bpe = builder.build().map_err(tok_err)?;
                let mut t = tokenizers::Tokenizer::new(bpe);
                let mut norm: Vec<NormalizerWrapper> = Vec::new();
                if add_space_prefix.unwrap_or(true) {
                    norm.push(Prepend::new("▁".into()).into());
                }
                norm.push(Replace::new(" ", "▁").map_err(tok_err)?.into());
                t.with_normalizer(Some(NormalizerSequence::new(norm)))
                    .map_err(tok_err)?;
                t.with_decoder(Some(DecoderSequence::new(vec![
                    DecoderWrapper::Replace(Replace::new("▁", " ").map_err(tok_err)?),
                    ByteFallback::new().into(),
                    Fuse::new().into(),
                ])));
                t
            }
            other => {
                return Err(ModelError::Metadata {
                    key: "tokenizer.ggml.model".into(),
                    detail: format!(
                        "unsupported tokenizer model `{other}` (supported: gpt2, llama)"
                    ),
                });
            }
        };
        // Control tokens are "special" (skipped in display decoding, parsed in prompts);
        // user-defined ones are ordinary text that must still be matched whole.
        let mut specials = Vec::new();
        let mut user = Vec::new();
        for (&t, &ty) in tokens.iter().zip(&types) {
            match ty {
                3 => specials.push(AddedToken::from(t.to_string(), true).normalized(false)),
                4 => user.push(AddedToken::from(t.to_string(), false).normalized(false)),
                _ => {}
            }
        }
        inner.add_special_tokens(specials).map_err(tok_err)?;
        inner.add_tokens(user).map_err(tok_err)?;
        let bos_id = meta_u32(file, "tokenizer.ggml.bos_token_id");
        let mut eos_ids: Vec<u32> = meta_u32(file, "tokenizer.ggml.eos_token_id")
            .into_iter()
            .collect();
        if let Some(eot) = meta_u32(file, "tokenizer.ggml.eot_token_id")
            && !eos_ids.contains(&eot)
        {
            eos_ids.push(eot);
        }
        let prepend_bos = file
            .get("tokenizer.ggml.add_bos_token")
            .and_then(Value::as_bool)
            .unwrap_or(model == "llama");
        Ok(Self {
            inner,
            bos_id,
            eos_ids,
            prepend_bos,
            vocab_size: tokens.len(),
        })
    }

    /// Loads `tokenizer.json`, with BOS/EOS from `tokenizer_config.json` and
    /// `generation_config.json` when present in the same directory.
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Err(ModelError::Io {
                path,
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no tokenizer.json"),
            });
        }
        let inner = tokenizers::Tokenizer::from_file(&path).map_err(|e| ModelError::Corrupt {
            path: path.clone(),
            format: "tokenizer.json",
            detail: e.to_string(),
        })?;
        let cfg = read_json(&dir.join("tokenizer_config.json"))?;
        let token_of = |v: Option<&serde_json::Value>| -> Option<u32> {
            let text = match v? {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Object(o) => o.get("content")?.as_str()?.to_string(),
                _ => return None,
            };
            inner.token_to_id(&text)
        };
        let bos_id = cfg.as_ref().and_then(|c| token_of(c.get("bos_token")));
        let mut eos_ids: Vec<u32> = cfg
            .as_ref()
            .and_then(|c| token_of(c.get("eos_token")))
            .into_iter()
            .collect();
        if let Some(gen_cfg) = read_json(&dir.join("generation_config.json"))? {
            let ids: Vec<u32> = match gen_cfg.get("eos_token_id") {
                Some(serde_json::Value::Number(n)) => {
                    n.as_u64().map(|v| v as u32).into_iter().collect()
                }
                Some(serde_json::Value::Array(a)) => a
                    .iter()
                    .filter_map(|v| v.as_u64().map(|v| v as u32))
                    .collect(),
                _ => Vec::new(),
            };
            for id in ids {
                if !eos_ids.contains(&id) {
                    eos_ids.push(id);
                }
            }
        }
        let vocab_size = inner.get_vocab_size(true);
        Ok(Self {
            inner,
            bos_id,
            eos_ids,
            prepend_bos: false,
            vocab_size,
        })
    }

    /// Token ids of `text`, parsing special tokens; with `add_special`, the BOS the model
    /// expects at the start of a sequence.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, add_special).map_err(tok_err)?;
        let ids = enc.get_ids();
        let mut out = Vec::with_capacity(ids.len() + 1);
        if add_special
            && self.prepend_bos
            && let Some(bos) = self.bos_id
        {
            out.push(bos);
        }
        out.extend_from_slice(ids);
        Ok(out)
    }

    /// The text of `ids`; `skip_special` drops control tokens such as `<|im_end|>`.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner.decode(ids, skip_special).map_err(tok_err)
    }

    /// The text one token decodes to on its own (for log-probability listings).
    pub fn token_text(&self, id: u32) -> String {
        self.inner.decode(&[id], false).unwrap_or_default()
    }

    /// The id of a token given its vocabulary string.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The vocabulary string of an id.
    pub fn token_str(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Beginning-of-sequence token.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    /// End-of-sequence tokens (EOS and, where the model has one, end-of-turn).
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    /// Whether `encode(_, true)` starts with BOS.
    pub fn adds_bos(&self) -> bool {
        self.prepend_bos
            || self.bos_id.is_some_and(|b| {
                self.inner
                    .encode("a", true)
                    .is_ok_and(|e| e.get_ids().first() == Some(&b))
            })
    }

    /// Vocabulary size, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// What every token id stands for, by id: the bytes it spells (the one byte table the
    /// frontend's detokenizer and the grammar's token trie share), or, for a special token
    /// (EOS, end of turn, chat markers), its name. Also says how the vocabulary spells bytes.
    pub fn token_pieces(&self) -> (Vec<TokenPiece>, PieceKind) {
        let inner = &self.inner;
        // The decoder says how pieces spell text; serialized, its type names are stable.
        let decoder = inner
            .get_decoder()
            .and_then(|d| serde_json::to_string(d).ok())
            .unwrap_or_default();
        let kind = if decoder.contains("\"ByteLevel\"") {
            PieceKind::ByteLevel
        } else {
            PieceKind::SentencePiece
        };
        let specials: std::collections::HashSet<u32> = inner
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special)
            .map(|(id, _)| id)
            .collect();
        let alphabet = byte_level_alphabet();
        let pieces = (0..self.vocab_size as u32)
            .map(|id| {
                let Some(piece) = inner.id_to_token(id) else {
                    return TokenPiece::Bytes(Box::default());
                };
                if specials.contains(&id) {
                    return TokenPiece::Special(piece);
                }
                let bytes: Vec<u8> = match kind {
                    PieceKind::ByteLevel => {
                        let mut out = Vec::with_capacity(piece.len());
                        for c in piece.chars() {
                            match alphabet.get(&c) {
                                Some(&b) => out.push(b),
                                // Not byte-level (an added, non-special token): as written.
                                None => out.extend_from_slice(c.to_string().as_bytes()),
                            }
                        }
                        out
                    }
                    PieceKind::SentencePiece => match sentencepiece_byte(&piece) {
                        Some(b) => vec![b],
                        None => piece.replace('\u{2581}', " ").into_bytes(),
                    },
                };
                TokenPiece::Bytes(bytes.into_boxed_slice())
            })
            .collect();
        (pieces, kind)
    }

    /// The underlying `tokenizers` tokenizer (for streaming decode).
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

/// What one token id stands for ([`Tokenizer::token_pieces`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenPiece {
    /// The bytes of text it spells.
    Bytes(Box<[u8]>),
    /// A special token, by name; it spells no text.
    Special(String),
}

/// How a vocabulary string spells bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PieceKind {
    /// GPT-2 byte-level BPE: every byte is one printable character (`Ġ` is a space).
    ByteLevel,
    /// SentencePiece: `▁` is a space, `<0xAB>` is a raw byte (byte fallback).
    SentencePiece,
}

/// GPT-2's `bytes_to_unicode`, inverted: the character that stands for each byte → the byte.
fn byte_level_alphabet() -> HashMap<char, u8> {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
    let mut map = HashMap::with_capacity(256);
    let mut n = 0;
    for b in 0u32..256 {
        let c = if printable(b) {
            b
        } else {
            n += 1;
            255 + n
        };
        if let Some(c) = char::from_u32(c) {
            map.insert(c, b as u8);
        }
    }
    map
}

fn sentencepiece_byte(piece: &str) -> Option<u8> {
    let hex = piece.strip_prefix("<0x")?.strip_suffix('>')?;
    (hex.len() == 2).then(|| u8::from_str_radix(hex, 16).ok())?
}

fn read_json(path: &Path) -> Result<Option<serde_json::Value>> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| ModelError::Corrupt {
                path: path.to_path_buf(),
                format: "JSON",
                detail: e.to_string(),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(ModelError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// SentencePiece BPE as BPE merges: every way of splitting a normal token into two tokens is
/// a merge, ranked by the score of the token it produces (higher first). Ties keep vocabulary
/// order, so the lower id wins, as in Hugging Face's converter.
fn spm_merges(tokens: &[&str], types: &[u64], scores: &[f32]) -> Vec<(String, String)> {
    let index: HashMap<&str, usize> = tokens.iter().enumerate().map(|(i, t)| (*t, i)).collect();
    let mut merges: Vec<(f32, usize, usize, String, String)> = Vec::new();
    for (id, &tok) in tokens.iter().enumerate() {
        if types.get(id) != Some(&1) {
            continue;
        }
        let score = scores.get(id).copied().unwrap_or(0.0);
        for (split, _) in tok.char_indices().skip(1) {
            let (l, r) = tok.split_at(split);
            if let (Some(&li), Some(&ri)) = (index.get(l), index.get(r)) {
                merges.push((score, li, ri, l.to_string(), r.to_string()));
            }
        }
    }
    merges.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    merges.into_iter().map(|(_, _, _, l, r)| (l, r)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_level_alphabet_covers_every_byte_once() {
        let alphabet = byte_level_alphabet();
        assert_eq!(alphabet.len(), 256);
        assert_eq!(alphabet.get(&'Ġ'), Some(&b' '));
        assert_eq!(alphabet.get(&'Ċ'), Some(&b'\n'));
        assert_eq!(alphabet.get(&'a'), Some(&b'a'));
        let mut bytes: Vec<u8> = alphabet.values().copied().collect();
        bytes.sort_unstable();
        bytes.dedup();
        assert_eq!(bytes.len(), 256);
    }

    #[test]
    fn sentencepiece_byte_pieces_parse() {
        assert_eq!(sentencepiece_byte("<0x0A>"), Some(b'\n'));
        assert_eq!(sentencepiece_byte("<0xE2>"), Some(0xe2));
        assert_eq!(sentencepiece_byte("<0xZZ>"), None);
        assert_eq!(sentencepiece_byte("<0x0>"), None);
        assert_eq!(sentencepiece_byte("hello"), None);
    }
}
