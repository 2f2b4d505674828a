//! The agent's peer transport: one QUIC endpoint (`kvfleet-peer`) with the node certificate the
//! control plane issued.
//!
//! - [`run`]: waits until registration has put the certificate, key and CA in the state
//!   directory, binds the endpoint, publishes it in the [`PeerHandle`], and serves the handler
//!   and block sink it is given (the `serving` module's) until shutdown.
//! - [`PeerHandle`]: the endpoint once bound, for whoever forwards or pushes blocks, and its
//!   counters in `/metrics`.
//!
//! A certificate the control-plane client renews is loaded within seconds, without a restart.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use kvfleet_peer::{BlockSink, GenerateHandler, PeerConfig, PeerEndpoint, PeerIdentity};
use tokio_util::sync::CancellationToken;

use crate::state_dir::StateDir;

/// `[peer]`: this agent's QUIC endpoint for forwarded requests.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerSettings {
    /// UDP address to listen on (`0.0.0.0:7500`; port 0 picks a free port, for tests).
    pub listen: std::net::SocketAddr,
    /// The address other agents reach it at (`host:port`, reported to the control plane);
    /// `None`: the listen address, with the node's first address when it listens on all.
    pub advertise: Option<String>,
    /// Whether this node's frontend routes over the whole fleet (KV-aware, forwarding to
    /// peers); `false`: only among its own workers, as standalone.
    pub forward: bool,
    /// How long a peer connection may stay silent before it is declared dead (the QUIC idle
    /// timeout; keep-alives go every fifth of it). Requests forwarded over a dead connection
    /// are migrated then, so this bounds how long a client waits after a node dies.
    pub dead_after: std::time::Duration,
    /// How long a peer's stream may send nothing while this node waits for its next frame
    /// (its first frame, or the next block of a KV transfer) before it is refused as stalled.
    pub stall_timeout: std::time::Duration,
    /// The longest prefill deadline (transfer included) this node accepts in a peer's plan for
    /// a decode leg; a longer one is cut to it. Bounds how long a transfer's buffers live.
    pub transfer_timeout: std::time::Duration,
    /// Concurrent streams one peer node may have open here, over all its connections.
    pub max_streams_per_peer: u32,
    /// Bytes of KV blocks one peer node may have buffered here, over all its transfers.
    pub max_buffered_bytes_per_peer: u64,
}

/// The default of [`PeerSettings::dead_after`].
pub const DEFAULT_PEER_DEAD_AFTER: std::time::Duration = std::time::Duration::from_secs(10);

/// The default of `[peer] max_buffered_mib_per_peer`: 4 GiB, a 32k-token prompt of an 8B model
/// with a bf16 KV cache. (Here, not in `serving::transfers` which applies it: `serving`
/// imports `peer`, never the other way.)
pub const DEFAULT_MAX_BUFFERED_BYTES_PER_PEER: u64 = 4 << 30;

impl Default for PeerSettings {
    fn default() -> Self {
        Self {
            listen: std::net::SocketAddr::from(([0, 0, 0, 0], 7500)),
            advertise: None,
            forward: true,
            dead_after: DEFAULT_PEER_DEAD_AFTER,
            stall_timeout: std::time::Duration::from_secs(30),
            transfer_timeout: std::time::Duration::from_secs(30),
            max_streams_per_peer: 64,
            max_buffered_bytes_per_peer: DEFAULT_MAX_BUFFERED_BYTES_PER_PEER,
        }
    }
}

/// The running endpoint, once it is up (for forwarding and for tests).
#[derive(Debug, Clone, Default)]
pub struct PeerHandle {
    inner: Arc<Mutex<Option<Arc<PeerEndpoint>>>>,
    advertised: Arc<Mutex<Option<String>>>,
    /// When the certificate the endpoint presents expires (Unix seconds), once it is known.
    certificate_expiry: Arc<Mutex<Option<i64>>>,
}

impl PeerHandle {
    /// The address other agents reach the endpoint at (reported to the control plane), once
    /// it is bound.
    pub fn advertised(&self) -> Option<String> {
        self.advertised.lock().ok().and_then(|a| a.clone())
    }

    /// The endpoint, once bound.
    pub fn endpoint(&self) -> Option<Arc<PeerEndpoint>> {
        self.inner.lock().ok().and_then(|e| e.clone())
    }

    /// Its bound address, once bound.
    pub fn local_addr(&self) -> Option<std::net::SocketAddr> {
        self.endpoint().and_then(|e| e.local_addr().ok())
    }

    /// Records the expiry of the certificate the endpoint now presents.
    fn presenting(&self, identity: &PeerIdentity) {
        let expiry = identity
            .not_after()
            .map_err(|e| tracing::warn!(error = %e, "peer endpoint: cannot read the certificate's expiry"))
            .ok();
        if let Ok(mut slot) = self.certificate_expiry.lock() {
            *slot = expiry;
        }
    }
}

impl PeerHandle {
    /// Registers the peer transport's counters (read from the endpoint at every scrape, once
    /// it is bound).
    pub fn register_metrics(&self, registry: &mut crate::metrics::Registry) {
        let handle = self.clone();
        registry.register_collector(crate::metrics::collector("peer", move |s| {
            let Some(endpoint) = handle.endpoint() else {
                return Ok(());
            };
            if let Some(expiry) = handle.certificate_expiry.lock().ok().and_then(|e| *e) {
                s.gauge(
                    "kvfleet_peer_certificate_expiry_timestamp_seconds",
                    "When the node certificate the peer endpoint presents expires (Unix time); \
                     the control-plane client renews it with a third of its lifetime left",
                    expiry,
                )?;
            }
            let m = endpoint.metrics().snapshot();
            let counters = [
                (
                    "kvfleet_peer_kv_blocks_sent",
                    "KV blocks pushed to other nodes",
                    m.kv_blocks_sent,
                ),
                (
                    "kvfleet_peer_kv_bytes_sent",
                    "Bytes of KV blocks pushed to other nodes",
                    m.kv_bytes_sent,
                ),
                (
                    "kvfleet_peer_kv_blocks_received",
                    "KV blocks received from other nodes (verified)",
                    m.kv_blocks_received,
                ),
                (
                    "kvfleet_peer_kv_bytes_received",
                    "Bytes of KV blocks received from other nodes",
                    m.kv_bytes_received,
                ),
                (
                    "kvfleet_peer_kv_transfers_sent",
                    "KV transfers completed as the sender",
                    m.kv_transfers_sent,
                ),
                (
                    "kvfleet_peer_generate_served",
                    "Forwarded generate requests served here",
                    m.generate_served,
                ),
                (
                    "kvfleet_peer_connections_revoked",
                    "Open peer connections closed because the peer's certificate was revoked",
                    m.connections_revoked,
                ),
            ];
            for (name, help, value) in counters {
                s.counter(name, help, value)?;
            }
            s.counter_seconds(
                "kvfleet_peer_kv_send_seconds",
                "Time spent sending KV transfers",
                m.kv_send_micros as f64 / 1e6,
            )?;
            s.counters(
                "kvfleet_peer_errors",
                "Peer transport refusals and failures, by kind",
                m.errors
                    .iter()
                    .map(|(kind, n)| ([("kind", kind.as_str())], *n)),
            )
        }));
    }
}

fn read_identity(state: &StateDir) -> Option<PeerIdentity> {
    let read = |path: std::path::PathBuf| std::fs::read_to_string(path).ok();
    Some(PeerIdentity {
        ca_pem: read(state.ca_path())?,
        cert_pem: read(state.cert_path())?,
        key_pem: read(state.key_path())?,
    })
}

/// Waits for the node certificate in `state_dir` (registration writes it), binds the endpoint
/// on `settings.listen`, publishes it in `handle`, and serves forwarded requests with
/// `generate` and KV transfers into `blocks` until `stop`. A renewed certificate is switched to
/// within seconds. `host` names this node in the advertised address when the endpoint listens
/// on all interfaces and `[peer] advertise` is not set.
pub async fn run<G: GenerateHandler, S: BlockSink>(
    settings: PeerSettings,
    host: String,
    state_dir: std::path::PathBuf,
    (generate, blocks): (Arc<G>, Arc<S>),
    handle: PeerHandle,
    stop: CancellationToken,
) {
    let state = match StateDir::open(&state_dir) {
        Ok(state) => state,
        Err(e) => {
            tracing::error!(error = %e, "peer endpoint: state directory unusable; not started");
            return;
        }
    };
    let identity = loop {
        if let Some(identity) = read_identity(&state) {
            break identity;
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(200)) => {}
            () = stop.cancelled() => return,
        }
    };
    let mut peer_config = PeerConfig::new(settings.listen, identity.clone());
    peer_config.idle_timeout = settings.dead_after;
    peer_config.keep_alive = settings.dead_after / 5;
    peer_config.stall_timeout = settings.stall_timeout;
    peer_config.max_streams_per_peer = settings.max_streams_per_peer;
    let endpoint = match PeerEndpoint::bind(peer_config) {
        Ok(endpoint) => Arc::new(endpoint),
        Err(e) => {
            tracing::error!(listen = %settings.listen, error = %e,
                "peer endpoint: cannot bind; requests will not be forwarded here");
            return;
        }
    };
    tracing::info!(addr = ?endpoint.local_addr().ok(), node = %endpoint.node_id(),
        "peer endpoint listening");
    let advertised = settings.advertise.clone().or_else(|| {
        let addr = endpoint.local_addr().ok()?;
        Some(if addr.ip().is_unspecified() {
            format!("{host}:{}", addr.port())
        } else {
            addr.to_string()
        })
    });
    if let Ok(mut slot) = handle.advertised.lock() {
        *slot = advertised;
    }
    if let Ok(mut slot) = handle.inner.lock() {
        *slot = Some(endpoint.clone());
    }
    handle.presenting(&identity);
    let watcher = tokio::spawn(reload_renewed_certificates(
        endpoint.clone(),
        state,
        identity,
        handle.clone(),
        stop.clone(),
    ));
    endpoint
        .serve(generate, blocks, async move { stop.cancelled().await })
        .await;
    watcher.abort();
}

/// How often the state directory is checked for a renewed certificate.
const CERTIFICATE_CHECK: Duration = Duration::from_secs(10);

/// Switches the endpoint to the certificate the control-plane client renews into the state
/// directory, so a long-running agent never presents an expired one.
async fn reload_renewed_certificates(
    endpoint: Arc<PeerEndpoint>,
    state: StateDir,
    mut current: PeerIdentity,
    handle: PeerHandle,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(CERTIFICATE_CHECK) => {}
            () = stop.cancelled() => return,
        }
        let Some(identity) = read_identity(&state) else {
            continue;
        };
        let unchanged = identity.cert_pem == current.cert_pem
            && identity.key_pem == current.key_pem
            && identity.ca_pem == current.ca_pem;
        if unchanged {
            continue;
        }
        match endpoint.reload_identity(&identity) {
            Ok(()) => {
                tracing::info!("peer endpoint: switched to the renewed node certificate");
                handle.presenting(&identity);
                current = identity;
            }
            // A half-written pair (certificate renewed, key not yet) fixes itself next time.
            Err(e) => tracing::warn!(error = %e,
                "peer endpoint: the renewed certificate does not load yet; keeping the current one"),
        }
    }
}
