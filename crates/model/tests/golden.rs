//! The real models against llama.cpp's golden outputs (../shared/golden): tokenization and
//! chat rendering exactly; first greedy token always; first 8 greedy tokens in ≥ 80 % of cases;
//! first-position top-5 log-probabilities within 0.25 nats.
#![allow(clippy::print_stdout, clippy::print_stderr)]

mod common;

use kvfleet_model::{ChatMessage, LoadedModel};
use kvfleet_proto::SamplingParams;
use serde_json::Value;

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

fn messages(v: &Value) -> Vec<ChatMessage> {
    v.as_array()
        .expect("messages")
        .iter()
        .map(|m| {
            ChatMessage::new(
                m["role"].as_str().expect("role"),
                m["content"].as_str().expect("content"),
            )
        })
        .collect()
}

fn check_prompts(model: &LoadedModel, golden: &Value) {
    for case in golden["cases"].as_array().expect("cases") {
        let want_text = case["prompt_text"].as_str().expect("prompt_text");
        let want_ids = ids(&case["prompt_ids"]);
        let (text, got) = match case["kind"].as_str() {
            Some("chat") => model.chat_prompt(&messages(&case["messages"])).expect("chat"),
            _ => {
                let p = case["prompt"].as_str().expect("prompt");
                (p.to_string(), model.encode_prompt(p).expect("encode"))
            }
        };
        assert_eq!(text, want_text, "rendered prompt");
        assert_eq!(got, want_ids, "prompt ids for {want_text:?}");
    }
}

fn check_generation(model: &LoadedModel, golden: &Value) {
    let cases = golden["cases"].as_array().expect("cases");
    let mut first8_ok = 0;
    for case in cases {
        let prompt = ids(&case["prompt_ids"]);
        let want = ids(&case["greedy_ids"]);
        let params = SamplingParams {
            logprobs: Some(10),
            ..SamplingParams::greedy(8)
        };
        let r#gen = model.generate(&prompt, &params, 64).expect("generate");
        let n = want.len().min(8);
        println!(
            "{:?}\n  want {:?}\n  got  {:?}",
            case["prompt_text"].as_str(),
            &want[..n],
            &r#gen.tokens[..n.min(r#gen.tokens.len())]
        );
        assert_eq!(r#gen.tokens[0], want[0], "first greedy token");
        if r#gen.tokens.len() >= n && r#gen.tokens[..n] == want[..n] {
            first8_ok += 1;
        }
        // First-position top-5 log-probabilities, matched by token text.
        let top = &r#gen.logprobs[0].top;
        for (text, lp) in case["top5_logprobs_first4"][0].as_object().expect("top5") {
            let lp = lp.as_f64().expect("lp") as f32;
            let ours = top
                .iter()
                .find(|(id, _)| model.tokenizer.token_text(*id) == *text)
                .map(|&(_, l)| l);
            match ours {
                Some(l) => assert!(
                    (l - lp).abs() <= 0.25,
                    "{text:?}: ours {l:.4} vs llama.cpp {lp:.4}"
                ),
                None => panic!("{text:?} (llama.cpp {lp}) is not in our top 10: {top:?}"),
            }
        }
    }
    println!("first 8 tokens equal in {first8_ok}/{} cases", cases.len());
    assert!(
        first8_ok * 10 >= cases.len() * 8,
        "first 8 greedy tokens match in only {first8_ok}/{} cases",
        cases.len()
    );
}

#[test]
fn smollm2_prompts_match_llama_cpp() {
    let (Some(model), Some(golden)) = (common::smollm2(), common::golden("smollm2-135m-instruct-q4_1.json")) else {
        return;
    };
    check_prompts(model, &golden);
}

#[test]
fn smollm2_greedy_and_logprobs_match_llama_cpp() {
    let (Some(model), Some(golden)) = (common::smollm2(), common::golden("smollm2-135m-instruct-q4_1.json")) else {
        return;
    };
    check_generation(model, &golden);
}

#[test]
fn gemma3_prompts_match_llama_cpp() {
    let (Some(model), Some(golden)) = (common::gemma3(), common::golden("gemma-3-270m-q4_k_m.json")) else {
        return;
    };
    check_prompts(model, &golden);
}

#[test]
fn gemma3_greedy_and_logprobs_match_llama_cpp() {
    let (Some(model), Some(golden)) = (common::gemma3(), common::golden("gemma-3-270m-q4_k_m.json")) else {
        return;
    };
    check_generation(model, &golden);
}
