use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::Device;
use indicatif::{ProgressBar, ProgressStyle};

use adapterkit::adapter_model::{AdapterFormat, AdapterModel, Method};
use adapterkit::data::Splits;
use adapterkit::heads::HeadConfig;
use adapterkit::io::atomic::write_json_atomic;
use adapterkit::methods::adapter::AdapterConfig;
use adapterkit::model::load::Pretrained;
use adapterkit::tokenizer::TextTokenizer;
use adapterkit::train::batches::EncodedDataset;
use adapterkit::train::evaluate::evaluate;
use adapterkit::train::{self, EpochReport, Observer, Output, TrainConfig};

use crate::data_args::DataArgs;

#[derive(clap::Args)]
pub struct Args {
    /// A local model directory or a Hugging Face model id.
    #[arg(long)]
    model: String,
    #[command(flatten)]
    data: DataArgs,
    /// houlsby, pfeiffer, parallel, lora, ia3 (or an AdapterHub preset name), head, full.
    #[arg(long, default_value = "houlsby")]
    method: String,
    /// An adapter config as JSON (AdapterHub's BnConfig, LoRAConfig or a union), instead of
    /// the method's preset.
    #[arg(long)]
    adapter_config: Option<PathBuf>,
    /// Overrides one adapter config field, e.g. `reduction_factor=32` or `leave_out=[0,1]`.
    #[arg(long = "adapter-option", value_parser = parse_key_value)]
    adapter_options: Vec<(String, String)>,
    /// The adapter's files: AdapterHub's (`adapterhub`), or Hugging Face PEFT's (`peft`, a
    /// LoRA only); the head is in AdapterHub's files either way.
    #[arg(long, default_value = "adapterhub", value_parser = ["adapterhub", "peft"])]
    format: String,
    /// Keep the encoder's LayerNorms frozen beside the adapter (AdapterHub's `train_adapter`);
    /// by default they train, as in the Houlsby paper.
    #[arg(long)]
    freeze_layer_norms: bool,
    /// The adapter's and head's name in the saved files.
    #[arg(long)]
    name: Option<String>,
    #[command(flatten)]
    training: TrainingArgs,
}

/// The training curves `train` and `fuse` draw next to `training_log.jsonl`.
pub const CURVES: &str = "training_curves.svg";

/// Options of the training loop, shared by `train` and `fuse`.
#[derive(clap::Args)]
pub struct TrainingArgs {
    /// Output directory: the best adapter in AdapterHub's layout, plus the training log.
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 3)]
    epochs: usize,
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Peak learning rate (default: 1e-3 for adapters, heads and fusion; 5e-5 for full fine-tuning).
    #[arg(long)]
    lr: Option<f64>,
    #[arg(long, default_value_t = 0.1)]
    warmup_ratio: f64,
    #[arg(long, default_value_t = 0.01)]
    weight_decay: f64,
    #[arg(long, default_value_t = 1.0)]
    max_grad_norm: f64,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Stop after this many epochs without improvement on --metric.
    #[arg(long)]
    patience: Option<usize>,
    /// Validation metric that selects the best epoch (default: accuracy, pearson or micro_f1).
    #[arg(long)]
    metric: Option<String>,
    /// Robust AdapterDrop: each batch skips the adapters of the lowest n layers, n drawn from
    /// 0..=MAX, so one adapter serves any n at inference.
    #[arg(long, value_name = "MAX")]
    robust_drop: Option<usize>,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
    #[command(flatten)]
    pub max_seq_len: super::MaxSeqLen,
    #[command(flatten)]
    pub dtype: super::DtypeArg,
    /// Continue a killed run from the checkpoint it left in --out (kept after every epoch);
    /// with the same options and --threads, the result is the uninterrupted run's, bit for bit.
    #[arg(long)]
    resume: bool,
    /// Also keep a checkpoint every N steps inside an epoch (a kill then loses at most N steps).
    #[arg(long, value_name = "N")]
    save_steps: Option<usize>,
    /// Write into an --out directory that holds other files (ours replace those of the same
    /// names; nothing else there is touched).
    #[arg(long)]
    overwrite: bool,
}

fn parse_key_value(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .ok_or_else(|| format!("expected key=value, got '{s}'"))
}

fn method(args: &Args) -> Result<Method> {
    let mut method = Method::from_name(&args.method)?;
    if let Some(path) = &args.adapter_config {
        let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: invalid JSON", path.display()))?;
        // Either a bare config or AdapterHub's adapter_config.json envelope.
        let version = json
            .get("version")
            .and_then(|v| v.as_str())
            .map(str::to_owned);
        let config = json.get("config").cloned().unwrap_or(json);
        let config = AdapterConfig::from_json(config, version.as_deref())
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        method = Method::Adapter(config);
    }
    if !args.adapter_options.is_empty() {
        let Method::Adapter(config) = &method else {
            anyhow::bail!(
                "--adapter-option applies to adapter methods, not '{}'",
                args.method
            );
        };
        method = Method::Adapter(
            config
                .with_overrides(&args.adapter_options)
                .map_err(anyhow::Error::msg)?,
        );
    }
    Ok(method)
}

struct Progress {
    bar: Option<ProgressBar>,
    loss: f64,
}

impl Observer for Progress {
    fn on_start(&mut self, total_steps: usize) {
        if let Some(bar) = &self.bar {
            bar.set_length(total_steps as u64);
        }
    }
    fn on_step(&mut self, _step: usize, loss: f64, _examples: usize) {
        self.loss = if self.loss == 0.0 {
            loss
        } else {
            0.98 * self.loss + 0.02 * loss
        };
        if let Some(bar) = &self.bar {
            bar.set_message(format!("loss {:.4}", self.loss));
            bar.inc(1);
        }
    }
    fn on_epoch(&mut self, r: &EpochReport) {
        let line = format!(
            "epoch {}: train loss {:.4}, validation {}, {:.1} examples/s{}",
            r.epoch,
            r.train_loss,
            r.validation,
            r.train_examples_per_second,
            if r.best { " (best)" } else { "" }
        );
        match &self.bar {
            Some(bar) => bar.println(line),
            None => eprintln!("{line}"),
        }
    }
}

pub fn run(args: Args) -> Result<()> {
    let device = Device::Cpu;
    let method = method(&args)?;
    let splits = args.data.splits()?;
    let mut pretrained = Pretrained::load(&args.model, &device)?;
    args.training.max_seq_len.apply(&mut pretrained.tokenizer)?;
    pretrained.model.set_precision(args.training.dtype.dtype)?;
    let name = args
        .name
        .clone()
        .unwrap_or_else(|| args.data.data.clone().unwrap_or_else(|| "task".into()));
    let head = HeadConfig::new(splits.kind, &splits.train.labels())?;
    let mut model = AdapterModel::new(
        pretrained.model,
        &method,
        &name,
        head,
        !args.freeze_layer_norms,
        args.training.seed,
        &device,
    )?;
    if args.format == "peft" {
        model.format = AdapterFormat::Peft;
        adapterkit::io::peft::writable(&model)?;
    }
    let default_lr = if matches!(method, Method::Full) {
        5e-5
    } else {
        1e-3
    };
    fit(
        model,
        &splits,
        &pretrained.tokenizer,
        &args.training,
        default_lr,
        &args.model,
        &args.method,
        &name,
    )
}

/// Trains `model` on `splits`, saves the best epoch to `--out`, evaluates it on the test
/// split, and reports (`results.json` in `--out`, and stdout).
#[allow(clippy::too_many_arguments)]
pub fn fit(
    mut model: AdapterModel,
    splits: &Splits,
    tok: &TextTokenizer,
    args: &TrainingArgs,
    default_lr: f64,
    model_name: &str,
    method: &str,
    dataset: &str,
) -> Result<()> {
    adapterkit::io::adapter_dir::check_output_dir(&args.out, args.overwrite)?;
    let device = Device::Cpu;
    let head = model.head.config.clone();
    let train_set = EncodedDataset::new(&splits.train, tok, &head)?;
    let validation = EncodedDataset::new(&splits.validation, tok, &head)?;
    let test = splits
        .test
        .as_ref()
        .map(|t| EncodedDataset::new(t, tok, &head))
        .transpose()?;
    let config = TrainConfig {
        epochs: args.epochs,
        batch_size: args.batch_size,
        learning_rate: args.lr.unwrap_or(default_lr),
        warmup_ratio: args.warmup_ratio,
        weight_decay: args.weight_decay,
        max_grad_norm: args.max_grad_norm,
        seed: args.seed,
        patience: args.patience,
        metric: args.metric.clone(),
        eval_batch_size: 64,
        robust_drop_max: args.robust_drop,
        resume: args.resume,
        save_steps: args.save_steps,
    };
    let trainable = model.trainable().count();
    let base = model.encoder.parameter_count();
    eprintln!(
        "training {method} on {dataset} ({} train / {} validation examples): {trainable} trainable parameters, {:.2}% of the model's {base}",
        train_set.len(), validation.len(), 100.0 * trainable as f64 / base as f64
    );
    let bar = (!args.quiet).then(|| {
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template(
                "{bar:30} {pos}/{len} steps [{elapsed_precise}<{eta_precise}, {per_sec}] {msg}",
            )
            .expect("valid template"),
        );
        bar
    });
    let mut progress = Progress { bar, loss: 0.0 };
    let output = Output {
        dir: &args.out,
        model_name,
    };
    let summary = train::train(
        &mut model,
        &train_set,
        &validation,
        &config,
        tok.pad_id(),
        Some(&output),
        &mut progress,
    )?;
    if let Some(bar) = &progress.bar {
        bar.finish_and_clear();
    }
    let test_metrics = test
        .as_ref()
        .map(|t| evaluate(&model, t, 64, tok.pad_id(), &device))
        .transpose()?;
    let result = serde_json::json!({
        "method": method,
        "dataset": dataset,
        "train_examples": train_set.len(),
        "seed": args.seed,
        "trainable_parameters": trainable,
        "model_parameters": base,
        "trainable_share": trainable as f64 / base as f64,
        "learning_rate": config.learning_rate,
        "epochs": config.epochs,
        "batch_size": config.batch_size,
        "best_epoch": summary.best_epoch,
        "metric": summary.metric,
        "validation": summary.best_value,
        "test": test_metrics,
        "train_seconds": summary.train_seconds,
        "train_examples_per_second": summary.train_examples_per_second,
        "peak_rss_bytes": adapterkit::bench::peak_rss_bytes(),
    });
    write_json_atomic(&args.out.join("results.json"), &result)?;
    adapterkit::io::atomic::write_atomic(
        &args.out.join(CURVES),
        crate::curves::training_curves_svg(&summary.epochs, &summary.metric).as_bytes(),
    )?;
    adapterkit::io::adapter_dir::record_max_seq_len(&args.out, args.max_seq_len.max_seq_len)?;
    let base_weights = args.out.join(adapterkit::io::adapter_dir::BASE_WEIGHTS);
    if base_weights.exists() {
        eprintln!(
            "note: {} holds encoder weights trained here (the LayerNorms beside the adapter, or \
             the whole encoder). adapterkit loads them with the adapter; Python's `adapters` does \
             not read this file and would give other scores. For an adapter Python reads alike, \
             train with --freeze-layer-norms.",
            base_weights.display()
        );
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&result)?);
    } else {
        println!(
            "best epoch {} ({} {:.4} on validation); saved to {}",
            summary.best_epoch,
            summary.metric,
            summary.best_value,
            args.out.display()
        );
        if let Some(m) = &test_metrics {
            println!("test: {m}");
        }
    }
    Ok(())
}
