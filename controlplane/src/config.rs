//! Configuration: parsed once, in one place, into typed structs.
//!
//! The sources are layered: the TOML file (`/etc/kvfleet/controlplane.toml` by default), then
//! environment variables (`KVFLEET_<SECTION>__<KEY>`, e.g. `KVFLEET_LIVENESS__LOST_AFTER=2m`,
//! plus `DATABASE_URL` for `database.url`), then command-line flags (`--set section.key=value`
//! and the few named flags). [`Source`] is that abstract input: the binary fills it from the
//! process, tests fill it by hand or build a [`Config`] directly and never touch the process
//! environment.
//!
//! [`Config::load`] reports *every* problem it finds, each with where the offending value came
//! from (file and line, environment variable or flag), so `check-config` can print them all at
//! once instead of one per run.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// The default configuration file.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/kvfleet/controlplane.toml";

/// Everything the control plane needs to run.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Where the REST API listens (plain HTTP; put a TLS-terminating proxy in front for now).
    pub listen: SocketAddr,
    pub database: DatabaseConfig,
    pub auth: AuthConfig,
    pub join: JoinConfig,
    pub liveness: LivenessConfig,
    pub leader: LeaderConfig,
    pub placement: PlacementConfig,
    pub watch: WatchConfig,
    pub ca: CaConfig,
    pub tls: TlsConfig,
    pub metrics: MetricsConfig,
    pub responses: ResponsesConfig,
    /// `[planner]`: the SLA planner loop (interval, predictor, scale-down rules).
    pub planner: kvfleet_planner::PlannerConfig,
}

/// `[database]`
#[derive(Clone, PartialEq)]
pub struct DatabaseConfig {
    /// Postgres connection URL (may carry a password: never printed in full).
    pub url: String,
    /// The admin pool: REST API and web UI requests (everything that is not agent traffic).
    pub max_connections: u32,
    /// The agent pool: join, heartbeat, desired state, KV events, certificate renewal. Separate
    /// from the admin pool so a flood of API requests cannot starve heartbeats (and the other
    /// way round).
    pub agent_max_connections: u32,
    /// The leader's loops (placement, liveness, metrics maintenance, planner): a small pool of
    /// their own, so neither kind of request traffic can stall them.
    pub leader_max_connections: u32,
    pub connect_timeout: Duration,
}

impl fmt::Debug for DatabaseConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DatabaseConfig")
            .field("url", &redact_url(&self.url))
            .field("max_connections", &self.max_connections)
            .field("agent_max_connections", &self.agent_max_connections)
            .field("leader_max_connections", &self.leader_max_connections)
            .field("connect_timeout", &self.connect_timeout)
            .finish()
    }
}

/// `[auth]`
#[derive(Clone, PartialEq)]
pub struct AuthConfig {
    /// An admin token to create at start if no token with its prefix exists. When absent and the
    /// database holds no admin token, `serve` creates one and prints it once.
    pub bootstrap_admin_token: Option<String>,
    /// Where a created first admin token is written (mode 0600, replacing a stale file). It is
    /// never logged: logs travel (journald, shippers) and a file has an owner and a mode.
    pub bootstrap_token_file: PathBuf,
    /// How long a verified token is trusted without asking Postgres again (`0s`: always ask).
    /// Revoking a token drops it from this replica's cache at once; other replicas keep
    /// accepting it for at most this long.
    pub cache_ttl: Duration,
    /// Failed authentications a client address may make in a burst before its token lookups
    /// are refused with 429 (a token bucket per address, refilled at `failed_per_minute`).
    pub failed_burst: u32,
    /// The bucket's refill rate: failed authentications per minute per address.
    pub failed_per_minute: u32,
}

/// The default [`AuthConfig::bootstrap_token_file`]: in the unit's `StateDirectory=`.
pub const DEFAULT_BOOTSTRAP_TOKEN_FILE: &str = "/var/lib/kvfleet/controlplane/admin-token";

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            bootstrap_admin_token: None,
            bootstrap_token_file: PathBuf::from(DEFAULT_BOOTSTRAP_TOKEN_FILE),
            cache_ttl: Duration::from_secs(30),
            failed_burst: 20,
            failed_per_minute: 60,
        }
    }
}

impl fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthConfig")
            .field(
                "bootstrap_admin_token",
                &self.bootstrap_admin_token.as_ref().map(|_| "<redacted>"),
            )
            .field("bootstrap_token_file", &self.bootstrap_token_file)
            .field("cache_ttl", &self.cache_ttl)
            .field("failed_burst", &self.failed_burst)
            .field("failed_per_minute", &self.failed_per_minute)
            .finish()
    }
}

/// `[join]`: how nodes are let into the fleet.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JoinConfig {
    /// Admit every node a join token registers at once instead of leaving it `pending` until
    /// an admin approves it. Off by default; `kvfleet dev` and labs turn it on.
    pub auto_approve: bool,
}

/// `[liveness]`: how agents heartbeat and when silence makes a node unhealthy, then lost.
#[derive(Debug, Clone, PartialEq)]
pub struct LivenessConfig {
    /// The interval agents are told to heartbeat at.
    pub heartbeat_interval: Duration,
    /// Silence after which a healthy node becomes unhealthy (no new placements).
    pub unhealthy_after: Duration,
    /// Silence after which a node is lost and its workers are marked lost and replaced.
    pub lost_after: Duration,
    /// How often the leader checks.
    pub check_interval: Duration,
}

/// `[leader]`: the advisory-lock election for the background loops.
#[derive(Debug, Clone, PartialEq)]
pub struct LeaderConfig {
    /// How often a follower tries to take the lock, and the leader checks it still holds it.
    pub retry_interval: Duration,
    /// The most a leader cut off from Postgres keeps leading: its lock check must answer within
    /// this, and its lock connection asks Postgres (TCP keepalives and `tcp_user_timeout`) to
    /// drop it, releasing the lock, once the leader has been silent about this long.
    pub lease: Duration,
}

/// `[placement]`
#[derive(Debug, Clone, PartialEq)]
pub struct PlacementConfig {
    pub interval: Duration,
    /// How long a running worker must be reported `failed` before it is stopped and replaced;
    /// shorter failures are the agent's supervisor restarting it in place.
    pub replace_failed_after: Duration,
}

/// `[watch]`: the agents' desired-state long poll.
#[derive(Debug, Clone, PartialEq)]
pub struct WatchConfig {
    /// The longest a watch request is held open (agents may ask for less).
    pub max_wait: Duration,
}

/// `[ca]`: the node CA that issues agents' peer (QUIC mTLS) certificates.
#[derive(Debug, Clone, PartialEq)]
pub struct CaConfig {
    pub cert_validity: Duration,
    pub ca_validity: Duration,
    /// The key (0600) that seals the CA's private key in Postgres. Created with the CA by the
    /// first control plane; every other control-plane host needs a copy.
    pub key_file: PathBuf,
}

/// The default [`CaConfig::key_file`]: in the unit's `StateDirectory=`.
pub const DEFAULT_CA_KEY_FILE: &str = "/var/lib/kvfleet/controlplane/ca.key";

/// `[tls]`: how the REST API and the web UI are served.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum TlsConfig {
    /// Plain HTTP: for loopback (`kvfleet dev`) or behind a proxy that terminates TLS.
    #[default]
    Off,
    /// The operator's certificate chain and private key (PEM files).
    Files {
        cert_file: PathBuf,
        key_file: PathBuf,
    },
    /// A certificate issued from the fleet CA at each start for these DNS names and IP
    /// addresses (the host's name, `localhost` and 127.0.0.1 when none are given). Agents pin the
    /// CA by its fingerprint (`control_plane.ca_fingerprint`), the CLI by its file (`--ca-file`).
    FleetCa { names: Vec<String> },
}

/// `[metrics]`: fleet metrics kept from heartbeats.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricsConfig {
    /// Raw samples (one per worker per heartbeat) are kept this long...
    pub raw_retention: Duration,
    /// ...and rolled up into buckets of this width...
    pub rollup_bucket: Duration,
    /// ...which are kept this long.
    pub rollup_retention: Duration,
    /// How often the leader rolls up and expires samples.
    pub maintenance_interval: Duration,
}

/// `[responses]`: OpenAI Responses the agents store (`/v1/responses` with `store: true`).
#[derive(Debug, Clone, PartialEq)]
pub struct ResponsesConfig {
    /// How long a stored response is kept (OpenAI keeps them 30 days); the leader deletes
    /// older ones with its metrics maintenance.
    pub retention: Duration,
}

impl Config {
    /// The defaults with the given database URL: what tests and `kvfleet dev` start from.
    pub fn new(database_url: impl Into<String>) -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            database: DatabaseConfig {
                url: database_url.into(),
                max_connections: 16,
                agent_max_connections: 16,
                leader_max_connections: 4,
                connect_timeout: Duration::from_secs(5),
            },
            auth: AuthConfig::default(),
            join: JoinConfig::default(),
            liveness: LivenessConfig {
                heartbeat_interval: Duration::from_secs(2),
                unhealthy_after: Duration::from_secs(10),
                lost_after: Duration::from_secs(60),
                check_interval: Duration::from_secs(1),
            },
            leader: LeaderConfig {
                retry_interval: Duration::from_secs(2),
                lease: Duration::from_secs(15),
            },
            placement: PlacementConfig {
                interval: Duration::from_secs(2),
                replace_failed_after: Duration::from_secs(10),
            },
            watch: WatchConfig {
                max_wait: Duration::from_secs(30),
            },
            ca: CaConfig {
                cert_validity: Duration::from_secs(7 * 86_400),
                ca_validity: Duration::from_secs(3650 * 86_400),
                key_file: PathBuf::from(DEFAULT_CA_KEY_FILE),
            },
            tls: TlsConfig::Off,
            metrics: MetricsConfig {
                raw_retention: Duration::from_secs(2 * 3600),
                rollup_bucket: Duration::from_secs(60),
                rollup_retention: Duration::from_secs(30 * 86_400),
                maintenance_interval: Duration::from_secs(60),
            },
            responses: ResponsesConfig {
                retention: Duration::from_secs(30 * 86_400),
            },
            planner: kvfleet_planner::PlannerConfig::default(),
        }
    }

    /// Parses and validates every layer of `source`. On failure, returns every problem found.
    pub fn load(source: &Source) -> Result<Self, ConfigErrors> {
        let mut problems = Vec::new();
        let mut values: BTreeMap<String, (toml::Value, Origin)> = BTreeMap::new();

        if let Some(file) = &source.file {
            match file.text.parse::<toml::Table>() {
                Ok(table) => flatten(&table, "", &mut |key, value| {
                    let line = find_line(&file.text, &key);
                    values.insert(
                        key,
                        (
                            value,
                            Origin::File {
                                path: file.path.clone(),
                                line,
                            },
                        ),
                    );
                }),
                Err(error) => problems.push(Problem {
                    origin: Origin::File {
                        path: file.path.clone(),
                        line: error.span().map(|span| line_of(&file.text, span.start)),
                    },
                    key: String::new(),
                    message: format!("not valid TOML: {}", error.message()),
                }),
            }
        }
        let top_level: Vec<String> = Self::known_keys()
            .into_iter()
            .filter(|key| !key.contains('.'))
            .collect();
        for (name, text) in &source.env {
            let key = if name == "DATABASE_URL" {
                "database.url".to_owned()
            } else if let Some(rest) = name.strip_prefix("KVFLEET_").filter(|rest| {
                rest.contains("__") || top_level.contains(&rest.to_ascii_lowercase())
            }) {
                // Only `KVFLEET_<SECTION>__<KEY>` and top-level keys (`KVFLEET_LISTEN`) are
                // ours: the CLI (`KVFLEET_URL`), the agent (`KVFLEET_AGENT_*`) and the tests set
                // other `KVFLEET_*` variables in the same shells. A typo inside a section is
                // still reported as an unknown setting.
                rest.to_ascii_lowercase().replace("__", ".")
            } else {
                continue;
            };
            values.insert(
                key,
                (scalar_from_text(text), Origin::Env { var: name.clone() }),
            );
        }
        for (key, text) in &source.flags {
            values.insert(
                key.clone(),
                (scalar_from_text(text), Origin::Flag { name: key.clone() }),
            );
        }

        let mut reader = Reader {
            values,
            problems,
            asked: Vec::new(),
        };
        let config = Self::read(&mut reader);
        let unknown: Vec<(String, Origin)> = std::mem::take(&mut reader.values)
            .into_iter()
            .map(|(key, (_, origin))| (key, origin))
            .collect();
        for (key, origin) in unknown {
            reader.problem(origin, &key, "unknown setting");
        }
        let mut problems = reader.problems;
        problems.extend(config.cross_field_problems());
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigErrors { problems })
        }
    }

    /// Every setting, as `section.key`.
    pub fn known_keys() -> Vec<String> {
        let mut reader = Reader {
            values: BTreeMap::new(),
            problems: Vec::new(),
            asked: Vec::new(),
        };
        Self::read(&mut reader);
        reader.asked
    }

    fn read(reader: &mut Reader) -> Config {
        let mut config = Config::new(String::new());
        reader.socket_addr("listen", &mut config.listen);
        match reader.take("database.url") {
            Some((toml::Value::String(url), origin)) => {
                if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                    reader.problem(
                        origin,
                        "database.url",
                        "must start with postgres:// or postgresql://",
                    );
                }
                config.database.url = url;
            }
            Some((_, origin)) => reader.problem(origin, "database.url", "must be a string"),
            None => reader.problem(
                Origin::Default,
                "database.url",
                "is required (set [database] url, DATABASE_URL or --database-url)",
            ),
        }
        reader.u32_in(
            "database.max_connections",
            1..=10_000,
            &mut config.database.max_connections,
        );
        reader.u32_in(
            "database.agent_max_connections",
            1..=10_000,
            &mut config.database.agent_max_connections,
        );
        reader.u32_in(
            "database.leader_max_connections",
            1..=1_000,
            &mut config.database.leader_max_connections,
        );
        reader.duration(
            "database.connect_timeout",
            &mut config.database.connect_timeout,
        );
        if let Some((value, origin)) = reader.take("auth.bootstrap_admin_token") {
            match value {
                toml::Value::String(token) if crate::auth::parse_token(&token).is_ok() => {
                    config.auth.bootstrap_admin_token = Some(token);
                }
                toml::Value::String(_) => reader.problem(
                    origin,
                    "auth.bootstrap_admin_token",
                    "is not a kvfleet token (make one with `kvfleet-controlplane token generate`)",
                ),
                _ => reader.problem(origin, "auth.bootstrap_admin_token", "must be a string"),
            }
        }
        if let Some(path) = reader.absolute_path("auth.bootstrap_token_file") {
            config.auth.bootstrap_token_file = path;
        }
        reader.duration("auth.cache_ttl", &mut config.auth.cache_ttl);
        reader.u32_in(
            "auth.failed_burst",
            1..=1_000_000,
            &mut config.auth.failed_burst,
        );
        reader.u32_in(
            "auth.failed_per_minute",
            1..=1_000_000,
            &mut config.auth.failed_per_minute,
        );
        reader.bool("join.auto_approve", &mut config.join.auto_approve);
        reader.duration(
            "liveness.heartbeat_interval",
            &mut config.liveness.heartbeat_interval,
        );
        reader.duration(
            "liveness.unhealthy_after",
            &mut config.liveness.unhealthy_after,
        );
        reader.duration("liveness.lost_after", &mut config.liveness.lost_after);
        reader.duration(
            "liveness.check_interval",
            &mut config.liveness.check_interval,
        );
        reader.duration("leader.retry_interval", &mut config.leader.retry_interval);
        reader.duration("leader.lease", &mut config.leader.lease);
        reader.duration("placement.interval", &mut config.placement.interval);
        reader.duration(
            "placement.replace_failed_after",
            &mut config.placement.replace_failed_after,
        );
        reader.duration("watch.max_wait", &mut config.watch.max_wait);
        reader.duration("ca.cert_validity", &mut config.ca.cert_validity);
        reader.duration("ca.ca_validity", &mut config.ca.ca_validity);
        if let Some(path) = reader.absolute_path("ca.key_file") {
            config.ca.key_file = path;
        }
        config.tls = reader.tls();
        reader.duration("metrics.raw_retention", &mut config.metrics.raw_retention);
        reader.duration("metrics.rollup_bucket", &mut config.metrics.rollup_bucket);
        reader.duration(
            "metrics.rollup_retention",
            &mut config.metrics.rollup_retention,
        );
        reader.duration(
            "metrics.maintenance_interval",
            &mut config.metrics.maintenance_interval,
        );
        reader.duration("responses.retention", &mut config.responses.retention);
        reader.duration("planner.interval", &mut config.planner.interval);
        reader.duration("planner.cooldown", &mut config.planner.cooldown);
        reader.u32_in("planner.lookahead", 1..=100, &mut config.planner.lookahead);
        if let Some((value, origin)) = reader.take("planner.predictor") {
            match value
                .as_str()
                .map(str::parse::<kvfleet_planner::PredictorKind>)
            {
                Some(Ok(kind)) => config.planner.predictor = kind,
                _ => reader.problem(
                    origin,
                    "planner.predictor",
                    "must be one of last, ewma, holt, seasonal",
                ),
            }
        }
        if let Some((value, origin)) = reader.take("planner.scale_down_margin") {
            match value.as_float().or(value.as_integer().map(|i| i as f64)) {
                Some(m) if (0.0..=1.0).contains(&m) => config.planner.scale_down_margin = m,
                _ => reader.problem(
                    origin,
                    "planner.scale_down_margin",
                    "must be a number from 0 to 1 (0.05 = 5% headroom)",
                ),
            }
        }

        config
    }

    /// Relations between settings that each look fine alone.
    fn cross_field_problems(&self) -> Vec<Problem> {
        let mut problems = Vec::new();
        let mut check = |ok: bool, key: &str, message: &str| {
            if !ok {
                problems.push(Problem {
                    origin: Origin::Default,
                    key: key.to_owned(),
                    message: message.to_owned(),
                });
            }
        };
        let l = &self.liveness;
        check(
            !l.heartbeat_interval.is_zero(),
            "liveness.heartbeat_interval",
            "must be above zero",
        );
        check(
            l.unhealthy_after > l.heartbeat_interval,
            "liveness.unhealthy_after",
            "must be longer than liveness.heartbeat_interval",
        );
        check(
            l.lost_after > l.unhealthy_after,
            "liveness.lost_after",
            "must be longer than liveness.unhealthy_after",
        );
        // A lease shorter than the check interval would expire between two checks.
        check(
            self.leader.lease > self.leader.retry_interval,
            "leader.lease",
            "must be longer than leader.retry_interval",
        );
        for (key, value) in [
            ("liveness.check_interval", l.check_interval),
            ("leader.retry_interval", self.leader.retry_interval),
            ("leader.lease", self.leader.lease),
            ("placement.interval", self.placement.interval),
            ("planner.interval", self.planner.interval),
            ("watch.max_wait", self.watch.max_wait),
            ("metrics.rollup_bucket", self.metrics.rollup_bucket),
            (
                "metrics.maintenance_interval",
                self.metrics.maintenance_interval,
            ),
        ] {
            check(!value.is_zero(), key, "must be above zero");
        }
        check(
            self.ca.cert_validity >= Duration::from_secs(3600),
            "ca.cert_validity",
            "must be at least 1h",
        );
        check(
            self.ca.ca_validity > self.ca.cert_validity,
            "ca.ca_validity",
            "must be longer than ca.cert_validity",
        );
        check(
            self.metrics.rollup_retention >= self.metrics.raw_retention,
            "metrics.rollup_retention",
            "must be at least metrics.raw_retention",
        );
        problems
    }
}

/// The raw inputs [`Config::load`] reads. Nothing here has been validated.
#[derive(Debug, Clone, Default)]
pub struct Source {
    /// The configuration file, if one was found.
    pub file: Option<FileSource>,
    /// Environment variables (only `KVFLEET_*` and `DATABASE_URL` are read).
    pub env: Vec<(String, String)>,
    /// Flag overrides as `(section.key, value)`, applied last.
    pub flags: Vec<(String, String)>,
}

/// A configuration file's path and text.
#[derive(Debug, Clone)]
pub struct FileSource {
    pub path: PathBuf,
    pub text: String,
}

/// Where a value came from, for error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    File {
        path: PathBuf,
        line: Option<usize>,
    },
    Env {
        var: String,
    },
    Flag {
        name: String,
    },
    /// A default, or a relation between several settings.
    Default,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::File {
                path,
                line: Some(line),
            } => write!(f, "{}:{line}", path.display()),
            Origin::File { path, line: None } => write!(f, "{}", path.display()),
            Origin::Env { var } => write!(f, "environment variable {var}"),
            Origin::Flag { name } => write!(f, "flag --set {name}"),
            Origin::Default => f.write_str("configuration"),
        }
    }
}

/// One thing wrong with the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub origin: Origin,
    /// The setting, as `section.key` (empty when the whole file is unreadable).
    pub key: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}: {}", self.origin, self.message)
        } else {
            write!(f, "{}: {}: {}", self.origin, self.key, self.message)
        }
    }
}

/// Every problem [`Config::load`] found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors {
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{} configuration problem(s):", self.problems.len())?;
        for problem in &self.problems {
            writeln!(f, "  {problem}")?;
        }
        Ok(())
    }
}

struct Reader {
    values: BTreeMap<String, (toml::Value, Origin)>,
    problems: Vec<Problem>,
    /// Every key asked for, known or not: the list of settings this parser understands.
    asked: Vec<String>,
}

impl Reader {
    fn take(&mut self, key: &str) -> Option<(toml::Value, Origin)> {
        self.asked.push(key.to_owned());
        self.values.remove(key)
    }

    fn problem(&mut self, origin: Origin, key: &str, message: &str) {
        self.problems.push(Problem {
            origin,
            key: key.to_owned(),
            message: message.to_owned(),
        });
    }

    fn duration(&mut self, key: &str, out: &mut Duration) {
        if let Some((value, origin)) = self.take(key) {
            match value {
                toml::Value::String(text) => match parse_duration(&text) {
                    Ok(duration) => *out = duration,
                    Err(message) => self.problem(origin, key, &message),
                },
                _ => self.problem(origin, key, "must be a duration string such as \"500ms\", \"10s\", \"2m\", \"1h\" or \"30d\""),
            }
        }
    }

    fn bool(&mut self, key: &str, out: &mut bool) {
        if let Some((value, origin)) = self.take(key) {
            match value.as_bool() {
                Some(b) => *out = b,
                None => self.problem(origin, key, "must be true or false"),
            }
        }
    }

    fn u32_in(&mut self, key: &str, range: std::ops::RangeInclusive<u32>, out: &mut u32) {
        if let Some((value, origin)) = self.take(key) {
            match value.as_integer().and_then(|v| u32::try_from(v).ok()) {
                Some(v) if range.contains(&v) => *out = v,
                _ => self.problem(
                    origin,
                    key,
                    &format!(
                        "must be an integer from {} to {}",
                        range.start(),
                        range.end()
                    ),
                ),
            }
        }
    }

    fn absolute_path(&mut self, key: &str) -> Option<PathBuf> {
        let (value, origin) = self.take(key)?;
        match value.as_str() {
            Some(path) if path.starts_with('/') => Some(PathBuf::from(path)),
            _ => {
                self.problem(origin, key, "must be an absolute path");
                None
            }
        }
    }

    /// `[tls]`: `mode` ("off", "files", "fleet-ca") and the keys that mode needs.
    fn tls(&mut self) -> TlsConfig {
        let mode = self.take("tls.mode");
        let cert_file = self.absolute_path("tls.cert_file");
        let key_file = self.absolute_path("tls.key_file");
        let mut names = Vec::new();
        if let Some((value, origin)) = self.take("tls.names") {
            match value.as_array().map(|a| a.iter().map(toml::Value::as_str).collect::<Option<Vec<_>>>()) {
                Some(Some(list)) if list.iter().all(|n| !n.trim().is_empty()) => {
                    names = list.into_iter().map(str::to_owned).collect();
                }
                _ => self.problem(
                    origin,
                    "tls.names",
                    "must be a list of DNS names or IP addresses, e.g. [\"cp.example.com\", \"10.0.0.2\"]",
                ),
            }
        }
        let Some((mode, origin)) = mode else {
            return TlsConfig::Off;
        };
        match mode.as_str() {
            Some("off") => TlsConfig::Off,
            Some("fleet-ca") => TlsConfig::FleetCa { names },
            Some("files") => match (cert_file, key_file) {
                (Some(cert_file), Some(key_file)) => TlsConfig::Files {
                    cert_file,
                    key_file,
                },
                _ => {
                    self.problem(
                        origin,
                        "tls.mode",
                        "\"files\" needs tls.cert_file and tls.key_file (PEM)",
                    );
                    TlsConfig::Off
                }
            },
            _ => {
                self.problem(origin, "tls.mode", "must be one of off, files, fleet-ca");
                TlsConfig::Off
            }
        }
    }

    fn socket_addr(&mut self, key: &str, out: &mut SocketAddr) {
        if let Some((value, origin)) = self.take(key) {
            match value.as_str().map(str::parse::<SocketAddr>) {
                Some(Ok(addr)) => *out = addr,
                _ => self.problem(origin, key, "must be an address such as \"0.0.0.0:8080\""),
            }
        }
    }
}

/// Parses `500ms`, `10s`, `2m`, `1h`, `30d`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let bad = || {
        format!("{text:?} is not a duration such as \"500ms\", \"10s\", \"2m\", \"1h\" or \"30d\"")
    };
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let millis = match unit {
        "ms" => Some(n),
        "s" => n.checked_mul(1000),
        "m" => n.checked_mul(60_000),
        "h" => n.checked_mul(3_600_000),
        "d" => n.checked_mul(86_400_000),
        _ => return Err(bad()),
    };
    millis.map(Duration::from_millis).ok_or_else(bad)
}

/// An environment or flag value: an integer or boolean when it reads as one, else a string.
fn scalar_from_text(text: &str) -> toml::Value {
    if let Ok(n) = text.parse::<i64>() {
        toml::Value::Integer(n)
    } else if let Ok(b) = text.parse::<bool>() {
        toml::Value::Boolean(b)
    } else {
        toml::Value::String(text.to_owned())
    }
}

fn flatten(table: &toml::Table, prefix: &str, out: &mut impl FnMut(String, toml::Value)) {
    for (key, value) in table {
        let path = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        match value {
            toml::Value::Table(inner) => flatten(inner, &path, out),
            other => out(path, other.clone()),
        }
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// The 1-based line where `section.key` is set, tracking `[section]` headers. Good enough for
/// the flat files the control plane reads; `None` when not found (e.g. inline tables).
fn find_line(text: &str, dotted: &str) -> Option<usize> {
    let (section, key) = match dotted.rsplit_once('.') {
        Some((section, key)) => (section, key),
        None => ("", dotted),
    };
    let mut current = String::new();
    for (index, line) in text.lines().enumerate() {
        let line = line.trim();
        if let Some(header) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            current = header.trim().to_owned();
            continue;
        }
        if current == section
            && let Some((k, _)) = line.split_once('=')
            && k.trim().trim_matches('"') == key
        {
            return Some(index + 1);
        }
    }
    None
}

/// `postgres://user:secret@host/db` → `postgres://user:***@host/db`.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> Source {
        Source {
            file: Some(FileSource {
                path: PathBuf::from("/etc/kvfleet/controlplane.toml"),
                text: text.to_owned(),
            }),
            ..Source::default()
        }
    }

    #[test]
    fn a_full_file_parses_into_typed_settings() {
        let config = Config::load(&file(
            r#"
listen = "127.0.0.1:9090"
[database]
url = "postgres://kvfleet@db/kvfleet"
max_connections = 8
[liveness]
heartbeat_interval = "500ms"
unhealthy_after = "3s"
lost_after = "1m"
"#,
        ))
        .unwrap();
        assert_eq!(config.listen, "127.0.0.1:9090".parse().unwrap());
        assert_eq!(config.database.max_connections, 8);
        assert_eq!(
            config.liveness.heartbeat_interval,
            Duration::from_millis(500)
        );
        assert_eq!(config.liveness.lost_after, Duration::from_secs(60));
        // Untouched settings keep their defaults.
        assert_eq!(config.watch.max_wait, Duration::from_secs(30));
    }

    #[test]
    fn env_overrides_file_and_flags_override_env() {
        let mut source = file("[database]\nurl = \"postgres://file/db\"\n");
        source.env = vec![
            ("DATABASE_URL".into(), "postgres://env/db".into()),
            ("KVFLEET_WATCH__MAX_WAIT".into(), "5s".into()),
            ("HOME".into(), "/root".into()),
            // Other programs' variables in the same shell are not settings of ours.
            ("KVFLEET_URL".into(), "http://127.0.0.1:8080".into()),
            ("KVFLEET_AGENT_LISTEN".into(), "127.0.0.1:8000".into()),
            ("KVFLEET_LISTEN".into(), "127.0.0.1:9091".into()),
        ];
        source.flags = vec![("watch.max_wait".into(), "7s".into())];
        let config = Config::load(&source).unwrap();
        assert_eq!(config.database.url, "postgres://env/db");
        assert_eq!(config.watch.max_wait, Duration::from_secs(7));
        assert_eq!(config.listen, "127.0.0.1:9091".parse().unwrap());
        assert!(
            !config.join.auto_approve,
            "joins wait for an admin by default"
        );
        // What `kvfleet dev` sets; a value that is not a bool is named.
        source.env = vec![("KVFLEET_JOIN__AUTO_APPROVE".into(), "true".into())];
        assert!(Config::load(&source).unwrap().join.auto_approve);
        source.env = vec![("KVFLEET_JOIN__AUTO_APPROVE".into(), "yes".into())];
        let errors = Config::load(&source).unwrap_err();
        assert_eq!(errors.problems[0].key, "join.auto_approve");
        assert!(errors.problems[0].message.contains("true or false"));
    }

    #[test]
    fn every_problem_is_reported_with_its_location() {
        let mut source = file(
            "listen = \"nowhere\"\n[database]\nurl = \"mysql://x\"\nmax_connections = 0\n[liveness]\nlost_after = \"soon\"\ncolour = \"blue\"\n",
        );
        source.env = vec![
            ("KVFLEET_PLACEMENT__INTERVAL".into(), "3 parsecs".into()),
            ("KVFLEET_PLACEMENT__INTERVALL".into(), "3s".into()),
        ];
        let errors = Config::load(&source).unwrap_err();
        let text: Vec<String> = errors.problems.iter().map(ToString::to_string).collect();
        let expect = [
            "/etc/kvfleet/controlplane.toml:1: listen: must be an address",
            "/etc/kvfleet/controlplane.toml:3: database.url: must start with postgres://",
            "/etc/kvfleet/controlplane.toml:4: database.max_connections: must be an integer from 1",
            "/etc/kvfleet/controlplane.toml:6: liveness.lost_after: \"soon\" is not a duration",
            "/etc/kvfleet/controlplane.toml:7: liveness.colour: unknown setting",
            "environment variable KVFLEET_PLACEMENT__INTERVAL: placement.interval: \"3 parsecs\"",
            "environment variable KVFLEET_PLACEMENT__INTERVALL: placement.intervall: unknown setting",
        ];
        for want in expect {
            assert!(
                text.iter().any(|t| t.starts_with(want)),
                "missing {want:?} in {text:#?}"
            );
        }
        assert_eq!(text.len(), expect.len(), "{text:#?}");
    }

    #[test]
    fn missing_database_url_and_bad_relations_are_reported() {
        let errors = Config::load(&file(
            "[liveness]\nunhealthy_after = \"10s\"\nlost_after = \"5s\"\n",
        ))
        .unwrap_err();
        let keys: Vec<&str> = errors.problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["database.url", "liveness.lost_after"]);
    }

    #[test]
    fn invalid_toml_is_one_problem_with_a_line() {
        let errors = Config::load(&file("[database]\nurl = \n")).unwrap_err();
        assert!(
            errors.problems[0]
                .to_string()
                .contains("controlplane.toml:2: not valid TOML"),
            "{errors}"
        );
    }

    /// The example shipped beside the crate sets every key this parser knows, with the
    /// defaults: a drift in either shows up here.
    #[test]
    fn the_example_file_lists_every_setting_with_its_default() {
        let text = include_str!("../controlplane.example.toml");
        let config = Config::load(&file(text)).unwrap();
        let mut want = Config::new("postgres://kvfleet@127.0.0.1:5432/kvfleet");
        want.listen = "0.0.0.0:8080".parse().unwrap();
        // The one deliberate difference: installed control planes serve HTTPS from the fleet CA,
        // while `Config::new` (tests, `kvfleet dev` on loopback) serves plain HTTP.
        want.tls = TlsConfig::FleetCa { names: Vec::new() };
        assert_eq!(config, want);
        let table: toml::Table = text.parse().unwrap();
        // Commented out: their defaults are "unset" (or depend on the mode).
        let mut in_file: Vec<String> = [
            "auth.bootstrap_admin_token",
            "tls.names",
            "tls.cert_file",
            "tls.key_file",
        ]
        .map(str::to_owned)
        .to_vec();
        flatten(&table, "", &mut |key, _| in_file.push(key));
        let mut known = Config::known_keys();
        in_file.sort();
        known.sort();
        assert_eq!(in_file, known);
    }

    #[test]
    fn tls_modes_parse_and_name_what_is_missing() {
        let load = |text: &str| {
            Config::load(&Source {
                file: Some(FileSource {
                    path: "/etc/kvfleet/controlplane.toml".into(),
                    text: format!("[database]\nurl = \"postgres://x\"\n{text}"),
                }),
                env: Vec::new(),
                flags: Vec::new(),
            })
        };
        assert_eq!(load("").unwrap().tls, TlsConfig::Off);
        assert_eq!(
            load("[tls]\nmode = \"fleet-ca\"\nnames = [\"cp.example\", \"10.0.0.2\"]")
                .unwrap()
                .tls,
            TlsConfig::FleetCa {
                names: vec!["cp.example".into(), "10.0.0.2".into()]
            }
        );
        assert_eq!(
            load("[tls]\nmode = \"files\"\ncert_file = \"/c.pem\"\nkey_file = \"/k.pem\"")
                .unwrap()
                .tls,
            TlsConfig::Files {
                cert_file: "/c.pem".into(),
                key_file: "/k.pem".into()
            }
        );
        for (text, needle) in [
            (
                "[tls]\nmode = \"files\"\ncert_file = \"/c.pem\"",
                "needs tls.cert_file and tls.key_file",
            ),
            (
                "[tls]\nmode = \"https\"",
                "must be one of off, files, fleet-ca",
            ),
            (
                "[tls]\nmode = \"files\"\ncert_file = \"c.pem\"\nkey_file = \"/k.pem\"",
                "absolute path",
            ),
            (
                "[tls]\nmode = \"fleet-ca\"\nnames = \"cp\"",
                "list of DNS names",
            ),
        ] {
            let errors = load(text).unwrap_err().to_string();
            assert!(errors.contains(needle), "{text}: {errors}");
        }
    }

    #[test]
    fn durations_parse_table() {
        for (text, want) in [
            ("500ms", Some(Duration::from_millis(500))),
            ("10s", Some(Duration::from_secs(10))),
            ("2m", Some(Duration::from_secs(120))),
            ("1h", Some(Duration::from_secs(3600))),
            ("30d", Some(Duration::from_secs(30 * 86_400))),
            ("10", None),
            ("s", None),
            ("1.5s", None),
            ("-1s", None),
            ("99999999999999999999d", None),
        ] {
            assert_eq!(parse_duration(text).ok(), want, "{text}");
        }
    }

    #[test]
    fn database_passwords_are_redacted() {
        assert_eq!(
            redact_url("postgres://kv:hunter2@db:5432/kv"),
            "postgres://kv:***@db:5432/kv"
        );
        assert_eq!(redact_url("postgres://kv@db/kv"), "postgres://kv@db/kv");
        let config = Config::new("postgres://kv:hunter2@db/kv");
        assert!(!format!("{config:?}").contains("hunter2"));
    }
}
