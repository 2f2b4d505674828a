//! The frontend's HTTP connections: accepted up to a cap, each served by hyper with a header
//! read timeout, and drained on shutdown.
//!
//! `axum::serve` has neither: it accepts every connection and gives hyper no timer, so a
//! client that opens connections and never finishes its headers (slow loris) holds each one
//! for ever. Here a semaphore permit is taken *before* `accept`, so at the cap new connections
//! wait in the kernel's backlog instead of costing a task and buffers each, and hyper's HTTP/1
//! header read timeout closes a connection whose request head has not arrived in time (between
//! requests on a keep-alive connection too). The body has its own deadline in `prepare`.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// The listen backlog: connections the kernel completes before `accept` takes them. Tokio's
/// `TcpListener::bind` asks for 1024; a burst of reconnects larger than that (thousands of
/// attack connections cut at the header timeout together, and reopened) overflowed it, and a
/// normal client's SYN dropped there waits a second or more for its retransmission. The
/// kernel caps it at `net.core.somaxconn` (4096 by default since Linux 5.4).
const LISTEN_BACKLOG: u32 = 4096;

/// A listener on `addr` with [`LISTEN_BACKLOG`] (and `SO_REUSEADDR`, as tokio's `bind` sets).
pub(super) fn bind(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Limits of the HTTP layer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct ConnLimits {
    /// Connections served at once; more wait in the listen backlog.
    pub(super) max_connections: usize,
    /// How long a client may take to send a request's head (request line and headers).
    pub(super) header_read_timeout: Duration,
}

impl ConnLimits {
    /// The limits the frontend's configuration sets (the API port and the metrics port alike).
    pub(super) fn of(config: &super::FrontendConfig) -> Self {
        Self {
            max_connections: config.max_connections,
            header_read_timeout: config.header_read_timeout,
        }
    }
}

/// Serves `app` on `listener` until `shutdown` completes, then stops accepting and waits for
/// open connections to finish their in-flight requests (the caller bounds that wait).
pub(super) async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ConnLimits,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let graceful = GracefulShutdown::new();
    // HTTP/1.1 only, as `axum::serve` with axum's default features served it.
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    let service = TowerToHyperService::new(app);
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            () = &mut shutdown => break,
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
        let (tcp, remote) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // EMFILE and friends: back off instead of spinning; the listener stays.
                    tracing::warn!(%error, "accepting a frontend connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY on an accepted connection");
        }
        let connection = builder.serve_connection(TokioIo::new(tcp), service.clone());
        let connection = graceful.watch(connection);
        // Owned by `graceful`: shutdown below waits for every watched connection.
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%remote, %error, "frontend connection ended with an error");
            }
            drop(permit);
        });
    }
    // Closed now, so new connections are refused while the open ones finish.
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}
