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
//!
//! With `--flood 256`, the measured window is two phases of `--seconds` each: an idle baseline,
//! then the same heartbeats while 256 concurrent connections send unauthenticated requests
//! (no token, a malformed one, a well-formed unknown one; to `/nodes` and `/agent/heartbeat`)
//! as fast as they can. Each phase reports heartbeat latency and errors, how many nodes the
//! liveness loop marked unhealthy or lost (from the audit log), and the flood's rate and
//! answers; at the end, how many token lookups reached the database.

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
    /// Concurrent flood connections in a second phase (0: no flood, one phase).
    #[arg(long, default_value_t = 0)]
    flood: usize,
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
    // The CA's sealing key goes to a scratch file, not the host's state directory.
    config.ca.key_file =
        std::env::temp_dir().join(format!("kvfleet-bench-{}-ca.key", std::process::id()));
    config.liveness.heartbeat_interval = Duration::from_secs(1);
    config.liveness.unhealthy_after = Duration::from_secs(10);
    config.liveness.lost_after = Duration::from_secs(60);
    config.placement.interval = Duration::from_secs(1);
    // The bench's nodes are placed on at once, as in a lab (joins otherwise wait for an admin).
    config.join.auto_approve = true;
    let (addr, join, admin, state) = server_rt.block_on(async {
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
            state.clone(),
            listener,
            std::future::pending(),
        ));
        anyhow::Ok((addr, join, admin, state))
    })?;
    let flood_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("bench-flood")
        .enable_all()
        .build()?;
    let flood_handle = flood_rt.handle().clone();
    let server_handle = server_rt.handle().clone();
    let flood = args.flood;
    let url = url.to_owned();
    let base = format!("http://{addr}/api/v1");
    let pg_port = pg_port(&url);
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
        let phases: u64 = if flood > 0 { 2 } else { 1 };
        eprintln!("placed {agents} workers; heartbeating for 5 s warm-up + {phases} x {seconds} s");

        let measure_from = Instant::now() + Duration::from_secs(5);
        let measure_until = measure_from + Duration::from_secs(seconds * phases);
        let flood_from = measure_from + Duration::from_secs(seconds);
        // (sent at, latency, ok)
        let latencies = Arc::new(Mutex::new(Vec::<(Instant, Duration, bool)>::with_capacity(agents * (seconds * phases) as usize)));
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
                        latencies.lock().await.push((sent, took, ok));
                        if !ok {
                            errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                }
            });
        }
        let mut db = sqlx::PgConnection::connect(&url).await?;
        // Where a heartbeat's time goes: the agent pool's connections in use, sampled every
        // 20 ms on the server's runtime. A pool that is always full means heartbeats wait for a
        // connection, and each one's hold time (its transaction's round trips) sets the rate.
        let pool_samples = Arc::new(std::sync::Mutex::new(Vec::<(Instant, u32)>::new()));
        {
            let (pool, samples) = (state.agent_pool.clone(), pool_samples.clone());
            server_handle.spawn(async move {
                while Instant::now() < measure_until {
                    let in_use = pool.size().saturating_sub(u32::try_from(pool.num_idle()).unwrap_or(0));
                    if let Ok(mut s) = samples.lock() {
                        s.push((Instant::now(), in_use));
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            });
        }
        tokio::time::sleep_until(measure_from.into()).await;
        let mut marks = vec![(Instant::now(), cpu_snapshot(pg_port).0, liveness_marks(&mut db).await?)];
        // (requests, 401, 429, other)
        let counts = Arc::new([0, 1, 2, 3].map(|_| std::sync::atomic::AtomicU64::new(0)));
        if flood > 0 {
            tokio::time::sleep_until(flood_from.into()).await;
            marks.push((Instant::now(), cpu_snapshot(pg_port).0, liveness_marks(&mut db).await?));
            let mut flooders = Vec::with_capacity(flood);
            for i in 0..flood {
                let counts = counts.clone();
                let (nodes, heartbeat) = (format!("{base}/nodes"), format!("{base}/agent/heartbeat"));
                flooders.push(flood_handle.spawn(async move {
                    // One client each: one connection each, as 256 attackers would have.
                    let Ok(client) = reqwest::Client::builder().pool_max_idle_per_host(1).build() else {
                        return;
                    };
                    let mut n = i;
                    while Instant::now() < measure_until {
                        n += 1;
                        let request = if n % 2 == 0 { client.get(&nodes) } else { client.post(&heartbeat).json(&json!({})) };
                        let request = match n % 3 {
                            0 => request,
                            1 => request.header("authorization", "Bearer not-a-token"),
                            _ => request.bearer_auth(kvfleet_controlplane::auth::generate_token()),
                        };
                        let slot = match request.send().await {
                            Ok(r) if r.status() == 401 => 1,
                            Ok(r) if r.status() == 429 => 2,
                            _ => 3,
                        };
                        counts[0].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        counts[slot].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }));
            }
            tokio::time::sleep_until(measure_until.into()).await;
            for flooder in flooders {
                let _ = flooder.await;
            }
        } else {
            tokio::time::sleep_until(measure_until.into()).await;
        }
        marks.push((Instant::now(), cpu_snapshot(pg_port).0, liveness_marks(&mut db).await?));
        let own_cluster = cpu_snapshot(pg_port).1;
        while tasks.join_next().await.is_some() {}
        let latencies = latencies.lock().await.clone();
        println!("agents: {agents}, heartbeat errors in all: {}", errors.load(std::sync::atomic::Ordering::Relaxed));
        for (phase, pair) in marks.windows(2).enumerate() {
            let ((from, cpu_before, marks_before), (until, cpu_after, marks_after)) = (&pair[0], &pair[1]);
            let wall = until.duration_since(*from).as_secs_f64();
            let mut ok: Vec<Duration> = latencies.iter().filter(|(sent, _, ok)| *ok && sent >= from && sent < until).map(|(_, took, _)| *took).collect();
            let failed = latencies.iter().filter(|(sent, _, ok)| !*ok && sent >= from && sent < until).count();
            ok.sort();
            let pct = |p: f64| {
                let index = ((ok.len() as f64 - 1.0) * p).round() as usize;
                ok.get(index).map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0)
            };
            let cpu = |key: &str| (cpu_after.get(key).copied().unwrap_or(0.0) - cpu_before.get(key).copied().unwrap_or(0.0)) / wall * 100.0;
            let name = if phase == 0 { "idle baseline" } else { "under the flood" };
            println!("== {name}: {wall:.1} s");
            println!("heartbeats: {} ok ({:.0}/s), {failed} errors", ok.len(), ok.len() as f64 / wall);
            println!("heartbeat latency ms: p50 {:.2}  p90 {:.2}  p99 {:.2}  max {:.2}", pct(0.50), pct(0.90), pct(0.99), pct(1.0));
            println!("nodes marked unhealthy: {}, lost: {}", marks_after.0 - marks_before.0, marks_after.1 - marks_before.1);
            let in_use: Vec<u32> = pool_samples.lock().map(|s| s.iter().filter(|(at, _)| at >= from && at < until).map(|(_, n)| *n).collect()).unwrap_or_default();
            let max = state.agent_pool.options().get_max_connections();
            println!(
                "agent pool: {:.1} of {max} connections in use on average, all {max} in {:.0} % of {} samples",
                in_use.iter().map(|n| f64::from(*n)).sum::<f64>() / in_use.len().max(1) as f64,
                in_use.iter().filter(|n| **n >= max).count() as f64 * 100.0 / in_use.len().max(1) as f64,
                in_use.len()
            );
            if phase == 1 {
                let count = |i: usize| counts[i].load(std::sync::atomic::Ordering::Relaxed);
                println!("flood: {flood} connections, {} requests ({:.0}/s): {} x 401, {} x 429, {} other", count(0), count(0) as f64 / wall, count(1), count(2), count(3));
            }
            println!(
                "CPU (% of one core): control plane {:.1}, simulated agents {:.1}, flood {:.1}, postgres {:.1} ({})",
                cpu("cp-server"),
                cpu("bench-agents"),
                cpu("bench-flood"),
                cpu("postgres"),
                if own_cluster { "the server on this port" } else { "every postgres process: postmaster not found" }
            );
        }
        let metrics = state.telemetry.encode();
        for line in metrics.lines().filter(|l| l.starts_with("kvfleet_cp_auth_") || l.starts_with("kvfleet_cp_db_errors_total")) {
            println!("{line}");
        }
        anyhow::Ok(())
    })
}

/// Liveness transitions so far: (nodes marked unhealthy, nodes marked lost), from the audit log.
async fn liveness_marks(db: &mut sqlx::PgConnection) -> anyhow::Result<(i64, i64)> {
    Ok(sqlx::query_as(
        "SELECT count(*) FILTER (WHERE action = 'node.unhealthy'),
                count(*) FILTER (WHERE action = 'node.lost')
         FROM audit_log",
    )
    .fetch_one(db)
    .await?)
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
                } else if name.starts_with("bench-flood") {
                    "bench-flood"
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
