use std::path::PathBuf;

use anyhow::Result;
use candle_core::Device;

use adapterkit::adapter_model::AdapterModel;
use adapterkit::heads::HeadConfig;
use adapterkit::io::adapter_dir::load_adapter;
use adapterkit::methods::fusion::FusionConfig;
use adapterkit::model::load::Pretrained;

use super::train::{fit, TrainingArgs};
use crate::data_args::DataArgs;

#[derive(clap::Args)]
pub struct Args {
    /// The pre-trained model the adapters were trained on.
    #[arg(long)]
    model: String,
    /// Adapter directories to fuse (from `adapterkit train` or AdapterHub's `save_adapter`).
    #[arg(long, num_args = 1.., required = true)]
    adapters: Vec<PathBuf>,
    #[command(flatten)]
    data: DataArgs,
    /// Fusion preset: dynamic (query, key, value; the default) or static (query, key).
    #[arg(long, default_value = "dynamic")]
    fusion: String,
    /// Train the adapters together with the fusion layers (by default they are frozen).
    #[arg(long)]
    train_adapters: bool,
    #[command(flatten)]
    training: TrainingArgs,
}

pub fn run(args: Args) -> Result<()> {
    let device = Device::Cpu;
    let config = FusionConfig::preset(&args.fusion)?;
    let splits = args.data.splits()?;
    let mut pretrained = Pretrained::load(&args.model, &device)?;
    args.training.max_seq_len.apply(&mut pretrained.tokenizer)?;
    pretrained.model.set_precision(args.training.dtype.dtype)?;
    let adapters = args
        .adapters
        .iter()
        .map(|dir| load_adapter(dir, &pretrained.model, &device))
        .collect::<adapterkit::Result<Vec<_>>>()?;
    let head = HeadConfig::new(splits.kind, &splits.train.labels())?;
    let model = AdapterModel::fused(
        pretrained.model,
        adapters,
        &config,
        head,
        args.train_adapters,
        args.training.seed,
        &device,
    )?;
    let dataset = args.data.data.clone().unwrap_or_else(|| "task".into());
    let method = format!("fusion-{}", args.fusion);
    fit(
        model,
        &splits,
        &pretrained.tokenizer,
        &args.training,
        1e-3,
        &args.model,
        &method,
        &dataset,
    )
}
