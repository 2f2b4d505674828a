//! The OpenAI frontend under abusive clients, each attack measured beside an idle baseline in
//! the same run, on the mock engine. Not a CI test: `scripts/bench-frontend-dos.sh` runs it
//! (it raises `ulimit -n`; 5,000 attack connections cost 5,000 descriptors in the agent's
//! process and 5,000 in the attackers').
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
//! Each attack connection is counted in the frontend's slow-loris defences (`frontend/conn.rs`):
//! its first-head deadline is jittered, and more than `headerless_pressure` of them would be cut
//! oldest first (the default 8,000 is above `--connections` 5,000).
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
//! The agent runs in this process; the attackers and the normal clients each run in a process
//! of their own (this binary again, `--role attacker` / `--role clients`), as they would on
//! other hosts: their CPU still comes from this machine's cores, but not from the agent's
//! process, its runtime or its allocator. The attack connections come from `--attacker-ips`
//! loopback addresses (127.1.0.1, 127.1.0.2, ...: a botnet, not one host, so the frontend's
//! per-IP cap of headerless connections is not what holds them off); the normal clients from
//! 127.0.0.1. Prints two markdown tables, with the load average at each phase's start and end.

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

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{IpAddr, SocketAddr};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
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
    attacker_ips: usize,
}

/// What this process is: the agent and the bench's driver, or one of its helper processes.
enum Role {
    Main,
    /// `--role clients --addr A`: the normal clients for `--secs`; prints what they saw.
    Clients(SocketAddr),
    /// `--role attacker --addr A --kind idle|slow`: holds the attack connections until its
    /// stdin closes; prints `ready` once they are open and its counters at the end.
    Attacker(SocketAddr, Attack),
}

fn args() -> (Role, Args) {
    let mut a = Args {
        connections: 5000,
        secs: 15,
        clients: 8,
        max_tokens: 16,
        token_us: 500,
        workers: 2,
        body_bytes: 1 << 30,
        attacker_ips: 40,
    };
    let (mut role, mut addr, mut kind) = (None, None, None);
    let given: Vec<String> = std::env::args().skip(1).collect();
    let mut it = given.iter();
    while let Some(flag) = it.next() {
        // `cargo bench` passes `--bench`; anything else unknown is a mistake.
        if flag == "--bench" {
            continue;
        }
        let value = it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--role" => role = Some(value.clone()),
            "--addr" => addr = Some(value.parse::<SocketAddr>().unwrap()),
            "--kind" => {
                kind = Some(match value.as_str() {
                    "idle" => Attack::Idle,
                    "slow" => Attack::SlowLoris,
                    other => panic!("--kind {other}: idle or slow"),
                })
            }
            _ => {
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
                    "--attacker-ips" => a.attacker_ips = (n as usize).clamp(1, 65_000),
                    other => panic!("unknown flag {other}"),
                }
            }
        }
    }
    let role = match role.as_deref() {
        None => Role::Main,
        Some("clients") => Role::Clients(addr.expect("--addr")),
        Some("attacker") => Role::Attacker(addr.expect("--addr"), kind.expect("--kind")),
        Some(other) => panic!("--role {other}"),
    };
    (role, a)
}

/// What the normal clients saw in one phase.
struct Latencies {
    ok: usize,
    failed: usize,
    samples: Vec<Duration>,
    /// CPU seconds per second the clients' process used.
    cpu: f64,
    /// How late a 1 ms sleep woke in the clients' process, 99th percentile ([`wake_lateness`]).
    wake_p99_ms: f64,
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

/// `clients` loops of fresh-connection chat completions for `secs` (in the clients' process).
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
        cpu: 0.0,
        wake_p99_ms: 0.0,
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

/// Attack connection `i`'s source address: one of `ips` loopback addresses from 127.1.0.1.
fn source(i: usize, ips: usize) -> IpAddr {
    let n = (i % ips) as u32 + 1;
    IpAddr::from([127, 1, (n >> 8) as u8, n as u8])
}

async fn connect_from(from: IpAddr, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(from, 0))?;
    socket.connect(addr).await
}

/// One attack connection, reopened whenever the server closes it, until `stop`.
async fn hold(
    addr: SocketAddr,
    from: IpAddr,
    attack: Attack,
    held: Arc<Held>,
    stop: CancellationToken,
) {
    while !stop.is_cancelled() {
        let mut tcp = match connect_from(from, addr).await {
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
    args: Args,
    stop: CancellationToken,
) -> (Arc<Held>, Vec<tokio::task::JoinHandle<()>>, Duration) {
    let n = args.connections;
    let held = Arc::new(Held::default());
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..n {
        let from = source(i, args.attacker_ips);
        tasks.push(tokio::spawn(hold(
            addr,
            from,
            attack,
            held.clone(),
            stop.clone(),
        )));
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

/// CPU seconds (user + system) process `pid` (`self` for this one) has used. Linux only; 0
/// elsewhere.
fn cpu_of(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // After `(comm)`: the state is field 3 of stat(5); utime and stime are 14 and 15.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    fields
        .get(11..13)
        .map(|f| f.iter().filter_map(|v| v.parse::<f64>().ok()).sum::<f64>())
        .unwrap_or(0.0)
        / 100.0
}

/// The 1-minute load average.
fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".to_owned())
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

fn row(phase: &str, l: &Latencies, base: &Latencies, cpu: &str, note: &str) {
    let ratio = l.pct(0.99).as_secs_f64() / base.pct(0.99).as_secs_f64().max(1e-9);
    println!(
        "| {phase} | {} | {} | {} | {} | {} | {ratio:.2}x | {:.2} | {cpu} | {note} |",
        l.ok,
        l.failed,
        ms(l.pct(0.50)),
        ms(l.pct(0.99)),
        ms(l.samples.last().copied().unwrap_or_default()),
        l.wake_p99_ms,
    );
}

/// This binary again, in `role`, with the bench's arguments.
fn helper(role: &[&str], args: Args) -> Child {
    let exe = std::env::current_exe().unwrap();
    Command::new(exe)
        .args(role)
        .args([
            "--connections",
            &args.connections.to_string(),
            "--secs",
            &args.secs.to_string(),
            "--clients",
            &args.clients.to_string(),
            "--max-tokens",
            &args.max_tokens.to_string(),
            "--attacker-ips",
            &args.attacker_ips.to_string(),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Runs the normal clients in their own process for `args.secs`.
fn measure(addr: SocketAddr, args: Args) -> Latencies {
    let child = helper(&["--role", "clients", "--addr", &addr.to_string()], args);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "the clients' process failed");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut words = text.split_whitespace();
    let mut next = || words.next().unwrap_or("0").to_owned();
    let failed: usize = next().parse().unwrap();
    let cpu: f64 = next().parse().unwrap();
    let wake_p99_ms: f64 = next().parse().unwrap();
    let samples: Vec<Duration> = words
        .map(|w| Duration::from_micros(w.parse().unwrap()))
        .collect();
    Latencies {
        ok: samples.len(),
        failed,
        samples,
        cpu,
        wake_p99_ms,
    }
}

/// The machine's own noise while the clients run: a thread that sleeps 1 ms at a time and
/// records how late it wakes (the 99th percentile, in ms). On a quiet machine that is well under
/// a millisecond; on one whose cores other work takes it is what every process here waits for a
/// core, the agent's included, attack or not.
fn wake_lateness(until: Instant) -> f64 {
    let mut late = Vec::new();
    while Instant::now() < until {
        let asked = Instant::now();
        std::thread::sleep(Duration::from_millis(1));
        late.push(asked.elapsed().saturating_sub(Duration::from_millis(1)));
    }
    late.sort();
    let i = ((late.len() as f64 * 0.99).ceil() as usize).clamp(1, late.len().max(1));
    late.get(i - 1).map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

/// The clients' process: measures, then prints `failed cpu_per_sec wake_p99_ms sample_us...`
/// (sorted).
fn clients_role(addr: SocketAddr, args: Args) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (cpu0, t0) = (cpu_of("self"), Instant::now());
    let probe = std::thread::spawn(move || wake_lateness(t0 + Duration::from_secs(args.secs)));
    let l = rt.block_on(normal_load(addr, args));
    let cpu = (cpu_of("self") - cpu0) / t0.elapsed().as_secs_f64();
    let wake = probe.join().unwrap();
    let mut out = format!("{} {cpu:.3} {wake:.2}", l.failed);
    for s in &l.samples {
        out.push_str(&format!(" {}", s.as_micros()));
    }
    println!("{out}");
}

/// The attackers' process: `ready OPEN RAMP_MS` once the connections are open; when stdin
/// closes, `done OPEN CLOSED_BY_SERVER CONNECT_FAILED OPENED`.
fn attacker_role(addr: SocketAddr, kind: Attack, args: Args) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let stop = CancellationToken::new();
        let (held, tasks, ramp) = attack(addr, kind, args, stop.clone()).await;
        println!(
            "ready {} {}",
            held.open.load(Ordering::Relaxed),
            ramp.as_millis()
        );
        std::io::stdout().flush().unwrap();
        // Until the driver closes our stdin.
        tokio::task::spawn_blocking(|| {
            let mut line = String::new();
            while std::io::stdin().read_line(&mut line).unwrap_or(0) > 0 {}
        })
        .await
        .unwrap();
        let open = held.open.load(Ordering::Relaxed);
        stop.cancel();
        for t in tasks {
            let _ = t.await;
        }
        println!(
            "done {open} {} {} {}",
            held.closed_by_server.load(Ordering::Relaxed),
            held.connect_failed.load(Ordering::Relaxed),
            held.opened.load(Ordering::Relaxed),
        );
    });
}

/// An attacker process holding its connections.
struct Attacker {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    open: u64,
    ramp: Duration,
}

impl Attacker {
    fn start(addr: SocketAddr, kind: &str, args: Args) -> Self {
        let mut child = helper(
            &[
                "--role",
                "attacker",
                "--addr",
                &addr.to_string(),
                "--kind",
                kind,
            ],
            args,
        );
        let stdin = child.stdin.take();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        let words: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(words.first(), Some(&"ready"), "{line}");
        Self {
            open: words[1].parse().unwrap(),
            ramp: Duration::from_millis(words[2].parse().unwrap()),
            child,
            stdin,
            stdout,
        }
    }

    /// Stops it: (open at the end, closed by the server, connects failed).
    fn stop(mut self) -> (u64, u64, u64) {
        drop(self.stdin.take());
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        self.child.wait().unwrap();
        let words: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .map(|w| w.parse().unwrap())
            .collect();
        (words[0], words[1], words[2])
    }
}

fn main() {
    let (role, args) = args();
    match role {
        Role::Clients(addr) => return clients_role(addr, args),
        Role::Attacker(addr, kind) => return attacker_role(addr, kind, args),
        Role::Main => {}
    }
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
    eprintln!(
        "agent on {addr}: max_connections {}, header timeout {:?} (jitter {}), headerless \
         pressure {} (then {:?}), {} headerless per IP, body cap {} bytes; {} clients, {} \
         attack connections from {} addresses, {} s per phase",
        limits.max_connections,
        limits.header_read_timeout,
        limits.header_timeout_jitter,
        limits.headerless_pressure,
        limits.header_read_timeout_under_pressure,
        limits.max_headerless_per_ip,
        limits.max_body_bytes,
        args.clients,
        args.connections,
        args.attacker_ips,
        args.secs
    );
    // The agent's CPU: this process's, less the driver's (idle while it waits on children).
    let agent_cpu = |since: f64, t: Instant| (cpu_of("self") - since) / t.elapsed().as_secs_f64();
    // Warm up (workers, connection paths).
    let _ = measure(addr, Args { secs: 2, ..args });

    eprintln!("phase: baseline");
    let (l0, c0, t0) = (load(), cpu_of("self"), Instant::now());
    let base = measure(addr, args);
    let base_cpu = format!(
        "agent {:.2}, clients {:.2}; load {l0} → {}",
        agent_cpu(c0, t0),
        base.cpu,
        load()
    );

    let mut rows = Vec::new();
    for (name, kind) in [("idle", "idle"), ("slow loris", "slow")] {
        eprintln!("phase: {name}: opening {} connections", args.connections);
        let attacker = Attacker::start(addr, kind, args);
        let pid = attacker.child.id().to_string();
        let (l0, c0, a0, t0) = (load(), cpu_of("self"), cpu_of(&pid), Instant::now());
        let measured = measure(addr, args);
        let attackers_cpu = (cpu_of(&pid) - a0) / t0.elapsed().as_secs_f64();
        let cpu = format!(
            "agent {:.2}, clients {:.2}, attackers {attackers_cpu:.2}; load {l0} → {}",
            agent_cpu(c0, t0),
            measured.cpu,
            load()
        );
        let (at_start, ramp) = (attacker.open, attacker.ramp);
        let (at_end, closed, failed) = attacker.stop();
        let note = format!(
            "{at_start} open after {:.1} s of ramp, {at_end} at the end; {closed} closed by \
             the server and reopened; {failed} connects failed",
            ramp.as_secs_f64(),
        );
        rows.push((
            format!("{} {name} connections", args.connections),
            measured,
            cpu,
            note,
        ));
        // Let the server notice the closed attack connections.
        std::thread::sleep(Duration::from_secs(2));
    }
    eprintln!("phase: baseline again");
    let (l0, c0, t0) = (load(), cpu_of("self"), Instant::now());
    let after = measure(addr, args);
    let after_cpu = format!(
        "agent {:.2}, clients {:.2}; load {l0} → {}",
        agent_cpu(c0, t0),
        after.cpu,
        load()
    );

    println!(
        "\nnormal clients: {} loops, a new connection per request, chat completions of {} \
         tokens (mock, {} us/token, {} workers), {} s per phase\n",
        args.clients, args.max_tokens, args.token_us, args.workers, args.secs
    );
    println!(
        "| phase | ok | failed | p50 ms | p99 ms | max ms | p99 vs baseline | a 1 ms sleep's \
         lateness, p99 ms | CPU s/s by process; 1-min load average | attackers |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
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

    let rt = tokio::runtime::Runtime::new().unwrap();
    println!(
        "\n| a {} MiB body | bytes the client wrote before the cut | time | answer |\n\
         | --- | --- | --- | --- |",
        args.body_bytes >> 20
    );
    for declared in [true, false] {
        let (sent, took, status) = rt.block_on(big_body(addr, args.body_bytes, declared));
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
    let check = measure(addr, Args { secs: 1, ..args });
    assert!(
        check.ok > 0 && check.failed == 0,
        "the agent stopped serving"
    );
    drop(rt);
    agent_rt.block_on(async move {
        let _ = agent.stop().await;
    });
}
