//! The wire format: one ZMQ multipart message `[topic, seq, payload]` per batch, `seq` an 8-byte
//! big-endian counter from 0 per publisher, `payload` msgpack as msgspec encodes vLLM's
//! `KVEventBatch` (`vllm/distributed/kv_events.py`; SGLang's
//! `python/sglang/srt/disaggregation/kv_events.py` is the legacy layout of the same structs).
//!
//! Both layouts msgspec produces across engine versions are accepted:
//!
//! - **array-like** (SGLang, vLLM up to ~0.10): the batch is `[ts, [event, ...]]` or
//!   `[ts, [event, ...], data_parallel_rank]`, each event `[tag, field, field, ...]` in
//!   declaration order with trailing defaulted fields omitted (`omit_defaults`);
//! - **map** (vLLM since the struct options changed): the batch `{"ts", "events",
//!   "data_parallel_rank"?}` or still an array, each event `{"type": tag, field: value, ...}`.
//!
//! Field order of `BlockStored`: `block_hashes, parent_block_hash, token_ids, block_size,
//! lora_id, medium, lora_name, extra_keys, group_idx, kv_cache_spec_kind,
//! kv_cache_spec_sliding_window`; SGLang stops after `lora_id`. Only the first four are
//! required here; later fields an engine adds are ignored. `BlockRemoved` is `block_hashes,
//! medium, group_idx`; `AllBlocksCleared` has no fields. Block hashes are msgpack integers
//! (signed or unsigned, by version) or byte strings (vLLM's SHA-256 hashes); they are opaque
//! names here, compared for equality only.
//!
//! Everything here is pure and total: any input gives a batch or a [`DecodeError`] naming the
//! place (`events[2].token_ids[17]`) and what was wrong; nothing panics (fuzzed:
//! `crates/engine-events/fuzz`).

use std::fmt;

use rmpv::Value;

/// Nesting the decoder accepts; the schema's deepest value (`extra_keys`' tuples) is at 5, the
/// rest is a hostile payload's attempt at a deep recursion.
const MAX_DEPTH: usize = 32;

/// An engine's name for one of its KV blocks: opaque, compared for equality only.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EngineBlockHash {
    /// A msgpack integer (vLLM's 64-bit hashes, SGLang's): both signs, by engine version.
    Int(i128),
    /// A msgpack byte string (vLLM's SHA-256 block hashes).
    Bytes(Box<[u8]>),
}

impl fmt::Display for EngineBlockHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EngineBlockHash::Int(value) => write!(f, "{value}"),
            EngineBlockHash::Bytes(bytes) => {
                for byte in bytes.iter() {
                    write!(f, "{byte:02x}")?;
                }
                Ok(())
            }
        }
    }
}

/// One decoded batch.
#[derive(Debug, Clone, PartialEq)]
pub struct EventBatch {
    /// The engine's wall clock when it published the batch (seconds since the epoch).
    pub ts: f64,
    /// The events, in the order the engine's cache saw them.
    pub events: Vec<EngineEvent>,
    /// The publishing data-parallel rank, where the engine says.
    pub data_parallel_rank: Option<i64>,
}

/// One engine KV cache event.
#[derive(Debug, Clone, PartialEq)]
pub enum EngineEvent {
    /// Full blocks entered the cache.
    BlockStored(BlockStored),
    /// Blocks left the cache.
    BlockRemoved(BlockRemoved),
    /// The engine dropped its whole prefix cache.
    AllBlocksCleared,
}

/// `BlockStored`: a chain of full blocks, each the child of the one before, the first the child
/// of `parent` (`None`: the chain starts a prompt).
#[derive(Debug, Clone, PartialEq)]
pub struct BlockStored {
    /// The blocks' engine hashes, in prompt order.
    pub block_hashes: Vec<EngineBlockHash>,
    /// The engine hash of the block before the first one.
    pub parent: Option<EngineBlockHash>,
    /// The blocks' tokens, `block_size` per block, concatenated.
    pub token_ids: Vec<u32>,
    /// Tokens per engine block.
    pub block_size: u32,
    /// The LoRA adapter the blocks were computed with (deprecated by vLLM for `lora_name`).
    pub lora_id: Option<i64>,
    /// Where the blocks are (`"GPU"`, `"CPU"`, …; absent means GPU).
    pub medium: Option<String>,
    /// The LoRA adapter's name.
    pub lora_name: Option<String>,
    /// Per block: whether the engine hashed more than tokens into it (multimodal inputs, LoRA,
    /// `cache_salt`). Empty when the engine sent no `extra_keys`.
    pub extra_keys: Vec<bool>,
    /// The KV cache group (hybrid models have several; absent means the only one).
    pub group_idx: Option<i64>,
}

/// `BlockRemoved`.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockRemoved {
    /// The evicted blocks' engine hashes.
    pub block_hashes: Vec<EngineBlockHash>,
    /// Where they were evicted from (absent means GPU).
    pub medium: Option<String>,
    /// The KV cache group.
    pub group_idx: Option<i64>,
}

/// What was wrong with a message, and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The multipart message did not have the publisher's three frames.
    #[error("expected 3 frames [topic, seq, payload], got {0}")]
    FrameCount(usize),
    /// The sequence frame was not 8 bytes.
    #[error("sequence number frame is {0} bytes, expected 8 (big-endian u64)")]
    SeqLength(usize),
    /// The payload is not msgpack, or is cut short.
    #[error("payload is not valid msgpack: {0}")]
    Msgpack(String),
    /// Bytes follow the batch.
    #[error("{0} bytes after the end of the batch")]
    TrailingBytes(usize),
    /// A value of the wrong type.
    #[error("{at}: expected {expected}, found {found}")]
    Type {
        /// Where.
        at: String,
        /// What the schema has there.
        expected: &'static str,
        /// What the payload had.
        found: &'static str,
    },
    /// A required field is missing.
    #[error("{at}: missing field `{field}`")]
    Missing {
        /// The struct.
        at: String,
        /// The field.
        field: &'static str,
    },
    /// An event tag none of the engines sends.
    #[error("{at}: unknown event type {tag:?}")]
    UnknownEvent {
        /// Where.
        at: String,
        /// The tag.
        tag: String,
    },
    /// A number outside its field's range.
    #[error("{at}: {value} is out of range ({range})")]
    Range {
        /// Where.
        at: String,
        /// The value as sent.
        value: String,
        /// The accepted range.
        range: &'static str,
    },
    /// `token_ids` is not `block_size` tokens for each block.
    #[error(
        "{at}: {tokens} token ids for {blocks} blocks of {block_size} tokens (expected {expected})"
    )]
    TokenCount {
        /// The event.
        at: String,
        /// `len(token_ids)`.
        tokens: usize,
        /// `len(block_hashes)`.
        blocks: usize,
        /// `block_size`.
        block_size: u32,
        /// `blocks * block_size`.
        expected: u64,
    },
    /// `extra_keys` is not one entry per block.
    #[error("{at}: {entries} extra_keys entries for {blocks} blocks")]
    ExtraKeysCount {
        /// The event.
        at: String,
        /// Entries sent.
        entries: usize,
        /// Blocks in the event.
        blocks: usize,
    },
}

/// The batch's sequence number from its 8-byte big-endian frame.
pub fn decode_seq(frame: &[u8]) -> Result<u64, DecodeError> {
    let bytes: [u8; 8] = frame
        .try_into()
        .map_err(|_| DecodeError::SeqLength(frame.len()))?;
    Ok(u64::from_be_bytes(bytes))
}

/// Splits a publisher's multipart message into its sequence number and payload (the topic is
/// the subscription's business, not checked here).
pub fn decode_message<B: AsRef<[u8]>>(frames: &[B]) -> Result<(u64, &[u8]), DecodeError> {
    let [_topic, seq, payload] = frames else {
        return Err(DecodeError::FrameCount(frames.len()));
    };
    Ok((decode_seq(seq.as_ref())?, payload.as_ref()))
}

/// Decodes one batch payload.
pub fn decode_batch(payload: &[u8]) -> Result<EventBatch, DecodeError> {
    let mut reader = payload;
    let value = rmpv::decode::read_value_with_max_depth(&mut reader, MAX_DEPTH)
        .map_err(|e| DecodeError::Msgpack(e.to_string()))?;
    if !reader.is_empty() {
        return Err(DecodeError::TrailingBytes(reader.len()));
    }
    batch(value)
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Nil => "nil",
        Value::Boolean(_) => "bool",
        Value::Integer(_) => "integer",
        Value::F32(_) | Value::F64(_) => "float",
        Value::String(_) => "string",
        Value::Binary(_) => "bytes",
        Value::Array(_) => "array",
        Value::Map(_) => "map",
        Value::Ext(..) => "ext",
    }
}

fn type_error(at: &str, expected: &'static str, value: &Value) -> DecodeError {
    DecodeError::Type {
        at: at.to_owned(),
        expected,
        found: type_name(value),
    }
}

/// A struct's fields as msgspec sent them: positionally (array-like) or by name (map).
enum Fields {
    Positional(Vec<Value>),
    Named(Vec<(Value, Value)>),
}

impl Fields {
    /// Takes field `name`, at `index` in the array-like layout. `None` when absent (a trailing
    /// default omitted, or a field this engine version does not have).
    fn take(&mut self, index: usize, name: &str) -> Option<Value> {
        match self {
            Fields::Positional(values) => values
                .get_mut(index)
                .map(|value| std::mem::replace(value, Value::Nil)),
            Fields::Named(entries) => entries
                .iter_mut()
                .find(|(key, _)| key.as_str() == Some(name))
                .map(|(_, value)| std::mem::replace(value, Value::Nil)),
        }
    }

    fn required(
        &mut self,
        at: &str,
        index: usize,
        field: &'static str,
    ) -> Result<Value, DecodeError> {
        self.take(index, field).ok_or_else(|| DecodeError::Missing {
            at: at.to_owned(),
            field,
        })
    }

    /// An optional field: absent and nil both mean `None`.
    fn optional(&mut self, index: usize, name: &str) -> Option<Value> {
        self.take(index, name).filter(|value| !value.is_nil())
    }
}

fn batch(value: Value) -> Result<EventBatch, DecodeError> {
    let mut fields = match value {
        Value::Array(values) => Fields::Positional(values),
        Value::Map(entries) => Fields::Named(entries),
        other => return Err(type_error("batch", "array or map", &other)),
    };
    let ts = match fields.required("batch", 0, "ts")? {
        Value::F64(ts) => ts,
        Value::F32(ts) => f64::from(ts),
        // msgspec writes a float as a float, but a hand-made publisher may send whole seconds.
        Value::Integer(ts) => ts.as_f64().unwrap_or(0.0),
        other => return Err(type_error("batch.ts", "float", &other)),
    };
    let events = match fields.required("batch", 1, "events")? {
        Value::Array(events) => events,
        other => return Err(type_error("batch.events", "array", &other)),
    };
    let data_parallel_rank = fields
        .optional(2, "data_parallel_rank")
        .map(|value| int(&value, "batch.data_parallel_rank"))
        .transpose()?;
    let events = events
        .into_iter()
        .enumerate()
        .map(|(i, event)| self::event(event, &format!("events[{i}]")))
        .collect::<Result<_, _>>()?;
    Ok(EventBatch {
        ts,
        events,
        data_parallel_rank,
    })
}

fn event(value: Value, at: &str) -> Result<EngineEvent, DecodeError> {
    // Array-like: the tag is element 0 and fields follow. Map: the tag is the "type" entry.
    let (tag, mut fields) = match value {
        Value::Array(mut values) => {
            if values.is_empty() {
                return Err(DecodeError::Missing {
                    at: at.to_owned(),
                    field: "type",
                });
            }
            let tag = values.remove(0);
            (tag, Fields::Positional(values))
        }
        Value::Map(entries) => {
            let mut fields = Fields::Named(entries);
            let tag = fields.required(at, 0, "type")?;
            (tag, fields)
        }
        other => return Err(type_error(at, "array or map", &other)),
    };
    let tag = match tag {
        Value::String(tag) => tag.into_str().ok_or_else(|| DecodeError::Type {
            at: format!("{at}.type"),
            expected: "UTF-8 string",
            found: "invalid UTF-8",
        })?,
        other => return Err(type_error(&format!("{at}.type"), "string", &other)),
    };
    match tag.as_str() {
        "BlockStored" => {
            let block_hashes = hashes(fields.required(at, 0, "block_hashes")?, at)?;
            let parent = fields
                .take(1, "parent_block_hash")
                .filter(|value| !value.is_nil())
                .map(|value| hash(value, || format!("{at}.parent_block_hash")))
                .transpose()?;
            // `parent_block_hash` has no default, so msgspec always writes it; a payload
            // without it has lost fields.
            let token_ids = match fields.required(at, 2, "token_ids")? {
                Value::Array(tokens) => tokens
                    .iter()
                    .enumerate()
                    // The place is formatted only for an error: a batch carries thousands.
                    .map(|(n, token)| match token.as_u64().map(u32::try_from) {
                        Some(Ok(token)) => Ok(token),
                        _ => u32_field(token, &format!("{at}.token_ids[{n}]")),
                    })
                    .collect::<Result<Vec<_>, _>>()?,
                other => return Err(type_error(&format!("{at}.token_ids"), "array", &other)),
            };
            let block_size = u32_field(
                &fields.required(at, 3, "block_size")?,
                &format!("{at}.block_size"),
            )?;
            if block_size == 0 {
                return Err(DecodeError::Range {
                    at: format!("{at}.block_size"),
                    value: "0".to_owned(),
                    range: "1..=4294967295",
                });
            }
            let expected = block_hashes.len() as u64 * u64::from(block_size);
            if token_ids.len() as u64 != expected {
                return Err(DecodeError::TokenCount {
                    at: at.to_owned(),
                    tokens: token_ids.len(),
                    blocks: block_hashes.len(),
                    block_size,
                    expected,
                });
            }
            let lora_id = fields
                .optional(4, "lora_id")
                .map(|value| int(&value, &format!("{at}.lora_id")))
                .transpose()?;
            let medium = fields
                .optional(5, "medium")
                .map(|value| string(value, &format!("{at}.medium")))
                .transpose()?;
            let lora_name = fields
                .optional(6, "lora_name")
                .map(|value| string(value, &format!("{at}.lora_name")))
                .transpose()?;
            let extra_keys = match fields.optional(7, "extra_keys") {
                None => Vec::new(),
                Some(Value::Array(entries)) => {
                    if entries.len() != block_hashes.len() {
                        return Err(DecodeError::ExtraKeysCount {
                            at: at.to_owned(),
                            entries: entries.len(),
                            blocks: block_hashes.len(),
                        });
                    }
                    entries.iter().map(|entry| !entry.is_nil()).collect()
                }
                Some(other) => {
                    return Err(type_error(&format!("{at}.extra_keys"), "array", &other));
                }
            };
            let group_idx = fields
                .optional(8, "group_idx")
                .map(|value| int(&value, &format!("{at}.group_idx")))
                .transpose()?;
            Ok(EngineEvent::BlockStored(BlockStored {
                block_hashes,
                parent,
                token_ids,
                block_size,
                lora_id,
                medium,
                lora_name,
                extra_keys,
                group_idx,
            }))
        }
        "BlockRemoved" => {
            let block_hashes = hashes(fields.required(at, 0, "block_hashes")?, at)?;
            let medium = fields
                .optional(1, "medium")
                .map(|value| string(value, &format!("{at}.medium")))
                .transpose()?;
            let group_idx = fields
                .optional(2, "group_idx")
                .map(|value| int(&value, &format!("{at}.group_idx")))
                .transpose()?;
            Ok(EngineEvent::BlockRemoved(BlockRemoved {
                block_hashes,
                medium,
                group_idx,
            }))
        }
        "AllBlocksCleared" => Ok(EngineEvent::AllBlocksCleared),
        _ => Err(DecodeError::UnknownEvent {
            at: at.to_owned(),
            tag,
        }),
    }
}

fn hashes(value: Value, at: &str) -> Result<Vec<EngineBlockHash>, DecodeError> {
    match value {
        Value::Array(values) => values
            .into_iter()
            .enumerate()
            .map(|(n, value)| hash(value, || format!("{at}.block_hashes[{n}]")))
            .collect(),
        other => Err(type_error(&format!("{at}.block_hashes"), "array", &other)),
    }
}

/// `at` is called only for an error: a batch carries thousands of hashes.
fn hash(value: Value, at: impl FnOnce() -> String) -> Result<EngineBlockHash, DecodeError> {
    match value {
        Value::Integer(n) => n
            .as_i64()
            .map(i128::from)
            .or_else(|| n.as_u64().map(i128::from))
            .map(EngineBlockHash::Int)
            .ok_or_else(|| type_error(&at(), "integer or bytes", &Value::Integer(n))),
        Value::Binary(bytes) => Ok(EngineBlockHash::Bytes(bytes.into_boxed_slice())),
        other => Err(type_error(&at(), "integer or bytes", &other)),
    }
}

fn int(value: &Value, at: &str) -> Result<i64, DecodeError> {
    match value {
        Value::Integer(n) => n.as_i64().ok_or_else(|| DecodeError::Range {
            at: at.to_owned(),
            value: n.to_string(),
            range: "a signed 64-bit integer",
        }),
        other => Err(type_error(at, "integer", other)),
    }
}

fn u32_field(value: &Value, at: &str) -> Result<u32, DecodeError> {
    match value {
        Value::Integer(n) => n
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| DecodeError::Range {
                at: at.to_owned(),
                value: n.to_string(),
                range: "0..=4294967295",
            }),
        other => Err(type_error(at, "integer", other)),
    }
}

fn string(value: Value, at: &str) -> Result<String, DecodeError> {
    match value {
        Value::String(s) => s.into_str().ok_or_else(|| DecodeError::Type {
            at: at.to_owned(),
            expected: "UTF-8 string",
            found: "invalid UTF-8",
        }),
        other => Err(type_error(at, "string", &other)),
    }
}

#[cfg(test)]
mod tests {
    use rmpv::Value;

    use super::*;
    use crate::encode::{Flavor, encode_batch};

    fn sample() -> EventBatch {
        EventBatch {
            ts: 1765000000.5,
            events: vec![
                EngineEvent::BlockStored(BlockStored {
                    block_hashes: vec![
                        EngineBlockHash::Int(-5),
                        EngineBlockHash::Int(i128::from(u64::MAX)),
                    ],
                    parent: Some(EngineBlockHash::Bytes(vec![1, 2, 3].into_boxed_slice())),
                    token_ids: (0..8).collect(),
                    block_size: 4,
                    lora_id: None,
                    medium: Some("GPU".into()),
                    lora_name: None,
                    extra_keys: vec![false, true],
                    group_idx: Some(0),
                }),
                EngineEvent::BlockRemoved(BlockRemoved {
                    block_hashes: vec![EngineBlockHash::Int(7)],
                    medium: None,
                    group_idx: None,
                }),
                EngineEvent::AllBlocksCleared,
            ],
            data_parallel_rank: Some(0),
        }
    }

    #[test]
    fn every_flavor_round_trips() {
        let batch = sample();
        for flavor in [Flavor::VllmMap, Flavor::VllmArrayLike] {
            assert_eq!(decode_batch(&encode_batch(&batch, flavor)).unwrap(), batch);
        }
        // SGLang's structs stop at `lora_id` and carry no rank.
        let back = decode_batch(&encode_batch(&batch, Flavor::Sglang)).unwrap();
        let EngineEvent::BlockStored(stored) = &back.events[0] else {
            panic!("{back:?}")
        };
        assert_eq!(stored.medium, None);
        assert!(stored.extra_keys.is_empty());
        assert_eq!(back.data_parallel_rank, None);
        assert_eq!(back.events.len(), 3);
    }

    #[test]
    fn an_array_batch_of_map_events_decodes() {
        // vLLM releases between the two layouts: the batch still array-like, events maps.
        let event = Value::Map(vec![
            (Value::from("type"), Value::from("BlockRemoved")),
            (
                Value::from("block_hashes"),
                Value::Array(vec![Value::from(9)]),
            ),
            (Value::from("medium"), Value::from("CPU")),
        ]);
        let payload = encode(Value::Array(vec![
            Value::F64(2.0),
            Value::Array(vec![event]),
            Value::from(1),
        ]));
        assert_eq!(
            decode_batch(&payload).unwrap(),
            EventBatch {
                ts: 2.0,
                events: vec![EngineEvent::BlockRemoved(BlockRemoved {
                    block_hashes: vec![EngineBlockHash::Int(9)],
                    medium: Some("CPU".into()),
                    group_idx: None,
                })],
                data_parallel_rank: Some(1),
            }
        );
    }

    fn encode(value: Value) -> Vec<u8> {
        let mut bytes = Vec::new();
        rmpv::encode::write_value(&mut bytes, &value).unwrap();
        bytes
    }

    fn stored(fields: Vec<Value>) -> Vec<u8> {
        let mut event = vec![Value::from("BlockStored")];
        event.extend(fields);
        encode(Value::Array(vec![
            Value::F64(1.0),
            Value::Array(vec![Value::Array(event)]),
        ]))
    }

    fn ints(values: &[i64]) -> Value {
        Value::Array(values.iter().map(|v| Value::from(*v)).collect())
    }

    #[test]
    fn malformed_payloads_name_the_place() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (vec![], "payload is not valid msgpack"),
            (vec![0x92, 0xcb], "payload is not valid msgpack"),
            (
                encode(Value::from(3)),
                "batch: expected array or map, found integer",
            ),
            (encode(Value::Array(vec![])), "batch: missing field `ts`"),
            (
                encode(Value::Array(vec![Value::from("x"), Value::Array(vec![])])),
                "batch.ts: expected float, found string",
            ),
            (
                encode(Value::Array(vec![
                    Value::F64(1.0),
                    Value::Array(vec![Value::Array(vec![Value::from("Exploded")])]),
                ])),
                "events[0]: unknown event type \"Exploded\"",
            ),
            (
                stored(vec![
                    ints(&[1]),
                    Value::Nil,
                    ints(&[1, 2, 3]),
                    Value::from(4),
                ]),
                "events[0]: 3 token ids for 1 blocks of 4 tokens (expected 4)",
            ),
            (
                stored(vec![
                    ints(&[1]),
                    Value::Nil,
                    ints(&[1, -2, 3, 4]),
                    Value::from(4),
                ]),
                "events[0].token_ids[1]: -2 is out of range",
            ),
            (
                stored(vec![ints(&[1]), Value::Nil, ints(&[]), Value::from(0)]),
                "events[0].block_size: 0 is out of range",
            ),
            (
                stored(vec![ints(&[1]), Value::Nil, ints(&[1])]),
                "events[0]: missing field `block_size`",
            ),
            (
                stored(vec![
                    Value::Array(vec![Value::F64(1.0)]),
                    Value::Nil,
                    ints(&[1]),
                    Value::from(1),
                ]),
                "events[0].block_hashes[0]: expected integer or bytes, found float",
            ),
            (
                stored(vec![
                    ints(&[1]),
                    Value::Nil,
                    ints(&[1]),
                    Value::from(1),
                    Value::Nil,
                    Value::from(5),
                ]),
                "events[0].medium: expected string, found integer",
            ),
            (
                stored(vec![
                    ints(&[1, 2]),
                    Value::Nil,
                    ints(&[1, 2]),
                    Value::from(1),
                    Value::Nil,
                    Value::Nil,
                    Value::Nil,
                    Value::Array(vec![Value::Nil]),
                ]),
                "events[0]: 1 extra_keys entries for 2 blocks",
            ),
        ];
        for (bytes, message) in cases {
            let error = decode_batch(&bytes).unwrap_err().to_string();
            assert!(
                error.starts_with(message),
                "{error:?} does not start with {message:?}"
            );
        }
        let mut trailing = encode_batch(&sample(), Flavor::VllmMap);
        trailing.push(0);
        assert_eq!(decode_batch(&trailing), Err(DecodeError::TrailingBytes(1)));
        // Nesting deeper than the schema's is refused, not recursed into.
        let mut deep = vec![0x91; 100_000];
        deep.push(0xc0);
        assert!(matches!(decode_batch(&deep), Err(DecodeError::Msgpack(_))));
        // A declared length far beyond the input is not allocated up front.
        assert!(matches!(
            decode_batch(&[0xdd, 0xff, 0xff, 0xff, 0xff]),
            Err(DecodeError::Msgpack(_))
        ));
    }

    #[test]
    fn message_frames() {
        let seq = 7u64.to_be_bytes();
        let frames: [&[u8]; 3] = [b"", &seq, b"payload"];
        assert_eq!(decode_message(&frames), Ok((7, &b"payload"[..])));
        assert_eq!(
            decode_message(&frames[..2]),
            Err(DecodeError::FrameCount(2))
        );
        let short: [&[u8]; 3] = [b"", &seq[..7], b""];
        assert_eq!(decode_message(&short), Err(DecodeError::SeqLength(7)));
    }
}
