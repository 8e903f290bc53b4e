//! The `adapterkit` command line: a thin layer of argument parsing over the library.

mod commands;
mod curves;
mod data_args;
mod input;
mod serve;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Every op allocates its output, often tens of MiB. The system allocator returns such blocks
/// to the kernel on free and page-faults them back in on the next op; mimalloc reuses them
/// (see `keep_freed_memory`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_arena_eager_commit`, `mi_option_purge_delay` and
/// `mi_option_arena_purge_mult` (their positions in its v2 header's `mi_option_e`; the Rust
/// bindings do not name them). Freed memory goes back to the kernel only after 10 s unused: a
/// training step frees and reuses its buffers within a few seconds (mimalloc's default 10 ms
/// purged them in between, halving training speed), and a one-off peak, such as a batch of
/// 512-token texts, is still returned (never purging kept it for the rest of the run).
/// mimalloc v3 is not used: once its first purge has run, it keeps purging, and a long
/// training run page-faults every buffer back in (about 12 GB per MiniLM step).
fn keep_freed_memory() {
    const ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;
    const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    const ARENA_PURGE_MULT: libmimalloc_sys::mi_option_t = 24;
    // SAFETY: plain setters of mimalloc's global options, called before any thread starts.
    unsafe {
        libmimalloc_sys::mi_option_set(ARENA_EAGER_COMMIT, 1);
        libmimalloc_sys::mi_option_set(PURGE_DELAY, 10_000);
        libmimalloc_sys::mi_option_set(ARENA_PURGE_MULT, 1);
    }
}

#[derive(Parser)]
#[command(
    name = "adapterkit",
    version,
    about = "Adapter tuning for BERT-family encoders"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Threads for the kernels, for any command (default: candle's, the physical cores).
    #[arg(long, global = true, value_name = "N")]
    threads: Option<usize>,
}

#[derive(Subcommand)]
enum Command {
    /// Show a model's architecture and parameter count.
    Info(commands::info::Args),
    /// Embed texts (arguments, or lines from stdin) with a pre-trained encoder.
    Encode(commands::encode::Args),
    /// Train an adapter (or the head alone, or the whole model) on a labelled dataset.
    Train(commands::train::Args),
    /// Evaluate a trained adapter on a labelled dataset.
    Eval(commands::eval::Args),
    /// Predict labels (JSON lines) for texts with a trained adapter.
    Predict(commands::predict::Args),
    /// AdapterFusion: learn attention over trained adapters for a new task.
    Fuse(commands::fuse::Args),
    /// Measure inference and training speed, FLOP/s and memory on random weights.
    Bench(commands::bench::Args),
    /// Mean fusion attention per layer over the fused adapters, as JSON and an SVG heatmap.
    FusionWeights(commands::fusion_weights::Args),
    /// Write a dataset's splits (a built-in one, or files) as JSON lines.
    Export(commands::export::Args),
    /// Fold a LoRA or (IA)³ adapter into the model's weights: a plain model directory.
    Merge(commands::merge::Args),
    /// Serve many adapters on one model over HTTP, requests of different adapters batched
    /// together.
    Serve(serve::Args),
}

fn main() -> ExitCode {
    keep_freed_memory();
    let cli = Cli::parse();
    if let Some(n) = cli.threads {
        if n == 0 {
            eprintln!("error: --threads must be positive");
            return ExitCode::FAILURE;
        }
        // candle and gemm read this when they first size their thread pools, which no
        // command has done yet.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    let result = match cli.command {
        Command::Info(args) => commands::info::run(args),
        Command::Encode(args) => commands::encode::run(args),
        Command::Train(args) => commands::train::run(args),
        Command::Eval(args) => commands::eval::run(args),
        Command::Export(args) => commands::export::run(args),
        Command::Merge(args) => commands::merge::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Predict(args) => commands::predict::run(args),
        Command::Fuse(args) => commands::fuse::run(args),
        Command::Bench(args) => commands::bench::run(args),
        Command::FusionWeights(args) => commands::fusion_weights::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
