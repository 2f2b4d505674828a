//! systemd integration without libsystemd: `sd_notify` is a datagram of `KEY=VALUE` lines sent
//! to the Unix socket named by `$NOTIFY_SOCKET` (a path, or an abstract name starting with `@`).
//!
//! The agent sends `READY=1` once every worker is ready (so `systemctl start` returns when the
//! node can serve), `WATCHDOG=1` at half the `WatchdogSec=` interval, `STATUS=` lines a human can
//! read in `systemctl status`, and `STOPPING=1` when it starts draining. Without
//! `$NOTIFY_SOCKET` (not under systemd) every call is a no-op.

use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::time::Duration;

/// Where notifications go.
#[derive(Debug, Clone, Default)]
pub struct Notifier {
    socket: Option<NotifySocket>,
    watchdog: Option<Duration>,
}

#[derive(Debug, Clone)]
enum NotifySocket {
    Path(PathBuf),
    Abstract(Vec<u8>),
}

impl Notifier {
    /// From `$NOTIFY_SOCKET` and `$WATCHDOG_USEC` (set by systemd for `Type=notify` units).
    pub fn from_env() -> Self {
        Self::from_values(
            std::env::var("NOTIFY_SOCKET").ok().as_deref(),
            std::env::var("WATCHDOG_USEC").ok().as_deref(),
            std::env::var("WATCHDOG_PID").ok().as_deref(),
        )
    }

    /// From the variables' values (tests).
    pub fn from_values(
        socket: Option<&str>,
        watchdog_usec: Option<&str>,
        watchdog_pid: Option<&str>,
    ) -> Self {
        let socket = socket
            .filter(|s| !s.is_empty())
            .map(|s| match s.strip_prefix('@') {
                Some(name) => NotifySocket::Abstract(name.as_bytes().to_vec()),
                None => NotifySocket::Path(PathBuf::from(s)),
            });
        // WATCHDOG_PID, when set, names the process that must ping: maybe not us.
        let ours = watchdog_pid
            .and_then(|p| p.parse::<u32>().ok())
            .is_none_or(|pid| pid == std::process::id());
        let watchdog = watchdog_usec
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|usec| *usec > 0 && ours)
            .map(Duration::from_micros);
        Self { socket, watchdog }
    }

    /// How often to send `WATCHDOG=1`: half the configured interval, as sd_watchdog_enabled(3)
    /// recommends. `None` when the unit has no watchdog.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog.map(|d| d / 2)
    }

    /// Sends one notification. Failures are logged, never fatal: systemd being away must not
    /// stop the node from serving.
    pub fn notify(&self, message: &str) {
        let Some(socket) = &self.socket else {
            return;
        };
        let result = UnixDatagram::unbound().and_then(|datagram| match socket {
            NotifySocket::Path(path) => datagram.send_to(message.as_bytes(), path),
            NotifySocket::Abstract(name) => {
                use std::os::linux::net::SocketAddrExt;
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
                datagram.send_to_addr(message.as_bytes(), &addr)
            }
        });
        if let Err(e) = result {
            tracing::warn!(error = %e, "sd_notify failed");
        }
    }

    /// `STATUS=...`.
    pub fn status(&self, status: &str) {
        self.notify(&format!("STATUS={}", status.replace('\n', " ")));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notifications_reach_the_socket() {
        let dir = std::env::temp_dir().join(format!("kvfleet-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let receiver = UnixDatagram::bind(&path).unwrap();
        let notifier = Notifier::from_values(path.to_str(), Some("10000000"), None);
        notifier.notify("READY=1");
        notifier.status("2/2 workers ready\nserving");
        let mut buf = [0u8; 256];
        let n = receiver.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
        let n = receiver.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STATUS=2/2 workers ready serving");
        assert_eq!(notifier.watchdog_interval(), Some(Duration::from_secs(5)));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn abstract_sockets_and_absent_systemd() {
        let name = format!("kvfleet-notify-test-{}", std::process::id());
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let receiver = UnixDatagram::bind_addr(&addr).unwrap();
        Notifier::from_values(Some(&format!("@{name}")), None, None).notify("WATCHDOG=1");
        let mut buf = [0u8; 64];
        let n = receiver.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"WATCHDOG=1");
        // No socket: a silent no-op. A watchdog meant for another pid is not ours.
        Notifier::default().notify("READY=1");
        assert_eq!(
            Notifier::from_values(None, Some("1000"), Some("1")).watchdog_interval(),
            None
        );
    }
}
