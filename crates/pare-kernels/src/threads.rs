//! The compute threads, sized once at start-up by `--threads`: rayon's global pool, on which
//! candle's own CPU ops (its GEMM, softmax) and the prefill's attention tiles run, and the same
//! number of threads (the caller among them) for [`for_each`], where the quantized products and
//! the decode attention split their short jobs. Threads live for the whole process and no op
//! spawns any.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release, SeqCst};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize};
use std::sync::{Condvar, Mutex, OnceLock, TryLockError};
use std::time::{Duration, Instant};

/// Threads when none are asked for: one per physical core (SMT siblings share the vector units
/// these kernels keep busy, so a second thread per core mostly adds contention).
pub fn default_threads() -> usize {
    num_cpus::get_physical().max(1)
}

#[derive(Debug, thiserror::Error)]
pub enum ThreadsError {
    #[error("`threads` must be at least 1")]
    Zero,
    #[error("the thread pool was already started with {0} threads")]
    AlreadyStarted(usize),
}

/// Start the pool with `threads` (default [`default_threads`]); returns its size. Call before
/// any parallel work; a second call succeeds only if it asks for the size already running.
pub fn init(threads: Option<usize>) -> Result<usize, ThreadsError> {
    let n = threads.unwrap_or_else(default_threads);
    if n == 0 {
        return Err(ThreadsError::Zero);
    }
    match rayon::ThreadPoolBuilder::new().num_threads(n).build_global() {
        Ok(()) => Ok(n),
        Err(_) if rayon::current_num_threads() == n => Ok(n),
        Err(_) => Err(ThreadsError::AlreadyStarted(rayon::current_num_threads())),
    }
}

/// Threads in the pool.
pub fn current() -> usize {
    rayon::current_num_threads()
}

/// How long an idle worker of [`for_each`] spins for the next job before it sleeps. A decode step
/// issues a job every few tens of microseconds; waking a sleeping thread costs about as much
/// (rayon's idle workers yield, then sleep, and most of a small model's decode went to that).
const SPIN: Duration = Duration::from_micros(500);

/// Run `f(0) .. f(n - 1)` over the kernel threads and the caller, returning when all are done.
///
/// The kernels' short, frequent jobs (a decode step's products and attention) run here: the
/// pool's workers spin briefly between jobs instead of sleeping. It has [`current`] − 1 workers
/// and the caller works too. Only one caller at a time uses it; a second, concurrent caller (or a
/// job that nests one) runs on rayon's pool instead.
pub fn for_each(n: usize, f: impl Fn(usize) + Sync) {
    if n == 0 {
        return;
    }
    let pool = spin_pool();
    // A job that panicked poisoned the lock; the pool itself is intact.
    let caller = match pool.as_ref().filter(|_| n > 1).map(|p| (p, p.caller.try_lock())) {
        Some((p, Ok(guard))) => Some((p, guard)),
        Some((p, Err(TryLockError::Poisoned(e)))) => Some((p, e.into_inner())),
        _ => None,
    };
    let Some((pool, _guard)) = caller else {
        use rayon::prelude::*;
        return (0..n).into_par_iter().for_each(&f);
    };
    let f: &(dyn Fn(usize) + Sync) = &f;
    // SAFETY: the job and `f` outlive every use by the workers: this function returns only once
    // the job is withdrawn and no worker is inside one (`busy` is 0).
    let f: &'static (dyn Fn(usize) + Sync) = unsafe { std::mem::transmute(f) };
    let job = Job { f, n, next: AtomicUsize::new(0), done: AtomicUsize::new(0), panicked: AtomicBool::new(false) };
    pool.job.store(&job as *const Job as *mut Job, SeqCst);
    pool.generation.fetch_add(1, SeqCst);
    if pool.sleepers.load(SeqCst) > 0 {
        let _lock = pool.sleep.lock().unwrap_or_else(|e| e.into_inner());
        pool.wake.notify_all();
    }
    job.work();
    while job.done.load(Acquire) < n {
        std::hint::spin_loop();
    }
    pool.job.store(std::ptr::null_mut(), SeqCst);
    while pool.busy.load(SeqCst) > 0 {
        std::hint::spin_loop();
    }
    if job.panicked.load(SeqCst) {
        panic!("a kernel job panicked on a pool thread");
    }
}

/// `f(0) .. f(n - 1)` computed by [`for_each`], in index order.
pub fn map<T: Send>(n: usize, f: impl Fn(usize) -> T + Sync) -> Vec<T> {
    let mut out: Vec<Option<T>> = (0..n).map(|_| None).collect();
    let slots = Slots(out.as_mut_ptr());
    // SAFETY: every index is written by exactly one task, and `out` outlives the call.
    for_each(n, |i| unsafe { *slots.at(i) = Some(f(i)) });
    out.into_iter().map(|v| v.expect("every task ran")).collect()
}

struct Slots<T>(*mut Option<T>);
// SAFETY: tasks write disjoint slots (see `map`).
unsafe impl<T: Send> Sync for Slots<T> {}
impl<T> Slots<T> {
    /// # Safety
    /// `i` is in bounds and no other task uses it.
    unsafe fn at(&self, i: usize) -> *mut Option<T> {
        self.0.add(i)
    }
}

struct Job {
    f: &'static (dyn Fn(usize) + Sync),
    n: usize,
    next: AtomicUsize,
    done: AtomicUsize,
    panicked: AtomicBool,
}

impl Job {
    /// Take tasks until none are left.
    fn work(&self) {
        loop {
            let i = self.next.fetch_add(1, Relaxed);
            if i >= self.n {
                return;
            }
            if std::panic::catch_unwind(AssertUnwindSafe(|| (self.f)(i))).is_err() {
                self.panicked.store(true, SeqCst);
            }
            self.done.fetch_add(1, Release);
        }
    }
}

struct SpinPool {
    /// The job in progress, or null.
    job: AtomicPtr<Job>,
    /// Bumped for every job: what idle workers watch.
    generation: AtomicU64,
    /// Workers between taking the job pointer and leaving the job.
    busy: AtomicUsize,
    sleepers: AtomicUsize,
    sleep: Mutex<()>,
    wake: Condvar,
    caller: Mutex<()>,
}

fn spin_pool() -> &'static Option<SpinPool> {
    static POOL: OnceLock<Option<SpinPool>> = OnceLock::new();
    let pool = POOL.get_or_init(|| {
        let workers = current().saturating_sub(1);
        (workers > 0).then(|| SpinPool {
            job: AtomicPtr::new(std::ptr::null_mut()),
            generation: AtomicU64::new(0),
            busy: AtomicUsize::new(0),
            sleepers: AtomicUsize::new(0),
            sleep: Mutex::new(()),
            wake: Condvar::new(),
            caller: Mutex::new(()),
        })
    });
    static STARTED: std::sync::Once = std::sync::Once::new();
    STARTED.call_once(|| {
        if let Some(p) = POOL.get().and_then(Option::as_ref) {
            for i in 0..current().saturating_sub(1) {
                let spawned = std::thread::Builder::new().name(format!("pare-kernel-{i}")).spawn(move || p.serve());
                if spawned.is_err() {
                    // Without its workers the caller still runs every task itself.
                    break;
                }
            }
        }
    });
    pool
}

impl SpinPool {
    /// A worker's life: wait for a job (spinning, then sleeping), help with it, repeat.
    fn serve(&self) {
        let mut seen = self.generation.load(SeqCst);
        loop {
            let started = Instant::now();
            let mut spins = 0u32;
            while self.generation.load(Acquire) == seen {
                spins += 1;
                if !spins.is_multiple_of(64) || started.elapsed() < SPIN {
                    std::hint::spin_loop();
                    continue;
                }
                let mut lock = self.sleep.lock().unwrap_or_else(|e| e.into_inner());
                self.sleepers.fetch_add(1, SeqCst);
                while self.generation.load(SeqCst) == seen {
                    lock = self.wake.wait(lock).unwrap_or_else(|e| e.into_inner());
                }
                self.sleepers.fetch_sub(1, SeqCst);
            }
            seen = self.generation.load(Acquire);
            self.busy.fetch_add(1, SeqCst);
            let job = self.job.load(SeqCst);
            if !job.is_null() {
                // SAFETY: the caller withdraws the job and waits for `busy` to reach 0 before the
                // job goes out of scope; `busy` was raised before the pointer was read.
                unsafe { &*job }.work();
            }
            self.busy.fetch_sub(1, SeqCst);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_index_runs_once_and_map_keeps_order() {
        for n in [0, 1, 2, 7, 1000] {
            let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
            for_each(n, |i| {
                hits[i].fetch_add(1, SeqCst);
            });
            assert!(hits.iter().all(|h| h.load(SeqCst) == 1), "n = {n}");
            assert_eq!(map(n, |i| i * i), (0..n).map(|i| i * i).collect::<Vec<_>>());
        }
    }

    #[test]
    fn concurrent_and_nested_callers_all_finish() {
        let sums: Vec<usize> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|t| {
                    s.spawn(move || {
                        (0..50)
                            .map(|_| {
                                map(64, |i| map(3, |j| i + j + t).into_iter().sum::<usize>()).into_iter().sum::<usize>()
                            })
                            .sum::<usize>()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (t, sum) in sums.into_iter().enumerate() {
            let one: usize = (0..64).map(|i| 3 * (i + t) + 3).sum();
            assert_eq!(sum, 50 * one);
        }
    }

    #[test]
    fn a_panicking_task_reaches_the_caller_and_the_pool_goes_on() {
        let caught = std::panic::catch_unwind(|| {
            for_each(16, |i| {
                if i == 11 {
                    panic!("task 11");
                }
            })
        });
        assert!(caught.is_err());
        assert_eq!(map(16, |i| i + 1).iter().sum::<usize>(), 136);
    }
}
