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
//! Disaggregated models: when the router's plan has a prefill pick, a local decode pick runs
//! through [`Disagg::submit_decode`] and a remote one is forwarded with its [`PrefillPlan`], so
//! the decode node runs the legs (see `crate::disagg`). The router's decisions are released as
//! the request goes: the prefill pick at the first token, the decode pick at the end.
//!
//! The picked worker is named in the request (`GenerateRequest::worker`), so the pool or the
//! serving node runs it on that worker. Known limit: a remote failure after the first token ends
//! the request with an error (tokens already streamed cannot be replayed).

use std::sync::Arc;
use std::time::Duration;

use kvfleet_kv_router::RequestId;
use kvfleet_peer::{GenerateEvent, PeerError, PrefillPlan};
use kvfleet_proto::api::WorkerRole;
use tokio::sync::mpsc;

use crate::backend::{Backend, GenEvent, GenerateRequest, Generation, SubmitError, WorkerStatus};
use crate::disagg::{Disagg, PrefillTarget, end_reason, tokens_event};
use crate::fleet::{FleetRouter, Pick, Target};

/// How long connecting to a peer and starting the stream may take before the request runs
/// locally instead.
const FORWARD_START_TIMEOUT: Duration = Duration::from_secs(2);

/// The prefill leg's deadline when the directory names no policy.
const DEFAULT_PREFILL_TIMEOUT: Duration = Duration::from_secs(30);

/// Routes over the whole fleet; see the module docs.
#[derive(Debug)]
pub struct FleetBackend {
    local: Arc<dyn Backend>,
    fleet: Arc<FleetRouter>,
    disagg: Arc<Disagg>,
}

impl FleetBackend {
    /// A backend choosing with `fleet`, running local picks on `local` and forwarding remote
    /// ones (and disaggregated legs) through `disagg`'s peer endpoint.
    pub fn new(local: Arc<dyn Backend>, fleet: Arc<FleetRouter>, disagg: Arc<Disagg>) -> Self {
        Self {
            local,
            fleet,
            disagg,
        }
    }
}

/// The router decisions a request holds: the decode pick until the request ends, the prefill
/// pick until its first token.
#[derive(Debug, Clone, Copy)]
struct Held {
    decode: RequestId,
    prefill: Option<RequestId>,
}

impl Held {
    fn first_token(&mut self, fleet: &FleetRouter) {
        if let Some(prefill) = self.prefill.take() {
            fleet.finished(prefill);
            // The decode worker imports the prompt instead of computing it: its pick stops
            // counting the prompt as prefill load.
            fleet.prefill_done(self.decode);
        }
    }

    fn release(&mut self, fleet: &FleetRouter) {
        self.first_token(fleet);
        fleet.finished(self.decode);
    }
}

/// Runs `inner` to its end on a task, passing its events on and releasing the router's
/// decisions as it goes; dropping the returned generation aborts the task (and so drops, i.e.
/// cancels, `inner`).
fn tracked(inner: Generation, fleet: Arc<FleetRouter>, held: Held) -> Generation {
    let (worker, role) = (inner.worker, inner.role);
    let cancel_fleet = fleet.clone();
    let (tx, rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        let mut inner = inner;
        let mut held = held;
        while let Some(event) = inner.events.recv().await {
            let last = matches!(event, GenEvent::Finished(_) | GenEvent::Failed(_));
            if last {
                inner.done();
            }
            held.first_token(&fleet);
            if tx.send(event).is_err() || last {
                break;
            }
        }
        held.release(&fleet);
    });
    let abort = task.abort_handle();
    Generation::new(worker, role, rx, move || {
        abort.abort();
        let mut held = held;
        held.release(&cancel_fleet);
    })
}

fn gen_event(event: GenerateEvent) -> GenEvent {
    match event {
        GenerateEvent::Tokens(chunk) => tokens_event(chunk),
        GenerateEvent::Finished(finish) => GenEvent::Finished(end_reason(finish.reason)),
    }
}

impl FleetBackend {
    /// Where a prefill pick runs, as the decode node will reach it; `None` when this node's
    /// endpoint is not up yet (the decode worker then prefills itself).
    fn prefill_target(&self, pick: &Pick) -> Option<PrefillTarget> {
        let worker = pick.decision.worker;
        match &pick.target {
            Target::Remote { node, addr } => Some(PrefillTarget {
                worker,
                node: *node,
                addr: addr.to_string(),
            }),
            // As the fleet directory advertises this node, so that the decode node reaches it.
            Target::Local => Some(PrefillTarget {
                worker,
                node: self.disagg.peer().endpoint()?.node_id(),
                addr: self.disagg.peer().advertised()?,
            }),
        }
    }
}

impl Backend for FleetBackend {
    fn submit(&self, mut request: GenerateRequest) -> Result<Generation, SubmitError> {
        if request.block_hashes.is_empty() {
            return self.local.submit(request);
        }
        let prompt_tokens = u32::try_from(request.prompt.len()).unwrap_or(u32::MAX);
        let planned = self
            .fleet
            .plan(&request.model, &request.block_hashes, prompt_tokens);
        let Some(plan) = planned else {
            return self.local.submit(request);
        };
        let deadline = plan.policy.map_or(DEFAULT_PREFILL_TIMEOUT, |p| {
            Duration::from_millis(u64::from(p.prefill_timeout_ms))
        });
        let prefill = plan.prefill.as_ref().and_then(|pick| {
            let target = self.prefill_target(pick);
            if target.is_none() {
                self.fleet.finished(pick.decision.request);
            }
            target
        });
        let held = Held {
            decode: plan.decode.decision.request,
            prefill: prefill
                .as_ref()
                .and(plan.prefill.as_ref().map(|p| p.decision.request)),
        };
        let worker = plan.decode.decision.worker;
        let role = if prefill.is_some() {
            WorkerRole::Prefill
        } else {
            plan.decode.role
        };
        request.worker = Some(worker);
        let (node, addr, endpoint) = match (&plan.decode.target, self.disagg.peer().endpoint()) {
            (Target::Remote { node, addr }, Some(endpoint)) => (*node, *addr, endpoint),
            (Target::Remote { .. }, None) | (Target::Local, _) => {
                self.fleet.count_local();
                let submitted = match prefill {
                    Some(target) => self.disagg.submit_decode(request, target, deadline),
                    None => self.local.submit(request),
                };
                return match submitted {
                    Ok(g) => Ok(tracked(g, self.fleet.clone(), held)),
                    Err(e) => {
                        let mut held = held;
                        held.release(&self.fleet);
                        Err(e)
                    }
                };
            }
        };
        self.fleet.count_remote();
        let (tx, rx) = mpsc::unbounded_channel();
        let local = self.local.clone();
        let fleet = self.fleet.clone();
        let task = tokio::spawn(async move {
            let mut held = held;
            let forwarded = kvfleet_peer::GenerateRequest {
                request_id: request.request_id.clone(),
                model: request.model.clone(),
                worker: Some(worker),
                prompt: request.prompt.clone(),
                block_hashes: request.block_hashes.clone(),
                sampling: request.sampling.clone(),
                prefill: prefill.map(|p| PrefillPlan {
                    worker: p.worker,
                    node: p.node.0,
                    addr: p.addr,
                    timeout_ms: u32::try_from(deadline.as_millis()).unwrap_or(u32::MAX),
                }),
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
                                held.first_token(&fleet);
                                if tx.send(gen_event(event)).is_err() || last {
                                    held.release(&fleet);
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
                        tracing::warn!(request_id = %request.request_id, %addr, %reason,
                            "forwarded request failed mid-stream");
                        let _ = tx.send(GenEvent::Failed(format!("peer {addr}: {reason}")));
                        held.release(&fleet);
                        return;
                    }
                }
                Err(e) => first_error = Some(e),
            }
            held.release(&fleet);
            fleet.count_fallback();
            tracing::warn!(request_id = %request.request_id, %addr, %node,
                error = first_error.as_deref().unwrap_or(""),
                "peer unavailable: retrying the request on a local worker");
            request.worker = None;
            crate::disagg::pipe(local.submit(request), tx).await;
        });
        let abort = task.abort_handle();
        let fleet = self.fleet.clone();
        Ok(Generation::new(worker, role, rx, move || {
            abort.abort();
            let mut held = held;
            held.release(&fleet);
        }))
    }

    fn workers(&self) -> Vec<WorkerStatus> {
        self.local.workers()
    }
}
