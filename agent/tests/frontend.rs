//! The agent end to end over HTTP: real worker processes (the built binary), real sockets.

mod common;

use std::time::Duration;

use common::{TestAgent, model, sse_events};
use serde_json::{Value, json};

fn chat(content: &str, max_tokens: u32) -> Value {
    json!({"model": "m", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens})
}

/// One row per bad request: what is sent, the status and error code expected, and the `param`
/// the error must name. After the table, the agent still serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_the_documented_status_and_body() {
    let agent = TestAgent::start(&format!(
        "[frontend]\nmax_body_bytes = 4096\n{}",
        model("m", 0, 256)
    ))
    .await;
    let long = "x".repeat(300);
    type Row = (
        &'static str,
        &'static str,
        &'static str,
        Vec<u8>,
        u16,
        &'static str,
        Option<&'static str>,
    );
    let body = |v: Value| serde_json::to_vec(&v).unwrap();
    let cases: Vec<Row> = vec![
        (
            "invalid JSON",
            "POST",
            "/v1/chat/completions",
            b"{\"model\": ".to_vec(),
            400,
            "invalid_json",
            None,
        ),
        (
            "not an object",
            "POST",
            "/v1/chat/completions",
            b"[]".to_vec(),
            400,
            "invalid_json",
            None,
        ),
        (
            "invalid UTF-8",
            "POST",
            "/v1/chat/completions",
            b"{\"model\": \"\xff\"}".to_vec(),
            400,
            "invalid_json",
            None,
        ),
        (
            "missing model",
            "POST",
            "/v1/chat/completions",
            body(json!({"messages": []})),
            400,
            "missing_field",
            Some("model"),
        ),
        (
            "missing messages",
            "POST",
            "/v1/chat/completions",
            body(json!({"model": "m"})),
            400,
            "missing_field",
            Some("messages"),
        ),
        (
            "missing prompt",
            "POST",
            "/v1/completions",
            body(json!({"model": "m"})),
            400,
            "missing_field",
            Some("prompt"),
        ),
        (
            "wrong-typed max_tokens",
            "POST",
            "/v1/chat/completions",
            body(json!({"model": "m", "messages": [], "max_tokens": "many"})),
            400,
            "invalid_type",
            Some("max_tokens"),
        ),
        (
            "wrong-typed messages",
            "POST",
            "/v1/chat/completions",
            body(json!({"model": "m", "messages": "hi"})),
            400,
            "invalid_type",
            Some("messages"),
        ),
        (
            "unknown model",
            "POST",
            "/v1/chat/completions",
            body(json!({"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]})),
            404,
            "model_not_found",
            Some("model"),
        ),
        (
            "empty messages",
            "POST",
            "/v1/chat/completions",
            body(json!({"model": "m", "messages": []})),
            400,
            "invalid_value",
            Some("messages"),
        ),
        (
            "unknown role",
            "POST",
            "/v1/chat/completions",
            body(json!({"model": "m", "messages": [{"role": "wizard", "content": "hi"}]})),
            400,
            "invalid_value",
            Some("messages[0].role"),
        ),
        (
            "max_tokens 0",
            "POST",
            "/v1/chat/completions",
            body(json!({"model": "m",
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0})),
            400,
            "invalid_value",
            Some("max_tokens"),
        ),
        (
            "max_tokens negative",
            "POST",
            "/v1/completions",
            body(json!({"model": "m",
            "prompt": "hi", "max_tokens": -5})),
            400,
            "invalid_value",
            Some("max_tokens"),
        ),
        (
            "max_completion_tokens over the context",
            "POST",
            "/v1/chat/completions",
            body(json!({"model": "m",
            "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 100000})),
            400,
            "context_length_exceeded",
            Some("max_completion_tokens"),
        ),
        (
            "prompt over the context",
            "POST",
            "/v1/completions",
            body(json!({"model": "m",
            "prompt": long})),
            400,
            "context_length_exceeded",
            Some("prompt"),
        ),
        (
            "empty prompt",
            "POST",
            "/v1/completions",
            body(json!({"model": "m", "prompt": ""})),
            400,
            "invalid_value",
            Some("prompt"),
        ),
        (
            "n = 17",
            "POST",
            "/v1/chat/completions",
            body(json!({"model": "m",
            "messages": [{"role": "user", "content": "hi"}], "n": 17})),
            400,
            "invalid_value",
            Some("n"),
        ),
        (
            "temperature 3",
            "POST",
            "/v1/chat/completions",
            body(json!({"model": "m",
            "messages": [{"role": "user", "content": "hi"}], "temperature": 3})),
            400,
            "invalid_value",
            Some("temperature"),
        ),
        (
            "top_p 0",
            "POST",
            "/v1/completions",
            body(json!({"model": "m", "prompt": "hi", "top_p": 0})),
            400,
            "invalid_value",
            Some("top_p"),
        ),
        (
            "five stop strings",
            "POST",
            "/v1/completions",
            body(json!({"model": "m", "prompt": "hi",
            "stop": ["a", "b", "c", "d", "e"]})),
            400,
            "invalid_value",
            Some("stop"),
        ),
        (
            "stream_options without stream",
            "POST",
            "/v1/completions",
            body(json!({"model": "m",
            "prompt": "hi", "stream_options": {"include_usage": true}})),
            400,
            "invalid_value",
            Some("stream_options"),
        ),
        (
            "token id outside the vocabulary",
            "POST",
            "/v1/completions",
            body(json!({"model": "m",
            "prompt": [1, 2, 99999]})),
            400,
            "invalid_value",
            Some("prompt"),
        ),
        (
            "top_logprobs over 20",
            "POST",
            "/v1/chat/completions",
            body(json!({"model": "m",
            "messages": [{"role": "user", "content": "hi"}], "logprobs": true,
            "top_logprobs": 21})),
            400,
            "invalid_value",
            Some("top_logprobs"),
        ),
        (
            "top_logprobs without logprobs",
            "POST",
            "/v1/chat/completions",
            body(json!({"model": "m",
            "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2})),
            400,
            "invalid_value",
            Some("top_logprobs"),
        ),
        (
            "completions logprobs over 20",
            "POST",
            "/v1/completions",
            body(json!({"model": "m", "prompt": "hi", "logprobs": 21})),
            400,
            "invalid_value",
            Some("logprobs"),
        ),
        (
            "body over the limit",
            "POST",
            "/v1/chat/completions",
            vec![b' '; 5000],
            413,
            "request_too_large",
            None,
        ),
        (
            "unknown path",
            "POST",
            "/v1/embeddings",
            body(json!({})),
            404,
            "unknown_url",
            None,
        ),
        (
            "wrong method",
            "GET",
            "/v1/chat/completions",
            Vec::new(),
            405,
            "method_not_allowed",
            None,
        ),
    ];
    for (name, method, path, body, status, code, param) in cases {
        let request = match method {
            "GET" => agent.client.get(agent.url(path)),
            _ => agent
                .client
                .post(agent.url(path))
                .header("content-type", "application/json")
                .body(body),
        };
        let response = request.send().await.unwrap();
        assert_eq!(response.status().as_u16(), status, "case {name}");
        let error: Value = response.json().await.unwrap();
        let error = &error["error"];
        assert_eq!(error["code"], code, "case {name}: {error}");
        assert!(error["type"].is_string(), "case {name}: {error}");
        assert!(
            error["message"].as_str().is_some_and(|m| !m.is_empty()),
            "case {name}: {error}"
        );
        assert_eq!(error["param"].as_str(), param, "case {name}: {error}");
    }
    // The body must be declared as JSON (a UTF-8 charset allowed): 415 otherwise, before the
    // body is read.
    let json_body = serde_json::to_vec(&chat("hi", 1)).unwrap();
    for (content_type, status) in [
        (None, 415),
        (Some("text/plain"), 415),
        (Some("application/x-www-form-urlencoded"), 415),
        (Some("application/json; charset=latin1"), 415),
        (Some("application/jsonx"), 415),
        (Some("application/json; charset=utf-8"), 200),
        (Some("Application/JSON;charset=\"UTF-8\""), 200),
    ] {
        let mut request = agent
            .client
            .post(agent.url("/v1/chat/completions"))
            .body(json_body.clone());
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), status, "Content-Type {content_type:?}");
        let body: Value = response.json().await.unwrap();
        if status == 415 {
            assert_eq!(body["error"]["code"], "unsupported_media_type", "{body}");
            assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
        }
    }
    // Still serving.
    let response = agent.post("/v1/chat/completions", chat("hello", 8)).await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["usage"]["completion_tokens"], 8);
    assert_eq!(
        agent
            .metric("kvfleet_requests_total{endpoint=\"chat_completions\",status=\"404\"}")
            .await,
        1.0
    );
}

/// Every refused field of the documented table, sent over HTTP with its example value, is a
/// 400 `unsupported_parameter` naming it; a made-up field is a 400 `unknown_parameter`; and the
/// neutral values a client sends by default are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_and_unknown_fields_are_named_never_ignored() {
    use kvfleet_agent::frontend::fields::{
        FIELDS, MESSAGE_FIELDS, On, RESPONSES_FIELDS, Treatment,
    };
    let agent = TestAgent::start(&model("m", 0, 256)).await;
    let chat_body = || chat("hi", 4);
    let completion_body = || json!({"model": "m", "prompt": "hi", "max_tokens": 4});
    let mut refused = 0;
    for field in FIELDS {
        let Treatment::Refused { example, .. } = field.treatment else {
            continue;
        };
        let paths: &[&str] = match field.on {
            On::Chat => &["/v1/chat/completions"],
            On::Completion => &["/v1/completions"],
            On::Both => &["/v1/chat/completions", "/v1/completions"],
            On::Responses => &[],
        };
        for path in paths {
            let mut body = if *path == "/v1/completions" {
                completion_body()
            } else {
                chat_body()
            };
            body[field.name] = serde_json::from_str(example).unwrap();
            let response = agent.post(path, body).await;
            assert_eq!(response.status(), 400, "{} on {path}", field.name);
            let error: Value = response.json().await.unwrap();
            assert_eq!(error["error"]["code"], "unsupported_parameter", "{error}");
            assert_eq!(error["error"]["param"], field.name, "{error}");
            refused += 1;
        }
    }
    for field in MESSAGE_FIELDS {
        let Treatment::Refused { example, .. } = field.treatment else {
            continue;
        };
        let mut body = chat_body();
        body["messages"][0][field.name] = serde_json::from_str(example).unwrap();
        let response = agent.post("/v1/chat/completions", body).await;
        assert_eq!(response.status(), 400, "messages[0].{}", field.name);
        let error: Value = response.json().await.unwrap();
        assert_eq!(
            error["error"]["param"],
            format!("messages[0].{}", field.name),
            "{error}"
        );
        refused += 1;
    }
    for field in RESPONSES_FIELDS {
        let Treatment::Refused { example, .. } = field.treatment else {
            continue;
        };
        let mut body = json!({"model": "m", "input": "hi", "max_output_tokens": 4});
        body[field.name] = serde_json::from_str(example).unwrap();
        let response = agent.post("/v1/responses", body).await;
        assert_eq!(response.status(), 400, "{} on /v1/responses", field.name);
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["error"]["code"], "unsupported_parameter", "{error}");
        assert_eq!(error["error"]["param"], field.name, "{error}");
        refused += 1;
    }
    assert!(refused >= 25, "only {refused} refusals were sent");
    let mut typo = completion_body();
    typo["max_token"] = json!(3);
    let response = agent.post("/v1/completions", typo).await;
    assert_eq!(response.status(), 400);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["code"], "unknown_parameter", "{error}");
    assert_eq!(error["error"]["param"], "max_token", "{error}");
    // What SDKs and frameworks send by default asks for nothing and is served.
    let mut defaults = chat_body();
    for (key, value) in [
        ("n", json!(1)),
        ("presence_penalty", json!(0)),
        ("frequency_penalty", json!(0.0)),
        ("logit_bias", json!({})),
        ("tools", json!([])),
        ("tool_choice", json!("none")),
        ("response_format", json!({"type": "text"})),
        ("store", json!(false)),
        ("user", json!("u-1")),
        ("metadata", json!({"team": "a"})),
        ("reasoning_effort", Value::Null),
        ("top_k", json!(-1)),
    ] {
        defaults[key] = value;
    }
    let response = agent.post("/v1/chat/completions", defaults).await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["usage"]["completion_tokens"], 4);
}

/// Tools on the mock engine: `auto` is served (its pseudo-text holds no call, so the answer is
/// content and `finish_reason` is not `tool_calls`); a forced call needs a grammar, which the
/// mock cannot follow: a 400 naming `tool_choice`; a bad definition is a 400 naming its path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tools_on_the_mock_engine_are_served_or_refused_by_name() {
    // The default tool prompt is ~700 bytes, one mock token each.
    let agent = TestAgent::start(&model("m", 0, 2048)).await;
    let tool = json!({"type": "function", "function": {"name": "f",
        "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}}}});
    let mut body = chat("hi", 4);
    body["tools"] = json!([tool]);
    let response = agent.post("/v1/chat/completions", body.clone()).await;
    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await.unwrap();
    assert!(
        answer["choices"][0]["message"]["content"].is_string(),
        "{answer}"
    );
    assert_ne!(
        answer["choices"][0]["finish_reason"], "tool_calls",
        "{answer}"
    );
    for (field, value, param) in [
        ("tool_choice", json!("required"), "tool_choice"),
        (
            "tool_choice",
            json!({"type": "function", "function": {"name": "g"}}),
            "tool_choice.function.name",
        ),
        (
            "tools",
            json!([{"type": "function", "function": {}}]),
            "tools[0].function.name",
        ),
    ] {
        let mut bad = body.clone();
        bad[field] = value;
        let response = agent.post("/v1/chat/completions", bad).await;
        assert_eq!(response.status(), 400, "{field}");
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["error"]["param"], param, "{error}");
    }
}

/// `n = 4`: four choices, indexed, usage counting the prompt once; the prompt's full blocks
/// are computed once (the other three choices find them in the worker's prefix cache, as its
/// metrics show); streamed, every choice's chunks carry its index and the usage chunk and
/// `[DONE]` come once, after all of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn n_choices_share_one_prefill() {
    let agent = TestAgent::start(&model("m", 0, 4096)).await;
    let content =
        "a prompt long enough to fill several KV blocks of sixteen tokens each, twice over";
    let response = agent
        .post(
            "/v1/chat/completions",
            json!({"model": "m", "messages": [{"role": "user", "content": content}],
                "max_tokens": 5, "n": 4}),
        )
        .await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    let choices = body["choices"].as_array().unwrap();
    let indexes: Vec<u64> = choices
        .iter()
        .map(|c| c["index"].as_u64().unwrap())
        .collect();
    assert_eq!(indexes, [0, 1, 2, 3], "{body}");
    let prompt = body["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(prompt >= 64, "{body}");
    assert_eq!(body["usage"]["completion_tokens"], 20, "{body}");
    // Prompt tokens the worker computed: the whole prompt once, and for each other choice only
    // the tail past its last full block. The worker reports its counters every 250 ms.
    let full = prompt / 16 * 16;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let (query, hit) = loop {
        let query = agent.metric("kvfleet_worker_prefix_query_tokens").await;
        let hit = agent.metric("kvfleet_worker_prefix_hit_tokens").await;
        if query >= (4 * prompt) as f64 || tokio::time::Instant::now() > deadline {
            break (query, hit);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(query, (4 * prompt) as f64);
    assert_eq!(
        hit,
        (3 * full) as f64,
        "the three later choices reuse the prompt's blocks"
    );

    let events = sse_events(
        agent
            .post(
                "/v1/completions",
                json!({"model": "m", "prompt": content, "max_tokens": 3, "n": 3,
                    "stream": true, "stream_options": {"include_usage": true}}),
            )
            .await,
    )
    .await;
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let usage: Vec<&Value> = chunks.iter().filter(|c| !c["usage"].is_null()).collect();
    assert_eq!(usage.len(), 1);
    assert_eq!(usage[0]["usage"]["completion_tokens"], 9);
    assert!(
        chunks.last().unwrap()["usage"].is_object(),
        "usage comes last"
    );
    for index in 0..3 {
        let finishes = chunks
            .iter()
            .flat_map(|c| c["choices"].as_array().unwrap())
            .filter(|c| c["index"] == index && !c["finish_reason"].is_null())
            .count();
        assert_eq!(finishes, 1, "choice {index}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_matches_non_streaming_and_reports_usage() {
    let agent = TestAgent::start(&model("m", 0, 4096)).await;
    let whole: Value = agent
        .post("/v1/chat/completions", chat("same prompt", 60))
        .await
        .json()
        .await
        .unwrap();
    let text = whole["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(whole["choices"][0]["finish_reason"], "length");
    assert_eq!(whole["object"], "chat.completion");

    let mut request = chat("same prompt", 60);
    request["stream"] = json!(true);
    request["stream_options"] = json!({"include_usage": true});
    let response = agent.post("/v1/chat/completions", request).await;
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let events = sse_events(response).await;
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"].get(0)?["delta"]["content"].as_str())
        .collect();
    assert_eq!(streamed, text, "streaming and non-streaming differ");
    let finish = &chunks[chunks.len() - 2];
    assert_eq!(finish["choices"][0]["finish_reason"], "length");
    let usage = &chunks[chunks.len() - 1];
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 60);
    assert_eq!(
        usage["usage"]["prompt_tokens"],
        whole["usage"]["prompt_tokens"]
    );

    // A stop string taken from the middle of that text cuts it there, streamed or not.
    let chars: Vec<char> = text.chars().collect();
    let stop: String = chars[20..24].iter().collect();
    let cut = &text[..text.find(&stop).unwrap()];
    for stream in [false, true] {
        let mut request = chat("same prompt", 60);
        request["stop"] = json!([stop.clone()]);
        request["stream"] = json!(stream);
        let response = agent.post("/v1/chat/completions", request).await;
        let got = if stream {
            sse_events(response)
                .await
                .iter()
                .filter(|e| *e != "[DONE]")
                .map(|e| serde_json::from_str::<Value>(e).unwrap())
                .filter_map(|c| {
                    c["choices"][0]["delta"]["content"]
                        .as_str()
                        .map(str::to_owned)
                })
                .collect::<String>()
        } else {
            let body: Value = response.json().await.unwrap();
            assert_eq!(body["choices"][0]["finish_reason"], "stop");
            body["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .to_owned()
        };
        assert_eq!(got, cut, "stream = {stream}");
    }

    // Completions endpoint, legacy shape.
    let body: Value = agent
        .post(
            "/v1/completions",
            json!({"model": "m", "prompt": "abc", "max_tokens": 5}),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(body["object"], "text_completion");
    assert_eq!(
        body["usage"],
        json!({"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8})
    );
    let models: Value = agent.get_json("/v1/models").await;
    assert_eq!(models["data"][0]["id"], "m");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_429_with_retry_after_and_the_agent_keeps_serving() {
    let agent = TestAgent::start(&format!(
        "[frontend]\nmax_in_flight = 4\nqueue_capacity = 16\nretry_after_secs = 2\n{}",
        model("m", 2000, 4096)
    ))
    .await;
    let client = reqwest::Client::builder().build().unwrap();
    let mut set = tokio::task::JoinSet::new();
    for i in 0..1000 {
        let client = client.clone();
        let url = agent.url("/v1/completions");
        set.spawn(async move {
            let response = client
                .post(url)
                .json(&json!({"model": "m", "prompt": format!("request {i}"), "max_tokens": 10}))
                .send()
                .await
                .unwrap();
            let status = response.status().as_u16();
            let retry = response
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_owned());
            let body: Value = response.json().await.unwrap();
            (status, retry, body)
        });
    }
    let (mut ok, mut rejected) = (0, 0);
    while let Some(result) = set.join_next().await {
        let (status, retry, body) = result.unwrap();
        match status {
            200 => {
                ok += 1;
                assert_eq!(body["usage"]["completion_tokens"], 10);
            }
            429 => {
                rejected += 1;
                assert_eq!(retry.as_deref(), Some("2"));
                assert_eq!(body["error"]["code"], "queue_full");
            }
            other => panic!("unexpected status {other}: {body}"),
        }
    }
    assert_eq!(ok + rejected, 1000);
    assert!(
        ok >= 20,
        "at least the slots and the queue were served: {ok}"
    );
    assert!(rejected > 0, "1000 at once must overflow a queue of 16");
    assert_eq!(agent.metric("kvfleet_queue_depth").await, 0.0);
    assert_eq!(agent.metric("kvfleet_requests_in_flight").await, 0.0);
    let response = agent
        .post("/v1/chat/completions", chat("still there?", 4))
        .await;
    assert_eq!(response.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_cancels_its_sequence_and_frees_its_blocks() {
    let agent = TestAgent::start(&model("m", 20_000, 4096)).await;
    let mut request = chat("a long one", 1000);
    request["stream"] = json!(true);
    let mut response = agent.post("/v1/chat/completions", request).await;
    // Wait for real content, so the sequence is running in the worker.
    let mut seen = 0;
    while seen < 3 {
        response.chunk().await.unwrap().unwrap();
        seen += 1;
    }
    let used = agent.metric("kvfleet_worker_kv_blocks_used{").await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut used_now = used;
    while used_now == 0.0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        used_now = agent.metric("kvfleet_worker_kv_blocks_used{").await;
    }
    assert!(used_now > 0.0, "the running sequence holds KV blocks");
    drop(response);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let cancelled = agent.metric("kvfleet_cancelled_requests_total").await;
        let used = agent.metric("kvfleet_worker_kv_blocks_used{").await;
        if cancelled == 1.0 && used == 0.0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "cancelled {cancelled}, blocks used {used}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The text of a streamed chat completion's events, and the completion tokens its usage
/// counts.
fn streamed_text(events: &[String]) -> (String, u64) {
    let mut text = String::new();
    let mut completion_tokens = 0;
    for event in events.iter().filter(|e| *e != "[DONE]") {
        let chunk: Value = serde_json::from_str(event).expect("an SSE event is JSON");
        assert!(chunk.get("error").is_none(), "an error event: {chunk}");
        if let Some(piece) = chunk["choices"][0]["delta"]["content"].as_str() {
            text.push_str(piece);
        }
        if let Some(n) = chunk["usage"]["completion_tokens"].as_u64() {
            completion_tokens = n;
        }
    }
    (text, completion_tokens)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_s_requests_resume_after_its_restart_with_the_unbroken_text() {
    // One worker, killed mid-decode: its requests (one streamed, one not) wait for its restart
    // (1 s backoff) and resume after the tokens already delivered. The client sees the same
    // text as an unbroken greedy run, each token once, and usage counting them once.
    const MAX_TOKENS: u32 = 300;
    let agent = TestAgent::start_with_backoff(&model("m", 5_000, 4096), 1000).await;
    let (_, ready) = agent.ready_status().await;
    let pid = ready["workers"][0]["pid"].as_u64().unwrap();
    assert_eq!(ready["workers"][0]["starts"], 1);
    let stream_request = |content: &str| {
        let mut request = chat(content, MAX_TOKENS);
        request["stream"] = json!(true);
        request["stream_options"] = json!({"include_usage": true});
        request
    };
    let unbroken = sse_events(
        agent
            .post("/v1/chat/completions", stream_request("in flight"))
            .await,
    )
    .await;
    let (unbroken_text, unbroken_tokens) = streamed_text(&unbroken);
    assert_eq!(unbroken_tokens, u64::from(MAX_TOKENS));
    let plain_unbroken: Value = agent
        .post("/v1/chat/completions", chat("also in flight", MAX_TOKENS))
        .await
        .json()
        .await
        .unwrap();

    let mut streaming = agent
        .post("/v1/chat/completions", stream_request("in flight"))
        .await;
    let mut received = Vec::new();
    // A few chunks (role, then tokens) before the kill: it lands mid-decode.
    for _ in 0..5 {
        received.extend_from_slice(&streaming.chunk().await.unwrap().unwrap());
    }
    let plain = tokio::spawn({
        let client = agent.client.clone();
        let url = agent.url("/v1/chat/completions");
        async move {
            client
                .post(url)
                .json(&chat("also in flight", MAX_TOKENS))
                .send()
                .await
                .unwrap()
        }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let status = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    while let Some(chunk) = streaming.chunk().await.unwrap() {
        received.extend_from_slice(&chunk);
    }
    let events: Vec<String> = String::from_utf8(received)
        .unwrap()
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: ").map(str::to_owned))
        .collect();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let (text, tokens) = streamed_text(&events);
    assert_eq!(text, unbroken_text, "nothing repeated, nothing missing");
    assert_eq!(
        tokens,
        u64::from(MAX_TOKENS),
        "usage counts each token once"
    );
    let plain = plain.await.unwrap();
    assert_eq!(plain.status(), 200);
    let plain: Value = plain.json().await.unwrap();
    assert_eq!(
        plain["choices"][0]["message"]["content"],
        plain_unbroken["choices"][0]["message"]["content"]
    );
    assert_eq!(plain["usage"]["completion_tokens"], MAX_TOKENS);
    assert_eq!(agent.metric("kvfleet_request_migrations_total").await, 2.0);

    let (_, body) = agent.ready_status().await;
    assert_eq!(body["workers"][0]["starts"], 2);
    assert_ne!(body["workers"][0]["pid"].as_u64(), Some(pid));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_guard_the_v1_routes() {
    let agent = TestAgent::start(&format!(
        "[frontend]\napi_keys = [\"sk-test-0123456789\"]\n{}",
        model("m", 0, 4096)
    ))
    .await;
    let url = agent.url("/v1/chat/completions");
    for key in [None, Some("sk-wrong-0123456789")] {
        let mut request = agent.client.post(&url).json(&chat("hi", 2));
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 401);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "invalid_api_key");
    }
    let response = agent
        .client
        .post(&url)
        .bearer_auth("sk-test-0123456789")
        .json(&chat("hi", 2))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let health = agent.client.get(agent.url("/health")).send().await.unwrap();
    assert_eq!(health.status(), 200);
}

/// `cache_salt` isolates the prefix cache: the same prompt with the same salt hits the
/// worker's cached blocks, with another salt or none it hits nothing (the worker's own prefix
/// hit counter says so). A bad salt is a 400 naming `cache_salt` that never echoes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_salts_never_share_cached_blocks() {
    let agent = TestAgent::start(&model("m", 0, 4096)).await;
    let content = "one tenant's long prompt, long enough to fill several KV blocks of sixteen";
    // Sends the prompt (salted or not) and returns (prompt tokens, prefix-hit tokens it added),
    // once the worker's counters (reported every 250 ms) show it.
    let send = |salt: Option<&'static str>| {
        let agent = &agent;
        async move {
            let before = agent.metric("kvfleet_worker_prefix_query_tokens").await;
            let hit_before = agent.metric("kvfleet_worker_prefix_hit_tokens").await;
            let mut body = json!({"model": "m", "prompt": content, "max_tokens": 1});
            if let Some(salt) = salt {
                body["cache_salt"] = json!(salt);
            }
            let response = agent.post("/v1/completions", body).await;
            assert_eq!(response.status(), 200);
            let body: Value = response.json().await.unwrap();
            let prompt = body["usage"]["prompt_tokens"].as_u64().unwrap();
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            loop {
                let query = agent.metric("kvfleet_worker_prefix_query_tokens").await;
                if query >= before + prompt as f64 || tokio::time::Instant::now() > deadline {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let hit = agent.metric("kvfleet_worker_prefix_hit_tokens").await - hit_before;
            (prompt, hit as u64)
        }
    };
    let (prompt, first) = send(Some("tenant-a")).await;
    let full = prompt / 16 * 16;
    assert!(full >= 48, "{prompt}");
    assert_eq!(first, 0, "a cold cache");
    assert_eq!(
        send(Some("tenant-a")).await.1,
        full,
        "the same salt shares its blocks"
    );
    assert_eq!(
        send(Some("tenant-b")).await.1,
        0,
        "another salt shares nothing"
    );
    assert_eq!(send(None).await.1, 0, "nor does an unsalted request");
    assert_eq!(
        send(None).await.1,
        full,
        "unsalted requests share with each other"
    );
    assert_eq!(send(Some("tenant-b")).await.1, full);

    let long = "s".repeat(1025);
    for salt in [json!(""), json!(long), json!(42)] {
        let response = agent
            .post(
                "/v1/chat/completions",
                json!({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                    "max_tokens": 1, "cache_salt": salt}),
            )
            .await;
        assert_eq!(response.status(), 400, "{salt}");
        let error: Value = response.json().await.unwrap();
        let text = error.to_string();
        assert!(text.contains("cache_salt"), "{salt}: {error}");
        assert!(!text.contains(&long), "the salt is never echoed");
    }
}

/// Without API keys, `keyless_rate_limit` gives each client IP a token bucket: over it, 429
/// `rate_limit_exceeded` with `Retry-After` and an OpenAI error, counted in
/// `kvfleet_rate_limited_keyless_total`; another address has its own bucket; `/health` and
/// `/metrics` are not limited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyless_clients_are_rate_limited_per_ip() {
    let agent = TestAgent::start(&format!(
        "[frontend]\n[frontend.keyless_rate_limit]\nrequests_per_sec = 0.2\nburst = 2\n{}",
        model("m", 0, 4096)
    ))
    .await;
    let url = agent.url("/v1/chat/completions");
    for _ in 0..2 {
        let response = agent.post("/v1/chat/completions", chat("hi", 2)).await;
        assert_eq!(response.status(), 200);
    }
    let refused = agent.post("/v1/chat/completions", chat("hi", 2)).await;
    assert_eq!(refused.status(), 429);
    assert_eq!(refused.headers()["retry-after"], "5");
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    assert_eq!(body["error"]["type"], "rate_limit_error");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("without an API key"),
        "{body}"
    );
    let models = agent
        .client
        .get(agent.url("/v1/models"))
        .send()
        .await
        .unwrap();
    assert_eq!(models.status(), 429, "every /v1 route shares the bucket");
    for _ in 0..5 {
        let health = agent.client.get(agent.url("/health")).send().await.unwrap();
        assert_eq!(health.status(), 200);
    }
    // Another loopback address is another client.
    let other = reqwest::Client::builder()
        .local_address(std::net::IpAddr::from([127, 0, 0, 2]))
        .build()
        .unwrap();
    let response = other.post(&url).json(&chat("hi", 2)).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        agent.metric("kvfleet_rate_limited_keyless_total").await,
        2.0
    );
}

/// Each key has its own token bucket: after its burst a key gets 429 `rate_limit_exceeded`
/// with `Retry-After` (the time to its next token, rounded up), while another key keeps being
/// served; refusals are counted by the key's name, never the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_have_their_own_rate_limits() {
    const SLOW: &str = "sk-slow-0123456789";
    const OTHER: &str = "sk-other-0123456789";
    let agent = TestAgent::start(&format!(
        "[frontend]\napi_keys = [\"{OTHER}\"]\n\
         [frontend.rate_limit]\nrequests_per_sec = 1000\nburst = 1000\n\
         [[frontend.keys]]\nname = \"slow\"\nkey = \"{SLOW}\"\n\
         requests_per_sec = 0.2\nburst = 2\n{}",
        model("m", 0, 4096)
    ))
    .await;
    let send = |key: &'static str| {
        agent
            .client
            .post(agent.url("/v1/chat/completions"))
            .bearer_auth(key)
            .json(&chat("hi", 1))
            .send()
    };
    for _ in 0..2 {
        assert_eq!(send(SLOW).await.unwrap().status(), 200);
    }
    let refused = send(SLOW).await.unwrap();
    assert_eq!(refused.status(), 429);
    // 0.2 tokens/s: the next one is 5 s away.
    assert_eq!(
        refused.headers()["retry-after"].to_str().unwrap(),
        "5",
        "{:?}",
        refused.headers()
    );
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limit_exceeded", "{body}");
    assert_eq!(body["error"]["type"], "rate_limit_error", "{body}");
    // The other key is untouched by the first one's spending.
    for _ in 0..5 {
        assert_eq!(send(OTHER).await.unwrap().status(), 200);
    }
    // Cheap routes count too; the slow key is still out.
    let models = agent
        .client
        .get(agent.url("/v1/models"))
        .bearer_auth(SLOW)
        .send()
        .await
        .unwrap();
    assert_eq!(models.status(), 429);
    let text = agent.metrics_text().await;
    assert!(
        text.contains("kvfleet_rate_limited_total{key=\"slow\"} 2"),
        "{text}"
    );
    assert!(
        !text.contains("key-0\"} "),
        "the other key was never limited: {text}"
    );
    assert!(!text.contains(SLOW) && !text.contains(OTHER));
}

/// A key's tokens per minute: each request reserves its prompt plus `max_tokens` and is
/// charged its usage; when the bucket cannot cover the next one it gets 429 with `Retry-After`
/// (and one larger than a whole minute's worth is told so), counted by the key's name, while
/// another key keeps being served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_have_tokens_per_minute_limits() {
    const TPM: &str = "sk-tpm-0123456789";
    const OTHER: &str = "sk-other-0123456789";
    let agent = TestAgent::start(&format!(
        "[frontend]\napi_keys = [\"{OTHER}\"]\n\
         [frontend.rate_limit]\ntokens_per_minute = 1000000\n\
         [[frontend.keys]]\nname = \"tpm\"\nkey = \"{TPM}\"\ntokens_per_minute = 120\n{}",
        model("m", 0, 4096)
    ))
    .await;
    let send = |key: &'static str, max_tokens: u32| {
        agent
            .client
            .post(agent.url("/v1/completions"))
            .bearer_auth(key)
            .json(&json!({"model": "m", "prompt": "0123456789", "max_tokens": max_tokens}))
            .send()
    };
    let mut charged = 0;
    for _ in 0..2 {
        let response = send(TPM, 40).await.unwrap();
        assert_eq!(response.status(), 200);
        let body: Value = response.json().await.unwrap();
        charged += body["usage"]["total_tokens"].as_u64().unwrap();
    }
    assert!((90..=110).contains(&charged), "{charged}");
    let refused = send(TPM, 40).await.unwrap();
    assert_eq!(refused.status(), 429);
    let wait: u64 = refused.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&wait), "{wait}");
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limit_exceeded", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("tokens-per-minute"),
        "{body}"
    );
    let too_big = send(TPM, 500).await.unwrap();
    assert_eq!(too_big.status(), 429);
    let body: Value = too_big.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("more than"),
        "{body}"
    );
    // Another key is untouched.
    for _ in 0..3 {
        assert_eq!(send(OTHER, 40).await.unwrap().status(), 200);
    }
    let text = agent.metrics_text().await;
    assert!(
        text.contains("kvfleet_rate_limited_tokens_total{key=\"tpm\"} 2"),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "kvfleet_key_tokens_total{{key=\"tpm\"}} {charged}"
        )),
        "charged its usage, not its reservation: {text}"
    );
    assert!(!text.contains(TPM) && !text.contains(OTHER));
}

/// With `metrics_listen`, `/metrics` and `/ready` are served there and not on the API port
/// (which keeps `/v1/*` and `/health`); the metrics address serves nothing of the API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_ready_can_have_their_own_address() {
    let agent = TestAgent::start(&format!(
        "[frontend]\nmetrics_listen = \"127.0.0.1:0\"\n{}",
        model("m", 0, 4096)
    ))
    .await;
    let metrics_addr = agent.running.metrics_addr.expect("metrics_listen is bound");
    assert_ne!(metrics_addr, agent.addr);
    let get = |url: String| agent.client.get(url).send();
    // The API port: the API and /health, no /metrics or /ready.
    assert_eq!(
        agent
            .post("/v1/chat/completions", chat("hi", 2))
            .await
            .status(),
        200
    );
    assert_eq!(get(agent.url("/health")).await.unwrap().status(), 200);
    for path in ["/metrics", "/ready"] {
        let response = get(agent.url(path)).await.unwrap();
        assert_eq!(response.status(), 404, "{path} on the API port");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "unknown_url", "{body}");
    }
    // The metrics address: /metrics (counting the request above), /ready, nothing of the API.
    let text = get(agent.metrics_url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.contains("kvfleet_requests_total{endpoint=\"chat_completions\",status=\"200\"} 1"),
        "{text}"
    );
    assert_eq!(
        get(agent.metrics_url("/ready")).await.unwrap().status(),
        200
    );
    assert_eq!(
        get(agent.metrics_url("/v1/models")).await.unwrap().status(),
        404
    );
    let response = agent
        .client
        .post(agent.metrics_url("/v1/chat/completions"))
        .json(&chat("hi", 2))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_in_flight_requests_and_refuses_new_ones() {
    let mut agent = TestAgent::start(&model("m", 10_000, 4096)).await;
    let mut request = chat("finish me", 50);
    request["stream"] = json!(true);
    let mut response = agent.post("/v1/chat/completions", request).await;
    response.chunk().await.unwrap().unwrap();
    agent.trigger_shutdown();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(agent.running.frontend.is_draining());
    // New connections are refused (the listener is closed).
    assert!(agent.client.get(agent.url("/health")).send().await.is_err());
    let mut rest = String::new();
    while let Some(chunk) = response.chunk().await.unwrap() {
        rest.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(rest.trim_end().ends_with("data: [DONE]"), "{rest}");
    let result = agent.task.take().unwrap().await.unwrap();
    assert!(result.is_ok());
}

/// The official `openai` Python SDK against the agent. Skips, saying why, when `python3` or the
/// `openai` package is missing (`pip install openai`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_openai_python_sdk_works() {
    let probe = std::process::Command::new("python3")
        .args(["-c", "import openai"])
        .output();
    if !probe.is_ok_and(|o| o.status.success()) {
        eprintln!(
            "SKIPPED: python3 with the `openai` package is not installed (pip install openai)"
        );
        return;
    }
    let agent = TestAgent::start(&model("m", 0, 4096)).await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk/openai_sdk.py");
    let base = format!("http://{}", agent.addr);
    let output = tokio::process::Command::new("python3")
        .args([script, &base, "m"])
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

/// systemd sees READY=1 only once the workers are ready, STATUS= lines, watchdog pings, and
/// STOPPING=1 when the agent drains.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_hears_ready_watchdog_and_stopping() {
    use kvfleet_agent::systemd::Notifier;
    let dir = std::env::temp_dir().join(format!("kvfleet-notify-it-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("notify.sock");
    let _ = std::fs::remove_file(&path);
    let socket = tokio::net::UnixDatagram::bind(&path).unwrap();
    let notifier = Notifier::from_values(path.to_str(), Some("2000000"), None);
    let agent = TestAgent::start_notified(&model("m", 0, 4096), notifier).await;
    let mut messages = Vec::new();
    let mut buf = vec![0u8; 512];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let wanted = |messages: &[String]| {
        messages.iter().any(|m| m == "WATCHDOG=1")
            && messages.iter().any(|m| m == "READY=1")
            && messages
                .iter()
                .any(|m| m.starts_with("STATUS=1/1 workers ready"))
    };
    while !wanted(&messages) {
        let n = tokio::time::timeout_at(deadline, socket.recv(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("missing notifications after 10 s: {messages:?}"))
            .unwrap();
        messages.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    // Readiness is announced once, and no status before it claims a ready worker.
    let ready_at = messages.iter().position(|m| m == "READY=1").unwrap();
    assert_eq!(messages.iter().filter(|m| *m == "READY=1").count(), 1);
    assert!(
        !messages[..ready_at]
            .iter()
            .any(|m| m.starts_with("STATUS=1/1")),
        "{messages:?}"
    );
    agent.stop().await.unwrap();
    let mut rest = Vec::new();
    while let Ok(Ok(n)) =
        tokio::time::timeout(Duration::from_millis(200), socket.recv(&mut buf)).await
    {
        rest.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    assert!(rest.iter().any(|m| m == "STOPPING=1"), "{rest:?}");
    assert!(
        rest.iter().any(|m| m.starts_with("STATUS=draining")),
        "{rest:?}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `kvfleet-agent check-config` prints every problem with file:line:col and exits 1; a good
/// file exits 0.
#[test]
fn check_config_prints_every_problem_with_its_location() {
    let dir = std::env::temp_dir().join(format!("kvfleet-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.toml");
    std::fs::write(
        &bad,
        "[frontend]\nlisten = \"nowhere\"\n[log]\nformat = \"xml\"\n[[workers]]\nmodel = \"nope\"\n",
    )
    .unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_kvfleet-agent"))
        .arg("check-config")
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    let name = bad.display().to_string();
    for expected in [
        format!("{name}:2:10: \"nowhere\" is not a socket address"),
        format!("{name}:4:10: log format \"xml\" is unknown"),
        format!("{name}:6:9: workers.model \"nope\" is not one of the models defined"),
        format!("{name}: 3 problem(s)"),
    ] {
        assert!(
            stderr.contains(&expected),
            "missing {expected:?} in:\n{stderr}"
        );
    }
    let good = concat!(env!("CARGO_MANIFEST_DIR"), "/../packaging/agent.toml");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_kvfleet-agent"))
        .args(["check-config", good])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(String::from_utf8_lossy(&output.stdout).contains(": OK ("));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `org.kvfleet.Agent1` on a private `dbus-daemon`: Status, Drain (the node leaves rotation),
/// Resume. Skips, saying why, without `dbus-daemon`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dbus_interface_reports_drains_and_resumes() {
    let dir = std::env::temp_dir().join(format!("kvfleet-dbus-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("bus");
    let address = format!("unix:path={}", socket.display());
    let daemon = std::process::Command::new("dbus-daemon")
        .args(["--session", "--fork", "--print-pid", "--nopidfile"])
        .arg(format!("--address={address}"))
        .output();
    let Ok(daemon) = daemon.map_err(|e| eprintln!("SKIPPED: no dbus-daemon ({e})")) else {
        return;
    };
    assert!(
        daemon.status.success(),
        "{}",
        String::from_utf8_lossy(&daemon.stderr)
    );
    let pid = String::from_utf8_lossy(&daemon.stdout).trim().to_owned();
    let agent = TestAgent::start_on_bus(
        &model("m", 0, 4096),
        kvfleet_agent::dbus::Bus::Address(address.clone()),
    )
    .await;
    let client = zbus::connection::Builder::address(address.as_str())
        .build()
        .await
        .unwrap();
    let call = |method: &'static str| {
        let client = client.clone();
        async move {
            client
                .call_method(
                    Some("org.kvfleet.Agent"),
                    "/org/kvfleet/Agent",
                    Some("org.kvfleet.Agent1"),
                    method,
                    &(),
                )
                .await
                .unwrap()
        }
    };
    let status: String = call("Status").await.body().deserialize().unwrap();
    let status: Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["ready"], true, "{status}");
    assert_eq!(status["workers"][0]["state"], "ready");

    call("Drain").await;
    let (code, body) = agent.ready_status().await;
    assert_eq!(code, 503);
    assert_eq!(body["draining"], true);
    let refused = agent.post("/v1/chat/completions", chat("hi", 2)).await;
    assert_eq!(refused.status(), 503);
    assert!(refused.headers().contains_key("retry-after"));
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "draining");

    call("Resume").await;
    assert_eq!(agent.ready_status().await.0, 200);
    assert_eq!(
        agent
            .post("/v1/chat/completions", chat("hi", 2))
            .await
            .status(),
        200
    );

    drop(agent);
    let _ = std::process::Command::new("kill").arg(&pid).status();
    let _ = std::fs::remove_dir_all(&dir);
}

/// `/metrics` is one registry's exposition: every family has its help text and type (checked
/// here, and by Prometheus's own `promtool check metrics` when it is installed), and the
/// latency histograms by model and role count what the requests did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_have_help_text_and_per_model_latency_histograms() {
    let agent = TestAgent::start(&model("m", 1_000, 4096)).await;
    let mut streamed = chat("stream this", 6);
    streamed["stream"] = json!(true);
    let response = agent.post("/v1/chat/completions", streamed).await;
    assert_eq!(response.status(), 200);
    assert!(sse_events(response).await.len() > 2);
    let response = agent.post("/v1/chat/completions", chat("whole", 6)).await;
    assert_eq!(response.status(), 200);
    // The worker's own histograms arrive with its next status report (every 250 ms).
    let worker_ttft =
        "kvfleet_worker_ttft_seconds_count{worker=\"w1\",model=\"m\",role=\"aggregated\"} 2";
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let text = loop {
        let text = agent
            .client
            .get(agent.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if text.lines().any(|l| l == worker_ttft) {
            break text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{worker_ttft} in\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    for family in ["queue_seconds_count", "itl_seconds_bucket"] {
        let prefix =
            format!("kvfleet_worker_{family}{{worker=\"w1\",model=\"m\",role=\"aggregated\"");
        assert!(
            text.lines().any(|l| l.starts_with(&prefix)),
            "{prefix} in\n{text}"
        );
    }
    let labels = "{model=\"m\",role=\"aggregated\"}";
    for family in ["ttft", "queue", "e2e"] {
        let line = format!("kvfleet_request_{family}_seconds_count{labels} 2");
        assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
    }
    let itl = format!("kvfleet_request_itl_seconds_count{labels} ");
    let gaps: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix(&itl)?.parse().ok())
        .unwrap_or_else(|| panic!("{itl} in\n{text}"));
    assert!(gaps >= 2, "two six-token requests stream gaps: {gaps}");
    // Every sample belongs to a family announced with its help text and type.
    let helped: std::collections::BTreeSet<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# HELP ")?.split(' ').next())
        .collect();
    let typed: std::collections::BTreeSet<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.split(' ').next())
        .collect();
    assert_eq!(helped, typed, "{text}");
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let name = line.split(['{', ' ']).next().unwrap();
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix).filter(|f| helped.contains(f)))
            .unwrap_or(name);
        assert!(helped.contains(family), "{name} has no # HELP in\n{text}");
    }
    let promtool = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let Ok(mut promtool) = promtool else {
        eprintln!("SKIPPED the promtool half: promtool is not installed (apt install prometheus)");
        return;
    };
    use std::io::Write as _;
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let output = promtool.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "promtool check metrics:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The sum of one per-tier metric family's samples for `tier` (`g1`..`g4`).
fn tier_sum(text: &str, family: &str, tier: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.starts_with(&format!("{family}{{")) && l.contains(&format!("tier=\"{tier}\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The agent's `/metrics` text once `ready` holds for it (within 10 s).
async fn metrics_until(agent: &TestAgent, what: &str, ready: impl Fn(&str) -> bool) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = agent.metrics_text().await;
        if ready(&text) {
            return text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no {what} within 10 s:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `[kv_tiers]` reaches the workers: a prompt pushed out of a small KV pool comes back from
/// host memory or disk instead of being recomputed, the disk tier's files are in the worker's
/// own directory, and every tier figure is in `/metrics` with a `tier` label.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_tiers_take_evicted_blocks_and_give_them_back() {
    let dir = std::env::temp_dir().join(format!("kvfleet-agent-tiers-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    // The mock's blocks are 64 bytes: G2 holds 16 blocks, G3 1024; the pool 32 (512 tokens).
    let agent = TestAgent::start(&format!(
        "[kv_tiers]\nhost_memory = \"1KiB\"\ndisk = \"64KiB\"\ndisk_dir = {dir:?}\n\
         [[models]]\nname = \"m\"\ncontext_length = 512\nblock_size = 16\nkv_blocks = 32\n"
    ))
    .await;
    let story = |i: usize| {
        format!(
            "{i} {}",
            "the keeper counted ships before the storm ".repeat(5)
        )
    };
    for i in [0, 1, 2, 3, 0] {
        let response = agent.post("/v1/chat/completions", chat(&story(i), 2)).await;
        assert_eq!(response.status(), 200);
    }
    let hits = |text: &str, tier: &str| tier_sum(text, "kvfleet_worker_kv_tier_hits_total", tier);
    let text = metrics_until(&agent, "lower-tier hit", |text| {
        hits(text, "g2") + hits(text, "g3") > 0.0
    })
    .await;
    for family in [
        "# HELP kvfleet_worker_kv_tier_blocks ",
        "# HELP kvfleet_worker_kv_tier_offload_bytes_total ",
        "# HELP kvfleet_worker_kv_tier_faults_total ",
        "kvfleet_worker_kv_tier_capacity_bytes{worker=\"w1\",model=\"m\",device=\"cpu\",role=\"aggregated\",tier=\"g2\"} 1024",
    ] {
        assert!(text.contains(family), "{family} missing:\n{text}");
    }
    let files = std::fs::read_dir(dir.join("worker-1"))
        .map(|layouts| layouts.count())
        .unwrap_or(0);
    assert!(files > 0, "the disk tier is in the worker's own directory");
    drop(agent);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The disk tier outlives its worker: blocks a worker wrote to G3 before it was killed -9 are
/// found again by its restarted process (which starts with empty G1 and G2), so the same
/// prompt is onboarded from disk instead of recomputed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_workers_disk_tier_is_hit_again_after_its_restart() {
    let dir = std::env::temp_dir().join(format!("kvfleet-agent-g3-restart-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let agent = TestAgent::start_with_backoff(
        &format!(
            "[kv_tiers]\nhost_memory = \"1KiB\"\ndisk = \"64KiB\"\ndisk_dir = {dir:?}\n\
             [[models]]\nname = \"m\"\ncontext_length = 512\nblock_size = 16\nkv_blocks = 32\n"
        ),
        500,
    )
    .await;
    let story = |i: usize| {
        format!(
            "{i} {}",
            "the lighthouse logged every passing hull at dusk ".repeat(5)
        )
    };
    // Four different prompts through a 32-block pool: the first ones are pushed down the tiers.
    for i in 0..4 {
        let response = agent.post("/v1/chat/completions", chat(&story(i), 2)).await;
        assert_eq!(response.status(), 200);
    }
    let text = metrics_until(&agent, "blocks in the disk tier", |text| {
        tier_sum(text, "kvfleet_worker_kv_tier_blocks", "g3") > 0.0
    })
    .await;
    assert_eq!(
        tier_sum(&text, "kvfleet_worker_kv_tier_hits_total", "g3"),
        0.0,
        "no disk hit before the kill (the test's premise):\n{text}"
    );

    let (_, ready) = agent.ready_status().await;
    let pid = ready["workers"][0]["pid"].as_u64().unwrap();
    let status = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (code, body) = agent.ready_status().await;
        if code == 200 && body["workers"][0]["starts"] == 2 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no restart: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The restarted worker has nothing in G1 or G2: a hit on these prompts is a disk hit.
    for i in 0..4 {
        let response = agent.post("/v1/chat/completions", chat(&story(i), 2)).await;
        assert_eq!(response.status(), 200);
    }
    metrics_until(&agent, "a disk hit in the restarted worker", |text| {
        tier_sum(text, "kvfleet_worker_kv_tier_hits_total", "g3") > 0.0
    })
    .await;
    drop(agent);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Slow clients cannot hold the frontend: at most `max_connections` are served at once, a
/// connection whose request head does not arrive in time is closed, a body that does not arrive
/// in time gets 408 — and a normal client is served as soon as a slot frees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_cut_off_and_connections_are_capped() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let agent = TestAgent::start(&format!(
        "[frontend]\nmax_connections = 2\nheader_read_timeout_secs = 1\n\
         header_timeout_jitter = 0\nbody_read_timeout_secs = 1\n{}",
        model("m", 0, 4096)
    ))
    .await;
    let addr = agent.url("").trim_start_matches("http://").to_owned();
    // Two slow-loris connections: half a request line, then nothing.
    let mut lorises = Vec::new();
    for _ in 0..2 {
        let mut tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
        tcp.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        lorises.push(tcp);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    // A normal client waits for a slot (both are taken), then is served.
    let started = std::time::Instant::now();
    let client = reqwest::Client::new();
    let response = client
        .post(agent.url("/v1/chat/completions"))
        .json(&chat("hi", 2))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(600),
        "served after {waited:?}: the cap of 2 connections did not hold"
    );
    assert!(waited < Duration::from_secs(5), "served after {waited:?}");
    // The lorises were closed by the server (EOF, maybe after a 408 it wrote).
    for mut tcp in lorises {
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(3), tcp.read_to_end(&mut rest)).await;
        assert!(read.is_ok(), "a slow-loris connection is still open");
    }
    drop(response);
    drop(client);
    // A body that stalls gets 408 as an OpenAI error.
    let mut tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    tcp.write_all(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
          Content-Length: 100\r\n\r\n{\"model\":",
    )
    .await
    .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), async {
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&answer).contains("request_timeout") {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .expect("the stalled body is answered");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("\"code\":\"request_timeout\""), "{answer}");
}

/// Admission comes before any parsing or tokenization: with every slot taken and no queue, even
/// a request that would fail to parse gets 429 at once, without costing the frontend its
/// template and tokenizer work (what a flood of large prompts would otherwise cost).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_comes_before_tokenization() {
    let agent = TestAgent::start(&format!(
        "[frontend]\nmax_in_flight = 1\nqueue_capacity = 0\n{}",
        model("m", 20_000, 4096)
    ))
    .await;
    let mut request = chat("hold the only slot", 200);
    request["stream"] = json!(true);
    let mut holder = agent.post("/v1/chat/completions", request).await;
    holder.chunk().await.unwrap().unwrap();
    let response = agent
        .client
        .post(agent.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body("{\"model\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 429);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "queue_full", "{body}");
    drop(holder);
    // With the slot free again, the same body gets its parse error.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let response = agent
            .client
            .post(agent.url("/v1/chat/completions"))
            .header("content-type", "application/json")
            .body("{\"model\": ")
            .send()
            .await
            .unwrap();
        if response.status() == 400 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the slot was never freed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
