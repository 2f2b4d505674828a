//! Router configuration: the routing mode and the weights of the cost function.
//!
//! Parsed once by the driver (agent config, simulator scenario) and handed to
//! [`crate::Router::new`]; the router never reads configuration from anywhere else.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use kvfleet_proto::BlockSize;
use serde::{Deserialize, Serialize};

/// How the router picks a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RoutingMode {
    /// Lowest predicted time (the default): each candidate's queue, the prefill of the part of
    /// the prompt it does not cache and the onboarding of what it holds in lower tiers, from its
    /// performance profile, plus the decode slowdown the request causes there. See
    /// [`crate::cost`].
    #[default]
    Kv,
    /// Dynamo's cost, in blocks: `overlap_weight × new_prefill_blocks + active_decode_blocks`
    /// (plus queued prefill blocks and queue depth); ties to the less loaded, then the lower id.
    /// Kept so that the comparison with the time-based `kv` stays one flag away.
    KvBlocks,
    /// Each candidate in turn, in worker-id order.
    RoundRobin,
    /// Uniformly at random (seeded).
    Random,
    /// Lowest load, ignoring cached prefixes.
    LeastLoaded,
    /// Like `kv`, but without events: the index holds the router's own predictions (a request's
    /// blocks are assumed cached on the worker it was sent to) and they expire after
    /// [`RouterConfig::approx_ttl`].
    Approximate,
}

impl RoutingMode {
    /// Every mode, in the order of the docs.
    pub const ALL: [RoutingMode; 6] = [
        RoutingMode::Kv,
        RoutingMode::KvBlocks,
        RoutingMode::RoundRobin,
        RoutingMode::Random,
        RoutingMode::LeastLoaded,
        RoutingMode::Approximate,
    ];

    /// The mode's name in config files, flags and metrics labels.
    pub const fn as_str(self) -> &'static str {
        match self {
            RoutingMode::Kv => "kv",
            RoutingMode::KvBlocks => "kv-blocks",
            RoutingMode::RoundRobin => "round-robin",
            RoutingMode::Random => "random",
            RoutingMode::LeastLoaded => "least-loaded",
            RoutingMode::Approximate => "approximate",
        }
    }
}

impl fmt::Display for RoutingMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A routing mode name that is not one of [`RoutingMode::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown routing mode {0:?}: expected kv, kv-blocks, round-robin, random, least-loaded or \
     approximate"
)]
pub struct UnknownMode(pub String);

impl FromStr for RoutingMode {
    type Err = UnknownMode;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        RoutingMode::ALL
            .into_iter()
            .find(|mode| mode.as_str() == s)
            .ok_or_else(|| UnknownMode(s.to_owned()))
    }
}

impl RoutingMode {
    /// Whether the mode routes by predicted time ([`crate::cost`]) rather than by blocks, load
    /// or turn.
    pub const fn is_time_based(self) -> bool {
        matches!(self, RoutingMode::Kv | RoutingMode::Approximate)
    }
}

/// Everything the router needs to know up front.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RouterConfig {
    /// How to pick a worker.
    pub mode: RoutingMode,
    /// Tokens per KV block of the model this router serves.
    pub block_size: BlockSize,
    /// `kv-blocks`: cost of one block of prefill relative to one active decode block.
    pub overlap_weight: f64,
    /// `kv-blocks`: cost of one block of prefill already queued on a worker (other requests'
    /// uncached prompt tokens, from load reports and own decisions).
    pub prefill_queue_weight: f64,
    /// `kv-blocks`: cost, in blocks, of each request waiting in a worker's queue.
    pub queue_depth_weight: f64,
    /// `kv`: how much one millisecond of delay that the request adds to the streams already
    /// decoding on a worker (its prefill stalls their next token; its decode slows every step)
    /// counts against one millisecond of its own time to first token. 0 routes on TTFT alone.
    pub itl_weight: f64,
    /// `kv`: output tokens to assume for a request that does not say how many it expects
    /// ([`crate::RouteRequest::with_output_tokens`]); it sizes the decode slowdown term.
    pub default_output_tokens: u32,
    /// `kv`: candidates whose predicted cost is within this fraction of the cheapest one's are
    /// treated as tied, and the tie is broken so that requests spread (see [`crate::cost`]).
    pub tie_fraction: f64,
    /// `kv`: ... or within this many milliseconds of it.
    pub tie_ms: f64,
    /// `kv`: how fast a worker without a performance profile learns the scale of its times
    /// (an exponential average of `ln(actual / predicted)` TTFTs, weight of each new sample) on
    /// top of the nominal placeholder; 0 (the default) never learns. Off by default because the
    /// factor is learned per worker from the requests it served, so a worker that has served
    /// nothing yet keeps the placeholder's scale and looks faster than the measured ones.
    /// Workers with a profile keep its figures.
    pub learn_rate: f64,
    /// Softmax temperature over normalised costs; 0 always picks the cheapest.
    pub temperature: f64,
    /// `kv-blocks`: how much a cached block in each tier (G1..G4) is worth relative to
    /// recomputing it (1.0): a block that must first be copied up from host memory, disk or a
    /// peer saves less. (`kv` uses the profile's onboarding cost per tier instead; a tier the
    /// profile has no figure for is weighted by this.)
    pub tier_weights: [f64; 4],
    /// Seeds the router's random choices (softmax, `random` mode) and keys its index hash.
    /// Tests fix it; a production driver passes a random value.
    pub seed: u64,
    /// An own decision stops counting towards a worker's load this long after it was made if
    /// the driver never reported the request finished (a lost `finished` call must not leave a
    /// worker looking busy forever).
    pub inflight_timeout: Duration,
    /// How long a predicted block stays in the index in `approximate` mode.
    pub approx_ttl: Duration,
    /// A load report at time `t` is taken to include own decisions made up to `t - report_lag`;
    /// later decisions are added on top of it.
    pub report_lag: Duration,
    /// Check that each `Stored` event's blocks chain (`seq[i] = chain(seq[i-1], local[i])`).
    /// An engine hashing differently from `kvfleet_proto::hash` would otherwise never produce a
    /// hit, silently.
    pub verify_chains: bool,
    /// A worker is overloaded when its active decode blocks plus the request's blocks exceed
    /// this fraction of its KV capacity (when the capacity is known).
    pub overload_fraction: f64,
    /// How many candidates' cost breakdowns a [`crate::Decision`] keeps (cheapest first; the
    /// chosen worker is always kept).
    pub breakdown_limit: usize,
}

impl Default for RouterConfig {
    fn default() -> Self {
        Self {
            mode: RoutingMode::Kv,
            block_size: BlockSize::default(),
            overlap_weight: 1.0,
            prefill_queue_weight: 1.0,
            queue_depth_weight: 1.0,
            itl_weight: 0.01,
            default_output_tokens: 128,
            tie_fraction: 0.02,
            tie_ms: 1.0,
            learn_rate: 0.0,
            temperature: 0.0,
            tier_weights: [1.0, 0.8, 0.6, 0.4],
            seed: 0x6b76_666c_6565_7472,
            inflight_timeout: Duration::from_secs(600),
            approx_ttl: Duration::from_secs(120),
            report_lag: Duration::ZERO,
            verify_chains: true,
            overload_fraction: 1.0,
            breakdown_limit: 16,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_round_trip_through_text_and_json() {
        for mode in RoutingMode::ALL {
            assert_eq!(mode.as_str().parse::<RoutingMode>(), Ok(mode));
            let json = serde_json::to_string(&mode).unwrap();
            assert_eq!(json, format!("\"{mode}\""));
        }
        assert!("kv-aware".parse::<RoutingMode>().is_err());
    }

    #[test]
    fn config_fills_defaults_and_rejects_unknown_fields() {
        let config: RouterConfig =
            serde_json::from_str(r#"{"mode":"least-loaded","block_size":32}"#).unwrap();
        assert_eq!(config.mode, RoutingMode::LeastLoaded);
        assert_eq!(config.block_size.get(), 32);
        assert_eq!(config.overlap_weight, 1.0);
        assert!(serde_json::from_str::<RouterConfig>(r#"{"overlap":2}"#).is_err());
    }
}
