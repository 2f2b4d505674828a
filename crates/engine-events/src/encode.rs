//! Writes batches as the engines' msgspec encoders do: the inverse of [`crate::decode`], for the
//! recorded fixtures, tests and the mock publisher. Not used on the agent's path.

use rmpv::Value;

use crate::decode::{BlockRemoved, BlockStored, EngineBlockHash, EngineEvent, EventBatch};

/// Which engine version's struct options to imitate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    /// vLLM with `array_like=True` on the batch and the events (up to ~0.10): `[ts, events,
    /// dp_rank?]`, events `[tag, fields...]` with every field of the current structs.
    VllmArrayLike,
    /// vLLM with map-encoded structs: `{"ts", "events", "data_parallel_rank"?}`, events
    /// `{"type": tag, ...}`.
    VllmMap,
    /// SGLang: array-like, `BlockStored` up to `lora_id`, `BlockRemoved` hashes only, no rank.
    Sglang,
}

/// msgspec's encoding of one batch.
pub fn encode_batch(batch: &EventBatch, flavor: Flavor) -> Vec<u8> {
    let events = Value::Array(
        batch
            .events
            .iter()
            .map(|event| encode_event(event, flavor))
            .collect(),
    );
    let value = match flavor {
        Flavor::VllmArrayLike | Flavor::Sglang => {
            let mut fields = vec![Value::F64(batch.ts), events];
            if flavor == Flavor::VllmArrayLike
                && let Some(rank) = batch.data_parallel_rank
            {
                fields.push(Value::from(rank));
            }
            Value::Array(fields)
        }
        Flavor::VllmMap => {
            let mut entries = vec![
                (Value::from("ts"), Value::F64(batch.ts)),
                (Value::from("events"), events),
            ];
            if let Some(rank) = batch.data_parallel_rank {
                entries.push((Value::from("data_parallel_rank"), Value::from(rank)));
            }
            Value::Map(entries)
        }
    };
    let mut bytes = Vec::new();
    // Writing into a Vec cannot fail.
    let _ = rmpv::encode::write_value(&mut bytes, &value);
    bytes
}

fn hash_value(hash: &EngineBlockHash) -> Value {
    match hash {
        EngineBlockHash::Int(n) => match i64::try_from(*n) {
            Ok(n) => Value::from(n),
            Err(_) => u64::try_from(*n).map_or(Value::Nil, Value::from),
        },
        EngineBlockHash::Bytes(bytes) => Value::Binary(bytes.to_vec()),
    }
}

fn opt<T>(value: &Option<T>, f: impl Fn(&T) -> Value) -> Value {
    value.as_ref().map_or(Value::Nil, f)
}

/// Fields in declaration order, `None` for a defaulted field left at its default.
fn stored_fields(stored: &BlockStored) -> Vec<(&'static str, Option<Value>)> {
    vec![
        (
            "block_hashes",
            Some(Value::Array(
                stored.block_hashes.iter().map(hash_value).collect(),
            )),
        ),
        ("parent_block_hash", Some(opt(&stored.parent, hash_value))),
        (
            "token_ids",
            Some(Value::Array(
                stored.token_ids.iter().map(|t| Value::from(*t)).collect(),
            )),
        ),
        ("block_size", Some(Value::from(stored.block_size))),
        ("lora_id", Some(opt(&stored.lora_id, |n| Value::from(*n)))),
        (
            "medium",
            Some(opt(&stored.medium, |m| Value::from(m.as_str()))),
        ),
        (
            "lora_name",
            Some(opt(&stored.lora_name, |m| Value::from(m.as_str()))),
        ),
        (
            "extra_keys",
            (!stored.extra_keys.is_empty()).then(|| {
                Value::Array(
                    stored
                        .extra_keys
                        .iter()
                        .map(|&has| {
                            if has {
                                // What vLLM puts there for a salted block: a tuple of keys.
                                Value::Array(vec![Value::from("salt")])
                            } else {
                                Value::Nil
                            }
                        })
                        .collect(),
                )
            }),
        ),
        ("group_idx", stored.group_idx.map(Value::from)),
    ]
}

fn removed_fields(removed: &BlockRemoved) -> Vec<(&'static str, Option<Value>)> {
    vec![
        (
            "block_hashes",
            Some(Value::Array(
                removed.block_hashes.iter().map(hash_value).collect(),
            )),
        ),
        (
            "medium",
            Some(opt(&removed.medium, |m| Value::from(m.as_str()))),
        ),
        ("group_idx", removed.group_idx.map(Value::from)),
    ]
}

fn encode_event(event: &EngineEvent, flavor: Flavor) -> Value {
    let (tag, mut fields) = match event {
        EngineEvent::BlockStored(stored) => ("BlockStored", stored_fields(stored)),
        EngineEvent::BlockRemoved(removed) => ("BlockRemoved", removed_fields(removed)),
        EngineEvent::AllBlocksCleared => ("AllBlocksCleared", Vec::new()),
    };
    if flavor == Flavor::Sglang {
        let keep = match event {
            EngineEvent::BlockStored(_) => 5,
            _ => 1,
        };
        fields.truncate(keep);
    }
    match flavor {
        Flavor::VllmArrayLike | Flavor::Sglang => {
            // omit_defaults drops trailing defaulted fields only: a defaulted field before a set
            // one is written as nil.
            while fields.last().is_some_and(|(_, value)| value.is_none()) {
                fields.pop();
            }
            let mut values = vec![Value::from(tag)];
            values.extend(
                fields
                    .into_iter()
                    .map(|(_, value)| value.unwrap_or(Value::Nil)),
            );
            Value::Array(values)
        }
        Flavor::VllmMap => {
            let mut entries = vec![(Value::from("type"), Value::from(tag))];
            entries.extend(
                fields
                    .into_iter()
                    .filter_map(|(name, value)| value.map(|value| (Value::from(name), value))),
            );
            Value::Map(entries)
        }
    }
}
