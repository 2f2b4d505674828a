//! The worker process (`kvfleet-agent worker --socket PATH`): connects to the agent, builds its
//! engine from the spec the agent sends (loading the model for a native one, before it says
//! hello), then drives it, turning frames into engine calls and engine outputs (tokens, finishes,
//! KV events, exported KV blocks) into frames; import `KvBlock` frames go to the engine adapter,
//! which holds them for the request that follows them. It exits when the agent says stop or closes the socket, so an
//! agent that dies never leaves workers behind.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use kvfleet_proto::frame::FrameKind;
use tokio::io::{AsyncWriteExt, BufWriter};
use tokio::net::UnixStream;
use tokio::time::Instant;
use tracing::Instrument;

use super::engine::{Output, WorkerEngine};
use super::protocol::{
    Control, FrameStream, KvBlockHeader, WireCancel, WireError, WireFinish, WireKvEvents,
    WireRequest, WireTokens, WorkerHello, WorkerSpec, encode_json, write_json,
};

/// How often the worker reports its load.
const STATUS_INTERVAL: Duration = Duration::from_millis(250);

/// Runs a worker until the agent stops it or goes away.
pub async fn run(socket: &Path) -> anyhow::Result<()> {
    let stream = UnixStream::connect(socket)
        .await
        .with_context(|| format!("connecting to the agent at {}", socket.display()))?;
    let (reader, writer) = stream.into_split();
    let mut frames = FrameStream::new(reader);
    let writer = BufWriter::new(writer);
    let first = frames
        .next()
        .await
        .context("reading the worker spec")?
        .context("the agent closed the socket before sending the worker spec")?;
    anyhow::ensure!(
        first.kind == FrameKind::Hello,
        "expected a Hello frame first, got {:?}",
        first.kind
    );
    let spec: WorkerSpec = first.parse_json()?;
    let span = tracing::info_span!("worker", worker = %spec.worker, model = %spec.engine.model);
    if spec.engine.engine.external() {
        return super::external::serve(spec, frames, writer)
            .instrument(span)
            .await;
    }
    serve(spec, frames, writer).instrument(span).await
}

async fn serve(
    spec: WorkerSpec,
    mut frames: FrameStream<tokio::net::unix::OwnedReadHalf>,
    mut writer: BufWriter<tokio::net::unix::OwnedWriteHalf>,
) -> anyhow::Result<()> {
    let mut engine = WorkerEngine::new(spec.worker, &spec.engine)?;
    let kv_blocks_total = engine.status().kv_blocks_total;
    tracing::info!(device = %spec.device, role = %spec.role, engine = engine.name(), kv_blocks_total, "worker ready");
    write_json(
        &mut writer,
        FrameKind::Hello,
        &WorkerHello {
            worker: spec.worker,
            pid: std::process::id(),
            engine: engine.name().to_owned(),
            kv_blocks_total,
            kv_layout: Some(engine.kv_layout().clone()),
            endpoint: None,
        },
    )
    .await?;

    let epoch = Instant::now();
    let mut status_tick = tokio::time::interval(STATUS_INTERVAL);
    let mut out = Vec::new();
    loop {
        let wake = engine.next_wakeup().map(|t| epoch + t);
        tokio::select! {
            frame = frames.next() => {
                let Some(frame) = frame.context("reading from the agent")? else {
                    tracing::info!("the agent closed the socket: exiting");
                    return Ok(());
                };
                match frame.kind {
                    FrameKind::Request => {
                        let request: WireRequest = frame.parse_json()?;
                        let (seq, request_id) = (request.seq, request.request_id.clone());
                        tracing::info!(request_id = %request_id, prompt_tokens = request.prompt.len(),
                            max_tokens = request.sampling.max_tokens, "request started");
                        if let Err(e) = engine.submit(request, epoch.elapsed()) {
                            tracing::warn!(request_id = %request_id, error = %e, "request refused");
                            encode_json(FrameKind::Error, &WireError { seq, message: e.to_string() }, &mut out)?;
                        }
                    }
                    FrameKind::KvBlock => match KvBlockHeader::parse(&frame.payload) {
                        Ok((header, data)) => {
                            if let Err(e) = engine.add_import_block(header.seq, header.index, data) {
                                tracing::warn!(seq = header.seq, index = header.index, error = %e,
                                    "attached KV block dropped: it will be recomputed");
                            }
                        }
                        Err(e) => tracing::warn!(error = %e, "malformed KV block frame dropped"),
                    },
                    FrameKind::Cancel => {
                        let cancel: WireCancel = frame.parse_json()?;
                        if let Some(request_id) = engine.cancel(cancel.seq) {
                            tracing::info!(request_id = %request_id, "request cancelled: KV blocks freed");
                        }
                    }
                    FrameKind::Control => match frame.parse_json()? {
                        Control::Stop => {
                            tracing::info!("stopping on the agent's request");
                            return Ok(());
                        }
                        Control::EvictOrigin { node } => {
                            let blocks = engine.evict_origin(node);
                            tracing::warn!(%node, blocks,
                                "a revoked node's KV blocks evicted from every tier");
                        }
                    },
                    FrameKind::Ping => {
                        codec_frame(FrameKind::Pong, &frame.payload, &mut out)?;
                    }
                    other => anyhow::bail!("unexpected {other:?} frame from the agent"),
                }
            }
            () = sleep_until(wake), if wake.is_some() => {
                for output in engine.step(epoch.elapsed())? {
                    match output {
                        Output::Tokens { seq, chunk } => {
                            encode_json(FrameKind::Token, &WireTokens { seq, chunk }, &mut out)?;
                        }
                        Output::Finished { seq, reason } => {
                            encode_json(FrameKind::Finish, &WireFinish { seq, reason }, &mut out)?;
                        }
                        Output::KvBlocks { seq, first_block, hashes, data } => {
                            encode_blocks(seq, first_block, &hashes, &data, engine.block_bytes(), &mut out)?;
                        }
                        Output::Failed { seq, message } => {
                            encode_json(FrameKind::Error, &WireError { seq, message }, &mut out)?;
                        }
                    }
                }
            }
            _ = status_tick.tick() => {
                encode_json(FrameKind::Status, &engine.status(), &mut out)?;
            }
        }
        // In frames of at most 1024 events, far below the payload limit.
        for events in engine.drain_kv_events().chunks(1024) {
            encode_json(
                FrameKind::KvEvents,
                &WireKvEvents {
                    events: events.to_vec(),
                },
                &mut out,
            )?;
        }
        if !out.is_empty() {
            writer.write_all(&out).await?;
            writer.flush().await?;
            out.clear();
        }
    }
}

/// One binary `KvBlock` frame per block (the engine adapter refused layouts whose blocks do not
/// fit a frame at submit).
fn encode_blocks(
    seq: u64,
    first_block: u32,
    hashes: &[kvfleet_proto::SequenceHash],
    data: &[u8],
    block_bytes: usize,
    out: &mut Vec<u8>,
) -> anyhow::Result<()> {
    for ((index, &hash), block) in (first_block..)
        .zip(hashes)
        .zip(data.chunks(block_bytes.max(1)))
    {
        let header = KvBlockHeader { seq, index, hash };
        codec_frame(FrameKind::KvBlock, &header.payload(block), out)?;
    }
    Ok(())
}

fn codec_frame(kind: FrameKind, payload: &[u8], out: &mut Vec<u8>) -> anyhow::Result<()> {
    super::protocol::codec().encode(kind, payload, out)?;
    Ok(())
}

/// Waits for the engine's next event. A step due within the timer's resolution (1 ms) runs
/// after a yield instead: at zero cost per token a 1 ms sleep per step would be the bottleneck.
async fn sleep_until(when: Option<Instant>) {
    if let Some(when) = when {
        if when <= Instant::now() + Duration::from_micros(500) {
            tokio::task::yield_now().await;
        } else {
            tokio::time::sleep_until(when).await;
        }
    }
}
