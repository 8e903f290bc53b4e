//! `adapterkit serve`: one pre-trained model and many adapters over HTTP.
//!
//! Threads: one tokio thread parses, tokenizes and answers requests (light work); one compute
//! thread takes batches from the queue and runs them, its kernels on the `--threads` pool
//! (default: the physical cores). On a 2-core box the compute pool has both cores, and the
//! HTTP thread takes its share of time between batches.

mod batcher;
mod errors;
mod metrics;
mod registry;
mod routes;

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use candle_core::Device;

use adapterkit::adapter_set::AdapterSet;

use metrics::Metrics;
use registry::Registry;
use routes::{AppState, READY, SHUTTING_DOWN};

#[derive(clap::Args)]
pub struct Args {
    /// The pre-trained model every adapter was trained on (directory or hub id).
    #[arg(long)]
    model: String,
    /// Loads every adapter folder inside it, named by its folder; `PUT /v1/adapters/{name}`
    /// loads only from inside it.
    #[arg(long)]
    adapter_dir: Option<PathBuf>,
    /// An adapter to serve under a name: `NAME=PATH` (repeatable).
    #[arg(long = "adapter", value_name = "NAME=PATH")]
    adapters: Vec<String>,
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// 0 picks a free port (the address is printed when ready).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Requests to /v1 need `Authorization: Bearer KEY` (health and metrics stay open).
    #[arg(long, env = "ADAPTERKIT_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Padded tokens (texts x longest text) per forward pass, across requests and adapters.
    #[arg(long, default_value_t = 16384)]
    max_batch_tokens: usize,
    /// Texts one request may hold.
    #[arg(long, default_value_t = 32)]
    max_client_batch: usize,
    /// Requests waiting at most; more are answered 429.
    #[arg(long, default_value_t = 256)]
    max_queue: usize,
    /// Largest request body in bytes (413 beyond).
    #[arg(long, default_value_t = 2_000_000)]
    payload_limit: usize,
    /// Adapters kept loaded at most (the least recently used is dropped, and loaded again
    /// from its path when asked for); default: all.
    #[arg(long)]
    max_adapters: Option<usize>,
    #[command(flatten)]
    max_seq_len: crate::commands::MaxSeqLen,
    #[command(flatten)]
    dtype: crate::commands::DtypeArg,
}

pub fn run(args: Args) -> Result<()> {
    for (flag, value) in [
        ("--max-batch-tokens", args.max_batch_tokens),
        ("--max-client-batch", args.max_client_batch),
        ("--max-queue", args.max_queue),
        ("--payload-limit", args.payload_limit),
        ("--max-adapters", args.max_adapters.unwrap_or(1)),
    ] {
        anyhow::ensure!(value > 0, "{flag} must be positive");
    }
    let adapters = (args.adapters.iter())
        .map(|a| {
            let (name, path) = a
                .split_once('=')
                .with_context(|| format!("--adapter {a}: give NAME=PATH"))?;
            Ok((name.to_string(), PathBuf::from(path)))
        })
        .collect::<Result<Vec<_>>>()?;
    let adapter_dir = (args.adapter_dir.as_ref())
        .map(|d| {
            d.canonicalize()
                .with_context(|| format!("--adapter-dir {}", d.display()))
        })
        .transpose()?;

    let mut set = AdapterSet::load(&args.model, &Device::Cpu)?;
    args.max_seq_len.apply(&mut set.tokenizer)?;
    set.set_precision(args.dtype.dtype)?;
    let registry = Arc::new(Registry::new(
        Arc::new(set),
        adapter_dir.clone(),
        args.max_adapters,
    ));
    let metrics = Arc::new(Metrics::new());
    let (queue, taker) = batcher::queue(args.max_queue, metrics.clone());
    let compute = {
        let (registry, max_tokens) = (registry.clone(), args.max_batch_tokens);
        std::thread::Builder::new()
            .name("compute".into())
            .spawn(move || batcher::run(taker, registry, max_tokens))?
    };
    let state = Arc::new(AppState {
        registry: registry.clone(),
        queue,
        metrics,
        api_key: args.api_key.filter(|k| !k.is_empty()),
        max_client_batch: args.max_client_batch,
        health: AtomicU8::new(routes::LOADING),
    });

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind((args.host.as_str(), args.port))
            .await
            .with_context(|| format!("listening on {}:{}", args.host, args.port))?;
        let address = listener.local_addr()?;
        let app = routes::router(state.clone(), args.payload_limit);
        let server = axum::serve(listener, app).with_graceful_shutdown(shutdown(state.clone()));
        let server = tokio::spawn(std::future::IntoFuture::into_future(server));
        // Health answers 503 while the adapters load.
        let loading = tokio::task::spawn_blocking(move || {
            load_adapters(&registry, adapter_dir.as_deref(), &adapters)
        });
        loading.await??;
        let _ = state.health.compare_exchange(
            routes::LOADING,
            READY,
            Ordering::SeqCst,
            Ordering::SeqCst,
        );
        println!("listening on http://{address}");
        std::io::stdout().flush()?;
        server.await??;
        anyhow::Ok(())
    })?;
    // The routes are gone: the queue closes once this last sender goes, and the compute
    // thread ends after the jobs still in it.
    drop(state);
    compute
        .join()
        .map_err(|_| anyhow::anyhow!("the compute thread panicked"))?;
    eprintln!("stopped");
    Ok(())
}

/// Every folder in `dir` (a broken one is skipped with a warning, so that one bad upload does
/// not keep the rest from being served), then each `NAME=PATH` (which must load).
fn load_adapters(
    registry: &Registry,
    dir: Option<&std::path::Path>,
    named: &[(String, PathBuf)],
) -> Result<()> {
    if let Some(dir) = dir {
        let mut folders: Vec<PathBuf> = std::fs::read_dir(dir)
            .with_context(|| format!("--adapter-dir {}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_dir())
            .collect();
        folders.sort();
        for folder in folders {
            let name = folder.file_name().unwrap_or_default().to_string_lossy();
            if let Err(e) = registry.load(&name, &folder) {
                eprintln!("warning: skipping {}: {e}", folder.display());
            }
        }
    }
    for (name, path) in named {
        registry
            .load(name, path)
            .with_context(|| format!("--adapter {name}={}", path.display()))?;
    }
    eprintln!("{} adapters loaded", registry.list().len());
    Ok(())
}

/// Resolves on SIGTERM or Ctrl-C: from then on new requests get 503, and the server finishes
/// the ones in flight.
async fn shutdown(state: Arc<AppState>) {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = terminate => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    state.health.store(SHUTTING_DOWN, Ordering::SeqCst);
    eprintln!("shutting down: finishing the requests in flight");
}
