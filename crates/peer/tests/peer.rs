//! The peer transport end to end: real quinn endpoints on 127.0.0.1, certificates from a node
//! CA made in the test exactly as the control plane makes them.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use kvfleet_peer::*;
use kvfleet_proto::frame::FrameKind;
use kvfleet_proto::peer::{
    CancelMessage, KvBlockHeader, KvHandshake, PeerMessage, kv_block_frame_prefix,
};
use kvfleet_proto::{KvDtype, SamplingParams};
use tokio::sync::Semaphore;

const WAIT: Duration = Duration::from_secs(5);

#[tokio::test]
async fn forwarded_generate_streams_tokens_and_finish_and_names_both_nodes() -> anyhow::Result<()> {
    let ca = TestCa::new("fleet CA");
    let server_cert = ca.issue(new_node());
    let client_cert = ca.issue(new_node());
    let server = Server::start(&server_cert).await?;
    let client = client(&client_cert)?;
    assert_eq!(client.node_id(), client_cert.node);

    let connection = client.connect(server.addr, server.node).await?;
    assert_eq!(
        connection.peer().node_id,
        server.node,
        "the server's certificate names it"
    );
    let mut request = request("echo", vec![1, 2, 3, 4, 5]);
    request.sampling = SamplingParams {
        logprobs: Some(1),
        ..SamplingParams::greedy(16)
    };
    let mut stream = connection.generate(&request).await?;
    let (chunks, finish) = collect(&mut stream).await?;
    let tokens: Vec<u32> = chunks.iter().flat_map(|c| c.tokens.clone()).collect();
    assert_eq!(tokens, [5, 4, 3, 2, 1]);
    assert_eq!(chunks.len(), 3, "chunking is preserved");
    let logprobs = chunks[0].logprobs.as_ref().expect("logprobs asked for");
    assert_eq!(logprobs[0].token, 5);
    assert_eq!(logprobs[0].top[0].token, 6);
    assert_eq!(finish.reason, FinishReason::Length);
    assert_eq!(finish.usage.prompt_tokens, 5);
    assert_eq!(finish.usage.completion_tokens, 5);
    assert_eq!(
        *server.handler.callers.lock().unwrap(),
        [client_cert.node],
        "the handler learns the caller's node id from its certificate"
    );

    // Many requests multiplexed on the cached connection.
    let cached = client.connection(server.addr, server.node).await?;
    let mut tasks = Vec::new();
    for i in 0..20u32 {
        let connection = cached.clone();
        tasks.push(tokio::spawn(async move {
            let mut stream = connection.generate(&request_of(i)).await?;
            collect(&mut stream).await
        }));
    }
    for (i, task) in tasks.into_iter().enumerate() {
        let (chunks, _) = task.await??;
        let first = chunks[0].tokens[0];
        assert_eq!(first, i as u32 + 2, "request {i} got its own answer");
    }
    let again = client.connection(server.addr, server.node).await?;
    assert_eq!(again.peer().node_id, server.node);
    assert_eq!(
        client.metrics().snapshot().connections_opened,
        2,
        "the second call reuses the cached connection"
    );
    assert_eq!(server.metrics().generate_served, 21);
    assert_eq!(client.metrics().snapshot().generate_forwarded, 21);
    assert_eq!(server.metrics().connections_accepted, 2);
    server.shutdown().await
}

fn request_of(i: u32) -> GenerateRequest {
    request("echo", vec![i, i + 1, i + 2])
}

#[tokio::test]
async fn dropping_the_client_stream_cancels_on_the_serving_node() -> anyhow::Result<()> {
    let ca = TestCa::new("fleet CA");
    let server_cert = ca.issue(new_node());
    let server = Server::start(&server_cert).await?;
    let client = client(&ca.issue(new_node()))?;
    let connection = client.connect(server.addr, server.node).await?;

    // Drop after two chunks.
    let mut stream = connection.generate(&request("endless", vec![1])).await?;
    for _ in 0..2 {
        assert!(matches!(
            stream.next().await?,
            Some(GenerateEvent::Tokens(_))
        ));
    }
    drop(stream);
    let dropped = server.handler.dropped.clone();
    assert!(
        eventually(WAIT, || dropped.load(Ordering::SeqCst) == 1).await,
        "the handler's event stream is dropped on the serving node"
    );
    assert!(eventually(WAIT, || server.metrics().generate_cancelled == 1).await);

    // An explicit cancel with a reason does the same.
    let mut stream = connection.generate(&request("endless", vec![1])).await?;
    assert!(matches!(
        stream.next().await?,
        Some(GenerateEvent::Tokens(_))
    ));
    stream.cancel("client went away").await;
    assert!(eventually(WAIT, || dropped.load(Ordering::SeqCst) == 2).await);
    assert!(eventually(WAIT, || server.metrics().generate_cancelled == 2).await);

    // Cancelled at once, perhaps before the server read the request: then it was never served.
    let stream = connection.generate(&request("endless", vec![1])).await?;
    drop(stream);

    // The connection still serves; every request served and not finished was cancelled.
    let mut stream = connection.generate(&request("echo", vec![7])).await?;
    collect(&mut stream).await?;
    assert!(
        eventually(WAIT, || {
            let m = server.metrics();
            m.generate_served == m.generate_cancelled + 1
        })
        .await,
        "{:?}",
        server.metrics()
    );
    let errors: u64 = server.metrics().errors.iter().map(|(_, n)| n).sum();
    assert_eq!(errors, 0, "cancels are not errors: {:?}", server.metrics());
    server.shutdown().await
}

#[tokio::test]
async fn handler_refusals_and_failures_reach_the_client_typed() -> anyhow::Result<()> {
    let ca = TestCa::new("fleet CA");
    let server_cert = ca.issue(new_node());
    let server = Server::start(&server_cert).await?;
    let client = client(&ca.issue(new_node()))?;
    let connection = client.connect(server.addr, server.node).await?;

    let mut stream = connection.generate(&request("overloaded", vec![1])).await?;
    let error = stream.next().await.expect_err("refused");
    assert_eq!(error.remote_code(), Some(ErrorCode::Overloaded), "{error}");

    let mut stream = connection.generate(&request("fails", vec![1])).await?;
    assert!(matches!(
        stream.next().await?,
        Some(GenerateEvent::Tokens(_))
    ));
    let error = stream.next().await.expect_err("failed mid-stream");
    assert_eq!(error.remote_code(), Some(ErrorCode::Internal), "{error}");
    assert_eq!(server.metrics().error(ErrorKind::Handler), 2);

    // A request the client itself would send invalid never leaves it.
    let invalid = request("echo", vec![]);
    assert!(matches!(
        connection.generate(&invalid).await,
        Err(PeerError::Protocol(_))
    ));
    server.shutdown().await
}

#[tokio::test]
async fn a_client_certificate_from_another_ca_is_refused_and_counted() -> anyhow::Result<()> {
    let ca = TestCa::new("fleet CA");
    let rogue_ca = TestCa::new("fleet CA"); // same name, different key
    let server_cert = ca.issue(new_node());
    let server = Server::start(&server_cert).await?;

    // The rogue client trusts the real CA (so it accepts the server) but holds a rogue cert.
    let mut rogue = rogue_ca.issue(new_node());
    rogue.identity.ca_pem = ca.cert_pem.clone();
    let rogue_client = client(&rogue)?;
    let refused = async {
        let connection = rogue_client.connect(server.addr, server.node).await?;
        let mut stream = connection.generate(&request("echo", vec![1])).await?;
        stream.next().await
    }
    .await;
    let error = refused.expect_err("the server refuses a certificate from another CA");
    assert!(
        matches!(
            error,
            PeerError::HandshakeRefused { .. } | PeerError::Connection { .. }
        ),
        "{error:?}"
    );
    assert!(
        eventually(WAIT, || server.metrics().error(ErrorKind::TlsRefused) == 1).await,
        "counted on the server"
    );
    assert_eq!(server.metrics().generate_served, 0);

    // The other way round: a server with a rogue certificate is refused by the client.
    let rogue_server_cert = rogue_ca.issue(new_node());
    let rogue_server = Server::start(&rogue_server_cert).await?;
    let honest = client(&ca.issue(new_node()))?;
    let error = honest
        .connect(rogue_server.addr, rogue_server.node)
        .await
        .expect_err("the client refuses a server certificate from another CA");
    assert!(
        matches!(error, PeerError::HandshakeRefused { .. }),
        "{error:?}"
    );
    assert_eq!(honest.metrics().errors(ErrorKind::TlsRefused), 1);

    // A genuine certificate for a different node than the one dialled is refused too.
    let error = honest
        .connect(server.addr, new_node())
        .await
        .expect_err("wrong node name");
    assert!(
        matches!(error, PeerError::HandshakeRefused { .. }),
        "{error:?}"
    );

    // The endpoint still serves good peers.
    let connection = honest.connect(server.addr, server.node).await?;
    let mut stream = connection.generate(&request("echo", vec![1, 2])).await?;
    collect(&mut stream).await?;
    rogue_server.shutdown().await?;
    server.shutdown().await
}

#[tokio::test]
async fn a_peer_without_a_client_certificate_is_refused_and_counted() -> anyhow::Result<()> {
    let ca = TestCa::new("fleet CA");
    let server_cert = ca.issue(new_node());
    let server = Server::start(&server_cert).await?;
    let attempt = async {
        let connection = raw_connection(&server, &ca.cert_pem, None).await?;
        let (mut send, mut recv) = connection.open_bi().await?;
        send.write_all(&frame(&PeerMessage::Generate(request("echo", vec![1]))))
            .await?;
        let answer = recv.read_to_end(1 << 20).await?;
        anyhow::Ok(answer)
    }
    .await;
    assert!(attempt.is_err(), "no certificate, no service: {attempt:?}");
    assert!(eventually(WAIT, || server.metrics().error(ErrorKind::TlsRefused) == 1).await);
    assert_eq!(server.metrics().generate_served, 0);

    // A certificate from the right CA whose name is not a node id is refused after the
    // handshake, and counted the same way.
    let odd = ca.issue_with_cn(new_node(), "not-a-node");
    let connection = raw_connection(&server, &ca.cert_pem, Some(&odd.identity)).await?;
    let closed = tokio::time::timeout(WAIT, connection.closed()).await?;
    assert!(
        matches!(closed, quinn::ConnectionError::ApplicationClosed(_)),
        "{closed:?}"
    );
    assert_eq!(server.metrics().error(ErrorKind::TlsRefused), 2);

    // Revoked serials are refused.
    let revoked = ca.issue(new_node());
    server
        .endpoint
        .set_revoked_serials([revoked.serial.clone()]);
    let connection = raw_connection(&server, &ca.cert_pem, Some(&revoked.identity)).await?;
    let closed = tokio::time::timeout(WAIT, connection.closed()).await?;
    assert!(
        matches!(closed, quinn::ConnectionError::ApplicationClosed(_)),
        "{closed:?}"
    );
    assert_eq!(server.metrics().error(ErrorKind::TlsRefused), 3);

    let good = client(&ca.issue(new_node()))?;
    let connection = good.connect(server.addr, server.node).await?;
    collect(&mut connection.generate(&request("echo", vec![3])).await?).await?;
    server.shutdown().await
}

/// One row per kind of bad first frame: the bytes, the error code the server answers with (if
/// it can answer) and the counter that must move.
#[tokio::test]
async fn malformed_frames_close_the_stream_not_the_endpoint() -> anyhow::Result<()> {
    let ca = TestCa::new("fleet CA");
    let server_cert = ca.issue(new_node());
    let server = Server::start(&server_cert).await?;
    let peer = ca.issue(new_node());
    let connection = raw_connection(&server, &ca.cert_pem, Some(&peer.identity)).await?;

    let good = frame(&PeerMessage::Generate(request("echo", vec![1, 2])));
    let mut bad_crc = good.clone();
    let last = bad_crc.len() - 1;
    bad_crc[last] ^= 0xff;
    let mut huge = good.clone();
    huge[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
    let cases: Vec<(&str, Vec<u8>, ErrorCode, ErrorKind)> = vec![
        (
            "http",
            b"GET / HTTP/1.1\r\n\r\n".to_vec(),
            ErrorCode::Malformed,
            ErrorKind::Malformed,
        ),
        (
            "bad crc",
            bad_crc,
            ErrorCode::Malformed,
            ErrorKind::Malformed,
        ),
        (
            "oversized",
            huge,
            ErrorCode::Malformed,
            ErrorKind::Malformed,
        ),
        (
            "truncated",
            good[..good.len() - 3].to_vec(),
            ErrorCode::Malformed,
            ErrorKind::Truncated,
        ),
        (
            "ping first",
            raw_frame(FrameKind::Ping, b""),
            ErrorCode::BadRequest,
            ErrorKind::BadRequest,
        ),
        (
            "bad json",
            raw_frame(FrameKind::Request, b"{\"model\":"),
            ErrorCode::BadRequest,
            ErrorKind::BadRequest,
        ),
        (
            "invalid request",
            raw_frame(
                FrameKind::Request,
                br#"{"request_id":"x","model":"m","prompt":[],"sampling":{"max_tokens":1}}"#,
            ),
            ErrorCode::BadRequest,
            ErrorKind::BadRequest,
        ),
        (
            "bad handshake",
            raw_frame(FrameKind::KvLayout, b"[]"),
            ErrorCode::Malformed,
            ErrorKind::Malformed,
        ),
    ];
    for (name, bytes, code, kind) in cases {
        let before = server.metrics().error(kind);
        let (mut send, mut recv) = connection.open_bi().await?;
        send.write_all(&bytes).await?;
        send.finish()?;
        let answer = read_answer(&mut recv).await;
        assert_eq!(
            error_code(&answer),
            Some(code),
            "case {name}: answer {answer:?}"
        );
        assert_eq!(
            server.metrics().error(kind),
            before + 1,
            "case {name} counted as {kind:?}"
        );
    }
    // A Cancel-less, unexpected frame after a request ends that stream as malformed.
    let (mut send, mut recv) = connection.open_bi().await?;
    send.write_all(&frame(&PeerMessage::Generate(request("endless", vec![1]))))
        .await?;
    // Once tokens flow, the handler is running: then the stray frame.
    recv.read(&mut [0u8; 16]).await?;
    send.write_all(&raw_frame(FrameKind::Ping, b"")).await?;
    let _ = read_answer(&mut recv).await;
    assert!(eventually(WAIT, || server.handler.dropped.load(Ordering::SeqCst) == 1).await);

    // The same connection, and the endpoint, still serve.
    assert!(
        connection.close_reason().is_none(),
        "the connection survived"
    );
    let (mut send, mut recv) = connection.open_bi().await?;
    send.write_all(&good).await?;
    let answer = read_answer(&mut recv).await;
    assert!(
        answer.iter().any(|(kind, _)| *kind == FrameKind::Finish),
        "{answer:?}"
    );
    drop((send, recv));
    let client = client(&ca.issue(new_node()))?;
    let connection = client.connect(server.addr, server.node).await?;
    collect(&mut connection.generate(&request("echo", vec![1])).await?).await?;
    // An explicit Cancel frame is honoured.
    let raw = raw_connection(&server, &ca.cert_pem, Some(&peer.identity)).await?;
    let (mut send, mut recv) = raw.open_bi().await?;
    send.write_all(&frame(&PeerMessage::Generate(request("endless", vec![1]))))
        .await?;
    recv.read(&mut [0u8; 16]).await?;
    send.write_all(&frame(&PeerMessage::Cancel(CancelMessage {
        reason: "bye".into(),
    })))
    .await?;
    assert!(eventually(WAIT, || server.handler.dropped.load(Ordering::SeqCst) == 2).await);
    server.shutdown().await
}

async fn kv_pair() -> anyhow::Result<(TestCa, Server, PeerEndpoint, PeerConnection)> {
    let ca = TestCa::new("fleet CA");
    let server_cert = ca.issue(new_node());
    let server = Server::start(&server_cert).await?;
    let client = client(&ca.issue(new_node()))?;
    let connection = client.connect(server.addr, server.node).await?;
    Ok((ca, server, client, connection))
}

#[tokio::test]
async fn kv_blocks_arrive_whole_on_parallel_streams() -> anyhow::Result<()> {
    let (_ca, server, client, connection) = kv_pair().await?;
    let layout = layout();
    server.sink.expect_request("r1");
    let blocks: Vec<KvBlock> = (0..64).map(|i| block(&layout, i)).collect();
    let report = connection
        .send_blocks(
            "r1",
            &layout,
            futures_util::stream::iter(blocks.clone()),
            &TransferOptions { streams: 4 },
        )
        .await?;
    assert_eq!(report.blocks, 64);
    assert_eq!(report.bytes, 64 * layout.block_bytes() as u64);
    assert_eq!(report.streams, 4);

    let mut received = server.sink.blocks.lock().unwrap().clone();
    received.sort_by_key(|(_, b)| b.index);
    assert_eq!(received.len(), 64);
    for ((id, got), sent) in received.iter().zip(&blocks) {
        assert_eq!(id, "r1");
        assert_eq!(got, sent, "block {} intact", sent.index);
    }
    let finished = server.sink.finished();
    assert_eq!(finished.len(), 4, "one outcome per stream");
    let total: u64 = finished
        .iter()
        .map(|(_, outcome)| outcome.as_ref().map(|d| d.blocks).unwrap_or(0))
        .sum();
    assert_eq!(total, 64);
    let streams_used = finished
        .iter()
        .filter(|(_, o)| o.as_ref().is_ok_and(|d| d.blocks > 0))
        .count();
    assert!(
        streams_used > 1,
        "blocks were spread over streams: {finished:?}"
    );

    let sent = client.metrics().snapshot();
    let got = server.metrics();
    assert_eq!(
        (
            sent.kv_transfers_sent,
            sent.kv_blocks_sent,
            sent.kv_bytes_sent
        ),
        (1, 64, report.bytes)
    );
    assert_eq!(
        (
            got.kv_streams_received,
            got.kv_blocks_received,
            got.kv_bytes_received
        ),
        (4, 64, report.bytes)
    );

    // Blocks produced over time (as prefill completes them) stream as they come.
    server.sink.expect_request("r2");
    let produced = futures_util::stream::iter(0..8u32).then(|i| {
        let layout = layout.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(5)).await;
            block(&layout, i)
        }
    });
    let report = connection
        .send_blocks(
            "r2",
            &layout,
            Box::pin(produced),
            &TransferOptions::default(),
        )
        .await?;
    assert_eq!(report.blocks, 8);
    // An empty transfer is fine too.
    let report = connection
        .send_blocks(
            "r2",
            &layout,
            futures_util::stream::empty(),
            &TransferOptions { streams: 1 },
        )
        .await?;
    assert_eq!(report.blocks, 0);
    server.shutdown().await
}

#[tokio::test]
async fn kv_layout_mismatch_and_unknown_requests_are_refused_and_counted() -> anyhow::Result<()> {
    let (_ca, server, client, connection) = kv_pair().await?;
    server.sink.expect_request("r1");
    let theirs = kvfleet_proto::KvLayout {
        dtype: KvDtype::Bf16,
        ..layout()
    };
    let pulled = Arc::new(AtomicU64::new(0));
    let counting = {
        let pulled = pulled.clone();
        let theirs = theirs.clone();
        futures_util::stream::iter(0..4u32).map(move |i| {
            pulled.fetch_add(1, Ordering::SeqCst);
            block(&theirs, i)
        })
    };
    let error = connection
        .send_blocks("r1", &theirs, counting, &TransferOptions::default())
        .await
        .expect_err("layout mismatch");
    let PeerError::Remote(message) = &error else {
        panic!("{error:?}")
    };
    assert_eq!(message.code, ErrorCode::LayoutMismatch);
    assert!(
        message.message.contains("dtype"),
        "names the field: {message}"
    );
    assert_eq!(
        pulled.load(Ordering::SeqCst),
        0,
        "refused before any block was pulled"
    );
    assert!(server.metrics().error(ErrorKind::LayoutMismatch) >= 1);
    assert!(client.metrics().errors(ErrorKind::LayoutMismatch) >= 1);

    let error = connection
        .send_blocks(
            "nobody",
            &layout(),
            futures_util::stream::iter(vec![block(&layout(), 0)]),
            &TransferOptions { streams: 1 },
        )
        .await
        .expect_err("unknown request");
    assert_eq!(
        error.remote_code(),
        Some(ErrorCode::UnknownRequest),
        "{error}"
    );
    assert_eq!(server.metrics().error(ErrorKind::UnknownRequest), 1);

    // A block the sink refuses ends the stream with ImportFailed.
    let error = connection
        .send_blocks(
            "r1",
            &layout(),
            futures_util::stream::iter(vec![block(&layout(), 666)]),
            &TransferOptions { streams: 1 },
        )
        .await
        .expect_err("import refused");
    assert_eq!(
        error.remote_code(),
        Some(ErrorCode::ImportFailed),
        "{error}"
    );
    assert_eq!(server.metrics().error(ErrorKind::ImportFailed), 1);

    // A wrong-size block is caught by the sender before it leaves.
    let mut short = block(&layout(), 1);
    short.data = short.data.slice(..10);
    let error = connection
        .send_blocks(
            "r1",
            &layout(),
            futures_util::stream::iter(vec![short]),
            &TransferOptions { streams: 1 },
        )
        .await
        .expect_err("wrong size");
    assert!(
        matches!(error, PeerError::BlockSize { actual: 10, .. }),
        "{error:?}"
    );

    // Still serving.
    let report = connection
        .send_blocks(
            "r1",
            &layout(),
            futures_util::stream::iter(vec![block(&layout(), 1)]),
            &TransferOptions::default(),
        )
        .await?;
    assert_eq!(report.blocks, 1);
    server.shutdown().await
}

/// Bad bytes on a KV stream, sent raw: each refused with its code, counted, and the sink told
/// the stream failed so it can free what it imported.
#[tokio::test]
async fn kv_checksum_size_and_truncation_are_refused_and_counted() -> anyhow::Result<()> {
    let ca = TestCa::new("fleet CA");
    let server_cert = ca.issue(new_node());
    let server = Server::start(&server_cert).await?;
    server.sink.expect_request("r1");
    let peer = ca.issue(new_node());
    let connection = raw_connection(&server, &ca.cert_pem, Some(&peer.identity)).await?;
    let layout = layout();
    let hello = frame(&PeerMessage::KvHandshake(KvHandshake {
        request_id: "r1".into(),
        layout: layout.clone(),
    }));
    let good = block(&layout, 0);
    let good_frame = frame(&PeerMessage::KvBlock {
        header: KvBlockHeader::for_block(0, good.hash, &good.data),
        data: &good.data,
    });
    let mut wrong_checksum = KvBlockHeader::for_block(1, good.hash, &good.data);
    wrong_checksum.checksum ^= 1;
    let bad_checksum = frame(&PeerMessage::KvBlock {
        header: wrong_checksum,
        data: &good.data,
    });
    let short = &good.data[..100];
    let short_frame = frame(&PeerMessage::KvBlock {
        header: KvBlockHeader::for_block(2, good.hash, short),
        data: short,
    });
    let codec = kvfleet_proto::frame::FrameCodec::default();
    let prefix = kv_block_frame_prefix(
        &codec,
        &KvBlockHeader::for_block(3, good.hash, &good.data),
        &good.data,
    )?;
    let mut cut_frame = prefix.to_vec();
    cut_frame.extend_from_slice(&good.data[..200]);
    let overcounted = frame(&PeerMessage::KvDone(KvDone {
        blocks: 5,
        bytes: 5 * good.data.len() as u64,
    }));

    let cases: Vec<(&str, Vec<Vec<u8>>, ErrorCode, ErrorKind)> = vec![
        (
            "checksum",
            vec![good_frame.clone(), bad_checksum],
            ErrorCode::ChecksumMismatch,
            ErrorKind::ChecksumMismatch,
        ),
        (
            "block size",
            vec![short_frame],
            ErrorCode::BlockSizeMismatch,
            ErrorKind::BlockSizeMismatch,
        ),
        (
            "ends without KvDone",
            vec![good_frame.clone()],
            ErrorCode::Truncated,
            ErrorKind::Truncated,
        ),
        (
            "ends inside a block",
            vec![good_frame.clone(), cut_frame],
            ErrorCode::Truncated,
            ErrorKind::Truncated,
        ),
        (
            "counts disagree",
            vec![good_frame.clone(), overcounted],
            ErrorCode::Truncated,
            ErrorKind::Truncated,
        ),
        (
            "tokens in a transfer",
            vec![frame(&PeerMessage::Tokens(TokenChunk::tokens(vec![1])))],
            ErrorCode::Malformed,
            ErrorKind::Malformed,
        ),
    ];
    for (name, frames, code, kind) in cases {
        let before = server.metrics().error(kind);
        let failures_before = server
            .sink
            .finished()
            .iter()
            .filter(|(_, o)| o.is_err())
            .count();
        let (mut send, mut recv) = connection.open_bi().await?;
        send.write_all(&hello).await?;
        for frame in frames {
            send.write_all(&frame).await?;
        }
        send.finish()?;
        let answer = read_answer(&mut recv).await;
        assert_eq!(
            answer.first().map(|(k, _)| *k),
            Some(FrameKind::KvLayout),
            "case {name}: accepted first"
        );
        assert_eq!(error_code(&answer), Some(code), "case {name}: {answer:?}");
        assert_eq!(
            server.metrics().error(kind),
            before + 1,
            "case {name} counted as {kind:?}"
        );
        let failures = server
            .sink
            .finished()
            .iter()
            .filter(|(_, o)| o.is_err())
            .count();
        assert_eq!(
            failures,
            failures_before + 1,
            "case {name}: the sink hears of the failure"
        );
    }
    // A sender that resets mid-transfer is a cancellation: the sink hears, no error counted.
    let errors_before: u64 = server.metrics().errors.iter().map(|(_, n)| n).sum();
    let (mut send, mut recv) = connection.open_bi().await?;
    send.write_all(&hello).await?;
    let _ = tokio::time::timeout(WAIT, recv.read(&mut [0u8; 64])).await?;
    send.write_all(&good_frame).await?;
    send.reset(quinn::VarInt::from_u32(1))?;
    let finished_before = server.sink.finished().len();
    assert!(eventually(WAIT, || server.sink.finished().len() == finished_before + 1).await);
    let errors_after: u64 = server.metrics().errors.iter().map(|(_, n)| n).sum();
    assert_eq!(errors_after, errors_before);

    // The endpoint keeps serving transfers.
    let client = client(&ca.issue(new_node()))?;
    let peer_connection = client.connect(server.addr, server.node).await?;
    let report = peer_connection
        .send_blocks(
            "r1",
            &layout,
            futures_util::stream::iter(vec![block(&layout, 9)]),
            &TransferOptions::default(),
        )
        .await?;
    assert_eq!(report.blocks, 1);
    server.shutdown().await
}

/// A receiver that stops importing stalls the sender within the flow-control windows: the
/// sender pulls only as many blocks from its source as the windows hold, not the whole
/// transfer. Fails if the sender buffered blocks without bound.
#[tokio::test]
async fn a_slow_receiver_bounds_what_the_sender_pulls() -> anyhow::Result<()> {
    const WINDOW: u32 = 256 * 1024;
    let ca = TestCa::new("fleet CA");
    let layout = kvfleet_proto::KvLayout {
        model: "flow".into(),
        layers: 1,
        kv_heads: 1,
        head_dim: 128,
        dtype: KvDtype::F32,
        block_size: kvfleet_proto::BlockSize::new(32).expect("block size"),
    };
    let block_bytes = layout.block_bytes() as u64; // 32 KiB
    let gate = Arc::new(Semaphore::new(0));
    let mut sink = TestSink::new(layout.clone());
    sink.gate = Some(gate.clone());
    let tune = |config: &mut PeerConfig| {
        config.stream_window = 64 * 1024;
        config.connection_window = WINDOW;
        config.send_window = u64::from(WINDOW);
    };
    let server = Server::start_with(&ca.issue(new_node()), sink, tune).await?;
    server.sink.expect_request("big");
    let client = client_with(&ca.issue(new_node()), tune)?;
    let connection = client.connect(server.addr, server.node).await?;

    const TOTAL: u32 = 400; // 12.5 MiB, 25× the windows
    let pulled = Arc::new(AtomicU64::new(0));
    let source = {
        let (pulled, layout) = (pulled.clone(), layout.clone());
        futures_util::stream::iter(0..TOTAL).map(move |i| {
            pulled.fetch_add(1, Ordering::SeqCst);
            block(&layout, i)
        })
    };
    let streams = 4u64;
    let transfer = tokio::spawn(async move {
        connection
            .send_blocks(
                "big",
                &layout,
                source,
                &TransferOptions {
                    streams: streams as usize,
                },
            )
            .await
    });
    // Let the sender run into the windows, then check it stays there.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let stalled = pulled.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        pulled.load(Ordering::SeqCst),
        stalled,
        "the sender is stalled, not still pulling"
    );
    assert_eq!(server.sink.imported.load(Ordering::SeqCst), 0);
    // Receiver window + sender buffer, plus one block per stream held by each side.
    let bound = (u64::from(WINDOW) * 2).div_ceil(block_bytes) + 2 * streams + 1;
    assert!(
        stalled <= bound,
        "the sender pulled {stalled} blocks while the receiver imported none (bound {bound})"
    );
    assert!(stalled >= streams, "some blocks were in flight: {stalled}");

    gate.add_permits(TOTAL as usize);
    let report = tokio::time::timeout(Duration::from_secs(60), transfer).await???;
    assert_eq!(report.blocks, u64::from(TOTAL));
    assert_eq!(
        server.sink.imported.load(Ordering::SeqCst),
        u64::from(TOTAL)
    );
    server.shutdown().await
}

/// Shutdown stops accepting, gives in-flight streams the drain deadline, then closes: `serve`
/// returns even when a generation would never end, and its client sees the connection close.
#[tokio::test]
async fn shutdown_drains_with_a_deadline() -> anyhow::Result<()> {
    let ca = TestCa::new("fleet CA");
    let server_cert = ca.issue(new_node());
    let server = Server::start(&server_cert).await?; // drain_timeout: 2 s
    let client = client(&ca.issue(new_node()))?;
    let connection = client.connect(server.addr, server.node).await?;
    let mut stream = connection.generate(&request("endless", vec![1])).await?;
    assert!(matches!(
        stream.next().await?,
        Some(GenerateEvent::Tokens(_))
    ));
    let dropped = server.handler.dropped.clone();
    let started = std::time::Instant::now();
    server.shutdown().await?;
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "serve returned after {:?}",
        started.elapsed()
    );
    assert_eq!(
        dropped.load(Ordering::SeqCst),
        1,
        "the handler's stream was dropped"
    );
    let ended = tokio::time::timeout(WAIT, async {
        loop {
            match stream.next().await {
                Ok(Some(_)) => continue,
                other => return other,
            }
        }
    })
    .await?;
    assert!(
        matches!(
            ended,
            Err(PeerError::Connection { .. } | PeerError::Stream(_))
        ),
        "{ended:?}"
    );
    Ok(())
}

#[tokio::test]
async fn a_renewed_certificate_is_served_without_a_restart() -> anyhow::Result<()> {
    let ca = TestCa::new("fleet CA");
    let first = ca.issue(new_node());
    let server = Server::start(&first).await?;
    let seen = |serial: &str| serial.to_ascii_lowercase();

    let before = client(&ca.issue(new_node()))?;
    let connection = before.connect(server.addr, server.node).await?;
    assert_eq!(seen(&connection.peer().serial), seen(&first.serial));

    // Renewal: the same node, a new certificate; the old one is then revoked fleet-wide.
    let renewed = ca.issue(server.node);
    server.endpoint.reload_identity(&renewed.identity)?;
    let after = client(&ca.issue(new_node()))?;
    after.set_revoked_serials([first.serial.clone()]);
    let connection = after.connect(server.addr, server.node).await?;
    assert_eq!(seen(&connection.peer().serial), seen(&renewed.serial));
    let (chunks, _) = collect(&mut connection.generate(&request_of(1)).await?).await?;
    assert!(!chunks.is_empty(), "the renewed endpoint serves");

    // Another node's certificate is refused and the current one stays.
    let foreign = ca.issue(new_node());
    assert!(server.endpoint.reload_identity(&foreign.identity).is_err());
    let again = client(&ca.issue(new_node()))?;
    let connection = again.connect(server.addr, server.node).await?;
    assert_eq!(seen(&connection.peer().serial), seen(&renewed.serial));
    server.shutdown().await
}

/// The expiry the agent exports for alerting is read from the certificate itself.
#[test]
fn an_identity_knows_when_its_certificate_expires() {
    let ca = TestCa::new("expiry CA");
    let node = ca.issue(new_node());
    // rcgen's default validity ends on 4096-01-01T00:00:00Z.
    assert_eq!(node.identity.not_after().unwrap(), 67_090_118_400);
    let broken = PeerIdentity {
        cert_pem: "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n".into(),
        ..node.identity
    };
    assert!(broken.not_after().is_err());
    let empty = PeerIdentity {
        cert_pem: String::new(),
        ..broken
    };
    assert!(empty.not_after().is_err());
}

/// Revocation bites on open connections: the serving side closes a revoked peer's accepted
/// connection (an endless stream on it included) as soon as the serials are set, the calling
/// side drops and closes its cached connection to a revoked server, and both count it. Peers
/// that were not revoked keep their connections.
#[tokio::test]
async fn revoking_a_serial_closes_open_connections_on_both_sides() -> anyhow::Result<()> {
    let ca = TestCa::new("fleet CA");
    let server_cert = ca.issue(new_node());
    let server = Server::start(&server_cert).await?;
    let bad_cert = ca.issue(new_node());
    let good_cert = ca.issue(new_node());
    let bad = client(&bad_cert)?;
    let good = client(&good_cert)?;
    let bad_connection = bad.connection(server.addr, server.node).await?;
    let good_connection = good.connection(server.addr, server.node).await?;
    let mut endless = bad_connection
        .generate(&request("endless", vec![1]))
        .await?;
    assert!(matches!(
        endless.next().await?,
        Some(GenerateEvent::Tokens(_))
    ));

    // The server learns that `bad` is revoked (the agent does this on a heartbeat response).
    server
        .endpoint
        .set_revoked_serials([bad_cert.serial.clone()]);
    assert!(
        eventually(WAIT, || bad_connection.close_reason().is_some()).await,
        "the revoked peer's open connection is closed"
    );
    let drained = tokio::time::timeout(WAIT, async {
        loop {
            match endless.next().await {
                Ok(Some(GenerateEvent::Tokens(_))) => continue,
                other => break other.is_err(),
            }
        }
    })
    .await?;
    assert!(drained, "the stream on it ends with an error, not a finish");
    assert_eq!(server.metrics().connections_revoked, 1);
    // The sink heard, so it can drop what that node supplied.
    assert_eq!(*server.sink.revoked.lock().unwrap(), vec![bad_cert.node]);
    // New connections with it are refused too.
    // (The handshake completes, then the server closes it: TLS cannot know about revocation.)
    if let Ok(fresh) = bad.connect(server.addr, server.node).await {
        assert!(eventually(WAIT, || fresh.close_reason().is_some()).await);
    }
    // The other peer is untouched.
    assert!(good_connection.close_reason().is_none());
    let (chunks, _) =
        collect(&mut good_connection.generate(&request("echo", vec![4])).await?).await?;
    assert!(!chunks.is_empty());

    // The calling side: `good` learns the server's certificate is revoked and closes its cached
    // connection; asking for a connection again is refused.
    good.set_revoked_serials([server_cert.serial.clone()]);
    assert!(good_connection.close_reason().is_some());
    assert_eq!(good.metrics().snapshot().connections_revoked, 1);
    assert!(good.connection(server.addr, server.node).await.is_err());
    // Setting the same set again closes nothing more.
    good.set_revoked_serials([server_cert.serial.clone()]);
    assert_eq!(good.metrics().snapshot().connections_revoked, 1);
    server.shutdown().await
}

/// A node with a valid fleet certificate that sends what no honest peer sends — blocks under
/// another prompt's hashes, an oversized frame, a truncated frame, a layout for another model,
/// streams that stall, more streams than its share — has each stream refused with its code and
/// counted under its kind, while an honest peer's transfer and forwarded request on the same
/// node run to completion meanwhile.
#[tokio::test]
async fn a_hostile_peer_is_refused_and_counted_and_an_honest_peer_is_not_affected()
-> anyhow::Result<()> {
    const STALL: Duration = Duration::from_millis(400);
    const PER_PEER: u32 = 4;
    let ca = TestCa::new("fleet CA");
    let server_cert = ca.issue(new_node());
    let server = Server::start_with(&server_cert, TestSink::new(layout()), |c| {
        c.stall_timeout = STALL;
        c.max_streams_per_peer = PER_PEER;
        c.max_connections_per_peer = 2;
    })
    .await?;
    server.sink.expect_request("honest");
    server.sink.expect_request("hostile");
    let layout = layout();

    // The honest peer's transfer: blocks produced slowly, so it spans everything below.
    let honest = client(&ca.issue(new_node()))?;
    let honest_connection = honest.connect(server.addr, server.node).await?;
    let transfer = tokio::spawn({
        let (connection, layout) = (honest_connection.clone(), layout.clone());
        async move {
            let produced = futures_util::stream::iter(0..24u32).then(|i| {
                let layout = layout.clone();
                async move {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    block(&layout, i)
                }
            });
            connection
                .send_blocks(
                    "honest",
                    &layout,
                    Box::pin(produced),
                    &TransferOptions { streams: 2 },
                )
                .await
        }
    });

    let rogue = ca.issue(new_node());
    let raw = raw_connection(&server, &ca.cert_pem, Some(&rogue.identity)).await?;
    let hello = |layout: &kvfleet_proto::KvLayout| {
        frame(&PeerMessage::KvHandshake(KvHandshake {
            request_id: "hostile".into(),
            layout: layout.clone(),
        }))
    };
    let good = block(&layout, 0);
    let block_frame = |index: u32, hash: u64| {
        frame(&PeerMessage::KvBlock {
            header: KvBlockHeader::for_block(index, kvfleet_proto::SequenceHash(hash), &good.data),
            data: &good.data,
        })
    };
    let mut oversized = block_frame(0, 0x1000);
    oversized[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
    let mut cut = block_frame(0, 0x1000);
    cut.truncate(cut.len() / 2);
    let other_model = kvfleet_proto::KvLayout {
        model: "another-model".into(),
        ..layout.clone()
    };
    let hostile_hello = hello(&layout);
    /// One hostile stream: what it sends, whether it finishes, how it must be refused.
    struct Case {
        name: &'static str,
        frames: Vec<Vec<u8>>,
        finish: bool,
        code: ErrorCode,
        kind: ErrorKind,
        /// Whether its handshake is accepted before the refusal.
        accepted: bool,
    }
    let cases = vec![
        Case {
            name: "a block under another prompt's hash",
            frames: vec![hostile_hello.clone(), block_frame(0, 0xdead_beef)],
            finish: true,
            code: ErrorCode::HashMismatch,
            kind: ErrorKind::HashMismatch,
            accepted: true,
        },
        Case {
            name: "an oversized frame",
            frames: vec![hostile_hello.clone(), oversized],
            finish: false,
            code: ErrorCode::Malformed,
            kind: ErrorKind::Malformed,
            accepted: true,
        },
        Case {
            name: "a truncated frame",
            frames: vec![hostile_hello.clone(), cut],
            finish: true,
            code: ErrorCode::Truncated,
            kind: ErrorKind::Truncated,
            accepted: true,
        },
        Case {
            name: "a layout for another model",
            frames: vec![hello(&other_model)],
            finish: false,
            code: ErrorCode::LayoutMismatch,
            kind: ErrorKind::LayoutMismatch,
            accepted: false,
        },
        Case {
            name: "a stream that stalls after its handshake",
            frames: vec![hostile_hello.clone()],
            finish: false,
            code: ErrorCode::Truncated,
            kind: ErrorKind::Stalled,
            accepted: true,
        },
        Case {
            name: "a stream that stalls inside its first frame",
            frames: vec![hostile_hello[..5].to_vec()],
            finish: false,
            code: ErrorCode::Truncated,
            kind: ErrorKind::Stalled,
            accepted: false,
        },
    ];
    for Case {
        name,
        frames,
        finish,
        code,
        kind,
        accepted,
    } in cases
    {
        let before = server.metrics().error(kind);
        let (mut send, mut recv) = raw.open_bi().await?;
        for frame in frames {
            send.write_all(&frame).await?;
        }
        if finish {
            send.finish()?;
        }
        let answer = read_answer(&mut recv).await;
        assert_eq!(error_code(&answer), Some(code), "{name}: {answer:?}");
        assert_eq!(
            answer.first().map(|(k, _)| *k) == Some(FrameKind::KvLayout),
            accepted,
            "{name}: handshake answer {answer:?}"
        );
        assert!(
            eventually(WAIT, || server.metrics().error(kind) == before + 1).await,
            "{name}: counted once as {kind:?}"
        );
    }

    // Its share of streams: PER_PEER stalled transfers hold them all, the next is refused at
    // once. The honest peer, another node, is served meanwhile.
    let limited_before = server.metrics().error(ErrorKind::PeerLimit);
    let mut held = Vec::new();
    for _ in 0..PER_PEER {
        let (mut send, mut recv) = raw.open_bi().await?;
        send.write_all(&hostile_hello).await?;
        // The echo is the handshake itself: read all of it, so the refusal is the next frame.
        let mut echo = vec![0u8; hostile_hello.len()];
        recv.read_exact(&mut echo).await?;
        held.push((send, recv));
    }
    let (mut send, mut recv) = raw.open_bi().await?;
    send.write_all(&hostile_hello).await?;
    let answer = read_answer(&mut recv).await;
    assert_eq!(
        error_code(&answer),
        Some(ErrorCode::Overloaded),
        "{answer:?}"
    );
    assert_eq!(
        server.metrics().error(ErrorKind::PeerLimit),
        limited_before + 1
    );
    let (chunks, _) = collect(
        &mut honest_connection
            .generate(&request("echo", vec![7, 8]))
            .await?,
    )
    .await?;
    assert!(!chunks.is_empty(), "the honest peer's request completed");
    // The held streams stall out and give their slots back.
    for (_send, mut recv) in held {
        let answer = read_answer(&mut recv).await;
        assert_eq!(
            error_code(&answer),
            Some(ErrorCode::Truncated),
            "{answer:?}"
        );
    }
    // (A slot is given back just after its refusal is sent: allow a few tries.)
    let mut accepted = false;
    for _ in 0..20 {
        let (mut send, mut recv) = raw.open_bi().await?;
        send.write_all(&hostile_hello).await?;
        let mut first = vec![0u8; hostile_hello.len()];
        if recv.read_exact(&mut first).await.is_ok() && first == hostile_hello {
            accepted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(accepted, "the stalled streams gave their slots back");

    // Its share of connections: a second one is served, a third is closed after its handshake.
    let limited_before = server.metrics().error(ErrorKind::PeerLimit);
    let second = raw_connection(&server, &ca.cert_pem, Some(&rogue.identity)).await?;
    let third = raw_connection(&server, &ca.cert_pem, Some(&rogue.identity)).await?;
    assert!(eventually(WAIT, || third.close_reason().is_some()).await);
    assert_eq!(
        server.metrics().error(ErrorKind::PeerLimit),
        limited_before + 1
    );
    assert!(second.close_reason().is_none());
    drop(second);

    // The honest transfer was not disturbed; nothing of the hostile one was imported.
    let report = tokio::time::timeout(Duration::from_secs(20), transfer).await???;
    assert_eq!(report.blocks, 24);
    let imported = server.sink.blocks.lock().unwrap().clone();
    assert_eq!(imported.iter().filter(|(id, _)| id == "honest").count(), 24);
    assert!(
        imported.iter().all(|(id, _)| id == "honest"),
        "no hostile block"
    );
    assert!(
        raw.close_reason().is_none(),
        "refusals end streams, not the connection"
    );
    server.shutdown().await
}
