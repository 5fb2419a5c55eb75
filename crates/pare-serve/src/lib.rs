//! `pare serve`: an OpenAI-compatible HTTP server (axum on tokio) in front of one engine thread
//! that runs many sequences side by side, each with its own sampling settings, KV-cache press
//! and prefill token pruning.
//!
//! The server listens at once and answers `/health` with 503 while the model loads; requests
//! queue (bounded: 429 beyond it) until the engine admits them under `--max-concurrent` and the
//! `--kv-memory` budget; a client that leaves cancels its sequences; SIGTERM stops accepting,
//! lets running requests finish, and returns.

pub mod engine;
pub mod error;
pub mod metrics;
pub mod request;
pub mod routes;

use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pare_model::LoadedModel;
use tokio::net::TcpListener;

pub use error::{ApiError, ServeError};

/// Serve on 127.0.0.1 at a port the OS picks, from a thread with its own runtime, until the
/// process exits (tests, fuzzing, embedding in another program): its address, as soon as it
/// listens. `/health` answers 503 until the model has loaded.
pub fn spawn_local(config: ServeConfig) -> std::io::Result<std::net::SocketAddr> {
    let runtime = tokio::runtime::Runtime::new()?;
    let std_listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    std_listener.set_nonblocking(true)?;
    let addr = std_listener.local_addr()?;
    let listener = {
        let _context = runtime.enter();
        TcpListener::from_std(std_listener)?
    };
    std::thread::Builder::new().name("pare-serve".into()).spawn(move || {
        if let Err(e) = runtime.block_on(serve(listener, config, std::future::pending())) {
            tracing::error!("pare serve stopped: {e}");
        }
    })?;
    Ok(addr)
}

/// Loads the model; runs on a blocking thread while the server already answers `/health`.
pub type Loader = Box<dyn FnOnce() -> Result<LoadedModel, String> + Send>;

pub struct ServeConfig {
    pub load: Loader,
    /// The `model` name clients use (and `/v1/models` lists).
    pub served_name: String,
    /// Bearer key every endpoint but `/health` requires; None: open.
    pub api_key: Option<String>,
    /// Sequences generating at once.
    pub max_concurrent: usize,
    /// Sequences waiting for admission before requests get 429.
    pub max_queue: usize,
    /// KV-cache bytes admission may commit; None: half the memory free where the caches live
    /// (the GPU's once the weights are in, else the host's).
    pub kv_memory: Option<usize>,
    /// Prompt tokens one engine step prefills at most, over every waiting prompt (see
    /// [`DEFAULT_MAX_BATCHED_TOKENS`]).
    pub max_batched_tokens: usize,
    /// Longest a request may take, queueing included.
    pub timeout: Duration,
}

/// Prompt tokens per step by default. A step that prefills this many stalls every decoding
/// sequence for that long, so this bounds their inter-token latency while prompts arrive; a
/// larger budget prefills a burst of prompts in fewer, larger steps.
pub const DEFAULT_MAX_BATCHED_TOKENS: usize = 2048;

/// Serve on `listener` until `shutdown` resolves, then finish the requests in flight.
pub async fn serve(
    listener: TcpListener,
    config: ServeConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    metrics::handle();
    let ready: Arc<OnceLock<routes::Ready>> = Arc::new(OnceLock::new());
    let state =
        routes::AppState { ready: ready.clone(), api_key: config.api_key.map(Arc::from), timeout: config.timeout };
    let (failed_tx, failed_rx) = tokio::sync::oneshot::channel::<String>();
    let engine_thread = Arc::new(std::sync::Mutex::new(None));
    let (limits, name, load) = (
        (config.max_concurrent.max(1), config.max_queue, config.kv_memory, config.max_batched_tokens.max(1)),
        config.served_name,
        config.load,
    );
    let thread_slot = engine_thread.clone();
    tokio::task::spawn_blocking(move || {
        let started = std::time::Instant::now();
        match load_model(load) {
            Ok((loaded, kv_bytes_per_token)) => {
                let loaded = Arc::new(loaded);
                let limits = engine::Limits {
                    max_concurrent: limits.0,
                    max_queue: limits.1,
                    kv_memory: limits.2.unwrap_or_else(|| default_kv_memory(&loaded.model)),
                    max_batched_tokens: limits.3,
                    kv_bytes_per_token,
                };
                ::metrics::gauge!(metrics::KV_BUDGET).set(limits.kv_memory as f64);
                let (engine, thread) = engine::Engine::start(loaded.clone(), limits);
                *thread_slot.lock().expect("not poisoned") = Some(thread);
                tracing::info!(
                    model = name,
                    load_s = started.elapsed().as_secs_f64(),
                    kv_memory = limits.kv_memory,
                    kv_bytes_per_token,
                    "model loaded; serving"
                );
                let created = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
                let _ = ready.set(routes::Ready { loaded, engine, name, created });
            }
            Err(e) => {
                let _ = failed_tx.send(e);
            }
        }
    });
    let load_failure = Arc::new(std::sync::Mutex::new(None));
    let failure_slot = load_failure.clone();
    let stop = async move {
        tokio::select! {
            _ = shutdown => tracing::info!("shutting down: finishing requests in flight"),
            Ok(e) = failed_rx => *failure_slot.lock().expect("not poisoned") = Some(e),
        }
    };
    axum::serve(listener, routes::router(state.clone())).with_graceful_shutdown(stop).await?;
    if let Some(e) = load_failure.lock().expect("not poisoned").take() {
        return Err(ServeError::Load(e));
    }
    // The last engine handle goes with the state: the engine thread sees its channel close.
    drop(state);
    let thread = engine_thread.lock().expect("not poisoned").take();
    if let Some(thread) = thread {
        tokio::task::spawn_blocking(move || thread.join()).await.ok();
    }
    Ok(())
}

/// Load, check the model can serve, and measure one token's uncompressed KV bytes.
fn load_model(load: Loader) -> Result<(LoadedModel, usize), String> {
    let loaded = load()?;
    loaded.tokenizer().map_err(|e| e.to_string())?;
    let one = [vec![0]];
    let (_, cache) = loaded
        .model
        .prefill(pare_model::PrefillInput::Tokens(&one), &mut pare_model::Hooks::default())
        .map_err(|e| e.to_string())?;
    Ok((loaded, cache.uncompressed_bytes()))
}

/// Half the memory free where the caches live: on GPUs, their memory once the weights are in
/// (every rank's GPU for a model split over several); on the CPU what the kernel says is
/// available now (Linux), else 4 GiB.
fn default_kv_memory(model: &pare_model::Model) -> usize {
    let gpus: Vec<_> = model.ranks().iter().filter_map(|rank| pare_kernels::gpu_memory(rank.device())).collect();
    if !gpus.is_empty() {
        return gpus.iter().map(|m| ((m.total - m.used) / 2) as usize).sum();
    }
    let available = std::fs::read_to_string("/proc/meminfo").ok().and_then(|text| {
        let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
        line.split_whitespace().nth(1)?.parse::<usize>().ok()
    });
    available.map_or(4 << 30, |kib| kib * 1024 / 2)
}

/// Bind `host:port`, log requests to stderr, serve until SIGTERM or Ctrl-C, drain, return.
pub fn run(host: &str, port: u16, config: ServeConfig) -> Result<(), ServeError> {
    // One log line per request; RUST_LOG narrows or widens it.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        let addr = format!("{host}:{port}");
        let listener =
            TcpListener::bind(&addr).await.map_err(|source| ServeError::Bind { addr: addr.clone(), source })?;
        tracing::info!(addr = %listener.local_addr()?, "listening");
        serve(listener, config, shutdown_signal()).await
    })
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
