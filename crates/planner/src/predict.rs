//! Load predictors: from the values of past intervals, the value of the next one.
//!
//! Four methods behind one trait, [`LoadPredictor`]:
//!
//! - [`LastValue`]: the next interval looks like the last one (Dynamo's `constant`).
//! - [`Ewma`]: an exponentially weighted moving average (smooths noise, lags a trend).
//! - [`Holt`]: Holt's linear method with a damped trend (follows a ramp; the damping keeps a
//!   spike's slope from being projected far past the spike).
//! - [`Seasonal`]: additive Holt–Winters with the same damped trend and a season (a day by
//!   default): once a whole season has been seen, the next value is level + trend + what this
//!   time of the season looked like before. Until then it is [`Holt`].
//!
//! The planner predicts request rate, mean input length and mean output length with one kind
//! ([`PredictorKind`]); [`forecast`] fits a fresh predictor over a history (so a planner that
//! restarts from the stored history predicts exactly what the old one would have), and
//! [`evaluate`] measures one-step-ahead errors on a series — how the default was chosen (see
//! docs/benchmarks.md). Predictions are never negative.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A one-step-ahead forecaster of one series.
pub trait LoadPredictor: fmt::Debug {
    /// Adds the value of the interval that just ended.
    fn observe(&mut self, value: f64);
    /// The predicted value of the next interval; `None` before the first observation.
    fn predict(&self) -> Option<f64>;
    /// The predicted value `steps` intervals ahead (1 = [`LoadPredictor::predict`]).
    fn predict_ahead(&self, steps: usize) -> Option<f64> {
        let _ = steps;
        self.predict()
    }
}

/// The predictor methods, by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PredictorKind {
    /// [`LastValue`].
    Last,
    /// [`Ewma`].
    Ewma,
    /// [`Holt`].
    Holt,
    /// [`Seasonal`].
    Seasonal,
}

impl PredictorKind {
    /// Every kind, in a stable order.
    pub const ALL: [PredictorKind; 4] = [
        PredictorKind::Last,
        PredictorKind::Ewma,
        PredictorKind::Holt,
        PredictorKind::Seasonal,
    ];

    /// The kind's name as flags and decisions spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            PredictorKind::Last => "last",
            PredictorKind::Ewma => "ewma",
            PredictorKind::Holt => "holt",
            PredictorKind::Seasonal => "seasonal",
        }
    }

    /// A fresh predictor of this kind; `season` is the season length in intervals (used by
    /// [`PredictorKind::Seasonal`] only; 0 or 1 disables the seasonal part).
    pub fn build(self, season: usize) -> Box<dyn LoadPredictor + Send> {
        match self {
            PredictorKind::Last => Box::new(LastValue::default()),
            PredictorKind::Ewma => Box::new(Ewma::new(Ewma::DEFAULT_ALPHA)),
            PredictorKind::Holt => Box::new(Holt::default()),
            PredictorKind::Seasonal => Box::new(Seasonal::new(season)),
        }
    }
}

impl fmt::Display for PredictorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A predictor name that is not one of [`PredictorKind::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown predictor {0:?}: expected last, ewma, holt or seasonal")]
pub struct UnknownPredictor(pub String);

impl FromStr for PredictorKind {
    type Err = UnknownPredictor;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        PredictorKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| UnknownPredictor(s.to_owned()))
    }
}

/// Fits a fresh predictor of `kind` over `history` (oldest first) and predicts the next value.
/// Non-finite values are skipped. `None` when the history has no usable value.
pub fn forecast(kind: PredictorKind, season: usize, history: &[f64]) -> Option<f64> {
    let mut predictor = kind.build(season);
    for &v in history.iter().filter(|v| v.is_finite()) {
        predictor.observe(v.max(0.0));
    }
    predictor.predict()
}

/// The most `history` is predicted to reach over the next `steps` intervals (at least one):
/// what a fleet must be sized for when a worker started now serves only `steps` intervals
/// later, while the intervals before still need serving.
pub fn forecast_ahead(
    kind: PredictorKind,
    season: usize,
    history: &[f64],
    steps: usize,
) -> Option<f64> {
    let mut predictor = kind.build(season);
    for &v in history.iter().filter(|v| v.is_finite()) {
        predictor.observe(v.max(0.0));
    }
    (1..=steps.max(1))
        .filter_map(|h| predictor.predict_ahead(h))
        .reduce(f64::max)
}

/// The noise of the newest `last` points of `history` around `kind`'s one-step predictions,
/// relative to their level: the median absolute residual × 1.4826 (σ for normal noise) over
/// the median value. Robust: a spike of a few intervals does not read as noise. 0 with fewer
/// than five scored points.
pub fn recent_noise(kind: PredictorKind, season: usize, history: &[f64], last: usize) -> f64 {
    let mut predictor = kind.build(season);
    let start = history.len().saturating_sub(last);
    let mut residuals = Vec::new();
    let mut values = Vec::new();
    for (i, &v) in history.iter().enumerate().filter(|(_, v)| v.is_finite()) {
        if i >= start
            && let Some(p) = predictor.predict()
        {
            residuals.push((v - p).abs());
            values.push(v);
        }
        predictor.observe(v.max(0.0));
    }
    if residuals.len() < 5 {
        return 0.0;
    }
    let median = |xs: &mut Vec<f64>| {
        xs.sort_unstable_by(f64::total_cmp);
        let n = xs.len();
        if n % 2 == 1 {
            xs[n / 2]
        } else {
            0.5 * (xs[n / 2 - 1] + xs[n / 2])
        }
    };
    let level = median(&mut values);
    if level <= 0.0 {
        return 0.0;
    }
    1.4826 * median(&mut residuals) / level
}

/// One-step-ahead prediction errors of a method on a series.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PredictionError {
    /// Predictions scored (every value after the first).
    pub points: usize,
    /// Mean absolute error over the mean of the actual values (a scale-free MAE; robust where
    /// single values are near 0, unlike a mean of per-point percentages).
    pub relative_mae: f64,
    /// Root mean square error over the mean of the actual values.
    pub relative_rmse: f64,
    /// Mean of (predicted − actual) over the mean of the actual values: > 0 over-predicts.
    pub relative_bias: f64,
    /// Share of points predicted more than 10% below the actual value (under-prediction is
    /// what costs SLA: the fleet is sized too small).
    pub under_10pct: f64,
}

/// Scores `kind` on `series`: for every point after the first, the prediction made from the
/// points before it against the point itself.
pub fn evaluate(kind: PredictorKind, season: usize, series: &[f64]) -> PredictionError {
    let mut predictor = kind.build(season);
    let (mut abs, mut sq, mut bias, mut under, mut sum, mut n) =
        (0.0f64, 0.0f64, 0.0f64, 0usize, 0.0f64, 0usize);
    for &actual in series {
        if let Some(predicted) = predictor.predict() {
            let error = predicted - actual;
            abs += error.abs();
            sq += error * error;
            bias += error;
            sum += actual;
            n += 1;
            if predicted < actual * 0.9 {
                under += 1;
            }
        }
        predictor.observe(actual.max(0.0));
    }
    let mean = if n > 0 { sum / n as f64 } else { 0.0 };
    let scale = |x: f64| if mean > 0.0 { x / mean } else { 0.0 };
    let per_point = |x: f64| if n > 0 { x / n as f64 } else { 0.0 };
    PredictionError {
        points: n,
        relative_mae: scale(per_point(abs)),
        relative_rmse: scale(per_point(sq).sqrt()),
        relative_bias: scale(per_point(bias)),
        under_10pct: if n > 0 { under as f64 / n as f64 } else { 0.0 },
    }
}

/// The last value seen.
#[derive(Debug, Clone, Default)]
pub struct LastValue {
    last: Option<f64>,
}

impl LoadPredictor for LastValue {
    fn observe(&mut self, value: f64) {
        self.last = Some(value);
    }

    fn predict(&self) -> Option<f64> {
        self.last
    }
}

/// Exponentially weighted moving average: `s ← α·x + (1 − α)·s`, started at the first value.
#[derive(Debug, Clone)]
pub struct Ewma {
    alpha: f64,
    level: Option<f64>,
}

impl Ewma {
    /// The smoothing weight the planner uses.
    pub const DEFAULT_ALPHA: f64 = 0.5;

    /// An EWMA with weight `alpha` (clamped to (0, 1]) on the newest value.
    pub fn new(alpha: f64) -> Self {
        Self {
            alpha: clamp_weight(alpha),
            level: None,
        }
    }
}

impl LoadPredictor for Ewma {
    fn observe(&mut self, value: f64) {
        self.level = Some(match self.level {
            None => value,
            Some(s) => self.alpha * value + (1.0 - self.alpha) * s,
        });
    }

    fn predict(&self) -> Option<f64> {
        self.level.map(|v| v.max(0.0))
    }
}

fn clamp_weight(w: f64) -> f64 {
    if w.is_finite() {
        w.clamp(1e-3, 1.0)
    } else {
        1.0
    }
}

/// Holt's linear trend method with a damped trend (Gardner & McKenzie):
///
/// ```text
/// level  ← α·x + (1 − α)·(level + φ·trend)
/// trend  ← β·(level − level_prev) + (1 − β)·φ·trend
/// next   = level + φ·trend
/// ```
#[derive(Debug, Clone)]
pub struct Holt {
    alpha: f64,
    beta: f64,
    phi: f64,
    state: Option<(f64, f64)>,
}

impl Default for Holt {
    fn default() -> Self {
        Self::new(0.5, 0.3, 0.9)
    }
}

impl Holt {
    /// Level weight `alpha`, trend weight `beta`, trend damping `phi` (each clamped to (0, 1]).
    pub fn new(alpha: f64, beta: f64, phi: f64) -> Self {
        Self {
            alpha: clamp_weight(alpha),
            beta: clamp_weight(beta),
            phi: clamp_weight(phi),
            state: None,
        }
    }

    fn step(&mut self, value: f64) {
        self.state = Some(match self.state {
            None => (value, 0.0),
            Some((level, trend)) => {
                let next = self.alpha * value + (1.0 - self.alpha) * (level + self.phi * trend);
                let trend = self.beta * (next - level) + (1.0 - self.beta) * self.phi * trend;
                (next, trend)
            }
        });
    }
}

impl LoadPredictor for Holt {
    fn observe(&mut self, value: f64) {
        self.step(value);
    }

    fn predict(&self) -> Option<f64> {
        self.predict_ahead(1)
    }

    fn predict_ahead(&self, steps: usize) -> Option<f64> {
        self.state
            .map(|(level, trend)| (level + damped_sum(self.phi, steps) * trend).max(0.0))
    }
}

fn indices_last(indices: &[f64]) -> &f64 {
    indices.last().unwrap_or(&0.0)
}

/// `φ + φ² + … + φ^steps` (at least one step).
fn damped_sum(phi: f64, steps: usize) -> f64 {
    let mut term = 1.0;
    let mut sum = 0.0;
    for _ in 0..steps.max(1) {
        term *= phi;
        sum += term;
    }
    sum
}

/// Additive Holt–Winters with a damped trend and a season of `season` intervals, its seasonal
/// indices kept per *slot* of several intervals ([`Seasonal::SLOTS`] slots per season, e.g.
/// 10 minutes of a day), so that a noisy 30-second interval does not become next day's
/// shape. During the first season a [`Holt`] predicts (and learns the level); at its end each
/// slot's index is its mean minus the season's mean. Afterwards every value updates the level
/// and trend with the index of its slot removed, and moves its slot's index a little
/// (`gamma / slot length`).
#[derive(Debug, Clone)]
pub struct Seasonal {
    season: usize,
    alpha: f64,
    beta: f64,
    gamma: f64,
    phi: f64,
    warmup: Holt,
    first: Vec<f64>,
    /// (level, trend, slot indices, position of the next value in the season)
    state: Option<(f64, f64, Vec<f64>, usize)>,
}

impl Seasonal {
    /// Slots per season.
    pub const SLOTS: usize = 144;

    /// A seasonal predictor whose season is `season` intervals (≤ 1: plain [`Holt`]).
    pub fn new(season: usize) -> Self {
        Self {
            season,
            alpha: 0.3,
            beta: 0.05,
            gamma: 0.3,
            phi: 0.9,
            warmup: Holt::default(),
            first: Vec::new(),
            state: None,
        }
    }

    fn slots(&self) -> usize {
        Self::SLOTS.min(self.season).max(1)
    }

    /// The slot of position `p` in the season.
    fn slot(&self, p: usize) -> usize {
        (p * self.slots() / self.season.max(1)).min(self.slots() - 1)
    }
}

impl LoadPredictor for Seasonal {
    fn observe(&mut self, value: f64) {
        if self.season <= 1 {
            self.warmup.observe(value);
            return;
        }
        let slots = self.slots();
        let slot_len = (self.season as f64 / slots as f64).max(1.0);
        let (alpha, beta, gamma, phi) = (self.alpha, self.beta, self.gamma, self.phi);
        let position = match &self.state {
            Some((_, _, _, position)) => *position,
            None => 0,
        };
        let slot = self.slot(position);
        match &mut self.state {
            None => {
                self.warmup.observe(value);
                self.first.push(value);
                if self.first.len() == self.season {
                    let mean = self.first.iter().sum::<f64>() / self.season as f64;
                    let mut sums = vec![(0.0f64, 0usize); slots];
                    for (p, v) in self.first.iter().enumerate() {
                        let s = (p * slots / self.season).min(slots - 1);
                        sums[s].0 += v;
                        sums[s].1 += 1;
                    }
                    let indices: Vec<f64> = sums
                        .iter()
                        .map(|(sum, n)| if *n > 0 { sum / *n as f64 - mean } else { 0.0 })
                        .collect();
                    // The warm-up's level is where the season ended, the last slot's index in
                    // it: take that out.
                    let (level, trend) = self.warmup.state.unwrap_or((mean, 0.0));
                    let last_index: f64 = *indices_last(&indices);
                    self.state = Some((level - last_index, trend, indices, 0));
                    self.first = Vec::new();
                }
            }
            Some((level, trend, indices, position)) => {
                let s = indices[slot];
                let next = alpha * (value - s) + (1.0 - alpha) * (*level + phi * *trend);
                *trend = beta * (next - *level) + (1.0 - beta) * phi * *trend;
                let w = gamma / slot_len;
                indices[slot] = w * (value - next) + (1.0 - w) * s;
                *level = next;
                *position = (*position + 1) % self.season;
            }
        }
    }

    fn predict(&self) -> Option<f64> {
        self.predict_ahead(1)
    }

    fn predict_ahead(&self, steps: usize) -> Option<f64> {
        match &self.state {
            None => self.warmup.predict_ahead(steps),
            Some((level, trend, indices, position)) => {
                let at = self.slot((*position + steps.max(1) - 1) % self.season);
                Some((level + damped_sum(self.phi, steps) * trend + indices[at]).max(0.0))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_names_are_refused() {
        for kind in PredictorKind::ALL {
            assert_eq!(kind.as_str().parse::<PredictorKind>(), Ok(kind));
        }
        assert!("arima".parse::<PredictorKind>().is_err());
    }

    #[test]
    fn nothing_predicts_before_a_value_and_constants_stay_constant() {
        for kind in PredictorKind::ALL {
            assert_eq!(forecast(kind, 4, &[]), None, "{kind}");
            let p = forecast(kind, 4, &[7.0; 20]).unwrap();
            assert!((p - 7.0).abs() < 1e-9, "{kind}: {p}");
        }
    }

    #[test]
    fn holt_follows_a_ramp_that_ewma_lags() {
        let ramp: Vec<f64> = (0..40).map(|i| 10.0 + 2.0 * f64::from(i)).collect();
        let next = 10.0 + 2.0 * 40.0;
        let holt = forecast(PredictorKind::Holt, 0, &ramp).unwrap();
        let ewma = forecast(PredictorKind::Ewma, 0, &ramp).unwrap();
        let last = forecast(PredictorKind::Last, 0, &ramp).unwrap();
        assert!((holt - next).abs() < 2.0, "holt {holt}");
        assert!(ewma < last && last < next, "ewma {ewma}, last {last}");
        let e_holt = evaluate(PredictorKind::Holt, 0, &ramp);
        let e_last = evaluate(PredictorKind::Last, 0, &ramp);
        assert!(e_holt.relative_mae < e_last.relative_mae);
        assert!(e_last.relative_bias < 0.0, "last under-predicts a ramp");
    }

    #[test]
    fn seasonal_learns_a_repeating_shape() {
        // A daily shape with sudden changes (a morning surge, an evening drop) and ±10% noise:
        // what no trend method can see coming and a season can.
        let season = 288;
        let shape = |i: usize| {
            let p = i % season;
            let base = if (96..216).contains(&p) { 80.0 } else { 30.0 };
            let noise = ((i as f64 * 12.9898).sin() * 43_758.545).fract() - 0.5;
            base * (1.0 + 0.2 * noise)
        };
        let series: Vec<f64> = (0..season * 5).map(shape).collect();
        // The error at the first interval of each surge, from the second season on.
        let surge_error = |kind: PredictorKind| {
            let mut p = kind.build(season);
            let mut error = 0.0;
            for (i, &v) in series.iter().enumerate() {
                if i >= season && i % season == 96 {
                    error += (p.predict().unwrap() - v).abs();
                }
                p.observe(v);
            }
            error
        };
        let seasonal = surge_error(PredictorKind::Seasonal);
        for other in [
            PredictorKind::Holt,
            PredictorKind::Ewma,
            PredictorKind::Last,
        ] {
            let e = surge_error(other);
            assert!(seasonal < e / 3.0, "{other}: {e} vs seasonal {seasonal}");
        }
        let mut p = PredictorKind::Seasonal.build(season);
        for &v in &series[..season * 4 + 96] {
            p.observe(v);
        }
        let before_surge = p.predict_ahead(1).unwrap();
        assert!(
            before_surge > 60.0,
            "the surge is anticipated: {before_surge}"
        );
    }

    #[test]
    fn lookahead_takes_the_peak_of_the_horizon() {
        let ramp: Vec<f64> = (0..40).map(|i| 10.0 + 2.0 * f64::from(i)).collect();
        let one = forecast_ahead(PredictorKind::Holt, 0, &ramp, 1).unwrap();
        let three = forecast_ahead(PredictorKind::Holt, 0, &ramp, 3).unwrap();
        assert!(three > one + 2.0, "{three} vs {one}");
        // Falling: the nearest interval is the peak.
        let fall: Vec<f64> = ramp.iter().rev().copied().collect();
        let one = forecast_ahead(PredictorKind::Holt, 0, &fall, 1).unwrap();
        assert_eq!(
            forecast_ahead(PredictorKind::Holt, 0, &fall, 3).unwrap(),
            one
        );
        assert_eq!(forecast(PredictorKind::Holt, 0, &fall), Some(one));
    }

    #[test]
    fn predictions_are_never_negative_and_skip_non_finite_values() {
        let falling: Vec<f64> = (0..30).map(|i| 100.0 - 10.0 * f64::from(i)).collect();
        for kind in PredictorKind::ALL {
            assert!(forecast(kind, 5, &falling).unwrap() >= 0.0, "{kind}");
            assert_eq!(forecast(kind, 5, &[f64::NAN, 3.0]), Some(3.0), "{kind}");
        }
    }

    #[test]
    fn noise_is_measured_around_the_predictions() {
        let flat = [10.0; 30];
        assert_eq!(recent_noise(PredictorKind::Ewma, 0, &flat, 20), 0.0);
        let noisy: Vec<f64> = (0..40)
            .map(|i| if i % 2 == 0 { 9.0 } else { 11.0 })
            .collect();
        // Every one-step residual of `last` is 2 around a median of 10.
        let n = recent_noise(PredictorKind::Last, 0, &noisy, 20);
        assert!((n - 1.4826 * 0.2).abs() < 1e-9, "{n}");
        assert_eq!(recent_noise(PredictorKind::Last, 0, &noisy[..4], 20), 0.0);
        // A spike of two intervals in sixty is not noise.
        let mut spiky = vec![10.0; 60];
        spiky[30] = 40.0;
        spiky[31] = 40.0;
        assert_eq!(recent_noise(PredictorKind::Last, 0, &spiky, 60), 0.0);
    }

    #[test]
    fn evaluation_counts_under_predictions() {
        let series = [10.0, 10.0, 20.0, 20.0];
        let e = evaluate(PredictorKind::Last, 0, &series);
        assert_eq!(e.points, 3);
        // One miss of 10 in three points whose mean is 50/3.
        assert!((e.relative_mae - (10.0 / 3.0) / (50.0 / 3.0)).abs() < 1e-9);
        assert!((e.under_10pct - 1.0 / 3.0).abs() < 1e-9);
    }
}
