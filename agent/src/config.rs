//! The agent's configuration file: parsed in exactly one place, from an abstract [`Sources`]
//! (the TOML file's text, the `KVFLEET_AGENT_*` environment variables and the command-line
//! flags), into the typed [`Config`]. Each section's type belongs to the module it configures
//! (`[frontend]` → `frontend::FrontendConfig`, `[[models]]`/`[[workers]]`/`[supervisor]` →
//! `worker`, `[control_plane]` → `cp_client`, `[peer]` → `peer`, `[log]` → `logging`); this file
//! only reads the file into them and checks it.
//!
//! Precedence, lowest first: built-in defaults, the file, the environment, the flags. Tests build
//! a [`Sources`] by hand, so nothing here reads the process environment or the disk except
//! [`Sources::from_process`], which `main` calls once.
//!
//! Validation collects every problem it can find and gives each one a location (`file:line:col`
//! for the file, the variable or the flag otherwise): `kvfleet-agent check-config` prints them
//! all. A syntax or type error in the TOML stops the parse at that point (serde cannot continue
//! past a value it could not read), so it is reported alone.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kvfleet_model::KvBudget;
use kvfleet_proto::BlockSize;
use kvfleet_proto::api::WorkerRole;
use kvfleet_proto::profile::PerfProfile;
use serde::Deserialize;
use toml::Spanned;

// Each section's type belongs to the module it configures; this file only reads the file into
// them.
use crate::cp_client::{ControlPlaneConfig, JoinToken};
use crate::frontend::FrontendConfig;
use crate::logging::{LogConfig, LogFormat};
use crate::peer::PeerSettings;
use crate::worker::{
    Device, EngineKind, ModelConfig, ReasoningParserKind, RoutingMode, SupervisorConfig,
    ToolParserKind, WorkerConfig,
};

/// Where the agent looks for its file when neither `--config` nor `KVFLEET_AGENT_CONFIG` says.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/kvfleet/agent.toml";
/// Prefix of every environment variable the agent reads.
pub const ENV_PREFIX: &str = "KVFLEET_AGENT_";

/// The raw inputs to configuration. Nothing in here has been interpreted yet.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    /// The config file, if one was found: its path (for messages) and its text.
    pub file: Option<ConfigFile>,
    /// `KVFLEET_AGENT_*` environment variables (others are ignored).
    pub env: BTreeMap<String, String>,
    /// Overrides given as command-line flags.
    pub flags: FlagOverrides,
}

/// A config file's path and contents.
#[derive(Debug, Clone)]
pub struct ConfigFile {
    /// Where it was read from.
    pub path: PathBuf,
    /// Its text.
    pub text: String,
}

/// Settings that may be overridden on the command line (`kvfleet-agent run --listen ...`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FlagOverrides {
    /// `--listen`.
    pub listen: Option<String>,
    /// `--log-format`.
    pub log_format: Option<String>,
    /// `--log-level` (a tracing filter).
    pub log_level: Option<String>,
}

impl Sources {
    /// Reads the process environment and the config file. `explicit` is the `--config` flag: a
    /// missing file named explicitly (or by `KVFLEET_AGENT_CONFIG`) is an error, while a missing
    /// default file means "run on defaults" (a development machine).
    pub fn from_process(explicit: Option<&Path>, flags: FlagOverrides) -> Result<Self, Problems> {
        let env: BTreeMap<String, String> = std::env::vars()
            .filter(|(key, _)| key.starts_with(ENV_PREFIX))
            .collect();
        let named = explicit
            .map(|p| (p.to_path_buf(), Location::Flag("--config")))
            .or_else(|| {
                env.get("KVFLEET_AGENT_CONFIG").map(|p| {
                    (
                        PathBuf::from(p),
                        Location::Env("KVFLEET_AGENT_CONFIG".into()),
                    )
                })
            });
        let file = match named {
            Some((path, location)) => match std::fs::read_to_string(&path) {
                Ok(text) => Some(ConfigFile { path, text }),
                Err(e) => {
                    return Err(Problems(vec![Problem::new(
                        location,
                        format!("cannot read config file {}: {e}", path.display()),
                    )]));
                }
            },
            None => match std::fs::read_to_string(DEFAULT_CONFIG_PATH) {
                Ok(text) => Some(ConfigFile {
                    path: DEFAULT_CONFIG_PATH.into(),
                    text,
                }),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => {
                    return Err(Problems(vec![Problem::new(
                        Location::Default,
                        format!("cannot read config file {DEFAULT_CONFIG_PATH}: {e}"),
                    )]));
                }
            },
        };
        Ok(Self { file, env, flags })
    }

    /// Sources made of a file's text alone (tests, `check-config`).
    pub fn from_text(path: impl Into<PathBuf>, text: impl Into<String>) -> Self {
        Self {
            file: Some(ConfigFile {
                path: path.into(),
                text: text.into(),
            }),
            ..Self::default()
        }
    }
}

/// Where a setting (or a problem with it) came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A position in the config file (1-based line and column).
    File {
        /// The file.
        path: PathBuf,
        /// Line, from 1.
        line: usize,
        /// Column, from 1.
        column: usize,
    },
    /// An environment variable.
    Env(String),
    /// A command-line flag.
    Flag(&'static str),
    /// No particular place (a default, or the configuration as a whole).
    Default,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::File { path, line, column } => {
                write!(f, "{}:{line}:{column}", path.display())
            }
            Location::Env(var) => write!(f, "environment variable {var}"),
            Location::Flag(flag) => write!(f, "flag {flag}"),
            Location::Default => f.write_str("configuration"),
        }
    }
}

/// One thing wrong with the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Where.
    pub location: Location,
    /// What, and what would be accepted.
    pub message: String,
}

impl Problem {
    fn new(location: Location, message: impl Into<String>) -> Self {
        Self {
            location,
            message: message.into(),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.location, self.message)
    }
}

/// Every problem found; never empty.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct Problems(pub Vec<Problem>);

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, problem) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{problem}")?;
        }
        Ok(())
    }
}

/// The whole, validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// This node's name in logs and metrics (default: the host name).
    pub node_name: String,
    /// The OpenAI frontend.
    pub frontend: FrontendConfig,
    /// Logging.
    pub log: LogConfig,
    /// How the frontend picks among this node's workers.
    pub routing: RoutingMode,
    /// `[routing] fleet_mode`: how the fleet router picks among every worker of the fleet, in
    /// control-plane mode: `kv` when the fleet's performance profile is known
    /// (`fleet_profile`), else `kv-blocks`; or `round-robin`, `random`, `least-loaded`,
    /// `approximate`.
    pub fleet_routing: kvfleet_kv_router::RoutingMode,
    /// `[routing] fleet_profile`: the performance profile of the fleet's workers (a
    /// `.perf.toml` file, as the planner reads), which the time-based `kv` mode predicts with.
    pub fleet_profile: Option<std::sync::Arc<PerfProfile>>,
    /// Models this node can serve.
    pub models: Vec<ModelConfig>,
    /// Workers to run. Empty means "one per GPU found, or one CPU worker", serving the first
    /// model.
    pub workers: Vec<WorkerConfig>,
    /// Worker process supervision.
    pub supervisor: SupervisorConfig,
    /// How long SIGTERM waits for in-flight requests before stopping anyway.
    pub drain_grace: Duration,
    /// The control plane to join; `None`: standalone (the configured workers, nothing else).
    pub control_plane: Option<ControlPlaneConfig>,
    /// `[peer]`: the QUIC endpoint other agents forward requests to (control-plane mode only:
    /// its certificate comes from the control plane's node CA).
    pub peer: PeerSettings,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            node_name: default_node_name(),
            frontend: FrontendConfig::default(),
            log: LogConfig::default(),
            routing: RoutingMode::LeastLoaded,
            // `kv-blocks` until the fleet router is given its workers' performance profiles:
            // the time-based `kv` on the nominal placeholder profile undervalues a worker's
            // running decodes (tests/fleet_routing.rs, the published-load test).
            fleet_routing: kvfleet_kv_router::RoutingMode::KvBlocks,
            fleet_profile: None,
            models: vec![ModelConfig::mock("kvfleet-mock")],
            workers: Vec::new(),
            supervisor: SupervisorConfig::default(),
            drain_grace: Duration::from_secs(30),
            control_plane: None,
            peer: PeerSettings::default(),
        }
    }
}

fn default_node_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_owned())
        .ok()
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

// ---------------------------------------------------------------------------------------------
// The file's shape, as written. Values that need checking keep their span for the message.

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    node: Option<RawNode>,
    frontend: Option<RawFrontend>,
    log: Option<RawLog>,
    routing: Option<RawRouting>,
    supervisor: Option<RawSupervisor>,
    kv_tiers: Option<RawKvTiers>,
    drain_grace_secs: Option<Spanned<f64>>,
    #[serde(default)]
    models: Vec<RawModel>,
    #[serde(default)]
    workers: Vec<RawWorker>,
    control_plane: Option<RawControlPlane>,
    peer: Option<RawPeer>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPeer {
    listen: Option<Spanned<String>>,
    advertise: Option<Spanned<String>>,
    forward: Option<bool>,
    dead_after_ms: Option<Spanned<u64>>,
    stall_timeout_secs: Option<Spanned<u64>>,
    transfer_timeout_secs: Option<Spanned<u64>>,
    max_streams_per_peer: Option<Spanned<u64>>,
    max_buffered_mib_per_peer: Option<Spanned<u64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawControlPlane {
    url: Option<Spanned<String>>,
    join_token: Option<Spanned<String>>,
    join_token_file: Option<Spanned<String>>,
    ca_fingerprint: Option<Spanned<String>>,
    ca_file: Option<Spanned<String>>,
    state_dir: Option<Spanned<String>>,
    heartbeat_interval_ms: Option<Spanned<i64>>,
    watch_wait_secs: Option<Spanned<i64>>,
    request_timeout_secs: Option<Spanned<f64>>,
    retry_backoff_initial_ms: Option<Spanned<i64>>,
    retry_backoff_max_ms: Option<Spanned<i64>>,
    advertise_addr: Option<Spanned<String>>,
    cpu_slots: Option<Spanned<i64>>,
    labels: Option<BTreeMap<String, Spanned<String>>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    name: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFrontend {
    listen: Option<Spanned<String>>,
    max_body_bytes: Option<Spanned<i64>>,
    max_in_flight: Option<Spanned<i64>>,
    queue_capacity: Option<Spanned<i64>>,
    queue_timeout_secs: Option<Spanned<f64>>,
    retry_after_secs: Option<Spanned<i64>>,
    api_keys: Option<Vec<Spanned<String>>>,
    allow_unauthenticated: Option<Spanned<bool>>,
    max_connections: Option<Spanned<i64>>,
    header_read_timeout_secs: Option<Spanned<f64>>,
    body_read_timeout_secs: Option<Spanned<f64>>,
    header_timeout_jitter: Option<Spanned<f64>>,
    headerless_pressure: Option<Spanned<i64>>,
    header_read_timeout_under_pressure_secs: Option<Spanned<f64>>,
    max_headerless_per_ip: Option<Spanned<i64>>,
    rate_limit: Option<RawRateLimit>,
    keyless_rate_limit: Option<RawKeylessRateLimit>,
    keys: Option<Vec<RawApiKey>>,
    metrics_listen: Option<Spanned<String>>,
}

/// `[frontend.rate_limit]`, or a limit inside a `[[frontend.keys]]` entry.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRateLimit {
    requests_per_sec: Option<Spanned<f64>>,
    burst: Option<Spanned<i64>>,
    tokens_per_minute: Option<Spanned<i64>>,
}

/// `[frontend.keyless_rate_limit]`: per client IP, when no API keys are configured.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKeylessRateLimit {
    requests_per_sec: Option<Spanned<f64>>,
    burst: Option<Spanned<i64>>,
    max_clients: Option<Spanned<i64>>,
}

/// `[[frontend.keys]]`: a named key with its own limit.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApiKey {
    name: Spanned<String>,
    key: Spanned<String>,
    requests_per_sec: Option<Spanned<f64>>,
    burst: Option<Spanned<i64>>,
    tokens_per_minute: Option<Spanned<i64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    format: Option<Spanned<String>>,
    level: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRouting {
    mode: Option<Spanned<String>>,
    fleet_mode: Option<Spanned<String>>,
    fleet_profile: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSupervisor {
    socket_dir: Option<Spanned<String>>,
    restart_backoff_initial_ms: Option<Spanned<i64>>,
    restart_backoff_max_ms: Option<Spanned<i64>>,
    start_timeout_secs: Option<Spanned<f64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKvTiers {
    host_memory: Option<Spanned<String>>,
    disk: Option<Spanned<String>>,
    disk_dir: Option<Spanned<String>>,
    admission: Option<Spanned<String>>,
    write_queue_blocks: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    name: Spanned<String>,
    engine: Option<Spanned<String>>,
    context_length: Option<Spanned<i64>>,
    block_size: Option<Spanned<i64>>,
    kv_blocks: Option<Spanned<i64>>,
    path: Option<Spanned<String>>,
    kv_memory: Option<Spanned<String>>,
    mock_token_time_us: Option<Spanned<i64>>,
    mock_prefill_time_per_token_us: Option<Spanned<i64>>,
    mock_kv_head_dim: Option<Spanned<i64>>,
    command: Option<Spanned<String>>,
    args: Option<Spanned<Vec<String>>>,
    slots: Option<Spanned<i64>>,
    kv_ttl_secs: Option<Spanned<i64>>,
    kv_events: Option<Spanned<String>>,
    kv_events_replay: Option<Spanned<String>>,
    tool_parser: Option<Spanned<String>>,
    reasoning_parser: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWorker {
    model: Option<Spanned<String>>,
    device: Option<Spanned<String>>,
    role: Option<Spanned<String>>,
}

/// Collects problems while the config is built.
struct Checker<'a> {
    file: Option<&'a ConfigFile>,
    problems: Vec<Problem>,
}

impl Checker<'_> {
    fn at<T>(&self, value: &Spanned<T>) -> Location {
        match self.file {
            Some(file) => file_location(file, value.span().start),
            None => Location::Default,
        }
    }

    fn problem(&mut self, location: Location, message: impl Into<String>) {
        self.problems.push(Problem::new(location, message));
    }

    /// An integer in `range`, or a problem naming `key`.
    fn int(
        &mut self,
        key: &str,
        value: &Spanned<i64>,
        range: std::ops::RangeInclusive<i64>,
    ) -> Option<i64> {
        let v = *value.get_ref();
        if range.contains(&v) {
            Some(v)
        } else {
            let location = self.at(value);
            self.problem(
                location,
                format!(
                    "{key} = {v} is out of range: expected {} to {}",
                    range.start(),
                    range.end()
                ),
            );
            None
        }
    }

    fn secs(&mut self, key: &str, value: &Spanned<f64>, max: f64) -> Option<Duration> {
        let v = *value.get_ref();
        if v.is_finite() && v > 0.0 && v <= max {
            Some(Duration::from_secs_f64(v))
        } else {
            let location = self.at(value);
            self.problem(
                location,
                format!(
                    "{key} = {v} is out of range: expected more than 0 and at most {max} seconds"
                ),
            );
            None
        }
    }
}

impl Checker<'_> {
    /// A path from the file: relative paths are taken from the file's directory, so a config
    /// and its models can move together.
    fn resolve(&self, path: &str) -> PathBuf {
        let path = Path::new(path.trim());
        match self.file.and_then(|f| f.path.parent()) {
            Some(dir) if path.is_relative() => dir.join(path),
            _ => path.to_path_buf(),
        }
    }
}

/// What `check-config` adds to [`Config::from_sources`]: every native model's `path` exists, is
/// readable and parses (its tokenizer, chat template and architecture are read; the weights
/// are not built). Kept apart because it reads model files, which can be large.
pub fn check_model_files(sources: &Sources, config: &Config) -> Result<(), Problems> {
    let raw: Option<RawConfig> = sources
        .file
        .as_ref()
        .and_then(|f| toml::from_str(&f.text).ok());
    let mut problems = Vec::new();
    for model in &config.models {
        let Some(path) = &model.path else { continue };
        let location = raw
            .as_ref()
            .and_then(|r| {
                r.models
                    .iter()
                    .find(|m| m.name.get_ref().trim() == model.name)
            })
            .and_then(|m| m.path.as_ref())
            .and_then(|p| {
                sources
                    .file
                    .as_ref()
                    .map(|f| file_location(f, p.span().start))
            })
            .unwrap_or(Location::Default);
        if let Err(message) = check_model_file(path) {
            problems.push(Problem::new(
                location,
                format!("model {:?}: {message}", model.name),
            ));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Problems(problems))
    }
}

fn check_model_file(path: &Path) -> Result<(), String> {
    match std::fs::metadata(path) {
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        Ok(meta) if !meta.is_dir() => {
            if let Err(e) = std::fs::File::open(path) {
                return Err(format!("cannot read {}: {e}", path.display()));
            }
        }
        Ok(_) => {}
    }
    kvfleet_model::load_text(path)
        .map(drop)
        .map_err(|e| format!("{} is not a usable model: {e}", path.display()))
}

fn file_location(file: &ConfigFile, offset: usize) -> Location {
    let before = file.text.get(..offset).unwrap_or(&file.text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    Location::File {
        path: file.path.clone(),
        line,
        column,
    }
}

fn parse_listen(text: &str) -> Result<SocketAddr, String> {
    text.parse().map_err(|_| {
        format!("{text:?} is not a socket address: expected host:port, e.g. \"0.0.0.0:8000\"")
    })
}

fn parse_log_format(text: &str) -> Result<LogFormat, String> {
    match text {
        "text" => Ok(LogFormat::Text),
        "json" => Ok(LogFormat::Json),
        other => Err(format!(
            "log format {other:?} is unknown: expected \"text\" or \"json\""
        )),
    }
}

fn parse_log_level(text: &str) -> Result<String, String> {
    tracing_subscriber::EnvFilter::try_new(text)
        .map(|_| text.to_owned())
        .map_err(|e| format!("log level {text:?} is not a valid filter: {e}"))
}

fn parse_routing(text: &str) -> Result<RoutingMode, String> {
    match text {
        "least-loaded" => Ok(RoutingMode::LeastLoaded),
        "round-robin" => Ok(RoutingMode::RoundRobin),
        other => Err(format!(
            "routing mode {other:?} is unknown: expected \"least-loaded\" or \"round-robin\""
        )),
    }
}

fn parse_device(text: &str) -> Result<Device, String> {
    if text == "cpu" {
        return Ok(Device::Cpu);
    }
    text.strip_prefix("gpu:")
        .and_then(|index| index.parse().ok())
        .map(Device::Gpu)
        .ok_or_else(|| {
            format!("device {text:?} is unknown: expected \"cpu\" or \"gpu:N\" (an NVML index)")
        })
}

fn parse_cp_url(text: &str) -> Result<String, String> {
    let text = text.trim().trim_end_matches('/');
    let Some(rest) = text
        .strip_prefix("http://")
        .or_else(|| text.strip_prefix("https://"))
    else {
        return Err(format!(
            "{text:?} is not a control-plane URL: expected https://host:port (or http:// on a \
             trusted network)"
        ));
    };
    if rest.is_empty() || rest.contains('/') || rest.contains(char::is_whitespace) {
        return Err(format!(
            "{text:?} is not a control-plane URL: expected http://host:port with no path"
        ));
    }
    Ok(text.to_owned())
}

/// A join token, bare (`kvf_…`) or carrying the fleet CA's fingerprint (`kvfj1.<hex>.kvf_…`);
/// kept as given (the agent sends only the bearer part).
fn parse_join_token(text: &str) -> Result<String, String> {
    let token = text.trim();
    let shape = "a join token looks like kvfj1.<CA fingerprint, 64 hex digits>.kvf_<prefix>_<secret> \
                 or kvf_<prefix>_<secret> (`kvfleet tokens create --role join`)";
    let bearer = kvfleet_proto::JoinTokenText::parse(token)
        .map_err(|_| shape.to_owned())?
        .bearer;
    if bearer.starts_with("kvf_") && bearer.len() > 8 && !token.contains(char::is_whitespace) {
        Ok(token.to_owned())
    } else {
        Err(shape.into())
    }
}

fn parse_advertise(text: &str) -> Result<String, String> {
    let text = text.trim();
    match text.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) => {
            Ok(text.to_owned())
        }
        _ => Err(format!(
            "advertise_addr {text:?}: expected host:port, e.g. \"10.0.0.5:8000\""
        )),
    }
}

/// A performance profile file (TOML, or JSON by its extension), validated.
fn read_profile(path: &Path) -> Result<PerfProfile, String> {
    let what = |e: &dyn fmt::Display| format!("routing.fleet_profile {}: {e}", path.display());
    let text = std::fs::read_to_string(path).map_err(|e| what(&e))?;
    let profile = if path.extension().is_some_and(|e| e == "json") {
        PerfProfile::from_json_str(&text)
    } else {
        PerfProfile::from_toml_str(&text)
    };
    profile.map_err(|e| what(&e))
}

fn absolute(key: &str, text: &str) -> Result<PathBuf, String> {
    let path = Path::new(text.trim());
    if path.is_absolute() {
        Ok(path.to_path_buf())
    } else {
        Err(format!("{key} {text:?} must be an absolute path"))
    }
}

fn parse_role(text: &str) -> Result<WorkerRole, String> {
    text.parse().map_err(|_| {
        format!("role {text:?} is unknown: expected \"aggregated\", \"prefill\" or \"decode\"")
    })
}

impl Config {
    /// Builds and validates the configuration from its sources. Returns every problem found.
    pub fn from_sources(sources: &Sources) -> Result<Self, Problems> {
        let raw = match &sources.file {
            Some(file) => toml::from_str::<RawConfig>(&file.text).map_err(|e| {
                let location = match e.span() {
                    Some(span) => file_location(file, span.start),
                    None => Location::File {
                        path: file.path.clone(),
                        line: 1,
                        column: 1,
                    },
                };
                Problems(vec![Problem::new(location, e.message().trim().to_owned())])
            })?,
            None => RawConfig::default(),
        };
        let mut check = Checker {
            file: sources.file.as_ref(),
            problems: Vec::new(),
        };
        let mut config = Config::default();
        check.apply_file(&raw, &mut config);
        check.apply_env(&sources.env, &mut config);
        check.apply_flags(&sources.flags, &mut config);
        check.resolve_trust(&raw, &sources.env, &mut config);
        check.cross_checks(&raw, &config);
        if check.problems.is_empty() {
            Ok(config)
        } else {
            Err(Problems(check.problems))
        }
    }

    /// The model named `name`.
    pub fn model(&self, name: &str) -> Option<&ModelConfig> {
        self.models.iter().find(|m| m.name == name)
    }
}

impl Checker<'_> {
    /// Applies `parse` to a spanned string, recording a problem at its location on failure.
    /// `[kv_tiers]`: per-worker budgets of the lower KV tiers.
    fn kv_tiers(&mut self, raw: &RawKvTiers, tiers: &mut kvfleet_engine::TierConfig) {
        // Sizes are written like `models.kv_memory` ("64GiB", "0"); only bytes make sense here.
        let bytes = |key: &'static str| {
            move |text: &str| match text.parse::<KvBudget>() {
                Ok(KvBudget::Bytes(n)) => Ok(n),
                _ if text.trim() == "0" => Ok(0),
                _ => Err(format!(
                    "kv_tiers.{key} {text:?}: expected a size such as \"64GiB\" or \"0\" (off)"
                )),
            }
        };
        if let Some(v) = &raw.host_memory
            && let Some(n) = self.parsed(v, bytes("host_memory"))
        {
            tiers.host_bytes = n;
        }
        if let Some(v) = &raw.disk
            && let Some(n) = self.parsed(v, bytes("disk"))
        {
            tiers.disk_bytes = n;
        }
        if let Some(dir) = &raw.disk_dir {
            if Path::new(dir.get_ref()).is_absolute() {
                tiers.disk_dir = PathBuf::from(dir.get_ref());
            } else {
                let location = self.at(dir);
                self.problem(
                    location,
                    format!(
                        "kv_tiers.disk_dir {:?} must be an absolute path",
                        dir.get_ref()
                    ),
                );
            }
        }
        if let Some(v) = &raw.admission
            && let Some(a) = self.parsed(v, |text| match text {
                "all" => Ok(kvfleet_engine::Admission::All),
                "reused" => Ok(kvfleet_engine::Admission::Reused),
                other => Err(format!(
                    "kv_tiers.admission {other:?}: expected \"all\" or \"reused\""
                )),
            })
        {
            tiers.admission = a;
        }
        if let Some(v) = &raw.write_queue_blocks
            && let Some(n) = self.int("kv_tiers.write_queue_blocks", v, 1..=65_536)
        {
            tiers.write_queue_blocks = n as usize;
        }
    }

    /// A rate limit from its two settings (`what` names them in problems); `None` when neither
    /// is set or one is wrong. The burst defaults to one second's worth (at least 1).
    fn rate_limit(
        &mut self,
        what: &str,
        rate: Option<&Spanned<f64>>,
        burst: Option<&Spanned<i64>>,
    ) -> Option<crate::frontend::ratelimit::RateLimit> {
        let rate = match rate {
            Some(v) => {
                let r = *v.get_ref();
                if r.is_finite() && r > 0.0 && r <= 1_000_000.0 {
                    r
                } else {
                    let location = self.at(v);
                    self.problem(
                        location,
                        format!(
                            "{what}.requests_per_sec = {r} is out of range: expected more than 0 \
                             and at most 1000000"
                        ),
                    );
                    return None;
                }
            }
            None => {
                if let Some(b) = burst {
                    let location = self.at(b);
                    self.problem(
                        location,
                        format!("{what}.burst needs {what}.requests_per_sec beside it"),
                    );
                }
                return None;
            }
        };
        let burst = match burst {
            Some(b) => self.int(&format!("{what}.burst"), b, 1..=1_000_000)? as u32,
            None => (rate.ceil() as u32).max(1),
        };
        Some(crate::frontend::ratelimit::RateLimit {
            requests_per_sec: rate,
            burst,
        })
    }

    fn parsed<T>(
        &mut self,
        value: &Spanned<String>,
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> Option<T> {
        match parse(value.get_ref()) {
            Ok(v) => Some(v),
            Err(message) => {
                let location = self.at(value);
                self.problem(location, message);
                None
            }
        }
    }

    fn apply_file(&mut self, raw: &RawConfig, config: &mut Config) {
        if let Some(name) = raw.node.as_ref().and_then(|n| n.name.as_ref()) {
            if name.get_ref().trim().is_empty() {
                let location = self.at(name);
                self.problem(location, "node.name is empty");
            } else {
                config.node_name = name.get_ref().clone();
            }
        }
        if let Some(p) = &raw.peer {
            if let Some(v) = &p.listen
                && let Some(addr) = self.parsed(v, parse_listen)
            {
                config.peer.listen = addr;
            }
            if let Some(v) = &p.advertise {
                config.peer.advertise = Some(v.get_ref().clone());
            }
            if let Some(v) = p.forward {
                config.peer.forward = v;
            }
            if let Some(v) = &p.dead_after_ms {
                match *v.get_ref() {
                    ms @ 500..=600_000 => config.peer.dead_after = Duration::from_millis(ms),
                    ms => {
                        let location = self.at(v);
                        self.problem(
                            location,
                            format!("peer.dead_after_ms = {ms}: must be between 500 and 600000"),
                        );
                    }
                }
            }
            // Limits on what one peer node can hold here; seconds, never the 49 days a u32 of
            // milliseconds reaches.
            let bounded = [
                ("stall_timeout_secs", &p.stall_timeout_secs, 1, 600),
                ("transfer_timeout_secs", &p.transfer_timeout_secs, 1, 600),
                ("max_streams_per_peer", &p.max_streams_per_peer, 1, 256),
                (
                    "max_buffered_mib_per_peer",
                    &p.max_buffered_mib_per_peer,
                    1,
                    1 << 20,
                ),
            ];
            for (key, value, min, max) in bounded {
                let Some(value) = value else { continue };
                let v = *value.get_ref();
                if !(min..=max).contains(&v) {
                    let location = self.at(value);
                    self.problem(
                        location,
                        format!("peer.{key} = {v}: must be between {min} and {max}"),
                    );
                    continue;
                }
                let peer = &mut config.peer;
                match key {
                    "stall_timeout_secs" => peer.stall_timeout = Duration::from_secs(v),
                    "transfer_timeout_secs" => peer.transfer_timeout = Duration::from_secs(v),
                    "max_streams_per_peer" => {
                        peer.max_streams_per_peer = u32::try_from(v).unwrap_or(u32::MAX);
                    }
                    _ => peer.max_buffered_bytes_per_peer = v << 20,
                }
            }
        }
        if let Some(f) = &raw.frontend {
            let fc = &mut config.frontend;
            if let Some(v) = &f.listen
                && let Some(addr) = self.parsed(v, parse_listen)
            {
                fc.listen = addr;
            }
            if let Some(v) = &f.max_body_bytes
                && let Some(n) = self.int("frontend.max_body_bytes", v, 1024..=1 << 30)
            {
                fc.max_body_bytes = n as usize;
            }
            if let Some(v) = &f.max_in_flight
                && let Some(n) = self.int("frontend.max_in_flight", v, 1..=1_000_000)
            {
                fc.max_in_flight = n as usize;
            }
            if let Some(v) = &f.queue_capacity
                && let Some(n) = self.int("frontend.queue_capacity", v, 0..=1_000_000)
            {
                fc.queue_capacity = n as usize;
            }
            if let Some(v) = &f.queue_timeout_secs
                && let Some(d) = self.secs("frontend.queue_timeout_secs", v, 3600.0)
            {
                fc.queue_timeout = d;
            }
            if let Some(v) = &f.retry_after_secs
                && let Some(n) = self.int("frontend.retry_after_secs", v, 1..=3600)
            {
                fc.retry_after = Duration::from_secs(n as u64);
            }
            if let Some(keys) = &f.api_keys {
                let mut accepted = Vec::new();
                for key in keys {
                    if key.get_ref().len() < 8 || key.get_ref().contains(char::is_whitespace) {
                        let location = self.at(key);
                        self.problem(
                            location,
                            "frontend.api_keys: a key must be at least 8 characters with no whitespace",
                        );
                    } else {
                        accepted.push(key.get_ref().clone());
                    }
                }
                fc.api_keys = crate::frontend::ApiKeys::new(accepted);
            }
            if let Some(keys) = &f.keys {
                for entry in keys {
                    let name = entry.name.get_ref();
                    let key = entry.key.get_ref();
                    let taken = fc.api_keys.entries().any(|k| &k.label == name);
                    if name.is_empty()
                        || name.len() > 64
                        || !name
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
                        || taken
                    {
                        let location = self.at(&entry.name);
                        self.problem(
                            location,
                            format!(
                                "frontend.keys: name {name:?} must be unique, 1 to 64 characters \
                                 of letters, digits, '-', '_' and '.' (it labels the key's \
                                 metrics)"
                            ),
                        );
                        continue;
                    }
                    if key.len() < 8 || key.contains(char::is_whitespace) {
                        let location = self.at(&entry.key);
                        self.problem(
                            location,
                            format!(
                                "frontend.keys ({name}): a key must be at least 8 characters \
                                 with no whitespace"
                            ),
                        );
                        continue;
                    }
                    let limit = self.rate_limit(
                        "frontend.keys",
                        entry.requests_per_sec.as_ref(),
                        entry.burst.as_ref(),
                    );
                    let tokens = entry.tokens_per_minute.as_ref().and_then(|v| {
                        self.int("frontend.keys.tokens_per_minute", v, 1..=1_000_000_000)
                    });
                    fc.api_keys
                        .push(key, name.clone(), limit, tokens.map(|t| t as u32));
                }
            }
            if let Some(r) = &f.rate_limit {
                fc.rate_limit = self.rate_limit(
                    "frontend.rate_limit",
                    r.requests_per_sec.as_ref(),
                    r.burst.as_ref(),
                );
                fc.tokens_per_minute = r.tokens_per_minute.as_ref().and_then(|v| {
                    self.int(
                        "frontend.rate_limit.tokens_per_minute",
                        v,
                        1..=1_000_000_000,
                    )
                    .map(|t| t as u32)
                });
            }
            if let Some(v) = &f.metrics_listen
                && let Some(addr) = self.parsed(v, parse_listen)
            {
                fc.metrics_listen = Some(addr);
            }
            if let Some(v) = &f.allow_unauthenticated {
                fc.allow_unauthenticated = *v.get_ref();
            }
            if let Some(v) = &f.max_connections
                && let Some(n) = self.int("frontend.max_connections", v, 1..=1_000_000)
            {
                fc.max_connections = n as usize;
            }
            if let Some(v) = &f.header_read_timeout_secs
                && let Some(d) = self.secs("frontend.header_read_timeout_secs", v, 3600.0)
            {
                fc.header_read_timeout = d;
            }
            if let Some(v) = &f.body_read_timeout_secs
                && let Some(d) = self.secs("frontend.body_read_timeout_secs", v, 3600.0)
            {
                fc.body_read_timeout = d;
            }
            if let Some(v) = &f.header_timeout_jitter {
                let j = *v.get_ref();
                if (0.0..=0.9).contains(&j) {
                    fc.header_timeout_jitter = j;
                } else {
                    let location = self.at(v);
                    self.problem(
                        location,
                        format!(
                            "frontend.header_timeout_jitter = {j} is out of range: expected 0 \
                             to 0.9"
                        ),
                    );
                }
            }
            if let Some(v) = &f.headerless_pressure
                && let Some(n) = self.int("frontend.headerless_pressure", v, 0..=1_000_000)
            {
                fc.headerless_pressure = n as usize;
            }
            if let Some(v) = &f.header_read_timeout_under_pressure_secs
                && let Some(d) = self.secs(
                    "frontend.header_read_timeout_under_pressure_secs",
                    v,
                    3600.0,
                )
            {
                fc.header_read_timeout_under_pressure = d;
            }
            if let Some(v) = &f.max_headerless_per_ip
                && let Some(n) = self.int("frontend.max_headerless_per_ip", v, 0..=1_000_000)
            {
                fc.max_headerless_per_ip = n as usize;
            }
            if let Some(r) = &f.keyless_rate_limit {
                fc.keyless_rate_limit = self.rate_limit(
                    "frontend.keyless_rate_limit",
                    r.requests_per_sec.as_ref(),
                    r.burst.as_ref(),
                );
                if let Some(v) = &r.max_clients
                    && let Some(n) =
                        self.int("frontend.keyless_rate_limit.max_clients", v, 1..=10_000_000)
                {
                    fc.keyless_max_clients = n as usize;
                }
            }
        }
        if let Some(log) = &raw.log {
            if let Some(v) = &log.format
                && let Some(format) = self.parsed(v, parse_log_format)
            {
                config.log.format = format;
            }
            if let Some(v) = &log.level
                && let Some(level) = self.parsed(v, parse_log_level)
            {
                config.log.level = level;
            }
        }
        if let Some(mode) = raw.routing.as_ref().and_then(|r| r.mode.as_ref())
            && let Some(mode) = self.parsed(mode, parse_routing)
        {
            config.routing = mode;
        }
        if let Some(mode) = raw.routing.as_ref().and_then(|r| r.fleet_mode.as_ref())
            && let Some(mode) = self.parsed(mode, |text| {
                text.parse::<kvfleet_kv_router::RoutingMode>()
                    .map_err(|e| format!("routing.fleet_mode: {e}"))
            })
        {
            config.fleet_routing = mode;
        }
        if let Some(path) = raw.routing.as_ref().and_then(|r| r.fleet_profile.as_ref()) {
            let resolved = self.resolve(path.get_ref());
            if let Some(profile) = self.parsed(path, |_| read_profile(&resolved)) {
                config.fleet_profile = Some(std::sync::Arc::new(profile));
                // With the workers' times known, route by predicted time unless told otherwise.
                if raw.routing.as_ref().is_some_and(|r| r.fleet_mode.is_none()) {
                    config.fleet_routing = kvfleet_kv_router::RoutingMode::Kv;
                }
            }
        }
        if let Some(s) = &raw.supervisor {
            let sc = &mut config.supervisor;
            if let Some(dir) = &s.socket_dir {
                if Path::new(dir.get_ref()).is_absolute() {
                    sc.socket_dir = PathBuf::from(dir.get_ref());
                } else {
                    let location = self.at(dir);
                    self.problem(
                        location,
                        format!(
                            "supervisor.socket_dir {:?} must be an absolute path",
                            dir.get_ref()
                        ),
                    );
                }
            }
            if let Some(v) = &s.restart_backoff_initial_ms
                && let Some(n) = self.int("supervisor.restart_backoff_initial_ms", v, 1..=600_000)
            {
                sc.restart_backoff_initial = Duration::from_millis(n as u64);
            }
            if let Some(v) = &s.restart_backoff_max_ms
                && let Some(n) = self.int("supervisor.restart_backoff_max_ms", v, 1..=3_600_000)
            {
                sc.restart_backoff_max = Duration::from_millis(n as u64);
            }
            if let Some(v) = &s.start_timeout_secs
                && let Some(d) = self.secs("supervisor.start_timeout_secs", v, 3600.0)
            {
                sc.start_timeout = d;
            }
        }
        if let Some(t) = &raw.kv_tiers {
            self.kv_tiers(t, &mut config.supervisor.kv_tiers);
        }
        if let Some(v) = &raw.drain_grace_secs
            && let Some(d) = self.secs("drain_grace_secs", v, 3600.0)
        {
            config.drain_grace = d;
        }
        if !raw.models.is_empty() {
            config.models = raw.models.iter().filter_map(|m| self.model(m)).collect();
        }
        config.workers = raw.workers.iter().filter_map(|w| self.worker(w)).collect();
        if let Some(cp) = &raw.control_plane {
            config.control_plane = self.control_plane(cp);
        }
    }

    fn control_plane(&mut self, raw: &RawControlPlane) -> Option<ControlPlaneConfig> {
        let Some(url) = &raw.url else {
            self.problem(
                Location::Default,
                "[control_plane] needs url, e.g. url = \"http://controlplane:8080\"",
            );
            return None;
        };
        let url = self.parsed(url, parse_cp_url)?;
        let mut cp = ControlPlaneConfig::new(url);
        match (&raw.ca_fingerprint, &raw.ca_file) {
            (Some(fp), Some(_)) => {
                let location = self.at(fp);
                self.problem(
                    location,
                    "give control_plane.ca_fingerprint or ca_file, not both",
                );
            }
            (Some(fp), None) => {
                cp.ca = self
                    .parsed(fp, |t| {
                        t.parse::<kvfleet_proto::CaFingerprint>()
                            .map_err(|e| e.to_string())
                    })
                    .map(crate::cp_client::CaTrust::Fingerprint);
            }
            (None, Some(file)) => {
                cp.ca = self
                    .parsed(file, |p| absolute("control_plane.ca_file", p))
                    .map(crate::cp_client::CaTrust::File);
            }
            (None, None) => {}
        }
        // Whether an https URL has a CA to trust is decided in `resolve_trust`, once the
        // environment (which may give the URL or the join token) is applied too.
        match (&raw.join_token, &raw.join_token_file) {
            (Some(token), Some(_)) => {
                let location = self.at(token);
                self.problem(
                    location,
                    "give control_plane.join_token or join_token_file, not both",
                );
            }
            (Some(token), None) => {
                if let Some(token) = self.parsed(token, parse_join_token) {
                    cp.join_token = Some(JoinToken::Inline(token));
                }
            }
            (None, Some(file)) => {
                if let Some(path) =
                    self.parsed(file, |p| absolute("control_plane.join_token_file", p))
                {
                    cp.join_token = Some(JoinToken::File(path));
                }
            }
            (None, None) => {}
        }
        if let Some(dir) = &raw.state_dir
            && let Some(path) = self.parsed(dir, |p| absolute("control_plane.state_dir", p))
        {
            cp.state_dir = path;
        }
        if let Some(v) = &raw.heartbeat_interval_ms
            && let Some(n) = self.int("control_plane.heartbeat_interval_ms", v, 100..=600_000)
        {
            cp.heartbeat_interval = Some(Duration::from_millis(n as u64));
        }
        if let Some(v) = &raw.watch_wait_secs
            && let Some(n) = self.int("control_plane.watch_wait_secs", v, 1..=300)
        {
            cp.watch_wait = Duration::from_secs(n as u64);
        }
        if let Some(v) = &raw.request_timeout_secs
            && let Some(d) = self.secs("control_plane.request_timeout_secs", v, 300.0)
        {
            cp.request_timeout = d;
        }
        if let Some(v) = &raw.retry_backoff_initial_ms
            && let Some(n) = self.int("control_plane.retry_backoff_initial_ms", v, 1..=600_000)
        {
            cp.retry_backoff_initial = Duration::from_millis(n as u64);
        }
        if let Some(v) = &raw.retry_backoff_max_ms
            && let Some(n) = self.int("control_plane.retry_backoff_max_ms", v, 1..=3_600_000)
        {
            cp.retry_backoff_max = Duration::from_millis(n as u64);
        }
        if cp.retry_backoff_initial > cp.retry_backoff_max {
            self.problem(
                Location::Default,
                "control_plane.retry_backoff_initial_ms is larger than retry_backoff_max_ms",
            );
        }
        if let Some(v) = &raw.advertise_addr
            && let Some(addr) = self.parsed(v, parse_advertise)
        {
            cp.advertise_addr = Some(addr);
        }
        if let Some(v) = &raw.cpu_slots
            && let Some(n) = self.int("control_plane.cpu_slots", v, 0..=1024)
        {
            cp.cpu_slots = Some(n as u32);
        }
        if let Some(labels) = &raw.labels {
            for (key, value) in labels {
                if key.is_empty() || value.get_ref().is_empty() {
                    let location = self.at(value);
                    self.problem(
                        location,
                        "control_plane.labels: keys and values must not be empty",
                    );
                } else {
                    cp.labels.insert(key.clone(), value.get_ref().clone());
                }
            }
        }
        Some(cp)
    }

    fn model(&mut self, raw: &RawModel) -> Option<ModelConfig> {
        let name = raw.name.get_ref().trim();
        if name.is_empty() {
            let location = self.at(&raw.name);
            self.problem(location, "models.name is empty");
            return None;
        }
        let mut model = ModelConfig::mock(name);
        let mut ok = true;
        if let Some(engine) = &raw.engine {
            match engine.get_ref().as_str() {
                "mock" => model.engine = EngineKind::Mock,
                kind @ ("native" | "llamacpp" | "openai" | "vllm" | "sglang") => match &raw.path {
                    Some(path) if !path.get_ref().trim().is_empty() => {
                        let path = self.resolve(path.get_ref());
                        let mut loaded = match kind {
                            "native" => ModelConfig::native(name, path),
                            "llamacpp" => ModelConfig::llamacpp(name, path),
                            other => ModelConfig {
                                engine: match other {
                                    "vllm" => EngineKind::Vllm,
                                    "sglang" => EngineKind::Sglang,
                                    _ => EngineKind::OpenAi,
                                },
                                ..ModelConfig::llamacpp(name, path)
                            },
                        };
                        // Blocks of the default size unless the file says otherwise, below.
                        loaded.block_size = model.block_size;
                        model = loaded;
                    }
                    _ => {
                        let location = self.at(engine);
                        self.problem(
                            location,
                            format!(
                                "model {name:?}: engine {kind:?} needs `path`, a .gguf file or \
                                 a Hugging Face model directory (its tokenizer and chat template)"
                            ),
                        );
                        ok = false;
                    }
                },
                other => {
                    let location = self.at(engine);
                    self.problem(
                        location,
                        format!(
                            "engine {other:?} is unknown: expected \"mock\", \"native\", \
                             \"llamacpp\", \"openai\", \"vllm\" or \"sglang\""
                        ),
                    );
                    ok = false;
                }
            }
        }
        if let Some(v) = &raw.context_length {
            match self.int("models.context_length", v, 16..=1 << 24) {
                Some(n) => model.context_length = n as u32,
                None => ok = false,
            }
        }
        if let Some(v) = &raw.block_size {
            match self.int("models.block_size", v, 1..=i64::from(BlockSize::MAX)) {
                Some(n) => match BlockSize::new(n as u32) {
                    Ok(size) => model.block_size = size,
                    Err(_) => ok = false,
                },
                None => ok = false,
            }
        }
        if let Some(v) = &raw.kv_blocks {
            match self.int("models.kv_blocks", v, 1..=1 << 24) {
                Some(n) => {
                    model.kv_blocks = n as u32;
                    if model.engine == EngineKind::Native {
                        model.kv_memory = Some(KvBudget::Blocks(n as u32));
                    }
                }
                None => ok = false,
            }
        }
        if let Some(v) = &raw.kv_memory {
            let location = self.at(v);
            if model.engine != EngineKind::Native {
                self.problem(
                    location,
                    "models.kv_memory is for engine \"native\": the mock takes kv_blocks",
                );
                ok = false;
            } else if raw.kv_blocks.is_some() {
                self.problem(
                    location,
                    "give models.kv_memory or models.kv_blocks, not both",
                );
                ok = false;
            } else {
                match v.get_ref().parse::<KvBudget>() {
                    Ok(budget) => model.kv_memory = Some(budget),
                    Err(e) => {
                        self.problem(location, format!("models.kv_memory: {e}"));
                        ok = false;
                    }
                }
            }
        }
        if let Some(v) = &raw.path
            && !model.engine.has_model_file()
        {
            let location = self.at(v);
            self.problem(
                location,
                "models.path is for engine \"native\" (or \"llamacpp\", \"openai\"; the mock \
                 has no weights)",
            );
            ok = false;
        }
        ok &= self.external(raw, &mut model);
        if let Some(v) = &raw.mock_token_time_us {
            match self.int("models.mock_token_time_us", v, 0..=10_000_000) {
                Some(n) => model.mock_token_time = Duration::from_micros(n as u64),
                None => ok = false,
            }
        }
        if let Some(v) = &raw.mock_prefill_time_per_token_us {
            match self.int("models.mock_prefill_time_per_token_us", v, 0..=1_000_000) {
                Some(n) => model.mock_prefill_time_per_token = Duration::from_micros(n as u64),
                None => ok = false,
            }
        }
        if let Some(v) = &raw.mock_kv_head_dim {
            match self.int("models.mock_kv_head_dim", v, 1..=4096) {
                Some(n) => model.mock_kv_head_dim = n as u32,
                None => ok = false,
            }
        }
        if let Some(v) = &raw.tool_parser {
            match ToolParserKind::parse(v.get_ref()) {
                Some(kind) => model.tool_parser = Some(kind),
                None => {
                    let location = self.at(v);
                    self.problem(
                        location,
                        format!(
                            "models.tool_parser {:?} is unknown: expected {}",
                            v.get_ref(),
                            ToolParserKind::NAMES
                        ),
                    );
                    ok = false;
                }
            }
        }
        if let Some(v) = &raw.reasoning_parser {
            match ReasoningParserKind::parse(v.get_ref()) {
                Some(kind) => model.reasoning_parser = Some(kind),
                None => {
                    let location = self.at(v);
                    self.problem(
                        location,
                        format!(
                            "models.reasoning_parser {:?} is unknown: expected {}",
                            v.get_ref(),
                            ReasoningParserKind::NAMES
                        ),
                    );
                    ok = false;
                }
            }
        }
        ok.then_some(model)
    }

    /// The external engine's keys (`command`, `args`, `slots`, `kv_ttl_secs`); false when one
    /// is wrong or given to an engine that has no server to start.
    fn external(&mut self, raw: &RawModel, model: &mut ModelConfig) -> bool {
        let engine = model.engine;
        let Some(external) = model.external.as_mut() else {
            let given = [
                raw.command.as_ref().map(|v| v.span()),
                raw.args.as_ref().map(|v| v.span()),
                raw.slots.as_ref().map(|v| v.span()),
                raw.kv_ttl_secs.as_ref().map(|v| v.span()),
                raw.kv_events.as_ref().map(|v| v.span()),
                raw.kv_events_replay.as_ref().map(|v| v.span()),
            ];
            if let Some(span) = given.into_iter().flatten().next() {
                let location = match self.file {
                    Some(file) => file_location(file, span.start),
                    None => Location::Default,
                };
                self.problem(
                    location,
                    "models.command, args, slots, kv_ttl_secs and kv_events are for engines \
                     \"llamacpp\", \"openai\", \"vllm\" and \"sglang\"",
                );
                return false;
            }
            return true;
        };
        let mut ok = true;
        if let Some(v) = &raw.command {
            if v.get_ref().trim().is_empty() {
                let location = self.at(v);
                self.problem(location, "models.command is empty");
                ok = false;
            } else {
                external.command = v.get_ref().trim().to_owned();
            }
        } else if engine != EngineKind::LlamaCpp {
            let location = self.at(&raw.name);
            self.problem(
                location,
                format!(
                    "engine {:?} needs `command` (and `args` with {{port}}): the server to start",
                    engine.name()
                ),
            );
            ok = false;
        }
        if let Some(v) = &raw.args {
            external.args = v.get_ref().clone();
            if engine != EngineKind::LlamaCpp && !external.args.iter().any(|a| a.contains("{port}"))
            {
                let location = self.at(v);
                self.problem(
                    location,
                    format!(
                        "models.args of engine {:?} must contain {{port}}: the worker picks the port",
                        engine.name()
                    ),
                );
                ok = false;
            }
        }
        if let Some(v) = &raw.slots {
            match self.int("models.slots", v, 1..=1024) {
                Some(n) => external.slots = n as u32,
                None => ok = false,
            }
        }
        if let Some(v) = &raw.kv_ttl_secs {
            match self.int("models.kv_ttl_secs", v, 1..=86_400) {
                Some(n) => external.kv_ttl = Duration::from_secs(n as u64),
                None => ok = false,
            }
        }
        for (key, raw, field) in [
            ("kv_events", &raw.kv_events, &mut external.kv_events),
            (
                "kv_events_replay",
                &raw.kv_events_replay,
                &mut external.kv_events_replay,
            ),
        ] {
            let Some(v) = raw else { continue };
            let endpoint = v.get_ref().trim();
            if !matches!(engine, EngineKind::Vllm | EngineKind::Sglang) {
                let location = self.at(v);
                self.problem(
                    location,
                    format!("models.{key} is for engines \"vllm\" and \"sglang\""),
                );
                ok = false;
            } else if !endpoint.starts_with("tcp://") {
                let location = self.at(v);
                self.problem(
                    location,
                    format!(
                        "models.{key} must be a ZeroMQ tcp:// endpoint to connect to, e.g. \
                         \"tcp://127.0.0.1:{{kv_port}}\""
                    ),
                );
                ok = false;
            } else {
                *field = Some(endpoint.to_owned());
            }
        }
        if external.kv_events_replay.is_some() && external.kv_events.is_none() {
            let location = self.at(&raw.name);
            self.problem(location, "models.kv_events_replay needs models.kv_events");
            ok = false;
        }
        ok
    }

    fn worker(&mut self, raw: &RawWorker) -> Option<WorkerConfig> {
        let device = match &raw.device {
            Some(v) => self.parsed(v, parse_device)?,
            None => Device::Cpu,
        };
        let role = match &raw.role {
            Some(v) => self.parsed(v, parse_role)?,
            None => WorkerRole::Aggregated,
        };
        Some(WorkerConfig {
            model: raw
                .model
                .as_ref()
                .map(|m| m.get_ref().clone())
                .unwrap_or_default(),
            device,
            role,
        })
    }

    fn apply_env(&mut self, env: &BTreeMap<String, String>, config: &mut Config) {
        for (key, value) in env {
            let location = Location::Env(key.clone());
            let result = match key.strip_prefix(ENV_PREFIX).unwrap_or(key) {
                "LISTEN" => parse_listen(value).map(|v| config.frontend.listen = v),
                "LOG_FORMAT" => parse_log_format(value).map(|v| config.log.format = v),
                "LOG_LEVEL" => parse_log_level(value).map(|v| config.log.level = v),
                "ROUTING" => parse_routing(value).map(|v| config.routing = v),
                "NODE_NAME" if !value.trim().is_empty() => {
                    config.node_name = value.trim().to_owned();
                    Ok(())
                }
                "API_KEYS" => {
                    config.frontend.api_keys = crate::frontend::ApiKeys::new(
                        value.split(',').map(str::trim).filter(|k| !k.is_empty()),
                    );
                    Ok(())
                }
                // Read by `Sources::from_process` before parsing.
                "CONFIG" => Ok(()),
                "CONTROL_PLANE_URL" => {
                    parse_cp_url(value).map(|url| match &mut config.control_plane {
                        Some(cp) => cp.url = url,
                        None => config.control_plane = Some(ControlPlaneConfig::new(url)),
                    })
                }
                "JOIN_TOKEN" | "JOIN_TOKEN_FILE" | "STATE_DIR" => {
                    // Applied below, once the URL (file or environment) is known.
                    Ok(())
                }
                _ => Err(format!(
                    "unknown variable: the agent reads {ENV_PREFIX}{{CONFIG,LISTEN,LOG_FORMAT,\
                     LOG_LEVEL,ROUTING,NODE_NAME,API_KEYS,CONTROL_PLANE_URL,JOIN_TOKEN,\
                     JOIN_TOKEN_FILE,STATE_DIR}}"
                )),
            };
            if let Err(message) = result {
                self.problem(location, message);
            }
        }
        self.apply_control_plane_env(env, config);
    }

    /// `KVFLEET_AGENT_{JOIN_TOKEN,JOIN_TOKEN_FILE,STATE_DIR}`: they refine a control plane set
    /// in the file or by `KVFLEET_AGENT_CONTROL_PLANE_URL`, and are an error without one (a
    /// token the agent silently ignores would be a puzzle).
    fn apply_control_plane_env(&mut self, env: &BTreeMap<String, String>, config: &mut Config) {
        let var = |name: &str| {
            let key = format!("{ENV_PREFIX}{name}");
            env.get(&key).map(|v| (key, v.clone()))
        };
        let token = var("JOIN_TOKEN");
        let token_file = var("JOIN_TOKEN_FILE");
        let state_dir = var("STATE_DIR");
        let Some(cp) = &mut config.control_plane else {
            for (key, _) in [&token, &token_file, &state_dir].into_iter().flatten() {
                self.problem(
                    Location::Env(key.clone()),
                    "set without a control plane: give [control_plane] url or \
                     KVFLEET_AGENT_CONTROL_PLANE_URL",
                );
            }
            return;
        };
        match (token, token_file) {
            (Some((key, _)), Some(_)) => self.problem(
                Location::Env(key),
                "give KVFLEET_AGENT_JOIN_TOKEN or KVFLEET_AGENT_JOIN_TOKEN_FILE, not both",
            ),
            (Some((key, value)), None) => match parse_join_token(&value) {
                Ok(token) => cp.join_token = Some(JoinToken::Inline(token)),
                Err(m) => self.problem(Location::Env(key), m),
            },
            (None, Some((key, value))) => match absolute("KVFLEET_AGENT_JOIN_TOKEN_FILE", &value) {
                Ok(path) => cp.join_token = Some(JoinToken::File(path)),
                Err(m) => self.problem(Location::Env(key), m),
            },
            (None, None) => {}
        }
        if let Some((key, value)) = state_dir {
            match absolute("KVFLEET_AGENT_STATE_DIR", &value) {
                Ok(path) => cp.state_dir = path,
                Err(m) => self.problem(Location::Env(key), m),
            }
        }
    }

    /// What an `https` control plane is trusted through: `ca_fingerprint` or `ca_file`, else
    /// the CA fingerprint the join token carries (`kvfj1.<hex>.<token>`, inline or in its file),
    /// else the one saved in the state directory when the node joined with such a token. A
    /// token whose fingerprint differs from `ca_fingerprint` (or from every certificate in
    /// `ca_file`) is an error naming both; so is a CA with an `http` URL.
    fn resolve_trust(
        &mut self,
        raw: &RawConfig,
        env: &BTreeMap<String, String>,
        config: &mut Config,
    ) {
        let Some(cp) = &mut config.control_plane else {
            return;
        };
        let raw_cp = raw.control_plane.as_ref();
        let env_location = |name: &str| {
            let key = format!("{ENV_PREFIX}{name}");
            env.contains_key(&key).then_some(Location::Env(key))
        };
        let url_at = env_location("CONTROL_PLANE_URL")
            .or_else(|| raw_cp.and_then(|r| r.url.as_ref()).map(|u| self.at(u)))
            .unwrap_or(Location::Default);
        let token_at = env_location("JOIN_TOKEN")
            .or_else(|| env_location("JOIN_TOKEN_FILE"))
            .or_else(|| {
                raw_cp
                    .and_then(|r| r.join_token.as_ref().or(r.join_token_file.as_ref()))
                    .map(|t| self.at(t))
            })
            .unwrap_or(Location::Default);
        let token_text = match &cp.join_token {
            Some(JoinToken::Inline(text)) => Some(text.clone()),
            // Read now when it can be (check-config and the start run as the service's user);
            // an unreadable file is reported when the node registers, as before.
            Some(JoinToken::File(path)) => std::fs::read_to_string(path).ok(),
            None => None,
        };
        let token_pin = match token_text
            .as_deref()
            .map(kvfleet_proto::JoinTokenText::parse)
        {
            Some(Ok(text)) => text.ca,
            Some(Err(e)) => {
                self.problem(token_at.clone(), format!("the join token: {e}"));
                None
            }
            None => None,
        };
        let https = cp.url.starts_with("https://");
        match (&cp.ca, token_pin) {
            (Some(_), _) | (None, Some(_)) if !https => {
                let what = if cp.ca.is_some() {
                    "control_plane.ca_fingerprint / ca_file need an https:// url"
                } else {
                    "the join token carries a CA fingerprint (kvfj1.…), which is for an https \
                     control plane: use its https:// url"
                };
                self.problem(url_at, what);
            }
            (Some(crate::cp_client::CaTrust::Fingerprint(line)), Some(pin)) if *line != pin => {
                self.problem(
                    token_at,
                    format!(
                        "the join token carries the CA fingerprint {pin}, but \
                         control_plane.ca_fingerprint is {line}: they must be the same fleet CA \
                         (drop the ca_fingerprint line, or use a token from that fleet)"
                    ),
                );
            }
            (Some(crate::cp_client::CaTrust::File(path)), Some(pin)) => {
                // Checked when the file can be read now; the start reads it again anyway.
                if let Ok(pem) = std::fs::read(path) {
                    use rustls::pki_types::pem::PemObject as _;
                    let carried = rustls::pki_types::CertificateDer::pem_slice_iter(&pem)
                        .filter_map(Result::ok)
                        .any(|der| kvfleet_proto::CaFingerprint::of_der(&der) == pin);
                    if !carried {
                        self.problem(
                            token_at,
                            format!(
                                "the join token carries the CA fingerprint {pin}, but no \
                                 certificate in control_plane.ca_file {} has it: they must be \
                                 the same fleet CA",
                                path.display()
                            ),
                        );
                    }
                }
            }
            (Some(_), _) => {}
            (None, Some(pin)) => cp.ca = Some(crate::cp_client::CaTrust::JoinToken(pin)),
            (None, None) if https => {
                match crate::state_dir::StateDir::saved_ca_pin(&cp.state_dir) {
                    Some(pin) => cp.ca = Some(crate::cp_client::CaTrust::JoinToken(pin)),
                    None => self.problem(
                        url_at,
                        "an https control plane needs control_plane.ca_fingerprint (the \
                         sha256:… the control plane logs at start), ca_file (its CA \
                         certificate, PEM), or a join token that carries the fingerprint \
                         (kvfj1.…, what `kvfleet tokens create --role join` prints)",
                    ),
                }
            }
            (None, None) => {}
        }
    }

    fn apply_flags(&mut self, flags: &FlagOverrides, config: &mut Config) {
        if let Some(v) = &flags.listen {
            match parse_listen(v) {
                Ok(addr) => config.frontend.listen = addr,
                Err(m) => self.problem(Location::Flag("--listen"), m),
            }
        }
        if let Some(v) = &flags.log_format {
            match parse_log_format(v) {
                Ok(format) => config.log.format = format,
                Err(m) => self.problem(Location::Flag("--log-format"), m),
            }
        }
        if let Some(v) = &flags.log_level {
            match parse_log_level(v) {
                Ok(level) => config.log.level = level,
                Err(m) => self.problem(Location::Flag("--log-level"), m),
            }
        }
    }

    fn cross_checks(&mut self, raw: &RawConfig, config: &Config) {
        let frontend = &config.frontend;
        if !frontend.listen.ip().is_loopback()
            && frontend.api_keys.is_empty()
            && !frontend.allow_unauthenticated
        {
            let location = raw
                .frontend
                .as_ref()
                .and_then(|f| f.listen.as_ref())
                .map_or(Location::Default, |listen| self.at(listen));
            self.problem(
                location,
                format!(
                    "frontend.listen = {} is not a loopback address, so the OpenAI API needs \
                     frontend.api_keys (or KVFLEET_AGENT_API_KEYS); to serve it without \
                     authentication anyway, set frontend.allow_unauthenticated = true",
                    frontend.listen
                ),
            );
        }
        if let Some(metrics) = frontend.metrics_listen
            && metrics == frontend.listen
            && metrics.port() != 0
        {
            let location = raw
                .frontend
                .as_ref()
                .and_then(|f| f.metrics_listen.as_ref())
                .map_or(Location::Default, |v| self.at(v));
            self.problem(
                location,
                format!(
                    "frontend.metrics_listen = {metrics} is frontend.listen itself: leave it \
                     out to serve /metrics and /ready on the API port, or give another address"
                ),
            );
        }
        let mut seen = BTreeMap::new();
        for model in &raw.models {
            if seen.insert(model.name.get_ref().trim(), ()).is_some() {
                let location = self.at(&model.name);
                self.problem(
                    location,
                    format!("model {:?} is defined twice", model.name.get_ref()),
                );
            }
        }
        for raw_worker in &raw.workers {
            match &raw_worker.model {
                Some(model) if config.model(model.get_ref()).is_none() => {
                    let location = self.at(model);
                    let known: Vec<&str> = config.models.iter().map(|m| m.name.as_str()).collect();
                    self.problem(
                        location,
                        format!(
                            "workers.model {:?} is not one of the models defined: {known:?}",
                            model.get_ref()
                        ),
                    );
                }
                Some(_) => {}
                None => self.problem(Location::Default, "a [[workers]] entry has no model"),
            }
        }
        let mut gpus = BTreeMap::new();
        for raw_worker in &raw.workers {
            if let Some(device) = &raw_worker.device
                && let Ok(Device::Gpu(index)) = parse_device(device.get_ref())
                && gpus.insert(index, ()).is_some()
            {
                let location = self.at(device);
                self.problem(
                    location,
                    format!("gpu:{index} has two workers: one engine per GPU"),
                );
            }
        }
        // A model without a worker would keep /ready at 503 forever.
        if config.control_plane.is_some() {
            // The control plane decides the workers; [[workers]] would be ignored.
            if let Some(model) = raw.workers.first().and_then(|w| w.model.as_ref()) {
                let location = self.at(model);
                self.problem(
                    location,
                    "[[workers]] with [control_plane]: the control plane decides which workers \
                     run here; remove the [[workers]] entries",
                );
            }
            if !kvfleet_proto::api::valid_hostname(&config.node_name) {
                self.problem(
                    Location::Default,
                    format!(
                        "node name {:?} is the node's hostname at the control plane: use letters, \
                         digits, '.' and '-' (set [node] name)",
                        config.node_name
                    ),
                );
            }
        } else if raw.workers.is_empty() && config.models.len() > 1 {
            self.problem(
                Location::Default,
                "several models are defined but no [[workers]]: say which worker serves which model",
            );
        } else if !raw.workers.is_empty() {
            for raw_model in &raw.models {
                let name = raw_model.name.get_ref().trim();
                let valid = config.models.iter().any(|m| m.name == name);
                if valid && !config.workers.iter().any(|w| w.model == name) {
                    let location = self.at(&raw_model.name);
                    self.problem(
                        location,
                        format!("model {name:?} has no [[workers]] entry serving it"),
                    );
                }
            }
        }
        let sc = &config.supervisor;
        if sc.restart_backoff_initial > sc.restart_backoff_max {
            self.problem(
                Location::Default,
                "supervisor.restart_backoff_initial_ms is larger than restart_backoff_max_ms",
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::worker::{DEFAULT_NATIVE_KV_MEMORY, NATIVE_CONTEXT_UNCAPPED};

    fn load(text: &str) -> Result<Config, Problems> {
        Config::from_sources(&Sources::from_text("agent.toml", text))
    }

    #[test]
    fn peer_endpoint_defaults_to_port_7500_and_takes_listen_and_advertise() {
        let config = load("").unwrap();
        assert_eq!(config.peer.listen, "0.0.0.0:7500".parse().unwrap());
        assert_eq!(config.peer.advertise, None);
        let config =
            load("[peer]\nlisten = \"127.0.0.1:0\"\nadvertise = \"node-a:7501\"\n").unwrap();
        assert_eq!(config.peer.listen, "127.0.0.1:0".parse().unwrap());
        assert_eq!(config.peer.advertise.as_deref(), Some("node-a:7501"));
        assert!(config.peer.forward);
        assert_eq!(
            config.fleet_routing,
            kvfleet_kv_router::RoutingMode::KvBlocks
        );
        let config = load("[routing]\nfleet_mode = \"round-robin\"\n").unwrap();
        assert_eq!(
            config.fleet_routing,
            kvfleet_kv_router::RoutingMode::RoundRobin
        );
        assert!(load("[routing]\nfleet_mode = \"psychic\"\n").is_err());
        assert!(!load("[peer]\nforward = false\n").unwrap().peer.forward);
        assert_eq!(config.peer.dead_after, Duration::from_secs(10));
        let quick = load("[peer]\ndead_after_ms = 2000\n").unwrap();
        assert_eq!(quick.peer.dead_after, Duration::from_secs(2));
        assert_eq!(config.peer.stall_timeout, Duration::from_secs(30));
        assert_eq!(config.peer.transfer_timeout, Duration::from_secs(30));
        assert_eq!(config.peer.max_streams_per_peer, 64);
        assert_eq!(config.peer.max_buffered_bytes_per_peer, 4 << 30);
        let limited = load(
            "[peer]\nstall_timeout_secs = 5\ntransfer_timeout_secs = 60\n\
             max_streams_per_peer = 8\nmax_buffered_mib_per_peer = 512\n",
        )
        .unwrap();
        assert_eq!(limited.peer.stall_timeout, Duration::from_secs(5));
        assert_eq!(limited.peer.transfer_timeout, Duration::from_secs(60));
        assert_eq!(limited.peer.max_streams_per_peer, 8);
        assert_eq!(limited.peer.max_buffered_bytes_per_peer, 512 << 20);
        // A 49-day timeout (u32::MAX ms, in seconds here) is refused at load, as is no limit.
        for bad in [
            "transfer_timeout_secs = 4294967",
            "stall_timeout_secs = 0",
            "max_streams_per_peer = 0",
            "max_buffered_mib_per_peer = 0",
        ] {
            let problems = load(&format!("[peer]\n{bad}\n")).unwrap_err();
            let key = bad.split(' ').next().unwrap();
            assert!(
                problems.to_string().contains(&format!("peer.{key}")),
                "{bad}: {problems}"
            );
        }
        let problems = load("[peer]\ndead_after_ms = 10\n").unwrap_err();
        assert!(
            problems.to_string().contains("peer.dead_after_ms"),
            "{problems}"
        );
        let problems = load("[peer]\nlisten = \"nowhere\"\n").unwrap_err();
        assert!(problems.to_string().contains("agent.toml:2"), "{problems}");
    }

    fn problems(text: &str) -> Vec<String> {
        load(text)
            .unwrap_err()
            .0
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    /// Per-key rate limits (a default and named keys' own), and the metrics address: read,
    /// and every wrong value named with its place.
    #[test]
    fn rate_limits_and_the_metrics_address_are_read_and_checked() {
        use crate::frontend::ratelimit::RateLimit;
        let config = load(
            r#"
[frontend]
api_keys = ["sk-plain-0123"]
metrics_listen = "127.0.0.1:9100"
[frontend.rate_limit]
requests_per_sec = 2.5
tokens_per_minute = 6000
[[frontend.keys]]
name = "team-a"
key = "sk-team-a-0123"
requests_per_sec = 10
burst = 40
tokens_per_minute = 1000
[[frontend.keys]]
name = "team-b"
key = "sk-team-b-0123"
"#,
        )
        .unwrap();
        let f = &config.frontend;
        assert_eq!(f.metrics_listen, Some("127.0.0.1:9100".parse().unwrap()));
        // The burst defaults to one second's worth, rounded up.
        assert_eq!(
            f.rate_limit,
            Some(RateLimit {
                requests_per_sec: 2.5,
                burst: 3
            })
        );
        let keys: Vec<_> = f
            .api_keys
            .entries()
            .map(|k| (k.label.as_str(), k.limit))
            .collect();
        assert_eq!(
            keys,
            [
                ("key-0", None),
                (
                    "team-a",
                    Some(RateLimit {
                        requests_per_sec: 10.0,
                        burst: 40
                    })
                ),
                ("team-b", None),
            ]
        );
        assert_eq!(f.api_keys.find("sk-team-b-0123"), Some(2));
        assert_eq!(f.tokens_per_minute, Some(6000));
        let tokens: Vec<_> = f.api_keys.entries().map(|k| k.tokens_per_minute).collect();
        assert_eq!(tokens, [None, Some(1000), None]);
        assert!(!format!("{config:?}").contains("sk-team-a-0123"));

        let refused = problems(
            r#"[frontend]
metrics_listen = "127.0.0.1:8000"
[frontend.rate_limit]
requests_per_sec = 0
tokens_per_minute = 0
[[frontend.keys]]
name = "has space"
key = "sk-0123456789"
[[frontend.keys]]
name = "short"
key = "sk"
[[frontend.keys]]
name = "burst-only"
key = "sk-burst-only"
burst = 4
"#,
        );
        assert_eq!(refused.len(), 6, "{refused:?}");
        assert!(refused.iter().any(|p| p.contains("tokens_per_minute")));
        assert!(
            refused
                .iter()
                .any(|p| p.contains("requests_per_sec = 0 is out of range"))
        );
        assert!(
            refused
                .iter()
                .any(|p| p.contains("\"has space\" must be unique"))
        );
        assert!(
            refused
                .iter()
                .any(|p| p.contains("(short): a key must be at least 8"))
        );
        assert!(
            refused
                .iter()
                .any(|p| p.contains("burst needs frontend.keys.requests_per_sec"))
        );
        assert!(
            refused.iter().any(|p| p.starts_with(
                "agent.toml:2:18: frontend.metrics_listen = 127.0.0.1:8000 is frontend.listen"
            )),
            "{refused:?}"
        );
    }

    /// `tool_parser` and `reasoning_parser` name a format, or are a problem that names the
    /// key and the choices; absent, the chat template decides (`None`).
    #[test]
    fn models_name_their_tool_and_reasoning_parsers() {
        let config = load(
            "[[models]]\nname = \"a\"\ntool_parser = \"pythonic\"\nreasoning_parser = \"deepseek_r1\"\n",
        )
        .unwrap();
        assert_eq!(config.models[0].tool_parser, Some(ToolParserKind::Pythonic));
        assert_eq!(
            config.models[0].reasoning_parser,
            Some(ReasoningParserKind::DeepSeekR1)
        );
        let plain = load("[[models]]\nname = \"a\"\n").unwrap();
        assert_eq!(plain.models[0].tool_parser, None);
        assert_eq!(plain.models[0].reasoning_parser, None);
        let bad = problems(
            "[[models]]\nname = \"a\"\ntool_parser = \"xml\"\nreasoning_parser = \"maybe\"\n",
        );
        assert_eq!(bad.len(), 2, "{bad:?}");
        assert!(
            bad[0].contains("models.tool_parser \"xml\"") && bad[0].contains("llama3_json"),
            "{bad:?}"
        );
        assert!(
            bad[1].contains("models.reasoning_parser \"maybe\"") && bad[1].contains("deepseek_r1"),
            "{bad:?}"
        );
    }

    #[test]
    fn no_file_gives_the_documented_defaults() {
        let config = Config::from_sources(&Sources::default()).unwrap();
        assert_eq!(config.frontend.listen, "127.0.0.1:8000".parse().unwrap());
        assert_eq!(config.log.format, LogFormat::Text);
        assert_eq!(config.routing, RoutingMode::LeastLoaded);
        assert_eq!(config.models.len(), 1);
        assert!(config.workers.is_empty());
    }

    #[test]
    fn the_packaged_example_is_valid() {
        let text = include_str!("../../packaging/agent.toml");
        let config = load(text).unwrap();
        assert_eq!(config.models[0].name, "smollm2-135m-mock");
        assert_eq!(config.workers.len(), 1);
    }

    /// The OpenAI API beyond loopback needs keys unless explicitly opted out.
    #[test]
    fn a_non_loopback_frontend_needs_api_keys_or_an_explicit_opt_out() {
        let refused = problems("[frontend]\nlisten = \"0.0.0.0:8000\"\n");
        assert_eq!(refused.len(), 1, "{refused:?}");
        assert!(refused[0].starts_with("agent.toml:2:10: frontend.listen = 0.0.0.0:8000"));
        assert!(refused[0].contains("frontend.api_keys"), "{refused:?}");
        assert!(refused[0].contains("allow_unauthenticated"), "{refused:?}");
        for ok in [
            "[frontend]\nlisten = \"0.0.0.0:8000\"\napi_keys = [\"sk-0123456789\"]\n",
            "[frontend]\nlisten = \"0.0.0.0:8000\"\nallow_unauthenticated = true\n",
            "[frontend]\nlisten = \"127.0.0.1:8000\"\n",
            "[frontend]\nlisten = \"[::1]:8000\"\n",
        ] {
            assert!(load(ok).is_ok(), "{ok}");
        }
        let tuned = load(
            "[frontend]\nmax_connections = 7\nheader_read_timeout_secs = 2\nbody_read_timeout_secs = 3\n",
        )
        .unwrap();
        assert_eq!(tuned.frontend.max_connections, 7);
        assert_eq!(tuned.frontend.header_read_timeout, Duration::from_secs(2));
        assert_eq!(tuned.frontend.body_read_timeout, Duration::from_secs(3));
        let hardened = load(
            "[frontend]\nheader_timeout_jitter = 0.2\nheaderless_pressure = 100\n\
             header_read_timeout_under_pressure_secs = 0.5\nmax_headerless_per_ip = 9\n\
             [frontend.keyless_rate_limit]\nrequests_per_sec = 2\nmax_clients = 1000\n",
        )
        .unwrap()
        .frontend;
        assert_eq!(hardened.header_timeout_jitter, 0.2);
        assert_eq!(hardened.headerless_pressure, 100);
        assert_eq!(
            hardened.header_read_timeout_under_pressure,
            Duration::from_millis(500)
        );
        assert_eq!(hardened.max_headerless_per_ip, 9);
        let keyless = hardened.keyless_rate_limit.unwrap();
        assert_eq!((keyless.requests_per_sec, keyless.burst), (2.0, 2));
        assert_eq!(hardened.keyless_max_clients, 1000);
        let wrong = problems("[frontend]\nheader_timeout_jitter = 1.5\n");
        assert!(wrong[0].contains("expected 0 to 0.9"), "{wrong:?}");
    }

    #[test]
    fn a_full_file_is_read() {
        let config = load(
            r#"
drain_grace_secs = 5
[node]
name = "gpu-07"
[frontend]
listen = "127.0.0.1:9000"
queue_capacity = 7
api_keys = ["sk-test-12345"]
[log]
format = "json"
level = "debug"
[routing]
mode = "round-robin"
[[models]]
name = "m"
context_length = 128
block_size = 4
[[workers]]
model = "m"
device = "gpu:0"
role = "decode"
"#,
        )
        .unwrap();
        assert_eq!(config.node_name, "gpu-07");
        assert_eq!(config.frontend.listen.port(), 9000);
        assert_eq!(config.frontend.queue_capacity, 7);
        assert!(config.frontend.api_keys.accepts("sk-test-12345"));
        assert!(!config.frontend.api_keys.accepts("sk-test-1234"));
        assert!(
            !format!("{config:?}").contains("sk-test-12345"),
            "keys are hashed and never in Debug output"
        );
        assert_eq!(config.log.format, LogFormat::Json);
        assert_eq!(config.routing, RoutingMode::RoundRobin);
        assert_eq!(config.models[0].block_size.get(), 4);
        assert_eq!(
            config.workers,
            vec![WorkerConfig {
                model: "m".into(),
                device: Device::Gpu(0),
                role: WorkerRole::Decode
            }]
        );
        assert_eq!(config.drain_grace, Duration::from_secs(5));
    }

    /// One row per mistake: the file, and the `file:line:col: message` start expected for it.
    #[test]
    fn every_problem_is_reported_with_its_line() {
        let cases: &[(&str, &str, &[&str])] = &[
            ("syntax error", "[frontend\nlisten = 1", &["agent.toml:1:"]),
            (
                "unknown key",
                "[frontend]\nlisen = \"0.0.0.0:1\"\n",
                &["agent.toml:2:1: unknown field `lisen`"],
            ),
            (
                "wrong type",
                "[frontend]\nqueue_capacity = \"lots\"\n",
                &["agent.toml:2:18: invalid type"],
            ),
            (
                "several semantic problems at once",
                "[frontend]\nlisten = \"nowhere\"\nqueue_capacity = -1\n[log]\nformat = \"xml\"\n\
                 [[models]]\nname = \"m\"\nengine = \"warp\"\n[[workers]]\nmodel = \"nope\"\n\
                 device = \"tpu\"\n",
                &[
                    "agent.toml:2:10: \"nowhere\" is not a socket address",
                    "agent.toml:3:18: frontend.queue_capacity = -1 is out of range",
                    "agent.toml:5:10: log format \"xml\" is unknown",
                    "agent.toml:8:10: engine \"warp\" is unknown",
                    "agent.toml:11:10: device \"tpu\" is unknown",
                    "agent.toml:10:9: workers.model \"nope\" is not one of the models defined",
                ],
            ),
            (
                "unknown worker model",
                "[[models]]\nname = \"a\"\n[[workers]]\nmodel = \"b\"\n",
                &[
                    "agent.toml:4:9: workers.model \"b\" is not one of the models defined",
                    "agent.toml:2:8: model \"a\" has no [[workers]] entry serving it",
                ],
            ),
            (
                "a model nobody serves",
                "[[models]]\nname = \"a\"\n[[models]]\nname = \"b\"\n[[workers]]\nmodel = \"a\"\n",
                &["agent.toml:4:8: model \"b\" has no [[workers]] entry serving it"],
            ),
            (
                "several models, no workers",
                "[[models]]\nname = \"a\"\n[[models]]\nname = \"b\"\n",
                &["configuration: several models are defined but no [[workers]]"],
            ),
            (
                "two workers on one GPU",
                "[[workers]]\nmodel = \"kvfleet-mock\"\ndevice = \"gpu:0\"\n[[workers]]\n\
                 model = \"kvfleet-mock\"\ndevice = \"gpu:0\"\n",
                &["agent.toml:6:10: gpu:0 has two workers"],
            ),
        ];
        for (name, text, expected) in cases {
            let got = problems(text);
            assert_eq!(got.len(), expected.len(), "case {name}: {got:#?}");
            for (got, want) in got.iter().zip(expected.iter()) {
                assert!(
                    got.starts_with(want),
                    "case {name}: {got:?} should start with {want:?}"
                );
            }
        }
    }

    /// `engine = "native"`: the path (relative to the file), defaults, the KV budget, and the
    /// mistakes a file can make about them.
    #[test]
    fn native_models_are_read_and_checked() {
        let config = Config::from_sources(&Sources::from_text(
            "/etc/kvfleet/agent.toml",
            "[[models]]\nname = \"a\"\nengine = \"native\"\npath = \"models/a.gguf\"\n\
             kv_memory = \"512MiB\"\ncontext_length = 2048\n",
        ))
        .unwrap();
        let m = &config.models[0];
        assert_eq!(m.engine, EngineKind::Native);
        assert_eq!(m.path, Some(PathBuf::from("/etc/kvfleet/models/a.gguf")));
        assert_eq!(m.kv_memory, Some(KvBudget::Bytes(512 << 20)));
        assert_eq!(m.context_length, 2048);
        let config = load(
            "[[models]]\nname = \"a\"\nengine = \"native\"\npath = \"/m.gguf\"\nkv_blocks = 9\n",
        )
        .unwrap();
        assert_eq!(config.models[0].kv_memory, Some(KvBudget::Blocks(9)));
        assert_eq!(config.models[0].context_length, NATIVE_CONTEXT_UNCAPPED);
        let config =
            load("[[models]]\nname = \"a\"\nengine = \"native\"\npath = \"/m.gguf\"\n").unwrap();
        assert_eq!(config.models[0].kv_memory, Some(DEFAULT_NATIVE_KV_MEMORY));
        // External engines: llama-server on PATH by default; the keys override.
        let config = load(
            "[[models]]\nname = \"a\"\nengine = \"llamacpp\"\npath = \"/m.gguf\"\n\
             command = \"/opt/llama/llama-server\"\nargs = [\"-t\", \"4\"]\nslots = 8\n\
             kv_ttl_secs = 30\n",
        )
        .unwrap();
        let m = &config.models[0];
        assert_eq!(m.engine, EngineKind::LlamaCpp);
        assert_eq!(m.context_length, crate::worker::DEFAULT_EXTERNAL_CONTEXT);
        let external = m.external.as_ref().unwrap();
        assert_eq!(external.command, "/opt/llama/llama-server");
        assert_eq!(external.args, ["-t", "4"]);
        assert_eq!((external.slots, external.kv_ttl.as_secs()), (8, 30));
        let config = load(
            "[[models]]\nname = \"a\"\nengine = \"openai\"\npath = \"/m\"\ncommand = \"vllm\"\n\
             args = [\"serve\", \"{model}\", \"--port\", \"{port}\"]\n",
        )
        .unwrap();
        assert_eq!(config.models[0].engine, EngineKind::OpenAi);
        let config = load(
            "[[models]]\nname = \"a\"\nengine = \"vllm\"\npath = \"/m\"\ncommand = \"vllm\"\n\
             args = [\"serve\", \"{model}\", \"--port\", \"{port}\"]\n\
             kv_events = \"tcp://127.0.0.1:{kv_port}\"\n\
             kv_events_replay = \"tcp://127.0.0.1:{kv_replay_port}\"\n",
        )
        .unwrap();
        let m = &config.models[0];
        assert_eq!(m.engine, EngineKind::Vllm);
        let external = m.external.as_ref().unwrap();
        assert_eq!(
            external.kv_events.as_deref(),
            Some("tcp://127.0.0.1:{kv_port}")
        );
        assert_eq!(
            external.kv_events_replay.as_deref(),
            Some("tcp://127.0.0.1:{kv_replay_port}")
        );

        let cases: &[(&str, &str)] = &[
            (
                "[[models]]\nname = \"a\"\nengine = \"native\"\n",
                "agent.toml:3:10: model \"a\": engine \"native\" needs `path`",
            ),
            (
                "[[models]]\nname = \"a\"\npath = \"/m.gguf\"\n",
                "agent.toml:3:8: models.path is for engine \"native\"",
            ),
            (
                "[[models]]\nname = \"a\"\nkv_memory = \"1GiB\"\n",
                "agent.toml:3:13: models.kv_memory is for engine \"native\"",
            ),
            (
                "[[models]]\nname = \"a\"\nengine = \"native\"\npath = \"/m\"\nkv_blocks = 4\n\
                 kv_memory = \"1GiB\"\n",
                "agent.toml:6:13: give models.kv_memory or models.kv_blocks, not both",
            ),
            (
                "[[models]]\nname = \"a\"\nengine = \"native\"\npath = \"/m\"\nkv_memory = \"lots\"\n",
                "agent.toml:5:13: models.kv_memory: KV memory budget `lots`",
            ),
            (
                "[[models]]\nname = \"a\"\nengine = \"llamacpp\"\n",
                "agent.toml:3:10: model \"a\": engine \"llamacpp\" needs `path`",
            ),
            (
                "[[models]]\nname = \"a\"\nslots = 2\n",
                "agent.toml:3:9: models.command, args, slots, kv_ttl_secs and kv_events are for \
                 engines",
            ),
            (
                "[[models]]\nname = \"a\"\nengine = \"llamacpp\"\npath = \"/m\"\nslots = 0\n",
                "agent.toml:5:9: models.slots",
            ),
            (
                "[[models]]\nname = \"a\"\nengine = \"openai\"\npath = \"/m\"\n",
                "agent.toml:2:8: engine \"openai\" needs `command`",
            ),
            (
                "[[models]]\nname = \"a\"\nengine = \"openai\"\npath = \"/m\"\ncommand = \"vllm\"\n\
                 args = [\"serve\"]\n",
                "agent.toml:6:8: models.args of engine \"openai\" must contain {port}",
            ),
            (
                "[[models]]\nname = \"a\"\nengine = \"sglang\"\npath = \"/m\"\n",
                "agent.toml:2:8: engine \"sglang\" needs `command`",
            ),
            (
                "[[models]]\nname = \"a\"\nengine = \"openai\"\npath = \"/m\"\ncommand = \"v\"\n\
                 args = [\"{port}\"]\nkv_events = \"tcp://127.0.0.1:1\"\n",
                "agent.toml:7:13: models.kv_events is for engines \"vllm\" and \"sglang\"",
            ),
            (
                "[[models]]\nname = \"a\"\nengine = \"vllm\"\npath = \"/m\"\ncommand = \"v\"\n\
                 args = [\"{port}\"]\nkv_events = \"127.0.0.1:1\"\n",
                "agent.toml:7:13: models.kv_events must be a ZeroMQ tcp:// endpoint",
            ),
            (
                "[[models]]\nname = \"a\"\nengine = \"vllm\"\npath = \"/m\"\ncommand = \"v\"\n\
                 args = [\"{port}\"]\nkv_events_replay = \"tcp://127.0.0.1:1\"\n",
                "agent.toml:2:8: models.kv_events_replay needs models.kv_events",
            ),
        ];
        for (text, want) in cases {
            let got = problems(text);
            assert_eq!(got.len(), 1, "{text}: {got:?}");
            assert!(
                got[0].starts_with(want),
                "{got:?} should start with {want:?}"
            );
        }
    }

    /// `[routing] fleet_profile` is read relative to the config file and makes `kv` the fleet
    /// mode unless `fleet_mode` says otherwise; an unreadable or invalid one is a located problem.
    #[test]
    fn a_fleet_profile_is_read_and_makes_kv_the_fleet_default() {
        let dir = std::env::temp_dir().join(format!("kvfleet-agent-prof-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("fleet.perf.toml"),
            kvfleet_engine::DEFAULT_PERF_PROFILE_TOML,
        )
        .unwrap();
        std::fs::write(dir.join("bad.perf.toml"), "format = 1\n").unwrap();
        let load_in =
            |text: &str| Config::from_sources(&Sources::from_text(dir.join("agent.toml"), text));
        let config = load_in("[routing]\nfleet_profile = \"fleet.perf.toml\"\n").unwrap();
        assert_eq!(config.fleet_routing, kvfleet_kv_router::RoutingMode::Kv);
        let profile = config.fleet_profile.expect("the profile is loaded");
        assert_eq!(profile.block_size, 16);
        let config =
            load_in("[routing]\nfleet_profile = \"fleet.perf.toml\"\nfleet_mode = \"kv-blocks\"\n")
                .unwrap();
        assert_eq!(
            config.fleet_routing,
            kvfleet_kv_router::RoutingMode::KvBlocks
        );
        assert!(config.fleet_profile.is_some());
        for (file, why) in [
            ("gone.perf.toml", "gone.perf.toml: "),
            ("bad.perf.toml", "bad.perf.toml: "),
        ] {
            let problems = load_in(&format!("[routing]\nfleet_profile = \"{file}\"\n"))
                .unwrap_err()
                .to_string();
            assert!(
                problems.contains("agent.toml:2:17: routing.fleet_profile"),
                "{problems}"
            );
            assert!(problems.contains(why), "{problems}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// `check-config` reads native models' files: a missing or unparsable one is a located
    /// problem; a good one (the tiny generated model) passes.
    #[test]
    fn check_model_files_reads_native_models() {
        let dir = std::env::temp_dir().join(format!("kvfleet-agent-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("junk.gguf"), b"not a gguf file at all").unwrap();
        kvfleet_model::tiny::write_tiny_llama(
            &dir.join("tiny"),
            kvfleet_model::tiny::TinySpec::default(),
            1,
        )
        .unwrap();
        let text = "[[models]]\nname = \"gone\"\nengine = \"native\"\npath = \"missing.gguf\"\n\
                    [[models]]\nname = \"junk\"\nengine = \"native\"\npath = \"junk.gguf\"\n\
                    [[models]]\nname = \"tiny\"\nengine = \"native\"\npath = \"tiny\"\n\
                    [[workers]]\nmodel = \"gone\"\n[[workers]]\nmodel = \"junk\"\n\
                    [[workers]]\nmodel = \"tiny\"\n";
        let sources = Sources::from_text(dir.join("agent.toml"), text);
        let config = Config::from_sources(&sources).unwrap();
        let got: Vec<String> = check_model_files(&sources, &config)
            .unwrap_err()
            .0
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(got.len(), 2, "{got:#?}");
        assert!(
            got[0].contains("agent.toml:4:8: model \"gone\": cannot read"),
            "{got:?}"
        );
        assert!(
            got[1].contains("agent.toml:8:8: model \"junk\": "),
            "{got:?}"
        );
        assert!(got[1].contains("is not a usable model"), "{got:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn env_overrides_the_file_and_flags_override_env() {
        let mut sources = Sources::from_text(
            "agent.toml",
            "[frontend]\nlisten = \"127.0.0.1:1\"\n[log]\nformat = \"text\"\n",
        );
        sources
            .env
            .insert("KVFLEET_AGENT_LISTEN".into(), "127.0.0.1:2".into());
        sources
            .env
            .insert("KVFLEET_AGENT_LOG_FORMAT".into(), "json".into());
        sources.env.insert(
            "KVFLEET_AGENT_API_KEYS".into(),
            "k1-aaaaaaaa, k2-bbbbbbbb".into(),
        );
        let config = Config::from_sources(&sources).unwrap();
        assert_eq!(config.frontend.listen.port(), 2);
        assert_eq!(config.log.format, LogFormat::Json);
        assert_eq!(config.frontend.api_keys.len(), 2);

        sources.flags.listen = Some("127.0.0.1:3".into());
        let config = Config::from_sources(&sources).unwrap();
        assert_eq!(config.frontend.listen.port(), 3);
    }

    #[test]
    fn bad_env_and_flags_are_located() {
        let mut sources = Sources::default();
        sources.env.insert("KVFLEET_AGENT_LISTN".into(), "x".into());
        sources.flags.log_format = Some("yaml".into());
        let got: Vec<String> = Config::from_sources(&sources)
            .unwrap_err()
            .0
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(got[0].starts_with("environment variable KVFLEET_AGENT_LISTN: unknown variable"));
        assert!(got[1].starts_with("flag --log-format: log format \"yaml\" is unknown"));
    }

    #[test]
    fn control_plane_section() {
        let config = load(
            "[node]\nname = \"gpu-07\"\n[[models]]\nname = \"a\"\n[[models]]\nname = \"b\"\n\
             [control_plane]\nurl = \"http://cp.example:8080/\"\njoin_token = \"kvf_abc_def\"\n\
             state_dir = \"/var/lib/x\"\nheartbeat_interval_ms = 2000\nwatch_wait_secs = 10\n\
             request_timeout_secs = 2.5\nretry_backoff_initial_ms = 100\nretry_backoff_max_ms = 5000\n\
             advertise_addr = \"10.0.0.7:8000\"\ncpu_slots = 2\nlabels = { zone = \"a\" }\n",
        )
        .unwrap();
        let cp = config.control_plane.unwrap();
        assert_eq!(cp.url, "http://cp.example:8080");
        assert_eq!(cp.join_token, Some(JoinToken::Inline("kvf_abc_def".into())));
        assert_eq!(format!("{:?}", cp.join_token), "Some(Inline(<redacted>))");
        assert_eq!(cp.state_dir, PathBuf::from("/var/lib/x"));
        assert_eq!(cp.heartbeat_interval, Some(Duration::from_secs(2)));
        assert_eq!(cp.watch_wait, Duration::from_secs(10));
        assert_eq!(cp.request_timeout, Duration::from_millis(2500));
        assert_eq!(cp.retry_backoff_initial, Duration::from_millis(100));
        assert_eq!(cp.retry_backoff_max, Duration::from_secs(5));
        assert_eq!(cp.advertise_addr.as_deref(), Some("10.0.0.7:8000"));
        assert_eq!(cp.cpu_slots, Some(2));
        assert_eq!(cp.labels.get("zone").map(String::as_str), Some("a"));
        // Several models without [[workers]] are fine: the control plane picks.
        assert_eq!(config.models.len(), 2);
        // Without the section: standalone.
        assert!(load("").unwrap().control_plane.is_none());
        // https with the fleet CA pinned.
        let pin = format!("sha256:{}", "ab".repeat(32));
        let cp = load(&format!(
            "[control_plane]\nurl = \"https://cp:8443\"\nca_fingerprint = \"{pin}\"\n"
        ))
        .unwrap()
        .control_plane
        .unwrap();
        assert_eq!(
            cp.ca,
            Some(crate::cp_client::CaTrust::Fingerprint(pin.parse().unwrap()))
        );
    }

    /// Issue #22: a join token that carries the fleet CA's fingerprint is all an https
    /// control plane needs; one that disagrees with the config, or goes with http, is refused.
    #[test]
    fn a_join_token_carrying_the_ca_fingerprint_pins_it() {
        use crate::cp_client::CaTrust;
        let pin = kvfleet_proto::CaFingerprint::of_der(b"fleet ca");
        let other = kvfleet_proto::CaFingerprint::of_der(b"another fleet");
        let bearer = "kvf_abcdefghijkl_secret";
        let token = kvfleet_proto::JoinTokenText::compose(&pin, bearer);
        let dir = std::env::temp_dir().join(format!("kvfleet-pin-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let cp = |extra: &str| {
            format!(
                "[control_plane]\nurl = \"https://cp:8443\"\nstate_dir = {:?}\n{extra}",
                dir.display().to_string()
            )
        };
        // The token alone: its fingerprint is the pin.
        let config = load(&cp(&format!("join_token = \"{token}\"\n"))).unwrap();
        let cp_config = config.control_plane.unwrap();
        assert_eq!(cp_config.ca, Some(CaTrust::JoinToken(pin)));
        assert_eq!(cp_config.join_token, Some(JoinToken::Inline(token.clone())));
        // The same fingerprint in ca_fingerprint too: fine, the line wins.
        let config = load(&cp(&format!(
            "join_token = \"{token}\"\nca_fingerprint = \"{pin}\"\n"
        )))
        .unwrap();
        assert_eq!(
            config.control_plane.unwrap().ca,
            Some(CaTrust::Fingerprint(pin))
        );
        // Another one: an error naming both, at the token.
        let got = problems(&cp(&format!(
            "join_token = \"{token}\"\nca_fingerprint = \"{other}\"\n"
        )));
        assert_eq!(got.len(), 1, "{got:?}");
        assert!(
            got[0].contains("agent.toml:4")
                && got[0].contains(&pin.to_string())
                && got[0].contains(&other.to_string()),
            "{got:?}"
        );
        // In a file: read at load, the same rules.
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("join-token");
        std::fs::write(&file, format!("{token}\n")).unwrap();
        let config = load(&cp(&format!(
            "join_token_file = {:?}\n",
            file.display().to_string()
        )))
        .unwrap();
        assert_eq!(
            config.control_plane.unwrap().ca,
            Some(CaTrust::JoinToken(pin))
        );
        // With http: the fingerprint is for https.
        let got = problems(&format!(
            "[control_plane]\nurl = \"http://cp:8080\"\njoin_token = \"{token}\"\n"
        ));
        assert!(got[0].contains("use its https:// url"), "{got:?}");
        // A broken fingerprint part: the shape, never the secret.
        let broken = format!("kvfj1.{}.{bearer}", "ab".repeat(31));
        let got = problems(&cp(&format!("join_token = \"{broken}\"\n")));
        assert!(got[0].contains("kvfj1.<CA fingerprint"), "{got:?}");
        assert!(!got.concat().contains("abcdefghijkl"), "{got:?}");
        // Neither a line nor a fingerprint in the token: the https error says all three ways.
        let got = problems(&cp(&format!("join_token = \"{bearer}\"\n")));
        assert!(
            got[0].contains("a join token that carries the fingerprint"),
            "{got:?}"
        );
        // ...unless the node joined with a kvfj1 token before: the saved pin.
        crate::state_dir::StateDir::open(&dir)
            .unwrap()
            .save_ca_pin(&pin)
            .unwrap();
        let config = load(&cp("")).unwrap();
        assert_eq!(
            config.control_plane.unwrap().ca,
            Some(CaTrust::JoinToken(pin))
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn control_plane_problems_are_located() {
        let rows = [
            ("[control_plane]\njoin_token = \"kvf_a_b\"\n", "needs url"),
            (
                "[control_plane]\nurl = \"https://cp:8080\"\n",
                "an https control plane needs control_plane.ca_fingerprint",
            ),
            (
                "[control_plane]\nurl = \"https://cp:8080\"\nca_fingerprint = \"sha256:00\"\n",
                "is not a CA fingerprint",
            ),
            (
                "[control_plane]\nurl = \"http://cp:8080\"\nca_file = \"/etc/kvfleet/ca.pem\"\n",
                "need an https:// url",
            ),
            (
                "[control_plane]\nurl = \"https://cp:8080\"\nca_file = \"/ca.pem\"\nca_fingerprint = \"sha256:00\"\n",
                "not both",
            ),
            (
                "[control_plane]\nurl = \"cp:8080\"\n",
                "expected https://host:port",
            ),
            ("[control_plane]\nurl = \"http://cp:8080/api\"\n", "no path"),
            (
                "[control_plane]\nurl = \"http://cp\"\njoin_token = \"kvf_a_b\"\njoin_token_file = \"/t\"\n",
                "not both",
            ),
            (
                "[control_plane]\nurl = \"http://cp\"\njoin_token = \"secret\"\n",
                "join token looks like",
            ),
            (
                "[control_plane]\nurl = \"http://cp\"\nstate_dir = \"rel\"\n",
                "absolute path",
            ),
            (
                "[control_plane]\nurl = \"http://cp\"\nheartbeat_interval_ms = 5\n",
                "out of range",
            ),
            (
                "[control_plane]\nurl = \"http://cp\"\nadvertise_addr = \"x\"\n",
                "host:port",
            ),
            (
                "[control_plane]\nurl = \"http://cp\"\nbogus = 1\n",
                "unknown field",
            ),
            (
                "[[models]]\nname = \"m\"\n[[workers]]\nmodel = \"m\"\n[control_plane]\nurl = \"http://cp\"\n",
                "the control plane decides",
            ),
            (
                "[node]\nname = \"bad_name\"\n[control_plane]\nurl = \"http://cp\"\n",
                "hostname",
            ),
        ];
        for (text, expected) in rows {
            let problems = load(text).expect_err(text).to_string();
            assert!(problems.contains(expected), "{text}: {problems}");
        }
    }

    #[test]
    fn control_plane_from_the_environment() {
        let env = |pairs: &[(&str, &str)]| Sources {
            env: pairs
                .iter()
                .map(|(k, v)| (format!("{ENV_PREFIX}{k}"), (*v).to_owned()))
                .collect(),
            ..Sources::default()
        };
        let config = Config::from_sources(&env(&[
            ("CONTROL_PLANE_URL", "http://10.0.0.1:8080"),
            ("JOIN_TOKEN_FILE", "/run/credentials/join"),
            ("STATE_DIR", "/tmp/agent-state"),
        ]))
        .unwrap();
        let cp = config.control_plane.unwrap();
        assert_eq!(cp.url, "http://10.0.0.1:8080");
        assert_eq!(
            cp.join_token,
            Some(JoinToken::File("/run/credentials/join".into()))
        );
        assert_eq!(cp.state_dir, PathBuf::from("/tmp/agent-state"));
        // The environment refines the file's section.
        let mut sources = env(&[("JOIN_TOKEN", "kvf_abc_xyz")]);
        sources.file = Some(ConfigFile {
            path: "a.toml".into(),
            text: "[control_plane]\nurl = \"http://cp:1\"\n".into(),
        });
        let cp = Config::from_sources(&sources)
            .unwrap()
            .control_plane
            .unwrap();
        assert_eq!(cp.join_token, Some(JoinToken::Inline("kvf_abc_xyz".into())));
        // A token with no control plane is an error, not silently ignored.
        let problems = Config::from_sources(&env(&[("JOIN_TOKEN", "kvf_abc_xyz")]))
            .unwrap_err()
            .to_string();
        assert!(problems.contains("without a control plane"), "{problems}");
    }

    #[test]
    fn kv_tiers_are_parsed_with_located_problems() {
        let config = load(
            "[kv_tiers]\nhost_memory = \"2GiB\"\ndisk = \"100GB\"\ndisk_dir = \"/srv/kv\"\n\
             admission = \"reused\"\nwrite_queue_blocks = 8\n",
        )
        .unwrap();
        let t = &config.supervisor.kv_tiers;
        assert_eq!(t.host_bytes, 2 << 30);
        assert_eq!(t.disk_bytes, 100_000_000_000);
        assert_eq!(t.disk_dir, PathBuf::from("/srv/kv"));
        assert_eq!(t.admission, kvfleet_engine::Admission::Reused);
        assert_eq!(t.write_queue_blocks, 8);
        assert!(!load("").unwrap().supervisor.kv_tiers.enabled());
        let problems = problems(
            "[kv_tiers]\nhost_memory = \"10%\"\ndisk_dir = \"kv\"\nadmission = \"some\"\n",
        );
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(
            problems[0].contains("kv_tiers.host_memory \"10%\""),
            "{problems:?}"
        );
        assert!(
            problems[1].contains("must be an absolute path"),
            "{problems:?}"
        );
        assert!(
            problems[2].contains("expected \"all\" or \"reused\""),
            "{problems:?}"
        );
    }
}
