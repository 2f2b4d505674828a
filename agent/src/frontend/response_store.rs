//! Stored responses (`/v1/responses` with `store: true`): a bounded in-memory cache on the
//! node that served them, written behind to the control plane so that any node can find them.
//!
//! Storing never delays a response: [`ResponseStore::put`] inserts locally and queues the
//! write; a writer task sends queued writes to the control plane (a few at a time). A lookup
//! tries the local copy, then the control plane. A local copy that already reached the control
//! plane is checked there too when the control plane answers, so a `DELETE` on another node (or
//! an expiry) is seen everywhere; when it does not answer, the local copy is served: a
//! control-plane outage affects only lookups of responses stored on other nodes.
//!
//! A stored response is visible only to its owner (a digest of the API key that created it,
//! [`super::Frontend::owner`]); another owner gets the same "not found" as a missing id.
//! Standalone agents (no control plane) keep responses in this node's cache only.
//!
//! The control-plane calls are behind [`RemoteResponses`], which the control-plane client
//! implements: the frontend does not depend on it.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

/// How many responses the node keeps in memory (least recently stored go first).
pub const LOCAL_CAPACITY: usize = 10_000;
/// Writes to the control plane queued at most; beyond, a response stays local only (logged).
const WRITE_QUEUE: usize = 4096;
/// Writes to the control plane in flight at once.
const WRITES_IN_FLIGHT: usize = 8;

/// A stored response as it travels to and from the control plane.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Stored {
    /// Digest of the API key that created it.
    pub owner: String,
    /// `{"response": <Response object>, "items": [<the conversation, as input items>]}`.
    pub body: serde_json::Value,
}

/// The control plane's store of responses (`/api/v1/agent/responses/{id}`).
pub trait RemoteResponses: Send + Sync + std::fmt::Debug {
    /// Stores `stored` under `id`.
    fn put(&self, id: String, stored: Stored) -> BoxFuture<'static, Result<(), String>>;
    /// `Ok(None)`: not stored (never, expired or deleted).
    fn get(&self, id: String) -> BoxFuture<'static, Result<Option<Stored>, String>>;
    /// `Ok(false)`: there was nothing to delete.
    fn delete(&self, id: String) -> BoxFuture<'static, Result<bool, String>>;
}

/// Why a lookup could not answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the control plane, which keeps responses stored on other nodes, is unreachable: {0}")]
pub struct Unavailable(pub String);

#[derive(Debug)]
struct Entry {
    stored: Arc<Stored>,
    /// The control plane has it (written from here, or read from there).
    flushed: Arc<AtomicBool>,
    /// Deleted before its queued write went out: the write is skipped.
    deleted: Arc<AtomicBool>,
}

#[derive(Debug, Default)]
struct Local {
    entries: HashMap<String, Entry>,
    order: VecDeque<String>,
}

struct Write {
    id: String,
    stored: Arc<Stored>,
    flushed: Arc<AtomicBool>,
    deleted: Arc<AtomicBool>,
}

/// The node's stored responses.
#[derive(Debug)]
pub struct ResponseStore {
    capacity: usize,
    local: Mutex<Local>,
    /// Shared with the writer task, which reads the current one at each write (the
    /// credential changes when the node registers again).
    remote: Arc<RwLock<Option<Arc<dyn RemoteResponses>>>>,
    writes: Mutex<Option<mpsc::Sender<Write>>>,
}

impl Default for ResponseStore {
    fn default() -> Self {
        Self::new(LOCAL_CAPACITY)
    }
}

impl ResponseStore {
    /// A store keeping at most `capacity` responses in memory.
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            local: Mutex::new(Local::default()),
            remote: Arc::new(RwLock::new(None)),
            writes: Mutex::new(None),
        }
    }

    /// Uses `remote` from now on (the control-plane client, once registered; again with a new
    /// credential after a re-registration). Starts the writer task the first time: call it
    /// inside the runtime.
    pub fn set_remote(&self, remote: Arc<dyn RemoteResponses>) {
        if let Ok(mut slot) = self.remote.write() {
            *slot = Some(remote);
        }
        let Ok(mut writes) = self.writes.lock() else {
            return;
        };
        if writes.is_none() {
            let (tx, rx) = mpsc::channel::<Write>(WRITE_QUEUE);
            *writes = Some(tx);
            tokio::spawn(write_behind(rx, self.remote.clone()));
        }
    }

    fn remote(&self) -> Option<Arc<dyn RemoteResponses>> {
        self.remote.read().ok().and_then(|r| r.clone())
    }

    /// Whether responses go to a control plane too.
    pub fn is_shared(&self) -> bool {
        self.remote().is_some()
    }

    /// Keeps `stored` under `id` here at once and queues its write to the control plane.
    pub fn put(&self, id: &str, stored: Stored) {
        let stored = Arc::new(stored);
        let flushed = Arc::new(AtomicBool::new(false));
        let deleted = Arc::new(AtomicBool::new(false));
        self.insert(id, stored.clone(), flushed.clone(), deleted.clone());
        let sender = self.writes.lock().ok().and_then(|w| w.clone());
        if let Some(sender) = sender {
            let write = Write {
                id: id.to_owned(),
                stored,
                flushed,
                deleted,
            };
            if sender.try_send(write).is_err() {
                tracing::warn!(
                    id,
                    "the write queue to the control plane is full: this stored \
                    response is kept on this node only"
                );
            }
        }
    }

    fn insert(
        &self,
        id: &str,
        stored: Arc<Stored>,
        flushed: Arc<AtomicBool>,
        deleted: Arc<AtomicBool>,
    ) {
        let Ok(mut local) = self.local.lock() else {
            return;
        };
        let entry = Entry {
            stored,
            flushed,
            deleted,
        };
        if local.entries.insert(id.to_owned(), entry).is_none() {
            local.order.push_back(id.to_owned());
        }
        while local.entries.len() > self.capacity {
            let Some(oldest) = local.order.pop_front() else {
                break;
            };
            local.entries.remove(&oldest);
        }
    }

    fn local(&self, id: &str) -> Option<(Arc<Stored>, bool)> {
        let local = self.local.lock().ok()?;
        local
            .entries
            .get(id)
            .map(|e| (e.stored.clone(), e.flushed.load(Ordering::Acquire)))
    }

    fn forget(&self, id: &str) {
        if let Ok(mut local) = self.local.lock()
            && let Some(entry) = local.entries.remove(id)
        {
            entry.deleted.store(true, Ordering::Release);
            local.order.retain(|i| i != id);
        }
    }

    /// Response `id` if `owner` stored it: here, else from the control plane.
    pub async fn get(&self, id: &str, owner: &str) -> Result<Option<Arc<Stored>>, Unavailable> {
        let remote = self.remote();
        if let Some((stored, flushed)) = self.local(id) {
            if stored.owner != owner {
                return Ok(None);
            }
            if flushed && let Some(remote) = remote {
                match remote.get(id.to_owned()).await {
                    // Deleted on another node, or expired.
                    Ok(None) => {
                        self.forget(id);
                        return Ok(None);
                    }
                    Ok(Some(_)) => {}
                    Err(error) => {
                        tracing::debug!(id, %error, "control plane unreachable: serving the local copy");
                    }
                }
            }
            return Ok(Some(stored));
        }
        let Some(remote) = remote else {
            return Ok(None);
        };
        match remote.get(id.to_owned()).await {
            Ok(Some(stored)) if stored.owner == owner => {
                let stored = Arc::new(stored);
                self.insert(
                    id,
                    stored.clone(),
                    Arc::new(AtomicBool::new(true)),
                    Arc::new(AtomicBool::new(false)),
                );
                Ok(Some(stored))
            }
            Ok(_) => Ok(None),
            Err(error) => Err(Unavailable(error)),
        }
    }

    /// Deletes response `id` if `owner` stored it, here and on the control plane; `false`:
    /// there was none of theirs.
    pub async fn delete(&self, id: &str, owner: &str) -> Result<bool, Unavailable> {
        let remote = self.remote();
        let here = match self.local(id) {
            Some((stored, _)) if stored.owner != owner => return Ok(false),
            Some(_) => {
                self.forget(id);
                true
            }
            None => false,
        };
        let Some(remote) = remote else {
            return Ok(here);
        };
        if !here {
            match remote.get(id.to_owned()).await {
                Ok(Some(stored)) if stored.owner == owner => {}
                Ok(_) => return Ok(false),
                Err(error) => return Err(Unavailable(error)),
            }
        }
        match remote.delete(id.to_owned()).await {
            Ok(there) => Ok(here || there),
            // Deleted here; the control plane's copy is left to expire. Said, not hidden.
            Err(error) if here => {
                tracing::warn!(id, %error, "deleting a stored response on the control plane \
                    failed: other nodes may still find it until it expires");
                Ok(true)
            }
            Err(error) => Err(Unavailable(error)),
        }
    }
}

async fn write_behind(
    rx: mpsc::Receiver<Write>,
    remote: Arc<RwLock<Option<Arc<dyn RemoteResponses>>>>,
) {
    let writes =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|w| (w, rx)) });
    writes
        .for_each_concurrent(WRITES_IN_FLIGHT, |write| {
            let remote = remote.read().ok().and_then(|r| r.clone());
            async move {
                let Some(remote) = remote else { return };
                if write.deleted.load(Ordering::Acquire) {
                    return;
                }
                let stored = Stored::clone(&write.stored);
                match remote.put(write.id.clone(), stored).await {
                    Ok(()) => write.flushed.store(true, Ordering::Release),
                    Err(error) => tracing::warn!(id = %write.id, %error,
                        "storing a response on the control plane failed: it is kept on this \
                         node only"),
                }
            }
        })
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The control plane's table, in memory; `down` makes every call fail.
    #[derive(Debug, Default)]
    struct Fake {
        rows: Mutex<HashMap<String, Stored>>,
        down: AtomicBool,
    }

    #[derive(Debug)]
    struct Remote(Arc<Fake>);

    impl Remote {
        fn check(&self) -> Result<(), String> {
            if self.0.down.load(Ordering::Acquire) {
                Err("down".into())
            } else {
                Ok(())
            }
        }
    }

    impl RemoteResponses for Remote {
        fn put(&self, id: String, stored: Stored) -> BoxFuture<'static, Result<(), String>> {
            let result = self.check().map(|()| {
                self.0.rows.lock().unwrap().insert(id, stored);
            });
            Box::pin(async move { result })
        }
        fn get(&self, id: String) -> BoxFuture<'static, Result<Option<Stored>, String>> {
            let result = self
                .check()
                .map(|()| self.0.rows.lock().unwrap().get(&id).cloned());
            Box::pin(async move { result })
        }
        fn delete(&self, id: String) -> BoxFuture<'static, Result<bool, String>> {
            let result = self
                .check()
                .map(|()| self.0.rows.lock().unwrap().remove(&id).is_some());
            Box::pin(async move { result })
        }
    }

    fn stored(owner: &str) -> Stored {
        Stored {
            owner: owner.into(),
            body: serde_json::json!({"response": {}, "items": []}),
        }
    }

    async fn flushed(store: &ResponseStore, id: &str) {
        for _ in 0..200 {
            if store.local(id).is_some_and(|(_, f)| f) {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        panic!("{id} was never written behind");
    }

    /// Two nodes over one control plane: written behind, found from the other node, deleted
    /// there and then gone here; another owner sees nothing; an outage hides only what is
    /// stored elsewhere.
    #[tokio::test]
    async fn two_nodes_share_through_the_control_plane() {
        let fake = Arc::new(Fake::default());
        let (a, b) = (ResponseStore::new(8), ResponseStore::new(8));
        a.set_remote(Arc::new(Remote(fake.clone())));
        b.set_remote(Arc::new(Remote(fake.clone())));
        a.put("r1", stored("k1"));
        flushed(&a, "r1").await;
        assert!(b.get("r1", "k1").await.unwrap().is_some());
        assert!(b.get("r1", "k2").await.unwrap().is_none());
        assert!(!b.delete("r1", "k2").await.unwrap());
        assert!(b.delete("r1", "k1").await.unwrap());
        assert!(a.get("r1", "k1").await.unwrap().is_none());
        assert!(!a.delete("r1", "k1").await.unwrap());

        a.put("r2", stored("k1"));
        flushed(&a, "r2").await;
        fake.down.store(true, Ordering::Release);
        assert!(a.get("r2", "k1").await.unwrap().is_some());
        assert!(b.get("r2", "k1").await.is_err());
    }

    /// Without a control plane: local only, bounded, owner-checked.
    #[tokio::test]
    async fn standalone_is_local_and_bounded() {
        let store = ResponseStore::new(2);
        for id in ["a", "b", "c"] {
            store.put(id, stored("k"));
        }
        assert!(store.get("a", "k").await.unwrap().is_none());
        assert!(store.get("c", "k").await.unwrap().is_some());
        assert!(store.get("c", "other").await.unwrap().is_none());
        assert!(store.delete("c", "k").await.unwrap());
        assert!(store.get("c", "k").await.unwrap().is_none());
    }
}
