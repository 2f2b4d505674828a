//! The JSON bodies of the control plane's `/api/v1`: what the CLI, the web UI, automation and
//! agents send and get. One definition, shared by the control plane (which serves them), the
//! agent's control-plane client and the `kvfleet` admin CLI.
//!
//! Request bodies reject unknown fields, so a typo (`min_worker`) is an error naming the field
//! rather than a silently ignored setting. Response bodies may gain fields; clients must ignore
//! what they do not know.
//!
//! Enums that the control plane stores as Postgres `text` ([`NodeState`], [`Role`], ...) spell
//! themselves with `as_str` and parse with `FromStr`/`TryFrom<String>`; the store converts at its
//! edge, so this module stays free of database types. The OpenAPI schema derives (`utoipa`) are
//! behind this crate's `openapi` feature, which only the control plane enables.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A text that names no variant of a text enum.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {kind} {text:?}")]
pub struct UnknownVariant {
    /// The enum's name, e.g. `NodeState`.
    pub kind: &'static str,
    pub text: String,
}

/// An enum stored as text and spelled in snake_case on the wire.
macro_rules! text_enum {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
        #[serde(rename_all = "snake_case")]
        pub enum $name { $($(#[$vdoc])* $variant),+ }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = UnknownVariant;

            fn from_str(s: &str) -> Result<Self, UnknownVariant> {
                match s {
                    $($text => Ok($name::$variant),)+
                    other => Err(UnknownVariant { kind: stringify!($name), text: other.to_owned() }),
                }
            }
        }

        impl TryFrom<String> for $name {
            type Error = UnknownVariant;

            fn try_from(s: String) -> Result<Self, UnknownVariant> {
                s.parse()
            }
        }

        impl TryFrom<&str> for $name {
            type Error = UnknownVariant;

            fn try_from(s: &str) -> Result<Self, UnknownVariant> {
                s.parse()
            }
        }
    };
}

text_enum!(
    /// A token's role.
    Role {
        Admin => "admin",
        Operator => "operator",
        Viewer => "viewer",
        /// A node's agent credential (one per node, minted at registration).
        Agent => "agent",
        /// A join token: lets new nodes register, nothing else.
        Join => "join",
    }
);

/// What a route needs (every control-plane route names one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permission {
    Read,
    Operate,
    Admin,
    Agent,
    Register,
}

impl Role {
    pub fn parse(text: &str) -> Option<Role> {
        text.parse().ok()
    }

    /// The authorization matrix: admin reads, operates and administers; operator reads and
    /// operates; viewer reads; an agent credential speaks the agent protocol (and re-registers);
    /// a join token only registers.
    pub fn allows(self, permission: Permission) -> bool {
        use Permission as P;
        use Role as R;
        matches!(
            (self, permission),
            (R::Admin, P::Read | P::Operate | P::Admin)
                | (R::Operator, P::Read | P::Operate)
                | (R::Viewer, P::Read)
                | (R::Agent, P::Agent | P::Register)
                | (R::Join, P::Register)
        )
    }
}

text_enum!(
    /// A node's lifecycle: `joining` until its first heartbeat, `healthy` while heartbeats
    /// arrive, `unhealthy` after a silence (no new work), `lost` after a longer one (its workers
    /// are replaced elsewhere), `removed` by an admin.
    NodeState {
        Joining => "joining",
        Healthy => "healthy",
        Unhealthy => "unhealthy",
        Lost => "lost",
        Removed => "removed",
    }
);

text_enum!(
    /// Whether an admin let a node in (issue #22). A node made by a join token is `pending`
    /// unless the control plane auto-approves joins (`[join] auto_approve`, for labs): it may
    /// heartbeat, but gets no peer certificate and no workers until an admin approves it.
    /// `rejected` nodes are removed: their credential is revoked and they cannot come back
    /// without a new join token.
    NodeApproval {
        Pending => "pending",
        Approved => "approved",
        Rejected => "rejected",
    }
);

impl NodeApproval {
    /// What a control plane that predates approval means: every node it knows is admitted.
    pub fn approved() -> Self {
        NodeApproval::Approved
    }
}

text_enum!(
    /// How a deployment serves: every worker does prefill and decode, or they are split.
    DeploymentMode {
        Aggregated => "aggregated",
        Disaggregated => "disaggregated",
    }
);

text_enum!(
    /// The format a deployment's tool calls are parsed in (and, for `tool_choice: required` or a
    /// named function, constrained to): `auto` takes the node's `[[models]] tool_parser`, else
    /// the one the model's chat template implies.
    ToolParser {
        Auto => "auto",
        /// `<tool_call>{…}</tool_call>` (Hermes, Qwen 2.5/3).
        Hermes => "hermes",
        /// Llama 3.1+ JSON calls.
        Llama3Json => "llama3_json",
        /// `[TOOL_CALLS]`.
        Mistral => "mistral",
        /// A Python list of calls (Llama 3.2/4).
        Pythonic => "pythonic",
    }
);

text_enum!(
    /// How a deployment's reasoning is separated into `reasoning_content`: `auto` takes the
    /// node's `[[models]] reasoning_parser`, else what the model's chat template implies.
    ReasoningParser {
        Auto => "auto",
        /// No separation: `<think>` stays in the content.
        #[serde(rename = "none")]
        Off => "none",
        /// `<think>…</think>` at the start of the output (Qwen 3, QwQ).
        Think => "think",
        /// DeepSeek R1: the output starts inside the reasoning.
        DeepseekR1 => "deepseek_r1",
    }
);

text_enum!(
    /// What the SLA planner does for a deployment: nothing (`off`: it stays at its minimum
    /// worker counts), record what it would do (`advise`), or act on it (`auto`).
    PlannerMode {
        Off => "off",
        Advise => "advise",
        Auto => "auto",
    }
);

text_enum!(
    WorkerRole {
        Aggregated => "aggregated",
        Prefill => "prefill",
        Decode => "decode",
    }
);

text_enum!(
    /// What the control plane wants a worker to do.
    DesiredWorkerState {
        Running => "running",
        Draining => "draining",
        Stopped => "stopped",
    }
);

text_enum!(
    /// What the agent last reported a worker doing (`lost`: its node went silent).
    ObservedWorkerState {
        Pending => "pending",
        Starting => "starting",
        Ready => "ready",
        Draining => "draining",
        Stopped => "stopped",
        Failed => "failed",
        Lost => "lost",
    }
);

text_enum!(
    ModelFormat {
        Gguf => "gguf",
        Safetensors => "safetensors",
        /// The mock engine: a timing model, no weights.
        Mock => "mock",
    }
);

/// One page of a list. Pass `next_cursor` back as `cursor` for the next page; absent at the end.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next_cursor: Option<String>,
}

/// Paging parameters shared by every list endpoint.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::IntoParams))]
#[cfg_attr(feature = "openapi", into_params(parameter_in = Query))]
#[serde(deny_unknown_fields)]
pub struct PageQuery {
    /// Items per page: default 100, at most 500.
    #[cfg_attr(feature = "openapi", param(minimum = 1, maximum = 500))]
    pub limit: Option<u32>,
    /// The `next_cursor` of the previous page (every list taking these parameters alone is
    /// keyed by a UUID).
    #[cfg_attr(feature = "openapi", param(format = Uuid))]
    pub cursor: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Node {
    pub id: Uuid,
    pub hostname: String,
    pub state: NodeState,
    /// No new workers are placed on a cordoned node.
    pub cordoned: bool,
    /// A draining node's workers are being moved elsewhere (implies cordoned).
    pub draining: bool,
    /// `pending` nodes get no workers and no peer certificate until an admin approves them.
    #[serde(default = "NodeApproval::approved")]
    pub approval: NodeApproval,
    /// The labels placement matches: `reported_labels` with `admin_labels` on top (an admin's
    /// value wins on a shared key).
    pub labels: BTreeMap<String, String>,
    /// What the node's agent reports (`[control_plane] labels`); replaced at every registration.
    #[serde(default)]
    pub reported_labels: BTreeMap<String, String>,
    /// What an admin set (`kvfleet nodes label`); no agent call changes them.
    #[serde(default)]
    pub admin_labels: BTreeMap<String, String>,
    pub frontend_addr: Option<String>,
    pub peer_addr: Option<String>,
    pub addresses: Vec<String>,
    pub agent_version: Option<String>,
    pub cpu_slots: i32,
    pub gpu_count: i64,
    pub desired_generation: i64,
    pub last_heartbeat_at: Option<DateTime<Utc>>,
    pub state_changed_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// `POST /api/v1/nodes/{id}/labels`: change a node's admin labels (admin). `set` adds or
/// replaces, `remove` deletes (a key in both is an error); the node's reported labels are not
/// touched, and no agent call changes admin labels.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct NodeLabelsChange {
    /// Keys: 1 to 63 characters of `A-Za-z0-9._/-`; values: at most 253 characters.
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    #[serde(default)]
    pub remove: Vec<String>,
}

/// Whether `key` may name a label: 1 to 63 of `A-Za-z0-9._/-`, starting with a letter or digit.
pub fn valid_label_key(key: &str) -> bool {
    (1..=63).contains(&key.len())
        && key.starts_with(|c: char| c.is_ascii_alphanumeric())
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '/' | '-'))
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Gpu {
    pub id: Uuid,
    pub node_id: Uuid,
    pub device_index: i32,
    pub name: String,
    pub memory_total_bytes: i64,
    pub memory_used_bytes: Option<i64>,
    /// 0..=1, from the last heartbeat.
    pub utilization: Option<f32>,
    pub pci_bus_id: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Model {
    pub id: Uuid,
    pub name: String,
    pub format: ModelFormat,
    pub path: String,
    pub block_size: i32,
    pub context_length: Option<i32>,
    /// GPU memory one worker needs; absent: fits any GPU.
    pub memory_bytes: Option<i64>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// `POST /api/v1/models`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct NewModel {
    /// `[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}`
    #[cfg_attr(
        feature = "openapi",
        schema(pattern = r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")
    )]
    pub name: String,
    pub format: ModelFormat,
    /// Where the weights are on every node.
    #[cfg_attr(feature = "openapi", schema(pattern = r"\S"))]
    pub path: String,
    /// Tokens per KV block, 1..=1024 (default 16).
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 1024))]
    pub block_size: Option<i32>,
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(minimum = 1))]
    pub context_length: Option<i32>,
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(minimum = 1))]
    pub memory_bytes: Option<i64>,
}

/// Latency targets the planner sizes the deployment for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct SlaTargets {
    /// Time to first token, milliseconds (> 0).
    #[serde(default)]
    pub ttft_ms: Option<i32>,
    /// Inter-token latency, milliseconds (> 0).
    #[serde(default)]
    pub itl_ms: Option<i32>,
    /// The percentile both targets hold at, 50..=99.99 (absent: 90, i.e. p90).
    #[serde(default)]
    pub percentile: Option<f64>,
}

impl SlaTargets {
    /// The percentile when none is given.
    pub const DEFAULT_PERCENTILE: f64 = 90.0;
    /// The accepted percentiles.
    pub const PERCENTILE_RANGE: std::ops::RangeInclusive<f64> = 50.0..=99.99;

    /// The percentile, defaulted.
    pub fn percentile_or_default(&self) -> f64 {
        self.percentile.unwrap_or(Self::DEFAULT_PERCENTILE)
    }

    /// Every field that is out of range, as `(field, what is wrong)`, named as in the body.
    pub fn invalid_fields(&self) -> Vec<(&'static str, String)> {
        let mut problems = Vec::new();
        for (field, value) in [("sla.ttft_ms", self.ttft_ms), ("sla.itl_ms", self.itl_ms)] {
            if let Some(v) = value
                && v <= 0
            {
                problems.push((field, format!("{v} must be above 0 ms")));
            }
        }
        if let Some(p) = self.percentile
            && !(p.is_finite() && Self::PERCENTILE_RANGE.contains(&p))
        {
            problems.push((
                "sla.percentile",
                format!(
                    "{p} must be from {} to {}",
                    Self::PERCENTILE_RANGE.start(),
                    Self::PERCENTILE_RANGE.end()
                ),
            ));
        }
        problems
    }
}

/// A range of worker counts for one role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct WorkerBounds {
    /// Fewest workers of the role (≥ 0).
    pub min: i32,
    /// Most workers of the role (≥ min).
    pub max: i32,
}

/// Per-role worker bounds of a disaggregated deployment; an absent role is bounded only by the
/// deployment's `min_workers`/`max_workers`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct RoleWorkerBounds {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefill: Option<WorkerBounds>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decode: Option<WorkerBounds>,
}

impl RoleWorkerBounds {
    /// Whether no role has bounds.
    pub fn is_empty(&self) -> bool {
        self.prefill.is_none() && self.decode.is_none()
    }

    /// Every problem with these bounds for a deployment of `mode` with `min_workers` to
    /// `max_workers` workers, as `(field, what is wrong)` named as in the body
    /// (`roles.prefill.max`). A disaggregated deployment that runs at all needs a decode
    /// worker, so an unset `decode` counts as a minimum of 1 when `min_workers` is 1 or more.
    pub fn invalid_fields(
        &self,
        mode: DeploymentMode,
        min_workers: i32,
        max_workers: i32,
    ) -> Vec<(String, String)> {
        let mut problems = Vec::new();
        let mut minimums = 0i64;
        if mode == DeploymentMode::Disaggregated && self.decode.is_none() {
            minimums += i64::from(min_workers.clamp(0, 1));
        }
        for (name, bounds) in [("prefill", self.prefill), ("decode", self.decode)] {
            let Some(b) = bounds else { continue };
            if mode == DeploymentMode::Aggregated {
                problems.push((
                    format!("roles.{name}"),
                    "only a disaggregated deployment has prefill and decode workers".to_owned(),
                ));
                continue;
            }
            if b.min < 0 {
                problems.push((
                    format!("roles.{name}.min"),
                    format!("{} must be 0 or more", b.min),
                ));
            }
            if b.max < b.min {
                problems.push((
                    format!("roles.{name}.max"),
                    format!("{} is below roles.{name}.min {}", b.max, b.min),
                ));
            }
            if b.max > max_workers {
                problems.push((
                    format!("roles.{name}.max"),
                    format!("{} exceeds max_workers {max_workers}", b.max),
                ));
            }
            minimums += i64::from(b.min.max(0));
        }
        if mode == DeploymentMode::Disaggregated && minimums > i64::from(max_workers) {
            problems.push((
                "roles".to_owned(),
                format!(
                    "the roles' minimums add up to {minimums}, above max_workers {max_workers}"
                ),
            ));
        }
        problems
    }
}

/// Where a deployment's workers may run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct PlacementConstraints {
    /// Only nodes carrying all of these labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_labels: BTreeMap<String, String>,
    /// Only these nodes (empty: any).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<Uuid>,
    /// Only GPUs whose name contains this text (e.g. `H100`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_name: Option<String>,
    /// May run in CPU slots when no GPU fits (default: GPUs only).
    #[serde(default)]
    pub allow_cpu: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Deployment {
    pub id: Uuid,
    pub name: String,
    pub model_id: Uuid,
    pub model: String,
    pub mode: DeploymentMode,
    pub sla: SlaTargets,
    pub min_workers: i32,
    pub max_workers: i32,
    /// Per-role bounds (disaggregated deployments).
    #[serde(default, skip_serializing_if = "RoleWorkerBounds::is_empty")]
    pub roles: RoleWorkerBounds,
    /// What the SLA planner does for this deployment.
    #[serde(default = "planner_off")]
    pub planner: PlannerMode,
    pub placement: PlacementConstraints,
    /// How prefill is split from decode; ignored (but kept) while `mode` is `aggregated`.
    pub disaggregation: DisaggregationPolicy,
    /// How many times a request whose worker (or node) is lost mid-stream resumes on another
    /// worker before it fails, 0..=20 (0: never). Default 3.
    #[serde(default = "default_migration_limit")]
    pub migration_limit: u32,
    /// How tool calls are parsed (default `auto`).
    #[serde(default = "tool_parser_auto")]
    pub tool_parser: ToolParser,
    /// How reasoning is separated (default `auto`).
    #[serde(default = "reasoning_parser_auto")]
    pub reasoning_parser: ReasoningParser,
    pub generation: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// How a `disaggregated` deployment splits prefill from decode (ignored when aggregated).
///
/// Every field has a default, so `{}` (or an absent `[disaggregation]` table) is the default
/// policy and a partial object overrides only what it names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields, default)]
pub struct DisaggregationPolicy {
    /// A request is prefilled on a prefill worker only when the part of its prompt the chosen
    /// decode worker does not already cache is at least this many tokens; shorter ones are
    /// prefilled by the decode worker. 0: always disaggregate. Default 256.
    pub min_remote_prefill_tokens: u32,
    /// ...and only while the chosen prefill worker's queued prefill tokens plus that uncached
    /// part do not exceed this (at least 1). Default 16384.
    pub max_prefill_queue_tokens: u32,
    /// The decode worker prefills itself when the prefill leg has not finished (first token and
    /// KV blocks) within this long, 100..=600000 ms. Default 30000.
    pub prefill_timeout_ms: u32,
}

impl DisaggregationPolicy {
    /// Default of [`DisaggregationPolicy::min_remote_prefill_tokens`].
    pub const DEFAULT_MIN_REMOTE_PREFILL_TOKENS: u32 = 256;
    /// Default of [`DisaggregationPolicy::max_prefill_queue_tokens`].
    pub const DEFAULT_MAX_PREFILL_QUEUE_TOKENS: u32 = 16384;
    /// Default of [`DisaggregationPolicy::prefill_timeout_ms`].
    pub const DEFAULT_PREFILL_TIMEOUT_MS: u32 = 30_000;
    /// The accepted range of [`DisaggregationPolicy::prefill_timeout_ms`].
    pub const PREFILL_TIMEOUT_MS_RANGE: std::ops::RangeInclusive<u32> = 100..=600_000;

    /// Every field that is out of range, as `(field, what is wrong)`; empty when valid. Fields
    /// are named as in the JSON body (`disaggregation.prefill_timeout_ms`), so the control
    /// plane's problem JSON and the CLI point at them.
    pub fn invalid_fields(&self) -> Vec<(&'static str, String)> {
        let mut problems = Vec::new();
        if !Self::PREFILL_TIMEOUT_MS_RANGE.contains(&self.prefill_timeout_ms) {
            problems.push((
                "disaggregation.prefill_timeout_ms",
                format!(
                    "must be from {} to {} milliseconds",
                    Self::PREFILL_TIMEOUT_MS_RANGE.start(),
                    Self::PREFILL_TIMEOUT_MS_RANGE.end(),
                ),
            ));
        }
        if self.max_prefill_queue_tokens == 0 {
            problems.push((
                "disaggregation.max_prefill_queue_tokens",
                "must be 1 or more".to_owned(),
            ));
        }
        problems
    }
}

impl Default for DisaggregationPolicy {
    fn default() -> Self {
        DisaggregationPolicy {
            min_remote_prefill_tokens: Self::DEFAULT_MIN_REMOTE_PREFILL_TOKENS,
            max_prefill_queue_tokens: Self::DEFAULT_MAX_PREFILL_QUEUE_TOKENS,
            prefill_timeout_ms: Self::DEFAULT_PREFILL_TIMEOUT_MS,
        }
    }
}

/// `POST /api/v1/deployments`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct NewDeployment {
    /// `[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?`
    pub name: String,
    /// The model's name or id.
    pub model: String,
    #[serde(default = "default_mode")]
    pub mode: DeploymentMode,
    #[serde(default)]
    pub sla: SlaTargets,
    #[serde(default = "one")]
    pub min_workers: i32,
    #[serde(default = "one")]
    pub max_workers: i32,
    /// Per-role bounds (disaggregated deployments).
    #[serde(default)]
    pub roles: RoleWorkerBounds,
    /// `off` (default: the deployment runs `min_workers`), `advise` or `auto`.
    #[serde(default = "planner_off")]
    pub planner: PlannerMode,
    #[serde(default)]
    pub placement: PlacementConstraints,
    /// Absent: the default policy.
    #[serde(default)]
    pub disaggregation: DisaggregationPolicy,
    /// Absent: [`DEFAULT_MIGRATION_LIMIT`].
    #[serde(default = "default_migration_limit")]
    pub migration_limit: u32,
    /// Absent: `auto`.
    #[serde(default = "tool_parser_auto")]
    pub tool_parser: ToolParser,
    /// Absent: `auto`.
    #[serde(default = "reasoning_parser_auto")]
    pub reasoning_parser: ReasoningParser,
}

fn tool_parser_auto() -> ToolParser {
    ToolParser::Auto
}

fn reasoning_parser_auto() -> ReasoningParser {
    ReasoningParser::Auto
}

/// The problem with a deployment's `migration_limit`, if it has one (named as in the JSON body).
pub fn invalid_migration_limit(limit: u32) -> Option<(&'static str, String)> {
    (limit > MAX_MIGRATION_LIMIT).then(|| {
        (
            "migration_limit",
            format!("must be between 0 and {MAX_MIGRATION_LIMIT}, not {limit}"),
        )
    })
}

fn default_mode() -> DeploymentMode {
    DeploymentMode::Aggregated
}

fn planner_off() -> PlannerMode {
    PlannerMode::Off
}

fn one() -> i32 {
    1
}

/// `PATCH /api/v1/deployments/{id}`: absent fields keep their value.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct DeploymentPatch {
    #[serde(default)]
    pub mode: Option<DeploymentMode>,
    #[serde(default)]
    pub sla: Option<SlaTargets>,
    #[serde(default)]
    pub min_workers: Option<i32>,
    #[serde(default)]
    pub max_workers: Option<i32>,
    /// Replaces every role's bounds (`{}` clears them).
    #[serde(default)]
    pub roles: Option<RoleWorkerBounds>,
    #[serde(default)]
    pub planner: Option<PlannerMode>,
    #[serde(default)]
    pub placement: Option<PlacementConstraints>,
    /// Replaces the whole policy; fields absent from the object take their defaults.
    #[serde(default)]
    pub disaggregation: Option<DisaggregationPolicy>,
    #[serde(default)]
    pub migration_limit: Option<u32>,
    #[serde(default)]
    pub tool_parser: Option<ToolParser>,
    #[serde(default)]
    pub reasoning_parser: Option<ReasoningParser>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Worker {
    /// The compact worker id KV events carry.
    pub id: i64,
    pub deployment_id: Uuid,
    pub node_id: Uuid,
    /// Absent: a CPU slot.
    pub gpu_id: Option<Uuid>,
    pub role: WorkerRole,
    pub desired_state: DesiredWorkerState,
    pub observed_state: ObservedWorkerState,
    /// Why it last failed, as its agent reported (cleared once it is ready).
    #[serde(default)]
    pub observed_error: Option<String>,
    /// Its engine and version as its agent last reported (`llamacpp b1-0c1e570`).
    #[serde(default)]
    pub observed_engine: Option<String>,
    pub observed_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Token {
    pub id: Uuid,
    pub name: String,
    pub role: Role,
    /// The token's public first characters (`kvf_` + 12).
    pub prefix: String,
    pub node_id: Option<Uuid>,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub last_used_at: Option<DateTime<Utc>>,
    /// Join tokens: registrations it may still make (0: used up). Absent: unlimited.
    #[serde(default)]
    pub uses_left: Option<i32>,
}

/// Join tokens live one hour unless `expires_in_s` says otherwise.
pub const DEFAULT_JOIN_TOKEN_TTL_S: i64 = 3600;
/// The most uses a join token may be created with.
pub const MAX_JOIN_TOKEN_USES: i32 = 10_000;

/// `POST /api/v1/tokens`. Agent credentials are minted by registration, not here.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct NewToken {
    #[cfg_attr(feature = "openapi", schema(min_length = 1, max_length = 128))]
    pub name: String,
    /// `admin`, `operator`, `viewer` or `join`.
    pub role: Role,
    /// Lifetime in seconds; absent: no expiry, except join tokens, which expire after
    /// [`DEFAULT_JOIN_TOKEN_TTL_S`] (one hour).
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 315_360_000))]
    pub expires_in_s: Option<i64>,
    /// Join tokens only: how many nodes may register with it (1 to 10,000); absent: 1.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 10_000))]
    pub uses: Option<i32>,
}

/// The only response that ever contains a token's secret.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CreatedToken {
    pub token: Token,
    /// The bearer token. Shown once; only its hash is stored.
    pub secret: String,
    /// Join tokens from a control plane serving HTTPS from the fleet CA (`[tls] mode =
    /// "fleet-ca"`): the one string a new node's agent needs, `kvfj1.<the fleet CA's SHA-256, 64
    /// hex digits>.<secret>`. The agent pins the CA it carries from its very first contact (no
    /// separate `ca_fingerprint` line); the control plane accepts it as a bearer token like the
    /// secret alone. Absent otherwise (plain HTTP, or the operator's own certificate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub join_token: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AuditEntry {
    pub id: i64,
    pub at: DateTime<Utc>,
    pub actor: String,
    pub actor_token: Option<Uuid>,
    /// `<resource>.<verb>`, e.g. `deployment.create`.
    pub action: String,
    pub target_type: String,
    pub target_id: Option<String>,
    pub before: Option<serde_json::Value>,
    pub after: Option<serde_json::Value>,
}

/// The node CA certificate and the serials revoked so far (peers refuse them).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CaInfo {
    pub cert_pem: String,
    pub revoked_serials: Vec<String>,
}

// ---------------------------------------------------------------------------------------------
// SLA planner
// ---------------------------------------------------------------------------------------------

/// `GET /api/v1/planner`: the fleet-wide planner settings and where the loop stands.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PlannerSettings {
    /// The most workers (GPUs or CPU slots) all deployments may hold together; absent: no
    /// fleet-wide limit.
    pub gpu_budget: Option<i32>,
    /// Seconds between planning rounds (the control plane's `planner.interval`).
    pub interval_s: f64,
    /// What the deployments' minimums add up to (the least budget accepted).
    pub minimums: i32,
    /// When the last round ran (any replica: the loop runs on the leader).
    pub last_round_at: Option<DateTime<Utc>>,
    pub updated_at: Option<DateTime<Utc>>,
}

/// `PATCH /api/v1/planner`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct PlannerSettingsPatch {
    /// The new budget; `null` removes it. Must cover the deployments' minimums.
    #[serde(default, with = "double_option")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<i32>, minimum = 0))]
    pub gpu_budget: Option<Option<i32>>,
}

/// `Option<Option<T>>` that tells an absent field (`None`) from an explicit `null`
/// (`Some(None)`).
mod double_option {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub(super) fn serialize<T: Serialize, S: Serializer>(
        value: &Option<Option<T>>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match value {
            Some(inner) => inner.serialize(s),
            None => s.serialize_none(),
        }
    }

    pub(super) fn deserialize<'de, T: Deserialize<'de>, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Option<T>>, D::Error> {
        Option::<T>::deserialize(d).map(Some)
    }
}

/// Workers per role.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RoleCountsView {
    #[serde(default)]
    pub aggregated: i64,
    #[serde(default)]
    pub prefill: i64,
    #[serde(default)]
    pub decode: i64,
}

/// One planner decision (`GET /api/v1/planner/decisions`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PlannerDecision {
    pub id: i64,
    pub at: DateTime<Utc>,
    pub deployment_id: Uuid,
    pub deployment: String,
    /// `advise` (recorded only) or `auto` (acted on).
    pub mode: PlannerMode,
    /// `hold`, `scale_up`, `scale_down` or `rebalance`.
    pub action: String,
    /// One sentence.
    pub reason: String,
    /// Workers that counted when the round started.
    pub current: RoleCountsView,
    /// Workers the deployment should have.
    pub targets: RoleCountsView,
    /// Whether placement was asked to reach `targets` (auto mode, targets changed).
    pub applied: bool,
    /// The leader replica that decided (its hostname and process).
    pub decided_by: String,
    /// Everything the planner saw and computed: inputs, predictions, corrections, per-role
    /// sizing, limits, the arithmetic lines (kvfleet_planner::DeploymentDecision).
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub detail: serde_json::Value,
}

/// Query of `GET /api/v1/planner/decisions`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::IntoParams))]
#[cfg_attr(feature = "openapi", into_params(parameter_in = Query))]
#[serde(deny_unknown_fields)]
pub struct PlannerDecisionQuery {
    /// Only this deployment's (id or name).
    pub deployment: Option<String>,
    /// Leave out `hold` decisions.
    pub changes_only: Option<bool>,
    /// Items per page: default 100, at most 500.
    #[cfg_attr(feature = "openapi", param(minimum = 1, maximum = 500))]
    pub limit: Option<u32>,
    /// The `next_cursor` of the previous page (a row id: decimal digits).
    #[cfg_attr(feature = "openapi", param(pattern = r"^[0-9]{1,18}$"))]
    pub cursor: Option<String>,
}

/// One interval of one deployment as the planner saw it, with what it decided then
/// (`GET /api/v1/deployments/{id}/planner`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PlannerPoint {
    /// The interval's end.
    pub at: DateTime<Utc>,
    /// Requests per second.
    pub rate: f64,
    /// The rate the planner predicted at this point (absent: no decision).
    pub predicted_rate: Option<f64>,
    /// TTFT at the deployment's percentile, ms.
    pub ttft_ms: Option<f64>,
    /// ITL at the deployment's percentile, ms.
    pub itl_ms: Option<f64>,
    /// The targets then.
    pub ttft_target_ms: Option<f64>,
    pub itl_target_ms: Option<f64>,
    pub percentile: f64,
    /// Workers that served in the interval.
    pub workers: RoleCountsView,
    /// The planner's targets after it (absent: no decision).
    pub targets: Option<RoleCountsView>,
    pub action: Option<String>,
}

/// A stored performance profile, without its tables (`GET /api/v1/models/{id}/profiles`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ProfileInfo {
    pub id: Uuid,
    pub model_id: Uuid,
    pub model: String,
    /// The device kind it was measured on (`profile.device`).
    pub device: String,
    pub engine: String,
    pub source: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A stored performance profile with its tables (`GET /api/v1/profiles/{id}`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct StoredProfile {
    #[serde(flatten)]
    pub info: ProfileInfo,
    pub profile: crate::profile::PerfProfile,
}

// ---------------------------------------------------------------------------------------------
// Agent protocol
// ---------------------------------------------------------------------------------------------

/// One GPU as the agent's NVML inventory reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct GpuInventory {
    /// The NVML UUID without its `GPU-` prefix (or a UUID the agent persisted for fake GPUs).
    pub id: Uuid,
    pub index: i32,
    pub name: String,
    pub memory_total_bytes: i64,
    #[serde(default)]
    pub pci_bus_id: Option<String>,
}

text_enum!(
    KeyAlgorithm {
        EcdsaP256 => "ecdsa_p256",
        Ed25519 => "ed25519",
    }
);

/// The agent's peer key. The agent keeps the private half; the control plane signs a
/// certificate for this public key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct AgentPublicKey {
    pub algorithm: KeyAlgorithm,
    /// The raw public key (SubjectPublicKeyInfo's BIT STRING: the uncompressed point for
    /// ECDSA P-256, 32 bytes for Ed25519), base64 standard encoding. rcgen's
    /// `KeyPair::public_key_raw()` gives exactly this.
    pub public_key: String,
}

/// Whether `name` is acceptable as a node's hostname ([`RegisterRequest::hostname`]): 1–253
/// letters, digits, `.` and `-`, starting and ending with a letter or digit. The agent checks its
/// configured name with this before registering, the control plane checks what it receives.
pub fn valid_hostname(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 253
        && bytes[0].is_ascii_alphanumeric()
        && bytes[bytes.len() - 1].is_ascii_alphanumeric()
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'.' || *b == b'-')
}

/// `POST /api/v1/agent/register`, with a join token (a new node) or the node's agent
/// credential (a restart: inventory refreshed, same node id).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct RegisterRequest {
    pub hostname: String,
    #[serde(default)]
    pub agent_version: Option<String>,
    /// The OpenAI frontend, `host:port`.
    #[serde(default)]
    pub frontend_addr: Option<String>,
    /// The QUIC peer endpoint, `host:port`.
    #[serde(default)]
    pub peer_addr: Option<String>,
    /// Every address of the node (become certificate SANs when they are IPs).
    #[serde(default)]
    pub addresses: Vec<String>,
    #[serde(default)]
    pub cpu_slots: i32,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub gpus: Vec<GpuInventory>,
    /// Absent: the control plane generates the key pair and returns the private key (simpler,
    /// but the key crosses the network; send a public key in production).
    #[serde(default)]
    pub public_key: Option<AgentPublicKey>,
}

/// A peer certificate issued by the node CA.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct IssuedCertificate {
    /// Lowercase hex, 32 digits.
    pub serial: String,
    pub cert_pem: String,
    pub ca_cert_pem: String,
    /// Only when the request carried no public key.
    pub private_key_pem: Option<String>,
    pub not_before: DateTime<Utc>,
    pub not_after: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RegisterResponse {
    pub node_id: Uuid,
    /// The node's agent credential (bearer token for every later call). Present when
    /// registering with a join token; shown once.
    pub credential: Option<String>,
    /// The peer certificate; absent while the node waits for an admin's approval (the agent
    /// asks for one through `POST /agent/certificate` once a heartbeat says `approved`).
    #[serde(default)]
    pub certificate: Option<IssuedCertificate>,
    #[serde(default = "NodeApproval::approved")]
    pub approval: NodeApproval,
    pub heartbeat_interval_ms: u64,
    pub desired_generation: i64,
}

/// `POST /api/v1/agent/certificate`: renew the peer certificate.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct RenewRequest {
    #[serde(default)]
    pub public_key: Option<AgentPublicKey>,
}

/// Serving metrics of one worker over the last heartbeat interval.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct WorkerMetrics {
    /// Requests per second.
    pub request_rate: f32,
    #[serde(default)]
    pub ttft_p50_ms: Option<f32>,
    #[serde(default)]
    pub ttft_p99_ms: Option<f32>,
    #[serde(default)]
    pub itl_p50_ms: Option<f32>,
    #[serde(default)]
    pub itl_p99_ms: Option<f32>,
    /// Generated tokens per second.
    pub tokens_per_s: f32,
    pub kv_blocks_used: i64,
    pub kv_blocks_total: i64,
    /// 0..=1
    #[serde(default)]
    pub prefix_hit_rate: Option<f32>,
    /// 0..=1
    #[serde(default)]
    pub gpu_utilization: Option<f32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ObservedWorker {
    pub worker_id: i64,
    pub state: ObservedWorkerState,
    /// Why it is `failed` or `starting` again: the agent's last reason (an engine server that
    /// does not start, a worker process that died). Absent from older agents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Its engine and version (`llamacpp b1-0c1e570`), once it has started. Absent from older
    /// agents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine: Option<String>,
    #[serde(default)]
    pub metrics: Option<WorkerMetrics>,
    /// What the worker served since the previous heartbeat, as sums and mergeable
    /// histograms (the planner's input). Absent from older agents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<WorkerWindow>,
}

/// One worker's serving over one heartbeat window: sums and latency histograms with the
/// shared bounds of [`crate::histogram`], never percentiles, so the control plane can add up
/// any set of workers and windows. Rates and means follow from the sums: request rate =
/// `requests / seconds`, mean ISL = `prompt_tokens / requests`, mean OSL = `output_tokens /
/// finished`, prefix hit rate = `cached_tokens / prompt_tokens`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct WorkerWindow {
    /// The window's length, seconds (> 0).
    pub seconds: f64,
    /// Requests admitted.
    pub requests: u64,
    /// Their prompt tokens.
    pub prompt_tokens: u64,
    /// Of those, tokens found in the prefix cache.
    pub cached_tokens: u64,
    /// Requests finished.
    pub finished: u64,
    /// Their output tokens.
    pub output_tokens: u64,
    /// Time to first token of the first tokens in the window.
    #[cfg_attr(feature = "openapi", schema(value_type = crate::histogram::RawHistogram))]
    pub ttft: crate::histogram::LatencyHistogram,
    /// Gaps between consecutive tokens in the window.
    #[cfg_attr(feature = "openapi", schema(value_type = crate::histogram::RawHistogram))]
    pub itl: crate::histogram::LatencyHistogram,
    /// Requests waiting for admission at the end.
    pub queue_depth: u64,
    /// Prompt tokens admitted but not yet prefilled at the end.
    pub pending_prefill_tokens: u64,
    /// KV blocks in use and in all at the end.
    pub kv_blocks_used: u64,
    pub kv_blocks_total: u64,
}

impl WorkerWindow {
    /// What is wrong with the window, if anything (the histograms were checked when parsed).
    pub fn invalid_reason(&self) -> Option<&'static str> {
        if !(self.seconds.is_finite() && self.seconds > 0.0 && self.seconds <= 3600.0) {
            return Some("seconds must be above 0 and at most 3600");
        }
        if self.cached_tokens > self.prompt_tokens {
            return Some("cached_tokens must not exceed prompt_tokens");
        }
        if self.kv_blocks_used > self.kv_blocks_total {
            return Some("kv_blocks_used must not exceed kv_blocks_total");
        }
        None
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct GpuStatus {
    pub id: Uuid,
    pub utilization: Option<f32>,
    pub memory_used_bytes: Option<i64>,
}

/// `POST /api/v1/agent/heartbeat`: what the node observes now.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    #[serde(default)]
    pub workers: Vec<ObservedWorker>,
    #[serde(default)]
    pub gpus: Vec<GpuStatus>,
    /// Where other agents reach this node's QUIC peer endpoint (`host:port`), once it listens.
    /// Absent: unchanged (older agents never send it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_addr: Option<String>,
}

/// `GET /api/v1/agent/fleet`: every running worker of the fleet and how to reach its node, so
/// each agent's router can send a request to any worker.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct FleetDirectory {
    pub workers: Vec<FleetWorker>,
    /// One entry per deployed model: how it is served. Absent from older control planes.
    #[serde(default)]
    pub models: Vec<FleetModel>,
}

/// How one model of the [`FleetDirectory`] is served.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct FleetModel {
    /// The model's name, as requests name it.
    pub model: String,
    pub mode: DeploymentMode,
    /// The deployment's policy (meaningful when `mode` is `disaggregated`).
    pub disaggregation: DisaggregationPolicy,
    /// How many times a request whose worker is lost mid-stream may resume on another.
    #[serde(default = "default_migration_limit")]
    pub migration_limit: u32,
}

/// The `migration_limit` of a deployment that sets none: how many times a request whose worker
/// (or node) is lost mid-stream resumes on another before it fails.
pub const DEFAULT_MIGRATION_LIMIT: u32 = 3;

/// The most a deployment's `migration_limit` may be.
pub const MAX_MIGRATION_LIMIT: u32 = 20;

fn default_migration_limit() -> u32 {
    DEFAULT_MIGRATION_LIMIT
}

/// One worker in the [`FleetDirectory`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct FleetWorker {
    pub worker_id: i64,
    pub node_id: Uuid,
    /// The model's name, as requests name it.
    pub model: String,
    pub role: WorkerRole,
    /// `ready` when it serves.
    pub observed_state: ObservedWorkerState,
    /// The node's QUIC peer endpoint; absent until its agent reports one.
    pub peer_addr: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct HeartbeatResponse {
    pub node_state: NodeState,
    /// `pending`: the node waits for an admin (`kvfleet nodes approve <id>`); it runs nothing
    /// and has no peer certificate meanwhile.
    #[serde(default = "NodeApproval::approved")]
    pub approval: NodeApproval,
    /// When above the generation the agent holds, fetch the desired state.
    pub desired_generation: i64,
    pub heartbeat_interval_ms: u64,
    /// Every revoked node certificate serial that has not expired yet (lowercase hex). The
    /// agent's peer endpoint refuses them and closes open connections from them, so a revoked
    /// node is cut off within one heartbeat interval.
    #[serde(default)]
    pub revoked_serials: Vec<String>,
}

/// What one worker on this node should be.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DesiredWorker {
    pub worker_id: i64,
    pub deployment_id: Uuid,
    pub deployment: String,
    pub model: ModelSpec,
    pub role: WorkerRole,
    /// Absent: a CPU slot.
    pub gpu_id: Option<Uuid>,
    pub desired_state: DesiredWorkerState,
}

/// What an engine needs to load a model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ModelSpec {
    pub name: String,
    pub format: ModelFormat,
    pub path: String,
    pub block_size: i32,
    pub context_length: Option<i32>,
    /// The deployment's tool-call format (absent from older control planes: `auto`).
    #[serde(default = "tool_parser_auto")]
    pub tool_parser: ToolParser,
    /// The deployment's reasoning format (absent from older control planes: `auto`).
    #[serde(default = "reasoning_parser_auto")]
    pub reasoning_parser: ReasoningParser,
}

/// `GET /api/v1/agent/desired-state`: the node's whole desired state at `generation`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DesiredState {
    pub node_id: Uuid,
    pub generation: i64,
    pub node_state: NodeState,
    pub draining: bool,
    pub workers: Vec<DesiredWorker>,
    /// The fleet's hash secret: every block hash the node computes is keyed with it, so the
    /// KV index does not tell a reader which prompts share a prefix. Derived by the control
    /// plane from its CA sealing key (every replica derives the same one); absent from an
    /// older control plane (the node then hashes unkeyed). Never logged (`Debug` redacts it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>, min_length = 16))]
    pub fleet_hash_secret: Option<crate::hash::FleetHashSecret>,
}

/// Long-poll parameters of `GET /api/v1/agent/desired-state`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::IntoParams))]
#[cfg_attr(feature = "openapi", into_params(parameter_in = Query))]
#[serde(deny_unknown_fields)]
pub struct WatchQuery {
    /// The generation the agent holds: the call returns as soon as the node's generation
    /// differs from it (normally: is above it), or after `wait_s` with the current state.
    /// Absent: return at once.
    pub after_generation: Option<i64>,
    /// Seconds to wait, at most [`MAX_WAIT_S`] (and capped by the server's `watch.max_wait`).
    #[cfg_attr(feature = "openapi", param(maximum = 3600))]
    pub wait_s: Option<u64>,
}

/// The longest `wait_s` a long poll (`/agent/desired-state`, `/agent/kv-stream`) accepts; a
/// larger one is refused (422) instead of silently meaning "the server's cap".
pub const MAX_WAIT_S: u64 = 3600;

// ---------------------------------------------------------------------------------------------
// Fleet metrics
// ---------------------------------------------------------------------------------------------

/// A time window and resolution for metrics queries.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::IntoParams))]
#[cfg_attr(feature = "openapi", into_params(parameter_in = Query))]
#[serde(deny_unknown_fields)]
pub struct MetricsQuery {
    /// Start (RFC 3339); default: one hour ago.
    pub since: Option<DateTime<Utc>>,
    /// End (RFC 3339); default: now.
    pub until: Option<DateTime<Utc>>,
    /// Bucket width in seconds (default 60, at least 1).
    #[cfg_attr(feature = "openapi", param(minimum = 1))]
    pub step_s: Option<i64>,
}

/// One bucket of metrics. For a deployment: rates, tokens/s and KV blocks are summed over
/// workers; p50s are averaged over workers and p99s are the worst worker's (an upper bound, not
/// a true fleet percentile); hit rate and utilization are averaged.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct MetricsPoint {
    pub at: DateTime<Utc>,
    pub request_rate: f64,
    pub ttft_p50_ms: Option<f64>,
    pub ttft_p99_ms: Option<f64>,
    pub itl_p50_ms: Option<f64>,
    pub itl_p99_ms: Option<f64>,
    pub tokens_per_s: f64,
    pub kv_blocks_used: f64,
    pub kv_blocks_total: f64,
    pub prefix_hit_rate: Option<f64>,
    pub gpu_utilization: Option<f64>,
    pub workers: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct MetricsSeries {
    /// `raw` (heartbeat samples) or `rollup` (downsampled buckets, for windows reaching past
    /// raw retention).
    pub source: String,
    pub step_s: i64,
    pub points: Vec<MetricsPoint>,
}

/// `GET /api/v1/status`: this replica.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Status {
    pub version: String,
    /// Whether this replica holds the leader lock (runs placement and liveness).
    pub leader: bool,
    pub schema_version: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disaggregation_policy_defaults_fill_absent_fields() {
        let new: NewDeployment =
            serde_json::from_str(r#"{"name":"d","model":"m"}"#).expect("no policy given");
        assert_eq!(new.disaggregation, DisaggregationPolicy::default());
        assert_eq!(new.disaggregation.min_remote_prefill_tokens, 256);
        assert_eq!(new.disaggregation.max_prefill_queue_tokens, 16384);
        assert_eq!(new.disaggregation.prefill_timeout_ms, 30_000);

        let partial: DisaggregationPolicy =
            serde_json::from_str(r#"{"min_remote_prefill_tokens":0}"#).expect("partial");
        assert_eq!(partial.min_remote_prefill_tokens, 0);
        assert_eq!(partial.prefill_timeout_ms, 30_000);

        let typo = serde_json::from_str::<DisaggregationPolicy>(r#"{"min_remote_prefill":1}"#);
        assert!(typo.unwrap_err().to_string().contains("min_remote_prefill"));
    }

    #[test]
    fn disaggregation_policy_validation_names_the_field() {
        let ok = DisaggregationPolicy::default();
        assert!(ok.invalid_fields().is_empty());
        let rows: [(u32, u32, &[&str]); 5] = [
            (99, 1, &["disaggregation.prefill_timeout_ms"]),
            (100, 1, &[]),
            (600_000, 1, &[]),
            (1000, 0, &["disaggregation.max_prefill_queue_tokens"]),
            (
                600_001,
                0,
                &[
                    "disaggregation.prefill_timeout_ms",
                    "disaggregation.max_prefill_queue_tokens",
                ],
            ),
        ];
        for (timeout, queue, expected) in rows {
            let policy = DisaggregationPolicy {
                prefill_timeout_ms: timeout,
                max_prefill_queue_tokens: queue,
                ..ok
            };
            let fields: Vec<&str> = policy.invalid_fields().into_iter().map(|p| p.0).collect();
            assert_eq!(fields, expected, "{policy:?}");
        }
    }

    #[test]
    fn fleet_directory_without_models_still_parses() {
        let old: FleetDirectory = serde_json::from_str(r#"{"workers":[]}"#).expect("old body");
        assert!(old.models.is_empty());
    }
}
