//! The thin async driver: a ZMQ SUB socket on the engine's publisher, a DEALER on its replay
//! ROUTER where it has one, a [`Translator`], and a bounded channel of kvfleet events out.
//!
//! Replay protocol (vLLM's and SGLang's `ZmqEventPublisher`): the subscriber sends
//! `["", start_seq]` (8 bytes big-endian); the publisher answers `["", seq, payload]` for every
//! buffered batch from `start_seq` on, then `["", -1 as 8 bytes, ""]`.
//!
//! Backpressure: when the events channel is full the driver waits; the engine's PUB socket then
//! drops batches at its high-water mark, the next batch shows the gap, and the worker is
//! resynchronised (replayed, or cleared and rebuilt). Nothing here grows without bound.

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use kvfleet_proto::hash::BlockSize;
use kvfleet_proto::ids::WorkerId;
use kvfleet_proto::kv_event::KvEvent;
use tokio::sync::{mpsc, watch};
use zeromq::{DealerSocket, Socket, SocketEvent, SocketRecv, SocketSend, SubSocket, ZmqMessage};

use crate::decode::{decode_message, decode_seq};
use crate::translate::{Outcome, Output, Translator, TranslatorCounters};

/// The replay's end-of-stream marker: sequence -1.
const END_SEQ: [u8; 8] = [0xFF; 8];

/// Where an engine worker publishes, and how to translate it.
#[derive(Debug, Clone)]
pub struct SubscriberConfig {
    /// The engine's PUB endpoint, e.g. `tcp://127.0.0.1:5557` (connected to, not bound).
    pub endpoint: String,
    /// The engine's replay ROUTER endpoint, where it has one (`replay_endpoint` in vLLM's
    /// `--kv-events-config`).
    pub replay_endpoint: Option<String>,
    /// The topic to subscribe to (`topic` in the engine's config; `""` for all).
    pub topic: String,
    /// The kvfleet worker the engine is.
    pub worker: WorkerId,
    /// kvfleet's block size for the deployment.
    pub block_size: BlockSize,
    /// How long a replay may take before the driver gives up and clears the worker instead.
    pub replay_timeout: Duration,
    /// The fleet's block hasher (its secret key, if any): translated blocks are named with
    /// it, as the fleet's own engines name theirs. The engine's events carry no `cache_salt`,
    /// so a salted request's blocks are named unsalted here (vLLM isolates them in its own
    /// cache; the index only routes less well for them).
    pub hasher: kvfleet_proto::hash::BlockHasher,
}

/// The driver could not start or lost its socket.
#[derive(Debug, thiserror::Error)]
pub enum SubscriberError {
    /// Connecting or subscribing to the engine's publisher failed.
    #[error("KV event subscription to {endpoint}: {source}")]
    Connect {
        /// The endpoint.
        endpoint: String,
        /// Why.
        source: zeromq::ZmqError,
    },
    /// Receiving from the publisher failed.
    #[error("KV event stream from {endpoint}: {source}")]
    Recv {
        /// The endpoint.
        endpoint: String,
        /// Why.
        source: zeromq::ZmqError,
    },
}

/// A connected subscriber, ready to [`run`](Subscriber::run).
pub struct Subscriber {
    config: SubscriberConfig,
    sub: SubSocket,
    /// The SUB socket's connection events: a disconnect means a resync.
    monitor: Option<futures_util::stream::BoxStream<'static, SocketEvent>>,
    replay: Option<DealerSocket>,
    translator: Translator,
    counters: watch::Sender<TranslatorCounters>,
}

impl std::fmt::Debug for Subscriber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscriber")
            .field("config", &self.config)
            .field("translator", &self.translator)
            .finish_non_exhaustive()
    }
}

impl Subscriber {
    /// Connects to the publisher (and its replay socket) and subscribes. Waits for the engine
    /// to listen, up to zeromq's connect timeout (30 s); after that the socket reconnects by
    /// itself whenever the engine goes away and comes back.
    pub async fn connect(config: SubscriberConfig) -> Result<Self, SubscriberError> {
        let mut sub = SubSocket::new();
        let monitor = sub.monitor().boxed();
        let connect_error = |source| SubscriberError::Connect {
            endpoint: config.endpoint.clone(),
            source,
        };
        sub.subscribe(&config.topic).await.map_err(connect_error)?;
        sub.connect(&config.endpoint).await.map_err(connect_error)?;
        let replay = match &config.replay_endpoint {
            Some(endpoint) => Some(connect_replay(endpoint).await?),
            None => None,
        };
        let translator =
            Translator::new(config.worker, config.block_size).with_hasher(config.hasher.clone());
        let (counters, _) = watch::channel(TranslatorCounters::default());
        Ok(Self {
            config,
            sub,
            monitor: Some(monitor),
            replay,
            translator,
            counters,
        })
    }

    /// The translator's counters, updated after every message (for `/metrics`).
    pub fn counters(&self) -> watch::Receiver<TranslatorCounters> {
        self.counters.subscribe()
    }

    /// Receives, translates and sends kvfleet events on `events` until `shutdown` resolves or
    /// the receiver is dropped.
    pub async fn run(
        mut self,
        events: mpsc::Sender<KvEvent>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), SubscriberError> {
        tokio::pin!(shutdown);
        loop {
            let monitor = async {
                match self.monitor.as_mut() {
                    Some(monitor) => monitor.next().await,
                    None => std::future::pending().await,
                }
            };
            let received = tokio::select! {
                () = &mut shutdown => return Ok(()),
                event = monitor => Err(event),
                message = self.sub.recv() => Ok(message.map_err(|source| SubscriberError::Recv {
                    endpoint: self.config.endpoint.clone(),
                    source,
                })?),
            };
            let out = match received {
                Ok(message) => {
                    let frames = message.into_vec();
                    match decode_message(&frames) {
                        Ok((seq, payload)) => self.offer(seq, payload).await,
                        Err(error) => {
                            tracing::warn!(worker = %self.config.worker, %error, "malformed KV event message");
                            self.translator.note_malformed_message();
                            Vec::new()
                        }
                    }
                }
                Err(Some(SocketEvent::Disconnected(_))) => {
                    // zeromq reconnects by itself; until then nothing says what was missed.
                    tracing::info!(worker = %self.config.worker, "KV event publisher disconnected; worker's blocks cleared until it is back");
                    self.translator.disconnected()
                }
                Err(Some(_)) => Vec::new(),
                Err(None) => {
                    self.monitor = None;
                    Vec::new()
                }
            };
            for event in out {
                if events.send(event).await.is_err() {
                    return Ok(());
                }
            }
            // After the events: a reader that sees a batch counted finds its events queued.
            self.counters.send_replace(self.translator.counters());
        }
    }

    /// Offers one live batch, resynchronising on a gap.
    async fn offer(&mut self, seq: u64, payload: &[u8]) -> Vec<KvEvent> {
        let Output {
            mut events,
            outcome,
        } = self.translator.accept(seq, payload);
        match outcome {
            Outcome::Applied | Outcome::Restarted | Outcome::Stale { .. } => {}
            Outcome::Malformed(error) => {
                tracing::warn!(worker = %self.config.worker, seq, %error, "undecodable KV event batch; worker's blocks cleared");
            }
            Outcome::Gap { expected } => {
                tracing::info!(worker = %self.config.worker, expected, got = seq, "KV event gap; resynchronising");
                events = self.resync(expected).await;
                if self.translator.expected_seq() < seq {
                    // No replay, or it ended short of this batch: the rest is lost.
                    events.extend(self.translator.skip_to(seq));
                }
                // The batch that showed the gap: applied now, or stale if the replay had it.
                events.extend(self.translator.accept(seq, payload).events);
            }
        }
        events
    }

    /// Replays from `expected` where the engine has a replay socket; whatever it cannot
    /// cover is cleared. Returns the events the replay produced.
    async fn resync(&mut self, expected: u64) -> Vec<KvEvent> {
        let Some(replay) = self.replay.as_mut() else {
            return Vec::new();
        };
        let timeout = self.config.replay_timeout;
        let mut events = Vec::new();
        let request = ZmqMessage::try_from(vec![
            Bytes::new(),
            Bytes::copy_from_slice(&expected.to_be_bytes()),
        ]);
        let sent = match request {
            Ok(request) => tokio::time::timeout(timeout, replay.send(request)).await,
            Err(_) => return events,
        };
        let mut ok = matches!(sent, Ok(Ok(())));
        while ok {
            let reply = match tokio::time::timeout(timeout, replay.recv()).await {
                Ok(Ok(reply)) => reply.into_vec(),
                _ => {
                    ok = false;
                    break;
                }
            };
            // ["", seq, payload]
            let [_, seq, payload] = reply.as_slice() else {
                ok = false;
                break;
            };
            if seq.as_ref() == END_SEQ {
                break;
            }
            let Ok(seq) = decode_seq(seq) else {
                ok = false;
                break;
            };
            let mut output = self.translator.accept_replayed(seq, payload);
            if matches!(output.outcome, Outcome::Gap { .. }) {
                // The engine's buffer no longer reaches back to `expected`.
                events.extend(self.translator.skip_to(seq));
                output = self.translator.accept_replayed(seq, payload);
            }
            events.extend(output.events);
        }
        if !ok {
            tracing::warn!(worker = %self.config.worker, "KV event replay failed; reconnecting its socket");
            // A half-read replay would answer the next request with this one's leftovers.
            self.replay = match &self.config.replay_endpoint {
                Some(endpoint) => tokio::time::timeout(timeout, connect_replay(endpoint))
                    .await
                    .ok()
                    .and_then(Result::ok),
                None => None,
            };
        }
        events
    }
}

async fn connect_replay(endpoint: &str) -> Result<DealerSocket, SubscriberError> {
    let mut dealer = DealerSocket::new();
    dealer
        .connect(endpoint)
        .await
        .map_err(|source| SubscriberError::Connect {
            endpoint: endpoint.to_owned(),
            source,
        })?;
    Ok(dealer)
}
