//! Heartbeat load: N simulated agents heartbeat at 1 Hz against one control plane on loopback.
//!
//! ```text
//! DATABASE_URL=postgres://kvfleet@127.0.0.1:55432/kvfleet \
//!   cargo run -p kvfleet-controlplane --release --example heartbeat_bench -- --agents 1000 --seconds 30
//! ```
//!
//! Creates a scratch database next to `DATABASE_URL`'s (dropped at the end), registers the
//! agents (one GPU each), deploys one worker per node, then every agent heartbeats once a
//! second (random phase) with its worker's state and metrics. Prints heartbeat latency
//! percentiles as the agents see them, and CPU time of the control plane's runtime threads,
//! of the simulated agents' threads, and of the Postgres server on the URL's port (its
//! postmaster and children: on a shared cluster that includes other users' backends).

#![allow(clippy::print_stdout)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Parser;
use kvfleet_controlplane::auth::Role;
use kvfleet_controlplane::{AppState, Config};
use serde_json::{Value, json};
use sqlx::Connection as _;
use tokio::sync::Mutex;

#[derive(Debug, Parser)]
struct Args {
    #[arg(long, default_value_t = 1000)]
    agents: usize,
    /// Measured seconds (after a warm-up of 5 s).
    #[arg(long, default_value_t = 30)]
    seconds: u64,
    #[arg(long, env = "DATABASE_URL")]
    database_url: String,
    /// Control-plane runtime threads.
    #[arg(long, default_value_t = 2)]
    server_threads: usize,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.server_threads)
        .thread_name("cp-server")
        .enable_all()
        .build()?;
    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("bench-agents")
        .enable_all()
        .build()?;

    let scratch = format!("kvfleet_bench_{}", std::process::id());
    let base = args.database_url.clone();
    let url = replace_database(&base, &scratch)?;
    server_rt.block_on(async {
        let mut admin = sqlx::PgConnection::connect(&base).await?;
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {scratch}")))
            .execute(&mut admin)
            .await?;
        anyhow::Ok(())
    })?;
    let result = run(&args, &server_rt, &client_rt, &url);
    server_rt.block_on(async {
        let mut admin = sqlx::PgConnection::connect(&base).await?;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {scratch} WITH (FORCE)"
        )))
        .execute(&mut admin)
        .await?;
        anyhow::Ok(())
    })?;
    result
}

/// The port in a `postgres://user@host:port/db` URL (5432 when absent).
fn pg_port(url: &str) -> u16 {
    url.rsplit_once('@')
        .map_or(url, |(_, rest)| rest)
        .split('/')
        .next()
        .and_then(|host| host.rsplit_once(':'))
        .and_then(|(_, port)| port.parse().ok())
        .unwrap_or(5432)
}

fn replace_database(url: &str, database: &str) -> anyhow::Result<String> {
    let (head, _) = url
        .rsplit_once('/')
        .context("DATABASE_URL has no database part")?;
    Ok(format!("{head}/{database}"))
}

fn run(
    args: &Args,
    server_rt: &tokio::runtime::Runtime,
    client_rt: &tokio::runtime::Runtime,
    url: &str,
) -> anyhow::Result<()> {
    let mut config = Config::new(url);
    config.database.max_connections = 32;
    config.liveness.heartbeat_interval = Duration::from_secs(1);
    config.liveness.unhealthy_after = Duration::from_secs(10);
    config.liveness.lost_after = Duration::from_secs(60);
    config.placement.interval = Duration::from_secs(1);
    // The bench's nodes are placed on at once, as in a lab (joins otherwise wait for an admin).
    config.join.auto_approve = true;
    let (addr, join, admin) = server_rt.block_on(async {
        let pool = kvfleet_controlplane::store::connect(&config.database).await?;
        kvfleet_controlplane::store::migrate(&pool).await?;
        let mut tx = pool.begin().await?;
        let join =
            kvfleet_controlplane::create_token(&mut tx, "bench join", Role::Join, None).await?;
        let admin =
            kvfleet_controlplane::create_token(&mut tx, "bench admin", Role::Admin, None).await?;
        tx.commit().await?;
        let state = AppState::new(pool, config.clone()).await?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        tokio::spawn(kvfleet_controlplane::serve(
            state,
            listener,
            std::future::pending(),
        ));
        anyhow::Ok((addr, join, admin))
    })?;
    let base = format!("http://{addr}/api/v1");
    let pg_port = pg_port(url);
    let agents = args.agents;
    let seconds = args.seconds;
    client_rt.block_on(async move {
        let client = reqwest::Client::builder().pool_max_idle_per_host(agents + 16).build()?;
        eprintln!("registering {agents} agents");
        let started = Instant::now();
        let credentials = Arc::new(Mutex::new(Vec::with_capacity(agents)));
        let mut tasks = tokio::task::JoinSet::new();
        for chunk in (0..agents).collect::<Vec<_>>().chunks(64) {
            for &i in chunk {
                let client = client.clone();
                let base = base.clone();
                let join = join.clone();
                let credentials = credentials.clone();
                tasks.spawn(async move {
                    let body = json!({"hostname": format!("bench-{i:05}"), "gpus": [{
                        "id": uuid::Uuid::new_v4(), "index": 0, "name": "NVIDIA H100", "memory_total_bytes": 80_i64 << 30}]});
                    let r: Value = client
                        .post(format!("{base}/agent/register"))
                        .bearer_auth(&join)
                        .json(&body)
                        .send()
                        .await?
                        .error_for_status()?
                        .json()
                        .await?;
                    let credential = r["credential"].as_str().context("no credential")?.to_owned();
                    credentials.lock().await.push(credential.clone());
                    // First heartbeat: the node becomes healthy and placeable.
                    client.post(format!("{base}/agent/heartbeat")).bearer_auth(&credential).json(&json!({})).send().await?.error_for_status()?;
                    anyhow::Ok(())
                });
            }
            while let Some(done) = tasks.join_next().await {
                done??;
            }
        }
        eprintln!("registered in {:.1} s; deploying one worker per node", started.elapsed().as_secs_f64());
        let admin_post = |path: &str, body: Value| client.post(format!("{base}{path}")).bearer_auth(&admin).json(&body).send();
        admin_post("/models", json!({"name": "bench", "format": "mock", "path": "/m"})).await?.error_for_status()?;
        admin_post(
            "/deployments",
            json!({"name": "bench", "model": "bench", "min_workers": agents, "max_workers": agents}),
        )
        .await?
        .error_for_status()?;
        // Wait for placement, then learn each agent's worker.
        let credentials = credentials.lock().await.clone();
        let mut worker_of: HashMap<String, i64> = HashMap::new();
        let deadline = Instant::now() + Duration::from_secs(120);
        while worker_of.len() < agents {
            if Instant::now() > deadline {
                bail!("placement did not finish: {} of {agents} workers", worker_of.len());
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            for credential in &credentials {
                if worker_of.contains_key(credential) {
                    continue;
                }
                let d: Value = client.get(format!("{base}/agent/desired-state")).bearer_auth(credential).send().await?.json().await?;
                if let Some(id) = d["workers"][0]["worker_id"].as_i64() {
                    worker_of.insert(credential.clone(), id);
                }
            }
        }
        eprintln!("placed {agents} workers; heartbeating for 5 s warm-up + {seconds} s");

        let measure_from = Instant::now() + Duration::from_secs(5);
        let measure_until = measure_from + Duration::from_secs(seconds);
        let latencies = Arc::new(Mutex::new(Vec::<Duration>::with_capacity(agents * seconds as usize)));
        let errors = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut tasks = tokio::task::JoinSet::new();
        for (credential, worker) in worker_of {
            let client = client.clone();
            let base = base.clone();
            let latencies = latencies.clone();
            let errors = errors.clone();
            tasks.spawn(async move {
                let phase = Duration::from_millis(rand::random_range(0..1000));
                let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + phase, Duration::from_secs(1));
                ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    ticker.tick().await;
                    if Instant::now() >= measure_until {
                        return;
                    }
                    let body = json!({"workers": [{"worker_id": worker, "state": "ready", "metrics": {
                        "request_rate": 3.5, "ttft_p50_ms": 120.0, "ttft_p99_ms": 480.0, "itl_p50_ms": 12.0,
                        "itl_p99_ms": 40.0, "tokens_per_s": 900.0, "kv_blocks_used": 4000, "kv_blocks_total": 16000,
                        "prefix_hit_rate": 0.4, "gpu_utilization": 0.8}}],
                        "gpus": []});
                    let sent = Instant::now();
                    let ok = match client.post(format!("{base}/agent/heartbeat")).bearer_auth(&credential).json(&body).send().await {
                        Ok(r) => r.status().is_success() && r.bytes().await.is_ok(),
                        Err(_) => false,
                    };
                    let took = sent.elapsed();
                    if sent >= measure_from {
                        if ok {
                            latencies.lock().await.push(took);
                        } else {
                            errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                }
            });
        }
        tokio::time::sleep_until(measure_from.into()).await;
        let (cpu_before, _) = cpu_snapshot(pg_port);
        let wall = Instant::now();
        tokio::time::sleep_until(measure_until.into()).await;
        let (cpu_after, own_cluster) = cpu_snapshot(pg_port);
        let wall = wall.elapsed().as_secs_f64();
        while tasks.join_next().await.is_some() {}
        let mut latencies = latencies.lock().await.clone();
        latencies.sort();
        let pct = |p: f64| {
            let index = ((latencies.len() as f64 - 1.0) * p).round() as usize;
            latencies.get(index).map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0)
        };
        let cpu = |key: &str| (cpu_after.get(key).copied().unwrap_or(0.0) - cpu_before.get(key).copied().unwrap_or(0.0)) / wall * 100.0;
        println!("agents: {agents}, measured: {wall:.1} s, heartbeats: {} ({:.0}/s), errors: {}",
            latencies.len(), latencies.len() as f64 / wall, errors.load(std::sync::atomic::Ordering::Relaxed));
        println!(
            "heartbeat latency ms: p50 {:.2}  p90 {:.2}  p99 {:.2}  max {:.2}",
            pct(0.50), pct(0.90), pct(0.99), pct(1.0)
        );
        println!(
            "CPU (% of one core): control plane {:.1}, simulated agents {:.1}, postgres {:.1} ({})",
            cpu("cp-server"),
            cpu("bench-agents"),
            cpu("postgres"),
            if own_cluster { "the server on this port" } else { "every postgres process: postmaster not found" }
        );
        anyhow::Ok(())
    })
}

/// CPU seconds used so far: this process's threads grouped by name prefix, plus the Postgres
/// server listening on `pg_port` (its postmaster, found by the `-p PORT` on its command line,
/// and that postmaster's children: the backends and background workers). Falls back to every
/// process named `postgres` when no such postmaster is visible (reported as such).
fn cpu_snapshot(pg_port: u16) -> (HashMap<String, f64>, bool) {
    let mut out = HashMap::new();
    // Clock ticks per second; 100 on every Linux this runs on.
    let ticks = 100.0;
    // (name, parent pid, CPU seconds)
    let parse = |stat: &str| -> Option<(String, u32, f64)> {
        let open = stat.find('(')?;
        let close = stat.rfind(')')?;
        let name = stat[open + 1..close].to_owned();
        let fields: Vec<&str> = stat[close + 2..].split_whitespace().collect();
        let ppid: u32 = fields.get(1)?.parse().ok()?;
        let utime: f64 = fields.get(11)?.parse().ok()?;
        let stime: f64 = fields.get(12)?.parse().ok()?;
        Some((name, ppid, (utime + stime) / ticks))
    };
    if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
        for task in tasks.flatten() {
            if let Ok(stat) = std::fs::read_to_string(task.path().join("stat"))
                && let Some((name, _, secs)) = parse(&stat)
            {
                let key = if name.starts_with("cp-server") {
                    "cp-server"
                } else if name.starts_with("bench-agents") {
                    "bench-agents"
                } else {
                    "other"
                };
                *out.entry(key.to_owned()).or_insert(0.0) += secs;
            }
        }
    }
    let mut postgres: Vec<(u32, u32, f64)> = Vec::new();
    let mut postmaster = None;
    let port_flag = format!("-p\0{pg_port}\0");
    if let Ok(procs) = std::fs::read_dir("/proc") {
        for p in procs.flatten() {
            let Some(pid) = p.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            if let Ok(stat) = std::fs::read_to_string(p.path().join("stat"))
                && let Some((name, ppid, secs)) = parse(&stat)
                && name == "postgres"
            {
                postgres.push((pid, ppid, secs));
                let cmdline = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
                if String::from_utf8_lossy(&cmdline).contains(&port_flag) {
                    postmaster = Some(pid);
                }
            }
        }
    }
    let total: f64 = match postmaster {
        Some(pm) => postgres
            .iter()
            .filter(|(pid, ppid, _)| *pid == pm || *ppid == pm)
            .map(|(_, _, secs)| secs)
            .sum(),
        None => postgres.iter().map(|(_, _, secs)| secs).sum(),
    };
    out.insert("postgres".to_owned(), total);
    (out, postmaster.is_some())
}
