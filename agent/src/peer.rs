//! The agent's peer transport: one QUIC endpoint (`kvfleet-peer`) with the node certificate the
//! control plane issued, serving generate requests that other agents' frontends forward here.
//!
//! - [`LocalGenerate`]: the [`GenerateHandler`] — a forwarded request is submitted to this
//!   node's workers through the [`Backend`], exactly as a local request is; dropping the event
//!   stream (the peer cancelled, or its connection died) drops the [`crate::backend::Generation`],
//!   which cancels the sequence in the worker.
//! - [`run`]: waits until registration has put the certificate, key and CA in the state
//!   directory, binds the endpoint, publishes its address, and serves until shutdown.
//! - Disaggregated requests: a request with `kv_push` is the prefill leg and one with `prefill`
//!   the decode leg; both are served by [`crate::disagg::Disagg`], whose transfer table is also
//!   the endpoint's KV block sink.
//!
//! A certificate the control-plane client renews is loaded within seconds, without a restart.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt as _;
use kvfleet_peer::{
    ErrorCode, ErrorMessage, EventStream, Finish, FinishReason, GenerateEvent, GenerateHandler,
    GenerateRequest, PeerConfig, PeerEndpoint, PeerIdentity, PeerInfo, TokenChunk, TokenLogprob,
    TopLogprob, Usage,
};
use tokio_util::sync::CancellationToken;

use crate::backend::{self, Backend, EndReason, GenEvent, SubmitError};
use crate::disagg::{Disagg, PrefillTarget};
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
}

impl Default for PeerSettings {
    fn default() -> Self {
        Self {
            listen: std::net::SocketAddr::from(([0, 0, 0, 0], 7500)),
            advertise: None,
            forward: true,
        }
    }
}

/// Serves forwarded generate requests on this node's workers.
#[derive(Debug, Clone)]
pub struct LocalGenerate {
    backend: Arc<dyn Backend>,
    disagg: Option<Arc<Disagg>>,
}

impl LocalGenerate {
    /// A handler submitting to `backend`; the legs of disaggregated requests are refused.
    pub fn new(backend: Arc<dyn Backend>) -> Self {
        Self {
            backend,
            disagg: None,
        }
    }

    /// Also serves both legs of disaggregated requests through `disagg`.
    pub fn with_disagg(mut self, disagg: Arc<Disagg>) -> Self {
        self.disagg = Some(disagg);
        self
    }

    fn disagg(&self) -> Result<&Arc<Disagg>, ErrorMessage> {
        self.disagg.as_ref().ok_or_else(|| {
            ErrorMessage::new(
                ErrorCode::Unavailable,
                "this node does not serve disaggregated requests",
            )
        })
    }
}

/// The peer protocol's finish reason for the backend's.
pub(crate) fn finish_reason(reason: EndReason) -> FinishReason {
    match reason {
        EndReason::Length => FinishReason::Length,
        EndReason::Stop => FinishReason::Stop,
    }
}

/// The peer protocol's logprobs for the backend's.
pub(crate) fn logprobs(items: Vec<backend::TokenLogprob>, ids: &[u32]) -> Vec<TokenLogprob> {
    items
        .into_iter()
        .zip(ids)
        .map(|(item, &token)| TokenLogprob {
            token,
            logprob: item.logprob,
            top: item
                .top
                .into_iter()
                .map(|(token, logprob)| TopLogprob { token, logprob })
                .collect(),
        })
        .collect()
}

impl GenerateHandler for LocalGenerate {
    async fn generate(
        &self,
        peer: &PeerInfo,
        request: GenerateRequest,
    ) -> Result<EventStream, ErrorMessage> {
        let prompt_tokens = u32::try_from(request.prompt.len()).unwrap_or(u32::MAX);
        tracing::info!(request_id = %request.request_id, from = %peer.node_id,
            prefill_leg = request.kv_push.is_some(), decode_leg = request.prefill.is_some(),
            "serving a forwarded request");
        if let Some(push) = request.kv_push.clone() {
            return self.disagg()?.serve_prefill(request, push);
        }
        let prefill = request.prefill.as_ref().map(|plan| {
            let target = PrefillTarget {
                worker: plan.worker,
                node: kvfleet_proto::NodeId(plan.node),
                addr: plan.addr.clone(),
            };
            (target, Duration::from_millis(u64::from(plan.timeout_ms)))
        });
        let local = backend::GenerateRequest {
            request_id: request.request_id,
            model: request.model,
            prompt: request.prompt,
            block_hashes: request.block_hashes,
            sampling: request.sampling,
            worker: request.worker,
        };
        let submitted = match prefill {
            Some((target, deadline)) => self.disagg()?.submit_decode(local, target, deadline),
            None => self.backend.submit(local),
        };
        let generation = submitted.map_err(|e| match e {
            SubmitError::NoReadyWorker(_) => {
                ErrorMessage::new(ErrorCode::Unavailable, e.to_string())
            }
            SubmitError::WorkerGone(_) | SubmitError::Unsupported | SubmitError::Invalid(_) => {
                ErrorMessage::new(ErrorCode::Internal, e.to_string())
            }
        })?;
        // The generation travels inside the stream's state: dropping the stream drops it, which
        // cancels the sequence in the worker.
        let stream = futures_util::stream::unfold(
            (generation, 0u32, false),
            move |(mut generation, completion, ended)| async move {
                if ended {
                    return None;
                }
                let item = match generation.events.recv().await {
                    Some(GenEvent::Tokens { ids, logprobs: lp }) => {
                        let n = u32::try_from(ids.len()).unwrap_or(u32::MAX);
                        let logprobs = lp.map(|lp| logprobs(lp, &ids));
                        let chunk = TokenChunk {
                            tokens: ids,
                            logprobs,
                        };
                        return Some((
                            Ok(GenerateEvent::Tokens(chunk)),
                            (generation, completion.saturating_add(n), false),
                        ));
                    }
                    Some(GenEvent::Finished(reason)) => {
                        generation.done();
                        Ok(GenerateEvent::Finished(Finish {
                            reason: finish_reason(reason),
                            usage: Usage {
                                prompt_tokens,
                                completion_tokens: completion,
                                cached_tokens: 0,
                            },
                            kv_push: None,
                        }))
                    }
                    Some(GenEvent::Failed(message)) => {
                        generation.done();
                        Err(ErrorMessage::new(ErrorCode::Internal, message))
                    }
                    None => Err(ErrorMessage::new(
                        ErrorCode::Internal,
                        "the worker went away mid-generation",
                    )),
                };
                Some((item, (generation, completion, true)))
            },
        );
        Ok(stream.boxed())
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
/// on `settings.listen`, publishes it in `handle`, and serves forwarded requests on `backend`
/// until `stop`. A renewed certificate is switched to within seconds. `host` names this
/// node in the advertised address when the endpoint listens on all interfaces and
/// `[peer] advertise` is not set.
pub async fn run(
    settings: PeerSettings,
    host: String,
    state_dir: std::path::PathBuf,
    backend: Arc<dyn Backend>,
    disagg: Arc<Disagg>,
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
    let endpoint = match PeerEndpoint::bind(PeerConfig::new(settings.listen, identity.clone())) {
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
        .serve(
            Arc::new(LocalGenerate::new(backend).with_disagg(disagg.clone())),
            disagg.transfers(),
            async move { stop.cancelled().await },
        )
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
