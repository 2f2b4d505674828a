//! [`PeerMetrics`]: counters the endpoint updates and the agent exports (Prometheus or its
//! heartbeat). Plain atomics, relaxed ordering: each counter is independent and only ever grows.

use std::sync::atomic::{AtomicU64, Ordering};

/// What went wrong, for the `errors` counters. Every refusal and failure this crate sees is
/// counted under exactly one kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// A TLS handshake failed on certificate grounds (no client certificate, another CA, wrong
    /// name) or a verified certificate was refused (no node id, revoked).
    TlsRefused,
    /// A connection failed before or during the handshake for another reason (timeout, version).
    Handshake,
    /// A frame was malformed or out of place (bad magic, checksum, unknown kind, bad JSON).
    Malformed,
    /// A generate request was invalid or its stream started with an unexpected frame.
    BadRequest,
    /// The generate handler refused or failed a request.
    Handler,
    /// A KV transfer's layout differed from the receiver's.
    LayoutMismatch,
    /// A KV block's size did not match its layout.
    BlockSizeMismatch,
    /// A KV block's bytes did not match their checksum.
    ChecksumMismatch,
    /// A stream ended before its final frame, or a transfer's counts did not add up.
    Truncated,
    /// A KV transfer named a request the receiver does not expect.
    UnknownRequest,
    /// The block sink refused a block.
    ImportFailed,
    /// A stream was reset or a connection lost mid-stream (not a client's cancellation).
    Stream,
    /// A KV block carried a sequence hash other than the one the receiver computed from the
    /// request's own tokens (the receiver never registers a block under a peer's hash).
    HashMismatch,
    /// A peer went over a per-peer budget: concurrent streams (`PeerConfig::max_streams_per_peer`)
    /// or bytes buffered for its transfers (the block sink's budget).
    PeerLimit,
    /// A stream sent nothing for `PeerConfig::stall_timeout` while the receiver waited for its
    /// next frame.
    Stalled,
    /// A forwarded request's plan was refused before anything was allocated for it (a prefill
    /// plan with hashes, lengths or a deadline the receiver does not accept).
    BadPlan,
}

impl ErrorKind {
    /// Every kind, in counter order.
    pub const ALL: [ErrorKind; 16] = [
        ErrorKind::TlsRefused,
        ErrorKind::Handshake,
        ErrorKind::Malformed,
        ErrorKind::BadRequest,
        ErrorKind::Handler,
        ErrorKind::LayoutMismatch,
        ErrorKind::BlockSizeMismatch,
        ErrorKind::ChecksumMismatch,
        ErrorKind::Truncated,
        ErrorKind::UnknownRequest,
        ErrorKind::ImportFailed,
        ErrorKind::Stream,
        ErrorKind::HashMismatch,
        ErrorKind::PeerLimit,
        ErrorKind::Stalled,
        ErrorKind::BadPlan,
    ];

    /// The label value for metrics (`kind="checksum_mismatch"`).
    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorKind::TlsRefused => "tls_refused",
            ErrorKind::Handshake => "handshake",
            ErrorKind::Malformed => "malformed",
            ErrorKind::BadRequest => "bad_request",
            ErrorKind::Handler => "handler",
            ErrorKind::LayoutMismatch => "layout_mismatch",
            ErrorKind::BlockSizeMismatch => "block_size_mismatch",
            ErrorKind::ChecksumMismatch => "checksum_mismatch",
            ErrorKind::Truncated => "truncated",
            ErrorKind::UnknownRequest => "unknown_request",
            ErrorKind::ImportFailed => "import_failed",
            ErrorKind::Stream => "stream",
            ErrorKind::HashMismatch => "hash_mismatch",
            ErrorKind::PeerLimit => "peer_limit",
            ErrorKind::Stalled => "stalled",
            ErrorKind::BadPlan => "bad_plan",
        }
    }

    const fn index(self) -> usize {
        self as usize
    }
}

/// Counters of one endpoint (both its server and client sides).
#[derive(Debug, Default)]
pub struct PeerMetrics {
    /// Incoming connections that passed mutual TLS.
    pub connections_accepted: AtomicU64,
    /// Outgoing connections that passed mutual TLS.
    pub connections_opened: AtomicU64,
    /// Open connections (either side) closed because their peer's certificate was revoked.
    pub connections_revoked: AtomicU64,
    /// Forwarded generate requests this node served.
    pub generate_served: AtomicU64,
    /// Of those, cancelled by the requesting node.
    pub generate_cancelled: AtomicU64,
    /// Generate requests this node forwarded to a peer.
    pub generate_forwarded: AtomicU64,
    /// KV transfers this node completed as sender (all streams acknowledged).
    pub kv_transfers_sent: AtomicU64,
    /// KV transfer streams this node received completely.
    pub kv_streams_received: AtomicU64,
    /// KV blocks sent (acknowledged or not).
    pub kv_blocks_sent: AtomicU64,
    /// KV block bytes sent (block bytes, headers excluded).
    pub kv_bytes_sent: AtomicU64,
    /// KV blocks received, verified and imported.
    pub kv_blocks_received: AtomicU64,
    /// KV block bytes received and imported.
    pub kv_bytes_received: AtomicU64,
    /// Total wall time of completed sent transfers, microseconds (bytes / time = GB/s).
    pub kv_send_micros: AtomicU64,
    errors: [AtomicU64; ErrorKind::ALL.len()],
}

/// A copy of every counter at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MetricsSnapshot {
    /// See [`PeerMetrics::connections_accepted`].
    pub connections_accepted: u64,
    /// See [`PeerMetrics::connections_opened`].
    pub connections_opened: u64,
    /// See [`PeerMetrics::connections_revoked`].
    pub connections_revoked: u64,
    /// See [`PeerMetrics::generate_served`].
    pub generate_served: u64,
    /// See [`PeerMetrics::generate_cancelled`].
    pub generate_cancelled: u64,
    /// See [`PeerMetrics::generate_forwarded`].
    pub generate_forwarded: u64,
    /// See [`PeerMetrics::kv_transfers_sent`].
    pub kv_transfers_sent: u64,
    /// See [`PeerMetrics::kv_streams_received`].
    pub kv_streams_received: u64,
    /// See [`PeerMetrics::kv_blocks_sent`].
    pub kv_blocks_sent: u64,
    /// See [`PeerMetrics::kv_bytes_sent`].
    pub kv_bytes_sent: u64,
    /// See [`PeerMetrics::kv_blocks_received`].
    pub kv_blocks_received: u64,
    /// See [`PeerMetrics::kv_bytes_received`].
    pub kv_bytes_received: u64,
    /// See [`PeerMetrics::kv_send_micros`].
    pub kv_send_micros: u64,
    /// Errors by kind, in [`ErrorKind::ALL`] order.
    pub errors: Vec<(ErrorKind, u64)>,
}

impl MetricsSnapshot {
    /// The count for one error kind.
    pub fn error(&self, kind: ErrorKind) -> u64 {
        self.errors
            .iter()
            .find(|(k, _)| *k == kind)
            .map_or(0, |(_, n)| *n)
    }
}

pub(crate) fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

impl PeerMetrics {
    /// Counts one error.
    pub fn count_error(&self, kind: ErrorKind) {
        add(&self.errors[kind.index()], 1);
    }

    /// Errors of one kind so far.
    pub fn errors(&self, kind: ErrorKind) -> u64 {
        self.errors[kind.index()].load(Ordering::Relaxed)
    }

    /// Every counter, read one by one (not an atomic snapshot of all of them together).
    pub fn snapshot(&self) -> MetricsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        MetricsSnapshot {
            connections_accepted: get(&self.connections_accepted),
            connections_opened: get(&self.connections_opened),
            connections_revoked: get(&self.connections_revoked),
            generate_served: get(&self.generate_served),
            generate_cancelled: get(&self.generate_cancelled),
            generate_forwarded: get(&self.generate_forwarded),
            kv_transfers_sent: get(&self.kv_transfers_sent),
            kv_streams_received: get(&self.kv_streams_received),
            kv_blocks_sent: get(&self.kv_blocks_sent),
            kv_bytes_sent: get(&self.kv_bytes_sent),
            kv_blocks_received: get(&self.kv_blocks_received),
            kv_bytes_received: get(&self.kv_bytes_received),
            kv_send_micros: get(&self.kv_send_micros),
            errors: ErrorKind::ALL
                .iter()
                .map(|kind| (*kind, self.errors(*kind)))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_kinds_index_their_own_counter() {
        let metrics = PeerMetrics::default();
        for (i, kind) in ErrorKind::ALL.iter().enumerate() {
            assert_eq!(kind.index(), i);
            for _ in 0..=i {
                metrics.count_error(*kind);
            }
        }
        let snapshot = metrics.snapshot();
        for (i, kind) in ErrorKind::ALL.iter().enumerate() {
            assert_eq!(snapshot.error(*kind), i as u64 + 1, "{}", kind.as_str());
        }
    }
}
