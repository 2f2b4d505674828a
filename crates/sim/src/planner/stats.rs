//! What the simulator counts during one planner interval: the observation the planner gets
//! (sums and the shared latency histograms, as heartbeats carry them) and the exact latency
//! percentiles the report judges the interval by.

use std::time::Duration;

use kvfleet_planner::Observation;
use kvfleet_proto::histogram::LatencyHistogram;

use super::Measured;
use crate::stats::{LogHistogram, quantile};

/// Accumulators of one interval.
#[derive(Debug, Default)]
pub(crate) struct IntervalStats {
    arrivals: u64,
    prompt_tokens: u64,
    cached_tokens: u64,
    finished: u64,
    output_tokens: u64,
    ttft: LatencyHistogram,
    itl: LatencyHistogram,
    /// Exact TTFTs, seconds.
    ttft_exact: Vec<f64>,
    /// ITLs, µs, in 0.5% buckets.
    itl_fine: LogHistogram,
}

impl IntervalStats {
    /// A request arrived with a prompt of `prompt_tokens`.
    pub(crate) fn arrived(&mut self, prompt_tokens: u64) {
        self.arrivals += 1;
        self.prompt_tokens += prompt_tokens;
    }

    /// A request was routed to a worker predicted to hold `cached_tokens` of its prompt.
    pub(crate) fn routed(&mut self, cached_tokens: u64) {
        self.cached_tokens += cached_tokens;
    }

    /// A first token came `ttft_s` after its request arrived.
    pub(crate) fn first_token(&mut self, ttft_s: f64) {
        let ttft_s = ttft_s.max(0.0);
        self.ttft.observe_seconds(ttft_s);
        self.ttft_exact.push(ttft_s);
    }

    /// A later token came `gap_s` after the one before.
    pub(crate) fn token(&mut self, gap_s: f64) {
        self.itl.observe_seconds(gap_s);
        self.itl_fine.record(gap_s * 1e6);
    }

    /// A request finished with `output_tokens`.
    pub(crate) fn finished(&mut self, output_tokens: u64) {
        self.finished += 1;
        self.output_tokens += output_tokens;
    }

    /// The planner's observation (worker and queue figures are the caller's to fill).
    pub(crate) fn observation(&self, end: Duration, length: Duration) -> Observation {
        Observation {
            end,
            length,
            requests: self.arrivals,
            prompt_tokens: self.prompt_tokens,
            cached_tokens: self.cached_tokens.min(self.prompt_tokens),
            finished: self.finished,
            output_tokens: self.output_tokens,
            ttft: self.ttft.clone(),
            itl: self.itl.clone(),
            ..Observation::default()
        }
    }

    /// Exact percentiles at `q` (consumes the TTFT samples' order).
    pub(crate) fn measured(mut self, q: f64) -> Measured {
        self.ttft_exact.sort_unstable_by(f64::total_cmp);
        Measured {
            arrivals: self.arrivals,
            ttft_ms: (!self.ttft_exact.is_empty()).then(|| quantile(&self.ttft_exact, q) * 1e3),
            itl_ms: (self.itl_fine.count() > 0).then(|| self.itl_fine.quantile(q) / 1e3),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_interval_becomes_an_observation_and_exact_percentiles() {
        let mut s = IntervalStats::default();
        for i in 0..10 {
            s.arrived(1000);
            s.routed(250);
            s.first_token(0.1 * f64::from(i + 1));
            s.token(0.020);
        }
        s.finished(50);
        let o = s.observation(Duration::from_secs(30), Duration::from_secs(30));
        assert_eq!(o.requests, 10);
        assert_eq!(o.prefix_hit_rate(), Some(0.25));
        assert_eq!(o.mean_osl(), Some(50.0));
        assert_eq!(o.ttft.count(), 10);
        let m = s.measured(0.9);
        assert_eq!(m.arrivals, 10);
        assert!((m.ttft_ms.unwrap() - 900.0).abs() < 1e-9);
        assert!((m.itl_ms.unwrap() - 20.0).abs() < 0.2);
        assert_eq!(m.met(Some(1000.0), Some(25.0)), Some(true));
        assert_eq!(m.met(Some(800.0), Some(25.0)), Some(false));
        assert_eq!(Measured::default().met(Some(1.0), None), None);
    }
}
