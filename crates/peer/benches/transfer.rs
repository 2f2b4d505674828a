//! KV block transfer throughput: realistic 2 MiB blocks (16 tokens × 32 layers × 8 KV heads ×
//! 128 head dim × bf16 × K and V) streamed over loopback QUIC with mutual TLS, beside a plain
//! TCP stream of the same bytes (same frame prefixes, no encryption) in the same run.
//!
//! ```text
//! cargo bench -p kvfleet-peer --bench transfer -- [--blocks N] [--runs R] [--streams 1,4] [--mtu 1452,8952]
//! ```
//!
//! Prints a table (best and median of R runs) and the load average.
#![allow(
    clippy::print_stdout,
    clippy::unwrap_used,
    clippy::expect_used,
    unreachable_pub
)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{TestCa, new_node};
use kvfleet_peer::*;
use kvfleet_proto::frame::FrameCodec;
use kvfleet_proto::peer::{KvBlockHeader, kv_block_frame_prefix};
use kvfleet_proto::{BlockSize, KvDtype, KvLayout, SequenceHash};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn layout() -> KvLayout {
    KvLayout {
        model: "llama-3.1-8b".into(),
        layers: 32,
        kv_heads: 8,
        head_dim: 128,
        dtype: KvDtype::Bf16,
        block_size: BlockSize::new(16).expect("block size"),
    }
}

/// Imports nothing: counts and drops, so the figure is the transport's.
struct CountingSink {
    layout: KvLayout,
    bytes: AtomicU64,
}

impl BlockSink for CountingSink {
    fn expect(&self, _: &PeerInfo, _: &str) -> Option<KvLayout> {
        Some(self.layout.clone())
    }

    async fn import(&self, _: &str, block: KvBlock) -> Result<(), ErrorMessage> {
        self.bytes
            .fetch_add(block.data.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    fn stream_finished(&self, _: &str, _: Result<KvDone, ErrorMessage>) {}
}

/// A few distinct blocks of pseudo-random bytes, cycled (Bytes clones share them), as a
/// prefill worker's exported blocks would be: already in memory.
fn blocks(layout: &KvLayout, count: u32) -> Vec<KvBlock> {
    let len = layout.block_bytes();
    let distinct: Vec<Bytes> = (0..8u64)
        .map(|seed| {
            let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
            (0..len)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state as u8
                })
                .collect::<Vec<u8>>()
                .into()
        })
        .collect();
    (0..count)
        .map(|i| KvBlock {
            index: i,
            hash: SequenceHash(u64::from(i)),
            data: distinct[i as usize % distinct.len()].clone(),
        })
        .collect()
}

async fn quic_run(
    connection: &PeerConnection,
    layout: &KvLayout,
    blocks: &[KvBlock],
    streams: usize,
    run: usize,
) -> anyhow::Result<(Duration, u64)> {
    let report = connection
        .send_blocks(
            &format!("bench-{streams}-{run}"),
            layout,
            futures_util::stream::iter(blocks.to_vec()),
            &TransferOptions { streams },
        )
        .await?;
    Ok((report.elapsed, report.bytes))
}

/// The same frames over one plain TCP connection: frame prefix + block bytes per block, read
/// and discarded by the receiver; timed from the first write to the receiver's last byte.
async fn tcp_run(blocks: &[KvBlock]) -> anyhow::Result<(Duration, u64)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let codec = FrameCodec::default();
    let total: u64 = blocks.iter().map(|b| 36 + b.data.len() as u64).sum();
    let receiver = tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await?;
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0u64;
        while got < total {
            let n = socket.read(&mut buf).await?;
            anyhow::ensure!(n > 0, "TCP stream ended early");
            got += n as u64;
        }
        anyhow::Ok(Instant::now())
    });
    let mut socket = tokio::net::TcpStream::connect(addr).await?;
    let start = Instant::now();
    let mut bytes = 0;
    for block in blocks {
        let header = KvBlockHeader::for_block(block.index, block.hash, &block.data);
        let prefix = kv_block_frame_prefix(&codec, &header, &block.data)?;
        socket.write_all(&prefix).await?;
        socket.write_all(&block.data).await?;
        bytes += block.data.len() as u64;
    }
    socket.flush().await?;
    let end = receiver.await??;
    Ok((end - start, bytes))
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

fn summarize(name: &str, mtu: &str, streams: &str, results: &[(Duration, u64)]) {
    let mut rates: Vec<f64> = results
        .iter()
        .map(|(t, b)| *b as f64 / t.as_secs_f64() / 1e9)
        .collect();
    rates.sort_by(|a, b| a.total_cmp(b));
    let best = rates.last().copied().unwrap_or(0.0);
    let median = rates.get(rates.len() / 2).copied().unwrap_or(0.0);
    let mib = results.first().map_or(0, |(_, b)| *b) as f64 / (1 << 20) as f64;
    println!(
        "| {name:<22} | {mtu:>15} | {streams:>7} | {mib:>8.0} | {median:>11.2} | {best:>9.2} |"
    );
}

fn arg<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> T {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let count: u32 = arg(&args, "--blocks", 256);
    let runs: usize = arg(&args, "--runs", 5);
    let streams: Vec<usize> = arg(&args, "--streams", "1,4".to_owned())
        .split(',')
        .filter_map(|s| s.parse().ok())
        .collect();
    let mtus: Vec<u16> = arg(&args, "--mtu", "1452,8952".to_owned())
        .split(',')
        .filter_map(|s| s.parse().ok())
        .collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let layout = layout();
        let blocks = blocks(&layout, count);
        println!(
            "KV block transfer, loopback, {} blocks of {} bytes, {runs} runs; {} CPUs; load average before: {}",
            count,
            layout.block_bytes(),
            std::thread::available_parallelism().map_or(0, |n| n.get()),
            load_average()
        );
        let ca = TestCa::new("bench CA");
        println!();
        println!("| transport              | max UDP payload | streams | MiB sent | median GB/s | best GB/s |");
        println!("| ---------------------- | --------------: | ------: | -------: | ----------: | --------: |");
        let mut received = 0;
        for &mtu in &mtus {
            let server_cert = ca.issue(new_node());
            let mut config = PeerConfig::new("127.0.0.1:0".parse()?, server_cert.identity.clone());
            config.max_udp_payload = mtu;
            let server = PeerEndpoint::bind(config)?;
            let addr = server.local_addr()?;
            let sink = Arc::new(CountingSink {
                layout: layout.clone(),
                bytes: AtomicU64::new(0),
            });
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let serving = tokio::spawn({
                let (server, sink) = (server.clone(), sink.clone());
                async move {
                    server
                        .serve(Arc::new(RefuseAll), sink, async {
                            let _ = stopped.await;
                        })
                        .await;
                }
            });
            let mut config = PeerConfig::new("127.0.0.1:0".parse()?, ca.issue(new_node()).identity);
            config.max_udp_payload = mtu;
            let client = PeerEndpoint::bind(config)?;
            let connection = client.connect(addr, server_cert.node).await?;
            // Warm-up: congestion window, MTU discovery, allocator.
            quic_run(&connection, &layout, &blocks[..blocks.len().min(32)], 1, 0).await?;
            for &n in &streams {
                let mut results = Vec::new();
                for run in 0..runs {
                    results.push(quic_run(&connection, &layout, &blocks, n, run + 1).await?);
                }
                summarize("QUIC + mTLS (peer)", &mtu.to_string(), &n.to_string(), &results);
            }
            let metrics = server.metrics().snapshot();
            anyhow::ensure!(
                metrics.errors.iter().all(|(_, n)| *n == 0),
                "receiver errors: {metrics:?}"
            );
            received += metrics.kv_bytes_received;
            let _ = stop.send(());
            serving.await?;
        }
        tcp_run(&blocks[..blocks.len().min(32)]).await?;
        let mut results = Vec::new();
        for _ in 0..runs {
            results.push(tcp_run(&blocks).await?);
        }
        summarize("plain TCP, same bytes", "(loopback)", "1", &results);
        println!();
        println!("load average after: {}", load_average());
        println!("receiver imported {received} bytes over QUIC, no errors");
        anyhow::Ok(())
    })
}
