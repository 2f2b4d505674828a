//! Time-varying traces: a base trace (Mooncake) replayed at a rate that follows a curve — a
//! ramp, a day (diurnal) or a spike — so a planner is judged on load that changes.
//!
//! The base trace is repeated back to back as often as needed, each copy's hash ids offset
//! past the previous copy's (copies share no prefix, as with `tools/day_trace.py`), and time is
//! warped: a request at time `t` of the repeated base trace (whose mean rate is `r₀`) arrives
//! at the `τ` where the curve's cumulative requests `Λ(τ) = ∫₀^τ r(s) ds` reach `r₀·t`. The
//! base trace's burstiness and request mix are kept; only the pace changes. Deterministic.
//!
//! Curves are written `KIND:key=value,...`, e.g.
//!
//! - `constant:rate=6`
//! - `ramp:from=2,to=12,over=30m` (then flat)
//! - `diurnal:mean=6,peak-ratio=2.5,period=24h,peak-at=14h` — `mean·e^(k·cos(2π(t−peak)/period))/I₀(k)`
//!   with `k` chosen so the peak is `peak-ratio` × the mean (the trough is then `e^(−2k)` × the
//!   peak: 0.07× for a ratio of 2.5)
//! - `spike:rate=6,factor=4,at=30m,for=2m`
//!
//! Durations take `s`, `m` or `h` (`90m`, `1.5h`, `3600s`; a bare number is seconds).

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use crate::trace::TraceRequest;

/// A request rate that changes over time, requests per second.
#[derive(Debug, Clone, PartialEq)]
pub enum RateCurve {
    /// Flat.
    Constant {
        /// Requests per second.
        rate: f64,
    },
    /// Linear from `from` to `to` over `over`, then flat at `to`.
    Ramp {
        /// Starting rate.
        from: f64,
        /// Final rate.
        to: f64,
        /// How long the ramp takes.
        over: Duration,
    },
    /// A daily cycle (see the module docs).
    Diurnal {
        /// Mean rate over a period.
        mean: f64,
        /// Peak over mean.
        peak_ratio: f64,
        /// The cycle's length.
        period: Duration,
        /// When in the cycle the peak is.
        peak_at: Duration,
    },
    /// Flat at `rate`, `factor` × higher from `at` for `length`.
    Spike {
        /// The flat rate.
        rate: f64,
        /// The spike's multiple of it.
        factor: f64,
        /// When the spike starts.
        at: Duration,
        /// How long it lasts.
        length: Duration,
    },
}

/// A curve specification that does not parse or makes no sense.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("rate curve {spec:?}: {reason}")]
pub struct CurveError {
    /// What was given.
    pub spec: String,
    /// What is wrong.
    pub reason: String,
}

/// Parses `90m`, `1.5h`, `3600s`, `20` (seconds).
pub fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    let (number, unit) = match text.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&text[..i], &text[i..]),
        _ => (text, "s"),
    };
    let value: f64 = number.trim().parse().ok()?;
    let seconds = match unit {
        "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => return None,
    };
    Duration::try_from_secs_f64(seconds).ok()
}

/// `90m`-style text for a duration.
pub fn format_duration(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s >= 3600.0 && (s / 3600.0).fract() == 0.0 {
        format!("{}h", s / 3600.0)
    } else if s >= 60.0 && (s / 60.0).fract() == 0.0 {
        format!("{}m", s / 60.0)
    } else {
        format!("{s}s")
    }
}

impl FromStr for RateCurve {
    type Err = CurveError;

    fn from_str(spec: &str) -> Result<Self, CurveError> {
        let fail = |reason: String| CurveError {
            spec: spec.to_owned(),
            reason,
        };
        let (kind, rest) = spec.split_once(':').unwrap_or((spec, ""));
        let mut keys: Vec<(&str, &str)> = Vec::new();
        for pair in rest.split(',').filter(|p| !p.trim().is_empty()) {
            let (k, v) = pair
                .split_once('=')
                .ok_or_else(|| fail(format!("`{pair}` is not key=value")))?;
            keys.push((k.trim(), v.trim()));
        }
        let allowed: &[&str] = match kind {
            "constant" => &["rate"],
            "ramp" => &["from", "to", "over"],
            "diurnal" => &["mean", "peak-ratio", "period", "peak-at"],
            "spike" => &["rate", "factor", "at", "for"],
            other => {
                return Err(fail(format!(
                    "unknown kind `{other}`: expected constant, ramp, diurnal or spike"
                )));
            }
        };
        if let Some((k, _)) = keys.iter().find(|(k, _)| !allowed.contains(k)) {
            return Err(fail(format!(
                "`{k}` is not a {kind} key (keys: {})",
                allowed.join(", ")
            )));
        }
        let get = |key: &str| keys.iter().find(|(k, _)| *k == key).map(|(_, v)| *v);
        let rate = |key: &str, default: Option<f64>| -> Result<f64, CurveError> {
            match get(key) {
                Some(v) => v
                    .parse::<f64>()
                    .ok()
                    .filter(|r| r.is_finite() && *r >= 0.0)
                    .ok_or_else(|| fail(format!("{key}={v}: expected a number ≥ 0"))),
                None => default.ok_or_else(|| fail(format!("`{key}` is required"))),
            }
        };
        let duration = |key: &str, default: Option<Duration>| -> Result<Duration, CurveError> {
            match get(key) {
                Some(v) => parse_duration(v)
                    .ok_or_else(|| fail(format!("{key}={v}: expected a duration like 90m or 2h"))),
                None => default.ok_or_else(|| fail(format!("`{key}` is required"))),
            }
        };
        let curve = match kind {
            "constant" => RateCurve::Constant {
                rate: rate("rate", None)?,
            },
            "ramp" => RateCurve::Ramp {
                from: rate("from", None)?,
                to: rate("to", None)?,
                over: duration("over", None)?,
            },
            "diurnal" => {
                let peak_ratio = rate("peak-ratio", Some(2.5))?;
                if peak_ratio < 1.0 {
                    return Err(fail(format!("peak-ratio={peak_ratio} must be at least 1")));
                }
                let period = duration("period", Some(Duration::from_secs(86_400)))?;
                if period.is_zero() {
                    return Err(fail("period must be positive".into()));
                }
                RateCurve::Diurnal {
                    mean: rate("mean", None)?,
                    peak_ratio,
                    period,
                    peak_at: duration("peak-at", Some(period / 2))?,
                }
            }
            _ => {
                let factor = rate("factor", Some(4.0))?;
                RateCurve::Spike {
                    rate: rate("rate", None)?,
                    factor,
                    at: duration("at", None)?,
                    length: duration("for", Some(Duration::from_secs(120)))?,
                }
            }
        };
        Ok(curve)
    }
}

impl fmt::Display for RateCurve {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RateCurve::Constant { rate } => write!(f, "constant:rate={rate}"),
            RateCurve::Ramp { from, to, over } => {
                write!(
                    f,
                    "ramp:from={from},to={to},over={}",
                    format_duration(*over)
                )
            }
            RateCurve::Diurnal {
                mean,
                peak_ratio,
                period,
                peak_at,
            } => write!(
                f,
                "diurnal:mean={mean},peak-ratio={peak_ratio},period={},peak-at={}",
                format_duration(*period),
                format_duration(*peak_at)
            ),
            RateCurve::Spike {
                rate,
                factor,
                at,
                length,
            } => write!(
                f,
                "spike:rate={rate},factor={factor},at={},for={}",
                format_duration(*at),
                format_duration(*length)
            ),
        }
    }
}

/// The modified Bessel function I₀ (series; exact enough for k < 20).
fn bessel_i0(k: f64) -> f64 {
    let mut term = 1.0;
    let mut sum = 1.0;
    for n in 1..60 {
        term *= (k / 2.0) * (k / 2.0) / f64::from(n * n);
        sum += term;
        if term < sum * 1e-16 {
            break;
        }
    }
    sum
}

/// The `k` whose von Mises shape has peak/mean `ratio` (`e^k / I₀(k)`, increasing in `k`).
fn diurnal_k(ratio: f64) -> f64 {
    if ratio <= 1.0 {
        return 0.0;
    }
    let (mut lo, mut hi) = (0.0f64, 20.0f64);
    for _ in 0..100 {
        let mid = 0.5 * (lo + hi);
        if mid.exp() / bessel_i0(mid) < ratio {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    0.5 * (lo + hi)
}

impl RateCurve {
    /// The rate at `t`, requests per second.
    pub fn rate(&self, t: Duration) -> f64 {
        self.sampler()(t)
    }

    /// [`RateCurve::rate`] with the curve's constants worked out once, for many samples.
    pub fn sampler(&self) -> impl Fn(Duration) -> f64 + '_ {
        let (k, i0) = match *self {
            RateCurve::Diurnal { peak_ratio, .. } => {
                let k = diurnal_k(peak_ratio);
                (k, bessel_i0(k))
            }
            _ => (0.0, 1.0),
        };
        move |t: Duration| {
            let t = t.as_secs_f64();
            match *self {
                RateCurve::Constant { rate } => rate,
                RateCurve::Ramp { from, to, over } => {
                    let f = if over.is_zero() {
                        1.0
                    } else {
                        (t / over.as_secs_f64()).min(1.0)
                    };
                    from + (to - from) * f
                }
                RateCurve::Diurnal {
                    mean,
                    period,
                    peak_at,
                    ..
                } => {
                    let phase =
                        std::f64::consts::TAU * (t - peak_at.as_secs_f64()) / period.as_secs_f64();
                    mean * (k * phase.cos()).exp() / i0
                }
                RateCurve::Spike {
                    rate,
                    factor,
                    at,
                    length,
                } => {
                    let (a, b) = (at.as_secs_f64(), (at + length).as_secs_f64());
                    if (a..b).contains(&t) {
                        rate * factor
                    } else {
                        rate
                    }
                }
            }
        }
    }

    /// The highest rate over `[0, duration]` (sampled every second).
    pub fn peak(&self, duration: Duration) -> f64 {
        let rate = self.sampler();
        (0..=duration.as_secs())
            .map(|s| rate(Duration::from_secs(s)))
            .fold(0.0, f64::max)
    }
}

/// A shaped trace could not be built.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ShapeError {
    /// The base trace is empty or spans no time.
    #[error("the base trace needs at least two requests at different times")]
    EmptyBase,
    /// The curve never has any requests.
    #[error("the rate curve is 0 over the whole duration")]
    NoLoad,
}

/// The base trace repeated and warped to follow `curve` for `duration` (see the module docs).
pub fn shape(
    base: &[TraceRequest],
    curve: &RateCurve,
    duration: Duration,
) -> Result<Vec<TraceRequest>, ShapeError> {
    let (Some(first), Some(last)) = (base.first(), base.last()) else {
        return Err(ShapeError::EmptyBase);
    };
    let base_span = last.arrival.saturating_sub(first.arrival);
    if base.len() < 2 || base_span.is_zero() {
        return Err(ShapeError::EmptyBase);
    }
    // One copy lasts the base span plus one mean gap, so copies follow on at the same pace.
    let gap = base_span.as_secs_f64() / (base.len() - 1) as f64;
    let copy_span = base_span.as_secs_f64() + gap;
    let base_rate = base.len() as f64 / copy_span;
    let id_stride = base
        .iter()
        .flat_map(|r| r.hash_ids.iter().copied())
        .max()
        .map_or(1, |m| m + 1);
    // Λ(τ) on a 1 s grid, integrated by the trapezoid rule.
    let seconds = duration.as_secs_f64().ceil() as usize;
    let mut cumulative = Vec::with_capacity(seconds + 1);
    cumulative.push(0.0f64);
    let rate = curve.sampler();
    for s in 0..seconds {
        let a = rate(Duration::from_secs(s as u64));
        let b = rate(Duration::from_secs(s as u64 + 1));
        let last = *cumulative.last().unwrap_or(&0.0);
        cumulative.push(last + 0.5 * (a + b).max(0.0));
    }
    let total = *cumulative.last().unwrap_or(&0.0);
    if total <= 0.0 {
        return Err(ShapeError::NoLoad);
    }
    let mut out = Vec::with_capacity(total.ceil() as usize + 1);
    let mut cell = 0usize;
    'copies: for copy in 0u64.. {
        for r in base {
            let t = copy as f64 * copy_span + r.arrival.saturating_sub(first.arrival).as_secs_f64();
            let target = t * base_rate;
            if target > total {
                break 'copies;
            }
            while cell + 1 < cumulative.len() && cumulative[cell + 1] < target {
                cell += 1;
            }
            let lo = cumulative[cell];
            let hi = cumulative.get(cell + 1).copied().unwrap_or(lo);
            let frac = if hi > lo {
                (target - lo) / (hi - lo)
            } else {
                0.0
            };
            let at = (cell as f64 + frac.clamp(0.0, 1.0)).min(duration.as_secs_f64());
            out.push(TraceRequest {
                line: out.len() + 1,
                arrival: Duration::from_secs_f64(at),
                input_length: r.input_length,
                output_length: r.output_length,
                hash_ids: r.hash_ids.iter().map(|h| h + copy * id_stride).collect(),
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::parse_trace;
    use crate::workload::write_trace;

    fn base() -> Vec<TraceRequest> {
        // 100 requests 100 ms apart: 10 req/s, ids 0..3 each.
        let text: String = (0..100)
            .map(|i| {
                format!(
                    "{{\"timestamp\": {}, \"input_length\": 1000, \"output_length\": 10, \"hash_ids\": [{}, {}]}}\n",
                    i * 100,
                    i % 3,
                    i
                )
            })
            .collect();
        parse_trace(text.as_bytes()).unwrap()
    }

    #[test]
    fn specs_parse_and_print_back() {
        for spec in [
            "constant:rate=6",
            "ramp:from=2,to=12,over=30m",
            "diurnal:mean=6,peak-ratio=2.5,period=24h,peak-at=14h",
            "spike:rate=6,factor=4,at=30m,for=2m",
        ] {
            let curve: RateCurve = spec.parse().unwrap();
            assert_eq!(curve.to_string(), spec);
        }
        let defaults: RateCurve = "diurnal:mean=3".parse().unwrap();
        assert_eq!(
            defaults.to_string(),
            "diurnal:mean=3,peak-ratio=2.5,period=24h,peak-at=12h"
        );
        for (bad, says) in [
            ("wave:rate=1", "unknown kind"),
            ("constant:rate=-1", "rate=-1"),
            ("constant", "`rate` is required"),
            ("ramp:from=1,to=2,over=soon", "over=soon"),
            ("spike:rate=1,at=1m,height=3", "`height` is not a spike key"),
            ("diurnal:mean=1,peak-ratio=0.5", "at least 1"),
            ("constant:rate", "not key=value"),
        ] {
            let err = bad.parse::<RateCurve>().unwrap_err().to_string();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn diurnal_peak_and_mean_are_as_asked() {
        let curve: RateCurve = "diurnal:mean=10,peak-ratio=2.5,period=24h,peak-at=12h"
            .parse()
            .unwrap();
        let day = Duration::from_secs(86_400);
        assert!((curve.peak(day) - 25.0).abs() < 1e-6);
        let rate = curve.sampler();
        let mean = (0..86_400)
            .map(|s| rate(Duration::from_secs(s)))
            .sum::<f64>()
            / 86_400.0;
        assert!((mean - 10.0).abs() < 1e-3, "{mean}");
        let trough = curve.rate(Duration::ZERO);
        assert!(trough < 2.0 && trough > 1.0, "{trough}");
    }

    #[test]
    fn shaped_traces_follow_the_curve() {
        let curve: RateCurve = "spike:rate=5,factor=4,at=60s,for=30s".parse().unwrap();
        let shaped = shape(&base(), &curve, Duration::from_secs(180)).unwrap();
        let count = |a: u64, b: u64| {
            shaped
                .iter()
                .filter(|r| (Duration::from_secs(a)..Duration::from_secs(b)).contains(&r.arrival))
                .count() as f64
        };
        assert!((count(0, 60) / 60.0 - 5.0).abs() < 0.3, "{}", count(0, 60));
        assert!(
            (count(60, 90) / 30.0 - 20.0).abs() < 1.0,
            "{}",
            count(60, 90)
        );
        assert!((count(90, 180) / 90.0 - 5.0).abs() < 0.3);
        // Sorted, numbered, and each copy's ids are its own.
        assert!(shaped.windows(2).all(|w| w[0].arrival <= w[1].arrival));
        assert_eq!(shaped.last().unwrap().line, shaped.len());
        let first_copy: Vec<u64> = shaped[0].hash_ids.clone();
        assert_eq!(first_copy, vec![0, 0]);
        assert_eq!(
            shaped[100].hash_ids,
            vec![100, 100],
            "the second copy is offset"
        );
        // It round-trips through the file format.
        let mut text = Vec::new();
        write_trace(&shaped, &mut text).unwrap();
        let back = parse_trace(text.as_slice()).unwrap();
        assert_eq!(back.len(), shaped.len());
        assert_eq!(back[150].hash_ids, shaped[150].hash_ids);
    }

    #[test]
    fn degenerate_inputs_are_errors() {
        let curve = RateCurve::Constant { rate: 1.0 };
        assert_eq!(
            shape(&base()[..1], &curve, Duration::from_secs(10)),
            Err(ShapeError::EmptyBase)
        );
        assert_eq!(
            shape(
                &base(),
                &RateCurve::Constant { rate: 0.0 },
                Duration::from_secs(10)
            ),
            Err(ShapeError::NoLoad)
        );
        assert_eq!(parse_duration("1.5h"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_duration("20"), Some(Duration::from_secs(20)));
        assert_eq!(parse_duration("3d"), None);
    }
}
