//! Client load shared by the fault suite (`faults.rs`) and the soak bench (`benches/soak.rs`):
//! clients streaming chat completions through agents' frontends, one request after another,
//! until stopped, each finished request handed to a sink with its prompt, outcome and timing.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::MODEL;

/// What one streamed request gave the client.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Text and completion tokens (`usage`), ended with `[DONE]`.
    Done(String, u64),
    /// Anything else: `kind` is short and groups failures ("429", "status 503", "stream broke",
    /// "error event <code>", ...); `detail` says what exactly happened.
    Failed { kind: String, detail: String },
}

impl Outcome {
    fn failed(kind: impl Into<String>, detail: impl Into<String>) -> Self {
        Self::Failed {
            kind: kind.into(),
            detail: detail.into(),
        }
    }
}

/// One finished client request.
#[derive(Debug)]
pub struct Record {
    pub prompt: Arc<str>,
    pub outcome: Outcome,
    pub started: Instant,
    pub ended: Instant,
}

/// One streamed chat completion of at most `max_tokens` from `agent`'s frontend.
pub async fn stream(
    client: &reqwest::Client,
    agent: SocketAddr,
    prompt: &str,
    max_tokens: u32,
    timeout: Duration,
) -> Outcome {
    let response = client
        .post(format!("http://{agent}/v1/chat/completions"))
        .json(&json!({
            "model": MODEL,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
            "stream": true,
            "stream_options": {"include_usage": true},
        }))
        .timeout(timeout)
        .send()
        .await;
    let response = match response {
        Ok(r) if r.status().is_success() => r,
        Ok(r) if r.status() == reqwest::StatusCode::TOO_MANY_REQUESTS => {
            return Outcome::failed("429", "status 429");
        }
        Ok(r) => {
            let status = r.status().as_u16();
            let body = r.text().await.unwrap_or_default();
            return Outcome::failed(format!("status {status}"), body);
        }
        Err(e) => return Outcome::failed("request", e.to_string()),
    };
    let body = match response.text().await {
        Ok(body) => body,
        Err(e) => return Outcome::failed("stream broke", e.to_string()),
    };
    let mut text = String::new();
    let mut tokens = 0;
    let mut done = false;
    for event in body.split("\n\n").filter_map(|e| e.strip_prefix("data: ")) {
        if event == "[DONE]" {
            done = true;
            continue;
        }
        let Ok(chunk) = serde_json::from_str::<Value>(event) else {
            return Outcome::failed("not JSON", event);
        };
        if chunk.get("error").is_some() {
            let code = chunk["error"]["code"].as_str().unwrap_or("?");
            return Outcome::failed(format!("error event {code}"), chunk.to_string());
        }
        if let Some(piece) = chunk["choices"][0]["delta"]["content"].as_str() {
            text.push_str(piece);
        }
        if let Some(n) = chunk["usage"]["completion_tokens"].as_u64() {
            tokens = n;
        }
    }
    match done {
        true => Outcome::Done(text, tokens),
        false => Outcome::failed("no [DONE]", body),
    }
}

/// How the clients of a [`Load`] ask.
#[derive(Debug, Clone)]
pub struct Requests {
    /// The prompts clients cycle through (client `k` starts at prompt `k`).
    pub prompts: Arc<[Arc<str>]>,
    pub max_tokens: u32,
    pub timeout: Duration,
}

/// Clients streaming through agents until stopped.
pub struct Load {
    stop: Arc<AtomicBool>,
    in_flight: Arc<AtomicUsize>,
    ended: Arc<AtomicUsize>,
    records: Option<Arc<Mutex<Vec<Record>>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    /// `per_agent` clients on each of `agents`; every record is kept for [`Load::finish`].
    pub fn start(agents: &[SocketAddr], per_agent: usize, requests: &Requests) -> Self {
        let records = Arc::new(Mutex::new(Vec::new()));
        let sink = records.clone();
        let mut load = Self::start_with(agents, per_agent, requests, move |r| {
            sink.lock().unwrap().push(r);
        });
        load.records = Some(records);
        load
    }

    /// `per_agent` clients on each of `agents`, each record handed to `sink` as it ends (a
    /// long run tallies instead of keeping them). A client answered 429 waits 100 ms before it
    /// asks again.
    pub fn start_with(
        agents: &[SocketAddr],
        per_agent: usize,
        requests: &Requests,
        sink: impl Fn(Record) + Send + Sync + 'static,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let in_flight = Arc::new(AtomicUsize::new(0));
        let ended = Arc::new(AtomicUsize::new(0));
        let sink = Arc::new(sink);
        let client = reqwest::Client::new();
        let mut tasks = Vec::new();
        for (a, agent) in agents.iter().enumerate() {
            for c in 0..per_agent {
                let (stop, in_flight, client) = (stop.clone(), in_flight.clone(), client.clone());
                let ended_count = ended.clone();
                let (agent, requests, sink) = (*agent, requests.clone(), sink.clone());
                tasks.push(tokio::spawn(async move {
                    let mut k = a * per_agent + c;
                    while !stop.load(Ordering::Relaxed) {
                        let prompt = requests.prompts[k % requests.prompts.len()].clone();
                        k += 1;
                        in_flight.fetch_add(1, Ordering::Relaxed);
                        let started = Instant::now();
                        let outcome = stream(
                            &client,
                            agent,
                            &prompt,
                            requests.max_tokens,
                            requests.timeout,
                        )
                        .await;
                        let ended = Instant::now();
                        in_flight.fetch_sub(1, Ordering::Relaxed);
                        ended_count.fetch_add(1, Ordering::Relaxed);
                        let backpressure =
                            matches!(&outcome, Outcome::Failed { kind, .. } if kind == "429");
                        sink(Record {
                            prompt,
                            outcome,
                            started,
                            ended,
                        });
                        if backpressure {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }));
            }
        }
        Self {
            stop,
            in_flight,
            ended,
            records: None,
            tasks,
        }
    }

    /// Requests sent and not yet answered in full.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Requests ended so far (answered in full or failed).
    pub fn ended(&self) -> usize {
        self.ended.load(Ordering::Relaxed)
    }

    /// Waits until `n` more requests have ended than had when called (a load going on, not a
    /// clock, paces a fault); panics naming `what` after `limit`.
    pub async fn wait_ended(&self, what: &str, n: usize, limit: Duration) {
        let target = self.ended() + n;
        super::wait_for(what, limit, || async { self.ended() >= target }).await;
    }

    /// Stops the clients (each ends the request it is in), then returns what
    /// [`Load::start`] kept (nothing for [`Load::start_with`]).
    pub async fn finish(self) -> Vec<Record> {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.await.unwrap();
        }
        match self.records {
            Some(records) => std::mem::take(&mut *records.lock().unwrap()),
            None => Vec::new(),
        }
    }
}

/// An unlabelled metric's value summed over `agents`' `/metrics` (0 where absent).
pub async fn metric_sum(agents: &[SocketAddr], name: &str) -> f64 {
    let mut total = 0.0;
    for agent in agents {
        let text = reqwest::get(format!("http://{agent}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        total += text
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse::<f64>().ok())
            .unwrap_or(0.0);
    }
    total
}

/// Requests migrated so far, summed over `agents`.
pub async fn migrations(agents: &[SocketAddr]) -> f64 {
    metric_sum(agents, "kvfleet_request_migrations_total").await
}
