use std::ffi::OsString;
use std::io::Write;
use std::path::PathBuf;

use anyhow::Result;
use candle_core::Device;
use serde_json::json;

use adapterkit::predictor::Predictor;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    tuned: super::TunedArgs,
    /// Run several adapters (given with --adapter) together: an AdapterHub composition such as
    /// `parallel(a,b,c)` (one prediction per task, in one pass), `stack(a,b)`, `fuse(a,b)`,
    /// `average(a,b)[0.3,0.7]`, or its JSON.
    #[arg(long)]
    setup: Option<String>,
    #[command(flatten)]
    drop: super::DropArgs,
    #[command(flatten)]
    max_seq_len: super::MaxSeqLen,
    #[command(flatten)]
    dtype: super::DtypeArg,
    /// Read texts from this file, one per line.
    #[arg(long)]
    file: Option<PathBuf>,
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    /// Texts; with none (and no --file), or `-`, one text per line of stdin.
    texts: Vec<OsString>,
}

pub fn run(args: Args) -> Result<()> {
    anyhow::ensure!(args.batch_size > 0, "--batch-size must be positive");
    let texts = match &args.file {
        Some(path) => crate::input::file_lines(path)?,
        None => crate::input::texts(&args.texts)?,
    };
    if args.setup.is_none() {
        args.tuned.dir()?;
    }
    let mut predictor = Predictor::load(
        &args.tuned.model,
        &args.tuned.adapter,
        args.setup.as_deref(),
        &Device::Cpu,
    )?;
    predictor.set_skip_layers(&args.drop.layers())?;
    predictor.set_precision(args.dtype.dtype)?;
    args.max_seq_len.apply(&mut predictor.tokenizer)?;
    // Every batch the setup cannot run (batch_split sizes) is an error before any output.
    let (full, rest) = (
        texts.len().min(args.batch_size),
        texts.len() % args.batch_size,
    );
    for rows in [full, rest].into_iter().filter(|r| *r > 0) {
        predictor.check_batch(rows)?;
    }
    let mut out = std::io::stdout().lock();
    for chunk in texts.chunks(args.batch_size) {
        let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
        for (text, tasks) in chunk.iter().zip(predictor.predict(&refs)?) {
            let line = if args.setup.is_some() {
                json!({ "text": text, "tasks": tasks })
            } else {
                // One adapter: its prediction itself, with the text.
                let mut line = serde_json::to_value(tasks.into_values().next())?;
                line["text"] = text.as_str().into();
                line
            };
            writeln!(out, "{line}")?;
        }
    }
    Ok(())
}
