//! The training loop shared by every method: adapters, head-only and full fine-tuning.
//!
//! AdamW with decoupled weight decay, linear warm-up and decay, global-norm gradient clipping,
//! length-bucketed padded batches, evaluation after each epoch, early stopping on a chosen
//! metric, the best model kept (saved on each improvement), and a JSONL log of every epoch.

pub mod batches;
pub mod evaluate;
pub mod optim;
pub mod schedule;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use crate::adapter_model::AdapterModel;
use crate::error::{Error, Result};
use crate::io::adapter_dir;
use crate::metrics::Metrics;
use crate::model::Mode;
use crate::rng::SeededRng;
use batches::EncodedDataset;
use optim::{AdamW, AdamWConfig};
use schedule::LinearSchedule;

#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    pub epochs: usize,
    pub batch_size: usize,
    pub learning_rate: f64,
    pub warmup_ratio: f64,
    pub weight_decay: f64,
    pub max_grad_norm: f64,
    pub seed: u64,
    /// Stop after this many epochs without improvement.
    pub patience: Option<usize>,
    /// The validation metric to select on; `None` picks the task's default.
    pub metric: Option<String>,
    pub eval_batch_size: usize,
    /// Robust AdapterDrop: for each batch, skip the adapters of the lowest `n` layers, `n`
    /// drawn uniformly from `0..=max` with the run's seed, so that one adapter serves any `n`.
    pub robust_drop_max: Option<usize>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            epochs: 3,
            batch_size: 32,
            learning_rate: 1e-4,
            warmup_ratio: 0.1,
            weight_decay: 0.01,
            max_grad_norm: 1.0,
            seed: 42,
            patience: None,
            metric: None,
            eval_batch_size: 64,
            robust_drop_max: None,
        }
    }
}

/// What one epoch did; also one line of `training_log.jsonl`.
#[derive(Debug, Clone, Serialize)]
pub struct EpochReport {
    pub epoch: usize,
    pub step: usize,
    pub train_loss: f64,
    pub validation: Metrics,
    pub learning_rate: f64,
    pub seconds: f64,
    pub train_examples_per_second: f64,
    pub best: bool,
    /// The loss of each of the epoch's steps, in order.
    pub step_losses: Vec<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TrainSummary {
    pub metric: String,
    pub best_epoch: usize,
    pub best_value: f64,
    pub stopped_early: bool,
    pub train_seconds: f64,
    pub train_examples_per_second: f64,
    pub epochs: Vec<EpochReport>,
}

/// Progress callbacks, for a progress bar; the library prints nothing itself.
pub trait Observer {
    fn on_start(&mut self, _total_steps: usize) {}
    fn on_step(&mut self, _step: usize, _loss: f64, _examples: usize) {}
    fn on_epoch(&mut self, _report: &EpochReport) {}
}

pub struct Silent;
impl Observer for Silent {}

/// Where the best model goes: a directory in AdapterHub's layout plus the log.
pub struct Output<'a> {
    pub dir: &'a Path,
    /// Recorded in the saved configs (`model_name`).
    pub model_name: &'a str,
}

pub const TRAINING_LOG: &str = "training_log.jsonl";

/// Trains `model` in place; on return it holds the best epoch's weights.
pub fn train(
    model: &mut AdapterModel,
    train: &EncodedDataset,
    validation: &EncodedDataset,
    config: &TrainConfig,
    pad_id: u32,
    output: Option<&Output>,
    observer: &mut dyn Observer,
) -> Result<TrainSummary> {
    if config.epochs == 0 || config.batch_size == 0 || config.eval_batch_size == 0 {
        return Err(Error::input("epochs and batch sizes must be positive"));
    }
    if train.is_empty() || validation.is_empty() {
        return Err(Error::input(
            "training and validation data must not be empty",
        ));
    }
    let device = model.head.params().0[0].1.device().clone();
    let kind = model.head.config.kind()?;
    let metric = config
        .metric
        .clone()
        .unwrap_or_else(|| evaluate::default_metric(kind).to_string());
    let known = evaluate::metric_names(kind);
    if !known.contains(&metric.as_str()) {
        return Err(Error::input(format!(
            "unknown metric '{metric}' (this task has: {})",
            known.join(", ")
        )));
    }
    if config.patience == Some(0) {
        return Err(Error::input("patience must be at least 1 epoch"));
    }
    let lower_is_better = metric == "mse";

    let params = model.trainable();
    let mut optimizer = AdamW::new(
        &params,
        AdamWConfig {
            weight_decay: config.weight_decay,
            ..Default::default()
        },
    )?;
    let steps_per_epoch = train.len().div_ceil(config.batch_size);
    let schedule = LinearSchedule::new(
        config.learning_rate,
        steps_per_epoch * config.epochs,
        config.warmup_ratio,
    );
    let mut shuffle_rng = SeededRng::new(config.seed);
    let mut drop_rng = SeededRng::new(config.seed ^ 0xad4b_7e5d_0000_0002);
    let layers = model.encoder.layers.len();
    // Dropout draws from its own stream, so changing the batch order does not change masks.
    let mut mode = Mode::train(config.seed ^ 0x5eed_d20f_0000_0001);
    let log_path = output.map(|o| o.dir.join(TRAINING_LOG));
    if let Some(o) = output {
        std::fs::create_dir_all(o.dir).map_err(|e| Error::io(o.dir, e))?;
        let path = o.dir.join(TRAINING_LOG);
        if path.exists() {
            std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
        }
    }

    observer.on_start(steps_per_epoch * config.epochs);
    let mut train_seconds = 0.0;
    let mut history: Vec<EpochReport> = Vec::new();
    let mut best: Option<(
        usize,
        f64,
        std::collections::HashMap<String, candle_core::Tensor>,
    )> = None;
    let mut step = 0;
    let mut stopped_early = false;
    for epoch in 1..=config.epochs {
        let epoch_start = Instant::now();
        let (mut loss_sum, mut seen) = (0.0, 0usize);
        let mut step_losses = Vec::new();
        for indices in train.epoch_batches(config.batch_size, &mut shuffle_rng) {
            let (batch, targets) = train.batch(&indices, pad_id, &device)?;
            if let Some(max) = config.robust_drop_max {
                let dropped = drop_rng.below(max.min(layers) + 1);
                model.set_skip_layers(&(0..dropped).collect());
            }
            let logits = model.logits(&batch, &mut mode)?;
            let mut loss = model.head.loss(&logits, &targets)?;
            if let Some(regularization) = model.regularization_loss()? {
                loss = (loss + regularization)?;
            }
            let loss_value = loss.to_scalar::<f32>()? as f64;
            if !loss_value.is_finite() {
                let kept = match (&best, output) {
                    (Some((e, _, _)), Some(o)) => format!(
                        "the best adapter so far (epoch {e}) is kept in {}",
                        o.dir.display()
                    ),
                    _ => "no epoch finished, so nothing was saved".to_string(),
                };
                return Err(Error::Training(format!(
                    "the loss became {loss_value} at epoch {epoch}, step {}; lower the learning rate ({}); {kept}",
                    step + 1,
                    config.learning_rate
                )));
            }
            let mut grads = loss.backward()?;
            optim::clip_grad_norm(&params, &mut grads, config.max_grad_norm)?;
            optimizer.step(&grads, schedule.at(step))?;
            step += 1;
            loss_sum += loss_value * indices.len() as f64;
            step_losses.push(loss_value);
            seen += indices.len();
            observer.on_step(step, loss_value, indices.len());
        }
        let epoch_train_seconds = epoch_start.elapsed().as_secs_f64();
        if config.robust_drop_max.is_some() {
            model.set_skip_layers(&Default::default()); // evaluate with every adapter
        }
        train_seconds += epoch_train_seconds;
        let metrics =
            evaluate::evaluate(model, validation, config.eval_batch_size, pad_id, &device)?;
        let value = metrics
            .get(&metric)
            .expect("checked against metric_names above");
        let improved = match &best {
            None => true,
            Some((_, b, _)) => {
                if lower_is_better {
                    value < *b
                } else {
                    value > *b
                }
            }
        };
        if improved {
            best = Some((epoch, value, model.trainable().snapshot()?));
            if let Some(o) = output {
                adapter_dir::save(o.dir, model, o.model_name)?;
            }
        }
        let report = EpochReport {
            epoch,
            step,
            train_loss: loss_sum / seen.max(1) as f64,
            validation: metrics,
            learning_rate: schedule.at(step.saturating_sub(1)),
            seconds: epoch_start.elapsed().as_secs_f64(),
            train_examples_per_second: seen as f64 / epoch_train_seconds.max(1e-9),
            best: improved,
            step_losses,
        };
        if let Some(path) = &log_path {
            append_line(path, &report)?;
        }
        observer.on_epoch(&report);
        history.push(report);
        let best_epoch = best.as_ref().map_or(epoch, |b| b.0);
        if config.patience.is_some_and(|p| epoch - best_epoch >= p) && epoch < config.epochs {
            stopped_early = true;
            break;
        }
    }
    let (best_epoch, best_value, weights) = best.expect("at least one epoch ran");
    params.load(&weights).map_err(Error::Training)?;
    let examples: usize = history.len() * train.len();
    Ok(TrainSummary {
        metric,
        best_epoch,
        best_value,
        stopped_early,
        train_seconds,
        train_examples_per_second: examples as f64 / train_seconds.max(1e-9),
        epochs: history,
    })
}

fn append_line(path: &PathBuf, value: &impl Serialize) -> Result<()> {
    let line = serde_json::to_string(value).map_err(|e| Error::file(path, e))?;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    writeln!(file, "{line}")
        .and_then(|_| file.flush())
        .map_err(|e| Error::io(path, e))
}
