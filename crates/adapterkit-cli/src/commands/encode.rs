use std::ffi::OsString;
use std::io::Write;

use anyhow::Result;
use candle_core::{Device, D};

use adapterkit::model::load::Pretrained;
use adapterkit::model::{Mode, NoHooks};
use adapterkit::pooling::Pooling;

#[derive(clap::Args)]
pub struct Args {
    /// A local model directory or a Hugging Face model id.
    #[arg(long)]
    model: String,
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
    let mut pretrained = Pretrained::load(&args.model, &device)?;
    args.max_seq_len.apply(&mut pretrained.tokenizer)?;
    let pooling = match args.pooling {
        PoolingArg::Cls => Pooling::Cls,
        PoolingArg::Mean => Pooling::Mean,
    };
    let mut out = std::io::stdout().lock();
    for chunk in texts.chunks(args.batch_size) {
        let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
        let batch = pretrained.tokenizer.batch(&refs, &device)?;
        let hidden = pretrained
            .model
            .forward(&batch, &NoHooks, &mut Mode::Eval)?;
        let mut pooled = pooling.pool(&hidden, &batch.attention_mask)?;
        if args.normalize {
            let norm = pooled
                .sqr()?
                .sum_keepdim(D::Minus1)?
                .sqrt()?
                .clamp(1e-12, f64::MAX)?;
            pooled = pooled.broadcast_div(&norm)?;
        }
        for (text, embedding) in chunk.iter().zip(pooled.to_vec2::<f32>()?) {
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
