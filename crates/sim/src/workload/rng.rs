//! The generators' random numbers: SplitMix64 and the few distributions the workloads draw from.
//! Seeded and platform-independent, so a generator's output is a pure function of its knobs.

/// A seeded SplitMix64 stream.
#[derive(Debug, Clone)]
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed ^ 0x776f_726b_6c6f_6164)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1]: never 0, so its logarithm is finite.
    pub(crate) fn unit(&mut self) -> f64 {
        ((self.next_u64() >> 11) + 1) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Exponential with the given mean (inter-arrival gaps of a Poisson process, think times).
    pub(crate) fn exponential(&mut self, mean: f64) -> f64 {
        -self.unit().ln() * mean
    }

    /// Log-normal with the given mean and σ of the underlying normal (token counts: most
    /// messages are short, a few are very long).
    pub(crate) fn lognormal(&mut self, mean: f64, sigma: f64) -> f64 {
        // Box–Muller.
        let normal = (-2.0 * self.unit().ln()).sqrt() * (std::f64::consts::TAU * self.unit()).cos();
        let mu = mean.max(f64::MIN_POSITIVE).ln() - sigma * sigma / 2.0;
        (mu + sigma * normal).exp()
    }

    /// A token count: log-normal around `mean`, clamped to `[min, max]`.
    pub(crate) fn tokens(&mut self, mean: f64, sigma: f64, min: u32, max: u32) -> u32 {
        (self.lognormal(mean, sigma).round() as u32).clamp(min, max.max(min))
    }

    /// Geometric on 1, 2, 3, … with the given mean (turns of a conversation, steps of an agent).
    pub(crate) fn geometric(&mut self, mean: f64) -> u32 {
        if mean <= 1.0 {
            return 1;
        }
        let p = 1.0 / mean;
        1 + (self.unit().ln() / (1.0 - p).ln()).floor() as u32
    }

    /// An index in `0..weights.len()` drawn with probability proportional to its weight.
    pub(crate) fn weighted(&mut self, weights: &[f64]) -> usize {
        let total: f64 = weights.iter().sum();
        let mut target = (1.0 - self.unit()) * total;
        for (i, w) in weights.iter().enumerate() {
            if target < *w {
                return i;
            }
            target -= w;
        }
        weights.len().saturating_sub(1)
    }
}

/// Zipf weights `1 / rank^s` for ranks 1..=n: a few popular items and a long tail.
pub(crate) fn zipf(n: usize, s: f64) -> Vec<f64> {
    (1..=n.max(1)).map(|rank| (rank as f64).powf(-s)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distributions_have_their_means() {
        let mut rng = Rng::new(1);
        let n = 200_000;
        let mean = |f: &mut dyn FnMut() -> f64| (0..n).map(|_| f()).sum::<f64>() / n as f64;
        let e = mean(&mut || rng.exponential(30.0));
        assert!((e - 30.0).abs() < 0.5, "{e}");
        let mut rng = Rng::new(2);
        let l = mean(&mut || rng.lognormal(300.0, 1.0));
        assert!((l - 300.0).abs() < 10.0, "{l}");
        let mut rng = Rng::new(3);
        let g = mean(&mut || f64::from(rng.geometric(4.0)));
        assert!((g - 4.0).abs() < 0.05, "{g}");
        let mut rng = Rng::new(4);
        let weights = zipf(4, 1.0);
        let mut counts = [0u32; 4];
        for _ in 0..n {
            counts[rng.weighted(&weights)] += 1;
        }
        // 1 : 1/2 : 1/3 : 1/4 of 25/12.
        let share = f64::from(counts[0]) / n as f64;
        assert!((share - 12.0 / 25.0).abs() < 0.01, "{counts:?}");
        assert!(counts.windows(2).all(|w| w[0] > w[1]), "{counts:?}");
    }

    #[test]
    fn the_same_seed_gives_the_same_stream() {
        let a: Vec<u64> = (0..10)
            .scan(Rng::new(7), |r, _| Some(r.next_u64()))
            .collect();
        let b: Vec<u64> = (0..10)
            .scan(Rng::new(7), |r, _| Some(r.next_u64()))
            .collect();
        assert_eq!(a, b);
        assert_eq!(Rng::new(1).tokens(1e9, 0.1, 5, 100), 100);
    }
}
