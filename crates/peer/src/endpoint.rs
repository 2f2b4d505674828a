//! The endpoint: one UDP socket, one quinn endpoint acting as both server (for peers that
//! connect to us) and client (for peers we connect to), both under the node's mTLS identity.
//!
//! [`PeerEndpoint::serve`] is the accept loop: each connection gets a task (owned by a
//! `JoinSet`), each stream a task under its connection; the first frame of a stream says what
//! it is (a generate `Request` or a KV `KvLayout` handshake). Whatever goes wrong goes wrong for
//! one stream or one connection and is counted in [`PeerMetrics`]; the loop only stops on the
//! shutdown future, then drains in-flight streams until [`PeerConfig::drain_timeout`].

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use kvfleet_proto::NodeId;
use kvfleet_proto::frame::{FrameCodec, FrameKind};
use kvfleet_proto::peer::{ErrorCode, ErrorMessage, PeerMessage};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{IdleTimeout, MtuDiscoveryConfig, RecvStream, SendStream, TransportConfig, VarInt};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::error::PeerError;
use crate::generate::{self, GenerateHandler};
use crate::metrics::{ErrorKind, PeerMetrics};
use crate::tls::{self, PeerIdentity, PeerInfo, node_server_name};
use crate::transfer::{self, BlockSink};
use crate::wire::{self, ReadFailure, codes};

/// How an endpoint is built. [`PeerConfig::new`] gives production defaults.
#[derive(Debug, Clone)]
pub struct PeerConfig {
    /// Where to bind (the agent's default is `0.0.0.0:7500`; tests use `127.0.0.1:0`).
    pub bind: SocketAddr,
    /// The node's certificates.
    pub identity: PeerIdentity,
    /// Receive window of one stream, bytes: how much a sender may have in flight on one stream
    /// before the receiver's application reads it.
    pub stream_window: u32,
    /// Receive window of one connection (all its streams together), bytes. The bound on what a
    /// peer can make us buffer, whatever it sends.
    pub connection_window: u32,
    /// Bytes a sender buffers per connection before writes wait (unsent plus unacknowledged).
    pub send_window: u64,
    /// Concurrent bidirectional streams a peer may open on one connection.
    pub max_streams: u32,
    /// A connection with no traffic for this long is closed.
    pub idle_timeout: Duration,
    /// Keep-alive interval, well below `idle_timeout`.
    pub keep_alive: Duration,
    /// How long in-flight streams get to finish after shutdown.
    pub drain_timeout: Duration,
    /// How long a KV sender waits for the receiver's handshake answer and final receipt.
    pub ack_timeout: Duration,
    /// How long the receiving side waits for a stream's next frame: a stream's first frame,
    /// and each frame of a KV transfer. A peer that opens a stream and then sends nothing is
    /// refused after this (counted as `stalled`), so it cannot hold a stream slot or a
    /// transfer's buffers for longer.
    pub stall_timeout: Duration,
    /// Concurrent streams one peer node may have open here, over all its connections
    /// together (QUIC's `max_streams` bounds one connection only). Streams past it are refused
    /// with `Overloaded` and counted as `peer_limit`.
    pub max_streams_per_peer: u32,
    /// Connections one peer node may have open to this endpoint at once. With the connection
    /// receive window this bounds what one node can make this one buffer in QUIC
    /// (`max_connections_per_peer × connection_window`). An agent keeps one connection per
    /// peer; connections past it are closed after the handshake and counted as `peer_limit`.
    pub max_connections_per_peer: u32,
    /// Largest UDP payload that path MTU discovery probes for, and that this endpoint accepts
    /// (announced to peers as QUIC's `max_udp_payload_size`; both ends must allow a size for
    /// it to be used). 1452 (quinn's default) fits any Ethernet path; jumbo-frame fabrics
    /// (MTU 9000) may carry 8952, with a sixth of the packets per byte and so of the per-packet
    /// work (docs/benchmarks.md). Discovery falls back if the path does not carry it.
    pub max_udp_payload: u16,
    /// Kernel send and receive buffer of the endpoint's UDP socket, bytes (`SO_SNDBUF`,
    /// `SO_RCVBUF`). The kernel's default (about 208 KiB) overflows under one congestion
    /// window's burst of 2 MiB blocks: the datagrams it drops are losses to QUIC, and the
    /// congestion controller halves its window for each. Linux caps the value at
    /// `net.core.rmem_max` / `wmem_max` (raise those on peer hosts; a cap is logged at start).
    /// 0 leaves the kernel's default.
    pub udp_buffer: usize,
}

impl PeerConfig {
    /// Defaults sized for 2 MiB KV blocks on a datacenter link: 8 MiB per stream (a few blocks
    /// in flight per stream), 64 MiB per connection.
    pub fn new(bind: SocketAddr, identity: PeerIdentity) -> Self {
        Self {
            bind,
            identity,
            stream_window: 8 * 1024 * 1024,
            connection_window: 64 * 1024 * 1024,
            send_window: 64 * 1024 * 1024,
            max_streams: 256,
            idle_timeout: Duration::from_secs(30),
            keep_alive: Duration::from_secs(5),
            drain_timeout: Duration::from_secs(10),
            ack_timeout: Duration::from_secs(10),
            stall_timeout: Duration::from_secs(30),
            max_streams_per_peer: 64,
            max_connections_per_peer: 8,
            max_udp_payload: 1452,
            udp_buffer: 8 * 1024 * 1024,
        }
    }

    fn transport(&self) -> Result<TransportConfig, PeerError> {
        let mut mtu = MtuDiscoveryConfig::default();
        mtu.upper_bound(self.max_udp_payload.max(1200));
        let mut transport = TransportConfig::default();
        transport
            .mtu_discovery_config(Some(mtu))
            .stream_receive_window(VarInt::from_u32(self.stream_window))
            .receive_window(VarInt::from_u32(self.connection_window))
            .send_window(self.send_window)
            .max_concurrent_bidi_streams(VarInt::from_u32(self.max_streams))
            .max_concurrent_uni_streams(VarInt::from_u32(0))
            .keep_alive_interval(Some(self.keep_alive))
            .max_idle_timeout(Some(IdleTimeout::try_from(self.idle_timeout).map_err(
                |_| PeerError::Identity("idle timeout out of range".to_owned()),
            )?));
        Ok(transport)
    }
}

/// Shared by the endpoint, its connections and their stream tasks.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) metrics: Arc<PeerMetrics>,
    /// The client side of the current identity (replaced by `reload_identity`).
    client: Mutex<quinn::ClientConfig>,
    pub(crate) config: PeerConfig,
    pub(crate) kv_codec: FrameCodec,
    pub(crate) generate_codec: FrameCodec,
    revoked: Mutex<HashSet<String>>,
    /// Bumped whenever the revoked set changes: every accepted connection's task watches it and
    /// closes its connection if its peer's serial is now revoked.
    revocations: watch::Sender<u64>,
    connections: Mutex<HashMap<(SocketAddr, NodeId), quinn::Connection>>,
    /// Streams open here per peer node, for [`PeerConfig::max_streams_per_peer`].
    peer_streams: Arc<Mutex<HashMap<NodeId, u32>>>,
    /// Accepted connections per peer node, for [`PeerConfig::max_connections_per_peer`].
    peer_connections: Arc<Mutex<HashMap<NodeId, u32>>>,
}

/// One of a peer's stream or connection slots; given back when dropped.
struct StreamSlot {
    counts: Arc<Mutex<HashMap<NodeId, u32>>>,
    node: NodeId,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = counts.get_mut(&self.node) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.remove(&self.node);
            }
        }
    }
}

/// The QUIC server and client configurations of `identity`, with `config`'s transport
/// settings, and the node id its certificate names.
fn quic_configs(
    config: &PeerConfig,
    identity: &PeerIdentity,
) -> Result<(NodeId, quinn::ServerConfig, quinn::ClientConfig), PeerError> {
    let credentials = identity.credentials()?;
    let transport = Arc::new(config.transport()?);
    let server_crypto = QuicServerConfig::try_from(credentials.server)
        .map_err(|e| PeerError::Identity(format!("QUIC server crypto: {e}")))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(server_crypto));
    server.transport_config(transport.clone());
    let client_crypto = QuicClientConfig::try_from(credentials.client)
        .map_err(|e| PeerError::Identity(format!("QUIC client crypto: {e}")))?;
    let mut client = quinn::ClientConfig::new(Arc::new(client_crypto));
    client.transport_config(transport);
    Ok((credentials.node_id, server, client))
}

/// `quinn::Endpoint::server` with the socket's kernel buffers sized by
/// [`PeerConfig::udp_buffer`] and the endpoint's datagram limit by
/// [`PeerConfig::max_udp_payload`].
fn bind_socket(
    config: &PeerConfig,
    server: quinn::ServerConfig,
) -> std::io::Result<quinn::Endpoint> {
    let socket = std::net::UdpSocket::bind(config.bind)?;
    let state = quinn::udp::UdpSocketState::new((&socket).into())?;
    if config.udp_buffer > 0 {
        state.set_recv_buffer_size((&socket).into(), config.udp_buffer)?;
        state.set_send_buffer_size((&socket).into(), config.udp_buffer)?;
    }
    // Linux reports twice what it grants (the doubled value covers its bookkeeping).
    let granted = state.recv_buffer_size((&socket).into())? / 2;
    if granted < config.udp_buffer {
        tracing::warn!(
            requested = config.udp_buffer,
            granted,
            "the kernel capped the peer socket's receive buffer (net.core.rmem_max): expect \
             datagram drops, and so lower KV transfer throughput"
        );
    }
    let runtime =
        quinn::default_runtime().ok_or_else(|| std::io::Error::other("no async runtime found"))?;
    // The largest datagram this endpoint accepts, and announces in its transport parameters
    // (`max_udp_payload_size`): quinn's default of 1472 would cap every peer's path MTU
    // discovery there, whatever `max_udp_payload` says.
    let mut endpoint = quinn::EndpointConfig::default();
    endpoint
        .max_udp_payload_size(config.max_udp_payload.max(1200))
        .map_err(|e| std::io::Error::other(format!("max_udp_payload: {e}")))?;
    quinn::Endpoint::new(endpoint, Some(server), socket, runtime)
}

fn take_slot(
    counts: &Arc<Mutex<HashMap<NodeId, u32>>>,
    node: NodeId,
    max: u32,
) -> Option<StreamSlot> {
    let mut map = counts.lock().unwrap_or_else(PoisonError::into_inner);
    let n = map.entry(node).or_insert(0);
    if *n >= max {
        if *n == 0 {
            map.remove(&node);
        }
        return None;
    }
    *n += 1;
    Some(StreamSlot {
        counts: counts.clone(),
        node,
    })
}

impl Shared {
    /// Takes one of `node`'s stream slots, or `None` when it has all of them.
    fn stream_slot(&self, node: NodeId) -> Option<StreamSlot> {
        take_slot(&self.peer_streams, node, self.config.max_streams_per_peer)
    }

    /// Takes one of `node`'s connection slots, or `None` when it has all of them.
    fn connection_slot(&self, node: NodeId) -> Option<StreamSlot> {
        take_slot(
            &self.peer_connections,
            node,
            self.config.max_connections_per_peer,
        )
    }

    fn is_revoked(&self, serial: &str) -> bool {
        self.revoked
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(serial)
    }
}

/// One node's peer endpoint. Cheap to clone; clones share the socket, the metrics and the
/// connection cache.
#[derive(Debug, Clone)]
pub struct PeerEndpoint {
    endpoint: quinn::Endpoint,
    node_id: NodeId,
    shared: Arc<Shared>,
}

impl PeerEndpoint {
    /// Binds the UDP socket and loads the identity. Needs a tokio runtime.
    pub fn bind(config: PeerConfig) -> Result<Self, PeerError> {
        let (node_id, server, client) = quic_configs(&config, &config.identity)?;
        let endpoint = bind_socket(&config, server).map_err(|source| PeerError::Bind {
            addr: config.bind,
            source,
        })?;
        let shared = Arc::new(Shared {
            client: Mutex::new(client),
            metrics: Arc::new(PeerMetrics::default()),
            kv_codec: FrameCodec::default(),
            generate_codec: FrameCodec::new(wire::GENERATE_MAX_PAYLOAD),
            config,
            revoked: Mutex::new(HashSet::new()),
            revocations: watch::Sender::new(0),
            connections: Mutex::new(HashMap::new()),
            peer_streams: Arc::default(),
            peer_connections: Arc::default(),
        });
        Ok(Self {
            endpoint,
            node_id,
            shared,
        })
    }

    /// Switches to a renewed certificate (same node, same CA) without a restart: connections
    /// accepted or opened from now on present it; open connections keep the one they started
    /// with until they close. A certificate for another node is refused.
    pub fn reload_identity(&self, identity: &PeerIdentity) -> Result<(), PeerError> {
        let (node_id, server, client) = quic_configs(&self.shared.config, identity)?;
        if node_id != self.node_id {
            return Err(PeerError::Identity(format!(
                "the new certificate names node {node_id}, this endpoint is node {}",
                self.node_id
            )));
        }
        self.endpoint.set_server_config(Some(server));
        *self
            .shared
            .client
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = client;
        Ok(())
    }

    /// The bound address (the real port when bound to port 0).
    pub fn local_addr(&self) -> Result<SocketAddr, PeerError> {
        self.endpoint
            .local_addr()
            .map_err(|source| PeerError::Bind {
                addr: self.shared.config.bind,
                source,
            })
    }

    /// This node's id, from its own certificate.
    pub fn node_id(&self) -> NodeId {
        self.node_id
    }

    /// The endpoint's counters.
    pub fn metrics(&self) -> Arc<PeerMetrics> {
        self.shared.metrics.clone()
    }

    /// Replaces the set of revoked certificate serials (lowercase hex, as `GET /api/v1/ca`
    /// and heartbeat responses list them). New connections presenting one are closed after the
    /// handshake, and open ones are closed now: cached outgoing connections here, accepted
    /// ones by their connection tasks, which are woken (each counted in
    /// `connections_revoked`). The agent calls this with every heartbeat response, so a revoked
    /// node is cut off within one heartbeat interval.
    pub fn set_revoked_serials(&self, serials: impl IntoIterator<Item = String>) {
        let serials: HashSet<String> = serials
            .into_iter()
            .map(|s| s.to_ascii_lowercase())
            .collect();
        {
            let mut revoked = self
                .shared
                .revoked
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if *revoked == serials {
                return;
            }
            *revoked = serials;
        }
        let closed: Vec<quinn::Connection> = {
            let mut cache = self
                .shared
                .connections
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let revoked: Vec<(SocketAddr, NodeId)> = cache
                .iter()
                .filter(|(_, c)| {
                    tls::peer_info(c).is_ok_and(|peer| self.shared.is_revoked(&peer.serial))
                })
                .map(|(key, _)| *key)
                .collect();
            revoked.iter().filter_map(|key| cache.remove(key)).collect()
        };
        for connection in closed {
            if connection.close_reason().is_none() {
                crate::metrics::add(&self.shared.metrics.connections_revoked, 1);
            }
            connection.close(codes::IDENTITY, b"certificate revoked");
        }
        self.shared
            .revocations
            .send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Opens a new connection to `node` at `addr`, verifying that its certificate names `node`.
    pub async fn connect(
        &self,
        addr: SocketAddr,
        node: NodeId,
    ) -> Result<PeerConnection, PeerError> {
        let client = self
            .shared
            .client
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let connecting = self
            .endpoint
            .connect_with(client, addr, &node_server_name(node))
            .map_err(|source| PeerError::Connect { addr, source })?;
        let connection = match connecting.await {
            Ok(connection) => connection,
            Err(error) => {
                let refused = tls::is_tls_refusal(&error);
                self.shared.metrics.count_error(if refused {
                    ErrorKind::TlsRefused
                } else {
                    ErrorKind::Handshake
                });
                return Err(if refused {
                    PeerError::HandshakeRefused {
                        addr,
                        reason: error.to_string(),
                    }
                } else {
                    PeerError::Connection {
                        addr,
                        source: error,
                    }
                });
            }
        };
        let peer = match tls::peer_info(&connection) {
            Ok(peer) if peer.node_id != node => Err(format!(
                "certificate names node {}, expected {node}",
                peer.node_id
            )),
            Ok(peer) if self.shared.is_revoked(&peer.serial) => {
                Err(format!("certificate serial {} is revoked", peer.serial))
            }
            other => other,
        };
        let peer = match peer {
            Ok(peer) => peer,
            Err(reason) => {
                self.shared.metrics.count_error(ErrorKind::TlsRefused);
                connection.close(codes::IDENTITY, reason.as_bytes());
                return Err(PeerError::PeerIdentity { addr, reason });
            }
        };
        crate::metrics::add(&self.shared.metrics.connections_opened, 1);
        Ok(PeerConnection {
            connection,
            peer,
            shared: self.shared.clone(),
        })
    }

    /// A connection to `node` at `addr`: the cached one while it is open, else a new one (then
    /// cached). Agents call this per request; QUIC multiplexes every request and transfer to one
    /// peer over one connection.
    pub async fn connection(
        &self,
        addr: SocketAddr,
        node: NodeId,
    ) -> Result<PeerConnection, PeerError> {
        let cached = self
            .shared
            .connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&(addr, node))
            .filter(|c| c.close_reason().is_none())
            .cloned();
        if let Some(connection) = cached
            && let Ok(peer) = tls::peer_info(&connection)
        {
            return Ok(PeerConnection {
                connection,
                peer,
                shared: self.shared.clone(),
            });
        }
        let fresh = self.connect(addr, node).await?;
        self.shared
            .connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert((addr, node), fresh.connection.clone());
        Ok(fresh)
    }

    /// Serves peers until `shutdown` resolves: forwarded generate requests go to `generate`, KV
    /// transfers to `blocks`. Then stops accepting, gives in-flight streams
    /// [`PeerConfig::drain_timeout`] to finish, and closes every connection.
    pub async fn serve<G, S>(
        &self,
        generate: Arc<G>,
        blocks: Arc<S>,
        shutdown: impl Future<Output = ()>,
    ) where
        G: GenerateHandler,
        S: BlockSink,
    {
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut connections = JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                incoming = self.endpoint.accept() => {
                    let Some(incoming) = incoming else { break };
                    let task = ConnectionTask {
                        shared: self.shared.clone(),
                        generate: generate.clone(),
                        blocks: blocks.clone(),
                        stop: stop_rx.clone(),
                    };
                    connections.spawn(task.run(incoming));
                }
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
        }
        self.endpoint.set_server_config(None);
        let _ = stop_tx.send(true);
        let deadline = self.shared.config.drain_timeout + Duration::from_secs(1);
        if tokio::time::timeout(deadline, async {
            while connections.join_next().await.is_some() {}
        })
        .await
        .is_err()
        {
            connections.abort_all();
        }
        self.endpoint.close(codes::SHUTDOWN, b"shutdown");
    }

    /// Closes every connection at once (no drain) and waits until peers were told.
    pub async fn close(&self) {
        self.endpoint.close(codes::SHUTDOWN, b"shutdown");
        self.endpoint.wait_idle().await;
    }
}

struct ConnectionTask<G, S> {
    shared: Arc<Shared>,
    generate: Arc<G>,
    blocks: Arc<S>,
    stop: watch::Receiver<bool>,
}

impl<G: GenerateHandler, S: BlockSink> ConnectionTask<G, S> {
    async fn run(mut self, incoming: quinn::Incoming) {
        let addr = incoming.remote_address();
        let metrics = &self.shared.metrics;
        let connection = match incoming.await {
            Ok(connection) => connection,
            Err(error) => {
                let kind = if tls::is_tls_refusal(&error) {
                    ErrorKind::TlsRefused
                } else {
                    ErrorKind::Handshake
                };
                metrics.count_error(kind);
                tracing::warn!(%addr, %error, kind = kind.as_str(), "peer connection refused");
                return;
            }
        };
        let peer = match tls::peer_info(&connection) {
            Ok(peer) if self.shared.is_revoked(&peer.serial) => {
                Err(format!("certificate serial {} is revoked", peer.serial))
            }
            other => other,
        };
        let peer = match peer {
            Ok(peer) => Arc::new(peer),
            Err(reason) => {
                metrics.count_error(ErrorKind::TlsRefused);
                tracing::warn!(%addr, %reason, "peer identity refused");
                connection.close(codes::IDENTITY, reason.as_bytes());
                return;
            }
        };
        let Some(_connection_slot) = self.shared.connection_slot(peer.node_id) else {
            metrics.count_error(ErrorKind::PeerLimit);
            tracing::warn!(%addr, node = %peer.node_id,
                limit = self.shared.config.max_connections_per_peer,
                "peer connection refused: the peer has its limit of connections open here");
            connection.close(codes::REFUSED, b"too many connections from this node");
            return;
        };
        crate::metrics::add(&metrics.connections_accepted, 1);
        tracing::debug!(%addr, node = %peer.node_id, "peer connected");
        let mut revocations = self.shared.revocations.subscribe();
        let mut streams = JoinSet::new();
        loop {
            tokio::select! {
                _ = self.stop.wait_for(|stop| *stop) => break,
                Ok(()) = revocations.changed() => {
                    if self.shared.is_revoked(&peer.serial) {
                        // Closed at once, streams and all: a revoked node must not finish
                        // what it started either.
                        crate::metrics::add(&metrics.connections_revoked, 1);
                        tracing::warn!(%addr, node = %peer.node_id, serial = %peer.serial,
                            "peer certificate revoked: connection closed");
                        connection.close(codes::IDENTITY, b"certificate revoked");
                        streams.abort_all();
                        // What it already delivered goes too: its transfers' buffered blocks.
                        self.blocks.peer_revoked(&peer);
                        return;
                    }
                }
                accepted = connection.accept_bi() => match accepted {
                    Ok((mut send, mut recv)) => {
                        let shared = self.shared.clone();
                        let Some(slot) = shared.stream_slot(peer.node_id) else {
                            metrics.count_error(ErrorKind::PeerLimit);
                            tracing::warn!(%addr, node = %peer.node_id,
                                limit = shared.config.max_streams_per_peer,
                                "peer stream refused: the peer has its limit of streams open here");
                            streams.spawn(async move {
                                let message = format!(
                                    "this node serves at most {} concurrent streams per peer",
                                    shared.config.max_streams_per_peer
                                );
                                refuse(&mut send, &mut recv, &shared.generate_codec,
                                    ErrorCode::Overloaded, message).await;
                            });
                            continue;
                        };
                        let (generate, blocks, peer) =
                            (self.generate.clone(), self.blocks.clone(), peer.clone());
                        streams.spawn(async move {
                            let _slot = slot;
                            serve_stream(&shared, &*generate, &*blocks, &peer, send, recv).await;
                        });
                    }
                    Err(error) => {
                        tracing::debug!(%addr, %error, "peer connection ended");
                        break;
                    }
                },
                Some(_) = streams.join_next(), if !streams.is_empty() => {}
            }
        }
        let drain = self.shared.config.drain_timeout;
        if tokio::time::timeout(drain, async {
            while streams.join_next().await.is_some() {}
        })
        .await
        .is_err()
        {
            streams.abort_all();
        }
        connection.close(codes::SHUTDOWN, b"shutdown");
    }
}

/// One stream: its first frame says what it is.
async fn serve_stream<G: GenerateHandler, S: BlockSink>(
    shared: &Shared,
    generate: &G,
    blocks: &S,
    peer: &PeerInfo,
    mut send: SendStream,
    mut recv: RecvStream,
) {
    let metrics = &shared.metrics;
    // The larger (KV) limit: the kind is not known yet. A generate request over its own limit
    // is refused below.
    let stall = shared.config.stall_timeout;
    let Ok(first) =
        tokio::time::timeout(stall, wire::read_frame(&mut recv, &shared.kv_codec)).await
    else {
        metrics.count_error(ErrorKind::Stalled);
        tracing::warn!(node = %peer.node_id, timeout = ?stall,
            "peer stream refused: no first frame in time");
        refuse(
            &mut send,
            &mut recv,
            &shared.generate_codec,
            ErrorCode::Truncated,
            format!("stalled: no frame for {stall:?}"),
        )
        .await;
        return;
    };
    let (kind, payload) = match first {
        Ok(Some(frame)) => frame,
        Ok(None) => return, // opened and finished without a word: nothing to do
        // The requester gave up before we read its request: nothing was started.
        Err(ReadFailure::Reset(code)) if code == codes::CANCELLED => return,
        Err(failure) => {
            let kind = match &failure {
                ReadFailure::Frame(kvfleet_proto::FrameError::Truncated { .. }) => {
                    ErrorKind::Truncated
                }
                ReadFailure::Frame(_) => ErrorKind::Malformed,
                ReadFailure::Reset(_) | ReadFailure::Lost(_) => ErrorKind::Stream,
            };
            metrics.count_error(kind);
            tracing::warn!(node = %peer.node_id, %failure, "bad first frame on a peer stream");
            refuse(
                &mut send,
                &mut recv,
                &shared.generate_codec,
                ErrorCode::Malformed,
                failure.to_string(),
            )
            .await;
            return;
        }
    };
    match kind {
        FrameKind::Request if payload.len() <= shared.generate_codec.max_payload() as usize => {
            generate::serve(shared, generate, peer, &payload, send, recv).await;
        }
        FrameKind::KvLayout => {
            transfer::serve(shared, blocks, peer, &payload, send, recv).await;
        }
        other => {
            metrics.count_error(ErrorKind::BadRequest);
            tracing::warn!(node = %peer.node_id, kind = ?other, bytes = payload.len(),
                "peer stream refused: it starts with a frame no stream starts with");
            refuse(
                &mut send,
                &mut recv,
                &shared.generate_codec,
                ErrorCode::BadRequest,
                format!(
                    "a peer stream cannot start with a {other:?} frame of {} bytes",
                    payload.len()
                ),
            )
            .await;
        }
    }
}

/// Sends an Error frame (best effort), ends our side and stops reading theirs.
pub(crate) async fn refuse(
    send: &mut SendStream,
    recv: &mut RecvStream,
    codec: &FrameCodec,
    code: ErrorCode,
    message: String,
) {
    let error = PeerMessage::Error(ErrorMessage::new(code, message));
    let _ = wire::write_message(send, codec, &error).await;
    let _ = send.finish();
    let _ = recv.stop(codes::REFUSED);
}

/// An established, verified connection to one peer. Cheap to clone.
#[derive(Debug, Clone)]
pub struct PeerConnection {
    pub(crate) connection: quinn::Connection,
    pub(crate) peer: PeerInfo,
    pub(crate) shared: Arc<Shared>,
}

impl PeerConnection {
    /// QUIC's counters for this connection (packets lost, congestion events, path MTU and
    /// congestion window, UDP datagrams): what to read when a transfer is slower than the link.
    pub fn transport_stats(&self) -> quinn::ConnectionStats {
        self.connection.stats()
    }

    /// The node at the other end.
    pub fn peer(&self) -> &PeerInfo {
        &self.peer
    }

    /// Round-trip time estimate.
    pub fn rtt(&self) -> Duration {
        self.connection.rtt()
    }

    /// Why the connection closed, or `None` while it is open.
    pub fn close_reason(&self) -> Option<String> {
        self.connection.close_reason().map(|e| e.to_string())
    }

    /// Closes the connection (every stream on it fails).
    pub fn close(&self) {
        self.connection.close(codes::SHUTDOWN, b"closed");
    }

    pub(crate) fn connection_error(&self, source: quinn::ConnectionError) -> PeerError {
        if tls::is_tls_refusal(&source) {
            self.shared.metrics.count_error(ErrorKind::TlsRefused);
            PeerError::HandshakeRefused {
                addr: self.peer.addr,
                reason: source.to_string(),
            }
        } else {
            PeerError::Connection {
                addr: self.peer.addr,
                source,
            }
        }
    }
}
