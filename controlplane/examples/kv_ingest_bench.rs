//! KV event ingest: agents upload batches of KV events over HTTP to one control plane on
//! loopback while a router follows the stream; prints events/s applied, upload latency and how
//! far the stream lags.
//!
//! ```text
//! DATABASE_URL=postgres://kvfleet@127.0.0.1:55432/kvfleet \
//!   cargo run -p kvfleet-controlplane --release --example kv_ingest_bench -- --nodes 4 --batch 100 --seconds 20
//! ```
//!
//! Creates a scratch database next to `DATABASE_URL`'s (dropped at the end), registers `nodes`
//! agents (one GPU each), deploys one worker per node, then each agent uploads batches of
//! `batch` `Stored` events (each `blocks` chained blocks of a fresh prompt) back to back, one
//! batch in flight per agent, as the agent's uploader does. One follower long-polls
//! `GET /agent/kv-stream` and checks that sequence numbers arrive without holes.

#![allow(clippy::print_stdout)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Parser;
use kvfleet_controlplane::auth::Role;
use kvfleet_controlplane::{AppState, Config};
use kvfleet_proto::hash::{BlockSize, block_hashes};
use kvfleet_proto::kv_stream::{KvEventBatch, KvEventBatchResult, KvStreamPage};
use kvfleet_proto::{KvEvent, KvEventData, Tier, WorkerId};
use serde_json::{Value, json};
use sqlx::Connection as _;
use tokio::sync::Mutex;

#[derive(Debug, Parser)]
struct Args {
    /// Agents uploading concurrently (one worker each).
    #[arg(long, default_value_t = 4)]
    nodes: usize,
    /// Events per upload.
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// Blocks per `Stored` event.
    #[arg(long, default_value_t = 4)]
    blocks: usize,
    /// Measured seconds (after a warm-up of 2 s).
    #[arg(long, default_value_t = 20)]
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
    let scratch = format!("kvfleet_kvbench_{}", std::process::id());
    let base = args.database_url.clone();
    let (head, _) = base
        .rsplit_once('/')
        .context("DATABASE_URL has no database part")?;
    let url = format!("{head}/{scratch}");
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

/// Event `event_id` of `worker`: a fresh prompt's `blocks` blocks stored in G1.
fn event(worker: u64, event_id: u64, blocks: usize) -> KvEvent {
    let first = (worker as u32).wrapping_mul(1_000_003) ^ (event_id as u32).wrapping_mul(7919);
    let tokens: Vec<u32> = (0..blocks as u32 * 16)
        .map(|i| first.wrapping_add(i))
        .collect();
    KvEvent {
        worker: WorkerId(worker),
        event_id,
        tier: Tier::G1,
        data: KvEventData::Stored {
            parent: None,
            blocks: block_hashes(&tokens, BlockSize::default()),
        },
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
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
    config.placement.interval = Duration::from_millis(200);
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
    let nodes = args.nodes;
    let (batch_size, blocks, seconds) = (args.batch, args.blocks, args.seconds);
    client_rt.block_on(async move {
        let client = reqwest::Client::new();
        let mut agents = Vec::new();
        for i in 0..nodes {
            let body = json!({"hostname": format!("kvbench-{i:03}"), "gpus": [{
                "id": uuid::Uuid::new_v4(), "index": 0, "name": "NVIDIA H100", "memory_total_bytes": 80_i64 << 30}]});
            let r: Value = client.post(format!("{base}/agent/register")).bearer_auth(&join).json(&body)
                .send().await?.error_for_status()?.json().await?;
            let credential = r["credential"].as_str().context("no credential")?.to_owned();
            client.post(format!("{base}/agent/heartbeat")).bearer_auth(&credential).json(&json!({}))
                .send().await?.error_for_status()?;
            agents.push(credential);
        }
        let admin_post = |path: &str, body: Value| client.post(format!("{base}{path}")).bearer_auth(&admin).json(&body).send();
        admin_post("/models", json!({"name": "bench", "format": "mock", "path": "/m"})).await?.error_for_status()?;
        admin_post("/deployments", json!({"name": "bench", "model": "bench", "min_workers": nodes, "max_workers": nodes}))
            .await?.error_for_status()?;
        let mut workers = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        for credential in &agents {
            loop {
                let d: Value = client.get(format!("{base}/agent/desired-state")).bearer_auth(credential).send().await?.json().await?;
                if let Some(id) = d["workers"][0]["worker_id"].as_u64() {
                    workers.push(id);
                    break;
                }
                if Instant::now() > deadline {
                    bail!("placement did not finish");
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        eprintln!("{nodes} agents with one worker each; uploading batches of {batch_size} events ({blocks} blocks each) for 2 s warm-up + {seconds} s");

        let start = Instant::now();
        let measure_from = start + Duration::from_secs(2);
        let measure_until = measure_from + Duration::from_secs(seconds);
        let latencies = Arc::new(Mutex::new(Vec::<Duration>::new()));
        let applied = Arc::new(AtomicU64::new(0));
        let mut tasks = tokio::task::JoinSet::new();
        for (credential, worker) in agents.iter().cloned().zip(workers) {
            let client = client.clone();
            let url = format!("{base}/agent/kv-events");
            let latencies = latencies.clone();
            let applied = applied.clone();
            tasks.spawn(async move {
                let mut next_id = 0u64;
                while Instant::now() < measure_until {
                    let batch = KvEventBatch {
                        epochs: vec![],
                        events: (0..batch_size as u64).map(|k| event(worker, next_id + k, blocks)).collect(),
                        loads: vec![],
                    };
                    let body = serde_json::to_vec(&batch)?;
                    let sent = Instant::now();
                    let result: KvEventBatchResult = client.post(&url).bearer_auth(&credential)
                        .header("content-type", "application/json").body(body)
                        .send().await?.error_for_status()?.json().await?;
                    let done = Instant::now();
                    if result.applied as usize != batch_size {
                        bail!("batch not fully applied: {result:?}");
                    }
                    next_id += batch_size as u64;
                    if sent >= measure_from && done <= measure_until {
                        latencies.lock().await.push(done - sent);
                        applied.fetch_add(u64::from(result.applied), Ordering::Relaxed);
                    }
                }
                anyhow::Ok(())
            });
        }
        // One router following the stream.
        let follower = {
            let client = client.clone();
            let url = format!("{base}/agent/kv-stream");
            let credential = agents[0].clone();
            tokio::spawn(async move {
                let mut after = 0u64;
                let mut items = 0u64;
                let mut pages = 0u64;
                while Instant::now() < measure_until + Duration::from_secs(1) {
                    let page: KvStreamPage = client.get(format!("{url}?after={after}&wait_s=1&limit=10000"))
                        .bearer_auth(&credential).send().await?.error_for_status()?.json().await?;
                    if page.resync {
                        bail!("the follower fell out of the retained stream at {after}");
                    }
                    for item in &page.items {
                        if item.seq != after + 1 {
                            bail!("hole in the stream: {} after {after}", item.seq);
                        }
                        after = item.seq;
                    }
                    items += page.items.len() as u64;
                    pages += 1;
                }
                anyhow::Ok((items, after, pages))
            })
        };
        while let Some(done) = tasks.join_next().await {
            done??;
        }
        let (streamed, last_seq, pages) = follower.await??;
        let mut latencies = latencies.lock().await.clone();
        latencies.sort_unstable();
        let applied = applied.load(Ordering::Relaxed);
        println!("nodes={nodes} batch={batch_size} blocks/event={blocks} seconds={seconds}");
        println!("events applied in the window: {applied} ({:.0} events/s, {:.0} blocks/s)",
            applied as f64 / seconds as f64, (applied * blocks as u64) as f64 / seconds as f64);
        println!("upload latency (batch of {batch_size}): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} batches)",
            percentile(&latencies, 0.5).as_secs_f64() * 1e3,
            percentile(&latencies, 0.99).as_secs_f64() * 1e3,
            percentile(&latencies, 1.0).as_secs_f64() * 1e3,
            latencies.len());
        println!("stream follower: {streamed} items in {pages} long polls, without holes, up to seq {last_seq}");
        anyhow::Ok(())
    })
}
