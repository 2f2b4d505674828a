//! Per-API-key rate limits: one token bucket per key, refilled at `requests_per_sec` up to
//! `burst`. A request takes one token; with none left it gets 429 `rate_limit_exceeded` and a
//! `Retry-After` of the time until the next token, and the refusal is counted by the key's
//! label (its `name`, or `key-N` by its position in `api_keys`), never by the key itself.
//!
//! The check runs right after authentication, before the body is read: a client over its limit
//! costs neither body bytes nor an admission slot. Each key's bucket is its own, so one client
//! spending its burst leaves the others' untouched. Without keys there is nothing to limit per
//! key; admission (the bounded queue) still bounds the node as a whole.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use super::ApiKeys;
use super::api::ApiError;
use crate::metrics::Registry;

/// A key's limit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    /// Tokens added per second (requests per second, sustained).
    pub requests_per_sec: f64,
    /// The bucket's size: requests accepted at once after a quiet spell.
    pub burst: u32,
}

/// `{key}` of `kvfleet_rate_limited_total`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct KeyLabel {
    key: String,
}

#[derive(Debug)]
struct Bucket {
    limit: RateLimit,
    tokens: f64,
    updated: Instant,
}

impl Bucket {
    fn new(limit: RateLimit, now: Instant) -> Self {
        Self {
            limit,
            tokens: f64::from(limit.burst),
            updated: now,
        }
    }

    /// Takes a token, or says how long until one is there.
    fn take(&mut self, now: Instant) -> Result<(), Duration> {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.updated = now;
        self.tokens =
            (self.tokens + elapsed * self.limit.requests_per_sec).min(f64::from(self.limit.burst));
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64(
                (1.0 - self.tokens) / self.limit.requests_per_sec,
            ))
        }
    }
}

/// The buckets of every key that has a limit, by the key's position in [`ApiKeys`].
#[derive(Debug)]
pub struct RateLimiter {
    buckets: Vec<Option<Mutex<Bucket>>>,
    labels: Vec<String>,
    limited: Family<KeyLabel, Counter>,
}

impl RateLimiter {
    /// Buckets for `keys`: each key's own limit, else `default`, else none. Registers
    /// `kvfleet_rate_limited_total{key}` into `registry`.
    pub fn new(keys: &ApiKeys, default: Option<RateLimit>, registry: &mut Registry) -> Self {
        let now = Instant::now();
        let limited = Family::default();
        registry.register(
            "kvfleet_rate_limited",
            "Requests refused with 429 because their API key was over its rate limit, by the \
             key's name (never the key)",
            limited.clone(),
        );
        Self {
            buckets: keys
                .entries()
                .map(|k| k.limit.or(default).map(|l| Mutex::new(Bucket::new(l, now))))
                .collect(),
            labels: keys.entries().map(|k| k.label.clone()).collect(),
            limited,
        }
    }

    /// Takes a token from key `index`'s bucket: 429 with `Retry-After` when it is empty.
    pub fn check(&self, index: usize) -> Result<(), ApiError> {
        let Some(Some(bucket)) = self.buckets.get(index) else {
            return Ok(());
        };
        let taken = bucket
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take(Instant::now());
        taken.map_err(|wait| {
            let label = self.labels.get(index).cloned().unwrap_or_default();
            self.limited.get_or_create(&KeyLabel { key: label }).inc();
            // Whole seconds, rounded up: a client that waits what it is told finds a token.
            let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            ApiError::rate_limited(Duration::from_secs(secs.max(1)))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_spends_its_burst_then_refills_at_its_rate() {
        let start = Instant::now();
        let limit = RateLimit {
            requests_per_sec: 2.0,
            burst: 3,
        };
        let mut bucket = Bucket::new(limit, start);
        for _ in 0..3 {
            bucket.take(start).unwrap();
        }
        let wait = bucket.take(start).unwrap_err();
        assert_eq!(wait, Duration::from_millis(500));
        // Half a second later one token is back, and only one.
        let later = start + Duration::from_millis(500);
        bucket.take(later).unwrap();
        assert!(bucket.take(later).is_err());
        // A long quiet spell refills to the burst, no further.
        let much_later = later + Duration::from_secs(60);
        for _ in 0..3 {
            bucket.take(much_later).unwrap();
        }
        assert!(bucket.take(much_later).is_err());
    }
}
