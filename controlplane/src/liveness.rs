//! Node liveness: which state a node's heartbeat silence puts it in. Pure; the leader's
//! liveness loop ([`crate::leader`]) applies the transitions, and a heartbeat makes a node
//! healthy again.
//!
//! `joining`/`healthy` --silence ≥ unhealthy_after--> `unhealthy` (no new workers)
//! --silence ≥ lost_after--> `lost` (its workers are marked lost and placed elsewhere).
//! `removed` is final and never changes here.

use std::time::Duration;

use crate::config::LivenessConfig;
use kvfleet_proto::api::NodeState;

/// The state `current` should move to after `silence` without a heartbeat, if any.
pub fn assess(current: NodeState, silence: Duration, config: &LivenessConfig) -> Option<NodeState> {
    let next = match current {
        NodeState::Removed | NodeState::Lost => return None,
        _ if silence >= config.lost_after => NodeState::Lost,
        NodeState::Joining | NodeState::Healthy if silence >= config.unhealthy_after => {
            NodeState::Unhealthy
        }
        _ => return None,
    };
    Some(next)
}

/// The silence that justifies moving to `state` (re-checked in SQL when applying, so a
/// heartbeat that lands in between wins).
pub fn threshold(state: NodeState, config: &LivenessConfig) -> Duration {
    match state {
        NodeState::Lost => config.lost_after,
        _ => config.unhealthy_after,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transitions_table() {
        let config = LivenessConfig {
            heartbeat_interval: Duration::from_secs(1),
            unhealthy_after: Duration::from_secs(5),
            lost_after: Duration::from_secs(30),
            check_interval: Duration::from_secs(1),
        };
        let s = Duration::from_secs;
        use NodeState::*;
        let cases = [
            (Healthy, s(0), None),
            (Healthy, s(4), None),
            (Healthy, s(5), Some(Unhealthy)),
            (Healthy, s(31), Some(Lost)),
            (Joining, s(6), Some(Unhealthy)),
            (Unhealthy, s(6), None),
            (Unhealthy, s(30), Some(Lost)),
            (Lost, s(3000), None),
            (Removed, s(3000), None),
        ];
        for (current, silence, want) in cases {
            assert_eq!(
                assess(current, silence, &config),
                want,
                "{current} after {silence:?}"
            );
            if let Some(next) = want {
                assert!(silence >= threshold(next, &config));
            }
        }
    }
}
