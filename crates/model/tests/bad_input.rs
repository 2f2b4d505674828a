//! Bad files and bad requests give typed errors that name the problem; nothing panics.

mod common;

use std::path::{Path, PathBuf};

use kvfleet_model::gguf::GgufFile;
use kvfleet_model::{ModelError, SeqInput};
use kvfleet_proto::{BlockSize, SamplingParams};

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kvfleet-bad-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// A hand-built GGUF: string metadata and raw tensors (name, dims innermost first, type, bytes).
fn gguf_bytes(meta: &[(&str, &str)], tensors: &[(&str, Vec<u64>, u32, Vec<u8>)]) -> Vec<u8> {
    let mut b = Vec::new();
    let s = |b: &mut Vec<u8>, t: &str| {
        b.extend((t.len() as u64).to_le_bytes());
        b.extend(t.as_bytes());
    };
    b.extend(b"GGUF");
    b.extend(3u32.to_le_bytes());
    b.extend((tensors.len() as u64).to_le_bytes());
    b.extend((meta.len() as u64).to_le_bytes());
    for (k, v) in meta {
        s(&mut b, k);
        b.extend(8u32.to_le_bytes());
        s(&mut b, v);
    }
    let mut offset = 0u64;
    for (name, dims, ty, data) in tensors {
        s(&mut b, name);
        b.extend((dims.len() as u32).to_le_bytes());
        for d in dims {
            b.extend(d.to_le_bytes());
        }
        b.extend(ty.to_le_bytes());
        b.extend(offset.to_le_bytes());
        offset += (data.len() as u64).div_ceil(32) * 32;
    }
    while b.len() % 32 != 0 {
        b.push(0);
    }
    for (_, _, _, data) in tensors {
        b.extend(data);
        while b.len() % 32 != 0 {
            b.push(0);
        }
    }
    b
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).expect("write");
    p
}

fn f32_tensor(name: &str, n: usize) -> (&str, Vec<u64>, u32, Vec<u8>) {
    (
        name,
        vec![n as u64],
        0,
        (0..n).flat_map(|_| 1.0f32.to_le_bytes()).collect(),
    )
}

#[test]
fn gguf_corruption_cases_are_typed_errors() {
    let dir = tmp("gguf");
    let good = gguf_bytes(
        &[("general.architecture", "llama")],
        &[f32_tensor("a", 64), f32_tensor("b", 64)],
    );
    assert!(GgufFile::open(&write(&dir, "good.gguf", &good)).is_ok());
    let mut huge_len = good.clone();
    // The first metadata key's length field: claim 2^60 bytes.
    huge_len[24..32].copy_from_slice(&(1u64 << 60).to_le_bytes());
    let mut bad_version = good.clone();
    bad_version[4..8].copy_from_slice(&99u32.to_le_bytes());
    // (file bytes, what the message must mention)
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "truncated-data",
            good[..good.len() - 100].to_vec(),
            "truncated",
        ),
        ("truncated-header", good[..40].to_vec(), "exceeds"),
        ("empty", Vec::new(), "magic"),
        (
            "bad-magic",
            [b"GGML".as_slice(), &good[4..]].concat(),
            "magic",
        ),
        ("bad-version", bad_version, "version"),
        ("huge-length", huge_len, "exceeds"),
    ];
    for (name, bytes, needle) in cases {
        let p = write(&dir, &format!("{name}.gguf"), &bytes);
        match GgufFile::open(&p) {
            Err(ModelError::Corrupt {
                path,
                format,
                detail,
            }) => {
                assert_eq!(path, p);
                assert_eq!(format, "GGUF");
                assert!(detail.contains(needle), "{name}: {detail}");
            }
            other => panic!("{name}: expected Corrupt, got {other:?}"),
        }
        // The whole loader reports the same, never panics.
        assert!(kvfleet_model::load(&p).is_err(), "{name}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn unsupported_architecture_and_quantization_are_named() {
    let dir = tmp("unsupported");
    let bert = gguf_bytes(&[("general.architecture", "bert")], &[f32_tensor("a", 32)]);
    match kvfleet_model::load(&write(&dir, "bert.gguf", &bert)) {
        Err(ModelError::UnsupportedArchitecture(a)) => assert_eq!(a, "bert"),
        other => panic!("expected UnsupportedArchitecture, got {other:?}"),
    }
    // IQ4_NL (type 20): 32 elements in 18 bytes; no kernel computes with it.
    let iq = gguf_bytes(
        &[("general.architecture", "llama")],
        &[("blk.0.attn_q.weight", vec![32], 20, vec![0; 18])],
    );
    let f = GgufFile::open(&write(&dir, "iq.gguf", &iq)).unwrap();
    match f.f32_vec("blk.0.attn_q.weight") {
        Err(e @ ModelError::UnsupportedQuant { .. }) => {
            let msg = e.to_string();
            assert!(
                msg.contains("blk.0.attn_q.weight") && msg.contains("IQ4_NL"),
                "{msg}"
            );
        }
        other => panic!("expected UnsupportedQuant, got {other:?}"),
    }
    assert!(matches!(
        f.f32_vec("nope"),
        Err(ModelError::MissingTensor(_))
    ));
    // A Q4_0 row that is not a whole number of blocks.
    let ragged = gguf_bytes(
        &[("general.architecture", "llama")],
        &[("w", vec![48], 2, vec![0; 36])],
    );
    match GgufFile::open(&write(&dir, "ragged.gguf", &ragged)) {
        Err(ModelError::Corrupt { detail, .. }) => {
            assert!(detail.contains("block size"), "{detail}")
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn safetensors_and_config_problems_are_typed_errors() {
    let spec = kvfleet_model::tiny::TinySpec::default();
    let fresh = |name: &str| {
        let d = tmp(name);
        kvfleet_model::tiny::write_tiny_llama(&d, spec, 1).unwrap();
        d
    };
    let d = fresh("st-truncated");
    let st = d.join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    std::fs::write(&st, &bytes[..bytes.len() / 2]).unwrap();
    assert!(
        matches!(
            kvfleet_model::load(&d),
            Err(ModelError::Corrupt {
                format: "safetensors",
                ..
            })
        ),
        "truncated safetensors"
    );

    let d = fresh("st-garbage");
    std::fs::write(
        d.join("model.safetensors"),
        b"\xff\xff\xff\xff\xff\xff\xff\x7fnot json",
    )
    .unwrap();
    assert!(matches!(
        kvfleet_model::load(&d),
        Err(ModelError::Corrupt {
            format: "safetensors",
            ..
        })
    ));

    let d = fresh("st-shape");
    let cfg = std::fs::read_to_string(d.join("config.json")).unwrap();
    std::fs::write(
        d.join("config.json"),
        cfg.replace("\"intermediate_size\":128", "\"intermediate_size\":96"),
    )
    .unwrap();
    match kvfleet_model::load(&d) {
        Err(ModelError::BadShape {
            tensor,
            actual,
            expected,
        }) => {
            assert!(tensor.contains("ffn_gate"), "{tensor}");
            assert_eq!((actual[0], expected[0]), (128, 96));
        }
        other => panic!("expected BadShape, got {other:?}"),
    }

    let d = fresh("st-arch");
    let cfg = std::fs::read_to_string(d.join("config.json")).unwrap();
    std::fs::write(
        d.join("config.json"),
        cfg.replace("LlamaForCausalLM", "GPT2LMHeadModel")
            .replace("\"llama\"", "\"gpt2\""),
    )
    .unwrap();
    assert!(matches!(
        kvfleet_model::load(&d),
        Err(ModelError::UnsupportedArchitecture(_))
    ));

    let d = fresh("st-missing");
    std::fs::remove_file(d.join("tokenizer.json")).unwrap();
    assert!(matches!(
        kvfleet_model::load(&d),
        Err(ModelError::Io { .. })
    ));
}

#[test]
fn requests_beyond_the_context_or_vocabulary_are_rejected() {
    let m = common::tiny();
    let ctx = m.model.config().context_length;
    let bs = BlockSize::default();
    let nb = bs.blocks_for(ctx + 16);
    let mut cache = m.model.new_cache(nb, bs).unwrap();
    let table: Vec<u32> = (0..nb as u32).collect();
    let long = vec![5u32; ctx + 1];
    let seq = |tokens: &'static [u32], start_pos, table: &'static [u32]| SeqInput {
        tokens,
        start_pos,
        block_table: table,
        want_logits: true,
    };
    let table: &'static [u32] = Box::leak(table.into_boxed_slice());
    let long: &'static [u32] = Box::leak(long.into_boxed_slice());
    match m.model.forward(&[seq(long, 0, table)], &mut cache) {
        Err(ModelError::PromptTooLong { tokens, context }) => {
            assert_eq!((tokens, context), (ctx + 1, ctx))
        }
        other => panic!("expected PromptTooLong, got {other:?}"),
    }
    assert!(matches!(
        m.generate(long, &SamplingParams::greedy(1), 64),
        Err(ModelError::PromptTooLong { .. })
    ));
    // (input, expected error)
    let cases: Vec<(SeqInput<'static>, &str)> = vec![
        (seq(&[1, 2], ctx - 1, table), "PromptTooLong"),
        (seq(&[999_999], 0, table), "BadToken"),
        (seq(&[], 0, table), "BadInput"),
        (seq(&[1, 2, 3], 0, &[]), "BadInput"),
        (seq(&[1, 2, 3], 0, &[9_999]), "BadInput"),
    ];
    for (input, want) in cases {
        let err = m.model.forward(&[input], &mut cache).unwrap_err();
        assert!(format!("{err:?}").starts_with(want), "{input:?}: {err:?}");
    }
    // A cache built for another shape is refused, not indexed out of bounds.
    let mut other = kvfleet_model::PagedKvCache::new("x", 1, 1, 8, 4, bs).unwrap();
    assert!(matches!(
        m.model.forward(&[seq(&[1], 0, table)], &mut other),
        Err(ModelError::BadInput(_))
    ));
}
