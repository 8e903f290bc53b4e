use std::ffi::OsString;
use std::io::Write;

use std::path::PathBuf;

use anyhow::Result;
use candle_core::Device;

use adapterkit::adapter_set::AdapterSet;
use adapterkit::batch::Batch;
use adapterkit::pooling::Pooling;

#[derive(clap::Args)]
pub struct Args {
    /// A local model directory or a Hugging Face model id.
    #[arg(long)]
    model: String,
    /// Embed with the states an adapter (a directory saved by `train`) makes of the model's.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// How token states become one vector per text.
    #[arg(long, value_enum, default_value = "mean")]
    pooling: PoolingArg,
    /// Scale each embedding to unit length.
    #[arg(long)]
    normalize: bool,
    /// Texts per forward pass.
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    #[command(flatten)]
    max_seq_len: super::MaxSeqLen,
    #[command(flatten)]
    dtype: super::DtypeArg,
    /// One JSON object per line (`text`, `embedding`) instead of space-separated numbers.
    #[arg(long)]
    json: bool,
    /// Texts to embed; with none, or `-`, one text per line of stdin.
    texts: Vec<OsString>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum PoolingArg {
    Cls,
    Mean,
}

pub fn run(args: Args) -> Result<()> {
    anyhow::ensure!(args.batch_size > 0, "--batch-size must be positive");
    let texts = crate::input::texts(&args.texts)?;
    let device = Device::Cpu;
    let mut set = AdapterSet::load(&args.model, &device)?;
    set.set_precision(args.dtype.dtype)?;
    args.max_seq_len.apply(&mut set.tokenizer)?;
    let adapter = match &args.adapter {
        Some(dir) => Some(set.load_adapter("adapter", dir)?),
        None => None,
    };
    let pooling = match args.pooling {
        PoolingArg::Cls => Pooling::Cls,
        PoolingArg::Mean => Pooling::Mean,
    };
    let mut out = std::io::stdout().lock();
    for chunk in texts.chunks(args.batch_size) {
        let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
        // An adapter's texts are truncated to the limit it was trained with, unless
        // --max-seq-len gives another (as `predict`).
        let limit = adapter
            .as_ref()
            .filter(|_| args.max_seq_len.max_seq_len.is_none());
        let rows = (refs.iter())
            .map(|t| set.encode(t, limit.map(|a| &a.info)))
            .collect::<adapterkit::Result<Vec<_>>>()?;
        let batch = Batch::pad(&rows, set.tokenizer.pad_id(), &device)?;
        let pooled = set.embed(adapter.as_ref(), &batch, pooling, args.normalize)?;
        for (text, embedding) in chunk.iter().zip(pooled) {
            if args.json {
                let line = serde_json::json!({ "text": text, "embedding": embedding });
                writeln!(out, "{line}")?;
            } else {
                let numbers: Vec<String> = embedding.iter().map(|v| v.to_string()).collect();
                writeln!(out, "{}", numbers.join(" "))?;
            }
        }
    }
    Ok(())
}
