use std::ffi::OsString;
use std::io::Write;
use std::path::PathBuf;

use anyhow::Result;
use candle_core::{Device, Tensor};
use serde_json::{json, Value};

use adapterkit::data::TaskKind;
use adapterkit::heads::{scores, Head};
use adapterkit::methods::composition::Setup;
use adapterkit::model::Mode;

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
    let mut out = std::io::stdout().lock();
    let Some(setup) = &args.setup else {
        let (tokenizer, mut model) = args.tuned.load(&device)?;
        args.drop.apply(&mut model)?;
        for chunk in texts.chunks(args.batch_size) {
            let batch = tokenizer.batch(&refs(chunk), &device)?;
            let logits = model.logits(&batch, &mut Mode::Eval)?;
            for (text, mut line) in chunk.iter().zip(predictions(&model.head, &logits)?) {
                line["text"] = text.as_str().into();
                writeln!(out, "{line}")?;
            }
        }
        return Ok(());
    };
    let setup = Setup::parse(setup)?;
    let (tokenizer, mut model) = args.tuned.load_composed(setup, &device)?;
    args.drop.apply_composed(&mut model)?;
    // Every batch the setup cannot run (batch_split sizes) is an error before any output.
    let (full, rest) = (
        texts.len().min(args.batch_size),
        texts.len() % args.batch_size,
    );
    for rows in [full, rest].into_iter().filter(|r| *r > 0) {
        model.check_batch(rows)?;
    }
    for chunk in texts.chunks(args.batch_size) {
        let batch = tokenizer.batch(&refs(chunk), &device)?;
        let logits = model.logits(&batch, &mut Mode::Eval)?;
        let mut lines: Vec<Value> = chunk
            .iter()
            .map(|text| json!({ "text": text, "tasks": {} }))
            .collect();
        for task in &logits {
            let head = &model.heads[task.head];
            for (row, prediction) in task.rows.clone().zip(predictions(head, &task.logits)?) {
                lines[row]["tasks"][&head.name] = prediction;
            }
        }
        for line in lines {
            writeln!(out, "{line}")?;
        }
    }
    Ok(())
}

fn refs(texts: &[String]) -> Vec<&str> {
    texts.iter().map(String::as_str).collect()
}

/// One JSON object per row of `logits`: the label (or labels, or value) and the scores.
fn predictions(head: &Head, logits: &Tensor) -> Result<Vec<Value>> {
    let kind = head.config.kind()?;
    let labels = head.config.labels();
    let scores = scores(kind, logits)?;
    if kind == TaskKind::Regression {
        let values = scores.to_vec1::<f32>()?;
        return Ok(values.into_iter().map(|v| json!({ "value": v })).collect());
    }
    let rows = scores.to_vec2::<f32>()?;
    Ok(rows
        .into_iter()
        .map(|row| {
            let by_label: serde_json::Map<_, _> = labels
                .iter()
                .cloned()
                .zip(row.iter().map(|p| (*p).into()))
                .collect();
            if kind == TaskKind::MultiLabel {
                let chosen: Vec<&String> = labels
                    .iter()
                    .zip(&row)
                    .filter(|(_, p)| **p > 0.5)
                    .map(|(l, _)| l)
                    .collect();
                json!({ "labels": chosen, "scores": by_label })
            } else {
                let best = adapterkit::train::evaluate::argmax(&row);
                json!({ "label": labels[best], "scores": by_label })
            }
        })
        .collect())
}
