//! The one pool of compute threads: rayon's global pool, sized once at start-up.
//!
//! The quantized kernels split their output rows over it, and candle's own CPU ops (its GEMM,
//! softmax) run on rayon too, so sizing the global pool sizes everything; threads live for the
//! whole process and no op spawns any.

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
