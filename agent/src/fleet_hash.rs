//! The agent's fleet hash key: one shared handle to the [`BlockHasher`] every block hash this
//! agent computes goes through (the frontend's routing hashes, the serving layer's checks of
//! peers' hashes and of decode legs, the workers' engines), so that all of them agree with each
//! other and with every other agent of the fleet.
//!
//! Unkeyed until a secret is set (`kvfleet dev`, a standalone agent). The secret is never
//! logged: [`FleetHashSecret`]'s `Debug` is redacted. Changing it changes every hash: workers
//! spawned afterwards use the new key, running ones keep theirs until restarted, so an
//! operator changes it only with a rolling restart (the indexes re-sync from the new events).

use std::sync::{Arc, RwLock};

use kvfleet_proto::hash::{BlockHasher, FleetHashSecret};

/// A cheap-to-clone handle to the agent's fleet hasher.
#[derive(Debug, Clone, Default)]
pub struct FleetHasher(Arc<RwLock<(Option<FleetHashSecret>, BlockHasher)>>);

impl FleetHasher {
    /// The hasher now (unkeyed if no secret was set).
    pub fn get(&self) -> BlockHasher {
        self.0.read().map(|g| g.1.clone()).unwrap_or_default()
    }

    /// The secret now, for a worker about to be spawned.
    pub fn secret(&self) -> Option<FleetHashSecret> {
        self.0.read().ok().and_then(|g| g.0.clone())
    }

    /// Sets the fleet's secret (`None`: unkeyed). Returns whether it changed; a secret too
    /// short to derive a key from is refused (the hasher is left as it was).
    pub fn set(&self, secret: Option<FleetHashSecret>) -> Result<bool, TooShort> {
        let hasher = match &secret {
            None => BlockHasher::UNKEYED,
            Some(s) => BlockHasher::keyed(Some(s.key().ok_or(TooShort)?)),
        };
        let Ok(mut guard) = self.0.write() else {
            return Ok(false);
        };
        if guard.0 == secret {
            return Ok(false);
        }
        *guard = (secret, hasher);
        Ok(true)
    }
}

impl PartialEq for FleetHasher {
    /// Same secret (or both unkeyed).
    fn eq(&self, other: &Self) -> bool {
        self.secret() == other.secret()
    }
}

/// A fleet hash secret shorter than `FleetHashKey::MIN_SECRET_BYTES`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "the fleet hash secret is too short: at least {} bytes are needed",
    kvfleet_proto::hash::FleetHashKey::MIN_SECRET_BYTES
)]
pub struct TooShort;

#[cfg(test)]
mod tests {
    use super::*;
    use kvfleet_proto::BlockSize;

    #[test]
    fn setting_a_secret_keys_the_hashes() {
        let h = FleetHasher::default();
        let tokens: Vec<u32> = (0..32).collect();
        let bs = BlockSize::new(16).unwrap();
        let plain = h.get().sequence_hashes(&tokens, bs);
        assert_eq!(plain, kvfleet_proto::hash::sequence_hashes(&tokens, bs));
        let secret = FleetHashSecret("a fleet secret of 32 characters!".into());
        assert_eq!(h.set(Some(secret.clone())), Ok(true));
        assert_eq!(h.set(Some(secret)), Ok(false));
        assert_ne!(h.get().sequence_hashes(&tokens, bs), plain);
        assert!(h.set(Some(FleetHashSecret("short".into()))).is_err());
        assert!(h.get().is_keyed());
        assert!(!format!("{h:?}").contains("fleet secret"));
    }
}
