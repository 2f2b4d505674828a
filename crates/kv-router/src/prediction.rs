//! Predictions checked against outcomes: the TTFT the router predicted for each decision, the
//! one the request actually had, and how far apart they were.
//!
//! A router whose predictions are wrong routes badly without noticing; this makes it say so.
//! Each check adds the signed error (predicted − actual: positive is pessimistic) to a running
//! bias, the absolute error to a latency histogram with the fleet's shared bucket bounds (so it
//! can be exported and merged like any other latency), and the relative absolute error
//! (`|predicted − actual| / actual`) to a histogram of 1 %-wide buckets. The same errors teach
//! each worker's correction factor ([`Correction`]).

use kvfleet_proto::histogram::LatencyHistogram;
use serde::{Deserialize, Serialize};

/// Relative errors are counted in buckets this wide (1 %)...
const REL_BUCKET: f64 = 0.01;
/// ... up to this many buckets (1000 %); larger errors share the last one.
const REL_BUCKETS: usize = 1001;

/// Running totals of prediction errors.
#[derive(Debug, Clone)]
pub struct PredictionErrors {
    count: u64,
    /// Sum of `predicted − actual`, seconds.
    signed_sum: f64,
    absolute: LatencyHistogram,
    relative: Box<[u64; REL_BUCKETS]>,
}

impl Default for PredictionErrors {
    fn default() -> Self {
        Self {
            count: 0,
            signed_sum: 0.0,
            absolute: LatencyHistogram::default(),
            relative: Box::new([0; REL_BUCKETS]),
        }
    }
}

/// How good the predictions were, for metrics and reports.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct PredictionSummary {
    /// Predictions checked.
    pub count: u64,
    /// Mean of `predicted − actual`, ms: positive means the router expected slower than it got.
    pub bias_ms: f64,
    /// Median absolute error, ms (interpolated in the shared latency buckets).
    pub abs_p50_ms: f64,
    /// 90th percentile of the absolute error, ms.
    pub abs_p90_ms: f64,
    /// Median of `|predicted − actual| / actual` (0.2 = 20 %).
    pub rel_p50: f64,
    /// 90th percentile of the relative error.
    pub rel_p90: f64,
}

impl PredictionErrors {
    /// Checks one prediction against what happened.
    pub fn record(&mut self, predicted_ms: f64, actual_ms: f64) {
        if !(predicted_ms.is_finite() && actual_ms.is_finite()) {
            return;
        }
        let error = predicted_ms - actual_ms;
        self.count += 1;
        self.signed_sum += error / 1e3;
        self.absolute.observe_seconds(error.abs() / 1e3);
        let relative = error.abs() / actual_ms.max(1e-3);
        let bucket = ((relative / REL_BUCKET).ceil() as usize).min(REL_BUCKETS - 1);
        self.relative[bucket] += 1;
    }

    /// Predictions checked so far.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The absolute errors, seconds, in the shared latency buckets (for a Prometheus histogram).
    pub fn absolute(&self) -> &LatencyHistogram {
        &self.absolute
    }

    /// The summary of everything recorded.
    pub fn summary(&self) -> PredictionSummary {
        if self.count == 0 {
            return PredictionSummary::default();
        }
        let abs = |q: f64| self.absolute.quantile(q).unwrap_or(0.0) * 1e3;
        PredictionSummary {
            count: self.count,
            bias_ms: self.signed_sum / self.count as f64 * 1e3,
            abs_p50_ms: abs(0.5),
            abs_p90_ms: abs(0.9),
            rel_p50: self.relative_quantile(0.5),
            rel_p90: self.relative_quantile(0.9),
        }
    }

    /// The upper bound of the bucket holding the nearest-rank `q`-quantile.
    fn relative_quantile(&self, q: f64) -> f64 {
        let rank = ((q * self.count as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (bucket, &n) in self.relative.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return bucket as f64 * REL_BUCKET;
            }
        }
        (REL_BUCKETS - 1) as f64 * REL_BUCKET
    }
}

/// A worker's learned factor on predicted compute time: an exponential average of
/// `ln(actual / predicted)`, so a worker that turns out twice as slow as its profile says is
/// costed twice as high after a few requests. Bounded to [¼, 4]: a single wild sample (a
/// stall, a restart) cannot make a worker look free or unusable.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Correction {
    log_ratio: f64,
    /// `exp(log_ratio)`, kept because selection reads it for every candidate.
    factor: f64,
}

impl Default for Correction {
    fn default() -> Self {
        Self {
            log_ratio: 0.0,
            factor: 1.0,
        }
    }
}

impl Correction {
    const LIMIT: f64 = std::f64::consts::LN_2 * 2.0;

    /// The factor to multiply predicted compute times by.
    pub(crate) fn factor(self) -> f64 {
        self.factor
    }

    /// Learns from one outcome; `rate` is the weight of the new sample.
    pub(crate) fn learn(&mut self, predicted_ms: f64, actual_ms: f64, rate: f64) {
        if rate <= 0.0 || !(predicted_ms > 0.0 && actual_ms > 0.0) {
            return;
        }
        // The prediction already includes the current factor; its error says how far off the
        // corrected model still is.
        let sample =
            (self.log_ratio + (actual_ms / predicted_ms).ln()).clamp(-Self::LIMIT, Self::LIMIT);
        self.log_ratio += rate.min(1.0) * (sample - self.log_ratio);
        self.factor = self.log_ratio.exp();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_summarised_with_sign_and_size() {
        let mut e = PredictionErrors::default();
        assert_eq!(e.summary(), PredictionSummary::default());
        // Nine predictions 10 % high, one 50 % low.
        for _ in 0..9 {
            e.record(110.0, 100.0);
        }
        e.record(50.0, 100.0);
        let s = e.summary();
        assert_eq!(s.count, 10);
        assert!(
            (s.bias_ms - (9.0 * 10.0 - 50.0) / 10.0).abs() < 1e-9,
            "{s:?}"
        );
        assert!((s.rel_p50 - 0.10).abs() < 1e-9, "{s:?}");
        assert!((s.rel_p90 - 0.10).abs() < 1e-9, "{s:?}");
        assert!(s.abs_p50_ms > 8.0 && s.abs_p50_ms <= 10.0, "{s:?}");
        e.record(f64::NAN, 1.0);
        assert_eq!(e.count(), 10);
    }

    #[test]
    fn the_correction_converges_to_the_ratio_and_is_bounded() {
        let mut c = Correction::default();
        for _ in 0..200 {
            let predicted = 100.0 * c.factor();
            c.learn(predicted, 150.0, 0.1);
        }
        assert!((c.factor() - 1.5).abs() < 0.01, "{}", c.factor());
        for _ in 0..200 {
            c.learn(100.0 * c.factor(), 1e6, 0.5);
        }
        assert!((c.factor() - 4.0).abs() < 1e-9, "{}", c.factor());
        let before = c.factor();
        c.learn(100.0, 100.0, 0.0);
        assert_eq!(c.factor(), before);
    }
}
