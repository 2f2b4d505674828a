//! A vLLM-style publisher: what vLLM's `ZmqEventPublisher` does, in Rust, for the mock engine's
//! vLLM mode and for tests. A PUB socket sends `[topic, seq, payload]` with `seq` counting from
//! 0; an optional ROUTER serves replays of the last `buffer_steps` batches (`["", start]` →
//! `["", seq, payload]`…, then `["", -1, ""]`).
//!
//! [`block_stored`] and [`block_removed`] name engine blocks the way a prefix-caching engine
//! does (a hash of the whole prefix up to the block's end), so a mock engine that knows a
//! request's tokens can publish what vLLM would.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use kvfleet_proto::hash::local_block_hash;
use tokio::task::JoinHandle;
use zeromq::{PubSocket, RouterSocket, Socket, SocketRecv, SocketSend, ZmqMessage};

use crate::decode::{BlockRemoved, BlockStored, EngineBlockHash, EngineEvent, EventBatch};
use crate::encode::{Flavor, encode_batch};

type Buffer = Arc<Mutex<VecDeque<(u64, Bytes)>>>;

/// Binding or sending failed.
#[derive(Debug, thiserror::Error)]
#[error("vLLM-style publisher on {endpoint}: {source}")]
pub struct PublisherError {
    /// The endpoint.
    pub endpoint: String,
    /// Why.
    pub source: zeromq::ZmqError,
}

/// A bound publisher. Dropping it stops its replay task.
pub struct Publisher {
    socket: PubSocket,
    endpoint: String,
    replay_endpoint: Option<String>,
    topic: Bytes,
    flavor: Flavor,
    next_seq: u64,
    buffer: Buffer,
    buffer_steps: usize,
    replay_task: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("endpoint", &self.endpoint)
            .field("replay_endpoint", &self.replay_endpoint)
            .field("next_seq", &self.next_seq)
            .finish_non_exhaustive()
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        if let Some(task) = self.replay_task.take() {
            task.abort();
        }
    }
}

impl Publisher {
    /// Binds the PUB socket (e.g. `tcp://127.0.0.1:0`) and, if given, the replay ROUTER.
    pub async fn bind(
        endpoint: &str,
        replay_endpoint: Option<&str>,
        topic: &str,
        buffer_steps: usize,
        flavor: Flavor,
    ) -> Result<Self, PublisherError> {
        let error = |endpoint: &str| {
            let endpoint = endpoint.to_owned();
            move |source| PublisherError { endpoint, source }
        };
        let mut socket = PubSocket::new();
        let bound = socket.bind(endpoint).await.map_err(error(endpoint))?;
        let buffer: Buffer = Arc::default();
        let (replay_endpoint, replay_task) = match replay_endpoint {
            Some(replay) => {
                let mut router = RouterSocket::new();
                let bound = router.bind(replay).await.map_err(error(replay))?;
                let task = tokio::spawn(serve_replays(router, buffer.clone()));
                (Some(bound.to_string()), Some(task))
            }
            None => (None, None),
        };
        Ok(Self {
            socket,
            endpoint: bound.to_string(),
            replay_endpoint,
            topic: Bytes::copy_from_slice(topic.as_bytes()),
            flavor,
            next_seq: 0,
            buffer,
            buffer_steps,
            replay_task,
        })
    }

    /// The PUB endpoint as bound (the real port for port 0).
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The replay endpoint as bound.
    pub fn replay_endpoint(&self) -> Option<&str> {
        self.replay_endpoint.as_deref()
    }

    /// Publishes a batch under the next sequence number, which it returns. Like a PUB socket,
    /// it does not wait for subscribers: a batch nobody is subscribed for is dropped (and
    /// replayable).
    pub async fn publish(&mut self, batch: &EventBatch) -> Result<u64, PublisherError> {
        let (seq, payload) = self.buffer(batch);
        let message = ZmqMessage::try_from(vec![
            self.topic.clone(),
            Bytes::copy_from_slice(&seq.to_be_bytes()),
            payload,
        ])
        .map_err(|_| PublisherError {
            endpoint: self.endpoint.clone(),
            source: zeromq::ZmqError::NoMessage,
        })?;
        self.socket
            .send(message)
            .await
            .map_err(|source| PublisherError {
                endpoint: self.endpoint.clone(),
                source,
            })?;
        Ok(seq)
    }

    /// A batch the PUB socket dropped (as at its high-water mark): it takes the next sequence
    /// number and is kept for replay, but never sent. For tests of the subscriber's resync.
    pub fn lose(&mut self, batch: &EventBatch) -> u64 {
        self.buffer(batch).0
    }

    /// Numbers, encodes and buffers `batch` for replay.
    fn buffer(&mut self, batch: &EventBatch) -> (u64, Bytes) {
        let payload = Bytes::from(encode_batch(batch, self.flavor));
        let seq = self.next_seq;
        self.next_seq += 1;
        let mut buffer = self.buffer.lock().unwrap_or_else(PoisonError::into_inner);
        buffer.push_back((seq, payload.clone()));
        while buffer.len() > self.buffer_steps {
            buffer.pop_front();
        }
        (seq, payload)
    }
}

/// vLLM's `_service_replay`, in a loop until the socket fails or the task is aborted.
async fn serve_replays(mut router: RouterSocket, buffer: Buffer) {
    while let Ok(request) = router.recv().await {
        let frames = request.into_vec();
        let [identity, _, start] = frames.as_slice() else {
            continue;
        };
        let Ok(start) = <[u8; 8]>::try_from(start.as_ref()).map(u64::from_be_bytes) else {
            continue;
        };
        let replies: Vec<(u64, Bytes)> = buffer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter(|(seq, _)| *seq >= start)
            .cloned()
            .collect();
        let end = (Bytes::from_static(&[0xFF; 8]), Bytes::new());
        for (seq, payload) in replies
            .into_iter()
            .map(|(seq, payload)| (Bytes::copy_from_slice(&seq.to_be_bytes()), payload))
            .chain(std::iter::once(end))
        {
            let reply = ZmqMessage::try_from(vec![identity.clone(), Bytes::new(), seq, payload]);
            let Ok(reply) = reply else { break };
            if router.send(reply).await.is_err() {
                break;
            }
        }
    }
}

/// An engine's name for the block of `tokens` ending at `end`: a hash of the whole prefix, as a
/// prefix-caching engine chains its block hashes (kvfleet's local hash function, over the
/// prefix; any injective-enough function does, the translator only compares names).
pub fn engine_block_name(tokens: &[u32], end: usize) -> EngineBlockHash {
    let end = end.min(tokens.len());
    EngineBlockHash::Int(i128::from(local_block_hash(&tokens[..end]).0))
}

/// `BlockStored` for engine blocks `first..last` of `tokens` in blocks of `block_size`, as vLLM
/// sends it after computing them (`medium` `None`: the GPU).
pub fn block_stored(
    tokens: &[u32],
    block_size: usize,
    first: usize,
    last: usize,
    medium: Option<&str>,
) -> EngineEvent {
    let block_size = block_size.max(1);
    let last = last.min(tokens.len() / block_size);
    let first = first.min(last);
    EngineEvent::BlockStored(BlockStored {
        block_hashes: (first..last)
            .map(|b| engine_block_name(tokens, (b + 1) * block_size))
            .collect(),
        parent: (first > 0).then(|| engine_block_name(tokens, first * block_size)),
        token_ids: tokens[first * block_size..last * block_size].to_vec(),
        block_size: u32::try_from(block_size).unwrap_or(u32::MAX),
        lora_id: None,
        medium: medium.map(str::to_owned),
        lora_name: None,
        extra_keys: Vec::new(),
        group_idx: None,
    })
}

/// `BlockRemoved` for engine blocks `blocks` of `tokens`.
pub fn block_removed(
    tokens: &[u32],
    block_size: usize,
    blocks: &[usize],
    medium: Option<&str>,
) -> EngineEvent {
    let block_size = block_size.max(1);
    EngineEvent::BlockRemoved(BlockRemoved {
        block_hashes: blocks
            .iter()
            .map(|b| engine_block_name(tokens, (b + 1) * block_size))
            .collect(),
        medium: medium.map(str::to_owned),
        group_idx: None,
    })
}
