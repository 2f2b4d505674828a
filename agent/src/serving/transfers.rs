//! The KV transfers this node expects as the decode side of disaggregated requests: the peer
//! endpoint's [`BlockSink`]. A transfer is accepted only from the prefill node it was
//! registered for, with the decode worker's layout, and only blocks whose index and sequence
//! hash match the prompt's; every refusal is counted by the peer metrics. Memory per transfer is
//! bounded by the prompt's full blocks, and memory per sending node by
//! `[peer] max_buffered_mib_per_peer` over all its transfers together.
//!
//! The hashes a transfer expects are the ones this node computed from the request's own tokens
//! (the driver registers them), never hashes a peer sent: a peer can only fill the slots of a
//! prompt this node asked it to prefill. Buffered blocks remember the node they came from, and
//! when that node's certificate is revoked ([`BlockSink::peer_revoked`]) they are dropped
//! before any worker imports them. Blocks already handed to a decode worker go with their
//! origin ([`Received::origin`]: the node and the certificate serials it streamed them under);
//! the worker keeps it in every KV tier, and a heartbeat that lists one of those serials as
//! revoked evicts them (`WorkerPool::evict_revoked`, docs/security.md).

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use kvfleet_peer::{BlockSink, ErrorCode, ErrorMessage, KvBlock, KvDone, PeerInfo};
use kvfleet_proto::{KvLayout, NodeId, SequenceHash};
use prometheus_client::metrics::counter::Counter;

use crate::backend::KvOrigin;
use crate::metrics::Registry;

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
    /// Bytes held in `blocks` (counted against `from`'s budget).
    bytes: u64,
    /// The sender's certificate was revoked: what it sent is gone and nothing more is taken.
    revoked: bool,
    /// The serials of the certificates its streams came under (normally one).
    serials: Vec<String>,
}

/// Transfers expected, and the bytes each sending node has buffered here.
#[derive(Debug, Default)]
struct Inner {
    incoming: HashMap<String, Incoming>,
    held: HashMap<NodeId, u64>,
}

impl Inner {
    /// Forgets transfer `id`, giving its bytes back to its sender's budget.
    fn remove(&mut self, id: &str) -> Option<Incoming> {
        let incoming = self.incoming.remove(id)?;
        self.release(incoming.from, incoming.bytes);
        Some(incoming)
    }

    fn release(&mut self, node: NodeId, bytes: u64) {
        if let Some(held) = self.held.get_mut(&node) {
            *held = held.saturating_sub(bytes);
            if *held == 0 {
                self.held.remove(&node);
            }
        }
    }
}

pub use crate::peer::DEFAULT_MAX_BUFFERED_BYTES_PER_PEER;

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
#[derive(Debug)]
pub struct Transfers {
    inner: Mutex<Inner>,
    counters: TransferCounters,
    /// The most bytes one sending node may have buffered here, over all its transfers.
    max_bytes_per_peer: u64,
}

impl Default for Transfers {
    fn default() -> Self {
        Self::with_budget(DEFAULT_MAX_BUFFERED_BYTES_PER_PEER)
    }
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

impl Transfers {
    /// Transfers whose senders may each buffer at most `max_bytes_per_peer` here.
    pub fn with_budget(max_bytes_per_peer: u64) -> Self {
        Self {
            inner: Mutex::default(),
            counters: TransferCounters::default(),
            max_bytes_per_peer,
        }
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
    /// Who sent them (`None` when nothing came).
    pub origin: Option<KvOrigin>,
}

impl Transfers {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
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
            bytes: 0,
            revoked: false,
            serials: Vec::new(),
        };
        let mut inner = self.lock();
        // An id is never reused; were it, the old transfer's bytes go back to its sender.
        inner.remove(&id);
        inner.incoming.insert(id.clone(), incoming);
        drop(inner);
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
        if incoming.revoked {
            return Received::default();
        }
        let blocks: Vec<Bytes> = incoming.blocks.into_iter().map_while(|b| b).collect();
        let bytes = blocks.iter().map(|b| b.len() as u64).sum();
        let origin = (!blocks.is_empty()).then_some(KvOrigin {
            node: incoming.from,
            serials: incoming.serials,
        });
        Received {
            blocks,
            bytes,
            first_block_at: incoming.first_block_at,
            origin,
        }
    }

    /// Counts `received`'s first `blocks` as handed to a decode worker.
    pub(crate) fn count_handed_off(&self, received: &Received, blocks: usize) {
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
        self.lock().incoming.len()
    }

    /// Bytes `node` has buffered here, over all its transfers.
    pub fn buffered_by(&self, node: NodeId) -> u64 {
        self.lock().held.get(&node).copied().unwrap_or(0)
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
        let mut inner = self.lock();
        let incoming = inner.incoming.get_mut(request_id)?;
        if incoming.from != peer.node_id || incoming.revoked {
            return None;
        }
        // What a revocation will name: remembered with the blocks this stream brings.
        if !incoming.serials.contains(&peer.serial) {
            incoming.serials.push(peer.serial.clone());
        }
        Some(incoming.layout.clone())
    }

    async fn import(&self, request_id: &str, block: KvBlock) -> Result<(), ErrorMessage> {
        let mut guard = self.lock();
        let inner = &mut *guard;
        let Some(incoming) = inner.incoming.get_mut(request_id).filter(|i| !i.revoked) else {
            return Err(ErrorMessage::new(
                ErrorCode::UnknownRequest,
                format!("transfer {request_id} is no longer expected (cancelled or timed out)"),
            ));
        };
        let index = block.index as usize;
        let refuse = |code: ErrorCode, message: String| {
            self.counters.refused_blocks.inc();
            Err(ErrorMessage::new(code, message))
        };
        match incoming.hashes.get(index) {
            None => refuse(
                ErrorCode::ImportFailed,
                format!(
                    "block {index} is beyond the prompt's {} full blocks",
                    incoming.hashes.len()
                ),
            ),
            // The expected hash is this node's, from the request's tokens: a block is never
            // kept under a hash the sender chose.
            Some(&expected) if expected != block.hash => refuse(
                ErrorCode::HashMismatch,
                format!(
                    "block {index} has sequence hash {:016x}, the prompt's is {:016x}",
                    block.hash.0, expected.0
                ),
            ),
            Some(_) => {
                let len = block.data.len() as u64;
                let replaced = incoming.blocks[index]
                    .as_ref()
                    .map_or(0, |b| b.len() as u64);
                let held = inner.held.get(&incoming.from).copied().unwrap_or(0);
                if held.saturating_sub(replaced).saturating_add(len) > self.max_bytes_per_peer {
                    return refuse(
                        ErrorCode::Overloaded,
                        format!(
                            "the sending node has {held} bytes buffered here, at most {} \
                             (peer.max_buffered_mib_per_peer)",
                            self.max_bytes_per_peer
                        ),
                    );
                }
                incoming.first_block_at.get_or_insert_with(Instant::now);
                incoming.blocks[index] = Some(block.data);
                incoming.bytes = incoming.bytes - replaced + len;
                let held = inner.held.entry(incoming.from).or_insert(0);
                *held = held.saturating_sub(replaced) + len;
                Ok(())
            }
        }
    }

    fn peer_revoked(&self, peer: &PeerInfo) {
        let mut guard = self.lock();
        let inner = &mut *guard;
        let mut dropped = 0u64;
        for incoming in inner.incoming.values_mut() {
            if incoming.from == peer.node_id && !incoming.revoked {
                incoming.revoked = true;
                incoming.blocks.iter_mut().for_each(|b| *b = None);
                dropped += incoming.bytes;
                incoming.bytes = 0;
            }
        }
        inner.held.remove(&peer.node_id);
        drop(guard);
        if dropped > 0 {
            tracing::warn!(node = %peer.node_id, bytes = dropped,
                "peer certificate revoked: the KV blocks it sent and not yet used are dropped");
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
        assert_eq!(wrong_hash.code, ErrorCode::HashMismatch);
        let beyond = transfers.import("t", block(3, 13)).await.unwrap_err();
        assert_eq!(beyond.code, ErrorCode::ImportFailed);
        let unknown = transfers.import("nope", block(0, 10)).await.unwrap_err();
        assert_eq!(unknown.code, ErrorCode::UnknownRequest);
        transfers.stream_finished("t", Err(ErrorMessage::new(ErrorCode::Truncated, "cut")));

        let received = transfers.take(guard);
        assert_eq!(received.blocks.len(), 2);
        assert_eq!(received.blocks[1][0], 1);
        // They go to the decode worker with their origin: the node and the serial it sent under.
        assert_eq!(
            received.origin,
            Some(KvOrigin {
                node: prefill,
                serials: vec!["01".into()]
            })
        );
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

    /// One sending node's blocks, over all its transfers, stay within its budget; what a
    /// transfer held goes back to the budget when it is taken or dropped.
    #[tokio::test]
    async fn a_sending_node_buffers_at_most_its_budget() {
        let block_bytes = layout().block_bytes() as u64;
        let transfers = Arc::new(Transfers::with_budget(3 * block_bytes));
        let (greedy, other) = (
            NodeId::from_uuid(uuid::Uuid::from_u128(1)),
            NodeId::from_uuid(uuid::Uuid::from_u128(2)),
        );
        let hashes = || (10..14).map(SequenceHash).collect::<Vec<_>>();
        let a = transfers.register("a".into(), greedy, layout(), hashes());
        let b = transfers.register("b".into(), greedy, layout(), hashes());
        let c = transfers.register("c".into(), other, layout(), hashes());
        transfers.import("a", block(0, 10)).await.unwrap();
        transfers.import("a", block(1, 11)).await.unwrap();
        // The same block again replaces it: no double count.
        transfers.import("a", block(1, 11)).await.unwrap();
        transfers.import("b", block(0, 10)).await.unwrap();
        let over = transfers.import("b", block(1, 11)).await.unwrap_err();
        assert_eq!(over.code, ErrorCode::Overloaded, "{}", over.message);
        assert_eq!(transfers.buffered_by(greedy), 3 * block_bytes);
        // Another node's budget is its own.
        for i in 0..3 {
            transfers
                .import("c", block(i, 10 + u64::from(i)))
                .await
                .unwrap();
        }
        assert_eq!(transfers.take(a).blocks.len(), 2);
        assert_eq!(transfers.buffered_by(greedy), block_bytes);
        transfers.import("b", block(1, 11)).await.unwrap();
        drop(b);
        assert_eq!(transfers.buffered_by(greedy), 0);
        drop(c);
        assert_eq!(transfers.buffered_by(other), 0);
    }

    /// A revoked sender's buffered blocks are dropped before any worker sees them, and its
    /// transfers take nothing more; other senders' transfers are untouched.
    #[tokio::test]
    async fn a_revoked_senders_blocks_are_dropped() {
        let transfers = Arc::new(Transfers::default());
        let (revoked, honest) = (
            NodeId::from_uuid(uuid::Uuid::from_u128(1)),
            NodeId::from_uuid(uuid::Uuid::from_u128(2)),
        );
        let bad = transfers.register("bad".into(), revoked, layout(), vec![SequenceHash(10)]);
        let good = transfers.register("good".into(), honest, layout(), vec![SequenceHash(10)]);
        transfers.import("bad", block(0, 10)).await.unwrap();
        transfers.import("good", block(0, 10)).await.unwrap();
        transfers.peer_revoked(&peer(revoked));
        assert_eq!(transfers.buffered_by(revoked), 0);
        assert_eq!(transfers.expect(&peer(revoked), "bad"), None);
        let late = transfers.import("bad", block(0, 10)).await.unwrap_err();
        assert_eq!(late.code, ErrorCode::UnknownRequest);
        assert!(transfers.take(bad).blocks.is_empty());
        assert_eq!(transfers.take(good).blocks.len(), 1);
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
}
