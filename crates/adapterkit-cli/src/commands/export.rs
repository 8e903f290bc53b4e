use std::path::PathBuf;

use anyhow::Result;
use serde_json::{json, Value};

use adapterkit::data::{Dataset, Target};
use adapterkit::io::atomic::write_atomic;

use crate::data_args::DataArgs;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    data: DataArgs,
    /// Directory for train.jsonl, validation.jsonl and test.jsonl (created if needed).
    #[arg(long)]
    out: PathBuf,
}

/// Writes the splits as JSON lines (`text`, `text_pair` when present, `label`), so other tools
/// train and evaluate on exactly the examples adapterkit uses.
pub fn run(args: Args) -> Result<()> {
    let splits = args.data.splits()?;
    std::fs::create_dir_all(&args.out)?;
    let named = [
        ("train", Some(&splits.train)),
        ("validation", Some(&splits.validation)),
        ("test", splits.test.as_ref()),
    ];
    for (name, dataset) in named {
        let Some(dataset) = dataset else { continue };
        let path = args.out.join(format!("{name}.jsonl"));
        write_atomic(&path, jsonl(dataset).as_bytes())?;
        println!("{} ({} examples)", path.display(), dataset.len());
    }
    Ok(())
}

fn jsonl(dataset: &Dataset) -> String {
    let mut out = String::new();
    for example in &dataset.examples {
        let label: Value = match &example.target {
            Target::Class(class) => class.as_str().into(),
            Target::Classes(classes) => classes.clone().into(),
            Target::Value(value) => (*value).into(),
        };
        let mut line = json!({ "text": example.text, "label": label });
        if let Some(pair) = &example.text_pair {
            line["text_pair"] = pair.as_str().into();
        }
        out.push_str(&line.to_string());
        out.push('\n');
    }
    out
}
