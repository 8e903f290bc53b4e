use anyhow::Result;
use candle_core::Device;

use adapterkit::train::batches::EncodedDataset;
use adapterkit::train::evaluate::evaluate;

use crate::data_args::DataArgs;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    tuned: super::TunedArgs,
    #[command(flatten)]
    data: DataArgs,
    /// Which split of a built-in dataset.
    #[arg(long, default_value = "test")]
    split: String,
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    #[command(flatten)]
    drop: super::DropArgs,
    #[command(flatten)]
    max_seq_len: super::MaxSeqLen,
    #[command(flatten)]
    dtype: super::DtypeArg,
    /// Print one JSON object (`accuracy`, `macro_f1`, `mcc`, ... and `examples`).
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> Result<()> {
    anyhow::ensure!(args.batch_size > 0, "--batch-size must be positive");
    let device = Device::Cpu;
    let data = args.data.one(&args.split)?;
    let (tokenizer, mut model) = args.tuned.load(&args.max_seq_len, &device)?;
    args.drop.apply(&mut model)?;
    model.encoder.set_precision(args.dtype.dtype)?;
    let encoded = EncodedDataset::new(&data, &tokenizer, &model.head.config)?;
    let metrics = evaluate(
        &model,
        &encoded,
        args.batch_size,
        tokenizer.pad_id(),
        &device,
    )?;
    if args.json {
        let mut object = serde_json::to_value(&metrics)?;
        object["examples"] = encoded.len().into();
        println!("{}", serde_json::to_string_pretty(&object)?);
    } else {
        println!("{} ({} examples): {metrics}", data.name, encoded.len());
    }
    Ok(())
}
