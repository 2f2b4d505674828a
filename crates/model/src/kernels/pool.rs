//! The fork-join pool the kernels run on.
//!
//! A decode step of a 30-layer model runs about 150 parallel regions (matmuls, attention), each
//! a few tens of microseconds of work; with rayon's inject-and-wait from outside its pool, the
//! handoff alone measured a large share of a step. Here the caller publishes a job (a task
//! count and a `Fn(task)`), runs tasks itself, and workers that spin on an epoch counter join
//! within a fraction of a microsecond; after ~0.5 ms without work they park (no CPU burnt
//! between requests). Tasks are claimed from an atomic counter, so which thread runs a task
//! varies, but no kernel's arithmetic depends on that: results are the same on any schedule.
//!
//! One job runs at a time per pool. A second caller (another engine in the same process, a
//! nested region, a test thread) does not wait: it runs its tasks inline on its own thread,
//! with the same results.
//!
//! The one `unsafe` here is lifetime erasure: workers see the job through a raw pointer, and
//! [`Pool::run`] does not return (or unwind) until every worker has finished with it.

use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::{self, JoinHandle, Thread};
use std::time::{Duration, Instant};

/// How long an idle worker spins before it parks.
const SPIN: Duration = Duration::from_micros(500);

struct Job<'a> {
    f: &'a (dyn Fn(usize) + Sync),
    tasks: usize,
}

struct Shared {
    /// Bumped for every published job.
    epoch: AtomicU64,
    /// The current job, null when none (or when its caller is retracting it).
    job: AtomicPtr<Job<'static>>,
    /// Next task index to claim.
    next: AtomicUsize,
    /// Tasks finished (run or panicked).
    done: AtomicUsize,
    /// Workers currently holding the job pointer.
    inside: AtomicUsize,
    /// Workers parked (or about to park).
    sleeping: AtomicUsize,
    /// A task panicked in a worker.
    panicked: AtomicBool,
    stop: AtomicBool,
}

/// A fixed set of worker threads plus the calling thread.
pub(crate) struct Pool {
    shared: Arc<Shared>,
    threads: Vec<Thread>,
    handles: Vec<JoinHandle<()>>,
    busy: Mutex<()>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("threads", &self.threads())
            .finish()
    }
}

impl Pool {
    /// A pool where `threads` threads (the caller included) run each job.
    pub(crate) fn new(threads: usize) -> Pool {
        let shared = Arc::new(Shared {
            epoch: AtomicU64::new(0),
            job: AtomicPtr::new(std::ptr::null_mut()),
            next: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            inside: AtomicUsize::new(0),
            sleeping: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            stop: AtomicBool::new(false),
        });
        let mut handles = Vec::new();
        for i in 1..threads.max(1) {
            let s = Arc::clone(&shared);
            let spawned = thread::Builder::new()
                .name(format!("kvfleet-kernel-{i}"))
                .spawn(move || worker(&s));
            // A worker that cannot be spawned only costs parallelism.
            if let Ok(h) = spawned {
                handles.push(h);
            }
        }
        Pool {
            threads: handles.iter().map(|h| h.thread().clone()).collect(),
            shared,
            handles,
            busy: Mutex::new(()),
        }
    }

    /// The process-wide pool: `KVFLEET_THREADS` threads, else one per available core.
    pub(crate) fn global() -> &'static Pool {
        static POOL: OnceLock<Pool> = OnceLock::new();
        POOL.get_or_init(|| {
            let n = std::env::var("KVFLEET_THREADS")
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .filter(|&n| n > 0)
                .unwrap_or_else(|| thread::available_parallelism().map_or(1, |n| n.get()));
            Pool::new(n)
        })
    }

    /// Threads that run a job (workers and the caller).
    pub(crate) fn threads(&self) -> usize {
        self.handles.len() + 1
    }

    /// Runs `f(0) .. f(tasks - 1)`, spread over the pool, and returns when all have finished.
    /// A panic in a task is re-raised here after every task has stopped.
    pub(crate) fn run(&self, tasks: usize, f: &(dyn Fn(usize) + Sync)) {
        if tasks == 0 {
            return;
        }
        let guard = match self.busy.try_lock() {
            Ok(g) if tasks > 1 && !self.handles.is_empty() => g,
            _ => {
                (0..tasks).for_each(f);
                return;
            }
        };
        let s = &*self.shared;
        let job = Job { f, tasks };
        s.next.store(0, Ordering::Relaxed);
        s.done.store(0, Ordering::Relaxed);
        s.panicked.store(false, Ordering::Relaxed);
        // Workers only dereference the pointer between registering in `inside` and
        // unregistering, and the caller below waits for `inside == 0` after retracting it, so
        // the erased lifetime never outlives `job`.
        let ptr = (&job as *const Job<'_>).cast::<Job<'static>>().cast_mut();
        s.job.store(ptr, Ordering::SeqCst);
        s.epoch.fetch_add(1, Ordering::SeqCst);
        if s.sleeping.load(Ordering::SeqCst) > 0 {
            self.threads.iter().for_each(Thread::unpark);
        }
        let mine = claim(s, &job);
        // Every claimed task finishes before the job is retracted.
        let mut spins = 0u32;
        while s.done.load(Ordering::Acquire) < tasks {
            backoff(&mut spins);
        }
        s.job.store(std::ptr::null_mut(), Ordering::SeqCst);
        while s.inside.load(Ordering::SeqCst) > 0 {
            backoff(&mut spins);
        }
        let worker_panicked = s.panicked.load(Ordering::Acquire);
        drop(guard);
        if let Some(p) = mine {
            resume_unwind(p);
        }
        if worker_panicked {
            panic!("a kernel task panicked on a pool worker");
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.epoch.fetch_add(1, Ordering::SeqCst);
        self.threads.iter().for_each(Thread::unpark);
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

/// Claims and runs tasks until none are left; counts each as done even if it panics, and
/// returns the first panic's payload for the caller to re-raise once the job is retracted.
fn claim(s: &Shared, job: &Job<'_>) -> Option<Box<dyn std::any::Any + Send>> {
    let mut first = None;
    loop {
        let i = s.next.fetch_add(1, Ordering::Relaxed);
        if i >= job.tasks {
            return first;
        }
        let r = catch_unwind(AssertUnwindSafe(|| (job.f)(i)));
        s.done.fetch_add(1, Ordering::Release);
        if let Err(p) = r {
            first.get_or_insert(p);
        }
    }
}

#[inline]
fn backoff(spins: &mut u32) {
    *spins = spins.saturating_add(1);
    if *spins < 1 << 12 {
        std::hint::spin_loop();
    } else {
        thread::yield_now();
    }
}

fn worker(s: &Shared) {
    let mut seen = s.epoch.load(Ordering::SeqCst);
    loop {
        // Wait for a new epoch: spin, then park.
        let start = Instant::now();
        let mut spins = 0u32;
        loop {
            let e = s.epoch.load(Ordering::SeqCst);
            if e != seen {
                seen = e;
                break;
            }
            spins = spins.wrapping_add(1);
            if !spins.is_multiple_of(256) {
                std::hint::spin_loop();
                continue;
            }
            // A worker that starts after the pool is dropped never sees a new epoch.
            if s.stop.load(Ordering::SeqCst) {
                return;
            }
            if start.elapsed() < SPIN {
                std::hint::spin_loop();
                continue;
            }
            s.sleeping.fetch_add(1, Ordering::SeqCst);
            if s.epoch.load(Ordering::SeqCst) == seen && !s.stop.load(Ordering::SeqCst) {
                thread::park();
            }
            s.sleeping.fetch_sub(1, Ordering::SeqCst);
        }
        if s.stop.load(Ordering::SeqCst) {
            return;
        }
        s.inside.fetch_add(1, Ordering::SeqCst);
        let ptr = s.job.load(Ordering::SeqCst);
        if !ptr.is_null() {
            // SAFETY: `ptr` was published by `Pool::run`, which retracts it (stores null) and
            // then waits until `inside` is zero before its `Job` goes out of scope. We
            // registered in `inside` before loading the pointer (both SeqCst), so either the
            // caller sees our registration and waits for us, or we see the retraction (null).
            let job = unsafe { &*ptr };
            if claim(s, job).is_some() {
                s.panicked.store(true, Ordering::Release);
            }
        }
        s.inside.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Where parallel tasks write: disjoint ranges of one buffer.
pub(crate) struct OutPtr {
    ptr: *mut f32,
    len: usize,
}

// SAFETY: an `OutPtr` is only written through `OutPtr::write`, whose contract (disjoint ranges,
// buffer alive) its callers uphold; sharing the pointer between threads is then sound.
unsafe impl Sync for OutPtr {}
// SAFETY: as above.
unsafe impl Send for OutPtr {}

impl OutPtr {
    pub(crate) fn new(v: &mut [f32]) -> OutPtr {
        OutPtr {
            ptr: v.as_mut_ptr(),
            len: v.len(),
        }
    }

    /// Copies `src` to `[at, at + src.len())`.
    ///
    /// # Safety
    /// No other thread reads or writes that range during the call, and the buffer outlives it.
    pub(crate) unsafe fn write(&self, at: usize, src: &[f32]) {
        assert!(at.checked_add(src.len()).is_some_and(|end| end <= self.len));
        // SAFETY: in bounds (checked above); exclusive access to the range is the caller's
        // contract.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr.add(at), src.len()) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    #[test]
    fn every_task_runs_exactly_once() {
        let pool = Pool::new(3);
        for tasks in [0, 1, 2, 7, 100, 1000] {
            let hits: Vec<AtomicU32> = (0..tasks).map(|_| AtomicU32::new(0)).collect();
            pool.run(tasks, &|i| {
                hits[i].fetch_add(1, Ordering::Relaxed);
            });
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
        }
    }

    #[test]
    fn concurrent_and_nested_callers_run_inline() {
        let pool = Arc::new(Pool::new(2));
        let total = AtomicU32::new(0);
        thread::scope(|sc| {
            for _ in 0..4 {
                sc.spawn(|| {
                    for _ in 0..50 {
                        pool.run(8, &|_| {
                            // A nested region runs inline on this thread.
                            pool.run(3, &|_| {
                                total.fetch_add(1, Ordering::Relaxed);
                            });
                        });
                    }
                });
            }
        });
        assert_eq!(total.load(Ordering::Relaxed), 4 * 50 * 8 * 3);
    }

    #[test]
    fn a_panicking_task_is_reraised_and_the_pool_keeps_working() {
        let pool = Pool::new(2);
        let r = catch_unwind(AssertUnwindSafe(|| {
            pool.run(64, &|i| assert!(i != 17, "task 17 fails"));
        }));
        assert!(r.is_err());
        let n = AtomicU32::new(0);
        pool.run(64, &|_| {
            n.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(n.load(Ordering::Relaxed), 64);
    }

    #[test]
    fn parked_workers_wake_up() {
        let pool = Pool::new(2);
        thread::sleep(SPIN * 4);
        let n = AtomicU32::new(0);
        pool.run(16, &|_| {
            n.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(n.load(Ordering::Relaxed), 16);
    }
}
