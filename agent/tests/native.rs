//! The agent serving real models (`engine = "native"`): a tiny generated Llama with a real
//! byte-level BPE tokenizer and ChatML template (always), and SmolLM2-135M-Instruct when
//! `KVFLEET_SMOLLM2_GGUF` names it (skipped with a printed reason otherwise).
//!
//! What is checked: the real tokenizer and chat template are used (usage counts, logprob token
//! texts), streaming equals non-streaming, stop strings, logprobs, KV events reaching the agent,
//! bad requests against the model's real vocabulary and context, a killed native worker coming
//! back, and the acceptance questions on SmolLM2.

#![allow(clippy::unwrap_used, clippy::print_stderr)]

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::{TestAgent, sse_events};
use kvfleet_proto::KvEventData;
use serde_json::{Value, json};

/// A tiny Llama written once per test binary (a Hugging Face directory: `config.json`,
/// `model.safetensors`, `tokenizer.json`, `tokenizer_config.json` with a ChatML template).
fn tiny_model() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("kvfleet-agent-tiny-{}", std::process::id()));
        let spec = kvfleet_model::tiny::TinySpec {
            context_length: 4096,
            ..Default::default()
        };
        kvfleet_model::tiny::write_tiny_llama(&dir, spec, 7).unwrap();
        dir
    })
    .clone()
}

fn native_model(name: &str, path: &std::path::Path, extra: &str) -> String {
    format!(
        "[[models]]\nname = \"{name}\"\nengine = \"native\"\npath = {:?}\nkv_blocks = 512\n{extra}",
        path.display().to_string()
    )
}

fn chat(model: &str, content: &str, max_tokens: u32) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens, "temperature": 0})
}

fn python_openai() -> bool {
    let probe = std::process::Command::new("python3")
        .args(["-c", "import openai"])
        .output();
    if !probe.is_ok_and(|o| o.status.success()) {
        eprintln!(
            "SKIPPED: python3 with the `openai` package is not installed (pip install openai)"
        );
        return false;
    }
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_sdk_works_against_a_native_model() {
    if !python_openai() {
        return;
    }
    let agent = TestAgent::start(&native_model("tiny", &tiny_model(), "")).await;
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/sdk/openai_sdk_native.py"
    );
    let output = tokio::process::Command::new("python3")
        .args([script, &format!("http://{}", agent.addr), "tiny"])
        .output()
        .await
        .unwrap();
    assert!(
        output.status.success(),
        "SDK checks failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Runs `tests/sdk/openai_sdk_tools.py` (tools and structured output through the official SDK)
/// against `agent`'s `model`, with `extra` arguments; returns its stdout.
async fn sdk_tools(agent: &TestAgent, model: &str, extra: &[&str]) -> String {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk/openai_sdk_tools.py");
    let output = tokio::process::Command::new("python3")
        .arg(script)
        .args([&format!("http://{}", agent.addr), model])
        .args(extra)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "SDK checks failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

fn python_jsonschema() -> bool {
    let probe = std::process::Command::new("python3")
        .args(["-c", "import jsonschema"])
        .output();
    if !probe.is_ok_and(|o| o.status.success()) {
        eprintln!("SKIPPED: python3 with the `jsonschema` package is not installed");
        return false;
    }
    true
}

/// Tools (required, named, parallel off, auto, none, a conversation with tool results, streamed
/// deltas equal to the whole answer) and json_schema output through the official SDK, on the
/// tiny model: a model that knows nothing still produces calls whose arguments validate,
/// because the grammar allows nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_sdk_calls_tools_and_follows_schemas() {
    if !python_openai() || !python_jsonschema() {
        return;
    }
    let agent = TestAgent::start(&native_model("tiny", &tiny_model(), "")).await;
    let out = sdk_tools(&agent, "tiny", &[]).await;
    eprintln!("{out}");
}

/// The Responses API through the official SDK (`tests/sdk/openai_sdk_responses.py`) on the
/// tiny model: text, instructions, function tools, json_schema, the streamed events,
/// previous_response_id, retrieve, delete, store=false and a refused field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_sdk_drives_the_responses_api() {
    if !python_openai() || !python_jsonschema() {
        return;
    }
    let agent = TestAgent::start(&native_model("tiny", &tiny_model(), "")).await;
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/sdk/openai_sdk_responses.py"
    );
    let output = tokio::process::Command::new("python3")
        .args([script, &format!("http://{}", agent.addr), "tiny"])
        .output()
        .await
        .unwrap();
    assert!(
        output.status.success(),
        "SDK checks failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Each tool-call format end to end on the tiny model (whose template renders no tools, so
/// each gets its format's default prompt): with `tool_parser` set per model, a forced call is
/// written in that format (the grammar allows nothing else) and read back by that format's
/// parser into `tool_calls` whose arguments validate, streamed deltas gathering into the same
/// calls as the whole answer. And `reasoning_parser = "deepseek_r1"`: the model's output, which
/// never closes `</think>`, is all `reasoning_content`, in the message and in the deltas.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_tool_call_format_and_reasoning_go_through_the_frontend() {
    let path = tiny_model();
    let formats = ["hermes", "llama3_json", "mistral", "pythonic"];
    let mut config = String::new();
    for format in formats {
        let extra = format!("tool_parser = \"{format}\"\n");
        config.push_str(&native_model(&format!("tiny-{format}"), &path, &extra));
    }
    let r1 = "reasoning_parser = \"deepseek_r1\"\n";
    config.push_str(&native_model("tiny-r1", &path, r1));
    config.push_str(&native_model("tiny-plain", &path, ""));
    for format in formats {
        config.push_str(&format!(
            "[[workers]]\nmodel = \"tiny-{format}\"\ndevice = \"cpu\"\n"
        ));
    }
    for model in ["tiny-r1", "tiny-plain"] {
        config.push_str(&format!(
            "[[workers]]\nmodel = \"{model}\"\ndevice = \"cpu\"\n"
        ));
    }
    let agent = TestAgent::start(&config).await;

    let tools = json!([{"type": "function", "function": {"name": "get_weather",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "enum": ["Paris", "Oslo"]},
            "days": {"type": "integer", "minimum": 1, "maximum": 7}},
            "required": ["city", "days"]}}}]);
    // (name, arguments) of each call in a whole answer and in a stream's deltas.
    fn whole_calls(body: &Value) -> Vec<(String, String)> {
        body["choices"][0]["message"]["tool_calls"]
            .as_array()
            .unwrap_or_else(|| panic!("tool_calls: {body}"))
            .iter()
            .map(|c| {
                (
                    c["function"]["name"].as_str().unwrap().to_owned(),
                    c["function"]["arguments"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    }
    for format in formats {
        let model = format!("tiny-{format}");
        let mut request = json!({"model": model,
            "messages": [{"role": "user", "content": "the weather in Paris for 3 days?"}],
            "tools": tools, "tool_choice": "required", "parallel_tool_calls": false,
            "max_tokens": 400, "temperature": 0});
        let response = agent.post("/v1/chat/completions", request.clone()).await;
        assert_eq!(response.status(), 200, "{format}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(
            body["choices"][0]["finish_reason"], "tool_calls",
            "{format}: {body}"
        );
        let calls = whole_calls(&body);
        assert_eq!(calls.len(), 1, "{format}: {body}");
        assert_eq!(calls[0].0, "get_weather", "{format}");
        let arguments: Value = serde_json::from_str(&calls[0].1)
            .unwrap_or_else(|e| panic!("{format}: {e}: {}", calls[0].1));
        assert!(
            ["Paris", "Oslo"].contains(&arguments["city"].as_str().unwrap_or_default()),
            "{format}: {arguments}"
        );
        assert!(
            (1..=7).contains(&arguments["days"].as_i64().unwrap_or(0)),
            "{format}: {arguments}"
        );

        request["stream"] = json!(true);
        let events = sse_events(agent.post("/v1/chat/completions", request).await).await;
        let mut streamed: Vec<(String, String)> = Vec::new();
        for event in events.iter().filter(|e| *e != "[DONE]") {
            let chunk: Value = serde_json::from_str(event).unwrap();
            let Some(deltas) = chunk["choices"][0]["delta"]["tool_calls"].as_array() else {
                continue;
            };
            for delta in deltas {
                let index = delta["index"].as_u64().unwrap() as usize;
                if let Some(name) = delta["function"]["name"].as_str() {
                    assert_eq!(index, streamed.len(), "{format}");
                    assert!(delta["id"].is_string(), "{format}: {delta}");
                    streamed.push((name.to_owned(), String::new()));
                }
                if let Some(text) = delta["function"]["arguments"].as_str() {
                    streamed[index].1.push_str(text);
                }
            }
        }
        assert_eq!(streamed, calls, "{format}: streamed and whole differ");
    }

    // Reasoning: the same greedy output, as content without the parser and as reasoning with.
    let ask = |model: &str| chat(model, "the quick brown fox", 12);
    let plain: Value = agent
        .post("/v1/chat/completions", ask("tiny-plain"))
        .await
        .json()
        .await
        .unwrap();
    let text = plain["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(
        plain["choices"][0]["message"]
            .get("reasoning_content")
            .is_none()
    );
    let reasoned: Value = agent
        .post("/v1/chat/completions", ask("tiny-r1"))
        .await
        .json()
        .await
        .unwrap();
    let message = &reasoned["choices"][0]["message"];
    assert!(!text.is_empty() && !text.contains("</think>"), "{plain}");
    assert_eq!(message["reasoning_content"], text, "{reasoned}");
    assert_eq!(message["content"], "", "{reasoned}");
    let mut stream = ask("tiny-r1");
    stream["stream"] = json!(true);
    let events = sse_events(agent.post("/v1/chat/completions", stream).await).await;
    let mut reasoning = String::new();
    for event in events.iter().filter(|e| *e != "[DONE]") {
        let chunk: Value = serde_json::from_str(event).unwrap();
        if let Some(piece) = chunk["choices"][0]["delta"]["reasoning_content"].as_str() {
            reasoning.push_str(piece);
        }
    }
    assert_eq!(
        Some(reasoning.as_str()),
        message["reasoning_content"].as_str(),
        "streamed reasoning differs"
    );
}

/// Issue 23's acceptance on SmolLM2-135M: strict json_schema over the corpus's schemas and
/// `tool_choice: "required"` over its tool sets, every output parsing and validating. CI runs
/// the first `KVFLEET_CORPUS` of each (default 4, about 30 s on 2 cores); `KVFLEET_CORPUS=all` runs
/// the 50 schemas and 20 tool sets (scripts/openai-acceptance.sh).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smollm2_outputs_validate_over_the_schema_and_tool_corpora() {
    let Ok(path) = std::env::var("KVFLEET_SMOLLM2_GGUF") else {
        eprintln!(
            "SKIPPED: KVFLEET_SMOLLM2_GGUF is not set (source scripts/lib/common.sh && \
             ensure_default_model)"
        );
        return;
    };
    if !python_openai() || !python_jsonschema() {
        return;
    }
    let agent = TestAgent::start(&format!(
        "[[models]]\nname = \"smollm2\"\nengine = \"native\"\npath = {path:?}\nkv_memory = \"256MiB\"\n"
    ))
    .await;
    let corpus = std::env::var("KVFLEET_CORPUS").unwrap_or_else(|_| "4".into());
    let out = sdk_tools(&agent, "smollm2", &["--corpus", &corpus]).await;
    eprintln!("{out}");
    assert!(out.contains("corpus: "), "{out}");
}

/// The frontend tokenizes with the model's own tokenizer and template: the prompt token count
/// is what `kvfleet-model` computes for the ChatML-rendered conversation, and the generated
/// text is the detokenized greedy output of the model itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompts_use_the_models_tokenizer_and_template_and_outputs_match_the_model() {
    let path = tiny_model();
    let agent = TestAgent::start(&native_model("tiny", &path, "")).await;
    let mut kv_events = agent.running.pool.subscribe_kv_events();

    let text = kvfleet_model::load_text(&path).unwrap();
    let content = "the quick brown fox jumps over the lazy dog and then the cat";
    let (_, ids) = text
        .chat_prompt(&[kvfleet_model::ChatMessage::new("user", content)])
        .unwrap();
    let response = agent
        .post("/v1/chat/completions", chat("tiny", content, 10))
        .await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["usage"]["prompt_tokens"], ids.len(), "{body}");

    // The same greedy generation straight from the model, decoded by its tokenizer.
    let model = kvfleet_model::load(&path).unwrap();
    let generated = model
        .generate(&ids, &kvfleet_proto::SamplingParams::greedy(10), 64)
        .unwrap();
    let eos = model.tokenizer.eos_ids().to_vec();
    let n = body["usage"]["completion_tokens"].as_u64().unwrap() as usize;
    assert_eq!(n, generated.tokens.len(), "{body}");
    let expected = model.tokenizer.decode(&generated.tokens, true).unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], expected, "{body}");
    let finish = if generated.tokens.last().is_some_and(|t| eos.contains(t)) {
        "stop"
    } else {
        "length"
    };
    assert_eq!(body["choices"][0]["finish_reason"], finish);

    // The prompt's full blocks entered the worker's prefix cache: a Stored event from worker 1
    // reached the agent.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let stored = loop {
        let event = tokio::time::timeout_at(deadline, kv_events.recv())
            .await
            .expect("a KV event within 5 s")
            .unwrap();
        if let KvEventData::Stored { blocks, .. } = &event.data {
            break (event.worker, blocks.len());
        }
    };
    assert_eq!(stored.0, kvfleet_proto::WorkerId(1));
    assert_eq!(stored.1, ids.len() / 16);
}

/// `logit_bias` and the penalties reach the worker's sampler: a +100 bias makes every token the
/// biased one, and greedy output with penalties is what the model's own reference generation
/// gives with them (and not what it gives without).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logit_bias_and_penalties_steer_the_native_sampler() {
    let path = tiny_model();
    let agent = TestAgent::start(&native_model("tiny", &path, "")).await;
    let model = kvfleet_model::load(&path).unwrap();
    let prompt: Vec<u32> = (3..40).collect();
    let forced = 17u32;
    let response = agent
        .post(
            "/v1/completions",
            json!({"model": "tiny", "prompt": prompt, "max_tokens": 6, "temperature": 0,
                "ignore_eos": true, "logit_bias": {forced.to_string(): 100}}),
        )
        .await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    let expected = model.tokenizer.decode(&[forced; 6], true).unwrap();
    assert_eq!(body["choices"][0]["text"], expected, "{body}");

    let penalised = kvfleet_proto::SamplingParams {
        presence_penalty: 1.5,
        frequency_penalty: 2.0,
        repetition_penalty: 1.5,
        ignore_eos: true,
        ..kvfleet_proto::SamplingParams::greedy(24)
    };
    let reference = model.generate(&prompt, &penalised, 64).unwrap().tokens;
    let plain = model
        .generate(
            &prompt,
            &kvfleet_proto::SamplingParams {
                ignore_eos: true,
                ..kvfleet_proto::SamplingParams::greedy(24)
            },
            64,
        )
        .unwrap()
        .tokens;
    assert_ne!(
        reference, plain,
        "the penalties change this model's greedy output"
    );
    let response = agent
        .post(
            "/v1/completions",
            json!({"model": "tiny", "prompt": prompt, "max_tokens": 24, "temperature": 0,
                "ignore_eos": true, "presence_penalty": 1.5, "frequency_penalty": 2.0,
                "repetition_penalty": 1.5}),
        )
        .await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    let expected = model.tokenizer.decode(&reference, true).unwrap();
    assert_eq!(body["choices"][0]["text"], expected, "{body}");
}

/// Structured output on a real (tiny, random) model: a strict JSON schema through
/// `response_format`, streamed and not (identical under greedy decoding), parses and validates;
/// vLLM's `guided_choice` and `guided_regex` hold on completions; a schema that does not compile
/// is a 400 naming the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn structured_output_follows_the_schema_streamed_or_not() {
    let agent = TestAgent::start(&native_model("tiny", &tiny_model(), "")).await;
    let schema = json!({"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 99},
        "pet": {"enum": ["cat", "dog"]}},
        "required": ["name", "age", "pet"], "additionalProperties": false});
    let mut request = chat("tiny", "describe a person as JSON", 200);
    request["response_format"] = json!({"type": "json_schema", "json_schema": {"name": "person", "strict": true, "schema": schema}});
    let response = agent.post("/v1/chat/completions", request.clone()).await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    let text = body["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(body["choices"][0]["finish_reason"], "stop", "{body}");
    let value: Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text:?} is not JSON: {e}"));
    let object = value.as_object().unwrap();
    assert_eq!(object.len(), 3, "{text}");
    assert!(
        object["name"]
            .as_str()
            .is_some_and(|n| n.chars().count() <= 6),
        "{text}"
    );
    assert!(object["age"].as_u64().is_some_and(|a| a <= 99), "{text}");
    assert!(object["pet"] == "cat" || object["pet"] == "dog", "{text}");

    request["stream"] = json!(true);
    let events = sse_events(agent.post("/v1/chat/completions", request).await).await;
    let streamed: String = events
        .iter()
        .filter(|e| *e != "[DONE]")
        .map(|e| serde_json::from_str::<Value>(e).unwrap())
        .filter_map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    assert_eq!(
        streamed, text,
        "streamed = not streamed under greedy decoding"
    );

    let choices = ["red", "green", "blue"];
    let response = agent
        .post(
            "/v1/completions",
            json!({"model": "tiny", "prompt": "the colour is", "max_tokens": 20,
                "temperature": 0.8, "seed": 3, "guided_choice": choices}),
        )
        .await;
    let body: Value = response.json().await.unwrap();
    assert!(
        choices.contains(&body["choices"][0]["text"].as_str().unwrap()),
        "{body}"
    );
    let response = agent
        .post(
            "/v1/completions",
            json!({"model": "tiny", "prompt": "a code:", "max_tokens": 20,
                "guided_regex": "[A-Z]{2}[0-9]{3}"}),
        )
        .await;
    let body: Value = response.json().await.unwrap();
    let code = body["choices"][0]["text"].as_str().unwrap();
    assert!(
        code.len() == 5
            && code[..2].bytes().all(|b| b.is_ascii_uppercase())
            && code[2..].bytes().all(|b| b.is_ascii_digit()),
        "{body}"
    );

    let mut bad = chat("tiny", "x", 5);
    bad["response_format"] = json!({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frobnicate"}}});
    let response = agent.post("/v1/chat/completions", bad).await;
    assert_eq!(response.status(), 400);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["param"], "response_format", "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_streams_equal_whole_answers_and_carry_logprobs() {
    let agent = TestAgent::start(&native_model("tiny", &tiny_model(), "")).await;
    let mut request = json!({"model": "tiny", "prompt": "once upon a time there was",
        "max_tokens": 20, "temperature": 0, "logprobs": 2});
    let whole: Value = agent
        .post("/v1/completions", request.clone())
        .await
        .json()
        .await
        .unwrap();
    let n = whole["usage"]["completion_tokens"].as_u64().unwrap() as usize;
    let lp = &whole["choices"][0]["logprobs"];
    assert_eq!(lp["tokens"].as_array().unwrap().len(), n, "{whole}");
    assert_eq!(lp["token_logprobs"].as_array().unwrap().len(), n);
    assert!(
        lp["token_logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .all(|v| v.as_f64().is_some_and(|x| x <= 0.0)),
        "{lp}"
    );
    // The token texts spell the completion.
    let spelled: String = lp["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    let text = whole["choices"][0]["text"].as_str().unwrap();
    assert!(
        spelled.starts_with(text.trim_end_matches('\u{fffd}')),
        "{spelled:?} vs {text:?}"
    );

    request["stream"] = json!(true);
    request["stream_options"] = json!({"include_usage": true});
    let events = sse_events(agent.post("/v1/completions", request).await).await;
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["text"].as_str())
        .collect();
    assert_eq!(streamed, text);
    let streamed_tokens: usize = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["logprobs"]["tokens"].as_array())
        .map(Vec::len)
        .sum();
    assert_eq!(streamed_tokens, n);
    assert_eq!(
        chunks.last().unwrap()["usage"]["completion_tokens"],
        n as u64
    );
}

/// Bad requests judged against the real model: its vocabulary, its context window (the
/// configured cap below the model's), its chat template.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_against_a_native_model() {
    let agent = TestAgent::start(&native_model(
        "tiny",
        &tiny_model(),
        "context_length = 64\n",
    ))
    .await;
    let vocab = kvfleet_model::load_text(&tiny_model())
        .unwrap()
        .tokenizer
        .vocab_size();
    let long = "the cat ".repeat(40);
    /// (case, path, body, status, code, param)
    type Row = (
        &'static str,
        &'static str,
        Value,
        u16,
        &'static str,
        Option<&'static str>,
    );
    let cases: Vec<Row> = vec![
        (
            "token id over the vocabulary",
            "/v1/completions",
            json!({"model": "tiny", "prompt": [1, 2, vocab]}),
            400,
            "invalid_value",
            Some("prompt"),
        ),
        (
            "prompt over the context",
            "/v1/completions",
            json!({"model": "tiny", "prompt": long}),
            400,
            "context_length_exceeded",
            Some("prompt"),
        ),
        (
            "max_tokens over the context",
            "/v1/chat/completions",
            chat("tiny", "hi", 64),
            400,
            "context_length_exceeded",
            Some("max_tokens"),
        ),
        (
            "max_tokens zero",
            "/v1/chat/completions",
            chat("tiny", "hi", 0),
            400,
            "invalid_value",
            Some("max_tokens"),
        ),
        (
            "unknown model",
            "/v1/chat/completions",
            chat("nope", "hi", 4),
            404,
            "model_not_found",
            Some("model"),
        ),
        (
            "empty messages",
            "/v1/chat/completions",
            json!({"model": "tiny", "messages": []}),
            400,
            "invalid_value",
            Some("messages"),
        ),
    ];
    for (name, path, body, status, code, param) in cases {
        let response = agent.post(path, body).await;
        assert_eq!(response.status().as_u16(), status, "case {name}");
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["error"]["code"], code, "case {name}: {error}");
        assert_eq!(
            error["error"]["param"].as_str(),
            param,
            "case {name}: {error}"
        );
    }
    // /v1/models reports the capped context.
    let models: Value = agent.get_json("/v1/models").await;
    assert_eq!(models["data"][0]["max_model_len"], 64);
    // Still serving.
    let response = agent
        .post("/v1/chat/completions", chat("tiny", "hi", 4))
        .await;
    assert_eq!(response.status(), 200);
}

/// The text of a streamed completion, the completion tokens its usage counts, and whether it
/// ended with `[DONE]`.
fn streamed(body: &str) -> (String, u64, bool) {
    let mut text = String::new();
    let mut tokens = 0;
    let mut done = false;
    for event in body.split("\n\n").filter_map(|e| e.strip_prefix("data: ")) {
        if event == "[DONE]" {
            done = true;
            continue;
        }
        let chunk: Value = serde_json::from_str(event).expect("an SSE event is JSON");
        assert!(chunk.get("error").is_none(), "an error event: {chunk}");
        if let Some(piece) = chunk["choices"][0]["delta"]["content"].as_str() {
            text.push_str(piece);
        }
        if let Some(n) = chunk["usage"]["completion_tokens"].as_u64() {
            tokens = n;
        }
    }
    (text, tokens, done)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_native_worker_reloads_its_model_and_its_seeded_request_resumes_unchanged() {
    // Seeded sampling at temperature 1: the native sampler seeds each token from the request's
    // seed and the token's absolute position, so the request resumed on the restarted worker
    // (prompt + the tokens delivered) continues exactly as an unbroken run.
    const MAX_TOKENS: u32 = 1500;
    let agent = TestAgent::start_with_backoff(&native_model("tiny", &tiny_model(), ""), 1000).await;
    let (_, ready) = agent.ready_status().await;
    let pid = ready["workers"][0]["pid"].as_u64().unwrap();
    let mut request = chat("tiny", "tell me a long story", MAX_TOKENS);
    request["stream"] = json!(true);
    request["stream_options"] = json!({"include_usage": true});
    request["temperature"] = json!(1.0);
    request["seed"] = json!(1234);
    let unbroken = agent
        .post("/v1/chat/completions", request.clone())
        .await
        .text()
        .await
        .unwrap();
    let (unbroken_text, unbroken_tokens, _) = streamed(&unbroken);
    // A long generation, in flight when the worker dies.
    let mut streaming = agent.post("/v1/chat/completions", request).await;
    assert_eq!(streaming.status(), 200);
    let mut body = String::new();
    body.push_str(&String::from_utf8_lossy(
        &streaming.chunk().await.unwrap().unwrap(),
    ));
    let status = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    while let Some(chunk) = streaming.chunk().await.unwrap() {
        body.push_str(&String::from_utf8_lossy(&chunk));
    }
    let (text, tokens, done) = streamed(&body);
    assert!(done, "{body}");
    assert_eq!(tokens, unbroken_tokens, "usage counts each token once");
    assert_eq!(
        text, unbroken_text,
        "the resumed text is the unbroken run's"
    );
    assert_eq!(agent.metric("kvfleet_request_migrations_total").await, 1.0);
    let (_, body) = agent.ready_status().await;
    assert_eq!(body["workers"][0]["starts"], 2);
    let response = agent
        .post("/v1/chat/completions", chat("tiny", "after", 3))
        .await;
    assert_eq!(response.status(), 200);
}

/// Models can be registered and removed while the agent runs (what the control-plane client
/// does): a new model is listed and routed (503 until a worker serves it, not 404), a removed
/// one is 404 again, and the others keep serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_can_be_registered_and_removed_at_runtime() {
    use kvfleet_agent::worker::ModelConfig;
    let agent = TestAgent::start(&native_model("tiny", &tiny_model(), "")).await;
    let registry = agent.running.models.clone();
    let served = registry
        .register(ModelConfig::native("late", tiny_model()))
        .await
        .unwrap();
    assert_eq!(served.context_length, 4096);
    let models: Value = agent.get_json("/v1/models").await;
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["late", "tiny"]);
    // Tokenized with its own tokenizer, then no worker serves it yet.
    let response = agent
        .post("/v1/chat/completions", chat("late", "hi", 4))
        .await;
    assert_eq!(response.status(), 503);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "no_ready_worker", "{body}");
    // /ready now waits for a worker for the new model too.
    assert_eq!(agent.ready_status().await.0, 503);
    assert!(registry.remove("late").is_some());
    let response = agent
        .post("/v1/chat/completions", chat("late", "hi", 4))
        .await;
    assert_eq!(response.status(), 404);
    assert_eq!(agent.ready_status().await.0, 200);
    // A bad path is a typed error naming the model and the file, and registers nothing.
    let err = registry
        .register(ModelConfig::native("broken", "/nonexistent/model.gguf"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("broken"), "{err}");
    assert!(err.to_string().contains("/nonexistent/model.gguf"), "{err}");
    assert_eq!(registry.names(), ["tiny"]);
    let response = agent
        .post("/v1/chat/completions", chat("tiny", "hi", 4))
        .await;
    assert_eq!(response.status(), 200);
}

/// The acceptance questions, asked the way `curl` would, of SmolLM2-135M-Instruct.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smollm2_knows_the_capital_of_france() {
    let Ok(path) = std::env::var("KVFLEET_SMOLLM2_GGUF") else {
        eprintln!(
            "SKIPPED: KVFLEET_SMOLLM2_GGUF is not set (source scripts/lib/common.sh && \
             ensure_default_model)"
        );
        return;
    };
    let agent = TestAgent::start(&format!(
        "[[models]]\nname = \"smollm2\"\nengine = \"native\"\npath = {path:?}\nkv_memory = \"256MiB\"\n"
    ))
    .await;
    let response = agent
        .post(
            "/v1/chat/completions",
            json!({"model": "smollm2", "temperature": 0, "max_tokens": 16,
                "messages": [{"role": "user",
                    "content": "What is the capital city of France? Answer in one word."}]}),
        )
        .await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    let answer = body["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(answer.contains("Paris"), "{body}");
    // A one-word answer ends at the model's end-of-turn token, not at max_tokens.
    assert_eq!(body["choices"][0]["finish_reason"], "stop", "{body}");

    let response = agent
        .post(
            "/v1/completions",
            json!({"model": "smollm2", "prompt": "The capital of France is",
                "temperature": 0, "max_tokens": 4}),
        )
        .await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    let text = body["choices"][0]["text"].as_str().unwrap();
    assert!(text.starts_with(" Paris"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ignore_eos_generates_past_the_end_of_sequence() {
    let agent = TestAgent::start(&native_model("tiny", &tiny_model(), "")).await;
    // Find a prompt the tiny model ends early (EOS) at temperature 0, then ask again past it.
    let mut ended_early = None;
    for seed_word in ["a", "the", "once", "hello", "x", "yes", "no", "why"] {
        let body: Value = agent
            .post(
                "/v1/completions",
                json!({"model": "tiny", "prompt": seed_word, "max_tokens": 400,
                    "temperature": 0}),
            )
            .await
            .json()
            .await
            .unwrap();
        if body["choices"][0]["finish_reason"] == "stop" {
            ended_early = Some((seed_word, body));
            break;
        }
    }
    let Some((prompt, early)) = ended_early else {
        panic!("no prompt of the tiny model reached EOS within 400 tokens");
    };
    let early_tokens = early["usage"]["completion_tokens"].as_u64().unwrap();
    assert!(early_tokens < 400, "{early}");
    let body: Value = agent
        .post(
            "/v1/completions",
            json!({"model": "tiny", "prompt": prompt, "max_tokens": 400,
                "temperature": 0, "ignore_eos": true}),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(body["usage"]["completion_tokens"], 400, "{body}");
    assert_eq!(body["choices"][0]["finish_reason"], "length", "{body}");
}
