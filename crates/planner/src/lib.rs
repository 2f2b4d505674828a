//! The SLA planner: from what each deployment observed, a performance profile of its workers
//! and the operator's policy, how many prefill, decode and aggregated workers each deployment
//! needs to hold its TTFT and ITL targets at the fewest GPUs — and why, in words.
//!
//! Pure: [`plan`]`(observations, profiles, policy, now) -> Decision`. No IO, no clock, no
//! randomness: the control plane's leader calls it every interval with what it read from
//! Postgres, the simulator with virtual time; both get the same answer for the same input.
//!
//! - [`observe`]: [`Observation`], one deployment over one interval (sums and mergeable latency
//!   histograms), and [`RoleCounts`].
//! - [`predict`]: load predictors behind [`LoadPredictor`] — last value, EWMA, damped Holt and
//!   seasonal Holt–Winters — and their one-step error measurement.
//! - [`model`]: the capacity model: TTFT from an M/M/n prefill queue over the profile's prefill
//!   times, ITL from the decode batch that Little's law implies, aggregated workers paying both;
//!   [`model::workers_needed`] inverts it.
//! - [`correction`]: correction factors (prefill speed, TTFT spread, decode speed) fitted to
//!   each interval, bounded and smoothed.
//! - [`policy`]: SLA, bounds, planner mode per deployment; the GPU budget and tunables.
//! - [`plan`]: the round itself — correct, predict, size, stabilise (fast up, cooldown and
//!   hysteresis down), bound, budget — and the explained [`Decision`].
//! - [`dynamo`]: Dynamo's SLA-planner algorithm, the simulator's baseline.
//!
//! ```
//! use std::collections::BTreeMap;
//! use std::time::Duration;
//! use kvfleet_planner::{plan, DeploymentObservations, FleetPolicy, Observation, PlannerConfig,
//!     RoleCounts, policy::{Bounds, DeploymentPolicy, RoleBounds, Sla}};
//! use kvfleet_proto::api::{DeploymentMode, PlannerMode};
//! use kvfleet_proto::profile::PerfProfile;
//!
//! let profile = PerfProfile::from_toml_str(include_str!(
//!     "../../engine/profiles/llama-3.1-8b-h100.perf.toml"))?;
//! let policy = FleetPolicy {
//!     config: PlannerConfig::default(),
//!     gpu_budget: Some(64),
//!     deployments: vec![DeploymentPolicy {
//!         name: "chat".into(),
//!         mode: DeploymentMode::Aggregated,
//!         planner: PlannerMode::Auto,
//!         sla: Sla { ttft_ms: Some(2000.0), itl_ms: Some(25.0), percentile: 90.0 },
//!         workers: Bounds { min: 1, max: 32 },
//!         roles: RoleBounds::default(),
//!     }],
//! };
//! // Half a minute of 10 requests/s of 8k-token prompts on one worker.
//! let interval = Observation {
//!     end: Duration::from_secs(30),
//!     length: Duration::from_secs(30),
//!     requests: 300, prompt_tokens: 300 * 8192, finished: 300, output_tokens: 300 * 200,
//!     workers: RoleCounts { aggregated: 1, ..RoleCounts::default() },
//!     ..Observation::default()
//! };
//! let history = [interval];
//! let observations = [DeploymentObservations {
//!     deployment: "chat", history: &history,
//!     running: RoleCounts { aggregated: 1, ..RoleCounts::default() }, previous: None,
//! }];
//! let profiles = BTreeMap::from([("chat".to_owned(), profile)]);
//! let decision = plan(&observations, &profiles, &policy, Duration::from_secs(30));
//! let chat = &decision.deployments[0];
//! assert!(chat.targets.aggregated > 1);
//! assert!(chat.reason.starts_with("Scaling up aggregated workers 1 → "), "{}", chat.reason);
//! # Ok::<(), kvfleet_proto::profile::ProfileError>(())
//! ```

pub mod correction;
pub mod dynamo;
pub mod model;
pub mod observe;
pub mod plan;
pub mod policy;
pub mod predict;

pub use model::{Binding, Corrections, Load};
pub use observe::{Observation, PerRole, RoleCounts};
pub use plan::{Action, Decision, DeploymentDecision, DeploymentObservations, Limit, Memory, plan};
pub use policy::{Algorithm, DeploymentPolicy, FleetPolicy, PlannerConfig, Sla};
pub use predict::{LoadPredictor, PredictorKind};

/// Serde for [`std::time::Duration`] as seconds (a float), the way decisions are stored.
pub mod secs {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    /// Writes seconds.
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }

    /// Reads seconds; negative or non-finite values are an error.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let v = f64::deserialize(d)?;
        Duration::try_from_secs_f64(v).map_err(serde::de::Error::custom)
    }

    /// The same for `Option<Duration>` (`null` for `None`).
    pub mod option {
        use std::time::Duration;

        use serde::{Deserialize, Deserializer, Serializer};

        /// Writes seconds or `null`.
        pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
            match d {
                Some(d) => s.serialize_some(&d.as_secs_f64()),
                None => s.serialize_none(),
            }
        }

        /// Reads seconds or `null`.
        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
            Option::<f64>::deserialize(d)?
                .map(|v| Duration::try_from_secs_f64(v).map_err(serde::de::Error::custom))
                .transpose()
        }
    }
}
