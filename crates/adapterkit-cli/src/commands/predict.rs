use std::ffi::OsString;
use std::io::Write;
use std::path::PathBuf;

use anyhow::Result;
use candle_core::Device;

use adapterkit::data::TaskKind;
use adapterkit::heads::scores;
use adapterkit::model::Mode;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    tuned: super::TunedArgs,
    #[command(flatten)]
    drop: super::DropArgs,
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
    let device = Device::Cpu;
    let (tokenizer, mut model) = args.tuned.load(&device)?;
    args.drop.apply(&mut model)?;
    let config = &model.head.config;
    let (kind, labels) = (config.kind()?, config.labels());
    let mut out = std::io::stdout().lock();
    for chunk in texts.chunks(args.batch_size) {
        let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
        let batch = tokenizer.batch(&refs, &device)?;
        let logits = model.logits(&batch, &mut Mode::Eval)?;
        let scores = scores(kind, &logits)?;
        let rows: Vec<Vec<f32>> = match kind {
            TaskKind::Regression => scores
                .to_vec1::<f32>()?
                .into_iter()
                .map(|v| vec![v])
                .collect(),
            _ => scores.to_vec2::<f32>()?,
        };
        for (text, row) in chunk.iter().zip(rows) {
            let line = match kind {
                TaskKind::Regression => serde_json::json!({ "text": text, "value": row[0] }),
                TaskKind::Classification => {
                    let best = adapterkit::train::evaluate::argmax(&row);
                    let by_label: serde_json::Map<_, _> = labels
                        .iter()
                        .cloned()
                        .zip(row.iter().map(|p| (*p).into()))
                        .collect();
                    serde_json::json!({ "text": text, "label": labels[best], "scores": by_label })
                }
                TaskKind::MultiLabel => {
                    let chosen: Vec<&String> = labels
                        .iter()
                        .zip(&row)
                        .filter(|(_, p)| **p > 0.5)
                        .map(|(l, _)| l)
                        .collect();
                    let by_label: serde_json::Map<_, _> = labels
                        .iter()
                        .cloned()
                        .zip(row.iter().map(|p| (*p).into()))
                        .collect();
                    serde_json::json!({ "text": text, "labels": chosen, "scores": by_label })
                }
            };
            writeln!(out, "{line}")?;
        }
    }
    Ok(())
}
