//! The IO layer of the lower tiers: host memory's bytes, the disk writer thread and its
//! bounded queue, reads at onboarding. Every decision is the [`TierBook`]'s; this only moves
//! bytes and reports back what happened to them.
//!
//! The scheduler's step loop never waits on a disk write: writes go to one writer thread
//! through a queue of at most `write_queue_blocks` blocks, and a write that finds it full is
//! refused (counted; the block simply is not on disk). Blocks on their way to disk stay
//! readable from the queue's side table, so a prompt arriving meanwhile still hits them.
//! Reads (onboarding) are synchronous and checked; an unusable block is dropped from its tier
//! and recomputed by the caller.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

use kvfleet_proto::{BlockHash, SequenceHash, Tier};

use super::book::{Action, Fault, TierBook, TierStats};
use super::{TierConfig, TierError, TierStorage, disk};
use crate::block_pool::{BlockId, Evicted, Origin};
use crate::fast_hash::FastMap;

enum Job {
    Write(SequenceHash, Arc<Vec<u8>>),
    Delete(SequenceHash),
}

#[derive(Default)]
struct QueueState {
    jobs: VecDeque<Job>,
    writes: usize,
    /// A job is being carried out right now.
    busy: bool,
    closed: bool,
    /// File bytes queued or being written, readable meanwhile.
    pending: FastMap<SequenceHash, Arc<Vec<u8>>>,
}

struct Queue {
    state: Mutex<QueueState>,
    ready: Condvar,
    capacity: usize,
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, QueueState> {
        // A writer that panicked leaves consistent state (every field is updated atomically
        // under the lock): keep going rather than poison the engine.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A finished disk write that failed.
struct WriteFailed(SequenceHash, Fault);

struct DiskTier {
    dir: PathBuf,
    queue: Arc<Queue>,
    failures: mpsc::Receiver<WriteFailed>,
    writer: Option<JoinHandle<()>>,
}

impl DiskTier {
    fn open(dir: PathBuf, capacity: usize) -> Result<Self, TierError> {
        let queue = Arc::new(Queue {
            state: Mutex::new(QueueState::default()),
            ready: Condvar::new(),
            capacity: capacity.max(1),
        });
        let (tx, failures) = mpsc::channel();
        let writer = {
            let queue = Arc::clone(&queue);
            let writer_dir = dir.clone();
            std::thread::Builder::new()
                .name("kv-disk-writer".into())
                .spawn(move || write_loop(&queue, &writer_dir, &tx))
                .map_err(|e| TierError::Io {
                    path: dir.clone(),
                    message: format!("starting the disk writer: {e}"),
                })?
        };
        Ok(Self {
            dir,
            queue,
            failures,
            writer: Some(writer),
        })
    }

    fn enqueue_write(&self, hash: SequenceHash, file: Vec<u8>) -> bool {
        let mut q = self.queue.lock();
        if q.writes >= self.queue.capacity {
            return false;
        }
        let file = Arc::new(file);
        q.pending.insert(hash, Arc::clone(&file));
        q.jobs.push_back(Job::Write(hash, file));
        q.writes += 1;
        drop(q);
        self.queue.ready.notify_one();
        true
    }

    fn enqueue_delete(&self, hash: SequenceHash) {
        let mut q = self.queue.lock();
        q.pending.remove(&hash);
        q.jobs.push_back(Job::Delete(hash));
        drop(q);
        self.queue.ready.notify_one();
    }

    fn pending(&self, hash: SequenceHash) -> Option<Arc<Vec<u8>>> {
        self.queue.lock().pending.get(&hash).cloned()
    }
}

impl Drop for DiskTier {
    /// Finishes the queued writes (at most `write_queue_blocks`), so what was offloaded before
    /// a clean stop is there after the restart.
    fn drop(&mut self) {
        self.queue.lock().closed = true;
        self.queue.ready.notify_all();
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

fn write_loop(queue: &Queue, dir: &Path, failures: &mpsc::Sender<WriteFailed>) {
    loop {
        let job = {
            let mut q = queue.lock();
            loop {
                if let Some(job) = q.jobs.pop_front() {
                    q.busy = true;
                    break job;
                }
                if q.closed {
                    return;
                }
                q = queue.ready.wait(q).unwrap_or_else(PoisonError::into_inner);
            }
        };
        match job {
            Job::Write(hash, file) => {
                let result = disk::write(dir, &file, hash);
                let mut q = queue.lock();
                q.writes -= 1;
                q.busy = false;
                // Only this write's bytes: a later write of the same hash replaced them.
                if q.pending.get(&hash).is_some_and(|p| Arc::ptr_eq(p, &file)) {
                    q.pending.remove(&hash);
                }
                drop(q);
                if let Err(fault) = result {
                    let _ = failures.send(WriteFailed(hash, fault));
                }
            }
            Job::Delete(hash) => {
                let _ = std::fs::remove_file(disk::block_path(dir, hash));
                queue.lock().busy = false;
            }
        }
    }
}

/// The lower tiers of one engine: the [`TierBook`] and, unless modelled, the bytes.
pub struct TierStore {
    book: TierBook,
    storage: TierStorage,
    layout: u64,
    block_bytes: u64,
    host: FastMap<SequenceHash, Arc<Vec<u8>>>,
    disk: Option<DiskTier>,
    actions: Vec<Action>,
    /// Files a start-up scan found unusable and deleted.
    deleted_at_start: u64,
}

impl std::fmt::Debug for TierStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TierStore")
            .field("storage", &self.storage)
            .field("stats", &self.book.stats())
            .finish_non_exhaustive()
    }
}

impl TierStore {
    /// Opens the tiers `config` describes for blocks of `layout_fingerprint` and `block_bytes`.
    /// With G3 stored on disk, scans its directory, deletes unusable files and announces the
    /// rest (as G3 `Stored` events, from [`TierStore::take_events`]).
    pub fn open(
        config: &TierConfig,
        layout_fingerprint: u64,
        block_bytes: u64,
    ) -> Result<Self, TierError> {
        let blocks = |bytes: u64| bytes / block_bytes.max(1);
        let book = TierBook::new(
            block_bytes,
            blocks(config.host_bytes),
            blocks(config.disk_bytes),
            config.admission,
        );
        let mut store = Self {
            book,
            storage: config.storage,
            layout: layout_fingerprint,
            block_bytes,
            host: FastMap::default(),
            disk: None,
            actions: Vec::new(),
            deleted_at_start: 0,
        };
        if config.storage == TierStorage::Stored && blocks(config.disk_bytes) > 0 {
            let dir = disk::layout_dir(&config.disk_dir, layout_fingerprint);
            let scan =
                disk::scan(&dir, layout_fingerprint, block_bytes).map_err(|e| TierError::Io {
                    path: dir.clone(),
                    message: e.to_string(),
                })?;
            store.deleted_at_start = scan.deleted;
            store.disk = Some(DiskTier::open(dir, config.write_queue_blocks)?);
            let mut actions = Vec::new();
            store.book.restore_g3(scan.blocks, &mut actions);
            store.apply(&actions, &[], &[]);
        }
        Ok(store)
    }

    /// Whether any lower tier is on.
    pub fn enabled(&self) -> bool {
        self.book.enabled()
    }

    /// Whether bytes are really kept (false: the simulator's modelled tiers).
    pub fn stores_bytes(&self) -> bool {
        self.storage == TierStorage::Stored
    }

    /// The figures so far.
    pub fn stats(&self) -> TierStats {
        self.book.stats()
    }

    /// Files the start-up scan found unusable and deleted.
    pub fn deleted_at_start(&self) -> u64 {
        self.deleted_at_start
    }

    /// The fastest lower tier holding `hash`.
    pub fn lookup(&self, hash: SequenceHash) -> Option<Tier> {
        self.book.lookup(hash)
    }

    /// Every block G3 holds, oldest first.
    pub fn g3_blocks(&self) -> Vec<SequenceHash> {
        self.book.g3_blocks()
    }

    /// Which of `evicted` need their G1 bytes (call [`TierStore::offload`] with them, in the
    /// order given); decides where every evicted block goes.
    pub fn plan_offload(&mut self, evicted: &[Evicted]) -> Vec<BlockId> {
        self.actions.clear();
        let mut actions = std::mem::take(&mut self.actions);
        for e in evicted {
            self.book.offload(e, &mut actions);
        }
        self.actions = actions;
        if !self.stores_bytes() {
            return Vec::new();
        }
        self.actions
            .iter()
            .filter_map(|a| match a {
                Action::HostFromG1 { block, .. } | Action::DiskFromG1 { block, .. } => Some(*block),
                _ => None,
            })
            .collect()
    }

    /// Carries out the last [`TierStore::plan_offload`] with the bytes of the blocks it asked
    /// for (`data`: `blocks.len()` blocks, concatenated).
    pub fn offload(&mut self, blocks: &[BlockId], data: &[u8]) {
        let actions = std::mem::take(&mut self.actions);
        self.apply(&actions, blocks, data);
        self.actions = actions;
    }

    fn apply(&mut self, actions: &[Action], blocks: &[BlockId], data: &[u8]) {
        if !self.stores_bytes() {
            return;
        }
        let bb = self.block_bytes as usize;
        let g1_bytes = |block: u32| {
            let i = blocks.iter().position(|&b| b == block)?;
            data.get(i * bb..(i + 1) * bb)
        };
        for action in actions {
            match *action {
                Action::HostFromG1 { block, hash } => match g1_bytes(block) {
                    Some(bytes) => {
                        self.host.insert(hash.sequence, Arc::new(bytes.to_vec()));
                    }
                    None => self.book.fault(hash.sequence, Tier::G2, Fault::Missing),
                },
                Action::DiskFromG1 {
                    block,
                    hash,
                    parent,
                    origin,
                } => match g1_bytes(block) {
                    Some(bytes) => self.write_disk(hash, parent, origin.is_some(), bytes),
                    None => self.book.fault(hash.sequence, Tier::G3, Fault::Missing),
                },
                Action::DiskFromHost {
                    hash,
                    parent,
                    origin,
                } => match self.host.get(&hash.sequence) {
                    Some(bytes) => {
                        let bytes = Arc::clone(bytes);
                        self.write_disk(hash, parent, origin.is_some(), &bytes);
                    }
                    None => self.book.fault(hash.sequence, Tier::G3, Fault::Missing),
                },
                Action::DropHost(hash) => {
                    self.host.remove(&hash);
                }
                Action::DeleteDisk(hash) => {
                    if let Some(disk) = &self.disk {
                        disk.enqueue_delete(hash);
                    }
                }
            }
        }
    }

    fn write_disk(
        &mut self,
        hash: BlockHash,
        parent: Option<SequenceHash>,
        supplied: bool,
        payload: &[u8],
    ) {
        let Some(disk) = &self.disk else {
            self.book.fault(hash.sequence, Tier::G3, Fault::Io);
            return;
        };
        let file = disk::encode_supplied(self.layout, hash, parent, payload, supplied);
        if !disk.enqueue_write(hash.sequence, file) {
            self.book.refused(hash.sequence, Tier::G3);
        }
    }

    /// Reads a block's bytes from `tier` for onboarding (`Ok(None)` when bytes are only
    /// modelled). On a fault the block is dropped from the tier, counted, and the caller
    /// recomputes it.
    pub fn fetch(&mut self, hash: SequenceHash, tier: Tier) -> Result<Option<Arc<Vec<u8>>>, Fault> {
        if !self.stores_bytes() {
            return Ok(None);
        }
        let result = match tier {
            // Shared, not copied: the one copy is the executor's, into its KV memory.
            Tier::G2 => self.host.get(&hash).map(Arc::clone).ok_or(Fault::Missing),
            Tier::G3 => match &self.disk {
                None => Err(Fault::Missing),
                Some(disk) => match disk.pending(hash) {
                    Some(file) => disk::decode(&file, self.layout, hash, self.block_bytes)
                        .map(|payload| Arc::new(payload.to_vec())),
                    None => {
                        disk::read(&disk.dir, self.layout, hash, self.block_bytes).map(Arc::new)
                    }
                },
            },
            Tier::G1 | Tier::G4 => Err(Fault::Missing),
        };
        if let Err(fault) = result {
            self.book.fault(hash, tier, fault);
            if tier == Tier::G3
                && let Some(disk) = &self.disk
            {
                disk.enqueue_delete(hash);
            }
            if tier == Tier::G2 {
                self.host.remove(&hash);
            }
        }
        result.map(Some)
    }

    /// Who supplied the block `hash` in a lower tier (`None`: computed here, or not held).
    pub fn origin_of(&self, hash: SequenceHash) -> Option<Origin> {
        self.book.origin_of(hash)
    }

    /// Drops every block `origin` supplied from G2 (its bytes freed now) and G3 (its files
    /// deleted by the writer thread, in order after any write of them still queued). Returns
    /// how many blocks went; their `Removed` events follow from [`TierStore::take_events`].
    pub fn evict_origin(&mut self, origin: Origin) -> usize {
        let mut actions = Vec::new();
        let n = self.book.evict_origin(origin, &mut actions);
        if self.stores_bytes() {
            self.apply(&actions, &[], &[]);
        }
        n
    }

    /// A block was brought from `tier` into G1.
    pub fn onboarded(&mut self, hash: SequenceHash, tier: Tier) {
        self.book.onboarded(hash, tier);
    }

    /// Takes note of finished disk writes that failed (a full disk, an IO error): those blocks
    /// leave G3. Call once per step.
    pub fn poll(&mut self) {
        let Some(disk) = &self.disk else {
            return;
        };
        let failed: Vec<WriteFailed> = disk.failures.try_iter().collect();
        for WriteFailed(hash, fault) in failed {
            self.book.fault(hash, Tier::G3, fault);
        }
    }

    /// Blocks until every queued disk write and delete is done (tests and clean shutdowns).
    pub fn flush(&mut self) {
        if let Some(disk) = &self.disk {
            loop {
                let q = disk.queue.lock();
                if q.jobs.is_empty() && !q.busy {
                    break;
                }
                drop(q);
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
        self.poll();
    }

    /// Takes the lower tiers' KV events since the last call.
    pub fn take_events(&mut self) -> Vec<(Tier, kvfleet_proto::KvEventData)> {
        self.book.take_events()
    }
}
