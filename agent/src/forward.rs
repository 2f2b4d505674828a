//! The frontend's backend in control-plane mode: each request goes to the worker the fleet
//! router picks, wherever it is.
//!
//! [`FleetBackend`] is a [`Backend`]: a request with block hashes asks the [`FleetRouter`]; a
//! local pick is submitted to this node's pool as before, a remote pick is forwarded over QUIC
//! to that node's peer endpoint ([`kvfleet_peer::PeerConnection::generate`]) and its token
//! frames become the [`Generation`]'s events. Dropping the generation (the client went away)
//! aborts the forwarding task, which drops the peer stream: the serving node cancels the
//! sequence. A peer that cannot be reached, or that refuses or fails before the first token,
//! is logged and counted, and the request runs on a local worker instead.
//!
//! Known limits: a local pick runs on whichever local worker the pool chooses (the router's
//! choice among several local workers is not passed down), and a remote failure after the
//! first token ends the request with an error (tokens already streamed cannot be replayed).

use std::sync::Arc;

use kvfleet_peer::{GenerateEvent, PeerError};
use tokio::sync::mpsc;

use crate::backend::{
    Backend, EndReason, GenEvent, GenerateRequest, Generation, SubmitError, TokenLogprob,
    WorkerStatus,
};
use crate::fleet::{FleetRouter, Target};
use crate::peer::PeerHandle;

/// How long connecting to a peer and starting the stream may take before the request runs
/// locally instead.
const FORWARD_START_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Routes over the whole fleet; see the module docs.
#[derive(Debug)]
pub struct FleetBackend {
    local: Arc<dyn Backend>,
    fleet: Arc<FleetRouter>,
    peer: PeerHandle,
}

impl FleetBackend {
    /// A backend choosing with `fleet`, running local picks on `local` and forwarding remote
    /// ones through `peer`'s endpoint.
    pub fn new(local: Arc<dyn Backend>, fleet: Arc<FleetRouter>, peer: PeerHandle) -> Self {
        Self { local, fleet, peer }
    }
}

/// Runs `inner` to its end on a task, passing its events on and telling the router when it
/// ended; dropping the returned generation aborts the task (and so drops, i.e. cancels,
/// `inner`).
fn tracked(
    inner: Generation,
    fleet: Arc<FleetRouter>,
    request: kvfleet_kv_router::RequestId,
) -> Generation {
    let worker = inner.worker;
    let cancel_fleet = fleet.clone();
    let (tx, rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        let mut inner = inner;
        while let Some(event) = inner.events.recv().await {
            let last = matches!(event, GenEvent::Finished(_) | GenEvent::Failed(_));
            if last {
                inner.done();
            }
            if tx.send(event).is_err() || last {
                break;
            }
        }
        fleet.finished(request);
    });
    let abort = task.abort_handle();
    Generation::new(worker, rx, move || {
        abort.abort();
        cancel_fleet.finished(request);
    })
}

fn gen_event(event: GenerateEvent) -> GenEvent {
    match event {
        GenerateEvent::Tokens(chunk) => GenEvent::Tokens {
            logprobs: chunk.logprobs.map(|lp| {
                lp.into_iter()
                    .map(|l| TokenLogprob {
                        logprob: l.logprob,
                        top: l.top.into_iter().map(|t| (t.token, t.logprob)).collect(),
                    })
                    .collect()
            }),
            ids: chunk.tokens,
        },
        GenerateEvent::Finished(finish) => GenEvent::Finished(match finish.reason {
            kvfleet_peer::FinishReason::Length => EndReason::Length,
            kvfleet_peer::FinishReason::Stop => EndReason::Stop,
        }),
    }
}

impl Backend for FleetBackend {
    fn submit(&self, request: GenerateRequest) -> Result<Generation, SubmitError> {
        if request.block_hashes.is_empty() {
            return self.local.submit(request);
        }
        let prompt_tokens = u32::try_from(request.prompt.len()).unwrap_or(u32::MAX);
        let picked = self
            .fleet
            .select(&request.model, &request.block_hashes, prompt_tokens);
        let Some((decision, target)) = picked else {
            return self.local.submit(request);
        };
        let (node, addr, endpoint) = match (target, self.peer.endpoint()) {
            (Target::Remote { node, addr }, Some(endpoint)) => (node, addr, endpoint),
            (Target::Remote { .. }, None) | (Target::Local, _) => {
                self.fleet.count_local();
                return match self.local.submit(request) {
                    Ok(g) => Ok(tracked(g, self.fleet.clone(), decision.request)),
                    Err(e) => {
                        self.fleet.finished(decision.request);
                        Err(e)
                    }
                };
            }
        };
        self.fleet.count_remote();
        let worker = decision.worker;
        let (tx, rx) = mpsc::unbounded_channel();
        let local = self.local.clone();
        let fleet = self.fleet.clone();
        let task = tokio::spawn(async move {
            let forwarded = kvfleet_peer::GenerateRequest {
                request_id: request.request_id.clone(),
                model: request.model.clone(),
                worker: Some(worker),
                prompt: request.prompt.clone(),
                block_hashes: request.block_hashes.clone(),
                sampling: request.sampling.clone(),
                prefill: None,
                kv_push: None,
            };
            // A peer that is gone leaves QUIC waiting for its idle timeout: give up sooner and
            // run the request here.
            let started = tokio::time::timeout(FORWARD_START_TIMEOUT, async {
                let connection = endpoint.connection(addr, node).await?;
                connection.generate(&forwarded).await
            })
            .await
            .map_err(|_| format!("no answer within {FORWARD_START_TIMEOUT:?}"))
            .and_then(|r: Result<_, PeerError>| r.map_err(|e| e.to_string()));
            let first_error;
            match started {
                Ok(mut stream) => {
                    let mut sent_any = false;
                    loop {
                        match stream.next().await {
                            Ok(Some(event)) => {
                                let last = matches!(event, GenerateEvent::Finished(_));
                                sent_any = true;
                                if tx.send(gen_event(event)).is_err() || last {
                                    fleet.finished(decision.request);
                                    return;
                                }
                            }
                            Ok(None) => {
                                first_error = Some("the peer ended the stream early".to_owned());
                                break;
                            }
                            Err(e) => {
                                first_error = Some(e.to_string());
                                break;
                            }
                        }
                    }
                    if sent_any {
                        let reason = first_error.unwrap_or_default();
                        tracing::warn!(request = %request.request_id, %addr, %reason,
                            "forwarded request failed mid-stream");
                        let _ = tx.send(GenEvent::Failed(format!("peer {addr}: {reason}")));
                        fleet.finished(decision.request);
                        return;
                    }
                }
                Err(e) => first_error = Some(e),
            }
            fleet.finished(decision.request);
            fleet.count_fallback();
            tracing::warn!(request = %request.request_id, %addr, %node,
                error = first_error.as_deref().unwrap_or(""),
                "peer unavailable: retrying the request on a local worker");
            match local.submit(request) {
                Ok(mut generation) => {
                    while let Some(event) = generation.events.recv().await {
                        let last = matches!(event, GenEvent::Finished(_) | GenEvent::Failed(_));
                        if last {
                            generation.done();
                        }
                        if tx.send(event).is_err() || last {
                            return;
                        }
                    }
                }
                Err(e) => {
                    let _ = tx.send(GenEvent::Failed(e.to_string()));
                }
            }
        });
        let abort = task.abort_handle();
        let fleet = self.fleet.clone();
        let id = decision.request;
        Ok(Generation::new(worker, rx, move || {
            abort.abort();
            fleet.finished(id);
        }))
    }

    fn workers(&self) -> Vec<WorkerStatus> {
        self.local.workers()
    }
}
