//! Mergeable latency histograms: fixed bucket bounds shared by every worker, frontend, heartbeat
//! and the planner, so histograms from any two sources add up bucket by bucket.
//!
//! Percentiles are never precomputed at the source: a p90 of p90s means nothing, while the sum
//! of two histograms is the histogram of the union. [`LatencyHistogram::quantile`] estimates a
//! percentile by linear interpolation inside the bucket it falls in; with these bounds the
//! estimate is within one bucket (≤ 25% relative width above 4 ms) of the true value.
//!
//! The same bounds are the `le` buckets of the agent's Prometheus histograms
//! ([`LATENCY_BUCKETS_SECONDS`]), so dashboards and the planner see the same distribution.

use serde::{Deserialize, Serialize};

/// Upper bounds of the finite buckets, in seconds, strictly increasing. One more bucket (+∞)
/// follows. Fine at the bottom (decode ITLs of 5–40 ms on GPUs), coarse at the top (a minute).
pub const LATENCY_BUCKETS_SECONDS: [f64; 38] = [
    0.001, 0.002, 0.003, 0.004, 0.005, 0.006, 0.008, 0.010, 0.012, 0.015, 0.020, 0.025, 0.030,
    0.040, 0.050, 0.060, 0.080, 0.100, 0.125, 0.150, 0.200, 0.250, 0.300, 0.400, 0.500, 0.750, 1.0,
    1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0,
];

/// Number of buckets including the +∞ one.
pub const LATENCY_BUCKET_COUNT: usize = LATENCY_BUCKETS_SECONDS.len() + 1;

/// A latency histogram over [`LATENCY_BUCKETS_SECONDS`]: per-bucket counts (not cumulative) and
/// the sum of the observed values. On the wire it is a [`RawHistogram`] (use that as the
/// OpenAPI schema of fields of this type), checked when decoded.
///
/// ```
/// use kvfleet_proto::histogram::LatencyHistogram;
/// let mut a = LatencyHistogram::default();
/// let mut b = LatencyHistogram::default();
/// for _ in 0..90 { a.observe_seconds(0.045); }
/// for _ in 0..10 { b.observe_seconds(2.5); }
/// a.merge(&b);
/// assert_eq!(a.count(), 100);
/// // The p90 lies in the bucket (40 ms, 50 ms] that holds the 90th value.
/// let p90 = a.quantile(0.90).unwrap();
/// assert!(p90 > 0.040 && p90 <= 0.050, "{p90}");
/// assert!(a.quantile(0.99).unwrap() > 2.0);
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RawHistogram", into = "RawHistogram")]
pub struct LatencyHistogram {
    counts: [u64; LATENCY_BUCKET_COUNT],
    sum_seconds: f64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self {
            counts: [0; LATENCY_BUCKET_COUNT],
            sum_seconds: 0.0,
        }
    }
}

/// A histogram on the wire: `counts` has one entry per bucket of [`LATENCY_BUCKETS_SECONDS`]
/// plus the +∞ bucket (39 in all), not cumulative; `sum_seconds` is the sum of the values.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RawHistogram {
    /// Observations per bucket, one per bound plus the +∞ bucket, not cumulative.
    pub counts: Vec<u64>,
    /// Sum of the observed values, seconds.
    pub sum_seconds: f64,
}

/// A wire histogram that cannot be one of ours.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum HistogramError {
    /// The bucket count does not match [`LATENCY_BUCKET_COUNT`].
    #[error(
        "histogram has {found} buckets; expected {LATENCY_BUCKET_COUNT} (the bounds in kvfleet_proto::histogram)"
    )]
    BucketCount {
        /// What arrived.
        found: usize,
    },
    /// The sum is negative or not finite.
    #[error("histogram sum_seconds = {0} must be finite and not negative")]
    Sum(f64),
}

impl TryFrom<RawHistogram> for LatencyHistogram {
    type Error = HistogramError;

    fn try_from(raw: RawHistogram) -> Result<Self, Self::Error> {
        let counts: [u64; LATENCY_BUCKET_COUNT] =
            raw.counts
                .as_slice()
                .try_into()
                .map_err(|_| HistogramError::BucketCount {
                    found: raw.counts.len(),
                })?;
        if !raw.sum_seconds.is_finite() || raw.sum_seconds < 0.0 {
            return Err(HistogramError::Sum(raw.sum_seconds));
        }
        Ok(Self {
            counts,
            sum_seconds: raw.sum_seconds,
        })
    }
}

impl From<LatencyHistogram> for RawHistogram {
    fn from(h: LatencyHistogram) -> Self {
        Self {
            counts: h.counts.to_vec(),
            sum_seconds: h.sum_seconds,
        }
    }
}

impl LatencyHistogram {
    /// The bucket a value falls in: the first bound it does not exceed (`le`, as Prometheus).
    pub fn bucket_of(seconds: f64) -> usize {
        LATENCY_BUCKETS_SECONDS.partition_point(|&bound| bound < seconds)
    }

    /// Records one value; negative and NaN values count as 0.
    pub fn observe_seconds(&mut self, seconds: f64) {
        let seconds = if seconds.is_nan() {
            0.0
        } else {
            seconds.max(0.0)
        };
        self.counts[Self::bucket_of(seconds)] += 1;
        if seconds.is_finite() {
            self.sum_seconds += seconds;
        }
    }

    /// Adds another histogram's observations to this one.
    pub fn merge(&mut self, other: &Self) {
        for (mine, theirs) in self.counts.iter_mut().zip(other.counts.iter()) {
            *mine = mine.saturating_add(*theirs);
        }
        self.sum_seconds += other.sum_seconds;
    }

    /// The observations since `earlier`, a previous snapshot of this same cumulative histogram
    /// (bucket by bucket; a bucket that went down — the source restarted — counts from zero).
    pub fn since(&self, earlier: &Self) -> Self {
        let mut delta = Self::default();
        let mut restarted = false;
        for (i, (now, then)) in self.counts.iter().zip(earlier.counts.iter()).enumerate() {
            if now < then {
                restarted = true;
            }
            delta.counts[i] = now.saturating_sub(*then);
        }
        if restarted {
            return self.clone();
        }
        delta.sum_seconds = (self.sum_seconds - earlier.sum_seconds).max(0.0);
        delta
    }

    /// Number of observations.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// True when nothing was observed.
    pub fn is_empty(&self) -> bool {
        self.count() == 0
    }

    /// Sum of the observed values, seconds.
    pub fn sum_seconds(&self) -> f64 {
        self.sum_seconds
    }

    /// Mean of the observed values, seconds (`None` when empty).
    pub fn mean_seconds(&self) -> Option<f64> {
        let n = self.count();
        (n > 0).then(|| self.sum_seconds / n as f64)
    }

    /// Per-bucket counts, one per bound of [`LATENCY_BUCKETS_SECONDS`] plus +∞.
    pub fn counts(&self) -> &[u64; LATENCY_BUCKET_COUNT] {
        &self.counts
    }

    /// The `q`-quantile (0 ≤ q ≤ 1) estimated by linear interpolation inside its bucket; the
    /// +∞ bucket answers its lower bound. `None` when empty.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let q = if q.is_nan() { 0.5 } else { q.clamp(0.0, 1.0) };
        let rank = q * total as f64;
        let mut below = 0u64;
        for (i, &n) in self.counts.iter().enumerate() {
            if n == 0 {
                continue;
            }
            if (below + n) as f64 >= rank {
                let lower = if i == 0 {
                    0.0
                } else {
                    LATENCY_BUCKETS_SECONDS[i - 1]
                };
                let Some(&upper) = LATENCY_BUCKETS_SECONDS.get(i) else {
                    return Some(lower);
                };
                let within = ((rank - below as f64) / n as f64).clamp(0.0, 1.0);
                return Some(lower + (upper - lower) * within);
            }
            below += n;
        }
        Some(*LATENCY_BUCKETS_SECONDS.last().unwrap_or(&0.0))
    }

    /// The fraction of observations at or below `seconds` (interpolated inside the bucket that
    /// holds `seconds`); 1 when empty. This is what an SLA attainment check wants.
    pub fn fraction_at_or_below(&self, seconds: f64) -> f64 {
        let total = self.count();
        if total == 0 {
            return 1.0;
        }
        let bucket = Self::bucket_of(seconds);
        let full: u64 = self.counts[..bucket].iter().sum();
        let partial = match LATENCY_BUCKETS_SECONDS.get(bucket) {
            Some(&upper) => {
                let lower = if bucket == 0 {
                    0.0
                } else {
                    LATENCY_BUCKETS_SECONDS[bucket - 1]
                };
                let width = upper - lower;
                let share = if width > 0.0 {
                    ((seconds - lower) / width).clamp(0.0, 1.0)
                } else {
                    1.0
                };
                self.counts[bucket] as f64 * share
            }
            None => 0.0,
        };
        ((full as f64 + partial) / total as f64).clamp(0.0, 1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn bounds_strictly_increase() {
        assert!(LATENCY_BUCKETS_SECONDS.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn values_land_in_le_buckets() {
        assert_eq!(LatencyHistogram::bucket_of(0.0), 0);
        assert_eq!(LatencyHistogram::bucket_of(0.001), 0);
        assert_eq!(LatencyHistogram::bucket_of(0.0011), 1);
        assert_eq!(LatencyHistogram::bucket_of(60.0), 37);
        assert_eq!(LatencyHistogram::bucket_of(61.0), 38);
        assert_eq!(LatencyHistogram::bucket_of(f64::INFINITY), 38);
    }

    #[test]
    fn wire_form_round_trips_and_refuses_other_layouts() {
        let mut h = LatencyHistogram::default();
        h.observe_seconds(0.02);
        h.observe_seconds(3.0);
        let json = serde_json::to_string(&h).unwrap();
        let back: LatencyHistogram = serde_json::from_str(&json).unwrap();
        assert_eq!(back, h);
        let short = r#"{"counts":[1,2,3],"sum_seconds":1.0}"#;
        let err = serde_json::from_str::<LatencyHistogram>(short).unwrap_err();
        assert!(err.to_string().contains("expected 39"), "{err}");
        let negative = format!(r#"{{"counts":{:?},"sum_seconds":-1.0}}"#, vec![0; 39]);
        assert!(serde_json::from_str::<LatencyHistogram>(&negative).is_err());
    }

    #[test]
    fn since_subtracts_and_survives_a_restart() {
        let mut h = LatencyHistogram::default();
        h.observe_seconds(0.01);
        let snapshot = h.clone();
        h.observe_seconds(0.5);
        let delta = h.since(&snapshot);
        assert_eq!(delta.count(), 1);
        assert!((delta.sum_seconds() - 0.5).abs() < 1e-12);
        // The source restarted: its counts went down, so everything it has is new.
        let mut fresh = LatencyHistogram::default();
        fresh.observe_seconds(0.2);
        assert_eq!(fresh.since(&h), fresh);
    }

    #[test]
    fn fraction_at_or_below_matches_the_counts() {
        let mut h = LatencyHistogram::default();
        for _ in 0..9 {
            h.observe_seconds(0.05);
        }
        h.observe_seconds(2.0);
        assert!((h.fraction_at_or_below(0.05) - 0.9).abs() < 1e-9);
        assert!((h.fraction_at_or_below(2.0) - 1.0).abs() < 1e-9);
        assert!(h.fraction_at_or_below(0.001) < 0.01);
        assert_eq!(LatencyHistogram::default().fraction_at_or_below(0.1), 1.0);
    }

    proptest! {
        #[test]
        fn merge_is_the_histogram_of_the_union(
            a in proptest::collection::vec(0.0f64..100.0, 0..50),
            b in proptest::collection::vec(0.0f64..100.0, 0..50),
        ) {
            let mut ha = LatencyHistogram::default();
            let mut hb = LatencyHistogram::default();
            let mut hu = LatencyHistogram::default();
            for &v in &a { ha.observe_seconds(v); hu.observe_seconds(v); }
            for &v in &b { hb.observe_seconds(v); hu.observe_seconds(v); }
            ha.merge(&hb);
            prop_assert_eq!(ha.counts(), hu.counts());
            prop_assert!((ha.sum_seconds() - hu.sum_seconds()).abs() < 1e-6);
        }

        #[test]
        fn quantile_is_within_the_true_values_bucket(
            values in proptest::collection::vec(0.0005f64..50.0, 1..200),
            q in 0.0f64..1.0,
        ) {
            let mut h = LatencyHistogram::default();
            for &v in &values { h.observe_seconds(v); }
            let mut sorted = values.clone();
            sorted.sort_by(f64::total_cmp);
            let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
            let truth = sorted[rank - 1];
            let estimate = h.quantile(q).unwrap();
            let b = LatencyHistogram::bucket_of(truth);
            let lower = if b == 0 { 0.0 } else { LATENCY_BUCKETS_SECONDS[b - 1] };
            let upper = LATENCY_BUCKETS_SECONDS.get(b).copied().unwrap_or(f64::INFINITY);
            prop_assert!(estimate >= lower - 1e-12 && estimate <= upper + 1e-12,
                "q={} truth={} estimate={}", q, truth, estimate);
        }
    }
}
