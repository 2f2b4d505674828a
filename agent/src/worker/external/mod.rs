//! A worker whose engine is an external server (`engine = "llamacpp"`, `"openai"`, `"vllm"` or
//! `"sglang"`): the
//! worker process starts and supervises the server and speaks its HTTP API, and says the same
//! frames to the agent as a native worker. So the pool, admission, forwarding, migration,
//! metrics, heartbeats, the KV index and the CLI and UI treat it like any worker.
//!
//! - [`server`]: start the server (port, GPU, logs, `/health`), notice its exit.
//! - [`client`]: one request as one streamed HTTP call; errors name the engine.
//! - [`approx_kv`]: the KV events the server does not publish, guessed from what it served.
//! - [`load`]: running and waiting requests and KV use, read from the server's own `/metrics`
//!   (vLLM, SGLang, llama.cpp), blended with this worker's count.
//! - vllm/sglang with `kv_events`: the engine's own KV event stream instead, translated into
//!   kvfleet's block hashes by `kvfleet_engine_events::Subscriber` (exact, not approximate);
//!   its counters go into the worker's status and so the agent's `/metrics`.
//!
//! The worker says hello only once the server is healthy; a server that cannot start, exits
//! at start or never becomes healthy is an `Error` frame instead of the hello (the agent logs
//! its message as the reason the worker failed) and a non-zero exit. A server that exits later
//! ends the worker the same way; the agent fails its requests, stops routing to it and starts
//! it again with backoff. No KV import or export (no disaggregated roles).

pub mod approx_kv;
pub mod client;
pub mod load;
pub mod server;

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use kvfleet_engine_events::{Subscriber, SubscriberConfig, TranslatorCounters};
use kvfleet_proto::frame::FrameKind;
use kvfleet_proto::kv_event::KvEventData;
use kvfleet_proto::{KvEvent, Tier};
use tokio::io::{AsyncWriteExt as _, BufWriter};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, watch};
use tracing::Instrument as _;

use self::approx_kv::ApproxKv;
use self::client::Update;
use self::server::{Server, engine_name};
use super::protocol::{
    Control, FrameStream, WireCancel, WireEngine, WireError, WireFinish, WireKvEvents, WireRequest,
    WireStatus, WireTokens, WorkerHello, WorkerSpec, encode_json, write_json,
};

/// How often the worker reports its load (as a native worker does).
const STATUS_INTERVAL: Duration = Duration::from_millis(250);
/// How long the server gets to become healthy when the agent does not say.
const DEFAULT_START_TIMEOUT: Duration = Duration::from_secs(60);
/// Translated KV events queued for the worker loop; when full, the subscriber waits and the
/// engine's PUB socket drops (a gap, resynchronised).
const EVENT_CHANNEL: usize = 4096;
/// How long a replay from the engine may take before the translator clears the worker.
const REPLAY_TIMEOUT: Duration = Duration::from_secs(2);

struct Running {
    request_id: String,
    prompt: Vec<u32>,
    /// Its `cache_salt`, for the approximate record's hashes.
    cache_salt: Option<String>,
    output: Vec<u32>,
    arrival: Instant,
    last_token: Option<Instant>,
    task: tokio::task::JoinHandle<()>,
}

enum Msg {
    Update(Update),
    Failed(String),
}

/// Serves `spec` with an external engine until the agent stops the worker or the server dies.
pub async fn serve(
    spec: WorkerSpec,
    mut frames: FrameStream<OwnedReadHalf>,
    mut writer: BufWriter<OwnedWriteHalf>,
) -> anyhow::Result<()> {
    let kind = spec.engine.engine;
    let name = engine_name(kind);
    let external = spec
        .engine
        .external
        .clone()
        .context("an external engine's spec has no server command")?;
    let timeout = match external.start_timeout_ms {
        0 => DEFAULT_START_TIMEOUT,
        ms => Duration::from_millis(ms),
    };
    let mut server = match Server::start(&spec.engine, &spec.device, timeout).await {
        Ok(server) => server,
        Err(e) => {
            // In place of the hello: the agent names this as the reason the worker failed.
            let message = format!("{e:#}");
            let _ = write_json(
                &mut writer,
                FrameKind::Error,
                &WireError { seq: 0, message },
            )
            .await;
            return Err(e);
        }
    };
    let block_size = spec.engine.block_size;
    let hasher = spec.engine.block_hasher();
    // The engine's own KV events where it publishes them; else the approximate record.
    let (engine_events, mut translated) = match &server.kv_events {
        Some((endpoint, replay)) => {
            let (tx, rx) = mpsc::channel(EVENT_CHANNEL);
            let config = SubscriberConfig {
                endpoint: endpoint.clone(),
                replay_endpoint: replay.clone(),
                topic: String::new(),
                worker: spec.worker,
                block_size,
                replay_timeout: REPLAY_TIMEOUT,
                hasher: spec.engine.block_hasher(),
            };
            (Some(subscribe(config, tx)), Some(rx))
        }
        None => {
            if matches!(kind, WireEngine::Vllm | WireEngine::Sglang) {
                tracing::info!(
                    engine = name,
                    "no kv_events endpoint configured: KV events are approximate"
                );
            }
            (None, None)
        }
    };
    let capacity = u64::from(external.slots.max(1)) * u64::from(spec.engine.context_length)
        / block_size.get() as u64;
    tracing::info!(engine = name, url = %server.base, device = %spec.device, kv_blocks_total = capacity,
        "worker ready: the engine server is healthy");
    write_json(
        &mut writer,
        FrameKind::Hello,
        &WorkerHello {
            worker: spec.worker,
            pid: std::process::id(),
            engine: match server.version().await {
                Some(version) => format!("{name} {version}"),
                None => name.to_owned(),
            },
            kv_blocks_total: capacity,
            kv_layout: None,
            endpoint: Some(server.base.clone()),
        },
    )
    .await?;

    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .build()?;
    let engine_load =
        load::has_metrics(kind).then(|| load::poll(client.clone(), server.base.clone(), kind));
    let (tx, mut rx) = mpsc::unbounded_channel::<(u64, Msg)>();
    let mut running: HashMap<u64, Running> = HashMap::new();
    let mut kv = ApproxKv::new(capacity as usize, Duration::from_secs(external.kv_ttl_secs));
    let mut next_event = 0u64;
    // With translated events: G1 blocks the engine holds, by its events.
    let mut engine_blocks: u64 = 0;
    let mut status = WireStatus {
        kv_blocks_total: capacity,
        ..WireStatus::default()
    };
    let slots = external.slots.max(1);
    let mut tick = tokio::time::interval(STATUS_INTERVAL);
    let mut out = Vec::new();
    loop {
        let mut events = Vec::new();
        tokio::select! {
            frame = frames.next() => {
                let Some(frame) = frame.context("reading from the agent")? else {
                    tracing::info!("the agent closed the socket: exiting");
                    return Ok(());
                };
                match frame.kind {
                    FrameKind::Request => {
                        let request: WireRequest = frame.parse_json()?;
                        let seq = request.seq;
                        if let Some(why) = client::unsupported(kind, &request.sampling).map(|(_, why)| why)
                            .or_else(|| (request.export_kv || request.kv_blocks > 0).then(||
                                format!("KV export and import are not supported on engine {name}")))
                        {
                            tracing::warn!(request_id = %request.request_id, error = %why, "request refused");
                            encode_json(FrameKind::Error, &WireError { seq, message: why }, &mut out)?;
                        } else {
                            tracing::info!(request_id = %request.request_id, prompt_tokens = request.prompt.len(),
                                max_tokens = request.sampling.max_tokens, "request started");
                            status.admitted += 1;
                            let task = tokio::spawn(run_request(client.clone(), server.base.clone(), kind,
                                request.clone(), tx.clone()));
                            running.insert(seq, Running {
                                request_id: request.request_id,
                                cache_salt: request.sampling.cache_salt.clone(),
                                prompt: request.prompt,
                                output: Vec::new(),
                                arrival: Instant::now(),
                                last_token: None,
                                task,
                            });
                        }
                    }
                    FrameKind::Cancel => {
                        let cancel: WireCancel = frame.parse_json()?;
                        if let Some(r) = running.remove(&cancel.seq) {
                            // Dropping the HTTP call closes its connection: the server frees the slot.
                            r.task.abort();
                            tracing::info!(request_id = %r.request_id, "request cancelled");
                        }
                    }
                    FrameKind::KvBlock => {
                        tracing::warn!(engine = name, "attached KV block dropped: this engine imports none");
                    }
                    FrameKind::Control => match frame.parse_json()? {
                        Control::Stop => {
                            tracing::info!("stopping on the agent's request");
                            return Ok(());
                        }
                        // It imports no KV, so nothing it holds came from another node.
                        Control::EvictOrigin { .. } => {}
                    },
                    FrameKind::Ping => {
                        super::protocol::codec().encode(FrameKind::Pong, &frame.payload, &mut out)?;
                    }
                    other => anyhow::bail!("unexpected {other:?} frame from the agent"),
                }
            }
            Some((seq, msg)) = rx.recv() => {
                let now = Instant::now();
                match msg {
                    Msg::Update(Update::Tokens(chunk)) => {
                        if let Some(r) = running.get_mut(&seq) {
                            match r.last_token {
                                None => status.latencies.ttft.observe_seconds((now - r.arrival).as_secs_f64()),
                                Some(last) => status.latencies.itl.observe_seconds((now - last).as_secs_f64()),
                            }
                            r.last_token = Some(now);
                            r.output.extend_from_slice(&chunk.tokens);
                            encode_json(FrameKind::Token, &WireTokens { seq, chunk }, &mut out)?;
                        }
                    }
                    Msg::Update(Update::Done { reason, cached_tokens }) => {
                        if let Some(r) = running.remove(&seq) {
                            status.finished += 1;
                            status.output_tokens += r.output.len() as u64;
                            status.prefix_query_tokens += r.prompt.len() as u64;
                            status.prefix_hit_tokens += cached_tokens.min(r.prompt.len() as u64);
                            if translated.is_none() {
                                let mut sequence = r.prompt;
                                sequence.extend_from_slice(&r.output);
                                let hashes = hasher.salted(r.cache_salt.as_deref()).block_hashes(&sequence, block_size);
                                for data in kv.record(&hashes, now) {
                                    events.push(data);
                                }
                            }
                            encode_json(FrameKind::Finish, &WireFinish { seq, reason }, &mut out)?;
                        }
                    }
                    Msg::Failed(message) => {
                        if let Some(r) = running.remove(&seq) {
                            tracing::warn!(request_id = %r.request_id, error = %message, "request failed");
                            encode_json(FrameKind::Error, &WireError { seq, message }, &mut out)?;
                        }
                    }
                }
            }
            error = server.exited() => {
                for r in running.values() {
                    r.task.abort();
                }
                let message = format!("{error:#}");
                tracing::error!(error = %message, "the engine server exited: the worker exits");
                // The agent records it as the reason the worker failed.
                encode_json(FrameKind::Error, &WireError { seq: 0, message }, &mut out)?;
                writer.write_all(&out).await?;
                writer.flush().await?;
                return Err(error);
            }
            event = recv_some(&mut translated) => {
                // Already numbered and tiered by the translator; the approximate record is off.
                let batch = match event {
                    Some(event) => {
                        let mut batch = vec![event];
                        while let Some(Ok(event)) = translated.as_mut().map(mpsc::Receiver::try_recv) {
                            batch.push(event);
                        }
                        batch
                    }
                    None => {
                        // The subscriber gave up (it logged why): what it credited can no longer
                        // be withdrawn, so it is withdrawn now, and this worker gets no credit.
                        translated = None;
                        tracing::warn!(engine = name, "the engine's KV event stream ended: its blocks cleared, no more KV events from this worker");
                        [Tier::G1, Tier::G2, Tier::G3].into_iter().map(|tier| {
                            next_event += 1;
                            KvEvent { worker: spec.worker, event_id: next_event - 1, tier, data: KvEventData::Cleared }
                        }).collect()
                    }
                };
                if let Some(last) = batch.last() {
                    next_event = last.event_id + 1;
                }
                for event in &batch {
                    if event.tier == Tier::G1 {
                        engine_blocks = match &event.data {
                            KvEventData::Stored { blocks, .. } => engine_blocks + blocks.len() as u64,
                            KvEventData::Removed { blocks } => engine_blocks.saturating_sub(blocks.len() as u64),
                            KvEventData::Cleared => 0,
                        };
                    }
                }
                encode_json(FrameKind::KvEvents, &WireKvEvents { events: batch }, &mut out)?;
            }
            _ = tick.tick() => {
                let reading = engine_load.as_ref().and_then(|latest| *latest.borrow());
                let now = Instant::now();
                (status.running, status.waiting) = load::blend(reading, now, running.len() as u32, slots);
                match &engine_events {
                    Some(counters) => {
                        status.kv_blocks_used = engine_blocks;
                        status.engine_events = Some(counters.get().map(|c| {
                            c.borrow().families().iter().map(|(n, _, v)| ((*n).to_owned(), *v)).collect()
                        }).unwrap_or_default());
                    }
                    None => {
                        events.extend(kv.expire(now));
                        // The engine's own fill where it says (it also holds what it evicts
                        // late, which the approximate record cannot know).
                        status.kv_blocks_used = match reading.and_then(|(_, l)| l.kv_usage) {
                            Some(usage) => (usage * capacity as f64).round() as u64,
                            None => kv.len() as u64,
                        };
                    }
                }
                encode_json(FrameKind::Status, &status, &mut out)?;
            }
        }
        if !events.is_empty() {
            let events: Vec<KvEvent> = events
                .into_iter()
                .map(|data| {
                    next_event += 1;
                    KvEvent {
                        worker: spec.worker,
                        event_id: next_event - 1,
                        tier: Tier::G1,
                        data,
                    }
                })
                .collect();
            encode_json(FrameKind::KvEvents, &WireKvEvents { events }, &mut out)?;
        }
        if !out.is_empty() {
            writer.write_all(&out).await?;
            writer.flush().await?;
            out.clear();
        }
    }
}

/// The next translated event, where there is a stream (never, where there is none).
async fn recv_some(rx: &mut Option<mpsc::Receiver<KvEvent>>) -> Option<KvEvent> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// The translator's counters, once the subscriber has connected.
type Counters = Arc<OnceLock<watch::Receiver<TranslatorCounters>>>;

/// Connects to the engine's KV event publisher and translates its stream into `events` until
/// the worker exits (the task ends with the receiver). Connecting waits for the engine to
/// listen, so it runs beside the worker loop.
fn subscribe(config: SubscriberConfig, events: mpsc::Sender<KvEvent>) -> Counters {
    let counters = Counters::default();
    let published = counters.clone();
    tokio::spawn(
        async move {
            let endpoint = config.endpoint.clone();
            let subscriber = match Subscriber::connect(config).await {
                Ok(subscriber) => subscriber,
                Err(error) => {
                    tracing::warn!(%error, "no KV events from the engine: its routing credit is lost");
                    return;
                }
            };
            let _ = published.set(subscriber.counters());
            tracing::info!(%endpoint, "subscribed to the engine's KV events");
            if let Err(error) = subscriber.run(events, std::future::pending()).await {
                tracing::warn!(%error, "the engine's KV event stream ended");
            }
        }
        .in_current_span(),
    );
    counters
}

async fn run_request(
    client: reqwest::Client,
    base: String,
    kind: super::protocol::WireEngine,
    request: WireRequest,
    tx: mpsc::UnboundedSender<(u64, Msg)>,
) {
    let seq = request.seq;
    let result = client::stream(&client, &base, kind, &request, |update| {
        let _ = tx.send((seq, Msg::Update(update)));
    })
    .await;
    if let Err(message) = result {
        let _ = tx.send((seq, Msg::Failed(message)));
    }
}
