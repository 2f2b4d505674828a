//! D-Bus, when a bus is there: the `org.kvfleet.Agent1` interface and a logind delay inhibitor.
//!
//! - `org.kvfleet.Agent1` at `/org/kvfleet/Agent` (bus name `org.kvfleet.Agent`): `Status()`
//!   returns the agent's state as JSON, `Drain()` takes the node out of rotation (new requests
//!   get 503 `draining`, `/ready` says 503, in-flight work finishes), `Resume()` puts it back;
//!   the `Ready` property mirrors `/ready`.
//! - A `shutdown` delay inhibitor from logind: when the machine is about to shut down or reboot,
//!   logind emits `PrepareForShutdown(true)` and waits (up to its `InhibitDelayMaxSec`) for
//!   delay locks. The agent answers by starting its drain, and releases the lock once the drain
//!   is over, so a reboot does not cut streams off mid-sentence.
//!
//! No bus (a container, a laptop without the system bus) means one log line and nothing else:
//! D-Bus is a convenience, never a reason not to serve.

use std::sync::{Arc, Mutex};

use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;
use zbus::connection::Builder;
use zbus::{Connection, interface, proxy};

use crate::backend::Backend;
use crate::frontend::Frontend;

/// The bus name the agent takes.
pub const BUS_NAME: &str = "org.kvfleet.Agent";
/// Where its object lives.
pub const OBJECT_PATH: &str = "/org/kvfleet/Agent";

/// Which bus to use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bus {
    /// None: D-Bus off.
    Off,
    /// The system bus (production).
    System,
    /// A bus at this address (tests run a private `dbus-daemon`).
    Address(String),
}

/// The object behind `org.kvfleet.Agent1`.
struct AgentObject {
    frontend: Arc<Frontend>,
    backend: Arc<dyn Backend>,
}

#[interface(name = "org.kvfleet.Agent1")]
impl AgentObject {
    /// The agent's state as JSON: readiness, draining, requests in flight, workers.
    fn status(&self) -> String {
        serde_json::json!({
            "ready": self.frontend.is_ready(),
            "draining": self.frontend.is_draining(),
            "in_flight": self.frontend.in_flight(),
            "workers": self.backend.workers(),
        })
        .to_string()
    }

    /// Stop taking new requests; in-flight requests finish.
    fn drain(&self) {
        tracing::info!("drain requested over D-Bus");
        self.frontend.drain();
    }

    /// Take requests again after a `Drain`.
    fn resume(&self) {
        tracing::info!("resume requested over D-Bus");
        self.frontend.resume();
    }

    /// Whether `/ready` would answer 200.
    #[zbus(property)]
    fn ready(&self) -> bool {
        self.frontend.is_ready()
    }
}

#[proxy(
    interface = "org.freedesktop.login1.Manager",
    default_service = "org.freedesktop.login1",
    default_path = "/org/freedesktop/login1"
)]
trait Login1Manager {
    /// Takes an inhibitor lock; the returned descriptor holds it until closed.
    fn inhibit(&self, what: &str, who: &str, why: &str, mode: &str) -> zbus::Result<zbus::OwnedFd>;

    /// `true` just before shutdown or reboot, `false` if it was cancelled.
    #[zbus(signal)]
    fn prepare_for_shutdown(&self, start: bool) -> zbus::Result<()>;
}

/// The agent's D-Bus presence; dropping it leaves the bus.
#[derive(Debug)]
pub struct Dbus {
    _connection: Connection,
    inhibitor: Arc<Mutex<Option<zbus::OwnedFd>>>,
    watcher: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Dbus {
    fn drop(&mut self) {
        if let Some(watcher) = self.watcher.take() {
            watcher.abort();
        }
    }
}

impl Dbus {
    /// Connects, exports the interface and takes the inhibitor. `shutdown` is cancelled when
    /// logind announces a shutdown. `None` (after one log line) when there is no bus.
    pub async fn start(
        bus: &Bus,
        frontend: Arc<Frontend>,
        backend: Arc<dyn Backend>,
        shutdown: CancellationToken,
    ) -> Option<Self> {
        let builder = match bus {
            Bus::Off => return None,
            Bus::System => Builder::system(),
            Bus::Address(address) => Builder::address(address.as_str()),
        };
        let object = AgentObject { frontend, backend };
        let connection = match builder
            .name(BUS_NAME)
            .serve_at(OBJECT_PATH, object)
            .build()
            .await
        {
            Ok(connection) => connection,
            Err(e) => {
                tracing::info!(error = %e, "no D-Bus (system bus absent or name refused): org.kvfleet.Agent1 not exported");
                return None;
            }
        };
        tracing::info!(
            name = BUS_NAME,
            path = OBJECT_PATH,
            "org.kvfleet.Agent1 exported on D-Bus"
        );
        let inhibitor = Arc::new(Mutex::new(None));
        let watcher = match Login1ManagerProxy::new(&connection).await {
            Ok(login1) => watch_logind(login1, inhibitor.clone(), shutdown).await,
            Err(e) => {
                tracing::info!(error = %e, "logind not reachable: no shutdown inhibitor");
                None
            }
        };
        Some(Self {
            _connection: connection,
            inhibitor,
            watcher,
        })
    }

    /// Whether a logind delay lock is held.
    pub fn holds_inhibitor(&self) -> bool {
        self.inhibitor.lock().map(|i| i.is_some()).unwrap_or(false)
    }

    /// The drain is over: let the shutdown proceed.
    pub fn release_inhibitor(&self) {
        if let Ok(mut inhibitor) = self.inhibitor.lock()
            && inhibitor.take().is_some()
        {
            tracing::info!("logind shutdown inhibitor released");
        }
    }
}

async fn watch_logind(
    login1: Login1ManagerProxy<'static>,
    inhibitor: Arc<Mutex<Option<zbus::OwnedFd>>>,
    shutdown: CancellationToken,
) -> Option<tokio::task::JoinHandle<()>> {
    let lock = login1
        .inhibit(
            "shutdown",
            "kvfleet-agent",
            "finishing in-flight inference requests",
            "delay",
        )
        .await;
    match lock {
        Ok(fd) => {
            if let Ok(mut slot) = inhibitor.lock() {
                *slot = Some(fd);
            }
            tracing::info!("logind shutdown delay inhibitor taken");
        }
        Err(e) => {
            tracing::info!(error = %e, "logind refused a delay inhibitor: shutdown will not wait for the drain");
            return None;
        }
    }
    let mut signals = match login1.receive_prepare_for_shutdown().await {
        Ok(signals) => signals,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch logind's PrepareForShutdown");
            return None;
        }
    };
    // Owned by `Dbus`, which aborts it when dropped.
    Some(tokio::spawn(async move {
        while let Some(signal) = signals.next().await {
            if signal.args().is_ok_and(|a| a.start) {
                tracing::info!("logind announced a shutdown: draining");
                shutdown.cancel();
                return;
            }
        }
    }))
}
