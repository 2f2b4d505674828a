//! The peer transport between kvfleet agents: one QUIC endpoint per agent (quinn), mutual TLS
//! with certificates from the control plane's node CA, and two kinds of streams on it.
//!
//! - [`tls`]: [`PeerIdentity`] (CA, certificate and key PEM, as the node CA issues them) →
//!   rustls configurations that require and verify a client certificate from the same CA, and
//!   [`PeerInfo`], the node a verified certificate names.
//! - [`endpoint`]: [`PeerEndpoint`] (bind, [`PeerEndpoint::serve`] the accept loop with a
//!   shutdown future and a drain deadline, [`PeerEndpoint::connect`]) and [`PeerConnection`].
//! - [`generate`]: forwarded generate requests, one bidirectional stream each: the
//!   [`GenerateHandler`] trait the agent implements, the server side, and the client's
//!   [`GenerateStream`]. Dropping the client stream cancels the request on the serving node.
//! - [`transfer`]: KV block transfer for disaggregated serving: a layout handshake, then
//!   checksummed block frames on several streams in parallel, flow-controlled end to end; the
//!   [`BlockSink`] trait the receiving agent implements and [`PeerConnection::send_blocks`].
//! - [`metrics`]: [`PeerMetrics`], plain atomic counters (transfers, bytes, blocks, errors by
//!   [`ErrorKind`]) for the agent to export.
//! - [`error`]: [`PeerError`], what callers of this crate branch on.
//!
//! Frames are those of `kvfleet_proto::frame`, messages those of `kvfleet_proto::peer`; this
//! crate is the IO around them. A malformed frame, a bad certificate or a refused transfer ends
//! one stream or one connection, is counted, and never stops the endpoint.

pub mod endpoint;
pub mod error;
pub mod generate;
pub mod metrics;
pub mod tls;
pub mod transfer;
mod wire;

pub use endpoint::{PeerConfig, PeerConnection, PeerEndpoint};
pub use error::PeerError;
pub use generate::{EventStream, GenerateEvent, GenerateHandler, GenerateStream};
pub use kvfleet_proto::peer::{
    ErrorCode, ErrorMessage, Finish, FinishReason, GenerateRequest, KvDone, KvPush, KvPushReport,
    PrefillPlan, TokenChunk, TokenLogprob, TopLogprob, Usage,
};
pub use metrics::{ErrorKind, MetricsSnapshot, PeerMetrics};
pub use tls::{PeerIdentity, PeerInfo, node_server_name};
pub use transfer::{BlockSink, KvBlock, RefuseAll, TransferOptions, TransferReport};
