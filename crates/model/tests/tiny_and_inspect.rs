//! The tiny model writer round-trips through the safetensors loader, and `inspect` describes
//! tiny and real models correctly.

mod common;

use kvfleet_model::ChatMessage;
use kvfleet_model::tiny::{TinySpec, write_tiny_llama};
use kvfleet_proto::SamplingParams;

#[test]
fn tiny_model_is_deterministic_loads_and_generates() {
    let base = std::env::temp_dir().join(format!("kvfleet-tiny-rt-{}", std::process::id()));
    let (a, b) = (base.join("a"), base.join("b"));
    write_tiny_llama(&a, TinySpec::default(), 42).unwrap();
    write_tiny_llama(&b, TinySpec::default(), 42).unwrap();
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert_eq!(
            std::fs::read(a.join(f)).unwrap(),
            std::fs::read(b.join(f)).unwrap(),
            "{f}"
        );
    }
    let m = kvfleet_model::load(&a).unwrap();
    let info = &m.info;
    assert_eq!(info.architecture, "llama");
    assert_eq!(info.format, "safetensors");
    assert_eq!(info.layers, 2);
    assert_eq!(info.heads, (4, 2));
    assert_eq!(info.context_length, 1024);
    assert_eq!(info.quantization.get("F32"), Some(&(2 + 2 * 9 + 1)));
    // embed + head + per layer (q, k, v, o, gate, up, down, 2 norms) + final norm
    let (h, i, v) = (64u64, 128u64, info.vocab_size as u64);
    let per_layer = h * h + 2 * (32 * h) + h * h + 3 * h * i + 2 * h;
    assert_eq!(info.parameters, 2 * v * h + 2 * per_layer + h);
    assert!(info.chat_template.is_some());
    assert!(info.to_string().contains("architecture:   llama"));

    let (text, ids) = m
        .chat_prompt(&[ChatMessage::new("user", "the cat")])
        .unwrap();
    assert_eq!(
        text,
        "<|im_start|>user\nthe cat<|im_end|>\n<|im_start|>assistant\n"
    );
    assert_eq!(ids[0], 1, "<|im_start|> is a special token");
    assert_eq!(m.tokenizer.decode(&ids, false).unwrap(), text);
    let g = m.generate(&ids, &SamplingParams::greedy(5), 4).unwrap();
    assert!(!g.tokens.is_empty() && g.tokens.len() <= 5);
    let _ = std::fs::remove_dir_all(&base);
}

#[test]
fn inspect_describes_the_real_models() {
    if let Some(m) = common::smollm2() {
        let i = &m.info;
        assert_eq!(i.architecture, "llama");
        assert_eq!(i.format, "gguf");
        assert_eq!(
            (i.vocab_size, i.context_length, i.layers),
            (49152, 8192, 30)
        );
        assert_eq!(i.quantization.get("Q4_1"), Some(&210));
        assert_eq!(i.quantization.get("Q8_0"), Some(&1));
        assert!(
            (130_000_000..140_000_000).contains(&i.parameters),
            "{}",
            i.parameters
        );
        assert!(
            i.chat_template
                .as_deref()
                .is_some_and(|t| t.contains("im_start"))
        );
    }
    if let Some(m) = common::gemma3() {
        let i = &m.info;
        assert_eq!(i.architecture, "gemma3");
        assert_eq!(
            (i.vocab_size, i.context_length, i.layers),
            (262144, 32768, 18)
        );
        assert!(i.quantization.contains_key("Q4_K") && i.quantization.contains_key("Q6_K"));
        assert!(i.chat_template.is_none());
    }
}
