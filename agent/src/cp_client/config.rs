//! `[control_plane]`: which control plane this node joins and how it talks to it.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// Where the agent's join token comes from.
#[derive(Clone, PartialEq, Eq)]
pub enum JoinToken {
    /// Given in the config or the environment.
    Inline(String),
    /// Read from this file when the agent registers (keep it 0600, or in a systemd credential).
    File(PathBuf),
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // Never in logs.
            JoinToken::Inline(_) => f.write_str("Inline(<redacted>)"),
            JoinToken::File(path) => f.debug_tuple("File").field(path).finish(),
        }
    }
}

/// `[control_plane]`: the fleet's control plane and how this node joins it. With it, the
/// control plane decides which workers run here (`[[workers]]` is ignored; `[[models]]` entries
/// supply local engine settings for the models it names).
#[derive(Debug, Clone, PartialEq)]
pub struct ControlPlaneConfig {
    /// Base URL, `http://host:port` or `https://host:port`.
    pub url: String,
    /// What an `https` control plane is trusted through (required for one; see
    /// `cp_client::trust`). `None` with `http`.
    pub ca: Option<super::CaTrust>,
    /// The join token for the first registration; afterwards the agent uses the credential it
    /// got, stored in `state_dir`. `None`: the node must have registered before.
    pub join_token: Option<JoinToken>,
    /// Where the credential, the peer certificate and key, and the last desired state live.
    pub state_dir: PathBuf,
    /// Heartbeat period; `None`: what the control plane says (its `heartbeat_interval_ms`).
    pub heartbeat_interval: Option<Duration>,
    /// How long one desired-state long poll waits.
    pub watch_wait: Duration,
    /// Timeout of each call (long polls get `watch_wait` on top).
    pub request_timeout: Duration,
    /// First retry delay when the control plane is unreachable (jittered, doubling).
    pub retry_backoff_initial: Duration,
    /// Retry delays double up to this.
    pub retry_backoff_max: Duration,
    /// The frontend address other nodes and clients reach (`host:port`); `None`: the listen
    /// address (with an unspecified IP, the node name).
    pub advertise_addr: Option<String>,
    /// CPU slots offered for CPU workers; `None`: 1 on a node without GPUs, else 0.
    pub cpu_slots: Option<u32>,
    /// Labels for placement constraints.
    pub labels: BTreeMap<String, String>,
}

/// The default `[control_plane] state_dir`.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/kvfleet/agent";

impl ControlPlaneConfig {
    /// Defaults for a control plane at `url`.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            ca: None,
            join_token: None,
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            heartbeat_interval: None,
            watch_wait: Duration::from_secs(30),
            request_timeout: Duration::from_secs(10),
            retry_backoff_initial: Duration::from_millis(500),
            retry_backoff_max: Duration::from_secs(30),
            advertise_addr: None,
            cpu_slots: None,
            labels: BTreeMap::new(),
        }
    }
}
