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

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
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
/// work into a few tasks per thread. Where the pool cannot take the job (one task, no worker,
/// or another thread's job in progress) the caller runs every task itself.
pub(crate) fn run(n_tasks: usize, f: &(dyn Fn(usize) + Sync)) {
    if n_tasks <= 1 || !try_share(n_tasks, f) {
        (0..n_tasks).for_each(f);
    }
}

/// [`run`] on the pool's threads, or nothing: returns `false`, having run no task, where the
/// pool has no worker or another thread's job is in progress.
fn try_share(n_tasks: usize, f: &(dyn Fn(usize) + Sync)) -> bool {
    let pool = pool();
    if pool.workers.is_empty() {
        return false;
    }
    let _busy = match pool.busy.try_lock() {
        Ok(guard) => guard,
        Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
        Err(TryLockError::WouldBlock) => return false,
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
        Err(_) => return false,
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
    true
}

/// Runs `work(0)`, …, `work(tasks - 1)` on the kernels' thread pool (the caller's thread
/// included) and returns when all are done: for host-side work of a batch that waits on memory,
/// such as the per-sequence KV cache bookkeeping of a decode step, so that two threads' cache
/// misses overlap. `work` must not panic (a worker's panic is re-raised here).
pub fn parallel_for(tasks: usize, work: &(dyn Fn(usize) + Sync)) {
    run(tasks, work)
}

/// How a batched step is shared by the pool's threads, see [`batch_parts`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchSplit {
    /// Data-parallel when the threads are far apart (measured), tensor-parallel otherwise.
    Auto,
    /// Always data-parallel (each thread runs a share of the sequences through the whole model).
    Always,
    /// Never: every product is shared by all threads (tensor-parallel).
    Never,
}

/// The [`BatchSplit`] in force: `MARCO_BATCH_SPLIT=auto|always|never` (read once), or the last
/// [`set_batch_split`].
static BATCH_SPLIT: AtomicU8 = AtomicU8::new(UNSET);
const UNSET: u8 = u8::MAX;

/// Sets how batched steps are shared by the threads (overrides `MARCO_BATCH_SPLIT`). Every
/// choice computes the same bits; only the speed differs.
pub fn set_batch_split(split: BatchSplit) {
    BATCH_SPLIT.store(split as u8, Ordering::Relaxed);
}

fn batch_split() -> BatchSplit {
    let mut code = BATCH_SPLIT.load(Ordering::Relaxed);
    if code == UNSET {
        let from_env = match std::env::var("MARCO_BATCH_SPLIT").ok().as_deref().map(str::trim) {
            Some("always") => BatchSplit::Always,
            Some("never") => BatchSplit::Never,
            _ => BatchSplit::Auto,
        };
        // A concurrent `set_batch_split` wins over the environment.
        let _ = BATCH_SPLIT.compare_exchange(UNSET, from_env as u8, Ordering::Relaxed, Ordering::Relaxed);
        code = BATCH_SPLIT.load(Ordering::Relaxed);
    }
    [BatchSplit::Always, BatchSplit::Never].into_iter().find(|&split| split as u8 == code).unwrap_or(BatchSplit::Auto)
}

/// Batches of up to this many new tokens may be split by sequence (decode steps; a long
/// prefill keeps every product on all threads, where the products dominate).
pub const BATCH_SPLIT_MAX_TOKENS: usize = 64;

/// A cache-line round trip between two threads above which they count as far apart. The
/// 2-vCPU development VM measures 75–120 ns when its vCPUs share a die and 360–900 ns when
/// the hypervisor has put them on two (which it does for seconds to minutes at a time).
pub const FAR_ROUND_TRIP: Duration = Duration::from_nanos(250);

/// How often [`batch_parts`] measures the round trip again (also after a failed try).
const ROUND_TRIP_MAX_AGE: Duration = Duration::from_millis(20);

/// The last measured round trip (ns, 0 = none yet), and when the next measurement is due (ns
/// since `EPOCH`).
static ROUND_TRIP_NS: AtomicU64 = AtomicU64::new(0);
static ROUND_TRIP_DUE: AtomicU64 = AtomicU64::new(0);
static EPOCH: OnceLock<Instant> = OnceLock::new();

/// Into how many parts (each run by one thread through the whole model) a batched step of
/// `sequences` sequences and `tokens` new tokens should be cut: 1 (tensor-parallel: every
/// product shared by all threads) or up to [`num_threads`] (data-parallel).
///
/// Tensor parallelism streams each weight once per step, but every product's output columns
/// come from both threads, so the activations of every sequence cross between the cores
/// several times per layer; data parallelism streams the weights once per thread but keeps
/// each sequence on one core. Which is faster depends on where the cores are. On the
/// development VM (two vCPUs, the default model, eight sequences), with both vCPUs on one die
/// the two ways decode at about the same rate, ~2100–2150 tok/s (the second thread finds the
/// weights the first streamed in their shared L3); with the vCPUs on two dies, tensor
/// parallelism drops to ~1650–1700 (each line of activations crossing costs ~400 ns) and data
/// parallelism reaches ~2150–2250 (two dies, two caches and memory paths). With
/// [`BatchSplit::Auto`] (the default) the pool therefore measures a cache-line round trip
/// between its threads (a few µs, at most every 20 ms) and splits when it reaches
/// [`FAR_ROUND_TRIP`]; on machines whose cores share a cache it keeps tensor parallelism,
/// which streams the weights once.
pub fn batch_parts(sequences: usize, tokens: usize) -> usize {
    let threads = num_threads();
    if threads < 2 || sequences < 2 || tokens > BATCH_SPLIT_MAX_TOKENS {
        return 1;
    }
    let parts = threads.min(sequences);
    match batch_split() {
        BatchSplit::Always => parts,
        BatchSplit::Never => 1,
        BatchSplit::Auto => match round_trip() {
            Some(trip) if trip >= FAR_ROUND_TRIP => parts,
            _ => 1,
        },
    }
}

/// The round trip of a cache line between the caller and a pool worker, measured at most
/// every 20 ms (`None` before a measurement has succeeded).
pub fn round_trip() -> Option<Duration> {
    let now = EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64;
    let due = ROUND_TRIP_DUE.load(Ordering::Relaxed);
    // Whoever moves the due time measures, so concurrent callers do not all measure, and a
    // failed try waits its turn like a successful one.
    if now >= due
        && ROUND_TRIP_DUE
            .compare_exchange(due, now + ROUND_TRIP_MAX_AGE.as_nanos() as u64, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        if let Some(trip) = measure_round_trip() {
            ROUND_TRIP_NS.store((trip.as_nanos() as u64).max(1), Ordering::Relaxed);
        }
    }
    match ROUND_TRIP_NS.load(Ordering::Relaxed) {
        0 => None,
        ns => Some(Duration::from_nanos(ns)),
    }
}

/// Ping-pongs one cache line between the caller and a worker (one pool job of two tasks) and
/// returns the median of a few round trips. `None` when the pool has no worker or is busy
/// (nothing runs), or when no worker took part in time (a side that waits more than
/// [`PROBE_PATIENCE`] for the other gives up; so does a thread that claims both tasks).
fn measure_round_trip() -> Option<Duration> {
    const TRIPS: u64 = 24;
    #[repr(align(64))]
    struct Line(AtomicU64);
    let line = Line(AtomicU64::new(0));
    let arrived = AtomicU64::new(0);
    let abandoned = AtomicBool::new(false);
    let trips: Mutex<Vec<u64>> = Mutex::new(Vec::with_capacity(TRIPS as usize));
    // Spins until `done()` or the patience runs out (then marks the probe abandoned).
    let wait = |done: &dyn Fn() -> bool| {
        let start = Instant::now();
        let mut spins = 0u32;
        while !done() {
            spins = spins.wrapping_add(1);
            if abandoned.load(Ordering::Relaxed) || (spins.is_multiple_of(256) && start.elapsed() > PROBE_PATIENCE) {
                abandoned.store(true, Ordering::Relaxed);
                return false;
            }
            std::hint::spin_loop();
        }
        true
    };
    let probe = |_task: usize| {
        let me = arrived.fetch_add(1, Ordering::AcqRel);
        if me == 0 {
            // The pinger: waits for a partner, then times each round trip.
            if !wait(&|| arrived.load(Ordering::Acquire) >= 2) {
                return;
            }
            let mut measured = Vec::with_capacity(TRIPS as usize);
            for i in 0..TRIPS {
                let start = Instant::now();
                line.0.store(2 * i + 1, Ordering::Release);
                if !wait(&|| line.0.load(Ordering::Acquire) == 2 * i + 2) {
                    return;
                }
                measured.push(start.elapsed().as_nanos() as u64);
            }
            if let Ok(mut trips) = trips.lock() {
                *trips = measured;
            }
        } else {
            // The ponger (a thread that was the pinger itself finds the probe abandoned).
            for i in 0..TRIPS {
                if !wait(&|| line.0.load(Ordering::Acquire) == 2 * i + 1) {
                    return;
                }
                line.0.store(2 * i + 2, Ordering::Release);
            }
        }
    };
    if !try_share(2, &probe) {
        return None;
    }
    let mut trips = trips.into_inner().ok()?;
    if abandoned.load(Ordering::Relaxed) || trips.len() != TRIPS as usize {
        return None;
    }
    trips.sort_unstable();
    Some(Duration::from_nanos(trips[trips.len() / 2]))
}

/// How long one side of the round-trip probe waits for the other.
const PROBE_PATIENCE: Duration = Duration::from_micros(200);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_parts_follow_the_setting_and_the_limits() {
        let threads = num_threads();
        set_batch_split(BatchSplit::Always);
        assert_eq!(batch_parts(8, 8), if threads > 1 { threads.min(8) } else { 1 });
        assert_eq!(batch_parts(1, 1), 1, "one sequence is never cut");
        assert_eq!(batch_parts(8, BATCH_SPLIT_MAX_TOKENS + 1), 1, "a long prefill is never cut");
        set_batch_split(BatchSplit::Never);
        assert_eq!(batch_parts(8, 8), 1);
        set_batch_split(BatchSplit::Auto);
        let parts = batch_parts(8, 8);
        assert!(parts == 1 || parts == threads.min(8));
    }

    #[test]
    fn the_round_trip_between_threads_is_measured() {
        if num_threads() < 2 {
            return;
        }
        // Other tests may hold the pool, and on a loaded machine a worker may not get a core
        // within the probe's patience (the probe then gives up): keep trying for a while, so
        // that only a pool whose workers never answer fails.
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut measured = None;
        while measured.is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
            measured = measure_round_trip();
        }
        let trip = measured.expect("a round trip between two pool threads");
        assert!(trip > Duration::ZERO && trip < PROBE_PATIENCE, "{trip:?}");
    }

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
