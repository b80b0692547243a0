//! A tiny persistent fork-join pool for the kernels.
//!
//! A decode step runs a few hundred small matrix products of 20–500 µs each; spawning threads
//! per product (~20–50 µs each) would cost a noticeable fraction, so the pool keeps
//! `num_threads() - 1` workers alive. A call to [`run`] publishes one job (tasks
//! `0..n_tasks`, claimed one at a time from a shared counter by every participating thread),
//! works on it itself, and returns when all tasks are done.
//!
//! Robustness on a busy machine matters more than elegance here: with other processes on two
//! cores, a worker may not get the CPU for milliseconds. So a worker must *join* a job before
//! touching it, and the caller *closes* the job once every task is claimed: a worker that wakes
//! up late finds the job closed and goes back to waiting, and the caller only ever waits for
//! workers that are actually running a task. Join and close are one atomic word
//! (`CLOSED` bit + count of joined workers), so no worker can join after the close.
//!
//! Workers spin briefly after a job (the next product usually follows within microseconds)
//! and then park, so an idle process does not burn a core. Only one job runs at a time: a
//! caller that finds the pool busy (another thread is mid-product) runs its tasks inline.
//!
//! The thread count defaults to `min(2, available cores)` and can be set with the
//! `MARCO_THREADS` environment variable (read once, at first use).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock, TryLockError};
use std::thread::Thread;
use std::time::{Duration, Instant};

/// How long an idle worker spins before parking.
const SPIN_BEFORE_PARK: Duration = Duration::from_micros(300);

/// Set in `Shared::joined` once the current job accepts no more workers.
const CLOSED: u64 = 1 << 63;

/// A job as the workers see it: a type- and lifetime-erased `&dyn Fn() + Sync`.
#[derive(Clone, Copy)]
struct JobRef {
    data: *const (dyn Fn() + Sync + 'static),
}

// SAFETY: the pointee is `Sync`; `run` keeps it alive while any worker has joined the job.
unsafe impl Send for JobRef {}
unsafe impl Sync for JobRef {}

struct Shared {
    /// Bumped once per published job; wakes the workers.
    generation: AtomicU64,
    /// `CLOSED` bit plus the number of workers currently inside the job.
    joined: AtomicU64,
    /// The current job (dereferenced only by a worker that has joined it).
    job: Mutex<Option<JobRef>>,
    /// Set when a worker's task panicked, so that the caller can re-raise it.
    worker_panicked: AtomicBool,
}

impl Shared {
    /// Enters the current job unless it is closed.
    fn try_join(&self) -> bool {
        let mut state = self.joined.load(Ordering::Acquire);
        loop {
            if state & CLOSED != 0 {
                return false;
            }
            match self.joined.compare_exchange_weak(state, state + 1, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return true,
                Err(current) => state = current,
            }
        }
    }
}

struct Pool {
    shared: &'static Shared,
    workers: Vec<Thread>,
    /// Serializes jobs; `try_lock` failure means "busy, run inline".
    busy: Mutex<()>,
}

static POOL: OnceLock<Pool> = OnceLock::new();

/// The number of threads the kernels split work across (the caller included).
pub fn num_threads() -> usize {
    pool().workers.len() + 1
}

fn requested_threads() -> usize {
    let available = std::thread::available_parallelism().map_or(1, |n| n.get());
    std::env::var("MARCO_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&n| n >= 1)
        .unwrap_or_else(|| available.min(2))
        .min(64)
}

fn pool() -> &'static Pool {
    POOL.get_or_init(|| {
        let shared: &'static Shared = Box::leak(Box::new(Shared {
            generation: AtomicU64::new(0),
            joined: AtomicU64::new(CLOSED),
            job: Mutex::new(None),
            worker_panicked: AtomicBool::new(false),
        }));
        let mut workers = Vec::new();
        for index in 1..requested_threads() {
            let spawned =
                std::thread::Builder::new().name(format!("marco-kernel-{index}")).spawn(move || worker_loop(shared));
            match spawned {
                Ok(handle) => workers.push(handle.thread().clone()),
                // Fewer threads is still correct; stop adding workers.
                Err(_) => break,
            }
        }
        Pool { shared, workers, busy: Mutex::new(()) }
    })
}

fn worker_loop(shared: &'static Shared) {
    let mut seen = 0u64;
    loop {
        let started_waiting = Instant::now();
        let mut spins = 0u32;
        loop {
            let generation = shared.generation.load(Ordering::Acquire);
            if generation != seen {
                seen = generation;
                break;
            }
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(64) && started_waiting.elapsed() > SPIN_BEFORE_PARK {
                // `unpark` from the publisher makes this return; spurious wake-ups re-check.
                std::thread::park_timeout(Duration::from_millis(50));
            } else {
                std::hint::spin_loop();
            }
        }
        if !shared.try_join() {
            continue;
        }
        let job = shared.job.lock().map(|guard| *guard).unwrap_or(None);
        if let Some(job) = job {
            // SAFETY: this worker has joined the job, and the publishing `run` call does not
            // return while any joined worker remains, so the closure is alive.
            let f = unsafe { &*job.data };
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).is_err() {
                shared.worker_panicked.store(true, Ordering::Relaxed);
            }
        }
        shared.joined.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Closes the current job and waits for the workers inside it, even if the caller's own part
/// unwinds, so that the job's closure is never freed while a worker still runs it.
struct CloseAndWait<'a> {
    shared: &'a Shared,
}

impl Drop for CloseAndWait<'_> {
    fn drop(&mut self) {
        self.shared.joined.fetch_or(CLOSED, Ordering::AcqRel);
        while self.shared.joined.load(Ordering::Acquire) != CLOSED {
            std::hint::spin_loop();
        }
    }
}

/// Runs `f(0)`, …, `f(n_tasks - 1)` with up to [`num_threads`] threads and returns when all are
/// done. Threads claim tasks one at a time, so a thread that starts late does fewer: split
/// work into a few tasks per thread.
pub(crate) fn run(n_tasks: usize, f: &(dyn Fn(usize) + Sync)) {
    let pool = pool();
    if n_tasks <= 1 || pool.workers.is_empty() {
        (0..n_tasks).for_each(f);
        return;
    }
    let _busy = match pool.busy.try_lock() {
        Ok(guard) => guard,
        Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
        Err(TryLockError::WouldBlock) => {
            (0..n_tasks).for_each(f);
            return;
        }
    };
    let next_task = AtomicUsize::new(0);
    let claim_loop = || loop {
        let task = next_task.fetch_add(1, Ordering::Relaxed);
        if task >= n_tasks {
            break;
        }
        f(task);
    };
    let claim_loop: &(dyn Fn() + Sync) = &claim_loop;
    // SAFETY: only the lifetime is erased; `CloseAndWait` below keeps `claim_loop` (and what it
    // borrows) alive until no worker is inside the job, and closed jobs cannot be joined.
    let erased: *const (dyn Fn() + Sync + 'static) = unsafe { std::mem::transmute(claim_loop) };
    let shared = pool.shared;
    match shared.job.lock() {
        Ok(mut job) => *job = Some(JobRef { data: erased }),
        Err(_) => {
            (0..n_tasks).for_each(f);
            return;
        }
    }
    // Open the job (no worker can be inside: the previous job was closed and drained).
    shared.joined.store(0, Ordering::Release);
    shared.generation.fetch_add(1, Ordering::AcqRel);
    for worker in &pool.workers {
        worker.unpark();
    }
    {
        let _close = CloseAndWait { shared };
        claim_loop();
    }
    if shared.worker_panicked.swap(false, Ordering::Relaxed) {
        // Kernels do not panic on valid input; a panic here is a bug worth surfacing loudly.
        #[allow(clippy::panic)]
        {
            panic!("a marco kernel worker thread panicked");
        }
    }
}

/// Runs `work(0)`, …, `work(tasks - 1)` on the kernels' thread pool (the caller's thread
/// included) and returns when all are done: for host-side work of a batch that waits on memory,
/// such as the per-sequence KV cache bookkeeping of a decode step, so that two threads' cache
/// misses overlap. `work` must not panic (a worker's panic is re-raised here).
pub fn parallel_for(tasks: usize, work: &(dyn Fn(usize) + Sync)) {
    run(tasks, work)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_every_task_once() {
        for n_tasks in [0usize, 1, 2, 3, 7, 64] {
            let counts: Vec<AtomicUsize> = (0..n_tasks).map(|_| AtomicUsize::new(0)).collect();
            run(n_tasks, &|t| {
                counts[t].fetch_add(1, Ordering::Relaxed);
            });
            assert!(counts.iter().all(|c| c.load(Ordering::Relaxed) == 1), "n_tasks {n_tasks}");
        }
    }

    #[test]
    fn concurrent_callers_are_correct() {
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for round in 0..200usize {
                        let sum = AtomicUsize::new(0);
                        run(5, &|t| {
                            sum.fetch_add(t + round, Ordering::Relaxed);
                        });
                        assert_eq!(sum.load(Ordering::Relaxed), 10 + 5 * round);
                    }
                });
            }
        });
    }
}
