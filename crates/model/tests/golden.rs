//! The real models against llama.cpp's golden outputs (../shared/golden).
//!
//! Tokenization and chat rendering must match exactly. So, for both models, must the
//! arithmetic: the forward pass reproduces the rounding of the AVX-512 llama.cpp build that
//! produced the golden files (`ggml_math`, `qmatmul`, `kquant`), and every case's first 8 greedy
//! tokens and first-position top-5 log-probabilities equal the golden ones (to the golden
//! file's printed precision).
//!
//! The targets are 80 % and 0.25 nats; the measured figures (printed by these tests,
//! recorded in docs/benchmarks.md) are 8/8 and 0.000 (SmolLM2), 5/5 and 0.000 (Gemma 3).
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
            Some("chat") => model
                .chat_prompt(&messages(&case["messages"]))
                .expect("chat"),
            _ => {
                let p = case["prompt"].as_str().expect("prompt");
                (p.to_string(), model.encode_prompt(p).expect("encode"))
            }
        };
        assert_eq!(text, want_text, "rendered prompt");
        assert_eq!(got, want_ids, "prompt ids for {want_text:?}");
    }
}

/// What one model must reach against the golden file.
struct Expect {
    /// Cases whose first `tokens` greedy tokens must all equal llama.cpp's.
    min_cases: usize,
    /// Greedy tokens compared per case (the golden files hold up to 32).
    tokens: usize,
    /// Largest first-position log-probability difference, nats.
    logprob_tol: f32,
    /// `None`: every first greedy token equals llama.cpp's. `Some(tie)`: where ours differs,
    /// llama.cpp rates our token within `tie` nats of its own choice (a near tie that any
    /// last-bit difference may flip, as it flips between llama.cpp's own builds).
    first_token_tie: Option<f32>,
}

fn check_generation(model: &LoadedModel, golden: &Value, expect: &Expect) {
    let Expect {
        min_cases: min_first8,
        tokens,
        logprob_tol,
        first_token_tie,
    } = *expect;
    let cases = golden["cases"].as_array().expect("cases");
    let mut first8_ok = 0;
    let mut logprob_misses = Vec::new();
    let mut first_misses = Vec::new();
    let mut max_err = 0.0f32;
    for case in cases {
        let prompt = ids(&case["prompt_ids"]);
        let want = ids(&case["greedy_ids"]);
        let params = SamplingParams {
            logprobs: Some(10),
            ..SamplingParams::greedy(tokens as u32)
        };
        let r#gen = model.generate(&prompt, &params, 64).expect("generate");
        let n = want.len().min(tokens);
        println!(
            "{:?}\n  want {:?}\n  got  {:?}",
            case["prompt_text"].as_str(),
            &want[..n],
            &r#gen.tokens[..n.min(r#gen.tokens.len())]
        );
        if r#gen.tokens[0] != want[0] {
            // How llama.cpp itself rates the token we chose (its top 5 are in the file).
            let theirs = case["top5_logprobs_first4"][0].as_object().expect("top5");
            let best = theirs
                .values()
                .filter_map(Value::as_f64)
                .fold(f64::NEG_INFINITY, f64::max);
            let ours = model.tokenizer.token_text(r#gen.tokens[0]);
            let gap = theirs
                .get(&ours)
                .and_then(Value::as_f64)
                .map(|lp| best - lp);
            println!(
                "  first token differs: ours {ours:?} is {gap:?} nats below llama.cpp's choice in llama.cpp's log-probabilities"
            );
            let tie =
                matches!((first_token_tie, gap), (Some(tie), Some(gap)) if gap <= f64::from(tie));
            if !tie {
                first_misses.push(format!(
                    "{:?}: first token {} {ours:?} (llama.cpp {}; llama.cpp rates ours {gap:?} nats below its choice)",
                    case["prompt_text"].as_str(),
                    r#gen.tokens[0],
                    want[0]
                ));
            }
        }
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
            println!("  {text:?}: llama.cpp {lp:.4} ours {ours:?}");
            if let Some(l) = ours {
                max_err = max_err.max((l - lp).abs());
            }
            match ours {
                Some(l) if (l - lp).abs() <= logprob_tol => {}
                _ => logprob_misses.push(format!("{text:?}: ours {ours:?} vs llama.cpp {lp:.4}")),
            }
        }
    }
    println!(
        "first {tokens} tokens equal in {first8_ok}/{} cases; max first-position log-prob error {max_err:.3} nats",
        cases.len()
    );
    assert!(
        first_misses.is_empty(),
        "first greedy token differs: {first_misses:#?}"
    );
    assert!(
        logprob_misses.is_empty(),
        "log-probabilities off by more than {logprob_tol} nats: {logprob_misses:#?}"
    );
    assert!(
        first8_ok >= min_first8,
        "first {tokens} greedy tokens match in only {first8_ok}/{} cases",
        cases.len()
    );
}

#[test]
fn smollm2_prompts_match_llama_cpp() {
    let (Some(model), Some(golden)) = (
        common::smollm2(),
        common::golden("smollm2-135m-instruct-q4_1.json"),
    ) else {
        return;
    };
    check_prompts(model, &golden);
}

#[test]
fn smollm2_greedy_and_logprobs_match_llama_cpp() {
    let (Some(model), Some(golden)) = (
        common::smollm2_exact(),
        common::golden("smollm2-135m-instruct-q4_1.json"),
    ) else {
        return;
    };
    // Bit-equal arithmetic: every case, and log-probabilities to the file's 4 decimals. (Over
    // the whole 32-token continuations 6/8 cases match: two part after 9-10 tokens, where
    // llama.cpp's single-token decode steps use a dot-product kernel we deliberately do not
    // mirror; see `Rounding::dot`.)
    let expect = Expect {
        min_cases: 8,
        tokens: 8,
        logprob_tol: 1e-3,
        first_token_tie: None,
    };
    check_generation(model, &golden, &expect);
}

#[test]
fn gemma3_prompts_match_llama_cpp() {
    let (Some(model), Some(golden)) =
        (common::gemma3(), common::golden("gemma-3-270m-q4_k_m.json"))
    else {
        return;
    };
    check_prompts(model, &golden);
}

#[test]
fn gemma3_greedy_and_logprobs_match_llama_cpp() {
    let (Some(model), Some(golden)) = (
        common::gemma3_exact(),
        common::golden("gemma-3-270m-q4_k_m.json"),
    ) else {
        return;
    };
    let expect = Expect {
        min_cases: 5,
        tokens: 8,
        logprob_tol: 1e-3,
        first_token_tie: None,
    };
    check_generation(model, &golden, &expect);
}

/// The fast path's deviation from llama.cpp, measured on the same golden cases and bounded:
/// the first-position top-5 log-probabilities within 0.5 nats, every first greedy token equal
/// or a near tie (llama.cpp rates ours within 0.1 nats of its choice), and at least half the
/// cases with their first 8 tokens equal. For scale: llama.cpp's own AVX2 build differs from the AVX-512
/// build that made the golden files by 0.31 nats (SmolLM2, 5/8 cases equal over 8 tokens), a
/// plain f64 forward pass by 0.38 (docs/benchmarks.md, "Native model").
#[test]
fn smollm2_fast_path_stays_close_to_llama_cpp() {
    let (Some(model), Some(golden)) = (
        common::smollm2(),
        common::golden("smollm2-135m-instruct-q4_1.json"),
    ) else {
        return;
    };
    println!("kernels: {}", model.model.kernel_path());
    let expect = Expect {
        min_cases: 4,
        tokens: 8,
        logprob_tol: 0.5,
        first_token_tie: Some(0.1),
    };
    check_generation(model, &golden, &expect);
}

/// As above, for Gemma 3.
#[test]
fn gemma3_fast_path_stays_close_to_llama_cpp() {
    let (Some(model), Some(golden)) =
        (common::gemma3(), common::golden("gemma-3-270m-q4_k_m.json"))
    else {
        return;
    };
    println!("kernels: {}", model.model.kernel_path());
    let expect = Expect {
        min_cases: 3,
        tokens: 8,
        logprob_tol: 0.5,
        first_token_tie: Some(0.1),
    };
    check_generation(model, &golden, &expect);
}
