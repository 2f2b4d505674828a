//! Disaggregated prefill and decode, the agent's part: a request's prompt is prefilled on a
//! prefill worker (usually on another node), its KV blocks stream over the peer transport into
//! the decode worker's node, and the decode worker generates the rest.
//!
//! ```text
//! decode node (this module's `Disagg::submit_decode`)     prefill node (`Disagg::serve_prefill`)
//!   register transfer T (expected sender, layout, hashes)
//!   ── peer Request{prompt, max_tokens 1, kv_push: T} ───▶  prefill worker runs the prompt,
//!                                                          exporting blocks as chunks complete
//!   ◀══ KV blocks of T (kvfleet-peer transfer streams) ══  (overlaps the prefill compute)
//!   ◀── Token(first token) ────────────────────────────── streamed to the client at once: TTFT
//!                                                          does not wait for the transfer
//!   ◀── Finish{kv_push: blocks acknowledged} ─────────────  once the transfer ended
//!   decode worker: prompt + first token, the blocks received (contiguous from block 0)
//!   imported into its prefix cache; it prefills only the tail and decodes
//! ```
//!
//! Failure handling, all on the decode node: a prefill leg that cannot start, fails or has not
//! produced its first token by the deadline falls back to the decode worker prefilling the whole
//! prompt; one that fails after the first token continues from prompt + first token with
//! whatever contiguous blocks had arrived (the rest are recomputed). The answer is the same
//! tokens either way (greedy), only slower. Dropping the [`Generation`] (the client went away)
//! drops the prefill stream (the prefill node cancels its sequence and its transfer) and the
//! transfer's registration (late blocks are refused as an unknown request).
//!
//! [`Transfers`] is the peer endpoint's [`BlockSink`]: a transfer is accepted only from the
//! prefill node it was registered for, with the decode worker's layout, and only blocks whose
//! index and sequence hash match the prompt's; every refusal is counted by the peer metrics.
//! Memory per transfer is bounded by the prompt's full blocks.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt as _;
use kvfleet_peer::{
    BlockSink, ErrorCode, ErrorMessage, EventStream, Finish, GenerateEvent, KvBlock, KvDone,
    KvPush, KvPushReport, PeerInfo, TransferOptions, Usage,
};
use kvfleet_proto::api::WorkerRole;
use kvfleet_proto::{KvLayout, NodeId, SequenceHash, WorkerId};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::sync::{mpsc, oneshot};

use crate::backend::{
    Backend, EndReason, GenEvent, GenerateRequest, Generation, SubmitError, TokenLogprob,
};
use crate::metrics::Registry;
use crate::peer::PeerHandle;

/// How long connecting to the prefill node and starting its stream may take.
const PREFILL_START_TIMEOUT: Duration = Duration::from_secs(2);

/// The prefill worker a decode leg asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrefillTarget {
    /// The prefill worker.
    pub worker: WorkerId,
    /// Its node.
    pub node: NodeId,
    /// Its node's peer endpoint, `host:port` as the fleet directory names it (resolved when
    /// the leg starts, off the request path).
    pub addr: String,
}

/// How a disaggregated request's prefill ended, as counted on the decode node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrefillOutcome {
    /// The prefill worker produced the first token and its blocks were imported.
    Remote,
    /// The prefill leg failed or timed out before its first token: the decode worker prefilled
    /// the whole prompt.
    FallbackBeforeFirstToken,
    /// The prefill leg failed after its first token: the decode worker continued with the
    /// blocks that had arrived and recomputed the rest.
    FallbackAfterFirstToken,
}

impl PrefillOutcome {
    const ALL: [PrefillOutcome; 3] = [
        PrefillOutcome::Remote,
        PrefillOutcome::FallbackBeforeFirstToken,
        PrefillOutcome::FallbackAfterFirstToken,
    ];

    fn labels(self) -> [(&'static str, &'static str); 1] {
        [("outcome", self.label())]
    }

    fn label(self) -> &'static str {
        match self {
            PrefillOutcome::Remote => "remote",
            PrefillOutcome::FallbackBeforeFirstToken => "fallback_before_first_token",
            PrefillOutcome::FallbackAfterFirstToken => "fallback_after_first_token",
        }
    }
}

/// One transfer this node expects.
#[derive(Debug)]
struct Incoming {
    /// The only node allowed to send it.
    from: NodeId,
    layout: KvLayout,
    /// The prompt's full blocks, in order: block `i` must carry `hashes[i]`.
    hashes: Vec<SequenceHash>,
    blocks: Vec<Option<Bytes>>,
    first_block_at: Option<Instant>,
}

/// Counters of the receiving side.
#[derive(Debug, Default)]
struct TransferCounters {
    blocks: Counter,
    bytes: Counter,
    seconds: Counter<f64, AtomicU64>,
    transfers: Counter,
    refused_blocks: Counter,
    failed_streams: Counter,
}

/// The transfers this node expects: the peer endpoint's [`BlockSink`]. See the module docs.
#[derive(Debug, Default)]
pub struct Transfers {
    inner: Mutex<HashMap<String, Incoming>>,
    counters: TransferCounters,
}

/// A registered transfer; dropping it forgets the transfer (late blocks are refused).
#[derive(Debug)]
pub struct TransferGuard {
    transfers: Arc<Transfers>,
    id: String,
}

impl Drop for TransferGuard {
    fn drop(&mut self) {
        self.transfers.lock().remove(&self.id);
    }
}

/// What a finished transfer delivered: the blocks contiguous from block 0.
#[derive(Debug, Default)]
pub struct Received {
    /// Block `i`'s bytes at index `i`.
    pub blocks: Vec<Bytes>,
    /// Their total bytes.
    pub bytes: u64,
    /// When the transfer's first block arrived.
    pub first_block_at: Option<Instant>,
}

impl Transfers {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Incoming>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Expects transfer `id` from `from`, of blocks with `hashes` (the prompt's full blocks) in
    /// `layout`. The registration lasts as long as the returned guard.
    pub fn register(
        self: &Arc<Self>,
        id: String,
        from: NodeId,
        layout: KvLayout,
        hashes: Vec<SequenceHash>,
    ) -> TransferGuard {
        let incoming = Incoming {
            from,
            layout,
            blocks: vec![None; hashes.len()],
            hashes,
            first_block_at: None,
        };
        self.lock().insert(id.clone(), incoming);
        TransferGuard {
            transfers: self.clone(),
            id,
        }
    }

    /// Takes the blocks of `guard`'s transfer received so far, contiguous from block 0, and
    /// forgets the transfer.
    pub fn take(&self, guard: TransferGuard) -> Received {
        let Some(incoming) = self.lock().remove(&guard.id) else {
            return Received::default();
        };
        let blocks: Vec<Bytes> = incoming.blocks.into_iter().map_while(|b| b).collect();
        let bytes = blocks.iter().map(|b| b.len() as u64).sum();
        Received {
            blocks,
            bytes,
            first_block_at: incoming.first_block_at,
        }
    }

    /// Counts `received`'s first `blocks` as handed to a decode worker.
    fn count_handed_off(&self, received: &Received, blocks: usize) {
        let c = &self.counters;
        let bytes: u64 = received
            .blocks
            .iter()
            .take(blocks)
            .map(|b| b.len() as u64)
            .sum();
        c.transfers.inc();
        c.blocks.inc_by(blocks as u64);
        c.bytes.inc_by(bytes);
        if let Some(at) = received.first_block_at {
            c.seconds.inc_by(at.elapsed().as_secs_f64());
        }
    }

    /// Transfers registered and not yet taken.
    pub fn pending(&self) -> usize {
        self.lock().len()
    }

    /// Registers the receiving side's counters and its pending transfers.
    pub fn register_metrics(self: &Arc<Self>, registry: &mut Registry) {
        let c = &self.counters;
        let counters = [
            (
                "kvfleet_disagg_transfers",
                "KV transfers received and handed to a decode worker",
                &c.transfers,
            ),
            (
                "kvfleet_disagg_transfer_blocks",
                "KV blocks received and imported by decode workers",
                &c.blocks,
            ),
            (
                "kvfleet_disagg_transfer_bytes",
                "Bytes of those blocks",
                &c.bytes,
            ),
            (
                "kvfleet_disagg_transfer_refused_blocks",
                "Blocks refused: beyond the prompt, or a sequence hash other than the prompt's",
                &c.refused_blocks,
            ),
            (
                "kvfleet_disagg_transfer_failed_streams",
                "Transfer streams that ended in an error or were cancelled",
                &c.failed_streams,
            ),
        ];
        for (name, help, counter) in counters {
            registry.register(name, help, counter.clone());
        }
        registry.register(
            "kvfleet_disagg_transfer_seconds",
            "Time from a transfer's first block to its hand-off to the decode worker, summed",
            c.seconds.clone(),
        );
        let transfers = Arc::downgrade(self);
        registry.register_collector(crate::metrics::collector("transfers", move |s| {
            let pending = transfers.upgrade().map_or(0, |t| t.pending() as u64);
            s.gauge(
                "kvfleet_disagg_transfers_pending",
                "Transfers expected and not yet handed off",
                pending,
            )
        }));
    }
}

impl BlockSink for Transfers {
    fn expect(&self, peer: &PeerInfo, request_id: &str) -> Option<KvLayout> {
        let inner = self.lock();
        let incoming = inner.get(request_id)?;
        (incoming.from == peer.node_id).then(|| incoming.layout.clone())
    }

    async fn import(&self, request_id: &str, block: KvBlock) -> Result<(), ErrorMessage> {
        let mut inner = self.lock();
        let Some(incoming) = inner.get_mut(request_id) else {
            return Err(ErrorMessage::new(
                ErrorCode::UnknownRequest,
                format!("transfer {request_id} is no longer expected (cancelled or timed out)"),
            ));
        };
        let index = block.index as usize;
        let refuse = |message: String| {
            self.counters.refused_blocks.inc();
            Err(ErrorMessage::new(ErrorCode::ImportFailed, message))
        };
        match incoming.hashes.get(index) {
            None => refuse(format!(
                "block {index} is beyond the prompt's {} full blocks",
                incoming.hashes.len()
            )),
            Some(&expected) if expected != block.hash => refuse(format!(
                "block {index} has sequence hash {:016x}, the prompt's is {:016x}",
                block.hash.0, expected.0
            )),
            Some(_) => {
                incoming.first_block_at.get_or_insert_with(Instant::now);
                incoming.blocks[index] = Some(block.data);
                Ok(())
            }
        }
    }

    fn stream_finished(&self, request_id: &str, outcome: Result<KvDone, ErrorMessage>) {
        if let Err(error) = outcome {
            self.counters.failed_streams.inc();
            tracing::debug!(transfer_id = request_id, code = ?error.code, message = %error.message,
                "a KV transfer stream failed");
        }
    }
}

/// Disaggregated serving on this node: the decode leg's orchestration, the prefill leg's
/// serving, and the transfers in between. See the module docs.
#[derive(Debug)]
pub struct Disagg {
    local: Arc<dyn Backend>,
    peer: PeerHandle,
    transfers: Arc<Transfers>,
    /// Requests decoded here by how their prefill ended (`kvfleet_disagg_prefill_total`).
    outcomes: Family<[(&'static str, &'static str); 1], Counter>,
    prefill_served: Counter,
    next_transfer: AtomicU64,
    options: TransferOptions,
}

/// Converts the peer's token chunk to the backend's event.
pub fn tokens_event(chunk: kvfleet_peer::TokenChunk) -> GenEvent {
    GenEvent::Tokens {
        logprobs: chunk.logprobs.map(|lp| {
            lp.into_iter()
                .map(|l| TokenLogprob {
                    logprob: l.logprob,
                    top: l.top.into_iter().map(|t| (t.token, t.logprob)).collect(),
                })
                .collect()
        }),
        ids: chunk.tokens,
    }
}

/// The backend's end reason for the peer's.
pub fn end_reason(reason: kvfleet_peer::FinishReason) -> EndReason {
    match reason {
        kvfleet_peer::FinishReason::Length => EndReason::Length,
        kvfleet_peer::FinishReason::Stop => EndReason::Stop,
    }
}

/// How the prefill leg went, as the decode leg saw it.
struct PrefillLeg {
    /// The first token(s), already passed to the client.
    tokens: Vec<u32>,
    /// The prefill node's finish, when the leg completed.
    finish: Option<Finish>,
    /// Why it failed, when it did.
    error: Option<String>,
}

impl Disagg {
    /// Disaggregated serving over this node's workers (`local`) and peer endpoint.
    pub fn new(local: Arc<dyn Backend>, peer: PeerHandle) -> Self {
        Self {
            local,
            peer,
            transfers: Arc::new(Transfers::default()),
            outcomes: Family::default(),
            prefill_served: Counter::default(),
            next_transfer: AtomicU64::new(0),
            options: TransferOptions::default(),
        }
    }

    /// The peer endpoint's handle.
    pub fn peer(&self) -> &PeerHandle {
        &self.peer
    }

    /// The block sink the peer endpoint serves transfers into.
    pub fn transfers(&self) -> Arc<Transfers> {
        self.transfers.clone()
    }

    /// Requests whose prefill ended with `outcome` on this node (as the decode node).
    pub fn outcome_count(&self, outcome: PrefillOutcome) -> u64 {
        self.outcomes.get_or_create(&outcome.labels()).get()
    }

    fn count(&self, outcome: PrefillOutcome) {
        self.outcomes.get_or_create(&outcome.labels()).inc();
    }

    /// Runs `request` on this node's decode worker (`request.worker`), its prompt prefilled on
    /// `prefill` first; see the module docs. Falls back to a plain local submit when this node
    /// cannot take a transfer (no peer endpoint yet, no layout for the worker).
    pub fn submit_decode(
        self: &Arc<Self>,
        request: GenerateRequest,
        prefill: PrefillTarget,
        deadline: Duration,
    ) -> Result<Generation, SubmitError> {
        let own = self
            .peer
            .endpoint()
            .map(|e| e.node_id())
            .zip(self.peer.advertised());
        let layout = request.worker.and_then(|w| self.local.kv_layout(w));
        let (Some(decode_worker), Some((own_node, own_addr)), Some(layout)) =
            (request.worker, own, layout)
        else {
            tracing::debug!(request_id = %request.request_id,
                "no transfer possible here (no peer endpoint or worker layout): prefilling locally");
            self.count(PrefillOutcome::FallbackBeforeFirstToken);
            return self.local.submit(request);
        };
        // Unique among this node's transfers, which is where it is looked up.
        let n = self.next_transfer.fetch_add(1, Ordering::Relaxed);
        let transfer_id = format!("{}/{n}", request.request_id);
        let guard = self.transfers.register(
            transfer_id.clone(),
            prefill.node,
            layout.clone(),
            request.block_hashes.clone(),
        );
        let leg_request = kvfleet_peer::GenerateRequest {
            request_id: request.request_id.clone(),
            model: request.model.clone(),
            worker: Some(prefill.worker),
            prompt: request.prompt.clone(),
            block_hashes: request.block_hashes.clone(),
            sampling: kvfleet_proto::SamplingParams {
                max_tokens: 1,
                ..request.sampling.clone()
            },
            prefill: None,
            kv_push: Some(KvPush {
                transfer_id,
                worker: decode_worker,
                node: own_node.0,
                addr: own_addr,
            }),
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let this = self.clone();
        let task = tokio::spawn(async move {
            let leg = this.prefill_leg(&leg_request, prefill, deadline, &tx).await;
            let received = this.transfers.take(guard);
            this.decode_leg(request, leg, received, layout, tx).await;
        });
        let abort = task.abort_handle();
        // The prefill worker answers first (unless its leg fails, then the decode worker does).
        let role = WorkerRole::Prefill;
        Ok(Generation::new(decode_worker, role, rx, move || {
            abort.abort()
        }))
    }

    /// Runs the prefill leg until its finish, its failure or `deadline`, passing its first
    /// token(s) to `tx` as they come.
    async fn prefill_leg(
        &self,
        request: &kvfleet_peer::GenerateRequest,
        prefill: PrefillTarget,
        deadline: Duration,
        tx: &mpsc::UnboundedSender<GenEvent>,
    ) -> PrefillLeg {
        let mut leg = PrefillLeg {
            tokens: Vec::new(),
            finish: None,
            error: None,
        };
        let Some(endpoint) = self.peer.endpoint() else {
            leg.error = Some("this node's peer endpoint is not up".into());
            return leg;
        };
        let until = tokio::time::Instant::now() + deadline;
        let started = tokio::time::timeout(PREFILL_START_TIMEOUT.min(deadline), async {
            let addr = lookup(&prefill.addr).await.map_err(|e| e.to_string())?;
            let connection = endpoint
                .connection(addr, prefill.node)
                .await
                .map_err(|e| e.to_string())?;
            connection
                .generate(request)
                .await
                .map_err(|e| e.to_string())
        })
        .await;
        let mut stream = match started {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => {
                leg.error = Some(e);
                return leg;
            }
            Err(_) => {
                leg.error = Some(format!(
                    "no answer within {:?}",
                    PREFILL_START_TIMEOUT.min(deadline)
                ));
                return leg;
            }
        };
        loop {
            match tokio::time::timeout_at(until, stream.next()).await {
                Ok(Ok(Some(GenerateEvent::Tokens(chunk)))) => {
                    // More tokens than the leg asked for never reach the client (they could
                    // pass its max_tokens); the decode worker continues from what was asked.
                    let asked = request.sampling.max_tokens as usize;
                    if leg.tokens.len().saturating_add(chunk.tokens.len()) > asked {
                        leg.error = Some(format!(
                            "the prefill node sent more than the {asked} token(s) asked for"
                        ));
                        return leg;
                    }
                    leg.tokens.extend_from_slice(&chunk.tokens);
                    let _ = tx.send(tokens_event(chunk));
                }
                Ok(Ok(Some(GenerateEvent::Finished(finish)))) => {
                    leg.finish = Some(finish);
                    return leg;
                }
                Ok(Ok(None)) => {
                    leg.error = Some("the prefill node ended the stream early".into());
                    return leg;
                }
                Ok(Err(e)) => {
                    leg.error = Some(e.to_string());
                    return leg;
                }
                Err(_) => {
                    leg.error = Some(format!("the prefill leg took longer than {deadline:?}"));
                    return leg;
                }
            }
        }
    }

    /// Finishes the request after its prefill leg: ends it when the first token ended it,
    /// otherwise decodes on the local worker from the prompt plus the first token with the
    /// blocks received (or the whole prompt when the leg produced nothing).
    async fn decode_leg(
        &self,
        request: GenerateRequest,
        leg: PrefillLeg,
        received: Received,
        layout: KvLayout,
        tx: mpsc::UnboundedSender<GenEvent>,
    ) {
        let request_id = request.request_id.clone();
        if leg.tokens.is_empty() {
            self.count(PrefillOutcome::FallbackBeforeFirstToken);
            tracing::warn!(request_id = %request_id, error = leg.error.as_deref().unwrap_or(""),
                "prefill leg failed before its first token: the decode worker prefills the prompt");
            return pipe(self.local.submit(request), tx).await;
        }
        if let Some(finish) = &leg.finish
            && finish.reason == kvfleet_peer::FinishReason::Stop
        {
            self.count(PrefillOutcome::Remote);
            let _ = tx.send(GenEvent::Finished(EndReason::Stop));
            return;
        }
        // The prefill node's finish, which says Stop, comes only after its transfer: a leg that
        // failed in between must not decode past a stop token it already streamed. (The model's
        // EOS is known to the workers only, so it cannot be checked here.)
        if leg.finish.is_none()
            && leg
                .tokens
                .last()
                .is_some_and(|t| request.sampling.stop_token_ids.contains(t))
        {
            self.count(PrefillOutcome::FallbackAfterFirstToken);
            let _ = tx.send(GenEvent::Finished(EndReason::Stop));
            return;
        }
        let generated = u32::try_from(leg.tokens.len()).unwrap_or(u32::MAX);
        if generated >= request.sampling.max_tokens {
            self.count(PrefillOutcome::Remote);
            let _ = tx.send(GenEvent::Finished(EndReason::Length));
            return;
        }
        let usable = match (&leg.finish, &leg.error) {
            (Some(finish), _) => {
                // Only what the prefill node saw acknowledged is known complete.
                let acknowledged = finish.kv_push.map_or(0, |r| r.blocks as usize);
                let usable = received.blocks.len().min(acknowledged);
                self.count(if usable > 0 || request.block_hashes.is_empty() {
                    PrefillOutcome::Remote
                } else {
                    PrefillOutcome::FallbackAfterFirstToken
                });
                usable
            }
            (None, error) => {
                self.count(PrefillOutcome::FallbackAfterFirstToken);
                tracing::warn!(request_id = %request_id, blocks = received.blocks.len(),
                    error = error.as_deref().unwrap_or(""),
                    "prefill leg failed after its first token: decoding with the blocks received");
                received.blocks.len()
            }
        };
        self.transfers.count_handed_off(&received, usable);
        let mut blocks = received.blocks;
        blocks.truncate(usable);
        let mut prompt = request.prompt;
        prompt.extend_from_slice(&leg.tokens);
        let block_hashes = kvfleet_proto::hash::sequence_hashes(&prompt, layout.block_size);
        let decode = GenerateRequest {
            request_id: request.request_id,
            model: request.model,
            block_hashes,
            prompt,
            sampling: kvfleet_proto::SamplingParams {
                max_tokens: request.sampling.max_tokens - generated,
                ..request.sampling
            },
            worker: request.worker,
        };
        tracing::debug!(request_id = %request_id, blocks = blocks.len(),
            "decoding with the prefill node's KV blocks");
        pipe(self.local.submit_with_kv(decode, blocks), tx).await;
    }

    /// Serves the prefill leg of a disaggregated request on this node (a peer asked, with
    /// `kv_push`): runs the prompt on the named prefill worker, streams its first token back,
    /// pushes its KV blocks to the decode node as they are computed, and finishes with what the
    /// decode node acknowledged.
    pub fn serve_prefill(
        self: &Arc<Self>,
        request: kvfleet_peer::GenerateRequest,
        push: KvPush,
    ) -> Result<EventStream, ErrorMessage> {
        let unavailable = |m: String| ErrorMessage::new(ErrorCode::Unavailable, m);
        let endpoint = self
            .peer
            .endpoint()
            .ok_or_else(|| unavailable("this node's peer endpoint is not up".into()))?;
        let worker = request
            .worker
            .ok_or_else(|| ErrorMessage::new(ErrorCode::BadRequest, "kv_push names no worker"))?;
        let layout = self
            .local
            .kv_layout(worker)
            .ok_or_else(|| unavailable(format!("worker {worker} is not ready here")))?;
        let prompt_tokens = u32::try_from(request.prompt.len()).unwrap_or(u32::MAX);
        let (generation, blocks) = self
            .local
            .submit_prefill(GenerateRequest {
                request_id: request.request_id.clone(),
                model: request.model,
                prompt: request.prompt,
                block_hashes: request.block_hashes,
                sampling: request.sampling,
                worker: Some(worker),
            })
            .map_err(|e| unavailable(e.to_string()))?;
        self.prefill_served.inc();
        let (report_tx, report_rx) = oneshot::channel();
        let options = self.options.clone();
        let request_id = request.request_id;
        let transfer = tokio::spawn(async move {
            let source = block_stream(blocks);
            let sent = async {
                let addr = lookup(&push.addr).await.map_err(|e| e.to_string())?;
                let connection = endpoint
                    .connection(addr, NodeId(push.node))
                    .await
                    .map_err(|e| e.to_string())?;
                connection
                    .send_blocks(&push.transfer_id, &layout, source, &options)
                    .await
                    .map_err(|e| e.to_string())
            }
            .await;
            let report = match sent {
                Ok(report) => KvPushReport {
                    blocks: u32::try_from(report.blocks).unwrap_or(u32::MAX),
                    bytes: report.bytes,
                },
                Err(e) => {
                    tracing::warn!(request_id = %request_id, error = %e,
                        "pushing KV blocks to the decode node failed");
                    KvPushReport::default()
                }
            };
            let _ = report_tx.send(report);
        });
        let state = PrefillStream {
            generation,
            _transfer: AbortOnDrop(transfer),
            report: Some(report_rx),
            completion: 0,
            ended: false,
        };
        let stream = futures_util::stream::unfold(state, move |mut s| async move {
            if s.ended {
                return None;
            }
            let item = match s.generation.events.recv().await {
                Some(GenEvent::Tokens { ids, logprobs }) => {
                    s.completion += u32::try_from(ids.len()).unwrap_or(u32::MAX);
                    let logprobs = logprobs.map(|lp| crate::peer::logprobs(lp, &ids));
                    return Some((
                        Ok(GenerateEvent::Tokens(kvfleet_peer::TokenChunk {
                            tokens: ids,
                            logprobs,
                        })),
                        s,
                    ));
                }
                Some(GenEvent::Finished(reason)) => {
                    s.generation.done();
                    // A stop ends the request: say so at once, the blocks are not needed.
                    // Otherwise the transfer ends once the worker sent its last block (at the
                    // finish), and the decode node needs to know how many arrived.
                    let report = match (reason, s.report.take()) {
                        (EndReason::Stop, _) => None,
                        (_, Some(rx)) => Some(rx.await.unwrap_or_default()),
                        (_, None) => Some(KvPushReport::default()),
                    };
                    Ok(GenerateEvent::Finished(Finish {
                        reason: crate::peer::finish_reason(reason),
                        usage: Usage {
                            prompt_tokens,
                            completion_tokens: s.completion,
                            cached_tokens: 0,
                        },
                        kv_push: report,
                    }))
                }
                Some(GenEvent::Failed(message)) => {
                    s.generation.done();
                    Err(ErrorMessage::new(ErrorCode::Internal, message))
                }
                None => Err(ErrorMessage::new(
                    ErrorCode::Internal,
                    "the prefill worker went away mid-request",
                )),
            };
            s.ended = true;
            Some((item, s))
        });
        Ok(stream.boxed())
    }

    /// Registers disaggregated serving's counters: outcomes, prefill legs served, transfers.
    pub fn register_metrics(&self, registry: &mut Registry) {
        // Every outcome from the start, so a dashboard sees zeros rather than nothing.
        for outcome in PrefillOutcome::ALL {
            let _ = self.outcomes.get_or_create(&outcome.labels());
        }
        registry.register(
            "kvfleet_disagg_prefill",
            "Disaggregated requests decoded here, by how their prefill ended",
            self.outcomes.clone(),
        );
        registry.register(
            "kvfleet_disagg_prefill_served",
            "Prefill legs this node's prefill workers ran for other nodes' decode workers",
            self.prefill_served.clone(),
        );
        self.transfers.register_metrics(registry);
    }
}

/// The prefill leg's event stream state; dropping it cancels the worker's sequence (the
/// generation) and the transfer.
struct PrefillStream {
    generation: Generation,
    /// Held for its drop: the transfer ends with the stream.
    _transfer: AbortOnDrop,
    report: Option<oneshot::Receiver<KvPushReport>>,
    completion: u32,
    ended: bool,
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The prefill worker's exported blocks as the transfer's source.
fn block_stream(
    blocks: mpsc::UnboundedReceiver<crate::backend::ExportedBlock>,
) -> impl futures_util::Stream<Item = KvBlock> + Send + Unpin {
    Box::pin(futures_util::stream::unfold(blocks, |mut rx| async move {
        let block = rx.recv().await?;
        let block = KvBlock {
            index: block.index,
            hash: block.hash,
            data: block.data,
        };
        Some((block, rx))
    }))
}

/// Resolves `host:port`: a literal address at once, a name through the system resolver on
/// tokio's blocking pool (never on the request path's threads).
pub async fn lookup(addr: &str) -> Result<SocketAddr, String> {
    if let Ok(literal) = addr.parse() {
        return Ok(literal);
    }
    tokio::net::lookup_host(addr)
        .await
        .map_err(|e| format!("cannot resolve {addr:?}: {e}"))?
        .next()
        .ok_or_else(|| format!("{addr:?} resolves to no address"))
}

/// Passes a local generation's events to `tx` until its end.
pub(crate) async fn pipe(
    submitted: Result<Generation, SubmitError>,
    tx: mpsc::UnboundedSender<GenEvent>,
) {
    match submitted {
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
            let _ = tx.send(GenEvent::Failed("the decode worker went away".into()));
        }
        Err(e) => {
            let _ = tx.send(GenEvent::Failed(e.to_string()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvfleet_proto::{BlockSize, KvDtype};

    fn layout() -> KvLayout {
        KvLayout {
            model: "m".into(),
            layers: 2,
            kv_heads: 1,
            head_dim: 4,
            dtype: KvDtype::F32,
            block_size: BlockSize::new(4).unwrap(),
        }
    }

    fn peer(node: NodeId) -> PeerInfo {
        PeerInfo {
            node_id: node,
            serial: "01".into(),
            addr: "127.0.0.1:1".parse().unwrap(),
        }
    }

    fn block(index: u32, hash: u64) -> KvBlock {
        KvBlock {
            index,
            hash: SequenceHash(hash),
            data: Bytes::from(vec![index as u8; layout().block_bytes()]),
        }
    }

    #[tokio::test]
    async fn a_transfer_takes_only_its_prompts_blocks_from_its_prefill_node() {
        let transfers = Arc::new(Transfers::default());
        let prefill = NodeId::from_uuid(uuid::Uuid::from_u128(1));
        let stranger = NodeId::from_uuid(uuid::Uuid::from_u128(2));
        let hashes = vec![SequenceHash(10), SequenceHash(11), SequenceHash(12)];
        let guard = transfers.register("t".into(), prefill, layout(), hashes);

        assert_eq!(transfers.expect(&peer(prefill), "t"), Some(layout()));
        assert_eq!(transfers.expect(&peer(stranger), "t"), None, "another node");
        assert_eq!(
            transfers.expect(&peer(prefill), "other"),
            None,
            "unknown id"
        );

        // Out of order across streams is fine; what is kept is contiguous from block 0.
        transfers.import("t", block(1, 11)).await.unwrap();
        transfers.import("t", block(0, 10)).await.unwrap();
        let wrong_hash = transfers.import("t", block(2, 99)).await.unwrap_err();
        assert_eq!(wrong_hash.code, ErrorCode::ImportFailed);
        let beyond = transfers.import("t", block(3, 13)).await.unwrap_err();
        assert_eq!(beyond.code, ErrorCode::ImportFailed);
        let unknown = transfers.import("nope", block(0, 10)).await.unwrap_err();
        assert_eq!(unknown.code, ErrorCode::UnknownRequest);
        transfers.stream_finished("t", Err(ErrorMessage::new(ErrorCode::Truncated, "cut")));

        let received = transfers.take(guard);
        assert_eq!(received.blocks.len(), 2);
        assert_eq!(received.blocks[1][0], 1);
        assert_eq!(received.bytes, 2 * layout().block_bytes() as u64);
        assert_eq!(transfers.pending(), 0);
        // Counted only once handed to the decode worker, and only what it got.
        transfers.count_handed_off(&received, 1);
        let mut registry = Registry::default();
        transfers.register_metrics(&mut registry);
        let text = crate::metrics::encode(&registry);
        assert!(
            text.contains("kvfleet_disagg_transfer_refused_blocks_total 2"),
            "{text}"
        );
        assert!(
            text.contains("kvfleet_disagg_transfer_failed_streams_total 1"),
            "{text}"
        );
        assert!(
            text.contains("kvfleet_disagg_transfer_blocks_total 1"),
            "{text}"
        );
        assert!(text.contains("kvfleet_disagg_transfers_total 1"), "{text}");
    }

    #[tokio::test]
    async fn a_dropped_registration_refuses_late_blocks() {
        let transfers = Arc::new(Transfers::default());
        let node = NodeId::from_uuid(uuid::Uuid::from_u128(1));
        let guard = transfers.register("t".into(), node, layout(), vec![SequenceHash(10)]);
        drop(guard);
        assert_eq!(transfers.pending(), 0);
        assert_eq!(transfers.expect(&peer(node), "t"), None);
        let late = transfers.import("t", block(0, 10)).await.unwrap_err();
        assert_eq!(late.code, ErrorCode::UnknownRequest);
    }

    /// A backend that records what it was given and ends every generation at once.
    #[derive(Debug, Default)]
    struct Recorder {
        submitted: Mutex<Vec<GenerateRequest>>,
    }

    impl Backend for Recorder {
        fn submit(&self, request: GenerateRequest) -> Result<Generation, SubmitError> {
            self.submitted.lock().unwrap().push(request);
            let (tx, rx) = mpsc::unbounded_channel();
            tx.send(GenEvent::Finished(EndReason::Length)).unwrap();
            Ok(Generation::new(WorkerId(1), WorkerRole::Decode, rx, || {}))
        }

        fn workers(&self) -> Vec<crate::backend::WorkerStatus> {
            Vec::new()
        }
    }

    fn failed_leg(first: u32) -> PrefillLeg {
        PrefillLeg {
            tokens: vec![first],
            finish: None,
            error: Some("the prefill node went away".into()),
        }
    }

    #[tokio::test]
    async fn a_leg_failing_after_a_stop_token_ends_the_request_there() {
        let recorder = Arc::new(Recorder::default());
        let disagg = Disagg::new(recorder.clone(), PeerHandle::default());
        let request = GenerateRequest {
            request_id: "r".into(),
            model: "m".into(),
            prompt: (1..=9).collect(),
            block_hashes: Vec::new(),
            sampling: kvfleet_proto::SamplingParams {
                stop_token_ids: vec![7],
                ..kvfleet_proto::SamplingParams::greedy(5)
            },
            worker: Some(kvfleet_proto::WorkerId(1)),
        };

        // The first token was the stop token: nothing more is decoded.
        let (tx, mut rx) = mpsc::unbounded_channel();
        let leg = failed_leg(7);
        let received = Received::default();
        disagg
            .decode_leg(request.clone(), leg, received, layout(), tx)
            .await;
        assert_eq!(rx.recv().await, Some(GenEvent::Finished(EndReason::Stop)));
        assert!(recorder.submitted.lock().unwrap().is_empty());

        // Any other first token: the decode worker continues from prompt + that token.
        let (tx, mut rx) = mpsc::unbounded_channel();
        let leg = failed_leg(8);
        let received = Received::default();
        disagg
            .decode_leg(request, leg, received, layout(), tx)
            .await;
        assert_eq!(rx.recv().await, Some(GenEvent::Finished(EndReason::Length)));
        let submitted = recorder.submitted.lock().unwrap();
        assert_eq!(submitted.len(), 1);
        assert_eq!(submitted[0].prompt.last(), Some(&8));
        assert_eq!(submitted[0].sampling.max_tokens, 4);
        assert_eq!(
            disagg.outcome_count(PrefillOutcome::FallbackAfterFirstToken),
            2
        );
    }
}
