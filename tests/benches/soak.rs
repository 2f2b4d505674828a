//! The soak: N minutes of streaming chat completions at saturation on three agents (a control
//! plane, Postgres, one mock worker per agent, requests forwarded between agents over QUIC),
//! with a worker killed -9 at random every few seconds. Not a CI test.
//!
//! ```sh
//! scripts/soak.sh --minutes 30                 # the figures in docs/benchmarks.md
//! scripts/soak.sh --minutes 2 --fault-every-s 5
//! ```
//!
//! Prints, at the end: requests, errors by kind (429s are documented backpressure, counted
//! apart), client-side end-to-end latency percentiles (all requests, and those in flight when
//! a worker was killed: the cost of a migration), migrations, and the resident memory (RSS) of
//! every process each minute: this process (it holds the control plane and the three agents,
//! which run as libraries here) and each worker process (their pids change when they are
//! killed and restarted; a restarted worker starts from scratch, so its RSS is sampled anew).

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

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use common::load::*;
use common::*;
use rand::{Rng as _, SeedableRng as _};

/// Minutes in, this process's RSS (KiB), each worker's (who, KiB).
type RssRow = (f64, u64, Vec<(String, u64)>);

struct Args {
    minutes: f64,
    clients_per_agent: usize,
    fault_every_s: f64,
    max_tokens: u32,
    seed: u64,
}

impl Args {
    fn parse() -> anyhow::Result<Self> {
        let mut args = Args {
            minutes: 5.0,
            clients_per_agent: 4,
            fault_every_s: 20.0,
            max_tokens: 60,
            seed: 21,
        };
        let mut it = std::env::args().skip(1);
        while let Some(flag) = it.next() {
            if flag == "--bench" {
                continue;
            }
            let value = it.next().with_context(|| format!("{flag} needs a value"))?;
            match flag.as_str() {
                "--minutes" => args.minutes = value.parse()?,
                "--clients-per-agent" => args.clients_per_agent = value.parse()?,
                "--fault-every-s" => args.fault_every_s = value.parse()?,
                "--max-tokens" => args.max_tokens = value.parse()?,
                "--seed" => args.seed = value.parse()?,
                _ => bail!(
                    "unknown flag {flag}: expected --minutes X, --clients-per-agent N, \
                     --fault-every-s X, --max-tokens N, --seed N"
                ),
            }
        }
        Ok(args)
    }
}

/// What the clients saw.
#[derive(Default)]
struct Tally {
    ok: u64,
    errors: BTreeMap<String, u64>,
    latency_ms: Vec<f64>,
    /// Latencies of requests that were in flight when a worker was killed.
    hit_latency_ms: Vec<f64>,
    wrong_text: u64,
}

/// When a worker was killed: a request that started before a kill and ended after it was in
/// flight at that kill.
#[derive(Default)]
struct Kills {
    at: Mutex<Vec<Instant>>,
}

impl Kills {
    fn hit(&self, record: &Record) -> bool {
        self.at
            .lock()
            .unwrap()
            .iter()
            .any(|k| (record.started..record.ended).contains(k))
    }
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn worker_pids(agent: &Agent) -> Vec<u32> {
    use kvfleet_agent::backend::Backend as _;
    agent
        .running
        .pool
        .workers()
        .iter()
        .filter_map(|w| w.pid)
        .collect()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

async fn run(args: &Args) -> anyhow::Result<()> {
    let setup = AgentSetup {
        mock_token_time_us: 15_000,
        peer_on_loopback: true,
    };
    let names = ["soak-a", "soak-b", "soak-c"];
    let nodes = ThreeNodes::start(names, Duration::from_secs(10), setup, |_, toml| toml)
        .await
        .context("DATABASE_URL is not set (scripts/soak.sh starts the test cluster)")?;
    wait_routers_know_everyone(&nodes.agents).await;
    let addrs: Vec<SocketAddr> = nodes.agents.iter().map(|a| a.addr).collect();
    let requests = Requests {
        prompts: (0..24)
            .map(|i| format!("soak prompt {i}: a question about topic {}", i % 5).into())
            .collect(),
        max_tokens: args.max_tokens,
        timeout: Duration::from_secs(120),
    };
    let client = reqwest::Client::new();
    let mut expected = BTreeMap::new();
    for p in requests.prompts.iter() {
        match stream(&client, addrs[0], p, args.max_tokens, requests.timeout).await {
            Outcome::Done(text, _) => expected.insert(p.clone(), text),
            Outcome::Failed { kind, detail } => bail!("baseline: {kind}: {detail}"),
        };
    }
    let tally = Arc::new(Mutex::new(Tally::default()));
    let kills = Arc::new(Kills::default());
    let load = {
        let (tally, kills) = (tally.clone(), kills.clone());
        Load::start_with(&addrs, args.clients_per_agent, &requests, move |r| {
            let ms = (r.ended - r.started).as_secs_f64() * 1000.0;
            let hit = kills.hit(&r);
            let mut t = tally.lock().unwrap();
            match r.outcome {
                Outcome::Done(text, _) if text == expected[&r.prompt] => {
                    t.ok += 1;
                    t.latency_ms.push(ms);
                    if hit {
                        t.hit_latency_ms.push(ms);
                    }
                }
                Outcome::Done(..) => t.wrong_text += 1,
                Outcome::Failed { kind, .. } => *t.errors.entry(kind).or_default() += 1,
            }
        })
    };
    let migrations_before = migrations(&addrs).await;
    let started = Instant::now();
    let total = Duration::from_secs_f64(args.minutes * 60.0);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(args.seed);
    let mut next_fault = Duration::from_secs_f64(args.fault_every_s * rng.random_range(0.5..1.5));
    let mut next_sample = Duration::ZERO;
    let mut rss_rows: Vec<RssRow> = Vec::new();
    let me = std::process::id();
    while started.elapsed() < total {
        let now = started.elapsed();
        if now >= next_sample {
            let workers = nodes
                .agents
                .iter()
                .flat_map(|a| {
                    worker_pids(a)
                        .into_iter()
                        .filter_map(|pid| Some((format!("{} worker {pid}", a.name), rss_kib(pid)?)))
                        .collect::<Vec<_>>()
                })
                .collect();
            rss_rows.push((now.as_secs_f64() / 60.0, rss_kib(me).unwrap_or(0), workers));
            next_sample += Duration::from_secs(60);
        }
        if now >= next_fault {
            let victim = rng.random_range(0..nodes.agents.len());
            if let Some(pid) = worker_pids(&nodes.agents[victim]).first() {
                let _ = std::process::Command::new("kill")
                    .args(["-9", &pid.to_string()])
                    .status();
                kills.at.lock().unwrap().push(Instant::now());
                eprintln!(
                    "{:7.1} s: killed -9 {}'s worker (pid {pid})",
                    now.as_secs_f64(),
                    names[victim]
                );
            }
            next_fault =
                now + Duration::from_secs_f64(args.fault_every_s * rng.random_range(0.5..1.5));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    load.finish().await;
    let elapsed = started.elapsed();
    let workers_end = nodes
        .agents
        .iter()
        .flat_map(|a| {
            worker_pids(a)
                .into_iter()
                .filter_map(|pid| Some((format!("{} worker {pid}", a.name), rss_kib(pid)?)))
                .collect::<Vec<_>>()
        })
        .collect();
    rss_rows.push((
        elapsed.as_secs_f64() / 60.0,
        rss_kib(me).unwrap_or(0),
        workers_end,
    ));
    let migrated = migrations(&addrs).await - migrations_before;
    let mut t = std::mem::take(&mut *tally.lock().unwrap());
    t.latency_ms.sort_by(f64::total_cmp);
    t.hit_latency_ms.sort_by(f64::total_cmp);
    let failed: u64 = t
        .errors
        .iter()
        .filter(|(k, _)| k.as_str() != "429")
        .map(|(_, n)| n)
        .sum::<u64>()
        + t.wrong_text;
    println!(
        "soak: {:.1} min, {} clients, a worker killed -9 every ~{} s ({} kills)",
        elapsed.as_secs_f64() / 60.0,
        addrs.len() * args.clients_per_agent,
        args.fault_every_s,
        kills.at.lock().unwrap().len()
    );
    println!(
        "requests ok {}, failed {failed} (wrong text {}), errors by kind {:?}, migrations {migrated}",
        t.ok, t.wrong_text, t.errors
    );
    println!(
        "E2E latency ms: p50 {:.0}, p99 {:.0}; requests in flight at a kill ({}): p50 {:.0}, p99 {:.0}",
        percentile(&t.latency_ms, 0.5),
        percentile(&t.latency_ms, 0.99),
        t.hit_latency_ms.len(),
        percentile(&t.hit_latency_ms, 0.5),
        percentile(&t.hit_latency_ms, 0.99),
    );
    println!("| minute | this process (control plane + 3 agents) RSS MiB | worker RSS MiB |");
    println!("| ---: | ---: | --- |");
    for (minute, main, workers) in &rss_rows {
        let workers: Vec<String> = workers
            .iter()
            .map(|(who, kib)| format!("{who}: {:.1}", *kib as f64 / 1024.0))
            .collect();
        println!(
            "| {minute:.1} | {:.1} | {} |",
            *main as f64 / 1024.0,
            workers.join(", ")
        );
    }
    nodes.stop().await;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()?;
    runtime.block_on(run(&args))
}
