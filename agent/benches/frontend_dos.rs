//! The OpenAI frontend under abusive clients, each attack measured beside an idle baseline in
//! the same run, on the mock engine. Not a CI test: `scripts/bench-frontend-dos.sh` runs it
//! (it raises `ulimit -n`; 5,000 attack connections cost 10,000 descriptors here, both ends in
//! one process).
//!
//! ```sh
//! scripts/bench-frontend-dos.sh            # or, with the fd limit raised:
//! cargo bench --profile dev -p kvfleet-agent --bench frontend_dos -- --connections 5000
//! ```
//!
//! One agent on loopback with the default frontend limits (10,000 connections, 10 s header
//! and 30 s body timeouts, 4 MiB body cap) and `--workers` mock workers. Normal clients
//! (`--clients` loops, a fresh connection per request, so each request goes through `accept`
//! and the connection cap as a new client's would) send non-streamed chat completions of
//! `--max-tokens` tokens. Phases of `--secs` each:
//!
//! 1. baseline: the normal clients alone;
//! 2. idle: `--connections` connections opened and kept open, sending nothing (any the server
//!    closes are reopened at once);
//! 3. slow loris: `--connections` connections that send half a request head and then one
//!    header line a second, never finishing it (reopened when closed);
//! 4. baseline again, the attackers gone;
//! 5. a 1 GiB body, declared in `Content-Length`, then the same sent chunked (no length): how
//!    many bytes the client could write before the server answered 413 and closed, and how long
//!    that took. Those bytes include what the kernel's socket buffers took; the frontend itself
//!    reads at most `max_body_bytes` (`prepare::read_body`).
//!
//! The agent, the attackers and the normal clients run on three tokio runtimes in this one
//! process (and share its machine's cores: the attackers' CPU is not free here as it would be
//! on another host). Prints two markdown tables.

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

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{TestAgent, model};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

#[derive(Clone, Copy)]
struct Args {
    connections: usize,
    secs: u64,
    clients: usize,
    max_tokens: u32,
    token_us: u64,
    workers: usize,
    body_bytes: u64,
}

fn args() -> Args {
    let mut a = Args {
        connections: 5000,
        secs: 15,
        clients: 8,
        max_tokens: 16,
        token_us: 500,
        workers: 2,
        body_bytes: 1 << 30,
    };
    let given: Vec<String> = std::env::args().skip(1).collect();
    let mut it = given.iter();
    while let Some(flag) = it.next() {
        // `cargo bench` passes `--bench`; anything else unknown is a mistake.
        if flag == "--bench" {
            continue;
        }
        let value = it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        let n: u64 = value
            .parse()
            .unwrap_or_else(|_| panic!("{flag} {value}: not a number"));
        match flag.as_str() {
            "--connections" => a.connections = n as usize,
            "--secs" => a.secs = n,
            "--clients" => a.clients = n as usize,
            "--max-tokens" => a.max_tokens = n as u32,
            "--token-us" => a.token_us = n,
            "--workers" => a.workers = n as usize,
            "--body-bytes" => a.body_bytes = n,
            other => panic!("unknown flag {other}"),
        }
    }
    a
}

/// What the normal clients saw in one phase.
struct Latencies {
    ok: usize,
    failed: usize,
    samples: Vec<Duration>,
}

impl Latencies {
    fn pct(&self, p: f64) -> Duration {
        if self.samples.is_empty() {
            return Duration::ZERO;
        }
        let i = ((self.samples.len() as f64 * p).ceil() as usize).clamp(1, self.samples.len());
        self.samples[i - 1]
    }
}

/// `clients` loops of fresh-connection chat completions for `secs`.
async fn normal_load(addr: SocketAddr, args: Args) -> Latencies {
    let url = format!("http://{addr}/v1/chat/completions");
    let body = serde_json::json!({
        "model": "m",
        "messages": [{"role": "user", "content": "Say something ordinary."}],
        "max_tokens": args.max_tokens,
        "ignore_eos": true,
    });
    let until = Instant::now() + Duration::from_secs(args.secs);
    let mut loops = Vec::new();
    for _ in 0..args.clients {
        let (url, body) = (url.clone(), body.clone());
        loops.push(tokio::spawn(async move {
            // No idle connections kept: every request is a new client connection.
            let client = reqwest::Client::builder()
                .pool_max_idle_per_host(0)
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap();
            let (mut samples, mut failed) = (Vec::new(), 0);
            while Instant::now() < until {
                let started = Instant::now();
                let ok = match client.post(&url).json(&body).send().await {
                    Ok(r) if r.status() == 200 => r.bytes().await.is_ok(),
                    _ => false,
                };
                if ok {
                    samples.push(started.elapsed());
                } else {
                    failed += 1;
                }
            }
            (samples, failed)
        }));
    }
    let mut all = Latencies {
        ok: 0,
        failed: 0,
        samples: Vec::new(),
    };
    for l in loops {
        let (samples, failed) = l.await.unwrap();
        all.failed += failed;
        all.samples.extend(samples);
    }
    all.ok = all.samples.len();
    all.samples.sort();
    all
}

/// The attackers' counters.
#[derive(Default)]
struct Held {
    open: AtomicU64,
    opened: AtomicU64,
    closed_by_server: AtomicU64,
    connect_failed: AtomicU64,
}

#[derive(Clone, Copy, PartialEq)]
enum Attack {
    Idle,
    SlowLoris,
}

/// One attack connection, reopened whenever the server closes it, until `stop`.
async fn hold(addr: SocketAddr, attack: Attack, held: Arc<Held>, stop: CancellationToken) {
    while !stop.is_cancelled() {
        let mut tcp = match TcpStream::connect(addr).await {
            Ok(tcp) => tcp,
            Err(_) => {
                held.connect_failed.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        held.open.fetch_add(1, Ordering::Relaxed);
        held.opened.fetch_add(1, Ordering::Relaxed);
        if attack == Attack::SlowLoris
            && tcp
                .write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
                .await
                .is_err()
        {
            held.open.fetch_sub(1, Ordering::Relaxed);
            continue;
        }
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.tick().await;
        let mut buf = [0u8; 1024];
        let closed = loop {
            tokio::select! {
                () = stop.cancelled() => break false,
                read = tcp.read(&mut buf) => match read {
                    Ok(0) | Err(_) => break true,
                    Ok(_) => {}
                },
                _ = tick.tick(), if attack == Attack::SlowLoris => {
                    if tcp.write_all(b"X-Slow: 1\r\n").await.is_err() {
                        break true;
                    }
                }
            }
        };
        held.open.fetch_sub(1, Ordering::Relaxed);
        if closed {
            held.closed_by_server.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Opens `n` attack connections (256 connects at a time, so the listen backlog is not what
/// refuses them) and waits until all are open or 30 s passed.
async fn attack(
    addr: SocketAddr,
    attack: Attack,
    n: usize,
    stop: CancellationToken,
) -> (Arc<Held>, Vec<tokio::task::JoinHandle<()>>, Duration) {
    let held = Arc::new(Held::default());
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..n {
        tasks.push(tokio::spawn(hold(addr, attack, held.clone(), stop.clone())));
        if i % 256 == 255 {
            while held.open.load(Ordering::Relaxed) + 64 < (i as u64)
                && started.elapsed() < Duration::from_secs(30)
            {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }
    while (held.open.load(Ordering::Relaxed) as usize) < n
        && started.elapsed() < Duration::from_secs(30)
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    (held, tasks, started.elapsed())
}

/// Sends a `size`-byte body (declared, or chunked without a length) as fast as the socket
/// takes it: the bytes written before the server cut the connection (or it ended), the time,
/// and the status line the server answered with.
async fn big_body(addr: SocketAddr, size: u64, declared: bool) -> (u64, Duration, String) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut rx, mut tx) = tcp.into_split();
    let head = if declared {
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
             Content-Length: {size}\r\n\r\n"
        )
    } else {
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Transfer-Encoding: chunked\r\n\r\n"
            .to_owned()
    };
    let started = Instant::now();
    let reader = tokio::spawn(async move {
        let mut answer = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match rx.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
        let text = String::from_utf8_lossy(&answer).into_owned();
        text.lines().next().unwrap_or("(no answer)").to_owned()
    });
    tx.write_all(head.as_bytes()).await.unwrap();
    const CHUNK: usize = 64 * 1024;
    let payload = vec![b' '; CHUNK];
    let chunk_head = format!("{CHUNK:x}\r\n");
    let mut sent = 0u64;
    let deadline = started + Duration::from_secs(120);
    while sent < size && Instant::now() < deadline {
        let wrote = if declared {
            tx.write_all(&payload).await
        } else {
            let mut framed = Vec::with_capacity(CHUNK + 16);
            framed.extend_from_slice(chunk_head.as_bytes());
            framed.extend_from_slice(&payload);
            framed.extend_from_slice(b"\r\n");
            tx.write_all(&framed).await
        };
        if wrote.is_err() {
            break;
        }
        sent += CHUNK as u64;
    }
    let elapsed = started.elapsed();
    drop(tx);
    let status = tokio::time::timeout(Duration::from_secs(10), reader)
        .await
        .map(|r| r.unwrap_or_default())
        .unwrap_or_else(|_| "(no answer within 10 s)".to_owned());
    (sent, elapsed, status)
}

/// CPU seconds (user + system) this process's threads have used, by the thread's name
/// (`agent`: the agent's runtime; `attackers`, `clients`; `other`: the agent's blocking pool
/// and helpers). Linux only; empty elsewhere.
fn cpu_by_thread() -> std::collections::BTreeMap<String, f64> {
    let mut by = std::collections::BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return by;
    };
    for task in tasks.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
        // After `(comm)`: the state is field 3 of stat(5); utime and stime are 14 and 15.
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks: f64 = fields
            .get(11..13)
            .map(|f| f.iter().filter_map(|v| v.parse::<f64>().ok()).sum())
            .unwrap_or(0.0);
        let name = match comm.trim() {
            n if n.starts_with("agent") => "agent",
            n if n.starts_with("attackers") => "attackers",
            n if n.starts_with("clients") => "clients",
            _ => "other",
        };
        *by.entry(name.to_owned()).or_insert(0.0) += ticks / 100.0;
    }
    by
}

/// CPU seconds per second of wall time, by thread group, between two readings.
fn cpu_note(
    before: &std::collections::BTreeMap<String, f64>,
    after: &std::collections::BTreeMap<String, f64>,
    wall: Duration,
) -> String {
    after
        .iter()
        .map(|(name, t)| {
            let used = t - before.get(name).copied().unwrap_or(0.0);
            format!("{name} {:.2}", used / wall.as_secs_f64())
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

fn row(phase: &str, l: &Latencies, base: &Latencies, cpu: &str, note: &str) {
    let ratio = l.pct(0.99).as_secs_f64() / base.pct(0.99).as_secs_f64().max(1e-9);
    println!(
        "| {phase} | {} | {} | {} | {} | {} | {ratio:.2}x | {cpu} | {note} |",
        l.ok,
        l.failed,
        ms(l.pct(0.50)),
        ms(l.pct(0.99)),
        ms(l.samples.last().copied().unwrap_or_default()),
    );
}

fn main() {
    let args = args();
    let mut toml = model("m", args.token_us, 4096);
    for _ in 0..args.workers {
        toml.push_str("[[workers]]\nmodel = \"m\"\ndevice = \"cpu\"\n");
    }
    let agent_rt = tokio::runtime::Builder::new_multi_thread()
        .thread_name("agent")
        .enable_all()
        .build()
        .unwrap();
    let agent = agent_rt.block_on(TestAgent::start(&toml));
    let addr = agent.addr;
    let limits = agent.running.frontend.config.clone();
    // The normal clients on a runtime of their own: the attack's 5,000 tasks must not delay
    // them on the client side, or the attack's own cost would read as the server's.
    let clients_rt = tokio::runtime::Builder::new_multi_thread()
        .thread_name("clients")
        .enable_all()
        .build()
        .unwrap();
    let clients = clients_rt.handle().clone();
    let measure = move |args: Args| {
        let clients = clients.clone();
        async move { clients.spawn(normal_load(addr, args)).await.unwrap() }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .thread_name("attackers")
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        eprintln!(
            "agent on {addr}: max_connections {}, header timeout {:?}, body cap {} bytes; \
             {} clients, {} attack connections, {} s per phase",
            limits.max_connections,
            limits.header_read_timeout,
            limits.max_body_bytes,
            args.clients,
            args.connections,
            args.secs
        );
        // Warm up (workers, connection paths).
        let warm = Args { secs: 2, ..args };
        let _ = measure(warm).await;
        let args = Args {
            secs: args.secs,
            ..warm
        };

        eprintln!("phase: baseline");
        let (cpu0, t0) = (cpu_by_thread(), Instant::now());
        let base = measure(args).await;
        let base_cpu = cpu_note(&cpu0, &cpu_by_thread(), t0.elapsed());

        let mut rows = Vec::new();
        for (name, kind) in [("idle", Attack::Idle), ("slow loris", Attack::SlowLoris)] {
            eprintln!("phase: {name}: opening {} connections", args.connections);
            let stop = CancellationToken::new();
            let (held, tasks, ramp) = attack(addr, kind, args.connections, stop.clone()).await;
            let at_start = held.open.load(Ordering::Relaxed);
            let (cpu0, t0) = (cpu_by_thread(), Instant::now());
            let load = measure(args).await;
            let cpu = cpu_note(&cpu0, &cpu_by_thread(), t0.elapsed());
            let at_end = held.open.load(Ordering::Relaxed);
            stop.cancel();
            for t in tasks {
                let _ = t.await;
            }
            let note = format!(
                "{at_start} open after {:.1} s of ramp, {at_end} at the end; {} closed by \
                 the server and reopened; {} connects failed",
                ramp.as_secs_f64(),
                held.closed_by_server.load(Ordering::Relaxed),
                held.connect_failed.load(Ordering::Relaxed),
            );
            rows.push((
                format!("{} {name} connections", args.connections),
                load,
                cpu,
                note,
            ));
            // Let the server notice the closed attack connections.
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        eprintln!("phase: baseline again");
        let (cpu0, t0) = (cpu_by_thread(), Instant::now());
        let after = measure(args).await;
        let after_cpu = cpu_note(&cpu0, &cpu_by_thread(), t0.elapsed());

        println!(
            "\nnormal clients: {} loops, a new connection per request, chat completions of {} \
             tokens (mock, {} us/token, {} workers), {} s per phase\n",
            args.clients, args.max_tokens, args.token_us, args.workers, args.secs
        );
        println!(
            "| phase | ok | failed | p50 ms | p99 ms | max ms | p99 vs baseline | CPU s/s by \
             thread | attackers |"
        );
        println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
        row("baseline", &base, &base, &base_cpu, "");
        for (name, load, cpu, note) in &rows {
            row(name, load, &base, cpu, note);
        }
        row(
            "baseline again",
            &after,
            &base,
            &after_cpu,
            "attackers gone",
        );

        println!(
            "\n| a {} MiB body | bytes the client wrote before the cut | time | answer |\n\
             | --- | --- | --- | --- |",
            args.body_bytes >> 20
        );
        for declared in [true, false] {
            let (sent, took, status) = big_body(addr, args.body_bytes, declared).await;
            println!(
                "| {} | {sent} ({:.2} MiB) | {} ms | {status} |",
                if declared {
                    format!("declared (`Content-Length: {}`)", args.body_bytes)
                } else {
                    "chunked (no length)".to_owned()
                },
                sent as f64 / (1024.0 * 1024.0),
                ms(took)
            );
        }
        println!(
            "\nthe frontend reads at most max_body_bytes = {} bytes of a body; the rest of what \
             the client wrote sat in socket buffers",
            limits.max_body_bytes
        );
        // Still serving after everything.
        let check = measure(Args { secs: 1, ..args }).await;
        assert!(
            check.ok > 0 && check.failed == 0,
            "the agent stopped serving"
        );
    });
    drop(rt);
    drop(clients_rt);
    agent_rt.block_on(async move {
        let _ = agent.stop().await;
    });
}
