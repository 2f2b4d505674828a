//! The agent's peer transport: one QUIC endpoint (`kvfleet-peer`) with the node certificate the
//! control plane issued, serving generate requests that other agents' frontends forward here.
//!
//! - [`LocalGenerate`]: the [`GenerateHandler`] — a forwarded request is submitted to this
//!   node's workers through the [`Backend`], exactly as a local request is; dropping the event
//!   stream (the peer cancelled, or its connection died) drops the [`crate::backend::Generation`],
//!   which cancels the sequence in the worker.
//! - [`run`]: waits until registration has put the certificate, key and CA in the state
//!   directory, binds the endpoint, publishes its address, and serves until shutdown.
//!
//! Not here yet: forwarding from the frontend (the client side), and blocks transfers (every
//! transfer is refused).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt as _;
use kvfleet_peer::{
    ErrorCode, ErrorMessage, EventStream, Finish, FinishReason, GenerateEvent, GenerateHandler,
    GenerateRequest, PeerConfig, PeerEndpoint, PeerIdentity, PeerInfo, RefuseAll, TokenChunk,
    TokenLogprob, TopLogprob, Usage,
};
use tokio_util::sync::CancellationToken;

use crate::backend::{self, Backend, EndReason, GenEvent, SubmitError};
use crate::config::PeerSettings;
use crate::cp_client::state::StateDir;

/// Serves forwarded generate requests on this node's workers.
#[derive(Debug, Clone)]
pub struct LocalGenerate {
    backend: Arc<dyn Backend>,
}

impl LocalGenerate {
    /// A handler submitting to `backend`.
    pub fn new(backend: Arc<dyn Backend>) -> Self {
        Self { backend }
    }
}

fn finish_reason(reason: EndReason) -> FinishReason {
    match reason {
        EndReason::Length => FinishReason::Length,
        EndReason::Stop => FinishReason::Stop,
    }
}

fn logprobs(items: Vec<backend::TokenLogprob>, ids: &[u32]) -> Vec<TokenLogprob> {
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
        tracing::debug!(request = %request.request_id, node = %peer.node_id,
            "serving a forwarded request");
        let generation = self
            .backend
            .submit(backend::GenerateRequest {
                request_id: request.request_id,
                model: request.model,
                prompt: request.prompt,
                block_hashes: request.block_hashes,
                sampling: request.sampling,
                worker: request.worker,
            })
            .map_err(|e| match e {
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
/// until `stop`. A certificate renewed later is picked up at the next start. `host` names this
/// node in the advertised address when the endpoint listens on all interfaces and
/// `[peer] advertise` is not set.
pub async fn run(
    settings: PeerSettings,
    host: String,
    state_dir: std::path::PathBuf,
    backend: Arc<dyn Backend>,
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
    let endpoint = match PeerEndpoint::bind(PeerConfig::new(settings.listen, identity)) {
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
    endpoint
        .serve(
            Arc::new(LocalGenerate::new(backend)),
            Arc::new(RefuseAll),
            async move { stop.cancelled().await },
        )
        .await;
}
