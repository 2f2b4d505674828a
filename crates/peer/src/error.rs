//! [`PeerError`]: everything that can go wrong in this crate, shaped for the caller's branch:
//! configuration (fix the certificates), the peer refused us (try another peer), the remote side
//! said why ([`PeerError::Remote`] carries a wire [`ErrorCode`](kvfleet_proto::peer::ErrorCode)),
//! or the link failed.

use std::net::SocketAddr;

use kvfleet_proto::peer::{ErrorMessage, PeerWireError};

/// Why a peer operation failed.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// The identity (CA, certificate or key PEM) cannot be used.
    #[error("unusable peer identity: {0}")]
    Identity(String),
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    /// The UDP socket could not be bound.
    #[error("binding the peer endpoint on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// quinn could not start a connection (bad address or server name, endpoint closed).
    #[error("connecting to {addr}: {source}")]
    Connect {
        /// The peer's address.
        addr: SocketAddr,
        /// Why.
        source: quinn::ConnectError,
    },
    /// The TLS handshake failed on certificate grounds: no certificate, one from another CA, a
    /// name that does not match, or the peer refused ours.
    #[error("peer {addr} failed mutual TLS: {reason}")]
    HandshakeRefused {
        /// The peer's address.
        addr: SocketAddr,
        /// What TLS said.
        reason: String,
    },
    /// The peer's certificate verified but does not identify the expected node (or is revoked).
    #[error("peer {addr} presented an unacceptable identity: {reason}")]
    PeerIdentity {
        /// The peer's address.
        addr: SocketAddr,
        /// Why it is refused.
        reason: String,
    },
    /// The connection failed or closed.
    #[error("connection to {addr} lost: {source}")]
    Connection {
        /// The peer's address.
        addr: SocketAddr,
        /// Why.
        source: quinn::ConnectionError,
    },
    /// A stream was reset, stopped or closed under us.
    #[error("stream failed: {0}")]
    Stream(String),
    /// The peer sent something that is not the protocol.
    #[error("protocol error from peer: {0}")]
    Protocol(#[from] PeerWireError),
    /// The stream ended before its final frame.
    #[error("stream ended early: {0}")]
    Truncated(String),
    /// The remote side refused or failed the request, and said why.
    #[error("peer refused: {0}")]
    Remote(ErrorMessage),
    /// A block handed to the sender has the wrong size for the layout (a local bug).
    #[error("KV block {index} has {actual} bytes but the layout's blocks have {expected}")]
    BlockSize {
        /// The block's index.
        index: u32,
        /// Bytes per block in the layout.
        expected: u64,
        /// Bytes given.
        actual: u64,
    },
    /// The peer did not answer in time.
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
}

impl PeerError {
    /// The wire error code when the remote side refused, for callers that branch on it.
    pub fn remote_code(&self) -> Option<kvfleet_proto::peer::ErrorCode> {
        match self {
            PeerError::Remote(message) => Some(message.code),
            _ => None,
        }
    }
}
