//! The systemd notify protocol, for `Type=notify` units with `WatchdogSec=`: `READY=1` once the
//! schema is migrated and the API is listening, `WATCHDOG=1` at half the watchdog interval
//! while the server runs, `STOPPING=1` when shutdown begins. No dependency: one datagram to
//! `$NOTIFY_SOCKET` (a path, or `@name` in the abstract namespace). Outside systemd nothing is
//! sent.

use std::io;
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// Where and how often to tell systemd about this process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notifier {
    socket: String,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// Reads `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID` through `var` (the process
    /// environment in `main`, a table in tests). `None` when not started by systemd.
    pub fn from_env(var: impl Fn(&str) -> Option<String>, pid: u32) -> Option<Self> {
        let socket = var("NOTIFY_SOCKET").filter(|s| !s.is_empty())?;
        // The watchdog is ours only if no WATCHDOG_PID names another process.
        let ours = var("WATCHDOG_PID").is_none_or(|p| p.trim() == pid.to_string());
        let watchdog = var("WATCHDOG_USEC")
            .and_then(|usec| usec.trim().parse::<u64>().ok())
            .filter(|usec| *usec > 0 && ours)
            .map(|usec| Duration::from_micros(usec) / 2);
        Some(Notifier { socket, watchdog })
    }

    /// How often to send `WATCHDOG=1` (half of systemd's interval), if a watchdog is set.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog
    }

    /// Sends one notification such as `READY=1`.
    pub fn notify(&self, state: &str) -> io::Result<()> {
        let socket = UnixDatagram::unbound()?;
        match self.socket.strip_prefix('@') {
            Some(name) => send_abstract(&socket, name, state),
            None => socket.send_to(state.as_bytes(), &self.socket).map(|_| ()),
        }
    }
}

#[cfg(target_os = "linux")]
fn send_abstract(socket: &UnixDatagram, name: &str, state: &str) -> io::Result<()> {
    use std::os::linux::net::SocketAddrExt as _;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
    socket.send_to_addr(state.as_bytes(), &addr).map(|_| ())
}

#[cfg(not(target_os = "linux"))]
fn send_abstract(_: &UnixDatagram, _: &str, _: &str) -> io::Result<()> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "abstract sockets need Linux",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn environment_table() {
        // (environment, expected: None = not under systemd, Some(watchdog interval))
        type Env = &'static [(&'static str, &'static str)];
        let cases: &[(Env, Option<Option<Duration>>)] = &[
            (&[], None),
            (&[("NOTIFY_SOCKET", "")], None),
            (&[("NOTIFY_SOCKET", "/run/systemd/notify")], Some(None)),
            (
                &[("NOTIFY_SOCKET", "/run/n"), ("WATCHDOG_USEC", "30000000")],
                Some(Some(Duration::from_secs(15))),
            ),
            (
                &[
                    ("NOTIFY_SOCKET", "/run/n"),
                    ("WATCHDOG_USEC", "30000000"),
                    ("WATCHDOG_PID", "42"),
                ],
                Some(Some(Duration::from_secs(15))),
            ),
            (
                &[
                    ("NOTIFY_SOCKET", "/run/n"),
                    ("WATCHDOG_USEC", "30000000"),
                    ("WATCHDOG_PID", "7"),
                ],
                Some(None),
            ),
            (
                &[("NOTIFY_SOCKET", "/run/n"), ("WATCHDOG_USEC", "soon")],
                Some(None),
            ),
        ];
        for (env, want) in cases {
            let var = |k: &str| {
                env.iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| (*v).to_owned())
            };
            let got = Notifier::from_env(var, 42).map(|n| n.watchdog_interval());
            assert_eq!(got, *want, "{env:?}");
        }
    }

    #[test]
    fn notifications_arrive_as_datagrams() {
        let dir = std::env::temp_dir().join(format!("kvfleet-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let listener = UnixDatagram::bind(&path).unwrap();
        let notifier = Notifier::from_env(
            |k| (k == "NOTIFY_SOCKET").then(|| path.display().to_string()),
            1,
        )
        .unwrap();
        notifier.notify("READY=1").unwrap();
        let mut buf = [0u8; 64];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
