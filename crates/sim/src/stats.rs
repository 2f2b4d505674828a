//! Latency summaries: exact percentiles of per-request samples, and a log-bucketed histogram
//! for per-token gaps (a day of traffic has tens of millions of them; the histogram's memory
//! does not grow with the count).

use serde::{Deserialize, Serialize};

/// p50 / p90 / p99 (and mean, max) of a latency, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Percentiles {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Arithmetic mean.
    pub mean: f64,
    /// Largest sample.
    pub max: f64,
}

/// The nearest-rank `q`-quantile (`q` in [0, 1]) of sorted samples; 0 for none.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (q.clamp(0.0, 1.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Summarises samples (sorts them in place).
pub fn percentiles(samples: &mut [f64]) -> Percentiles {
    if samples.is_empty() {
        return Percentiles::default();
    }
    samples.sort_unstable_by(f64::total_cmp);
    Percentiles {
        p50: quantile(samples, 0.50),
        p90: quantile(samples, 0.90),
        p99: quantile(samples, 0.99),
        mean: samples.iter().sum::<f64>() / samples.len() as f64,
        max: samples[samples.len() - 1],
    }
}

/// A histogram of positive values in microseconds with buckets 0.5 % wide (relative), so a
/// percentile read from it is within 0.5 % of the exact one. Values below 1 µs share bucket 0.
#[derive(Debug, Clone, Default)]
pub struct LogHistogram {
    counts: Vec<u64>,
    total: u64,
    sum: f64,
    max: f64,
}

/// Growth factor between bucket bounds.
const RATIO: f64 = 1.005;

impl LogHistogram {
    fn bucket(us: f64) -> usize {
        if us <= 1.0 {
            0
        } else {
            (us.ln() / RATIO.ln()).ceil() as usize
        }
    }

    fn upper_bound(bucket: usize) -> f64 {
        RATIO.powi(bucket as i32)
    }

    /// Adds one value, in microseconds.
    pub fn record(&mut self, us: f64) {
        let us = if us.is_finite() { us.max(0.0) } else { 0.0 };
        let b = Self::bucket(us);
        if self.counts.len() <= b {
            self.counts.resize(b + 1, 0);
        }
        self.counts[b] += 1;
        self.total += 1;
        self.sum += us;
        self.max = self.max.max(us);
    }

    /// How many values were recorded.
    pub fn count(&self) -> u64 {
        self.total
    }

    /// The `q`-quantile in microseconds: the upper bound of the bucket holding the
    /// nearest-rank sample, capped at the largest value seen.
    pub fn quantile(&self, q: f64) -> f64 {
        if self.total == 0 {
            return 0.0;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (b, &n) in self.counts.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Self::upper_bound(b).min(self.max);
            }
        }
        self.max
    }

    /// The summary, converted to milliseconds.
    pub fn percentiles_ms(&self) -> Percentiles {
        if self.total == 0 {
            return Percentiles::default();
        }
        Percentiles {
            p50: self.quantile(0.50) / 1e3,
            p90: self.quantile(0.90) / 1e3,
            p99: self.quantile(0.99) / 1e3,
            mean: self.sum / self.total as f64 / 1e3,
            max: self.max / 1e3,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn nearest_rank_quantiles() {
        let mut samples: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        let p = percentiles(&mut samples);
        assert_eq!((p.p50, p.p90, p.p99, p.max), (50.0, 90.0, 99.0, 100.0));
        assert_eq!(p.mean, 50.5);
        assert_eq!(percentiles(&mut []), Percentiles::default());
        assert_eq!(quantile(&[7.0], 0.0), 7.0);
    }

    proptest! {
        /// The histogram's quantiles are within its 0.5 % bucket width of the exact ones.
        #[test]
        fn histogram_quantiles_track_exact_ones(
            mut values in proptest::collection::vec(1.0f64..1e7, 1..400),
            q in 0.0f64..1.0,
        ) {
            let mut h = LogHistogram::default();
            for &v in &values {
                h.record(v);
            }
            values.sort_unstable_by(f64::total_cmp);
            let exact = quantile(&values, q);
            let approx = h.quantile(q);
            prop_assert!(approx >= exact * (1.0 - 1e-9), "{approx} < {exact}");
            prop_assert!(approx <= exact * RATIO * (1.0 + 1e-9), "{approx} > {exact}");
            prop_assert_eq!(h.count(), values.len() as u64);
        }
    }
}
