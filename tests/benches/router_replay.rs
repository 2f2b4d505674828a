//! The fleet router end to end: the first requests of a Mooncake-format trace replayed against
//! three real agents (control-plane mode, each with two mock workers, requests forwarded between
//! them over QUIC), once per routing mode, with TTFT measured by the client.
//!
//! ```sh
//! scripts/bench-router-e2e.sh                      # 500 requests, kv against kv-blocks
//! scripts/bench-router-e2e.sh --requests 100 --modes kv,kv-blocks,round-robin
//! ```
//!
//! Needs `DATABASE_URL` (the script starts the test cluster). Each mode gets a fresh database,
//! control plane and agents, so every run starts with empty caches. The trace is scaled down
//! so that a 2-core machine can carry it in real time: every 512-token trace block becomes
//! `--block-tokens` tokens (32 by default: 1/16), each worker's KV cache and its prefill time
//! per token are scaled by the same factor (so a request's prefill takes as long as the
//! simulator's H100 profile gives the full-size prompt), and the request rate is set so that
//! each worker sees `--load` times the per-worker rate of the simulator's 8-worker fleet at 1×.
//! Requests go to the three agents' OpenAI frontends in turn (a client-side load balancer);
//! each agent's fleet router picks the worker, local or remote.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    clippy::print_stderr,
    unreachable_pub,
    missing_docs
)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use common::*;
use kvfleet_controlplane::auth::Role;
use serde_json::{Value, json};

/// Tokens per 512-token trace block, KV blocks per worker and prefill time per token follow
/// from this scale; the simulator's fleet (8 workers of 26,624 blocks of 16 tokens) is the
/// reference.
const TRACE_BLOCK_TOKENS: u64 = 512;
const SIM_KV_TOKENS: u64 = 26_624 * 16;
const SIM_WORKERS: f64 = 8.0;
/// Llama 3.1 8B on one H100 (the mock profile's linear term), µs per prompt token.
const H100_PREFILL_US_PER_TOKEN: f64 = 15.2;
/// Decode time per generated token, µs (the profile's ITL at small batch).
const TOKEN_TIME_US: u64 = 6_000;
const AGENTS: usize = 3;

struct Args {
    trace: PathBuf,
    requests: usize,
    modes: Vec<String>,
    block_tokens: u64,
    workers_per_agent: usize,
    load: f64,
    max_tokens: Option<u32>,
}

impl Args {
    fn parse() -> anyhow::Result<Self> {
        let mut args = Args {
            trace: PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../../shared/traces/synthetic_trace.jsonl"),
            requests: 500,
            modes: vec!["kv".into(), "kv-blocks".into()],
            block_tokens: 32,
            workers_per_agent: 2,
            load: 2.0,
            max_tokens: None,
        };
        let mut it = std::env::args().skip(1);
        while let Some(flag) = it.next() {
            // cargo bench passes `--bench` to harness-less benches.
            if flag == "--bench" {
                continue;
            }
            let value = it.next().with_context(|| format!("{flag} needs a value"))?;
            match flag.as_str() {
                "--trace" => args.trace = value.into(),
                "--requests" => args.requests = value.parse()?,
                "--modes" => args.modes = value.split(',').map(str::to_owned).collect(),
                "--block-tokens" => args.block_tokens = value.parse()?,
                "--workers-per-agent" => args.workers_per_agent = value.parse()?,
                "--load" => args.load = value.parse()?,
                "--max-tokens" => args.max_tokens = Some(value.parse()?),
                _ => bail!(
                    "unknown flag {flag}: expected --trace FILE, --requests N, --modes A,B, \
                     --block-tokens N, --workers-per-agent N, --load X, --max-tokens N"
                ),
            }
        }
        if args.block_tokens == 0
            || !args.block_tokens.is_multiple_of(16)
            || !TRACE_BLOCK_TOKENS.is_multiple_of(args.block_tokens)
        {
            bail!("--block-tokens must be 16, 32, 64, 128, 256 or 512");
        }
        for mode in &args.modes {
            mode.parse::<kvfleet_kv_router::RoutingMode>()?;
        }
        Ok(args)
    }

    fn workers(&self) -> usize {
        AGENTS * self.workers_per_agent
    }

    /// Trace tokens per replayed token.
    fn scale(&self) -> u64 {
        TRACE_BLOCK_TOKENS / self.block_tokens
    }
}

/// One replayed request.
struct Replay {
    at: Duration,
    prompt: String,
    max_tokens: u32,
}

/// The text of one trace block: `tokens` lowercase letters drawn from the block's id, so equal
/// ids give equal text (one token per byte with the mock's tokenizer).
fn block_text(id: u64, tokens: u64, out: &mut String) {
    let mut state = id.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x6b76_666c;
    for _ in 0..tokens {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.push(char::from(b'a' + (state % 26) as u8));
    }
}

fn load_trace(args: &Args, context: u64) -> anyhow::Result<(Vec<Replay>, f64)> {
    let text = std::fs::read_to_string(&args.trace)
        .with_context(|| format!("reading {}", args.trace.display()))?;
    let lines: Vec<Value> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .take(args.requests)
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .context("parsing the trace")?;
    let first_ms = lines
        .first()
        .and_then(|l| l["timestamp"].as_f64())
        .unwrap_or(0.0);
    let last_ms = lines
        .last()
        .and_then(|l| l["timestamp"].as_f64())
        .unwrap_or(0.0);
    // The trace's own rate is the simulator's 8-worker 1×; each of our workers gets `load`
    // times that per-worker rate.
    let trace_rate = lines.len() as f64 / ((last_ms - first_ms) / 1e3).max(1e-3);
    let rate = trace_rate / SIM_WORKERS * args.workers() as f64 * args.load;
    let time_scale = trace_rate / rate;
    let mut replays = Vec::new();
    for line in &lines {
        let input = line["input_length"].as_u64().context("input_length")?;
        let output = line["output_length"]
            .as_u64()
            .context("output_length")?
            .max(1);
        let ids: Vec<u64> = line["hash_ids"]
            .as_array()
            .context("hash_ids")?
            .iter()
            .filter_map(Value::as_u64)
            .collect();
        let tokens = input.div_ceil(args.scale()).max(1);
        let max_tokens = args.max_tokens.map_or(output, |m| output.min(u64::from(m)));
        if tokens + max_tokens > context {
            continue;
        }
        let mut prompt = String::with_capacity(tokens as usize);
        for id in &ids {
            block_text(*id, args.block_tokens, &mut prompt);
        }
        while (prompt.len() as u64) < tokens {
            block_text(
                u64::MAX - prompt.len() as u64,
                args.block_tokens,
                &mut prompt,
            );
        }
        prompt.truncate(tokens as usize);
        let ms = (line["timestamp"].as_f64().unwrap_or(0.0) - first_ms) * time_scale;
        replays.push(Replay {
            at: Duration::from_secs_f64(ms.max(0.0) / 1e3),
            prompt,
            max_tokens: max_tokens as u32,
        });
    }
    Ok((replays, rate))
}

/// What the client saw of one request.
struct Outcome {
    ttft: Option<Duration>,
    total: Duration,
    ok: bool,
}

async fn send(client: &reqwest::Client, agent: std::net::SocketAddr, r: &Replay) -> Outcome {
    let started = Instant::now();
    let body = json!({
        "model": MODEL,
        "prompt": r.prompt,
        "max_tokens": r.max_tokens,
        "stream": true,
        "ignore_eos": true,
    });
    let response = client
        .post(format!("http://{agent}/v1/completions"))
        .json(&body)
        .send()
        .await;
    let mut response = match response {
        Ok(resp) if resp.status().is_success() => resp,
        Ok(resp) => {
            let status = resp.status();
            eprintln!(
                "request refused: {status} {}",
                resp.text().await.unwrap_or_default()
            );
            return Outcome {
                ttft: None,
                total: started.elapsed(),
                ok: false,
            };
        }
        Err(e) => {
            eprintln!("request failed: {e}");
            return Outcome {
                ttft: None,
                total: started.elapsed(),
                ok: false,
            };
        }
    };
    let mut ttft = None;
    let mut done = false;
    let mut seen = String::new();
    loop {
        match response.chunk().await {
            Ok(Some(bytes)) => {
                seen.push_str(&String::from_utf8_lossy(&bytes));
                if ttft.is_none() && seen.contains("\"text\"") {
                    ttft = Some(started.elapsed());
                }
                if seen.contains("data: [DONE]") {
                    done = true;
                }
                // Keep only the tail: enough to find the markers across chunk boundaries.
                if seen.len() > 4096 {
                    seen.drain(..seen.len() - 64);
                }
            }
            Ok(None) => break,
            Err(e) => {
                eprintln!("stream failed: {e}");
                break;
            }
        }
    }
    Outcome {
        ttft,
        total: started.elapsed(),
        ok: done && ttft.is_some(),
    }
}

fn counter_sum(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

struct ModeResult {
    mode: String,
    sent: usize,
    ok: usize,
    ttft_ms: Vec<f64>,
    e2e_ms: Vec<f64>,
    hit_tokens: f64,
    prompt_tokens: u64,
    forwarded: f64,
    wall: Duration,
}

async fn run_mode(args: &Args, mode: &str, replays: &[Replay]) -> anyhow::Result<ModeResult> {
    let Some(db) = TestDb::create().await else {
        bail!(
            "DATABASE_URL is not set: run scripts/bench-router-e2e.sh (it starts the test cluster)"
        );
    };
    let cp = ControlPlane::start(&db, "127.0.0.1:0".parse()?, Duration::from_secs(10)).await;
    let admin = token(&db, Role::Admin).await;
    let join = token(&db, Role::Join).await;
    let dir = temp_dir("router-replay");
    std::fs::create_dir_all(&dir)?;
    // The mock workers' performance profile, for the fleet router's time-based cost: what an
    // operator would point `fleet_profile` at for a fleet of these workers.
    let kv_blocks = (SIM_KV_TOKENS / args.scale() / 16) as u32;
    let prefill_us = (H100_PREFILL_US_PER_TOKEN * args.scale() as f64).round() as u64;
    let context = context_length(args);
    let spec = kvfleet_agent::worker::protocol::EngineSpec {
        model: MODEL.into(),
        engine: kvfleet_agent::worker::protocol::WireEngine::Mock,
        path: None,
        kv_memory: None,
        context_length: context as u32,
        block_size: kvfleet_proto::BlockSize::default(),
        kv_blocks,
        vocab_size: 257,
        token_time_us: TOKEN_TIME_US,
        prefill_time_per_token_us: prefill_us,
        mock_kv_head_dim: 1,
        kv_tiers: kvfleet_engine::TierConfig::default(),
        external: None,
        fleet_hash_secret: None,
    };
    let scheduler = kvfleet_engine::SchedulerConfig {
        max_model_len: context as usize,
        ..kvfleet_engine::SchedulerConfig::default()
    };
    let mut profile = kvfleet_agent::worker::engine::profile(&spec).perf_profile(&scheduler);
    profile.kv_blocks = u64::from(kv_blocks);
    let profile_path = dir.join("mock.perf.toml");
    std::fs::write(&profile_path, profile.to_toml_string()?)?;

    let names: Vec<String> = (0..AGENTS).map(|k| format!("replay-{k}")).collect();
    let mut agents = Vec::new();
    for name in &names {
        let state = dir.join(name);
        let base = Agent::config(
            name,
            &cp,
            &join,
            &state,
            AgentSetup {
                mock_token_time_us: TOKEN_TIME_US as u32,
                peer_on_loopback: true,
            },
        );
        let toml = base
            .replace("context_length = 256", &format!("context_length = {context}"))
            .replace("kv_blocks = 256", &format!("kv_blocks = {kv_blocks}\nmock_prefill_time_per_token_us = {prefill_us}"))
            .replace("cpu_slots = 1", &format!("cpu_slots = {}", args.workers_per_agent))
            .replace(
                "[supervisor]",
                &format!(
                    "[routing]\nfleet_mode = \"{mode}\"\nfleet_profile = {profile_path:?}\n[supervisor]"
                ),
            );
        agents.push(Agent::launch(name, toml).await);
    }
    let name_refs: Vec<&str> = names.iter().map(String::as_str).collect();
    wait_nodes_healthy(&cp, &admin, &name_refs).await;
    register_and_deploy(
        &cp,
        &admin,
        json!({"name": MODEL, "format": "mock", "path": "mock", "block_size": 16,
                "context_length": context}),
        json!({"name": "replay", "model": MODEL, "min_workers": args.workers(),
                "max_workers": args.workers(), "placement": {"allow_cpu": true}}),
    )
    .await;
    let per_agent = args.workers_per_agent;
    wait_for(
        "every agent's workers ready and known to every router",
        Duration::from_secs(90),
        || async {
            agents.iter().all(|a| {
                a.ready_workers() == per_agent
                    && a.running.fleet().is_some_and(|f| {
                        let remote = f.router.remote_workers();
                        remote.len() == per_agent * (AGENTS - 1)
                            && remote.values().all(|w| w.ready && w.peer_addr.is_some())
                    })
            })
        },
    )
    .await;

    eprintln!("{mode}: replaying {} requests", replays.len());
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()?;
    let addrs: Vec<_> = agents.iter().map(|a| a.addr).collect();
    let started = tokio::time::Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (i, r) in replays.iter().enumerate() {
        tokio::time::sleep_until(started + r.at).await;
        let client = client.clone();
        let agent = addrs[i % addrs.len()];
        let replay = Replay {
            at: r.at,
            prompt: r.prompt.clone(),
            max_tokens: r.max_tokens,
        };
        tasks.spawn(async move { send(&client, agent, &replay).await });
    }
    let mut outcomes = Vec::new();
    while let Some(done) = tasks.join_next().await {
        outcomes.push(done?);
    }
    let wall = started.elapsed();

    // Workers' counters reach the agents' /metrics with their periodic status reports.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut hit_tokens = 0.0;
    let mut forwarded = 0.0;
    for agent in &agents {
        let text = reqwest::get(format!("http://{}/metrics", agent.addr))
            .await?
            .text()
            .await?;
        hit_tokens += counter_sum(&text, "kvfleet_worker_prefix_hit_tokens_total");
        forwarded += text
            .lines()
            .filter(|l| l.starts_with("kvfleet_fleet_route_total") && l.contains("remote"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>();
    }
    for agent in agents {
        agent.stop().await;
    }
    cp.stop().await;
    db.drop_now().await;
    let _ = std::fs::remove_dir_all(&dir);

    let ok: Vec<&Outcome> = outcomes.iter().filter(|o| o.ok).collect();
    Ok(ModeResult {
        mode: mode.to_owned(),
        sent: outcomes.len(),
        ok: ok.len(),
        ttft_ms: ok
            .iter()
            .filter_map(|o| o.ttft)
            .map(|d| d.as_secs_f64() * 1e3)
            .collect(),
        e2e_ms: ok.iter().map(|o| o.total.as_secs_f64() * 1e3).collect(),
        hit_tokens,
        prompt_tokens: replays.iter().map(|r| r.prompt.len() as u64).sum(),
        forwarded,
        wall,
    })
}

fn context_length(args: &Args) -> u64 {
    // Llama 3.1's 131,072-token context, scaled like the prompts.
    131_072 / args.scale()
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i]
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse()?;
    let (replays, rate) = load_trace(&args, context_length(&args))?;
    eprintln!(
        "{} requests from {} at {rate:.2} req/s over {} workers ({} tokens per trace block, {} µs \
         of prefill per token)",
        replays.len(),
        args.trace.display(),
        args.workers(),
        args.block_tokens,
        (H100_PREFILL_US_PER_TOKEN * args.scale() as f64).round()
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()?;
    let mut results = Vec::new();
    for mode in &args.modes {
        results.push(runtime.block_on(run_mode(&args, mode, &replays))?);
    }
    println!(
        "| mode | requests ok | TTFT mean | TTFT p50 | TTFT p90 | TTFT p99 | E2E mean | prefix hit rate | forwarded | wall |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for r in &mut results {
        r.ttft_ms.sort_by(f64::total_cmp);
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
        println!(
            "| {} | {}/{} | {:.0} ms | {:.0} ms | {:.0} ms | {:.0} ms | {:.0} ms | {:.1} % | {:.0} | {:.0} s |",
            r.mode,
            r.ok,
            r.sent,
            mean(&r.ttft_ms),
            quantile(&r.ttft_ms, 0.5),
            quantile(&r.ttft_ms, 0.9),
            quantile(&r.ttft_ms, 0.99),
            mean(&r.e2e_ms),
            100.0 * r.hit_tokens / r.prompt_tokens.max(1) as f64,
            r.forwarded,
            r.wall.as_secs_f64()
        );
    }
    if let [a, b, ..] = results.as_slice() {
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
        println!(
            "\n{} against {}: mean TTFT {:+.1} %",
            a.mode,
            b.mode,
            100.0 * (mean(&a.ttft_ms) / mean(&b.ttft_ms) - 1.0)
        );
    }
    Ok(())
}
