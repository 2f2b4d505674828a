//! Recorded vLLM and SGLang event streams (written by msgspec itself, `fixtures/gen.py`),
//! translated batch by batch and published over real ZeroMQ sockets: the translated blocks are
//! the router's own hashes of the cached tokens, at kvfleet block sizes other than the engines';
//! dropped, reordered and malformed batches are resynchronised and counted.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use kvfleet_engine_events::translate::{Outcome, Translator, TranslatorCounters};
use kvfleet_engine_events::{Subscriber, SubscriberConfig};
use kvfleet_kv_router::{Router, RouterConfig, WorkerCapacity};
use kvfleet_proto::hash::{BlockSize, sequence_hashes};
use kvfleet_proto::ids::WorkerId;
use kvfleet_proto::kv_event::{KvEvent, KvEventData, Tier};
use tokio::sync::{mpsc, oneshot, watch};
use zeromq::{RouterSocket, Socket, SocketRecv, SocketSend, XPubSocket, ZmqMessage};

// The prompts of fixtures/gen.py.
fn a() -> Vec<u32> {
    (1000..1080).collect()
}
fn b() -> Vec<u32> {
    let mut b: Vec<u32> = (1000..1032).collect();
    b.extend(2000..2032);
    b
}
fn c() -> Vec<u32> {
    (3000..3048).collect()
}

/// `[u64 BE seq][u32 BE length][payload]` records.
fn fixture(name: &str) -> Vec<(u64, Vec<u8>)> {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    let data = std::fs::read(&path).unwrap();
    let mut rest = &data[..];
    let mut out = Vec::new();
    while !rest.is_empty() {
        let seq = u64::from_be_bytes(rest[..8].try_into().unwrap());
        let len = u32::from_be_bytes(rest[8..12].try_into().unwrap()) as usize;
        out.push((seq, rest[12..12 + len].to_vec()));
        rest = &rest[12 + len..];
    }
    out
}

const STREAMS: [&str; 3] = ["vllm-current.stream", "vllm-legacy.stream", "sglang.stream"];

/// The router's hashes of the cached token prefixes.
fn oracle(prefixes: &[&[u32]], k: u32) -> BTreeSet<u64> {
    let size = BlockSize::new(k).unwrap();
    prefixes
        .iter()
        .flat_map(|tokens| sequence_hashes(tokens, size))
        .map(|h| h.0)
        .collect()
}

/// The blocks each tier holds after each batch of a stream: (G1, G2).
fn expected_steps(stream: &str, k: u32) -> Vec<(BTreeSet<u64>, BTreeSet<u64>)> {
    let (a, b, c) = (a(), b(), c());
    let none = BTreeSet::new();
    let mut steps = vec![
        (oracle(&[&a[..64]], k), none.clone()),
        (oracle(&[&a[..80], &b[..64]], k), none.clone()),
        (oracle(&[&a[..64], &b[..48]], k), none.clone()),
        // The LoRA batch: no credit.
        (oracle(&[&a[..64], &b[..48]], k), none.clone()),
    ];
    if stream != "sglang.stream" {
        steps.push((oracle(&[&a[..64], &b[..48]], k), oracle(&[&a[..32]], k)));
    }
    steps.push((none.clone(), none.clone()));
    steps.push((oracle(&[&c[..48]], k), none));
    steps
}

/// Applies events the way the router does (contiguous ids, chains checked), per tier.
#[derive(Default)]
struct Index {
    blocks: BTreeSet<(Tier, u64)>,
    next_id: u64,
}

impl Index {
    fn apply(&mut self, events: &[KvEvent]) {
        for event in events {
            assert_eq!(event.event_id, self.next_id);
            self.next_id += 1;
            match &event.data {
                KvEventData::Stored { parent, blocks } => {
                    let mut prev = *parent;
                    for block in blocks {
                        assert_eq!(
                            kvfleet_proto::hash::chain(prev, block.local),
                            block.sequence
                        );
                        prev = Some(block.sequence);
                        assert!(self.blocks.insert((event.tier, block.sequence.0)));
                    }
                }
                KvEventData::Removed { blocks } => {
                    for block in blocks {
                        assert!(self.blocks.remove(&(event.tier, block.0)));
                    }
                }
                KvEventData::Cleared => self.blocks.retain(|(t, _)| *t != event.tier),
            }
        }
    }

    fn tier(&self, tier: Tier) -> BTreeSet<u64> {
        self.blocks
            .iter()
            .filter(|(t, _)| *t == tier)
            .map(|(_, h)| *h)
            .collect()
    }
}

#[test]
fn recorded_streams_translate_to_the_routers_hashes_batch_by_batch() {
    for stream in STREAMS {
        let batches = fixture(stream);
        for k in [16, 32, 8, 24, 1, 64, 100] {
            let steps = expected_steps(stream, k);
            assert_eq!(batches.len(), steps.len(), "{stream}");
            let mut translator = Translator::new(WorkerId(1), BlockSize::new(k).unwrap());
            let mut index = Index::default();
            for ((seq, payload), (g1, g2)) in batches.iter().zip(&steps) {
                let out = translator.accept(*seq, payload);
                assert_eq!(out.outcome, Outcome::Applied, "{stream} k={k} seq={seq}");
                index.apply(&out.events);
                assert_eq!(&index.tier(Tier::G1), g1, "{stream} k={k} seq={seq}");
                assert_eq!(&index.tier(Tier::G2), g2, "{stream} k={k} seq={seq}");
            }
            let counters = translator.counters();
            let lora_blocks = if stream == "sglang.stream" { 32 } else { 2 };
            assert_eq!(counters.uncredited_blocks, lora_blocks, "{stream}");
            assert_eq!(
                (counters.gaps, counters.resets, counters.orphan_blocks),
                (0, 0, 0)
            );
        }
    }
}

/// Batches an engine keeps for replay, by sequence number.
type ReplayBuffer = Arc<Mutex<Vec<(u64, Vec<u8>)>>>;

/// A test engine: an XPUB socket (a PUB that also tells the test when the subscription
/// arrived) and, optionally, a replay ROUTER serving vLLM's replay protocol from a buffer.
struct Engine {
    xpub: XPubSocket,
    endpoint: String,
    replay_endpoint: Option<String>,
    buffer: ReplayBuffer,
}

impl Engine {
    async fn start(replay: bool) -> Self {
        Self::start_at("tcp://127.0.0.1:0", replay).await
    }

    async fn start_at(endpoint: &str, replay: bool) -> Self {
        let mut xpub = XPubSocket::new();
        let endpoint = xpub.bind(endpoint).await.unwrap().to_string();
        let buffer: ReplayBuffer = Arc::default();
        let replay_endpoint = if replay {
            let mut router = RouterSocket::new();
            let endpoint = router.bind("tcp://127.0.0.1:0").await.unwrap().to_string();
            let buffer = buffer.clone();
            tokio::spawn(async move {
                // vLLM's `_service_replay`: [identity, "", start] → [identity, "", seq, payload]
                // for every buffered batch from `start`, then [identity, "", -1, ""].
                while let Ok(request) = router.recv().await {
                    let frames = request.into_vec();
                    let [identity, _, start] = frames.as_slice() else {
                        continue;
                    };
                    let start = u64::from_be_bytes(start.as_ref().try_into().unwrap());
                    let replies: Vec<(u64, Vec<u8>)> = buffer
                        .lock()
                        .unwrap()
                        .iter()
                        .filter(|(seq, _)| *seq >= start)
                        .cloned()
                        .collect();
                    for (seq, payload) in replies {
                        let reply = vec![
                            identity.clone(),
                            Bytes::new(),
                            Bytes::copy_from_slice(&seq.to_be_bytes()),
                            Bytes::from(payload),
                        ];
                        router
                            .send(ZmqMessage::try_from(reply).unwrap())
                            .await
                            .unwrap();
                    }
                    let end = vec![
                        identity.clone(),
                        Bytes::new(),
                        Bytes::from_static(&[0xFF; 8]),
                        Bytes::new(),
                    ];
                    router
                        .send(ZmqMessage::try_from(end).unwrap())
                        .await
                        .unwrap();
                }
            });
            Some(endpoint)
        } else {
            None
        };
        Self {
            xpub,
            endpoint,
            replay_endpoint,
            buffer,
        }
    }

    /// A new engine on the port of one just dropped: the old listener closes on a task of its
    /// own, so the bind is retried for a while.
    async fn restart_at(endpoint: &str) -> Self {
        for _ in 0..100 {
            let mut xpub = XPubSocket::new();
            if let Ok(bound) = xpub.bind(endpoint).await {
                return Self {
                    xpub,
                    endpoint: bound.to_string(),
                    replay_endpoint: None,
                    buffer: ReplayBuffer::default(),
                };
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("{endpoint} still taken 5 s after its engine was dropped");
    }

    /// Waits for the subscriber's subscription (a PUB drops what it sends before that).
    async fn subscribed(&mut self) {
        tokio::time::timeout(Duration::from_secs(10), self.xpub.recv())
            .await
            .expect("no subscription within 10 s")
            .unwrap();
    }

    async fn send_frames(&mut self, frames: Vec<Bytes>) {
        self.xpub
            .send(ZmqMessage::try_from(frames).unwrap())
            .await
            .unwrap();
    }

    /// Publishes a batch (and keeps it for replay).
    async fn publish(&mut self, seq: u64, payload: &[u8]) {
        self.send_frames(vec![
            Bytes::from_static(b"kv"),
            Bytes::copy_from_slice(&seq.to_be_bytes()),
            Bytes::copy_from_slice(payload),
        ])
        .await;
    }

    /// Keeps a batch for replay without publishing it (the subscriber never saw it).
    fn buffer(&self, seq: u64, payload: &[u8]) {
        let mut buffer = self.buffer.lock().unwrap();
        if !buffer.iter().any(|(s, _)| *s == seq) {
            buffer.push((seq, payload.to_vec()));
            buffer.sort_by_key(|(s, _)| *s);
        }
    }
}

struct Running {
    events: mpsc::Receiver<KvEvent>,
    counters: watch::Receiver<TranslatorCounters>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    async fn start(engine: &mut Engine, k: u32) -> Self {
        let config = SubscriberConfig {
            endpoint: engine.endpoint.clone(),
            replay_endpoint: engine.replay_endpoint.clone(),
            topic: "kv".into(),
            worker: WorkerId(4),
            block_size: BlockSize::new(k).unwrap(),
            replay_timeout: Duration::from_secs(5),
            hasher: Default::default(),
        };
        let subscriber = tokio::time::timeout(Duration::from_secs(10), Subscriber::connect(config))
            .await
            .expect("connect within 10 s")
            .unwrap();
        engine.subscribed().await;
        let counters = subscriber.counters();
        let (tx, events) = mpsc::channel(1024);
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            subscriber
                .run(tx, async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });
        Self {
            events,
            counters,
            stop: Some(stop),
            task,
        }
    }

    /// Waits until the counters satisfy `done`, then takes every event queued so far.
    async fn until(&mut self, done: impl Fn(&TranslatorCounters) -> bool) -> Vec<KvEvent> {
        let waited =
            tokio::time::timeout(Duration::from_secs(10), self.counters.wait_for(|c| done(c)))
                .await
                .map(|result| result.map(|_| ()));
        assert!(
            matches!(waited, Ok(Ok(()))),
            "counters stuck at {:?}",
            *self.counters.borrow()
        );
        let mut events = Vec::new();
        while let Ok(event) = self.events.try_recv() {
            events.push(event);
        }
        events
    }

    async fn stop(mut self) -> TranslatorCounters {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.await.unwrap();
        *self.counters.borrow()
    }
}

/// Feeds events to the real router and returns how many leading blocks of `tokens` it credits
/// the worker with.
fn router_overlap(events: &[KvEvent], tokens: &[u32], k: u32) -> u32 {
    let mut router = Router::new(RouterConfig::default());
    router
        .add_worker(WorkerId(4), WorkerCapacity::default())
        .unwrap();
    for event in events {
        router.apply(event, Duration::ZERO).unwrap();
    }
    let hashes = sequence_hashes(tokens, BlockSize::new(k).unwrap());
    router.overlaps(&hashes, None, Duration::ZERO)[0].blocks
}

#[tokio::test]
async fn recorded_streams_over_zmq_reach_the_router() {
    for stream in STREAMS {
        for k in [16, 32] {
            let batches = fixture(stream);
            let mut engine = Engine::start(false).await;
            let mut running = Running::start(&mut engine, k).await;
            for (seq, payload) in &batches {
                engine.publish(*seq, payload).await;
            }
            let n = batches.len() as u64;
            let events = running.until(|c| c.batches == n).await;
            let mut index = Index::default();
            index.apply(&events);
            let (g1, g2) = expected_steps(stream, k).pop().unwrap();
            assert_eq!(index.tier(Tier::G1), g1, "{stream} k={k}");
            assert_eq!(index.tier(Tier::G2), g2, "{stream} k={k}");
            // The real router takes every event (ids contiguous, chains verified) and credits
            // the worker with all of prompt C.
            let c = c();
            assert_eq!(router_overlap(&events, &c, k), 48 / k);
            let counters = running.stop().await;
            assert_eq!(
                (counters.gaps, counters.resets, counters.malformed),
                (0, 0, 0)
            );
        }
    }
}

#[tokio::test]
async fn a_dropped_batch_without_replay_clears_the_worker_and_rebuilds() {
    let batches = fixture("vllm-current.stream");
    let mut engine = Engine::start(false).await;
    let mut running = Running::start(&mut engine, 16).await;
    engine.publish(0, &batches[0].1).await;
    let first = running.until(|c| c.batches == 1).await;
    // Batch 1 (B's blocks and A's fifth) is lost on the way.
    for (seq, payload) in &batches[2..5] {
        engine.publish(*seq, payload).await;
    }
    let after = running.until(|c| c.batches == 4).await;
    // The gap cleared the worker's G1 blocks before anything else.
    assert_eq!(after[0].data, KvEventData::Cleared);
    assert_eq!(after[0].tier, Tier::G1);
    let mut index = Index::default();
    index.apply(&first);
    index.apply(&after);
    // Rebuilt from what followed: batch 2's removals named blocks it no longer knew, batch 4
    // stored A's first two blocks on the CPU (their chain starts at the prompt: creditable).
    assert!(index.tier(Tier::G1).is_empty());
    assert_eq!(index.tier(Tier::G2), oracle(&[&a()[..32]], 16));
    let counters = running.stop().await;
    assert_eq!(counters.gaps, 1);
    assert_eq!(counters.resets, 1);
    assert_eq!(counters.replayed, 0);
    assert_eq!(counters.unknown_removals, 2);
    // The router took the clear and the rebuild without a gap of its own.
    let mut all = first;
    all.extend(after);
    assert_eq!(router_overlap(&all, &a(), 16), 2);
}

#[tokio::test]
async fn out_of_order_batches_are_resynchronised_by_replay() {
    let batches = fixture("vllm-current.stream");
    let mut engine = Engine::start(true).await;
    let mut running = Running::start(&mut engine, 32).await;
    engine.buffer(0, &batches[0].1);
    engine.publish(0, &batches[0].1).await;
    running.until(|c| c.batches == 1).await;
    // 2 overtakes 1: the subscriber replays from 1 (getting 1 and 2), then the late 1 is stale.
    engine.buffer(1, &batches[1].1);
    engine.buffer(2, &batches[2].1);
    engine.publish(2, &batches[2].1).await;
    running.until(|c| c.batches == 3).await;
    engine.publish(1, &batches[1].1).await;
    running.until(|c| c.stale == 2).await;
    for (seq, payload) in &batches[3..] {
        engine.buffer(*seq, payload);
        engine.publish(*seq, payload).await;
    }
    let n = batches.len() as u64;
    running.until(|c| c.batches == n).await;
    let counters = running.stop().await;
    assert_eq!(counters.gaps, 1);
    assert_eq!(counters.replayed, 2, "batches 1 and 2 came from the replay");
    // The held batch 2 (already replayed) and the late 1.
    assert_eq!(counters.stale, 2);
    assert_eq!(counters.resets, 0, "a replay loses nothing: no clear");
    assert_eq!(counters.unknown_removals, 0);
}

#[tokio::test]
async fn replay_whose_buffer_no_longer_reaches_back_clears_then_applies() {
    let batches = fixture("vllm-current.stream");
    let mut engine = Engine::start(true).await;
    let mut running = Running::start(&mut engine, 16).await;
    engine.publish(0, &batches[0].1).await;
    running.until(|c| c.batches == 1).await;
    // Batches 1 and 2 are gone from the engine's buffer too; 3 and 4 are there.
    engine.buffer(3, &batches[3].1);
    engine.buffer(4, &batches[4].1);
    engine.publish(4, &batches[4].1).await;
    let events = running.until(|c| c.batches == 3).await;
    assert_eq!(events[0].data, KvEventData::Cleared);
    let counters = running.stop().await;
    assert_eq!(counters.gaps, 1);
    assert_eq!(counters.resets, 1);
    assert_eq!(counters.replayed, 2);
}

#[tokio::test]
async fn malformed_messages_are_counted_and_the_stream_goes_on() {
    let batches = fixture("vllm-legacy.stream");
    let mut engine = Engine::start(false).await;
    let mut running = Running::start(&mut engine, 16).await;
    engine.publish(0, &batches[0].1).await;
    running.until(|c| c.batches == 1).await;
    // Two frames only; a 7-byte sequence number; then batch 1's number with a cut payload.
    engine
        .send_frames(vec![Bytes::from_static(b"kv"), Bytes::from_static(b"x")])
        .await;
    engine
        .send_frames(vec![
            Bytes::from_static(b"kv"),
            Bytes::from_static(&[0; 7]),
            Bytes::from_static(b""),
        ])
        .await;
    let cut = &batches[1].1[..batches[1].1.len() / 2];
    engine.publish(1, cut).await;
    let events = running.until(|c| c.malformed == 3).await;
    // The cut batch's changes are lost: the worker was cleared.
    assert_eq!(events.last().map(|e| &e.data), Some(&KvEventData::Cleared));
    // The stream goes on from batch 2.
    for (seq, payload) in &batches[2..] {
        engine.publish(*seq, payload).await;
    }
    let n = batches.len() as u64 - 1;
    running.until(|c| c.batches == n).await;
    let counters = running.stop().await;
    assert_eq!(counters.resets, 1);
    assert_eq!(counters.gaps, 0);
}

#[tokio::test]
async fn an_engine_restart_clears_the_worker() {
    let batches = fixture("vllm-current.stream");
    let mut engine = Engine::start(false).await;
    let mut running = Running::start(&mut engine, 16).await;
    engine.publish(0, &batches[0].1).await;
    engine.publish(1, &batches[1].1).await;
    let mut events = running.until(|c| c.batches == 2).await;
    // The engine comes back and numbers from 0 again.
    engine.publish(0, &batches[6].1).await;
    events.extend(running.until(|c| c.batches == 3).await);
    let mut index = Index::default();
    index.apply(&events);
    assert_eq!(index.tier(Tier::G1), oracle(&[&c()[..48]], 16));
    let counters = running.stop().await;
    assert_eq!((counters.restarts, counters.resets), (1, 1));
}

#[tokio::test]
async fn a_late_subscriber_catches_up_from_the_publishers_replay() {
    use kvfleet_engine_events::decode::EventBatch;
    use kvfleet_engine_events::encode::Flavor;
    use kvfleet_engine_events::publisher::{Publisher, block_removed, block_stored};

    let mut publisher = Publisher::bind(
        "tcp://127.0.0.1:0",
        Some("tcp://127.0.0.1:0"),
        "kv",
        100,
        Flavor::VllmArrayLike,
    )
    .await
    .unwrap();
    let batch = |events| EventBatch {
        ts: 1.0,
        events,
        data_parallel_rank: Some(0),
    };
    let (a, b) = (a(), b());
    // Published before anyone subscribed: dropped by the PUB socket, kept for replay.
    publisher
        .publish(&batch(vec![block_stored(&a, 16, 0, 5, None)]))
        .await
        .unwrap();
    publisher
        .publish(&batch(vec![block_stored(&b, 16, 2, 4, None)]))
        .await
        .unwrap();
    publisher
        .publish(&batch(vec![block_removed(&a, 16, &[4], None)]))
        .await
        .unwrap();
    let config = SubscriberConfig {
        endpoint: publisher.endpoint().to_owned(),
        replay_endpoint: publisher.replay_endpoint().map(str::to_owned),
        topic: "kv".into(),
        worker: WorkerId(4),
        block_size: BlockSize::new(32).unwrap(),
        replay_timeout: Duration::from_secs(5),
        hasher: Default::default(),
    };
    let subscriber = Subscriber::connect(config).await.unwrap();
    let mut counters = subscriber.counters();
    let (tx, mut rx) = mpsc::channel(1024);
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(subscriber.run(tx, async {
        let _ = stopped.await;
    }));
    // Empty batches until one gets through (the subscription reaches the PUB socket
    // asynchronously); the first one seen is a gap from 0, answered by the replay.
    let caught_up = async {
        loop {
            publisher.publish(&batch(vec![])).await.unwrap();
            let waited = tokio::time::timeout(
                Duration::from_millis(50),
                counters.wait_for(|c| c.batches >= 4),
            )
            .await;
            if waited.is_ok() {
                break;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), caught_up)
        .await
        .expect("caught up within 10 s");
    let _ = stop.send(());
    task.await.unwrap().unwrap();
    let mut events = Vec::new();
    while let Ok(event) = rx.try_recv() {
        events.push(event);
    }
    let mut index = Index::default();
    index.apply(&events);
    assert_eq!(index.tier(Tier::G1), oracle(&[&a[..64], &b[..64]], 32));
    let counters = *counters.borrow();
    assert_eq!(counters.gaps, 1);
    assert_eq!(counters.resets, 0);
    assert!(counters.replayed >= 4, "{counters:?}");
}

#[tokio::test]
async fn an_engine_restarted_behind_the_same_port_is_followed_across_the_reconnect() {
    let batches = fixture("vllm-current.stream");
    let mut engine = Engine::start(false).await;
    let endpoint = engine.endpoint.clone();
    let mut running = Running::start(&mut engine, 16).await;
    for (seq, payload) in &batches[..3] {
        engine.publish(*seq, payload).await;
    }
    let mut events = running.until(|c| c.batches == 3).await;
    // The engine process dies: the subscriber notices and clears the worker.
    drop(engine);
    events.extend(running.until(|c| c.disconnects == 1).await);
    assert_eq!(events.last().map(|e| &e.data), Some(&KvEventData::Cleared));
    // The new process binds the same port and numbers from 0. Its batch 0 went out before the
    // subscriber was back; batch 1 is the first seen: below the old process's next number (3),
    // so without the disconnect it would have been dropped as stale.
    let mut engine = Engine::restart_at(&endpoint).await;
    engine.subscribed().await;
    engine.publish(1, &batches[6].1).await;
    events.extend(running.until(|c| c.batches == 4).await);
    let mut index = Index::default();
    index.apply(&events);
    assert_eq!(index.tier(Tier::G1), oracle(&[&c()[..48]], 16));
    let counters = running.stop().await;
    assert_eq!(
        (counters.disconnects, counters.gaps, counters.stale),
        (1, 1, 0)
    );
}
