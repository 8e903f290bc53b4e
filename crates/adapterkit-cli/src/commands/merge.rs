use std::path::PathBuf;

use anyhow::Result;
use candle_core::Device;

use adapterkit::io::{adapter_dir, model_dir};
use adapterkit::model::load::ModelFiles;

use super::TunedArgs;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    tuned: TunedArgs,
    /// The directory for the merged model (a Hugging Face model directory, plus the head).
    #[arg(long)]
    out: PathBuf,
    /// Write into a non-empty directory that is not an adapterkit run.
    #[arg(long)]
    overwrite: bool,
}

/// Folds a LoRA (or (IA)³) into the model's weights and writes the result.
pub fn run(args: Args) -> Result<()> {
    let device = Device::Cpu;
    let dir = args.tuned.dir()?;
    adapter_dir::check_output_dir(&args.out, args.overwrite)?;
    let files = ModelFiles::locate(&args.tuned.model)?;
    let encoder = files.load_model(&files.load_config()?, &device)?;
    let model = adapter_dir::load(dir, encoder, &device)?;
    model_dir::save_merged(&args.out, &files, &model, &args.tuned.model)?;
    println!("{}", args.out.display());
    Ok(())
}
