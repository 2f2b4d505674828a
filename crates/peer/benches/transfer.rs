//! KV block transfer throughput: realistic 2 MiB blocks (16 tokens × 32 layers × 8 KV heads ×
//! 128 head dim × bf16 × K and V) streamed over loopback QUIC with mutual TLS, beside the same
//! frames over TLS 1.3 on TCP (rustls, same provider, cipher suites and certificates, the same
//! receive checks) and over plain TCP (no encryption, no checks), all in the same run.
//!
//! ```text
//! cargo bench -p kvfleet-peer --bench transfer -- [--blocks N] [--runs R] [--streams 1,4] [--mtu 1452,8952] [--udp-buffer BYTES]
//! ```
//!
//! Prints a table (best and median of R runs), the ratios of the medians, and the load average.
#![allow(
    clippy::print_stdout,
    clippy::unwrap_used,
    clippy::expect_used,
    unreachable_pub
)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes};
use common::{NodeCert, TestCa, new_node};
use kvfleet_peer::*;
use kvfleet_proto::frame::{Decoded, FrameCodec, HEADER_LEN};
use kvfleet_proto::peer::{KvBlockHeader, PEER_ALPN, kv_block_frame_prefix};
use kvfleet_proto::{BlockSize, KvDtype, KvLayout, SequenceHash};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

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

/// rustls configurations for TLS 1.3 over TCP built as `kvfleet-peer` builds its QUIC ones
/// (ring provider with its default cipher suites, so both negotiate the same AES-GCM suite;
/// the node CA as the only root; client certificates required; ALPN `kvfleet-peer/1`).
struct TlsPair {
    acceptor: tokio_rustls::TlsAcceptor,
    connector: tokio_rustls::TlsConnector,
    name: ServerName<'static>,
}

fn tls_pair(server: &NodeCert, client: &NodeCert) -> anyhow::Result<TlsPair> {
    let provider = || Arc::new(rustls::crypto::ring::default_provider());
    let chain =
        |pem: &str| CertificateDer::pem_slice_iter(pem.as_bytes()).collect::<Result<Vec<_>, _>>();
    let mut roots = rustls::RootCertStore::empty();
    for cert in chain(&server.identity.ca_pem)? {
        roots.add(cert)?;
    }
    let roots = Arc::new(roots);
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
            .build()?;
    let mut server_config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            chain(&server.identity.cert_pem)?,
            PrivateKeyDer::from_pem_slice(server.identity.key_pem.as_bytes())?,
        )?;
    server_config.alpn_protocols = vec![PEER_ALPN.to_vec()];
    server_config.send_tls13_tickets = 0;
    let mut client_config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(
            chain(&client.identity.cert_pem)?,
            PrivateKeyDer::from_pem_slice(client.identity.key_pem.as_bytes())?,
        )?;
    client_config.alpn_protocols = vec![PEER_ALPN.to_vec()];
    Ok(TlsPair {
        acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(server_config)),
        connector: tokio_rustls::TlsConnector::from(Arc::new(client_config)),
        name: ServerName::try_from(node_server_name(server.node))?,
    })
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Reads frames as the peer receiver does: each into a buffer of exactly its size, then the
/// frame CRC-32, the block header, the size and the block's XXH3 checksum. Returns the block
/// bytes received at the clean end of the stream.
async fn receive_checked(
    socket: &mut (dyn Io + '_),
    codec: &FrameCodec,
    block_bytes: usize,
) -> anyhow::Result<u64> {
    let mut bytes = 0u64;
    loop {
        let mut header = [0u8; HEADER_LEN];
        match socket.read_exact(&mut header).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(bytes),
            Err(e) => return Err(e.into()),
        }
        let Decoded::NeedMore { need } = codec.decode(&header)? else {
            anyhow::bail!("empty frame");
        };
        let mut buf = Vec::with_capacity(need);
        buf.extend_from_slice(&header);
        while buf.len() < need {
            let left = need - buf.len();
            let n = socket.read_buf(&mut (&mut buf).limit(left)).await?;
            anyhow::ensure!(n > 0, "stream ended inside a frame");
        }
        let frame = codec.decode_exact(&buf)?;
        let (block, data) = KvBlockHeader::parse(frame.payload)?;
        anyhow::ensure!(data.len() == block_bytes, "block size");
        anyhow::ensure!(block.verify(data), "block checksum");
        bytes += data.len() as u64;
    }
}

/// Reads and discards everything: the kernel's loopback, nothing else.
async fn receive_discard(socket: &mut (dyn Io + '_)) -> anyhow::Result<u64> {
    let mut buf = vec![0u8; 1 << 20];
    let mut got = 0u64;
    loop {
        let n = socket.read(&mut buf).await?;
        if n == 0 {
            return Ok(got);
        }
        got += n as u64;
    }
}

/// The same frames over `streams` TCP connections (TLS 1.3 when `tls` is given), blocks taken
/// in order by whichever sender is free; connections (and TLS handshakes) are set up before
/// the clock starts, as the QUIC connection is. Timed from the first write to the last
/// receiver's last byte. With TLS the receivers check every frame as the peer receiver does;
/// plain TCP reads and discards.
async fn tcp_run(
    blocks: &Arc<Vec<KvBlock>>,
    streams: usize,
    tls: Option<&TlsPair>,
) -> anyhow::Result<(Duration, u64)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let codec = FrameCodec::default();
    let block_bytes = blocks.first().map_or(0, |b| b.data.len());
    let mut receivers = Vec::new();
    let mut senders: Vec<Box<dyn Io>> = Vec::new();
    for _ in 0..streams {
        let client = tokio::net::TcpStream::connect(addr);
        let (client, accepted) = tokio::join!(client, listener.accept());
        let (client, (server, _)) = (client?, accepted?);
        client.set_nodelay(true)?;
        server.set_nodelay(true)?;
        let (client, mut server): (Box<dyn Io>, Box<dyn Io>) = match tls {
            Some(tls) => {
                let (c, s) = tokio::join!(
                    tls.connector.connect(tls.name.clone(), client),
                    tls.acceptor.accept(server)
                );
                (Box::new(c?), Box::new(s?))
            }
            None => (Box::new(client), Box::new(server)),
        };
        let checked = tls.is_some();
        receivers.push(tokio::spawn(async move {
            let bytes = if checked {
                receive_checked(&mut *server, &codec, block_bytes).await?
            } else {
                receive_discard(&mut *server).await?
            };
            anyhow::Ok((Instant::now(), bytes))
        }));
        senders.push(client);
    }
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut sending = Vec::new();
    for mut socket in senders {
        let (next, blocks) = (next.clone(), blocks.clone());
        sending.push(tokio::spawn(async move {
            let codec = FrameCodec::default();
            while let Some(block) = blocks.get(next.fetch_add(1, Ordering::Relaxed)) {
                let header = KvBlockHeader::for_block(block.index, block.hash, &block.data);
                let prefix = kv_block_frame_prefix(&codec, &header, &block.data)?;
                socket.write_all(&prefix).await?;
                socket.write_all(&block.data).await?;
            }
            socket.shutdown().await?;
            anyhow::Ok(socket)
        }));
    }
    // Kept open until every receiver is done: closing a socket with unread bytes (the TLS
    // server's session tickets) resets the connection under the receiver.
    let mut open = Vec::new();
    for sender in sending {
        open.push(sender.await??);
    }
    let mut end = start;
    let mut bytes = 0;
    for receiver in receivers {
        let (at, got) = receiver.await??;
        end = end.max(at);
        bytes += got;
    }
    if tls.is_some() {
        let sent: u64 = blocks.iter().map(|b| b.data.len() as u64).sum();
        anyhow::ensure!(bytes == sent, "TLS receivers got {bytes} of {sent} bytes");
    }
    drop(open);
    Ok((
        end - start,
        blocks.iter().map(|b| b.data.len() as u64).sum(),
    ))
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

/// Prints a row; returns the median GB/s.
fn summarize(name: &str, mtu: &str, streams: usize, results: &[(Duration, u64)]) -> f64 {
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
    median
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
    let udp_buffer: usize = arg(&args, "--udp-buffer", 8 << 20);
    let tune = move |config: &mut PeerConfig, mtu: u16| {
        config.max_udp_payload = mtu;
        config.udp_buffer = udp_buffer;
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let layout = layout();
        let blocks = Arc::new(blocks(&layout, count));
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
        let mut quic: BTreeMap<(u16, usize), f64> = BTreeMap::new();
        let mut notes = Vec::new();
        for &mtu in &mtus {
            let server_cert = ca.issue(new_node());
            let mut config = PeerConfig::new("127.0.0.1:0".parse()?, server_cert.identity.clone());
            tune(&mut config, mtu);
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
            tune(&mut config, mtu);
            let client = PeerEndpoint::bind(config)?;
            let connection = client.connect(addr, server_cert.node).await?;
            // Warm-up: congestion window, MTU discovery, allocator.
            quic_run(&connection, &layout, &blocks[..blocks.len().min(32)], 1, 0).await?;
            for &n in &streams {
                let before = connection.transport_stats();
                let mut results = Vec::new();
                for run in 0..runs {
                    results.push(quic_run(&connection, &layout, &blocks, n, run + 1).await?);
                }
                let median = summarize("QUIC + mTLS (peer)", &mtu.to_string(), n, &results);
                quic.insert((mtu, n), median);
                let after = connection.transport_stats();
                notes.push(format!(
                    "QUIC {mtu}/{n}: sender {} datagrams in {} sendmsg calls (GSO), {} lost \
                     ({} congestion events), {} ACK frames received; path MTU {}, cwnd {} KiB, \
                     RTT {:?}",
                    after.udp_tx.datagrams - before.udp_tx.datagrams,
                    after.udp_tx.ios - before.udp_tx.ios,
                    after.path.lost_packets - before.path.lost_packets,
                    after.path.congestion_events - before.path.congestion_events,
                    after.frame_rx.acks - before.frame_rx.acks,
                    after.path.current_mtu,
                    after.path.cwnd / 1024,
                    after.path.rtt,
                ));
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
        let tls = tls_pair(&ca.issue(new_node()), &ca.issue(new_node()))?;
        let warm_up = Arc::new(blocks[..blocks.len().min(32)].to_vec());
        let mut tls_medians = BTreeMap::new();
        let mut tcp_medians = BTreeMap::new();
        for &n in &streams {
            tcp_run(&warm_up, n, Some(&tls)).await?;
            let mut results = Vec::new();
            for _ in 0..runs {
                results.push(tcp_run(&blocks, n, Some(&tls)).await?);
            }
            tls_medians.insert(n, summarize("TLS 1.3 on TCP, checked", "(loopback)", n, &results));
        }
        for &n in &streams {
            tcp_run(&warm_up, n, None).await?;
            let mut results = Vec::new();
            for _ in 0..runs {
                results.push(tcp_run(&blocks, n, None).await?);
            }
            tcp_medians.insert(n, summarize("plain TCP, same bytes", "(loopback)", n, &results));
        }
        println!();
        println!("| max UDP payload | streams | QUIC / TLS-TCP | QUIC / plain TCP |");
        println!("| --------------: | ------: | -------------: | ---------------: |");
        for (&(mtu, n), &q) in &quic {
            let tls = tls_medians.get(&n).copied().unwrap_or(f64::NAN);
            let tcp = tcp_medians.get(&n).copied().unwrap_or(f64::NAN);
            println!(
                "| {mtu:>15} | {n:>7} | {:>13.0}% | {:>15.0}% |",
                100.0 * q / tls,
                100.0 * q / tcp
            );
        }
        println!();
        for note in &notes {
            println!("{note}");
        }
        println!("load average after: {}", load_average());
        println!("receiver imported {received} bytes over QUIC, no errors");
        anyhow::Ok(())
    })
}
