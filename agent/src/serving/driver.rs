//! The driver of one request's [`Serve`] state machine: it opens the legs the machine starts
//! (a pool submission, a forwarded stream, a prefill leg with its transfer), reads the current
//! leg's events into the machine, and does what the machine says — release a router pick, count
//! an outcome, end the request. It runs in the task that reads the [`Generation`]; the time it
//! gives the machine is the time since the request started.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use kvfleet_peer::{GenerateEvent, GenerateStream, KvPush, PrefillPlan};
use kvfleet_proto::api::WorkerRole;
use kvfleet_proto::{KvLayout, NodeId, WorkerId};
use kvfleet_serving::{
    Action, End, Leg, LegId, LegStart, Plan, PrefillOutcome, Prompt, Record, Replan, Serve,
};
use tokio::time::Instant;

use super::transfers::{Received, TransferGuard};
use super::{Serving, lookup, plan_request};
use crate::backend::{Events, GenEvent, GenerateRequest, Generation, SubmitError};
use crate::fleet::FleetRouter;

/// A leg's stream.
enum LegStream {
    /// On this node's pool.
    Local(Generation),
    /// A peer leg reaching its node (connect, open the stream, send the request).
    Opening(Pin<Box<dyn Future<Output = Result<GenerateStream, String>> + Send>>),
    /// A peer leg's events.
    Peer(GenerateStream),
}

/// What a leg did, for the machine.
enum LegEvent {
    Opened(GenerateStream),
    Tokens(kvfleet_proto::peer::TokenChunk),
    Finished(kvfleet_proto::peer::FinishReason, u32),
    /// Its worker, node or stream went away: the request may resume elsewhere.
    Lost(String),
    /// Its worker refused the request or failed on it.
    Refused(String),
}

/// How a peer's answer counts: a refusal of the request itself, or a node that could not serve
/// it (which another may).
fn peer_failure(error: &kvfleet_peer::PeerError) -> LegEvent {
    use kvfleet_peer::ErrorCode;
    match error {
        kvfleet_peer::PeerError::Remote(m)
            if matches!(m.code, ErrorCode::BadRequest | ErrorCode::Internal) =>
        {
            LegEvent::Refused(error.to_string())
        }
        _ => LegEvent::Lost(error.to_string()),
    }
}

/// One request served in legs; see the module docs.
pub struct Driver {
    serve: Serve,
    serving: Arc<Serving>,
    fleet: Option<Arc<FleetRouter>>,
    request: GenerateRequest,
    started: Instant,
    leg: Option<(LegId, LegStream)>,
    /// The prefill leg's transfer, while it may still deliver blocks.
    transfer: Option<(TransferGuard, KvLayout)>,
    /// What the transfer delivered, until the decode leg takes it.
    received: Option<(Received, KvLayout)>,
    /// Events for the reader, in order.
    out: VecDeque<GenEvent>,
    /// The decode worker the plan named.
    decode_worker: Option<WorkerId>,
    /// While [`Driver::start`] runs: a leg on this node that cannot start is the submit error.
    starting: bool,
    /// Why the request could not start (answered by [`Driver::start`]).
    start_error: Option<SubmitError>,
    /// The role of the worker whose tokens came first, once they came.
    first_role: Option<WorkerRole>,
    /// Workers of this node's pool that lost this request (the pool chose them, so the
    /// machine does not know them).
    lost_here: Vec<WorkerId>,
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver")
            .field("request_id", &self.request.request_id)
            .field("serve", &self.serve)
            .finish()
    }
}

impl Driver {
    /// Serves `request` under `plan`: starts its first leg at once. A first leg on this node
    /// that cannot start (no ready worker) is the error, as a plain submission's would be.
    pub fn start(
        serving: Arc<Serving>,
        fleet: Option<Arc<FleetRouter>>,
        request: GenerateRequest,
        plan: Plan,
    ) -> Result<Generation, SubmitError> {
        let decode_worker = plan.decode.as_ref().map(|d| d.worker);
        let prompt = Prompt {
            max_tokens: request.sampling.max_tokens,
            stop_token_ids: request.sampling.stop_token_ids.clone(),
            full_blocks: request.block_hashes.len(),
        };
        let mut driver = Self {
            serve: Serve::new(plan, prompt, serving.timeouts),
            serving,
            fleet,
            request,
            started: Instant::now(),
            leg: None,
            transfer: None,
            received: None,
            out: VecDeque::new(),
            decode_worker,
            starting: true,
            start_error: None,
            first_role: None,
            lost_here: Vec::new(),
        };
        driver.serve.start(driver.now());
        driver.act();
        driver.starting = false;
        // A first leg that could not start, with nothing else started since: its error.
        if let Some(error) = driver.start_error.take()
            && driver.leg.is_none()
            && driver.serve.is_done()
        {
            return Err(error);
        }
        let worker = match &driver.leg {
            Some((_, LegStream::Local(generation))) => generation.worker,
            _ => decode_worker.unwrap_or(WorkerId(0)),
        };
        Ok(Generation::driven(worker, Box::new(driver)))
    }

    fn now(&self) -> std::time::Duration {
        self.started.elapsed()
    }

    /// Does what the machine asks until it asks nothing more.
    fn act(&mut self) {
        while let Some(action) = self.serve.poll_action() {
            match action {
                Action::Start(leg) => self.start_leg(leg),
                Action::Close(id) => {
                    if self.leg.as_ref().is_some_and(|(current, _)| *current == id) {
                        self.leg = None;
                    }
                }
                Action::CollectTransfer => {
                    let received = self
                        .transfer
                        .take()
                        .map(|(guard, layout)| (self.serving.transfers.take(guard), layout));
                    let blocks = received.as_ref().map_or(0, |(r, _)| r.blocks.len());
                    self.received = received;
                    self.serve.collected(blocks);
                }
                Action::Release(id) => {
                    if let Some(fleet) = &self.fleet {
                        fleet.finished(id);
                    }
                }
                Action::PrefillDone(id) => {
                    if let Some(fleet) = &self.fleet {
                        fleet.prefill_done(id);
                    }
                }
                Action::Record(record) => self.record(record),
                Action::End(End::Finished(reason)) => {
                    self.out.push_back(GenEvent::Finished(reason))
                }
                Action::End(End::Failed(message)) => self.out.push_back(GenEvent::Failed(message)),
                Action::End(End::Lost(message)) => self.out.push_back(GenEvent::Lost(message)),
                Action::Replan(replan) => self.replan(replan),
            }
        }
    }

    fn record(&self, record: Record) {
        let request_id = &self.request.request_id;
        match record {
            Record::RoutedLocal => self.with_fleet(FleetRouter::count_local),
            Record::RoutedRemote => self.with_fleet(FleetRouter::count_remote),
            Record::ForwardFallback { addr, reason } => {
                self.with_fleet(FleetRouter::count_fallback);
                tracing::warn!(request_id = %request_id, %addr, error = %reason,
                    "peer unavailable: retrying the request on a local worker");
            }
            Record::Migrated {
                attempt,
                tokens,
                reason,
            } => {
                self.serving.migrated.inc();
                tracing::warn!(request_id = %request_id, attempt, tokens, error = %reason,
                    "worker lost mid-request: resuming it elsewhere after the tokens delivered");
            }
            Record::Refused { reason } => {
                self.serving.refused_legs.inc();
                tracing::warn!(request_id = %request_id, error = %reason,
                    "a leg sent what the request did not ask for: cut off");
            }
            Record::Prefill {
                outcome,
                reason,
                blocks,
            } => {
                self.serving.count(outcome);
                let reason = reason.unwrap_or_default();
                match outcome {
                    PrefillOutcome::Remote => tracing::debug!(request_id = %request_id, blocks,
                        "decoding with the prefill node's KV blocks"),
                    PrefillOutcome::FallbackBeforeFirstToken => tracing::warn!(
                        request_id = %request_id, error = %reason,
                        "prefill leg failed before its first token: the decode worker prefills the prompt"),
                    PrefillOutcome::FallbackAfterFirstToken => tracing::warn!(
                        request_id = %request_id, blocks, error = %reason,
                        "prefill leg failed after its first token: decoding with the blocks received"),
                }
            }
        }
    }

    fn with_fleet(&self, count: fn(&FleetRouter)) {
        if let Some(fleet) = &self.fleet {
            count(fleet);
        }
    }

    /// A migration: the fleet router plans the request again (never on a worker that lost it
    /// already; then this node's pool chooses), and the machine starts the leg that resumes.
    fn replan(&mut self, Replan { avoid, .. }: Replan) {
        let now = self.now();
        let pick = self.fleet.as_ref().and_then(|fleet| {
            let plan = plan_request(&self.serving, fleet, &self.request)?;
            // A migrated request is served whole by one worker: no second prefill leg.
            let mut releases: Vec<_> = plan.unused;
            releases.extend(plan.prefill.and_then(|p| p.hold));
            let decode = plan.decode?;
            let lost = avoid.contains(&decode.worker) || self.lost_here.contains(&decode.worker);
            if lost {
                releases.extend(decode.hold);
            }
            for hold in releases {
                fleet.finished(hold);
            }
            (!lost).then_some(decode)
        });
        self.serve.replanned(pick, now);
    }

    /// The request a leg runs: the prompt followed by what the client already has, asking for
    /// what is still missing. The block hashes stay the original prompt's (a prefix of the
    /// longer sequence's: enough to route; workers hash what they cache themselves).
    fn resumed(&self, worker: Option<WorkerId>, generated: &[u32]) -> GenerateRequest {
        let mut request = GenerateRequest {
            worker,
            ..self.request.clone()
        };
        if !generated.is_empty() {
            request.prompt.extend_from_slice(generated);
            let n = u32::try_from(generated.len()).unwrap_or(u32::MAX);
            request.sampling.max_tokens = request.sampling.max_tokens.saturating_sub(n);
            request.sampling.generated_in_prompt =
                request.sampling.generated_in_prompt.saturating_add(n);
        }
        request
    }

    fn start_leg(&mut self, LegStart { id, leg }: LegStart) {
        let stream = match leg {
            Leg::Local { worker, generated } => {
                let request = self.resumed(worker, &generated);
                self.local(id, self.serving.local.submit(request))
            }
            Leg::Forward {
                worker,
                node,
                addr,
                prefill,
                prefill_deadline,
                generated,
            } => {
                let resumed = self.resumed(Some(worker), &generated);
                let forwarded = kvfleet_peer::GenerateRequest {
                    request_id: resumed.request_id,
                    model: resumed.model,
                    worker: Some(worker),
                    prompt: resumed.prompt,
                    block_hashes: resumed.block_hashes,
                    sampling: resumed.sampling,
                    prefill: prefill.map(|p| PrefillPlan {
                        worker: p.worker,
                        node: p.node.0,
                        addr: p.addr,
                        // A receiver refuses longer plans (no 49-day transfers).
                        timeout_ms: u32::try_from(prefill_deadline.as_millis())
                            .unwrap_or(u32::MAX)
                            .clamp(1, kvfleet_proto::peer::MAX_PREFILL_TIMEOUT_MS),
                    }),
                    kv_push: None,
                };
                self.open(id, addr.to_string(), node, forwarded)
            }
            Leg::Prefill { pick } => self.start_prefill(id, pick),
            Leg::Decode {
                worker,
                tokens,
                blocks,
                max_tokens,
            } => {
                // A decode leg follows a prefill leg that opened, so its transfer was collected.
                let Some((received, layout)) = self.received.take() else {
                    self.serve
                        .failed(id, "the prefill leg's transfer is missing".into());
                    return;
                };
                self.serving.transfers.count_handed_off(&received, blocks);
                let origin = received.origin.clone();
                let mut kv = received.blocks;
                kv.truncate(blocks);
                let mut prompt = self.request.prompt.clone();
                prompt.extend_from_slice(&tokens);
                // The prefill leg's tokens end the decode leg's prompt; penalties count them as
                // output, so the decode worker samples what an aggregated run would.
                let generated_in_prompt = self.request.sampling.generated_in_prompt
                    + u32::try_from(tokens.len()).unwrap_or(u32::MAX);
                let block_size = layout.block_size;
                let decode = GenerateRequest {
                    request_id: self.request.request_id.clone(),
                    model: self.request.model.clone(),
                    block_hashes: self
                        .serving
                        .hashes(&prompt, &self.request.sampling, block_size),
                    prompt,
                    sampling: kvfleet_proto::SamplingParams {
                        max_tokens,
                        generated_in_prompt,
                        ..self.request.sampling.clone()
                    },
                    worker,
                };
                let generation = match origin {
                    Some(origin) => self.serving.local.submit_with_kv(decode, kv, origin),
                    // Nothing arrived: nothing to import.
                    None => self.serving.local.submit(decode),
                };
                self.local(id, generation)
            }
        };
        if let Some(stream) = stream {
            self.leg = Some((id, stream));
        }
    }

    /// A leg on this node's pool: its generation, or the machine told why it did not start.
    fn local(
        &mut self,
        id: LegId,
        submitted: Result<Generation, SubmitError>,
    ) -> Option<LegStream> {
        match submitted {
            Ok(generation) => Some(LegStream::Local(generation)),
            Err(e) => {
                if self.starting {
                    // The submit error, should the request end before it started anywhere.
                    self.start_error = Some(e.clone());
                }
                let now = self.now();
                match &e {
                    // Worth waiting for only if a worker of the model may come back (here,
                    // restarting) or serves elsewhere; a model no longer deployed fails now.
                    SubmitError::NoReadyWorker(_) if self.model_may_be_served() => {
                        self.serve.unavailable(id, e.to_string(), now)
                    }
                    SubmitError::NoReadyWorker(_) => self.serve.refused(id, e.to_string()),
                    SubmitError::WorkerGone(_) => self.serve.failed(id, e.to_string()),
                    SubmitError::Unsupported | SubmitError::Invalid(_) => {
                        self.serve.refused(id, e.to_string())
                    }
                }
                None
            }
        }
    }

    /// Whether a worker of the request's model runs here in any state but stopped (it may be
    /// restarting), or is ready on another node.
    fn model_may_be_served(&self) -> bool {
        let model = &self.request.model;
        let here = self
            .serving
            .local
            .workers()
            .iter()
            .any(|w| &w.model == model && w.state != crate::backend::WorkerState::Stopped);
        here || self.fleet.as_ref().is_some_and(|fleet| {
            fleet
                .remote_workers()
                .values()
                .any(|w| w.ready && &w.model == model)
        })
    }

    /// A peer leg: connect to `node` at `addr` and send `request`, bounded by the machine's
    /// timer.
    fn open(
        &mut self,
        id: LegId,
        addr: String,
        node: NodeId,
        request: kvfleet_peer::GenerateRequest,
    ) -> Option<LegStream> {
        let Some(endpoint) = self.serving.peer.endpoint() else {
            self.serve
                .failed(id, "this node's peer endpoint is not up".into());
            return None;
        };
        Some(LegStream::Opening(Box::pin(async move {
            let addr = lookup(&addr).await?;
            let connection = endpoint
                .connection(addr, node)
                .await
                .map_err(|e| e.to_string())?;
            connection
                .generate(&request)
                .await
                .map_err(|e| e.to_string())
        })))
    }

    /// The prefill leg: registers the transfer its blocks come in, asks the prefill node for
    /// the first token. Without this node's endpoint or the decode worker's layout no transfer
    /// can come: the leg fails at once (the decode worker prefills).
    fn start_prefill(
        &mut self,
        id: LegId,
        pick: kvfleet_serving::PrefillPick,
    ) -> Option<LegStream> {
        let peer = &self.serving.peer;
        let own = peer.endpoint().map(|e| e.node_id()).zip(peer.advertised());
        let layout = self
            .decode_worker
            .and_then(|w| self.serving.local.kv_layout(w).map(|l| (w, l)));
        let (Some((own_node, own_addr)), Some((decode_worker, layout))) = (own, layout) else {
            self.serve.failed(
                id,
                "no transfer possible here (no peer endpoint or worker layout)".into(),
            );
            return None;
        };
        let transfer_id = self.serving.transfer_id(&self.request.request_id);
        // The slots are this node's hashes of the prompt's full blocks, computed here from its
        // tokens with the decode worker's block size: whatever hashes the request came with (a
        // peer may have sent them), a block is only ever kept under the hash of the tokens it
        // is for.
        let hashes = self.serving.hashes(
            &self.request.prompt,
            &self.request.sampling,
            layout.block_size,
        );
        let guard =
            self.serving
                .transfers
                .register(transfer_id.clone(), pick.node, layout.clone(), hashes);
        self.transfer = Some((guard, layout));
        let leg = kvfleet_peer::GenerateRequest {
            request_id: self.request.request_id.clone(),
            model: self.request.model.clone(),
            worker: Some(pick.worker),
            prompt: self.request.prompt.clone(),
            block_hashes: self.request.block_hashes.clone(),
            sampling: kvfleet_proto::SamplingParams {
                max_tokens: 1,
                ..self.request.sampling.clone()
            },
            prefill: None,
            kv_push: Some(KvPush {
                transfer_id,
                worker: decode_worker,
                node: own_node.0,
                addr: own_addr,
            }),
        };
        self.open(id, pick.addr, pick.node, leg)
    }

    /// The current leg's next event (a timer may interrupt it; a leg whose timer fires is
    /// closed, so no half-read frame is ever resumed).
    async fn leg_event(stream: &mut LegStream) -> LegEvent {
        match stream {
            LegStream::Local(generation) => match generation.next().await {
                Some(GenEvent::Tokens(chunk)) => LegEvent::Tokens(chunk),
                Some(GenEvent::Finished(reason)) => LegEvent::Finished(reason, 0),
                Some(GenEvent::Failed(message)) => LegEvent::Refused(message),
                Some(GenEvent::Lost(message)) => LegEvent::Lost(message),
                None => LegEvent::Lost("the worker went away mid-request".into()),
            },
            LegStream::Opening(opening) => match opening.await {
                Ok(stream) => LegEvent::Opened(stream),
                Err(e) => LegEvent::Lost(e),
            },
            LegStream::Peer(stream) => match stream.next().await {
                Ok(Some(GenerateEvent::Tokens(chunk))) => LegEvent::Tokens(chunk),
                Ok(Some(GenerateEvent::Finished(finish))) => {
                    LegEvent::Finished(finish.reason, finish.kv_push.map_or(0, |r| r.blocks))
                }
                Ok(None) => LegEvent::Lost("the peer ended the stream early".into()),
                Err(e) => peer_failure(&e),
            },
        }
    }

    async fn next_event(&mut self) -> Option<GenEvent> {
        loop {
            self.act();
            if let Some(event) = self.out.pop_front() {
                return Some(event);
            }
            if self.serve.is_done() {
                self.leg = None;
                return None;
            }
            let deadline = self.serve.poll_timeout().map(|t| self.started + t);
            let Some((id, stream)) = self.leg.as_mut() else {
                // Between legs (a migration waiting for a worker): only the timer can move it.
                deadline?;
                sleep_until(deadline).await;
                let now = self.now();
                self.serve.handle_timeout(now);
                continue;
            };
            let id = *id;
            let event = tokio::select! {
                event = Self::leg_event(stream) => event,
                () = sleep_until(deadline) => {
                    let now = self.now();
                    self.serve.handle_timeout(now);
                    continue;
                }
            };
            match event {
                LegEvent::Opened(stream) => {
                    self.leg = Some((id, LegStream::Peer(stream)));
                    self.serve.opened(id);
                }
                LegEvent::Tokens(chunk) => {
                    let role = self.answering_role();
                    if self.serve.tokens(id, &chunk.tokens) {
                        self.first_role.get_or_insert(role);
                        self.out.push_back(GenEvent::Tokens(chunk));
                    }
                }
                LegEvent::Finished(reason, acknowledged) => {
                    let role = self.answering_role();
                    self.first_role.get_or_insert(role);
                    self.serve.finished(id, reason, acknowledged);
                }
                LegEvent::Lost(message) => {
                    if let Some((_, LegStream::Local(generation))) = &self.leg
                        && !self.lost_here.contains(&generation.worker)
                    {
                        self.lost_here.push(generation.worker);
                    }
                    self.serve.failed(id, message)
                }
                LegEvent::Refused(message) => self.serve.refused(id, message),
            }
        }
    }

    /// The role of the worker answering on the current leg.
    fn answering_role(&self) -> WorkerRole {
        self.serve.first_role().unwrap_or_else(|| self.leg_role())
    }

    /// The role of the current leg's worker when the pool chose it.
    fn leg_role(&self) -> WorkerRole {
        match &self.leg {
            Some((_, LegStream::Local(generation))) => generation.role(),
            _ => WorkerRole::Aggregated,
        }
    }
}

impl Events for Driver {
    fn next(&mut self) -> Pin<Box<dyn Future<Output = Option<GenEvent>> + Send + '_>> {
        Box::pin(self.next_event())
    }

    fn role(&self) -> WorkerRole {
        self.first_role
            .or_else(|| self.serve.first_role())
            .unwrap_or_else(|| self.leg_role())
    }
}

impl Drop for Driver {
    /// The client went away (or the request ended): the machine releases what the request
    /// still holds; the current leg's stream is dropped with the driver.
    fn drop(&mut self) {
        self.serve.abort();
        while let Some(action) = self.serve.poll_action() {
            let Some(fleet) = &self.fleet else {
                continue;
            };
            match action {
                Action::Release(id) => fleet.finished(id),
                Action::PrefillDone(id) => {
                    fleet.prefill_done(id);
                }
                _ => {}
            }
        }
    }
}

/// Sleeps until `deadline`; forever without one.
async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use kvfleet_proto::SamplingParams;
    use kvfleet_serving::{Pick, PrefillPick, Target};
    use tokio::sync::mpsc;

    use super::*;
    use crate::backend::{Backend, FinishReason, WorkerStatus};
    use crate::peer::PeerHandle;

    /// A backend that records what it was given and ends every generation at once (or
    /// refuses, with no ready worker).
    #[derive(Debug, Default)]
    struct Recorder {
        submitted: Mutex<Vec<GenerateRequest>>,
        refuse: bool,
    }

    impl Backend for Recorder {
        fn submit(&self, request: GenerateRequest) -> Result<Generation, SubmitError> {
            if self.refuse {
                return Err(SubmitError::NoReadyWorker(request.model));
            }
            let worker = request.worker.unwrap_or(WorkerId(1));
            self.submitted
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(request);
            let (tx, rx) = mpsc::unbounded_channel();
            let _ = tx.send(GenEvent::Finished(FinishReason::Length));
            Ok(Generation::new(worker, WorkerRole::Decode, rx, || {}))
        }

        fn workers(&self) -> Vec<WorkerStatus> {
            Vec::new()
        }
    }

    fn request() -> GenerateRequest {
        GenerateRequest {
            request_id: "r".into(),
            model: "m".into(),
            prompt: (1..=40).collect(),
            block_hashes: vec![
                kvfleet_proto::SequenceHash(1),
                kvfleet_proto::SequenceHash(2),
            ],
            sampling: SamplingParams::greedy(5),
            worker: None,
        }
    }

    /// A disaggregated plan for decode worker 3 here, prefill worker 9 on another node.
    fn split() -> Plan {
        Plan {
            decode: Some(Pick {
                worker: WorkerId(3),
                role: WorkerRole::Decode,
                target: Target::Local,
                hold: None,
            }),
            prefill: Some(PrefillPick {
                worker: WorkerId(9),
                node: NodeId(uuid::Uuid::from_u128(9)),
                addr: "127.0.0.1:1".into(),
                hold: None,
            }),
            prefill_deadline: Duration::from_secs(30),
            unused: Vec::new(),
            // As a decode leg forwarded here is planned: the node that forwarded it migrates.
            migration_limit: 0,
        }
    }

    #[tokio::test]
    async fn without_a_transfer_the_named_decode_worker_prefills_the_whole_prompt() {
        // No peer endpoint here: no transfer can come, so the prefill leg fails at once.
        let recorder = Arc::new(Recorder::default());
        let serving = Arc::new(Serving::new(recorder.clone(), PeerHandle::default()));
        let mut generation = Driver::start(serving.clone(), None, request(), split()).unwrap();
        assert_eq!(generation.worker, WorkerId(3));
        assert_eq!(
            generation.next().await,
            Some(GenEvent::Finished(FinishReason::Length))
        );
        assert_eq!(generation.next().await, None);
        assert_eq!(generation.role(), WorkerRole::Decode);
        let submitted = recorder.submitted.lock().unwrap_or_else(|e| e.into_inner());
        assert_eq!(submitted.len(), 1);
        assert_eq!(submitted[0].worker, Some(WorkerId(3)));
        assert_eq!(
            submitted[0].prompt,
            request().prompt,
            "the whole prompt, once"
        );
        assert_eq!(submitted[0].sampling.max_tokens, 5);
        assert_eq!(
            serving.outcome_count(PrefillOutcome::FallbackBeforeFirstToken),
            1
        );
    }

    #[tokio::test]
    async fn a_first_leg_that_cannot_start_is_the_submit_error() {
        let recorder = Arc::new(Recorder {
            refuse: true,
            ..Recorder::default()
        });
        let serving = Arc::new(Serving::new(recorder, PeerHandle::default()));
        let refused = Driver::start(serving, None, request(), split()).unwrap_err();
        assert_eq!(refused, SubmitError::NoReadyWorker("m".into()));
    }
}
