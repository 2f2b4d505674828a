//! One worker's process life, supervised: start the agent's binary as `worker --socket PATH`,
//! accept its connection and hello, read its frames into the pool's state (tokens into each
//! request's channel, KV blocks to a prefill's receiver, statuses and KV events), and when it
//! exits or breaks the protocol fail its requests and start it again after an exponential
//! backoff (`restart_backoff_initial` doubling to `restart_backoff_max`, reset after
//! `HEALTHY_RUN` of healthy running). A stopped worker gets a `Stop` frame and `STOP_GRACE`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use kvfleet_proto::frame::{Frame, FrameKind};
use kvfleet_proto::{KvEvent, WorkerId};
use tokio::io::AsyncWriteExt as _;
use tokio::net::UnixListener;
use tokio::process::{Child, Command};
use tokio::sync::{broadcast, mpsc};

use super::super::protocol::{
    Control, FrameStream, KvBlockHeader, WireError, WireFinish, WireKvEvents, WireStatus,
    WireTokens, WorkerHello, codec, write_json,
};
use super::{Conn, Launch, Slot};
use crate::backend::{ExportedBlock, GenEvent, WorkerState};
use crate::logging::LogFormat;

/// A worker restarted after running at least this long starts again from the initial backoff.
const HEALTHY_RUN: Duration = Duration::from_secs(60);
/// How long a stopping worker gets before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// Restarts one worker forever (with backoff) until shutdown.
pub(super) async fn supervise(slot: Arc<Slot>, launch: Launch) {
    let initial = launch.supervisor.restart_backoff_initial;
    let mut backoff = initial;
    loop {
        let started = tokio::time::Instant::now();
        let outcome = run_once(&slot, &launch).await;
        slot.set(|s| {
            if let Some(conn) = s.conn.take() {
                conn.fail_all(&format!(
                    "worker {} stopped during the request; retry it",
                    slot.id
                ));
            }
            s.pid = None;
            s.status = WireStatus::default();
            s.kv_layout = None;
            s.endpoint = None;
        });
        if slot.stop.is_cancelled() {
            slot.set(|s| s.state = WorkerState::Stopped);
            tracing::info!(worker = %slot.id, "worker stopped");
            return;
        }
        let reason = match outcome {
            Ok(reason) => reason,
            Err(e) => format!("{e:#}"),
        };
        if started.elapsed() >= HEALTHY_RUN {
            backoff = initial;
        }
        slot.set(|s| {
            s.state = WorkerState::Failed;
            s.last_error = Some(reason.clone());
        });
        tracing::error!(worker = %slot.id, %reason, restart_in_ms = backoff.as_millis() as u64,
            "worker failed; restarting after backoff");
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = slot.stop.cancelled() => {
                slot.set(|s| s.state = WorkerState::Stopped);
                return;
            }
        }
        backoff = (backoff * 2).min(launch.supervisor.restart_backoff_max);
    }
}

fn socket_path(dir: &Path, id: WorkerId, tag: u64) -> PathBuf {
    dir.join(format!("worker-{}-{}-{tag}.sock", std::process::id(), id.0))
}

/// Starts the process, serves it until it dies or shutdown; returns why it ended.
async fn run_once(slot: &Arc<Slot>, launch: &Launch) -> anyhow::Result<String> {
    let dir = &launch.supervisor.socket_dir;
    std::fs::create_dir_all(dir)
        .with_context(|| format!("creating the socket directory {}", dir.display()))?;
    let path = socket_path(dir, slot.id, slot.tag);
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(e).with_context(|| format!("removing stale socket {}", path.display()));
        }
    }
    let listener = UnixListener::bind(&path)
        .with_context(|| format!("binding worker socket {}", path.display()))?;
    let _cleanup = RemoveOnDrop(path.clone());
    slot.set(|s| {
        s.state = WorkerState::Starting;
        s.starts += 1;
    });
    let log_format = match launch.log.format {
        LogFormat::Text => "text",
        LogFormat::Json => "json",
    };
    let mut child = Command::new(&launch.command.program)
        .arg("worker")
        .arg("--socket")
        .arg(&path)
        .args(["--log-format", log_format, "--log-level", &launch.log.level])
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", launch.command.program.display()))?;
    let pid = child.id();
    slot.set(|s| s.pid = pid);
    tracing::info!(worker = %slot.id, pid, model = %slot.model.name, device = %slot.config.device,
        role = %slot.config.role, "worker process started");

    let start_timeout = launch.supervisor.start_timeout;
    let stream = tokio::select! {
        accepted = tokio::time::timeout(start_timeout, listener.accept()) => match accepted {
            Ok(Ok((stream, _))) => stream,
            Ok(Err(e)) => return Err(e).context("accepting the worker's connection"),
            Err(_) => anyhow::bail!("the worker did not connect within {start_timeout:?}"),
        },
        status = child.wait() => anyhow::bail!("the worker exited before connecting: {}", describe(status)),
        () = slot.stop.cancelled() => return Ok("shutdown".into()),
    };
    let (reader, mut writer) = stream.into_split();
    let mut frames = FrameStream::new(reader);
    write_json(
        &mut writer,
        FrameKind::Hello,
        &slot.spec(launch.vocab_size, &launch.supervisor),
    )
    .await?;
    let hello = tokio::select! {
        frame = tokio::time::timeout(start_timeout, frames.next()) => match frame {
            Ok(Ok(Some(frame))) if frame.kind == FrameKind::Hello => frame.parse_json::<WorkerHello>()?,
            // The worker could not build its engine (an external server that did not start)
            // and says why before it exits.
            Ok(Ok(Some(frame))) if frame.kind == FrameKind::Error => {
                anyhow::bail!("{}", frame.parse_json::<WireError>()?.message)
            }
            Ok(Ok(Some(frame))) => anyhow::bail!("expected Hello from the worker, got {:?}", frame.kind),
            Ok(Ok(None)) => anyhow::bail!("the worker closed its socket during the handshake"),
            Ok(Err(e)) => return Err(e).context("reading the worker's Hello"),
            Err(_) => anyhow::bail!("the worker did not finish loading within {start_timeout:?}"),
        },
        status = child.wait() => anyhow::bail!("the worker exited while loading: {}", describe(status)),
        () = slot.stop.cancelled() => return Ok("shutdown".into()),
    };

    let (tx, mut rx) = mpsc::unbounded_channel::<Frame>();
    let conn = Arc::new(Conn {
        tx,
        pending: Mutex::new(HashMap::new()),
        next_seq: AtomicU64::new(1),
        send: Mutex::new(()),
        alive: AtomicBool::new(true),
    });
    // The outgoing queue holds at most a Request and a Cancel per admitted request (admission
    // bounds those) plus a Stop: unbounded in type, bounded in practice.
    let writer_task = AbortOnDrop(tokio::spawn(async move {
        let codec = codec();
        let mut buf = Vec::new();
        while let Some(frame) = rx.recv().await {
            buf.clear();
            if codec.encode(frame.kind, &frame.payload, &mut buf).is_err() {
                continue;
            }
            // Batch whatever else is queued into one write.
            while let Ok(more) = rx.try_recv() {
                let _ = codec.encode(more.kind, &more.payload, &mut buf);
            }
            if writer.write_all(&buf).await.is_err() {
                break;
            }
        }
    }));
    slot.set(|s| {
        s.conn = Some(conn.clone());
        s.state = WorkerState::Ready;
        s.status.kv_blocks_total = hello.kv_blocks_total;
        s.kv_layout = hello.kv_layout.clone();
        s.endpoint = hello.endpoint.clone();
        s.engine_version = Some(hello.engine.clone());
        s.last_error = None;
    });
    tracing::info!(worker = %slot.id, pid = hello.pid, engine = %hello.engine, "worker ready");

    let reason = loop {
        tokio::select! {
            frame = frames.next() => match frame {
                // Sequence 0 is no request's: the worker's last word before it exits (an
                // external engine's server died), the reason this incarnation ended.
                Ok(Some(frame)) if frame.kind == FrameKind::Error
                    && frame.parse_json::<WireError>().is_ok_and(|e| e.seq == 0) =>
                {
                    break frame.parse_json::<WireError>().map(|e| e.message).unwrap_or_default();
                }
                Ok(Some(frame)) => {
                    if let Err(e) = dispatch(slot, &conn, frame, &launch.kv_events) {
                        break format!("protocol error: {e}");
                    }
                }
                Ok(None) => break format!("the worker closed its socket ({})", describe(child.wait().await)),
                Err(e) => break format!("reading from the worker: {e}"),
            },
            status = child.wait() => break format!("the worker process exited: {}", describe(status)),
            () = slot.stop.cancelled() => {
                conn.fail_all(&format!("worker {} is shutting down", slot.id));
                if let Ok(frame) = Frame::json(FrameKind::Control, &Control::Stop) {
                    let _ = conn.tx.send(frame);
                }
                stop(&mut child).await;
                return Ok("shutdown".into());
            }
        }
    };
    drop(writer_task);
    // Out of the routing set before its requests hear about it, so a client that retries at
    // once is not sent back to the dead worker and `/ready` already says so.
    slot.set(|s| s.state = WorkerState::Failed);
    conn.fail_all(&format!("worker {} failed: {reason}", slot.id));
    Ok(reason)
}

async fn stop(child: &mut Child) {
    if tokio::time::timeout(STOP_GRACE, child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
}

fn dispatch(
    slot: &Slot,
    conn: &Conn,
    frame: Frame,
    kv_events: &broadcast::Sender<KvEvent>,
) -> anyhow::Result<()> {
    match frame.kind {
        FrameKind::KvBlock => match KvBlockHeader::parse(&frame.payload) {
            Ok((header, _)) => {
                // The block's bytes are the payload after the header: shared, not copied.
                let data = bytes::Bytes::from(frame.payload)
                    .slice(super::super::protocol::KV_BLOCK_HEADER_LEN..);
                conn.deliver_block(
                    header.seq,
                    ExportedBlock {
                        index: header.index,
                        hash: header.hash,
                        data,
                    },
                );
            }
            Err(e) => {
                tracing::warn!(worker = %slot.id, error = %e, "malformed KV block frame dropped")
            }
        },
        FrameKind::Token => {
            let tokens: WireTokens = frame.parse_json()?;
            let seq = tokens.seq;
            slot.tokens
                .fetch_add(tokens.chunk.tokens.len() as u64, Ordering::Relaxed);
            conn.deliver(seq, tokens.into(), false);
        }
        FrameKind::KvEvents => {
            let batch: WireKvEvents = frame.parse_json()?;
            for event in batch.events {
                // No subscriber is not an error: the events are for whoever listens.
                let _ = kv_events.send(event);
            }
        }
        FrameKind::Finish => {
            let finish: WireFinish = frame.parse_json()?;
            conn.deliver(finish.seq, GenEvent::Finished(finish.reason), true);
        }
        FrameKind::Error => {
            let error: WireError = frame.parse_json()?;
            conn.deliver(error.seq, GenEvent::Failed(error.message), true);
        }
        FrameKind::Status => {
            let status: WireStatus = frame.parse_json()?;
            slot.set(|s| {
                s.status = status;
                s.reports += 1;
            });
        }
        FrameKind::Pong => {}
        other => anyhow::bail!("unexpected {other:?} frame from the worker"),
    }
    Ok(())
}

fn describe(status: std::io::Result<std::process::ExitStatus>) -> String {
    match status {
        Ok(status) => status.to_string(),
        Err(e) => format!("unknown ({e})"),
    }
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Aborts the task when dropped, so no exit path of `run_once` leaves its writer behind.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
