//! What the planner sees of one deployment over one interval, and worker counts per role.
//!
//! An [`Observation`] is made of sums and mergeable histograms, never of precomputed means or
//! percentiles, so the observations of many workers (or many heartbeat windows) add up with
//! [`Observation::merge`]: the control plane merges its agents' heartbeats into one per
//! deployment and interval, and the simulator builds them directly.

use std::time::Duration;

use kvfleet_proto::api::WorkerRole;
use kvfleet_proto::histogram::LatencyHistogram;
use serde::{Deserialize, Serialize};

use crate::secs;

/// One value per worker role. Indexing by [`WorkerRole`] reads and writes one of them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PerRole<T> {
    /// Workers that prefill and decode.
    #[serde(default)]
    pub aggregated: T,
    /// Prefill-only workers (disaggregated deployments).
    #[serde(default)]
    pub prefill: T,
    /// Decode workers (disaggregated deployments).
    #[serde(default)]
    pub decode: T,
}

/// Workers per role.
pub type RoleCounts = PerRole<u32>;

impl<T> PerRole<T> {
    /// The value of `role`, by reference.
    pub fn get_ref(&self, role: WorkerRole) -> &T {
        match role {
            WorkerRole::Aggregated => &self.aggregated,
            WorkerRole::Prefill => &self.prefill,
            WorkerRole::Decode => &self.decode,
        }
    }

    /// The value of `role`, mutably.
    pub fn get_mut(&mut self, role: WorkerRole) -> &mut T {
        match role {
            WorkerRole::Aggregated => &mut self.aggregated,
            WorkerRole::Prefill => &mut self.prefill,
            WorkerRole::Decode => &mut self.decode,
        }
    }
}

impl<T: Copy> PerRole<T> {
    /// The value of `role`.
    pub fn get(&self, role: WorkerRole) -> T {
        *self.get_ref(role)
    }

    /// A copy with `role` set to `value`.
    pub fn with(mut self, role: WorkerRole, value: T) -> Self {
        *self.get_mut(role) = value;
        self
    }

    /// `(role, value)` for each role, in [`WorkerRole::ALL`] order.
    pub fn iter(&self) -> impl Iterator<Item = (WorkerRole, T)> + '_ {
        WorkerRole::ALL.iter().map(|&r| (r, self.get(r)))
    }
}

impl PerRole<u32> {
    /// Workers of every role.
    pub fn total(&self) -> u32 {
        self.aggregated
            .saturating_add(self.prefill)
            .saturating_add(self.decode)
    }
}

/// One deployment over one interval: the load that arrived, the latency it got and the state
/// of the workers at the end.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Observation {
    /// When the interval ended (time since the caller's epoch).
    #[serde(with = "secs")]
    pub end: Duration,
    /// How long it was.
    #[serde(with = "secs")]
    pub length: Duration,
    /// Requests that arrived (were admitted by a worker) during the interval.
    pub requests: u64,
    /// Their prompt tokens.
    pub prompt_tokens: u64,
    /// The part of those prompt tokens found in a prefix cache.
    pub cached_tokens: u64,
    /// Requests that finished during the interval.
    pub finished: u64,
    /// Output tokens of the requests that finished.
    pub output_tokens: u64,
    /// Time to first token of the first tokens emitted during the interval.
    pub ttft: LatencyHistogram,
    /// Inter-token latencies of the tokens emitted during the interval.
    pub itl: LatencyHistogram,
    /// Requests waiting for admission at the end of the interval (all workers).
    pub queue_depth: u64,
    /// Prompt tokens admitted but not yet prefilled at the end of the interval (all workers).
    pub pending_prefill_tokens: u64,
    /// KV blocks in use at the end of the interval, per role (sum over its workers).
    pub kv_blocks_used: PerRole<u64>,
    /// KV blocks in all, per role.
    pub kv_blocks_total: PerRole<u64>,
    /// Workers that served (were ready) during the interval.
    pub workers: RoleCounts,
}

impl Observation {
    /// Adds another source's observation of the same interval (another worker): sums add,
    /// histograms merge, worker counts add; the interval is the union of both. (Merging two
    /// windows of the same workers counts them twice: set `workers` afterwards.)
    pub fn merge(&mut self, other: &Observation) {
        let start = self
            .end
            .saturating_sub(self.length)
            .min(other.end.saturating_sub(other.length));
        self.end = self.end.max(other.end);
        self.length = self.end.saturating_sub(start);
        self.requests += other.requests;
        self.prompt_tokens += other.prompt_tokens;
        self.cached_tokens += other.cached_tokens;
        self.finished += other.finished;
        self.output_tokens += other.output_tokens;
        self.ttft.merge(&other.ttft);
        self.itl.merge(&other.itl);
        self.queue_depth += other.queue_depth;
        self.pending_prefill_tokens += other.pending_prefill_tokens;
        for role in WorkerRole::ALL {
            *self.kv_blocks_used.get_mut(*role) += other.kv_blocks_used.get(*role);
            *self.kv_blocks_total.get_mut(*role) += other.kv_blocks_total.get(*role);
            *self.workers.get_mut(*role) += other.workers.get(*role);
        }
    }

    /// Requests per second.
    pub fn request_rate(&self) -> f64 {
        let s = self.length.as_secs_f64();
        if s > 0.0 {
            self.requests as f64 / s
        } else {
            0.0
        }
    }

    /// Mean prompt length, tokens (`None` without requests).
    pub fn mean_isl(&self) -> Option<f64> {
        (self.requests > 0).then(|| self.prompt_tokens as f64 / self.requests as f64)
    }

    /// Mean output length of the finished requests, tokens (`None` without any).
    pub fn mean_osl(&self) -> Option<f64> {
        (self.finished > 0).then(|| self.output_tokens as f64 / self.finished as f64)
    }

    /// Share of prompt tokens found in a prefix cache (`None` without requests).
    pub fn prefix_hit_rate(&self) -> Option<f64> {
        (self.prompt_tokens > 0).then(|| self.cached_tokens as f64 / self.prompt_tokens as f64)
    }

    /// Fraction of `role`'s KV blocks in use at the end of the interval.
    pub fn kv_use(&self, role: WorkerRole) -> Option<f64> {
        let total = self.kv_blocks_total.get(role);
        (total > 0).then(|| self.kv_blocks_used.get(role) as f64 / total as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_merge_into_the_union() {
        let mut a = Observation {
            end: Duration::from_secs(60),
            length: Duration::from_secs(30),
            requests: 30,
            prompt_tokens: 3000,
            cached_tokens: 1000,
            finished: 10,
            output_tokens: 500,
            workers: RoleCounts::default().with(WorkerRole::Aggregated, 1),
            ..Observation::default()
        };
        a.ttft.observe_seconds(0.2);
        let mut b = a.clone();
        b.requests = 60;
        b.prompt_tokens = 3000;
        b.cached_tokens = 2000;
        b.ttft.observe_seconds(0.4);
        a.merge(&b);
        assert_eq!(a.length, Duration::from_secs(30));
        assert!((a.request_rate() - 3.0).abs() < 1e-9);
        assert_eq!(a.mean_isl(), Some(6000.0 / 90.0));
        assert_eq!(a.prefix_hit_rate(), Some(0.5));
        assert_eq!(a.mean_osl(), Some(50.0));
        assert_eq!(a.ttft.count(), 3);
        assert_eq!(a.workers.aggregated, 2);
        let json = serde_json::to_string(&a).unwrap();
        assert_eq!(serde_json::from_str::<Observation>(&json).unwrap(), a);
    }

    #[test]
    fn empty_intervals_have_no_means() {
        let o = Observation::default();
        assert_eq!(o.request_rate(), 0.0);
        assert_eq!(o.mean_isl(), None);
        assert_eq!(o.mean_osl(), None);
        assert_eq!(o.prefix_hit_rate(), None);
        assert_eq!(o.kv_use(WorkerRole::Decode), None);
    }
}
