//! The worker pool changed at runtime, as the control-plane client changes it: workers started,
//! retired (drained, then stopped), drained and undrained, and restarted under the same id
//! with another role. Real worker processes.

#![allow(clippy::unwrap_used, clippy::print_stdout)]

mod common;

use std::time::Duration;

use common::{TestAgent, model};
use kvfleet_agent::backend::{Backend as _, WorkerState};
use kvfleet_agent::worker::{Device, ModelConfig, WorkerConfig};
use kvfleet_proto::WorkerId;
use kvfleet_proto::api::WorkerRole;
use serde_json::json;

fn worker(role: WorkerRole) -> WorkerConfig {
    WorkerConfig {
        model: "m".into(),
        device: Device::Cpu,
        role,
    }
}

fn state(agent: &TestAgent, id: u64) -> Option<(WorkerState, WorkerRole, u64)> {
    agent
        .running
        .pool
        .workers()
        .into_iter()
        .find(|w| w.id == WorkerId(id))
        .map(|w| (w.state, w.role, w.starts))
}

async fn wait(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !check() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn chat_status(agent: &TestAgent) -> u16 {
    agent
        .post(
            "/v1/chat/completions",
            json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}),
        )
        .await
        .status()
        .as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_start_stop_drain_and_change_role_at_runtime() {
    let agent = TestAgent::start(&format!(
        "{}[[workers]]\nmodel = \"m\"\ndevice = \"cpu\"\n",
        model("m", 0, 256)
    ))
    .await;
    let pool = agent.running.pool.clone();
    let mut mock = ModelConfig::mock("m");
    mock.context_length = 256;
    mock.kv_blocks = 4096;

    // A second worker under a control-plane id.
    assert!(pool.start_worker(WorkerId(42), worker(WorkerRole::Aggregated), mock.clone()));
    assert!(
        !pool.start_worker(WorkerId(42), worker(WorkerRole::Aggregated), mock.clone()),
        "one worker per id"
    );
    wait("worker 42 ready", || {
        state(&agent, 42).is_some_and(|s| s.0 == WorkerState::Ready)
    })
    .await;

    // Draining: reported as such and left out of routing; the other worker serves.
    assert!(pool.set_draining(WorkerId(1), true));
    assert_eq!(state(&agent, 1).map(|s| s.0), Some(WorkerState::Draining));
    for _ in 0..4 {
        assert_eq!(chat_status(&agent).await, 200);
    }
    let counters = pool.counters();
    let served = |id| {
        counters
            .iter()
            .find(|c| c.id == WorkerId(id))
            .map(|c| (c.requests, c.tokens))
    };
    assert_eq!(
        served(1),
        Some((0, 0)),
        "a draining worker gets nothing new"
    );
    assert_eq!(served(42), Some((4, 16)));
    assert!(pool.set_draining(WorkerId(1), false));
    assert_eq!(state(&agent, 1).map(|s| s.0), Some(WorkerState::Ready));

    // A role change: stopped and started again under the same id.
    assert!(pool.stop_worker(WorkerId(42)));
    assert!(pool.start_worker(WorkerId(42), worker(WorkerRole::Decode), mock.clone()));
    wait("worker 42 ready as decode", || {
        state(&agent, 42).is_some_and(|s| s.0 == WorkerState::Ready && s.1 == WorkerRole::Decode)
    })
    .await;
    assert_eq!(state(&agent, 42).map(|s| s.2), Some(1), "a new incarnation");

    // Retiring: idle, so it goes at once; unknown ids are refused.
    assert!(pool.retire_worker(WorkerId(1), Duration::from_secs(10)));
    wait("worker 1 gone", || state(&agent, 1).is_none()).await;
    assert!(!pool.stop_worker(WorkerId(1)));
    assert!(!pool.set_draining(WorkerId(7), true));
    let ids: Vec<WorkerId> = pool.running().iter().map(|w| w.id).collect();
    assert_eq!(ids, [WorkerId(42)]);
    // The decode worker serves (prefill-only workers would not).
    assert_eq!(chat_status(&agent).await, 200);
    agent.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retired_worker_finishes_its_requests_first() {
    // 20 ms per token: a 30-token answer takes about 600 ms.
    let agent = TestAgent::start(&format!(
        "{}[[workers]]\nmodel = \"m\"\ndevice = \"cpu\"\n",
        model("m", 20_000, 256)
    ))
    .await;
    let pool = agent.running.pool.clone();
    let request = {
        let client = agent.client.clone();
        let url = format!("http://{}/v1/chat/completions", agent.addr);
        tokio::spawn(async move {
            let response = client
                .post(url)
                .json(
                    &json!({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                              "max_tokens": 30}),
                )
                .send()
                .await
                .unwrap();
            let status = response.status().as_u16();
            let body: serde_json::Value = response.json().await.unwrap();
            (status, body)
        })
    };
    wait("the request to reach the worker", || {
        agent
            .running
            .pool
            .workers()
            .first()
            .is_some_and(|w| w.outstanding == 1)
    })
    .await;
    assert!(pool.retire_worker(WorkerId(1), Duration::from_secs(30)));
    // Draining at once: no new work...
    assert_eq!(state(&agent, 1).map(|s| s.0), Some(WorkerState::Draining));
    assert_eq!(chat_status(&agent).await, 503);
    // ...but the request in flight completes, and only then does the worker go.
    let (status, body) = request.await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["usage"]["completion_tokens"], 30, "{body}");
    wait("worker 1 gone", || state(&agent, 1).is_none()).await;
    agent.stop().await.unwrap();
}

// ----- external engines that fail: each a clear worker state and error, no hanging request --

/// A tokenizer for the frontend (the fake servers below never read the model).
fn tiny_model_dir() -> std::path::PathBuf {
    static DIR: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("kvfleet-pool-tiny-{}", std::process::id()));
        kvfleet_model::tiny::write_tiny_llama(&dir, kvfleet_model::tiny::TinySpec::default(), 3)
            .unwrap();
        dir
    })
    .clone()
}

/// An executable script at a fresh path.
fn script(name: &str, text: &str) -> String {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = std::env::temp_dir().join(format!("kvfleet-pool-engines-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path.display().to_string()
}

/// An agent whose one worker runs `command` as its llama-server (3 s start timeout).
async fn llamacpp_agent(command: &str) -> TestAgent {
    // The first lines land in the `[supervisor]` table the harness opens.
    TestAgent::start_unready(
        &format!(
            "start_timeout_secs = 3\n\
             [[models]]\nname = \"x\"\nengine = \"llamacpp\"\npath = {:?}\ncommand = {command:?}\n\
             context_length = 256\nblock_size = 16\n\
             [[workers]]\nmodel = \"x\"\ndevice = \"cpu\"\n",
            tiny_model_dir().display().to_string()
        ),
        100,
    )
    .await
}

/// Waits until the worker's `last_error` (the agent's `/ready` body) contains `what`.
async fn wait_error(agent: &TestAgent, what: &str) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (_, body) = agent.ready_status().await;
        let worker = body["workers"][0].clone();
        if worker["last_error"]
            .as_str()
            .is_some_and(|e| e.contains(what))
        {
            assert_eq!(worker["engine"], "llamacpp", "{worker}");
            assert_ne!(worker["state"], "ready", "{worker}");
            return worker;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no worker error containing {what:?}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A chat request, bounded: it must be answered (with an error here) well within 20 s.
async fn chat_error(agent: &TestAgent) -> (u16, serde_json::Value) {
    let response = tokio::time::timeout(
        Duration::from_secs(20),
        agent.post(
            "/v1/chat/completions",
            json!({"model": "x", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}),
        ),
    )
    .await
    .expect("the request hung");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn llamacpp_servers_that_are_missing_exit_stall_or_babble_fail_clearly() {
    // Missing binary.
    let agent = llamacpp_agent("/nonexistent/llama-server").await;
    let worker = wait_error(&agent, "cannot start \"/nonexistent/llama-server\"").await;
    println!("missing binary: {worker}");
    let (status, body) = chat_error(&agent).await;
    assert_eq!(status, 503, "{body}");
    agent.stop().await.unwrap();

    // Exits at start, saying why on stderr.
    let exits = script(
        "exits.sh",
        "#!/bin/sh\necho 'error: failed to load model' >&2\nexit 3\n",
    );
    let agent = llamacpp_agent(&exits).await;
    let worker = wait_error(&agent, "exited at start").await;
    let error = worker["last_error"].as_str().unwrap();
    assert!(
        error.contains("failed to load model") && error.contains("exit status: 3"),
        "{error}"
    );
    agent.stop().await.unwrap();

    // Never healthy: the worker gives up before the agent's start timeout, saying so.
    let stalls = script("stalls.sh", "#!/bin/sh\nexec sleep 600\n");
    let agent = llamacpp_agent(&stalls).await;
    let worker = wait_error(&agent, "did not become healthy within").await;
    println!("never healthy: {worker}");
    agent.stop().await.unwrap();

    // Healthy, but its completions are garbage: the request fails at once, naming the engine;
    // the worker stays ready.
    let babbles = script(
        "babbles.py",
        "#!/usr/bin/env python3\n\
         import sys, http.server\n\
         port = int(sys.argv[sys.argv.index('--port') + 1])\n\
         class H(http.server.BaseHTTPRequestHandler):\n\
         \x20   def reply(self, body):\n\
         \x20       self.send_response(200)\n\
         \x20       self.send_header('Content-Length', str(len(body)))\n\
         \x20       self.end_headers()\n\
         \x20       self.wfile.write(body)\n\
         \x20   def do_GET(self):\n\
         \x20       self.reply(b'{\"status\": \"ok\"}')\n\
         \x20   def do_POST(self):\n\
         \x20       self.rfile.read(int(self.headers['Content-Length']))\n\
         \x20       self.reply(b'<html>this is not an event stream</html>\\n')\n\
         http.server.HTTPServer(('127.0.0.1', port), H).serve_forever()\n",
    );
    let agent = llamacpp_agent(&babbles).await;
    agent.wait_ready(Duration::from_secs(30)).await;
    let (status, body) = chat_error(&agent).await;
    assert_eq!(status, 502, "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("llamacpp answered garbage"), "{body}");
    let (ready, body) = agent.ready_status().await;
    assert_eq!(ready, 200, "{body}");
    agent.stop().await.unwrap();
}

/// A fake OpenAI server that returns token ids (as vLLM's `return_token_ids` does).
const OPENAI_SERVER: &str = "#!/usr/bin/env python3\n\
         import sys, json, http.server\n\
         port = int(sys.argv[sys.argv.index('--port') + 1])\n\
         class H(http.server.BaseHTTPRequestHandler):\n\
         \x20   def do_GET(self):\n\
         \x20       self.send_response(200)\n\
         \x20       self.end_headers()\n\
         \x20   def do_POST(self):\n\
         \x20       body = json.loads(self.rfile.read(int(self.headers['Content-Length'])))\n\
         \x20       assert self.path == '/v1/completions' and body['return_token_ids']\n\
         \x20       assert all(isinstance(t, int) for t in body['prompt'])\n\
         \x20       self.send_response(200)\n\
         \x20       self.send_header('Content-Type', 'text/event-stream')\n\
         \x20       self.end_headers()\n\
         \x20       n = body['max_tokens']\n\
         \x20       for i in range(n):\n\
         \x20           end = 'length' if i == n - 1 else None\n\
         \x20           c = {'choices': [{'index': 0, 'text': 'x', 'token_ids': [40 + i], 'finish_reason': end}]}\n\
         \x20           self.wfile.write(('data: ' + json.dumps(c) + '\\n\\n').encode())\n\
         \x20       self.wfile.write(b'data: [DONE]\\n\\n')\n\
         http.server.HTTPServer(('127.0.0.1', port), H).serve_forever()\n";

/// A vLLM engine's load comes from its own `/metrics`: a fake vLLM that says 3 requests run and
/// 7 wait, with half its KV cache in use, while this worker has sent it nothing. The worker
/// reports the engine's figures (its own count alone would say 0 and 0).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vllm_engines_load_is_read_from_its_metrics() {
    let server = script(
        "vllm_metrics.py",
        "#!/usr/bin/env python3\n\
         import sys, http.server\n\
         port = int(sys.argv[sys.argv.index('--port') + 1])\n\
         PAGE = b'# TYPE vllm:num_requests_running gauge\\n' \\\n\
         \x20   b'vllm:num_requests_running{engine=\"0\",model_name=\"x\"} 3.0\\n' \\\n\
         \x20   b'vllm:num_requests_waiting{engine=\"0\",model_name=\"x\"} 7.0\\n' \\\n\
         \x20   b'vllm:kv_cache_usage_perc{engine=\"0\",model_name=\"x\"} 0.5\\n'\n\
         class H(http.server.BaseHTTPRequestHandler):\n\
         \x20   def do_GET(self):\n\
         \x20       self.send_response(200)\n\
         \x20       self.end_headers()\n\
         \x20       if self.path == '/metrics':\n\
         \x20           self.wfile.write(PAGE)\n\
         http.server.HTTPServer(('127.0.0.1', port), H).serve_forever()\n",
    );
    let agent = TestAgent::start_unready(
        &format!(
            "[[models]]\nname = \"x\"\nengine = \"vllm\"\npath = {:?}\n\
             command = \"python3\"\n\
             args = [{server:?}, \"--port\", \"{{port}}\"]\n\
             context_length = 256\nblock_size = 16\nslots = 4\n\
             [[workers]]\nmodel = \"x\"\ndevice = \"cpu\"\n",
            tiny_model_dir().display().to_string(),
        ),
        100,
    )
    .await;
    agent.wait_ready(Duration::from_secs(30)).await;
    let waiting = "kvfleet_worker_waiting_requests{worker=\"w1\"";
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while agent.metric(waiting).await != 7.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the engine's waiting requests never reached the worker's status:\n{}",
            agent.metrics_text().await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Half of 4 slots x 256 tokens / 16-token blocks = 32 of 64 blocks.
    assert_eq!(
        agent
            .metric("kvfleet_worker_kv_blocks_used{worker=\"w1\"")
            .await,
        32.0
    );
    agent.stop().await.unwrap();
}

/// The `openai` engine against a fake OpenAI server that returns token ids (as vLLM's
/// `return_token_ids` does): a request is served through it, with the prompt sent as token ids;
/// a field the engine cannot take is a 400 naming the engine, before any worker is asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_openai_engine_server_serves_token_ids_and_unsupported_fields_are_refused() {
    let server = script("openai.py", OPENAI_SERVER);
    let agent = TestAgent::start_unready(
        &format!(
            "[[models]]\nname = \"x\"\nengine = \"openai\"\npath = {:?}\n\
             command = \"python3\"\nargs = [{server:?}, \"--port\", \"{{port}}\"]\n\
             context_length = 256\nblock_size = 16\n\
             [[workers]]\nmodel = \"x\"\ndevice = \"cpu\"\n",
            tiny_model_dir().display().to_string()
        ),
        100,
    )
    .await;
    agent.wait_ready(Duration::from_secs(30)).await;
    let response = agent
        .post(
            "/v1/completions",
            json!({"model": "x", "prompt": "hello there", "max_tokens": 3}),
        )
        .await;
    assert_eq!(response.status().as_u16(), 200);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["usage"]["completion_tokens"], 3, "{body}");
    assert_eq!(body["choices"][0]["finish_reason"], "length", "{body}");
    let (_, ready) = agent.ready_status().await;
    assert_eq!(ready["workers"][0]["engine"], "openai", "{ready}");
    let metrics = agent.metrics_text().await;
    assert!(
        metrics.contains("kvfleet_worker_engine_info{worker=\"w1\",engine=\"openai\"} 1"),
        "{metrics}"
    );

    let response = agent
        .post(
            "/v1/completions",
            json!({"model": "x", "prompt": "hello", "max_tokens": 3, "top_k": 5}),
        )
        .await;
    assert_eq!(response.status().as_u16(), 400);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unsupported_parameter", "{body}");
    assert_eq!(body["error"]["param"], "top_k", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("\"openai\""),
        "{body}"
    );
    agent.stop().await.unwrap();
}

/// Sequence hashes of the G1 blocks `events` stored, and whether one cleared the worker.
fn stored(events: &[kvfleet_proto::KvEvent]) -> (Vec<kvfleet_proto::hash::SequenceHash>, bool) {
    use kvfleet_proto::kv_event::KvEventData;
    let mut hashes = Vec::new();
    let mut cleared = false;
    for event in events {
        assert_eq!(event.worker, WorkerId(1), "{event:?}");
        match &event.data {
            KvEventData::Stored { blocks, .. } => {
                hashes.extend(blocks.iter().map(|b| b.sequence));
            }
            KvEventData::Cleared => cleared = true,
            KvEventData::Removed { .. } => panic!("nothing was removed: {event:?}"),
        }
    }
    (hashes, cleared)
}

/// Receives the pool's KV events until `done` holds of them (10 s at most), then any that
/// follow within 300 ms (there must be none the check did not expect).
async fn kv_events_until(
    rx: &mut tokio::sync::broadcast::Receiver<kvfleet_proto::KvEvent>,
    done: impl Fn(&[kvfleet_proto::KvEvent]) -> bool,
) -> Vec<kvfleet_proto::KvEvent> {
    let mut events = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !done(&events) {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Ok(event)) => events.push(event),
            other => panic!("KV events so far {events:?}; then {other:?}"),
        }
    }
    while let Ok(Ok(event)) = tokio::time::timeout(Duration::from_millis(300), rx.recv()).await {
        events.push(event);
    }
    events
}

/// The `vllm` engine with `kv_events`: a fake vLLM (OpenAI server plus, through the test, a
/// vLLM-style ZMQ event stream from `kvfleet_engine_events::publisher` for each prompt it
/// serves, engine blocks of 8 tokens) behind a worker with 16-token blocks. The worker's KV
/// events are exactly the router's own hashes of the prompt's full blocks (the approximate
/// record would also credit the output's block), and a batch lost on the wire is a gap: the
/// worker is cleared and rebuilt, counted on `/metrics`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vllm_engine_with_kv_events_sends_the_translated_events_not_approximate_ones() {
    use kvfleet_engine_events::encode::Flavor;
    use kvfleet_engine_events::publisher::{Publisher, block_stored};
    use kvfleet_engine_events::{EngineEvent, EventBatch};
    use kvfleet_proto::hash::{BlockSize, sequence_hashes};
    use tokio::io::AsyncBufReadExt as _;

    const ENGINE_BLOCK: usize = 8;
    let mut publisher = Publisher::bind("tcp://127.0.0.1:0", None, "", 16, Flavor::VllmMap)
        .await
        .unwrap();
    // The fake server tells the test each prompt it served (a line of JSON token ids).
    let callback = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let callback_port = callback.local_addr().unwrap().port();
    let (prompts_tx, mut prompts) = tokio::sync::mpsc::unbounded_channel::<Vec<u32>>();
    tokio::spawn(async move {
        while let Ok((stream, _)) = callback.accept().await {
            let mut lines = tokio::io::BufReader::new(stream).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let _ = prompts_tx.send(serde_json::from_str(&line).unwrap());
            }
        }
    });
    let server = script(
        "vllm.py",
        "#!/usr/bin/env python3\n\
         import sys, json, socket, http.server\n\
         port = int(sys.argv[sys.argv.index('--port') + 1])\n\
         events = int(sys.argv[sys.argv.index('--events') + 1])\n\
         class H(http.server.BaseHTTPRequestHandler):\n\
         \x20   def do_GET(self):\n\
         \x20       self.send_response(200)\n\
         \x20       self.end_headers()\n\
         \x20   def do_POST(self):\n\
         \x20       body = json.loads(self.rfile.read(int(self.headers['Content-Length'])))\n\
         \x20       self.send_response(200)\n\
         \x20       self.send_header('Content-Type', 'text/event-stream')\n\
         \x20       self.end_headers()\n\
         \x20       n = body['max_tokens']\n\
         \x20       for i in range(n):\n\
         \x20           end = 'length' if i == n - 1 else None\n\
         \x20           c = {'choices': [{'index': 0, 'text': 'x', 'token_ids': [40 + i], 'finish_reason': end}]}\n\
         \x20           self.wfile.write(('data: ' + json.dumps(c) + '\\n\\n').encode())\n\
         \x20       self.wfile.write(b'data: [DONE]\\n\\n')\n\
         \x20       socket.create_connection(('127.0.0.1', events)).sendall((json.dumps(body['prompt']) + '\\n').encode())\n\
         http.server.HTTPServer(('127.0.0.1', port), H).serve_forever()\n",
    );
    let agent = TestAgent::start_unready(
        &format!(
            "[[models]]\nname = \"x\"\nengine = \"vllm\"\npath = {:?}\n\
             command = \"python3\"\n\
             args = [{server:?}, \"--port\", \"{{port}}\", \"--events\", \"{callback_port}\"]\n\
             kv_events = {:?}\n\
             context_length = 256\nblock_size = 16\n\
             [[workers]]\nmodel = \"x\"\ndevice = \"cpu\"\n",
            tiny_model_dir().display().to_string(),
            publisher.endpoint(),
        ),
        100,
    )
    .await;
    agent.wait_ready(Duration::from_secs(30)).await;
    // The worker has subscribed once its status carries the translator's counters.
    let gaps = "kvfleet_engine_events_gaps_total{worker=\"w1\"";
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !agent.metrics_text().await.contains(gaps) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no translator counters on /metrics"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The SUB socket's subscription reaches the PUB socket just after the connection.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, ready) = agent.ready_status().await;
    assert_eq!(ready["workers"][0]["engine"], "vllm", "{ready}");

    let mut kv = agent.running.pool.subscribe_kv_events();
    let response = agent
        .post(
            "/v1/completions",
            json!({"model": "x", "prompt": "the quick brown fox jumps over the lazy dog ".repeat(3), "max_tokens": 16}),
        )
        .await;
    assert_eq!(response.status().as_u16(), 200);
    let prompt = tokio::time::timeout(Duration::from_secs(10), prompts.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(prompt.len() >= 32, "{prompt:?}");
    let blocks = prompt.len() / ENGINE_BLOCK;
    let batch = |events: Vec<EngineEvent>| EventBatch {
        ts: 0.0,
        events,
        data_parallel_rank: None,
    };
    let stored_prompt = batch(vec![block_stored(&prompt, ENGINE_BLOCK, 0, blocks, None)]);
    publisher.publish(&stored_prompt).await.unwrap();
    let expected = sequence_hashes(&prompt, BlockSize::new(16).unwrap());
    let events = kv_events_until(&mut kv, |e| stored(e).0.len() >= expected.len()).await;
    assert_eq!(stored(&events), (expected.clone(), false), "{events:?}");

    // A batch lost on the wire (no replay configured): the next batch shows the gap, the
    // worker's blocks are cleared and rebuilt from what follows.
    publisher.lose(&stored_prompt);
    publisher.publish(&stored_prompt).await.unwrap();
    let events = kv_events_until(&mut kv, |e| stored(e).0.len() >= expected.len()).await;
    assert_eq!(stored(&events), (expected, true), "{events:?}");
    // The status (every 250 ms) brings the counters to /metrics.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while agent.metric(gaps).await != 1.0 {
        assert!(tokio::time::Instant::now() < deadline, "gap not counted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        agent
            .metric("kvfleet_engine_events_resets_total{worker=\"w1\"")
            .await,
        1.0
    );
    assert_eq!(
        agent
            .metric("kvfleet_engine_events_batches_total{worker=\"w1\"")
            .await,
        2.0
    );
    assert_eq!(
        agent
            .metric("kvfleet_engine_events_malformed_total{worker=\"w1\"")
            .await,
        0.0
    );
    let (_, ready) = agent.ready_status().await;
    assert_eq!(
        ready["workers"][0]["engine_events"]["kvfleet_engine_events_gaps"], 1,
        "{ready}"
    );
    agent.stop().await.unwrap();
}

/// A `vllm` worker without `kv_events` falls back to the approximate record: after a request it
/// credits the blocks of the prompt and the output it served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vllm_engine_without_kv_events_is_routed_approximately() {
    let server = script("openai-approx.py", OPENAI_SERVER);
    let agent = TestAgent::start_unready(
        &format!(
            "[[models]]\nname = \"x\"\nengine = \"vllm\"\npath = {:?}\n\
             command = \"python3\"\nargs = [{server:?}, \"--port\", \"{{port}}\"]\n\
             context_length = 256\nblock_size = 16\n\
             [[workers]]\nmodel = \"x\"\ndevice = \"cpu\"\n",
            tiny_model_dir().display().to_string()
        ),
        100,
    )
    .await;
    agent.wait_ready(Duration::from_secs(30)).await;
    let mut kv = agent.running.pool.subscribe_kv_events();
    let response = agent
        .post(
            "/v1/completions",
            json!({"model": "x", "prompt": "the quick brown fox jumps over the lazy dog ".repeat(3), "max_tokens": 16}),
        )
        .await;
    assert_eq!(response.status().as_u16(), 200);
    let events = kv_events_until(&mut kv, |e| !e.is_empty()).await;
    let (hashes, cleared) = stored(&events);
    assert!(!hashes.is_empty() && !cleared, "{events:?}");
    assert!(
        !agent
            .metrics_text()
            .await
            .contains("kvfleet_engine_events_"),
        "no translator without kv_events"
    );
    agent.stop().await.unwrap();
}
