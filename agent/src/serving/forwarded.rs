//! What other nodes forward here, served through the peer endpoint ([`Forwarded`] is its
//! [`GenerateHandler`]):
//!
//! - a whole request: submitted to this node's workers exactly as a local request is;
//! - a decode leg (`prefill` set): served by the driver like a local disaggregated request,
//!   the prefill leg asked of the node the plan names;
//! - a prefill leg (`kv_push` set): the prompt on the named prefill worker for one token, its KV
//!   blocks pushed to the decode node as they are computed, the finish reporting what the
//!   decode node acknowledged.
//!
//! Every kind answers with one [`event_stream`] of the generation's events; dropping it (the
//! peer cancelled, or its connection died) drops the generation, which cancels the sequence in
//! the worker (and, for a prefill leg, the transfer).

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt as _;
use kvfleet_peer::{
    ErrorCode, ErrorMessage, EventStream, Finish, GenerateEvent, GenerateHandler, GenerateRequest,
    KvBlock, KvPush, KvPushReport, PeerInfo, Usage,
};
use kvfleet_proto::NodeId;
use kvfleet_serving::PrefillPick;
use tokio::sync::{mpsc, oneshot};

use super::driver::Driver;
use super::{Serving, decode_leg_plan, lookup};
use crate::backend::{self, ExportedBlock, FinishReason, GenEvent, Generation, SubmitError};

/// Serves forwarded generate requests on this node; see the module docs.
#[derive(Debug, Clone)]
pub struct Forwarded {
    serving: Arc<Serving>,
    /// Resumed (migrated) requests running here, by the asking node and request id: a second
    /// resume of one of them while it runs is refused (and counted), never run twice.
    resuming: Arc<std::sync::Mutex<std::collections::HashSet<(NodeId, String)>>>,
}

impl Forwarded {
    /// A handler serving through `serving`.
    pub fn new(serving: Arc<Serving>) -> Self {
        Self {
            serving,
            resuming: Arc::default(),
        }
    }

    /// Registers a resumed request from `peer`; `None` when it already runs here.
    fn resume(&self, peer: NodeId, request_id: &str) -> Option<ResumeGuard> {
        let key = (peer, request_id.to_owned());
        let mut resuming = self.resuming.lock().unwrap_or_else(|e| e.into_inner());
        resuming.insert(key.clone()).then(|| ResumeGuard {
            resuming: self.resuming.clone(),
            key,
        })
    }
}

/// A resumed request's place in [`Forwarded`]'s set, given up when its stream ends.
struct ResumeGuard {
    resuming: Arc<std::sync::Mutex<std::collections::HashSet<(NodeId, String)>>>,
    key: (NodeId, String),
}

impl Drop for ResumeGuard {
    fn drop(&mut self) {
        let mut resuming = self.resuming.lock().unwrap_or_else(|e| e.into_inner());
        resuming.remove(&self.key);
    }
}

impl GenerateHandler for Forwarded {
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
            return prefill_leg(&self.serving, request, push);
        }
        // A decode leg's plan is checked before anything is allocated for it (an admission
        // slot, a transfer's buffers).
        if request.prefill.is_some() {
            check_decode_leg(&self.serving, peer, &request)?;
        }
        // A resumed request (it carries tokens it generated elsewhere) runs here once at a time.
        let guard = match request.sampling.generated_in_prompt {
            0 => None,
            _ => match self.resume(peer.node_id, &request.request_id) {
                Some(guard) => Some(guard),
                None => {
                    self.serving.refused_legs.inc();
                    tracing::warn!(request_id = %request.request_id, from = %peer.node_id,
                        "refused: this request is already being resumed here");
                    return Err(ErrorMessage::new(
                        ErrorCode::Unavailable,
                        format!(
                            "request {} is already being resumed here",
                            request.request_id
                        ),
                    ));
                }
            },
        };
        // A whole request or a decode leg takes one of this node's admission slots, as a local
        // request would; a full queue answers `Overloaded` before anything is submitted (the
        // asking node then serves it elsewhere). Prefill legs take one too, without queueing
        // (`prefill_leg`).
        let slot = self.serving.admit().await.map_err(refusal)?;
        let plan = request
            .prefill
            .as_ref()
            .zip(request.worker)
            .map(|(plan, worker)| {
                let prefill = PrefillPick {
                    worker: plan.worker,
                    node: NodeId(plan.node),
                    addr: plan.addr.clone(),
                    hold: None,
                };
                // Bounded by this node's config, whatever the plan asks: the transfer's buffers
                // live no longer than this.
                let deadline = Duration::from_millis(u64::from(plan.timeout_ms))
                    .min(self.serving.max_prefill_deadline);
                decode_leg_plan(worker, prefill, deadline)
            });
        let local = backend::GenerateRequest {
            request_id: request.request_id,
            model: request.model,
            prompt: request.prompt,
            block_hashes: request.block_hashes,
            sampling: request.sampling,
            worker: request.worker,
        };
        let submitted = match plan {
            Some(plan) => Driver::start(self.serving.clone(), None, local, plan),
            None => self.serving.local.submit(local),
        };
        let generation = submitted.map_err(|e| match e {
            SubmitError::NoReadyWorker(_) => {
                ErrorMessage::new(ErrorCode::Unavailable, e.to_string())
            }
            SubmitError::WorkerGone(_) | SubmitError::Unsupported | SubmitError::Invalid(_) => {
                ErrorMessage::new(ErrorCode::Internal, e.to_string())
            }
        })?;
        let events = event_stream(generation, prompt_tokens, None);
        Ok(match (guard, slot) {
            (None, None) => events,
            // The guard and the slot live as long as the stream.
            (guard, slot) => events
                .map(move |event| {
                    let _ = (&guard, &slot);
                    event
                })
                .boxed(),
        })
    }
}

/// Refuses a decode leg whose block hashes are not this node's hashes of its own prompt (with
/// the decode worker's block size): a peer must not have blocks imported here under the hashes
/// of a prefix it was not asked to compute. The transfer's slots are this node's hashes anyway
/// (the driver computes them); this check says so to the sender, and counts it, before any
/// slot or buffer is taken. A resumed request carries its original prompt's hashes, a prefix
/// of its longer prompt's. Skipped when the worker's layout is not known yet: the submission
/// fails then anyway.
fn check_decode_leg(
    serving: &Serving,
    peer: &PeerInfo,
    request: &GenerateRequest,
) -> Result<(), ErrorMessage> {
    let Some(layout) = request.worker.and_then(|w| serving.local.kv_layout(w)) else {
        return Ok(());
    };
    let ours = serving.hashes(&request.prompt, &request.sampling, layout.block_size);
    let theirs = &request.block_hashes;
    let mismatch = match ours.get(..theirs.len()) {
        None => Some(format!(
            "{} block hashes for a prompt of {} full blocks",
            theirs.len(),
            ours.len()
        )),
        Some(prefix) => prefix
            .iter()
            .zip(theirs)
            .position(|(a, b)| a != b)
            .map(|i| format!("block {i}'s hash is not this node's hash of the prompt's tokens")),
    };
    let Some(reason) = mismatch else {
        return Ok(());
    };
    serving.count_peer_refusal(kvfleet_peer::ErrorKind::HashMismatch);
    tracing::warn!(request_id = %request.request_id, from = %peer.node_id, %reason,
        "refused a decode leg: its block hashes are not its prompt's");
    Err(ErrorMessage::new(
        ErrorCode::BadRequest,
        format!("refused: {reason}"),
    ))
}

/// An admission refusal as the peer protocol's: a full node is `Overloaded` (the asking node
/// goes elsewhere), anything else `Unavailable`.
fn refusal(e: crate::frontend::api::ApiError) -> ErrorMessage {
    let code = if e.status.as_u16() == 429 {
        ErrorCode::Overloaded
    } else {
        ErrorCode::Unavailable
    };
    ErrorMessage::new(code, e.message)
}

/// Serves the prefill leg of a disaggregated request (a peer asked, with `kv_push`): runs the
/// prompt on the named prefill worker, streams its first token back, pushes its KV blocks to
/// the decode node as they are computed, and finishes with what the decode node acknowledged.
///
/// The leg holds one of this node's admission slots while it runs, taken only if one is free
/// at once: a full node answers `Overloaded` and the decode node prefills the prompt itself.
fn prefill_leg(
    serving: &Arc<Serving>,
    request: GenerateRequest,
    push: KvPush,
) -> Result<EventStream, ErrorMessage> {
    let unavailable = |m: String| ErrorMessage::new(ErrorCode::Unavailable, m);
    let slot = serving.admit_prefill_leg().map_err(refusal)?;
    let endpoint = serving
        .peer
        .endpoint()
        .ok_or_else(|| unavailable("this node's peer endpoint is not up".into()))?;
    let worker = request
        .worker
        .ok_or_else(|| ErrorMessage::new(ErrorCode::BadRequest, "kv_push names no worker"))?;
    let layout = serving
        .local
        .kv_layout(worker)
        .ok_or_else(|| unavailable(format!("worker {worker} is not ready here")))?;
    let prompt_tokens = u32::try_from(request.prompt.len()).unwrap_or(u32::MAX);
    // No more streams than the prompt has full blocks to send: the transfer opens its streams
    // before the worker computes a block, and holds them until the last, so a burst of short
    // prompts would otherwise fill the decode node's per-peer stream limit with idle streams,
    // and it would refuse the next transfers and forwards from this node (Overloaded).
    let mut options = serving.options.clone();
    options.streams = options
        .streams
        .min(request.prompt.len() / layout.block_size.tokens())
        .max(1);
    let (generation, blocks) = serving
        .local
        .submit_prefill(backend::GenerateRequest {
            request_id: request.request_id.clone(),
            model: request.model,
            prompt: request.prompt,
            block_hashes: request.block_hashes,
            sampling: request.sampling,
            worker: Some(worker),
        })
        .map_err(|e| unavailable(e.to_string()))?;
    serving.prefill_served.inc();
    let (report_tx, report_rx) = oneshot::channel();
    let request_id = request.request_id;
    let transfer = tokio::spawn(async move {
        let source = block_stream(blocks);
        let sent = async {
            let addr = lookup(&push.addr).await?;
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
    let push = Push {
        report: report_rx,
        _transfer: AbortOnDrop(transfer),
    };
    let events = event_stream(generation, prompt_tokens, Some(push));
    Ok(match slot {
        None => events,
        // The slot lives as long as the stream.
        Some(slot) => events
            .map(move |event| {
                let _ = &slot;
                event
            })
            .boxed(),
    })
}

/// A prefill leg's transfer: its report, and the task pushing the blocks (aborted with the
/// stream).
struct Push {
    report: oneshot::Receiver<KvPushReport>,
    _transfer: AbortOnDrop,
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The generation's events as the peer protocol's: token chunks as they are, then the finish
/// with the usage (and for a prefill leg, once its transfer ended, the blocks the decode node
/// acknowledged) or the failure. Dropping the stream drops the generation (and the push).
fn event_stream(generation: Generation, prompt_tokens: u32, push: Option<Push>) -> EventStream {
    struct State {
        generation: Generation,
        push: Option<Push>,
        completion: u32,
        ended: bool,
    }
    let state = State {
        generation,
        push,
        completion: 0,
        ended: false,
    };
    let stream = futures_util::stream::unfold(state, move |mut s| async move {
        if s.ended {
            return None;
        }
        let item = match s.generation.next().await {
            Some(GenEvent::Tokens(chunk)) => {
                let n = u32::try_from(chunk.tokens.len()).unwrap_or(u32::MAX);
                s.completion = s.completion.saturating_add(n);
                return Some((Ok(GenerateEvent::Tokens(chunk)), s));
            }
            Some(GenEvent::Finished(reason)) => {
                // A stop ends the request: say so at once, the blocks are not needed.
                // Otherwise a prefill leg's transfer ends once the worker sent its last block
                // (at the finish), and the decode node needs to know how many arrived.
                let kv_push = match (reason, s.push.take()) {
                    (FinishReason::Stop, _) | (_, None) => None,
                    (_, Some(push)) => Some(push.report.await.unwrap_or_default()),
                };
                Ok(GenerateEvent::Finished(Finish {
                    reason,
                    usage: Usage {
                        prompt_tokens,
                        completion_tokens: s.completion,
                        cached_tokens: 0,
                    },
                    kv_push,
                }))
            }
            Some(GenEvent::Failed(message)) => Err(ErrorMessage::new(ErrorCode::Internal, message)),
            // The worker here went away: the asking node resumes the request elsewhere.
            Some(GenEvent::Lost(message)) => {
                Err(ErrorMessage::new(ErrorCode::Unavailable, message))
            }
            None => Err(ErrorMessage::new(
                ErrorCode::Unavailable,
                "the worker went away mid-request",
            )),
        };
        s.ended = true;
        Some((item, s))
    });
    stream.boxed()
}

/// The prefill worker's exported blocks as the transfer's source.
fn block_stream(
    blocks: mpsc::UnboundedReceiver<ExportedBlock>,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peer::PeerHandle;

    #[derive(Debug)]
    struct Nothing;

    impl crate::backend::Backend for Nothing {
        fn submit(
            &self,
            request: crate::backend::GenerateRequest,
        ) -> Result<Generation, SubmitError> {
            Err(SubmitError::NoReadyWorker(request.model))
        }

        fn workers(&self) -> Vec<crate::backend::WorkerStatus> {
            Vec::new()
        }
    }

    /// A backend whose workers have a KV layout (block size 4) but never run anything.
    #[derive(Debug)]
    struct Laid;

    impl crate::backend::Backend for Laid {
        fn submit(
            &self,
            request: crate::backend::GenerateRequest,
        ) -> Result<Generation, SubmitError> {
            Err(SubmitError::NoReadyWorker(request.model))
        }

        fn workers(&self) -> Vec<crate::backend::WorkerStatus> {
            Vec::new()
        }

        fn kv_layout(&self, _: kvfleet_proto::WorkerId) -> Option<kvfleet_proto::KvLayout> {
            Some(kvfleet_proto::KvLayout {
                model: "m".into(),
                layers: 1,
                kv_heads: 1,
                head_dim: 4,
                dtype: kvfleet_proto::KvDtype::F16,
                block_size: kvfleet_proto::BlockSize::new(4).unwrap(),
            })
        }
    }

    /// A decode leg whose block hashes are another prompt's (or more than its prompt has) is
    /// refused as a bad request before admission or any transfer; its own hashes, or a prefix
    /// of them (a resumed request's), pass.
    #[tokio::test]
    async fn a_decode_leg_under_another_prompts_hashes_is_refused() {
        let serving = Arc::new(Serving::new(Arc::new(Laid), PeerHandle::default()));
        let forwarded = Forwarded::new(serving);
        let bs = kvfleet_proto::BlockSize::new(4).unwrap();
        let prompt: Vec<u32> = (0..10).collect();
        let ours = kvfleet_proto::hash::sequence_hashes(&prompt, bs);
        assert_eq!(ours.len(), 2);
        let leg = |block_hashes| GenerateRequest {
            request_id: "chatcmpl-1".into(),
            model: "m".into(),
            worker: Some(kvfleet_proto::WorkerId(3)),
            prompt: prompt.clone(),
            block_hashes,
            sampling: kvfleet_proto::SamplingParams::greedy(4),
            prefill: Some(kvfleet_peer::PrefillPlan {
                worker: kvfleet_proto::WorkerId(9),
                node: uuid::Uuid::from_u128(9),
                addr: "127.0.0.1:1".into(),
                timeout_ms: 1000,
            }),
            kv_push: None,
        };
        let peer = PeerInfo {
            node_id: NodeId(uuid::Uuid::from_u128(1)),
            serial: "01".into(),
            addr: "127.0.0.1:2".parse().unwrap(),
        };
        let mut longer = ours.clone();
        longer.push(kvfleet_proto::SequenceHash(7));
        let hostile = [
            kvfleet_proto::hash::sequence_hashes(&[5; 10], bs),
            vec![ours[0], kvfleet_proto::SequenceHash(7)],
            longer,
        ];
        for hashes in hostile {
            let Err(error) = forwarded.generate(&peer, leg(hashes.clone())).await else {
                panic!("{hashes:?} accepted");
            };
            assert_eq!(error.code, ErrorCode::BadRequest, "{}", error.message);
        }
        for hashes in [ours.clone(), ours[..1].to_vec(), Vec::new()] {
            if let Err(error) = forwarded.generate(&peer, leg(hashes)).await {
                assert_ne!(error.code, ErrorCode::BadRequest, "{}", error.message);
            }
        }

        // A salted leg is checked against this node's salted hashes, under its fleet key: the
        // unsalted (or unkeyed) hashes of the same tokens are another prompt's.
        let fleet = crate::fleet_hash::FleetHasher::default();
        fleet
            .set(Some(kvfleet_proto::hash::FleetHashSecret(
                "the fleet's secret, 32 bytes....".into(),
            )))
            .unwrap();
        let serving = Arc::new(
            Serving::new(Arc::new(Laid), PeerHandle::default()).with_block_hasher(fleet.clone()),
        );
        let forwarded = Forwarded::new(serving);
        let salted_leg = |block_hashes| GenerateRequest {
            sampling: kvfleet_proto::SamplingParams {
                cache_salt: Some("tenant-a".into()),
                ..kvfleet_proto::SamplingParams::greedy(4)
            },
            ..leg(block_hashes)
        };
        let salted = fleet
            .get()
            .salted(Some("tenant-a"))
            .sequence_hashes(&prompt, bs);
        let unkeyed = kvfleet_proto::hash::BlockHasher::UNKEYED
            .salted(Some("tenant-a"))
            .sequence_hashes(&prompt, bs);
        let other = fleet
            .get()
            .salted(Some("tenant-b"))
            .sequence_hashes(&prompt, bs);
        for hashes in [ours.clone(), unkeyed, other] {
            let Err(error) = forwarded.generate(&peer, salted_leg(hashes.clone())).await else {
                panic!("{hashes:?} accepted");
            };
            assert_eq!(error.code, ErrorCode::BadRequest, "{}", error.message);
        }
        if let Err(error) = forwarded.generate(&peer, salted_leg(salted)).await {
            assert_ne!(error.code, ErrorCode::BadRequest, "{}", error.message);
        }
    }

    #[test]
    fn a_request_is_resumed_here_once_at_a_time_per_asking_node() {
        let serving = Arc::new(Serving::new(Arc::new(Nothing), PeerHandle::default()));
        let forwarded = Forwarded::new(serving);
        let (a, b) = (
            NodeId(uuid::Uuid::from_u128(1)),
            NodeId(uuid::Uuid::from_u128(2)),
        );
        let first = forwarded.resume(a, "chatcmpl-1");
        assert!(first.is_some());
        assert!(
            forwarded.resume(a, "chatcmpl-1").is_none(),
            "twice: refused"
        );
        assert!(
            forwarded.resume(b, "chatcmpl-1").is_some(),
            "another node's id"
        );
        assert!(forwarded.resume(a, "chatcmpl-2").is_some());
        drop(first);
        assert!(forwarded.resume(a, "chatcmpl-1").is_some(), "once it ended");
    }
}
