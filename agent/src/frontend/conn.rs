//! The frontend's HTTP connections: accepted up to a cap, each served by hyper with a header
//! read timeout, and drained on shutdown.
//!
//! `axum::serve` has neither: it accepts every connection and gives hyper no timer, so a
//! client that opens connections and never finishes its headers (slow loris) holds each one
//! for ever. Here a semaphore permit is taken *before* `accept`, so at the cap new connections
//! wait in the kernel's backlog instead of costing a task and buffers each, and hyper's HTTP/1
//! header read timeout closes a connection whose request head has not arrived in time (between
//! requests on a keep-alive connection too). The body has its own deadline in `prepare`.
//!
//! A connection is *headerless* from `accept` until its first request head has arrived (hyper
//! calls the service then). Headerless connections are what slow-loris and idle attackers
//! hold, so they are watched ([`Headerless`]) and cut, as nginx's `client_header_timeout`,
//! haproxy's `timeout http-request` and its per-source stick tables do:
//!
//! - **jitter**: each connection's first-head deadline is `header_read_timeout` shortened by a
//!   random fraction up to `header_timeout_jitter`. Without it, thousands of attack
//!   connections opened together are cut in the same tick and reopened together, and that
//!   wave of reconnects queues ahead of normal clients in `accept` (the worst normal requests
//!   of the slow-loris bench, docs/benchmarks.md, came exactly then);
//! - **pressure**: with more than `headerless_pressure` headerless connections, each newly
//!   accepted one cuts up to two of the oldest headerless connections that are older than
//!   `header_read_timeout_under_pressure` (oldest first, a few per accept, so pressure never
//!   cuts a wave at once). A normal client's head arrives within milliseconds of its connect,
//!   so it is never among the old ones;
//! - **per client IP** (off by default): a client IP with `max_headerless_per_ip` headerless
//!   connections that opens another has its oldest headerless one cut (the new one is kept: it
//!   may be a real request, and the old one has had its chance). Bounded: only headerless
//!   connections are tracked, at most `max_connections` of them. Against an attacker that
//!   reconnects at once, every cut is a reconnect: the bench measured that churn costing normal
//!   clients more than the held connections did.
//!
//! The client's address travels with each request as axum's `ConnectInfo<SocketAddr>` (the
//! keyless per-IP rate limit reads it).

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::{TowerToHyperService, TowerToHyperServiceFuture};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::metrics::CutReason;

/// The listen backlog: connections the kernel completes before `accept` takes them. Tokio's
/// `TcpListener::bind` asks for 1024; a burst of reconnects larger than that (thousands of
/// attack connections cut at the header timeout together, and reopened) overflowed it, and a
/// normal client's SYN dropped there waits a second or more for its retransmission. The
/// kernel caps it at `net.core.somaxconn` (4096 by default since Linux 5.4).
const LISTEN_BACKLOG: u32 = 4096;

/// Headerless connections a single accept may cut under pressure: enough to bring the count
/// back down while attackers keep opening, few enough that pressure never cuts a wave at once.
const CUTS_PER_ACCEPT: usize = 2;

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
    /// The fraction (0 to 0.9) by which a connection's first-head deadline is randomly
    /// shortened, so connections opened together are not cut together.
    pub(super) header_timeout_jitter: f64,
    /// Headerless connections above which old ones are cut early (0: never).
    pub(super) headerless_pressure: usize,
    /// Under pressure, headerless connections older than this may be cut.
    pub(super) header_read_timeout_under_pressure: Duration,
    /// Headerless connections one client IP may hold; its oldest is cut for a new one (0: no
    /// limit).
    pub(super) max_headerless_per_ip: usize,
}

impl ConnLimits {
    /// The limits the frontend's configuration sets (the API port and the metrics port alike).
    pub(super) fn of(config: &super::FrontendConfig) -> Self {
        Self {
            max_connections: config.max_connections,
            header_read_timeout: config.header_read_timeout,
            header_timeout_jitter: config.header_timeout_jitter,
            headerless_pressure: config.headerless_pressure,
            header_read_timeout_under_pressure: config.header_read_timeout_under_pressure,
            max_headerless_per_ip: config.max_headerless_per_ip,
        }
    }

    /// A new connection's first-head deadline.
    fn first_head_deadline(&self, accepted: Instant) -> Instant {
        let jitter = self.header_timeout_jitter.clamp(0.0, 0.9);
        let shorten = if jitter > 0.0 {
            jitter * rand::random::<f64>()
        } else {
            0.0
        };
        accepted + self.header_read_timeout.mul_f64(1.0 - shorten)
    }
}

/// One headerless connection.
#[derive(Debug)]
struct Entry {
    ip: IpAddr,
    accepted: Instant,
    /// Cancelled to cut the connection.
    cut: CancellationToken,
    /// Its first head arrived, or it ended: no longer headerless.
    done: AtomicBool,
}

/// The headerless connections: oldest first overall, and by client IP.
#[derive(Debug, Default)]
struct Watched {
    /// Oldest first; entries that are `done` are dropped lazily (and compacted).
    fifo: VecDeque<Arc<Entry>>,
    by_ip: HashMap<IpAddr, VecDeque<Arc<Entry>>>,
    live: usize,
}

/// The headerless connections of one listener, and what was cut (for metrics and tests).
#[derive(Debug)]
pub(super) struct Headerless {
    limits: ConnLimits,
    watched: Mutex<Watched>,
    /// Connections cut because their client IP opened one too many.
    cut_per_ip: Counter,
    /// Connections cut early under pressure.
    cut_under_pressure: Counter,
    /// Connections cut at their first-head deadline.
    cut_at_deadline: Counter,
}

impl Headerless {
    /// Counting its cuts in `cuts` by reason.
    fn new(limits: ConnLimits, cuts: &Family<CutReason, Counter>) -> Self {
        let cut = |reason| cuts.get_or_create(&CutReason { reason }).clone();
        Self {
            limits,
            watched: Mutex::new(Watched::default()),
            cut_per_ip: cut("per_ip"),
            cut_under_pressure: cut("pressure"),
            cut_at_deadline: cut("header_timeout"),
        }
    }

    /// Watches a just-accepted connection from `ip`, cutting others as the limits say.
    fn accepted(&self, ip: IpAddr, now: Instant) -> Arc<Entry> {
        let entry = Arc::new(Entry {
            ip,
            accepted: now,
            cut: CancellationToken::new(),
            done: AtomicBool::new(false),
        });
        let mut w = self.watched.lock().unwrap_or_else(|e| e.into_inner());
        let per_ip = self.limits.max_headerless_per_ip;
        if per_ip > 0 {
            let same = w.by_ip.entry(ip).or_default();
            if same.len() >= per_ip
                && let Some(oldest) = same.pop_front()
            {
                oldest.done.store(true, Ordering::Release);
                oldest.cut.cancel();
                w.live -= 1;
                self.cut_per_ip.inc();
            }
        }
        let pressure = self.limits.headerless_pressure;
        if pressure > 0 && w.live >= pressure {
            let min_age = self.limits.header_read_timeout_under_pressure;
            let mut cut = 0;
            while cut < CUTS_PER_ACCEPT {
                let Some(front) = w.fifo.front() else { break };
                if front.done.load(Ordering::Acquire) {
                    w.fifo.pop_front();
                    continue;
                }
                if now.saturating_duration_since(front.accepted) < min_age {
                    break;
                }
                if let Some(oldest) = w.fifo.pop_front() {
                    Self::forget(&mut w, &oldest);
                    oldest.cut.cancel();
                    cut += 1;
                    self.cut_under_pressure.inc();
                }
            }
        }
        w.fifo.push_back(entry.clone());
        if per_ip > 0 {
            w.by_ip.entry(ip).or_default().push_back(entry.clone());
        }
        w.live += 1;
        // Entries whose connections got their head stay in `fifo` until they reach its front;
        // behind one long-lived headerless connection they could pile up.
        if w.fifo.len() > 2 * w.live + 1024 {
            w.fifo.retain(|e| !e.done.load(Ordering::Acquire));
        }
        entry
    }

    /// The connection's first head arrived, or it ended.
    fn finish(&self, entry: &Arc<Entry>) {
        if entry.done.load(Ordering::Acquire) {
            return;
        }
        let mut w = self.watched.lock().unwrap_or_else(|e| e.into_inner());
        Self::forget(&mut w, entry);
    }

    /// Marks `entry` done and drops it from its IP's list (under the lock).
    fn forget(w: &mut Watched, entry: &Arc<Entry>) {
        if entry.done.swap(true, Ordering::AcqRel) {
            return;
        }
        w.live -= 1;
        if let Some(same) = w.by_ip.get_mut(&entry.ip) {
            same.retain(|e| !Arc::ptr_eq(e, entry));
            if same.is_empty() {
                w.by_ip.remove(&entry.ip);
            }
        }
    }

    /// Headerless connections now.
    #[cfg(test)]
    fn live(&self) -> usize {
        self.watched.lock().unwrap_or_else(|e| e.into_inner()).live
    }
}

/// The router, as hyper's service for one connection: the first call (the first request head
/// has arrived) ends the connection's headerless time, and every request carries the client's
/// address.
#[derive(Clone)]
struct Service {
    inner: TowerToHyperService<Router>,
    remote: SocketAddr,
    entry: Arc<Entry>,
    headerless: Arc<Headerless>,
}

impl hyper::service::Service<hyper::Request<Incoming>> for Service {
    type Response = <TowerToHyperService<Router> as hyper::service::Service<
        hyper::Request<Incoming>,
    >>::Response;
    type Error =
        <TowerToHyperService<Router> as hyper::service::Service<hyper::Request<Incoming>>>::Error;
    type Future = TowerToHyperServiceFuture<Router, hyper::Request<Incoming>>;

    fn call(&self, mut request: hyper::Request<Incoming>) -> Self::Future {
        self.headerless.finish(&self.entry);
        request.extensions_mut().insert(ConnectInfo(self.remote));
        self.inner.call(request)
    }
}

/// Serves `app` on `listener` until `shutdown` completes, then stops accepting and waits for
/// open connections to finish their in-flight requests (the caller bounds that wait).
pub(super) async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ConnLimits,
    cuts: &Family<CutReason, Counter>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let headerless = Arc::new(Headerless::new(limits, cuts));
    serve_watched(listener, app, limits, shutdown, headerless).await
}

/// [`serve`], with the caller's [`Headerless`] (tests look into it).
async fn serve_watched(
    listener: TcpListener,
    app: Router,
    limits: ConnLimits,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    headerless: Arc<Headerless>,
) -> std::io::Result<()> {
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let graceful = GracefulShutdown::new();
    // HTTP/1.1 only, as `axum::serve` with axum's default features served it. Hyper's own
    // header timeout stays as the deadline of later heads on a keep-alive connection; the
    // first head's (jittered, never later) is watched below.
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
        let now = Instant::now();
        let entry = headerless.accepted(remote.ip(), now);
        let deadline = limits.first_head_deadline(now);
        let service = Service {
            inner: service.clone(),
            remote,
            entry: entry.clone(),
            headerless: headerless.clone(),
        };
        let connection = builder.serve_connection(TokioIo::new(tcp), service);
        let connection = graceful.watch(connection);
        let headerless = headerless.clone();
        // Owned by `graceful`: shutdown below waits for every watched connection.
        tokio::spawn(async move {
            tokio::pin!(connection);
            let first_head = tokio::time::sleep_until(deadline);
            tokio::pin!(first_head);
            let mut waiting_for_head = true;
            loop {
                tokio::select! {
                    ended = &mut connection => {
                        if let Err(error) = ended {
                            tracing::debug!(%remote, %error, "frontend connection ended with an error");
                        }
                        break;
                    }
                    // Dropping the connection closes it: cut by the per-IP limit or pressure.
                    () = entry.cut.cancelled() => break,
                    () = &mut first_head, if waiting_for_head => {
                        waiting_for_head = false;
                        if !entry.done.load(Ordering::Acquire) {
                            headerless.cut_at_deadline.inc();
                            break;
                        }
                    }
                }
            }
            headerless.finish(&entry);
            drop(permit);
        });
    }
    // Closed now, so new connections are refused while the open ones finish.
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::get;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::TcpStream;

    fn limits() -> ConnLimits {
        ConnLimits {
            max_connections: 1000,
            header_read_timeout: Duration::from_secs(10),
            header_timeout_jitter: 0.0,
            headerless_pressure: 0,
            header_read_timeout_under_pressure: Duration::from_secs(2),
            max_headerless_per_ip: 0,
        }
    }

    /// A server of `GET /` on loopback with `limits`; its address and its [`Headerless`].
    async fn server(limits: ConnLimits) -> (SocketAddr, Arc<Headerless>, CancellationToken) {
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let headerless = Arc::new(Headerless::new(limits, &Family::default()));
        let stop = CancellationToken::new();
        let app =
            Router::new().route(
                "/",
                get(|ConnectInfo(client): ConnectInfo<SocketAddr>| async move {
                    client.ip().to_string()
                }),
            );
        let shutdown = stop.clone().cancelled_owned();
        tokio::spawn(serve_watched(
            listener,
            app,
            limits,
            shutdown,
            headerless.clone(),
        ));
        (addr, headerless, stop)
    }

    /// A connection from `from` that sends nothing.
    async fn idle(addr: SocketAddr, from: [u8; 4]) -> TcpStream {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::from((from, 0))).unwrap();
        socket.connect(addr).await.unwrap()
    }

    /// When the server closed `tcp` (EOF), measured from `since`; `None` if still open after
    /// `wait`.
    async fn closed_after(mut tcp: TcpStream, since: Instant, wait: Duration) -> Option<Duration> {
        let mut buf = [0u8; 256];
        tokio::time::timeout(wait, async {
            loop {
                match tcp.read(&mut buf).await {
                    Ok(0) | Err(_) => return since.elapsed(),
                    Ok(_) => {}
                }
            }
        })
        .await
        .ok()
    }

    /// Waits until the server has accepted `n` headerless connections.
    async fn until_headerless(headerless: &Headerless, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while headerless.live() != n && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(headerless.live(), n);
    }

    /// The spread of the close times of 30 idle connections opened together.
    async fn spread_of_cuts(jitter: f64) -> (Duration, Duration, Duration) {
        let limits = ConnLimits {
            header_read_timeout: Duration::from_secs(1),
            header_timeout_jitter: jitter,
            ..limits()
        };
        let (addr, headerless, stop) = server(limits).await;
        let mut conns = Vec::new();
        for _ in 0..30 {
            conns.push(idle(addr, [127, 0, 0, 1]).await);
        }
        let opened = Instant::now();
        until_headerless(&headerless, 30).await;
        let waits = conns
            .into_iter()
            .map(|tcp| closed_after(tcp, opened, Duration::from_secs(3)));
        let mut cuts: Vec<Duration> = futures_util::future::join_all(waits)
            .await
            .into_iter()
            .map(|c| c.expect("cut by the header timeout"))
            .collect();
        cuts.sort();
        // Hyper's own header timeout (the later heads' deadline, the same 1 s) may cut a
        // connection whose jittered deadline was barely shorter first: then it is not counted.
        if jitter > 0.0 {
            assert!(headerless.cut_at_deadline.get() >= 25);
        }
        stop.cancel();
        (
            cuts[0],
            cuts[cuts.len() - 1],
            cuts[cuts.len() - 1] - cuts[0],
        )
    }

    /// Connections opened together are cut at jittered times, not in one tick (without jitter
    /// all 30 go within a few milliseconds of each other), and never later than the timeout.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn header_timeouts_are_jittered() {
        let (_, _, together) = spread_of_cuts(0.0).await;
        assert!(together < Duration::from_millis(150), "{together:?}");
        let (first, last, spread) = spread_of_cuts(0.5).await;
        assert!(spread > Duration::from_millis(200), "{spread:?}");
        assert!(first > Duration::from_millis(400), "{first:?}");
        assert!(last < Duration::from_millis(1200), "{last:?}");
    }

    /// A client IP over `max_headerless_per_ip` loses its oldest headerless connection for
    /// each new one; another IP's are untouched, and a real request from the busy IP is served.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn headerless_connections_are_capped_per_client_ip() {
        let (addr, headerless, stop) = server(ConnLimits {
            max_headerless_per_ip: 3,
            ..limits()
        })
        .await;
        let mut busy = Vec::new();
        for i in 0..5 {
            busy.push(idle(addr, [127, 0, 0, 1]).await);
            until_headerless(&headerless, (i + 1).min(3)).await;
        }
        let mut others = Vec::new();
        for _ in 0..3 {
            others.push(idle(addr, [127, 0, 0, 2]).await);
        }
        until_headerless(&headerless, 6).await;
        assert_eq!(headerless.cut_per_ip.get(), 2);
        let now = Instant::now();
        let mut busy = busy.into_iter();
        for tcp in busy.by_ref().take(2) {
            assert!(
                closed_after(tcp, now, Duration::from_secs(2))
                    .await
                    .is_some()
            );
        }
        for tcp in busy.chain(others) {
            let open = closed_after(tcp, now, Duration::from_millis(100)).await;
            assert!(open.is_none(), "cut after {open:?}");
        }
        // A request from the busy address: its connection is the newest, so it is served,
        // and the handler sees the client's address.
        let mut tcp = idle(addr, [127, 0, 0, 1]).await;
        tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        tcp.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.ends_with("127.0.0.1"), "{answer}");
        stop.cancel();
    }

    /// Over `headerless_pressure`, each new connection cuts up to two of the oldest headerless
    /// ones older than `header_read_timeout_under_pressure`, oldest first; younger ones and
    /// connections whose head arrived are kept.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn under_pressure_the_oldest_headerless_connections_go_first() {
        let (addr, headerless, stop) = server(ConnLimits {
            headerless_pressure: 4,
            header_read_timeout_under_pressure: Duration::from_millis(300),
            ..limits()
        })
        .await;
        // A keep-alive connection that sent a request: not headerless any more.
        let mut served = idle(addr, [127, 0, 0, 1]).await;
        served
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 512];
        assert!(served.read(&mut buf).await.unwrap() > 0);
        let mut old = Vec::new();
        for i in 0..4 {
            old.push(idle(addr, [127, 0, 0, 1]).await);
            until_headerless(&headerless, i + 1).await;
        }
        tokio::time::sleep(Duration::from_millis(400)).await;
        // Five over the threshold: the first cuts the two oldest, the second two more.
        let young = idle(addr, [127, 0, 0, 1]).await;
        until_headerless(&headerless, 3).await;
        let now = Instant::now();
        let mut old = old.into_iter();
        for tcp in old.by_ref().take(2) {
            assert!(
                closed_after(tcp, now, Duration::from_secs(2))
                    .await
                    .is_some()
            );
        }
        for tcp in old.chain([young]) {
            let open = closed_after(tcp, now, Duration::from_millis(100)).await;
            assert!(open.is_none(), "cut after {open:?}");
        }
        assert_eq!(headerless.cut_under_pressure.get(), 2);
        assert_eq!(headerless.cut_at_deadline.get(), 0);
        let open = closed_after(served, now, Duration::from_millis(100)).await;
        assert!(open.is_none(), "a served connection is never cut: {open:?}");
        stop.cancel();
    }
}
