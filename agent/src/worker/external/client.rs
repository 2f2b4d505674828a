//! One request to the engine server, streamed: llama-server's native `/completion` (token ids
//! in, token ids out, `cache_prompt` so a slot keeps its prefix), or an OpenAI server's
//! `/v1/completions` with the prompt as token ids (tokens come back as the server's
//! `token_ids` where it sends them, vLLM's `return_token_ids`; otherwise the request fails:
//! the frontend needs ids). Every failure — refused connection, an HTTP error, a body that is
//! not the engine's stream, silence past [`IDLE_TIMEOUT`] — is an error naming the engine,
//! never a hang.

use std::time::Duration;

use kvfleet_proto::{Constraint, SamplingParams};
use serde_json::{Value, json};

use super::super::protocol::{WireEngine, WireRequest};
use crate::backend::{FinishReason, TokenChunk, TokenLogprob, TopLogprob};

/// Longest silence of the server within a request (queueing for a slot included) before the
/// request fails.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(120);

/// What a request produced.
#[derive(Debug, Clone, PartialEq)]
pub enum Update {
    /// Generated tokens.
    Tokens(TokenChunk),
    /// The end: why, and the prompt tokens the server found cached (llama-server's
    /// `timings.cache_n`, 0 when it does not say).
    Done {
        /// Why it ended.
        reason: FinishReason,
        /// Prompt tokens not recomputed.
        cached_tokens: u64,
    },
}

/// The JSON body of `request` for `engine`.
pub fn body(engine: WireEngine, request: &WireRequest) -> Value {
    let s: &SamplingParams = &request.sampling;
    // A 32-bit seed: llama.cpp's sampler seed is a `uint32_t` (and -1 is "random").
    let seed = s.seed.map(|v| v % u64::from(u32::MAX));
    if engine.openai_api() {
        let mut body = json!({
            "prompt": request.prompt,
            "max_tokens": s.max_tokens,
            "stream": true,
            "temperature": s.temperature,
            "top_p": s.top_p,
            "presence_penalty": s.presence_penalty,
            "frequency_penalty": s.frequency_penalty,
            "return_token_ids": true,
        });
        if let Some(seed) = seed {
            body["seed"] = json!(seed);
        }
        if matches!(engine, WireEngine::Vllm | WireEngine::Sglang) {
            // Both servers take these beside the OpenAI fields, with the native meaning
            // (`unsupported` refuses them for a plain `openai` server).
            if s.top_k != 0 {
                body["top_k"] = json!(s.top_k);
            }
            if s.min_p != 0.0 {
                body["min_p"] = json!(s.min_p);
            }
            if s.repetition_penalty != 1.0 {
                body["repetition_penalty"] = json!(s.repetition_penalty);
            }
            if s.ignore_eos {
                body["ignore_eos"] = json!(true);
            }
            if !s.stop_token_ids.is_empty() {
                body["stop_token_ids"] = json!(s.stop_token_ids);
            }
        }
        // vLLM salts its own prefix cache with it (other engines are refused in `unsupported`).
        if let Some(salt) = &s.cache_salt {
            body["cache_salt"] = json!(salt);
        }
        if let Some(constraint) = &s.constraint {
            add_constraint(engine, constraint, &mut body);
        }
        if !s.logit_bias.is_empty() {
            let bias: serde_json::Map<String, Value> = s
                .logit_bias
                .iter()
                .map(|(t, b)| (t.to_string(), json!(b)))
                .collect();
            body["logit_bias"] = Value::Object(bias);
        }
        return body;
    }
    let mut body = json!({
        "prompt": request.prompt,
        "n_predict": s.max_tokens,
        "stream": true,
        "return_tokens": true,
        "cache_prompt": true,
        "temperature": s.temperature,
        "top_p": s.top_p,
        "top_k": s.top_k,
        "min_p": s.min_p,
        "presence_penalty": s.presence_penalty,
        "frequency_penalty": s.frequency_penalty,
        "repeat_penalty": s.repetition_penalty,
        // Penalties over the whole sequence, as the native engine applies them (llama.cpp's
        // default is the last 64 tokens; it takes no -1 here).
        "repeat_last_n": request.prompt.len() + s.max_tokens as usize,
        "ignore_eos": s.ignore_eos,
        "seed": seed.map_or(json!(-1), |v| json!(v)),
    });
    if !s.logit_bias.is_empty() {
        body["logit_bias"] = json!(
            s.logit_bias
                .iter()
                .map(|(t, b)| json!([t, b]))
                .collect::<Vec<_>>()
        );
    }
    if let Some(n) = s.logprobs {
        body["n_probs"] = json!(n);
    }
    if let Some(constraint) = &s.constraint {
        add_constraint(engine, constraint, &mut body);
    }
    body
}

/// Puts a structured-output constraint into `engine`'s request body, in that server's own
/// terms: vLLM's `structured_outputs` (vLLM 0.10.2 and later), SGLang's `json_schema` and
/// `regex`, llama-server's `json_schema` and GBNF `grammar`. What an engine cannot take (see
/// [`constraint_unsupported`]) never gets here: the frontend has refused it.
fn add_constraint(engine: WireEngine, constraint: &Constraint, body: &mut Value) {
    let schema = |text: &str| serde_json::from_str::<Value>(text).unwrap_or(Value::Null);
    match (engine, constraint) {
        (WireEngine::Vllm, Constraint::JsonSchema(text)) => {
            body["structured_outputs"] = json!({ "json": schema(text) });
        }
        (WireEngine::Vllm, Constraint::Regex(regex)) => {
            body["structured_outputs"] = json!({ "regex": regex });
        }
        (WireEngine::Vllm, Constraint::Choice(choices)) => {
            body["structured_outputs"] = json!({ "choice": choices });
        }
        (WireEngine::Sglang, Constraint::JsonSchema(text)) => {
            body["json_schema"] = json!(text);
        }
        (WireEngine::Sglang, Constraint::Regex(regex)) => body["regex"] = json!(regex),
        (WireEngine::Sglang, Constraint::Choice(choices)) => {
            body["regex"] = json!(choice_regex(choices));
        }
        (WireEngine::LlamaCpp, Constraint::JsonSchema(text)) => {
            body["json_schema"] = schema(text);
        }
        (WireEngine::LlamaCpp, Constraint::Choice(choices)) => {
            body["grammar"] = json!(choice_gbnf(choices));
        }
        _ => {}
    }
}

/// Why `engine` cannot take `constraint`, if it cannot.
fn constraint_unsupported(engine: WireEngine, constraint: &Constraint) -> Option<&'static str> {
    match (engine, constraint) {
        (WireEngine::Vllm | WireEngine::Sglang, Constraint::Lark(_)) => Some(
            "forced tool calls and Lark grammars (`guided_grammar`) are not supported on this \
             engine's workers; JSON schemas, regexes and choices are",
        ),
        (WireEngine::LlamaCpp, Constraint::Regex(_) | Constraint::Lark(_)) => Some(
            "forced tool calls, regexes and Lark grammars are not supported on this engine's \
             workers; JSON schemas and choices are",
        ),
        (WireEngine::OpenAi, _) => {
            Some("structured output is not supported on this engine's workers")
        }
        _ => None,
    }
}

/// A regular expression matching exactly one of `choices`.
fn choice_regex(choices: &[String]) -> String {
    let mut out = String::from("(");
    for (i, choice) in choices.iter().enumerate() {
        if i > 0 {
            out.push('|');
        }
        for c in choice.chars() {
            if "\\.^$|?*+()[]{}".contains(c) {
                out.push('\\');
            }
            out.push(c);
        }
    }
    out.push(')');
    out
}

/// A GBNF grammar (llama.cpp's) whose root is exactly one of `choices`.
fn choice_gbnf(choices: &[String]) -> String {
    let mut out = String::from("root ::= ");
    for (i, choice) in choices.iter().enumerate() {
        if i > 0 {
            out.push_str(" | ");
        }
        out.push('"');
        for c in choice.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                c => out.push(c),
            }
        }
        out.push('"');
    }
    out
}

/// The field the adapter cannot pass to `engine` faithfully, and why, if any: the frontend
/// refuses such a request with a 400 naming the engine (and the worker again, should one reach
/// it) rather than serve something other than what was asked.
pub fn unsupported(
    engine: WireEngine,
    sampling: &SamplingParams,
) -> Option<(&'static str, String)> {
    let name = super::server::engine_name(engine);
    let refuse = |field: &'static str| {
        Some((
            field,
            format!("`{field}` is not supported on workers of engine \"{name}\""),
        ))
    };
    if let Some(why) = sampling
        .constraint
        .as_ref()
        .and_then(|c| constraint_unsupported(engine, c))
    {
        return Some(("response_format", format!("{why} (engine \"{name}\")")));
    }
    // Only vLLM salts its prefix cache: on any other engine a salted request could hit another
    // tenant's cached blocks, so it is refused rather than served unisolated.
    if sampling.cache_salt.is_some() && engine != WireEngine::Vllm {
        return refuse("cache_salt");
    }
    // vLLM and SGLang take the native sampling fields too (`body`); a plain OpenAI server
    // does not.
    if engine == WireEngine::OpenAi {
        if sampling.top_k != 0 {
            return refuse("top_k");
        }
        if sampling.min_p != 0.0 {
            return refuse("min_p");
        }
        if sampling.repetition_penalty != 1.0 {
            return refuse("repetition_penalty");
        }
        if sampling.ignore_eos {
            return refuse("ignore_eos");
        }
        if !sampling.stop_token_ids.is_empty() {
            return refuse("stop_token_ids");
        }
    }
    // OpenAI servers give logprobs keyed by token text, not ids: not mapped yet.
    if engine.openai_api() && sampling.logprobs.is_some() {
        return refuse("logprobs");
    }
    None
}

/// Streams one request; `on` gets each update. Returns the error text (naming the engine) if
/// it failed.
pub async fn stream(
    client: &reqwest::Client,
    base: &str,
    engine: WireEngine,
    request: &WireRequest,
    mut on: impl FnMut(Update),
) -> Result<(), String> {
    let name = super::server::engine_name(engine);
    let path = if engine.openai_api() {
        "/v1/completions"
    } else {
        "/completion"
    };
    let send = client
        .post(format!("{base}{path}"))
        .json(&body(engine, request))
        .send();
    let mut response = tokio::time::timeout(IDLE_TIMEOUT, send)
        .await
        .map_err(|_| format!("{name}: no answer within {IDLE_TIMEOUT:?}"))?
        .map_err(|e| format!("{name}: {:#}", anyhow::Error::new(e)))?;
    let status = response.status();
    if !status.is_success() {
        let text = response.text().await.unwrap_or_default();
        return Err(format!(
            "{name} answered {status}: {}",
            error_message(&text)
        ));
    }
    let stop_ids = &request.sampling.stop_token_ids;
    let mut buf: Vec<u8> = Vec::new();
    let mut generated = 0u32;
    loop {
        let chunk = tokio::time::timeout(IDLE_TIMEOUT, response.chunk())
            .await
            .map_err(|_| format!("{name}: silent for {IDLE_TIMEOUT:?} mid-request"))?
            .map_err(|e| format!("{name}: reading the stream: {:#}", anyhow::Error::new(e)))?;
        let Some(chunk) = chunk else {
            return Err(format!(
                "{name}: the stream ended before the request finished"
            ));
        };
        buf.extend_from_slice(&chunk);
        while let Some(end) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line);
            let line = line.trim();
            if line.is_empty() || line.starts_with(':') {
                continue;
            }
            let Some(data) = line.strip_prefix("data:").map(str::trim) else {
                if let Some(error) = line.strip_prefix("error:") {
                    return Err(format!("{name}: {}", error_message(error.trim())));
                }
                return Err(format!("{name} answered garbage: {}", clip(line)));
            };
            if data == "[DONE]" {
                return Err(format!("{name}: the stream ended without a finish reason"));
            }
            let value: Value = serde_json::from_str(data)
                .map_err(|e| format!("{name} answered garbage ({e}): {}", clip(data)))?;
            if value.get("error").is_some() {
                return Err(format!("{name}: {}", error_message(data)));
            }
            let parsed = if engine.openai_api() {
                parse_openai(&value)
            } else {
                parse_llamacpp(&value)
            }
            .map_err(|e| format!("{name} answered garbage ({e}): {}", clip(data)))?;
            let (mut chunk, mut end) = parsed;
            // Stop token ids: llama.cpp has none of its own; the stop token is the last one
            // output, as on native workers.
            if let Some(chunk) = chunk.as_mut()
                && let Some(at) = chunk.tokens.iter().position(|t| stop_ids.contains(t))
            {
                chunk.tokens.truncate(at + 1);
                if let Some(lp) = chunk.logprobs.as_mut() {
                    lp.truncate(at + 1);
                }
                end = Some(Update::Done {
                    reason: FinishReason::Stop,
                    cached_tokens: 0,
                });
            }
            if let Some(chunk) = chunk.filter(|c| !c.tokens.is_empty()) {
                generated += chunk.tokens.len() as u32;
                on(Update::Tokens(chunk));
            }
            if let Some(end) = end {
                on(end);
                return Ok(());
            }
            if generated > request.sampling.max_tokens {
                return Err(format!(
                    "{name}: generated {generated} tokens for max_tokens {}",
                    request.sampling.max_tokens
                ));
            }
        }
    }
}

type Parsed = (Option<TokenChunk>, Option<Update>);

fn parse_llamacpp(v: &Value) -> Result<Parsed, String> {
    let tokens = ids(v.get("tokens"))?;
    let logprobs = match v.get("completion_probabilities").and_then(Value::as_array) {
        Some(probs) => Some(probs.iter().map(logprob).collect::<Result<Vec<_>, _>>()?),
        None => None,
    };
    let chunk = TokenChunk {
        logprobs: logprobs.filter(|l| l.len() == tokens.len()),
        tokens,
    };
    let stop = v
        .get("stop")
        .and_then(Value::as_bool)
        .ok_or("no \"stop\" field")?;
    let end = stop.then(|| {
        let reason = match v.get("stop_type").and_then(Value::as_str) {
            Some("limit") => FinishReason::Length,
            _ => FinishReason::Stop,
        };
        let cached_tokens = v
            .pointer("/timings/cache_n")
            .and_then(Value::as_u64)
            .unwrap_or(0);
        Update::Done {
            reason,
            cached_tokens,
        }
    });
    Ok((Some(chunk), end))
}

fn parse_openai(v: &Value) -> Result<Parsed, String> {
    let Some(choice) = v.pointer("/choices/0") else {
        // A usage-only chunk.
        return Ok((None, None));
    };
    let tokens = match choice.get("token_ids") {
        Some(ids_value) => ids(Some(ids_value))?,
        None if choice.get("text").and_then(Value::as_str) == Some("") => Vec::new(),
        None => {
            return Err(
                "no token_ids in the choice (the server must return token ids, as vLLM's \
                 return_token_ids does)"
                    .into(),
            );
        }
    };
    let end = match choice.get("finish_reason").and_then(Value::as_str) {
        None => None,
        Some("length") => Some(FinishReason::Length),
        Some(_) => Some(FinishReason::Stop),
    }
    .map(|reason| Update::Done {
        reason,
        cached_tokens: 0,
    });
    Ok((Some(TokenChunk::tokens(tokens)), end))
}

fn ids(v: Option<&Value>) -> Result<Vec<u32>, String> {
    let Some(v) = v else {
        return Ok(Vec::new());
    };
    v.as_array()
        .ok_or("token ids are not an array")?
        .iter()
        .map(|t| {
            t.as_u64()
                .and_then(|t| u32::try_from(t).ok())
                .ok_or_else(|| format!("token id {t} is not a u32"))
        })
        .collect()
}

fn logprob(v: &Value) -> Result<TokenLogprob, String> {
    let token = |v: &Value| {
        v.get("id")
            .and_then(Value::as_u64)
            .and_then(|t| u32::try_from(t).ok())
            .ok_or("a probability without a token id")
    };
    let lp = |v: &Value| {
        v.get("logprob")
            .and_then(Value::as_f64)
            .map(|l| (l as f32).max(f32::MIN))
            .ok_or("a probability without a logprob")
    };
    let top = v
        .get("top_logprobs")
        .and_then(Value::as_array)
        .map(|top| {
            top.iter()
                .map(|t| {
                    Ok(TopLogprob {
                        token: token(t)?,
                        logprob: lp(t)?,
                    })
                })
                .collect::<Result<Vec<_>, &str>>()
        })
        .transpose()?
        .unwrap_or_default();
    Ok(TokenLogprob {
        token: token(v)?,
        logprob: lp(v)?,
        top,
    })
}

/// The message of an OpenAI-style error body, or the body itself (clipped).
fn error_message(text: &str) -> String {
    serde_json::from_str::<Value>(text)
        .ok()
        .and_then(|v| {
            v.pointer("/error/message")
                .or_else(|| v.get("message"))
                .and_then(Value::as_str)
                .map(str::to_owned)
        })
        .unwrap_or_else(|| clip(text))
}

fn clip(text: &str) -> String {
    text.chars().take(200).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llamacpp_chunks_parse_and_garbage_is_an_error() {
        let partial = json!({"content": "hi", "tokens": [5, 6], "stop": false});
        assert_eq!(
            parse_llamacpp(&partial).unwrap(),
            (Some(TokenChunk::tokens(vec![5, 6])), None)
        );
        let last = json!({"tokens": [], "stop": true, "stop_type": "limit",
            "timings": {"cache_n": 32, "prompt_n": 4}});
        assert_eq!(
            parse_llamacpp(&last).unwrap().1,
            Some(Update::Done {
                reason: FinishReason::Length,
                cached_tokens: 32
            })
        );
        assert!(parse_llamacpp(&json!({"tokens": ["x"], "stop": false})).is_err());
        assert!(parse_llamacpp(&json!({"hello": 1})).is_err());
        let with_probs = json!({"tokens": [7], "stop": false, "completion_probabilities": [
            {"id": 7, "logprob": -0.5, "top_logprobs": [{"id": 7, "logprob": -0.5}, {"id": 9, "logprob": -1.5}]}]});
        let chunk = parse_llamacpp(&with_probs).unwrap().0.unwrap();
        assert_eq!(chunk.logprobs.unwrap()[0].top[1].token, 9);
    }

    #[test]
    fn bodies_carry_the_sampling_fields() {
        let mut sampling = SamplingParams::greedy(8);
        sampling.seed = Some(42);
        sampling.logit_bias = vec![(3, -100.0)];
        let request = WireRequest {
            seq: 1,
            request_id: "r".into(),
            prompt: vec![1, 2, 3],
            block_hashes: Vec::new(),
            sampling,
            export_kv: false,
            kv_blocks: 0,
            kv_origin: None,
        };
        let b = body(WireEngine::LlamaCpp, &request);
        assert_eq!(b["prompt"], json!([1, 2, 3]));
        assert_eq!(b["n_predict"], 8);
        assert_eq!(b["seed"], 42);
        assert_eq!(b["cache_prompt"], true);
        assert_eq!(b["logit_bias"], json!([[3, -100.0]]));
        let o = body(WireEngine::OpenAi, &request);
        assert_eq!(o["max_tokens"], 8);
        assert_eq!(o["logit_bias"], json!({"3": -100.0}));
    }

    fn constrained(constraint: Constraint) -> WireRequest {
        let mut sampling = SamplingParams::greedy(8);
        sampling.constraint = Some(constraint);
        WireRequest {
            seq: 1,
            request_id: "r".into(),
            prompt: vec![1, 2, 3],
            block_hashes: Vec::new(),
            sampling,
            export_kv: false,
            kv_blocks: 0,
            kv_origin: None,
        }
    }

    #[test]
    fn structured_output_reaches_each_engine_in_its_own_terms() {
        let schema = r#"{"type":"object","required":["a"]}"#;
        let json = constrained(Constraint::JsonSchema(schema.into()));
        let choice = constrained(Constraint::Choice(vec![
            "a.b".into(),
            "c|d".into(),
            "say \"hi\"\n".into(),
        ]));
        let regex = constrained(Constraint::Regex("[0-9]+".into()));

        let v = body(WireEngine::Vllm, &json);
        assert_eq!(v["structured_outputs"]["json"]["required"], json!(["a"]));
        assert_eq!(
            body(WireEngine::Vllm, &regex)["structured_outputs"]["regex"],
            "[0-9]+"
        );
        assert_eq!(
            body(WireEngine::Vllm, &choice)["structured_outputs"]["choice"][1],
            "c|d"
        );

        assert_eq!(body(WireEngine::Sglang, &json)["json_schema"], schema);
        assert_eq!(body(WireEngine::Sglang, &regex)["regex"], "[0-9]+");
        assert_eq!(
            body(WireEngine::Sglang, &choice)["regex"],
            "(a\\.b|c\\|d|say \"hi\"\n)"
        );

        assert_eq!(
            body(WireEngine::LlamaCpp, &json)["json_schema"]["required"],
            json!(["a"])
        );
        assert_eq!(
            body(WireEngine::LlamaCpp, &choice)["grammar"],
            r#"root ::= "a.b" | "c|d" | "say \"hi\"\n""#
        );
        // Nothing is added for a plain OpenAI server: it is refused instead (below).
        let o = body(WireEngine::OpenAi, &json);
        assert!(o.get("structured_outputs").is_none() && o.get("json_schema").is_none());
    }

    #[test]
    fn what_an_engine_cannot_take_is_refused_naming_it() {
        let refused = |engine, request: &WireRequest| {
            unsupported(engine, &request.sampling).map(|(field, why)| {
                assert!(
                    why.contains(super::super::server::engine_name(engine)),
                    "{why}"
                );
                field
            })
        };
        let lark = constrained(Constraint::Lark("start: \"x\"".into()));
        let regex = constrained(Constraint::Regex("x".into()));
        let json = constrained(Constraint::JsonSchema("{}".into()));
        assert_eq!(refused(WireEngine::Vllm, &lark), Some("response_format"));
        assert_eq!(refused(WireEngine::Sglang, &lark), Some("response_format"));
        assert_eq!(
            refused(WireEngine::LlamaCpp, &regex),
            Some("response_format")
        );
        assert_eq!(refused(WireEngine::OpenAi, &json), Some("response_format"));
        for engine in [WireEngine::Vllm, WireEngine::Sglang, WireEngine::LlamaCpp] {
            assert_eq!(refused(engine, &json), None);
        }
        assert_eq!(refused(WireEngine::Vllm, &regex), None);

        // vLLM and SGLang take the native sampling fields; a plain OpenAI server does not.
        let mut extras = SamplingParams::greedy(8);
        extras.top_k = 40;
        extras.min_p = 0.05;
        extras.repetition_penalty = 1.1;
        extras.ignore_eos = true;
        extras.stop_token_ids = vec![7];
        let request = WireRequest {
            sampling: extras,
            ..constrained(Constraint::Choice(vec!["x".into()]))
        };
        for engine in [WireEngine::Vllm, WireEngine::Sglang] {
            assert_eq!(refused(engine, &request), None);
            let b = body(engine, &request);
            assert_eq!(b["top_k"], 40);
            assert_eq!(b["ignore_eos"], true);
            assert_eq!(b["stop_token_ids"], json!([7]));
        }
        assert_eq!(refused(WireEngine::OpenAi, &request), Some("top_k"));
    }
}
