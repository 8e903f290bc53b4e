//! Predicts labels with a trained adapter, as a library user would:
//!
//! ```text
//! cargo run --release --example predict -- assets/all-MiniLM-L6-v2 runs/trec6 "What is a bottleneck?"
//! ```
//!
//! Several adapter directories and a setup run together:
//! `... -- MODEL DIR_A DIR_B --setup 'parallel(a,b)' TEXT`.

use std::path::PathBuf;

use adapterkit::predictor::Predictor;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let setup = match args.iter().position(|a| a == "--setup") {
        Some(i) if i + 1 < args.len() => Some(args.drain(i..i + 2).nth(1).expect("two drained")),
        _ => None,
    };
    let usage = "usage: predict MODEL ADAPTER_DIR... [--setup SETUP] TEXT";
    let (model, rest) = args.split_first().ok_or(usage)?;
    let (text, dirs) = rest.split_last().ok_or(usage)?;
    let dirs: Vec<PathBuf> = dirs.iter().map(PathBuf::from).collect();
    let predictor = Predictor::load(model, &dirs, setup.as_deref(), &candle_core::Device::Cpu)?;
    for (task, prediction) in &predictor.predict(&[text.as_str()])?[0] {
        println!("{task}: {}", serde_json::to_string(prediction)?);
    }
    Ok(())
}
