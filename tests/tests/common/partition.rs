//! A real partition of peer (QUIC over UDP) traffic on loopback, where there are no network
//! namespaces: one [`Relay`] per node in front of its peer endpoint (the node advertises the
//! relay's address with `[peer] advertise`, so the other nodes dial the relay), all relays
//! sharing one [`Switch`].
//!
//! Partitioning node X cuts it off both ways: X's relay drops every datagram (peers cannot
//! reach X, and X's answers do not leave), and every relay drops datagrams from X's peer
//! socket and answers to it (QUIC sends from the one socket it listens on, so X's own
//! connections to the others come from its peer endpoint's bound address). Healing forwards
//! again; nothing is replayed, so the connections of the partition have timed out by then and
//! the nodes dial anew.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::UdpSocket;
use tokio::task::{JoinHandle, JoinSet};

/// Which node is cut off, if any.
#[derive(Debug, Clone, Copy)]
struct Cut {
    /// The partitioned node's relay.
    relay: SocketAddr,
    /// The partitioned node's peer endpoint (the source of its own connections).
    peer: SocketAddr,
}

/// The partition shared by every relay.
#[derive(Debug, Default)]
pub struct Switch {
    cut: Mutex<Option<Cut>>,
    dropped: AtomicU64,
}

impl Switch {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Cuts off the node behind `relay` whose peer endpoint is bound to `peer`.
    pub fn partition(&self, relay: &Relay, peer: SocketAddr) {
        *self.cut.lock().unwrap() = Some(Cut {
            relay: relay.addr,
            peer,
        });
    }

    /// Forwards everything again.
    pub fn heal(&self) {
        *self.cut.lock().unwrap() = None;
    }

    /// Datagrams dropped by partitions so far.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Whether a datagram through `relay` from or to the client `client` passes (counting
    /// the ones that do not).
    fn passes(&self, relay: SocketAddr, client: SocketAddr) -> bool {
        let passes = match *self.cut.lock().unwrap() {
            Some(cut) => cut.relay != relay && cut.peer != client,
            None => true,
        };
        if !passes {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        passes
    }
}

/// A UDP relay on a loopback port of its own, forwarding to one node's peer endpoint: every
/// client address gets an upstream socket of its own (so the node sees one peer per client,
/// as it would directly), whose answers go back to that client from the relay's port.
pub struct Relay {
    pub addr: SocketAddr,
    target: Arc<Mutex<Option<SocketAddr>>>,
    task: JoinHandle<()>,
}

impl Relay {
    /// A relay that drops everything until [`Relay::forward_to`] names its node's endpoint
    /// (the endpoint binds only once the node has registered).
    pub async fn start(switch: Arc<Switch>) -> Self {
        let socket = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let addr = socket.local_addr().unwrap();
        let target = Arc::new(Mutex::new(None::<SocketAddr>));
        let task = tokio::spawn(relay(socket, addr, target.clone(), switch));
        Self { addr, target, task }
    }

    /// Forwards to the peer endpoint at `target` from now on.
    pub fn forward_to(&self, target: SocketAddr) {
        *self.target.lock().unwrap() = Some(target);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        // Its answer tasks live in the relay task's JoinSet, aborted with it.
        self.task.abort();
    }
}

async fn relay(
    socket: Arc<UdpSocket>,
    addr: SocketAddr,
    target: Arc<Mutex<Option<SocketAddr>>>,
    switch: Arc<Switch>,
) {
    let mut upstreams: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
    let mut answers = JoinSet::new();
    let mut buf = vec![0u8; 65_536];
    loop {
        // A UDP receive error on loopback concerns one datagram; the relay goes on.
        let Ok((n, client)) = socket.recv_from(&mut buf).await else {
            continue;
        };
        let Some(to) = *target.lock().unwrap() else {
            continue;
        };
        if !switch.passes(addr, client) {
            continue;
        }
        let upstream = match upstreams.get(&client) {
            Some(upstream) => upstream.clone(),
            None => {
                let upstream = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
                upstreams.insert(client, upstream.clone());
                answers.spawn(answer(
                    upstream.clone(),
                    socket.clone(),
                    addr,
                    client,
                    switch.clone(),
                ));
                upstream
            }
        };
        let _ = upstream.send_to(&buf[..n], to).await;
    }
}

/// Sends what the node answers on `upstream` back to `client` from the relay's `socket`.
async fn answer(
    upstream: Arc<UdpSocket>,
    socket: Arc<UdpSocket>,
    addr: SocketAddr,
    client: SocketAddr,
    switch: Arc<Switch>,
) {
    let mut buf = vec![0u8; 65_536];
    loop {
        let Ok((n, _)) = upstream.recv_from(&mut buf).await else {
            continue;
        };
        if switch.passes(addr, client) {
            let _ = socket.send_to(&buf[..n], client).await;
        }
    }
}
