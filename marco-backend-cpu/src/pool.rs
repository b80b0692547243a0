//! A tiny persistent fork-join pool for the kernels.
//!
//! A decode step runs a few hundred small matrix products of 50–500 µs each; spawning threads
//! per product (~20–50 µs each) would cost a noticeable fraction, so the pool keeps
//! `num_threads() - 1` workers alive. A call to [`run`] publishes one job (a `Fn(task_index)`),
//! runs task 0 on the calling thread and waits for the workers to finish theirs. Workers spin
//! briefly after a job (the next product usually follows within microseconds) and then park,
//! so an idle process does not burn a core.
//!
//! Only one job runs at a time: a caller that finds the pool busy (another thread is in the
//! middle of a product) simply runs all its tasks inline, which keeps concurrent users correct
//! without queueing.
//!
//! The thread count defaults to `min(2, available cores)` and can be set with the
//! `MARCO_THREADS` environment variable (read once, at first use).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock, TryLockError};
use std::thread::Thread;
use std::time::{Duration, Instant};

/// How long an idle worker spins before parking.
const SPIN_BEFORE_PARK: Duration = Duration::from_micros(200);

/// A job as the workers see it: a type- and lifetime-erased `&dyn Fn(usize) + Sync`.
#[derive(Clone, Copy)]
struct JobRef {
    data: *const (dyn Fn(usize) + Sync + 'static),
}

// SAFETY: the pointee is `Sync`, and `run` keeps it alive until every worker has finished.
unsafe impl Send for JobRef {}
unsafe impl Sync for JobRef {}

struct Shared {
    /// Bumped once per published job; workers compare it to the last one they ran.
    generation: AtomicU64,
    /// Workers that have not yet finished the current job.
    pending: AtomicUsize,
    /// The current job (valid while `pending > 0`).
    job: Mutex<Option<JobRef>>,
    /// Set when a worker's task panicked, so that the caller can re-raise it.
    worker_panicked: AtomicBool,
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
            pending: AtomicUsize::new(0),
            job: Mutex::new(None),
            worker_panicked: AtomicBool::new(false),
        }));
        let mut workers = Vec::new();
        for index in 1..requested_threads() {
            let spawned = std::thread::Builder::new()
                .name(format!("marco-kernel-{index}"))
                .spawn(move || worker_loop(shared, index));
            match spawned {
                Ok(handle) => workers.push(handle.thread().clone()),
                // Fewer threads is still correct; stop adding workers.
                Err(_) => break,
            }
        }
        Pool { shared, workers, busy: Mutex::new(()) }
    })
}

fn worker_loop(shared: &'static Shared, index: usize) {
    let mut seen = 0u64;
    loop {
        let started_waiting = Instant::now();
        let mut spins = 0u32;
        let generation = loop {
            let generation = shared.generation.load(Ordering::Acquire);
            if generation != seen {
                break generation;
            }
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(64) && started_waiting.elapsed() > SPIN_BEFORE_PARK {
                // `unpark` from the publisher makes this return; spurious wake-ups re-check.
                std::thread::park_timeout(Duration::from_millis(50));
            } else {
                std::hint::spin_loop();
            }
        };
        seen = generation;
        let job = shared.job.lock().map(|guard| *guard).unwrap_or(None);
        if let Some(job) = job {
            // SAFETY: the publishing `run` call waits for `pending == 0` before returning, so the
            // closure outlives this call.
            let f = unsafe { &*job.data };
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(index))).is_err() {
                shared.worker_panicked.store(true, Ordering::Relaxed);
            }
        }
        shared.pending.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Waits for the workers of the current job even if the caller's own task unwinds, so that
/// the job's closure is never freed while a worker still runs it.
struct WaitForWorkers<'a> {
    shared: &'a Shared,
}

impl Drop for WaitForWorkers<'_> {
    fn drop(&mut self) {
        while self.shared.pending.load(Ordering::Acquire) != 0 {
            std::hint::spin_loop();
        }
        if let Ok(mut job) = self.shared.job.lock() {
            *job = None;
        }
    }
}

/// Runs `f(0)`, …, `f(n_tasks - 1)` with up to [`num_threads`] threads and returns when all are
/// done. `n_tasks` larger than the thread count are run in turn by the threads.
pub(crate) fn run(n_tasks: usize, f: &(dyn Fn(usize) + Sync)) {
    let pool = pool();
    let n_threads = pool.workers.len() + 1;
    if n_tasks <= 1 || n_threads == 1 {
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
    // Each thread t runs tasks t, t + n_threads, ...
    let strided = |thread: usize| {
        let mut task = thread;
        while task < n_tasks {
            f(task);
            task += n_threads;
        }
    };
    let strided: &(dyn Fn(usize) + Sync) = &strided;
    // SAFETY: only the lifetime is erased; `WaitForWorkers` below keeps `strided` alive until
    // every worker has decremented `pending`.
    let erased: *const (dyn Fn(usize) + Sync + 'static) = unsafe { std::mem::transmute(strided) };
    let shared = pool.shared;
    match shared.job.lock() {
        Ok(mut job) => *job = Some(JobRef { data: erased }),
        Err(_) => {
            (0..n_tasks).for_each(f);
            return;
        }
    }
    shared.pending.store(pool.workers.len(), Ordering::Release);
    shared.generation.fetch_add(1, Ordering::AcqRel);
    for worker in &pool.workers {
        worker.unpark();
    }
    {
        let _wait = WaitForWorkers { shared };
        strided(0);
    }
    if shared.worker_panicked.swap(false, Ordering::Relaxed) {
        // Kernels do not panic on valid input; a panic here is a bug worth surfacing loudly.
        #[allow(clippy::panic)]
        {
            panic!("a marco kernel worker thread panicked");
        }
    }
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
