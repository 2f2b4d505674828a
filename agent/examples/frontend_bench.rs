//! Frontend benchmark: the whole agent (HTTP frontend, admission, tokenization, block hashing,
//! the Unix-socket hop to a worker process, detokenization, SSE) in front of the mock engine at
//! zero cost per token, so what is measured is the agent, not a model.
//!
//! ```text
//! cargo build --release -p kvfleet-agent --bins --examples
//! target/release/examples/frontend_bench [SECONDS_PER_POINT] [MAX_TOKENS]
//! ```
//!
//! For each concurrency (1, 64 and 256 streams) it keeps that many streaming `/v1/completions`
//! requests open back to back and reports requests/s, streamed tokens/s and time to first token
//! (p50/p99). Then one client at a time sends `max_tokens = 1` requests: with a zero-cost engine
//! that latency is the frontend's added latency (HTTP + preprocessing + worker hop + response).

#![allow(clippy::print_stdout, clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use kvfleet_agent::config::{Config, Sources};
use kvfleet_agent::gpu::NoGpus;
use kvfleet_agent::systemd::Notifier;
use kvfleet_agent::worker::WorkerCommand;
use kvfleet_agent::{Deps, serve_with};
use serde_json::json;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[derive(Default)]
struct Tally {
    requests: u64,
    tokens: u64,
    ttft: Vec<Duration>,
    errors: u64,
}

async fn stream_once(
    client: &reqwest::Client,
    url: &str,
    i: u64,
    max_tokens: u32,
) -> Option<(Duration, u64)> {
    let start = Instant::now();
    let body = json!({"model": "bench", "prompt": format!("benchmark prompt number {i} with some words"),
        "max_tokens": max_tokens, "stream": true, "stream_options": {"include_usage": true}});
    let mut response = client.post(url).json(&body).send().await.ok()?;
    if response.status() != 200 {
        return None;
    }
    let mut ttft = None;
    let mut text = String::new();
    while let Some(chunk) = response.chunk().await.ok()? {
        if ttft.is_none() {
            ttft = Some(start.elapsed());
        }
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    let usage = text
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .filter(|e| *e != "[DONE]")
        .filter_map(|e| serde_json::from_str::<serde_json::Value>(e).ok())
        .find_map(|v| v["usage"]["completion_tokens"].as_u64())?;
    Some((ttft?, usage))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let seconds: u64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(10);
    let max_tokens: u32 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(64);
    let exe = std::env::current_exe()?;
    let program = exe
        .parent()
        .and_then(|p| p.parent())
        .map(|p| p.join("kvfleet-agent"))
        .filter(|p| p.exists())
        .ok_or_else(|| anyhow::anyhow!("build the agent binary first: cargo build --release -p kvfleet-agent --bins --examples"))?;
    let dir = std::env::temp_dir().join(format!("kvfleet-bench-{}", std::process::id()));
    let text = format!(
        "[log]\nlevel = \"warn\"\n[frontend]\nmax_in_flight = 1024\nqueue_capacity = 4096\n\
         [supervisor]\nsocket_dir = {:?}\n[[models]]\nname = \"bench\"\ncontext_length = 4096\n\
         kv_blocks = 65536\nmock_token_time_us = 0\n",
        dir.display().to_string()
    );
    let config = Config::from_sources(&Sources::from_text("bench.toml", text))
        .map_err(|p| anyhow::anyhow!("{p}"))?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let deps = Deps {
        inventory: Arc::new(NoGpus),
        worker: WorkerCommand { program },
        notifier: Notifier::default(),
        dbus: kvfleet_agent::dbus::Bus::Off,
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let agent = tokio::spawn(serve_with(
        config,
        listener,
        deps,
        async move {
            let _ = stop_rx.await;
        },
        |_| {},
    ));
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(1024)
        .build()?;
    let base = format!("http://{addr}");
    for _ in 0..200 {
        if client
            .get(format!("{base}/ready"))
            .send()
            .await
            .map(|r| r.status() == 200)
            .unwrap_or(false)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let url = format!("{base}/v1/completions");
    println!(
        "frontend_bench: {seconds} s per point, max_tokens {max_tokens}, 1 worker process, mock engine at zero cost per token"
    );
    println!(
        "| streams | requests/s | streamed tokens/s | TTFT p50 (ms) | TTFT p99 (ms) | errors |"
    );
    println!("| ---: | ---: | ---: | ---: | ---: | ---: |");
    for concurrency in [1u64, 64, 256] {
        let deadline = Instant::now() + Duration::from_secs(seconds);
        let start = Instant::now();
        let mut set = tokio::task::JoinSet::new();
        for c in 0..concurrency {
            let client = client.clone();
            let url = url.clone();
            set.spawn(async move {
                let mut tally = Tally::default();
                let mut i = c * 1_000_000;
                while Instant::now() < deadline {
                    i += 1;
                    match stream_once(&client, &url, i, max_tokens).await {
                        Some((ttft, tokens)) => {
                            tally.requests += 1;
                            tally.tokens += tokens;
                            tally.ttft.push(ttft);
                        }
                        None => tally.errors += 1,
                    }
                }
                tally
            });
        }
        let mut all = Tally::default();
        while let Some(t) = set.join_next().await {
            let t = t?;
            all.requests += t.requests;
            all.tokens += t.tokens;
            all.errors += t.errors;
            all.ttft.extend(t.ttft);
        }
        let elapsed = start.elapsed().as_secs_f64();
        all.ttft.sort();
        println!(
            "| {concurrency} | {:.0} | {:.0} | {:.2} | {:.2} | {} |",
            all.requests as f64 / elapsed,
            all.tokens as f64 / elapsed,
            ms(percentile(&all.ttft, 0.5)),
            ms(percentile(&all.ttft, 0.99)),
            all.errors
        );
    }
    // Added latency: one request at a time, one token, not streamed.
    let mut latencies = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(seconds.min(5));
    let mut i = 0;
    while Instant::now() < deadline {
        i += 1;
        let start = Instant::now();
        let response = client
            .post(&url)
            .json(
                &json!({"model": "bench", "prompt": format!("latency probe {i}"), "max_tokens": 1}),
            )
            .send()
            .await?;
        anyhow::ensure!(
            response.status() == 200,
            "latency probe failed: {}",
            response.status()
        );
        let _ = response.bytes().await?;
        latencies.push(start.elapsed());
    }
    latencies.sort();
    println!(
        "\nfrontend added latency (1 client, max_tokens 1, {} requests): p50 {:.3} ms, p99 {:.3} ms",
        latencies.len(),
        ms(percentile(&latencies, 0.5)),
        ms(percentile(&latencies, 0.99))
    );
    let _ = stop_tx.send(());
    agent.await??;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
