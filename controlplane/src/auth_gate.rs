//! What stands between a request's credential and the database: a short-lived cache of verified
//! tokens, and a failed-authentication budget per client address.
//!
//! A flood of requests with missing or malformed tokens is refused by shape alone
//! ([`crate::auth::parse_bearer`]) and never reaches this module's database path. A healthy
//! agent's token, once verified, is answered from the cache for `auth.cache_ttl`, so its
//! heartbeats authenticate without a connection. What remains is a well-formed token the cache
//! does not know: looking it up takes a connection, so it goes ahead only while the client
//! address's token bucket (`auth.failed_burst`, refilled at `auth.failed_per_minute`) holds a
//! unit, and each lookup that fails spends one. An address that has spent it gets 429 (with
//! `Retry-After`) before any connection is taken. Successes spend nothing, so a registration
//! storm behind one address is not throttled. Lookups already in flight when the budget runs
//! out still finish and still count: the bucket goes below zero, so an address that sent C
//! bad tokens at once waits for C units to come back. (At most `failed_burst` + C lookups get
//! through in the first burst, then one per refilled unit.)
//! A token this replica has verified before is re-checked when its cache entry ages out
//! without spending the budget: it is no guess (only its holder can present it), and an agent
//! that shares an address with an attacker (NAT) must not be locked out by the attacker's
//! failures.
//!
//! Revocation: revoking a token (or removing its node) through this replica drops it from this
//! replica's cache at once; another replica keeps accepting it until its cached entry is
//! `cache_ttl` old. A token's own expiry is honoured by the cache too.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use uuid::Uuid;

use crate::auth::{AuthError, Principal, Role};
use crate::telemetry::Registry;

/// The most verified tokens one replica caches (a fleet has far fewer; past this, lookups
/// simply go to the database).
const MAX_CACHED: usize = 100_000;
/// The most client addresses tracked at once; past this, addresses with a full bucket (that
/// is, nothing to remember) are forgotten first.
const MAX_ADDRESSES: usize = 65_536;

/// See the module docs.
#[derive(Debug)]
pub struct AuthGate {
    ttl: Duration,
    burst: f64,
    /// Units per second.
    refill: f64,
    cache: Mutex<HashMap<[u8; 32], Entry>>,
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
    metrics: GateMetrics,
}

#[derive(Debug, Clone)]
struct Entry {
    principal: Principal,
    verified_at: Instant,
    expires_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    units: f64,
    at: Instant,
}

impl Bucket {
    fn refilled(self, now: Instant, burst: f64, refill: f64) -> Self {
        let gained = now.saturating_duration_since(self.at).as_secs_f64() * refill;
        Bucket {
            units: (self.units + gained).min(burst),
            at: now,
        }
    }
}

/// A lookup may go ahead; report how it went with [`AuthGate::verified`], [`AuthGate::denied`]
/// or [`AuthGate::errored`]. A failure spends a unit of `client`'s budget (none for a re-check
/// of a token verified before).
#[derive(Debug)]
#[must_use = "report the lookup's outcome with verified(), denied() or errored()"]
pub struct Admitted {
    client: Option<IpAddr>,
}

/// What the cache knows about a token.
#[derive(Debug)]
pub enum Cached {
    /// Verified less than `cache_ttl` ago: no lookup needed.
    Fresh(Principal),
    /// Verified before, but long enough ago that it must be looked up again; the lookup does
    /// not spend the address's budget.
    Stale(Admitted),
    /// Never verified here: the lookup spends the budget.
    Unknown,
}

#[derive(Debug, Clone)]
struct GateMetrics {
    failures: Family<[(&'static str, &'static str); 1], Counter>,
    lookups: Family<[(&'static str, &'static str); 1], Counter>,
    cache_hits: Counter,
    rate_limited: Counter,
}

/// The `reason` label values of `kvfleet_cp_auth_failures_total`.
const REASONS: [&str; 6] = [
    "missing",
    "malformed",
    "unknown",
    "revoked",
    "expired",
    "used_up",
];

fn reason(error: AuthError) -> &'static str {
    match error {
        AuthError::Missing => "missing",
        AuthError::Malformed => "malformed",
        AuthError::Unknown => "unknown",
        AuthError::Revoked => "revoked",
        AuthError::Expired => "expired",
        AuthError::UsedUp => "used_up",
    }
}

fn locked<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // The maps hold plain data that no panic can leave half-updated in a harmful way.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl AuthGate {
    /// Registers `kvfleet_cp_auth_failures_total{reason}`, `kvfleet_cp_auth_lookups_total{result}`,
    /// `kvfleet_cp_auth_cache_hits_total` and `kvfleet_cp_auth_rate_limited_total`.
    pub fn new(config: &crate::config::AuthConfig, registry: &mut Registry) -> Self {
        let metrics = GateMetrics {
            failures: Family::default(),
            lookups: Family::default(),
            cache_hits: Counter::default(),
            rate_limited: Counter::default(),
        };
        registry.register(
            "kvfleet_cp_auth_failures",
            "Requests refused 401 by reason (missing, malformed, unknown, revoked, expired, \
             used_up); missing and malformed ones never reach the database",
            metrics.failures.clone(),
        );
        registry.register(
            "kvfleet_cp_auth_lookups",
            "Token lookups that took a database connection (a cache miss), by result (ok, \
             denied, error)",
            metrics.lookups.clone(),
        );
        registry.register(
            "kvfleet_cp_auth_cache_hits",
            "Requests authenticated from the verified-token cache, without the database",
            metrics.cache_hits.clone(),
        );
        registry.register(
            "kvfleet_cp_auth_rate_limited",
            "Requests refused 429 because their client address spent its failed-authentication \
             budget (auth.failed_burst, auth.failed_per_minute)",
            metrics.rate_limited.clone(),
        );
        for reason in REASONS {
            metrics.failures.get_or_create_owned(&[("reason", reason)]);
        }
        for result in ["ok", "denied", "error"] {
            metrics.lookups.get_or_create_owned(&[("result", result)]);
        }
        Self {
            ttl: config.cache_ttl,
            burst: f64::from(config.failed_burst),
            refill: f64::from(config.failed_per_minute) / 60.0,
            cache: Mutex::new(HashMap::new()),
            buckets: Mutex::new(HashMap::new()),
            metrics,
        }
    }

    /// What the cache knows of a token hash: the caller, if it was verified less than
    /// `cache_ttl` ago and has not expired since.
    pub fn cached(&self, hash: &[u8; 32]) -> Cached {
        let mut cache = locked(&self.cache);
        let Some(entry) = cache.get(hash) else {
            return Cached::Unknown;
        };
        if entry.expires_at.is_some_and(|at| at <= Utc::now()) {
            cache.remove(hash);
            return Cached::Unknown;
        }
        if entry.verified_at.elapsed() < self.ttl {
            self.metrics.cache_hits.inc();
            Cached::Fresh(entry.principal.clone())
        } else {
            Cached::Stale(Admitted { client: None })
        }
    }

    /// Lets a lookup go ahead while `client` has budget left, or says how many seconds until a
    /// unit is back (→ 429 with `Retry-After`).
    pub fn admit(&self, client: IpAddr) -> Result<Admitted, u64> {
        let now = Instant::now();
        let mut buckets = locked(&self.buckets);
        if buckets.len() >= MAX_ADDRESSES && !buckets.contains_key(&client) {
            let (burst, refill) = (self.burst, self.refill);
            buckets.retain(|_, b| b.refilled(now, burst, refill).units < burst);
        }
        let bucket = buckets
            .get(&client)
            .map_or(
                Bucket {
                    units: self.burst,
                    at: now,
                },
                |b| *b,
            )
            .refilled(now, self.burst, self.refill);
        if bucket.units < 1.0 {
            buckets.insert(client, bucket);
            self.metrics.rate_limited.inc();
            let wait = (1.0 - bucket.units) / self.refill;
            // At least a second: Retry-After is whole seconds and 0 would invite a busy loop.
            return Err((wait.ceil() as u64).max(1));
        }
        buckets.insert(client, bucket);
        Ok(Admitted {
            client: Some(client),
        })
    }

    /// The lookup found a live token: the caller is cached (join tokens excepted: their use
    /// count changes with every registration, so each one is asked anew).
    pub fn verified(
        &self,
        admitted: Admitted,
        hash: [u8; 32],
        principal: &Principal,
        expires_at: Option<DateTime<Utc>>,
    ) {
        self.metrics
            .lookups
            .get_or_create(&[("result", "ok")])
            .inc();
        let _ = admitted;
        if self.ttl.is_zero() || principal.role == Role::Join {
            return;
        }
        let mut cache = locked(&self.cache);
        if cache.len() >= MAX_CACHED {
            let ttl = self.ttl;
            // Stale entries go first (they only spare a budget unit), then nothing is added.
            cache.retain(|_, c| c.verified_at.elapsed() < ttl);
            if cache.len() >= MAX_CACHED {
                return;
            }
        }
        let mut principal = principal.clone();
        principal.request_id = None;
        cache.insert(
            hash,
            Entry {
                principal,
                verified_at: Instant::now(),
                expires_at,
            },
        );
    }

    /// The lookup refused the token: a unit of the address's budget is spent (it may go below
    /// zero, see the module docs), and the token is forgotten (revoked or expired since).
    pub fn denied(&self, admitted: Admitted, hash: &[u8; 32], error: AuthError) {
        self.metrics
            .lookups
            .get_or_create(&[("result", "denied")])
            .inc();
        locked(&self.cache).remove(hash);
        self.refused(error);
        let Some(client) = admitted.client else {
            return;
        };
        let now = Instant::now();
        let (burst, refill) = (self.burst, self.refill);
        let mut buckets = locked(&self.buckets);
        let bucket = buckets.entry(client).or_insert(Bucket {
            units: burst,
            at: now,
        });
        let mut refilled = bucket.refilled(now, burst, refill);
        refilled.units -= 1.0;
        *bucket = refilled;
    }

    /// The lookup could not ask the database: not the caller's fault, so nothing is spent.
    pub fn errored(&self, _admitted: Admitted) {
        self.metrics
            .lookups
            .get_or_create(&[("result", "error")])
            .inc();
    }

    /// Counts a 401 (every one, looked up or refused by shape).
    pub fn refused(&self, error: AuthError) {
        self.metrics
            .failures
            .get_or_create(&[("reason", reason(error))])
            .inc();
    }

    /// Drops a revoked token from this replica's cache.
    pub fn forget_token(&self, token_id: Uuid) {
        locked(&self.cache).retain(|_, c| c.principal.token_id != token_id);
    }

    /// Drops every cached token of a removed node.
    pub fn forget_node(&self, node_id: Uuid) {
        locked(&self.cache).retain(|_, c| c.principal.node_id != Some(node_id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate(burst: u32, per_minute: u32, ttl: Duration) -> AuthGate {
        let config = crate::config::AuthConfig {
            cache_ttl: ttl,
            failed_burst: burst,
            failed_per_minute: per_minute,
            ..Default::default()
        };
        AuthGate::new(&config, &mut crate::telemetry::registry())
    }

    fn principal(role: Role) -> Principal {
        Principal {
            token_id: Uuid::new_v4(),
            actor: "t".into(),
            role,
            node_id: Some(Uuid::new_v4()),
            request_id: Some("r".into()),
        }
    }

    #[test]
    fn failures_spend_the_budget_and_successes_do_not() {
        let gate = gate(3, 60, Duration::from_secs(30));
        let ip: IpAddr = [10, 0, 0, 1].into();
        for _ in 0..3 {
            let admitted = gate.admit(ip).unwrap();
            gate.verified(admitted, [0; 32], &principal(Role::Agent), None);
        }
        for _ in 0..3 {
            let admitted = gate.admit(ip).unwrap();
            gate.denied(admitted, &[9; 32], AuthError::Unknown);
        }
        let retry_after = gate.admit(ip).unwrap_err();
        assert!((1..=2).contains(&retry_after), "{retry_after}");
        // Another address has its own budget.
        assert!(gate.admit([10, 0, 0, 2].into()).is_ok());
    }

    #[test]
    fn concurrent_lookups_are_not_refused_and_failures_in_flight_still_count() {
        let gate = gate(4, 60, Duration::from_secs(30));
        let ip: IpAddr = [10, 0, 0, 1].into();
        // A registration storm: many lookups at once, all good, none refused.
        let storm: Vec<Admitted> = (0..50).map(|_| gate.admit(ip).unwrap()).collect();
        for admitted in storm {
            gate.verified(admitted, [0; 32], &principal(Role::Agent), None);
        }
        // Ten bad lookups at once: all were admitted, all count, the bucket goes below zero.
        let bad: Vec<Admitted> = (0..10).map(|_| gate.admit(ip).unwrap()).collect();
        for admitted in bad {
            gate.denied(admitted, &[9; 32], AuthError::Unknown);
        }
        let retry_after = gate.admit(ip).unwrap_err();
        assert!((6..=8).contains(&retry_after), "{retry_after}");
        // A database error spends nothing.
        let other: IpAddr = [10, 0, 0, 2].into();
        for _ in 0..10 {
            gate.errored(gate.admit(other).unwrap());
        }
        assert!(gate.admit(other).is_ok());
    }

    #[test]
    fn the_cache_expires_and_forgets_revoked_tokens() {
        let gate = gate(3, 60, Duration::from_millis(50));
        let ip: IpAddr = [10, 0, 0, 1].into();
        let agent = principal(Role::Agent);
        gate.verified(gate.admit(ip).unwrap(), [1; 32], &agent, None);
        let Cached::Fresh(cached) = gate.cached(&[1; 32]) else {
            panic!("just verified")
        };
        assert_eq!(cached.token_id, agent.token_id);
        assert_eq!(cached.request_id, None, "a request id is per request");
        gate.forget_token(agent.token_id);
        assert!(matches!(gate.cached(&[1; 32]), Cached::Unknown));

        gate.verified(gate.admit(ip).unwrap(), [2; 32], &agent, None);
        gate.forget_node(agent.node_id.unwrap());
        assert!(matches!(gate.cached(&[2; 32]), Cached::Unknown));

        gate.verified(gate.admit(ip).unwrap(), [3; 32], &agent, None);
        std::thread::sleep(Duration::from_millis(60));
        let Cached::Stale(again) = gate.cached(&[3; 32]) else {
            panic!("older than the TTL: looked up again")
        };
        gate.denied(again, &[3; 32], AuthError::Revoked);
        assert!(matches!(gate.cached(&[3; 32]), Cached::Unknown));

        let expired = Some(Utc::now() - chrono::Duration::seconds(1));
        gate.verified(gate.admit(ip).unwrap(), [4; 32], &agent, expired);
        assert!(
            matches!(gate.cached(&[4; 32]), Cached::Unknown),
            "the token itself expired"
        );

        let join = principal(Role::Join);
        gate.verified(gate.admit(ip).unwrap(), [5; 32], &join, None);
        assert!(
            matches!(gate.cached(&[5; 32]), Cached::Unknown),
            "join tokens are not cached"
        );
    }

    /// A token verified before is looked up again without the address's budget: an attacker
    /// behind the same address (NAT) cannot lock a healthy agent out.
    #[test]
    fn a_known_token_is_rechecked_without_the_budget() {
        let gate = gate(3, 1, Duration::from_millis(10));
        let ip: IpAddr = [10, 0, 0, 1].into();
        let agent = principal(Role::Agent);
        gate.verified(gate.admit(ip).unwrap(), [1; 32], &agent, None);
        for _ in 0..3 {
            let admitted = gate.admit(ip).unwrap();
            gate.denied(admitted, &[7; 32], AuthError::Unknown);
        }
        assert!(gate.admit(ip).is_err(), "the address's budget is spent");
        std::thread::sleep(Duration::from_millis(20));
        let Cached::Stale(again) = gate.cached(&[1; 32]) else {
            panic!("stale")
        };
        gate.verified(again, [1; 32], &agent, None);
        assert!(matches!(gate.cached(&[1; 32]), Cached::Fresh(_)));
        assert!(
            gate.admit(ip).is_err(),
            "still spent: the re-check went around it"
        );
    }
}
