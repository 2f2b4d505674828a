//! When to retry and when to renew. Pure: the caller passes the attempt number, a random
//! sample and the time.

use std::time::Duration;

use chrono::{DateTime, Utc};

/// The delay before retry number `attempt` (0-based): `initial × 2^attempt`, capped at `max`,
/// then "equal jitter": half of it fixed, the other half scaled by `sample` (in `0..1`). The
/// fixed half keeps a fleet from hammering a control plane that just came back; the random
/// half keeps a thousand agents that lost it at the same moment from returning in lockstep.
pub fn backoff(initial: Duration, max: Duration, attempt: u32, sample: f64) -> Duration {
    let factor = 2u32.saturating_pow(attempt.min(31));
    let base = initial.saturating_mul(factor).min(max);
    let sample = if sample.is_finite() {
        sample.clamp(0.0, 1.0)
    } else {
        0.5
    };
    base / 2 + base.mul_f64(sample / 2.0)
}

/// Whether a certificate valid from `not_before` to `not_after` should be renewed at `now`:
/// once two thirds of its lifetime have passed (so a renewal that fails has the last third,
/// days for the default 30-day certificates, to succeed), or when the dates make no sense.
pub fn renewal_due(
    not_before: DateTime<Utc>,
    not_after: DateTime<Utc>,
    now: DateTime<Utc>,
) -> bool {
    if not_after <= not_before {
        return true;
    }
    let lifetime = not_after - not_before;
    now >= not_before + lifetime * 2 / 3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_caps_and_jitters_within_bounds() {
        let ms = Duration::from_millis;
        let (initial, max) = (ms(500), ms(30_000));
        // (attempt, sample, expected)
        let rows = [
            (0, 0.0, ms(250)),
            (0, 1.0, ms(500)),
            (1, 0.0, ms(500)),
            (3, 1.0, ms(4000)),
            (10, 0.0, ms(15_000)),
            (10, 1.0, ms(30_000)),
            (u32::MAX, 0.5, ms(22_500)),
        ];
        for (attempt, sample, expected) in rows {
            assert_eq!(
                backoff(initial, max, attempt, sample),
                expected,
                "{attempt} {sample}"
            );
        }
        // Bad samples do not panic or escape the bounds.
        for sample in [f64::NAN, -1.0, 7.0, f64::INFINITY] {
            let d = backoff(initial, max, 2, sample);
            assert!(d >= ms(1000) && d <= ms(2000), "{sample}: {d:?}");
        }
    }

    #[test]
    fn renewal_after_two_thirds_of_the_lifetime() {
        let start = DateTime::<Utc>::from_timestamp(1_700_000_000, 0).unwrap_or_default();
        let end = start + chrono::Duration::days(30);
        assert!(!renewal_due(start, end, start));
        assert!(!renewal_due(start, end, start + chrono::Duration::days(19)));
        assert!(renewal_due(start, end, start + chrono::Duration::days(20)));
        assert!(renewal_due(start, end, end + chrono::Duration::days(1)));
        assert!(renewal_due(end, start, start), "nonsense dates renew");
    }
}
