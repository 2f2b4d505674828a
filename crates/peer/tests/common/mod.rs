//! Shared test parts: a node CA made exactly as `controlplane/src/ca.rs` makes it, endpoints on
//! 127.0.0.1:0, a scripted generate handler, a recording block sink, and a raw QUIC client for
//! sending what a well-behaved peer never would.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use futures_util::StreamExt;
use kvfleet_peer::generate::events_from;
use kvfleet_peer::*;
use kvfleet_proto::frame::{FrameCodec, FrameKind};
use kvfleet_proto::peer::{PEER_ALPN, PeerMessage};
use kvfleet_proto::{BlockSize, KvDtype, KvLayout, NodeId};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use tokio::sync::{Semaphore, oneshot};

/// A node CA, built with the same parameters as the control plane's.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    pub cert_pem: String,
}

fn ca_params(name: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "kvfleet");
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

/// A certificate issued for a node, with its serial as the control plane lists it.
pub struct NodeCert {
    pub node: NodeId,
    pub identity: PeerIdentity,
    pub serial: String,
}

impl TestCa {
    pub fn new(name: &str) -> Self {
        let key = KeyPair::generate().expect("CA key");
        let cert = ca_params(name).self_signed(&key).expect("CA certificate");
        Self {
            issuer: Issuer::new(ca_params(name), key),
            cert_pem: cert.pem(),
        }
    }

    /// A node certificate as `NodeCa::issue` makes it: CN = node id, SAN
    /// `<id>.node.kvfleet`, server and client auth.
    pub fn issue_with_cn(&self, node: NodeId, common_name: &str) -> NodeCert {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "kvfleet");
        dn.push(DnType::CommonName, common_name);
        params.distinguished_name = dn;
        params.subject_alt_names = vec![SanType::DnsName(
            format!("{node}.node.kvfleet").try_into().expect("dns name"),
        )];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let mut serial: [u8; 16] = rand_bytes();
        serial[0] = (serial[0] & 0x7f) | 0x01;
        params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
        let key = KeyPair::generate().expect("node key");
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("node certificate");
        NodeCert {
            node,
            identity: PeerIdentity {
                ca_pem: self.cert_pem.clone(),
                cert_pem: cert.pem(),
                key_pem: key.serialize_pem(),
            },
            serial: serial.iter().map(|b| format!("{b:02x}")).collect(),
        }
    }

    pub fn issue(&self, node: NodeId) -> NodeCert {
        self.issue_with_cn(node, &node.to_string())
    }
}

fn rand_bytes() -> [u8; 16] {
    *uuid::Uuid::new_v4().as_bytes()
}

pub fn new_node() -> NodeId {
    NodeId::from_uuid(uuid::Uuid::new_v4())
}

pub fn local() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// An endpoint that only connects (it also listens, but nobody calls it).
pub fn client(cert: &NodeCert) -> anyhow::Result<PeerEndpoint> {
    client_with(cert, |_| {})
}

pub fn client_with(
    cert: &NodeCert,
    tune: impl FnOnce(&mut PeerConfig),
) -> anyhow::Result<PeerEndpoint> {
    let mut config = PeerConfig::new(local(), cert.identity.clone());
    tune(&mut config);
    PeerEndpoint::bind(config).context("binding a client endpoint")
}

/// A serving endpoint and the handle that stops it.
pub struct Server {
    pub endpoint: PeerEndpoint,
    pub addr: SocketAddr,
    pub node: NodeId,
    pub sink: Arc<TestSink>,
    pub handler: Arc<TestHandler>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    pub async fn start(cert: &NodeCert) -> anyhow::Result<Self> {
        Self::start_with(cert, TestSink::new(layout()), |_| {}).await
    }

    pub async fn start_with(
        cert: &NodeCert,
        sink: TestSink,
        tune: impl FnOnce(&mut PeerConfig),
    ) -> anyhow::Result<Self> {
        let mut config = PeerConfig::new(local(), cert.identity.clone());
        config.drain_timeout = Duration::from_secs(2);
        tune(&mut config);
        let endpoint = PeerEndpoint::bind(config).context("binding the server endpoint")?;
        let addr = endpoint.local_addr()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let sink = Arc::new(sink);
        let handler = Arc::new(TestHandler::default());
        let task = tokio::spawn({
            let (endpoint, sink, handler) = (endpoint.clone(), sink.clone(), handler.clone());
            async move {
                endpoint
                    .serve(handler, sink, async {
                        let _ = stopped.await;
                    })
                    .await;
            }
        });
        Ok(Self {
            endpoint,
            addr,
            node: cert.node,
            sink,
            handler,
            stop: Some(stop),
            task,
        })
    }

    pub fn metrics(&self) -> MetricsSnapshot {
        self.endpoint.metrics().snapshot()
    }

    /// Stops serving; fails if the drain does not finish in time.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .context("serve did not return after shutdown")??;
        Ok(())
    }
}

/// The layout the test sink stores: small blocks (2 × 2 layers × 2 heads × 16 dim × 4 tokens ×
/// f16 = 1 KiB) so that tests move many blocks quickly.
pub fn layout() -> KvLayout {
    KvLayout {
        model: "tiny".into(),
        layers: 2,
        kv_heads: 2,
        head_dim: 16,
        dtype: KvDtype::F16,
        block_size: BlockSize::new(4).expect("block size"),
    }
}

/// Deterministic block bytes: index and position mixed, so a misplaced byte is caught.
pub fn block(layout: &KvLayout, index: u32) -> KvBlock {
    let len = layout.block_bytes();
    let data: Vec<u8> = (0..len)
        .map(|i| {
            (i as u32)
                .wrapping_mul(31)
                .wrapping_add(index.wrapping_mul(7)) as u8
        })
        .collect();
    KvBlock {
        index,
        hash: kvfleet_proto::SequenceHash(0x1000 + u64::from(index)),
        data: data.into(),
    }
}

/// Records what arrives; expects the request ids it is told about.
pub struct TestSink {
    pub layout: KvLayout,
    pub expected: Mutex<HashSet<String>>,
    pub blocks: Mutex<Vec<(String, KvBlock)>>,
    pub finished: Mutex<Vec<(String, Result<KvDone, ErrorMessage>)>>,
    pub imported: AtomicU64,
    /// When set, each import takes a permit first: tests hold the receiver back.
    pub gate: Option<Arc<Semaphore>>,
    /// Peers whose revocation the endpoint reported.
    pub revoked: Mutex<Vec<NodeId>>,
}

impl TestSink {
    pub fn new(layout: KvLayout) -> Self {
        Self {
            layout,
            expected: Mutex::new(HashSet::new()),
            blocks: Mutex::new(Vec::new()),
            finished: Mutex::new(Vec::new()),
            imported: AtomicU64::new(0),
            gate: None,
            revoked: Mutex::new(Vec::new()),
        }
    }

    pub fn expect_request(&self, id: &str) {
        self.expected.lock().unwrap().insert(id.to_owned());
    }

    pub fn finished(&self) -> Vec<(String, Result<KvDone, ErrorMessage>)> {
        self.finished.lock().unwrap().clone()
    }
}

impl BlockSink for TestSink {
    fn expect(&self, _peer: &PeerInfo, request_id: &str) -> Option<KvLayout> {
        self.expected
            .lock()
            .unwrap()
            .contains(request_id)
            .then(|| self.layout.clone())
    }

    async fn import(&self, request_id: &str, block: KvBlock) -> Result<(), ErrorMessage> {
        if let Some(gate) = &self.gate {
            gate.acquire().await.expect("gate open").forget();
        }
        if block.index == 666 {
            return Err(ErrorMessage::new(ErrorCode::ImportFailed, "pool full"));
        }
        // As the agent does: the hash block `i` must carry is the receiver's own (here the
        // one `block` gives it), never the one the sender names.
        if block.hash.0 != 0x1000 + u64::from(block.index) {
            return Err(ErrorMessage::new(
                ErrorCode::HashMismatch,
                format!("block {} carries another prompt's hash", block.index),
            ));
        }
        self.imported.fetch_add(1, Ordering::SeqCst);
        self.blocks
            .lock()
            .unwrap()
            .push((request_id.to_owned(), block));
        Ok(())
    }

    fn stream_finished(&self, request_id: &str, outcome: Result<KvDone, ErrorMessage>) {
        self.finished
            .lock()
            .unwrap()
            .push((request_id.to_owned(), outcome));
    }

    fn peer_revoked(&self, peer: &PeerInfo) {
        self.revoked.lock().unwrap().push(peer.node_id);
    }
}

/// What the handler does is chosen by the request's model name.
#[derive(Default)]
pub struct TestHandler {
    /// Endless generations whose event stream was dropped (= cancelled on this node).
    pub dropped: Arc<AtomicU64>,
    /// The node ids of the peers that sent requests.
    pub callers: Mutex<Vec<NodeId>>,
}

struct DropCounter(Arc<AtomicU64>);

impl Drop for DropCounter {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

impl GenerateHandler for TestHandler {
    async fn generate(
        &self,
        peer: &PeerInfo,
        request: GenerateRequest,
    ) -> Result<EventStream, ErrorMessage> {
        self.callers.lock().unwrap().push(peer.node_id);
        match request.model.as_str() {
            "overloaded" => Err(ErrorMessage::new(ErrorCode::Overloaded, "all workers busy")),
            "endless" => {
                let guard = DropCounter(self.dropped.clone());
                Ok(
                    futures_util::stream::unfold((guard, 0u32), |(guard, i)| async move {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        Some((
                            Ok(GenerateEvent::Tokens(TokenChunk::tokens(vec![i]))),
                            (guard, i + 1),
                        ))
                    })
                    .boxed(),
                )
            }
            "fails" => Ok(events_from(vec![
                Ok(GenerateEvent::Tokens(TokenChunk::tokens(vec![1]))),
                Err(ErrorMessage::new(ErrorCode::Internal, "worker crashed")),
            ])),
            _ => {
                // Echo the prompt reversed, two tokens per chunk, with logprobs when asked.
                let tokens: Vec<u32> = request.prompt.iter().rev().copied().collect();
                let mut events = Vec::new();
                for pair in tokens.chunks(2) {
                    let logprobs = request.sampling.logprobs.map(|_| {
                        pair.iter()
                            .map(|t| TokenLogprob {
                                token: *t,
                                logprob: -0.5,
                                top: vec![TopLogprob {
                                    token: t + 1,
                                    logprob: -1.5,
                                }],
                            })
                            .collect()
                    });
                    events.push(Ok(GenerateEvent::Tokens(TokenChunk {
                        tokens: pair.to_vec(),
                        logprobs,
                    })));
                }
                events.push(Ok(GenerateEvent::Finished(Finish {
                    reason: FinishReason::Length,
                    usage: Usage {
                        prompt_tokens: request.prompt.len() as u32,
                        completion_tokens: tokens.len() as u32,
                        cached_tokens: 0,
                    },
                    kv_push: None,
                })));
                Ok(events_from(events))
            }
        }
    }
}

pub fn request(model: &str, prompt: Vec<u32>) -> GenerateRequest {
    GenerateRequest {
        request_id: "chatcmpl-test".into(),
        model: model.into(),
        worker: None,
        prompt,
        block_hashes: Vec::new(),
        sampling: kvfleet_proto::SamplingParams::greedy(16),
        prefill: None,
        kv_push: None,
    }
}

/// Collects a stream to its end: tokens and the finish.
pub async fn collect(stream: &mut GenerateStream) -> Result<(Vec<TokenChunk>, Finish), PeerError> {
    let mut chunks = Vec::new();
    loop {
        match stream.next().await? {
            Some(GenerateEvent::Tokens(chunk)) => chunks.push(chunk),
            Some(GenerateEvent::Finished(finish)) => {
                assert_eq!(stream.next().await?, None, "nothing after the finish");
                return Ok((chunks, finish));
            }
            None => panic!("stream ended without a finish"),
        }
    }
}

/// A raw QUIC connection with a chosen client identity (or none), for sending bytes no
/// well-behaved peer sends.
pub async fn raw_connection(
    server: &Server,
    ca_pem: &str,
    identity: Option<&PeerIdentity>,
) -> anyhow::Result<quinn::Connection> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert?)?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots);
    let mut config = match identity {
        Some(identity) => {
            let chain = CertificateDer::pem_slice_iter(identity.cert_pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()?;
            let key = PrivateKeyDer::from_pem_slice(identity.key_pem.as_bytes())?;
            builder.with_client_auth_cert(chain, key)?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![PEER_ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(config)?;
    let mut endpoint = quinn::Endpoint::client(local())?;
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(quic)));
    let connection = endpoint
        .connect(server.addr, &format!("{}.node.kvfleet", server.node))?
        .await?;
    Ok(connection)
}

/// Encodes one message as frame bytes.
pub fn frame(message: &PeerMessage<'_>) -> Vec<u8> {
    message
        .to_frame_bytes(&FrameCodec::default())
        .expect("encoding a test message")
}

/// A frame with any kind and payload (valid framing, whatever the payload says).
pub fn raw_frame(kind: FrameKind, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    FrameCodec::default()
        .encode(kind, payload, &mut out)
        .expect("encoding a raw frame");
    out
}

/// Reads what the server sends back on a raw stream until it ends or resets: the frames it
/// managed to send (often one Error frame).
pub async fn read_answer(recv: &mut quinn::RecvStream) -> Vec<(FrameKind, Vec<u8>)> {
    let mut bytes = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(Ok(Some(n))) =
        tokio::time::timeout(Duration::from_secs(5), recv.read(&mut buf)).await
    {
        bytes.extend_from_slice(&buf[..n]);
    }
    let mut reader = kvfleet_proto::FrameReader::new(FrameCodec::default());
    reader.push(&bytes);
    let mut frames = Vec::new();
    while let Ok(Some(frame)) = reader.next_frame() {
        frames.push((frame.kind, frame.payload));
    }
    frames
}

/// The error code of the Error frame among `frames`, if any.
pub fn error_code(frames: &[(FrameKind, Vec<u8>)]) -> Option<ErrorCode> {
    frames.iter().find_map(|(kind, payload)| {
        (*kind == FrameKind::Error)
            .then(|| serde_json_error_code(payload))
            .flatten()
    })
}

fn serde_json_error_code(payload: &[u8]) -> Option<ErrorCode> {
    match PeerMessage::decode(kvfleet_proto::frame::FrameRef {
        kind: FrameKind::Error,
        payload,
    }) {
        Ok(PeerMessage::Error(error)) => Some(error.code),
        _ => None,
    }
}

/// Waits until `condition` holds or `timeout` passes.
pub async fn eventually(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < deadline {
        if condition() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    condition()
}
