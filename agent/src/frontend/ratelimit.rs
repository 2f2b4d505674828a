//! Per-API-key rate limits: one token bucket per key, refilled at `requests_per_sec` up to
//! `burst`. A request takes one token; with none left it gets 429 `rate_limit_exceeded` and a
//! `Retry-After` of the time until the next token, and the refusal is counted by the key's
//! label (its `name`, or `key-N` by its position in `api_keys`), never by the key itself.
//!
//! The check runs right after authentication, before the body is read: a client over its limit
//! costs neither body bytes nor an admission slot. Each key's bucket is its own, so one client
//! spending its burst leaves the others' untouched. Without keys there is nothing to limit per
//! key; admission (the bounded queue) still bounds the node as a whole.
//!
//! A key may also have a **tokens-per-minute** limit: a second bucket holding a minute's worth
//! of tokens, refilled continuously. Once a request is tokenized, its worst case (the prompt plus
//! `max_tokens` for each of its `n` choices) is reserved; when the request ends, what it did not
//! use (the usage it reports: the prompt once and the completions generated) is given back. A
//! request the bucket cannot cover gets 429 `rate_limit_exceeded` with `Retry-After` (seconds
//! until it can), counted in `kvfleet_rate_limited_tokens_total{key}`; one larger than a whole
//! minute's worth can never be served and says so. A request cut off by its client keeps its
//! whole reservation (what was generated before is not known to the frontend then); one that
//! never reached a worker gets it all back. Tokens charged are counted in
//! `kvfleet_key_tokens_total{key}`.
//!
//! **Without keys** (loopback, or `allow_unauthenticated`), [`KeylessLimiter`] gives each client
//! IP the same kind of bucket (`[frontend.keyless_rate_limit]`). Its state is bounded: at most
//! `max_clients` IPs have their own bucket; when the table is full, buckets that have refilled
//! completely (their client was quiet for a burst's worth of time: forgetting them changes
//! nothing) are swept out, at most once a second, and until there is room again new IPs share
//! one overflow bucket. An attacker with many addresses thus costs at most `max_clients`
//! entries and gets one bucket's worth of requests for all its new addresses together.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
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

/// A key's tokens-per-minute bucket.
#[derive(Debug)]
struct TokenBucket {
    per_minute: f64,
    tokens: f64,
    updated: Instant,
}

impl TokenBucket {
    fn new(per_minute: u32, now: Instant) -> Self {
        Self {
            per_minute: f64::from(per_minute),
            tokens: f64::from(per_minute),
            updated: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.updated = now;
        self.tokens = (self.tokens + elapsed * self.per_minute / 60.0).min(self.per_minute);
    }

    /// Takes `cost` tokens, or says how long until they are there (`None`: never, the cost is
    /// more than a minute's worth).
    fn take(&mut self, cost: f64, now: Instant) -> Result<(), Option<Duration>> {
        if cost > self.per_minute {
            return Err(None);
        }
        self.refill(now);
        if self.tokens >= cost {
            self.tokens -= cost;
            Ok(())
        } else {
            Err(Some(Duration::from_secs_f64(
                (cost - self.tokens) * 60.0 / self.per_minute,
            )))
        }
    }

    fn give_back(&mut self, tokens: f64, now: Instant) {
        self.refill(now);
        self.tokens = (self.tokens + tokens).min(self.per_minute);
    }
}

/// Tokens reserved for one request from its key's tokens-per-minute bucket. [`Self::settle`]
/// with the request's usage gives back what it did not use; dropped unsettled after
/// [`Self::started`], it keeps the whole reservation (a client that went away); dropped before,
/// it gives everything back (the request never reached a worker).
#[derive(Debug)]
pub struct Reservation {
    bucket: Arc<Mutex<TokenBucket>>,
    reserved: u64,
    started: bool,
    used: Option<u64>,
    charged: Counter,
}

impl Reservation {
    /// The request reached a worker: from now on, going away unsettled costs the reservation.
    pub fn started(&mut self) {
        self.started = true;
    }

    /// The request's usage (prompt and completion tokens): the rest is given back on drop.
    pub fn settle(&mut self, used: u64) {
        self.used = Some(used.min(self.reserved));
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let used = match (self.started, self.used) {
            (_, Some(used)) => used,
            (false, None) => 0,
            (true, None) => self.reserved,
        };
        self.charged.inc_by(used);
        let back = self.reserved - used;
        if back > 0 {
            self.bucket
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .give_back(back as f64, Instant::now());
        }
    }
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
    token_buckets: Vec<Option<Arc<Mutex<TokenBucket>>>>,
    labels: Vec<String>,
    limited: Family<KeyLabel, Counter>,
    limited_tokens: Family<KeyLabel, Counter>,
    charged: Family<KeyLabel, Counter>,
}

impl RateLimiter {
    /// Buckets for `keys`: each key's own limit, else `default`, else none. Registers
    /// `kvfleet_rate_limited_total{key}` into `registry`.
    /// `default_tokens_per_minute` is every key's tokens-per-minute limit unless it has its own.
    pub fn new(
        keys: &ApiKeys,
        default: Option<RateLimit>,
        default_tokens_per_minute: Option<u32>,
        registry: &mut Registry,
    ) -> Self {
        let now = Instant::now();
        let limited = Family::default();
        registry.register(
            "kvfleet_rate_limited",
            "Requests refused with 429 because their API key was over its rate limit, by the \
             key's name (never the key)",
            limited.clone(),
        );
        let limited_tokens = Family::default();
        registry.register(
            "kvfleet_rate_limited_tokens",
            "Requests refused with 429 because their API key was over its tokens-per-minute \
             limit, by the key's name",
            limited_tokens.clone(),
        );
        let charged = Family::default();
        registry.register(
            "kvfleet_key_tokens",
            "Tokens (prompt and completion) charged to API keys with a tokens-per-minute \
             limit, by the key's name",
            charged.clone(),
        );
        Self {
            buckets: keys
                .entries()
                .map(|k| k.limit.or(default).map(|l| Mutex::new(Bucket::new(l, now))))
                .collect(),
            token_buckets: keys
                .entries()
                .map(|k| {
                    k.tokens_per_minute
                        .or(default_tokens_per_minute)
                        .map(|t| Arc::new(Mutex::new(TokenBucket::new(t, now))))
                })
                .collect(),
            labels: keys.entries().map(|k| k.label.clone()).collect(),
            limited,
            limited_tokens,
            charged,
        }
    }

    /// Reserves `cost` tokens (a request's worst case) from key `index`'s tokens-per-minute
    /// bucket: `None` when the key (or no key) has no such limit; 429 with `Retry-After` when
    /// the bucket cannot cover it.
    pub fn reserve(
        &self,
        index: Option<usize>,
        cost: u64,
    ) -> Result<Option<Reservation>, ApiError> {
        let Some(index) = index else {
            return Ok(None);
        };
        let Some(Some(bucket)) = self.token_buckets.get(index) else {
            return Ok(None);
        };
        let label = KeyLabel {
            key: self.labels.get(index).cloned().unwrap_or_default(),
        };
        let taken = bucket
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take(cost as f64, Instant::now());
        match taken {
            Ok(()) => Ok(Some(Reservation {
                bucket: bucket.clone(),
                reserved: cost,
                started: false,
                used: None,
                charged: self.charged.get_or_create(&label).clone(),
            })),
            Err(wait) => {
                self.limited_tokens.get_or_create(&label).inc();
                let (secs, message) = match wait {
                    Some(wait) => {
                        let secs = retry_after_secs(wait);
                        let message = format!(
                            "this API key is over its tokens-per-minute limit: the request needs \
                             {cost} tokens (its prompt and max_tokens for each choice); retry \
                             after {secs}s (Retry-After)"
                        );
                        (secs, message)
                    }
                    None => (
                        60,
                        format!(
                            "the request needs {cost} tokens (its prompt and max_tokens for each \
                             choice), more than this API key's tokens-per-minute limit allows at \
                             all: lower max_tokens or shorten the prompt"
                        ),
                    ),
                };
                let mut error = ApiError::rate_limited(Duration::from_secs(secs));
                error.message = message;
                Err(error)
            }
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
            ApiError::rate_limited(Duration::from_secs(retry_after_secs(wait)))
        })
    }
}

/// A `Retry-After` for `wait`: whole seconds, rounded up (a client that waits what it is told
/// finds a token), at least 1.
fn retry_after_secs(wait: Duration) -> u64 {
    (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1)
}

/// Per-client-IP buckets for requests without an API key (see the module's documentation).
#[derive(Debug)]
pub struct KeylessLimiter {
    limit: RateLimit,
    max_clients: usize,
    state: Mutex<KeylessState>,
    limited: Counter,
}

#[derive(Debug)]
struct KeylessState {
    buckets: HashMap<IpAddr, Bucket>,
    /// What new IPs share while the table is full.
    overflow: Bucket,
    swept: Instant,
}

impl KeylessLimiter {
    /// `limit` for each of at most `max_clients` IPs; registers
    /// `kvfleet_rate_limited_keyless_total`.
    pub fn new(limit: RateLimit, max_clients: usize, registry: &mut Registry) -> Self {
        let now = Instant::now();
        let limited = Counter::default();
        registry.register(
            "kvfleet_rate_limited_keyless",
            "Requests without an API key refused with 429 because their client IP was over \
             frontend.keyless_rate_limit",
            limited.clone(),
        );
        Self {
            limit,
            max_clients: max_clients.max(1),
            state: Mutex::new(KeylessState {
                buckets: HashMap::new(),
                overflow: Bucket::new(limit, now),
                swept: now,
            }),
            limited,
        }
    }

    /// Takes a token from `ip`'s bucket: 429 with `Retry-After` when it is empty.
    pub fn check(&self, ip: IpAddr) -> Result<(), ApiError> {
        self.check_at(ip, Instant::now())
    }

    fn check_at(&self, ip: IpAddr, now: Instant) -> Result<(), ApiError> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let state = &mut *state;
        if !state.buckets.contains_key(&ip)
            && state.buckets.len() >= self.max_clients
            && now.saturating_duration_since(state.swept) >= Duration::from_secs(1)
        {
            state.swept = now;
            let full =
                Duration::from_secs_f64(f64::from(self.limit.burst) / self.limit.requests_per_sec);
            state
                .buckets
                .retain(|_, b| now.saturating_duration_since(b.updated) < full);
        }
        let bucket = if let Some(bucket) = state.buckets.get_mut(&ip) {
            bucket
        } else if state.buckets.len() < self.max_clients {
            state
                .buckets
                .entry(ip)
                .or_insert(Bucket::new(self.limit, now))
        } else {
            &mut state.overflow
        };
        bucket.take(now).map_err(|wait| {
            self.limited.inc();
            let secs = retry_after_secs(wait);
            let mut error = ApiError::rate_limited(Duration::from_secs(secs));
            error.message = format!(
                "this client address is over the rate limit for requests without an API key; \
                 retry after {secs}s (Retry-After)"
            );
            error
        })
    }

    /// IPs with a bucket of their own now.
    pub fn clients(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .buckets
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_bucket_reserves_the_worst_case_and_takes_back_the_rest() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(600, start);
        bucket.take(500.0, start).unwrap();
        // 100 left: 200 more are 100 tokens (10 s at 10/s) away.
        assert_eq!(
            bucket.take(200.0, start),
            Err(Some(Duration::from_secs(10)))
        );
        assert_eq!(bucket.take(601.0, start), Err(None), "never fits");
        bucket.give_back(400.0, start);
        bucket.take(500.0, start).unwrap();
        bucket.give_back(10_000.0, start);
        assert_eq!(bucket.tokens, 600.0, "never above a minute's worth");
    }

    /// A reservation gives back what its request did not use; one that never reached a worker
    /// gives back everything; one cut off after it started keeps everything.
    #[test]
    fn reservations_are_corrected_by_usage() {
        let mut keys = ApiKeys::default();
        keys.push("sk-tpm-0123456789", "tpm".into(), None, Some(1000));
        keys.push("sk-free-0123456789", "free".into(), None, None);
        let limiter = RateLimiter::new(&keys, None, None, &mut Registry::default());
        let left = || {
            limiter.token_buckets[0]
                .as_ref()
                .unwrap()
                .lock()
                .unwrap()
                .tokens
        };
        assert!(limiter.reserve(None, 10).unwrap().is_none(), "no key");
        assert!(limiter.reserve(Some(1), 10).unwrap().is_none(), "no limit");
        let mut used = limiter.reserve(Some(0), 600).unwrap().unwrap();
        assert!(left() < 401.0);
        used.started();
        used.settle(100);
        drop(used);
        // 1000 - 100 used (plus a few microseconds of refill).
        assert!((900.0..901.0).contains(&left()), "{}", left());
        drop(limiter.reserve(Some(0), 500).unwrap());
        assert!((900.0..901.0).contains(&left()), "never started: all back");
        let mut cut = limiter.reserve(Some(0), 500).unwrap().unwrap();
        cut.started();
        drop(cut);
        assert!((400.0..401.0).contains(&left()), "cut off: all kept");
        let refused = limiter.reserve(Some(0), 800).unwrap_err();
        assert_eq!(refused.status, 429);
        assert!(refused.retry_after.is_some());
        let too_big = limiter.reserve(Some(0), 1001).unwrap_err();
        assert!(too_big.message.contains("more than"), "{}", too_big.message);
        assert_eq!(
            limiter
                .charged
                .get_or_create(&KeyLabel { key: "tpm".into() })
                .get(),
            600
        );
    }

    /// Each IP has its own bucket; the table never holds more than `max_clients` IPs, the
    /// overflow shares one bucket, and refilled buckets are swept out to make room.
    #[test]
    fn keyless_buckets_are_per_ip_and_bounded() {
        let limit = RateLimit {
            requests_per_sec: 1.0,
            burst: 2,
        };
        let limiter = KeylessLimiter::new(limit, 3, &mut Registry::default());
        let start = Instant::now();
        let ip = |n: u8| IpAddr::from([10, 0, 0, n]);
        for _ in 0..2 {
            limiter.check_at(ip(1), start).unwrap();
        }
        let refused = limiter.check_at(ip(1), start).unwrap_err();
        assert_eq!(refused.status, 429);
        assert_eq!(refused.retry_after, Some(Duration::from_secs(1)));
        assert!(
            refused.message.contains("without an API key"),
            "{}",
            refused.message
        );
        // Another address is not affected.
        limiter.check_at(ip(2), start).unwrap();
        limiter.check_at(ip(3), start).unwrap();
        // Full: a thousand new addresses share one bucket (burst 2), the table stays at 3.
        let admitted = (10..=250)
            .filter(|&n| limiter.check_at(ip(n), start).is_ok())
            .count();
        assert_eq!(admitted, 2);
        assert_eq!(limiter.clients(), 3);
        assert_eq!(limiter.limited.get(), 240);
        // Two seconds on, every bucket is full again: swept, and a new IP gets its own.
        let later = start + Duration::from_secs(2);
        limiter.check_at(ip(99), later).unwrap();
        limiter.check_at(ip(99), later).unwrap();
        assert!(limiter.check_at(ip(99), later).is_err(), "its own bucket");
        assert_eq!(limiter.clients(), 1);
    }

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
